//! The Alink reply of `…/post_reply` topics (and the error reply to any unreadable request).

use super::fields::{de_reply_id, empty_object};
use super::{codes, from_json, to_json_vec, PayloadError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
