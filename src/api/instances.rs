//! `/api/v1/instances`: create (admin), list and get instances.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::RequireAdmin;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::{ApiState, ItemsPage};
use crate::registry::{Instance, NewInstance, Page};

/// Body of `POST /api/v1/instances`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstanceRequest {
    /// Generated (`iot-…`) when absent: 1 to 64 of `A-Z a-z 0-9 _ -`.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub instance_id: Option<String>,
    /// 1 to 64 characters, not blank, no control characters.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    pub name: String,
}

/// `?page&page_size` of plain list endpoints.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// 1-based page number (default 1).
    pub page: Option<u32>,
    /// Items per page, 1..=100 (default 20).
    pub page_size: Option<u32>,
}

impl PageQuery {
    pub(crate) fn page(&self) -> Result<Page, ApiError> {
        requested_page(self.page, self.page_size)
    }
}

/// The page a list request asks for: `page` (default 1) and `page_size` (default 20), checked
/// by [`Page::new`] (400 naming the parameter).
pub(crate) fn requested_page(page: Option<u32>, page_size: Option<u32>) -> Result<Page, ApiError> {
    Ok(Page::new(
        page.unwrap_or(1),
        page_size.unwrap_or(Page::default().page_size),
    )?)
}

/// Create an instance (admin).
#[utoipa::path(
    post,
    path = "/api/v1/instances",
    tag = "instances",
    request_body = CreateInstanceRequest,
    responses(
        (status = 201, description = "Created", body = Instance),
        (status = 400, description = "Invalid field", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 409, description = "Instance exists (FG.2101)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_instance(
    _admin: RequireAdmin,
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<CreateInstanceRequest>,
) -> Result<(StatusCode, Json<Instance>), ApiError> {
    let instance = state
        .registry
        .create_instance(NewInstance {
            instance_id: req.instance_id,
            name: req.name,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(instance)))
}

/// List instances (by id; `default` always exists).
#[utoipa::path(
    get,
    path = "/api/v1/instances",
    tag = "instances",
    params(PageQuery),
    responses(
        (status = 200, description = "One page of instances", body = ItemsPage<Instance>),
        (status = 400, description = "Invalid page or page_size", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_instances(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<ItemsPage<Instance>>, ApiError> {
    let page = q.page()?;
    // Instances are few; the registry hands them all over and we page here.
    let mut all = state.registry.list_instances();
    all.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    let total = all.len() as u64;
    let skip = (page.page as usize - 1).saturating_mul(page.page_size as usize);
    let items = all
        .into_iter()
        .skip(skip)
        .take(page.page_size as usize)
        .collect();
    Ok(Json(ItemsPage {
        items,
        total,
        page: page.page,
        page_size: page.page_size,
    }))
}

/// Get one instance.
#[utoipa::path(
    get,
    path = "/api/v1/instances/{iid}",
    tag = "instances",
    params(("iid" = String, Path, description = "Instance id")),
    responses(
        (status = 200, description = "The instance", body = Instance),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such instance (FG.2001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_instance(
    State(state): State<ApiState>,
    ApiPath(iid): ApiPath<String>,
) -> Result<Json<Instance>, ApiError> {
    Ok(Json(state.registry.get_instance(&iid)?))
}
