//! Products of [`Registry`]: create (key and secret generated when absent), get, list by
//! page, delete.

use super::*;

impl Registry {
    /// Takes the product's free slot: submits the product (under the slot's guard, so store
    /// order is memory order) and puts an empty entry in; the ticket resolves once durable.
    pub(super) fn occupy(
        &self,
        slot: dashmap::mapref::entry::VacantEntry<'_, String, Arc<ProductEntry>>,
        product: &Product,
    ) -> (Arc<ProductEntry>, Ticket) {
        let ticket = self
            .store
            .submit(vec![Op::PutProduct(product_record(product))]);
        let entry = Arc::new(ProductEntry {
            product: product.clone(),
            devices: DashMap::new(),
            index: RwLock::new(DeviceIndex::default()),
        });
        slot.insert(Arc::clone(&entry));
        (entry, ticket)
    }

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
                Entry::Vacant(slot) => break self.occupy(slot, &product),
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
}
