//! The operator HTTP API (axum): routes, auth, error bodies, request ids, OpenAPI.
//!
//! Owns nothing but request handling: every state change goes through [`Registry`] or
//! [`FirmwareRepo`] methods (export/import through [`ExportService`]) (and, for dropping MQTT sessions, through the
//! [`ApiState::on_device_revoked`] hook the app wires to the broker). Conventions (docs/DESIGN.md §7):
//!
//! - JSON under `/api/v1`, `Authorization: Bearer <token>` (see [`auth`] for the roles);
//!   `/healthz`, `/metrics` and `/api/v1/openapi.json` are open, and so is the device-facing
//!   `/firmware/{fid}/download`, which checks its signed link instead ([`firmware`]).
//! - Every error is `{"error_code","error_msg","error_ext_msg","request_id"}` ([`error`]).
//! - Every response carries `x-request-id`; every request gets a tracing span and is counted in
//!   `fleetgate_http_requests_total{class}`.
//! - Lists are `{"items","total","page","page_size"}`.
//! - Device and product secrets are returned to their creator (the create responses) and
//!   otherwise only by the dedicated `…/secret` routes, to the roles that may manage them
//!   (devices: operator; products: admin); no list, single GET or update carries one.
//!
//! - [`serve`] is the listener's accept loop: connection budget and per-source cap, header,
//!   body and write timeouts (docs/SECURITY.md).
//!
//! Tests drive [`router`] with `tower::ServiceExt::oneshot`.

pub mod auth;
pub mod error;
pub mod extract;
pub mod middleware;
pub mod serve;

mod batch;
mod cluster;
mod commands;
mod consumer_groups;
mod devices;
mod export;
mod firmware;
mod forwarding;
mod instances;
mod migrations;
mod openapi;
mod ota;
mod products;
mod system;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::ToSchema;

pub use auth::{Caller, Role, TokenSet};
pub use cluster::ReadyFn;

/// The body readers the fuzz harnesses ([`crate::fuzzing`]) run.
#[cfg(feature = "fuzzing")]
pub(crate) mod fuzzing {
    use super::batch::InputRow;
    use super::ApiError;
    use crate::registry::NewDevice;

    pub(crate) use crate::migration::MAX_PICKED;
    pub(crate) use crate::ota::MAX_DEVICE_NAMES;
    pub(crate) use crate::registry::MAX_BATCH_ROWS;

    /// Batch create rows: a device ready for the registry, or the row's refusal.
    pub(crate) type Rows = Result<Vec<Result<NewDevice, ApiError>>, ApiError>;

    fn rows(parsed: Result<Vec<InputRow>, ApiError>) -> Rows {
        Ok(parsed?
            .into_iter()
            .map(|row| match row {
                InputRow::Ready(device) => Ok(device),
                InputRow::Refused { error, .. } => Err(error),
            })
            .collect())
    }

    pub(crate) fn batch_csv_rows(body: &[u8]) -> Rows {
        rows(super::batch::parse_csv_rows(body))
    }

    pub(crate) fn batch_json_rows(body: &[u8]) -> Rows {
        rows(super::batch::parse_json_rows(body))
    }

    pub(crate) fn ota_device_list(text: &str) -> Result<Vec<String>, ApiError> {
        super::ota::parse_device_list(text)
    }

    pub(crate) fn canary_csv_names(body: &[u8]) -> Result<Vec<String>, ApiError> {
        super::migrations::parse_csv_names(body)
    }
}
pub use error::{ApiError, ErrorBody, ErrorCode};
pub use extract::{ApiJson, ApiPath, ApiQuery};
pub use openapi::ApiDoc;

use crate::export::ExportService;
use crate::forwarder::Forwarder;
use crate::metrics::Metrics;
use crate::migration::MigrationEngine;
use crate::ota::{FirmwareRepo, OtaEngine};
use crate::registry::{Paged, Registry};

/// Default body limit of every JSON route: any JSON request the API accepts fits (10,000 device
/// names of 32 characters are ~350 KB), and a client cannot make a handler buffer and parse
/// tens of megabytes.
pub const DEFAULT_JSON_BODY_LIMIT: usize = 1024 * 1024;
/// Default body limit of the routes that take device lists (batch create, migration
/// canary/rollback, OTA jobs with an uploaded list): 10,000 rows with secrets and tags.
pub const DEFAULT_BATCH_BODY_LIMIT: usize = 16 * 1024 * 1024;

/// Request body limits by kind of route; beyond one, 413 `FG.0413` in the standard body.
/// Firmware uploads and import packages have their own limits, from
/// `ota.max_firmware_bytes` and `export.max_package_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Every route not listed under `batch` (all of them JSON or bodiless).
    pub json: usize,
    /// `POST /api/v1/products/{pk}/devices/batch`, `POST /api/v1/migrations/{tid}/canary`,
    /// `…/rollback` and `POST /api/v1/ota/jobs`.
    pub batch: usize,
}

impl Default for BodyLimits {
    fn default() -> Self {
        BodyLimits {
            json: DEFAULT_JSON_BODY_LIMIT,
            batch: DEFAULT_BATCH_BODY_LIMIT,
        }
    }
}

/// Extra `/healthz` fields supplied by the app (listeners, AMQP status, …).
pub type HealthFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Called with `(product_key, device_name)` after a device was disabled or deleted (also for
/// every device of a deleted product), so the app can drop its MQTT session.
pub type DeviceRevokedFn = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Everything the handlers need; cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub tokens: Arc<TokenSet>,
    /// Firmware packages and their signed downloads.
    pub firmware: Arc<FirmwareRepo>,
    /// OTA jobs and tasks.
    pub ota: OtaEngine,
    /// Export/import jobs.
    pub export: ExportService,
    /// Extra fields for `/healthz`; an object's keys are merged after `"status":"ok"`.
    pub health: HealthFn,
    /// See [`DeviceRevokedFn`].
    pub on_device_revoked: DeviceRevokedFn,
    /// The migration engine.
    pub migration: Arc<MigrationEngine>,
    /// The AMQP forwarder (consumer groups, rate limits); it exists with forwarding off too.
    pub forwarder: Arc<Forwarder>,
    /// `/readyz`: whether the node can serve, and why not.
    pub ready: cluster::ReadyFn,
    /// Cluster mode: this node's part of the cluster (writes settle, `/api/v1/cluster`);
    /// `None` on a single node.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Cloud-to-device commands.
    pub commands: Arc<crate::command::Commands>,
    /// Cluster mode with `http.proxy_protocol` on: an engine call passed on to the node that
    /// drives the engines starts with a PROXY header naming the client, as the balancer's did
    /// (the nodes are in each other's `http.proxy_trusted`, docs/OPERATIONS.md).
    pub forward_proxy_header: bool,
}

impl ApiState {
    pub fn with_health(
        mut self,
        health: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) -> Self {
        self.health = Arc::new(health);
        self
    }

    pub fn with_device_revoked_hook(
        mut self,
        hook: impl Fn(&str, &str) + Send + Sync + 'static,
    ) -> Self {
        self.on_device_revoked = Arc::new(hook);
        self
    }
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("registry", &self.registry)
            .field("tokens", &self.tokens)
            .field("firmware", &self.firmware)
            .finish_non_exhaustive()
    }
}

/// One page of a list, as every list endpoint returns it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ItemsPage<T> {
    pub items: Vec<T>,
    /// Matching items over all pages.
    pub total: u64,
    /// 1-based page number.
    pub page: u32,
    pub page_size: u32,
}

impl<T> ItemsPage<T> {
    pub(crate) fn from_paged<U>(p: Paged<U>, f: impl FnMut(U) -> T) -> Self {
        ItemsPage {
            items: p.items.into_iter().map(f).collect(),
            total: p.total,
            page: p.page,
            page_size: p.page_size,
        }
    }
}

/// The whole HTTP API as a router ready for `axum::serve` (or `oneshot` in tests). Bodies
/// beyond [`BodyLimits`] are refused with 413 `FG.0413`; firmware uploads follow the
/// repository's `max_size`, imports the export settings' `max_package_bytes`.
pub fn router(state: ApiState, limits: BodyLimits) -> Router {
    let batch_limit = DefaultBodyLimit::max(limits.batch);
    let upload_limit = usize::try_from(
        state
            .firmware
            .max_size()
            .saturating_add(firmware::UPLOAD_OVERHEAD_BYTES),
    )
    .unwrap_or(usize::MAX);
    let import_limit = usize::try_from(
        state
            .export
            .settings()
            .max_package_bytes
            .saturating_add(64 * 1024),
    )
    .unwrap_or(usize::MAX);
    // Everything here needs a token; the middleware also refuses viewer writes.
    let protected = Router::new()
        .route(
            "/api/v1/instances",
            post(instances::create_instance).get(instances::list_instances),
        )
        .route(
            "/api/v1/instances/{iid}",
            get(instances::get_instance).delete(instances::delete_instance),
        )
        .route(
            "/api/v1/instances/{iid}/consumer-groups",
            post(consumer_groups::create_group).get(consumer_groups::list_groups),
        )
        .route(
            "/api/v1/instances/{iid}/consumer-groups/{gid}",
            get(consumer_groups::get_group).delete(consumer_groups::delete_group),
        )
        .route(
            "/api/v1/instances/{iid}/forwarding/rate-limit",
            get(forwarding::get_rate_limit)
                .put(forwarding::put_rate_limit)
                .delete(forwarding::delete_rate_limit),
        )
        .route(
            "/api/v1/products",
            post(products::create_product).get(products::list_products),
        )
        .route(
            "/api/v1/products/{pk}",
            get(products::get_product).delete(products::delete_product),
        )
        .route(
            "/api/v1/products/{pk}/secret",
            get(products::get_product_secret),
        )
        .route(
            "/api/v1/products/{pk}/devices",
            post(devices::create_device).get(devices::list_devices),
        )
        .route(
            "/api/v1/products/{pk}/devices/batch",
            post(batch::batch_create_devices)
                .layer(batch_limit)
                .get(devices::named_batch::get)
                .patch(devices::named_batch::patch)
                .delete(devices::named_batch::delete),
        )
        .route(
            "/api/v1/products/{pk}/devices/{dn}",
            get(devices::get_device)
                .patch(devices::update_device)
                .delete(devices::delete_device),
        )
        .route(
            "/api/v1/products/{pk}/devices/{dn}/secret",
            get(devices::get_device_secret),
        )
        .route(
            "/api/v1/products/{pk}/devices/{dn}/enable",
            post(devices::enable_device),
        )
        .route(
            "/api/v1/products/{pk}/devices/{dn}/disable",
            post(devices::disable_device),
        )
        .route("/api/v1/products/{pk}/messages", post(commands::broadcast))
        .route(
            "/api/v1/products/{pk}/devices/{dn}/messages",
            post(commands::publish),
        )
        .route(
            "/api/v1/products/{pk}/devices/{dn}/properties",
            get(commands::get_properties).put(commands::set_properties),
        )
        .route(
            "/api/v1/products/{pk}/devices/{dn}/services/{identifier}",
            post(commands::invoke_service),
        )
        .route(
            "/api/v1/products/{pk}/devices/{dn}/rrpc",
            post(commands::rrpc),
        )
        .route(
            "/api/v1/products/{pk}/devices/{dn}/commands/{id}",
            get(commands::get_command),
        )
        .route(
            "/api/v1/migrations",
            post(migrations::create_migration).get(migrations::list_migrations),
        )
        .route(
            "/api/v1/migrations/{tid}",
            get(migrations::get_migration).delete(migrations::delete_migration),
        )
        .route(
            "/api/v1/migrations/{tid}/config",
            axum::routing::put(migrations::put_config),
        )
        .route(
            "/api/v1/migrations/{tid}/canary",
            post(migrations::canary).layer(batch_limit),
        )
        .route("/api/v1/migrations/{tid}/full", post(migrations::full))
        .route("/api/v1/migrations/{tid}/pause", post(migrations::pause))
        .route(
            "/api/v1/migrations/{tid}/continue",
            post(migrations::resume),
        )
        .route(
            "/api/v1/migrations/{tid}/rollback",
            post(migrations::rollback).layer(batch_limit),
        )
        .route(
            "/api/v1/migrations/{tid}/data-sync",
            post(migrations::data_sync),
        )
        .route(
            "/api/v1/migrations/{tid}/devices",
            get(migrations::list_devices),
        )
        .route("/api/v1/migrations/{tid}/log", get(migrations::get_log))
        .route(
            "/api/v1/firmware",
            post(firmware::upload_firmware)
                .layer(DefaultBodyLimit::max(upload_limit))
                .get(firmware::list_firmware),
        )
        .route(
            "/api/v1/firmware/{fid}",
            get(firmware::get_firmware).delete(ota::delete_firmware),
        )
        .route("/api/v1/firmware/{fid}/jobs", get(ota::jobs_by_firmware))
        .route(
            "/api/v1/firmware/{fid}/statistics",
            get(ota::firmware_statistics),
        )
        .route(
            "/api/v1/ota/jobs",
            post(ota::create_job).layer(batch_limit).get(ota::list_jobs),
        )
        .route("/api/v1/ota/jobs/{jid}", get(ota::get_job))
        .route("/api/v1/ota/jobs/{jid}/tasks", get(ota::list_tasks))
        .route(
            "/api/v1/ota/jobs/{jid}/tasks/cancel",
            post(ota::cancel_tasks),
        )
        .route("/api/v1/ota/jobs/{jid}/tasks/{dn}", get(ota::get_task))
        .route("/api/v1/ota/jobs/{jid}/cancel", post(ota::cancel_job))
        .route("/api/v1/ota/jobs/{jid}/confirm", post(ota::confirm))
        .route("/api/v1/ota/jobs/{jid}/pause", post(ota::pause_job))
        .route("/api/v1/ota/jobs/{jid}/resume", post(ota::resume_job))
        .route(
            "/api/v1/ota/jobs/{jid}/statistics",
            get(ota::job_statistics),
        )
        .route(
            "/api/v1/products/{pk}/devices/{dn}/ota/jobs",
            get(ota::jobs_by_device),
        )
        .route(
            "/api/v1/products/{pk}/devices/{dn}/ota/timeline",
            get(ota::device_timeline),
        )
        .route(
            "/api/v1/products/{pk}/ota/versions",
            get(ota::version_distribution),
        )
        .route(
            "/api/v1/firmware/{fid}/download-url",
            get(firmware::get_download_url),
        )
        .route("/api/v1/export", post(export::start_export))
        .route("/api/v1/export/{id}", get(export::get_export))
        .route("/api/v1/export/{id}/log", get(export::export_log))
        .route("/api/v1/export/{id}/package", get(export::export_package))
        .route(
            "/api/v1/import",
            post(export::start_import).layer(DefaultBodyLimit::max(import_limit)),
        )
        .route("/api/v1/import/{id}", get(export::get_import))
        .route("/api/v1/import/{id}/log", get(export::import_log))
        .route("/api/v1/cluster", get(cluster::cluster_status))
        // Inside authentication: only writes that were allowed and succeeded settle.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            cluster::settle,
        ))
        // Between authentication and settle: the engines' node settles what it serves.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            cluster::engines_proxy,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.tokens.clone(),
            auth::authenticate,
        ));

    let app = Router::new()
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(cluster::readyz))
        .route("/metrics", get(system::metrics))
        .route("/api/v1/openapi.json", get(system::openapi_json))
        // Devices authenticate downloads with the signed link, not a bearer token.
        .route("/firmware/{fid}/download", get(firmware::download_firmware))
        .merge(protected)
        .fallback(system::not_found)
        .method_not_allowed_fallback(system::method_not_allowed)
        .layer(DefaultBodyLimit::max(limits.json))
        .layer(CatchPanicLayer::custom(middleware::panic_response))
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            middleware::observe,
        ))
        .with_state(state.clone());
    // Outside `app`: axum sets a 405's or OPTIONS answer's `Allow` header on the way out of
    // the route, after `app`'s own layers have run.
    let app = Router::new()
        .fallback_service(app)
        .layer(axum::middleware::from_fn(system::advertise_options));
    // The operator console (`/`, `/console/…`); everything else goes to `app`.
    crate::console::mount(app, state)
}
