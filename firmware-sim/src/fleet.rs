//! A fleet: one tokio task per device, a shared connect-rate limiter, one HTTP client for
//! downloads, and the counters. [`Fleet::start`] checks the configuration and the broker, spawns
//! the devices and returns a [`FleetHandle`] to watch ([`FleetHandle::snapshot`],
//! [`FleetHandle::wait_idle`]) and stop ([`FleetHandle::stop`]) them.
//!
//! The fleet never reaches into a device task: devices publish what they do into their
//! [`DeviceRecord`](crate::device::DeviceRecord) and the atomic [`Stats`].

use crate::device::{self, DeviceRecord};
use crate::faults::{device_rng, FaultError, FaultPlan, FaultRule};
use crate::report::{self, DeviceOutcome, Snapshot, Stats, Summary};
use crate::scenario::{
    validate_versions, MqttSettings, OtaSettings, ScenarioError, SignChoice, TelemetrySettings,
    VersionWeight,
};
use crate::DeviceSpec;
use fleetgate_topics::sign::SignMethod;
use fleetgate_topics::{Topic, TopicKind};
use rand::Rng;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// RNG salt of initial-version and sign-method choices.
const SALT_IDENTITY: u64 = 0x4944_454e_5449_5459;

/// Why a fleet could not start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("no devices to simulate")]
    NoDevices,
    #[error("device {0}: {1}")]
    BadDevice(String, String),
    #[error("broker address `{0}` is not host:port")]
    BadAddress(String),
    #[error("cannot reach the MQTT broker at {address}: {reason}")]
    BrokerUnreachable { address: String, reason: String },
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error(transparent)]
    Fault(#[from] FaultError),
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

/// Everything a fleet needs. Build one with [`FleetConfig::new`] and adjust the fields.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub devices: Vec<DeviceSpec>,
    pub mqtt: MqttSettings,
    pub ota: OtaSettings,
    pub telemetry: TelemetrySettings,
    pub versions: Vec<VersionWeight>,
    pub faults: Vec<FaultRule>,
    pub seed: u64,
    /// Shown in the summary.
    pub name: Option<String>,
}

impl FleetConfig {
    /// Defaults (see `README.md`) for these devices and broker `host:port`.
    pub fn new(devices: Vec<DeviceSpec>, mqtt_address: impl Into<String>) -> Self {
        FleetConfig {
            devices,
            mqtt: MqttSettings {
                address: mqtt_address.into(),
                ..MqttSettings::default()
            },
            ota: OtaSettings::default(),
            telemetry: TelemetrySettings::default(),
            versions: vec![VersionWeight::new("default", "1.0.0", 1)],
            faults: Vec::new(),
            seed: 0,
            name: None,
        }
    }
}

/// What device tasks share.
pub(crate) struct Shared {
    /// The broker's entry points (`mqtt.address`); a device uses [`Shared::entry`].
    pub entries: Vec<(String, u16)>,
    pub mqtt: MqttSettings,
    pub ota: OtaSettings,
    pub telemetry: TelemetrySettings,
    pub plan: FaultPlan,
    pub seed: u64,
    pub stats: Stats,
    pub pacer: Pacer,
    pub http: reqwest::Client,
    pub started: Instant,
}

impl Shared {
    /// Milliseconds since the fleet started.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// The fleet-wide connect-rate limit: a token bucket in its "virtual scheduling" form (GCRA).
///
/// Each connect attempt reserves the next free slot and sleeps until it, so thousands of
/// waiting devices cost one timer each. (A limiter that wakes every waiter whenever a token
/// frees up burned most of the CPU at 10,000 devices.)
pub(crate) struct Pacer {
    interval: Duration,
    /// How far slots may lag behind now: unused capacity saved up for a burst.
    burst: Duration,
    next: Mutex<tokio::time::Instant>,
}

impl Pacer {
    pub fn new(per_sec: u32) -> Self {
        let interval = Duration::from_secs_f64(1.0 / f64::from(per_sec.max(1)));
        // A small burst (1/20 s worth): the point of the limit is to spread connects out.
        let burst = interval * (per_sec / 20).max(1);
        Pacer {
            interval,
            burst,
            next: Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// The instant this attempt may connect at.
    pub fn reserve(&self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let earliest = now.checked_sub(self.burst).unwrap_or(now);
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (*next).max(earliest);
        *next = slot + self.interval;
        slot
    }
}

/// Entry point: see [`Fleet::start`].
pub struct Fleet;

/// A running fleet.
pub struct FleetHandle {
    shared: Arc<Shared>,
    records: Vec<Arc<DeviceRecord>>,
    tasks: Vec<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
    name: Option<String>,
}

fn split_address(address: &str) -> Result<(String, u16), FleetError> {
    let bad = || FleetError::BadAddress(address.to_owned());
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// `mqtt.address`: one `host:port` or several separated by commas.
fn split_addresses(address: &str) -> Result<Vec<(String, u16)>, FleetError> {
    address
        .split(',')
        .map(|a| split_address(a.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| FleetError::BadAddress(address.to_owned()))
}

impl Shared {
    /// The entry point device number `index` of the list connects to.
    pub fn entry(&self, index: usize) -> (&str, u16) {
        let (host, port) = &self.entries[index % self.entries.len().max(1)];
        (host, *port)
    }
}

/// Picks one of `entries` by weight with `rng`.
fn pick<'a, R: Rng>(rng: &mut R, entries: &[&'a VersionWeight]) -> &'a str {
    let total: u64 = entries.iter().map(|e| u64::from(e.weight)).sum();
    let mut x = rng.gen_range(0..total.max(1));
    for e in entries {
        let w = u64::from(e.weight);
        if x < w {
            return &e.version;
        }
        x -= w;
    }
    entries.last().map(|e| e.version.as_str()).unwrap_or("")
}

/// A device's initial versions (one per module) and CONNECT sign method, seeded by its name.
pub fn identity(
    seed: u64,
    spec: &DeviceSpec,
    versions: &[VersionWeight],
    sign: SignChoice,
) -> (BTreeMap<String, String>, SignMethod) {
    let mut rng = device_rng(seed, &spec.device_name, SALT_IDENTITY);
    let mut modules: Vec<&str> = versions.iter().map(|v| v.module.as_str()).collect();
    modules.sort_unstable();
    modules.dedup();
    let chosen = modules
        .into_iter()
        .map(|m| {
            let entries: Vec<&VersionWeight> = versions.iter().filter(|v| v.module == m).collect();
            (m.to_owned(), pick(&mut rng, &entries).to_owned())
        })
        .collect();
    let method = spec.sign_method().unwrap_or(match sign {
        SignChoice::Fixed(m) => m,
        SignChoice::Mixed => SignMethod::ALL[rng.gen_range(0..SignMethod::ALL.len())],
    });
    (chosen, method)
}

impl Fleet {
    /// Checks the configuration, makes sure the broker accepts TCP connections, and starts
    /// every device (each waits its jittered start and a connect token).
    pub async fn start(config: FleetConfig) -> Result<FleetHandle, FleetError> {
        if config.devices.is_empty() {
            return Err(FleetError::NoDevices);
        }
        validate_versions(&config.versions)?;
        config.telemetry.validate()?;
        let plan = FaultPlan::new(config.seed, config.faults.clone())?;
        let mut seen = HashSet::new();
        for d in &config.devices {
            let label = format!("{}/{}", d.product_key, d.device_name);
            if Topic::from_kind(
                TopicKind::Inform,
                d.product_key.as_str(),
                d.device_name.as_str(),
                None,
            )
            .is_none()
            {
                return Err(FleetError::BadDevice(
                    label,
                    "product key or device name is not a valid topic segment".into(),
                ));
            }
            if let Some(m) = &d.sign_method {
                if d.sign_method().is_none() {
                    return Err(FleetError::BadDevice(
                        label,
                        format!("unknown sign method `{m}`"),
                    ));
                }
            }
            if !seen.insert((&d.product_key, &d.device_name)) {
                return Err(FleetError::BadDevice(label, "listed twice".into()));
            }
        }
        let entries = split_addresses(&config.mqtt.address)?;
        // Fail fast and clearly when nothing listens, rather than 10,000 devices retrying.
        for (host, port) in &entries {
            let probe = tokio::time::timeout(
                Duration::from_secs(config.mqtt.connect_timeout_secs.max(1)),
                tokio::net::TcpStream::connect((host.as_str(), *port)),
            )
            .await;
            let reason = match probe {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".into(),
            };
            return Err(FleetError::BrokerUnreachable {
                address: format!("{host}:{port}"),
                reason,
            });
        }
        let pacer = Pacer::new(config.mqtt.connect_rate);
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs_f64(
                config.ota.download_timeout_secs.max(1.0),
            ))
            .build()
            .map_err(|e| FleetError::Http(e.to_string()))?;
        let shared = Arc::new(Shared {
            entries,
            mqtt: config.mqtt.clone(),
            ota: config.ota.clone(),
            telemetry: config.telemetry.clone(),
            plan,
            seed: config.seed,
            stats: Stats::default(),
            pacer,
            http,
            started: Instant::now(),
        });
        let (shutdown, rx) = watch::channel(false);
        let mut records = Vec::with_capacity(config.devices.len());
        let mut tasks = Vec::with_capacity(config.devices.len());
        for (index, spec) in config.devices.into_iter().enumerate() {
            let (versions, method) = identity(
                config.seed,
                &spec,
                &config.versions,
                config.mqtt.sign_method,
            );
            let rec = Arc::new(DeviceRecord::new(spec, method, versions, index));
            tasks.push(tokio::spawn(device::run(
                rec.clone(),
                shared.clone(),
                rx.clone(),
            )));
            records.push(rec);
        }
        Ok(FleetHandle {
            shared,
            records,
            tasks,
            shutdown,
            name: config.name,
        })
    }
}

impl FleetHandle {
    /// Counters right now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::take(&self.shared.stats, self.records.len(), self.shared.now_ms())
    }

    /// One device's outcome so far.
    pub fn device(&self, device_name: &str) -> Option<DeviceOutcome> {
        self.records
            .iter()
            .find(|r| r.spec.device_name == device_name)
            .map(|r| r.outcome())
    }

    /// Every device's outcome so far, in the order of the device list.
    pub fn outcomes(&self) -> Vec<DeviceOutcome> {
        self.records.iter().map(|r| r.outcome()).collect()
    }

    /// Seconds since the fleet started.
    pub fn elapsed(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// Idle: every device has tried to connect, no upgrade is running (hung ones do not count),
    /// and no OTA message was sent or received for `quiet`.
    pub fn is_idle(&self, quiet: Duration) -> bool {
        let s = self.snapshot();
        s.updating <= 0
            && s.first_attempts_done as usize >= s.devices
            && s.ota_quiet_secs >= quiet.as_secs_f64()
    }

    /// Waits until [`is_idle`](Self::is_idle).
    pub async fn wait_idle(&self, quiet: Duration) {
        while !self.is_idle(quiet) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until `pred` holds for the handle, or `timeout`; `true` if it held.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&FleetHandle) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Disconnects every device (DISCONNECT sent), stops running upgrades, and reports.
    pub async fn stop(self) -> Summary {
        // Measured before the devices go: the figures of the running fleet.
        let online = self
            .shared
            .stats
            .online
            .load(std::sync::atomic::Ordering::Relaxed);
        let memory = report::memory(self.records.len());
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
        let elapsed = self.shared.now_ms();
        let outcomes: Vec<DeviceOutcome> = self.records.iter().map(|r| r.outcome()).collect();
        let mut summary = Summary::build(
            self.name,
            self.shared.seed,
            &self.shared.stats,
            elapsed,
            outcomes,
            memory,
        );
        summary.connect.online_at_end = online;
        summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pacer_spreads_reservations() {
        let p = Pacer::new(100);
        let t0 = tokio::time::Instant::now();
        let slots: Vec<f64> = (0..300)
            .map(|_| p.reserve().saturating_duration_since(t0).as_secs_f64())
            .collect();
        // 100/s: the 300th slot is about 3 s out (less the 50 ms burst), evenly spaced.
        assert!((2.9..=3.0).contains(&slots[299]), "{}", slots[299]);
        assert!(slots.windows(2).all(|w| w[1] >= w[0]));
        // After idle time, at most the burst (5 slots) lies in the past.
        let idle = Pacer::new(100);
        *idle.next.lock().unwrap() = tokio::time::Instant::now() - Duration::from_secs(10);
        let now = tokio::time::Instant::now();
        let burst: Vec<_> = (0..8).map(|_| idle.reserve()).collect();
        assert!(burst[0] < now, "saved-up capacity is used");
        assert!(
            burst[7] > now,
            "but only a burst of it: {:?}",
            burst[7] - now
        );
    }

    #[test]
    fn addresses() {
        assert_eq!(
            split_address("127.0.0.1:1883").unwrap(),
            ("127.0.0.1".into(), 1883)
        );
        assert_eq!(split_address("[::1]:1883").unwrap(), ("::1".into(), 1883));
        assert_eq!(split_address("gw.local:1").unwrap(), ("gw.local".into(), 1));
        for bad in ["nohost", ":1883", "h:0", "h:x", "h:70000"] {
            assert!(split_address(bad).is_err(), "{bad}");
        }
        assert_eq!(
            split_addresses("127.0.0.1:1, [::1]:2").unwrap(),
            vec![("127.0.0.1".into(), 1), ("::1".into(), 2)]
        );
        for bad in ["", "127.0.0.1:1,", "127.0.0.1:1,h:0"] {
            assert!(split_addresses(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mixed_versions_follow_weights_and_are_seeded() {
        let versions = vec![
            VersionWeight::new("default", "1.0.0", 70),
            VersionWeight::new("default", "1.1.0", 30),
            VersionWeight::new("MCU", "0.9", 1),
        ];
        let devs = crate::devices::generate("pk", "d", 4000, 1);
        let mut old = 0;
        for d in &devs {
            let (v, _) = identity(9, d, &versions, SignChoice::Fixed(SignMethod::HmacSha1));
            assert_eq!(v["MCU"], "0.9");
            if v["default"] == "1.0.0" {
                old += 1;
            }
            assert_eq!(
                identity(9, d, &versions, SignChoice::Mixed),
                identity(9, d, &versions, SignChoice::Mixed)
            );
        }
        let share = old as f64 / devs.len() as f64;
        assert!((share - 0.7).abs() < 0.05, "{share}");
        // Mixed sign methods use all three; a per-device method wins.
        let methods: HashSet<SignMethod> = devs
            .iter()
            .map(|d| identity(9, d, &versions, SignChoice::Mixed).1)
            .collect();
        assert_eq!(methods.len(), 3);
        let mut one = devs[0].clone();
        one.sign_method = Some("hmacmd5".into());
        assert_eq!(
            identity(9, &one, &versions, SignChoice::Fixed(SignMethod::HmacSha1)).1,
            SignMethod::HmacMd5
        );
    }
}
