//! `/api/v1/firmware` (upload, list, get, signed link) and the device-facing
//! `/firmware/{fid}/download`.
//!
//! - Upload is `multipart/form-data`; the `file` part is streamed to disk through
//!   [`FirmwareRepo::begin_upload`] (hashing as it goes), never held in memory. The route has its
//!   own body limit of `max_size` plus room for the text parts; the repository enforces
//!   `max_size` on the file itself (413 `FG.3002`, nothing left on disk).
//! - The download route sits outside the bearer-auth layer: devices present the signed
//!   `expires`/`token` query instead. A bad, missing or expired token is a 403 with the
//!   standard error body and none of the file's bytes; the token is checked before the
//!   package is looked up, so an unsigned request cannot probe which ids exist. Bytes are served
//!   by tower-http's `ServeFile` (single `Range`s → 206 with `Content-Range`; unsatisfiable →
//!   416), with `ETag: "{sha256}"` and `If-None-Match`/`If-Range` handled here. A `Range` with
//!   several ranges is answered with the whole file (200), which RFC 9110 allows; so is one
//!   whose unit is not `bytes` (`items=0-10`), which RFC 9110 §14.2 requires. The unit is
//!   matched case-insensitively (`Bytes=0-9` is a byte range).
//! - Deleting a package needs to know whether an unfinished job uses it; that route lives with
//!   the jobs API (`api::ota`), which calls [`FirmwareRepo::delete`].

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fleetgate_topics::FirmwareSignMethod;
use serde::{Deserialize, Serialize};
use tower_http::services::ServeFile;
use utoipa::{IntoParams, ToSchema};

use super::auth::RequireOperator;
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ApiMultipart, ApiPath, ApiQuery, MultipartForm};
use super::{ApiState, ItemsPage};
use crate::ota::firmware::{FirmwareError, FirmwarePackage, NewFirmware, MAX_SRC_VERSIONS};
use crate::registry::Page;
use axum::extract::DefaultBodyLimit;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use super::RouteLimits;

/// The signed download (`/firmware/{fid}/download`): devices present the link, not a token.
pub(super) fn public_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::default().routes(routes!(download_firmware))
}

/// The firmware package routes that need a token (the signed download is [`public_routes`]).
pub(super) fn routes(limits: &RouteLimits) -> OpenApiRouter<ApiState> {
    OpenApiRouter::default()
        .routes(routes!(upload_firmware).layer(DefaultBodyLimit::max(limits.upload)))
        .routes(routes!(list_firmware))
        .routes(routes!(get_firmware))
        .routes(routes!(get_download_url))
}

/// Room for the text parts and multipart framing on top of the package size limit.
pub const UPLOAD_OVERHEAD_BYTES: u64 = 1024 * 1024;
/// Longest text part accepted (a description is at most 1024 characters).
const MAX_TEXT_PART: usize = 8 * 1024;
/// Link lifetime of `GET /api/v1/firmware/{fid}/download-url` when none is asked for.
const DEFAULT_LINK_TTL_SECS: u64 = 3600;
/// Longest link lifetime an operator may ask for: 7 days.
const MAX_LINK_TTL_SECS: u64 = 7 * 24 * 3600;

impl From<FirmwareError> for ApiError {
    fn from(e: FirmwareError) -> Self {
        match e {
            FirmwareError::NotFound(id) => ApiError::new(
                ErrorCode::FirmwareNotFound,
                format!("firmware {id} not found"),
            ),
            e @ FirmwareError::AlreadyExists { .. } => {
                ApiError::new(ErrorCode::FirmwareExists, e.to_string())
            }
            FirmwareError::Invalid { field, message } => ApiError::invalid_field(field, message),
            e @ FirmwareError::TooLarge { .. } => {
                ApiError::new(ErrorCode::FirmwareTooLarge, e.to_string()).with_field("file")
            }
            e @ FirmwareError::InUse(_) => ApiError::new(ErrorCode::FirmwareInUse, e.to_string()),
            FirmwareError::Store(ref store) => ApiError::store(store, &e),
            e @ (FirmwareError::Blob(_)
            | FirmwareError::Setup { .. }
            | FirmwareError::Corrupt { .. }) => ApiError::internal(e),
        }
    }
}

/// The parts of `POST /api/v1/firmware` (documentation, and how the form's failures read:
/// [`MultipartForm`]; the handler streams the parts).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct FirmwareUploadForm {
    /// The package bytes (exactly one part, at most the configured `ota.max_firmware_bytes`).
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// An existing product's key.
    #[schema(min_length = 1, max_length = 32, pattern = "^[A-Za-z0-9]{1,32}$")]
    product_key: String,
    /// 1..=64 printable ASCII characters, no spaces at either end.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[!-~]([ -~]{0,62}[!-~])?$"
    )]
    version: String,
    /// `[A-Za-z0-9_.-]{1,64}`; `default` when absent or empty.
    #[schema(max_length = 64, pattern = "^[A-Za-z0-9_.-]{0,64}$")]
    module: Option<String>,
    /// Display name, at most 64 characters, not blank, no control characters; the version
    /// when absent or empty.
    #[schema(
        max_length = 64,
        pattern = "^([^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*)?$"
    )]
    name: Option<String>,
    /// `SHA256` (default) or `Md5`, case-insensitive: which digest devices get as `sign`.
    #[schema(pattern = "^ *([Ss][Hh][Aa]256|[Mm][Dd]5) *$")]
    sign_method: Option<String>,
    /// Versions this package upgrades from (≤10, each like `version`, not the package's own):
    /// a comma list, or the part repeated.
    #[schema(max_length = 8192)]
    src_versions: Option<String>,
    /// At most 1024 characters.
    #[schema(max_length = 1024)]
    description: Option<String>,
}

/// The text parts collected so far.
#[derive(Default)]
struct Form {
    product_key: Option<String>,
    version: Option<String>,
    module: Option<String>,
    name: Option<String>,
    sign_method: Option<FirmwareSignMethod>,
    src_versions: Vec<String>,
    description: Option<String>,
}

impl Form {
    fn set(slot: &mut Option<String>, field: &str, value: String) -> Result<(), ApiError> {
        if slot.is_some() {
            return Err(ApiError::invalid_field(field, "given more than once"));
        }
        *slot = Some(value);
        Ok(())
    }

    fn accept(&mut self, field: &str, value: String) -> Result<(), ApiError> {
        match field {
            "product_key" => Self::set(&mut self.product_key, field, value),
            "version" => Self::set(&mut self.version, field, value),
            "module" => Self::set(&mut self.module, field, value),
            "name" => Self::set(&mut self.name, field, value),
            "description" => Self::set(&mut self.description, field, value),
            "sign_method" => {
                if self.sign_method.is_some() {
                    return Err(ApiError::invalid_field(field, "given more than once"));
                }
                let m = value
                    .trim()
                    .parse()
                    .map_err(|_| ApiError::invalid_field(field, "must be SHA256 or Md5"))?;
                self.sign_method = Some(m);
                Ok(())
            }
            "src_versions" => {
                self.src_versions.extend(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|v| !v.is_empty())
                        .map(str::to_owned),
                );
                if self.src_versions.len() > MAX_SRC_VERSIONS {
                    return Err(ApiError::invalid_field(
                        field,
                        format!("at most {MAX_SRC_VERSIONS} versions"),
                    ));
                }
                Ok(())
            }
            other => Err(ApiError::invalid_field(other, "unknown field")),
        }
    }

    /// The package description; `None` while a required part is still missing.
    fn to_new(&self) -> Option<NewFirmware> {
        Some(NewFirmware {
            product_key: self.product_key.clone()?,
            version: self.version.clone()?,
            module: self.module.clone(),
            name: self.name.clone(),
            sign_method: self.sign_method,
            src_versions: self.src_versions.clone(),
            description: self.description.clone(),
        })
    }

    fn finish(&self) -> Result<NewFirmware, ApiError> {
        if self.product_key.is_none() {
            return Err(ApiError::missing_field("product_key"));
        }
        self.to_new()
            .ok_or_else(|| ApiError::missing_field("version"))
    }
}

/// The form's 413 names the package: the route's body limit is `ota.max_firmware_bytes`.
impl MultipartForm for FirmwareUploadForm {
    fn too_large() -> ApiError {
        ApiError::new(ErrorCode::FirmwareTooLarge, "the upload is too large").with_field("file")
    }
}

/// Checks what is already known before the bytes arrive, so a wrong product or field fails
/// before a large upload is streamed. The identity (409) is checked once every part is in,
/// since `module` may still follow.
fn precheck(state: &ApiState, form: &Form) -> Result<(), ApiError> {
    if let Some(pk) = &form.product_key {
        state.registry.get_product(pk)?;
    }
    if let Some(new) = form.to_new() {
        if let Err(e @ FirmwareError::Invalid { .. }) = state.firmware.validate(&new) {
            return Err(e.into());
        }
    }
    Ok(())
}

/// Upload a firmware package (operator).
///
/// `multipart/form-data` with a `file` part and the text parts below, in any order (putting
/// `file` last lets a bad field fail before the bytes are sent). The response carries the
/// digests computed while the bytes were stored.
#[utoipa::path(
    post,
    path = "/api/v1/firmware",
    tag = "firmware",
    request_body(content = FirmwareUploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "Stored", body = FirmwarePackage),
        (status = 400, description = "Invalid or missing field, or not multipart (FG.1001/FG.1002/FG.1004)", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 404, description = "No such product (FG.2002)", body = ErrorBody),
        (status = 409, description = "This product already has this module version (FG.3003)", body = ErrorBody),
        (status = 413, description = "Package larger than ota.max_firmware_bytes (FG.3002)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn upload_firmware(
    _operator: RequireOperator,
    State(state): State<ApiState>,
    mut multipart: ApiMultipart<FirmwareUploadForm>,
) -> Result<(StatusCode, Json<FirmwarePackage>), ApiError> {
    let mut form = Form::default();
    let mut staged = None;
    while let Some(mut part) = multipart.next_part().await? {
        if part.name() != "file" {
            let name = part.name().to_owned();
            let value = part
                .text_up_to(MAX_TEXT_PART as u64, |name| {
                    ApiError::invalid_field(name, format!("longer than {MAX_TEXT_PART} bytes"))
                })
                .await?;
            form.accept(&name, value)?;
            continue;
        }
        if staged.is_some() {
            return Err(ApiError::invalid_field("file", "given more than once"));
        }
        precheck(&state, &form)?;
        let mut writer = state.firmware.begin_upload().await?;
        while let Some(chunk) = part.chunk().await? {
            writer.write(&chunk).await.map_err(FirmwareError::from)?;
        }
        if writer.size() == 0 {
            return Err(ApiError::invalid_field("file", "is empty"));
        }
        staged = Some(writer.finish().await.map_err(FirmwareError::from)?);
    }
    let new = form.finish()?;
    let staged = staged.ok_or_else(|| ApiError::missing_field("file"))?;
    state.registry.get_product(&new.product_key)?;
    state.firmware.validate(&new)?;
    let package = state.firmware.create(new, staged).await?;
    Ok((StatusCode::CREATED, Json(package)))
}

/// `?product_key&page&page_size` of the firmware list.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FirmwareListQuery {
    /// Only packages of this product.
    pub product_key: Option<String>,
    /// 1-based page number (default 1).
    pub page: Option<u32>,
    /// Items per page, 1..=100 (default 20).
    pub page_size: Option<u32>,
}

/// List firmware packages, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/firmware",
    tag = "firmware",
    params(FirmwareListQuery),
    responses(
        (status = 200, description = "One page of packages", body = ItemsPage<FirmwarePackage>),
        (status = 400, description = "Invalid page or page_size", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_firmware(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<FirmwareListQuery>,
) -> Result<Json<ItemsPage<FirmwarePackage>>, ApiError> {
    let page = Page::new(
        q.page.unwrap_or(1),
        q.page_size.unwrap_or(Page::default().page_size),
    )?;
    let paged = state.firmware.list(q.product_key.as_deref(), page);
    Ok(Json(ItemsPage::from_paged(paged, |p| p)))
}

/// Get one firmware package.
#[utoipa::path(
    get,
    path = "/api/v1/firmware/{fid}",
    tag = "firmware",
    params(("fid" = String, Path, description = "Firmware id")),
    responses(
        (status = 200, description = "The package", body = FirmwarePackage),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such firmware (FG.3001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_firmware(
    State(state): State<ApiState>,
    ApiPath(fid): ApiPath<String>,
) -> Result<Json<FirmwarePackage>, ApiError> {
    state
        .firmware
        .get(&fid)
        .map(Json)
        .ok_or_else(|| FirmwareError::NotFound(fid).into())
}

/// `?ttl_secs` of a signed link.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DownloadUrlQuery {
    /// Link lifetime in seconds, 1..=604800 (default 3600).
    #[param(minimum = 1, maximum = 604800)]
    pub ttl_secs: Option<u64>,
}

/// A signed download link.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DownloadUrl {
    /// `{public_url}/firmware/{fid}/download?expires={unix s}&token={hex}`.
    pub url: String,
    /// Unix seconds after which the link is refused.
    pub expires: u64,
}

/// Mint a signed download link (the same kind devices get in upgrade pushes), e.g. to test a
/// package with curl.
#[utoipa::path(
    get,
    path = "/api/v1/firmware/{fid}/download-url",
    tag = "firmware",
    params(("fid" = String, Path, description = "Firmware id"), DownloadUrlQuery),
    responses(
        (status = 200, description = "A signed link", body = DownloadUrl),
        (status = 400, description = "Invalid ttl_secs", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such firmware (FG.3001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_download_url(
    State(state): State<ApiState>,
    ApiPath(fid): ApiPath<String>,
    ApiQuery(q): ApiQuery<DownloadUrlQuery>,
) -> Result<Json<DownloadUrl>, ApiError> {
    let ttl = q.ttl_secs.unwrap_or(DEFAULT_LINK_TTL_SECS);
    if !(1..=MAX_LINK_TTL_SECS).contains(&ttl) {
        return Err(ApiError::invalid_field(
            "ttl_secs",
            format!("must be between 1 and {MAX_LINK_TTL_SECS}"),
        ));
    }
    let (url, expires) = state
        .firmware
        .download_link(&fid, Duration::from_secs(ttl))
        .ok_or(FirmwareError::NotFound(fid))?;
    Ok(Json(DownloadUrl { url, expires }))
}

/// Query of the device-facing download (documentation; the handler reads the raw query so a
/// malformed one is a 403 like any other bad link).
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct DownloadQuery {
    /// Unix seconds the link is valid until.
    expires: u64,
    /// Hex HMAC-SHA256 of `"{fid}\n{expires}"` under the gateway's download key.
    #[param(pattern = "^[0-9A-Fa-f]{64}$")]
    token: String,
}

fn strong_etag(sha256: &str) -> String {
    format!("\"{sha256}\"")
}

/// Whether an `If-None-Match` list names `etag` (weak comparison, `*` matches).
fn none_match_hits(value: &str, etag: &str) -> bool {
    value
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

/// `value` as tower-http understands a byte range (`bytes=…`, unit in lower case), or `None`
/// when its unit is not `bytes` (RFC 9110 §14.2: an unknown unit is ignored). Only the unit is
/// looked at: a malformed `bytes=` range stays as it is and gets 416.
fn byte_range(value: &str) -> Option<String> {
    let (unit, ranges) = value.split_once('=')?;
    unit.eq_ignore_ascii_case("bytes")
        .then(|| format!("bytes={ranges}"))
}

/// Download a firmware package with a signed link (devices; no bearer token).
#[utoipa::path(
    get,
    path = "/firmware/{fid}/download",
    tag = "firmware",
    params(("fid" = String, Path, description = "Firmware id"), DownloadQuery),
    responses(
        (status = 200, description = "The whole package (`Accept-Ranges: bytes`, `ETag: \"{sha256}\"`); also for a `Range` with several ranges or a unit other than `bytes`, which is ignored", content_type = "application/octet-stream"),
        (status = 206, description = "One byte range (`Content-Range`)", content_type = "application/octet-stream"),
        (status = 304, description = "If-None-Match matched the ETag"),
        (status = 403, description = "Missing, tampered or expired link (FG.3004); no bytes", body = ErrorBody),
        (status = 404, description = "No such firmware (FG.3001)", body = ErrorBody),
        (status = 416, description = "Range not satisfiable (FG.0416, `Content-Range: bytes */{size}`)", body = ErrorBody),
    )
)]
pub async fn download_firmware(
    State(state): State<ApiState>,
    ApiPath(fid): ApiPath<String>,
    RawQuery(query): RawQuery,
    mut req: Request,
) -> Response {
    let params: HashMap<String, String> =
        form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    if let Err(why) = state.firmware.verify_download(
        &fid,
        params.get("expires").map(String::as_str),
        params.get("token").map(String::as_str),
    ) {
        tracing::info!(firmware_id = %fid, reason = %why, "download refused");
        return ApiError::new(
            ErrorCode::DownloadForbidden,
            format!("download link refused: {why}"),
        )
        .into_response();
    }
    let package = match state.firmware.download_package(&fid).await {
        Ok(Some(package)) => package,
        Ok(None) => return ApiError::from(FirmwareError::NotFound(fid)).into_response(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let etag = strong_etag(&package.sha256);
    let headers = req.headers_mut();
    if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        if none_match_hits(inm, &etag) {
            return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag.as_str())]).into_response();
        }
    }
    normalise_range(headers, &etag);

    // Cluster mode: fetched from the shared copy first when this node has not cached it.
    let path = match state.firmware.local_blob(&package).await {
        Ok(path) => path,
        Err(e) => {
            tracing::error!(firmware_id = %package.firmware_id, sha256 = %package.sha256, error = %e, "firmware bytes unavailable");
            return ApiError::from(e).into_response();
        }
    };
    let resp = match ServeFile::new(&path).try_call(req).await {
        Ok(resp) => resp.map(Body::new),
        Err(e) => {
            return ApiError::internal(format!("cannot read {}: {e}", path.display()))
                .into_response()
        }
    };
    answer_download(resp, &package, &path, &etag)
}

/// The request's range headers as the file service must see them: a range whose `If-Range`
/// validator differs, several ranges, or anything but bytes is dropped (the whole file
/// follows); a byte range is normalised; no content negotiation.
fn normalise_range(headers: &mut HeaderMap, etag: &str) {
    // A resumed download whose validator no longer matches must restart from byte 0; blobs
    // never change, so only a foreign or date validator gets here. Several ranges are answered
    // with the whole file rather than a multipart body.
    let if_range_differs = headers
        .get(header::IF_RANGE)
        .is_some_and(|v| v.as_bytes() != etag.as_bytes());
    let multi_range = headers
        .get(header::RANGE)
        .is_some_and(|v| v.as_bytes().contains(&b','));
    if if_range_differs || multi_range {
        headers.remove(header::RANGE);
    }
    // Only byte ranges are understood; tower-http answers anything else with 416.
    if let Some(value) = headers.get(header::RANGE) {
        match value.to_str().ok().and_then(byte_range) {
            None => {
                headers.remove(header::RANGE);
            }
            Some(normalised) if normalised.as_bytes() != value.as_bytes() => {
                match HeaderValue::from_str(&normalised) {
                    Ok(v) => headers.insert(header::RANGE, v),
                    Err(_) => headers.remove(header::RANGE),
                };
            }
            Some(_) => {}
        }
    }
    // Content negotiation must not pick a precompressed variant or a different body.
    headers.remove(header::ACCEPT_ENCODING);
}

/// The file service's answer as the API gives it: its 416 and 404 as API errors, else the
/// bytes as `application/octet-stream` with the package's strong ETag.
fn answer_download(
    resp: Response,
    package: &FirmwarePackage,
    path: &std::path::Path,
    etag: &str,
) -> Response {
    let (mut parts, body) = resp.into_parts();
    match parts.status {
        StatusCode::RANGE_NOT_SATISFIABLE => {
            let mut err = ApiError::new(
                ErrorCode::RangeNotSatisfiable,
                format!("range not satisfiable for {} bytes", package.size),
            )
            .into_response();
            if let Some(cr) = parts.headers.get(header::CONTENT_RANGE) {
                err.headers_mut().insert(header::CONTENT_RANGE, cr.clone());
            }
            err
        }
        StatusCode::NOT_FOUND => {
            // The metadata exists but the bytes do not: an operator removed the file.
            ApiError::internal(format!("firmware blob {} is missing", path.display()))
                .into_response()
        }
        _ => {
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            if let Ok(v) = HeaderValue::from_str(etag) {
                parts.headers.insert(header::ETAG, v);
            }
            Response::from_parts(parts, body)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::byte_range;

    #[test]
    fn only_byte_ranges_are_kept() {
        let table = [
            ("bytes=0-10", Some("bytes=0-10")),
            ("bytes=-500", Some("bytes=-500")),
            ("Bytes=0-10", Some("bytes=0-10")),
            ("BYTES=5-", Some("bytes=5-")),
            // Malformed byte ranges are still byte ranges: 416, not ignored.
            ("bytes=abc", Some("bytes=abc")),
            ("items=0-10", None),
            ("pages=1-2", None),
            ("bytes0-10", None),
            ("", None),
            (" bytes=0-10", None),
        ];
        for (value, want) in table {
            assert_eq!(byte_range(value).as_deref(), want, "{value:?}");
        }
    }
}
