//! `POST /api/v1/ota/jobs`: a job from a JSON body or a multipart form (with an uploaded device
//! list), and the hand-written schema of that request.

use crate::api::auth::RequireOperator;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::extract::{
    is_json, media_type, parse_json, read_body, ApiMultipart, MultipartForm,
};
use crate::api::ApiState;
use crate::ota::model::{JobSpec, JobView, TargetKind, MAX_DEVICE_NAMES, MAX_VERIFY_DEVICES};
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use utoipa::openapi::schema::{Object, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

/// Device names from an uploaded list: one per line or CSV with a `DeviceName` column
/// (header optional); blank lines ignored.
pub(in crate::api) fn parse_device_list(text: &str) -> Result<Vec<String>, ApiError> {
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

/// Parts of the multipart form of `POST /api/v1/ota/jobs` (documentation, and how the form's
/// failures read: [`MultipartForm`]).
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

/// One variant of [`JobRequest`]: (target, job_type values, selection values, required
/// fields, the target-specific fields it takes).
type Shape = (
    &'static str,
    &'static [&'static str],
    Option<&'static [&'static str]>,
    &'static [&'static str],
    &'static [&'static str],
);

const SHAPES: [Shape; 5] = [
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

impl utoipa::PartialSchema for JobRequest {
    fn schema() -> RefOr<Schema> {
        let RefOr::T(Schema::Object(base)) = <JobSpec as utoipa::PartialSchema>::schema() else {
            return <JobSpec as utoipa::PartialSchema>::schema();
        };
        let mut one_of = OneOfBuilder::new().description(Some(
            "A job: the fields a `target` takes depend on it (see the variants); \
             `finish_by_ms` is in the future and after `start_at_ms`; \
             `retry_interval_seconds` is required with a `retry_count` above 0; \
             `rate.ramp.max_per_minute` is at least `rate.per_minute`.",
        ));
        for shape in SHAPES {
            one_of = one_of.item(variant(&base, shape));
        }
        RefOr::T(Schema::OneOf(one_of.build()))
    }
}

/// [`JobSpec`]'s schema narrowed to one [`Shape`].
fn variant(base: &Object, (target, job_types, selections, required, takes): Shape) -> Object {
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
    o
}

/// A string that is one of `values`.
fn strings(values: &[&str]) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values.iter().copied()))
        .into()
}

/// A list of 1..=`max` device names.
fn names(max: usize) -> RefOr<Schema> {
    let mut list = crate::schema::string_list(
        "The devices, each named once, 1..=64 characters.",
        false,
        max,
        crate::schema::text(1, 64, None),
        true,
    );
    list.min_items = Some(1);
    list.into()
}

impl ToSchema for JobRequest {}

/// The form's failures: 413 when the body went over the route's limit, 400 (FG.1004 naming
/// where) otherwise — also for a `multipart/form-data` body without a boundary.
impl MultipartForm for JobUploadForm {
    fn not_multipart(rejection: &MultipartRejection) -> ApiError {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large()
        } else {
            ApiError::malformed(format!("multipart body: {}", rejection.body_text()))
        }
    }

    fn malformed(part: Option<&str>, error: &MultipartError) -> ApiError {
        match part {
            Some(name) => ApiError::malformed(format!("multipart part {name}: {error}")),
            None => ApiError::malformed(format!("multipart body: {error}")),
        }
    }
}

async fn spec_from_multipart(req: Request, state: &ApiState) -> Result<JobSpec, ApiError> {
    let mut form = ApiMultipart::<JobUploadForm>::from_request(req, state).await?;
    let mut spec: Option<JobSpec> = None;
    let mut names: Option<Vec<String>> = None;
    while let Some(part) = form.next_part().await? {
        let name = part.name().to_owned();
        let bytes = part.bytes().await?;
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
