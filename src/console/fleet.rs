//! Products and devices: product list and creation, a product's device list (online and tag
//! filters, a name search, paging), device creation and CSV batch import with per-row
//! results, device details (versions, OTA jobs and timeline, migration status),
//! enable/disable/delete, and secrets on request.
//!
//! Lists and details are read through the API (`GET /api/v1/…`), so the console renders
//! exactly what the API shows a caller — never a secret unless the secret route was asked
//! for, by a role the API lets read it.

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
        .route("/console/products", get(products).post(create_product))
        .route("/console/products/{pk}", get(product))
        .route("/console/products/{pk}/delete", post(delete_product))
        .route("/console/products/{pk}/secret", post(product_secret))
        .route("/console/products/{pk}/devices", post(create_device))
        .route(
            "/console/products/{pk}/devices/import",
            post(import_devices),
        )
        .route("/console/products/{pk}/devices/{dn}", get(device))
        .route(
            "/console/products/{pk}/devices/{dn}/{action}",
            post(device_action),
        )
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn ok_page(session: &Session, title: &str, nav: Nav, body: Markup) -> Response {
    view::respond(StatusCode::OK, view::page(title, nav, Some(session), body))
}

#[derive(Deserialize, Default)]
pub(super) struct PageQuery {
    page: Option<u32>,
}

async fn products(State(c): State<Console>, session: Sess, Query(q): Query<PageQuery>) -> Response {
    let page = q.page.unwrap_or(1).max(1);
    let a = c
        .api
        .get(
            &session,
            &format!("/api/v1/products?page={page}&page_size=50"),
        )
        .await;
    if !a.ok() {
        return view::api_error(&session, &a);
    }
    let body = html! {
        div.table-wrap { table #products {
            thead { tr { th { "Product" } th { "Key" } th { "Instance" } th { "Devices" } th.hide-narrow { "Created" } } }
            tbody {
                @for p in a.body["items"].as_array().into_iter().flatten() {
                    tr {
                        td { a href=(format!("/console/products/{}", enc(&s(&p["product_key"])))) { (s(&p["name"])) } }
                        td { code { (s(&p["product_key"])) } }
                        td { (s(&p["instance_id"])) }
                        td { (s(&p["device_count"])) }
                        td.hide-narrow { (view::time(p["created_at_ms"].as_i64())) }
                    }
                }
            }
        } }
        (view::pager(page, 50, a.body["total"].as_u64().unwrap_or(0), |p| format!("/console/products?page={p}")))
        @if session.is_admin() {
            h2 { "New product" }
            form.row method="post" action="/console/products" {
                (view::csrf(&session))
                label { "Name" input name="name" required; }
                label { "Description" input name="description"; }
                button type="submit" { "Create product" }
            }
        }
    };
    ok_page(&session, "Products", Nav::Products, body)
}

fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body)
        .filter(|(k, _)| k != "csrf")
        .map(|(k, v)| (k.into_owned(), v.trim().to_owned()))
        .collect()
}

fn get_field<'a>(f: &'a [(String, String)], name: &str) -> &'a str {
    f.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

async fn create_product(State(c): State<Console>, session: Sess, body: Bytes) -> Response {
    let f = form_pairs(&body);
    let mut req = json!({ "name": get_field(&f, "name") });
    if !get_field(&f, "description").is_empty() {
        req["description"] = json!(get_field(&f, "description"));
    }
    let a = c
        .api
        .json(&session, Method::POST, "/api/v1/products", &req)
        .await;
    if !a.ok() {
        return view::api_error(&session, &a);
    }
    Redirect::to(&format!(
        "/console/products/{}",
        enc(&s(&a.body["product_key"]))
    ))
    .into_response()
}

#[derive(Deserialize, Default)]
pub(super) struct DeviceQuery {
    page: Option<u32>,
    online: Option<String>,
    tag_key: Option<String>,
    tag_value: Option<String>,
    name: Option<String>,
}

async fn product(
    State(c): State<Console>,
    session: Sess,
    Path(pk): Path<String>,
    Query(q): Query<DeviceQuery>,
) -> Response {
    product_page(&c, &session, &pk, &q, None).await
}

async fn product_page(
    c: &Console,
    session: &Session,
    pk: &str,
    q: &DeviceQuery,
    extra: Option<Markup>,
) -> Response {
    let p = c
        .api
        .get(session, &format!("/api/v1/products/{}", enc(pk)))
        .await;
    if !p.ok() {
        return view::api_error(session, &p);
    }
    let name = q.name.as_deref().map(str::trim).unwrap_or("");
    if !name.is_empty() {
        return Redirect::to(&format!(
            "/console/products/{}/devices/{}",
            enc(pk),
            enc(name)
        ))
        .into_response();
    }
    let page = q.page.unwrap_or(1).max(1);
    let online = q.online.as_deref().unwrap_or("");
    let tag_key = q.tag_key.as_deref().unwrap_or("");
    let tag_value = q.tag_value.as_deref().unwrap_or("");
    let filter = device_filter(online, tag_key, tag_value);
    let d = c
        .api
        .get(
            session,
            &format!(
                "/api/v1/products/{}/devices?page={page}&page_size=50{filter}",
                enc(pk)
            ),
        )
        .await;
    let pk_enc = enc(pk);
    let body = html! {
        @if let Some(extra) = extra { (extra) }
        dl.props {
            dt { "Key" } dd { code { (pk) } }
            dt { "Instance" } dd { (s(&p.body["instance_id"])) }
            dt { "Devices" } dd { (s(&p.body["device_count"])) }
            dt { "Description" } dd { (s(&p.body["description"])) }
        }
        @if session.is_admin() {
            div.actions {
                form.inline method="post" action=(format!("/console/products/{pk_enc}/secret")) {
                    (view::csrf(session)) button.secondary type="submit" { "Show product secret" }
                }
                form.inline method="post" action=(format!("/console/products/{pk_enc}/delete")) {
                    (view::csrf(session))
                    label.check { input type="checkbox" name="sure" value="yes" required; " I mean it" } " "
                    button.danger type="submit" { "Delete product and its devices" }
                }
            }
        }
        h2 { "Devices" }
        form.row method="get" action=(format!("/console/products/{pk_enc}")) role="search" {
            label { "Device name" input name="name" placeholder="exact name"; }
            label { "Online"
                select name="online" {
                    option value="" { "any" }
                    option value="true" selected[online == "true"] { "online" }
                    option value="false" selected[online == "false"] { "offline" }
                }
            }
            label { "Tag key" input name="tag_key" value=(tag_key); }
            label { "Tag value" input name="tag_value" value=(tag_value); }
            button type="submit" { "Search" }
        }
        (devices_table(&d, &pk_enc, page, &filter))
        @if session.may_operate() { (new_device_forms(session, &pk_enc)) }
    };
    ok_page(
        session,
        &format!("Product {}", s(&p.body["name"])),
        Nav::Products,
        body,
    )
}

/// The device list's filter as query parameters (`&online=…&tag_key=…&tag_value=…`).
fn device_filter(online: &str, tag_key: &str, tag_value: &str) -> String {
    let mut filter = String::new();
    if online == "true" || online == "false" {
        filter.push_str(&format!("&online={online}"));
    }
    if !tag_key.is_empty() {
        filter.push_str(&format!("&tag_key={}", enc(tag_key)));
        if !tag_value.is_empty() {
            filter.push_str(&format!("&tag_value={}", enc(tag_value)));
        }
    }
    filter
}

/// One page of the product's devices (`d`, the API's answer), with the pager.
fn devices_table(d: &ApiAnswer, pk_enc: &str, page: u32, filter: &str) -> Markup {
    html! {
        @if !d.ok() {
            p.error role="alert" { (d.error_msg()) }
        } @else {
            div.table-wrap { table #devices {
                thead { tr { th { "Device" } th { "Online" } th { "Enabled" } th.hide-narrow { "Versions" } th.hide-narrow { "Tags" } th.hide-narrow { "Last seen" } } }
                tbody {
                    @for dev in d.body["items"].as_array().into_iter().flatten() {
                        @let dn = s(&dev["device_name"]);
                        tr data-device=(dn) {
                            td { a href=(format!("/console/products/{pk_enc}/devices/{}", enc(&dn))) { (dn) } }
                            td { @if dev["online"] == json!(true) { span.online { "online" } } @else { span.offline { "offline" } } }
                            td { @if dev["enabled"] == json!(true) { "yes" } @else { "disabled" } }
                            td.hide-narrow { (kv(&dev["versions"])) }
                            td.hide-narrow { (kv(&dev["tags"])) }
                            td.hide-narrow { (view::time(dev["last_seen_ms"].as_i64())) }
                        }
                    }
                }
            } }
            (view::pager(page, 50, d.body["total"].as_u64().unwrap_or(0), |n| format!("/console/products/{pk_enc}?page={n}{filter}")))
        }
    }
}

/// The forms that create a device and import devices from CSV.
fn new_device_forms(session: &Session, pk_enc: &str) -> Markup {
    html! {
        h2 { "New device" }
        form.row method="post" action=(format!("/console/products/{pk_enc}/devices")) {
            (view::csrf(session))
            label { "Device name" input name="device_name" required minlength="4" maxlength="32"; }
            label { "Secret (empty: generated)" input name="device_secret" autocomplete="off"; }
            button type="submit" { "Create device" }
        }
        h2 { "Import devices from CSV" }
        p.small { "Header " code { "DeviceName[,DeviceSecret]" } ", up to 10,000 rows; each row is reported." }
        form.row method="post" enctype="multipart/form-data"
            action=(format!("/console/products/{pk_enc}/devices/import?csrf={}", enc(&session.csrf))) {
            label { "CSV file" input type="file" name="file" accept=".csv,text/csv" required; }
            button type="submit" { "Import" }
        }
    }
}

fn kv(v: &Value) -> String {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", s(v)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

async fn delete_product(
    State(c): State<Console>,
    session: Sess,
    Path(pk): Path<String>,
    body: Bytes,
) -> Response {
    if get_field(&form_pairs(&body), "sure") != "yes" {
        return view::error_page(
            Some(&session),
            StatusCode::BAD_REQUEST,
            "Tick the confirmation box to delete a product.",
        );
    }
    let a = c
        .api
        .json(
            &session,
            Method::DELETE,
            &format!("/api/v1/products/{}", enc(&pk)),
            &Value::Null,
        )
        .await;
    if !a.ok() {
        return view::api_error(&session, &a);
    }
    Redirect::to("/console/products").into_response()
}

fn secret_box(label: &str, secret: &str) -> Markup {
    html! {
        div.notice role="status" {
            p { (label) ": " span.secret #secret { (secret) } }
            p.small { "Shown once, on request; it is not kept in the page's history." }
        }
    }
}

async fn product_secret(
    State(c): State<Console>,
    session: Sess,
    Path(pk): Path<String>,
) -> Response {
    let a = c
        .api
        .get(&session, &format!("/api/v1/products/{}/secret", enc(&pk)))
        .await;
    if !a.ok() {
        return view::api_error(&session, &a);
    }
    let extra = secret_box("Product secret", &s(&a.body["product_secret"]));
    product_page(&c, &session, &pk, &DeviceQuery::default(), Some(extra)).await
}

async fn create_device(
    State(c): State<Console>,
    session: Sess,
    Path(pk): Path<String>,
    body: Bytes,
) -> Response {
    let f = form_pairs(&body);
    let mut req = json!({ "device_name": get_field(&f, "device_name") });
    if !get_field(&f, "device_secret").is_empty() {
        req["device_secret"] = json!(get_field(&f, "device_secret"));
    }
    let a = c
        .api
        .json(
            &session,
            Method::POST,
            &format!("/api/v1/products/{}/devices", enc(&pk)),
            &req,
        )
        .await;
    if !a.ok() {
        return view::api_error(&session, &a);
    }
    let extra = html! {
        p.notice role="status" { "Created device " strong { (s(&a.body["device_name"])) } "." }
        (secret_box("Its secret", &s(&a.body["device_secret"])))
    };
    product_page(&c, &session, &pk, &DeviceQuery::default(), Some(extra)).await
}

async fn import_devices(
    State(c): State<Console>,
    session: Sess,
    Path(pk): Path<String>,
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
            &format!("/api/v1/products/{}/devices/batch", enc(&pk)),
            Some("text/csv"),
            Body::from(csv),
        )
        .await;
    if !a.ok() {
        return view::api_error(&session, &a);
    }
    let extra = import_results(&a);
    product_page(&c, &session, &pk, &DeviceQuery::default(), Some(extra)).await
}

fn import_results(a: &ApiAnswer) -> Markup {
    let rows = a.body["results"]
        .as_array()
        .or_else(|| a.body["items"].as_array())
        .cloned()
        .unwrap_or_default();
    html! {
        section.card #import-results aria-label="Import results" {
            h2 { "Import results" }
            p { (s(&a.body["created"])) " created, " (s(&a.body["failed"])) " failed." }
            div.table-wrap { table {
                thead { tr { th { "Row" } th { "Device" } th { "Result" } th { "Secret / error" } } }
                tbody {
                    @for (i, r) in rows.iter().enumerate() {
                        tr {
                            td { (r["row"].as_u64().map(|n| n.to_string()).unwrap_or_else(|| (i + 1).to_string())) }
                            td { (s(&r["device_name"])) }
                            td { (s(&r["status"])) }
                            td { @if r["status"] == json!("created") { span.secret { (s(&r["device_secret"])) } }
                                 @else { (s(&r["error_code"])) " " (s(&r["message"])) } }
                        }
                    }
                }
            } }
        }
    }
}

async fn device(
    State(c): State<Console>,
    session: Sess,
    Path((pk, dn)): Path<(String, String)>,
) -> Response {
    device_page(&c, &session, &pk, &dn, None).await
}

async fn device_page(
    c: &Console,
    session: &Session,
    pk: &str,
    dn: &str,
    extra: Option<Markup>,
) -> Response {
    let base = format!("/api/v1/products/{}/devices/{}", enc(pk), enc(dn));
    let d = c.api.get(session, &base).await;
    if !d.ok() {
        return view::api_error(session, &d);
    }
    let jobs = c.api.get(session, &format!("{base}/ota/jobs")).await;
    let timeline = c.api.get(session, &format!("{base}/ota/timeline")).await;
    let action_url = format!("/console/products/{}/devices/{}", enc(pk), enc(dn));
    let dev = &d.body;
    let m = &dev["migration"];
    let body = html! {
        @if let Some(extra) = extra { (extra) }
        p { a href=(format!("/console/products/{}", enc(pk))) { "← product " (pk) } }
        dl.props {
            dt { "Online" } dd { @if dev["online"] == json!(true) { span.online #online { "online" } } @else { span.offline #online { "offline" } } }
            dt { "Enabled" } dd #enabled { @if dev["enabled"] == json!(true) { "yes" } @else { "no (disabled)" } }
            dt { "Last seen" } dd { (view::time(dev["last_seen_ms"].as_i64())) }
            dt { "Client IP" } dd { (s(&dev["client_ip"])) }
            dt { "Instance" } dd { (s(&dev["instance_id"])) }
            dt { "Versions" } dd { (kv(&dev["versions"])) }
            dt { "Tags" } dd { (kv(&dev["tags"])) }
            dt { "Migration" } dd { @if m.is_null() { "—" } @else { (s(&m["status"])) " in " a href=(format!("/console/migrations/{}", s(&m["task_id"]))) { (s(&m["task_id"])) } } }
        }
        @if session.may_operate() {
            div.actions {
                @if dev["enabled"] == json!(true) {
                    (device_button(session, &action_url, "disable", "Disable", false))
                } @else {
                    (device_button(session, &action_url, "enable", "Enable", false))
                }
                (device_button(session, &action_url, "secret", "Show secret", false))
                (device_button(session, &action_url, "delete", "Delete device", true))
            }
        }
        h2 { "OTA jobs" }
        div.table-wrap { table {
            thead { tr { th { "Job" } th { "Task" } th { "Upgrade" } } }
            tbody {
                @for j in jobs.body["items"].as_array().into_iter().flatten() {
                    tr {
                        td { a href=(format!("/console/ota/jobs/{}", s(&j["job_id"]))) { (s(&j["job_id"])) } }
                        td { (s(&j["task"]["status"])) }
                        td { (s(&j["module"])) " → " (s(&j["dest_version"])) }
                    }
                }
            }
        } }
        h2 { "OTA timeline" }
        div.table-wrap { table {
            thead { tr { th { "At" } th { "Job" } th { "Event" } th { "Status" } th { "Reason" } } }
            tbody {
                @for e in timeline.body.as_array().or_else(|| timeline.body["items"].as_array()).into_iter().flatten() {
                    tr {
                        td { (view::time(e["at_ms"].as_i64())) }
                        td { (s(&e["job_id"])) }
                        td { (s(&e["event"])) }
                        td { (s(&e["to_status"])) }
                        td { (s(&e["reason"])) }
                    }
                }
            }
        } }
    };
    ok_page(session, &format!("Device {dn}"), Nav::Products, body)
}

fn device_button(s: &Session, base: &str, action: &str, label: &str, danger: bool) -> Markup {
    html! {
        form.inline method="post" action=(format!("{base}/{action}")) {
            (view::csrf(s))
            button type="submit" class=[danger.then_some("danger")] data-action=(action) { (label) }
        }
    }
}

async fn device_action(
    State(c): State<Console>,
    session: Sess,
    Path((pk, dn, action)): Path<(String, String, String)>,
) -> Response {
    let base = format!("/api/v1/products/{}/devices/{}", enc(&pk), enc(&dn));
    let (method, path) = match action.as_str() {
        "enable" | "disable" => (Method::POST, format!("{base}/{action}")),
        "delete" => (Method::DELETE, base.clone()),
        "secret" => (Method::GET, format!("{base}/secret")),
        _ => return view::error_page(Some(&session), StatusCode::NOT_FOUND, "No such action."),
    };
    let a = c.api.json(&session, method, &path, &Value::Null).await;
    if !a.ok() {
        return view::api_error(&session, &a);
    }
    match action.as_str() {
        "delete" => Redirect::to(&format!("/console/products/{}", enc(&pk))).into_response(),
        "secret" => {
            let extra = secret_box("Device secret", &s(&a.body["device_secret"]));
            device_page(&c, &session, &pk, &dn, Some(extra)).await
        }
        _ => Redirect::to(&format!(
            "/console/products/{}/devices/{}",
            enc(&pk),
            enc(&dn)
        ))
        .into_response(),
    }
}
