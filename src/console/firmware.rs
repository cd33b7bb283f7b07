//! Firmware: packages with their verification state, jobs using each, and the upload form
//! (with sign method). The upload is a multipart form whose body is streamed unchanged to
//! `POST /api/v1/firmware` (its CSRF token rides in the query), so size limits, digests and
//! validation are the API's.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use maud::html;
use serde::Deserialize;

use super::view::{self, enc, Nav};
use super::{Console, Sess};
use crate::ota::engine::JobFilter;
use crate::registry::Page;

pub(super) fn routes() -> Router<Console> {
    Router::new().route("/console/firmware", get(list).post(upload))
}

#[derive(Deserialize, Default)]
pub(super) struct FirmwareQuery {
    page: Option<u32>,
}

async fn list(State(c): State<Console>, session: Sess, Query(q): Query<FirmwareQuery>) -> Response {
    let page = q.page.unwrap_or(1).max(1);
    let packages = c
        .api_state
        .firmware
        .list(None, Page::new(page, 50).unwrap_or_default());
    let products = c
        .api_state
        .registry
        .list_products(Page::new(1, 100).unwrap_or_default());
    let jobs_of = |fid: &str| -> u64 {
        c.api_state
            .ota
            .list_jobs(
                &JobFilter {
                    firmware_id: Some(fid.to_owned()),
                    ..Default::default()
                },
                Page::new(1, 1).unwrap_or_default(),
            )
            .total
    };
    let body = html! {
        div.table-wrap { table #firmware {
            thead { tr { th { "Package" } th { "Product" } th { "Module" } th { "Version" } th { "State" } th.hide-narrow { "Size" } th.hide-narrow { "Sign" } th { "Jobs" } } }
            tbody {
                @for p in &packages.items {
                    tr data-firmware=(p.firmware_id) {
                        td { code { (p.firmware_id) } br; span.small { (p.name) } }
                        td { (p.product_key) }
                        td { (p.module) }
                        td { (p.version) }
                        td { span.badge { (p.status.as_str()) } }
                        td.hide-narrow { (p.size) " B" }
                        td.hide-narrow { (p.sign_method.as_str()) }
                        td { a href=(format!("/console/ota?firmware_id={}", enc(&p.firmware_id))) { (jobs_of(&p.firmware_id)) " jobs" } }
                    }
                }
            }
        } }
        (view::pager(packages.page, packages.page_size, packages.total, |n| format!("/console/firmware?page={n}")))
        @if session.may_operate() {
            h2 { "Upload a package" }
            form.stack method="post" enctype="multipart/form-data"
                action=(format!("/console/firmware?csrf={}", enc(&session.csrf))) {
                label { "Product"
                    select name="product_key" required {
                        @for p in &products.items { option value=(p.product_key) { (p.name) " (" (p.product_key) ")" } }
                    }
                }
                label { "Version" input name="version" required; }
                label { "Module" input name="module" placeholder="default"; }
                label { "Name" input name="name"; }
                label { "Sign method"
                    select name="sign_method" { option value="SHA256" { "SHA256" } option value="Md5" { "MD5" } }
                }
                label { "Source versions" input name="src_versions" placeholder="comma-separated; empty: any"; }
                label.wide { "Firmware file" input type="file" name="file" required; }
                div.wide { button type="submit" { "Upload" } }
            }
        }
    };
    view::respond(
        StatusCode::OK,
        view::page("Firmware", Nav::Firmware, Some(&session), body),
    )
}

async fn upload(
    State(c): State<Console>,
    session: Sess,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // The browser's multipart body, parts unchanged except that empty optional fields are the
    // API's to judge (it treats an empty part as absent where that makes sense).
    let a = c
        .api
        .call(
            &session,
            Method::POST,
            "/api/v1/firmware",
            Some(content_type),
            body,
        )
        .await;
    if !a.ok() {
        return view::api_error(&session, &a);
    }
    Redirect::to("/console/firmware").into_response()
}
