//! The state the engine's actor writes and everybody else reads: every task with its device
//! records and log ([`State`] behind a std `RwLock`), the data-sync routes the forwarder reads
//! on its hot path, and how a task becomes the [`TaskDetails`] the API returns. A leaf: the
//! engine (reads) and the worker (writes) both use it, and it uses neither.
//!
//! The lock is only ever held in synchronous blocks (never across `.await`); the actor is its
//! only writer. [`State::load`] rebuilds it from the store at start.

use super::config::Hooks;
use super::docs::{device_doc_id, parse_doc, DEVICE_DOC, LOG_DOC, TASK_DOC};
use super::model::*;
use super::MigrationError;
use crate::clock::Clock;
use crate::registry::Registry;
use crate::store::{Op, Store};
use dashmap::DashMap;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub(super) struct TaskEntry {
    pub(super) doc: TaskDoc,
    pub(super) devices: HashMap<String, DeviceDoc>,
    pub(super) log: Vec<LogEntry>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) tasks: BTreeMap<String, TaskEntry>,
    pub(super) by_product: HashMap<String, String>,
}

/// Where data of a product's not-yet-migrated devices is mirrored while data sync is on.
#[derive(Debug, Clone)]
pub(super) struct SyncRoute {
    pub(super) target: String,
    pub(super) expires_at_ms: i64,
}

pub(super) struct Shared {
    pub(super) state: RwLock<State>,
    pub(super) routes: DashMap<String, SyncRoute>,
    pub(super) clock: Clock,
    pub(super) registry: Arc<Registry>,
    /// Where the tasks, their device records and logs are kept.
    pub(super) store: Store,
}

impl Shared {
    pub(super) fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Inserts a task's document, or replaces it (its records and log stay); the product's
    /// task is this one from now on.
    pub(super) fn put_task(&mut self, doc: TaskDoc) -> &mut TaskEntry {
        self.by_product
            .insert(doc.product_key.clone(), doc.task_id.clone());
        match self.tasks.entry(doc.task_id.clone()) {
            std::collections::btree_map::Entry::Occupied(slot) => {
                let entry = slot.into_mut();
                entry.doc = doc;
                entry
            }
            std::collections::btree_map::Entry::Vacant(slot) => slot.insert(TaskEntry {
                doc,
                devices: HashMap::new(),
                log: Vec::new(),
            }),
        }
    }

    /// Every task with its device records and log, from `store` (blocking: start-up only).
    /// Records of devices that no longer exist (in `registry`) are dropped on the way.
    pub(super) fn load(store: &Store, registry: &Registry) -> Result<State, MigrationError> {
        let mut state = State::default();
        for (id, body) in store.load_documents(TASK_DOC)? {
            if let Some(doc) = parse_doc::<TaskDoc>(TASK_DOC, &id, &body) {
                state.put_task(doc);
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
        // Records of devices deleted while the actor could not hear of it (a crash between the
        // registry's commit and ours) go now: the device is gone, or a device re-created under
        // the same name is newer than the record (it starts NOT_MIGRATED). Not awaited: if this
        // does not commit, the next start does it again.
        let mut forgotten = Vec::new();
        for (tid, entry) in state.tasks.iter_mut() {
            let pk = entry.doc.product_key.clone();
            entry.devices.retain(|dn, doc| {
                let exists = registry
                    .get_device(&pk, dn)
                    .is_ok_and(|d| d.created_at_ms <= doc.updated_at_ms);
                if !exists {
                    forgotten.push(Op::DeleteDoc {
                        kind: DEVICE_DOC,
                        id: device_doc_id(tid, dn),
                    });
                }
                exists
            });
        }
        if !forgotten.is_empty() {
            tracing::info!(
                devices = forgotten.len(),
                "migration records of deleted devices dropped"
            );
            drop(store.submit(forgotten));
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
        Ok(state)
    }
}

/// Every device of the task with its status: the product's devices, sorted by name (no doc =
/// NOT_MIGRATED). Records of deleted devices are dropped when the deletion is heard of, and
/// are never listed or counted meanwhile.
pub(super) fn device_statuses(
    registry: &Registry,
    entry: &TaskEntry,
) -> Vec<(String, DeviceStatus, Option<DeviceDoc>)> {
    let names = registry
        .device_names_after(&entry.doc.product_key, None, usize::MAX)
        .unwrap_or_default();
    names
        .into_iter()
        .map(|dn| {
            let doc = entry.devices.get(&dn).cloned();
            let status = doc.as_ref().map_or(DeviceStatus::NotMigrated, |d| d.status);
            (dn, status, doc)
        })
        .collect()
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

/// Installs or removes the product's data-sync route (what the forwarder mirrors to the
/// target) and the target's bandwidth limit, as `doc` says now.
pub(super) fn apply_route(shared: &Shared, hooks: &Hooks, doc: &TaskDoc) {
    let now = shared.clock.now_ms();
    if doc.data_sync.active(now) {
        let expires_at_ms = doc.data_sync.expires_at_ms().unwrap_or(now);
        shared.routes.insert(
            doc.product_key.clone(),
            SyncRoute {
                target: doc.target_instance_id.clone(),
                expires_at_ms,
            },
        );
        (hooks.set_rate_limit)(
            &doc.target_instance_id,
            doc.config
                .bandwidth_limit_mb
                .map(|mb| u64::from(mb) * 1024 * 1024),
        );
    } else {
        remove_route(shared, hooks, doc);
    }
}

/// Removes the product's data-sync route to `doc`'s target, if it has one.
pub(super) fn remove_route(shared: &Shared, hooks: &Hooks, doc: &TaskDoc) {
    if shared
        .routes
        .remove_if(&doc.product_key, |_, r| r.target == doc.target_instance_id)
        .is_some()
    {
        (hooks.set_rate_limit)(&doc.target_instance_id, None);
    }
}

pub(super) fn details(shared: &Shared, entry: &TaskEntry) -> TaskDetails {
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
