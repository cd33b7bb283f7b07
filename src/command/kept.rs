//! The commands' side of the offline queue ([`offline`](super::offline) holds the queues):
//! keeping a one-way message for a device offline with a persistent session, delivering what
//! was kept when it comes back, dropping (and counting) what cannot be kept.

use super::*;

impl Commands {
    /// A one-way message for a device without a session: kept for its persistent session
    /// (`Ok(Ok)`), refused as offline, or given back (`Ok(Err)`) when the device came online
    /// since it was located.
    pub(super) fn keep_for_offline(
        &self,
        pk: &str,
        dn: &str,
        message: Message,
        local_only: bool,
    ) -> Result<Result<Sent, Message>, CommandError> {
        let kind = DownlinkKind::Publish;
        let device = DeviceKey {
            product_key: pk.to_owned(),
            device_name: dn.to_owned(),
        };
        let offline = || CommandError::Offline {
            product_key: pk.to_owned(),
            device_name: dn.to_owned(),
        };
        // Cluster mode: the device may come back on another node (see the module docs).
        if local_only || self.cluster.get().is_some() {
            self.count(kind, "offline");
            return Err(offline());
        }
        let message_id = self.new_id();
        let topic = message.topic.clone();
        let enabled = || self.registry.credentials(pk, dn).is_some_and(|c| c.enabled);
        let online = || self.downlink.is_connected(&device);
        match self.offline.push(
            &device,
            message,
            &message_id,
            Instant::now(),
            enabled,
            online,
        ) {
            Push::Queued => {
                self.count(kind, "queued");
                Ok(Ok(Sent {
                    message_id,
                    topic,
                    status: SendStatus::Queued,
                }))
            }
            Push::Online(message) => Ok(Err(message)),
            Push::Full => {
                self.count(kind, "offline");
                self.offline_dropped("full", 1);
                Err(CommandError::OfflineQueueFull {
                    product_key: pk.to_owned(),
                    device_name: dn.to_owned(),
                    max: self.offline.max(),
                })
            }
            Push::NoSession => {
                self.count(kind, "offline");
                Err(offline())
            }
            Push::Disabled => {
                self.count(kind, "refused");
                Err(CommandError::Disabled {
                    product_key: pk.to_owned(),
                    device_name: dn.to_owned(),
                })
            }
        }
    }

    pub(super) fn offline_dropped(&self, reason: &'static str, n: usize) {
        if n > 0 {
            self.metrics
                .offline_messages_dropped
                .get_or_create(&[("reason", reason)])
                .inc_by(n as u64);
        }
    }

    /// A session of `device` went online here (called by ingest before its CONNACK, after the
    /// broker marked it online). A persistent one (`clean_session = 0`) gets the messages kept
    /// for it, in their order; a clean one discards them, as MQTT discards the old session.
    pub fn session_started(&self, device: &DeviceKey, persistent: bool) {
        let started = self
            .offline
            .session_started(device, persistent, Instant::now());
        self.offline_dropped("expired", started.expired);
        self.offline_dropped("clean_session", started.cleared);
        let kind = DownlinkKind::Publish;
        for queued in started.deliver {
            match self.send(queued.message, kind) {
                Ok(()) => self.count(kind, "delivered"),
                Err(error) => {
                    // Counted as refused by `send`.
                    tracing::warn!(%error, message_id = %queued.message_id, "queued message not delivered");
                    self.offline_dropped("refused", 1);
                }
            }
        }
    }

    /// Drops the messages kept for a deleted or disabled device (`reason`: `deleted`,
    /// `disabled`).
    pub(super) fn forget_offline(&self, device: &DeviceKey, reason: &'static str) {
        let n = self.offline.forget(device);
        self.offline_dropped(reason, n);
    }

    /// The task dropping kept messages past their age (so a device that never comes back does
    /// not hold them); ends when `commands` is dropped.
    pub fn spawn_offline_sweeper(commands: &Arc<Commands>) {
        let weak = Arc::downgrade(commands);
        let every =
            (commands.offline.ttl() / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(commands) = weak.upgrade() else {
                    return;
                };
                let n = commands.offline.sweep(Instant::now());
                commands.offline_dropped("expired", n);
            }
        });
    }
}

/// Drops the messages kept for a deleted or disabled device (its persistent session goes with
/// them: a device enabled again keeps nothing until it connects with a persistent session).
pub struct OfflineReaper(pub Weak<Commands>);

impl crate::registry::DeviceObserver for OfflineReaper {
    fn device_changed<'a>(
        &'a self,
        change: &'a crate::registry::DeviceChange,
    ) -> crate::registry::ObserverFuture<'a> {
        use crate::registry::DeviceChange;
        Box::pin(async move {
            let (product_key, device_name, reason) = match change {
                DeviceChange::Deleted {
                    product_key,
                    device_name,
                    ..
                } => (product_key, device_name, "deleted"),
                DeviceChange::Disabled {
                    product_key,
                    device_name,
                } => (product_key, device_name, "disabled"),
                DeviceChange::Created { .. } | DeviceChange::TagsChanged { .. } => return,
            };
            if let Some(commands) = self.0.upgrade() {
                let device = DeviceKey {
                    product_key: product_key.clone(),
                    device_name: device_name.clone(),
                };
                commands.forget_offline(&device, reason);
            }
        })
    }
}
