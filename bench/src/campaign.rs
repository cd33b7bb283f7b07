//! OTA campaign benchmark (issue 4, "Speed and memory"): one release gateway, one simulator
//! process with N provisioned devices (a few percent of each terminal fault: progress -1..-4,
//! hang, wrong version), one firmware package and one STATIC upgrade job for every device with a
//! constant push rate and a timeout.
//!
//! Measured: time to COMPLETED; every task's terminal state against the fault the simulator
//! injected into that device (mismatches must be 0), and the job statistics against the same
//! expectation; pushes per whole minute from the tasks' `pushed` history entries (read through
//! the API) against the configured rate; gateway RSS before the job, with the job's tasks
//! created, at its peak and after completion.

use crate::api::{devices, Api};
use crate::deployment::{Deployment, Gateway};
use crate::procs::Bins;
use crate::sim::Sim;
use anyhow::{ensure, Context};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

pub const PRODUCT: &str = "benchota";
const SOURCE_VERSION: &str = "1.0.0";
const TARGET_VERSION: &str = "2.0.0";
/// The terminal faults injected, each at `fault_percent`.
const FAULTS: [&str; 6] = [
    "update_failed",
    "download_failed",
    "verify_failed",
    "write_failed",
    "hang",
    "wrong_version",
];

/// Settings of one campaign.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub devices: usize,
    pub rate_per_minute: u32,
    /// Probability of each terminal fault, percent.
    pub fault_percent: f64,
    pub timeout_seconds: u32,
    pub firmware_kib: usize,
    pub seed: u64,
    /// CONNECTs per second of the simulator.
    pub connect_rate: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct CampaignRow {
    pub run: usize,
    /// `single node (SQLite)` or `3 nodes (PostgreSQL) via HAProxy`.
    pub deployment: String,
    /// PostgreSQL transactions committed per second, job created → finished (cluster only).
    pub pg_commits_per_s: Option<f64>,
    /// PostgreSQL rows inserted, updated or deleted per second, same span (cluster only).
    pub pg_rows_per_s: Option<f64>,
    pub settings: Settings,
    pub load1_start: f64,
    pub load1_end: f64,
    /// Simulator start → every device online at the gateway.
    pub connect_secs: f64,
    pub job_id: String,
    pub job_status: String,
    /// Job `created_at_ms` → `finished_at_ms` (server clock).
    pub completion_secs: f64,
    /// First → last rate-limited push.
    pub push_span_secs: f64,
    pub counters: Value,
    pub statistics: Value,
    /// Expected terminal outcome → devices, from the faults the simulator drew.
    pub expected: BTreeMap<String, u64>,
    /// Terminal outcome → tasks, from the gateway's task list.
    pub observed: BTreeMap<String, u64>,
    /// Devices whose task ended otherwise than the fault they got implies.
    pub mismatches: u64,
    pub mismatch_samples: Vec<String>,
    /// Devices whose own upgrade result disagrees with the fault drawn (simulator check).
    pub sim_inconsistent: u64,
    /// Devices with more than one upgrade attempt of the target (repushes after a reconnect).
    pub devices_multi_attempt: u64,
    /// The statistics API's `failures` equal the expected failures, and its succeeded count
    /// the expected successes.
    pub statistics_match: bool,
    /// `pushed` history entries (rate-limited pushes) and `repushed` ones.
    pub pushes: u64,
    pub repushes: u64,
    /// Pushes in each whole minute from the first push.
    pub pushes_per_minute: Vec<u64>,
    /// Largest |pushes in a whole minute / rate − 1|, percent.
    pub max_minute_deviation_pct: f64,
    /// Mean rate over first → last push, per minute.
    pub mean_rate_per_minute: f64,
    pub gateway_rss_before_kib: u64,
    /// A few seconds after the job (and its N tasks) was created, before most pushes.
    pub gateway_rss_with_tasks_kib: u64,
    pub gateway_rss_peak_kib: u64,
    pub gateway_rss_after_kib: u64,
    /// (RSS with tasks − RSS before) scaled to 10,000 tasks, MiB.
    pub mib_per_10k_tasks: f64,
    pub sim_rss_kib: u64,
    pub sim_summary_ota: Value,
    pub gateway_warnings: u64,
}

fn load1() -> f64 {
    crate::load1()
}

fn scenario(s: &Settings) -> String {
    let mut t = format!(
        "name = \"ota-campaign\"\nseed = {}\n\n[mqtt]\nconnect_rate = {}\nstart_jitter_secs = 0\n\
         keep_alive_secs = 120\nconnect_timeout_secs = 30\n\n[fleet]\n\
         versions = [{{ module = \"default\", version = \"{SOURCE_VERSION}\" }}]\n\n\
         [ota]\nwrite_secs = 2.0\nreboot_secs = 1.0\n\n[telemetry]\ninterval_secs = 0\n\
         reply_timeout_secs = 0\n",
        s.seed, s.connect_rate
    );
    for kind in FAULTS {
        t.push_str(&format!(
            "\n[[faults]]\nkind = \"{kind}\"\nprobability = {}\n",
            s.fault_percent / 100.0
        ));
    }
    t
}

/// The outcome label a fault implies at the gateway.
fn expected_for(fault: Option<&str>) -> &'static str {
    match fault {
        None => "SUCCEEDED",
        Some("update_failed") => "FAILED/UPDATE_FAILED",
        Some("download_failed") => "FAILED/DOWNLOAD_FAILED",
        Some("verify_failed") => "FAILED/VERIFY_FAILED",
        Some("write_failed") => "FAILED/WRITE_FAILED",
        Some("hang") => "FAILED/TIMEOUT",
        Some("wrong_version") => "FAILED/WRONG_VERSION",
        Some(_) => "?",
    }
}

/// The outcome label of the simulator's own upgrade result.
fn sim_label(result: &Value) -> String {
    match (result["result"].as_str(), result["code"].as_i64()) {
        (Some("succeeded"), _) => "SUCCEEDED".into(),
        (Some("failed"), Some(-1)) => "FAILED/UPDATE_FAILED".into(),
        (Some("failed"), Some(-2)) => "FAILED/DOWNLOAD_FAILED".into(),
        (Some("failed"), Some(-3)) => "FAILED/VERIFY_FAILED".into(),
        (Some("failed"), Some(-4)) => "FAILED/WRITE_FAILED".into(),
        (Some("hung"), _) => "FAILED/TIMEOUT".into(),
        (Some("wrong_version"), _) => "FAILED/WRONG_VERSION".into(),
        (r, c) => format!(
            "sim:{}{}",
            r.unwrap_or("none"),
            c.map(|c| format!("{c}")).unwrap_or_default()
        ),
    }
}

/// The gateway's outcome label of a task (status, failure reason; the failure code must agree).
fn gateway_label(task: &Value) -> String {
    let status = task["status"].as_str().unwrap_or("?");
    match task["failure"].as_str() {
        None => status.to_owned(),
        Some(f) => {
            let code_ok = match f {
                "UPDATE_FAILED" => task["failure_code"] == -1,
                "DOWNLOAD_FAILED" => task["failure_code"] == -2,
                "VERIFY_FAILED" => task["failure_code"] == -3,
                "WRITE_FAILED" => task["failure_code"] == -4,
                _ => true,
            };
            if code_ok {
                format!("{status}/{f}")
            } else {
                format!("{status}/{f} (failure_code {})", task["failure_code"])
            }
        }
    }
}

/// Pushes per whole minute from the first push (a trailing partial minute is left out).
pub fn per_minute(sorted_ms: &[i64]) -> Vec<u64> {
    let (Some(&first), Some(&last)) = (sorted_ms.first(), sorted_ms.last()) else {
        return Vec::new();
    };
    let whole = usize::try_from((last - first) / 60_000).unwrap_or(0);
    let mut out = vec![0u64; whole];
    for &t in sorted_ms {
        let k = usize::try_from((t - first) / 60_000).unwrap_or(usize::MAX);
        if let Some(c) = out.get_mut(k) {
            *c += 1;
        }
    }
    out
}

pub async fn run_once(
    args: &crate::Args,
    bins: &Bins,
    sim_bin: &Path,
    s: &Settings,
    run: usize,
    deployment: Deployment,
) -> anyhow::Result<CampaignRow> {
    let load_start = load1();
    let (server, api, mut sim, fid, connect_secs) =
        prepare(args, bins, sim_bin, s, run, deployment).await?;
    // Let the connect storm's transient allocations settle (informs, subscriptions).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss_before = server.rss_kib()?;

    let jid = create_job(&api, &fid, s).await?;
    let pg_start = (Instant::now(), server.pg_counters().await?);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_with_tasks = server.rss_kib()?;
    let mut peaks = Peaks {
        gateway_rss_kib: rss_with_tasks,
        sim_rss_kib: sim.rss_kib()?,
    };
    let job = wait_finished(&mut sim, &api, &server, &jid, s, run, &mut peaks).await?;
    let rss_after = server.rss_kib()?;
    let (pg_commits_per_s, pg_rows_per_s) = pg_rates(pg_start, server.pg_counters().await?);
    let completion_secs = (job["finished_at_ms"].as_i64().unwrap_or(0)
        - job["created_at_ms"].as_i64().unwrap_or(0)) as f64
        / 1000.0;
    eprintln!(
        "ota run {run}: job {} after {completion_secs:.1} s: {}",
        job["status"], job["counters"]
    );
    let statistics = api
        .get(&format!("/api/v1/ota/jobs/{jid}/statistics"), &[])
        .await?;
    let tasks = api
        .all_items(&format!("/api/v1/ota/jobs/{jid}/tasks"), &[])
        .await?;
    let (push_times, repushes) = push_history(&api, &jid, &tasks).await?;
    // Give the last rebooted devices a moment, then stop the fleet and read its outcomes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let summary = sim.stop().await?;
    let load_end = load1();
    let warnings = server.warnings();
    server.stop().await?;

    let mut row = CampaignRow {
        run,
        deployment: match deployment {
            Deployment::Single => "single node (SQLite)".to_owned(),
            Deployment::Cluster => "3 nodes (PostgreSQL) via HAProxy".to_owned(),
        },
        pg_commits_per_s,
        pg_rows_per_s,
        settings: s.clone(),
        load1_start: load_start,
        load1_end: load_end,
        connect_secs,
        job_id: jid,
        job_status: job["status"].as_str().unwrap_or("?").to_owned(),
        completion_secs,
        push_span_secs: match (push_times.first(), push_times.last()) {
            (Some(a), Some(b)) => (b - a) as f64 / 1000.0,
            _ => 0.0,
        },
        counters: job["counters"].clone(),
        statistics: statistics.clone(),
        expected: BTreeMap::new(),
        observed: BTreeMap::new(),
        mismatches: 0,
        mismatch_samples: Vec::new(),
        sim_inconsistent: 0,
        devices_multi_attempt: 0,
        statistics_match: false,
        pushes: push_times.len() as u64,
        repushes,
        pushes_per_minute: per_minute(&push_times),
        max_minute_deviation_pct: 0.0,
        mean_rate_per_minute: 0.0,
        gateway_rss_before_kib: rss_before,
        gateway_rss_with_tasks_kib: rss_with_tasks,
        gateway_rss_peak_kib: peaks.gateway_rss_kib,
        gateway_rss_after_kib: rss_after,
        mib_per_10k_tasks: rss_with_tasks.saturating_sub(rss_before) as f64
            / 1024.0
            / s.devices as f64
            * 10_000.0,
        sim_rss_kib: peaks.sim_rss_kib,
        sim_summary_ota: summary["ota"].clone(),
        gateway_warnings: warnings,
    };
    push_rates(&mut row, s.rate_per_minute);
    cross_check(&mut row, &tasks, &summary)?;
    Ok(row)
}

/// The campaign's deployment with its devices provisioned and the firmware uploaded, and the
/// simulated fleet started and online: (gateway, its API, the fleet, firmware id, seconds
/// until every device was online).
async fn prepare(
    args: &crate::Args,
    bins: &Bins,
    sim_bin: &Path,
    s: &Settings,
    run: usize,
    deployment: Deployment,
) -> anyhow::Result<(Gateway, Api, Sim, String, f64)> {
    let dir = args.work_dir.join(match deployment {
        Deployment::Single => format!("ota-{run}"),
        Deployment::Cluster => format!("ota-cluster-{run}"),
    });
    crate::fresh_dir(&dir)?;
    let (server, api) = Gateway::start(deployment, args, bins, &dir, s.devices, &[]).await?;
    let devs = devices(PRODUCT, s.devices);
    api.provision(PRODUCT, &devs).await?;
    let fid = api
        .upload_firmware(PRODUCT, TARGET_VERSION, firmware(s.firmware_kib))
        .await?;

    let t = Instant::now();
    let mut sim = Sim::start(sim_bin, &dir, "ota", &scenario(s), &devs, &server.mqtt()).await?;
    wait_online(&mut sim, &api, s.devices).await?;
    let connect_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "ota run {run}: {} devices online in {connect_secs:.1} s",
        s.devices
    );
    Ok((server, api, sim, fid, connect_secs))
}

/// The row's push rates: the largest deviation of a whole minute from `rate_per_minute`, and
/// the mean rate from the first to the last push.
fn push_rates(row: &mut CampaignRow, rate_per_minute: u32) {
    row.max_minute_deviation_pct = row
        .pushes_per_minute
        .iter()
        .map(|&n| (n as f64 / f64::from(rate_per_minute) - 1.0).abs() * 100.0)
        .fold(0.0, f64::max);
    if row.push_span_secs > 0.0 {
        row.mean_rate_per_minute =
            (row.pushes.saturating_sub(1)) as f64 / row.push_span_secs * 60.0;
    }
}

/// Random-looking bytes (the simulator verifies the digest for real).
fn firmware(kib: usize) -> Vec<u8> {
    (0..kib * 1024)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8)
        .collect()
}

/// Waits up to 300 s until the gateway counts `n` devices online (the simulator still running).
async fn wait_online(sim: &mut Sim, api: &Api, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        sim.check_running()?;
        if api.online().await? >= n as u64 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {} of {} devices online after 300 s",
            api.online().await?,
            n
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Creates the campaign's job (every device, at the settings' rate) and checks it has a task
/// per device; its id.
async fn create_job(api: &Api, fid: &str, s: &Settings) -> anyhow::Result<String> {
    let job = api
        .post(
            "/api/v1/ota/jobs",
            &json!({
                "firmware_id": fid,
                "target": "ALL",
                "force": true,
                "name": "bench campaign",
                "rate": {"per_minute": s.rate_per_minute},
                "timeout_seconds": s.timeout_seconds,
            }),
        )
        .await?;
    let jid = job["job_id"].as_str().context("no job_id")?.to_owned();
    ensure!(
        job["counters"]["total"] == s.devices,
        "job has {} tasks, expected {}",
        job["counters"]["total"],
        s.devices
    );
    Ok(jid)
}

/// The highest resident memory seen while the job ran.
struct Peaks {
    gateway_rss_kib: u64,
    sim_rss_kib: u64,
}

/// Polls job `jid` every 2 s until it is neither IN_PROGRESS nor PLANNED (logging its
/// counters every 30 s), noting the memory peaks; the finished job. Fails when it takes more
/// than twice the pushes' time plus a timeout plus 5 minutes.
async fn wait_finished(
    sim: &mut Sim,
    api: &Api,
    server: &Gateway,
    jid: &str,
    s: &Settings,
    run: usize,
    peaks: &mut Peaks,
) -> anyhow::Result<Value> {
    let push_secs = s.devices as f64 / f64::from(s.rate_per_minute) * 60.0;
    let limit = Duration::from_secs_f64(push_secs * 2.0 + f64::from(s.timeout_seconds) + 300.0);
    let started = Instant::now();
    let mut last_log = Instant::now();
    loop {
        sim.check_running()?;
        let j = api.get(&format!("/api/v1/ota/jobs/{jid}"), &[]).await?;
        peaks.gateway_rss_kib = peaks.gateway_rss_kib.max(server.rss_kib()?);
        peaks.sim_rss_kib = peaks.sim_rss_kib.max(sim.rss_kib()?);
        if j["status"] != "IN_PROGRESS" && j["status"] != "PLANNED" {
            return Ok(j);
        }
        if last_log.elapsed() > Duration::from_secs(30) {
            last_log = Instant::now();
            eprintln!(
                "ota run {run}: {:.0} s {} (load {:.1})",
                started.elapsed().as_secs_f64(),
                j["counters"],
                load1()
            );
        }
        ensure!(
            started.elapsed() < limit,
            "job {jid} not finished after {:.0} s: {}",
            limit.as_secs_f64(),
            j
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// PostgreSQL commits/s and rows/s between two counter samples (cluster only).
fn pg_rates(
    (at, start): (Instant, Option<(i64, i64)>),
    end: Option<(i64, i64)>,
) -> (Option<f64>, Option<f64>) {
    match (start, end) {
        (Some((c0, r0)), Some((c1, r1))) => {
            let secs = at.elapsed().as_secs_f64().max(1e-3);
            (Some((c1 - c0) as f64 / secs), Some((r1 - r0) as f64 / secs))
        }
        _ => (None, None),
    }
}

/// `pushed` entry times (sorted) and the number of `repushed` entries, from every task's
/// history (`GET …/tasks/{dn}`, 8 requests in flight).
async fn push_history(api: &Api, jid: &str, tasks: &[Value]) -> anyhow::Result<(Vec<i64>, u64)> {
    let names: Vec<String> = tasks
        .iter()
        .filter_map(|t| t["device_name"].as_str().map(str::to_owned))
        .collect();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..8 {
        let api = api.clone();
        let mine: Vec<String> = names.iter().skip(w).step_by(8).cloned().collect();
        let jid = jid.to_owned();
        set.spawn(async move {
            let mut pushed = Vec::new();
            let mut repushed = 0u64;
            for dn in mine {
                let t = api
                    .get(&format!("/api/v1/ota/jobs/{jid}/tasks/{dn}"), &[])
                    .await?;
                for h in t["history"].as_array().context("no history")? {
                    match h["event"].as_str() {
                        Some("pushed") => pushed.push(h["at_ms"].as_i64().context("at_ms")?),
                        Some("repushed") => repushed += 1,
                        _ => {}
                    }
                }
            }
            anyhow::Ok((pushed, repushed))
        });
    }
    let mut all = Vec::with_capacity(names.len());
    let mut repushes = 0;
    while let Some(r) = set.join_next().await {
        let (p, r) = r??;
        all.extend(p);
        repushes += r;
    }
    all.sort_unstable();
    Ok((all, repushes))
}

/// Every device: the fault the simulator drew for its (last) upgrade attempt → the expected
/// terminal state; against the gateway's task. Also the statistics API against the same.
fn cross_check(row: &mut CampaignRow, tasks: &[Value], summary: &Value) -> anyhow::Result<()> {
    let by_name: HashMap<&str, &Value> = tasks
        .iter()
        .filter_map(|t| Some((t["device_name"].as_str()?, t)))
        .collect();
    let outcomes = summary["devices"]
        .as_array()
        .context("no devices in summary")?;
    ensure!(
        outcomes.len() == row.settings.devices,
        "simulator reported {} devices",
        outcomes.len()
    );
    for d in outcomes {
        let name = d["device_name"].as_str().unwrap_or("?");
        let attempts: Vec<&Value> = d["upgrades"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|u| {
                        u["to_version"] == TARGET_VERSION && u["result"]["result"] != "superseded"
                    })
                    .collect()
            })
            .unwrap_or_default();
        if attempts.len() > 1 {
            row.devices_multi_attempt += 1;
        }
        let last = attempts.last();
        let fault = last.and_then(|u| {
            u["faults"]
                .as_array()?
                .iter()
                .filter_map(Value::as_str)
                .find(|f| FAULTS.contains(f))
        });
        let expected = match last {
            Some(_) => expected_for(fault).to_owned(),
            None => "no upgrade attempt in the simulator".to_owned(),
        };
        if let Some(u) = last {
            if sim_label(&u["result"]) != expected {
                row.sim_inconsistent += 1;
            }
        }
        *row.expected.entry(expected.clone()).or_default() += 1;
        let observed = by_name
            .get(name)
            .map(|t| gateway_label(t))
            .unwrap_or_else(|| "no task".to_owned());
        *row.observed.entry(observed.clone()).or_default() += 1;
        if observed != expected {
            row.mismatches += 1;
            if row.mismatch_samples.len() < 10 {
                row.mismatch_samples.push(format!(
                    "{name}: fault {fault:?}, simulator {}, gateway {observed}",
                    last.map(|u| sim_label(&u["result"])).unwrap_or_default()
                ));
            }
        }
    }
    // The statistics API: failures by reason and successes, against the expectation.
    let stats = &row.statistics;
    let mut ok =
        stats["counters"]["succeeded"] == row.expected.get("SUCCEEDED").copied().unwrap_or(0);
    let failures = stats["failures"].as_object().cloned().unwrap_or_default();
    let expected_failures: BTreeMap<&str, u64> = row
        .expected
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("FAILED/")?, *v)))
        .collect();
    ok &= failures.len() == expected_failures.len();
    for (reason, n) in &expected_failures {
        ok &= failures.get(*reason).and_then(Value::as_u64) == Some(*n);
    }
    row.statistics_match = ok;
    Ok(())
}

/// Part 3 (and, with both deployments, the cluster campaign): `--runs` campaigns per deployment.
pub(crate) async fn benchmark(
    args: &crate::Args,
    bins: &Bins,
    sim_bin: &Path,
    deployments: &[Deployment],
    results: &mut crate::Results,
) -> anyhow::Result<()> {
    for (run, &deployment) in
        (1..=args.runs).flat_map(|run| deployments.iter().map(move |d| (run, d)))
    {
        let settings = Settings {
            devices: args.ota_devices,
            rate_per_minute: args.ota_rate,
            fault_percent: args.ota_fault_percent,
            timeout_seconds: args.ota_timeout_s,
            firmware_kib: args.ota_firmware_kib,
            seed: args.ota_seed + run as u64 - 1,
            connect_rate: 2_000,
        };
        let row = run_once(args, bins, sim_bin, &settings, run, deployment).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_minutes_only() {
        assert!(per_minute(&[]).is_empty());
        assert!(per_minute(&[0, 59_999]).is_empty());
        assert_eq!(per_minute(&[0, 1, 60_000, 119_999, 120_000]), vec![2, 2]);
    }

    #[test]
    fn labels() {
        assert_eq!(expected_for(Some("hang")), "FAILED/TIMEOUT");
        assert_eq!(
            gateway_label(&json!({"status":"FAILED","failure":"VERIFY_FAILED","failure_code":-3})),
            "FAILED/VERIFY_FAILED"
        );
        assert_ne!(
            gateway_label(&json!({"status":"FAILED","failure":"VERIFY_FAILED","failure_code":-1})),
            "FAILED/VERIFY_FAILED"
        );
        assert_eq!(
            sim_label(&json!({"result":"failed","code":-2})),
            "FAILED/DOWNLOAD_FAILED"
        );
        assert_eq!(sim_label(&json!({"result":"succeeded"})), "SUCCEEDED");
    }
}
