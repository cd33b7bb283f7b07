//! Behaviour only the PostgreSQL backend has: concurrent migration, the optimistic pipeline and
//! its replay, multi-row statements, reconnecting. The shared suite is `store::tests`.

use super::schema::MIGRATION_LOCK;
use super::*;
use crate::store::test_db::{PgConn, PgDatabase};
use crate::store::tests::{device, instance, metrics, product, version};
use crate::store::{Store, StoreLocation, StoreSettings};

/// Bound for what should happen soon; only there so a broken build fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(20);

fn connection(dn: &str, last_seen_ms: i64) -> Op {
    Op::SetConnection {
        product_key: "pk".into(),
        device_name: dn.into(),
        last_seen_ms,
        client_ip: Some(format!("10.0.0.{}", last_seen_ms % 250)),
        session: crate::store::SessionWrite::Online((last_seen_ms as u64) << 21),
    }
}

fn setup_ops(names: &[&str]) -> Vec<Op> {
    let mut ops = vec![
        Op::PutInstance(instance("default")),
        Op::PutProduct(product("pk", "default")),
    ];
    ops.extend(names.iter().map(|dn| Op::PutDevice(device("pk", dn))));
    ops
}

/// A backend on `pg` with instance `default`, product `pk` and devices `names`.
fn backend_with_devices(pg: &PgDatabase, names: &[&str]) -> PostgresBackend {
    let mut backend = PostgresBackend::connect(pg.url()).expect("connect");
    let results = backend.commit(&[&setup_ops(names)]).expect("setup commits");
    assert!(results[0].is_ok(), "{results:?}");
    backend
}

fn stored(backend: &mut PostgresBackend, dn: &str) -> Option<StoredDevice> {
    backend
        .load()
        .unwrap()
        .devices
        .into_iter()
        .find(|d| d.record.device_name == dn)
}

fn is_foreign_key_violation(result: &Result<(), StoreError>) -> bool {
    matches!(result, Err(StoreError::Postgres(e)) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION))
}

/// Polls `sql` (one integer) on `conn` until `pred` holds; returns the value.
fn wait_for(conn: &PgConn, sql: &str, what: &str, pred: impl Fn(i64) -> bool) -> i64 {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let value = conn.query_i64(sql);
        if pred(value) {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: still {value}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn nodes_starting_together_migrate_the_schema_once() {
    let pg = PgDatabase::create();
    // Hold the migration lock so that both nodes are provably inside `migrate` at once.
    let holder = pg.connect();
    holder.execute(&format!(
        "BEGIN; SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"
    ));
    let nodes: Vec<_> = (0..2)
        .map(|_| {
            let url = pg.url().clone();
            std::thread::spawn(move || PostgresBackend::connect(&url))
        })
        .collect();
    // Not `holder`: a transaction sees pg_stat_activity as it was when the transaction began.
    let observer = pg.connect();
    wait_for(
        &observer,
        "SELECT COUNT(*) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'fleetgate'
           AND wait_event_type = 'Lock'",
        "nodes waiting for the migration lock",
        |waiting| waiting == 2,
    );
    holder.execute("COMMIT");
    for node in nodes {
        let mut backend = node.join().unwrap().expect("both nodes start");
        assert_eq!(backend.schema_version().unwrap(), SCHEMA_VERSION);
    }
    // schema_version, instances, products, devices, device_versions, documents,
    // cluster_feed, cluster_leases, forward_outbox, firmware_blobs, firmware_chunks,
    // export_packages, export_chunks, cluster_secrets.
    assert_eq!(
        observer.query_i64(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ),
        14
    );
}

#[test]
fn a_failing_submission_in_a_drain_is_replayed_alone() {
    let pg = PgDatabase::create();
    let mut backend = backend_with_devices(&pg, &["a", "b"]);
    let ops: Vec<Vec<Op>> = vec![
        vec![version("pk", "a", "MCU", "1")],
        vec![connection("a", 5)],
        // In the same multi-row statement as the reports around it: it fails that statement.
        vec![version("pk", "nobody", "MCU", "1")],
        vec![
            version("pk", "b", "MCU", "2"),
            Op::PutDoc {
                kind: "ota.task",
                id: "t1".into(),
                body: "{}".into(),
            },
        ],
        // Atomic: the device must not survive its failing report.
        vec![
            Op::PutDevice(device("pk", "c")),
            version("pk", "c", "MCU", "1"),
            version("pk", "ghost", "MCU", "1"),
        ],
        vec![
            Op::PutDevice(device("pk", "d")),
            version("pk", "d", "MCU", "4"),
        ],
    ];
    let submissions: Vec<&[Op]> = ops.iter().map(Vec::as_slice).collect();
    let results = backend
        .commit(&submissions)
        .expect("the transaction commits");

    assert_eq!(results.len(), 6);
    for (i, result) in results.iter().enumerate() {
        match i {
            2 | 4 => assert!(is_foreign_key_violation(result), "{i}: {result:?}"),
            _ => assert!(result.is_ok(), "{i}: {result:?}"),
        }
    }
    let a = stored(&mut backend, "a").unwrap();
    assert_eq!(a.versions.get("MCU").map(String::as_str), Some("1"));
    assert_eq!(a.last_seen_ms, Some(5));
    let b = stored(&mut backend, "b").unwrap();
    assert_eq!(b.versions.get("MCU").map(String::as_str), Some("2"));
    assert!(stored(&mut backend, "c").is_none());
    let d = stored(&mut backend, "d").unwrap();
    assert_eq!(d.versions.get("MCU").map(String::as_str), Some("4"));
    assert_eq!(
        backend.load_documents("ota.task").unwrap(),
        vec![("t1".to_owned(), "{}".to_owned())]
    );
}

#[test]
fn a_drain_of_reports_is_one_statement_per_kind_and_the_last_write_wins() {
    let pg = PgDatabase::create();
    let names: Vec<String> = (0..100).map(|i| format!("dev{i:03}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut backend = backend_with_devices(&pg, &name_refs);

    // 1,000 submissions, connection events and version reports interleaved as devices send
    // them; every device is written 5 times of each kind, the last write being the largest.
    let ops: Vec<Vec<Op>> = (0..500)
        .flat_map(|i| {
            let dn = &names[i % 100];
            let round = (i / 100) as i64;
            [
                vec![connection(dn, 1_000 + round)],
                vec![version("pk", dn, "MCU", &format!("1.{round}"))],
            ]
        })
        .collect();
    let submissions: Vec<&[Op]> = ops.iter().map(Vec::as_slice).collect();
    let before = backend.statements_sent();
    let results = backend.commit(&submissions).expect("commits");
    let statements = backend.statements_sent() - before;
    eprintln!(
        "{} submissions ({} rows after de-duplication) took {statements} statements",
        submissions.len(),
        2 * names.len()
    );
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(statements, 4, "BEGIN, one UPDATE, one INSERT, COMMIT");

    let snapshot = backend.load().unwrap();
    assert_eq!(snapshot.devices.len(), 100);
    for d in &snapshot.devices {
        assert_eq!(d.last_seen_ms, Some(1_004), "{}", d.record.device_name);
        assert_eq!(d.client_ip.as_deref(), Some("10.0.0.4"));
        assert_eq!(
            d.versions,
            BTreeMap::from([("MCU".to_owned(), "1.4".to_owned())])
        );
    }
}

#[test]
fn a_lost_connection_fails_its_transaction_and_the_next_one_reconnects() {
    let pg = PgDatabase::create();
    let store = Store::open_with(
        &StoreLocation::Postgres(pg.url().clone()),
        &StoreSettings::default(),
        metrics(),
    )
    .unwrap();
    store.submit_blocking(setup_ops(&["a"])).unwrap();

    // Hold device a's row so the store's next transaction is in flight, waiting for it.
    let holder = pg.connect();
    holder.execute("BEGIN; SELECT 1 FROM devices WHERE device_name = 'a' FOR UPDATE");
    let in_flight = {
        let store = store.clone();
        std::thread::spawn(move || store.submit_blocking(vec![connection("a", 5)]))
    };
    let observer = pg.connect();
    let pid = wait_for(
        &observer,
        "SELECT COALESCE(MAX(pid), 0)::bigint FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'fleetgate'
           AND wait_event_type = 'Lock'",
        "the store's transaction waiting for the row",
        |pid| pid != 0,
    );
    observer.execute(&format!("SELECT pg_terminate_backend({pid})"));
    let failed = in_flight.join().unwrap();
    assert!(matches!(failed, Err(StoreError::Postgres(_))), "{failed:?}");
    holder.execute("ROLLBACK");

    store
        .submit_blocking(vec![version("pk", "a", "MCU", "2")])
        .expect("the store reconnects");
    let a = store.load().unwrap().devices.remove(0);
    assert_eq!(a.last_seen_ms, None, "the failed transaction left nothing");
    assert_eq!(a.versions.get("MCU").map(String::as_str), Some("2"));
    assert_ne!(
        observer.query_i64(
            "SELECT COALESCE(MAX(pid), 0)::bigint FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'fleetgate'"
        ),
        pid,
        "a new connection"
    );
}

#[test]
fn writes_fail_while_the_database_refuses_connections_and_resume_after() {
    let pg = PgDatabase::create();
    let store = Store::open_with(
        &StoreLocation::Postgres(pg.url().clone()),
        &StoreSettings::default(),
        metrics(),
    )
    .unwrap();
    store.submit_blocking(setup_ops(&["a"])).unwrap();

    // The server "goes away" for this database: its connection is cut and new ones refused.
    let admin = pg.admin();
    admin.execute(&format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS false;
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = '{name}' AND application_name = 'fleetgate'",
        name = pg.name()
    ));
    for attempt in 0..2 {
        let result = store.submit_blocking(vec![version("pk", "a", "MCU", "1")]);
        assert!(
            matches!(result, Err(StoreError::Postgres(_))),
            "attempt {attempt}: {result:?}"
        );
    }
    admin.execute(&format!(
        "ALTER DATABASE {} ALLOW_CONNECTIONS true",
        pg.name()
    ));
    store
        .submit_blocking(vec![version("pk", "a", "MCU", "2")])
        .expect("writes resume once the database accepts connections");
    let a = store.load().unwrap().devices.remove(0);
    assert_eq!(
        a.versions,
        BTreeMap::from([("MCU".to_owned(), "2".to_owned())])
    );
}

#[test]
fn an_unreachable_server_fails_the_open_with_the_url_shown_without_password() {
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let url = PostgresUrl::parse("postgres://fg:s3cr3t@127.0.0.1:1/fleetgate").unwrap();
    let location = StoreLocation::Postgres(url.clone());
    let error = match Store::open_with(&location, &StoreSettings::default(), metrics()) {
        Err(e) => e,
        Ok(_) => panic!("opened a store on a closed port"),
    };
    assert!(matches!(error, StoreError::Postgres(_)), "{error:?}");
    assert!(error.to_string().contains("error connecting"), "{error}");
    assert_eq!(
        location.to_string(),
        "PostgreSQL at postgres://fg:***@127.0.0.1:1/fleetgate"
    );
}

/// Leases: one holder at a time, a term ends with its expiry, and the fence refuses a write
/// of a holder whose term is over while the other submissions of the drain commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_has_one_holder_and_fences_the_writes_of_a_past_term() {
    use crate::cluster::SharedStore;
    let pg = PgDatabase::create();
    let store = Store::open_with(
        &StoreLocation::Postgres(pg.url().clone()),
        &StoreSettings::default(),
        metrics(),
    )
    .unwrap();
    store.submit(setup_ops(&["a"])).await.unwrap();
    let reader = crate::store::PostgresReader::connect(pg.url())
        .await
        .unwrap();
    let ttl = Duration::from_millis(600);

    let e1 = reader.lease_acquire("engines", 1, ttl).await.unwrap();
    assert_eq!(e1, Some(1));
    assert_eq!(reader.lease_acquire("engines", 2, ttl).await.unwrap(), None);
    assert!(reader.lease_renew("engines", 1, 1, ttl).await.unwrap());
    assert!(!reader.lease_renew("engines", 2, 1, ttl).await.unwrap());
    // Other leases are independent.
    assert_eq!(
        reader.lease_acquire("outbox", 2, ttl).await.unwrap(),
        Some(1)
    );

    let fence = Arc::new(crate::store::FenceSlot::default());
    let fenced = store.fenced(fence.clone());
    let write = |v: &str| vec![version("pk", "a", "MCU", v)];
    // Not holding: refused before it reaches the database.
    assert!(matches!(
        fenced.submit(write("0")).await,
        Err(StoreError::NotLeaseHolder)
    ));
    fence.set(Some(("engines", 1, 1)));
    fenced.submit(write("1")).await.expect("node 1's term");

    // Node 1 stalls past its term; node 2 takes the lease.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert!(!reader.lease_renew("engines", 1, 1, ttl).await.unwrap());
    assert_eq!(
        reader.lease_acquire("engines", 2, ttl).await.unwrap(),
        Some(2)
    );
    // Node 1's late write, in one drain with an unfenced one: only the fenced one fails.
    let late = fenced.submit(write("late"));
    let other = store.submit(vec![version("pk", "a", "default", "x")]);
    let (late, other) = tokio::join!(late, other);
    assert!(matches!(late, Err(StoreError::Postgres(_))), "{late:?}");
    other.unwrap();
    let a = store.load().unwrap().devices.remove(0);
    assert_eq!(a.versions.get("MCU").map(String::as_str), Some("1"));
    assert_eq!(a.versions.get("default").map(String::as_str), Some("x"));

    // Released: taken at once by the next node, with a new epoch.
    reader.lease_release("engines", 2, 2).await.unwrap();
    assert_eq!(
        reader.lease_acquire("engines", 1, ttl).await.unwrap(),
        Some(3)
    );
    store.close();
}

/// The reads document followers need: documents by key (one batch, across kinds; a missing key
/// is simply absent) and every document of some kinds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_are_read_by_key_and_by_kind() {
    use crate::cluster::{Document, SharedStore};
    let pg = PgDatabase::create();
    let store = Store::open_with(
        &StoreLocation::Postgres(pg.url().clone()),
        &StoreSettings::default(),
        metrics(),
    )
    .unwrap();
    let put = |kind: &'static str, id: &str, body: &str| Op::PutDoc {
        kind,
        id: id.into(),
        body: body.into(),
    };
    store
        .submit(vec![
            put("amqp.group", "iot-a/g1", "one"),
            put("amqp.group", "iot-a/g2", "two"),
            put("amqp.rate_limit", "iot-a", "{}"),
            put("ota.job", "j1", "job"),
        ])
        .await
        .unwrap();
    let reader = crate::store::PostgresReader::connect(pg.url())
        .await
        .unwrap();
    let doc = |kind: &str, id: &str, body: &str| Document {
        kind: kind.into(),
        id: id.into(),
        body: body.into(),
    };
    let key = |kind: &str, id: &str| (kind.to_owned(), id.to_owned());

    let mut found = reader
        .documents(vec![
            key("amqp.group", "iot-a/g2"),
            key("amqp.group", "iot-a/gone"),
            key("amqp.rate_limit", "iot-a"),
            // The id of another kind's document: not this one.
            key("amqp.group", "j1"),
        ])
        .await
        .unwrap();
    found.sort_by(|a, b| (&a.kind, &a.id).cmp(&(&b.kind, &b.id)));
    assert_eq!(
        found,
        [
            doc("amqp.group", "iot-a/g2", "two"),
            doc("amqp.rate_limit", "iot-a", "{}")
        ]
    );
    assert!(reader.documents(Vec::new()).await.unwrap().is_empty());

    let all = reader
        .all_documents(vec![
            "amqp.group".into(),
            "amqp.rate_limit".into(),
            "none".into(),
        ])
        .await
        .unwrap();
    assert_eq!(
        all,
        [
            doc("amqp.group", "iot-a/g1", "one"),
            doc("amqp.group", "iot-a/g2", "two"),
            doc("amqp.rate_limit", "iot-a", "{}")
        ]
    );
    store.close();
}

/// Two nodes write the properties documents of the same devices at the same time, new
/// documents and existing ones: every property of both ends up stored (the inserts of a new
/// document that meet wait for each other and the second merges; existing ones are merged
/// under their row lock), and neither transaction fails (rows are taken in key order).
#[test]
fn two_nodes_writing_the_same_properties_documents_lose_nothing() {
    use crate::store::device_properties::{PropertiesDocument, PropertySnapshot};
    const DEVICES: usize = 200;
    let names: Vec<String> = (0..DEVICES).map(|i| format!("d{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let pg = PgDatabase::create();
    drop(backend_with_devices(&pg, &refs));
    let ops = |node: &str, round: u64| -> Vec<Op> {
        names
            .iter()
            .map(|dn| {
                let snapshot = PropertySnapshot {
                    value: round.into(),
                    time: round,
                    received_at_ms: 1,
                };
                let doc = PropertiesDocument {
                    product_key: "pk".into(),
                    device_name: dn.clone(),
                    properties: BTreeMap::from([(format!("{node}{round}"), snapshot)]),
                };
                Op::PutDeviceProperties {
                    product_key: "pk".into(),
                    device_name: dn.clone(),
                    body: serde_json::to_string(&doc).unwrap(),
                }
            })
            .collect()
    };
    let start = std::sync::Arc::new(std::sync::Barrier::new(2));
    let writers: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|node| {
            let (start, url) = (start.clone(), pg.url().clone());
            let rounds: Vec<Vec<Op>> = (0..3).map(|r| ops(node, r)).collect();
            std::thread::spawn(move || {
                let mut backend = PostgresBackend::connect(&url).expect("connect");
                start.wait();
                for ops in rounds {
                    let results = backend.commit(&[&ops]).expect("commit");
                    assert!(results[0].is_ok(), "{node}: {results:?}");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("writer");
    }
    let mut backend = PostgresBackend::connect(pg.url()).expect("connect");
    let docs = backend
        .load_documents(DEVICE_PROPERTIES)
        .expect("documents");
    assert_eq!(docs.len(), DEVICES);
    for (id, body) in docs {
        let doc: PropertiesDocument = serde_json::from_str(&body).unwrap();
        let names: Vec<&str> = doc.properties.keys().map(String::as_str).collect();
        assert_eq!(names, ["a0", "a1", "a2", "b0", "b1", "b2"], "{id}");
    }
}
