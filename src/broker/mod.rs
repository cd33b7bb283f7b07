//! The embedded MQTT broker: our own acceptor in front of rumqttd's router.
//!
//! We own the TCP/TLS listeners and the MQTT handshake: every CONNECT is authenticated with the
//! Alibaba Link signature ([`fleetgate_topics::sign`]) and answered with a real CONNACK code;
//! every PUBLISH/SUBSCRIBE is checked against the device's own `{pk}/{dn}` (topic isolation,
//! [`acl`]). Upstream device publishes are handed to [`DeviceHooks::on_publishes`] (a run of
//! the PUBLISHes of one read) and acknowledged (PUBACK) only after it returns. rumqttd's router
//! does what it is good at: sessions, subscriptions, QoS and fan-out of downstream messages,
//! which the gateway injects through [`Downlink`].
//!
//! This module owns sockets and the router; it knows nothing of the registry beyond
//! [`DeviceHooks`].
//!
//! # Threads, tasks and channels
//!
//! ```text
//!                 accept task (TCP)  accept task (TLS)        -- tokio, one per listener
//!                        \               /
//!                 connection task, one per socket             -- tokio
//!                 (CONNECT, auth, ACL, on_publish, acks)
//!                   |  LinkTx (buffer + router channel)  ^ LinkRx (notify channel + buffer)
//!                   |  register: bounded tokio mpsc ──►  fleetgate-links thread
//!                   |  ◄── oneshot (LinkTx, LinkRx)      (LinkBuilder::build, one at a time)
//!                   v                                    |
//!   router-0 thread: rumqttd Router (bounded flume channel, 1000 events)
//!                   ^                                    |
//!                   | LinkTx "fleetgate-gateway"         v LinkRx
//!   fleetgate-downlink thread                  fleetgate-downlink-rx thread
//!   (fed by Downlink::publish through          (drains, answers Unschedule
//!    a bounded std channel, try_send)           with ready())
//! ```
//!
//! - `Broker::new` spawns the router and link registration threads and registers the gateway
//!   link; `Broker::start` binds the listeners (port 0 works, backlog 4096) and spawns the
//!   accept tasks.
//! - A connection task reads CONNECT within `connect_timeout`, authenticates it (`auth.rs`),
//!   retires a previous session of the same device (takeover), registers its router link through
//!   the `fleetgate-links` thread (`LinkBuilder::build` blocks until the router answers: one
//!   thread fed by a bounded channel, answering on a oneshot, instead of a blocking-pool thread
//!   per CONNECT), calls `on_connect`, writes the CONNACK, then selects over socket reads, link
//!   notifications, direct deliveries, a retire signal, shutdown and keep-alive.
//! - The session table (`DashMap<DeviceKey, SessionHandle>`) is how kick, takeover and shutdown
//!   reach a session. A session's `LinkTx` lives in its handle behind a mutex so that retiring it
//!   (send DISCONNECT to the router, then forget the `LinkTx`) is atomic: rumqttd reuses a
//!   connection id right after it dropped a link, and a late send would hit another client.
//! - Router sends from tasks first wait asynchronously for room in the router's channel, then use
//!   rumqttd's (blocking) send, which therefore returns at once in practice.
//!
//! # Behaviour decisions
//!
//! - **securemode**: 2 (TLS) and 3 (TCP) are both accepted on both listeners; it is not signed
//!   and the transport is what it is.
//! - **ACL-denied PUBLISH**: dropped, counted (`acl_denied{kind="publish"}`), and still acked
//!   (PUBACK/PUBREC) like the vendor broker: closing would only cause reconnect-and-retry loops.
//!   Denied SUBSCRIBE filters get return code 0x80 in their place of the one SUBACK.
//! - **QoS 2 upstream**: PUBREC after `on_publish`, a retransmission with the same packet id is
//!   acknowledged without being processed again, PUBREL gets PUBCOMP. Retain flags are ignored.
//! - **Withheld acknowledgements**: a hook that could not take a message (ingest: the
//!   forwarding outbox stayed full for `amqp.outbox_full_wait_ms`) answers
//!   [`PublishOutcome::Withheld`]. MQTT 3.1.1 has no negative PUBACK, so for QoS 1/2 the
//!   connection acknowledges what came before it, then closes WITHOUT acknowledging it or
//!   anything after it ([`DisconnectReason::Withheld`], counted in
//!   `fleetgate_mqtt_publishes_withheld_total`); the device resends those after reconnecting
//!   (MQTT 3.1.1 §4.4). While a hook waits, the connection reads nothing more from the socket:
//!   the device's later PUBLISHes wait in TCP. A withheld QoS 0 PUBLISH has nothing to withhold
//!   (the hook counted it as dropped); the connection goes on.
//! - **Last will**: never given to rumqttd (its will handling is private to its own server); on
//!   any end other than a client DISCONNECT, the will is published through the [`Downlink`] if
//!   its topic belongs to the device (else dropped, `acl_denied{kind="will"}`).
//! - **Persistent sessions**: `clean_session = false` is passed to rumqttd, which keeps the
//!   subscriptions and the read position of an offline device in memory (not across restarts):
//!   downstream messages published meanwhile are delivered on reconnect, CONNACK says
//!   `session_present`. [`Downlink::forget_session`] (called for every deleted device) makes the
//!   router drop it, so a device created again under the same name does not inherit it.
//! - **Keep-alive**: the session ends after 1.5 × keep-alive without bytes from the client;
//!   keep-alive 0 means no timeout, as MQTT says.
//! - **Packet size**: a packet's remaining length may not exceed `max_payload_size`.
//! - **MQTT 5** is not supported: a v5 (or 3.1) CONNECT is answered with the 3.1.1 CONNACK
//!   "unacceptable protocol version" (1) and counted as `connects_refused{reason="protocol"}`.
//!   No v5 packet ever reaches rumqttd (its v5 paths have known panics).
//! - **QoS 0 replies** ([`Downlink::publish_qos0`]) go straight to the device's live clean
//!   session when a subscription the router granted it matches (recorded at SUBACK, `_ss=1`
//!   included, removed at UNSUBSCRIBE), written at QoS 0; otherwise through the router. A full
//!   per-session queue (64) drops the message and counts it. Details in `downlink.rs`.
//! - **SUBSCRIBE/UNSUBSCRIBE order**: forwarded to the router before the packets that follow it
//!   in the same read are handled, so the reply to a request sent right after a SUBSCRIBE finds
//!   the subscription in place.
//! - **Limits**: at `max_connections` authenticated sessions a new device gets CONNACK "server
//!   unavailable" (3), counted as `limit`; a takeover of a connected device is always allowed.
//!   A device may use at most `max_subscriptions_per_device` distinct filters while the process
//!   runs (`filters.rs`: rumqttd never frees a filter's log, so slots are not given back);
//!   further filters get 0x80 in the SUBACK. The `_ss=1` filters do not count.
//! - **CONNECT timestamps**: not checked by default (the vendor's behaviour); with
//!   `connect_timestamp_window` a signed `timestamp=` further than that from the clock gets
//!   CONNACK "not authorized" (5), counted as `timestamp` (`auth.rs`).
//! - **Protocol violations** (zero-length or NUL topics and filters, SUBSCRIBE/UNSUBSCRIBE
//!   without filters, undecodable packets) close the connection without an answer, counted by
//!   reason (`violation.rs`). A well-formed foreign topic is the ACL's (dropped or 0x80).
//!   Before that, every accepted socket passes [`crate::admission`]: beyond `max_sockets` open
//!   sockets, or `max_unauthenticated_per_ip` sockets of its source still without an
//!   authenticated CONNECT, it is closed at once (`fleetgate_connections_refused_total`).
//!   The CONNECT timeout runs from accept (TLS handshake included); a socket accepted while
//!   `pressure_unauthenticated` sockets wait for their CONNECT gets the shorter
//!   `connect_timeout_under_pressure`.
//! - **Behind a balancer** (`proxy`, [`crate::proxy_protocol`]): a socket from a trusted
//!   balancer is admitted by the budget alone, must start with a PROXY header within its
//!   CONNECT deadline (a malformed, oversized or late one closes it, counted as
//!   `proxy_header` or `timeout`), and the client address in it is the connection's peer from
//!   then on: its source's cap is checked then, and the session's `client_addr` is that
//!   address. With `required`, a socket from anywhere else is closed at accept.

pub mod acl;
pub(crate) mod auth;
mod codec;
mod connection;
mod downlink;
mod filters;
mod router;
mod server;
mod session;
#[cfg(test)]
mod tests;
mod violation;

/// What the fuzz harnesses ([`crate::fuzzing`]) run of the connection's private parts.
#[cfg(feature = "fuzzing")]
pub(crate) mod fuzzing {
    pub(crate) use super::auth::{authenticate, Refusal, UNCHECKED};
    pub(crate) use super::codec::{encode, next_frame, publish_meta, Frame, UpPublish};
    pub(crate) use super::connection::{open, own_will, Opening};
}

pub use downlink::{Delivery, Downlink};
pub use server::{bind_listener, check_tls, Broker, BrokerHandle};

/// Resolves when the broker shuts down (the flag turns true, or its sender is gone).
async fn stopping(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    // The borrow guard is dropped at once: it must not live across an await (it is not Send).
    let _ = shutdown.wait_for(|stop| *stop).await.map(drop);
}

use crate::cluster::epoch::EpochClock;
use crate::proxy_protocol::ProxyPolicy;
use bytes::Bytes;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Broker errors.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("router refused the gateway link: {0}")]
    Router(String),
    #[error("invalid topic name {0:?}")]
    InvalidTopic(String),
    #[error("downlink queue is full")]
    DownlinkFull,
    #[error("the broker is shut down")]
    Closed,
}

/// A device's identity: `(product_key, device_name)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    pub product_key: String,
    pub device_name: String,
}

/// What the broker needs to authenticate a CONNECT.
#[derive(Debug, Clone)]
pub struct DeviceCredentials {
    pub device_secret: String,
    pub enabled: bool,
}

/// One authenticated MQTT connection.
#[derive(Debug, Clone)]
pub struct Session {
    pub device: DeviceKey,
    /// The session's epoch (`cluster::epoch`): unique per authenticated connection across
    /// restarts and nodes, and ordered (not rumqttd's reusable id).
    pub conn_id: u64,
    pub client_id: String,
    pub client_addr: SocketAddr,
    pub tls: bool,
    /// Milliseconds since the Unix epoch.
    pub connected_at_ms: i64,
    /// The CONNECT's `clean_session`; `false`: a persistent session (the router keeps its
    /// subscriptions while the device is offline).
    pub clean_session: bool,
}

impl Session {
    pub fn client_ip(&self) -> IpAddr {
        self.client_addr.ip()
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The gateway could not take a QoS 1/2 PUBLISH ([`PublishOutcome::Withheld`]) and closed
    /// the connection without acknowledging it, so that the device sends it again.
    Withheld,
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// Socket closed, I/O or protocol error, keep-alive expired.
    ConnectionLost,
    /// Another connection took over the same device (or client id).
    TakenOver,
    /// The gateway closed it (device disabled/deleted, migration, shutdown).
    Kicked,
}

pub use rumqttd::protocol::QoS;

/// An upstream PUBLISH that passed the ACL, as the hooks see it.
#[derive(Debug, Clone)]
pub struct UpMessage<'a> {
    pub topic: &'a str,
    pub payload: Bytes,
    pub qos: QoS,
}

/// What a hook made of an upstream PUBLISH: whether the broker may acknowledge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// Processed (or deliberately ignored, like an unknown topic): acknowledge it.
    Processed,
    /// Not taken, and nothing of it must be acknowledged (e.g. the forwarding outbox stayed
    /// full): for QoS 1/2 the broker closes the connection without the PUBACK/PUBREC, so the
    /// device sends it again after reconnecting. For QoS 0 there is nothing to withhold: the
    /// hook has dropped (and counted) it.
    Withheld,
}

/// The outcomes of a run of PUBLISHes ([`DeviceHooks::on_publishes`]): every message is
/// [`PublishOutcome::Processed`] unless marked withheld. Allocates only when one is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOutcome {
    /// Indexes into the run, ascending.
    withheld: Vec<usize>,
}

impl RunOutcome {
    /// Every message of the run processed.
    pub fn processed() -> Self {
        RunOutcome::default()
    }

    /// Marks the run's message `index` withheld.
    pub fn withhold(&mut self, index: usize) {
        if let Err(at) = self.withheld.binary_search(&index) {
            self.withheld.insert(at, index);
        }
    }

    pub fn get(&self, index: usize) -> PublishOutcome {
        if self.withheld.binary_search(&index).is_ok() {
            PublishOutcome::Withheld
        } else {
            PublishOutcome::Processed
        }
    }

    /// Whether every message was processed.
    pub fn all_processed(&self) -> bool {
        self.withheld.is_empty()
    }
}

impl FromIterator<PublishOutcome> for RunOutcome {
    /// Outcomes in run order.
    fn from_iter<I: IntoIterator<Item = PublishOutcome>>(iter: I) -> Self {
        let mut out = RunOutcome::default();
        for (i, o) in iter.into_iter().enumerate() {
            if o == PublishOutcome::Withheld {
                out.withheld.push(i);
            }
        }
        out
    }
}

/// The gateway side of the broker: authentication data and upstream traffic.
pub trait DeviceHooks: Send + Sync + 'static {
    /// Credentials of a device, or `None` when it is unknown.
    fn credentials(&self, product_key: &str, device_name: &str) -> Option<DeviceCredentials>;
    /// A device passed authentication and its CONNACK is about to be sent.
    fn on_connect(&self, session: &Session);
    /// A session ended (called exactly once per `on_connect`).
    fn on_disconnect(&self, session: &Session, reason: DisconnectReason);
    /// An upstream PUBLISH that passed the ACL. The QoS 1 PUBACK (QoS 2 PUBREC) is written only
    /// after the returned future completes, and only if it says
    /// [`Processed`](PublishOutcome::Processed): "acknowledged" means "processed".
    ///
    /// The futures of consecutive QoS 0/1 PUBLISHes of one connection may run concurrently
    /// (first-polled in arrival order): an implementation applies whatever must follow the
    /// device's message order (registry changes, queueing a store write or an outbox message)
    /// before its first await, and only waits afterwards (e.g. for durability).
    fn on_publish(
        &self,
        session: &Session,
        message: UpMessage<'_>,
    ) -> impl Future<Output = PublishOutcome> + Send;

    /// A run of upstream PUBLISHes read together from one connection (QoS 0/1, arrival order,
    /// each past the ACL); their PUBACKs are written, in order, once the future completes —
    /// up to the first QoS 1 message the outcome withholds (see [`PublishOutcome::Withheld`]).
    /// The default runs [`Self::on_publish`] for each, concurrently. An implementation may
    /// instead share work between them (ingest writes a run's version reports with one store
    /// submission), keeping the rule above: what follows the device's order is applied
    /// before the first await.
    fn on_publishes<'a>(
        &'a self,
        session: &'a Session,
        run: &'a [UpMessage<'a>],
    ) -> impl Future<Output = RunOutcome> + Send + 'a {
        async move {
            match run {
                [] => RunOutcome::processed(),
                [message] => {
                    std::iter::once(self.on_publish(session, message.clone()).await).collect()
                }
                _ => futures_util::future::join_all(
                    run.iter()
                        .map(|message| self.on_publish(session, message.clone())),
                )
                .await
                .into_iter()
                .collect(),
            }
        }
    }
}

/// TLS listener settings (securemode=2).
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// Broker settings.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    pub tls: Option<TlsConfig>,
    /// Authenticated sessions (a new device beyond it gets CONNACK 3).
    pub max_connections: usize,
    /// How long a new socket may take to send CONNECT (a TLS handshake included).
    pub connect_timeout: Duration,
    pub max_payload_size: usize,
    /// Where sessions' ids come from ([`Session::conn_id`] is the session's epoch, ordered
    /// across a cluster); shared with the registry.
    pub epochs: Arc<EpochClock>,
    /// Most distinct subscription filters one device may use during the process lifetime
    /// (the `_ss=1` filters the gateway subscribes itself aside); see `filters.rs`.
    pub max_subscriptions_per_device: usize,
    /// How far a CONNECT's signed `timestamp=` may be from the gateway's clock; `None`: not
    /// checked (the vendor's behaviour).
    pub connect_timestamp_window: Option<Duration>,
    /// Open sockets of both listeners, authenticated or not: beyond it, new sockets are closed
    /// as soon as they are accepted ([`crate::admission`]).
    pub max_sockets: usize,
    /// Sockets of one source address (IPv6: one /64) without an authenticated CONNECT yet.
    pub max_unauthenticated_per_ip: usize,
    /// From this many sockets without an authenticated CONNECT on, new sockets get
    /// `connect_timeout_under_pressure` instead of `connect_timeout`.
    pub pressure_unauthenticated: usize,
    pub connect_timeout_under_pressure: Duration,
    /// Which sockets start with a PROXY header naming the client (`mqtt.proxy_protocol`,
    /// `mqtt.proxy_trusted`; [`crate::proxy_protocol`]).
    pub proxy: ProxyPolicy,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: "0.0.0.0:1883".parse().unwrap(),
            tls: None,
            max_connections: 100_000,
            connect_timeout: Duration::from_secs(10),
            max_payload_size: 256 * 1024,
            epochs: Arc::new(EpochClock::new(0)),
            max_subscriptions_per_device: 50,
            connect_timestamp_window: None,
            max_sockets: 100_000,
            max_unauthenticated_per_ip: 512,
            pressure_unauthenticated: 12_500,
            connect_timeout_under_pressure: Duration::from_secs(2),
            proxy: ProxyPolicy::default(),
        }
    }
}
