//! The cluster benchmark (`--parts cluster`, issue 16): three release `fleetgate serve` nodes
//! on this machine sharing a fresh PostgreSQL database and a cluster name of their own on the
//! local NATS server, behind an HAProxy with the configuration of `deploy/haproxy.cfg` (MQTT
//! balanced by a consistent hash of the CONNECT username, PROXY v2 headers to the nodes).
//!
//! 1. **Connections**: N devices through HAProxy onto the three nodes, then the same N straight
//!    to one node of the same cluster: connect rate, handshake p50/p99, and each node's RSS per
//!    1,000 of the devices it holds (over its idle baseline).
//! 2. **Ingest**: D devices × M QoS 1 version reports (each acknowledged only when durable)
//!    through HAProxy into the cluster on PostgreSQL, against one node on SQLite with the same
//!    load generator in the same run: msg/s, CPU µs per message per node, PostgreSQL commits/s.
//! 3. **Failover**: F devices connected to node 1, which is killed with SIGKILL; each device
//!    reconnects (a device SDK's server list: the other two nodes, alternating, with a short
//!    back-off). Time from the kill until every device has a CONNACK from a surviving node,
//!    then the registry checked through node 2's API: every device online, held by node 2 or 3.
//!
//! HAProxy holds two descriptors per connection: with the 20,000 open-files limit here it
//! proxies ~9,000 devices, which bounds N (the configuration's `maxconn`).

use crate::api::{devices, Api, Device};
use crate::loadgen::{self, ConnectStats, FloodStats, PayloadKind};
use crate::procs::{Bins, Server};
use crate::stats::{median, Latency};
use crate::{fresh_dir, load1, version_of, Args, Results, TOKEN};
use anyhow::{bail, ensure, Context};
use rumqttc::{Event, Packet};
use serde::Serialize;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

mod fleet;

pub use fleet::Fleet3;
use fleet::{start_node, wait_members, Database, Haproxy, Node, Services};

const PRODUCT: &str = "benchcluster";
/// Heartbeats and the dead-node timeout of the benchmark's nodes (the defaults are 1 s / 10 s).
const HEARTBEAT_MS: &str = "500";
const NODE_TIMEOUT_MS: &str = "5000";
/// HAProxy's source address towards the nodes, which trust its PROXY v2 headers
/// (`--mqtt-proxy-protocol trusted`: the direct paths connect from 127.0.0.1 without one).
const HAPROXY_SOURCE: &str = "127.0.0.3";
/// Devices one HAProxy process proxies in the cluster campaign (its `maxconn` is 9,000).
const DEVICES_PER_HAPROXY: usize = 8_000;

#[derive(Serialize, Clone)]
pub struct ClusterConnectRow {
    /// `haproxy → 3 nodes` or `node 1 direct`.
    pub path: String,
    pub run: usize,
    pub stats: ConnectStats,
    /// Per node: devices held, RSS over its idle baseline per 1,000 of them (MiB).
    pub nodes: Vec<NodeLoad>,
    pub load1: f64,
}

#[derive(Serialize, Clone)]
pub struct NodeLoad {
    pub node: u16,
    pub devices: u64,
    pub rss_kib: u64,
    pub baseline_rss_kib: u64,
    pub mib_per_1000_over_baseline: f64,
}

#[derive(Serialize, Clone)]
pub struct ClusterIngestRow {
    /// `cluster (3 nodes, PostgreSQL) via HAProxy` or `single node (SQLite)`.
    pub scenario: String,
    pub run: usize,
    pub flood: FloodStats,
    /// Reports the nodes counted as processed (sum over nodes).
    pub processed: u64,
    /// Per node: messages processed, CPU µs per message it processed.
    pub per_node: Vec<(u16, u64, f64)>,
    /// Gateway CPU (all nodes) per acknowledged message, µs.
    pub cpu_us_per_msg: f64,
    /// PostgreSQL transactions committed per second in the fleet's database (cluster only).
    pub pg_commits_per_s: Option<f64>,
    /// CPU µs per acknowledged message of the other processes on the machine during the flood:
    /// the load generator (this process), and for the cluster PostgreSQL (every `postgres`
    /// process), NATS and HAProxy. With the gateway's, where the machine's two cores went.
    #[serde(default)]
    pub others_cpu_us_per_msg: Vec<(String, f64)>,
    pub load1: f64,
}

/// The processes besides the gateway that a flood costs CPU in: (label, `comm`; `None` is this
/// process, the load generator).
const CLUSTER_OTHERS: [(&str, Option<&str>); 4] = [
    ("load generator", None),
    ("postgres", Some("postgres")),
    ("nats-server", Some("nats-server")),
    ("haproxy", Some("haproxy")),
];

/// CPU seconds (user + system) of every process whose `/proc/{pid}/stat` `comm` is `name`, or of
/// this process (`None`). Processes that ended in between are not counted (the nodes hold their
/// PostgreSQL connections for the whole run).
fn cpu_seconds(name: Option<&str>) -> f64 {
    let ticks = |stat: &str| -> Option<u64> {
        // Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    };
    let total: u64 = match name {
        None => std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| ticks(&s))
            .unwrap_or(0),
        Some(name) => std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
            .filter(|s| s.contains(&format!("({name})")))
            .filter_map(|s| ticks(&s))
            .sum(),
    };
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    total as f64 / hz
}

/// CPU µs per message of `others` between two [`cpu_seconds`] samples.
fn others_per_msg(
    others: &[(&str, Option<&str>)],
    before: &[f64],
    acked: u64,
) -> Vec<(String, f64)> {
    others
        .iter()
        .zip(before)
        .map(|((label, comm), b)| {
            (
                (*label).to_owned(),
                (cpu_seconds(*comm) - b) * 1e6 / acked.max(1) as f64,
            )
        })
        .collect()
}

#[derive(Serialize, Clone)]
pub struct FailoverRow {
    pub run: usize,
    pub devices: usize,
    /// Connected to node 1 before the kill.
    pub connected: usize,
    /// SIGKILL → the last device's CONNACK from node 2 or 3, seconds.
    pub all_reconnected_s: f64,
    /// Per-device time from the kill to its CONNACK.
    pub reconnect: Latency,
    /// Reconnect attempts refused or failed before success (sum over devices).
    pub failed_attempts: u64,
    /// SIGKILL → node 2 no longer lists node 1 (`node_timeout_ms`), seconds.
    pub node_declared_dead_s: f64,
    /// After the run: devices the registry (node 2's API) shows online on node 2 or 3.
    pub registry_online_on_survivors: usize,
    /// SIGKILL → node 2 or 3 drives the OTA and migration engines (lease expiry plus the
    /// takeover: every job, task and migration task read back, timers re-armed), seconds;
    /// `None` when node 1 did not hold the engines' lease.
    pub engines_taken_over_s: Option<f64>,
    pub load1: f64,
}

/// How many of the product's devices each node holds, as node 1's registry shows it.
async fn held_by(api: &Api) -> anyhow::Result<Vec<(u16, u64)>> {
    let items = api
        .all_items(
            &format!("/api/v1/products/{PRODUCT}/devices"),
            &[("online", "true".to_owned())],
        )
        .await?;
    let mut counts: Vec<(u16, u64)> = Vec::new();
    for d in items {
        let node = d["node"].as_u64().unwrap_or(0) as u16;
        match counts.iter_mut().find(|(n, _)| *n == node) {
            Some((_, c)) => *c += 1,
            None => counts.push((node, 1)),
        }
    }
    counts.sort();
    Ok(counts)
}

/// The node that says it drives the engines, as `api`'s node reports itself (`None`: not it).
async fn engines_driver(api: &Api) -> anyhow::Result<Option<u16>> {
    let view = api.get("/api/v1/cluster", &[]).await?;
    Ok(view["nodes"].as_array().and_then(|ns| {
        ns.iter()
            .find(|n| n["self"] == true && n["engines"] == true)
            .and_then(|n| n["node"].as_u64())
            .map(|id| id as u16)
    }))
}

/// How many of the product's devices node `api` counts online.
async fn online_count(api: &Api) -> anyhow::Result<usize> {
    let body = api
        .get(
            &format!("/api/v1/products/{PRODUCT}/devices"),
            &[("online", "true".into()), ("page_size", "1".into())],
        )
        .await?;
    Ok(body["total"].as_u64().unwrap_or(0) as usize)
}

/// Waits until node `api` counts `n` of the product's devices online.
async fn wait_online(api: &Api, n: usize, within: Duration) -> anyhow::Result<usize> {
    let deadline = Instant::now() + within;
    loop {
        let online = online_count(api).await?;
        if online >= n || Instant::now() > deadline {
            return Ok(online);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(args: &Args, bins: &Bins, results: &mut Results) -> anyhow::Result<()> {
    let svc = Services {
        pg_admin: args.pg_url.clone(),
        nats: args.nats_url.clone(),
        haproxy: args.haproxy.clone(),
        haproxy_threads: args.haproxy_threads,
        haproxy_global: args.haproxy_global.clone(),
        haproxy_defaults: args.haproxy_defaults.clone(),
    };
    let n_connect = args.cluster_connect_devices;
    let n_ingest = args.cluster_ingest_devices;
    let n_failover = args.failover_devices;
    let need = n_connect.max(n_ingest).max(n_failover);
    let all = devices(PRODUCT, need);
    for run in 1..=args.runs {
        let work = args.work_dir.join(format!("cluster-r{run}"));
        fresh_dir(&work)?;
        let db = Database::fresh(&svc.pg_admin).await?;
        let outcome = one_run(args, bins, &svc, &db, &work, &all, run, results).await;
        db.drop_now().await;
        outcome?;
    }
    // The single-node reference of the ingest comparison, in the same runs' conditions.
    for run in 1..=args.runs {
        let dir = args.work_dir.join(format!("cluster-single-r{run}"));
        let row = single_ingest(args, bins, &dir, &all[..n_ingest], run).await?;
        print_ingest(&row);
        results.cluster_ingest.push(row);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn one_run(
    args: &Args,
    bins: &Bins,
    svc: &Services,
    db: &Database,
    work: &Path,
    all: &[Device],
    run: usize,
    results: &mut Results,
) -> anyhow::Result<()> {
    let cluster = format!("bench{}r{run}", std::process::id());
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start_node(bins, work, db, svc, &cluster, id, &[]).await?);
    }
    wait_members(&nodes.iter().collect::<Vec<_>>()).await?;
    let t = Instant::now();
    nodes[0].api.provision(PRODUCT, all).await?;
    eprintln!(
        "cluster run {run}: provisioned {} devices through node 1 in {:.1} s",
        all.len(),
        t.elapsed().as_secs_f64()
    );
    // Every node has applied the batch (a write answers once the live nodes applied it).
    let haproxy = Haproxy::start(svc, work, &nodes.iter().collect::<Vec<_>>(), 0).await?;

    // 1. Connections through HAProxy, then straight to node 1.
    let n = args.cluster_connect_devices;
    for (path, target) in [
        ("haproxy → 3 nodes", haproxy.addr),
        ("node 1 direct", nodes[0].server.mqtt),
    ] {
        let baselines: Vec<u64> = nodes
            .iter()
            .map(|n| n.server.rss_kib())
            .collect::<anyhow::Result<_>>()?;
        let load = load1();
        let (stats, clients) =
            loadgen::connect_all(target, &all[..n], args.concurrency, args.window).await;
        let idle = loadgen::Idle::hold(clients.into_iter().flatten().map(|c| (c, None)).collect());
        wait_online(&nodes[0].api, stats.connected, Duration::from_secs(30)).await?;
        tokio::time::sleep(Duration::from_secs(args.settle_s)).await;
        let held = held_by(&nodes[0].api).await?;
        let mut loads = Vec::new();
        for (node, baseline) in nodes.iter().zip(baselines) {
            let devices = held
                .iter()
                .find(|(id, _)| *id == node.id)
                .map_or(0, |(_, c)| *c);
            let rss = node.server.rss_kib()?;
            loads.push(NodeLoad {
                node: node.id,
                devices,
                rss_kib: rss,
                baseline_rss_kib: baseline,
                mib_per_1000_over_baseline: if devices > 0 {
                    rss.saturating_sub(baseline) as f64 / 1024.0 / devices as f64 * 1000.0
                } else {
                    0.0
                },
            });
        }
        idle.close().await;
        let row = ClusterConnectRow {
            path: path.to_owned(),
            run,
            stats,
            nodes: loads,
            load1: load,
        };
        eprintln!(
            "cluster connect {:<18} n={n} run {run}: {:.0}/s p50 {:.1} ms p99 {:.1} ms failed {} {:?}; nodes {}",
            row.path,
            row.stats.rate_per_s,
            row.stats.handshake.p50_ms,
            row.stats.handshake.p99_ms,
            row.stats.failed,
            row.stats.errors,
            row.nodes
                .iter()
                .map(|l| format!(
                    "{}: {} devices {:.2} MiB/1000",
                    l.node, l.devices, l.mib_per_1000_over_baseline
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        results.cluster_connect.push(row);
        // Every device offline again before the next measurement.
        wait_offline(&nodes[0].api).await?;
    }

    // 2. Ingest through HAProxy, then with the devices straight on the nodes (as SDKs with a
    // server list connect; device i on node i mod 3).
    let direct: Vec<SocketAddr> = nodes.iter().map(|n| n.server.mqtt).collect();
    for via in [Via::Haproxy(haproxy.addr), Via::Direct(&direct)] {
        let row = cluster_ingest(
            args,
            &nodes,
            via,
            db,
            &all[..args.cluster_ingest_devices],
            run,
        )
        .await?;
        print_ingest(&row);
        results.cluster_ingest.push(row);
        wait_offline(&nodes[0].api).await?;
    }
    haproxy.stop().await;

    // 3. Failover of node 1 holding F devices.
    let row = failover(args, &mut nodes, &all[..args.failover_devices], run).await?;
    eprintln!(
        "cluster failover run {run}: {} devices, all reconnected {:.2} s after SIGKILL (p50 {:.0} ms, p99 {:.0} ms), \
         {} failed attempts; node 1 declared dead after {:.2} s; registry: {} online on nodes 2/3",
        row.connected,
        row.all_reconnected_s,
        row.reconnect.p50_ms,
        row.reconnect.p99_ms,
        row.failed_attempts,
        row.node_declared_dead_s,
        row.registry_online_on_survivors
    );
    results.failover.push(row);
    for n in nodes {
        n.server.stop().await?;
    }
    Ok(())
}

async fn wait_offline(api: &Api) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let online = online_count(api).await?;
        if online == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "devices still online a minute after disconnecting: {online}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn inform_messages(tag: &str, size: usize) -> loadgen::MessageFn {
    let tag = tag.to_owned();
    Arc::new(move |i, seq| {
        (
            format!("/ota/device/inform/{PRODUCT}/dev{i:05}"),
            loadgen::payload(PayloadKind::Inform, seq, &version_of(&tag, seq), size),
        )
    })
}

const INFORM: &str = "fleetgate_mqtt_messages_total{kind=\"inform\"}";

/// How the ingest's devices reach the cluster.
#[derive(Clone, Copy)]
enum Via<'a> {
    /// All through HAProxy (placed by the consistent hash of their usernames).
    Haproxy(SocketAddr),
    /// Device i straight to node `i mod n`.
    Direct(&'a [SocketAddr]),
}

async fn cluster_ingest(
    args: &Args,
    nodes: &[Node],
    via: Via<'_>,
    db: &Database,
    devs: &[Device],
    run: usize,
) -> anyhow::Result<ClusterIngestRow> {
    let load = load1();
    let (scenario, entries) = match via {
        Via::Haproxy(addr) => ("cluster (3 nodes, PostgreSQL) via HAProxy", vec![addr]),
        Via::Direct(addrs) => (
            "cluster (3 nodes, PostgreSQL) straight to the nodes",
            addrs.to_vec(),
        ),
    };
    // In device order: the flood's client i publishes as device i.
    let mut clients: Vec<Option<loadgen::Connected>> = devs.iter().map(|_| None).collect();
    for (k, entry) in entries.iter().enumerate() {
        let mine: Vec<usize> = (k..devs.len()).step_by(entries.len()).collect();
        let picked: Vec<Device> = mine.iter().map(|&i| devs[i].clone()).collect();
        let (cs, connected) =
            loadgen::connect_all(*entry, &picked, args.concurrency, args.window).await;
        ensure!(
            cs.failed == 0,
            "cluster ingest: {} devices failed to connect to {entry}: {:?}",
            cs.failed,
            cs.errors
        );
        for (i, c) in mine.into_iter().zip(connected) {
            clients[i] = c;
        }
    }
    let mut before = Vec::new();
    for n in nodes {
        before.push((n.api.metric(INFORM).await?, n.server.cpu_s()?));
    }
    let commits_before = db.commits().await?;
    let others_before: Vec<f64> = CLUSTER_OTHERS
        .iter()
        .map(|(_, c)| cpu_seconds(*c))
        .collect();
    let flood = loadgen::flood(
        clients.into_iter().flatten().collect(),
        args.cluster_ingest_messages,
        inform_messages(&format!("c{run}"), args.payload_bytes),
        Duration::from_secs(300),
    )
    .await;
    let others = others_per_msg(&CLUSTER_OTHERS, &others_before, flood.acked);
    let commits = db.commits().await? - commits_before;
    let mut per_node = Vec::new();
    let mut cpu_total = 0.0;
    for (n, (m0, c0)) in nodes.iter().zip(before) {
        let processed = (n.api.metric(INFORM).await? - m0) as u64;
        let cpu = n.server.cpu_s()? - c0;
        cpu_total += cpu;
        per_node.push((
            n.id,
            processed,
            if processed > 0 {
                cpu * 1e6 / processed as f64
            } else {
                0.0
            },
        ));
    }
    let processed = per_node.iter().map(|(_, p, _)| p).sum();
    Ok(ClusterIngestRow {
        scenario: scenario.into(),
        run,
        cpu_us_per_msg: cpu_total * 1e6 / flood.acked.max(1) as f64,
        pg_commits_per_s: Some(commits as f64 / flood.elapsed_s.max(1e-9)),
        others_cpu_us_per_msg: others,
        flood,
        processed,
        per_node,
        load1: load,
    })
}

async fn single_ingest(
    args: &Args,
    bins: &Bins,
    dir: &Path,
    devs: &[Device],
    run: usize,
) -> anyhow::Result<ClusterIngestRow> {
    fresh_dir(dir)?;
    let server = Server::fleetgate(bins, dir, TOKEN, None).await?;
    let api = Api::new(server.http.context("no http")?, TOKEN);
    api.provision(PRODUCT, devs).await?;
    let load = load1();
    let (cs, clients) =
        loadgen::connect_all(server.mqtt, devs, args.concurrency, args.window).await;
    ensure!(
        cs.failed == 0,
        "single ingest: {} devices failed to connect",
        cs.failed
    );
    let (m0, c0) = (api.metric(INFORM).await?, server.cpu_s()?);
    let single_others = &CLUSTER_OTHERS[..1];
    let others_before: Vec<f64> = single_others.iter().map(|(_, c)| cpu_seconds(*c)).collect();
    let flood = loadgen::flood(
        clients.into_iter().flatten().collect(),
        args.cluster_ingest_messages,
        inform_messages(&format!("s{run}"), args.payload_bytes),
        Duration::from_secs(300),
    )
    .await;
    let others = others_per_msg(single_others, &others_before, flood.acked);
    let processed = (api.metric(INFORM).await? - m0) as u64;
    let cpu = server.cpu_s()? - c0;
    server.stop().await?;
    Ok(ClusterIngestRow {
        scenario: "single node (SQLite)".into(),
        run,
        cpu_us_per_msg: cpu * 1e6 / flood.acked.max(1) as f64,
        pg_commits_per_s: None,
        others_cpu_us_per_msg: others,
        flood,
        processed,
        per_node: vec![(0, processed, cpu * 1e6 / processed.max(1) as f64)],
        load1: load,
    })
}

fn print_ingest(row: &ClusterIngestRow) {
    eprintln!(
        "cluster ingest {:<42} run {}: {:.0} msg/s, CPU {:.1} µs/msg (per node {:?}), PUBACK p50 {:.1} ms p99 {:.1} ms, \
         sent {} acked {} processed {}, PostgreSQL commits/s {:?}, others' CPU µs/msg {:?}",
        row.scenario,
        row.run,
        row.flood.acked_per_s,
        row.cpu_us_per_msg,
        row.per_node,
        row.flood.latency.p50_ms,
        row.flood.latency.p99_ms,
        row.flood.sent,
        row.flood.acked,
        row.processed,
        row.pg_commits_per_s.map(|c| c.round()),
        row.others_cpu_us_per_msg
            .iter()
            .map(|(p, us)| format!("{p} {us:.1}"))
            .collect::<Vec<_>>(),
    );
}

/// What one device of the failover run saw.
struct Reconnected {
    /// Kill → CONNACK from a survivor.
    after: Option<Duration>,
    failed_attempts: u64,
}

async fn failover(
    args: &Args,
    nodes: &mut [Node],
    devs: &[Device],
    run: usize,
) -> anyhow::Result<FailoverRow> {
    let load = load1();
    let first = nodes[0].server.mqtt;
    let survivors = [nodes[1].server.mqtt, nodes[2].server.mqtt];
    let (cs, clients) = loadgen::connect_all(first, devs, args.concurrency, 1).await;
    ensure!(
        cs.failed == 0,
        "failover: {} devices failed to connect to node 1: {:?}",
        cs.failed,
        cs.errors
    );
    wait_online(&nodes[1].api, devs.len(), Duration::from_secs(60)).await?;
    let (kill_tx, kill_rx) = tokio::sync::watch::channel::<Option<Instant>>(None);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let back = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(devs.len());
    for (i, (client, d)) in clients.into_iter().zip(devs).enumerate() {
        let mut c = client.context("connected")?;
        let d = d.clone();
        let kill_rx = kill_rx.clone();
        let mut stop_rx = stop_rx.clone();
        let back = Arc::clone(&back);
        tasks.push(tokio::spawn(async move {
            // Held on node 1 until its connection breaks.
            loop {
                tokio::select! {
                    _ = stop_rx.wait_for(|s| *s) => return Reconnected { after: None, failed_attempts: 0 },
                    r = c.eventloop.poll() => if r.is_err() { break },
                }
            }
            drop(c);
            let mut failed_attempts = 0;
            let mut attempt = 0usize;
            loop {
                let addr = survivors[(i + attempt) % 2];
                attempt += 1;
                match loadgen::connect_one(loadgen::options(addr, &d, 1)).await {
                    Ok(mut again) => {
                        let after = (*kill_rx.borrow()).map(|k| k.elapsed());
                        back.fetch_add(1, Ordering::Relaxed);
                        // Stay connected (pings answered) until the run ends.
                        loop {
                            tokio::select! {
                                _ = stop_rx.wait_for(|s| *s) => break,
                                r = again.eventloop.poll() => if let Ok(Event::Incoming(Packet::Disconnect)) | Err(_) = r { break },
                            }
                        }
                        return Reconnected { after, failed_attempts };
                    }
                    Err(_) => {
                        failed_attempts += 1;
                        // A device SDK's back-off: short, growing, jittered.
                        let ms = (100 * attempt as u64).min(1000) + (i as u64 % 97);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.settle_s)).await;
    let drove_engines = engines_driver(&nodes[0].api).await? == Some(1);
    // SIGKILL node 1.
    let killed = Instant::now();
    kill_tx.send_replace(Some(killed));
    let pid = nodes[0].server.pid()?;
    crate::procs::signal(pid, libc::SIGKILL);
    // Node 2 declares node 1 dead after node_timeout_ms.
    let dead_after = loop {
        let view = nodes[1].api.get("/api/v1/cluster", &[]).await?;
        let listed = view["nodes"]
            .as_array()
            .is_some_and(|ns| ns.iter().any(|n| n["node"] == 1));
        if !listed {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("node 2 still lists node 1 a minute after its SIGKILL");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Another node drives the engines (node 1 held the lease).
    let mut engines_taken_over_s = None;
    if drove_engines {
        loop {
            let mut now_at = None;
            for node in &nodes[1..] {
                now_at = now_at.or(engines_driver(&node.api).await?.filter(|&id| id != 1));
            }
            if now_at.is_some() {
                engines_taken_over_s = Some(killed.elapsed().as_secs_f64());
                break;
            }
            if killed.elapsed() > Duration::from_secs(60) {
                bail!("no node drives the engines a minute after node 1's SIGKILL");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Every device back, as the devices see it (bounded by the run's patience).
    let deadline = Instant::now() + Duration::from_secs(120);
    while back.load(Ordering::Relaxed) < devs.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The registry: node 1's sessions released or taken over, every device held by 2 or 3.
    wait_online(&nodes[1].api, devs.len(), Duration::from_secs(30)).await?;
    let held = held_by(&nodes[1].api).await?;
    let on_survivors = held
        .iter()
        .filter(|(n, _)| *n == 2 || *n == 3)
        .map(|(_, c)| *c as usize)
        .sum();
    stop_tx.send_replace(true);
    let mut samples = Vec::new();
    let mut failed_attempts = 0;
    let mut never = 0;
    for t in tasks {
        let r = t.await.context("device task")?;
        failed_attempts += r.failed_attempts;
        match r.after {
            Some(after) => samples.push(u32::try_from(after.as_micros()).unwrap_or(u32::MAX)),
            None => never += 1,
        }
    }
    ensure!(never == 0, "failover: {never} devices never reconnected");
    let all = samples.iter().copied().max().unwrap_or(0) as f64 / 1e6;
    Ok(FailoverRow {
        run,
        devices: devs.len(),
        connected: cs.connected,
        all_reconnected_s: all,
        reconnect: Latency::from_micros(&mut samples),
        failed_attempts,
        node_declared_dead_s: dead_after.as_secs_f64(),
        registry_online_on_survivors: on_survivors,
        engines_taken_over_s,
        load1: load,
    })
}

pub fn print_report(args: &Args, r: &Results) {
    if r.cluster_connect.is_empty() && r.cluster_ingest.is_empty() && r.failover.is_empty() {
        return;
    }
    println!("\n## Cluster: connections (median of {} runs)\n", args.runs);
    println!("| path | clients | connected | connects/s | handshake p50 ms | p99 ms | devices per node | MiB/1000 over baseline per node | load |");
    println!("|---|---:|---:|---:|---:|---:|---|---|---:|");
    for path in ["haproxy → 3 nodes", "node 1 direct"] {
        let rows: Vec<&ClusterConnectRow> = r
            .cluster_connect
            .iter()
            .filter(|c| c.path == path)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let med = |f: &dyn Fn(&ClusterConnectRow) -> f64| median(rows.iter().map(|c| f(c)));
        let last = rows[rows.len() - 1];
        println!(
            "| {path} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {} | {:.1} |",
            last.stats.attempted,
            med(&|c| c.stats.connected as f64),
            med(&|c| c.stats.rate_per_s),
            med(&|c| c.stats.handshake.p50_ms),
            med(&|c| c.stats.handshake.p99_ms),
            last.nodes
                .iter()
                .map(|l| format!("{}: {}", l.node, l.devices))
                .collect::<Vec<_>>()
                .join(", "),
            last.nodes
                .iter()
                .filter(|l| l.devices > 0)
                .map(|l| format!("{}: {:.2}", l.node, l.mib_per_1000_over_baseline))
                .collect::<Vec<_>>()
                .join(", "),
            med(&|c| c.load1),
        );
    }
    println!(
        "\n## Cluster: ingest of version reports (median of {} runs)\n",
        args.runs
    );
    println!("| scenario | msg/s | gateway CPU µs/msg (all nodes) | others' CPU µs/msg | PUBACK p50 ms | p99 ms | acked | processed | PostgreSQL commits/s | load |");
    println!("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    for s in [
        "cluster (3 nodes, PostgreSQL) via HAProxy",
        "single node (SQLite)",
    ] {
        let rows: Vec<&ClusterIngestRow> = r
            .cluster_ingest
            .iter()
            .filter(|c| c.scenario == s)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let med = |f: &dyn Fn(&ClusterIngestRow) -> f64| median(rows.iter().map(|c| f(c)));
        let others = rows[0]
            .others_cpu_us_per_msg
            .iter()
            .enumerate()
            .map(|(i, (p, _))| {
                let us = median(
                    rows.iter()
                        .filter_map(|c| c.others_cpu_us_per_msg.get(i).map(|o| o.1)),
                );
                format!("{p} {us:.1}")
            })
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {s} | {:.0} | {:.1} | {others} | {:.1} | {:.1} | {:.0} | {:.0} | {} | {:.1} |",
            med(&|c| c.flood.acked_per_s),
            med(&|c| c.cpu_us_per_msg),
            med(&|c| c.flood.latency.p50_ms),
            med(&|c| c.flood.latency.p99_ms),
            med(&|c| c.flood.acked as f64),
            med(&|c| c.processed as f64),
            if rows[0].pg_commits_per_s.is_some() {
                format!("{:.0}", med(&|c| c.pg_commits_per_s.unwrap_or(0.0)))
            } else {
                "—".into()
            },
            med(&|c| c.load1),
        );
    }
    println!("\n## Cluster: failover (median of {} runs)\n", args.runs);
    println!("| devices on the killed node | all reconnected after SIGKILL, s | per-device p50 ms | p99 ms | node declared dead after, s | engines driven elsewhere after, s | failed attempts | online on nodes 2/3 after | load |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    if !r.failover.is_empty() {
        let rows = &r.failover;
        let med = |f: &dyn Fn(&FailoverRow) -> f64| median(rows.iter().map(f));
        println!(
            "| {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {} | {:.0} | {:.0} | {:.1} |",
            med(&|c| c.connected as f64),
            med(&|c| c.all_reconnected_s),
            med(&|c| c.reconnect.p50_ms),
            med(&|c| c.reconnect.p99_ms),
            med(&|c| c.node_declared_dead_s),
            if rows.iter().any(|c| c.engines_taken_over_s.is_some()) {
                format!(
                    "{:.2}",
                    median(rows.iter().filter_map(|c| c.engines_taken_over_s))
                )
            } else {
                "n/a (node 1 did not drive them)".to_owned()
            },
            med(&|c| c.failed_attempts as f64),
            med(&|c| c.registry_online_on_survivors as f64),
            med(&|c| c.load1),
        );
    }
}
