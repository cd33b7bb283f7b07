//! Unauthenticated endpoints (`/healthz`, `/metrics`, `/api/v1/openapi.json`) and the
//! fallbacks for unknown routes and methods.
//!
//! They are open on purpose: probes and Prometheus scrapers carry no token, and the OpenAPI
//! document describes the API, not the fleet. None of them exposes a secret or changes state.

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{Map, Value};
use utoipa::OpenApi;

use super::error::ApiError;
use super::openapi::ApiDoc;
use super::ApiState;

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
        ApiDoc::openapi()
            .to_json()
            .unwrap_or_else(|e| format!(r#"{{"error":"cannot serialise OpenAPI: {e}"}}"#))
    });
    ([(header::CONTENT_TYPE, "application/json")], doc.as_str())
}

pub async fn not_found() -> ApiError {
    ApiError::route_not_found()
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}
