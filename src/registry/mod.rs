//! The device registry: the only owner of instance, product and device state.
//!
//! # State and locking
//!
//! Hot state lives in memory, rebuilt from the [`Store`] at [`Registry::open`]:
//!
//! - `instances`: `DashMap<instance_id, Instance>` (an instance is deleted only once no
//!   product or device names it, [`Registry::delete_instance`]; `default` never is);
//! - `products`: `DashMap<product_key, Arc<ProductEntry>>`; each entry owns its devices
//!   (`DashMap<device_name, DeviceState>`) and a sorted name index behind a `RwLock` that also
//!   serialises creating/deleting devices of that product against deleting the product;
//! - `product_order`: a sorted `(name, product_key)` set for stable paging.
//!
//! The broker's hot path (`credentials`, `device_connected`, `device_disconnected`) touches one
//! product shard (to clone the entry's `Arc`) and one device shard, never a global lock.
//!
//! Lock order is `product index → device shard`; the `products` shard guard is always released
//! before a product index is taken, and `product_order` is never held while taking a `products`
//! shard. Deleting an instance holds its `instances` shard while it reads the products and
//! devices (nothing takes an `instances` shard while holding a product or device guard). No guard is ever held across `.await`: every mutating method does its work in a
//! synchronous block that returns a store [`Ticket`], then awaits it.
//!
//! # Durability
//!
//! Every change that matters after a restart becomes a store [`Op`], submitted *while the
//! in-memory entry is still locked*, so the store's FIFO order equals the order of the changes in
//! memory (a disconnect can never be persisted before the connect it follows). Mutating `async`
//! methods return only once their transaction committed, so an API 201 means durable. Connection
//! events are fire-and-forget (the broker must not wait on a disk). If a create fails to commit
//! it is taken back out of memory so a retry does not hit `AlreadyExists`.
//!
//! After a restart everything but `online` is back; nobody is online at start.

mod devices;
mod hot_path;
mod instances;
mod model;
mod observer;
mod ownership;
mod products;
mod remote;
mod restore;
mod validate;

pub use model::*;
pub use observer::{DeviceChange, DeviceObserver, ObserverFuture};
pub use remote::{Resynced, SessionEvent, Superseded, VersionTaken};
pub use validate::MAX_TAGS;

use crate::cluster::epoch::EpochClock;

use crate::broker::DeviceCredentials;
use crate::clock::now_ms;
use crate::metrics::Metrics;
use crate::store::{
    DeviceRecord, InstanceRecord, Op, ProductRecord, SessionWrite, Snapshot, Store, StoreError,
    Ticket,
};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The instance that always exists.
pub const DEFAULT_INSTANCE_ID: &str = "default";
/// Most rows one batch create accepts.
pub const MAX_BATCH_ROWS: usize = 10_000;

/// Bounds on what devices can make the registry keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryLimits {
    /// Most OTA modules (and so versions) kept per device: a report of a further module is
    /// refused ([`RegistryError::TooMany`] for `modules`), so a device cannot grow its record
    /// without bound. A device loaded with more (a lowered limit) keeps them.
    pub max_modules_per_device: usize,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        RegistryLimits {
            max_modules_per_device: 64,
        }
    }
}

pub type Result<T> = std::result::Result<T, RegistryError>;

/// Errors of registry operations.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// `kind` is `"instance"`, `"product"` or `"device"`.
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{kind} {id:?} already exists")]
    AlreadyExists { kind: &'static str, id: String },
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    Conflict(String),
    /// [`Registry::delete_instance`] of `default`, which always exists.
    #[error("the default instance cannot be deleted")]
    DefaultInstance,
    /// [`Registry::delete_instance`] of an instance that is still the home of products or the
    /// owner of devices (migrated in).
    #[error("instance {instance_id:?} still has {products} products and owns {devices} devices; delete or migrate them first")]
    InstanceInUse {
        instance_id: String,
        products: usize,
        devices: usize,
    },
    #[error("too many {field}: at most {max}")]
    TooMany { field: &'static str, max: usize },
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl RegistryError {
    /// Stable machine-readable code (`FG.…`), also used in batch row results.
    pub fn code(&self) -> &'static str {
        match self {
            RegistryError::NotFound { .. } => "FG.NotFound",
            RegistryError::AlreadyExists { .. } => "FG.AlreadyExists",
            RegistryError::Invalid { .. } => "FG.InvalidParameter",
            RegistryError::Conflict(_)
            | RegistryError::DefaultInstance
            | RegistryError::InstanceInUse { .. } => "FG.Conflict",
            RegistryError::TooMany { .. } => "FG.TooMany",
            RegistryError::Store(_) => "FG.InternalError",
        }
    }
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // A panic while holding the lock cannot leave the index half-updated in a way that matters
    // more than refusing all further work would.
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Live state of one device.
struct DeviceState {
    device_secret: String,
    instance_id: String,
    enabled: bool,
    tags: BTreeMap<String, String>,
    /// The epoch of the session that holds the device (`cluster::epoch`; on one node it is
    /// just the connection's id); only that session's end takes the device offline.
    session: Option<u64>,
    /// The highest session epoch heard of for this device, online or not: an event about an
    /// older session (late, from another node) changes nothing.
    epoch_seen: u64,
    last_seen_ms: Option<i64>,
    client_ip: Option<String>,
    versions: BTreeMap<String, String>,
    created_at_ms: i64,
    /// Process-unique creation stamp, so a failed create only undoes itself.
    generation: u64,
    /// The node's epoch clock when this node created or learned of the device (this
    /// creation of the name): sessions drawn later are above it, a session of an earlier
    /// device of the name is not ([`Registry::device_predates`]).
    created_epoch: u64,
}

impl DeviceState {
    fn to_device(&self, product_key: &str, device_name: &str) -> Device {
        Device {
            product_key: product_key.to_owned(),
            device_name: device_name.to_owned(),
            device_secret: self.device_secret.clone(),
            instance_id: self.instance_id.clone(),
            enabled: self.enabled,
            tags: self.tags.clone(),
            online: self.session.is_some(),
            node: self
                .session
                .map(crate::cluster::epoch::node_of)
                .filter(|&n| n != 0),
            last_seen_ms: self.last_seen_ms,
            client_ip: self.client_ip.clone(),
            versions: self.versions.clone(),
            created_at_ms: self.created_at_ms,
        }
    }

    fn record(&self, product_key: &str, device_name: &str) -> DeviceRecord {
        DeviceRecord {
            product_key: product_key.to_owned(),
            device_name: device_name.to_owned(),
            device_secret: self.device_secret.clone(),
            instance_id: self.instance_id.clone(),
            enabled: self.enabled,
            tags: self.tags.clone(),
            created_at_ms: self.created_at_ms,
        }
    }
}

/// Sorted device names of a product, and whether the product was deleted.
#[derive(Default)]
struct DeviceIndex {
    names: BTreeSet<String>,
    deleted: bool,
}

struct ProductEntry {
    /// Immutable after creation (`device_count` is filled in on read).
    product: Product,
    devices: DashMap<String, DeviceState>,
    index: RwLock<DeviceIndex>,
}

impl ProductEntry {
    fn snapshot(&self) -> Product {
        let device_count = read(&self.index).names.len() as u64;
        Product {
            device_count,
            ..self.product.clone()
        }
    }
}

/// The registry. Share it as `Arc<Registry>`.
pub struct Registry {
    store: Store,
    metrics: Arc<Metrics>,
    instances: DashMap<String, Instance>,
    products: DashMap<String, Arc<ProductEntry>>,
    product_order: RwLock<BTreeSet<(String, String)>>,
    online: AtomicUsize,
    generation: AtomicU64,
    /// Told about device changes once durable (see [`DeviceObserver`]).
    observers: RwLock<Vec<Arc<dyn DeviceObserver>>>,
    /// The node's session epochs (shared with the broker, which draws them); remote session
    /// events move it forward.
    epochs: Arc<EpochClock>,
    limits: RegistryLimits,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("instances", &self.instances.len())
            .field("products", &self.products.len())
            .field("online", &self.online_count())
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Loads everything from `store` and creates the `default` instance if missing, with the
    /// default [`RegistryLimits`].
    ///
    /// Blocks the calling thread while it reads the store (start-up only).
    pub fn open(store: Store, metrics: Arc<Metrics>) -> Result<Arc<Registry>> {
        Self::open_with(store, metrics, RegistryLimits::default())
    }

    /// [`Registry::open`] with the given limits.
    pub fn open_with(
        store: Store,
        metrics: Arc<Metrics>,
        limits: RegistryLimits,
    ) -> Result<Arc<Registry>> {
        let snapshot = store.load()?;
        Self::from_snapshot(
            store,
            metrics,
            limits,
            Arc::new(EpochClock::new(0)),
            snapshot,
        )
    }

    /// A registry over `store`, filled from `snapshot` (read from it), on a node whose broker
    /// draws session epochs from `epochs`. Cluster mode reads the snapshot itself: it needs
    /// the snapshot's feed positions.
    pub fn from_snapshot(
        store: Store,
        metrics: Arc<Metrics>,
        limits: RegistryLimits,
        epochs: Arc<EpochClock>,
        snapshot: Snapshot,
    ) -> Result<Arc<Registry>> {
        let registry = Registry {
            store,
            metrics,
            instances: DashMap::new(),
            products: DashMap::new(),
            product_order: RwLock::new(BTreeSet::new()),
            online: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            observers: RwLock::new(Vec::new()),
            epochs,
            limits,
        };
        for i in snapshot.instances {
            let instance = Instance {
                instance_id: i.instance_id,
                name: i.name,
                created_at_ms: i.created_at_ms,
            };
            registry
                .instances
                .insert(instance.instance_id.clone(), instance);
        }
        if !registry.instances.contains_key(DEFAULT_INSTANCE_ID) {
            let default = Instance {
                instance_id: DEFAULT_INSTANCE_ID.into(),
                name: "Default instance".into(),
                created_at_ms: now_ms(),
            };
            registry
                .store
                .submit_blocking(vec![Op::PutInstance(instance_record(&default))])?;
            registry
                .instances
                .insert(default.instance_id.clone(), default);
        }
        {
            let mut order = write(&registry.product_order);
            for p in snapshot.products {
                order.insert((p.name.clone(), p.product_key.clone()));
                let entry = remote::product_entry(p);
                registry
                    .products
                    .insert(entry.product.product_key.clone(), Arc::new(entry));
            }
        }
        for d in snapshot.devices {
            let Some(entry) = registry.product(&d.record.product_key) else {
                // Foreign keys make this impossible; skip rather than refuse to start.
                tracing::warn!(product_key = %d.record.product_key, device_name = %d.record.device_name, "stored device without product skipped");
                continue;
            };
            let name = d.record.device_name.clone();
            let state = registry.device_state(d);
            if state.session.is_some() {
                registry.online.fetch_add(1, Ordering::Relaxed);
            }
            write(&entry.index).names.insert(name.clone());
            entry.devices.insert(name, state);
        }
        tracing::info!(
            instances = registry.instances.len(),
            products = registry.products.len(),
            "registry loaded"
        );
        Ok(Arc::new(registry))
    }

    /// The node's session epochs.
    pub fn epochs(&self) -> &Arc<EpochClock> {
        &self.epochs
    }

    /// The store this registry writes through (other modules submit their own ops to it).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Adds an observer of device changes (engines register themselves when they start).
    pub fn add_observer(&self, observer: Arc<dyn DeviceObserver>) {
        write(&self.observers).push(observer);
    }

    /// Tells every observer about a durable change, in registration order, awaiting each.
    async fn notify(&self, change: DeviceChange) {
        let observers: Vec<Arc<dyn DeviceObserver>> = read(&self.observers).clone();
        for o in observers {
            o.device_changed(&change).await;
        }
    }

    fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed)
    }

    /// The product's entry, with the `products` shard guard already released.
    fn product(&self, pk: &str) -> Option<Arc<ProductEntry>> {
        self.products.get(pk).map(|e| Arc::clone(e.value()))
    }

    fn product_or_not_found(&self, pk: &str) -> Result<Arc<ProductEntry>> {
        self.product(pk).ok_or_else(|| RegistryError::NotFound {
            kind: "product",
            id: pk.to_owned(),
        })
    }
}

/// Version reports staged by [`Registry::stage_version`], written by
/// [`Registry::commit_versions`].
#[derive(Debug, Default)]
pub struct VersionWrites {
    ops: Vec<Op>,
}

impl VersionWrites {
    /// Store writes staged (reports that changed nothing add none).
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

fn device_not_found(pk: &str, dn: &str) -> RegistryError {
    RegistryError::NotFound {
        kind: "device",
        id: format!("{pk}/{dn}"),
    }
}

fn instance_record(i: &Instance) -> InstanceRecord {
    InstanceRecord {
        instance_id: i.instance_id.clone(),
        name: i.name.clone(),
        created_at_ms: i.created_at_ms,
    }
}

fn product_record(p: &Product) -> ProductRecord {
    ProductRecord {
        product_key: p.product_key.clone(),
        product_secret: p.product_secret.clone(),
        name: p.name.clone(),
        instance_id: p.instance_id.clone(),
        description: p.description.clone(),
        created_at_ms: p.created_at_ms,
    }
}

#[cfg(test)]
mod tests;
