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
use crate::loadgen::{self, ConnectStats};
use crate::procs::{Bins, Server};
use crate::stats::median;
use crate::{fresh_dir, load1, Args, Results, TOKEN};
use anyhow::{ensure, Context};
use serde::Serialize;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

mod failover;
mod fleet;
mod ingest;

use failover::failover;
pub use failover::FailoverRow;
pub use fleet::Fleet3;
use fleet::{start_node, wait_members, Database, Haproxy, Node, Services};
pub use ingest::ClusterIngestRow;
use ingest::{cluster_ingest, print_ingest, single_ingest, Via};

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
        nodes.push(start_node(bins, work, db, svc, &cluster, id, &args.cluster_node_arg).await?);
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
    connects(args, &nodes, haproxy.addr, all, run, results).await?;

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
    print_failover(&row);
    results.failover.push(row);
    for n in nodes {
        n.server.stop().await?;
    }
    Ok(())
}

/// Part 1: `cluster_connect_devices` devices through HAProxy (`haproxy`), then straight to
/// node 1: the connect rates and each node's memory per 1,000 devices it holds.
async fn connects(
    args: &Args,
    nodes: &[Node],
    haproxy: SocketAddr,
    all: &[Device],
    run: usize,
    results: &mut Results,
) -> anyhow::Result<()> {
    let n = args.cluster_connect_devices;
    for (path, target) in [
        ("haproxy → 3 nodes", haproxy),
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
        let loads = node_loads(nodes, baselines).await?;
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
    Ok(())
}

/// Each node's devices (as node 1's registry shows them) and resident memory over its
/// `baselines`.
async fn node_loads(nodes: &[Node], baselines: Vec<u64>) -> anyhow::Result<Vec<NodeLoad>> {
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
    Ok(loads)
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

fn print_failover(row: &FailoverRow) {
    eprintln!(
        "cluster failover run {}: {} devices, all reconnected {:.2} s after SIGKILL (p50 {:.0} ms, p99 {:.0} ms), \
         {} failed attempts; node 1 declared dead after {:.2} s; registry: {} online on nodes 2/3",
        row.run,
        row.connected,
        row.all_reconnected_s,
        row.reconnect.p50_ms,
        row.reconnect.p99_ms,
        row.failed_attempts,
        row.node_declared_dead_s,
        row.registry_online_on_survivors
    );
}

pub fn print_report(args: &Args, r: &Results) {
    if r.cluster_connect.is_empty() && r.cluster_ingest.is_empty() && r.failover.is_empty() {
        return;
    }
    print_connect_table(args, r);
    ingest::print_table(args, r);
    failover::print_table(args, r);
}

/// The connections table (median of runs).
fn print_connect_table(args: &Args, r: &Results) {
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
}
