//! Benchmarks of the AMQP forwarder alone, in-process against a real RabbitMQ
//! (`FLEETGATE_AMQP_URL`, as the tests): `throughput` (a bare lapin publisher, the forwarder
//! from enqueue to broker-confirmed, and the outbox drain after an outage, in one run) and
//! `shared_outbox` (the single node's SQLite outbox against cluster mode's PostgreSQL one;
//! needs PostgreSQL, `FLEETGATE_TEST_PG_URL` as the API tests). docs/BENCHMARKS.md has the
//! results.
//!
//! ```sh
//! cargo bench -p fleetgate --bench forwarder                   # both
//! cargo bench -p fleetgate --bench forwarder -- throughput     # one (by name)
//! FG_BENCH_N=50000 FG_BENCH_WINDOW=2048 cargo bench -p fleetgate --bench forwarder -- throughput
//! ```

#[allow(dead_code)]
#[path = "../tests/api/helpers.rs"]
mod helpers;

mod common;
// The harness's reader of /proc CPU times (std only).
#[path = "../bench/src/proc_cpu.rs"]
mod proc_cpu;

use fleetgate::config::Secret;
use fleetgate::forwarder::testing::{self, eventually, rabbit, Fixture, Proxy};
use fleetgate::forwarder::{
    AmqpSettings, AmqpStatus, ClusterOutbox, Forwarder, ForwarderConfig, NewConsumerGroup, OnFull,
    OutboxRow, QueueType,
};
use fleetgate::store::{PostgresBackend, PostgresReader, PostgresUrl};
use helpers::PgTestDatabase;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use proc_cpu::cpu_seconds;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The benchmarks by name, in the order they run.
const BENCHMARKS: [&str; 2] = ["throughput", "shared_outbox"];

fn main() {
    common::run(&BENCHMARKS, |name| async move {
        match name {
            "throughput" => throughput().await,
            _ => shared_outbox().await,
        }
    });
}

/// Creates consumer group `gid` in instance `iid`.
async fn group(fwd: &Forwarder, iid: &str, gid: &str) {
    let message_ttl_secs = None;
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

/// `cargo bench -p fleetgate --bench forwarder -- throughput`. Prints, in one run: (a) a bare lapin publisher with 1,000 persistent publishes in flight,
/// (b) the forwarder from enqueue (64 concurrent "devices") to broker-confirmed, and (c) the
/// outbox drain rate after an outage. `FG_BENCH_N` (default 50,000) messages each;
/// `FG_BENCH_WINDOW` sets the forwarder's in-flight window (default: the configured default, 2048).
async fn throughput() {
    let rabbit = rabbit("bench_throughput").await;
    let n: usize = std::env::var("FG_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let window: usize = std::env::var("FG_BENCH_WINDOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| AmqpSettings::default().inflight_window);
    let fx = Fixture::new(rabbit, 64).await;
    let body = fx.post(0, 0).body;

    let (bare, enveloped) = bare_rates(&fx, n, &body).await;

    // (b) forwarder, enqueue → confirmed.
    let config = AmqpSettings {
        inflight_window: window,
        ..fx.settings(&fx.rabbit.url.clone())
    };
    let fwd = Forwarder::open(
        ForwarderConfig::new(config.clone()).unwrap(),
        fx.dir.path(),
        fx.registry.store().clone(),
        fx.registry.clone(),
        fx.metrics.clone(),
    )
    .unwrap();
    eventually("connected", || fwd.status() == AmqpStatus::Connected).await;
    group(&fwd, &fx.iid, "bench").await;
    let started = Instant::now();
    let fx = Arc::new(fx);
    enqueue_all(&fwd, &fx, n).await;
    let enqueue_rate = n as f64 / started.elapsed().as_secs_f64();
    let published_before = fx.metrics.forwarder_published.get();
    eventually("outbox drained", || fwd.outbox().unwrap().is_empty()).await;
    let end_to_end = n as f64 / started.elapsed().as_secs_f64();
    assert!(published_before <= n as u64);
    fwd.shutdown().await;
    drop(fwd);

    // (c) outage: fill the outbox while the broker is unreachable, then measure the drain.
    let proxy = Proxy::start(fx.rabbit.addr).await;
    proxy.cut();
    let cut_config = AmqpSettings {
        url: Some(Secret::new(fx.rabbit.url_via(proxy.addr))),
        ..config
    };
    let fwd = Forwarder::open(
        ForwarderConfig::new(cut_config).unwrap(),
        fx.dir.path(),
        fx.registry.store().clone(),
        fx.registry.clone(),
        fx.metrics.clone(),
    )
    .unwrap();
    enqueue_all(&fwd, &fx, n).await;
    assert_eq!(fwd.outbox().unwrap().len(), n as u64);
    let started = Instant::now();
    proxy.restore();
    eventually("outbox drained after the outage", || {
        fwd.outbox().unwrap().is_empty()
    })
    .await;
    let drain = n as f64 / started.elapsed().as_secs_f64();
    fwd.shutdown().await;

    println!(
        "BENCH n={n} window={window}\n  (a) bare lapin, 1000 in flight, persistent: {bare:.0} msg/s\n  (a') bare lapin, 1000 in flight, forwarder envelope (headers, fanout, mandatory): {enveloped:.0} msg/s\n  (b) forwarder enqueue (64 devices, durable outbox): {enqueue_rate:.0} msg/s; enqueue → broker-confirmed: {end_to_end:.0} msg/s\n  (c) outbox drain after an outage ({n} queued): {drain:.0} msg/s"
    );
    fx.cleanup(&["bench"]).await;
}

/// (a) A bare lapin publisher, 1,000 confirms in flight, persistent, into a durable queue;
/// (a') the same with the forwarder's envelope. `n` messages each; msg/s of both.
async fn bare_rates(fx: &Fixture, n: usize, body: &[u8]) -> (f64, f64) {
    // (a) bare lapin: 1,000 confirms in flight, persistent, into a durable queue.
    let bare_queue = format!("{}.bare", fx.prefix);
    let ch = fx.rabbit.conn.create_channel().await.unwrap();
    ch.queue_declare(
        bare_queue.as_str().into(),
        lapin::options::QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    let bare = testing::bare_publish(&ch, "", &bare_queue, false, n, body, |_| {
        lapin::BasicProperties::default().with_delivery_mode(2)
    })
    .await;
    // (a') the same, with the forwarder's envelope: 7 headers, fanout exchange, mandatory.
    ch.queue_purge(
        bare_queue.as_str().into(),
        lapin::options::QueuePurgeOptions::default(),
    )
    .await
    .unwrap();
    let bare_exchange = format!("{}.bare-x", fx.prefix);
    testing::declare_group(
        &fx.rabbit.conn,
        &ch,
        &bare_exchange,
        &bare_queue,
        0,
        QueueType::Classic,
    )
    .await
    .unwrap();
    let template = OutboxRow {
        seq: 1,
        enqueued_at_ms: 1_700_000_000_000,
        target: fx.iid.clone(),
        msg: Arc::new(fx.post(0, 0)),
    };
    let enveloped = testing::bare_publish(&ch, &bare_exchange, "", true, n, body, |i| {
        let mut row = template.clone();
        row.seq = i as i64;
        testing::envelope(&row)
    })
    .await;
    let _ = ch
        .queue_delete(bare_queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(
            bare_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    (bare, enveloped)
}

/// 64 concurrent "devices" enqueue `n` property posts between them.
async fn enqueue_all(fwd: &Arc<Forwarder>, fx: &Arc<Fixture>, n: usize) {
    let tasks: Vec<_> = (0..64)
        .map(|d| {
            let (fwd, fx) = (fwd.clone(), fx.clone());
            tokio::spawn(async move {
                for i in (d..n).step_by(64) {
                    fwd.enqueue(fx.post(d, i), OnFull::Refuse).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// A forwarder with the node's SQLite outbox, or (`pg`) cluster mode's PostgreSQL one with
/// this node as node 1.
async fn open_forwarder(
    fx: &Fixture,
    config: ForwarderConfig,
    pg: Option<&PostgresUrl>,
) -> Arc<Forwarder> {
    match pg {
        Some(pg_url) => {
            let leases = PostgresReader::connect(pg_url).await.unwrap();
            Forwarder::open_clustered(
                config,
                ClusterOutbox {
                    url: pg_url.clone(),
                    node: 1,
                    lease_ttl: Duration::from_secs(2),
                    leases: Arc::new(leases),
                },
                fx.registry.store().clone(),
                fx.registry.clone(),
                fx.metrics.clone(),
            )
            .unwrap()
        }
        None => Forwarder::open(
            config,
            fx.dir.path(),
            fx.registry.store().clone(),
            fx.registry.clone(),
            fx.metrics.clone(),
        )
        .unwrap(),
    }
}

/// `cargo bench -p fleetgate --bench forwarder -- shared_outbox` (docs/BENCHMARKS.md, "Shared
/// outbox"): the forwarder end to end, 64 concurrent
/// "devices" enqueueing `FG_BENCH_N` posts (default 20,000) until the last broker confirm,
/// with the single node's SQLite outbox and with cluster mode's PostgreSQL outbox (this node
/// holding the drain lease), `FG_BENCH_ROUNDS` rounds (default 2) alternating. Reports msg/s
/// and CPU µs per message of this process and of the PostgreSQL server.
async fn shared_outbox() {
    let rabbit = rabbit("bench_shared_outbox").await;
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (n, rounds) = (env("FG_BENCH_N", 20_000), env("FG_BENCH_ROUNDS", 2));
    let fx = Arc::new(Fixture::new(rabbit, 64).await);
    let pg = PgTestDatabase::create();
    let pg_url = PostgresUrl::parse(pg.url()).expect("the test database's URL");
    let url = pg_url.clone();
    tokio::task::spawn_blocking(move || PostgresBackend::connect(&url).map(drop))
        .await
        .unwrap()
        .expect("migrate the benchmark database");
    let config = fx.config(&fx.rabbit.url.clone());
    let mut grouped = false;
    let mut lines = Vec::new();
    for round in 0..rounds {
        for shared in [false, true] {
            let fwd = open_forwarder(&fx, config.clone(), shared.then_some(&pg_url)).await;
            eventually("connected and draining", || {
                fwd.status() == AmqpStatus::Connected
                    // The node's own file is always its own to drain; the shared table only
                    // while this node holds the `outbox` lease (`/healthz`'s view of it).
                    && (!shared || fwd.health()["amqp_outbox_drain"] == true)
            })
            .await;
            if !grouped {
                group(&fwd, &fx.iid, "bench").await;
                grouped = true;
            }
            let before = fx.metrics.forwarder_published.get();
            let (cpu0, pg0, started) = (
                cpu_seconds(None),
                cpu_seconds(Some("postgres")),
                Instant::now(),
            );
            enqueue_all(&fwd, &fx, n).await;
            let enqueued = started.elapsed().as_secs_f64();
            eventually("every post confirmed", || {
                fx.metrics.forwarder_published.get() - before >= n as u64
            })
            .await;
            let secs = started.elapsed().as_secs_f64();
            let (cpu, pg_cpu) = (
                cpu_seconds(None) - cpu0,
                cpu_seconds(Some("postgres")) - pg0,
            );
            let line = format!(
                "round {round} {:<22} enqueue only {:>7.0} msg/s, enqueue → confirmed {:>7.0} msg/s, gateway CPU {:>5.1} µs/msg, PostgreSQL CPU {:>5.1} µs/msg",
                if shared { "PostgreSQL (cluster)" } else { "SQLite (one node)" },
                n as f64 / enqueued,
                n as f64 / secs,
                cpu * 1e6 / n as f64,
                pg_cpu * 1e6 / n as f64,
            );
            println!("{line}");
            lines.push(line);
            fwd.shutdown().await;
        }
    }
    println!(
        "BENCH shared outbox, n={n}, 64 devices\n{}",
        lines.join("\n")
    );
    fx.cleanup(&["bench"]).await;
}
