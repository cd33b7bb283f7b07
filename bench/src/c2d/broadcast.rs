//! `--parts broadcast`: connected devices subscribed to their command topic, the operator
//! API's broadcast at each configured rate, deliveries timed at the devices, and the observed
//! rate against the configured one (see the module docs of [`c2d`](super)).

use crate::api::{devices, Api, Device};
use crate::loadgen::{self, Connected};
use crate::procs::{Bins, Server};
use crate::{fresh_dir, load1, Args, Results, TOKEN};
use anyhow::{ensure, Context};
use rumqttc::{Event, Packet, QoS};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const BROADCAST_PRODUCT: &str = "benchcast";
/// The API's limit of device names per broadcast.
const MAX_BROADCAST: usize = 1000;

#[derive(Serialize, Clone)]
pub(crate) struct BroadcastRow {
    pub run: usize,
    pub devices: usize,
    pub configured_per_s: u32,
    pub calls: usize,
    pub qos: u8,
    pub connect: loadgen::ConnectStats,
    /// Results `sent` in the API's answers; any other result by name.
    pub api_sent: u64,
    pub api_other: BTreeMap<String, u64>,
    /// Devices that received the message (at least once).
    pub delivered: u64,
    /// Further copies a device received.
    pub duplicates: u64,
    /// First call sent → last HTTP answer.
    pub calls_s: f64,
    /// First call sent → first delivery.
    pub first_delivery_s: f64,
    /// First call sent → last delivery.
    pub elapsed_s: f64,
    /// `delivered / elapsed_s`.
    pub delivered_per_s: f64,
    /// The rate after the limiter's initial burst (one second's worth goes at once): deliveries
    /// between the burst + 5% and the burst + 95% of the rest, over the time between them.
    pub steady_per_s: Option<f64>,
    /// `steady_per_s` against the configured rate, percent (100 = exact).
    pub steady_accuracy_pct: Option<f64>,
    /// What `elapsed_s` would be at exactly the configured rate after the burst:
    /// `(devices − rate) / rate` (0 when everything fits in the burst).
    pub ideal_s: f64,
    /// Deliveries per whole second since the first call.
    pub per_second: Vec<u64>,
    pub gateway_cpu_us_per_msg: f64,
    pub gateway_rss_kib: u64,
    pub dropped_devices: u64,
    pub load1_start: f64,
    pub load1_end: f64,
}

/// `--parts broadcast`: each rate of `--broadcast-rates`, `--runs` times.
pub(crate) async fn broadcast(
    args: &Args,
    bins: &Bins,
    results: &mut Results,
) -> anyhow::Result<()> {
    let devs = devices(BROADCAST_PRODUCT, args.broadcast_devices);
    for run in 1..=args.runs {
        for &rate in &args.broadcast_rates {
            let row = broadcast_once(args, bins, &devs, rate, run).await?;
            eprintln!(
                "broadcast {} devices at {}/s run {run}: API answered in {:.2} s, first delivery at {:.2} s, \
                 delivered {} (+{} duplicates) in {:.2} s = {:.0}/s, \
                 steady {:?}/s ({:?}% of configured), ideal {:.2} s, API sent {} other {:?}, \
                 gateway CPU {:.1} µs/msg, per second {:?}, load {:.1}–{:.1}",
                row.devices,
                row.configured_per_s,
                row.calls_s,
                row.first_delivery_s,
                row.delivered,
                row.duplicates,
                row.elapsed_s,
                row.delivered_per_s,
                row.steady_per_s.map(|r| r.round()),
                row.steady_accuracy_pct.map(|p| (p * 10.0).round() / 10.0),
                row.ideal_s,
                row.api_sent,
                row.api_other,
                row.gateway_cpu_us_per_msg,
                row.per_second,
                row.load1_start,
                row.load1_end,
            );
            results.broadcast.push(row);
        }
    }
    Ok(())
}

/// A device's receptions: (device index, µs since the base instant of each copy).
type Received = Vec<(usize, u64)>;

async fn broadcast_once(
    args: &Args,
    bins: &Bins,
    devs: &[Device],
    rate: u32,
    run: usize,
) -> anyhow::Result<BroadcastRow> {
    let load1_start = load1();
    let (server, api) = start_gateway(args, bins, devs, rate, run).await?;
    let (connect, clients) =
        loadgen::connect_all(server.mqtt, devs, args.concurrency, args.window).await;
    ensure!(
        connect.failed == 0,
        "broadcast: {} of {} devices failed to connect: {:?}",
        connect.failed,
        devs.len(),
        connect.errors
    );
    let base = Instant::now();
    let receivers = Receivers::start(clients, devs, base);
    receivers.wait_subscribed(devs.len() as u64).await?;

    // Every call at once: they share the gateway's limiter, as concurrent operators would.
    let cpu_before = server.cpu_s()?;
    let started_us = base.elapsed().as_micros() as u64;
    let answers = call_all(&api, devs, args.broadcast_qos).await?;
    let calls_s = (base.elapsed().as_micros() as u64 - started_us) as f64 / 1e6;
    receivers.wait_arrived(answers.sent).await;
    let cpu = server.cpu_s()? - cpu_before;
    let rss = server.rss_kib()?;
    let (times, duplicates, dropped) = receivers.finish(devs.len(), started_us).await;
    server.stop().await?;
    let delivered = times.len() as u64;
    let elapsed_s = times.last().map_or(0.0, |&t| t as f64 / 1e6);
    let steady_per_s = steady_rate(&times, rate as usize);
    Ok(BroadcastRow {
        run,
        devices: devs.len(),
        configured_per_s: rate,
        calls: answers.calls,
        qos: args.broadcast_qos,
        connect,
        api_sent: answers.sent,
        api_other: answers.other,
        delivered,
        duplicates,
        calls_s,
        first_delivery_s: times.first().map_or(0.0, |&t| t as f64 / 1e6),
        elapsed_s,
        delivered_per_s: if elapsed_s > 0.0 {
            delivered as f64 / elapsed_s
        } else {
            0.0
        },
        steady_per_s,
        steady_accuracy_pct: steady_per_s.map(|r| r * 100.0 / f64::from(rate)),
        ideal_s: devs.len().saturating_sub(rate as usize) as f64 / f64::from(rate),
        per_second: per_second(&times, elapsed_s),
        gateway_cpu_us_per_msg: cpu * 1e6 / (answers.sent.max(1) as f64),
        gateway_rss_kib: rss,
        dropped_devices: dropped,
        load1_start,
        load1_end: load1(),
    })
}

/// A gateway with `[commands] broadcast_per_sec = rate` and the devices provisioned.
async fn start_gateway(
    args: &Args,
    bins: &Bins,
    devs: &[Device],
    rate: u32,
    run: usize,
) -> anyhow::Result<(Server, Api)> {
    let dir = args.work_dir.join(format!("broadcast-{rate}-{run}"));
    fresh_dir(&dir)?;
    let conf = dir.join("fleetgate.toml");
    std::fs::write(&conf, format!("[commands]\nbroadcast_per_sec = {rate}\n"))?;
    let mut bins = bins.clone();
    bins.gateway_env
        .push(("FLEETGATE_CONFIG".into(), conf.display().to_string()));
    let server = Server::fleetgate(&bins, &dir.join("data"), TOKEN, None).await?;
    let http = server.http.context("no http")?;
    let api = Api::new(http, TOKEN);
    api.provision(BROADCAST_PRODUCT, devs).await?;
    Ok((server, api))
}

/// The connected devices, each subscribed to its command topic and noting when each copy of
/// the broadcast arrives.
struct Receivers {
    tasks: Vec<JoinHandle<Received>>,
    stop: watch::Sender<bool>,
    subscribed: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    arrived: Arc<AtomicU64>,
}

impl Receivers {
    fn start(clients: Vec<Option<Connected>>, devs: &[Device], base: Instant) -> Receivers {
        let (stop, stop_rx) = watch::channel(false);
        let subscribed = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let arrived = Arc::new(AtomicU64::new(0));
        let tasks = clients
            .into_iter()
            .flatten()
            .zip(devs)
            .enumerate()
            .map(|(i, (c, d))| {
                let filter = format!("/{}/{}/user/cmd", d.product_key, d.device_name);
                let counters = (
                    Arc::clone(&subscribed),
                    Arc::clone(&dropped),
                    Arc::clone(&arrived),
                );
                tokio::spawn(receive(i, c, filter, stop_rx.clone(), base, counters))
            })
            .collect();
        Receivers {
            tasks,
            stop,
            subscribed,
            dropped,
            arrived,
        }
    }

    /// Waits up to 2 minutes for `n` subscriptions.
    async fn wait_subscribed(&self, n: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.subscribed.load(Ordering::Relaxed) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            self.subscribed.load(Ordering::Relaxed) == n,
            "broadcast: {} of {n} devices subscribed",
            self.subscribed.load(Ordering::Relaxed)
        );
        Ok(())
    }

    /// Deliveries still in flight after the last answer: waits until every message the API
    /// sent arrived, or nothing new arrived for 5 s (60 s before the first one: the router may
    /// hand them over well after the API answered).
    async fn wait_arrived(&self, api_sent: u64) {
        let mut last_count = 0;
        let mut quiet_since = Instant::now();
        loop {
            let got = self.arrived.load(Ordering::Relaxed);
            if got >= api_sent {
                break;
            }
            let patience = Duration::from_secs(if got == 0 { 60 } else { 5 });
            if got != last_count {
                last_count = got;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() > patience {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the devices: each device's first delivery (µs after `started_us`, sorted), the
    /// further copies, and the devices whose connection dropped.
    async fn finish(self, n: usize, started_us: u64) -> (Vec<u64>, u64, u64) {
        self.stop.send_replace(true);
        let mut times = Vec::with_capacity(n);
        let mut copies = vec![0u32; n];
        for t in self.tasks {
            for (i, at) in t.await.unwrap_or_default() {
                copies[i] += 1;
                if copies[i] == 1 {
                    times.push(at.saturating_sub(started_us));
                }
            }
        }
        times.sort_unstable();
        let duplicates = copies.iter().map(|&c| u64::from(c.saturating_sub(1))).sum();
        (times, duplicates, self.dropped.load(Ordering::Relaxed))
    }
}

/// Device `i`: subscribes to `filter` and notes each message's arrival (µs since `base`) until
/// stopped or its connection drops. Counters: (subscribed, dropped, arrived).
async fn receive(
    i: usize,
    c: Connected,
    filter: String,
    mut stop_rx: watch::Receiver<bool>,
    base: Instant,
    (subscribed, dropped, arrived): (Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>),
) -> Received {
    let Connected {
        client,
        mut eventloop,
    } = c;
    let mut got = Vec::new();
    if client.subscribe(filter, QoS::AtLeastOnce).await.is_err() {
        dropped.fetch_add(1, Ordering::Relaxed);
        return got;
    }
    loop {
        let event = tokio::select! {
            _ = stop_rx.wait_for(|s| *s) => return got,
            r = eventloop.poll() => r,
        };
        match event {
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                subscribed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::Publish(_))) => {
                got.push((i, base.elapsed().as_micros() as u64));
                arrived.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => {
                dropped.fetch_add(1, Ordering::Relaxed);
                return got;
            }
        }
    }
}

/// What the broadcast calls answered.
struct Answers {
    calls: usize,
    /// Results `sent`.
    sent: u64,
    /// Any other result, by result and error.
    other: BTreeMap<String, u64>,
}

/// Broadcasts to every device, at most [`MAX_BROADCAST`] names per call, all calls at once.
async fn call_all(api: &Api, devs: &[Device], qos: u8) -> anyhow::Result<Answers> {
    let calls: Vec<JoinHandle<anyhow::Result<Value>>> = devs
        .chunks(MAX_BROADCAST)
        .map(|chunk| {
            let api = api.clone();
            let names: Vec<&str> = chunk.iter().map(|d| d.device_name.as_str()).collect();
            let body = json!({
                "topic": "/{pk}/{dn}/user/cmd",
                "payload": "reboot-at-noon",
                "qos": qos,
                "device_names": names,
            });
            tokio::spawn(async move {
                api.post(
                    &format!("/api/v1/products/{BROADCAST_PRODUCT}/messages"),
                    &body,
                )
                .await
            })
        })
        .collect();
    let mut answers = Answers {
        calls: calls.len(),
        sent: 0,
        other: BTreeMap::new(),
    };
    for c in calls {
        let body = c.await.context("broadcast call task")??;
        for r in body["results"].as_array().context("no results")? {
            match r["result"].as_str() {
                Some("sent") => answers.sent += 1,
                other => {
                    let key = format!("{}: {}", other.unwrap_or("?"), r["error"]);
                    *answers.other.entry(key).or_insert(0) += 1;
                }
            }
        }
    }
    Ok(answers)
}

/// Deliveries per whole second since the first call (`times` sorted, µs).
fn per_second(times: &[u64], elapsed_s: f64) -> Vec<u64> {
    let mut v = vec![0u64; (elapsed_s.floor() as usize) + 1];
    for &t in times {
        v[(t / 1_000_000) as usize] += 1;
    }
    v
}

/// The delivery rate after the limiter's burst of `burst` (see [`BroadcastRow::steady_per_s`]);
/// `times` sorted, µs. `None` when too few deliveries follow the burst.
fn steady_rate(times: &[u64], burst: usize) -> Option<f64> {
    let rest = times.len().checked_sub(burst)?;
    if rest < 20 {
        return None;
    }
    let a = burst + rest / 20;
    let b = burst + rest * 19 / 20;
    let dt = (times[b] - times[a]) as f64 / 1e6;
    (dt > 0.0).then(|| (b - a) as f64 / dt)
}

/// The broadcast table (every run).
pub(crate) fn print_table(r: &Results) {
    if r.broadcast.is_empty() {
        return;
    }
    println!("\n## Broadcast (every run)\n");
    println!(
        "| run | devices | configured/s | calls | delivered | duplicates | s | delivered/s | \
         steady/s | steady % of configured | ideal s | API sent | gateway CPU µs/msg | load |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let opt = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.1}"));
    for b in &r.broadcast {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.0} | {} | {} | {:.2} | {} | {:.1} | {:.1}–{:.1} |",
            b.run,
            b.devices,
            b.configured_per_s,
            b.calls,
            b.delivered,
            b.duplicates,
            b.elapsed_s,
            b.delivered_per_s,
            opt(b.steady_per_s),
            opt(b.steady_accuracy_pct),
            b.ideal_s,
            b.api_sent,
            b.gateway_cpu_us_per_msg,
            b.load1_start,
            b.load1_end,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_rate_leaves_the_burst_out() {
        // A burst of 100 at t = 0, then one every 10 ms (100/s).
        let mut times = vec![0u64; 100];
        times.extend((1..=900).map(|i| i * 10_000));
        let r = steady_rate(&times, 100).expect("rate");
        assert!((r - 100.0).abs() < 0.5, "{r}");
        assert_eq!(steady_rate(&times[..110], 100), None);
    }
}
