//! Push scheduling: each job's queue of ready tasks is drained at the job's rate (ramp
//! included) by one pass of the deadline task, offline devices become QUEUED(OFFLINE), and
//! every push is published only after its NOTIFIED is durable.

use super::apply::Pending;
use super::{lock, Delivery, Due, JobEntry, OtaEngine, TaskKey};
use crate::ota::rate::PushLimiter;
use crate::ota::task::{Event, QueueReason, TaskStatus};
use fleetgate_topics::UpgradeMessage;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Most pushes one pass of the deadline task makes for one job before yielding.
const PUSH_BATCH: usize = 512;

impl OtaEngine {
    pub(super) fn arm_push(&self, job: &JobEntry, at: i64) {
        {
            let mut q = lock(&job.push);
            if q.armed.is_some_and(|a| a <= at) {
                return;
            }
            q.armed = Some(at);
        }
        self.arm(at, Due::JobPush(job.job_id.clone()));
    }

    /// Publishes the upgrade message of `key`'s job to the device (state already durable).
    pub(super) fn deliver(&self, job: &JobEntry, key: &TaskKey) {
        let Some(package) = self.inner.firmware.get(&job.firmware_id) else {
            tracing::error!(job = %job.job_id, firmware = %job.firmware_id, "firmware of a running job is gone; push skipped");
            return;
        };
        let data = self
            .inner
            .firmware
            .upgrade_data(&package, self.inner.config.download_url_ttl);
        let id = self.inner.next_message_id.fetch_add(1, Ordering::Relaxed);
        let payload = UpgradeMessage::new(id, data).to_vec();
        let topic = format!("/ota/device/upgrade/{}/{}", key.pk, key.dn);
        if let Err(e) = self.inner.pusher.push_to(&key.pk, &key.dn, topic, payload) {
            // The task is NOTIFIED; a reconnect or a firmware/get recovers it.
            tracing::warn!(error = %e, job = %job.job_id, dn = %key.dn, "upgrade push not published");
        }
    }

    /// A due re-push: publish when connected, otherwise wait for the device.
    pub(super) async fn repush(&self, job: &Arc<JobEntry>, key: &TaskKey, now: i64) {
        let event = if self.inner.pusher.is_connected(&key.pk, &key.dn) && job.pushes_allowed() {
            Event::Repushed
        } else {
            Event::PushDeferred
        };
        self.apply(key, event, now).await;
    }

    /// `key`'s task was just queued OFFLINE because its device was not connected when the
    /// engine looked. A device that connected since then may have been told to the engine while
    /// the task still waited for its push — and a connect changes nothing for such a task — so
    /// it is looked at again now: a device connected by now gets its connect for this task
    /// (a push after the connect delay) instead of waiting for a connect that already happened.
    /// A connect told after this look finds the task OFFLINE and queues it itself.
    pub(super) async fn recheck_offline(&self, key: &TaskKey) {
        if !self.inner.pusher.is_connected(&key.pk, &key.dn) {
            return;
        }
        let now = self.now();
        match self.inner.tasks.get_mut(key) {
            Some(mut slot)
                if slot.state.status == TaskStatus::Queued
                    && slot.state.queue_reason == Some(QueueReason::Offline) =>
            {
                slot.ready_at = now + self.inner.config.connect_push_delay_ms.max(0);
            }
            _ => return,
        }
        self.apply(key, Event::DeviceOnline, now).await;
    }

    /// One pass over a job's push queue: pushes as many ready tasks as the rate allows now,
    /// marks offline ones OFFLINE, and arms the next pass.
    pub(super) async fn push_pass(&self, job: &Arc<JobEntry>, now: i64) {
        if !job.pushes_allowed() {
            return;
        }
        let mut batch: Vec<TaskKey> = Vec::new();
        // Queue entries may repeat (a device that went offline and came back): one push each.
        let mut taken: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut offline: Vec<TaskKey> = Vec::new();
        let mut next: Option<i64> = None;
        {
            let mut q = lock(&job.push);
            // Ramp: rebuild the bucket when the level changes.
            if let Some(plan) = &job.rate {
                let started = lock(&job.job).started_at_ms.unwrap_or(now);
                let succeeded = job.counters()[TaskStatus::Succeeded.index()];
                let level = plan.level(started, now, succeeded);
                let per_minute = plan.per_minute(level);
                let burst = plan.burst(per_minute);
                if q.limiter.is_none() || q.level != level {
                    let rebuilt = match &q.limiter {
                        Some(l) => l.with_rate(per_minute, burst),
                        None => PushLimiter::new(per_minute, burst, []),
                    };
                    q.limiter = Some(rebuilt);
                    q.level = level;
                }
                if !q.ready.is_empty() {
                    if let Some(step) = plan.next_step_at(started, level) {
                        next = Some(step);
                    }
                }
            }
            while let Some(dn) = q.ready.front().cloned() {
                if batch.len() >= PUSH_BATCH {
                    next = Some(now);
                    break;
                }
                let key = TaskKey::new(&job.job_id, &job.product_key, &dn);
                let (ready, ready_at) = match self.inner.tasks.get(&key) {
                    Some(s) => (s.state.is_ready(), s.ready_at),
                    None => (false, 0),
                };
                if !ready || !taken.insert(dn.clone()) {
                    q.ready.pop_front();
                    continue;
                }
                if ready_at > now {
                    next = Some(next.map_or(ready_at, |n| n.min(ready_at)));
                    break;
                }
                if !self.inner.pusher.is_connected(&job.product_key, &dn) {
                    q.ready.pop_front();
                    offline.push(key);
                    continue;
                }
                if let Some(limiter) = q.limiter.as_mut() {
                    if let Err(at) = limiter.try_take(now) {
                        next = Some(next.map_or(at, |n| n.min(at)));
                        break;
                    }
                }
                q.ready.pop_front();
                batch.push(key);
            }
            if q.ready.is_empty() {
                // Nothing waits: a ramp step alone is no reason to wake up.
                next = None;
            }
        }
        for key in &offline {
            self.apply(key, Event::Queue(QueueReason::Offline), now)
                .await;
        }
        for key in &offline {
            self.recheck_offline(key).await;
        }
        // Write-ahead: every NOTIFIED is submitted, the one group commit awaited, then each
        // push is published.
        let pending: Vec<Pending> = batch
            .iter()
            .filter_map(|k| self.apply_sync(k, Event::Pushed, now))
            .collect();
        for p in pending {
            self.complete(p, Delivery::Push).await;
        }
        if let Some(at) = next {
            self.arm_push(job, at);
        }
    }
}
