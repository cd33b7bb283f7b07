//! Settling API writes: a write answers only once every live node has applied this node's
//! feed up to it (or `settle_timeout_ms` passed), so what the caller just wrote is visible on
//! every node. The receiver answers the other nodes' settle requests ([`SettleRequest`]).

use super::Cluster;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::time::Duration;

/// A settle request: "have you applied my feed up to `seq`?".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SettleRequest {
    pub origin: u16,
    pub seq: u64,
}

impl Cluster {
    /// Waits until every live node has applied this node's feed up to what is committed now
    /// (so a write the caller just committed is visible everywhere), or `settle_timeout_ms`
    /// passed. Returns the nodes that did not confirm in time.
    pub async fn settle(&self) -> Vec<u16> {
        let seq = self.committed.load(Ordering::Acquire);
        let timeout = Duration::from_millis(self.settings.settle_timeout_ms);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut expected: Vec<u16> = self
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ids()
            .into_iter()
            .filter(|&n| n != self.node)
            .collect();
        if seq == 0 || expected.is_empty() {
            return Vec::new();
        }
        let mut published = self.published.subscribe();
        if tokio::time::timeout_at(deadline, published.wait_for(|&p| p >= seq))
            .await
            .is_err()
        {
            return expected;
        }
        let inbox = self.client.new_inbox();
        let Ok(mut replies) = self.client.subscribe(inbox.clone()).await else {
            return expected;
        };
        let request = serde_json::to_vec(&SettleRequest {
            origin: self.node,
            seq,
        })
        .unwrap_or_default();
        if self
            .client
            .publish_with_reply(self.subjects.settle.clone(), inbox, request.into())
            .await
            .is_err()
        {
            return expected;
        }
        use futures_util::StreamExt;
        while !expected.is_empty() {
            match tokio::time::timeout_at(deadline, replies.next()).await {
                Ok(Some(reply)) => {
                    if let Ok(node) = serde_json::from_slice::<u16>(&reply.payload) {
                        expected.retain(|&n| n != node);
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        if !expected.is_empty() {
            self.metrics.cluster.settle_timeouts.inc();
            tracing::warn!(nodes = ?expected, seq, "nodes did not confirm a change in time");
        }
        expected
    }
}
