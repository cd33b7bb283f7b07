//! The embedded MQTT broker: our own acceptor in front of rumqttd's router.
//!
//! We own the TCP/TLS listeners and the MQTT handshake: every CONNECT is authenticated with the
//! Alibaba Link signature ([`fleetgate_topics::sign`]) and answered with a real CONNACK code;
//! every PUBLISH/SUBSCRIBE is checked against the device's own `{pk}/{dn}` (topic isolation).
//! Upstream device publishes are handed to [`DeviceHooks::on_publish`] and acknowledged
//! (PUBACK) only after it returns. rumqttd's router does what it is good at: sessions,
//! subscriptions, QoS and fan-out of downstream messages, which the gateway injects through
//! [`Downlink`].
//!
//! This module owns sockets and the router; it knows nothing of the registry beyond
//! [`DeviceHooks`].

use bytes::Bytes;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// A device's identity: `(product_key, device_name)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    pub product_key: String,
    pub device_name: String,
}

/// What the broker needs to authenticate a CONNECT.
#[derive(Debug, Clone)]
pub struct DeviceCredentials {
    pub device_secret: String,
    pub enabled: bool,
}

/// One authenticated MQTT connection.
#[derive(Debug, Clone)]
pub struct Session {
    pub device: DeviceKey,
    /// Unique per accepted connection for the life of the process (not rumqttd's reusable id).
    pub conn_id: u64,
    pub client_id: String,
    pub client_addr: SocketAddr,
    pub tls: bool,
    /// Milliseconds since the Unix epoch.
    pub connected_at_ms: i64,
}

impl Session {
    pub fn client_ip(&self) -> IpAddr {
        self.client_addr.ip()
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// Socket closed, I/O or protocol error, keep-alive expired.
    ConnectionLost,
    /// Another connection took over the same device (or client id).
    TakenOver,
    /// The gateway closed it (device disabled/deleted, migration, shutdown).
    Kicked,
}

/// The gateway side of the broker: authentication data and upstream traffic.
pub trait DeviceHooks: Send + Sync + 'static {
    /// Credentials of a device, or `None` when it is unknown.
    fn credentials(&self, product_key: &str, device_name: &str) -> Option<DeviceCredentials>;
    /// A device passed authentication and its CONNACK is about to be sent.
    fn on_connect(&self, session: &Session);
    /// A session ended (called exactly once per `on_connect`).
    fn on_disconnect(&self, session: &Session, reason: DisconnectReason);
    /// An upstream PUBLISH that passed the ACL. The QoS1 PUBACK is written only after the
    /// returned future completes, so "acknowledged" means "processed".
    fn on_publish(
        &self,
        session: &Session,
        topic: &str,
        payload: Bytes,
    ) -> impl Future<Output = ()> + Send;
}

/// TLS listener settings (securemode=2).
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// Broker settings.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    pub tls: Option<TlsConfig>,
    pub max_connections: usize,
    /// How long a new socket may take to send CONNECT.
    pub connect_timeout: Duration,
    pub max_payload_size: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: "0.0.0.0:1883".parse().unwrap(),
            tls: None,
            max_connections: 100_000,
            connect_timeout: Duration::from_secs(10),
            max_payload_size: 256 * 1024,
        }
    }
}
