//! The writes of an import, in dependency order: create or overwrite each planned object.

use super::*;

impl ExportService {
    pub(super) async fn create(
        &self,
        o: &PackageObject,
        pkg: &VerifiedPackage,
        fw_map: &mut HashMap<String, String>,
    ) -> Result<Option<String>, String> {
        let reg = &self.inner.registry;
        let d = &o.data;
        match o.meta.object_type {
            ObjectType::Product => {
                let pk = str_field(d, "product_key").unwrap_or_default().to_owned();
                let iid = str_field(d, "instance_id").unwrap_or("default").to_owned();
                if reg.get_instance(&iid).is_err() {
                    let name = str_field(d, "instance_name").unwrap_or(&iid).to_owned();
                    reg.create_instance(NewInstance {
                        instance_id: Some(iid.clone()),
                        name,
                    })
                    .await
                    .map_err(|e| format!("cannot create instance {iid}: {e}"))?;
                }
                let secret = o
                    .secrets
                    .as_ref()
                    .and_then(|s| str_field(s, "product_secret"))
                    .map(str::to_owned);
                reg.restore_product(
                    NewProduct {
                        name: str_field(d, "name").unwrap_or(&pk).to_owned(),
                        product_key: Some(pk.clone()),
                        instance_id: Some(iid),
                        description: str_field(d, "description").map(str::to_owned),
                    },
                    secret,
                )
                .await
                .map_err(|e| e.to_string())?;
                Ok(Some(pk))
            }
            ObjectType::Device => {
                let pk = str_field(d, "product_key").unwrap_or_default();
                let dn = str_field(d, "device_name").unwrap_or_default();
                let tags: BTreeMap<String, String> = d
                    .get("tags")
                    .cloned()
                    .and_then(|t| serde_json::from_value(t).ok())
                    .unwrap_or_default();
                let secret = o
                    .secrets
                    .as_ref()
                    .and_then(|s| str_field(s, "device_secret"))
                    .map(str::to_owned);
                reg.create_device(
                    pk,
                    NewDevice {
                        device_name: dn.to_owned(),
                        device_secret: secret,
                        tags,
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
                if d.get("enabled").and_then(|v| v.as_bool()) == Some(false) {
                    reg.update_device(
                        pk,
                        dn,
                        crate::registry::DeviceUpdate {
                            enabled: Some(false),
                            tags: None,
                        },
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    // It existed, enabled, for a moment: a session it opened then must end.
                    (self.inner.on_device_revoked)(pk, dn);
                }
                Ok(Some(format!("{pk}/{dn}")))
            }
            ObjectType::Firmware => {
                let new_id = self.create_firmware(o, pkg).await?;
                fw_map.insert(o.meta.id.clone(), new_id.clone());
                Ok(Some(new_id))
            }
            ObjectType::OtaJob => self.create_job(o, fw_map).await.map(Some),
            ObjectType::MigrationTask => self.create_migration(o).await.map(Some),
        }
    }

    async fn create_firmware(
        &self,
        o: &PackageObject,
        pkg: &VerifiedPackage,
    ) -> Result<String, String> {
        let f: FirmwarePackage = serde_json::from_value(o.data.clone())
            .map_err(|e| format!("bad firmware object: {e}"))?;
        let blob_name = o.meta.blob.as_deref().unwrap_or_default();
        let source = pkg
            .blob(blob_name)
            .ok_or_else(|| format!("missing firmware bytes {blob_name}"))?;
        let staged = self.stage_blob(source).await?;
        let created = self
            .inner
            .firmware
            .create(
                NewFirmware {
                    product_key: f.product_key.clone(),
                    version: f.version.clone(),
                    module: Some(f.module.clone()),
                    name: Some(f.name.clone()),
                    sign_method: Some(f.sign_method),
                    src_versions: f.src_versions.clone(),
                    description: f.description.clone(),
                },
                staged,
            )
            .await
            .map_err(|e| e.to_string())?;
        if created.sha256 != f.sha256 {
            // Cannot happen after verification; never leave a package with other bytes behind.
            let _ = self
                .inner
                .firmware
                .delete(&created.firmware_id, false)
                .await;
            return Err("firmware bytes do not match the object's sha256".into());
        }
        // A package verified on the source stays verified: the bytes are the same.
        if f.status == FirmwareStatus::Verified {
            self.inner
                .firmware
                .set_status(&created.firmware_id, FirmwareStatus::Verified)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(created.firmware_id)
    }

    /// Streams a firmware file out of the package into a staged upload: inflated on a
    /// blocking thread, handed over in chunks (at most a few in flight), never whole in memory.
    async fn stage_blob(&self, source: package::BlobSource) -> Result<StagedBlob, String> {
        let mut writer = self
            .inner
            .firmware
            .begin_upload()
            .await
            .map_err(|e| e.to_string())?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let reading = tokio::task::spawn_blocking(move || {
            source.stream(|chunk| tx.blocking_send(chunk.to_vec()).is_ok())
        });
        while let Some(chunk) = rx.recv().await {
            // On an error `rx` is dropped, which stops the reader at its next chunk.
            writer.write(&chunk).await.map_err(|e| e.to_string())?;
        }
        reading
            .await
            .map_err(|e| format!("firmware read task failed: {e}"))?
            .map_err(|e| e.to_string())?;
        writer.finish().await.map_err(|e| e.to_string())
    }

    async fn create_job(
        &self,
        o: &PackageObject,
        fw_map: &HashMap<String, String>,
    ) -> Result<String, String> {
        let ota = self.ota();
        let src: Job = o
            .data
            .get("job")
            .cloned()
            .and_then(|j| serde_json::from_value(j).ok())
            .ok_or("bad OTA job object")?;
        let target_fw = match fw_map.get(&src.spec.firmware_id) {
            Some(id) => id.clone(),
            None => {
                // Not in the package (exported without dependencies): same bytes by identity.
                let fw = o
                    .data
                    .get("firmware")
                    .ok_or("the job's firmware is unknown")?;
                let (pk, module, version, sha) = (
                    str_field(fw, "product_key").unwrap_or_default(),
                    str_field(fw, "module").unwrap_or_default(),
                    str_field(fw, "version").unwrap_or_default(),
                    str_field(fw, "sha256").unwrap_or_default(),
                );
                match self.inner.firmware.find(pk, module, version) {
                    Some(p) if p.sha256 == sha => p.firmware_id,
                    _ => {
                        return Err(format!(
                            "its firmware ({module} {version} of {pk}) was not imported and is not on this gateway"
                        ))
                    }
                }
            }
        };
        let mut spec = src.spec.clone();
        spec.firmware_id = target_fw;
        let view = ota.create_job(spec).await.map_err(|e| e.to_string())?;
        Ok(view.job.job_id)
    }

    /// Creates the task in `TO_MIGRATE` with the exported name and config.
    async fn create_migration(&self, o: &PackageObject) -> Result<String, String> {
        let engine = self.migration();
        let def = task_def(o)?;
        if self
            .inner
            .registry
            .get_instance(&def.target_instance_id)
            .is_err()
        {
            return Err(format!(
                "target instance {} does not exist on this gateway; create it first, then import again",
                def.target_instance_id
            ));
        }
        let details = engine
            .create(
                NewTask {
                    product_key: def.product_key,
                    target_instance_id: def.target_instance_id,
                    name: Some(def.name),
                    config: def.config,
                },
                Actor::system(),
            )
            .await
            .map_err(|e| {
                let src = if def.source_instance_id.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (source instance on the exporting gateway: {})",
                        def.source_instance_id
                    )
                };
                format!("cannot create the migration task{src}: {e}")
            })?;
        Ok(details.task_id)
    }

    pub(super) async fn overwrite(
        &self,
        o: &PackageObject,
        pkg: &VerifiedPackage,
        fw_map: &mut HashMap<String, String>,
    ) -> Result<Option<String>, String> {
        let reg = &self.inner.registry;
        let d = &o.data;
        match o.meta.object_type {
            ObjectType::Device => {
                let pk = str_field(d, "product_key").unwrap_or_default();
                let dn = str_field(d, "device_name").unwrap_or_default();
                let tags: BTreeMap<String, String> = d
                    .get("tags")
                    .cloned()
                    .and_then(|t| serde_json::from_value(t).ok())
                    .unwrap_or_default();
                let secret = o
                    .secrets
                    .as_ref()
                    .and_then(|s| str_field(s, "device_secret"))
                    .map(str::to_owned);
                let enabled = d.get("enabled").and_then(|v| v.as_bool()).unwrap_or(true);
                let (before, after) = reg
                    .overwrite_device(pk, dn, secret, enabled, tags)
                    .await
                    .map_err(|e| e.to_string())?;
                if ends_session(&before, &after) {
                    (self.inner.on_device_revoked)(pk, dn);
                }
                Ok(Some(format!("{pk}/{dn}")))
            }
            ObjectType::Firmware => {
                let f: FirmwarePackage = serde_json::from_value(d.clone())
                    .map_err(|e| format!("bad firmware object: {e}"))?;
                let existing = self
                    .inner
                    .firmware
                    .find(&f.product_key, &f.module, &f.version)
                    .ok_or("the conflicting firmware disappeared meanwhile")?;
                let in_use = self.ota().firmware_in_use(&existing.firmware_id);
                self.inner
                    .firmware
                    .delete(&existing.firmware_id, in_use)
                    .await
                    .map_err(|e| format!("cannot replace {}: {e}", existing.firmware_id))?;
                let new_id = self.create_firmware(o, pkg).await?;
                fw_map.insert(o.meta.id.clone(), new_id.clone());
                Ok(Some(new_id))
            }
            // Products are immutable in the registry (their devices hang off them); a product
            // that differs is reported, and its devices and firmware are still imported.
            ObjectType::Product => Err(
                "products cannot be overwritten in place (name, description, instance and secret are fixed at creation); this gateway's product was kept".into(),
            ),
            ObjectType::OtaJob | ObjectType::MigrationTask => {
                Err("this object type never conflicts".into())
            }
        }
    }
}
