//! Part 1, connections: N devices connected at once with signed Link CONNECTs against the
//! gateway, stock rumqttd and optionally Mosquitto.
use crate::api::{devices, Api, Device};
use crate::loadgen;
use crate::loadgen::ConnectStats;
use crate::procs::{self, Bins, Kind, Server};
use crate::{load1, provision, Args, Results, TOKEN};
use serde::Serialize;
use std::path::Path;
use std::time::Duration;

const CONN_PRODUCT: &str = "benchconn";
/// File descriptors each process needs besides its MQTT sockets.
const FD_RESERVE: u64 = 100;

#[derive(Serialize, Clone)]
pub(crate) struct ConnectRow {
    pub broker: Kind,
    pub clients: usize,
    pub run: usize,
    pub stats: ConnectStats,
    pub baseline_rss_kib: u64,
    pub rss_kib: u64,
    /// Total RSS / connected × 1,000, MiB.
    pub mib_per_1000: f64,
    /// (RSS − baseline) / connected × 1,000, MiB.
    pub mib_per_1000_over_baseline: f64,
    /// The gateway's own count (`/healthz` `online_devices`).
    pub online_reported: Option<u64>,
    pub dropped_while_idle: u64,
    /// Every device also subscribed to its upgrade topic (RSS read after the SUBACKs).
    pub subscribed: bool,
    pub subacks: u64,
    /// Broker threads when RSS was read.
    pub threads: u64,
    /// 1-minute load average when the run started.
    pub load1: f64,
}

/// Part 1: the connection curve of every broker.
pub(crate) async fn benchmark(
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
