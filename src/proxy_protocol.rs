//! The PROXY protocol (HAProxy's; version 1, text, and version 2, binary) on the MQTT and HTTP
//! listeners: behind a balancer every socket comes from the balancer's address, so the balancer
//! prepends a header naming the client's, and the gateway takes that address as the
//! connection's peer — for the per-source admission cap, the logs, `client_ip` and the metrics.
//!
//! Who may send one is configured per listener ([`ProxyPolicy`]: `mqtt.proxy_protocol`,
//! `mqtt.proxy_trusted`; `http.proxy_protocol`, `http.proxy_trusted`): a header is read only
//! from a trusted source, where it is required; a header from anyone else is never believed (in
//! `trusted` mode such a socket is served as a plain client, whose first bytes are then not
//! MQTT or HTTP; in `required` mode it is closed at accept).
//!
//! Parsing is the `ppp` crate's; this module bounds what is read ([`MAX_HEADER_BYTES`]), decides
//! what a header means for the connection ([`Origin`], following the specification: a v2
//! `LOCAL` command, a v1 `UNKNOWN` line, or an address family that carries no IP address keep
//! the socket's own address) and hands the bytes read past the header back in a [`Rewind`].
//! Both accept loops go through the same steps: [`ProxyPolicy::expect`] at accept (with
//! `admission::Gate::admit_as`), then [`read_client`] within the socket's first deadline (the
//! MQTT CONNECT timeout, the HTTP header-read timeout), then `admission::Permit::attribute`;
//! only what they count and answer differs.

use bytes::{Buf, Bytes, BytesMut};
use ipnet::IpNet;
use ppp::v2;
use ppp::{v1, PartialResult};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The most bytes a header may take (a v1 line is at most 107; a v2 header is 16 bytes plus
/// its addresses, 12 to 216, plus whatever TLVs the balancer adds). A longer one closes the
/// socket.
pub const MAX_HEADER_BYTES: usize = 1024;
/// The longest v1 line, CRLF included (from the specification).
const MAX_V1_BYTES: usize = 107;
/// A v2 header's fixed part: the signature, version and command, family and protocol, length.
const V2_FIXED_BYTES: usize = 16;
/// Bytes asked for per read while the header is incomplete.
const READ_CHUNK: usize = 256;

/// Whether a listener reads PROXY headers (`mqtt.proxy_protocol`, `http.proxy_protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// No header is read; every socket's peer is its own address.
    #[default]
    Off,
    /// Sockets from `proxy_trusted` must start with a header; others are served as they are.
    Trusted,
    /// Sockets from `proxy_trusted` must start with a header; others are closed at accept.
    Required,
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Off => "off",
            ProxyMode::Trusted => "trusted",
            ProxyMode::Required => "required",
        }
    }
}

impl FromStr for ProxyMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(ProxyMode::Off),
            "trusted" => Ok(ProxyMode::Trusted),
            "required" => Ok(ProxyMode::Required),
            other => Err(format!(
                "`{other}` is not a PROXY protocol mode (off, trusted, required)"
            )),
        }
    }
}

impl fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An address or network allowed to send a PROXY header (`…proxy_trusted`): `10.0.0.7`,
/// `10.0.0.0/24`, `2001:db8::/64`. Written back as a network (`10.0.0.7/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustedNet(IpNet);

impl TrustedNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

impl FromStr for TrustedNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(net) = s.parse::<IpNet>() {
            // `10.0.0.7/24` names a network by one of its addresses: the network is meant.
            return Ok(TrustedNet(net.trunc()));
        }
        s.parse::<IpAddr>()
            .map(|ip| TrustedNet(IpNet::from(ip.to_canonical())))
            .map_err(|_| format!("`{s}` is neither an IP address nor a network (CIDR)"))
    }
}

impl TryFrom<String> for TrustedNet {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TrustedNet> for String {
    fn from(net: TrustedNet) -> String {
        net.to_string()
    }
}

impl fmt::Display for TrustedNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a listener does with a new socket's first bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyPolicy {
    pub mode: ProxyMode,
    pub trusted: Vec<TrustedNet>,
}

/// What a socket from a given address must do before its MQTT handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Nothing: its first bytes are MQTT, HTTP (or TLS), its peer is its own address.
    Direct,
    /// Start with a PROXY header naming the client.
    Header,
    /// Nothing it could send is accepted: close it at once.
    Refuse,
}

impl ProxyPolicy {
    /// Whether `ip` is in `proxy_trusted`.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(ip))
    }

    pub fn expect(&self, ip: IpAddr) -> Expect {
        match self.mode {
            ProxyMode::Off => Expect::Direct,
            _ if self.trusts(ip) => Expect::Header,
            ProxyMode::Trusted => Expect::Direct,
            ProxyMode::Required => Expect::Refuse,
        }
    }
}

/// Whom a complete header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A proxied connection from this client address.
    Client(SocketAddr),
    /// The balancer's own connection (a v2 `LOCAL` command, e.g. a health check; a v1
    /// `UNKNOWN` line; a v2 address family without an IP address): the socket's own address
    /// stays the peer, as the specification says.
    Local,
}

impl Origin {
    /// The connection's peer: the client's address, or the socket's own for [`Origin::Local`].
    pub fn peer(self, socket_peer: SocketAddr) -> SocketAddr {
        match self {
            Origin::Client(addr) => addr,
            Origin::Local => socket_peer,
        }
    }
}

/// Why a header was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The socket ended before a complete header (`read` bytes of it came).
    #[error("the connection ended after {read} bytes, before a complete PROXY header")]
    Closed { read: usize },
    #[error("no complete PROXY header within {MAX_HEADER_BYTES} bytes")]
    TooLong,
    #[error("not a valid PROXY header: {0}")]
    Malformed(String),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

/// What the first bytes of a socket say, so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete header of `len` bytes.
    Complete {
        origin: Origin,
        len: usize,
    },
    /// A header may still follow with more bytes.
    Incomplete,
    Invalid(String),
}

/// Parses the header at the start of `buf` (v2 or v1; bytes after it are not looked at).
///
/// A v1 line is judged once it is complete (its CR and the byte after it are in), or once it
/// is longer than a line may be: ppp reads a truncated line whose last field is still empty as
/// invalid, and a balancer may split the line over two segments.
pub fn parse(buf: &[u8]) -> Parsed {
    const V1_PREFIX: &[u8] = b"PROXY";
    if buf.starts_with(V1_PREFIX) || V1_PREFIX.starts_with(buf) {
        let line_complete = buf
            .iter()
            .position(|&b| b == b'\r')
            .is_some_and(|cr| cr + 1 < buf.len());
        if !line_complete {
            return if buf.len() >= MAX_V1_BYTES {
                Parsed::Invalid(format!("no CRLF within {MAX_V1_BYTES} bytes of a v1 line"))
            } else {
                Parsed::Incomplete
            };
        }
        return match v1::Header::try_from(buf) {
            Ok(header) => Parsed::Complete {
                origin: match header.addresses {
                    v1::Addresses::Tcp4(a) => {
                        Origin::Client(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    v1::Addresses::Tcp6(a) => {
                        Origin::Client(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    v1::Addresses::Unknown => Origin::Local,
                },
                len: header.header.len(),
            },
            // The line is complete: what ppp would still wait for can never come.
            Err(e) if e.is_incomplete() => Parsed::Invalid(format!("not a complete v1 line ({e})")),
            Err(e) => Parsed::Invalid(e.to_string()),
        };
    }
    match v2::Header::try_from(buf) {
        Ok(header) => match v2_origin(&header) {
            Ok(origin) => Parsed::Complete {
                origin,
                len: header.len(),
            },
            Err(why) => Parsed::Invalid(why),
        },
        Err(v2::ParseError::Partial(_, announced))
            if V2_FIXED_BYTES + announced > MAX_HEADER_BYTES =>
        {
            Parsed::Invalid(format!(
                "a v2 header of {} bytes is longer than {MAX_HEADER_BYTES}",
                V2_FIXED_BYTES + announced
            ))
        }
        Err(e) if e.is_incomplete() => Parsed::Incomplete,
        Err(e) => Parsed::Invalid(e.to_string()),
    }
}

fn v2_origin(header: &v2::Header<'_>) -> Result<Origin, String> {
    if header.command == v2::Command::Local {
        return Ok(Origin::Local);
    }
    if header.protocol == v2::Protocol::Datagram {
        return Err("a v2 header for a datagram (UDP) connection".into());
    }
    Ok(match header.addresses {
        v2::Addresses::IPv4(a) => {
            Origin::Client(SocketAddr::from((a.source_address, a.source_port)))
        }
        v2::Addresses::IPv6(a) => {
            Origin::Client(SocketAddr::from((a.source_address, a.source_port)))
        }
        // No IP address to take: the specification says to use the socket's own.
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => Origin::Local,
    })
}

/// Reads a PROXY header from the start of `io` (at most [`MAX_HEADER_BYTES`]): whom it names,
/// and the bytes read past it (the start of the MQTT or TLS stream), to be read first through
/// a [`Rewind`]. The caller bounds the time it may take.
pub async fn read_header<S: AsyncRead + Unpin>(io: &mut S) -> Result<(Origin, Bytes), HeaderError> {
    let mut buf = BytesMut::new();
    loop {
        if !buf.is_empty() {
            match parse(&buf) {
                Parsed::Complete { origin, len } => {
                    buf.advance(len);
                    return Ok((origin, buf.freeze()));
                }
                Parsed::Invalid(why) => return Err(HeaderError::Malformed(why)),
                Parsed::Incomplete => {}
            }
        }
        let room = MAX_HEADER_BYTES - buf.len();
        if room == 0 {
            return Err(HeaderError::TooLong);
        }
        let mut chunk = [0u8; READ_CHUNK];
        let want = room.min(READ_CHUNK);
        let n = io.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(HeaderError::Closed { read: buf.len() });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Why a trusted balancer's socket named no client: the caller closes it.
#[derive(Debug)]
pub enum Unproxied {
    /// It ended before sending a byte (a balancer giving up a connection, a port probe): not
    /// a refusal, as a socket that closes before its first request is not.
    Silent,
    /// Not a valid header, longer than [`MAX_HEADER_BYTES`], or ended halfway.
    Malformed(HeaderError),
    /// No complete header by the deadline.
    Late,
}

/// Reads the PROXY header a trusted balancer's socket starts with, by `deadline`: the stream to
/// serve (the bytes that came after the header are read first) and the connection's peer — the
/// client the header names, or the socket's own address (`socket_peer`) for a header naming
/// none ([`Origin::Local`]).
pub async fn read_client<S: AsyncRead + Unpin>(
    mut io: S,
    socket_peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> Result<(Rewind<S>, SocketAddr), Unproxied> {
    match tokio::time::timeout_at(deadline, read_header(&mut io)).await {
        Ok(Ok((origin, rest))) => Ok((Rewind::new(io, rest), origin.peer(socket_peer))),
        Ok(Err(HeaderError::Closed { read: 0 })) => Err(Unproxied::Silent),
        Ok(Err(e)) => Err(Unproxied::Malformed(e)),
        Err(_) => Err(Unproxied::Late),
    }
}

/// A stream whose first bytes were already read: `rest` is read again first, then `io`.
/// Writes go straight to `io`. Holds no buffer once `rest` is consumed.
#[derive(Debug)]
pub struct Rewind<S> {
    rest: Bytes,
    io: S,
}

impl<S> Rewind<S> {
    pub fn new(io: S, rest: Bytes) -> Rewind<S> {
        Rewind { rest, io }
    }

    /// A stream with nothing read ahead.
    pub fn plain(io: S) -> Rewind<S> {
        Rewind::new(io, Bytes::new())
    }

    /// Whether bytes read ahead are still waiting.
    pub fn has_buffered(&self) -> bool {
        !self.rest.is_empty()
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.rest.is_empty() {
            let n = self.rest.len().min(buf.remaining());
            buf.put_slice(&self.rest[..n]);
            self.rest.advance(n);
            if self.rest.is_empty() {
                // Let go of the read-ahead buffer.
                self.rest = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A v2 header built by ppp's own encoder.
    fn v2_header(command: v2::Command, source: &str, destination: &str) -> Vec<u8> {
        let addresses: v2::Addresses = (addr(source), addr(destination)).into();
        v2::Builder::with_addresses(v2::Version::Two | command, v2::Protocol::Stream, addresses)
            .build()
            .unwrap()
    }

    const CONNECT: &[u8] = &[0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', 4, 2, 0, 60];

    #[test]
    fn complete_headers_name_the_client_or_keep_the_socket() {
        let v2_tcp4 = v2_header(v2::Command::Proxy, "198.51.100.7:40000", "10.0.0.1:1883");
        let v2_tcp6 = v2_header(
            v2::Command::Proxy,
            "[2001:db8::7]:40001",
            "[2001:db8::1]:1883",
        );
        let v2_local = v2_header(v2::Command::Local, "10.0.0.9:1", "10.0.0.1:1883");
        let v2_unspec = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Unspecified,
            v2::Addresses::Unspecified,
        )
        .build()
        .unwrap();
        // A TLV (the balancer's unique id) after the addresses is skipped.
        let v2_tlv = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (addr("198.51.100.8:5"), addr("10.0.0.1:1883")),
        )
        .write_tlv(v2::Type::UniqueId, b"req-1".as_slice())
        .unwrap()
        .build()
        .unwrap();
        let cases: Vec<(&str, Vec<u8>, Origin)> = vec![
            (
                "v2 TCP4",
                v2_tcp4,
                Origin::Client(addr("198.51.100.7:40000")),
            ),
            (
                "v2 TCP6",
                v2_tcp6,
                Origin::Client(addr("[2001:db8::7]:40001")),
            ),
            ("v2 LOCAL", v2_local, Origin::Local),
            ("v2 UNSPEC", v2_unspec, Origin::Local),
            (
                "v2 with a TLV",
                v2_tlv,
                Origin::Client(addr("198.51.100.8:5")),
            ),
            (
                "v1 TCP4",
                b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 1883\r\n".to_vec(),
                Origin::Client(addr("198.51.100.7:40000")),
            ),
            (
                "v1 TCP6",
                b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 1883\r\n".to_vec(),
                Origin::Client(addr("[2001:db8::7]:40001")),
            ),
            ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n".to_vec(), Origin::Local),
        ];
        for (what, header, origin) in cases {
            let len = header.len();
            let mut input = header;
            input.extend_from_slice(CONNECT);
            assert_eq!(parse(&input), Parsed::Complete { origin, len }, "{what}");
            // Every strict prefix is incomplete, never invalid nor complete.
            for cut in 1..len {
                assert_eq!(
                    parse(&input[..cut]),
                    Parsed::Incomplete,
                    "{what} cut at {cut}"
                );
            }
        }
        let socket = addr("10.0.0.9:5000");
        assert_eq!(Origin::Local.peer(socket), socket);
        assert_eq!(
            Origin::Client(addr("198.51.100.7:1")).peer(socket),
            addr("198.51.100.7:1")
        );
    }

    #[test]
    fn what_is_not_a_header_is_invalid_at_once() {
        let mut v2_udp = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Datagram,
            (addr("198.51.100.7:1"), addr("10.0.0.1:2")),
        )
        .build()
        .unwrap();
        v2_udp.extend_from_slice(CONNECT);
        let mut v1_version = v2_header(v2::Command::Proxy, "198.51.100.7:1", "10.0.0.1:2");
        v1_version[12] = 0x11; // version 1 in the binary form
        let mut bad_command = v2_header(v2::Command::Proxy, "198.51.100.7:1", "10.0.0.1:2");
        bad_command[12] = 0x2F;
        let mut huge = v2_header(v2::Command::Proxy, "198.51.100.7:1", "10.0.0.1:2");
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("an MQTT CONNECT", CONNECT.to_vec()),
            ("TLS", vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01]),
            ("HTTP", b"GET / HTTP/1.1\r\n".to_vec()),
            (
                "lower-case v1",
                b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            ),
            (
                "v1 bad address",
                b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n".to_vec(),
            ),
            ("v1 IPv6 as TCP4", b"PROXY TCP4 ::1 ::1 1 2\r\n".to_vec()),
            (
                "v1 bad port",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n".to_vec(),
            ),
            (
                "v1 leading zero port",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n".to_vec(),
            ),
            (
                "v1 unknown protocol",
                b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            ),
            (
                "v1 without CRLF",
                [b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ".as_slice(), &[b'x'; 100]].concat(),
            ),
            (
                "v1 CR without LF",
                [b"PROXY UNKNOWN\rX".as_slice(), &[b' '; 100]].concat(),
            ),
            ("v2 UDP", v2_udp),
            ("v2 version 1", v1_version),
            ("v2 bad command", bad_command),
            ("v2 longer than the bound", huge),
        ];
        for (what, input) in cases {
            assert!(
                matches!(parse(&input), Parsed::Invalid(_)),
                "{what}: {:?}",
                parse(&input)
            );
        }
    }

    #[tokio::test]
    async fn read_header_returns_what_follows_and_bounds_what_it_reads() {
        // The header split over several writes, the CONNECT in the last one.
        let header = v2_header(v2::Command::Proxy, "198.51.100.7:40000", "10.0.0.1:1883");
        let (mut client, server) = tokio::io::duplex(64);
        let sent = [header.clone(), CONNECT.to_vec()].concat();
        let writer = tokio::spawn(async move {
            for part in sent.chunks(5) {
                client.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let mut server = server;
        let (origin, rest) = read_header(&mut server).await.unwrap();
        assert_eq!(origin, Origin::Client(addr("198.51.100.7:40000")));
        let _client = writer.await.unwrap();
        // Whatever came with the header is read first, then the socket.
        let mut stream = Rewind::new(server, rest);
        let mut got = vec![0u8; CONNECT.len()];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(got, CONNECT);
        assert!(!stream.has_buffered());

        // Ended halfway.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(&header[..10]).await.unwrap();
        drop(client);
        assert!(matches!(
            read_header(&mut server).await,
            Err(HeaderError::Closed { read: 10 })
        ));

        // Garbage is refused without waiting for more.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(CONNECT).await.unwrap();
        assert!(matches!(
            read_header(&mut server).await,
            Err(HeaderError::Malformed(_))
        ));

        // A v2 header announcing TLVs up to the bound, never completed: refused at the bound,
        // having read no more than it.
        let mut long = v2_header(v2::Command::Proxy, "198.51.100.7:1", "10.0.0.1:2");
        let announced = (MAX_HEADER_BYTES - V2_FIXED_BYTES) as u16;
        long[14..16].copy_from_slice(&announced.to_be_bytes());
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(&long).await.unwrap();
        client.write_all(&[0u8; 2048]).await.unwrap();
        // Filled with zero TLV bytes up to exactly the bound, so it parses: the bound is
        // inclusive. One byte more announced is refused before it is read.
        let (origin, rest) = read_header(&mut server).await.unwrap();
        assert_eq!(origin, Origin::Client(addr("198.51.100.7:1")));
        assert!(rest.is_empty(), "nothing read past the bound");
        long[14..16].copy_from_slice(&(announced + 1).to_be_bytes());
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(&long).await.unwrap();
        assert!(matches!(
            read_header(&mut server).await,
            Err(HeaderError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn read_client_names_the_peer_or_says_why_not() {
        let socket = addr("10.0.0.9:5000");
        let later = || tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let header = v2_header(v2::Command::Proxy, "198.51.100.7:40000", "10.0.0.1:80");

        let (mut client, server) = tokio::io::duplex(256);
        client
            .write_all(&[header.as_slice(), b"GET /"].concat())
            .await
            .unwrap();
        let (mut stream, peer) = read_client(server, socket, later()).await.unwrap();
        assert_eq!(peer, addr("198.51.100.7:40000"));
        let mut got = [0u8; 5];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET /");

        let local = v2_header(v2::Command::Local, "10.0.0.9:1", "10.0.0.1:80");
        let (mut client, server) = tokio::io::duplex(256);
        client.write_all(&local).await.unwrap();
        let (_, peer) = read_client(server, socket, later()).await.unwrap();
        assert_eq!(peer, socket, "LOCAL keeps the socket's own address");

        let (client, server) = tokio::io::duplex(256);
        drop(client);
        let silent = read_client(server, socket, later()).await;
        assert!(matches!(silent, Err(Unproxied::Silent)), "{silent:?}");

        let (mut client, server) = tokio::io::duplex(256);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let malformed = read_client(server, socket, later()).await;
        assert!(
            matches!(malformed, Err(Unproxied::Malformed(_))),
            "{malformed:?}"
        );

        let (mut client, server) = tokio::io::duplex(256);
        client.write_all(&header[..10]).await.unwrap();
        let soon = tokio::time::Instant::now() + std::time::Duration::from_millis(50);
        let late = read_client(server, socket, soon).await;
        assert!(matches!(late, Err(Unproxied::Late)), "{late:?}");
        drop(client);
    }

    #[test]
    fn policy_decides_by_source() {
        let net = |s: &str| s.parse::<TrustedNet>().unwrap();
        let policy = |mode| ProxyPolicy {
            mode,
            trusted: vec![net("10.0.0.0/24"), net("2001:db8::1"), net("127.0.0.3")],
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (mode, from, expect) in [
            (ProxyMode::Off, "10.0.0.5", Expect::Direct),
            (ProxyMode::Trusted, "10.0.0.5", Expect::Header),
            (ProxyMode::Trusted, "10.0.1.5", Expect::Direct),
            (ProxyMode::Required, "10.0.0.255", Expect::Header),
            (ProxyMode::Required, "10.0.1.5", Expect::Refuse),
            // IPv4-mapped (a dual-stack listener) counts as IPv4.
            (ProxyMode::Required, "::ffff:10.0.0.5", Expect::Header),
            (ProxyMode::Required, "2001:db8::1", Expect::Header),
            (ProxyMode::Required, "2001:db8::2", Expect::Refuse),
            (ProxyMode::Required, "127.0.0.3", Expect::Header),
            (ProxyMode::Required, "127.0.0.1", Expect::Refuse),
        ] {
            assert_eq!(policy(mode).expect(ip(from)), expect, "{mode} from {from}");
        }
        assert_eq!(net("10.0.0.7/24").to_string(), "10.0.0.0/24");
        assert_eq!(net("10.0.0.7").to_string(), "10.0.0.7/32");
        assert!("10.0.0.0/33".parse::<TrustedNet>().is_err());
        assert!("haproxy".parse::<TrustedNet>().is_err());
        assert_eq!("required".parse::<ProxyMode>(), Ok(ProxyMode::Required));
        assert!("v2".parse::<ProxyMode>().is_err());
    }
}
