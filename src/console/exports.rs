//! Export and import jobs (docs/EXPORT.md): the jobs of both kinds with their status, the
//! export form (products picked, other objects typed, the secrets passphrase), the import
//! upload, and a job's page — status, objects, log (live while the job runs) and, for an
//! export, the package download.
//!
//! Reads come from [`ExportService`](crate::export::ExportService) as the API's GETs do;
//! starting an export or an import and downloading a package are the API's own routes called
//! with the session's token (the import's multipart body streams to it unchanged, its CSRF
//! token in the query), so validation, rate limits, role checks and error codes are the API's.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup};
use serde_json::{json, Value};

use super::session::Session;
use super::view::{self, enc, field, Fields, Nav};
use super::{ApiAnswer, Console, Sess};
use crate::export::{state_str, ExportError, JobKind, JobRecord, JobState};
use crate::registry::Page;

/// Jobs of each kind listed on the page (newest first).
const JOBS_SHOWN: usize = 50;
/// Objects and log lines a job page renders; the full log is one link away.
const ROWS_SHOWN: usize = 200;
/// How often an open job page asks for its status while the job runs.
const POLL: &str = "every 2s";
/// The object types the export form offers for typed ids.
const TYPES: [&str; 5] = ["PRODUCT", "DEVICE", "FIRMWARE", "OTA_JOB", "MIGRATION_TASK"];

pub(super) fn routes() -> Router<Console> {
    Router::new()
        .route("/console/export", get(list).post(start_export))
        .route("/console/import", post(start_import))
        .route("/console/export/{id}", get(export_page))
        .route("/console/export/{id}/live", get(export_live))
        .route("/console/export/{id}/log", get(export_log))
        .route("/console/export/{id}/package", get(package))
        .route("/console/import/{id}", get(import_page))
        .route("/console/import/{id}/live", get(import_live))
        .route("/console/import/{id}/log", get(import_log))
}

fn kind_path(kind: JobKind) -> &'static str {
    match kind {
        JobKind::Export => "export",
        JobKind::Import => "import",
    }
}

fn badge(state: JobState) -> Markup {
    let s = state_str(state);
    html! { span class=(format!("badge job-{}", s.to_lowercase())) { (s) } }
}

async fn list(State(c): State<Console>, session: Sess) -> Response {
    list_page(&c, &session, &Vec::new(), None, StatusCode::OK)
}

/// The jobs and (for an operator) the forms; `f` refills the export form after the API's
/// refusal `error`.
fn list_page(
    c: &Console,
    session: &Session,
    f: &Fields,
    error: Option<&ApiAnswer>,
    status: StatusCode,
) -> Response {
    let svc = &c.api_state.export;
    let exports = svc.list(JobKind::Export);
    let imports = svc.list(JobKind::Import);
    let body = html! {
        h2 #exports-title { "Exports" }
        (jobs_table("exports", JobKind::Export, &exports))
        h2 #imports-title { "Imports" }
        (jobs_table("imports", JobKind::Import, &imports))
        @if session.may_operate() {
            (export_form(c, session, f, error))
            (import_form(session))
        }
    };
    view::respond(
        status,
        view::page("Export and import", Nav::Transfers, Some(session), body),
    )
}

fn jobs_table(id: &str, kind: JobKind, jobs: &[JobRecord]) -> Markup {
    let path = kind_path(kind);
    html! {
        @if jobs.is_empty() {
            p.small id=(id) { "No " (path) " yet." }
        } @else {
            div.table-wrap { table id=(id) aria-labelledby=(format!("{id}-title")) {
                thead { tr {
                    th { "Job" } th { "State" } th { "Objects" }
                    @if kind == JobKind::Export { th.hide-narrow { "Package" } } @else { th.hide-narrow { "Result" } }
                    th.hide-narrow { "By" } th { "Created" }
                } }
                tbody {
                    @for j in jobs.iter().take(JOBS_SHOWN) {
                        tr data-job=(j.id) {
                            td { a href=(format!("/console/{path}/{}", enc(&j.id))) { (j.name) } br; code.small { (j.id) } }
                            td { (badge(j.status.state)) }
                            td { (j.objects.len()) }
                            @if kind == JobKind::Export {
                                td.hide-narrow { (j.package_size.map(|n| format!("{n} B")).unwrap_or_default())
                                    @if j.secrets_included { " · secrets encrypted" } }
                            } @else {
                                @let s = j.summary();
                                td.hide-narrow { (s.created) " created · " (s.skipped_identical + s.skipped) " skipped · " (s.overwritten) " overwritten · " (s.conflict) " conflicts · " (s.failed) " failed" }
                            }
                            td.hide-narrow { (j.started_by.as_deref().unwrap_or("")) }
                            td { (view::time(Some(j.created_at_ms))) }
                        }
                    }
                }
            } }
            @if jobs.len() > JOBS_SHOWN { p.small { "The newest " (JOBS_SHOWN) " of " (jobs.len()) "." } }
        }
    }
}

fn export_form(c: &Console, session: &Session, f: &Fields, error: Option<&ApiAnswer>) -> Markup {
    let products = c
        .api_state
        .registry
        .list_products(Page::new(1, 100).unwrap_or_default());
    let picked: Vec<&str> = f
        .iter()
        .filter(|(k, _)| k == "product")
        .map(|(_, v)| v.as_str())
        .collect();
    let blamed = error.and_then(|a| a.error_field()).map(|f| match f {
        "secrets_key" => "secrets_key",
        "name" => "name",
        _ => "objects",
    });
    let invalid = |name: &str| (blamed == Some(name)).then_some("true");
    let described = |name: &str| (blamed == Some(name)).then_some("export-error");
    html! {
        h2 #new-export { "New export" }
        @if let Some(a) = error {
            p.error role="alert" #export-error { "The API refused the export: " (a.error_msg())
                @if !a.error_code().is_empty() { " (" (a.error_code()) ")" } }
        }
        form.stack method="post" action="/console/export" aria-labelledby="new-export" {
            (view::csrf(session))
            label { "Name" input name="name" id="x-name" value=(field(f, "name")) maxlength="128"
                aria-invalid=[invalid("name")] aria-describedby=[described("name")]; }
            fieldset.wide aria-invalid=[invalid("objects")] aria-describedby=[described("objects")] {
                legend { "Products (each brings its devices and firmware)" }
                @if products.items.is_empty() { p.small { "No products." } }
                @for p in &products.items {
                    label.check { input type="checkbox" name="product" value=(p.product_key)
                        checked[picked.contains(&p.product_key.as_str())];
                        " " (p.name) " " span.small { (p.product_key) } }
                }
            }
            label.wide { "Other objects, one per line: TYPE id ("
                (TYPES.join(", ")) "; a device is " code { "product_key/device_name" } ")"
                textarea name="objects" id="x-objects" rows="3"
                    aria-invalid=[invalid("objects")] aria-describedby=[described("objects")] { (field(f, "objects")) }
            }
            label.check { input type="checkbox" name="no_dependencies" value="true" checked[field(f, "no_dependencies") == "true"];
                " Only the named objects (no dependencies)" }
            label { "Secrets passphrase (at least 12 characters)"
                input type="password" name="secrets_key" id="x-secrets_key" autocomplete="new-password"
                    aria-invalid=[invalid("secrets_key")] aria-describedby=[described("secrets_key")]; }
            label.check { input type="checkbox" name="no_secrets" value="true" checked[field(f, "no_secrets") == "true"];
                " Without secrets (the import generates new ones)" }
            div.wide { button type="submit" { "Start export" } }
        }
    }
}

fn import_form(session: &Session) -> Markup {
    html! {
        h2 #new-import { "Import a package" }
        p.small { "The package is verified completely (checksums, and the passphrase when it holds secrets) before anything changes." }
        form.stack method="post" enctype="multipart/form-data" aria-labelledby="new-import"
            action=(format!("/console/import?csrf={}", enc(&session.csrf))) {
            label.wide { "Package (ZIP)" input type="file" name="package" id="i-package" accept=".zip,application/zip" required; }
            label { "Secrets passphrase" input type="password" name="secrets_key" id="i-secrets_key" autocomplete="off"; }
            label { "When an object differs"
                select name="conflict_policy" id="i-conflict_policy" {
                    option value="skip" { "skip it (report a conflict)" }
                    option value="overwrite" { "overwrite it" }
                    option value="fail" { "import nothing" }
                }
            }
            label { "Name" input name="name" id="i-name" maxlength="128"; }
            div.wide { button type="submit" { "Import" } }
        }
    }
}

/// The API's export request from the form: only what was given, nothing checked here.
fn export_json(f: &Fields) -> Value {
    let deps = (field(f, "no_dependencies") == "true").then_some(false);
    let mut objects: Vec<Value> = f
        .iter()
        .filter(|(k, _)| k == "product")
        .map(|(_, pk)| object(pk.trim(), "PRODUCT", deps))
        .collect();
    for line in field(f, "objects").lines() {
        let mut parts = line.split_whitespace();
        if let Some(kind) = parts.next() {
            let id = parts.collect::<Vec<_>>().join(" ");
            objects.push(object(&id, &kind.to_ascii_uppercase(), deps));
        }
    }
    let mut req = json!({ "objects": objects });
    if !field(f, "name").is_empty() {
        req["name"] = json!(field(f, "name"));
    }
    if !field(f, "secrets_key").is_empty() {
        req["secrets_key"] = json!(field(f, "secrets_key"));
    }
    if field(f, "no_secrets") == "true" {
        req["include_secrets"] = json!(false);
    }
    req
}

fn object(id: &str, kind: &str, deps: Option<bool>) -> Value {
    let mut o = json!({ "id": id, "type": kind });
    if let Some(d) = deps {
        o["include_dependencies"] = json!(d);
    }
    o
}

async fn start_export(State(c): State<Console>, session: Sess, body: Bytes) -> Response {
    let f: Fields = form_urlencoded::parse(&body)
        .filter(|(k, _)| k != "csrf")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let a = c
        .api
        .json(&session, Method::POST, "/api/v1/export", &export_json(&f))
        .await;
    if !a.ok() {
        // The passphrase is not sent back into the page.
        let kept: Fields = f.into_iter().filter(|(k, _)| k != "secrets_key").collect();
        return list_page(&c, &session, &kept, Some(&a), a.status);
    }
    let id = a.body["id"].as_str().unwrap_or_default();
    Redirect::to(&format!("/console/export/{}", enc(id))).into_response()
}

async fn start_import(
    State(c): State<Console>,
    session: Sess,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let a = c
        .api
        .call(
            &session,
            Method::POST,
            "/api/v1/import",
            Some(content_type),
            body,
        )
        .await;
    if !a.ok() {
        return view::api_error(&session, &a);
    }
    let id = a.body["id"].as_str().unwrap_or_default();
    Redirect::to(&format!("/console/import/{}", enc(id))).into_response()
}

fn job_of(c: &Console, kind: JobKind, id: &str) -> Result<JobRecord, ExportError> {
    c.api_state.export.get(kind, id)
}

fn not_found(session: &Session, e: &ExportError) -> Response {
    view::error_page(Some(session), StatusCode::NOT_FOUND, &e.to_string())
}

/// The part of a job page that changes while the job runs; polls itself until it ends.
fn live_block(session: &Session, j: &JobRecord) -> Markup {
    let path = kind_path(j.kind);
    let running = j.status.state == JobState::InProgress;
    let url = format!("/console/{path}/{}", enc(&j.id));
    let log_from = j.log.len().saturating_sub(ROWS_SHOWN);
    html! {
        section #live .card aria-label="Job status"
            hx-get=[running.then(|| format!("{url}/live"))]
            hx-trigger=[running.then_some(POLL)]
            hx-swap=[running.then_some("outerHTML")] {
            p { "State: " strong #job-state { (state_str(j.status.state)) }
                @if let Some(m) = &j.status.message { " · " span #job-message { (m) } } }
            dl.props {
                dt { "Objects" } dd { (j.objects.len()) }
                dt { "Started" } dd { (view::time(j.started_at_ms)) }
                dt { "Ended" } dd { (view::time(j.ended_at_ms)) }
                @if j.kind == JobKind::Export {
                    dt { "Package" } dd { (j.package_size.map(|n| format!("{n} bytes")).unwrap_or_else(|| "—".into()))
                        @if j.secrets_included { " · secrets encrypted with the passphrase" } }
                } @else {
                    @let s = j.summary();
                    dt { "Result" } dd #import-summary { (s.created) " created · " (s.skipped_identical) " identical · " (s.skipped) " skipped · "
                        (s.overwritten) " overwritten · " (s.conflict) " conflicts · " (s.failed) " failed" }
                    dt { "When an object differs" } dd { (j.conflict_policy.map(|p| format!("{p:?}").to_lowercase()).unwrap_or_default()) }
                }
                dt { "Started by" } dd { (j.started_by.as_deref().unwrap_or("")) }
            }
            @if j.kind == JobKind::Export && j.status.state == JobState::Successful && session.may_operate() {
                p { a.button #download href=(format!("{url}/package")) download=(format!("{}.zip", j.id)) { "Download the package" } }
            }
            h3 { "Objects" }
            div.table-wrap { table #job-objects {
                thead { tr { th { "Type" } th { "Object" } th { "State" }
                    @if j.kind == JobKind::Import { th { "Result" } } th.hide-narrow { "Message" } } }
                tbody {
                    @for o in j.objects.iter().take(ROWS_SHOWN) {
                        tr data-object=(o.id) {
                            td { (o.object_type.as_str()) }
                            td { (o.name) br; span.small { (o.path) }
                                @if let Some(t) = &o.target_id { br; span.small { "here: " code { (t) } } } }
                            td { (badge(o.status.state)) }
                            @if j.kind == JobKind::Import {
                                td { (o.result.and_then(|r| serde_json::to_value(r).ok()).and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()) }
                            }
                            td.hide-narrow { (o.status.message.as_deref().unwrap_or("")) }
                        }
                    }
                }
            } }
            @if j.objects.len() > ROWS_SHOWN { p.small { "The first " (ROWS_SHOWN) " of " (j.objects.len()) " objects." } }
            h3 { "Log" }
            @if log_from > 0 { p.small { "The last " (ROWS_SHOWN) " lines; " a href=(format!("{url}/log")) { "the whole log" } "." } }
            pre #job-log .log tabindex="0" aria-label="Job log" {
                @for line in &j.log[log_from..] { (line.render()) "\n" }
            }
        }
    }
}

async fn job_page(c: &Console, session: &Session, kind: JobKind, id: &str) -> Response {
    let j = match job_of(c, kind, id) {
        Ok(j) => j,
        Err(e) => return not_found(session, &e),
    };
    let title = match kind {
        JobKind::Export => format!("Export {}", j.name),
        JobKind::Import => format!("Import {}", j.name),
    };
    let body = html! {
        p { a href="/console/export" { "← all export and import jobs" } " · " code { (j.id) } }
        (live_block(session, &j))
    };
    view::respond(
        StatusCode::OK,
        view::page(&title, Nav::Transfers, Some(session), body),
    )
}

async fn export_page(State(c): State<Console>, session: Sess, Path(id): Path<String>) -> Response {
    job_page(&c, &session, JobKind::Export, &id).await
}

async fn import_page(State(c): State<Console>, session: Sess, Path(id): Path<String>) -> Response {
    job_page(&c, &session, JobKind::Import, &id).await
}

fn live(c: &Console, session: &Session, kind: JobKind, id: &str) -> Response {
    match job_of(c, kind, id) {
        Ok(j) => view::respond(StatusCode::OK, live_block(session, &j)),
        Err(e) => not_found(session, &e),
    }
}

async fn export_live(State(c): State<Console>, session: Sess, Path(id): Path<String>) -> Response {
    live(&c, &session, JobKind::Export, &id)
}

async fn import_live(State(c): State<Console>, session: Sess, Path(id): Path<String>) -> Response {
    live(&c, &session, JobKind::Import, &id)
}

/// The API's answer passed through (a download or a log) when it succeeded; its refusal as a
/// page otherwise.
async fn pass_through(c: &Console, session: &Session, path: &str) -> Response {
    let resp = match c
        .api
        .response(session, Method::GET, path, None, Body::empty())
        .await
    {
        Ok(r) => r,
        Err(a) => return view::api_error(session, &a),
    };
    if resp.status().is_success() {
        return resp;
    }
    view::api_error(session, &ApiAnswer::read(resp).await)
}

async fn package(State(c): State<Console>, session: Sess, Path(id): Path<String>) -> Response {
    pass_through(
        &c,
        &session,
        &format!("/api/v1/export/{}/package", enc(&id)),
    )
    .await
}

async fn export_log(State(c): State<Console>, session: Sess, Path(id): Path<String>) -> Response {
    pass_through(&c, &session, &format!("/api/v1/export/{}/log", enc(&id))).await
}

async fn import_log(State(c): State<Console>, session: Sess, Path(id): Path<String>) -> Response {
    pass_through(&c, &session, &format!("/api/v1/import/{}/log", enc(&id))).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_becomes_the_api_request() {
        let f: Fields = [
            ("name", "move"),
            ("product", "pk1"),
            ("product", "pk2"),
            ("objects", "device pk3/dev-1\n\nFIRMWARE fw-1\nOTA_JOB"),
            ("secrets_key", "correct horse battery"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let req = export_json(&f);
        assert_eq!(
            req["objects"],
            json!([
                {"id": "pk1", "type": "PRODUCT"},
                {"id": "pk2", "type": "PRODUCT"},
                {"id": "pk3/dev-1", "type": "DEVICE"},
                {"id": "fw-1", "type": "FIRMWARE"},
                {"id": "", "type": "OTA_JOB"},
            ]),
            "a line without an id is the API's to refuse"
        );
        assert_eq!(req["name"], "move");
        assert_eq!(req["secrets_key"], "correct horse battery");
        assert!(req.get("include_secrets").is_none());

        let f: Fields = [
            ("product", "pk1"),
            ("no_dependencies", "true"),
            ("no_secrets", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let req = export_json(&f);
        assert_eq!(
            req,
            json!({"objects": [{"id": "pk1", "type": "PRODUCT", "include_dependencies": false}],
                   "include_secrets": false})
        );
    }
}
