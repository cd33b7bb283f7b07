//! Readiness, the cluster's members, and cluster mode's settle step.
//!
//! - `GET /readyz` (open, for probes and HAProxy's health check): 200 when this node can serve
//!   (listeners bound, the store reachable, in sync with the cluster, the AMQP forwarder
//!   connected when one is configured), 503 with the reasons otherwise. `/healthz` is liveness.
//! - `GET /api/v1/cluster` (any role): this node and the nodes it hears from.
//! - [`settle`]: in cluster mode, a write (any method but GET/HEAD/OPTIONS) that succeeded
//!   answers only once every live node applied it (docs/CLUSTER.md, "Settle").
//! - [`engines_proxy`]: in cluster mode, OTA, firmware, migration and export/import calls are
//!   served by the node that drives the engines; another node passes them on to it
//!   (docs/CLUSTER.md, "Engines"). [`to_engines`] does the passing on, for the console's pages
//!   that read the engines too. With `http.proxy_protocol` on, the call passed on starts with
//!   a PROXY header naming the client, so the engines' node admits and logs the operator as the
//!   first node did (and accepts the connection at all: its listener expects a header from the
//!   nodes).

use super::error::{ApiError, ErrorCode, StandardErrorBody};
use super::ApiState;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
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
    if !engine_route(request.uri().path()) {
        return next.run(request).await;
    }
    match to_engines(&state, request).await {
        EngineCall::Here(request) => next.run(request).await,
        EngineCall::Answered(response) => response,
        EngineCall::Unavailable(message) => {
            ApiError::new(ErrorCode::Unavailable, message).into_response()
        }
    }
}

/// Where [`to_engines`] left a request.
pub enum EngineCall {
    /// This node serves it: not in cluster mode, or it drives the engines.
    Here(Request),
    /// The engines' node answered it (its answer, whatever the status).
    Answered(Response),
    /// Nobody could: no node drives the engines now, or the one that does did not answer.
    Unavailable(String),
}

/// Passes `request` on to the node that drives the engines when that is another node; the
/// API's engine routes ([`engines_proxy`]) and the console's pages that read the engines
/// (`crate::console`) go through here. A request passed on once is not passed on again.
pub async fn to_engines(state: &ApiState, request: Request) -> EngineCall {
    use crate::cluster::engines::EnginesAt;
    let Some(cluster) = &state.cluster else {
        return EngineCall::Here(request);
    };
    let (node, http) = match cluster.engines_at() {
        EnginesAt::Here => return EngineCall::Here(request),
        EnginesAt::Node { node, http } if !request.headers().contains_key(PROXIED_BY) => {
            (node, http)
        }
        _ => {
            return EngineCall::Unavailable(
                "no node drives the engines (OTA, migration, export/import) right now (the cluster is handing them over); retry in a few seconds".into(),
            )
        }
    };
    let client = state
        .forward_proxy_header
        .then(|| {
            request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(peer)| *peer)
        })
        .flatten();
    let forwarded = match client {
        Some(client) => forward_proxied(cluster.node(), &http, client, request).await,
        None => forward(cluster.node(), &http, request)
            .await
            .map_err(ForwardError::from),
    };
    match forwarded {
        Ok(response) => EngineCall::Answered(response),
        Err(error) => {
            tracing::warn!(%error, node, http = %http, "cannot pass an engine call on");
            EngineCall::Unavailable(format!(
                "the node that drives the engines (node {node}) did not answer; retry in a few seconds"
            ))
        }
    }
}

/// Why an engine call could not be passed on.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error(transparent)]
    Client(#[from] reqwest::Error),
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("connecting: no answer within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
    #[error("the PROXY header: {0}")]
    Header(String),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// How long passing a call on may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends `request` to `http` and streams the answer back.
async fn forward(this: u16, http: &str, request: Request) -> Result<Response, reqwest::Error> {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // The answer is the client's to follow (a console page may redirect to the login).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default()
    });
    let (parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str());
    let headers = forwarded_headers(this, parts.headers);
    let answer = client
        .request(parts.method, format!("http://{http}{path}"))
        .headers(headers)
        .body(reqwest::Body::wrap_stream(body.into_data_stream()))
        .send()
        .await?;
    let status = answer.status();
    let headers = answer.headers().clone();
    let mut response = Response::new(axum::body::Body::from_stream(answer.bytes_stream()));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(answered(response))
}

/// [`forward`] on a connection of its own that starts with a PROXY v2 header naming `client`
/// (the header is per connection, so connections are not pooled; engine calls are few).
async fn forward_proxied(
    this: u16,
    http: &str,
    client: SocketAddr,
    request: Request,
) -> Result<Response, ForwardError> {
    use ppp::v2;
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(http))
        .await
        .map_err(|_| ForwardError::ConnectTimeout)?
        .map_err(ForwardError::Connect)?;
    let _ = stream.set_nodelay(true);
    // The header's destination is informational; its family must be the client's.
    let destination = match stream.peer_addr() {
        Ok(to) if to.is_ipv4() == client.is_ipv4() => to,
        _ if client.is_ipv4() => SocketAddr::from(([0, 0, 0, 0], 0)),
        _ => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
    };
    let header = v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (client, destination),
    )
    .build()
    .map_err(|e| ForwardError::Header(e.to_string()))?;
    stream
        .write_all(&header)
        .await
        .map_err(ForwardError::Connect)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "connection of an engine call passed on ended");
        }
    });
    let (mut parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    parts.uri = path.parse().map_err(|e: axum::http::uri::InvalidUri| {
        ForwardError::Header(format!("the request's path: {e}"))
    })?;
    parts.headers = forwarded_headers(this, std::mem::take(&mut parts.headers));
    if let Ok(host) = HeaderValue::from_str(http) {
        parts.headers.insert(header::HOST, host);
    }
    let answer = sender
        .send_request(axum::http::Request::from_parts(parts, body))
        .await?;
    Ok(answered(answer.map(axum::body::Body::new)))
}

/// The headers of a call passed on: the client's, less the hop-by-hop ones, and who passed it.
fn forwarded_headers(this: u16, mut headers: HeaderMap) -> HeaderMap {
    for h in [header::HOST, header::CONNECTION, header::TRANSFER_ENCODING] {
        headers.remove(h);
    }
    headers.insert(PROXIED_BY, HeaderValue::from(this));
    headers
}

/// The engines' node's answer, as this node's: less the hop-by-hop headers, and marked as
/// already carrying the standard error body (the answering node gave its errors one).
fn answered(mut response: Response) -> Response {
    for h in [header::CONNECTION, header::TRANSFER_ENCODING] {
        response.headers_mut().remove(h);
    }
    response.extensions_mut().insert(StandardErrorBody);
    response
}

#[cfg(test)]
mod tests {
    use super::engine_route;

    /// A call passed on to a node whose HTTP listener requires PROXY headers from the nodes
    /// names the client that made it, and the answer comes back whole.
    #[tokio::test]
    async fn a_call_passed_on_names_its_client_in_a_proxy_header() {
        use super::*;
        use crate::admission::{Gate, GateLimits};
        use crate::api::serve::{bind, serve, HttpTimeouts};
        use crate::metrics::{Listener, Metrics};
        use crate::proxy_protocol::{ProxyMode, ProxyPolicy};
        use axum::routing::post;

        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = std::sync::Arc::new(Metrics::new());
        let gate = Gate::new(
            Listener::Http,
            GateLimits {
                max_open: 8,
                max_per_source: 8,
            },
            &metrics,
        );
        let router =
            axum::Router::new().route(
                "/api/v1/ota/jobs",
                post(
                    |ConnectInfo(peer): ConnectInfo<SocketAddr>,
                     headers: HeaderMap,
                     body: String| async move {
                        let by = headers
                            .get(PROXIED_BY)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        format!("{peer} {by} {body}")
                    },
                ),
            );
        let (_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(
            listener,
            router,
            HttpTimeouts {
                header_read: Duration::from_secs(5),
                body_read: Duration::from_secs(5),
                write: Duration::from_secs(5),
            },
            // Nothing from this node's address is served without a header.
            ProxyPolicy {
                mode: ProxyMode::Required,
                trusted: vec!["127.0.0.1".parse().unwrap()],
            },
            gate,
            metrics,
            async {
                let _ = stop_rx.await;
            },
        ));

        let client: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let request = axum::http::Request::post("http://node1/api/v1/ota/jobs?x=1")
            .body(axum::body::Body::from("job"))
            .unwrap();
        let response = forward_proxied(2, &addr.to_string(), client, request)
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(body, "198.51.100.7:40000 2 job");

        // Without the header the node does not answer at all.
        let request = axum::http::Request::post("http://node1/api/v1/ota/jobs")
            .body(axum::body::Body::from("job"))
            .unwrap();
        assert!(forward(2, &addr.to_string(), request).await.is_err());
    }

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
