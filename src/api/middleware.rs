//! The outermost layer of every request: request id, tracing span, metrics, and the guarantee
//! that every error response carries the standard error body.
//!
//! The request id is taken from an incoming `x-request-id` when it looks sane (1..=128 of
//! `[A-Za-z0-9._:-]`, so it cannot smuggle anything into logs), else a new UUID v4. It is echoed
//! in the `x-request-id` response header, recorded on the span, and made available to
//! [`ApiError`]'s rendering through a task-local (handlers run inside this layer's future).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tracing::Instrument;

use super::error::{ApiError, ErrorCode, StandardErrorBody};
use crate::metrics::Metrics;

/// The request id header, in and out.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being served, when called from inside a request.
pub(crate) fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

fn sane_request_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then(|| s.to_owned())
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// See the module docs.
pub async fn observe(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = req
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(sane_request_id)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // Set by the accept loop (`serve`); absent when a test drives the router directly.
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr);
    let span = tracing::info_span!(
        "http",
        method = %method,
        path = %path,
        peer = tracing::field::Empty,
        request_id = %request_id,
        role = tracing::field::Empty,
        status = tracing::field::Empty,
        latency_ms = tracing::field::Empty,
    );

    if let Some(peer) = peer {
        span.record("peer", tracing::field::display(peer));
    }
    let mut resp = REQUEST_ID
        .scope(request_id.clone(), next.run(req))
        .instrument(span.clone())
        .await;

    let status = resp.status();
    if (status.is_client_error() || status.is_server_error())
        && resp.extensions().get::<StandardErrorBody>().is_none()
    {
        resp = standardise(resp, &request_id);
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    metrics
        .http_requests
        .get_or_create(&[("class", status_class(status))])
        .inc();

    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    span.record("status", status.as_u16());
    span.record("latency_ms", latency_ms);
    let _entered = span.enter();
    // Scrapes and probes would drown the log at info.
    if path == "/metrics" || path == "/healthz" {
        tracing::debug!("request");
    } else if status.is_server_error() {
        tracing::warn!("request");
    } else {
        tracing::info!("request");
    }
    resp
}

/// Gives a bare error response from a layer or axum itself (405, 413 from a limit, …) the
/// standard body, keeping its status and headers (e.g. `Allow`).
fn standardise(resp: Response, request_id: &str) -> Response {
    let (mut parts, _body) = resp.into_parts();
    let code = match parts.status {
        StatusCode::BAD_REQUEST => ErrorCode::BadRequest,
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthenticated,
        StatusCode::FORBIDDEN => ErrorCode::Forbidden,
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::CONFLICT => ErrorCode::Conflict,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::TooManyRequests,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::BadRequest,
    };
    let msg = parts
        .status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase();
    let body = ApiError::new(code, msg).body(request_id.to_owned());
    let fresh = Json(body).into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    if let Some(ct) = fresh.headers().get(header::CONTENT_TYPE) {
        parts.headers.insert(header::CONTENT_TYPE, ct.clone());
    }
    parts.extensions.insert(StandardErrorBody);
    Response::from_parts(parts, fresh.into_body())
}

/// Turns a handler panic into a 500 in the standard body (the detail goes to the log).
pub(crate) fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    let detail = if let Some(s) = err.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = err.downcast_ref::<&str>() {
        (*s).to_owned()
    } else {
        "unknown panic payload".to_owned()
    };
    ApiError::internal(format!("handler panicked: {detail}")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use axum::Router;
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    use tower_http::catch_panic::CatchPanicLayer;

    /// The same outer layers as `api::router`, around routes that misbehave.
    fn layered(metrics: Arc<Metrics>) -> Router {
        Router::new()
            .route(
                "/boom",
                get(|| async {
                    if true {
                        panic!("secret detail");
                    }
                    "unreachable"
                }),
            )
            .route(
                "/bare",
                get(|| async { (StatusCode::TOO_MANY_REQUESTS, "slow down") }),
            )
            .layer(CatchPanicLayer::custom(panic_response))
            .layer(axum::middleware::from_fn_with_state(metrics, observe))
    }

    async fn call(router: Router, uri: &str) -> (StatusCode, HeaderValue, serde_json::Value) {
        let req = axum::http::Request::get(uri).body(Body::empty()).unwrap();
        let resp = router.oneshot(req).await.unwrap();
        let status = resp.status();
        let rid = resp.headers()[&REQUEST_ID_HEADER].clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, rid, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn a_panic_is_a_500_in_the_standard_body_without_the_detail() {
        let metrics = Arc::new(Metrics::new());
        let (status, rid, body) = call(layered(metrics.clone()), "/boom").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error_code"], "FG.0500");
        assert_eq!(body["request_id"], rid.to_str().unwrap());
        assert!(!body.to_string().contains("secret detail"), "{body}");
        let text = metrics.encode();
        assert!(
            text.contains(r#"fleetgate_http_requests_total{class="5xx"} 1"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn bare_error_responses_get_the_standard_body() {
        let metrics = Arc::new(Metrics::new());
        let (status, rid, body) = call(layered(metrics), "/bare").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(body["error_code"], "FG.0429");
        assert_eq!(body["request_id"], rid.to_str().unwrap());
    }

    #[test]
    fn request_ids_are_sanitised() {
        let ok = HeaderValue::from_static("abc-123_x.y:z");
        assert_eq!(sane_request_id(&ok).as_deref(), Some("abc-123_x.y:z"));
        for bad in ["", "has space", "semi;colon", "new\tline"] {
            let v = HeaderValue::from_str(bad).unwrap();
            assert_eq!(sane_request_id(&v), None, "{bad:?}");
        }
        let long = HeaderValue::from_str(&"a".repeat(129)).unwrap();
        assert_eq!(sane_request_id(&long), None);
    }
}
