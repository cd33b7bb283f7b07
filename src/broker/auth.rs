//! CONNECT authentication: the Alibaba Link "one device, one secret" signature.
//!
//! [`authenticate`] turns a CONNECT's client id, username and password into the device it proves
//! to be, or a [`Refusal`] that carries both the CONNACK return code and the metrics label. It
//! does no I/O beyond [`DeviceHooks::credentials`].
//!
//! `securemode` is lenient on purpose: the vendor defines 2 = TLS and 3 = plain TCP, but SDKs and
//! hand-written clients get it wrong often, and it is not part of the signed text, so enforcing
//! it adds no security (the transport does). Both values are accepted on both listeners.

use super::{DeviceHooks, DeviceKey};
use fleetgate_topics::sign::{parse_username, LinkClientId};
use rumqttd::protocol::{ConnectReturnCode, Login};

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
    /// Not MQTT 3.1.1 (MQTT 5, MQTT 3.1, …).
    Protocol,
    /// The connection limit is reached (or the router refused the link).
    Limit,
}

impl Refusal {
    /// The MQTT 3.1.1 CONNACK return code the client gets.
    pub(crate) fn code(self) -> ConnectReturnCode {
        match self {
            Refusal::MalformedClientId => ConnectReturnCode::ClientIdentifierNotValid,
            Refusal::BadUsername | Refusal::UnknownDevice | Refusal::BadSignature => {
                ConnectReturnCode::BadUserNamePassword
            }
            Refusal::DisabledDevice => ConnectReturnCode::NotAuthorized,
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

/// Checks a CONNECT's credentials. Order matters for what an attacker can learn: the signature
/// is checked before the enabled flag, so only a device's owner learns that it is disabled.
pub(crate) fn authenticate<H: DeviceHooks + ?Sized>(
    client_id: &str,
    login: Option<&Login>,
    hooks: &H,
) -> Result<Authenticated, Refusal> {
    let link_id = LinkClientId::parse(client_id).map_err(|_| Refusal::MalformedClientId)?;
    let login = login.ok_or(Refusal::BadUsername)?;
    let (dn, pk) = parse_username(&login.username).map_err(|_| Refusal::BadUsername)?;
    let creds = hooks.credentials(pk, dn).ok_or(Refusal::UnknownDevice)?;
    if !link_id.verify(pk, dn, &creds.device_secret, &login.password) {
        return Err(Refusal::BadSignature);
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
        let ok = authenticate(&good.client_id, Some(&login(&good)), &hooks).unwrap();
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
            let got = authenticate(&client_id, login.as_ref(), &hooks).unwrap_err();
            assert_eq!(got, expected, "{client_id}");
        }

        let disabled = OneDevice { enabled: false };
        assert_eq!(
            authenticate(&good.client_id, Some(&login(&good)), &disabled).unwrap_err(),
            Refusal::DisabledDevice
        );
        // A wrong signature on a disabled device does not reveal that it is disabled.
        let wrong = Login {
            username: good.username.clone(),
            password: "00".into(),
        };
        assert_eq!(
            authenticate(&good.client_id, Some(&wrong), &disabled).unwrap_err(),
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
