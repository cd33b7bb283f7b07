//! Prometheus metrics: one [`Metrics`] value per gateway, shared by every component through an
//! `Arc`. Components only increment; `/metrics` encodes. Label values are small closed sets
//! (reasons, topic kinds) so the series count stays bounded: their types are in `labels.rs`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

mod exposition;
mod labels;
mod process;

pub use exposition::Format;
pub use labels::*;

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// Devices with an open, authenticated MQTT session.
    pub connected_devices: Gauge,
    /// Accepted CONNECTs.
    pub connects: Counter,
    /// Refused CONNECTs by reason (`bad_signature`, `unknown_device`, `disabled_device`,
    /// `malformed_client_id`, `bad_username`, `timestamp`, `protocol`, `timeout`, `limit`,
    /// `tls`, `proxy_header`).
    pub connects_refused: Family<Labels, Counter>,
    /// Sockets closed as soon as they were accepted, by listener and reason
    /// ([`crate::admission`]).
    pub connections_refused: Family<RefusedLabels, Counter>,
    /// Open sockets per listener kind (MQTT: authenticated or not, plain and TLS).
    pub connections_open: Family<ListenerLabels, Gauge>,
    /// The most sockets each listener kind may hold open.
    pub connection_budget: Family<ListenerLabels, Gauge>,
    /// The process's open-files limit (soft, after raising it to the hard limit at start).
    pub open_files_limit: Gauge,
    /// MQTT sockets that have not completed an authenticated CONNECT yet.
    pub mqtt_unauthenticated: Gauge,
    /// MQTT sockets accepted under pre-CONNECT pressure, given the shorter CONNECT timeout.
    pub mqtt_connect_timeout_shortened: Counter,
    /// HTTP connections (or request bodies) ended by a timeout, by kind.
    pub http_timeouts: Family<HttpTimeoutLabels, Counter>,
    /// Device PUBLISH/SUBSCRIBE refused by the topic ACL, by packet kind.
    pub acl_denied: Family<Labels, Counter>,
    /// Connections closed for a protocol violation, by reason (`empty_topic`, `nul_in_topic`,
    /// `topic_not_utf8`, `empty_subscribe`, `empty_unsubscribe`, `malformed`).
    pub protocol_violations: Family<Labels, Counter>,
    /// Subscription filters refused (SUBACK 0x80) because the device reached
    /// `mqtt.max_subscriptions_per_device`.
    pub subscriptions_refused: Counter,
    /// Version reports dropped, by reason (`module_limit`, `invalid`, `unknown_device`).
    pub version_reports_refused: Family<Labels, Counter>,
    /// Upstream messages by topic kind (`inform`, `progress`, `firmware_get`, `property_post`,
    /// `event_post`, `other`).
    pub messages: Family<Labels, Counter>,
    /// Upstream messages that failed to parse, by topic kind.
    pub malformed_messages: Family<Labels, Counter>,
    /// Messages the gateway published to devices through rumqttd's router.
    pub downlink_messages: Counter,
    /// QoS 0 messages handed straight to a device's live session, bypassing the router
    /// (`Downlink::publish_qos0`).
    pub downlink_direct: Counter,
    /// Direct QoS 0 messages dropped because the device's session queue was full.
    pub downlink_direct_dropped: Counter,
    /// Upstream QoS 1/2 PUBLISHes left unacknowledged because the gateway could not take one of
    /// them (e.g. the forwarding outbox stayed full) and closed the connection; the devices
    /// send them again after reconnecting.
    pub publishes_withheld: Counter,
    /// Store transaction commit latency, seconds.
    pub store_write_seconds: Histogram,
    /// Operations per store transaction.
    pub store_batch_size: Histogram,
    /// Store submissions skipped because a later one in the same transaction overwrote them.
    pub store_superseded: Counter,
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
    /// Rows in the forwarder's durable outbox (waiting for a broker ack).
    pub forwarder_outbox_messages: Gauge,
    /// Bytes the outbox holds (what its bound counts).
    pub forwarder_outbox_bytes: Gauge,
    /// Cluster mode: rows in the shared outbox table, every node's (as of the last refresh).
    pub forwarder_shared_outbox_messages: Gauge,
    /// Cluster mode: bytes of the rows in the shared outbox table, every node's.
    pub forwarder_shared_outbox_bytes: Gauge,
    /// 1 while this node drains the outbox (cluster mode: holds the `outbox` lease), else 0.
    pub forwarder_outbox_drain: Gauge,
    /// Outbox transaction commit latency, seconds.
    pub forwarder_outbox_commit_seconds: Histogram,
    /// Messages made durable in the outbox (one per target instance).
    pub forwarder_enqueued: Counter,
    /// Messages the broker confirmed (acked and routed to at least one queue).
    pub forwarder_published: Counter,
    /// Publish → broker confirm latency, seconds.
    pub forwarder_confirm_seconds: Histogram,
    /// Publishes the broker nacked (re-queued).
    pub forwarder_nacks: Counter,
    /// Publishes returned unroutable (no consumer group bound to the instance's exchange).
    pub forwarder_returns: Counter,
    /// Messages dropped, by reason (`outbox_full`, `no_route`, `unknown_device`,
    /// `deleted_instance`).
    /// `outbox_full` counts only messages nobody was promised: QoS 0 posts, online/offline
    /// status and OTA task events. Acknowledged posts are never dropped (see
    /// `forwarder_refused`).
    pub forwarder_dropped: Family<Labels, Counter>,
    /// QoS 1/2 property/event posts the outbox could not take within `outbox_full_wait_ms`:
    /// not stored, not acknowledged (the connection is closed), sent again by the device.
    pub forwarder_refused: Counter,
    /// Enqueues that had to wait for outbox space (back-pressure).
    pub forwarder_backpressure_waits: Counter,
    /// Connections to the broker lost or failed (each one is followed by a reconnect attempt).
    pub forwarder_reconnects: Counter,
    /// 1 while connected to the broker.
    pub forwarder_connected: Gauge,
    /// Times the publisher held a message back because its target's rate limit was reached.
    pub forwarder_rate_limited: Counter,
    /// Consumer-group queue declarations RabbitMQ refused (406) because the queue exists with
    /// other arguments (e.g. no message TTL); the existing queue was kept and bound.
    pub forwarder_queues_kept: Counter,
    /// Messages ready in each consumer group's queue (`group` = `{instance_id}/{group_id}`),
    /// sampled periodically.
    pub forwarder_group_backlog: Family<[(&'static str, String); 1], Gauge>,
    /// Consumers attached to each consumer group's queue, sampled periodically.
    pub forwarder_group_consumers: Family<[(&'static str, String); 1], Gauge>,
    /// 1 for each consumer group whose queue is not what `amqp.queue_type` asks for
    /// (`group`, `status` = `type_mismatch`: it exists with the other type; `refused`: RabbitMQ
    /// refused its arguments); gone once a declare goes as asked or the group is deleted.
    pub forwarder_group_queue_error: Family<[(&'static str, String); 2], Gauge>,
    /// OTA tasks by status (`CONFIRM`, `QUEUED`, …, `CANCELED`).
    pub ota_tasks: Family<Labels, Gauge>,
    /// The allocator's heap statistics (jemalloc builds), refreshed by [`Metrics::encode`].
    pub allocator_bytes: Family<Labels, Gauge>,
    /// OTA upgrade deliveries by kind (`push`, `pull`); re-pushes count as `push`.
    pub ota_pushes: Family<Labels, Counter>,
    /// OTA tasks that FAILED, by reason (`DOWNLOAD_FAILED`, `TIMEOUT`, …).
    pub ota_failures: Family<Labels, Counter>,
    /// OTA tasks that failed with TIMEOUT (including stalls).
    pub ota_timeouts: Counter,
    /// OTA retries scheduled.
    pub ota_retries: Counter,
    /// OTA progress reports by outcome (`applied`, `ignored`, `no_task`).
    pub ota_progress: Family<Labels, Counter>,
    /// Cloud-to-device commands by `kind` (`publish`, `property_set`, `service`, `rrpc`) and
    /// `outcome` (`delivered`, `queued`, `replied`, `timed_out`, `offline`, `refused`).
    pub downlinks: Family<[(&'static str, &'static str); 2], Counter>,
    /// Duration of synchronous calls (service calls with a timeout, RRPC) until the answer or
    /// the timeout, by `kind`.
    pub sync_call_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    /// Device answers that matched no command, by `reason` (`unknown_id`, `rrpc`, `malformed`).
    pub downlink_answers_dropped: Family<Labels, Counter>,
    /// One-way messages for devices offline with a persistent session that were not kept or
    /// not delivered, by `reason` (`full`, `expired`, `clean_session`, `deleted`, `refused`).
    pub offline_messages_dropped: Family<Labels, Counter>,
    /// Cluster mode (`fleetgate_cluster_…`).
    pub cluster: crate::cluster::ClusterMetrics,
}

fn sync_call_histogram() -> Histogram {
    // 1 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics {
            connected_devices: Gauge::default(),
            connects: Counter::default(),
            connects_refused: Family::default(),
            connections_refused: Family::default(),
            connections_open: Family::default(),
            connection_budget: Family::default(),
            open_files_limit: Gauge::default(),
            mqtt_unauthenticated: Gauge::default(),
            mqtt_connect_timeout_shortened: Counter::default(),
            http_timeouts: Family::default(),
            acl_denied: Family::default(),
            protocol_violations: Family::default(),
            subscriptions_refused: Counter::default(),
            version_reports_refused: Family::default(),
            messages: Family::default(),
            malformed_messages: Family::default(),
            downlink_messages: Counter::default(),
            downlink_direct: Counter::default(),
            downlink_direct_dropped: Counter::default(),
            publishes_withheld: Counter::default(),
            store_write_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            store_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            store_superseded: Counter::default(),
            http_requests: Family::default(),
            migration_devices: Family::default(),
            migration_kicks: Counter::default(),
            migration_faults: Counter::default(),
            migration_running_tasks: Gauge::default(),
            forwarder_outbox_messages: Gauge::default(),
            forwarder_outbox_bytes: Gauge::default(),
            forwarder_shared_outbox_messages: Gauge::default(),
            forwarder_shared_outbox_bytes: Gauge::default(),
            forwarder_outbox_drain: Gauge::default(),
            forwarder_outbox_commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            forwarder_enqueued: Counter::default(),
            forwarder_published: Counter::default(),
            forwarder_confirm_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 18)),
            forwarder_nacks: Counter::default(),
            forwarder_returns: Counter::default(),
            forwarder_dropped: Family::default(),
            forwarder_refused: Counter::default(),
            forwarder_backpressure_waits: Counter::default(),
            forwarder_reconnects: Counter::default(),
            forwarder_connected: Gauge::default(),
            forwarder_rate_limited: Counter::default(),
            forwarder_queues_kept: Counter::default(),
            forwarder_group_backlog: Family::default(),
            forwarder_group_consumers: Family::default(),
            forwarder_group_queue_error: Family::default(),
            ota_tasks: Family::default(),
            allocator_bytes: Family::default(),
            ota_pushes: Family::default(),
            ota_failures: Family::default(),
            ota_timeouts: Counter::default(),
            ota_retries: Counter::default(),
            ota_progress: Family::default(),
            downlinks: Family::default(),
            sync_call_seconds: Family::new_with_constructor(sync_call_histogram),
            downlink_answers_dropped: Family::default(),
            offline_messages_dropped: Family::default(),
            cluster: crate::cluster::ClusterMetrics::default(),
            registry: Registry::default(),
        };
        // `process_*` (the names every Prometheus client library uses), then ours.
        let mut root = Registry::default();
        process::register(&mut root);
        let registry = root.sub_registry_with_prefix("fleetgate");
        registry.register(
            "build",
            "The running gateway's version and build options (the value is always 1)",
            Info::new([
                ("version", env!("CARGO_PKG_VERSION")),
                (
                    "allocator",
                    if cfg!(feature = "jemalloc") {
                        "jemalloc"
                    } else {
                        "system"
                    },
                ),
            ]),
        );
        m.prefill();
        m.cluster.register(registry);
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
            "connections_refused",
            "Sockets closed as soon as they were accepted, by listener and reason",
            m.connections_refused.clone(),
        );
        registry.register(
            "connections_open",
            "Open sockets per listener kind",
            m.connections_open.clone(),
        );
        registry.register(
            "connection_budget",
            "The most sockets each listener kind may hold open",
            m.connection_budget.clone(),
        );
        registry.register(
            "open_files_limit",
            "The process's open-files limit (soft)",
            m.open_files_limit.clone(),
        );
        registry.register(
            "mqtt_unauthenticated_connections",
            "MQTT sockets without an authenticated CONNECT yet",
            m.mqtt_unauthenticated.clone(),
        );
        registry.register(
            "mqtt_connect_timeout_shortened",
            "MQTT sockets accepted under pre-CONNECT pressure (shorter CONNECT timeout)",
            m.mqtt_connect_timeout_shortened.clone(),
        );
        registry.register(
            "http_timeouts",
            "HTTP connections or request bodies ended by a timeout, by kind",
            m.http_timeouts.clone(),
        );
        registry.register(
            "mqtt_acl_denied",
            "Device packets refused by the topic ACL",
            m.acl_denied.clone(),
        );
        registry.register(
            "mqtt_protocol_violations",
            "Connections closed for an MQTT protocol violation, by reason",
            m.protocol_violations.clone(),
        );
        registry.register(
            "mqtt_subscriptions_refused",
            "Subscription filters refused because the device reached its subscription limit",
            m.subscriptions_refused.clone(),
        );
        registry.register(
            "version_reports_refused",
            "Version reports dropped, by reason",
            m.version_reports_refused.clone(),
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
            "Messages published to devices through the router",
            m.downlink_messages.clone(),
        );
        registry.register(
            "mqtt_downlink_direct",
            "QoS 0 messages handed straight to a live device session",
            m.downlink_direct.clone(),
        );
        registry.register(
            "mqtt_downlink_direct_dropped",
            "Direct QoS 0 messages dropped on a full session queue",
            m.downlink_direct_dropped.clone(),
        );
        registry.register(
            "mqtt_publishes_withheld",
            "Upstream QoS 1/2 PUBLISHes left unacknowledged (connection closed) because the gateway could not take them",
            m.publishes_withheld.clone(),
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
            "store_superseded_writes",
            "Store submissions skipped because a later write in the same transaction replaced them",
            m.store_superseded.clone(),
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
        registry.register(
            "forwarder_outbox_messages",
            "Messages in the AMQP outbox waiting for a broker ack",
            m.forwarder_outbox_messages.clone(),
        );
        registry.register(
            "forwarder_outbox_bytes",
            "Bytes held by the AMQP outbox",
            m.forwarder_outbox_bytes.clone(),
        );
        registry.register(
            "forwarder_shared_outbox_messages",
            "Cluster mode: messages in the shared outbox table (every node's)",
            m.forwarder_shared_outbox_messages.clone(),
        );
        registry.register(
            "forwarder_shared_outbox_bytes",
            "Cluster mode: bytes in the shared outbox table (every node's)",
            m.forwarder_shared_outbox_bytes.clone(),
        );
        registry.register(
            "forwarder_outbox_drain",
            "1 while this node drains the outbox (cluster mode: holds the outbox lease)",
            m.forwarder_outbox_drain.clone(),
        );
        registry.register(
            "forwarder_outbox_commit_seconds",
            "Outbox transaction commit latency",
            m.forwarder_outbox_commit_seconds.clone(),
        );
        registry.register(
            "forwarder_enqueued",
            "Messages made durable in the outbox",
            m.forwarder_enqueued.clone(),
        );
        registry.register(
            "forwarder_published",
            "Messages confirmed by the AMQP broker",
            m.forwarder_published.clone(),
        );
        registry.register(
            "forwarder_confirm_seconds",
            "AMQP publish to broker confirm latency",
            m.forwarder_confirm_seconds.clone(),
        );
        registry.register(
            "forwarder_nacks",
            "AMQP publishes nacked by the broker (re-queued)",
            m.forwarder_nacks.clone(),
        );
        registry.register(
            "forwarder_returns",
            "AMQP publishes returned unroutable (no consumer group)",
            m.forwarder_returns.clone(),
        );
        registry.register(
            "forwarder_dropped",
            "Forwarded messages dropped, by reason",
            m.forwarder_dropped.clone(),
        );
        registry.register(
            "forwarder_refused",
            "QoS 1/2 device posts the full outbox refused: not acknowledged, resent by the device",
            m.forwarder_refused.clone(),
        );
        registry.register(
            "forwarder_backpressure_waits",
            "Enqueues that waited for outbox space",
            m.forwarder_backpressure_waits.clone(),
        );
        registry.register(
            "forwarder_reconnects",
            "AMQP connections lost or failed",
            m.forwarder_reconnects.clone(),
        );
        registry.register(
            "forwarder_connected",
            "1 while connected to the AMQP broker",
            m.forwarder_connected.clone(),
        );
        registry.register(
            "forwarder_rate_limited",
            "Publishes held back by a target's rate limit",
            m.forwarder_rate_limited.clone(),
        );
        registry.register(
            "forwarder_queues_kept",
            "Consumer-group queues kept with their existing arguments (declare refused with 406)",
            m.forwarder_queues_kept.clone(),
        );
        registry.register(
            "forwarder_group_backlog",
            "Messages ready in each consumer group's queue",
            m.forwarder_group_backlog.clone(),
        );
        registry.register(
            "forwarder_group_consumers",
            "Consumers attached to each consumer group's queue",
            m.forwarder_group_consumers.clone(),
        );
        registry.register(
            "forwarder_group_queue_error",
            "Consumer groups whose queue is not of the configured type (type_mismatch) or was refused by RabbitMQ (refused)",
            m.forwarder_group_queue_error.clone(),
        );
        registry.register("ota_tasks", "OTA tasks by status", m.ota_tasks.clone());
        registry.register(
            "ota_pushes",
            "OTA upgrade deliveries by kind (push, pull)",
            m.ota_pushes.clone(),
        );
        registry.register(
            "ota_failures",
            "OTA tasks failed, by reason",
            m.ota_failures.clone(),
        );
        registry.register(
            "ota_timeouts",
            "OTA tasks failed with TIMEOUT (including stalls)",
            m.ota_timeouts.clone(),
        );
        registry.register(
            "ota_retries",
            "OTA retries scheduled",
            m.ota_retries.clone(),
        );
        registry.register(
            "allocator_bytes",
            "Heap of the jemalloc allocator, by kind: allocated (live objects), active (their pages), resident, mapped, retained (unmapped, kept for reuse); refreshed at each scrape",
            m.allocator_bytes.clone(),
        );
        registry.register(
            "downlinks",
            "Cloud-to-device commands by kind and outcome",
            m.downlinks.clone(),
        );
        registry.register(
            "sync_call_seconds",
            "Synchronous device calls (service with timeout, RRPC) until answer or timeout",
            m.sync_call_seconds.clone(),
        );
        registry.register(
            "downlink_answers_dropped",
            "Device answers matching no command, by reason",
            m.downlink_answers_dropped.clone(),
        );
        registry.register(
            "offline_messages_dropped",
            "Messages for devices offline with a persistent session not kept or not delivered, by reason",
            m.offline_messages_dropped.clone(),
        );
        registry.register(
            "ota_progress",
            "OTA progress reports by outcome",
            m.ota_progress.clone(),
        );
        Metrics {
            registry: root,
            ..m
        }
    }

    /// Creates the series whose label values form a closed set known at start, so that each is
    /// exported (at zero) before its first event: a query or an alert on one never sees "no
    /// data" where the truth is 0. Families labelled by something open (a consumer group) or
    /// sampled (the allocator, OTA task counts by job) are left to their first sample.
    fn prefill(&self) {
        use crate::broker::auth::Refusal;
        use crate::ota::task::{FailureReason, TaskStatus};
        for refusal in Refusal::ALL {
            drop(
                self.connects_refused
                    .get_or_create(&[("reason", refusal.reason())]),
            );
        }
        // Closed before the CONNECT was read at all (src/broker/server.rs).
        for reason in ["tls", "timeout", "proxy_header"] {
            drop(self.connects_refused.get_or_create(&[("reason", reason)]));
        }
        for listener in [Listener::Mqtt, Listener::Http] {
            for &reason in RefusalReason::of(listener) {
                drop(
                    self.connections_refused
                        .get_or_create(&RefusedLabels { listener, reason }),
                );
            }
        }
        for kind in [
            HttpTimeout::Header,
            HttpTimeout::Idle,
            HttpTimeout::Body,
            HttpTimeout::Write,
        ] {
            drop(
                self.http_timeouts
                    .get_or_create(&HttpTimeoutLabels { kind }),
            );
        }
        for kind in ["publish", "subscribe", "will"] {
            drop(self.acl_denied.get_or_create(&[("kind", kind)]));
        }
        // src/broker/violation.rs.
        for reason in [
            "empty_topic",
            "nul_in_topic",
            "topic_not_utf8",
            "empty_subscribe",
            "empty_unsubscribe",
            "malformed",
        ] {
            drop(
                self.protocol_violations
                    .get_or_create(&[("reason", reason)]),
            );
        }
        for class in ["2xx", "4xx", "5xx"] {
            drop(self.http_requests.get_or_create(&[("class", class)]));
        }
        for reason in FailureReason::ALL {
            drop(
                self.ota_failures
                    .get_or_create(&[("reason", reason.as_str())]),
            );
        }
        for status in TaskStatus::ALL {
            drop(self.ota_tasks.get_or_create(&[("state", status.as_str())]));
        }
        for kind in ["push", "pull"] {
            drop(self.ota_pushes.get_or_create(&[("kind", kind)]));
        }
        for outcome in ["applied", "ignored", "no_task"] {
            drop(self.ota_progress.get_or_create(&[("outcome", outcome)]));
        }
        for reason in [
            "outbox_full",
            "no_route",
            "unknown_device",
            "deleted_instance",
        ] {
            drop(self.forwarder_dropped.get_or_create(&[("reason", reason)]));
        }
        for result in ["migrated", "rolled_back", "failed"] {
            drop(self.migration_devices.get_or_create(&[("result", result)]));
        }
    }

    /// Every metric in the OpenMetrics 1.0 text format (`# EOF`-terminated).
    pub fn encode(&self) -> String {
        #[cfg(feature = "jemalloc")]
        self.refresh_allocator();
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// Every metric in `format` (see [`Format::negotiate`]).
    pub fn encode_as(&self, format: Format) -> String {
        match format {
            Format::OpenMetrics => self.encode(),
            Format::Prometheus => exposition::to_prometheus_text(&self.encode()),
        }
    }
}

#[cfg(feature = "jemalloc")]
impl Metrics {
    /// Reads jemalloc's statistics (cached by jemalloc until its epoch advances). Meaningful
    /// when jemalloc is the global allocator (the binary's); test binaries use the system's.
    fn refresh_allocator(&self) {
        use tikv_jemalloc_ctl::{epoch, stats};
        if epoch::advance().is_err() {
            return;
        }
        let readings = [
            ("allocated", stats::allocated::read()),
            ("active", stats::active::read()),
            ("resident", stats::resident::read()),
            ("mapped", stats::mapped::read()),
            ("retained", stats::retained::read()),
        ];
        for (kind, value) in readings {
            if let Ok(bytes) = value {
                self.allocator_bytes
                    .get_or_create(&[("kind", kind)])
                    .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
        }
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

    #[test]
    fn typed_labels_encode_as_snake_case() {
        let m = Metrics::new();
        m.connections_refused
            .get_or_create(&RefusedLabels {
                listener: Listener::Http,
                reason: RefusalReason::PerIp,
            })
            .inc();
        m.http_timeouts
            .get_or_create(&HttpTimeoutLabels {
                kind: HttpTimeout::Header,
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains(
                r#"fleetgate_connections_refused_total{listener="http",reason="per_ip"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"fleetgate_http_timeouts_total{kind="header"} 1"#),
            "{text}"
        );
    }
}
