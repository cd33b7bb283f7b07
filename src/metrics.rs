//! Prometheus metrics: one [`Metrics`] value per gateway, shared by every component through an
//! `Arc`. Components only increment; `/metrics` encodes. Label values are small closed sets
//! (reasons, topic kinds) so the series count stays bounded.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// One label: `(name, value)`. Values must come from a closed set.
pub type Labels = [(&'static str, &'static str); 1];

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// Devices with an open, authenticated MQTT session.
    pub connected_devices: Gauge,
    /// Accepted CONNECTs.
    pub connects: Counter,
    /// Refused CONNECTs by reason (`bad_signature`, `unknown_device`, `disabled_device`,
    /// `malformed_client_id`, `bad_username`, `protocol`, `timeout`, `limit`).
    pub connects_refused: Family<Labels, Counter>,
    /// Device PUBLISH/SUBSCRIBE refused by the topic ACL, by packet kind.
    pub acl_denied: Family<Labels, Counter>,
    /// Upstream messages by topic kind (`inform`, `progress`, `firmware_get`, `property_post`,
    /// `event_post`, `other`).
    pub messages: Family<Labels, Counter>,
    /// Upstream messages that failed to parse, by topic kind.
    pub malformed_messages: Family<Labels, Counter>,
    /// Messages the gateway published to devices.
    pub downlink_messages: Counter,
    /// Store transaction commit latency, seconds.
    pub store_write_seconds: Histogram,
    /// Operations per store transaction.
    pub store_batch_size: Histogram,
    /// HTTP requests by status class (`2xx`, `4xx`, `5xx`).
    pub http_requests: Family<Labels, Counter>,
    /// Devices moved by migration tasks, by result (`migrated`, `rolled_back`, `failed`);
    /// `rate()` of it is the migration speed.
    pub migration_devices: Family<Labels, Counter>,
    /// Connected devices told to reconnect after their migration.
    pub migration_kicks: Counter,
    /// Store faults while moving devices (each retried or halting its task).
    pub migration_faults: Counter,
    /// Migration tasks in a running state.
    pub migration_running_tasks: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fleetgate");
        let m = Metrics {
            connected_devices: Gauge::default(),
            connects: Counter::default(),
            connects_refused: Family::default(),
            acl_denied: Family::default(),
            messages: Family::default(),
            malformed_messages: Family::default(),
            downlink_messages: Counter::default(),
            store_write_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            store_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            http_requests: Family::default(),
            migration_devices: Family::default(),
            migration_kicks: Counter::default(),
            migration_faults: Counter::default(),
            migration_running_tasks: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connected_devices",
            "Devices with an open MQTT session",
            m.connected_devices.clone(),
        );
        registry.register(
            "mqtt_connects",
            "Accepted MQTT CONNECTs",
            m.connects.clone(),
        );
        registry.register(
            "mqtt_connects_refused",
            "Refused MQTT CONNECTs by reason",
            m.connects_refused.clone(),
        );
        registry.register(
            "mqtt_acl_denied",
            "Device packets refused by the topic ACL",
            m.acl_denied.clone(),
        );
        registry.register(
            "mqtt_messages",
            "Upstream device messages by topic kind",
            m.messages.clone(),
        );
        registry.register(
            "mqtt_malformed_messages",
            "Upstream messages that failed to parse, by topic kind",
            m.malformed_messages.clone(),
        );
        registry.register(
            "mqtt_downlink_messages",
            "Messages published to devices",
            m.downlink_messages.clone(),
        );
        registry.register(
            "store_write_seconds",
            "Store transaction commit latency",
            m.store_write_seconds.clone(),
        );
        registry.register(
            "store_batch_size",
            "Operations per store transaction",
            m.store_batch_size.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by status class",
            m.http_requests.clone(),
        );
        registry.register(
            "migration_devices",
            "Devices moved by migration tasks, by result",
            m.migration_devices.clone(),
        );
        registry.register(
            "migration_kicks",
            "Connected devices told to reconnect after migration",
            m.migration_kicks.clone(),
        );
        registry.register(
            "migration_faults",
            "Store faults while moving devices",
            m.migration_faults.clone(),
        );
        registry.register(
            "migration_running_tasks",
            "Migration tasks in a running state",
            m.migration_running_tasks.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_labelled_counters() {
        let m = Metrics::new();
        m.connects_refused
            .get_or_create(&[("reason", "bad_signature")])
            .inc();
        m.connected_devices.set(3);
        let text = m.encode();
        assert!(
            text.contains(r#"fleetgate_mqtt_connects_refused_total{reason="bad_signature"} 1"#),
            "{text}"
        );
        assert!(text.contains("fleetgate_connected_devices 3"), "{text}");
    }
}
