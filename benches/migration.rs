//! Benchmark of the migration engine (docs/BENCHMARKS.md, "Migration"): a full migration of a
//! 50,000-device product through the engine, on a file store with fsync, at the default rate
//! and unthrottled. `cargo bench -p fleetgate --bench migration`.

mod common;

use fleetgate::clock::Clock;
use fleetgate::metrics::Metrics;
use fleetgate::migration::{
    Actor, EngineConfig, Hooks, MigrationConfig, MigrationEngine, NewTask, TaskFilter, TaskState,
};
use fleetgate::registry::{NewDevice, NewInstance, NewProduct, Page, Registry};
use fleetgate::store::Store;
use std::sync::Arc;
use std::time::Duration;

const TARGET: &str = "iot-target";
/// Devices of the product.
const N: usize = 50_000;

fn op() -> Actor {
    Actor::api("operator", "0123456789ab")
}

fn main() {
    common::run(&["full_migration_50k"], |_| full_migration_50k());
}

/// Benchmark (docs/BENCHMARKS.md): full migration of a 50,000-device product, registry only
/// (devices offline), on a file store with fsync, at the default rate and unthrottled.
/// `cargo bench -p fleetgate --bench migration`
async fn full_migration_50k() {
    for rate in [EngineConfig::default().devices_per_sec, 0] {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        let (registry, pk) = product_of_50k(&dir, &m).await;
        let engine = MigrationEngine::start(
            registry.clone(),
            registry.store().clone(),
            m.clone(),
            EngineConfig {
                devices_per_sec: rate,
                ..EngineConfig::default()
            },
            Hooks::default(),
            Clock::system(),
        )
        .unwrap();
        let tid = engine
            .create(
                NewTask {
                    product_key: pk.clone(),
                    target_instance_id: TARGET.into(),
                    name: None,
                    config: MigrationConfig::default(),
                },
                op(),
            )
            .await
            .unwrap()
            .task_id;
        engine
            .canary(&tid, vec!["dev000000".to_owned()], op())
            .await
            .unwrap();
        while engine.details(&tid).unwrap().state != TaskState::CanaryCompleted {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let started = std::time::Instant::now();
        engine.full(&tid, op()).await.unwrap();
        loop {
            // Polled through the state lock only (details would walk 50,000 devices).
            if engine
                .list(&TaskFilter::default(), Page::new(1, 1).unwrap())
                .items
                .first()
                .is_some_and(|t| t.state == TaskState::Completed)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let moved = m
            .migration_devices
            .get_or_create(&[("result", "migrated")])
            .get();
        assert_eq!(moved as usize, N);
        let d = engine.details(&tid).unwrap();
        assert_eq!(d.devices.migrated as usize, N);
        println!(
            "BENCH migration 50k: rate={} -> {:.1} s to COMPLETED, {:.0} devices/s",
            if rate == 0 {
                "unthrottled".to_owned()
            } else {
                format!("{rate}/s")
            },
            secs,
            (N - 1) as f64 / secs
        );
        engine.shutdown().await;
    }
}

/// A registry on a file store in `dir` with the target instance and a product of [`N`]
/// devices; the registry and the product's key.
async fn product_of_50k(dir: &tempfile::TempDir, m: &Arc<Metrics>) -> (Arc<Registry>, String) {
    let store = Store::open(&Store::db_path(dir.path()), m.clone()).unwrap();
    let registry = Registry::open(store, m.clone()).unwrap();
    registry
        .create_instance(NewInstance {
            instance_id: Some(TARGET.into()),
            name: "Target".into(),
        })
        .await
        .unwrap();
    let pk = registry
        .create_product(NewProduct::named("Bench"))
        .await
        .unwrap()
        .product_key;
    for chunk in 0..N / 10_000 {
        let rows = (0..10_000)
            .map(|i| NewDevice {
                device_name: format!("dev{:06}", chunk * 10_000 + i),
                ..Default::default()
            })
            .collect();
        registry.batch_create_devices(&pk, rows).await.unwrap();
    }
    (registry, pk)
}
