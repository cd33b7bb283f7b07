//! The Alibaba IoT Link protocol as fleetgate speaks it: topic templates, typed payloads, the
//! topic catalog, and CONNECT signatures. Shared by the gateway and `firmware-sim` so the two can
//! never disagree.
//!
//! # Layout
//!
//! - [`topic`]: [`Topic`] (parse/format topic names without allocating), [`TopicKind`] (stable
//!   metric labels), [`Direction`].
//! - [`payload`]: the JSON payload of every topic ([`InformRequest`], [`ProgressRequest`],
//!   [`UpgradeMessage`], [`FirmwareGetRequest`]/[`FirmwareGetReply`], [`PropertyPostRequest`],
//!   [`EventPostRequest`], [`Reply`]), one [`PayloadError`], and the reply [`codes`].
//! - [`catalog`]: `catalog.toml` (direction, QoS, description, example payloads per topic), the
//!   single source the docs (`README.md`) and tests are checked against.
//! - [`sign`]: Link CONNECT client ids, usernames and password signatures.

pub mod catalog;
pub mod payload;
pub mod sign;
pub mod topic;

pub use catalog::{catalog, Catalog, TopicSpec};
pub use payload::{
    codes, loose_id, AlinkSys, EventParams, EventPostRequest, FailureCode, FirmwareGetParams, FirmwareGetReply,
    FirmwareGetRequest, FirmwareSignMethod, InformParams, InformRequest, Item, MessageId, PayloadError,
    ProgressParams, ProgressRequest, ProgressStep, PropertyPostRequest, PropertyValue, Reply, UpgradeData,
    UpgradeMessage, DEFAULT_MODULE,
};
pub use topic::{Direction, Topic, TopicError, TopicKind};
