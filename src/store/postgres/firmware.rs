//! [`PostgresFirmware`]: cluster mode's firmware of record in the shared database
//! (`firmware_blobs`, `firmware_chunks`, step 6 of the schema) and the cluster's download-link
//! key (`cluster_secrets`).
//!
//! - **Chunks.** A blob is stored as [`CHUNK`]-sized `bytea` rows `(sha256, seq)` under one
//!   `firmware_blobs` row `(sha256, size, chunks)`, all inserted in one transaction on a
//!   connection of its own: a committed blob row always has every chunk, and a node dying
//!   mid-upload leaves nothing. The file is read one chunk at a time and each insert awaited
//!   before the next read, so memory does not depend on the package size. Two uploads of the
//!   same bytes meet at the blob row's primary key: the second waits for the first to commit,
//!   then finds the row and stores nothing.
//! - **Fetch.** One query per chunk, in order, on the shared reading connection, each chunk
//!   handed to the caller's writer before the next is asked for.
//! - **Release and sweep.** Bytes are removed only when no `ota.firmware` document of record
//!   names their SHA-256, decided by the `DELETE` itself, so a package another node created
//!   meanwhile keeps its bytes. [`PostgresFirmware::sweep`] (at start) removes blobs nobody
//!   refers to that are older than [`ORPHAN_AGE`]: left by a node that died between storing
//!   the bytes and committing the metadata, or by a release that failed. The age spares
//!   uploads in progress elsewhere.
//! - **Key.** The first node to start generates 32 random bytes and inserts them with
//!   `ON CONFLICT DO NOTHING`; every node reads back whichever insert won.

use super::PostgresUrl;
use crate::ota::firmware::{BlobError, BlobWriter, DownloadKey, SharedFirmware, DOC_KIND};
use futures_util::future::BoxFuture;
use rand::RngCore;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

/// Bytes per chunk row.
pub const CHUNK: usize = 1024 * 1024;
/// Blobs nobody refers to are swept once they are this old.
pub const ORPHAN_AGE: Duration = Duration::from_secs(3600);
/// Name of the download-link key in `cluster_secrets`.
const DOWNLOAD_KEY: &str = "download-key";

/// The "no package of record names `b.sha256`" condition of releases and sweeps (`$kind` is
/// the firmware document kind). Documents of other kinds are never parsed.
const UNREFERENCED: &str = "NOT EXISTS (SELECT 1 FROM documents d WHERE d.kind = $KIND \
     AND (CASE WHEN d.kind = $KIND THEN d.body::jsonb ->> 'sha256' END) = b.sha256)";

fn shared_err(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> BlobError {
    move |e| BlobError::Shared {
        what,
        message: super::super::pg_message(&e),
    }
}

/// Reads from `input` until `buf` is full or the file ends; returns how many bytes.
pub(super) async fn fill(input: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = input.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Firmware bytes and the download key in the cluster's PostgreSQL database.
pub struct PostgresFirmware {
    config: tokio_postgres::Config,
    /// Reads, releases and the key; an upload opens a connection of its own (its transaction
    /// must not hold this one).
    client: Mutex<Option<Arc<Client>>>,
}

impl std::fmt::Debug for PostgresFirmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostgresFirmware")
    }
}

impl PostgresFirmware {
    /// Connects (the schema is the store writer's business: it migrated before this opens).
    pub async fn connect(url: &PostgresUrl) -> Result<PostgresFirmware, BlobError> {
        let mut config = url.config().clone();
        if config.get_connect_timeout().is_none() {
            // A server that does not answer fails the download instead of stalling it.
            config.connect_timeout(super::CONNECT_TIMEOUT);
        }
        let firmware = PostgresFirmware {
            config,
            client: Mutex::new(None),
        };
        firmware.client().await?;
        Ok(firmware)
    }

    async fn open(&self) -> Result<Client, BlobError> {
        let (client, connection) = self
            .config
            .connect(NoTls)
            .await
            .map_err(shared_err("cannot connect"))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(error = %super::super::pg_message(&error), "PostgreSQL firmware connection lost");
            }
        });
        Ok(client)
    }

    /// The shared connection, opened anew if the last one is gone.
    async fn client(&self) -> Result<Arc<Client>, BlobError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        let client = Arc::new(self.open().await?);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// The cluster's download-link key, generated by the first node that asks.
    pub async fn download_key(&self) -> Result<DownloadKey, BlobError> {
        Ok(DownloadKey::from_bytes(
            self.cluster_secret(DOWNLOAD_KEY).await?,
        ))
    }

    /// The cluster's 32-byte secret `name` (`cluster_secrets`): the first node to ask creates
    /// it at random (`ON CONFLICT DO NOTHING`), every node reads back the one that won.
    pub async fn cluster_secret(&self, name: &str) -> Result<[u8; 32], BlobError> {
        let client = self.client().await?;
        let mut fresh = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut fresh);
        client
            .execute(
                "INSERT INTO cluster_secrets (name, value) VALUES ($1, $2)
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &&fresh[..]],
            )
            .await
            .map_err(shared_err("cannot store a cluster secret"))?;
        let row = client
            .query_one(
                "SELECT value FROM cluster_secrets WHERE name = $1",
                &[&name],
            )
            .await
            .map_err(shared_err("cannot read a cluster secret"))?;
        let value: &[u8] = row
            .try_get(0)
            .map_err(shared_err("cannot read a cluster secret"))?;
        value.try_into().map_err(|_| BlobError::Shared {
            what: "a secret in cluster_secrets",
            message: format!("{name}: {} bytes instead of 32", value.len()),
        })
    }

    /// Removes blobs no package refers to that are older than `age`; returns how many.
    pub async fn sweep(&self, age: Duration) -> Result<u64, BlobError> {
        let client = self.client().await?;
        let sql = format!(
            "DELETE FROM firmware_blobs b
             WHERE b.stored_at < now() - make_interval(secs => $1) AND {}",
            UNREFERENCED.replace("$KIND", "$2")
        );
        client
            .execute(&sql, &[&age.as_secs_f64(), &DOC_KIND])
            .await
            .map_err(shared_err("cannot sweep unreferenced firmware"))
    }

    async fn persist_file(&self, sha256: &str, size: u64, file: &Path) -> Result<(), BlobError> {
        let chunks = i32::try_from(size.div_ceil(CHUNK as u64)).map_err(|_| BlobError::Shared {
            what: "cannot store firmware",
            message: format!("{size} bytes are too many chunks"),
        })?;
        let size_i64 = i64::try_from(size).unwrap_or(i64::MAX);
        // Cheap when the bytes are stored already (the second call of an upload, a package
        // uploaded twice): no connection of its own, no file read.
        let shared = self.client().await?;
        if shared
            .query_opt("SELECT 1 FROM firmware_blobs WHERE sha256 = $1", &[&sha256])
            .await
            .map_err(shared_err("cannot look up firmware"))?
            .is_some()
        {
            return Ok(());
        }
        drop(shared);
        let mut input = tokio::fs::File::open(file)
            .await
            .map_err(|source| BlobError::Io {
                what: "cannot open",
                path: file.to_path_buf(),
                source,
            })?;
        let client = self.open().await?;
        let transfer = async {
            client
                .batch_execute("BEGIN")
                .await
                .map_err(shared_err("cannot begin"))?;
            let fresh = client
                .query_opt(
                    "INSERT INTO firmware_blobs (sha256, size, chunks) VALUES ($1, $2, $3)
                     ON CONFLICT (sha256) DO NOTHING RETURNING 1",
                    &[&sha256, &size_i64, &chunks],
                )
                .await
                .map_err(shared_err("cannot store firmware"))?
                .is_some();
            if !fresh {
                // Stored by a concurrent upload of the same bytes, which committed.
                return Ok(false);
            }
            let insert = client
                .prepare("INSERT INTO firmware_chunks (sha256, seq, bytes) VALUES ($1, $2, $3)")
                .await
                .map_err(shared_err("cannot store firmware"))?;
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            for seq in 0..chunks {
                let filled = fill(&mut input, &mut buf)
                    .await
                    .map_err(|source| BlobError::Io {
                        what: "cannot read",
                        path: file.to_path_buf(),
                        source,
                    })?;
                total += filled as u64;
                client
                    .execute(&insert, &[&sha256, &seq, &&buf[..filled]])
                    .await
                    .map_err(shared_err("cannot store a firmware chunk"))?;
            }
            let extra = input.read(&mut buf[..1]).await.unwrap_or(0);
            if total != size || extra != 0 {
                return Err(BlobError::Io {
                    what: "changed while it was stored:",
                    path: file.to_path_buf(),
                    source: std::io::Error::other(format!("expected {size} bytes")),
                });
            }
            Ok(true)
        }
        .await;
        match transfer {
            Ok(true) => client
                .batch_execute("COMMIT")
                .await
                .map_err(shared_err("cannot commit firmware")),
            Ok(false) => {
                let _ = client.batch_execute("ROLLBACK").await;
                Ok(())
            }
            // Dropping the connection rolls the transaction back.
            Err(e) => Err(e),
        }
    }

    async fn fetch_into(&self, sha256: &str, into: &mut BlobWriter) -> Result<(), BlobError> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt(
                "SELECT chunks FROM firmware_blobs WHERE sha256 = $1",
                &[&sha256],
            )
            .await
            .map_err(shared_err("cannot look up firmware"))?
        else {
            return Err(BlobError::Missing {
                sha256: sha256.to_owned(),
            });
        };
        let chunks: i32 = row
            .try_get(0)
            .map_err(shared_err("cannot look up firmware"))?;
        let read = client
            .prepare("SELECT bytes FROM firmware_chunks WHERE sha256 = $1 AND seq = $2")
            .await
            .map_err(shared_err("cannot read firmware"))?;
        for seq in 0..chunks {
            let Some(row) = client
                .query_opt(&read, &[&sha256, &seq])
                .await
                .map_err(shared_err("cannot read a firmware chunk"))?
            else {
                return Err(BlobError::Corrupt {
                    sha256: sha256.to_owned(),
                    message: format!("chunk {seq} of {chunks} is missing"),
                });
            };
            let bytes: &[u8] = row
                .try_get(0)
                .map_err(shared_err("cannot read a firmware chunk"))?;
            into.write(bytes).await?;
        }
        Ok(())
    }

    async fn release_blob(&self, sha256: &str) -> Result<bool, BlobError> {
        let client = self.client().await?;
        let sql = format!(
            "DELETE FROM firmware_blobs b WHERE b.sha256 = $1 AND {}",
            UNREFERENCED.replace("$KIND", "$2")
        );
        let n = client
            .execute(&sql, &[&sha256, &DOC_KIND])
            .await
            .map_err(shared_err("cannot release firmware"))?;
        Ok(n > 0)
    }

    async fn package_body(&self, firmware_id: &str) -> Result<Option<String>, BlobError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT body FROM documents WHERE kind = $1 AND id = $2",
                &[&DOC_KIND, &firmware_id],
            )
            .await
            .map_err(shared_err("cannot read firmware metadata"))?;
        row.map(|r| r.try_get(0))
            .transpose()
            .map_err(shared_err("cannot read firmware metadata"))
    }
}

impl SharedFirmware for PostgresFirmware {
    fn persist<'a>(
        &'a self,
        sha256: &'a str,
        size: u64,
        file: &'a Path,
    ) -> BoxFuture<'a, Result<(), BlobError>> {
        Box::pin(self.persist_file(sha256, size, file))
    }

    fn fetch<'a>(
        &'a self,
        sha256: &'a str,
        into: &'a mut BlobWriter,
    ) -> BoxFuture<'a, Result<(), BlobError>> {
        Box::pin(self.fetch_into(sha256, into))
    }

    fn release<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, Result<bool, BlobError>> {
        Box::pin(self.release_blob(sha256))
    }

    fn package<'a>(
        &'a self,
        firmware_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, BlobError>> {
        Box::pin(self.package_body(firmware_id))
    }
}

#[cfg(test)]
mod tests;
