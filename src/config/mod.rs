//! The settings tree: built-in defaults, then a TOML file (`--config`), then `FLEETGATE_…`
//! environment variables and command-line flags (clap merges those two, flags winning).
//!
//! Everything here is plain data; [`crate::app::Application`] turns it into running parts.
//! Secrets (API tokens) never appear in `Debug` output.

use crate::forwarder::{AmqpSettings, ForwarderError, QueueType};
use crate::proxy_protocol::{ProxyMode, TrustedNet};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

mod api;
mod export;
mod http;
mod mqtt;
mod ota;
#[cfg(test)]
mod tests;

pub use api::{ApiSettings, Secret, TokenSetting};
pub use export::ExportSettings;
pub use http::HttpSettings;
pub use mqtt::{MqttSettings, TlsSettings};
pub use ota::OtaSettings;

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
    /// `properties_flush_ms`, `offline_queue_max`, `offline_queue_ttl_secs`; docs/COMMANDS.md).
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
    for (listener, policy) in [
        ("mqtt", s.mqtt.proxy_policy()),
        ("http", s.http.proxy_policy()),
    ] {
        if policy.mode != ProxyMode::Off {
            let trusted: Vec<String> = policy.trusted.iter().map(|n| n.to_string()).collect();
            lines.push(format!(
                "{listener} PROXY protocol {} from {}",
                policy.mode,
                trusted.join(", ")
            ));
        }
    }
    lines.push(format!("data dir {}", s.data_dir.display()));
    lines.push(format!("store {}", s.store.location(&s.data_dir)));
    lines.push(match &s.amqp.url {
        Some(_) if s.amqp.exchange_prefix.is_empty() => format!(
            "amqp forwarding on (exchange prefix: this installation's own; {} queues)",
            s.amqp.queue_type
        ),
        Some(_) => format!(
            "amqp forwarding on (exchange prefix `{}`; {} queues)",
            s.amqp.exchange_prefix, s.amqp.queue_type
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
    /// `amqp.queue_type`.
    pub amqp_queue_type: Option<QueueType>,
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
    pub http_proxy_protocol: Option<ProxyMode>,
    pub http_proxy_trusted: Option<Vec<TrustedNet>>,
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
        if let Some(v) = o.amqp_queue_type {
            self.amqp.queue_type = v;
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
        if let Some(v) = o.http_proxy_protocol {
            self.http.proxy_protocol = v;
        }
        if let Some(v) = o.http_proxy_trusted {
            self.http.proxy_trusted = v;
        }
        self.apply_tls(o.mqtt_tls_listen, o.tls_cert, o.tls_key)
    }

    /// The TLS listener's overrides, over what the file set: both a certificate and a key in
    /// the end, or an error.
    fn apply_tls(
        &mut self,
        listen: Option<SocketAddr>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<(), ConfigError> {
        if listen.is_none() && cert.is_none() && key.is_none() {
            return Ok(());
        }
        let current = self.mqtt.tls.take();
        let listen = listen
            .or(current.as_ref().map(|t| t.listen))
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8883)));
        let cert = cert.or(current.as_ref().map(|t| t.cert.clone()));
        let key = key.or(current.as_ref().map(|t| t.key.clone()));
        match (cert, key) {
            (Some(cert), Some(key)) => {
                self.mqtt.tls = Some(TlsSettings { listen, cert, key });
                Ok(())
            }
            _ => Err(ConfigError::Invalid {
                field: "mqtt.tls",
                message: "the TLS listener needs both a certificate and a key".into(),
            }),
        }
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
        for (field, policy) in [
            ("mqtt.proxy_trusted", self.mqtt.proxy_policy()),
            ("http.proxy_trusted", self.http.proxy_policy()),
        ] {
            if policy.mode != ProxyMode::Off && policy.trusted.is_empty() {
                return Err(ConfigError::Invalid {
                    field,
                    message: format!(
                        "proxy_protocol = \"{}\" needs the balancers' addresses (e.g. \
                         [\"10.0.0.5\", \"10.0.1.0/24\"])",
                        policy.mode
                    ),
                });
            }
        }
        self.validate_mqtt()?;
        self.validate_http()?;
        self.validate_ota()?;
        if let Err(ForwarderError::Invalid { field, message }) = self.amqp.validate() {
            return Err(ConfigError::Invalid { field, message });
        }
        self.validate_export_and_store()?;
        self.validate_commands()?;
        if self.migration.batch_size == 0 || self.migration.batch_size > 10_000 {
            return Err(ConfigError::Invalid {
                field: "migration.batch_size",
                message: "must be 1..=10000".into(),
            });
        }
        self.validate_tokens()?;
        Ok(())
    }

    /// The `[mqtt]` sizes and the CONNECT timestamp window.
    fn validate_mqtt(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// The `[http]` public URL and body limits.
    fn validate_http(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// The `[ota]` section.
    fn validate_ota(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// The `[export]` unpacking limits and the `[store]` section.
    fn validate_export_and_store(&self) -> Result<(), ConfigError> {
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
        if self.store.commit_delay_us.is_some_and(|us| us > 100_000) {
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
        Ok(())
    }

    /// The `[commands]` section.
    fn validate_commands(&self) -> Result<(), ConfigError> {
        if self.commands.broadcast_per_sec == 0 {
            return Err(ConfigError::Invalid {
                field: "commands.broadcast_per_sec",
                message: "must be at least 1".into(),
            });
        }
        if self.commands.offline_queue_ttl_secs == 0 {
            return Err(ConfigError::Invalid {
                field: "commands.offline_queue_ttl_secs",
                message: "must be at least 1".into(),
            });
        }
        if self.commands.max_records == 0 {
            return Err(ConfigError::Invalid {
                field: "commands.max_records",
                message: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    /// The roles and lengths of `[[api.tokens]]`.
    fn validate_tokens(&self) -> Result<(), ConfigError> {
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
