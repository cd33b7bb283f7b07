//! [`PostgresReader`]: cluster mode's reads of the shared database, on a connection of their
//! own in the application's runtime (the writer's connection belongs to the writer thread and
//! is busy with group commits). What another node changed is re-read here by key, and a node
//! that missed feed messages reloads everything here ([`crate::cluster::SharedStore`]).

use super::{
    add_versions, instance_record, load_snapshot, product_record, stored_device, PostgresUrl,
    DEVICE_COLUMNS, INSTANCE_COLUMNS, PRODUCT_COLUMNS,
};
use crate::cluster::{Document, SharedStore};
use crate::store::{InstanceRecord, ProductRecord, Snapshot, StoreError, StoredDevice};
use futures_util::future::BoxFuture;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

/// A reading connection, re-opened when it was lost.
pub struct PostgresReader {
    config: tokio_postgres::Config,
    client: Mutex<Option<Client>>,
}

impl PostgresReader {
    /// Connects (the schema is the writer's business: it migrated before this opens).
    pub async fn connect(url: &PostgresUrl) -> Result<PostgresReader, StoreError> {
        let reader = PostgresReader {
            config: url.config().clone(),
            client: Mutex::new(None),
        };
        drop(reader.client().await?);
        Ok(reader)
    }

    /// The live connection, opened anew if the last one is gone.
    async fn client(&self) -> Result<tokio::sync::MappedMutexGuard<'_, Client>, StoreError> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, connection) = self.config.connect(NoTls).await?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::warn!(error = %super::super::pg_message(&error), "PostgreSQL reader connection lost");
                }
            });
            *slot = Some(client);
        }
        Ok(tokio::sync::MutexGuard::map(slot, |c| {
            c.as_mut().expect("set above")
        }))
    }
}

impl SharedStore for PostgresReader {
    fn snapshot(&self) -> BoxFuture<'_, Result<Snapshot, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let result = load_snapshot(&client).await;
            if result.is_err() && !client.is_closed() {
                // Leave no transaction open on a connection that stays.
                let _ = client.batch_execute("ROLLBACK").await;
            }
            result
        })
    }

    fn instances(
        &self,
        ids: Vec<String>,
    ) -> BoxFuture<'_, Result<Vec<InstanceRecord>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {INSTANCE_COLUMNS} FROM instances WHERE instance_id = ANY($1)"
                    ),
                    &[&ids],
                )
                .await?;
            Ok(rows
                .iter()
                .map(instance_record)
                .collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn products(&self, keys: Vec<String>) -> BoxFuture<'_, Result<Vec<ProductRecord>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    &format!("SELECT {PRODUCT_COLUMNS} FROM products WHERE product_key = ANY($1)"),
                    &[&keys],
                )
                .await?;
            Ok(rows
                .iter()
                .map(product_record)
                .collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn devices(
        &self,
        keys: Vec<(String, String)>,
    ) -> BoxFuture<'_, Result<Vec<StoredDevice>, StoreError>> {
        Box::pin(async move {
            let (pks, dns): (Vec<String>, Vec<String>) = keys.into_iter().unzip();
            let client = self.client().await?;
            // One consistent read of the rows and their versions.
            client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await?;
            let keyed = "FROM unnest($1::text[], $2::text[]) AS k (product_key, device_name)";
            let read = async {
                let devices = client
                    .query(
                        &format!(
                            "SELECT {} FROM devices d JOIN (SELECT * {keyed}) k USING (product_key, device_name)",
                            DEVICE_COLUMNS
                                .split(", ")
                                .map(|c| format!("d.{}", c.trim()))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        &[&pks, &dns],
                    )
                    .await?;
                let versions = client
                    .query(
                        &format!(
                            "SELECT v.product_key, v.device_name, v.module, v.version
                             FROM device_versions v JOIN (SELECT * {keyed}) k USING (product_key, device_name)"
                        ),
                        &[&pks, &dns],
                    )
                    .await?;
                let mut devices = devices
                    .iter()
                    .map(stored_device)
                    .collect::<Result<Vec<_>, StoreError>>()?;
                add_versions(&mut devices, &versions)?;
                Ok::<_, StoreError>(devices)
            }
            .await;
            let end = if read.is_ok() { "COMMIT" } else { "ROLLBACK" };
            client.batch_execute(end).await?;
            read
        })
    }

    fn documents(
        &self,
        keys: Vec<(String, String)>,
    ) -> BoxFuture<'_, Result<Vec<Document>, StoreError>> {
        Box::pin(async move {
            let (kinds, ids): (Vec<String>, Vec<String>) = keys.into_iter().unzip();
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT d.kind, d.id, d.body FROM documents d
                     JOIN unnest($1::text[], $2::text[]) AS k (kind, id) USING (kind, id)",
                    &[&kinds, &ids],
                )
                .await?;
            rows.iter().map(document).collect()
        })
    }

    fn all_documents(
        &self,
        kinds: Vec<String>,
    ) -> BoxFuture<'_, Result<Vec<Document>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT kind, id, body FROM documents WHERE kind = ANY($1) ORDER BY kind, id",
                    &[&kinds],
                )
                .await?;
            rows.iter().map(document).collect()
        })
    }

    fn lease_acquire(
        &self,
        name: &'static str,
        node: u16,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "INSERT INTO cluster_leases (name, holder, epoch, expires_at)
                     VALUES ($1, $2, 1, now() + make_interval(secs => $3))
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
                         epoch = cluster_leases.epoch + 1, expires_at = excluded.expires_at
                     WHERE cluster_leases.expires_at <= now()
                     RETURNING epoch",
                    &[&name, &(node as i16), &ttl.as_secs_f64()],
                )
                .await?;
            Ok(row
                .map(|r| r.try_get::<_, i64>(0))
                .transpose()?
                .map(|e| e as u64))
        })
    }

    fn lease_renew(
        &self,
        name: &'static str,
        node: u16,
        epoch: u64,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let n = client
                .execute(
                    "UPDATE cluster_leases SET expires_at = now() + make_interval(secs => $4)
                     WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > now()",
                    &[&name, &(node as i16), &(epoch as i64), &ttl.as_secs_f64()],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn lease_release(
        &self,
        name: &'static str,
        node: u16,
        epoch: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            client
                .execute(
                    "UPDATE cluster_leases SET expires_at = now()
                     WHERE name = $1 AND holder = $2 AND epoch = $3",
                    &[&name, &(node as i16), &(epoch as i64)],
                )
                .await?;
            Ok(())
        })
    }

    fn feed_position(&self, node: u16) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "SELECT seq FROM cluster_feed WHERE node = $1",
                    &[&(node as i16)],
                )
                .await?;
            Ok(row
                .map(|r| r.try_get::<_, i64>(0))
                .transpose()?
                .map_or(0, |s| s as u64))
        })
    }
}

fn document(row: &tokio_postgres::Row) -> Result<Document, StoreError> {
    Ok(Document {
        kind: row.try_get(0)?,
        id: row.try_get(1)?,
        body: row.try_get(2)?,
    })
}
