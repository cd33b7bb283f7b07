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
    /// Terms of the engines' lease this node started (took the lease and activated).
    pub engine_terms: Counter,
    /// Device reports this node relayed to the engines' node and had answered.
    pub engine_reports_relayed: Counter,
    /// Device reports that reached no engines' node (none held the lease, or it did not answer).
    pub engine_reports_dropped: Counter,
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
            (
                "cluster_engine_terms",
                "Terms of the engines' lease this node took",
                &self.engine_terms,
            ),
            (
                "cluster_engine_reports_relayed",
                "Device reports relayed to the engines' node",
                &self.engine_reports_relayed,
            ),
            (
                "cluster_engine_reports_dropped",
                "Device reports that reached no engines' node",
                &self.engine_reports_dropped,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
    }
}
