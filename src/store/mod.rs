//! Durable persistence: one writer thread, group-committed transactions, rebuild on start.
//!
//! # Shape
//!
//! ```text
//! registry / ota / migration ──Store::submit(Vec<Op>)──► channel ──► writer thread ──► StoreBackend
//!          ▲                                                           (one transaction per drain)
//!          └──────────── Ticket resolves once the transaction committed ◄──┘
//! ```
//!
//! - [`Store`] is a cheap, cloneable handle. It owns ONE writer thread that owns the backend
//!   (the SQLite connection or the PostgreSQL connection); nobody else in the process touches
//!   the database, so there is no lock contention and no `SQLITE_BUSY`.
//! - Callers submit a *submission* (a `Vec<Op>`) and get a [`Ticket`]. A submission is atomic:
//!   all of its ops commit or none do. The writer drains everything queued when it wakes up and
//!   commits it in one transaction (group commit): under load one fsync covers hundreds of
//!   submissions, so "acknowledge only once durable" stays cheap.
//! - A submission that fails (e.g. a foreign key) is rolled back alone through a savepoint; the
//!   others in the same transaction still commit.
//! - Order is FIFO: a ticket resolving means everything submitted before it is committed too,
//!   which is what [`Store::flush`] relies on. Callers that need per-key ordering (the registry)
//!   submit while holding that key's in-memory lock, so log order = memory order.
//!
//! # Backends
//!
//! [`StoreLocation`] picks one ([`StoreSettings::location`]: `[store] url`, `--store`,
//! `FLEETGATE_STORE`):
//! - [`SqliteBackend`] (default): `{data_dir}/fleetgate.db` in WAL mode, durability set by
//!   `[store] synchronous` ([`sqlite`](self::sqlite) module docs).
//! - [`PostgresBackend`]: a PostgreSQL database several gateway nodes can share (cluster mode's
//!   system of record). Same tables and the same contract; a drain is one pipelined
//!   transaction with one multi-row statement per kind of report, replayed with a savepoint
//!   per submission only when a statement fails; durability is the server's
//!   `synchronous_commit`; a lost connection fails its transaction and the next one
//!   reconnects ([`postgres`](self::postgres) module docs).
//!
//! Each backend has its own numbered, append-only list of schema steps (the numbers agree
//! where the steps do) and refuses a database newer than the build.
//!
//! # Extending (OTA jobs, migrations, outbox)
//!
//! Ops are a closed enum ([`Op`]) on purpose: every write is typed, reviewed SQL lives in one
//! place per backend, and each backend is a `match` rather than a SQL dialect translation of
//! free-form statements. A new module adds (1) a schema step to `sqlite::MIGRATIONS` and
//! `postgres::MIGRATIONS` (append-only, numbered), (2) its variants to [`Op`] with a match arm
//! in each backend (for PostgreSQL in `postgres::plan`, saying whether it may be gathered into
//! a multi-row statement), and (3) its fields to [`Snapshot`] filled by `load`. The writer, the
//! tickets and group commit are untouched.
//!
//! This module knows nothing of the registry's in-memory model; it stores plain records.

pub mod device_properties;
mod postgres;
mod sqlite;
mod writer;

pub use postgres::{
    PostgresBackend, PostgresExports, PostgresFirmware, PostgresReader, PostgresUrl,
    FIRMWARE_ORPHAN_AGE, SCHEMA_VERSION as POSTGRES_SCHEMA_VERSION,
};
pub use sqlite::{SqliteBackend, Synchronous, SCHEMA_VERSION};

use crate::metrics::Metrics;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use tokio::sync::oneshot;

/// File name of the database inside the data directory.
pub const DB_FILE_NAME: &str = "fleetgate.db";

/// Errors of the store. Cloneable because one failed transaction fails every ticket in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(Arc<rusqlite::Error>),
    #[error("PostgreSQL error: {}", pg_message(.0))]
    Postgres(Arc<tokio_postgres::Error>),
    #[error("cannot create data directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: Arc<std::io::Error>,
    },
    #[error("database schema version {found} is newer than this build supports ({supported})")]
    SchemaTooNew { found: u32, supported: u32 },
    #[error("corrupt stored value in {what}: {message}")]
    Corrupt { what: &'static str, message: String },
    #[error("cannot start the store writer thread: {0}")]
    Spawn(Arc<std::io::Error>),
    #[error("the store is closed")]
    Closed,
    #[error("this node does not hold the lease that guards this write (cluster mode)")]
    NotLeaseHolder,
}

/// A PostgreSQL error on one line: tokio-postgres's own `Display` says only "db error" and
/// keeps the server's message, code and detail in the error's source.
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let detail = db.detail().map(|d| format!(" ({d})")).unwrap_or_default();
            format!(
                "{} {}: {}{detail}",
                db.severity(),
                db.code().code(),
                db.message()
            )
        }
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(Arc::new(e))
    }
}

/// An instance as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecord {
    pub instance_id: String,
    pub name: String,
    pub created_at_ms: i64,
}

/// A product as stored. `Debug` leaves the secret out.
#[derive(Clone, PartialEq, Eq)]
pub struct ProductRecord {
    pub product_key: String,
    pub product_secret: String,
    pub name: String,
    pub instance_id: String,
    pub description: Option<String>,
    pub created_at_ms: i64,
}

/// The operator-configured part of a device ([`Op::PutDevice`] writes exactly these columns;
/// connection state and versions have their own ops so they never overwrite each other).
/// `Debug` leaves the secret out.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub product_key: String,
    pub device_name: String,
    pub device_secret: String,
    pub instance_id: String,
    pub enabled: bool,
    pub tags: BTreeMap<String, String>,
    pub created_at_ms: i64,
}

// Secrets sign MQTT CONNECTs: an `Op` or a snapshot printed with `{:?}` must not show one.
impl std::fmt::Debug for ProductRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProductRecord")
            .field("product_key", &self.product_key)
            .field("product_secret", &"<redacted>")
            .field("name", &self.name)
            .field("instance_id", &self.instance_id)
            .field("description", &self.description)
            .field("created_at_ms", &self.created_at_ms)
            .finish()
    }
}

impl std::fmt::Debug for DeviceRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRecord")
            .field("product_key", &self.product_key)
            .field("device_name", &self.device_name)
            .field("device_secret", &"<redacted>")
            .field("instance_id", &self.instance_id)
            .field("enabled", &self.enabled)
            .field("tags", &self.tags)
            .field("created_at_ms", &self.created_at_ms)
            .finish()
    }
}

/// A device as loaded: its record plus the state the gateway observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDevice {
    pub record: DeviceRecord,
    pub last_seen_ms: Option<i64>,
    pub client_ip: Option<String>,
    /// module -> last reported version.
    pub versions: BTreeMap<String, String>,
    /// Epoch of the session holding the device (cluster mode; a single node keeps no
    /// sessions across restarts and loads `None`).
    pub session: Option<u64>,
    /// The highest session epoch the store has recorded for the device (0: none).
    pub epoch_seen: u64,
}

/// A session's start or end, as [`Op::SetConnection`] records it (cluster mode: which node
/// holds a device is shared state; a single node ignores it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionWrite {
    /// The session with this epoch holds the device, unless the store has seen a newer one.
    Online(u64),
    /// The session with this epoch ended; the device is offline unless a newer session holds it.
    Offline(u64),
}

/// Everything in the store, read once at start to rebuild the in-memory state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub instances: Vec<InstanceRecord>,
    pub products: Vec<ProductRecord>,
    pub devices: Vec<StoredDevice>,
    /// node -> the last change-feed message (`Op::FeedMark`) this snapshot contains (cluster
    /// mode; empty on a single node).
    pub feed_cuts: BTreeMap<u16, u64>,
}

/// The document kind of a device's latest properties (`crate::command::properties`), which
/// [`Op::PutDeviceProperties`] writes and [`Op::DeleteDevice`] deletes.
pub const DEVICE_PROPERTIES: &str = "device.properties";

/// The id of a device's document of a per-device kind ([`DEVICE_PROPERTIES`]).
pub fn device_doc_id(product_key: &str, device_name: &str) -> String {
    format!("{product_key}/{device_name}")
}

/// One write. Extend this enum (and each backend's `match`) for new tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Insert or update an instance.
    PutInstance(InstanceRecord),
    /// Delete an instance; fails (foreign key) while a product or a device still names it.
    DeleteInstance { instance_id: String },
    /// Insert or update a product (never touches its devices).
    PutProduct(ProductRecord),
    /// Delete a product; fails (foreign key) while it still has devices.
    DeleteProduct { product_key: String },
    /// Insert or update a device's configured columns (secret, instance, enabled, tags).
    PutDevice(DeviceRecord),
    /// Delete a device, its reported versions and its latest-properties document
    /// ([`DEVICE_PROPERTIES`]), in the one transaction.
    DeleteDevice {
        product_key: String,
        device_name: String,
    },
    /// Last connection event: `last_seen_ms` and the client address. A missing device is a no-op
    /// (it may have been deleted while connected).
    SetConnection {
        product_key: String,
        device_name: String,
        last_seen_ms: i64,
        client_ip: Option<String>,
        session: SessionWrite,
    },
    /// Every session of `node` drawn before `before_ms` ended (the node restarted, or it is
    /// gone for good): those devices are offline (last seen `at_ms`) unless a newer session
    /// holds them.
    ReleaseNode {
        node: u16,
        before_ms: i64,
        at_ms: i64,
    },
    /// A device reported `version` for `module`.
    SetVersion {
        product_key: String,
        device_name: String,
        module: String,
        version: String,
        reported_at_ms: i64,
    },
    /// Insert or replace a JSON document of a module's own (`kind` names the collection, e.g.
    /// `ota.job`). Modules that own their state (OTA, migration, export) persist through these
    /// so they need no schema step or writer change of their own.
    PutDoc {
        kind: &'static str,
        id: String,
        body: String,
    },
    /// Delete a document; a missing one is a no-op.
    DeleteDoc { kind: &'static str, id: String },
    /// Write a device's latest-properties document ([`DEVICE_PROPERTIES`], id
    /// [`device_doc_id`]) while the device exists; a write for a device that no longer does
    /// (deleted while the write was queued, or by another node) writes nothing. Merged with
    /// the stored one, per property, in the transaction
    /// ([`device_properties::merged_body`]: the newer device time stays), so a node that
    /// writes what it has cannot replace newer values another node wrote, nor drop properties
    /// it never saw (PostgreSQL: read and written with the document's row locked). With
    /// [`Op::DeleteDevice`] deleting the document, no snapshot outlives its device in the store
    /// (to be read back by a device created again under the name).
    PutDeviceProperties {
        product_key: String,
        device_name: String,
        body: String,
    },
    /// The change feed's position (cluster mode): the transaction that carries it is message
    /// `seq` of node `node`'s feed, so a snapshot read with [`Snapshot::feed_cuts`] says
    /// exactly which feed messages it already contains. A single node ignores it.
    FeedMark { node: u16, seq: u64 },
    /// Cluster mode: the submission commits only while node `node` holds lease `lease` with
    /// `epoch` (`crate::cluster::lease`); otherwise it fails with the others of its submission
    /// rolled back. A node whose lease ran out can no longer change what the new holder owns.
    /// A single node has no leases and ignores it.
    Fence {
        lease: &'static str,
        node: u16,
        epoch: u64,
    },
}

/// The lease a [`Store`] handle's submissions are fenced by: set while this node holds it.
#[derive(Debug, Default)]
pub struct FenceSlot {
    held: Mutex<Option<(&'static str, u16, u64)>>,
}

impl FenceSlot {
    /// This node holds `lease` with `epoch` (`None`: it does not).
    pub fn set(&self, held: Option<(&'static str, u16, u64)>) {
        *self.held.lock().unwrap_or_else(PoisonError::into_inner) = held;
    }

    fn op(&self) -> Option<Op> {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|(lease, node, epoch)| Op::Fence { lease, node, epoch })
    }
}

/// Told about every committed transaction, in commit order, on the writer thread, before the
/// transaction's tickets resolve: the cluster's change feed (`crate::cluster::feed`).
pub trait CommitFeed: Send + 'static {
    /// An op to commit in the same transaction as `submissions` (the feed's
    /// [`Op::FeedMark`]), or `None` when none of them concern the feed.
    fn mark(&mut self, submissions: &[&[Op]]) -> Option<Op>;
    /// The transaction that carried the last mark committed; `results` has one entry per
    /// submission (a submission rolled back alone has an `Err`).
    fn committed(&mut self, submissions: &[&[Op]], results: &[Result<(), StoreError>]);
}

/// A durable storage engine: [`SqliteBackend`] or [`PostgresBackend`]. Only the writer thread
/// calls it, so `&mut self` needs no locking.
pub trait StoreBackend: Send + 'static {
    /// Reads everything (used at start).
    fn load(&mut self) -> Result<Snapshot, StoreError>;

    /// Every document of one `kind` as `(id, body)`, ordered by id.
    fn load_documents(&mut self, kind: &str) -> Result<Vec<(String, String)>, StoreError>;

    /// Applies `submissions` in ONE transaction. Each submission is atomic on its own: one that
    /// fails is rolled back alone and its slot in the returned vector is `Err`, the others still
    /// commit. `Err` from the call itself means the transaction as a whole did not commit.
    fn commit(&mut self, submissions: &[&[Op]]) -> Result<Vec<Result<(), StoreError>>, StoreError>;
}

/// Resolves once the transaction holding the submission committed (or failed).
///
/// Dropping a ticket does not cancel the write; fire-and-forget callers simply drop it.
#[must_use = "a ticket does nothing unless awaited; drop it explicitly for fire-and-forget writes"]
pub struct Ticket {
    rx: oneshot::Receiver<Result<(), StoreError>>,
}

impl Future for Ticket {
    type Output = Result<(), StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(StoreError::Closed)))
    }
}

/// How the writer reports a submission's outcome.
pub(crate) enum Reply {
    /// Async caller awaiting a [`Ticket`].
    Ticket(oneshot::Sender<Result<(), StoreError>>),
    /// Synchronous caller blocked on a std channel (usable inside or outside a runtime).
    Blocking(mpsc::SyncSender<Result<(), StoreError>>),
}

impl Reply {
    fn send(self, result: Result<(), StoreError>) {
        // The caller may have gone away (dropped ticket); that is fine.
        match self {
            Reply::Ticket(tx) => {
                let _ = tx.send(result);
            }
            Reply::Blocking(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

/// Messages to the writer thread.
pub(crate) enum Msg {
    Submit {
        ops: Vec<Op>,
        reply: Reply,
    },
    Load(mpsc::SyncSender<Result<Snapshot, StoreError>>),
    LoadDocuments(
        String,
        mpsc::SyncSender<Result<Vec<(String, String)>, StoreError>>,
    ),
    /// From the next transaction on, marks and reports transactions to this feed.
    SetFeed(Box<dyn CommitFeed>),
    /// Commit everything queued before this, then exit.
    Shutdown,
}

struct Inner {
    tx: mpsc::Sender<Msg>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Inner {
    fn shutdown(&self) {
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            let _ = self.tx.send(Msg::Shutdown);
            if handle.join().is_err() {
                tracing::error!("store writer thread panicked");
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Handle to the store: cheap to clone; the last clone dropped (or [`Store::close`]) commits
/// whatever is queued and joins the writer thread.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    /// Set on a handle made by [`Store::fenced`]: its submissions carry the lease's fence.
    fence: Option<Arc<FenceSlot>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// `[store]` settings: where the store lives, durability and the writer's group commit.
///
/// `url`: a `postgres://` URL puts the store in that PostgreSQL database (several gateway nodes
/// can share it); absent, it is SQLite at `{data_dir}/fleetgate.db`. Checked when the settings
/// load; logged without its password.
///
/// `synchronous` (SQLite only; refused with a `url`): `full` (default) fsyncs the WAL on every
/// commit, so whatever the gateway acknowledged survives power loss; `normal` survives a crash
/// of the process (`kill -9`) but may lose the last commits on power loss or a kernel crash, for
/// less CPU and latency per commit on slow disks (see [`sqlite`](self::sqlite) module docs).
/// With PostgreSQL a commit is as durable as the server's `synchronous_commit` makes it (`on` by
/// default: flushed to the server's WAL before the tickets resolve).
///
/// Group commit, like PostgreSQL's `commit_delay`/`commit_siblings`: after a transaction that
/// carried at least `commit_siblings` submissions (the store is busy), the writer waits
/// `commit_delay_us` before starting the next one, so that one gathers more submissions and the
/// per-commit cost (WAL frames, fsync, waking the writer) is shared by more of them. Under light
/// load nothing waits. `commit_delay_us = 0` turns it off. The defaults are A/B choices
/// (docs/BENCHMARKS.md), one per backend: 2 ms on SQLite (a busy transaction's pages are the
/// same few whatever it carries, so waiting longer saves CPU per message, and it only adds
/// latency when the store is busy) and 4 ms on PostgreSQL, where a transaction also costs a
/// round trip, the server's own work per transaction and, in a cluster, a change-feed message
/// every other node decodes and applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    pub url: Option<PostgresUrl>,
    pub synchronous: Synchronous,
    /// Unset: the backend's default ([`StoreSettings::commit_delay`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_delay_us: Option<u64>,
    pub commit_siblings: usize,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            url: None,
            synchronous: Synchronous::Full,
            commit_delay_us: None,
            commit_siblings: 8,
        }
    }
}

/// The group-commit delay on SQLite when `commit_delay_us` is not set.
pub const SQLITE_COMMIT_DELAY_US: u64 = 2_000;
/// The group-commit delay on PostgreSQL when `commit_delay_us` is not set.
pub const POSTGRES_COMMIT_DELAY_US: u64 = 4_000;

impl StoreSettings {
    /// The group-commit delay, µs: `commit_delay_us`, or the backend's default.
    pub fn commit_delay(&self) -> u64 {
        self.commit_delay_us.unwrap_or(match self.url {
            Some(_) => POSTGRES_COMMIT_DELAY_US,
            None => SQLITE_COMMIT_DELAY_US,
        })
    }

    /// The delay before the next transaction after one of `submissions` submissions.
    pub(crate) fn delay_after(&self, submissions: usize) -> Option<std::time::Duration> {
        let delay = self.commit_delay();
        (delay > 0 && submissions >= self.commit_siblings.max(1))
            .then(|| std::time::Duration::from_micros(delay))
    }

    /// Where the store lives with these settings and this data directory.
    pub fn location(&self, data_dir: &Path) -> StoreLocation {
        match &self.url {
            Some(url) => StoreLocation::Postgres(url.clone()),
            None => StoreLocation::Sqlite(Store::db_path(data_dir)),
        }
    }
}

/// The backend a store is opened on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite database file (created with its directory if missing).
    Sqlite(PathBuf),
    /// A PostgreSQL database (it must exist; the schema is created in it).
    Postgres(PostgresUrl),
}

/// `SQLite at {path}` / `PostgreSQL at {url without password}`: fit for logs.
impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sqlite(path) => write!(f, "SQLite at {}", path.display()),
            StoreLocation::Postgres(url) => write!(f, "PostgreSQL at {url}"),
        }
    }
}

impl Store {
    /// `{data_dir}/fleetgate.db`.
    pub fn db_path(data_dir: &Path) -> PathBuf {
        data_dir.join(DB_FILE_NAME)
    }

    /// Opens (creating if needed, with its parent directory) the SQLite database at `path`,
    /// migrates its schema and starts the writer.
    pub fn open(path: &Path, metrics: Arc<Metrics>) -> Result<Store, StoreError> {
        Store::open_with(
            &StoreLocation::Sqlite(path.to_owned()),
            &StoreSettings::default(),
            metrics,
        )
    }

    /// Opens the store at `location` with explicit `[store]` settings: connects (PostgreSQL) or
    /// opens the file (SQLite), migrates the schema and starts the writer. Blocks the calling
    /// thread until the backend is ready (start-up).
    pub fn open_with(
        location: &StoreLocation,
        settings: &StoreSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreError> {
        tracing::info!(store = %location, "opening the store");
        match location {
            StoreLocation::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| StoreError::Io {
                        path: dir.to_path_buf(),
                        source: Arc::new(e),
                    })?;
                }
                if settings.synchronous == Synchronous::Normal {
                    tracing::info!(
                        "store synchronous=normal: the last commits may be lost on power loss"
                    );
                }
                let (path, synchronous) = (path.clone(), settings.synchronous);
                Store::start(
                    move || SqliteBackend::open(&path, synchronous),
                    settings,
                    metrics,
                )
            }
            // Connected on the writer thread: the backend drives its connection with a runtime
            // of its own, which cannot be started from a thread already running one.
            StoreLocation::Postgres(url) => {
                let url = url.clone();
                Store::start(move || PostgresBackend::connect(&url), settings, metrics)
            }
        }
    }

    /// A private in-memory SQLite database (tests, dry runs). Gone when the store closes.
    pub fn open_in_memory(metrics: Arc<Metrics>) -> Result<Store, StoreError> {
        Store::with_backend(SqliteBackend::open_in_memory()?, metrics)
    }

    /// Starts the writer thread over any backend (default [`StoreSettings`]).
    pub fn with_backend<B: StoreBackend>(
        backend: B,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreError> {
        Store::start(move || Ok(backend), &StoreSettings::default(), metrics)
    }

    /// Starts the writer thread, which opens its backend with `open` first; returns once that
    /// succeeded (or with its error).
    fn start<B: StoreBackend>(
        open: impl FnOnce() -> Result<B, StoreError> + Send + 'static,
        settings: &StoreSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreError> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let settings = settings.clone();
        let handle = std::thread::Builder::new()
            .name("fleetgate-store".into())
            .spawn(move || match open() {
                Ok(backend) => {
                    let _ = ready_tx.send(Ok(()));
                    writer::run(backend, rx, settings, metrics);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| StoreError::Spawn(Arc::new(e)))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Store {
                inner: Arc::new(Inner {
                    tx,
                    writer: Mutex::new(Some(handle)),
                }),
                fence: None,
            }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            // The thread ended without a word: it panicked while opening.
            Err(_) => {
                let _ = handle.join();
                Err(StoreError::Closed)
            }
        }
    }

    /// Queues `ops` as one atomic submission. Never blocks; the ticket resolves once committed.
    pub fn submit(&self, ops: Vec<Op>) -> Ticket {
        let (tx, rx) = oneshot::channel();
        let ops = match self.fenced_ops(ops) {
            Ok(ops) => ops,
            Err(e) => {
                let _ = tx.send(Err(e));
                return Ticket { rx };
            }
        };
        // If the writer is gone the reply sender is dropped with the message, so the ticket
        // resolves to `Closed`.
        let _ = self.inner.tx.send(Msg::Submit {
            ops,
            reply: Reply::Ticket(tx),
        });
        Ticket { rx }
    }

    /// Queues `ops` and blocks the calling thread until committed. Safe inside a tokio runtime
    /// (it does not use tokio's blocking primitives) but it does block that worker: use it only
    /// at start-up.
    pub fn submit_blocking(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        let ops = self.fenced_ops(ops)?;
        let (tx, rx) = mpsc::sync_channel(1);
        self.inner
            .tx
            .send(Msg::Submit {
                ops,
                reply: Reply::Blocking(tx),
            })
            .map_err(|_| StoreError::Closed)?;
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    /// Resolves once everything submitted before this call is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.submit(Vec::new()).await
    }

    /// Reads everything, after committing whatever is queued. Blocks the calling thread (start-up).
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.inner
            .tx
            .send(Msg::Load(tx))
            .map_err(|_| StoreError::Closed)?;
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    /// Every document of `kind` (see [`Op::PutDoc`]) as `(id, body)`, after everything queued
    /// before the call committed. Blocking: for start-up.
    pub fn load_documents(&self, kind: &str) -> Result<Vec<(String, String)>, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.inner
            .tx
            .send(Msg::LoadDocuments(kind.to_owned(), tx))
            .map_err(|_| StoreError::Closed)?;
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    /// A handle whose every submission commits only while this node holds the lease in
    /// `slot` (cluster mode: the engines' writes); while it holds none, submissions fail at
    /// once with [`StoreError::NotLeaseHolder`]. Other handles are not affected.
    pub fn fenced(&self, slot: Arc<FenceSlot>) -> Store {
        Store {
            inner: Arc::clone(&self.inner),
            fence: Some(slot),
        }
    }

    /// The fence a write through this handle carries (`None`: not fenced), for ops submitted
    /// through another handle that must commit only during this one's term (a migration batch
    /// moves devices through the registry's store). [`StoreError::NotLeaseHolder`] outside a
    /// term.
    pub fn fence_op(&self) -> Result<Option<Op>, StoreError> {
        match &self.fence {
            None => Ok(None),
            Some(slot) => slot.op().map(Some).ok_or(StoreError::NotLeaseHolder),
        }
    }

    fn fenced_ops(&self, mut ops: Vec<Op>) -> Result<Vec<Op>, StoreError> {
        let Some(slot) = &self.fence else {
            return Ok(ops);
        };
        if ops.is_empty() {
            // A flush barrier writes nothing to fence.
            return Ok(ops);
        }
        let fence = slot.op().ok_or(StoreError::NotLeaseHolder)?;
        ops.insert(0, fence);
        Ok(ops)
    }

    /// Whether the writer is running (readiness): false once the store was closed or its
    /// thread ended.
    pub fn is_open(&self) -> bool {
        self.inner
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|h| !h.is_finished())
    }

    /// Attaches the change feed (cluster mode): every later transaction that concerns it
    /// carries its mark and is reported to it once committed.
    pub fn set_feed(&self, feed: Box<dyn CommitFeed>) {
        let _ = self.inner.tx.send(Msg::SetFeed(feed));
    }

    /// Commits everything queued, stops and joins the writer. Later submissions through other
    /// clones of this handle fail with [`StoreError::Closed`].
    pub fn close(self) {
        self.inner.shutdown();
    }
}

#[cfg(test)]
pub(crate) mod test_db;
#[cfg(test)]
pub(crate) mod tests;
