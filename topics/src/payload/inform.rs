//! `/ota/device/inform/{pk}/{dn}`: a device reports the firmware version of one module.

use super::fields::{de_module, de_name, default_module, MessageId};
use super::{from_json, to_json_vec, PayloadError};
use serde::{Deserialize, Serialize};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::test_support::*;
    use crate::payload::DEFAULT_MODULE;

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
}
