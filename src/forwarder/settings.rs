//! `[amqp]` settings ([`AmqpSettings`], where every field is defined once) and what the
//! forwarder runs with ([`ForwarderConfig`]: the same settings with the exchange prefix
//! resolved).

use super::groups;
use super::limits::RateLimit;
use super::ForwarderError;
use crate::config::Secret;
use serde::{Deserialize, Serialize};
use std::num::NonZeroU32;

/// `[amqp]`: forwarding to RabbitMQ consumer groups (see [`crate::forwarder`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSettings {
    /// `amqp://user:pass@host:port/vhost`; forwarding is off when absent.
    pub url: Option<Secret>,
    /// Exchanges are `{prefix}.{instance_id}`, queues `{prefix}.{instance_id}.{group_id}`.
    /// Empty (the default): this installation's own, `fleetgate-{8 hex digits}`, chosen on
    /// first start and kept in the store, so two gateways sharing a RabbitMQ never feed each
    /// other's groups ([`crate::installation`]). The forwarder runs with the resolved prefix
    /// ([`ForwarderConfig`]).
    pub exchange_prefix: String,
    /// Bound of the durable outbox (`{data_dir}/outbox.db`; in cluster mode the shared table),
    /// bytes (bodies plus a small per-row overhead).
    pub outbox_max_bytes: u64,
    /// How long a message waits for outbox space (back-pressure: the device's PUBACK waits with
    /// it, and its connection reads nothing more) before giving up: a QoS 1 post is then
    /// refused — no PUBACK, connection closed, the device resends it — and anything else (QoS 0
    /// posts, status, OTA events) is dropped and counted (see [`super::OnFull`]).
    pub outbox_full_wait_ms: u64,
    /// Publishes awaiting a broker confirm at once.
    pub inflight_window: usize,
    /// First reconnect delay; doubles per failed attempt up to `reconnect_max_ms` (±20 %
    /// jitter).
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
    /// How often each consumer group's backlog, consumers and consume rate are sampled.
    pub stats_interval_secs: u64,
    /// Default rate limit per target instance, messages per second (none when absent).
    pub rate_limit_msgs_per_sec: Option<u32>,
    /// Default rate limit per target instance, bytes per second (none when absent).
    pub rate_limit_bytes_per_sec: Option<u32>,
    /// Message TTL (`x-message-ttl`) of consumer-group queues created without their own
    /// `message_ttl_secs`, seconds; 0 = messages never expire. At most 4294967. The vendor
    /// keeps 1 day.
    pub queue_message_ttl_secs: u32,
    /// Type of the consumer-group queues this gateway declares: `classic` (the default) or
    /// `quorum` (replicated over the RabbitMQ cluster's nodes, so the loss of one does not lose
    /// queued messages; RabbitMQ 3.10 or later, for the message TTL). Applies to every group:
    /// a queue that already exists with the other type is kept as it is and reported
    /// ([`super::QueueStatus::TypeMismatch`]).
    pub queue_type: QueueType,
}

/// `amqp.queue_type`: the RabbitMQ queue type of consumer-group queues.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// A classic queue (no `x-queue-type` argument: what fleetgate always declared).
    #[default]
    Classic,
    /// A quorum queue (`x-queue-type: quorum`): durable, replicated (Raft) over the RabbitMQ
    /// cluster's nodes.
    Quorum,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }

    /// The other type (what a mismatching queue is, when it is one of the two).
    pub fn other(self) -> QueueType {
        match self {
            QueueType::Classic => QueueType::Quorum,
            QueueType::Quorum => QueueType::Classic,
        }
    }
}

impl std::fmt::Display for QueueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QueueType {
    type Err = String;

    fn from_str(s: &str) -> Result<QueueType, String> {
        match s {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            _ => Err(format!("`{s}` is not a queue type: classic or quorum")),
        }
    }
}

impl Default for AmqpSettings {
    fn default() -> Self {
        AmqpSettings {
            url: None,
            exchange_prefix: String::new(),
            outbox_max_bytes: 256 * 1024 * 1024,
            outbox_full_wait_ms: 2_000,
            inflight_window: 2048,
            reconnect_initial_ms: 200,
            reconnect_max_ms: 30_000,
            stats_interval_secs: 10,
            rate_limit_msgs_per_sec: None,
            rate_limit_bytes_per_sec: None,
            queue_message_ttl_secs: 86_400,
            queue_type: QueueType::Classic,
        }
    }
}

impl AmqpSettings {
    /// Checks the values; the error names the field. An empty exchange prefix is valid (this
    /// installation's own is chosen at start).
    pub fn validate(&self) -> Result<(), ForwarderError> {
        let invalid = |field, message: &str| {
            Err(ForwarderError::Invalid {
                field,
                message: message.into(),
            })
        };
        if let Some(url) = &self.url {
            let url = url.expose();
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                return invalid("amqp.url", "must start with amqp:// or amqps://");
            }
        }
        if !self.exchange_prefix.is_empty()
            && (self.exchange_prefix.len() > 64
                || !self
                    .exchange_prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return invalid(
                "amqp.exchange_prefix",
                "must be 1..=64 of A-Z a-z 0-9 _ - .",
            );
        }
        if self.outbox_max_bytes < 64 * 1024 {
            return invalid("amqp.outbox_max_bytes", "must be at least 65536");
        }
        if !(1..=65_535).contains(&self.inflight_window) {
            return invalid("amqp.inflight_window", "must be 1..=65535");
        }
        if self.reconnect_initial_ms == 0 || self.reconnect_max_ms < self.reconnect_initial_ms {
            return invalid(
                "amqp.reconnect_initial_ms",
                "must be ≥ 1 and ≤ reconnect_max_ms",
            );
        }
        if self.stats_interval_secs == 0 {
            return invalid("amqp.stats_interval_secs", "must be at least 1");
        }
        if self.rate_limit_msgs_per_sec == Some(0) || self.rate_limit_bytes_per_sec == Some(0) {
            return invalid(
                "amqp.rate_limit",
                "a rate limit must be at least 1 (omit it for none)",
            );
        }
        if let Err(message) = groups::validate_message_ttl(self.queue_message_ttl_secs) {
            return invalid("amqp.queue_message_ttl_secs", &message);
        }
        Ok(())
    }

    pub(super) fn default_rate_limit(&self) -> Option<RateLimit> {
        let limit = RateLimit {
            msgs_per_sec: self.rate_limit_msgs_per_sec.and_then(NonZeroU32::new),
            bytes_per_sec: self.rate_limit_bytes_per_sec.and_then(NonZeroU32::new),
        };
        (limit.msgs_per_sec.is_some() || limit.bytes_per_sec.is_some()).then_some(limit)
    }
}

/// What the forwarder runs with: valid `[amqp]` settings whose exchange prefix is resolved
/// (never empty). The app makes it in one place, from the configured settings and
/// [`crate::installation::exchange_prefix`]; it reads like the settings it wraps.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwarderConfig(AmqpSettings);

impl ForwarderConfig {
    /// `amqp` as the forwarder's configuration: valid, and with its exchange prefix set.
    pub fn new(amqp: AmqpSettings) -> Result<ForwarderConfig, ForwarderError> {
        amqp.validate()?;
        if amqp.exchange_prefix.is_empty() {
            return Err(ForwarderError::Invalid {
                field: "amqp.exchange_prefix",
                message: "must be resolved before the forwarder opens (this installation's own \
                          when not configured)"
                    .into(),
            });
        }
        Ok(ForwarderConfig(amqp))
    }

    /// Tests: `amqp` with an empty exchange prefix made the old shared default.
    #[cfg(test)]
    pub(crate) fn for_tests(mut amqp: AmqpSettings) -> ForwarderConfig {
        if amqp.exchange_prefix.is_empty() {
            amqp.exchange_prefix = crate::installation::SHARED_PREFIX.into();
        }
        ForwarderConfig::new(amqp).expect("valid test settings")
    }
}

/// Forwarding off, the old shared exchange prefix (a forwarder that only keeps consumer
/// groups: [`super::Forwarder::disabled`]).
impl Default for ForwarderConfig {
    fn default() -> Self {
        ForwarderConfig(AmqpSettings {
            exchange_prefix: crate::installation::SHARED_PREFIX.into(),
            ..AmqpSettings::default()
        })
    }
}

impl std::ops::Deref for ForwarderConfig {
    type Target = AmqpSettings;

    fn deref(&self) -> &AmqpSettings {
        &self.0
    }
}
