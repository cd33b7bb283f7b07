//! The actor's timers: the one-minute tick that sweeps `COMPLETED` tasks for devices created in
//! the source since (and re-reads the clock for data-sync expiry), and fault retries coming
//! due. One deadline for all of them, computed by [`Worker::next_deadline`].

use super::Worker;
use crate::migration::model::*;
use std::time::Duration;
use tokio::time::Instant;

/// How often `COMPLETED` tasks are swept and the clock is re-read for data-sync expiry (so data
/// sync changes are "effective within a minute" even if nothing else wakes the actor).
pub(super) const TICK: Duration = Duration::from_secs(60);

impl Worker {
    pub(super) fn next_deadline(&self) -> Instant {
        let now_i = Instant::now();
        let now = self.now();
        let mut deadline = self.next_tick;
        for r in self.shared.routes.iter() {
            let wait = Duration::from_millis(r.expires_at_ms.saturating_sub(now).max(0) as u64);
            deadline = deadline.min(now_i + wait);
        }
        for rt in self.runtime.values() {
            if let Some(at) = rt.retry_at {
                deadline = deadline.min(at);
            }
        }
        deadline
    }

    pub(super) async fn on_deadline(&mut self) {
        let now_i = Instant::now();
        if now_i >= self.next_tick {
            self.next_tick = now_i + TICK;
            let completed: Vec<String> = self
                .shared
                .read()
                .tasks
                .values()
                .filter(|t| t.doc.state == TaskState::Completed)
                .map(|t| t.doc.task_id.clone())
                .collect();
            for tid in completed {
                self.runtime.entry(tid).or_default().sweeping = true;
            }
        }
        for rt in self.runtime.values_mut() {
            if rt.retry_at.is_some_and(|at| at <= now_i) {
                rt.retry_at = None;
            }
        }
        self.expire_data_sync().await;
    }

    pub(super) async fn sweep_done(&mut self, task_id: &str) {
        let rt = self.runtime.entry(task_id.to_owned()).or_default();
        rt.sweeping = false;
        let swept = std::mem::take(&mut rt.swept);
        if swept == 0 {
            return;
        }
        let Ok(doc) = self.doc(task_id) else {
            return;
        };
        let detail = format!("moved {swept} devices created in the source after COMPLETED");
        if let Err(e) = self
            .save(doc, Actor::system(), "swept", None, detail, Vec::new())
            .await
        {
            tracing::warn!(task_id, error = %e, "cannot log the sweep");
        }
    }
}
