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

mod model;
mod observer;
mod remote;
mod restore;
mod validate;

pub use model::*;
pub use observer::{DeviceChange, DeviceObserver, ObserverFuture};
pub use remote::{SessionEvent, Superseded};
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

    // ----- instances -----

    /// Creates an instance; its id is generated (`iot-…`) when absent.
    pub async fn create_instance(&self, new: NewInstance) -> Result<Instance> {
        validate::name("name", &new.name)?;
        let instance_id = match new.instance_id {
            Some(id) => {
                validate::instance_id(&id)?;
                id
            }
            None => validate::generate_instance_id(),
        };
        let instance = Instance {
            instance_id,
            name: new.name,
            created_at_ms: now_ms(),
        };
        let ticket = match self.instances.entry(instance.instance_id.clone()) {
            Entry::Occupied(_) => {
                return Err(RegistryError::AlreadyExists {
                    kind: "instance",
                    id: instance.instance_id,
                });
            }
            Entry::Vacant(slot) => {
                let ticket = self
                    .store
                    .submit(vec![Op::PutInstance(instance_record(&instance))]);
                slot.insert(instance.clone());
                ticket
            }
        };
        if let Err(e) = ticket.await {
            self.instances.remove(&instance.instance_id);
            return Err(e.into());
        }
        Ok(instance)
    }

    /// Every instance, by name.
    pub fn list_instances(&self) -> Vec<Instance> {
        let mut all: Vec<Instance> = self.instances.iter().map(|e| e.value().clone()).collect();
        all.sort_by(|a, b| {
            a.name
                .cmp(&b.name)
                .then_with(|| a.instance_id.cmp(&b.instance_id))
        });
        all
    }

    pub fn get_instance(&self, id: &str) -> Result<Instance> {
        self.instances
            .get(id)
            .map(|e| e.value().clone())
            .ok_or_else(|| RegistryError::NotFound {
                kind: "instance",
                id: id.to_owned(),
            })
    }

    /// `(products, devices)` that name `instance_id`: products whose home it is, and devices
    /// it owns (a migrated device's product may live in another instance). Walks every device.
    pub fn instance_usage(&self, instance_id: &str) -> (usize, usize) {
        let entries: Vec<Arc<ProductEntry>> = self
            .products
            .iter()
            .map(|e| Arc::clone(e.value()))
            .collect();
        let mut products = 0;
        let mut devices = 0;
        for entry in entries {
            if entry.product.instance_id == instance_id {
                products += 1;
            }
            devices += entry
                .devices
                .iter()
                .filter(|d| d.instance_id == instance_id)
                .count();
        }
        (products, devices)
    }

    fn check_instance_unused(&self, instance_id: &str) -> Result<()> {
        match self.instance_usage(instance_id) {
            (0, 0) => Ok(()),
            (products, devices) => Err(RegistryError::InstanceInUse {
                instance_id: instance_id.to_owned(),
                products,
                devices,
            }),
        }
    }

    /// The registry's refusals of [`delete_instance`](Self::delete_instance), checked without
    /// changing anything (callers check their own before deleting): the instance as it is.
    pub fn check_instance_deletable(&self, instance_id: &str) -> Result<Instance> {
        validate::instance_id(instance_id)?;
        let instance = self.get_instance(instance_id)?;
        if instance_id == DEFAULT_INSTANCE_ID {
            return Err(RegistryError::DefaultInstance);
        }
        self.check_instance_unused(instance_id)?;
        Ok(instance)
    }

    /// Deletes an instance, together with `with` (the caller's own records of it: the
    /// forwarder's consumer groups, rate limit and exchange tombstone) in ONE atomic store
    /// submission. Durable when this returns; returns the instance as it was.
    ///
    /// Refused, changing nothing: an id that breaks the rule (`Invalid`), an unknown one
    /// (`NotFound`), `default` ([`RegistryError::DefaultInstance`]), an instance that is the
    /// home of a product or the owner of a device ([`RegistryError::InstanceInUse`]). The
    /// store's foreign keys refuse the same, so a product or device created concurrently
    /// either makes this fail (the instance is put back and `InstanceInUse` returned) or
    /// fails itself.
    pub async fn delete_instance(&self, instance_id: &str, with: Vec<Op>) -> Result<Instance> {
        validate::instance_id(instance_id)?;
        if instance_id == DEFAULT_INSTANCE_ID {
            return Err(RegistryError::DefaultInstance);
        }
        let (instance, ticket) = match self.instances.entry(instance_id.to_owned()) {
            Entry::Vacant(_) => {
                return Err(RegistryError::NotFound {
                    kind: "instance",
                    id: instance_id.to_owned(),
                })
            }
            Entry::Occupied(slot) => {
                // Under the instance's guard: a create of the same id is ordered after the
                // delete in the store, and a product create that checks the instance waits.
                self.check_instance_unused(instance_id)?;
                let mut ops = vec![Op::DeleteInstance {
                    instance_id: instance_id.to_owned(),
                }];
                ops.extend(with);
                let ticket = self.store.submit(ops);
                (slot.remove(), ticket)
            }
        };
        if let Err(e) = ticket.await {
            // Not deleted: back in memory (unless re-created meanwhile, which the store ordered
            // after this failure).
            self.instances
                .entry(instance_id.to_owned())
                .or_insert_with(|| instance.clone());
            self.check_instance_unused(instance_id)?;
            return Err(e.into());
        }
        Ok(instance)
    }

    // ----- products -----

    /// Creates a product in `instance_id` (default `default`); key and secret are generated
    /// when absent.
    pub async fn create_product(&self, new: NewProduct) -> Result<Product> {
        validate::name("name", &new.name)?;
        if let Some(d) = &new.description {
            validate::description(d)?;
        }
        if let Some(pk) = &new.product_key {
            validate::product_key(pk)?;
        }
        let instance_id = new
            .instance_id
            .unwrap_or_else(|| DEFAULT_INSTANCE_ID.to_owned());
        validate::instance_id(&instance_id)?;
        if !self.instances.contains_key(&instance_id) {
            return Err(RegistryError::NotFound {
                kind: "instance",
                id: instance_id,
            });
        }
        let generated = new.product_key.is_none();
        let mut product = Product {
            product_key: new
                .product_key
                .unwrap_or_else(validate::generate_product_key),
            product_secret: validate::generate_product_secret(),
            name: new.name,
            instance_id,
            description: new.description,
            created_at_ms: now_ms(),
            device_count: 0,
        };
        // 62^9 keys make a collision practically impossible, but a generated key must never
        // fail the request because of one.
        let (entry, ticket) = loop {
            match self.products.entry(product.product_key.clone()) {
                Entry::Occupied(_) if generated => {
                    product.product_key = validate::generate_product_key()
                }
                Entry::Occupied(_) => {
                    return Err(RegistryError::AlreadyExists {
                        kind: "product",
                        id: product.product_key,
                    });
                }
                Entry::Vacant(slot) => {
                    let ticket = self
                        .store
                        .submit(vec![Op::PutProduct(product_record(&product))]);
                    let entry = Arc::new(ProductEntry {
                        product: product.clone(),
                        devices: DashMap::new(),
                        index: RwLock::new(DeviceIndex::default()),
                    });
                    slot.insert(Arc::clone(&entry));
                    break (entry, ticket);
                }
            }
        };
        let order_key = (product.name.clone(), product.product_key.clone());
        write(&self.product_order).insert(order_key.clone());
        if let Err(e) = ticket.await {
            self.products
                .remove_if(&product.product_key, |_, v| Arc::ptr_eq(v, &entry));
            write(&self.product_order).remove(&order_key);
            return Err(e.into());
        }
        Ok(product)
    }

    pub fn get_product(&self, pk: &str) -> Result<Product> {
        Ok(self.product_or_not_found(pk)?.snapshot())
    }

    /// Products ordered by name (then key).
    pub fn list_products(&self, page: Page) -> Paged<Product> {
        let (keys, total) = {
            let order = read(&self.product_order);
            let keys: Vec<String> = order
                .iter()
                .skip(page.offset())
                .take(page.page_size as usize)
                .map(|(_, pk)| pk.clone())
                .collect();
            (keys, order.len() as u64)
        };
        // A product deleted between the two steps is simply left out of this page.
        let items = keys
            .iter()
            .filter_map(|pk| self.product(pk))
            .map(|e| e.snapshot())
            .collect();
        Paged {
            items,
            total,
            page: page.page,
            page_size: page.page_size,
        }
    }

    /// Deletes a product; `Conflict` while it still has devices.
    pub async fn delete_product(&self, pk: &str) -> Result<()> {
        let entry = self.product_or_not_found(pk)?;
        let ticket = {
            let mut index = write(&entry.index);
            if index.deleted {
                return Err(RegistryError::NotFound {
                    kind: "product",
                    id: pk.to_owned(),
                });
            }
            if !index.names.is_empty() {
                return Err(RegistryError::Conflict(format!(
                    "product {pk:?} still has {} devices; delete them first",
                    index.names.len()
                )));
            }
            index.deleted = true;
            // Submitted before the key is freed, so a re-create of the same key is ordered after.
            let ticket = self.store.submit(vec![Op::DeleteProduct {
                product_key: pk.to_owned(),
            }]);
            self.products.remove_if(pk, |_, v| Arc::ptr_eq(v, &entry));
            write(&self.product_order).remove(&(entry.product.name.clone(), pk.to_owned()));
            ticket
        };
        ticket.await?;
        Ok(())
    }

    // ----- devices -----

    /// Validates one new device and turns it into state (without inserting it).
    fn prepare_device(
        &self,
        entry: &ProductEntry,
        new: NewDevice,
    ) -> Result<(String, DeviceState)> {
        validate::device_name(&new.device_name)?;
        let device_secret = match new.device_secret {
            Some(secret) => {
                validate::device_secret(&secret)?;
                secret
            }
            None => validate::generate_device_secret(),
        };
        validate::tags(&new.tags)?;
        let state = DeviceState {
            device_secret,
            instance_id: entry.product.instance_id.clone(),
            enabled: true,
            tags: new.tags,
            session: None,
            epoch_seen: 0,
            last_seen_ms: None,
            client_ip: None,
            versions: BTreeMap::new(),
            created_at_ms: now_ms(),
            generation: self.next_generation(),
        };
        Ok((new.device_name, state))
    }

    /// Takes devices whose creation failed to commit back out of memory.
    fn undo_creates(&self, entry: &ProductEntry, created: &[(String, u64)]) {
        let mut index = write(&entry.index);
        for (name, generation) in created {
            if entry
                .devices
                .remove_if(name, |_, d| d.generation == *generation)
                .is_some()
            {
                index.names.remove(name);
            }
        }
    }

    /// Creates a device of product `pk` (secret generated when absent). Observers hear of it
    /// once durable (DYNAMIC OTA jobs may take it).
    pub async fn create_device(&self, pk: &str, new: NewDevice) -> Result<Device> {
        let entry = self.product_or_not_found(pk)?;
        let (name, state) = self.prepare_device(&entry, new)?;
        let device = state.to_device(pk, &name);
        let generation = state.generation;
        let ticket = {
            let mut index = write(&entry.index);
            if index.deleted {
                return Err(RegistryError::NotFound {
                    kind: "product",
                    id: pk.to_owned(),
                });
            }
            if index.names.contains(&name) {
                return Err(RegistryError::AlreadyExists {
                    kind: "device",
                    id: name,
                });
            }
            let ticket = self
                .store
                .submit(vec![Op::PutDevice(state.record(pk, &name))]);
            index.names.insert(name.clone());
            entry.devices.insert(name.clone(), state);
            ticket
        };
        if let Err(e) = ticket.await {
            self.undo_creates(&entry, &[(name, generation)]);
            return Err(e.into());
        }
        self.notify(DeviceChange::Created {
            product_key: pk.to_owned(),
            device_names: vec![name],
        })
        .await;
        Ok(device)
    }

    /// Creates up to [`MAX_BATCH_ROWS`] devices. Every row is validated and checked for
    /// duplicates (against existing devices and earlier rows of the batch); the valid rows are
    /// created in one store transaction. Results are in input order.
    pub async fn batch_create_devices(
        &self,
        pk: &str,
        rows: Vec<NewDevice>,
    ) -> Result<Vec<RowResult>> {
        if rows.len() > MAX_BATCH_ROWS {
            return Err(RegistryError::TooMany {
                field: "devices",
                max: MAX_BATCH_ROWS,
            });
        }
        let entry = self.product_or_not_found(pk)?;
        // Validate (and generate secrets) outside the lock.
        let prepared: Vec<(String, Result<(String, DeviceState)>)> = rows
            .into_iter()
            .map(|row| (row.device_name.clone(), self.prepare_device(&entry, row)))
            .collect();

        let mut results = Vec::with_capacity(prepared.len());
        let mut created: Vec<(String, u64)> = Vec::new();
        let ticket = {
            let mut index = write(&entry.index);
            if index.deleted {
                return Err(RegistryError::NotFound {
                    kind: "product",
                    id: pk.to_owned(),
                });
            }
            let mut seen: HashSet<String> = HashSet::with_capacity(prepared.len());
            let mut ops = Vec::with_capacity(prepared.len());
            for (i, (device_name, outcome)) in prepared.into_iter().enumerate() {
                let failed = |e: RegistryError| RowResult::Failed {
                    row: i + 1,
                    device_name: device_name.clone(),
                    error_code: e.code().to_owned(),
                    message: e.to_string(),
                };
                let (name, state) = match outcome {
                    Ok(ok) => ok,
                    Err(e) => {
                        results.push(failed(e));
                        continue;
                    }
                };
                // Checked before `index`, which already holds this batch's earlier rows.
                if !seen.insert(name.clone()) {
                    results.push(failed(RegistryError::Invalid {
                        field: "device_name",
                        message: format!("{name:?} appears more than once in this batch"),
                    }));
                    continue;
                }
                if index.names.contains(&name) {
                    results.push(failed(RegistryError::AlreadyExists {
                        kind: "device",
                        id: name,
                    }));
                    continue;
                }
                ops.push(Op::PutDevice(state.record(pk, &name)));
                results.push(RowResult::Created(state.to_device(pk, &name)));
                created.push((name.clone(), state.generation));
                index.names.insert(name.clone());
                entry.devices.insert(name, state);
            }
            (!ops.is_empty()).then(|| self.store.submit(ops))
        };
        if let Some(ticket) = ticket {
            if let Err(e) = ticket.await {
                self.undo_creates(&entry, &created);
                return Err(e.into());
            }
            self.notify(DeviceChange::Created {
                product_key: pk.to_owned(),
                device_names: created.into_iter().map(|(name, _)| name).collect(),
            })
            .await;
        }
        Ok(results)
    }

    pub fn get_device(&self, pk: &str, dn: &str) -> Result<Device> {
        let entry = self.product_or_not_found(pk)?;
        let device = entry.devices.get(dn).map(|d| d.to_device(pk, dn));
        device.ok_or_else(|| device_not_found(pk, dn))
    }

    /// Devices of `pk` matching `filter`, ordered by device name.
    pub fn list_devices(
        &self,
        pk: &str,
        filter: &DeviceFilter,
        page: Page,
    ) -> Result<Paged<Device>> {
        filter.validate()?;
        let entry = self.product_or_not_found(pk)?;
        let index = read(&entry.index);
        let matches = |d: &DeviceState| {
            filter
                .online
                .is_none_or(|online| d.session.is_some() == online)
                && filter.tag_key.as_ref().is_none_or(|key| {
                    match (d.tags.get(key), &filter.tag_value) {
                        (None, _) => false,
                        (Some(_), None) => true,
                        (Some(v), Some(want)) => v == want,
                    }
                })
        };
        let unfiltered = filter.online.is_none() && filter.tag_key.is_none();
        let mut items = Vec::new();
        let total = if unfiltered {
            for name in index
                .names
                .iter()
                .skip(page.offset())
                .take(page.page_size as usize)
            {
                if let Some(d) = entry.devices.get(name) {
                    items.push(d.to_device(pk, name));
                }
            }
            index.names.len() as u64
        } else {
            let mut total = 0usize;
            for name in &index.names {
                let Some(d) = entry.devices.get(name) else {
                    continue;
                };
                if !matches(&d) {
                    continue;
                }
                if total >= page.offset() && items.len() < page.page_size as usize {
                    items.push(d.to_device(pk, name));
                }
                total += 1;
            }
            total as u64
        };
        Ok(Paged {
            items,
            total,
            page: page.page,
            page_size: page.page_size,
        })
    }

    /// Changes `enabled` and/or replaces `tags` (observers hear of changed tags).
    pub async fn update_device(&self, pk: &str, dn: &str, update: DeviceUpdate) -> Result<Device> {
        if let Some(tags) = &update.tags {
            validate::tags(tags)?;
        }
        let entry = self.product_or_not_found(pk)?;
        let (device, ticket, tags_changed) = {
            let mut d = entry
                .devices
                .get_mut(dn)
                .ok_or_else(|| device_not_found(pk, dn))?;
            if let Some(enabled) = update.enabled {
                d.enabled = enabled;
            }
            let mut tags_changed = false;
            if let Some(tags) = update.tags {
                tags_changed = tags != d.tags;
                d.tags = tags;
            }
            let ticket = self.store.submit(vec![Op::PutDevice(d.record(pk, dn))]);
            (d.to_device(pk, dn), ticket, tags_changed)
        };
        ticket.await?;
        if tags_changed {
            // DYNAMIC OTA jobs targeting tags may take the device now.
            self.notify(DeviceChange::TagsChanged {
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
            })
            .await;
        }
        Ok(device)
    }

    /// Deletes a device. Observers are told once the delete is durable (its OTA tasks end,
    /// its migration record goes) and have handled it when this returns.
    pub async fn delete_device(&self, pk: &str, dn: &str) -> Result<()> {
        let entry = self.product_or_not_found(pk)?;
        let (ticket, instance_id) = {
            let mut index = write(&entry.index);
            let Some((_, state)) = entry.devices.remove(dn) else {
                return Err(device_not_found(pk, dn));
            };
            index.names.remove(dn);
            if state.session.is_some() {
                self.went_offline();
            }
            // Under the index lock, so a re-create of the same name is ordered after the delete.
            let ticket = self.store.submit(vec![Op::DeleteDevice {
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
            }]);
            (ticket, state.instance_id)
        };
        ticket.await?;
        self.notify(DeviceChange::Deleted {
            product_key: pk.to_owned(),
            device_name: dn.to_owned(),
            instance_id,
        })
        .await;
        Ok(())
    }

    // ----- ownership (instance migration) -----

    /// Device names of `pk` after `after` (exclusive; from the start when `None`), sorted, at
    /// most `limit`. A cursor for walking a large product without copying all its names.
    pub fn device_names_after(
        &self,
        pk: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        use std::ops::Bound;
        let entry = self.product_or_not_found(pk)?;
        let index = read(&entry.index);
        let start = match after {
            Some(a) => Bound::Excluded(a.to_owned()),
            None => Bound::Unbounded,
        };
        Ok(index
            .names
            .range((start, Bound::Unbounded))
            .take(limit)
            .cloned()
            .collect())
    }

    /// Moves one device to instance `instance_id` (see [`Registry::set_devices_instance`]).
    pub async fn set_device_instance(
        &self,
        pk: &str,
        dn: &str,
        instance_id: &str,
    ) -> Result<Device> {
        let mut results = self
            .set_devices_instance(pk, &[dn.to_owned()], instance_id, |_| Vec::new())
            .await?;
        results
            .pop()
            .unwrap_or_else(|| Err(device_not_found(pk, dn)))
    }

    /// Moves devices of `pk` to instance `instance_id` (the owner of their data), one result
    /// per name in input order: the device as it is now, or `NotFound` for a name that is not a
    /// device (nothing is written for it and `extra` is not called).
    ///
    /// Each device's change is ONE atomic store submission together with the ops `extra(name)`
    /// returns, so a caller's own record of the move (the migration engine's per-device status)
    /// can never disagree with the ownership after a crash. Submissions are made under the
    /// device's guard (store order = memory order) and group-committed by the writer, so a
    /// batch of hundreds costs about one transaction. A device already in `instance_id` gets
    /// only its `extra` ops. A device whose submission fails to commit is put back to its
    /// previous instance in memory (unless it changed since) and reported as `Store`.
    ///
    /// Errors for the whole call: the instance or the product does not exist.
    pub async fn set_devices_instance(
        &self,
        pk: &str,
        names: &[String],
        instance_id: &str,
        mut extra: impl FnMut(&str) -> Vec<Op>,
    ) -> Result<Vec<Result<Device>>> {
        if !self.instances.contains_key(instance_id) {
            return Err(RegistryError::NotFound {
                kind: "instance",
                id: instance_id.to_owned(),
            });
        }
        let entry = self.product_or_not_found(pk)?;
        // (index in `names`, previous instance, ticket) per submitted device.
        let mut pending: Vec<(usize, Option<String>, Ticket)> = Vec::with_capacity(names.len());
        let mut results: Vec<Result<Device>> = Vec::with_capacity(names.len());
        for (i, dn) in names.iter().enumerate() {
            let Some(mut d) = entry.devices.get_mut(dn.as_str()) else {
                results.push(Err(device_not_found(pk, dn)));
                continue;
            };
            let mut ops = Vec::new();
            let previous = if d.instance_id != instance_id {
                let previous = std::mem::replace(&mut d.instance_id, instance_id.to_owned());
                ops.push(Op::PutDevice(d.record(pk, dn)));
                Some(previous)
            } else {
                None
            };
            ops.extend(extra(dn));
            // Under the device guard: store order = memory order.
            pending.push((i, previous, self.store.submit(ops)));
            results.push(Ok(d.to_device(pk, dn)));
        }
        let outcomes = futures_util::future::join_all(
            pending
                .into_iter()
                .map(|(i, previous, ticket)| async move { (i, previous, ticket.await) }),
        )
        .await;
        for (i, previous, outcome) in outcomes {
            let Err(e) = outcome else { continue };
            if let Some(previous) = previous {
                if let Some(mut d) = entry.devices.get_mut(names[i].as_str()) {
                    if d.instance_id == instance_id {
                        d.instance_id = previous;
                    }
                }
            }
            results[i] = Err(e.into());
        }
        Ok(results)
    }

    // ----- broker / ingest hot path -----

    /// What the broker needs to check a CONNECT; `None` for unknown devices.
    pub fn credentials(&self, pk: &str, dn: &str) -> Option<DeviceCredentials> {
        let entry = self.product(pk)?;
        let d = entry.devices.get(dn)?;
        Some(DeviceCredentials {
            device_secret: d.device_secret.clone(),
            enabled: d.enabled,
        })
    }

    fn went_offline(&self) {
        self.online.fetch_sub(1, Ordering::Relaxed);
        self.metrics.connected_devices.dec();
    }

    fn went_online(&self) {
        self.online.fetch_add(1, Ordering::Relaxed);
        self.metrics.connected_devices.inc();
    }

    /// A device authenticated on the connection whose session epoch is `conn_id`: online,
    /// `last_seen`, `client_ip`. Persisted without waiting. A takeover (new connection while
    /// online) just moves ownership to the new session.
    pub fn device_connected(
        &self,
        pk: &str,
        dn: &str,
        conn_id: u64,
        client_ip: IpAddr,
        at_ms: i64,
    ) {
        let Some(entry) = self.product(pk) else {
            return;
        };
        let Some(mut d) = entry.devices.get_mut(dn) else {
            return;
        };
        if d.session.is_none() {
            self.went_online();
        }
        let ip = client_ip.to_string();
        d.session = Some(conn_id);
        d.epoch_seen = d.epoch_seen.max(conn_id);
        d.last_seen_ms = Some(at_ms);
        d.client_ip = Some(ip.clone());
        // Submitted under the device guard: store order = memory order. Not awaited.
        drop(self.store.submit(vec![Op::SetConnection {
            product_key: pk.to_owned(),
            device_name: dn.to_owned(),
            last_seen_ms: at_ms,
            client_ip: Some(ip),
            session: SessionWrite::Online(conn_id),
        }]));
    }

    /// The session `conn_id` of a device ended. Ignored unless it is the device's current
    /// session (the old session of a takeover closes after the new one connected).
    pub fn device_disconnected(&self, pk: &str, dn: &str, conn_id: u64, at_ms: i64) {
        let Some(entry) = self.product(pk) else {
            return;
        };
        let Some(mut d) = entry.devices.get_mut(dn) else {
            return;
        };
        if d.session != Some(conn_id) {
            return;
        }
        d.session = None;
        d.last_seen_ms = Some(at_ms);
        self.went_offline();
        drop(self.store.submit(vec![Op::SetConnection {
            product_key: pk.to_owned(),
            device_name: dn.to_owned(),
            last_seen_ms: at_ms,
            client_ip: d.client_ip.clone(),
            session: SessionWrite::Offline(conn_id),
        }]));
    }

    /// A device reported `version` for `module`; returns once durable.
    pub async fn report_version(
        &self,
        pk: &str,
        dn: &str,
        module: &str,
        version: &str,
        at_ms: i64,
    ) -> Result<()> {
        let mut writes = VersionWrites::default();
        self.stage_version(&mut writes, pk, dn, module, version, at_ms)?;
        self.commit_versions(writes).await
    }

    /// Applies a version report to the registry now and adds its store write to `writes`
    /// (ingest stages a connection's run of reports, then commits them with one submission).
    /// A report of the same row staged earlier in `writes` is replaced: only the last one of
    /// a run is written. An unchanged version adds no write, but the commit still waits for
    /// whatever is queued before it (the report that set it may not be durable yet). A module
    /// beyond [`RegistryLimits::max_modules_per_device`] is refused, changing nothing.
    pub fn stage_version(
        &self,
        writes: &mut VersionWrites,
        pk: &str,
        dn: &str,
        module: &str,
        version: &str,
        at_ms: i64,
    ) -> Result<()> {
        validate::module(module)?;
        validate::version(version)?;
        let entry = self.product_or_not_found(pk)?;
        let mut d = entry
            .devices
            .get_mut(dn)
            .ok_or_else(|| device_not_found(pk, dn))?;
        let modules = d.versions.len();
        match d.versions.get_mut(module) {
            Some(current) if current == version => return Ok(()),
            Some(current) => version.clone_into(current),
            None if modules >= self.limits.max_modules_per_device => {
                return Err(RegistryError::TooMany {
                    field: "modules",
                    max: self.limits.max_modules_per_device,
                });
            }
            None => {
                d.versions.insert(module.to_owned(), version.to_owned());
            }
        }
        drop(d);
        // A device reporting faster than the store commits: its earlier report of this row in
        // the run is superseded in place (same position, new version).
        let earlier = writes.ops.iter_mut().find_map(|op| match op {
            Op::SetVersion {
                product_key,
                device_name,
                module: m,
                version: v,
                reported_at_ms,
            } if m == module && device_name == dn && product_key == pk => Some((v, reported_at_ms)),
            _ => None,
        });
        if let Some((v, reported_at_ms)) = earlier {
            version.clone_into(v);
            *reported_at_ms = at_ms;
            return Ok(());
        }
        writes.ops.push(Op::SetVersion {
            product_key: pk.to_owned(),
            device_name: dn.to_owned(),
            module: module.to_owned(),
            version: version.to_owned(),
            reported_at_ms: at_ms,
        });
        Ok(())
    }

    /// Writes the staged reports in one store submission; returns once durable, together
    /// with everything queued before.
    pub async fn commit_versions(&self, writes: VersionWrites) -> Result<()> {
        self.store.submit(writes.ops).await?;
        Ok(())
    }

    /// The instance that owns a device (the forwarder's routing lookup: no clone of tags or
    /// versions); `None` for unknown devices.
    pub fn device_instance(&self, pk: &str, dn: &str) -> Option<String> {
        let entry = self.product(pk)?;
        let d = entry.devices.get(dn)?;
        Some(d.instance_id.clone())
    }

    /// Devices currently online.
    pub fn online_count(&self) -> usize {
        self.online.load(Ordering::Relaxed)
    }

    /// Resolves once everything queued so far is committed.
    pub async fn flush(&self) -> Result<()> {
        Ok(self.store.flush().await?)
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
