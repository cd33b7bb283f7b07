//! What the state machine works on: a task's visible [`TaskStatus`], why it is queued
//! ([`QueueReason`]) or failed ([`FailureReason`]), everything it knows about one task
//! ([`TaskState`], persisted in the task document) and what its job decides for it
//! ([`TaskPolicy`], [`RetryPolicy`]).

use fleetgate_topics::FailureCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The visible status of a task.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ToSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskStatus {
    Confirm,
    Queued,
    Notified,
    InProgress,
    Succeeded,
    Failed,
    Canceled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 7] = [
        TaskStatus::Confirm,
        TaskStatus::Queued,
        TaskStatus::Notified,
        TaskStatus::InProgress,
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Confirm => "CONFIRM",
            TaskStatus::Queued => "QUEUED",
            TaskStatus::Notified => "NOTIFIED",
            TaskStatus::InProgress => "IN_PROGRESS",
            TaskStatus::Succeeded => "SUCCEEDED",
            TaskStatus::Failed => "FAILED",
            TaskStatus::Canceled => "CANCELED",
        }
    }

    /// Position in [`TaskStatus::ALL`] (counter arrays are indexed by it).
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Canceled
        )
    }

    pub fn parse(s: &str) -> Option<TaskStatus> {
        TaskStatus::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
    }
}

impl std::fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a QUEUED task has not been pushed yet.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum QueueReason {
    /// The device is offline; the push goes out when it connects.
    Offline,
    /// The job starts later (`scheduled_at_ms`).
    Scheduled,
    /// Waiting for a slot of the job's push rate.
    RateLimited,
}

impl QueueReason {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueReason::Offline => "OFFLINE",
            QueueReason::Scheduled => "SCHEDULED",
            QueueReason::RateLimited => "RATE_LIMITED",
        }
    }
}

/// Why a task FAILED (or why a retry was scheduled).
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ToSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailureReason {
    /// Progress -1.
    UpdateFailed,
    /// Progress -2.
    DownloadFailed,
    /// Progress -3.
    VerifyFailed,
    /// Progress -4.
    WriteFailed,
    /// No target version within `timeout_seconds` of the first progress, or no progress for
    /// `stall_seconds` while IN_PROGRESS.
    Timeout,
    /// A version that is neither source nor target while IN_PROGRESS.
    WrongVersion,
    /// Replaced by a later job with `overwrite`.
    Overwritten,
    /// The device had an unfinished task of another job and this job does not overwrite (or
    /// that task was IN_PROGRESS).
    Conflict,
    /// The job's abort rule stopped the job before this task was pushed or started.
    Aborted,
}

impl FailureReason {
    pub const ALL: [FailureReason; 9] = [
        FailureReason::UpdateFailed,
        FailureReason::DownloadFailed,
        FailureReason::VerifyFailed,
        FailureReason::WriteFailed,
        FailureReason::Timeout,
        FailureReason::WrongVersion,
        FailureReason::Overwritten,
        FailureReason::Conflict,
        FailureReason::Aborted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::UpdateFailed => "UPDATE_FAILED",
            FailureReason::DownloadFailed => "DOWNLOAD_FAILED",
            FailureReason::VerifyFailed => "VERIFY_FAILED",
            FailureReason::WriteFailed => "WRITE_FAILED",
            FailureReason::Timeout => "TIMEOUT",
            FailureReason::WrongVersion => "WRONG_VERSION",
            FailureReason::Overwritten => "OVERWRITTEN",
            FailureReason::Conflict => "CONFLICT",
            FailureReason::Aborted => "ABORTED",
        }
    }

    pub fn parse(s: &str) -> Option<FailureReason> {
        FailureReason::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(s))
    }

    /// The device's progress code (-1..-4) for device-reported failures.
    pub fn step_code(self) -> Option<i32> {
        match self {
            FailureReason::UpdateFailed => Some(-1),
            FailureReason::DownloadFailed => Some(-2),
            FailureReason::VerifyFailed => Some(-3),
            FailureReason::WriteFailed => Some(-4),
            _ => None,
        }
    }

    /// Failures a retry may cure (the vendor's rule: device codes and wrong version).
    pub fn retryable(self) -> bool {
        self.step_code().is_some() || self == FailureReason::WrongVersion
    }

    /// Failures the device caused (what abort rules count by default).
    pub fn device_caused(self) -> bool {
        self.retryable() || self == FailureReason::Timeout
    }
}

impl From<FailureCode> for FailureReason {
    fn from(c: FailureCode) -> Self {
        match c {
            FailureCode::UpdateFailed => FailureReason::UpdateFailed,
            FailureCode::DownloadFailed => FailureReason::DownloadFailed,
            FailureCode::VerifyFailed => FailureReason::VerifyFailed,
            FailureCode::WriteFailed => FailureReason::WriteFailed,
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a job retries failed attempts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 = none).
    pub count: u32,
    /// Wait before the first retry.
    pub interval_ms: i64,
    /// Each further retry waits `factor` times longer (1.0 = the vendor's fixed interval).
    pub backoff: f64,
    /// Cap of one wait (before jitter); 0 = no cap.
    pub max_interval_ms: i64,
    /// Up to this percent of the wait is added at random (deterministic per task and retry).
    pub jitter_percent: u32,
}

impl RetryPolicy {
    /// Wait before retry number `n` (1-based) of a task with `seed`.
    pub fn delay_ms(&self, n: u32, seed: u64) -> i64 {
        let factor = if self.backoff > 1.0 {
            self.backoff.powi(n.saturating_sub(1).min(64) as i32)
        } else {
            1.0
        };
        let mut base = (self.interval_ms as f64 * factor).min(i64::MAX as f64 / 4.0) as i64;
        if self.max_interval_ms > 0 {
            base = base.min(self.max_interval_ms);
        }
        let jitter = if self.jitter_percent > 0 && base > 0 {
            let u = (splitmix(seed ^ u64::from(n)) % 10_000) as f64 / 10_000.0;
            (base as f64 * f64::from(self.jitter_percent) / 100.0 * u) as i64
        } else {
            0
        };
        base.saturating_add(jitter)
    }
}

/// A deterministic 64-bit mix (jitter must be the same after a restart).
pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// What a job decides for each of its tasks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TaskPolicy {
    /// The module the job upgrades; events of other modules are ignored.
    pub module: String,
    /// The target version: reporting it means SUCCEEDED.
    pub dest_version: String,
    /// Accepted source versions (besides the task's own `src_version`).
    pub src_versions: Vec<String>,
    /// From the first progress of an attempt to the target version.
    pub timeout_ms: Option<i64>,
    /// Longest silence while IN_PROGRESS.
    pub stall_ms: Option<i64>,
    pub retry: RetryPolicy,
    /// After a device connects, wait this long before re-pushing (it subscribes after CONNACK).
    pub connect_push_delay_ms: i64,
}

/// Everything the state machine knows about one task. Persisted as part of the task document.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, ToSchema)]
pub struct TaskState {
    pub status: TaskStatus,
    /// Set while QUEUED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_reason: Option<QueueReason>,
    /// When a SCHEDULED task's job starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at_ms: Option<i64>,
    /// The device's version of the module when the task was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_version: Option<String>,
    /// Last progress percent of the current attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
    /// Set when FAILED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureReason>,
    /// Human-readable detail of the failure (or of the failure being retried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_detail: Option<String>,
    /// The failure a pending or past retry answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<FailureReason>,
    /// Upgrade messages delivered (pushes, re-pushes and pulls).
    #[serde(default)]
    pub pushes: u32,
    /// Current attempt (0 before the first push).
    #[serde(default)]
    pub attempt: u32,
    #[serde(default)]
    pub retries_used: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repush_at_ms: Option<i64>,
    /// A (re)push was due while the device was offline.
    #[serde(default)]
    pub push_on_connect: bool,
    /// Seed of this task's retry jitter.
    #[serde(default)]
    pub seed: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notified_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_started_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_progress_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
}

impl TaskState {
    /// A new task in `status` (CONFIRM, QUEUED with `queue`, or FAILED(CONFLICT) at birth).
    pub fn new(
        status: TaskStatus,
        queue: Option<QueueReason>,
        src_version: Option<String>,
        seed: u64,
        now: i64,
    ) -> Self {
        TaskState {
            status,
            queue_reason: if status == TaskStatus::Queued {
                queue
            } else {
                None
            },
            scheduled_at_ms: None,
            src_version,
            progress: None,
            failure: None,
            failure_detail: None,
            last_failure: None,
            pushes: 0,
            attempt: 0,
            retries_used: 0,
            retry_at_ms: None,
            repush_at_ms: None,
            push_on_connect: false,
            seed,
            created_at_ms: now,
            updated_at_ms: now,
            notified_at_ms: None,
            attempt_started_at_ms: None,
            first_progress_at_ms: None,
            last_progress_at_ms: None,
            finished_at_ms: None,
        }
    }

    /// A task born FAILED (CONFLICT).
    pub fn failed_at_birth(
        reason: FailureReason,
        detail: String,
        src_version: Option<String>,
        seed: u64,
        now: i64,
    ) -> Self {
        let mut t = TaskState::new(TaskStatus::Failed, None, src_version, seed, now);
        t.failure = Some(reason);
        t.failure_detail = Some(detail);
        t.finished_at_ms = Some(now);
        t
    }

    /// Waiting in its job's push queue (the only tasks the push scheduler looks at).
    pub fn is_ready(&self) -> bool {
        self.status == TaskStatus::Queued && self.queue_reason == Some(QueueReason::RateLimited)
    }

    /// The current attempt was pushed but the device has not started it: a push lost to a
    /// disconnect is possible, so a reconnect re-pushes.
    pub(crate) fn awaiting_first_progress(&self) -> bool {
        self.attempt_started_at_ms.is_some()
            && self.first_progress_at_ms.is_none()
            && self.retry_at_ms.is_none()
    }

    pub(super) fn is_active(&self) -> bool {
        matches!(self.status, TaskStatus::Notified | TaskStatus::InProgress)
    }

    /// A re-push is due at `now`.
    pub fn repush_due(&self, now: i64) -> bool {
        self.is_active() && self.repush_at_ms.is_some_and(|t| t <= now)
    }

    pub(super) fn clear_timers(&mut self) {
        self.retry_at_ms = None;
        self.repush_at_ms = None;
        self.push_on_connect = false;
    }
}
