//! One-way messages kept for devices that are offline with a persistent MQTT session
//! (CONNECT with `clean_session = 0`), delivered when the device comes back with one — MQTT's
//! session semantics with bounds the gateway enforces.
//!
//! What it owns: per device, whether its latest session was persistent (an entry exists) and
//! the messages published for it since it went offline, at most `commands.offline_queue_max`
//! per device, none older than `commands.offline_queue_ttl_secs`. A message beyond the count is
//! refused (the caller answers "device offline"); one past its age is dropped (at the
//! reconnect, or by the sweep). Dropped messages are counted by the caller
//! (`fleetgate_offline_messages_dropped_total{reason}`).
//!
//! Why not the router's own queue: rumqttd keeps an offline persistent session's messages in
//! its subscription logs, bounded only by the logs' segments (bytes shared by every device of a
//! filter, overflow skipped silently) and never by age, so "accepted" could not be told apart
//! from "lost". The gateway therefore hands a queued message to the router only once the
//! device is back.
//!
//! Races: [`OfflineQueues::push`] asks whether the device is online while it holds the device's
//! entry, and [`OfflineQueues::session_started`] drains the entry after the broker marked the
//! new session online, so a message is either in the queue before the drain or sent to the live
//! session — never left behind for the next reconnect.
//!
//! Memory only, like the router's persistent sessions themselves: a restart forgets both. This
//! module must not touch the broker or the registry; its callers decide and publish.

use super::Message;
use crate::broker::DeviceKey;
use dashmap::DashMap;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A message waiting for its device.
#[derive(Debug, Clone)]
pub(crate) struct Queued {
    pub message: Message,
    pub message_id: String,
    queued_at: Instant,
}

/// What [`OfflineQueues::push`] did with a message.
#[derive(Debug)]
pub(crate) enum Push {
    /// Kept for the device's persistent session.
    Queued,
    /// The device is online: send it now.
    Online(Message),
    /// The device's queue holds `commands.offline_queue_max` messages already.
    Full,
    /// The device's latest session was not persistent (or it never connected): refuse it.
    NoSession,
    /// The device is disabled: refuse it (its queue went when it was disabled).
    Disabled,
}

/// What a new session of a device meant for its queue.
#[derive(Debug, Default)]
pub(crate) struct Started {
    /// To publish now, in their order.
    pub deliver: Vec<Queued>,
    /// Dropped: older than the age bound.
    pub expired: usize,
    /// Dropped: the device came back with a clean session, which discards the old one.
    pub cleared: usize,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct OfflineQueues {
    /// An entry per device whose latest session was persistent.
    queues: DashMap<DeviceKey, VecDeque<Queued>>,
    max: usize,
    ttl: Duration,
}

impl OfflineQueues {
    /// `max` 0 keeps nothing: every message to an offline device is refused as to a device
    /// without a persistent session.
    pub fn new(max: usize, ttl: Duration) -> Self {
        OfflineQueues {
            queues: DashMap::new(),
            max,
            ttl,
        }
    }

    /// The count bound.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The age bound (the sweep's period derives from it).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Keeps `message` for `device` unless `enabled()` says it is disabled or `online()` says
    /// it has a session now.
    ///
    /// `enabled()` is asked while the device's entry is held, which is what [`Self::forget`]
    /// takes to drop the queue of a device that was disabled: a message is either in the
    /// queue before it is dropped, or finds the device disabled — never kept after the drop.
    pub fn push(
        &self,
        device: &DeviceKey,
        message: Message,
        message_id: &str,
        now: Instant,
        enabled: impl FnOnce() -> bool,
        online: impl FnOnce() -> bool,
    ) -> Push {
        let queue = (self.max > 0)
            .then(|| self.queues.get_mut(device))
            .flatten();
        if !enabled() {
            return Push::Disabled;
        }
        let Some(mut queue) = queue else {
            return if online() {
                Push::Online(message)
            } else {
                Push::NoSession
            };
        };
        if online() {
            return Push::Online(message);
        }
        if queue.len() >= self.max {
            return Push::Full;
        }
        queue.push_back(Queued {
            message,
            message_id: message_id.to_owned(),
            queued_at: now,
        });
        Push::Queued
    }

    /// A session of `device` went online (`persistent`: `clean_session = 0`). A persistent one
    /// takes the messages still within their age; a clean one discards the old session's.
    pub fn session_started(&self, device: &DeviceKey, persistent: bool, now: Instant) -> Started {
        if !persistent {
            let cleared = self
                .queues
                .remove(device)
                .map_or(0, |(_, queue)| queue.len());
            return Started {
                cleared,
                ..Started::default()
            };
        }
        let mut queue = self.queues.entry(device.clone()).or_default();
        let mut started = Started::default();
        for queued in queue.drain(..) {
            if self.expired(&queued, now) {
                started.expired += 1;
            } else {
                started.deliver.push(queued);
            }
        }
        started
    }

    /// A deleted or disabled device: its session and messages go. Returns how many messages.
    pub fn forget(&self, device: &DeviceKey) -> usize {
        self.queues
            .remove(device)
            .map_or(0, |(_, queue)| queue.len())
    }

    /// Drops every message past its age; returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut dropped = 0;
        for mut queue in self.queues.iter_mut() {
            // Oldest first: expired ones are at the front.
            while queue.front().is_some_and(|q| self.expired(q, now)) {
                queue.pop_front();
                dropped += 1;
            }
        }
        dropped
    }

    /// Messages waiting for `device`.
    #[cfg(test)]
    pub fn len(&self, device: &DeviceKey) -> usize {
        self.queues.get(device).map_or(0, |q| q.len())
    }

    fn expired(&self, queued: &Queued, now: Instant) -> bool {
        now.saturating_duration_since(queued.queued_at) >= self.ttl
    }
}

#[cfg(test)]
mod tests {
    use super::super::Qos;
    use super::*;

    fn device() -> DeviceKey {
        DeviceKey {
            product_key: "pk1".into(),
            device_name: "dev1".into(),
        }
    }

    fn message(n: u32) -> Message {
        Message {
            topic: "/pk1/dev1/user/get".into(),
            payload: n.to_string().into(),
            qos: Qos::AtLeastOnce,
        }
    }

    fn payloads(queued: &[Queued]) -> Vec<String> {
        queued
            .iter()
            .map(|q| String::from_utf8_lossy(&q.message.payload).into_owned())
            .collect()
    }

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn push_follows_the_devices_session() {
        let t0 = Instant::now();
        // (history, online now, expected)
        let cases: [(&[bool], bool, &str); 6] = [
            (&[], false, "no_session"),
            (&[], true, "online"),
            (&[false], false, "no_session"),
            (&[true], false, "queued"),
            (&[true], true, "online"),
            (&[true, false], false, "no_session"),
        ];
        for (history, online, expected) in cases {
            let queues = OfflineQueues::new(10, TTL);
            for persistent in history {
                queues.session_started(&device(), *persistent, t0);
            }
            let got = match queues.push(&device(), message(1), "1", t0, || true, || online) {
                Push::Queued => "queued",
                Push::Online(_) => "online",
                Push::Full => "full",
                Push::NoSession => "no_session",
                Push::Disabled => "disabled",
            };
            assert_eq!(got, expected, "history {history:?}, online {online}");
        }
    }

    #[test]
    fn a_full_queue_refuses_and_keeps_what_it_has() {
        let t0 = Instant::now();
        let queues = OfflineQueues::new(2, TTL);
        queues.session_started(&device(), true, t0);
        assert!(matches!(
            queues.push(&device(), message(1), "1", t0, || true, || false),
            Push::Queued
        ));
        assert!(matches!(
            queues.push(&device(), message(2), "2", t0, || true, || false),
            Push::Queued
        ));
        assert!(matches!(
            queues.push(&device(), message(3), "3", t0, || true, || false),
            Push::Full
        ));
        let started = queues.session_started(&device(), true, t0);
        assert_eq!(payloads(&started.deliver), ["1", "2"]);
        assert_eq!(queues.len(&device()), 0);
    }

    #[test]
    fn a_persistent_reconnect_delivers_what_is_within_its_age() {
        let t0 = Instant::now();
        let queues = OfflineQueues::new(10, TTL);
        queues.session_started(&device(), true, t0);
        for (n, at) in [(1, 0), (2, 30), (3, 59)] {
            let _ = queues.push(
                &device(),
                message(n),
                "x",
                t0 + Duration::from_secs(at),
                || true,
                || false,
            );
        }
        let started = queues.session_started(&device(), true, t0 + Duration::from_secs(70));
        assert_eq!(payloads(&started.deliver), ["2", "3"]);
        assert_eq!((started.expired, started.cleared), (1, 0));
        // The session stays persistent: the next offline message is kept again.
        assert!(matches!(
            queues.push(&device(), message(4), "4", t0, || true, || false),
            Push::Queued
        ));
    }

    #[test]
    fn a_clean_reconnect_discards_the_old_session() {
        let t0 = Instant::now();
        let queues = OfflineQueues::new(10, TTL);
        queues.session_started(&device(), true, t0);
        let _ = queues.push(&device(), message(1), "1", t0, || true, || false);
        let _ = queues.push(&device(), message(2), "2", t0, || true, || false);
        let started = queues.session_started(&device(), false, t0);
        assert!(started.deliver.is_empty());
        assert_eq!(started.cleared, 2);
        assert!(matches!(
            queues.push(&device(), message(3), "3", t0, || true, || false),
            Push::NoSession
        ));
    }

    #[test]
    fn sweep_drops_only_expired_messages_and_forget_drops_the_session() {
        let t0 = Instant::now();
        let queues = OfflineQueues::new(10, TTL);
        queues.session_started(&device(), true, t0);
        let _ = queues.push(&device(), message(1), "1", t0, || true, || false);
        let _ = queues.push(&device(), message(2), "2", t0 + TTL, || true, || false);
        assert_eq!(queues.sweep(t0 + TTL), 1);
        assert_eq!(queues.len(&device()), 1);
        assert_eq!(queues.forget(&device()), 1);
        assert!(matches!(
            queues.push(&device(), message(3), "3", t0, || true, || false),
            Push::NoSession
        ));
    }

    #[test]
    fn max_zero_keeps_nothing() {
        let t0 = Instant::now();
        let queues = OfflineQueues::new(0, TTL);
        queues.session_started(&device(), true, t0);
        assert!(matches!(
            queues.push(&device(), message(1), "1", t0, || true, || false),
            Push::NoSession
        ));
        assert!(matches!(
            queues.push(&device(), message(1), "1", t0, || true, || true),
            Push::Online(_)
        ));
    }

    #[test]
    fn a_disabled_device_is_refused_with_or_without_a_session() {
        let t0 = Instant::now();
        let queues = OfflineQueues::new(10, TTL);
        assert!(matches!(
            queues.push(&device(), message(1), "1", t0, || false, || false),
            Push::Disabled
        ));
        queues.session_started(&device(), true, t0);
        let _ = queues.push(&device(), message(1), "1", t0, || true, || false);
        assert!(matches!(
            queues.push(&device(), message(2), "2", t0, || false, || false),
            Push::Disabled
        ));
        assert_eq!(queues.len(&device()), 1);
        // Its disabling drops the queue and the session with it.
        assert_eq!(queues.forget(&device()), 1);
        assert!(matches!(
            queues.push(&device(), message(3), "3", t0, || true, || false),
            Push::NoSession
        ));
    }
}
