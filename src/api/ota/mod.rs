//! `/api/v1/ota/…`: OTA jobs (create, query with counters, list, cancel, confirm, pause and
//! resume), tasks by job, statistics, jobs by firmware and by device, a device's timeline, the
//! version distribution of a product, and deleting a firmware package (refused while a job
//! still uses it).
//!
//! Everything goes through [`OtaEngine`](crate::ota::OtaEngine) methods; no handler touches jobs or tasks directly.
//! This file holds the routes and the job and task handlers; `create.rs` creating a job (JSON or
//! multipart, with its request schema); `reports.rs` the statistics, firmware, device and
//! version views.

mod create;
mod reports;

pub use create::*;
pub use reports::*;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::RequireOperator;
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{is_json, parse_json, ApiPath, ApiQuery};
use super::instances::requested_page;
use super::{ApiState, ItemsPage};
use crate::ota::engine::JobFilter;
use crate::ota::model::{JobStatus, JobView, TaskView, MAX_DEVICE_NAMES};
use crate::ota::task::TaskStatus;
use crate::ota::OtaError;
use axum::extract::DefaultBodyLimit;
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

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
