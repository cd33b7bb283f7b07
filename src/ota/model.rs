//! OTA value types: the job request ([`JobSpec`], validated by [`JobSpec::validate`]), the
//! stored [`Job`], and what the read APIs return ([`JobView`], [`TaskView`], statistics).
//!
//! Validation names the offending field by its JSON path (`rate.ramp.factor`, …).

use super::firmware::MAX_SRC_VERSIONS;
use super::task::{FailureReason, QueueReason, RetryPolicy, TaskState, TaskStatus};
use super::OtaError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Most device names a SPECIFIC job may list.
pub const MAX_DEVICE_NAMES: usize = 10_000;
/// Most devices a VERIFY_FIRMWARE job may target.
pub const MAX_VERIFY_DEVICES: usize = 10;
/// Most retries (AWS IoT Jobs' limit).
pub const MAX_RETRY_COUNT: u32 = 10;
/// Longest retry interval: 1440 minutes (the vendor's maximum).
pub const MAX_RETRY_INTERVAL_SECS: u64 = 1440 * 60;
/// Longest timeout: 7 days (AWS IoT Jobs' in-progress maximum).
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
/// Highest push rate, devices per minute.
pub const MAX_PER_MINUTE: u32 = 1_000_000;
/// Most labels on a job.
pub const MAX_JOB_TAGS: usize = 20;
/// Longest ramp step, seconds (as long as the longest timeout).
pub const MAX_RAMP_EVERY_SECS: u64 = MAX_TIMEOUT_SECS;
/// History entries kept per task (older ones are dropped and counted).
pub const MAX_HISTORY: usize = 100;

/// VERIFY_FIRMWARE (try a package on a few devices; success marks it VERIFIED) or
/// UPGRADE_FIRMWARE.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobType {
    VerifyFirmware,
    #[default]
    UpgradeFirmware,
}

/// STATIC: the devices matching at creation. DYNAMIC: also devices that come to match (new
/// devices, version reports) while the job is active.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Selection {
    #[default]
    Static,
    Dynamic,
}

/// Which devices of the package's product the job targets.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TargetKind {
    All,
    /// `device_names` (or an uploaded list).
    Specific,
    /// `gray_percent` of the matching devices (chosen by a stable hash of job and device).
    Gray,
    /// Devices whose tags match `target_tags`.
    Tag,
}

/// `{"key": "region", "value": "eu"}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TagFilter {
    /// 1..=64 characters.
    #[schema(min_length = 1, max_length = 64)]
    pub key: String,
    /// Absent: the device only needs the key.
    #[serde(default)]
    pub value: Option<String>,
}

/// Exponential ramp of the push rate (AWS IoT Jobs' exponential rollout): the rate starts at
/// `rate.per_minute` and is multiplied by `factor` every `every_seconds` and/or after every
/// `every_succeeded` successes, up to `max_per_minute`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RampSpec {
    /// 1.1..=5.
    #[schema(minimum = 1.1, maximum = 5)]
    pub factor: f64,
    /// Step up every this many seconds, 1..=604800 (at least one of `every_seconds` and
    /// `every_succeeded` is required).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 604800)]
    pub every_seconds: Option<u64>,
    /// Step up after every this many successes (≥ 1).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub every_succeeded: Option<u64>,
    /// The ramp's ceiling: `rate.per_minute`..=1,000,000.
    #[schema(minimum = 1, maximum = 1000000)]
    pub max_per_minute: u32,
}

/// Push rate: `per_minute` devices per minute with up to `burst` at once (default: a second's
/// worth, at least 1), optionally ramping up.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateSpec {
    /// 1..=1,000,000.
    #[schema(minimum = 1, maximum = 1000000)]
    pub per_minute: u32,
    /// 1..=1,000,000.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000000)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub ramp: Option<RampSpec>,
}

/// What the abort rule does when it fires.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AbortAction {
    /// Cancel the job: tasks not started fail with ABORTED, IN_PROGRESS ones finish.
    #[default]
    Cancel,
    /// Pause the job: no further pushes until `POST …/resume`.
    Pause,
}

/// AWS-style abort rule: once at least `min_finished` tasks finished, if `failure_percent` of
/// them failed with one of `failure_reasons` (default: every device-caused failure), act.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AbortSpec {
    /// ≥ 1.
    #[schema(minimum = 1)]
    pub min_finished: u32,
    /// 0 < p ≤ 100.
    #[schema(exclusive_minimum = 0, maximum = 100)]
    pub failure_percent: f64,
    #[serde(default)]
    pub failure_reasons: Vec<FailureReason>,
    #[serde(default)]
    pub action: AbortAction,
}

/// The body of `POST /api/v1/ota/jobs`. Besides each field's own bounds: `device_names` only
/// (and required) with target SPECIFIC, `gray_percent` only (and required) with GRAY,
/// `target_tags` only (and required) with TAG; VERIFY_FIRMWARE jobs are STATIC and SPECIFIC
/// with at most 10 devices; `finish_by_ms` is in the future and after `start_at_ms`;
/// `retry_interval_seconds` is required with a `retry_count` above 0.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// A package's id (not blank).
    #[schema(min_length = 1, pattern = "\\S")]
    pub firmware_id: String,
    #[serde(default)]
    pub job_type: JobType,
    #[serde(default)]
    pub selection: Selection,
    pub target: TargetKind,
    /// SPECIFIC: the devices (≤ 10,000; ≤ 10 for VERIFY_FIRMWARE), each named once, 1..=64
    /// characters.
    #[serde(default)]
    #[schema(schema_with = device_names_schema)]
    pub device_names: Vec<String>,
    /// GRAY: percent of the matching devices, 0 < p ≤ 100.
    #[serde(default)]
    #[schema(exclusive_minimum = 0, maximum = 100)]
    pub gray_percent: Option<f64>,
    /// TAG: every listed key must match (values of one key are alternatives).
    #[serde(default)]
    pub target_tags: Vec<TagFilter>,
    /// Versions to upgrade from (default: the package's `src_versions`; empty = any): at most
    /// 10, each 1..=64 characters.
    #[serde(default)]
    #[schema(schema_with = src_versions_schema)]
    pub src_versions: Option<Vec<String>>,
    /// Push rate (default: unlimited).
    #[serde(default)]
    pub rate: Option<RateSpec>,
    /// Start pushing at (ms since the epoch); before that tasks are QUEUED (SCHEDULED).
    #[serde(default)]
    #[schema(minimum = 0)]
    pub start_at_ms: Option<i64>,
    /// Stop at (ms): tasks not yet started are canceled, a DYNAMIC policy ends.
    #[serde(default)]
    pub finish_by_ms: Option<i64>,
    /// From the first progress to the target version, per attempt (1..=604800).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 604800)]
    pub timeout_seconds: Option<u64>,
    /// Longest silence while IN_PROGRESS before TIMEOUT (1..=604800).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 604800)]
    pub stall_seconds: Option<u64>,
    /// Wait before the first retry (0..=86400).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 86400)]
    pub retry_interval_seconds: Option<u64>,
    /// Retries after device failures and wrong versions (0..=10).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 10)]
    pub retry_count: Option<u32>,
    /// Each further retry waits this many times longer (1..=10, default 1: fixed interval).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10)]
    pub retry_backoff: Option<f64>,
    /// Cap of one retry wait, seconds (1..=604800).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 604800)]
    pub retry_max_interval_seconds: Option<u64>,
    /// Random extra wait, percent of the wait (0..=100).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100)]
    pub retry_jitter_percent: Option<u32>,
    /// Replace a device's unfinished task of another job (never an IN_PROGRESS one).
    #[serde(default)]
    pub overwrite: bool,
    /// Tasks wait in CONFIRM until `POST …/confirm`.
    #[serde(default)]
    pub need_confirm: bool,
    /// Allow an UPGRADE_FIRMWARE job for a package that is not VERIFIED.
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub abort: Option<AbortSpec>,
    /// Labels on the job itself: at most 20, keys 1..=64 characters, values at most 128.
    #[serde(default)]
    #[schema(schema_with = job_tags_schema)]
    pub tags: BTreeMap<String, String>,
    /// 1..=64 characters.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 64)]
    pub name: Option<String>,
    /// At most 1024 characters.
    #[serde(default)]
    #[schema(max_length = 1024)]
    pub description: Option<String>,
}

fn device_names_schema() -> utoipa::openapi::schema::Array {
    crate::schema::string_list(
        "SPECIFIC: the devices (≤ 10,000; ≤ 10 for VERIFY_FIRMWARE), each named once, 1..=64 \
         characters.",
        false,
        MAX_DEVICE_NAMES,
        crate::schema::text(1, 64, None),
        true,
    )
}

fn src_versions_schema() -> utoipa::openapi::schema::Array {
    crate::schema::string_list(
        "Versions to upgrade from (default: the package's `src_versions`; empty = any): at most \
         10, each 1..=64 characters.",
        true,
        MAX_SRC_VERSIONS,
        crate::schema::text(1, 64, None),
        false,
    )
}

fn job_tags_schema() -> utoipa::openapi::schema::Object {
    crate::schema::string_map(
        "Labels on the job itself: at most 20, keys 1..=64 characters, values at most 128.",
        false,
        MAX_JOB_TAGS,
        crate::schema::text(1, 64, None),
        crate::schema::text(0, 128, None),
    )
}

fn invalid(field: &str, message: impl Into<String>) -> OtaError {
    OtaError::invalid(field, message)
}

impl JobSpec {
    /// Checks every field on its own and against the others; `now` judges the schedule.
    pub fn validate(&mut self, now: i64) -> Result<(), OtaError> {
        if self.firmware_id.trim().is_empty() {
            return Err(invalid("firmware_id", "must not be empty"));
        }
        self.validate_target()?;
        self.validate_src_versions()?;
        self.validate_rate()?;
        self.validate_schedule(now)?;
        self.validate_timers()?;
        self.validate_abort_and_labels()
    }

    /// `target` with the fields that belong to it (device names, gray percent, tags), and
    /// what VERIFY_FIRMWARE allows.
    fn validate_target(&self) -> Result<(), OtaError> {
        match self.target {
            TargetKind::Specific => {
                if self.device_names.is_empty() {
                    return Err(invalid(
                        "device_names",
                        "SPECIFIC needs at least one device name",
                    ));
                }
                if self.device_names.len() > MAX_DEVICE_NAMES {
                    return Err(OtaError::TooMany {
                        field: "device_names",
                        max: MAX_DEVICE_NAMES,
                    });
                }
                let mut seen = std::collections::HashSet::new();
                for (i, dn) in self.device_names.iter().enumerate() {
                    if dn.is_empty() || dn.chars().count() > 64 {
                        return Err(invalid(
                            &format!("device_names[{i}]"),
                            "must be 1..=64 characters",
                        ));
                    }
                    if !seen.insert(dn.as_str()) {
                        return Err(invalid(
                            &format!("device_names[{i}]"),
                            format!("{dn:?} is listed twice"),
                        ));
                    }
                }
            }
            _ if !self.device_names.is_empty() => {
                return Err(invalid("device_names", "only for target SPECIFIC"));
            }
            _ => {}
        }
        match (self.target, self.gray_percent) {
            (TargetKind::Gray, None) => {
                return Err(invalid("gray_percent", "GRAY needs gray_percent"))
            }
            (TargetKind::Gray, Some(p)) if !(p > 0.0 && p <= 100.0) => {
                return Err(invalid("gray_percent", "must be > 0 and ≤ 100"))
            }
            (TargetKind::Gray, _) => {}
            (_, Some(_)) => return Err(invalid("gray_percent", "only for target GRAY")),
            _ => {}
        }
        match self.target {
            TargetKind::Tag if self.target_tags.is_empty() => {
                return Err(invalid("target_tags", "TAG needs at least one tag"))
            }
            TargetKind::Tag => {
                for (i, t) in self.target_tags.iter().enumerate() {
                    if t.key.is_empty() || t.key.chars().count() > 64 {
                        return Err(invalid(
                            &format!("target_tags[{i}].key"),
                            "must be 1..=64 characters",
                        ));
                    }
                }
            }
            _ if !self.target_tags.is_empty() => {
                return Err(invalid("target_tags", "only for target TAG"))
            }
            _ => {}
        }
        if self.job_type == JobType::VerifyFirmware {
            if self.target != TargetKind::Specific {
                return Err(invalid(
                    "target",
                    "VERIFY_FIRMWARE jobs target SPECIFIC devices",
                ));
            }
            if self.device_names.len() > MAX_VERIFY_DEVICES {
                return Err(OtaError::TooMany {
                    field: "device_names",
                    max: MAX_VERIFY_DEVICES,
                });
            }
            if self.selection != Selection::Static {
                return Err(invalid("selection", "VERIFY_FIRMWARE jobs are STATIC"));
            }
        }
        Ok(())
    }

    fn validate_src_versions(&self) -> Result<(), OtaError> {
        if let Some(src) = &self.src_versions {
            if src.len() > MAX_SRC_VERSIONS {
                return Err(OtaError::TooMany {
                    field: "src_versions",
                    max: MAX_SRC_VERSIONS,
                });
            }
            for (i, v) in src.iter().enumerate() {
                if v.is_empty() || v.chars().count() > 64 {
                    return Err(invalid(
                        &format!("src_versions[{i}]"),
                        "must be 1..=64 characters",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The push rate and its ramp.
    fn validate_rate(&self) -> Result<(), OtaError> {
        if let Some(rate) = &self.rate {
            if rate.per_minute == 0 || rate.per_minute > MAX_PER_MINUTE {
                return Err(invalid(
                    "rate.per_minute",
                    format!("must be 1..={MAX_PER_MINUTE}"),
                ));
            }
            if let Some(b) = rate.burst {
                if b == 0 || b > MAX_PER_MINUTE {
                    return Err(invalid(
                        "rate.burst",
                        format!("must be 1..={MAX_PER_MINUTE}"),
                    ));
                }
            }
            if let Some(r) = &rate.ramp {
                if !(r.factor >= 1.1 && r.factor <= 5.0) {
                    return Err(invalid("rate.ramp.factor", "must be 1.1..=5"));
                }
                if r.every_seconds.is_none() && r.every_succeeded.is_none() {
                    return Err(invalid(
                        "rate.ramp",
                        "needs every_seconds and/or every_succeeded",
                    ));
                }
                if let Some(s) = r.every_seconds {
                    if s == 0 || s > MAX_RAMP_EVERY_SECS {
                        return Err(invalid(
                            "rate.ramp.every_seconds",
                            format!("must be 1..={MAX_RAMP_EVERY_SECS}"),
                        ));
                    }
                }
                if r.every_succeeded == Some(0) {
                    return Err(invalid("rate.ramp.every_succeeded", "must be at least 1"));
                }
                if r.max_per_minute < rate.per_minute || r.max_per_minute > MAX_PER_MINUTE {
                    return Err(invalid(
                        "rate.ramp.max_per_minute",
                        format!("must be rate.per_minute..={MAX_PER_MINUTE}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `start_at_ms` and `finish_by_ms`, against each other and `now`.
    fn validate_schedule(&self, now: i64) -> Result<(), OtaError> {
        if let (Some(start), Some(finish)) = (self.start_at_ms, self.finish_by_ms) {
            if finish <= start {
                return Err(invalid("finish_by_ms", "must be after start_at_ms"));
            }
        }
        if let Some(finish) = self.finish_by_ms {
            if finish <= now {
                return Err(invalid("finish_by_ms", "must be in the future"));
            }
        }
        if let Some(start) = self.start_at_ms {
            if start < 0 {
                return Err(invalid(
                    "start_at_ms",
                    "must be a time in ms since the epoch",
                ));
            }
        }
        Ok(())
    }

    /// Timeout, stall and the retry policy.
    fn validate_timers(&self) -> Result<(), OtaError> {
        if let Some(t) = self.timeout_seconds {
            if t == 0 || t > MAX_TIMEOUT_SECS {
                return Err(invalid(
                    "timeout_seconds",
                    format!("must be 1..={MAX_TIMEOUT_SECS}"),
                ));
            }
        }
        if let Some(t) = self.stall_seconds {
            if t == 0 || t > MAX_TIMEOUT_SECS {
                return Err(invalid(
                    "stall_seconds",
                    format!("must be 1..={MAX_TIMEOUT_SECS}"),
                ));
            }
        }
        if let Some(c) = self.retry_count {
            if c > MAX_RETRY_COUNT {
                return Err(invalid(
                    "retry_count",
                    format!("must be 0..={MAX_RETRY_COUNT}"),
                ));
            }
        }
        if let Some(i) = self.retry_interval_seconds {
            if i > MAX_RETRY_INTERVAL_SECS {
                return Err(invalid(
                    "retry_interval_seconds",
                    format!("must be 0..={MAX_RETRY_INTERVAL_SECS}"),
                ));
            }
        }
        if self.retry_count.unwrap_or(0) > 0 && self.retry_interval_seconds.is_none() {
            return Err(invalid(
                "retry_interval_seconds",
                "required with retry_count",
            ));
        }
        if let Some(b) = self.retry_backoff {
            if !(1.0..=10.0).contains(&b) {
                return Err(invalid("retry_backoff", "must be 1..=10"));
            }
        }
        if let Some(m) = self.retry_max_interval_seconds {
            if m == 0 || m > MAX_TIMEOUT_SECS {
                return Err(invalid(
                    "retry_max_interval_seconds",
                    format!("must be 1..={MAX_TIMEOUT_SECS}"),
                ));
            }
        }
        if let Some(j) = self.retry_jitter_percent {
            if j > 100 {
                return Err(invalid("retry_jitter_percent", "must be 0..=100"));
            }
        }
        Ok(())
    }

    /// The abort rule, tags, name and description.
    fn validate_abort_and_labels(&self) -> Result<(), OtaError> {
        if let Some(a) = &self.abort {
            if a.min_finished == 0 {
                return Err(invalid("abort.min_finished", "must be at least 1"));
            }
            if !(a.failure_percent > 0.0 && a.failure_percent <= 100.0) {
                return Err(invalid("abort.failure_percent", "must be > 0 and ≤ 100"));
            }
        }
        if self.tags.len() > MAX_JOB_TAGS {
            return Err(OtaError::TooMany {
                field: "tags",
                max: MAX_JOB_TAGS,
            });
        }
        for (k, v) in &self.tags {
            if k.is_empty() || k.chars().count() > 64 || v.chars().count() > 128 {
                return Err(invalid(
                    &format!("tags.{k}"),
                    "keys 1..=64, values ≤128 characters",
                ));
            }
        }
        if let Some(n) = &self.name {
            if n.is_empty() || n.chars().count() > 64 {
                return Err(invalid("name", "must be 1..=64 characters"));
            }
        }
        if let Some(d) = &self.description {
            if d.chars().count() > 1024 {
                return Err(invalid("description", "at most 1024 characters"));
            }
        }
        Ok(())
    }

    pub(crate) fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            count: self.retry_count.unwrap_or(0),
            interval_ms: self.retry_interval_seconds.unwrap_or(0) as i64 * 1000,
            backoff: self.retry_backoff.unwrap_or(1.0),
            max_interval_ms: self.retry_max_interval_seconds.unwrap_or(0) as i64 * 1000,
            jitter_percent: self.retry_jitter_percent.unwrap_or(0),
        }
    }
}

/// Job status: PLANNED (scheduled start not reached) → IN_PROGRESS → COMPLETED, or CANCELED;
/// PAUSED while an abort rule (or an operator) holds its pushes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    Planned,
    InProgress,
    Paused,
    Completed,
    Canceled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Planned => "PLANNED",
            JobStatus::InProgress => "IN_PROGRESS",
            JobStatus::Paused => "PAUSED",
            JobStatus::Completed => "COMPLETED",
            JobStatus::Canceled => "CANCELED",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        [
            JobStatus::Planned,
            JobStatus::InProgress,
            JobStatus::Paused,
            JobStatus::Completed,
            JobStatus::Canceled,
        ]
        .into_iter()
        .find(|j| j.as_str().eq_ignore_ascii_case(s))
    }

    pub fn is_finished(self) -> bool {
        matches!(self, JobStatus::Completed | JobStatus::Canceled)
    }
}

/// A job as stored (`ota.job` document) and shown.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct Job {
    /// `job-` + 16 lowercase letters/digits.
    pub job_id: String,
    pub product_key: String,
    pub module: String,
    /// The package's version: the target.
    pub dest_version: String,
    /// Effective source versions (empty = any).
    pub src_versions: Vec<String>,
    pub status: JobStatus,
    /// Why the job is CANCELED/PAUSED/COMPLETED (operator, abort rule, finish_by…).
    #[serde(default)]
    pub status_reason: Option<String>,
    /// DYNAMIC jobs: whether devices that come to match still join.
    pub dynamic_active: bool,
    pub spec: JobSpec,
    pub created_at_ms: i64,
    #[serde(default)]
    pub started_at_ms: Option<i64>,
    #[serde(default)]
    pub finished_at_ms: Option<i64>,
    #[serde(default)]
    pub updated_at_ms: i64,
}

/// Tasks per status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, ToSchema)]
pub struct TaskCounters {
    pub total: u64,
    pub confirm: u64,
    pub queued: u64,
    pub notified: u64,
    pub in_progress: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub canceled: u64,
}

impl TaskCounters {
    pub fn from_array(c: [u64; 7]) -> Self {
        TaskCounters {
            total: c.iter().sum(),
            confirm: c[TaskStatus::Confirm.index()],
            queued: c[TaskStatus::Queued.index()],
            notified: c[TaskStatus::Notified.index()],
            in_progress: c[TaskStatus::InProgress.index()],
            succeeded: c[TaskStatus::Succeeded.index()],
            failed: c[TaskStatus::Failed.index()],
            canceled: c[TaskStatus::Canceled.index()],
        }
    }

    pub fn unfinished(&self) -> u64 {
        self.confirm + self.queued + self.notified + self.in_progress
    }
}

/// A job with its task counters, as `GET /api/v1/ota/jobs/{jid}` returns it.
#[derive(Serialize, Clone, Debug, ToSchema)]
pub struct JobView {
    #[serde(flatten)]
    pub job: Job,
    pub counters: TaskCounters,
    /// Current push rate (devices/minute) when the job has one (ramps change it).
    pub current_rate_per_minute: Option<f64>,
    /// Only in the answer that creates a SPECIFIC job: each listed device that got no task,
    /// with why (already at the target version, or not at one of the source versions).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_selected: Vec<NotSelected>,
}

/// A device a SPECIFIC job names but does not take.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, ToSchema)]
pub struct NotSelected {
    pub device_name: String,
    /// E.g. `already at 2.1.0`, `reports 1.0.0 of module mcu, not a source version (2.0.0,
    /// 2.0.1)`, `never reported a version of module mcu; the job has source versions`.
    pub reason: String,
}

/// One history entry of a task: every push, state change, retry and failure.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, ToSchema)]
pub struct HistoryEntry {
    pub at_ms: i64,
    /// A [`HistoryEvent`](crate::ota::task::HistoryEvent) name: `created`, `confirmed`,
    /// `queued`, `pushed`, `repushed`, `pulled`, `push_deferred`, `repush_scheduled`,
    /// `progress_started`, `retry_scheduled`, `retrying`, `succeeded`, `failed`, `canceled`.
    /// Kept as text in the stored document, so a document written by another version still
    /// loads.
    pub event: String,
    pub from_status: TaskStatus,
    pub to_status: TaskStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A task as stored (`ota.task` document, id `{job_id}/{pk}/{dn}`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TaskRecord {
    pub job_id: String,
    pub product_key: String,
    pub device_name: String,
    pub state: TaskState,
    pub history: Vec<HistoryEntry>,
    /// Entries dropped from the front of `history` (it keeps the last [`MAX_HISTORY`]).
    #[serde(default)]
    pub history_dropped: u64,
}

/// A task as the API shows it.
#[derive(Serialize, Clone, Debug, ToSchema)]
pub struct TaskView {
    pub job_id: String,
    pub product_key: String,
    pub device_name: String,
    pub module: String,
    pub dest_version: String,
    pub status: TaskStatus,
    pub queue_reason: Option<QueueReason>,
    pub scheduled_at_ms: Option<i64>,
    pub src_version: Option<String>,
    pub progress: Option<u8>,
    pub failure: Option<FailureReason>,
    /// The vendor's progress code for device failures (-1..-4).
    pub failure_code: Option<i32>,
    pub failure_detail: Option<String>,
    pub pushes: u32,
    pub attempt: u32,
    pub retries_used: u32,
    pub next_retry_at_ms: Option<i64>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub notified_at_ms: Option<i64>,
    pub first_progress_at_ms: Option<i64>,
    pub last_progress_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// Only in single-task and timeline views.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<HistoryEntry>>,
}

/// Success rate and failures of a job or a firmware package.
#[derive(Serialize, Clone, Debug, Default, ToSchema)]
pub struct JobStatistics {
    pub counters: TaskCounters,
    /// succeeded / (succeeded + failed), null before anything finished.
    pub success_rate: Option<f64>,
    /// FAILED tasks by failure reason.
    pub failures: BTreeMap<String, u64>,
    /// Retries scheduled over all tasks.
    pub retries: u64,
    /// Upgrade messages delivered over all tasks.
    pub pushes: u64,
}

/// Devices per reported version of one module.
#[derive(Serialize, Clone, Debug, ToSchema)]
pub struct VersionDistribution {
    pub product_key: String,
    pub module: String,
    pub total_devices: u64,
    /// Devices that never reported this module.
    pub unknown: u64,
    /// version → devices, most devices first.
    pub versions: Vec<VersionCount>,
}

#[derive(Serialize, Clone, Debug, ToSchema)]
pub struct VersionCount {
    pub version: String,
    pub devices: u64,
    pub percent: f64,
}
