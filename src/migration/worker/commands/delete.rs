//! `delete`: a `COMPLETED` task, or a `TO_MIGRATE` one with no device in the target, goes with
//! its device records and log.

use crate::migration::command::Outcome;
use crate::migration::docs::{device_doc_id, log_doc_id, DEVICE_DOC, LOG_DOC, TASK_DOC};
use crate::migration::model::*;
use crate::migration::worker::Worker;
use crate::migration::MigrationError;
use crate::store::Op;

impl Worker {
    pub(super) async fn delete(
        &mut self,
        task_id: &str,
        _actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        let doc = self.doc(task_id)?;
        let in_target = {
            let registry = &self.shared.registry;
            registry
                .device_names_after(&doc.product_key, None, usize::MAX)
                .unwrap_or_default()
                .iter()
                .filter(|dn| {
                    registry.device_instance(&doc.product_key, dn).as_deref()
                        == Some(doc.target_instance_id.as_str())
                })
                .count()
        };
        let deletable = doc.state == TaskState::Completed
            || (doc.state == TaskState::ToMigrate && in_target == 0);
        if !deletable {
            return Err(MigrationError::Conflict(format!(
                "task {task_id} is {} with {in_target} devices in the target; only a COMPLETED task or a TO_MIGRATE task with no device in the target can be deleted",
                doc.state
            )));
        }
        let mut ops = vec![Op::DeleteDoc {
            kind: TASK_DOC,
            id: task_id.to_owned(),
        }];
        {
            let state = self.shared.read();
            if let Some(t) = state.tasks.get(task_id) {
                ops.extend(t.devices.keys().map(|dn| Op::DeleteDoc {
                    kind: DEVICE_DOC,
                    id: device_doc_id(task_id, dn),
                }));
                ops.extend(t.log.iter().map(|l| Op::DeleteDoc {
                    kind: LOG_DOC,
                    id: log_doc_id(task_id, l.seq),
                }));
            }
        }
        self.shared.store.submit(ops).await?;
        {
            let mut state = self.shared.write();
            state.tasks.remove(task_id);
            if state.by_product.get(&doc.product_key).map(String::as_str) == Some(task_id) {
                state.by_product.remove(&doc.product_key);
            }
        }
        self.runtime.remove(task_id);
        let mut off = doc;
        off.data_sync.enabled = false;
        self.apply_route(&off);
        self.update_gauge();
        tracing::info!(task_id, "migration task deleted");
        Ok(None)
    }
}
