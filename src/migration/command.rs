//! The actor's mailbox: the [`Command`]s the engine's handles send to the worker, the
//! lifecycle [`Request`]s among them with their public argument types ([`NewTask`],
//! [`RollbackSelection`]), and the [`Outcome`] that comes back. Typed both ways, so the API side
//! and the actor cannot disagree about a request's shape.

use super::model::*;
use super::MigrationError;
use tokio::sync::oneshot;

/// A new task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    pub product_key: String,
    pub target_instance_id: String,
    pub name: Option<String>,
    pub config: MigrationConfig,
}

/// Which devices a rollback moves back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollbackSelection {
    All,
    Picked(Vec<String>),
}

/// The answer to a lifecycle call: the task now, and the selection rows that were refused.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub details: TaskDetails,
    pub rejected: Vec<RejectedRow>,
    /// Devices the call selected (canary / picked rollback).
    pub accepted: usize,
}

pub(super) enum Request {
    Create(NewTask),
    Delete,
    Configure(MigrationConfig),
    Canary(Vec<String>),
    Full,
    Pause,
    Continue,
    Rollback(RollbackSelection),
    DataSync(bool),
}

pub(super) enum Command {
    Task {
        task_id: String,
        request: Request,
        actor: Actor,
        reply: oneshot::Sender<Result<Option<Outcome>, MigrationError>>,
    },
    SetRate(u32, oneshot::Sender<()>),
    Wake,
    /// The registry deleted a device (the engine's registry observer sends it).
    DeviceDeleted {
        product_key: String,
        device_name: String,
        reply: oneshot::Sender<()>,
    },
}
