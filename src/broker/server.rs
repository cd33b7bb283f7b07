//! [`Broker`] (router + gateway link, not listening yet) and [`BrokerHandle`] (listening).
//!
//! `start` binds the listeners itself (port 0 works, backlog 4096) and runs one accept task per
//! listener; each accepted socket passes the broker's admission gate (socket budget, per-source
//! cap of sockets without a CONNECT; [`crate::admission`]) or is closed at once, and then gets
//! its own task ([`super::connection`]) holding its place in the gate. With the PROXY protocol
//! on ([`crate::proxy_protocol`]), a socket from a trusted balancer passes the budget only; its
//! task reads the header (within the CONNECT deadline) and then takes its client's per-source
//! slot, and the client's address is the connection's peer from then on. Shutdown is a
//! `watch<bool>`: accept tasks stop, every session is retired (`on_disconnect` with `Kicked`),
//! and `shutdown` returns once every connection task has finished — each holds a clone of an
//! `mpsc::Sender<()>` that is never sent on, so `recv()` returning `None` means "all gone".

use super::downlink::{Downlink, SessionTable};
use super::filters::FilterBudget;
use super::router::{router_config, RouterHandle, GATEWAY_LINK_ID};
use super::{BrokerConfig, BrokerError, DeviceHooks, DisconnectReason, TlsConfig};
use crate::admission::{self, Gate, GateLimits, Permit};
use crate::metrics::{Listener, Metrics};
use crate::proxy_protocol::{self, Expect, Rewind, Unproxied};
use crate::telemetry::Throttle;
use dashmap::DashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

/// Listen backlog: tokio's default (128) overflows under connect storms.
const BACKLOG: u32 = 4096;

/// What every connection task shares (not generic over the hooks).
pub(crate) struct Shared {
    pub config: BrokerConfig,
    pub metrics: Arc<Metrics>,
    pub router: Arc<RouterHandle>,
    pub table: Arc<SessionTable>,
    /// Distinct subscription filters per device (`mqtt.max_subscriptions_per_device`).
    pub filters: FilterBudget,
    pub downlink: Downlink,
    /// Sessions handling socket data right now (a measure of how saturated the gateway is; see
    /// `connection::read_loop::on_socket_data`).
    pub busy_sessions: AtomicUsize,
    /// The MQTT socket budget and the per-source cap of sockets without a CONNECT.
    pub gate: Arc<Gate>,
    /// Logs pre-CONNECT pressure at most every 10 s.
    pressure_log: Throttle,
    /// Logs refused CONNECTs at most once a second (a flood of bad logins stays readable).
    refusal_log: Throttle,
}

impl Shared {
    /// A refused CONNECT in the log, like Mosquitto's "not authorised" lines: the client's
    /// address and the reason (the `reason` label of `fleetgate_mqtt_connects_refused_total`),
    /// at most one line a second; `not_logged` says how many refusals since the previous
    /// line were not logged (as the admission gates' lines do). Every refusal is counted in
    /// the metric.
    pub(crate) fn log_refusal(&self, peer: SocketAddr, reason: &'static str) {
        if let Some(not_logged) = self.refusal_log.ready() {
            tracing::warn!(client = %peer, reason, not_logged, "MQTT connection refused");
        }
    }

    /// When an admitted socket's CONNECT must have arrived: `connect_timeout` from now, or the
    /// shorter one under pre-CONNECT pressure (counted, and logged at most every 10 s).
    pub(crate) fn connect_deadline(&self, permit: &Permit) -> Instant {
        let config = &self.config;
        let waiting = permit.unauthenticated_at_admission();
        let (timeout, shortened) = admission::connect_timeout(
            waiting,
            config.pressure_unauthenticated,
            config.connect_timeout,
            config.connect_timeout_under_pressure,
        );
        if shortened {
            self.metrics.mqtt_connect_timeout_shortened.inc();
            if let Some(skipped) = self.pressure_log.ready() {
                tracing::warn!(
                    unauthenticated = waiting,
                    threshold = config.pressure_unauthenticated,
                    connect_timeout_secs = timeout.as_secs_f64(),
                    not_logged = skipped,
                    "MQTT pre-CONNECT pressure: new sockets get the shorter CONNECT timeout"
                );
            }
        }
        Instant::now() + timeout
    }
}

/// The embedded broker before it listens: rumqttd's router and the gateway's link are running,
/// so [`Downlink`]s can be handed out (e.g. to engines built before the listeners open).
pub struct Broker {
    shared: Arc<Shared>,
}

impl Broker {
    /// Spawns rumqttd's router thread and the link registration thread, and registers the
    /// gateway's link (blocks briefly while the router answers). Nothing listens yet.
    pub fn new(config: BrokerConfig, metrics: Arc<Metrics>) -> Result<Broker, BrokerError> {
        let router = Arc::new(RouterHandle::spawn(router_config(&config))?);
        let (link_tx, link_rx, _connack) = router
            .build_link(GATEWAY_LINK_ID, true)
            .map_err(|e| BrokerError::Router(e.to_string()))?;
        let table = Arc::new(SessionTable {
            sessions: DashMap::new(),
        });
        let downlink = Downlink::start(
            link_tx,
            link_rx,
            Arc::clone(&table),
            Arc::clone(&router),
            Arc::clone(&metrics),
        )?;
        let gate = Gate::new(
            Listener::Mqtt,
            GateLimits {
                max_open: config.max_sockets,
                max_per_source: config.max_unauthenticated_per_ip,
            },
            &metrics,
        );
        Ok(Broker {
            shared: Arc::new(Shared {
                filters: FilterBudget::new(config.max_subscriptions_per_device),
                config,
                metrics,
                router,
                table,
                downlink,
                busy_sessions: AtomicUsize::new(0),
                gate,
                pressure_log: Throttle::new(Duration::from_secs(10)),
                refusal_log: Throttle::new(Duration::from_secs(1)),
            }),
        })
    }

    /// A handle to publish to devices and control their sessions.
    pub fn downlink(&self) -> Downlink {
        self.shared.downlink.clone()
    }

    /// Binds the MQTT listener (and the TLS one, if configured) and starts accepting.
    pub async fn start<H: DeviceHooks>(self, hooks: Arc<H>) -> Result<BrokerHandle, BrokerError> {
        let plain = bind(self.shared.config.listen)?;
        self.start_on(hooks, plain).await
    }

    /// Starts accepting on `plain`, a plain-TCP listener bound by the caller (from
    /// [`bind_listener`]; `config.listen` is then not used), and binds the TLS one if
    /// configured.
    pub async fn start_on<H: DeviceHooks>(
        self,
        hooks: Arc<H>,
        plain: TcpListener,
    ) -> Result<BrokerHandle, BrokerError> {
        let config = &self.shared.config;
        let tls = match &config.tls {
            Some(tls) => Some((tls.listen, tls_acceptor(tls)?)),
            None => None,
        };
        let mqtt_addr = plain.local_addr()?;
        let tls = match tls {
            Some((addr, acceptor)) => {
                let listener = bind(addr)?;
                Some((listener.local_addr()?, listener, acceptor))
            }
            None => None,
        };

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (tasks_tx, tasks_rx) = mpsc::channel(1);
        let mut accept_tasks = vec![tokio::spawn(accept_loop(
            plain,
            None,
            Arc::clone(&self.shared),
            Arc::clone(&hooks),
            shutdown_rx.clone(),
            tasks_tx.clone(),
        ))];
        let tls_addr = tls.map(|(addr, listener, acceptor)| {
            accept_tasks.push(tokio::spawn(accept_loop(
                listener,
                Some(acceptor),
                Arc::clone(&self.shared),
                Arc::clone(&hooks),
                shutdown_rx.clone(),
                tasks_tx.clone(),
            )));
            addr
        });
        tracing::info!(%mqtt_addr, tls_addr = ?tls_addr, "MQTT broker listening");
        Ok(BrokerHandle {
            mqtt_addr,
            tls_addr,
            shared: self.shared,
            shutdown_tx,
            accept_tasks,
            tasks_tx,
            tasks_rx,
        })
    }
}

/// A running broker. Dropping it stops accepting and closes every session without waiting;
/// [`BrokerHandle::shutdown`] does the same and waits.
pub struct BrokerHandle {
    mqtt_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    accept_tasks: Vec<JoinHandle<()>>,
    tasks_tx: mpsc::Sender<()>,
    tasks_rx: mpsc::Receiver<()>,
}

impl BrokerHandle {
    /// The bound plain-TCP address (the real port when configured with port 0).
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// The bound TLS address, when TLS is configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    pub fn downlink(&self) -> Downlink {
        self.shared.downlink.clone()
    }

    /// The MQTT admission gate (tests look at its counts).
    #[cfg(test)]
    pub(crate) fn gate(&self) -> &Arc<Gate> {
        &self.shared.gate
    }

    /// Whether the listeners still accept (for `/readyz`): true from the start until
    /// [`shutdown`](Self::shutdown) begins or an accept loop ends.
    pub fn accepting(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let stopping = self.shutdown_tx.subscribe();
        let loops: Vec<_> = self.accept_tasks.iter().map(|t| t.abort_handle()).collect();
        move || !*stopping.borrow() && loops.iter().all(|t| !t.is_finished())
    }

    /// Stops accepting, closes every session (each gets `on_disconnect` with
    /// [`DisconnectReason::Kicked`]) and returns once every connection task has finished.
    pub async fn shutdown(mut self) {
        self.shutdown_tx.send_replace(true);
        for task in self.accept_tasks.drain(..) {
            let _ = task.await;
        }
        let sessions: Vec<_> = self
            .shared
            .table
            .sessions
            .iter()
            .map(|e| Arc::clone(e.value()))
            .collect();
        for session in sessions {
            session.retire(DisconnectReason::Kicked);
        }
        let (closed_tx, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tasks_tx, closed_tx));
        while self.tasks_rx.recv().await.is_some() {}
        tracing::info!("MQTT broker stopped");
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener, BrokerError> {
    bind_listener(addr).map_err(|source| BrokerError::Bind { addr, source })
}

/// Binds an MQTT listener as the broker does (`SO_REUSEADDR`, backlog 4096; port 0 works),
/// for [`Broker::start_on`].
pub fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

async fn accept_loop<H: DeviceHooks>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    hooks: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
    tasks: mpsc::Sender<()>,
) {
    let mut backoff = Duration::from_millis(1);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = super::stopping(&mut shutdown) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = Duration::from_millis(1);
                accepted
            }
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let expect = shared.config.proxy.expect(peer.ip());
        // Over the budget or its source's cap, or not a trusted balancer while headers are
        // required: closed here, counted and logged by the gate. A balancer's socket is
        // admitted by the budget alone: its source's cap is checked once its PROXY header
        // names the client.
        let Ok(permit) = shared.gate.admit_as(peer, expect) else {
            continue;
        };
        let deadline = shared.connect_deadline(&permit);
        let _ = stream.set_nodelay(true);
        let task = tasks.clone();
        let shared = Arc::clone(&shared);
        let hooks = Arc::clone(&hooks);
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _task = task;
            let admitted = super::connection::Admitted { permit, deadline };
            serve_accepted(
                stream,
                peer,
                expect == Expect::Header,
                tls,
                admitted,
                shared,
                hooks,
                shutdown,
            )
            .await;
        });
    }
}

/// One admitted socket: its PROXY header (when it comes from a trusted balancer), its TLS
/// handshake (on the TLS listener), then the MQTT connection. The header and the handshake
/// are part of the time the socket has for its CONNECT.
#[allow(clippy::too_many_arguments)]
async fn serve_accepted<H: DeviceHooks>(
    stream: TcpStream,
    socket_peer: SocketAddr,
    proxied: bool,
    tls: Option<TlsAcceptor>,
    mut admitted: super::connection::Admitted,
    shared: Arc<Shared>,
    hooks: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (stream, peer) = if proxied {
        let header = proxy_header(stream, socket_peer, &admitted, &shared);
        let read = tokio::select! {
            read = header => read,
            // A silent balancer socket must not hold up a shutdown until its deadline.
            _ = super::stopping(&mut shutdown) => None,
        };
        let Some((stream, peer)) = read else {
            return;
        };
        // The client's source cap, now that it is known (refusals counted and logged by the
        // gate).
        if admitted.permit.attribute(peer).is_err() {
            return;
        }
        (stream, peer)
    } else {
        (Rewind::plain(stream), socket_peer)
    };
    let Some(acceptor) = tls else {
        super::connection::serve_in_span(stream, peer, false, admitted, shared, hooks, shutdown)
            .await;
        return;
    };
    let handshake = tokio::time::timeout_at(admitted.deadline, acceptor.accept(stream)).await;
    match handshake {
        Ok(Ok(stream)) => {
            super::connection::serve_in_span(stream, peer, true, admitted, shared, hooks, shutdown)
                .await
        }
        Ok(Err(e)) => {
            shared
                .metrics
                .connects_refused
                .get_or_create(&[("reason", "tls")])
                .inc();
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            shared.log_refusal(peer, "tls");
        }
        Err(_) => {
            shared
                .metrics
                .connects_refused
                .get_or_create(&[("reason", "timeout")])
                .inc();
            shared.log_refusal(peer, "timeout");
        }
    }
}

/// Reads the PROXY header a balancer's socket starts with, within the socket's CONNECT
/// deadline: the stream (with what came after the header) and the connection's peer. `None`:
/// the socket is closed (a malformed or late header counted in
/// `fleetgate_mqtt_connects_refused_total` as `proxy_header` or `timeout`, and logged like a
/// refused CONNECT; a socket that ends before sending anything is not counted, as without a
/// balancer).
async fn proxy_header(
    stream: TcpStream,
    socket_peer: SocketAddr,
    admitted: &super::connection::Admitted,
    shared: &Shared,
) -> Option<(Rewind<TcpStream>, SocketAddr)> {
    let reason = match proxy_protocol::read_client(stream, socket_peer, admitted.deadline).await {
        Ok((stream, peer)) => {
            tracing::trace!(%peer, balancer = %socket_peer, "PROXY header");
            return Some((stream, peer));
        }
        Err(Unproxied::Silent) => return None,
        Err(Unproxied::Malformed(e)) => {
            tracing::debug!(balancer = %socket_peer, error = %e, "PROXY header refused");
            "proxy_header"
        }
        Err(Unproxied::Late) => "timeout",
    };
    shared
        .metrics
        .connects_refused
        .get_or_create(&[("reason", reason)])
        .inc();
    shared.log_refusal(socket_peer, reason);
    None
}

/// Whether the TLS listener's certificate and key load (`fleetgate check-config`).
pub fn check_tls(config: &TlsConfig) -> Result<(), BrokerError> {
    tls_acceptor(config).map(drop)
}

/// A rustls acceptor from PEM files. The provider is chosen explicitly (ring): rustls cannot pick
/// a process default when more than one provider is compiled in.
fn tls_acceptor(config: &TlsConfig) -> Result<TlsAcceptor, BrokerError> {
    let tls_err = |what: &str, e: &dyn std::fmt::Display| BrokerError::Tls(format!("{what}: {e}"));
    let cert_pem = std::fs::read(&config.cert_path)
        .map_err(|e| tls_err(&config.cert_path.display().to_string(), &e))?;
    let key_pem = std::fs::read(&config.key_path)
        .map_err(|e| tls_err(&config.key_path.display().to_string(), &e))?;
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err("certificate PEM", &e))?;
    if certs.is_empty() {
        return Err(BrokerError::Tls(format!(
            "no certificate in {}",
            config.cert_path.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| tls_err("key PEM", &e))?
        .ok_or_else(|| {
            BrokerError::Tls(format!("no private key in {}", config.key_path.display()))
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("protocol versions", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_err("certificate/key", &e))?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}
