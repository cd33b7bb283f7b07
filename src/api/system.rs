//! Unauthenticated endpoints (`/healthz`, `/metrics`, `/api/v1/openapi.json`), the fallbacks
//! for unknown routes and methods, and `OPTIONS`.
//!
//! A method a route does not have gets 405 with an `Allow` header listing the route's
//! methods; `OPTIONS` on any route gets 204 with the same header. axum computes the list from
//! the route's method router (`GET` brings `HEAD`) and adds it to what the route's
//! method-not-allowed fallback ([`method_not_allowed`]) answers; [`advertise_options`], outside
//! the router, adds `OPTIONS` itself, which every route answers that way. Neither needs a token:
//! what methods a path has is no secret (the document lists them), and a 405 is decided before
//! authentication. No CORS headers are sent: the API serves no browser origin but its own
//! console.
//!
//! They are open on purpose: probes and Prometheus scrapers carry no token, and the OpenAPI
//! document describes the API, not the fleet. None of them exposes a secret or changes state.

use std::sync::OnceLock;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::ApiState;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// `/healthz`, `/metrics` and this document: no token needed.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::default()
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
}

/// Liveness plus what the app reports (listeners, AMQP status, …).
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "system",
    security(()),
    responses((status = 200, description = "The gateway is up; extra fields come from the app",
        body = Object, example = json!({"status": "ok", "amqp": "disabled"})))
)]
pub async fn healthz(State(state): State<ApiState>) -> Json<Value> {
    let mut out = Map::new();
    out.insert("status".into(), Value::from("ok"));
    match (state.health)() {
        Value::Object(extra) => out.extend(extra),
        Value::Null => {}
        other => {
            out.insert("details".into(), other);
        }
    }
    Json(Value::Object(out))
}

/// Every gateway metric, in the text format the `Accept` header asks for.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "system",
    security(()),
    responses((status = 200, description = "OpenMetrics 1.0 when `Accept` prefers `application/openmetrics-text` (Prometheus does), else the Prometheus text format 0.0.4",
        content(
            (String = "text/plain; version=0.0.4"),
            (String = "application/openmetrics-text; version=1.0.0"),
        )))
)]
pub async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = crate::metrics::Format::negotiate(accept);
    (
        [(header::CONTENT_TYPE, format.content_type())],
        state.metrics.encode_as(format),
    )
}

/// This document.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "system",
    security(()),
    responses((status = 200, description = "OpenAPI 3.1 document of this API", body = Object))
)]
pub async fn openapi_json() -> impl IntoResponse {
    // The document is generated from the code and never changes while running.
    static DOC: OnceLock<String> = OnceLock::new();
    let doc = DOC.get_or_init(|| {
        super::openapi::document()
            .to_json()
            .unwrap_or_else(|e| format!(r#"{{"error":"cannot serialise OpenAPI: {e}"}}"#))
    });
    ([(header::CONTENT_TYPE, "application/json")], doc.as_str())
}

pub async fn not_found() -> ApiError {
    ApiError::route_not_found()
}

/// A method the route does not have: 405 (`FG.0405`), or 204 for `OPTIONS`. axum adds the
/// `Allow` header to either.
pub async fn method_not_allowed(method: Method) -> Response {
    if method == Method::OPTIONS {
        StatusCode::NO_CONTENT.into_response()
    } else {
        ApiError::method_not_allowed().into_response()
    }
}

/// Adds `OPTIONS` to an `Allow` header axum's method routing set (every route answers it, in
/// [`method_not_allowed`], which axum does not know). Must run outside the router: axum sets
/// `Allow` on the way out of the route, after the router's own layers.
pub async fn advertise_options(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let allow = response
        .headers()
        .get(header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && !v.split(',').any(|m| m.trim() == "OPTIONS"))
        .map(|v| format!("{v},OPTIONS"));
    if let Some(value) = allow.and_then(|v| HeaderValue::from_str(&v).ok()) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}
