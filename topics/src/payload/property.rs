//! `/sys/{pk}/{dn}/thing/event/property/post`: property values, bare or `{value, time}`, and
//! their forwarded form ([`Item`]).

use super::fields::{AlinkSys, MessageId};
use super::{check_method, from_json, to_json_vec, PayloadError, MAX_PROPERTIES};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::test_support::*;
    use serde_json::json;

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

    /// Found by the `link_payloads` fuzz target: a number with more significant digits than an
    /// f64 holds was parsed to a neighbour of the nearest f64, so the forwarded value differed
    /// from the device's and changed again when parsed downstream. serde_json's
    /// `float_roundtrip` parses correctly rounded.
    #[test]
    fn long_numbers_parse_to_the_nearest_f64_and_round_trip() {
        let digits = format!("1{}4", "0288888888888888888".repeat(6));
        for number in [
            digits.as_str(),
            "0.30000000000000004",
            "2.2250738585072011e-308",
        ] {
            let payload = format!(r#"{{"id":"4","params":{{"x":{number}}}}}"#);
            let post = PropertyPostRequest::parse(payload.as_bytes()).unwrap();
            let value = post.params["x"].value().as_f64().unwrap();
            assert_eq!(value, number.parse::<f64>().unwrap(), "{number}");
            assert_eq!(PropertyPostRequest::parse(&post.to_vec()).unwrap(), post);
        }
    }
}
