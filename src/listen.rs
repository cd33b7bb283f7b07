//! Binding the MQTT and HTTP listeners at start-up.
//!
//! An address the operator gave (flag, environment variable or config file) is bound as given,
//! and a failure is a start-up error that names the setting that changes it. The built-in
//! defaults (MQTT `0.0.0.0:1883`, HTTP `0.0.0.0:8080`) are what a first `fleetgate serve`
//! uses, often on a machine where another broker already holds 1883: when such a default port
//! is taken, the next free port above it is used instead, with a WARN line naming both, so
//! the first start works and says where it listens.

use std::io;
use std::net::SocketAddr;

/// How many ports above a taken default are tried before giving up.
pub const FALLBACK_PORTS: u16 = 100;

/// Which listener, for messages: its name and the settings that choose its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerName {
    /// `MQTT`, `HTTP`.
    pub name: &'static str,
    /// The flag, environment variable and config key that set the address.
    pub flag: &'static str,
    pub env: &'static str,
    pub key: &'static str,
}

pub const MQTT: ListenerName = ListenerName {
    name: "MQTT",
    flag: "--mqtt-listen",
    env: "FLEETGATE_MQTT_LISTEN",
    key: "[mqtt] listen",
};

pub const HTTP: ListenerName = ListenerName {
    name: "HTTP",
    flag: "--http-listen",
    env: "FLEETGATE_HTTP_LISTEN",
    key: "[http] listen",
};

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "cannot bind {} on {addr}: {error}; choose another address with {} \
         (or {}, or {} in the config file)",
        .listener.name, .listener.flag, .listener.env, .listener.key
    )]
    /// `error` is in the message (not a `source`: it would be printed twice).
    Bind {
        listener: ListenerName,
        addr: SocketAddr,
        error: io::Error,
    },
    #[error(
        "cannot bind {} on {addr} (the default) nor on the {tried} ports above it: all taken; \
         choose an address with {}",
        .listener.name, .listener.flag
    )]
    NoFreePort {
        listener: ListenerName,
        addr: SocketAddr,
        tried: u16,
    },
}

/// Binds `addr` with `bind`. With `fallback` (the address is the built-in default), a taken
/// port (`AddrInUse`) moves on to the next port, up to [`FALLBACK_PORTS`] above it, and the
/// change is logged at WARN. Any other error, and any error without `fallback`, is returned.
pub fn bind_listener<L>(
    listener: ListenerName,
    addr: SocketAddr,
    fallback: bool,
    mut bind: impl FnMut(SocketAddr) -> io::Result<L>,
) -> Result<L, ListenError> {
    let taken = match bind(addr) {
        Ok(l) => return Ok(l),
        Err(e) if fallback && addr.port() != 0 && e.kind() == io::ErrorKind::AddrInUse => e,
        Err(error) => {
            return Err(ListenError::Bind {
                listener,
                addr,
                error,
            })
        }
    };
    tracing::debug!(error = %taken, %addr, "default port taken");
    let mut tried = 0;
    for port in (addr.port().saturating_add(1)..=u16::MAX).take(usize::from(FALLBACK_PORTS)) {
        tried += 1;
        let mut candidate = addr;
        candidate.set_port(port);
        match bind(candidate) {
            Ok(l) => {
                tracing::warn!(
                    listener = listener.name,
                    taken = addr.port(),
                    chosen = port,
                    "{} port {} (the default) is taken: listening on port {} instead; set {} to choose the address",
                    listener.name,
                    addr.port(),
                    port,
                    listener.flag,
                );
                return Ok(l);
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(error) => {
                return Err(ListenError::Bind {
                    listener,
                    addr: candidate,
                    error,
                })
            }
        }
    }
    Err(ListenError::NoFreePort {
        listener,
        addr,
        tried,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
        TcpListener::bind(addr)
    }

    fn occupied() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    #[test]
    fn a_taken_default_port_falls_back_to_a_free_one_above_it() {
        let (_held, addr) = occupied();
        let l = bind_listener(MQTT, addr, true, bind).unwrap();
        let got = l.local_addr().unwrap();
        assert_eq!(got.ip(), addr.ip());
        assert!(
            got.port() > addr.port() && got.port() <= addr.port() + FALLBACK_PORTS,
            "{got} for a taken {addr}"
        );
    }

    #[test]
    fn a_taken_explicit_address_is_an_error_naming_the_flag() {
        let (_held, addr) = occupied();
        let err = bind_listener(HTTP, addr, false, bind).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ListenError::Bind { addr: a, .. } if a == addr));
        assert!(msg.contains(&addr.to_string()), "{msg}");
        assert!(msg.contains("--http-listen"), "{msg}");
        assert!(msg.contains("FLEETGATE_HTTP_LISTEN"), "{msg}");
    }

    #[test]
    fn a_free_default_is_bound_as_is() {
        let (held, addr) = occupied();
        drop(held);
        let l = bind_listener(MQTT, addr, true, bind).unwrap();
        assert_eq!(l.local_addr().unwrap(), addr);
    }

    #[test]
    fn only_a_taken_port_falls_back() {
        // Another error (here: not a local address) is reported even for a default.
        let addr: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        let err = bind_listener(MQTT, addr, true, |_| -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::PermissionDenied))
        })
        .unwrap_err();
        assert!(matches!(err, ListenError::Bind { .. }), "{err}");
    }

    #[test]
    fn every_port_taken_is_an_error() {
        let addr: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        let mut calls = 0;
        let err = bind_listener(MQTT, addr, true, |_| -> io::Result<()> {
            calls += 1;
            Err(io::Error::from(io::ErrorKind::AddrInUse))
        })
        .unwrap_err();
        assert!(
            matches!(err, ListenError::NoFreePort { tried, .. } if tried == FALLBACK_PORTS),
            "{err}"
        );
        assert_eq!(calls, 1 + usize::from(FALLBACK_PORTS));
        assert!(err.to_string().contains("--mqtt-listen"));
    }
}
