//! The latest properties of every device: for each property the last value a device posted,
//! the device's time of it and the gateway's receive time (the vendor's
//! QueryDevicePropertyStatus).
//!
//! Updated by ingest for every valid property post, in memory (a `DashMap` per device), and
//! written to the store as one document per device (`device.properties`, id `{pk}/{dn}`) by a
//! flusher that wakes every `commands.properties_flush_ms` and writes the devices that changed
//! since it last ran, in one submission. The store merges each write with the stored document
//! per property ([`Op::PutDeviceProperties`]: the newer device time stays), so in cluster mode,
//! where several nodes write a device's document (it moved, or reconnected elsewhere), no
//! node's flush replaces a newer value another node stored or drops a property it never saw. Property posts therefore never wait for the store (they
//! are the gateway's hottest path), and a device posting 100 times a second costs one write per
//! flush. What a crash can lose is the last flush interval of snapshot updates; a clean stop
//! flushes ([`LatestProperties::flush`]). Loaded at start. A deleted device's document goes with
//! it: in the store transaction that deletes the device ([`Op::DeleteDevice`]), and from memory
//! through the registry's observer; a document write for a device the store no longer has
//! writes nothing ([`Op::PutDeviceProperties`]), so a crash anywhere in between leaves no
//! snapshot behind.
//!
//! # Cluster mode
//!
//! A node's memory has only the posts it received itself (a node starts empty,
//! [`LatestProperties::on_shared`]), so in cluster mode [`LatestProperties::snapshot`] reads the
//! stored document (a reading connection of its own) and merges the node's memory into it: every node answers
//! the same, the posts other nodes received showing once those nodes flushed them (about one
//! flush interval). A single node answers from memory.
//!
//! A deletion made through another node removes the snapshot from memory only: that node's
//! transaction deleted the stored document with the device, and a delete from here could
//! remove the document of a device created again under the name meanwhile.
//!
//! # One writer of the documents
//!
//! Only [`LatestProperties::flush`] writes documents: a changed device that is still in memory
//! is put, one that is no longer there because it was deleted through this node is deleted. A
//! device deletion removes the
//! device from memory, marks it changed and then flushes. Flushes take turns (`writing`) from
//! reading the changed set to queueing their submission, and the store commits submissions in
//! the order they were queued, so the last write of a document always reflects memory at or
//! after the last change: a flush that read a snapshot just before the device was deleted
//! queues its put before the deletion's flush queues the delete, never after (which would
//! leave the document behind, for a device created again under the name to inherit). A
//! failed flush marks its devices changed again, so a failed delete is retried like a failed
//! put.
//!
//! # Deleted devices stay deleted
//!
//! A property post can still be in ingest when its device is deleted, and even when a device
//! is created again under the name. [`LatestProperties::record`] therefore applies a post only
//! while the registry has the device *the posting session connected as* (created before the
//! session began, [`Registry::device_predates`]), and checks that under the snapshot map's
//! entry lock: a deletion removes the device from the registry before its observer removes the
//! snapshot ([`LatestProperties::forget`], under the same lock), so a late post either lands
//! before that removal (and goes with it) or finds its device gone — or replaced by a newer one
//! of the name — and changes nothing: it never puts the old device's values back in memory,
//! nor (through the next flush) in the store.
//!
//! A value replaces the stored one unless the stored one carries a newer device time (a device
//! sending buffered, older readings after fresh ones does not roll the snapshot back).

use crate::cluster::SharedStore;
use crate::registry::{DeviceChange, DeviceObserver, ObserverFuture, Registry};
use crate::store::device_properties::{merge_properties, PropertiesDocument as Document};
use crate::store::{device_doc_id, Op, Store, StoreError};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use fleetgate_topics::Item;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

pub use crate::store::device_properties::PropertySnapshot;

/// The document kind in the store.
pub const DOC_KIND: &str = crate::store::DEVICE_PROPERTIES;

type DeviceId = (String, String);

/// See the module docs.
pub struct LatestProperties {
    devices: DashMap<DeviceId, BTreeMap<String, PropertySnapshot>>,
    /// Devices changed since the last flush, with whether the device was deleted through this
    /// node (a device no longer in memory then has its document deleted; one deleted through
    /// another node has none to delete). A std mutex: held only to insert or swap.
    dirty: Mutex<HashMap<DeviceId, bool>>,
    /// Held by a flush from taking `dirty` to queueing its submission (see the module docs).
    writing: tokio::sync::Mutex<()>,
    store: Store,
    /// Whether a device still exists (see "Deleted devices stay deleted").
    registry: Arc<Registry>,
    /// Cluster mode: where the stored documents are read (see "Cluster mode").
    shared: OnceLock<Arc<dyn SharedStore>>,
}

impl std::fmt::Debug for LatestProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatestProperties")
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

impl LatestProperties {
    /// Loads the snapshots from `store` (blocking: start-up). `registry` tells which devices
    /// still exist.
    pub fn load(
        store: Store,
        registry: Arc<Registry>,
    ) -> Result<Arc<LatestProperties>, StoreError> {
        let devices = DashMap::new();
        for (id, body) in store.load_documents(DOC_KIND)? {
            match serde_json::from_str::<Document>(&body) {
                Ok(doc) => {
                    devices.insert((doc.product_key, doc.device_name), doc.properties);
                }
                Err(error) => tracing::warn!(%id, %error, "unreadable properties snapshot skipped"),
            }
        }
        Ok(LatestProperties::with(store, registry, devices, None))
    }

    /// Cluster mode: starts empty — [`LatestProperties::snapshot`] reads the stored documents
    /// through `shared` and every write merges with them (see "Cluster mode" in the module
    /// docs), so loading every snapshot at start would only cost time and memory.
    pub fn on_shared(
        store: Store,
        registry: Arc<Registry>,
        shared: Arc<dyn SharedStore>,
    ) -> Arc<LatestProperties> {
        LatestProperties::with(store, registry, DashMap::new(), Some(shared))
    }

    fn with(
        store: Store,
        registry: Arc<Registry>,
        devices: DashMap<DeviceId, BTreeMap<String, PropertySnapshot>>,
        shared: Option<Arc<dyn SharedStore>>,
    ) -> Arc<LatestProperties> {
        Arc::new(LatestProperties {
            devices,
            dirty: Mutex::new(HashMap::new()),
            writing: tokio::sync::Mutex::new(()),
            store,
            registry,
            shared: shared.map_or_else(OnceLock::new, OnceLock::from),
        })
    }

    /// Applies a property post received at `received_at_ms` from the session with epoch
    /// `session`; a post of a device the registry no longer has, or has again as a newer
    /// device (deleted, or deleted and created again, while the post was in ingest) changes
    /// nothing (see the module docs). Returns whether it was applied.
    pub fn record(
        &self,
        pk: &str,
        dn: &str,
        session: u64,
        items: BTreeMap<String, Item>,
        received_at_ms: i64,
    ) -> bool {
        if items.is_empty() {
            return false;
        }
        let id = (pk.to_owned(), dn.to_owned());
        {
            // The device check runs under the entry's lock, which `forget` takes to remove
            // the snapshot. An existing snapshot may be a newer device's of the name, so both
            // cases need it.
            let entry = self.devices.entry(id.clone());
            if !self.registry.device_predates(pk, dn, session) {
                return false;
            }
            let mut entry = match entry {
                Entry::Occupied(entry) => entry.into_ref(),
                Entry::Vacant(entry) => entry.insert(BTreeMap::new()),
            };
            for (name, item) in items {
                let newer = entry
                    .get(&name)
                    .is_none_or(|old| old.replaced_by(item.time));
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
            .entry(id)
            .or_insert(false);
        true
    }

    /// The device's snapshot in this node's memory (empty when it never posted).
    pub fn get(&self, pk: &str, dn: &str) -> BTreeMap<String, PropertySnapshot> {
        self.devices
            .get(&(pk.to_owned(), dn.to_owned()))
            .map(|d| d.value().clone())
            .unwrap_or_default()
    }

    /// The device's snapshot as the API shows it: this node's memory on a single node; in
    /// cluster mode the stored document with this node's memory merged into it (see "Cluster
    /// mode" in the module docs).
    pub async fn snapshot(
        &self,
        pk: &str,
        dn: &str,
    ) -> Result<BTreeMap<String, PropertySnapshot>, StoreError> {
        let Some(shared) = self.shared.get() else {
            return Ok(self.get(pk, dn));
        };
        let stored = shared
            .documents(vec![(DOC_KIND.to_owned(), device_doc_id(pk, dn))])
            .await?;
        let mut properties = BTreeMap::new();
        for doc in stored {
            match serde_json::from_str::<Document>(&doc.body) {
                Ok(doc) => properties = doc.properties,
                Err(error) => {
                    tracing::warn!(id = %doc.id, %error, "unreadable properties snapshot skipped")
                }
            }
        }
        merge_properties(&mut properties, self.get(pk, dn));
        Ok(properties)
    }

    /// Writes every changed snapshot (and deletes those of deleted devices); resolves once
    /// durable.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let (dirty, ticket) = {
            let _turn = self.writing.lock().await;
            let dirty =
                std::mem::take(&mut *self.dirty.lock().unwrap_or_else(PoisonError::into_inner));
            if dirty.is_empty() {
                return Ok(0);
            }
            let ops: Vec<Op> = dirty
                .iter()
                .filter_map(|(id, deleted)| self.write_op(id, *deleted))
                .collect();
            // Queued before the turn ends: submission order is flush order.
            (dirty, self.store.submit(ops))
        };
        if let Err(e) = ticket.await {
            // Written again (from memory as it is then) at the next flush.
            let mut again = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
            for (id, deleted) in dirty {
                *again.entry(id).or_insert(false) |= deleted;
            }
            return Err(e);
        }
        Ok(dirty.len())
    }

    /// The write that brings memory to the device's document: a put of what memory has, the
    /// delete of a device deleted through this node, nothing for one deleted elsewhere.
    fn write_op(&self, (pk, dn): &DeviceId, deleted_here: bool) -> Option<Op> {
        let id = device_doc_id(pk, dn);
        let properties = self
            .devices
            .get(&(pk.clone(), dn.clone()))
            .map(|d| d.value().clone());
        match properties {
            Some(properties) => {
                let doc = Document {
                    product_key: pk.clone(),
                    device_name: dn.clone(),
                    properties,
                };
                // Written only while the device exists in the store, merged with the stored
                // document.
                Some(Op::PutDeviceProperties {
                    product_key: pk.clone(),
                    device_name: dn.clone(),
                    body: serde_json::to_string(&doc).unwrap_or_default(),
                })
            }
            None if deleted_here => Some(Op::DeleteDoc { kind: DOC_KIND, id }),
            None => None,
        }
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

    /// Drops a deleted device's snapshot from memory only: it was deleted through another
    /// node, whose transaction deleted the stored document (see "Cluster mode").
    fn forget_in_memory(&self, pk: &str, dn: &str) {
        self.devices.remove(&(pk.to_owned(), dn.to_owned()));
    }

    /// Drops a device deleted through this node's snapshot from memory and then from the
    /// store (through a flush, see the module docs).
    async fn forget(&self, pk: &str, dn: &str) {
        let id = (pk.to_owned(), dn.to_owned());
        // Memory first, then the mark: a flush that takes the mark reads memory without it.
        self.devices.remove(&id);
        self.dirty
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, true);
        if let Err(error) = self.flush().await {
            tracing::warn!(%error, pk, dn, "cannot delete a properties snapshot (retried)");
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
                elsewhere,
                ..
            } = change
            {
                if let Some(properties) = self.0.upgrade() {
                    if *elsewhere {
                        properties.forget_in_memory(product_key, device_name);
                    } else {
                        properties.forget(product_key, device_name).await;
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::registry::{NewDevice, NewProduct};
    use crate::store::{Snapshot, SqliteBackend, StoreBackend};
    use serde_json::json;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A backend that fails every commit while `failing` is set.
    struct FlakyBackend {
        inner: SqliteBackend,
        failing: Arc<AtomicBool>,
    }

    impl StoreBackend for FlakyBackend {
        fn load(&mut self) -> Result<Snapshot, StoreError> {
            self.inner.load()
        }

        fn load_documents(&mut self, kind: &str) -> Result<Vec<(String, String)>, StoreError> {
            self.inner.load_documents(kind)
        }

        fn commit(
            &mut self,
            submissions: &[&[Op]],
        ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Corrupt {
                    what: "test",
                    message: "disk full".into(),
                });
            }
            self.inner.commit(submissions)
        }
    }

    fn items(n: usize) -> BTreeMap<String, Item> {
        (0..n)
            .map(|i| {
                let item = Item {
                    value: json!({ "reading": i, "unit": "celsius" }),
                    time: 1_700_000_000_000,
                };
                (format!("Prop{i}"), item)
            })
            .collect()
    }

    /// A registry on `store` with product `pk1` and devices `dev0`…, and the snapshots with
    /// their reaper, as the application wires them.
    async fn with_devices(store: &Store, n: usize) -> (Arc<Registry>, Arc<LatestProperties>) {
        let registry = Registry::open(store.clone(), Arc::new(Metrics::new())).expect("registry");
        registry
            .create_product(NewProduct {
                name: "Lamp".into(),
                product_key: Some("pk1".into()),
                instance_id: None,
                description: None,
            })
            .await
            .expect("product");
        let rows = (0..n)
            .map(|i| NewDevice {
                device_name: format!("dev{i}"),
                ..NewDevice::default()
            })
            .collect();
        registry
            .batch_create_devices("pk1", rows)
            .await
            .expect("devices");
        let properties = LatestProperties::load(store.clone(), registry.clone()).expect("load");
        registry.add_observer(Arc::new(PropertiesReaper(Arc::downgrade(&properties))));
        (registry, properties)
    }

    fn stored(store: &Store) -> Vec<String> {
        store
            .load_documents(DOC_KIND)
            .expect("documents")
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    #[tokio::test]
    async fn a_delete_that_failed_is_written_by_the_next_flush() {
        let failing = Arc::new(AtomicBool::new(false));
        let backend = FlakyBackend {
            inner: SqliteBackend::open_in_memory().expect("sqlite"),
            failing: failing.clone(),
        };
        let store = Store::with_backend(backend, Arc::new(Metrics::new())).expect("store");
        let (registry, properties) = with_devices(&store, 2).await;
        let session = registry.epochs().next();
        assert!(properties.record("pk1", "dev1", session, items(1), 1));
        assert_eq!(properties.flush().await.expect("flush"), 1);
        assert_eq!(stored(&store), ["pk1/dev1"]);

        failing.store(true, Ordering::SeqCst);
        properties.forget("pk1", "dev1").await;
        failing.store(false, Ordering::SeqCst);
        assert!(properties.get("pk1", "dev1").is_empty());
        properties.flush().await.expect("flush");
        assert!(stored(&store).is_empty(), "{:?}", stored(&store));
    }

    /// A flush reads the snapshots of many devices while they are being deleted one after the
    /// other: whatever it read, the documents of deleted devices must be gone in the end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_racing_deletions_never_writes_a_deleted_device_back() {
        const DEVICES: usize = 300;
        for round in 0..3 {
            let store = Store::open_in_memory(Arc::new(Metrics::new())).expect("store");
            let (registry, properties) = with_devices(&store, DEVICES).await;
            let session = registry.epochs().next();
            for i in 0..DEVICES {
                // Big snapshots: the flush spends a while reading and encoding them.
                properties.record("pk1", &format!("dev{i}"), session, items(100), 1);
            }
            let start = Arc::new(tokio::sync::Barrier::new(2));
            let flusher = tokio::spawn({
                let (properties, start) = (properties.clone(), start.clone());
                async move {
                    start.wait().await;
                    properties.flush().await
                }
            });
            let deleter = tokio::spawn({
                let properties = properties.clone();
                async move {
                    start.wait().await;
                    for i in 0..DEVICES {
                        properties.forget("pk1", &format!("dev{i}")).await;
                    }
                }
            });
            flusher.await.expect("flusher").expect("flush");
            deleter.await.expect("deleter");
            properties.flush().await.expect("flush");
            let left = stored(&store);
            assert!(
                left.is_empty(),
                "round {round}: {} left, e.g. {:?}",
                left.len(),
                left.first()
            );
        }
    }

    /// A post still in ingest when its device is deleted lands after the deletion's observers
    /// ran: it must not put the snapshot back, in memory or (through a flush) in the store.
    #[tokio::test]
    async fn a_post_landing_after_its_device_was_deleted_puts_nothing_back() {
        let store = Store::open_in_memory(Arc::new(Metrics::new())).expect("store");
        let (registry, properties) = with_devices(&store, 2).await;
        let session = registry.epochs().next();
        assert!(properties.record("pk1", "dev1", session, items(2), 1));
        properties.flush().await.expect("flush");
        assert_eq!(stored(&store), ["pk1/dev1"]);

        registry.delete_device("pk1", "dev1").await.expect("delete");
        assert!(stored(&store).is_empty(), "{:?}", stored(&store));
        // The late post.
        assert!(!properties.record("pk1", "dev1", session, items(3), 2));
        assert!(properties.get("pk1", "dev1").is_empty());
        properties.flush().await.expect("flush");
        assert!(stored(&store).is_empty(), "{:?}", stored(&store));
        // The other device is untouched, and a device created again under the name starts
        // empty and takes posts again.
        assert!(properties.record("pk1", "dev0", session, items(1), 3));
        registry
            .create_device(
                "pk1",
                NewDevice {
                    device_name: "dev1".into(),
                    ..NewDevice::default()
                },
            )
            .await
            .expect("create again");
        assert!(properties.get("pk1", "dev1").is_empty());
        // The old device's session has no say in the new one's snapshot; a session of the
        // new one has.
        assert!(!properties.record("pk1", "dev1", session, items(2), 4));
        assert!(properties.get("pk1", "dev1").is_empty());
        let session = registry.epochs().next();
        assert!(properties.record("pk1", "dev1", session, items(1), 4));
        properties.flush().await.expect("flush");
        let mut left = stored(&store);
        left.sort();
        assert_eq!(left, ["pk1/dev0", "pk1/dev1"]);
    }

    /// A deletion made through another node drops the snapshot from memory only: that node
    /// deleted the stored document with the device, and by the time this node hears of it the
    /// name may be a new device's, whose document a delete from here would remove.
    #[tokio::test]
    async fn a_deletion_through_another_node_leaves_the_store_alone() {
        let store = Store::open_in_memory(Arc::new(Metrics::new())).expect("store");
        let (registry, properties) = with_devices(&store, 1).await;
        let session = registry.epochs().next();
        assert!(properties.record("pk1", "dev0", session, items(2), 1));
        properties.flush().await.expect("flush");
        // Unflushed values of the old device when the deletion is heard of.
        assert!(properties.record("pk1", "dev0", session, items(3), 2));
        // Another node deleted the device and created it again, and the new device's
        // document is stored.
        let doc = Document {
            product_key: "pk1".into(),
            device_name: "dev0".into(),
            properties: BTreeMap::new(),
        };
        let device = registry.get_device("pk1", "dev0").expect("device");
        store
            .submit(vec![
                Op::DeleteDevice {
                    product_key: "pk1".into(),
                    device_name: "dev0".into(),
                },
                Op::PutDevice(crate::store::DeviceRecord {
                    product_key: "pk1".into(),
                    device_name: "dev0".into(),
                    device_secret: device.device_secret.clone(),
                    instance_id: device.instance_id.clone(),
                    enabled: true,
                    tags: BTreeMap::new(),
                    created_at_ms: 2,
                }),
                Op::PutDeviceProperties {
                    product_key: "pk1".into(),
                    device_name: "dev0".into(),
                    body: serde_json::to_string(&doc).expect("json"),
                },
            ])
            .await
            .expect("elsewhere");
        let reaper = PropertiesReaper(Arc::downgrade(&properties));
        let deleted = DeviceChange::Deleted {
            product_key: "pk1".into(),
            device_name: "dev0".into(),
            instance_id: device.instance_id.clone(),
            elsewhere: true,
        };
        reaper.device_changed(&deleted).await;
        assert!(properties.get("pk1", "dev0").is_empty());
        properties.flush().await.expect("flush");
        assert_eq!(stored(&store), ["pk1/dev0"]);
    }

    /// A post of a device deleted and created again under its name while the post was in
    /// ingest, landing after the new device posted: the old device's values must not appear
    /// in the new device's snapshot (in memory or in the store).
    #[tokio::test]
    async fn a_late_post_of_an_earlier_device_of_the_name_changes_nothing() {
        let store = Store::open_in_memory(Arc::new(Metrics::new())).expect("store");
        let (registry, properties) = with_devices(&store, 1).await;
        let old = registry.epochs().next();
        assert!(properties.record("pk1", "dev0", old, items(1), 1));
        registry.delete_device("pk1", "dev0").await.expect("delete");
        let again = NewDevice {
            device_name: "dev0".into(),
            ..NewDevice::default()
        };
        registry
            .create_device("pk1", again)
            .await
            .expect("create again");
        let new = registry.epochs().next();
        let fresh = |name: &str| {
            let item = Item {
                value: json!(name),
                time: 1_700_000_000_000,
            };
            BTreeMap::from([(name.to_owned(), item)])
        };
        // The old session's posts, before the new device's first one and after it.
        assert!(!properties.record("pk1", "dev0", old, fresh("Stale"), 2));
        assert!(properties.get("pk1", "dev0").is_empty());
        assert!(properties.record("pk1", "dev0", new, fresh("Fresh"), 3));
        assert!(!properties.record("pk1", "dev0", old, fresh("Stale"), 4));
        let names: Vec<String> = properties.get("pk1", "dev0").into_keys().collect();
        assert_eq!(names, ["Fresh"]);
        properties.flush().await.expect("flush");
        let docs = store.load_documents(DOC_KIND).expect("documents");
        assert_eq!(docs.len(), 1);
        assert!(!docs[0].1.contains("Stale"), "{}", docs[0].1);
    }
}
