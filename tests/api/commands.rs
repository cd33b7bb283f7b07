//! Cloud-to-device commands end to end: rumqttc devices receive what the operator API sends
//! and answer it (docs/COMMANDS.md).

use crate::helpers::*;
use reqwest::Method;
use rumqttc::{Packet, QoS};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Subscribes `device` to `filter` and waits for the SUBACK.
async fn subscribe(device: &mut Device, filter: &str) {
    device
        .client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .unwrap();
    device
        .wait_packet("SUBACK", |p| matches!(p, Packet::SubAck(_)))
        .await;
}

async fn put(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    app.request(Method::PUT, path, Some(body), Some(ADMIN_TOKEN))
        .await
}

/// A product with one connected device subscribed to `filters`.
async fn online_device(app: &TestApp, name: &str, filters: &[String]) -> (String, Device) {
    let pk = app.create_product(name).await;
    let secret = app.create_device(&pk, "dev-1").await;
    let mut device = connect(app.mqtt_addr(), &credentials(&pk, "dev-1", &secret)).await;
    for f in filters {
        subscribe(&mut device, &f.replace("{pk}", &pk)).await;
    }
    (pk, device)
}

/// Answers every request the device receives: service calls with `code` (and the request's
/// params echoed as `data`), RRPC requests with `pong:` + the request payload.
fn answer_everything(mut device: Device, code: i32) -> tokio::task::JoinHandle<Device> {
    tokio::spawn(async move {
        while let Some(p) = device.incoming.recv().await {
            let Packet::Publish(p) = p else { continue };
            let topic = p.topic.clone();
            let (reply_topic, body) = if topic.contains("/rrpc/request/") {
                let mut body = b"pong:".to_vec();
                body.extend_from_slice(&p.payload);
                (topic.replace("/rrpc/request/", "/rrpc/response/"), body)
            } else if topic.contains("/thing/service/") {
                let req: Value = serde_json::from_slice(&p.payload).unwrap();
                let reply = json!({"id": req["id"], "code": code, "data": req["params"], "message": "done"});
                (
                    format!("{topic}_reply"),
                    serde_json::to_vec(&reply).unwrap(),
                )
            } else {
                continue;
            };
            device
                .client
                .publish(reply_topic, QoS::AtMostOnce, false, body)
                .await
                .unwrap();
        }
        device
    })
}

#[tokio::test]
async fn publish_reaches_the_device_and_foreign_topics_are_refused() {
    let app = spawn_app().await;
    let (pk, mut device) = online_device(&app, "c2d-pub", &["/{pk}/dev-1/user/#".into()]).await;
    let path = format!("/api/v1/products/{pk}/devices/dev-1/messages");

    let (status, body) = app
        .post(
            &path,
            json!({"topic": format!("/{pk}/dev-1/user/get"), "payload": "hello"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["message_id"].as_str().is_some(), "{body}");
    let p = device.next_publish().await;
    assert_eq!(p.topic, format!("/{pk}/dev-1/user/get"));
    assert_eq!(&p.payload[..], b"hello");

    // Base64 payload, QoS 1.
    let (status, body) = app
        .post(
            &path,
            json!({"topic": format!("/{pk}/dev-1/user/bin"), "payload": "AAEC/w==", "payload_encoding": "base64", "qos": 1}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let p = device.next_publish().await;
    assert_eq!(p.topic, format!("/{pk}/dev-1/user/bin"));
    assert_eq!(&p.payload[..], &[0u8, 1, 2, 255]);

    // Another device's topic, a bare topic, a wildcard, an OTA topic: refused, nothing sent.
    for topic in [
        format!("/{pk}/dev-2/user/get"),
        "/user/get".to_owned(),
        format!("/{pk}/dev-1/user/#"),
        format!("/ota/device/upgrade/{pk}/dev-1"),
    ] {
        let (status, body) = app
            .post(&path, json!({"topic": topic, "payload": "x"}))
            .await;
        assert_eq!(status, 400, "{topic}: {body}");
        assert_eq!(body["error_code"], "FG.6003", "{body}");
        assert_eq!(body["error_ext_msg"], "topic", "{body}");
    }
    // Bad QoS and bad base64.
    let (status, body) = app
        .post(
            &path,
            json!({"topic": format!("/{pk}/dev-1/user/get"), "payload": "x", "qos": 2}),
        )
        .await;
    assert_eq!((status, body["error_ext_msg"].clone()), (400, json!("qos")));
    let (status, body) = app
        .post(
            &path,
            json!({"topic": format!("/{pk}/dev-1/user/get"), "payload": "!!", "payload_encoding": "base64"}),
        )
        .await;
    assert_eq!(
        (status, body["error_ext_msg"].clone()),
        (400, json!("payload"))
    );
    // Nothing refused reached the device (a refused publish would be there by now).
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(p) = device.incoming.try_recv() {
        assert!(
            !matches!(p, Packet::Publish(_)),
            "refused message delivered: {p:?}"
        );
    }

    // Offline device: refused at once.
    drop(device);
    app.wait_device(&pk, "dev-1", "offline", |d| d["online"] == false)
        .await;
    let (status, body) = app
        .post(
            &path,
            json!({"topic": format!("/{pk}/dev-1/user/get"), "payload": "late"}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error_code"], "FG.6001");
    // Unknown device.
    let (status, body) = app
        .post(
            &format!("/api/v1/products/{pk}/devices/nobody/messages"),
            json!({"topic": format!("/{pk}/nobody/user/get"), "payload": "x"}),
        )
        .await;
    assert_eq!(
        (status, body["error_code"].clone()),
        (404, json!("FG.2003"))
    );
    assert!(
        app.metric("fleetgate_downlinks_total{kind=\"publish\",outcome=\"delivered\"}")
            .await
            >= 2.0
    );
}

#[tokio::test]
async fn property_set_is_answered_and_recorded_async_and_sync() {
    let app = spawn_app().await;
    let (pk, device) = online_device(
        &app,
        "c2d-prop",
        &["/sys/{pk}/dev-1/thing/service/#".into()],
    )
    .await;
    let responder = answer_everything(device, 200);
    let path = format!("/api/v1/products/{pk}/devices/dev-1/properties");

    // Asynchronous: 202 at once, the answer lands in the record.
    let (status, sent) = put(&app, &path, json!({"params": {"LightSwitch": 1}})).await;
    assert_eq!(status, 202, "{sent}");
    assert_eq!(sent["status"], "sent");
    assert_eq!(sent["kind"], "property_set");
    let id = sent["id"].as_str().unwrap().to_owned();
    let record_path = format!("/api/v1/products/{pk}/devices/dev-1/commands/{id}");
    let deadline = Instant::now() + WAIT;
    let record = loop {
        let (status, record) = app.get(&record_path).await;
        assert_eq!(status, 200, "{record}");
        if record["status"] == "replied" {
            break record;
        }
        assert!(Instant::now() < deadline, "never answered: {record}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(record["reply"]["code"], 200);
    assert_eq!(record["reply"]["data"], json!({"LightSwitch": 1}));
    assert_eq!(
        record["topic"],
        format!("/sys/{pk}/dev-1/thing/service/property/set")
    );

    // Synchronous: the answer is in the response.
    let (status, record) = put(
        &app,
        &path,
        json!({"params": {"Brightness": 70}, "timeout_ms": 5000}),
    )
    .await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["status"], "replied");
    assert_eq!(record["reply"]["data"], json!({"Brightness": 70}));

    // Unknown record, bad params, bad timeout.
    let (status, body) = app
        .get(&format!("/api/v1/products/{pk}/devices/dev-1/commands/123"))
        .await;
    assert_eq!(
        (status, body["error_code"].clone()),
        (404, json!("FG.6004"))
    );
    let (status, body) = put(&app, &path, json!({"params": [1]})).await;
    assert_eq!(
        (status, body["error_ext_msg"].clone()),
        (400, json!("params"))
    );
    let (status, body) = put(&app, &path, json!({"params": {}, "timeout_ms": 9000})).await;
    assert_eq!(
        (status, body["error_ext_msg"].clone()),
        (400, json!("timeout_ms"))
    );
    responder.abort();
}

#[tokio::test]
async fn service_calls_async_sync_and_timeouts() {
    let app = spawn_app().await;
    let (pk, device) =
        online_device(&app, "c2d-svc", &["/sys/{pk}/dev-1/thing/service/#".into()]).await;
    let path = |s: &str| format!("/api/v1/products/{pk}/devices/dev-1/services/{s}");

    // Nobody answers yet: a synchronous call times out (after about its timeout).
    let started = Instant::now();
    let (status, body) = app
        .post(&path("reboot"), json!({"params": {}, "timeout_ms": 1000}))
        .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error_code"], "FG.6002");
    assert!(started.elapsed() >= Duration::from_millis(1000));

    let responder = answer_everything(device, 9201);
    let (status, record) = app
        .post(
            &path("reboot"),
            json!({"params": {"delay": 3}, "timeout_ms": 5000}),
        )
        .await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["kind"], "service");
    assert_eq!(record["identifier"], "reboot");
    // The device's own error code is the call's result, not an HTTP error.
    assert_eq!(record["reply"]["code"], 9201);
    assert_eq!(record["reply"]["message"], "done");

    let (status, sent) = app.post(&path("reboot"), json!({"params": {}})).await;
    assert_eq!(status, 202, "{sent}");
    let id = sent["id"].as_str().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, record) = app
            .get(&format!(
                "/api/v1/products/{pk}/devices/dev-1/commands/{id}"
            ))
            .await;
        if record["status"] == "replied" {
            break;
        }
        assert!(Instant::now() < deadline, "never answered: {record}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = app.post(&path("a.b"), json!({"params": {}})).await;
    assert_eq!(
        (status, body["error_ext_msg"].clone()),
        (400, json!("identifier"))
    );
    responder.abort();
    assert!(
        app.metric("fleetgate_downlinks_total{kind=\"service\",outcome=\"timed_out\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn rrpc_success_timeout_and_offline() {
    let app = spawn_app().await;
    let (pk, device) =
        online_device(&app, "c2d-rrpc", &["/sys/{pk}/dev-1/rrpc/request/+".into()]).await;
    let path = format!("/api/v1/products/{pk}/devices/dev-1/rrpc");

    // Subscribed but silent: timeout.
    let started = Instant::now();
    let (status, body) = app
        .post(&path, json!({"payload": "ping", "timeout_ms": 1000}))
        .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error_code"], "FG.6002");
    assert!(started.elapsed() >= Duration::from_millis(1000));

    let responder = answer_everything(device, 200);
    let (status, body) = app
        .post(&path, json!({"payload": "ping", "timeout_ms": 5000}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["payload_text"], "pong:ping");
    assert!(body["message_id"].as_str().is_some());
    let (status, body) = app
        .post(
            &path,
            json!({"payload": "AP8=", "payload_encoding": "base64"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["payload_base64"], "cG9uZzoA/w==");

    // Offline: refused at once, without waiting for the timeout.
    responder.abort();
    let _ = responder.await;
    app.wait_device(&pk, "dev-1", "offline", |d| d["online"] == false)
        .await;
    let started = Instant::now();
    let (status, body) = app
        .post(&path, json!({"payload": "ping", "timeout_ms": 8000}))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error_code"], "FG.6001");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_device_cannot_answer_for_another() {
    let app = spawn_app().await;
    let pk = app.create_product("c2d-spoof").await;
    let secret_a = app.create_device(&pk, "dev-a").await;
    let secret_b = app.create_device(&pk, "dev-b").await;
    let mut a = connect(app.mqtt_addr(), &credentials(&pk, "dev-a", &secret_a)).await;
    subscribe(&mut a, &format!("/sys/{pk}/dev-a/rrpc/request/+")).await;
    let b = connect(app.mqtt_addr(), &credentials(&pk, "dev-b", &secret_b)).await;

    let call = {
        let http = app.http.clone();
        let url = app.url(&format!("/api/v1/products/{pk}/devices/dev-a/rrpc"));
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({"payload": "x", "timeout_ms": 1500}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let request = a.next_publish().await;
    // B answers on A's response topic: the ACL drops it, the call times out.
    let response_topic = request.topic.replace("/rrpc/request/", "/rrpc/response/");
    b.client
        .publish(response_topic, QoS::AtLeastOnce, false, "spoofed")
        .await
        .unwrap();
    assert_eq!(call.await.unwrap(), 504);
}

#[tokio::test]
async fn broadcast_by_tag_gives_per_device_results() {
    let app = spawn_app().await;
    let pk = app.create_product("c2d-bcast").await;
    let mut online = Vec::new();
    for dn in ["lamp-1", "lamp-2", "lamp-3", "fan-1"] {
        let secret = app.create_device(&pk, dn).await;
        let tag = if dn.starts_with("lamp") {
            "lamp"
        } else {
            "fan"
        };
        let (status, body) = app
            .request(
                Method::PATCH,
                &format!("/api/v1/products/{pk}/devices/{dn}"),
                Some(json!({"tags": {"kind": tag}})),
                Some(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        if dn != "lamp-3" {
            let mut d = connect(app.mqtt_addr(), &credentials(&pk, dn, &secret)).await;
            subscribe(&mut d, &format!("/{pk}/{dn}/user/#")).await;
            online.push((dn, d));
        }
    }
    let (status, body) = app
        .post(
            &format!("/api/v1/products/{pk}/messages"),
            json!({"topic": "/{pk}/{dn}/user/cmd", "payload": "on", "tag_key": "kind", "tag_value": "lamp"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["total"], 3, "{body}");
    assert_eq!(body["sent"], 2, "{body}");
    let results: Vec<(String, String)> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["device_name"].as_str().unwrap().to_owned(),
                r["result"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        results,
        vec![
            ("lamp-1".into(), "sent".into()),
            ("lamp-2".into(), "sent".into()),
            ("lamp-3".into(), "offline".into()),
        ]
    );
    for (dn, d) in &mut online {
        if dn.starts_with("lamp") {
            let p = d.next_publish().await;
            assert_eq!(p.topic, format!("/{pk}/{dn}/user/cmd"));
            assert_eq!(&p.payload[..], b"on");
        }
    }
    // By list, with an unknown name.
    let (status, body) = app
        .post(
            &format!("/api/v1/products/{pk}/messages"),
            json!({"topic": "/{pk}/{dn}/user/cmd", "payload": "off", "device_names": ["fan-1", "ghost"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["result"], "sent");
    assert_eq!(body["results"][1]["result"], "not_found");
    // Too many, or a topic without {dn}.
    let names: Vec<String> = (0..1001).map(|i| format!("d{i}")).collect();
    let (status, body) = app
        .post(
            &format!("/api/v1/products/{pk}/messages"),
            json!({"topic": "/{pk}/{dn}/user/cmd", "payload": "x", "device_names": names}),
        )
        .await;
    assert_eq!(
        (status, body["error_code"].clone()),
        (413, json!("FG.1003"))
    );
    let (status, body) = app
        .post(
            &format!("/api/v1/products/{pk}/messages"),
            json!({"topic": format!("/{pk}/lamp-1/user/cmd"), "payload": "x"}),
        )
        .await;
    assert_eq!(
        (status, body["error_ext_msg"].clone()),
        (400, json!("topic"))
    );
}

#[tokio::test]
async fn latest_properties_survive_a_restart() {
    let mut app = spawn_app().await;
    let pk = app.create_product("c2d-props").await;
    let secret = app.create_device(&pk, "dev-1").await;
    let device = connect(app.mqtt_addr(), &credentials(&pk, "dev-1", &secret)).await;
    let post = |params: Value| {
        serde_json::to_vec(&json!({"id": "1", "version": "1.0", "params": params})).unwrap()
    };
    let topic = format!("/sys/{pk}/dev-1/thing/event/property/post");
    device
        .client
        .publish(
            &topic,
            QoS::AtLeastOnce,
            false,
            post(json!({"Temp": {"value": 21.5, "time": 1_700_000_000_000u64}, "Hum": 40})),
        )
        .await
        .unwrap();
    // An older reading of Temp does not roll the snapshot back; a newer Hum replaces it.
    device
        .client
        .publish(
            &topic,
            QoS::AtLeastOnce,
            false,
            post(json!({"Temp": {"value": 5, "time": 1_600_000_000_000u64}, "Hum": 41})),
        )
        .await
        .unwrap();
    let path = format!("/api/v1/products/{pk}/devices/dev-1/properties");
    let deadline = Instant::now() + WAIT;
    let snapshot = loop {
        let (status, body) = app.get(&path).await;
        assert_eq!(status, 200, "{body}");
        if body["properties"]["Hum"]["value"] == 41 {
            break body;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(snapshot["properties"]["Temp"]["value"], 21.5);
    assert_eq!(snapshot["properties"]["Temp"]["time"], 1_700_000_000_000u64);
    assert!(
        snapshot["properties"]["Hum"]["received_at_ms"]
            .as_i64()
            .unwrap()
            > 1_700_000_000_000
    );
    drop(device);

    app.restart().await;
    let (status, after) = app.get(&path).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["properties"], snapshot["properties"]);

    // A deleted device's snapshot goes with it.
    let (status, _) = app
        .request(
            Method::DELETE,
            &format!("/api/v1/products/{pk}/devices/dev-1"),
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 204);
    app.create_device(&pk, "dev-1").await;
    let (_, fresh) = app.get(&path).await;
    assert_eq!(fresh["properties"], json!({}), "{fresh}");
}

/// A device's answer to a property set reaches a consumer group as the vendor's
/// `thing/downlink/reply/message`. Needs RabbitMQ (`FLEETGATE_AMQP_URL`, else the default
/// local broker); fails without one.
#[tokio::test]
async fn answers_reach_the_consumer_group() {
    use fleetgate::forwarder::testing::test_amqp_url;
    use futures_util::StreamExt;
    use lapin::options::{BasicAckOptions, BasicConsumeOptions};
    use lapin::types::{AMQPValue, FieldTable};
    use rand::Rng;

    let url = test_amqp_url("answers_reach_the_consumer_group").await;
    let prefix = format!("fgtest-{:08x}", rand::thread_rng().gen::<u32>());
    let app = spawn_app_with_amqp(&url, &prefix).await;
    let (status, group) = app
        .post(
            "/api/v1/instances/default/consumer-groups",
            json!({"group_id": "apps", "name": "apps"}),
        )
        .await;
    assert_eq!(status, 201, "{group}");
    let rabbit = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = rabbit.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            format!("{prefix}.default.apps").as_str().into(),
            "apps".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let (pk, device) = online_device(
        &app,
        "c2d-amqp",
        &["/sys/{pk}/dev-1/thing/service/#".into()],
    )
    .await;
    let responder = answer_everything(device, 200);
    let (status, record) = put(
        &app,
        &format!("/api/v1/products/{pk}/devices/dev-1/properties"),
        json!({"params": {"LightSwitch": 1}, "timeout_ms": 5000}),
    )
    .await;
    assert_eq!(status, 200, "{record}");
    let id = record["id"].as_str().unwrap().to_owned();

    // The online status message comes first; wait for the reply.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (topic, body) = loop {
        let d = tokio::time::timeout_at(deadline.into(), consumer.next())
            .await
            .expect("a downlink_reply within 30 s")
            .expect("consumer open")
            .expect("delivery");
        d.ack(BasicAckOptions::default()).await.unwrap();
        let headers = d.properties.headers().clone().unwrap_or_default();
        let text = |k: &str| match headers.inner().get(k) {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("header {k}: {other:?}"),
        };
        if text("kind") == "downlink_reply" {
            break (
                text("topic"),
                serde_json::from_slice::<Value>(&d.data).unwrap(),
            );
        }
    };
    assert_eq!(topic, format!("/{pk}/dev-1/thing/downlink/reply/message"));
    assert_eq!(body["requestId"], id);
    assert_eq!(body["code"], 200);
    assert_eq!(body["productKey"], pk);
    assert_eq!(body["deviceName"], "dev-1");
    assert_eq!(
        body["topic"],
        format!("/sys/{pk}/dev-1/thing/service/property/set")
    );
    assert_eq!(body["data"], json!({"LightSwitch": 1}));
    responder.abort();
}

/// Connects `dn` with a persistent session (clean_session = 0), or a clean one.
async fn connect_session(
    app: &TestApp,
    pk: &str,
    dn: &str,
    secret: &str,
    persistent: bool,
) -> Device {
    let mut opts = options(app.mqtt_addr(), &credentials(pk, dn, secret));
    opts.set_clean_session(!persistent);
    match try_connect_with(opts).await {
        Ok(device) => device,
        Err(code) => panic!("device refused: {code:?}"),
    }
}

/// No PUBLISH reaches `device` within `d`.
async fn assert_no_publish(device: &mut Device, d: Duration) {
    let deadline = tokio::time::Instant::now() + d;
    while let Ok(Some(p)) = tokio::time::timeout_at(deadline, device.incoming.recv()).await {
        assert!(!matches!(p, Packet::Publish(_)), "unexpected {p:?}");
    }
}

#[tokio::test]
async fn one_way_messages_wait_for_a_persistent_session_up_to_the_count() {
    let app = spawn_app_with(|s| s.commands.offline_queue_max = 2).await;
    let pk = app.create_product("c2d-offline").await;
    let secret = app.create_device(&pk, "dev-1").await;
    let path = format!("/api/v1/products/{pk}/devices/dev-1/messages");
    let topic = format!("/{pk}/dev-1/user/get");
    let mut device = connect_session(&app, &pk, "dev-1", &secret, true).await;
    subscribe(&mut device, &format!("/{pk}/dev-1/user/#")).await;
    drop(device);
    app.wait_device(&pk, "dev-1", "offline", |d| d["online"] == false)
        .await;

    // Kept: 202 queued, up to the count; beyond it "device offline".
    for (payload, qos) in [("m1", 0), ("m2", 1)] {
        let (status, body) = app
            .post(
                &path,
                json!({"topic": topic, "payload": payload, "qos": qos}),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["status"], "queued", "{body}");
        assert!(body["message_id"].as_str().is_some(), "{body}");
    }
    let (status, body) = app
        .post(&path, json!({"topic": topic, "payload": "m3"}))
        .await;
    assert_eq!(
        (status, body["error_code"].clone()),
        (409, json!("FG.6001")),
        "{body}"
    );
    assert_eq!(
        app.metric("fleetgate_offline_messages_dropped_total{reason=\"full\"}")
            .await,
        1.0
    );
    // A broadcast reports the device as full (offline) too.
    let (status, body) = app
        .post(
            &format!("/api/v1/products/{pk}/messages"),
            json!({"topic": "/{pk}/{dn}/user/get", "payload": "b", "device_names": ["dev-1"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["result"], "offline", "{body}");

    // Back with its persistent session: the kept messages arrive, in order.
    let mut device = connect_session(&app, &pk, "dev-1", &secret, true).await;
    for expected in ["m1", "m2"] {
        let p = device.next_publish().await;
        assert_eq!(
            (p.topic.as_str(), &p.payload[..]),
            (topic.as_str(), expected.as_bytes())
        );
    }
    // Online: delivered at once, 200.
    let (status, body) = app
        .post(&path, json!({"topic": topic, "payload": "now"}))
        .await;
    assert_eq!(
        (status, body["status"].clone()),
        (200, json!("delivered")),
        "{body}"
    );
    assert_eq!(&device.next_publish().await.payload[..], b"now");

    // Offline again: a broadcast keeps it too; a clean reconnect discards it.
    drop(device);
    app.wait_device(&pk, "dev-1", "offline", |d| d["online"] == false)
        .await;
    let (status, body) = app
        .post(
            &format!("/api/v1/products/{pk}/messages"),
            json!({"topic": "/{pk}/{dn}/user/get", "payload": "b", "device_names": ["dev-1"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["result"], "queued", "{body}");
    assert_eq!(
        (body["sent"].clone(), body["queued"].clone()),
        (json!(0), json!(1))
    );
    let mut device = connect_session(&app, &pk, "dev-1", &secret, false).await;
    subscribe(&mut device, &format!("/{pk}/dev-1/user/#")).await;
    assert_no_publish(&mut device, Duration::from_millis(500)).await;
    assert_eq!(
        app.metric("fleetgate_offline_messages_dropped_total{reason=\"clean_session\"}")
            .await,
        1.0
    );
    // Its latest session was clean: nothing is kept for it any more.
    drop(device);
    app.wait_device(&pk, "dev-1", "offline", |d| d["online"] == false)
        .await;
    let (status, body) = app
        .post(&path, json!({"topic": topic, "payload": "lost"}))
        .await;
    assert_eq!(
        (status, body["error_code"].clone()),
        (409, json!("FG.6001")),
        "{body}"
    );
}

#[tokio::test]
async fn a_kept_message_past_its_age_is_dropped() {
    let app = spawn_app_with(|s| s.commands.offline_queue_ttl_secs = 1).await;
    let pk = app.create_product("c2d-offline-age").await;
    let secret = app.create_device(&pk, "dev-1").await;
    let path = format!("/api/v1/products/{pk}/devices/dev-1/messages");
    let topic = format!("/{pk}/dev-1/user/get");
    let mut device = connect_session(&app, &pk, "dev-1", &secret, true).await;
    subscribe(&mut device, &format!("/{pk}/dev-1/user/#")).await;
    drop(device);
    app.wait_device(&pk, "dev-1", "offline", |d| d["online"] == false)
        .await;
    let (status, body) = app
        .post(&path, json!({"topic": topic, "payload": "stale", "qos": 1}))
        .await;
    assert_eq!(status, 202, "{body}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = app
        .post(&path, json!({"topic": topic, "payload": "fresh", "qos": 1}))
        .await;
    assert_eq!(status, 202, "{body}");

    let mut device = connect_session(&app, &pk, "dev-1", &secret, true).await;
    assert_eq!(&device.next_publish().await.payload[..], b"fresh");
    assert_no_publish(&mut device, Duration::from_millis(300)).await;
    assert_eq!(
        app.metric("fleetgate_offline_messages_dropped_total{reason=\"expired\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_disabled_device_is_refused_and_its_kept_messages_dropped() {
    let app = spawn_app().await;
    let pk = app.create_product("c2d-disabled").await;
    let secret = app.create_device(&pk, "dev-1").await;
    let path = format!("/api/v1/products/{pk}/devices/dev-1/messages");
    let topic = format!("/{pk}/dev-1/user/get");
    let mut device = connect_session(&app, &pk, "dev-1", &secret, true).await;
    subscribe(&mut device, &format!("/{pk}/dev-1/user/#")).await;
    drop(device);
    app.wait_device(&pk, "dev-1", "offline", |d| d["online"] == false)
        .await;
    let (status, body) = app
        .post(&path, json!({"topic": topic, "payload": "kept", "qos": 1}))
        .await;
    assert_eq!(
        (status, body["status"].clone()),
        (202, json!("queued")),
        "{body}"
    );

    // Disabling drops what was kept; nothing more is kept, sent or called.
    let disable = format!("/api/v1/products/{pk}/devices/dev-1/disable");
    let (status, body) = app
        .request(Method::POST, &disable, None, Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        app.metric("fleetgate_offline_messages_dropped_total{reason=\"disabled\"}")
            .await,
        1.0
    );
    let (status, body) = app
        .post(
            &path,
            json!({"topic": topic, "payload": "refused", "qos": 1}),
        )
        .await;
    assert_eq!(
        (status, body["error_code"].clone()),
        (409, json!("FG.6005")),
        "{body}"
    );
    let (status, body) = app
        .post(
            &format!("/api/v1/products/{pk}/messages"),
            json!({"topic": "/{pk}/{dn}/user/get", "payload": "b", "device_names": ["dev-1"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["result"], "refused", "{body}");
    let (status, body) = app
        .post(
            &format!("/api/v1/products/{pk}/devices/dev-1/rrpc"),
            json!({"payload": "ping"}),
        )
        .await;
    assert_eq!(
        (status, body["error_code"].clone()),
        (409, json!("FG.6005")),
        "{body}"
    );

    // Enabled again and back with a persistent session: nothing was kept for it.
    let enable = format!("/api/v1/products/{pk}/devices/dev-1/enable");
    let (status, body) = app
        .request(Method::POST, &enable, None, Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 200, "{body}");
    let mut device = connect_session(&app, &pk, "dev-1", &secret, true).await;
    subscribe(&mut device, &format!("/{pk}/dev-1/user/#")).await;
    assert_no_publish(&mut device, Duration::from_millis(500)).await;
}
