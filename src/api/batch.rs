//! `POST /api/v1/products/{pk}/devices/batch`: create up to 10,000 devices in one request.
//!
//! Accepts `application/json` — `{"devices":[{device_name, device_secret?, tags?}, …]}` or the
//! bare list — or `text/csv` with a header line `DeviceName[,DeviceSecret]` (case-insensitive,
//! a UTF-8 BOM is tolerated, blank rows are skipped). The JSON shape is checked strictly (a bad
//! row fails the whole request with the field named, e.g. `devices[3].device_name`); rows that
//! are well-formed but refused (bad name, duplicate, CSV row with extra columns) fail one by one
//! and are reported per row with a code from the error table, next to the created rows and
//! their secrets. `row` is the 1-based position among the data rows (CSV: not counting the
//! header). More than 10,000 rows → 413 `FG.1003` and nothing is created.

use axum::extract::{Request, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::auth::RequireOperator;
use super::devices::CreateDeviceRequest;
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{from_value, is_json, media_type, parse_json, read_body, ApiPath};
use super::ApiState;
use crate::registry::{NewDevice, RowResult};
use axum::extract::DefaultBodyLimit;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use super::RouteLimits;

/// `POST /api/v1/products/{pk}/devices/batch`.
pub(super) fn routes(limits: &RouteLimits) -> OpenApiRouter<ApiState> {
    OpenApiRouter::default()
        .routes(routes!(batch_create_devices).layer(DefaultBodyLimit::max(limits.batch)))
}

/// Most rows one batch request may carry (docs/DESIGN.md §7).
pub const MAX_BATCH_ROWS: usize = crate::registry::MAX_BATCH_ROWS;

/// The JSON object form of a batch request.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchCreateRequest {
    /// 1 to 10,000 devices.
    #[schema(min_items = 1, max_items = 10000)]
    pub devices: Vec<CreateDeviceRequest>,
}

/// Outcome of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RowStatus {
    Created,
    Failed,
}

/// One row of a batch response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BatchRowResult {
    /// 1-based position among the data rows.
    pub row: usize,
    pub device_name: String,
    pub status: RowStatus,
    /// The device's secret (created rows only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_secret: Option<String>,
    /// Failed rows only: a code from the error table, e.g. `FG.2103` (exists), `FG.1001`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_msg: Option<String>,
}

/// Response of a batch create: counts and one result per row, in row order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BatchCreateResponse {
    pub created: usize,
    pub failed: usize,
    pub results: Vec<BatchRowResult>,
}

/// A parsed input row: ready for the registry, or already refused here.
#[derive(Debug)]
pub(super) enum InputRow {
    Ready(NewDevice),
    Refused {
        device_name: String,
        error: ApiError,
    },
}

/// Create many devices from JSON or CSV; per-row results.
#[utoipa::path(
    post,
    path = "/api/v1/products/{pk}/devices/batch",
    tag = "devices",
    params(("pk" = String, Path, description = "Product key")),
    request_body(
        description = "`{\"devices\":[…]}` or a bare JSON list, or CSV with header `DeviceName[,DeviceSecret]`; at most 10,000 rows",
        content(
            (BatchCreateRequest = "application/json"),
            (String = "text/csv", example = "DeviceName,DeviceSecret\nsensor-0001,\nsensor-0002,9f0c…\n"),
        )
    ),
    responses(
        (status = 200, description = "Processed; see per-row results", body = BatchCreateResponse),
        (status = 400, description = "Malformed body, bad CSV header or invalid JSON row", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token", body = ErrorBody),
        (status = 404, description = "No such product (FG.2002)", body = ErrorBody),
        (status = 413, description = "More than 10,000 rows (FG.1003) or body too large", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn batch_create_devices(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath(pk): ApiPath<String>,
    req: Request,
) -> Result<Json<BatchCreateResponse>, ApiError> {
    let csv = matches!(
        media_type(req.headers()).as_str(),
        "text/csv" | "application/csv"
    );
    if !csv && !is_json(req.headers()) {
        return Err(ApiError::unsupported_media_type(
            "application/json or text/csv",
        ));
    }
    let body = read_body(req, &()).await?;
    let rows = if csv {
        parse_csv_rows(&body)?
    } else {
        parse_json_rows(&body)?
    };
    // A wrong product key is one 404, not ten thousand failed rows.
    state.registry.get_product(&pk)?;
    run_batch(&state, &pk, rows).await.map(Json)
}

async fn run_batch(
    state: &ApiState,
    pk: &str,
    rows: Vec<InputRow>,
) -> Result<BatchCreateResponse, ApiError> {
    let mut results: Vec<Option<BatchRowResult>> = Vec::with_capacity(rows.len());
    let mut ready = Vec::new();
    let mut ready_rows = Vec::new();
    for (i, row) in rows.into_iter().enumerate() {
        match row {
            InputRow::Ready(dev) => {
                ready_rows.push(i);
                ready.push(dev);
                results.push(None);
            }
            InputRow::Refused { device_name, error } => results.push(Some(failed_row(
                i + 1,
                device_name,
                error.code().as_str().to_owned(),
                error.message().to_owned(),
            ))),
        }
    }
    if !ready.is_empty() {
        let outcomes = state.registry.batch_create_devices(pk, ready).await?;
        if outcomes.len() != ready_rows.len() {
            return Err(ApiError::internal(format!(
                "registry returned {} results for {} rows",
                outcomes.len(),
                ready_rows.len()
            )));
        }
        for (outcome, i) in outcomes.into_iter().zip(ready_rows) {
            results[i] = Some(match outcome {
                RowResult::Created(d) => BatchRowResult {
                    row: i + 1,
                    device_name: d.device_name,
                    status: RowStatus::Created,
                    device_secret: Some(d.device_secret),
                    error_code: None,
                    error_msg: None,
                },
                RowResult::Failed {
                    device_name,
                    error_code,
                    message,
                    ..
                } => {
                    let code = api_code_for(&error_code);
                    let message = if code == ErrorCode::Internal {
                        // Same rule as for whole requests: log the detail, show nothing.
                        tracing::error!(row = i + 1, error = %message, "batch row failed internally");
                        "internal error".to_owned()
                    } else {
                        message
                    };
                    failed_row(i + 1, device_name, code.as_str().to_owned(), message)
                }
            });
        }
    }
    let results: Vec<BatchRowResult> = results.into_iter().flatten().collect();
    let created = results
        .iter()
        .filter(|r| r.status == RowStatus::Created)
        .count();
    Ok(BatchCreateResponse {
        created,
        failed: results.len() - created,
        results,
    })
}

fn failed_row(row: usize, device_name: String, code: String, msg: String) -> BatchRowResult {
    BatchRowResult {
        row,
        device_name,
        status: RowStatus::Failed,
        device_secret: None,
        error_code: Some(code),
        error_msg: Some(msg),
    }
}

/// Our table's code for a per-row registry error code (`RegistryError::code`), so clients
/// see one code space. Rows are devices of an existing product, so "exists" means the device.
fn api_code_for(registry_code: &str) -> ErrorCode {
    match registry_code {
        "FG.AlreadyExists" => ErrorCode::DeviceExists,
        "FG.NotFound" => ErrorCode::NotFound,
        "FG.InvalidParameter" => ErrorCode::InvalidField,
        "FG.Conflict" => ErrorCode::Conflict,
        "FG.TooMany" => ErrorCode::TooManyItems,
        "FG.InternalError" => ErrorCode::Internal,
        _ => ErrorCode::BadRequest,
    }
}

pub(super) fn parse_json_rows(body: &[u8]) -> Result<Vec<InputRow>, ApiError> {
    let value: Value = parse_json(body)?;
    // Check the count before typing every row: nothing beyond the limit is even looked at.
    let len = match &value {
        Value::Array(rows) => rows.len(),
        Value::Object(map) => match map.get("devices") {
            Some(Value::Array(rows)) => rows.len(),
            _ => 0,
        },
        _ => {
            return Err(ApiError::invalid_field(
                "body",
                r#"expected {"devices":[…]} or a JSON list of devices"#,
            ))
        }
    };
    if len > MAX_BATCH_ROWS {
        return Err(ApiError::too_many_items("devices", MAX_BATCH_ROWS));
    }
    let devices = match value {
        Value::Array(_) => from_value::<Vec<CreateDeviceRequest>>(value).map_err(|e| {
            // Name bare-list rows like the object form: `devices[3].device_name`.
            match e.field().map(str::to_owned) {
                Some(f) if f.starts_with('[') => reprefix(e, &f),
                _ => e,
            }
        })?,
        other => from_value::<BatchCreateRequest>(other)?.devices,
    };
    if devices.is_empty() {
        return Err(ApiError::invalid_field(
            "devices",
            "at least one device is required",
        ));
    }
    Ok(devices
        .into_iter()
        .map(|d| InputRow::Ready(d.into()))
        .collect())
}

fn reprefix(e: ApiError, field: &str) -> ApiError {
    let named = format!("devices{field}");
    match e.code() {
        ErrorCode::MissingField => ApiError::missing_field(named),
        _ => {
            let why = e
                .message()
                .strip_prefix(&format!("invalid {field}: "))
                .unwrap_or(e.message())
                .to_owned();
            ApiError::invalid_field(named, why)
        }
    }
}

pub(super) fn parse_csv_rows(body: &[u8]) -> Result<Vec<InputRow>, ApiError> {
    let (mut rdr, headers) = super::extract::csv_with_header(body)?;
    if headers.iter().all(|h| h.is_empty()) {
        return Err(ApiError::malformed(
            "empty CSV: expected a header line DeviceName[,DeviceSecret]",
        ));
    }
    let mut name_col = None;
    let mut secret_col = None;
    for (i, h) in headers.iter().enumerate() {
        let h = String::from_utf8_lossy(h);
        let slot = match h.to_ascii_lowercase().as_str() {
            "devicename" => &mut name_col,
            "devicesecret" => &mut secret_col,
            _ => {
                return Err(ApiError::invalid_field(
                    "csv header",
                    format!("unknown column {h:?}; expected DeviceName[,DeviceSecret]"),
                ))
            }
        };
        if slot.replace(i).is_some() {
            return Err(ApiError::invalid_field(
                "csv header",
                format!("column {h:?} appears twice"),
            ));
        }
    }
    let name_col = name_col.ok_or_else(|| ApiError::missing_field("DeviceName"))?;

    let mut rows = Vec::new();
    for record in rdr.byte_records() {
        let record = record.map_err(|e| ApiError::malformed(format!("malformed CSV: {e}")))?;
        // Spreadsheets export trailing blank rows as ",,"; they are not devices.
        if record.iter().all(|f| f.is_empty()) {
            continue;
        }
        if rows.len() == MAX_BATCH_ROWS {
            return Err(ApiError::too_many_items("devices", MAX_BATCH_ROWS));
        }
        let line = record.position().map_or(0, |p| p.line());
        let field = |col: usize| std::str::from_utf8(record.get(col).unwrap_or_default());
        let device_name = match field(name_col) {
            Ok(n) => n.to_owned(),
            Err(_) => {
                rows.push(InputRow::Refused {
                    device_name: String::from_utf8_lossy(record.get(name_col).unwrap_or_default())
                        .into_owned(),
                    error: ApiError::invalid_field(
                        "DeviceName",
                        format!("not UTF-8 (line {line})"),
                    ),
                });
                continue;
            }
        };
        if record.len() > headers.len() {
            rows.push(InputRow::Refused {
                device_name,
                error: ApiError::invalid_field(
                    "row",
                    format!(
                        "line {line} has {} columns, the header has {}",
                        record.len(),
                        headers.len()
                    ),
                ),
            });
            continue;
        }
        let secret = match secret_col.map(field) {
            None => None,
            Some(Ok("")) => None,
            Some(Ok(s)) => Some(s.to_owned()),
            Some(Err(_)) => {
                rows.push(InputRow::Refused {
                    device_name,
                    error: ApiError::invalid_field(
                        "DeviceSecret",
                        format!("not UTF-8 (line {line})"),
                    ),
                });
                continue;
            }
        };
        rows.push(InputRow::Ready(NewDevice {
            device_name,
            device_secret: secret,
            tags: Default::default(),
        }));
    }
    if rows.is_empty() {
        return Err(ApiError::invalid_field(
            "devices",
            "the CSV has no data rows",
        ));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(rows: &[InputRow]) -> Vec<String> {
        rows.iter()
            .map(|r| match r {
                InputRow::Ready(d) => d.device_name.clone(),
                InputRow::Refused { device_name, .. } => format!("!{device_name}"),
            })
            .collect()
    }

    #[test]
    fn csv_header_variants() {
        let rows =
            parse_csv_rows(b"\xEF\xBB\xBFdevicename , DeviceSecret\r\na,s1\r\nb,\r\n,\r\n\r\nc\n")
                .unwrap();
        assert_eq!(names(&rows), ["a", "b", "c"]);
        match &rows[0] {
            InputRow::Ready(d) => assert_eq!(d.device_secret.as_deref(), Some("s1")),
            other => panic!("{other:?}"),
        }
        match &rows[1] {
            InputRow::Ready(d) => assert_eq!(d.device_secret, None),
            other => panic!("{other:?}"),
        }
        let e = parse_csv_rows(b"DeviceSecret\nx\n").unwrap_err();
        assert_eq!(
            (e.code(), e.field()),
            (ErrorCode::MissingField, Some("DeviceName"))
        );
        let e = parse_csv_rows(b"DeviceName,Colour\nx,red\n").unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidField);
        assert!(e.message().contains("Colour"), "{e}");
        let e = parse_csv_rows(b"").unwrap_err();
        assert_eq!(e.code(), ErrorCode::MalformedBody);
        let e = parse_csv_rows(b"DeviceName\n").unwrap_err();
        assert_eq!(e.field(), Some("devices"));
    }

    #[test]
    fn csv_bad_rows_are_refused_one_by_one() {
        let rows = parse_csv_rows(b"DeviceName,DeviceSecret\nok1,s\nextra,s,zzz\nbad\xff,s\nok2\n")
            .unwrap();
        assert_eq!(names(&rows), ["ok1", "!extra", "!bad\u{fffd}", "ok2"]);
    }

    #[test]
    fn row_limit_applies_to_data_rows() {
        let mut csv = String::from("DeviceName\n");
        for i in 0..MAX_BATCH_ROWS {
            csv.push_str(&format!("dev{i:05}\n"));
        }
        assert_eq!(
            parse_csv_rows(csv.as_bytes()).unwrap().len(),
            MAX_BATCH_ROWS
        );
        csv.push_str("one-too-many\n");
        let e = parse_csv_rows(csv.as_bytes()).unwrap_err();
        assert_eq!(e.code(), ErrorCode::TooManyItems);
    }

    #[test]
    fn json_rows_both_shapes_and_named_errors() {
        let rows =
            parse_json_rows(br#"[{"device_name":"a"},{"device_name":"b","tags":{"k":"v"}}]"#)
                .unwrap();
        assert_eq!(names(&rows), ["a", "b"]);
        let rows =
            parse_json_rows(br#"{"devices":[{"device_name":"a","device_secret":"s"}]}"#).unwrap();
        assert_eq!(names(&rows), ["a"]);
        let e = parse_json_rows(br#"{"devices":[{"device_name":"a"},{"tags":{}}]}"#).unwrap_err();
        assert_eq!(
            (e.code(), e.field()),
            (ErrorCode::MissingField, Some("devices[1].device_name"))
        );
        let e = parse_json_rows(br#"[{"device_name":"a"},{"device_name":7}]"#).unwrap_err();
        assert_eq!(
            (e.code(), e.field()),
            (ErrorCode::InvalidField, Some("devices[1].device_name"))
        );
        let e = parse_json_rows(br#"{"devices":[]}"#).unwrap_err();
        assert_eq!(e.field(), Some("devices"));
        let e = parse_json_rows(br#"{"rows":[]}"#).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidField);
        let e = parse_json_rows(br#""x""#).unwrap_err();
        assert_eq!(e.field(), Some("body"));
    }
}
