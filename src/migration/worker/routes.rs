//! Data-sync routes: installing and removing a product's route (what the forwarder mirrors to
//! the target, and the target's bandwidth limit) and turning data sync off once its 30 days
//! are over.

use super::Worker;
use crate::migration::model::*;
use crate::migration::shared::apply_route;

impl Worker {
    /// Installs or removes the product's data-sync route and the target's bandwidth limit.
    pub(super) fn apply_route(&self, doc: &TaskDoc) {
        apply_route(&self.shared, &self.hooks, doc);
    }

    /// Turns data sync off for tasks past their 30 days.
    pub(super) async fn expire_data_sync(&mut self) {
        let now = self.now();
        let expired: Vec<TaskDoc> = self
            .shared
            .read()
            .tasks
            .values()
            .filter(|t| t.doc.data_sync.enabled && !t.doc.data_sync.active(now))
            .map(|t| t.doc.clone())
            .collect();
        for mut doc in expired {
            let at = doc.data_sync.expires_at_ms().unwrap_or(now);
            doc.data_sync.enabled = false;
            doc.data_sync.disabled_at_ms = Some(at);
            doc.data_sync.disabled_reason = Some("expired".into());
            if doc.state == TaskState::Completed {
                doc.data_sync.locked = true;
            }
            let detail =
                format!("data sync turned itself off {DATA_SYNC_DAYS} days after it was turned on");
            if let Err(e) = self
                .save(
                    doc,
                    Actor::system(),
                    "data_sync_expired",
                    None,
                    detail,
                    Vec::new(),
                )
                .await
            {
                tracing::error!(error = %e, "cannot record data-sync expiry; retrying at the next tick");
                // The route is removed regardless: expired data sync must not mirror.
            }
        }
        let stale: Vec<String> = self
            .shared
            .routes
            .iter()
            .filter(|r| now >= r.expires_at_ms)
            .map(|r| r.key().clone())
            .collect();
        for pk in stale {
            if let Some((_, r)) = self.shared.routes.remove(&pk) {
                (self.hooks.set_rate_limit)(&r.target, None);
            }
        }
    }
}
