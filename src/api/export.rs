//! `/api/v1/export…` and `/api/v1/import…`: export/import jobs (docs/DESIGN.md §7,
//! docs/EXPORT.md). Everything goes through [`ExportService`]; every route is rate limited there
//! (429 `FG.0429` "too many requests" with `Retry-After`).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::auth::{Caller, RequireOperator, Role};
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ApiJson, ApiMultipart, ApiPath, ApiQuery, MultipartForm};
use super::ApiState;
use crate::export::{
    ConflictPolicy, ExportError, ExportJob, ExportRequest, JobKind, JobRecord, Limited,
    PackageError, Privilege,
};
use axum::extract::DefaultBodyLimit;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use super::RouteLimits;

/// The export and import routes.
pub(super) fn routes(limits: &RouteLimits) -> OpenApiRouter<ApiState> {
    OpenApiRouter::default()
        .routes(routes!(start_export))
        .routes(routes!(get_export))
        .routes(routes!(export_log))
        .routes(routes!(export_package))
        .routes(routes!(start_import).layer(DefaultBodyLimit::max(limits.import)))
        .routes(routes!(get_import))
        .routes(routes!(import_log))
}

impl From<ExportError> for ApiError {
    fn from(e: ExportError) -> Self {
        match e {
            ExportError::NotFound { kind: "import", .. } => {
                ApiError::new(ErrorCode::ImportNotFound, e.to_string())
            }
            ExportError::NotFound { .. } => ApiError::new(ErrorCode::ExportNotFound, e.to_string()),
            ExportError::NotReady { .. } => {
                ApiError::new(ErrorCode::PackageNotReady, e.to_string())
            }
            ExportError::Invalid { field, message } => ApiError::invalid_field(field, message),
            ExportError::Missing(field) => {
                let mut err = ApiError::missing_field(field);
                if field == "secrets_key" {
                    err = ApiError::new(
                        ErrorCode::MissingField,
                        "missing field secrets_key: secrets are exported only encrypted; give a secrets_key (at least 12 characters) or set include_secrets: false",
                    )
                    .with_field(field);
                }
                err
            }
            ExportError::UnknownObjects(_) => {
                ApiError::new(ErrorCode::InvalidField, e.to_string()).with_field("objects")
            }
            ExportError::TooMany { .. } => {
                ApiError::new(ErrorCode::TooManyItems, e.to_string()).with_field("objects")
            }
            ExportError::Package(PackageError::MissingKey) => {
                ApiError::new(ErrorCode::MissingField, e.to_string()).with_field("secrets_key")
            }
            ExportError::Package(PackageError::WrongKey) => {
                ApiError::new(ErrorCode::WrongSecretsKey, e.to_string()).with_field("secrets_key")
            }
            ExportError::Package(PackageError::Io(io)) => ApiError::internal(io),
            ExportError::Package(
                PackageError::EntryTooLarge { .. } | PackageError::TooLarge { .. },
            ) => ApiError::new(ErrorCode::PackageTooLarge, e.to_string()).with_field("package"),
            ExportError::Package(_) => {
                ApiError::new(ErrorCode::PackageInvalid, e.to_string()).with_field("package")
            }
            ExportError::Limited(l) => too_many(l),
            ExportError::Forbidden(msg) => ApiError::forbidden(msg).with_field("package"),
            ExportError::Store(ref store) => ApiError::store(store, &e),
            ExportError::Internal(_) => ApiError::internal(e),
        }
    }
}

/// A 429 in the standard body with `Retry-After` (whole seconds, at least 1).
fn too_many(l: Limited) -> ApiError {
    ApiError::new(ErrorCode::TooManyRequests, l.reason).with_retry_after(l.retry_after)
}

/// `?expand=objects`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ExpandQuery {
    /// `objects` adds the per-object status list.
    #[param(pattern = "^( *objects *(, *objects *)*)?$")]
    pub expand: Option<String>,
}

fn expand_objects(q: &ExpandQuery) -> Result<bool, ApiError> {
    match q.expand.as_deref() {
        None | Some("") => Ok(false),
        Some(v) if v.split(',').all(|p| p.trim() == "objects") => Ok(true),
        Some(_) => Err(ApiError::invalid_field(
            "expand",
            "only `objects` is supported",
        )),
    }
}

/// The export module's view of the caller's role: it decides which objects an import may write
/// and which secrets an export carries. Viewers never get here (`RequireOperator`).
fn privilege(caller: &Option<Extension<Caller>>) -> Result<Privilege, ApiError> {
    match caller.as_ref().map(|c| c.0.role) {
        Some(Role::Admin) => Ok(Privilege::Admin),
        Some(Role::Operator) => Ok(Privilege::Operator),
        Some(role @ Role::Viewer) => Err(ApiError::forbidden(format!(
            "role {role} may not do this; operator or admin required"
        ))),
        None => Err(ApiError::unauthenticated(false)),
    }
}

fn accepted(job: &JobRecord, kind: &str) -> Response {
    let mut resp = (StatusCode::ACCEPTED, Json(job.view(false))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/api/v1/{kind}/{}", job.id)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Start an export job (operator).
///
/// Answers at once with the job (IN_PROGRESS); poll `GET /api/v1/export/{id}` until
/// SUCCESSFUL, then download `…/package`. Secrets are only ever in the package encrypted with
/// `secrets_key`, and only those the caller may read: an operator's export carries device
/// secrets but no product secrets (log line `FGX_006`).
#[utoipa::path(
    post,
    path = "/api/v1/export",
    tag = "export",
    request_body = ExportRequest,
    responses(
        (status = 202, description = "Started", body = ExportJob),
        (status = 400, description = "Unknown object ids (named), missing secrets_key, invalid field", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 413, description = "More than 1,000 objects (FG.1003)", body = ErrorBody),
        (status = 429, description = "Too many requests (Retry-After)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn start_export(
    _operator: RequireOperator,
    State(state): State<ApiState>,
    caller: Option<Extension<Caller>>,
    body: Result<ApiJson<ExportRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let svc = &state.export;
    // Before the body's own errors: a caller over its limit hears so first.
    svc.limiter().check_start().map_err(too_many)?;
    let ApiJson(req) = body?;
    let by = privilege(&caller)?;
    let job = svc.start_export(req, by).await?;
    Ok(accepted(&job, "export"))
}

async fn get_job(
    state: &ApiState,
    kind: JobKind,
    id: &str,
    q: &ExpandQuery,
) -> Result<Response, ApiError> {
    let svc = &state.export;
    svc.limiter().check_read().map_err(too_many)?;
    let expand = expand_objects(q)?;
    let job = svc.get(kind, id)?;
    Ok(Json(job.view(expand)).into_response())
}

async fn get_log(state: &ApiState, kind: JobKind, id: &str) -> Result<Response, ApiError> {
    let svc = &state.export;
    svc.limiter().check_read().map_err(too_many)?;
    let job = svc.get(kind, id)?;
    let mut text = String::new();
    for line in &job.log {
        text.push_str(&line.render());
        text.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// An export job's status (`?expand=objects` adds per-object status).
#[utoipa::path(
    get,
    path = "/api/v1/export/{id}",
    tag = "export",
    params(("id" = String, Path, description = "Export job id"), ExpandQuery),
    responses(
        (status = 200, description = "The job", body = ExportJob),
        (status = 404, description = "No such export (FG.4001)", body = ErrorBody),
        (status = 429, description = "Too many requests", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_export(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ExpandQuery>,
) -> Result<Response, ApiError> {
    get_job(&state, JobKind::Export, &id, &q).await
}

/// An export job's log (text/plain, one `> CODE LEVEL TIME message` line per event).
#[utoipa::path(
    get,
    path = "/api/v1/export/{id}/log",
    tag = "export",
    params(("id" = String, Path, description = "Export job id")),
    responses(
        (status = 200, description = "The log", body = String, content_type = "text/plain"),
        (status = 404, description = "No such export (FG.4001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn export_log(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    get_log(&state, JobKind::Export, &id).await
}

/// Download an export's package (application/zip; operator: it holds encrypted secrets).
#[utoipa::path(
    get,
    path = "/api/v1/export/{id}/package",
    tag = "export",
    params(("id" = String, Path, description = "Export job id")),
    responses(
        (status = 200, description = "The ZIP package", content_type = "application/zip"),
        (status = 404, description = "No such export (FG.4001)", body = ErrorBody),
        (status = 409, description = "Not ready: IN_PROGRESS or FAILED (FG.4003)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn export_package(
    _operator: RequireOperator,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let svc = &state.export;
    svc.limiter().check_read().map_err(too_many)?;
    // Cluster mode: fetched from the shared copy first when this node does not have it.
    let path = svc.package_file_ready(&id).await?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::internal(format!("package {} unreadable: {e}", path.display())))?;
    let len = file.metadata().await.map(|m| m.len()).ok();
    let stream = tokio_util_stream(file);
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zip"),
    );
    if let Some(len) = len {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{id}.zip\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// The file as a stream of chunks (no extra dependency for `ReaderStream`).
fn tokio_util_stream(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> {
    futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    })
}

/// The multipart form of `POST /api/v1/import`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct ImportForm {
    /// The ZIP from `GET /api/v1/export/{id}/package`.
    #[schema(value_type = String, format = Binary)]
    pub package: Vec<u8>,
    /// The passphrase the export used (required when the package holds secrets).
    pub secrets_key: Option<String>,
    /// `skip` (default), `overwrite` or `fail`.
    #[schema(value_type = Option<ConflictPolicy>)]
    pub conflict_policy: Option<String>,
    /// Default `import-<millis>` (also when blank); at most 128 characters, no control
    /// characters.
    #[schema(max_length = 128, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub name: Option<String>,
}

/// The form's 413 names the package: the route's body limit is `export.max_package_bytes`.
impl MultipartForm for ImportForm {
    fn too_large() -> ApiError {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            "the package is larger than export.max_package_bytes",
        )
        .with_field("package")
    }
}

/// Start an import job (operator).
///
/// The package is verified completely first (ZIP, manifest MAC, every checksum, every secret
/// with `secrets_key`), inflating no file past its listed size and no more than the
/// `export.max_unpacked_*` limits; a damaged, tampered or wrongly keyed package is refused
/// with 400, one unpacking past a limit with 413, and nothing changes. So is, with 403, a
/// package that would create objects the caller's role may not create through the API (for an
/// operator: products not on this gateway). Then the job runs asynchronously; poll
/// `GET /api/v1/import/{id}`. Devices the import disables, re-keys or moves are disconnected.
#[utoipa::path(
    post,
    path = "/api/v1/import",
    tag = "export",
    request_body(content = ImportForm, content_type = "multipart/form-data"),
    responses(
        (status = 202, description = "Verified and started", body = ExportJob),
        (status = 400, description = "Damaged/tampered package (FG.4004), wrong key (FG.4005), missing field", body = ErrorBody),
        (status = 403, description = "Not an operator, or the package would create objects the caller's role may not create (an operator: products); the message names them and nothing is imported", body = ErrorBody),
        (status = 413, description = "Package larger than export.max_package_bytes (FG.0413), or unpacking to more than export.max_unpacked_entry_bytes / max_unpacked_bytes (FG.4006)", body = ErrorBody),
        (status = 429, description = "Too many requests or too many bytes in flight (Retry-After)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn start_import(
    _operator: RequireOperator,
    State(state): State<ApiState>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    multipart: Result<ApiMultipart<ImportForm>, ApiError>,
) -> Result<Response, ApiError> {
    let svc = &state.export;
    svc.limiter().check_start().map_err(too_many)?;
    // A body announcing more than the gateway may hold in flight is refused before it is read.
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = announced {
        if len > svc.settings().max_bytes_in_flight {
            return Err(too_many(Limited {
                retry_after: std::time::Duration::from_secs(5),
                reason: format!(
                    "too many requests: a {len}-byte package is more than the {} bytes export/import may hold in flight",
                    svc.settings().max_bytes_in_flight
                ),
            }));
        }
    }
    let mut multipart = multipart?;
    let ImportFields {
        package,
        key,
        policy,
        name,
    } = read_import_form(&mut multipart, svc.settings().max_package_bytes).await?;
    let package = package
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::missing_field("package"))?;
    let by = privilege(&caller)?;
    let job = svc.start_import(package, key, policy, name, by).await?;
    Ok(accepted(&job, "import"))
}

/// The import form's fields as read.
struct ImportFields {
    package: Option<Vec<u8>>,
    key: Option<String>,
    policy: ConflictPolicy,
    name: Option<String>,
}

/// Reads the import form: `package` up to `max` bytes, the short text fields up to 4 KiB.
/// `Err`: the answer to a malformed, oversized or unknown field.
async fn read_import_form(
    multipart: &mut ApiMultipart<ImportForm>,
    max: u64,
) -> Result<ImportFields, ApiError> {
    let mut package: Option<Vec<u8>> = None;
    let mut key = None;
    let mut policy = ConflictPolicy::Skip;
    let mut name = None;
    while let Some(part) = multipart.next_part().await? {
        let field_name = part.name().to_owned();
        let buf = if field_name == "package" {
            part.bytes_up_to(max, |_| {
                ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("the package is larger than export.max_package_bytes ({max})"),
                )
                .with_field("package")
            })
            .await?
        } else {
            part.bytes_up_to(4096, |name| ApiError::invalid_field(name, "too long"))
                .await?
        };
        let text = || String::from_utf8(buf.clone()).map(|s| s.trim().to_owned());
        match field_name.as_str() {
            "package" => package = Some(buf),
            "secrets_key" => match text() {
                Ok(k) if !k.is_empty() => key = Some(k),
                Ok(_) => {}
                Err(_) => return Err(ApiError::invalid_field("secrets_key", "not UTF-8")),
            },
            "conflict_policy" => match text().ok().as_deref().and_then(ConflictPolicy::parse) {
                Some(p) => policy = p,
                None => {
                    return Err(ApiError::invalid_field(
                        "conflict_policy",
                        "must be skip, overwrite or fail",
                    ))
                }
            },
            "name" => name = text().ok(),
            other => {
                return Err(ApiError::invalid_field(
                    other.to_owned(),
                    "unknown form field",
                ))
            }
        }
    }
    Ok(ImportFields {
        package,
        key,
        policy,
        name,
    })
}

/// An import job with per-object results (`?expand=objects`).
#[utoipa::path(
    get,
    path = "/api/v1/import/{id}",
    tag = "export",
    params(("id" = String, Path, description = "Import job id"), ExpandQuery),
    responses(
        (status = 200, description = "The job", body = ExportJob),
        (status = 404, description = "No such import (FG.4002)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_import(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ExpandQuery>,
) -> Result<Response, ApiError> {
    get_job(&state, JobKind::Import, &id, &q).await
}

/// An import job's log (text/plain).
#[utoipa::path(
    get,
    path = "/api/v1/import/{id}/log",
    tag = "export",
    params(("id" = String, Path, description = "Import job id")),
    responses(
        (status = 200, description = "The log", body = String, content_type = "text/plain"),
        (status = 404, description = "No such import (FG.4002)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn import_log(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    get_log(&state, JobKind::Import, &id).await
}
