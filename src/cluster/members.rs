//! Who is in the cluster: every node announces itself on `fg.{name}.hb` every
//! `heartbeat_ms` with its boot time and feed position; a node not heard from for
//! `node_timeout_ms` is gone.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A node's announcement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: u16,
    /// When this incarnation of the node started (ms since the Unix epoch): a larger value
    /// than before means the node restarted, and its earlier sessions are gone.
    pub boot_ms: i64,
    /// The last feed message the node published.
    pub seq: u64,
    pub mqtt: String,
    pub http: String,
    /// The node holds the engines' lease (its OTA engine is the active one).
    #[serde(default)]
    pub engines: bool,
}

/// What this node knows of another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub node: u16,
    pub boot_ms: i64,
    pub seq: u64,
    pub mqtt: String,
    pub http: String,
    /// It drives the engines.
    pub engines: bool,
    /// When it was last heard from (this node's clock, ms).
    pub heard_ms: i64,
}

/// What a heartbeat tells the receiver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// A node seen for the first time (since this node started or since it was gone).
    Joined,
    /// The node restarted: sessions it drew before `boot_ms` are gone.
    Restarted { boot_ms: i64 },
    /// Nothing new.
    Known,
}

/// The member table (owned by one task).
#[derive(Debug, Default)]
pub struct Members {
    nodes: BTreeMap<u16, Member>,
}

impl Members {
    pub fn heard(&mut self, hb: Heartbeat, now_ms: i64) -> Heard {
        if self
            .nodes
            .get(&hb.node)
            .is_some_and(|m| m.boot_ms > hb.boot_ms)
        {
            // A late heartbeat of an earlier incarnation.
            return Heard::Known;
        }
        let member = Member {
            node: hb.node,
            boot_ms: hb.boot_ms,
            seq: hb.seq,
            mqtt: hb.mqtt,
            http: hb.http,
            engines: hb.engines,
            heard_ms: now_ms,
        };
        match self.nodes.insert(hb.node, member) {
            None => Heard::Joined,
            Some(old) if old.boot_ms < hb.boot_ms => Heard::Restarted {
                boot_ms: hb.boot_ms,
            },
            Some(_) => Heard::Known,
        }
    }

    /// Removes and returns the nodes not heard from within `timeout_ms`.
    pub fn expire(&mut self, now_ms: i64, timeout_ms: i64) -> Vec<Member> {
        let gone: Vec<u16> = self
            .nodes
            .values()
            .filter(|m| now_ms - m.heard_ms > timeout_ms)
            .map(|m| m.node)
            .collect();
        gone.into_iter()
            .filter_map(|n| self.nodes.remove(&n))
            .collect()
    }

    /// Whether `node` announced in its last heartbeat that it drives the engines.
    pub fn drives_engines(&self, node: u16) -> bool {
        self.nodes.get(&node).is_some_and(|m| m.engines)
    }

    /// The nodes heard from, in id order.
    pub fn list(&self) -> Vec<Member> {
        self.nodes.values().cloned().collect()
    }

    pub fn ids(&self) -> Vec<u16> {
        self.nodes.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(node: u16, boot_ms: i64) -> Heartbeat {
        Heartbeat {
            node,
            boot_ms,
            seq: 1,
            mqtt: "127.0.0.1:1".into(),
            http: "127.0.0.1:2".into(),
            engines: false,
        }
    }

    #[test]
    fn joins_restarts_and_expiry() {
        let mut m = Members::default();
        assert_eq!(m.heard(hb(2, 100), 1_000), Heard::Joined);
        assert_eq!(m.heard(hb(2, 100), 2_000), Heard::Known);
        assert_eq!(m.heard(hb(3, 100), 2_000), Heard::Joined);
        assert_eq!(
            m.heard(hb(2, 5_000), 6_000),
            Heard::Restarted { boot_ms: 5_000 }
        );
        // A late heartbeat of the old incarnation is not a restart.
        assert_eq!(m.heard(hb(2, 100), 6_100), Heard::Known);
        assert_eq!(m.list()[0].boot_ms, 5_000);
        assert_eq!(m.ids(), vec![2, 3]);
        assert!(!m.drives_engines(2));
        m.heard(
            Heartbeat {
                engines: true,
                ..hb(2, 5_000)
            },
            6_200,
        );
        assert!(m.drives_engines(2) && !m.drives_engines(3) && !m.drives_engines(9));
        let gone = m.expire(12_500, 10_000);
        assert_eq!(gone.iter().map(|g| g.node).collect::<Vec<_>>(), vec![3]);
        assert_eq!(m.ids(), vec![2]);
    }
}
