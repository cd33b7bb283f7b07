//! `[mqtt]`: the MQTT listeners (plain and TLS), payload, subscription and connection limits,
//! CONNECT timeouts and timestamp window, and who may send a PROXY header.

use crate::proxy_protocol::{ProxyMode, ProxyPolicy, TrustedNet};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSettings {
    /// Plain TCP listener (securemode=3). Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Set by [`Settings::load`] when `listen` is the built-in default (no file key, flag or
    /// environment variable gave it): a taken default port then falls back to the next free
    /// one ([`crate::listen`]). Never read from a file.
    #[serde(skip)]
    pub listen_is_default: bool,
    /// Optional TLS listener (securemode=2).
    pub tls: Option<TlsSettings>,
    /// Authenticated sessions; beyond it a new device gets CONNACK "server unavailable".
    pub max_connections: usize,
    /// Seconds a new socket may take to send CONNECT (including the TLS handshake).
    pub connect_timeout_secs: u64,
    /// Largest MQTT packet accepted, bytes.
    pub max_payload_bytes: usize,
    /// Most distinct subscription filters one device may use while the gateway runs (SUBACK
    /// 0x80 beyond; the `_ss=1` filters the gateway subscribes itself do not count). A filter
    /// once used stays free to subscribe again; unsubscribing does not give the slot back,
    /// because the router keeps every filter's log (docs/SECURITY.md).
    pub max_subscriptions_per_device: usize,
    /// Most OTA modules the registry keeps per device; version reports of further modules are
    /// dropped and counted.
    pub max_modules_per_device: usize,
    /// Refuse a CONNECT whose signed `timestamp=` is further than this from the gateway's
    /// clock, seconds (CONNACK 5, `reason="timestamp"`); 0 = not checked, like the vendor's
    /// broker. A CONNECT without a timestamp is always accepted.
    pub connect_timestamp_window_secs: u64,
    /// Open MQTT sockets (plain and TLS, authenticated or not); beyond it new sockets are
    /// closed at once. Default: what the open-files limit leaves after the reserve and HTTP.
    pub max_sockets: Option<usize>,
    /// Sockets without an authenticated CONNECT yet from one source address (IPv6: one /64).
    /// Default: 512, or a quarter of the MQTT socket budget when that is less.
    pub max_unauthenticated_per_ip: Option<usize>,
    /// From this many sockets without an authenticated CONNECT on, new sockets get
    /// `connect_timeout_under_pressure_secs`. Default: an eighth of the MQTT socket budget.
    pub pressure_unauthenticated: Option<usize>,
    /// The CONNECT timeout of sockets accepted under pressure, seconds.
    pub connect_timeout_under_pressure_secs: u64,
    /// PROXY protocol (v1 and v2) from the balancers in `proxy_trusted`: `off`; `trusted`
    /// (their sockets must start with a header naming the client, other sockets are served as
    /// they are); `required` (as `trusted`, and sockets from anywhere else are closed at
    /// accept). The client address in the header is the connection's peer: per-source caps,
    /// logs, `client_ip`.
    pub proxy_protocol: ProxyMode,
    /// Addresses or networks (CIDR) of the balancers allowed to send PROXY headers; needed
    /// unless `proxy_protocol` is `off`.
    pub proxy_trusted: Vec<TrustedNet>,
}

impl Default for MqttSettings {
    fn default() -> Self {
        MqttSettings {
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            listen_is_default: false,
            tls: None,
            max_connections: 100_000,
            connect_timeout_secs: 10,
            max_payload_bytes: 256 * 1024,
            max_subscriptions_per_device: 50,
            max_modules_per_device: 64,
            connect_timestamp_window_secs: 0,
            max_sockets: None,
            max_unauthenticated_per_ip: None,
            pressure_unauthenticated: None,
            connect_timeout_under_pressure_secs: 2,
            proxy_protocol: ProxyMode::Off,
            proxy_trusted: Vec::new(),
        }
    }
}

impl MqttSettings {
    /// `proxy_protocol` and `proxy_trusted` as the broker takes them.
    pub fn proxy_policy(&self) -> ProxyPolicy {
        ProxyPolicy {
            mode: self.proxy_protocol,
            trusted: self.proxy_trusted.clone(),
        }
    }

    /// `connect_timestamp_window_secs` as the broker takes it (`None`: not checked).
    pub fn connect_timestamp_window(&self) -> Option<std::time::Duration> {
        (self.connect_timestamp_window_secs > 0)
            .then(|| std::time::Duration::from_secs(self.connect_timestamp_window_secs))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    pub listen: SocketAddr,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}
