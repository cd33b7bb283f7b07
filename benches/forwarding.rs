//! Benchmarks of issue 5 through the whole in-process gateway (docs/BENCHMARKS.md, "AMQP
//! forwarder"): MQTT property posts into the outbox while RabbitMQ is unreachable (`outage`),
//! and end to end into RabbitMQ beside a bare lapin publisher in the same run (`rabbitmq`).
//!
//! ```sh
//! cargo bench -p fleetgate --bench forwarding               # both
//! cargo bench -p fleetgate --bench forwarding -- rabbitmq   # one (by name)
//! FG_BENCH_DEVICES=100 FG_BENCH_POSTS=1000 cargo bench -p fleetgate --bench forwarding
//! ```
//!
//! `rabbitmq` needs RabbitMQ (`FLEETGATE_AMQP_URL`, as the tests). The gateway is the one the
//! API tests start (`tests/api/helpers.rs`), with the binary's allocator.

/// The allocator the `fleetgate` binary ships with (see `src/main.rs`).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[allow(dead_code)]
#[path = "../tests/api/helpers.rs"]
mod helpers;

mod common;

use fleetgate::forwarder::testing::test_amqp_url;
use helpers::*;
use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use rand::Rng;
use rumqttc::QoS;
use serde_json::json;
use std::time::Duration;

/// The benchmarks by name, in the order they run.
const BENCHMARKS: [&str; 2] = ["outage", "rabbitmq"];

fn main() {
    common::run(&BENCHMARKS, |name| async move {
        match name {
            "outage" => outage().await,
            _ => rabbitmq().await,
        }
    });
}

/// Connects `devices` devices of a new product, waits until `metric` counts their online
/// status messages, then has every device publish `posts` QoS 1 property posts and waits until
/// `metric` has grown by all of them (polled every 50 ms, ≤ 0.5% of a 10 s run: rendering
/// `/metrics` more often costs the gateway measurable CPU). Returns the connected devices, when
/// the first post went out, and the MQTT body size.
async fn flood_property_posts(
    app: &TestApp,
    devices: usize,
    posts: usize,
    metric: &str,
) -> (Vec<Device>, std::time::Instant, usize) {
    let pk = app.create_product("bench").await;
    let mut fleet = Vec::new();
    for i in 0..devices {
        let dn = format!("dev{i:04}");
        let secret = app.create_device(&pk, &dn).await;
        fleet.push((
            dn.clone(),
            connect(app.mqtt_addr(), &credentials(&pk, &dn, &secret)).await,
        ));
    }
    let start_count = loop {
        let n = app.metric(metric).await;
        if n >= devices as f64 {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let body = |dn: &str, i: usize| {
        format!(
            r#"{{"id":"{i}","version":"1.0","params":{{"Temperature":{}.5,"Device":"{dn}"}},"method":"thing.event.property.post"}}"#,
            20 + i % 10
        )
    };
    let sample_len = body("dev0000", 0).len();
    let started = std::time::Instant::now();
    let mut publishers = Vec::new();
    for (dn, device) in &fleet {
        let (client, topic, dn) = (
            device.client.clone(),
            format!("/sys/{pk}/{dn}/thing/event/property/post"),
            dn.clone(),
        );
        let bodies: Vec<String> = (0..posts).map(|i| body(&dn, i)).collect();
        publishers.push(tokio::spawn(async move {
            for b in bodies {
                client
                    .publish(topic.as_str(), QoS::AtLeastOnce, false, b)
                    .await
                    .unwrap();
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    let total = (devices * posts) as f64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while app.metric(metric).await - start_count < total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{metric}: not all counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (
        fleet.into_iter().map(|(_, d)| d).collect(),
        started,
        sample_len,
    )
}

/// `(FG_BENCH_DEVICES, FG_BENCH_POSTS)` of the forwarding benchmarks, default 100 × 500.
fn bench_shape() -> (usize, usize) {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    (env("FG_BENCH_DEVICES", 100), env("FG_BENCH_POSTS", 500))
}

/// Benchmark of issue 5: MQTT ingest while RabbitMQ is unreachable (ingest must not stall).
/// `FG_BENCH_DEVICES` (100) devices each publish `FG_BENCH_POSTS` (500) QoS 1 property posts to
/// a gateway whose AMQP URL points at a closed port; rate = posts / (first publish → all of them
/// committed to the outbox, `fleetgate_forwarder_outbox_messages`), which is when their PUBACKs
/// may go out.
/// `cargo bench -p fleetgate --bench forwarding -- outage`
async fn outage() {
    let (devices, posts) = bench_shape();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("amqp://guest:guest@{}/%2f", closed.local_addr().unwrap());
    drop(closed);
    let app = spawn_app_with(move |s| {
        s.amqp.url = Some(fleetgate::config::Secret::new(url));
    })
    .await;
    let (_fleet, started, _) =
        flood_property_posts(&app, devices, posts, "fleetgate_forwarder_outbox_messages").await;
    let rate = (devices * posts) as f64 / started.elapsed().as_secs_f64();
    let (_, health) = app.get("/healthz").await;
    assert_ne!(health["amqp"], "connected", "{health}");
    println!(
        "BENCH devices={devices} posts={posts}, RabbitMQ unreachable ({}): MQTT property posts → committed to the outbox: {rate:.0} msg/s",
        health["amqp"]
    );
}

/// Benchmark of issue 5, end to end in one run (docs/BENCHMARKS.md, "AMQP forwarder"):
/// `FG_BENCH_DEVICES` devices (default 100) each publish `FG_BENCH_POSTS` QoS 1 property posts
/// (default 500) over MQTT; rate = posts / (first publish → the forwarder's last broker
/// confirm). Then, against the same RabbitMQ, a bare lapin publisher with 1,000 persistent
/// publishes in flight sends as many messages with the forwarded body: (a) without headers into
/// one durable queue, (a') with the forwarder's envelope through the instance's exchange.
/// `cargo bench -p fleetgate --bench forwarding -- rabbitmq`
async fn rabbitmq() {
    let url = test_amqp_url("bench_forwarding_rabbitmq").await;
    let (devices, posts) = bench_shape();
    let prefix = format!("fgbench-{:08x}", rand::thread_rng().gen::<u32>());
    let app = spawn_app_with_amqp(&url, &prefix).await;
    let (status, _) = app
        .post(
            "/api/v1/instances/default/consumer-groups",
            json!({"group_id": "bench", "name": "bench"}),
        )
        .await;
    assert_eq!(status, 201);
    // Online status messages are forwarded too: they are confirmed before the clock starts.
    const PUBLISHED: &str = "fleetgate_forwarder_published_total";
    let (fleet, started, sample_len) = flood_property_posts(&app, devices, posts, PUBLISHED).await;
    let e2e = (devices * posts) as f64 / started.elapsed().as_secs_f64();
    drop(fleet);

    // The bare publishers, same RabbitMQ, as many messages, each the body the forwarder sent
    // (one is taken from the group's queue): (a) header-less and persistent into a durable
    // queue; (a') the forwarder's whole envelope (vendor headers, message id, mandatory) through
    // the instance's fanout exchange into the group's queue, as the forwarder publishes it.
    let rabbit = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = rabbit.create_channel().await.unwrap();
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    let group_queue = format!("{prefix}.default.bench");
    let sample = ch
        .basic_get(
            group_queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the group's queue holds the forwarded posts");
    let (forwarded_body, envelope) = (sample.delivery.data, sample.delivery.properties);
    ch.queue_purge(group_queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    let queue = format!("{prefix}.bare");
    ch.queue_declare(
        queue.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let persistent = lapin::BasicProperties::default().with_delivery_mode(2);
    let bare = fleetgate::forwarder::testing::bare_publish(
        &ch,
        "",
        &queue,
        false,
        devices * posts,
        &forwarded_body,
        |_| persistent.clone(),
    )
    .await;
    ch.queue_delete(queue.as_str().into(), Default::default())
        .await
        .unwrap();
    let enveloped = fleetgate::forwarder::testing::bare_publish(
        &ch,
        &format!("{prefix}.default"),
        "",
        true,
        devices * posts,
        &forwarded_body,
        |_| envelope.clone(),
    )
    .await;
    let _ = ch
        .exchange_delete(
            format!("{prefix}.default").as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = ch
        .queue_delete(group_queue.as_str().into(), Default::default())
        .await;
    println!(
        "BENCH devices={devices} posts={posts} MQTT body={sample_len} B, forwarded body={} B\n  MQTT property posts → confirmed in RabbitMQ: {e2e:.0} msg/s\n  (a) bare lapin, 1000 in flight, persistent, no headers: {bare:.0} msg/s → ratio {:.0}%\n  (a') bare lapin, 1000 in flight, the forwarder's envelope: {enveloped:.0} msg/s → ratio {:.0}%",
        forwarded_body.len(),
        100.0 * e2e / bare,
        100.0 * e2e / enveloped
    );
}
