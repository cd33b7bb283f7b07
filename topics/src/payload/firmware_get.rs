//! `/sys/{pk}/{dn}/thing/ota/firmware/get` and its reply: a device asks for its pending
//! upgrade (pull mode) and gets the package, "no upgrade", or an error.

use super::fields::{de_reply_id, empty_object, MessageId};
use super::upgrade::UpgradeData;
use super::{
    check_method, codes, from_json, to_json_vec, PayloadError, DEFAULT_MODULE, MAX_NAME_LEN,
};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::test_support::*;
    use serde_json::json;

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
}
