//! The embedded backend: SQLite (bundled) in WAL mode.
//!
//! # Durability: `synchronous=FULL`
//!
//! In WAL mode `NORMAL` survives a process crash (`kill -9`) but may lose the last commits on
//! power loss or a kernel crash, because the WAL is only fsynced at checkpoints. The API promises
//! that a 201 means durable and the broker holds a device's PUBACK until its data is committed,
//! so we pick `FULL` (fsync the WAL on every commit). Group commit makes that affordable: the
//! writer pays one fsync per drained batch, not per caller. [`Synchronous::Normal`]
//! (`[store] synchronous = "normal"`) is there for deployments that accept the power-loss window
//! for more throughput on slow disks.
//!
//! # Schema
//!
//! `schema_version(id = 1, version)` records the last applied step of [`MIGRATIONS`]; steps are
//! append-only functions run in their own transaction at open. A database newer than this build
//! is refused rather than guessed at.

use super::{
    device_doc_id, DeviceRecord, InstanceRecord, Op, ProductRecord, Snapshot, StoreBackend,
    StoreError, StoredDevice, DEVICE_PROPERTIES,
};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

/// One schema step, applied inside its own transaction.
type Migration = fn(&Transaction<'_>) -> rusqlite::Result<()>;

/// Schema steps; step `i` brings the database to version `i + 1`. Append only.
const MIGRATIONS: &[Migration] = &[v1_registry, v2_documents];

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Documents of modules that own their state (OTA jobs and tasks, migrations, export jobs):
/// JSON bodies keyed by `(kind, id)`, written through [`Op::PutDoc`].
fn v2_documents(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE TABLE documents (
             kind TEXT NOT NULL,
             id   TEXT NOT NULL,
             body TEXT NOT NULL,
             PRIMARY KEY (kind, id)
         ) WITHOUT ROWID;",
    )
}

fn v1_registry(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE TABLE instances (
             instance_id   TEXT PRIMARY KEY NOT NULL,
             name          TEXT NOT NULL,
             created_at_ms INTEGER NOT NULL
         );
         CREATE TABLE products (
             product_key    TEXT PRIMARY KEY NOT NULL,
             product_secret TEXT NOT NULL,
             name           TEXT NOT NULL,
             instance_id    TEXT NOT NULL REFERENCES instances(instance_id),
             description    TEXT,
             created_at_ms  INTEGER NOT NULL
         );
         CREATE TABLE devices (
             product_key   TEXT NOT NULL REFERENCES products(product_key),
             device_name   TEXT NOT NULL,
             device_secret TEXT NOT NULL,
             instance_id   TEXT NOT NULL REFERENCES instances(instance_id),
             enabled       INTEGER NOT NULL,
             -- JSON object; tags are always read and written whole and filtered in memory.
             tags          TEXT NOT NULL DEFAULT '{}',
             last_seen_ms  INTEGER,
             client_ip     TEXT,
             created_at_ms INTEGER NOT NULL,
             PRIMARY KEY (product_key, device_name)
         ) WITHOUT ROWID;
         CREATE TABLE device_versions (
             product_key    TEXT NOT NULL,
             device_name    TEXT NOT NULL,
             module         TEXT NOT NULL,
             version        TEXT NOT NULL,
             reported_at_ms INTEGER NOT NULL,
             PRIMARY KEY (product_key, device_name, module),
             FOREIGN KEY (product_key, device_name)
                 REFERENCES devices(product_key, device_name) ON DELETE CASCADE
         ) WITHOUT ROWID;",
    )
}

/// `PRAGMA synchronous` level; see the module docs for why the default is `Full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Normal,
    #[default]
    Full,
}

/// SQLite implementation of [`StoreBackend`].
pub struct SqliteBackend {
    conn: Connection,
}

impl SqliteBackend {
    /// Opens or creates the database file, sets the pragmas and migrates the schema.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<SqliteBackend, StoreError> {
        let conn = Connection::open(path)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, "SQLite refused WAL journal mode");
        }
        let level = match synchronous {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", level)?;
        Self::init(conn)
    }

    /// A private in-memory database (tests).
    pub fn open_in_memory() -> Result<SqliteBackend, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<SqliteBackend, StoreError> {
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Only our writer uses the file, but an operator's `sqlite3` or a backup may briefly lock it.
        conn.busy_timeout(Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(SqliteBackend { conn })
    }

    /// The schema version stored in the database.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        Ok(stored_version(&self.conn)?)
    }
}

fn stored_version(conn: &Connection) -> rusqlite::Result<u32> {
    Ok(conn
        .query_row(
            "SELECT version FROM schema_version WHERE id = 1",
            [],
            |row| row.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
             id      INTEGER PRIMARY KEY CHECK (id = 1),
             version INTEGER NOT NULL
         )",
    )?;
    let current = stored_version(conn)?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    for (index, step) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = index as u32 + 1;
        let tx = conn.transaction()?;
        step(&tx)?;
        tx.execute(
            "INSERT INTO schema_version (id, version) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            [version],
        )?;
        tx.commit()?;
        tracing::info!(version, "store schema migrated");
    }
    Ok(())
}

fn apply(conn: &Connection, op: &Op) -> Result<(), StoreError> {
    match op {
        Op::PutInstance(i) => {
            conn.prepare_cached(
                "INSERT INTO instances (instance_id, name, created_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (instance_id) DO UPDATE SET name = excluded.name",
            )?
            .execute(params![i.instance_id, i.name, i.created_at_ms])?;
        }
        Op::PutProduct(p) => {
            conn.prepare_cached(
                "INSERT INTO products (product_key, product_secret, name, instance_id, description, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (product_key) DO UPDATE SET product_secret = excluded.product_secret,
                     name = excluded.name, instance_id = excluded.instance_id, description = excluded.description",
            )?
            .execute(params![p.product_key, p.product_secret, p.name, p.instance_id, p.description, p.created_at_ms])?;
        }
        Op::DeleteInstance { instance_id } => {
            conn.prepare_cached("DELETE FROM instances WHERE instance_id = ?1")?
                .execute([instance_id])?;
        }
        Op::DeleteProduct { product_key } => {
            conn.prepare_cached("DELETE FROM products WHERE product_key = ?1")?
                .execute([product_key])?;
        }
        Op::PutDevice(d) => {
            let tags = serde_json::to_string(&d.tags).map_err(|e| StoreError::Corrupt {
                what: "device tags",
                message: e.to_string(),
            })?;
            conn.prepare_cached(
                "INSERT INTO devices (product_key, device_name, device_secret, instance_id, enabled, tags, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (product_key, device_name) DO UPDATE SET device_secret = excluded.device_secret,
                     instance_id = excluded.instance_id, enabled = excluded.enabled, tags = excluded.tags",
            )?
            .execute(params![d.product_key, d.device_name, d.device_secret, d.instance_id, d.enabled, tags, d.created_at_ms])?;
        }
        Op::DeleteDevice {
            product_key,
            device_name,
        } => {
            conn.prepare_cached("DELETE FROM devices WHERE product_key = ?1 AND device_name = ?2")?
                .execute([product_key, device_name])?;
            conn.prepare_cached("DELETE FROM documents WHERE kind = ?1 AND id = ?2")?
                .execute(params![
                    DEVICE_PROPERTIES,
                    device_doc_id(product_key, device_name)
                ])?;
        }
        Op::SetConnection {
            product_key,
            device_name,
            last_seen_ms,
            client_ip,
            session: _,
        } => {
            conn.prepare_cached(
                "UPDATE devices SET last_seen_ms = ?3, client_ip = ?4 WHERE product_key = ?1 AND device_name = ?2",
            )?
            .execute(params![product_key, device_name, last_seen_ms, client_ip])?;
        }
        Op::SetVersion {
            product_key,
            device_name,
            module,
            version,
            reported_at_ms,
        } => {
            conn.prepare_cached(
                "INSERT INTO device_versions (product_key, device_name, module, version, reported_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (product_key, device_name, module) DO UPDATE SET version = excluded.version,
                     reported_at_ms = excluded.reported_at_ms",
            )?
            .execute(params![product_key, device_name, module, version, reported_at_ms])?;
        }
        // A single node keeps no sessions across restarts, and has no change feed.
        Op::ReleaseNode { .. } | Op::FeedMark { .. } | Op::Fence { .. } => {}
        Op::PutDoc { kind, id, body } => {
            conn.prepare_cached(
                "INSERT INTO documents (kind, id, body) VALUES (?1, ?2, ?3)
                 ON CONFLICT (kind, id) DO UPDATE SET body = excluded.body",
            )?
            .execute(params![kind, id, body])?;
        }
        Op::DeleteDoc { kind, id } => {
            conn.prepare_cached("DELETE FROM documents WHERE kind = ?1 AND id = ?2")?
                .execute(params![kind, id])?;
        }
        Op::PutDeviceProperties {
            product_key,
            device_name,
            body,
        } => {
            // One writer: read, merge and write need no lock of their own.
            let id = device_doc_id(product_key, device_name);
            let stored: Option<String> = conn
                .prepare_cached("SELECT body FROM documents WHERE kind = ?1 AND id = ?2")?
                .query_row(params![DEVICE_PROPERTIES, id], |r| r.get(0))
                .optional()?;
            let body = match stored {
                Some(stored) => super::device_properties::merged_body(&stored, body),
                None => body.clone(),
            };
            conn.prepare_cached(
                "INSERT INTO documents (kind, id, body)
                 SELECT ?1, ?2, ?3 WHERE EXISTS
                     (SELECT 1 FROM devices WHERE product_key = ?4 AND device_name = ?5)
                 ON CONFLICT (kind, id) DO UPDATE SET body = excluded.body",
            )?
            .execute(params![
                DEVICE_PROPERTIES,
                id,
                body,
                product_key,
                device_name
            ])?;
        }
    }
    Ok(())
}

impl StoreBackend for SqliteBackend {
    fn load_documents(&mut self, kind: &str) -> Result<Vec<(String, String)>, StoreError> {
        let docs = self
            .conn
            .prepare_cached("SELECT id, body FROM documents WHERE kind = ?1 ORDER BY id")?
            .query_map([kind], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(docs)
    }

    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let conn = &self.conn;
        let instances = conn
            .prepare("SELECT instance_id, name, created_at_ms FROM instances ORDER BY instance_id")?
            .query_map([], |r| {
                Ok(InstanceRecord {
                    instance_id: r.get(0)?,
                    name: r.get(1)?,
                    created_at_ms: r.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let products = conn
            .prepare(
                "SELECT product_key, product_secret, name, instance_id, description, created_at_ms
                 FROM products ORDER BY product_key",
            )?
            .query_map([], |r| {
                Ok(ProductRecord {
                    product_key: r.get(0)?,
                    product_secret: r.get(1)?,
                    name: r.get(2)?,
                    instance_id: r.get(3)?,
                    description: r.get(4)?,
                    created_at_ms: r.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;

        let mut devices = Vec::new();
        let mut stmt = conn.prepare(
            "SELECT product_key, device_name, device_secret, instance_id, enabled, tags, created_at_ms,
                    last_seen_ms, client_ip
             FROM devices ORDER BY product_key, device_name",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let tags_json: String = r.get(5)?;
            let tags: BTreeMap<String, String> =
                serde_json::from_str(&tags_json).map_err(|e| StoreError::Corrupt {
                    what: "device tags",
                    message: e.to_string(),
                })?;
            devices.push(StoredDevice {
                record: DeviceRecord {
                    product_key: r.get(0)?,
                    device_name: r.get(1)?,
                    device_secret: r.get(2)?,
                    instance_id: r.get(3)?,
                    enabled: r.get(4)?,
                    tags,
                    created_at_ms: r.get(6)?,
                },
                last_seen_ms: r.get(7)?,
                client_ip: r.get(8)?,
                versions: BTreeMap::new(),
                session: None,
                epoch_seen: 0,
            });
        }
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
        let mut stmt =
            conn.prepare("SELECT product_key, device_name, module, version FROM device_versions")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let key: (String, String) = (r.get(0)?, r.get(1)?);
            // The foreign key guarantees the device exists.
            if let Some(&i) = index.get(&key) {
                devices[i].versions.insert(r.get(2)?, r.get(3)?);
            }
        }
        Ok(Snapshot {
            instances,
            products,
            devices,
            feed_cuts: BTreeMap::new(),
        })
    }

    fn commit(&mut self, submissions: &[&[Op]]) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let mut tx = self.conn.transaction()?;
        let mut results = Vec::with_capacity(submissions.len());
        for ops in submissions {
            if let [op] = ops {
                // One statement needs no savepoint: SQLite rolls a failing statement back by
                // itself (constraint errors abort the statement, not the transaction). Errors
                // that roll the whole transaction back (I/O, out of memory) leave autocommit on;
                // the transaction is then reported failed as a whole.
                match apply(&tx, op) {
                    Ok(()) => results.push(Ok(())),
                    Err(e) if tx.is_autocommit() => return Err(e),
                    Err(e) => results.push(Err(e)),
                }
                continue;
            }
            // Each submission of several statements in its own savepoint: a failing one is
            // rolled back alone.
            let sp = tx.savepoint()?;
            match ops.iter().try_for_each(|op| apply(&sp, op)) {
                Ok(()) => {
                    sp.commit()?;
                    results.push(Ok(()));
                }
                Err(e) => {
                    // Rolls back to the savepoint; if even that fails the transaction must not commit.
                    sp.finish()?;
                    results.push(Err(e));
                }
            }
        }
        tx.commit()?;
        Ok(results)
    }
}
