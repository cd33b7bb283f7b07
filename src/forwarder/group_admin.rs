//! The consumer-group CRUD of [`Forwarder`] behind the API: create (persisted, then declared
//! in RabbitMQ), list, details (backlog and consumers from the broker) and delete.

use super::*;

impl Forwarder {
    pub(super) fn check_instance(&self, instance_id: &str) -> Result<(), ForwarderError> {
        match self.registry.get_instance(instance_id) {
            Ok(_) => Ok(()),
            Err(RegistryError::NotFound { .. }) => {
                Err(ForwarderError::InstanceNotFound(instance_id.to_owned()))
            }
            Err(RegistryError::Store(e)) => Err(e.into()),
            Err(e) => Err(ForwarderError::Invalid {
                field: "instance_id",
                message: e.to_string(),
            }),
        }
    }

    /// Creates a consumer group: persisted (durable when this returns), then declared in
    /// RabbitMQ if connected (otherwise on the next connection).
    pub async fn create_group(
        &self,
        instance_id: &str,
        new: NewConsumerGroup,
    ) -> Result<ConsumerGroup, ForwarderError> {
        self.check_instance(instance_id)?;
        groups::validate_name(&new.name).map_err(|message| ForwarderError::Invalid {
            field: "name",
            message,
        })?;
        let group_id = match new.group_id {
            Some(id) => {
                groups::validate_group_id(&id).map_err(|message| ForwarderError::Invalid {
                    field: "group_id",
                    message,
                })?;
                id
            }
            None => groups::generate_group_id(),
        };
        let message_ttl_secs = new
            .message_ttl_secs
            .unwrap_or(self.config.queue_message_ttl_secs);
        groups::validate_message_ttl(message_ttl_secs).map_err(|message| {
            ForwarderError::Invalid {
                field: "message_ttl_secs",
                message,
            }
        })?;
        let _serial = self.groups_admin.lock().await;
        // Until memory holds it: no other node's write of the group is applied meanwhile.
        let write = self.doc_writes.begin().await;
        // Again under the lock: the instance may have been deleted while we waited.
        self.check_instance(instance_id)?;
        let key = (instance_id.to_owned(), group_id.clone());
        let exists = || ForwarderError::GroupExists {
            instance_id: instance_id.to_owned(),
            group_id: group_id.clone(),
        };
        if lock(&self.groups).groups.contains_key(&key) {
            return Err(exists());
        }
        let group = ConsumerGroup {
            instance_id: instance_id.to_owned(),
            group_id: group_id.clone(),
            name: new.name,
            created_at_ms: now_ms(),
            message_ttl_secs: Some(message_ttl_secs),
        };
        let id = groups::doc_id(instance_id, &group_id);
        let body = serde_json::to_string(&group).map_err(|e| ForwarderError::Corrupt {
            id: id.clone(),
            message: e.to_string(),
        })?;
        // A re-created group cancels the pending deletion of its old queue (it is the same queue).
        self.store
            .submit(vec![
                Op::PutDoc {
                    kind: GROUP_DOC_KIND,
                    id: id.clone(),
                    body,
                },
                Op::DeleteDoc {
                    kind: TOMBSTONE_DOC_KIND,
                    id: id.clone(),
                },
            ])
            .await?;
        let link = {
            let mut st = lock(&self.groups);
            st.tombstones.remove(&id);
            st.groups.insert(
                key,
                GroupEntry {
                    group: group.clone(),
                    declared: false,
                    problem: None,
                    rate: RateSampler::default(),
                },
            );
            st.link.clone()
        };
        drop(write);
        if let Some(link) = link {
            let exchange = self.topology.exchange(instance_id);
            let queue = self.topology.queue(instance_id, &group_id);
            let queue_type = self.config.queue_type;
            match declare_on(&link, &exchange, &queue, message_ttl_secs, queue_type).await {
                Ok(how) => self.mark_declared(instance_id, &group_id, how, message_ttl_secs),
                // The sampler re-declares groups whose queue is missing.
                Err(e) => tracing::warn!(error = %e, %queue, "consumer group not declared yet"),
            }
        }
        Ok(group)
    }

    /// The instance's consumer groups, by group id.
    pub fn list_groups(&self, instance_id: &str) -> Result<Vec<ConsumerGroup>, ForwarderError> {
        self.check_instance(instance_id)?;
        Ok(lock(&self.groups)
            .groups
            .range((instance_id.to_owned(), String::new())..)
            .take_while(|((iid, _), _)| iid == instance_id)
            .map(|(_, e)| e.group.clone())
            .collect())
    }

    fn group(&self, instance_id: &str, group_id: &str) -> Result<ConsumerGroup, ForwarderError> {
        lock(&self.groups)
            .groups
            .get(&(instance_id.to_owned(), group_id.to_owned()))
            .map(|e| e.group.clone())
            .ok_or_else(|| ForwarderError::GroupNotFound {
                instance_id: instance_id.to_owned(),
                group_id: group_id.to_owned(),
            })
    }

    /// A group with its queue's backlog and consumers (live, when connected) and consume rate
    /// (from the sampler).
    pub async fn group_details(
        &self,
        instance_id: &str,
        group_id: &str,
    ) -> Result<ConsumerGroupDetails, ForwarderError> {
        self.check_instance(instance_id)?;
        let group = self.group(instance_id, group_id)?;
        let exchange = self.topology.exchange(instance_id);
        let queue = self.topology.queue(instance_id, group_id);
        let mut backlog = None;
        let mut consumers = None;
        if let Some(link) = self.link() {
            match inspect_on(&link, &queue).await {
                Ok((ready, c)) => {
                    backlog = Some(ready);
                    consumers = Some(c);
                }
                Err(e) => tracing::warn!(error = %e, %queue, "cannot inspect consumer group queue"),
            }
        }
        let (rate, sampled_at, queue_status, queue_error) = lock(&self.groups)
            .groups
            .get(&(instance_id.to_owned(), group_id.to_owned()))
            .map(|e| {
                let (status, error) = match &e.problem {
                    Some((status, message)) => (*status, Some(message.clone())),
                    None if e.declared => (QueueStatus::Declared, None),
                    None => (QueueStatus::NotDeclared, None),
                };
                (e.rate.rate_per_minute, e.rate.sampled_at_ms, status, error)
            })
            .unwrap_or((None, None, QueueStatus::NotDeclared, None));
        Ok(ConsumerGroupDetails {
            group,
            exchange,
            queue,
            amqp: self.status().as_str().to_owned(),
            backlog,
            consumers,
            consume_rate_per_minute: rate,
            rate_sampled_at_ms: sampled_at,
            queue_type: self.config.queue_type,
            queue_status,
            queue_error,
        })
    }

    /// Deletes a group: its document now, its queue (with whatever it still holds) in RabbitMQ
    /// now if connected, else on the next connection (tombstone).
    pub async fn delete_group(
        &self,
        instance_id: &str,
        group_id: &str,
    ) -> Result<(), ForwarderError> {
        let _serial = self.groups_admin.lock().await;
        let write = self.doc_writes.begin().await;
        self.check_instance(instance_id)?;
        self.group(instance_id, group_id)?;
        let id = groups::doc_id(instance_id, group_id);
        let queue = self.topology.queue(instance_id, group_id);
        self.store
            .submit(vec![
                Op::DeleteDoc {
                    kind: GROUP_DOC_KIND,
                    id: id.clone(),
                },
                Op::PutDoc {
                    kind: TOMBSTONE_DOC_KIND,
                    id: id.clone(),
                    body: queue.clone(),
                },
            ])
            .await?;
        let link = {
            let mut st = lock(&self.groups);
            st.groups
                .remove(&(instance_id.to_owned(), group_id.to_owned()));
            st.tombstones.insert(id.clone(), queue.clone());
            st.link.clone()
        };
        drop(write);
        self.forget_group_metrics(&id);
        if let Some(link) = link {
            match delete_on(&link, &queue).await {
                Ok(()) => self.forget_tombstone(&id).await?,
                Err(e) => {
                    tracing::warn!(error = %e, %queue, "queue not deleted yet; retried on the next connection")
                }
            }
        }
        Ok(())
    }
}
