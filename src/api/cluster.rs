//! Readiness, the cluster's members, and cluster mode's settle step.
//!
//! - `GET /readyz` (open, for probes and HAProxy's health check): 200 when this node can serve
//!   (listeners bound, the store reachable, in sync with the cluster, the AMQP forwarder
//!   connected when one is configured), 503 with the reasons otherwise. `/healthz` is liveness.
//! - `GET /api/v1/cluster` (any role): this node and the nodes it hears from.
//! - [`settle`]: in cluster mode, a write (any method but GET/HEAD/OPTIONS) that succeeded
//!   answers only once every live node applied it (docs/CLUSTER.md, "Settle").
//! - [`engines_proxy`]: in cluster mode, OTA, firmware, migration and export/import calls are served by
//!   the node that drives the engines; another node passes them on to it (docs/CLUSTER.md,
//!   "Engines").

use super::error::{ApiError, ErrorCode, StandardErrorBody};
use super::ApiState;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// `/readyz`, open to load balancers.
pub(super) fn public_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::default().routes(routes!(readyz))
}

/// `/api/v1/cluster` (`/readyz` is [`public_routes`]).
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::default().routes(routes!(cluster_status))
}

/// Whether the node can serve, and the state of each part (`ok`, or why not).
pub type ReadyFn = std::sync::Arc<dyn Fn() -> (bool, Value) + Send + Sync>;

/// Readiness.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "system",
    security(()),
    responses(
        (status = 200, description = "Ready: listeners bound, store reachable, in sync with the cluster, forwarder connected when configured",
            body = Object, example = json!({"ready": true, "checks": {"listeners": "ok", "store": "ok", "cluster": "ok", "amqp": "disabled"}})),
        (status = 503, description = "Not ready; `checks` says which part is not", body = Object),
    )
)]
pub async fn readyz(State(state): State<ApiState>) -> Response {
    let (ready, checks) = (state.ready)();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = (status, Json(json!({"ready": ready, "checks": checks}))).into_response();
    // A 503 here is an answer, not an error: the request middleware must keep its body (the
    // checks say which part is not ready) instead of putting the standard error body in.
    response
        .extensions_mut()
        .insert(super::error::StandardErrorBody);
    response
}

/// A node of the cluster as this node knows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeView {
    pub node: u16,
    /// This node (the one answering).
    #[serde(rename = "self")]
    pub this: bool,
    pub mqtt: String,
    pub http: String,
    /// When the node started, ms since the Unix epoch.
    pub boot_ms: i64,
    /// The node's position in its change feed.
    pub feed_seq: u64,
    /// When this node last heard from it, ms since the Unix epoch (absent for itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heard_ms: Option<i64>,
    /// It holds the engines' lease: its OTA engine is the one running.
    pub engines: bool,
}

/// The cluster as this node sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterView {
    /// `single` (one node, no cluster) or `cluster`.
    pub mode: &'static str,
    /// This node's id (0 on a single node).
    pub node: u16,
    pub name: Option<String>,
    pub ready: bool,
    /// This node first, then the others it hears from, by id.
    pub nodes: Vec<NodeView>,
}

/// The cluster's nodes.
#[utoipa::path(
    get,
    path = "/api/v1/cluster",
    tag = "system",
    responses(
        (status = 200, description = "This node and the nodes it hears from", body = ClusterView),
        (status = 401, description = "Missing or invalid token", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn cluster_status(State(state): State<ApiState>) -> Json<ClusterView> {
    let (ready, _) = (state.ready)();
    let Some(cluster) = &state.cluster else {
        return Json(ClusterView {
            mode: "single",
            node: 0,
            name: None,
            ready,
            nodes: Vec::new(),
        });
    };
    let this = cluster.this_node();
    let mut nodes = vec![NodeView {
        node: this.node,
        this: true,
        mqtt: this.mqtt,
        http: this.http,
        boot_ms: this.boot_ms,
        feed_seq: this.seq,
        heard_ms: None,
        engines: this.engines,
    }];
    nodes.extend(cluster.members().into_iter().map(|m| NodeView {
        node: m.node,
        this: false,
        mqtt: m.mqtt,
        http: m.http,
        boot_ms: m.boot_ms,
        feed_seq: m.seq,
        heard_ms: Some(m.heard_ms),
        engines: m.engines,
    }));
    Json(ClusterView {
        mode: "cluster",
        node: cluster.node(),
        name: Some(cluster.settings().name.clone()),
        ready,
        nodes,
    })
}

/// Cluster mode: a successful write answers once every live node applied it.
pub async fn settle(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let write = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    let response = next.run(request).await;
    if let (true, Some(cluster)) = (write && response.status().is_success(), &state.cluster) {
        cluster.settle().await;
    }
    response
}

/// Header a proxied request carries: the node that passed it on (never proxied twice).
pub const PROXIED_BY: &str = "x-fleetgate-proxied-by";

/// Whether a route belongs to the engines: OTA jobs, tasks, firmware and their reads, and
/// export/import jobs (which read and write OTA jobs through the active engine).
pub fn engine_route(path: &str) -> bool {
    let under = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    under("/api/v1/ota")
        || under("/api/v1/migrations")
        || under("/api/v1/firmware")
        || under("/api/v1/export")
        || under("/api/v1/import")
        || (path.starts_with("/api/v1/products/") && path.contains("/ota/"))
}

/// Cluster mode: an engine call reaching a node that does not drive the engines is passed on
/// to the one that does (its HTTP address from its heartbeat), so a round-robin balancer in
/// front of the API works; while no node drives them (a takeover) it answers 503 `FG.0503`.
pub async fn engines_proxy(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Response {
    use crate::cluster::engines::EnginesAt;
    let Some(cluster) = &state.cluster else {
        return next.run(request).await;
    };
    if !engine_route(request.uri().path()) {
        return next.run(request).await;
    }
    let (node, http) = match cluster.engines_at() {
        EnginesAt::Here => return next.run(request).await,
        EnginesAt::Node { node, http } if !request.headers().contains_key(PROXIED_BY) => {
            (node, http)
        }
        _ => {
            return ApiError::new(
                ErrorCode::Unavailable,
                "no node drives the engines (OTA, migration, export/import) right now (the cluster is handing them over); retry in a few seconds",
            )
            .into_response()
        }
    };
    match forward(cluster.node(), &http, request).await {
        Ok(response) => response,
        Err(error) => {
            tracing::warn!(%error, node, http = %http, "cannot pass an engine call on");
            ApiError::new(
                ErrorCode::Unavailable,
                format!("the node that drives the engines (node {node}) did not answer; retry in a few seconds"),
            )
            .into_response()
        }
    }
}

/// Sends `request` to `http` and streams the answer back.
async fn forward(this: u16, http: &str, request: Request) -> Result<Response, reqwest::Error> {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(2))
            .build()
            .unwrap_or_default()
    });
    let (parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str());
    let mut headers = parts.headers;
    for h in [header::HOST, header::CONNECTION, header::TRANSFER_ENCODING] {
        headers.remove(h);
    }
    headers.insert(PROXIED_BY, HeaderValue::from(this));
    let answer = client
        .request(parts.method, format!("http://{http}{path}"))
        .headers(headers)
        .body(reqwest::Body::wrap_stream(body.into_data_stream()))
        .send()
        .await?;
    let status = answer.status();
    let mut headers = answer.headers().clone();
    for h in [header::CONNECTION, header::TRANSFER_ENCODING] {
        headers.remove(h);
    }
    let mut response = Response::new(axum::body::Body::from_stream(answer.bytes_stream()));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    // The answering node already gave its errors the standard body.
    response.extensions_mut().insert(StandardErrorBody);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::engine_route;

    #[test]
    fn engine_routes_are_the_ota_firmware_and_export_ones() {
        for path in [
            "/api/v1/ota/jobs",
            "/api/v1/ota/jobs/j1/tasks/dev-1",
            "/api/v1/firmware",
            "/api/v1/firmware/f1/statistics",
            "/api/v1/export",
            "/api/v1/export/e1/package",
            "/api/v1/import/i1/log",
            "/api/v1/products/pk/devices/dn/ota/timeline",
            "/api/v1/products/pk/ota/versions",
            "/api/v1/migrations",
            "/api/v1/migrations/t1/rollback",
        ] {
            assert!(engine_route(path), "{path}");
        }
        for path in [
            "/api/v1/products/pk/devices/dn",
            "/api/v1/migrationsx",
            "/api/v1/cluster",
            "/api/v1/firmwares",
            "/api/v1/exports",
            "/firmware/f1/download",
        ] {
            assert!(!engine_route(path), "{path}");
        }
    }
}
