//! The HTTP listener: an accept loop serving the [`router`](super::router) over hyper's HTTP/1
//! connections, under the limits an internet-facing gateway needs.
//!
//! - **Admission**: every accepted socket passes the HTTP gate ([`crate::admission`]: the
//!   connection budget, the per-source cap) or gets a best-effort `503` and is closed at once.
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
//! Handlers see the peer as `ConnectInfo<SocketAddr>`. Shutdown: the loop stops accepting,
//! idle connections close, requests in flight finish (hyper-util's `GracefulShutdown`).

use crate::admission::{Gate, Permit};
use crate::metrics::{HttpTimeout, HttpTimeoutLabels, Metrics};
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
/// the open connections to finish (idle ones close at once).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    timeouts: HttpTimeouts,
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
        // Over the budget or its source's cap: counted and logged by the gate, closed here.
        let Ok(permit) = gate.try_admit(peer) else {
            let _ = stream.try_write(REFUSED_RESPONSE);
            continue;
        };
        let connection = Connection {
            peer,
            router: router.clone(),
            timeouts,
            events: Arc::clone(&events),
        };
        tokio::spawn(connection.serve(stream, permit, graceful.watcher()));
    }
    drop(listener);
    graceful.shutdown().await;
}

/// One admitted connection.
struct Connection {
    peer: SocketAddr,
    router: Router,
    timeouts: HttpTimeouts,
    events: Arc<TimeoutEvents>,
}

impl Connection {
    async fn serve(self, stream: TcpStream, permit: Permit, watcher: Watcher) {
        // Its place in the budget is given back when the connection ends.
        let _permit = permit;
        let Connection {
            peer,
            router,
            timeouts,
            events,
        } = self;
        let _ = stream.set_nodelay(true);
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
}
