//! Cluster mode's firmware of record on a real PostgreSQL database (a fresh one per test, see
//! `store::test_db`): two repositories with their own blob directories stand for two nodes.

use super::*;
use crate::ota::firmware::{Backing, FirmwareError, FirmwarePackage, FirmwareRepo, NewFirmware};
use crate::store::test_db::{Backend, TestDb};
use crate::store::tests::metrics;
use crate::store::{Store, StoreLocation};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Deterministic bytes that differ per `seed` and are not periodic within a chunk.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A [`SharedFirmware`] that counts fetches and passes everything to PostgreSQL (metadata
/// reads fail while `unreadable` is set).
#[derive(Debug)]
struct Counting {
    inner: PostgresFirmware,
    fetches: AtomicUsize,
    unreadable: AtomicBool,
}

impl SharedFirmware for Counting {
    fn persist<'a>(
        &'a self,
        sha256: &'a str,
        size: u64,
        file: &'a Path,
    ) -> BoxFuture<'a, Result<(), BlobError>> {
        self.inner.persist(sha256, size, file)
    }

    fn fetch<'a>(
        &'a self,
        sha256: &'a str,
        into: &'a mut BlobWriter,
    ) -> BoxFuture<'a, Result<(), BlobError>> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        self.inner.fetch(sha256, into)
    }

    fn release<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, Result<bool, BlobError>> {
        self.inner.release(sha256)
    }

    fn package<'a>(
        &'a self,
        firmware_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, BlobError>> {
        if self.unreadable.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(BlobError::Shared {
                    what: "test",
                    message: "unreadable".into(),
                })
            });
        }
        self.inner.package(firmware_id)
    }
}

/// One node: its own data dir, the shared store and database.
struct Node {
    repo: Arc<FirmwareRepo>,
    shared: Arc<Counting>,
    dir: tempfile::TempDir,
}

impl Node {
    fn cached(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path().join("firmware"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }
}

fn url(db: &TestDb) -> PostgresUrl {
    match db.location() {
        StoreLocation::Postgres(url) => url.clone(),
        StoreLocation::Sqlite(_) => unreachable!("a PostgreSQL test database"),
    }
}

async fn node(db: &TestDb, store: &Store) -> Node {
    let inner = PostgresFirmware::connect(&url(db)).await.expect("connect");
    let key = inner.download_key().await.expect("key");
    let shared = Arc::new(Counting {
        inner,
        fetches: AtomicUsize::new(0),
        unreadable: AtomicBool::new(false),
    });
    let dir = tempfile::tempdir().unwrap();
    let repo = FirmwareRepo::open_with(
        dir.path(),
        store.clone(),
        "http://gw.test".into(),
        64 << 20,
        Backing::Shared {
            firmware: shared.clone(),
            key,
        },
    )
    .expect("repo");
    Node { repo, shared, dir }
}

async fn upload(node: &Node, version: &str, data: &[u8]) -> FirmwarePackage {
    node.repo
        .create_from_bytes(NewFirmware::new("pk1", version), data)
        .await
        .expect("upload")
}

fn blob_count(db: &TestDb) -> i64 {
    db.query_i64("SELECT count(*) FROM firmware_blobs")
}

fn chunk_count(db: &TestDb) -> i64 {
    db.query_i64("SELECT count(*) FROM firmware_chunks")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_round_trip_to_a_node_that_never_saw_the_upload() {
    let db = TestDb::new(Backend::Postgres);
    let store = db.open(metrics());
    let (one, two) = (node(&db, &store).await, node(&db, &store).await);
    let data = bytes(2 * CHUNK + CHUNK / 2 + 7, 1);
    let p = upload(&one, "1.0.0", &data).await;
    assert_eq!(p.sha256, hex::encode(Sha256::digest(&data)));
    assert_eq!((blob_count(&db), chunk_count(&db)), (1, 3));
    assert_eq!(
        db.query_i64("SELECT max(length(bytes))::bigint FROM firmware_chunks"),
        CHUNK as i64
    );

    // Node two opened before the upload: the metadata of record names the package.
    assert!(two.repo.get(&p.firmware_id).is_none());
    let seen = two
        .repo
        .download_package(&p.firmware_id)
        .await
        .unwrap()
        .expect("the package of record");
    assert_eq!(seen, p);
    assert!(two.cached().is_empty());
    let path = two.repo.local_blob(&seen).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(two.cached(), vec![p.sha256.clone()]);
    // Cached now: no second fetch.
    two.repo.local_blob(&seen).await.unwrap();
    assert_eq!(two.shared.fetches.load(Ordering::SeqCst), 1);

    // The same bytes again (another version): stored once.
    upload(&one, "1.0.1", &data).await;
    assert_eq!((blob_count(&db), chunk_count(&db)), (1, 3));
    // An empty package has no chunk and round-trips too.
    let empty = upload(&one, "0.0.1", b"").await;
    assert_eq!((blob_count(&db), chunk_count(&db)), (2, 3));
    let path = two.repo.local_blob(&empty).await.unwrap();
    assert!(std::fs::read(&path).unwrap().is_empty());
    assert!(two
        .repo
        .download_package("fw-nosuchpackage00")
        .await
        .unwrap()
        .is_none());

    // Metadata of record unreadable: a node that knows the package serves from its index, one
    // that does not says why it cannot.
    one.shared.unreadable.store(true, Ordering::SeqCst);
    two.shared.unreadable.store(true, Ordering::SeqCst);
    assert_eq!(
        one.repo.download_package(&p.firmware_id).await.unwrap(),
        Some(p.clone())
    );
    let err = two.repo.download_package(&p.firmware_id).await.unwrap_err();
    assert!(
        matches!(&err, FirmwareError::Blob(BlobError::Shared { .. })),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_downloads_of_a_missing_blob_fetch_it_once() {
    let db = TestDb::new(Backend::Postgres);
    let store = db.open(metrics());
    let (one, two) = (node(&db, &store).await, node(&db, &store).await);
    let data = bytes(3 * CHUNK, 2);
    let p = upload(&one, "2.0.0", &data).await;
    let paths = futures_util::future::join_all((0..8).map(|_| two.repo.local_blob(&p))).await;
    for path in paths {
        assert_eq!(std::fs::read(path.unwrap()).unwrap(), data);
    }
    assert_eq!(two.shared.fetches.load(Ordering::SeqCst), 1);
    assert_eq!(two.cached(), vec![p.sha256.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_missing_shared_bytes_are_refused_and_leave_nothing() {
    let db = TestDb::new(Backend::Postgres);
    let store = db.open(metrics());
    let (one, two) = (node(&db, &store).await, node(&db, &store).await);
    let data = bytes(2 * CHUNK + 100, 3);
    let p = upload(&one, "3.0.0", &data).await;

    // One byte flipped in the middle chunk: same size, other SHA-256.
    db.execute(
        "UPDATE firmware_chunks SET bytes = set_byte(bytes, 10, get_byte(bytes, 10) # 255) WHERE seq = 1",
    );
    let err = two.repo.local_blob(&p).await.unwrap_err();
    assert!(
        matches!(&err, FirmwareError::Blob(BlobError::Corrupt { message, .. }) if message.contains("SHA-256")),
        "{err}"
    );
    assert!(two.cached().is_empty(), "{:?}", two.cached());

    // A chunk longer than it should be: refused while streaming, not as "too large".
    db.execute("UPDATE firmware_chunks SET bytes = bytes || '\\x00'::bytea WHERE seq = 2");
    let err = two.repo.local_blob(&p).await.unwrap_err();
    assert!(
        matches!(&err, FirmwareError::Blob(BlobError::Corrupt { .. })),
        "{err}"
    );
    // A chunk gone.
    db.execute("DELETE FROM firmware_chunks WHERE seq = 2");
    let err = two.repo.local_blob(&p).await.unwrap_err();
    assert!(
        matches!(&err, FirmwareError::Blob(BlobError::Corrupt { message, .. }) if message.contains("chunk 2")),
        "{err}"
    );
    // The whole blob gone: a clear error naming it.
    db.execute("DELETE FROM firmware_blobs");
    let err = two.repo.local_blob(&p).await.unwrap_err();
    assert!(
        matches!(&err, FirmwareError::Blob(BlobError::Missing { sha256 }) if *sha256 == p.sha256),
        "{err}"
    );
    assert!(err.to_string().contains("missing"), "{err}");
    assert!(two.cached().is_empty(), "{:?}", two.cached());
    // The node that took the upload still has its own copy.
    assert_eq!(
        std::fs::read(one.repo.local_blob(&p).await.unwrap()).unwrap(),
        data
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_bytes_go_with_the_last_package_that_uses_them() {
    let db = TestDb::new(Backend::Postgres);
    let store = db.open(metrics());
    let one = node(&db, &store).await;
    let x = bytes(CHUNK + 1, 4);
    let y = bytes(10, 5);
    let p1 = upload(&one, "1.0.0", &x).await;
    let p2 = upload(&one, "1.0.1", &x).await;
    let p3 = upload(&one, "1.0.2", &y).await;
    assert_eq!((blob_count(&db), chunk_count(&db)), (2, 3));

    one.repo.delete(&p1.firmware_id, false).await.unwrap();
    assert_eq!((blob_count(&db), chunk_count(&db)), (2, 3), "p2 uses x");
    one.repo.delete(&p2.firmware_id, false).await.unwrap();
    assert_eq!((blob_count(&db), chunk_count(&db)), (1, 1), "x is gone");
    assert_eq!(one.cached(), vec![p3.sha256.clone()]);

    // A release never removes bytes a package of record names.
    assert!(!one.shared.inner.release(&p3.sha256).await.unwrap());
    assert_eq!(blob_count(&db), 1);

    // Bytes stored without metadata (a node died before its commit): swept once old.
    let orphan = bytes(100, 6);
    let file = one.dir.path().join("orphan");
    std::fs::write(&file, &orphan).unwrap();
    let orphan_sha = hex::encode(Sha256::digest(&orphan));
    one.shared
        .inner
        .persist(&orphan_sha, 100, &file)
        .await
        .unwrap();
    assert_eq!(blob_count(&db), 2);
    assert_eq!(
        one.shared.inner.sweep(ORPHAN_AGE).await.unwrap(),
        0,
        "young"
    );
    db.execute("UPDATE firmware_blobs SET stored_at = now() - interval '2 hours'");
    assert_eq!(one.shared.inner.sweep(ORPHAN_AGE).await.unwrap(), 1);
    assert_eq!(
        db.query_i64(&format!(
            "SELECT count(*) FROM firmware_blobs WHERE sha256 = '{}'",
            p3.sha256
        )),
        1,
        "a referenced blob is never swept"
    );
    // A file that is not what it claims to be is not stored.
    let err = one
        .shared
        .inner
        .persist(&orphan_sha, 99, &file)
        .await
        .unwrap_err();
    assert!(matches!(err, BlobError::Io { .. }), "{err}");
    assert_eq!(blob_count(&db), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_signs_with_the_one_cluster_key() {
    let db = TestDb::new(Backend::Postgres);
    let store = db.open(metrics());
    let (one, two) = (node(&db, &store).await, node(&db, &store).await);
    assert_eq!(
        db.query_i64("SELECT count(*) FROM cluster_secrets"),
        1,
        "generated once"
    );
    let p = upload(&one, "1.0.0", b"image").await;
    let url = one
        .repo
        .download_url(&p.firmware_id, Duration::from_secs(60))
        .unwrap();
    let query: std::collections::HashMap<String, String> =
        form_urlencoded::parse(url.split_once('?').unwrap().1.as_bytes())
            .into_owned()
            .collect();
    let (expires, token) = (query.get("expires"), query.get("token"));
    two.repo
        .verify_download(
            &p.firmware_id,
            expires.map(String::as_str),
            token.map(String::as_str),
        )
        .expect("node two accepts node one's link");
    // No local key file in cluster mode.
    assert!(!one.dir.path().join("download-key").exists());
    assert!(!two.dir.path().join("download-key").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_bytes_cannot_be_stored_commits_no_metadata() {
    let db = TestDb::new(Backend::Postgres);
    let store = db.open(metrics());
    let one = node(&db, &store).await;
    let data = bytes(CHUNK + 5, 7);
    db.execute("ALTER TABLE firmware_chunks RENAME TO firmware_chunks_away");
    let err = one
        .repo
        .create_from_bytes(NewFirmware::new("pk1", "1.0.0"), &data)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, FirmwareError::Blob(BlobError::Shared { .. })),
        "{err}"
    );
    assert_eq!(
        db.query_i64("SELECT count(*) FROM documents WHERE kind = 'ota.firmware'"),
        0,
        "metadata committed for bytes that are not stored"
    );
    assert!(one.repo.find("pk1", "default", "1.0.0").is_none());
    assert_eq!(blob_count(&db), 0, "a half-stored blob");
    assert!(one.cached().is_empty(), "{:?}", one.cached());

    db.execute("ALTER TABLE firmware_chunks_away RENAME TO firmware_chunks");
    let p = upload(&one, "1.0.0", &data).await;
    assert_eq!((blob_count(&db), chunk_count(&db)), (1, 2));
    assert_eq!(p.size, data.len() as u64);
}
