//! The start steps of the HTTP side: the API tokens and state, `/healthz` and `/readyz`, the
//! server itself, and the shutdown signal.

use super::HttpServer;
use crate::admission::{Budgets, Gate, GateLimits};
use crate::api::{self, ApiState, TokenSet};
use crate::app::Parts;
use crate::broker::BrokerHandle;
use crate::cluster::Cluster;
use crate::config::Settings;
use crate::export::{DeviceRevokedHook, ExportService};
use crate::forwarder::Forwarder;
use crate::metrics::Listener;
use crate::store::Store;
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The API tokens: the admin token (configured, else read from the data dir, else created
/// there: the second value) and the configured further tokens.
pub(in crate::app) fn load_api_tokens(
    settings: &Settings,
) -> anyhow::Result<(TokenSet, Option<String>)> {
    let (tokens, created_admin_token) = TokenSet::load_or_create_admin(
        &settings.data_dir,
        settings.api.token.as_ref().map(|t| t.expose().to_owned()),
    )
    .context("cannot set up API tokens")?;
    let tokens = settings
        .api
        .tokens
        .iter()
        .try_fold(tokens, |set, t| set.with_token(t.token.expose(), &t.role))
        .context("invalid api.tokens")?;
    Ok((tokens, created_admin_token))
}

/// What the API handlers get.
pub(in crate::app) fn api_state(
    parts: &Parts,
    store: &Store,
    broker: &BrokerHandle,
    tokens: TokenSet,
    export: ExportService,
    revoke_session: DeviceRevokedHook,
    health: api::HealthFn,
) -> ApiState {
    ApiState {
        registry: parts.registry.clone(),
        metrics: parts.metrics.clone(),
        tokens: Arc::new(tokens),
        firmware: parts.firmware.clone(),
        ota: parts.ota.clone(),
        export,
        health,
        on_device_revoked: revoke_session,
        forwarder: parts.forwarder.clone(),
        migration: parts.migration.clone(),
        ready: readiness(
            Box::new(broker.accepting()),
            store.clone(),
            parts.forwarder.clone(),
            parts.cluster.clone(),
        ),
        cluster: parts.cluster.clone(),
        commands: parts.commands.clone(),
        console_sessions: parts.console_sessions.clone(),
        forward_proxy_header: false,
    }
}

/// `/healthz`'s fields after `"status":"ok"`: the bound addresses, online devices, this node
/// (cluster mode) and the forwarder's state.
pub(in crate::app) fn health_info(
    parts: &Parts,
    broker: &BrokerHandle,
    node: u16,
    http_addr: SocketAddr,
) -> api::HealthFn {
    let mqtt = broker.mqtt_addr();
    let tls = broker.tls_addr();
    let registry = parts.registry.clone();
    let forwarder = parts.forwarder.clone();
    Arc::new(move || {
        let mut v = serde_json::json!({
            "mqtt": mqtt.to_string(),
            "mqtt_tls": tls.map(|a| a.to_string()),
            "http": http_addr.to_string(),
            "online_devices": registry.online_count(),
        });
        if node != 0 {
            v["node"] = node.into();
        }
        // "amqp": disabled | connecting | connected | disconnected, plus outbox depth.
        if let (Some(v), serde_json::Value::Object(amqp)) = (v.as_object_mut(), forwarder.health())
        {
            v.extend(amqp);
        }
        v
    })
}

/// Serves the API (and the console) on `listener` behind the HTTP connection gate.
pub(in crate::app) fn serve_http(
    listener: TcpListener,
    addr: SocketAddr,
    state: ApiState,
    settings: &Settings,
    budgets: &Budgets,
) -> HttpServer {
    let metrics = state.metrics.clone();
    let router = api::router(
        state,
        api::BodyLimits {
            json: settings.http.json_body_limit_bytes,
            batch: settings.http.batch_body_limit_bytes,
        },
    );
    let gate = Gate::new(
        Listener::Http,
        GateLimits {
            max_open: budgets.http_connections,
            max_per_source: budgets.http_per_ip,
        },
        &metrics,
    );
    let timeouts = api::serve::HttpTimeouts {
        header_read: Duration::from_secs(settings.http.header_read_timeout_secs),
        body_read: Duration::from_secs(settings.http.body_read_timeout_secs),
        write: Duration::from_secs(settings.http.write_timeout_secs),
    };
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(api::serve::serve(
        listener,
        router,
        timeouts,
        settings.http.proxy_policy(),
        gate,
        metrics,
        async {
            let _ = stop_rx.await;
        },
    ));
    HttpServer { addr, stop, task }
}

/// `/readyz`: the MQTT listeners accept (the HTTP one answers this very request), the store
/// answers (its writer is alive), the node is in sync with the cluster (cluster mode), and the
/// forwarder is connected when AMQP forwarding is on.
pub(in crate::app) fn readiness(
    accepting: Box<dyn Fn() -> bool + Send + Sync>,
    store: Store,
    forwarder: Arc<Forwarder>,
    cluster: Option<Arc<Cluster>>,
) -> api::ReadyFn {
    Arc::new(move || {
        let mut ready = true;
        let mut checks = serde_json::Map::new();
        let listeners = if accepting() {
            "ok"
        } else {
            ready = false;
            "stopped accepting (shutting down)"
        };
        checks.insert("listeners".into(), listeners.into());
        let store = if store.is_open() {
            "ok"
        } else {
            ready = false;
            "closed"
        };
        checks.insert("store".into(), store.into());
        if let Some(cluster) = &cluster {
            let state = if cluster.ready() {
                "ok"
            } else {
                ready = false;
                "not in sync with the cluster (NATS unreachable or resynchronising)"
            };
            checks.insert("cluster".into(), state.into());
        }
        let amqp = match forwarder.health().get("amqp").and_then(|v| v.as_str()) {
            Some("connected") => "ok".to_owned(),
            Some("disabled") | None => "disabled".to_owned(),
            Some(other) => {
                ready = false;
                other.to_owned()
            }
        };
        checks.insert("amqp".into(), amqp.into());
        (ready, serde_json::Value::Object(checks))
    })
}
