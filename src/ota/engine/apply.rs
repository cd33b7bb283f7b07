//! Applying an event to a task, write-ahead: the pure machine runs under the task's shard
//! guard and the whole task document is submitted there (store order = memory order); the
//! effects (queueing, publishing, events, job completion) run only once the change is durable.

use super::internal_events::{RetryScheduled, TaskCounted, TaskFailed, UpgradeDelivered};
use super::{lock, task_doc, JobEntry, OtaEngine, TaskKey};
use crate::ota::events::TaskEvent;
use crate::ota::task::{transition, Effect, Event, HistoryEvent, Note, TaskState, TaskStatus};
use crate::store::Ticket;
use std::sync::{Arc, PoisonError};

/// A transition applied in memory and submitted, whose effects wait for durability.
pub(super) struct Pending {
    pub(super) key: TaskKey,
    pub(super) job: Arc<JobEntry>,
    pub(super) from: TaskStatus,
    pub(super) to: TaskStatus,
    pub(super) effects: Vec<Effect>,
    pub(super) note: Option<Note>,
    pub(super) state: TaskState,
    pub(super) ticket: Option<Ticket>,
    pub(super) at_ms: i64,
    /// The device's instance when the registry no longer knows it (a deleted device), for
    /// [`TaskEvent::instance_id`].
    pub(super) instance_id: Option<String>,
}

/// How a delivery reaches the device.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Delivery {
    /// Publish on the upgrade topic.
    Push,
    /// The device pulled it (`firmware/get`): the reply carries the data.
    Pull,
}

impl Delivery {
    /// The `kind` label of `ota_pushes`.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Delivery::Push => "push",
            Delivery::Pull => "pull",
        }
    }
}

impl OtaEngine {
    /// Runs the state machine for one task in memory and submits its document. `None` when
    /// the event is ignored (or the task is unknown).
    pub(super) fn apply_sync(&self, key: &TaskKey, event: Event<'_>, now: i64) -> Option<Pending> {
        self.apply_sync_as(key, event, now, None)
    }

    /// [`Self::apply_sync`], naming the history entry `note_as` instead of the machine's name
    /// (a pull is a push the device asked for).
    pub(super) fn apply_sync_as(
        &self,
        key: &TaskKey,
        event: Event<'_>,
        now: i64,
        note_as: Option<HistoryEvent>,
    ) -> Option<Pending> {
        let job = self.job_entry(&key.job_id)?;
        let mut slot = self.inner.tasks.get_mut(key)?;
        let t = match transition(&slot.state, &job.policy, event, now) {
            Ok(t) => t,
            Err(ignored) => {
                tracing::trace!(job = %key.job_id, dn = %key.dn, event = event.name(), why = ignored.0, "event ignored");
                return None;
            }
        };
        let from = slot.state.status;
        let to = t.state.status;
        slot.state = t.state;
        let mut t_note = t.note;
        if let (Some(n), Some(name)) = (t_note.as_mut(), note_as) {
            n.event = name;
        }
        let ticket = if let Some(note) = &t_note {
            slot.record_note(now, note, from);
            slot.dirty = false;
            Some(self.inner.store.submit(vec![task_doc(key, &slot)]))
        } else if from != to {
            slot.dirty = false;
            Some(self.inner.store.submit(vec![task_doc(key, &slot)]))
        } else {
            if !slot.dirty {
                slot.dirty = true;
                let _ = self.inner.dirty_tx.send(key.clone());
            }
            None
        };
        let state = slot.state.clone();
        drop(slot);
        if from != to {
            TaskCounted {
                job: &job,
                from: Some(from),
                to,
            }
            .emit(&self.inner.metrics);
        }
        Some(Pending {
            key: key.clone(),
            job,
            from,
            to,
            effects: t.effects,
            note: t_note,
            state,
            ticket,
            at_ms: now,
            instance_id: None,
        })
    }

    /// Awaits durability, then carries out the effects. Returns whether the change is durable.
    pub(super) async fn complete(&self, mut p: Pending, delivery: Delivery) -> bool {
        if let Some(ticket) = p.ticket.take() {
            if let Err(e) = ticket.await {
                // Memory is ahead of the disk; the next write of this task carries the state.
                // Acting now (a push) would break write-ahead, so do not.
                tracing::error!(error = %e, job = %p.key.job_id, dn = %p.key.dn, "task change not stored");
                self.inner
                    .unstored
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return false;
            }
        }
        let job = &p.job;
        let m = &self.inner.metrics;
        let device_name = p.key.dn.as_str();
        if p.note.as_ref().map(|n| n.event) == Some(HistoryEvent::RetryScheduled) {
            RetryScheduled { job, device_name }.emit(m);
        }
        if p.to == TaskStatus::Failed && p.from != TaskStatus::Failed {
            if let Some(reason) = p.state.failure {
                TaskFailed {
                    job,
                    device_name,
                    reason,
                }
                .emit(m);
            }
        }
        for effect in &p.effects {
            match effect {
                Effect::Enqueue => {
                    lock(&job.push).ready.push_back(p.key.dn.clone());
                    let ready_at = self
                        .inner
                        .tasks
                        .get(&p.key)
                        .map(|s| s.ready_at)
                        .unwrap_or(0);
                    self.arm_push(job, ready_at.max(p.at_ms));
                }
                // Stale queue entries are skipped when popped.
                Effect::Dequeue => {}
                Effect::Deliver => {
                    UpgradeDelivered {
                        job,
                        device_name,
                        delivery,
                    }
                    .emit(m);
                    if delivery == Delivery::Push {
                        self.deliver(job, &p.key);
                    }
                }
                Effect::Finished => {
                    self.inner.active.remove_if(
                        &(
                            p.key.pk.clone(),
                            p.key.dn.clone(),
                            job.policy.module.clone(),
                        ),
                        |_, j| *j == p.key.job_id,
                    );
                }
            }
        }
        if let Some(note) = &p.note {
            self.emit(&p, note);
        }
        self.rearm(&p.key, job);
        let ramps_on_success = job
            .rate
            .as_ref()
            .and_then(|r| r.spec.ramp.as_ref())
            .is_some_and(|r| r.every_succeeded.is_some());
        if p.to == TaskStatus::Succeeded && ramps_on_success {
            // The rate may have stepped up: look at the queue again now.
            self.arm_push(job, p.at_ms);
        }
        if p.effects.contains(&Effect::Finished) {
            if p.to == TaskStatus::Failed {
                self.check_abort(job, p.at_ms).await;
            }
            self.check_job_done(job, p.at_ms).await;
        }
        true
    }

    /// Applies one event and its effects. Returns whether something changed.
    pub(crate) async fn apply(&self, key: &TaskKey, event: Event<'_>, now: i64) -> bool {
        match self.apply_sync(key, event, now) {
            Some(p) => self.complete(p, Delivery::Push).await,
            None => false,
        }
    }

    fn emit(&self, p: &Pending, note: &Note) {
        let event = TaskEvent {
            job_id: p.key.job_id.clone(),
            firmware_id: p.job.firmware_id.clone(),
            product_key: p.key.pk.clone(),
            device_name: p.key.dn.clone(),
            instance_id: p
                .instance_id
                .clone()
                .or_else(|| self.registry().device_instance(&p.key.pk, &p.key.dn)),
            module: p.job.policy.module.clone(),
            dest_version: p.job.policy.dest_version.clone(),
            from_state: p.from,
            to_state: p.to,
            event: note.event.as_str().to_owned(),
            reason: note.reason.clone(),
            queue_reason: p.state.queue_reason,
            failure: p.state.failure,
            progress: p.state.progress,
            attempt: p.state.attempt,
            retries_used: p.state.retries_used,
            at_ms: p.at_ms,
        };
        let sink = self
            .inner
            .sink
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(sink) = sink {
            sink(&event);
        }
        // No receiver is fine.
        let _ = self.inner.events.send(event);
    }

    /// [`OtaEngine::apply`] behind a box: the abort rule applies events from inside the
    /// effects of another event, which an `async fn` cannot do without indirection.
    pub(crate) fn apply_boxed<'a>(
        &'a self,
        key: &'a TaskKey,
        event: Event<'a>,
        now: i64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>> {
        Box::pin(self.apply(key, event, now))
    }
}
