//! `canary`: moves the named devices (a queue persisted as `pending` markers).

use super::refused;
use super::selection::{select, Purpose};
use crate::migration::command::Outcome;
use crate::migration::docs::{device_doc_id, doc_op, DEVICE_DOC};
use crate::migration::machine::{transition, Event};
use crate::migration::model::*;
use crate::migration::worker::Worker;
use crate::migration::MigrationError;
use crate::store::Op;

impl Worker {
    pub(super) async fn canary(
        &mut self,
        task_id: &str,
        names: Vec<String>,
        actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        let doc = self.doc(task_id)?;
        let t = transition(doc.state, doc.halted, Event::Canary).map_err(refused(task_id))?;
        Self::refuse_incremental(&doc, Event::Canary)?;
        let (accepted, rejected) = select(&self.shared.registry, &doc, names, Purpose::Canary)?;
        let now = self.now();
        let marker = DeviceDoc {
            status: DeviceStatus::Migrating,
            reason: None,
            pending: Some(Pending::Migrate),
            updated_at_ms: now,
        };
        let ops: Vec<Op> = accepted
            .iter()
            .map(|dn| doc_op(DEVICE_DOC, device_doc_id(task_id, dn), &marker))
            .collect();
        let from = doc.state;
        let mut next = doc;
        next.state = t.to;
        next.halted = false;
        let detail = format!(
            "canary of {} devices ({} rows refused)",
            accepted.len(),
            rejected.len()
        );
        self.save(next, actor, "canary", Some(from), detail, ops)
            .await?;
        {
            let mut state = self.shared.write();
            if let Some(t) = state.tasks.get_mut(task_id) {
                for dn in &accepted {
                    t.devices.insert(dn.clone(), marker.clone());
                }
            }
        }
        let rt = self.runtime.entry(task_id.to_owned()).or_default();
        rt.queue = accepted.iter().cloned().collect();
        Ok(self.outcome(task_id, accepted.len(), rejected))
    }
}
