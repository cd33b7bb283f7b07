//! `/ota/device/progress/{pk}/{dn}`: upgrade progress, or a failure code, as a `step`.

use super::fields::{de_module, default_module, MessageId};
use super::{from_json, to_json_vec, PayloadError};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::codes;
    use crate::payload::test_support::*;
    use serde_json::json;
    use serde_json::Value;

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
}
