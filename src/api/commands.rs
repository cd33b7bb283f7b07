//! Cloud-to-device routes (docs/COMMANDS.md): publish to a device or broadcast to many, set
//! properties, call services (asynchronously or synchronously), RRPC, read a call's record and
//! a device's latest properties. Everything goes through [`Commands`]; this file only maps
//! bodies and errors.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::auth::RequireOperator;
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ApiJson, ApiPath};
use super::ApiState;
use crate::command::{
    BroadcastResult, CommandError, CommandRecord, Message, PropertySnapshot, Qos, SendStatus, Sent,
    Targets, MAX_BROADCAST, MAX_TIMEOUT_MS, MIN_TIMEOUT_MS,
};
use fleetgate_topics::downlink::PROPERTY_SET;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The cloud-to-device routes.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::default()
        .routes(routes!(broadcast))
        .routes(routes!(publish))
        .routes(routes!(get_properties, set_properties))
        .routes(routes!(invoke_service))
        .routes(routes!(rrpc))
        .routes(routes!(get_command))
}

/// How a payload is written in the request (and answers in the response).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PayloadEncoding {
    /// UTF-8 text, sent as is.
    #[default]
    Text,
    /// Base64 (standard alphabet, padded) of the bytes to send.
    Base64,
}

/// Body of `POST …/devices/{dn}/messages`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// A topic of the device's own namespace: `/{pk}/{dn}/…` (custom topics such as
    /// `/{pk}/{dn}/user/get`) or `/sys/{pk}/{dn}/…`, with the path's `pk` and `dn`; no `+` or
    /// `#`. Anything else is 400 `FG.6003`.
    #[schema(
        example = "/a1pk/dev1/user/get",
        pattern = "^/(sys/)?[A-Za-z0-9]{1,32}/[A-Za-z0-9_@.:-]{4,32}/[^+#\\u0000]*$"
    )]
    pub topic: String,
    /// The bytes to send: text, or base64 with `payload_encoding: base64`.
    pub payload: String,
    #[serde(default)]
    pub payload_encoding: PayloadEncoding,
    /// 0 (default) or 1.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub qos: u8,
}

/// Body of `POST /api/v1/products/{pk}/messages` (broadcast). Exactly one of `device_names`
/// and `tag_key` may be given; with neither, every device of the product is addressed.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BroadcastRequest {
    /// The topic with `{dn}` for each device's name (and optionally `{pk}`), e.g.
    /// `/{pk}/{dn}/user/get`.
    /// Must contain `{dn}`.
    #[schema(example = "/{pk}/{dn}/user/get", pattern = "\\{dn\\}")]
    pub topic: String,
    /// The bytes to send: text, or base64 with `payload_encoding: base64`.
    pub payload: String,
    #[serde(default)]
    pub payload_encoding: PayloadEncoding,
    /// 0 (default) or 1.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub qos: u8,
    /// At most 1,000 names (a name that is no device of the product is reported as
    /// `not_found` in its result).
    #[serde(default)]
    #[schema(max_items = 1000)]
    pub device_names: Option<Vec<String>>,
    /// Devices with this tag…
    #[serde(default)]
    pub tag_key: Option<String>,
    /// …and this value (any value when absent).
    #[serde(default)]
    pub tag_value: Option<String>,
}

/// Response of a broadcast: one result per addressed device, in order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BroadcastResponse {
    pub total: usize,
    /// Results `sent`.
    pub sent: usize,
    /// Results `queued` (kept for the device's persistent session).
    pub queued: usize,
    pub results: Vec<BroadcastResult>,
}

/// Body of `PUT …/devices/{dn}/properties` and `POST …/devices/{dn}/services/{identifier}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallRequest {
    /// The call's `params` (a JSON object), e.g. `{"LightSwitch":1}`.
    #[schema(value_type = Object)]
    pub params: Value,
    /// Wait this long (1000–8000 ms) for the device's answer (synchronous call); absent:
    /// answer 202 at once, the answer lands in `GET …/commands/{id}` and the consumer groups.
    #[serde(default)]
    #[schema(minimum = 1000, maximum = 8000)]
    pub timeout_ms: Option<u64>,
}

/// Body of `POST …/devices/{dn}/rrpc`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RrpcRequest {
    /// The bytes to send: text, or base64 with `payload_encoding: base64`.
    pub payload: String,
    #[serde(default)]
    pub payload_encoding: PayloadEncoding,
    /// How long to wait for the device's response, 1000–8000 ms (default 5000).
    #[serde(default)]
    #[schema(minimum = 1000, maximum = 8000)]
    pub timeout_ms: Option<u64>,
}

/// The device's RRPC response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RrpcResponse {
    /// The `messageId` of the request and response topics.
    pub message_id: String,
    /// The response payload, base64.
    pub payload_base64: String,
    /// The response payload as text, when it is UTF-8.
    pub payload_text: Option<String>,
    /// Milliseconds from sending the request to the response.
    pub elapsed_ms: u64,
}

/// A device's latest properties.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PropertiesResponse {
    pub product_key: String,
    pub device_name: String,
    /// Property identifier → its latest value, device time and receive time.
    pub properties: BTreeMap<String, PropertySnapshot>,
}

fn decode(payload: String, encoding: PayloadEncoding) -> Result<Bytes, ApiError> {
    match encoding {
        PayloadEncoding::Text => Ok(Bytes::from(payload)),
        PayloadEncoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(payload.as_bytes())
            .map(Bytes::from)
            .map_err(|e| ApiError::invalid_field("payload", format!("not base64: {e}"))),
    }
}

fn qos(q: u8) -> Result<Qos, ApiError> {
    match q {
        0 => Ok(Qos::AtMostOnce),
        1 => Ok(Qos::AtLeastOnce),
        _ => Err(ApiError::invalid_field("qos", "must be 0 or 1")),
    }
}

fn timeout(ms: u64) -> Result<Duration, ApiError> {
    if (MIN_TIMEOUT_MS..=MAX_TIMEOUT_MS).contains(&ms) {
        Ok(Duration::from_millis(ms))
    } else {
        Err(ApiError::invalid_field(
            "timeout_ms",
            format!("must be {MIN_TIMEOUT_MS}..={MAX_TIMEOUT_MS}"),
        ))
    }
}

/// Publish one message to a device.
#[utoipa::path(
    post,
    path = "/api/v1/products/{pk}/devices/{dn}/messages",
    tag = "commands",
    params(
        ("pk" = String, Path, description = "Product key"),
        ("dn" = String, Path, description = "Device name"),
    ),
    request_body = PublishRequest,
    responses(
        (status = 200, description = "Handed to the device's session (`status: delivered`)", body = Sent),
        (status = 202, description = "The device is offline with a persistent session (clean_session = 0): kept for it and published when it reconnects with one (`status: queued`), unless it ages out first (`commands.offline_queue_ttl_secs`); single node only", body = Sent),
        (status = 400, description = "Invalid field, or a topic outside the device's namespace (FG.6003)", body = ErrorBody),
        (status = 404, description = "No such product or device", body = ErrorBody),
        (status = 409, description = "Device offline (FG.6001): no session and no persistent one to keep the message for, or `commands.offline_queue_max` messages wait for it already; device disabled (FG.6005)", body = ErrorBody),
        (status = 429, description = "The device's delivery queue is full", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn publish(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath((pk, dn)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<PublishRequest>,
) -> Result<(StatusCode, Json<Sent>), ApiError> {
    let message = Message {
        topic: req.topic,
        payload: decode(req.payload, req.payload_encoding)?,
        qos: qos(req.qos)?,
    };
    let sent = state.commands.publish(&pk, &dn, message).await?;
    let status = match sent.status {
        SendStatus::Delivered => StatusCode::OK,
        SendStatus::Queued => StatusCode::ACCEPTED,
    };
    Ok((status, Json(sent)))
}

/// Publish one message to many devices of a product (by list, tag or the whole product; at
/// most 1,000), paced by `commands.broadcast_per_sec`.
#[utoipa::path(
    post,
    path = "/api/v1/products/{pk}/messages",
    tag = "commands",
    params(("pk" = String, Path, description = "Product key")),
    request_body = BroadcastRequest,
    responses(
        (status = 200, description = "Per-device results", body = BroadcastResponse),
        (status = 400, description = "Invalid field", body = ErrorBody),
        (status = 413, description = "More than 1,000 devices (FG.1003)", body = ErrorBody),
        (status = 404, description = "No such product", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn broadcast(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath(pk): ApiPath<String>,
    ApiJson(req): ApiJson<BroadcastRequest>,
) -> Result<Json<BroadcastResponse>, ApiError> {
    let targets = match (req.device_names, req.tag_key, req.tag_value) {
        (Some(_), Some(_), _) => {
            return Err(ApiError::invalid_field(
                "tag_key",
                "give device_names or tag_key, not both",
            ))
        }
        (None, None, Some(_)) => return Err(ApiError::missing_field("tag_key")),
        (Some(names), None, _) => {
            if names.len() > MAX_BROADCAST {
                return Err(ApiError::too_many_items("device_names", MAX_BROADCAST));
            }
            Targets::Devices(names)
        }
        (None, Some(key), value) => Targets::Tag { key, value },
        (None, None, None) => Targets::Product,
    };
    let payload = decode(req.payload, req.payload_encoding)?;
    let results = state
        .commands
        .broadcast(&pk, targets, &req.topic, payload, qos(req.qos)?)
        .await?;
    Ok(Json(BroadcastResponse {
        total: results.len(),
        sent: results.iter().filter(|r| r.result == "sent").count(),
        queued: results.iter().filter(|r| r.result == "queued").count(),
        results,
    }))
}

/// Set properties (`thing.service.property.set`); synchronous with `timeout_ms`.
#[utoipa::path(
    put,
    path = "/api/v1/products/{pk}/devices/{dn}/properties",
    tag = "commands",
    params(
        ("pk" = String, Path, description = "Product key"),
        ("dn" = String, Path, description = "Device name"),
    ),
    request_body = CallRequest,
    responses(
        (status = 200, description = "Synchronous: the device answered (its code is in `reply.code`)", body = CommandRecord),
        (status = 202, description = "Asynchronous: sent; poll `…/commands/{id}`", body = CommandRecord),
        (status = 400, description = "Invalid field", body = ErrorBody),
        (status = 404, description = "No such product or device", body = ErrorBody),
        (status = 409, description = "Device offline (FG.6001) or disabled (FG.6005)", body = ErrorBody),
        (status = 504, description = "No answer within timeout_ms (FG.6002)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn set_properties(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath((pk, dn)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<CallRequest>,
) -> Result<(StatusCode, Json<CommandRecord>), ApiError> {
    call(&state, &pk, &dn, PROPERTY_SET, req).await
}

/// Invoke a TSL service; synchronous with `timeout_ms`.
#[utoipa::path(
    post,
    path = "/api/v1/products/{pk}/devices/{dn}/services/{identifier}",
    tag = "commands",
    params(
        ("pk" = String, Path, description = "Product key"),
        ("dn" = String, Path, description = "Device name"),
        ("identifier" = String, Path, description = "Service identifier (1-64 of A-Z a-z 0-9 _ -)"),
    ),
    request_body = CallRequest,
    responses(
        (status = 200, description = "Synchronous: the device answered (its code is in `reply.code`)", body = CommandRecord),
        (status = 202, description = "Asynchronous: sent; poll `…/commands/{id}`", body = CommandRecord),
        (status = 400, description = "Invalid field", body = ErrorBody),
        (status = 404, description = "No such product or device", body = ErrorBody),
        (status = 409, description = "Device offline (FG.6001) or disabled (FG.6005)", body = ErrorBody),
        (status = 504, description = "No answer within timeout_ms (FG.6002)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn invoke_service(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath((pk, dn, identifier)): ApiPath<(String, String, String)>,
    ApiJson(req): ApiJson<CallRequest>,
) -> Result<(StatusCode, Json<CommandRecord>), ApiError> {
    call(&state, &pk, &dn, &identifier, req).await
}

async fn call(
    state: &ApiState,
    pk: &str,
    dn: &str,
    identifier: &str,
    req: CallRequest,
) -> Result<(StatusCode, Json<CommandRecord>), ApiError> {
    let wait = req.timeout_ms.map(timeout).transpose()?;
    let record = state
        .commands
        .call_service(pk, dn, identifier, req.params, wait)
        .await?;
    let status = if wait.is_some() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(record)))
}

/// A service call's or property set's record: what was sent and the device's answer.
#[utoipa::path(
    get,
    path = "/api/v1/products/{pk}/devices/{dn}/commands/{id}",
    tag = "commands",
    params(
        ("pk" = String, Path, description = "Product key"),
        ("dn" = String, Path, description = "Device name"),
        ("id" = String, Path, description = "The call's id"),
    ),
    responses(
        (status = 200, description = "The record", body = CommandRecord),
        (status = 404, description = "No such device, or no such call (FG.6004; records are kept for the last commands.max_records calls of each node, in memory; in cluster mode any node finds a record the node that made the call still has)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_command(
    State(state): State<ApiState>,
    ApiPath((pk, dn, id)): ApiPath<(String, String, String)>,
) -> Result<Json<CommandRecord>, ApiError> {
    Ok(Json(state.commands.record(&pk, &dn, &id).await?))
}

/// Send an RRPC request and wait for the device's response.
#[utoipa::path(
    post,
    path = "/api/v1/products/{pk}/devices/{dn}/rrpc",
    tag = "commands",
    params(
        ("pk" = String, Path, description = "Product key"),
        ("dn" = String, Path, description = "Device name"),
    ),
    request_body = RrpcRequest,
    responses(
        (status = 200, description = "The device's response", body = RrpcResponse),
        (status = 400, description = "Invalid field", body = ErrorBody),
        (status = 404, description = "No such product or device", body = ErrorBody),
        (status = 409, description = "Device offline (FG.6001) or disabled (FG.6005), answered at once", body = ErrorBody),
        (status = 504, description = "No response within timeout_ms (FG.6002)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn rrpc(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath((pk, dn)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<RrpcRequest>,
) -> Result<Json<RrpcResponse>, ApiError> {
    let wait = timeout(req.timeout_ms.unwrap_or(5000))?;
    let payload = decode(req.payload, req.payload_encoding)?;
    let answer = state.commands.rrpc(&pk, &dn, payload, wait).await?;
    Ok(Json(RrpcResponse {
        message_id: answer.message_id,
        payload_base64: base64::engine::general_purpose::STANDARD.encode(&answer.payload),
        payload_text: std::str::from_utf8(&answer.payload).ok().map(str::to_owned),
        elapsed_ms: answer.elapsed_ms,
    }))
}

/// A device's latest properties (value, device time, receive time per property). In cluster
/// mode every node answers the same: the posts another node received show once it flushed
/// them (`commands.properties_flush_ms`).
#[utoipa::path(
    get,
    path = "/api/v1/products/{pk}/devices/{dn}/properties",
    tag = "commands",
    params(
        ("pk" = String, Path, description = "Product key"),
        ("dn" = String, Path, description = "Device name"),
    ),
    responses(
        (status = 200, description = "The snapshot (empty when the device never posted)", body = PropertiesResponse),
        (status = 404, description = "No such product or device", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_properties(
    State(state): State<ApiState>,
    ApiPath((pk, dn)): ApiPath<(String, String)>,
) -> Result<Json<PropertiesResponse>, ApiError> {
    state.registry.get_device(&pk, &dn)?;
    // Cluster mode reads the stored snapshot (another node may have received the posts).
    let properties = state
        .commands
        .properties()
        .snapshot(&pk, &dn)
        .await
        .map_err(|e| ApiError::internal(format!("cannot read the latest properties: {e}")))?;
    Ok(Json(PropertiesResponse {
        product_key: pk,
        device_name: dn,
        properties,
    }))
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        let msg = e.to_string();
        match e {
            CommandError::Registry(e) => e.into(),
            CommandError::Offline { .. } | CommandError::OfflineQueueFull { .. } => {
                ApiError::new(ErrorCode::DeviceOffline, msg)
            }
            CommandError::Disabled { .. } => ApiError::new(ErrorCode::DeviceDisabled, msg),
            CommandError::Timeout { .. } => ApiError::new(ErrorCode::DeviceTimeout, msg),
            CommandError::Namespace { .. } => {
                ApiError::new(ErrorCode::TopicOutsideNamespace, msg).with_field("topic")
            }
            CommandError::Invalid { field, message } => ApiError::invalid_field(field, message),
            CommandError::TooMany { .. } => ApiError::new(ErrorCode::TooManyItems, msg),
            CommandError::Busy => ApiError::new(ErrorCode::TooManyRequests, msg),
            CommandError::NotFound { .. } => ApiError::new(ErrorCode::CommandNotFound, msg),
            CommandError::Broker(detail) => ApiError::internal(detail),
        }
    }
}
