//! OTA screens: the job list, the job form (the API's validation errors shown on it), and a
//! job's page — the live stacked status bar with failures by code and success rate (polled
//! by htmx until the job finishes), pause/resume/cancel/confirm, and the paged per-device
//! table with cancel-selected and each device's timeline.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::session::Session;
use super::view::{self, field, Fields, Nav, Segment};
use super::{Console, Sess};
use crate::ota::engine::{JobFilter, PushSeries};
use crate::ota::model::{JobStatistics, JobStatus, JobView, TaskView};
use crate::ota::task::{FailureReason, TaskStatus};
use crate::ota::OtaEngine;
use crate::registry::Page;

const TASKS_PER_PAGE: u32 = 50;
/// How often an open job page asks for the bar (only while the job is not finished).
const POLL: &str = "every 2s";
/// How often it asks for the push chart: its buckets are minutes, and it reads every task.
const CHART_POLL: &str = "every 15s";
/// Columns of the push chart at most (a longer job gets buckets of several minutes).
const CHART_BUCKETS: usize = 60;

pub(super) fn routes() -> Router<Console> {
    Router::new()
        .route("/console/ota", get(list))
        .route("/console/ota/new", get(new_job))
        .route("/console/ota/jobs", post(create))
        .route("/console/ota/jobs/{jid}", get(job_page))
        .route("/console/ota/jobs/{jid}/live", get(live))
        .route("/console/ota/jobs/{jid}/push-rate", get(push_rate))
        .route("/console/ota/jobs/{jid}/tasks/cancel", post(cancel_tasks))
        .route("/console/ota/jobs/{jid}/tasks/{dn}", get(task_page))
        .route("/console/ota/jobs/{jid}/{action}", post(action))
}

fn engine(c: &Console) -> &OtaEngine {
    &c.api_state.ota
}

fn not_found(s: &Session, what: &str) -> Response {
    view::error_page(Some(s), StatusCode::NOT_FOUND, what)
}

#[derive(Deserialize, Default)]
pub(super) struct ListQuery {
    page: Option<u32>,
    status: Option<String>,
    tasks_status: Option<String>,
}

fn page_of(n: Option<u32>, size: u32) -> Page {
    Page::new(n.unwrap_or(1).max(1), size).unwrap_or_default()
}

async fn list(State(c): State<Console>, session: Sess, Query(q): Query<ListQuery>) -> Response {
    let ota = engine(&c);
    let status = q
        .status
        .as_deref()
        .filter(|s| !s.is_empty())
        .and_then(JobStatus::parse);
    let filter = JobFilter {
        status,
        ..Default::default()
    };
    let jobs = ota.list_jobs(&filter, page_of(q.page, 25));
    let status_q = status.map(|s| s.as_str()).unwrap_or("");
    let body = html! {
        @if session.may_operate() {
            p { a.button href="/console/ota/new" { "New OTA job" } }
        }
        form.row method="get" action="/console/ota" {
            label { "Status"
                select name="status" {
                    option value="" { "any" }
                    @for s in ["PLANNED", "IN_PROGRESS", "PAUSED", "COMPLETED", "CANCELED"] {
                        option value=(s) selected[s == status_q] { (s) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        div.table-wrap { table {
            thead { tr { th { "Job" } th { "Product" } th { "Target" } th { "Status" } th { "Progress" } th.hide-narrow { "Created" } } }
            tbody {
                @for j in &jobs.items {
                    @let k = &j.counters;
                    tr {
                        td { a href=(format!("/console/ota/jobs/{}", j.job.job_id)) { (job_name(j)) } }
                        td { (j.job.product_key) }
                        td { (j.job.module) " → " (j.job.dest_version) }
                        td { (j.job.status.as_str()) }
                        td { (view::progress(k.succeeded + k.failed + k.canceled, k.total, "finished tasks")) }
                        td.hide-narrow { (view::time(Some(j.job.created_at_ms))) }
                    }
                }
            }
        } }
        (view::pager(jobs.page, jobs.page_size, jobs.total, |p| format!("/console/ota?status={status_q}&page={p}")))
    };
    view::respond(
        StatusCode::OK,
        view::page("OTA jobs", Nav::Ota, Some(&session), body),
    )
}

fn job_name(j: &JobView) -> &str {
    j.job.spec.name.as_deref().unwrap_or(&j.job.job_id)
}

async fn new_job(State(c): State<Console>, session: Sess) -> Response {
    if !session.may_operate() {
        return view::error_page(
            Some(&session),
            StatusCode::FORBIDDEN,
            "A viewer may not create jobs.",
        );
    }
    job_form(&c, &session, &Vec::new(), None, StatusCode::OK)
}

/// The job form, filled with `f`, with the API's `error` (message, blamed field) if any.
fn job_form(
    c: &Console,
    session: &Session,
    f: &Fields,
    error: Option<(String, Option<String>)>,
    status: StatusCode,
) -> Response {
    let firmware = c
        .api_state
        .firmware
        .list(None, Page::new(1, 100).unwrap_or_default());
    let blamed = error
        .as_ref()
        .and_then(|(_, field)| field.as_deref())
        .map(form_field_of);
    let err_of = |name: &str| -> Option<String> {
        (blamed.as_deref() == Some(name))
            .then(|| error.as_ref().map(|e| e.0.clone()).unwrap_or_default())
    };
    let input = |name: &str, label: &str, kind: &str, hint: &str| -> Markup {
        let e = err_of(name);
        html! {
            label {
                (label)
                input type=(kind) name=(name) id=(format!("f-{name}")) value=(field(f, name))
                    aria-invalid=[e.as_ref().map(|_| "true")]
                    aria-describedby=[e.as_ref().map(|_| format!("e-{name}"))]
                    step=[(kind == "number").then_some("any")];
                @if !hint.is_empty() { span.small { (hint) } }
                @if let Some(e) = e { span.field-error id=(format!("e-{name}")) { (e) } }
            }
        }
    };
    let select = |name: &str, label: &str, options: &[&str]| -> Markup {
        let current = field(f, name);
        html! {
            label { (label)
                select name=(name) id=(format!("f-{name}")) {
                    @for o in options { option value=(o) selected[*o == current] { (o) } }
                }
            }
        }
    };
    let check = |name: &str, label: &str| -> Markup {
        html! { label.check { input type="checkbox" name=(name) value="true" checked[field(f, name) == "true"]; " " (label) } }
    };
    let fw_current = field(f, "firmware_id");
    let body = html! {
        @if let Some((msg, _)) = &error {
            p.error role="alert" #form-error { "The API refused the job: " (msg) }
        }
        form.stack method="post" action="/console/ota/jobs" {
            (view::csrf(session))
            label.wide { "Firmware package"
                select name="firmware_id" id="f-firmware_id" required
                    aria-invalid=[err_of("firmware_id").map(|_| "true")] {
                    option value="" { "— choose —" }
                    @for p in &firmware.items {
                        option value=(p.firmware_id) selected[p.firmware_id == fw_current] {
                            (p.firmware_id) " · " (p.product_key) " · " (p.module) " " (p.version) " (" (p.status.as_str()) ")"
                        }
                    }
                }
                @if let Some(e) = err_of("firmware_id") { span.field-error { (e) } }
            }
            (input("name", "Name", "text", ""))
            (select("job_type", "Job type", &["UPGRADE_FIRMWARE", "VERIFY_FIRMWARE"]))
            (select("target", "Target", &["ALL", "SPECIFIC", "GRAY", "TAG"]))
            (select("selection", "Selection", &["STATIC", "DYNAMIC"]))
            label.wide { "Devices (SPECIFIC: names separated by spaces, commas or lines)"
                textarea name="device_names" id="f-device_names" rows="3"
                    aria-invalid=[err_of("device_names").map(|_| "true")] { (field(f, "device_names")) }
                @if let Some(e) = err_of("device_names") { span.field-error { (e) } }
            }
            (input("gray_percent", "Gray percent (GRAY)", "number", "0 < p ≤ 100"))
            (input("tag_key", "Tag key (TAG)", "text", ""))
            (input("tag_value", "Tag value (TAG)", "text", "empty: any value"))
            (input("src_versions", "Source versions", "text", "comma-separated; empty: the package's"))
            (input("rate_per_minute", "Rate, devices/minute", "number", "empty: unlimited"))
            (input("rate_burst", "Burst", "number", ""))
            (input("ramp_factor", "Ramp factor", "number", "1.1..5"))
            (input("ramp_every_seconds", "Ramp every seconds", "number", ""))
            (input("ramp_every_succeeded", "Ramp every N successes", "number", ""))
            (input("ramp_max_per_minute", "Ramp maximum/minute", "number", ""))
            (input("start_at", "Start at (UTC)", "datetime-local", "empty: now"))
            (input("timeout_seconds", "Timeout, seconds", "number", "per attempt"))
            (input("stall_seconds", "Stall timeout, seconds", "number", ""))
            (input("retry_count", "Retries", "number", "0..10"))
            (input("retry_interval_seconds", "Retry interval, seconds", "number", ""))
            (input("abort_min_finished", "Abort after N finished", "number", ""))
            (input("abort_failure_percent", "…when failures reach %", "number", ""))
            (select("abort_action", "Abort action", &["CANCEL", "PAUSE"]))
            (check("need_confirm", "Tasks wait for confirmation"))
            (check("overwrite", "Overwrite other jobs' unfinished tasks"))
            (check("force", "Allow an unverified package"))
            div.wide { button type="submit" { "Create job" } }
        }
    };
    view::respond(
        status,
        view::page("New OTA job", Nav::Ota, Some(session), body),
    )
}

/// The form field showing an error the API reported against `api_field`.
fn form_field_of(api_field: &str) -> String {
    let f = api_field.split('[').next().unwrap_or(api_field);
    match f {
        "start_at_ms" => "start_at".into(),
        "target_tags" => "tag_key".into(),
        "rate" => "rate_per_minute".into(),
        "abort" => "abort_min_finished".into(),
        other => other
            .replace("rate.ramp.", "ramp_")
            .replace("rate.", "rate_")
            .replace("abort.", "abort_"),
    }
}

/// A number as JSON when it parses; otherwise the text itself, so the API's own validation
/// names the field.
fn number(v: &str) -> Value {
    if let Ok(i) = v.parse::<i64>() {
        return json!(i);
    }
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() => json!(x),
        _ => json!(v),
    }
}

/// `YYYY-MM-DDTHH:MM[:SS]` (UTC) as ms since the epoch.
fn datetime_ms(s: &str) -> Option<i64> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (hh, mm) = (t.next()??, t.next()??);
    let ss = t.next().flatten().unwrap_or(0);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400) + hh * 3600 + mm * 60 + ss) * 1000)
}

/// The API's `JobSpec` JSON from the form: only the fields given, nothing checked here.
fn spec_json(f: &Fields) -> Value {
    let mut spec = Map::new();
    let text = |spec: &mut Map<String, Value>, name: &str| {
        let v = field(f, name);
        if !v.is_empty() {
            spec.insert(name.into(), json!(v));
        }
    };
    for name in ["firmware_id", "job_type", "target", "selection", "name"] {
        text(&mut spec, name);
    }
    for name in [
        "gray_percent",
        "timeout_seconds",
        "stall_seconds",
        "retry_count",
        "retry_interval_seconds",
    ] {
        let v = field(f, name);
        if !v.is_empty() {
            spec.insert(name.into(), number(v));
        }
    }
    let names: Vec<&str> = field(f, "device_names")
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .collect();
    if !names.is_empty() {
        spec.insert("device_names".into(), json!(names));
    }
    if !field(f, "tag_key").is_empty() {
        let value = Some(field(f, "tag_value")).filter(|v| !v.is_empty());
        spec.insert(
            "target_tags".into(),
            json!([{"key": field(f, "tag_key"), "value": value}]),
        );
    }
    let src = field(f, "src_versions");
    if !src.is_empty() {
        let list: Vec<&str> = src
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        spec.insert("src_versions".into(), json!(list));
    }
    if !field(f, "rate_per_minute").is_empty() {
        let mut rate = Map::new();
        rate.insert("per_minute".into(), number(field(f, "rate_per_minute")));
        if !field(f, "rate_burst").is_empty() {
            rate.insert("burst".into(), number(field(f, "rate_burst")));
        }
        if !field(f, "ramp_factor").is_empty() {
            let mut ramp = Map::new();
            ramp.insert("factor".into(), number(field(f, "ramp_factor")));
            for (form, api) in [
                ("ramp_every_seconds", "every_seconds"),
                ("ramp_every_succeeded", "every_succeeded"),
                ("ramp_max_per_minute", "max_per_minute"),
            ] {
                if !field(f, form).is_empty() {
                    ramp.insert(api.into(), number(field(f, form)));
                }
            }
            rate.insert("ramp".into(), Value::Object(ramp));
        }
        spec.insert("rate".into(), Value::Object(rate));
    }
    let start = field(f, "start_at");
    if !start.is_empty() {
        spec.insert(
            "start_at_ms".into(),
            datetime_ms(start).map_or_else(|| json!(start), |ms| json!(ms)),
        );
    }
    if !field(f, "abort_min_finished").is_empty() || !field(f, "abort_failure_percent").is_empty() {
        spec.insert(
            "abort".into(),
            json!({
                "min_finished": number(field(f, "abort_min_finished")),
                "failure_percent": number(field(f, "abort_failure_percent")),
                "action": field(f, "abort_action"),
            }),
        );
    }
    for name in ["need_confirm", "overwrite", "force"] {
        if field(f, name) == "true" {
            spec.insert(name.into(), json!(true));
        }
    }
    Value::Object(spec)
}

async fn create(State(c): State<Console>, session: Sess, body: Bytes) -> Response {
    let f: Fields = form_urlencoded::parse(&body)
        .filter(|(k, _)| k != "csrf")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let answer = c
        .api
        .json(&session, Method::POST, "/api/v1/ota/jobs", &spec_json(&f))
        .await;
    if answer.ok() {
        let jid = answer.body["job_id"].as_str().unwrap_or_default();
        return Redirect::to(&format!("/console/ota/jobs/{jid}")).into_response();
    }
    let err = (answer.error_msg(), answer.error_field().map(str::to_owned));
    job_form(&c, &session, &f, Some(err), answer.status)
}

/// The statuses of the bar, in order, with their CSS classes.
fn segments(v: &JobView) -> Vec<Segment> {
    let k = &v.counters;
    let mut s = Vec::new();
    if k.confirm > 0 {
        s.push(Segment {
            label: "CONFIRM",
            class: "confirm",
            count: k.confirm,
        });
    }
    s.extend([
        Segment {
            label: "QUEUED",
            class: "queued",
            count: k.queued,
        },
        Segment {
            label: "NOTIFIED",
            class: "notified",
            count: k.notified,
        },
        Segment {
            label: "IN_PROGRESS",
            class: "in_progress",
            count: k.in_progress,
        },
        Segment {
            label: "SUCCEEDED",
            class: "succeeded",
            count: k.succeeded,
        },
        Segment {
            label: "FAILED",
            class: "failed",
            count: k.failed,
        },
        Segment {
            label: "CANCELED",
            class: "canceled",
            count: k.canceled,
        },
    ]);
    s
}

/// The live part of a job page: status, bar, success rate, failures by code. Polls itself
/// while the job can still change.
fn live_block(v: &JobView, stats: &JobStatistics) -> Markup {
    let jid = &v.job.job_id;
    let finished = v.job.status.is_finished();
    let rate = stats
        .success_rate
        .map(|r| format!("{:.1}%", r * 100.0))
        .unwrap_or_else(|| "—".into());
    html! {
        section #live .card aria-label="Job progress"
            hx-get=[(!finished).then(|| format!("/console/ota/jobs/{jid}/live"))]
            hx-trigger=[(!finished).then_some(POLL)]
            hx-swap=[(!finished).then_some("outerHTML")] {
            p { "Status: " strong #job-status { (v.job.status.as_str()) }
                @if let Some(r) = &v.job.status_reason { " · " span.small { (r) } } }
            (view::stacked_bar("job-bar", &segments(v)))
            div.kpis {
                div.kpi { strong #success-rate { (rate) } "success rate" }
                div.kpi { strong { (v.counters.total) } "tasks" }
                div.kpi { strong { (stats.pushes) } "pushes" }
                div.kpi { strong { (stats.retries) } "retries" }
                @if let Some(r) = v.current_rate_per_minute { div.kpi { strong { (format!("{r:.0}")) } "pushes/minute now" } }
            }
            h3 { "Failures by code" }
            table #failures {
                thead { tr { th { "Failure" } th { "Code" } th { "Devices" } } }
                tbody {
                    @for reason in FailureReason::ALL {
                        @let n = stats.failures.get(reason.as_str()).copied().unwrap_or(0);
                        @if n > 0 || reason.device_caused() {
                            tr data-reason=(reason.as_str()) {
                                td { (reason.as_str()) }
                                td { (reason.step_code().map(|c| c.to_string()).unwrap_or_else(|| "—".into())) }
                                td.count { (n) }
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn live(State(c): State<Console>, session: Sess, Path(jid): Path<String>) -> Response {
    let ota = engine(&c);
    match (ota.get_job(&jid), ota.job_statistics(&jid)) {
        (Ok(v), Ok(stats)) => view::respond(StatusCode::OK, live_block(&v, &stats)),
        _ => not_found(&session, "No such job."),
    }
}

/// The push chart of a job page: devices notified per minute. Polls itself (less often than
/// the bar) while the job can still change.
fn push_block(v: &JobView, series: &PushSeries) -> Markup {
    let jid = &v.job.job_id;
    let finished = v.job.status.is_finished();
    html! {
        section #push-rate .card aria-labelledby="push-rate-title"
            hx-get=[(!finished).then(|| format!("/console/ota/jobs/{jid}/push-rate"))]
            hx-trigger=[(!finished).then_some(CHART_POLL)]
            hx-swap=[(!finished).then_some("outerHTML")] {
            h3 #push-rate-title { "Devices notified per "
                @if series.bucket_ms > 60_000 { (series.bucket_ms / 60_000) " minutes" } @else { "minute" } }
            (view::push_chart("push-chart", series))
            p.small { "Each task counts once, at its latest push (a retry moves it)." }
        }
    }
}

async fn push_rate(State(c): State<Console>, session: Sess, Path(jid): Path<String>) -> Response {
    let ota = engine(&c);
    match (ota.get_job(&jid), ota.push_series(&jid, CHART_BUCKETS)) {
        (Ok(v), Ok(series)) => view::respond(StatusCode::OK, push_block(&v, &series)),
        _ => not_found(&session, "No such job."),
    }
}

async fn job_page(
    State(c): State<Console>,
    session: Sess,
    Path(jid): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    let ota = engine(&c);
    let (Ok(v), Ok(stats), Ok(series)) = (
        ota.get_job(&jid),
        ota.job_statistics(&jid),
        ota.push_series(&jid, CHART_BUCKETS),
    ) else {
        return not_found(&session, "No such job.");
    };
    let filter = q
        .tasks_status
        .as_deref()
        .filter(|s| !s.is_empty())
        .and_then(TaskStatus::parse);
    let tasks = match ota.list_tasks(&jid, filter, page_of(q.page, TASKS_PER_PAGE)) {
        Ok(t) => t,
        Err(_) => return not_found(&session, "No such job."),
    };
    let filter_q = filter.map(|s| s.as_str()).unwrap_or("");
    let job = &v.job;
    let operate = session.may_operate() && !job.status.is_finished();
    let body = html! {
        dl.props {
            dt { "Job" } dd { code { (job.job_id) } }
            dt { "Product" } dd { a href=(format!("/console/products/{}", view::enc(&job.product_key))) { (job.product_key) } }
            dt { "Upgrade" } dd { (job.module) " → " (job.dest_version)
                @if !job.src_versions.is_empty() { " from " (job.src_versions.join(", ")) } }
            dt { "Firmware" } dd { code { (job.spec.firmware_id) } }
            dt { "Target" } dd { (format!("{:?}", job.spec.target).to_uppercase()) " · " (format!("{:?}", job.spec.selection).to_uppercase()) }
            dt { "Created" } dd { (view::time(Some(job.created_at_ms))) }
            dt { "Started" } dd { (view::time(job.started_at_ms)) }
            dt { "Finished" } dd { (view::time(job.finished_at_ms)) }
        }
        (live_block(&v, &stats))
        (push_block(&v, &series))
        @if operate {
            div.actions #job-actions {
                @if job.status == JobStatus::Paused {
                    (action_button(&session, &jid, "resume", "Resume", false, None))
                } @else {
                    (action_button(&session, &jid, "pause", "Pause", false, None))
                }
                @if v.counters.confirm > 0 {
                    (action_button(&session, &jid, "confirm", "Confirm all", false, None))
                }
                (action_button(&session, &jid, "cancel", "Cancel job", true, Some("cancel_in_progress")))
            }
        }
        h2 #tasks { "Devices" }
        form.row method="get" action=(format!("/console/ota/jobs/{jid}")) {
            label { "Status"
                select name="tasks_status" {
                    option value="" { "any" }
                    @for s in TaskStatus::ALL {
                        option value=(s.as_str()) selected[s.as_str() == filter_q] { (s.as_str()) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        (task_table(&session, &jid, &tasks.items, operate))
        (view::pager(tasks.page, tasks.page_size, tasks.total, |p| format!("/console/ota/jobs/{jid}?tasks_status={filter_q}&page={p}#tasks")))
    };
    view::respond(
        StatusCode::OK,
        view::page(
            &format!("OTA job {}", job_name(&v)),
            Nav::Ota,
            Some(&session),
            body,
        ),
    )
}

fn action_button(
    s: &Session,
    jid: &str,
    action: &str,
    label: &str,
    danger: bool,
    option: Option<&str>,
) -> Markup {
    html! {
        form.inline method="post" action=(format!("/console/ota/jobs/{jid}/{action}")) {
            (view::csrf(s))
            @if let Some(o) = option {
                label.check { input type="checkbox" name=(o) value="true"; " also in-progress tasks" }
                " "
            }
            button type="submit" class=[danger.then_some("danger")] data-action=(action) { (label) }
        }
    }
}

fn task_table(s: &Session, jid: &str, tasks: &[TaskView], operate: bool) -> Markup {
    let table = html! {
        div.table-wrap { table #task-table {
            thead { tr {
                @if operate { th { span.small { "Select" } } }
                th { "Device" } th { "Status" } th { "Progress" } th.hide-narrow { "From" }
                th { "Failure" } th.hide-narrow { "Pushes" } th.hide-narrow { "Updated" }
            } }
            tbody {
                @for t in tasks {
                    tr data-device=(t.device_name) {
                        @if operate {
                            td { input type="checkbox" name="device" value=(t.device_name)
                                aria-label=(format!("select {}", t.device_name)); }
                        }
                        td { a href=(format!("/console/ota/jobs/{jid}/tasks/{}", view::enc(&t.device_name))) { (t.device_name) } }
                        td { span class=(format!("badge status-{}", t.status.as_str().to_lowercase())) { (t.status.as_str()) } }
                        td { (t.progress.map(|p| format!("{p}%")).unwrap_or_default()) }
                        td.hide-narrow { (t.src_version.as_deref().unwrap_or("")) }
                        td { @if let Some(f) = t.failure {
                            (f.as_str()) @if let Some(code) = t.failure_code { " (" (code) ")" }
                        } }
                        td.hide-narrow { (t.pushes) }
                        td.hide-narrow { (view::time(Some(t.updated_at_ms))) }
                    }
                }
            }
        } }
    };
    if !operate {
        return table;
    }
    html! {
        form method="post" action=(format!("/console/ota/jobs/{jid}/tasks/cancel")) {
            (view::csrf(s))
            (table)
            div.actions {
                label.check { input type="checkbox" name="cancel_in_progress" value="true"; " also in-progress tasks" }
                button.danger type="submit" { "Cancel selected devices" }
            }
        }
    }
}

async fn action(
    State(c): State<Console>,
    session: Sess,
    Path((jid, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if !matches!(action.as_str(), "pause" | "resume" | "cancel" | "confirm") {
        return not_found(&session, "No such action.");
    }
    let cancel_in_progress =
        form_urlencoded::parse(&body).any(|(k, v)| k == "cancel_in_progress" && v == "true");
    let payload = if action == "cancel" {
        json!({ "cancel_in_progress": cancel_in_progress })
    } else {
        Value::Null
    };
    let answer = c
        .api
        .json(
            &session,
            Method::POST,
            &format!("/api/v1/ota/jobs/{}/{action}", view::enc(&jid)),
            &payload,
        )
        .await;
    if !answer.ok() {
        return view::api_error(&session, &answer);
    }
    Redirect::to(&format!("/console/ota/jobs/{jid}")).into_response()
}

async fn cancel_tasks(
    State(c): State<Console>,
    session: Sess,
    Path(jid): Path<String>,
    body: Bytes,
) -> Response {
    let mut names = Vec::new();
    let mut cancel_in_progress = false;
    for (k, v) in form_urlencoded::parse(&body) {
        match &*k {
            "device" => names.push(v.into_owned()),
            "cancel_in_progress" => cancel_in_progress = v == "true",
            _ => {}
        }
    }
    let answer = c
        .api
        .json(
            &session,
            Method::POST,
            &format!("/api/v1/ota/jobs/{}/tasks/cancel", view::enc(&jid)),
            &json!({ "device_names": names, "cancel_in_progress": cancel_in_progress }),
        )
        .await;
    if !answer.ok() {
        return view::api_error(&session, &answer);
    }
    Redirect::to(&format!("/console/ota/jobs/{jid}#tasks")).into_response()
}

async fn task_page(
    State(c): State<Console>,
    session: Sess,
    Path((jid, dn)): Path<(String, String)>,
) -> Response {
    let ota = engine(&c);
    let Ok(t) = ota.get_task(&jid, &dn) else {
        return not_found(&session, "No such task.");
    };
    let body = html! {
        p { a href=(format!("/console/ota/jobs/{jid}")) { "← job " (jid) } " · "
            a href=(format!("/console/products/{}/devices/{}", view::enc(&t.product_key), view::enc(&dn))) { "device" } }
        dl.props {
            dt { "Status" } dd { (t.status.as_str()) }
            dt { "Progress" } dd { (t.progress.map(|p| format!("{p}%")).unwrap_or_else(|| "—".into())) }
            dt { "Failure" } dd { (t.failure.map(|f| f.as_str()).unwrap_or("—"))
                @if let Some(code) = t.failure_code { " (" (code) ")" }
                @if let Some(d) = &t.failure_detail { " · " (d) } }
            dt { "Attempt" } dd { (t.attempt) " · retries used " (t.retries_used) " · pushes " (t.pushes) }
        }
        h2 { "Timeline" }
        div.table-wrap { table {
            thead { tr { th { "At" } th { "Event" } th { "From" } th { "To" } th { "Reason" } } }
            tbody {
                @for h in t.history.as_deref().unwrap_or_default() {
                    tr { td { (view::time(Some(h.at_ms))) } td { (h.event) } td { (h.from_status.as_str()) } td { (h.to_status.as_str()) } td { (h.reason.as_deref().unwrap_or("")) } }
                }
            }
        } }
    };
    view::respond(
        StatusCode::OK,
        view::page(&format!("Task of {dn}"), Nav::Ota, Some(&session), body),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_becomes_the_api_spec() {
        let f: Fields = [
            ("firmware_id", "fw-1"),
            ("target", "SPECIFIC"),
            ("device_names", "a1b2, c3d4\ne5f6"),
            ("rate_per_minute", "60"),
            ("ramp_factor", "2"),
            ("retry_count", "x"),
            ("start_at", "2026-12-06T16:20"),
            ("force", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let spec = spec_json(&f);
        assert_eq!(spec["device_names"], json!(["a1b2", "c3d4", "e5f6"]));
        assert_eq!(spec["rate"]["per_minute"], json!(60));
        assert_eq!(spec["rate"]["ramp"]["factor"], json!(2));
        assert_eq!(
            spec["retry_count"],
            json!("x"),
            "left for the API to refuse"
        );
        assert_eq!(spec["start_at_ms"], json!(1_796_574_000_000i64));
        assert_eq!(spec["force"], json!(true));
        assert!(spec.get("need_confirm").is_none());
    }

    #[test]
    fn api_fields_map_to_form_fields() {
        assert_eq!(form_field_of("rate.per_minute"), "rate_per_minute");
        assert_eq!(form_field_of("rate.ramp.factor"), "ramp_factor");
        assert_eq!(
            form_field_of("abort.failure_percent"),
            "abort_failure_percent"
        );
        assert_eq!(form_field_of("device_names[3]"), "device_names");
        assert_eq!(form_field_of("start_at_ms"), "start_at");
    }
}
