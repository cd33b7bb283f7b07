//! Part 7, end-to-end forwarding (`--parts forward`, issue 17): N connected devices post
//! property reports (QoS1, a window in flight each); the gateway PUBACKs a post once it is in
//! the outbox, forwards it to the consumer group of the product's instance in RabbitMQ, and one
//! AMQP consumer counts the distinct posts it receives. Three nodes on PostgreSQL + NATS behind
//! HAProxy (the outbox a PostgreSQL table, published by the node holding the drain lease)
//! against one SQLite node, in the same run.
//!
//! Measured per run: PUBACKed posts/s, distinct posts delivered/s (first publish → last new
//! delivery), end-to-end latency (the device's send time, in the post, → consumer), posts lost
//! (PUBACKed, never delivered) and delivered twice, the gateways' CPU per post, PostgreSQL
//! commits/s in the cluster.

use crate::api::{devices, Api, Device};
use crate::deployment::{Deployment, Gateway};
use crate::loadgen::{self, FloodStats};
use crate::procs::Bins;
use crate::stats::{median, Latency};
use crate::{fresh_dir, load1, Args, Results};
use anyhow::{ensure, Context};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

const PRODUCT: &str = "benchfwd";
const INSTANCE: &str = "default";
const GROUP: &str = "bench";

#[derive(Debug, Clone, Serialize)]
pub struct ForwardRow {
    pub run: usize,
    /// `single node (SQLite)` or `3 nodes (PostgreSQL) via HAProxy`.
    pub deployment: String,
    pub devices: usize,
    pub posts_per_device: usize,
    /// Publish → PUBACK (the post is in the outbox).
    pub flood: FloodStats,
    /// Distinct posts the consumer received.
    pub delivered: u64,
    /// Deliveries of a post already received (at-least-once redeliveries).
    pub duplicates: u64,
    /// PUBACKed posts never received.
    pub lost: u64,
    /// Distinct posts / (first publish → last new delivery).
    pub delivered_per_s: f64,
    /// The device's send time → the consumer's receipt.
    pub end_to_end: Latency,
    /// CPU time of every gateway process during the run / posts delivered, microseconds.
    pub cpu_us_per_msg: f64,
    pub pg_commits_per_s: Option<f64>,
    pub load1: f64,
}

/// Part 7: `--runs` times the cluster, then the single node.
pub(crate) async fn benchmark(
    args: &Args,
    bins: &Bins,
    results: &mut Results,
) -> anyhow::Result<()> {
    for run in 1..=args.runs {
        for deployment in [Deployment::Cluster, Deployment::Single] {
            let row = run_once(args, bins, deployment, run).await?;
            print_row(&row);
            results.forward.push(row);
        }
    }
    Ok(())
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Device `i`'s post number `seq`, stamped with its send time.
fn posts() -> loadgen::MessageFn {
    Arc::new(|i, seq| {
        let body = json!({
            "id": seq.to_string(),
            "version": "1.0",
            "params": {"seq": seq, "sent_us": now_us()},
            "method": "thing.event.property.post",
        });
        (
            format!("/sys/{PRODUCT}/dev{i:05}/thing/event/property/post"),
            body.to_string().into_bytes(),
        )
    })
}

async fn run_once(
    args: &Args,
    bins: &Bins,
    deployment: Deployment,
    run: usize,
) -> anyhow::Result<ForwardRow> {
    let tag = match deployment {
        Deployment::Single => "single",
        Deployment::Cluster => "cluster",
    };
    let dir = args.work_dir.join(format!("forward-{tag}-{run}"));
    fresh_dir(&dir)?;
    // Exchanges and queues of their own per run: nothing left over from another run counts.
    let prefix = format!("fgbench{}{tag}{run}", std::process::id());
    let extra = [
        "--amqp-url".to_owned(),
        args.amqp_url.clone(),
        "--amqp-exchange-prefix".to_owned(),
        prefix.clone(),
    ];
    let n = args.forward_devices;
    let (gateway, api) = Gateway::start(deployment, args, bins, &dir, n, &extra).await?;
    let measured = measure(args, &gateway, &api, &prefix, run, deployment, n).await;
    let stopped = gateway.stop().await;
    let row = measured?;
    stopped?;
    Ok(row)
}

async fn measure(
    args: &Args,
    gateway: &Gateway,
    api: &Api,
    prefix: &str,
    run: usize,
    deployment: Deployment,
    n: usize,
) -> anyhow::Result<ForwardRow> {
    let devs: Vec<Device> = devices(PRODUCT, n);
    api.provision(PRODUCT, &devs).await?;
    api.post(
        &format!("/api/v1/instances/{INSTANCE}/consumer-groups"),
        &json!({"group_id": GROUP, "name": GROUP}),
    )
    .await?;
    let queue = format!("{prefix}.{INSTANCE}.{GROUP}");
    let expected = (n * args.forward_messages) as u64;
    let (stop, stopped) = watch::channel(false);
    let consumer = Consumer::start(&args.amqp_url, &queue, n, args.forward_messages).await?;
    let counting = tokio::spawn(consumer.count(expected, stopped));

    let load = load1();
    let mqtt = gateway.mqtt();
    let (cs, clients) = loadgen::connect_all(mqtt[0], &devs, args.concurrency, args.window).await;
    ensure!(
        cs.failed == 0,
        "forwarding: {} devices failed to connect: {:?}",
        cs.failed,
        cs.errors
    );
    let cpu0 = gateway.cpu_s()?;
    let pg0 = gateway.pg_counters().await?;
    let started = Instant::now();
    let flood = loadgen::flood(
        clients.into_iter().flatten().collect(),
        args.forward_messages,
        posts(),
        Duration::from_secs(300),
    )
    .await;
    // Every PUBACKed post must arrive; give the drain time, then stop waiting.
    let deadline = tokio::time::sleep(Duration::from_secs(120));
    tokio::pin!(deadline);
    let mut counting = counting;
    let counted = tokio::select! {
        c = &mut counting => c,
        () = &mut deadline => {
            let _ = stop.send(true);
            counting.await
        }
    }
    .context("consumer task")??;
    let cpu = gateway.cpu_s()? - cpu0;
    let pg_commits_per_s = match (pg0, gateway.pg_counters().await?) {
        (Some((c0, _)), Some((c1, _))) => {
            Some((c1 - c0) as f64 / started.elapsed().as_secs_f64().max(1e-9))
        }
        _ => None,
    };
    let elapsed = counted
        .last_new
        .map_or(0.0, |t| t.duration_since(started).as_secs_f64());
    let mut latencies = counted.latencies_us;
    delete_queue(&args.amqp_url, &queue).await;
    Ok(ForwardRow {
        run,
        deployment: match deployment {
            Deployment::Single => "single node (SQLite)".to_owned(),
            Deployment::Cluster => "3 nodes (PostgreSQL) via HAProxy".to_owned(),
        },
        devices: n,
        posts_per_device: args.forward_messages,
        lost: flood.acked.saturating_sub(counted.distinct),
        delivered: counted.distinct,
        duplicates: counted.duplicates,
        delivered_per_s: if elapsed > 0.0 {
            counted.distinct as f64 / elapsed
        } else {
            0.0
        },
        end_to_end: Latency::from_micros(&mut latencies),
        cpu_us_per_msg: cpu * 1e6 / counted.distinct.max(1) as f64,
        pg_commits_per_s,
        flood,
        load1: load,
    })
}

/// One AMQP consumer on the consumer group's queue.
struct Consumer {
    consumer: lapin::Consumer,
    _connection: lapin::Connection,
    devices: usize,
    posts: usize,
}

/// What the consumer saw.
struct Counted {
    distinct: u64,
    duplicates: u64,
    latencies_us: Vec<u32>,
    last_new: Option<Instant>,
}

impl Consumer {
    /// Subscribes to `queue`, waiting until the gateway has declared it.
    async fn start(url: &str, queue: &str, devices: usize, posts: usize) -> anyhow::Result<Self> {
        let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .with_context(|| format!("RabbitMQ at {url}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // A consume on a missing queue closes the channel: a new one per attempt.
            let channel = connection.create_channel().await?;
            let consumed = channel
                .basic_consume(
                    queue.into(),
                    "fleetgate-bench".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match consumed {
                Ok(consumer) => {
                    return Ok(Consumer {
                        consumer,
                        _connection: connection,
                        devices,
                        posts,
                    })
                }
                Err(e) => {
                    ensure!(
                        Instant::now() < deadline,
                        "queue {queue} was not declared within 30 s: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Counts the distinct posts until `expected` arrived or `stop` is set. Messages that are
    /// not the benchmark's posts (the devices' online/offline status) are skipped.
    async fn count(
        mut self,
        expected: u64,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Counted> {
        let mut seen = HashSet::with_capacity(self.devices * self.posts);
        let mut counted = Counted {
            distinct: 0,
            duplicates: 0,
            latencies_us: Vec::with_capacity(self.devices * self.posts),
            last_new: None,
        };
        while counted.distinct < expected {
            let delivery = tokio::select! {
                d = self.consumer.next() => d,
                _ = stop.changed() => break,
            };
            let Some(delivery) = delivery else { break };
            let delivery = delivery?;
            let Some((device, seq, sent_us)) = post_of(&delivery.data) else {
                continue;
            };
            if seen.insert((device, seq)) {
                counted.distinct += 1;
                counted.last_new = Some(Instant::now());
                let latency = now_us().saturating_sub(sent_us);
                counted
                    .latencies_us
                    .push(u32::try_from(latency).unwrap_or(u32::MAX));
            } else {
                counted.duplicates += 1;
            }
        }
        Ok(counted)
    }
}

/// `(device index, seq, sent_us)` of a forwarded property post (the vendor's body:
/// `{deviceName, items: {seq: {value}, sent_us: {value}}}`).
fn post_of(body: &[u8]) -> Option<(u32, u64, u64)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let device = v["deviceName"]
        .as_str()?
        .strip_prefix("dev")?
        .parse()
        .ok()?;
    let items = &v["items"];
    Some((
        device,
        items["seq"]["value"].as_u64()?,
        items["sent_us"]["value"].as_u64()?,
    ))
}

async fn delete_queue(url: &str, queue: &str) {
    let Ok(connection) =
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    if let Ok(channel) = connection.create_channel().await {
        let _ = channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = connection.close(0, "done".into()).await;
}

fn print_row(r: &ForwardRow) {
    eprintln!(
        "forward run {} ({}): PUBACKed {:.0}/s (p50 {:.1} ms, p99 {:.1} ms), delivered {} of {} \
         at {:.0}/s, end-to-end p50 {:.1} ms p99 {:.1} ms, lost {}, duplicates {}, CPU {:.1} µs/post, \
         PostgreSQL {:?} commits/s, load {:.1}",
        r.run,
        r.deployment,
        r.flood.acked_per_s,
        r.flood.latency.p50_ms,
        r.flood.latency.p99_ms,
        r.delivered,
        r.flood.acked,
        r.delivered_per_s,
        r.end_to_end.p50_ms,
        r.end_to_end.p99_ms,
        r.lost,
        r.duplicates,
        r.cpu_us_per_msg,
        r.pg_commits_per_s,
        r.load1,
    );
}

/// The Markdown table of the part: medians per deployment, then the ratio.
pub(crate) fn print_report(r: &Results) {
    if r.forward.is_empty() {
        return;
    }
    println!("\n## End-to-end forwarding: MQTT → outbox → RabbitMQ consumer (median of runs)\n");
    println!(
        "| deployment | devices × posts | PUBACKed/s | PUBACK p50 / p99 ms | delivered/s | \
         end-to-end p50 / p99 ms | lost | duplicates | CPU µs/post | PostgreSQL commits/s |"
    );
    println!("|---|---|---:|---|---:|---|---:|---:|---:|---:|");
    let mut rates = Vec::new();
    for label in ["3 nodes (PostgreSQL) via HAProxy", "single node (SQLite)"] {
        let rows: Vec<&ForwardRow> = r.forward.iter().filter(|f| f.deployment == label).collect();
        let Some(first) = rows.first() else { continue };
        let med = |f: &dyn Fn(&ForwardRow) -> f64| median(rows.iter().map(|r| f(r)));
        let delivered = med(&|f| f.delivered_per_s);
        rates.push(delivered);
        println!(
            "| {label} | {} × {} | {:.0} | {:.1} / {:.1} | {:.0} | {:.1} / {:.1} | {} | {} | {:.1} | {} |",
            first.devices,
            first.posts_per_device,
            med(&|f| f.flood.acked_per_s),
            med(&|f| f.flood.latency.p50_ms),
            med(&|f| f.flood.latency.p99_ms),
            delivered,
            med(&|f| f.end_to_end.p50_ms),
            med(&|f| f.end_to_end.p99_ms),
            rows.iter().map(|f| f.lost).sum::<u64>(),
            rows.iter().map(|f| f.duplicates).sum::<u64>(),
            med(&|f| f.cpu_us_per_msg),
            first
                .pg_commits_per_s
                .map_or("–".to_owned(), |_| format!(
                    "{:.0}",
                    med(&|f| f.pg_commits_per_s.unwrap_or(0.0))
                )),
        );
    }
    if let [cluster, single] = rates[..] {
        println!(
            "\ncluster / single node, delivered/s: {:.0}%",
            cluster / single.max(1e-9) * 100.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_post_is_read_back_and_anything_else_is_skipped() {
        let body = json!({"deviceName": "dev00042", "items": {
            "seq": {"value": 7, "time": 1}, "sent_us": {"value": 123, "time": 1}}});
        assert_eq!(post_of(body.to_string().as_bytes()), Some((42, 7, 123)));
        let status = json!({"status": "online", "deviceName": "dev00042"});
        assert_eq!(post_of(status.to_string().as_bytes()), None);
        assert_eq!(post_of(b"not json"), None);
    }
}
