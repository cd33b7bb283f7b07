//! Instance migration (docs/DESIGN.md §6): per-product tasks that move devices — and so their data
//! routing — from the product's (source) instance to a target instance, with a canary, a full
//! migration, pause/continue, rollback, a DCS-shaped configuration and TSL data sync.
//!
//! # Parts
//!
//! - [`machine`]: the task state machine as a pure function, tested over every (state, event).
//! - [`model`]: states, per-device statuses, configuration, the stored documents and the
//!   snapshots the API returns.
//! - [`engine`]: [`MigrationEngine`], one actor task that owns every change (lifecycle
//!   requests, device moves at a governed rate, data-sync expiry, fault retries) and a shared
//!   read view for the API; [`MigrationEngine::extra_targets`] is the forwarder's data-sync
//!   routing hook.
//! - `worker`: the actor behind the engine: device moves, finishing states, faults, expiry.
//! - `command`: the actor's mailbox ([`NewTask`], [`RollbackSelection`] in, [`Outcome`] out).
//! - `config`: [`EngineConfig`] (the `[migration]` settings) and the [`Hooks`] it calls out to.
//! - `shared`: the state the actor writes and the API and forwarder read, and task details.
//! - `docs`: store document kinds and ids.
//! - `mirror`: cluster mode — a standby node's copy of the holder's documents, kept current
//!   from the change feed.
//!
//! Layers point down: `engine` → `worker` → `command`, `config`, `shared`, `docs`, `machine`,
//! `model`; the worker never reaches back into the engine.
//!
//! # What it owns and what it must not touch
//!
//! It owns its store documents (`migration.task`, `migration.device`, `migration.log`). Device
//! ownership stays the registry's: the engine changes it only through
//! [`Registry::set_devices_instance`](crate::registry::Registry::set_devices_instance), which
//! commits each device's new owner together with the engine's status document. The product
//! itself stays in the source instance (as the vendor keeps it in the public instance);
//! devices created there after `COMPLETED` are swept to the target within a minute. Consumer
//! groups (forwarder) are never touched: a rollback leaves the target's groups in place.

mod command;
mod config;
mod docs;
pub mod engine;
pub mod machine;
mod mirror;
pub mod model;
mod shared;
mod worker;

#[cfg(test)]
mod tests;

pub use command::{NewTask, Outcome, RollbackSelection};
pub use config::{EngineConfig, Hooks, KickFn, RateLimitFn};
pub use engine::{DeviceListFilter, MigrationEngine, TaskFilter};
pub use machine::{transition, Event, Refused};
pub use mirror::KINDS as MIRRORED_KINDS;
pub use model::*;

use crate::registry::RegistryError;
use crate::store::StoreError;

/// Errors of migration operations.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("migration task {0} not found")]
    TaskNotFound(String),
    /// The product already has a task (a product migrates to one target only).
    #[error("product {product_key} already has migration task {task_id} ({state}, target {target_instance_id}); a product migrates to one target at a time — delete that task first (allowed in TO_MIGRATE with nothing migrated, or COMPLETED)")]
    TaskExists {
        product_key: String,
        task_id: String,
        state: TaskState,
        target_instance_id: String,
    },
    /// The state machine refuses the request; the message names the current state.
    #[error("task {task_id}: {refused}")]
    Refused { task_id: String, refused: Refused },
    /// Rollback needs the product in the source instance.
    #[error("rollback refused: product {product_key} no longer exists in the source instance {source_instance_id}")]
    SourceProductGone {
        product_key: String,
        source_instance_id: String,
    },
    /// Refused for another reason of state (method, data sync lock, delete).
    #[error("{0}")]
    Conflict(String),
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("too many {field}: at most {max}")]
    TooMany { field: &'static str, max: usize },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("the migration engine is stopped")]
    Stopped,
    /// Cluster mode: another node drives the engine (calls are passed on to it; this one
    /// arrived during a handover).
    #[error("this node does not drive the migration engine right now (the cluster is handing it over); retry in a few seconds")]
    Standby,
}
