//! The latest properties of every device: for each property the last value a device posted,
//! the device's time of it and the gateway's receive time (the vendor's
//! QueryDevicePropertyStatus).
//!
//! Updated by ingest for every valid property post, in memory (a `DashMap` per device), and
//! written to the store as one document per device (`device.properties`, id `{pk}/{dn}`) by a
//! flusher that wakes every `commands.properties_flush_ms` and writes the devices that changed
//! since it last ran, in one submission. Property posts therefore never wait for the store (they
//! are the gateway's hottest path), and a device posting 100 times a second costs one write per
//! flush. What a crash can lose is the last flush interval of snapshot updates; a clean stop
//! flushes ([`LatestProperties::flush`]). Loaded at start; a deleted device's document goes with
//! it (the registry's observer).
//!
//! A value replaces the stored one unless the stored one carries a newer device time (a device
//! sending buffered, older readings after fresh ones does not roll the snapshot back).

use crate::registry::{DeviceChange, DeviceObserver, ObserverFuture};
use crate::store::{Op, Store, StoreError};
use dashmap::DashMap;
use fleetgate_topics::Item;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

/// The document kind in the store.
pub const DOC_KIND: &str = "device.properties";

/// One property's latest value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PropertySnapshot {
    #[schema(value_type = Object)]
    pub value: Value,
    /// The device's time of the value (its `time`, or the receive time when it sent none), ms
    /// since the Unix epoch.
    pub time: u64,
    /// When the gateway received it, ms since the Unix epoch.
    pub received_at_ms: i64,
}

type DeviceId = (String, String);

#[derive(Serialize, Deserialize)]
struct Document {
    product_key: String,
    device_name: String,
    properties: BTreeMap<String, PropertySnapshot>,
}

/// See the module docs.
pub struct LatestProperties {
    devices: DashMap<DeviceId, BTreeMap<String, PropertySnapshot>>,
    /// Devices changed since the last flush. A std mutex: held only to insert or swap.
    dirty: Mutex<HashSet<DeviceId>>,
    store: Store,
}

impl std::fmt::Debug for LatestProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatestProperties")
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

impl LatestProperties {
    /// Loads the snapshots from `store` (blocking: start-up).
    pub fn load(store: Store) -> Result<Arc<LatestProperties>, StoreError> {
        let devices = DashMap::new();
        for (id, body) in store.load_documents(DOC_KIND)? {
            match serde_json::from_str::<Document>(&body) {
                Ok(doc) => {
                    devices.insert((doc.product_key, doc.device_name), doc.properties);
                }
                Err(error) => tracing::warn!(%id, %error, "unreadable properties snapshot skipped"),
            }
        }
        Ok(Arc::new(LatestProperties {
            devices,
            dirty: Mutex::new(HashSet::new()),
            store,
        }))
    }

    /// Applies a property post received at `received_at_ms`.
    pub fn record(&self, pk: &str, dn: &str, items: BTreeMap<String, Item>, received_at_ms: i64) {
        if items.is_empty() {
            return;
        }
        let id = (pk.to_owned(), dn.to_owned());
        {
            let mut entry = self.devices.entry(id.clone()).or_default();
            for (name, item) in items {
                let newer = entry.get(&name).is_none_or(|old| old.time <= item.time);
                if newer {
                    entry.insert(
                        name,
                        PropertySnapshot {
                            value: item.value,
                            time: item.time,
                            received_at_ms,
                        },
                    );
                }
            }
        }
        self.dirty
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id);
    }

    /// The device's snapshot (empty when it never posted).
    pub fn get(&self, pk: &str, dn: &str) -> BTreeMap<String, PropertySnapshot> {
        self.devices
            .get(&(pk.to_owned(), dn.to_owned()))
            .map(|d| d.value().clone())
            .unwrap_or_default()
    }

    /// Writes every changed snapshot; resolves once durable.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(PoisonError::into_inner));
        if dirty.is_empty() {
            return Ok(0);
        }
        let mut ops = Vec::with_capacity(dirty.len());
        for (pk, dn) in &dirty {
            let Some(properties) = self
                .devices
                .get(&(pk.clone(), dn.clone()))
                .map(|d| d.value().clone())
            else {
                continue;
            };
            let doc = Document {
                product_key: pk.clone(),
                device_name: dn.clone(),
                properties,
            };
            ops.push(Op::PutDoc {
                kind: DOC_KIND,
                id: format!("{pk}/{dn}"),
                body: serde_json::to_string(&doc).unwrap_or_default(),
            });
        }
        let n = ops.len();
        if let Err(e) = self.store.submit(ops).await {
            // Written again at the next flush.
            self.dirty
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(dirty);
            return Err(e);
        }
        Ok(n)
    }

    /// The flusher task; ends when `properties` is dropped.
    pub fn spawn_flusher(properties: &Arc<LatestProperties>, every: Duration) {
        let weak: Weak<LatestProperties> = Arc::downgrade(properties);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(properties) = weak.upgrade() else {
                    return;
                };
                if let Err(error) = properties.flush().await {
                    tracing::warn!(%error, "cannot write the properties snapshots (retried)");
                }
            }
        });
    }

    async fn forget(&self, pk: &str, dn: &str) {
        let id = (pk.to_owned(), dn.to_owned());
        self.devices.remove(&id);
        self.dirty
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        let op = Op::DeleteDoc {
            kind: DOC_KIND,
            id: format!("{pk}/{dn}"),
        };
        if let Err(error) = self.store.submit(vec![op]).await {
            tracing::warn!(%error, pk, dn, "cannot delete a properties snapshot");
        }
    }
}

/// Drops a deleted device's snapshot (a device created again under its name starts empty).
pub struct PropertiesReaper(pub Weak<LatestProperties>);

impl DeviceObserver for PropertiesReaper {
    fn device_changed<'a>(&'a self, change: &'a DeviceChange) -> ObserverFuture<'a> {
        Box::pin(async move {
            if let DeviceChange::Deleted {
                product_key,
                device_name,
                ..
            } = change
            {
                if let Some(properties) = self.0.upgrade() {
                    properties.forget(product_key, device_name).await;
                }
            }
        })
    }
}
