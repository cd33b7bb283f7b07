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

use super::codec::{self, Frame};
use super::server::Shared;
use super::session::{DirectMessage, SessionHandle};
use super::{DeviceHooks, DeviceKey, DisconnectReason, Session};
use crate::admission::Permit;
use crate::proxy_protocol::Rewind;
use bytes::{Bytes, BytesMut};
use rumqttd::local::LinkRx;
use rumqttd::protocol::{self, Packet, QoS};
use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

mod handshake;
mod read_loop;
#[cfg(test)]
mod tests;

use handshake::handshake;
use read_loop::run;

#[cfg(feature = "fuzzing")]
pub(crate) use handshake::{open, own_will, Opening};

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
