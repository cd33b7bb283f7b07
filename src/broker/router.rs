//! rumqttd's router: its configuration and a type-erased handle to register links with it.
//!
//! `Router::spawn` returns a `flume::Sender<(ConnectionId, Event)>` whose `Event` lives in a
//! private rumqttd module, so the sender cannot be named in a struct field. [`RouterHandle`]
//! keeps it inside closures instead. The router runs on its own OS thread (`router-0`) for the
//! life of the process: rumqttd has no way to stop it (it keeps a clone of its own sender), so a
//! dropped [`Broker`](super::Broker) leaves one idle thread blocked on its channel.
//!
//! Device links are registered by one dedicated OS thread, `fleetgate-links`, fed by a bounded
//! tokio channel ([`RouterHandle::register`]): `LinkBuilder::build` blocks until the single router
//! thread answered, and running it on tokio's blocking pool made a connect storm grow that pool
//! to hundreds of threads that only took turns waiting for the router. One registration is a
//! channel round trip through the router, so one thread keeps up with the router (it cannot
//! register links faster than its one thread answers anyway). Requests are served in order,
//! which keeps the takeover rule of [`super::session`]: a DISCONNECT sent to the router before a
//! request is queued reaches the router before that request's CONNECT.
//!
//! The same thread clears persistent sessions ([`RouterHandle::clear_session`]): rumqttd keeps an
//! offline persistent session (its subscriptions, read positions, unacknowledged QoS 2 releases)
//! in its graveyard by client id until that id connects again, and a clean-session connect
//! drops it. Registering a clean link and disconnecting it in one request, with no other
//! registration in between, leaves nothing behind but rumqttd's per-client-id metrics record.

use super::BrokerConfig;
use futures_util::FutureExt;
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};
use rumqttd::{Notification, Router, RouterConfig, SegmentConfig};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The gateway's own link. Device links are named by
/// [`router_client_id`](super::auth::router_client_id), which always contains exactly one `&`,
/// so no device can take this name over.
pub(crate) const GATEWAY_LINK_ID: &str = "fleetgate-gateway";

/// Link registrations that may wait for the `fleetgate-links` thread; connection tasks beyond it
/// wait (asynchronously) for room.
const REGISTRATION_QUEUE: usize = 1024;

/// Extra router slots beyond `max_connections`: the gateway link, and old sessions whose
/// DISCONNECT the router has not processed yet while their replacement registers.
const ROUTER_SLACK: usize = 64;

/// The router configuration for a broker. Every filter in this router is a per-device filter (the
/// gateway never subscribes: upstream traffic reaches it through the hooks), carrying few and
/// small downstream messages, so segments are small: acked messages stay in a filter's log until
/// its segments rotate, and there is one log per distinct filter ever subscribed. One segment
/// still holds at least one maximum-size message (a segment may overflow by its last message),
/// and a device must lag by more than `MAX_SEGMENTS` segments before it skips messages.
pub(crate) fn router_config(config: &BrokerConfig) -> RouterConfig {
    const MIN_SEGMENT: usize = 64 * 1024;
    const MAX_SEGMENTS: usize = 4;
    let segment = config.max_payload_size.max(MIN_SEGMENT);
    // The same sizes for every device topic family, stated explicitly so that a future gateway
    // subscription (e.g. a wildcard tap) falls back to the larger default below.
    let per_device = SegmentConfig {
        max_segment_size: segment,
        max_segment_count: MAX_SEGMENTS,
    };
    let custom: HashMap<String, SegmentConfig> =
        ["/ota/#", "/sys/#", "/ext/#", "/shadow/#", "/+/+/#"]
            .into_iter()
            .map(|f| (f.to_owned(), per_device.clone()))
            .collect();
    RouterConfig {
        max_connections: config.max_connections.saturating_add(ROUTER_SLACK),
        max_outgoing_packet_count: 200,
        max_segment_size: (16 * segment).max(1024 * 1024),
        max_segment_count: 10,
        custom_segment: Some(custom),
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

/// The router did not register a link (connection limit, invalid client id, router gone).
/// rumqttd's own `LinkError` is ~800 bytes (it embeds flume errors with events), so only its text
/// is kept.
#[derive(Debug, thiserror::Error)]
#[error("router refused the link: {0}")]
pub(crate) struct LinkRefused(String);

pub(crate) type Link = (LinkTx, LinkRx, Notification);
type BuildFn = dyn Fn(&str, bool) -> Result<Link, LinkRefused> + Send + Sync;

/// What the `fleetgate-links` thread does for a connection task or a [`super::Downlink`].
enum LinkRequest {
    /// Register a link and hand it over.
    Register {
        client_id: String,
        clean_session: bool,
        reply: oneshot::Sender<Result<Link, LinkRefused>>,
    },
    /// Register a clean link and disconnect it at once: the client id's saved session is gone.
    Clear {
        client_id: String,
        reply: oneshot::Sender<Result<(), LinkRefused>>,
    },
}

/// A registered router: builds links and tells whether its inbound channel is full.
pub(crate) struct RouterHandle {
    build: Arc<BuildFn>,
    is_full: Box<dyn Fn() -> bool + Send + Sync>,
    /// To the `fleetgate-links` thread; it ends once every sender is gone.
    links: mpsc::Sender<LinkRequest>,
}

impl RouterHandle {
    /// Spawns rumqttd's router thread and the link registration thread.
    pub(crate) fn spawn(config: RouterConfig) -> std::io::Result<RouterHandle> {
        let tx = Router::new(0, config).spawn();
        let full_tx = tx.clone();
        let build: Arc<BuildFn> = Arc::new(move |client_id, clean| {
            LinkBuilder::new(client_id, tx.clone())
                .clean_session(clean)
                .build()
                .map_err(|e| LinkRefused(e.to_string()))
        });
        let (links, requests) = mpsc::channel(REGISTRATION_QUEUE);
        let thread_build = Arc::clone(&build);
        std::thread::Builder::new()
            .name("fleetgate-links".into())
            .spawn(move || register_links(&*thread_build, requests))?;
        Ok(RouterHandle {
            build,
            is_full: Box::new(move || full_tx.is_full()),
            links,
        })
    }

    /// Registers a link right here. Blocks until the router answered: only for the gateway's
    /// own link at start-up; connections use [`register`](Self::register).
    /// Returns the link and its CONNACK notification. Fails when the router refuses the link
    /// (connection limit, invalid client id).
    pub(crate) fn build_link(
        &self,
        client_id: &str,
        clean_session: bool,
    ) -> Result<Link, LinkRefused> {
        (self.build)(client_id, clean_session)
    }

    /// Registers a link on the `fleetgate-links` thread and waits (asynchronously) for it.
    /// Requests are served in the order they were queued. If the caller stops waiting, the
    /// thread disconnects the link it built, so no router slot leaks.
    pub(crate) async fn register(
        &self,
        client_id: String,
        clean_session: bool,
    ) -> Result<Link, LinkRefused> {
        let gone = || LinkRefused("the link registration thread is gone".to_owned());
        let (reply, answer) = oneshot::channel();
        let request = LinkRequest::Register {
            client_id,
            clean_session,
            reply,
        };
        self.links.send(request).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Makes the router drop whatever persistent session it keeps for `client_id` (see the
    /// module docs). The caller must have retired a live link of that client id and waited
    /// until it settled, like a takeover does. Requests are served in order with the
    /// registrations, so a connection registered after this call starts without the old
    /// session.
    pub(crate) async fn clear_session(&self, client_id: String) -> Result<(), LinkRefused> {
        let gone = || LinkRefused("the link registration thread is gone".to_owned());
        let (reply, answer) = oneshot::channel();
        let request = LinkRequest::Clear { client_id, reply };
        self.links.send(request).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Waits (asynchronously) until the router's bounded inbound channel has room, so that the
    /// blocking `LinkTx::send` that follows does not park a runtime worker. Best effort: another
    /// sender may take the slot first, then the send blocks only until the router drains one
    /// event (it drains hundreds per loop).
    pub(crate) async fn wait_capacity(&self) {
        while (self.is_full)() {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
}

/// The `fleetgate-links` thread: registers links one at a time, in request order.
fn register_links(build: &BuildFn, mut requests: mpsc::Receiver<LinkRequest>) {
    while let Some(request) = requests.blocking_recv() {
        match request {
            LinkRequest::Register {
                client_id,
                clean_session,
                reply,
            } => {
                // Its connection task is gone (runtime shutting down): do not take a router slot.
                if reply.is_closed() {
                    continue;
                }
                let built = build(&client_id, clean_session);
                if let Err(Ok((mut link_tx, _rx, _ack))) = reply.send(built) {
                    // The task stopped waiting meanwhile: give the slot back to the router.
                    disconnect(&mut link_tx);
                }
            }
            LinkRequest::Clear { client_id, reply } => {
                // Disconnected before the next request is served: no registration of the same
                // client id can come in between and see its connection id reused.
                let cleared = build(&client_id, true).map(|(mut link_tx, _rx, _ack)| {
                    disconnect(&mut link_tx);
                });
                let _ = reply.send(cleared);
            }
        }
    }
}

/// Sends the router a DISCONNECT for a link (its send completes on the first poll).
fn disconnect(link_tx: &mut LinkTx) {
    let disconnect = Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    );
    let _ = link_tx.send(disconnect).now_or_never();
}
