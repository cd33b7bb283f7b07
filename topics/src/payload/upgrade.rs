//! The gateway's upgrade push (`/ota/device/upgrade/{pk}/{dn}`) and the package description
//! ([`UpgradeData`]) it shares with the `firmware/get` reply: size, URL, digests, module.

use super::fields::{de_module, de_name, de_non_empty, default_module};
use super::{codes, from_json, to_json_vec, PayloadError};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};
use std::fmt;
use std::str::FromStr;

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
    pub(super) fn validate(&self, prefix: &str) -> Result<(), PayloadError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::test_support::*;
    use crate::payload::DEFAULT_MODULE;
    use serde_json::json;

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
}
