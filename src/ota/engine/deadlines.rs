//! The one deadline task: a `BTreeSet<(ms, Due)>` + `Notify` holding task deadlines (retry,
//! re-push, timeout, stall), job pushes (next rate slot, ramp step), job starts and finish-bys.
//! Entries may be stale; firing one re-runs the pure machine, which ignores what is not due,
//! and re-arms the real next deadline. The coalesced progress writes ride on the same loop.

use super::{lock, task_doc, JobEntry, OtaEngine, TaskKey};
use crate::ota::task::{next_deadline, Event};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// What the deadline task waits for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Due {
    Task(TaskKey),
    JobPush(String),
    JobStart(String),
    JobFinish(String),
}

impl OtaEngine {
    /// Runs the deadline task (and the progress flusher) on the current tokio runtime. With a
    /// manual clock nothing is spawned: the test drives [`OtaEngine::run_due`].
    pub fn start(&self) -> Option<tokio::task::JoinHandle<()>> {
        let engine = self.clone();
        // Jobs whose last task finished just before a crash are completed now.
        let now = self.inner.clock.now_ms();
        let ids: Vec<String> = self.inner.jobs.iter().map(|e| e.key().clone()).collect();
        let completer = self.clone();
        tokio::spawn(async move {
            // Devices deleted just before a crash: their tasks end now (which may complete
            // their jobs, checked next).
            completer.cancel_tasks_of_deleted_devices().await;
            for id in ids {
                if let Some(job) = completer.job_entry(&id) {
                    completer.check_job_done(&job, now).await;
                }
            }
        });
        if self.inner.clock.is_manual() {
            return None;
        }
        let term = self.inner.term.load(Ordering::SeqCst);
        Some(tokio::spawn(async move { engine.run(term).await }))
    }

    /// Stops the deadline task and writes every pending progress update.
    pub async fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.stop.notify_waiters();
        self.inner.wake.notify_one();
        self.flush_dirty().await;
        if let Err(e) = self.inner.store.flush().await {
            tracing::warn!(error = %e, "OTA flush failed");
        }
    }

    /// The deadline loop of term `term` (cluster mode: one per activation; it ends with it).
    pub(super) async fn run(&self, term: u64) {
        let flush_every = self.inner.config.progress_flush_ms.max(10);
        loop {
            if self.inner.stopping.load(Ordering::SeqCst) || self.inner.term_over(term) {
                return;
            }
            self.run_due().await;
            let now = self.inner.clock.now_ms();
            let next = lock(&self.inner.deadlines).first().map(|(t, _)| *t);
            // Wake at the next deadline, at the next progress flush, or when poked.
            let wait_ms = next
                .map(|t| (t - now).clamp(0, flush_every))
                .unwrap_or(flush_every);
            if wait_ms == 0 {
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                _ = self.inner.wake.notified() => {}
                _ = self.inner.stop.notified() => return,
                _ = tokio::time::sleep(Duration::from_millis(wait_ms as u64)) => {}
            }
        }
    }

    /// Processes every deadline due now (and the coalesced progress writes when their
    /// interval passed). Returns how many deadlines fired. The deadline task calls it; tests
    /// with a manual clock call it after moving the clock.
    pub async fn run_due(&self) -> usize {
        let now = self.inner.clock.now_ms();
        let mut fired = 0;
        loop {
            let due: Vec<Due> = {
                let mut set = lock(&self.inner.deadlines);
                let mut out = Vec::new();
                while let Some(first) = set.first() {
                    if first.0 > now || out.len() >= 4096 {
                        break;
                    }
                    if let Some((_, d)) = set.pop_first() {
                        out.push(d);
                    }
                }
                out
            };
            if due.is_empty() {
                break;
            }
            fired += due.len();
            for d in due {
                self.fire(d, now).await;
            }
        }
        let last = self.inner.last_flush.load(Ordering::Relaxed);
        if now - last >= self.inner.config.progress_flush_ms || self.inner.clock.is_manual() {
            self.inner.last_flush.store(now, Ordering::Relaxed);
            self.flush_dirty().await;
        }
        fired
    }

    pub(super) async fn fire(&self, due: Due, now: i64) {
        match due {
            Due::Task(key) => {
                let Some(job) = self.job_entry(&key.job_id) else {
                    return;
                };
                if let Some(mut slot) = self.inner.tasks.get_mut(&key) {
                    slot.armed = None;
                }
                self.apply(&key, Event::Deadline, now).await;
                let repush = self
                    .inner
                    .tasks
                    .get(&key)
                    .is_some_and(|s| s.state.repush_due(now));
                if repush {
                    self.repush(&job, &key, now).await;
                }
                self.rearm(&key, &job);
            }
            Due::JobPush(job_id) => {
                if let Some(job) = self.job_entry(&job_id) {
                    lock(&job.push).armed = None;
                    self.push_pass(&job, now).await;
                }
            }
            Due::JobStart(job_id) => {
                if let Some(job) = self.job_entry(&job_id) {
                    self.start_job(&job, now).await;
                }
            }
            Due::JobFinish(job_id) => {
                if let Some(job) = self.job_entry(&job_id) {
                    self.finish_by_reached(&job, now).await;
                }
            }
        }
    }

    pub(super) fn arm(&self, at: i64, due: Due) {
        let earliest = {
            let mut set = lock(&self.inner.deadlines);
            set.insert((at, due));
            set.first().map(|(t, _)| *t)
        };
        if earliest == Some(at) {
            self.inner.wake.notify_one();
        }
    }

    /// Arms the task's real next deadline unless an earlier entry is already armed.
    pub(super) fn rearm(&self, key: &TaskKey, job: &JobEntry) {
        let at = {
            let Some(mut slot) = self.inner.tasks.get_mut(key) else {
                return;
            };
            let Some(next) = next_deadline(&slot.state, &job.policy) else {
                return;
            };
            if slot.armed.is_some_and(|a| a <= next) {
                return;
            }
            slot.armed = Some(next);
            next
        };
        self.arm(at, Due::Task(key.clone()));
    }

    /// Writes every coalesced progress update now.
    pub async fn flush_dirty(&self) {
        let keys: Vec<TaskKey> = {
            let mut rx = self.inner.dirty_rx.lock().await;
            let mut keys = Vec::new();
            while let Ok(k) = rx.try_recv() {
                keys.push(k);
            }
            keys
        };
        if keys.is_empty() {
            return;
        }
        let mut ops = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(mut slot) = self.inner.tasks.get_mut(&key) {
                if slot.dirty {
                    slot.dirty = false;
                    ops.push(task_doc(&key, &slot));
                }
            }
        }
        if !ops.is_empty() {
            // One submission: the writer commits it in one transaction.
            if let Err(e) = self.inner.store.submit(ops).await {
                tracing::warn!(error = %e, "progress updates not stored");
            }
        }
    }
}
