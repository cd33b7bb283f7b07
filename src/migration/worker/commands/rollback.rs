//! `rollback`: every migrated device back to the source ("all", a walk) or the picked ones (a
//! queue persisted as `pending` markers); refused once the product left the source instance.

use super::refused;
use super::selection::{select, Purpose};
use crate::migration::command::{Outcome, RollbackSelection};
use crate::migration::docs::{device_doc_id, doc_op, DEVICE_DOC};
use crate::migration::machine::{transition, Event};
use crate::migration::model::*;
use crate::migration::worker::{Cursor, Worker};
use crate::migration::MigrationError;
use crate::store::Op;

impl Worker {
    pub(super) async fn rollback(
        &mut self,
        task_id: &str,
        selection: RollbackSelection,
        actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        let doc = self.doc(task_id)?;
        let t = transition(doc.state, doc.halted, Event::Rollback).map_err(refused(task_id))?;
        match self.shared.registry.get_product(&doc.product_key) {
            Ok(p) if p.instance_id == doc.source_instance_id => {}
            _ => {
                return Err(MigrationError::SourceProductGone {
                    product_key: doc.product_key.clone(),
                    source_instance_id: doc.source_instance_id.clone(),
                })
            }
        }
        let now = self.now();
        let mut ops = Vec::new();
        let mut marked: Vec<(String, DeviceDoc)> = Vec::new();
        let stale_markers = self.stale_markers(&doc);
        for dn in &stale_markers {
            ops.push(Op::DeleteDoc {
                kind: DEVICE_DOC,
                id: device_doc_id(task_id, dn),
            });
        }
        let (all, accepted, rejected) = match selection {
            RollbackSelection::All => (true, Vec::new(), Vec::new()),
            RollbackSelection::Picked(names) => {
                let (accepted, rejected) =
                    select(&self.shared.registry, &doc, names, Purpose::Rollback)?;
                marked = self.rollback_markers(task_id, &accepted, now);
                ops.extend(
                    marked
                        .iter()
                        .map(|(dn, d)| doc_op(DEVICE_DOC, device_doc_id(task_id, dn), d)),
                );
                (false, accepted, rejected)
            }
        };
        let from = doc.state;
        let mut next = doc;
        next.state = t.to;
        next.halted = false;
        next.rollback_all = all;
        let detail = if all {
            "rollback of all devices".to_owned()
        } else {
            format!(
                "rollback of {} devices ({} rows refused)",
                accepted.len(),
                rejected.len()
            )
        };
        self.save(next, actor, "rollback", Some(from), detail, ops)
            .await?;
        {
            let mut state = self.shared.write();
            if let Some(t) = state.tasks.get_mut(task_id) {
                for dn in &stale_markers {
                    t.devices.remove(dn);
                }
                for (dn, d) in marked {
                    t.devices.insert(dn, d);
                }
            }
        }
        let rt = self.runtime.entry(task_id.to_owned()).or_default();
        rt.queue = accepted.iter().cloned().collect();
        rt.cursor = Cursor::default();
        rt.retry_at = None;
        rt.backoff = None;
        rt.sweeping = false;
        Ok(self.outcome(task_id, accepted.len(), rejected))
    }

    /// Records to drop before a rollback: canary markers of devices never moved (they go back
    /// to NOT_MIGRATED), and failed moves of devices still in the source.
    fn stale_markers(&self, doc: &TaskDoc) -> Vec<String> {
        let registry = &self.shared.registry;
        let state = self.shared.read();
        let Some(t) = state.tasks.get(&doc.task_id) else {
            return Vec::new();
        };
        t.devices
            .iter()
            .filter(|(dn, d)| {
                d.pending == Some(Pending::Migrate)
                    || (d.status == DeviceStatus::Failed
                        && registry.device_instance(&doc.product_key, dn).as_deref()
                            != Some(doc.target_instance_id.as_str()))
            })
            .map(|(dn, _)| dn.clone())
            .collect()
    }

    /// The picked devices' records marked `pending` rollback (a device without a record was
    /// moved by a walk: MIGRATED).
    fn rollback_markers(
        &self,
        task_id: &str,
        picked: &[String],
        now: i64,
    ) -> Vec<(String, DeviceDoc)> {
        let state = self.shared.read();
        let devices = state.tasks.get(task_id).map(|t| &t.devices);
        picked
            .iter()
            .map(|dn| {
                let mut d = devices
                    .and_then(|m| m.get(dn))
                    .cloned()
                    .unwrap_or(DeviceDoc {
                        status: DeviceStatus::Migrated,
                        reason: None,
                        pending: None,
                        updated_at_ms: now,
                    });
                d.pending = Some(Pending::Rollback);
                (dn.clone(), d)
            })
            .collect()
    }
}
