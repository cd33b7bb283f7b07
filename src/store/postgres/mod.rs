//! The shared backend: PostgreSQL as the system of record of several gateway nodes.
//!
//! # Connection and runtime
//!
//! [`StoreBackend`] is synchronous and called only by the store's writer thread, so the backend
//! owns a current-thread tokio runtime and drives one `tokio-postgres` connection with it (the
//! connection is polled only while the writer waits on it, which is the only time it has
//! anything to do). A lost connection fails the call that saw it (for `commit`: the whole
//! transaction, every ticket in it); the next call reconnects, waiting after a failed attempt
//! (100 ms, doubling up to 5 s) so a server that is down is not hammered. A transaction is
//! committed only after every statement of it succeeded, so a connection lost before the
//! `COMMIT` leaves nothing behind; one lost during the `COMMIT` is reported failed although the
//! server may have committed it — never the reverse.
//!
//! # One transaction per drain, pipelined
//!
//! `commit` first tries the whole drain optimistically: `BEGIN`, the statements of
//! [`plan`] (batchable ops gathered into one multi-row statement per kind) and `COMMIT`, all
//! sent at once without waiting for each answer (tokio-postgres pipelines requests sent before
//! their answers arrive): one round trip per transaction. A failed statement aborts the
//! transaction, and PostgreSQL then answers the `COMMIT` with a rollback, so the outcome is
//! read from the statements' answers first and from the `COMMIT`'s only when all succeeded.
//! If a statement failed, the drain is replayed in a new transaction with one `SAVEPOINT` per
//! submission: still pipelined, resuming after each failing submission, so only
//! that submission gets its `Err` (the contract SQLite keeps with its savepoints). A drain of
//! 1,000 connection events and version reports is `BEGIN`, 2 statements, `COMMIT`. Writes of
//! latest-properties documents are the exception: they are merged with the stored documents
//! (read with their rows locked), so the statements after them wait for that read's answer
//! (up to two more round trips, at most once per flush of the snapshots).
//!
//! # Durability
//!
//! A commit is as durable as the server makes it: with PostgreSQL's default
//! `synchronous_commit = on` it is flushed to the server's WAL (and to synchronous standbys, if
//! configured) before the tickets resolve. `[store] synchronous` is SQLite's and does not apply.
//!
//! # Schema
//!
//! The tables of the SQLite backend with PostgreSQL types (`BIGINT` times, `BOOLEAN` flags, tags
//! and document bodies as JSON in `TEXT`: read and written whole, never queried inside). Key
//! columns are `COLLATE "C"`, so `ORDER BY` is byte order as in SQLite. [`MIGRATIONS`] is
//! numbered like SQLite's (step 1 registry, step 2 documents) and append-only; every connection
//! runs it inside a transaction holding `pg_advisory_xact_lock`, so nodes starting together
//! apply each step once, and a database newer than this build is refused.

mod exports;
mod firmware;
mod plan;
mod schema;
mod shared;
mod url;

pub use exports::PostgresExports;
pub use firmware::{PostgresFirmware, ORPHAN_AGE as FIRMWARE_ORPHAN_AGE};
pub use schema::SCHEMA_VERSION;
use schema::{migrate, stored_version};
pub use shared::PostgresReader;
pub use url::PostgresUrl;

use super::{
    DeviceRecord, InstanceRecord, Op, ProductRecord, Snapshot, StoreBackend, StoreError,
    StoredDevice, DEVICE_PROPERTIES,
};
use futures_util::stream::{FuturesUnordered, StreamExt};
use plan::{plan, Single, Step};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio_postgres::error::{Severity, SqlState};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Used when the URL sets no `connect_timeout`: a server that does not answer fails the call
/// instead of stalling the writer indefinitely.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// PostgreSQL implementation of [`StoreBackend`] (see the module docs).
pub struct PostgresBackend {
    config: tokio_postgres::Config,
    runtime: tokio::runtime::Runtime,
    session: Option<Session>,
    /// Earliest start of the next connection attempt, after a failed one.
    retry_at: Option<Instant>,
    retry_delay: Duration,
    /// Whether a connection was ever made: later ones are logged as reconnections.
    connected_before: bool,
    statements: u64,
}

/// A live connection with its prepared statements.
struct Session {
    client: Client,
    prepared: Prepared,
    connection: tokio::task::JoinHandle<()>,
}

/// The statements `commit` sends, prepared once per connection.
struct Prepared {
    put_instance: Statement,
    delete_instance: Statement,
    put_product: Statement,
    delete_product: Statement,
    put_device: Statement,
    delete_device: Statement,
    delete_doc: Statement,
    delete_device_properties: Statement,
    release_node: Statement,
    feed_mark: Statement,
    fence: Statement,
    set_connections: Statement,
    set_versions: Statement,
    put_docs: Statement,
    insert_device_properties: Statement,
    lock_device_properties: Statement,
    update_device_properties: Statement,
}

impl Prepared {
    async fn new(client: &Client) -> Result<Prepared, tokio_postgres::Error> {
        let (put_instance, put_product, delete_product, put_device, delete_device) = tokio::try_join!(
            client.prepare(
                "INSERT INTO instances (instance_id, name, created_at_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (instance_id) DO UPDATE SET name = excluded.name",
            ),
            client.prepare(
                "INSERT INTO products (product_key, product_secret, name, instance_id, description, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (product_key) DO UPDATE SET product_secret = excluded.product_secret,
                     name = excluded.name, instance_id = excluded.instance_id, description = excluded.description",
            ),
            client.prepare("DELETE FROM products WHERE product_key = $1"),
            client.prepare(
                "INSERT INTO devices (product_key, device_name, device_secret, instance_id, enabled, tags, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (product_key, device_name) DO UPDATE SET device_secret = excluded.device_secret,
                     instance_id = excluded.instance_id, enabled = excluded.enabled, tags = excluded.tags",
            ),
            client.prepare("DELETE FROM devices WHERE product_key = $1 AND device_name = $2"),
        )?;
        let (delete_doc, set_connections, set_versions, put_docs) = tokio::try_join!(
            client.prepare("DELETE FROM documents WHERE kind = $1 AND id = $2"),
            // A session's start applies if the row has seen no newer session; its end applies to
            // the session holding the row, or to one the row never saw start (its start was
            // folded into this statement, see `plan`). A stale event changes nothing.
            client.prepare(
                "UPDATE devices AS d SET last_seen_ms = u.last_seen_ms, client_ip = u.client_ip,
                     conn_epoch = CASE WHEN u.online THEN u.epoch END,
                     conn_node = CASE WHEN u.online THEN u.node END,
                     epoch_seen = GREATEST(d.epoch_seen, u.epoch)
                 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[],
                             $6::boolean[], $7::smallint[])
                     AS u (product_key, device_name, last_seen_ms, client_ip, epoch, online, node)
                 WHERE d.product_key = u.product_key AND d.device_name = u.device_name
                     AND (d.epoch_seen < u.epoch OR (NOT u.online AND d.conn_epoch = u.epoch))",
            ),
            client.prepare(
                "INSERT INTO device_versions (product_key, device_name, module, version, reported_at_ms)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
                 ON CONFLICT (product_key, device_name, module) DO UPDATE SET version = excluded.version,
                     reported_at_ms = excluded.reported_at_ms",
            ),
            client.prepare(
                "INSERT INTO documents (kind, id, body)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
                 ON CONFLICT (kind, id) DO UPDATE SET body = excluded.body",
            ),
        )?;
        // A device's properties document (`Op::PutDeviceProperties`, see
        // `put_device_properties`): written only while the device exists, whose row is locked
        // (KEY SHARE: device updates and connection events do not wait) so that a concurrent
        // delete of the device waits for this write and then deletes the document too
        // (`Single::DeleteDeviceProperties`), or this write waits for the delete and finds no
        // device. New documents are inserted; existing ones are locked, read, merged and
        // updated.
        let (
            insert_device_properties,
            lock_device_properties,
            update_device_properties,
            delete_device_properties,
        ) = tokio::try_join!(
            client.prepare(
                "INSERT INTO documents (kind, id, body)
                 SELECT $1::text, u.product_key || '/' || u.device_name, u.body
                 FROM unnest($2::text[], $3::text[], $4::text[]) AS u (product_key, device_name, body)
                 WHERE EXISTS (SELECT 1 FROM devices d
                     WHERE d.product_key = u.product_key AND d.device_name = u.device_name
                     FOR KEY SHARE)
                 ON CONFLICT (kind, id) DO NOTHING
                 RETURNING id",
            ),
            client.prepare(
                "SELECT id, body FROM documents WHERE kind = $1::text AND id = ANY($2::text[])
                 ORDER BY id FOR UPDATE",
            ),
            client.prepare(
                "UPDATE documents AS doc SET body = u.body
                 FROM unnest($2::text[], $3::text[], $4::text[]) AS u (product_key, device_name, body)
                 WHERE doc.kind = $1::text AND doc.id = u.product_key || '/' || u.device_name
                     AND EXISTS (SELECT 1 FROM devices d
                         WHERE d.product_key = u.product_key AND d.device_name = u.device_name
                         FOR KEY SHARE)",
            ),
            client.prepare(
                "DELETE FROM documents WHERE kind = $1::text AND id = $2::text || '/' || $3::text"
            ),
        )?;
        let (release_node, feed_mark, fence, delete_instance) = tokio::try_join!(
            client.prepare(
                "UPDATE devices SET conn_epoch = NULL, conn_node = NULL, last_seen_ms = $3
                 WHERE conn_node = $1 AND (conn_epoch >> 21) < $2",
            ),
            client.prepare(
                "INSERT INTO cluster_feed (node, seq) VALUES ($1, $2)
                 ON CONFLICT (node) DO UPDATE SET seq = GREATEST(cluster_feed.seq, excluded.seq)",
            ),
            client.prepare("SELECT fleetgate_fence($1::text, $2::smallint, $3::bigint)"),
            client.prepare("DELETE FROM instances WHERE instance_id = $1"),
        )?;
        Ok(Prepared {
            release_node,
            feed_mark,
            fence,
            put_instance,
            delete_instance,
            put_product,
            delete_product,
            put_device,
            delete_device,
            delete_doc,
            set_connections,
            set_versions,
            put_docs,
            insert_device_properties,
            lock_device_properties,
            update_device_properties,
            delete_device_properties,
        })
    }
}

impl Session {
    async fn open(config: &tokio_postgres::Config) -> Result<Session, StoreError> {
        let (client, connection) = config.connect(NoTls).await?;
        let connection = tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(error = %super::pg_message(&error), "PostgreSQL connection lost");
            }
        });
        let session = async {
            migrate(&client).await?;
            let prepared = Prepared::new(&client).await?;
            Ok::<_, StoreError>(prepared)
        }
        .await;
        match session {
            Ok(prepared) => Ok(Session {
                client,
                prepared,
                connection,
            }),
            Err(e) => {
                connection.abort();
                Err(e)
            }
        }
    }
}

impl PostgresBackend {
    /// Connects, migrates the schema (waiting for another node that is migrating it) and
    /// prepares the statements. Blocks; call it from a thread that is not running a tokio
    /// runtime (the store opens it on its writer thread).
    pub fn connect(url: &PostgresUrl) -> Result<PostgresBackend, StoreError> {
        let mut config = url.config().clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            // Names the store's connection in pg_stat_activity.
            config.application_name("fleetgate");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Spawn(Arc::new(e)))?;
        let mut backend = PostgresBackend {
            config,
            runtime,
            session: None,
            retry_at: None,
            retry_delay: RECONNECT_INITIAL,
            connected_before: false,
            statements: 0,
        };
        backend.ensure_session()?;
        Ok(backend)
    }

    /// The schema version stored in the database.
    pub fn schema_version(&mut self) -> Result<u32, StoreError> {
        let result = {
            let (runtime, session) = self.session()?;
            runtime.block_on(stored_version(&session.client))
        };
        self.keep_if_ok(result)
    }

    /// Statements `commit` has sent since the backend was created, `BEGIN`, `COMMIT` and
    /// savepoints included: what a drain costs the server (diagnostics and tests).
    pub fn statements_sent(&self) -> u64 {
        self.statements
    }

    /// Connects if there is no live connection, after the back-off of a failed attempt.
    fn ensure_session(&mut self) -> Result<(), StoreError> {
        if self.session.as_ref().is_some_and(|s| !s.client.is_closed()) {
            return Ok(());
        }
        self.drop_session();
        if let Some(at) = self.retry_at {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
        }
        match self.runtime.block_on(Session::open(&self.config)) {
            Ok(session) => {
                if self.connected_before {
                    tracing::info!("PostgreSQL store reconnected");
                }
                self.connected_before = true;
                self.retry_at = None;
                self.retry_delay = RECONNECT_INITIAL;
                self.session = Some(session);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = self.retry_delay.as_millis() as u64,
                    "cannot connect to the PostgreSQL store");
                self.retry_at = Some(Instant::now() + self.retry_delay);
                self.retry_delay = (self.retry_delay * 2).min(RECONNECT_MAX);
                Err(e)
            }
        }
    }

    /// Closes the connection (the server rolls back whatever transaction it had open).
    fn drop_session(&mut self) {
        if let Some(Session {
            client, connection, ..
        }) = self.session.take()
        {
            drop(client);
            connection.abort();
            // Lets the runtime drop the aborted task, which closes the socket now rather than at
            // the next call.
            let _ = self.runtime.block_on(connection);
        }
    }

    /// A live connection (see [`ensure_session`](Self::ensure_session)) and the runtime to
    /// drive it.
    fn session(&mut self) -> Result<(&tokio::runtime::Runtime, &Session), StoreError> {
        self.ensure_session()?;
        match &self.session {
            Some(session) => Ok((&self.runtime, session)),
            None => Err(StoreError::Closed),
        }
    }

    /// Drops the connection after a failed call, so a transaction the call left open cannot
    /// leak into the next one.
    fn keep_if_ok<T>(&mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e) = &result {
            tracing::warn!(error = %e, "PostgreSQL store connection closed; reconnecting on the next write");
            self.drop_session();
        }
        result
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Postgres(Arc::new(e))
    }
}

/// What a call of a pipeline runs.
type Request<'a> = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + 'a>>;

/// One request of a pipeline, or (a barrier) a series of requests that needs the answers of
/// its first ones: the calls after a barrier are sent only once it is done.
struct Call<'a> {
    request: Request<'a>,
    barrier: bool,
}

/// Sends every call before awaiting any answer (up to a barrier, see [`Call`]) and returns
/// the answers in call order.
///
/// tokio-postgres sends a request on its future's first poll and the server runs requests in
/// the order received, so the first polls happen here, in order, one by one; only then are the
/// pending futures awaited together (each woken only by its own answer).
async fn pipeline(calls: Vec<Call<'_>>) -> Vec<Result<(), tokio_postgres::Error>> {
    // Overwritten below for every call that is not done at its first poll.
    let mut results: Vec<Result<(), tokio_postgres::Error>> = std::iter::repeat_with(|| Ok(()))
        .take(calls.len())
        .collect();
    let mut pending = FuturesUnordered::new();
    let mut calls = calls.into_iter().enumerate().peekable();
    while calls.peek().is_some() {
        std::future::poll_fn(|cx| {
            for (i, mut call) in calls.by_ref() {
                match call.request.as_mut().poll(cx) {
                    Poll::Ready(result) => results[i] = result,
                    Poll::Pending => {
                        let request = call.request;
                        pending.push(async move { (i, request.await) });
                    }
                }
                if call.barrier {
                    break;
                }
            }
            Poll::Ready(())
        })
        .await;
        while let Some((i, result)) = pending.next().await {
            results[i] = result;
        }
    }
    results
}

fn control<'a>(client: &'a Client, sql: &'static str) -> Call<'a> {
    Call {
        request: Box::pin(client.batch_execute(sql)),
        barrier: false,
    }
}

fn statement<'a, const N: usize>(
    client: &'a Client,
    statement: &'a Statement,
    params: [&'a (dyn ToSql + Sync); N],
) -> Call<'a> {
    Call {
        request: Box::pin(async move { client.execute_raw(statement, params).await.map(drop) }),
        barrier: false,
    }
}

/// Writes properties documents merged with the stored ones ([`Op::PutDeviceProperties`]):
/// inserts those that do not exist (whose device does), then locks the others (in key
/// order), reads them and writes the merge. A document another node inserts meanwhile makes
/// the insert wait for that node's commit and then counts as existing, so no write replaces
/// what another node wrote without merging it. Three round trips at most: a barrier.
fn put_device_properties<'a>(
    client: &'a Client,
    p: &'a Prepared,
    product_key: &'a [&'a str],
    device_name: &'a [&'a str],
    body: &'a [std::borrow::Cow<'a, str>],
) -> Call<'a> {
    let request = async move {
        let body: Vec<&str> = body.iter().map(|b| b.as_ref()).collect();
        let inserted: std::collections::HashSet<String> = client
            .query(
                &p.insert_device_properties,
                &[&DEVICE_PROPERTIES, &product_key, &device_name, &body],
            )
            .await?
            .iter()
            .map(|row| row.try_get::<_, String>(0))
            .collect::<Result<_, _>>()?;
        // The rest exist already (or have no device, which the update skips).
        let rest: HashMap<String, usize> = (0..body.len())
            .map(|i| (super::device_doc_id(product_key[i], device_name[i]), i))
            .filter(|(id, _)| !inserted.contains(id))
            .collect();
        if rest.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = rest.keys().map(String::as_str).collect();
        let stored = client
            .query(&p.lock_device_properties, &[&DEVICE_PROPERTIES, &ids])
            .await?;
        let (mut pks, mut dns, mut merged) = (Vec::new(), Vec::new(), Vec::new());
        for row in &stored {
            let (id, stored): (&str, &str) = (row.try_get(0)?, row.try_get(1)?);
            let Some(&i) = rest.get(id) else { continue };
            pks.push(product_key[i]);
            dns.push(device_name[i]);
            merged.push(super::device_properties::merged_body(stored, body[i]));
        }
        if merged.is_empty() {
            return Ok(());
        }
        client
            .execute(
                &p.update_device_properties,
                &[&DEVICE_PROPERTIES, &pks, &dns, &merged],
            )
            .await
            .map(drop)
    };
    Call {
        request: Box::pin(request),
        barrier: true,
    }
}

fn execute<'a>(client: &'a Client, p: &'a Prepared, step: &'a Step<'a>) -> Call<'a> {
    match step {
        Step::Single(Single::PutInstance(i)) => statement(
            client,
            &p.put_instance,
            [&i.instance_id, &i.name, &i.created_at_ms],
        ),
        Step::Single(Single::PutProduct(r)) => statement(
            client,
            &p.put_product,
            [
                &r.product_key,
                &r.product_secret,
                &r.name,
                &r.instance_id,
                &r.description,
                &r.created_at_ms,
            ],
        ),
        Step::Single(Single::DeleteInstance(iid)) => statement(client, &p.delete_instance, [iid]),
        Step::Single(Single::DeleteProduct(pk)) => statement(client, &p.delete_product, [pk]),
        Step::Single(Single::PutDevice(d, tags)) => statement(
            client,
            &p.put_device,
            [
                &d.product_key,
                &d.device_name,
                &d.device_secret,
                &d.instance_id,
                &d.enabled,
                tags,
                &d.created_at_ms,
            ],
        ),
        Step::Single(Single::DeleteDevice(pk, dn)) => statement(client, &p.delete_device, [pk, dn]),
        Step::Single(Single::DeleteDoc(kind, id)) => statement(client, &p.delete_doc, [kind, id]),
        Step::Single(Single::DeleteDeviceProperties(pk, dn)) => statement(
            client,
            &p.delete_device_properties,
            [&DEVICE_PROPERTIES, pk, dn],
        ),
        Step::Single(Single::ReleaseNode(node, before_ms, at_ms)) => {
            statement(client, &p.release_node, [node, before_ms, at_ms])
        }
        Step::Single(Single::FeedMark(node, seq)) => statement(client, &p.feed_mark, [node, seq]),
        Step::Single(Single::Fence(lease, node, epoch)) => {
            statement(client, &p.fence, [lease, node, epoch])
        }
        Step::Connections {
            product_key,
            device_name,
            last_seen_ms,
            client_ip,
            epoch,
            online,
            node,
        } => statement(
            client,
            &p.set_connections,
            [
                product_key,
                device_name,
                last_seen_ms,
                client_ip,
                epoch,
                online,
                node,
            ],
        ),
        Step::Versions {
            product_key,
            device_name,
            module,
            version,
            reported_at_ms,
        } => statement(
            client,
            &p.set_versions,
            [product_key, device_name, module, version, reported_at_ms],
        ),
        Step::Docs { kind, id, body } => statement(client, &p.put_docs, [kind, id, body]),
        Step::DeviceProperties {
            product_key,
            device_name,
            body,
        } => put_device_properties(client, p, product_key, device_name, body),
    }
}

/// Whether `e` is a statement's own failure (a constraint, bad data) that rolls back only what
/// ran since the last savepoint, as opposed to a lost connection or a failure the transaction
/// as a whole must share.
fn is_statement_error(e: &tokio_postgres::Error, client: &Client) -> bool {
    !client.is_closed()
        && e.as_db_error().is_some_and(|db| {
            db.parsed_severity() == Some(Severity::Error)
                // "current transaction is aborted": an earlier failure we did not attribute.
                && *db.code() != SqlState::IN_FAILED_SQL_TRANSACTION
        })
}

/// What a request of the replay pipeline belongs to.
#[derive(Clone, Copy)]
enum Owner {
    Control,
    /// A data statement of submission `i`.
    Submission(usize),
}

/// The transaction of one drain (see the module docs).
async fn commit_submissions(
    session: &Session,
    submissions: &[&[Op]],
    statements: &mut u64,
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    let client = &session.client;
    let replay_prefix: &[&'static str] = match plan(submissions.iter().flat_map(|ops| ops.iter())) {
        // Every op could be encoded: try everything at once, COMMIT included. If a statement
        // fails, PostgreSQL aborts the transaction and answers the COMMIT with a ROLLBACK
        // (not an error), so nothing of it is kept; only when every statement succeeded does
        // the COMMIT's own answer say whether it committed.
        Ok(steps) => {
            let calls: Vec<Call<'_>> = std::iter::once(control(client, "BEGIN"))
                .chain(steps.iter().map(|s| execute(client, &session.prepared, s)))
                .chain(std::iter::once(control(client, "COMMIT")))
                .collect();
            *statements += calls.len() as u64;
            let mut outcomes = pipeline(calls).await;
            let committed = outcomes.pop().unwrap_or(Ok(()));
            match outcomes
                .into_iter()
                .enumerate()
                .find_map(|(i, r)| r.err().map(|e| (i, e)))
            {
                None => {
                    committed?;
                    return Ok(submissions.iter().map(|_| Ok(())).collect());
                }
                // Rolled back by the COMMIT already.
                Some((i, e)) if i > 0 && is_statement_error(&e, client) => {
                    if let [_] = submissions {
                        // Nothing else to save: the one submission is the failing one.
                        return Ok(vec![Err(e.into())]);
                    }
                    &["BEGIN"]
                }
                Some((_, e)) => return Err(e.into()),
            }
        }
        // One submission cannot be encoded; the replay reports it alone.
        Err(_) => &["BEGIN"],
    };
    replay(session, submissions, replay_prefix, statements).await
}

/// Applies `submissions` in one transaction, each in its own savepoint. The requests are
/// pipelined up to the first failing submission; it is rolled back to its savepoint and the
/// rest is sent again from the next submission on.
async fn replay(
    session: &Session,
    submissions: &[&[Op]],
    first_prefix: &[&'static str],
    statements: &mut u64,
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    let client = &session.client;
    let plans: Vec<Result<Vec<Step<'_>>, StoreError>> =
        submissions.iter().map(|ops| plan(ops.iter())).collect();
    let decided = |plan: &Result<Vec<Step<'_>>, StoreError>| match plan {
        Ok(_) => Ok(()),
        Err(e) => Err(e.clone()),
    };
    let mut results = Vec::with_capacity(submissions.len());
    let mut prefix = first_prefix;
    let mut next = 0;
    loop {
        let mut calls: Vec<Call<'_>> = Vec::new();
        let mut owners = Vec::new();
        for sql in prefix {
            calls.push(control(client, sql));
            owners.push(Owner::Control);
        }
        for (i, plan) in plans.iter().enumerate().skip(next) {
            let Ok(steps) = plan else { continue };
            if steps.is_empty() {
                continue;
            }
            calls.push(control(client, "SAVEPOINT fleetgate_submission"));
            owners.push(Owner::Control);
            for step in steps {
                calls.push(execute(client, &session.prepared, step));
                owners.push(Owner::Submission(i));
            }
            calls.push(control(client, "RELEASE SAVEPOINT fleetgate_submission"));
            owners.push(Owner::Control);
        }
        *statements += calls.len() as u64;
        let outcomes = pipeline(calls).await;
        match outcomes
            .into_iter()
            .zip(owners)
            .find_map(|(r, owner)| r.err().map(|e| (owner, e)))
        {
            None => {
                results.extend(plans[next..].iter().map(decided));
                break;
            }
            Some((Owner::Submission(i), e)) if is_statement_error(&e, client) => {
                results.extend(plans[next..i].iter().map(decided));
                results.push(Err(e.into()));
                next = i + 1;
                prefix = &[
                    "ROLLBACK TO SAVEPOINT fleetgate_submission",
                    "RELEASE SAVEPOINT fleetgate_submission",
                ];
            }
            Some((_, e)) => return Err(e.into()),
        }
    }
    *statements += 1;
    client.batch_execute("COMMIT").await?;
    Ok(results)
}

/// The columns [`instance_record`] reads, in its order.
const INSTANCE_COLUMNS: &str = "instance_id, name, created_at_ms";

fn instance_record(r: &tokio_postgres::Row) -> Result<InstanceRecord, tokio_postgres::Error> {
    Ok(InstanceRecord {
        instance_id: r.try_get(0)?,
        name: r.try_get(1)?,
        created_at_ms: r.try_get(2)?,
    })
}

/// The columns [`product_record`] reads, in its order.
const PRODUCT_COLUMNS: &str =
    "product_key, product_secret, name, instance_id, description, created_at_ms";

fn product_record(r: &tokio_postgres::Row) -> Result<ProductRecord, tokio_postgres::Error> {
    Ok(ProductRecord {
        product_key: r.try_get(0)?,
        product_secret: r.try_get(1)?,
        name: r.try_get(2)?,
        instance_id: r.try_get(3)?,
        description: r.try_get(4)?,
        created_at_ms: r.try_get(5)?,
    })
}

/// The columns [`stored_device`] reads, in its order.
const DEVICE_COLUMNS: &str = "product_key, device_name, device_secret, instance_id, enabled, \
     tags, created_at_ms, last_seen_ms, client_ip, conn_epoch, epoch_seen";

/// A device row of [`DEVICE_COLUMNS`] (versions are added by [`add_versions`]).
fn stored_device(r: &tokio_postgres::Row) -> Result<StoredDevice, StoreError> {
    let tags: BTreeMap<String, String> =
        serde_json::from_str(r.try_get(5)?).map_err(|e| StoreError::Corrupt {
            what: "device tags",
            message: e.to_string(),
        })?;
    Ok(StoredDevice {
        record: DeviceRecord {
            product_key: r.try_get(0)?,
            device_name: r.try_get(1)?,
            device_secret: r.try_get(2)?,
            instance_id: r.try_get(3)?,
            enabled: r.try_get(4)?,
            tags,
            created_at_ms: r.try_get(6)?,
        },
        last_seen_ms: r.try_get(7)?,
        client_ip: r.try_get(8)?,
        versions: BTreeMap::new(),
        session: r.try_get::<_, Option<i64>>(9)?.map(|e| e as u64),
        epoch_seen: r.try_get::<_, i64>(10)? as u64,
    })
}

/// Adds `(product_key, device_name, module, version)` rows to their devices.
fn add_versions(
    devices: &mut [StoredDevice],
    rows: &[tokio_postgres::Row],
) -> Result<(), StoreError> {
    let index: HashMap<(String, String), usize> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            (
                (d.record.product_key.clone(), d.record.device_name.clone()),
                i,
            )
        })
        .collect();
    for r in rows {
        let key: (String, String) = (r.try_get(0)?, r.try_get(1)?);
        // The foreign key guarantees the device exists.
        if let Some(&i) = index.get(&key) {
            devices[i].versions.insert(r.try_get(2)?, r.try_get(3)?);
        }
    }
    Ok(())
}

pub(super) async fn load_snapshot(client: &Client) -> Result<Snapshot, StoreError> {
    // One snapshot for all four reads, however other nodes write meanwhile.
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let instances_sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances ORDER BY instance_id");
    let products_sql = format!("SELECT {PRODUCT_COLUMNS} FROM products ORDER BY product_key");
    let devices_sql =
        format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY product_key, device_name");
    let (instance_rows, product_rows, device_rows, version_rows, feed_rows) = tokio::try_join!(
        client.query(&instances_sql, &[]),
        client.query(&products_sql, &[]),
        client.query(&devices_sql, &[]),
        client.query(
            "SELECT product_key, device_name, module, version FROM device_versions",
            &[]
        ),
        client.query("SELECT node, seq FROM cluster_feed", &[]),
    )?;
    client.batch_execute("COMMIT").await?;

    let instances = instance_rows
        .iter()
        .map(instance_record)
        .collect::<Result<Vec<_>, _>>()?;
    let products = product_rows
        .iter()
        .map(product_record)
        .collect::<Result<Vec<_>, _>>()?;
    let mut devices = device_rows
        .iter()
        .map(stored_device)
        .collect::<Result<Vec<_>, StoreError>>()?;
    add_versions(&mut devices, &version_rows)?;
    let feed_cuts = feed_rows
        .iter()
        .map(|r| {
            Ok((
                r.try_get::<_, i16>(0)? as u16,
                r.try_get::<_, i64>(1)? as u64,
            ))
        })
        .collect::<Result<BTreeMap<_, _>, tokio_postgres::Error>>()?;
    Ok(Snapshot {
        instances,
        products,
        devices,
        feed_cuts,
    })
}

async fn load_documents(client: &Client, kind: &str) -> Result<Vec<(String, String)>, StoreError> {
    client
        .query(
            "SELECT id, body FROM documents WHERE kind = $1 ORDER BY id",
            &[&kind],
        )
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

impl StoreBackend for PostgresBackend {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let result = {
            let (runtime, session) = self.session()?;
            runtime.block_on(load_snapshot(&session.client))
        };
        self.keep_if_ok(result)
    }

    fn load_documents(&mut self, kind: &str) -> Result<Vec<(String, String)>, StoreError> {
        let result = {
            let (runtime, session) = self.session()?;
            runtime.block_on(load_documents(&session.client, kind))
        };
        self.keep_if_ok(result)
    }

    fn commit(&mut self, submissions: &[&[Op]]) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        self.ensure_session()?;
        let Some(session) = &self.session else {
            return Err(StoreError::Closed);
        };
        let outcome = self.runtime.block_on(commit_submissions(
            session,
            submissions,
            &mut self.statements,
        ));
        // On `Err` the transaction may still be open on the server; closing the connection
        // ends it.
        self.keep_if_ok(outcome)
    }
}

#[cfg(test)]
mod tests;
