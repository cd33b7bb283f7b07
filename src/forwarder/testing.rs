//! Test support shared by the library's tests, the integration tests and the benchmarks:
//! finding the test RabbitMQ, a TCP proxy that simulates its outages, the bare-publisher
//! baseline of the benchmarks (and what they publish beside it: [`envelope`],
//! [`declare_group`]), and (for the unit tests and with the `testing` feature) a forwarder's
//! surroundings: [`Fixture`], [`rabbit`], [`eventually`]. Not part of the gateway's API.

use futures_util::StreamExt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

#[cfg(any(test, feature = "testing"))]
mod fixture;
#[cfg(any(test, feature = "testing"))]
pub use fixture::{eventually, rabbit, Fixture, Rabbit, PATIENCE};

/// The default test broker.
pub const DEFAULT_TEST_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The URL of the test RabbitMQ (`FLEETGATE_AMQP_URL`, else [`DEFAULT_TEST_AMQP_URL`]) once it
/// accepts an AMQP connection. When it does not, the test fails with a message saying how to
/// start one — locally as in CI: a test that could not check must not report that it passed.
pub async fn test_amqp_url(test: &str) -> String {
    let url = std::env::var("FLEETGATE_AMQP_URL").unwrap_or_else(|_| DEFAULT_TEST_AMQP_URL.into());
    let attempt = tokio::time::timeout(
        Duration::from_secs(5),
        lapin::Connection::connect(&url, lapin::ConnectionProperties::default()),
    )
    .await;
    let error = match attempt {
        Ok(Ok(conn)) => {
            let _ = conn.close(200, "probe".into()).await;
            return url;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "connect timed out".to_owned(),
    };
    panic!(
        "{test}: RabbitMQ at {url} is unreachable ({error}): start it (`rabbitmq-server -detached`, \
         or `docker compose up -d rabbitmq`) or point FLEETGATE_AMQP_URL at a broker"
    );
}

/// The AMQP properties the publisher gives `row` (vendor headers, message id, persistence):
/// the bare publisher's envelope in the benchmarks.
pub fn envelope(row: &super::OutboxRow) -> lapin::BasicProperties {
    super::publisher::properties(row)
}

/// Declares a group as the forwarder does: fanout `exchange`, `queue` bound to it with the
/// message TTL `ttl_secs` (0: none), of `queue_type`.
pub async fn declare_group(
    conn: &lapin::Connection,
    ch: &lapin::Channel,
    exchange: &str,
    queue: &str,
    ttl_secs: u32,
    queue_type: super::QueueType,
) -> Result<(), lapin::Error> {
    super::groups::declare_group(conn, ch, exchange, queue, ttl_secs, queue_type)
        .await
        .map(drop)
}

/// Publishes `n` copies of `body` with 1,000 confirms in flight; returns messages per second.
pub async fn bare_publish(
    ch: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    n: usize,
    body: &[u8],
    props: impl Fn(usize) -> lapin::BasicProperties,
) -> f64 {
    let started = std::time::Instant::now();
    let mut inflight = futures_util::stream::FuturesUnordered::new();
    let mut acked = 0usize;
    for i in 0..n {
        if inflight.len() >= 1000 {
            if let Some(c) = inflight.next().await {
                let c: lapin::Result<lapin::Confirmation> = c;
                assert!(c.unwrap().is_ack());
                acked += 1;
            }
        }
        let confirm = ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                lapin::options::BasicPublishOptions {
                    mandatory,
                    immediate: false,
                },
                body,
                props(i),
            )
            .await
            .unwrap();
        inflight.push(confirm);
    }
    while let Some(c) = inflight.next().await {
        assert!(c.unwrap().is_ack());
        acked += 1;
    }
    assert_eq!(acked, n);
    n as f64 / started.elapsed().as_secs_f64()
}

/// The socket address of the broker an AMQP URL names (`localhost` as 127.0.0.1).
pub async fn broker_addr(url: &str) -> SocketAddr {
    let uri: lapin::uri::AMQPUri = url.parse().expect("an AMQP URL");
    let host = if uri.authority.host == "localhost" {
        "127.0.0.1".to_string()
    } else {
        uri.authority.host.clone()
    };
    let mut addrs = tokio::net::lookup_host((host.as_str(), uri.authority.port))
        .await
        .expect("resolve the broker");
    addrs.next().expect("an address")
}

/// `url` (an AMQP URL) with its host and port replaced by `addr` (to go through a [`Proxy`]).
pub fn url_via(url: &str, addr: SocketAddr) -> String {
    let uri: lapin::uri::AMQPUri = url.parse().expect("an AMQP URL");
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    format!(
        "amqp://{}:{}@{}/{}",
        enc(&uri.authority.userinfo.username),
        enc(&uri.authority.userinfo.password),
        addr,
        enc(&uri.vhost)
    )
}

/// A TCP proxy 127.0.0.1:0 ↔ RabbitMQ that can be cut (every connection closed, new ones
/// refused) and restored.
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let accept = {
            let up = up.clone();
            let conns = conns.clone();
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    lock(&conns).push(task);
                }
            })
        };
        Proxy {
            addr,
            up,
            conns,
            accept,
        }
    }

    /// Closes every proxied connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for t in lock(&self.conns).drain(..) {
            t.abort();
        }
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
