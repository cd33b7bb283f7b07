//! Tests that need no broker: message formats, the outbox (durability, bound, back-pressure,
//! drop), routing, rate-limit and consume-rate arithmetic. RabbitMQ tests are in `amqp_tests`.

use super::groups::RateSampler;
use super::outbox::{seq_runs, Fresh, NewRow, FRESH_MAX_ROWS};
use super::*;
use crate::config::Secret;
use crate::registry::{NewDevice, NewInstance, NewProduct};
use crate::store::Store;
use fleetgate_topics::{EventPostRequest, PropertyPostRequest};
use futures_util::FutureExt;
use serde_json::{json, Value};
use std::num::NonZeroU32;
use std::time::Instant;

fn body(m: &ForwardMessage) -> Value {
    serde_json::from_slice(&m.body).unwrap()
}

#[test]
fn times_render_like_the_vendor() {
    assert_eq!(format_time(0, false), "1970-01-01 00:00:00.000");
    assert_eq!(
        format_time(1_700_000_000_123, true),
        "2023-11-14T22:13:20.123Z"
    );
    assert_eq!(
        format_time(951_782_400_000, false),
        "2000-02-29 00:00:00.000"
    );
    assert_eq!(format_time(-1, true), "1969-12-31T23:59:59.999Z");
}

#[test]
fn property_post_body_uses_timed_items() {
    let req = PropertyPostRequest::parse(
        br#"{"id":"42","params":{"Temp":21.5,"Hum":{"value":40,"time":1700000000000}},"method":"thing.event.property.post"}"#,
    )
    .unwrap();
    let m = ForwardMessage::property_post("pk1", "dev1", &req, 1_700_000_000_500);
    assert_eq!(m.kind, MessageKind::PropertyPost);
    assert_eq!(m.topic, "/pk1/dev1/thing/event/property/post");
    assert_eq!(m.generate_time_ms, 1_700_000_000_500);
    let b = body(&m);
    assert_eq!(b["iotId"], iot_id("pk1", "dev1"));
    assert_eq!(b["iotId"].as_str().unwrap().len(), 20);
    assert_eq!(b["requestId"], "42");
    assert_eq!(b["productKey"], "pk1");
    assert_eq!(b["deviceName"], "dev1");
    assert_eq!(b["gmtCreate"], 1_700_000_000_500i64);
    assert_eq!(
        b["items"]["Temp"],
        json!({"value": 21.5, "time": 1_700_000_000_500u64})
    );
    assert_eq!(
        b["items"]["Hum"],
        json!({"value": 40, "time": 1_700_000_000_000u64})
    );
    assert_ne!(iot_id("pk1", "dev1"), iot_id("pk1", "dev2"));
}

#[test]
fn event_status_and_ota_bodies() {
    let req = EventPostRequest::parse(
        br#"{"id":"7","params":{"value":{"code":3},"time":1700000000001},"method":"thing.event.alarm.post"}"#,
    )
    .unwrap();
    let e = ForwardMessage::event_post("pk", "dn", "alarm", &req, 1_700_000_000_900);
    assert_eq!(e.topic, "/pk/dn/thing/event/alarm/post");
    let b = body(&e);
    assert_eq!(b["identifier"], "alarm");
    assert_eq!(b["value"], json!({"code": 3}));
    assert_eq!(b["time"], 1_700_000_000_001u64);
    assert_eq!(b["requestId"], "7");
    assert_eq!(b["type"], "info");

    let s = ForwardMessage::status(
        "pk",
        "dn",
        false,
        Some("10.0.0.9"),
        1_700_000_000_000,
        Some(1_699_999_999_000),
    );
    assert_eq!(s.topic, "/as/mqtt/status/pk/dn");
    let b = body(&s);
    assert_eq!(b["status"], "offline");
    assert_eq!(b["clientIp"], "10.0.0.9");
    assert_eq!(b["utcTime"], "2023-11-14T22:13:20.000Z");
    assert_eq!(b["time"], "2023-11-14 22:13:20.000");
    assert_eq!(b["utcLastTime"], "2023-11-14T22:13:19.000Z");

    let o = ForwardMessage::ota_task_state(
        "pk",
        "dn",
        &OtaTaskStateChange {
            job_id: "j1".into(),
            firmware_id: "f1".into(),
            module: "MCU".into(),
            dest_version: "2.0".into(),
            from_status: "NOTIFIED".into(),
            status: "IN_PROGRESS".into(),
            event: "progress".into(),
            reason: None,
            progress: Some(42),
            attempt: 1,
        },
        5,
    );
    assert_eq!(o.topic, "/pk/dn/ota/task/state");
    let b = body(&o);
    assert_eq!(
        (
            b["jobId"].as_str(),
            b["status"].as_str(),
            b["step"].as_i64()
        ),
        (Some("j1"), Some("IN_PROGRESS"), Some(42))
    );
}

#[test]
fn ota_engine_events_become_task_state_messages() {
    use crate::ota::{FailureReason, TaskEvent, TaskStatus};
    let e = TaskEvent {
        job_id: "job1".into(),
        firmware_id: "fw1".into(),
        product_key: "pk".into(),
        device_name: "dn".into(),
        instance_id: Some("iot-a".into()),
        module: "MCU".into(),
        dest_version: "2.0".into(),
        from_state: TaskStatus::InProgress,
        to_state: TaskStatus::Failed,
        event: "failed".into(),
        reason: Some("device said -1".into()),
        queue_reason: None,
        failure: Some(FailureReason::UpdateFailed),
        progress: Some(40),
        attempt: 2,
        retries_used: 1,
        at_ms: 1_700_000_000_000,
    };
    let m = ForwardMessage::ota_task_event(&e);
    assert_eq!(m.kind, MessageKind::OtaTaskState);
    assert_eq!(m.topic, "/pk/dn/ota/task/state");
    assert_eq!(m.generate_time_ms, 1_700_000_000_000);
    let b = body(&m);
    assert_eq!(b["jobId"], "job1");
    assert_eq!(b["fromStatus"], "IN_PROGRESS");
    assert_eq!(b["status"], "FAILED");
    assert_eq!(b["desc"], "UPDATE_FAILED");
    assert_eq!(b["step"], 40);
    assert_eq!(b["destVersion"], "2.0");
}

fn msg(dn: &str, i: usize, body_len: usize) -> ForwardMessage {
    ForwardMessage {
        kind: MessageKind::PropertyPost,
        product_key: "pk".into(),
        device_name: dn.into(),
        topic: format!("/pk/{dn}/thing/event/property/post"),
        generate_time_ms: i as i64,
        body: vec![b'x'; body_len],
    }
}

fn row(dn: &str, i: usize, body_len: usize) -> NewRow {
    NewRow {
        target: "inst".into(),
        enqueued_at_ms: 1_700_000_000_000,
        msg: Arc::new(msg(dn, i, body_len)),
    }
}

#[tokio::test]
async fn outbox_rows_survive_reopen_in_order_with_stable_ids() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(OUTBOX_FILE_NAME);
    let metrics = Arc::new(Metrics::new());
    let outbox = Outbox::open(&path, 1 << 20, metrics.clone()).unwrap();
    for i in 0..10 {
        let r = row("d", i, 10);
        outbox.admit(r.size(), Duration::ZERO).await.unwrap();
        outbox.insert(vec![r]).await.unwrap();
    }
    assert_eq!(outbox.len(), 10);
    let rows = outbox.reader().unwrap().read_after(0, 100).await.unwrap();
    let ids: Vec<String> = rows.iter().map(OutboxRow::message_id).collect();
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), 10);
    // Deliver (delete) the first three, then "restart".
    let bytes: u64 = rows[..3].iter().map(OutboxRow::size).sum();
    outbox.delete(seqs[..3].to_vec(), bytes);
    outbox.flush().await;
    assert_eq!(outbox.len(), 7);
    let used = outbox.bytes();
    drop(outbox);

    let outbox = Outbox::open(&path, 1 << 20, metrics).unwrap();
    assert_eq!(outbox.len(), 7);
    assert_eq!(
        outbox.bytes(),
        used,
        "byte accounting is rebuilt from the file"
    );
    let again = outbox.reader().unwrap().read_after(0, 100).await.unwrap();
    assert_eq!(again, rows[3..].to_vec());
    assert_eq!(
        again.iter().map(OutboxRow::message_id).collect::<Vec<_>>(),
        ids[3..].to_vec(),
        "message ids are stable across restarts"
    );
    // New rows never reuse a delivered seq.
    let r = row("d", 99, 10);
    outbox.admit(r.size(), Duration::ZERO).await.unwrap();
    outbox.insert(vec![r]).await.unwrap();
    let last = outbox
        .reader()
        .unwrap()
        .read_after(seqs[9], 10)
        .await
        .unwrap();
    assert_eq!(last.len(), 1);
    assert!(last[0].seq > seqs[9]);
}

#[tokio::test]
async fn full_outbox_applies_back_pressure_then_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(
        &dir.path().join(OUTBOX_FILE_NAME),
        1000,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let first = row("d", 0, 600);
    let size = first.size();
    outbox.admit(size, Duration::ZERO).await.unwrap();
    outbox.insert(vec![first]).await.unwrap();

    // Full: a second admit waits…
    let waiting = outbox.admit(size, Duration::from_secs(60));
    tokio::pin!(waiting);
    assert!(
        waiting.as_mut().now_or_never().is_none(),
        "the second message must wait for space"
    );
    // …until the first is delivered and deleted.
    let rows = outbox.reader().unwrap().read_after(0, 10).await.unwrap();
    outbox.delete(vec![rows[0].seq], rows[0].size());
    waiting.await.unwrap();
    assert_eq!(outbox.bytes(), size);

    // Still full and nothing gets delivered: refused after the (short) wait.
    let err = outbox
        .admit(size, Duration::from_millis(10))
        .await
        .unwrap_err();
    assert!(matches!(err, OutboxError::Full { max: 1000, .. }), "{err}");

    // A message larger than the whole bound still fits into an empty outbox.
    let dir2 = tempfile::tempdir().unwrap();
    let empty = Outbox::open(
        &dir2.path().join(OUTBOX_FILE_NAME),
        100,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    empty.admit(5000, Duration::ZERO).await.unwrap();
}

async fn registry_with_device() -> (Arc<Registry>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let store = Store::open_in_memory(metrics.clone()).unwrap();
    let registry = Registry::open(store, metrics.clone()).unwrap();
    registry
        .create_instance(NewInstance {
            instance_id: Some("iot-a".into()),
            name: "A".into(),
        })
        .await
        .unwrap();
    registry
        .create_product(NewProduct {
            name: "P".into(),
            product_key: Some("pk".into()),
            instance_id: Some("iot-a".into()),
            description: None,
        })
        .await
        .unwrap();
    registry
        .create_device(
            "pk",
            NewDevice {
                device_name: "dev1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    (registry, metrics)
}

#[tokio::test]
async fn disabled_forwarder_stores_nothing() {
    let (registry, metrics) = registry_with_device().await;
    let fwd = Forwarder::disabled(registry.store().clone(), registry, metrics.clone()).unwrap();
    assert!(!fwd.enabled());
    assert_eq!(fwd.status(), AmqpStatus::Disabled);
    assert_eq!(fwd.health()["amqp"], "disabled");
    fwd.enqueue(msg("dev1", 0, 10), OnFull::Refuse)
        .await
        .unwrap();
    assert!(fwd.outbox().is_none());
    assert_eq!(metrics.forwarder_enqueued.get(), 0);
}

#[tokio::test]
async fn routing_follows_the_owner_and_the_hook_and_refuses_or_drops_when_full() {
    let (registry, metrics) = registry_with_device().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ForwarderConfig::for_tests(AmqpSettings {
        // Nothing listens on port 1: the publisher keeps retrying and the outbox fills.
        url: Some(Secret::new("amqp://guest:guest@127.0.0.1:1/%2f")),
        outbox_max_bytes: 64 * 1024,
        outbox_full_wait_ms: 20,
        ..Default::default()
    });
    let fwd = Forwarder::open(
        config,
        dir.path(),
        registry.store().clone(),
        registry,
        metrics.clone(),
    )
    .unwrap();
    assert_eq!(fwd.targets("pk", "dev1"), vec!["iot-a".to_string()]);
    assert!(fwd.targets("pk", "ghost").is_empty());
    fwd.set_route_hook(Some(Arc::new(|_pk: &str, _dn: &str, owner: &str| {
        vec![owner.to_string(), "iot-b".to_string()]
    })));
    assert_eq!(
        fwd.targets("pk", "dev1"),
        vec!["iot-a".to_string(), "iot-b".to_string()]
    );

    fwd.enqueue(msg("dev1", 0, 100), OnFull::Refuse)
        .await
        .unwrap();
    let outbox = fwd.outbox().unwrap();
    assert_eq!(outbox.len(), 2, "one row per target");
    fwd.set_route_hook(None);
    fwd.enqueue(msg("ghost", 0, 100), OnFull::Refuse)
        .await
        .unwrap();
    assert_eq!(
        metrics
            .forwarder_dropped
            .get_or_create(&[("reason", "unknown_device")])
            .get(),
        1
    );

    // Fill the outbox: enqueues succeed until the bound, then one waits 20 ms and is refused:
    // not stored, counted as refused, never as dropped (its sender still holds it).
    let mut stored = 0;
    let err = loop {
        match fwd
            .enqueue(msg("dev1", stored, 8 * 1024), OnFull::Refuse)
            .await
        {
            Ok(()) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 100, "the bound was never reached");
    };
    assert!(matches!(err, ForwarderError::OutboxFull), "{err}");
    let dropped_full = || {
        metrics
            .forwarder_dropped
            .get_or_create(&[("reason", "outbox_full")])
            .get()
    };
    assert_eq!(metrics.forwarder_refused.get(), 1);
    assert_eq!(dropped_full(), 0);
    // A message nobody was promised (QoS 0 post, status, OTA event) is dropped and counted.
    let err = fwd
        .enqueue(msg("dev1", stored, 8 * 1024), OnFull::Drop)
        .await
        .unwrap_err();
    assert!(matches!(err, ForwarderError::OutboxFull), "{err}");
    assert_eq!(dropped_full(), 1);
    assert_eq!(metrics.forwarder_refused.get(), 1);
    // So is one enqueued from a connection callback, in the background.
    fwd.enqueue_detached(msg("dev1", stored, 8 * 1024));
    let deadline = Instant::now() + Duration::from_secs(10);
    while dropped_full() < 2 {
        assert!(
            Instant::now() < deadline,
            "the detached message was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(metrics.forwarder_backpressure_waits.get() >= 1);
    assert!(outbox.bytes() <= 64 * 1024);
    assert_eq!(outbox.len(), 2 + stored as u64);
    assert_ne!(fwd.status(), AmqpStatus::Connected);
    fwd.shutdown().await;
}

#[test]
fn config_is_validated_with_named_fields() {
    assert!(AmqpSettings::default().validate().is_ok());
    assert!(ForwarderConfig::default().validate().is_ok());
    let bad = |c: AmqpSettings| match c.validate() {
        Err(ForwarderError::Invalid { field, .. }) => field,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        bad(AmqpSettings {
            url: Some(Secret::new("http://x")),
            ..Default::default()
        }),
        "amqp.url"
    );
    assert_eq!(
        bad(AmqpSettings {
            inflight_window: 0,
            ..Default::default()
        }),
        "amqp.inflight_window"
    );
    assert_eq!(
        bad(AmqpSettings {
            exchange_prefix: "a b".into(),
            ..Default::default()
        }),
        "amqp.exchange_prefix"
    );
    assert_eq!(
        bad(AmqpSettings {
            rate_limit_msgs_per_sec: Some(0),
            ..Default::default()
        }),
        "amqp.rate_limit"
    );
    // The forwarder runs with a resolved prefix only.
    assert!(matches!(
        ForwarderConfig::new(AmqpSettings::default()),
        Err(ForwarderError::Invalid {
            field: "amqp.exchange_prefix",
            ..
        })
    ));
    assert_eq!(
        ForwarderConfig::new(AmqpSettings {
            exchange_prefix: "mine".into(),
            ..Default::default()
        })
        .unwrap()
        .exchange_prefix,
        "mine"
    );
}

#[test]
fn limiter_bounds_messages_and_bytes() {
    let l = Limiter::new(RateLimit {
        msgs_per_sec: NonZeroU32::new(5),
        bytes_per_sec: None,
    });
    let passed = (0..20).filter(|_| l.check(10).is_ok()).count();
    assert!((5..=6).contains(&passed), "burst of one second: {passed}");
    let wait = l.check(10).unwrap_err();
    assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));

    let b = Limiter::new(RateLimit {
        msgs_per_sec: None,
        bytes_per_sec: NonZeroU32::new(1000),
    });
    assert!(b.check(600).is_ok());
    assert!(b.check(600).is_err());
    // Larger than a whole second's budget: let through rather than blocked forever.
    assert!(b.check(5000).is_ok());
}

#[test]
fn consume_rate_counts_what_left_the_queue() {
    let mut r = RateSampler::default();
    let t0 = Instant::now();
    r.record(t0, 0, 100, 1000);
    assert_eq!(r.rate_per_minute, None);
    // 10 s later: 50 more published, backlog 100 → 30: 120 consumed in 10 s = 720/min.
    r.record(t0 + Duration::from_secs(10), 10_000, 30, 1050);
    assert_eq!(r.rate_per_minute, Some(720.0));
    assert_eq!(r.sampled_at_ms, Some(10_000));
    // Backlog grew more than was published (e.g. another publisher): never negative.
    r.record(t0 + Duration::from_secs(20), 20_000, 500, 1050);
    assert_eq!(r.rate_per_minute, Some(0.0));
}

/// The migration's `bandwidth_limit_mb` limits only the mirrored copies of data sync: rows for
/// devices the target instance does not own. Its own devices' rows pass a blocked mirror lane.
#[tokio::test]
async fn a_mirror_limit_holds_back_only_mirrored_rows() {
    let (registry, metrics) = registry_with_device().await;
    // dev1 is owned by iot-a: its rows to iot-b are mirrored copies, its rows to iot-a are not.
    let fwd = Forwarder::disabled(registry.store().clone(), registry, metrics).unwrap();
    let one_per_sec = || RateLimit {
        msgs_per_sec: NonZeroU32::new(1),
        bytes_per_sec: None,
    };
    fwd.set_mirror_rate_limit("iot-a", Some(one_per_sec()));
    fwd.set_mirror_rate_limit("iot-b", Some(one_per_sec()));
    let out_row = |seq: i64, target: &str| super::outbox::OutboxRow {
        seq,
        enqueued_at_ms: 1_700_000_000_000,
        target: target.into(),
        msg: Arc::new(msg("dev1", seq as usize, 10)),
    };
    let mut pending: std::collections::VecDeque<_> = [
        out_row(1, "iot-b"),
        out_row(2, "iot-b"),
        out_row(3, "iot-a"),
        out_row(4, "iot-a"),
        out_row(5, "iot-a"),
    ]
    .into_iter()
    .collect();
    let mut picked = Vec::new();
    let mut wake = None;
    while let Some(i) = super::publisher::pick(&fwd, &pending, &mut wake) {
        picked.push(pending.remove(i).unwrap().seq);
    }
    // The first mirrored row uses the one-second burst; the second waits. The owner's rows
    // are never mirror-limited, although iot-a has a mirror limit too.
    assert_eq!(picked, [1, 3, 4, 5]);
    assert_eq!(pending.iter().map(|r| r.seq).collect::<Vec<_>>(), [2]);
    assert!(wake.is_some(), "the blocked lane sets a wake-up");

    // Removing the limit lets the held row go.
    fwd.set_mirror_rate_limit("iot-b", None);
    assert_eq!(super::publisher::pick(&fwd, &pending, &mut wake), Some(0));
}

/// A limit set at runtime replaces the limiter the publisher consults for that target (and
/// only that one), is persisted, and removing it brings the configured default back.
#[tokio::test]
async fn a_runtime_rate_limit_replaces_the_default_and_survives_a_rebuild() {
    let (registry, metrics) = registry_with_device().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ForwarderConfig::for_tests(AmqpSettings {
        rate_limit_msgs_per_sec: Some(1000),
        ..Default::default()
    });
    let open = || {
        Forwarder::open(
            config.clone(),
            dir.path(),
            registry.store().clone(),
            registry.clone(),
            metrics.clone(),
        )
        .unwrap()
    };
    // How many messages a fresh limiter lets through at once (its one-second burst).
    let burst = |l: Option<Arc<Limiter>>| {
        let l = l.expect("a limiter");
        (0..5000).filter(|_| l.check(1).is_ok()).count()
    };
    let is_default = |n: usize| (1000..1100).contains(&n);
    let fwd = open();
    assert!(is_default(burst(fwd.limiter("iot-a"))));

    let two = RateLimit {
        msgs_per_sec: NonZeroU32::new(2),
        bytes_per_sec: None,
    };
    let v = fwd.set_rate_limit("iot-a", Some(two)).await.unwrap();
    assert_eq!(
        (v.msgs_per_sec, v.bytes_per_sec, v.source),
        (Some(2), None, RateLimitSource::Instance)
    );
    assert!((2..=3).contains(&burst(fwd.limiter("iot-a"))));
    assert!(
        is_default(burst(fwd.limiter("iot-b"))),
        "other targets keep the default"
    );
    // A restart loads the override.
    let again = open();
    assert!((2..=3).contains(&burst(again.limiter("iot-a"))));
    again.shutdown().await;

    // Explicitly unlimited: no limiter at all, although a default exists.
    fwd.set_rate_limit("iot-a", Some(RateLimit::UNLIMITED))
        .await
        .unwrap();
    assert!(fwd.limiter("iot-a").is_none());
    // Removed: the default again, now and after a restart.
    let v = fwd.set_rate_limit("iot-a", None).await.unwrap();
    assert_eq!(
        (v.msgs_per_sec, v.source),
        (Some(1000), RateLimitSource::Default)
    );
    assert!(is_default(burst(fwd.limiter("iot-a"))));
    assert_eq!(
        open().rate_limit("iot-a").unwrap().source,
        RateLimitSource::Default
    );

    // An unknown instance is refused and nothing is stored.
    let err = fwd.set_rate_limit("nope", Some(two)).await.unwrap_err();
    assert!(matches!(err, ForwarderError::InstanceNotFound(_)), "{err}");
    assert!(registry
        .store()
        .load_documents(limits::RATE_LIMIT_DOC_KIND)
        .unwrap()
        .is_empty());
}

/// The OTA engine cancels a deleted device's tasks after the registry forgot the device; the
/// events carry the instance that owned it, and the forwarder routes them there instead of
/// dropping them as "unknown device".
#[tokio::test]
async fn ota_events_of_a_deleted_device_go_to_the_instance_that_owned_it() {
    use crate::ota::{TaskEvent, TaskStatus};
    let (registry, metrics) = registry_with_device().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ForwarderConfig::for_tests(AmqpSettings {
        // Nothing listens on port 1: rows stay in the outbox for the test to read.
        url: Some(Secret::new("amqp://guest:guest@127.0.0.1:1/%2f")),
        ..Default::default()
    });
    let fwd = Forwarder::open(
        config,
        dir.path(),
        registry.store().clone(),
        registry.clone(),
        metrics.clone(),
    )
    .unwrap();
    registry.delete_device("pk", "dev1").await.unwrap();
    assert!(fwd.targets("pk", "dev1").is_empty());

    let canceled = |instance_id: Option<&str>| TaskEvent {
        job_id: "job1".into(),
        firmware_id: "fw1".into(),
        product_key: "pk".into(),
        device_name: "dev1".into(),
        instance_id: instance_id.map(str::to_owned),
        module: "default".into(),
        dest_version: "2.0".into(),
        from_state: TaskStatus::Queued,
        to_state: TaskStatus::Canceled,
        event: "canceled".into(),
        reason: Some("DEVICE_DELETED: the device was deleted".into()),
        queue_reason: None,
        failure: None,
        progress: None,
        attempt: 0,
        retries_used: 0,
        at_ms: 1_700_000_000_000,
    };
    let sink = fwd.ota_event_sink();
    sink(&canceled(Some("iot-a")));
    // Without the former owner there is nowhere to send it: dropped and counted as before.
    sink(&canceled(None));
    let outbox = fwd.outbox().unwrap();
    outbox.flush().await;
    let rows = outbox.reader().unwrap().read_after(0, 10).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].target, "iot-a");
    assert_eq!(rows[0].msg.topic, "/pk/dev1/ota/task/state");
    let b = body(&rows[0].msg);
    assert_eq!(
        (b["status"].as_str(), b["desc"].as_str()),
        (
            Some("CANCELED"),
            Some("DEVICE_DELETED: the device was deleted")
        )
    );
    assert_eq!(
        metrics
            .forwarder_dropped
            .get_or_create(&[("reason", "unknown_device")])
            .get(),
        1
    );
    fwd.shutdown().await;
}

#[tokio::test]
async fn the_fresh_tail_hands_over_committed_rows_as_the_file_has_them() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(
        &dir.path().join(OUTBOX_FILE_NAME),
        1 << 30,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let insert = |n: usize, from: usize| {
        let outbox = outbox.clone();
        async move {
            let rows: Vec<NewRow> = (from..from + n).map(|i| row("d", i, 10)).collect();
            let size = rows.iter().map(NewRow::size).sum();
            outbox.admit(size, Duration::ZERO).await.unwrap();
            outbox.insert(rows).await.unwrap();
        }
    };
    insert(5, 0).await;
    let from_file = outbox.reader().unwrap().read_after(0, 100).await.unwrap();
    assert_eq!(
        outbox.take_fresh(0, 100),
        Fresh::Rows(from_file.clone(), false),
        "same seqs, targets and messages as the file"
    );
    assert_eq!(
        outbox.take_fresh(0, 100),
        Fresh::Gap,
        "a reader starting over finds the rows it took in the file"
    );
    assert_eq!(
        outbox.take_fresh(from_file[4].seq, 100),
        Fresh::Rows(Vec::new(), false)
    );

    // Rows at or below the cursor are skipped; `limit` leaves the rest for later.
    insert(4, 5).await;
    let all = outbox.reader().unwrap().read_after(0, 100).await.unwrap();
    let cursor = all[5].seq;
    assert_eq!(
        outbox.take_fresh(cursor, 2),
        Fresh::Rows(all[6..8].to_vec(), true)
    );
    assert_eq!(
        outbox.take_fresh(all[7].seq, 100),
        Fresh::Rows(all[8..].to_vec(), false)
    );

    // More rows than the tail holds: the oldest fall out, and a reader below them is told to
    // read the file; one past them gets the rest.
    let last = all.last().unwrap().seq;
    insert(FRESH_MAX_ROWS + 3, 100).await;
    assert_eq!(outbox.take_fresh(last, 100), Fresh::Gap);
    let file = outbox.reader().unwrap().read_after(last, 5).await.unwrap();
    match outbox.take_fresh(file[2].seq, 100) {
        Fresh::Rows(rows, true) => assert_eq!(rows[0].seq, file[3].seq),
        other => panic!("expected rows after the dropped ones, got {other:?}"),
    }

    // After a restart the rows already in the file are never in the tail.
    drop(outbox);
    let outbox = Outbox::open(
        &dir.path().join(OUTBOX_FILE_NAME),
        1 << 30,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    assert_eq!(outbox.take_fresh(0, 100), Fresh::Gap);
}

#[test]
fn deletes_collapse_into_runs_of_consecutive_seqs() {
    assert_eq!(seq_runs(&[]), vec![]);
    assert_eq!(seq_runs(&[7]), vec![(7, 7)]);
    assert_eq!(
        seq_runs(&[5, 3, 4, 9, 10, 12, 4]),
        vec![(3, 5), (9, 10), (12, 12)]
    );
}

// ----- the shared outbox of cluster mode (PostgreSQL) -----

/// A fresh, migrated cluster database and a lease connection to it.
async fn shared_db() -> (
    crate::store::test_db::PgDatabase,
    crate::store::PostgresReader,
) {
    let pg = crate::store::test_db::PgDatabase::create();
    let url = pg.url().clone();
    crate::store::test_db::off_runtime(move || {
        crate::store::PostgresBackend::connect(&url).map(drop)
    })
    .expect("migrate the test database");
    let leases = crate::store::PostgresReader::connect(pg.url())
        .await
        .expect("lease connection");
    (pg, leases)
}

fn shared_outbox(pg: &crate::store::test_db::PgDatabase, node: u16, max_bytes: u64) -> Outbox {
    // The publisher is not running here: the drain terms do not matter to what is tested.
    let (_, term) = watch::channel(None);
    super::pg_outbox::open(
        SharedOutboxSettings {
            url: pg.url().clone(),
            node,
            term,
        },
        max_bytes,
        Arc::new(Metrics::new()),
    )
    .expect("open the shared outbox")
}

async fn put(outbox: &Outbox, r: NewRow) {
    outbox.admit(r.size(), Duration::ZERO).await.unwrap();
    outbox.insert(vec![r]).await.unwrap();
}

/// Polls `what` until it equals `want` (the writer re-reads the backlog every 200 ms).
async fn wait_eq(what: &str, want: u64, f: impl Fn() -> u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while f() != want {
        assert!(
            Instant::now() < deadline,
            "{what}: {} instead of {want}",
            f()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

use crate::cluster::SharedStore as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_outbox_keeps_every_nodes_order_and_fences_a_past_drain_holder() {
    let (pg, leases) = shared_db().await;
    let a = shared_outbox(&pg, 1, 1 << 20);
    let b = shared_outbox(&pg, 2, 1 << 20);
    put(&a, row("d1", 0, 10)).await;
    put(&a, row("d1", 1, 10)).await;
    put(&b, row("d2", 2, 10)).await;
    put(&a, row("d1", 3, 10)).await;
    put(&b, row("d2", 4, 10)).await;
    // Concurrent enqueues of one node share transactions (group commit) and all commit.
    let burst: Vec<_> = (5..55)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move { put(&a, row("d3", i, 10)).await })
        })
        .collect();
    for t in burst {
        t.await.unwrap();
    }
    assert_eq!((a.len(), b.len()), (53, 2), "each node counts its own rows");

    let rows = a.reader().unwrap().read_after(0, 100).await.unwrap();
    assert_eq!(rows.len(), 55);
    let times: Vec<i64> = rows[..5].iter().map(|r| r.msg.generate_time_ms).collect();
    assert_eq!(
        times,
        vec![0, 1, 2, 3, 4],
        "seq order is enqueue order across nodes"
    );
    assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
    let ids: std::collections::HashSet<String> = rows.iter().map(OutboxRow::message_id).collect();
    assert_eq!(ids.len(), 55, "message ids are unique");
    // Another node reads the same rows with the same ids (what a new drain holder sends).
    let from_b = b.reader().unwrap().read_after(0, 100).await.unwrap();
    assert_eq!(from_b, rows);

    // Node 1 drains: its deletes in its term commit.
    let ttl = Duration::from_millis(600);
    let t1 = leases
        .lease_acquire("outbox", 1, ttl)
        .await
        .unwrap()
        .unwrap();
    let first: Vec<i64> = rows[..2].iter().map(|r| r.seq).collect();
    a.delete_in_term(first, rows[..2].iter().map(OutboxRow::size).sum(), t1);
    a.flush().await;
    let left = a.reader().unwrap().read_after(0, 100).await.unwrap();
    assert_eq!(left, rows[2..].to_vec());
    wait_eq(
        "node 1's bytes after its deletes",
        51 * rows[3].size(),
        || a.bytes(),
    )
    .await;

    // Node 1 stalls past its term; node 2 takes the drain over. Node 1's late deletes are
    // refused (the rows stay), node 2's go through.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    let t2 = leases
        .lease_acquire("outbox", 2, ttl)
        .await
        .unwrap()
        .unwrap();
    assert!(t2 > t1);
    let next: Vec<i64> = rows[2..4].iter().map(|r| r.seq).collect();
    let next_bytes = rows[2..4].iter().map(OutboxRow::size).sum();
    a.delete_in_term(next.clone(), next_bytes, t1);
    a.flush().await;
    let left = b.reader().unwrap().read_after(0, 100).await.unwrap();
    assert_eq!(left, rows[2..].to_vec(), "a past holder deletes nothing");
    b.delete_in_term(next, next_bytes, t2);
    b.flush().await;
    let left = b.reader().unwrap().read_after(0, 100).await.unwrap();
    assert_eq!(left, rows[4..].to_vec());
    // Node 2 deleted one of node 1's rows: node 1 sees the space freed.
    wait_eq("node 1's rows after node 2's deletes", 50, || a.len()).await;
    wait_eq("node 2's rows", 1, || b.len()).await;
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_outbox_bound_applies_back_pressure_until_another_node_drains() {
    let (pg, leases) = shared_db().await;
    let big = row("d", 0, 800);
    let size = big.size();
    let a = shared_outbox(&pg, 1, size + size / 2);
    let b = shared_outbox(&pg, 2, 1 << 20);
    put(&a, big).await;
    let err = a.admit(size, Duration::from_millis(300)).await.unwrap_err();
    assert!(matches!(err, OutboxError::Full { .. }), "{err}");
    assert_eq!(a.bytes(), size, "a refused admit reserves nothing");

    // Node 1 waits; node 2, the drain holder, delivers node 1's row.
    let waiting = {
        let a = a.clone();
        tokio::spawn(async move { a.admit(size, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "admitted while the outbox was full");
    let term = leases
        .lease_acquire("outbox", 2, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let rows = b.reader().unwrap().read_after(0, 10).await.unwrap();
    b.delete_in_term(vec![rows[0].seq], rows[0].size(), term);
    b.flush().await;
    waiting
        .await
        .unwrap()
        .expect("space freed by the other node's delete");
    assert_eq!(a.bytes(), size);
    drop((a, b));
}

// ----- documents written through other nodes (cluster mode, `follow.rs`) -----

#[tokio::test]
async fn groups_and_rate_limits_written_through_other_nodes_are_followed() {
    let (registry, metrics) = registry_with_device().await;
    let fwd = Forwarder::disabled(registry.store().clone(), registry, metrics).unwrap();
    let follower = fwd.doc_follower();
    let mut kinds = follower.kinds();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "amqp.exchange_deleted",
            "amqp.group",
            "amqp.group_deleted",
            "amqp.rate_limit"
        ]
    );
    let group = |gid: &str, name: &str| ConsumerGroup {
        instance_id: "iot-a".into(),
        group_id: gid.into(),
        name: name.into(),
        created_at_ms: 1,
        message_ttl_secs: Some(60),
    };
    let json = |g: &ConsumerGroup| serde_json::to_string(g).unwrap();
    let declared = |gid: &str| {
        lock(&fwd.groups)
            .groups
            .get(&("iot-a".to_owned(), gid.to_owned()))
            .map(|e| e.declared)
    };

    // Created elsewhere: listed here, not declared on this node yet.
    follower.changed(GROUP_DOC_KIND, "iot-a/g1", Some(&json(&group("g1", "one"))));
    assert_eq!(fwd.list_groups("iot-a").unwrap(), [group("g1", "one")]);
    assert_eq!(declared("g1"), Some(false));
    // Changed: replaced. A document naming another group, or not JSON: ignored.
    follower.changed(GROUP_DOC_KIND, "iot-a/g1", Some(&json(&group("g1", "uno"))));
    follower.changed(GROUP_DOC_KIND, "iot-a/g1", Some("{"));
    follower.changed(
        GROUP_DOC_KIND,
        "iot-a/other",
        Some(&json(&group("g1", "x"))),
    );
    assert_eq!(fwd.list_groups("iot-a").unwrap(), [group("g1", "uno")]);
    // Deleted elsewhere: gone.
    follower.changed(GROUP_DOC_KIND, "iot-a/g1", None);
    assert!(fwd.list_groups("iot-a").unwrap().is_empty());

    // A rate limit set elsewhere is the one in force here; removed, none again.
    let five = RateLimit {
        msgs_per_sec: NonZeroU32::new(5),
        bytes_per_sec: None,
    };
    follower.changed(
        RATE_LIMIT_DOC_KIND,
        "iot-a",
        Some(&serde_json::to_string(&five).unwrap()),
    );
    let v = fwd.rate_limit("iot-a").unwrap();
    assert_eq!(
        (v.msgs_per_sec, v.source),
        (Some(5), RateLimitSource::Instance)
    );
    let l = fwd.limiter("iot-a").expect("a limiter");
    assert!((5..=6).contains(&(0..100).filter(|_| l.check(1).is_ok()).count()));
    follower.changed(RATE_LIMIT_DOC_KIND, "iot-a", Some("not json"));
    assert_eq!(fwd.rate_limit("iot-a").unwrap().msgs_per_sec, Some(5));
    follower.changed(RATE_LIMIT_DOC_KIND, "iot-a", None);
    assert_eq!(
        fwd.rate_limit("iot-a").unwrap().source,
        RateLimitSource::None
    );
    assert!(fwd.limiter("iot-a").is_none());

    // Tombstones are kept for this node's next connection; an exchange's makes the publisher
    // re-check its targets.
    let deletions = fwd.exchanges_deleted();
    follower.changed(TOMBSTONE_DOC_KIND, "iot-a/g1", Some("q"));
    follower.changed(EXCHANGE_TOMBSTONE_DOC_KIND, "iot-b", Some("x.iot-b"));
    assert_eq!(fwd.exchanges_deleted(), deletions + 1);
    // The same again changes nothing.
    follower.changed(EXCHANGE_TOMBSTONE_DOC_KIND, "iot-b", Some("x.iot-b"));
    assert_eq!(fwd.exchanges_deleted(), deletions + 1);
    {
        let st = lock(&fwd.groups);
        assert_eq!(st.tombstones.get("iot-a/g1").map(String::as_str), Some("q"));
        assert!(st.exchange_tombstones.contains_key("iot-b"));
    }

    // A reload replaces each kind whole: what is not in it goes, what is comes.
    follower.changed(
        GROUP_DOC_KIND,
        "iot-a/old",
        Some(&json(&group("old", "old"))),
    );
    follower.reloaded(
        GROUP_DOC_KIND,
        &[
            ("iot-a/g2".into(), json(&group("g2", "two"))),
            ("iot-a/g3".into(), json(&group("g3", "three"))),
        ],
    );
    assert_eq!(
        fwd.list_groups("iot-a").unwrap(),
        [group("g2", "two"), group("g3", "three")]
    );
    follower.reloaded(TOMBSTONE_DOC_KIND, &[]);
    follower.reloaded(EXCHANGE_TOMBSTONE_DOC_KIND, &[]);
    follower.reloaded(
        RATE_LIMIT_DOC_KIND,
        &[("iot-a".into(), serde_json::to_string(&five).unwrap())],
    );
    {
        let st = lock(&fwd.groups);
        assert!(st.tombstones.is_empty() && st.exchange_tombstones.is_empty());
    }
    assert_eq!(fwd.rate_limit("iot-a").unwrap().msgs_per_sec, Some(5));
    follower.reloaded(RATE_LIMIT_DOC_KIND, &[]);
    assert_eq!(
        fwd.rate_limit("iot-a").unwrap().source,
        RateLimitSource::None
    );
}

/// A node's own writes come back in a reload (the receiver reads every document after a
/// resync): the same group is kept as it is. A group another node created is not created
/// again here.
#[tokio::test]
async fn a_reload_of_a_nodes_own_documents_changes_nothing() {
    let (registry, metrics) = registry_with_device().await;
    let store = registry.store().clone();
    let fwd = Forwarder::disabled(store.clone(), registry, metrics).unwrap();
    let follower = fwd.doc_follower();
    let created = fwd
        .create_group(
            "iot-a",
            NewConsumerGroup {
                group_id: Some("mine".into()),
                name: "mine".into(),
                message_ttl_secs: None,
            },
        )
        .await
        .unwrap();
    lock(&fwd.groups)
        .groups
        .get_mut(&("iot-a".to_owned(), "mine".to_owned()))
        .unwrap()
        .declared = true;
    follower.reloaded(
        GROUP_DOC_KIND,
        &store.load_documents(GROUP_DOC_KIND).unwrap(),
    );
    assert_eq!(
        fwd.list_groups("iot-a").unwrap(),
        std::slice::from_ref(&created)
    );
    let declared = lock(&fwd.groups)
        .groups
        .get(&("iot-a".to_owned(), "mine".to_owned()))
        .map(|e| e.declared);
    assert_eq!(declared, Some(true), "an unchanged group keeps its state");

    // A create of an id another node created meanwhile is still refused.
    let theirs = ConsumerGroup {
        group_id: "theirs".into(),
        name: "theirs".into(),
        ..created
    };
    follower.changed(
        GROUP_DOC_KIND,
        "iot-a/theirs",
        Some(&serde_json::to_string(&theirs).unwrap()),
    );
    let err = fwd
        .create_group(
            "iot-a",
            NewConsumerGroup {
                group_id: Some("theirs".into()),
                name: "mine too".into(),
                message_ttl_secs: None,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ForwarderError::GroupExists { .. }), "{err}");
}
