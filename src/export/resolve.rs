//! What an export contains: the requested objects resolved against the registry, the
//! firmware repository and the engines, with their dependencies, in import order.

use super::*;

impl ExportService {
    /// The requested objects plus dependencies, in import order (products first).
    pub(super) fn resolve(
        &self,
        requested: &[ObjectRequest],
        secrets: SecretsFor,
    ) -> Result<Vec<ExportItem>, ExportError> {
        let mut out: BTreeMap<(u8, String), ExportItem> = BTreeMap::new();
        let mut unknown = Vec::new();
        let mut expanded_products: HashSet<String> = HashSet::new();
        for r in requested {
            let deps = r.include_dependencies.unwrap_or(true);
            let found = match r.object_type {
                ObjectType::Product => {
                    self.add_product(&mut out, &r.id, secrets, deps, &mut expanded_products)
                }
                ObjectType::Device => match r.id.split_once('/') {
                    Some((pk, dn)) => {
                        let ok = self.add_device(&mut out, pk, dn, secrets);
                        if ok && deps {
                            self.add_product(&mut out, pk, secrets, false, &mut expanded_products);
                        }
                        ok
                    }
                    None => false,
                },
                ObjectType::Firmware => {
                    let pk = self.add_firmware(&mut out, &r.id);
                    if let (Some(pk), true) = (&pk, deps) {
                        self.add_product(&mut out, pk, secrets, false, &mut expanded_products);
                    }
                    pk.is_some()
                }
                ObjectType::OtaJob => {
                    self.add_job(&mut out, &r.id, secrets, deps, &mut expanded_products)
                }
                ObjectType::MigrationTask => {
                    self.add_migration(&mut out, &r.id, secrets, deps, &mut expanded_products)
                }
            };
            if !found {
                unknown.push(format!("{} {}", r.object_type.as_str(), r.id));
            }
        }
        if !unknown.is_empty() {
            return Err(ExportError::UnknownObjects(unknown));
        }
        Ok(out.into_values().collect())
    }

    fn add_product(
        &self,
        out: &mut BTreeMap<(u8, String), ExportItem>,
        pk: &str,
        secrets: SecretsFor,
        with_children: bool,
        expanded: &mut HashSet<String>,
    ) -> bool {
        let reg = &self.inner.registry;
        let Ok(p) = reg.get_product(pk) else {
            return false;
        };
        let key = (ObjectType::Product.rank(), pk.to_owned());
        if let std::collections::btree_map::Entry::Vacant(slot) = out.entry(key) {
            let instance_name = reg
                .get_instance(&p.instance_id)
                .map(|i| i.name)
                .unwrap_or_else(|_| p.instance_id.clone());
            slot.insert(ExportItem {
                id: pk.to_owned(),
                object_type: ObjectType::Product,
                name: p.name.clone(),
                path: format!("/{}/{pk}", p.instance_id),
                data: json!({
                    "product_key": p.product_key,
                    "name": p.name,
                    "description": p.description,
                    "instance_id": p.instance_id,
                    "instance_name": instance_name,
                    "created_at_ms": p.created_at_ms,
                }),
                secrets: secrets
                    .of(ObjectType::Product)
                    .then(|| json!({ "product_secret": p.product_secret })),
                blob: None,
            });
        }
        if with_children && expanded.insert(pk.to_owned()) {
            let mut page = 1;
            loop {
                let Ok(pg) = Page::new(page, 100) else { break };
                let Ok(devices) = reg.list_devices(pk, &DeviceFilter::default(), pg) else {
                    break;
                };
                let n = devices.items.len();
                for d in devices.items {
                    self.add_device(out, pk, &d.device_name, secrets);
                }
                if n < 100 {
                    break;
                }
                page += 1;
            }
            let mut page = 1;
            loop {
                let Ok(pg) = Page::new(page, 100) else { break };
                let list = self.inner.firmware.list(Some(pk), pg);
                let n = list.items.len();
                for f in list.items {
                    self.add_firmware(out, &f.firmware_id);
                }
                if n < 100 {
                    break;
                }
                page += 1;
            }
        }
        true
    }

    fn add_device(
        &self,
        out: &mut BTreeMap<(u8, String), ExportItem>,
        pk: &str,
        dn: &str,
        secrets: SecretsFor,
    ) -> bool {
        let Ok(d) = self.inner.registry.get_device(pk, dn) else {
            return false;
        };
        let id = format!("{pk}/{dn}");
        out.entry((ObjectType::Device.rank(), id.clone()))
            .or_insert_with(|| ExportItem {
                id,
                object_type: ObjectType::Device,
                name: dn.to_owned(),
                path: format!("/{}/{pk}/{dn}", d.instance_id),
                data: json!({
                    "product_key": pk,
                    "device_name": dn,
                    "enabled": d.enabled,
                    "tags": d.tags,
                    "created_at_ms": d.created_at_ms,
                }),
                secrets: secrets
                    .of(ObjectType::Device)
                    .then(|| json!({ "device_secret": d.device_secret })),
                blob: None,
            });
        true
    }

    /// Adds a firmware package; returns its product key.
    fn add_firmware(
        &self,
        out: &mut BTreeMap<(u8, String), ExportItem>,
        fid: &str,
    ) -> Option<String> {
        let f = self.inner.firmware.get(fid)?;
        let pk = f.product_key.clone();
        let instance = self
            .inner
            .registry
            .get_product(&pk)
            .map(|p| p.instance_id)
            .unwrap_or_default();
        let blob = self.inner.firmware.blob_path(&f);
        out.entry((ObjectType::Firmware.rank(), fid.to_owned()))
            .or_insert_with(|| ExportItem {
                id: fid.to_owned(),
                object_type: ObjectType::Firmware,
                name: f.name.clone(),
                path: format!("/{instance}/{pk}/firmware/{}/{}", f.module, f.version),
                data: serde_json::to_value(&f).unwrap_or_default(),
                secrets: None,
                blob: Some((f.sha256.clone(), blob)),
            });
        Some(pk)
    }

    fn add_job(
        &self,
        out: &mut BTreeMap<(u8, String), ExportItem>,
        jid: &str,
        secrets: SecretsFor,
        deps: bool,
        expanded: &mut HashSet<String>,
    ) -> bool {
        let ota = &self.inner.ota;
        let Ok(view) = ota.get_job(jid) else {
            return false;
        };
        let job = view.job;
        let fw = self.inner.firmware.get(&job.spec.firmware_id);
        let instance = self
            .inner
            .registry
            .get_product(&job.product_key)
            .map(|p| p.instance_id)
            .unwrap_or_default();
        if deps {
            self.add_product(out, &job.product_key, secrets, false, expanded);
            self.add_firmware(out, &job.spec.firmware_id);
            for dn in &job.spec.device_names {
                self.add_device(out, &job.product_key, dn, secrets);
            }
        }
        out.entry((ObjectType::OtaJob.rank(), jid.to_owned()))
            .or_insert_with(|| ExportItem {
                id: jid.to_owned(),
                object_type: ObjectType::OtaJob,
                name: job.spec.name.clone().unwrap_or_else(|| jid.to_owned()),
                path: format!("/{instance}/{}/ota/{jid}", job.product_key),
                data: json!({
                    "job": job,
                    "firmware": fw.map(|f| json!({
                        "firmware_id": f.firmware_id,
                        "product_key": f.product_key,
                        "module": f.module,
                        "version": f.version,
                        "sha256": f.sha256,
                    })),
                }),
                secrets: None,
                blob: None,
            });
        true
    }

    /// Adds a migration task: its definition (product, source and target instance, name,
    /// config) and, for information only, its state and device totals. With dependencies its
    /// product comes along with the product's devices and firmware. The target instance is not
    /// exported: it must exist on the importing gateway.
    fn add_migration(
        &self,
        out: &mut BTreeMap<(u8, String), ExportItem>,
        tid: &str,
        secrets: SecretsFor,
        deps: bool,
        expanded: &mut HashSet<String>,
    ) -> bool {
        let Ok(t) = self.inner.migration.details(tid) else {
            return false;
        };
        if deps {
            self.add_product(out, &t.product_key, secrets, true, expanded);
        }
        out.entry((ObjectType::MigrationTask.rank(), tid.to_owned()))
            .or_insert_with(|| ExportItem {
                id: tid.to_owned(),
                object_type: ObjectType::MigrationTask,
                name: t.name.clone(),
                path: format!(
                    "/{}/{}/migration/{tid}",
                    t.source_instance_id, t.product_key
                ),
                data: json!({
                    "task": {
                        "product_key": t.product_key,
                        "source_instance_id": t.source_instance_id,
                        "target_instance_id": t.target_instance_id,
                        "name": t.name,
                        "config": t.config,
                    },
                    // Information only: an import always creates the task in TO_MIGRATE.
                    "state": t.state,
                    "status": t.status,
                    "devices": t.devices,
                    "created_at_ms": t.created_at_ms,
                    "completed_at_ms": t.completed_at_ms,
                }),
                secrets: None,
                blob: None,
            });
        true
    }
}
