//! Admission of sockets, decided before a byte is read from them.
//!
//! Every listener kind ([`Listener`]: MQTT, plain and TLS together; HTTP) has a budget of open
//! sockets, and one source address may hold only so many sockets that have not proven who
//! they are: for MQTT those before an authenticated CONNECT, for HTTP every connection (HTTP
//! authenticates requests, not connections). A socket over either limit is closed at once,
//! counted (`fleetgate_connections_refused_total{listener,reason}`) and logged at most once
//! per 10 s per listener and reason, with the number of refusals the log skipped.
//!
//! Behind a balancer that sends PROXY headers ([`crate::proxy_protocol`]) the per-source cap
//! must count the client, not the balancer: such a socket is admitted by the budget alone
//! ([`Gate::try_admit_unattributed`]; it counts as unauthenticated from the start, so the
//! CONNECT-timeout pressure applies to it), and takes its source's slot once the header named
//! the client ([`Permit::attribute`]).
//!
//! The budgets come from the process's open-files limit ([`Budgets::derive`]): a reserve is
//! kept for what the gateway opens itself (store, outbox, listeners, AMQP, export packages,
//! the runtime's own descriptors), HTTP gets a bounded share, MQTT the rest. So an HTTP flood
//! cannot take the descriptors MQTT devices need, nor the reverse, nor either of them the
//! store's.
//!
//! Owns the counts of open and not-yet-authenticated sockets per listener kind and per
//! source. Touches no socket: callers close what is refused.

use crate::metrics::{Listener, ListenerLabels, Metrics, RefusalReason, RefusedLabels};
use crate::proxy_protocol::Expect;
use crate::telemetry::Throttle;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// The fewest descriptors the budgets may share once the reserve is taken.
pub const MIN_AVAILABLE: u64 = 64;
/// Descriptors one HTTP connection may hold: its socket and one file it streams (a firmware
/// download or upload, an export package).
pub const HTTP_FILES_PER_CONNECTION: u64 = 2;
/// The HTTP budget when neither the settings nor a small open-files limit say otherwise.
pub const DEFAULT_HTTP_CONNECTIONS: usize = 1024;
/// Per-source caps unless configured, or a quarter of their budget when that is less, so that
/// one source never fills a budget by itself.
pub const DEFAULT_MQTT_UNAUTHENTICATED_PER_IP: usize = 512;
pub const DEFAULT_HTTP_CONNECTIONS_PER_IP: usize = 256;
/// How often a repeated refusal (or pressure) is logged at most.
const LOG_PERIOD: Duration = Duration::from_secs(10);

/// Why the budgets cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error(
        "the open-files limit ({open_files}) leaves {available} descriptors beyond \
         open_files_reserve ({reserve}); at least {MIN_AVAILABLE} are needed \
         (raise the limit, e.g. `ulimit -n`, or lower open_files_reserve)"
    )]
    TooFewFiles {
        open_files: u64,
        reserve: u64,
        available: u64,
    },
    #[error("cannot read or raise the open-files limit: {0}")]
    Limit(#[from] std::io::Error),
}

/// What the settings ask of the budgets; `None` derives the value from the open-files limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BudgetSettings {
    /// Descriptors kept for the gateway's own files (`open_files_reserve`).
    pub reserve: u64,
    /// `mqtt.max_sockets`.
    pub mqtt_sockets: Option<usize>,
    /// `http.max_connections`.
    pub http_connections: Option<usize>,
    /// `mqtt.pressure_unauthenticated`.
    pub mqtt_pressure: Option<usize>,
    /// `mqtt.max_unauthenticated_per_ip`.
    pub mqtt_per_ip: Option<usize>,
    /// `http.max_connections_per_ip`.
    pub http_per_ip: Option<usize>,
}

/// The connection budgets in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// The open-files limit they were derived from.
    pub open_files: u64,
    pub reserve: u64,
    /// Open MQTT sockets (plain and TLS, authenticated or not).
    pub mqtt_sockets: usize,
    /// Open HTTP connections.
    pub http_connections: usize,
    /// From this many not-yet-authenticated MQTT sockets on, new ones get the shorter CONNECT
    /// timeout.
    pub mqtt_pressure: usize,
    /// Not-yet-authenticated MQTT sockets of one source.
    pub mqtt_per_ip: usize,
    /// HTTP connections of one source.
    pub http_per_ip: usize,
}

/// A configured budget the open-files limit cannot hold, lowered to what fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lowered {
    pub setting: &'static str,
    pub asked: usize,
    pub allowed: usize,
}

impl Budgets {
    /// Splits `open_files` minus the reserve: HTTP gets `http.max_connections` (default the
    /// smaller of 1024 and an eighth of what is available; at most a half, counting
    /// [`HTTP_FILES_PER_CONNECTION`] each), MQTT the rest (or `mqtt.max_sockets` when that is
    /// smaller). Configured values that do not fit are lowered and reported, so the reserve
    /// always stays free. Unless configured, pressure starts at an eighth of the MQTT budget
    /// and the per-source caps are 512 (MQTT) and 256 (HTTP), or a quarter of their budget
    /// when that is less.
    pub fn derive(
        open_files: u64,
        settings: &BudgetSettings,
    ) -> Result<(Budgets, Vec<Lowered>), AdmissionError> {
        let available = open_files.saturating_sub(settings.reserve);
        if available < MIN_AVAILABLE {
            return Err(AdmissionError::TooFewFiles {
                open_files,
                reserve: settings.reserve,
                available,
            });
        }
        let count = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let mut lowered = Vec::new();
        let mut fit =
            |setting: &'static str, asked: Option<usize>, allowed: usize, default| match asked {
                Some(asked) if asked > allowed => {
                    lowered.push(Lowered {
                        setting,
                        asked,
                        allowed,
                    });
                    allowed
                }
                Some(asked) => asked,
                None => default,
            };
        let http_max = count(available / 2 / HTTP_FILES_PER_CONNECTION);
        let http = fit(
            "http.max_connections",
            settings.http_connections,
            http_max,
            DEFAULT_HTTP_CONNECTIONS.min(count(available / 8)),
        );
        let http_files = u64::try_from(http).unwrap_or(u64::MAX) * HTTP_FILES_PER_CONNECTION;
        let mqtt_max = count(available - http_files);
        let mqtt = fit(
            "mqtt.max_sockets",
            settings.mqtt_sockets,
            mqtt_max,
            mqtt_max,
        );
        let pressure = settings.mqtt_pressure.unwrap_or((mqtt / 8).max(1));
        let per_ip = |asked: Option<usize>, default: usize, budget: usize| {
            asked.unwrap_or_else(|| default.min(budget / 4).max(1))
        };
        let mqtt_per_ip = per_ip(
            settings.mqtt_per_ip,
            DEFAULT_MQTT_UNAUTHENTICATED_PER_IP,
            mqtt,
        );
        let http_per_ip = per_ip(settings.http_per_ip, DEFAULT_HTTP_CONNECTIONS_PER_IP, http);
        Ok((
            Budgets {
                open_files,
                reserve: settings.reserve,
                mqtt_sockets: mqtt,
                http_connections: http,
                mqtt_pressure: pressure,
                mqtt_per_ip,
                http_per_ip,
            },
            lowered,
        ))
    }
}

/// The open-files limit before and after [`raise_open_files_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    pub before: u64,
    pub now: u64,
    pub hard: u64,
}

/// Raises the soft open-files limit to the hard one (a process may do that without privilege):
/// the connection budgets are derived from it, and distributions' default soft limit (1024)
/// is far below what a gateway with thousands of devices needs.
pub fn raise_open_files_limit() -> Result<OpenFiles, AdmissionError> {
    let (before, hard) = rlimit::Resource::NOFILE.get()?;
    let now = rlimit::increase_nofile_limit(u64::MAX)?;
    Ok(OpenFiles { before, now, hard })
}

/// The soft open-files limit in force.
pub fn open_files_limit() -> Result<u64, AdmissionError> {
    Ok(rlimit::Resource::NOFILE.get()?.0)
}

/// A source address as the per-source caps count it: an IPv4 address, or the /64 network of
/// an IPv6 one (a single subscriber usually holds a whole /64 and can use any address in it).
/// IPv4-mapped IPv6 addresses (a dual-stack listener) count as their IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let s = v6.segments();
                Source(IpAddr::V6(Ipv6Addr::new(
                    s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                )))
            }
            v4 => Source(v4),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// The limits of one [`Gate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateLimits {
    /// Open sockets.
    pub max_open: usize,
    /// Sockets of one [`Source`] that hold a per-source slot (not yet authenticated).
    pub max_per_source: usize,
}

/// Whether one more socket may open, given `open` sockets and `from_source` unauthenticated
/// ones of its source. The source's cap is checked first: it names the flooder, while
/// `budget` means everyone is being turned away.
pub fn decide(open: usize, from_source: usize, limits: GateLimits) -> Result<(), RefusalReason> {
    if from_source >= limits.max_per_source {
        Err(RefusalReason::PerIp)
    } else if open >= limits.max_open {
        Err(RefusalReason::Budget)
    } else {
        Ok(())
    }
}

/// The CONNECT timeout of a new MQTT socket: the short one once `unauthenticated` sockets
/// (this one included) reach `pressure_at`. The flag says whether it was shortened.
pub fn connect_timeout(
    unauthenticated: usize,
    pressure_at: usize,
    normal: Duration,
    under_pressure: Duration,
) -> (Duration, bool) {
    if unauthenticated >= pressure_at && under_pressure < normal {
        (under_pressure, true)
    } else {
        (normal, false)
    }
}

#[derive(Default)]
struct Counts {
    open: usize,
    /// Sockets holding a per-source slot.
    unauthenticated: usize,
    per_source: HashMap<Source, usize>,
}

/// The budget of one listener kind and its per-source cap. Shared by its accept loops.
pub struct Gate {
    listener: Listener,
    limits: GateLimits,
    /// A plain mutex: held for a few map operations, never across an await.
    counts: Mutex<Counts>,
    open_gauge: Gauge,
    unauthenticated_gauge: Option<Gauge>,
    refused: Vec<(RefusalReason, Counter, Throttle)>,
}

impl Gate {
    pub fn new(listener: Listener, limits: GateLimits, metrics: &Metrics) -> Arc<Gate> {
        let labels = ListenerLabels { listener };
        metrics
            .connection_budget
            .get_or_create(&labels)
            .set(i64::try_from(limits.max_open).unwrap_or(i64::MAX));
        let refused = RefusalReason::of(listener)
            .iter()
            .map(|&reason| {
                let counter = metrics
                    .connections_refused
                    .get_or_create(&RefusedLabels { listener, reason })
                    .clone();
                (reason, counter, Throttle::new(LOG_PERIOD))
            })
            .collect();
        Arc::new(Gate {
            listener,
            limits,
            counts: Mutex::new(Counts::default()),
            open_gauge: metrics.connections_open.get_or_create(&labels).clone(),
            unauthenticated_gauge: (listener == Listener::Mqtt)
                .then(|| metrics.mqtt_unauthenticated.clone()),
            refused,
        })
    }

    pub fn limits(&self) -> GateLimits {
        self.limits
    }

    /// Open sockets now.
    pub fn open(&self) -> usize {
        self.lock().open
    }

    /// Sockets holding a per-source slot now.
    pub fn unauthenticated(&self) -> usize {
        self.lock().unauthenticated
    }

    /// Sockets holding a slot of `ip`'s source's cap now (its /64 for IPv6).
    pub fn unauthenticated_from(&self, ip: IpAddr) -> usize {
        let source = Source::of(ip);
        self.lock().per_source.get(&source).copied().unwrap_or(0)
    }

    /// Admits a socket from `peer`, or counts and (throttled) logs its refusal: the caller
    /// closes it.
    pub fn try_admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Permit, RefusalReason> {
        self.admit(peer, true)
    }

    /// Admits a socket by the budget alone: its source is not known yet (a balancer's socket
    /// whose PROXY header has not been read). It counts as unauthenticated, but against no
    /// source's cap until [`Permit::attribute`].
    pub fn try_admit_unattributed(
        self: &Arc<Self>,
        peer: SocketAddr,
    ) -> Result<Permit, RefusalReason> {
        self.admit(peer, false)
    }

    fn admit(
        self: &Arc<Self>,
        peer: SocketAddr,
        attributed: bool,
    ) -> Result<Permit, RefusalReason> {
        let source = Source::of(peer.ip());
        let admitted = {
            let mut counts = self.lock();
            let from_source = if attributed {
                counts.per_source.get(&source).copied().unwrap_or(0)
            } else {
                0
            };
            decide(counts.open, from_source, self.limits).map(|()| {
                counts.open += 1;
                counts.unauthenticated += 1;
                if attributed {
                    *counts.per_source.entry(source).or_insert(0) += 1;
                }
                counts.unauthenticated
            })
        };
        match admitted {
            Ok(unauthenticated) => {
                self.open_gauge.inc();
                if let Some(g) = &self.unauthenticated_gauge {
                    g.inc();
                }
                Ok(Permit {
                    gate: Arc::clone(self),
                    slot: if attributed {
                        Slot::Source(source)
                    } else {
                        Slot::Unattributed
                    },
                    unauthenticated,
                })
            }
            Err(reason) => {
                self.refuse(reason, peer, Some(source));
                Err(reason)
            }
        }
    }

    /// Admits a socket from `peer` as the listener's PROXY policy expects of it
    /// ([`ProxyPolicy::expect`](crate::proxy_protocol::ProxyPolicy::expect)): a direct client
    /// by the budget and its source's cap, a trusted balancer's socket by the budget alone (its
    /// client's cap is taken by [`Permit::attribute`] once its header is read), and a socket
    /// that may not connect at all refused. Refusals are counted and (throttled) logged; the
    /// caller closes the socket.
    pub fn admit_as(
        self: &Arc<Self>,
        peer: SocketAddr,
        expect: Expect,
    ) -> Result<Permit, RefusalReason> {
        match expect {
            Expect::Direct => self.try_admit(peer),
            Expect::Header => self.try_admit_unattributed(peer),
            Expect::Refuse => {
                self.refuse_untrusted(peer);
                Err(RefusalReason::ProxyUntrusted)
            }
        }
    }

    /// Counts and (throttled) logs a socket closed at accept because its source may not
    /// connect at all (not a trusted balancer while PROXY headers are required).
    pub fn refuse_untrusted(&self, peer: SocketAddr) {
        self.refuse(RefusalReason::ProxyUntrusted, peer, None);
    }

    /// Counts and (throttled) logs a trusted balancer's socket closed because it did not start
    /// with a valid PROXY header (the HTTP listener; the MQTT one counts these among its
    /// refused CONNECTs).
    pub fn refuse_header(&self, balancer: SocketAddr) {
        self.refuse(RefusalReason::ProxyHeader, balancer, None);
    }

    fn refuse(&self, reason: RefusalReason, peer: SocketAddr, source: Option<Source>) {
        let Some((_, counter, throttle)) = self.refused.iter().find(|(r, _, _)| *r == reason)
        else {
            return;
        };
        counter.inc();
        let Some(skipped) = throttle.ready() else {
            return;
        };
        let listener = self.listener.as_str();
        match reason {
            RefusalReason::Budget => tracing::warn!(
                listener,
                reason = reason.as_str(),
                %peer,
                budget = self.limits.max_open,
                not_logged = skipped,
                "connection budget used up: new connections are closed at once"
            ),
            RefusalReason::PerIp => tracing::warn!(
                listener,
                reason = reason.as_str(),
                %peer,
                source = %source.unwrap_or_else(|| Source::of(peer.ip())),
                cap = self.limits.max_per_source,
                not_logged = skipped,
                "too many unauthenticated connections from one source: new ones are closed at once"
            ),
            RefusalReason::ProxyUntrusted => tracing::warn!(
                listener,
                reason = reason.as_str(),
                %peer,
                not_logged = skipped,
                "connection from outside the trusted balancers while PROXY headers are \
                 required: closed at once"
            ),
            RefusalReason::ProxyHeader => tracing::warn!(
                listener,
                reason = reason.as_str(),
                balancer = %peer,
                not_logged = skipped,
                "connection from a trusted balancer without a valid PROXY header: closed"
            ),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        // The critical sections cannot panic halfway; a poisoned lock still holds sane counts.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn release_slot(&self, source: Option<Source>) {
        {
            let mut counts = self.lock();
            counts.unauthenticated = counts.unauthenticated.saturating_sub(1);
            if let Some(source) = source {
                if let Some(n) = counts.per_source.get_mut(&source) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        counts.per_source.remove(&source);
                    }
                }
            }
        }
        if let Some(g) = &self.unauthenticated_gauge {
            g.dec();
        }
    }
}

/// An admitted socket's place in its [`Gate`]; dropping it (with the socket) frees the place.
pub struct Permit {
    gate: Arc<Gate>,
    /// Held until [`Permit::authenticated`].
    slot: Slot,
    unauthenticated: usize,
}

/// What an admitted socket holds besides its place in the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Unauthenticated, from a source not known yet ([`Gate::try_admit_unattributed`]).
    Unattributed,
    /// Unauthenticated, counted against its source's cap.
    Source(Source),
    /// Authenticated: only the budget place is left.
    Done,
}

impl Permit {
    /// Unauthenticated sockets of the gate, this one included, when this one was admitted.
    pub fn unauthenticated_at_admission(&self) -> usize {
        self.unauthenticated
    }

    /// The socket's source is now known (`peer`, from its PROXY header): it takes a slot of
    /// that source's cap, or is refused (counted and logged as `per_ip`; the caller closes
    /// it). A socket admitted with its source already is left as it is.
    pub fn attribute(&mut self, peer: SocketAddr) -> Result<(), RefusalReason> {
        if self.slot != Slot::Unattributed {
            return Ok(());
        }
        let source = Source::of(peer.ip());
        let decided = {
            let mut counts = self.gate.lock();
            let from_source = counts.per_source.get(&source).copied().unwrap_or(0);
            // Its place in the budget is already taken: only the source's cap is checked.
            let limits = GateLimits {
                max_open: usize::MAX,
                ..self.gate.limits
            };
            decide(0, from_source, limits).map(|()| {
                *counts.per_source.entry(source).or_insert(0) += 1;
            })
        };
        match decided {
            Ok(()) => {
                self.slot = Slot::Source(source);
                Ok(())
            }
            Err(reason) => {
                self.gate.refuse(reason, peer, Some(source));
                Err(reason)
            }
        }
    }

    /// The connection proved who it is: it no longer counts against its source's cap (it
    /// still counts against the budget until it closes).
    pub fn authenticated(&mut self) {
        match std::mem::replace(&mut self.slot, Slot::Done) {
            Slot::Unattributed => self.gate.release_slot(None),
            Slot::Source(source) => self.gate.release_slot(Some(source)),
            Slot::Done => {}
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.authenticated();
        {
            let mut counts = self.gate.lock();
            counts.open = counts.open.saturating_sub(1);
        }
        self.gate.open_gauge.dec();
    }
}

#[cfg(test)]
mod tests;
