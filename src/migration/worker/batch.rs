//! Device moves: choosing the next batch (round-robin over tasks with work; a queue for the
//! canary and a picked rollback, a walk over the product's device names with a cursor for full
//! migration and "rollback all"), moving it through the registry, and finishing the running
//! state once its work is done.

use super::internal_events::{BatchMoved, MoveResult};
use super::Worker;
use crate::migration::docs::{device_doc_id, doc_op, DEVICE_DOC};
use crate::migration::machine::{transition, Event};
use crate::migration::model::*;
use crate::registry::{Device, RegistryError};
use std::collections::HashSet;
use tokio::time::Instant;

/// Device names read from the registry per walk step.
const SCAN_CHUNK: usize = 1024;

/// A batch of device moves chosen by `Worker::next_job`.
pub(super) struct Job {
    task_id: String,
    product_key: String,
    /// Where the devices go.
    to_instance: String,
    /// Status the moved devices get.
    status: DeviceStatus,
    pub(super) names: Vec<String>,
    /// Cursor after this batch (walks only).
    cursor: Option<Cursor>,
    /// Taken from the queue (queues only).
    from_queue: bool,
}

/// Position of a walk over the product's device names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Cursor {
    after: Option<String>,
    /// This walk moved something (so another walk follows).
    moved: bool,
}

pub(super) enum Next {
    Batch(Job),
    Finish(String),
    /// A sweep of a COMPLETED task found nothing more.
    SweepDone(String),
    Idle,
}

/// What became of each device of a batch.
#[derive(Debug, Default, PartialEq, Eq)]
struct Moves {
    moved: Vec<String>,
    /// Deleted before their turn.
    gone: Vec<String>,
    /// Refused by the store, with the reason.
    failed: Vec<(String, String)>,
    /// Moved devices that were connected: they are told to reconnect.
    kicks: Vec<String>,
    /// The first store error: the task retries or halts.
    fault: Option<String>,
}

impl Moves {
    /// Sorts the registry's per-device results (in `names` order).
    fn sort(names: &[String], results: Vec<Result<Device, RegistryError>>) -> Moves {
        let mut m = Moves {
            moved: Vec::with_capacity(results.len()),
            ..Moves::default()
        };
        for (dn, r) in names.iter().zip(results) {
            match r {
                Ok(device) => {
                    if device.online {
                        m.kicks.push(dn.clone());
                    }
                    m.moved.push(dn.clone());
                }
                Err(RegistryError::NotFound { .. }) => m.gone.push(dn.clone()),
                Err(e) => {
                    m.fault.get_or_insert_with(|| e.to_string());
                    m.failed.push((dn.clone(), e.to_string()));
                }
            }
        }
        m
    }
}

impl Worker {
    /// The next batch, round-robin over tasks with work; `Finish` when a running task's work
    /// is done.
    pub(super) fn next_job(&mut self) -> Next {
        let now_i = Instant::now();
        let batch_max = match self.config.devices_per_sec {
            0 => self.config.batch_size,
            rate => self.config.batch_size.min(rate as usize),
        }
        .max(1);
        let candidates: Vec<TaskDoc> = {
            let state = self.shared.read();
            state
                .tasks
                .values()
                .filter(|t| !t.doc.halted)
                .filter(|t| {
                    t.doc.state.is_running()
                        || (t.doc.state == TaskState::Completed
                            && self.runtime.get(&t.doc.task_id).is_some_and(|r| r.sweeping))
                })
                .map(|t| t.doc.clone())
                .collect()
        };
        if candidates.is_empty() {
            return Next::Idle;
        }
        let len = candidates.len();
        for i in 0..len {
            let doc = &candidates[(self.rr + i) % len];
            let rt = self.runtime.entry(doc.task_id.clone()).or_default();
            if rt.retry_at.is_some_and(|at| at > now_i) {
                continue;
            }
            self.rr = (self.rr + i + 1) % len;
            return self.job_for(doc, batch_max);
        }
        Next::Idle
    }

    fn job_for(&mut self, doc: &TaskDoc, batch_max: usize) -> Next {
        let registry = self.shared.registry.clone();
        let rt = self.runtime.entry(doc.task_id.clone()).or_default();
        let pk = &doc.product_key;
        let (to_instance, from_instance, status) = match doc.state.work() {
            Some(Work::Rollback) => (
                &doc.source_instance_id,
                &doc.target_instance_id,
                DeviceStatus::RolledBack,
            ),
            _ => (
                &doc.target_instance_id,
                &doc.source_instance_id,
                DeviceStatus::Migrated,
            ),
        };
        let job = |names, cursor, from_queue| Job {
            task_id: doc.task_id.clone(),
            product_key: pk.clone(),
            to_instance: to_instance.clone(),
            status,
            names,
            cursor,
            from_queue,
        };
        let queued = matches!(doc.state.work(), Some(Work::Canary))
            || (doc.state.work() == Some(Work::Rollback) && !doc.rollback_all);
        if queued {
            if rt.queue.is_empty() {
                return Next::Finish(doc.task_id.clone());
            }
            let names: Vec<String> = rt.queue.iter().take(batch_max).cloned().collect();
            return Next::Batch(job(names, None, true));
        }
        // A walk: every device still owned by `from_instance`.
        let mut cursor = rt.cursor.clone();
        let mut names = Vec::new();
        loop {
            // A product that is gone has nothing left to move.
            let chunk = registry
                .device_names_after(pk, cursor.after.as_deref(), SCAN_CHUNK)
                .unwrap_or_default();
            if chunk.is_empty() {
                if !names.is_empty() {
                    break;
                }
                if cursor.moved {
                    // Walk again: devices created meanwhile behind the cursor.
                    cursor = Cursor::default();
                    rt.cursor = cursor.clone();
                    continue;
                }
                rt.cursor = Cursor::default();
                return if doc.state == TaskState::Completed {
                    Next::SweepDone(doc.task_id.clone())
                } else {
                    Next::Finish(doc.task_id.clone())
                };
            }
            for dn in chunk {
                if names.len() == batch_max {
                    break;
                }
                if registry.device_instance(pk, &dn).as_deref() == Some(from_instance.as_str()) {
                    names.push(dn.clone());
                }
                cursor.after = Some(dn);
            }
            if names.len() == batch_max {
                break;
            }
        }
        cursor.moved = true;
        Next::Batch(job(names, Some(cursor), false))
    }

    /// Moves one batch: ownership and per-device status in one registry submission, then
    /// memory, counters, kicks and the task's place in its queue or walk.
    pub(super) async fn run_batch(&mut self, job: Job) {
        let now = self.now();
        let done = DeviceDoc {
            status: job.status,
            reason: None,
            pending: None,
            updated_at_ms: now,
        };
        let tid = job.task_id.clone();
        // The moves go through the registry's store: in a cluster each carries this term's
        // fence, so a node that lost the engines' lease cannot move a device any more.
        let fence = match self.shared.store.fence_op() {
            Ok(fence) => fence,
            Err(e) => {
                self.fault(&job.task_id, e.to_string()).await;
                return;
            }
        };
        let result = self
            .shared
            .registry
            .set_devices_instance(&job.product_key, &job.names, &job.to_instance, |dn| {
                let mut ops = vec![doc_op(DEVICE_DOC, device_doc_id(&tid, dn), &done)];
                ops.extend(fence.clone());
                ops
            })
            .await;
        let results = match result {
            Ok(r) => r,
            Err(RegistryError::NotFound {
                kind: "product", ..
            }) => job
                .names
                .iter()
                .map(|dn| {
                    Err(RegistryError::NotFound {
                        kind: "device",
                        id: format!("{}/{dn}", job.product_key),
                    })
                })
                .collect(),
            Err(e) => {
                self.fault(&job.task_id, e.to_string()).await;
                return;
            }
        };
        let moves = Moves::sort(&job.names, results);
        self.record_moves(&tid, &moves, &done, now);
        // Devices deleted before their turn (the registry's notice may still be on its way)
        // leave the task; not a failure.
        if !moves.gone.is_empty() {
            self.forget_devices(&tid, &moves.gone, "no longer exists")
                .await;
        }
        for dn in &moves.kicks {
            (self.hooks.kick)(&job.product_key, dn);
        }
        BatchMoved {
            task_id: &tid,
            result: MoveResult::moved_to(job.status),
            moved: moves.moved.len(),
            failed: moves.failed.len(),
            kicked: moves.kicks.len(),
        }
        .emit(&self.metrics);
        let rt = self.runtime.entry(tid.clone()).or_default();
        if job.from_queue {
            let handled: HashSet<&String> = moves.moved.iter().chain(moves.gone.iter()).collect();
            rt.queue.retain(|dn| !handled.contains(dn));
        } else if let Some(c) = job.cursor {
            rt.cursor = c;
        }
        if rt.sweeping {
            rt.swept += moves.moved.len() as u64;
        }
        match moves.fault {
            Some(e) => {
                // Walks start over so the devices that did not move are found again.
                rt.cursor = Cursor::default();
                self.fault(&tid, e).await;
            }
            None => {
                rt.backoff = None;
            }
        }
    }

    /// Applies a batch's outcome to the task in memory (the store has the moved devices'
    /// records already, written with their new owner).
    fn record_moves(&self, task_id: &str, moves: &Moves, done: &DeviceDoc, now: i64) {
        let mut state = self.shared.write();
        let Some(t) = state.tasks.get_mut(task_id) else {
            return;
        };
        for dn in &moves.moved {
            t.devices.insert(dn.clone(), done.clone());
        }
        // FAILED with the reason until a later attempt moves it (auto: after the backoff;
        // manual: after continue). In memory only — the store just refused this device's
        // write; after a restart the device is simply retried.
        for (dn, reason) in &moves.failed {
            let pending = t.devices.get(dn).and_then(|d| d.pending);
            t.devices.insert(
                dn.clone(),
                DeviceDoc {
                    status: DeviceStatus::Failed,
                    reason: Some(reason.clone()),
                    pending,
                    updated_at_ms: now,
                },
            );
        }
        if moves.fault.is_none() {
            t.doc.last_error = None;
        }
    }

    /// The running state's work is done: apply `Finished`.
    pub(super) async fn finish(&mut self, task_id: &str) {
        let Ok(doc) = self.doc(task_id) else {
            return;
        };
        let Ok(t) = transition(doc.state, doc.halted, Event::Finished) else {
            return;
        };
        let from = doc.state;
        let now = self.now();
        let mut next = doc;
        next.state = t.to;
        if t.to == TaskState::Completed {
            next.completed_at_ms = Some(now);
        }
        if t.to == TaskState::ToMigrate {
            next.rollback_all = false;
            next.completed_at_ms = None;
        }
        let detail = format!("{from} finished");
        match self
            .save(
                next,
                Actor::system(),
                "finished",
                Some(from),
                detail,
                Vec::new(),
            )
            .await
        {
            Ok(()) => {
                let rt = self.runtime.entry(task_id.to_owned()).or_default();
                rt.cursor = Cursor::default();
                rt.queue.clear();
            }
            Err(e) => self.fault(task_id, e.to_string()).await,
        }
    }
}
