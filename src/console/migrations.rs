//! Migrations: the task list and creation, and a task's page — progress, canary (picked
//! names), full, pause/continue, rollback (picked or all), data sync on/off with its expiry,
//! the per-device status and the task log. Everything is read and done through the API.

use axum::body::{Body, Bytes};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::{json, Value};

use super::session::Session;
use super::view::{self, enc, Nav};
use super::{ApiAnswer, Console, Sess};

pub(super) fn routes() -> Router<Console> {
    Router::new()
        .route("/console/migrations", get(list).post(create))
        .route("/console/migrations/{tid}", get(detail))
        .route("/console/migrations/{tid}/live", get(live))
        .route("/console/migrations/{tid}/live-devices", get(live_devices))
        .route("/console/migrations/{tid}/canary-csv", post(canary_csv))
        .route("/console/migrations/{tid}/{action}", post(action))
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn moved(t: &Value) -> (u64, u64) {
    let d = &t["devices"];
    let n = |k: &str| d[k].as_u64().unwrap_or(0);
    (n("migrated") + n("failed") + n("rolled_back"), n("total"))
}

#[derive(Deserialize, Default)]
pub(super) struct PageQuery {
    page: Option<u32>,
}

async fn list(State(c): State<Console>, session: Sess, Query(q): Query<PageQuery>) -> Response {
    let page = q.page.unwrap_or(1).max(1);
    let a = c
        .api
        .get(
            &session,
            &format!("/api/v1/migrations?page={page}&page_size=50"),
        )
        .await;
    if !a.ok() {
        return view::api_error(&session, &a);
    }
    let products = c
        .api_state
        .registry
        .list_products(crate::registry::Page::new(1, 100).unwrap_or_default());
    let instances = c.api_state.registry.list_instances();
    let body = html! {
        div.table-wrap { table #migrations {
            thead { tr { th { "Migration" } th { "Product" } th { "To" } th { "State" } th { "Progress" } } }
            tbody {
                @for t in a.body["items"].as_array().into_iter().flatten() {
                    @let (done, total) = moved(t);
                    tr {
                        td { a href=(format!("/console/migrations/{}", enc(&s(&t["task_id"])))) { (s(&t["name"])) } }
                        td { (s(&t["product_key"])) }
                        td { (s(&t["target_instance_id"])) }
                        td { (s(&t["state"])) }
                        td { (view::progress(done, total, "devices moved")) }
                    }
                }
            }
        } }
        (view::pager(page, 50, a.body["total"].as_u64().unwrap_or(0), |n| format!("/console/migrations?page={n}")))
        @if session.may_operate() {
            h2 { "New migration" }
            form.row method="post" action="/console/migrations" {
                (view::csrf(&session))
                label { "Product" select name="product_key" required {
                    @for p in &products.items { option value=(p.product_key) { (p.name) " (" (p.product_key) ")" } }
                } }
                label { "Target instance" select name="target_instance_id" required {
                    @for i in &instances { option value=(i.instance_id) { (i.name) " (" (i.instance_id) ")" } }
                } }
                label { "Name" input name="name"; }
                button type="submit" { "Create migration" }
            }
        }
    };
    view::respond(
        StatusCode::OK,
        view::page("Migrations", Nav::Migrations, Some(&session), body),
    )
}

fn pairs(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body)
        .filter(|(k, _)| k != "csrf")
        .map(|(k, v)| (k.into_owned(), v.trim().to_owned()))
        .collect()
}

fn field<'a>(f: &'a [(String, String)], k: &str) -> &'a str {
    f.iter()
        .find(|(n, _)| n == k)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

async fn create(State(c): State<Console>, session: Sess, body: Bytes) -> Response {
    let f = pairs(&body);
    let mut req = json!({
        "product_key": field(&f, "product_key"),
        "target_instance_id": field(&f, "target_instance_id"),
    });
    if !field(&f, "name").is_empty() {
        req["name"] = json!(field(&f, "name"));
    }
    let a = c
        .api
        .json(&session, Method::POST, "/api/v1/migrations", &req)
        .await;
    if !a.ok() {
        return view::api_error(&session, &a);
    }
    Redirect::to(&format!(
        "/console/migrations/{}",
        enc(&s(&a.body["task_id"]))
    ))
    .into_response()
}

async fn detail(State(c): State<Console>, session: Sess, Path(tid): Path<String>) -> Response {
    detail_page(&c, &session, &tid, None, StatusCode::OK).await
}

/// States in which devices move: the page asks for its live block often then.
const MOVING: [&str; 5] = [
    "CANARY_IN_PROGRESS",
    "MIGRATING",
    "CONTINUE_MIGRATING",
    "ROLLING_BACK",
    "BATCH_ROLLBACK",
];

/// The task's details from the API (its refusal as a page).
async fn task(c: &Console, session: &Session, tid: &str) -> Result<Value, Response> {
    let t = c
        .api
        .get(session, &format!("/api/v1/migrations/{}", enc(tid)))
        .await;
    if !t.ok() {
        return Err(view::api_error(session, &t));
    }
    Ok(t.body)
}

/// How often a live block of a task's page asks again: every 2 s while devices move, every
/// 10 s otherwise (another operator may start or pause the task).
fn poll(t: &Value) -> &'static str {
    if MOVING.contains(&s(&t["state"]).as_str()) {
        "every 2s"
    } else {
        "every 10s"
    }
}

/// The live summary of a task: state, progress, device counts, data sync.
fn summary_block(tid: &str, t: &Value) -> Markup {
    let (done, total) = moved(t);
    let sync = &t["data_sync"];
    html! {
        section #live aria-label="Migration progress"
            hx-get=(format!("/console/migrations/{}/live", enc(tid)))
            hx-trigger=(poll(t)) hx-swap="outerHTML" {
            dl.props {
                dt { "Product" } dd { (s(&t["product_key"])) }
                dt { "From → to" } dd { (s(&t["source_instance_id"])) " → " (s(&t["target_instance_id"])) }
                dt { "State" } dd #migration-state { (s(&t["state"])) " · " (s(&t["status"])) }
                dt { "Progress" } dd { (view::progress(done, total, "devices moved")) }
                dt { "Devices" } dd { @for k in ["not_migrated", "migrating", "migrated", "failed", "rolled_back"] { (k) " " strong { (s(&t["devices"][k])) } " · " } }
                dt { "Data sync" } dd #data-sync { @if sync["enabled"] == json!(true) { "on, until " (view::time(sync["expires_at_ms"].as_i64())) } @else { "off" } }
                @if !t["error"].is_null() { dt { "Last fault" } dd.error { (s(&t["error"])) } }
            }
        }
    }
}

/// The live per-device status and log of a task (the first 100 of each).
async fn devices_block(c: &Console, session: &Session, tid: &str, t: &Value) -> Markup {
    let base = format!("/api/v1/migrations/{}", enc(tid));
    let devices = c
        .api
        .get(session, &format!("{base}/devices?page_size=100"))
        .await;
    let log = c
        .api
        .get(session, &format!("{base}/log?page_size=100"))
        .await;
    html! {
        section #live-devices aria-label="Devices and log"
            hx-get=(format!("/console/migrations/{}/live-devices", enc(tid)))
            hx-trigger=(poll(t)) hx-swap="outerHTML" {
            h2 { "Devices" }
            div.table-wrap { table #migration-devices {
                thead { tr { th { "Device" } th { "Status" } th { "Instance" } th { "Online" } th { "Reason" } } }
                tbody {
                    @for d in devices.body["items"].as_array().into_iter().flatten() {
                        tr data-device=(s(&d["device_name"])) {
                            td { (s(&d["device_name"])) } td { (s(&d["status"])) } td { (s(&d["instance_id"])) }
                            td { (s(&d["online"])) } td { (s(&d["reason"])) }
                        }
                    }
                }
            } }
            h2 { "Log" }
            div.table-wrap { table {
                thead { tr { th { "At" } th { "Action" } th { "From" } th { "To" } th { "Detail" } } }
                tbody {
                    @for e in log.body["items"].as_array().into_iter().flatten() {
                        tr { td { (view::time(e["at_ms"].as_i64())) } td { (s(&e["action"])) } td { (s(&e["from_state"])) } td { (s(&e["to_state"])) } td { (s(&e["detail"])) } }
                    }
                }
            } }
        }
    }
}

async fn live(State(c): State<Console>, session: Sess, Path(tid): Path<String>) -> Response {
    match task(&c, &session, &tid).await {
        Ok(t) => view::respond(StatusCode::OK, summary_block(&tid, &t)),
        Err(r) => r,
    }
}

async fn live_devices(
    State(c): State<Console>,
    session: Sess,
    Path(tid): Path<String>,
) -> Response {
    match task(&c, &session, &tid).await {
        Ok(t) => view::respond(StatusCode::OK, devices_block(&c, &session, &tid, &t).await),
        Err(r) => r,
    }
}

/// A task's page; `extra` (a selection's per-row results) goes above everything.
async fn detail_page(
    c: &Console,
    session: &Session,
    tid: &str,
    extra: Option<Markup>,
    status: StatusCode,
) -> Response {
    let t = match task(c, session, tid).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let devices = devices_block(c, session, tid, &t).await;
    let sync = &t["data_sync"];
    let url = format!("/console/migrations/{}", enc(tid));
    let body = html! {
        @if let Some(x) = extra { (x) }
        (summary_block(tid, &t))
        @if session.may_operate() {
            div.actions {
                (button(session, &url, "full", "Full migration", None))
                (button(session, &url, "pause", "Pause", None))
                (button(session, &url, "continue", "Continue", None))
                @if sync["enabled"] == json!(true) {
                    (button(session, &url, "data-sync-off", "Data sync off", None))
                } @else {
                    (button(session, &url, "data-sync-on", "Data sync on", None))
                }
            }
            form.row method="post" action=(format!("{url}/canary")) {
                (view::csrf(session))
                label { "Canary devices (names, up to 100)" textarea name="device_names" rows="2" required {} }
                button type="submit" { "Start canary" }
            }
            form.row method="post" enctype="multipart/form-data"
                action=(format!("{url}/canary-csv?csrf={}", enc(&session.csrf))) {
                label { span { "…or a canary from a CSV file (" code { "DeviceName" } " column, up to 10,000 rows)" }
                    input type="file" name="file" accept=".csv,text/csv" required; }
                button type="submit" { "Start canary from CSV" }
            }
            form.row method="post" action=(format!("{url}/rollback")) {
                (view::csrf(session))
                label { "Roll back devices (empty: all)" textarea name="device_names" rows="2" {} }
                button.danger type="submit" { "Roll back" }
            }
        }
        (devices)
    };
    view::respond(
        status,
        view::page(
            &format!("Migration {}", s(&t["name"])),
            Nav::Migrations,
            Some(session),
            body,
        ),
    )
}

/// The API's answer to a selection (`canary`, `rollback`): devices accepted and the refused
/// rows with their codes.
fn selection_results(what: &str, a: &ApiAnswer) -> Markup {
    let rejected = a.body["rejected"].as_array().cloned().unwrap_or_default();
    html! {
        section.card #selection-results aria-label=(format!("{what} results")) role="status" {
            h2 { (what) " results" }
            p { (s(&a.body["accepted"])) " accepted, " (rejected.len()) " refused." }
            @if !rejected.is_empty() {
                div.table-wrap { table {
                    thead { tr { th { "Row" } th { "Device" } th { "Code" } th { "Why" } } }
                    tbody {
                        @for r in &rejected {
                            tr data-row=(s(&r["row"])) {
                                td { (s(&r["row"])) } td { (s(&r["device_name"])) }
                                td { (s(&r["error_code"])) } td { (s(&r["error_msg"])) }
                            }
                        }
                    }
                } }
            }
        }
    }
}

/// Starts the canary with the devices of an uploaded CSV, sent to the API as `text/csv`
/// unchanged, and shows its per-row results.
async fn canary_csv(
    State(c): State<Console>,
    session: Sess,
    Path(tid): Path<String>,
    form: Multipart,
) -> Response {
    let csv = match view::uploaded_file(&session, form).await {
        Ok(csv) => csv,
        Err(page) => return page,
    };
    let a = c
        .api
        .call(
            &session,
            Method::POST,
            &format!("/api/v1/migrations/{}/canary", enc(&tid)),
            Some("text/csv"),
            Body::from(csv),
        )
        .await;
    if !a.ok() {
        return view::api_error(&session, &a);
    }
    detail_page(
        &c,
        &session,
        &tid,
        Some(selection_results("Canary", &a)),
        StatusCode::OK,
    )
    .await
}

fn button(s: &Session, url: &str, action: &str, label: &str, extra: Option<Markup>) -> Markup {
    html! {
        form.inline method="post" action=(format!("{url}/{action}")) {
            (view::csrf(s))
            @if let Some(x) = extra { (x) }
            button type="submit" data-action=(action) { (label) }
        }
    }
}

fn names(f: &[(String, String)]) -> Vec<String> {
    field(f, "device_names")
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn action(
    State(c): State<Console>,
    session: Sess,
    Path((tid, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let f = pairs(&body);
    let base = format!("/api/v1/migrations/{}", enc(&tid));
    let (path, payload) = match action.as_str() {
        "full" | "pause" | "continue" => (format!("{base}/{action}"), Value::Null),
        "data-sync-on" => (format!("{base}/data-sync"), json!({"enabled": true})),
        "data-sync-off" => (format!("{base}/data-sync"), json!({"enabled": false})),
        "canary" => (format!("{base}/canary"), json!({"device_names": names(&f)})),
        "rollback" => {
            let picked = names(&f);
            let body = if picked.is_empty() {
                json!({"all": true})
            } else {
                json!({"device_names": picked})
            };
            (format!("{base}/rollback"), body)
        }
        _ => return view::error_page(Some(&session), StatusCode::NOT_FOUND, "No such action."),
    };
    let a = c.api.json(&session, Method::POST, &path, &payload).await;
    if !a.ok() {
        return view::api_error(&session, &a);
    }
    let what = match action.as_str() {
        "canary" => "Canary",
        "rollback" if !names(&f).is_empty() => "Rollback",
        _ => return Redirect::to(&format!("/console/migrations/{}", enc(&tid))).into_response(),
    };
    detail_page(
        &c,
        &session,
        &tid,
        Some(selection_results(what, &a)),
        StatusCode::OK,
    )
    .await
}
