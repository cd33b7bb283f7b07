//! `/sys/{pk}/{dn}/thing/event/{identifier}/post`: a TSL event with its output data.

use super::fields::{AlinkSys, MessageId};
use super::{check_method, from_json, to_json_vec, PayloadError};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::test_support::*;
    use serde_json::json;

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
}
