//! The actor's named internal events, after vector's `internal_events`: each `emit()` counts
//! and logs one occurrence in one place, with label values from an enum, so no label can be
//! misspelled at one call site and no fault is counted without being logged.

use crate::metrics::Metrics;
use crate::migration::model::{DeviceStatus, ResumeMode};

/// The `result` label of `migration_devices`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MoveResult {
    Migrated,
    RolledBack,
    Failed,
}

impl MoveResult {
    /// The result of a successful move to a device's new `status`.
    pub(super) fn moved_to(status: DeviceStatus) -> MoveResult {
        if status == DeviceStatus::RolledBack {
            MoveResult::RolledBack
        } else {
            MoveResult::Migrated
        }
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            MoveResult::Migrated => "migrated",
            MoveResult::RolledBack => "rolled_back",
            MoveResult::Failed => "failed",
        }
    }
}

/// A batch of device moves was carried out: `migration_devices{result}` for the moved and the
/// failed devices (both series are touched even at 0, so they exist from the first batch), and
/// `migration_kicks` for the connected devices told to reconnect.
pub(super) struct BatchMoved<'a> {
    pub task_id: &'a str,
    pub result: MoveResult,
    pub moved: usize,
    pub failed: usize,
    pub kicked: usize,
}

impl BatchMoved<'_> {
    pub(super) fn emit(self, metrics: &Metrics) {
        let devices = &metrics.migration_devices;
        devices
            .get_or_create(&[("result", self.result.as_str())])
            .inc_by(self.moved as u64);
        devices
            .get_or_create(&[("result", MoveResult::Failed.as_str())])
            .inc_by(self.failed as u64);
        metrics.migration_kicks.inc_by(self.kicked as u64);
        tracing::debug!(
            task_id = self.task_id,
            result = self.result.as_str(),
            moved = self.moved,
            failed = self.failed,
            kicked = self.kicked,
            "migration batch"
        );
    }
}

/// A store fault while moving devices (the task retries or halts): `migration_faults` and a
/// warning. `resume_mode` is `None` when the task is gone.
pub(super) struct MigrationFault<'a> {
    pub task_id: &'a str,
    pub error: &'a str,
    pub resume_mode: Option<ResumeMode>,
}

impl MigrationFault<'_> {
    pub(super) fn emit(self, metrics: &Metrics) {
        metrics.migration_faults.inc();
        tracing::warn!(task_id = self.task_id, error = self.error, resume_mode = ?self.resume_mode, "migration fault");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The label values are the exported series names: they may not change with a rename.
    #[test]
    fn result_labels() {
        assert_eq!(
            [
                MoveResult::Migrated,
                MoveResult::RolledBack,
                MoveResult::Failed
            ]
            .map(MoveResult::as_str),
            ["migrated", "rolled_back", "failed"]
        );
        assert_eq!(
            MoveResult::moved_to(DeviceStatus::RolledBack),
            MoveResult::RolledBack
        );
        assert_eq!(
            MoveResult::moved_to(DeviceStatus::Migrated),
            MoveResult::Migrated
        );
    }
}
