//! Cluster mode: the forwarder's documents as other nodes change them. Every node keeps the
//! consumer groups, the rate-limit overrides and the tombstones in memory; [`Forwarder::doc_follower`]
//! is what keeps them current with the writes made through the other nodes
//! ([`crate::cluster::DocFollower`], fed by the cluster's feed receiver).
//!
//! - A **group** written elsewhere appears (or replaces the one held, when it differs), not yet
//!   declared on this node's connection; one deleted elsewhere disappears and is no longer
//!   declared or sampled.
//! - A **rate-limit override** is set or removed, and the publisher is woken (a row held back
//!   may go now).
//! - A **group tombstone** (a deleted group whose queue is still to be deleted) and an
//!   **exchange tombstone** (a deleted instance's exchange) are kept like this node's own, so
//!   its next connection deletes them; an exchange tombstone also makes the publisher re-check
//!   which targets still exist before it publishes to them again.
//!
//! Broker work is the drain holder's: the node that holds the `outbox` lease publishes, so its
//! exchanges must have their queues bound. While this node drains, one task declares the groups
//! that appear and deletes the queues and exchanges of new tombstones, in the order the changes
//! came, each re-checked against memory first (a group deleted again meanwhile is not declared,
//! a queue whose group came back is not deleted). A node that takes the lease over declares the
//! groups it has not declared yet, and deletes the tombstones it knows, before publishing
//! (`publisher.rs`). A node that does not drain leaves RabbitMQ alone: the node the write went
//! through declared or deleted already when it was connected, and the sampler re-declares a
//! group's queue found missing.
//!
//! The feed receiver skips this node's own feed messages, so its own writes are applied once
//! (by the API call that made them); a reload hands them back as they are, which changes
//! nothing. Every write of these documents holds the forwarder's [`DocWrites`] from before its
//! commit until memory follows it, and the receiver holds it while it applies the others'
//! writes, so memory changes in the store's order: two writes of one group id or one rate
//! limit racing through two nodes leave every node — both writers included — with the
//! store's value ([`crate::cluster::follow`]).

use super::*;
use crate::cluster::DocFollower;
use tokio::sync::mpsc;

/// Broker work a change made through another node calls for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Followed {
    /// A group appeared or changed: declare its queue and binding.
    Declare {
        instance_id: String,
        group_id: String,
    },
    /// A group's tombstone appeared: delete its queue.
    DeleteQueue { id: String },
    /// An instance's exchange tombstone appeared: delete its exchange.
    DeleteExchange { instance_id: String },
}

/// The forwarder as a [`DocFollower`].
struct ForwarderFollower {
    fwd: Arc<Forwarder>,
    /// To the task doing the broker work (none while forwarding is off).
    work: Option<mpsc::UnboundedSender<Followed>>,
}

/// `(instance id, group id)` of a group's document id `{iid}/{gid}` (group ids have no `/`).
fn group_key(id: &str) -> Option<(String, String)> {
    id.rsplit_once('/')
        .map(|(iid, gid)| (iid.to_owned(), gid.to_owned()))
}

impl Forwarder {
    /// What keeps this forwarder's documents current with the other nodes' writes (register
    /// it with [`Cluster::follow_docs`](crate::cluster::Cluster::follow_docs)). With forwarding
    /// on, it starts the task doing the broker work (stopped with the forwarder).
    pub fn doc_follower(self: &Arc<Self>) -> Arc<dyn DocFollower> {
        let work = match (self.enabled(), tokio::runtime::Handle::try_current()) {
            (true, Ok(runtime)) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let task = runtime.spawn(broker_work(self.clone(), rx, self.stop.subscribe()));
                lock(&self.tasks).push(task);
                Some(tx)
            }
            _ => None,
        };
        Arc::new(ForwarderFollower {
            fwd: self.clone(),
            work,
        })
    }

    /// This node publishes from the outbox now (cluster mode: it holds the `outbox` lease).
    fn drains(&self) -> bool {
        self.outbox
            .as_ref()
            .is_some_and(|o| o.drain_term().borrow().is_some())
    }

    /// A group document written (`Some`) or deleted elsewhere.
    fn follow_group(&self, id: &str, body: Option<&str>) -> Option<Followed> {
        let Some(body) = body else {
            let key = group_key(id)?;
            if lock(&self.groups).groups.remove(&key).is_some() {
                self.forget_group_metrics(id);
                tracing::info!(group = id, "consumer group deleted through another node");
            }
            return None;
        };
        let group: ConsumerGroup = match serde_json::from_str(body) {
            Ok(g) => g,
            Err(error) => {
                tracing::warn!(%error, group = id, "corrupt consumer group document ignored");
                return None;
            }
        };
        if groups::doc_id(&group.instance_id, &group.group_id) != id {
            tracing::warn!(
                group = id,
                "consumer group document names another group; ignored"
            );
            return None;
        }
        let key = (group.instance_id.clone(), group.group_id.clone());
        let mut st = lock(&self.groups);
        let held = st.groups.get(&key);
        if held.is_some_and(|e| e.group == group) {
            return None;
        }
        // The queue is the same: what was wrong with it stays until it is declared again.
        let problem = held.and_then(|e| e.problem.clone());
        st.groups.insert(
            key.clone(),
            GroupEntry {
                group,
                declared: false,
                problem,
                rate: RateSampler::default(),
            },
        );
        tracing::info!(group = id, "consumer group written through another node");
        Some(Followed::Declare {
            instance_id: key.0,
            group_id: key.1,
        })
    }

    /// A group tombstone written or deleted elsewhere.
    fn follow_tombstone(&self, id: &str, queue: Option<&str>) -> Option<Followed> {
        let mut st = lock(&self.groups);
        match queue {
            Some(queue) => {
                let before = st.tombstones.insert(id.to_owned(), queue.to_owned());
                (before.as_deref() != Some(queue))
                    .then(|| Followed::DeleteQueue { id: id.to_owned() })
            }
            None => {
                st.tombstones.remove(id);
                None
            }
        }
    }

    /// An exchange tombstone written (an instance deleted) or deleted elsewhere.
    fn follow_exchange_tombstone(
        &self,
        instance_id: &str,
        exchange: Option<&str>,
    ) -> Option<Followed> {
        let Some(exchange) = exchange else {
            lock(&self.groups).exchange_tombstones.remove(instance_id);
            return None;
        };
        let before = lock(&self.groups)
            .exchange_tombstones
            .insert(instance_id.to_owned(), exchange.to_owned());
        if before.as_deref() == Some(exchange) {
            return None;
        }
        lock(&self.published).remove(instance_id);
        // The publisher forgets which exchanges it declared and re-checks every target.
        self.exchanges_deleted.fetch_add(1, Ordering::AcqRel);
        Some(Followed::DeleteExchange {
            instance_id: instance_id.to_owned(),
        })
    }

    /// A rate-limit override written or deleted elsewhere. Whether anything changed.
    fn follow_rate_limit(&self, instance_id: &str, body: Option<&str>) -> bool {
        let limit = match body.map(serde_json::from_str::<RateLimit>) {
            None => None,
            Some(Ok(l)) => Some(l),
            Some(Err(error)) => {
                tracing::warn!(%error, instance_id, "corrupt rate-limit document ignored");
                return false;
            }
        };
        {
            let mut limits = lock(&self.limits);
            if limits.override_of(instance_id) == limit {
                return false;
            }
            limits.set_override(instance_id, limit);
        }
        self.limits_changed.notify_one();
        tracing::info!(
            instance_id,
            msgs_per_sec = limit.and_then(|l| l.msgs_per_sec).map(|n| n.get()),
            bytes_per_sec = limit.and_then(|l| l.bytes_per_sec).map(|n| n.get()),
            removed = limit.is_none(),
            "forwarding rate limit changed through another node"
        );
        true
    }

    /// The ids of `kind`'s documents held in memory.
    fn held(&self, kind: &str) -> Vec<String> {
        match kind {
            GROUP_DOC_KIND => lock(&self.groups)
                .groups
                .keys()
                .map(|(iid, gid)| groups::doc_id(iid, gid))
                .collect(),
            TOMBSTONE_DOC_KIND => lock(&self.groups).tombstones.keys().cloned().collect(),
            EXCHANGE_TOMBSTONE_DOC_KIND => lock(&self.groups)
                .exchange_tombstones
                .keys()
                .cloned()
                .collect(),
            RATE_LIMIT_DOC_KIND => lock(&self.limits).overridden(),
            _ => Vec::new(),
        }
    }

    /// One document of a followed kind, now; the broker work it calls for.
    fn follow(&self, kind: &str, id: &str, body: Option<&str>) -> Option<Followed> {
        match kind {
            GROUP_DOC_KIND => self.follow_group(id, body),
            TOMBSTONE_DOC_KIND => self.follow_tombstone(id, body),
            EXCHANGE_TOMBSTONE_DOC_KIND => self.follow_exchange_tombstone(id, body),
            RATE_LIMIT_DOC_KIND => {
                self.follow_rate_limit(id, body);
                None
            }
            _ => None,
        }
    }
}

impl ForwarderFollower {
    fn send(&self, work: Option<Followed>) {
        if let (Some(tx), Some(work)) = (&self.work, work) {
            let _ = tx.send(work);
        }
    }
}

impl DocFollower for ForwarderFollower {
    fn kinds(&self) -> Vec<&'static str> {
        vec![
            GROUP_DOC_KIND,
            TOMBSTONE_DOC_KIND,
            EXCHANGE_TOMBSTONE_DOC_KIND,
            RATE_LIMIT_DOC_KIND,
        ]
    }

    fn changed(&self, kind: &str, id: &str, body: Option<&str>) {
        self.send(self.fwd.follow(kind, id, body));
    }

    fn writes(&self) -> Option<&DocWrites> {
        Some(&self.fwd.doc_writes)
    }

    fn reloaded(&self, kind: &str, docs: &[(String, String)]) {
        let now: HashSet<&str> = docs.iter().map(|(id, _)| id.as_str()).collect();
        for id in self.fwd.held(kind) {
            if !now.contains(id.as_str()) {
                self.send(self.fwd.follow(kind, &id, None));
            }
        }
        for (id, body) in docs {
            self.send(self.fwd.follow(kind, id, Some(body)));
        }
    }
}

/// Does the broker work of followed changes, in their order, while this node drains the outbox
/// and is connected (otherwise the next connection or term does it: `publisher.rs`).
async fn broker_work(
    fwd: Arc<Forwarder>,
    mut work: mpsc::UnboundedReceiver<Followed>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let next = tokio::select! {
            next = work.recv() => next,
            _ = stop.changed() => None,
        };
        let Some(next) = next else {
            return;
        };
        if !fwd.drains() {
            continue;
        }
        let Some(link) = fwd.link() else {
            continue;
        };
        match next {
            Followed::Declare {
                instance_id,
                group_id,
            } => {
                // Still a group not declared yet, of an instance that exists?
                let ttl_secs = lock(&fwd.groups)
                    .groups
                    .get(&(instance_id.clone(), group_id.clone()))
                    .filter(|e| !e.declared)
                    .map(|e| fwd.message_ttl_secs(&e.group))
                    .filter(|_| fwd.registry.get_instance(&instance_id).is_ok());
                let Some(ttl_secs) = ttl_secs else {
                    continue;
                };
                let exchange = fwd.topology.exchange(&instance_id);
                let queue = fwd.topology.queue(&instance_id, &group_id);
                match declare_on(&link, &exchange, &queue, ttl_secs, fwd.config.queue_type).await {
                    Ok(how) => fwd.mark_declared(&instance_id, &group_id, how, ttl_secs),
                    // The sampler re-declares groups whose queue is missing.
                    Err(e) => tracing::warn!(error = %e, %queue, "consumer group not declared yet"),
                }
            }
            Followed::DeleteQueue { id } => {
                // Still a tombstone, and the group not created again meanwhile?
                let queue = {
                    let st = lock(&fwd.groups);
                    let back = group_key(&id).is_some_and(|key| st.groups.contains_key(&key));
                    st.tombstones.get(&id).cloned().filter(|_| !back)
                };
                let Some(queue) = queue else {
                    continue;
                };
                match delete_on(&link, &queue).await {
                    Ok(()) => {
                        if let Err(e) = fwd.forget_tombstone(&id).await {
                            tracing::warn!(error = %e, %queue, "cannot forget a deleted group's tombstone");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, %queue, "queue not deleted yet; retried on the next connection")
                    }
                }
            }
            Followed::DeleteExchange { instance_id } => {
                let exchange = lock(&fwd.groups)
                    .exchange_tombstones
                    .get(&instance_id)
                    .cloned();
                let Some(exchange) = exchange else {
                    continue;
                };
                if let Err(e) = fwd
                    .delete_exchange_tombstone(&link, &instance_id, &exchange)
                    .await
                {
                    tracing::warn!(error = %e, %exchange, "exchange not deleted yet; retried on the next connection");
                }
            }
        }
    }
}
