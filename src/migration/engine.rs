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
//! The actor's loop (`worker::Worker::run`) waits on, in this order: shutdown, a command, the next
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
//! The std `RwLock` around `State` is only ever held in synchronous blocks (never across
//! `.await`); the actor is its only writer.

use super::command::{Command, NewTask, Outcome, Request, RollbackSelection};
use super::config::{EngineConfig, Hooks};
pub use super::docs::{DEVICE_DOC, LOG_DOC, TASK_DOC};
use super::model::*;
use super::shared::{apply_route, details, device_statuses, Shared, State, TaskEntry};
use super::MigrationError;
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::registry::{DeviceChange, DeviceObserver, ObserverFuture, Page, Paged, Registry};
use crate::store::Store;
use dashmap::DashMap;
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

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

/// The migration engine. Share it as `Arc<MigrationEngine>`.
///
/// On one node its actor runs from [`MigrationEngine::start`] to [`MigrationEngine::shutdown`].
/// In a cluster ([`MigrationEngine::standby`]) only the holder of the engines' lease runs it
/// ([`MigrationEngine::activate`] / [`MigrationEngine::deactivate`]); the other nodes keep a
/// read-only mirror of the tasks, device records and logs, kept current from the change feed
/// ([`MigrationEngine::mirror_changed`]), so data-sync routes, device details and the console
/// are right on every node, and they answer changes with [`MigrationError::Standby`].
pub struct MigrationEngine {
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    config: EngineConfig,
    /// The device-move rate in force ([`Self::set_rate`]), kept for the next term's actor.
    rate: AtomicU32,
    hooks: Hooks,
    actor: std::sync::Mutex<Option<Running>>,
    /// From the start of [`Self::activate`] to the end of [`Self::deactivate`]: the actor (or
    /// the load before it) owns the state, and feed changes are not mirrored.
    driving: AtomicBool,
}

/// The running actor: its mailbox, its stop signal and its task.
struct Running {
    tx: mpsc::Sender<Command>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for MigrationEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationEngine")
            .field("tasks", &self.shared.read().tasks.len())
            .finish_non_exhaustive()
    }
}

impl MigrationEngine {
    /// Loads every task from the registry's store (blocking: start-up only) and starts the
    /// actor, which resumes running tasks at once. Every timestamp comes from `clock`
    /// (the actor's own timers — batches, retries, the sweep tick — run on tokio time).
    pub fn start(
        registry: Arc<Registry>,
        store: Store,
        metrics: Arc<Metrics>,
        config: EngineConfig,
        hooks: Hooks,
        clock: Clock,
    ) -> Result<Arc<MigrationEngine>, MigrationError> {
        let engine = Self::standby(registry, store, metrics, config, hooks, clock)?;
        engine.driving.store(true, Ordering::Release);
        engine.start_actor();
        Ok(engine)
    }

    /// Cluster mode: loads every task (blocking: start-up only) as a read-only mirror, with
    /// its data-sync routes, and runs no actor until [`Self::activate`]. `store` is fenced by
    /// the engines' lease: a node that lost its term cannot write.
    pub fn standby(
        registry: Arc<Registry>,
        store: Store,
        metrics: Arc<Metrics>,
        config: EngineConfig,
        hooks: Hooks,
        clock: Clock,
    ) -> Result<Arc<MigrationEngine>, MigrationError> {
        let state = State::load(&store, &registry)?;
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            routes: DashMap::new(),
            clock,
            registry,
            store,
        });
        let engine = Arc::new(MigrationEngine {
            shared,
            metrics,
            rate: AtomicU32::new(config.devices_per_sec),
            config,
            hooks,
            actor: std::sync::Mutex::new(None),
            driving: AtomicBool::new(false),
        });
        engine.rebuild_routes();
        engine
            .shared
            .registry
            .add_observer(Arc::new(DeviceObserverImpl(Arc::downgrade(&engine))));
        Ok(engine)
    }

    /// Starts an actor on the state loaded now; it resumes running tasks at once.
    fn start_actor(&self) {
        let config = EngineConfig {
            devices_per_sec: self.rate.load(Ordering::Relaxed),
            ..self.config
        };
        let mut worker = super::worker::Worker::new(
            self.shared.clone(),
            self.metrics.clone(),
            config,
            self.hooks.clone(),
        );
        worker.rebuild_after_load();
        let (tx, rx) = mpsc::channel(256);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(worker.run(rx, stop_rx));
        let state = self.shared.read();
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
        drop(state);
        *self.actor_slot() = Some(Running { tx, stop, task });
    }

    fn actor_slot(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.actor.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The actor's mailbox; [`MigrationError::Standby`] while another node drives the engine.
    fn sender(&self) -> Result<mpsc::Sender<Command>, MigrationError> {
        self.actor_slot()
            .as_ref()
            .map(|a| a.tx.clone())
            .ok_or(MigrationError::Standby)
    }

    /// Cluster mode: this node took the engines' lease. Reloads every task from the store
    /// (what the previous holder committed — batch boundaries are durable) and starts the
    /// actor, which resumes running tasks where they stand.
    pub async fn activate(&self) -> Result<(), MigrationError> {
        self.driving.store(true, Ordering::Release);
        self.stop_actor().await;
        self.reload().await?;
        self.start_actor();
        tracing::info!("migration engine active on this node");
        Ok(())
    }

    /// Cluster mode: this node lost (or gave up) the lease. The actor stops after its batch
    /// in flight (whose writes the fence refuses once the term is over) and the state is
    /// reloaded from the store as the mirror the feed keeps current from now on.
    pub async fn deactivate(&self) {
        if !self.driving.load(Ordering::Acquire) {
            return;
        }
        self.stop_actor().await;
        if let Err(error) = self.reload().await {
            // The next resync of the feed reloads the mirror again.
            tracing::warn!(%error, "cannot reload the migration mirror");
        }
        self.driving.store(false, Ordering::Release);
        tracing::warn!("migration engine in standby on this node (another node drives it)");
    }

    /// Whether this node's actor drives the engine (always, on one node).
    pub fn is_driving(&self) -> bool {
        self.driving.load(Ordering::Acquire)
    }

    /// Replaces the state with the store's and rebuilds the routes from it.
    async fn reload(&self) -> Result<(), MigrationError> {
        let (store, registry) = (self.shared.store.clone(), self.shared.registry.clone());
        let state = tokio::task::spawn_blocking(move || State::load(&store, &registry))
            .await
            .map_err(|e| {
                MigrationError::Conflict(format!("loading migration tasks failed: {e}"))
            })??;
        *self.shared.write() = state;
        self.rebuild_routes();
        Ok(())
    }

    /// Every data-sync route from the tasks in memory (the targets' mirror limits with them).
    fn rebuild_routes(&self) {
        let targets: Vec<String> = self
            .shared
            .routes
            .iter()
            .map(|r| r.target.clone())
            .collect();
        self.shared.routes.clear();
        for target in targets {
            (self.hooks.set_rate_limit)(&target, None);
        }
        let docs: Vec<TaskDoc> = self
            .shared
            .read()
            .tasks
            .values()
            .map(|t| t.doc.clone())
            .collect();
        for doc in &docs {
            apply_route(&self.shared, &self.hooks, doc);
        }
    }

    async fn stop_actor(&self) {
        let actor = self.actor_slot().take();
        if let Some(actor) = actor {
            let _ = actor.stop.send(true);
            if let Err(e) = actor.task.await {
                tracing::error!(error = %e, "migration actor failed");
            }
        }
    }

    /// The engine's clock (tests advance it, see [`Clock::advance`]; then [`Self::wake`]).
    pub fn clock(&self) -> &Clock {
        &self.shared.clock
    }

    /// Makes the actor re-read the clock now (after [`Clock::advance`]).
    pub fn wake(&self) {
        if let Ok(tx) = self.sender() {
            let _ = tx.try_send(Command::Wake);
        }
    }

    /// Changes the device-move rate (devices/s over all tasks; 0 = unthrottled).
    pub async fn set_rate(&self, devices_per_sec: u32) -> Result<(), MigrationError> {
        self.rate.store(devices_per_sec, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(Command::SetRate(devices_per_sec, reply))
            .await
            .map_err(|_| MigrationError::Stopped)?;
        rx.await.map_err(|_| MigrationError::Stopped)
    }

    /// Stops the actor after the batch in flight (everything it did is already durable).
    pub async fn shutdown(&self) {
        self.stop_actor().await;
    }

    async fn call(
        &self,
        task_id: &str,
        request: Request,
        actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
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

    // ----- the mirror (cluster mode, standby) -----

    /// Cluster mode: another node wrote (or deleted) the migration document `kind`/`id`;
    /// `body` is what the store holds now. Applied to the mirror while this node does not
    /// drive the engine; ignored while it does (its actor is the only writer then).
    pub fn mirror_changed(&self, kind: &str, id: &str, body: Option<&str>) {
        if !self.is_driving() {
            super::mirror::changed(&self.shared, &self.hooks, kind, id, body);
        }
    }

    /// Cluster mode: every migration document of `kind` now (after a resync of the feed).
    pub fn mirror_reloaded(&self, kind: &str, docs: &[(String, String)]) {
        if !self.is_driving() {
            super::mirror::reloaded(&self.shared, &self.hooks, kind, docs);
        }
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

    /// The task's devices by name (every device of the product), filtered by status and
    /// name substring. A deleted device leaves the list (and the totals).
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

    /// The device's status in its product's migration task; `None` when the product has no
    /// task (never migrated, or its task was deleted) or the device does not exist. A device
    /// without a record is `NOT_MIGRATED`.
    pub fn device_status(
        &self,
        product_key: &str,
        device_name: &str,
    ) -> Option<DeviceMigrationStatus> {
        self.shared
            .registry
            .device_instance(product_key, device_name)?;
        let state = self.shared.read();
        let entry = state.tasks.get(state.by_product.get(product_key)?)?;
        let doc = &entry.doc;
        let record = entry.devices.get(device_name);
        Some(DeviceMigrationStatus {
            task_id: doc.task_id.clone(),
            task_state: doc.state,
            source_instance_id: doc.source_instance_id.clone(),
            target_instance_id: doc.target_instance_id.clone(),
            status: record.map_or(DeviceStatus::NotMigrated, |d| d.status),
            reason: record.and_then(|d| d.reason.clone()),
            updated_at_ms: record.map(|d| d.updated_at_ms),
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

    /// The tasks that still need `instance_id` as their source or target, `(task_id, state)`
    /// by task id: every task not `COMPLETED`, and a `COMPLETED` one while its data sync is on
    /// (it still mirrors to its target). Deleting the instance is refused while there are any.
    pub fn unfinished_tasks_naming(&self, instance_id: &str) -> Vec<(String, TaskState)> {
        let now = self.shared.clock.now_ms();
        let state = self.shared.read();
        let mut tasks: Vec<(String, TaskState)> = state
            .tasks
            .values()
            .filter(|t| {
                (t.doc.source_instance_id == instance_id || t.doc.target_instance_id == instance_id)
                    && (t.doc.state != TaskState::Completed || t.doc.data_sync.active(now))
            })
            .map(|t| (t.doc.task_id.clone(), t.doc.state))
            .collect();
        tasks.sort_by(|a, b| a.0.cmp(&b.0));
        tasks
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

/// The registry observer of the engine: a deleted device leaves its product's task. Weak, so
/// the registry (which holds its observers) does not keep the engine alive.
struct DeviceObserverImpl(std::sync::Weak<MigrationEngine>);

impl DeviceObserver for DeviceObserverImpl {
    fn device_changed<'a>(&'a self, change: &'a DeviceChange) -> ObserverFuture<'a> {
        Box::pin(async move {
            let Some(engine) = self.0.upgrade() else {
                return;
            };
            match change {
                DeviceChange::Deleted {
                    product_key,
                    device_name,
                    ..
                } => {
                    let (reply, rx) = oneshot::channel();
                    let cmd = Command::DeviceDeleted {
                        product_key: product_key.clone(),
                        device_name: device_name.clone(),
                        reply,
                    };
                    // A stopped actor (shutdown) hears of it at the next start instead; a
                    // standby node's mirror hears of the holder's record deletion by the feed.
                    let Ok(tx) = engine.sender() else {
                        return;
                    };
                    if tx.send(cmd).await.is_ok() {
                        let _ = rx.await;
                    }
                }
                // New devices are NOT_MIGRATED (walks and sweeps find them); tags and being
                // enabled do not matter.
                DeviceChange::Created { .. }
                | DeviceChange::TagsChanged { .. }
                | DeviceChange::Disabled { .. } => {}
            }
        })
    }
}
