//! Typed payloads of the topics in [`crate::topic`], in the vendor's Alink JSON shapes.
//!
//! Tolerant exactly where the vendor SDKs are loose (docs/DESIGN.md §3): `id` as string or number,
//! `step` as string or number, `size` as number or string, property `params` as bare values or
//! `{value, time}`, event `params` as `{value, time}` or a bare object, `module` optional
//! (= `"default"`). Strict everywhere else: wrong types, missing fields, out-of-range steps,
//! empty versions, a `method` that does not belong on the topic, all give a [`PayloadError`]
//! naming the field, which maps to a vendor reply code with [`PayloadError::reply_code`].
//!
//! Every type has `parse(&[u8])` (the only entry point the gateway and simulator should use, as it
//! also runs the checks serde cannot express) and `to_vec()` producing the vendor JSON.
//!
//! # Layout
//!
//! One file per topic family, each with its tests; this file holds what they share (the
//! error, reply codes, limits, the JSON entry and exit points) and re-exports every type.
//!
//! - `fields`: [`MessageId`], [`AlinkSys`] and the `deserialize_with` helpers.
//! - `inform`: [`InformRequest`]. `progress`: [`ProgressRequest`], [`ProgressStep`],
//!   [`FailureCode`]. `upgrade`: [`UpgradeMessage`], [`UpgradeData`], [`FirmwareSignMethod`].
//!   `firmware_get`: [`FirmwareGetRequest`], [`FirmwareGetReply`].
//! - `property`: [`PropertyPostRequest`], [`PropertyValue`], [`Item`]. `event`:
//!   [`EventPostRequest`], [`EventParams`].
//! - `reply`: [`Reply`].

mod event;
mod fields;
mod firmware_get;
mod inform;
mod progress;
mod property;
mod reply;
mod upgrade;

pub use event::{EventParams, EventPostRequest};
pub use fields::{AlinkSys, MessageId};
pub use firmware_get::{FirmwareGetParams, FirmwareGetReply, FirmwareGetRequest};
pub use inform::{InformParams, InformRequest};
pub use progress::{FailureCode, ProgressParams, ProgressRequest, ProgressStep};
pub use property::{Item, PropertyPostRequest, PropertyValue};
pub use reply::Reply;
pub use upgrade::{FirmwareSignMethod, UpgradeData, UpgradeMessage};

use serde::de::{self, DeserializeOwned};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Reply codes (`code` of `…_reply` payloads), the vendor's Alink device error codes where one
/// fits, so device firmware written for the vendor platform understands them.
pub mod codes {
    /// Success.
    pub const SUCCESS: i32 = 200;
    /// The request could not be processed at all; fleetgate answers malformed JSON with it.
    pub const REQUEST_ERROR: i32 = 400;
    /// `firmware/get` found no pending upgrade for the device/module (`data` is `{}`).
    ///
    /// Not a vendor code: the vendor answers 200 with an empty `data`, which fleetgate still
    /// understands when parsing ([`super::FirmwareGetReply::parse`]) but does not send, so that a
    /// device can tell "nothing to do" from a success without inspecting `data`. 404 keeps it in
    /// the HTTP-like family of the other generic codes.
    pub const NO_UPGRADE: i32 = 404;
    /// Throttled.
    pub const TOO_MANY_REQUESTS: i32 = 429;
    /// The payload is JSON but its parameters are missing, empty, of the wrong type or too many.
    pub const PARAM_ERROR: i32 = 460;
    /// Something failed inside the gateway.
    pub const INTERNAL_ERROR: i32 = 500;
    /// The product key is unknown.
    pub const PRODUCT_NOT_FOUND: i32 = 5005;
    /// The device is unknown.
    pub const DEVICE_NOT_FOUND: i32 = 6100;
    /// The topic could not be parsed.
    pub const TOPIC_ERROR: i32 = 6203;
    /// The device is disabled.
    pub const DEVICE_DISABLED: i32 = 6204;
    /// The data violates the product's TSL model (unknown identifier, wrong type, out of range).
    /// The vendor uses the 63xx range for TSL checks; fleetgate reports them all as 6300 and says
    /// which check failed in `message`.
    pub const TSL_VIOLATION: i32 = 6300;
    /// `code` of every upgrade push on `/ota/device/upgrade/{pk}/{dn}` (a string there).
    pub const UPGRADE_PUSH: &str = "1000";
}

/// The module a firmware belongs to when the device names none.
pub const DEFAULT_MODULE: &str = "default";
/// Most properties one property post may carry (the vendor's limit).
pub const MAX_PROPERTIES: usize = 200;
/// Longest message id accepted; the vendor's ids are decimal `u32`s, this leaves room for SDKs
/// that send other strings without letting a device make the gateway echo megabytes.
pub const MAX_ID_LEN: usize = 64;
/// Longest version or module name (the vendor's limit for both).
pub const MAX_NAME_LEN: usize = 64;

/// Why a payload was refused. Each variant names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Not JSON at all (syntax error, truncated, not UTF-8, trailing bytes).
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// JSON, but a field is missing, of the wrong type or out of range. `field` is a path like
    /// `params.step`, or `payload` for the whole document.
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: String, reason: String },
    #[error("`params` is empty")]
    EmptyParams,
    #[error("too many properties in one post: {0} (at most {MAX_PROPERTIES})")]
    TooManyProperties(usize),
    #[error("method `{found}` does not belong on this topic (expected `{expected}`)")]
    WrongMethod { expected: String, found: String },
}

impl PayloadError {
    /// The reply code a device gets for this error.
    pub fn reply_code(&self) -> i32 {
        match self {
            PayloadError::MalformedJson(_) => codes::REQUEST_ERROR,
            PayloadError::Invalid { .. }
            | PayloadError::EmptyParams
            | PayloadError::TooManyProperties(_)
            | PayloadError::WrongMethod { .. } => codes::PARAM_ERROR,
        }
    }

    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        PayloadError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn from_path_error(e: serde_path_to_error::Error<serde_json::Error>, prefix: &str) -> Self {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let field = match (prefix, path.as_str()) {
                    ("", ".") => "payload".to_owned(),
                    (p, ".") => p.to_owned(),
                    ("", path) => path.to_owned(),
                    (p, path) => format!("{p}.{path}"),
                };
                PayloadError::invalid(field, inner.to_string())
            }
            _ => PayloadError::MalformedJson(inner.to_string()),
        }
    }
}

/// Deserialises `bytes` as one JSON document, with the failing field's path in the error.
fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, PayloadError> {
    // The hot path: plain serde_json (path tracking costs on every field of every message).
    // Only a failing document is parsed again, with paths, to name the field.
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // A shape error can hide a syntax error further on (`{"id":"1"} trailing`): malformed
        // JSON must be reported as such, so check the whole document on this (rare) path.
        if let Err(syntax) = serde_json::from_slice::<de::IgnoredAny>(bytes) {
            return PayloadError::MalformedJson(syntax.to_string());
        }
        PayloadError::from_path_error(e, "")
    })?;
    de.end()
        .map_err(|e| PayloadError::MalformedJson(e.to_string()))?;
    Ok(value)
}

/// Serialises one of this module's types. They only contain strings, numbers and
/// `serde_json::Value`s under string keys, for which serde_json cannot fail.
fn to_json_vec<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("payload types serialise infallibly (string keys only)")
}

/// Checks an optional `method` against the one the topic implies.
fn check_method(method: Option<&str>, expected: &str) -> Result<(), PayloadError> {
    match method {
        Some(found) if found != expected => Err(PayloadError::WrongMethod {
            expected: expected.to_owned(),
            found: found.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// The `id` a reply should echo, read as loosely as possible: the `id` string or number of any
/// JSON object, or `""` when the payload is not JSON or has no usable id. For error replies to
/// payloads that failed [`parse`](InformRequest::parse).
pub fn loose_id(bytes: &[u8]) -> String {
    #[derive(Deserialize)]
    struct IdOnly {
        id: Option<Value>,
    }
    let id = match serde_json::from_slice::<IdOnly>(bytes) {
        Ok(IdOnly { id: Some(id) }) => id,
        _ => return String::new(),
    };
    let s = match id {
        Value::String(s) => s,
        Value::Number(n) if n.is_u64() || n.is_i64() => n.to_string(),
        _ => return String::new(),
    };
    if s.len() > MAX_ID_LEN {
        String::new()
    } else {
        s
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Helpers the payload files' tests share.

    use super::*;

    pub(crate) fn field_of(e: PayloadError) -> String {
        match e {
            PayloadError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    pub(crate) const MD5: &str = "93230c3bde425a9d7984a594ac55ea1e";
    pub(crate) const SHA256: &str =
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    pub(crate) fn upgrade_data() -> UpgradeData {
        UpgradeData {
            size: 4096,
            version: "2.0.0".into(),
            url: "http://127.0.0.1:8080/fw/1".into(),
            sign_method: FirmwareSignMethod::Sha256,
            sign: SHA256.into(),
            md5: MD5.into(),
            module: "MCU".into(),
            ext_data: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn malformed_json_and_error_replies() {
        for bad in [
            &b""[..],
            b"{",
            b"{\"id\":\"1\",",
            b"not json",
            b"{\"id\":\"1\"} trailing",
            b"\xff\xfe",
            b"{\"id\":\"\xff\"}",
        ] {
            let e = PropertyPostRequest::parse(bad).unwrap_err();
            assert!(
                matches!(e, PayloadError::MalformedJson(_)),
                "{bad:?}: {e:?}"
            );
            assert_eq!(e.reply_code(), codes::REQUEST_ERROR);
            let reply = Reply::from_error(loose_id(bad), &e);
            assert_eq!(reply.id, "");
            assert_eq!(reply.code, codes::REQUEST_ERROR);
        }
        // Top-level JSON of the wrong kind is a shape error, not malformed JSON.
        for wrong in [&b"[]"[..], b"42", b"\"x\"", b"null"] {
            assert_eq!(
                field_of(InformRequest::parse(wrong).unwrap_err()),
                "payload"
            );
        }
        // Valid JSON with bad params: the id is still echoed.
        let raw = br#"{"id":"77","params":{}}"#;
        let e = PropertyPostRequest::parse(raw).unwrap_err();
        let reply = Reply::from_error(loose_id(raw), &e);
        assert_eq!(reply.id, "77");
        assert_eq!(reply.code, codes::PARAM_ERROR);
        assert_eq!(loose_id(br#"{"id":77}"#), "77");
        assert_eq!(loose_id(br#"{"id":-7}"#), "-7");
        assert_eq!(loose_id(br#"{"id":1.5}"#), "");
        assert_eq!(loose_id(br#"{"id":{"a":1}}"#), "");
        assert_eq!(loose_id(br#"[1,2]"#), "");
        assert_eq!(
            loose_id(format!(r#"{{"id":"{}"}}"#, "x".repeat(100)).as_bytes()),
            ""
        );
    }
}
