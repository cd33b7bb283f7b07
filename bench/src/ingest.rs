//! Part 2, ingest: connected devices publishing QoS1 reports with an in-flight window against
//! the gateway, and the bare rumqttd relay with the same load generator.
use crate::api::{devices, Api, Device};
use crate::loadgen::{self, FloodStats, PayloadKind, Subscriber, SubscriberStats};
use crate::procs::{Bins, Kind, Server};
use crate::{load1, provision, Args, Results, TOKEN};
use anyhow::{ensure, Context};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const INGEST_PRODUCT: &str = "benchingest";
const RELAY_PRODUCT: &str = "benchrelay";

#[derive(Serialize, Clone)]
pub(crate) struct IngestRow {
    pub scenario: String,
    pub run: usize,
    pub flood: FloodStats,
    /// Gateway: processed-message counter delta; relay: distinct messages at the subscriber.
    pub processed: u64,
    /// Gateway only: devices whose stored version (after kill -9 + restart) is the last one
    /// they reported, out of `devices_checked`.
    pub stored_ok: Option<usize>,
    pub devices_checked: Option<usize>,
    pub malformed: Option<u64>,
    /// Gateway only: publishes refused by the topic ACL (must be 0).
    pub acl_denied: Option<u64>,
    pub subscriber: Option<SubscriberStats>,
    pub rss_kib: u64,
    /// Broker CPU time (user + system) per message during the flood, microseconds.
    pub cpu_us_per_msg: f64,
    pub warnings_logged: u64,
    /// Messages per second this row counts as its rate: PUBACKed/s for the gateway (PUBACK
    /// means processed), distinct messages received/s for a relay.
    pub rate: f64,
    pub lost: u64,
    /// 1-minute load average when the run started.
    pub load1: f64,
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

/// Part 2: every ingest scenario, then the relay comparison.
pub(crate) async fn benchmark(
    args: &Args,
    bins: &Bins,
    results: &mut Results,
) -> anyhow::Result<()> {
    let (d, p) = (args.ingest_devices, args.relay_publishers);
    let use_tmpfs = !args.no_tmpfs;
    let scenarios = scenarios(args, bins);
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
            print_row(&row, run);
            results.ingest.push(row);
        }
    }
    Ok(())
}

/// The scenarios of part 2, in order: the gateway's (with tmpfs and jemalloc variants when
/// available), then the relays; only those named by `--only` when given.
fn scenarios(args: &Args, bins: &Bins) -> Vec<Scenario> {
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
    if !args.no_tmpfs {
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
    scenarios
}

fn print_row(row: &IngestRow, run: usize) {
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
}

/// The version device `dev` reports in message `seq` of a scenario run.
pub(crate) fn version_of(tag: &str, seq: usize) -> String {
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
    let warnings = warnings_logged(&server);
    let processed = (after - before) as u64;

    // Durability: PUBACK for an inform means committed. Kill without any shutdown, restart on
    // the same data dir, and compare every device's stored version with its last report.
    let (stored_ok, checked) = if kind == PayloadKind::Inform {
        server.kill9().await?;
        let ok = stored_after_restart(bins, dir, &devs, &version_of(tag, messages - 1)).await?;
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

/// Restarts the gateway on `dir` and counts the devices whose stored version is `want`.
async fn stored_after_restart(
    bins: &Bins,
    dir: &Path,
    devs: &[Device],
    want: &str,
) -> anyhow::Result<usize> {
    let server = Server::fleetgate(bins, dir, TOKEN, None).await?;
    let api = Api::new(server.http.context("no http")?, TOKEN);
    let stored = api.versions(INGEST_PRODUCT, "MCU").await?;
    let ok = devs
        .iter()
        .filter(|d| stored.get(&d.device_name).and_then(|v| v.as_deref()) == Some(want))
        .count();
    server.stop().await?;
    Ok(ok)
}

/// The warnings the gateway logged (a sample of them printed).
fn warnings_logged(server: &Server) -> u64 {
    let warnings = server
        .log
        .warnings
        .load(std::sync::atomic::Ordering::Relaxed);
    if warnings > 0 {
        if let Ok(s) = server.log.samples.lock() {
            eprintln!("    gateway warnings: {s:?}");
        }
    }
    warnings
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
