//! The cluster's metrics (`fleetgate_cluster_…`), registered with the gateway's others.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// Counters of the change feed and of cross-node session handling.
#[derive(Debug, Default, Clone)]
pub struct ClusterMetrics {
    /// Feed messages this node published (one per committed transaction that concerns others).
    pub feed_published: Counter,
    /// Bytes of feed messages this node published.
    pub feed_bytes: Counter,
    /// Feed messages (or parts) of other nodes applied here.
    pub feed_applied: Counter,
    /// Full reloads of the registry from the store (a gap, a NATS reconnect, a lag).
    pub resyncs: Counter,
    /// Sessions of this node ended by a change on another node (takeover, revocation).
    pub sessions_ended: Counter,
    /// API writes answered before every node confirmed them (`settle_timeout_ms`).
    pub settle_timeouts: Counter,
}

impl ClusterMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let counters = [
            (
                "cluster_feed_published",
                "Change-feed messages this node published",
                &self.feed_published,
            ),
            (
                "cluster_feed_bytes",
                "Bytes of change-feed messages this node published",
                &self.feed_bytes,
            ),
            (
                "cluster_feed_applied",
                "Change-feed messages of other nodes applied here",
                &self.feed_applied,
            ),
            (
                "cluster_resyncs",
                "Reloads of the registry from the shared store after a missed message",
                &self.resyncs,
            ),
            (
                "cluster_sessions_ended",
                "Sessions of this node ended by a change on another node",
                &self.sessions_ended,
            ),
            (
                "cluster_settle_timeouts",
                "API writes answered before every node confirmed them",
                &self.settle_timeouts,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
    }
}
