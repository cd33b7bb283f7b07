//! `/api/v1/migrations`: instance migration tasks (docs/DESIGN.md §6, §7) over the
//! [`MigrationEngine`](crate::migration::MigrationEngine).
//!
//! Lifecycle calls answer with the task details; the ones that take a device selection
//! (`canary`, `rollback`) also report the refused rows. Selections are JSON
//! (`{"device_names":[…]}`; canary ≤ 100, rollback ≤ 10,000; rollback also `{"all":true}`) or
//! `text/csv` with a `DeviceName` column (≤ 10,000 data rows; other columns are ignored, blank
//! rows skipped). A refused lifecycle transition is 409 `FG.5003` naming the current state.
//! Every write is recorded in the task log with the caller's role and token id (a digest
//! prefix, never the token).

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::Json;
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::auth::{Caller, RequireOperator};
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{is_json, media_type, parse_json, read_body, ApiJson, ApiPath, ApiQuery};
use super::instances::requested_page;
use super::{ApiState, ItemsPage};
use crate::migration::{
    Actor, DeviceListFilter, DeviceMigration, DeviceStatus, LogEntry, MigrationConfig,
    MigrationError, MigrationMethod, NewTask, RejectedRow, ResumeMode, RollbackSelection,
    SummaryStatus, TaskDetails, TaskFilter, TaskState, MAX_CANARY_JSON, MAX_PICKED,
};
use axum::extract::DefaultBodyLimit;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use super::RouteLimits;

/// The migration routes (`/api/v1/migrations…`).
pub(super) fn routes(limits: &RouteLimits) -> OpenApiRouter<ApiState> {
    OpenApiRouter::default()
        .routes(routes!(create_migration, list_migrations))
        .routes(routes!(get_migration, delete_migration))
        .routes(routes!(put_config))
        .routes(routes!(canary).layer(DefaultBodyLimit::max(limits.batch)))
        .routes(routes!(full))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(rollback).layer(DefaultBodyLimit::max(limits.batch)))
        .routes(routes!(data_sync))
        .routes(routes!(list_devices))
        .routes(routes!(get_log))
}

impl From<MigrationError> for ApiError {
    fn from(e: MigrationError) -> Self {
        match e {
            MigrationError::TaskNotFound(_) => {
                ApiError::new(ErrorCode::MigrationTaskNotFound, e.to_string())
            }
            MigrationError::TaskExists { .. } => {
                ApiError::new(ErrorCode::MigrationTaskExists, e.to_string())
            }
            MigrationError::Refused { .. } | MigrationError::Conflict(_) => {
                ApiError::new(ErrorCode::MigrationStateConflict, e.to_string())
            }
            MigrationError::SourceProductGone { .. } => {
                ApiError::new(ErrorCode::MigrationSourceProductGone, e.to_string())
            }
            MigrationError::Invalid { field, message } => ApiError::invalid_field(field, message),
            MigrationError::TooMany { field, max } => ApiError::too_many_items(field, max),
            MigrationError::Registry(r) => r.into(),
            MigrationError::Standby => ApiError::new(ErrorCode::Unavailable, e.to_string()),
            MigrationError::Store(ref store) => ApiError::store(store, &e),
            e @ MigrationError::Stopped => ApiError::internal(e),
        }
    }
}

/// Extractor: who is calling, for the task log (role + token id).
pub struct ApiActor(pub Actor);

impl<S: Send + Sync> FromRequestParts<S> for ApiActor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let caller = parts
            .extensions
            .get::<Caller>()
            .copied()
            .ok_or_else(|| ApiError::unauthenticated(false))?;
        // The middleware already checked the token; here it is only named, by digest prefix.
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' ').map(|(_, t)| t.trim()))
            .unwrap_or_default();
        let digest = hex::encode(Sha256::digest(token.as_bytes()));
        Ok(ApiActor(Actor::api(caller.role.as_str(), &digest[..12])))
    }
}

/// `bandwidth_limit_mb` as the DCS API sends it: a number or a numeric string.
fn number_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(u64),
        Str(String),
    }
    match Option::<NumOrStr>::deserialize(d)? {
        None => Ok(None),
        Some(NumOrStr::Num(n)) => u32::try_from(n)
            .map(Some)
            .map_err(|_| serde::de::Error::custom("must be an integer from 1 to 10240")),
        Some(NumOrStr::Str(s)) => s
            .trim()
            .parse::<u32>()
            .map(Some)
            .map_err(|_| serde::de::Error::custom("must be an integer from 1 to 10240")),
    }
}

/// Body of `POST /api/v1/migrations`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMigrationRequest {
    /// An existing product's key.
    #[schema(min_length = 1, max_length = 32, pattern = "^[A-Za-z0-9]{1,32}$")]
    pub product_key: String,
    /// Must exist and differ from the product's instance.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub target_instance_id: String,
    /// Default `migration-{product_key}`; 1..=64 characters, not blank.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 64, pattern = "\\S")]
    pub name: Option<String>,
    /// Default `full_migration`.
    #[serde(default)]
    pub migration_method: Option<MigrationMethod>,
    /// Default `auto`.
    #[serde(default)]
    pub resume_mode: Option<ResumeMode>,
    /// 1..=10240 MB/s (a number, or a numeric string); absent = unlimited.
    #[serde(default, deserialize_with = "number_or_string")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 10240)]
    pub bandwidth_limit_mb: Option<u32>,
}

/// Body of `PUT /api/v1/migrations/{tid}/config` (the DCS call's shape).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigRequest {
    pub migration_method: MigrationMethod,
    pub resume_mode: ResumeMode,
    /// 1..=10240 MB/s (a number, or a numeric string); absent = unlimited.
    #[serde(default, deserialize_with = "number_or_string")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 10240)]
    pub bandwidth_limit_mb: Option<u32>,
}

/// Answer of `PUT …/config`, shaped like the DCS response (plus the state and the config).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ConfigResponse {
    pub id: String,
    pub name: String,
    pub status: SummaryStatus,
    /// The last fault, `null` when none (as in the task details).
    pub error: Option<String>,
    pub state: TaskState,
    pub config: MigrationConfig,
}

/// JSON device selection: `{"device_names":[…]}`, or for rollback `{"all":true}`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SelectionRequest {
    #[serde(default)]
    pub device_names: Option<Vec<String>>,
    /// Rollback only: every migrated device.
    #[serde(default)]
    pub all: Option<bool>,
}

/// The JSON body of `POST …/canary` as the document states it: 1 to 100 device names.
/// (Documentation only; the handler reads a [`SelectionRequest`].)
pub struct CanaryRequest;

impl utoipa::PartialSchema for CanaryRequest {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        picked_schema(MAX_CANARY_JSON).into()
    }
}

impl ToSchema for CanaryRequest {}

/// The JSON body of `POST …/rollback` as the document states it: `{"all":true}`, or 1 to
/// 10,000 device names. (Documentation only; the handler reads a [`SelectionRequest`].)
pub struct RollbackRequest;

impl utoipa::PartialSchema for RollbackRequest {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Type};
        let all = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property(
                "all",
                ObjectBuilder::new()
                    .schema_type(Type::Boolean)
                    .enum_values(Some([true])),
            )
            .required("all")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        let one_of = OneOfBuilder::new()
            .description(Some(
                "`{\"all\":true}` (every migrated device) or `{\"device_names\":[…]}` (1 to 10,000)",
            ))
            .item(all)
            .item(picked_schema(MAX_PICKED))
            .build();
        utoipa::openapi::RefOr::T(utoipa::openapi::schema::Schema::OneOf(one_of))
    }
}

impl ToSchema for RollbackRequest {}

/// `{"device_names":[…]}` with 1 to `max` names.
fn picked_schema(max: usize) -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{AdditionalProperties, ArrayBuilder, ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(
            "device_names",
            ArrayBuilder::new()
                .items(ObjectBuilder::new().schema_type(Type::String))
                .min_items(Some(1))
                .max_items(Some(max))
                .description(Some(
                    "Devices of the task's product; unknown, duplicate or ineligible names are \
                     refused row by row (`rejected`)",
                )),
        )
        .required("device_names")
        .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        .build()
}

/// Answer of `canary` and `rollback`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SelectionResponse {
    pub task: TaskDetails,
    /// Devices selected (0 for a rollback of all).
    pub accepted: usize,
    /// Refused rows: unknown (`FG.2003`), duplicate or ineligible (`FG.1001`).
    pub rejected: Vec<RejectedRow>,
}

/// Body of `POST …/data-sync`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DataSyncRequest {
    pub enabled: bool,
}

/// `GET /api/v1/migrations` filters.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    pub product_key: Option<String>,
    pub state: Option<TaskState>,
    pub page: Option<u32>,
    pub page_size: Option<u32>,
}

/// `GET …/devices` filters.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DevicesQuery {
    /// Only devices with this status.
    pub status: Option<DeviceStatus>,
    /// Device-name substring (case-insensitive).
    pub device_name: Option<String>,
    pub page: Option<u32>,
    pub page_size: Option<u32>,
}

/// `?page&page_size`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    pub page: Option<u32>,
    pub page_size: Option<u32>,
}

/// Create a migration task (TO_MIGRATE).
#[utoipa::path(
    post,
    path = "/api/v1/migrations",
    tag = "migrations",
    request_body = CreateMigrationRequest,
    responses(
        (status = 201, description = "Created", body = TaskDetails),
        (status = 400, description = "Invalid field (e.g. target equals the source, bandwidth out of 1..=10240)", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token", body = ErrorBody),
        (status = 404, description = "No such product (FG.2002) or instance (FG.2001)", body = ErrorBody),
        (status = 409, description = "The product already has a task (FG.5002)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_migration(
    _op: RequireOperator,
    ApiActor(actor): ApiActor,
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<CreateMigrationRequest>,
) -> Result<(StatusCode, Json<TaskDetails>), ApiError> {
    let config = MigrationConfig {
        migration_method: req.migration_method.unwrap_or_default(),
        resume_mode: req.resume_mode.unwrap_or_default(),
        bandwidth_limit_mb: req.bandwidth_limit_mb,
    };
    let details = state
        .migration
        .create(
            NewTask {
                product_key: req.product_key,
                target_instance_id: req.target_instance_id,
                name: req.name,
                config,
            },
            actor,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(details)))
}

/// List migration tasks, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/migrations",
    tag = "migrations",
    params(ListQuery),
    responses(
        (status = 200, description = "One page", body = ItemsPage<TaskDetails>),
        (status = 400, description = "Invalid parameter", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_migrations(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<ItemsPage<TaskDetails>>, ApiError> {
    let page = requested_page(q.page, q.page_size)?;
    let filter = TaskFilter {
        product_key: q.product_key,
        state: q.state,
    };
    Ok(Json(ItemsPage::from_paged(
        state.migration.list(&filter, page),
        |t| t,
    )))
}

/// Task details: product, states, device totals per status, target, times, data sync, config.
#[utoipa::path(
    get,
    path = "/api/v1/migrations/{tid}",
    tag = "migrations",
    params(("tid" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "The task", body = TaskDetails),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such task (FG.5001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_migration(
    State(state): State<ApiState>,
    ApiPath(tid): ApiPath<String>,
) -> Result<Json<TaskDetails>, ApiError> {
    Ok(Json(state.migration.details(&tid)?))
}

/// Delete a task (only COMPLETED, or TO_MIGRATE with no device in the target).
#[utoipa::path(
    delete,
    path = "/api/v1/migrations/{tid}",
    tag = "migrations",
    params(("tid" = String, Path, description = "Task id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token", body = ErrorBody),
        (status = 404, description = "No such task (FG.5001)", body = ErrorBody),
        (status = 409, description = "Not deletable in this state (FG.5003)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_migration(
    _op: RequireOperator,
    ApiActor(actor): ApiActor,
    State(state): State<ApiState>,
    ApiPath(tid): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    state.migration.delete(&tid, actor).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Configure the task (DCS-shaped): `migration_method`, `resume_mode`, `bandwidth_limit_mb`.
#[utoipa::path(
    put,
    path = "/api/v1/migrations/{tid}/config",
    tag = "migrations",
    params(("tid" = String, Path, description = "Task id")),
    request_body = ConfigRequest,
    responses(
        (status = 200, description = "Configured", body = ConfigResponse),
        (status = 400, description = "Invalid or missing field, named in error_ext_msg", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token", body = ErrorBody),
        (status = 404, description = "No such task (FG.5001)", body = ErrorBody),
        (status = 409, description = "migration_method changes only in TO_MIGRATE (FG.5003)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn put_config(
    _op: RequireOperator,
    ApiActor(actor): ApiActor,
    State(state): State<ApiState>,
    ApiPath(tid): ApiPath<String>,
    ApiJson(req): ApiJson<ConfigRequest>,
) -> Result<Json<ConfigResponse>, ApiError> {
    let config = MigrationConfig {
        migration_method: req.migration_method,
        resume_mode: req.resume_mode,
        bandwidth_limit_mb: req.bandwidth_limit_mb,
    };
    let t = state.migration.configure(&tid, config, actor).await?;
    Ok(Json(ConfigResponse {
        id: t.task_id,
        name: t.name,
        status: t.status,
        error: t.error,
        state: t.state,
        config: t.config,
    }))
}

/// A parsed selection body.
enum Selection {
    All,
    Names(Vec<String>),
}

/// Reads a JSON or CSV selection; `json_max` bounds the JSON form (canary: 100).
async fn selection(req: Request, json_max: usize, allow_all: bool) -> Result<Selection, ApiError> {
    let csv = matches!(
        media_type(req.headers()).as_str(),
        "text/csv" | "application/csv"
    );
    if !csv && !is_json(req.headers()) {
        return Err(ApiError::unsupported_media_type(
            "application/json or text/csv",
        ));
    }
    let body = read_body(req, &()).await?;
    if csv {
        return parse_csv_names(&body).map(Selection::Names);
    }
    let sel: SelectionRequest = parse_json(&body)?;
    match (sel.all, sel.device_names) {
        (Some(true), None) if allow_all => Ok(Selection::All),
        (Some(true), None) => Err(ApiError::invalid_field(
            "all",
            "a canary needs device_names",
        )),
        (Some(true), Some(_)) => Err(ApiError::invalid_field(
            "all",
            "give either all:true or device_names, not both",
        )),
        (_, Some(names)) => {
            if names.len() > json_max {
                return Err(ApiError::too_many_items("device_names", json_max));
            }
            if names.is_empty() {
                return Err(ApiError::invalid_field(
                    "device_names",
                    "at least one device is required",
                ));
            }
            Ok(Selection::Names(names))
        }
        (_, None) => Err(ApiError::missing_field("device_names")),
    }
}

/// Device names from a CSV with a `DeviceName` column (case-insensitive header; a UTF-8 BOM,
/// other columns and blank rows are tolerated). At most [`MAX_PICKED`] data rows.
pub(super) fn parse_csv_names(body: &[u8]) -> Result<Vec<String>, ApiError> {
    let (mut rdr, headers) = super::extract::csv_with_header(body)?;
    let col = headers
        .iter()
        .position(|h| h.eq_ignore_ascii_case(b"devicename"))
        .ok_or_else(|| ApiError::missing_field("DeviceName"))?;
    let mut names = Vec::new();
    for record in rdr.byte_records() {
        let record = record.map_err(|e| ApiError::malformed(format!("malformed CSV: {e}")))?;
        if record.iter().all(|f| f.is_empty()) {
            continue;
        }
        if names.len() == MAX_PICKED {
            return Err(ApiError::too_many_items("DeviceName", MAX_PICKED));
        }
        // A non-UTF-8 name cannot be a device; kept (lossily) so it is reported on its row.
        names.push(String::from_utf8_lossy(record.get(col).unwrap_or_default()).into_owned());
    }
    if names.is_empty() {
        return Err(ApiError::invalid_field(
            "DeviceName",
            "the CSV has no data rows",
        ));
    }
    Ok(names)
}

/// Start the canary: ≤ 100 device names as JSON or ≤ 10,000 as CSV (`DeviceName` column).
#[utoipa::path(
    post,
    path = "/api/v1/migrations/{tid}/canary",
    tag = "migrations",
    params(("tid" = String, Path, description = "Task id")),
    request_body(
        description = "`{\"device_names\":[…]}` (≤ 100) or CSV with a `DeviceName` column (≤ 10,000 rows)",
        content(
            (CanaryRequest = "application/json"),
            (String = "text/csv", example = "DeviceName\nsensor-0001\nsensor-0002\n"),
        )
    ),
    responses(
        (status = 200, description = "CANARY_IN_PROGRESS; refused rows listed", body = SelectionResponse),
        (status = 400, description = "No usable device, malformed body", body = ErrorBody),
        (status = 404, description = "No such task (FG.5001)", body = ErrorBody),
        (status = 409, description = "Not in TO_MIGRATE, or incremental_migration (FG.5003)", body = ErrorBody),
        (status = 413, description = "More than 100 (JSON) / 10,000 (CSV) devices (FG.1003)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn canary(
    _op: RequireOperator,
    ApiActor(actor): ApiActor,
    State(state): State<ApiState>,
    ApiPath(tid): ApiPath<String>,
    req: Request,
) -> Result<Json<SelectionResponse>, ApiError> {
    let Selection::Names(names) = selection(req, MAX_CANARY_JSON, false).await? else {
        return Err(ApiError::invalid_field(
            "all",
            "a canary needs device_names",
        ));
    };
    let o = state.migration.canary(&tid, names, actor).await?;
    Ok(Json(SelectionResponse {
        task: o.details,
        accepted: o.accepted,
        rejected: o.rejected,
    }))
}

/// Roll back picked devices (≤ 10,000, JSON or CSV) or all (`{"all":true}`).
#[utoipa::path(
    post,
    path = "/api/v1/migrations/{tid}/rollback",
    tag = "migrations",
    params(("tid" = String, Path, description = "Task id")),
    request_body(
        description = "`{\"all\":true}`, `{\"device_names\":[…]}` (≤ 10,000) or CSV with a `DeviceName` column",
        content(
            (RollbackRequest = "application/json"),
            (String = "text/csv", example = "DeviceName\nsensor-0001\n"),
        )
    ),
    responses(
        (status = 200, description = "ROLLING_BACK or BATCH_ROLLBACK; refused rows listed", body = SelectionResponse),
        (status = 400, description = "No usable device, malformed body", body = ErrorBody),
        (status = 404, description = "No such task (FG.5001)", body = ErrorBody),
        (status = 409, description = "Refused in this state (FG.5003), or the product is gone from the source instance (FG.5004)", body = ErrorBody),
        (status = 413, description = "More than 10,000 devices (FG.1003)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn rollback(
    _op: RequireOperator,
    ApiActor(actor): ApiActor,
    State(state): State<ApiState>,
    ApiPath(tid): ApiPath<String>,
    req: Request,
) -> Result<Json<SelectionResponse>, ApiError> {
    let selection = match selection(req, MAX_PICKED, true).await? {
        Selection::All => RollbackSelection::All,
        Selection::Names(names) => RollbackSelection::Picked(names),
    };
    let o = state.migration.rollback(&tid, selection, actor).await?;
    Ok(Json(SelectionResponse {
        task: o.details,
        accepted: o.accepted,
        rejected: o.rejected,
    }))
}

macro_rules! lifecycle_handler {
    ($name:ident, $path:literal, $call:ident, $what:literal) => {
        #[doc = $what]
        #[utoipa::path(
            post,
            path = $path,
            tag = "migrations",
            params(("tid" = String, Path, description = "Task id")),
            responses(
                (status = 200, description = "The task after the transition", body = TaskDetails),
                (status = 401, description = "No valid token", body = ErrorBody),
                (status = 403, description = "Viewer token", body = ErrorBody),
                (status = 404, description = "No such task (FG.5001)", body = ErrorBody),
                (status = 409, description = "Refused in the current state, which the message names (FG.5003)", body = ErrorBody),
            ),
            security(("bearer" = []))
        )]
        pub async fn $name(
            _op: RequireOperator,
            ApiActor(actor): ApiActor,
            State(state): State<ApiState>,
            ApiPath(tid): ApiPath<String>,
        ) -> Result<Json<TaskDetails>, ApiError> {
            Ok(Json(state.migration.$call(&tid, actor).await?))
        }
    };
}

lifecycle_handler!(
    full,
    "/api/v1/migrations/{tid}/full",
    full,
    "Start the full migration (from CANARY_COMPLETED)."
);
lifecycle_handler!(
    pause,
    "/api/v1/migrations/{tid}/pause",
    pause,
    "Pause MIGRATING / CONTINUE_MIGRATING / ROLLING_BACK."
);
lifecycle_handler!(
    resume,
    "/api/v1/migrations/{tid}/continue",
    resume,
    "Continue PAUSED / ROLLBACK_PAUSED, or a task halted by a fault."
);

/// Turn data sync on or off.
#[utoipa::path(
    post,
    path = "/api/v1/migrations/{tid}/data-sync",
    tag = "migrations",
    params(("tid" = String, Path, description = "Task id")),
    request_body = DataSyncRequest,
    responses(
        (status = 200, description = "The task", body = TaskDetails),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 404, description = "No such task (FG.5001)", body = ErrorBody),
        (status = 409, description = "Turned off after COMPLETED: cannot be turned on again (FG.5003)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn data_sync(
    _op: RequireOperator,
    ApiActor(actor): ApiActor,
    State(state): State<ApiState>,
    ApiPath(tid): ApiPath<String>,
    ApiJson(req): ApiJson<DataSyncRequest>,
) -> Result<Json<TaskDetails>, ApiError> {
    Ok(Json(
        state
            .migration
            .set_data_sync(&tid, req.enabled, actor)
            .await?,
    ))
}

/// The task's devices with their status; search by name substring, filter by status.
#[utoipa::path(
    get,
    path = "/api/v1/migrations/{tid}/devices",
    operation_id = "list_migration_devices",
    tag = "migrations",
    params(("tid" = String, Path, description = "Task id"), DevicesQuery),
    responses(
        (status = 200, description = "One page", body = ItemsPage<DeviceMigration>),
        (status = 400, description = "Invalid parameter", body = ErrorBody),
        (status = 404, description = "No such task (FG.5001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_devices(
    State(state): State<ApiState>,
    ApiPath(tid): ApiPath<String>,
    ApiQuery(q): ApiQuery<DevicesQuery>,
) -> Result<Json<ItemsPage<DeviceMigration>>, ApiError> {
    let page = requested_page(q.page, q.page_size)?;
    let filter = DeviceListFilter {
        status: q.status,
        device_name: q.device_name.filter(|s| !s.is_empty()),
    };
    Ok(Json(ItemsPage::from_paged(
        state.migration.devices(&tid, &filter, page)?,
        |d| d,
    )))
}

/// The task log: who did what when (operator calls and the engine's own events).
#[utoipa::path(
    get,
    path = "/api/v1/migrations/{tid}/log",
    tag = "migrations",
    params(("tid" = String, Path, description = "Task id"), LogQuery),
    responses(
        (status = 200, description = "One page, oldest first", body = ItemsPage<LogEntry>),
        (status = 404, description = "No such task (FG.5001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_log(
    State(state): State<ApiState>,
    ApiPath(tid): ApiPath<String>,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> Result<Json<ItemsPage<LogEntry>>, ApiError> {
    let page = requested_page(q.page, q.page_size)?;
    Ok(Json(ItemsPage::from_paged(
        state.migration.log(&tid, page)?,
        |l| l,
    )))
}

#[cfg(test)]
mod tests;
