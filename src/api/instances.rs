//! `/api/v1/instances`: create and delete (admin), list and get instances.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::RequireAdmin;
use super::error::ErrorCode;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::migrations::ApiActor;
use super::{ApiState, ItemsPage};
use crate::registry::{Instance, NewInstance, Page};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The instance routes (`/api/v1/instances…`).
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::default()
        .routes(routes!(create_instance, list_instances))
        .routes(routes!(get_instance, delete_instance))
}

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

/// `?force` of `DELETE /api/v1/instances/{iid}`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteInstanceQuery {
    /// Also delete the instance's consumer groups, their queues and the messages in them
    /// (default false: an instance with consumer groups is refused with 409 `FG.2204`).
    pub force: Option<bool>,
}

/// Delete an instance (admin), and its RabbitMQ exchange with it.
///
/// Refused, changing nothing: the `default` instance (409 `FG.2201`); an instance that is the
/// home of products or the owner of devices (409 `FG.2202`, with the counts); one that an
/// unfinished migration task names as source or target (409 `FG.2203`, naming the tasks; a
/// `COMPLETED` task with data sync on counts as unfinished); one with consumer groups unless
/// `force=true` (409 `FG.2204`, naming the groups); one for which messages still wait in the
/// forwarding outbox (409 `FG.2205`: they are forwarded once RabbitMQ is reachable, then
/// retry).
///
/// On success the instance, its forwarding rate limit and (with `force`) its consumer groups
/// are deleted in one store transaction; then its groups' queues and its exchange are deleted
/// in RabbitMQ: before the 204 when the forwarder is connected (each broker call bounded by
/// 10 s; one that fails is retried on the next connection), else on its next connection — the
/// 204 does not wait for an unreachable RabbitMQ.
#[utoipa::path(
    delete,
    path = "/api/v1/instances/{iid}",
    tag = "instances",
    params(
        ("iid" = String, Path, description = "Instance id: 1 to 64 of A-Z a-z 0-9 _ -"),
        DeleteInstanceQuery,
    ),
    responses(
        (status = 204, description = "Deleted (durable); its exchange and deleted groups' queues are deleted in RabbitMQ before the answer when connected, else on the forwarder's next connection"),
        (status = 400, description = "Malformed instance id or query (FG.1001, FG.0400)", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such instance (FG.2001)", body = ErrorBody),
        (status = 409, description = "The default instance (FG.2201); still has products or owns devices (FG.2202); named by an unfinished migration task (FG.2203); has consumer groups and no force=true (FG.2204); messages for it wait in the forwarding outbox (FG.2205)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_instance(
    _admin: RequireAdmin,
    ApiActor(actor): ApiActor,
    State(state): State<ApiState>,
    ApiPath(iid): ApiPath<String>,
    ApiQuery(q): ApiQuery<DeleteInstanceQuery>,
) -> Result<StatusCode, ApiError> {
    let force = q.force.unwrap_or(false);
    let registry = &state.registry;
    registry.check_instance_deletable(&iid)?;
    let tasks = state.migration.unfinished_tasks_naming(&iid);
    if !tasks.is_empty() {
        let named: Vec<String> = tasks.iter().map(|(id, s)| format!("{id} ({s})")).collect();
        return Err(ApiError::new(
            ErrorCode::InstanceMigrating,
            format!(
                "instance {iid} is the source or target of {} unfinished migration tasks: {}; finish or delete them first",
                tasks.len(),
                named.join(", ")
            ),
        ));
    }
    let id = iid.as_str();
    let removed = state
        .forwarder
        .delete_instance(id, force, |ops| async move {
            registry
                .delete_instance(id, ops)
                .await
                .map(drop)
                .map_err(ApiError::from)
        })
        .await?;
    let (groups, amqp, exchange) = (removed.groups, removed.amqp, removed.exchange);
    tracing::info!(
        instance_id = %iid,
        role = actor.role.as_deref().unwrap_or_default(),
        token_id = actor.token_id.as_deref().unwrap_or_default(),
        force,
        groups_deleted = ?groups,
        exchange = %exchange,
        amqp,
        "instance deleted"
    );
    Ok(StatusCode::NO_CONTENT)
}
