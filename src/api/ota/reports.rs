//! The read-only OTA views beside the jobs: a job's statistics, jobs and statistics by firmware,
//! deleting a firmware package, jobs by device, a device's timeline, a product's versions.

use crate::api::auth::RequireOperator;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::extract::{ApiPath, ApiQuery};
use crate::api::instances::{requested_page, PageQuery};
use crate::api::{ApiState, ItemsPage};
use crate::ota::engine::{DeviceJob, FirmwareStatistics, JobFilter, TimelineEntry};
use crate::ota::firmware::{FirmwareError, FirmwarePackage};
use crate::ota::model::{JobStatistics, JobView, VersionDistribution};
use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

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
