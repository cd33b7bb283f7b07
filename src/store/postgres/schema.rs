//! The PostgreSQL schema: numbered steps, applied once each under an advisory lock so that
//! nodes starting together migrate the database exactly once.

use super::StoreError;
use tokio_postgres::Client;

/// Schema steps; step `i` brings the database to version `i + 1`. Append only. The numbers
/// match SQLite's where the steps correspond.
const MIGRATIONS: &[&str] = &[
    V1_REGISTRY,
    V2_DOCUMENTS,
    V3_CLUSTER,
    V4_LEASES,
    V5_OUTBOX,
    V6_FILES,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Key of the advisory lock that serialises migrations across nodes ("fleetgat" in ASCII):
/// any constant works as long as every fleetgate build uses the same one.
pub(super) const MIGRATION_LOCK: i64 = 0x666c_6565_7467_6174;

const V1_REGISTRY: &str = r#"
CREATE TABLE instances (
    instance_id   TEXT COLLATE "C" PRIMARY KEY,
    name          TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
CREATE TABLE products (
    product_key    TEXT COLLATE "C" PRIMARY KEY,
    product_secret TEXT NOT NULL,
    name           TEXT NOT NULL,
    instance_id    TEXT COLLATE "C" NOT NULL REFERENCES instances (instance_id),
    description    TEXT,
    created_at_ms  BIGINT NOT NULL
);
CREATE TABLE devices (
    product_key   TEXT COLLATE "C" NOT NULL REFERENCES products (product_key),
    device_name   TEXT COLLATE "C" NOT NULL,
    device_secret TEXT NOT NULL,
    instance_id   TEXT COLLATE "C" NOT NULL REFERENCES instances (instance_id),
    enabled       BOOLEAN NOT NULL,
    -- JSON object; tags are always read and written whole and filtered in memory.
    tags          TEXT NOT NULL DEFAULT '{}',
    last_seen_ms  BIGINT,
    client_ip     TEXT,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (product_key, device_name)
);
CREATE TABLE device_versions (
    product_key    TEXT COLLATE "C" NOT NULL,
    device_name    TEXT COLLATE "C" NOT NULL,
    module         TEXT COLLATE "C" NOT NULL,
    version        TEXT NOT NULL,
    reported_at_ms BIGINT NOT NULL,
    PRIMARY KEY (product_key, device_name, module),
    FOREIGN KEY (product_key, device_name)
        REFERENCES devices (product_key, device_name) ON DELETE CASCADE
);
"#;

/// Documents of modules that own their state, keyed by `(kind, id)` ([`Op::PutDoc`]).
const V2_DOCUMENTS: &str = r#"
CREATE TABLE documents (
    kind TEXT COLLATE "C" NOT NULL,
    id   TEXT COLLATE "C" NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, id)
);
"#;

/// Cluster mode (`crate::cluster`): which session holds each device, and each node's
/// position in the change feed. Step 3 exists only here: a single SQLite node keeps no
/// sessions across restarts and has no feed.
const V3_CLUSTER: &str = r#"
ALTER TABLE devices
    ADD COLUMN conn_epoch BIGINT,
    ADD COLUMN conn_node  SMALLINT,
    ADD COLUMN epoch_seen BIGINT NOT NULL DEFAULT 0;
CREATE INDEX devices_by_conn_node ON devices (conn_node) WHERE conn_node IS NOT NULL;
CREATE TABLE cluster_feed (
    node SMALLINT PRIMARY KEY,
    seq  BIGINT NOT NULL
);
"#;

/// Cluster mode: leases (`crate::cluster::lease`) — which node drives the engines, the
/// outbox… — and the fence every write of a lease holder carries: it raises (rolling the
/// submission back) unless the lease is still held by that node with that epoch, so a node
/// whose lease ran out cannot overwrite what the next holder does. Times are the server's.
const V4_LEASES: &str = r#"
CREATE TABLE cluster_leases (
    name       TEXT COLLATE "C" PRIMARY KEY,
    holder     SMALLINT NOT NULL,
    epoch      BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE FUNCTION fleetgate_fence(lease TEXT, node SMALLINT, lease_epoch BIGINT) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM cluster_leases
     WHERE name = lease AND holder = node AND epoch = lease_epoch AND expires_at > now()
       FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'lease % (epoch %) is not held by node %', lease, lease_epoch, node
            USING ERRCODE = 'FG001';
    END IF;
END
$$;
"#;

/// Cluster mode: the forwarding outbox shared by every node (`crate::forwarder`, module
/// `pg_outbox`), so a post acknowledged by a node survives that node. One row per message and
/// target instance; `seq` is the publish order and part of the AMQP message id, `origin` the
/// node that took the message (each node's `amqp.outbox_max_bytes` bounds its own rows),
/// `size` what the row counts against that bound.
const V5_OUTBOX: &str = r#"
CREATE TABLE forward_outbox (
    seq              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    origin           SMALLINT NOT NULL,
    enqueued_at_ms   BIGINT NOT NULL,
    target           TEXT NOT NULL,
    kind             TEXT NOT NULL,
    product_key      TEXT NOT NULL,
    device_name      TEXT NOT NULL,
    topic            TEXT NOT NULL,
    generate_time_ms BIGINT NOT NULL,
    body             BYTEA NOT NULL,
    size             BIGINT NOT NULL
);
"#;

/// Cluster mode: firmware bytes of record (`firmware`, [`PostgresFirmware`]), finished export
/// packages (`exports`, [`PostgresExports`]) and secrets every node shares (the download-link
/// key). A blob's or package's row and all its chunks are inserted in one transaction, so a
/// committed row always has every chunk; chunks go with their row (`ON DELETE CASCADE`).
/// Chunks are stored uncompressed (`EXTERNAL`): firmware images and ZIP files rarely
/// compress, and their size is what the operator provisions for.
const V6_FILES: &str = r#"
CREATE TABLE firmware_blobs (
    sha256    TEXT COLLATE "C" PRIMARY KEY,
    size      BIGINT NOT NULL,
    chunks    INTEGER NOT NULL,
    stored_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE firmware_chunks (
    sha256 TEXT COLLATE "C" NOT NULL REFERENCES firmware_blobs (sha256) ON DELETE CASCADE,
    seq    INTEGER NOT NULL,
    bytes  BYTEA NOT NULL,
    PRIMARY KEY (sha256, seq)
);
ALTER TABLE firmware_chunks ALTER COLUMN bytes SET STORAGE EXTERNAL;
CREATE TABLE export_packages (
    id        TEXT COLLATE "C" PRIMARY KEY,
    size      BIGINT NOT NULL,
    sha256    TEXT NOT NULL,
    chunks    INTEGER NOT NULL,
    stored_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE export_chunks (
    id    TEXT COLLATE "C" NOT NULL REFERENCES export_packages (id) ON DELETE CASCADE,
    seq   INTEGER NOT NULL,
    bytes BYTEA NOT NULL,
    PRIMARY KEY (id, seq)
);
ALTER TABLE export_chunks ALTER COLUMN bytes SET STORAGE EXTERNAL;
CREATE TABLE cluster_secrets (
    name  TEXT COLLATE "C" PRIMARY KEY,
    value BYTEA NOT NULL
);
"#;

pub(super) async fn stored_version(client: &Client) -> Result<u32, StoreError> {
    let row = client
        .query_opt("SELECT version FROM schema_version WHERE id = 1", &[])
        .await?;
    let version: i32 = match row {
        Some(row) => row.try_get(0)?,
        None => 0,
    };
    u32::try_from(version).map_err(|_| StoreError::Corrupt {
        what: "schema_version",
        message: format!("negative version {version}"),
    })
}

/// Brings the schema to [`SCHEMA_VERSION`], one step per transaction, each under the migration
/// lock so that concurrent nodes apply every step exactly once.
pub(super) async fn migrate(client: &Client) -> Result<(), StoreError> {
    loop {
        client.batch_execute("BEGIN").await?;
        let step = async {
            client
                .batch_execute(&format!(
                    "SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
                     CREATE TABLE IF NOT EXISTS schema_version (
                         id      INTEGER PRIMARY KEY CHECK (id = 1),
                         version INTEGER NOT NULL
                     );"
                ))
                .await?;
            let current = stored_version(client).await?;
            if current > SCHEMA_VERSION {
                return Err(StoreError::SchemaTooNew {
                    found: current,
                    supported: SCHEMA_VERSION,
                });
            }
            let Some(step) = MIGRATIONS.get(current as usize) else {
                return Ok(None);
            };
            client.batch_execute(step).await?;
            let version = current + 1;
            client
                .execute(
                    "INSERT INTO schema_version (id, version) VALUES (1, $1)
                     ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                    &[&(version as i32)],
                )
                .await?;
            Ok(Some(version))
        }
        .await;
        match step {
            Ok(migrated) => {
                client.batch_execute("COMMIT").await?;
                match migrated {
                    Some(version) => tracing::info!(version, "store schema migrated"),
                    None => return Ok(()),
                }
            }
            Err(e) => {
                // Best effort: on a broken connection the server rolls back by itself.
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        }
    }
}
