//! Over-the-air upgrades (docs/DESIGN.md §4).
//!
//! # Layout
//!
//! - [`firmware`]: packages, content-addressed bytes, signed download URLs (owned by the
//!   firmware half; jobs only ask it for packages, [`UpgradeData`](fleetgate_topics::UpgradeData)
//!   and status changes of VERIFY_FIRMWARE jobs).
//! - [`model`]: what an operator sends and sees: [`JobSpec`] (validated job request), [`Job`],
//!   task views, statistics.
//! - [`task`]: the per-device task state machine as a pure function
//!   `transition(state, policy, event, now) -> Transition`; no I/O, no clock, tested
//!   exhaustively.
//! - [`rate`]: push-rate limiting (governor on the engine's clock) and the exponential ramp.
//! - [`engine`]: [`OtaEngine`], which owns every job and task in memory (DashMaps), persists
//!   each transition before acting on it, and runs ONE deadline task for pushes, timeouts,
//!   stalls, retries, schedules and ramp steps.
//! - [`events`]: [`TaskEvent`], the state changes other components (the AMQP forwarder)
//!   subscribe to.
//!
//! The engine never reaches into the registry's maps: it reads devices through
//! [`Registry`](crate::registry::Registry) methods and publishes through a [`Pusher`]
//! (the broker's `Downlink` in the app).

pub mod engine;
pub mod events;
pub mod firmware;
pub mod model;
pub mod rate;
pub mod task;

pub use engine::{DeviceReport, EngineConfig, Handled, OtaEngine, Pusher, Relay};
pub use events::{TaskEvent, TaskEventSink};
pub use firmware::{FirmwareError, FirmwarePackage, FirmwareRepo, FirmwareStatus};
pub use model::*;
pub use task::{FailureReason, HistoryEvent, QueueReason, TaskStatus};

use crate::registry::RegistryError;
use crate::store::StoreError;

/// Errors of OTA job operations.
#[derive(Debug, thiserror::Error)]
pub enum OtaError {
    /// A request field is invalid; `field` is its JSON path.
    #[error("invalid {field}: {message}")]
    Invalid { field: String, message: String },
    #[error("too many {field}: at most {max}")]
    TooMany { field: &'static str, max: usize },
    #[error("job {0:?} not found")]
    JobNotFound(String),
    #[error("device {device_name:?} has no task in job {job_id:?}")]
    TaskNotFound { job_id: String, device_name: String },
    #[error("firmware {0:?} not found")]
    FirmwareNotFound(String),
    /// An UPGRADE_FIRMWARE job for a package that is not VERIFIED, without `force`.
    #[error(
        "firmware {firmware_id:?} is {}, not VERIFIED: verify it first (a VERIFY_FIRMWARE job) or set force: true",
        .status.as_str()
    )]
    FirmwareNotVerified {
        firmware_id: String,
        status: FirmwareStatus,
    },
    /// The request conflicts with the job's state (e.g. confirming a canceled job).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Firmware(#[from] FirmwareError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("corrupt OTA document {id:?}: {message}")]
    Corrupt { id: String, message: String },
}

impl OtaError {
    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        OtaError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}
