//! Readiness, the cluster's members, and cluster mode's settle step.
//!
//! - `GET /readyz` (open, for probes and HAProxy's health check): 200 when this node can serve
//!   (listeners bound, the store reachable, in sync with the cluster, the AMQP forwarder
//!   connected when one is configured), 503 with the reasons otherwise. `/healthz` is liveness.
//! - `GET /api/v1/cluster` (any role): this node and the nodes it hears from.
//! - [`settle`]: in cluster mode, a write (any method but GET/HEAD/OPTIONS) that succeeded
//!   answers only once every live node applied it (docs/CLUSTER.md, "Settle").

use super::ApiState;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

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
    )
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
    }];
    nodes.extend(cluster.members().into_iter().map(|m| NodeView {
        node: m.node,
        this: false,
        mqtt: m.mqtt,
        http: m.http,
        boot_ms: m.boot_ms,
        feed_seq: m.seq,
        heard_ms: Some(m.heard_ms),
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
