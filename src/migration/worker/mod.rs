//! The engine's actor ([`Worker`]): the only writer of migration state. It handles the
//! API's requests between batches, moves devices in governed batches, finishes running states,
//! retries or halts after store faults, expires data sync and sweeps `COMPLETED` tasks — all
//! from one loop (`Worker::run`), so no two changes ever race.
//!
//! Work per running state ([`Work`]): the canary and picked-rollback devices are queues of
//! names persisted as `pending` markers on their device docs; full migration and "rollback all"
//! walk the product's device names with a cursor and move every device still owned by the
//! wrong instance. A walk that moved something is followed by another walk (devices created
//! meanwhile); the state finishes after a walk that found nothing.
//!
//! # Layout
//!
//! - this file: the actor's state ([`Worker`], per-task `Runtime`), its loop, and the one
//!   way a task changes (`Worker::save`: document, log line, then memory).
//! - `commands/`: one file per lifecycle request, plus the engine's own commands.
//! - `batch`: choosing and moving the next batch of devices, finishing a running state.
//! - `fault`: store faults while moving devices (retry with backoff, or halt).
//! - `sweep`: the tick that sweeps `COMPLETED` tasks, retries coming due.
//! - `routes`: data-sync routes and their expiry.
//! - `internal_events`: what the actor counts and logs, one named event each.

mod batch;
mod commands;
mod fault;
mod internal_events;
mod routes;
mod sweep;

use super::command::{Command, Outcome};
use super::config::{EngineConfig, Hooks};
use super::docs::{device_doc_id, doc_op, log_doc_id, DEVICE_DOC, LOG_DOC, TASK_DOC};
use super::model::*;
use super::shared::{details, Shared};
use super::MigrationError;
use crate::metrics::Metrics;
use crate::store::{Op, StoreError};
use batch::{Cursor, Next};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use sweep::TICK;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Per-task state of the actor that is not persisted (rebuilt from the docs at start).
#[derive(Default)]
struct Runtime {
    queue: VecDeque<String>,
    cursor: Cursor,
    retry_at: Option<Instant>,
    backoff: Option<Duration>,
    /// Sweeping a COMPLETED task for devices created in the source since.
    sweeping: bool,
    swept: u64,
}

pub(super) struct Worker {
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    config: EngineConfig,
    hooks: Hooks,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    runtime: HashMap<String, Runtime>,
    /// Round-robin position over tasks.
    rr: usize,
    next_tick: Instant,
}

fn limiter_for(per_sec: u32) -> Option<Arc<DefaultDirectRateLimiter>> {
    NonZeroU32::new(per_sec).map(|n| Arc::new(RateLimiter::direct(Quota::per_second(n))))
}

impl Worker {
    pub(super) fn new(
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
        config: EngineConfig,
        hooks: Hooks,
    ) -> Self {
        Worker {
            shared,
            metrics,
            limiter: limiter_for(config.devices_per_sec),
            config,
            hooks,
            runtime: HashMap::new(),
            rr: 0,
            next_tick: Instant::now() + TICK,
        }
    }

    fn now(&self) -> i64 {
        self.shared.clock.now_ms()
    }

    /// Queues from persisted `pending` markers, data-sync routes, the running gauge.
    pub(super) fn rebuild_after_load(&mut self) {
        let state = self.shared.read();
        for (tid, entry) in &state.tasks {
            let rt = self.runtime.entry(tid.clone()).or_default();
            let mut pending: Vec<&String> = entry
                .devices
                .iter()
                .filter(|(_, d)| d.pending.is_some())
                .map(|(dn, _)| dn)
                .collect();
            pending.sort();
            rt.queue = pending.into_iter().cloned().collect();
            if entry.doc.state == TaskState::Completed {
                rt.sweeping = true;
            }
        }
        let docs: Vec<TaskDoc> = state.tasks.values().map(|t| t.doc.clone()).collect();
        drop(state);
        for doc in &docs {
            self.apply_route(doc);
        }
        self.update_gauge();
    }

    fn update_gauge(&self) {
        let running = self
            .shared
            .read()
            .tasks
            .values()
            .filter(|t| t.doc.state.is_running())
            .count();
        self.metrics.migration_running_tasks.set(running as i64);
    }

    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            if *stop.borrow() {
                break;
            }
            let next = self.next_job();
            let job = match next {
                Next::Finish(tid) => {
                    self.finish(&tid).await;
                    continue;
                }
                Next::SweepDone(tid) => {
                    self.sweep_done(&tid).await;
                    continue;
                }
                Next::Batch(job) => Some(job),
                Next::Idle => None,
            };
            let n = job.as_ref().map_or(1, |j| j.names.len().max(1));
            let limiter = self.limiter.clone();
            let permit = async move {
                if let (Some(l), Some(n)) = (limiter, NonZeroU32::new(n as u32)) {
                    // n never exceeds the burst (batches are cut to the rate), so this cannot
                    // fail; if it did, going ahead unthrottled is the lesser evil.
                    let _ = l.until_n_ready(n).await;
                }
            };
            let deadline = self.next_deadline();
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => self.on_deadline().await,
                _ = permit, if job.is_some() => {
                    if let Some(job) = job {
                        self.run_batch(job).await;
                    }
                }
            }
        }
        tracing::debug!("migration actor stopped");
    }

    /// Persists `doc` (plus `extra` ops and a log line) and then applies it in memory.
    async fn save(
        &mut self,
        mut doc: TaskDoc,
        actor: Actor,
        action: &str,
        from_state: Option<TaskState>,
        detail: String,
        extra: Vec<Op>,
    ) -> Result<(), StoreError> {
        let now = self.now();
        doc.updated_at_ms = now;
        let seq = self
            .shared
            .read()
            .tasks
            .get(&doc.task_id)
            .map_or(1, |t| t.log.last().map_or(1, |l| l.seq + 1));
        let entry = LogEntry {
            seq,
            at_ms: now,
            actor,
            action: action.to_owned(),
            from_state,
            to_state: from_state.map(|_| doc.state),
            detail,
        };
        let mut ops = extra;
        ops.push(doc_op(TASK_DOC, doc.task_id.clone(), &doc));
        ops.push(doc_op(LOG_DOC, log_doc_id(&doc.task_id, seq), &entry));
        self.shared.store.submit(ops).await?;
        tracing::info!(task_id = %doc.task_id, action, state = %doc.state, "migration task");
        {
            let mut state = self.shared.write();
            state.put_task(doc.clone()).log.push(entry);
        }
        self.apply_route(&doc);
        self.update_gauge();
        Ok(())
    }

    /// Devices that no longer exist leave the task: out of its queue, their records deleted
    /// (so they count nowhere and a device re-created under the same name starts
    /// NOT_MIGRATED), one log line. Not a failure: an operator deleted them.
    async fn forget_devices(&mut self, task_id: &str, names: &[String], how: &str) {
        if let Some(rt) = self.runtime.get_mut(task_id) {
            rt.queue.retain(|dn| !names.contains(dn));
        }
        let known: Vec<(String, DeviceStatus)> = {
            let state = self.shared.read();
            let Some(t) = state.tasks.get(task_id) else {
                return;
            };
            names
                .iter()
                .filter_map(|dn| t.devices.get(dn).map(|d| (dn.clone(), d.status)))
                .collect()
        };
        if known.is_empty() {
            // NOT_MIGRATED devices have no record: nothing to forget.
            return;
        }
        let Ok(doc) = self.doc(task_id) else {
            return;
        };
        let ops = known
            .iter()
            .map(|(dn, _)| Op::DeleteDoc {
                kind: DEVICE_DOC,
                id: device_doc_id(task_id, dn),
            })
            .collect();
        let listed: Vec<String> = known
            .iter()
            .take(10)
            .map(|(dn, st)| format!("{dn} ({})", st.as_str()))
            .collect();
        let more = known.len().saturating_sub(listed.len());
        let detail = format!(
            "device {how}, it leaves the task: {}{}",
            listed.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
        match self
            .save(doc, Actor::system(), "device_deleted", None, detail, ops)
            .await
        {
            Ok(()) => {
                let mut state = self.shared.write();
                if let Some(t) = state.tasks.get_mut(task_id) {
                    for (dn, _) in &known {
                        t.devices.remove(dn);
                    }
                }
            }
            // The records stay for now (never counted: the device is gone); the next start
            // drops them.
            Err(e) => {
                tracing::warn!(task_id, error = %e, "cannot drop records of deleted devices")
            }
        }
    }

    fn doc(&self, task_id: &str) -> Result<TaskDoc, MigrationError> {
        self.shared
            .read()
            .tasks
            .get(task_id)
            .map(|t| t.doc.clone())
            .ok_or_else(|| MigrationError::TaskNotFound(task_id.to_owned()))
    }

    fn outcome(
        &self,
        task_id: &str,
        accepted: usize,
        rejected: Vec<RejectedRow>,
    ) -> Option<Outcome> {
        let state = self.shared.read();
        state.tasks.get(task_id).map(|t| Outcome {
            details: details(&self.shared, t),
            rejected,
            accepted,
        })
    }
}
