//! Scenario files (TOML): a fleet, its behaviour and its faults, in one document.
//!
//! The settings structs here ([`MqttSettings`], [`OtaSettings`], [`TelemetrySettings`],
//! [`VersionWeight`]) are also the library's configuration ([`crate::FleetConfig`] embeds them),
//! so a scenario key and a library field never drift apart. Every key has a default; unknown
//! keys are refused so a typo does not silently do nothing. `firmware-sim/README.md` documents
//! every key; [`tests`] keeps the shipped scenarios parsing.

use crate::faults::{FaultError, FaultPlan, FaultRule};
use fleetgate_topics::sign::SignMethod;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::{Path, PathBuf};

/// Why a scenario could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("scenario {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("scenario: {0}")]
    Invalid(String),
    #[error("scenario: {0}")]
    Fault(#[from] FaultError),
}

/// The CONNECT sign method: one for the whole fleet, or `mixed` (each device picks one of the
/// three, seeded by its name). A device list's `SignMethod` column overrides either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignChoice {
    Fixed(SignMethod),
    Mixed,
}

impl std::str::FromStr for SignChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("mixed") {
            return Ok(SignChoice::Mixed);
        }
        s.parse::<SignMethod>()
            .map(SignChoice::Fixed)
            .map_err(|_| format!("`{s}` is not hmacsha1, hmacsha256, hmacmd5 or mixed"))
    }
}

impl std::fmt::Display for SignChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignChoice::Fixed(m) => f.write_str(m.as_str()),
            SignChoice::Mixed => f.write_str("mixed"),
        }
    }
}

impl Serialize for SignChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SignChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `[mqtt]`: where and how devices connect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSettings {
    /// Broker `host:port`, or several separated by commas (entry points in front of one
    /// gateway, e.g. two load balancers): device *i* of the list connects to entry *i* mod *n*.
    pub address: String,
    pub keep_alive_secs: u64,
    /// TCP connect + CONNACK timeout per attempt.
    pub connect_timeout_secs: u64,
    pub sign_method: SignChoice,
    /// Put `timestamp=<ms>` into the client id (and the signature).
    pub timestamp: bool,
    /// Fleet-wide CONNECTs per second (first connects and reconnects alike).
    pub connect_rate: u32,
    /// Each device waits a random 0..this before its first connect.
    pub start_jitter_secs: f64,
    /// Reconnect backoff after an error: starts at the first value, doubles up to the second.
    pub reconnect_backoff_secs: [f64; 2],
}

impl Default for MqttSettings {
    fn default() -> Self {
        MqttSettings {
            address: "127.0.0.1:1883".into(),
            keep_alive_secs: 60,
            connect_timeout_secs: 10,
            sign_method: SignChoice::Fixed(SignMethod::HmacSha256),
            timestamp: true,
            connect_rate: 200,
            start_jitter_secs: 1.0,
            reconnect_backoff_secs: [1.0, 30.0],
        }
    }
}

/// One entry of `fleet.versions`: a module's initial version and its share of the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionWeight {
    #[serde(default = "default_module")]
    pub module: String,
    pub version: String,
    /// Relative weight among the entries of the same module.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_module() -> String {
    fleetgate_topics::DEFAULT_MODULE.to_owned()
}
fn default_weight() -> u32 {
    1
}

impl VersionWeight {
    pub fn new(module: &str, version: &str, weight: u32) -> Self {
        VersionWeight {
            module: module.into(),
            version: version.into(),
            weight,
        }
    }
}

/// `[fleet]`: which devices, and their initial firmware.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetSection {
    /// CSV or JSON device list (`ProductKey,DeviceName,DeviceSecret[,SignMethod]`), relative to
    /// the scenario file.
    pub devices_file: Option<PathBuf>,
    /// Create this many devices through the gateway's HTTP API first.
    pub provision: Option<usize>,
    /// Make up this many devices locally (for brokers without authentication).
    pub generate: Option<usize>,
    /// Product of provisioned/generated devices.
    pub product_key: Option<String>,
    /// Device-name prefix of provisioned/generated devices (default `sim-<random>-`).
    pub device_prefix: Option<String>,
    /// Gateway HTTP API base URL (for `provision`).
    pub api: String,
    /// Write the device list (with secrets) here after provisioning/generating.
    pub save_devices: Option<PathBuf>,
    /// Initial firmware versions; modules are the distinct `module`s named here.
    pub versions: Vec<VersionWeight>,
}

impl Default for FleetSection {
    fn default() -> Self {
        FleetSection {
            devices_file: None,
            provision: None,
            generate: None,
            product_key: None,
            device_prefix: None,
            api: "http://127.0.0.1:8080".into(),
            save_devices: None,
            versions: vec![VersionWeight::new("default", "1.0.0", 1)],
        }
    }
}

/// `[ota]`: how devices take upgrades.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtaSettings {
    /// Ask `firmware/get` for every module after each connect.
    pub pull_on_connect: bool,
    /// Also ask every this many seconds while online (0 = never).
    pub pull_interval_secs: f64,
    /// Report download progress every this many percent.
    pub progress_every_pct: u8,
    /// Time spent "verifying" after the download.
    pub verify_secs: f64,
    /// Time spent "writing" (flashing).
    pub write_secs: f64,
    /// Time offline while "rebooting" into the new firmware.
    pub reboot_secs: f64,
    /// Network errors tolerated per download (each retry resumes with `Range`).
    pub download_retries: u32,
    /// Read timeout of the download connection.
    pub download_timeout_secs: f64,
}

impl Default for OtaSettings {
    fn default() -> Self {
        OtaSettings {
            pull_on_connect: false,
            pull_interval_secs: 0.0,
            progress_every_pct: 10,
            verify_secs: 0.2,
            write_secs: 2.0,
            reboot_secs: 1.0,
            download_retries: 3,
            download_timeout_secs: 30.0,
        }
    }
}

/// How a property's values evolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PropertyKind {
    /// `start`, then ± up to `step` per post, kept within `[min, max]`, rounded to `decimals`.
    RandomWalk,
    /// `start`, `start + step`, … (integers).
    Counter,
    /// A random element of `values` per post.
    Choice,
    /// Always `values[0]`.
    Constant,
}

/// One `[[telemetry.properties]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropertySpec {
    pub name: String,
    #[serde(default = "default_property_kind")]
    pub kind: PropertyKind,
    #[serde(default)]
    pub start: f64,
    #[serde(default = "default_step")]
    pub step: f64,
    #[serde(default = "default_min")]
    pub min: f64,
    #[serde(default = "default_max")]
    pub max: f64,
    #[serde(default = "default_decimals")]
    pub decimals: u8,
    /// For `choice` and `constant`: any JSON-compatible values.
    #[serde(default)]
    pub values: Vec<serde_json::Value>,
}

fn default_property_kind() -> PropertyKind {
    PropertyKind::RandomWalk
}
fn default_step() -> f64 {
    1.0
}
fn default_min() -> f64 {
    f64::MIN
}
fn default_max() -> f64 {
    f64::MAX
}
fn default_decimals() -> u8 {
    1
}

impl PropertySpec {
    pub fn random_walk(name: &str, start: f64, step: f64, min: f64, max: f64) -> Self {
        PropertySpec {
            name: name.into(),
            kind: PropertyKind::RandomWalk,
            start,
            step,
            min,
            max,
            decimals: 1,
            values: Vec::new(),
        }
    }
}

/// One `[[telemetry.events]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSpec {
    /// TSL event identifier (the topic segment; not `property`).
    pub identifier: String,
    /// Chance per telemetry tick that the device posts this event.
    pub probability: f64,
    /// The event's output parameters.
    #[serde(default)]
    pub value: serde_json::Map<String, serde_json::Value>,
}

/// `[telemetry]`: property and event posts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Seconds between property posts of one device (0 = no telemetry).
    pub interval_secs: f64,
    /// A post without `post_reply` within this many seconds counts as missing (0 = don't
    /// subscribe to replies or check them).
    pub reply_timeout_secs: f64,
    pub properties: Vec<PropertySpec>,
    pub events: Vec<EventSpec>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            interval_secs: 5.0,
            reply_timeout_secs: 10.0,
            properties: vec![
                PropertySpec::random_walk("Temperature", 21.0, 0.3, -20.0, 60.0),
                PropertySpec::random_walk("Humidity", 45.0, 1.0, 0.0, 100.0),
            ],
            events: Vec::new(),
        }
    }
}

impl TelemetrySettings {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |m: String| Err(ScenarioError::Invalid(m));
        if !(self.interval_secs >= 0.0 && self.interval_secs.is_finite()) {
            return bad(format!(
                "telemetry.interval_secs {} must be >= 0",
                self.interval_secs
            ));
        }
        if self.interval_secs > 0.0 && self.properties.is_empty() {
            return bad("telemetry is on but telemetry.properties is empty".into());
        }
        for p in &self.properties {
            if p.name.is_empty() {
                return bad("a telemetry property has an empty name".into());
            }
            if matches!(p.kind, PropertyKind::Choice | PropertyKind::Constant)
                && p.values.is_empty()
            {
                return bad(format!("property `{}` needs `values`", p.name));
            }
            if p.min > p.max {
                return bad(format!("property `{}`: min > max", p.name));
            }
        }
        for e in &self.events {
            if !(0.0..=1.0).contains(&e.probability) {
                return bad(format!(
                    "event `{}`: probability {} is not within 0..=1",
                    e.identifier, e.probability
                ));
            }
            let topic = fleetgate_topics::Topic::from_kind(
                fleetgate_topics::TopicKind::EventPost,
                "pk",
                "dn",
                Some(&e.identifier),
            );
            if topic.is_none() {
                return bad(format!(
                    "event identifier `{}` is not a valid topic segment",
                    e.identifier
                ));
            }
        }
        Ok(())
    }
}

/// A whole scenario file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    pub name: Option<String>,
    pub description: Option<String>,
    /// Seed of every random choice (random when absent; the summary shows the one used).
    pub seed: Option<u64>,
    /// Stop after this many seconds.
    pub duration_secs: Option<f64>,
    /// Stop once no upgrade has been running and no OTA message was seen for this many seconds.
    pub until_idle_secs: Option<f64>,
    pub mqtt: MqttSettings,
    pub fleet: FleetSection,
    pub ota: OtaSettings,
    pub telemetry: TelemetrySettings,
    pub faults: Vec<FaultRule>,
}

impl Scenario {
    /// Parses and checks a scenario; relative paths are kept as written.
    pub fn from_toml(text: &str) -> Result<Self, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: PathBuf::from("<inline>"),
            source: Box::new(e),
        })?;
        s.validate()?;
        Ok(s)
    }

    /// Reads a scenario file; `fleet.devices_file` and `fleet.save_devices` become relative to
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut s: Scenario = toml::from_str(&text).map_err(|e| ScenarioError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in [&mut s.fleet.devices_file, &mut s.fleet.save_devices]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        s.validate()?;
        Ok(s)
    }

    /// Checks everything serde cannot (fault rules, ranges, one device source at most).
    pub fn validate(&self) -> Result<(), ScenarioError> {
        FaultPlan::new(0, self.faults.clone())?;
        self.telemetry.validate()?;
        let sources = [
            self.fleet.devices_file.is_some(),
            self.fleet.provision.is_some(),
            self.fleet.generate.is_some(),
        ]
        .iter()
        .filter(|&&b| b)
        .count();
        if sources > 1 {
            return Err(ScenarioError::Invalid(
                "fleet: give only one of devices_file, provision, generate".into(),
            ));
        }
        validate_versions(&self.fleet.versions)?;
        if self.mqtt.connect_rate == 0 {
            return Err(ScenarioError::Invalid(
                "mqtt.connect_rate must be > 0".into(),
            ));
        }
        let [lo, hi] = self.mqtt.reconnect_backoff_secs;
        if !(lo > 0.0 && hi >= lo) {
            return Err(ScenarioError::Invalid(
                "mqtt.reconnect_backoff_secs must be [min, max] with 0 < min <= max".into(),
            ));
        }
        if !(self.mqtt.start_jitter_secs >= 0.0 && self.mqtt.start_jitter_secs.is_finite()) {
            return Err(ScenarioError::Invalid(
                "mqtt.start_jitter_secs must be >= 0".into(),
            ));
        }
        let o = &self.ota;
        if o.progress_every_pct == 0 || o.progress_every_pct > 100 {
            return Err(ScenarioError::Invalid(
                "ota.progress_every_pct must be within 1..=100".into(),
            ));
        }
        for (k, v) in [
            ("ota.pull_interval_secs", o.pull_interval_secs),
            ("ota.verify_secs", o.verify_secs),
            ("ota.write_secs", o.write_secs),
            ("ota.reboot_secs", o.reboot_secs),
            ("ota.download_timeout_secs", o.download_timeout_secs),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(ScenarioError::Invalid(format!("{k} must be >= 0")));
            }
        }
        Ok(())
    }
}

/// At least one entry, non-empty versions, a positive total weight per module.
pub fn validate_versions(versions: &[VersionWeight]) -> Result<(), ScenarioError> {
    if versions.is_empty() {
        return Err(ScenarioError::Invalid(
            "fleet.versions needs at least one entry".into(),
        ));
    }
    let mut totals = std::collections::BTreeMap::<&str, u64>::new();
    for v in versions {
        if v.version.is_empty() || v.module.is_empty() {
            return Err(ScenarioError::Invalid(
                "fleet.versions: module and version must not be empty".into(),
            ));
        }
        *totals.entry(&v.module).or_default() += u64::from(v.weight);
    }
    if let Some((m, _)) = totals.iter().find(|(_, &t)| t == 0) {
        return Err(ScenarioError::Invalid(format!(
            "fleet.versions: module `{m}` has a total weight of 0"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::FaultKind;

    #[test]
    fn defaults_from_an_empty_file() {
        let s = Scenario::from_toml("").unwrap();
        assert_eq!(s, Scenario::default());
        assert_eq!(s.mqtt.address, "127.0.0.1:1883");
        assert_eq!(
            s.fleet.versions,
            [VersionWeight::new("default", "1.0.0", 1)]
        );
    }

    #[test]
    fn full_scenario() {
        let s = Scenario::from_toml(
            r#"
            name = "x"
            seed = 7
            duration_secs = 30
            [mqtt]
            address = "10.0.0.1:1883"
            sign_method = "mixed"
            connect_rate = 50
            [fleet]
            provision = 20
            product_key = "a1Prod"
            versions = [
              { module = "default", version = "1.0.0", weight = 70 },
              { module = "default", version = "1.1.0", weight = 30 },
              { module = "MCU", version = "0.9" },
            ]
            [ota]
            pull_on_connect = true
            [telemetry]
            interval_secs = 1
            [[telemetry.properties]]
            name = "Mode"
            kind = "choice"
            values = ["eco", "boost"]
            [[telemetry.events]]
            identifier = "overheat"
            probability = 0.1
            value = { Level = 2 }
            [[faults]]
            kind = "download_failed"
            probability = 0.05
            devices = "sim-1*"
            [[faults]]
            kind = "malformed_json"
            probability = 0.01
            on = "telemetry"
            "#,
        )
        .unwrap();
        assert_eq!(s.mqtt.sign_method, SignChoice::Mixed);
        assert_eq!(s.fleet.versions.len(), 3);
        assert_eq!(s.telemetry.events[0].value["Level"], serde_json::json!(2));
        assert_eq!(s.faults[0].kind, FaultKind::DownloadFailed);
        assert_eq!(s.faults[1].on, crate::faults::FaultTarget::Telemetry);
    }

    #[test]
    fn refusals() {
        for bad in [
            "typo_key = 1",
            "[mqtt]\nsign_method = \"rot13\"",
            "[fleet]\nprovision = 1\ngenerate = 2",
            "[fleet]\nversions = []",
            "[[faults]]\nkind = \"hang\"\nprobability = 2.0",
            "[[faults]]\nkind = \"nope\"\nprobability = 0.1",
            "[telemetry]\ninterval_secs = 1\nproperties = []",
            "[ota]\nprogress_every_pct = 0",
            "[[telemetry.events]]\nidentifier = \"a/b\"\nprobability = 0.1",
            "[[telemetry.properties]]\nname = \"X\"\nkind = \"choice\"",
        ] {
            assert!(Scenario::from_toml(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shipped_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 3, "quickstart, faults and soak are shipped");
    }
}
