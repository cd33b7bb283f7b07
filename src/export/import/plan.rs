//! The plan of an import (reads only): what each object of the package would do here.

use super::*;

impl ExportService {
    pub(super) fn plan(&self, o: &PackageObject, pkg: &VerifiedPackage) -> Plan {
        match o.meta.object_type {
            ObjectType::Product => self.plan_product(o),
            ObjectType::Device => self.plan_device(o, pkg),
            ObjectType::Firmware => self.plan_firmware(o, pkg),
            ObjectType::OtaJob => {
                if let Some(why) = finished_verification(o) {
                    return Plan::Skip(why);
                }
                match self.identical_job(o) {
                    Some(_) => Plan::Identical,
                    None => Plan::Create,
                }
            }
            ObjectType::MigrationTask => self.plan_migration(o, pkg),
        }
    }

    /// A product: created when new; else identical, or a conflict naming the fields that differ.
    fn plan_product(&self, o: &PackageObject) -> Plan {
        let d = &o.data;
        let Some(pk) = str_field(d, "product_key") else {
            return Plan::Invalid("product without product_key".into());
        };
        let Ok(p) = self.inner.registry.get_product(pk) else {
            return Plan::Create;
        };
        let mut diffs = Vec::new();
        if str_field(d, "name") != Some(p.name.as_str()) {
            diffs.push("name");
        }
        if str_field(d, "description") != p.description.as_deref() {
            diffs.push("description");
        }
        if str_field(d, "instance_id") != Some(p.instance_id.as_str()) {
            diffs.push("instance_id");
        }
        if let Some(s) = o
            .secrets
            .as_ref()
            .and_then(|s| str_field(s, "product_secret"))
        {
            if s != p.product_secret {
                diffs.push("product_secret");
            }
        }
        if diffs.is_empty() {
            Plan::Identical
        } else {
            Plan::Conflict(format!(
                "product {pk} exists with a different {}",
                diffs.join(", ")
            ))
        }
    }

    /// A device of a product here or in the package: created when new; else identical, or a
    /// conflict naming the fields that differ.
    fn plan_device(&self, o: &PackageObject, pkg: &VerifiedPackage) -> Plan {
        let d = &o.data;
        let (Some(pk), Some(dn)) = (str_field(d, "product_key"), str_field(d, "device_name"))
        else {
            return Plan::Invalid("device without product_key/device_name".into());
        };
        if let Some(invalid) = self.unknown_product(pk, pkg) {
            return invalid;
        }
        let Ok(dev) = self.inner.registry.get_device(pk, dn) else {
            return Plan::Create;
        };
        let mut diffs = Vec::new();
        if let Some(s) = o
            .secrets
            .as_ref()
            .and_then(|s| str_field(s, "device_secret"))
        {
            if s != dev.device_secret {
                diffs.push("device_secret");
            }
        }
        if d.get("enabled").and_then(|v| v.as_bool()) != Some(dev.enabled) {
            diffs.push("enabled");
        }
        let tags: BTreeMap<String, String> = d
            .get("tags")
            .cloned()
            .and_then(|t| serde_json::from_value(t).ok())
            .unwrap_or_default();
        if tags != dev.tags {
            diffs.push("tags");
        }
        if diffs.is_empty() {
            Plan::Identical
        } else {
            Plan::Conflict(format!(
                "device {pk}/{dn} exists with a different {}",
                diffs.join(", ")
            ))
        }
    }

    /// A firmware package of a product here or in the package, within this gateway's size
    /// limit: created when new; identical with the same bytes, else a conflict.
    fn plan_firmware(&self, o: &PackageObject, pkg: &VerifiedPackage) -> Plan {
        let f: FirmwarePackage = match serde_json::from_value(o.data.clone()) {
            Ok(f) => f,
            Err(e) => return Plan::Invalid(format!("bad firmware object: {e}")),
        };
        if let Some(invalid) = self.unknown_product(&f.product_key, pkg) {
            return invalid;
        }
        if f.size > self.inner.firmware.max_size() {
            return Plan::Invalid(format!(
                "firmware of {} bytes is larger than this gateway's ota.max_firmware_bytes",
                f.size
            ));
        }
        match self
            .inner
            .firmware
            .find(&f.product_key, &f.module, &f.version)
        {
            None => Plan::Create,
            Some(existing) if existing.sha256 == f.sha256 => Plan::Identical,
            Some(existing) => Plan::Conflict(format!(
                "firmware {} ({} {} of {}) exists with different bytes (sha256 {})",
                existing.firmware_id, f.module, f.version, f.product_key, existing.sha256
            )),
        }
    }

    /// A migration task of a product here or in the package, to an instance that exists here:
    /// created when the product has none; identical when it has the same one, else a conflict.
    fn plan_migration(&self, o: &PackageObject, pkg: &VerifiedPackage) -> Plan {
        let engine = self.migration();
        let def = match task_def(o) {
            Ok(d) => d,
            Err(e) => return Plan::Invalid(e),
        };
        let pk = &def.product_key;
        if let Some(invalid) = self.unknown_product(pk, pkg) {
            return invalid;
        }
        if self
            .inner
            .registry
            .get_instance(&def.target_instance_id)
            .is_err()
        {
            return Plan::Invalid(format!(
                "target instance {} does not exist on this gateway; create it first, then import again",
                def.target_instance_id
            ));
        }
        match filter_migrations(engine, pk).into_iter().next() {
            None => Plan::Create,
            Some(t)
                if t.target_instance_id == def.target_instance_id
                    && t.name == def.name
                    && t.config == def.config =>
            {
                Plan::Identical
            }
            Some(t) => Plan::Conflict(format!(
                "product {pk} already has migration task {} ({}, target {})",
                t.task_id,
                t.state.as_str(),
                t.target_instance_id
            )),
        }
    }

    /// [`Plan::Invalid`] when product `pk` is neither on this gateway nor in the package.
    fn unknown_product(&self, pk: &str, pkg: &VerifiedPackage) -> Option<Plan> {
        let in_package = pkg
            .objects
            .iter()
            .any(|p| p.meta.object_type == ObjectType::Product && p.meta.id == pk);
        (self.inner.registry.get_product(pk).is_err() && !in_package).then(|| {
            Plan::Invalid(format!(
                "product {pk} is neither on this gateway nor in the package"
            ))
        })
    }

    /// `/{instance}/{pk}[/{dn}]` of a product or device as it is on this gateway now (`None`
    /// for other objects, or when it is not here).
    pub(super) fn local_path(&self, o: &PackageObject) -> Option<String> {
        let reg = &self.inner.registry;
        let pk = str_field(&o.data, "product_key")?;
        match o.meta.object_type {
            ObjectType::Product => {
                let p = reg.get_product(pk).ok()?;
                Some(format!("/{}/{pk}", p.instance_id))
            }
            ObjectType::Device => {
                let dn = str_field(&o.data, "device_name")?;
                let d = reg.get_device(pk, dn).ok()?;
                Some(format!("/{}/{pk}/{dn}", d.instance_id))
            }
            _ => None,
        }
    }

    /// The id on this gateway of an object planned as identical.
    pub(super) fn identical_target(&self, o: &PackageObject) -> Option<String> {
        match o.meta.object_type {
            ObjectType::Firmware => {
                let f: FirmwarePackage = serde_json::from_value(o.data.clone()).ok()?;
                self.inner
                    .firmware
                    .find(&f.product_key, &f.module, &f.version)
                    .map(|p| p.firmware_id)
            }
            ObjectType::OtaJob => self.identical_job(o),
            ObjectType::MigrationTask => {
                let def = task_def(o).ok()?;
                filter_migrations(self.migration(), &def.product_key)
                    .into_iter()
                    .next()
                    .map(|t| t.task_id)
            }
            _ => Some(o.meta.id.clone()),
        }
    }

    /// A job on this gateway with the same name, target and spec (firmware by identity).
    fn identical_job(&self, o: &PackageObject) -> Option<String> {
        let ota = self.ota();
        let src: Job = serde_json::from_value(o.data.get("job")?.clone()).ok()?;
        filter_jobs(ota, &src.product_key)
            .into_iter()
            .find_map(|j| {
                let mut a = j.spec.clone();
                let mut b = src.spec.clone();
                a.firmware_id.clear();
                b.firmware_id.clear();
                (j.module == src.module && j.dest_version == src.dest_version && a == b)
                    .then_some(j.job_id)
            })
    }
}
