//! Creating a job: validating the spec against its package, selecting the target devices
//! (SPECIFIC, ALL, GRAY, TAG; versions), claiming each device's module (conflicts and
//! overwrite), and writing the job with all its tasks in one store submission before any of
//! them becomes visible.

use super::internal_events::{TaskCounted, TaskFailed};
use super::{job_doc, lock, task_doc, Due, JobEntry, OtaEngine, TaskKey, TaskSlot};
use crate::ota::firmware::FirmwareStatus;
use crate::ota::model::{
    HistoryEntry, Job, JobSpec, JobStatus, JobType, JobView, NotSelected, Selection, TargetKind,
};
use crate::ota::task::{
    splitmix, Event, FailureReason, HistoryEvent, QueueReason, TaskState, TaskStatus,
};
use crate::ota::OtaError;
use crate::registry::{Device, DeviceFilter, Page};
use dashmap::mapref::entry::Entry;
use rand::Rng;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A stable 64-bit hash (jitter seeds, GRAY selection): the same after a restart.
pub(crate) fn stable_hash(parts: &[&str]) -> u64 {
    // FNV-1a, then mixed: std's SipHash keys are random per process.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    splitmix(h)
}

fn generate_job_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    let tail: String = (0..16)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("job-{tail}")
}

/// Whether `device` is a target of the job, ignoring versions.
pub(crate) fn target_matches(job: &Job, device: &Device) -> bool {
    let spec = &job.spec;
    match spec.target {
        TargetKind::All => true,
        TargetKind::Specific => spec.device_names.contains(&device.device_name),
        TargetKind::Gray => {
            let p = spec.gray_percent.unwrap_or(0.0);
            // Stable per (job, device): DYNAMIC jobs decide newcomers the same way.
            let h = stable_hash(&[&job.job_id, &device.device_name]) % 1_000_000;
            (h as f64) < p * 10_000.0
        }
        TargetKind::Tag => {
            let mut by_key: BTreeMap<&str, Vec<Option<&str>>> = BTreeMap::new();
            for t in &spec.target_tags {
                by_key.entry(&t.key).or_default().push(t.value.as_deref());
            }
            by_key.iter().all(|(k, values)| match device.tags.get(*k) {
                None => false,
                Some(v) => values.iter().any(|want| want.is_none_or(|w| w == v)),
            })
        }
    }
}

/// Whether the device's reported version makes it a candidate (not at the target; a source
/// version when the job names some).
pub(crate) fn version_matches(job: &Job, device: &Device) -> bool {
    version_mismatch(job, device).is_none()
}

/// Why the device's reported version keeps it out of the job (`None`: it is a candidate).
pub(crate) fn version_mismatch(job: &Job, device: &Device) -> Option<String> {
    let current = device.versions.get(&job.module);
    match current {
        Some(v) if *v == job.dest_version => Some(format!("already at {v}")),
        _ if job.src_versions.is_empty() => None,
        Some(v) if job.src_versions.contains(v) => None,
        Some(v) => Some(format!(
            "reports {v} of module {}, not a source version ({})",
            job.module,
            job.src_versions.join(", ")
        )),
        None => Some(format!(
            "never reported a version of module {}; the job has source versions ({})",
            job.module,
            job.src_versions.join(", ")
        )),
    }
}

impl OtaEngine {
    /// Creates a job: validates, selects devices, resolves conflicts, persists the job and
    /// all its tasks in one transaction, and starts pushing (or waits for `start_at_ms`).
    pub async fn create_job(&self, spec: JobSpec) -> Result<JobView, OtaError> {
        let now = self.now();
        let job = self.new_job(spec, now)?;
        let (selected, not_selected) = self.select_devices(&job)?;

        let policy = self.policy_for(&job);
        let entry = Arc::new(JobEntry::new(job.clone(), policy));
        let mut ops = vec![job_doc(&job)];
        let mut created: Vec<(TaskKey, TaskSlot)> = Vec::with_capacity(selected.len());
        for device in &selected {
            if let Some((key, slot)) = self.new_task(&entry, &job, device, now).await {
                ops.push(task_doc(&key, &slot));
                created.push((key, slot));
            }
        }
        // Submitted before the tasks become visible: any later write of a task is ordered
        // after its creation.
        let ticket = self.inner.store.submit(ops);
        self.insert_job(job.job_id.clone(), Arc::clone(&entry));
        let mut ready = Vec::new();
        let mut offline = Vec::new();
        for (key, slot) in created {
            if slot.state.queue_reason == Some(QueueReason::Offline) {
                offline.push(key.clone());
            }
            self.install(&entry, key, slot, now, &mut ready);
        }
        if let Err(e) = ticket.await {
            self.forget_job(&entry);
            return Err(e.into());
        }
        for key in &offline {
            self.recheck_offline(key).await;
        }
        if job.spec.job_type == JobType::VerifyFirmware {
            if let Err(e) = self
                .firmware()
                .set_status(&job.spec.firmware_id, FirmwareStatus::Verifying)
                .await
            {
                tracing::warn!(error = %e, "firmware status not set to VERIFYING");
            }
        }
        self.arm_job_timers(&entry, now);
        if !ready.is_empty() {
            self.arm_push(&entry, now);
        }
        tracing::info!(
            job = %job.job_id,
            firmware = %job.spec.firmware_id,
            tasks = entry.counters().iter().sum::<u64>(),
            "OTA job created"
        );
        // A job whose every task was born finished (conflicts only) is complete at once.
        self.check_job_done(&entry, now).await;
        let mut view = self.view(&entry, now);
        view.not_selected = not_selected;
        Ok(view)
    }

    /// The job record of a valid spec: its package must exist (and be VERIFIED for an upgrade,
    /// unless forced), and so must its product.
    fn new_job(&self, mut spec: JobSpec, now: i64) -> Result<Job, OtaError> {
        spec.validate(now)?;
        let package = self
            .firmware()
            .get(&spec.firmware_id)
            .ok_or_else(|| OtaError::FirmwareNotFound(spec.firmware_id.clone()))?;
        if spec.job_type == JobType::UpgradeFirmware
            && package.status != FirmwareStatus::Verified
            && !spec.force
        {
            return Err(OtaError::FirmwareNotVerified {
                firmware_id: package.firmware_id,
                status: package.status,
            });
        }
        // The product must still exist.
        self.registry().get_product(&package.product_key)?;
        let src_versions = spec
            .src_versions
            .clone()
            .unwrap_or_else(|| package.src_versions.clone());
        let planned = spec.start_at_ms.is_some_and(|t| t > now);
        Ok(Job {
            job_id: generate_job_id(),
            product_key: package.product_key.clone(),
            module: package.module.clone(),
            dest_version: package.version.clone(),
            src_versions,
            status: if planned {
                JobStatus::Planned
            } else {
                JobStatus::InProgress
            },
            status_reason: None,
            dynamic_active: spec.selection == Selection::Dynamic,
            spec,
            created_at_ms: now,
            started_at_ms: (!planned).then_some(now),
            finished_at_ms: None,
            updated_at_ms: now,
        })
    }

    /// The devices that get a task: the spec's targets (looked up by name for SPECIFIC) at a
    /// matching version; a STATIC GRAY job takes exactly ceil(n × p) of them. Also, for a
    /// SPECIFIC job, the named devices left out and why.
    fn select_devices(&self, job: &Job) -> Result<(Vec<Device>, Vec<NotSelected>), OtaError> {
        let devices: Vec<Device> = match job.spec.target {
            TargetKind::Specific => {
                let mut out = Vec::with_capacity(job.spec.device_names.len());
                for (i, dn) in job.spec.device_names.iter().enumerate() {
                    match self.registry().get_device(&job.product_key, dn) {
                        Ok(d) => out.push(d),
                        Err(_) => {
                            return Err(OtaError::invalid(
                                format!("device_names[{i}]"),
                                format!("no device {dn:?} in product {}", job.product_key),
                            ))
                        }
                    }
                }
                out
            }
            _ => self.all_devices(&job.product_key)?,
        };
        let mut not_selected = Vec::new();
        let mut selected: Vec<Device> = devices
            .into_iter()
            .filter(|d| match version_mismatch(job, d) {
                None => true,
                Some(reason) => {
                    if job.spec.target == TargetKind::Specific {
                        not_selected.push(NotSelected {
                            device_name: d.device_name.clone(),
                            reason,
                        });
                    }
                    false
                }
            })
            // SPECIFIC devices were looked up by name; GRAY is decided below.
            .filter(|d| {
                matches!(job.spec.target, TargetKind::Gray | TargetKind::Specific)
                    || target_matches(job, d)
            })
            .collect();
        if job.spec.target == TargetKind::Gray {
            if job.spec.selection == Selection::Static {
                // Exactly ceil(n × p) devices, picked by a stable hash.
                let p = job.spec.gray_percent.unwrap_or(0.0);
                let n = ((selected.len() as f64) * p / 100.0).ceil() as usize;
                selected.sort_by_key(|d| stable_hash(&[&job.job_id, &d.device_name]));
                selected.truncate(n);
            } else {
                selected.retain(|d| target_matches(job, d));
            }
        }
        if job.spec.job_type == JobType::VerifyFirmware && selected.is_empty() {
            let why: Vec<String> = not_selected
                .iter()
                .map(|n| format!("{}: {}", n.device_name, n.reason))
                .collect();
            return Err(OtaError::invalid(
                "device_names",
                format!(
                    "no listed device can take this package ({})",
                    why.join("; ")
                ),
            ));
        }
        Ok((selected, not_selected))
    }

    fn arm_job_timers(&self, entry: &JobEntry, _now: i64) {
        let job = entry.job();
        if job.status == JobStatus::Planned {
            if let Some(at) = job.spec.start_at_ms {
                self.arm(at, Due::JobStart(job.job_id.clone()));
            }
        }
        if let Some(at) = job.spec.finish_by_ms {
            self.arm(at, Due::JobFinish(job.job_id.clone()));
        }
    }

    /// Every device of a product (one call: the registry pages over its sorted index).
    pub(crate) fn all_devices(&self, pk: &str) -> Result<Vec<Device>, OtaError> {
        let page = Page {
            page: 1,
            page_size: u32::MAX,
        };
        Ok(self
            .registry()
            .list_devices(pk, &DeviceFilter::default(), page)?
            .items)
    }

    /// Builds the task of `device` in a new job (claiming the device's module), resolving a
    /// conflict with another job's unfinished task. `None` when a DYNAMIC job should skip the
    /// device for now.
    pub(crate) async fn new_task(
        &self,
        entry: &Arc<JobEntry>,
        job: &Job,
        device: &Device,
        now: i64,
    ) -> Option<(TaskKey, TaskSlot)> {
        let pk = &job.product_key;
        let dn = &device.device_name;
        let key = TaskKey::new(&job.job_id, pk, dn);
        let seed = stable_hash(&[&job.job_id, pk, dn]);
        let src = device.versions.get(&job.module).cloned();
        let conflict = self.claim_module(job, pk, dn, now).await;
        let (state, note) = match conflict {
            Some(_) if job.spec.selection == Selection::Dynamic => return None,
            Some(why) => (
                TaskState::failed_at_birth(FailureReason::Conflict, why.clone(), src, seed, now),
                format!("CONFLICT: {why}"),
            ),
            None => {
                let state = self.initial_state(job, dn, src, seed, now);
                let reason = match (state.status, state.queue_reason) {
                    (TaskStatus::Queued, Some(r)) => r.as_str().to_owned(),
                    (s, _) => s.as_str().to_owned(),
                };
                (state, reason)
            }
        };
        let _ = entry;
        let history = vec![HistoryEntry {
            at_ms: now,
            event: HistoryEvent::Created.as_str().to_owned(),
            from_status: state.status,
            to_status: state.status,
            reason: Some(note),
        }];
        Some((key, TaskSlot::new(state, history, 0)))
    }

    /// Claims the device's module for `job`, atomically. Another job's unfinished task is a
    /// conflict, or is overwritten (then the claim is tried again: someone may have been
    /// quicker). Returns the conflict, if the claim failed.
    async fn claim_module(&self, job: &Job, pk: &str, dn: &str, now: i64) -> Option<String> {
        let claim = (pk.to_owned(), dn.to_owned(), job.module.clone());
        let mut conflict: Option<String> = None;
        for _ in 0..3 {
            let other = match self.inner.active.entry(claim.clone()) {
                Entry::Vacant(v) => {
                    v.insert(job.job_id.clone());
                    conflict = None;
                    break;
                }
                Entry::Occupied(o) if *o.get() == job.job_id => {
                    conflict = None;
                    break;
                }
                Entry::Occupied(o) => o.get().clone(),
            };
            let other_key = TaskKey::new(&other, pk, dn);
            let other_status = self.inner.tasks.get(&other_key).map(|s| s.state.status);
            if other_status == Some(TaskStatus::InProgress) {
                conflict = Some(format!("{other} is IN_PROGRESS on this device"));
                break;
            } else if !job.spec.overwrite {
                conflict = Some(format!("{other} has an unfinished task on this device"));
                break;
            } else if !self.apply(&other_key, Event::Overwrite, now).await {
                let finished = self
                    .inner
                    .tasks
                    .get(&other_key)
                    .is_none_or(|s| s.state.status.is_terminal());
                if !finished {
                    // It started meanwhile: never overwrite IN_PROGRESS.
                    conflict = Some(format!("{other} is IN_PROGRESS on this device"));
                    break;
                }
                // A stale claim (its task already finished): take it back and retry.
                conflict = Some(format!("{other} could not be overwritten"));
                self.inner.active.remove_if(&claim, |_, j| *j == other);
            } else {
                conflict = Some(format!("{other} was overwritten, then claimed again"));
            }
        }
        conflict
    }

    /// The first state of a task that claimed its device: CONFIRM, or QUEUED (SCHEDULED for a
    /// planned job, else RATE_LIMITED when the device is connected, OFFLINE when not).
    fn initial_state(
        &self,
        job: &Job,
        dn: &str,
        src: Option<String>,
        seed: u64,
        now: i64,
    ) -> TaskState {
        let pk = &job.product_key;
        if job.spec.need_confirm {
            TaskState::new(TaskStatus::Confirm, None, src, seed, now)
        } else if job.status == JobStatus::Planned {
            let mut s = TaskState::new(
                TaskStatus::Queued,
                Some(QueueReason::Scheduled),
                src,
                seed,
                now,
            );
            s.scheduled_at_ms = job.spec.start_at_ms;
            s
        } else if self.inner.pusher.is_connected(pk, dn) {
            TaskState::new(
                TaskStatus::Queued,
                Some(QueueReason::RateLimited),
                src,
                seed,
                now,
            )
        } else {
            TaskState::new(
                TaskStatus::Queued,
                Some(QueueReason::Offline),
                src,
                seed,
                now,
            )
        }
    }

    /// Makes a new task visible: maps, counters, push queue, deadline.
    pub(crate) fn install(
        &self,
        entry: &Arc<JobEntry>,
        key: TaskKey,
        slot: TaskSlot,
        _now: i64,
        ready: &mut Vec<String>,
    ) {
        let metrics = &self.inner.metrics;
        TaskCounted {
            job: entry,
            from: None,
            to: slot.state.status,
        }
        .emit(metrics);
        if let Some(reason) = slot.state.failure {
            TaskFailed {
                job: entry,
                device_name: &key.dn,
                reason,
            }
            .emit(metrics);
        }
        entry.add_member(&key.dn);
        let mut jobs = self
            .inner
            .device_jobs
            .entry((key.pk.clone(), key.dn.clone()))
            .or_default();
        if !jobs.contains(&key.job_id) {
            jobs.push(key.job_id.clone());
        }
        drop(jobs);
        if slot.state.is_ready() {
            lock(&entry.push).ready.push_back(key.dn.clone());
            ready.push(key.dn.clone());
        }
        self.inner.tasks.insert(key, slot);
    }

    /// Takes a job whose creation did not commit back out of memory.
    fn forget_job(&self, entry: &JobEntry) {
        for dn in entry.members() {
            let key = TaskKey::new(&entry.job_id, &entry.product_key, &dn);
            self.inner.tasks.remove(&key);
            self.inner.active.remove_if(
                &(
                    entry.product_key.clone(),
                    dn.clone(),
                    entry.policy.module.clone(),
                ),
                |_, j| *j == entry.job_id,
            );
            if let Some(mut jobs) = self
                .inner
                .device_jobs
                .get_mut(&(entry.product_key.clone(), dn.clone()))
            {
                jobs.retain(|j| *j != entry.job_id);
            }
        }
        self.remove_job(&entry.job_id);
    }
}
