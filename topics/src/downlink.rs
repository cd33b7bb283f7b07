//! The cloud-to-device side of the Link protocol: the topics the gateway sends commands on and
//! the topics the device answers them on, and the request payload of a TSL service call.
//!
//! | request (gateway → device) | answer (device → gateway) |
//! |---|---|
//! | `/sys/{pk}/{dn}/thing/service/property/set` | `/sys/{pk}/{dn}/thing/service/property/set_reply` |
//! | `/sys/{pk}/{dn}/thing/service/{identifier}` | `/sys/{pk}/{dn}/thing/service/{identifier}_reply` |
//! | `/sys/{pk}/{dn}/rrpc/request/{messageId}` | `/sys/{pk}/{dn}/rrpc/response/{messageId}` |
//!
//! A property set or service answer is an Alink [`Reply`](crate::Reply)
//! (`{"id","code","data","message"}`) correlated by `id`; an RRPC answer is any payload,
//! correlated by the `messageId` in its topic. The Link SDKs subscribe to all of these with
//! their `_ss=1` auto-subscriptions. Kept apart from [`Topic`](crate::Topic) on purpose: these
//! topics have free-form segments (service identifiers, RRPC ids) and never reach the
//! telemetry hot path's tables.

use serde::Serialize;
use serde_json::Value;

/// The property-set service identifier (`thing.service.property.set`).
pub const PROPERTY_SET: &str = "property/set";

/// Longest service identifier or RRPC message id accepted (the vendor's limit for TSL
/// identifiers is 50 characters; RRPC ids are 64-bit decimals).
pub const MAX_IDENTIFIER_LEN: usize = 64;

/// What a device answers on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceAnswer<'a> {
    /// `…/thing/service/property/set_reply`.
    PropertySetReply { pk: &'a str, dn: &'a str },
    /// `…/thing/service/{identifier}_reply`.
    ServiceReply {
        pk: &'a str,
        dn: &'a str,
        identifier: &'a str,
    },
    /// `…/rrpc/response/{message_id}`.
    RrpcResponse {
        pk: &'a str,
        dn: &'a str,
        message_id: &'a str,
    },
}

impl<'a> DeviceAnswer<'a> {
    /// Parses an answer topic; `None` for anything else (requests included).
    pub fn parse(topic: &'a str) -> Option<DeviceAnswer<'a>> {
        let mut parts = topic.splitn(8, '/');
        let (Some(""), Some("sys"), Some(pk), Some(dn)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if !valid_segment(pk) || !valid_segment(dn) {
            return None;
        }
        let rest: Vec<&str> = parts.collect();
        match rest.as_slice() {
            ["thing", "service", "property", "set_reply"] => {
                Some(DeviceAnswer::PropertySetReply { pk, dn })
            }
            ["thing", "service", name] => {
                let identifier = name.strip_suffix("_reply")?;
                valid_identifier(identifier).then_some(DeviceAnswer::ServiceReply {
                    pk,
                    dn,
                    identifier,
                })
            }
            ["rrpc", "response", id] => {
                valid_identifier(id).then_some(DeviceAnswer::RrpcResponse {
                    pk,
                    dn,
                    message_id: id,
                })
            }
            _ => None,
        }
    }

    pub fn product_key(&self) -> &'a str {
        match self {
            DeviceAnswer::PropertySetReply { pk, .. }
            | DeviceAnswer::ServiceReply { pk, .. }
            | DeviceAnswer::RrpcResponse { pk, .. } => pk,
        }
    }

    pub fn device_name(&self) -> &'a str {
        match self {
            DeviceAnswer::PropertySetReply { dn, .. }
            | DeviceAnswer::ServiceReply { dn, .. }
            | DeviceAnswer::RrpcResponse { dn, .. } => dn,
        }
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty() && !s.bytes().any(|b| matches!(b, b'/' | b'+' | b'#' | 0))
}

/// Whether `s` may be a service identifier or an RRPC message id: 1–64 characters of
/// `[A-Za-z0-9_-]` (so it is always a single, wildcard-free topic segment).
pub fn valid_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_IDENTIFIER_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The topic of a service call: `identifier` [`PROPERTY_SET`] is the property set.
pub fn service_topic(pk: &str, dn: &str, identifier: &str) -> String {
    format!("/sys/{pk}/{dn}/thing/service/{identifier}")
}

/// The topic a device answers a service call on.
pub fn service_reply_topic(pk: &str, dn: &str, identifier: &str) -> String {
    format!("/sys/{pk}/{dn}/thing/service/{identifier}_reply")
}

/// The topic of an RRPC request.
pub fn rrpc_request_topic(pk: &str, dn: &str, message_id: &str) -> String {
    format!("/sys/{pk}/{dn}/rrpc/request/{message_id}")
}

/// The topic of an RRPC answer.
pub fn rrpc_response_topic(pk: &str, dn: &str, message_id: &str) -> String {
    format!("/sys/{pk}/{dn}/rrpc/response/{message_id}")
}

/// A service call's payload:
/// `{"id":"…","version":"1.0","params":{…},"method":"thing.service.{identifier}"}` (dots for
/// slashes: `thing.service.property.set`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceRequest<'a> {
    pub id: &'a str,
    pub version: &'static str,
    pub params: &'a Value,
    pub method: String,
}

impl<'a> ServiceRequest<'a> {
    pub fn new(id: &'a str, identifier: &str, params: &'a Value) -> Self {
        ServiceRequest {
            id,
            version: "1.0",
            params,
            method: format!("thing.service.{}", identifier.replace('/', ".")),
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        // Serialising a struct of strings and a `Value` cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_parse_and_round_trip() {
        let cases = [
            (
                service_reply_topic("a1", "d1", PROPERTY_SET),
                Some(DeviceAnswer::PropertySetReply { pk: "a1", dn: "d1" }),
            ),
            (
                service_reply_topic("a1", "d1", "reboot"),
                Some(DeviceAnswer::ServiceReply {
                    pk: "a1",
                    dn: "d1",
                    identifier: "reboot",
                }),
            ),
            (
                rrpc_response_topic("a1", "d1", "1234"),
                Some(DeviceAnswer::RrpcResponse {
                    pk: "a1",
                    dn: "d1",
                    message_id: "1234",
                }),
            ),
        ];
        for (topic, want) in &cases {
            let topic = topic.as_str();
            assert_eq!(DeviceAnswer::parse(topic), *want, "{topic}");
        }
    }

    #[test]
    fn requests_and_foreign_shapes_are_not_answers() {
        for topic in [
            "/sys/a1/d1/thing/service/property/set",
            "/sys/a1/d1/thing/service/reboot",
            "/sys/a1/d1/rrpc/request/1",
            "/sys/a1/d1/thing/service/_reply",
            "/sys/a1/d1/thing/service/a+b_reply",
            "/sys/a1/d1/rrpc/response/",
            "/sys/a1/d1/rrpc/response/1/x",
            "/sys/+/d1/rrpc/response/1",
            "/sys/a1//thing/service/x_reply",
            "/a1/d1/user/x_reply",
            "sys/a1/d1/rrpc/response/1",
        ] {
            assert_eq!(DeviceAnswer::parse(topic), None, "{topic}");
        }
    }

    #[test]
    fn service_request_payload_is_the_vendor_shape() {
        let params = json!({"LightSwitch": 1});
        let set = ServiceRequest::new("42", PROPERTY_SET, &params);
        assert_eq!(
            set.to_vec(),
            br#"{"id":"42","version":"1.0","params":{"LightSwitch":1},"method":"thing.service.property.set"}"#
        );
        assert_eq!(
            ServiceRequest::new("7", "reboot", &params).method,
            "thing.service.reboot"
        );
    }

    #[test]
    fn identifiers() {
        assert!(valid_identifier("Reboot_2-a"));
        assert!(!valid_identifier(""));
        assert!(!valid_identifier("a/b"));
        assert!(!valid_identifier("a.b"));
        assert!(!valid_identifier(&"x".repeat(65)));
    }
}
