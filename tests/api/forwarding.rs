//! AMQP forwarding end to end: a device's MQTT traffic reaches a consumer group created through
//! the HTTP API, in the vendor's format. Needs RabbitMQ (`FLEETGATE_AMQP_URL`); fails with a
//! message saying how to start it without one.

use crate::helpers::*;
use fleetgate::forwarder::testing::{broker_addr, test_amqp_url, url_via, Proxy};
use fleetgate::ota::firmware::NewFirmware;
use fleetgate::ota::FirmwareStatus;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use rand::Rng;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn header(d: &lapin::message::Delivery, key: &str) -> String {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(key))
    {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("header {key}: {other:?}"),
    }
}

/// A gateway forwarding to RabbitMQ under a fresh exchange prefix, with consumer group `gid` in
/// the default instance and a consumer on its queue: `(app, prefix, channel, consumer)`.
async fn app_with_consumed_group(
    url: &str,
    gid: &str,
) -> (TestApp, String, lapin::Channel, lapin::Consumer) {
    let prefix = format!("fgtest-{:08x}", rand::thread_rng().gen::<u32>());
    let app = spawn_app_with_amqp(url, &prefix).await;
    let (status, group) = app
        .post(
            "/api/v1/instances/default/consumer-groups",
            json!({"group_id": gid, "name": gid}),
        )
        .await;
    assert_eq!(status, 201, "{group}");
    let rabbit = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = rabbit.create_channel().await.unwrap();
    let consumer = ch
        .basic_consume(
            format!("{prefix}.default.{gid}").as_str().into(),
            gid.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (app, prefix, ch, consumer)
}

/// The consumer's next delivery (within 30 s), acknowledged.
async fn next_acked(consumer: &mut lapin::Consumer, what: &str) -> lapin::message::Delivery {
    let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 30 s"))
        .expect("consumer open")
        .expect("delivery");
    d.ack(BasicAckOptions::default()).await.unwrap();
    d
}

#[tokio::test]
async fn device_traffic_reaches_a_consumer_group() {
    let url = test_amqp_url("device_traffic_reaches_a_consumer_group").await;
    let (app, prefix, ch, mut consumer) = app_with_consumed_group(&url, "e2e").await;

    let pk = app.create_product("forwarded").await;
    let secret = app.create_device(&pk, "sensor01").await;
    let mut device = connect(app.mqtt_addr(), &credentials(&pk, "sensor01", &secret)).await;
    device
        .client
        .publish(
            format!("/sys/{pk}/sensor01/thing/event/property/post"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":"11","version":"1.0","params":{"Temp":21.5},"method":"thing.event.property.post"}"#,
        )
        .await
        .unwrap();
    device
        .wait_packet("PUBACK", |p| matches!(p, Packet::PubAck(_)))
        .await;
    device
        .client
        .publish(
            format!("/sys/{pk}/sensor01/thing/event/overheat/post"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":"12","params":{"value":{"t":99}},"method":"thing.event.overheat.post"}"#,
        )
        .await
        .unwrap();
    device
        .wait_packet("PUBACK", |p| matches!(p, Packet::PubAck(_)))
        .await;
    device.client.disconnect().await.unwrap();

    let mut got: Vec<(String, Value)> = Vec::new();
    while got.len() < 4 {
        let d = next_acked(&mut consumer, "forwarded messages").await;
        assert_eq!(header(&d, "productKey"), pk);
        assert_eq!(header(&d, "deviceName"), "sensor01");
        assert_eq!(header(&d, "instanceId"), "default");
        got.push((
            header(&d, "topic"),
            serde_json::from_slice(&d.data).unwrap(),
        ));
    }
    let topics: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        topics,
        vec![
            format!("/as/mqtt/status/{pk}/sensor01"),
            format!("/{pk}/sensor01/thing/event/property/post"),
            format!("/{pk}/sensor01/thing/event/overheat/post"),
            format!("/as/mqtt/status/{pk}/sensor01"),
        ],
        "in the device's order"
    );
    assert_eq!(got[0].1["status"], "online");
    assert_eq!(got[0].1["clientIp"], "127.0.0.1");
    assert_eq!(got[1].1["items"]["Temp"]["value"], 21.5);
    assert_eq!(got[1].1["requestId"], "11");
    assert_eq!(got[2].1["identifier"], "overheat");
    assert_eq!(got[2].1["value"], json!({"t": 99}));
    assert_eq!(got[3].1["status"], "offline");

    let (status, details) = app
        .get("/api/v1/instances/default/consumer-groups/e2e")
        .await;
    assert_eq!(status, 200, "{details}");
    assert_eq!(details["consumers"], 1);
    assert_eq!(details["backlog"], 0);
    assert_eq!(details["queue_type"], "classic");
    assert_eq!(details["queue_status"], "declared");
    assert!(details["queue_error"].is_null(), "{details}");
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("fleetgate_forwarder_published_total"),
        "{metrics}"
    );

    let (status, _) = app
        .request(
            reqwest::Method::DELETE,
            "/api/v1/instances/default/consumer-groups/e2e",
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 204);
    let _ = ch
        .exchange_delete(
            format!("{prefix}.default").into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
}

/// Deleting a device cancels its OTA tasks (`DEVICE_DELETED`) after the registry forgot the
/// device; those task events still reach the consumer groups of the instance that owned it.
#[tokio::test]
async fn ota_cancel_of_a_deleted_device_reaches_its_consumer_groups() {
    let url = test_amqp_url("ota_cancel_of_a_deleted_device_reaches_its_consumer_groups").await;
    let (app, prefix, ch, mut consumer) = app_with_consumed_group(&url, "ota").await;

    let pk = app.create_product("doomed devices").await;
    app.create_device(&pk, "doomed").await;
    let repo = app.app().firmware().clone();
    let package = repo
        .create_from_bytes(NewFirmware::new(&pk, "2.0.0"), b"image 2.0.0")
        .await
        .unwrap();
    repo.set_status(&package.firmware_id, FirmwareStatus::Verified)
        .await
        .unwrap();
    let (status, job) = app
        .post(
            "/api/v1/ota/jobs",
            json!({"firmware_id": package.firmware_id, "target": "ALL"}),
        )
        .await;
    assert_eq!(status, 201, "{job}");
    let (status, _) = app
        .request(
            reqwest::Method::DELETE,
            &format!("/api/v1/products/{pk}/devices/doomed"),
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 204);

    let topic = format!("/{pk}/doomed/ota/task/state");
    let canceled = loop {
        let d = next_acked(&mut consumer, "the DEVICE_DELETED cancel").await;
        assert_eq!(header(&d, "topic"), topic);
        let body: Value = serde_json::from_slice(&d.data).unwrap();
        if body["status"] == "CANCELED" {
            break (d, body);
        }
    };
    let (d, body) = canceled;
    assert_eq!(header(&d, "instanceId"), "default");
    assert_eq!(header(&d, "deviceName"), "doomed");
    assert_eq!(body["jobId"], job["job_id"]);
    assert!(
        body["desc"]
            .as_str()
            .is_some_and(|s| s.starts_with("DEVICE_DELETED")),
        "{body}"
    );
    assert_eq!(
        app.metric(r#"fleetgate_forwarder_dropped_total{reason="unknown_device"}"#)
            .await,
        0.0
    );

    let _ = ch
        .queue_delete(
            format!("{prefix}.default.ota").as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await;
    let _ = ch
        .exchange_delete(
            format!("{prefix}.default").into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
}

/// A device publishing `posts` QoS 1 property posts back to back, with rumqttc resending what
/// was not acknowledged (and reconnecting whenever the gateway closes the connection); it
/// records which posts got a PUBACK. rumqttc numbers a client's QoS 1 publishes 1, 2, 3… in
/// call order and keeps the number across resends; with `inflight` above `posts` no number is
/// reused, so PUBACK `pkid` acknowledges post `pkid - 1` and nothing else.
struct PostingDevice {
    acked: Arc<Mutex<BTreeSet<usize>>>,
    /// Connections the gateway closed.
    closed: Arc<AtomicUsize>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Drop for PostingDevice {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl PostingDevice {
    fn start(addr: std::net::SocketAddr, pk: &str, dn: &str, secret: &str, posts: usize) -> Self {
        let mut opts = options(addr, &credentials(pk, dn, secret));
        opts.set_inflight(u16::try_from(posts + 2).expect("few posts"));
        // A resumed session: rumqttc resends unacknowledged publishes only then (MQTT 3.1.1
        // §4.4); after a clean reconnect it forgets them.
        opts.set_clean_session(false);
        let (client, mut eventloop) = AsyncClient::new(opts, posts);
        let acked: Arc<Mutex<BTreeSet<usize>>> = Arc::default();
        let closed: Arc<AtomicUsize> = Arc::default();
        let topic = format!("/sys/{pk}/{dn}/thing/event/property/post");
        // Bodies large enough to fill a small outbox quickly.
        let pad = "x".repeat(400);
        let publisher = tokio::spawn(async move {
            for i in 0..posts {
                let body = format!(
                    r#"{{"id":"{i}","version":"1.0","params":{{"Seq":{i},"Pad":"{pad}"}},"method":"thing.event.property.post"}}"#
                );
                client
                    .publish(topic.as_str(), QoS::AtLeastOnce, false, body)
                    .await
                    .unwrap();
            }
            // Keep the client (and so the event loop's request channel) alive.
            std::future::pending::<()>().await;
        });
        let recorder = {
            let (acked, closed) = (acked.clone(), closed.clone());
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            assert!(ack.pkid >= 1 && usize::from(ack.pkid) <= posts);
                            acked.lock().unwrap().insert(usize::from(ack.pkid) - 1);
                        }
                        Ok(_) => {}
                        // Closed by the gateway: the next poll reconnects and resends.
                        Err(_) => {
                            closed.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            })
        };
        PostingDevice {
            acked,
            closed,
            tasks: [publisher, recorder],
        }
    }

    fn acked(&self) -> BTreeSet<usize> {
        self.acked.lock().unwrap().clone()
    }
}

/// Issue 14, item 3: with RabbitMQ unreachable long enough for the outbox to fill, posts are
/// no longer acknowledged and dropped: their PUBACK is withheld (the connection closed), the
/// devices resend them, and once RabbitMQ is back every post that got a PUBACK reaches the
/// consumer group.
#[tokio::test]
async fn a_full_outbox_withholds_pubacks_and_every_acknowledged_post_arrives() {
    let url =
        test_amqp_url("a_full_outbox_withholds_pubacks_and_every_acknowledged_post_arrives").await;
    const DEVICES: usize = 4;
    const POSTS: usize = 150;
    let proxy = Proxy::start(broker_addr(&url).await).await;
    let prefix = format!("fgtest-{:08x}", rand::thread_rng().gen::<u32>());
    let app = spawn_app_with_amqp_and(&url_via(&url, proxy.addr), &prefix, |s| {
        s.amqp.outbox_max_bytes = 64 * 1024;
        s.amqp.outbox_full_wait_ms = 200;
        s.amqp.reconnect_initial_ms = 50;
        s.amqp.reconnect_max_ms = 200;
    })
    .await;
    let (status, group) = app
        .post(
            "/api/v1/instances/default/consumer-groups",
            json!({"group_id": "full", "name": "full"}),
        )
        .await;
    assert_eq!(status, 201, "{group}");

    // RabbitMQ unreachable.
    proxy.cut();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while app.get("/healthz").await.1["amqp"] == "connected" {
        assert!(tokio::time::Instant::now() < deadline, "still connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let pk = app.create_product("outbox fills").await;
    let mut fleet = Vec::new();
    for d in 0..DEVICES {
        let dn = format!("full{d}");
        let secret = app.create_device(&pk, &dn).await;
        fleet.push((
            dn.clone(),
            PostingDevice::start(app.mqtt_addr(), &pk, &dn, &secret, POSTS),
        ));
    }
    // The outbox fills, then posts are refused and their connections closed unacknowledged;
    // the devices reconnect and resend, and are refused again while RabbitMQ stays away.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while fleet
        .iter()
        .any(|(_, d)| d.closed.load(Ordering::SeqCst) < 3)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox never refused posts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(app.metric("fleetgate_forwarder_refused_total").await >= (3 * DEVICES) as f64);
    assert!(app.metric("fleetgate_mqtt_publishes_withheld_total").await >= (3 * DEVICES) as f64);
    let acked_while_down: usize = fleet.iter().map(|(_, d)| d.acked().len()).sum();
    assert!(
        acked_while_down < DEVICES * POSTS,
        "every post was acknowledged although the outbox could not hold them"
    );
    assert!(
        app.metric("fleetgate_forwarder_outbox_bytes").await <= 64.0 * 1024.0,
        "the outbox exceeded its bound"
    );

    // RabbitMQ back: the outbox drains, the devices' resends are taken and acknowledged.
    proxy.restore();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while fleet.iter().any(|(_, d)| d.acked().len() < POSTS) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every post was acknowledged after RabbitMQ came back: {:?}",
            fleet
                .iter()
                .map(|(dn, d)| (dn, d.acked().len()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut not_seen: BTreeSet<(String, usize)> = BTreeSet::new();
    for (dn, d) in &fleet {
        not_seen.extend(d.acked().into_iter().map(|i| (dn.clone(), i)));
    }
    assert_eq!(not_seen.len(), DEVICES * POSTS);

    // Every acknowledged post is in the consumer group's queue (duplicates allowed).
    let rabbit = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = rabbit.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            format!("{prefix}.default.full").as_str().into(),
            "full".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !not_seen.is_empty() {
        let d = match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(Ok(d))) => d,
            _ => panic!(
                "{} acknowledged posts never arrived, e.g. {:?}",
                not_seen.len(),
                not_seen.iter().take(5).collect::<Vec<_>>()
            ),
        };
        d.ack(BasicAckOptions::default()).await.unwrap();
        if header(&d, "topic").ends_with("/thing/event/property/post") {
            let body: Value = serde_json::from_slice(&d.data).unwrap();
            let seq = body["requestId"]
                .as_str()
                .unwrap()
                .parse::<usize>()
                .unwrap();
            not_seen.remove(&(header(&d, "deviceName"), seq));
        }
    }
    drop(fleet);

    let _ = ch
        .queue_delete(
            format!("{prefix}.default.full").as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await;
    let _ = ch
        .exchange_delete(
            format!("{prefix}.default").into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
}

/// A full outbox (here RabbitMQ is a closed port, so nothing ever drains it) refuses a QoS 1
/// post — no PUBACK, the connection closed — and drops a QoS 0 post (answered 429, not success)
/// or a status message, each counted, the connection of a QoS 0 poster staying open. Needs no
/// RabbitMQ.
#[tokio::test]
async fn a_full_outbox_refuses_qos1_posts_and_drops_what_nobody_was_promised() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("amqp://guest:guest@{}/%2f", closed.local_addr().unwrap());
    drop(closed);
    let app = spawn_app_with(move |s| {
        s.amqp.url = Some(fleetgate::config::Secret::new(url));
        s.amqp.outbox_max_bytes = 64 * 1024;
        s.amqp.outbox_full_wait_ms = 100;
    })
    .await;
    let pk = app.create_product("full outbox").await;
    let secret_a = app.create_device(&pk, "qos1").await;
    let secret_b = app.create_device(&pk, "qos0").await;
    let body = |i: usize| {
        format!(
            r#"{{"id":"{i}","params":{{"Seq":{i},"Pad":"{}"}},"method":"thing.event.property.post"}}"#,
            "x".repeat(400)
        )
    };
    let dropped = r#"fleetgate_forwarder_dropped_total{reason="outbox_full"}"#;
    let wait_for = |sample: &'static str, value: f64| {
        let app = &app;
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            while app.metric(sample).await != value {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{sample} never reached {value}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // One QoS 1 post at a time: each is acknowledged once stored, until one finds the outbox
    // full: that one gets no PUBACK, the gateway closes the connection instead.
    let mut a = connect(app.mqtt_addr(), &credentials(&pk, "qos1", &secret_a)).await;
    let topic = format!("/sys/{pk}/qos1/thing/event/property/post");
    let mut acked = 0;
    'posting: for i in 0..200 {
        a.client
            .publish(topic.as_str(), QoS::AtLeastOnce, false, body(i))
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(WAIT, a.incoming.recv()).await {
                Ok(Some(Packet::PubAck(_))) => {
                    acked += 1;
                    continue 'posting;
                }
                Ok(Some(_)) => {}
                Ok(None) => break 'posting,
                Err(_) => panic!("post {i}: neither a PUBACK nor a closed connection"),
            }
        }
    }
    assert!((10..200).contains(&acked), "{acked} posts acknowledged");
    assert_eq!(app.metric("fleetgate_forwarder_refused_total").await, 1.0);
    assert_eq!(
        app.metric("fleetgate_mqtt_publishes_withheld_total").await,
        1.0
    );

    // A QoS 0 post is dropped and counted, and answered 429 instead of success; the connection
    // stays.
    let mut b = connect(app.mqtt_addr(), &credentials(&pk, "qos0", &secret_b)).await;
    let reply_topic = format!("/sys/{pk}/qos0/thing/event/property/post_reply");
    b.client
        .subscribe(reply_topic.as_str(), QoS::AtMostOnce)
        .await
        .unwrap();
    b.wait_packet("SUBACK", |p| matches!(p, Packet::SubAck(_)))
        .await;
    // Every message so far is either stored or dropped (the status messages are small and may
    // still fit): the online status of `qos1`, its acknowledged posts, its offline status and
    // the online status of `qos0`.
    let settled = (acked + 3) as f64;
    let deadline = tokio::time::Instant::now() + WAIT;
    let (stored, dropped_before) = loop {
        let stored = app.metric("fleetgate_forwarder_enqueued_total").await;
        let dropped = app.metric(dropped).await;
        if stored + dropped == settled {
            break (stored, dropped);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{stored} + {dropped} != {settled}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    b.client
        .publish(
            format!("/sys/{pk}/qos0/thing/event/property/post"),
            QoS::AtMostOnce,
            false,
            body(7),
        )
        .await
        .unwrap();
    let reply = b.next_publish().await;
    assert_eq!(reply.topic, reply_topic);
    let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(
        (reply["code"].as_i64(), reply["id"].as_str()),
        (Some(429), Some("7")),
        "{reply}"
    );
    wait_for(dropped, dropped_before + 1.0).await;
    assert_eq!(
        app.metric("fleetgate_forwarder_enqueued_total").await,
        stored
    );
    b.client
        .subscribe(reply_topic.as_str(), QoS::AtMostOnce)
        .await
        .unwrap();
    b.wait_packet("SUBACK", |p| matches!(p, Packet::SubAck(_)))
        .await;
    assert_eq!(app.metric("fleetgate_forwarder_refused_total").await, 1.0);
    assert_eq!(
        app.metric("fleetgate_mqtt_publishes_withheld_total").await,
        1.0
    );
}
