//! The OTA engine on a manual clock: nothing sleeps, time moves when a test moves it and the
//! test runs the deadline task's work with `run_due`. Devices are a [`FakePusher`] (who is
//! connected, what was published) plus direct calls of the device hooks. Used by the engine's
//! tests and by the OTA benchmark.

use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::ota::firmware::{FirmwareRepo, FirmwareStatus, NewFirmware};
use crate::ota::model::{JobSpec, JobType, RateSpec, Selection, TargetKind};
use crate::ota::task::TaskStatus;
use crate::ota::{EngineConfig, OtaEngine, Pusher};
use crate::registry::{NewDevice, NewProduct, Registry};
use crate::store::Store;
use fleetgate_topics::ProgressStep;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tempfile::TempDir;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The manual clock's start (ms since the epoch).
pub const T0: i64 = 1_700_000_000_000;

/// Devices as the engine sees them: who is connected, and every message published to them.
#[derive(Default)]
pub struct FakePusher {
    pub connected: Mutex<HashSet<String>>,
    pub published: Mutex<Vec<(String, Vec<u8>)>>,
    /// Connected devices the next look does not see yet (their connect is on its way).
    pub unseen_once: Mutex<HashSet<String>>,
}

impl Pusher for FakePusher {
    fn is_connected(&self, _pk: &str, dn: &str) -> bool {
        if lock(&self.unseen_once).remove(dn) {
            return false;
        }
        lock(&self.connected).contains(dn)
    }
    fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), String> {
        lock(&self.published).push((topic, payload));
        Ok(())
    }
}

impl FakePusher {
    /// Messages published to device `dn`.
    pub fn pushes_to(&self, dn: &str) -> usize {
        lock(&self.published)
            .iter()
            .filter(|(t, _)| t.ends_with(&format!("/{dn}")))
            .count()
    }
    /// Messages published in all.
    pub fn total(&self) -> usize {
        lock(&self.published).len()
    }
}

/// An engine on a file store in a temporary directory, a manual clock at [`T0`], a
/// [`FakePusher`] and one product (`pk`).
pub struct H {
    pub dir: TempDir,
    pub clock: Clock,
    pub pusher: Arc<FakePusher>,
    pub registry: Arc<Registry>,
    pub firmware: Arc<FirmwareRepo>,
    pub engine: OtaEngine,
    pub metrics: Arc<Metrics>,
    pub pk: String,
}

/// The registry, firmware repository and engine of data directory `dir`.
fn open(
    dir: &TempDir,
    clock: &Clock,
    pusher: &Arc<FakePusher>,
) -> (Arc<Registry>, Arc<FirmwareRepo>, OtaEngine, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(&dir.path().join("fleetgate.db"), metrics.clone()).unwrap();
    let registry = Registry::open(store.clone(), metrics.clone()).unwrap();
    let firmware =
        FirmwareRepo::open(dir.path(), store.clone(), "http://gw.test".into(), 1 << 20).unwrap();
    let config = EngineConfig {
        connect_push_delay_ms: 1_000,
        ..EngineConfig::default()
    };
    let engine = OtaEngine::open(
        registry.clone(),
        store,
        firmware.clone(),
        pusher.clone(),
        clock.clone(),
        config,
        metrics.clone(),
    )
    .unwrap();
    (registry, firmware, engine, metrics)
}

impl H {
    pub async fn new() -> H {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::manual(T0);
        let pusher = Arc::new(FakePusher::default());
        let (registry, firmware, engine, metrics) = open(&dir, &clock, &pusher);
        let pk = registry
            .create_product(NewProduct::named("meter"))
            .await
            .unwrap()
            .product_key;
        H {
            dir,
            clock,
            pusher,
            registry,
            firmware,
            engine,
            metrics,
            pk,
        }
    }

    /// Simulates a restart: a new registry, firmware repo and engine on the same data dir.
    pub async fn restart(&mut self) {
        self.engine.shutdown().await;
        self.crash();
    }

    /// Simulates `kill -9`: no shutdown, no flush of coalesced progress; only what was
    /// submitted to the store survives.
    pub fn crash(&mut self) {
        let (registry, firmware, engine, metrics) = open(&self.dir, &self.clock, &self.pusher);
        lock(&self.pusher.connected).clear();
        self.registry = registry;
        self.firmware = firmware;
        self.engine = engine;
        self.metrics = metrics;
        self.engine.start();
    }

    /// Creates device `dn` (with `tags`), reporting `version` of module `default` when given.
    pub async fn device(&self, dn: &str, version: Option<&str>, tags: &[(&str, &str)]) {
        self.registry
            .create_device(
                &self.pk,
                NewDevice {
                    device_name: dn.into(),
                    device_secret: None,
                    tags: tags
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                },
            )
            .await
            .unwrap();
        if let Some(v) = version {
            self.registry
                .report_version(&self.pk, dn, "default", v, T0)
                .await
                .unwrap();
        }
    }

    /// Creates `n` devices `dev-0000`… on `version`; their names.
    pub async fn devices(&self, n: usize, version: &str) -> Vec<String> {
        let mut names = Vec::new();
        for i in 0..n {
            let dn = format!("dev-{i:04}");
            self.device(&dn, Some(version), &[]).await;
            names.push(dn);
        }
        names
    }

    /// [`devices`](Self::devices), each one connected as the pusher sees it (no connect hook).
    pub async fn connected_devices(&self, n: usize, version: &str) -> Vec<String> {
        let names = self.devices(n, version).await;
        lock(&self.pusher.connected).extend(names.iter().cloned());
        names
    }

    /// Device `dn` connects (the engine's connect hook).
    pub async fn connect(&self, dn: &str) {
        lock(&self.pusher.connected).insert(dn.to_owned());
        self.engine.device_online(&self.pk, dn).await;
    }

    pub fn disconnect(&self, dn: &str) {
        lock(&self.pusher.connected).remove(dn);
    }

    /// Uploads firmware `version` (VERIFIED when `verified`); its id.
    pub async fn firmware(&self, version: &str, verified: bool) -> String {
        let mut new = NewFirmware::new(self.pk.clone(), version);
        new.src_versions = vec![];
        let p = self
            .firmware
            .create_from_bytes(new, format!("firmware {version}").as_bytes())
            .await
            .unwrap();
        if verified {
            self.firmware
                .set_status(&p.firmware_id, FirmwareStatus::Verified)
                .await
                .unwrap();
        }
        p.firmware_id
    }

    /// A STATIC job for every device of the product with package `fid`, nothing else set.
    /// [`spec`](Self::spec) at `per_minute` with `burst` (no ramp).
    pub fn spec_at_rate(&self, fid: &str, per_minute: u32, burst: Option<u32>) -> JobSpec {
        JobSpec {
            rate: Some(RateSpec {
                per_minute,
                burst,
                ramp: None,
            }),
            ..self.spec(fid)
        }
    }

    pub fn spec(&self, fid: &str) -> JobSpec {
        JobSpec {
            firmware_id: fid.into(),
            job_type: JobType::UpgradeFirmware,
            selection: Selection::Static,
            target: TargetKind::All,
            device_names: vec![],
            gray_percent: None,
            target_tags: vec![],
            src_versions: None,
            rate: None,
            start_at_ms: None,
            finish_by_ms: None,
            timeout_seconds: None,
            stall_seconds: None,
            retry_interval_seconds: None,
            retry_count: None,
            retry_backoff: None,
            retry_max_interval_seconds: None,
            retry_jitter_percent: None,
            overwrite: false,
            need_confirm: false,
            force: false,
            abort: None,
            tags: BTreeMap::new(),
            name: None,
            description: None,
        }
    }

    /// Moves the clock `ms` on and runs what is due.
    pub async fn advance(&self, ms: i64) {
        self.clock.advance_ms(ms);
        self.engine.run_due().await;
    }

    pub fn status(&self, job: &str, dn: &str) -> TaskStatus {
        self.engine.get_task(job, dn).unwrap().status
    }

    /// Device `dn` reports progress `step` (a percent or a failure code).
    pub async fn progress(&self, dn: &str, step: i64) {
        self.engine
            .on_progress(
                &self.pk,
                dn,
                "default",
                ProgressStep::from_code(step).unwrap(),
            )
            .await;
    }

    /// Device `dn` reports running `version`.
    pub async fn report(&self, dn: &str, version: &str) {
        self.registry
            .report_version(&self.pk, dn, "default", version, self.clock.now_ms())
            .await
            .unwrap();
        self.engine
            .on_version(&self.pk, dn, "default", version)
            .await;
    }
}
