//! `fleetgate-bench`: the gateway-core benchmarks of issue 2 ("Speed and memory"), in one run.
//!
//! 1. **Connections**: N devices (1,000 … 20,000) connected at once with signed Link CONNECTs
//!    against a release `fleetgate serve` (separate process, devices provisioned through the
//!    batch API), against stock rumqttd 0.20 (`stock-rumqttd`) and optionally Mosquitto: connect
//!    rate, handshake p50/p99, failures, broker RSS per 1,000 connections.
//! 2. **Ingest**: connected devices publishing QoS1 version (inform) or progress reports with an
//!    in-flight window; messages/s, PUBACK latency, and zero loss checked three ways (PUBACKs
//!    vs sent, the gateway's message counters, and — after a `kill -9` and restart — every
//!    device's stored version is the last one it reported). Next to it, the bare rumqttd relay
//!    (N publishers → 1 wildcard QoS1 subscriber counting distinct messages) with the same load
//!    generator, and the ratio.
//!
//! 3. **OTA campaign** (`--parts ota`, issue 4): N simulated devices (`firmware-sim`, one
//!    process) with injected failures, one upgrade job with a constant push rate and a timeout:
//!    every task's terminal state against the simulator's faults, pushes per whole minute, time
//!    to completion, gateway RSS per 10,000 tasks (`campaign.rs`).
//! 4. **Migration** (`--parts migration`, issue 6): N connected simulated devices moved to a
//!    second instance at `[migration] devices_per_sec` (default and unthrottled): devices/s,
//!    time to COMPLETED, every device MIGRATED and reconnected (`migrate.rs`).
//! 5. **Cluster** (`--parts cluster`, issue 16): connections through HAProxy, ingest against one
//!    SQLite node, `kill -9` failover of devices and of the engines (`cluster.rs`).
//! 6. **Cluster campaign** (`--parts cluster-ota`, issue 17): the OTA campaign of 3. on three
//!    nodes through HAProxy, then on one node, in the same run; PostgreSQL commits/s and rows
//!    written/s during the campaign.
//!
//! Every socket is on 127.0.0.1; every phase is bounded in count and time. Results go to stdout
//! as Markdown tables (medians of `--runs`) and, with `--json-out`, as JSON with every run.

mod api;
mod campaign;
mod cluster;
mod loadgen;
mod migrate;
mod procs;
mod sim;
mod stats;

use anyhow::{ensure, Context};
use api::{devices, Api, Device};
use clap::Parser;
use loadgen::{ConnectStats, FloodStats, PayloadKind, Subscriber, SubscriberStats};
use procs::{Bins, Kind, Server};
use serde::Serialize;
use stats::median;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-admin-token-0123456789";
const CONN_PRODUCT: &str = "benchconn";
const INGEST_PRODUCT: &str = "benchingest";
const RELAY_PRODUCT: &str = "benchrelay";
/// File descriptors each process needs besides its MQTT sockets.
const FD_RESERVE: u64 = 100;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "fleetgate-bench",
    about = "Connection and ingest benchmarks of fleetgate"
)]
struct Args {
    /// Parts to run.
    #[arg(long, value_delimiter = ',', default_value = "connect,ingest")]
    parts: Vec<Part>,
    /// Runs per measurement (the tables show medians).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Connection counts of the curve (capped at the open-files limit minus a reserve).
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000,20000")]
    connect_counts: Vec<usize>,
    /// Connection counts measured again with every device subscribed (QoS1) to its own OTA
    /// upgrade topic, as an OTA-capable device is (a per-device filter in the router); 0 skips.
    #[arg(long, value_delimiter = ',', default_value = "10000")]
    subscribed_counts: Vec<usize>,
    /// Skip these brokers in the connection benchmark (fleetgate, rumqttd, mosquitto).
    #[arg(long, value_delimiter = ',')]
    skip_brokers: Vec<String>,
    /// Handshakes in flight at once during a connect storm.
    #[arg(long, default_value_t = 500)]
    concurrency: usize,
    /// Seconds connected clients stay idle before RSS is read.
    #[arg(long, default_value_t = 3)]
    settle_s: u64,
    /// Devices publishing in the gateway ingest benchmark.
    #[arg(long, default_value_t = 1000)]
    ingest_devices: usize,
    /// Messages per device in the gateway ingest benchmark.
    #[arg(long, default_value_t = 200)]
    ingest_messages: usize,
    /// Publishers of the relay comparison (and of the gateway run of the same shape).
    #[arg(long, default_value_t = 100)]
    relay_publishers: usize,
    /// Messages per publisher in the relay comparison.
    #[arg(long, default_value_t = 2000)]
    relay_messages: usize,
    /// Unacknowledged QoS1 publishes per client.
    #[arg(long, default_value_t = 10)]
    window: u16,
    /// Payload size, bytes.
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Data directories (disk).
    #[arg(long, default_value = "/tmp/fleetgate-bench")]
    work_dir: PathBuf,
    /// Also run the inform ingest with the data dir here (tmpfs).
    #[arg(long, default_value = "/dev/shm/fleetgate-bench")]
    tmpfs_dir: PathBuf,
    /// Skip the tmpfs ingest run.
    #[arg(long)]
    no_tmpfs: bool,
    /// Mosquitto binary: adds Mosquitto rows (its own temporary config and port).
    #[arg(long)]
    mosquitto: Option<PathBuf>,
    /// libjemalloc.so: adds "fleetgate + jemalloc" rows (the same binary, allocator preloaded)
    /// to the connection benchmark and to the 1,000-device inform ingest.
    #[arg(long)]
    jemalloc: Option<PathBuf>,
    /// Extra environment for every fleetgate process (`KEY=VALUE`, repeatable), e.g. for
    /// experiments on a patched build.
    #[arg(long)]
    gateway_env: Vec<String>,
    /// fleetgate binary [default: next to this one].
    #[arg(long)]
    fleetgate_bin: Option<PathBuf>,
    /// stock-rumqttd binary [default: next to this one].
    #[arg(long)]
    rumqttd_bin: Option<PathBuf>,
    /// Only ingest scenarios whose name contains one of these (e.g. `relay`, `inform 1000`).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Write every run as JSON here.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// firmware-sim binary for `ota` and `migration` [default: next to this one].
    #[arg(long)]
    firmware_sim_bin: Option<PathBuf>,
    /// OTA campaign: simulated devices (one task each).
    #[arg(long, default_value_t = 10_000)]
    ota_devices: usize,
    /// OTA campaign: the job's constant push rate, devices per minute.
    #[arg(long, default_value_t = 2_000)]
    ota_rate: u32,
    /// OTA campaign: probability of each terminal fault (-1, -2, -3, -4, hang, wrong version)
    /// per device, percent.
    #[arg(long, default_value_t = 2.0)]
    ota_fault_percent: f64,
    /// OTA campaign: the job's `timeout_seconds` (what ends hung devices).
    #[arg(long, default_value_t = 60)]
    ota_timeout_s: u32,
    /// OTA campaign: firmware package size, KiB.
    #[arg(long, default_value_t = 64)]
    ota_firmware_kib: usize,
    /// OTA campaign: simulator seed of run 1 (run k uses seed + k − 1).
    #[arg(long, default_value_t = 1)]
    ota_seed: u64,
    /// Migration: connected simulated devices.
    #[arg(long, default_value_t = 5_000)]
    migration_devices: usize,
    /// Migration: `[migration] devices_per_sec` values (`default` = not set).
    #[arg(long, value_delimiter = ',', default_value = "default,0")]
    migration_rates: Vec<String>,
    /// Migration: afterwards roll every device back (a second reconnect of each) and record
    /// the gateway's RSS again.
    #[arg(long)]
    migration_rollback: bool,
    /// Cluster: PostgreSQL server (a fresh database is created per run and dropped after).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pg_url: String,
    /// Cluster: NATS server (each run uses a cluster name of its own).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Cluster: the haproxy binary.
    #[arg(long, default_value = "haproxy")]
    haproxy: PathBuf,
    /// Cluster: devices connected through HAProxy (≤ ~9,000: two descriptors each there).
    #[arg(long, default_value_t = 8_000)]
    cluster_connect_devices: usize,
    /// Cluster: devices publishing version reports in the ingest comparison.
    #[arg(long, default_value_t = 300)]
    cluster_ingest_devices: usize,
    /// Cluster: reports per device in the ingest comparison.
    #[arg(long, default_value_t = 200)]
    cluster_ingest_messages: usize,
    /// Cluster: devices on the node that is killed in the failover measurement.
    #[arg(long, default_value_t = 10_000)]
    failover_devices: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Connect,
    Ingest,
    Ota,
    Migration,
    /// Three nodes on PostgreSQL + NATS behind HAProxy (`cluster.rs`).
    Cluster,
    /// The OTA campaign on three nodes through HAProxy, then on one node, in the same run.
    ClusterOta,
}

#[derive(Serialize)]
struct Machine {
    nproc: usize,
    mem_total_mib: u64,
    kernel: String,
    cpu_model: String,
    nofile_limit: u64,
    ephemeral_ports: String,
}

/// The 1-minute load average: other work on the machine skews every number.
fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn machine(nofile: u64) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu_model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let mem_total_mib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024;
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_total_mib,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        cpu_model,
        nofile_limit: nofile,
        ephemeral_ports: read("/proc/sys/net/ipv4/ip_local_port_range")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join("-"),
    }
}

#[derive(Serialize, Clone)]
struct ConnectRow {
    broker: Kind,
    clients: usize,
    run: usize,
    stats: ConnectStats,
    baseline_rss_kib: u64,
    rss_kib: u64,
    /// Total RSS / connected × 1,000, MiB.
    mib_per_1000: f64,
    /// (RSS − baseline) / connected × 1,000, MiB.
    mib_per_1000_over_baseline: f64,
    /// The gateway's own count (`/healthz` `online_devices`).
    online_reported: Option<u64>,
    dropped_while_idle: u64,
    /// Every device also subscribed to its upgrade topic (RSS read after the SUBACKs).
    subscribed: bool,
    subacks: u64,
    /// Broker threads when RSS was read.
    threads: u64,
    /// 1-minute load average when the run started.
    load1: f64,
}

#[derive(Serialize, Clone)]
struct IngestRow {
    scenario: String,
    run: usize,
    flood: FloodStats,
    /// Gateway: processed-message counter delta; relay: distinct messages at the subscriber.
    processed: u64,
    /// Gateway only: devices whose stored version (after kill -9 + restart) is the last one
    /// they reported, out of `devices_checked`.
    stored_ok: Option<usize>,
    devices_checked: Option<usize>,
    malformed: Option<u64>,
    /// Gateway only: publishes refused by the topic ACL (must be 0).
    acl_denied: Option<u64>,
    subscriber: Option<SubscriberStats>,
    rss_kib: u64,
    /// Broker CPU time (user + system) per message during the flood, microseconds.
    cpu_us_per_msg: f64,
    warnings_logged: u64,
    /// Messages per second this row counts as its rate: PUBACKed/s for the gateway (PUBACK
    /// means processed), distinct messages received/s for a relay.
    rate: f64,
    lost: u64,
    /// 1-minute load average when the run started.
    load1: f64,
}

#[derive(Serialize, Default)]
struct Results {
    machine: Option<Machine>,
    args: String,
    notes: Vec<String>,
    connect: Vec<ConnectRow>,
    ingest: Vec<IngestRow>,
    ota: Vec<campaign::CampaignRow>,
    migration: Vec<migrate::MigrationRow>,
    cluster_connect: Vec<cluster::ClusterConnectRow>,
    cluster_ingest: Vec<cluster::ClusterIngestRow>,
    failover: Vec<cluster::FailoverRow>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nofile = procs::raise_nofile();
    let exe_dir = std::env::current_exe()?
        .parent()
        .context("no exe dir")?
        .to_owned();
    let bins = Bins {
        fleetgate: args
            .fleetgate_bin
            .clone()
            .unwrap_or_else(|| exe_dir.join("fleetgate")),
        rumqttd: args
            .rumqttd_bin
            .clone()
            .unwrap_or_else(|| exe_dir.join("stock-rumqttd")),
        mosquitto: args.mosquitto.clone(),
        jemalloc: args.jemalloc.clone(),
        gateway_env: args
            .gateway_env
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .with_context(|| format!("--gateway-env {kv}: not KEY=VALUE"))
            })
            .collect::<anyhow::Result<_>>()?,
    };
    for b in [&bins.fleetgate, &bins.rumqttd] {
        ensure!(
            b.exists(),
            "{} not found: build with `cargo build --release -p fleetgate -p fleetgate-bench`",
            b.display()
        );
    }
    let mut results = Results {
        machine: Some(machine(nofile)),
        args: std::env::args().collect::<Vec<_>>().join(" "),
        ..Results::default()
    };
    if let Some(m) = &results.machine {
        eprintln!(
            "machine: {} cores, {} MiB, kernel {}, {}; open files {}, ephemeral ports {}",
            m.nproc, m.mem_total_mib, m.kernel, m.cpu_model, m.nofile_limit, m.ephemeral_ports
        );
    }
    fresh_dir(&args.work_dir)?;

    if args.parts.contains(&Part::Connect) {
        connect_benchmark(&args, &bins, nofile, &mut results).await?;
    }
    if args.parts.contains(&Part::Ingest) {
        ingest_benchmark(&args, &bins, &mut results).await?;
    }
    let sim_bin = args
        .firmware_sim_bin
        .clone()
        .unwrap_or_else(|| exe_dir.join("firmware-sim"));
    if args
        .parts
        .iter()
        .any(|p| matches!(p, Part::Ota | Part::ClusterOta | Part::Migration))
    {
        ensure!(
            sim_bin.exists(),
            "{} not found: build with `cargo build --release -p firmware-sim`",
            sim_bin.display()
        );
    }
    if args.parts.contains(&Part::Ota) {
        ota_benchmark(
            &args,
            &bins,
            &sim_bin,
            &[campaign::Deployment::Single],
            &mut results,
        )
        .await?;
    }
    if args.parts.contains(&Part::ClusterOta) {
        let both = [campaign::Deployment::Cluster, campaign::Deployment::Single];
        ota_benchmark(&args, &bins, &sim_bin, &both, &mut results).await?;
    }
    if args.parts.contains(&Part::Migration) {
        migration_benchmark(&args, &bins, &sim_bin, &mut results).await?;
    }
    if args.parts.contains(&Part::Cluster) {
        cluster::run(&args, &bins, &mut results).await?;
    }

    print_report(&args, &results);
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Starts a gateway on an empty data dir, provisions the products, stops it cleanly.
async fn provision(bins: &Bins, dir: &Path, products: &[(&str, usize)]) -> anyhow::Result<()> {
    fresh_dir(dir)?;
    let server = Server::fleetgate(bins, dir, TOKEN, None).await?;
    let api = Api::new(server.http.context("no http")?, TOKEN);
    let t = Instant::now();
    for (pk, n) in products {
        api.provision(pk, &devices(pk, *n)).await?;
    }
    eprintln!(
        "provisioned {:?} in {} in {:.1} s",
        products,
        dir.display(),
        t.elapsed().as_secs_f64()
    );
    server.stop().await
}

async fn connect_benchmark(
    args: &Args,
    bins: &Bins,
    nofile: u64,
    results: &mut Results,
) -> anyhow::Result<()> {
    let cap = nofile.saturating_sub(FD_RESERVE) as usize;
    let counts: Vec<usize> = args
        .connect_counts
        .iter()
        .map(|&n| {
            if n > cap {
                let note = format!(
                    "{n} connections capped to {cap}: the open-files limit is {nofile} \
                     (hard limit; broker and load generator each need one descriptor per \
                     connection plus ~{FD_RESERVE} others)"
                );
                eprintln!("{note}");
                results.notes.push(note);
                cap
            } else {
                n
            }
        })
        .collect();
    let max = counts.iter().copied().max().unwrap_or(0);
    let data = args.work_dir.join("conn-data");
    provision(bins, &data, &[(CONN_PRODUCT, max)]).await?;
    let all = devices(CONN_PRODUCT, max);
    let mut kinds = vec![Kind::Fleetgate, Kind::Rumqttd];
    if bins.jemalloc.is_some() {
        kinds.insert(1, Kind::FleetgateJemalloc);
    }
    if bins.mosquitto.is_some() {
        kinds.push(Kind::Mosquitto);
    }
    kinds.retain(|k| {
        !args
            .skip_brokers
            .iter()
            .any(|s| k.label().starts_with(s.as_str()))
    });
    let subscribed_counts: Vec<usize> =
        args.subscribed_counts.iter().map(|&n| n.min(cap)).collect();
    let points: Vec<(usize, bool)> = counts
        .iter()
        .map(|&n| (n, false))
        .chain(subscribed_counts.iter().map(|&n| (n, true)))
        .filter(|(n, _)| *n > 0)
        .collect();
    for run in 1..=args.runs {
        for &(n, subscribe) in &points {
            for &kind in &kinds {
                let row = connect_once(args, bins, kind, &data, &all[..n], subscribe, run).await?;
                eprintln!(
                    "connect {:<22} n={n:>5}{} run {run}: {:>7.0}/s p50 {:.1} ms p99 {:.1} ms failed {} \
                     rss {:.1} MiB ({:.2} MiB/1000, {:.2} over baseline) online {:?} dropped {} threads {}",
                    kind.label(),
                    if subscribe { " subscribed" } else { "" },
                    row.stats.rate_per_s,
                    row.stats.handshake.p50_ms,
                    row.stats.handshake.p99_ms,
                    row.stats.failed,
                    row.rss_kib as f64 / 1024.0,
                    row.mib_per_1000,
                    row.mib_per_1000_over_baseline,
                    row.online_reported,
                    row.dropped_while_idle,
                    row.threads,
                );
                if !row.stats.errors.is_empty() {
                    eprintln!("    errors: {:?}", row.stats.errors);
                }
                results.connect.push(row);
            }
        }
    }
    Ok(())
}

async fn connect_once(
    args: &Args,
    bins: &Bins,
    kind: Kind,
    data: &Path,
    devs: &[Device],
    subscribe: bool,
    run: usize,
) -> anyhow::Result<ConnectRow> {
    let load = load1();
    let server = Server::start(kind, bins, data, TOKEN).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = server.rss_kib()?;
    let (stats, clients) =
        loadgen::connect_all(server.mqtt, devs, args.concurrency, args.window).await;
    let held: Vec<_> = devs
        .iter()
        .zip(clients)
        .filter_map(|(d, c)| {
            let filter = subscribe
                .then(|| format!("/ota/device/upgrade/{}/{}", d.product_key, d.device_name));
            c.map(|c| (c, filter))
        })
        .collect();
    let idle = loadgen::Idle::hold(held);
    let subacks = if subscribe {
        idle.wait_subscribed(stats.connected as u64, Duration::from_secs(120))
            .await
    } else {
        0
    };
    tokio::time::sleep(Duration::from_secs(args.settle_s)).await;
    let rss = server.rss_kib()?;
    let threads = procs::proc_status_kib(server.pid()?, "Threads:").unwrap_or(0);
    let online = match server.http {
        Some(http) => Some(Api::new(http, TOKEN).online().await?),
        None => None,
    };
    let dropped = idle.dropped.load(std::sync::atomic::Ordering::Relaxed);
    idle.close().await;
    server.stop().await?;
    let per = |kib: u64| {
        if stats.connected == 0 {
            f64::NAN
        } else {
            kib as f64 / 1024.0 / stats.connected as f64 * 1000.0
        }
    };
    Ok(ConnectRow {
        broker: kind,
        clients: devs.len(),
        run,
        baseline_rss_kib: baseline,
        rss_kib: rss,
        mib_per_1000: per(rss),
        mib_per_1000_over_baseline: per(rss.saturating_sub(baseline)),
        online_reported: online,
        dropped_while_idle: dropped,
        subscribed: subscribe,
        subacks,
        threads,
        load1: load,
        stats,
    })
}

/// One ingest scenario.
#[derive(Debug, Clone)]
enum Scenario {
    Gateway {
        devices: usize,
        messages: usize,
        kind: PayloadKind,
        tmpfs: bool,
        jemalloc: bool,
    },
    Relay {
        broker: Kind,
        publishers: usize,
        messages: usize,
    },
}

impl Scenario {
    fn name(&self) -> String {
        match self {
            Scenario::Gateway {
                devices,
                messages,
                kind,
                tmpfs,
                jemalloc,
            } => format!(
                "fleetgate{} {} {devices}×{messages}{}",
                if *jemalloc { " + jemalloc" } else { "" },
                match kind {
                    PayloadKind::Inform => "inform",
                    PayloadKind::Progress => "progress",
                },
                if *tmpfs { ", data dir on tmpfs" } else { "" }
            ),
            Scenario::Relay {
                broker,
                publishers,
                messages,
            } => format!("{} relay {publishers}×{messages} → 1", broker.label()),
        }
    }
}

async fn ingest_benchmark(args: &Args, bins: &Bins, results: &mut Results) -> anyhow::Result<()> {
    let (d, m) = (args.ingest_devices, args.ingest_messages);
    let (p, pm) = (args.relay_publishers, args.relay_messages);
    let mut scenarios = vec![
        Scenario::Gateway {
            devices: d,
            messages: m,
            kind: PayloadKind::Inform,
            tmpfs: false,
            jemalloc: false,
        },
        Scenario::Gateway {
            devices: d,
            messages: m,
            kind: PayloadKind::Progress,
            tmpfs: false,
            jemalloc: false,
        },
        Scenario::Gateway {
            devices: p,
            messages: pm,
            kind: PayloadKind::Inform,
            tmpfs: false,
            jemalloc: false,
        },
        Scenario::Relay {
            broker: Kind::Rumqttd,
            publishers: p,
            messages: pm,
        },
        Scenario::Relay {
            broker: Kind::Rumqttd,
            publishers: d,
            messages: m,
        },
    ];
    let use_tmpfs = !args.no_tmpfs;
    if use_tmpfs {
        scenarios.insert(
            1,
            Scenario::Gateway {
                devices: d,
                messages: m,
                kind: PayloadKind::Inform,
                tmpfs: true,
                jemalloc: false,
            },
        );
    }
    if bins.jemalloc.is_some() {
        scenarios.insert(
            1,
            Scenario::Gateway {
                devices: d,
                messages: m,
                kind: PayloadKind::Inform,
                tmpfs: false,
                jemalloc: true,
            },
        );
    }
    if bins.mosquitto.is_some() {
        scenarios.push(Scenario::Relay {
            broker: Kind::Mosquitto,
            publishers: p,
            messages: pm,
        });
    }
    if !args.only.is_empty() {
        scenarios.retain(|s| args.only.iter().any(|o| s.name().contains(o.as_str())));
    }
    let need = d.max(p);
    let disk = args.work_dir.join("ingest-data");
    provision(bins, &disk, &[(INGEST_PRODUCT, need)]).await?;
    if use_tmpfs {
        provision(bins, &args.tmpfs_dir, &[(INGEST_PRODUCT, need)]).await?;
    }
    for run in 1..=args.runs {
        for (i, s) in scenarios.iter().enumerate() {
            let load = load1();
            let row = match s {
                Scenario::Gateway {
                    devices: n,
                    messages,
                    kind,
                    tmpfs,
                    jemalloc,
                } => {
                    let dir = if *tmpfs { &args.tmpfs_dir } else { &disk };
                    let tag = format!("s{i}r{run}");
                    let preload = bins.jemalloc.as_deref().filter(|_| *jemalloc);
                    let w = Workload {
                        devices: *n,
                        messages: *messages,
                        kind: *kind,
                    };
                    gateway_ingest(args, bins, dir, preload, w, &tag, run).await?
                }
                Scenario::Relay {
                    broker,
                    publishers,
                    messages,
                } => relay(args, bins, *broker, *publishers, *messages, run).await?,
            };
            let row = IngestRow {
                scenario: s.name(),
                load1: load,
                ..row
            };
            eprintln!(
                "ingest {:<48} run {run}: {:>8.0} msg/s, broker CPU {:.2} µs/msg, PUBACK p50 {:.1} ms p99 {:.1} ms, \
                 sent {} acked {} processed {} lost {} stored_ok {:?}/{:?} malformed {:?} acl_denied {:?} warnings {}",
                row.scenario,
                row.rate,
                row.cpu_us_per_msg,
                row.flood.latency.p50_ms,
                row.flood.latency.p99_ms,
                row.flood.sent,
                row.flood.acked,
                row.processed,
                row.lost,
                row.stored_ok,
                row.devices_checked,
                row.malformed,
                row.acl_denied,
                row.warnings_logged,
            );
            if !row.flood.client_errors.is_empty() {
                eprintln!("    client errors: {:?}", row.flood.client_errors);
            }
            results.ingest.push(row);
        }
    }
    Ok(())
}

/// The version device `dev` reports in message `seq` of a scenario run.
fn version_of(tag: &str, seq: usize) -> String {
    format!("2.{seq}.0-{tag}")
}

/// What the devices of a gateway ingest run publish.
struct Workload {
    devices: usize,
    messages: usize,
    kind: PayloadKind,
}

async fn gateway_ingest(
    args: &Args,
    bins: &Bins,
    dir: &Path,
    preload: Option<&Path>,
    w: Workload,
    tag: &str,
    run: usize,
) -> anyhow::Result<IngestRow> {
    let Workload {
        devices: n,
        messages,
        kind,
    } = w;
    let server = Server::fleetgate(bins, dir, TOKEN, preload).await?;
    let api = Api::new(server.http.context("no http")?, TOKEN);
    let devs = devices(INGEST_PRODUCT, n);
    let (kind_label, topic_kind) = match kind {
        PayloadKind::Inform => ("inform", "inform"),
        PayloadKind::Progress => ("progress", "progress"),
    };
    let counter = format!("fleetgate_mqtt_messages_total{{kind=\"{kind_label}\"}}");
    let malformed_counter =
        format!("fleetgate_mqtt_malformed_messages_total{{kind=\"{kind_label}\"}}");
    let acl_counter = "fleetgate_mqtt_acl_denied_total{kind=\"publish\"}";
    let acl_before = api.metric(acl_counter).await?;
    let before = api.metric(&counter).await?;
    let malformed_before = api.metric(&malformed_counter).await?;
    let (cs, clients) =
        loadgen::connect_all(server.mqtt, &devs, args.concurrency, args.window).await;
    ensure!(
        cs.failed == 0,
        "ingest: {} of {n} devices failed to connect: {:?}",
        cs.failed,
        cs.errors
    );
    let size = args.payload_bytes;
    let tag_owned = tag.to_owned();
    let make: loadgen::MessageFn = Arc::new(move |i, seq| {
        (
            format!("/ota/device/{topic_kind}/{INGEST_PRODUCT}/dev{i:05}"),
            loadgen::payload(kind, seq, &version_of(&tag_owned, seq), size),
        )
    });
    // Every device connected (checked above), so the flattened list is in device order.
    let clients = clients.into_iter().flatten().collect();
    let cpu_before = server.cpu_s()?;
    let flood = loadgen::flood(clients, messages, make, Duration::from_secs(300)).await;
    let cpu = server.cpu_s()? - cpu_before;
    let after = api.metric(&counter).await?;
    let malformed = (api.metric(&malformed_counter).await? - malformed_before) as u64;
    let acl_denied = (api.metric(acl_counter).await? - acl_before) as u64;
    let rss = server.rss_kib()?;
    let warnings = server
        .log
        .warnings
        .load(std::sync::atomic::Ordering::Relaxed);
    if warnings > 0 {
        if let Ok(s) = server.log.samples.lock() {
            eprintln!("    gateway warnings: {s:?}");
        }
    }
    let processed = (after - before) as u64;

    // Durability: PUBACK for an inform means committed. Kill without any shutdown, restart on
    // the same data dir, and compare every device's stored version with its last report.
    let (stored_ok, checked) = if kind == PayloadKind::Inform {
        server.kill9().await?;
        let server = Server::fleetgate(bins, dir, TOKEN, None).await?;
        let api = Api::new(server.http.context("no http")?, TOKEN);
        let stored = api.versions(INGEST_PRODUCT, "MCU").await?;
        let want = version_of(tag, messages - 1);
        let ok = devs
            .iter()
            .filter(|d| stored.get(&d.device_name).and_then(|v| v.as_deref()) == Some(&want))
            .count();
        server.stop().await?;
        (Some(ok), Some(n))
    } else {
        server.stop().await?;
        (None, None)
    };
    let expected = (n * messages) as u64;
    let lost = expected.saturating_sub(flood.acked.min(processed))
        + checked.zip(stored_ok).map_or(0, |(c, o)| (c - o) as u64);
    Ok(IngestRow {
        scenario: String::new(),
        run,
        rate: flood.acked_per_s,
        processed,
        stored_ok,
        devices_checked: checked,
        malformed: Some(malformed),
        acl_denied: Some(acl_denied),
        subscriber: None,
        rss_kib: rss,
        cpu_us_per_msg: cpu * 1e6 / (n * messages) as f64,
        warnings_logged: warnings,
        lost,
        load1: f64::NAN,
        flood,
    })
}

async fn relay(
    args: &Args,
    bins: &Bins,
    broker: Kind,
    publishers: usize,
    messages: usize,
    run: usize,
) -> anyhow::Result<IngestRow> {
    let server = Server::start(broker, bins, &args.work_dir, TOKEN).await?;
    let sub = Subscriber::connect(server.mqtt, "/ota/device/inform/#", 100).await?;
    let devs = devices(RELAY_PRODUCT, publishers);
    let (cs, clients) =
        loadgen::connect_all(server.mqtt, &devs, args.concurrency, args.window).await;
    ensure!(
        cs.failed == 0,
        "relay: {} of {publishers} publishers failed to connect: {:?}",
        cs.failed,
        cs.errors
    );
    let size = args.payload_bytes;
    let make: loadgen::MessageFn = Arc::new(move |i, seq| {
        (
            format!("/ota/device/inform/{RELAY_PRODUCT}/dev{i:05}"),
            loadgen::payload(PayloadKind::Inform, seq, &version_of("relay", seq), size),
        )
    });
    let clients = clients.into_iter().flatten().collect();
    let started = Instant::now();
    let cpu_before = server.cpu_s()?;
    let sub = Subscriber::run(sub, publishers, messages, started, Duration::from_secs(5));
    let flood = loadgen::flood(clients, messages, make, Duration::from_secs(300)).await;
    let sub = sub.finish().await?;
    let cpu = server.cpu_s()? - cpu_before;
    let rss = server.rss_kib()?;
    server.stop().await?;
    let expected = (publishers * messages) as u64;
    Ok(IngestRow {
        scenario: String::new(),
        run,
        rate: sub.received_per_s,
        processed: sub.received,
        stored_ok: None,
        devices_checked: None,
        malformed: None,
        acl_denied: None,
        rss_kib: rss,
        cpu_us_per_msg: cpu * 1e6 / (publishers * messages) as f64,
        warnings_logged: 0,
        lost: expected.saturating_sub(sub.received),
        load1: f64::NAN,
        subscriber: Some(sub),
        flood,
    })
}

async fn ota_benchmark(
    args: &Args,
    bins: &Bins,
    sim_bin: &Path,
    deployments: &[campaign::Deployment],
    results: &mut Results,
) -> anyhow::Result<()> {
    for (run, &deployment) in
        (1..=args.runs).flat_map(|run| deployments.iter().map(move |d| (run, d)))
    {
        let settings = campaign::Settings {
            devices: args.ota_devices,
            rate_per_minute: args.ota_rate,
            fault_percent: args.ota_fault_percent,
            timeout_seconds: args.ota_timeout_s,
            firmware_kib: args.ota_firmware_kib,
            seed: args.ota_seed + run as u64 - 1,
            connect_rate: 2_000,
        };
        let row = campaign::run_once(args, bins, sim_bin, &settings, run, deployment).await?;
        eprintln!(
            "ota run {run} ({}): {} in {:.1} s, mismatches {}, statistics match {}, pushes/min {:?} \
             (max deviation {:.2}%), RSS {:.1} → {:.1} MiB ({:.1} MiB per 10,000 tasks), load {:.1}–{:.1}, \
             PostgreSQL {:?} commits/s {:?} rows/s",
            row.deployment,
            row.job_status,
            row.completion_secs,
            row.mismatches,
            row.statistics_match,
            row.pushes_per_minute,
            row.max_minute_deviation_pct,
            row.gateway_rss_before_kib as f64 / 1024.0,
            row.gateway_rss_with_tasks_kib as f64 / 1024.0,
            row.mib_per_10k_tasks,
            row.load1_start,
            row.load1_end,
            row.pg_commits_per_s,
            row.pg_rows_per_s,
        );
        for m in &row.mismatch_samples {
            eprintln!("    mismatch: {m}");
        }
        results.ota.push(row);
    }
    Ok(())
}

async fn migration_benchmark(
    args: &Args,
    bins: &Bins,
    sim_bin: &Path,
    results: &mut Results,
) -> anyhow::Result<()> {
    let rates: Vec<Option<u32>> =
        args.migration_rates
            .iter()
            .map(|r| match r.as_str() {
                "default" => Ok(None),
                n => n.parse().map(Some).with_context(|| {
                    format!("--migration-rates: {n} is not a number or `default`")
                }),
            })
            .collect::<anyhow::Result<_>>()?;
    for run in 1..=args.runs {
        for &rate in &rates {
            let row = migrate::run_once(
                bins,
                sim_bin,
                &args.work_dir,
                args.migration_devices,
                rate,
                run,
                args.migration_rollback,
            )
            .await?;
            eprintln!(
                "migration run {run} rate {:?}: {} in {:.2} s ({:.0} devices/s), all online after \
                 {:.2} s, migrated {} online in target {} reconnected {}, load {:.1}–{:.1}",
                rate,
                row.state,
                row.full_to_completed_secs,
                row.devices_per_sec_measured,
                row.full_to_all_online_secs,
                row.migrated,
                row.online_in_target,
                row.reconnected,
                row.load1_start,
                row.load1_end,
            );
            results.migration.push(row);
        }
    }
    Ok(())
}

fn print_campaigns(r: &Results) {
    println!("\n## OTA campaign (every run)\n");
    println!(
        "| run | deployment | devices | rate/min | job | to COMPLETED s | mismatches | statistics match | \
         pushes per whole minute | max deviation % | mean rate/min | repushes | RSS before MiB | \
         with tasks MiB | peak MiB | MiB per 10,000 tasks | PostgreSQL commits/s | rows/s | load start–end |"
    );
    println!("|---:|---|---:|---:|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let opt = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.0}"));
    for o in &r.ota {
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {} | {} | {:?} | {:.2} | {:.0} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {:.1}–{:.1} |",
            o.run,
            o.deployment,
            o.settings.devices,
            o.settings.rate_per_minute,
            o.job_status,
            o.completion_secs,
            o.mismatches,
            o.statistics_match,
            o.pushes_per_minute,
            o.max_minute_deviation_pct,
            o.mean_rate_per_minute,
            o.repushes,
            o.gateway_rss_before_kib as f64 / 1024.0,
            o.gateway_rss_with_tasks_kib as f64 / 1024.0,
            o.gateway_rss_peak_kib as f64 / 1024.0,
            o.mib_per_10k_tasks,
            opt(o.pg_commits_per_s),
            opt(o.pg_rows_per_s),
            o.load1_start,
            o.load1_end,
        );
    }
    for o in &r.ota {
        println!("\nrun {}: expected {:?}", o.run, o.expected);
        println!("run {}: observed {:?}", o.run, o.observed);
    }
}

fn print_migrations(r: &Results) {
    println!("\n## Migration of connected devices (every run)\n");
    println!(
        "| run | devices | devices_per_sec | full → COMPLETED s | devices/s | full → all online s | \
         MIGRATED | online in target | reconnected | refused | RSS before → after (→ after rollback) MiB | load start–end |"
    );
    println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|");
    for m in &r.migration {
        println!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.2} | {} | {} | {} | {} | {:.1} → {:.1}{} | {:.1}–{:.1} |",
            m.run,
            m.devices,
            m.devices_per_sec
                .map_or_else(|| "default".to_owned(), |r| r.to_string()),
            m.full_to_completed_secs,
            m.devices_per_sec_measured,
            m.full_to_all_online_secs,
            m.migrated,
            m.online_in_target,
            m.reconnected,
            m.connect_refused,
            m.gateway_rss_before_kib as f64 / 1024.0,
            m.gateway_rss_kib as f64 / 1024.0,
            m.gateway_rss_after_rollback_kib
                .map_or_else(String::new, |k| format!(" → {:.1}", k as f64 / 1024.0)),
            m.load1_start,
            m.load1_end,
        );
    }
}

fn print_report(args: &Args, r: &Results) {
    cluster::print_report(args, r);
    if !r.ota.is_empty() {
        print_campaigns(r);
    }
    if !r.migration.is_empty() {
        print_migrations(r);
    }
    if r.connect.is_empty() && r.ingest.is_empty() {
        for n in &r.notes {
            println!("- note: {n}");
        }
        return;
    }
    println!("\n## Connections (median of {} runs)\n", args.runs);
    println!(
        "| broker | clients | connected | failed | connects/s | handshake p50 ms | p99 ms | \
         RSS MiB | baseline MiB | MiB/1000 | MiB/1000 over baseline | dropped idle | load |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut seen: Vec<(Kind, bool, usize)> = Vec::new();
    for c in &r.connect {
        let k = (c.broker, c.subscribed, c.clients);
        if !seen.contains(&k) {
            seen.push(k);
        }
    }
    seen.sort_by_key(|(kind, sub, n)| (*sub, *kind as u8, *n));
    for (kind, sub, n) in seen {
        let rows: Vec<&ConnectRow> = r
            .connect
            .iter()
            .filter(|c| c.broker == kind && c.clients == n && c.subscribed == sub)
            .collect();
        let med = |f: &dyn Fn(&ConnectRow) -> f64| median(rows.iter().map(|c| f(c)));
        println!(
            "| {}{} | {n} | {:.0} | {:.0} (max {}) | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.0} | {:.1} |",
            kind.label(),
            if sub { ", subscribed" } else { "" },
            med(&|c| c.stats.connected as f64),
            med(&|c| c.stats.failed as f64),
            rows.iter().map(|c| c.stats.failed).max().unwrap_or(0),
            med(&|c| c.stats.rate_per_s),
            med(&|c| c.stats.handshake.p50_ms),
            med(&|c| c.stats.handshake.p99_ms),
            med(&|c| c.rss_kib as f64 / 1024.0),
            med(&|c| c.baseline_rss_kib as f64 / 1024.0),
            med(&|c| c.mib_per_1000),
            med(&|c| c.mib_per_1000_over_baseline),
            med(&|c| c.dropped_while_idle as f64),
            med(&|c| c.load1),
        );
    }

    println!("\n## Ingest and relay (median of {} runs)\n", args.runs);
    println!(
        "| scenario | msg/s | broker CPU µs/msg | PUBACK p50 ms | p99 ms | sent | acked | processed | \
         lost (sum of runs) | stored = last reported | RSS MiB | load |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut names: Vec<String> = Vec::new();
    for row in &r.ingest {
        if !names.contains(&row.scenario) {
            names.push(row.scenario.clone());
        }
    }
    for name in &names {
        let rows: Vec<&IngestRow> = r.ingest.iter().filter(|i| &i.scenario == name).collect();
        let med = |f: &dyn Fn(&IngestRow) -> f64| median(rows.iter().map(|c| f(c)));
        let stored = rows
            .iter()
            .filter_map(|i| i.stored_ok.zip(i.devices_checked))
            .map(|(o, c)| format!("{o}/{c}"))
            .collect::<Vec<_>>();
        println!(
            "| {name} | {:.0} | {:.2} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {} | {} | {:.0} | {:.1} |",
            med(&|i| i.rate),
            med(&|i| i.cpu_us_per_msg),
            med(&|i| i.flood.latency.p50_ms),
            med(&|i| i.flood.latency.p99_ms),
            med(&|i| i.flood.sent as f64),
            med(&|i| i.flood.acked as f64),
            med(&|i| i.processed as f64),
            rows.iter().map(|i| i.lost).sum::<u64>(),
            if stored.is_empty() {
                "—".to_owned()
            } else {
                stored.join(", ")
            },
            med(&|i| i.rss_kib as f64 / 1024.0),
            med(&|i| i.load1),
        );
    }
    // Every gateway scenario against every stock-rumqttd relay of the same run (medians).
    let rate_of = |needle: &str| -> f64 {
        median(
            r.ingest
                .iter()
                .filter(|i| i.scenario == needle)
                .map(|i| i.rate),
        )
    };
    let relay_prefix = format!("{} relay", Kind::Rumqttd.label());
    println!();
    for gw in names.iter().filter(|n| n.starts_with("fleetgate")) {
        for relay in names.iter().filter(|n| n.starts_with(&relay_prefix)) {
            let (a, b) = (rate_of(gw), rate_of(relay));
            if a.is_finite() && b.is_finite() && b > 0.0 {
                println!("- {gw} / {relay}: **{:.0}%**", a / b * 100.0);
            }
        }
    }
    for n in &r.notes {
        println!("- note: {n}");
    }
}
