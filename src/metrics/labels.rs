//! The metrics' closed label sets: each label value is a type whose variants are every value
//! the label takes, so a metric's series count is bounded by construction.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};

/// One label: `(name, value)`. Values must come from a closed set.
pub type Labels = [(&'static str, &'static str); 1];

/// A connection budget and the listeners that count against it (MQTT: plain and TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Listener {
    Mqtt,
    Http,
}

impl Listener {
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Mqtt => "mqtt",
            Listener::Http => "http",
        }
    }
}

/// Why a socket was closed as soon as it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// The listener's connection budget is used up.
    Budget,
    /// The source address has as many (not yet authenticated, for MQTT) connections open as
    /// it may.
    PerIp,
    /// `proxy_protocol = "required"`: the socket is not from a trusted balancer.
    ProxyUntrusted,
    /// HTTP with `http.proxy_protocol`: a trusted balancer's socket did not start with a
    /// valid PROXY header (MQTT counts these in `fleetgate_mqtt_connects_refused_total`).
    ProxyHeader,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Budget => "budget",
            RefusalReason::PerIp => "per_ip",
            RefusalReason::ProxyUntrusted => "proxy_untrusted",
            RefusalReason::ProxyHeader => "proxy_header",
        }
    }

    /// The reasons a listener kind refuses sockets for.
    pub fn of(listener: Listener) -> &'static [RefusalReason] {
        match listener {
            Listener::Mqtt => &[
                RefusalReason::Budget,
                RefusalReason::PerIp,
                RefusalReason::ProxyUntrusted,
            ],
            Listener::Http => &[
                RefusalReason::Budget,
                RefusalReason::PerIp,
                RefusalReason::ProxyUntrusted,
                RefusalReason::ProxyHeader,
            ],
        }
    }
}

/// Which HTTP timeout ended a connection (or a request body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpTimeout {
    /// No complete request head came within the header timeout on a new connection.
    Header,
    /// A connection that had served requests stayed idle (or sent an incomplete head) past
    /// the header timeout: the ordinary end of a keep-alive connection.
    Idle,
    /// A request body delivered nothing for too long.
    Body,
    /// A response write made no progress for too long (the client stopped reading).
    Write,
}

impl HttpTimeout {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpTimeout::Header => "header",
            HttpTimeout::Idle => "idle",
            HttpTimeout::Body => "body",
            HttpTimeout::Write => "write",
        }
    }
}

macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    )*};
}
label_value!(Listener, RefusalReason, HttpTimeout);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: Listener,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusedLabels {
    pub listener: Listener,
    pub reason: RefusalReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HttpTimeoutLabels {
    pub kind: HttpTimeout,
}
