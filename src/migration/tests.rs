//! Engine tests over a real registry and store (in memory, or a file for restarts, or a
//! backend that fails on demand for the resume modes).

use super::docs::TASK_DOC;
use super::*;
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::registry::{NewDevice, NewInstance, NewProduct, Page, Registry, DEFAULT_INSTANCE_ID};
use crate::store::{Op, Snapshot, SqliteBackend, Store, StoreBackend};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TARGET: &str = "iot-target";
const WAIT: Duration = Duration::from_secs(20);

type Calls = Arc<Mutex<Vec<(String, String)>>>;
type Limits = Arc<Mutex<Vec<(String, Option<u64>)>>>;

struct Env {
    registry: Arc<Registry>,
    engine: Arc<MigrationEngine>,
    metrics: Arc<Metrics>,
    kicks: Calls,
    limits: Limits,
}

fn op() -> Actor {
    Actor::api("operator", "0123456789ab")
}

fn engine_on(registry: Arc<Registry>, metrics: Arc<Metrics>, rate: u32) -> Env {
    let kicks: Calls = Arc::default();
    let limits: Limits = Arc::default();
    let (k, l) = (kicks.clone(), limits.clone());
    let engine = MigrationEngine::start(
        registry.clone(),
        registry.store().clone(),
        metrics.clone(),
        EngineConfig {
            devices_per_sec: rate,
            batch_size: 16,
        },
        Hooks {
            kick: Arc::new(move |pk: &str, dn: &str| {
                k.lock().unwrap().push((pk.to_owned(), dn.to_owned()))
            }),
            set_rate_limit: Arc::new(move |iid: &str, b: Option<u64>| {
                l.lock().unwrap().push((iid.to_owned(), b))
            }),
        },
        Clock::system(),
    )
    .unwrap();
    Env {
        registry,
        engine,
        metrics,
        kicks,
        limits,
    }
}

async fn env_with_store(store: Store, metrics: Arc<Metrics>, rate: u32) -> Env {
    let registry = Registry::open(store, metrics.clone()).unwrap();
    if registry.get_instance(TARGET).is_err() {
        registry
            .create_instance(NewInstance {
                instance_id: Some(TARGET.into()),
                name: "Target".into(),
            })
            .await
            .unwrap();
    }
    engine_on(registry, metrics, rate)
}

async fn env(rate: u32) -> Env {
    let m = Arc::new(Metrics::new());
    env_with_store(Store::open_in_memory(m.clone()).unwrap(), m, rate).await
}

impl Env {
    /// Creates one more device of `pk`.
    async fn device(&self, pk: &str, dn: &str) {
        self.registry
            .create_device(
                pk,
                NewDevice {
                    device_name: dn.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }

    /// A product in the default instance with devices `dev000..dev{n-1}`.
    async fn product(&self, n: usize) -> String {
        let pk = self
            .registry
            .create_product(NewProduct::named("Lamp"))
            .await
            .unwrap()
            .product_key;
        let rows = (0..n)
            .map(|i| NewDevice {
                device_name: format!("dev{i:03}"),
                ..Default::default()
            })
            .collect();
        self.registry.batch_create_devices(&pk, rows).await.unwrap();
        pk
    }

    async fn task(&self, pk: &str) -> String {
        self.engine
            .create(
                NewTask {
                    product_key: pk.into(),
                    target_instance_id: TARGET.into(),
                    name: None,
                    config: MigrationConfig::default(),
                },
                op(),
            )
            .await
            .unwrap()
            .task_id
    }

    async fn wait(
        &self,
        tid: &str,
        what: &str,
        pred: impl Fn(&TaskDetails) -> bool,
    ) -> TaskDetails {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let d = self.engine.details(tid).unwrap();
            if pred(&d) {
                return d;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "task never got {what}: {d:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_state(&self, tid: &str, state: TaskState) -> TaskDetails {
        self.wait(tid, state.as_str(), |d| d.state == state).await
    }

    fn owner(&self, pk: &str, dn: &str) -> String {
        self.registry.get_device(pk, dn).unwrap().instance_id
    }

    fn owners_in(&self, pk: &str, iid: &str) -> usize {
        self.registry
            .device_names_after(pk, None, usize::MAX)
            .unwrap()
            .iter()
            .filter(|dn| self.owner(pk, dn) == iid)
            .count()
    }

    fn counted(&self, result: &'static str) -> u64 {
        self.metrics
            .migration_devices
            .get_or_create(&[("result", result)])
            .get()
    }
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn status_of(env: &Env, tid: &str, dn: &str) -> DeviceStatus {
    let page = env
        .engine
        .devices(
            tid,
            &DeviceListFilter {
                status: None,
                device_name: Some(dn.into()),
            },
            Page::default(),
        )
        .unwrap();
    page.items
        .iter()
        .find(|d| d.device_name == dn)
        .unwrap()
        .status
}

#[tokio::test]
async fn create_validations() {
    let env = env(0).await;
    let pk = env.product(2).await;
    let new = |pk: &str, target: &str| NewTask {
        product_key: pk.into(),
        target_instance_id: target.into(),
        name: None,
        config: MigrationConfig::default(),
    };
    let e = env
        .engine
        .create(new("nope", TARGET), op())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            MigrationError::Registry(RegistryError::NotFound {
                kind: "product",
                ..
            })
        ),
        "{e}"
    );
    let e = env
        .engine
        .create(new(&pk, "iot-nope"), op())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            MigrationError::Registry(RegistryError::NotFound {
                kind: "instance",
                ..
            })
        ),
        "{e}"
    );
    let e = env
        .engine
        .create(new(&pk, DEFAULT_INSTANCE_ID), op())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            MigrationError::Invalid {
                field: "target_instance_id",
                ..
            }
        ),
        "{e}"
    );
    for bad in [0, 10_241] {
        let mut n = new(&pk, TARGET);
        n.config.bandwidth_limit_mb = Some(bad);
        let e = env.engine.create(n, op()).await.unwrap_err();
        assert!(
            matches!(
                e,
                MigrationError::Invalid {
                    field: "bandwidth_limit_mb",
                    ..
                }
            ),
            "{e}"
        );
    }
    let t = env.engine.create(new(&pk, TARGET), op()).await.unwrap();
    assert_eq!(t.state, TaskState::ToMigrate);
    assert_eq!(t.status, SummaryStatus::Terminated);
    assert_eq!(t.source_instance_id, DEFAULT_INSTANCE_ID);
    assert_eq!(t.devices.total, 2);
    assert_eq!(t.devices.not_migrated, 2);
    assert!(!t.data_sync.enabled, "data sync is off by default");
    // One task per product, whatever the target.
    let e = env.engine.create(new(&pk, TARGET), op()).await.unwrap_err();
    assert!(matches!(e, MigrationError::TaskExists { .. }), "{e}");
    assert!(e.to_string().contains(&t.task_id));
    // Deletable in TO_MIGRATE with nothing migrated; then a new task can be made.
    env.engine.delete(&t.task_id, op()).await.unwrap();
    assert!(matches!(
        env.engine.details(&t.task_id),
        Err(MigrationError::TaskNotFound(_))
    ));
    env.engine.create(new(&pk, TARGET), op()).await.unwrap();
    let log = env.engine.list(&TaskFilter::default(), Page::default());
    assert_eq!(log.total, 1);
}

#[tokio::test]
async fn canary_full_completed_with_kicks_statuses_and_log() {
    let env = env(0).await;
    let pk = env.product(40).await;
    env.registry
        .device_connected(&pk, "dev001", 1, IpAddr::V4(Ipv4Addr::LOCALHOST), 1);
    env.registry
        .device_connected(&pk, "dev030", 2, IpAddr::V4(Ipv4Addr::LOCALHOST), 1);
    let tid = env.task(&pk).await;

    // Refused before the canary.
    for (e, _) in [
        (env.engine.full(&tid, op()).await.unwrap_err(), "full"),
        (env.engine.pause(&tid, op()).await.unwrap_err(), "pause"),
        (env.engine.resume(&tid, op()).await.unwrap_err(), "continue"),
        (
            env.engine
                .rollback(&tid, RollbackSelection::All, op())
                .await
                .unwrap_err(),
            "rollback",
        ),
    ] {
        assert!(matches!(e, MigrationError::Refused { .. }), "{e}");
        assert!(e.to_string().contains("TO_MIGRATE"), "{e}");
    }

    let o = env
        .engine
        .canary(
            &tid,
            names(&["dev000", "dev001", "ghost", "dev000", ""]),
            op(),
        )
        .await
        .unwrap();
    assert_eq!(o.accepted, 2);
    let rejected: Vec<(usize, &str)> = o
        .rejected
        .iter()
        .map(|r| (r.row, r.error_code.as_str()))
        .collect();
    assert_eq!(rejected, [(3, "FG.2003"), (4, "FG.1001"), (5, "FG.1001")]);
    assert!(
        o.rejected[1].error_msg.contains("row 1"),
        "{:?}",
        o.rejected
    );
    assert_eq!(o.details.state, TaskState::CanaryInProgress);

    let d = env.wait_state(&tid, TaskState::CanaryCompleted).await;
    assert_eq!(d.status, SummaryStatus::Success);
    assert_eq!((d.devices.migrated, d.devices.not_migrated), (2, 38));
    assert_eq!(env.owner(&pk, "dev000"), TARGET);
    assert_eq!(env.owner(&pk, "dev002"), DEFAULT_INSTANCE_ID);
    assert_eq!(
        *env.kicks.lock().unwrap(),
        [(pk.clone(), "dev001".to_owned())],
        "only the connected canary device is kicked"
    );
    // A second canary is refused; a canary of an already migrated device is refused per row.
    let e = env
        .engine
        .canary(&tid, names(&["dev002"]), op())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("CANARY_COMPLETED"), "{e}");

    env.engine.full(&tid, op()).await.unwrap();
    let d = env.wait_state(&tid, TaskState::Completed).await;
    assert_eq!(d.devices.migrated, 40);
    assert_eq!(d.status, SummaryStatus::Success);
    assert!(d.completed_at_ms.is_some());
    assert_eq!(env.owners_in(&pk, TARGET), 40);
    assert_eq!(
        env.counted("migrated"),
        40,
        "every device moved exactly once"
    );
    assert_eq!(env.kicks.lock().unwrap().len(), 2);
    assert_eq!(env.metrics.migration_kicks.get(), 2);

    // Search and filter.
    let page = env
        .engine
        .devices(
            &tid,
            &DeviceListFilter {
                status: Some(DeviceStatus::Migrated),
                device_name: Some("DEV03".into()),
            },
            Page::new(1, 5).unwrap(),
        )
        .unwrap();
    assert_eq!(page.total, 10);
    assert_eq!(page.items.len(), 5);
    assert_eq!(page.items[0].device_name, "dev030");
    assert_eq!(page.items[0].instance_id.as_deref(), Some(TARGET));
    assert!(page.items[0].online);
    let none = env
        .engine
        .devices(
            &tid,
            &DeviceListFilter {
                status: Some(DeviceStatus::NotMigrated),
                device_name: None,
            },
            Page::default(),
        )
        .unwrap();
    assert_eq!(none.total, 0);

    let log = env.engine.log(&tid, Page::default()).unwrap();
    let actions: Vec<&str> = log.items.iter().map(|l| l.action.as_str()).collect();
    assert_eq!(
        actions,
        ["create", "canary", "finished", "full", "finished"]
    );
    assert_eq!(log.items[1].actor, op());
    assert_eq!(log.items[2].actor.kind, "system");
    assert_eq!(log.items[4].to_state, Some(TaskState::Completed));
}

/// Each command that must find work still to do (a pause, a refused pause) is sent while the
/// rate limit holds that work back by seconds per remaining device — never "soon after a start,
/// before it can finish" — and each wait is on the task's state, so a slow machine only makes
/// the test slower.
#[tokio::test]
async fn pause_continue_and_rollback_of_some_then_all() {
    let env = env(0).await;
    let pk = env.product(60).await;
    let tid = env.task(&pk).await;
    env.engine
        .canary(&tid, names(&["dev000"]), op())
        .await
        .unwrap();
    env.wait_state(&tid, TaskState::CanaryCompleted).await;
    // Batches of one device a second: 59 devices take a minute, the pause comes after a few.
    env.engine.set_rate(1).await.unwrap();
    env.engine.full(&tid, op()).await.unwrap();
    env.wait(&tid, "some progress", |d| d.devices.migrated >= 3)
        .await;
    let paused = env.engine.pause(&tid, op()).await.unwrap();
    assert_eq!(paused.state, TaskState::Paused);
    assert_eq!(paused.status, SummaryStatus::Terminated);
    let at_pause = env.owners_in(&pk, TARGET);
    assert!(at_pause < 60, "paused before the end ({at_pause})");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        env.owners_in(&pk, TARGET),
        at_pause,
        "nothing moves while paused"
    );
    let e = env.engine.pause(&tid, op()).await.unwrap_err();
    assert!(e.to_string().contains("PAUSED"), "{e}");

    let cont = env.engine.resume(&tid, op()).await.unwrap();
    assert_eq!(cont.state, TaskState::ContinueMigrating);
    assert_eq!(cont.status, SummaryStatus::Migrating);
    env.engine.set_rate(0).await.unwrap();
    env.wait_state(&tid, TaskState::Completed).await;
    assert_eq!(env.owners_in(&pk, TARGET), 60);

    // Rollback of picked devices from COMPLETED: BATCH_ROLLBACK, not pausable. One device a
    // second: the 20 are still rolling back when the pause is refused.
    env.engine.set_rate(1).await.unwrap();
    let o = env
        .engine
        .rollback(
            &tid,
            RollbackSelection::Picked(
                (1..=20)
                    .map(|i| format!("dev{i:03}"))
                    .chain(["nope".to_owned()])
                    .collect(),
            ),
            op(),
        )
        .await
        .unwrap();
    assert_eq!(o.details.state, TaskState::BatchRollback);
    assert_eq!(o.accepted, 20);
    assert_eq!(o.rejected.len(), 1);
    let e = env.engine.pause(&tid, op()).await.unwrap_err();
    assert!(e.to_string().contains("BATCH_ROLLBACK"), "{e}");
    env.engine.set_rate(0).await.unwrap();
    let d = env.wait_state(&tid, TaskState::ToMigrate).await;
    assert_eq!((d.devices.rolled_back, d.devices.migrated), (20, 40));
    assert_eq!(env.owner(&pk, "dev002"), DEFAULT_INSTANCE_ID);
    assert_eq!(status_of(&env, &tid, "dev002"), DeviceStatus::RolledBack);

    // Back to the start: canary again (a rolled-back device), full, then roll back everything
    // from MIGRATING with a pause in between (ROLLING_BACK is pausable).
    env.engine.set_rate(0).await.unwrap();
    env.engine
        .canary(&tid, names(&["dev002"]), op())
        .await
        .unwrap();
    env.wait_state(&tid, TaskState::CanaryCompleted).await;
    env.engine.set_rate(20).await.unwrap();
    env.engine.full(&tid, op()).await.unwrap();
    // Several devices on the target before the rollback starts, then one a second: the pause
    // finds it ROLLING_BACK (with only the canary device migrated, the rollback could end first).
    env.wait(&tid, "some progress", |d| d.devices.migrated >= 5)
        .await;
    env.engine.set_rate(1).await.unwrap();
    let o = env
        .engine
        .rollback(&tid, RollbackSelection::All, op())
        .await
        .unwrap();
    assert_eq!(o.details.state, TaskState::RollingBack);
    let p = match env.engine.pause(&tid, op()).await {
        Ok(p) => p,
        Err(e) => panic!(
            "{e}: {:#?}",
            env.engine
                .log(&tid, Page::new(1, 100).unwrap())
                .unwrap()
                .items
        ),
    };
    assert_eq!(p.state, TaskState::RollbackPaused);
    let e = env
        .engine
        .rollback(&tid, RollbackSelection::All, op())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("ROLLBACK_PAUSED"), "{e}");
    let c = env.engine.resume(&tid, op()).await.unwrap();
    assert_eq!(c.state, TaskState::RollingBack);
    env.engine.set_rate(0).await.unwrap();
    let d = env.wait_state(&tid, TaskState::ToMigrate).await;
    assert_eq!(env.owners_in(&pk, DEFAULT_INSTANCE_ID), 60);
    assert_eq!(d.devices.migrated, 0);
    assert_eq!(d.devices.rolled_back + d.devices.not_migrated, 60);
    // Every device that went to the target came back: moves there = moves back.
    assert_eq!(env.counted("migrated"), env.counted("rolled_back"));
}

#[tokio::test]
async fn rollback_refused_without_the_source_product_and_during_canary() {
    let env = env(1).await;
    let pk = env.product(3).await;
    let tid = env.task(&pk).await;
    env.engine
        .canary(&tid, names(&["dev000", "dev001", "dev002"]), op())
        .await
        .unwrap();
    let e = env
        .engine
        .rollback(&tid, RollbackSelection::All, op())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("CANARY_IN_PROGRESS"), "{e}");
    let e = env.engine.pause(&tid, op()).await.unwrap_err();
    assert!(e.to_string().contains("CANARY_IN_PROGRESS"), "{e}");
    env.engine.set_rate(0).await.unwrap();
    env.wait_state(&tid, TaskState::CanaryCompleted).await;
    // Picked rollback of a device that is not migrated is refused per row.
    for dn in ["dev000", "dev001", "dev002"] {
        env.registry.delete_device(&pk, dn).await.unwrap();
    }
    env.registry.delete_product(&pk).await.unwrap();
    let e = env
        .engine
        .rollback(&tid, RollbackSelection::All, op())
        .await
        .unwrap_err();
    assert!(matches!(e, MigrationError::SourceProductGone { .. }), "{e}");
    assert_eq!(
        env.engine.details(&tid).unwrap().state,
        TaskState::CanaryCompleted
    );
}

#[tokio::test]
async fn incremental_migration_is_data_sync_only() {
    let env = env(0).await;
    let pk = env.product(2).await;
    let tid = env.task(&pk).await;
    let cfg = MigrationConfig {
        migration_method: MigrationMethod::IncrementalMigration,
        resume_mode: ResumeMode::Manual,
        bandwidth_limit_mb: Some(123),
    };
    let d = env.engine.configure(&tid, cfg, op()).await.unwrap();
    assert_eq!(d.config, cfg);
    let e = env
        .engine
        .canary(&tid, names(&["dev000"]), op())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("incremental_migration"), "{e}");
    let e = env
        .engine
        .configure(
            &tid,
            MigrationConfig {
                bandwidth_limit_mb: Some(0),
                ..cfg
            },
            op(),
        )
        .await
        .unwrap_err();
    assert!(matches!(
        e,
        MigrationError::Invalid {
            field: "bandwidth_limit_mb",
            ..
        }
    ));
    // Data sync mirrors with the bandwidth limit applied to the target.
    env.engine.set_data_sync(&tid, true, op()).await.unwrap();
    assert_eq!(
        env.engine.extra_targets(&pk, "dev000", DEFAULT_INSTANCE_ID),
        [TARGET]
    );
    assert_eq!(env.engine.bandwidth_limit_mb(TARGET), Some(123));
    assert_eq!(
        env.limits.lock().unwrap().last(),
        Some(&(TARGET.to_owned(), Some(123 * 1024 * 1024)))
    );
    // Back to full_migration works in TO_MIGRATE only.
    env.engine
        .configure(&tid, MigrationConfig::default(), op())
        .await
        .unwrap();
    env.engine
        .canary(&tid, names(&["dev000"]), op())
        .await
        .unwrap();
    let e = env.engine.configure(&tid, cfg, op()).await.unwrap_err();
    assert!(e.to_string().contains("TO_MIGRATE"), "{e}");
}

#[tokio::test]
async fn data_sync_routes_expires_after_30_days_and_locks_after_completed() {
    let env = env(0).await;
    let pk = env.product(4).await;
    let tid = env.task(&pk).await;
    assert!(env
        .engine
        .extra_targets(&pk, "dev000", DEFAULT_INSTANCE_ID)
        .is_empty());
    let d = env.engine.set_data_sync(&tid, true, op()).await.unwrap();
    assert!(d.data_sync.enabled);
    let started = d.data_sync.started_at_ms.unwrap();
    assert_eq!(d.data_sync.expires_at_ms, Some(started + DATA_SYNC_MS));
    assert_eq!(
        env.engine.extra_targets(&pk, "dev000", DEFAULT_INSTANCE_ID),
        [TARGET]
    );
    // A migrated device's data goes to its owner (the target) only.
    assert!(env.engine.extra_targets(&pk, "dev000", TARGET).is_empty());
    assert!(env
        .engine
        .extra_targets("other", "dev000", DEFAULT_INSTANCE_ID)
        .is_empty());

    // Off and on again while not completed: allowed; the 30 days restart.
    env.engine.set_data_sync(&tid, false, op()).await.unwrap();
    assert!(env
        .engine
        .extra_targets(&pk, "dev000", DEFAULT_INSTANCE_ID)
        .is_empty());
    env.engine.clock().advance(Duration::from_secs(3600));
    let d = env.engine.set_data_sync(&tid, true, op()).await.unwrap();
    assert!(d.data_sync.started_at_ms.unwrap() >= started + 3_600_000);

    // 30 days later it is off (reads see it at once; the engine records it when woken).
    env.engine
        .clock()
        .advance(Duration::from_millis(DATA_SYNC_MS as u64 + 1));
    assert!(env
        .engine
        .extra_targets(&pk, "dev000", DEFAULT_INSTANCE_ID)
        .is_empty());
    assert!(!env.engine.details(&tid).unwrap().data_sync.enabled);
    env.engine.wake();
    let d = env
        .wait(&tid, "expiry recorded", |_| {
            env.engine
                .log(&tid, Page::new(1, 100).unwrap())
                .unwrap()
                .items
                .iter()
                .any(|l| l.action == "data_sync_expired")
        })
        .await;
    assert_eq!(d.data_sync.disabled_reason.as_deref(), Some("expired"));
    assert!(
        d.data_sync.can_enable,
        "expired before COMPLETED: may be turned on again"
    );
    let log = env.engine.log(&tid, Page::new(1, 100).unwrap()).unwrap();
    let expired = log
        .items
        .iter()
        .filter(|l| l.action == "data_sync_expired")
        .count();
    assert_eq!(expired, 1);
    assert_eq!(
        env.limits.lock().unwrap().last().map(|(_, l)| *l),
        Some(None),
        "the bandwidth limit is lifted with the route"
    );

    // Complete the migration with data sync on, then turn it off: locked for good.
    env.engine.set_data_sync(&tid, true, op()).await.unwrap();
    env.engine
        .canary(&tid, names(&["dev000"]), op())
        .await
        .unwrap();
    env.wait_state(&tid, TaskState::CanaryCompleted).await;
    env.engine.full(&tid, op()).await.unwrap();
    env.wait_state(&tid, TaskState::Completed).await;
    let d = env.engine.set_data_sync(&tid, false, op()).await.unwrap();
    assert!(!d.data_sync.can_enable);
    let e = env
        .engine
        .set_data_sync(&tid, true, op())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cannot be turned on again"), "{e}");
    // Turning it off again is a harmless no-op.
    env.engine.set_data_sync(&tid, false, op()).await.unwrap();
}

#[tokio::test]
async fn data_sync_expiring_after_completed_also_locks() {
    let env = env(0).await;
    let pk = env.product(2).await;
    let tid = env.task(&pk).await;
    env.engine.set_data_sync(&tid, true, op()).await.unwrap();
    env.engine
        .canary(&tid, names(&["dev000"]), op())
        .await
        .unwrap();
    env.wait_state(&tid, TaskState::CanaryCompleted).await;
    env.engine.full(&tid, op()).await.unwrap();
    env.wait_state(&tid, TaskState::Completed).await;
    env.engine
        .clock()
        .advance(Duration::from_millis(DATA_SYNC_MS as u64));
    assert!(!env.engine.details(&tid).unwrap().data_sync.can_enable);
    let e = env
        .engine
        .set_data_sync(&tid, true, op())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cannot be turned on again"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_migration_resumes_without_moving_anything_twice() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::db_path(dir.path());
    let m1 = Arc::new(Metrics::new());
    let env = env_with_store(Store::open(&path, m1.clone()).unwrap(), m1, 50).await;
    let pk = env.product(200).await;
    let tid = env.task(&pk).await;
    env.engine.set_data_sync(&tid, true, op()).await.unwrap();
    env.engine
        .canary(&tid, names(&["dev010", "dev020"]), op())
        .await
        .unwrap();
    env.wait_state(&tid, TaskState::CanaryCompleted).await;
    env.engine.full(&tid, op()).await.unwrap();
    env.wait(&tid, "some progress", |d| d.devices.migrated >= 40)
        .await;
    env.engine.shutdown().await;
    let moved_before = env.counted("migrated");
    let in_target_before = env.owners_in(&pk, TARGET);
    assert!(
        in_target_before < 200,
        "stopped mid-way ({in_target_before})"
    );
    assert_eq!(moved_before as usize, in_target_before);
    env.registry.flush().await.unwrap();
    let Env {
        registry, engine, ..
    } = env;
    drop(engine);
    drop(registry);

    let m2 = Arc::new(Metrics::new());
    let registry = Registry::open(Store::open(&path, m2.clone()).unwrap(), m2.clone()).unwrap();
    let in_target_after = registry
        .device_names_after(&pk, None, usize::MAX)
        .unwrap()
        .iter()
        .filter(|dn| registry.device_instance(&pk, dn).as_deref() == Some(TARGET))
        .count();
    assert_eq!(
        in_target_after, in_target_before,
        "the store agrees with memory"
    );
    let env = engine_on(registry, m2, 0);
    assert!(
        env.engine.details(&tid).unwrap().data_sync.enabled,
        "data sync survives the restart"
    );
    assert_eq!(
        env.engine.extra_targets(&pk, "dev199", DEFAULT_INSTANCE_ID),
        [TARGET]
    );
    let d = env.wait_state(&tid, TaskState::Completed).await;
    assert_eq!(d.devices.migrated, 200);
    assert_eq!(
        moved_before + env.counted("migrated"),
        200,
        "each device moved exactly once over both runs"
    );
    let log = env.engine.log(&tid, Page::new(1, 100).unwrap()).unwrap();
    let actions: Vec<&str> = log.items.iter().map(|l| l.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "create",
            "data_sync_on",
            "canary",
            "finished",
            "full",
            "finished"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_canary_resumes_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::db_path(dir.path());
    let m1 = Arc::new(Metrics::new());
    let env = env_with_store(Store::open(&path, m1.clone()).unwrap(), m1, 5).await;
    let pk = env.product(30).await;
    let tid = env.task(&pk).await;
    let picked: Vec<String> = (0..30).step_by(2).map(|i| format!("dev{i:03}")).collect();
    env.engine.canary(&tid, picked.clone(), op()).await.unwrap();
    env.wait(&tid, "some progress", |d| d.devices.migrated >= 1)
        .await;
    env.engine.shutdown().await;
    let before = env.counted("migrated");
    let Env {
        registry, engine, ..
    } = env;
    registry.flush().await.unwrap();
    drop(engine);
    drop(registry);

    let m2 = Arc::new(Metrics::new());
    let env = env_with_store(Store::open(&path, m2.clone()).unwrap(), m2, 0).await;
    let d = env.wait_state(&tid, TaskState::CanaryCompleted).await;
    assert_eq!((d.devices.migrated, d.devices.not_migrated), (15, 15));
    assert_eq!(before + env.counted("migrated"), 15);
    for dn in &picked {
        assert_eq!(env.owner(&pk, dn), TARGET);
    }
    assert_eq!(env.owner(&pk, "dev001"), DEFAULT_INSTANCE_ID);
}

/// A backend that fails every commit while `failing` is set.
struct FlakyBackend {
    inner: SqliteBackend,
    failing: Arc<AtomicBool>,
}

impl StoreBackend for FlakyBackend {
    fn load(&mut self) -> Result<Snapshot, crate::store::StoreError> {
        self.inner.load()
    }

    fn load_documents(
        &mut self,
        kind: &str,
    ) -> Result<Vec<(String, String)>, crate::store::StoreError> {
        self.inner.load_documents(kind)
    }

    fn commit(
        &mut self,
        submissions: &[&[Op]],
    ) -> Result<Vec<Result<(), crate::store::StoreError>>, crate::store::StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(crate::store::StoreError::Corrupt {
                what: "test",
                message: "disk full".into(),
            });
        }
        self.inner.commit(submissions)
    }
}

async fn flaky_env() -> (Env, Arc<AtomicBool>) {
    let failing = Arc::new(AtomicBool::new(false));
    let m = Arc::new(Metrics::new());
    let store = Store::with_backend(
        FlakyBackend {
            inner: SqliteBackend::open_in_memory().unwrap(),
            failing: failing.clone(),
        },
        m.clone(),
    )
    .unwrap();
    (env_with_store(store, m, 0).await, failing)
}

#[tokio::test]
async fn resume_mode_manual_halts_until_continue() {
    let (env, failing) = flaky_env().await;
    let pk = env.product(10).await;
    let tid = env.task(&pk).await;
    env.engine
        .configure(
            &tid,
            MigrationConfig {
                resume_mode: ResumeMode::Manual,
                ..MigrationConfig::default()
            },
            op(),
        )
        .await
        .unwrap();
    env.engine.set_rate(1).await.unwrap();
    env.engine
        .canary(&tid, names(&["dev000", "dev001", "dev002"]), op())
        .await
        .unwrap();
    failing.store(true, Ordering::SeqCst);
    env.engine.set_rate(0).await.unwrap();
    let d = env.wait(&tid, "halted", |d| d.halted).await;
    assert_eq!(d.status, SummaryStatus::Failed);
    assert_eq!(d.state, TaskState::CanaryInProgress);
    // The devices whose move failed say so, with the reason, until they move.
    assert!(d.devices.failed >= 1, "{d:?}");
    let failed = env
        .engine
        .devices(
            &tid,
            &DeviceListFilter {
                status: Some(DeviceStatus::Failed),
                device_name: None,
            },
            Page::default(),
        )
        .unwrap();
    assert!(
        failed.items[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("disk full"),
        "{failed:?}"
    );
    let one = env
        .engine
        .device_status(&pk, &failed.items[0].device_name)
        .unwrap();
    assert_eq!(one.status, DeviceStatus::Failed);
    assert!(one.reason.unwrap().contains("disk full"));
    assert!(
        d.error.as_deref().unwrap_or("").contains("disk full"),
        "{d:?}"
    );
    assert!(env.metrics.migration_faults.get() >= 1);
    // Nothing moves while halted, even once the store works again.
    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        env.engine.details(&tid).unwrap().state,
        TaskState::CanaryInProgress
    );
    let migrated_while_halted = env.owners_in(&pk, TARGET);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(env.owners_in(&pk, TARGET), migrated_while_halted);
    let c = env.engine.resume(&tid, op()).await.unwrap();
    assert!(!c.halted);
    let d = env.wait_state(&tid, TaskState::CanaryCompleted).await;
    assert_eq!(d.devices.migrated, 3);
    assert_eq!(d.devices.failed, 0);
    assert_eq!(d.status, SummaryStatus::Success);
    assert_eq!(d.error, None);
    assert_eq!(env.owners_in(&pk, TARGET), 3);
}

#[tokio::test]
async fn resume_mode_auto_retries_by_itself() {
    let (env, failing) = flaky_env().await;
    let pk = env.product(10).await;
    let tid = env.task(&pk).await;
    env.engine.set_rate(1).await.unwrap();
    env.engine
        .canary(&tid, names(&["dev000", "dev001"]), op())
        .await
        .unwrap();
    failing.store(true, Ordering::SeqCst);
    env.engine.set_rate(0).await.unwrap();
    let d = env.wait(&tid, "a fault", |d| d.error.is_some()).await;
    assert!(!d.halted);
    assert_eq!(d.status, SummaryStatus::Migrating);
    assert!(d.error.unwrap().contains("retrying"));
    failing.store(false, Ordering::SeqCst);
    let d = env.wait_state(&tid, TaskState::CanaryCompleted).await;
    assert_eq!(d.devices.migrated, 2);
    assert_eq!(d.error, None);
}

#[tokio::test]
async fn devices_created_after_completed_are_swept_and_deleted_ones_leave_the_task() {
    let env = env(0).await;
    let pk = env.product(3).await;
    let tid = env.task(&pk).await;
    env.engine.set_rate(1).await.unwrap();
    env.engine
        .canary(&tid, names(&["dev000", "dev001"]), op())
        .await
        .unwrap();
    // dev001 is deleted before its turn: it leaves the canary (not a failure: an operator
    // deleted it), so the canary still completes with SUCCESS.
    env.registry.delete_device(&pk, "dev001").await.unwrap();
    env.engine.set_rate(0).await.unwrap();
    let d = env.wait_state(&tid, TaskState::CanaryCompleted).await;
    assert_eq!(d.devices.failed, 0, "{d:?}");
    assert_eq!(d.devices.total, 2, "{d:?}");
    assert_eq!(d.devices.migrated, 1, "{d:?}");
    assert_eq!(d.status, SummaryStatus::Success);
    let log = env.engine.log(&tid, Page::new(1, 100).unwrap()).unwrap();
    assert!(
        log.items
            .iter()
            .any(|l| l.action == "device_deleted" && l.detail.contains("dev001")),
        "{:?}",
        log.items
    );
    env.engine.full(&tid, op()).await.unwrap();
    env.wait_state(&tid, TaskState::Completed).await;
    env.device(&pk, "late").await;
    assert_eq!(env.owner(&pk, "late"), DEFAULT_INSTANCE_ID);
    env.engine.wake();
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.owner(&pk, "late") != TARGET {
        assert!(tokio::time::Instant::now() < deadline, "never swept");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status_of(&env, &tid, "late"), DeviceStatus::Migrated);
    let d = env
        .wait(&tid, "sweep logged", |_| {
            env.engine
                .log(&tid, Page::new(1, 100).unwrap())
                .unwrap()
                .items
                .iter()
                .any(|l| l.action == "swept")
        })
        .await;
    assert_eq!(d.state, TaskState::Completed);
    // A COMPLETED task can be deleted.
    env.engine.delete(&tid, op()).await.unwrap();
    assert_eq!(
        env.engine
            .list(&TaskFilter::default(), Page::default())
            .total,
        0
    );
}

#[tokio::test]
async fn selection_limits() {
    let env = env(0).await;
    let pk = env.product(1).await;
    let tid = env.task(&pk).await;
    let e = env.engine.canary(&tid, Vec::new(), op()).await.unwrap_err();
    assert!(matches!(
        e,
        MigrationError::Invalid {
            field: "device_names",
            ..
        }
    ));
    let many: Vec<String> = (0..=MAX_PICKED).map(|i| format!("d{i}")).collect();
    let e = env.engine.canary(&tid, many, op()).await.unwrap_err();
    assert!(matches!(
        e,
        MigrationError::TooMany {
            max: MAX_PICKED,
            ..
        }
    ));
    let e = env
        .engine
        .canary(&tid, names(&["ghost", "ghost2"]), op())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("row 1"), "{e}");
    assert_eq!(
        env.engine.details(&tid).unwrap().state,
        TaskState::ToMigrate
    );
}

/// A picked rollback checks its rows like a canary (duplicates, unknown names) but wants the
/// devices in the target; a selection with no usable row changes nothing.
#[tokio::test]
async fn picked_rollback_selection() {
    let env = env(0).await;
    let pk = env.product(3).await;
    let tid = env.task(&pk).await;
    env.engine
        .canary(&tid, names(&["dev000"]), op())
        .await
        .unwrap();
    env.wait_state(&tid, TaskState::CanaryCompleted).await;

    let e = env
        .engine
        .rollback(&tid, RollbackSelection::Picked(Vec::new()), op())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            MigrationError::Invalid {
                field: "device_names",
                ..
            }
        ) && e.to_string().contains(r#"{"all":true}"#),
        "{e}"
    );
    let e = env
        .engine
        .rollback(&tid, RollbackSelection::Picked(names(&["dev001"])), op())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nothing to roll back"), "{e}");
    assert_eq!(
        env.engine.details(&tid).unwrap().state,
        TaskState::CanaryCompleted
    );

    let o = env
        .engine
        .rollback(
            &tid,
            RollbackSelection::Picked(names(&["dev000", "dev001", "ghost", "dev000"])),
            op(),
        )
        .await
        .unwrap();
    assert_eq!(o.accepted, 1);
    let rejected: Vec<(usize, &str)> = o
        .rejected
        .iter()
        .map(|r| (r.row, r.error_code.as_str()))
        .collect();
    assert_eq!(rejected, [(2, "FG.1001"), (3, "FG.2003"), (4, "FG.1001")]);
    assert!(
        o.rejected[0].error_msg.contains("not migrated"),
        "{:?}",
        o.rejected
    );
    env.wait_state(&tid, TaskState::ToMigrate).await;
    assert_eq!(env.owner(&pk, "dev000"), DEFAULT_INSTANCE_ID);
}

#[tokio::test]
async fn a_deleted_device_leaves_the_task_and_a_namesake_starts_not_migrated() {
    let env = env(0).await;
    let pk = env.product(4).await;
    let tid = env.task(&pk).await;
    env.engine
        .canary(&tid, names(&["dev000", "dev001"]), op())
        .await
        .unwrap();
    env.wait_state(&tid, TaskState::CanaryCompleted).await;
    env.registry.delete_device(&pk, "dev000").await.unwrap();
    // Handled when delete_device returns: totals count only existing devices.
    let d = env.engine.details(&tid).unwrap();
    assert_eq!((d.devices.total, d.devices.migrated), (3, 1), "{d:?}");
    assert_eq!(d.status, SummaryStatus::Success);
    let log = env.engine.log(&tid, Page::new(1, 100).unwrap()).unwrap();
    let last = log.items.last().unwrap();
    assert_eq!(last.action, "device_deleted");
    assert!(last.detail.contains("dev000 (MIGRATED)"), "{last:?}");
    // A new device with the old name is a new device: not migrated.
    env.device(&pk, "dev000").await;
    assert_eq!(status_of(&env, &tid, "dev000"), DeviceStatus::NotMigrated);
    env.engine.full(&tid, op()).await.unwrap();
    let d = env.wait_state(&tid, TaskState::Completed).await;
    assert_eq!((d.devices.total, d.devices.migrated), (4, 4), "{d:?}");
    assert_eq!(env.owner(&pk, "dev000"), TARGET);
}

#[tokio::test]
async fn a_device_deleted_while_the_engine_is_down_is_forgotten_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::db_path(dir.path());
    let m1 = Arc::new(Metrics::new());
    let env = env_with_store(Store::open(&path, m1.clone()).unwrap(), m1, 0).await;
    let pk = env.product(3).await;
    let tid = env.task(&pk).await;
    env.engine
        .canary(&tid, names(&["dev000"]), op())
        .await
        .unwrap();
    env.wait_state(&tid, TaskState::CanaryCompleted).await;
    // The engine is stopped (a crash between the registry's commit and the engine's): it
    // never hears of the deletion.
    env.engine.shutdown().await;
    env.registry.delete_device(&pk, "dev000").await.unwrap();
    // Created strictly after the record was written (ms timestamps).
    tokio::time::sleep(Duration::from_millis(5)).await;
    env.device(&pk, "dev000").await;
    let Env {
        registry, engine, ..
    } = env;
    registry.flush().await.unwrap();
    drop(engine);
    drop(registry);

    let m2 = Arc::new(Metrics::new());
    let env = env_with_store(Store::open(&path, m2.clone()).unwrap(), m2, 0).await;
    // The re-created device is in the source and must not inherit the old MIGRATED record.
    assert_eq!(env.owner(&pk, "dev000"), DEFAULT_INSTANCE_ID);
    assert_eq!(status_of(&env, &tid, "dev000"), DeviceStatus::NotMigrated);
    let d = env.engine.details(&tid).unwrap();
    assert_eq!((d.devices.total, d.devices.migrated), (3, 0), "{d:?}");
}

#[tokio::test]
async fn device_status_follows_the_products_task() {
    let env = env(0).await;
    let pk = env.product(3).await;
    assert_eq!(env.engine.device_status(&pk, "dev000"), None, "no task yet");
    let tid = env.task(&pk).await;
    let s = env.engine.device_status(&pk, "dev000").unwrap();
    assert_eq!(
        (s.task_id.as_str(), s.task_state, s.status, s.updated_at_ms),
        (
            tid.as_str(),
            TaskState::ToMigrate,
            DeviceStatus::NotMigrated,
            None
        )
    );
    assert_eq!(s.target_instance_id, TARGET);
    assert_eq!(s.source_instance_id, DEFAULT_INSTANCE_ID);
    env.engine
        .canary(&tid, names(&["dev000"]), op())
        .await
        .unwrap();
    env.wait_state(&tid, TaskState::CanaryCompleted).await;
    let s = env.engine.device_status(&pk, "dev000").unwrap();
    assert_eq!(
        (s.status, s.task_state),
        (DeviceStatus::Migrated, TaskState::CanaryCompleted)
    );
    assert!(s.updated_at_ms.is_some());
    assert_eq!(
        env.engine.device_status(&pk, "dev001").unwrap().status,
        DeviceStatus::NotMigrated
    );
    assert_eq!(env.engine.device_status(&pk, "nosuchdevice"), None);
    env.engine
        .rollback(&tid, RollbackSelection::Picked(names(&["dev000"])), op())
        .await
        .unwrap();
    env.wait_state(&tid, TaskState::ToMigrate).await;
    assert_eq!(
        env.engine.device_status(&pk, "dev000").unwrap().status,
        DeviceStatus::RolledBack
    );
    // A deleted task leaves nothing to show.
    env.engine.delete(&tid, op()).await.unwrap();
    assert_eq!(env.engine.device_status(&pk, "dev000"), None);
}

/// Cluster mode without the cluster: a standby engine on the same registry and store mirrors
/// the driver's documents (as the change feed hands them over), refuses changes, and takes the
/// task over mid-migration when the driver gives up its term — every device moved once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_mirrors_the_driver_and_resumes_its_migration() {
    let env = env(50).await;
    let limits: Limits = Arc::default();
    let l = limits.clone();
    let standby = MigrationEngine::standby(
        env.registry.clone(),
        env.registry.store().clone(),
        env.metrics.clone(),
        EngineConfig {
            devices_per_sec: 0,
            batch_size: 16,
        },
        Hooks {
            kick: Arc::new(|_, _| {}),
            set_rate_limit: Arc::new(move |iid: &str, b: Option<u64>| {
                l.lock().unwrap().push((iid.to_owned(), b))
            }),
        },
        Clock::system(),
    )
    .unwrap();
    assert!(env.engine.is_driving());
    assert!(!standby.is_driving());
    let pk = env.product(200).await;
    let new = NewTask {
        product_key: pk.clone(),
        target_instance_id: TARGET.into(),
        name: None,
        config: MigrationConfig::default(),
    };
    let e = standby.create(new, op()).await.unwrap_err();
    assert!(matches!(e, MigrationError::Standby), "{e}");

    let tid = env.task(&pk).await;
    env.engine.set_data_sync(&tid, true, op()).await.unwrap();
    env.engine
        .canary(&tid, names(&["dev010"]), op())
        .await
        .unwrap();
    env.wait_state(&tid, TaskState::CanaryCompleted).await;
    env.engine.full(&tid, op()).await.unwrap();
    env.wait(&tid, "some progress", |d| d.devices.migrated >= 40)
        .await;

    // The feed's resync hands over every document of each kind.
    let mirror_all = |engine: Arc<MigrationEngine>| {
        let store = env.registry.store().clone();
        async move {
            for kind in MIRRORED_KINDS {
                let s = store.clone();
                let docs = tokio::task::spawn_blocking(move || s.load_documents(kind))
                    .await
                    .unwrap()
                    .unwrap();
                engine.mirror_reloaded(kind, &docs);
            }
        }
    };
    assert!(standby.details(&tid).is_err(), "nothing mirrored yet");
    mirror_all(standby.clone()).await;
    let seen = standby.details(&tid).unwrap();
    assert_eq!(seen.state, TaskState::Migrating);
    assert!(seen.devices.migrated >= 40, "{seen:?}");
    assert_eq!(
        standby.extra_targets(&pk, "dev199", DEFAULT_INSTANCE_ID),
        [TARGET],
        "the data-sync route is on the standby too"
    );
    assert!(limits.lock().unwrap().iter().any(|(i, _)| i == TARGET));
    assert_eq!(
        standby.device_status(&pk, "dev010").unwrap().status,
        DeviceStatus::Migrated
    );
    let log = standby.log(&tid, Page::new(1, 100).unwrap()).unwrap();
    assert_eq!(log.items[0].action, "create");

    // One document at a time: the task deleted (its route with it), then back.
    let task_body = {
        let s = env.registry.store().clone();
        tokio::task::spawn_blocking(move || s.load_documents(TASK_DOC))
            .await
            .unwrap()
            .unwrap()
            .into_iter()
            .find(|(id, _)| *id == tid)
            .unwrap()
            .1
    };
    standby.mirror_changed(TASK_DOC, &tid, None);
    assert!(standby.details(&tid).is_err());
    assert!(standby
        .extra_targets(&pk, "dev199", DEFAULT_INSTANCE_ID)
        .is_empty());
    assert_eq!(
        limits.lock().unwrap().last().unwrap(),
        &(TARGET.into(), None)
    );
    standby.mirror_changed(TASK_DOC, &tid, Some(&task_body));
    assert_eq!(standby.details(&tid).unwrap().task_id, tid);

    // The driver's term ends mid-migration; the standby's begins.
    env.engine.deactivate().await;
    assert!(!env.engine.is_driving());
    let moved_before = env.counted("migrated");
    assert!(env.owners_in(&pk, TARGET) < 200, "stopped mid-way");
    let e = env.engine.pause(&tid, op()).await.unwrap_err();
    assert!(matches!(e, MigrationError::Standby), "{e}");
    standby.activate().await.unwrap();
    assert!(standby.is_driving());
    // While it drives, the feed does not touch its state.
    standby.mirror_changed(TASK_DOC, &tid, None);
    assert!(standby.details(&tid).is_ok());
    let deadline = tokio::time::Instant::now() + WAIT;
    let done = loop {
        let d = standby.details(&tid).unwrap();
        if d.state == TaskState::Completed {
            break d;
        }
        assert!(tokio::time::Instant::now() < deadline, "never done: {d:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(done.devices.migrated, 200);
    assert_eq!(env.owners_in(&pk, TARGET), 200);
    assert_eq!(
        env.counted("migrated"),
        200,
        "each device moved exactly once over both terms ({moved_before} in the first)"
    );
    // The old driver, a standby now, mirrors the new one's documents.
    mirror_all(env.engine.clone()).await;
    assert_eq!(
        env.engine.details(&tid).unwrap().state,
        TaskState::Completed
    );
    standby.shutdown().await;
}
