//! Extractors whose rejections are [`ApiError`]s in the standard body, naming the field serde
//! blames (`devices[3].device_name`, `page`, …) instead of axum's plain-text rejections.
//!
//! Use [`ApiJson`], [`ApiQuery`] and [`ApiPath`] in handlers instead of axum's `Json`, `Query`
//! and `Path`, and [`ApiMultipart`] instead of axum's `Multipart`.

mod multipart;

pub use multipart::{ApiMultipart, MultipartForm, Part};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON body (requires `Content-Type: application/json` or `…+json`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::unsupported_media_type("application/json"));
        }
        let bytes = read_body(req, state).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// The body's bytes, within the router's body limit (413 in the standard body beyond it).
pub(crate) async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state)
        .await
        .map_err(|e: BytesRejection| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large()
            } else {
                ApiError::bad_request(format!(
                    "could not read the request body: {}",
                    e.body_text()
                ))
            }
        })
}

/// The media type of the request without parameters, lowercased (`""` when absent).
pub(crate) fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

pub(crate) fn is_json(headers: &HeaderMap) -> bool {
    let mt = media_type(headers);
    mt == "application/json" || (mt.starts_with("application/") && mt.ends_with("+json"))
}

/// Deserializes `bytes` as `T`, mapping serde's complaint to the field it is about.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::malformed("empty body, expected a JSON document"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(json_error)?;
    de.end()
        .map_err(|e| ApiError::malformed(format!("malformed JSON: {}", e)))?;
    Ok(value)
}

/// Deserializes an already parsed JSON value as `T`, naming the field on failure.
pub(crate) fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(json_error)
}

fn json_error(err: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = err.path().to_string();
    let inner = err.into_inner();
    match inner.classify() {
        serde_json::error::Category::Data => {
            let msg = strip_position(&inner);
            field_error(&path, &msg)
        }
        // Syntax, EOF, I/O: the document itself is broken; position helps more than a path.
        _ => ApiError::malformed(format!("malformed JSON: {inner}")),
    }
}

/// serde_json's Display appends " at line L column C", which is noise once the field is named.
fn strip_position(e: &serde_json::Error) -> String {
    let full = e.to_string();
    if e.line() == 0 {
        return full;
    }
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    full.strip_suffix(&suffix)
        .map(str::to_owned)
        .unwrap_or(full)
}

/// Builds FG.1002 / FG.1001 from serde's message and the path serde_path_to_error tracked.
/// `path` is `.` at the root; missing/unknown field names are only in the message.
fn field_error(path: &str, msg: &str) -> ApiError {
    let join = |name: &str| {
        if path == "." || path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        }
    };
    if let Some(name) = backticked(msg, "missing field `") {
        return ApiError::missing_field(join(name));
    }
    if let Some(name) = backticked(msg, "unknown field `") {
        // The path already ends with the unknown key for maps but not for structs.
        let field = if path.ends_with(name) {
            path.to_owned()
        } else {
            join(name)
        };
        return ApiError::invalid_field(field, "unknown field");
    }
    let field = if path == "." || path.is_empty() {
        "body".to_owned()
    } else {
        path.to_owned()
    };
    ApiError::invalid_field(field, msg)
}

/// The text between `prefix` and the next backtick, when `msg` starts with `prefix`.
fn backticked<'a>(msg: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = msg.strip_prefix(prefix)?;
    rest.split('`').next()
}

/// Query parameters (`?page=2&online=true`), rejecting with the parameter named.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parse_query(parts.uri.query().unwrap_or("")).map(ApiQuery)
    }
}

pub(crate) fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let msg = err.into_inner().to_string();
        field_error(&path, &msg)
    })
}

/// Path parameters, rejecting with the parameter named.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                use axum::extract::path::ErrorKind;
                Err(match e.kind() {
                    ErrorKind::ParseErrorAtKey { key, .. }
                    | ErrorKind::InvalidUtf8InPathParam { key }
                    | ErrorKind::DeserializeError { key, .. } => {
                        ApiError::invalid_field(key.clone(), e.body_text())
                    }
                    _ => ApiError::bad_request(e.body_text()),
                })
            }
            // The route and the handler disagree: our bug, not the client's.
            Err(e) => Err(ApiError::internal(e.body_text())),
        }
    }
}

/// A CSV upload with a header line, as spreadsheets export it: a UTF-8 BOM is skipped, fields
/// are trimmed, rows may have fewer or more fields than the header. Returns the reader
/// (positioned at the first data row) and the header; a malformed header is a 400.
pub(crate) fn csv_with_header(
    body: &[u8],
) -> Result<(csv::Reader<&[u8]>, csv::ByteRecord), ApiError> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(body);
    let headers = rdr
        .byte_headers()
        .map_err(|e| ApiError::malformed(format!("malformed CSV header: {e}")))?
        .clone();
    Ok((rdr, headers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::error::ErrorCode;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Row {
        device_name: String,
        count: Option<u32>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Batch {
        devices: Vec<Row>,
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = parse_json::<Row>(br#"{"count":1}"#).unwrap_err();
        assert_eq!(e.code(), ErrorCode::MissingField);
        assert_eq!(e.field(), Some("device_name"));

        let e =
            parse_json::<Batch>(br#"{"devices":[{"device_name":"a"},{"count":1}]}"#).unwrap_err();
        assert_eq!(e.code(), ErrorCode::MissingField);
        assert_eq!(e.field(), Some("devices[1].device_name"), "{e}");

        let e = parse_json::<Row>(br#"{"device_name":"a","count":"x"}"#).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidField);
        assert_eq!(e.field(), Some("count"));
        assert!(e.message().contains("count"), "{e}");

        let e = parse_json::<Row>(br#"{"device_name":"a","colour":1}"#).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidField);
        assert_eq!(e.field(), Some("colour"), "{e}");
    }

    #[test]
    fn broken_json_is_malformed() {
        for body in [&b"{"[..], b"", b"{\"device_name\":\"a\"} x", b"not json"] {
            let e = parse_json::<Row>(body).unwrap_err();
            assert_eq!(e.code(), ErrorCode::MalformedBody, "{e}");
        }
        let e = parse_json::<Row>(b"[1]").unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidField, "{e}");
    }

    #[test]
    fn query_errors_name_the_parameter() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Q {
            page: Option<u32>,
            online: Option<bool>,
        }
        let q: Q = parse_query("page=2&online=true").unwrap();
        assert_eq!(q.page, Some(2));
        let e = parse_query::<Q>("page=two").unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidField);
        assert_eq!(e.field(), Some("page"));
        let e = parse_query::<Q>("online=maybe").unwrap_err();
        assert_eq!(e.field(), Some("online"));
    }
}
