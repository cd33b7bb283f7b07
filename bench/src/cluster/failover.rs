//! Part 3 of the cluster benchmark, failover: devices on node 1, node 1 killed with SIGKILL,
//! each device reconnecting to the survivors the way a device SDK with a server list does;
//! the time until every device is back, until node 1 is declared dead and until another node
//! drives the engines.

use super::fleet::Node;
use super::{engines_driver, held_by, wait_online};
use crate::api::{Api, Device};
use crate::loadgen::{self};
use crate::stats::{median, Latency};
use crate::{load1, Args, Results};
use anyhow::{bail, ensure, Context};
use rumqttc::{Event, Packet};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// What one device of the failover run saw.
struct Reconnected {
    /// Kill → CONNACK from a survivor.
    after: Option<Duration>,
    failed_attempts: u64,
}

pub(super) async fn failover(
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
        let c = client.context("connected")?;
        let (d, kill_rx, stop_rx) = (d.clone(), kill_rx.clone(), stop_rx.clone());
        let back = Arc::clone(&back);
        tasks.push(tokio::spawn(reconnect(
            i, c, d, survivors, kill_rx, stop_rx, back,
        )));
    }
    tokio::time::sleep(Duration::from_secs(args.settle_s)).await;
    let drove_engines = engines_driver(&nodes[0].api).await? == Some(1);
    // SIGKILL node 1.
    let killed = Instant::now();
    kill_tx.send_replace(Some(killed));
    let pid = nodes[0].server.pid()?;
    crate::procs::signal(pid, libc::SIGKILL);
    let dead_after = declared_dead(&nodes[1].api, killed).await?;
    // Another node drives the engines (node 1 held the lease).
    let engines_taken_over_s = if drove_engines {
        Some(engines_taken_over(&nodes[1..], killed).await?)
    } else {
        None
    };
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

/// Device `i`, held on node 1 until its connection breaks, then reconnecting to the
/// `survivors` alternately with a device SDK's back-off until one accepts it; connected until
/// `stop_rx` says stop.
async fn reconnect(
    i: usize,
    mut c: loadgen::Connected,
    d: Device,
    survivors: [SocketAddr; 2],
    kill_rx: tokio::sync::watch::Receiver<Option<Instant>>,
    mut stop_rx: tokio::sync::watch::Receiver<bool>,
    back: Arc<AtomicUsize>,
) -> Reconnected {
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
                return Reconnected {
                    after,
                    failed_attempts,
                };
            }
            Err(_) => {
                failed_attempts += 1;
                // A device SDK's back-off: short, growing, jittered.
                let ms = (100 * attempt as u64).min(1000) + (i as u64 % 97);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
    }
}

/// Node 2 declares node 1 dead after `node_timeout_ms`: the time from the kill until its
/// `/api/v1/cluster` no longer lists node 1 (at most a minute).
async fn declared_dead(api: &Api, killed: Instant) -> anyhow::Result<Duration> {
    loop {
        let view = api.get("/api/v1/cluster", &[]).await?;
        let listed = view["nodes"]
            .as_array()
            .is_some_and(|ns| ns.iter().any(|n| n["node"] == 1));
        if !listed {
            return Ok(killed.elapsed());
        }
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("node 2 still lists node 1 a minute after its SIGKILL");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Seconds from the kill until one of `survivors` says it drives the engines (at most a
/// minute).
async fn engines_taken_over(survivors: &[Node], killed: Instant) -> anyhow::Result<f64> {
    loop {
        let mut now_at = None;
        for node in survivors {
            now_at = now_at.or(engines_driver(&node.api).await?.filter(|&id| id != 1));
        }
        if now_at.is_some() {
            return Ok(killed.elapsed().as_secs_f64());
        }
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("no node drives the engines a minute after node 1's SIGKILL");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The failover table (median of runs).
pub(super) fn print_table(args: &Args, r: &Results) {
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
