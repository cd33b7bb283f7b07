//! The one HTTP error type of the API and its stable code table.
//!
//! Every failure a client can see — handler errors, extractor rejections, unknown routes, auth —
//! becomes an [`ApiError`] and is rendered as
//! `{"error_code":"FG.xxxx","error_msg":"…","error_ext_msg":null,"request_id":"…"}` (the DCS-style
//! body of the vendor seeds). `error_ext_msg` carries the offending field's path when one field is
//! to blame and is `null` otherwise. Internal failures are logged with the request id and shown
//! to the client only as "internal error".
//!
//! Codes are a public contract: never renumber one, only add.

use std::fmt;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::forwarder::ForwarderError;
use crate::registry::RegistryError;

/// The stable error codes. `FG.0xxx` mirror the HTTP status; `FG.1xxx` are request-shape errors;
/// `FG.2xxx` name the resource that is missing or already exists (`FG.22xx`: why an instance
/// cannot be deleted); `FG.3xxx` are firmware/OTA;
/// `FG.6xxx` are cloud-to-device commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// FG.0400: the request is wrong in a way no more specific code describes.
    BadRequest,
    /// FG.0401: no bearer token, or one the gateway does not know.
    Unauthenticated,
    /// FG.0403: the token's role may not do this.
    Forbidden,
    /// FG.0404: no such route or resource.
    NotFound,
    /// FG.0405: the route exists but not with this method.
    MethodNotAllowed,
    /// FG.0409: the request conflicts with the current state.
    Conflict,
    /// FG.0413: the body is larger than the configured limit.
    PayloadTooLarge,
    /// FG.0416: the `Range` of a download lies outside the file.
    RangeNotSatisfiable,
    /// FG.0429: rate limited.
    TooManyRequests,
    /// FG.0500: the gateway failed; details are in its log under the request id.
    Internal,
    /// FG.0503: cluster mode, the node that drives the engines cannot be reached right now (a
    /// takeover in progress); retry.
    Unavailable,
    /// FG.1000: the body is not valid JSON/CSV.
    MalformedBody,
    /// FG.1001: a field (body, query or path) has an invalid value; the field is named.
    InvalidField,
    /// FG.1002: a required field is missing; the field is named.
    MissingField,
    /// FG.1003: more items than one request may carry (e.g. >10,000 batch rows).
    TooManyItems,
    /// FG.1004: the body's Content-Type is not one this endpoint accepts.
    UnsupportedMediaType,
    /// FG.2001: no such instance.
    InstanceNotFound,
    /// FG.2002: no such product.
    ProductNotFound,
    /// FG.2003: no such device.
    DeviceNotFound,
    /// FG.2004: no such consumer group in the instance.
    ConsumerGroupNotFound,
    /// FG.2101: an instance with this id exists.
    InstanceExists,
    /// FG.2102: a product with this key exists.
    ProductExists,
    /// FG.2103: a device with this name exists in the product.
    DeviceExists,
    /// FG.2104: a consumer group with this id exists in the instance.
    ConsumerGroupExists,
    /// FG.2201: the `default` instance cannot be deleted.
    DefaultInstance,
    /// FG.2202: the instance is the home of products or the owner of devices.
    InstanceInUse,
    /// FG.2203: an unfinished migration task has the instance as its source or target.
    InstanceMigrating,
    /// FG.2204: the instance has consumer groups (delete them, or delete with `force=true`).
    InstanceHasGroups,
    /// FG.2205: messages for the instance still wait in the forwarding outbox.
    InstanceOutboxBusy,
    /// FG.3001: no such firmware package.
    FirmwareNotFound,
    /// FG.3002: the firmware package is larger than `ota.max_firmware_bytes`.
    FirmwareTooLarge,
    /// FG.3003: the product already has a package with this module and version.
    FirmwareExists,
    /// FG.3004: a firmware download link is missing its token, tampered with or expired.
    DownloadForbidden,
    /// FG.3005: the firmware package is used by an unfinished OTA job.
    FirmwareInUse,
    /// FG.3101: no such OTA job.
    OtaJobNotFound,
    /// FG.3102: the device has no task in this OTA job.
    OtaTaskNotFound,
    /// FG.3103: an UPGRADE_FIRMWARE job for a package that is not VERIFIED, without `force`.
    FirmwareNotVerified,
    /// FG.4001: no such export job.
    ExportNotFound,
    /// FG.4002: no such import job.
    ImportNotFound,
    /// FG.4003: the export's package is not available (job IN_PROGRESS or FAILED).
    PackageNotReady,
    /// FG.4004: the import package is damaged or tampered with (bad ZIP, checksum mismatch).
    PackageInvalid,
    /// FG.4005: the secrets_key does not open the package's secrets.
    WrongSecretsKey,
    /// FG.4006: the import package unpacks to more than `export.max_unpacked_entry_bytes` (one
    /// file) or `export.max_unpacked_bytes` (all files).
    PackageTooLarge,
    /// FG.5001: no such migration task.
    MigrationTaskNotFound,
    /// FG.5002: the product already has a migration task.
    MigrationTaskExists,
    /// FG.5003: the migration task's state does not allow this (the message names the state).
    MigrationStateConflict,
    /// FG.5004: rollback refused: the product no longer exists in the source instance.
    MigrationSourceProductGone,
    /// FG.6001: the device has no MQTT session (commands are refused at once).
    DeviceOffline,
    /// FG.6002: the device did not answer a synchronous call in time.
    DeviceTimeout,
    /// FG.6003: the topic is not in the device's own namespace.
    TopicOutsideNamespace,
    /// FG.6004: no such command of the device (unknown or evicted).
    CommandNotFound,
    /// FG.6005: the device is disabled (nothing is sent to it or kept for it).
    DeviceDisabled,
}

impl ErrorCode {
    /// Every code, in table order (the OpenAPI description and the tests walk it).
    pub const ALL: [ErrorCode; 52] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Conflict,
        ErrorCode::PayloadTooLarge,
        ErrorCode::RangeNotSatisfiable,
        ErrorCode::TooManyRequests,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
        ErrorCode::MalformedBody,
        ErrorCode::InvalidField,
        ErrorCode::MissingField,
        ErrorCode::TooManyItems,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::InstanceNotFound,
        ErrorCode::ProductNotFound,
        ErrorCode::DeviceNotFound,
        ErrorCode::ConsumerGroupNotFound,
        ErrorCode::InstanceExists,
        ErrorCode::ProductExists,
        ErrorCode::DeviceExists,
        ErrorCode::ConsumerGroupExists,
        ErrorCode::DefaultInstance,
        ErrorCode::InstanceInUse,
        ErrorCode::InstanceMigrating,
        ErrorCode::InstanceHasGroups,
        ErrorCode::InstanceOutboxBusy,
        ErrorCode::FirmwareNotFound,
        ErrorCode::FirmwareTooLarge,
        ErrorCode::FirmwareExists,
        ErrorCode::DownloadForbidden,
        ErrorCode::FirmwareInUse,
        ErrorCode::OtaJobNotFound,
        ErrorCode::OtaTaskNotFound,
        ErrorCode::FirmwareNotVerified,
        ErrorCode::ExportNotFound,
        ErrorCode::ImportNotFound,
        ErrorCode::PackageNotReady,
        ErrorCode::PackageInvalid,
        ErrorCode::WrongSecretsKey,
        ErrorCode::PackageTooLarge,
        ErrorCode::MigrationTaskNotFound,
        ErrorCode::MigrationTaskExists,
        ErrorCode::MigrationStateConflict,
        ErrorCode::MigrationSourceProductGone,
        ErrorCode::DeviceOffline,
        ErrorCode::DeviceTimeout,
        ErrorCode::TopicOutsideNamespace,
        ErrorCode::CommandNotFound,
        ErrorCode::DeviceDisabled,
    ];

    /// The wire form, e.g. `FG.1001`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "FG.0400",
            ErrorCode::Unauthenticated => "FG.0401",
            ErrorCode::Forbidden => "FG.0403",
            ErrorCode::NotFound => "FG.0404",
            ErrorCode::MethodNotAllowed => "FG.0405",
            ErrorCode::Conflict => "FG.0409",
            ErrorCode::PayloadTooLarge => "FG.0413",
            ErrorCode::RangeNotSatisfiable => "FG.0416",
            ErrorCode::TooManyRequests => "FG.0429",
            ErrorCode::Internal => "FG.0500",
            ErrorCode::Unavailable => "FG.0503",
            ErrorCode::MalformedBody => "FG.1000",
            ErrorCode::InvalidField => "FG.1001",
            ErrorCode::MissingField => "FG.1002",
            ErrorCode::TooManyItems => "FG.1003",
            ErrorCode::UnsupportedMediaType => "FG.1004",
            ErrorCode::InstanceNotFound => "FG.2001",
            ErrorCode::ProductNotFound => "FG.2002",
            ErrorCode::DeviceNotFound => "FG.2003",
            ErrorCode::ConsumerGroupNotFound => "FG.2004",
            ErrorCode::InstanceExists => "FG.2101",
            ErrorCode::ProductExists => "FG.2102",
            ErrorCode::DeviceExists => "FG.2103",
            ErrorCode::ConsumerGroupExists => "FG.2104",
            ErrorCode::DefaultInstance => "FG.2201",
            ErrorCode::InstanceInUse => "FG.2202",
            ErrorCode::InstanceMigrating => "FG.2203",
            ErrorCode::InstanceHasGroups => "FG.2204",
            ErrorCode::InstanceOutboxBusy => "FG.2205",
            ErrorCode::FirmwareNotFound => "FG.3001",
            ErrorCode::FirmwareTooLarge => "FG.3002",
            ErrorCode::FirmwareExists => "FG.3003",
            ErrorCode::DownloadForbidden => "FG.3004",
            ErrorCode::FirmwareInUse => "FG.3005",
            ErrorCode::OtaJobNotFound => "FG.3101",
            ErrorCode::OtaTaskNotFound => "FG.3102",
            ErrorCode::FirmwareNotVerified => "FG.3103",
            ErrorCode::ExportNotFound => "FG.4001",
            ErrorCode::ImportNotFound => "FG.4002",
            ErrorCode::PackageNotReady => "FG.4003",
            ErrorCode::PackageInvalid => "FG.4004",
            ErrorCode::WrongSecretsKey => "FG.4005",
            ErrorCode::PackageTooLarge => "FG.4006",
            ErrorCode::MigrationTaskNotFound => "FG.5001",
            ErrorCode::MigrationTaskExists => "FG.5002",
            ErrorCode::MigrationStateConflict => "FG.5003",
            ErrorCode::MigrationSourceProductGone => "FG.5004",
            ErrorCode::DeviceOffline => "FG.6001",
            ErrorCode::DeviceTimeout => "FG.6002",
            ErrorCode::TopicOutsideNamespace => "FG.6003",
            ErrorCode::CommandNotFound => "FG.6004",
            ErrorCode::DeviceDisabled => "FG.6005",
        }
    }

    /// The HTTP status this code is always sent with.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest
            | ErrorCode::MalformedBody
            | ErrorCode::InvalidField
            | ErrorCode::MissingField
            | ErrorCode::UnsupportedMediaType
            | ErrorCode::PackageInvalid
            | ErrorCode::WrongSecretsKey
            | ErrorCode::TopicOutsideNamespace => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden | ErrorCode::DownloadForbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound
            | ErrorCode::InstanceNotFound
            | ErrorCode::ProductNotFound
            | ErrorCode::DeviceNotFound
            | ErrorCode::ConsumerGroupNotFound
            | ErrorCode::FirmwareNotFound
            | ErrorCode::OtaJobNotFound
            | ErrorCode::OtaTaskNotFound
            | ErrorCode::ExportNotFound
            | ErrorCode::ImportNotFound
            | ErrorCode::MigrationTaskNotFound
            | ErrorCode::CommandNotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Conflict
            | ErrorCode::InstanceExists
            | ErrorCode::ProductExists
            | ErrorCode::DeviceExists
            | ErrorCode::ConsumerGroupExists
            | ErrorCode::DefaultInstance
            | ErrorCode::InstanceInUse
            | ErrorCode::InstanceMigrating
            | ErrorCode::InstanceHasGroups
            | ErrorCode::InstanceOutboxBusy
            | ErrorCode::FirmwareExists
            | ErrorCode::FirmwareInUse
            | ErrorCode::FirmwareNotVerified
            | ErrorCode::PackageNotReady
            | ErrorCode::MigrationTaskExists
            | ErrorCode::MigrationStateConflict
            | ErrorCode::MigrationSourceProductGone
            | ErrorCode::DeviceOffline
            | ErrorCode::DeviceDisabled => StatusCode::CONFLICT,
            ErrorCode::DeviceTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::PayloadTooLarge
            | ErrorCode::TooManyItems
            | ErrorCode::FirmwareTooLarge
            | ErrorCode::PackageTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// One line for the code table in the OpenAPI description.
    pub fn description(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad request",
            ErrorCode::Unauthenticated => "missing or unknown bearer token",
            ErrorCode::Forbidden => "the token's role may not do this",
            ErrorCode::NotFound => "no such route or resource",
            ErrorCode::MethodNotAllowed => "method not allowed on this route",
            ErrorCode::Conflict => "conflicts with the current state",
            ErrorCode::PayloadTooLarge => "request body too large",
            ErrorCode::RangeNotSatisfiable => "requested byte range lies outside the file",
            ErrorCode::TooManyRequests => "too many requests",
            ErrorCode::Internal => "internal error (see the gateway log for the request id)",
            ErrorCode::Unavailable => {
                "the engines' node is not reachable now (cluster takeover); retry"
            }
            ErrorCode::MalformedBody => "malformed JSON or CSV body",
            ErrorCode::InvalidField => "invalid field value (field named in error_ext_msg)",
            ErrorCode::MissingField => "missing required field (field named in error_ext_msg)",
            ErrorCode::TooManyItems => "too many items in one request",
            ErrorCode::UnsupportedMediaType => "unsupported Content-Type",
            ErrorCode::InstanceNotFound => "instance not found",
            ErrorCode::ProductNotFound => "product not found",
            ErrorCode::DeviceNotFound => "device not found",
            ErrorCode::ConsumerGroupNotFound => "consumer group not found",
            ErrorCode::InstanceExists => "instance already exists",
            ErrorCode::ProductExists => "product already exists",
            ErrorCode::DeviceExists => "device already exists",
            ErrorCode::ConsumerGroupExists => "consumer group already exists",
            ErrorCode::DefaultInstance => "the default instance cannot be deleted",
            ErrorCode::InstanceInUse => {
                "instance still has products or owns devices (counts in error_msg)"
            }
            ErrorCode::InstanceMigrating => {
                "instance is the source or target of an unfinished migration task (named)"
            }
            ErrorCode::InstanceHasGroups => {
                "instance has consumer groups (named); delete them or use force=true"
            }
            ErrorCode::InstanceOutboxBusy => {
                "messages for the instance still wait in the forwarding outbox; retry once forwarded"
            }
            ErrorCode::FirmwareNotFound => "firmware package not found",
            ErrorCode::FirmwareTooLarge => "firmware package larger than ota.max_firmware_bytes",
            ErrorCode::FirmwareExists => {
                "the product already has a package with this module and version"
            }
            ErrorCode::DownloadForbidden => {
                "firmware download link missing its token, tampered with or expired"
            }
            ErrorCode::FirmwareInUse => "firmware package used by an unfinished OTA job",
            ErrorCode::OtaJobNotFound => "OTA job not found",
            ErrorCode::OtaTaskNotFound => "the device has no task in this OTA job",
            ErrorCode::FirmwareNotVerified => {
                "firmware not VERIFIED (verify it or set force: true)"
            }
            ErrorCode::ExportNotFound => "export job not found",
            ErrorCode::ImportNotFound => "import job not found",
            ErrorCode::PackageNotReady => "export package not available (job running or failed)",
            ErrorCode::PackageInvalid => {
                "package damaged or tampered with (bad ZIP, checksum mismatch)"
            }
            ErrorCode::WrongSecretsKey => "secrets_key does not open the package's secrets",
            ErrorCode::PackageTooLarge => {
                "package unpacks to more than export.max_unpacked_entry_bytes or max_unpacked_bytes"
            }
            ErrorCode::MigrationTaskNotFound => "migration task not found",
            ErrorCode::MigrationTaskExists => "the product already has a migration task",
            ErrorCode::MigrationStateConflict => {
                "not allowed in the migration task's current state (named in error_msg)"
            }
            ErrorCode::MigrationSourceProductGone => {
                "rollback refused: the product no longer exists in the source instance"
            }
            ErrorCode::DeviceOffline => "device offline (no MQTT session)",
            ErrorCode::DeviceTimeout => "the device did not answer within the timeout",
            ErrorCode::TopicOutsideNamespace => "topic outside the device's namespace",
            ErrorCode::CommandNotFound => "no such command of the device",
            ErrorCode::DeviceDisabled => "device disabled: nothing is sent to it or kept for it",
        }
    }

    /// The code table as Markdown, for the OpenAPI description.
    pub fn markdown_table() -> String {
        let mut out = String::from("| error_code | HTTP | meaning |\n|---|---|---|\n");
        for code in Self::ALL {
            out.push_str(&format!(
                "| `{}` | {} | {} |\n",
                code.as_str(),
                code.status().as_u16(),
                code.description()
            ));
        }
        out
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error body every non-2xx response carries.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable code, e.g. `FG.1001`.
    #[schema(example = "FG.1001")]
    pub error_code: String,
    /// Human-readable message; names the field when one is to blame.
    #[schema(example = "invalid device_name: must be 4..=32 characters")]
    pub error_msg: String,
    /// The offending field's path when one field is to blame, else null.
    #[schema(example = "device_name")]
    pub error_ext_msg: Option<String>,
    /// Same as the `x-request-id` response header; quote it when reporting a problem.
    pub request_id: String,
}

/// Marks a response whose body is already the standard error body, so the outer middleware
/// leaves it alone (it rewrites bare error responses produced by layers into this shape).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StandardErrorBody;

/// An API failure: a code from the table, a client-facing message, optionally the field to
/// blame, and (for internal errors only) a detail that is logged, never sent.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    msg: String,
    field: Option<String>,
    internal: Option<String>,
    /// A header the answer carries besides the body (never more than one: a 401's challenge or
    /// a 429's wait; one field keeps the error small enough to return by value).
    header: Option<ErrorHeader>,
}

/// See [`ApiError`]'s `header`.
#[derive(Debug, Clone)]
enum ErrorHeader {
    /// `WWW-Authenticate`.
    Challenge(HeaderValue),
    /// `Retry-After`, whole seconds.
    RetryAfter(u32),
}

impl ApiError {
    /// An error with `code` and message `msg`.
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        ApiError {
            code,
            msg: msg.into(),
            field: None,
            internal: None,
            header: None,
        }
    }

    /// Answers with `Retry-After: after` (whole seconds, rounded up, at least 1).
    pub fn with_retry_after(mut self, after: std::time::Duration) -> Self {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        self.header = Some(ErrorHeader::RetryAfter(
            u32::try_from(secs.max(1)).unwrap_or(u32::MAX),
        ));
        self
    }

    /// Names `field` as the culprit (`error_ext_msg`).
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.msg
    }

    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }

    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, msg)
    }

    /// FG.1001 naming `field` in both the message and `error_ext_msg`.
    pub fn invalid_field(field: impl Into<String>, why: impl fmt::Display) -> Self {
        let field = field.into();
        Self::new(ErrorCode::InvalidField, format!("invalid {field}: {why}")).with_field(field)
    }

    /// FG.1002 naming `field`.
    pub fn missing_field(field: impl Into<String>) -> Self {
        let field = field.into();
        Self::new(ErrorCode::MissingField, format!("missing field {field}")).with_field(field)
    }

    /// FG.1003: `field` carries more than `max` items.
    pub fn too_many_items(field: impl Into<String>, max: usize) -> Self {
        let field = field.into();
        Self::new(
            ErrorCode::TooManyItems,
            format!("{field}: at most {max} items per request"),
        )
        .with_field(field)
    }

    pub fn unsupported_media_type(expected: &str) -> Self {
        Self::new(
            ErrorCode::UnsupportedMediaType,
            format!("unsupported Content-Type, expected {expected}"),
        )
    }

    pub fn malformed(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::MalformedBody, msg)
    }

    pub fn payload_too_large() -> Self {
        Self::new(ErrorCode::PayloadTooLarge, "request body too large")
    }

    /// 401 with the RFC 6750 challenge; `invalid` says a token was sent but is not known.
    pub fn unauthenticated(invalid: bool) -> Self {
        let (msg, challenge) = if invalid {
            (
                "invalid bearer token",
                r#"Bearer realm="fleetgate", error="invalid_token""#,
            )
        } else {
            ("missing bearer token", r#"Bearer realm="fleetgate""#)
        };
        let mut e = Self::new(ErrorCode::Unauthenticated, msg);
        e.header = Some(ErrorHeader::Challenge(HeaderValue::from_static(challenge)));
        e
    }

    pub fn forbidden(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, msg)
    }

    pub fn route_not_found() -> Self {
        Self::new(ErrorCode::NotFound, "no such route")
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            ErrorCode::MethodNotAllowed,
            "method not allowed on this route",
        )
    }

    /// A failure of the gateway itself: `detail` goes to the log (with the request id, which the
    /// request span carries), the client sees only "internal error".
    pub fn internal(detail: impl fmt::Display) -> Self {
        let mut e = Self::new(ErrorCode::Internal, "internal error");
        e.internal = Some(detail.to_string());
        e
    }

    /// A failed store write: 503 `FG.0503` when it failed because this node's term of the
    /// engines' lease ended under it (cluster mode: the next holder serves a retry), else a
    /// 500 with `detail`.
    pub fn store(store: &crate::store::StoreError, detail: impl fmt::Display) -> Self {
        match store {
            crate::store::StoreError::NotLeaseHolder => Self::new(
                ErrorCode::Unavailable,
                "this node stopped driving the engines during the call (the cluster is handing them over); retry in a few seconds",
            ),
            _ => Self::internal(detail),
        }
    }

    /// The standard body for this error, stamped with `request_id`.
    pub fn body(&self, request_id: String) -> ErrorBody {
        ErrorBody {
            error_code: self.code.as_str().to_owned(),
            error_msg: self.msg.clone(),
            error_ext_msg: self.field.clone(),
            request_id,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.msg)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = super::middleware::current_request_id().unwrap_or_default();
        if let Some(detail) = &self.internal {
            tracing::error!(request_id = %request_id, error = %detail, "internal error");
        }
        let mut resp = (self.code.status(), Json(self.body(request_id))).into_response();
        match self.header {
            Some(ErrorHeader::Challenge(challenge)) => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, challenge);
            }
            Some(ErrorHeader::RetryAfter(secs)) => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            None => {}
        }
        resp.extensions_mut().insert(StandardErrorBody);
        resp
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound { kind, id } => {
                let code = match kind {
                    "instance" => ErrorCode::InstanceNotFound,
                    "product" => ErrorCode::ProductNotFound,
                    "device" => ErrorCode::DeviceNotFound,
                    _ => ErrorCode::NotFound,
                };
                ApiError::new(code, format!("{kind} {id} not found"))
            }
            RegistryError::AlreadyExists { kind, id } => {
                let code = match kind {
                    "instance" => ErrorCode::InstanceExists,
                    "product" => ErrorCode::ProductExists,
                    "device" => ErrorCode::DeviceExists,
                    _ => ErrorCode::Conflict,
                };
                ApiError::new(code, format!("{kind} {id} already exists"))
            }
            RegistryError::Invalid { field, message } => ApiError::invalid_field(field, message),
            RegistryError::Conflict(msg) => ApiError::new(ErrorCode::Conflict, msg),
            e @ RegistryError::DefaultInstance => {
                ApiError::new(ErrorCode::DefaultInstance, e.to_string())
            }
            e @ RegistryError::InstanceInUse { .. } => {
                ApiError::new(ErrorCode::InstanceInUse, e.to_string())
            }
            RegistryError::TooMany { field, max } => ApiError::too_many_items(field, max),
            e @ RegistryError::Store(_) => ApiError::internal(e),
        }
    }
}

impl From<ForwarderError> for ApiError {
    fn from(e: ForwarderError) -> Self {
        match e {
            ForwarderError::InstanceNotFound(id) => ApiError::new(
                ErrorCode::InstanceNotFound,
                format!("instance {id} not found"),
            ),
            ForwarderError::GroupNotFound {
                instance_id,
                group_id,
            } => ApiError::new(
                ErrorCode::ConsumerGroupNotFound,
                format!("consumer group {group_id} not found in instance {instance_id}"),
            ),
            ForwarderError::GroupExists {
                instance_id,
                group_id,
            } => ApiError::new(
                ErrorCode::ConsumerGroupExists,
                format!("consumer group {group_id} already exists in instance {instance_id}"),
            ),
            ForwarderError::Invalid { field, message } => ApiError::invalid_field(field, message),
            e @ ForwarderError::InstanceHasGroups { .. } => {
                ApiError::new(ErrorCode::InstanceHasGroups, e.to_string())
            }
            e @ ForwarderError::InstanceOutboxBusy { .. } => {
                ApiError::new(ErrorCode::InstanceOutboxBusy, e.to_string())
            }
            other => ApiError::internal(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn a_write_refused_by_the_lease_fence_is_a_retryable_503() {
        use crate::store::StoreError;
        let fenced = ApiError::store(&StoreError::NotLeaseHolder, "fenced");
        assert_eq!(fenced.code, ErrorCode::Unavailable);
        assert_eq!(fenced.code.status(), StatusCode::SERVICE_UNAVAILABLE);
        let closed = ApiError::store(&StoreError::Closed, "closed");
        assert_eq!(closed.code, ErrorCode::Internal);
        assert_eq!(closed.internal.as_deref(), Some("closed"));
    }

    #[test]
    fn codes_are_unique_and_statuses_are_in_the_contract_set() {
        let allowed = [400, 401, 403, 404, 405, 409, 413, 416, 429, 500, 503, 504];
        let mut seen = HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate {code}");
            assert!(code.as_str().starts_with("FG.") && code.as_str().len() == 7);
            assert!(allowed.contains(&code.status().as_u16()), "{code}");
        }
        // The table is a contract: spot-check a few fixed points.
        assert_eq!(ErrorCode::InvalidField.as_str(), "FG.1001");
        assert_eq!(ErrorCode::DeviceNotFound.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            ErrorCode::TooManyItems.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert!(ErrorCode::markdown_table().contains("| `FG.2103` | 409 |"));
    }

    #[test]
    fn registry_errors_map_to_specific_codes() {
        let e: ApiError = RegistryError::NotFound {
            kind: "device",
            id: "pk/dn".into(),
        }
        .into();
        assert_eq!(e.code(), ErrorCode::DeviceNotFound);
        let e: ApiError = RegistryError::Invalid {
            field: "device_name",
            message: "too long".into(),
        }
        .into();
        assert_eq!(e.code(), ErrorCode::InvalidField);
        assert_eq!(e.field(), Some("device_name"));
        assert!(e.message().contains("device_name"), "{}", e.message());
        let e: ApiError = RegistryError::TooMany {
            field: "devices",
            max: 10_000,
        }
        .into();
        assert_eq!(e.code().status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn internal_detail_is_not_sent() {
        let e = ApiError::internal("disk on fire at /var/secret");
        let body = e.body("rid".into());
        assert_eq!(body.error_msg, "internal error");
        assert_eq!(body.error_code, "FG.0500");
        assert!(body.error_ext_msg.is_none());
    }

    #[test]
    fn a_401_carries_its_challenge_and_a_429_its_wait_in_whole_seconds() {
        let resp = ApiError::unauthenticated(true).into_response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let challenge = resp.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        assert!(!resp.headers().contains_key(header::RETRY_AFTER));

        for (after_ms, secs) in [(0, "1"), (1, "1"), (1_000, "1"), (1_500, "2"), (5_000, "5")] {
            let resp = ApiError::new(ErrorCode::TooManyRequests, "slow down")
                .with_retry_after(std::time::Duration::from_millis(after_ms))
                .into_response();
            assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(resp.headers()[header::RETRY_AFTER], secs, "{after_ms} ms");
            assert!(!resp.headers().contains_key(header::WWW_AUTHENTICATE));
        }
        let plain = ApiError::new(ErrorCode::TooManyRequests, "no wait").into_response();
        assert!(!plain.headers().contains_key(header::RETRY_AFTER));
    }
}
