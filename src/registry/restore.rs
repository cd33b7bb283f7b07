//! Restoring objects from an export package (used by [`crate::export`]): a product with the
//! secret it had on its source gateway, and overwriting a device's configured fields
//! (secret included). Same locking and durability rules as the rest of the registry: the store
//! op is submitted while the in-memory entry is locked, and the call returns once committed.

use super::*;

impl Registry {
    /// Creates a product with a given key and (when `Some`) secret; `AlreadyExists` if the key
    /// is taken. The instance must exist.
    pub async fn restore_product(
        &self,
        new: NewProduct,
        product_secret: Option<String>,
    ) -> Result<Product> {
        validate::name("name", &new.name)?;
        if let Some(d) = &new.description {
            validate::description(d)?;
        }
        let Some(product_key) = new.product_key else {
            return Err(RegistryError::Invalid {
                field: "product_key",
                message: "required to restore a product".into(),
            });
        };
        validate::product_key(&product_key)?;
        let instance_id = new
            .instance_id
            .unwrap_or_else(|| DEFAULT_INSTANCE_ID.to_owned());
        if !self.instances.contains_key(&instance_id) {
            return Err(RegistryError::NotFound {
                kind: "instance",
                id: instance_id,
            });
        }
        let product_secret = match product_secret {
            Some(s) => {
                // Same shape as a device secret: printable, bounded.
                validate::device_secret(&s).map_err(|_| RegistryError::Invalid {
                    field: "product_secret",
                    message: "must be 1 to 64 printable ASCII characters".into(),
                })?;
                s
            }
            None => validate::generate_product_secret(),
        };
        let product = Product {
            product_key,
            product_secret,
            name: new.name,
            instance_id,
            description: new.description,
            created_at_ms: now_ms(),
            device_count: 0,
        };
        let (entry, ticket) = match self.products.entry(product.product_key.clone()) {
            Entry::Occupied(_) => {
                return Err(RegistryError::AlreadyExists {
                    kind: "product",
                    id: product.product_key,
                })
            }
            Entry::Vacant(slot) => self.occupy(slot, &product),
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

    /// Replaces an existing device's secret (when `Some`), `enabled` and tags. Returns the
    /// device before and after, taken under the same lock, so the caller can tell whether a
    /// connected device must be disconnected. Observers hear of a disabling and of new tags
    /// (in that order, as from an update: DYNAMIC OTA jobs targeting tags may take the device).
    pub async fn overwrite_device(
        &self,
        pk: &str,
        dn: &str,
        device_secret: Option<String>,
        enabled: bool,
        tags: BTreeMap<String, String>,
    ) -> Result<(Device, Device)> {
        if let Some(s) = &device_secret {
            validate::device_secret(s)?;
        }
        validate::tags(&tags)?;
        let entry = self.product_or_not_found(pk)?;
        let (device, ticket) = {
            let mut d = entry
                .devices
                .get_mut(dn)
                .ok_or_else(|| device_not_found(pk, dn))?;
            let before = d.to_device(pk, dn);
            if let Some(s) = device_secret {
                d.device_secret = s;
            }
            d.enabled = enabled;
            d.tags = tags;
            let ticket = self.store.submit(vec![Op::PutDevice(d.record(pk, dn))]);
            ((before, d.to_device(pk, dn)), ticket)
        };
        ticket.await?;
        let (before, after) = &device;
        if before.enabled && !after.enabled {
            self.notify(DeviceChange::Disabled {
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
            })
            .await;
        }
        if before.tags != after.tags {
            self.notify(DeviceChange::TagsChanged {
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
            })
            .await;
        }
        Ok(device)
    }
}
