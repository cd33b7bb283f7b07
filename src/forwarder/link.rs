//! The AMQP link as [`Forwarder`] manages it for the publisher: publishing a new connection
//! and what must be declared or deleted on it, recording declared groups and deleted
//! exchanges, and clearing tombstones.

use super::*;

impl Forwarder {
    /// Publishes the new connection and returns what must be done on it: every group's
    /// `(exchange, queue)` to declare, every tombstone `(doc id, queue)` and every exchange
    /// tombstone `(instance id, exchange)` to delete. Done under the groups lock so a group
    /// created (or an instance deleted) concurrently is either in this snapshot or sees the
    /// link and does its own broker work.
    pub(super) fn attach_link(&self, link: Arc<AmqpLink>) -> LinkWork {
        let mut st = lock(&self.groups);
        st.link = Some(link);
        let groups = st
            .groups
            .values()
            // Cluster mode: groups of an instance another node deleted stay in this node's
            // memory until it restarts; they are not declared again.
            .filter(|e| self.registry.get_instance(&e.group.instance_id).is_ok())
            .map(|e| {
                let g = &e.group;
                GroupToDeclare {
                    instance_id: g.instance_id.clone(),
                    group_id: g.group_id.clone(),
                    exchange: self.topology.exchange(&g.instance_id),
                    queue: self.topology.queue(&g.instance_id, &g.group_id),
                    ttl_secs: self.message_ttl_secs(g),
                }
            })
            .collect();
        let tombstones = st
            .tombstones
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let exchanges = st
            .exchange_tombstones
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        LinkWork {
            groups,
            tombstones,
            exchanges,
        }
    }

    pub(super) fn detach_link(&self) {
        let mut st = lock(&self.groups);
        st.link = None;
        for e in st.groups.values_mut() {
            e.declared = false;
        }
    }

    pub(super) fn link(&self) -> Option<Arc<AmqpLink>> {
        lock(&self.groups).link.clone()
    }

    /// Records that a group's queue is declared; when RabbitMQ kept an existing queue with
    /// other arguments, counts it and warns (once per queue and process).
    pub(super) fn mark_declared(
        &self,
        instance_id: &str,
        group_id: &str,
        how: Declared,
        ttl_secs: u32,
    ) {
        if let Some(e) = lock(&self.groups)
            .groups
            .get_mut(&(instance_id.to_owned(), group_id.to_owned()))
        {
            e.declared = true;
        }
        if how == Declared::KeptExisting {
            self.metrics.forwarder_queues_kept.inc();
            let queue = self.topology.queue(instance_id, group_id);
            if lock(&self.kept_queues).insert(queue.clone()) {
                tracing::warn!(
                    %queue,
                    message_ttl_secs = ttl_secs,
                    fix = "delete and re-create the consumer group (its queued messages are lost)",
                    "consumer group queue exists with other arguments (406); kept as it is, \
                     without this message TTL"
                );
            }
        }
    }

    /// The `x-message-ttl` (seconds, 0 = none) of a group's queue.
    pub(super) fn message_ttl_secs(&self, group: &ConsumerGroup) -> u32 {
        group
            .message_ttl_secs
            .unwrap_or(self.config.queue_message_ttl_secs)
    }

    /// Deletes a deleted instance's exchange in RabbitMQ (from its tombstone) and forgets the
    /// tombstone; an instance created again with the same id since owns the exchange, which is
    /// then kept. `Err`: the broker failed (the tombstone stays for the next connection).
    pub(super) async fn delete_exchange_tombstone(
        &self,
        link: &AmqpLink,
        instance_id: &str,
        exchange: &str,
    ) -> Result<(), lapin::Error> {
        if self.registry.get_instance(instance_id).is_err() {
            delete_exchange_on(link, exchange).await?;
            tracing::info!(instance_id, %exchange, "deleted instance's exchange deleted in RabbitMQ");
        }
        let forgotten = self
            .registry
            .store()
            .submit(vec![Op::DeleteDoc {
                kind: EXCHANGE_TOMBSTONE_DOC_KIND,
                id: instance_id.to_owned(),
            }])
            .await;
        match forgotten {
            Ok(()) => {
                lock(&self.groups).exchange_tombstones.remove(instance_id);
            }
            // Deleting it again later is harmless.
            Err(e) => {
                tracing::warn!(error = %e, instance_id, "cannot forget a deleted instance's exchange tombstone")
            }
        }
        Ok(())
    }

    /// Counts a deletion of an instance's exchange: the publisher re-checks every target.
    pub(crate) fn exchanges_deleted(&self) -> u64 {
        self.exchanges_deleted.load(Ordering::Acquire)
    }

    pub(super) async fn forget_tombstone(&self, id: &str) -> Result<(), ForwarderError> {
        self.store
            .submit(vec![Op::DeleteDoc {
                kind: TOMBSTONE_DOC_KIND,
                id: id.to_owned(),
            }])
            .await?;
        lock(&self.groups).tombstones.remove(id);
        Ok(())
    }
}
