//! `--parts rrpc`: synchronous RRPC round trips through the gateway's HTTP API, and the same
//! request/response between bare MQTT clients through stock rumqttd in the same run (see the
//! module docs of [`c2d`](super)): the responding devices, the two callers, the driver that
//! keeps a number of calls in flight, and the table.

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

/// The RRPC table (median of runs) and the gateway/bare ratios.
pub(crate) fn print_table(r: &Results) {
    if r.rrpc.is_empty() {
        return;
    }
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
