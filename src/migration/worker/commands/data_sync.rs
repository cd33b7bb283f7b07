//! `data-sync`: turns data sync on (for 30 days) or off (for good once `COMPLETED`).

use crate::migration::command::Outcome;
use crate::migration::model::*;
use crate::migration::worker::Worker;
use crate::migration::MigrationError;

impl Worker {
    pub(super) async fn data_sync(
        &mut self,
        task_id: &str,
        on: bool,
        actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        // Settle an expiry first, so "on" after 30 days is a fresh start and "off" is a no-op.
        self.expire_data_sync().await;
        let mut doc = self.doc(task_id)?;
        let now = self.now();
        let ds = &mut doc.data_sync;
        if on {
            if ds.locked {
                return Err(MigrationError::Conflict(format!(
                    "data sync of task {task_id} was turned off after the task COMPLETED and cannot be turned on again"
                )));
            }
            if ds.active(now) {
                return Ok(self.outcome(task_id, 0, Vec::new()));
            }
            ds.enabled = true;
            ds.enabled_at_ms = Some(now);
            ds.disabled_at_ms = None;
            ds.disabled_reason = None;
            let detail = format!("data sync on until {}", now + DATA_SYNC_MS);
            self.save(doc, actor, "data_sync_on", None, detail, Vec::new())
                .await?;
        } else {
            if !ds.enabled {
                return Ok(self.outcome(task_id, 0, Vec::new()));
            }
            ds.enabled = false;
            ds.disabled_at_ms = Some(now);
            ds.disabled_reason = Some("operator".into());
            let locked = doc.state == TaskState::Completed;
            doc.data_sync.locked = locked;
            let detail = if locked {
                "data sync off (after COMPLETED: cannot be turned on again)".to_owned()
            } else {
                "data sync off".to_owned()
            };
            self.save(doc, actor, "data_sync_off", None, detail, Vec::new())
                .await?;
        }
        Ok(self.outcome(task_id, 0, Vec::new()))
    }
}
