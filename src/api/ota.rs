//! `/api/v1/ota/…`: OTA jobs (create, query with counters, list, cancel, confirm, pause and
//! resume), tasks by job, statistics, jobs by firmware and by device, a device's timeline, the
//! version distribution of a product, and deleting a firmware package (refused while a job
//! still uses it).
//!
//! Everything goes through [`OtaEngine`](crate::ota::OtaEngine) methods; no handler touches jobs or tasks directly.

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

use super::auth::RequireOperator;
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{is_json, media_type, parse_json, read_body, ApiPath, ApiQuery};
use super::instances::{requested_page, PageQuery};
use super::{ApiState, ItemsPage};
use crate::ota::engine::{DeviceJob, FirmwareStatistics, JobFilter, TimelineEntry};
use crate::ota::firmware::{FirmwareError, FirmwarePackage};
use crate::ota::model::{
    JobSpec, JobStatistics, JobStatus, JobView, TargetKind, TaskView, VersionDistribution,
    MAX_DEVICE_NAMES, MAX_VERIFY_DEVICES,
};
use crate::ota::task::TaskStatus;
use crate::ota::OtaError;
use axum::extract::DefaultBodyLimit;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type};
use utoipa::openapi::RefOr;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use super::RouteLimits;

/// The OTA routes: jobs, tasks, statistics, and the firmware routes that concern jobs.
pub(super) fn routes(limits: &RouteLimits) -> OpenApiRouter<ApiState> {
    OpenApiRouter::default()
        .routes(routes!(delete_firmware))
        .routes(routes!(jobs_by_firmware))
        .routes(routes!(firmware_statistics))
        .routes(routes!(create_job).layer(DefaultBodyLimit::max(limits.batch)))
        .routes(routes!(list_jobs))
        .routes(routes!(get_job))
        .routes(routes!(list_tasks))
        .routes(routes!(cancel_tasks))
        .routes(routes!(get_task))
        .routes(routes!(cancel_job))
        .routes(routes!(confirm))
        .routes(routes!(pause_job))
        .routes(routes!(resume_job))
        .routes(routes!(job_statistics))
        .routes(routes!(jobs_by_device))
        .routes(routes!(device_timeline))
        .routes(routes!(version_distribution))
}

impl From<OtaError> for ApiError {
    fn from(e: OtaError) -> Self {
        match e {
            OtaError::Invalid { field, message } => ApiError::invalid_field(field, message),
            OtaError::TooMany { field, max } => ApiError::too_many_items(field, max),
            e @ OtaError::JobNotFound(_) => ApiError::new(ErrorCode::OtaJobNotFound, e.to_string()),
            e @ OtaError::TaskNotFound { .. } => {
                ApiError::new(ErrorCode::OtaTaskNotFound, e.to_string())
            }
            OtaError::FirmwareNotFound(id) => ApiError::new(
                ErrorCode::FirmwareNotFound,
                format!("firmware {id} not found"),
            )
            .with_field("firmware_id"),
            e @ OtaError::FirmwareNotVerified { .. } => {
                ApiError::new(ErrorCode::FirmwareNotVerified, e.to_string()).with_field("force")
            }
            OtaError::Conflict(msg) => ApiError::new(ErrorCode::Conflict, msg),
            OtaError::Registry(e) => e.into(),
            OtaError::Firmware(e) => e.into(),
            OtaError::Store(ref store) => ApiError::store(store, &e),
            e @ OtaError::Corrupt { .. } => ApiError::internal(e),
        }
    }
}

/// A JSON body that may be absent or `null` (then `T::default()`), as the document states
/// these bodies (nullable).
async fn optional_json<T: DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    if !is_json(headers) {
        return Err(ApiError::unsupported_media_type("application/json"));
    }
    Ok(parse_json::<Option<T>>(body)?.unwrap_or_default())
}

/// Device names from an uploaded list: one per line or CSV with a `DeviceName` column
/// (header optional); blank lines ignored.
pub(super) fn parse_device_list(text: &str) -> Result<Vec<String>, ApiError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let mut column = 0usize;
    let mut names = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record =
            record.map_err(|e| ApiError::malformed(format!("device_list line {}: {e}", i + 1)))?;
        if i == 0 {
            if let Some(pos) = record.iter().position(|h| {
                h.eq_ignore_ascii_case("devicename") || h.eq_ignore_ascii_case("device_name")
            }) {
                column = pos;
                continue;
            }
        }
        match record.get(column) {
            Some(name) if !name.is_empty() => names.push(name.to_owned()),
            _ => {}
        }
        if names.len() > MAX_DEVICE_NAMES {
            return Err(ApiError::too_many_items("device_list", MAX_DEVICE_NAMES));
        }
    }
    if names.is_empty() {
        return Err(ApiError::invalid_field("device_list", "no device names"));
    }
    Ok(names)
}

/// Parts of the multipart form of `POST /api/v1/ota/jobs` (documentation only).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct JobUploadForm {
    /// The job as JSON ([`JobSpec`]); its target becomes SPECIFIC with the uploaded names.
    job: String,
    /// One device name per line, or CSV with a `DeviceName` column (≤10,000).
    #[schema(value_type = String, format = Binary)]
    device_list: Vec<u8>,
}

/// The JSON body of `POST /api/v1/ota/jobs` as the document states it: a [`JobSpec`] in one of
/// five shapes, by `target` (and `job_type` for SPECIFIC), each with only the fields that
/// target takes — `device_names` (1..) with SPECIFIC, `gray_percent` with GRAY, `target_tags`
/// (1..) with TAG, and VERIFY_FIRMWARE only as a STATIC SPECIFIC job of at most 10 devices —
/// which is what [`JobSpec::validate`] checks. (Documentation only; the handler reads a
/// [`JobSpec`].)
pub struct JobRequest;

impl utoipa::PartialSchema for JobRequest {
    fn schema() -> RefOr<Schema> {
        let RefOr::T(Schema::Object(base)) = <JobSpec as utoipa::PartialSchema>::schema() else {
            return <JobSpec as utoipa::PartialSchema>::schema();
        };
        let strings = |values: &[&str]| -> RefOr<Schema> {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(values.iter().copied()))
                .into()
        };
        let names = |max: usize| -> RefOr<Schema> {
            let mut list = crate::schema::string_list(
                "The devices, each named once, 1..=64 characters.",
                false,
                max,
                crate::schema::text(1, 64, None),
                true,
            );
            list.min_items = Some(1);
            list.into()
        };
        // (target, job_type values, selection values, required fields, fields it takes).
        type Shape<'a> = (
            &'a str,
            &'a [&'a str],
            Option<&'a [&'a str]>,
            &'a [&'a str],
            &'a [&'a str],
        );
        let shapes: [Shape; 5] = [
            ("ALL", &["UPGRADE_FIRMWARE"], None, &[], &[]),
            (
                "GRAY",
                &["UPGRADE_FIRMWARE"],
                None,
                &["gray_percent"],
                &["gray_percent"],
            ),
            (
                "TAG",
                &["UPGRADE_FIRMWARE"],
                None,
                &["target_tags"],
                &["target_tags"],
            ),
            (
                "SPECIFIC",
                &["UPGRADE_FIRMWARE"],
                None,
                &["device_names"],
                &["device_names"],
            ),
            (
                "SPECIFIC",
                &["VERIFY_FIRMWARE"],
                Some(&["STATIC"]),
                &["device_names", "job_type"],
                &["device_names"],
            ),
        ];
        let mut one_of = OneOfBuilder::new().description(Some(
            "A job: the fields a `target` takes depend on it (see the variants); \
             `finish_by_ms` is in the future and after `start_at_ms`; \
             `retry_interval_seconds` is required with a `retry_count` above 0; \
             `rate.ramp.max_per_minute` is at least `rate.per_minute`.",
        ));
        for (target, job_types, selections, required, takes) in shapes {
            let mut o = base.clone();
            for field in ["device_names", "gray_percent", "target_tags"] {
                if !takes.contains(&field) {
                    o.properties.remove(field);
                }
            }
            o.properties.insert("target".into(), strings(&[target]));
            o.properties.insert("job_type".into(), strings(job_types));
            if let Some(values) = selections {
                o.properties.insert("selection".into(), strings(values));
            }
            if takes.contains(&"device_names") {
                let max = if job_types == ["VERIFY_FIRMWARE"] {
                    MAX_VERIFY_DEVICES
                } else {
                    MAX_DEVICE_NAMES
                };
                o.properties.insert("device_names".into(), names(max));
            }
            if let Some(RefOr::T(Schema::Object(p))) = o.properties.get_mut("gray_percent") {
                p.schema_type = SchemaType::Type(Type::Number);
            }
            if let Some(RefOr::T(Schema::Array(a))) = o.properties.get_mut("target_tags") {
                a.min_items = Some(1);
            }
            for field in required {
                if !o.required.iter().any(|r| r == field) {
                    o.required.push((*field).to_owned());
                }
            }
            o.title = Some(format!("{target} ({})", job_types.join(", ")));
            o.description = None;
            one_of = one_of.item(o);
        }
        RefOr::T(Schema::OneOf(one_of.build()))
    }
}

impl ToSchema for JobRequest {}

/// A multipart failure: 413 when the body went over the route's limit, 400 otherwise.
fn multipart_error(status: StatusCode, what: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large()
    } else {
        ApiError::malformed(what)
    }
}

async fn spec_from_multipart(req: Request, state: &ApiState) -> Result<JobSpec, ApiError> {
    let mut form = Multipart::from_request(req, state)
        .await
        .map_err(|e| multipart_error(e.status(), format!("multipart body: {}", e.body_text())))?;
    let mut spec: Option<JobSpec> = None;
    let mut names: Option<Vec<String>> = None;
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| multipart_error(e.status(), format!("multipart body: {e}")))?
    {
        let name = field.name().unwrap_or_default().to_owned();
        let bytes = field
            .bytes()
            .await
            .map_err(|e| multipart_error(e.status(), format!("multipart part {name}: {e}")))?;
        match name.as_str() {
            "job" => spec = Some(parse_json(&bytes)?),
            "device_list" => {
                let text = std::str::from_utf8(&bytes)
                    .map_err(|_| ApiError::invalid_field("device_list", "not UTF-8 text"))?;
                names = Some(parse_device_list(text)?);
            }
            other => {
                return Err(ApiError::invalid_field(
                    other,
                    "unknown part (job, device_list)",
                ))
            }
        }
    }
    let mut spec = spec.ok_or_else(|| ApiError::missing_field("job"))?;
    if let Some(names) = names {
        if !spec.device_names.is_empty() {
            return Err(ApiError::invalid_field(
                "device_names",
                "give device_names or upload device_list, not both",
            ));
        }
        spec.target = TargetKind::Specific;
        spec.device_names = names;
    }
    Ok(spec)
}

/// Create an OTA job (JSON body, or `multipart/form-data` with a `job` JSON part and a
/// `device_list` file). The job starts pushing at once, or at `start_at_ms`.
#[utoipa::path(
    post,
    path = "/api/v1/ota/jobs",
    tag = "ota",
    request_body(content(
        (JobRequest = "application/json"),
        (JobUploadForm = "multipart/form-data"),
    )),
    responses(
        (status = 201, description = "Created, with counters per task status", body = JobView),
        (status = 400, description = "Invalid field (named in error_ext_msg)", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token", body = ErrorBody),
        (status = 404, description = "No such firmware (FG.3001) or product (FG.2002)", body = ErrorBody),
        (status = 409, description = "Package not VERIFIED and no force (FG.3103)", body = ErrorBody),
        (status = 413, description = "Too many device names (FG.1003)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_job(
    _op: RequireOperator,
    State(state): State<ApiState>,
    req: Request,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let mt = media_type(req.headers());
    let spec: JobSpec = if mt == "multipart/form-data" {
        spec_from_multipart(req, &state).await?
    } else if is_json(req.headers()) {
        let bytes = read_body(req, &state).await?;
        parse_json(&bytes)?
    } else {
        return Err(ApiError::unsupported_media_type(
            "application/json or multipart/form-data",
        ));
    };
    let view = state.ota.create_job(spec).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// `GET /api/v1/ota/jobs` query.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobListQuery {
    pub page: Option<u32>,
    pub page_size: Option<u32>,
    pub firmware_id: Option<String>,
    pub product_key: Option<String>,
    /// PLANNED, IN_PROGRESS, PAUSED, COMPLETED or CANCELED.
    #[param(value_type = Option<JobStatus>)]
    pub status: Option<String>,
}

/// List jobs, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/ota/jobs",
    tag = "ota",
    params(JobListQuery),
    responses(
        (status = 200, description = "One page of jobs", body = ItemsPage<JobView>),
        (status = 400, description = "Invalid query parameter", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_jobs(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<JobListQuery>,
) -> Result<Json<ItemsPage<JobView>>, ApiError> {
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::invalid_field(
                "status",
                "PLANNED, IN_PROGRESS, PAUSED, COMPLETED or CANCELED",
            )
        })?),
    };
    let filter = JobFilter {
        firmware_id: q.firmware_id,
        product_key: q.product_key,
        status,
    };
    let paged = state
        .ota
        .list_jobs(&filter, requested_page(q.page, q.page_size)?);
    Ok(Json(ItemsPage::from_paged(paged, |j| j)))
}

/// One job with its counters per task status (QueryOTAJob).
#[utoipa::path(
    get,
    path = "/api/v1/ota/jobs/{jid}",
    tag = "ota",
    params(("jid" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such job (FG.3101)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_job(
    State(state): State<ApiState>,
    ApiPath(jid): ApiPath<String>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(state.ota.get_job(&jid)?))
}

/// `GET …/tasks` query.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TaskListQuery {
    pub page: Option<u32>,
    pub page_size: Option<u32>,
    /// CONFIRM, QUEUED, NOTIFIED, IN_PROGRESS, SUCCEEDED, FAILED or CANCELED.
    #[param(value_type = Option<TaskStatus>)]
    pub status: Option<String>,
}

/// A job's tasks by device name (ListOTATaskByJob).
#[utoipa::path(
    get,
    path = "/api/v1/ota/jobs/{jid}/tasks",
    tag = "ota",
    params(("jid" = String, Path, description = "Job id"), TaskListQuery),
    responses(
        (status = 200, description = "One page of tasks", body = ItemsPage<TaskView>),
        (status = 400, description = "Invalid query parameter", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such job (FG.3101)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_tasks(
    State(state): State<ApiState>,
    ApiPath(jid): ApiPath<String>,
    ApiQuery(q): ApiQuery<TaskListQuery>,
) -> Result<Json<ItemsPage<TaskView>>, ApiError> {
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(TaskStatus::parse(s).ok_or_else(|| {
            ApiError::invalid_field(
                "status",
                "CONFIRM, QUEUED, NOTIFIED, IN_PROGRESS, SUCCEEDED, FAILED or CANCELED",
            )
        })?),
    };
    let paged = state
        .ota
        .list_tasks(&jid, status, requested_page(q.page, q.page_size)?)?;
    Ok(Json(ItemsPage::from_paged(paged, |t| t)))
}

/// One task with its full history (every push, retry, failure).
#[utoipa::path(
    get,
    path = "/api/v1/ota/jobs/{jid}/tasks/{dn}",
    tag = "ota",
    params(
        ("jid" = String, Path, description = "Job id"),
        ("dn" = String, Path, description = "Device name"),
    ),
    responses(
        (status = 200, description = "The task", body = TaskView),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such job (FG.3101) or task (FG.3102)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_task(
    State(state): State<ApiState>,
    ApiPath((jid, dn)): ApiPath<(String, String)>,
) -> Result<Json<TaskView>, ApiError> {
    Ok(Json(state.ota.get_task(&jid, &dn)?))
}

/// Body of `POST …/cancel` (optional).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelJobRequest {
    /// DYNAMIC jobs: also cancel the tasks already queued, notified or in progress (STATIC
    /// jobs always cancel every unfinished task).
    #[serde(default)]
    pub cancel_in_progress: bool,
}

/// Cancel a job. STATIC: every unfinished task is canceled. DYNAMIC: the dynamic policy stops;
/// unfinished tasks are canceled only with `cancel_in_progress`.
#[utoipa::path(
    post,
    path = "/api/v1/ota/jobs/{jid}/cancel",
    tag = "ota",
    params(("jid" = String, Path, description = "Job id")),
    request_body(content = Option<CancelJobRequest>, content_type = "application/json"),
    responses(
        (status = 200, description = "The canceled job", body = JobView),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token", body = ErrorBody),
        (status = 404, description = "No such job (FG.3101)", body = ErrorBody),
        (status = 409, description = "Already completed or canceled", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn cancel_job(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath(jid): ApiPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<JobView>, ApiError> {
    let req: CancelJobRequest = optional_json(&headers, &body).await?;
    Ok(Json(
        state.ota.cancel_job(&jid, req.cancel_in_progress).await?,
    ))
}

/// Body of `POST …/confirm` (optional).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfirmRequest {
    /// Devices to confirm (at most 10,000, each with a task in the job); absent = every task
    /// waiting in CONFIRM.
    #[serde(default)]
    #[schema(max_items = 10000)]
    pub device_names: Option<Vec<String>>,
}

/// How many tasks an operation changed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChangedCount {
    pub changed: usize,
}

/// Confirm tasks waiting in CONFIRM (`need_confirm` jobs): they are queued for a push.
#[utoipa::path(
    post,
    path = "/api/v1/ota/jobs/{jid}/confirm",
    tag = "ota",
    params(("jid" = String, Path, description = "Job id")),
    request_body(content = Option<ConfirmRequest>, content_type = "application/json"),
    responses(
        (status = 200, description = "How many tasks were confirmed", body = ChangedCount),
        (status = 400, description = "A device has no task in the job", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token", body = ErrorBody),
        (status = 404, description = "No such job (FG.3101)", body = ErrorBody),
        (status = 409, description = "The job is finished", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn confirm(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath(jid): ApiPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ChangedCount>, ApiError> {
    let req: ConfirmRequest = optional_json(&headers, &body).await?;
    if let Some(names) = &req.device_names {
        if names.len() > MAX_DEVICE_NAMES {
            return Err(ApiError::too_many_items("device_names", MAX_DEVICE_NAMES));
        }
    }
    let changed = state.ota.confirm(&jid, req.device_names.as_deref()).await?;
    Ok(Json(ChangedCount { changed }))
}

/// Hold a job's pushes (tasks already pushed continue).
#[utoipa::path(
    post,
    path = "/api/v1/ota/jobs/{jid}/pause",
    tag = "ota",
    params(("jid" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The paused job", body = JobView),
        (status = 404, description = "No such job (FG.3101)", body = ErrorBody),
        (status = 409, description = "Not IN_PROGRESS", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn pause_job(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath(jid): ApiPath<String>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(state.ota.set_paused(&jid, true).await?))
}

/// Release a PAUSED job (paused by an operator or by its abort rule).
#[utoipa::path(
    post,
    path = "/api/v1/ota/jobs/{jid}/resume",
    tag = "ota",
    params(("jid" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job, IN_PROGRESS again", body = JobView),
        (status = 404, description = "No such job (FG.3101)", body = ErrorBody),
        (status = 409, description = "Not PAUSED", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn resume_job(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath(jid): ApiPath<String>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(state.ota.set_paused(&jid, false).await?))
}

/// Body of `POST …/tasks/cancel`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelTasksRequest {
    /// At most 10,000, each with a task in the job.
    #[schema(max_items = 10000)]
    pub device_names: Vec<String>,
    /// Also cancel tasks IN_PROGRESS.
    #[serde(default)]
    pub cancel_in_progress: bool,
}

/// Cancel some devices' tasks of a job (the job goes on).
#[utoipa::path(
    post,
    path = "/api/v1/ota/jobs/{jid}/tasks/cancel",
    tag = "ota",
    params(("jid" = String, Path, description = "Job id")),
    request_body = CancelTasksRequest,
    responses(
        (status = 200, description = "How many tasks were canceled", body = ChangedCount),
        (status = 400, description = "A device has no task in the job", body = ErrorBody),
        (status = 404, description = "No such job (FG.3101)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn cancel_tasks(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath(jid): ApiPath<String>,
    super::extract::ApiJson(req): super::extract::ApiJson<CancelTasksRequest>,
) -> Result<Json<ChangedCount>, ApiError> {
    if req.device_names.len() > MAX_DEVICE_NAMES {
        return Err(ApiError::too_many_items("device_names", MAX_DEVICE_NAMES));
    }
    let changed = state
        .ota
        .cancel_tasks(&jid, &req.device_names, req.cancel_in_progress)
        .await?;
    Ok(Json(ChangedCount { changed }))
}

/// Statistics of a job: counters, success rate, failures by reason and by source version.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobStatisticsView {
    pub job_id: String,
    #[serde(flatten)]
    pub stats: JobStatistics,
    /// source version → failure reason → tasks.
    pub failures_by_src_version: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Success rate and failure counts of one job.
#[utoipa::path(
    get,
    path = "/api/v1/ota/jobs/{jid}/statistics",
    tag = "ota",
    params(("jid" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Statistics", body = JobStatisticsView),
        (status = 404, description = "No such job (FG.3101)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn job_statistics(
    State(state): State<ApiState>,
    ApiPath(jid): ApiPath<String>,
) -> Result<Json<JobStatisticsView>, ApiError> {
    let ota = &state.ota;
    Ok(Json(JobStatisticsView {
        stats: ota.job_statistics(&jid)?,
        failures_by_src_version: ota.failures_by_src_version(&jid)?,
        job_id: jid,
    }))
}

/// Jobs of a firmware package, newest first (ListOTAJobByFirmware).
#[utoipa::path(
    get,
    path = "/api/v1/firmware/{fid}/jobs",
    tag = "ota",
    params(("fid" = String, Path, description = "Firmware id"), PageQuery),
    responses(
        (status = 200, description = "One page of jobs", body = ItemsPage<JobView>),
        (status = 404, description = "No such firmware (FG.3001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn jobs_by_firmware(
    State(state): State<ApiState>,
    ApiPath(fid): ApiPath<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<ItemsPage<JobView>>, ApiError> {
    if state.firmware.get(&fid).is_none() {
        return Err(FirmwareError::NotFound(fid).into());
    }
    let filter = JobFilter {
        firmware_id: Some(fid),
        ..JobFilter::default()
    };
    let paged = state
        .ota
        .list_jobs(&filter, requested_page(q.page, q.page_size)?);
    Ok(Json(ItemsPage::from_paged(paged, |j| j)))
}

/// Success rate and failures of a package over all its jobs.
#[utoipa::path(
    get,
    path = "/api/v1/firmware/{fid}/statistics",
    tag = "ota",
    params(("fid" = String, Path, description = "Firmware id")),
    responses(
        (status = 200, description = "Statistics", body = FirmwareStatistics),
        (status = 404, description = "No such firmware (FG.3001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn firmware_statistics(
    State(state): State<ApiState>,
    ApiPath(fid): ApiPath<String>,
) -> Result<Json<FirmwareStatistics>, ApiError> {
    if state.firmware.get(&fid).is_none() {
        return Err(FirmwareError::NotFound(fid).into());
    }
    Ok(Json(state.ota.firmware_statistics(&fid)))
}

/// Delete a firmware package; 409 (FG.3005) while an unfinished job uses it.
#[utoipa::path(
    delete,
    path = "/api/v1/firmware/{fid}",
    tag = "firmware",
    params(("fid" = String, Path, description = "Firmware id")),
    responses(
        (status = 200, description = "The deleted package", body = FirmwarePackage),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token", body = ErrorBody),
        (status = 404, description = "No such firmware (FG.3001)", body = ErrorBody),
        (status = 409, description = "Used by an unfinished job (FG.3005)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_firmware(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath(fid): ApiPath<String>,
) -> Result<Json<FirmwarePackage>, ApiError> {
    let in_use = state.ota.firmware_in_use(&fid);
    Ok(Json(state.firmware.delete(&fid, in_use).await?))
}

/// Jobs that have a task for a device, with that task (ListOTAJobByDevice).
#[utoipa::path(
    get,
    path = "/api/v1/products/{pk}/devices/{dn}/ota/jobs",
    tag = "ota",
    params(
        ("pk" = String, Path, description = "Product key"),
        ("dn" = String, Path, description = "Device name"),
        PageQuery,
    ),
    responses(
        (status = 200, description = "One page of jobs", body = ItemsPage<DeviceJob>),
        (status = 404, description = "No such product (FG.2002) or device (FG.2003)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn jobs_by_device(
    State(state): State<ApiState>,
    ApiPath((pk, dn)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<ItemsPage<DeviceJob>>, ApiError> {
    state.registry.get_device(&pk, &dn)?;
    let paged = state
        .ota
        .jobs_by_device(&pk, &dn, requested_page(q.page, q.page_size)?);
    Ok(Json(ItemsPage::from_paged(paged, |j| j)))
}

/// `?job_id` of a timeline.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TimelineQuery {
    /// Only this job's entries.
    pub job_id: Option<String>,
}

/// A device's OTA timeline: every push, progress start, retry, failure and outcome of every
/// job, oldest first.
#[utoipa::path(
    get,
    path = "/api/v1/products/{pk}/devices/{dn}/ota/timeline",
    tag = "ota",
    params(
        ("pk" = String, Path, description = "Product key"),
        ("dn" = String, Path, description = "Device name"),
        TimelineQuery,
    ),
    responses(
        (status = 200, description = "The timeline", body = Vec<TimelineEntry>),
        (status = 404, description = "No such product (FG.2002) or device (FG.2003)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn device_timeline(
    State(state): State<ApiState>,
    ApiPath((pk, dn)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<TimelineQuery>,
) -> Result<Json<Vec<TimelineEntry>>, ApiError> {
    state.registry.get_device(&pk, &dn)?;
    Ok(Json(state.ota.timeline(&pk, &dn, q.job_id.as_deref())))
}

/// `?module` of the version distribution.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct VersionsQuery {
    /// Module (default `default`).
    pub module: Option<String>,
}

/// Devices per reported firmware version of one module of a product.
#[utoipa::path(
    get,
    path = "/api/v1/products/{pk}/ota/versions",
    tag = "ota",
    params(("pk" = String, Path, description = "Product key"), VersionsQuery),
    responses(
        (status = 200, description = "Version distribution", body = VersionDistribution),
        (status = 404, description = "No such product (FG.2002)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn version_distribution(
    State(state): State<ApiState>,
    ApiPath(pk): ApiPath<String>,
    ApiQuery(q): ApiQuery<VersionsQuery>,
) -> Result<Json<VersionDistribution>, ApiError> {
    let module = q
        .module
        .unwrap_or_else(|| fleetgate_topics::DEFAULT_MODULE.to_owned());
    Ok(Json(state.ota.version_distribution(&pk, &module)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists_take_plain_lines_and_csv_with_a_header() {
        assert_eq!(parse_device_list("a1\n\n b2 \n").unwrap(), vec!["a1", "b2"]);
        assert_eq!(
            parse_device_list("ProductKey,DeviceName\npk,dev1\npk,dev2\n").unwrap(),
            vec!["dev1", "dev2"]
        );
        assert_eq!(parse_device_list("DeviceName\nx\n").unwrap(), vec!["x"]);
        let e = parse_device_list("\n\n").unwrap_err();
        assert_eq!(e.field(), Some("device_list"));
    }

    #[test]
    fn ota_errors_map_to_their_codes() {
        let e: ApiError = OtaError::JobNotFound("job-x".into()).into();
        assert_eq!(e.code(), ErrorCode::OtaJobNotFound);
        let e: ApiError = OtaError::invalid("rate.per_minute", "bad").into();
        assert_eq!(e.field(), Some("rate.per_minute"));
        let e: ApiError = OtaError::FirmwareNotVerified {
            firmware_id: "fw-1".into(),
            status: crate::ota::FirmwareStatus::Unverified,
        }
        .into();
        assert_eq!(e.code().status(), StatusCode::CONFLICT);
    }
}
