//! The settings tree: built-in defaults, then a TOML file (`--config`), then `FLEETGATE_…`
//! environment variables and command-line flags (clap merges those two, flags winning).
//!
//! Everything here is plain data; [`crate::app::Application`] turns it into running parts.
//! Secrets (API tokens) never appear in `Debug` output.

use crate::forwarder::{AmqpSettings, ForwarderError};
use crate::proxy_protocol::{ProxyMode, ProxyPolicy, TrustedNet};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Top of the settings tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where the store and the API token live.
    pub data_dir: PathBuf,
    /// Open-file descriptors kept for the gateway's own files (store, outbox, listeners, AMQP,
    /// export packages); the MQTT and HTTP connection budgets share the rest of the open-files
    /// limit (see [`crate::admission`]).
    pub open_files_reserve: u64,
    pub mqtt: MqttSettings,
    pub http: HttpSettings,
    pub amqp: AmqpSettings,
    pub api: ApiSettings,
    /// Instance migration (`[migration]`: `devices_per_sec`, `batch_size`).
    pub migration: crate::migration::EngineConfig,
    pub ota: OtaSettings,
    pub export: ExportSettings,
    /// The registry store (`[store]`: `url`, `synchronous`, `commit_delay_us`,
    /// `commit_siblings`).
    pub store: crate::store::StoreSettings,
    /// Cluster mode (`[cluster]`: `nats_url`, `node_id`, `name`, …; docs/CLUSTER.md).
    pub cluster: crate::cluster::ClusterSettings,
    /// Cloud-to-device commands (`[commands]`: `broadcast_per_sec`, `max_records`,
    /// `properties_flush_ms`; docs/COMMANDS.md).
    pub commands: crate::command::CommandSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: PathBuf::from("./fleetgate-data"),
            open_files_reserve: 128,
            mqtt: MqttSettings::default(),
            http: HttpSettings::default(),
            amqp: AmqpSettings::default(),
            api: ApiSettings::default(),
            migration: crate::migration::EngineConfig::default(),
            ota: OtaSettings::default(),
            export: ExportSettings::default(),
            store: crate::store::StoreSettings::default(),
            cluster: crate::cluster::ClusterSettings::default(),
            commands: crate::command::CommandSettings::default(),
        }
    }
}

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
        }
    }
}

/// `[ota]`: firmware packages and upgrade pushes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtaSettings {
    /// Largest firmware package accepted by an upload, bytes (default 256 MiB).
    pub max_firmware_bytes: u64,
    /// How long a firmware download link sent to a device stays valid, seconds (default 24 h).
    pub download_url_ttl_secs: u64,
    /// After a device connects, wait this long before pushing an upgrade to it, ms (it
    /// subscribes after the CONNACK; a version report from the device ends the wait early).
    pub connect_push_delay_ms: u64,
    /// Progress-percent updates are written in batches this often, ms.
    pub progress_flush_ms: u64,
}

impl Default for OtaSettings {
    fn default() -> Self {
        OtaSettings {
            max_firmware_bytes: 256 * 1024 * 1024,
            download_url_ttl_secs: 24 * 3600,
            connect_push_delay_ms: 1_000,
            progress_flush_ms: 200,
        }
    }
}

/// `[export]`: export/import jobs (see docs/EXPORT.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportSettings {
    /// Export/import starts per minute (governor bucket refill).
    pub start_per_minute: u32,
    /// Starts allowed at once before the rate applies.
    pub start_burst: u32,
    /// Status/log/package reads per second.
    pub reads_per_second: u32,
    pub reads_burst: u32,
    /// Jobs running at once; more starts get 429.
    pub max_jobs_in_flight: usize,
    /// Package bytes held by running jobs; more gets 429.
    pub max_bytes_in_flight: u64,
    /// Largest import upload, bytes (default 512 MiB; imports are verified in memory).
    pub max_package_bytes: u64,
    /// Largest file an import package may unpack to, in real inflated bytes (default
    /// 256 MiB, like `ota.max_firmware_bytes`); a larger one refuses the package with 413.
    pub max_unpacked_entry_bytes: u64,
    /// Most an import package may unpack to, all files together (default 1 GiB); beyond it
    /// the package is refused with 413.
    pub max_unpacked_bytes: u64,
    /// PBKDF2 iterations for the secrets key of new packages.
    pub kdf_iterations: u32,
}

impl Default for ExportSettings {
    fn default() -> Self {
        ExportSettings {
            start_per_minute: 30,
            start_burst: 10,
            reads_per_second: 50,
            reads_burst: 200,
            max_jobs_in_flight: 4,
            max_bytes_in_flight: 1024 * 1024 * 1024,
            max_package_bytes: 512 * 1024 * 1024,
            max_unpacked_entry_bytes: 256 * 1024 * 1024,
            max_unpacked_bytes: 1024 * 1024 * 1024,
            kdf_iterations: 100_000,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    /// The admin token. Without it, the first start creates one in the data dir and prints it.
    pub token: Option<Secret>,
    /// Further tokens with their roles.
    pub tokens: Vec<TokenSetting>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSetting {
    pub token: Secret,
    /// `admin`, `operator` or `viewer`.
    pub role: String,
}

/// A string that `Debug` and `Display` never show.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Without the excerpt of the file that TOML errors quote: the line may hold a secret (a
    /// password in `store.url`, a token).
    #[error("invalid config file {path} ({location}): {message}")]
    Parse {
        path: PathBuf,
        /// `line L, column C`.
        location: String,
        message: String,
    },
    #[error("invalid setting {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let location = match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            format!(
                "line {}, column {}",
                before.matches('\n').count() + 1,
                before[line_start..].chars().count() + 1
            )
        }
        None => "position unknown".into(),
    };
    ConfigError::Parse {
        path: path.to_owned(),
        location,
        message: e.message().trim_end().to_owned(),
    }
}

/// What a set of settings will do, one line per part, secrets left out (`fleetgate
/// check-config`).
pub fn summary(s: &Settings) -> Vec<String> {
    let fallback = |is_default: bool| {
        if is_default {
            " (the next free port when taken)"
        } else {
            ""
        }
    };
    let mut lines = vec![
        format!(
            "mqtt listen {}{}",
            s.mqtt.listen,
            fallback(s.mqtt.listen_is_default)
        ),
        format!(
            "http listen {}{}",
            s.http.listen,
            fallback(s.http.listen_is_default)
        ),
    ];
    if let Some(tls) = &s.mqtt.tls {
        lines.push(format!("mqtt tls listen {}", tls.listen));
    }
    if s.mqtt.proxy_protocol != ProxyMode::Off {
        let trusted: Vec<String> = s.mqtt.proxy_trusted.iter().map(|n| n.to_string()).collect();
        lines.push(format!(
            "mqtt PROXY protocol {} from {}",
            s.mqtt.proxy_protocol,
            trusted.join(", ")
        ));
    }
    lines.push(format!("data dir {}", s.data_dir.display()));
    lines.push(format!("store {}", s.store.location(&s.data_dir)));
    lines.push(match &s.amqp.url {
        Some(_) if s.amqp.exchange_prefix.is_empty() => {
            "amqp forwarding on (exchange prefix: this installation's own)".into()
        }
        Some(_) => format!(
            "amqp forwarding on (exchange prefix `{}`)",
            s.amqp.exchange_prefix
        ),
        None => "amqp forwarding off".into(),
    });
    lines.push(match &s.cluster.nats_url {
        Some(_) => format!("cluster `{}`, node {}", s.cluster.name, s.cluster.node_id),
        None => "single node".into(),
    });
    lines.push(format!(
        "api tokens: admin {}, {} more",
        if s.api.token.is_some() {
            "given"
        } else {
            "from the data dir (created on first start)"
        },
        s.api.tokens.len()
    ));
    lines
}

/// Values from flags or environment variables; `None` leaves the file/default value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub amqp_exchange_prefix: Option<String>,
    pub mqtt_listen: Option<SocketAddr>,
    pub mqtt_tls_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub http_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub amqp_url: Option<String>,
    pub api_token: Option<String>,
    pub public_url: Option<String>,
    /// `postgres://…`: the store in PostgreSQL instead of SQLite in the data dir.
    pub store_url: Option<String>,
    /// Cluster mode: NATS URL, node id, cluster name, heartbeat and node timeout.
    pub nats_url: Option<String>,
    pub node_id: Option<u16>,
    pub cluster_name: Option<String>,
    pub cluster_heartbeat_ms: Option<u64>,
    pub cluster_node_timeout_ms: Option<u64>,
    pub cluster_lease_ttl_ms: Option<u64>,
    pub mqtt_max_subscriptions_per_device: Option<usize>,
    pub mqtt_max_modules_per_device: Option<usize>,
    pub mqtt_connect_timestamp_window_secs: Option<u64>,
    pub open_files_reserve: Option<u64>,
    pub mqtt_max_sockets: Option<usize>,
    pub mqtt_max_unauthenticated_per_ip: Option<usize>,
    pub mqtt_pressure_unauthenticated: Option<usize>,
    pub mqtt_connect_timeout_under_pressure_secs: Option<u64>,
    pub mqtt_proxy_protocol: Option<ProxyMode>,
    pub mqtt_proxy_trusted: Option<Vec<TrustedNet>>,
    pub http_max_connections: Option<usize>,
    pub http_max_connections_per_ip: Option<usize>,
    pub http_header_read_timeout_secs: Option<u64>,
    pub http_body_read_timeout_secs: Option<u64>,
    pub http_write_timeout_secs: Option<u64>,
}

impl Settings {
    /// Defaults, then the file (if any), then the overrides.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Settings, ConfigError> {
        // Whether the file sets each listener's address: (mqtt, http).
        let (mut settings, file_listens): (Settings, (bool, bool)) = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                let settings = toml::from_str(&text).map_err(|e| parse_error(path, &text, &e))?;
                let table: toml::Table = toml::from_str(&text).unwrap_or_default();
                let sets =
                    |section: &str| table.get(section).and_then(|s| s.get("listen")).is_some();
                (settings, (sets("mqtt"), sets("http")))
            }
            None => (Settings::default(), (false, false)),
        };
        settings.mqtt.listen_is_default = !file_listens.0 && overrides.mqtt_listen.is_none();
        settings.http.listen_is_default = !file_listens.1 && overrides.http_listen.is_none();
        settings.apply(overrides)?;
        settings.validate()?;
        Ok(settings)
    }

    fn apply(&mut self, o: Overrides) -> Result<(), ConfigError> {
        if let Some(v) = o.mqtt_listen {
            self.mqtt.listen = v;
        }
        if let Some(v) = o.http_listen {
            self.http.listen = v;
        }
        if let Some(v) = o.data_dir {
            self.data_dir = v;
        }
        if let Some(v) = o.amqp_url {
            self.amqp.url = Some(Secret(v));
        }
        if let Some(v) = o.amqp_exchange_prefix {
            self.amqp.exchange_prefix = v;
        }
        if let Some(v) = o.api_token {
            self.api.token = Some(Secret(v));
        }
        if let Some(v) = o.public_url {
            self.http.public_url = Some(v);
        }
        if let Some(v) = o.nats_url {
            self.cluster.nats_url = Some(Secret(v));
        }
        if let Some(v) = o.node_id {
            self.cluster.node_id = v;
        }
        if let Some(v) = o.cluster_name {
            self.cluster.name = v;
        }
        if let Some(v) = o.cluster_heartbeat_ms {
            self.cluster.heartbeat_ms = v;
        }
        if let Some(v) = o.cluster_node_timeout_ms {
            self.cluster.node_timeout_ms = v;
        }
        if let Some(v) = o.cluster_lease_ttl_ms {
            self.cluster.lease_ttl_ms = v;
        }
        if let Some(v) = o.store_url {
            let url =
                crate::store::PostgresUrl::parse(&v).map_err(|message| ConfigError::Invalid {
                    field: "store.url",
                    message,
                })?;
            self.store.url = Some(url);
        }
        if let Some(v) = o.mqtt_max_subscriptions_per_device {
            self.mqtt.max_subscriptions_per_device = v;
        }
        if let Some(v) = o.mqtt_max_modules_per_device {
            self.mqtt.max_modules_per_device = v;
        }
        if let Some(v) = o.mqtt_connect_timestamp_window_secs {
            self.mqtt.connect_timestamp_window_secs = v;
        }
        if let Some(v) = o.open_files_reserve {
            self.open_files_reserve = v;
        }
        if let Some(v) = o.mqtt_max_sockets {
            self.mqtt.max_sockets = Some(v);
        }
        if let Some(v) = o.mqtt_max_unauthenticated_per_ip {
            self.mqtt.max_unauthenticated_per_ip = Some(v);
        }
        if let Some(v) = o.mqtt_pressure_unauthenticated {
            self.mqtt.pressure_unauthenticated = Some(v);
        }
        if let Some(v) = o.mqtt_connect_timeout_under_pressure_secs {
            self.mqtt.connect_timeout_under_pressure_secs = v;
        }
        if let Some(v) = o.mqtt_proxy_protocol {
            self.mqtt.proxy_protocol = v;
        }
        if let Some(v) = o.mqtt_proxy_trusted {
            self.mqtt.proxy_trusted = v;
        }
        if let Some(v) = o.http_max_connections {
            self.http.max_connections = Some(v);
        }
        if let Some(v) = o.http_max_connections_per_ip {
            self.http.max_connections_per_ip = Some(v);
        }
        if let Some(v) = o.http_header_read_timeout_secs {
            self.http.header_read_timeout_secs = v;
        }
        if let Some(v) = o.http_body_read_timeout_secs {
            self.http.body_read_timeout_secs = v;
        }
        if let Some(v) = o.http_write_timeout_secs {
            self.http.write_timeout_secs = v;
        }
        match (o.mqtt_tls_listen, o.tls_cert, o.tls_key) {
            (None, None, None) => {}
            (listen, cert, key) => {
                let current = self.mqtt.tls.take();
                let listen = listen
                    .or(current.as_ref().map(|t| t.listen))
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8883)));
                let cert = cert.or(current.as_ref().map(|t| t.cert.clone()));
                let key = key.or(current.as_ref().map(|t| t.key.clone()));
                match (cert, key) {
                    (Some(cert), Some(key)) => {
                        self.mqtt.tls = Some(TlsSettings { listen, cert, key })
                    }
                    _ => {
                        return Err(ConfigError::Invalid {
                            field: "mqtt.tls",
                            message: "the TLS listener needs both a certificate and a key".into(),
                        })
                    }
                }
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.cluster
            .validate(self.store.url.is_some())
            .map_err(|(field, message)| ConfigError::Invalid { field, message })?;
        if self.mqtt.max_connections == 0 {
            return Err(ConfigError::Invalid {
                field: "mqtt.max_connections",
                message: "must be at least 1".into(),
            });
        }
        self.validate_limits()?;
        if self.mqtt.proxy_protocol != ProxyMode::Off && self.mqtt.proxy_trusted.is_empty() {
            return Err(ConfigError::Invalid {
                field: "mqtt.proxy_trusted",
                message: format!(
                    "proxy_protocol = \"{}\" needs the balancers' addresses (e.g. \
                     [\"10.0.0.5\", \"10.0.1.0/24\"])",
                    self.mqtt.proxy_protocol
                ),
            });
        }
        if self.mqtt.max_payload_bytes < 1024 {
            return Err(ConfigError::Invalid {
                field: "mqtt.max_payload_bytes",
                message: "must be at least 1024".into(),
            });
        }
        if self.mqtt.max_subscriptions_per_device == 0 {
            return Err(ConfigError::Invalid {
                field: "mqtt.max_subscriptions_per_device",
                message: "must be at least 1".into(),
            });
        }
        if self.mqtt.max_modules_per_device == 0 {
            return Err(ConfigError::Invalid {
                field: "mqtt.max_modules_per_device",
                message: "must be at least 1".into(),
            });
        }
        // Beyond ~68 years a window means nothing, and `Duration` arithmetic stays far from
        // overflowing.
        if self.mqtt.connect_timestamp_window_secs > u64::from(u32::MAX) {
            return Err(ConfigError::Invalid {
                field: "mqtt.connect_timestamp_window_secs",
                message: "must be at most 4294967295 (0 turns the check off)".into(),
            });
        }
        if let Some(url) = &self.http.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::Invalid {
                    field: "http.public_url",
                    message: format!("`{url}` is not an http(s) URL"),
                });
            }
        }
        for (field, value) in [
            (
                "http.json_body_limit_bytes",
                self.http.json_body_limit_bytes,
            ),
            (
                "http.batch_body_limit_bytes",
                self.http.batch_body_limit_bytes,
            ),
        ] {
            if value < 1024 {
                return Err(ConfigError::Invalid {
                    field,
                    message: "must be at least 1024".into(),
                });
            }
        }
        if self.ota.max_firmware_bytes == 0 {
            return Err(ConfigError::Invalid {
                field: "ota.max_firmware_bytes",
                message: "must be at least 1".into(),
            });
        }
        if self.ota.download_url_ttl_secs < 60 {
            return Err(ConfigError::Invalid {
                field: "ota.download_url_ttl_secs",
                message: "must be at least 60 (devices need time to start the download)".into(),
            });
        }
        if self.ota.connect_push_delay_ms > 60_000 {
            return Err(ConfigError::Invalid {
                field: "ota.connect_push_delay_ms",
                message: "must be at most 60000".into(),
            });
        }
        if !(10..=10_000).contains(&self.ota.progress_flush_ms) {
            return Err(ConfigError::Invalid {
                field: "ota.progress_flush_ms",
                message: "must be 10..=10000".into(),
            });
        }
        if let Err(ForwarderError::Invalid { field, message }) = self.amqp.validate() {
            return Err(ConfigError::Invalid { field, message });
        }
        if self.export.max_unpacked_entry_bytes == 0 {
            return Err(ConfigError::Invalid {
                field: "export.max_unpacked_entry_bytes",
                message: "must be at least 1".into(),
            });
        }
        if self.export.max_unpacked_bytes < self.export.max_unpacked_entry_bytes {
            return Err(ConfigError::Invalid {
                field: "export.max_unpacked_bytes",
                message: "must be at least export.max_unpacked_entry_bytes".into(),
            });
        }
        if self.store.commit_delay_us > 100_000 {
            return Err(ConfigError::Invalid {
                field: "store.commit_delay_us",
                message: "must be at most 100000 (0 turns the delay off)".into(),
            });
        }
        if self.store.url.is_some() && self.store.synchronous != crate::store::Synchronous::Full {
            return Err(ConfigError::Invalid {
                field: "store.synchronous",
                message: "applies to SQLite only; with store.url the PostgreSQL server's \
                          synchronous_commit decides durability"
                    .into(),
            });
        }
        if self.store.commit_siblings == 0 {
            return Err(ConfigError::Invalid {
                field: "store.commit_siblings",
                message: "must be at least 1".into(),
            });
        }
        if self.commands.broadcast_per_sec == 0 {
            return Err(ConfigError::Invalid {
                field: "commands.broadcast_per_sec",
                message: "must be at least 1".into(),
            });
        }
        if self.commands.max_records == 0 {
            return Err(ConfigError::Invalid {
                field: "commands.max_records",
                message: "must be at least 1".into(),
            });
        }
        if self.migration.batch_size == 0 || self.migration.batch_size > 10_000 {
            return Err(ConfigError::Invalid {
                field: "migration.batch_size",
                message: "must be 1..=10000".into(),
            });
        }
        for t in &self.api.tokens {
            if !matches!(t.role.as_str(), "admin" | "operator" | "viewer") {
                return Err(ConfigError::Invalid {
                    field: "api.tokens.role",
                    message: format!("unknown role `{}` (admin, operator, viewer)", t.role),
                });
            }
            if t.token.expose().len() < 16 {
                return Err(ConfigError::Invalid {
                    field: "api.tokens.token",
                    message: "tokens must be at least 16 characters".into(),
                });
            }
        }
        Ok(())
    }
}

impl Settings {
    /// The connection limits and timeouts ([`crate::admission`], docs/SECURITY.md).
    fn validate_limits(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: &str| {
            Err(ConfigError::Invalid {
                field,
                message: message.into(),
            })
        };
        for (field, value) in [
            ("mqtt.max_sockets", self.mqtt.max_sockets),
            (
                "mqtt.pressure_unauthenticated",
                self.mqtt.pressure_unauthenticated,
            ),
            ("http.max_connections", self.http.max_connections),
            (
                "mqtt.max_unauthenticated_per_ip",
                self.mqtt.max_unauthenticated_per_ip,
            ),
            (
                "http.max_connections_per_ip",
                self.http.max_connections_per_ip,
            ),
        ] {
            if value == Some(0) {
                return invalid(field, "must be at least 1");
            }
        }
        for (field, secs) in [
            ("mqtt.connect_timeout_secs", self.mqtt.connect_timeout_secs),
            (
                "mqtt.connect_timeout_under_pressure_secs",
                self.mqtt.connect_timeout_under_pressure_secs,
            ),
            (
                "http.header_read_timeout_secs",
                self.http.header_read_timeout_secs,
            ),
            (
                "http.body_read_timeout_secs",
                self.http.body_read_timeout_secs,
            ),
            ("http.write_timeout_secs", self.http.write_timeout_secs),
        ] {
            if !(1..=3600).contains(&secs) {
                return invalid(field, "must be 1..=3600 seconds");
            }
        }
        if self.mqtt.connect_timeout_under_pressure_secs > self.mqtt.connect_timeout_secs {
            return invalid(
                "mqtt.connect_timeout_under_pressure_secs",
                "must not exceed mqtt.connect_timeout_secs",
            );
        }
        if self.open_files_reserve < 32 {
            return invalid(
                "open_files_reserve",
                "must be at least 32 (the store, the outbox and the listeners need them)",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_design() {
        let s = Settings::load(None, Overrides::default()).unwrap();
        assert_eq!(s.mqtt.listen.port(), 1883);
        assert_eq!(s.http.listen.port(), 8080);
        assert_eq!(s.data_dir, PathBuf::from("./fleetgate-data"));
        assert!(s.amqp.url.is_none());
        assert_eq!(s.ota.max_firmware_bytes, 256 * 1024 * 1024);
        assert_eq!(s.ota.download_url_ttl_secs, 86_400);
    }

    #[test]
    fn only_built_in_listen_addresses_may_fall_back() {
        let s = Settings::load(None, Overrides::default()).unwrap();
        assert!(s.mqtt.listen_is_default && s.http.listen_is_default);
        // A flag or environment variable (both arrive as overrides), even naming the default.
        let s = Settings::load(
            None,
            Overrides {
                mqtt_listen: Some("0.0.0.0:1883".parse().unwrap()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert!(!s.mqtt.listen_is_default && s.http.listen_is_default);
        // The config file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.toml");
        std::fs::write(&path, "[http]\nlisten = \"0.0.0.0:8080\"\n").unwrap();
        let s = Settings::load(Some(&path), Overrides::default()).unwrap();
        assert!(s.mqtt.listen_is_default && !s.http.listen_is_default);
        // Settings built in code bind what they say.
        assert!(!Settings::default().mqtt.listen_is_default);
        assert!(!Settings::default().http.listen_is_default);
    }

    #[test]
    fn export_unpack_limits_from_file_and_checked() {
        let s = Settings::load(None, Overrides::default()).unwrap();
        assert_eq!(s.export.max_unpacked_entry_bytes, 256 * 1024 * 1024);
        assert_eq!(s.export.max_unpacked_bytes, 1024 * 1024 * 1024);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.toml");
        std::fs::write(
            &path,
            "[export]\nmax_unpacked_entry_bytes = 1000\nmax_unpacked_bytes = 5000\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(
            (
                s.export.max_unpacked_entry_bytes,
                s.export.max_unpacked_bytes
            ),
            (1000, 5000)
        );
        for (toml, field) in [
            (
                "max_unpacked_entry_bytes = 0",
                "export.max_unpacked_entry_bytes",
            ),
            (
                "max_unpacked_entry_bytes = 1000\nmax_unpacked_bytes = 999",
                "export.max_unpacked_bytes",
            ),
        ] {
            std::fs::write(&path, format!("[export]\n{toml}\n")).unwrap();
            match Settings::load(Some(&path), Overrides::default()) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{toml}: {other:?}"),
            }
        }
    }

    #[test]
    fn ota_section_from_file_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.toml");
        std::fs::write(
            &path,
            "[ota]\nmax_firmware_bytes = 1048576\ndownload_url_ttl_secs = 600\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(s.ota.max_firmware_bytes, 1_048_576);
        assert_eq!(s.ota.download_url_ttl_secs, 600);
        std::fs::write(&path, "[ota]\ndownload_url_ttl_secs = 5\n").unwrap();
        assert!(matches!(
            Settings::load(Some(&path), Overrides::default()),
            Err(ConfigError::Invalid {
                field: "ota.download_url_ttl_secs",
                ..
            })
        ));
        std::fs::write(&path, "[ota]\nmax_firmware_bytes = 0\n").unwrap();
        assert!(matches!(
            Settings::load(Some(&path), Overrides::default()),
            Err(ConfigError::Invalid {
                field: "ota.max_firmware_bytes",
                ..
            })
        ));
    }

    #[test]
    fn http_body_limits_from_file_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.toml");
        let load = |toml: &str| {
            std::fs::write(&path, toml).unwrap();
            Settings::load(Some(&path), Overrides::default())
        };
        let d = Settings::default().http;
        assert_eq!(
            (d.json_body_limit_bytes, d.batch_body_limit_bytes),
            (1024 * 1024, 16 * 1024 * 1024)
        );
        let s = load(
            "[http]
json_body_limit_bytes = 65536
batch_body_limit_bytes = 2097152
",
        )
        .unwrap();
        assert_eq!(s.http.json_body_limit_bytes, 65_536);
        assert_eq!(s.http.batch_body_limit_bytes, 2_097_152);
        for (toml, field) in [
            (
                "[http]
json_body_limit_bytes = 10
",
                "http.json_body_limit_bytes",
            ),
            (
                "[http]
batch_body_limit_bytes = 0
",
                "http.batch_body_limit_bytes",
            ),
        ] {
            assert!(
                matches!(load(toml), Err(ConfigError::Invalid { field: f, .. }) if f == field),
                "{toml}"
            );
        }
        // The single limit of old releases is gone: a file still naming it fails loudly
        // instead of silently getting other limits.
        let e = load(
            "[http]
body_limit_bytes = 67108864
",
        )
        .unwrap_err();
        assert!(
            matches!(&e, ConfigError::Parse { .. })
                && e.to_string().contains("json_body_limit_bytes"),
            "{e}"
        );
    }

    #[test]
    fn store_section_from_file_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.toml");
        let load = |toml: &str| {
            std::fs::write(&path, toml).unwrap();
            Settings::load(Some(&path), Overrides::default())
        };
        let s =
            load("[store]\nsynchronous = \"normal\"\ncommit_delay_us = 0\ncommit_siblings = 3\n")
                .unwrap();
        assert_eq!(s.store.synchronous, crate::store::Synchronous::Normal);
        assert_eq!(s.store.commit_delay_us, 0);
        assert_eq!(s.store.commit_siblings, 3);
        assert_eq!(
            Settings::default().store,
            crate::store::StoreSettings {
                url: None,
                synchronous: crate::store::Synchronous::Full,
                commit_delay_us: 2_000,
                commit_siblings: 8
            }
        );
        assert!(load("[store]\nsynchronous = \"off\"\n").is_err());
        for (toml, field) in [
            (
                "[store]\ncommit_delay_us = 100001\n",
                "store.commit_delay_us",
            ),
            ("[store]\ncommit_siblings = 0\n", "store.commit_siblings"),
            (
                "[store]\nurl = \"postgres://db/fg\"\nsynchronous = \"normal\"\n",
                "store.synchronous",
            ),
        ] {
            assert!(
                matches!(load(toml), Err(ConfigError::Invalid { field: f, .. }) if f == field),
                "{toml}"
            );
        }
    }

    #[test]
    fn the_store_url_picks_postgres_and_is_checked_where_it_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.toml");
        let data_dir = PathBuf::from("/var/lib/fg");
        assert_eq!(
            Settings::default().store.location(&data_dir),
            crate::store::StoreLocation::Sqlite(data_dir.join("fleetgate.db"))
        );

        std::fs::write(
            &path,
            "[store]\nurl = \"postgres://fg:pw@db:5432/fleetgate\"\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path), Overrides::default()).unwrap();
        let location = s.store.location(&data_dir);
        assert_eq!(
            location.to_string(),
            "PostgreSQL at postgres://fg:***@db:5432/fleetgate"
        );
        assert!(!format!("{s:?}").contains("pw@"));

        // The flag (or FLEETGATE_STORE) wins over the file.
        let o = Overrides {
            store_url: Some("postgresql://other/fg".into()),
            ..Default::default()
        };
        let s = Settings::load(Some(&path), o).unwrap();
        assert_eq!(
            s.store.url.as_ref().map(|u| u.expose()),
            Some("postgresql://other/fg")
        );

        let o = Overrides {
            store_url: Some("/var/lib/fg/fleetgate.db".into()),
            ..Default::default()
        };
        assert!(matches!(
            Settings::load(None, o),
            Err(ConfigError::Invalid { field: "store.url", message }) if message.contains("postgres://")
        ));
        std::fs::write(&path, "[store]\nurl = \"postgres://fg:pw@db:x/fg\"\n").unwrap();
        match Settings::load(Some(&path), Overrides::default()) {
            Err(e @ ConfigError::Parse { .. }) => {
                let message = e.to_string();
                assert!(message.contains("(line 2, column 7)"), "{message}");
                assert!(message.contains("invalid PostgreSQL URL"), "{message}");
                assert!(!message.contains("pw@"), "{message}");
            }
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn mqtt_limits_from_file_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.toml");
        let load = |toml: &str, o: Overrides| {
            std::fs::write(&path, toml).unwrap();
            Settings::load(Some(&path), o)
        };
        let d = Settings::default().mqtt;
        assert_eq!(
            (
                d.max_subscriptions_per_device,
                d.max_modules_per_device,
                d.connect_timestamp_window()
            ),
            (50, 64, None)
        );
        let s = load(
            "[mqtt]\nmax_subscriptions_per_device = 8\nmax_modules_per_device = 4\n\
             connect_timestamp_window_secs = 300\n",
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(s.mqtt.max_subscriptions_per_device, 8);
        assert_eq!(s.mqtt.max_modules_per_device, 4);
        assert_eq!(
            s.mqtt.connect_timestamp_window(),
            Some(std::time::Duration::from_secs(300))
        );
        // Environment/flags win over the file.
        let o = Overrides {
            mqtt_max_subscriptions_per_device: Some(9),
            mqtt_max_modules_per_device: Some(5),
            mqtt_connect_timestamp_window_secs: Some(0),
            ..Default::default()
        };
        let s = load("[mqtt]\nconnect_timestamp_window_secs = 300\n", o).unwrap();
        assert_eq!(s.mqtt.max_subscriptions_per_device, 9);
        assert_eq!(s.mqtt.max_modules_per_device, 5);
        assert_eq!(s.mqtt.connect_timestamp_window(), None);
        for (toml, field) in [
            (
                "[mqtt]\nmax_subscriptions_per_device = 0\n",
                "mqtt.max_subscriptions_per_device",
            ),
            (
                "[mqtt]\nmax_modules_per_device = 0\n",
                "mqtt.max_modules_per_device",
            ),
            (
                "[mqtt]\nconnect_timestamp_window_secs = 4294967296\n",
                "mqtt.connect_timestamp_window_secs",
            ),
        ] {
            assert!(
                matches!(load(toml, Overrides::default()), Err(ConfigError::Invalid { field: f, .. }) if f == field),
                "{toml}"
            );
        }
    }

    #[test]
    fn file_then_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.toml");
        std::fs::write(
            &path,
            "data_dir = \"/var/lib/fg\"\n[mqtt]\nlisten = \"127.0.0.1:1999\"\n[http]\nlisten = \"127.0.0.1:8999\"\n",
        )
        .unwrap();
        let o = Overrides {
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        let s = Settings::load(Some(&path), o).unwrap();
        assert_eq!(s.mqtt.listen, "127.0.0.1:1999".parse().unwrap());
        assert_eq!(s.http.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(s.data_dir, PathBuf::from("/var/lib/fg"));
    }

    #[test]
    fn bad_settings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.toml");
        std::fs::write(&path, "[mqtt]\nlisten = \"nope\"\n").unwrap();
        assert!(matches!(
            Settings::load(Some(&path), Overrides::default()),
            Err(ConfigError::Parse { .. })
        ));
        std::fs::write(&path, "[mqtt]\nlistn = \"127.0.0.1:1\"\n").unwrap();
        assert!(matches!(
            Settings::load(Some(&path), Overrides::default()),
            Err(ConfigError::Parse { .. })
        ));
        let o = Overrides {
            amqp_url: Some("http://x".into()),
            ..Default::default()
        };
        assert!(matches!(
            Settings::load(None, o),
            Err(ConfigError::Invalid {
                field: "amqp.url",
                ..
            })
        ));
        let o = Overrides {
            tls_cert: Some("c.pem".into()),
            ..Default::default()
        };
        assert!(matches!(
            Settings::load(None, o),
            Err(ConfigError::Invalid {
                field: "mqtt.tls",
                ..
            })
        ));
    }

    #[test]
    fn amqp_section_reaches_the_forwarder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.toml");
        std::fs::write(
            &path,
            "[amqp]\nurl = \"amqp://u:p@127.0.0.1:5672/%2f\"\noutbox_max_bytes = 1048576\n\
             inflight_window = 512\nrate_limit_msgs_per_sec = 100\nexchange_prefix = \"fg\"\n\
             queue_message_ttl_secs = 3600\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path), Overrides::default()).unwrap();
        let f = crate::forwarder::ForwarderConfig::new(s.amqp).unwrap();
        assert_eq!(
            f.url.as_ref().map(Secret::expose),
            Some("amqp://u:p@127.0.0.1:5672/%2f")
        );
        assert_eq!((f.outbox_max_bytes, f.inflight_window), (1_048_576, 512));
        assert_eq!(f.rate_limit_msgs_per_sec, Some(100));
        assert_eq!(f.exchange_prefix, "fg");
        assert_eq!(f.queue_message_ttl_secs, 3600);
        assert_eq!(f.reconnect_max_ms, AmqpSettings::default().reconnect_max_ms);
        std::fs::write(&path, "[amqp]\ninflight_window = 0\n").unwrap();
        assert!(matches!(
            Settings::load(Some(&path), Overrides::default()),
            Err(ConfigError::Invalid {
                field: "amqp.inflight_window",
                ..
            })
        ));
        std::fs::write(&path, "[amqp]\nqueue_message_ttl_secs = 4294968\n").unwrap();
        assert!(matches!(
            Settings::load(Some(&path), Overrides::default()),
            Err(ConfigError::Invalid {
                field: "amqp.queue_message_ttl_secs",
                ..
            })
        ));
    }

    #[test]
    fn limits_from_file_and_overrides_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.toml");
        let d = Settings::default();
        assert_eq!(d.open_files_reserve, 128);
        assert_eq!(
            (d.mqtt.max_sockets, d.mqtt.max_unauthenticated_per_ip),
            (None, None)
        );
        assert_eq!(
            (
                d.mqtt.pressure_unauthenticated,
                d.mqtt.connect_timeout_under_pressure_secs
            ),
            (None, 2)
        );
        assert_eq!(
            (d.http.max_connections, d.http.max_connections_per_ip),
            (None, None)
        );
        assert_eq!(
            (
                d.http.header_read_timeout_secs,
                d.http.body_read_timeout_secs,
                d.http.write_timeout_secs
            ),
            (10, 30, 30)
        );

        std::fs::write(
            &path,
            "open_files_reserve = 512
[mqtt]
max_sockets = 5000
max_unauthenticated_per_ip = 8
             pressure_unauthenticated = 100
connect_timeout_under_pressure_secs = 1
             [http]
max_connections = 50
max_connections_per_ip = 4
             header_read_timeout_secs = 3
body_read_timeout_secs = 4
write_timeout_secs = 5
",
        )
        .unwrap();
        let s = Settings::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(s.open_files_reserve, 512);
        assert_eq!(s.mqtt.max_sockets, Some(5000));
        assert_eq!(s.mqtt.max_unauthenticated_per_ip, Some(8));
        assert_eq!(s.mqtt.pressure_unauthenticated, Some(100));
        assert_eq!(s.mqtt.connect_timeout_under_pressure_secs, 1);
        assert_eq!(s.http.max_connections, Some(50));
        assert_eq!(s.http.max_connections_per_ip, Some(4));
        assert_eq!(
            (
                s.http.header_read_timeout_secs,
                s.http.body_read_timeout_secs,
                s.http.write_timeout_secs
            ),
            (3, 4, 5)
        );

        // Flags and env vars win over the file.
        let o = Overrides {
            open_files_reserve: Some(300),
            mqtt_max_sockets: Some(7),
            mqtt_max_unauthenticated_per_ip: Some(2),
            mqtt_pressure_unauthenticated: Some(3),
            mqtt_connect_timeout_under_pressure_secs: Some(2),
            http_max_connections: Some(9),
            http_max_connections_per_ip: Some(1),
            http_header_read_timeout_secs: Some(6),
            http_body_read_timeout_secs: Some(7),
            http_write_timeout_secs: Some(8),
            ..Default::default()
        };
        let s = Settings::load(Some(&path), o).unwrap();
        assert_eq!(s.open_files_reserve, 300);
        assert_eq!(
            (
                s.mqtt.max_sockets,
                s.mqtt.max_unauthenticated_per_ip,
                s.mqtt.pressure_unauthenticated,
                s.mqtt.connect_timeout_under_pressure_secs
            ),
            (Some(7), Some(2), Some(3), 2)
        );
        assert_eq!(
            (
                s.http.max_connections,
                s.http.max_connections_per_ip,
                s.http.header_read_timeout_secs,
                s.http.body_read_timeout_secs,
                s.http.write_timeout_secs
            ),
            (Some(9), Some(1), 6, 7, 8)
        );

        for (toml, field) in [
            (
                "[mqtt]
max_sockets = 0
",
                "mqtt.max_sockets",
            ),
            (
                "[mqtt]
max_unauthenticated_per_ip = 0
",
                "mqtt.max_unauthenticated_per_ip",
            ),
            (
                "[mqtt]
pressure_unauthenticated = 0
",
                "mqtt.pressure_unauthenticated",
            ),
            (
                "[mqtt]
connect_timeout_secs = 5
connect_timeout_under_pressure_secs = 6
",
                "mqtt.connect_timeout_under_pressure_secs",
            ),
            (
                "[mqtt]
connect_timeout_secs = 0
",
                "mqtt.connect_timeout_secs",
            ),
            (
                "[http]
max_connections = 0
",
                "http.max_connections",
            ),
            (
                "[http]
max_connections_per_ip = 0
",
                "http.max_connections_per_ip",
            ),
            (
                "[http]
header_read_timeout_secs = 0
",
                "http.header_read_timeout_secs",
            ),
            (
                "[http]
body_read_timeout_secs = 3601
",
                "http.body_read_timeout_secs",
            ),
            (
                "[http]
write_timeout_secs = 0
",
                "http.write_timeout_secs",
            ),
            (
                "open_files_reserve = 31
",
                "open_files_reserve",
            ),
        ] {
            std::fs::write(&path, toml).unwrap();
            let r = Settings::load(Some(&path), Overrides::default());
            assert!(
                matches!(r, Err(ConfigError::Invalid { field: f, .. }) if f == field),
                "{toml}: {r:?}"
            );
        }
    }

    #[test]
    fn proxy_protocol_from_file_and_overrides_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.toml");
        std::fs::write(
            &path,
            "[mqtt]\nproxy_protocol = \"required\"\nproxy_trusted = [\"10.0.0.5\", \"10.0.1.9/24\"]\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path), Overrides::default()).unwrap();
        let policy = s.mqtt.proxy_policy();
        assert_eq!(policy.mode, ProxyMode::Required);
        let trusted: Vec<String> = policy.trusted.iter().map(|n| n.to_string()).collect();
        assert_eq!(trusted, ["10.0.0.5/32", "10.0.1.0/24"]);
        assert!(summary(&s)
            .iter()
            .any(|l| l == "mqtt PROXY protocol required from 10.0.0.5/32, 10.0.1.0/24"));
        // The environment and flags win over the file.
        let s = Settings::load(
            Some(&path),
            Overrides {
                mqtt_proxy_protocol: Some(ProxyMode::Trusted),
                mqtt_proxy_trusted: Some(vec!["127.0.0.3".parse().unwrap()]),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(s.mqtt.proxy_protocol, ProxyMode::Trusted);
        assert_eq!(s.mqtt.proxy_trusted, ["127.0.0.3".parse().unwrap()]);
        // Turned on without a balancer to trust; a bad address; a bad mode.
        for (toml, error) in [
            ("proxy_protocol = \"trusted\"", "mqtt.proxy_trusted"),
            (
                "proxy_protocol = \"required\"\nproxy_trusted = [\"10.0.0.0/33\"]",
                "neither an IP address",
            ),
            ("proxy_protocol = \"v2\"", "unknown variant"),
        ] {
            std::fs::write(&path, format!("[mqtt]\n{toml}\n")).unwrap();
            let e = Settings::load(Some(&path), Overrides::default()).unwrap_err();
            assert!(e.to_string().contains(error), "{toml}: {e}");
        }
    }

    #[test]
    fn secrets_do_not_leak_in_debug() {
        let o = Overrides {
            api_token: Some("super-secret-token-value".into()),
            ..Default::default()
        };
        let s = Settings::load(None, o).unwrap();
        assert!(!format!("{s:?}").contains("super-secret"));
    }

    /// `fleetgate.example.toml` is the defaults, key for key: every key that has a default is
    /// in it with that value and nothing else is, and the keys shown commented out (those
    /// without a default) are real keys of the right type.
    #[test]
    fn the_example_file_is_every_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fleetgate.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let defaults = toml::Value::try_from(Settings::default()).unwrap();
        let file: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(
            file,
            defaults,
            "fleetgate.example.toml differs from Settings::default(); the defaults are:\n{}",
            toml::to_string_pretty(&Settings::default()).unwrap()
        );
        let loaded = Settings::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(toml::Value::try_from(&loaded).unwrap(), defaults);

        // Uncommented, the optional keys still parse (deny_unknown_fields names any typo).
        let uncommented: String = text
            .lines()
            .filter(|l| *l != "tokens = []")
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if (rest.starts_with('[') && !rest.contains(' '))
                        || rest.split_once(" = ").is_some_and(|(k, _)| {
                            k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        }) =>
                {
                    rest
                }
                _ => l,
            })
            .fold(String::new(), |mut out, l| {
                out.push_str(l);
                out.push('\n');
                out
            });
        let all: Settings =
            toml::from_str(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        assert!(all.mqtt.tls.is_some() && all.mqtt.max_sockets.is_some());
        assert!(all.http.public_url.is_some() && all.http.max_connections_per_ip.is_some());
        assert!(all.amqp.url.is_some() && all.amqp.rate_limit_bytes_per_sec.is_some());
        assert_eq!(all.api.tokens.len(), 1);
        assert!(all.api.token.is_some() && all.store.url.is_some());
        assert!(all.cluster.nats_url.is_some());
    }
}
