//! Devices of [`Registry`]: validation into state, create (one or a batch), get, list,
//! update, delete.

use super::*;

impl Registry {
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
            // Set again when the device is inserted (under the index lock).
            created_epoch: self.epochs.current(),
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
        let (name, mut state) = self.prepare_device(&entry, new)?;
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
            // After an earlier device of the name was deleted (it is not in the index).
            state.created_epoch = self.epochs.current();
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
                let (name, mut state) = match outcome {
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
                state.created_epoch = self.epochs.current();
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

    /// Changes `enabled` and/or replaces `tags` (observers hear of a disabling and of changed
    /// tags).
    pub async fn update_device(&self, pk: &str, dn: &str, update: DeviceUpdate) -> Result<Device> {
        if let Some(tags) = &update.tags {
            validate::tags(tags)?;
        }
        let entry = self.product_or_not_found(pk)?;
        let (device, ticket, tags_changed, disabled) = {
            let mut d = entry
                .devices
                .get_mut(dn)
                .ok_or_else(|| device_not_found(pk, dn))?;
            let disabled = d.enabled && update.enabled == Some(false);
            if let Some(enabled) = update.enabled {
                d.enabled = enabled;
            }
            let mut tags_changed = false;
            if let Some(tags) = update.tags {
                tags_changed = tags != d.tags;
                d.tags = tags;
            }
            let ticket = self.store.submit(vec![Op::PutDevice(d.record(pk, dn))]);
            (d.to_device(pk, dn), ticket, tags_changed, disabled)
        };
        ticket.await?;
        if disabled {
            // Messages kept for its persistent session go.
            self.notify(DeviceChange::Disabled {
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
            })
            .await;
        }
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
            elsewhere: false,
        })
        .await;
        Ok(())
    }
}
