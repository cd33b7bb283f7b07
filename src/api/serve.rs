//! The HTTP listener: an accept loop serving the [`router`](super::router) over hyper's HTTP/1
//! connections, under the limits an internet-facing gateway needs.
//!
//! - **Admission**: every accepted socket passes the HTTP gate ([`crate::admission`]: the
//!   connection budget, the per-source cap) or gets a best-effort `503` and is closed at once.
//! - **PROXY protocol** (`http.proxy_protocol`, [`crate::proxy_protocol`], as on the MQTT
//!   listener): a socket from a trusted balancer is admitted by the budget alone, must start
//!   with a PROXY header within the header-read timeout, and then takes the per-source slot of
//!   the client the header names, which is the connection's peer from then on. A missing or
//!   malformed header closes the socket (`fleetgate_connections_refused_total{listener="http",
//!   reason="proxy_header"}`), a late one too (a `header` timeout); with `required`, sockets
//!   from anywhere else are closed at accept (`reason="proxy_untrusted"`).
//! - **Header-read timeout** (hyper's `header_read_timeout`): a request head must be complete
//!   within it, counted from accept or from the end of the previous response, so it also ends
//!   idle keep-alive connections. Counted as `header` when no request came on the connection
//!   yet, else as `idle` (a browser's quiet keep-alive connection, or a slow later request).
//! - **Body-read timeout** (tower-http's `TimeoutBody`): a request body that delivers nothing
//!   for that long fails its request (400) and the connection is closed.
//! - **Write timeout** (`tokio-io-timeout`): a response write that makes no progress for that
//!   long (the client stopped reading, e.g. a download) closes the connection.
//!
//! Each timeout is counted in `fleetgate_http_timeouts_total{kind}` and (except `idle`, which
//! is ordinary) logged at most every 10 s with the number of occurrences the log skipped.
//! Handlers see the peer (the client a trusted balancer named, else the socket's) as
//! `ConnectInfo<SocketAddr>`: the access log's `peer`, the timeouts' log lines. Shutdown: the
//! loop stops accepting, idle connections close, requests in flight finish (hyper-util's
//! `GracefulShutdown`).

use crate::admission::{Gate, Permit};
use crate::metrics::{HttpTimeout, HttpTimeoutLabels, Metrics, RefusalReason};
use crate::proxy_protocol::{self, Expect, ProxyPolicy, Rewind, Unproxied};
use crate::telemetry::Throttle;
use axum::extract::ConnectInfo;
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tower::ServiceExt;
use tower_http::timeout::{TimeoutBody, TimeoutError};

/// The answer to a socket refused by the gate, written if the socket takes it at once.
const REFUSED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
content-type: text/plain\r\ncontent-length: 21\r\nretry-after: 1\r\n\r\ntoo many connections\n";
const LOG_PERIOD: Duration = Duration::from_secs(10);

/// The HTTP timeouts (`[http]` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpTimeouts {
    pub header_read: Duration,
    pub body_read: Duration,
    pub write: Duration,
}

/// Listen backlog: the default (128) overflows under a connect flood, and a dropped SYN costs a
/// legitimate client a 1 s retransmission.
const BACKLOG: u32 = 4096;

/// Binds the HTTP listener (port 0 works).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and waits for
/// the open connections to finish (idle ones close at once). `proxy` says which sockets start
/// with a PROXY header (`http.proxy_protocol`, `http.proxy_trusted`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    timeouts: HttpTimeouts,
    proxy: ProxyPolicy,
    gate: Arc<Gate>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let events = Arc::new(TimeoutEvents::new(&metrics, timeouts));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = Duration::from_millis(1);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = Duration::from_millis(1);
                accepted
            }
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let expect = proxy.expect(peer.ip());
        // Over the budget or its source's cap: counted and logged by the gate, answered and
        // closed here. Not a trusted balancer while headers are required: closed, unanswered
        // (as on the MQTT listener). A balancer's socket is admitted by the budget alone.
        let permit = match gate.admit_as(peer, expect) {
            Ok(permit) => permit,
            Err(RefusalReason::ProxyUntrusted) => continue,
            Err(_) => {
                let _ = stream.try_write(REFUSED_RESPONSE);
                continue;
            }
        };
        let connection = Connection {
            peer,
            proxied: expect == Expect::Header,
            router: router.clone(),
            timeouts,
            gate: Arc::clone(&gate),
            events: Arc::clone(&events),
        };
        tokio::spawn(connection.serve(stream, permit, graceful.watcher()));
    }
    drop(listener);
    graceful.shutdown().await;
}

/// One admitted connection.
struct Connection {
    /// The socket's own address (a balancer's, when `proxied`).
    peer: SocketAddr,
    /// From a trusted balancer: starts with a PROXY header naming the client.
    proxied: bool,
    router: Router,
    timeouts: HttpTimeouts,
    gate: Arc<Gate>,
    events: Arc<TimeoutEvents>,
}

impl Connection {
    async fn serve(self, stream: TcpStream, mut permit: Permit, watcher: Watcher) {
        let Connection {
            peer: socket_peer,
            proxied,
            router,
            timeouts,
            gate,
            events,
        } = self;
        let _ = stream.set_nodelay(true);
        let (stream, peer) = if proxied {
            let deadline = tokio::time::Instant::now() + timeouts.header_read;
            match proxy_protocol::read_client(stream, socket_peer, deadline).await {
                Ok((stream, client)) => {
                    // The client's per-source cap, now that it is known (a refusal is counted
                    // and logged by the gate).
                    if permit.attribute(client).is_err() {
                        let _ = stream.get_ref().try_write(REFUSED_RESPONSE);
                        return;
                    }
                    (stream, client)
                }
                Err(Unproxied::Silent) => return,
                Err(Unproxied::Malformed(e)) => {
                    tracing::debug!(balancer = %socket_peer, error = %e, "PROXY header refused");
                    gate.refuse_header(socket_peer);
                    return;
                }
                Err(Unproxied::Late) => {
                    events.record(HttpTimeout::Header, socket_peer);
                    return;
                }
            }
        } else {
            (Rewind::plain(stream), socket_peer)
        };
        // Its place in the budget is given back when the connection ends.
        let _permit = permit;
        let mut io = tokio_io_timeout::TimeoutStream::new(stream);
        io.set_write_timeout(Some(timeouts.write));
        let io = TokioIo::new(Box::pin(io));

        let served_a_request = Arc::new(AtomicBool::new(false));
        let service = {
            let events = Arc::clone(&events);
            let served_a_request = Arc::clone(&served_a_request);
            router.map_request(move |req: hyper::Request<Incoming>| {
                served_a_request.store(true, Ordering::Relaxed);
                let (mut parts, body) = req.into_parts();
                parts.extensions.insert(ConnectInfo(peer));
                let events = Arc::clone(&events);
                let body = TimeoutBody::new(timeouts.body_read, body).map_err(move |e| {
                    if e.is::<TimeoutError>() {
                        events.record(HttpTimeout::Body, peer);
                    }
                    e
                });
                axum::extract::Request::from_parts(parts, axum::body::Body::new(body))
            })
        };
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(timeouts.header_read)
            .keep_alive(true);
        let conn = builder.serve_connection(io, TowerToHyperService::new(service));
        if let Err(e) = watcher.watch(conn).await {
            match timeout_kind(&e, served_a_request.load(Ordering::Relaxed)) {
                Some(kind) => events.record(kind, peer),
                None => tracing::debug!(%peer, error = %e, "HTTP connection ended with an error"),
            }
        }
    }
}

/// Which of our timeouts ended a connection with `e`, if any.
fn timeout_kind(e: &hyper::Error, served_a_request: bool) -> Option<HttpTimeout> {
    if e.is_timeout() {
        return Some(if served_a_request {
            HttpTimeout::Idle
        } else {
            HttpTimeout::Header
        });
    }
    // The write timeout surfaces as an I/O error of kind TimedOut from the socket wrapper.
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return Some(HttpTimeout::Write);
            }
        }
        source = s.source();
    }
    None
}

/// Counts every timeout and logs it at most every 10 s per kind.
struct TimeoutEvents {
    timeouts: HttpTimeouts,
    kinds: Vec<(HttpTimeout, Counter, Throttle)>,
}

impl TimeoutEvents {
    fn new(metrics: &Metrics, timeouts: HttpTimeouts) -> TimeoutEvents {
        let kinds = [
            HttpTimeout::Header,
            HttpTimeout::Idle,
            HttpTimeout::Body,
            HttpTimeout::Write,
        ]
        .into_iter()
        .map(|kind| {
            let counter = metrics
                .http_timeouts
                .get_or_create(&HttpTimeoutLabels { kind })
                .clone();
            (kind, counter, Throttle::new(LOG_PERIOD))
        })
        .collect();
        TimeoutEvents { timeouts, kinds }
    }

    fn record(&self, kind: HttpTimeout, peer: SocketAddr) {
        let Some((_, counter, throttle)) = self.kinds.iter().find(|(k, _, _)| *k == kind) else {
            return;
        };
        counter.inc();
        let t = &self.timeouts;
        let (secs, what) = match kind {
            // Ordinary: clients keep connections open and go quiet.
            HttpTimeout::Idle => {
                tracing::debug!(%peer, "HTTP keep-alive connection idle past the header timeout: closed");
                return;
            }
            HttpTimeout::Header => (
                t.header_read,
                "HTTP connection closed: no complete request head within the header timeout",
            ),
            HttpTimeout::Body => (
                t.body_read,
                "HTTP request failed: its body delivered nothing within the body timeout",
            ),
            HttpTimeout::Write => (
                t.write,
                "HTTP connection closed: the client stopped reading its response",
            ),
        };
        if let Some(skipped) = throttle.ready() {
            tracing::warn!(
                kind = kind.as_str(),
                %peer,
                timeout_secs = secs.as_secs_f64(),
                not_logged = skipped,
                "{what}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::GateLimits;
    use crate::metrics::Listener;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const WAIT: Duration = Duration::from_secs(10);

    async fn peer_of(ConnectInfo(peer): ConnectInfo<SocketAddr>) -> String {
        peer.to_string()
    }

    async fn response(s: &mut TcpStream) -> String {
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut got))
            .await
            .expect("closed in time")
            .unwrap();
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn handlers_see_the_peer_and_shutdown_waits_for_requests_in_flight() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let gate = Gate::new(
            Listener::Http,
            GateLimits {
                max_open: 8,
                max_per_source: 8,
            },
            &metrics,
        );
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let router = Router::new().route("/peer", get(peer_of)).route(
            "/slow",
            get(move || {
                let mut release = release_rx.clone();
                let started = started_tx.clone();
                async move {
                    let _ = started.send(());
                    let _ = release.wait_for(|r| *r).await;
                    "done"
                }
            }),
        );
        let timeouts = HttpTimeouts {
            header_read: Duration::from_secs(5),
            body_read: Duration::from_secs(5),
            write: Duration::from_secs(5),
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            router,
            timeouts,
            ProxyPolicy::default(),
            Arc::clone(&gate),
            metrics,
            async {
                let _ = stop_rx.await;
            },
        ));

        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = socket.connect(addr).await.unwrap();
        let local = s.local_addr().unwrap();
        s.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let got = response(&mut s).await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(got.ends_with(&local.to_string()), "{got}");

        // A request in flight when shutdown starts is answered; then the server returns.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::timeout(WAIT, started_rx.recv())
            .await
            .expect("the slow request reached its handler");
        stop_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !server.is_finished(),
            "shutdown waits for the request in flight"
        );
        release_tx.send_replace(true);
        let got = response(&mut slow).await;
        assert!(
            got.starts_with("HTTP/1.1 200") && got.ends_with("done"),
            "{got}"
        );
        tokio::time::timeout(WAIT, server)
            .await
            .expect("server stopped")
            .unwrap();
        assert_eq!(gate.open(), 0);
    }

    /// The balancer's address: loopback, but not the one direct clients use.
    const BALANCER: &str = "127.0.0.3";

    /// A server on port 0 behind `mode` trusting [`BALANCER`], serving `/peer` (the peer the
    /// handler sees), with a per-source cap of `per_source`.
    struct Proxied {
        addr: SocketAddr,
        gate: Arc<Gate>,
        metrics: Arc<Metrics>,
        _stop: tokio::sync::oneshot::Sender<()>,
    }

    async fn proxied(mode: crate::proxy_protocol::ProxyMode, per_source: usize) -> Proxied {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let gate = Gate::new(
            Listener::Http,
            GateLimits {
                max_open: 16,
                max_per_source: per_source,
            },
            &metrics,
        );
        let proxy = ProxyPolicy {
            mode,
            trusted: vec![BALANCER.parse().unwrap()],
        };
        let timeouts = HttpTimeouts {
            header_read: Duration::from_secs(1),
            body_read: Duration::from_secs(5),
            write: Duration::from_secs(5),
        };
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(
            listener,
            Router::new().route("/peer", get(peer_of)),
            timeouts,
            proxy,
            Arc::clone(&gate),
            Arc::clone(&metrics),
            async {
                let _ = stop_rx.await;
            },
        ));
        Proxied {
            addr,
            gate,
            metrics,
            _stop: stop,
        }
    }

    impl Proxied {
        fn counted(&self, line: &str) -> bool {
            self.metrics.encode().lines().any(|l| l == line)
        }

        async fn wait_closed(&self) {
            let deadline = tokio::time::Instant::now() + WAIT;
            while self.gate.open() > 0 {
                assert!(tokio::time::Instant::now() < deadline, "sockets left open");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    async fn tcp_from(source: &str, to: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(source.parse().unwrap(), 0))
            .unwrap();
        socket.connect(to).await.expect("TCP connect")
    }

    /// A PROXY v2 header (HAProxy's `send-proxy-v2`) naming `client`, built with ppp's encoder.
    fn v2_header(client: &str, command: ppp::v2::Command) -> Vec<u8> {
        use ppp::v2;
        let client: SocketAddr = client.parse().unwrap();
        v2::Builder::with_addresses(
            v2::Version::Two | command,
            v2::Protocol::Stream,
            (client, "10.0.0.1:8080".parse::<SocketAddr>().unwrap()),
        )
        .build()
        .unwrap()
    }

    const GET_PEER: &[u8] = b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

    /// Sends `header` and a request for `/peer` in one write (as a balancer does) from
    /// `from`; the whole answer, until the server closes.
    async fn get_peer_via(from: &str, addr: SocketAddr, header: &[u8]) -> (String, SocketAddr) {
        let mut s = tcp_from(from, addr).await;
        let local = s.local_addr().unwrap();
        // A socket closed at accept may already refuse the write: the answer tells.
        let _ = s.write_all(&[header, GET_PEER].concat()).await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut got))
            .await
            .expect("answered or closed in time");
        (String::from_utf8_lossy(&got).into_owned(), local)
    }

    #[tokio::test]
    async fn behind_a_trusted_balancer_the_header_names_the_peer() {
        use crate::proxy_protocol::ProxyMode;
        let server = proxied(ProxyMode::Trusted, 8).await;
        let v2 = v2_header("198.51.100.7:40000", ppp::v2::Command::Proxy);
        let (got, _) = get_peer_via(BALANCER, server.addr, &v2).await;
        assert!(
            got.starts_with("HTTP/1.1 200") && got.ends_with("198.51.100.7:40000"),
            "{got}"
        );
        let v1 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 8080\r\n";
        let (got, _) = get_peer_via(BALANCER, server.addr, v1).await;
        assert!(got.ends_with("[2001:db8::7]:40001"), "{got}");
        // LOCAL (a balancer's own health check): the socket's own address.
        let local = v2_header("10.9.9.9:1", ppp::v2::Command::Local);
        let (got, socket) = get_peer_via(BALANCER, server.addr, &local).await;
        assert!(got.ends_with(&socket.to_string()), "{got}");
        // Anyone else is served as they are, at their own address...
        let (got, socket) = get_peer_via("127.0.0.1", server.addr, &[]).await;
        assert!(got.ends_with(&socket.to_string()), "{got}");
        // ...and a header they send is not believed: it is not HTTP.
        let (got, _) = get_peer_via("127.0.0.1", server.addr, &v2).await;
        assert!(!got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(!got.contains("198.51.100.7"), "{got}");
        server.wait_closed().await;
    }

    #[tokio::test]
    async fn without_a_valid_header_in_time_a_balancers_socket_is_closed() {
        use crate::proxy_protocol::ProxyMode;
        let server = proxied(ProxyMode::Required, 8).await;
        // `required`: a socket from anywhere else is closed at accept, unanswered.
        let v2 = v2_header("198.51.100.7:1", ppp::v2::Command::Proxy);
        for header in [&[][..], &v2] {
            let (got, _) = get_peer_via("127.0.0.1", server.addr, header).await;
            assert_eq!(got, "", "closed without an answer");
        }
        assert!(server.counted(
            r#"fleetgate_connections_refused_total{listener="http",reason="proxy_untrusted"} 2"#
        ));
        // The balancer's socket must start with a header: a bare request is refused.
        let (got, _) = get_peer_via(BALANCER, server.addr, &[]).await;
        assert_eq!(got, "", "closed without an answer");
        assert!(server.counted(
            r#"fleetgate_connections_refused_total{listener="http",reason="proxy_header"} 1"#
        ));
        // Half a header, then silence: closed at the header-read timeout.
        let mut s = tcp_from(BALANCER, server.addr).await;
        s.write_all(&v2[..10]).await.unwrap();
        assert_eq!(response(&mut s).await, "");
        assert!(server.counted(r#"fleetgate_http_timeouts_total{kind="header"} 1"#));
        // Closed before sending anything: not a refusal.
        drop(tcp_from(BALANCER, server.addr).await);
        server.wait_closed().await;
        assert!(server.counted(
            r#"fleetgate_connections_refused_total{listener="http",reason="proxy_header"} 1"#
        ));
        // The balancer's requests are still served.
        let (got, _) = get_peer_via(BALANCER, server.addr, &v2).await;
        assert!(got.ends_with("198.51.100.7:1"), "{got}");
    }

    #[tokio::test]
    async fn the_per_source_cap_counts_the_client_behind_the_balancer() {
        use crate::proxy_protocol::ProxyMode;
        let server = proxied(ProxyMode::Required, 1).await;
        let flooder: std::net::IpAddr = "198.51.100.66".parse().unwrap();
        // One connection of the client (a header, no request yet) fills its cap...
        let mut held = tcp_from(BALANCER, server.addr).await;
        held.write_all(&v2_header(&format!("{flooder}:1"), ppp::v2::Command::Proxy))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        while server.gate.unauthenticated_from(flooder) < 1 {
            assert!(tokio::time::Instant::now() < deadline, "header not read");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // ...so its next one is refused,
        let flood = v2_header(&format!("{flooder}:2"), ppp::v2::Command::Proxy);
        let (got, _) = get_peer_via(BALANCER, server.addr, &flood).await;
        assert!(got.starts_with("HTTP/1.1 503"), "{got}");
        assert!(server
            .counted(r#"fleetgate_connections_refused_total{listener="http",reason="per_ip"} 1"#));
        // ...while another client is served through the same balancer, whose own address
        // holds no slot.
        let other = v2_header("198.51.100.7:1", ppp::v2::Command::Proxy);
        let (got, _) = get_peer_via(BALANCER, server.addr, &other).await;
        assert!(got.ends_with("198.51.100.7:1"), "{got}");
        assert_eq!(
            server.gate.unauthenticated_from(BALANCER.parse().unwrap()),
            0
        );
        drop(held);
        server.wait_closed().await;
    }
}
