//! `[http]`: the HTTP API listener, its public URL, body limits, connection limits, timeouts
//! and PROXY protocol.

use crate::proxy_protocol::{ProxyMode, ProxyPolicy, TrustedNet};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    /// As [`MqttSettings::listen_is_default`], for the HTTP listener.
    #[serde(skip)]
    pub listen_is_default: bool,
    /// Base URL devices use to reach this gateway's HTTP side (firmware download links).
    /// Defaults to `http://{listen}` with the bound address.
    pub public_url: Option<String>,
    /// Largest body of a JSON request, bytes (413 beyond; default 1 MiB).
    pub json_body_limit_bytes: usize,
    /// Largest body of a device-list request (batch create, migration canary/rollback, OTA
    /// jobs with an uploaded list), bytes (default 16 MiB). Firmware uploads and imports
    /// follow `ota.max_firmware_bytes` and `export.max_package_bytes`.
    pub batch_body_limit_bytes: usize,
    /// Open HTTP connections; beyond it new ones are closed at once. Default: 1024, or an
    /// eighth of what the open-files limit leaves after the reserve when that is less.
    pub max_connections: Option<usize>,
    /// Open HTTP connections from one source address (IPv6: one /64). Default: 256, or a
    /// quarter of the HTTP budget when that is less.
    pub max_connections_per_ip: Option<usize>,
    /// Seconds a connection may take to deliver a complete request head, counted from accept
    /// or from the end of the previous response (so it is also the keep-alive idle timeout).
    pub header_read_timeout_secs: u64,
    /// Seconds a request body may deliver nothing before the request fails.
    pub body_read_timeout_secs: u64,
    /// Seconds a response write may make no progress (the client stopped reading) before the
    /// connection is closed.
    pub write_timeout_secs: u64,
    /// PROXY protocol (v1 and v2) from the balancers in `proxy_trusted`, as `mqtt.proxy_protocol`:
    /// `off`; `trusted` (their connections must start with a header naming the client, other
    /// connections are served as they are); `required` (as `trusted`, and connections from
    /// anywhere else are closed at accept). The client address in the header is the
    /// connection's peer: per-source cap, access log.
    pub proxy_protocol: ProxyMode,
    /// Addresses or networks (CIDR) of the balancers allowed to send PROXY headers; needed
    /// unless `proxy_protocol` is `off`.
    pub proxy_trusted: Vec<TrustedNet>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            listen_is_default: false,
            public_url: None,
            json_body_limit_bytes: crate::api::DEFAULT_JSON_BODY_LIMIT,
            batch_body_limit_bytes: crate::api::DEFAULT_BATCH_BODY_LIMIT,
            max_connections: None,
            max_connections_per_ip: None,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 30,
            write_timeout_secs: 30,
            proxy_protocol: ProxyMode::Off,
            proxy_trusted: Vec::new(),
        }
    }
}

impl HttpSettings {
    /// `proxy_protocol` and `proxy_trusted` as the HTTP listener takes them.
    pub fn proxy_policy(&self) -> ProxyPolicy {
        ProxyPolicy {
            mode: self.proxy_protocol,
            trusted: self.proxy_trusted.clone(),
        }
    }
}
