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
//! 7. **Forwarding** (`--parts forward`, issue 17): property posts from MQTT through the outbox
//!    to a RabbitMQ consumer group, three nodes then one, in the same run (`forward.rs`).
//! 8. **Console** (`--parts console`, issue 19): render time of the dashboard and of a job
//!    page with 10,000 tasks, and ingest with and without console viewers polling, in the
//!    same run (`console.rs`).
//! 9. **RRPC** (`--parts rrpc`, issue 20): synchronous RRPC round trips through the HTTP API
//!    to connected devices that answer, against the same request/response between bare
//!    clients through stock rumqttd, in the same run (`c2d.rs`).
//! 10. **Broadcast** (`--parts broadcast`, issue 20): the API's broadcast to N connected devices
//!     at configured rates; delivered/s at the devices and the rate's accuracy (`c2d.rs`).
//!
//! Every socket is on 127.0.0.1; every phase is bounded in count and time. Results go to stdout
//! as Markdown tables (medians of `--runs`) and, with `--json-out`, as JSON with every run.

mod api;
mod c2d;
mod campaign;
mod cluster;
mod connect;
mod console;
mod deployment;
mod forward;
mod ingest;
mod loadgen;
mod machine;
mod migrate;
mod proc_cpu;
mod procs;
mod report;
mod sim;
mod stats;
mod syscalls;

use anyhow::{ensure, Context};
use api::{devices, Api};
use clap::Parser;
use procs::{Bins, Server};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub(crate) use ingest::version_of;
pub(crate) use machine::load1;

const TOKEN: &str = "bench-admin-token-0123456789";

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
    /// Cluster: HAProxy's `nbthread` (default: HAProxy's own, one thread per CPU).
    #[arg(long)]
    haproxy_threads: Option<u16>,
    /// Cluster: a line added to HAProxy's `global` section (repeatable), e.g.
    /// `--haproxy-global "tune.maxpollevents 1000"`.
    #[arg(long)]
    haproxy_global: Vec<String>,
    /// Cluster: a line added to HAProxy's `defaults` section (repeatable), e.g.
    /// `--haproxy-defaults "option splice-auto"`.
    #[arg(long)]
    haproxy_defaults: Vec<String>,
    /// Cluster: an argument added to every cluster node's `serve` command line (repeatable;
    /// every part that starts three nodes), e.g. `--cluster-node-arg=--config --cluster-node-arg=node.toml`.
    #[arg(long, allow_hyphen_values = true)]
    cluster_node_arg: Vec<String>,
    /// Cluster: devices connected through HAProxy (≤ ~9,000: two descriptors each there).
    #[arg(long, default_value_t = 8_000)]
    cluster_connect_devices: usize,
    /// Cluster: devices publishing version reports in the ingest comparison.
    #[arg(long, default_value_t = 300)]
    cluster_ingest_devices: usize,
    /// Cluster: reports per device in the ingest comparison.
    #[arg(long, default_value_t = 200)]
    cluster_ingest_messages: usize,
    /// Cluster ingest: count each process's system calls during the floods (`perf stat`,
    /// needs root or `kernel.perf_event_paranoid` ≤ -1); the ingest rows then carry the calls
    /// per message (`syscalls_per_msg`).
    #[arg(long)]
    count_syscalls: bool,
    /// Cluster: devices on the node that is killed in the failover measurement.
    #[arg(long, default_value_t = 10_000)]
    failover_devices: usize,
    /// Forwarding: the RabbitMQ server (each run declares exchanges and a queue of its own).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Forwarding: devices posting property reports.
    #[arg(long, default_value_t = 300)]
    forward_devices: usize,
    /// Forwarding: property posts per device.
    #[arg(long, default_value_t = 200)]
    forward_messages: usize,
    /// Console: tasks of the job whose pages are measured (as many offline devices).
    #[arg(long, default_value_t = 10_000)]
    console_tasks: usize,
    /// Console: measured requests of each page.
    #[arg(long, default_value_t = 100)]
    console_requests: usize,
    /// Console: devices publishing version reports in the ingest comparison.
    #[arg(long, default_value_t = 1_000)]
    console_ingest_devices: usize,
    /// Console: reports per device per flood in the ingest comparison.
    #[arg(long, default_value_t = 2_000)]
    console_ingest_messages: usize,
    /// Console: viewers open during the floods "with viewers".
    #[arg(long, default_value_t = 5)]
    console_viewers: usize,
    /// RRPC: connected devices answering (calls go round robin over them).
    #[arg(long, default_value_t = 1000)]
    rrpc_devices: usize,
    /// RRPC: calls measured per run and path (after one warm-up call per device).
    #[arg(long, default_value_t = 20_000)]
    rrpc_calls: usize,
    /// RRPC: calls in flight at once (HTTP connections to the gateway; the gateway's HTTP
    /// connection cap in benchmarks is 24).
    #[arg(long, default_value_t = 16)]
    rrpc_concurrency: usize,
    /// Broadcast: connected devices addressed (≤ 1,000 per API call, all calls at once).
    #[arg(long, default_value_t = 10_000)]
    broadcast_devices: usize,
    /// Broadcast: `[commands] broadcast_per_sec` values, one gateway run each.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    broadcast_rates: Vec<u32>,
    /// Broadcast: QoS of the message (0 or 1).
    #[arg(long, default_value_t = 1)]
    broadcast_qos: u8,
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
    /// Property posts MQTT → outbox → RabbitMQ consumer, three nodes then one (`forward.rs`).
    Forward,
    /// Console render times, and ingest with and without console viewers (`console.rs`).
    Console,
    /// Synchronous RRPC through the HTTP API vs a bare client pair on rumqttd (`c2d.rs`).
    Rrpc,
    /// The API's broadcast to connected devices at configured rates (`c2d.rs`).
    Broadcast,
}

#[derive(Serialize, Default)]
struct Results {
    machine: Option<machine::Machine>,
    args: String,
    notes: Vec<String>,
    connect: Vec<connect::ConnectRow>,
    ingest: Vec<ingest::IngestRow>,
    ota: Vec<campaign::CampaignRow>,
    migration: Vec<migrate::MigrationRow>,
    cluster_connect: Vec<cluster::ClusterConnectRow>,
    cluster_ingest: Vec<cluster::ClusterIngestRow>,
    failover: Vec<cluster::FailoverRow>,
    forward: Vec<forward::ForwardRow>,
    console_render: Vec<console::RenderRow>,
    console_ingest: Vec<console::ViewerIngestRow>,
    rrpc: Vec<c2d::RrpcRow>,
    broadcast: Vec<c2d::BroadcastRow>,
}

/// The binaries the run starts, from the arguments or beside this one; the gateway's and
/// stock rumqttd's must exist.
fn bins(args: &Args, exe_dir: &std::path::Path) -> anyhow::Result<Bins> {
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
    Ok(bins)
}

/// Runs the parts `--parts` names, in their fixed order, into `results`.
async fn run_parts(
    args: &Args,
    bins: &Bins,
    exe_dir: &std::path::Path,
    nofile: u64,
    results: &mut Results,
) -> anyhow::Result<()> {
    if args.parts.contains(&Part::Connect) {
        connect::benchmark(args, bins, nofile, results).await?;
    }
    if args.parts.contains(&Part::Ingest) {
        ingest::benchmark(args, bins, results).await?;
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
        campaign::benchmark(
            args,
            bins,
            &sim_bin,
            &[deployment::Deployment::Single],
            results,
        )
        .await?;
    }
    if args.parts.contains(&Part::ClusterOta) {
        let both = [
            deployment::Deployment::Cluster,
            deployment::Deployment::Single,
        ];
        campaign::benchmark(args, bins, &sim_bin, &both, results).await?;
    }
    if args.parts.contains(&Part::Migration) {
        migrate::benchmark(args, bins, &sim_bin, results).await?;
    }
    if args.parts.contains(&Part::Cluster) {
        cluster::run(args, bins, results).await?;
    }
    if args.parts.contains(&Part::Forward) {
        forward::benchmark(args, bins, results).await?;
    }
    if args.parts.contains(&Part::Console) {
        console::benchmark(args, bins, results).await?;
    }
    if args.parts.contains(&Part::Rrpc) {
        c2d::rrpc(args, bins, results).await?;
    }
    if args.parts.contains(&Part::Broadcast) {
        c2d::broadcast(args, bins, results).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nofile = procs::raise_nofile();
    let exe_dir = std::env::current_exe()?
        .parent()
        .context("no exe dir")?
        .to_owned();
    let bins = bins(&args, &exe_dir)?;
    let mut results = Results {
        machine: Some(machine::machine(nofile)),
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

    run_parts(&args, &bins, &exe_dir, nofile, &mut results).await?;

    report::print(&args, &results);
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
