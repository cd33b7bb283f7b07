//! OTA screens: the job list, the job form ([`form`]: the API's validation errors shown on
//! it), and a job's page — the live stacked status bar with failures by code and success rate
//! (polled by htmx until the job finishes), pause/resume/cancel/confirm, and the paged
//! per-device table with cancel-selected and each device's timeline.

mod form;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::{json, Value};

use super::session::Session;
use super::view::{self, Nav, Segment};
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
        .route("/console/ota/new", get(form::new_job))
        .route("/console/ota/jobs", post(form::create))
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
