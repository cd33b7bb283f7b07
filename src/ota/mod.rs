//! Over-the-air upgrades (design §4): firmware packages and their signed downloads
//! ([`firmware`]); jobs, per-device tasks and the push scheduler build on them.

pub mod firmware;

pub use firmware::{FirmwareError, FirmwarePackage, FirmwareRepo, FirmwareStatus};
