//! The gateway's way into the router: [`Downlink`] publishes to devices, kicks and queries
//! sessions.
//!
//! The gateway's link (`fleetgate-gateway`) is owned by two dedicated OS threads, because
//! rumqttd's local link API blocks:
//!
//! - `fleetgate-downlink` owns the `LinkTx`. [`Downlink::publish`] hands it messages through a
//!   bounded std channel (`try_send`, so an async caller never blocks; a full channel is an
//!   error the caller sees). The thread takes everything queued, puts it into the link buffer
//!   and notifies the router once per batch.
//! - `fleetgate-downlink-rx` drains the link's `LinkRx` (the gateway never subscribes, so only
//!   scheduling notifications arrive) and answers `Unschedule` with `ready()`, which rumqttd
//!   requires or the link stalls.
//!
//! # Direct delivery of QoS 0 messages
//!
//! [`Downlink::publish_qos0`] is for QoS 0 messages to one device (the `_reply` topics): when
//! the topic's owner ([`acl::topic_owner`]) has a live **clean** session and one of the
//! subscriptions the router granted it matches the topic, the message goes into that session's
//! queue (64 messages, `session::DIRECT_QUEUE`) and its connection task writes it as a QoS 0 PUBLISH.
//! The router never sees it: no trip through the single router thread and, above all, no copy
//! in the device filter's commit log, where acknowledged messages stay until a segment rotates
//! (the memory growth measured in the fleet soak). QoS 0 is what MQTT allows for a QoS 0
//! publish whatever the subscription's QoS (min of the two).
//!
//! Everything else takes the router path of [`Downlink::publish`]: a device that is offline,
//! has a persistent session (the router must keep its messages for the reconnect), has no
//! matching grant yet (e.g. between its SUBSCRIBE and the SUBACK), or a topic without a single
//! owner. QoS 1 messages (OTA upgrade pushes) always use [`Downlink::publish`].
//!
//! - **Full queue**: the message is dropped and counted
//!   (`fleetgate_mqtt_downlink_direct_dropped_total`); the caller is never blocked. Only a
//!   device whose connection task cannot write (it stopped reading) gets there: replies to the
//!   device's own requests are written between the packets of the read that caused them.
//! - **Order**: direct messages keep their order among themselves. Relative to messages still
//!   on the router path they may overtake: only around a SUBACK (messages published before the
//!   grant was recorded may arrive after later direct ones) and between QoS 0 and QoS 1
//!   messages, which MQTT does not order anyway.

use super::auth::router_client_id;
use super::router::RouterHandle;
use super::session::{DirectMessage, Offer, Phase, SessionHandle};
use super::{acl, BrokerError, DeviceKey, DisconnectReason};
use crate::metrics::Metrics;
use bytes::Bytes;
use dashmap::DashMap;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::Notification;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;

/// How many downstream messages may wait for the downlink thread.
const DOWNLINK_QUEUE: usize = 65_536;
/// Most messages handed to the router in one event.
const BATCH: usize = 1024;

/// A message for devices.
pub(crate) struct DownMessage {
    topic: Bytes,
    payload: Bytes,
}

/// State shared by the broker, its connection tasks and every [`Downlink`].
pub(crate) struct SessionTable {
    pub sessions: DashMap<DeviceKey, Arc<SessionHandle>>,
}

/// Which path [`Downlink::publish_qos0`] gave a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the device's live session; its connection task writes it.
    Direct,
    /// Handed to rumqttd's router, like [`Downlink::publish`].
    Router,
    /// Dropped: the device's session queue was full (counted).
    Dropped,
}

/// Publishes to devices and controls their sessions. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct Downlink {
    tx: SyncSender<DownMessage>,
    table: Arc<SessionTable>,
    router: Arc<RouterHandle>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Downlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downlink")
            .field("sessions", &self.table.sessions.len())
            .finish()
    }
}

impl Downlink {
    /// Starts the gateway link's threads.
    pub(crate) fn start(
        link_tx: LinkTx,
        link_rx: LinkRx,
        table: Arc<SessionTable>,
        router: Arc<RouterHandle>,
        metrics: Arc<Metrics>,
    ) -> Result<Downlink, BrokerError> {
        let (tx, rx) = sync_channel(DOWNLINK_QUEUE);
        std::thread::Builder::new()
            .name("fleetgate-downlink".into())
            .spawn(move || feed_router(link_tx, rx))
            .map_err(BrokerError::Io)?;
        std::thread::Builder::new()
            .name("fleetgate-downlink-rx".into())
            .spawn(move || drain(link_rx))
            .map_err(BrokerError::Io)?;
        Ok(Downlink {
            tx,
            table,
            router,
            metrics,
        })
    }

    /// Publishes `payload` on `topic` to every device subscribed to it, at each subscription's
    /// QoS (a device that subscribed with QoS 1 gets it as QoS 1 and must PUBACK it). Returns once
    /// the message is queued; it never blocks. Messages to a device that is offline with a
    /// persistent session (clean_session = false) are delivered when it reconnects.
    pub fn publish(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Result<(), BrokerError> {
        let topic = topic.into();
        if !acl::valid_topic_name(&topic) {
            return Err(BrokerError::InvalidTopic(topic));
        }
        self.send_to_router(DownMessage {
            topic: Bytes::from(topic),
            payload: payload.into(),
        })
    }

    fn send_to_router(&self, message: DownMessage) -> Result<(), BrokerError> {
        match self.tx.try_send(message) {
            Ok(()) => {
                self.metrics.downlink_messages.inc();
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(BrokerError::DownlinkFull),
            Err(TrySendError::Disconnected(_)) => Err(BrokerError::Closed),
        }
    }

    /// Publishes a QoS 0 message to the one device that owns `topic` (a reply): straight to its
    /// live session when one of its granted subscriptions matches, else through the router like
    /// [`publish`](Self::publish) (see the module docs for when). Delivered at QoS 0 on the
    /// direct path whatever the subscription's QoS. Never blocks; returns which path it took.
    pub fn publish_qos0(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Result<Delivery, BrokerError> {
        let topic = topic.into();
        if !acl::valid_topic_name(&topic) {
            return Err(BrokerError::InvalidTopic(topic));
        }
        let handle = acl::topic_owner(&topic).and_then(|(pk, dn)| {
            let device = DeviceKey {
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
            };
            // Cloned out: offering must not hold a map shard lock.
            self.table
                .sessions
                .get(&device)
                .map(|h| Arc::clone(h.value()))
        });
        let message = DirectMessage {
            topic: Bytes::from(topic),
            payload: payload.into(),
        };
        let message = match handle {
            Some(handle) => match handle.offer(message) {
                Offer::Queued => {
                    self.metrics.downlink_direct.inc();
                    return Ok(Delivery::Direct);
                }
                Offer::Full => {
                    self.metrics.downlink_direct_dropped.inc();
                    return Ok(Delivery::Dropped);
                }
                Offer::Declined(message) => message,
            },
            None => message,
        };
        self.send_to_router(DownMessage {
            topic: message.topic,
            payload: message.payload,
        })
        .map(|()| Delivery::Router)
    }

    /// Closes the device's session, if it has one (`on_disconnect` with [`DisconnectReason::Kicked`]).
    /// Returns whether there was one.
    pub fn kick(&self, device: &DeviceKey) -> bool {
        // Clone the handle out: retiring sends to the router and must not hold a map shard lock.
        let handle = self
            .table
            .sessions
            .get(device)
            .map(|h| Arc::clone(h.value()));
        match handle {
            Some(handle) => {
                handle.retire(DisconnectReason::Kicked);
                true
            }
            None => false,
        }
    }

    /// Ends the device's session, if it has one (like [`kick`](Self::kick)), and makes the
    /// router forget its persistent session: a deleted device must not leave subscriptions,
    /// messages queued while it was offline or `session_present` to a device created again
    /// under its name. Returns once the router dropped them.
    ///
    /// A CONNECT of the device racing with this either reaches the session table first (and is
    /// retired here) or finds the device gone when the connection task looks again after
    /// entering the table (see `connection::handshake`).
    pub async fn forget_session(&self, device: &DeviceKey) -> Result<(), BrokerError> {
        let handle = self
            .table
            .sessions
            .get(device)
            .map(|h| Arc::clone(h.value()));
        if let Some(handle) = handle {
            handle.retire(DisconnectReason::Kicked);
            // As in a takeover: its link must be settled before the client id connects again,
            // or the router could reuse its connection id under a late DISCONNECT.
            handle.wait_phase(Phase::Settled).await;
        }
        self.router
            .clear_session(router_client_id(device))
            .await
            .map_err(|e| BrokerError::Router(e.to_string()))
    }

    /// The device's entry in the session table (tests look at what it holds and when it goes).
    #[cfg(test)]
    pub(crate) fn session(&self, device: &DeviceKey) -> Option<Arc<SessionHandle>> {
        self.table
            .sessions
            .get(device)
            .map(|h| Arc::clone(h.value()))
    }

    /// Ends the device's session if it is the one with epoch `conn_id` (a newer session of
    /// the device on another node took over, or the device was revoked there). Returns
    /// whether it did.
    pub fn retire(&self, device: &DeviceKey, conn_id: u64, reason: DisconnectReason) -> bool {
        let handle = self
            .table
            .sessions
            .get(device)
            .filter(|h| h.conn_id == conn_id)
            .map(|h| Arc::clone(h.value()));
        match handle {
            Some(handle) => {
                handle.retire(reason);
                true
            }
            None => false,
        }
    }

    /// Closes every session (`on_disconnect` with [`DisconnectReason::Kicked`]): this node
    /// can no longer vouch for them (cut from the cluster). Returns how many.
    pub fn kick_all(&self) -> usize {
        let handles: Vec<Arc<SessionHandle>> = self
            .table
            .sessions
            .iter()
            .map(|h| Arc::clone(h.value()))
            .collect();
        for handle in &handles {
            handle.retire(DisconnectReason::Kicked);
        }
        handles.len()
    }

    /// Whether the device has an authenticated session right now.
    pub fn is_connected(&self, device: &DeviceKey) -> bool {
        self.table
            .sessions
            .get(device)
            .is_some_and(|h| h.is_online())
    }

    /// How many devices have an authenticated session.
    pub fn connected_count(&self) -> usize {
        self.table.sessions.iter().filter(|h| h.is_online()).count()
    }
}

/// The `fleetgate-downlink` thread: moves queued messages into the router, batch by batch.
fn feed_router(mut link_tx: LinkTx, rx: Receiver<DownMessage>) {
    feed(&mut link_tx, rx);
    // Every Downlink is gone (the broker was dropped): unregister the gateway link, which also
    // ends the drain thread (its LinkRx errors once the router forgets the link).
    let disconnect = Packet::Disconnect(
        rumqttd::protocol::Disconnect {
            reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
        },
        None,
    );
    let _ = futures_util::FutureExt::now_or_never(link_tx.send(disconnect));
}

fn feed(link_tx: &mut LinkTx, rx: Receiver<DownMessage>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let Some(last) = batch.pop() else { continue };
        link_tx.buffer().extend(
            batch
                .into_iter()
                .map(|m| Packet::Publish(Publish::new(m.topic, m.payload, false), None)),
        );
        if let Err(e) = link_tx.publish(last.topic, last.payload) {
            tracing::error!(error = %e, "router is gone, downlink stops");
            return;
        }
    }
}

/// The `fleetgate-downlink-rx` thread: keeps the gateway link schedulable.
fn drain(mut link_rx: LinkRx) {
    loop {
        match link_rx.recv() {
            Ok(Some(Notification::Unschedule)) => {
                if link_rx.ready().is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}
