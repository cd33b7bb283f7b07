//! Leases: which node drives the stateful parts of the gateway (the OTA and migration engines,
//! the forwarder's outbox) while every node serves devices and the API.
//!
//! A lease is a row of `cluster_leases` in PostgreSQL (`name`, `holder`, `epoch`,
//! `expires_at`, times the server's). Every node runs one [`LeaseKeeper`] per lease name:
//!
//! - not holding it, it tries to take it every `ttl / 3`: the take succeeds only when the
//!   lease is free or expired, and bumps the epoch;
//! - holding it, it renews it every `ttl / 3`, conditional on holder and epoch; a failed
//!   renewal (another node took it, or the database is unreachable) ends the term — and the
//!   keeper gives the lease up locally *before* the database would let another node take it
//!   (the local deadline counts from the moment the renewal was sent, minus a margin), so two
//!   nodes never both act as holder;
//! - every write a holder makes carries `Op::Fence { lease, node, epoch }`
//!   ([`crate::store::Store::fenced`]), which the database refuses once the lease is no longer
//!   that node's with that epoch: even a node that stalled past its term cannot overwrite what
//!   the next holder does.
//!
//! A node that dies holding a lease is replaced after at most `ttl` plus one attempt period;
//! a node that stops cleanly releases its leases, and another takes them at its next attempt —
//! for the engines' lease at once: the holder's last heartbeat says it released it, and every
//! node that hears it makes an attempt then ([`LeaseKeeper::try_now`]).

use super::SharedStore;
use crate::store::FenceSlot;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// The lease the OTA and migration engines and export/import jobs run under.
pub const ENGINES: &str = "engines";
/// The lease of the node that drains the forwarding outbox.
pub const OUTBOX: &str = "outbox";

/// A held lease: its epoch (a term number that only grows).
pub type Term = Option<u64>;

/// Keeps trying to hold one lease; [`LeaseKeeper::watch`] says when this node holds it.
pub struct LeaseKeeper {
    name: &'static str,
    node: u16,
    ttl: Duration,
    shared: Arc<dyn SharedStore>,
    fence: Arc<FenceSlot>,
    term: watch::Sender<Term>,
    /// Wakes the keeper for an attempt now ([`LeaseKeeper::try_now`]).
    nudge: Notify,
}

impl LeaseKeeper {
    pub fn new(
        name: &'static str,
        node: u16,
        ttl: Duration,
        shared: Arc<dyn SharedStore>,
    ) -> LeaseKeeper {
        let (term, _) = watch::channel(None);
        LeaseKeeper {
            name,
            node,
            ttl,
            shared,
            fence: Arc::new(FenceSlot::default()),
            term,
            nudge: Notify::new(),
        }
    }

    /// Makes the next attempt now instead of at the end of the period (the holder said it
    /// released the lease: a clean stop).
    pub fn try_now(&self) {
        self.nudge.notify_one();
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The fence of this lease: writes through a store handle fenced with it commit only
    /// during this node's terms.
    pub fn fence(&self) -> Arc<FenceSlot> {
        Arc::clone(&self.fence)
    }

    /// `Some(epoch)` while this node holds the lease.
    pub fn watch(&self) -> watch::Receiver<Term> {
        self.term.subscribe()
    }

    pub fn held(&self) -> Term {
        *self.term.borrow()
    }

    fn set(&self, term: Term) {
        self.fence
            .set(term.map(|epoch| (self.name, self.node, epoch)));
        self.term.send_if_modified(|t| {
            let changed = *t != term;
            *t = term;
            changed
        });
    }

    /// Takes and keeps the lease until `stop` turns true; then gives it up (released in the
    /// database, so another node need not wait for it to expire).
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let period = self.ttl / 3;
        // Given up locally this long before the database's expiry: covers the time between
        // sending a renewal and the server stamping it, and clock rates.
        let margin = (self.ttl / 5).max(Duration::from_millis(50));
        let mut valid_until: Option<Instant> = None;
        loop {
            let sent = Instant::now();
            match self.held() {
                None => match self
                    .shared
                    .lease_acquire(self.name, self.node, self.ttl)
                    .await
                {
                    Ok(Some(epoch)) => {
                        valid_until = Some(sent + self.ttl - margin);
                        tracing::info!(lease = self.name, epoch, "lease taken");
                        self.set(Some(epoch));
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::debug!(lease = self.name, %error, "cannot take the lease")
                    }
                },
                Some(epoch) => match self
                    .shared
                    .lease_renew(self.name, self.node, epoch, self.ttl)
                    .await
                {
                    Ok(true) => valid_until = Some(sent + self.ttl - margin),
                    Ok(false) => {
                        tracing::warn!(lease = self.name, epoch, "lease lost (taken over)");
                        valid_until = None;
                        self.set(None);
                    }
                    Err(error) => {
                        tracing::warn!(lease = self.name, epoch, %error, "cannot renew the lease");
                    }
                },
            }
            // However the renewals fare, the term ends where the database would end it.
            if valid_until.is_some_and(|v| Instant::now() >= v) {
                tracing::warn!(
                    lease = self.name,
                    "lease expired before it could be renewed"
                );
                valid_until = None;
                self.set(None);
            }
            let wait = match valid_until {
                Some(v) => period.min(v.saturating_duration_since(Instant::now())),
                None => period,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.nudge.notified() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        if let Some(epoch) = self.held() {
            self.set(None);
            if let Err(error) = self.shared.lease_release(self.name, self.node, epoch).await {
                tracing::warn!(lease = self.name, %error, "cannot release the lease");
            } else {
                tracing::info!(lease = self.name, epoch, "lease released");
            }
        }
    }
}
