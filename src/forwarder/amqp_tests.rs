//! Tests against a real RabbitMQ at `FLEETGATE_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`). When it is unreachable a test fails with a message
//! saying how to start it ([`rabbit`]).
//!
//! Every test uses its own exchange prefix (`fgtest-{random}`), so names never collide, and
//! deletes its exchanges and queues at the end. Broker outages are simulated with an in-test
//! TCP proxy ([`Proxy`]) between the forwarder and RabbitMQ.

pub(crate) use super::testing::{eventually, rabbit, Fixture};
use super::testing::{Proxy, PATIENCE};
use super::*;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Connection;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroU32;
use std::time::Instant;
use tokio::sync::mpsc;

/// A consumer on `queue` (direct to RabbitMQ) that acks and forwards every delivery as
/// `(consumer tag, delivery)`.
pub(crate) async fn consume(
    conn: &Connection,
    queue: &str,
    tag: &str,
    tx: mpsc::UnboundedSender<(String, Delivery)>,
) {
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(50, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let tag = tag.to_owned();
    tokio::spawn(async move {
        let _keep_channel = ch;
        while let Some(Ok(d)) = consumer.next().await {
            let _ = d.ack(BasicAckOptions::default()).await;
            if tx.send((tag.clone(), d)).is_err() {
                break;
            }
        }
    });
}

/// Receives until `n` distinct message ids arrived; returns every delivery (duplicates too).
pub(crate) async fn collect(
    rx: &mut mpsc::UnboundedReceiver<(String, Delivery)>,
    n: usize,
) -> Vec<(String, Delivery)> {
    let mut all = Vec::new();
    let mut ids = HashSet::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while ids.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((tag, d))) => {
                ids.insert(message_id(&d));
                all.push((tag, d));
            }
            _ => panic!("only {} of {n} distinct messages arrived", ids.len()),
        }
    }
    all
}

pub(crate) fn message_id(d: &Delivery) -> String {
    d.properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default()
}

fn header(d: &Delivery, key: &str) -> Option<AMQPValue> {
    d.properties.headers().as_ref()?.inner().get(key).cloned()
}

fn header_str(d: &Delivery, key: &str) -> String {
    match header(d, key) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        Some(AMQPValue::ShortString(s)) => s.to_string(),
        other => panic!("header {key}: {other:?}"),
    }
}

fn body(d: &Delivery) -> Value {
    serde_json::from_slice(&d.data).unwrap()
}

/// `(device, requestId)` of a property-post delivery.
fn key(d: &Delivery) -> (String, u64) {
    let b = body(d);
    (
        b["deviceName"].as_str().unwrap().to_owned(),
        b["requestId"].as_str().unwrap().parse().unwrap(),
    )
}

/// Each device's requestIds, in the order of first arrival, must be increasing.
fn assert_in_order_per_device(deliveries: &[(String, Delivery)]) {
    let mut seen = HashSet::new();
    let mut last: HashMap<String, u64> = HashMap::new();
    for (_, d) in deliveries {
        if !seen.insert(message_id(d)) {
            continue; // a redelivered duplicate
        }
        let (dn, i) = key(d);
        if let Some(prev) = last.insert(dn.clone(), i) {
            assert!(i > prev, "device {dn}: {i} arrived after {prev}");
        }
    }
}

async fn group(fwd: &Forwarder, iid: &str, gid: &str) {
    group_with_ttl(fwd, iid, gid, None).await;
}

async fn group_with_ttl(fwd: &Forwarder, iid: &str, gid: &str, message_ttl_secs: Option<u32>) {
    fwd.create_group(
        iid,
        NewConsumerGroup {
            group_id: Some(gid.into()),
            name: gid.into(),
            message_ttl_secs,
        },
    )
    .await
    .unwrap();
}

/// Re-declares `queue` with no arguments on a throwaway channel: `Ok` when it has none (or
/// does not exist), a 406 error when it was declared with some (e.g. a message TTL).
async fn redeclare_without_arguments(conn: &Connection, queue: &str) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .map(|_| ());
    if ch.status().connected() {
        let _ = ch.close(200, "done".into()).await;
    }
    r
}

#[tokio::test]
async fn two_groups_each_receive_every_message_with_vendor_headers() {
    let rabbit = rabbit("two_groups_each_receive_every_message_with_vendor_headers").await;
    let fx = Fixture::new(rabbit, 3).await;
    let fwd = fx.open(&fx.rabbit.url.clone());
    eventually("connected", || fwd.status() == AmqpStatus::Connected).await;
    group(&fwd, &fx.iid, "g1").await;
    group(&fwd, &fx.iid, "g2").await;
    let (tx1, mut rx1) = mpsc::unbounded_channel();
    let (tx2, mut rx2) = mpsc::unbounded_channel();
    consume(&fx.rabbit.conn, &fx.queue("g1"), "c1", tx1).await;
    consume(&fx.rabbit.conn, &fx.queue("g2"), "c2", tx2).await;

    const N: usize = 300;
    for i in 0..N {
        fwd.enqueue(fx.post(i % 3, i), OnFull::Refuse)
            .await
            .unwrap();
    }
    let got1 = collect(&mut rx1, N).await;
    let got2 = collect(&mut rx2, N).await;
    let ids =
        |v: &[(String, Delivery)]| v.iter().map(|(_, d)| message_id(d)).collect::<HashSet<_>>();
    assert_eq!(ids(&got1), ids(&got2), "both groups got the same messages");
    assert_in_order_per_device(&got1);
    assert_in_order_per_device(&got2);

    // Envelope and body of one message.
    let d = &got1[0].1;
    let (dn, i) = key(d);
    assert_eq!(
        header_str(d, "topic"),
        format!("/{}/{dn}/thing/event/property/post", fx.pk)
    );
    assert_eq!(header_str(d, "messageId"), message_id(d));
    assert_eq!(header_str(d, "productKey"), fx.pk);
    assert_eq!(header_str(d, "deviceName"), dn);
    assert_eq!(header_str(d, "instanceId"), fx.iid);
    assert_eq!(
        header(d, "generateTime"),
        Some(AMQPValue::LongLongInt(1_700_000_000_000 + i as i64))
    );
    assert_eq!(*d.properties.delivery_mode(), Some(2));
    assert_eq!(
        d.properties
            .content_type()
            .as_ref()
            .map(|s| s.to_string())
            .as_deref(),
        Some("application/json")
    );
    assert!(
        message_id(d).parse::<u64>().is_ok(),
        "numeric like the vendor's: {}",
        message_id(d)
    );
    let b = body(d);
    assert_eq!(b["productKey"], fx.pk.as_str());
    assert_eq!(b["iotId"], iot_id(&fx.pk, &dn));
    assert_eq!(b["items"]["Seq"]["value"], i);
    assert_eq!(b["items"]["Seq"]["time"], 1_700_000_000_000u64 + i);

    eventually("outbox drained", || fwd.outbox().unwrap().is_empty()).await;
    assert!(fx.metrics.forwarder_published.get() >= N as u64);
    assert_eq!(fx.metrics.forwarder_returns.get(), 0);
    fwd.shutdown().await;
    fx.cleanup(&["g1", "g2"]).await;
}

#[tokio::test]
async fn two_consumers_in_one_group_share_the_stream() {
    let rabbit = rabbit("two_consumers_in_one_group_share_the_stream").await;
    let fx = Fixture::new(rabbit, 2).await;
    let fwd = fx.open(&fx.rabbit.url.clone());
    eventually("connected", || fwd.status() == AmqpStatus::Connected).await;
    group(&fwd, &fx.iid, "shared").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    consume(&fx.rabbit.conn, &fx.queue("shared"), "a", tx.clone()).await;
    consume(&fx.rabbit.conn, &fx.queue("shared"), "b", tx).await;
    const N: usize = 400;
    for i in 0..N {
        fwd.enqueue(fx.post(i % 2, i), OnFull::Refuse)
            .await
            .unwrap();
    }
    let got = collect(&mut rx, N).await;
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for (tag, _) in &got {
        *per.entry(tag.clone()).or_default() += 1;
    }
    assert_eq!(got.len(), N, "no duplicates without failures");
    assert!(
        per.get("a").copied().unwrap_or(0) > 0 && per.get("b").copied().unwrap_or(0) > 0,
        "{per:?}"
    );
    let details = fwd.group_details(&fx.iid, "shared").await.unwrap();
    assert_eq!(details.consumers, Some(2));
    fwd.shutdown().await;
    fx.cleanup(&["shared"]).await;
}

#[tokio::test]
async fn broker_outage_loses_nothing_and_keeps_device_order() {
    let rabbit = rabbit("broker_outage_loses_nothing_and_keeps_device_order").await;
    let fx = Fixture::new(rabbit, 5).await;
    let proxy = Proxy::start(fx.rabbit.addr).await;
    let fwd = fx.open(&fx.rabbit.url_via(proxy.addr));
    eventually("connected", || fwd.status() == AmqpStatus::Connected).await;
    group(&fwd, &fx.iid, "g").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    consume(&fx.rabbit.conn, &fx.queue("g"), "c", tx).await;

    const N: usize = 1500;
    for i in 0..N {
        if i == 400 {
            proxy.cut();
        }
        if i == 1000 {
            // Messages enqueued while the broker is away accumulate durably.
            eventually("disconnect noticed", || {
                fwd.status() != AmqpStatus::Connected
            })
            .await;
            assert!(!fwd.outbox().unwrap().is_empty());
            proxy.restore();
        }
        fwd.enqueue(fx.post(i % 5, i), OnFull::Refuse)
            .await
            .unwrap();
    }
    let got = collect(&mut rx, N).await;
    let want: HashSet<(String, u64)> = (0..N)
        .map(|i| (fx.devices[i % 5].clone(), i as u64))
        .collect();
    let have: HashSet<(String, u64)> = got.iter().map(|(_, d)| key(d)).collect();
    assert_eq!(have, want, "every message arrived");
    assert_in_order_per_device(&got);
    assert!(fx.metrics.forwarder_reconnects.get() >= 1);
    eventually("outbox drained", || fwd.outbox().unwrap().is_empty()).await;
    fwd.shutdown().await;
    fx.cleanup(&["g"]).await;
}

#[tokio::test]
async fn restart_with_a_full_outbox_delivers_the_rest() {
    let rabbit = rabbit("restart_with_a_full_outbox_delivers_the_rest").await;
    let fx = Fixture::new(rabbit, 4).await;
    let proxy = Proxy::start(fx.rabbit.addr).await;
    proxy.cut();
    const N: usize = 800;
    {
        // First life: the broker is unreachable, the group is created meanwhile (persisted,
        // not declared) and everything piles up in the outbox.
        let fwd = fx.open(&fx.rabbit.url_via(proxy.addr));
        group(&fwd, &fx.iid, "g").await;
        for i in 0..N {
            fwd.enqueue(fx.post(i % 4, i), OnFull::Refuse)
                .await
                .unwrap();
        }
        assert_eq!(fwd.outbox().unwrap().len(), N as u64);
        assert_ne!(fwd.status(), AmqpStatus::Connected);
        fwd.shutdown().await;
    }
    // Second life, with the broker back: the group is declared, then the outbox drained.
    let fwd = fx.open(&fx.rabbit.url.clone());
    assert_eq!(fwd.outbox().unwrap().len(), N as u64);
    eventually("connected", || fwd.status() == AmqpStatus::Connected).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    consume(&fx.rabbit.conn, &fx.queue("g"), "c", tx).await;
    let got = collect(&mut rx, N).await;
    let have: HashSet<u64> = got.iter().map(|(_, d)| key(d).1).collect();
    assert_eq!(have, (0..N as u64).collect::<HashSet<_>>());
    assert_in_order_per_device(&got);
    eventually("outbox drained", || fwd.outbox().unwrap().is_empty()).await;
    fwd.shutdown().await;
    fx.cleanup(&["g"]).await;
}

#[tokio::test]
async fn group_less_instance_drops_returned_messages_and_groups_show_backlog() {
    let rabbit =
        rabbit("group_less_instance_drops_returned_messages_and_groups_show_backlog").await;
    let fx = Fixture::new(rabbit, 1).await;
    let fwd = fx.open(&fx.rabbit.url.clone());
    eventually("connected", || fwd.status() == AmqpStatus::Connected).await;
    // No group: mandatory publishes come back unroutable, are counted and leave the outbox.
    for i in 0..10 {
        fwd.enqueue(fx.post(0, i), OnFull::Refuse).await.unwrap();
    }
    eventually("returned messages dropped", || {
        fwd.outbox().unwrap().is_empty()
    })
    .await;
    assert_eq!(fx.metrics.forwarder_returns.get(), 10);
    assert_eq!(
        fx.metrics
            .forwarder_dropped
            .get_or_create(&[("reason", "no_route")])
            .get(),
        10
    );

    // With a group and no consumer the messages wait in its queue: backlog.
    group(&fwd, &fx.iid, "idle").await;
    for i in 10..30 {
        fwd.enqueue(fx.post(0, i), OnFull::Refuse).await.unwrap();
    }
    eventually("confirmed", || fwd.outbox().unwrap().is_empty()).await;
    let d = fwd.group_details(&fx.iid, "idle").await.unwrap();
    assert_eq!(
        (d.backlog, d.consumers, d.amqp.as_str()),
        (Some(20), Some(0), "connected")
    );
    let gauge = || {
        fx.metrics
            .forwarder_group_backlog
            .get_or_create(&[("group", format!("{}/idle", fx.iid))])
            .get()
    };
    eventually("sampled backlog gauge", || gauge() == 20).await;

    // A consumer takes them: the sampler sees a positive consume rate.
    let (tx, mut rx) = mpsc::unbounded_channel();
    consume(&fx.rabbit.conn, &fx.queue("idle"), "c", tx).await;
    collect(&mut rx, 20).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let d = fwd.group_details(&fx.iid, "idle").await.unwrap();
        if d.consume_rate_per_minute.is_some_and(|r| r > 0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "no consume rate: {d:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Deleting the group deletes its queue.
    fwd.delete_group(&fx.iid, "idle").await.unwrap();
    let ch = fx.rabbit.conn.create_channel().await.unwrap();
    let gone = groups::inspect_queue(&ch, &fx.queue("idle")).await;
    assert!(gone.is_err(), "queue still exists: {gone:?}");
    fwd.shutdown().await;
    fx.cleanup(&["idle"]).await;
}

#[tokio::test]
async fn rate_limit_throttles_the_publisher_not_the_enqueue() {
    let rabbit = rabbit("rate_limit_throttles_the_publisher_not_the_enqueue").await;
    let fx = Fixture::new(rabbit, 1).await;
    let fwd = fx.open(&fx.rabbit.url.clone());
    eventually("connected", || fwd.status() == AmqpStatus::Connected).await;
    group(&fwd, &fx.iid, "g").await;
    fwd.set_rate_limit(
        &fx.iid,
        Some(RateLimit {
            msgs_per_sec: NonZeroU32::new(20),
            bytes_per_sec: None,
        }),
    )
    .await
    .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    consume(&fx.rabbit.conn, &fx.queue("g"), "c", tx).await;
    const N: usize = 60;
    for i in 0..N {
        fwd.enqueue(fx.post(0, i), OnFull::Refuse).await.unwrap();
    }
    // Every enqueue resolved although the limit lets only ~20 a second through.
    assert!(fx.metrics.forwarder_published.get() < N as u64);
    let got = collect(&mut rx, N).await;
    assert_in_order_per_device(&got);
    assert!(fx.metrics.forwarder_rate_limited.get() > 0);
    fwd.shutdown().await;
    fx.cleanup(&["g"]).await;
}

/// A limit set at runtime (as `PUT …/forwarding/rate-limit` does) throttles the running
/// publisher, and removing it lets the rest flow at once. GCRA with a one-second burst: at 50
/// msgs/s the 100th confirm cannot come before ~1 s (50 at once, then 50 a second), whatever
/// the machine's speed — a slow machine only makes it later.
#[tokio::test]
async fn a_rate_limit_set_at_runtime_throttles_until_removed() {
    let rabbit = rabbit("a_rate_limit_set_at_runtime_throttles_until_removed").await;
    let fx = Fixture::new(rabbit, 1).await;
    let fwd = fx.open(&fx.rabbit.url.clone());
    eventually("connected", || fwd.status() == AmqpStatus::Connected).await;
    group(&fwd, &fx.iid, "g").await;
    // Unlimited traffic first, so the publisher already holds (no) limiter for the target.
    for i in 0..10 {
        fwd.enqueue(fx.post(0, i), OnFull::Refuse).await.unwrap();
    }
    eventually("warm-up confirmed", || {
        fx.metrics.forwarder_published.get() == 10
    })
    .await;
    let published = || fx.metrics.forwarder_published.get() - 10;

    const RATE: u32 = 50;
    const N: usize = 200;
    let limit = RateLimit {
        msgs_per_sec: NonZeroU32::new(RATE),
        bytes_per_sec: None,
    };
    let view = fwd.set_rate_limit(&fx.iid, Some(limit)).await.unwrap();
    assert_eq!(view.source, RateLimitSource::Instance);
    let t0 = Instant::now();
    for i in 10..10 + N {
        fwd.enqueue(fx.post(0, i), OnFull::Refuse).await.unwrap();
    }
    eventually("100 confirmed", || published() >= 100).await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "100 messages confirmed {took:?} after a {RATE}/s limit was set"
    );
    let at_removal = published();
    assert!(
        at_removal < N as u64,
        "all {N} confirmed after {took:?}: not throttled"
    );
    assert!(fx.metrics.forwarder_rate_limited.get() > 0);

    // Removed (no configured default): the rest go at once; under the limit they would need
    // (N - at_removal) / RATE seconds.
    let left = N as u64 - at_removal;
    let t1 = Instant::now();
    let view = fwd.set_rate_limit(&fx.iid, None).await.unwrap();
    assert_eq!(view.source, RateLimitSource::None);
    eventually("all confirmed", || published() >= N as u64).await;
    let rest = t1.elapsed();
    let throttled = Duration::from_secs_f64(left as f64 / f64::from(RATE));
    assert!(
        rest < throttled.mul_f64(0.75),
        "{left} messages took {rest:?} after the limit was removed ({throttled:?} under it)"
    );
    eventually("outbox drained", || fwd.outbox().unwrap().is_empty()).await;
    fwd.shutdown().await;
    fx.cleanup(&["g"]).await;
}

/// A group's `message_ttl_secs` becomes the queue's `x-message-ttl`: unconsumed messages
/// expire from it, while a group without TTL (0) keeps the same messages.
#[tokio::test]
async fn a_group_message_ttl_expires_unconsumed_messages() {
    let rabbit = rabbit("a_group_message_ttl_expires_unconsumed_messages").await;
    let fx = Fixture::new(rabbit, 1).await;
    let fwd = fx.open(&fx.rabbit.url.clone());
    eventually("connected", || fwd.status() == AmqpStatus::Connected).await;
    group_with_ttl(&fwd, &fx.iid, "short", Some(1)).await;
    group_with_ttl(&fwd, &fx.iid, "keep", Some(0)).await;
    // The queues carry (or not) the argument: a re-declare without it is refused (or not).
    let refused = redeclare_without_arguments(&fx.rabbit.conn, &fx.queue("short"))
        .await
        .unwrap_err();
    assert!(groups::is_precondition_failed(&refused), "{refused}");
    redeclare_without_arguments(&fx.rabbit.conn, &fx.queue("keep"))
        .await
        .unwrap();
    assert_eq!(fx.metrics.forwarder_queues_kept.get(), 0);

    for i in 0..3 {
        fwd.enqueue(fx.post(0, i), OnFull::Refuse).await.unwrap();
    }
    eventually("confirmed", || fwd.outbox().unwrap().is_empty()).await;
    assert_eq!(
        fx.metrics.forwarder_returns.get(),
        0,
        "routed to the groups"
    );
    let deadline = Instant::now() + PATIENCE;
    loop {
        let backlog = fwd.group_details(&fx.iid, "short").await.unwrap().backlog;
        if backlog == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never expired: backlog {backlog:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let keep = fwd.group_details(&fx.iid, "keep").await.unwrap();
    assert_eq!(keep.backlog, Some(3), "no TTL: still there");
    assert_eq!(keep.group.message_ttl_secs, Some(0));
    fwd.shutdown().await;
    fx.cleanup(&["short", "keep"]).await;
}

/// A queue that already exists without arguments (created before TTLs, or by hand) makes the
/// TTL declare fail with 406; the forwarder keeps the queue as it is, still binds and feeds
/// it, and neither group creation nor the connection loop gets stuck on it.
#[tokio::test]
async fn a_queue_existing_without_ttl_is_kept_and_still_delivers() {
    let rabbit = rabbit("a_queue_existing_without_ttl_is_kept_and_still_delivers").await;
    let fx = Fixture::new(rabbit, 1).await;
    let queue = fx.queue("legacy");
    redeclare_without_arguments(&fx.rabbit.conn, &queue)
        .await
        .unwrap();
    let fwd = fx.open(&fx.rabbit.url.clone());
    eventually("connected", || fwd.status() == AmqpStatus::Connected).await;
    // The configured default (one day) asks for a TTL the queue does not have.
    group(&fwd, &fx.iid, "legacy").await;
    assert_eq!(fx.metrics.forwarder_queues_kept.get(), 1);
    let (tx, mut rx) = mpsc::unbounded_channel();
    consume(&fx.rabbit.conn, &queue, "c", tx).await;
    for i in 0..5 {
        fwd.enqueue(fx.post(0, i), OnFull::Refuse).await.unwrap();
    }
    collect(&mut rx, 5).await;
    fwd.shutdown().await;

    // A restart declares every group on connect: the 406 again, handled, and the session goes on.
    let fwd = fx.open(&fx.rabbit.url.clone());
    eventually("connected again", || fwd.status() == AmqpStatus::Connected).await;
    assert_eq!(fx.metrics.forwarder_queues_kept.get(), 2);
    for i in 5..10 {
        fwd.enqueue(fx.post(0, i), OnFull::Refuse).await.unwrap();
    }
    let got = collect(&mut rx, 5).await;
    assert!(got.iter().all(|(_, d)| key(d).1 >= 5), "the new messages");
    assert_eq!(fwd.status(), AmqpStatus::Connected);
    assert_eq!(fx.metrics.forwarder_reconnects.get(), 0);
    // Still the queue it was: no arguments.
    redeclare_without_arguments(&fx.rabbit.conn, &queue)
        .await
        .unwrap();
    fwd.shutdown().await;
    fx.cleanup(&["legacy"]).await;
}

/// Whether `queue` exists (a passive declare on a throwaway channel).
async fn queue_exists(conn: &Connection, queue: &str) -> bool {
    let ch = conn.create_channel().await.unwrap();
    let exists = groups::inspect_queue(&ch, queue).await.is_ok();
    if ch.status().connected() {
        let _ = ch.close(200, "done".into()).await;
    }
    exists
}

/// Cluster mode (`follow.rs`): a group written through another node is declared by the node
/// that drains the outbox (here a single node's own file, always drained) and gets the
/// messages; once it is deleted there, its tombstone deletes the queue and is forgotten.
#[tokio::test]
async fn a_group_written_through_another_node_is_declared_here_and_its_tombstone_deletes_it() {
    let rabbit = rabbit(
        "a_group_written_through_another_node_is_declared_here_and_its_tombstone_deletes_it",
    )
    .await;
    let fx = Fixture::new(rabbit, 1).await;
    let fwd = fx.open(&fx.rabbit.url.clone());
    eventually("connected", || fwd.status() == AmqpStatus::Connected).await;
    let follower = fwd.doc_follower();
    let queue = fx.queue("remote");
    let id = groups::doc_id(&fx.iid, "remote");
    let group = ConsumerGroup {
        instance_id: fx.iid.clone(),
        group_id: "remote".into(),
        name: "remote".into(),
        created_at_ms: 1,
        message_ttl_secs: Some(0),
    };
    assert!(!queue_exists(&fx.rabbit.conn, &queue).await);
    follower.changed(
        GROUP_DOC_KIND,
        &id,
        Some(&serde_json::to_string(&group).unwrap()),
    );
    let declared = || {
        lock(&fwd.groups)
            .groups
            .get(&(fx.iid.clone(), "remote".to_owned()))
            .is_some_and(|e| e.declared)
    };
    eventually("the followed group declared", declared).await;
    assert!(queue_exists(&fx.rabbit.conn, &queue).await);
    let (tx, mut rx) = mpsc::unbounded_channel();
    consume(&fx.rabbit.conn, &queue, "c", tx).await;
    fwd.enqueue(fx.post(0, 1), OnFull::Refuse).await.unwrap();
    collect(&mut rx, 1).await;

    // Deleted through the other node, which could not reach RabbitMQ: its tombstone is here.
    let store = fx.registry.store();
    store
        .submit(vec![
            Op::DeleteDoc {
                kind: GROUP_DOC_KIND,
                id: id.clone(),
            },
            Op::PutDoc {
                kind: TOMBSTONE_DOC_KIND,
                id: id.clone(),
                body: queue.clone(),
            },
        ])
        .await
        .unwrap();
    follower.changed(GROUP_DOC_KIND, &id, None);
    follower.changed(TOMBSTONE_DOC_KIND, &id, Some(&queue));
    assert!(fwd.list_groups(&fx.iid).unwrap().is_empty());
    eventually("the tombstone forgotten", || {
        lock(&fwd.groups).tombstones.is_empty()
    })
    .await;
    assert!(!queue_exists(&fx.rabbit.conn, &queue).await);
    assert!(store.load_documents(TOMBSTONE_DOC_KIND).unwrap().is_empty());
    fwd.shutdown().await;
    fx.cleanup(&["remote"]).await;
}
