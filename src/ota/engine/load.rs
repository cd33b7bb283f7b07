//! Start-up: every job and task is read back from the store, counters and indexes rebuilt,
//! push queues refilled and every deadline re-armed from persisted timestamps, so a restart
//! (even `kill -9`) carries on where the engine stopped.

use super::internal_events::TaskCounted;
use super::{lock, Due, JobEntry, OtaEngine, TaskKey, TaskSlot, JOB_DOC, TASK_DOC};
use crate::ota::model::{Job, JobStatus, Selection, TaskRecord};
use crate::ota::rate::{catch_up, PushLimiter};
use crate::ota::task::{next_deadline, TaskStatus};
use crate::ota::OtaError;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl OtaEngine {
    /// Reads every job and task back (blocking: start-up only).
    pub(super) fn load(&self) -> Result<(), OtaError> {
        let inner = &self.inner;
        let now = inner.clock.now_ms();
        for (id, body) in inner.store.load_documents(JOB_DOC)? {
            let job: Job = serde_json::from_str(&body).map_err(|e| OtaError::Corrupt {
                id: id.clone(),
                message: e.to_string(),
            })?;
            let policy = self.policy_for(&job);
            let entry = Arc::new(JobEntry::new(job, policy));
            self.insert_job(id, entry);
        }
        let mut push_times: HashMap<String, Vec<i64>> = HashMap::new();
        let mut loaded = 0usize;
        for (id, body) in inner.store.load_documents(TASK_DOC)? {
            let rec: TaskRecord = serde_json::from_str(&body).map_err(|e| OtaError::Corrupt {
                id: id.clone(),
                message: e.to_string(),
            })?;
            let Some(job) = inner.jobs.get(&rec.job_id).map(|j| Arc::clone(j.value())) else {
                tracing::warn!(task = %id, "task of an unknown job skipped");
                continue;
            };
            self.load_task(&job, rec, &mut push_times);
            loaded += 1;
        }
        // Job-level timers and push buckets.
        for e in inner.jobs.iter() {
            let times = push_times.remove(&e.value().job_id).unwrap_or_default();
            self.rearm_job(e.value(), now, times);
        }
        tracing::info!(jobs = inner.jobs.len(), tasks = loaded, "OTA jobs loaded");
        Ok(())
    }

    /// One stored task back in memory: counters, indexes, push queue and its deadline.
    fn load_task(
        &self,
        job: &Arc<JobEntry>,
        rec: TaskRecord,
        push_times: &mut HashMap<String, Vec<i64>>,
    ) {
        let inner = &self.inner;
        let key = TaskKey::new(&rec.job_id, &rec.product_key, &rec.device_name);
        let status = rec.state.status;
        TaskCounted {
            job,
            from: None,
            to: status,
        }
        .emit(&inner.metrics);
        if let Some(f) = rec.state.failure {
            job.failures[f as usize].fetch_add(1, Ordering::Relaxed);
        }
        job.retries
            .fetch_add(u64::from(rec.state.retries_used), Ordering::Relaxed);
        job.pushes
            .fetch_add(u64::from(rec.state.pushes), Ordering::Relaxed);
        // Exactly the pushes that took a slot of the job's rate: a task takes one in its life,
        // with its first push or pull (QUEUED → NOTIFIED, which no task goes through twice);
        // the re-pushes of retries and reconnects never take one.
        if let Some(t) = rec.state.notified_at_ms {
            push_times.entry(rec.job_id.clone()).or_default().push(t);
        }
        job.add_member(&rec.device_name);
        inner
            .device_jobs
            .entry((rec.product_key.clone(), rec.device_name.clone()))
            .or_default()
            .push(rec.job_id.clone());
        if !status.is_terminal() {
            inner.active.insert(
                (
                    rec.product_key.clone(),
                    rec.device_name.clone(),
                    job.policy.module.clone(),
                ),
                rec.job_id.clone(),
            );
        }
        let mut slot = TaskSlot::new(rec.state, rec.history, rec.history_dropped);
        if slot.state.is_ready() {
            lock(&job.push).ready.push_back(rec.device_name.clone());
        }
        if let Some(d) = next_deadline(&slot.state, &job.policy) {
            slot.armed = Some(d);
            lock(&inner.deadlines).insert((d, Due::Task(key.clone())));
        }
        inner.tasks.insert(key, slot);
    }

    /// A loaded job's push bucket (refilled from its tasks' push times) and its timers.
    fn rearm_job(&self, job: &Arc<JobEntry>, now: i64, times: Vec<i64>) {
        let j = job.job();
        if let Some(plan) = &job.rate {
            let started = j.started_at_ms.unwrap_or(now);
            let succeeded = job.counters()[TaskStatus::Succeeded.index()];
            let level = plan.level(started, now, succeeded);
            let per_minute = plan.per_minute(level);
            let burst = plan.burst(per_minute);
            // Nothing was pushed while no engine ran: the minute's missed pushes are owed.
            let owed = (j.status == JobStatus::InProgress)
                .then(|| catch_up(&times, per_minute, burst, j.updated_at_ms, now))
                .flatten();
            let mut limiter = PushLimiter::new(per_minute, burst, times);
            if let Some((pushes, until)) = owed {
                tracing::info!(
                    job = %job.job_id,
                    pushes,
                    "push rate: the pushes the job's minute missed while no engine ran are made up"
                );
                limiter = limiter.with_catch_up(pushes, until);
            }
            let mut q = lock(&job.push);
            q.level = level;
            q.limiter = Some(limiter);
        }
        if j.status == JobStatus::Planned {
            if let Some(at) = j.spec.start_at_ms {
                self.arm(at, Due::JobStart(job.job_id.clone()));
            }
        }
        if !j.status.is_finished() || j.spec.selection == Selection::Dynamic {
            if let Some(at) = j.spec.finish_by_ms {
                if !j.status.is_finished() {
                    self.arm(at, Due::JobFinish(job.job_id.clone()));
                }
            }
        }
        if !lock(&job.push).ready.is_empty() {
            self.arm_push(job, now);
        }
    }
}
