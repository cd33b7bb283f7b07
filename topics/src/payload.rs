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

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

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

// ---------------------------------------------------------------------------------------------
// Shared field types
// ---------------------------------------------------------------------------------------------

/// A request `id`: the vendor SDKs send a decimal string, some a number. Serialised as a string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(String);

impl MessageId {
    /// An id from text; the caller is trusted (ids from the wire go through `Deserialize`).
    pub fn new(id: impl Into<String>) -> Self {
        MessageId(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<u64> for MessageId {
    fn from(id: u64) -> Self {
        MessageId(id.to_string())
    }
}

impl From<u32> for MessageId {
    fn from(id: u32) -> Self {
        MessageId(id.to_string())
    }
}

impl From<&str> for MessageId {
    fn from(id: &str) -> Self {
        MessageId(id.to_owned())
    }
}

impl From<String> for MessageId {
    fn from(id: String) -> Self {
        MessageId(id)
    }
}

impl From<MessageId> for String {
    fn from(id: MessageId) -> Self {
        id.0
    }
}

impl Serialize for MessageId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = MessageId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "a non-empty id string (at most {MAX_ID_LEN} bytes) or a non-negative integer"
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MessageId, E> {
                if v.is_empty() || v.len() > MAX_ID_LEN {
                    return Err(E::invalid_value(de::Unexpected::Str(v), &self));
                }
                Ok(MessageId(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MessageId, E> {
                Ok(MessageId(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MessageId, E> {
                u64::try_from(v)
                    .map(|v| MessageId(v.to_string()))
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// Reply ids: like [`MessageId`] but empty is fine (the reply to an unreadable request).
fn de_reply_id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an id string or integer")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}

fn default_module() -> String {
    DEFAULT_MODULE.to_owned()
}

/// `module`: optional; absent, `null` or `""` mean [`DEFAULT_MODULE`].
fn de_module<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(default_module()),
        Some(m) if m.is_empty() => Ok(default_module()),
        Some(m) if m.len() > MAX_NAME_LEN => Err(de::Error::custom(format_args!(
            "module name longer than {MAX_NAME_LEN} bytes"
        ))),
        Some(m) => Ok(m),
    }
}

/// A required, non-empty string of at most [`MAX_NAME_LEN`] bytes (versions).
fn de_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Err(de::Error::custom("must not be empty"));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(de::Error::custom(format_args!(
            "longer than {MAX_NAME_LEN} bytes"
        )));
    }
    Ok(s)
}

/// A required, non-empty string.
fn de_non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Err(de::Error::custom("must not be empty"));
    }
    Ok(s)
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// Alink's optional `sys` block; `ack: 0` asks the platform not to reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlinkSys {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<u8>,
}

// ---------------------------------------------------------------------------------------------
// OTA: inform, progress, upgrade, firmware/get
// ---------------------------------------------------------------------------------------------

/// `/ota/device/inform/{pk}/{dn}`: the device's current firmware version of one module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InformRequest {
    pub id: MessageId,
    pub params: InformParams,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InformParams {
    #[serde(deserialize_with = "de_name")]
    pub version: String,
    #[serde(default = "default_module", deserialize_with = "de_module")]
    pub module: String,
}

impl InformRequest {
    pub fn new(
        id: impl Into<MessageId>,
        version: impl Into<String>,
        module: impl Into<String>,
    ) -> Self {
        InformRequest {
            id: id.into(),
            params: InformParams {
                version: version.into(),
                module: module.into(),
            },
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, PayloadError> {
        from_json(bytes)
    }

    pub fn to_vec(&self) -> Vec<u8> {
        to_json_vec(self)
    }
}

/// The failure codes a device reports as a negative `step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailureCode {
    /// -1: the upgrade failed (generic).
    UpdateFailed = -1,
    /// -2: downloading the package failed.
    DownloadFailed = -2,
    /// -3: the package failed verification (`sign`/`md5`).
    VerifyFailed = -3,
    /// -4: writing (flashing) the package failed.
    WriteFailed = -4,
}

impl FailureCode {
    pub const ALL: [FailureCode; 4] = [
        FailureCode::UpdateFailed,
        FailureCode::DownloadFailed,
        FailureCode::VerifyFailed,
        FailureCode::WriteFailed,
    ];

    /// The vendor's numeric code (-1..=-4).
    pub fn code(self) -> i32 {
        self as i32
    }

    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            -1 => Some(FailureCode::UpdateFailed),
            -2 => Some(FailureCode::DownloadFailed),
            -3 => Some(FailureCode::VerifyFailed),
            -4 => Some(FailureCode::WriteFailed),
            _ => None,
        }
    }

    /// Stable label (`UPDATE_FAILED`, …), the same as its serde form.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCode::UpdateFailed => "UPDATE_FAILED",
            FailureCode::DownloadFailed => "DOWNLOAD_FAILED",
            FailureCode::VerifyFailed => "VERIFY_FAILED",
            FailureCode::WriteFailed => "WRITE_FAILED",
        }
    }

    /// What an operator reads.
    pub fn description(self) -> &'static str {
        match self {
            FailureCode::UpdateFailed => "update failed",
            FailureCode::DownloadFailed => "download failed",
            FailureCode::VerifyFailed => "verification failed",
            FailureCode::WriteFailed => "write (flash) failed",
        }
    }
}

impl fmt::Display for FailureCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A progress `step`: a percentage or a failure. Sent as a string (`"42"`, `"-2"`); numbers are
/// accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProgressStep {
    /// 0..=100. Build it with [`ProgressStep::from_code`] to have the range checked.
    Percent(u8),
    Failed(FailureCode),
}

impl ProgressStep {
    /// `Some` for 0..=100 and -1..=-4, the only steps the protocol defines.
    pub fn from_code(step: i64) -> Option<Self> {
        match step {
            0..=100 => u8::try_from(step).ok().map(ProgressStep::Percent),
            _ => FailureCode::from_code(step).map(ProgressStep::Failed),
        }
    }

    /// The number on the wire.
    pub fn code(self) -> i32 {
        match self {
            ProgressStep::Percent(p) => i32::from(p),
            ProgressStep::Failed(f) => f.code(),
        }
    }

    pub fn percent(self) -> Option<u8> {
        match self {
            ProgressStep::Percent(p) => Some(p),
            ProgressStep::Failed(_) => None,
        }
    }

    pub fn failure(self) -> Option<FailureCode> {
        match self {
            ProgressStep::Percent(_) => None,
            ProgressStep::Failed(f) => Some(f),
        }
    }
}

impl Serialize for ProgressStep {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The vendor SDKs send the step as a string.
        s.collect_str(&self.code())
    }
}

impl<'de> Deserialize<'de> for ProgressStep {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str = "a step 0..=100 or -1..=-4, as a string or integer";
        impl Visitor<'_> for V {
            type Value = ProgressStep;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ProgressStep, E> {
                ProgressStep::from_code(v)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Signed(v), &EXPECTED))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ProgressStep, E> {
                i64::try_from(v)
                    .ok()
                    .and_then(ProgressStep::from_code)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(v), &EXPECTED))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ProgressStep, E> {
                v.parse::<i64>()
                    .ok()
                    .and_then(ProgressStep::from_code)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &EXPECTED))
            }
        }
        d.deserialize_any(V)
    }
}

/// `/ota/device/progress/{pk}/{dn}`: upgrade progress or failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressRequest {
    pub id: MessageId,
    pub params: ProgressParams,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressParams {
    pub step: ProgressStep,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    #[serde(default = "default_module", deserialize_with = "de_module")]
    pub module: String,
}

impl ProgressRequest {
    pub fn new(
        id: impl Into<MessageId>,
        step: ProgressStep,
        desc: Option<String>,
        module: impl Into<String>,
    ) -> Self {
        ProgressRequest {
            id: id.into(),
            params: ProgressParams {
                step,
                desc,
                module: module.into(),
            },
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, PayloadError> {
        from_json(bytes)
    }

    pub fn to_vec(&self) -> Vec<u8> {
        to_json_vec(self)
    }
}

/// How `sign` of an upgrade was computed: `"SHA256"` or `"Md5"` on the wire (the vendor's
/// spelling); parsing ignores case since the vendor's own API also writes `"MD5"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FirmwareSignMethod {
    Sha256,
    Md5,
}

impl FirmwareSignMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            FirmwareSignMethod::Sha256 => "SHA256",
            FirmwareSignMethod::Md5 => "Md5",
        }
    }

    /// Length of the hex digest `sign` holds.
    pub fn hex_len(self) -> usize {
        match self {
            FirmwareSignMethod::Sha256 => 64,
            FirmwareSignMethod::Md5 => 32,
        }
    }
}

impl fmt::Display for FirmwareSignMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FirmwareSignMethod {
    type Err = PayloadError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("sha256") {
            Ok(FirmwareSignMethod::Sha256)
        } else if s.eq_ignore_ascii_case("md5") {
            Ok(FirmwareSignMethod::Md5)
        } else {
            Err(PayloadError::invalid(
                "signMethod",
                format!("`{s}` is neither SHA256 nor Md5"),
            ))
        }
    }
}

impl Serialize for FirmwareSignMethod {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for FirmwareSignMethod {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|_| de::Error::invalid_value(de::Unexpected::Str(&s), &"SHA256 or Md5"))
    }
}

/// `size`: a byte count, as a number or a decimal string.
fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a non-negative byte count, as an integer or a decimal string")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            // `u64::from_str` takes a leading `+`; a byte count has no business with one.
            if v.starts_with('+') {
                return Err(E::invalid_value(de::Unexpected::Str(v), &self));
            }
            v.parse()
                .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
        }
    }
    d.deserialize_any(V)
}

fn de_hex<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = de_non_empty(d)?;
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(de::Error::custom("not a hex digest"));
    }
    Ok(s)
}

/// The package description of an upgrade push and of a `firmware/get` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeData {
    #[serde(deserialize_with = "de_size")]
    pub size: u64,
    #[serde(deserialize_with = "de_name")]
    pub version: String,
    #[serde(deserialize_with = "de_non_empty")]
    pub url: String,
    pub sign_method: FirmwareSignMethod,
    /// Hex digest of the package with `sign_method`.
    #[serde(deserialize_with = "de_hex")]
    pub sign: String,
    /// Hex MD5 of the package (always sent, whatever `sign_method` is).
    #[serde(deserialize_with = "de_hex")]
    pub md5: String,
    #[serde(default = "default_module", deserialize_with = "de_module")]
    pub module: String,
    /// Free-form data for the device (the vendor's `extData`, e.g. `_package_udi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ext_data: Option<Map<String, Value>>,
}

impl UpgradeData {
    /// Checks serde cannot express: digest lengths.
    fn validate(&self, prefix: &str) -> Result<(), PayloadError> {
        if self.sign.len() != self.sign_method.hex_len() {
            return Err(PayloadError::invalid(
                format!("{prefix}sign"),
                format!(
                    "a {} digest has {} hex digits, not {}",
                    self.sign_method,
                    self.sign_method.hex_len(),
                    self.sign.len()
                ),
            ));
        }
        if self.md5.len() != FirmwareSignMethod::Md5.hex_len() {
            return Err(PayloadError::invalid(
                format!("{prefix}md5"),
                format!("an MD5 digest has 32 hex digits, not {}", self.md5.len()),
            ));
        }
        Ok(())
    }
}

/// `/ota/device/upgrade/{pk}/{dn}`: the gateway's upgrade push. `code` is always `"1000"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeMessage {
    pub code: String,
    pub data: UpgradeData,
    /// A number here, unlike request ids.
    pub id: u64,
    pub message: String,
}

impl UpgradeMessage {
    pub fn new(id: u64, data: UpgradeData) -> Self {
        UpgradeMessage {
            code: codes::UPGRADE_PUSH.to_owned(),
            data,
            id,
            message: "success".to_owned(),
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, PayloadError> {
        let m: UpgradeMessage = from_json(bytes)?;
        if m.code != codes::UPGRADE_PUSH {
            return Err(PayloadError::invalid(
                "code",
                format!(
                    "`{}` is not the upgrade code {}",
                    m.code,
                    codes::UPGRADE_PUSH
                ),
            ));
        }
        m.data.validate("data.")?;
        Ok(m)
    }

    pub fn to_vec(&self) -> Vec<u8> {
        to_json_vec(self)
    }
}

/// `/sys/{pk}/{dn}/thing/ota/firmware/get`: the device asks for its pending upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareGetRequest {
    pub id: MessageId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default)]
    pub params: FirmwareGetParams,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareGetParams {
    /// The module asked about; `None` means [`DEFAULT_MODULE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl FirmwareGetRequest {
    pub const METHOD: &'static str = "thing.ota.firmware.get";

    pub fn new(id: impl Into<MessageId>, module: Option<String>) -> Self {
        FirmwareGetRequest {
            id: id.into(),
            version: Some("1.0".to_owned()),
            params: FirmwareGetParams { module },
            method: Some(Self::METHOD.to_owned()),
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, PayloadError> {
        let r: FirmwareGetRequest = from_json(bytes)?;
        check_method(r.method.as_deref(), Self::METHOD)?;
        if let Some(m) = &r.params.module {
            if m.len() > MAX_NAME_LEN {
                return Err(PayloadError::invalid(
                    "params.module",
                    format!("module name longer than {MAX_NAME_LEN} bytes"),
                ));
            }
        }
        Ok(r)
    }

    /// The module asked about (absent or empty = [`DEFAULT_MODULE`]).
    pub fn module(&self) -> &str {
        match self.params.module.as_deref() {
            None | Some("") => DEFAULT_MODULE,
            Some(m) => m,
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        to_json_vec(self)
    }
}

/// `/sys/{pk}/{dn}/thing/ota/firmware/get_reply`.
///
/// On the wire `{"code":200,"data":{…UpgradeData…},"id":"1","message":"success"}`, or
/// `{"code":404,"data":{},…}` ([`codes::NO_UPGRADE`]) when nothing is pending, or another code
/// for a refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirmwareGetReply {
    Upgrade {
        id: String,
        data: UpgradeData,
    },
    NoUpgrade {
        id: String,
    },
    Error {
        id: String,
        code: i32,
        message: String,
    },
}

#[derive(Serialize, Deserialize)]
struct FirmwareGetReplyWire {
    code: i32,
    #[serde(default = "empty_object")]
    data: Value,
    #[serde(deserialize_with = "de_reply_id")]
    id: String,
    #[serde(default)]
    message: String,
}

impl FirmwareGetReply {
    pub fn id(&self) -> &str {
        match self {
            FirmwareGetReply::Upgrade { id, .. }
            | FirmwareGetReply::NoUpgrade { id }
            | FirmwareGetReply::Error { id, .. } => id,
        }
    }

    pub fn code(&self) -> i32 {
        match self {
            FirmwareGetReply::Upgrade { .. } => codes::SUCCESS,
            FirmwareGetReply::NoUpgrade { .. } => codes::NO_UPGRADE,
            FirmwareGetReply::Error { code, .. } => *code,
        }
    }

    /// Parses a reply; a vendor-style `200` with an empty `data` counts as [`NoUpgrade`](Self::NoUpgrade).
    pub fn parse(bytes: &[u8]) -> Result<Self, PayloadError> {
        let w: FirmwareGetReplyWire = from_json(bytes)?;
        let empty = match &w.data {
            Value::Null => true,
            Value::Object(m) => m.is_empty(),
            _ => false,
        };
        match w.code {
            codes::SUCCESS if empty => Ok(FirmwareGetReply::NoUpgrade { id: w.id }),
            codes::SUCCESS => {
                let data: UpgradeData = serde_path_to_error::deserialize(w.data)
                    .map_err(|e| PayloadError::from_path_error(e, "data"))?;
                data.validate("data.")?;
                Ok(FirmwareGetReply::Upgrade { id: w.id, data })
            }
            codes::NO_UPGRADE => Ok(FirmwareGetReply::NoUpgrade { id: w.id }),
            code => Ok(FirmwareGetReply::Error {
                id: w.id,
                code,
                message: w.message,
            }),
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        to_json_vec(self)
    }
}

impl Serialize for FirmwareGetReply {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (data, message) = match self {
            FirmwareGetReply::Upgrade { data, .. } => (
                serde_json::to_value(data).map_err(serde::ser::Error::custom)?,
                "success",
            ),
            FirmwareGetReply::NoUpgrade { .. } => (empty_object(), "no upgrade pending"),
            FirmwareGetReply::Error { message, .. } => (empty_object(), message.as_str()),
        };
        FirmwareGetReplyWire {
            code: self.code(),
            data,
            id: self.id().to_owned(),
            message: message.to_owned(),
        }
        .serialize(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Thing model: property post, event post
// ---------------------------------------------------------------------------------------------

/// A property value as the device sent it: bare, or `{"value": v, "time": ms}`.
///
/// An object counts as the timed form when it has a `value` key and no keys other than `value`
/// and `time`; then `time`, if present, must be a non-negative integer. Any other object is a
/// bare (struct-typed) value. `null` is refused either way: no TSL type has it.
#[derive(Debug, Clone, PartialEq)]
pub enum PropertyValue {
    Bare(Value),
    Timed { value: Value, time: Option<u64> },
}

impl PropertyValue {
    pub fn value(&self) -> &Value {
        match self {
            PropertyValue::Bare(v) | PropertyValue::Timed { value: v, .. } => v,
        }
    }

    pub fn time(&self) -> Option<u64> {
        match self {
            PropertyValue::Bare(_) => None,
            PropertyValue::Timed { time, .. } => *time,
        }
    }
}

impl Serialize for PropertyValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PropertyValue::Bare(v) => v.serialize(s),
            PropertyValue::Timed { value, time } => TimedRef { value, time: *time }.serialize(s),
        }
    }
}

#[derive(Serialize)]
struct TimedRef<'a> {
    value: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<u64>,
}

/// `{value, time}` when `m` has that shape (see [`PropertyValue`]); `Err` when it has the shape
/// but `time` is not a timestamp.
fn split_timed(m: &Map<String, Value>) -> Option<Result<(&Value, Option<u64>), &'static str>> {
    let value = m.get("value")?;
    if m.keys().any(|k| k != "value" && k != "time") {
        return None;
    }
    Some(match m.get("time") {
        None | Some(Value::Null) => Ok((value, None)),
        Some(t) => t
            .as_u64()
            .map(|t| (value, Some(t)))
            .ok_or("`time` must be a non-negative integer (milliseconds)"),
    })
}

impl<'de> Deserialize<'de> for PropertyValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        let parsed = match &v {
            Value::Null => return Err(de::Error::custom("a property value cannot be null")),
            Value::Object(m) => match split_timed(m) {
                Some(Ok((Value::Null, _))) => {
                    return Err(de::Error::custom("a property value cannot be null"));
                }
                Some(Ok((value, time))) => Some(PropertyValue::Timed {
                    value: value.clone(),
                    time,
                }),
                Some(Err(e)) => return Err(de::Error::custom(e)),
                None => None,
            },
            _ => None,
        };
        Ok(parsed.unwrap_or(PropertyValue::Bare(v)))
    }
}

/// A property in forwarded form: always `{value, time}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub value: Value,
    /// Milliseconds since the epoch: the device's, or the gateway's receive time.
    pub time: u64,
}

/// `/sys/{pk}/{dn}/thing/event/property/post`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PropertyPostRequest {
    pub id: MessageId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub params: BTreeMap<String, PropertyValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sys: Option<AlinkSys>,
}

impl PropertyPostRequest {
    pub const METHOD: &'static str = "thing.event.property.post";

    /// A post in the vendor's full form (`version`, `method`, timed values).
    pub fn new(id: impl Into<MessageId>, items: BTreeMap<String, Item>) -> Self {
        PropertyPostRequest {
            id: id.into(),
            version: Some("1.0".to_owned()),
            params: items
                .into_iter()
                .map(|(k, it)| {
                    (
                        k,
                        PropertyValue::Timed {
                            value: it.value,
                            time: Some(it.time),
                        },
                    )
                })
                .collect(),
            method: Some(Self::METHOD.to_owned()),
            sys: None,
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, PayloadError> {
        let r: PropertyPostRequest = from_json(bytes)?;
        check_method(r.method.as_deref(), Self::METHOD)?;
        if r.params.is_empty() {
            return Err(PayloadError::EmptyParams);
        }
        if r.params.len() > MAX_PROPERTIES {
            return Err(PayloadError::TooManyProperties(r.params.len()));
        }
        if r.params.contains_key("") {
            return Err(PayloadError::invalid("params", "empty property identifier"));
        }
        Ok(r)
    }

    /// The properties in forwarded form, stamped with `receive_time_ms` where the device sent
    /// no time.
    pub fn items(&self, receive_time_ms: u64) -> BTreeMap<String, Item> {
        self.params
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    Item {
                        value: v.value().clone(),
                        time: v.time().unwrap_or(receive_time_ms),
                    },
                )
            })
            .collect()
    }

    /// [`items`](Self::items) without cloning the values.
    pub fn into_items(self, receive_time_ms: u64) -> BTreeMap<String, Item> {
        self.params
            .into_iter()
            .map(|(k, v)| {
                let item = match v {
                    PropertyValue::Bare(value) => Item {
                        value,
                        time: receive_time_ms,
                    },
                    PropertyValue::Timed { value, time } => Item {
                        value,
                        time: time.unwrap_or(receive_time_ms),
                    },
                };
                (k, item)
            })
            .collect()
    }

    /// `false` when the device asked for no reply (`"sys":{"ack":0}`).
    pub fn wants_reply(&self) -> bool {
        self.sys.and_then(|s| s.ack) != Some(0)
    }

    pub fn to_vec(&self) -> Vec<u8> {
        to_json_vec(self)
    }
}

/// The `params` of an event post: the event's output data and optional time.
///
/// The vendor form is `{"value": {…}, "time": ms}`; a bare object is accepted as the value. An
/// object counts as the vendor form when its `value` is an object and it has no keys other than
/// `value` and `time`. Always serialised in the vendor form.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventParams {
    pub value: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<u64>,
}

impl<'de> Deserialize<'de> for EventParams {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let m = Map::<String, Value>::deserialize(d)?;
        let vendor_form = matches!(m.get("value"), Some(Value::Object(_)))
            && m.keys().all(|k| k == "value" || k == "time");
        if !vendor_form {
            return Ok(EventParams {
                value: m,
                time: None,
            });
        }
        let time = match m.get("time") {
            None | Some(Value::Null) => None,
            Some(t) => Some(t.as_u64().ok_or_else(|| {
                de::Error::custom("`time` must be a non-negative integer (milliseconds)")
            })?),
        };
        match m.into_iter().find(|(k, _)| k == "value") {
            Some((_, Value::Object(value))) => Ok(EventParams { value, time }),
            // Checked above: `value` is an object.
            _ => Err(de::Error::custom("`value` must be an object")),
        }
    }
}

/// `/sys/{pk}/{dn}/thing/event/{identifier}/post`: a TSL event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventPostRequest {
    pub id: MessageId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub params: EventParams,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sys: Option<AlinkSys>,
}

impl EventPostRequest {
    /// The `method` of an event post for `identifier`.
    pub fn method_for(identifier: &str) -> String {
        format!("thing.event.{identifier}.post")
    }

    pub fn new(
        id: impl Into<MessageId>,
        identifier: &str,
        value: Map<String, Value>,
        time: Option<u64>,
    ) -> Self {
        EventPostRequest {
            id: id.into(),
            version: Some("1.0".to_owned()),
            params: EventParams { value, time },
            method: Some(Self::method_for(identifier)),
            sys: None,
        }
    }

    /// Parses an event post. A `method`, when present, must be an event method
    /// (`thing.event.{identifier}.post`, identifier not `property`); that it names the topic's
    /// identifier is [`check_identifier`](Self::check_identifier)'s job.
    pub fn parse(bytes: &[u8]) -> Result<Self, PayloadError> {
        let r: EventPostRequest = from_json(bytes)?;
        if let Some(m) = &r.method {
            let ident = m
                .strip_prefix("thing.event.")
                .and_then(|s| s.strip_suffix(".post"));
            match ident {
                Some(id) if !id.is_empty() && id != "property" && !id.contains('.') => {}
                _ => {
                    return Err(PayloadError::WrongMethod {
                        expected: Self::method_for("{identifier}"),
                        found: m.clone(),
                    })
                }
            }
        }
        Ok(r)
    }

    /// Checks that `method` (when present) names the topic's event `identifier`.
    pub fn check_identifier(&self, identifier: &str) -> Result<(), PayloadError> {
        check_method(self.method.as_deref(), &Self::method_for(identifier))
    }

    /// The event time, or `receive_time_ms` when the device sent none.
    pub fn time_or(&self, receive_time_ms: u64) -> u64 {
        self.params.time.unwrap_or(receive_time_ms)
    }

    /// `false` when the device asked for no reply (`"sys":{"ack":0}`).
    pub fn wants_reply(&self) -> bool {
        self.sys.and_then(|s| s.ack) != Some(0)
    }

    pub fn to_vec(&self) -> Vec<u8> {
        to_json_vec(self)
    }
}

// ---------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------

/// The Alink reply of `…/post_reply` topics:
/// `{"code":200,"data":{},"id":"1","message":"success","version":"1.0"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub code: i32,
    #[serde(default = "empty_object")]
    pub data: Value,
    /// The request's id; `""` when it could not be read.
    #[serde(deserialize_with = "de_reply_id")]
    pub id: String,
    #[serde(default)]
    pub message: String,
    #[serde(default = "alink_version")]
    pub version: String,
}

fn alink_version() -> String {
    "1.0".to_owned()
}

impl Reply {
    pub fn success(id: impl Into<String>) -> Self {
        Reply {
            code: codes::SUCCESS,
            data: empty_object(),
            id: id.into(),
            message: "success".to_owned(),
            version: alink_version(),
        }
    }

    pub fn error(id: impl Into<String>, code: i32, message: impl Into<String>) -> Self {
        Reply {
            code,
            data: empty_object(),
            id: id.into(),
            message: message.into(),
            version: alink_version(),
        }
    }

    /// The error reply for a payload that failed to parse.
    pub fn from_error(id: impl Into<String>, err: &PayloadError) -> Self {
        Reply::error(id, err.reply_code(), err.to_string())
    }

    pub fn is_success(&self) -> bool {
        self.code == codes::SUCCESS
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, PayloadError> {
        from_json(bytes)
    }

    pub fn to_vec(&self) -> Vec<u8> {
        to_json_vec(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(e: PayloadError) -> String {
        match e {
            PayloadError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    const MD5: &str = "93230c3bde425a9d7984a594ac55ea1e";
    const SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn upgrade_data() -> UpgradeData {
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

    #[test]
    fn message_id_string_or_number_serialised_as_string() {
        for (raw, id) in [
            (r#"{"id":"17","params":{"version":"1"}}"#, "17"),
            (r#"{"id":17,"params":{"version":"1"}}"#, "17"),
            (
                r#"{"id":4294967295,"params":{"version":"1"}}"#,
                "4294967295",
            ),
            (r#"{"id":"req-a","params":{"version":"1"}}"#, "req-a"),
        ] {
            let r = InformRequest::parse(raw.as_bytes()).unwrap();
            assert_eq!(r.id.as_str(), id);
            let out: Value = serde_json::from_slice(&r.to_vec()).unwrap();
            assert_eq!(out["id"], json!(id));
        }
        for bad in [
            r#"{"id":-3,"params":{"version":"1"}}"#,
            r#"{"id":1.5,"params":{"version":"1"}}"#,
            r#"{"id":"","params":{"version":"1"}}"#,
            r#"{"id":null,"params":{"version":"1"}}"#,
            r#"{"id":true,"params":{"version":"1"}}"#,
            r#"{"id":["1"],"params":{"version":"1"}}"#,
        ] {
            assert_eq!(
                field_of(InformRequest::parse(bad.as_bytes()).unwrap_err()),
                "id",
                "{bad}"
            );
        }
        let long = format!(
            r#"{{"id":"{}","params":{{"version":"1"}}}}"#,
            "9".repeat(MAX_ID_LEN + 1)
        );
        assert!(InformRequest::parse(long.as_bytes()).is_err());
    }

    #[test]
    fn inform_module_defaults() {
        for raw in [
            r#"{"id":"1","params":{"version":"1.0.1"}}"#,
            r#"{"id":"1","params":{"version":"1.0.1","module":null}}"#,
            r#"{"id":"1","params":{"version":"1.0.1","module":""}}"#,
        ] {
            assert_eq!(
                InformRequest::parse(raw.as_bytes()).unwrap().params.module,
                DEFAULT_MODULE
            );
        }
        let r = InformRequest::parse(
            br#"{"id":"1","params":{"version":"1.0.1","module":"MCU"},"extra":1}"#,
        )
        .unwrap();
        assert_eq!(r, InformRequest::new("1", "1.0.1", "MCU"));
        let long_module = format!(
            r#"{{"id":"1","params":{{"version":"1","module":"{}"}}}}"#,
            "m".repeat(65)
        );
        assert_eq!(
            field_of(InformRequest::parse(long_module.as_bytes()).unwrap_err()),
            "params.module"
        );
        assert_eq!(
            field_of(InformRequest::parse(br#"{"id":"1","params":{"version":""}}"#).unwrap_err()),
            "params.version"
        );
        assert_eq!(
            field_of(InformRequest::parse(br#"{"id":"1","params":{"version":2}}"#).unwrap_err()),
            "params.version"
        );
        // Missing field: the path is the enclosing object.
        let e = InformRequest::parse(br#"{"id":"1","params":{}}"#).unwrap_err();
        assert!(e.to_string().contains("version"), "{e}");
        assert_eq!(field_of(e), "params");
    }

    #[test]
    fn progress_steps() {
        let step = |raw: &str| {
            ProgressRequest::parse(format!(r#"{{"id":"1","params":{{"step":{raw}}}}}"#).as_bytes())
                .map(|r| r.params.step)
        };
        assert_eq!(step(r#""42""#), Ok(ProgressStep::Percent(42)));
        assert_eq!(step("42"), Ok(ProgressStep::Percent(42)));
        assert_eq!(step(r#""0""#), Ok(ProgressStep::Percent(0)));
        assert_eq!(step("100"), Ok(ProgressStep::Percent(100)));
        for (raw, code) in [
            (r#""-1""#, FailureCode::UpdateFailed),
            ("-2", FailureCode::DownloadFailed),
            (r#""-3""#, FailureCode::VerifyFailed),
            ("-4", FailureCode::WriteFailed),
        ] {
            assert_eq!(step(raw), Ok(ProgressStep::Failed(code)), "{raw}");
        }
        for bad in [
            "101",
            r#""101""#,
            "-5",
            r#""-5""#,
            "255",
            "-1000000000000",
            "18446744073709551615",
            "42.0",
            r#""42.5""#,
            r#""""#,
            r#"" 42""#,
            r#""abc""#,
            "null",
            "true",
            "[42]",
        ] {
            let e = step(bad).unwrap_err();
            assert_eq!(e.reply_code(), codes::PARAM_ERROR);
            assert_eq!(field_of(e), "params.step", "{bad}");
        }
        let r = ProgressRequest::parse(
            br#"{"id":9,"params":{"step":"-3","desc":"bad sign","module":"MCU"}}"#,
        )
        .unwrap();
        assert_eq!(r.params.step.failure(), Some(FailureCode::VerifyFailed));
        assert_eq!(r.params.step.code(), -3);
        assert_eq!(r.params.desc.as_deref(), Some("bad sign"));
        // Sent as a string, like the vendor SDKs.
        let out: Value = serde_json::from_slice(&r.to_vec()).unwrap();
        assert_eq!(
            out,
            json!({"id":"9","params":{"step":"-3","desc":"bad sign","module":"MCU"}})
        );
        assert_eq!(
            ProgressRequest::new("1", ProgressStep::Percent(5), None, "default").to_vec(),
            br#"{"id":"1","params":{"step":"5","module":"default"}}"#
        );
    }

    #[test]
    fn failure_codes_are_distinct_and_round_trip() {
        for f in FailureCode::ALL {
            assert_eq!(FailureCode::from_code(i64::from(f.code())), Some(f));
            assert_eq!(
                ProgressStep::from_code(i64::from(f.code())),
                Some(ProgressStep::Failed(f))
            );
            assert_eq!(serde_json::to_value(f).unwrap(), json!(f.as_str()));
        }
        assert_eq!(FailureCode::ALL.map(|f| f.code()), [-1, -2, -3, -4]);
        assert_eq!(FailureCode::from_code(0), None);
        assert_eq!(ProgressStep::from_code(-5), None);
        assert_eq!(ProgressStep::from_code(101), None);
    }

    #[test]
    fn upgrade_message_round_trip_and_size_forms() {
        let m = UpgradeMessage::new(7, upgrade_data());
        let bytes = m.to_vec();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        // Vendor field names and types.
        assert_eq!(v["code"], json!("1000"));
        assert_eq!(v["id"], json!(7));
        assert_eq!(v["message"], json!("success"));
        assert_eq!(v["data"]["signMethod"], json!("SHA256"));
        assert_eq!(v["data"]["size"], json!(4096));
        assert!(v["data"].get("extData").is_none());
        assert_eq!(UpgradeMessage::parse(&bytes).unwrap(), m);

        let mut with_string_size = v.clone();
        with_string_size["data"]["size"] = json!("4096");
        let parsed =
            UpgradeMessage::parse(&serde_json::to_vec(&with_string_size).unwrap()).unwrap();
        assert_eq!(parsed.data.size, 4096);
        for bad_size in [
            json!("-1"),
            json!(-1),
            json!("4k"),
            json!(""),
            json!("+4"),
            json!(4.5),
            json!(null),
        ] {
            let mut b = v.clone();
            b["data"]["size"] = bad_size.clone();
            let e = UpgradeMessage::parse(&serde_json::to_vec(&b).unwrap()).unwrap_err();
            assert_eq!(field_of(e), "data.size", "{bad_size}");
        }
        // signMethod spelled as the vendor API does elsewhere; always sent back as the push spelling.
        let mut md5 = v.clone();
        md5["data"]["signMethod"] = json!("MD5");
        md5["data"]["sign"] = json!(MD5);
        md5["data"]["extData"] = json!({"k": "v"});
        let parsed = UpgradeMessage::parse(&serde_json::to_vec(&md5).unwrap()).unwrap();
        assert_eq!(parsed.data.sign_method, FirmwareSignMethod::Md5);
        assert_eq!(parsed.data.ext_data.as_ref().unwrap()["k"], json!("v"));
        let back: Value = serde_json::from_slice(&parsed.to_vec()).unwrap();
        assert_eq!(back["data"]["signMethod"], json!("Md5"));
        assert_eq!(back["data"]["extData"], json!({"k": "v"}));
    }

    #[test]
    fn upgrade_message_strictness() {
        let v = serde_json::to_value(UpgradeMessage::new(7, upgrade_data())).unwrap();
        let check = |mutate: &dyn Fn(&mut Value), field: &str| {
            let mut b = v.clone();
            mutate(&mut b);
            let e = UpgradeMessage::parse(&serde_json::to_vec(&b).unwrap()).unwrap_err();
            assert_eq!(field_of(e), field);
        };
        check(&|b| b["code"] = json!("1001"), "code");
        check(&|b| b["code"] = json!(1000), "code");
        check(&|b| b["id"] = json!("7"), "id");
        check(
            &|b| b["data"]["signMethod"] = json!("CRC32"),
            "data.signMethod",
        );
        check(&|b| b["data"]["sign"] = json!(MD5), "data.sign"); // MD5-length digest under SHA256
        check(&|b| b["data"]["sign"] = json!("zz"), "data.sign");
        check(&|b| b["data"]["md5"] = json!(SHA256), "data.md5");
        check(&|b| b["data"]["url"] = json!(""), "data.url");
        check(&|b| b["data"]["extData"] = json!([1]), "data.extData");
        check(&|b| b["data"]["version"] = json!(""), "data.version");
        let mut no_module = v.clone();
        no_module["data"].as_object_mut().unwrap().remove("module");
        assert_eq!(
            UpgradeMessage::parse(&serde_json::to_vec(&no_module).unwrap())
                .unwrap()
                .data
                .module,
            DEFAULT_MODULE
        );
    }

    #[test]
    fn firmware_get_request() {
        let r = FirmwareGetRequest::parse(
            br#"{"id":"1","params":{"module":"MCU"},"method":"thing.ota.firmware.get"}"#,
        )
        .unwrap();
        assert_eq!(r.module(), "MCU");
        assert_eq!(
            FirmwareGetRequest::parse(br#"{"id":1}"#).unwrap().module(),
            DEFAULT_MODULE
        );
        assert_eq!(
            FirmwareGetRequest::parse(br#"{"id":1,"params":{"module":""}}"#)
                .unwrap()
                .module(),
            DEFAULT_MODULE
        );
        let e = FirmwareGetRequest::parse(br#"{"id":"1","method":"thing.ota.firmware.put"}"#)
            .unwrap_err();
        assert!(matches!(e, PayloadError::WrongMethod { .. }));
        assert_eq!(e.reply_code(), codes::PARAM_ERROR);
        let built = FirmwareGetRequest::new(5u64, Some("MCU".into()));
        assert_eq!(FirmwareGetRequest::parse(&built.to_vec()).unwrap(), built);
    }

    #[test]
    fn firmware_get_reply_variants() {
        let up = FirmwareGetReply::Upgrade {
            id: "1".into(),
            data: upgrade_data(),
        };
        let v: Value = serde_json::from_slice(&up.to_vec()).unwrap();
        assert_eq!(v["code"], json!(200));
        assert_eq!(v["id"], json!("1"));
        assert_eq!(v["data"]["md5"], json!(MD5));
        assert_eq!(FirmwareGetReply::parse(&up.to_vec()).unwrap(), up);

        let none = FirmwareGetReply::NoUpgrade { id: "2".into() };
        let v: Value = serde_json::from_slice(&none.to_vec()).unwrap();
        assert_eq!(v["code"], json!(codes::NO_UPGRADE));
        assert_eq!(v["data"], json!({}));
        assert_eq!(FirmwareGetReply::parse(&none.to_vec()).unwrap(), none);
        // The vendor's way of saying "nothing pending".
        assert_eq!(
            FirmwareGetReply::parse(br#"{"code":200,"data":{},"id":"2","message":"success"}"#)
                .unwrap(),
            none
        );
        assert_eq!(
            FirmwareGetReply::parse(br#"{"code":200,"id":2,"message":"success"}"#).unwrap(),
            none
        );

        let err = FirmwareGetReply::Error {
            id: "".into(),
            code: codes::REQUEST_ERROR,
            message: "malformed JSON".into(),
        };
        assert_eq!(FirmwareGetReply::parse(&err.to_vec()).unwrap(), err);
        assert_eq!(err.code(), 400);
        let e = FirmwareGetReply::parse(
            br#"{"code":200,"data":{"size":1},"id":"1","message":"success"}"#,
        )
        .unwrap_err();
        assert_eq!(field_of(e), "data");
    }

    #[test]
    fn property_params_in_both_forms() {
        let r = PropertyPostRequest::parse(
            br#"{"id":"1","version":"1.0","params":{
                "Temp":{"value":21.5,"time":1700000000000},
                "Hum":40,
                "Mode":"eco",
                "Loc":{"lat":1.0,"lon":2.0},
                "Late":{"value":true},
                "Struct":{"value":1,"unit":"C"}
            },"method":"thing.event.property.post"}"#,
        )
        .unwrap();
        let items = r.items(42);
        assert_eq!(
            items["Temp"],
            Item {
                value: json!(21.5),
                time: 1_700_000_000_000
            }
        );
        assert_eq!(
            items["Hum"],
            Item {
                value: json!(40),
                time: 42
            }
        );
        assert_eq!(
            items["Mode"],
            Item {
                value: json!("eco"),
                time: 42
            }
        );
        assert_eq!(
            items["Loc"],
            Item {
                value: json!({"lat":1.0,"lon":2.0}),
                time: 42
            }
        );
        assert_eq!(
            items["Late"],
            Item {
                value: json!(true),
                time: 42
            }
        );
        // Keys other than value/time: a struct value, not the timed form.
        assert_eq!(
            items["Struct"],
            Item {
                value: json!({"value":1,"unit":"C"}),
                time: 42
            }
        );
        assert_eq!(r.clone().into_items(42), items);
        assert!(r.wants_reply());
        let forwarded = serde_json::to_value(&items).unwrap();
        assert_eq!(forwarded["Hum"], json!({"value":40,"time":42}));

        let built = PropertyPostRequest::new("5", items.clone());
        let reparsed = PropertyPostRequest::parse(&built.to_vec()).unwrap();
        assert_eq!(reparsed.items(0), items);
    }

    #[test]
    fn property_post_strictness() {
        let parse = |s: &str| PropertyPostRequest::parse(s.as_bytes());
        assert_eq!(
            parse(r#"{"id":"1","params":{}}"#),
            Err(PayloadError::EmptyParams)
        );
        assert_eq!(
            field_of(parse(r#"{"id":"1","params":[]}"#).unwrap_err()),
            "params"
        );
        assert_eq!(
            field_of(parse(r#"{"id":"1","params":"Temp"}"#).unwrap_err()),
            "params"
        );
        assert_eq!(field_of(parse(r#"{"id":"1"}"#).unwrap_err()), "payload");
        assert_eq!(
            field_of(parse(r#"{"id":"1","params":{"Temp":null}}"#).unwrap_err()),
            "params.Temp"
        );
        assert_eq!(
            field_of(parse(r#"{"id":"1","params":{"Temp":{"value":null}}}"#).unwrap_err()),
            "params.Temp"
        );
        for bad_time in [r#""1700""#, "-1", "1.5", "[]"] {
            let s = format!(r#"{{"id":"1","params":{{"Temp":{{"value":1,"time":{bad_time}}}}}}}"#);
            assert_eq!(
                field_of(parse(&s).unwrap_err()),
                "params.Temp",
                "{bad_time}"
            );
        }
        assert_eq!(
            field_of(parse(r#"{"id":"1","params":{"":1}}"#).unwrap_err()),
            "params"
        );
        assert!(matches!(
            parse(r#"{"id":"1","params":{"T":1},"method":"thing.event.alarm.post"}"#),
            Err(PayloadError::WrongMethod { .. })
        ));
        let many: Map<String, Value> = (0..=MAX_PROPERTIES)
            .map(|i| (format!("p{i}"), json!(i)))
            .collect();
        let s = json!({"id":"1","params":many}).to_string();
        assert_eq!(
            parse(&s),
            Err(PayloadError::TooManyProperties(MAX_PROPERTIES + 1))
        );
        assert!(!parse(r#"{"id":"1","params":{"T":1},"sys":{"ack":0}}"#)
            .unwrap()
            .wants_reply());
        assert!(parse(r#"{"id":"1","params":{"T":1},"sys":{"ack":1}}"#)
            .unwrap()
            .wants_reply());
    }

    #[test]
    fn event_params_in_both_forms() {
        let r = EventPostRequest::parse(
            br#"{"id":"1","version":"1.0","params":{"value":{"Level":3},"time":1700000000000},"method":"thing.event.alarm.post"}"#,
        )
        .unwrap();
        assert_eq!(r.params.value["Level"], json!(3));
        assert_eq!(r.time_or(5), 1_700_000_000_000);
        assert!(r.check_identifier("alarm").is_ok());
        assert!(matches!(
            r.check_identifier("fault"),
            Err(PayloadError::WrongMethod { .. })
        ));

        let bare = EventPostRequest::parse(br#"{"id":2,"params":{"Level":1,"time":5}}"#).unwrap();
        assert_eq!(
            bare.params.value,
            json!({"Level":1,"time":5}).as_object().unwrap().clone()
        );
        assert_eq!(bare.time_or(77), 77);
        // No method: any identifier is fine.
        assert!(bare.check_identifier("whatever").is_ok());
        // `value` that is not an object: a bare output parameter called "value".
        let odd = EventPostRequest::parse(br#"{"id":2,"params":{"value":7}}"#).unwrap();
        assert_eq!(odd.params.value["value"], json!(7));

        let built = EventPostRequest::new("3", "alarm", bare.params.value.clone(), Some(9));
        let back = EventPostRequest::parse(&built.to_vec()).unwrap();
        assert_eq!(back, built);
        let v: Value = serde_json::from_slice(&built.to_vec()).unwrap();
        assert_eq!(v["method"], json!("thing.event.alarm.post"));
        assert_eq!(v["params"]["time"], json!(9));

        for (bad, field) in [
            (r#"{"id":"1","params":[]}"#, "params"),
            (r#"{"id":"1","params":5}"#, "params"),
            (r#"{"id":"1","params":{"value":{},"time":"x"}}"#, "params"),
        ] {
            assert_eq!(
                field_of(EventPostRequest::parse(bad.as_bytes()).unwrap_err()),
                field,
                "{bad}"
            );
        }
        for method in [
            "thing.event.property.post",
            "thing.event..post",
            "thing.service.x.post",
            "thing.event.a.b.post",
        ] {
            let s = format!(r#"{{"id":"1","params":{{}},"method":"{method}"}}"#);
            assert!(
                matches!(
                    EventPostRequest::parse(s.as_bytes()),
                    Err(PayloadError::WrongMethod { .. })
                ),
                "{method}"
            );
        }
    }

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

    #[test]
    fn replies() {
        let ok = Reply::success("1");
        assert_eq!(
            ok.to_vec(),
            br#"{"code":200,"data":{},"id":"1","message":"success","version":"1.0"}"#
        );
        assert!(ok.is_success());
        assert_eq!(Reply::parse(&ok.to_vec()).unwrap(), ok);
        let err = Reply::error("2", codes::TSL_VIOLATION, "Temp: not in TSL");
        assert!(!err.is_success());
        assert_eq!(Reply::parse(&err.to_vec()).unwrap(), err);
        // Loose reply forms: numeric id, no version/data.
        let r = Reply::parse(br#"{"code":200,"id":3,"message":"success"}"#).unwrap();
        assert_eq!(
            (r.id.as_str(), r.version.as_str(), &r.data),
            ("3", "1.0", &json!({}))
        );
        assert!(Reply::parse(br#"{"code":"200","id":"1"}"#).is_err());
    }
}
