//! The store suite. Tests that hold for any backend are written once with
//! [`on_both_backends!`] and run as `{name}::sqlite` and `{name}::postgres`; the PostgreSQL
//! runs need the local server (see [`test_db`](super::test_db)).

use super::test_db::{Backend, TestDb};
use super::*;
use std::collections::BTreeMap;

/// Runs a test body once per backend, as `$name::sqlite` and `$name::postgres`, with `$db` a
/// fresh [`TestDb`] of that backend. The attributes (`#[tokio::test]`, `#[test]`) apply to both.
macro_rules! on_both_backends {
    ($(#[$attr:meta])* async fn $name:ident($db:ident) $body:block) => {
        mod $name {
            use super::*;
            $(#[$attr])*
            async fn sqlite() {
                let $db = TestDb::new(Backend::Sqlite);
                $body
            }
            $(#[$attr])*
            async fn postgres() {
                let $db = TestDb::new(Backend::Postgres);
                $body
            }
        }
    };
    ($(#[$attr:meta])* fn $name:ident($db:ident) $body:block) => {
        mod $name {
            use super::*;
            $(#[$attr])*
            fn sqlite() {
                let $db = TestDb::new(Backend::Sqlite);
                $body
            }
            $(#[$attr])*
            fn postgres() {
                let $db = TestDb::new(Backend::Postgres);
                $body
            }
        }
    };
}

pub(crate) fn metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new())
}

pub(crate) fn instance(id: &str) -> InstanceRecord {
    InstanceRecord {
        instance_id: id.into(),
        name: format!("{id} name"),
        created_at_ms: 1,
    }
}

pub(crate) fn product(pk: &str, iid: &str) -> ProductRecord {
    ProductRecord {
        product_key: pk.into(),
        product_secret: "s3cr3t".into(),
        name: format!("{pk} name"),
        instance_id: iid.into(),
        description: Some("desc".into()),
        created_at_ms: 2,
    }
}

pub(crate) fn device(pk: &str, dn: &str) -> DeviceRecord {
    DeviceRecord {
        product_key: pk.into(),
        device_name: dn.into(),
        device_secret: format!("secret-{dn}"),
        instance_id: "default".into(),
        enabled: true,
        tags: BTreeMap::from([("floor".to_string(), "3".to_string())]),
        created_at_ms: 3,
    }
}

pub(crate) fn version(pk: &str, dn: &str, module: &str, v: &str) -> Op {
    Op::SetVersion {
        product_key: pk.into(),
        device_name: dn.into(),
        module: module.into(),
        version: v.into(),
        reported_at_ms: 4,
    }
}

/// A small data set touching every op, and the snapshot it must load back as.
/// The session epoch `populate_ops` connects `dev1` with.
pub(crate) const POPULATED_SESSION: u64 = 5;

pub(crate) fn populate_ops() -> (Vec<Op>, Snapshot) {
    let mut disabled = device("pk1", "dev2");
    disabled.enabled = false;
    disabled.tags.clear();
    let ops = vec![
        Op::PutInstance(instance("default")),
        Op::PutInstance(instance("iot-other")),
        Op::PutProduct(product("pk1", "default")),
        Op::PutProduct(product("gone", "iot-other")),
        Op::PutDevice(device("pk1", "dev1")),
        Op::PutDevice(device("pk1", "dev2")),
        Op::PutDevice(device("pk1", "dev3")),
        version("pk1", "dev1", "default", "1.0.0"),
        version("pk1", "dev1", "MCU", "0.9"),
        version("pk1", "dev1", "default", "1.0.1"),
        version("pk1", "dev3", "MCU", "7"),
        Op::SetConnection {
            product_key: "pk1".into(),
            device_name: "dev1".into(),
            last_seen_ms: 99,
            client_ip: Some("10.0.0.7".into()),
            session: SessionWrite::Online(POPULATED_SESSION),
        },
        Op::PutDevice(disabled.clone()),
        Op::DeleteDevice {
            product_key: "pk1".into(),
            device_name: "dev3".into(),
        },
        Op::DeleteProduct {
            product_key: "gone".into(),
        },
    ];
    let expected = Snapshot {
        instances: vec![instance("default"), instance("iot-other")],
        products: vec![product("pk1", "default")],
        devices: vec![
            StoredDevice {
                record: device("pk1", "dev1"),
                last_seen_ms: Some(99),
                client_ip: Some("10.0.0.7".into()),
                versions: BTreeMap::from([
                    ("MCU".to_string(), "0.9".to_string()),
                    ("default".to_string(), "1.0.1".to_string()),
                ]),
                session: None,
                epoch_seen: 0,
            },
            StoredDevice {
                record: disabled,
                last_seen_ms: None,
                client_ip: None,
                versions: BTreeMap::new(),
                session: None,
                epoch_seen: 0,
            },
        ],
        feed_cuts: BTreeMap::new(),
    };
    (ops, expected)
}

/// A statement the database refused (foreign key, constraint), on either backend.
pub(crate) fn is_refused(result: &Result<(), StoreError>) -> bool {
    matches!(result, Err(StoreError::Sqlite(_) | StoreError::Postgres(_)))
}

/// The schema version the backend of `db` writes, read from its `schema_version` table.
fn stored_schema_version(db: &TestDb) -> i64 {
    db.query_i64("SELECT CAST(version AS BIGINT) FROM schema_version WHERE id = 1")
}

on_both_backends! {
    #[tokio::test]
    async fn write_close_reopen_loads_everything_back(db) {
        let (ops, expected) = populate_ops();
        let expected = db.expected(expected);

        let store = db.open(metrics());
        for op in ops {
            store.submit(vec![op]).await.unwrap();
        }
        assert_eq!(store.load().unwrap(), expected);
        store.close();

        let store = db.open(metrics());
        assert_eq!(store.load().unwrap(), expected);
        store.close();

        // PostgreSQL has four steps more: cluster mode's sessions and feed positions, its
        // leases, its shared forwarding outbox, and its shared firmware bytes, export packages and key.
        let (supported, steps) = match db.location() {
            StoreLocation::Sqlite(_) => (SCHEMA_VERSION, 2),
            StoreLocation::Postgres(_) => (POSTGRES_SCHEMA_VERSION, 6),
        };
        assert_eq!(stored_schema_version(&db), i64::from(steps));
        assert_eq!(supported, steps);
    }
}

on_both_backends! {
    #[tokio::test]
    async fn documents_round_trip_by_kind(db) {
        let store = db.open(metrics());
        let put = |kind: &'static str, id: &str, body: &str| Op::PutDoc {
            kind,
            id: id.to_owned(),
            body: body.to_owned(),
        };
        store
            .submit(vec![
                put("ota.job", "j2", "{\"n\":2}"),
                put("ota.job", "j1", "{}"),
                put("ota.task", "t1", "[]"),
                // Ordered by bytes, as SQLite does: uppercase before lowercase.
                put("ota.job", "J3", "{}"),
            ])
            .await
            .unwrap();
        store
            .submit(vec![put("ota.job", "j1", "{\"n\":1}")])
            .await
            .unwrap();
        store
            .submit(vec![
                Op::DeleteDoc {
                    kind: "ota.task",
                    id: "t1".into(),
                },
                Op::DeleteDoc {
                    kind: "ota.task",
                    id: "nope".into(),
                },
            ])
            .await
            .unwrap();
        store.close();
        let store = db.open(metrics());
        assert_eq!(
            store.load_documents("ota.job").unwrap(),
            vec![
                ("J3".to_owned(), "{}".to_owned()),
                ("j1".to_owned(), "{\"n\":1}".to_owned()),
                ("j2".to_owned(), "{\"n\":2}".to_owned())
            ]
        );
        assert!(store.load_documents("ota.task").unwrap().is_empty());
        store.close();
    }
}

on_both_backends! {
    /// A device's latest-properties document is written only while the device exists and is
    /// deleted in the transaction that deletes the device, so no crash can leave it behind
    /// for a device created again under the name.
    #[tokio::test]
    async fn device_properties_never_outlive_their_device(db) {
        let store = db.open(metrics());
        let props = |dn: &str, body: &str| Op::PutDeviceProperties {
            product_key: "pk1".into(),
            device_name: dn.into(),
            body: body.into(),
        };
        let delete = |dn: &str| Op::DeleteDevice {
            product_key: "pk1".into(),
            device_name: dn.into(),
        };
        store
            .submit(vec![
                Op::PutInstance(instance("default")),
                Op::PutProduct(product("pk1", "default")),
                Op::PutDevice(device("pk1", "dev1")),
                Op::PutDevice(device("pk1", "dev2")),
                // Another module's document with the same id stays.
                Op::PutDoc {
                    kind: "ota.task",
                    id: "pk1/dev1".into(),
                    body: "{}".into(),
                },
            ])
            .await
            .unwrap();
        store
            .submit(vec![props("dev1", "{\"v\":1}"), props("dev2", "{\"v\":2}"), props("dev9", "{}")])
            .await
            .unwrap();
        store.submit(vec![props("dev1", "{\"v\":3}")]).await.unwrap();
        let docs = |store: &Store| store.load_documents(DEVICE_PROPERTIES).unwrap();
        assert_eq!(
            docs(&store),
            [
                ("pk1/dev1".to_owned(), "{\"v\":3}".to_owned()),
                ("pk1/dev2".to_owned(), "{\"v\":2}".to_owned())
            ]
        );
        // The device's delete takes its document; a write queued after it writes nothing,
        // in the same transaction or a later one.
        store.submit(vec![delete("dev1"), props("dev1", "{\"late\":1}")]).await.unwrap();
        store.submit(vec![props("dev1", "{\"late\":2}")]).await.unwrap();
        let (a, b) = (
            store.submit(vec![delete("dev2")]),
            store.submit(vec![props("dev2", "{\"late\":3}")]),
        );
        a.await.unwrap();
        b.await.unwrap();
        assert!(docs(&store).is_empty(), "{:?}", docs(&store));
        assert_eq!(store.load_documents("ota.task").unwrap().len(), 1);
        // Created again: written again.
        store.submit(vec![Op::PutDevice(device("pk1", "dev1"))]).await.unwrap();
        store.submit(vec![props("dev1", "{\"v\":4}")]).await.unwrap();
        store.close();
        let store = db.open(metrics());
        assert_eq!(
            docs(&store),
            [("pk1/dev1".to_owned(), "{\"v\":4}".to_owned())]
        );
        store.close();
    }
}

on_both_backends! {
    /// A latest-properties write merges with the stored document per property: the newer
    /// device time stays (a tie goes to the write), and properties the writer does not have
    /// stay. Cluster mode: a node that holds a device again after another node did writes
    /// what it has, which must not replace the newer values the other node stored.
    #[tokio::test]
    async fn device_properties_writes_merge_per_property(db) {
        use crate::store::device_properties::{PropertiesDocument, PropertySnapshot};
        let store = db.open(metrics());
        store
            .submit(vec![
                Op::PutInstance(instance("default")),
                Op::PutProduct(product("pk1", "default")),
                Op::PutDevice(device("pk1", "dev1")),
                Op::PutDevice(device("pk1", "dev2")),
            ])
            .await
            .unwrap();
        let write = |dn: &str, properties: &[(&str, i64, u64)]| {
            let properties = properties
                .iter()
                .map(|&(name, value, time)| {
                    let snapshot = PropertySnapshot {
                        value: value.into(),
                        time,
                        received_at_ms: time as i64,
                    };
                    (name.to_owned(), snapshot)
                })
                .collect();
            let doc = PropertiesDocument {
                product_key: "pk1".into(),
                device_name: dn.into(),
                properties,
            };
            Op::PutDeviceProperties {
                product_key: "pk1".into(),
                device_name: dn.into(),
                body: serde_json::to_string(&doc).unwrap(),
            }
        };
        let stored = |store: &Store, dn: &str| -> Vec<(String, i64, u64)> {
            let docs = store.load_documents(DEVICE_PROPERTIES).unwrap();
            let (_, body) = docs
                .iter()
                .find(|(id, _)| *id == format!("pk1/{dn}"))
                .unwrap_or_else(|| panic!("no document for {dn}: {docs:?}"));
            let doc: PropertiesDocument = serde_json::from_str(body).unwrap();
            doc.properties
                .into_iter()
                .map(|(name, p)| (name, p.value.as_i64().unwrap(), p.time))
                .collect()
        };
        let want = |rows: &[(&str, i64, u64)]| -> Vec<(String, i64, u64)> {
            rows.iter().map(|&(n, v, t)| (n.to_owned(), v, t)).collect()
        };
        // One node stored A and B; another, which knew only an older A, writes it with C.
        store.submit(vec![write("dev1", &[("A", 2, 20), ("B", 1, 10)])]).await.unwrap();
        store.submit(vec![write("dev1", &[("A", 1, 15), ("C", 3, 30)])]).await.unwrap();
        assert_eq!(stored(&store, "dev1"), want(&[("A", 2, 20), ("B", 1, 10), ("C", 3, 30)]));
        // A newer value and a tie replace the stored ones.
        store.submit(vec![write("dev1", &[("A", 5, 21), ("B", 6, 10)])]).await.unwrap();
        assert_eq!(stored(&store, "dev1"), want(&[("A", 5, 21), ("B", 6, 10), ("C", 3, 30)]));
        // Several writes of one document in one transaction (PostgreSQL: one statement) and
        // in one submission merge too, new document or not.
        let (a, b) = (
            store.submit(vec![write("dev2", &[("X", 1, 1)]), write("dev1", &[("D", 4, 1)])]),
            store.submit(vec![write("dev2", &[("Y", 2, 1)]), write("dev1", &[("E", 7, 1)])]),
        );
        a.await.unwrap();
        b.await.unwrap();
        store
            .submit(vec![write("dev2", &[("Z", 3, 1)]), write("dev2", &[("X", 0, 0)])])
            .await
            .unwrap();
        assert_eq!(stored(&store, "dev2"), want(&[("X", 1, 1), ("Y", 2, 1), ("Z", 3, 1)]));
        assert_eq!(
            stored(&store, "dev1"),
            want(&[("A", 5, 21), ("B", 6, 10), ("C", 3, 30), ("D", 4, 1), ("E", 7, 1)])
        );
        store.close();
    }
}

#[tokio::test]
async fn database_uses_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::db_path(dir.path());
    let store = Store::open(&path, metrics()).unwrap();
    store
        .submit(vec![Op::PutInstance(instance("default"))])
        .await
        .unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    store.close();
}

on_both_backends! {
    #[tokio::test]
    async fn a_failing_submission_is_rolled_back_alone(db) {
        let store = db.open(metrics());
        store
            .submit(vec![Op::PutInstance(instance("default"))])
            .await
            .unwrap();
        // Submitted back to back so they usually share a transaction; the outcome must not depend
        // on whether they do.
        let good = store.submit(vec![Op::PutProduct(product("pk1", "default"))]);
        // Atomic: the valid device op must not survive the failing version op next to it.
        let bad = store.submit(vec![
            Op::PutDevice(device("pk1", "dev1")),
            version("pk1", "nobody", "default", "1"),
        ]);
        let unknown_instance = store.submit(vec![Op::PutProduct(product("pk2", "no-such-instance"))]);
        let good_too = store.submit(vec![Op::PutDevice(device("pk1", "dev2"))]);
        good.await.unwrap();
        assert!(is_refused(&bad.await));
        assert!(is_refused(&unknown_instance.await));
        good_too.await.unwrap();

        let snapshot = store.load().unwrap();
        assert_eq!(snapshot.products, vec![product("pk1", "default")]);
        let names: Vec<_> = snapshot
            .devices
            .iter()
            .map(|d| d.record.device_name.as_str())
            .collect();
        assert_eq!(names, ["dev2"]);
    }
}

on_both_backends! {
    #[tokio::test]
    async fn deleting_a_product_with_devices_fails_in_the_store_too(db) {
        let store = db.open(metrics());
        store
            .submit(vec![
                Op::PutInstance(instance("default")),
                Op::PutProduct(product("pk1", "default")),
                Op::PutDevice(device("pk1", "dev1")),
                version("pk1", "dev1", "MCU", "1"),
            ])
            .await
            .unwrap();
        assert!(is_refused(
            &store
                .submit(vec![Op::DeleteProduct {
                    product_key: "pk1".into()
                }])
                .await
        ));
        assert_eq!(store.load().unwrap().products.len(), 1);
        // Deleting the device takes its versions with it (cascade); then the product can go.
        store
            .submit(vec![
                Op::DeleteDevice {
                    product_key: "pk1".into(),
                    device_name: "dev1".into(),
                },
                Op::DeleteProduct {
                    product_key: "pk1".into(),
                },
            ])
            .await
            .unwrap();
        assert_eq!(store.load().unwrap(), Snapshot {
            instances: vec![instance("default")],
            ..Snapshot::default()
        });
        assert_eq!(db.query_i64("SELECT COUNT(*) FROM device_versions"), 0);
    }
}

on_both_backends! {
    #[tokio::test]
    async fn deleting_an_instance_in_use_fails_in_the_store_too(db) {
        let store = db.open(metrics());
        let mut moved = device("pk1", "dev1");
        moved.instance_id = "iot-b".into();
        store
            .submit(vec![
                Op::PutInstance(instance("default")),
                Op::PutInstance(instance("iot-a")),
                Op::PutInstance(instance("iot-b")),
                Op::PutProduct(product("pk-a", "iot-a")),
                // A product of `default` whose device is owned by `iot-b` (a migrated device).
                Op::PutProduct(product("pk1", "default")),
                Op::PutDevice(moved),
            ])
            .await
            .unwrap();
        let delete = |iid: &str| {
            store.submit(vec![Op::DeleteInstance {
                instance_id: iid.into(),
            }])
        };
        // A product's home, and a device's owner, cannot go.
        assert!(is_refused(&delete("iot-a").await));
        assert!(is_refused(&delete("iot-b").await));
        assert_eq!(store.load().unwrap().instances.len(), 3);
        // Atomic with what frees it: the product leaves in the same submission.
        store
            .submit(vec![
                Op::DeleteProduct {
                    product_key: "pk-a".into(),
                },
                Op::DeleteInstance {
                    instance_id: "iot-a".into(),
                },
            ])
            .await
            .unwrap();
        // A missing instance is a no-op, like a missing document.
        delete("never-was").await.unwrap();
        store
            .submit(vec![
                Op::DeleteDevice {
                    product_key: "pk1".into(),
                    device_name: "dev1".into(),
                },
                Op::DeleteInstance {
                    instance_id: "iot-b".into(),
                },
            ])
            .await
            .unwrap();
        store.close();
        let store = db.open(metrics());
        let snapshot = store.load().unwrap();
        assert_eq!(snapshot.instances, vec![instance("default")]);
        assert_eq!(snapshot.products, vec![product("pk1", "default")]);
        assert!(snapshot.devices.is_empty());
        // The id is free again.
        store
            .submit(vec![Op::PutInstance(instance("iot-a"))])
            .await
            .unwrap();
        assert_eq!(store.load().unwrap().instances.len(), 2);
        store.close();
    }
}

/// Sum and count of the batch-size histogram, from the Prometheus text.
pub(crate) fn batch_size_sum_and_count(metrics: &Metrics) -> (f64, f64) {
    let text = metrics.encode();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
    };
    (
        value("fleetgate_store_batch_size_sum"),
        value("fleetgate_store_batch_size_count"),
    )
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_are_group_committed(db) {
        let m = metrics();
        let store = db.open(m.clone());
        store
            .submit(vec![
                Op::PutInstance(instance("default")),
                Op::PutProduct(product("pk1", "default")),
                Op::PutDevice(device("pk1", "dev1")),
            ])
            .await
            .unwrap();
        let tasks: Vec<_> = (0..1000)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .submit(vec![version("pk1", "dev1", &format!("m{i}"), "1")])
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let (sum, count) = batch_size_sum_and_count(&m);
        assert_eq!(sum, 1003.0);
        assert!(
            count < 1001.0,
            "1,000 writers took {count} transactions: no group commit"
        );
        assert_eq!(store.load().unwrap().devices[0].versions.len(), 1000);
    }
}

#[tokio::test]
async fn acknowledged_writes_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::db_path(dir.path());
    let store = Store::open(&path, metrics()).unwrap();
    let (ops, expected) = populate_ops();
    for op in ops {
        store.submit(vec![op]).await.unwrap();
    }
    // What a `kill -9` leaves behind: the files as they are now, with the writer still holding
    // the database open, no checkpoint and no clean close.
    let crashed = tempfile::tempdir().unwrap();
    for suffix in ["", "-wal"] {
        let from = format!("{}{suffix}", path.display());
        if std::path::Path::new(&from).exists() {
            std::fs::copy(
                &from,
                format!("{}{suffix}", Store::db_path(crashed.path()).display()),
            )
            .unwrap();
        }
    }
    let recovered = Store::open(&Store::db_path(crashed.path()), metrics()).unwrap();
    assert_eq!(recovered.load().unwrap(), expected);
    recovered.close();
}

on_both_backends! {
    #[tokio::test]
    async fn a_forgotten_handle_leaves_every_acknowledged_write_behind(db) {
        let store = db.open(metrics());
        let (ops, expected) = populate_ops();
        let expected = db.expected(expected);
        for op in ops {
            store.submit(vec![op]).await.unwrap();
        }
        // Neither closed nor dropped: the writer still holds its connection, as in a crash.
        std::mem::forget(store);
        let reopened = db.open(metrics());
        assert_eq!(reopened.load().unwrap(), expected);
    }
}

on_both_backends! {
    #[tokio::test]
    async fn close_commits_queued_work_and_later_submissions_fail(db) {
        let store = db.open(metrics());
        let other_handle = store.clone();
        // Queued and never awaited: close must still commit it.
        let queued = store.submit(vec![Op::PutInstance(instance("default"))]);
        store.close();
        queued.await.unwrap();
        assert!(matches!(
            other_handle
                .submit(vec![Op::PutInstance(instance("x"))])
                .await,
            Err(StoreError::Closed)
        ));
        assert!(matches!(
            other_handle.flush().await,
            Err(StoreError::Closed)
        ));
        assert!(matches!(other_handle.load(), Err(StoreError::Closed)));
        drop(other_handle);

        let store = db.open(metrics());
        assert_eq!(store.load().unwrap().instances, vec![instance("default")]);
    }
}

on_both_backends! {
    #[tokio::test]
    async fn dropping_the_last_handle_flushes(db) {
        let store = db.open(metrics());
        drop(store.submit(vec![Op::PutInstance(instance("default"))]));
        drop(store);
        let store = db.open(metrics());
        assert_eq!(store.load().unwrap().instances, vec![instance("default")]);
    }
}

on_both_backends! {
    #[test]
    fn a_newer_schema_is_refused(db) {
        db.open(metrics()).close();
        db.execute("UPDATE schema_version SET version = 99");
        let supported = match db.location() {
            StoreLocation::Sqlite(_) => SCHEMA_VERSION,
            StoreLocation::Postgres(_) => POSTGRES_SCHEMA_VERSION,
        };
        match db.try_open(metrics()) {
            Err(StoreError::SchemaTooNew {
                found: 99,
                supported: s,
            }) => assert_eq!(s, supported),
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("a newer schema was accepted"),
        }
    }
}

on_both_backends! {
    #[test]
    fn blocking_submit_works_inside_a_runtime(db) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = db.open(metrics());
            store
                .submit_blocking(vec![Op::PutInstance(instance("default"))])
                .unwrap();
            assert_eq!(store.load().unwrap().instances.len(), 1);
        });
    }
}
