//! Job lifecycle after creation: start at the schedule, finish-by, cancel (STATIC vs
//! DYNAMIC), confirm, pause/resume, the abort rule, completion and the VERIFY_FIRMWARE outcome.

use super::{job_doc, lock, JobEntry, OtaEngine, TaskKey};
use crate::ota::firmware::FirmwareStatus;
use crate::ota::model::{AbortAction, Job, JobStatus, JobType, JobView, Selection, TaskCounters};
use crate::ota::task::{Event, FailureReason, QueueReason, TaskStatus};
use crate::ota::OtaError;
use std::collections::HashSet;
use std::sync::Arc;

impl OtaEngine {
    /// Persists a job change made by `change`; returns the job after it.
    async fn update_job(
        &self,
        entry: &JobEntry,
        change: impl FnOnce(&mut Job) -> Result<(), OtaError>,
    ) -> Result<Job, OtaError> {
        let now = self.now();
        let (job, ticket) = {
            let mut job = lock(&entry.job);
            let before = job.clone();
            if let Err(e) = change(&mut job) {
                *job = before;
                return Err(e);
            }
            job.updated_at_ms = now;
            let ticket = self.inner.store.submit(vec![job_doc(&job)]);
            (job.clone(), ticket)
        };
        ticket.await?;
        Ok(job)
    }

    /// The schedule's start: PLANNED → IN_PROGRESS, SCHEDULED tasks join the push queue.
    pub(crate) async fn start_job(&self, entry: &Arc<JobEntry>, now: i64) {
        let started = self
            .update_job(entry, |job| {
                if job.status != JobStatus::Planned {
                    return Err(OtaError::Conflict("not planned".into()));
                }
                job.status = JobStatus::InProgress;
                job.started_at_ms = Some(now);
                Ok(())
            })
            .await;
        if started.is_err() {
            return;
        }
        tracing::info!(job = %entry.job_id, "OTA job started");
        for dn in entry.members() {
            let key = TaskKey::new(&entry.job_id, &entry.product_key, &dn);
            let reason = if self.inner.pusher.is_connected(&entry.product_key, &dn) {
                QueueReason::RateLimited
            } else {
                QueueReason::Offline
            };
            if self.apply(&key, Event::Queue(reason), now).await && reason == QueueReason::Offline {
                self.recheck_offline(&key).await;
            }
        }
        self.arm_push(entry, now);
    }

    /// finish_by reached: tasks not started yet are canceled, a DYNAMIC policy ends.
    pub(crate) async fn finish_by_reached(&self, entry: &Arc<JobEntry>, now: i64) {
        let res = self
            .update_job(entry, |job| {
                if job.status.is_finished() && !job.dynamic_active {
                    return Err(OtaError::Conflict("finished".into()));
                }
                job.dynamic_active = false;
                if job.status == JobStatus::Planned {
                    job.status = JobStatus::InProgress;
                    job.started_at_ms = Some(now);
                }
                job.status_reason = Some("finish_by reached".into());
                Ok(())
            })
            .await;
        if res.is_err() {
            return;
        }
        for dn in entry.members() {
            let key = TaskKey::new(&entry.job_id, &entry.product_key, &dn);
            self.apply(&key, Event::Cancel { force: false }, now).await;
        }
        self.check_job_done(entry, now).await;
    }

    /// Cancels a job. STATIC: every unfinished task is canceled (IN_PROGRESS too). DYNAMIC: the
    /// policy stops (no device joins any more); unfinished tasks are canceled only with
    /// `cancel_in_progress`, otherwise they run to their end.
    pub async fn cancel_job(
        &self,
        job_id: &str,
        cancel_in_progress: bool,
    ) -> Result<JobView, OtaError> {
        let entry = self
            .job_entry(job_id)
            .ok_or_else(|| OtaError::JobNotFound(job_id.to_owned()))?;
        let now = self.now();
        let job = self
            .update_job(&entry, |job| {
                if job.status.is_finished() {
                    return Err(OtaError::Conflict(format!(
                        "job {} is already {}",
                        job.job_id,
                        job.status.as_str()
                    )));
                }
                job.status = JobStatus::Canceled;
                job.dynamic_active = false;
                job.finished_at_ms = Some(now);
                job.status_reason = Some("canceled by an operator".into());
                Ok(())
            })
            .await?;
        let cancel_tasks = job.spec.selection == Selection::Static || cancel_in_progress;
        if cancel_tasks {
            for dn in entry.members() {
                let key = TaskKey::new(&entry.job_id, &entry.product_key, &dn);
                self.apply(&key, Event::Cancel { force: true }, now).await;
            }
        }
        self.verify_outcome(&job, None).await;
        tracing::info!(job = %job_id, cancel_tasks, "OTA job canceled");
        Ok(self.view(&entry, now))
    }

    /// Cancels the tasks of some devices of a job (not the job). IN_PROGRESS ones only with
    /// `cancel_in_progress`. Returns how many were canceled.
    pub async fn cancel_tasks(
        &self,
        job_id: &str,
        device_names: &[String],
        cancel_in_progress: bool,
    ) -> Result<usize, OtaError> {
        let entry = self
            .job_entry(job_id)
            .ok_or_else(|| OtaError::JobNotFound(job_id.to_owned()))?;
        let now = self.now();
        let mut n = 0;
        for (i, dn) in device_names.iter().enumerate() {
            if !entry.has_member(dn) {
                return Err(OtaError::invalid(
                    format!("device_names[{i}]"),
                    format!("{dn:?} has no task in job {job_id}"),
                ));
            }
        }
        for dn in device_names {
            let key = TaskKey::new(job_id, &entry.product_key, dn);
            if self
                .apply(
                    &key,
                    Event::Cancel {
                        force: cancel_in_progress,
                    },
                    now,
                )
                .await
            {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Confirms CONFIRM tasks (the listed devices, or all). Returns how many were confirmed.
    pub async fn confirm(
        &self,
        job_id: &str,
        device_names: Option<&[String]>,
    ) -> Result<usize, OtaError> {
        let entry = self
            .job_entry(job_id)
            .ok_or_else(|| OtaError::JobNotFound(job_id.to_owned()))?;
        let status = entry.status();
        if status.is_finished() {
            return Err(OtaError::Conflict(format!(
                "job {job_id} is {}",
                status.as_str()
            )));
        }
        let names = match device_names {
            Some(list) => {
                for (i, dn) in list.iter().enumerate() {
                    if !entry.has_member(dn) {
                        return Err(OtaError::invalid(
                            format!("device_names[{i}]"),
                            format!("{dn:?} has no task in job {job_id}"),
                        ));
                    }
                }
                list.to_vec()
            }
            None => entry.members(),
        };
        let now = self.now();
        let mut n = 0;
        for dn in names {
            let key = TaskKey::new(job_id, &entry.product_key, &dn);
            let queue = if status == JobStatus::Planned {
                QueueReason::Scheduled
            } else if self.inner.pusher.is_connected(&entry.product_key, &dn) {
                QueueReason::RateLimited
            } else {
                QueueReason::Offline
            };
            if self.apply(&key, Event::Confirm { queue }, now).await {
                n += 1;
                if queue == QueueReason::Offline {
                    self.recheck_offline(&key).await;
                }
            }
        }
        Ok(n)
    }

    /// Holds (`pause = true`) or releases the job's pushes.
    pub async fn set_paused(&self, job_id: &str, pause: bool) -> Result<JobView, OtaError> {
        let entry = self
            .job_entry(job_id)
            .ok_or_else(|| OtaError::JobNotFound(job_id.to_owned()))?;
        let now = self.now();
        self.update_job(&entry, |job| {
            match (pause, job.status) {
                (true, JobStatus::InProgress) => {
                    job.status = JobStatus::Paused;
                    job.status_reason = Some("paused by an operator".into());
                }
                (false, JobStatus::Paused) => {
                    job.status = JobStatus::InProgress;
                    job.status_reason = None;
                }
                (_, s) => {
                    return Err(OtaError::Conflict(format!(
                        "job {} is {}",
                        job.job_id,
                        s.as_str()
                    )))
                }
            }
            Ok(())
        })
        .await?;
        if !pause {
            self.arm_push(&entry, now);
        }
        Ok(self.view(&entry, now))
    }

    /// The abort rule: cancel or pause the job once enough tasks failed.
    pub(crate) async fn check_abort(&self, entry: &Arc<JobEntry>, now: i64) {
        let Some(rule) = entry.abort.clone() else {
            return;
        };
        if !matches!(entry.status(), JobStatus::InProgress) {
            return;
        }
        let c = entry.counters();
        let finished = c[TaskStatus::Succeeded.index()]
            + c[TaskStatus::Failed.index()]
            + c[TaskStatus::Canceled.index()];
        if finished < u64::from(rule.min_finished) {
            return;
        }
        let failures = entry.failures();
        let failed: u64 = FailureReason::ALL
            .into_iter()
            .filter(|r| {
                if rule.failure_reasons.is_empty() {
                    r.device_caused()
                } else {
                    rule.failure_reasons.contains(r)
                }
            })
            .map(|r| failures[r as usize])
            .sum();
        let percent = failed as f64 * 100.0 / finished as f64;
        if percent < rule.failure_percent {
            return;
        }
        let reason = format!(
            "abort rule: {failed} of {finished} finished tasks failed ({percent:.1}% ≥ {}%)",
            rule.failure_percent
        );
        let res = self
            .update_job(entry, |job| {
                if job.status != JobStatus::InProgress {
                    return Err(OtaError::Conflict("not running".into()));
                }
                match rule.action {
                    AbortAction::Cancel => {
                        job.status = JobStatus::Canceled;
                        job.finished_at_ms = Some(now);
                        job.dynamic_active = false;
                    }
                    AbortAction::Pause => job.status = JobStatus::Paused,
                }
                job.status_reason = Some(reason.clone());
                Ok(())
            })
            .await;
        let Ok(job) = res else { return };
        tracing::warn!(job = %entry.job_id, %reason, action = ?rule.action, "OTA abort rule fired");
        if rule.action == AbortAction::Cancel {
            for dn in entry.members() {
                let key = TaskKey::new(&entry.job_id, &entry.product_key, &dn);
                self.apply_boxed(&key, Event::Abort, now).await;
            }
            self.verify_outcome(&job, None).await;
        }
    }

    /// Completes a job whose tasks are all finished (STATIC, or DYNAMIC whose policy ended).
    pub(crate) async fn check_job_done(&self, entry: &Arc<JobEntry>, now: i64) {
        if entry.unfinished() > 0 {
            return;
        }
        {
            let job = lock(&entry.job);
            if job.status.is_finished() || job.status == JobStatus::Planned || job.dynamic_active {
                return;
            }
        }
        let done = self
            .update_job(entry, |job| {
                if job.status.is_finished() || job.dynamic_active {
                    return Err(OtaError::Conflict("not done".into()));
                }
                job.status = JobStatus::Completed;
                job.finished_at_ms = Some(now);
                Ok(())
            })
            .await;
        if let Ok(job) = done {
            tracing::info!(job = %job.job_id, "OTA job completed");
            let c = TaskCounters::from_array(entry.counters());
            self.verify_outcome(&job, Some(c)).await;
        }
    }

    /// A VERIFY_FIRMWARE job's verdict: all tasks succeeded → VERIFIED, otherwise
    /// VERIFY_FAILED; canceled → back to UNVERIFIED.
    async fn verify_outcome(&self, job: &Job, counters: Option<TaskCounters>) {
        if job.spec.job_type != JobType::VerifyFirmware {
            return;
        }
        let status = match &counters {
            Some(c) if c.total > 0 && c.succeeded == c.total => FirmwareStatus::Verified,
            Some(_) => FirmwareStatus::VerifyFailed,
            None => FirmwareStatus::Unverified,
        };
        let current = self.firmware().get(&job.spec.firmware_id).map(|p| p.status);
        // Never undo a verdict another job reached.
        if counters.is_none() && current != Some(FirmwareStatus::Verifying) {
            return;
        }
        match self
            .firmware()
            .set_status(&job.spec.firmware_id, status)
            .await
        {
            Ok(_) => {
                tracing::info!(firmware = %job.spec.firmware_id, ?status, "firmware verification finished")
            }
            Err(e) => tracing::warn!(error = %e, "firmware status not updated"),
        }
    }

    /// Device names of a job whose tasks are in `statuses` (for tests and tools).
    pub fn task_devices(&self, job_id: &str, statuses: &[TaskStatus]) -> Vec<String> {
        let Some(entry) = self.job_entry(job_id) else {
            return Vec::new();
        };
        let set: HashSet<TaskStatus> = statuses.iter().copied().collect();
        entry
            .members()
            .into_iter()
            .filter(|dn| {
                self.inner
                    .tasks
                    .get(&TaskKey::new(job_id, &entry.product_key, dn))
                    .is_some_and(|s| set.contains(&s.state.status))
            })
            .collect()
    }
}
