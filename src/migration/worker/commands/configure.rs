//! `config`: the DCS-shaped configuration (the method only while `TO_MIGRATE`).

use crate::migration::command::Outcome;
use crate::migration::model::*;
use crate::migration::worker::Worker;
use crate::migration::MigrationError;

impl Worker {
    pub(super) async fn configure(
        &mut self,
        task_id: &str,
        config: MigrationConfig,
        actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        validate_config(&config)?;
        let mut doc = self.doc(task_id)?;
        if config.migration_method != doc.config.migration_method
            && doc.state != TaskState::ToMigrate
        {
            return Err(MigrationError::Conflict(format!(
                "migration_method can only change in TO_MIGRATE; task {task_id} is {}",
                doc.state
            )));
        }
        let detail = format!(
            "migration_method={} resume_mode={} bandwidth_limit_mb={}",
            serde_json::to_value(config.migration_method).unwrap_or_default(),
            serde_json::to_value(config.resume_mode).unwrap_or_default(),
            config
                .bandwidth_limit_mb
                .map_or("none".to_owned(), |b| b.to_string())
        );
        doc.config = config;
        self.save(doc, actor, "config", None, detail, Vec::new())
            .await?;
        Ok(self.outcome(task_id, 0, Vec::new()))
    }
}
