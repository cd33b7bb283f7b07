//! The CONNECT handshake: reading the first packet by its deadline, authenticating it,
//! taking over a previous session of the device, registering the router link, writing the
//! CONNACK, and answering or counting refusals.

use crate::broker::auth::{authenticate, Authenticated, Freshness, Refusal};
use crate::broker::codec::Frame;
use crate::broker::server::Shared;
use crate::broker::session::{Phase, SessionHandle};
use crate::broker::{acl, DeviceHooks, DeviceKey, DisconnectReason, Session};
use crate::clock::now_ms;
use bytes::Bytes;
use rumqttd::local::LinkRx;
use rumqttd::protocol::{
    self, ConnAck, Connect, ConnectReturnCode, Filter, LastWill, Packet, QoS, RetainForwardRule,
    Subscribe,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    auto_subscribe_filters, Conn, Established, Flow, Live, PendingSubAck, ReadError, Socket,
    AUTO_SUBSCRIBE_PKID,
};

/// How long a new session waits for the session it replaces to finish `on_disconnect`, so the
/// hooks see offline-then-online in that order. Past it the new session goes ahead anyway.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// Reads and checks the CONNECT, takes over a previous session of the device, registers the
/// router link and writes the CONNACK. `None`: refused or ended (already answered).
///
/// Its own function so that nothing of the handshake stays in the connection's task while the
/// session runs: in one function, the CONNECT packet's unused parts, the login and the
/// authentication result were kept in the task's state for the connection's lifetime, next
/// to the session loop's.
pub(super) async fn handshake<S, H>(
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
    let (connect, will, auth) =
        read_connect(conn, peer, deadline, &shared, &*hooks, shutdown).await?;
    let device = auth.device;
    if shared.table.sessions.len() >= shared.config.max_connections
        && !shared.table.sessions.contains_key(&device)
    {
        refuse(&shared, conn, peer, Refusal::Limit).await;
        return None;
    }
    let will = will.and_then(|w| will_checked(&shared, &device, w));

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
        clean_session: connect.clean_session,
    };
    let live = Live {
        handle: Arc::clone(&handle),
        shared: Arc::clone(&shared),
        hooks: Arc::clone(&hooks),
        session,
        will,
        local_reason: DisconnectReason::ConnectionLost,
    };

    take_over(&shared, &device, &handle).await;
    if let Some(refusal) = gone_meanwhile(&*hooks, &device) {
        refuse(&shared, conn, peer, refusal).await;
        return None;
    }
    let (link_rx, session_present) = register_link(
        conn,
        peer,
        &shared,
        &handle,
        auth.router_client_id,
        connect.clean_session,
    )
    .await?;

    handle.set_online();
    shared.metrics.connects.inc();
    hooks.on_connect(&live.session);
    tracing::debug!(session_present, clean = connect.clean_session, "connected");
    accept(conn, session_present).await?;

    let flow = if auth.auto_subscribe {
        auto_subscribe(&shared, &live, &device).await?
    } else {
        Flow::default()
    };

    let keep_alive = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    Some(Established {
        live,
        link_rx,
        flow,
        keep_alive,
    })
}

/// The first packet, read by `deadline`, and its verdict ([`open`]): the accepted CONNECT, its
/// will and the authenticated device. `None`: timed out, closed, refused (answered) or dropped
/// (counted), or the gateway is stopping.
async fn read_connect<S, H>(
    conn: &mut Conn<S>,
    peer: SocketAddr,
    deadline: Instant,
    shared: &Shared,
    hooks: &H,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(Connect, Option<LastWill>, Authenticated)>
where
    S: Socket,
    H: DeviceHooks,
{
    let first = tokio::select! {
        r = tokio::time::timeout_at(deadline, conn.read_frame()) => r,
        _ = crate::broker::stopping(shutdown) => return None,
    };
    let first = match first {
        Err(_elapsed) => {
            refuse_silently(shared, peer, "timeout");
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
    match open(first, hooks, freshness) {
        Opening::Accepted {
            connect,
            will,
            auth,
        } => Some((connect, will, auth)),
        Opening::Refused(refusal) => {
            refuse(shared, conn, peer, refusal).await;
            None
        }
        Opening::Dropped(reason) => {
            refuse_silently(shared, peer, reason);
            None
        }
    }
}

/// Puts the new session in the table; a previous session of the device is retired and waited
/// for (its link settled, then up to [`TAKEOVER_WAIT`] for its `on_disconnect`).
async fn take_over(shared: &Shared, device: &DeviceKey, handle: &Arc<SessionHandle>) {
    if let Some(previous) = shared
        .table
        .sessions
        .insert(device.clone(), Arc::clone(handle))
    {
        previous.retire(DisconnectReason::TakenOver);
        // Its link must be settled (live-then-disconnected, or never registered) before ours is
        // registered: otherwise the router would drop it on its own and reuse its id.
        previous.wait_phase(Phase::Settled).await;
        let _ = tokio::time::timeout(TAKEOVER_WAIT, previous.wait_phase(Phase::Done)).await;
    }
}

/// Deleted or disabled since `authenticate`? The gateway deletes a device in the registry
/// first and then ends its session through the session table; this session is in the table
/// now, so either that found it (and retired it: its link is refused when registered) or this
/// finds the device's new state. Without it, a CONNECT racing with a delete could register a
/// persistent session after `Downlink::forget_session` and leave it to a device created again
/// under the same name.
fn gone_meanwhile<H: DeviceHooks + ?Sized>(hooks: &H, device: &DeviceKey) -> Option<Refusal> {
    match hooks.credentials(&device.product_key, &device.device_name) {
        Some(creds) if creds.enabled => None,
        Some(_) => Some(Refusal::DisabledDevice),
        None => Some(Refusal::UnknownDevice),
    }
}

/// Registers the session's router link and installs it in `handle`: the link's receiving end
/// and whether the router kept a session. `None`: replaced or kicked while registering (ends
/// without ever having been online), or the router refused (answered as the limit).
async fn register_link<S: Socket>(
    conn: &mut Conn<S>,
    peer: SocketAddr,
    shared: &Shared,
    handle: &SessionHandle,
    router_client_id: String,
    clean_session: bool,
) -> Option<(LinkRx, bool)> {
    let built = shared
        .router
        .register(router_client_id, clean_session)
        .await;
    match built {
        Ok((link_tx, link_rx, ack)) => {
            if !handle.install(link_tx) {
                // Replaced or kicked while registering: end without ever having been online.
                return None;
            }
            let present = match Option::<Packet>::from(ack) {
                Some(Packet::ConnAck(ack, _)) => ack.session_present,
                _ => false,
            };
            Some((link_rx, present))
        }
        Err(e) => {
            tracing::warn!(error = %e, "router refused the link");
            handle.link_failed();
            refuse(shared, conn, peer, Refusal::Limit).await;
            None
        }
    }
}

/// `_ss=1`: the vendor SDKs rely on the server subscribing them to their system topics.
/// Packet id 0 never comes from a client, so its SUBACK is recognised and swallowed: the flow
/// state starts with it pending. `None`: the link is gone.
async fn auto_subscribe<H: DeviceHooks>(
    shared: &Shared,
    live: &Live<H>,
    device: &DeviceKey,
) -> Option<Flow> {
    let mut flow = Flow::default();
    let filter = |path: String, qos: QoS| Filter {
        path,
        qos,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: RetainForwardRule::Never,
    };
    let subscribe = Subscribe {
        pkid: AUTO_SUBSCRIBE_PKID,
        filters: auto_subscribe_filters(device)
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
    Some(flow)
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

/// [`own_will`], counting a will on a foreign topic as an ACL denial.
fn will_checked(shared: &Shared, device: &DeviceKey, will: LastWill) -> Option<(String, Bytes)> {
    let own = own_will(device, will);
    if own.is_none() {
        shared
            .metrics
            .acl_denied
            .get_or_create(&[("kind", "will")])
            .inc();
    }
    own
}

/// Writes the accepting CONNACK. `None`: the connection is gone.
async fn accept<S: Socket>(conn: &mut Conn<S>, session_present: bool) -> Option<()> {
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
    Some(())
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
