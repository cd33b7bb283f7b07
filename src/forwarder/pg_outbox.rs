//! The shared outbox of cluster mode: table `forward_outbox` in the cluster's PostgreSQL
//! database instead of a node's own `outbox.db`, so that a post a node acknowledged survives
//! the permanent loss of that node.
//!
//! # Shape
//!
//! ```text
//! every node: enqueue ──admit (own bytes)──► writer thread ── one transaction per drain ──► forward_outbox
//!                 ▲  (PUBACK after commit)       │ BEGIN; advisory lock; INSERT … unnest; COMMIT
//!                 └──────────────────────────────┘
//! the holder of lease `outbox`: publisher ◄── `seq > cursor ORDER BY seq` (own read connection)
//!                                   └── confirm ──► DELETE (fenced by the term) ──► writer
//! ```
//!
//! - **Durability**: an enqueue resolves once its transaction committed on the server
//!   (`synchronous_commit` as the server has it, `on` by default), so the device's PUBACK
//!   follows a commit that no gateway node's death can undo.
//! - **Group commit**: as in the SQLite outbox, everything waiting in the writer's channel goes
//!   into one transaction (one multi-row `INSERT … SELECT FROM unnest(…) ORDER BY ordinality`,
//!   so seqs follow enqueue order).
//! - **Seq order is commit order**: every insert transaction first takes one transaction-level
//!   advisory lock ([`INSERT_LOCK`]), so seqs are handed out and committed in the same order on
//!   every node. The publisher reads `seq > cursor`: without the lock, a transaction that drew
//!   a lower seq but committed later would be skipped by a cursor already past it. The price is
//!   that the nodes' outbox commits are serialised (each one is a single multi-row statement,
//!   so the lock is held for one round trip and one WAL flush).
//! - **Draining**: exactly one node publishes, the holder of the `outbox` lease
//!   ([`crate::cluster::lease::OUTBOX`]); every delete it makes after a broker confirm carries
//!   the term it published in and is fenced (`fleetgate_fence`), so a node whose term ran out
//!   cannot delete anything any more. A new holder starts from the oldest row. The AMQP message
//!   id is derived from the row (seq and enqueue time), so a row published again by the next
//!   holder carries the same id: delivery is at least once, consumers drop duplicates by
//!   `message_id`.
//! - **Wake-up**: rows this node commits wake its publisher at once; rows of other nodes are
//!   found by the holder's poll ([`POLL`]), never by `LISTEN/NOTIFY` (a `NOTIFY` makes every
//!   commit of the database take a global lock).
//! - **Bound**: `amqp.outbox_max_bytes` bounds the rows *this node* put in the table and that
//!   are not yet deleted (by whichever node drains). The writer re-reads that amount from the
//!   table ([`REFRESH`]), so space freed by another node's deletes is seen within that period;
//!   back-pressure and refusal work as for the file ([`super::Outbox::admit`]).

use super::message::{ForwardMessage, MessageKind};
use super::outbox::{
    Batch, Inner, Outbox, OutboxError, OutboxRow, PendingInsert, Place, Shared, WriterMsg,
};
use crate::metrics::Metrics;
use crate::store::{PostgresUrl, StoreError};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

/// Key of the transaction-level advisory lock every insert transaction takes ("fgoutbox").
const INSERT_LOCK: i64 = 0x6667_6f75_7462_6f78;
/// How often the drain holder looks for rows other nodes committed, when it has nothing to do.
pub(crate) const POLL: Duration = Duration::from_millis(50);
/// How often the writer re-reads the backlog (its own rows and the whole table) while this
/// node has rows in the table; [`IDLE_REFRESH`] when it has none.
const REFRESH: Duration = Duration::from_millis(200);
const IDLE_REFRESH: Duration = Duration::from_secs(1);
const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Where the cluster's outbox is and who may drain it.
#[derive(Clone)]
pub struct SharedOutboxSettings {
    /// The cluster's PostgreSQL database (the store's; its schema has `forward_outbox`).
    pub url: PostgresUrl,
    /// This node's id (`origin` of the rows it writes).
    pub node: u16,
    /// This node's terms of the `outbox` lease ([`crate::cluster::lease::LeaseKeeper::watch`]).
    pub term: watch::Receiver<Option<u64>>,
}

/// The read side of the shared outbox, and the drain terms.
pub(crate) struct SharedPlace {
    pub term: watch::Receiver<Option<u64>>,
    config: tokio_postgres::Config,
    reader: tokio::sync::Mutex<Option<Client>>,
}

impl SharedPlace {
    /// The reading connection, opened again if it was lost.
    async fn reader(&self) -> Result<tokio::sync::MappedMutexGuard<'_, Client>, OutboxError> {
        let mut slot = self.reader.lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = Some(
                connect_async(&self.config)
                    .await
                    .map_err(StoreError::from)?,
            );
        }
        tokio::sync::MutexGuard::try_map(slot, Option::as_mut).map_err(|_| OutboxError::Closed)
    }

    /// Rows of every node waiting for delivery to `target`.
    pub async fn count_for_target(&self, target: &str) -> Result<u64, OutboxError> {
        let client = self.reader().await?;
        let row = client
            .query_one(
                "SELECT COUNT(*) FROM forward_outbox WHERE target = $1",
                &[&target],
            )
            .await
            .map_err(StoreError::from)?;
        let n: i64 = row.try_get(0).map_err(StoreError::from)?;
        Ok(n.max(0) as u64)
    }

    /// Up to `limit` rows with `seq > after`, in seq order, on the reading connection (opened
    /// again if it was lost).
    pub async fn read_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, OutboxError> {
        let client = self.reader().await?;
        let rows = client
            .query(
                "SELECT seq, enqueued_at_ms, target, kind, product_key, device_name, topic,
                        generate_time_ms, body
                 FROM forward_outbox WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&after, &(limit as i64)],
            )
            .await
            .map_err(StoreError::from)?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get(3)?;
                Ok(OutboxRow {
                    seq: r.try_get(0)?,
                    enqueued_at_ms: r.try_get(1)?,
                    target: r.try_get(2)?,
                    msg: Arc::new(ForwardMessage {
                        // As in the file: an unknown kind (a newer node's row) is forwarded as
                        // what it most likely is rather than lost.
                        kind: MessageKind::parse(&kind).unwrap_or(MessageKind::PropertyPost),
                        product_key: r.try_get(4)?,
                        device_name: r.try_get(5)?,
                        topic: r.try_get(6)?,
                        generate_time_ms: r.try_get(7)?,
                        body: r.try_get(8)?,
                    }),
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(|e| StoreError::from(e).into())
    }
}

async fn connect_async(config: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "shared outbox connection lost");
        }
    });
    Ok(client)
}

/// Opens the shared outbox: connects (on the writer thread), reads this node's backlog and
/// starts the writer. Blocks briefly; the schema is the store's (migrated before this runs).
pub(crate) fn open(
    settings: SharedOutboxSettings,
    max_bytes: u64,
    metrics: Arc<Metrics>,
) -> Result<Outbox, OutboxError> {
    let mut config = settings.url.config().clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_application_name().is_none() {
        config.application_name("fleetgate-outbox");
    }
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let writer_config = config.clone();
    let node = settings.node as i16;
    let handle = std::thread::Builder::new()
        .name("fleetgate-outbox".into())
        .spawn(move || {
            let mut writer = match Writer::connect(writer_config, node, max_bytes, metrics) {
                Ok(w) => w,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(writer.shared.clone()));
            writer.run(rx);
        })
        .map_err(|e| OutboxError::Io {
            path: "forward_outbox".into(),
            source: Arc::new(e),
        })?;
    let shared = match ready_rx.recv() {
        Ok(Ok(shared)) => shared,
        Ok(Err(e)) => {
            let _ = handle.join();
            return Err(e);
        }
        Err(_) => {
            let _ = handle.join();
            return Err(OutboxError::Closed);
        }
    };
    Ok(Outbox {
        inner: Arc::new(Inner {
            tx,
            writer: Mutex::new(Some(handle)),
        }),
        shared,
        place: Place::Shared(Arc::new(SharedPlace {
            term: settings.term,
            config,
            reader: tokio::sync::Mutex::new(None),
        })),
    })
}

/// The writer thread's state: its own runtime and connection.
struct Writer {
    config: tokio_postgres::Config,
    runtime: tokio::runtime::Runtime,
    client: Option<(Client, tokio::task::JoinHandle<()>)>,
    retry_at: Option<Instant>,
    retry_delay: Duration,
    node: i16,
    shared: Arc<Shared>,
    /// Bytes of this node's rows in the table, as of the last commit or refresh.
    own_bytes: u64,
    last_refresh: Instant,
}

impl Writer {
    fn connect(
        config: tokio_postgres::Config,
        node: i16,
        max_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Writer, OutboxError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| OutboxError::Io {
                path: "forward_outbox".into(),
                source: Arc::new(e),
            })?;
        let mut writer = Writer {
            config,
            runtime,
            client: None,
            retry_at: None,
            retry_delay: RECONNECT_INITIAL,
            node,
            shared: Arc::new(Shared::new(0, 0, 0, 0, metrics)),
            own_bytes: 0,
            last_refresh: Instant::now(),
        };
        let (rows, bytes) = writer.backlog()?;
        writer.shared = Arc::new(Shared::new(
            bytes,
            rows,
            max_bytes,
            0,
            writer.shared.metrics.clone(),
        ));
        writer.own_bytes = bytes;
        if rows > 0 {
            tracing::info!(
                rows,
                bytes,
                "the shared outbox holds undelivered messages of this node"
            );
        }
        Ok(writer)
    }

    /// The live connection, (re)opened after the back-off of a failed attempt.
    fn client(&mut self) -> Result<&Client, OutboxError> {
        if self.client.as_ref().is_some_and(|(c, _)| c.is_closed()) {
            self.drop_client();
        }
        if self.client.is_none() {
            if let Some(at) = self.retry_at {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
            }
            let config = self.config.clone();
            match self.runtime.block_on(async move {
                let (client, connection) = config.connect(NoTls).await?;
                let task = tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::warn!(%error, "shared outbox writer connection lost");
                    }
                });
                Ok::<_, tokio_postgres::Error>((client, task))
            }) {
                Ok(pair) => {
                    self.client = Some(pair);
                    self.retry_at = None;
                    self.retry_delay = RECONNECT_INITIAL;
                }
                Err(e) => {
                    self.retry_at = Some(Instant::now() + self.retry_delay);
                    self.retry_delay = (self.retry_delay * 2).min(RECONNECT_MAX);
                    return Err(StoreError::from(e).into());
                }
            }
        }
        match &self.client {
            Some((c, _)) => Ok(c),
            None => Err(OutboxError::Closed),
        }
    }

    fn drop_client(&mut self) {
        if let Some((client, task)) = self.client.take() {
            drop(client);
            task.abort();
            let _ = self.runtime.block_on(task);
        }
    }

    /// The connection, for one transaction run by [`Writer::finish`]'s caller.
    fn live(&mut self) -> Result<(), OutboxError> {
        self.client().map(|_| ())
    }

    /// After a transaction: a failure that left the connection in doubt drops it (the server
    /// rolls back whatever it had open).
    fn settle<T>(&mut self, outcome: Result<T, tokio_postgres::Error>) -> Result<T, OutboxError> {
        outcome.map_err(|e| {
            if e.is_closed() || self.client.as_ref().is_some_and(|(c, _)| c.is_closed()) {
                self.drop_client();
            }
            StoreError::from(e).into()
        })
    }

    /// This node's rows and bytes in the table; sets the whole table's gauges on the way.
    fn backlog(&mut self) -> Result<(u64, u64), OutboxError> {
        let node = self.node;
        self.live()?;
        let (client, _) = self.client.as_ref().ok_or(OutboxError::Closed)?;
        let outcome = self.runtime.block_on(async {
            let row = client
                .query_one(
                    "SELECT count(*), COALESCE(sum(size), 0)::bigint,
                                count(*) FILTER (WHERE origin = $1),
                                COALESCE(sum(size) FILTER (WHERE origin = $1), 0)::bigint
                         FROM forward_outbox",
                    &[&node],
                )
                .await?;
            Ok((
                row.try_get::<_, i64>(0)?,
                row.try_get::<_, i64>(1)?,
                row.try_get::<_, i64>(2)?,
                row.try_get::<_, i64>(3)?,
            ))
        });
        let (all_rows, all_bytes, rows, bytes) = self.settle(outcome)?;
        let m = &self.shared.metrics;
        m.forwarder_shared_outbox_messages.set(all_rows);
        m.forwarder_shared_outbox_bytes.set(all_bytes);
        self.last_refresh = Instant::now();
        Ok((rows.max(0) as u64, bytes.max(0) as u64))
    }

    /// Re-reads this node's backlog: rows another node (or this one) deleted free their space.
    fn refresh(&mut self) {
        let result = self.backlog();
        // Also after a failure: the next attempt waits for the next period.
        self.last_refresh = Instant::now();
        match result {
            Ok((rows, bytes)) => {
                let shared = &self.shared;
                shared.rows.store(rows, Ordering::Relaxed);
                if bytes < self.own_bytes {
                    shared.release(self.own_bytes - bytes);
                } else if bytes > self.own_bytes {
                    shared
                        .used
                        .fetch_add(bytes - self.own_bytes, Ordering::AcqRel);
                }
                self.own_bytes = bytes;
                shared.publish_gauges();
            }
            Err(error) => tracing::warn!(%error, "cannot read the shared outbox backlog"),
        }
    }

    /// One transaction with every insert of the batch, in order.
    fn insert(&mut self, inserts: &[PendingInsert]) -> Result<(), OutboxError> {
        let rows: Vec<_> = inserts.iter().flat_map(|(rows, _)| rows).collect();
        let enqueued: Vec<i64> = rows.iter().map(|r| r.enqueued_at_ms).collect();
        let targets: Vec<&str> = rows.iter().map(|r| r.target.as_str()).collect();
        let kinds: Vec<&str> = rows.iter().map(|r| r.msg.kind.as_str()).collect();
        let pks: Vec<&str> = rows.iter().map(|r| r.msg.product_key.as_str()).collect();
        let dns: Vec<&str> = rows.iter().map(|r| r.msg.device_name.as_str()).collect();
        let topics: Vec<&str> = rows.iter().map(|r| r.msg.topic.as_str()).collect();
        let generated: Vec<i64> = rows.iter().map(|r| r.msg.generate_time_ms).collect();
        let bodies: Vec<&[u8]> = rows.iter().map(|r| r.msg.body.as_slice()).collect();
        let sizes: Vec<i64> = rows.iter().map(|r| r.size() as i64).collect();
        let node = self.node;
        self.live()?;
        let (client, _) = self.client.as_ref().ok_or(OutboxError::Closed)?;
        let outcome = self.runtime.block_on(async {
            client.batch_execute("BEGIN").await?;
            let work = async {
                client
                    .execute("SELECT pg_advisory_xact_lock($1)", &[&INSERT_LOCK])
                    .await?;
                let params: [&(dyn ToSql + Sync); 10] = [
                    &node, &enqueued, &targets, &kinds, &pks, &dns, &topics, &generated, &bodies,
                    &sizes,
                ];
                client.execute(
                    "INSERT INTO forward_outbox (origin, enqueued_at_ms, target, kind, product_key,
                         device_name, topic, generate_time_ms, body, size)
                     SELECT $1, u.e, u.t, u.k, u.pk, u.dn, u.tp, u.g, u.b, u.s
                     FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
                                 $7::text[], $8::bigint[], $9::bytea[], $10::bigint[])
                          WITH ORDINALITY AS u (e, t, k, pk, dn, tp, g, b, s, ord)
                     ORDER BY u.ord",
                    &params,
                )
                .await
            }
            .await;
            finish(client, work).await
        });
        self.settle(outcome).map(|_| ())
    }

    /// Deletes rows the drain holder got confirms for, one fenced transaction per term: a term
    /// that is over deletes nothing (its rows are published again by the next holder).
    fn delete(&mut self, deletes: &[(i64, u64)]) {
        let mut terms: Vec<u64> = deletes.iter().map(|(_, t)| *t).collect();
        terms.sort_unstable();
        terms.dedup();
        for term in terms {
            let seqs: Vec<i64> = deletes
                .iter()
                .filter(|(_, t)| *t == term)
                .map(|(s, _)| *s)
                .collect();
            let node = self.node;
            let epoch = term as i64;
            let n = seqs.len();
            let result = self.live().and_then(|()| {
                let (client, _) = self.client.as_ref().ok_or(OutboxError::Closed)?;
                let outcome = self.runtime.block_on(async {
                    // Losing a delete on a server crash only means publishing its rows again.
                    client
                        .batch_execute("BEGIN; SET LOCAL synchronous_commit = off")
                        .await?;
                    let work = async {
                        client
                            .execute(
                                "SELECT fleetgate_fence($1::text, $2::smallint, $3::bigint)",
                                &[&crate::cluster::lease::OUTBOX, &node, &epoch],
                            )
                            .await?;
                        client
                            .execute("DELETE FROM forward_outbox WHERE seq = ANY($1)", &[&seqs])
                            .await
                    }
                    .await;
                    finish(client, work).await
                });
                self.settle(outcome)
            });
            if let Err(error) = result {
                tracing::warn!(%error, term, rows = n,
                    "shared outbox rows not deleted (drain term over?); the next holder publishes them again");
            }
        }
    }

    fn run(&mut self, rx: mpsc::Receiver<WriterMsg>) {
        let mut carried: Option<WriterMsg> = None;
        loop {
            let period = if self.own_bytes > 0 {
                REFRESH
            } else {
                IDLE_REFRESH
            };
            let first = match carried.take() {
                Some(m) => m,
                None => match rx.recv_timeout(period.saturating_sub(self.last_refresh.elapsed())) {
                    Ok(m) => m,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.refresh();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                },
            };
            let batch = Batch::gather(first, &rx, &mut carried);
            let started = Instant::now();
            if !batch.inserts.is_empty() {
                let result = self.insert(&batch.inserts);
                let (rows, bytes) = batch
                    .inserts
                    .iter()
                    .flat_map(|(r, _)| r)
                    .fold((0u64, 0u64), |(n, b), r| (n + 1, b + r.size()));
                match result {
                    Ok(()) => {
                        self.own_bytes += bytes;
                        self.shared.rows.fetch_add(rows, Ordering::Relaxed);
                        for (_, reply) in batch.inserts {
                            let _ = reply.send(Ok(()));
                        }
                        self.shared.new_rows.notify_one();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "shared outbox transaction failed");
                        for (_, reply) in batch.inserts {
                            let _ = reply.send(Err(e.clone()));
                        }
                        self.shared.release(bytes);
                    }
                }
            }
            if !batch.deletes.is_empty() {
                self.delete(&batch.deletes);
            }
            self.shared
                .metrics
                .forwarder_outbox_commit_seconds
                .observe(started.elapsed().as_secs_f64());
            if self.last_refresh.elapsed() >= period
                || (!batch.deletes.is_empty() && self.last_refresh.elapsed() >= REFRESH / 4)
            {
                self.refresh();
            }
            self.shared.publish_gauges();
            for tx in batch.flushes {
                let _ = tx.send(());
            }
            if batch.shutdown {
                self.drop_client();
                return;
            }
        }
    }
}

/// Commits after `work` succeeded, else rolls back (best effort: on a broken connection the
/// server rolls back by itself).
async fn finish<T>(
    client: &Client,
    work: Result<T, tokio_postgres::Error>,
) -> Result<T, tokio_postgres::Error> {
    match work {
        Ok(v) => {
            client.batch_execute("COMMIT").await?;
            Ok(v)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}
