//! `create`: a new task in `TO_MIGRATE` for a product (one task per product at a time).

use crate::migration::command::{NewTask, Outcome};
use crate::migration::model::*;
use crate::migration::worker::{Runtime, Worker};
use crate::migration::MigrationError;

impl Worker {
    pub(super) async fn create(
        &mut self,
        new: NewTask,
        actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        validate_config(&new.config)?;
        let registry = &self.shared.registry;
        let product = registry.get_product(&new.product_key)?;
        registry.get_instance(&new.target_instance_id)?;
        if new.target_instance_id == product.instance_id {
            return Err(MigrationError::Invalid {
                field: "target_instance_id",
                message: format!(
                    "must differ from the product's instance {:?}",
                    product.instance_id
                ),
            });
        }
        if let Some(existing) = self.existing_task(&new.product_key) {
            return Err(existing);
        }
        let name = match new.name {
            Some(n) if n.trim().is_empty() || n.chars().count() > 64 => {
                return Err(MigrationError::Invalid {
                    field: "name",
                    message: "must be 1..=64 characters".into(),
                })
            }
            Some(n) => n,
            None => format!("migration-{}", new.product_key),
        };
        let now = self.now();
        let task_id = uuid::Uuid::new_v4().to_string();
        let doc = TaskDoc {
            task_id: task_id.clone(),
            name,
            product_key: new.product_key,
            source_instance_id: product.instance_id,
            target_instance_id: new.target_instance_id,
            state: TaskState::ToMigrate,
            config: new.config,
            data_sync: DataSync::default(),
            rollback_all: false,
            halted: false,
            last_error: None,
            created_at_ms: now,
            updated_at_ms: now,
            completed_at_ms: None,
        };
        let detail = format!(
            "task for product {} from {} to {}",
            doc.product_key, doc.source_instance_id, doc.target_instance_id
        );
        self.runtime.insert(task_id.clone(), Runtime::default());
        self.save(doc, actor, "create", None, detail, Vec::new())
            .await?;
        Ok(self.outcome(&task_id, 0, Vec::new()))
    }

    fn existing_task(&self, pk: &str) -> Option<MigrationError> {
        let state = self.shared.read();
        let tid = state.by_product.get(pk)?;
        let t = state.tasks.get(tid)?;
        Some(MigrationError::TaskExists {
            product_key: pk.to_owned(),
            task_id: tid.clone(),
            state: t.doc.state,
            target_instance_id: t.doc.target_instance_id.clone(),
        })
    }
}
