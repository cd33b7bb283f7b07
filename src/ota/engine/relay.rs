//! Cluster mode: the engine runs on ONE node at a time, the holder of the `ENGINES` lease
//! (docs/CLUSTER.md, "Engines").
//!
//! Every node builds an engine; in cluster mode it starts in **standby**
//! ([`OtaEngine::open_standby`]): empty, no deadline task, and what devices report to it
//! (connects, progress, version reports, `firmware/get`, registry changes) is handed to its
//! [`Relay`], which takes it to the holder. The node that takes the lease calls
//! [`OtaEngine::activate`]: every job and task is read back from the store (the shared
//! PostgreSQL database), every timer re-armed, and the tasks are **reconciled** with the
//! devices as the registry knows them now — a version report or a connect that reached no
//! holder during a takeover is applied then. A node that loses the lease calls
//! [`OtaEngine::deactivate`]: the deadline task of that term ends and the maps are emptied, so
//! nothing of it can fire again; its writes would be refused anyway (the engine writes through
//! a store handle fenced with the lease, [`crate::store::Store::fenced`]).
//!
//! [`OtaEngine::handle_report`] is the holder's side of the relay: it applies a forwarded
//! report exactly as if the device were connected here.

use super::{lock, Inner, OtaEngine};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::ota::firmware::FirmwareRepo;
use crate::ota::task::{Event, QueueReason, TaskStatus};
use crate::ota::{EngineConfig, OtaError, Pusher};
use crate::registry::Registry;
use crate::store::Store;
use fleetgate_topics::{ProgressStep, UpgradeData};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

/// What a device (or the registry) told a node that does not drive the engine. Progress,
/// `firmware/get`, deletions and joins are relayed to the driving node ([`Relay`]); connects
/// and version reports reach it by the change feed, which carries them anyway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceReport {
    /// The device connected.
    Online { pk: String, dn: String },
    /// `/ota/device/progress`.
    Progress {
        pk: String,
        dn: String,
        module: String,
        step: ProgressStep,
    },
    /// `/ota/device/inform`, after the registry stored it.
    Version {
        pk: String,
        dn: String,
        module: String,
        version: String,
    },
    /// `firmware/get`: the answer is the reply.
    FirmwareGet {
        pk: String,
        dn: String,
        module: String,
    },
    /// The device was deleted (its unfinished tasks end CANCELED).
    Deleted {
        pk: String,
        dn: String,
        instance_id: Option<String>,
    },
    /// Devices created, or a device's tags changed: DYNAMIC jobs consider them.
    Joinable { pk: String, dns: Vec<String> },
}

impl DeviceReport {
    /// The device it is about (for keeping one device's reports in order).
    pub fn device(&self) -> (&str, &str) {
        match self {
            DeviceReport::Online { pk, dn }
            | DeviceReport::Progress { pk, dn, .. }
            | DeviceReport::Version { pk, dn, .. }
            | DeviceReport::FirmwareGet { pk, dn, .. }
            | DeviceReport::Deleted { pk, dn, .. } => (pk, dn),
            DeviceReport::Joinable { pk, dns } => (pk, dns.first().map_or("", String::as_str)),
        }
    }
}

/// What the driving node did with a relayed report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Applied (what it changed is stored); the answer of a `firmware/get`.
    Applied(Option<UpgradeData>),
    /// This node does not drive the engine (any more), or a change it made could not be
    /// stored (the lease's term ended meanwhile): the sender should ask the next holder.
    NotApplied,
}

/// Takes reports to the node that drives the engine. The answer matters only for
/// [`DeviceReport::FirmwareGet`]; `None` when there is no upgrade, or no holder right now (the
/// next holder reconciles from the registry when it takes over).
pub trait Relay: Send + Sync + 'static {
    fn forward(&self, report: DeviceReport) -> BoxFuture<'_, Option<UpgradeData>>;
}

impl OtaEngine {
    /// Cluster mode: an engine in standby, empty until [`OtaEngine::activate`]; writes go
    /// through `store` (fenced with the `ENGINES` lease) and reports go to `relay` meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub fn open_standby(
        registry: Arc<Registry>,
        store: Store,
        firmware: Arc<FirmwareRepo>,
        pusher: Arc<dyn Pusher>,
        clock: Clock,
        config: EngineConfig,
        metrics: Arc<Metrics>,
        relay: Arc<dyn Relay>,
    ) -> OtaEngine {
        let engine = OtaEngine::build(registry, store, firmware, pusher, clock, config, metrics);
        engine.inner.driving.store(false, Ordering::SeqCst);
        *engine
            .inner
            .relay
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(relay);
        engine
            .inner
            .registry
            .add_observer(Arc::new(super::device::DeviceObserverImpl(Arc::downgrade(
                &engine.inner,
            ))));
        engine
    }

    /// Whether this node drives the engine now (always on one node).
    pub fn driving(&self) -> bool {
        self.inner.driving.load(Ordering::Acquire)
    }

    /// Hands a report to the driving node; `None` without a relay.
    pub(super) async fn relay(&self, report: DeviceReport) -> Option<UpgradeData> {
        let relay = self
            .inner
            .relay
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        relay.forward(report).await
    }

    /// This node took the lease: loads every job and task from the store, re-arms every
    /// timer, starts the deadline task and reconciles the tasks with the registry.
    pub async fn activate(&self) -> Result<(), OtaError> {
        let engine = self.clone();
        tokio::task::spawn_blocking(move || {
            engine.reset();
            engine.inner.firmware.reload()?;
            engine.load()
        })
        .await
        .map_err(|e| OtaError::Conflict(format!("loading the OTA engine failed: {e}")))??;
        self.inner.term.fetch_add(1, Ordering::SeqCst);
        self.inner.driving.store(true, Ordering::Release);
        *lock(&self.inner.term_task) = self.start();
        let (tasks, online) = self.reconcile().await;
        tracing::info!(
            jobs = self.inner.jobs.len(),
            tasks = self.inner.tasks.len(),
            reconciled_versions = tasks,
            reconciled_online = online,
            "OTA engine active on this node"
        );
        Ok(())
    }

    /// This node lost (or gives up) the lease: the deadline task of its term ends — awaited,
    /// so a push pass under way has published what it will — and the engine empties; reports
    /// go to the relay again.
    pub async fn deactivate(&self) {
        if !self.inner.driving.swap(false, Ordering::AcqRel) {
            return;
        }
        self.inner.term.fetch_add(1, Ordering::SeqCst);
        self.inner.stop.notify_waiters();
        self.inner.wake.notify_one();
        let task = lock(&self.inner.term_task).take();
        if let Some(task) = task {
            if let Err(error) = task.await {
                tracing::error!(%error, "the OTA deadline task failed");
            }
        }
        self.reset();
        tracing::warn!("OTA engine in standby on this node (another node drives it)");
    }

    /// Empties the maps (and takes their tasks out of the `ota_tasks` gauge).
    fn reset(&self) {
        let inner = &self.inner;
        for job in inner.jobs.iter() {
            let counters = job.value().counters();
            for status in TaskStatus::ALL {
                let n = counters[status.index()];
                if n > 0 {
                    inner
                        .metrics
                        .ota_tasks
                        .get_or_create(&[("state", status.as_str())])
                        .dec_by(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
        }
        super::lock(&inner.deadlines).clear();
        inner.jobs.clear();
        inner.dynamic_jobs.store(0, Ordering::Relaxed);
        inner.tasks.clear();
        inner.active.clear();
        inner.device_jobs.clear();
    }

    /// What the previous holder may have missed during the takeover: an unfinished task whose
    /// device now runs the destination version gets that version report, and a device that is
    /// online with a task waiting OFFLINE, or NOTIFIED without a progress report yet, gets its
    /// connect. Returns both counts.
    async fn reconcile(&self) -> (usize, usize) {
        let now = self.now();
        let unfinished: Vec<((String, String, String), String)> = self
            .inner
            .active
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        let mut versions = 0;
        let mut online: BTreeSet<(String, String)> = BTreeSet::new();
        for ((pk, dn, module), job_id) in unfinished {
            let Some(job) = self.job_entry(&job_id) else {
                continue;
            };
            let Ok(device) = self.registry().get_device(&pk, &dn) else {
                continue;
            };
            let key = super::TaskKey::new(&job_id, &pk, &dn);
            if device.versions.get(&module) == Some(&job.policy.dest_version) {
                let version = job.policy.dest_version.clone();
                if self
                    .apply(
                        &key,
                        Event::Version {
                            module: &module,
                            version: &version,
                        },
                        now,
                    )
                    .await
                {
                    versions += 1;
                }
                continue;
            }
            // Waiting for the device to come online, or pushed without a word back (the push
            // may have died with the previous holder): the device's connect, as on one node
            // (a re-push of an attempt that had not started).
            let waits_for_connect = self.inner.tasks.get(&key).is_some_and(|s| {
                let st = &s.state;
                (st.status == TaskStatus::Queued && st.queue_reason == Some(QueueReason::Offline))
                    || (st.status == TaskStatus::Notified && st.awaiting_first_progress())
            });
            if waits_for_connect && device.online {
                online.insert((pk, dn));
            }
        }
        let n = online.len();
        for (pk, dn) in online {
            self.device_online(&pk, &dn).await;
        }
        (versions, n)
    }

    /// The driving node's side of the relay: a report from a device held by another node,
    /// applied as if it were connected here. A node that does not drive the engine (the lease
    /// moved meanwhile) answers `None` and changes nothing.
    pub async fn handle_report(&self, report: DeviceReport) -> Option<UpgradeData> {
        match self.handle_relayed(report).await {
            Handled::Applied(answer) => answer,
            Handled::NotApplied => None,
        }
    }

    /// [`Self::handle_report`], saying whether the report was applied: not when this node
    /// does not drive the engine, nor when a write made meanwhile was refused (the lease's term
    /// ended while the report was applied — the engine stops a moment later). The sender then
    /// asks the next holder; a report applied twice changes nothing more (a progress step or a
    /// failure code of a task that has it already is ignored, a `firmware/get` answers again).
    pub async fn handle_relayed(&self, report: DeviceReport) -> Handled {
        if !self.driving() {
            return Handled::NotApplied;
        }
        let unstored = self.inner.unstored.load(Ordering::SeqCst);
        let answer = self.apply_report(report).await;
        if !self.driving() || self.inner.unstored.load(Ordering::SeqCst) != unstored {
            return Handled::NotApplied;
        }
        Handled::Applied(answer)
    }

    async fn apply_report(&self, report: DeviceReport) -> Option<UpgradeData> {
        match report {
            DeviceReport::Online { pk, dn } => self.device_online(&pk, &dn).await,
            DeviceReport::Progress {
                pk,
                dn,
                module,
                step,
            } => self.on_progress(&pk, &dn, &module, step).await,
            DeviceReport::Version {
                pk,
                dn,
                module,
                version,
            } => self.on_version(&pk, &dn, &module, &version).await,
            DeviceReport::FirmwareGet { pk, dn, module } => {
                return self.pending_upgrade(&pk, &dn, &module).await
            }
            DeviceReport::Deleted {
                pk,
                dn,
                instance_id,
            } => {
                self.device_deleted(&pk, &dn, instance_id.as_deref()).await;
            }
            DeviceReport::Joinable { pk, dns } => self.dynamic_join_many(&pk, &dns, false).await,
        }
        None
    }
}

impl Inner {
    /// Whether the deadline task of term `term` should stop.
    pub(super) fn term_over(&self, term: u64) -> bool {
        self.term.load(Ordering::SeqCst) != term
    }
}
