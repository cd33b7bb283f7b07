//! Store faults while moving devices: with `resume_mode` auto the task retries after a backoff
//! (1 s doubling to 30 s, in memory); with manual it halts until an operator continues.

use super::internal_events::MigrationFault;
use super::Worker;
use crate::migration::model::*;
use std::time::Duration;
use tokio::time::Instant;

/// First retry delay after a fault (auto resume); doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Worker {
    /// A store fault while moving devices: retry later (auto) or halt (manual).
    pub(super) async fn fault(&mut self, task_id: &str, error: String) {
        let doc = self.doc(task_id).ok();
        MigrationFault {
            task_id,
            error: &error,
            resume_mode: doc.as_ref().map(|d| d.config.resume_mode),
        }
        .emit(&self.metrics);
        let Some(mut doc) = doc else {
            return;
        };
        doc.last_error = Some(error.clone());
        let rt = self.runtime.entry(task_id.to_owned()).or_default();
        match doc.config.resume_mode {
            ResumeMode::Auto => {
                let backoff = rt
                    .backoff
                    .map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
                rt.backoff = Some(backoff);
                rt.retry_at = Some(Instant::now() + backoff);
                // Recorded in memory only: the store just failed, and the next successful batch
                // clears it anyway.
                let mut state = self.shared.write();
                if let Some(t) = state.tasks.get_mut(task_id) {
                    t.doc.last_error =
                        Some(format!("{error} (retrying in {}s)", backoff.as_secs()));
                }
            }
            ResumeMode::Manual => {
                doc.halted = true;
                let detail = format!("halted until continue: {error}");
                if let Err(e) = self
                    .save(
                        doc.clone(),
                        Actor::system(),
                        "halted",
                        None,
                        detail,
                        Vec::new(),
                    )
                    .await
                {
                    // Halt in memory at least; the store is failing right now.
                    tracing::error!(task_id, error = %e, "cannot persist the halt");
                    let mut state = self.shared.write();
                    if let Some(t) = state.tasks.get_mut(task_id) {
                        t.doc = doc;
                    }
                }
            }
        }
    }
}
