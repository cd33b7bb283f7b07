//! Cloud-to-device benchmarks (issue 20, docs/COMMANDS.md).
//!
//! - **RRPC** (`--parts rrpc`): synchronous RRPC round trips through the gateway's HTTP API
//!   (`POST …/devices/{dn}/rrpc`) to `--rrpc-devices` connected devices that answer every
//!   request on its response topic, `--rrpc-concurrency` calls in flight, round robin over the
//!   devices. Next to it, in the same run, the same request/response between bare MQTT
//!   clients through stock rumqttd: one requester (QoS 0 requests on
//!   `/sys/{pk}/{dn}/rrpc/request/{id}`, one wildcard subscription to the responses, the same
//!   number of calls in flight) and the same responders. Calls/s, latency, and the CPU time of
//!   the broker process (and of this process: devices and caller) per call.
//! - **Broadcast** (`--parts broadcast`): `--broadcast-devices` connected devices subscribed
//!   to their `/{pk}/{dn}/user/cmd`; the operator API's broadcast (≤ 1,000 device names per
//!   call, so several calls, all in flight at once and sharing the gateway's limiter) at each
//!   `--broadcast-rates` (`[commands] broadcast_per_sec`). Delivered/s measured at the
//!   devices, and the observed rate against the configured one.
//!
//! The devices are rumqttc clients in this process (one descriptor each); the gateway is its
//! own process (one descriptor per device there), so 10,000 devices stay below a 20,000
//! open-files limit on both sides.

use crate::api::{devices, Api, Device};
use crate::loadgen::{self, Connected};
use crate::procs::{self, Bins, Server};
use crate::stats::{median, Latency};
use crate::{fresh_dir, load1, Args, Results, TOKEN};
use anyhow::{ensure, Context};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

const RRPC_PRODUCT: &str = "benchrrpc";
const BROADCAST_PRODUCT: &str = "benchcast";
/// The API's limit of device names per broadcast.
const MAX_BROADCAST: usize = 1000;
/// Each call's wait for the device (the API's default).
const RRPC_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) const GATEWAY: &str = "fleetgate HTTP API → device";
pub(crate) const BARE: &str = "bare rumqttd: requester ↔ device";

/// One RRPC measurement.
#[derive(Serialize, Clone)]
pub(crate) struct RrpcRow {
    pub path: String,
    pub run: usize,
    pub devices: usize,
    pub concurrency: usize,
    /// Calls measured (after one warm-up call per device).
    pub calls: u64,
    /// Calls answered with the device's response (checked byte for byte).
    pub ok: u64,
    pub failed: u64,
    pub errors: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    pub calls_per_s: f64,
    /// Caller's view: request sent → response read.
    pub latency: Latency,
    /// The broker process (gateway or rumqttd), user + system CPU per measured call.
    pub broker_cpu_us_per_call: f64,
    /// This process (the devices and the caller) per measured call.
    pub bench_cpu_us_per_call: f64,
    pub broker_rss_kib: u64,
    pub load1: f64,
}

/// One broadcast measurement.
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

/// `--parts rrpc`: the gateway, then bare rumqttd, `--runs` times.
pub(crate) async fn rrpc(args: &Args, bins: &Bins, results: &mut Results) -> anyhow::Result<()> {
    let n = args.rrpc_devices;
    let devs = devices(RRPC_PRODUCT, n);
    for run in 1..=args.runs {
        let row = rrpc_gateway(args, bins, &devs, run).await?;
        print_rrpc_row(&row);
        results.rrpc.push(row);
        let row = rrpc_bare(args, bins, &devs, run).await?;
        print_rrpc_row(&row);
        results.rrpc.push(row);
    }
    Ok(())
}

fn print_rrpc_row(r: &RrpcRow) {
    eprintln!(
        "rrpc {:<36} run {}: {:>7.0} calls/s, p50 {:.2} ms p99 {:.2} ms, ok {} failed {} {:?}, \
         broker CPU {:.1} µs/call, bench CPU {:.1} µs/call, load {:.1}",
        r.path,
        r.run,
        r.calls_per_s,
        r.latency.p50_ms,
        r.latency.p99_ms,
        r.ok,
        r.failed,
        r.errors,
        r.broker_cpu_us_per_call,
        r.bench_cpu_us_per_call,
        r.load1,
    );
}

/// The filter a device subscribes to for RRPC requests.
fn rrpc_filter(d: &Device) -> String {
    format!("/sys/{}/{}/rrpc/request/+", d.product_key, d.device_name)
}

/// Connects every device and makes it answer RRPC requests; fails unless all subscribed.
async fn responders(
    args: &Args,
    broker: SocketAddr,
    devs: &[Device],
) -> anyhow::Result<Responders> {
    let (cs, clients) = loadgen::connect_all(broker, devs, args.concurrency, args.window).await;
    ensure!(
        cs.failed == 0,
        "rrpc: {} of {} devices failed to connect: {:?}",
        cs.failed,
        devs.len(),
        cs.errors
    );
    let clients = clients
        .into_iter()
        .zip(devs)
        .filter_map(|(c, d)| c.map(|c| (c, rrpc_filter(d))))
        .collect();
    let r = Responders::start(clients);
    let n = devs.len() as u64;
    let got = r.wait_subscribed(n, Duration::from_secs(60)).await;
    ensure!(got == n, "rrpc: {got} of {n} devices subscribed");
    Ok(r)
}

async fn rrpc_gateway(
    args: &Args,
    bins: &Bins,
    devs: &[Device],
    run: usize,
) -> anyhow::Result<RrpcRow> {
    let dir = args.work_dir.join(format!("rrpc-{run}"));
    fresh_dir(&dir)?;
    let server = Server::fleetgate(bins, &dir, TOKEN, None).await?;
    let http = server.http.context("no http")?;
    let api = Api::new(http, TOKEN);
    api.provision(RRPC_PRODUCT, devs).await?;
    let resp = responders(args, server.mqtt, devs).await?;
    let caller = HttpCaller::new(http, args.rrpc_concurrency);
    let caller = Arc::new(caller);
    let call = {
        let caller = Arc::clone(&caller);
        move |d: Device, k: usize| {
            let caller = Arc::clone(&caller);
            async move { caller.call(&d, k).await }
        }
    };
    let (warm_ok, row) = warm_then_measure(args, devs, &server, GATEWAY, run, call).await?;
    let replied = api
        .metric("fleetgate_downlinks_total{kind=\"rrpc\",outcome=\"replied\"}")
        .await?;
    resp.close().await;
    server.stop().await?;
    ensure!(
        replied as u64 >= row.ok + warm_ok,
        "the gateway counted {replied} RRPC replies, the caller {}",
        row.ok + warm_ok
    );
    Ok(row)
}

async fn rrpc_bare(
    args: &Args,
    bins: &Bins,
    devs: &[Device],
    run: usize,
) -> anyhow::Result<RrpcRow> {
    let server = Server::rumqttd(&bins.rumqttd).await?;
    let resp = responders(args, server.mqtt, devs).await?;
    let requester = Arc::new(MqttCaller::connect(server.mqtt, args.rrpc_concurrency).await?);
    let call = {
        let requester = Arc::clone(&requester);
        move |d: Device, k: usize| {
            let requester = Arc::clone(&requester);
            async move { requester.call(&d, k).await }
        }
    };
    let (_, row) = warm_then_measure(args, devs, &server, BARE, run, call).await?;
    requester.close();
    resp.close().await;
    server.stop().await?;
    Ok(row)
}

/// One path's calls: the warm-up (one call per device: connections, the router's first delivery
/// to each; every one must be answered), then the measured calls, with the broker's and this
/// process's CPU over them and the broker's RSS after. Returns the warm-up's answered calls and
/// the measured row.
async fn warm_then_measure<F, Fut>(
    args: &Args,
    devs: &[Device],
    server: &Server,
    path: &str,
    run: usize,
    call: F,
) -> anyhow::Result<(u64, RrpcRow)>
where
    F: Fn(Device, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let load = load1();
    let warm = drive(devs, devs.len(), args.rrpc_concurrency, 0, call.clone()).await;
    ensure!(
        warm.ok == devs.len() as u64,
        "rrpc warm-up ({path}): {} of {} answered: {:?}",
        warm.ok,
        devs.len(),
        warm.errors
    );
    let (broker_cpu, bench_cpu) = (server.cpu_s()?, procs::self_cpu_s()?);
    let out = drive(
        devs,
        args.rrpc_calls,
        args.rrpc_concurrency,
        devs.len(),
        call,
    )
    .await;
    let broker_cpu = server.cpu_s()? - broker_cpu;
    let bench_cpu = procs::self_cpu_s()? - bench_cpu;
    let rss = server.rss_kib()?;
    let row = out.row(
        path,
        run,
        devs.len(),
        args,
        broker_cpu,
        bench_cpu,
        rss,
        load,
    );
    Ok((warm.ok, row))
}

/// The request payload of call `k` and the answer the device gives to it.
fn ping(k: usize) -> (String, String) {
    let request = format!("ping-{k}");
    let answer = format!("pong:{request}");
    (request, answer)
}

/// Calls through the operator API.
struct HttpCaller {
    base: String,
    http: reqwest::Client,
}

impl HttpCaller {
    fn new(http: SocketAddr, concurrency: usize) -> HttpCaller {
        HttpCaller {
            base: format!("http://{http}"),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(concurrency)
                .build()
                .unwrap_or_default(),
        }
    }

    async fn call(&self, d: &Device, k: usize) -> Result<(), String> {
        let (request, answer) = ping(k);
        let resp = self
            .http
            .post(format!(
                "{}/api/v1/products/{}/devices/{}/rrpc",
                self.base, d.product_key, d.device_name
            ))
            .bearer_auth(TOKEN)
            .json(&json!({"payload": request, "timeout_ms": RRPC_TIMEOUT.as_millis() as u64}))
            .send()
            .await
            .map_err(|e| format!("http: {}", short(&e.to_string())))?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| format!("body: {}", short(&e.to_string())))?;
        if !status.is_success() {
            return Err(format!("{status} {}", body["error_code"]));
        }
        if body["payload_text"].as_str() != Some(answer.as_str()) {
            return Err("wrong answer".into());
        }
        Ok(())
    }
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

/// The bare requester: one MQTT client, requests correlated by the topic's last segment.
struct MqttCaller {
    client: AsyncClient,
    pending: Pending,
    task: JoinHandle<()>,
}

impl MqttCaller {
    async fn connect(broker: SocketAddr, concurrency: usize) -> anyhow::Result<MqttCaller> {
        let mut o = MqttOptions::new(
            "bench-rrpc-requester",
            broker.ip().to_string(),
            broker.port(),
        );
        o.set_keep_alive(Duration::from_secs(120))
            .set_request_channel_capacity(concurrency.max(1) * 4)
            .set_max_packet_size(64 * 1024, 64 * 1024);
        let Connected {
            client,
            mut eventloop,
        } = loadgen::connect_one(o).await.map_err(anyhow::Error::msg)?;
        client
            .subscribe(
                format!("/sys/{RRPC_PRODUCT}/+/rrpc/response/+"),
                QoS::AtMostOnce,
            )
            .await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => anyhow::bail!("requester: {e}"),
                Err(_) => anyhow::bail!("requester: no SUBACK in 10 s"),
            }
        }
        let pending: Pending = Arc::default();
        let task = tokio::spawn({
            let pending = Arc::clone(&pending);
            async move {
                while let Ok(event) = eventloop.poll().await {
                    let Event::Incoming(Packet::Publish(p)) = event else {
                        continue;
                    };
                    let id = p.topic.rsplit('/').next().unwrap_or_default();
                    let waiter = pending.lock().ok().and_then(|mut m| m.remove(id));
                    if let Some(tx) = waiter {
                        let _ = tx.send(p.payload.to_vec());
                    }
                }
            }
        });
        Ok(MqttCaller {
            client,
            pending,
            task,
        })
    }

    async fn call(&self, d: &Device, k: usize) -> Result<(), String> {
        let (request, answer) = ping(k);
        let id = k.to_string();
        let (tx, rx) = oneshot::channel();
        if let Ok(mut m) = self.pending.lock() {
            m.insert(id.clone(), tx);
        }
        let topic = format!("/sys/{}/{}/rrpc/request/{id}", d.product_key, d.device_name);
        if let Err(e) = self
            .client
            .publish(topic, QoS::AtMostOnce, false, request.into_bytes())
            .await
        {
            return Err(format!("publish: {}", short(&e.to_string())));
        }
        match tokio::time::timeout(RRPC_TIMEOUT, rx).await {
            Ok(Ok(payload)) if payload == answer.as_bytes() => Ok(()),
            Ok(Ok(_)) => Err("wrong answer".into()),
            _ => {
                if let Ok(mut m) = self.pending.lock() {
                    m.remove(&id);
                }
                Err("timeout".into())
            }
        }
    }

    fn close(&self) {
        self.task.abort();
    }
}

fn short(e: &str) -> String {
    e.chars().take(60).collect()
}

/// What [`drive`] measured.
struct Driven {
    calls: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    elapsed_s: f64,
    latencies: Vec<u32>,
}

impl Driven {
    #[allow(clippy::too_many_arguments)]
    fn row(
        mut self,
        path: &str,
        run: usize,
        devices: usize,
        args: &Args,
        broker_cpu_s: f64,
        bench_cpu_s: f64,
        rss: u64,
        load: f64,
    ) -> RrpcRow {
        let per_call = |cpu: f64| cpu * 1e6 / (self.calls.max(1) as f64);
        RrpcRow {
            path: path.to_owned(),
            run,
            devices,
            concurrency: args.rrpc_concurrency,
            calls: self.calls,
            ok: self.ok,
            failed: self.calls - self.ok,
            errors: std::mem::take(&mut self.errors),
            elapsed_s: self.elapsed_s,
            calls_per_s: if self.elapsed_s > 0.0 {
                self.ok as f64 / self.elapsed_s
            } else {
                0.0
            },
            latency: Latency::from_micros(&mut self.latencies),
            broker_cpu_us_per_call: per_call(broker_cpu_s),
            bench_cpu_us_per_call: per_call(bench_cpu_s),
            broker_rss_kib: rss,
            load1: load,
        }
    }
}

/// `calls` calls, `concurrency` at a time; call `k` (numbered from `first`) goes to device
/// `k mod devices`.
async fn drive<F, Fut>(
    devs: &[Device],
    calls: usize,
    concurrency: usize,
    first: usize,
    call: F,
) -> Driven
where
    F: Fn(Device, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let devs: Arc<Vec<Device>> = Arc::new(devs.to_vec());
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (next, devs, call) = (Arc::clone(&next), Arc::clone(&devs), call.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors: BTreeMap<String, u64> = BTreeMap::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= calls {
                        break;
                    }
                    let k = first + i;
                    let d = devs[k % devs.len()].clone();
                    let t = Instant::now();
                    match call(d, k).await {
                        Ok(()) => latencies
                            .push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX)),
                        Err(e) => *errors.entry(e).or_insert(0) += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut out = Driven {
        calls: calls as u64,
        ok: 0,
        errors: BTreeMap::new(),
        elapsed_s: 0.0,
        latencies: Vec::with_capacity(calls),
    };
    for w in workers {
        match w.await {
            Ok((latencies, errors)) => {
                out.latencies.extend(latencies);
                for (e, n) in errors {
                    *out.errors.entry(e).or_insert(0) += n;
                }
            }
            Err(_) => *out.errors.entry("worker panicked".into()).or_insert(0) += 1,
        }
    }
    out.elapsed_s = started.elapsed().as_secs_f64();
    out.ok = out.latencies.len() as u64;
    out
}

/// Devices answering RRPC requests (see [`responders`]).
struct Responders {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    subscribed: Arc<AtomicU64>,
}

impl Responders {
    fn start(clients: Vec<(Connected, String)>) -> Responders {
        let (stop, stop_rx) = watch::channel(false);
        let subscribed = Arc::new(AtomicU64::new(0));
        let tasks = clients
            .into_iter()
            .map(|(c, filter)| {
                let mut stop_rx = stop_rx.clone();
                let subscribed = Arc::clone(&subscribed);
                tokio::spawn(async move {
                    let Connected {
                        client,
                        mut eventloop,
                    } = c;
                    if client.subscribe(filter, QoS::AtMostOnce).await.is_err() {
                        return;
                    }
                    loop {
                        let event = tokio::select! {
                            _ = stop_rx.wait_for(|s| *s) => return,
                            r = eventloop.poll() => r,
                        };
                        match event {
                            Ok(Event::Incoming(Packet::SubAck(_))) => {
                                subscribed.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Event::Incoming(Packet::Publish(p))) => {
                                if !p.topic.contains("/rrpc/request/") {
                                    continue;
                                }
                                let topic =
                                    p.topic.replacen("/rrpc/request/", "/rrpc/response/", 1);
                                let mut body = b"pong:".to_vec();
                                body.extend_from_slice(&p.payload);
                                // The request channel holds several; one request at a time
                                // is in flight per device here.
                                let _ = client.try_publish(topic, QoS::AtMostOnce, false, body);
                            }
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        Responders {
            stop,
            tasks,
            subscribed,
        }
    }

    async fn wait_subscribed(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.subscribed.load(Ordering::Relaxed);
            if got >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn close(self) {
        self.stop.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
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
    let (stop, stop_rx) = watch::channel(false);
    let subscribed = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let arrived = Arc::new(AtomicU64::new(0));
    let tasks: Vec<JoinHandle<Received>> = clients
        .into_iter()
        .flatten()
        .zip(devs)
        .enumerate()
        .map(|(i, (c, d))| {
            let filter = format!("/{}/{}/user/cmd", d.product_key, d.device_name);
            let mut stop_rx = stop_rx.clone();
            let (subscribed, dropped, arrived) = (
                Arc::clone(&subscribed),
                Arc::clone(&dropped),
                Arc::clone(&arrived),
            );
            tokio::spawn(async move {
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
            })
        })
        .collect();
    let n = devs.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while subscribed.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        subscribed.load(Ordering::Relaxed) == n,
        "broadcast: {} of {n} devices subscribed",
        subscribed.load(Ordering::Relaxed)
    );

    // Every call at once: they share the gateway's limiter, as concurrent operators would.
    let cpu_before = server.cpu_s()?;
    let started_us = base.elapsed().as_micros() as u64;
    let calls: Vec<JoinHandle<anyhow::Result<Value>>> = devs
        .chunks(MAX_BROADCAST)
        .map(|chunk| {
            let api = api.clone();
            let names: Vec<&str> = chunk.iter().map(|d| d.device_name.as_str()).collect();
            let body = json!({
                "topic": "/{pk}/{dn}/user/cmd",
                "payload": "reboot-at-noon",
                "qos": args.broadcast_qos,
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
    let n_calls = calls.len();
    let mut api_sent = 0;
    let mut api_other: BTreeMap<String, u64> = BTreeMap::new();
    for c in calls {
        let body = c.await.context("broadcast call task")??;
        for r in body["results"].as_array().context("no results")? {
            match r["result"].as_str() {
                Some("sent") => api_sent += 1,
                other => {
                    let key = format!("{}: {}", other.unwrap_or("?"), r["error"]);
                    *api_other.entry(key).or_insert(0) += 1;
                }
            }
        }
    }
    let calls_s = (base.elapsed().as_micros() as u64 - started_us) as f64 / 1e6;
    // Deliveries still in flight after the last answer: wait until every message the API
    // sent arrived, or nothing new arrived for 5 s (60 s before the first one: the router may
    // hand them over well after the API answered).
    let mut last_count = 0;
    let mut quiet_since = Instant::now();
    loop {
        let got = arrived.load(Ordering::Relaxed);
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
    let cpu = server.cpu_s()? - cpu_before;
    let rss = server.rss_kib()?;
    stop.send_replace(true);
    let mut times = Vec::with_capacity(devs.len());
    let mut copies = vec![0u32; devs.len()];
    for t in tasks {
        for (i, at) in t.await.unwrap_or_default() {
            copies[i] += 1;
            if copies[i] == 1 {
                times.push(at.saturating_sub(started_us));
            }
        }
    }
    server.stop().await?;
    times.sort_unstable();
    let delivered = times.len() as u64;
    let duplicates = copies.iter().map(|&c| u64::from(c.saturating_sub(1))).sum();
    let elapsed_s = times.last().map_or(0.0, |&t| t as f64 / 1e6);
    let per_second = {
        let mut v = vec![0u64; (elapsed_s.floor() as usize) + 1];
        for &t in &times {
            v[(t / 1_000_000) as usize] += 1;
        }
        v
    };
    let steady_per_s = steady_rate(&times, rate as usize);
    let ideal_s = devs.len().saturating_sub(rate as usize) as f64 / f64::from(rate);
    Ok(BroadcastRow {
        run,
        devices: devs.len(),
        configured_per_s: rate,
        calls: n_calls,
        qos: args.broadcast_qos,
        connect,
        api_sent,
        api_other,
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
        ideal_s,
        per_second,
        gateway_cpu_us_per_msg: cpu * 1e6 / (api_sent.max(1) as f64),
        gateway_rss_kib: rss,
        dropped_devices: dropped.load(Ordering::Relaxed),
        load1_start,
        load1_end: load1(),
    })
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

/// The tables of the two parts.
pub(crate) fn print_report(r: &Results) {
    if !r.rrpc.is_empty() {
        println!("\n## Synchronous RRPC round trips (median of runs)\n");
        println!(
            "| path | devices | in flight | calls | calls/s | p50 ms | p99 ms | failed | \
             broker CPU µs/call | bench CPU µs/call | load |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut rates = Vec::new();
        for path in [GATEWAY, BARE] {
            let rows: Vec<&RrpcRow> = r.rrpc.iter().filter(|x| x.path == path).collect();
            let Some(first) = rows.first() else { continue };
            let med = |f: &dyn Fn(&RrpcRow) -> f64| median(rows.iter().map(|x| f(x)));
            let (rate, cpu) = (med(&|x| x.calls_per_s), med(&|x| x.broker_cpu_us_per_call));
            rates.push((rate, cpu, med(&|x| x.latency.p50_ms)));
            println!(
                "| {path} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {} | {:.1} | {:.1} | {:.1} |",
                first.devices,
                first.concurrency,
                first.calls,
                rate,
                med(&|x| x.latency.p50_ms),
                med(&|x| x.latency.p99_ms),
                rows.iter().map(|x| x.failed).sum::<u64>(),
                cpu,
                med(&|x| x.bench_cpu_us_per_call),
                med(&|x| x.load1),
            );
        }
        if let [(g, gc, gl), (b, bc, bl)] = rates[..] {
            println!(
                "\ngateway / bare: calls/s {:.0}%, p50 latency ×{:.2}, broker CPU per call ×{:.2}",
                g * 100.0 / b,
                gl / bl,
                gc / bc
            );
        }
    }
    if !r.broadcast.is_empty() {
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
