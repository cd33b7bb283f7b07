//! `[cluster]` settings: cluster mode is on when a NATS URL is set.

use crate::config::Secret;
use serde::{Deserialize, Serialize};

/// `[cluster]`: how this node joins the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// NATS server(s), comma-separated (`--nats-url`, `FLEETGATE_NATS_URL`). Cluster mode is
    /// on when set; it needs a PostgreSQL store (`--store postgres://…`).
    pub nats_url: Option<Secret>,
    /// This node's id, 1..=511, unique in the cluster (`--node-id`, `FLEETGATE_NODE_ID`). It
    /// is part of every session epoch the node draws.
    pub node_id: u16,
    /// Prefix of every NATS subject (`fg.{name}.…`), so that several clusters (or test runs)
    /// can share one NATS server (`--cluster-name`, `FLEETGATE_CLUSTER_NAME`).
    pub name: String,
    /// How often a node announces itself (and its feed position).
    pub heartbeat_ms: u64,
    /// A node not heard from for this long is gone: its devices go offline everywhere. A node
    /// cut from NATS for this long ends its own sessions (the others count it as gone).
    pub node_timeout_ms: u64,
    /// How long an API write waits for every other node to have applied it before answering.
    pub settle_timeout_ms: u64,
    /// Term of a lease (the engines', the outbox drain's): renewed every third of it; a
    /// holder that dies is replaced after at most this long plus a third of it.
    pub lease_ttl_ms: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            nats_url: None,
            node_id: 0,
            name: "fleetgate".into(),
            heartbeat_ms: 1_000,
            node_timeout_ms: 10_000,
            settle_timeout_ms: 2_000,
            lease_ttl_ms: 10_000,
        }
    }
}

impl ClusterSettings {
    pub fn enabled(&self) -> bool {
        self.nats_url.is_some()
    }

    /// Checks the settings; `Err((field, message))`.
    pub fn validate(&self, store_is_postgres: bool) -> Result<(), (&'static str, String)> {
        if !self.enabled() {
            return Ok(());
        }
        if !store_is_postgres {
            return Err((
                "cluster.nats_url",
                "cluster mode needs a PostgreSQL store shared by every node (--store postgres://…)"
                    .into(),
            ));
        }
        if !(1..=super::epoch::MAX_NODE_ID).contains(&self.node_id) {
            return Err((
                "cluster.node_id",
                format!(
                    "must be 1..={} and unique in the cluster (--node-id)",
                    super::epoch::MAX_NODE_ID
                ),
            ));
        }
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            return Err((
                "cluster.name",
                "must be 1 to 64 characters of A-Z a-z 0-9 - _".into(),
            ));
        }
        if self.heartbeat_ms < 100 || self.heartbeat_ms > 60_000 {
            return Err(("cluster.heartbeat_ms", "must be 100..=60000".into()));
        }
        if self.node_timeout_ms < 3 * self.heartbeat_ms {
            return Err((
                "cluster.node_timeout_ms",
                "must be at least 3 heartbeats (3 × cluster.heartbeat_ms)".into(),
            ));
        }
        if !(300..=600_000).contains(&self.lease_ttl_ms) {
            return Err(("cluster.lease_ttl_ms", "must be 300..=600000".into()));
        }
        if self.settle_timeout_ms > 60_000 {
            return Err(("cluster.settle_timeout_ms", "must be at most 60000".into()));
        }
        if !(300..=600_000).contains(&self.lease_ttl_ms) {
            return Err(("cluster.lease_ttl_ms", "must be 300..=600000".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(node_id: u16) -> ClusterSettings {
        ClusterSettings {
            nats_url: Some(Secret::new("nats://127.0.0.1:4222")),
            node_id,
            ..ClusterSettings::default()
        }
    }

    #[test]
    fn off_by_default_and_then_always_valid() {
        let s = ClusterSettings::default();
        assert!(!s.enabled());
        assert_eq!(s.validate(false), Ok(()));
    }

    #[test]
    fn cluster_mode_is_checked() {
        assert_eq!(on(1).validate(true), Ok(()));
        let field = |s: ClusterSettings, pg: bool| s.validate(pg).unwrap_err().0;
        assert_eq!(field(on(1), false), "cluster.nats_url");
        assert_eq!(field(on(0), true), "cluster.node_id");
        assert_eq!(field(on(512), true), "cluster.node_id");
        let named = |name: &str| ClusterSettings {
            name: name.into(),
            ..on(2)
        };
        assert_eq!(field(named("a.b"), true), "cluster.name");
        assert_eq!(field(named(""), true), "cluster.name");
        assert_eq!(named("test-run_7").validate(true), Ok(()));
        let timeout = ClusterSettings {
            node_timeout_ms: 2_000,
            ..on(3)
        };
        assert_eq!(field(timeout, true), "cluster.node_timeout_ms");
    }
}
