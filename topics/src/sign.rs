//! Alibaba IoT Link "one device, one secret" CONNECT credentials.
//!
//! A device connects with
//! client id `{anything}|securemode=2,signmethod=hmacsha256[,timestamp=T][,…]|`,
//! username `{device_name}&{product_key}` and a password that is the lowercase hex HMAC of
//! `clientId{anything}deviceName{dn}productKey{pk}[timestamp{T}]` keyed with the device secret.
//! Both the gateway (verifying) and firmware-sim (signing) use this module, so they can never
//! disagree on the format.

use hmac::{Hmac, Mac};
use std::fmt;
use std::str::FromStr;

/// The HMAC the device used, named by `signmethod=` in the client id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignMethod {
    HmacSha1,
    HmacSha256,
    HmacMd5,
}

impl SignMethod {
    pub const ALL: [SignMethod; 3] = [
        SignMethod::HmacSha1,
        SignMethod::HmacSha256,
        SignMethod::HmacMd5,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SignMethod::HmacSha1 => "hmacsha1",
            SignMethod::HmacSha256 => "hmacsha256",
            SignMethod::HmacMd5 => "hmacmd5",
        }
    }

    /// Lowercase hex HMAC of `content` keyed with `secret`.
    pub fn sign(self, secret: &str, content: &str) -> String {
        fn mac<M: Mac + hmac::digest::KeyInit>(secret: &str, content: &str) -> String {
            let mut m =
                <M as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
            m.update(content.as_bytes());
            hex::encode(m.finalize().into_bytes())
        }
        match self {
            SignMethod::HmacSha1 => mac::<Hmac<sha1::Sha1>>(secret, content),
            SignMethod::HmacSha256 => mac::<Hmac<sha2::Sha256>>(secret, content),
            SignMethod::HmacMd5 => mac::<Hmac<md5::Md5>>(secret, content),
        }
    }
}

impl fmt::Display for SignMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SignMethod {
    type Err = SignError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "hmacsha1" => Ok(SignMethod::HmacSha1),
            "hmacsha256" => Ok(SignMethod::HmacSha256),
            "hmacmd5" => Ok(SignMethod::HmacMd5),
            _ => Err(SignError::UnknownSignMethod(s.to_owned())),
        }
    }
}

/// Why a CONNECT's credentials could not even be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("client id has no `|securemode=…,signmethod=…|` part")]
    MissingParams,
    #[error("client id parameter `{0}` is not key=value")]
    BadParam(String),
    #[error("client id has no signmethod")]
    MissingSignMethod,
    #[error("unknown signmethod `{0}`")]
    UnknownSignMethod(String),
    #[error("unsupported securemode `{0}` (2 = TLS, 3 = plain TCP)")]
    BadSecureMode(String),
    #[error("timestamp `{0}` is not a number")]
    BadTimestamp(String),
    #[error("username is not `{{device_name}}&{{product_key}}`")]
    BadUsername,
}

/// The parsed `{anything}|k=v,k=v|` client id of a Link CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkClientId {
    /// The part before the first `|` (usually `{pk}&{dn}` or `{pk}.{dn}`): it is what gets signed.
    pub client_id: String,
    pub secure_mode: u8,
    pub sign_method: SignMethod,
    /// Exactly as sent (seconds or milliseconds): it is signed as text.
    pub timestamp: Option<String>,
    /// `_ss=1`: the device expects the server to subscribe it to its own system topics
    /// (replies, OTA pushes) — the vendor SDKs send it and then subscribe to nothing themselves.
    /// Not signed.
    pub auto_subscribe: bool,
}

impl LinkClientId {
    pub fn parse(raw: &str) -> Result<Self, SignError> {
        let (client_id, rest) = raw.split_once('|').ok_or(SignError::MissingParams)?;
        let params = rest.strip_suffix('|').ok_or(SignError::MissingParams)?;
        let mut secure_mode = None;
        let mut sign_method = None;
        let mut timestamp = None;
        let mut auto_subscribe = false;
        for kv in params.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| SignError::BadParam(kv.to_owned()))?;
            match k.trim() {
                "securemode" => {
                    let mode = match v.trim() {
                        "2" => 2,
                        "3" => 3,
                        other => return Err(SignError::BadSecureMode(other.to_owned())),
                    };
                    secure_mode = Some(mode);
                }
                "signmethod" => sign_method = Some(v.trim().parse()?),
                "timestamp" => {
                    let t = v.trim();
                    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(SignError::BadTimestamp(t.to_owned()));
                    }
                    timestamp = Some(t.to_owned());
                }
                "_ss" => auto_subscribe = v.trim() == "1",
                // The SDKs add more (lan, _v, gw, ext, authtype, …): they are not signed.
                _ => {}
            }
        }
        Ok(LinkClientId {
            client_id: client_id.to_owned(),
            // The vendor SDKs treat a missing securemode as plain TCP.
            secure_mode: secure_mode.unwrap_or(3),
            sign_method: sign_method.ok_or(SignError::MissingSignMethod)?,
            timestamp,
            auto_subscribe,
        })
    }

    /// The client id string a device sends.
    pub fn to_client_id_string(&self) -> String {
        let mut s = format!(
            "{}|securemode={},signmethod={}",
            self.client_id, self.secure_mode, self.sign_method
        );
        if let Some(t) = &self.timestamp {
            s.push_str(",timestamp=");
            s.push_str(t);
        }
        if self.auto_subscribe {
            s.push_str(",_ss=1");
        }
        s.push('|');
        s
    }

    /// The text the password is the HMAC of.
    pub fn sign_content(&self, product_key: &str, device_name: &str) -> String {
        let mut content = format!(
            "clientId{}deviceName{}productKey{}",
            self.client_id, device_name, product_key
        );
        if let Some(t) = &self.timestamp {
            content.push_str("timestamp");
            content.push_str(t);
        }
        content
    }

    /// The expected password for this client id and device.
    pub fn password(&self, product_key: &str, device_name: &str, device_secret: &str) -> String {
        self.sign_method
            .sign(device_secret, &self.sign_content(product_key, device_name))
    }

    /// Constant-time check of a password the device sent (hex compared case-insensitively).
    pub fn verify(
        &self,
        product_key: &str,
        device_name: &str,
        device_secret: &str,
        password: &str,
    ) -> bool {
        let expected = self.password(product_key, device_name, device_secret);
        let given = password.trim().to_ascii_lowercase();
        expected.len() == given.len()
            && expected
                .bytes()
                .zip(given.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// The instant a client id's `timestamp=` names, in milliseconds since the Unix epoch, or
/// `None` when the number does not fit. The SDKs send seconds (the vendor's Python SDK) or
/// milliseconds (the C SDK, the vendor's documentation); a value below 10^11 is read as seconds:
/// 10^11 milliseconds is in 1973, 10^11 seconds in the year 5138, so no clock a device could have
/// is ambiguous.
pub fn timestamp_unix_ms(text: &str) -> Option<u64> {
    const SECONDS_BELOW: u64 = 100_000_000_000;
    let value: u64 = text.trim().parse().ok()?;
    if value < SECONDS_BELOW {
        value.checked_mul(1000)
    } else {
        Some(value)
    }
}

/// Splits a Link username `{device_name}&{product_key}`.
pub fn parse_username(username: &str) -> Result<(&str, &str), SignError> {
    let (dn, pk) = username.split_once('&').ok_or(SignError::BadUsername)?;
    if dn.is_empty() || pk.is_empty() || pk.contains('&') {
        return Err(SignError::BadUsername);
    }
    Ok((dn, pk))
}

/// Everything a device needs to CONNECT: (client id, username, password).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkCredentials {
    pub client_id: String,
    pub username: String,
    pub password: String,
}

impl LinkCredentials {
    /// Credentials as the vendor SDKs build them: client id `{pk}.{dn}`, securemode 3 (plain
    /// TCP) or 2 (TLS), and the given sign method and optional timestamp.
    pub fn new(
        product_key: &str,
        device_name: &str,
        device_secret: &str,
        sign_method: SignMethod,
        secure_mode: u8,
        timestamp: Option<String>,
    ) -> Self {
        let id = LinkClientId {
            client_id: format!("{product_key}.{device_name}"),
            secure_mode,
            sign_method,
            timestamp,
            auto_subscribe: false,
        };
        LinkCredentials {
            client_id: id.to_client_id_string(),
            username: format!("{device_name}&{product_key}"),
            password: id.password(product_key, device_name, device_secret),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_hmacsha1() {
        // The shape of the vendor's worked example.
        let id =
            LinkClientId::parse("12345|securemode=3,signmethod=hmacsha1,timestamp=789|").unwrap();
        let content = id.sign_content("a1FIbwDMrAP", "device");
        assert_eq!(
            content,
            "clientId12345deviceNamedeviceproductKeya1FIbwDMrAPtimestamp789"
        );
        // HMAC-SHA1 with key "secret" of that content, computed independently (python hmac).
        assert_eq!(
            id.sign_method.sign("secret", &content),
            "0a1cdcb117a6cca3fb034a350308a582b78add89"
        );
    }

    #[test]
    fn round_trip_every_method() {
        for m in SignMethod::ALL {
            for ts in [
                None,
                Some("1700000000".to_owned()),
                Some("1700000000123".to_owned()),
            ] {
                let c = LinkCredentials::new("pk1", "dev1", "s3cr3t", m, 3, ts.clone());
                let id = LinkClientId::parse(&c.client_id).unwrap();
                assert_eq!(id.timestamp, ts);
                let (dn, pk) = parse_username(&c.username).unwrap();
                assert!(id.verify(pk, dn, "s3cr3t", &c.password));
                assert!(id.verify(pk, dn, "s3cr3t", &c.password.to_uppercase()));
                assert!(!id.verify(pk, dn, "wrong", &c.password));
                assert!(!id.verify(pk, "dev2", "s3cr3t", &c.password));
            }
        }
    }

    #[test]
    fn malformed_client_ids() {
        assert_eq!(LinkClientId::parse("plain"), Err(SignError::MissingParams));
        assert_eq!(
            LinkClientId::parse("a|securemode=3|"),
            Err(SignError::MissingSignMethod)
        );
        assert!(matches!(
            LinkClientId::parse("a|signmethod=rot13|"),
            Err(SignError::UnknownSignMethod(_))
        ));
        assert!(matches!(
            LinkClientId::parse("a|signmethod=hmacsha1,securemode=9|"),
            Err(SignError::BadSecureMode(_))
        ));
        assert!(matches!(
            LinkClientId::parse("a|signmethod=hmacsha1,timestamp=x1|"),
            Err(SignError::BadTimestamp(_))
        ));
        assert!(matches!(
            LinkClientId::parse("a|signmethod=hmacsha1,junk|"),
            Err(SignError::BadParam(_))
        ));
        assert_eq!(parse_username("nodelimiter"), Err(SignError::BadUsername));
        assert_eq!(parse_username("&pk"), Err(SignError::BadUsername));
    }

    #[test]
    fn timestamps_in_seconds_or_milliseconds() {
        let cases = [
            ("1700000000", Some(1_700_000_000_000)),
            ("1700000000123", Some(1_700_000_000_123)),
            ("0", Some(0)),
            ("99999999999", Some(99_999_999_999_000)),
            ("100000000000", Some(100_000_000_000)),
            ("978307200", Some(978_307_200_000)), // 2001-01-01, in seconds
            ("99999999999999999999999", None),    // does not fit
            ("", None),
        ];
        for (text, expected) in cases {
            assert_eq!(timestamp_unix_ms(text), expected, "{text:?}");
        }
    }

    #[test]
    fn extra_params_are_ignored() {
        let id = LinkClientId::parse(
            "pk.dn|securemode=2,signmethod=hmacsha256,lan=C,_v=sdk-c-4.0,ext=1|",
        )
        .unwrap();
        assert_eq!(id.secure_mode, 2);
        assert_eq!(id.sign_method, SignMethod::HmacSha256);
        assert_eq!(id.client_id, "pk.dn");
    }
}
