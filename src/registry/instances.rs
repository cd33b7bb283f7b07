//! Instances of [`Registry`]: create, list, get, usage, and the checks and store writes of
//! deleting one.

use super::*;

impl Registry {
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
}
