//! The durable outbox: `{data_dir}/outbox.db`, its own SQLite file (WAL) and its own writer
//! thread, so forwarded data never contends with the registry's store.
//!
//! # Shape
//!
//! ```text
//! enqueue ──admit (bytes)──► channel ──► writer thread ── one transaction per drain ──► outbox.db
//!    ▲                                     │  (inserts + deletes, group commit)          │
//!    └── resolves once committed ◄─────────┘                                             │
//! publisher ◄── reads `seq > cursor ORDER BY seq` on its own read connection ◄──────────┘
//!     ▲     ── Delete(seqs) after the broker's ack ──► writer
//!     └──── the fresh tail: rows just committed, with their seqs ◄── writer (after commit)
//! ```
//!
//! - Rows are `(seq AUTOINCREMENT, target instance, device, topic, body, …)`; one row per
//!   target, so a message mirrored to two instances is two rows, each deleted on its own ack.
//!   `AUTOINCREMENT` never reuses a seq, so the AMQP message id derived from it
//!   ([`OutboxRow::message_id`]) is unique and stable across redelivery and restarts.
//! - Bounded by bytes ([`row_size`]): [`Outbox::admit`] reserves space first; when the outbox
//!   is full it waits (back-pressure, up to `full_wait`) for deletes to free space, then refuses
//!   (the forwarder's caller refuses the message upstream or drops it: `OnFull`). A message larger than the whole bound is
//!   still admitted into an empty outbox, so nothing is unforwardable by size alone.
//! - Durability: `synchronous=FULL` for every transaction holding inserts, so "enqueue resolved"
//!   survives power loss too, which is what lets the broker PUBACK the device after it.
//!   Transactions of deletes only use `NORMAL` (no WAL fsync): losing one on power loss just
//!   means those rows are delivered again, which at-least-once allows.
//!
//! The writer thread (batching, commit, the fresh tail it hands on) is in `outbox/writer.rs`.

mod writer;

#[cfg(test)]
pub(crate) use writer::seq_runs;
use writer::writer;
pub(super) use writer::{Batch, PendingInsert};

use super::message::{ForwardMessage, MessageKind};
use crate::metrics::Metrics;
use rusqlite::{params, Connection};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{oneshot, watch, Notify};

/// File name of the outbox inside the data directory.
pub const OUTBOX_FILE_NAME: &str = "outbox.db";

/// Fixed per-row overhead counted against the byte bound (ids, timestamps, index entries).
const ROW_OVERHEAD: u64 = 64;

/// Errors of the outbox.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox database error: {0}")]
    Sqlite(Arc<rusqlite::Error>),
    #[error("cannot create {path}: {source}")]
    Io {
        path: PathBuf,
        source: Arc<std::io::Error>,
    },
    #[error("the outbox is full ({used} of {max} bytes) and stayed full")]
    Full { used: u64, max: u64 },
    #[error("the outbox is closed")]
    Closed,
    /// The shared outbox (cluster mode) in PostgreSQL.
    #[error("shared outbox: {0}")]
    Shared(#[from] crate::store::StoreError),
}

impl From<rusqlite::Error> for OutboxError {
    fn from(e: rusqlite::Error) -> Self {
        OutboxError::Sqlite(Arc::new(e))
    }
}

/// A message bound for one target instance, before it has a seq.
#[derive(Debug, Clone)]
pub(crate) struct NewRow {
    pub target: String,
    pub enqueued_at_ms: i64,
    pub msg: Arc<ForwardMessage>,
}

impl NewRow {
    pub fn size(&self) -> u64 {
        row_size(&self.target, &self.msg)
    }
}

/// Bytes a row counts against the bound.
pub(crate) fn row_size(target: &str, msg: &ForwardMessage) -> u64 {
    (msg.body.len()
        + msg.topic.len()
        + msg.product_key.len()
        + msg.device_name.len()
        + target.len()) as u64
        + ROW_OVERHEAD
}

/// A stored row as the publisher reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub seq: i64,
    pub enqueued_at_ms: i64,
    /// Instance whose exchange receives the row.
    pub target: String,
    pub msg: Arc<ForwardMessage>,
}

impl OutboxRow {
    /// The AMQP `message_id` (and vendor `messageId`): `(enqueued_at_ms << 20) | (seq mod 2^20)`
    /// as a decimal string, like the vendor's 19-digit ids. Derived only from stored columns, so
    /// a redelivery carries the same id; unique because seqs are never reused and no million
    /// rows share one millisecond.
    pub fn message_id(&self) -> String {
        let ms = self.enqueued_at_ms.max(0) as u64;
        ((ms << 20) | (self.seq as u64 & 0xF_FFFF)).to_string()
    }

    pub fn size(&self) -> u64 {
        row_size(&self.target, &self.msg)
    }
}

pub(super) enum WriterMsg {
    Insert {
        rows: Vec<NewRow>,
        reply: oneshot::Sender<Result<(), OutboxError>>,
    },
    /// Rows the broker acknowledged (or that are dropped), with their total size and the
    /// drain term they were published in (the shared outbox fences the delete with it).
    Delete {
        seqs: Vec<i64>,
        bytes: u64,
        term: u64,
    },
    /// Resolves once everything sent before it committed.
    Flush(oneshot::Sender<()>),
    Shutdown,
}

/// Counters shared by the handle, the writer and the publisher.
pub(crate) struct Shared {
    /// Bytes reserved by admitted rows not yet deleted.
    pub(super) used: AtomicU64,
    /// Rows committed and not yet deleted.
    pub(super) rows: AtomicU64,
    max_bytes: u64,
    /// Signalled (one permit) after a commit that inserted rows: the publisher waits on it.
    pub new_rows: Notify,
    /// Signalled (all waiters) after deletes freed space: back-pressured enqueues wait on it.
    pub(super) space: Notify,
    /// Rows of the latest commits, so a publisher that has caught up with the file takes new
    /// rows from memory instead of reading back what was just written.
    fresh: Mutex<FreshTail>,
    pub(super) metrics: Arc<Metrics>,
}

/// Most rows, and bytes ([`row_size`]), the fresh tail holds; older rows are dropped from it
/// (they stay in the file).
pub(crate) const FRESH_MAX_ROWS: usize = 32_768;
const FRESH_MAX_BYTES: u64 = 32 << 20;

/// Committed rows in seq order, newest last. Every row committed by this process is pushed
/// here. Rows after `max(dropped_through, taken_through)` are all in the tail, so a reader
/// whose cursor is at least that far can take them from here; one below it must read the file.
#[derive(Default)]
struct FreshTail {
    rows: VecDeque<OutboxRow>,
    bytes: u64,
    /// Highest seq not in the tail because it was in the file at open or dropped when the
    /// tail was full.
    dropped_through: i64,
    /// Highest seq taken out by [`Outbox::take_fresh`] (a reader that starts over from an
    /// older cursor must find those in the file).
    taken_through: i64,
}

impl FreshTail {
    fn pop_front(&mut self) -> Option<OutboxRow> {
        let row = self.rows.pop_front()?;
        self.bytes -= row.size();
        Some(row)
    }
}

/// What [`Outbox::take_fresh`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fresh {
    /// Rows after the cursor, in seq order (possibly none), and whether more are waiting.
    Rows(Vec<OutboxRow>, bool),
    /// Rows after the cursor were dropped from the tail: read the file from the cursor.
    Gap,
}

impl Shared {
    pub(super) fn new(
        used: u64,
        rows: u64,
        max_bytes: u64,
        last_seq: i64,
        metrics: Arc<Metrics>,
    ) -> Shared {
        Shared {
            used: AtomicU64::new(used),
            rows: AtomicU64::new(rows),
            max_bytes,
            new_rows: Notify::new(),
            space: Notify::new(),
            // Rows already stored were never in the tail.
            fresh: Mutex::new(FreshTail {
                dropped_through: last_seq,
                ..FreshTail::default()
            }),
            metrics,
        }
    }

    pub(super) fn publish_gauges(&self) {
        self.metrics
            .forwarder_outbox_bytes
            .set(self.used.load(Ordering::Relaxed) as i64);
        self.metrics
            .forwarder_outbox_messages
            .set(self.rows.load(Ordering::Relaxed) as i64);
    }

    /// Appends just-committed rows (`seqs` in insert order) to the fresh tail.
    fn push_fresh(&self, inserts: &[PendingInsert], seqs: &[i64]) {
        if seqs.is_empty() {
            return;
        }
        let mut fresh = self.fresh.lock().unwrap_or_else(PoisonError::into_inner);
        let rows = inserts.iter().flat_map(|(rows, _)| rows);
        for (row, &seq) in rows.zip(seqs) {
            fresh.bytes += row.size();
            fresh.rows.push_back(OutboxRow {
                seq,
                enqueued_at_ms: row.enqueued_at_ms,
                target: row.target.clone(),
                msg: row.msg.clone(),
            });
        }
        while fresh.rows.len() > FRESH_MAX_ROWS || fresh.bytes > FRESH_MAX_BYTES {
            match fresh.pop_front() {
                Some(old) => fresh.dropped_through = old.seq,
                None => break,
            }
        }
    }

    /// Reserves `size` bytes if they fit (or the outbox is empty).
    fn try_reserve(&self, size: u64) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used != 0 && used.saturating_add(size) > self.max_bytes {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + size,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    pub(super) fn release(&self, size: u64) {
        // Saturating: never wrap even if accounting were off by a row.
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(size))
            });
        self.space.notify_waiters();
    }
}

pub(super) struct Inner {
    pub(super) tx: mpsc::Sender<WriterMsg>,
    pub(super) writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            let _ = self.tx.send(WriterMsg::Shutdown);
            let _ = handle.join();
        }
    }
}

/// Handle to the outbox; cheap to clone.
///
/// Two places hold it: the SQLite file of a single node, and, in cluster mode, the table
/// `forward_outbox` in the shared PostgreSQL database ([`super::pg_outbox`]), which outlives
/// any node. Both are written by a writer thread with group commit and read by the publisher
/// in seq order; what differs is behind [`Place`].
#[derive(Clone)]
pub struct Outbox {
    pub(super) inner: Arc<Inner>,
    pub(crate) shared: Arc<Shared>,
    pub(super) place: Place,
}

/// Where the rows are.
#[derive(Clone)]
pub(super) enum Place {
    /// `{data_dir}/outbox.db`: this node's own file; this node drains it.
    File(PathBuf),
    /// The cluster's table; drained by the holder of the `outbox` lease.
    Shared(Arc<super::pg_outbox::SharedPlace>),
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = match &self.place {
            Place::File(path) => path.display().to_string(),
            Place::Shared(_) => "PostgreSQL forward_outbox".to_owned(),
        };
        f.debug_struct("Outbox")
            .field("place", &place)
            .field("rows", &self.len())
            .field("bytes", &self.bytes())
            .finish()
    }
}

fn open_connection(path: &Path) -> Result<Connection, OutboxError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

impl Outbox {
    /// Opens (creating) `path`, counts what is in it and starts the writer thread.
    pub fn open(path: &Path, max_bytes: u64, metrics: Arc<Metrics>) -> Result<Outbox, OutboxError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| OutboxError::Io {
                path: dir.to_path_buf(),
                source: Arc::new(e),
            })?;
        }
        let conn = open_connection(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS outbox (
                 seq              INTEGER PRIMARY KEY AUTOINCREMENT,
                 enqueued_at_ms   INTEGER NOT NULL,
                 target           TEXT NOT NULL,
                 kind             TEXT NOT NULL,
                 product_key      TEXT NOT NULL,
                 device_name      TEXT NOT NULL,
                 topic            TEXT NOT NULL,
                 generate_time_ms INTEGER NOT NULL,
                 body             BLOB NOT NULL
             );",
        )?;
        let (rows, bytes, last_seq): (i64, Option<i64>, i64) = conn.query_row(
            "SELECT COUNT(*), SUM(length(body) + length(topic) + length(product_key)
                                  + length(device_name) + length(target) + ?1),
                    COALESCE(MAX(seq), 0)
             FROM outbox",
            [ROW_OVERHEAD as i64],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let shared = Arc::new(Shared::new(
            bytes.unwrap_or(0).max(0) as u64,
            rows.max(0) as u64,
            max_bytes,
            last_seq,
            metrics,
        ));
        shared.publish_gauges();
        if rows > 0 {
            tracing::info!(rows, bytes = bytes.unwrap_or(0), path = %path.display(), "outbox holds undelivered messages");
        }
        let (tx, rx) = mpsc::channel();
        let writer_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("fleetgate-outbox".into())
            .spawn(move || writer(conn, rx, writer_shared))
            .map_err(|e| OutboxError::Io {
                path: path.to_path_buf(),
                source: Arc::new(e),
            })?;
        Ok(Outbox {
            inner: Arc::new(Inner {
                tx,
                writer: Mutex::new(Some(handle)),
            }),
            shared,
            place: Place::File(path.to_path_buf()),
        })
    }

    /// In the cluster's shared table (drained by one node at a time), not in a file.
    pub fn is_shared(&self) -> bool {
        matches!(self.place, Place::Shared(_))
    }

    /// The drain terms of this node: `Some(epoch)` while it may publish and delete rows. A
    /// node's own file is always its own to drain (`Some(0)`); the shared table only during the
    /// node's terms of the `outbox` lease.
    pub(crate) fn drain_term(&self) -> watch::Receiver<Option<u64>> {
        match &self.place {
            Place::File(_) => watch::channel(Some(0)).1,
            Place::Shared(place) => place.term.clone(),
        }
    }

    /// Rows waiting for delivery.
    pub fn len(&self) -> u64 {
        self.shared.rows.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes reserved (committed or about to be).
    pub fn bytes(&self) -> u64 {
        self.shared.used.load(Ordering::Relaxed)
    }

    pub fn max_bytes(&self) -> u64 {
        self.shared.max_bytes
    }

    /// Reserves room for `size` bytes, waiting up to `full_wait` for the publisher to free
    /// space. `Err(Full)`: nothing reserved; the message is not stored.
    pub async fn admit(&self, size: u64, full_wait: Duration) -> Result<(), OutboxError> {
        let shared = &self.shared;
        if shared.try_reserve(size) {
            return Ok(());
        }
        shared.metrics.forwarder_backpressure_waits.inc();
        let deadline = tokio::time::Instant::now() + full_wait;
        loop {
            let notified = shared.space.notified();
            tokio::pin!(notified);
            // Register before checking so a release between check and wait is not missed.
            notified.as_mut().enable();
            if shared.try_reserve(size) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                // One last chance: space may have been freed exactly at the deadline.
                if shared.try_reserve(size) {
                    return Ok(());
                }
                return Err(OutboxError::Full {
                    used: shared.used.load(Ordering::Relaxed),
                    max: shared.max_bytes,
                });
            }
        }
    }

    /// Reserves `size` bytes now if they fit; never waits.
    pub(crate) fn try_admit(&self, size: u64) -> bool {
        self.shared.try_reserve(size)
    }

    /// Hands rows whose space was admitted to the writer, in call order; the receiver resolves
    /// once they are committed.
    pub(crate) fn send_insert(
        &self,
        rows: Vec<NewRow>,
    ) -> oneshot::Receiver<Result<(), OutboxError>> {
        let (reply, rx) = oneshot::channel();
        // If the writer is gone the reply sender is dropped and the receiver reports Closed.
        let _ = self.inner.tx.send(WriterMsg::Insert { rows, reply });
        rx
    }

    /// Inserts rows whose space was [`admit`](Self::admit)ted; resolves once committed.
    #[cfg(test)]
    pub(crate) async fn insert(&self, rows: Vec<NewRow>) -> Result<(), OutboxError> {
        self.send_insert(rows)
            .await
            .unwrap_or(Err(OutboxError::Closed))
    }

    /// Deletes delivered (or dropped) rows; `bytes` is their total [`OutboxRow::size`].
    #[cfg(test)]
    pub(crate) fn delete(&self, seqs: Vec<i64>, bytes: u64) {
        self.delete_in_term(seqs, bytes, 0);
    }

    /// Deletes rows published during drain term `term` ([`drain_term`](Self::drain_term)):
    /// the shared outbox refuses the delete once that term is over (the rows stay and the next
    /// holder publishes them again, which at-least-once allows).
    pub(crate) fn delete_in_term(&self, seqs: Vec<i64>, bytes: u64, term: u64) {
        if !seqs.is_empty() {
            let _ = self.inner.tx.send(WriterMsg::Delete { seqs, bytes, term });
        }
    }

    /// Resolves once everything sent to the writer before the call is committed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.tx.send(WriterMsg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Up to `limit` committed rows with `seq > after`, in seq order, from the in-memory tail
    /// of recent commits; [`Fresh::Gap`] when some of them are only in the file (read it with
    /// [`OutboxReader::read_after`] and ask again with the new cursor).
    pub(crate) fn take_fresh(&self, after: i64, limit: usize) -> Fresh {
        if self.is_shared() {
            // Other nodes write the table too: only the table knows every row.
            return Fresh::Gap;
        }
        let mut fresh = self
            .shared
            .fresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if fresh.dropped_through.max(fresh.taken_through) > after {
            return Fresh::Gap;
        }
        while fresh.rows.front().is_some_and(|r| r.seq <= after) {
            fresh.pop_front();
        }
        let mut rows = Vec::with_capacity(fresh.rows.len().min(limit));
        while rows.len() < limit {
            match fresh.pop_front() {
                Some(row) => rows.push(row),
                None => break,
            }
        }
        if let Some(last) = rows.last() {
            fresh.taken_through = last.seq;
        }
        Fresh::Rows(rows, !fresh.rows.is_empty())
    }

    /// Rows waiting for delivery to instance `target`, counted once everything handed to the
    /// writer before the call is committed. Reads the whole file or table (there is no index
    /// on the target): for rare operator calls such as deleting an instance. In cluster mode
    /// every node's rows count.
    pub async fn count_for_target(&self, target: &str) -> Result<u64, OutboxError> {
        self.flush().await;
        match &self.place {
            Place::File(path) => {
                let (path, target) = (path.clone(), target.to_owned());
                tokio::task::spawn_blocking(move || {
                    let conn = open_connection(&path)?;
                    let n: i64 = conn.query_row(
                        "SELECT COUNT(*) FROM outbox WHERE target = ?1",
                        [target],
                        |r| r.get(0),
                    )?;
                    Ok(n.max(0) as u64)
                })
                .await
                .unwrap_or(Err(OutboxError::Closed))
            }
            Place::Shared(place) => place.count_for_target(target).await,
        }
    }

    /// A read connection for the publisher (WAL: readers never block the writer).
    pub(crate) fn reader(&self) -> Result<OutboxReader, OutboxError> {
        Ok(match &self.place {
            Place::File(path) => OutboxReader::File(Arc::new(Mutex::new(open_connection(path)?))),
            Place::Shared(place) => OutboxReader::Shared(place.clone()),
        })
    }
}

/// The publisher's read side.
#[derive(Clone)]
pub(crate) enum OutboxReader {
    File(Arc<Mutex<Connection>>),
    Shared(Arc<super::pg_outbox::SharedPlace>),
}

impl OutboxReader {
    /// Up to `limit` rows with `seq > after`, in seq order (on a blocking thread).
    pub async fn read_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, OutboxError> {
        let conn = match self {
            OutboxReader::File(conn) => conn.clone(),
            OutboxReader::Shared(place) => return place.read_after(after, limit).await,
        };
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            read_after(&conn, after, limit)
        })
        .await
        .unwrap_or(Err(OutboxError::Closed))
    }
}

fn read_after(conn: &Connection, after: i64, limit: usize) -> Result<Vec<OutboxRow>, OutboxError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, enqueued_at_ms, target, kind, product_key, device_name, topic,
                generate_time_ms, body
         FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(params![after, limit as i64], |r| {
            let kind: String = r.get(3)?;
            Ok(OutboxRow {
                seq: r.get(0)?,
                enqueued_at_ms: r.get(1)?,
                target: r.get(2)?,
                msg: Arc::new(ForwardMessage {
                    // Written by this module only; an unknown kind (a newer build's row) is
                    // forwarded as what it most likely is rather than lost.
                    kind: MessageKind::parse(&kind).unwrap_or(MessageKind::PropertyPost),
                    product_key: r.get(4)?,
                    device_name: r.get(5)?,
                    topic: r.get(6)?,
                    generate_time_ms: r.get(7)?,
                    body: r.get(8)?,
                }),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}
