//! Changes another cluster node made, applied to this node's memory only: they are durable
//! already (the node that made them committed them to the shared store before announcing them
//! on the change feed, `crate::cluster`), so nothing here writes to the store.
//!
//! - **Sessions** ([`Registry::apply_session`]) carry their epoch (`cluster::epoch`): the
//!   higher epoch holds the device, an event about an older session changes nothing, and a
//!   session this node holds that a newer one supersedes is handed back to the caller to end.
//! - **Versions** carry their values, applied in the order their node committed them.
//! - **Configuration** (instances, products, devices) is not carried: the feed says *what*
//!   changed and the caller re-reads it from the store, so two nodes' changes to one device
//!   that arrive in either order still leave the state the store has ([`Registry::refresh_device`]).
//! - **Resync** ([`Registry::resync`]) replaces everything with a snapshot of the store, after
//!   a node missed feed messages.
//!
//! Observers hear of devices created, re-tagged, disabled or deleted elsewhere (a device
//! deleted and created again: of both; a removed product: of each device it still had here),
//! as they do of local changes. Same locking rules as the rest of the registry: product index → device shard, no
//! guard across an await.

use super::*;
use crate::store::StoredDevice;

/// A connection event of a session held by another node (or of one of ours, replayed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEvent {
    /// The session's epoch (`cluster::epoch`): its node and its order.
    pub epoch: u64,
    /// Connected (`true`) or ended.
    pub online: bool,
    pub at_ms: i64,
    pub client_ip: Option<String>,
}

/// A session that a change made elsewhere ends: the caller closes it if its node is this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superseded {
    pub product_key: String,
    pub device_name: String,
    /// The ended session's epoch.
    pub epoch: u64,
}

/// What a [`Registry::resync`] changed that its caller must act on.
#[derive(Debug, Default)]
pub struct Resynced {
    /// This node's sessions the store says were superseded (to end).
    pub ended: Vec<Superseded>,
    /// Versions taken from the store (devices another node held last): the engines' holder
    /// hears of them as of a version report.
    pub versions: Vec<VersionTaken>,
}

/// A device's module version the resync took from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionTaken {
    pub product_key: String,
    pub device_name: String,
    pub module: String,
    pub version: String,
}

impl Registry {
    /// Applies another node's connection event. Returns the session it supersedes (a newer
    /// session elsewhere ends the one held until now), if any.
    pub fn apply_session(&self, pk: &str, dn: &str, event: &SessionEvent) -> Option<Superseded> {
        self.epochs.observe(event.epoch);
        let entry = self.product(pk)?;
        let mut d = entry.devices.get_mut(dn)?;
        if event.online {
            if event.epoch <= d.epoch_seen {
                // Older than what this device already had (or a replay): the newer session
                // holds it, and its node ends the older one when it hears of the newer.
                return None;
            }
            d.epoch_seen = event.epoch;
            let previous = d.session.replace(event.epoch);
            if previous.is_none() {
                self.online.fetch_add(1, Ordering::Relaxed);
            }
            d.last_seen_ms = Some(event.at_ms);
            d.client_ip.clone_from(&event.client_ip);
            previous.map(|epoch| Superseded {
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
                epoch,
            })
        } else {
            d.epoch_seen = d.epoch_seen.max(event.epoch);
            if d.session == Some(event.epoch) {
                d.session = None;
                d.last_seen_ms = Some(event.at_ms);
                self.online.fetch_sub(1, Ordering::Relaxed);
            }
            None
        }
    }

    /// Applies a version report another node committed.
    pub fn apply_version(&self, pk: &str, dn: &str, module: &str, version: &str) {
        let Some(entry) = self.product(pk) else {
            return;
        };
        let Some(mut d) = entry.devices.get_mut(dn) else {
            return;
        };
        match d.versions.get_mut(module) {
            Some(current) => version.clone_into(current),
            None => {
                d.versions.insert(module.to_owned(), version.to_owned());
            }
        }
    }

    /// The epoch of the session holding a device (any node's), if one does: the directory
    /// that downlinks to another node's device follow.
    pub fn session_of(&self, pk: &str, dn: &str) -> Option<u64> {
        let entry = self.product(pk)?;
        let d = entry.devices.get(dn)?;
        d.session
    }

    /// Sessions of `node` drawn before `before_ms` end (the node restarted, or is gone): their
    /// devices go offline here. Returns how many did.
    pub fn release_node(&self, node: u16, before_ms: i64, at_ms: i64) -> usize {
        use crate::cluster::epoch::{millis_of, node_of};
        let mut released = 0;
        let entries: Vec<Arc<ProductEntry>> = self
            .products
            .iter()
            .map(|e| Arc::clone(e.value()))
            .collect();
        for entry in entries {
            for mut d in entry.devices.iter_mut() {
                if d.session
                    .is_some_and(|e| node_of(e) == node && millis_of(e) < before_ms)
                {
                    d.session = None;
                    d.last_seen_ms = Some(at_ms);
                    self.online.fetch_sub(1, Ordering::Relaxed);
                    released += 1;
                }
            }
        }
        released
    }

    /// An instance as the store has it now.
    pub fn refresh_instance(&self, record: InstanceRecord) {
        self.instances.insert(
            record.instance_id.clone(),
            Instance {
                instance_id: record.instance_id,
                name: record.name,
                created_at_ms: record.created_at_ms,
            },
        );
    }

    /// An instance the store no longer has (deleted through another node, which refused the
    /// delete while a product or device named it, so none does here either once their own
    /// changes are applied).
    pub fn forget_instance(&self, instance_id: &str) {
        if self.instances.remove(instance_id).is_some() {
            tracing::debug!(instance_id, "instance deleted elsewhere");
        }
    }

    /// A product as the store has it now (`None`: it is gone). Its devices are refreshed on
    /// their own; a product is only removed here once it has none (the store refuses to delete
    /// a product with devices, so they are gone or going). Devices this node still had under
    /// a removed product (their own deletions arrive in the same feed message, after the
    /// product's, or were missed before a resync) are deleted here as by
    /// [`refresh_device`](Self::refresh_device): observers hear of each, and their sessions
    /// are returned for the caller to end.
    pub async fn refresh_product(
        &self,
        pk: &str,
        record: Option<ProductRecord>,
    ) -> Vec<Superseded> {
        let (changes, ended) = self.refresh_product_now(pk, record);
        for change in changes {
            self.notify(change).await;
        }
        ended
    }

    fn refresh_product_now(
        &self,
        pk: &str,
        record: Option<ProductRecord>,
    ) -> (Vec<DeviceChange>, Vec<Superseded>) {
        match record {
            Some(record) => {
                let mut gone = (Vec::new(), Vec::new());
                if let Some(entry) = self.product(pk) {
                    if entry.product.created_at_ms == record.created_at_ms {
                        return gone;
                    }
                    // Deleted and created again elsewhere: the old entry goes first.
                    gone = self.forget_product(pk, &entry);
                }
                let entry = product_entry(record);
                let order_key = (entry.product.name.clone(), pk.to_owned());
                self.products.insert(pk.to_owned(), Arc::new(entry));
                write(&self.product_order).insert(order_key);
                gone
            }
            None => match self.product(pk) {
                Some(entry) => self.forget_product(pk, &entry),
                None => (Vec::new(), Vec::new()),
            },
        }
    }

    /// Removes a product and the devices it still has: their deletions (for observers) and
    /// their sessions (to end).
    fn forget_product(
        &self,
        pk: &str,
        entry: &Arc<ProductEntry>,
    ) -> (Vec<DeviceChange>, Vec<Superseded>) {
        let (mut changes, mut ended) = (Vec::new(), Vec::new());
        let mut index = write(&entry.index);
        index.deleted = true;
        for name in std::mem::take(&mut index.names) {
            if let Some((_, d)) = entry.devices.remove(&name) {
                if let Some(epoch) = d.session {
                    self.online.fetch_sub(1, Ordering::Relaxed);
                    ended.push(Superseded {
                        product_key: pk.to_owned(),
                        device_name: name.clone(),
                        epoch,
                    });
                }
                changes.push(DeviceChange::Deleted {
                    product_key: pk.to_owned(),
                    device_name: name,
                    instance_id: d.instance_id,
                    elsewhere: true,
                });
            }
        }
        self.products.remove_if(pk, |_, v| Arc::ptr_eq(v, entry));
        write(&self.product_order).remove(&(entry.product.name.clone(), pk.to_owned()));
        (changes, ended)
    }

    /// A device as the store has it now (`None`: it is gone). Observers hear of a creation, a
    /// deletion, a disabling or new tags, as they do of the same change made through this
    /// node; a session of this node that may no longer stand (the device was deleted,
    /// disabled, re-keyed or moved to another instance) is returned for the caller to end.
    pub async fn refresh_device(
        &self,
        pk: &str,
        dn: &str,
        stored: Option<StoredDevice>,
    ) -> Option<Superseded> {
        let (changes, revoked) = self.refresh_device_now(pk, dn, stored);
        for change in changes {
            self.notify(change).await;
        }
        revoked
    }

    /// The changes for observers are in the order a local update tells them (a disabling
    /// before new tags).
    fn refresh_device_now(
        &self,
        pk: &str,
        dn: &str,
        stored: Option<StoredDevice>,
    ) -> (Vec<DeviceChange>, Option<Superseded>) {
        let superseded = |epoch: Option<u64>| {
            epoch.map(|epoch| Superseded {
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
                epoch,
            })
        };
        let Some(entry) = self.product(pk) else {
            return (Vec::new(), None);
        };
        let mut index = write(&entry.index);
        let Some(stored) = stored else {
            let Some((_, old)) = entry.devices.remove(dn) else {
                return (Vec::new(), None);
            };
            index.names.remove(dn);
            if old.session.is_some() {
                self.online.fetch_sub(1, Ordering::Relaxed);
            }
            let change = DeviceChange::Deleted {
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
                instance_id: old.instance_id,
                elsewhere: true,
            };
            return (vec![change], superseded(old.session));
        };
        let record = stored.record.clone();
        // Same device (same creation) still here: its configured fields change in place.
        let updated = entry
            .devices
            .get_mut(dn)
            .filter(|d| d.created_at_ms == record.created_at_ms)
            .map(|mut d| {
                let revoked = !record.enabled
                    || record.device_secret != d.device_secret
                    || record.instance_id != d.instance_id;
                let disabled = d.enabled && !record.enabled;
                let tags_changed = record.tags != d.tags;
                d.device_secret = record.device_secret.clone();
                d.instance_id = record.instance_id.clone();
                d.enabled = record.enabled;
                d.tags = record.tags.clone();
                let mut changes = Vec::new();
                if disabled {
                    changes.push(DeviceChange::Disabled {
                        product_key: pk.to_owned(),
                        device_name: dn.to_owned(),
                    });
                }
                if tags_changed {
                    changes.push(DeviceChange::TagsChanged {
                        product_key: pk.to_owned(),
                        device_name: dn.to_owned(),
                    });
                }
                (changes, if revoked { d.session } else { None })
            });
        if let Some((changes, revoked)) = updated {
            return (changes, superseded(revoked));
        }
        // New here, or deleted and created again elsewhere since this node saw it.
        let state = self.device_state(stored);
        let online = state.session.is_some();
        let (old_session, old_instance) = match entry.devices.insert(dn.to_owned(), state) {
            Some(old) => {
                if old.session.is_some() {
                    self.online.fetch_sub(1, Ordering::Relaxed);
                }
                (old.session, Some(old.instance_id))
            }
            None => (None, None),
        };
        if online {
            self.online.fetch_add(1, Ordering::Relaxed);
        }
        index.names.insert(dn.to_owned());
        let mut changes = Vec::new();
        if let Some(old) = &old_instance {
            // Deleted and created again elsewhere: observers hear of both, as they would have
            // from the two feed messages.
            changes.push(DeviceChange::Deleted {
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
                instance_id: old.clone(),
                elsewhere: true,
            });
        }
        changes.push(DeviceChange::Created {
            product_key: pk.to_owned(),
            device_names: vec![dn.to_owned()],
        });
        (changes, superseded(old_session))
    }

    /// Makes memory equal to `snapshot` (a consistent read of the store), after this node
    /// missed feed messages. Sessions of this node are kept unless the store knows a newer
    /// session of the device (then it is returned, to end); devices and products the store no
    /// longer has are removed. Observers hear of what changed.
    pub async fn resync(&self, snapshot: Snapshot) -> Resynced {
        let stored_instances: HashSet<String> = snapshot
            .instances
            .iter()
            .map(|i| i.instance_id.clone())
            .collect();
        for instance in snapshot.instances {
            self.refresh_instance(instance);
        }
        let gone: Vec<String> = self
            .instances
            .iter()
            .map(|e| e.key().clone())
            .filter(|id| !stored_instances.contains(id))
            .collect();
        for id in gone {
            self.forget_instance(&id);
        }
        let mut stored_products: HashSet<String> = HashSet::new();
        let mut ended = Vec::new();
        let mut changes = Vec::new();
        for product in snapshot.products {
            stored_products.insert(product.product_key.clone());
            let pk = product.product_key.clone();
            // Deleted and created again elsewhere: the old one's devices go.
            let (gone, revoked) = self.refresh_product_now(&pk, Some(product));
            changes.extend(gone);
            ended.extend(revoked);
        }
        let mut by_product: BTreeMap<String, BTreeMap<String, StoredDevice>> = BTreeMap::new();
        for d in snapshot.devices {
            by_product
                .entry(d.record.product_key.clone())
                .or_default()
                .insert(d.record.device_name.clone(), d);
        }
        let mut versions = Vec::new();
        let known: Vec<String> = self.products.iter().map(|e| e.key().clone()).collect();
        for pk in known {
            if !stored_products.contains(&pk) {
                // Gone from the store: its devices first (observers hear of each).
                let names = self
                    .product(&pk)
                    .map(|e| read(&e.index).names.iter().cloned().collect::<Vec<_>>())
                    .unwrap_or_default();
                for dn in names {
                    let (change, revoked) = self.refresh_device_now(&pk, &dn, None);
                    changes.extend(change);
                    ended.extend(revoked);
                }
                let (gone, revoked) = self.refresh_product_now(&pk, None);
                changes.extend(gone);
                ended.extend(revoked);
                continue;
            }
            let mut stored = by_product.remove(&pk).unwrap_or_default();
            let names = self
                .product(&pk)
                .map(|e| read(&e.index).names.iter().cloned().collect::<Vec<_>>())
                .unwrap_or_default();
            for dn in names {
                let fresh = stored.remove(&dn);
                let session = fresh.as_ref().and_then(|f| f.session);
                let stored_versions = fresh.as_ref().map(|f| {
                    let last = f.epoch_seen.max(f.session.unwrap_or(0));
                    (f.versions.clone(), last)
                });
                let (change, revoked) = self.refresh_device_now(&pk, &dn, fresh);
                if let Some((stored_versions, last)) = stored_versions {
                    versions.extend(self.take_stored_versions(&pk, &dn, stored_versions, last));
                }
                changes.extend(change);
                ended.extend(revoked);
                ended.extend(self.resync_session(&pk, &dn, session));
            }
            for (dn, fresh) in stored {
                let (change, revoked) = self.refresh_device_now(&pk, &dn, Some(fresh));
                changes.extend(change);
                ended.extend(revoked);
            }
        }
        for change in changes {
            self.notify(change).await;
        }
        Resynced { ended, versions }
    }

    /// A device's versions are written by the node that last held it (its reports arrive over
    /// that node's session). This node keeps its own, whose writes may still be on their way
    /// to the store, and takes the store's for any other device: a report whose feed message
    /// never arrived (its node died between COMMIT and publishing) is in the store and nowhere
    /// else. Returns the versions that changed here.
    fn take_stored_versions(
        &self,
        pk: &str,
        dn: &str,
        stored: BTreeMap<String, String>,
        stored_last: u64,
    ) -> Vec<VersionTaken> {
        let Some(entry) = self.product(pk) else {
            return Vec::new();
        };
        let Some(mut d) = entry.devices.get_mut(dn) else {
            return Vec::new();
        };
        let last = d.epoch_seen.max(stored_last);
        if last != 0 && crate::cluster::epoch::node_of(last) == self.epochs.node() {
            return Vec::new();
        }
        let taken = stored
            .iter()
            .filter(|(module, version)| d.versions.get(*module) != Some(*version))
            .map(|(module, version)| VersionTaken {
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
                module: module.clone(),
                version: version.clone(),
            })
            .collect();
        d.versions = stored;
        taken
    }

    /// Aligns a device's session with the one the store knows: a newer stored session wins
    /// (this node's older one is returned, to end); a stored session older than ours, or none
    /// while we hold one, is the store lagging (our event is on its way) and changes nothing.
    fn resync_session(&self, pk: &str, dn: &str, stored: Option<u64>) -> Option<Superseded> {
        let entry = self.product(pk)?;
        let mut d = entry.devices.get_mut(dn)?;
        let stored = stored?;
        if d.session.is_some_and(|ours| ours >= stored) {
            return None;
        }
        if stored <= d.epoch_seen && d.session.is_none() {
            // The store still has a session this node already saw end.
            return None;
        }
        d.epoch_seen = d.epoch_seen.max(stored);
        let previous = d.session.replace(stored);
        if previous.is_none() {
            self.online.fetch_add(1, Ordering::Relaxed);
        }
        previous.map(|epoch| Superseded {
            product_key: pk.to_owned(),
            device_name: dn.to_owned(),
            epoch,
        })
    }

    /// Live state of a device as the store has it (sessions included: another node may hold
    /// it).
    pub(super) fn device_state(&self, stored: StoredDevice) -> DeviceState {
        if let Some(epoch) = stored.session {
            self.epochs.observe(epoch);
        }
        DeviceState {
            device_secret: stored.record.device_secret,
            instance_id: stored.record.instance_id,
            enabled: stored.record.enabled,
            tags: stored.record.tags,
            session: stored.session,
            epoch_seen: stored.epoch_seen.max(stored.session.unwrap_or(0)),
            last_seen_ms: stored.last_seen_ms,
            client_ip: stored.client_ip,
            versions: stored.versions,
            created_at_ms: stored.record.created_at_ms,
            generation: self.next_generation(),
            created_epoch: self.epochs.current(),
        }
    }
}

/// A product's in-memory entry, with no devices yet.
pub(super) fn product_entry(p: ProductRecord) -> ProductEntry {
    ProductEntry {
        product: Product {
            product_key: p.product_key,
            product_secret: p.product_secret,
            name: p.name,
            instance_id: p.instance_id,
            description: p.description,
            created_at_ms: p.created_at_ms,
            device_count: 0,
        },
        devices: DashMap::new(),
        index: RwLock::new(DeviceIndex::default()),
    }
}

#[cfg(test)]
#[path = "remote_tests.rs"]
mod tests;
