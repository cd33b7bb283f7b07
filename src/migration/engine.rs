//! The engine: one actor task that owns every change to migration state, and a shared,
//! read-only view of that state for the API and the forwarder.
//!
//! ```text
//! API handlers ──Command + oneshot──► actor ──► store (task/device/log docs; device moves via the registry)
//!      │                                 │ ├──► registry.set_devices_instance (ownership + status doc, one submission per device)
//!      └── reads: RwLock<State> ◄── writes ┘ ├──► kick hook (connected devices reconnect)
//! forwarder ── extra_targets(pk, dn, owner) ─► routes (DashMap, hot path; no actor involved)
//! ```
//!
//! The actor's loop (`Actor::run`) waits on, in this order: shutdown, a command, the next
//! deadline (data-sync expiry, a fault's retry, the sweep tick), or the governor's permit for
//! the next batch of device moves. Commands are therefore handled between batches, never in
//! the middle of one, which is what makes pause/rollback/restart races impossible: a batch's
//! devices are moved and recorded (ownership and per-device status in the same atomic store
//! submission), then the next command sees them.
//!
//! Work per running state ([`Work`]): the canary and picked-rollback devices are queues of
//! names persisted as `pending` markers on their device docs; full migration and "rollback all"
//! walk the product's device names with a cursor and move every device still owned by the
//! wrong instance — the owner is the truth, so a restart simply walks again and nothing is
//! moved twice or forgotten. A walk that moved something is followed by another walk, so
//! devices created meanwhile are picked up; the state finishes after a walk that found nothing.
//! `COMPLETED` tasks are swept once a minute for devices created in the source since.
//!
//! The std `RwLock` around [`State`] is only ever held in synchronous blocks (never across
//! `.await`); the actor is its only writer.

use super::clock::Clock;
use super::machine::{transition, Event, Refused};
use super::model::*;
use super::MigrationError;
use crate::metrics::Metrics;
use crate::registry::{Page, Paged, Registry, RegistryError};
use crate::store::{Op, StoreError};
use dashmap::DashMap;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Store document kinds.
pub const TASK_DOC: &str = "migration.task";
pub const DEVICE_DOC: &str = "migration.device";
pub const LOG_DOC: &str = "migration.log";

/// How often `COMPLETED` tasks are swept and the clock is re-read for data-sync expiry (so data
/// sync changes are "effective within a minute" even if nothing else wakes the actor).
const TICK: Duration = Duration::from_secs(60);
/// Device names read from the registry per walk step.
const SCAN_CHUNK: usize = 1024;
/// First retry delay after a fault (auto resume); doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Engine settings (the `[migration]` section of the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Devices moved per second over all tasks (governor); 0 = unthrottled.
    pub devices_per_sec: u32,
    /// Devices moved per batch (one group-committed store transaction).
    pub batch_size: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            devices_per_sec: 500,
            batch_size: 256,
        }
    }
}

/// Called with `(product_key, device_name)` for a connected device that was moved, so the
/// broker drops its session and the device reconnects (into its new instance).
pub type KickFn = Arc<dyn Fn(&str, &str) + Send + Sync>;
/// Called with `(target_instance_id, bytes_per_sec)` when a task's data-sync bandwidth limit
/// applies (`Some`) or stops applying (`None`); the app wires it to the forwarder's limiter.
pub type RateLimitFn = Arc<dyn Fn(&str, Option<u64>) + Send + Sync>;

/// What the engine calls out to.
#[derive(Clone)]
pub struct Hooks {
    pub kick: KickFn,
    pub set_rate_limit: RateLimitFn,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            kick: Arc::new(|_, _| {}),
            set_rate_limit: Arc::new(|_, _| {}),
        }
    }
}

/// A new task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    pub product_key: String,
    pub target_instance_id: String,
    pub name: Option<String>,
    pub config: MigrationConfig,
}

/// Which devices a rollback moves back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollbackSelection {
    All,
    Picked(Vec<String>),
}

/// The answer to a lifecycle call: the task now, and the selection rows that were refused.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub details: TaskDetails,
    pub rejected: Vec<RejectedRow>,
    /// Devices the call selected (canary / picked rollback).
    pub accepted: usize,
}

/// Task list filter.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TaskFilter {
    pub product_key: Option<String>,
    pub state: Option<TaskState>,
}

/// Per-device list filter: status and a device-name substring (case-insensitive).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DeviceListFilter {
    pub status: Option<DeviceStatus>,
    pub device_name: Option<String>,
}

enum Request {
    Create(NewTask),
    Delete,
    Configure(MigrationConfig),
    Canary(Vec<String>),
    Full,
    Pause,
    Continue,
    Rollback(RollbackSelection),
    DataSync(bool),
}

enum Command {
    Task {
        task_id: String,
        request: Request,
        actor: Actor,
        reply: oneshot::Sender<Result<Option<Outcome>, MigrationError>>,
    },
    SetRate(u32, oneshot::Sender<()>),
    Wake,
}

struct TaskEntry {
    doc: TaskDoc,
    devices: HashMap<String, DeviceDoc>,
    log: Vec<LogEntry>,
}

#[derive(Default)]
struct State {
    tasks: BTreeMap<String, TaskEntry>,
    by_product: HashMap<String, String>,
}

/// Where data of a product's not-yet-migrated devices is mirrored while data sync is on.
#[derive(Debug, Clone)]
struct SyncRoute {
    target: String,
    expires_at_ms: i64,
}

struct Shared {
    state: RwLock<State>,
    routes: DashMap<String, SyncRoute>,
    clock: Clock,
    registry: Arc<Registry>,
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The migration engine. Share it as `Arc<MigrationEngine>`.
pub struct MigrationEngine {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Command>,
    stop: watch::Sender<bool>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for MigrationEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationEngine")
            .field("tasks", &self.shared.read().tasks.len())
            .finish_non_exhaustive()
    }
}

fn parse_doc<T: serde::de::DeserializeOwned>(kind: &str, id: &str, body: &str) -> Option<T> {
    match serde_json::from_str(body) {
        Ok(v) => Some(v),
        Err(e) => {
            // One bad document must not keep the gateway from starting; it is logged loudly.
            tracing::error!(kind, id, error = %e, "corrupt migration document skipped");
            None
        }
    }
}

fn doc_op<T: serde::Serialize>(kind: &'static str, id: String, value: &T) -> Op {
    Op::PutDoc {
        kind,
        id,
        // Serialising plain structs of strings and numbers cannot fail.
        body: serde_json::to_string(value).unwrap_or_default(),
    }
}

fn device_doc_id(task_id: &str, dn: &str) -> String {
    format!("{task_id}/{dn}")
}

fn log_doc_id(task_id: &str, seq: u64) -> String {
    format!("{task_id}/{seq:012}")
}

impl MigrationEngine {
    /// Loads every task from the registry's store (blocking: start-up only) and starts the
    /// actor, which resumes running tasks at once.
    pub fn start(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        config: EngineConfig,
        hooks: Hooks,
    ) -> Result<Arc<MigrationEngine>, MigrationError> {
        let store = registry.store().clone();
        let mut state = State::default();
        for (id, body) in store.load_documents(TASK_DOC)? {
            if let Some(doc) = parse_doc::<TaskDoc>(TASK_DOC, &id, &body) {
                state
                    .by_product
                    .insert(doc.product_key.clone(), doc.task_id.clone());
                state.tasks.insert(
                    doc.task_id.clone(),
                    TaskEntry {
                        doc,
                        devices: HashMap::new(),
                        log: Vec::new(),
                    },
                );
            }
        }
        for (id, body) in store.load_documents(DEVICE_DOC)? {
            let Some((tid, dn)) = id.split_once('/') else {
                continue;
            };
            let Some(entry) = state.tasks.get_mut(tid) else {
                continue;
            };
            if let Some(doc) = parse_doc::<DeviceDoc>(DEVICE_DOC, &id, &body) {
                entry.devices.insert(dn.to_owned(), doc);
            }
        }
        for (id, body) in store.load_documents(LOG_DOC)? {
            let Some((tid, _)) = id.split_once('/') else {
                continue;
            };
            let Some(entry) = state.tasks.get_mut(tid) else {
                continue;
            };
            if let Some(doc) = parse_doc::<LogEntry>(LOG_DOC, &id, &body) {
                entry.log.push(doc);
            }
        }
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            routes: DashMap::new(),
            clock: Clock::new(),
            registry,
        });
        let mut worker = Worker::new(shared.clone(), metrics, config, hooks);
        worker.rebuild_after_load();
        let (tx, rx) = mpsc::channel(256);
        let (stop, stop_rx) = watch::channel(false);
        let handle = tokio::spawn(worker.run(rx, stop_rx));
        {
            let state = shared.read();
            let running = state
                .tasks
                .values()
                .filter(|t| t.doc.state.is_running())
                .count();
            tracing::info!(
                tasks = state.tasks.len(),
                running,
                "migration engine started"
            );
        }
        Ok(Arc::new(MigrationEngine {
            shared,
            tx,
            stop,
            task: std::sync::Mutex::new(Some(handle)),
        }))
    }

    /// The engine's clock (tests advance it; see [`Clock`]).
    pub fn clock(&self) -> &Clock {
        &self.shared.clock
    }

    /// Makes the actor re-read the clock now (after [`Clock::advance`]).
    pub fn wake(&self) {
        let _ = self.tx.try_send(Command::Wake);
    }

    /// Changes the device-move rate (devices/s over all tasks; 0 = unthrottled).
    pub async fn set_rate(&self, devices_per_sec: u32) -> Result<(), MigrationError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::SetRate(devices_per_sec, reply))
            .await
            .map_err(|_| MigrationError::Stopped)?;
        rx.await.map_err(|_| MigrationError::Stopped)
    }

    /// Stops the actor after the batch in flight (everything it did is already durable).
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let handle = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            if let Err(e) = handle.await {
                tracing::error!(error = %e, "migration actor failed");
            }
        }
    }

    async fn call(
        &self,
        task_id: &str,
        request: Request,
        actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Task {
                task_id: task_id.to_owned(),
                request,
                actor,
                reply,
            })
            .await
            .map_err(|_| MigrationError::Stopped)?;
        rx.await.map_err(|_| MigrationError::Stopped)?
    }

    async fn call_outcome(
        &self,
        task_id: &str,
        request: Request,
        actor: Actor,
    ) -> Result<Outcome, MigrationError> {
        self.call(task_id, request, actor)
            .await?
            .ok_or(MigrationError::Stopped)
    }

    /// Creates a task in `TO_MIGRATE`.
    pub async fn create(&self, new: NewTask, actor: Actor) -> Result<TaskDetails, MigrationError> {
        Ok(self
            .call_outcome("", Request::Create(new), actor)
            .await?
            .details)
    }

    /// Deletes a task: only in `TO_MIGRATE` with no device in the target, or `COMPLETED`.
    pub async fn delete(&self, task_id: &str, actor: Actor) -> Result<(), MigrationError> {
        self.call(task_id, Request::Delete, actor).await.map(|_| ())
    }

    /// Sets the DCS-shaped configuration.
    pub async fn configure(
        &self,
        task_id: &str,
        config: MigrationConfig,
        actor: Actor,
    ) -> Result<TaskDetails, MigrationError> {
        Ok(self
            .call_outcome(task_id, Request::Configure(config), actor)
            .await?
            .details)
    }

    /// Starts a canary with the named devices (≤ 10,000; the API enforces 100 for JSON).
    pub async fn canary(
        &self,
        task_id: &str,
        device_names: Vec<String>,
        actor: Actor,
    ) -> Result<Outcome, MigrationError> {
        self.call_outcome(task_id, Request::Canary(device_names), actor)
            .await
    }

    pub async fn full(&self, task_id: &str, actor: Actor) -> Result<TaskDetails, MigrationError> {
        Ok(self
            .call_outcome(task_id, Request::Full, actor)
            .await?
            .details)
    }

    pub async fn pause(&self, task_id: &str, actor: Actor) -> Result<TaskDetails, MigrationError> {
        Ok(self
            .call_outcome(task_id, Request::Pause, actor)
            .await?
            .details)
    }

    pub async fn resume(&self, task_id: &str, actor: Actor) -> Result<TaskDetails, MigrationError> {
        Ok(self
            .call_outcome(task_id, Request::Continue, actor)
            .await?
            .details)
    }

    pub async fn rollback(
        &self,
        task_id: &str,
        selection: RollbackSelection,
        actor: Actor,
    ) -> Result<Outcome, MigrationError> {
        self.call_outcome(task_id, Request::Rollback(selection), actor)
            .await
    }

    pub async fn set_data_sync(
        &self,
        task_id: &str,
        enabled: bool,
        actor: Actor,
    ) -> Result<TaskDetails, MigrationError> {
        Ok(self
            .call_outcome(task_id, Request::DataSync(enabled), actor)
            .await?
            .details)
    }

    // ----- reads (no actor round trip) -----

    pub fn details(&self, task_id: &str) -> Result<TaskDetails, MigrationError> {
        let state = self.shared.read();
        let entry = state
            .tasks
            .get(task_id)
            .ok_or_else(|| MigrationError::TaskNotFound(task_id.to_owned()))?;
        Ok(details(&self.shared, entry))
    }

    /// Tasks (newest first), optionally of one product or in one state.
    pub fn list(&self, filter: &TaskFilter, page: Page) -> Paged<TaskDetails> {
        let state = self.shared.read();
        let mut matching: Vec<&TaskEntry> = state
            .tasks
            .values()
            .filter(|t| {
                filter
                    .product_key
                    .as_ref()
                    .is_none_or(|pk| &t.doc.product_key == pk)
                    && filter.state.is_none_or(|s| t.doc.state == s)
            })
            .collect();
        matching.sort_by(|a, b| {
            b.doc
                .created_at_ms
                .cmp(&a.doc.created_at_ms)
                .then_with(|| a.doc.task_id.cmp(&b.doc.task_id))
        });
        let total = matching.len() as u64;
        let items = matching
            .into_iter()
            .skip((page.page as usize - 1) * page.page_size as usize)
            .take(page.page_size as usize)
            .map(|t| details(&self.shared, t))
            .collect();
        Paged {
            items,
            total,
            page: page.page,
            page_size: page.page_size,
        }
    }

    /// The task's devices by name: every device of the product plus failed ones that no
    /// longer exist, filtered by status and name substring.
    pub fn devices(
        &self,
        task_id: &str,
        filter: &DeviceListFilter,
        page: Page,
    ) -> Result<Paged<DeviceMigration>, MigrationError> {
        let registry = &self.shared.registry;
        let (pk, rows) = {
            let state = self.shared.read();
            let entry = state
                .tasks
                .get(task_id)
                .ok_or_else(|| MigrationError::TaskNotFound(task_id.to_owned()))?;
            let pk = entry.doc.product_key.clone();
            let needle = filter.device_name.as_ref().map(|s| s.to_lowercase());
            let rows: Vec<(String, DeviceStatus, Option<DeviceDoc>)> =
                device_statuses(registry, entry)
                    .into_iter()
                    .filter(|(dn, status, _)| {
                        filter.status.is_none_or(|s| s == *status)
                            && needle
                                .as_ref()
                                .is_none_or(|n| dn.to_lowercase().contains(n.as_str()))
                    })
                    .collect();
            (pk, rows)
        };
        let total = rows.len() as u64;
        let items = rows
            .into_iter()
            .skip((page.page as usize - 1) * page.page_size as usize)
            .take(page.page_size as usize)
            .map(|(dn, status, doc)| {
                let device = registry.get_device(&pk, &dn).ok();
                DeviceMigration {
                    status,
                    reason: doc.as_ref().and_then(|d| d.reason.clone()),
                    instance_id: device.as_ref().map(|d| d.instance_id.clone()),
                    online: device.as_ref().is_some_and(|d| d.online),
                    updated_at_ms: doc.as_ref().map(|d| d.updated_at_ms),
                    device_name: dn,
                }
            })
            .collect();
        Ok(Paged {
            items,
            total,
            page: page.page,
            page_size: page.page_size,
        })
    }

    /// The task's log, oldest first.
    pub fn log(&self, task_id: &str, page: Page) -> Result<Paged<LogEntry>, MigrationError> {
        let state = self.shared.read();
        let entry = state
            .tasks
            .get(task_id)
            .ok_or_else(|| MigrationError::TaskNotFound(task_id.to_owned()))?;
        Ok(Paged {
            items: entry
                .log
                .iter()
                .skip((page.page as usize - 1) * page.page_size as usize)
                .take(page.page_size as usize)
                .cloned()
                .collect(),
            total: entry.log.len() as u64,
            page: page.page,
            page_size: page.page_size,
        })
    }

    /// Data sync routing for the forwarder: the instances a device's data goes to besides its
    /// owner. Non-empty only while the product's task has data sync on (and not expired) and the
    /// device is not in the target yet (`owner` is the instance owning it now). Hot path: one
    /// map lookup, no lock shared with the actor.
    pub fn extra_targets(&self, product_key: &str, _device_name: &str, owner: &str) -> Vec<String> {
        let Some(route) = self.shared.routes.get(product_key) else {
            return Vec::new();
        };
        if route.target == owner || self.shared.clock.now_ms() >= route.expires_at_ms {
            return Vec::new();
        }
        vec![route.target.clone()]
    }

    /// The bandwidth limit (MB/s) on data mirrored to `target_instance_id`, if a task with
    /// data sync on sets one (the lowest if several do).
    pub fn bandwidth_limit_mb(&self, target_instance_id: &str) -> Option<u32> {
        let now = self.shared.clock.now_ms();
        let state = self.shared.read();
        state
            .tasks
            .values()
            .filter(|t| {
                t.doc.target_instance_id == target_instance_id && t.doc.data_sync.active(now)
            })
            .filter_map(|t| t.doc.config.bandwidth_limit_mb)
            .min()
    }
}

/// Every device of the task with its status: the product's devices (no doc = NOT_MIGRATED),
/// then failed docs of devices that no longer exist. Sorted by name.
fn device_statuses(
    registry: &Registry,
    entry: &TaskEntry,
) -> Vec<(String, DeviceStatus, Option<DeviceDoc>)> {
    let names = registry
        .device_names_after(&entry.doc.product_key, None, usize::MAX)
        .unwrap_or_default();
    let mut seen: HashSet<&str> = HashSet::with_capacity(names.len());
    let mut rows = Vec::with_capacity(names.len());
    for dn in &names {
        seen.insert(dn.as_str());
        let doc = entry.devices.get(dn).cloned();
        let status = doc.as_ref().map_or(DeviceStatus::NotMigrated, |d| d.status);
        rows.push((dn.clone(), status, doc));
    }
    for (dn, doc) in &entry.devices {
        if doc.status == DeviceStatus::Failed && !seen.contains(dn.as_str()) {
            rows.push((dn.clone(), DeviceStatus::Failed, Some(doc.clone())));
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

fn summary(doc: &TaskDoc, totals: &DeviceTotals) -> SummaryStatus {
    if doc.halted {
        return SummaryStatus::Failed;
    }
    match doc.state {
        s if s.is_running() => SummaryStatus::Migrating,
        TaskState::CanaryCompleted | TaskState::Completed => {
            if totals.failed > 0 {
                SummaryStatus::Failed
            } else {
                SummaryStatus::Success
            }
        }
        _ => SummaryStatus::Terminated,
    }
}

fn details(shared: &Shared, entry: &TaskEntry) -> TaskDetails {
    let now = shared.clock.now_ms();
    let mut totals = DeviceTotals::default();
    for (_, status, _) in device_statuses(&shared.registry, entry) {
        totals.add(status);
    }
    let doc = &entry.doc;
    let ds = &doc.data_sync;
    let active = ds.active(now);
    TaskDetails {
        task_id: doc.task_id.clone(),
        name: doc.name.clone(),
        product_key: doc.product_key.clone(),
        source_instance_id: doc.source_instance_id.clone(),
        target_instance_id: doc.target_instance_id.clone(),
        state: doc.state,
        status: summary(doc, &totals),
        halted: doc.halted,
        error: doc.last_error.clone(),
        config: doc.config,
        data_sync: DataSyncView {
            enabled: active,
            started_at_ms: ds.enabled_at_ms,
            expires_at_ms: ds.expires_at_ms().filter(|_| active),
            disabled_at_ms: if active {
                None
            } else {
                ds.disabled_at_ms.or(ds.expires_at_ms())
            },
            disabled_reason: if active {
                None
            } else if ds.enabled {
                // Past its 30 days; the actor records it within a minute.
                Some("expired".into())
            } else {
                ds.disabled_reason.clone()
            },
            can_enable: !(ds.locked
                || (!active && ds.enabled && doc.state == TaskState::Completed)),
        },
        devices: totals,
        created_at_ms: doc.created_at_ms,
        updated_at_ms: doc.updated_at_ms,
        completed_at_ms: doc.completed_at_ms,
    }
}

/// Checks a device-name selection against the product: duplicates, unknown names, and
/// `eligible` (why a known device cannot be selected). Returns the accepted names in input
/// order and the refused rows.
fn check_selection(
    registry: &Registry,
    pk: &str,
    names: Vec<String>,
    mut eligible: impl FnMut(&str, &str) -> Result<(), String>,
) -> (Vec<String>, Vec<RejectedRow>) {
    let mut first_row: HashMap<String, usize> = HashMap::with_capacity(names.len());
    let mut accepted = Vec::with_capacity(names.len());
    let mut rejected = Vec::new();
    for (i, dn) in names.into_iter().enumerate() {
        let row = i + 1;
        let reject = |code: &str, msg: String| RejectedRow {
            row,
            device_name: dn.clone(),
            error_code: code.to_owned(),
            error_msg: msg,
        };
        if dn.is_empty() {
            rejected.push(reject("FG.1001", "empty device name".into()));
            continue;
        }
        if let Some(first) = first_row.get(&dn) {
            rejected.push(reject(
                "FG.1001",
                format!("duplicate: {dn:?} already appears at row {first}"),
            ));
            continue;
        }
        first_row.insert(dn.clone(), row);
        match registry.device_instance(pk, &dn) {
            None => rejected.push(reject(
                "FG.2003",
                format!("device {dn:?} not found in product {pk}"),
            )),
            Some(owner) => match eligible(&dn, &owner) {
                Ok(()) => accepted.push(dn),
                Err(why) => rejected.push(reject("FG.1001", why)),
            },
        }
    }
    (accepted, rejected)
}

/// A batch of device moves chosen by [`Actor::next_job`].
struct Job {
    task_id: String,
    product_key: String,
    /// Where the devices go.
    to_instance: String,
    /// Status the moved devices get.
    status: DeviceStatus,
    names: Vec<String>,
    /// Cursor after this batch (walks only).
    cursor: Option<Cursor>,
    /// Taken from the queue (queues only).
    from_queue: bool,
}

/// Position of a walk over the product's device names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Cursor {
    after: Option<String>,
    /// This walk moved something (so another walk follows).
    moved: bool,
}

enum Next {
    Batch(Job),
    Finish(String),
    /// A sweep of a COMPLETED task found nothing more.
    SweepDone(String),
    Idle,
}

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

struct Worker {
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
    fn new(shared: Arc<Shared>, metrics: Arc<Metrics>, config: EngineConfig, hooks: Hooks) -> Self {
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
    fn rebuild_after_load(&mut self) {
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

    /// Installs or removes the product's data-sync route and the target's bandwidth limit.
    fn apply_route(&self, doc: &TaskDoc) {
        let now = self.now();
        if doc.data_sync.active(now) {
            let expires_at_ms = doc.data_sync.expires_at_ms().unwrap_or(now);
            self.shared.routes.insert(
                doc.product_key.clone(),
                SyncRoute {
                    target: doc.target_instance_id.clone(),
                    expires_at_ms,
                },
            );
            (self.hooks.set_rate_limit)(
                &doc.target_instance_id,
                doc.config
                    .bandwidth_limit_mb
                    .map(|mb| u64::from(mb) * 1024 * 1024),
            );
        } else if self
            .shared
            .routes
            .remove_if(&doc.product_key, |_, r| r.target == doc.target_instance_id)
            .is_some()
        {
            (self.hooks.set_rate_limit)(&doc.target_instance_id, None);
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>, mut stop: watch::Receiver<bool>) {
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

    fn next_deadline(&self) -> Instant {
        let now_i = Instant::now();
        let now = self.now();
        let mut deadline = self.next_tick;
        for r in self.shared.routes.iter() {
            let wait = Duration::from_millis(r.expires_at_ms.saturating_sub(now).max(0) as u64);
            deadline = deadline.min(now_i + wait);
        }
        for rt in self.runtime.values() {
            if let Some(at) = rt.retry_at {
                deadline = deadline.min(at);
            }
        }
        deadline
    }

    async fn on_deadline(&mut self) {
        let now_i = Instant::now();
        if now_i >= self.next_tick {
            self.next_tick = now_i + TICK;
            let completed: Vec<String> = self
                .shared
                .read()
                .tasks
                .values()
                .filter(|t| t.doc.state == TaskState::Completed)
                .map(|t| t.doc.task_id.clone())
                .collect();
            for tid in completed {
                self.runtime.entry(tid).or_default().sweeping = true;
            }
        }
        for rt in self.runtime.values_mut() {
            if rt.retry_at.is_some_and(|at| at <= now_i) {
                rt.retry_at = None;
            }
        }
        self.expire_data_sync().await;
    }

    /// Turns data sync off for tasks past their 30 days.
    async fn expire_data_sync(&mut self) {
        let now = self.now();
        let expired: Vec<TaskDoc> = self
            .shared
            .read()
            .tasks
            .values()
            .filter(|t| t.doc.data_sync.enabled && !t.doc.data_sync.active(now))
            .map(|t| t.doc.clone())
            .collect();
        for mut doc in expired {
            let at = doc.data_sync.expires_at_ms().unwrap_or(now);
            doc.data_sync.enabled = false;
            doc.data_sync.disabled_at_ms = Some(at);
            doc.data_sync.disabled_reason = Some("expired".into());
            if doc.state == TaskState::Completed {
                doc.data_sync.locked = true;
            }
            let detail =
                format!("data sync turned itself off {DATA_SYNC_DAYS} days after it was turned on");
            if let Err(e) = self
                .save(
                    doc,
                    Actor::system(),
                    "data_sync_expired",
                    None,
                    detail,
                    Vec::new(),
                )
                .await
            {
                tracing::error!(error = %e, "cannot record data-sync expiry; retrying at the next tick");
                // The route is removed regardless: expired data sync must not mirror.
            }
        }
        let stale: Vec<String> = self
            .shared
            .routes
            .iter()
            .filter(|r| now >= r.expires_at_ms)
            .map(|r| r.key().clone())
            .collect();
        for pk in stale {
            if let Some((_, r)) = self.shared.routes.remove(&pk) {
                (self.hooks.set_rate_limit)(&r.target, None);
            }
        }
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
        self.shared.registry.store().submit(ops).await?;
        tracing::info!(task_id = %doc.task_id, action, state = %doc.state, "migration task");
        {
            let mut state = self.shared.write();
            state
                .by_product
                .insert(doc.product_key.clone(), doc.task_id.clone());
            let t = state
                .tasks
                .entry(doc.task_id.clone())
                .or_insert_with(|| TaskEntry {
                    doc: doc.clone(),
                    devices: HashMap::new(),
                    log: Vec::new(),
                });
            t.doc = doc.clone();
            t.log.push(entry);
        }
        self.apply_route(&doc);
        self.update_gauge();
        Ok(())
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Wake => {
                // Re-check everything now: expiries (after a clock jump), retries, sweeps.
                self.next_tick = Instant::now();
                self.on_deadline().await;
            }
            Command::SetRate(per_sec, reply) => {
                self.config.devices_per_sec = per_sec;
                self.limiter = limiter_for(per_sec);
                let _ = reply.send(());
            }
            Command::Task {
                task_id,
                request,
                actor,
                reply,
            } => {
                let result = self.handle_task(task_id, request, actor).await;
                let _ = reply.send(result);
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

    async fn handle_task(
        &mut self,
        task_id: String,
        request: Request,
        actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        match request {
            Request::Create(new) => self.create(new, actor).await,
            Request::Delete => self.delete(&task_id, actor).await,
            Request::Configure(config) => self.configure(&task_id, config, actor).await,
            Request::Canary(names) => self.canary(&task_id, names, actor).await,
            Request::Full => self.lifecycle(&task_id, Event::Full, actor).await,
            Request::Pause => self.lifecycle(&task_id, Event::Pause, actor).await,
            Request::Continue => self.lifecycle(&task_id, Event::Continue, actor).await,
            Request::Rollback(sel) => self.rollback(&task_id, sel, actor).await,
            Request::DataSync(on) => self.data_sync(&task_id, on, actor).await,
        }
    }

    async fn create(
        &mut self,
        new: NewTask,
        actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        validate_config(&new.config)?;
        let registry = &self.shared.registry;
        let product = registry.get_product(&new.product_key)?;
        registry.get_instance(&new.target_instance_id)?;
        if new.target_instance_id == product.instance_id {
            return Err(MigrationError::Invalid {
                field: "target_instance_id",
                message: format!(
                    "must differ from the product's instance {:?}",
                    product.instance_id
                ),
            });
        }
        if let Some(existing) = self.existing_task(&new.product_key) {
            return Err(existing);
        }
        let name = match new.name {
            Some(n) if n.trim().is_empty() || n.chars().count() > 64 => {
                return Err(MigrationError::Invalid {
                    field: "name",
                    message: "must be 1..=64 characters".into(),
                })
            }
            Some(n) => n,
            None => format!("migration-{}", new.product_key),
        };
        let now = self.now();
        let task_id = uuid::Uuid::new_v4().to_string();
        let doc = TaskDoc {
            task_id: task_id.clone(),
            name,
            product_key: new.product_key,
            source_instance_id: product.instance_id,
            target_instance_id: new.target_instance_id,
            state: TaskState::ToMigrate,
            config: new.config,
            data_sync: DataSync::default(),
            rollback_all: false,
            halted: false,
            last_error: None,
            created_at_ms: now,
            updated_at_ms: now,
            completed_at_ms: None,
        };
        let detail = format!(
            "task for product {} from {} to {}",
            doc.product_key, doc.source_instance_id, doc.target_instance_id
        );
        self.runtime.insert(task_id.clone(), Runtime::default());
        self.save(doc, actor, "create", None, detail, Vec::new())
            .await?;
        Ok(self.outcome(&task_id, 0, Vec::new()))
    }

    fn existing_task(&self, pk: &str) -> Option<MigrationError> {
        let state = self.shared.read();
        let tid = state.by_product.get(pk)?;
        let t = state.tasks.get(tid)?;
        Some(MigrationError::TaskExists {
            product_key: pk.to_owned(),
            task_id: tid.clone(),
            state: t.doc.state,
            target_instance_id: t.doc.target_instance_id.clone(),
        })
    }

    async fn delete(
        &mut self,
        task_id: &str,
        _actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        let doc = self.doc(task_id)?;
        let in_target = {
            let registry = &self.shared.registry;
            registry
                .device_names_after(&doc.product_key, None, usize::MAX)
                .unwrap_or_default()
                .iter()
                .filter(|dn| {
                    registry.device_instance(&doc.product_key, dn).as_deref()
                        == Some(doc.target_instance_id.as_str())
                })
                .count()
        };
        let deletable = doc.state == TaskState::Completed
            || (doc.state == TaskState::ToMigrate && in_target == 0);
        if !deletable {
            return Err(MigrationError::Conflict(format!(
                "task {task_id} is {} with {in_target} devices in the target; only a COMPLETED task or a TO_MIGRATE task with no device in the target can be deleted",
                doc.state
            )));
        }
        let mut ops = vec![Op::DeleteDoc {
            kind: TASK_DOC,
            id: task_id.to_owned(),
        }];
        {
            let state = self.shared.read();
            if let Some(t) = state.tasks.get(task_id) {
                ops.extend(t.devices.keys().map(|dn| Op::DeleteDoc {
                    kind: DEVICE_DOC,
                    id: device_doc_id(task_id, dn),
                }));
                ops.extend(t.log.iter().map(|l| Op::DeleteDoc {
                    kind: LOG_DOC,
                    id: log_doc_id(task_id, l.seq),
                }));
            }
        }
        self.shared.registry.store().submit(ops).await?;
        {
            let mut state = self.shared.write();
            state.tasks.remove(task_id);
            if state.by_product.get(&doc.product_key).map(String::as_str) == Some(task_id) {
                state.by_product.remove(&doc.product_key);
            }
        }
        self.runtime.remove(task_id);
        let mut off = doc;
        off.data_sync.enabled = false;
        self.apply_route(&off);
        self.update_gauge();
        tracing::info!(task_id, "migration task deleted");
        Ok(None)
    }

    async fn configure(
        &mut self,
        task_id: &str,
        config: MigrationConfig,
        actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        validate_config(&config)?;
        let mut doc = self.doc(task_id)?;
        if config.migration_method != doc.config.migration_method
            && doc.state != TaskState::ToMigrate
        {
            return Err(MigrationError::Conflict(format!(
                "migration_method can only change in TO_MIGRATE; task {task_id} is {}",
                doc.state
            )));
        }
        let detail = format!(
            "migration_method={} resume_mode={} bandwidth_limit_mb={}",
            serde_json::to_value(config.migration_method).unwrap_or_default(),
            serde_json::to_value(config.resume_mode).unwrap_or_default(),
            config
                .bandwidth_limit_mb
                .map_or("none".to_owned(), |b| b.to_string())
        );
        doc.config = config;
        self.save(doc, actor, "config", None, detail, Vec::new())
            .await?;
        Ok(self.outcome(task_id, 0, Vec::new()))
    }

    fn refuse_incremental(doc: &TaskDoc, event: Event) -> Result<(), MigrationError> {
        if doc.config.migration_method == MigrationMethod::IncrementalMigration {
            return Err(MigrationError::Conflict(format!(
                "cannot {event} task {}: its migration_method is incremental_migration (data sync only); set full_migration to move devices",
                doc.task_id
            )));
        }
        Ok(())
    }

    async fn canary(
        &mut self,
        task_id: &str,
        names: Vec<String>,
        actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        let doc = self.doc(task_id)?;
        let t = transition(doc.state, doc.halted, Event::Canary).map_err(refused(task_id))?;
        Self::refuse_incremental(&doc, Event::Canary)?;
        if names.is_empty() {
            return Err(MigrationError::Invalid {
                field: "device_names",
                message: "at least one device is required".into(),
            });
        }
        if names.len() > MAX_PICKED {
            return Err(MigrationError::TooMany {
                field: "device_names",
                max: MAX_PICKED,
            });
        }
        let target = doc.target_instance_id.clone();
        let (accepted, rejected) = check_selection(
            &self.shared.registry,
            &doc.product_key,
            names,
            |dn, owner| {
                if owner == target {
                    Err(format!("device {dn:?} is already in the target instance"))
                } else {
                    Ok(())
                }
            },
        );
        if accepted.is_empty() {
            return Err(no_device_selected("device_names", &rejected));
        }
        let now = self.now();
        let marker = DeviceDoc {
            status: DeviceStatus::Migrating,
            reason: None,
            pending: Some(Pending::Migrate),
            updated_at_ms: now,
        };
        let ops: Vec<Op> = accepted
            .iter()
            .map(|dn| doc_op(DEVICE_DOC, device_doc_id(task_id, dn), &marker))
            .collect();
        let from = doc.state;
        let mut next = doc;
        next.state = t.to;
        next.halted = false;
        let detail = format!(
            "canary of {} devices ({} rows refused)",
            accepted.len(),
            rejected.len()
        );
        self.save(next, actor, "canary", Some(from), detail, ops)
            .await?;
        {
            let mut state = self.shared.write();
            if let Some(t) = state.tasks.get_mut(task_id) {
                for dn in &accepted {
                    t.devices.insert(dn.clone(), marker.clone());
                }
            }
        }
        let rt = self.runtime.entry(task_id.to_owned()).or_default();
        rt.queue = accepted.iter().cloned().collect();
        Ok(self.outcome(task_id, accepted.len(), rejected))
    }

    /// full / pause / continue.
    async fn lifecycle(
        &mut self,
        task_id: &str,
        event: Event,
        actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        let doc = self.doc(task_id)?;
        let t = transition(doc.state, doc.halted, event).map_err(refused(task_id))?;
        if event == Event::Full {
            Self::refuse_incremental(&doc, event)?;
        }
        let from = doc.state;
        let mut next = doc;
        next.state = t.to;
        let was_halted = next.halted;
        if t.clears_halt {
            next.halted = false;
        }
        let detail = if was_halted && event == Event::Continue {
            format!(
                "resumed after a fault: {}",
                next.last_error.as_deref().unwrap_or("unknown")
            )
        } else {
            String::new()
        };
        self.save(next, actor, event.as_str(), Some(from), detail, Vec::new())
            .await?;
        let rt = self.runtime.entry(task_id.to_owned()).or_default();
        if event != Event::Pause {
            // A fresh start or a resume retries at once and walks from the beginning.
            rt.retry_at = None;
            rt.backoff = None;
            rt.cursor = Cursor::default();
        }
        Ok(self.outcome(task_id, 0, Vec::new()))
    }

    async fn rollback(
        &mut self,
        task_id: &str,
        selection: RollbackSelection,
        actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        let doc = self.doc(task_id)?;
        let t = transition(doc.state, doc.halted, Event::Rollback).map_err(refused(task_id))?;
        match self.shared.registry.get_product(&doc.product_key) {
            Ok(p) if p.instance_id == doc.source_instance_id => {}
            _ => {
                return Err(MigrationError::SourceProductGone {
                    product_key: doc.product_key.clone(),
                    source_instance_id: doc.source_instance_id.clone(),
                })
            }
        }
        let now = self.now();
        let mut ops = Vec::new();
        let mut marked: Vec<(String, DeviceDoc)> = Vec::new();
        // Canary markers of devices never moved are dropped: they go back to NOT_MIGRATED.
        let stale_markers: Vec<String> = {
            let state = self.shared.read();
            state
                .tasks
                .get(task_id)
                .map(|t| {
                    t.devices
                        .iter()
                        .filter(|(_, d)| d.pending == Some(Pending::Migrate))
                        .map(|(dn, _)| dn.clone())
                        .collect()
                })
                .unwrap_or_default()
        };
        for dn in &stale_markers {
            ops.push(Op::DeleteDoc {
                kind: DEVICE_DOC,
                id: device_doc_id(task_id, dn),
            });
        }
        let (all, accepted, rejected) = match selection {
            RollbackSelection::All => (true, Vec::new(), Vec::new()),
            RollbackSelection::Picked(names) => {
                if names.is_empty() {
                    return Err(MigrationError::Invalid {
                        field: "device_names",
                        message: "at least one device is required (or {\"all\":true})".into(),
                    });
                }
                if names.len() > MAX_PICKED {
                    return Err(MigrationError::TooMany {
                        field: "device_names",
                        max: MAX_PICKED,
                    });
                }
                let target = doc.target_instance_id.clone();
                let (accepted, rejected) = check_selection(
                    &self.shared.registry,
                    &doc.product_key,
                    names,
                    |dn, owner| {
                        if owner == target {
                            Ok(())
                        } else {
                            Err(format!(
                                "device {dn:?} is not migrated; nothing to roll back"
                            ))
                        }
                    },
                );
                if accepted.is_empty() {
                    return Err(no_device_selected("device_names", &rejected));
                }
                {
                    let state = self.shared.read();
                    let devices = state.tasks.get(task_id).map(|t| &t.devices);
                    for dn in &accepted {
                        let mut d = devices
                            .and_then(|m| m.get(dn))
                            .cloned()
                            .unwrap_or(DeviceDoc {
                                status: DeviceStatus::Migrated,
                                reason: None,
                                pending: None,
                                updated_at_ms: now,
                            });
                        d.pending = Some(Pending::Rollback);
                        ops.push(doc_op(DEVICE_DOC, device_doc_id(task_id, dn), &d));
                        marked.push((dn.clone(), d));
                    }
                }
                (false, accepted, rejected)
            }
        };
        let from = doc.state;
        let mut next = doc;
        next.state = t.to;
        next.halted = false;
        next.rollback_all = all;
        let detail = if all {
            "rollback of all devices".to_owned()
        } else {
            format!(
                "rollback of {} devices ({} rows refused)",
                accepted.len(),
                rejected.len()
            )
        };
        self.save(next, actor, "rollback", Some(from), detail, ops)
            .await?;
        {
            let mut state = self.shared.write();
            if let Some(t) = state.tasks.get_mut(task_id) {
                for dn in &stale_markers {
                    t.devices.remove(dn);
                }
                for (dn, d) in marked {
                    t.devices.insert(dn, d);
                }
            }
        }
        let rt = self.runtime.entry(task_id.to_owned()).or_default();
        rt.queue = accepted.iter().cloned().collect();
        rt.cursor = Cursor::default();
        rt.retry_at = None;
        rt.backoff = None;
        rt.sweeping = false;
        Ok(self.outcome(task_id, accepted.len(), rejected))
    }

    async fn data_sync(
        &mut self,
        task_id: &str,
        on: bool,
        actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        // Settle an expiry first, so "on" after 30 days is a fresh start and "off" is a no-op.
        self.expire_data_sync().await;
        let mut doc = self.doc(task_id)?;
        let now = self.now();
        let ds = &mut doc.data_sync;
        if on {
            if ds.locked {
                return Err(MigrationError::Conflict(format!(
                    "data sync of task {task_id} was turned off after the task COMPLETED and cannot be turned on again"
                )));
            }
            if ds.active(now) {
                return Ok(self.outcome(task_id, 0, Vec::new()));
            }
            ds.enabled = true;
            ds.enabled_at_ms = Some(now);
            ds.disabled_at_ms = None;
            ds.disabled_reason = None;
            let detail = format!("data sync on until {}", now + DATA_SYNC_MS);
            self.save(doc, actor, "data_sync_on", None, detail, Vec::new())
                .await?;
        } else {
            if !ds.enabled {
                return Ok(self.outcome(task_id, 0, Vec::new()));
            }
            ds.enabled = false;
            ds.disabled_at_ms = Some(now);
            ds.disabled_reason = Some("operator".into());
            let locked = doc.state == TaskState::Completed;
            doc.data_sync.locked = locked;
            let detail = if locked {
                "data sync off (after COMPLETED: cannot be turned on again)".to_owned()
            } else {
                "data sync off".to_owned()
            };
            self.save(doc, actor, "data_sync_off", None, detail, Vec::new())
                .await?;
        }
        Ok(self.outcome(task_id, 0, Vec::new()))
    }

    // ----- device work -----

    /// The next batch, round-robin over tasks with work; `Finish` when a running task's work
    /// is done.
    fn next_job(&mut self) -> Next {
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

    async fn run_batch(&mut self, job: Job) {
        let now = self.now();
        let done = DeviceDoc {
            status: job.status,
            reason: None,
            pending: None,
            updated_at_ms: now,
        };
        let tid = job.task_id.clone();
        let result = self
            .shared
            .registry
            .set_devices_instance(&job.product_key, &job.names, &job.to_instance, |dn| {
                vec![doc_op(DEVICE_DOC, device_doc_id(&tid, dn), &done)]
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
        let mut moved: Vec<String> = Vec::with_capacity(results.len());
        let mut gone: Vec<String> = Vec::new();
        let mut fault: Option<String> = None;
        let mut kicks: Vec<String> = Vec::new();
        for (dn, r) in job.names.iter().zip(results) {
            match r {
                Ok(device) => {
                    if device.online {
                        kicks.push(dn.clone());
                    }
                    moved.push(dn.clone());
                }
                Err(RegistryError::NotFound { .. }) => gone.push(dn.clone()),
                Err(e) => {
                    fault.get_or_insert_with(|| e.to_string());
                }
            }
        }
        // Devices that vanished are recorded as FAILED (best effort; a restart re-derives).
        let failed_doc = DeviceDoc {
            status: DeviceStatus::Failed,
            reason: Some("device no longer exists".into()),
            pending: None,
            updated_at_ms: now,
        };
        if !gone.is_empty() {
            let ops = gone
                .iter()
                .map(|dn| doc_op(DEVICE_DOC, device_doc_id(&tid, dn), &failed_doc))
                .collect();
            if let Err(e) = self.shared.registry.store().submit(ops).await {
                tracing::warn!(task_id = %tid, error = %e, "cannot record vanished devices");
            }
        }
        {
            let mut state = self.shared.write();
            if let Some(t) = state.tasks.get_mut(&tid) {
                for dn in &moved {
                    t.devices.insert(dn.clone(), done.clone());
                }
                for dn in &gone {
                    t.devices.insert(dn.clone(), failed_doc.clone());
                }
                if fault.is_none() {
                    t.doc.last_error = None;
                }
            }
        }
        let result_label = if job.status == DeviceStatus::RolledBack {
            "rolled_back"
        } else {
            "migrated"
        };
        self.metrics
            .migration_devices
            .get_or_create(&[("result", result_label)])
            .inc_by(moved.len() as u64);
        self.metrics
            .migration_devices
            .get_or_create(&[("result", "failed")])
            .inc_by(gone.len() as u64);
        for dn in &kicks {
            (self.hooks.kick)(&job.product_key, dn);
        }
        self.metrics.migration_kicks.inc_by(kicks.len() as u64);
        let rt = self.runtime.entry(tid.clone()).or_default();
        if job.from_queue {
            let handled: HashSet<&String> = moved.iter().chain(gone.iter()).collect();
            rt.queue.retain(|dn| !handled.contains(dn));
        } else if let Some(c) = job.cursor {
            rt.cursor = c;
        }
        if rt.sweeping {
            rt.swept += moved.len() as u64;
        }
        match fault {
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

    /// A store fault while moving devices: retry later (auto) or halt (manual).
    async fn fault(&mut self, task_id: &str, error: String) {
        self.metrics.migration_faults.inc();
        let Ok(mut doc) = self.doc(task_id) else {
            return;
        };
        tracing::warn!(task_id, error = %error, resume_mode = ?doc.config.resume_mode, "migration fault");
        doc.last_error = Some(error.clone());
        let rt = self.runtime.entry(task_id.to_owned()).or_default();
        match doc.config.resume_mode {
            ResumeMode::Auto => {
                let backoff = rt
                    .backoff
                    .map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
                rt.backoff = Some(backoff);
                rt.retry_at = Some(Instant::now() + backoff);
                // Recorded in memory only: the store just failed, and the next successful batch
                // clears it anyway.
                let mut state = self.shared.write();
                if let Some(t) = state.tasks.get_mut(task_id) {
                    t.doc.last_error =
                        Some(format!("{error} (retrying in {}s)", backoff.as_secs()));
                }
            }
            ResumeMode::Manual => {
                doc.halted = true;
                let detail = format!("halted until continue: {error}");
                if let Err(e) = self
                    .save(
                        doc.clone(),
                        Actor::system(),
                        "halted",
                        None,
                        detail,
                        Vec::new(),
                    )
                    .await
                {
                    // Halt in memory at least; the store is failing right now.
                    tracing::error!(task_id, error = %e, "cannot persist the halt");
                    let mut state = self.shared.write();
                    if let Some(t) = state.tasks.get_mut(task_id) {
                        t.doc = doc;
                    }
                }
            }
        }
    }

    /// The running state's work is done: apply `Finished`.
    async fn finish(&mut self, task_id: &str) {
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

    async fn sweep_done(&mut self, task_id: &str) {
        let rt = self.runtime.entry(task_id.to_owned()).or_default();
        rt.sweeping = false;
        let swept = std::mem::take(&mut rt.swept);
        if swept == 0 {
            return;
        }
        let Ok(doc) = self.doc(task_id) else {
            return;
        };
        let detail = format!("moved {swept} devices created in the source after COMPLETED");
        if let Err(e) = self
            .save(doc, Actor::system(), "swept", None, detail, Vec::new())
            .await
        {
            tracing::warn!(task_id, error = %e, "cannot log the sweep");
        }
    }
}

fn refused(task_id: &str) -> impl FnOnce(Refused) -> MigrationError + '_ {
    move |r| MigrationError::Refused {
        task_id: task_id.to_owned(),
        refused: r,
    }
}

fn no_device_selected(field: &'static str, rejected: &[RejectedRow]) -> MigrationError {
    let examples: Vec<String> = rejected
        .iter()
        .take(3)
        .map(|r| format!("row {}: {}", r.row, r.error_msg))
        .collect();
    MigrationError::Invalid {
        field,
        message: format!(
            "no usable device in the selection ({} refused; {})",
            rejected.len(),
            examples.join("; ")
        ),
    }
}

/// `bandwidth_limit_mb` within 1..=10240.
pub fn validate_config(config: &MigrationConfig) -> Result<(), MigrationError> {
    if let Some(b) = config.bandwidth_limit_mb {
        if !BANDWIDTH_MB_RANGE.contains(&b) {
            return Err(MigrationError::Invalid {
                field: "bandwidth_limit_mb",
                message: format!(
                    "must be an integer from {} to {}",
                    BANDWIDTH_MB_RANGE.start(),
                    BANDWIDTH_MB_RANGE.end()
                ),
            });
        }
    }
    Ok(())
}
