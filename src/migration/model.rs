//! The migration engine's value types: task states, per-device statuses, the DCS-shaped task
//! configuration, and the snapshots the API serialises.
//!
//! Persisted documents ([`TaskDoc`], [`DeviceDoc`], [`LogEntry`]) are versioned by their field
//! set only: new fields must be `#[serde(default)]` so older documents still load.

use super::MigrationError;
use serde::{Deserialize, Serialize};
use std::fmt;
use utoipa::ToSchema;

/// Days data sync stays on after it was turned on.
pub const DATA_SYNC_DAYS: i64 = 30;
/// [`DATA_SYNC_DAYS`] in milliseconds.
pub const DATA_SYNC_MS: i64 = DATA_SYNC_DAYS * 24 * 3600 * 1000;
/// Most devices a JSON canary selection may name.
pub const MAX_CANARY_JSON: usize = 100;
/// Most devices a CSV canary selection, or any rollback selection, may name.
pub const MAX_PICKED: usize = 10_000;
/// `bandwidth_limit_mb` bounds (DCS: an integer greater than 0 and less than 10,241).
pub const BANDWIDTH_MB_RANGE: std::ops::RangeInclusive<u32> = 1..=10_240;

/// The detailed task state (docs/DESIGN.md §6; the vendor's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskState {
    /// Created, or back after a finished rollback; nothing is moving.
    ToMigrate,
    /// The canary devices are being moved; cannot be paused or rolled back.
    CanaryInProgress,
    /// The canary devices are in the target; full migration or rollback may start.
    CanaryCompleted,
    /// Full migration: every device of the product is being moved.
    Migrating,
    /// Full migration paused by an operator.
    Paused,
    /// Full migration running again after a pause (behaves like `MIGRATING`).
    ContinueMigrating,
    /// Every device of the product is in the target.
    Completed,
    /// Devices are being moved back to the source (pausable).
    RollingBack,
    /// A rollback paused by an operator.
    RollbackPaused,
    /// Rollback started from `COMPLETED`; cannot be paused.
    BatchRollback,
}

impl TaskState {
    pub const ALL: [TaskState; 10] = [
        TaskState::ToMigrate,
        TaskState::CanaryInProgress,
        TaskState::CanaryCompleted,
        TaskState::Migrating,
        TaskState::Paused,
        TaskState::ContinueMigrating,
        TaskState::Completed,
        TaskState::RollingBack,
        TaskState::RollbackPaused,
        TaskState::BatchRollback,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::ToMigrate => "TO_MIGRATE",
            TaskState::CanaryInProgress => "CANARY_IN_PROGRESS",
            TaskState::CanaryCompleted => "CANARY_COMPLETED",
            TaskState::Migrating => "MIGRATING",
            TaskState::Paused => "PAUSED",
            TaskState::ContinueMigrating => "CONTINUE_MIGRATING",
            TaskState::Completed => "COMPLETED",
            TaskState::RollingBack => "ROLLING_BACK",
            TaskState::RollbackPaused => "ROLLBACK_PAUSED",
            TaskState::BatchRollback => "BATCH_ROLLBACK",
        }
    }

    /// What the engine does in this state, if anything.
    pub fn work(self) -> Option<Work> {
        match self {
            TaskState::CanaryInProgress => Some(Work::Canary),
            TaskState::Migrating | TaskState::ContinueMigrating => Some(Work::Full),
            TaskState::RollingBack | TaskState::BatchRollback => Some(Work::Rollback),
            _ => None,
        }
    }

    pub fn is_running(self) -> bool {
        self.work().is_some()
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of device work a running state does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Move the picked canary devices to the target.
    Canary,
    /// Move every device of the product still in the source to the target.
    Full,
    /// Move devices back to the source (the picked ones, or all).
    Rollback,
}

/// The DCS-style summary status shown next to the detailed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SummaryStatus {
    /// The last step finished (`CANARY_COMPLETED`, `COMPLETED`) with no failed device.
    Success,
    /// Halted by a fault (`resume_mode` manual), or the last step finished with failed devices.
    Failed,
    /// Devices are moving.
    Migrating,
    /// Nothing is moving: not started, paused, or rolled back.
    Terminated,
}

/// Per-device status within a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DeviceStatus {
    NotMigrated,
    /// Picked for migration (canary) and not moved yet, or being moved.
    Migrating,
    Migrated,
    /// Could not be moved; `reason` says why.
    Failed,
    RolledBack,
}

impl DeviceStatus {
    pub const ALL: [DeviceStatus; 5] = [
        DeviceStatus::NotMigrated,
        DeviceStatus::Migrating,
        DeviceStatus::Migrated,
        DeviceStatus::Failed,
        DeviceStatus::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::NotMigrated => "NOT_MIGRATED",
            DeviceStatus::Migrating => "MIGRATING",
            DeviceStatus::Migrated => "MIGRATED",
            DeviceStatus::Failed => "FAILED",
            DeviceStatus::RolledBack => "ROLLED_BACK",
        }
    }
}

/// `migration_method` (DCS names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationMethod {
    /// Move the devices (and so their data routing) to the target instance.
    #[default]
    FullMigration,
    /// Data sync only: devices stay in the source; canary and full are refused.
    IncrementalMigration,
}

/// `resume_mode` (DCS names): what a fault (the store refusing a write) does to a running task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResumeMode {
    /// Retry by itself with backoff (1 s doubling to 30 s) until it works.
    #[default]
    Auto,
    /// Stop in a failed state (summary `FAILED`) until an operator sends `continue`.
    Manual,
}

/// The task configuration, shaped like the DCS migration-task call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct MigrationConfig {
    pub migration_method: MigrationMethod,
    pub resume_mode: ResumeMode,
    /// MB/s for data mirrored to the target while data sync is on; `null` = unlimited.
    pub bandwidth_limit_mb: Option<u32>,
}

/// Data sync bookkeeping of a task.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataSync {
    /// Turned on and not turned off (by an operator or by expiry) since.
    pub enabled: bool,
    /// When it was last turned on (the sync start time; the 30-day clock runs from here).
    pub enabled_at_ms: Option<i64>,
    pub disabled_at_ms: Option<i64>,
    /// `operator` or `expired`.
    pub disabled_reason: Option<String>,
    /// Turned off while the task was `COMPLETED`: it can never be turned on again.
    pub locked: bool,
}

impl DataSync {
    /// On right now: enabled and not past its 30 days (even before the engine noticed).
    pub fn active(&self, now_ms: i64) -> bool {
        self.enabled && self.expires_at_ms().is_some_and(|exp| now_ms < exp)
    }

    pub fn expires_at_ms(&self) -> Option<i64> {
        self.enabled_at_ms
            .filter(|_| self.enabled)
            .map(|t| t.saturating_add(DATA_SYNC_MS))
    }
}

/// A task as stored (`migration.task` document).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskDoc {
    pub task_id: String,
    pub name: String,
    pub product_key: String,
    pub source_instance_id: String,
    pub target_instance_id: String,
    pub state: TaskState,
    pub config: MigrationConfig,
    #[serde(default)]
    pub data_sync: DataSync,
    /// Rolling back every device (`rollback {all:true}`) rather than the picked ones.
    #[serde(default)]
    pub rollback_all: bool,
    /// Stopped by a fault under `resume_mode` manual; `continue` clears it.
    #[serde(default)]
    pub halted: bool,
    /// The last fault, kept until the next successful batch.
    #[serde(default)]
    pub last_error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    #[serde(default)]
    pub completed_at_ms: Option<i64>,
}

/// Work queued for one device (persisted so a restart resumes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pending {
    Migrate,
    Rollback,
}

/// One device's status in a task (`migration.device` document, id `{task_id}/{device_name}`).
/// Devices without one are `NOT_MIGRATED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDoc {
    pub status: DeviceStatus,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub pending: Option<Pending>,
    pub updated_at_ms: i64,
}

/// Who did something to a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Actor {
    /// `api` (an operator's call) or `system` (the engine itself).
    pub kind: String,
    /// The caller's role (`api` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// First 12 hex digits of the SHA-256 of the caller's token (`api` only): names the token
    /// without revealing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
}

impl Actor {
    pub fn system() -> Actor {
        Actor {
            kind: "system".into(),
            role: None,
            token_id: None,
        }
    }

    pub fn api(role: &str, token_id: &str) -> Actor {
        Actor {
            kind: "api".into(),
            role: Some(role.to_owned()),
            token_id: Some(token_id.to_owned()),
        }
    }
}

/// One line of a task's log (`migration.log` document, id `{task_id}/{seq:012}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogEntry {
    pub seq: u64,
    pub at_ms: i64,
    pub actor: Actor,
    /// `create`, `config`, `canary`, `full`, `pause`, `continue`, `rollback`, `data_sync_on`,
    /// `data_sync_off`, `data_sync_expired`, `finished`, `fault`, `halted`, `swept`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_state: Option<TaskState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_state: Option<TaskState>,
    pub detail: String,
}

/// Devices of a task per status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeviceTotals {
    /// Devices of the product (plus failed ones that no longer exist).
    pub total: u64,
    pub not_migrated: u64,
    pub migrating: u64,
    pub migrated: u64,
    pub failed: u64,
    pub rolled_back: u64,
}

impl DeviceTotals {
    pub(crate) fn add(&mut self, s: DeviceStatus) {
        self.total += 1;
        *match s {
            DeviceStatus::NotMigrated => &mut self.not_migrated,
            DeviceStatus::Migrating => &mut self.migrating,
            DeviceStatus::Migrated => &mut self.migrated,
            DeviceStatus::Failed => &mut self.failed,
            DeviceStatus::RolledBack => &mut self.rolled_back,
        } += 1;
    }
}

/// Data sync as the details show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DataSyncView {
    /// Mirroring now.
    pub enabled: bool,
    /// The sync start time (when it was last turned on).
    pub started_at_ms: Option<i64>,
    /// When it turns itself off.
    pub expires_at_ms: Option<i64>,
    pub disabled_at_ms: Option<i64>,
    /// `operator` or `expired`.
    pub disabled_reason: Option<String>,
    /// False once it was turned off after the task `COMPLETED`.
    pub can_enable: bool,
}

/// Task details (`GET /api/v1/migrations/{tid}` and every lifecycle call's answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TaskDetails {
    pub task_id: String,
    pub name: String,
    pub product_key: String,
    pub source_instance_id: String,
    pub target_instance_id: String,
    pub state: TaskState,
    /// DCS-style summary next to the detailed state.
    pub status: SummaryStatus,
    /// Stopped by a fault until `continue` (resume_mode manual).
    pub halted: bool,
    /// The last fault, if any since the last successful batch.
    pub error: Option<String>,
    pub config: MigrationConfig,
    pub data_sync: DataSyncView,
    pub devices: DeviceTotals,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub completed_at_ms: Option<i64>,
}

/// One device in a task's device list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeviceMigration {
    pub device_name: String,
    pub status: DeviceStatus,
    /// Why it failed (`FAILED` only).
    pub reason: Option<String>,
    /// The instance that owns the device now (`null` if it no longer exists).
    pub instance_id: Option<String>,
    pub online: bool,
    /// Last status change (`null` for devices never touched).
    pub updated_at_ms: Option<i64>,
}

/// A device's status in its product's migration task, as the device details show it
/// (`GET /api/v1/products/{pk}/devices/{dn}` → `migration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeviceMigrationStatus {
    /// The product's migration task (the one in progress, or the last one while it exists).
    pub task_id: String,
    /// The task's state.
    pub task_state: TaskState,
    pub source_instance_id: String,
    pub target_instance_id: String,
    /// The device's status in that task.
    pub status: DeviceStatus,
    /// Why the last move failed (`FAILED` only).
    pub reason: Option<String>,
    /// Last status change (`null` for a device never touched: `NOT_MIGRATED`).
    pub updated_at_ms: Option<i64>,
}

/// A refused device name of a selection (canary or rollback).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RejectedRow {
    /// 1-based position in the selection (CSV: among the data rows).
    pub row: usize,
    pub device_name: String,
    /// `FG.2003` unknown device, `FG.1001` duplicate / invalid / not migrated.
    pub error_code: String,
    pub error_msg: String,
}

/// `bandwidth_limit_mb` within 1..=10240.
pub fn validate_config(config: &MigrationConfig) -> Result<(), MigrationError> {
    if let Some(b) = config.bandwidth_limit_mb {
        if !BANDWIDTH_MB_RANGE.contains(&b) {
            return Err(MigrationError::Invalid {
                field: "bandwidth_limit_mb",
                message: format!(
                    "must be an integer from {} to {}",
                    BANDWIDTH_MB_RANGE.start(),
                    BANDWIDTH_MB_RANGE.end()
                ),
            });
        }
    }
    Ok(())
}
