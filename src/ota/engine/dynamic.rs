//! DYNAMIC jobs taking devices after their creation: a device created, re-tagged, reporting a
//! version or connecting gets a task in every DYNAMIC job of its product that still takes
//! devices and that it now matches.

use super::create::{target_matches, version_matches};
use super::{lock, task_doc, JobEntry, OtaEngine, TaskKey};
use crate::ota::model::Selection;
use crate::ota::task::Event;
use std::sync::Arc;

impl OtaEngine {
    /// DYNAMIC jobs: creates a task for a device that now matches (see
    /// [`Self::dynamic_join_many`]).
    pub(crate) async fn dynamic_join(&self, pk: &str, dn: &str, just_connected: bool) {
        if !self.has_dynamic_jobs() {
            return;
        }
        self.dynamic_join_many(pk, std::slice::from_ref(&dn.to_owned()), just_connected)
            .await;
    }

    /// DYNAMIC jobs of the product that are still taking devices (`dynamic_active`: not
    /// canceled, finish_by not reached) create a task for each listed device that matches
    /// their target and source versions and has none in the job yet. Called when a device is
    /// created (one or a batch), its tags change, it reports a version, or it connects
    /// (`just_connected`: its first push waits for the connect delay, as it subscribes after
    /// the CONNACK). STATIC jobs never take devices after their creation. The tasks of one job
    /// are written in one store submission.
    pub(crate) async fn dynamic_join_many(&self, pk: &str, names: &[String], just_connected: bool) {
        if !self.has_dynamic_jobs() {
            return;
        }
        let candidates: Vec<Arc<JobEntry>> = self
            .inner
            .jobs
            .iter()
            .filter(|e| {
                let j = e.value();
                j.selection == Selection::Dynamic && j.product_key == pk
            })
            .map(|e| Arc::clone(e.value()))
            .collect();
        if candidates.is_empty() || names.is_empty() {
            return;
        }
        let now = self.now();
        let ready_at = if just_connected {
            now + self.inner.config.connect_push_delay_ms.max(0)
        } else {
            0
        };
        for entry in candidates {
            let joining = {
                let job = lock(&entry.job);
                job.dynamic_active && !job.status.is_finished()
            };
            if !joining {
                continue;
            }
            let job = entry.job();
            let mut ops = Vec::new();
            let mut created = Vec::new();
            for dn in names {
                if entry.has_member(dn) {
                    continue;
                }
                let Ok(device) = self.registry().get_device(pk, dn) else {
                    continue;
                };
                if !(target_matches(&job, &device) && version_matches(&job, &device)) {
                    continue;
                }
                let Some((key, mut slot)) = self.new_task(&entry, &job, &device, now).await else {
                    continue;
                };
                slot.ready_at = ready_at;
                ops.push(task_doc(&key, &slot));
                created.push((key, slot));
            }
            if created.is_empty() {
                continue;
            }
            let keys: Vec<TaskKey> = created.iter().map(|(k, _)| k.clone()).collect();
            let ticket = self.inner.store.submit(ops);
            let mut ready = Vec::new();
            for (key, slot) in created {
                self.install(&entry, key, slot, now, &mut ready);
            }
            if let Err(e) = ticket.await {
                tracing::error!(error = %e, job = %job.job_id, "dynamic tasks not stored");
                continue;
            }
            for key in &keys {
                if self.registry().get_device(pk, &key.dn).is_err() {
                    // Deleted while it was joining (after the deletion swept its tasks).
                    self.apply(key, Event::DeviceDeleted, now).await;
                } else {
                    // Connected while it was joining (its connect found no task).
                    self.recheck_offline(key).await;
                }
            }
            tracing::debug!(job = %job.job_id, devices = keys.len(), "devices joined a dynamic job");
            if !ready.is_empty() {
                self.arm_push(&entry, now);
            }
        }
    }
}
