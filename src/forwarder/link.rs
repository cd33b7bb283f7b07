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
        self.work_of(&st, true)
    }

    /// Cluster mode, when a drain term starts on an established connection: the groups not
    /// declared on it yet (written through other nodes meanwhile, `follow.rs`), and every
    /// tombstone.
    pub(super) fn term_work(&self) -> LinkWork {
        let st = lock(&self.groups);
        self.work_of(&st, false)
    }

    /// The groups to declare (all, or those not declared yet) and the tombstones to delete.
    fn work_of(&self, st: &GroupState, all: bool) -> LinkWork {
        let groups = st
            .groups
            .values()
            .filter(|e| all || !e.declared)
            // Cluster mode: a group whose instance another node deleted is not declared again
            // (its document's deletion is on its way, or this node resynchronises).
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

    /// Records how a group's queue was declared. A queue kept with other arguments is counted
    /// and warned about (once per queue and process); one of the other type, or refused, is an
    /// error: logged when it is found (not again on each reconnect), exported as
    /// `fleetgate_forwarder_group_queue_error{group,status}` and shown in the group's
    /// `queue_status`/`queue_error` until a declare goes as asked.
    pub(super) fn mark_declared(
        &self,
        instance_id: &str,
        group_id: &str,
        how: Declared,
        ttl_secs: u32,
    ) {
        let queue = self.topology.queue(instance_id, group_id);
        let group = groups::doc_id(instance_id, group_id);
        let problem = self.queue_problem(&group, &queue, &how);
        let previous = {
            let mut st = lock(&self.groups);
            // A group deleted meanwhile is left alone.
            let Some(e) = st
                .groups
                .get_mut(&(instance_id.to_owned(), group_id.to_owned()))
            else {
                return;
            };
            e.declared = !matches!(how, Declared::Refused(_));
            std::mem::replace(&mut e.problem, problem.clone())
        };
        let before = previous.map(|(status, _)| status);
        let now = problem.as_ref().map(|(status, _)| *status);
        if before != now {
            if let Some(status) = before.filter(|s| is_queue_error(*s)) {
                self.metrics
                    .forwarder_group_queue_error
                    .remove(&[("group", group.clone()), ("status", status.as_str().into())]);
            }
        }
        if let Some(status) = now.filter(|s| is_queue_error(*s)) {
            self.metrics
                .forwarder_group_queue_error
                .get_or_create(&[("group", group.clone()), ("status", status.as_str().into())])
                .set(1);
        }
        match (&how, problem) {
            (Declared::AsAsked, _) | (_, None) => {
                if before.is_some_and(is_queue_error) {
                    tracing::info!(%group, %queue, queue_type = %self.config.queue_type,
                        "consumer group queue declared as configured again");
                }
            }
            (Declared::KeptExisting(_), Some((_, message))) => {
                self.metrics.forwarder_queues_kept.inc();
                if lock(&self.kept_queues).insert(queue.clone()) {
                    tracing::warn!(
                        %group,
                        %queue,
                        message_ttl_secs = ttl_secs,
                        fix = "delete and re-create the consumer group (its queued messages are lost)",
                        "{message}"
                    );
                }
            }
            (Declared::OtherType(_), Some((status, message))) => {
                self.metrics.forwarder_queues_kept.inc();
                if before != Some(status) {
                    tracing::error!(%group, %queue, queue_type = %self.config.queue_type, "{message}");
                }
            }
            (Declared::Refused(_), Some((status, message))) => {
                if before != Some(status) {
                    tracing::error!(%group, %queue, queue_type = %self.config.queue_type, "{message}");
                }
            }
        }
    }

    /// Drops a deleted group's labelled metrics (`group` = its doc id).
    pub(super) fn forget_group_metrics(&self, group: &str) {
        let label = [("group", group.to_owned())];
        self.metrics.forwarder_group_backlog.remove(&label);
        self.metrics.forwarder_group_consumers.remove(&label);
        for status in [QueueStatus::TypeMismatch, QueueStatus::Refused] {
            self.metrics.forwarder_group_queue_error.remove(&[
                ("group", group.to_owned()),
                ("status", status.as_str().into()),
            ]);
        }
    }

    /// The status and message of a queue not declared as asked (none when it was).
    fn queue_problem(
        &self,
        group: &str,
        queue: &str,
        how: &Declared,
    ) -> Option<(QueueStatus, String)> {
        let wanted = self.config.queue_type;
        let other = wanted.other();
        Some(match how {
            Declared::AsAsked => return None,
            Declared::KeptExisting(reply) => (
                QueueStatus::OtherArguments,
                format!(
                    "consumer group {group}: queue {queue} exists in RabbitMQ with other \
                     arguments ({reply}); it is kept as it is and still receives the group's \
                     messages. To apply the configured ones, delete and re-create the consumer \
                     group (messages still in its queue are lost)"
                ),
            ),
            Declared::OtherType(reply) => (
                QueueStatus::TypeMismatch,
                format!(
                    "consumer group {group}: queue {queue} exists in RabbitMQ with another type \
                     than amqp.queue_type = \"{wanted}\" ({reply}); it is kept as it is and still \
                     receives the group's messages, but without what a {wanted} queue \
                     guarantees. A queue's type cannot change: to make it {wanted}, let its \
                     consumers empty it, then delete the consumer group and create it again \
                     (messages still in its queue are lost); or set amqp.queue_type = \"{other}\" \
                     on every node"
                ),
            ),
            Declared::Refused(reply) => (
                QueueStatus::Refused,
                format!(
                    "consumer group {group}: RabbitMQ refused to declare queue {queue} as a \
                     {wanted} queue ({reply}); it does not exist and the group receives \
                     nothing. Quorum queues need RabbitMQ 3.8 or later, and 3.10 or later with \
                     a message TTL: upgrade RabbitMQ, set amqp.queue_type = \"{other}\", or \
                     re-create the group with message_ttl_secs = 0"
                ),
            ),
        })
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
        let _write = self.doc_writes.begin().await;
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
        let _write = self.doc_writes.begin().await;
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

/// Whether a queue status is an error (exported as `fleetgate_forwarder_group_queue_error`).
fn is_queue_error(status: QueueStatus) -> bool {
    matches!(status, QueueStatus::TypeMismatch | QueueStatus::Refused)
}
