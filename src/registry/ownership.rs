//! Device ownership for instance migration: walking a product's device names and moving
//! devices (one or many) to another instance.

use super::*;

impl Registry {
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
}
