//! CONNECT authentication: the Alibaba Link "one device, one secret" signature.
//!
//! [`authenticate`] turns a CONNECT's client id, username and password into the device it proves
//! to be, or a [`Refusal`] that carries both the CONNACK return code and the metrics label. It
//! does no I/O beyond [`DeviceHooks::credentials`].
//!
//! `securemode` is lenient on purpose: the vendor defines 2 = TLS and 3 = plain TCP, but SDKs and
//! hand-written clients get it wrong often, and it is not part of the signed text, so enforcing
//! it adds no security (the transport does). Both values are accepted on both listeners.
//!
//! The client id's `timestamp=` is signed but, by default, not checked against the clock, as the
//! vendor's broker does: a CONNECT captured once can be replayed for ever. A window
//! (`mqtt.connect_timestamp_window_secs`) refuses a CONNECT whose timestamp is further than that
//! from the gateway's clock ([`Refusal::Timestamp`]); a CONNECT without a timestamp is still
//! accepted, since SDKs may leave it out. The trade-off is in `docs/SECURITY.md`.

use super::{DeviceHooks, DeviceKey};
use fleetgate_topics::sign::{parse_username, timestamp_unix_ms, LinkClientId};
use rumqttd::protocol::{ConnectReturnCode, Login};
use std::time::Duration;

/// Why a CONNECT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The client id is not `{anything}|k=v,…|` with a known signmethod.
    MalformedClientId,
    /// No username/password, or a username that is not `{dn}&{pk}`.
    BadUsername,
    /// No such device.
    UnknownDevice,
    /// The password is not the expected HMAC.
    BadSignature,
    /// The device exists and signed correctly but is disabled.
    DisabledDevice,
    /// The signed `timestamp=` is outside the configured window around the gateway's clock (or
    /// is not a time at all).
    Timestamp,
    /// Not MQTT 3.1.1 (MQTT 5, MQTT 3.1, …).
    Protocol,
    /// The connection limit is reached (or the router refused the link).
    Limit,
}

impl Refusal {
    pub(crate) const ALL: [Refusal; 8] = [
        Refusal::MalformedClientId,
        Refusal::BadUsername,
        Refusal::UnknownDevice,
        Refusal::BadSignature,
        Refusal::DisabledDevice,
        Refusal::Timestamp,
        Refusal::Protocol,
        Refusal::Limit,
    ];

    /// The MQTT 3.1.1 CONNACK return code the client gets.
    pub(crate) fn code(self) -> ConnectReturnCode {
        match self {
            Refusal::MalformedClientId => ConnectReturnCode::ClientIdentifierNotValid,
            Refusal::BadUsername | Refusal::UnknownDevice | Refusal::BadSignature => {
                ConnectReturnCode::BadUserNamePassword
            }
            Refusal::DisabledDevice | Refusal::Timestamp => ConnectReturnCode::NotAuthorized,
            Refusal::Protocol => ConnectReturnCode::RefusedProtocolVersion,
            Refusal::Limit => ConnectReturnCode::ServiceUnavailable,
        }
    }

    /// The `reason` label of `connects_refused`.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refusal::MalformedClientId => "malformed_client_id",
            Refusal::BadUsername => "bad_username",
            Refusal::UnknownDevice => "unknown_device",
            Refusal::BadSignature => "bad_signature",
            Refusal::DisabledDevice => "disabled_device",
            Refusal::Timestamp => "timestamp",
            Refusal::Protocol => "protocol",
            Refusal::Limit => "limit",
        }
    }
}

/// A CONNECT that proved its device identity.
#[derive(Debug, Clone)]
pub(crate) struct Authenticated {
    pub device: DeviceKey,
    /// The name the device's link has in rumqttd's router (see [`router_client_id`]).
    pub router_client_id: String,
    /// The client id carried `_ss=1`: subscribe the device to its system topics ourselves.
    pub auto_subscribe: bool,
}

/// How a CONNECT's `timestamp=` is held against the clock: `window` is
/// `mqtt.connect_timestamp_window_secs` (`None`: not checked), `now_ms` the gateway's clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Freshness {
    pub window: Option<Duration>,
    pub now_ms: u64,
}

/// Timestamps not checked (the vendor's behaviour), for tests and fuzz targets.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) const UNCHECKED: Freshness = Freshness {
    window: None,
    now_ms: 0,
};

impl Freshness {
    /// Whether a CONNECT carrying `timestamp` (as sent, if at all) is fresh enough.
    fn accepts(self, timestamp: Option<&str>) -> bool {
        let (Some(window), Some(timestamp)) = (self.window, timestamp) else {
            return true;
        };
        timestamp_unix_ms(timestamp)
            .is_some_and(|at| u128::from(at.abs_diff(self.now_ms)) <= window.as_millis())
    }
}

/// Checks a CONNECT's credentials. Order matters for what an attacker can learn: the signature
/// is checked before the timestamp and the enabled flag, so only a device's owner (or whoever
/// replays its CONNECT) learns that it is disabled or out of time.
pub(crate) fn authenticate<H: DeviceHooks + ?Sized>(
    client_id: &str,
    login: Option<&Login>,
    hooks: &H,
    freshness: Freshness,
) -> Result<Authenticated, Refusal> {
    let link_id = LinkClientId::parse(client_id).map_err(|_| Refusal::MalformedClientId)?;
    let login = login.ok_or(Refusal::BadUsername)?;
    let (dn, pk) = parse_username(&login.username).map_err(|_| Refusal::BadUsername)?;
    let creds = hooks.credentials(pk, dn).ok_or(Refusal::UnknownDevice)?;
    if !link_id.verify(pk, dn, &creds.device_secret, &login.password) {
        return Err(Refusal::BadSignature);
    }
    if !freshness.accepts(link_id.timestamp.as_deref()) {
        return Err(Refusal::Timestamp);
    }
    if !creds.enabled {
        return Err(Refusal::DisabledDevice);
    }
    let device = DeviceKey {
        product_key: pk.to_owned(),
        device_name: dn.to_owned(),
    };
    Ok(Authenticated {
        router_client_id: router_client_id(&device),
        auto_subscribe: link_id.auto_subscribe,
        device,
    })
}

/// The client id of a device's link in rumqttd's router: `{pk}&{dn}` with `%`, `&` and the
/// characters rumqttd refuses in client ids (`+ $ # /`) percent-encoded. One device, one name,
/// whatever `{anything}` it put in its MQTT client id, and never a name without exactly one `&`
/// — so never [`GATEWAY_LINK_ID`](super::router::GATEWAY_LINK_ID).
pub(crate) fn router_client_id(device: &DeviceKey) -> String {
    fn escape(out: &mut String, s: &str) {
        for c in s.chars() {
            match c {
                '%' | '&' | '+' | '$' | '#' | '/' => out.push_str(&format!("%{:02X}", c as u32)),
                c => out.push(c),
            }
        }
    }
    let mut out = String::with_capacity(device.product_key.len() + device.device_name.len() + 1);
    escape(&mut out, &device.product_key);
    out.push('&');
    escape(&mut out, &device.device_name);
    out
}

#[cfg(test)]
mod tests {
    use super::UNCHECKED;
    use super::*;
    use crate::broker::{DeviceCredentials, DisconnectReason, PublishOutcome, Session, UpMessage};
    use fleetgate_topics::sign::{LinkCredentials, SignMethod};

    struct OneDevice {
        enabled: bool,
    }

    impl DeviceHooks for OneDevice {
        fn credentials(&self, pk: &str, dn: &str) -> Option<DeviceCredentials> {
            (pk == "pk1" && dn == "dev1").then(|| DeviceCredentials {
                device_secret: "s3cr3t".into(),
                enabled: self.enabled,
            })
        }
        fn on_connect(&self, _: &Session) {}
        fn on_disconnect(&self, _: &Session, _: DisconnectReason) {}
        async fn on_publish(&self, _: &Session, _: UpMessage<'_>) -> PublishOutcome {
            PublishOutcome::Processed
        }
    }

    fn login(c: &LinkCredentials) -> Login {
        Login {
            username: c.username.clone(),
            password: c.password.clone(),
        }
    }

    #[test]
    fn refusals_and_codes() {
        let hooks = OneDevice { enabled: true };
        let good = LinkCredentials::new("pk1", "dev1", "s3cr3t", SignMethod::HmacSha256, 3, None);
        let ok = authenticate(&good.client_id, Some(&login(&good)), &hooks, UNCHECKED).unwrap();
        assert_eq!(ok.device.product_key, "pk1");
        assert_eq!(ok.router_client_id, "pk1&dev1");

        let cases: Vec<(String, Option<Login>, Refusal)> = vec![
            (
                "no-params".into(),
                Some(login(&good)),
                Refusal::MalformedClientId,
            ),
            (good.client_id.clone(), None, Refusal::BadUsername),
            (
                good.client_id.clone(),
                Some(Login {
                    username: "nodelim".into(),
                    password: good.password.clone(),
                }),
                Refusal::BadUsername,
            ),
            (
                good.client_id.clone(),
                Some(Login {
                    username: "dev2&pk1".into(),
                    password: good.password.clone(),
                }),
                Refusal::UnknownDevice,
            ),
            (
                good.client_id.clone(),
                Some(Login {
                    username: good.username.clone(),
                    password: "00".into(),
                }),
                Refusal::BadSignature,
            ),
        ];
        for (client_id, login, expected) in cases {
            let got = authenticate(&client_id, login.as_ref(), &hooks, UNCHECKED).unwrap_err();
            assert_eq!(got, expected, "{client_id}");
        }

        let disabled = OneDevice { enabled: false };
        assert_eq!(
            authenticate(&good.client_id, Some(&login(&good)), &disabled, UNCHECKED).unwrap_err(),
            Refusal::DisabledDevice
        );
        // A wrong signature on a disabled device does not reveal that it is disabled.
        let wrong = Login {
            username: good.username.clone(),
            password: "00".into(),
        };
        assert_eq!(
            authenticate(&good.client_id, Some(&wrong), &disabled, UNCHECKED).unwrap_err(),
            Refusal::BadSignature
        );

        assert_eq!(
            Refusal::BadSignature.code(),
            ConnectReturnCode::BadUserNamePassword
        );
        assert_eq!(
            Refusal::DisabledDevice.code(),
            ConnectReturnCode::NotAuthorized
        );
        assert_eq!(
            Refusal::MalformedClientId.code(),
            ConnectReturnCode::ClientIdentifierNotValid
        );
    }

    #[test]
    fn timestamps_outside_the_window_are_refused() {
        let hooks = OneDevice { enabled: true };
        // 2024-01-01T00:00:00Z.
        let now_ms: u64 = 1_704_067_200_000;
        let window = Some(Duration::from_secs(300));
        let s = |secs: i64| Some(((now_ms / 1000) as i64 + secs).to_string());
        let ms = |millis: i64| Some((now_ms as i64 + millis).to_string());
        // (timestamp as sent, window, accepted)
        let cases: Vec<(Option<String>, Option<Duration>, bool)> = vec![
            // Off (the default): anything signed goes, as with the vendor's broker.
            (Some("978307200".into()), None, true), // 2001
            (s(10 * 365 * 86_400), None, true),     // ten years ahead
            (None, None, true),
            // On: no timestamp is still accepted (SDKs may leave it out).
            (None, window, true),
            (s(0), window, true),
            (ms(0), window, true),
            (s(300), window, true), // the window's edges are inside
            (s(-300), window, true),
            (ms(300_000), window, true),
            (ms(300_001), window, false),
            (s(301), window, false),
            (s(-301), window, false),
            (Some("978307200".into()), window, false), // 2001, in seconds
            (Some("978307200000".into()), window, false), // 2001, in milliseconds
            (s(10 * 365 * 86_400), window, false),     // ten years ahead
            (Some("0".into()), window, false),
            (Some("99999999999999999999999".into()), window, false), // not a time
        ];
        for (ts, window, accepted) in cases {
            let c =
                LinkCredentials::new("pk1", "dev1", "s3cr3t", SignMethod::HmacSha1, 3, ts.clone());
            let freshness = Freshness { window, now_ms };
            let got = authenticate(&c.client_id, Some(&login(&c)), &hooks, freshness);
            match accepted {
                true => assert!(got.is_ok(), "{ts:?} {window:?}: {got:?}"),
                false => assert_eq!(got.unwrap_err(), Refusal::Timestamp, "{ts:?} {window:?}"),
            }
        }
        // Checked after the signature: a forged CONNECT learns nothing about the window.
        let old = LinkCredentials::new("pk1", "dev1", "s3cr3t", SignMethod::HmacSha1, 3, s(-3600));
        let forged = Login {
            username: old.username.clone(),
            password: "00".into(),
        };
        let freshness = Freshness { window, now_ms };
        assert_eq!(
            authenticate(&old.client_id, Some(&forged), &hooks, freshness).unwrap_err(),
            Refusal::BadSignature
        );
        assert_eq!(Refusal::Timestamp.code(), ConnectReturnCode::NotAuthorized);
        assert_eq!(Refusal::Timestamp.reason(), "timestamp");
    }

    #[test]
    fn router_client_ids_are_escaped_and_distinct() {
        let key = |pk: &str, dn: &str| DeviceKey {
            product_key: pk.into(),
            device_name: dn.into(),
        };
        assert_eq!(router_client_id(&key("pk", "a/b+c")), "pk&a%2Fb%2Bc");
        assert_ne!(
            router_client_id(&key("a&b", "c")),
            router_client_id(&key("a", "b&c"))
        );
        let id = router_client_id(&key("p$", "#%"));
        assert!(!id.contains(['+', '$', '#', '/']));
        assert_eq!(id.matches('&').count(), 1);
    }
}
