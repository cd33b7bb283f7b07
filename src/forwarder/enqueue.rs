//! Routing and enqueueing: the instances a device's data goes to (its owner, then the route
//! hook's extras), storing a message in the outbox for each, and the per-target published
//! counts.

use super::*;

impl Forwarder {
    /// Installs the hook that adds targets beyond the owner (migration data sync).
    pub fn set_route_hook(&self, hook: Option<RouteHook>) {
        *self
            .route_hook
            .write()
            .unwrap_or_else(PoisonError::into_inner) = hook;
    }

    /// The instances a device's data goes to now: its owner, then the hook's extras.
    pub fn targets(&self, product_key: &str, device_name: &str) -> Vec<String> {
        self.targets_with_owner(product_key, device_name, None)
    }

    /// [`targets`](Self::targets), with `former_owner` standing in for the owner when the
    /// registry no longer knows the device (deleted: the OTA engine's `DEVICE_DELETED` events).
    fn targets_with_owner(
        &self,
        product_key: &str,
        device_name: &str,
        former_owner: Option<&str>,
    ) -> Vec<String> {
        let Some(owner) = self
            .registry
            .device_instance(product_key, device_name)
            .or_else(|| former_owner.map(str::to_owned))
        else {
            return Vec::new();
        };
        let hook = self
            .route_hook
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut targets = vec![owner];
        if let Some(hook) = hook {
            for t in hook(product_key, device_name, &targets[0]) {
                if !targets.contains(&t) {
                    targets.push(t);
                }
            }
        }
        targets
    }

    /// Stores `msg` durably in the outbox for every target (see [`targets`](Self::targets)).
    /// Resolves once committed — the device's PUBACK may go out then.
    ///
    /// Routing is decided and, when the outbox has room, the rows are handed to the writer
    /// during this call, so messages keep the order of the `enqueue` calls even when the
    /// returned futures are awaited elsewhere (e.g. a spawned status message).
    ///
    /// - Forwarding off: resolves `Ok` at once, nothing stored.
    /// - Unknown device (deleted meanwhile): `Ok`, nothing stored, counted as
    ///   `dropped{reason="unknown_device"}`.
    /// - Outbox full: waits up to `outbox_full_wait_ms` for space (back-pressure); still full,
    ///   [`ForwarderError::OutboxFull`], nothing stored: refused or dropped as `on_full` says,
    ///   counted, and logged (at most once a second).
    pub fn enqueue(
        &self,
        msg: ForwardMessage,
        on_full: OnFull,
    ) -> Enqueued<impl Future<Output = Result<(), ForwarderError>> + Send + 'static> {
        self.enqueue_with_owner(msg, None, on_full)
    }

    /// [`enqueue`](Self::enqueue), routed to `former_owner` when the device no longer exists.
    fn enqueue_with_owner(
        &self,
        msg: ForwardMessage,
        former_owner: Option<&str>,
        on_full: OnFull,
    ) -> Enqueued<impl Future<Output = Result<(), ForwarderError>> + Send + 'static> {
        enum Prepared {
            Nothing,
            Sent(tokio::sync::oneshot::Receiver<Result<(), OutboxError>>, u64),
            Wait(Outbox, Vec<NewRow>, u64),
        }
        let metrics = self.metrics.clone();
        let full_wait = Duration::from_millis(self.config.outbox_full_wait_ms);
        let prepared = match &self.outbox {
            None => Prepared::Nothing,
            Some(outbox) => {
                let targets =
                    self.targets_with_owner(&msg.product_key, &msg.device_name, former_owner);
                if targets.is_empty() {
                    metrics
                        .forwarder_dropped
                        .get_or_create(&[("reason", "unknown_device")])
                        .inc();
                    Prepared::Nothing
                } else {
                    let now = now_ms();
                    let msg = Arc::new(msg);
                    let rows: Vec<NewRow> = targets
                        .into_iter()
                        .map(|target| NewRow {
                            target,
                            enqueued_at_ms: now,
                            msg: msg.clone(),
                        })
                        .collect();
                    let size: u64 = rows.iter().map(NewRow::size).sum();
                    if outbox.try_admit(size) {
                        let n = rows.len() as u64;
                        Prepared::Sent(outbox.send_insert(rows), n)
                    } else {
                        Prepared::Wait(outbox.clone(), rows, size)
                    }
                }
            }
        };
        let may_log = self.may_log_drop();
        let waiting = matches!(prepared, Prepared::Wait(..));
        let done = async move {
            let (rx, n) = match prepared {
                Prepared::Nothing => return Ok(()),
                Prepared::Sent(rx, n) => (rx, n),
                Prepared::Wait(outbox, rows, size) => {
                    if let Err(e) = outbox.admit(size, full_wait).await {
                        let m = &rows[0].msg;
                        match on_full {
                            OnFull::Refuse => {
                                metrics.forwarder_refused.inc();
                                if may_log() {
                                    tracing::warn!(error = %e, pk = %m.product_key, dn = %m.device_name,
                                        kind = m.kind.as_str(),
                                        "forwarding outbox full: post refused (not acknowledged; the device sends it again)");
                                }
                            }
                            OnFull::Drop => {
                                metrics
                                    .forwarder_dropped
                                    .get_or_create(&[("reason", "outbox_full")])
                                    .inc_by(rows.len() as u64);
                                if may_log() {
                                    tracing::warn!(error = %e, pk = %m.product_key, dn = %m.device_name,
                                        kind = m.kind.as_str(), "forwarding outbox full: message dropped");
                                }
                            }
                        }
                        return Err(ForwarderError::OutboxFull);
                    }
                    let n = rows.len() as u64;
                    (outbox.send_insert(rows), n)
                }
            };
            rx.await.unwrap_or(Err(OutboxError::Closed))?;
            metrics.forwarder_enqueued.inc_by(n);
            Ok(())
        };
        Enqueued { waiting, done }
    }

    /// Enqueues `msg` from synchronous code that must not wait (connection callbacks, the OTA
    /// engine's event sink): the rows reach the outbox writer during the call (when it has
    /// room), the commit and any back-pressure wait finish in a spawned task. Nobody is told
    /// the message was stored, so an outbox that stays full drops it ([`OnFull::Drop`]).
    pub fn enqueue_detached(&self, msg: ForwardMessage) {
        self.enqueue_detached_with_owner(msg, None)
    }

    fn enqueue_detached_with_owner(&self, msg: ForwardMessage, former_owner: Option<&str>) {
        if !self.enabled() {
            return;
        }
        let pending = self
            .enqueue_with_owner(msg, former_owner, OnFull::Drop)
            .into_future();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    match pending.await {
                        Ok(()) | Err(ForwarderError::OutboxFull) => {}
                        Err(error) => {
                            tracing::error!(%error, "cannot store a message for forwarding")
                        }
                    }
                });
            }
            Err(_) => tracing::error!("enqueue_detached outside a tokio runtime; message dropped"),
        }
    }

    /// The OTA engine's event sink (`OtaEngine::set_event_sink`): every task state change is
    /// forwarded as an OTA task-state message. Does nothing while forwarding is off. A deleted
    /// device's `DEVICE_DELETED` cancels go to the instance that owned it (the event's
    /// `instance_id`), since the registry no longer knows the device.
    pub fn ota_event_sink(self: &Arc<Self>) -> crate::ota::TaskEventSink {
        let fwd = Arc::clone(self);
        Arc::new(move |e: &crate::ota::TaskEvent| {
            fwd.enqueue_detached_with_owner(
                ForwardMessage::ota_task_event(e),
                e.instance_id.as_deref(),
            )
        })
    }

    /// A closure saying whether a drop may be logged now (at most one log line a second).
    fn may_log_drop(&self) -> impl FnOnce() -> bool + Send + 'static {
        let last = Arc::clone(&self.last_drop_log_ms);
        move || {
            let now = now_ms();
            let prev = last.load(Ordering::Relaxed);
            now - prev >= 1000
                && last
                    .compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
        }
    }

    pub(crate) fn count_published(&self, target: &str) {
        let mut p = lock(&self.published);
        match p.get_mut(target) {
            Some(n) => *n += 1,
            None => {
                p.insert(target.to_owned(), 1);
            }
        }
    }

    pub(super) fn published_to(&self, instance_id: &str) -> u64 {
        lock(&self.published).get(instance_id).copied().unwrap_or(0)
    }
}
