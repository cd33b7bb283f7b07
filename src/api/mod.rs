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
use axum::Router;
use serde::Serialize;
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;

pub use auth::{Caller, Role, TokenSet};
pub use cluster::ReadyFn;
pub(crate) use cluster::{to_engines, EngineCall};

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
pub use openapi::document as openapi_document;

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
    /// The console's session keys and revocations (cluster mode: the cluster's).
    pub console_sessions: Arc<crate::console::session::Sessions>,
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

/// The body limits of the routes that take more than [`BodyLimits::json`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct RouteLimits {
    /// Device lists: [`BodyLimits::batch`].
    pub batch: usize,
    /// Firmware uploads: the repository's `max_size` and the form around it.
    pub upload: usize,
    /// Import packages: `export.max_package_bytes` and the form around it.
    pub import: usize,
}

impl RouteLimits {
    fn of(state: &ApiState, limits: BodyLimits) -> Self {
        let bytes = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        RouteLimits {
            batch: limits.batch,
            upload: bytes(
                state
                    .firmware
                    .max_size()
                    .saturating_add(firmware::UPLOAD_OVERHEAD_BYTES),
            ),
            import: bytes(
                state
                    .export
                    .settings()
                    .max_package_bytes
                    .saturating_add(64 * 1024),
            ),
        }
    }
}

/// Every route that needs a token, each file's with the annotations of its handlers: the
/// router and the OpenAPI document come from this one list.
fn protected_routes(limits: &RouteLimits) -> OpenApiRouter<ApiState> {
    OpenApiRouter::default()
        .merge(cluster::routes())
        .merge(instances::routes())
        .merge(consumer_groups::routes())
        .merge(forwarding::routes())
        .merge(products::routes())
        .merge(devices::routes())
        .merge(batch::routes(limits))
        .merge(commands::routes())
        .merge(migrations::routes(limits))
        .merge(firmware::routes(limits))
        .merge(export::routes(limits))
        .merge(ota::routes(limits))
}

/// The routes without a token: health, readiness, metrics, the OpenAPI document and the
/// signed firmware download.
fn public_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::default()
        .merge(system::routes())
        .merge(cluster::public_routes())
        .merge(firmware::public_routes())
}

/// The whole HTTP API as a router ready for `axum::serve` (or `oneshot` in tests). Bodies
/// beyond [`BodyLimits`] are refused with 413 `FG.0413`; firmware uploads follow the
/// repository's `max_size`, imports the export settings' `max_package_bytes`.
pub fn router(state: ApiState, limits: BodyLimits) -> Router {
    let (protected, _) = protected_routes(&RouteLimits::of(&state, limits)).split_for_parts();
    let (public, _) = public_routes().split_for_parts();
    // Everything here needs a token; the middleware also refuses viewer writes.
    let protected = protected
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

    let app = public
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
