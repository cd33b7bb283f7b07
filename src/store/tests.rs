use super::*;
use std::collections::BTreeMap;

fn metrics() -> Arc<Metrics> {
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
fn populate_ops() -> (Vec<Op>, Snapshot) {
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
            session: SessionWrite::Online(5),
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

#[tokio::test]
async fn write_close_reopen_loads_everything_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::db_path(&dir.path().join("nested"));
    let (ops, expected) = populate_ops();

    let store = Store::open(&path, metrics()).unwrap();
    for op in ops {
        store.submit(vec![op]).await.unwrap();
    }
    assert_eq!(store.load().unwrap(), expected);
    store.close();

    let store = Store::open(&path, metrics()).unwrap();
    assert_eq!(store.load().unwrap(), expected);
    store.close();

    let backend = SqliteBackend::open(&path, Synchronous::Normal).unwrap();
    assert_eq!(backend.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION, 2);
}

#[tokio::test]
async fn documents_round_trip_by_kind() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::db_path(dir.path());
    let store = Store::open(&path, metrics()).unwrap();
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
    let store = Store::open(&path, metrics()).unwrap();
    assert_eq!(
        store.load_documents("ota.job").unwrap(),
        vec![
            ("j1".to_owned(), "{\"n\":1}".to_owned()),
            ("j2".to_owned(), "{\"n\":2}".to_owned())
        ]
    );
    assert!(store.load_documents("ota.task").unwrap().is_empty());
    store.close();
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

#[tokio::test]
async fn a_failing_submission_is_rolled_back_alone() {
    let store = Store::open_in_memory(metrics()).unwrap();
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
    assert!(matches!(bad.await, Err(StoreError::Sqlite(_))));
    assert!(matches!(unknown_instance.await, Err(StoreError::Sqlite(_))));
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

#[tokio::test]
async fn deleting_a_product_with_devices_fails_in_the_store_too() {
    let store = Store::open_in_memory(metrics()).unwrap();
    store
        .submit(vec![
            Op::PutInstance(instance("default")),
            Op::PutProduct(product("pk1", "default")),
            Op::PutDevice(device("pk1", "dev1")),
        ])
        .await
        .unwrap();
    assert!(store
        .submit(vec![Op::DeleteProduct {
            product_key: "pk1".into()
        }])
        .await
        .is_err());
    assert_eq!(store.load().unwrap().products.len(), 1);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_are_group_committed() {
    let dir = tempfile::tempdir().unwrap();
    let m = metrics();
    let store = Store::open(&Store::db_path(dir.path()), m.clone()).unwrap();
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
    // And a handle forgotten without close/drop: a second connection still sees every commit.
    std::mem::forget(store);
    let reopened = Store::open(&path, metrics()).unwrap();
    assert_eq!(reopened.load().unwrap(), expected);
}

#[tokio::test]
async fn close_commits_queued_work_and_later_submissions_fail() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::db_path(dir.path());
    let store = Store::open(&path, metrics()).unwrap();
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

    let store = Store::open(&path, metrics()).unwrap();
    assert_eq!(store.load().unwrap().instances, vec![instance("default")]);
}

#[tokio::test]
async fn dropping_the_last_handle_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::db_path(dir.path());
    let store = Store::open(&path, metrics()).unwrap();
    drop(store.submit(vec![Op::PutInstance(instance("default"))]));
    drop(store);
    let store = Store::open(&path, metrics()).unwrap();
    assert_eq!(store.load().unwrap().instances, vec![instance("default")]);
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::db_path(dir.path());
    drop(SqliteBackend::open(&path, Synchronous::Full).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("UPDATE schema_version SET version = 99", [])
        .unwrap();
    drop(conn);
    match SqliteBackend::open(&path, Synchronous::Full) {
        Err(StoreError::SchemaTooNew {
            found: 99,
            supported,
        }) => assert_eq!(supported, SCHEMA_VERSION),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a newer schema was accepted"),
    }
}

#[test]
fn blocking_submit_works_inside_a_runtime() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Store::open_in_memory(metrics()).unwrap();
        store
            .submit_blocking(vec![Op::PutInstance(instance("default"))])
            .unwrap();
        assert_eq!(store.load().unwrap().instances.len(), 1);
    });
}
