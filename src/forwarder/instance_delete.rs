//! Deleting an instance from the forwarder's side: its pending outbox rows, its consumer
//! groups and queues, its exchange and its rate-limit documents.

use super::*;

impl Forwarder {
    /// Group ids of `instance_id`'s consumer groups (whatever the registry says).
    fn group_ids_of(&self, instance_id: &str) -> Vec<String> {
        lock(&self.groups)
            .groups
            .range((instance_id.to_owned(), String::new())..)
            .take_while(|((iid, _), _)| iid == instance_id)
            .map(|((_, gid), _)| gid.clone())
            .collect()
    }

    /// Messages waiting in the outbox for `instance_id` (0 with forwarding off).
    pub async fn pending_for(&self, instance_id: &str) -> Result<u64, ForwarderError> {
        match &self.outbox {
            Some(outbox) => Ok(outbox.count_for_target(instance_id).await?),
            None => Ok(0),
        }
    }

    /// Deletes what forwarding keeps for an instance that is being deleted, around `commit`
    /// (the registry's delete, given the ops to submit with it in one atomic submission).
    ///
    /// Refused before `commit` is called, changing nothing:
    /// [`ForwarderError::InstanceHasGroups`] when the instance has consumer groups and `force`
    /// is false; [`ForwarderError::InstanceOutboxBusy`] while messages for it wait in the
    /// outbox (they would be lost: deleting them is not ours to decide, and forwarding them
    /// needs the exchange). Consumer-group and rate-limit changes wait meanwhile, so none can
    /// be made for the instance half-way.
    ///
    /// The ops delete the group documents (`force`) and the instance's rate-limit override,
    /// and record tombstones for the groups' queues and the instance's exchange. Once `commit`
    /// succeeded, memory follows, then RabbitMQ: the queues and the exchange are deleted now
    /// when connected; a broker that is unreachable or fails leaves the tombstones, and the
    /// next connection deletes them. The delete itself has succeeded either way.
    pub async fn delete_instance<E, F, Fut>(
        &self,
        instance_id: &str,
        force: bool,
        commit: F,
    ) -> Result<InstanceRemoved, E>
    where
        E: From<ForwarderError>,
        F: FnOnce(Vec<Op>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        let _groups_serial = self.groups_admin.lock().await;
        let _limits_serial = self.limits_admin.lock().await;
        let group_ids = self.group_ids_of(instance_id);
        if !group_ids.is_empty() && !force {
            return Err(ForwarderError::InstanceHasGroups {
                instance_id: instance_id.to_owned(),
                groups: group_ids,
            }
            .into());
        }
        let messages = self.pending_for(instance_id).await?;
        if messages > 0 {
            return Err(ForwarderError::InstanceOutboxBusy {
                instance_id: instance_id.to_owned(),
                messages,
            }
            .into());
        }
        let exchange = self.topology.exchange(instance_id);
        let queues: Vec<(String, String)> = group_ids
            .iter()
            .map(|gid| {
                (
                    groups::doc_id(instance_id, gid),
                    self.topology.queue(instance_id, gid),
                )
            })
            .collect();
        let write = self.doc_writes.begin().await;
        commit(removal_ops(instance_id, &queues, &exchange)).await?;
        let link = self.forget_instance(instance_id, &group_ids, &queues, &exchange);
        drop(write);
        let amqp = match link {
            None if !self.enabled() => "disabled",
            None => "pending",
            Some(link) => {
                self.delete_on_broker(&link, instance_id, &queues, &exchange)
                    .await
            }
        };
        Ok(InstanceRemoved {
            exchange,
            groups: group_ids,
            amqp,
        })
    }

    /// Memory follows a committed instance delete: its groups go, their queues' and its
    /// exchange's tombstones are kept, its rate limits and counts are forgotten. Returns the
    /// link, if connected.
    fn forget_instance(
        &self,
        instance_id: &str,
        group_ids: &[String],
        queues: &[(String, String)],
        exchange: &str,
    ) -> Option<Arc<AmqpLink>> {
        let link = {
            let mut st = lock(&self.groups);
            for gid in group_ids {
                st.groups.remove(&(instance_id.to_owned(), gid.clone()));
            }
            for (id, queue) in queues {
                st.tombstones.insert(id.clone(), queue.clone());
            }
            st.exchange_tombstones
                .insert(instance_id.to_owned(), exchange.to_owned());
            st.link.clone()
        };
        for (id, _) in queues {
            self.forget_group_metrics(id);
        }
        lock(&self.limits).set_override(instance_id, None);
        lock(&self.mirror_limits).remove(instance_id);
        lock(&self.published).remove(instance_id);
        self.exchanges_deleted.fetch_add(1, Ordering::AcqRel);
        link
    }

    /// Deletes the instance's group queues and its exchange on the broker, forgetting each
    /// tombstone that is done: `"deleted"` when all are, else `"pending"` (the next connection
    /// retries).
    async fn delete_on_broker(
        &self,
        link: &AmqpLink,
        instance_id: &str,
        queues: &[(String, String)],
        exchange: &str,
    ) -> &'static str {
        let mut all = true;
        for (id, queue) in queues {
            match delete_on(link, queue).await {
                Ok(()) => {
                    if let Err(e) = self.forget_tombstone(id).await {
                        tracing::warn!(error = %e, %queue, "cannot forget a deleted group's tombstone");
                    }
                }
                Err(e) => {
                    all = false;
                    tracing::warn!(error = %e, %queue, "queue not deleted yet; retried on the next connection");
                }
            }
        }
        match self
            .delete_exchange_tombstone(link, instance_id, exchange)
            .await
        {
            Ok(()) if all => "deleted",
            Ok(()) => "pending",
            Err(e) => {
                tracing::warn!(error = %e, %exchange, "exchange not deleted yet; retried on the next connection");
                "pending"
            }
        }
    }
}

/// The store ops of an instance delete: each group's document deleted and its queue's
/// tombstone recorded, the instance's rate-limit override deleted and its exchange's tombstone
/// recorded.
fn removal_ops(instance_id: &str, queues: &[(String, String)], exchange: &str) -> Vec<Op> {
    let mut ops = Vec::with_capacity(2 * queues.len() + 2);
    for (id, queue) in queues {
        ops.push(Op::DeleteDoc {
            kind: GROUP_DOC_KIND,
            id: id.clone(),
        });
        ops.push(Op::PutDoc {
            kind: TOMBSTONE_DOC_KIND,
            id: id.clone(),
            body: queue.clone(),
        });
    }
    ops.push(Op::DeleteDoc {
        kind: RATE_LIMIT_DOC_KIND,
        id: instance_id.to_owned(),
    });
    ops.push(Op::PutDoc {
        kind: EXCHANGE_TOMBSTONE_DOC_KIND,
        id: instance_id.to_owned(),
        body: exchange.to_owned(),
    });
    ops
}
