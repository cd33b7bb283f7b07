//! Console benchmark (`--parts console`, issue 19, "Speed"): one release gateway with a product
//! of `--console-tasks` devices (offline) and one upgrade job for all of them (as many QUEUED
//! tasks), and a second product whose devices publish.
//!
//! 1. **Render time**: each console page an operator opens first — the dashboard, the job's
//!    page (its first and its last page of tasks: the pager walks the job's members) and the
//!    blocks the pages poll (dashboard, job bar, push chart) — requested `--console-requests`
//!    times one after another by a logged-in session, on a kept-alive connection to
//!    127.0.0.1: time to the last byte of the body, p50 / p99 / max. Every answer is checked
//!    (200, and the job's first or last device in the table) so a page that renders nothing
//!    fast does not count.
//! 2. **Ingest with and without viewers**: `--console-ingest-devices` devices each publish
//!    `--console-ingest-messages` QoS 1 version reports (the ingest part's load generator),
//!    alternately with no console open and with `--console-viewers` viewers, each with a
//!    session of its own and two tabs as a browser keeps them: the dashboard (its block asked
//!    again every 5 s) and the job's page (the bar every 2 s, the push chart every 15 s), the
//!    same polling the pages' htmx attributes do. Measured per flood: PUBACKed messages/s and
//!    the gateway's CPU per message; with viewers, also their requests and render times under
//!    the load. The order alternates run by run (without first in odd runs), on the same
//!    gateway process.

use crate::api::{devices, Api};
use crate::loadgen::{self, FloodStats, PayloadKind};
use crate::procs::{Bins, Server};
use crate::stats::{median, Latency};
use crate::{load1, provision, version_of, Args, Results, TOKEN};
use anyhow::{ensure, Context};
use serde::Serialize;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The product whose job the console shows (its devices stay offline).
const JOB_PRODUCT: &str = "benchconsole";
/// The product whose devices publish.
const INGEST_PRODUCT: &str = "benchcingest";
/// Requests of each page before the measured ones (connection, caches).
const WARM_UP: usize = 3;

/// Render times of one console page.
#[derive(Serialize, Clone)]
pub(crate) struct RenderRow {
    pub page: String,
    pub path: String,
    pub requests: usize,
    /// Time to the last byte of the body, 127.0.0.1, one request at a time.
    pub latency: Latency,
    /// Server time of the same requests, from the gateway's access log (`latency_ms`: the
    /// request in, the response out, rendering included).
    pub server: Latency,
    pub bytes: usize,
    pub tasks: usize,
    pub load1: f64,
}

/// One flood of the ingest comparison.
#[derive(Serialize, Clone)]
pub(crate) struct ViewerIngestRow {
    pub run: usize,
    /// Console viewers open during the flood (0: none).
    pub viewers: usize,
    pub flood: FloodStats,
    /// PUBACKed messages per second.
    pub rate: f64,
    /// Gateway CPU (user + system) during the flood per message, microseconds.
    pub cpu_us_per_msg: f64,
    /// Console requests the viewers made during the flood, and how many did not answer 200.
    pub viewer_requests: usize,
    pub viewer_errors: usize,
    /// Their time to the last byte under the load.
    pub viewer_latency: Latency,
    /// Their server time (access log) under the load.
    pub viewer_server: Latency,
    pub load1: f64,
}

/// A logged-in console session: a client that keeps its connection and does not follow
/// redirects, and the session cookie.
#[derive(Clone)]
struct Viewer {
    base: String,
    http: reqwest::Client,
    cookie: String,
}

impl Viewer {
    async fn login(http_addr: SocketAddr) -> anyhow::Result<Viewer> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let base = format!("http://{http_addr}");
        let resp = http
            .post(format!("{base}/console/login"))
            .form(&[("token", TOKEN)])
            .send()
            .await
            .context("console login")?;
        ensure!(resp.status() == 303, "console login: {}", resp.status());
        let cookie = resp
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .context("console login: no cookie")?
            .to_owned();
        Ok(Viewer { base, http, cookie })
    }

    /// `GET path`: status, body and time to its last byte.
    async fn get(&self, path: &str) -> anyhow::Result<(u16, String, Duration)> {
        let t = Instant::now();
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .header("hx-request", "true")
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = resp.status().as_u16();
        let body = resp.text().await?;
        Ok((status, body, t.elapsed()))
    }
}

/// Part 8: see the module docs.
pub(crate) async fn benchmark(
    args: &Args,
    bins: &Bins,
    results: &mut Results,
) -> anyhow::Result<()> {
    let tasks = args.console_tasks;
    let senders = args.console_ingest_devices;
    let dir = args.work_dir.join("console-data");
    provision(
        bins,
        &dir,
        &[(JOB_PRODUCT, tasks), (INGEST_PRODUCT, senders)],
    )
    .await?;
    let server = Server::fleetgate(bins, &dir, TOKEN, None).await?;
    let http = server.http.context("no http")?;
    let api = Api::new(http, TOKEN);
    let fid = api
        .upload_firmware(JOB_PRODUCT, "2.0.0", vec![0x5a; 64 * 1024])
        .await?;
    let job = api
        .post(
            "/api/v1/ota/jobs",
            &json!({
                "firmware_id": fid,
                "target": "ALL",
                "force": true,
                "name": "console bench",
                "rate": {"per_minute": 1000},
                "timeout_seconds": 600,
            }),
        )
        .await?;
    let jid = job["job_id"].as_str().context("no job_id")?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let j = api.get(&format!("/api/v1/ota/jobs/{jid}"), &[]).await?;
        if j["counters"]["total"].as_u64() == Some(tasks as u64) {
            ensure!(
                j["status"] == "IN_PROGRESS",
                "the console's job is not running: {j}"
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the job never had {tasks} tasks: {j}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("console: job {jid} with {tasks} tasks (devices offline)");

    render_times(args, &server, http, &jid, tasks, results).await?;
    ingest_with_viewers(args, &server, http, &jid, results).await?;
    server.stop().await
}

/// The pages measured, and what each must contain.
fn pages(jid: &str, tasks: usize) -> Vec<(&'static str, String, String)> {
    let last_page = tasks.div_ceil(50).max(1);
    let first = "dev00000".to_owned();
    let last = format!("dev{:05}", tasks.saturating_sub(1));
    vec![
        ("dashboard", "/console".into(), format!("id=\"dj-{jid}\"")),
        (
            "dashboard block (polled every 5 s)",
            "/console/dashboard/live".into(),
            format!("id=\"dj-{jid}\""),
        ),
        (
            "job page, first page of tasks",
            format!("/console/ota/jobs/{jid}"),
            format!("data-device=\"{first}\""),
        ),
        (
            "job page, last page of tasks",
            format!("/console/ota/jobs/{jid}?page={last_page}"),
            format!("data-device=\"{last}\""),
        ),
        (
            "job bar block (polled every 2 s)",
            format!("/console/ota/jobs/{jid}/live"),
            "id=\"job-status\">IN_PROGRESS<".into(),
        ),
        (
            "job push chart (polled every 15 s)",
            format!("/console/ota/jobs/{jid}/push-rate"),
            "push-chart".into(),
        ),
    ]
}

/// Takes the console requests' server times the gateway logged so far, waiting (up to 5 s)
/// until there are at least `at_least`.
async fn server_times(server: &Server, at_least: usize) -> Vec<(String, f64)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let taken = {
            let mut kept = server
                .log
                .console_requests
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            (kept.len() >= at_least || Instant::now() > deadline)
                .then(|| std::mem::take(&mut *kept))
        };
        if let Some(taken) = taken {
            return taken;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Latency of access-log times in milliseconds.
fn latency_of_ms(times: impl Iterator<Item = f64>) -> Latency {
    let mut us: Vec<u32> = times.map(|ms| (ms * 1000.0).round() as u32).collect();
    Latency::from_micros(&mut us)
}

async fn render_times(
    args: &Args,
    server: &Server,
    http: SocketAddr,
    jid: &str,
    tasks: usize,
    results: &mut Results,
) -> anyhow::Result<()> {
    let viewer = Viewer::login(http).await?;
    for (page, path, marker) in pages(jid, tasks) {
        let load = load1();
        server_times(server, 0).await;
        let mut samples = Vec::with_capacity(args.console_requests);
        let mut bytes = 0;
        for i in 0..WARM_UP + args.console_requests {
            let (status, body, took) = viewer.get(&path).await?;
            ensure!(status == 200, "{path}: {status}: {body}");
            ensure!(
                body.contains(&marker),
                "{path}: the page lacks {marker}: {body}"
            );
            if i >= WARM_UP {
                samples.push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
                bytes = body.len();
            }
        }
        // This page's lines only (the login's may come late); the access log has no query.
        let bare = path.split('?').next().unwrap_or(&path);
        let logged: Vec<f64> = server_times(server, WARM_UP + args.console_requests)
            .await
            .into_iter()
            .filter(|(p, _)| p == bare)
            .map(|(_, ms)| ms)
            .collect();
        ensure!(
            logged.len() == WARM_UP + args.console_requests,
            "{path}: {} access-log lines for {} requests",
            logged.len(),
            WARM_UP + args.console_requests
        );
        let row = RenderRow {
            page: page.to_owned(),
            server: latency_of_ms(logged.into_iter().skip(WARM_UP)),
            path,
            requests: samples.len(),
            latency: Latency::from_micros(&mut samples),
            bytes,
            tasks,
            load1: load,
        };
        eprintln!(
            "console render {:<40} server p50 {:>7.2} ms p99 {:>7.2} ms max {:>7.2} ms; to last byte p50 {:>7.2} ms p99 {:>7.2} ms; {} bytes (load {:.1})",
            row.page,
            row.server.p50_ms,
            row.server.p99_ms,
            row.server.max_ms,
            row.latency.p50_ms,
            row.latency.p99_ms,
            row.bytes,
            row.load1
        );
        results.console_render.push(row);
    }
    Ok(())
}

/// What the viewers saw during one flood.
#[derive(Default)]
struct Seen {
    samples: Vec<u32>,
    errors: usize,
}

/// The tabs each viewer keeps open: the page opened first (none: a block of the page
/// before), the block it polls, and how often (the pages' `hx-trigger`).
fn tabs(jid: &str) -> [(String, String, u64); 3] {
    [
        (
            "/console".to_owned(),
            "/console/dashboard/live".to_owned(),
            5,
        ),
        (
            format!("/console/ota/jobs/{jid}"),
            format!("/console/ota/jobs/{jid}/live"),
            2,
        ),
        (
            String::new(),
            format!("/console/ota/jobs/{jid}/push-rate"),
            15,
        ),
    ]
}

/// Opens every viewer's pages (before the flood: a browser opens a page once), then polls
/// their blocks as the pages do until `stop`, each viewer at an offset of its own.
async fn open_viewers(
    viewers: &[Viewer],
    jid: &str,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    for v in viewers {
        for (open, _, _) in tabs(jid) {
            if !open.is_empty() {
                let (status, body, _) = v.get(&open).await?;
                ensure!(status == 200, "{open}: {status}: {body}");
            }
        }
    }
    let n = viewers.len().max(1) as u32;
    let mut handles = Vec::new();
    for (i, v) in viewers.iter().enumerate() {
        for (_, poll, every_s) in tabs(jid) {
            let (v, stop, seen) = (v.clone(), stop.clone(), seen.clone());
            // Viewers opened at different moments, not in lockstep.
            let offset = Duration::from_secs(every_s) * (i as u32 + 1) / n;
            handles.push(tokio::spawn(async move {
                let start = tokio::time::Instant::now() + offset;
                let mut tick = tokio::time::interval_at(start, Duration::from_secs(every_s));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            continue;
                        }
                    }
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let r = v.get(&poll).await;
                    let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                    match r {
                        Ok((200, _, took)) => s
                            .samples
                            .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX)),
                        _ => s.errors += 1,
                    }
                }
            }));
        }
    }
    Ok(handles)
}

async fn ingest_with_viewers(
    args: &Args,
    server: &Server,
    http: SocketAddr,
    jid: &str,
    results: &mut Results,
) -> anyhow::Result<()> {
    let n = args.console_ingest_devices;
    let messages = args.console_ingest_messages;
    let devs = devices(INGEST_PRODUCT, n);
    let mut viewers = Vec::new();
    for _ in 0..args.console_viewers {
        viewers.push(Viewer::login(http).await?);
    }
    for run in 1..=args.runs {
        let order = if run % 2 == 1 {
            [0, args.console_viewers]
        } else {
            [args.console_viewers, 0]
        };
        for open in order {
            let load = load1();
            let (cs, clients) =
                loadgen::connect_all(server.mqtt, &devs, args.concurrency, args.window).await;
            ensure!(
                cs.failed == 0,
                "console ingest: {} of {n} devices failed to connect: {:?}",
                cs.failed,
                cs.errors
            );
            let clients: Vec<_> = clients.into_iter().flatten().collect();
            let tag = format!("c{run}v{open}");
            let size = args.payload_bytes;
            let make: loadgen::MessageFn = Arc::new(move |i, seq| {
                (
                    format!("/ota/device/inform/{INGEST_PRODUCT}/dev{i:05}"),
                    loadgen::payload(PayloadKind::Inform, seq, &version_of(&tag, seq), size),
                )
            });
            let stop = Arc::new(AtomicBool::new(false));
            let seen = Arc::new(Mutex::new(Seen::default()));
            let handles = open_viewers(&viewers[..open], jid, stop.clone(), seen.clone()).await?;
            // The server times of the polls during the flood only.
            server_times(server, 0).await;
            let cpu_before = server.cpu_s()?;
            let flood = loadgen::flood(clients, messages, make, Duration::from_secs(600)).await;
            let cpu = server.cpu_s()? - cpu_before;
            stop.store(true, Ordering::Relaxed);
            for h in handles {
                let _ = h.await;
            }
            ensure!(
                flood.acked == (n * messages) as u64,
                "console ingest: {} of {} PUBACKed: {:?}",
                flood.acked,
                n * messages,
                flood.client_errors
            );
            let mut seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|p| p.into_inner()));
            let logged = server_times(server, seen.samples.len() + seen.errors).await;
            let row = ViewerIngestRow {
                run,
                viewers: open,
                rate: flood.acked_per_s,
                cpu_us_per_msg: cpu * 1e6 / flood.acked.max(1) as f64,
                viewer_requests: seen.samples.len() + seen.errors,
                viewer_errors: seen.errors,
                viewer_latency: Latency::from_micros(&mut seen.samples),
                // The polls' lines (an opened page's may come after the clearing above).
                viewer_server: latency_of_ms(
                    logged
                        .iter()
                        .filter(|(p, _)| p.ends_with("/live") || p.ends_with("/push-rate"))
                        .map(|(_, ms)| *ms),
                ),
                load1: load,
                flood,
            };
            eprintln!(
                "console ingest run {run}, {open} viewers: {:>8.0} msg/s in {:.1} s, gateway CPU {:.2} µs/msg, \
                 viewer requests {} (errors {}) server p50 {:.1} ms p99 {:.1} ms, to last byte p50 {:.1} ms p99 {:.1} ms (load {:.1})",
                row.rate,
                row.flood.elapsed_s,
                row.cpu_us_per_msg,
                row.viewer_requests,
                row.viewer_errors,
                row.viewer_server.p50_ms,
                row.viewer_server.p99_ms,
                row.viewer_latency.p50_ms,
                row.viewer_latency.p99_ms,
                row.load1
            );
            results.console_ingest.push(row);
        }
    }
    Ok(())
}

/// The Markdown tables of the part.
pub(crate) fn print_report(r: &Results) {
    if !r.console_render.is_empty() {
        println!("\n## Console render time (server time from the access log; time to last byte on 127.0.0.1)\n");
        println!("| page | tasks | requests | server p50 ms | p99 ms | max ms | to last byte p50 ms | p99 ms | max ms | bytes | load |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in &r.console_render {
            println!(
                "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.1} |",
                row.page,
                row.tasks,
                row.requests,
                row.server.p50_ms,
                row.server.p99_ms,
                row.server.max_ms,
                row.latency.p50_ms,
                row.latency.p99_ms,
                row.latency.max_ms,
                row.bytes,
                row.load1
            );
        }
    }
    if r.console_ingest.is_empty() {
        return;
    }
    println!("\n## Ingest with and without console viewers (every flood)\n");
    println!(
        "| run | viewers | msg/s | gateway CPU µs/msg | viewer requests | errors | viewer server p50 / p99 ms | to last byte p50 / p99 ms | load |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &r.console_ingest {
        println!(
            "| {} | {} | {:.0} | {:.2} | {} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} |",
            row.run,
            row.viewers,
            row.rate,
            row.cpu_us_per_msg,
            row.viewer_requests,
            row.viewer_errors,
            row.viewer_server.p50_ms,
            row.viewer_server.p99_ms,
            row.viewer_latency.p50_ms,
            row.viewer_latency.p99_ms,
            row.load1
        );
    }
    let of = |viewers: bool| {
        r.console_ingest
            .iter()
            .filter(|row| (row.viewers > 0) == viewers)
            .collect::<Vec<_>>()
    };
    let (with, without) = (of(true), of(false));
    let rate = |rows: &[&ViewerIngestRow]| median(rows.iter().map(|r| r.rate));
    let cpu = |rows: &[&ViewerIngestRow]| median(rows.iter().map(|r| r.cpu_us_per_msg));
    println!(
        "\nMedians: {:.0} msg/s without viewers, {:.0} with; ratio with/without {:.3}; \
         CPU {:.2} vs {:.2} µs/msg (ratio {:.3}).",
        rate(&without),
        rate(&with),
        rate(&with) / rate(&without),
        cpu(&without),
        cpu(&with),
        cpu(&with) / cpu(&without)
    );
}
