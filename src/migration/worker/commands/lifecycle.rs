//! `full`, `pause` and `continue`: one handler, since the state machine decides each of them
//! and only a fresh start or a resume resets the retry and the walk.

use super::refused;
use crate::migration::command::Outcome;
use crate::migration::machine::{transition, Event};
use crate::migration::model::*;
use crate::migration::worker::{Cursor, Worker};
use crate::migration::MigrationError;

impl Worker {
    /// full / pause / continue.
    pub(super) async fn lifecycle(
        &mut self,
        task_id: &str,
        event: Event,
        actor: Actor,
    ) -> Result<Option<Outcome>, MigrationError> {
        let doc = self.doc(task_id)?;
        let t = transition(doc.state, doc.halted, event).map_err(refused(task_id))?;
        if event == Event::Full {
            Self::refuse_incremental(&doc, event)?;
        }
        let from = doc.state;
        let mut next = doc;
        next.state = t.to;
        let was_halted = next.halted;
        if t.clears_halt {
            next.halted = false;
        }
        let detail = if was_halted && event == Event::Continue {
            format!(
                "resumed after a fault: {}",
                next.last_error.as_deref().unwrap_or("unknown")
            )
        } else {
            String::new()
        };
        self.save(next, actor, event.as_str(), Some(from), detail, Vec::new())
            .await?;
        let rt = self.runtime.entry(task_id.to_owned()).or_default();
        if event != Event::Pause {
            // A fresh start or a resume retries at once and walks from the beginning.
            rt.retry_at = None;
            rt.backoff = None;
            rt.cursor = Cursor::default();
        }
        Ok(self.outcome(task_id, 0, Vec::new()))
    }
}
