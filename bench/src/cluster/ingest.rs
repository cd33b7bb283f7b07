//! Part 2 of the cluster benchmark, ingest: D devices × M QoS 1 version reports through
//! HAProxy (or straight to the nodes) into the cluster on PostgreSQL, against one node on
//! SQLite with the same load generator in the same run; the CPU the flood costs in each
//! process on the machine.

use super::fleet::{Database, Node};
use super::PRODUCT;
use crate::api::{Api, Device};
use crate::loadgen::{self, FloodStats, PayloadKind};
use crate::proc_cpu::cpu_seconds;
use crate::procs::{Bins, Server};
use crate::stats::median;
use crate::syscalls::{comm_of, SyscallCount};
use crate::{fresh_dir, load1, version_of, Args, Results, TOKEN};
use anyhow::{ensure, Context};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

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
    /// With `--count-syscalls`: per process (as in `others_cpu_us_per_msg`, the gateway nodes
    /// as `node N`), system calls per acknowledged message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub syscalls_per_msg: crate::syscalls::PerMessage,
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

fn inform_messages(tag: &str, size: usize) -> loadgen::MessageFn {
    let tag = tag.to_owned();
    Arc::new(move |i, seq| {
        (
            format!("/ota/device/inform/{PRODUCT}/dev{i:05}"),
            loadgen::payload(PayloadKind::Inform, seq, &version_of(&tag, seq), size),
        )
    })
}

/// With `--count-syscalls`, starts counting into the work dir's `syscalls-{tag}.csv`.
async fn syscalls_start(args: &Args, tag: &str) -> anyhow::Result<Option<SyscallCount>> {
    if !args.count_syscalls {
        return Ok(None);
    }
    let out = args.work_dir.join(format!("syscalls-{tag}.csv"));
    Ok(Some(SyscallCount::start(&out).await?))
}

/// The calls per message of the gateway nodes (`(id, pid)`; id 0 is the single node), the
/// load generator and the [`CLUSTER_OTHERS`] services.
fn syscalls_finish(
    counting: Option<SyscallCount>,
    nodes: &[(u16, u32)],
    acked: u64,
) -> anyhow::Result<crate::syscalls::PerMessage> {
    let Some(counting) = counting else {
        return Ok(Vec::new());
    };
    let me = std::process::id();
    let label_of = |pid: u32| -> Option<String> {
        if pid == me {
            return Some("load generator".into());
        }
        if let Some((id, _)) = nodes.iter().find(|(_, p)| *p == pid) {
            return Some(if *id == 0 {
                "node".into()
            } else {
                format!("node {id}")
            });
        }
        comm_of(pid).filter(|c| CLUSTER_OTHERS.iter().any(|(_, o)| *o == Some(c.as_str())))
    };
    counting.finish(&label_of, acked)
}

const INFORM: &str = "fleetgate_mqtt_messages_total{kind=\"inform\"}";

/// How the ingest's devices reach the cluster.
#[derive(Clone, Copy)]
pub(super) enum Via<'a> {
    /// All through HAProxy (placed by the consistent hash of their usernames).
    Haproxy(SocketAddr),
    /// Device i straight to node `i mod n`.
    Direct(&'a [SocketAddr]),
}

impl Via<'_> {
    fn tag(&self) -> &'static str {
        match self {
            Via::Haproxy(_) => "haproxy",
            Via::Direct(_) => "direct",
        }
    }
}

pub(super) async fn cluster_ingest(
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
    let counting = syscalls_start(args, &format!("c{run}-{}", via.tag())).await?;
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
    let node_pids: Vec<(u16, u32)> = nodes
        .iter()
        .map(|n| Ok((n.id, n.server.pid()?)))
        .collect::<anyhow::Result<_>>()?;
    let syscalls = syscalls_finish(counting, &node_pids, flood.acked)?;
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
        syscalls_per_msg: syscalls,
        flood,
        processed,
        per_node,
        load1: load,
    })
}

pub(super) async fn single_ingest(
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
    let counting = syscalls_start(args, &format!("s{run}")).await?;
    let others_before: Vec<f64> = single_others.iter().map(|(_, c)| cpu_seconds(*c)).collect();
    let flood = loadgen::flood(
        clients.into_iter().flatten().collect(),
        args.cluster_ingest_messages,
        inform_messages(&format!("s{run}"), args.payload_bytes),
        Duration::from_secs(300),
    )
    .await;
    let others = others_per_msg(single_others, &others_before, flood.acked);
    let syscalls = syscalls_finish(counting, &[(0, server.pid()?)], flood.acked)?;
    let processed = (api.metric(INFORM).await? - m0) as u64;
    let cpu = server.cpu_s()? - c0;
    server.stop().await?;
    Ok(ClusterIngestRow {
        scenario: "single node (SQLite)".into(),
        run,
        cpu_us_per_msg: cpu * 1e6 / flood.acked.max(1) as f64,
        pg_commits_per_s: None,
        others_cpu_us_per_msg: others,
        syscalls_per_msg: syscalls,
        flood,
        processed,
        per_node: vec![(0, processed, cpu * 1e6 / processed.max(1) as f64)],
        load1: load,
    })
}

pub(super) fn print_ingest(row: &ClusterIngestRow) {
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
    for (process, calls) in &row.syscalls_per_msg {
        let calls: Vec<String> = calls.iter().map(|(c, n)| format!("{c} {n:.2}")).collect();
        eprintln!(
            "  system calls per message, {process}: {}",
            calls.join(", ")
        );
    }
}

/// The ingest table (median of runs).
pub(super) fn print_table(args: &Args, r: &Results) {
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
}
