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

mod batch;
mod fault;
mod routes;
mod sweep;

use super::command::{Command, NewTask, Outcome, Request, RollbackSelection};
use super::config::{EngineConfig, Hooks};
use super::docs::{device_doc_id, doc_op, log_doc_id, DEVICE_DOC, LOG_DOC, TASK_DOC};
use super::machine::{transition, Event, Refused};
use super::model::*;
use super::shared::{details, Shared, TaskEntry};
use super::MigrationError;
use crate::metrics::Metrics;
use crate::registry::Registry;
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
            Command::DeviceDeleted {
                product_key,
                device_name,
                reply,
            } => {
                let tasks: Vec<String> = self
                    .shared
                    .read()
                    .tasks
                    .values()
                    .filter(|t| t.doc.product_key == product_key)
                    .map(|t| t.doc.task_id.clone())
                    .collect();
                for tid in tasks {
                    self.forget_devices(&tid, std::slice::from_ref(&device_name), "deleted")
                        .await;
                }
                let _ = reply.send(());
            }
        }
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
        // Canary markers of devices never moved are dropped: they go back to NOT_MIGRATED; so
        // do failed moves of devices still in the source.
        let stale_markers: Vec<String> = {
            let registry = &self.shared.registry;
            let state = self.shared.read();
            state
                .tasks
                .get(task_id)
                .map(|t| {
                    t.devices
                        .iter()
                        .filter(|(dn, d)| {
                            d.pending == Some(Pending::Migrate)
                                || (d.status == DeviceStatus::Failed
                                    && registry.device_instance(&doc.product_key, dn).as_deref()
                                        != Some(doc.target_instance_id.as_str()))
                        })
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
