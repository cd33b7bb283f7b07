//! The engine's named internal events, after vector's `internal_events`: each `emit()` does
//! everything one occurrence must do to the counters — the Prometheus family and the job's own
//! statistics — so a count never moves without its twin and no label value is spelled in two
//! places. Label values come from enums (`as_str()`), closed sets by construction.
//!
//! Events that are already recorded elsewhere (status changes and failures are in the task's
//! history and its task events) log at `debug` only; progress reports, on the hot path, are
//! counted without a log line.

use super::apply::Delivery;
use super::JobEntry;
use crate::metrics::Metrics;
use crate::ota::task::{FailureReason, TaskStatus};
use std::sync::atomic::Ordering;

/// A task entered `to` (from `from`, or new when `None`; a task leaving one status always
/// enters another). Moves the job's counter and the `ota_tasks{state}` gauge together.
pub(super) struct TaskCounted<'a> {
    pub job: &'a JobEntry,
    pub from: Option<TaskStatus>,
    pub to: TaskStatus,
}

impl TaskCounted<'_> {
    pub(super) fn emit(self, metrics: &Metrics) {
        let gauge = &metrics.ota_tasks;
        if let Some(from) = self.from {
            self.job.count(from, -1);
            gauge.get_or_create(&[("state", from.as_str())]).dec();
        }
        self.job.count(self.to, 1);
        gauge.get_or_create(&[("state", self.to.as_str())]).inc();
    }
}

/// A task FAILED (at birth or later): the job's failure statistics, `ota_failures{reason}`,
/// and `ota_timeouts` for a TIMEOUT (stalls included).
pub(super) struct TaskFailed<'a> {
    pub job: &'a JobEntry,
    pub device_name: &'a str,
    pub reason: FailureReason,
}

impl TaskFailed<'_> {
    pub(super) fn emit(self, metrics: &Metrics) {
        self.job.failures[self.reason as usize].fetch_add(1, Ordering::Relaxed);
        metrics
            .ota_failures
            .get_or_create(&[("reason", self.reason.as_str())])
            .inc();
        if self.reason == FailureReason::Timeout {
            metrics.ota_timeouts.inc();
        }
        tracing::debug!(job = %self.job.job_id, dn = self.device_name, reason = self.reason.as_str(), "OTA task failed");
    }
}

/// A retry of a failed attempt was scheduled: the job's retry count and `ota_retries`.
pub(super) struct RetryScheduled<'a> {
    pub job: &'a JobEntry,
    pub device_name: &'a str,
}

impl RetryScheduled<'_> {
    pub(super) fn emit(self, metrics: &Metrics) {
        self.job.retries.fetch_add(1, Ordering::Relaxed);
        metrics.ota_retries.inc();
        tracing::debug!(job = %self.job.job_id, dn = self.device_name, "OTA retry scheduled");
    }
}

/// The upgrade went to the device (a push or re-push, or the reply to its `firmware/get`):
/// the job's push count and `ota_pushes{kind}`.
pub(super) struct UpgradeDelivered<'a> {
    pub job: &'a JobEntry,
    pub device_name: &'a str,
    pub delivery: Delivery,
}

impl UpgradeDelivered<'_> {
    pub(super) fn emit(self, metrics: &Metrics) {
        self.job.pushes.fetch_add(1, Ordering::Relaxed);
        metrics
            .ota_pushes
            .get_or_create(&[("kind", self.delivery.as_str())])
            .inc();
        tracing::debug!(job = %self.job.job_id, dn = self.device_name, kind = self.delivery.as_str(), "OTA upgrade delivered");
    }
}

/// What became of a progress report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProgressOutcome {
    /// It changed its task.
    Applied,
    /// Its task ignored it (stale, another module, waiting for a retry…).
    Ignored,
    /// The device has no unfinished task for the module.
    NoTask,
}

impl ProgressOutcome {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            ProgressOutcome::Applied => "applied",
            ProgressOutcome::Ignored => "ignored",
            ProgressOutcome::NoTask => "no_task",
        }
    }
}

/// A progress report was handled: `ota_progress{outcome}`. Not logged (one per report).
pub(super) struct ProgressReported {
    pub outcome: ProgressOutcome,
}

impl ProgressReported {
    pub(super) fn emit(self, metrics: &Metrics) {
        metrics
            .ota_progress
            .get_or_create(&[("outcome", self.outcome.as_str())])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The label values are the exported series names: they may not change with a rename.
    #[test]
    fn label_values() {
        let outcomes = [
            ProgressOutcome::Applied,
            ProgressOutcome::Ignored,
            ProgressOutcome::NoTask,
        ]
        .map(ProgressOutcome::as_str);
        assert_eq!(outcomes, ["applied", "ignored", "no_task"]);
        assert_eq!(
            [Delivery::Push, Delivery::Pull].map(Delivery::as_str),
            ["push", "pull"]
        );
    }
}
