//! One MQTT connection, from the first byte to `on_disconnect`: one tokio task per socket.
//!
//! 1. Read CONNECT by the deadline set at accept (`connect_timeout`, shorter under pre-CONNECT
//!    pressure) and authenticate it ([`super::auth`]); a refusal gets a CONNACK with a real
//!    return code and is counted by reason. Once authenticated, the socket no longer counts
//!    against its source's cap of unauthenticated sockets ([`crate::admission`]).
//! 2. Take over a previous session of the same device (it is retired first, so the router sees
//!    its DISCONNECT before the new link's CONNECT), register the router link through the
//!    `fleetgate-links` thread ([`super::router`]), call `on_connect`, write the CONNACK the router produced (`session_present`).
//! 3. Loop over socket reads, the link's notifications, a retire signal, broker shutdown and the
//!    keep-alive deadline (like rumqttd's `RemoteLink::start`, batching reads and writes).
//!
//! Upstream traffic never reaches the router: PUBLISHes pass the ACL and go to
//! `on_publish`, after which *we* acknowledge them; only SUBSCRIBE/UNSUBSCRIBE and the acks of
//! downstream messages go to the link. Anything malformed or unexpected ends the connection.

use super::auth::{authenticate, Authenticated, Freshness, Refusal};
use super::codec::{self, Frame, UpPublish};
use super::server::Shared;
use super::session::{DirectMessage, Phase, SessionHandle};
use super::violation::{self, Violation};
use super::{
    acl, DeviceHooks, DeviceKey, DisconnectReason, PublishOutcome, RunOutcome, Session, UpMessage,
};
use crate::admission::Permit;
use crate::clock::now_ms;
use crate::proxy_protocol::Rewind;
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use rumqttd::local::LinkRx;
use rumqttd::protocol::{
    self, ConnAck, Connect, ConnectReturnCode, Filter, LastWill, Packet, PingResp, PubAck,
    PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, Publish, QoS, RetainForwardRule,
    SubAck, Subscribe, SubscribeReasonCode, UnsubAck, Unsubscribe,
};
use rumqttd::Notification;
use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

/// How long a new session waits for the session it replaces to finish `on_disconnect`, so the
/// hooks see offline-then-online in that order. Past it the new session goes ahead anyway.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);
/// Most router notifications handled per wake-up (one socket write).
const NOTIFICATION_BATCH: usize = 256;
/// Initial read buffer: enough for a CONNECT and small packets; it grows on demand.
const READ_BUFFER: usize = 1024;
/// Largest room a read asks for (see [`Conn::fill`]).
const READ_MAX: usize = 16 * 1024;

/// What a connection runs on: a byte stream whose readability can be awaited before a read
/// buffer is offered (see [`Conn::fill`]).
pub(crate) trait Socket: AsyncRead + AsyncWrite + Unpin + Send {
    /// Resolves when a read would probably find data (or an error, or the end of the stream).
    /// A stream that cannot tell resolves at once, and the read waits with its buffer.
    fn ready(&self) -> impl std::future::Future<Output = io::Result<()>> + Send;
}

/// A TCP socket, with what was read past a PROXY header (if any) read first.
impl Socket for Rewind<tokio::net::TcpStream> {
    async fn ready(&self) -> io::Result<()> {
        if self.has_buffered() {
            return Ok(());
        }
        self.get_ref().readable().await
    }
}

/// TLS: decrypted bytes may already wait inside the session, so the socket's readiness says
/// nothing; the read waits with its buffer.
impl Socket for tokio_rustls::server::TlsStream<Rewind<tokio::net::TcpStream>> {
    async fn ready(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
impl Socket for tokio::io::DuplexStream {
    async fn ready(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A socket with its read and write buffers.
struct Conn<S> {
    io: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    max_packet: usize,
    /// Room the next read asks for: doubled after a read that filled it, halved after one that
    /// used less than a quarter ([`READ_BUFFER`]..=[`READ_MAX`]).
    read_room: usize,
}

enum ReadError {
    Io,
    Protocol(protocol::Error),
}

impl<S: Socket> Conn<S> {
    /// Reads whatever the socket has. Cancel-safe: bytes read are kept in `rbuf`.
    ///
    /// The room offered to a read follows what the socket delivers. A PUBLISH's payload keeps
    /// its part of `rbuf` alive, so every read of a device that publishes gets a new buffer
    /// anyway; sizing it only by `rbuf`'s first capacity capped reads at ~1 KB, about two
    /// 200-byte reports, and a flooding device cost two `recvfrom` per report window instead
    /// of one.
    ///
    /// With nothing pending, the buffer is let go and the socket's readiness awaited first: an
    /// idle connection holds no read buffer at all (over 1 KB each, and up to the largest room
    /// for one that flooded before going quiet).
    async fn fill(&mut self) -> io::Result<usize> {
        if self.rbuf.is_empty() {
            if self.rbuf.capacity() > 0 {
                self.rbuf = BytesMut::new();
            }
            self.io.ready().await?;
        }
        let room = self.rbuf.capacity() - self.rbuf.len();
        if room < self.read_room {
            self.rbuf.reserve(self.read_room);
        }
        let offered = self.rbuf.capacity() - self.rbuf.len();
        let n = self.io.read_buf(&mut self.rbuf).await?;
        if n == offered {
            self.read_room = (self.read_room * 2).min(READ_MAX);
        } else if n < self.read_room / 4 {
            self.read_room = (self.read_room / 2).max(READ_BUFFER);
        }
        Ok(n)
    }

    async fn read_frame(&mut self) -> Result<Frame, ReadError> {
        loop {
            if let Some(frame) =
                codec::next_frame(&mut self.rbuf, self.max_packet).map_err(ReadError::Protocol)?
            {
                return Ok(frame);
            }
            match self.fill().await {
                Ok(0) | Err(_) => return Err(ReadError::Io),
                Ok(_) => {}
            }
        }
    }

    fn queue(&mut self, packet: Packet) -> Result<(), protocol::Error> {
        codec::encode(packet, &mut self.wbuf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.io.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        self.io.flush().await
    }
}

/// An accepted socket's place in the broker's admission gate, and when its CONNECT is due.
pub(crate) struct Admitted {
    pub permit: Permit,
    pub deadline: Instant,
}

/// Serves one accepted socket until the session ends.
pub(crate) async fn serve<S, H>(
    io: S,
    peer: SocketAddr,
    tls: bool,
    admitted: Admitted,
    shared: Arc<Shared>,
    hooks: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: Socket,
    H: DeviceHooks,
{
    let mut conn = Conn {
        io,
        rbuf: BytesMut::with_capacity(READ_BUFFER),
        wbuf: BytesMut::new(),
        max_packet: shared.config.max_payload_size,
        read_room: READ_BUFFER,
    };
    let Admitted {
        mut permit,
        deadline,
    } = admitted;
    let Some(Established {
        mut live,
        link_rx,
        mut flow,
        keep_alive,
    }) = handshake(&mut conn, peer, tls, deadline, shared, hooks, &mut shutdown).await
    else {
        return;
    };
    // The socket keeps its place in the budget (`permit` lives until the session ends).
    permit.authenticated();
    live.local_reason = run(
        &mut conn,
        link_rx,
        &live,
        &mut flow,
        &mut shutdown,
        keep_alive,
    )
    .await;
}

/// What a completed handshake hands to the session loop.
struct Established<H: DeviceHooks> {
    live: Live<H>,
    link_rx: LinkRx,
    flow: Flow,
    keep_alive: Option<Duration>,
}

/// Reads and checks the CONNECT, takes over a previous session of the device, registers the
/// router link and writes the CONNACK. `None`: refused or ended (already answered).
///
/// Its own function so that nothing of the handshake stays in the connection's task while the
/// session runs: in one function, the CONNECT packet's unused parts, the login and the
/// authentication result were kept in the task's state for the connection's lifetime, next
/// to the session loop's.
async fn handshake<S, H>(
    conn: &mut Conn<S>,
    peer: SocketAddr,
    tls: bool,
    deadline: Instant,
    shared: Arc<Shared>,
    hooks: Arc<H>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Established<H>>
where
    S: Socket,
    H: DeviceHooks,
{
    let first = tokio::select! {
        r = tokio::time::timeout_at(deadline, conn.read_frame()) => r,
        _ = super::stopping(shutdown) => return None,
    };
    let first = match first {
        Err(_elapsed) => {
            refuse_silently(&shared, peer, "timeout");
            return None;
        }
        // Closed before sending anything complete.
        Ok(Err(ReadError::Io)) => return None,
        Ok(Err(ReadError::Protocol(e))) => Err(e),
        Ok(Ok(frame)) => Ok(frame),
    };
    let freshness = Freshness {
        window: shared.config.connect_timestamp_window,
        now_ms: u64::try_from(now_ms()).unwrap_or(0),
    };
    let (connect, will, auth) = match open(first, &*hooks, freshness) {
        Opening::Accepted {
            connect,
            will,
            auth,
        } => (connect, will, auth),
        Opening::Refused(refusal) => {
            refuse(&shared, conn, peer, refusal).await;
            return None;
        }
        Opening::Dropped(reason) => {
            refuse_silently(&shared, peer, reason);
            return None;
        }
    };
    let device = auth.device;
    if shared.table.sessions.len() >= shared.config.max_connections
        && !shared.table.sessions.contains_key(&device)
    {
        refuse(&shared, conn, peer, Refusal::Limit).await;
        return None;
    }
    let will = will.and_then(|w| {
        let own = own_will(&device, w);
        if own.is_none() {
            shared
                .metrics
                .acl_denied
                .get_or_create(&[("kind", "will")])
                .inc();
        }
        own
    });

    let conn_id = shared.config.epochs.next();
    tracing::Span::current().record("conn", conn_id).record(
        "device",
        format!("{}/{}", device.product_key, device.device_name),
    );
    let handle = Arc::new(SessionHandle::new(conn_id, connect.clean_session));
    let session = Session {
        device: device.clone(),
        conn_id,
        client_id: connect.client_id.clone(),
        client_addr: peer,
        tls,
        connected_at_ms: now_ms(),
    };
    let live = Live {
        handle: Arc::clone(&handle),
        shared: Arc::clone(&shared),
        hooks: Arc::clone(&hooks),
        session,
        will,
        local_reason: DisconnectReason::ConnectionLost,
    };

    if let Some(previous) = shared
        .table
        .sessions
        .insert(device.clone(), Arc::clone(&handle))
    {
        previous.retire(DisconnectReason::TakenOver);
        // Its link must be settled (live-then-disconnected, or never registered) before ours is
        // registered: otherwise the router would drop it on its own and reuse its id.
        previous.wait_phase(Phase::Settled).await;
        let _ = tokio::time::timeout(TAKEOVER_WAIT, previous.wait_phase(Phase::Done)).await;
    }
    // Deleted or disabled since `authenticate`? The gateway deletes a device in the registry
    // first and then ends its session through the session table; this session is in the table
    // now, so either that found it (and retired it: its link is refused below) or this finds
    // the device's new state. Without it, a CONNECT racing with a delete could register a
    // persistent session after `Downlink::forget_session` and leave it to a device created
    // again under the same name.
    match hooks.credentials(&device.product_key, &device.device_name) {
        Some(creds) if creds.enabled => {}
        gone => {
            let refusal = match gone {
                Some(_) => Refusal::DisabledDevice,
                None => Refusal::UnknownDevice,
            };
            refuse(&shared, conn, peer, refusal).await;
            return None;
        }
    }

    let built = shared
        .router
        .register(auth.router_client_id, connect.clean_session)
        .await;
    let (link_rx, session_present) = match built {
        Ok((link_tx, link_rx, ack)) => {
            if !handle.install(link_tx) {
                // Replaced or kicked while registering: end without ever having been online.
                return None;
            }
            let present = match Option::<Packet>::from(ack) {
                Some(Packet::ConnAck(ack, _)) => ack.session_present,
                _ => false,
            };
            (link_rx, present)
        }
        Err(e) => {
            tracing::warn!(error = %e, "router refused the link");
            handle.link_failed();
            refuse(&shared, conn, peer, Refusal::Limit).await;
            return None;
        }
    };

    handle.set_online();
    shared.metrics.connects.inc();
    hooks.on_connect(&live.session);
    tracing::debug!(session_present, clean = connect.clean_session, "connected");
    let connack = Packet::ConnAck(
        ConnAck {
            session_present,
            code: ConnectReturnCode::Success,
        },
        None,
    );
    if conn.queue(connack).is_err() || conn.flush().await.is_err() {
        return None;
    }

    let mut flow = Flow::default();
    if auth.auto_subscribe {
        // `_ss=1`: the vendor SDKs rely on the server subscribing them to their system topics.
        // Packet id 0 never comes from a client, so its SUBACK is recognised and swallowed.
        let filter = |path: String, qos: QoS| Filter {
            path,
            qos,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::Never,
        };
        let subscribe = Subscribe {
            pkid: AUTO_SUBSCRIBE_PKID,
            filters: auto_subscribe_filters(&device)
                .into_iter()
                .map(|(path, qos)| filter(path, qos))
                .collect(),
        };
        let paths = subscribe.filters.iter().map(|f| f.path.clone()).collect();
        flow.pending_subacks.push_back(PendingSubAck {
            pkid: AUTO_SUBSCRIBE_PKID,
            allowed: vec![true; subscribe.filters.len()],
            paths,
        });
        shared.router.wait_capacity().await;
        if !live.handle.send(vec![Packet::Subscribe(subscribe, None)]) {
            return None;
        }
    }

    let keep_alive = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    Some(Established {
        live,
        link_rx,
        flow,
        keep_alive,
    })
}

/// What a connection's first packet decides, before any shared state is touched.
pub(crate) enum Opening {
    /// A 3.1.1 CONNECT whose credentials prove an enabled device.
    Accepted {
        connect: Connect,
        will: Option<LastWill>,
        auth: Authenticated,
    },
    /// Answered with a CONNACK carrying the refusal's return code.
    Refused(Refusal),
    /// Closed without an answer, counted in `connects_refused` under this reason.
    Dropped(&'static str),
}

/// The verdict on the first frame a connection delivered (or the protocol error reading it).
/// Pure apart from [`DeviceHooks::credentials`], so the fuzz targets run exactly this.
pub(crate) fn open<H: DeviceHooks + ?Sized>(
    first: Result<Frame, protocol::Error>,
    hooks: &H,
    freshness: Freshness,
) -> Opening {
    let packet = match first {
        Ok(Frame::Other(packet)) => *packet,
        Err(protocol::Error::InvalidProtocolLevel(_) | protocol::Error::InvalidProtocol) => {
            // MQTT 5 or 3.1: the 3.1.1 way to say "not this version" (a v5 client reads it too).
            return Opening::Refused(Refusal::Protocol);
        }
        // Garbage or a PUBLISH before CONNECT.
        Err(_) | Ok(Frame::Publish(_)) => return Opening::Dropped("protocol"),
    };
    let Packet::Connect(connect, _, will, _, login) = packet else {
        return Opening::Dropped("protocol");
    };
    match authenticate(&connect.client_id, login.as_ref(), hooks, freshness) {
        Ok(auth) => Opening::Accepted {
            connect,
            will,
            auth,
        },
        Err(refusal) => Opening::Refused(refusal),
    }
}

/// The last will the gateway publishes on an unclean end: `None` unless its topic belongs to
/// the device. The router never sees the will (its will handling is private to rumqttd's own
/// server).
pub(crate) fn own_will(device: &DeviceKey, will: LastWill) -> Option<(String, Bytes)> {
    match std::str::from_utf8(&will.topic) {
        Ok(topic) if acl::topic_allowed(&device.product_key, &device.device_name, topic) => {
            Some((topic.to_owned(), will.message))
        }
        _ => None,
    }
}

/// The established session's loop. Returns why it ended (from this side).
///
/// The futures that wait for something other than the socket (a retire, broker shutdown, the
/// router link, direct deliveries, the keep-alive deadline) live across turns of the loop and
/// are only made anew once they fired. Made per turn, i.e. per socket read, they registered and
/// dropped two `Notify` waiters, a channel waiter and a timer entry each time: ~5% of the
/// gateway's CPU in the 1,000-device ingest.
async fn run<S, H>(
    conn: &mut Conn<S>,
    link_rx: LinkRx,
    live: &Live<H>,
    flow: &mut Flow,
    shutdown: &mut watch::Receiver<bool>,
    keep_alive: Option<Duration>,
) -> DisconnectReason
where
    S: Socket,
    H: DeviceHooks,
{
    let mut last_read = Instant::now();
    // Never polled without a keep-alive (the branch is disabled); the deadline moves forward
    // lazily: when it fires, the session expires only if nothing was read since.
    let period = keep_alive.unwrap_or(Duration::from_secs(3600));
    let keep_alive_timer = tokio::time::sleep_until(last_read + period);
    let stopped = live.handle.stopped();
    let stopping = super::stopping(shutdown);
    let direct_ready = live.handle.direct_ready();
    let link_next = next_notification(link_rx);
    tokio::pin!(keep_alive_timer, stopped, stopping, direct_ready, link_next);
    loop {
        // Unbiased on purpose (like rumqttd's RemoteLink): a chatty socket must not starve
        // downstream delivery, nor the other way round.
        tokio::select! {
            _ = &mut stopped => return live.handle.reason().unwrap_or(DisconnectReason::Kicked),
            _ = &mut stopping => return DisconnectReason::Kicked,
            read = conn.fill() => match read {
                Ok(0) | Err(_) => return DisconnectReason::ConnectionLost,
                Ok(_) => {
                    last_read = Instant::now();
                    // The two handlers are boxed: ~1.1 KB each, they would otherwise be part
                    // of every connection's task for its lifetime, idle or not (one allocation
                    // per read or per notification batch, each costing syscalls anyway).
                    if let Err(reason) = Box::pin(on_socket_data(conn, live, flow)).await {
                        return reason;
                    }
                }
            },
            (mut link_rx, notification) = &mut link_next => match notification {
                Ok(first) => {
                    let handled =
                        Box::pin(on_notifications(first, conn, &mut link_rx, live, flow)).await;
                    if let Err(reason) = handled {
                        return reason;
                    }
                    link_next.set(next_notification(link_rx));
                }
                Err(_) => {
                    // The router dropped the link by itself: its id may already be reused.
                    live.handle.forget_link(DisconnectReason::ConnectionLost);
                    return DisconnectReason::ConnectionLost;
                }
            },
            _ = &mut direct_ready => {
                direct_ready.set(live.handle.direct_ready());
                let written = match write_direct(conn, &live.handle, flow) {
                    Ok(written) => written,
                    Err(reason) => return reason,
                };
                if written && conn.flush().await.is_err() {
                    return DisconnectReason::ConnectionLost;
                }
            }
            _ = &mut keep_alive_timer, if keep_alive.is_some() => {
                let deadline = last_read + period;
                if deadline <= Instant::now() {
                    tracing::debug!("keep-alive expired");
                    return DisconnectReason::ConnectionLost;
                }
                keep_alive_timer.as_mut().reset(deadline);
            }
        }
    }
}

/// [`LinkRx::next`] on an owned receiver, handed back with the result: the future can then
/// outlive one turn of [`run`]'s loop, and the receiver is free for [`on_notifications`] once
/// it completed.
async fn next_notification(
    mut link_rx: LinkRx,
) -> (
    LinkRx,
    Result<Option<Notification>, rumqttd::local::LinkError>,
) {
    let next = link_rx.next().await;
    (link_rx, next)
}

/// Packet id of the server-side subscription made for `_ss=1` clients (never a client's: MQTT
/// packet ids are non-zero).
const AUTO_SUBSCRIBE_PKID: u16 = 0;

/// The filters the gateway subscribes an `_ss=1` device to, as the vendor's broker does. Three
/// per device, always the same: they do not count against the device's subscription budget.
fn auto_subscribe_filters(device: &DeviceKey) -> [(String, QoS); 3] {
    let (pk, dn) = (&device.product_key, &device.device_name);
    [
        (format!("/sys/{pk}/{dn}/#"), QoS::AtMostOnce),
        (format!("/ota/device/upgrade/{pk}/{dn}"), QoS::AtLeastOnce),
        (format!("/ext/rrpc/+/sys/{pk}/{dn}/#"), QoS::AtMostOnce),
    ]
}

/// Per-connection protocol bookkeeping.
#[derive(Default)]
struct Flow {
    /// Downstream QoS 1/2 PUBLISHes written to the device, awaiting PUBACK/PUBREC, in order
    /// (rumqttd only accepts in-order acks and drops the link otherwise).
    awaiting_ack: VecDeque<(u16, u8)>,
    /// PUBRELs written to the device, awaiting PUBCOMP, in order.
    awaiting_comp: VecDeque<u16>,
    /// Upstream QoS 2 packet ids processed and PUBREC'd, until their PUBREL.
    incoming_qos2: HashSet<u16>,
    /// SUBSCRIBEs forwarded to the router, until their SUBACK.
    pending_subacks: VecDeque<PendingSubAck>,
    /// Direct QoS 0 messages taken from the session's queue, being written.
    direct: Vec<DirectMessage>,
}

/// A SUBSCRIBE forwarded to the router.
struct PendingSubAck {
    pkid: u16,
    /// Which of the device's filters passed the ACL (only those were forwarded).
    allowed: Vec<bool>,
    /// The forwarded filters, in order: the router's return codes are for these.
    paths: Vec<String>,
}

/// Most rounds of [`on_socket_data`] whose acks share one socket write.
const COALESCE_ROUNDS: usize = 4;
/// Sessions handling socket data at once from which on the gateway counts as saturated, and
/// [`on_socket_data`] coalesces.
const COALESCE_BUSY_SESSIONS: usize = 256;

/// Handles what the socket has to say, then writes the answers. `Err` ends the session.
///
/// When the gateway is saturated (at least [`COALESCE_BUSY_SESSIONS`] sessions handling data
/// at once), the answers go out once the socket has nothing more ready: data that arrived
/// while a round was processed (a device with reports in flight sends more as acks reach it,
/// and a durable round waits for a store commit) is handled first, so its acks share the
/// write. One `sendto` per round was a third of the ingest path's CPU, and a saturated
/// gateway's acks wait in its run queue anyway. Short of that, acks go out after each round: a
/// device that pipelines deeply against an idle gateway would otherwise be throttled to one
/// window per commit (−25% for 100 flooding devices). At most [`COALESCE_ROUNDS`] rounds, so a
/// device that never pauses still gets its acks; checking the socket costs nothing when tokio
/// already knows it is drained.
async fn on_socket_data<S, H>(
    conn: &mut Conn<S>,
    live: &Live<H>,
    flow: &mut Flow,
) -> Result<(), DisconnectReason>
where
    S: Socket,
    H: DeviceHooks,
{
    let busy = Busy::enter(&live.shared.busy_sessions);
    let mut outcome = on_buffered(conn, live, flow).await;
    let rounds = if busy.sessions >= COALESCE_BUSY_SESSIONS {
        COALESCE_ROUNDS
    } else {
        1
    };
    for _ in 1..rounds {
        if outcome.is_err() {
            break;
        }
        match conn.fill().now_or_never() {
            Some(Ok(n)) if n > 0 => outcome = on_buffered(conn, live, flow).await,
            // Nothing ready, or an end the session loop's next read reports again.
            _ => break,
        }
    }
    drop(busy);
    // What was handled before an error or a DISCONNECT still gets its acks.
    if conn.flush().await.is_err() {
        return Err(DisconnectReason::ConnectionLost);
    }
    outcome
}

/// One session counted in [`Shared::busy_sessions`] while alive (also when its task is dropped
/// mid-way).
struct Busy<'a> {
    counter: &'a std::sync::atomic::AtomicUsize,
    /// Sessions handling data, this one included, when it entered.
    sessions: usize,
}

impl<'a> Busy<'a> {
    fn enter(counter: &'a std::sync::atomic::AtomicUsize) -> Self {
        let sessions = counter.fetch_add(1, Ordering::Relaxed) + 1;
        Busy { counter, sessions }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Handles every complete packet in the read buffer, queueing the answers. `Err` ends the
/// session.
async fn on_buffered<S, H>(
    conn: &mut Conn<S>,
    live: &Live<H>,
    flow: &mut Flow,
) -> Result<(), DisconnectReason>
where
    S: Socket,
    H: DeviceHooks,
{
    let mut to_link = Vec::new();
    let mut outcome = Ok(());
    let mut pipeline: Vec<UpPublish> = Vec::new();
    loop {
        let frame = match codec::next_frame(&mut conn.rbuf, conn.max_packet) {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "malformed packet");
                violation::from_parse_error(&e).emit(&live.shared.metrics);
                outcome = Err(DisconnectReason::ConnectionLost);
                break;
            }
        };
        let frame = match frame {
            Frame::Publish(publish) if publish.qos < 2 && pipeline.len() < PIPELINE_MAX => {
                pipeline.push(publish);
                continue;
            }
            other => other,
        };
        // Anything else keeps its place in the stream: the PUBLISHes before it are done first.
        if let Err(reason) = on_publishes(&mut pipeline, conn, live, flow).await {
            outcome = Err(reason);
            break;
        }
        if let Err(reason) = on_frame(frame, conn, live, flow, &mut to_link).await {
            outcome = Err(reason);
            break;
        }
        // A (UN)SUBSCRIBE reaches the router before anything the following packets cause: a
        // device that subscribes to its reply topic and posts in the same write must find its
        // subscription in place when the reply (published through the gateway link, another
        // sender on the router's channel) arrives.
        if matches!(
            to_link.last(),
            Some(Packet::Subscribe(..) | Packet::Unsubscribe(..))
        ) {
            live.shared.router.wait_capacity().await;
            if !live.handle.send(std::mem::take(&mut to_link)) {
                return Err(DisconnectReason::ConnectionLost);
            }
        }
        // Replies to what this packet asked for were just queued for this very task: write them
        // now, so a long read of requests cannot fill the session's direct queue.
        if let Err(reason) = write_direct(conn, &live.handle, flow) {
            outcome = Err(reason);
            break;
        }
    }
    // What was read before an error still gets processed and acknowledged.
    if let Err(reason) = on_publishes(&mut pipeline, conn, live, flow).await {
        outcome = outcome.and(Err(reason));
    }
    // What was handled before an error or a DISCONNECT still gets its acks.
    if !to_link.is_empty() {
        live.shared.router.wait_capacity().await;
        if !live.handle.send(to_link) {
            return Err(DisconnectReason::ConnectionLost);
        }
    }
    outcome
}

async fn on_frame<S, H>(
    frame: Frame,
    conn: &mut Conn<S>,
    live: &Live<H>,
    flow: &mut Flow,
    to_link: &mut Vec<Packet>,
) -> Result<(), DisconnectReason>
where
    S: Socket,
    H: DeviceHooks,
{
    let lost = |_| DisconnectReason::ConnectionLost;
    let device = &live.session.device;
    let packet = match frame {
        Frame::Publish(publish) => return on_publish(publish, conn, live, flow).await,
        Frame::Other(packet) => *packet,
    };
    match packet {
        Packet::PubRel(rel, _) => {
            flow.incoming_qos2.remove(&rel.pkid);
            let comp = PubComp {
                pkid: rel.pkid,
                reason: PubCompReason::Success,
            };
            conn.queue(Packet::PubComp(comp, None)).map_err(lost)
        }
        Packet::Subscribe(subscribe, _) => {
            // (A SUBSCRIBE without filters does not even parse: `Violation::EmptySubscribe`.)
            let checked = subscribe
                .filters
                .iter()
                .try_for_each(|f| violation::topic_filter(&f.path));
            if let Err(violation) = checked {
                violation.emit(&live.shared.metrics);
                return Err(DisconnectReason::ConnectionLost);
            }
            let allowed = subscription_allowed(live, &subscribe.filters);
            let denied = allowed.iter().filter(|ok| !**ok).count();
            if denied == allowed.len() {
                let suback = SubAck {
                    pkid: subscribe.pkid,
                    return_codes: vec![SubscribeReasonCode::Failure; denied],
                };
                return conn.queue(Packet::SubAck(suback, None)).map_err(lost);
            }
            let filters: Vec<Filter> = subscribe
                .filters
                .into_iter()
                .zip(&allowed)
                .filter_map(|(f, ok)| ok.then_some(f))
                .collect();
            let paths = filters.iter().map(|f| f.path.clone()).collect();
            to_link.push(Packet::Subscribe(
                Subscribe {
                    pkid: subscribe.pkid,
                    filters,
                },
                None,
            ));
            flow.pending_subacks.push_back(PendingSubAck {
                pkid: subscribe.pkid,
                allowed,
                paths,
            });
            Ok(())
        }
        Packet::Unsubscribe(unsubscribe, _) => {
            let checked = match unsubscribe.filters.is_empty() {
                true => Err(Violation::EmptyUnsubscribe),
                false => unsubscribe
                    .filters
                    .iter()
                    .try_for_each(|f| violation::topic_filter(f)),
            };
            if let Err(violation) = checked {
                violation.emit(&live.shared.metrics);
                return Err(DisconnectReason::ConnectionLost);
            }
            // Filters the device could not have subscribed are skipped. rumqttd sends no UNSUBACK
            // for a filter that was not subscribed, so we always answer ourselves (and drop the
            // router's UNSUBACKs).
            let owned: Vec<String> = unsubscribe
                .filters
                .into_iter()
                .filter(|f| acl::filter_allowed(&device.product_key, &device.device_name, f))
                .collect();
            // Direct deliveries stop now; the router forgets the subscription right after.
            for filter in &owned {
                live.handle.revoke(filter);
            }
            if !owned.is_empty() {
                to_link.push(Packet::Unsubscribe(
                    Unsubscribe {
                        pkid: unsubscribe.pkid,
                        filters: owned,
                    },
                    None,
                ));
            }
            let unsuback = UnsubAck {
                pkid: unsubscribe.pkid,
                reasons: vec![],
            };
            conn.queue(Packet::UnsubAck(unsuback, None)).map_err(lost)
        }
        Packet::PingReq(_) => conn.queue(Packet::PingResp(PingResp)).map_err(lost),
        Packet::PubAck(ack, _) => ack_downstream(&mut flow.awaiting_ack, ack.pkid, 1, || {
            to_link.push(Packet::PubAck(ack, None))
        }),
        Packet::PubRec(rec, _) => ack_downstream(&mut flow.awaiting_ack, rec.pkid, 2, || {
            to_link.push(Packet::PubRec(rec, None))
        }),
        Packet::PubComp(comp, _) => {
            match flow.awaiting_comp.iter().position(|id| *id == comp.pkid) {
                Some(0) => {
                    flow.awaiting_comp.pop_front();
                    to_link.push(Packet::PubComp(comp, None));
                    Ok(())
                }
                Some(_) => Err(DisconnectReason::ConnectionLost),
                None => Ok(()),
            }
        }
        Packet::Disconnect(..) => Err(DisconnectReason::ClientDisconnect),
        other => {
            tracing::debug!(packet = ?other, "unexpected packet");
            Err(DisconnectReason::ConnectionLost)
        }
    }
}

/// A device's PUBACK (QoS 1) or PUBREC (QoS 2) for a downstream message. rumqttd drops a link
/// on an unsolicited or out-of-order ack, and then reuses its id: so only the expected next ack
/// is forwarded, a duplicate (not awaited at all) is ignored, and an out-of-order one ends the
/// connection here, cleanly.
fn ack_downstream(
    awaiting: &mut VecDeque<(u16, u8)>,
    pkid: u16,
    qos: u8,
    forward: impl FnOnce(),
) -> Result<(), DisconnectReason> {
    match awaiting.iter().position(|(id, _)| *id == pkid) {
        Some(0) if awaiting.front().is_some_and(|(_, q)| *q == qos) => {
            awaiting.pop_front();
            forward();
            Ok(())
        }
        Some(_) => {
            tracing::debug!(pkid, "out-of-order or mismatched ack");
            Err(DisconnectReason::ConnectionLost)
        }
        None => Ok(()),
    }
}

/// Which of a SUBSCRIBE's filters the device may have: its own (the ACL) and within its budget of
/// distinct filters ([`super::filters`]). Refusals are counted and logged.
fn subscription_allowed<H: DeviceHooks>(live: &Live<H>, filters: &[Filter]) -> Vec<bool> {
    let device = &live.session.device;
    let metrics = &live.shared.metrics;
    let auto = auto_subscribe_filters(device);
    let (mut foreign, mut over_budget) = (0u64, 0u64);
    let allowed = filters
        .iter()
        .map(|f| {
            if !acl::filter_allowed(&device.product_key, &device.device_name, &f.path) {
                foreign += 1;
                return false;
            }
            if auto.iter().any(|(path, _)| *path == f.path)
                || live.shared.filters.admit(device, &f.path)
            {
                return true;
            }
            over_budget += 1;
            false
        })
        .collect();
    if foreign > 0 {
        metrics
            .acl_denied
            .get_or_create(&[("kind", "subscribe")])
            .inc_by(foreign);
        tracing::debug!(denied = foreign, "subscription refused by ACL");
    }
    if over_budget > 0 {
        metrics.subscriptions_refused.inc_by(over_budget);
        tracing::debug!(
            refused = over_budget,
            max = live.shared.config.max_subscriptions_per_device,
            "subscription refused: the device's filter limit is reached"
        );
    }
    allowed
}

/// Whether the session's device may publish on `topic`; a refusal is counted and logged.
fn publish_allowed<H: DeviceHooks>(live: &Live<H>, topic: &str) -> bool {
    let device = &live.session.device;
    let allowed = acl::topic_allowed(&device.product_key, &device.device_name, topic);
    if !allowed {
        live.shared
            .metrics
            .acl_denied
            .get_or_create(&[("kind", "publish")])
            .inc();
        tracing::debug!(topic, "publish refused by ACL");
    }
    allowed
}

/// An upstream PUBLISH: ACL, `on_publish`, then our own ack ("acknowledged means processed").
/// A publish on a topic the device does not own is dropped and counted, and still acked like the
/// vendor broker does (a silent drop; closing would only make the device reconnect and retry).
/// One the hooks withhold ends the session without its ack ([`withhold`]).
async fn on_publish<S, H>(
    publish: UpPublish,
    conn: &mut Conn<S>,
    live: &Live<H>,
    flow: &mut Flow,
) -> Result<(), DisconnectReason>
where
    S: Socket,
    H: DeviceHooks,
{
    let lost = |_| DisconnectReason::ConnectionLost;
    let topic = match violation::topic_name(&publish.topic) {
        Ok(topic) => topic,
        Err(violation) => {
            violation.emit(&live.shared.metrics);
            return Err(DisconnectReason::ConnectionLost);
        }
    };
    // A QoS 2 retransmission (same id before its PUBREL) is acknowledged, not processed again.
    let duplicate = publish.qos == 2 && flow.incoming_qos2.contains(&publish.pkid);
    if !duplicate && publish_allowed(live, topic) {
        let message = up_message(topic, &publish);
        let outcome = live.hooks.on_publish(&live.session, message).await;
        if outcome == PublishOutcome::Withheld && publish.qos > 0 {
            return Err(withhold(live, 1));
        }
    }
    match publish.qos {
        1 => {
            let ack = PubAck {
                pkid: publish.pkid,
                reason: PubAckReason::Success,
            };
            conn.queue(Packet::PubAck(ack, None)).map_err(lost)
        }
        2 => {
            flow.incoming_qos2.insert(publish.pkid);
            let rec = PubRec {
                pkid: publish.pkid,
                reason: PubRecReason::Success,
            };
            conn.queue(Packet::PubRec(rec, None)).map_err(lost)
        }
        _ => Ok(()),
    }
}

fn up_message<'a>(topic: &'a str, publish: &UpPublish) -> UpMessage<'a> {
    UpMessage {
        topic,
        payload: publish.payload.clone(),
        // The codec refuses any other value.
        qos: protocol::qos(publish.qos).unwrap_or(QoS::AtMostOnce),
    }
}

/// Ends the session without acknowledging `unacked` QoS 1/2 PUBLISHes the hooks could not take
/// (or that came after one): MQTT 3.1.1 has no negative ack, and a device resends what was
/// not acknowledged when it reconnects.
fn withhold<H: DeviceHooks>(live: &Live<H>, unacked: u64) -> DisconnectReason {
    live.shared.metrics.publishes_withheld.inc_by(unacked);
    tracing::debug!(
        unacked,
        "PUBLISH not taken: closing without acknowledging it"
    );
    DisconnectReason::Withheld
}

/// Most QoS 0/1 PUBLISHes of one socket read handled together by [`on_publishes`].
const PIPELINE_MAX: usize = 32;

/// Handles consecutive QoS 0/1 PUBLISHes of one read together, then acknowledges them in order.
///
/// The run goes to the hooks at once ([`DeviceHooks::on_publishes`]: ingest writes its version
/// reports with one store submission), so a device with ten reports in flight has them
/// committed in one store transaction instead of ten consecutive ones; the PUBACKs still go
/// out only after the whole run was processed, in packet order. QoS 2 (duplicate detection)
/// and every other packet take the one-at-a-time path, after the run before them.
///
/// A QoS 1 message the hooks withhold ends the session: the messages before it are
/// acknowledged, it and every QoS 1 message after it are not (MQTT wants PUBACKs in order).
async fn on_publishes<S, H>(
    pipeline: &mut Vec<UpPublish>,
    conn: &mut Conn<S>,
    live: &Live<H>,
    flow: &mut Flow,
) -> Result<(), DisconnectReason>
where
    S: Socket,
    H: DeviceHooks,
{
    if pipeline.is_empty() {
        return Ok(());
    }
    // A PUBLISH that breaks the protocol closes the connection; those before it are still
    // processed and acknowledged, those after it are not (the client resends them).
    let broken = pipeline.iter().enumerate().find_map(|(i, publish)| {
        violation::topic_name(&publish.topic)
            .err()
            .map(|violation| (i, violation))
    });
    if let Some((i, _)) = broken {
        pipeline.truncate(i);
    }
    let mut allowed = Vec::with_capacity(pipeline.len());
    // Per message of the pipeline: its index in `allowed`, when it passed the ACL.
    let mut run_index = Vec::with_capacity(pipeline.len());
    for publish in pipeline.iter() {
        // Every topic left passed the check above.
        let Ok(topic) = violation::topic_name(&publish.topic) else {
            continue;
        };
        if publish_allowed(live, topic) {
            run_index.push(Some(allowed.len()));
            allowed.push(up_message(topic, publish));
        } else {
            run_index.push(None);
        }
    }
    let outcome = if allowed.is_empty() {
        RunOutcome::processed()
    } else {
        // Boxed: the hooks' future would otherwise sit in every connection's task for good.
        Box::pin(live.hooks.on_publishes(&live.session, &allowed)).await
    };
    drop(allowed);
    let mut acked = Ok(());
    for (i, publish) in pipeline.iter().enumerate() {
        if publish.qos != 1 {
            continue;
        }
        if run_index[i].is_some_and(|at| outcome.get(at) == PublishOutcome::Withheld) {
            let unacked = pipeline[i..].iter().filter(|p| p.qos == 1).count() as u64;
            acked = Err(withhold(live, unacked));
            break;
        }
        let ack = PubAck {
            pkid: publish.pkid,
            reason: PubAckReason::Success,
        };
        if conn.queue(Packet::PubAck(ack, None)).is_err() {
            acked = Err(DisconnectReason::ConnectionLost);
            break;
        }
    }
    // Handled either way: never handed to the hooks again.
    pipeline.clear();
    acked?;
    // The replies to this run were just queued for this very task (at most one per PUBLISH,
    // and a run is shorter than the session's direct queue): write them now.
    write_direct(conn, &live.handle, flow)?;
    match broken {
        Some((_, violation)) => {
            violation.emit(&live.shared.metrics);
            Err(DisconnectReason::ConnectionLost)
        }
        None => Ok(()),
    }
}

/// Writes a batch of router notifications to the device.
async fn on_notifications<S, H>(
    first: Option<Notification>,
    conn: &mut Conn<S>,
    link_rx: &mut LinkRx,
    live: &Live<H>,
    flow: &mut Flow,
) -> Result<(), DisconnectReason>
where
    S: Socket,
    H: DeviceHooks,
{
    let mut batch: Vec<Notification> = first.into_iter().collect();
    while batch.len() < NOTIFICATION_BATCH {
        match link_rx.next().now_or_never() {
            Some(Ok(Some(n))) => batch.push(n),
            // Nothing ready, or an error the next `next()` will report again.
            _ => break,
        }
    }
    let lost = |_| DisconnectReason::ConnectionLost;
    let mut unscheduled = false;
    for notification in batch {
        let packet = match notification {
            Notification::Unschedule => {
                unscheduled = true;
                continue;
            }
            Notification::Disconnect(..) => {
                // The router is dropping this link (it then reuses the id): do not answer it.
                live.handle.forget_link(DisconnectReason::ConnectionLost);
                return Err(DisconnectReason::ConnectionLost);
            }
            other => Option::<Packet>::from(other),
        };
        match packet {
            Some(Packet::Publish(publish, _)) => {
                let at = conn.wbuf.len();
                conn.queue(Packet::Publish(publish, None)).map_err(lost)?;
                if let Some((qos @ 1..=2, pkid)) = codec::publish_meta(&conn.wbuf[at..]) {
                    flow.awaiting_ack.push_back((pkid, qos));
                }
            }
            Some(Packet::PubRel(rel, _)) => {
                flow.awaiting_comp.push_back(rel.pkid);
                conn.queue(Packet::PubRel(rel, None)).map_err(lost)?;
            }
            Some(Packet::SubAck(ack, _)) => {
                let pending = flow
                    .pending_subacks
                    .iter()
                    .position(|p| p.pkid == ack.pkid)
                    .and_then(|i| flow.pending_subacks.remove(i));
                let codes = match pending {
                    Some(pending) => {
                        record_grants(&live.handle, pending.paths, &ack.return_codes);
                        merge_suback(&pending.allowed, ack.return_codes)
                    }
                    None => ack.return_codes,
                };
                // The answer to our own `_ss=1` subscription is not the device's business.
                if ack.pkid != AUTO_SUBSCRIBE_PKID {
                    let suback = SubAck {
                        pkid: ack.pkid,
                        return_codes: codes,
                    };
                    conn.queue(Packet::SubAck(suback, None)).map_err(lost)?;
                }
            }
            // Answered by us already (UNSUBACK, PINGRESP) or not expected on a device link
            // (acks of upstream publishes, which never go to the router).
            Some(_) | None => {}
        }
    }
    if conn.flush().await.is_err() {
        return Err(DisconnectReason::ConnectionLost);
    }
    if unscheduled && link_rx.wake().await.is_err() {
        live.handle.forget_link(DisconnectReason::ConnectionLost);
        return Err(DisconnectReason::ConnectionLost);
    }
    Ok(())
}

/// Records the filters the router granted (a success code in their place) for direct delivery.
fn record_grants(handle: &SessionHandle, paths: Vec<String>, codes: &[SubscribeReasonCode]) {
    for (path, code) in paths.into_iter().zip(codes) {
        if matches!(
            code,
            SubscribeReasonCode::Success(_)
                | SubscribeReasonCode::QoS0
                | SubscribeReasonCode::QoS1
                | SubscribeReasonCode::QoS2
        ) {
            handle.grant(path);
        }
    }
}

/// Writes the session's queued direct messages as QoS 0 PUBLISHes (not flushed). Returns whether
/// there were any.
fn write_direct<S: Socket>(
    conn: &mut Conn<S>,
    handle: &SessionHandle,
    flow: &mut Flow,
) -> Result<bool, DisconnectReason> {
    handle.take_direct(&mut flow.direct);
    let written = !flow.direct.is_empty();
    for message in flow.direct.drain(..) {
        let publish = Publish::new(message.topic, message.payload, false);
        conn.queue(Packet::Publish(publish, None))
            .map_err(|_| DisconnectReason::ConnectionLost)?;
    }
    Ok(written)
}

/// The device's SUBACK: the router's codes for the filters that passed the ACL, in their places,
/// and failure (0x80) for the others.
fn merge_suback(
    allowed: &[bool],
    router_codes: Vec<SubscribeReasonCode>,
) -> Vec<SubscribeReasonCode> {
    let mut router_codes = router_codes.into_iter();
    allowed
        .iter()
        .map(|ok| match ok {
            true => router_codes.next().unwrap_or(SubscribeReasonCode::Failure),
            false => SubscribeReasonCode::Failure,
        })
        .collect()
}

/// Answers a refused CONNECT with its return code, counts it, logs it (rate-limited), closes.
async fn refuse<S: Socket>(
    shared: &Shared,
    conn: &mut Conn<S>,
    peer: SocketAddr,
    refusal: Refusal,
) {
    shared
        .metrics
        .connects_refused
        .get_or_create(&[("reason", refusal.reason())])
        .inc();
    shared.log_refusal(peer, refusal.reason());
    let ack = ConnAck {
        session_present: false,
        code: refusal.code(),
    };
    if conn.queue(Packet::ConnAck(ack, None)).is_ok() {
        // Best effort, bounded: a peer that does not read must not keep the task alive.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = conn.flush().await;
            let _ = conn.io.shutdown().await;
        })
        .await;
    }
}

/// Counts and logs (rate-limited) a connection dropped before a valid CONNECT.
fn refuse_silently(shared: &Shared, peer: SocketAddr, reason: &'static str) {
    shared
        .metrics
        .connects_refused
        .get_or_create(&[("reason", reason)])
        .inc();
    shared.log_refusal(peer, reason);
}

/// An authenticated session. Dropping it ends the session exactly once, whatever the path
/// (return, error, panic in a hook): link retired, table entry removed, `on_disconnect` called
/// if `on_connect` was, the will published on an unclean end.
struct Live<H: DeviceHooks> {
    handle: Arc<SessionHandle>,
    shared: Arc<Shared>,
    hooks: Arc<H>,
    session: Session,
    will: Option<(String, Bytes)>,
    /// Why the connection task ended, unless someone retired the session first.
    local_reason: DisconnectReason,
}

impl<H: DeviceHooks> Drop for Live<H> {
    fn drop(&mut self) {
        self.handle.retire(self.local_reason);
        let reason = self.handle.reason().unwrap_or(self.local_reason);
        let device: &DeviceKey = &self.session.device;
        let conn_id = self.session.conn_id;
        self.shared
            .table
            .sessions
            .remove_if(device, |_, h| h.conn_id == conn_id);
        if self.handle.is_online() {
            tracing::debug!(?reason, "disconnected");
            self.hooks.on_disconnect(&self.session, reason);
            if reason != DisconnectReason::ClientDisconnect {
                if let Some((topic, payload)) = self.will.take() {
                    if let Err(e) = self.shared.downlink.publish(topic, payload) {
                        tracing::warn!(error = %e, "last will not published");
                    }
                }
            }
        }
        self.handle.set_done();
    }
}

/// Runs `serve` inside a span carrying the connection's fields.
pub(crate) async fn serve_in_span<S, H>(
    io: S,
    peer: SocketAddr,
    tls: bool,
    admitted: Admitted,
    shared: Arc<Shared>,
    hooks: Arc<H>,
    shutdown: watch::Receiver<bool>,
) where
    S: Socket,
    H: DeviceHooks,
{
    let span = tracing::info_span!("mqtt", %peer, tls, conn = tracing::field::Empty, device = tracing::field::Empty);
    serve(io, peer, tls, admitted, shared, hooks, shutdown)
        .instrument(span)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::auth::UNCHECKED;

    /// A connection as `serve` sets one up, on `io`.
    fn test_conn<S>(io: S) -> Conn<S> {
        Conn {
            io,
            rbuf: BytesMut::with_capacity(READ_BUFFER),
            wbuf: BytesMut::new(),
            max_packet: 1 << 20,
            read_room: READ_BUFFER,
        }
    }

    #[tokio::test]
    async fn reads_grow_with_a_flood_and_shrink_back() {
        let (mut device, io) = tokio::io::duplex(64 * 1024);
        let mut conn = test_conn(io);
        // A 40 KB flood: each read that fills its room doubles the next one, up to READ_MAX.
        device.write_all(&[0u8; 40 * 1024]).await.unwrap();
        let mut reads = Vec::new();
        while conn.rbuf.len() < 40 * 1024 {
            reads.push(conn.fill().await.unwrap());
        }
        assert_eq!(reads[..5], [1024, 2048, 4096, 8192, 16384]);
        assert_eq!(conn.read_room, READ_MAX);
        // A payload taken out of the buffer keeps its part alive (as a PUBLISH's does): the
        // next read still gets the room it asks for.
        let _payload = conn.rbuf.split().freeze();
        // Small reads give the room back, down to the initial size, never below.
        for _ in 0..8 {
            device.write_all(&[0u8; 100]).await.unwrap();
            assert_eq!(conn.fill().await.unwrap(), 100);
            assert!(conn.rbuf.capacity() - conn.rbuf.len() >= READ_BUFFER - 100);
        }
        assert_eq!(conn.read_room, READ_BUFFER);
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_read_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut device = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (io, _) = listener.accept().await.unwrap();
        let mut conn = test_conn(Rewind::plain(io));
        device.write_all(b"0123").await.unwrap();
        assert_eq!(conn.fill().await.unwrap(), 4);
        // Consumed: with nothing more on the socket, the read waits without a buffer.
        conn.rbuf.clear();
        assert!(conn.fill().now_or_never().is_none());
        assert_eq!(conn.rbuf.capacity(), 0);
        // Data arrives: a buffer of the usual room is offered again.
        device.write_all(b"4567").await.unwrap();
        assert_eq!(conn.fill().await.unwrap(), 4);
        assert_eq!(&conn.rbuf[..], b"4567");
        assert!(conn.rbuf.capacity() >= READ_BUFFER);
        // A partial packet pending: the next read appends to it, whatever the socket says.
        conn.rbuf.truncate(2);
        assert!(conn.fill().now_or_never().is_none());
        assert_eq!(&conn.rbuf[..], b"45");
    }

    #[tokio::test]
    async fn bytes_read_past_a_proxy_header_come_first_without_waiting() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut device = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (io, _) = listener.accept().await.unwrap();
        // The socket has nothing to read: the read-ahead is served at once, then the socket.
        let mut conn = test_conn(Rewind::new(io, Bytes::from_static(b"01")));
        assert_eq!(conn.fill().now_or_never().unwrap().unwrap(), 2);
        assert_eq!(&conn.rbuf[..], b"01");
        assert!(!conn.io.has_buffered());
        conn.rbuf.clear();
        assert!(conn.fill().now_or_never().is_none());
        device.write_all(b"23").await.unwrap();
        assert_eq!(conn.fill().await.unwrap(), 2);
        assert_eq!(&conn.rbuf[..], b"23");
    }

    struct OneDevice;

    impl DeviceHooks for OneDevice {
        fn credentials(&self, pk: &str, dn: &str) -> Option<super::super::DeviceCredentials> {
            (pk == "pk1" && dn == "dev1").then(|| super::super::DeviceCredentials {
                device_secret: "s3cr3t".into(),
                enabled: true,
            })
        }
        fn on_connect(&self, _: &Session) {}
        fn on_disconnect(&self, _: &Session, _: DisconnectReason) {}
        async fn on_publish(&self, _: &Session, _: UpMessage<'_>) -> PublishOutcome {
            PublishOutcome::Processed
        }
    }

    #[test]
    fn first_packet_verdicts() {
        use fleetgate_topics::sign::{LinkCredentials, SignMethod};
        let creds = LinkCredentials::new("pk1", "dev1", "s3cr3t", SignMethod::HmacSha256, 3, None);
        let connect = |password: &str| {
            Ok(Frame::Other(Box::new(Packet::Connect(
                Connect {
                    keep_alive: 60,
                    client_id: creds.client_id.clone(),
                    clean_session: true,
                },
                None,
                None,
                None,
                Some(protocol::Login {
                    username: creds.username.clone(),
                    password: password.to_owned(),
                }),
            ))))
        };
        match open(connect(&creds.password), &OneDevice, UNCHECKED) {
            Opening::Accepted { auth, .. } => assert_eq!(auth.router_client_id, "pk1&dev1"),
            _ => panic!("a signed CONNECT is refused"),
        }
        assert!(matches!(
            open(connect("00"), &OneDevice, UNCHECKED),
            Opening::Refused(Refusal::BadSignature)
        ));
        assert!(matches!(
            open(
                Err(protocol::Error::InvalidProtocolLevel(5)),
                &OneDevice,
                UNCHECKED
            ),
            Opening::Refused(Refusal::Protocol)
        ));
        assert!(matches!(
            open(Err(protocol::Error::MalformedPacket), &OneDevice, UNCHECKED),
            Opening::Dropped("protocol")
        ));
        let ping = Ok(Frame::Other(Box::new(Packet::PingReq(protocol::PingReq))));
        assert!(matches!(
            open(ping, &OneDevice, UNCHECKED),
            Opening::Dropped("protocol")
        ));
        let publish = Ok(Frame::Publish(UpPublish {
            qos: 0,
            pkid: 0,
            topic: Bytes::from_static(b"/sys/pk1/dev1/thing/event/property/post"),
            payload: Bytes::new(),
        }));
        assert!(matches!(
            open(publish, &OneDevice, UNCHECKED),
            Opening::Dropped("protocol")
        ));
    }

    #[test]
    fn a_will_is_kept_only_on_the_devices_own_topics() {
        let device = DeviceKey {
            product_key: "pk1".into(),
            device_name: "dev1".into(),
        };
        let will = |topic: &'static str| LastWill {
            topic: Bytes::from_static(topic.as_bytes()),
            message: Bytes::from_static(b"bye"),
            qos: QoS::AtMostOnce,
            retain: false,
        };
        let own = "/sys/pk1/dev1/thing/event/property/post";
        assert_eq!(
            own_will(&device, will(own)),
            Some((own.to_owned(), Bytes::from_static(b"bye")))
        );
        assert_eq!(
            own_will(&device, will("/sys/pk1/dev2/thing/event/property/post")),
            None
        );
        assert_eq!(own_will(&device, will("/sys/pk1/dev1/#")), None);
    }

    #[test]
    fn suback_codes_keep_their_places() {
        let merged = merge_suback(
            &[true, false, true, false],
            vec![SubscribeReasonCode::QoS1, SubscribeReasonCode::QoS0],
        );
        assert_eq!(
            merged,
            vec![
                SubscribeReasonCode::QoS1,
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::QoS0,
                SubscribeReasonCode::Failure
            ]
        );
    }

    #[test]
    fn downstream_acks_in_order_only() {
        let mut awaiting: VecDeque<(u16, u8)> = [(1, 1), (2, 1), (3, 2)].into_iter().collect();
        let mut forwarded = 0;
        // Not awaited: a duplicate, ignored.
        assert!(ack_downstream(&mut awaiting, 9, 1, || forwarded += 1).is_ok());
        assert!(ack_downstream(&mut awaiting, 1, 1, || forwarded += 1).is_ok());
        assert_eq!(forwarded, 1);
        // Out of order: ends the connection.
        assert!(ack_downstream(&mut awaiting, 3, 2, || forwarded += 1).is_err());
        // Wrong kind (PUBREC for a QoS 1 message).
        assert!(ack_downstream(&mut awaiting, 2, 2, || forwarded += 1).is_err());
        assert!(ack_downstream(&mut awaiting, 2, 1, || forwarded += 1).is_ok());
        assert_eq!(forwarded, 2);
    }
}
