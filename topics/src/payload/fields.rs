//! The field types every payload shares: the request [`MessageId`] (string or number on the
//! wire, always a string out), the reply id, `module` and version names, Alink's `sys` block.
//! The `de_*` helpers are serde `deserialize_with` functions for the sibling payload files.

use super::DEFAULT_MODULE;
use super::MAX_ID_LEN;
use super::MAX_NAME_LEN;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};
use std::fmt;

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
pub(super) fn de_reply_id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
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

pub(super) fn default_module() -> String {
    DEFAULT_MODULE.to_owned()
}

/// `module`: optional; absent, `null` or `""` mean [`DEFAULT_MODULE`].
pub(super) fn de_module<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
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
pub(super) fn de_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
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
pub(super) fn de_non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Err(de::Error::custom("must not be empty"));
    }
    Ok(s)
}

pub(super) fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// Alink's optional `sys` block; `ack: 0` asks the platform not to reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlinkSys {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::test_support::*;
    use crate::payload::InformRequest;
    use serde_json::json;

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
}
