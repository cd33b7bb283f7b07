//! What devices do to OTA tasks (called by `ingest`): connect, progress, version reports and
//! `firmware/get` (pull mode); and what the registry tells the engine about devices (deleted,
//! created, tags changed).

use super::internal_events::{ProgressOutcome, ProgressReported};
use super::{lock, Delivery, DeviceReport, Inner, OtaEngine, TaskKey};
use crate::ota::model::JobStatus;
use crate::ota::task::{Event, HistoryEvent, QueueReason, TaskStatus};
use crate::registry::{DeviceChange, DeviceObserver, ObserverFuture};
use fleetgate_topics::{ProgressStep, UpgradeData};
use std::collections::HashSet;

impl OtaEngine {
    /// The device's unfinished task for `module`.
    fn active_task(&self, pk: &str, dn: &str, module: &str) -> Option<TaskKey> {
        let job_id = self
            .inner
            .active
            .get(&(pk.to_owned(), dn.to_owned(), module.to_owned()))
            .map(|j| j.value().clone())?;
        Some(TaskKey::new(&job_id, pk, dn))
    }

    /// Keys of the device's unfinished tasks (every module).
    fn unfinished_tasks(&self, pk: &str, dn: &str) -> Vec<TaskKey> {
        let Some(jobs) = self
            .inner
            .device_jobs
            .get(&(pk.to_owned(), dn.to_owned()))
            .map(|j| j.value().clone())
        else {
            return Vec::new();
        };
        jobs.into_iter()
            .map(|j| TaskKey::new(&j, pk, dn))
            .filter(|k| {
                self.inner
                    .tasks
                    .get(k)
                    .is_some_and(|s| !s.state.status.is_terminal())
            })
            .collect()
    }

    /// The device connected: OFFLINE tasks queue for a push (after the connect delay, or
    /// earlier when the device reports its version), a push the device may have missed is
    /// repeated, and DYNAMIC jobs consider the device.
    pub async fn device_online(&self, pk: &str, dn: &str) {
        if !self.driving() {
            // In a cluster the driving node learns of the connect from the change feed (the
            // session is in it); alone, an engine always drives.
            return;
        }
        let now = self.now();
        let delay = self.inner.config.connect_push_delay_ms.max(0);
        for key in self.unfinished_tasks(pk, dn) {
            if let Some(mut slot) = self.inner.tasks.get_mut(&key) {
                slot.ready_at = now + delay;
            }
            self.apply(&key, Event::DeviceOnline, now).await;
        }
        // A task it joins now waits for the connect delay too (it subscribes after CONNACK).
        self.dynamic_join(pk, dn, true).await;
    }

    /// A progress report (`/ota/device/progress`).
    ///
    /// The common case (no task for the device) answers without awaiting anything; the
    /// state machine of a real change is boxed, so this future stays small: ingest creates
    /// one per report, and a large one costs a multi-KB copy per message.
    pub async fn on_progress(&self, pk: &str, dn: &str, module: &str, step: ProgressStep) {
        if !self.driving() {
            let report = DeviceReport::Progress {
                pk: pk.to_owned(),
                dn: dn.to_owned(),
                module: module.to_owned(),
                step,
            };
            Box::pin(self.relay(report)).await;
            return;
        }
        let Some(key) = self.active_task(pk, dn, module) else {
            ProgressReported {
                outcome: ProgressOutcome::NoTask,
            }
            .emit(&self.inner.metrics);
            return;
        };
        let changed =
            Box::pin(self.apply(&key, Event::Progress { module, step }, self.now())).await;
        let outcome = if changed {
            ProgressOutcome::Applied
        } else {
            ProgressOutcome::Ignored
        };
        ProgressReported { outcome }.emit(&self.inner.metrics);
    }

    /// A version report (`/ota/device/inform`), after the registry stored it.
    ///
    /// Like [`Self::on_progress`], the common case (the device is in no job and there are no
    /// DYNAMIC jobs) returns without awaiting, and the rest is boxed.
    pub async fn on_version(&self, pk: &str, dn: &str, module: &str, version: &str) {
        if !self.driving() {
            // The driving node applies it from the change feed, which carries every stored
            // version report: nothing to send, nothing to wait for on the ingest path.
            return;
        }
        let in_a_job = self
            .inner
            .device_jobs
            .contains_key(&(pk.to_owned(), dn.to_owned()));
        if !in_a_job && !self.has_dynamic_jobs() {
            return;
        }
        Box::pin(self.version_reported(pk, dn, module, version, in_a_job)).await;
    }

    async fn version_reported(
        &self,
        pk: &str,
        dn: &str,
        module: &str,
        version: &str,
        in_a_job: bool,
    ) {
        if !in_a_job {
            // Never part of a job (the common case for a version report): only DYNAMIC jobs
            // may want it.
            self.dynamic_join(pk, dn, false).await;
            return;
        }
        let now = self.now();
        if let Some(key) = self.active_task(pk, dn, module) {
            self.apply(&key, Event::Version { module, version }, now)
                .await;
            let repush = self
                .inner
                .tasks
                .get(&key)
                .is_some_and(|s| s.state.repush_due(now));
            if let (true, Some(job)) = (repush, self.job_entry(&key.job_id)) {
                self.repush(&job, &key, now).await;
            }
        }
        // The device is up and subscribed (SDKs report after subscribing): a first push
        // waiting for the connect delay may go now.
        for key in self.unfinished_tasks(pk, dn) {
            let promote = match self.inner.tasks.get_mut(&key) {
                Some(mut slot) if slot.ready_at > now => {
                    slot.ready_at = now;
                    slot.state.is_ready()
                }
                _ => false,
            };
            if let (true, Some(job)) = (promote, self.job_entry(&key.job_id)) {
                self.arm_push(&job, now);
            }
        }
        self.dynamic_join(pk, dn, false).await;
    }

    /// `firmware/get`: the upgrade waiting for this device's module, if any. A QUEUED task
    /// becomes NOTIFIED (the reply is its delivery; it takes a slot of the job's rate without
    /// waiting for one); a NOTIFIED / IN_PROGRESS task gets its data again — except while it
    /// waits for a retry: the failed attempt's reports are ignored then, so an attempt started
    /// from this reply would go unheard; the retry's push comes when it is due. A finished
    /// task answers nothing.
    pub async fn pending_upgrade(&self, pk: &str, dn: &str, module: &str) -> Option<UpgradeData> {
        if !self.driving() {
            let report = DeviceReport::FirmwareGet {
                pk: pk.to_owned(),
                dn: dn.to_owned(),
                module: module.to_owned(),
            };
            return Box::pin(self.relay(report)).await;
        }
        let key = self.active_task(pk, dn, module)?;
        let job = self.job_entry(&key.job_id)?;
        let (status, retry_pending) = self
            .inner
            .tasks
            .get(&key)
            .map(|s| (s.state.status, s.state.retry_at_ms.is_some()))?;
        let job_status = job.status();
        match status {
            TaskStatus::Queued => {
                if matches!(job_status, JobStatus::Planned | JobStatus::Paused) {
                    return None;
                }
                let now = self.now();
                let p = self.apply_sync_as(&key, Event::Pushed, now, Some(HistoryEvent::Pulled))?;
                if !self.complete(p, Delivery::Pull).await {
                    return None;
                }
                if let Some(l) = lock(&job.push).limiter.as_mut() {
                    l.consume(now);
                }
            }
            TaskStatus::Notified | TaskStatus::InProgress if !retry_pending => {}
            _ => return None,
        }
        let package = self.firmware().get(&job.firmware_id)?;
        Some(
            self.firmware()
                .upgrade_data(&package, self.inner.config.download_url_ttl),
        )
    }

    /// The device was deleted: each of its unfinished tasks ends CANCELED (history reason
    /// `DEVICE_DELETED`, IN_PROGRESS included: nobody will report again), written like any
    /// transition, so counters move, the job may complete, and no push or retry follows.
    /// Finished tasks stay as history. Returns how many tasks were canceled.
    ///
    /// `instance_id` is the instance that owned the device (the registry has forgotten it);
    /// the events carry it in [`TaskEvent::instance_id`](crate::ota::TaskEvent::instance_id)
    /// so they still reach that instance's consumer groups. `None` when unknown (a deletion
    /// found at start).
    pub async fn device_deleted(&self, pk: &str, dn: &str, instance_id: Option<&str>) -> usize {
        let now = self.now();
        let mut n = 0;
        for key in self.unfinished_tasks(pk, dn) {
            let Some(mut p) = self.apply_sync(&key, Event::DeviceDeleted, now) else {
                continue;
            };
            p.instance_id = instance_id.map(str::to_owned);
            if self.complete(p, Delivery::Push).await {
                n += 1;
            }
        }
        if n > 0 {
            tracing::info!(
                product_key = pk,
                device_name = dn,
                tasks = n,
                "OTA tasks of a deleted device canceled"
            );
        }
        n
    }

    /// After a restart: unfinished tasks of devices that no longer exist (deleted just before
    /// a crash, before their tasks were canceled) are canceled now. Returns how many.
    pub(crate) async fn cancel_tasks_of_deleted_devices(&self) -> usize {
        let devices: HashSet<(String, String)> = self
            .inner
            .active
            .iter()
            .map(|e| (e.key().0.clone(), e.key().1.clone()))
            .collect();
        let mut n = 0;
        for (pk, dn) in devices {
            if self.registry().get_device(&pk, &dn).is_err() {
                n += self.device_deleted(&pk, &dn, None).await;
            }
        }
        n
    }

    /// Whether a queued OFFLINE task exists for the device (tests, tools).
    pub fn has_offline_task(&self, pk: &str, dn: &str) -> bool {
        self.unfinished_tasks(pk, dn).iter().any(|k| {
            self.inner.tasks.get(k).is_some_and(|s| {
                s.state.status == TaskStatus::Queued
                    && s.state.queue_reason == Some(QueueReason::Offline)
            })
        })
    }
}

/// The engine's registry observer: a deleted device's tasks end; new devices and devices
/// whose tags changed are offered to DYNAMIC jobs. Weak, so the registry (which holds its
/// observers) does not keep the engine alive.
pub(super) struct DeviceObserverImpl(pub(super) std::sync::Weak<Inner>);

impl DeviceObserver for DeviceObserverImpl {
    fn device_changed<'a>(&'a self, change: &'a DeviceChange) -> ObserverFuture<'a> {
        Box::pin(async move {
            let Some(inner) = self.0.upgrade() else {
                return;
            };
            let engine = OtaEngine { inner };
            if !engine.driving() {
                // Cluster mode, another node drives the engine: it hears of the change.
                let report = match change {
                    DeviceChange::Deleted {
                        product_key,
                        device_name,
                        instance_id,
                        ..
                    } => DeviceReport::Deleted {
                        pk: product_key.clone(),
                        dn: device_name.clone(),
                        instance_id: Some(instance_id.clone()),
                    },
                    DeviceChange::Created {
                        product_key,
                        device_names,
                    } => DeviceReport::Joinable {
                        pk: product_key.clone(),
                        dns: device_names.clone(),
                    },
                    DeviceChange::TagsChanged {
                        product_key,
                        device_name,
                    } => DeviceReport::Joinable {
                        pk: product_key.clone(),
                        dns: vec![device_name.clone()],
                    },
                    // A disabled device keeps its tasks (they wait for it, as for any
                    // offline device).
                    DeviceChange::Disabled { .. } => return,
                };
                engine.relay(report).await;
                return;
            }
            match change {
                DeviceChange::Deleted {
                    product_key,
                    device_name,
                    instance_id,
                    ..
                } => {
                    engine
                        .device_deleted(product_key, device_name, Some(instance_id))
                        .await;
                }
                DeviceChange::Created {
                    product_key,
                    device_names,
                } => {
                    engine
                        .dynamic_join_many(product_key, device_names, false)
                        .await;
                }
                DeviceChange::TagsChanged {
                    product_key,
                    device_name,
                } => {
                    engine.dynamic_join(product_key, device_name, false).await;
                }
                DeviceChange::Disabled { .. } => {}
            }
        })
    }
}
