//! What the broker and ingest call on every connection and report: CONNECT credentials,
//! online/offline presence, staged firmware-version writes, device ownership lookups.

use super::*;

impl Registry {
    /// What the broker needs to check a CONNECT; `None` for unknown devices.
    pub fn credentials(&self, pk: &str, dn: &str) -> Option<DeviceCredentials> {
        let entry = self.product(pk)?;
        let d = entry.devices.get(dn)?;
        Some(DeviceCredentials {
            device_secret: d.device_secret.clone(),
            enabled: d.enabled,
        })
    }

    /// Whether the device exists and is the one the session with epoch `session` (this
    /// node's) connected as: created, or learned of from another node, before the session
    /// began. `false` for a session of an earlier device of the name (deleted and created
    /// again since; a message of it may still be in ingest).
    pub fn device_predates(&self, pk: &str, dn: &str, session: u64) -> bool {
        self.product(pk)
            .and_then(|entry| entry.devices.get(dn).map(|d| d.created_epoch < session))
            .unwrap_or(false)
    }

    pub(super) fn went_offline(&self) {
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
