//! The rate-limit side of [`Forwarder`]: per-instance overrides (set, read, persisted as
//! store documents), mirror limits for data sync copies, and the limiters the publisher
//! consults.

use super::*;

impl Forwarder {
    /// Sets (`Some`) or removes (`None`, falling back to the configured default) the rate
    /// limit of messages forwarded to `instance_id`. A limit with neither bound is an explicit
    /// "unlimited" that overrides the default. The override is a store document (durable when
    /// this returns, loaded again at start) and applies to the running publisher from its next
    /// row. Works with forwarding off (stored and shown). Returns the limit now in force.
    pub async fn set_rate_limit(
        &self,
        instance_id: &str,
        limit: Option<RateLimit>,
    ) -> Result<InstanceRateLimit, ForwarderError> {
        self.check_instance(instance_id)?;
        let _serial = self.limits_admin.lock().await;
        // Until memory holds it: no other node's write of the limit is applied meanwhile.
        let _write = self.doc_writes.begin().await;
        let had_override = lock(&self.limits).has_override(instance_id);
        let op = match limit {
            Some(l) => Some(Op::PutDoc {
                kind: RATE_LIMIT_DOC_KIND,
                id: instance_id.to_owned(),
                body: serde_json::to_string(&l).map_err(|e| ForwarderError::Corrupt {
                    id: format!("{RATE_LIMIT_DOC_KIND}/{instance_id}"),
                    message: e.to_string(),
                })?,
            }),
            None if had_override => Some(Op::DeleteDoc {
                kind: RATE_LIMIT_DOC_KIND,
                id: instance_id.to_owned(),
            }),
            None => None,
        };
        if let Some(op) = op {
            self.store.submit(vec![op]).await?;
        }
        let (effective, source) = {
            let mut limits = lock(&self.limits);
            limits.set_override(instance_id, limit);
            limits.effective(instance_id)
        };
        self.limits_changed.notify_one();
        tracing::info!(
            instance_id,
            msgs_per_sec = effective.and_then(|l| l.msgs_per_sec).map(|n| n.get()),
            bytes_per_sec = effective.and_then(|l| l.bytes_per_sec).map(|n| n.get()),
            source = ?source,
            "forwarding rate limit changed"
        );
        Ok(InstanceRateLimit::new(instance_id, effective, source))
    }

    /// The rate limit forwarding to `instance_id` runs under, and where it comes from.
    pub fn rate_limit(&self, instance_id: &str) -> Result<InstanceRateLimit, ForwarderError> {
        self.check_instance(instance_id)?;
        let (limit, source) = lock(&self.limits).effective(instance_id);
        Ok(InstanceRateLimit::new(instance_id, limit, source))
    }

    /// Sets (or with `None` removes) the limit of *mirrored* rows forwarded to `instance_id`:
    /// rows for devices that instance does not own (data sync copies). Rows of its own devices
    /// are not affected.
    pub fn set_mirror_rate_limit(&self, instance_id: &str, limit: Option<RateLimit>) {
        let mut limits = lock(&self.mirror_limits);
        match limit {
            Some(l) => {
                limits.insert(instance_id.to_owned(), Arc::new(Limiter::new(l)));
            }
            None => {
                limits.remove(instance_id);
            }
        }
    }

    /// The mirror limiter of `target`, when `row` is a mirrored copy for it (the device is
    /// owned by another instance, or no longer exists).
    pub(crate) fn mirror_limiter(&self, row: &outbox::OutboxRow) -> Option<Arc<Limiter>> {
        let limiter = lock(&self.mirror_limits).get(&row.target).cloned()?;
        let owner = self
            .registry
            .device_instance(&row.msg.product_key, &row.msg.device_name);
        (owner.as_deref() != Some(row.target.as_str())).then_some(limiter)
    }

    pub(crate) fn limiter(&self, target: &str) -> Option<Arc<Limiter>> {
        lock(&self.limits).limiter(target)
    }
}
