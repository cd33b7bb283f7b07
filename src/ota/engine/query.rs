//! Read side: jobs with counters, tasks by job, jobs by firmware and by device, per-device
//! timelines, statistics and version distribution. Everything is copied out of the maps; no
//! guard outlives a call.

use super::series::PushSeries;
use super::{JobEntry, OtaEngine, TaskKey, TaskSlot};
use crate::ota::model::{
    HistoryEntry, JobStatistics, JobStatus, JobView, TaskCounters, TaskView, VersionCount,
    VersionDistribution,
};
use crate::ota::task::{FailureReason, QueueReason, TaskStatus};
use crate::ota::OtaError;
use crate::registry::{Page, Paged};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use utoipa::ToSchema;

/// Filter of [`OtaEngine::list_jobs`].
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub firmware_id: Option<String>,
    pub product_key: Option<String>,
    pub status: Option<JobStatus>,
}

/// A job seen from one device: the job and the device's task in it.
#[derive(Serialize, Clone, Debug, ToSchema)]
pub struct DeviceJob {
    pub job_id: String,
    pub firmware_id: String,
    pub job_type: crate::ota::model::JobType,
    pub job_status: JobStatus,
    pub module: String,
    pub dest_version: String,
    pub created_at_ms: i64,
    pub task: TaskView,
}

/// One entry of a device's OTA timeline (every attempt of every job).
#[derive(Serialize, Clone, Debug, ToSchema)]
pub struct TimelineEntry {
    pub job_id: String,
    pub module: String,
    pub dest_version: String,
    #[serde(flatten)]
    pub entry: HistoryEntry,
}

/// Statistics of one firmware package over all its jobs.
#[derive(Serialize, Clone, Debug, ToSchema)]
pub struct FirmwareStatistics {
    pub firmware_id: String,
    pub jobs: u64,
    #[serde(flatten)]
    pub stats: JobStatistics,
}

fn page_of<T>(items: Vec<T>, page: Page) -> Paged<T> {
    let total = items.len() as u64;
    let start = ((page.page as usize).saturating_sub(1)).saturating_mul(page.page_size as usize);
    let items = items
        .into_iter()
        .skip(start)
        .take(page.page_size as usize)
        .collect();
    Paged {
        items,
        total,
        page: page.page,
        page_size: page.page_size,
    }
}

fn success_rate(c: &TaskCounters) -> Option<f64> {
    let done = c.succeeded + c.failed;
    (done > 0).then(|| c.succeeded as f64 / done as f64)
}

impl OtaEngine {
    pub(crate) fn view(&self, entry: &JobEntry, now: i64) -> JobView {
        JobView {
            job: entry.job(),
            counters: TaskCounters::from_array(entry.counters()),
            current_rate_per_minute: entry.current_rate(now),
            not_selected: Vec::new(),
        }
    }

    fn task_view(entry: &JobEntry, key: &TaskKey, slot: &TaskSlot, with_history: bool) -> TaskView {
        let s = &slot.state;
        let scheduled_at_ms = match s.queue_reason {
            Some(QueueReason::Scheduled) => s.scheduled_at_ms.or(entry.start_at_ms),
            _ => None,
        };
        TaskView {
            job_id: key.job_id.clone(),
            product_key: key.pk.clone(),
            device_name: key.dn.clone(),
            module: entry.policy.module.clone(),
            dest_version: entry.policy.dest_version.clone(),
            status: s.status,
            queue_reason: s.queue_reason,
            scheduled_at_ms,
            src_version: s.src_version.clone(),
            progress: s.progress,
            failure: s.failure,
            failure_code: s.failure.and_then(FailureReason::step_code),
            failure_detail: s.failure_detail.clone(),
            pushes: s.pushes,
            attempt: s.attempt,
            retries_used: s.retries_used,
            next_retry_at_ms: s.retry_at_ms,
            created_at_ms: s.created_at_ms,
            updated_at_ms: s.updated_at_ms,
            notified_at_ms: s.notified_at_ms,
            first_progress_at_ms: s.first_progress_at_ms,
            last_progress_at_ms: s.last_progress_at_ms,
            finished_at_ms: s.finished_at_ms,
            history: with_history.then(|| slot.history.clone()),
        }
    }

    fn entry_or_not_found(&self, job_id: &str) -> Result<Arc<JobEntry>, OtaError> {
        self.job_entry(job_id)
            .ok_or_else(|| OtaError::JobNotFound(job_id.to_owned()))
    }

    /// One job with its counters per task status.
    pub fn get_job(&self, job_id: &str) -> Result<JobView, OtaError> {
        let entry = self.entry_or_not_found(job_id)?;
        Ok(self.view(&entry, self.now()))
    }

    /// Jobs, newest first.
    pub fn list_jobs(&self, filter: &JobFilter, page: Page) -> Paged<JobView> {
        let now = self.now();
        let mut entries: Vec<(i64, String, Arc<JobEntry>)> = self
            .inner
            .jobs
            .iter()
            .map(|e| Arc::clone(e.value()))
            .filter(|j| {
                filter
                    .firmware_id
                    .as_ref()
                    .is_none_or(|f| *f == j.firmware_id)
            })
            .filter(|j| {
                filter
                    .product_key
                    .as_ref()
                    .is_none_or(|p| *p == j.product_key)
            })
            .filter(|j| filter.status.is_none_or(|s| s == j.status()))
            .map(|j| (j.created_at_ms, j.job_id.clone(), j))
            .collect();
        entries.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let paged = page_of(entries, page);
        Paged {
            items: paged
                .items
                .iter()
                .map(|(_, _, j)| self.view(j, now))
                .collect(),
            total: paged.total,
            page: paged.page,
            page_size: paged.page_size,
        }
    }

    /// A job's tasks by device name, optionally of one status.
    pub fn list_tasks(
        &self,
        job_id: &str,
        status: Option<TaskStatus>,
        page: Page,
    ) -> Result<Paged<TaskView>, OtaError> {
        let entry = self.entry_or_not_found(job_id)?;
        let members = entry.members();
        let mut items = Vec::new();
        let mut total = 0u64;
        let start = (page.page as u64 - 1) * u64::from(page.page_size);
        for dn in members {
            let key = TaskKey::new(job_id, &entry.product_key, &dn);
            let Some(slot) = self.inner.tasks.get(&key) else {
                continue;
            };
            if status.is_some_and(|s| s != slot.state.status) {
                continue;
            }
            if total >= start && items.len() < page.page_size as usize {
                items.push(Self::task_view(&entry, &key, &slot, false));
            }
            total += 1;
        }
        Ok(Paged {
            items,
            total,
            page: page.page,
            page_size: page.page_size,
        })
    }

    /// One task with its history.
    pub fn get_task(&self, job_id: &str, device_name: &str) -> Result<TaskView, OtaError> {
        let entry = self.entry_or_not_found(job_id)?;
        let key = TaskKey::new(job_id, &entry.product_key, device_name);
        let slot = self
            .inner
            .tasks
            .get(&key)
            .ok_or_else(|| OtaError::TaskNotFound {
                job_id: job_id.to_owned(),
                device_name: device_name.to_owned(),
            })?;
        Ok(Self::task_view(&entry, &key, &slot, true))
    }

    /// Jobs that have a task for the device, newest first, with that task.
    pub fn jobs_by_device(&self, pk: &str, dn: &str, page: Page) -> Paged<DeviceJob> {
        let job_ids = self
            .inner
            .device_jobs
            .get(&(pk.to_owned(), dn.to_owned()))
            .map(|j| j.value().clone())
            .unwrap_or_default();
        let mut out = Vec::new();
        for job_id in job_ids {
            let Some(entry) = self.job_entry(&job_id) else {
                continue;
            };
            let key = TaskKey::new(&job_id, pk, dn);
            let Some(slot) = self.inner.tasks.get(&key) else {
                continue;
            };
            let task = Self::task_view(&entry, &key, &slot, false);
            drop(slot);
            out.push(DeviceJob {
                job_id,
                firmware_id: entry.firmware_id.clone(),
                job_type: entry.job_type,
                job_status: entry.status(),
                module: entry.policy.module.clone(),
                dest_version: entry.policy.dest_version.clone(),
                created_at_ms: entry.created_at_ms,
                task,
            });
        }
        out.sort_by(|a, b| {
            b.created_at_ms
                .cmp(&a.created_at_ms)
                .then_with(|| a.job_id.cmp(&b.job_id))
        });
        page_of(out, page)
    }

    /// Every history entry of the device's tasks (optionally of one job), oldest first.
    pub fn timeline(&self, pk: &str, dn: &str, job_id: Option<&str>) -> Vec<TimelineEntry> {
        let job_ids = self
            .inner
            .device_jobs
            .get(&(pk.to_owned(), dn.to_owned()))
            .map(|j| j.value().clone())
            .unwrap_or_default();
        let mut out = Vec::new();
        for id in job_ids
            .iter()
            .filter(|j| job_id.is_none_or(|want| want == j.as_str()))
        {
            let Some(entry) = self.job_entry(id) else {
                continue;
            };
            let key = TaskKey::new(id, pk, dn);
            let Some(slot) = self.inner.tasks.get(&key) else {
                continue;
            };
            out.extend(slot.history.iter().map(|h| TimelineEntry {
                job_id: id.clone(),
                module: entry.policy.module.clone(),
                dest_version: entry.policy.dest_version.clone(),
                entry: h.clone(),
            }));
        }
        out.sort_by_key(|a| a.entry.at_ms);
        out
    }

    fn statistics_of(&self, entries: &[Arc<JobEntry>]) -> JobStatistics {
        let mut counters = [0u64; 7];
        let mut failures = [0u64; 9];
        let mut retries = 0;
        let mut pushes = 0;
        for e in entries {
            for (i, c) in e.counters().iter().enumerate() {
                counters[i] += c;
            }
            for (i, f) in e.failures().iter().enumerate() {
                failures[i] += f;
            }
            retries += e.retries.load(Ordering::Relaxed);
            pushes += e.pushes.load(Ordering::Relaxed);
        }
        let counters = TaskCounters::from_array(counters);
        JobStatistics {
            success_rate: success_rate(&counters),
            counters,
            failures: FailureReason::ALL
                .into_iter()
                .filter(|r| failures[*r as usize] > 0)
                .map(|r| (r.as_str().to_owned(), failures[r as usize]))
                .collect(),
            retries,
            pushes,
        }
    }

    /// Success rate, failures by reason, retries and pushes of one job.
    pub fn job_statistics(&self, job_id: &str) -> Result<JobStatistics, OtaError> {
        let entry = self.entry_or_not_found(job_id)?;
        Ok(self.statistics_of(&[entry]))
    }

    /// Tasks of a job notified per minute (or coarser, at most `max_buckets` buckets), from
    /// each task's latest push: one pass over the job's tasks, no history read.
    pub fn push_series(&self, job_id: &str, max_buckets: usize) -> Result<PushSeries, OtaError> {
        let entry = self.entry_or_not_found(job_id)?;
        let members = entry.members();
        let mut times = Vec::with_capacity(members.len());
        for dn in members {
            let key = TaskKey::new(job_id, &entry.product_key, &dn);
            if let Some(t) = self
                .inner
                .tasks
                .get(&key)
                .and_then(|s| s.state.notified_at_ms)
            {
                times.push(t);
            }
        }
        Ok(PushSeries::of(&times, max_buckets))
    }

    /// FAILED tasks of a job by the source version they started from, then by reason.
    pub fn failures_by_src_version(
        &self,
        job_id: &str,
    ) -> Result<BTreeMap<String, BTreeMap<String, u64>>, OtaError> {
        let entry = self.entry_or_not_found(job_id)?;
        let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for dn in entry.members() {
            let key = TaskKey::new(job_id, &entry.product_key, &dn);
            let Some(slot) = self.inner.tasks.get(&key) else {
                continue;
            };
            if let Some(f) = slot.state.failure {
                let v = slot
                    .state
                    .src_version
                    .clone()
                    .unwrap_or_else(|| "unknown".into());
                *out.entry(v)
                    .or_default()
                    .entry(f.as_str().to_owned())
                    .or_default() += 1;
            }
        }
        Ok(out)
    }

    /// The same over every job of a firmware package.
    pub fn firmware_statistics(&self, firmware_id: &str) -> FirmwareStatistics {
        let entries: Vec<Arc<JobEntry>> = self
            .inner
            .jobs
            .iter()
            .filter(|e| e.value().firmware_id == firmware_id)
            .map(|e| Arc::clone(e.value()))
            .collect();
        FirmwareStatistics {
            firmware_id: firmware_id.to_owned(),
            jobs: entries.len() as u64,
            stats: self.statistics_of(&entries),
        }
    }

    /// Whether an unfinished job (or unfinished tasks of a canceled DYNAMIC job) uses the
    /// package (firmware deletion is refused then).
    pub fn firmware_in_use(&self, firmware_id: &str) -> bool {
        self.inner.jobs.iter().any(|e| {
            let j = e.value();
            j.firmware_id == firmware_id && (!j.status().is_finished() || j.unfinished() > 0)
        })
    }

    /// Devices per reported version of `module` in a product.
    pub fn version_distribution(
        &self,
        pk: &str,
        module: &str,
    ) -> Result<VersionDistribution, OtaError> {
        let devices = self.all_devices(pk)?;
        let total = devices.len() as u64;
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        let mut unknown = 0;
        for d in &devices {
            match d.versions.get(module) {
                Some(v) => *counts.entry(v.clone()).or_default() += 1,
                None => unknown += 1,
            }
        }
        let mut versions: Vec<VersionCount> = counts
            .into_iter()
            .map(|(version, devices)| VersionCount {
                version,
                devices,
                percent: if total > 0 {
                    devices as f64 * 100.0 / total as f64
                } else {
                    0.0
                },
            })
            .collect();
        versions.sort_by(|a, b| {
            b.devices
                .cmp(&a.devices)
                .then_with(|| a.version.cmp(&b.version))
        });
        Ok(VersionDistribution {
            product_key: pk.to_owned(),
            module: module.to_owned(),
            total_devices: total,
            unknown,
            versions,
        })
    }
}
