//! `/api/v1/products/{pk}/devices`: create, list, get, update, enable/disable, delete devices,
//! and read a device's secret.
//!
//! Disabling or deleting a device calls [`ApiState::on_device_revoked`] after the registry
//! accepted the change, so the broker drops a session the device may no longer hold.
//!
//! The device secret signs the device's MQTT CONNECT: whoever reads it can connect as the
//! device. So it is in the create response (the creator chose or needs it) and in
//! `GET …/devices/{dn}/secret` (operator or admin, asked for explicitly, logged), and in no
//! other response: lists, the single GET and updates carry [`DeviceSummary`] fields only.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::RequireOperator;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::{ApiState, ItemsPage};
use crate::migration::DeviceMigrationStatus;
use crate::registry::{Device, DeviceFilter, DeviceUpdate, NewDevice, Page};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The device routes (`/api/v1/products/{pk}/devices…`; batch create is `batch.rs`'s).
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::default()
        .routes(routes!(create_device, list_devices))
        .routes(routes!(get_device, update_device, delete_device))
        .routes(routes!(get_device_secret))
        .routes(routes!(enable_device))
        .routes(routes!(disable_device))
        // Undocumented: a device named `batch` keeps its GET/PATCH/DELETE (see `named_batch`).
        .route(
            "/api/v1/products/{pk}/devices/batch",
            axum::routing::get(named_batch::get)
                .patch(named_batch::patch)
                .delete(named_batch::delete),
        )
}

/// Body of `POST /api/v1/products/{pk}/devices` (and one row of a JSON batch).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDeviceRequest {
    /// 4 to 32 characters of `A-Z a-z 0-9 _ - @ . :` (the vendor's rule); anything else is
    /// 400 `FG.1001` naming `device_name`.
    #[schema(
        min_length = 4,
        max_length = 32,
        pattern = "^[A-Za-z0-9_\\-@.:]{4,32}$"
    )]
    pub device_name: String,
    /// Generated when absent; returned in the response either way. Given: 1 to 64 printable
    /// ASCII characters without spaces.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 64, pattern = "^[!-~]{1,64}$")]
    pub device_secret: Option<String>,
    #[serde(default)]
    #[schema(schema_with = device_tags_schema)]
    pub tags: BTreeMap<String, String>,
}

/// A device's tags as the registry checks them (`registry::validate::tags`).
fn device_tags(nullable: bool) -> utoipa::openapi::schema::Object {
    crate::schema::string_map(
        "Tags: at most 100; keys 1 to 30 of `A-Z a-z 0-9 _ . -`, values at most 128 \
         characters without control characters.",
        nullable,
        crate::registry::MAX_TAGS,
        crate::schema::text(1, 30, Some("^[A-Za-z0-9_.-]{1,30}$")),
        crate::schema::text(0, 128, Some(crate::schema::NO_CONTROL_PATTERN)),
    )
}

fn device_tags_schema() -> utoipa::openapi::schema::Object {
    device_tags(false)
}

fn optional_device_tags_schema() -> utoipa::openapi::schema::Object {
    device_tags(true)
}

impl From<CreateDeviceRequest> for NewDevice {
    fn from(r: CreateDeviceRequest) -> Self {
        NewDevice {
            device_name: r.device_name,
            device_secret: r.device_secret,
            tags: r.tags,
        }
    }
}

/// Body of `PATCH …/devices/{dn}`; absent fields stay as they are, `tags` replaces the set.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateDeviceRequest {
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Replaces the device's tags.
    #[serde(default)]
    #[schema(schema_with = optional_device_tags_schema)]
    pub tags: Option<BTreeMap<String, String>>,
}

/// A device as lists, updates and the single GET show it: everything but the secret.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeviceSummary {
    pub product_key: String,
    pub device_name: String,
    pub instance_id: String,
    pub enabled: bool,
    pub tags: BTreeMap<String, String>,
    pub online: bool,
    /// Cluster mode: the node holding the device's session (absent on a single node and
    /// while offline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<u16>,
    /// Last connect or disconnect, ms since the Unix epoch.
    pub last_seen_ms: Option<i64>,
    /// The address the device connected from (behind a balancer sending PROXY headers, the
    /// address the header names).
    pub client_ip: Option<String>,
    /// module -> last reported firmware version.
    pub versions: BTreeMap<String, String>,
    pub created_at_ms: i64,
}

impl From<Device> for DeviceSummary {
    fn from(d: Device) -> Self {
        DeviceSummary {
            product_key: d.product_key,
            device_name: d.device_name,
            instance_id: d.instance_id,
            enabled: d.enabled,
            tags: d.tags,
            online: d.online,
            node: d.node,
            last_seen_ms: d.last_seen_ms,
            client_ip: d.client_ip,
            versions: d.versions,
            created_at_ms: d.created_at_ms,
        }
    }
}

/// One device (`GET …/devices/{dn}`): the device without its secret, plus its migration status.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeviceDetails {
    #[serde(flatten)]
    pub device: DeviceSummary,
    /// The device's status in its product's migration task (the active one, or the last one
    /// while it exists); `null` when the product has no migration task.
    pub migration: Option<DeviceMigrationStatus>,
}

/// Response of `POST …/devices`: the new device and its secret, the only response besides
/// `GET …/devices/{dn}/secret` that carries it. No `Debug`: it holds a secret.
#[derive(Clone, Serialize, ToSchema)]
pub struct CreatedDevice {
    #[serde(flatten)]
    pub device: DeviceSummary,
    /// The secret that signs the device's MQTT CONNECT (generated when the request had none).
    pub device_secret: String,
}

impl From<Device> for CreatedDevice {
    fn from(d: Device) -> Self {
        let device_secret = d.device_secret.clone();
        CreatedDevice {
            device: d.into(),
            device_secret,
        }
    }
}

/// Response of `GET …/devices/{dn}/secret`. No `Debug`: it holds a secret.
#[derive(Clone, Serialize, ToSchema)]
pub struct DeviceSecret {
    pub product_key: String,
    pub device_name: String,
    /// The secret that signs the device's MQTT CONNECT.
    pub device_secret: String,
}

/// `GET …/devices` query.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeviceListQuery {
    /// 1-based page number (default 1).
    pub page: Option<u32>,
    /// Items per page, 1..=100 (default 20).
    pub page_size: Option<u32>,
    /// Only devices that are (true) or are not (false) connected.
    pub online: Option<bool>,
    /// `key` (devices having the tag) or `key:value` (tag with that value); the key is not
    /// empty.
    #[param(pattern = "^[^:]")]
    pub tag: Option<String>,
}

impl DeviceListQuery {
    fn filter(&self) -> Result<DeviceFilter, ApiError> {
        let (tag_key, tag_value) = match self.tag.as_deref() {
            None => (None, None),
            Some(tag) => {
                let (k, v) = match tag.split_once(':') {
                    Some((k, v)) => (k, Some(v.to_owned())),
                    None => (tag, None),
                };
                if k.is_empty() {
                    return Err(ApiError::invalid_field(
                        "tag",
                        "expected key or key:value with a non-empty key",
                    ));
                }
                (Some(k.to_owned()), v)
            }
        };
        Ok(DeviceFilter {
            online: self.online,
            tag_key,
            tag_value,
        })
    }
}

/// Create one device; the response carries its `device_secret` (the only other way to read it
/// later is `GET …/devices/{dn}/secret`).
#[utoipa::path(
    post,
    path = "/api/v1/products/{pk}/devices",
    tag = "devices",
    params(("pk" = String, Path, description = "Product key")),
    request_body = CreateDeviceRequest,
    responses(
        (status = 201, description = "Created; the only response with the secret besides `…/secret`", body = CreatedDevice),
        (status = 400, description = "Invalid field", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token", body = ErrorBody),
        (status = 404, description = "No such product (FG.2002)", body = ErrorBody),
        (status = 409, description = "Device exists (FG.2103)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_device(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath(pk): ApiPath<String>,
    ApiJson(req): ApiJson<CreateDeviceRequest>,
) -> Result<(StatusCode, Json<CreatedDevice>), ApiError> {
    let device = state.registry.create_device(&pk, req.into()).await?;
    Ok((StatusCode::CREATED, Json(device.into())))
}

/// List a product's devices (without secrets), by name.
#[utoipa::path(
    get,
    path = "/api/v1/products/{pk}/devices",
    tag = "devices",
    params(("pk" = String, Path, description = "Product key"), DeviceListQuery),
    responses(
        (status = 200, description = "One page of devices", body = ItemsPage<DeviceSummary>),
        (status = 400, description = "Invalid query parameter", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such product (FG.2002)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_devices(
    State(state): State<ApiState>,
    ApiPath(pk): ApiPath<String>,
    ApiQuery(q): ApiQuery<DeviceListQuery>,
) -> Result<Json<ItemsPage<DeviceSummary>>, ApiError> {
    let page = Page::new(
        q.page.unwrap_or(1),
        q.page_size.unwrap_or(Page::default().page_size),
    )?;
    let filter = q.filter()?;
    let paged = state.registry.list_devices(&pk, &filter, page)?;
    Ok(Json(ItemsPage::from_paged(paged, DeviceSummary::from)))
}

/// Get one device (without its secret: see `GET …/devices/{dn}/secret`) and its migration
/// status.
#[utoipa::path(
    get,
    path = "/api/v1/products/{pk}/devices/{dn}",
    tag = "devices",
    params(
        ("pk" = String, Path, description = "Product key"),
        ("dn" = String, Path, description = "Device name"),
    ),
    responses(
        (status = 200, description = "The device", body = DeviceDetails),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such product (FG.2002) or device (FG.2003)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_device(
    State(state): State<ApiState>,
    ApiPath((pk, dn)): ApiPath<(String, String)>,
) -> Result<Json<DeviceDetails>, ApiError> {
    let device = state.registry.get_device(&pk, &dn)?.into();
    let migration = state.migration.device_status(&pk, &dn);
    Ok(Json(DeviceDetails { device, migration }))
}

/// Read a device's secret (operator or admin). Asked for explicitly so that every read is a
/// deliberate act; each one is logged (who, which device — never the secret).
#[utoipa::path(
    get,
    path = "/api/v1/products/{pk}/devices/{dn}/secret",
    tag = "devices",
    params(
        ("pk" = String, Path, description = "Product key"),
        ("dn" = String, Path, description = "Device name"),
    ),
    responses(
        (status = 200, description = "The device's secret (`Cache-Control: no-store`)", body = DeviceSecret),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token (checked before the device is looked up)", body = ErrorBody),
        (status = 404, description = "No such product (FG.2002) or device (FG.2003)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_device_secret(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath((pk, dn)): ApiPath<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let device = state.registry.get_device(&pk, &dn)?;
    // The request span carries the caller's role and the request id.
    tracing::info!(product_key = %pk, device_name = %dn, "device secret read");
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        Json(DeviceSecret {
            product_key: device.product_key,
            device_name: device.device_name,
            device_secret: device.device_secret,
        }),
    ))
}

/// Update `enabled` and/or replace `tags`. Disabling drops the device's MQTT session.
#[utoipa::path(
    patch,
    path = "/api/v1/products/{pk}/devices/{dn}",
    tag = "devices",
    params(
        ("pk" = String, Path, description = "Product key"),
        ("dn" = String, Path, description = "Device name"),
    ),
    request_body = UpdateDeviceRequest,
    responses(
        (status = 200, description = "The updated device (without its secret)", body = DeviceSummary),
        (status = 400, description = "Invalid field", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token", body = ErrorBody),
        (status = 404, description = "No such product or device", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn update_device(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath((pk, dn)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<UpdateDeviceRequest>,
) -> Result<Json<DeviceSummary>, ApiError> {
    apply_update(
        &state,
        &pk,
        &dn,
        DeviceUpdate {
            enabled: req.enabled,
            tags: req.tags,
        },
    )
    .await
    .map(Json)
}

/// Enable a device (same as `PATCH {"enabled":true}`).
#[utoipa::path(
    post,
    path = "/api/v1/products/{pk}/devices/{dn}/enable",
    tag = "devices",
    params(
        ("pk" = String, Path, description = "Product key"),
        ("dn" = String, Path, description = "Device name"),
    ),
    responses(
        (status = 200, description = "The updated device (without its secret)", body = DeviceSummary),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token", body = ErrorBody),
        (status = 404, description = "No such product or device", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn enable_device(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath((pk, dn)): ApiPath<(String, String)>,
) -> Result<Json<DeviceSummary>, ApiError> {
    let update = DeviceUpdate {
        enabled: Some(true),
        tags: None,
    };
    apply_update(&state, &pk, &dn, update).await.map(Json)
}

/// Disable a device and drop its MQTT session (same as `PATCH {"enabled":false}`).
#[utoipa::path(
    post,
    path = "/api/v1/products/{pk}/devices/{dn}/disable",
    tag = "devices",
    params(
        ("pk" = String, Path, description = "Product key"),
        ("dn" = String, Path, description = "Device name"),
    ),
    responses(
        (status = 200, description = "The updated device (without its secret)", body = DeviceSummary),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token", body = ErrorBody),
        (status = 404, description = "No such product or device", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn disable_device(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath((pk, dn)): ApiPath<(String, String)>,
) -> Result<Json<DeviceSummary>, ApiError> {
    let update = DeviceUpdate {
        enabled: Some(false),
        tags: None,
    };
    apply_update(&state, &pk, &dn, update).await.map(Json)
}

async fn apply_update(
    state: &ApiState,
    pk: &str,
    dn: &str,
    update: DeviceUpdate,
) -> Result<DeviceSummary, ApiError> {
    let disabling = update.enabled == Some(false);
    let device = state.registry.update_device(pk, dn, update).await?;
    if disabling {
        (state.on_device_revoked)(pk, dn);
    }
    Ok(device.into())
}

/// Delete a device and drop its MQTT session.
#[utoipa::path(
    delete,
    path = "/api/v1/products/{pk}/devices/{dn}",
    tag = "devices",
    params(
        ("pk" = String, Path, description = "Product key"),
        ("dn" = String, Path, description = "Device name"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token", body = ErrorBody),
        (status = 404, description = "No such product or device", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_device(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath((pk, dn)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.registry.delete_device(&pk, &dn).await?;
    (state.on_device_revoked)(&pk, &dn);
    Ok(StatusCode::NO_CONTENT)
}

/// `batch` is a valid device name, but the static `…/devices/batch` route wins over
/// `…/devices/{dn}`; these give such a device its GET/PATCH/DELETE back (same handlers, same
/// role checks), so only `POST …/devices/batch` means "batch create".
pub(crate) mod named_batch {
    use super::*;

    const NAME: &str = "batch";

    pub async fn get(
        state: State<ApiState>,
        ApiPath(pk): ApiPath<String>,
    ) -> Result<Json<DeviceDetails>, ApiError> {
        get_device(state, ApiPath((pk, NAME.to_owned()))).await
    }

    pub async fn patch(
        op: RequireOperator,
        state: State<ApiState>,
        ApiPath(pk): ApiPath<String>,
        body: ApiJson<UpdateDeviceRequest>,
    ) -> Result<Json<DeviceSummary>, ApiError> {
        update_device(op, state, ApiPath((pk, NAME.to_owned())), body).await
    }

    pub async fn delete(
        op: RequireOperator,
        state: State<ApiState>,
        ApiPath(pk): ApiPath<String>,
    ) -> Result<StatusCode, ApiError> {
        delete_device(op, state, ApiPath((pk, NAME.to_owned()))).await
    }
}
