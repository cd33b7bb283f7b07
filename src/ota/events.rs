//! OTA task state changes as events for other components (the AMQP forwarder mirrors them to
//! consumer groups).
//!
//! Two ways to receive them, both fed only AFTER the change is durable in the store:
//!
//! - [`OtaEngine::subscribe_events`](super::OtaEngine::subscribe_events): a
//!   `tokio::sync::broadcast` receiver. Cheap, but a receiver that falls behind by more than
//!   the channel capacity gets `RecvError::Lagged(n)` and loses those events.
//! - [`OtaEngine::set_event_sink`](super::OtaEngine::set_event_sink): a callback run
//!   synchronously for every event, in order per task. Use it to put events into a durable
//!   outbox (at-least-once); it must not block (no I/O waits, no `.await`).
//!
//! Emitted for every status change and every noted step (push, retry scheduled, re-push…), not
//! for plain progress-percent updates.

use super::task::{FailureReason, QueueReason, TaskStatus};
use serde::Serialize;
use std::sync::Arc;
use utoipa::ToSchema;

/// One task change.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, ToSchema)]
pub struct TaskEvent {
    pub job_id: String,
    pub firmware_id: String,
    pub product_key: String,
    pub device_name: String,
    /// The instance owning the device when the event happened; for a deleted device's
    /// `DEVICE_DELETED` cancel, the instance that owned it. Null when unknown (a deletion
    /// noticed only at start, after a crash).
    pub instance_id: Option<String>,
    pub module: String,
    pub dest_version: String,
    pub from_state: TaskStatus,
    pub to_state: TaskStatus,
    /// The history event name (`pushed`, `failed`, `retry_scheduled`, …; see
    /// [`HistoryEvent`](super::task::HistoryEvent)).
    pub event: String,
    pub reason: Option<String>,
    pub queue_reason: Option<QueueReason>,
    pub failure: Option<FailureReason>,
    pub progress: Option<u8>,
    pub attempt: u32,
    pub retries_used: u32,
    /// ms since the Unix epoch (the engine's clock).
    pub at_ms: i64,
}

/// A synchronous event consumer (see the module docs).
pub type TaskEventSink = Arc<dyn Fn(&TaskEvent) + Send + Sync>;
