//! [`OtaEngine`]: owns every OTA job and per-device task, drives them with ONE deadline task,
//! and persists each change before acting on it.
//!
//! # State and locking
//!
//! - `jobs`: `DashMap<job_id, Arc<JobEntry>>`; a [`JobEntry`] holds the job record behind a
//!   short std mutex, its immutable [`TaskPolicy`], atomic counters per task status and per
//!   failure reason, its device names (sorted, for paging) and its push queue + limiter.
//! - `tasks`: `DashMap<TaskKey, TaskSlot>`: the task state, its history and bookkeeping.
//! - `active`: `DashMap<(pk, dn, module), job_id>`: the one unfinished task of a device's
//!   module, the hot-path index for progress and version reports.
//! - `device_jobs`: `DashMap<(pk, dn), Vec<job_id>>`: every job that has a task for a device.
//!
//! A task is changed only inside [`transition`](super::task::transition), under its `tasks`
//! shard guard; the store op is submitted while the guard is held (store order = memory order)
//! and the guard is dropped before any `.await`. Lock order: a push queue may take a task
//! shard (to check readiness); nothing takes a push queue while holding a task shard.
//!
//! # Durability (write-ahead)
//!
//! Every noted transition (status change, push, retry, failure…) is submitted as a `PutDoc` of
//! the whole task document and AWAITED before its effects run: a push is published only after
//! NOTIFIED is durable; events are emitted only after the change is durable. Plain progress
//! percent updates are coalesced: the task is marked dirty and written by the next flush
//! (every `progress_flush_ms`), so 50,000 progress messages/s do not mean 50,000 writes/s.
//!
//! # The deadline task
//!
//! One `BTreeSet<(ms, Due)>` + `Notify`: task deadlines (retry, re-push, timeout, stall), job
//! pushes (next rate slot, ramp step), job start and finish-by. Entries may be stale; firing one
//! re-runs the pure machine, which ignores what is not due, and re-arms the real next deadline.
//! Each task has at most one armed entry that is not later than its real deadline
//! (`TaskSlot::armed`), so a progress message that moves the stall deadline later touches no
//! global lock. Every deadline is computed from persisted timestamps, so [`OtaEngine::open`]
//! re-arms them all after a restart (even `kill -9`).
//!
//! # Layout
//!
//! - this file: [`OtaEngine`], its maps (`Inner`), `open`, the job index.
//! - `entries`: the records the maps hold ([`JobEntry`], [`TaskSlot`], [`TaskKey`]) and their
//!   store documents.
//! - `apply`: one event through the machine, write-ahead, then its effects.
//! - `push`, `deadlines`, `load`: push scheduling; the deadline task; start-up.
//! - `create`, `jobs`, `dynamic`: creating a job; its lifecycle; DYNAMIC joins.
//! - `device`: what devices do (and what the registry tells); `query`: reads for the API.
//! - `internal_events`: what the engine counts, one named event each.

mod apply;
mod create;
mod deadlines;
mod device;
mod dynamic;
mod entries;
mod internal_events;
mod jobs;
mod load;
mod push;
mod query;
mod relay;
mod series;

pub use relay::{DeviceReport, Handled, Relay};

pub use query::{DeviceJob, FirmwareStatistics, JobFilter, TimelineEntry};
pub use series::PushSeries;
#[cfg(test)]
mod tests;

use super::events::{TaskEvent, TaskEventSink};
use super::firmware::FirmwareRepo;
use super::model::{Job, Selection};
use super::task::TaskPolicy;
use super::OtaError;
use crate::broker::{DeviceKey, Downlink};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::Store;
use apply::Delivery;
use dashmap::DashMap;
use deadlines::Due;
use entries::{job_doc, lock, task_doc};
pub(crate) use entries::{JobEntry, TaskKey, TaskSlot};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, Notify};

/// Store document kind of jobs.
pub const JOB_DOC: &str = "ota.job";
/// Store document kind of tasks (id `{job_id}/{pk}/{dn}`, history included).
pub const TASK_DOC: &str = "ota.task";

/// How the engine reaches devices. The app uses the broker's [`Downlink`]; tests use a fake.
pub trait Pusher: Send + Sync + 'static {
    fn is_connected(&self, product_key: &str, device_name: &str) -> bool;
    fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), String>;
    /// Publishes `payload` on `topic` to one device (cluster mode: through the node that holds
    /// its connection). Defaults to [`Pusher::publish`].
    fn push_to(
        &self,
        product_key: &str,
        device_name: &str,
        topic: String,
        payload: Vec<u8>,
    ) -> Result<(), String> {
        let _ = (product_key, device_name);
        self.publish(topic, payload)
    }
}

impl Pusher for Downlink {
    fn is_connected(&self, product_key: &str, device_name: &str) -> bool {
        Downlink::is_connected(
            self,
            &DeviceKey {
                product_key: product_key.to_owned(),
                device_name: device_name.to_owned(),
            },
        )
    }

    fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), String> {
        Downlink::publish(self, topic, payload).map_err(|e| e.to_string())
    }
}

/// Engine settings (from `[ota]` in the config).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// After a device connects, wait this long before pushing to it (it subscribes after the
    /// CONNACK); a version report from the device ends the wait early.
    pub connect_push_delay_ms: i64,
    /// How long the download URL in a push stays valid.
    pub download_url_ttl: Duration,
    /// Interval of the coalesced write of progress-percent updates.
    pub progress_flush_ms: i64,
    /// Capacity of the task-event broadcast channel.
    pub event_capacity: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            connect_push_delay_ms: 1_000,
            download_url_ttl: Duration::from_secs(24 * 3600),
            progress_flush_ms: 200,
            event_capacity: 4096,
        }
    }
}

pub(crate) struct Inner {
    registry: Arc<Registry>,
    store: Store,
    firmware: Arc<FirmwareRepo>,
    pusher: Arc<dyn Pusher>,
    clock: Clock,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    jobs: DashMap<String, Arc<JobEntry>>,
    /// DYNAMIC jobs in `jobs`: lets every version report skip the scan for jobs to join when
    /// there are none (the common case), which otherwise walks every shard of `jobs`.
    dynamic_jobs: AtomicUsize,
    tasks: DashMap<TaskKey, TaskSlot>,
    active: DashMap<(String, String, String), String>,
    device_jobs: DashMap<(String, String), Vec<String>>,
    deadlines: Mutex<BTreeSet<(i64, Due)>>,
    wake: Notify,
    dirty_tx: mpsc::UnboundedSender<TaskKey>,
    dirty_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<TaskKey>>,
    events: broadcast::Sender<TaskEvent>,
    sink: RwLock<Option<TaskEventSink>>,
    next_message_id: AtomicU64,
    stopping: AtomicBool,
    stop: Notify,
    last_flush: std::sync::atomic::AtomicI64,
    /// Cluster mode: whether this node drives the engine now (always on one node).
    driving: AtomicBool,
    /// Bumped on every activation and deactivation: the deadline task of an earlier term
    /// ends.
    term: AtomicU64,
    /// Cluster mode: the deadline task of the current term, awaited when the term ends (no
    /// push of a term after [`OtaEngine::deactivate`]).
    term_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Cluster mode: where reports go while this node does not drive the engine.
    relay: RwLock<Option<Arc<dyn Relay>>>,
    /// Task changes whose write failed (cluster mode: refused by the lease's fence once the
    /// term ended): a relayed report during which one failed is answered "not applied".
    unstored: AtomicU64,
}

/// The OTA engine. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct OtaEngine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for OtaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtaEngine")
            .field("jobs", &self.inner.jobs.len())
            .field("tasks", &self.inner.tasks.len())
            .finish_non_exhaustive()
    }
}

impl OtaEngine {
    /// Loads every job and task from `store` and re-arms every timer. Blocking (start-up). Call
    /// [`OtaEngine::start`] afterwards to run the deadline task.
    pub fn open(
        registry: Arc<Registry>,
        store: Store,
        firmware: Arc<FirmwareRepo>,
        pusher: Arc<dyn Pusher>,
        clock: Clock,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<OtaEngine, OtaError> {
        let engine = OtaEngine::build(registry, store, firmware, pusher, clock, config, metrics);
        engine.load()?;
        engine
            .inner
            .registry
            .add_observer(Arc::new(device::DeviceObserverImpl(Arc::downgrade(
                &engine.inner,
            ))));
        Ok(engine)
    }

    /// An empty engine writing through `store`, observing the registry.
    fn build(
        registry: Arc<Registry>,
        store: Store,
        firmware: Arc<FirmwareRepo>,
        pusher: Arc<dyn Pusher>,
        clock: Clock,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> OtaEngine {
        let (dirty_tx, dirty_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(config.event_capacity.max(16));
        let now = clock.now_ms();
        let inner = Arc::new(Inner {
            registry,
            store,
            firmware,
            pusher,
            clock,
            config,
            metrics,
            jobs: DashMap::new(),
            dynamic_jobs: AtomicUsize::new(0),
            tasks: DashMap::new(),
            active: DashMap::new(),
            device_jobs: DashMap::new(),
            deadlines: Mutex::new(BTreeSet::new()),
            wake: Notify::new(),
            dirty_tx,
            dirty_rx: tokio::sync::Mutex::new(dirty_rx),
            events,
            sink: RwLock::new(None),
            next_message_id: AtomicU64::new((now.max(0) as u64) % 1_000_000_000 * 1000),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
            last_flush: std::sync::atomic::AtomicI64::new(now),
            driving: AtomicBool::new(true),
            term: AtomicU64::new(0),
            term_task: Mutex::new(None),
            relay: RwLock::new(None),
            unstored: AtomicU64::new(0),
        });
        OtaEngine { inner }
    }

    /// Adds a job to the in-memory index (the only way in, so `dynamic_jobs` stays exact).
    pub(crate) fn insert_job(&self, id: String, entry: Arc<JobEntry>) {
        let dynamic = entry.selection == Selection::Dynamic;
        if let Some(old) = self.inner.jobs.insert(id, entry) {
            if old.selection == Selection::Dynamic {
                self.inner.dynamic_jobs.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if dynamic {
            self.inner.dynamic_jobs.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Removes a job from the in-memory index.
    pub(crate) fn remove_job(&self, id: &str) {
        if let Some((_, old)) = self.inner.jobs.remove(id) {
            if old.selection == Selection::Dynamic {
                self.inner.dynamic_jobs.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether any DYNAMIC job exists (finished ones included).
    pub(crate) fn has_dynamic_jobs(&self) -> bool {
        self.inner.dynamic_jobs.load(Ordering::Relaxed) > 0
    }

    fn policy_for(&self, job: &Job) -> TaskPolicy {
        TaskPolicy {
            module: job.module.clone(),
            dest_version: job.dest_version.clone(),
            src_versions: job.src_versions.clone(),
            timeout_ms: job.spec.timeout_seconds.map(|s| s as i64 * 1000),
            stall_ms: job.spec.stall_seconds.map(|s| s as i64 * 1000),
            retry: job.spec.retry_policy(),
            connect_push_delay_ms: self.inner.config.connect_push_delay_ms,
        }
    }

    pub(crate) fn job_entry(&self, job_id: &str) -> Option<Arc<JobEntry>> {
        self.inner.jobs.get(job_id).map(|e| Arc::clone(e.value()))
    }

    // ----- events API -----

    /// A receiver of every task event from now on (see [`super::events`]).
    pub fn subscribe_events(&self) -> broadcast::Receiver<TaskEvent> {
        self.inner.events.subscribe()
    }

    /// Sets the synchronous event sink (see [`super::events`]); replaces an earlier one.
    pub fn set_event_sink(&self, sink: TaskEventSink) {
        *self
            .inner
            .sink
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(sink);
    }

    pub(crate) fn now(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    pub(crate) fn firmware(&self) -> &Arc<FirmwareRepo> {
        &self.inner.firmware
    }

    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }
}
