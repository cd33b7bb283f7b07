//! Benchmark of the OTA engine (docs/BENCHMARKS.md, "OTA"): progress reports of 10,000
//! devices through the state machine into the store, on a manual clock with a recording
//! pusher (the engine tests' harness, `fleetgate::testing::ota`).
//! `cargo bench -p fleetgate --bench ota`.

mod common;

use fleetgate::ota::task::TaskStatus;
use fleetgate::ota::{EngineConfig, OtaEngine};
use fleetgate::registry::{NewDevice, Page};
use fleetgate::testing::ota::H;
use fleetgate_topics::{ProgressRequest, ProgressStep};
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn main() {
    common::run(&["progress_throughput"], |_| progress_throughput());
}

/// Throughput of progress reports through the state machine into the store
/// (`cargo bench -p fleetgate --bench ota`).
///
/// Each message takes the production path after the broker: the wire payload is parsed
/// (`ProgressRequest::parse`, as ingest does), the engine finds the device's active task,
/// applies the event through the pure transition function and updates the task table; plain
/// percent updates are then written by the batched flush, which runs every
/// `progress_flush_ms` (200 ms) during the measurement as the deadline task does. The rate
/// counts the time until the last update is committed; afterwards the engine is reopened from
/// the store (as after `kill -9`) and every task must show the last reported percent.
async fn progress_throughput() {
    let mut h = H::new().await;
    let names: Arc<Vec<String>> = Arc::new((0..DEVICES).map(|i| format!("dev-{i:05}")).collect());
    let jid = pushed_job(&h, &names).await;

    // First progress of every device: a noted transition (NOTIFIED → IN_PROGRESS), awaited
    // in the store before the call returns (write-ahead).
    let started = std::time::Instant::now();
    report_all(&h, &names, Arc::new(vec![progress(1)]), 8, false).await;
    let e = started.elapsed();
    println!(
        "first progress (durable, 8 sequential workers): {:.0}/s",
        DEVICES as f64 / e.as_secs_f64()
    );
    assert_eq!(
        h.engine.get_job(&jid).unwrap().counters.in_progress,
        DEVICES as u64
    );

    // Percent updates 2..=ROUNDS+1 from every device, with the periodic batched flush running.
    let payloads: Arc<Vec<Vec<u8>>> = Arc::new((2..ROUNDS + 2).map(progress).collect());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flusher = periodic_flush(h.engine.clone(), stop.clone());
    let started = std::time::Instant::now();
    report_all(&h, &names, payloads, WORKERS, true).await;
    let applied = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let flushes = flusher.await.unwrap();
    h.engine.flush_dirty().await;
    let total = started.elapsed();
    let n = DEVICES * ROUNDS as usize;
    println!(
        "progress updates: {n} applied in {applied:?} ({:.0}/s); committed to the store after \
         {total:?} = {:.0}/s ({flushes} periodic flushes + a final one)",
        n as f64 / applied.as_secs_f64(),
        n as f64 / total.as_secs_f64(),
    );

    // What reached the store: reopen without a shutdown (no final flush by the engine).
    h.crash();
    check_reopened(&h, &jid);
}

const DEVICES: usize = 10_000;
const ROUNDS: u8 = 50;
const WORKERS: usize = 4;

/// `names` as connected devices of the product, and a job for all of them with every push
/// sent; the job's id.
async fn pushed_job(h: &H, names: &[String]) -> String {
    let rows = names
        .iter()
        .map(|dn| NewDevice {
            device_name: dn.clone(),
            device_secret: None,
            tags: Default::default(),
        })
        .collect();
    h.registry.batch_create_devices(&h.pk, rows).await.unwrap();
    h.pusher
        .connected
        .lock()
        .unwrap()
        .extend(names.iter().cloned());
    let fid = h.firmware("2.0", true).await;
    let started = std::time::Instant::now();
    let jid = h.engine.create_job(h.spec(&fid)).await.unwrap().job.job_id;
    println!("create job with {DEVICES} tasks: {:?}", started.elapsed());
    let started = std::time::Instant::now();
    h.engine.run_due().await;
    println!(
        "push {DEVICES}: {:?} ({} published)",
        started.elapsed(),
        h.pusher.total()
    );
    jid
}

/// A progress report of `step` percent, as a device sends it.
fn progress(step: u8) -> Vec<u8> {
    ProgressRequest::new(7u64, ProgressStep::Percent(step), None, "default").to_vec()
}

/// Every device reports each of `payloads` in turn (parsed as ingest does), split over
/// `workers` tasks; `yielding` lets other tasks run after each report, as a socket read does
/// in the gateway.
async fn report_all(
    h: &H,
    names: &Arc<Vec<String>>,
    payloads: Arc<Vec<Vec<u8>>>,
    workers: usize,
    yielding: bool,
) {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (engine, pk, names, payloads) = (
            h.engine.clone(),
            h.pk.clone(),
            names.clone(),
            payloads.clone(),
        );
        set.spawn(async move {
            for p in payloads.iter() {
                for dn in names.iter().skip(w).step_by(workers) {
                    let req = ProgressRequest::parse(p).unwrap();
                    engine
                        .on_progress(&pk, dn, &req.params.module, req.params.step)
                        .await;
                    if yielding {
                        // A percent update never waits; in the gateway every message follows
                        // a socket read, which lets other tasks (the flush) run in between.
                        tokio::task::yield_now().await;
                    }
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// The batched flush every `progress_flush_ms`, as the deadline task runs it, until `stop`;
/// the number of flushes.
fn periodic_flush(
    engine: OtaEngine,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u32> {
    let every = std::time::Duration::from_millis(
        u64::try_from(EngineConfig::default().progress_flush_ms).unwrap(),
    );
    tokio::spawn(async move {
        let mut flushes = 0u32;
        while !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(every).await;
            engine.flush_dirty().await;
            flushes += 1;
        }
        flushes
    })
}

/// After a reopen: every task of job `jid` in progress at the last reported percent.
fn check_reopened(h: &H, jid: &str) {
    let tasks = h
        .engine
        .list_tasks(jid, None, Page::new(1, 100).unwrap())
        .unwrap();
    assert_eq!(tasks.total, DEVICES as u64);
    for i in 0..DEVICES {
        let t = h.engine.get_task(jid, &format!("dev-{i:05}")).unwrap();
        assert_eq!(t.status, TaskStatus::InProgress);
        assert_eq!(t.progress, Some(ROUNDS + 1), "dev-{i:05}");
    }
    assert_eq!(
        h.engine.get_job(jid).unwrap().counters.in_progress,
        DEVICES as u64
    );
}
