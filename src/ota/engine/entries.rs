//! The records the engine's maps hold, beside the loop that drives them: a job's
//! [`JobEntry`] (the job behind a short mutex, its immutable policy, atomic counters, members
//! and push queue), a task's [`TaskSlot`] (state, history, in-memory bookkeeping), the
//! [`TaskKey`] that names a task, and how both become store documents.

use super::{JOB_DOC, TASK_DOC};
use crate::ota::model::{AbortSpec, HistoryEntry, Job, JobStatus, JobType, Selection, MAX_HISTORY};
use crate::ota::rate::{PushLimiter, RatePlan};
use crate::ota::task::{Note, TaskPolicy, TaskState, TaskStatus};
use crate::store::Op;
use serde::Serialize;
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

/// `(job_id, product_key, device_name)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct TaskKey {
    pub job_id: String,
    pub pk: String,
    pub dn: String,
}

impl TaskKey {
    pub(super) fn new(job_id: &str, pk: &str, dn: &str) -> Self {
        TaskKey {
            job_id: job_id.to_owned(),
            pk: pk.to_owned(),
            dn: dn.to_owned(),
        }
    }

    pub(super) fn doc_id(&self) -> String {
        format!("{}/{}/{}", self.job_id, self.pk, self.dn)
    }
}

pub(crate) struct TaskSlot {
    pub state: TaskState,
    pub history: Vec<HistoryEntry>,
    pub history_dropped: u64,
    /// The earliest deadline entry armed for this task (in memory only).
    pub(super) armed: Option<i64>,
    /// Changed since it was last written (progress percent only).
    pub(super) dirty: bool,
    /// A QUEUED task is not pushed before this (in memory: the device has just connected).
    pub(super) ready_at: i64,
}

impl TaskSlot {
    pub(super) fn new(state: TaskState, history: Vec<HistoryEntry>, history_dropped: u64) -> Self {
        TaskSlot {
            state,
            history,
            history_dropped,
            armed: None,
            dirty: false,
            ready_at: 0,
        }
    }

    pub(super) fn record_note(&mut self, at_ms: i64, note: &Note, from: TaskStatus) {
        self.history.push(HistoryEntry {
            at_ms,
            event: note.event.as_str().to_owned(),
            from_status: from,
            to_status: self.state.status,
            reason: note.reason.clone(),
        });
        if self.history.len() > MAX_HISTORY {
            let excess = self.history.len() - MAX_HISTORY;
            self.history.drain(..excess);
            self.history_dropped += excess as u64;
        }
    }
}

#[derive(Serialize)]
struct TaskRecordRef<'a> {
    job_id: &'a str,
    product_key: &'a str,
    device_name: &'a str,
    state: &'a TaskState,
    history: &'a [HistoryEntry],
    history_dropped: u64,
}

pub(super) fn task_doc(key: &TaskKey, slot: &TaskSlot) -> Op {
    let body = serde_json::to_string(&TaskRecordRef {
        job_id: &key.job_id,
        product_key: &key.pk,
        device_name: &key.dn,
        state: &slot.state,
        history: &slot.history,
        history_dropped: slot.history_dropped,
    })
    .unwrap_or_default();
    Op::PutDoc {
        kind: TASK_DOC,
        id: key.doc_id(),
        body,
    }
}

pub(super) fn job_doc(job: &Job) -> Op {
    Op::PutDoc {
        kind: JOB_DOC,
        id: job.job_id.clone(),
        body: serde_json::to_string(job).unwrap_or_default(),
    }
}

/// A job's push queue and rate bucket.
#[derive(Default)]
pub(super) struct PushQueue {
    /// Device names in push order (entries may be stale: checked when popped).
    pub(super) ready: VecDeque<String>,
    pub(super) limiter: Option<PushLimiter>,
    pub(super) level: u32,
    /// The JobPush entry armed in the deadline set.
    pub(super) armed: Option<i64>,
}

pub(crate) struct JobEntry {
    pub(super) job: Mutex<Job>,
    pub policy: Arc<TaskPolicy>,
    pub job_id: String,
    pub product_key: String,
    pub firmware_id: String,
    pub selection: Selection,
    /// Immutable parts of the job, copied out so hot paths never clone the whole [`Job`]
    /// (a SPECIFIC job's spec may list 10,000 device names).
    pub job_type: JobType,
    pub created_at_ms: i64,
    pub start_at_ms: Option<i64>,
    pub(super) abort: Option<AbortSpec>,
    pub(super) rate: Option<RatePlan>,
    pub(super) counters: [AtomicU64; 7],
    pub(super) failures: [AtomicU64; 9],
    pub(super) retries: AtomicU64,
    pub(super) pushes: AtomicU64,
    /// Device names with a task in this job, sorted.
    pub(super) members: RwLock<BTreeSet<String>>,
    pub(super) push: Mutex<PushQueue>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl JobEntry {
    pub(super) fn new(job: Job, policy: TaskPolicy) -> Self {
        let rate = job.spec.rate.clone().map(|spec| RatePlan { spec });
        JobEntry {
            policy: Arc::new(policy),
            job_id: job.job_id.clone(),
            product_key: job.product_key.clone(),
            firmware_id: job.spec.firmware_id.clone(),
            selection: job.spec.selection,
            job_type: job.spec.job_type,
            created_at_ms: job.created_at_ms,
            start_at_ms: job.spec.start_at_ms,
            abort: job.spec.abort.clone(),
            rate,
            counters: Default::default(),
            failures: Default::default(),
            retries: AtomicU64::new(0),
            pushes: AtomicU64::new(0),
            members: RwLock::new(BTreeSet::new()),
            push: Mutex::new(PushQueue::default()),
            job: Mutex::new(job),
        }
    }

    pub fn job(&self) -> Job {
        lock(&self.job).clone()
    }

    pub fn status(&self) -> JobStatus {
        lock(&self.job).status
    }

    pub fn counters(&self) -> [u64; 7] {
        std::array::from_fn(|i| self.counters[i].load(Ordering::Relaxed))
    }

    pub fn failures(&self) -> [u64; 9] {
        std::array::from_fn(|i| self.failures[i].load(Ordering::Relaxed))
    }

    pub(super) fn unfinished(&self) -> u64 {
        let c = self.counters();
        c[0] + c[1] + c[2] + c[3]
    }

    pub(super) fn count(&self, status: TaskStatus, delta: i64) {
        let c = &self.counters[status.index()];
        if delta >= 0 {
            c.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            c.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }

    pub fn members(&self) -> Vec<String> {
        self.members
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    pub(super) fn has_member(&self, dn: &str) -> bool {
        self.members
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(dn)
    }

    pub(super) fn add_member(&self, dn: &str) {
        self.members
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(dn.to_owned());
    }

    /// Pushes go out in these job states (a canceled DYNAMIC job lets its tasks finish).
    pub(super) fn pushes_allowed(&self) -> bool {
        !matches!(self.status(), JobStatus::Planned | JobStatus::Paused)
    }

    /// The current push rate (devices/min), if the job has one.
    pub fn current_rate(&self, now: i64) -> Option<f64> {
        let plan = self.rate.as_ref()?;
        let started = lock(&self.job).started_at_ms.unwrap_or(now);
        let succeeded = self.counters[TaskStatus::Succeeded.index()].load(Ordering::Relaxed);
        Some(plan.per_minute(plan.level(started, now, succeeded)))
    }
}
