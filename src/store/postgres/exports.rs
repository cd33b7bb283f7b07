//! [`PostgresExports`]: cluster mode's finished export packages in the shared database
//! (`export_packages`, `export_chunks`, step 6 of the schema).
//!
//! As for firmware ([`super::PostgresFirmware`]): a package is stored as [`CHUNK`]-sized
//! `bytea` rows under one `export_packages` row, all in one transaction on a connection of its
//! own, read and sent one chunk at a time; its SHA-256 is computed while it is read and kept
//! with the row, and a fetch checks it (and the size) before the caller installs the file.
//! Export packages are never deleted (as the files were not): they are what an operator
//! downloads, possibly long after the export.

use super::firmware::{fill, CHUNK};
use super::PostgresUrl;
use crate::export::SharedPackages;
use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

fn pg(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> String {
    move |e| format!("{what}: {}", super::super::pg_message(&e))
}

/// Export packages and job records in the cluster's PostgreSQL database.
pub struct PostgresExports {
    config: tokio_postgres::Config,
    /// Fetches; storing a package opens a connection of its own.
    client: Mutex<Option<Arc<Client>>>,
}

impl std::fmt::Debug for PostgresExports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostgresExports")
    }
}

impl PostgresExports {
    /// Connects (the schema is the store writer's business: it migrated before this opens).
    pub async fn connect(url: &PostgresUrl) -> Result<PostgresExports, String> {
        let mut config = url.config().clone();
        if config.get_connect_timeout().is_none() {
            // A server that does not answer fails the download instead of stalling it.
            config.connect_timeout(super::CONNECT_TIMEOUT);
        }
        let exports = PostgresExports {
            config,
            client: Mutex::new(None),
        };
        exports.client().await?;
        Ok(exports)
    }

    async fn open(&self) -> Result<Client, String> {
        let (client, connection) = self
            .config
            .connect(NoTls)
            .await
            .map_err(pg("cannot connect"))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(error = %super::super::pg_message(&error), "PostgreSQL export connection lost");
            }
        });
        Ok(client)
    }

    async fn client(&self) -> Result<Arc<Client>, String> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        let client = Arc::new(self.open().await?);
        *slot = Some(client.clone());
        Ok(client)
    }

    async fn persist_file(&self, id: &str, file: &Path) -> Result<(), String> {
        let mut input = tokio::fs::File::open(file)
            .await
            .map_err(|e| format!("cannot open {}: {e}", file.display()))?;
        let size = input
            .metadata()
            .await
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?
            .len();
        let chunks = i32::try_from(size.div_ceil(CHUNK as u64))
            .map_err(|_| format!("{size} bytes are too many chunks"))?;
        let size_i64 = i64::try_from(size).unwrap_or(i64::MAX);
        let client = self.open().await?;
        client
            .batch_execute("BEGIN")
            .await
            .map_err(pg("cannot begin"))?;
        // On any error below the connection is dropped, which rolls the transaction back.
        let fresh = client
            .query_opt(
                "INSERT INTO export_packages (id, size, sha256, chunks) VALUES ($1, $2, '', $3)
                 ON CONFLICT (id) DO NOTHING RETURNING 1",
                &[&id, &size_i64, &chunks],
            )
            .await
            .map_err(pg("cannot store the package"))?
            .is_some();
        if !fresh {
            let _ = client.batch_execute("ROLLBACK").await;
            return Ok(());
        }
        let insert = client
            .prepare("INSERT INTO export_chunks (id, seq, bytes) VALUES ($1, $2, $3)")
            .await
            .map_err(pg("cannot store the package"))?;
        let mut buf = vec![0u8; CHUNK];
        let mut sha = Sha256::new();
        let mut total = 0u64;
        for seq in 0..chunks {
            let filled = fill(&mut input, &mut buf)
                .await
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            sha.update(&buf[..filled]);
            total += filled as u64;
            client
                .execute(&insert, &[&id, &seq, &&buf[..filled]])
                .await
                .map_err(pg("cannot store a package chunk"))?;
        }
        let extra = fill(&mut input, &mut buf[..1]).await.unwrap_or(0);
        if total != size || extra != 0 {
            return Err(format!(
                "{} changed while it was stored (expected {size} bytes)",
                file.display()
            ));
        }
        client
            .execute(
                "UPDATE export_packages SET sha256 = $2 WHERE id = $1",
                &[&id, &hex::encode(sha.finalize())],
            )
            .await
            .map_err(pg("cannot store the package"))?;
        client
            .batch_execute("COMMIT")
            .await
            .map_err(pg("cannot commit the package"))
    }

    async fn fetch_file(&self, id: &str, dest: &Path) -> Result<bool, String> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt(
                "SELECT size, sha256, chunks FROM export_packages WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(pg("cannot look up the package"))?
        else {
            return Ok(false);
        };
        let (size, expected, chunks): (i64, String, i32) = (
            row.try_get(0).map_err(pg("cannot look up the package"))?,
            row.try_get(1).map_err(pg("cannot look up the package"))?,
            row.try_get(2).map_err(pg("cannot look up the package"))?,
        );
        let mut out = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dest)
            .await
            .map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
        let read = client
            .prepare("SELECT bytes FROM export_chunks WHERE id = $1 AND seq = $2")
            .await
            .map_err(pg("cannot read the package"))?;
        let mut sha = Sha256::new();
        let mut total = 0u64;
        for seq in 0..chunks {
            let row = client
                .query_opt(&read, &[&id, &seq])
                .await
                .map_err(pg("cannot read a package chunk"))?
                .ok_or_else(|| format!("chunk {seq} of {chunks} of export {id} is missing"))?;
            let bytes: &[u8] = row.try_get(0).map_err(pg("cannot read a package chunk"))?;
            total += bytes.len() as u64;
            if total > size as u64 {
                return Err(format!("export {id}'s package is longer than {size} bytes"));
            }
            sha.update(bytes);
            out.write_all(bytes)
                .await
                .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
        }
        let actual = hex::encode(sha.finalize());
        if total != size as u64 || actual != expected {
            return Err(format!(
                "export {id}'s package read from the shared database is corrupt ({total} bytes, SHA-256 {actual}; stored: {size} bytes, {expected})"
            ));
        }
        out.sync_all()
            .await
            .map_err(|e| format!("cannot fsync {}: {e}", dest.display()))?;
        Ok(true)
    }
}

impl SharedPackages for PostgresExports {
    fn persist<'a>(&'a self, id: &'a str, file: &'a Path) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.persist_file(id, file))
    }

    fn fetch<'a>(&'a self, id: &'a str, dest: &'a Path) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(self.fetch_file(id, dest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_db::{Backend, TestDb};
    use crate::store::tests::metrics;
    use crate::store::StoreLocation;

    async fn exports(db: &TestDb) -> PostgresExports {
        let StoreLocation::Postgres(url) = db.location() else {
            unreachable!("a PostgreSQL test database")
        };
        PostgresExports::connect(url).await.expect("connect")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn packages_round_trip_and_corruption_is_refused() {
        let db = TestDb::new(Backend::Postgres);
        let _store = db.open(metrics());
        let shared = exports(&db).await;
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..2 * CHUNK + 17).map(|i| (i * 7 % 251) as u8).collect();
        let file = dir.path().join("x.zip");
        std::fs::write(&file, &data).unwrap();
        shared.persist("exp-1", &file).await.unwrap();
        // Idempotent.
        shared.persist("exp-1", &file).await.unwrap();
        assert_eq!(db.query_i64("SELECT count(*) FROM export_chunks"), 3);

        let back = dir.path().join("back.zip");
        assert!(shared.fetch("exp-1", &back).await.unwrap());
        assert_eq!(std::fs::read(&back).unwrap(), data);
        assert!(!shared
            .fetch("exp-2", &dir.path().join("none"))
            .await
            .unwrap());

        db.execute(
            "UPDATE export_chunks SET bytes = set_byte(bytes, 3, get_byte(bytes, 3) # 1) WHERE seq = 0",
        );
        let err = shared
            .fetch("exp-1", &dir.path().join("bad.zip"))
            .await
            .unwrap_err();
        assert!(err.contains("corrupt"), "{err}");
    }
}
