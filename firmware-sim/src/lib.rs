//! firmware-sim: a fleet of simulated Alibaba Link SDK devices, with fault injection.
//!
//! Each device signs its own CONNECT (`fleetgate_topics::sign`), reports its firmware versions,
//! takes upgrades (push on `/ota/device/upgrade/…` or pull through `firmware/get`), downloads
//! and really verifies the package, reports progress, "writes", reboots and reports the new
//! version, and posts TSL telemetry while checking the replies. Faults are drawn from a seeded
//! plan, so a run replays under `--seed`. It speaks only the protocol (and, to provision
//! devices, the gateway's HTTP API), never the gateway's internals, so the gateway's own tests
//! can run devices in-process:
//!
//! ```no_run
//! # async fn demo() -> Result<(), firmware_sim::FleetError> {
//! use firmware_sim::{devices, Fleet, FleetConfig};
//! let devs = devices::generate("a1Product", "sim-", 100, 42);
//! let handle = Fleet::start(FleetConfig::new(devs, "127.0.0.1:1883")).await?;
//! handle.wait_idle(std::time::Duration::from_secs(5)).await;
//! let summary = handle.stop().await;
//! println!("{}", summary.to_text());
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`fleet`]: [`Fleet::start`] → [`FleetHandle`] (snapshot, per-device outcomes, wait, stop);
//!   the shared connect-rate limiter and download client.
//! - [`device`] (private): one device task and its upgrade child tasks; the state machine.
//! - [`faults`]: pure, seeded fault scheduling ([`FaultPlan`], [`FaultRule`]).
//! - [`firmware`]: resumable download (`Range`) and SHA256/Md5 verification.
//! - [`devices`]: device lists (CSV/JSON), generated devices, provisioning through the API.
//! - [`scenario`]: TOML scenario files and the settings structs.
//! - [`report`]: counters, snapshots, per-device outcomes, the summary (text/JSON).

mod device;
pub mod devices;
pub mod faults;
pub mod firmware;
pub mod fleet;
pub mod report;
pub mod scenario;

pub use devices::DeviceSpec;
pub use faults::{FaultKind, FaultPlan, FaultRule};
pub use fleet::{Fleet, FleetConfig, FleetError, FleetHandle};
pub use report::{DeviceOutcome, DeviceState, Snapshot, Summary, UpgradeRecord, UpgradeResult};
pub use scenario::{MqttSettings, OtaSettings, Scenario, SignChoice, TelemetrySettings};
