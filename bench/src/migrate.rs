//! Migration benchmark (issue 6, "Speed"): one release gateway with `[migration]
//! devices_per_sec` set, one simulator process with N connected devices of one product, a
//! second instance, and a migration task: a one-device canary (the lifecycle allows `full` only
//! from CANARY_COMPLETED), then the full migration.
//!
//! Measured: `full` → COMPLETED (the task's `completed_at_ms`) and devices/s over it; the time
//! until every device is online again; every device MIGRATED, owned by the target instance and
//! online (the migration device list), and reconnected (the simulator's per-device CONNACK
//! count ≥ 2, no refused CONNECT).

use crate::api::{devices, Api, Device};
use crate::procs::{Bins, Server};
use crate::sim::Sim;
use anyhow::{ensure, Context};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

pub const PRODUCT: &str = "benchmig";
const TARGET: &str = "iot-bench-target";

#[derive(Debug, Clone, Serialize)]
pub struct MigrationRow {
    pub run: usize,
    pub devices: usize,
    /// `[migration] devices_per_sec`; `None` = the gateway's default (not set in the config).
    pub devices_per_sec: Option<u32>,
    pub load1_start: f64,
    pub load1_end: f64,
    pub connect_secs: f64,
    /// `POST …/full` → `completed_at_ms`.
    pub full_to_completed_secs: f64,
    /// Devices moved by the full migration (all but the canary) / that time.
    pub devices_per_sec_measured: f64,
    /// `POST …/full` → `/healthz` reports every device online again (after COMPLETED).
    pub full_to_all_online_secs: f64,
    pub state: String,
    pub totals: Value,
    /// From the migration device list.
    pub migrated: u64,
    pub online_in_target: u64,
    /// From the simulator: devices with at least 2 CONNACKs (initial + after the move).
    pub reconnected: u64,
    pub connect_refused: u64,
    pub kicks_metric: f64,
    /// Gateway RSS with every device connected, before `full`.
    pub gateway_rss_before_kib: u64,
    /// Gateway RSS after every device reconnected (3 s after the last one).
    pub gateway_rss_kib: u64,
    /// `--migration-rollback`: RSS after a rollback of all devices (a second reconnect of
    /// every device), 3 s after the last one was back: growing again means a leak per
    /// reconnect, staying means a high-water mark.
    pub gateway_rss_after_rollback_kib: Option<u64>,
    pub gateway_warnings: u64,
}

fn scenario(seed: u64) -> String {
    format!(
        "name = \"migration\"\nseed = {seed}\n\n[mqtt]\nconnect_rate = 2000\nstart_jitter_secs = 0\n\
         keep_alive_secs = 120\nconnect_timeout_secs = 30\n\n[telemetry]\ninterval_secs = 0\n\
         reply_timeout_secs = 0\n"
    )
}

async fn wait_state(api: &Api, tid: &str, want: &str, limit: Duration) -> anyhow::Result<Value> {
    let t = Instant::now();
    loop {
        let task = api.get(&format!("/api/v1/migrations/{tid}"), &[]).await?;
        if task["state"] == want {
            return Ok(task);
        }
        ensure!(
            t.elapsed() < limit,
            "migration task not {want} after {:.0} s: {task}",
            limit.as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub async fn run_once(
    bins: &Bins,
    sim_bin: &Path,
    work: &Path,
    n: usize,
    rate: Option<u32>,
    run: usize,
    rollback: bool,
) -> anyhow::Result<MigrationRow> {
    let load_start = crate::load1();
    let label = rate.map_or_else(|| "default".to_owned(), |r| r.to_string());
    let dir = work.join(format!("migration-{label}-{run}"));
    crate::fresh_dir(&dir)?;
    let (server, api) = start_gateway(bins, &dir, rate).await?;
    let devs = devices(PRODUCT, n);
    api.provision(PRODUCT, &devs).await?;
    api.post(
        "/api/v1/instances",
        &json!({"instance_id": TARGET, "name": "bench target"}),
    )
    .await?;

    let t = Instant::now();
    let mut sim = Sim::start(
        sim_bin,
        &dir,
        "migration",
        &scenario(run as u64),
        &devs,
        &[server.mqtt],
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while api.online().await? < n as u64 {
        sim.check_running()?;
        ensure!(
            Instant::now() < deadline,
            "devices not all online after 300 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let connect_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let tid = create_with_canary(&api, &devs).await?;

    let rss_before = server.rss_kib()?;
    let limit =
        Duration::from_secs_f64(n as f64 / f64::from(rate.unwrap_or(500).max(50)) * 3.0 + 120.0);
    let (full_to_completed_secs, full_to_all_online_secs) =
        full(&api, &mut sim, &tid, n, limit).await?;
    // Settle, then read every device's status from the migration API.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rows = api
        .all_items(&format!("/api/v1/migrations/{tid}/devices"), &[])
        .await?;
    let migrated = rows.iter().filter(|d| d["status"] == "MIGRATED").count() as u64;
    let online_in_target = online_in_target(&rows);
    let kicks = api.metric("fleetgate_migration_kicks_total").await?;
    let rss = server.rss_kib()?;
    let final_task = api.get(&format!("/api/v1/migrations/{tid}"), &[]).await?;
    let rss_after_rollback = if rollback {
        Some(rollback_all(&api, &server, &mut sim, &tid, n, limit).await?)
    } else {
        None
    };
    let (reconnected, refused) = reconnects(&sim.stop().await?)?;
    let warnings = server
        .log
        .warnings
        .load(std::sync::atomic::Ordering::Relaxed);
    server.stop().await?;
    Ok(MigrationRow {
        run,
        devices: n,
        devices_per_sec: rate,
        load1_start: load_start,
        load1_end: crate::load1(),
        connect_secs,
        full_to_completed_secs,
        devices_per_sec_measured: (n - 1) as f64 / full_to_completed_secs.max(1e-3),
        full_to_all_online_secs,
        state: final_task["state"].as_str().unwrap_or("?").to_owned(),
        totals: final_task["devices"].clone(),
        migrated,
        online_in_target,
        reconnected,
        connect_refused: refused,
        kicks_metric: kicks,
        gateway_rss_before_kib: rss_before,
        gateway_rss_kib: rss,
        gateway_rss_after_rollback_kib: rss_after_rollback,
        gateway_warnings: warnings,
    })
}

/// Starts the full migration of task `tid` and waits for COMPLETED (within `limit`), then
/// for all `n` devices back online: (seconds to COMPLETED by the server's clock, seconds until
/// every device was online).
async fn full(
    api: &Api,
    sim: &mut Sim,
    tid: &str,
    n: usize,
    limit: Duration,
) -> anyhow::Result<(f64, f64)> {
    let full_at = now_ms();
    let full_started = Instant::now();
    api.post(&format!("/api/v1/migrations/{tid}/full"), &Value::Null)
        .await?;
    let done = wait_state(api, tid, "COMPLETED", limit).await?;
    let completed_ms = done["completed_at_ms"]
        .as_i64()
        .context("no completed_at_ms")?;
    let full_to_completed_secs = (completed_ms - full_at) as f64 / 1000.0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while api.online().await? < n as u64 {
        sim.check_running()?;
        ensure!(
            Instant::now() < deadline,
            "only {} of {n} devices online 120 s after COMPLETED",
            api.online().await?
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let full_to_all_online_secs = full_started.elapsed().as_secs_f64();
    Ok((full_to_completed_secs, full_to_all_online_secs))
}

/// Devices migrated, in the target instance and online.
fn online_in_target(rows: &[Value]) -> u64 {
    rows.iter()
        .filter(|d| d["status"] == "MIGRATED" && d["instance_id"] == TARGET && d["online"] == true)
        .count() as u64
}

/// A gateway in `dir` (with `[migration] devices_per_sec = rate` when given).
async fn start_gateway(
    bins: &Bins,
    dir: &Path,
    rate: Option<u32>,
) -> anyhow::Result<(Server, Api)> {
    let mut bins = bins.clone();
    if let Some(r) = rate {
        let conf = dir.join("fleetgate.toml");
        std::fs::write(&conf, format!("[migration]\ndevices_per_sec = {r}\n"))?;
        bins.gateway_env
            .push(("FLEETGATE_CONFIG".into(), conf.display().to_string()));
    }
    let server = Server::fleetgate(&bins, &dir.join("data"), crate::TOKEN, None).await?;
    let api = Api::new(server.http.context("no http")?, crate::TOKEN);
    Ok((server, api))
}

/// Creates the migration of the product to [`TARGET`] and migrates the first device as its
/// canary; the task id once the canary is back online (every device of `devs` online).
async fn create_with_canary(api: &Api, devs: &[Device]) -> anyhow::Result<String> {
    let task = api
        .post(
            "/api/v1/migrations",
            &json!({"product_key": PRODUCT, "target_instance_id": TARGET}),
        )
        .await?;
    let tid = task["task_id"].as_str().context("no task_id")?.to_owned();
    api.post(
        &format!("/api/v1/migrations/{tid}/canary"),
        &json!({"device_names": [devs[0].device_name]}),
    )
    .await?;
    wait_state(api, &tid, "CANARY_COMPLETED", Duration::from_secs(60)).await?;
    // The canary device reconnects before the full migration starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.online().await? < devs.len() as u64 {
        ensure!(Instant::now() < deadline, "canary device not back online");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(tid)
}

/// From the simulator's summary: the devices that connected again (at least twice), and the
/// CONNECTs refused in all.
fn reconnects(summary: &Value) -> anyhow::Result<(u64, u64)> {
    let outcomes = summary["devices"]
        .as_array()
        .context("no devices in summary")?;
    let reconnected = outcomes
        .iter()
        .filter(|d| d["connects"].as_u64().unwrap_or(0) >= 2)
        .count() as u64;
    let refused = outcomes
        .iter()
        .map(|d| d["connect_refused"].as_u64().unwrap_or(0))
        .sum();
    Ok((reconnected, refused))
}

/// Rolls every device back to the source (each reconnects once more) and returns the
/// gateway's RSS 3 s after all are online again.
async fn rollback_all(
    api: &Api,
    server: &Server,
    sim: &mut Sim,
    tid: &str,
    n: usize,
    limit: Duration,
) -> anyhow::Result<u64> {
    api.post(
        &format!("/api/v1/migrations/{tid}/rollback"),
        &json!({"all": true}),
    )
    .await?;
    wait_state(api, tid, "TO_MIGRATE", limit).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while api.online().await? < n as u64 {
        sim.check_running()?;
        ensure!(
            Instant::now() < deadline,
            "devices not all online after the rollback"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.rss_kib()
}

/// Part 4: `--runs` migrations per `--migration-rates` value.
pub(crate) async fn benchmark(
    args: &crate::Args,
    bins: &Bins,
    sim_bin: &Path,
    results: &mut crate::Results,
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
            let row = run_once(
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
