//! The actor's commands, one file per lifecycle request (`create`, `delete`, `config`,
//! `canary`, `full`/`pause`/`continue`, `rollback`, `data-sync`), each checking its request
//! against the state machine and the registry, persisting the change and updating the actor's
//! runtime; plus the engine's own commands (wake, rate change, a deleted device).

mod canary;
mod configure;
mod create;
mod data_sync;
mod delete;
mod lifecycle;
mod rollback;
mod selection;

use super::{limiter_for, Worker};
use crate::migration::command::{Command, Outcome, Request};
use crate::migration::machine::{Event, Refused};
use crate::migration::model::*;
use crate::migration::MigrationError;
use tokio::time::Instant;

impl Worker {
    pub(super) async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Wake => {
                // Re-check everything now: expiries (after a clock jump), retries, sweeps.
                self.next_tick = Instant::now();
                self.on_deadline().await;
            }
            Command::SetRate(per_sec, reply) => {
                self.config.devices_per_sec = per_sec;
                self.limiter = limiter_for(per_sec);
                let _ = reply.send(());
            }
            Command::Task {
                task_id,
                request,
                actor,
                reply,
            } => {
                let result = self.handle_task(task_id, request, actor).await;
                let _ = reply.send(result);
            }
            Command::DeviceDeleted {
                product_key,
                device_name,
                reply,
            } => {
                let tasks: Vec<String> = self
                    .shared
                    .read()
                    .tasks
                    .values()
                    .filter(|t| t.doc.product_key == product_key)
                    .map(|t| t.doc.task_id.clone())
                    .collect();
                for tid in tasks {
                    self.forget_devices(&tid, std::slice::from_ref(&device_name), "deleted")
                        .await;
                }
                let _ = reply.send(());
            }
        }
    }

    async fn handle_task(
        &mut self,
        task_id: String,
        request: Request,
        actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        match request {
            Request::Create(new) => self.create(new, actor).await,
            Request::Delete => self.delete(&task_id, actor).await,
            Request::Configure(config) => self.configure(&task_id, config, actor).await,
            Request::Canary(names) => self.canary(&task_id, names, actor).await,
            Request::Full => self.lifecycle(&task_id, Event::Full, actor).await,
            Request::Pause => self.lifecycle(&task_id, Event::Pause, actor).await,
            Request::Continue => self.lifecycle(&task_id, Event::Continue, actor).await,
            Request::Rollback(sel) => self.rollback(&task_id, sel, actor).await,
            Request::DataSync(on) => self.data_sync(&task_id, on, actor).await,
        }
    }

    fn refuse_incremental(doc: &TaskDoc, event: Event) -> Result<(), MigrationError> {
        if doc.config.migration_method == MigrationMethod::IncrementalMigration {
            return Err(MigrationError::Conflict(format!(
                "cannot {event} task {}: its migration_method is incremental_migration (data sync only); set full_migration to move devices",
                doc.task_id
            )));
        }
        Ok(())
    }
}

fn refused(task_id: &str) -> impl FnOnce(Refused) -> MigrationError + '_ {
    move |r| MigrationError::Refused {
        task_id: task_id.to_owned(),
        refused: r,
    }
}
