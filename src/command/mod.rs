//! Cloud-to-device commands: what operators and applications send to devices, and what the
//! devices answer (issue 20, docs/COMMANDS.md).
//!
//! [`Commands`] owns the downlink side of the Link protocol that is not OTA:
//!
//! - **Publish** ([`Commands::publish`], [`Commands::broadcast`]): one message on a topic of the
//!   device's own namespace (`/{pk}/{dn}/…` custom topics or `/sys/{pk}/{dn}/…`), QoS 0 or 1.
//!   Broadcasts (≤ [`MAX_BROADCAST`] devices per call) share one rate limiter
//!   (`commands.broadcast_per_sec`) so that no broadcast can flood the router.
//! - **Service calls** ([`Commands::call_service`], the property set being the service
//!   `property/set`): the vendor payload on `/sys/{pk}/{dn}/thing/service/{identifier}`,
//!   answered on `…_reply` and correlated by the request `id` this module generates. An
//!   asynchronous call returns at once; its answer is kept in a bounded record table
//!   ([`Commands::record`]) and forwarded to the device's consumer groups. A synchronous call
//!   waits for the answer up to the caller's timeout (1–8 s, as the vendor allows).
//! - **RRPC** ([`Commands::rrpc`]): `/sys/{pk}/{dn}/rrpc/request/{messageId}` →
//!   `…/rrpc/response/{messageId}`, always synchronous.
//! - **Latest properties** ([`properties`]): every property post updates a per-device snapshot
//!   persisted through the store.
//!
//! In cluster mode a call's record stays with the node that held the device when the call was
//! made (that node receives the answer); [`Commands::record`] on another node asks every live
//! node for it (`RemoteCommand::Record`) on a miss.
//!
//! Answers arrive through ingest ([`Commands::on_answer`]), which only hands over topics of the
//! session's own device (the broker's ACL already refused foreign ones), so one device can never
//! answer (or spoof an answer to) another device's command.
//!
//! # Offline devices
//!
//! Calls (property set, service, RRPC) need a live session (`Downlink::is_connected`);
//! otherwise they are refused at once with [`CommandError::Offline`] — synchronous calls fail
//! fast, as the vendor's RRpc does. In cluster mode a device whose session another node holds
//! is served by that node: the command travels as a [`Cluster::command`] (NATS request/reply
//! on the holder's node subject), the holder runs it as if it had been called there
//! (`execute`, local sessions only, so it never bounces on) and returns the outcome.
//!
//! One-way messages (publish, broadcast) to a device that is offline with a persistent session
//! follow MQTT: they are kept ([`offline`]: at most `commands.offline_queue_max` per device,
//! none older than `commands.offline_queue_ttl_secs`) and published when the device comes
//! back with a persistent session ([`Commands::session_started`]); the caller gets
//! [`SendStatus::Queued`]. Beyond the count, or for a device whose latest session was clean,
//! they are refused as offline. Single node only: in cluster mode a device may come back on
//! another node, so one-way messages to offline devices are refused there as before.
//!
//! A disabled device is refused every kind of command ([`CommandError::Disabled`]), and the
//! messages kept for it are dropped when it is disabled ([`OfflineReaper`]): being disabled
//! ends its session, and nothing waits for it to come back.
//!
//! This module must not touch the store's device tables or the registry's state: it reads
//! devices, publishes through the [`Downlink`] and writes only its own documents.

mod broadcast;
mod calls;
use calls::Waiters;
mod kept;
pub use kept::OfflineReaper;
mod offline;
pub mod properties;
mod records;
mod remote;
use remote::{unexpected, RemoteAnswer, RemoteCommand};

pub use properties::{LatestProperties, PropertySnapshot};
pub use records::{CommandRecord, CommandStatus, RecordedReply};

use crate::broker::{Delivery, DeviceKey, Downlink};
use crate::clock::now_ms;
use crate::cluster::{Cluster, CommandHandler};
use crate::forwarder::{ForwardMessage, Forwarder};
use crate::metrics::Metrics;
use crate::registry::{DeviceFilter, Page, Registry, RegistryError};
use bytes::Bytes;
use dashmap::DashMap;
use fleetgate_topics::downlink::{self as proto, DeviceAnswer, ServiceRequest};
use fleetgate_topics::Reply;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use offline::{OfflineQueues, Push};
use records::Records;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Most devices one broadcast may address.
pub const MAX_BROADCAST: usize = 1000;
/// Shortest and longest wait of a synchronous call (the vendor's RRpc allows 1–8 s).
pub const MIN_TIMEOUT_MS: u64 = 1000;
pub const MAX_TIMEOUT_MS: u64 = 8000;

/// The `[commands]` section of the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandSettings {
    /// Messages per second all broadcasts together may publish (≥ 1).
    pub broadcast_per_sec: u32,
    /// Asynchronous service calls whose record (and answer) is kept; the oldest go first.
    pub max_records: usize,
    /// How often changed property snapshots are written to the store (milliseconds).
    pub properties_flush_ms: u64,
    /// One-way messages kept per device that is offline with a persistent session (0: none,
    /// such messages are refused as offline). Single node only.
    pub offline_queue_max: usize,
    /// How long such a message is kept before it is dropped (seconds, ≥ 1).
    pub offline_queue_ttl_secs: u64,
}

impl Default for CommandSettings {
    fn default() -> Self {
        CommandSettings {
            broadcast_per_sec: 1000,
            max_records: 10_000,
            properties_flush_ms: 1000,
            offline_queue_max: 100,
            offline_queue_ttl_secs: 3600,
        }
    }
}

/// Why a command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("device offline: {product_key}/{device_name} has no MQTT session")]
    Offline {
        product_key: String,
        device_name: String,
    },
    #[error("device offline: {product_key}/{device_name} has no MQTT session and {max} messages wait for its persistent session already")]
    OfflineQueueFull {
        product_key: String,
        device_name: String,
        max: usize,
    },
    #[error("device disabled: {product_key}/{device_name} is disabled; nothing is sent to it or kept for it")]
    Disabled {
        product_key: String,
        device_name: String,
    },
    #[error("the device did not answer within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    #[error("topic {topic:?} is outside the device's namespace (/{product_key}/{device_name}/… or /sys/{product_key}/{device_name}/…)")]
    Namespace {
        topic: String,
        product_key: String,
        device_name: String,
    },
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("too many devices: at most {max} per broadcast, the selection has {selected}")]
    TooMany { max: usize, selected: u64 },
    #[error("the device's delivery queue is full, try again later")]
    Busy,
    #[error("no command {id} for this device (unknown, or evicted from the record table)")]
    NotFound { id: String },
    #[error("broker: {0}")]
    Broker(String),
}

/// The kinds of downlink, a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DownlinkKind {
    Publish,
    PropertySet,
    Service,
    Rrpc,
}

impl DownlinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DownlinkKind::Publish => "publish",
            DownlinkKind::PropertySet => "property_set",
            DownlinkKind::Service => "service",
            DownlinkKind::Rrpc => "rrpc",
        }
    }
}

/// The QoS a message is published with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
}

/// A message for one device.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: Qos,
}

/// Whether a message went to the device's session or waits for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SendStatus {
    /// Handed to the device's live session.
    #[default]
    Delivered,
    /// The device is offline with a persistent session: kept for it (at most
    /// `commands.offline_queue_max` messages, `commands.offline_queue_ttl_secs`) and published
    /// when it reconnects with a persistent session.
    Queued,
}

/// What a sent message became.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Sent {
    /// An id for the message (the vendor's `MessageId`), unique on this gateway.
    pub message_id: String,
    pub topic: String,
    /// `delivered` or `queued`.
    #[serde(default)]
    pub status: SendStatus,
}

/// Whom a broadcast addresses (of one product).
#[derive(Debug, Clone)]
pub enum Targets {
    /// These device names (duplicates count once).
    Devices(Vec<String>),
    /// Devices with this tag (any value when `value` is `None`).
    Tag { key: String, value: Option<String> },
    /// Every device of the product.
    Product,
}

/// One device's result of a broadcast.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BroadcastResult {
    pub device_name: String,
    /// `sent` (handed to the device's session), `queued` (kept for the device's persistent
    /// session), `offline`, `not_found` or `refused`.
    pub result: String,
    /// The message id when sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Why not, when not sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The answer of a synchronous service call or property set.
#[derive(Debug, Clone)]
pub struct CallOutcome {
    pub record: CommandRecord,
}

/// An RRPC answer.
#[derive(Debug, Clone)]
pub struct RrpcAnswer {
    pub message_id: String,
    pub payload: Bytes,
    pub elapsed_ms: u64,
}

/// How long a command forwarded to another node may take beyond its own wait.
const REMOTE_MARGIN: Duration = Duration::from_secs(3);
/// How long another node may take to look up a call's record.
const RECORD_WAIT: Duration = Duration::from_secs(2);

/// Where a device's session is.
enum Route {
    Here(DeviceKey),
    /// On another node (cluster mode).
    Remote(DeviceKey),
}

/// The cloud-to-device hub; see the module docs.
pub struct Commands {
    downlink: Downlink,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    forwarder: Option<Arc<Forwarder>>,
    next_id: AtomicU64,
    waiters: Waiters,
    records: Records,
    broadcast_limit: DefaultDirectRateLimiter,
    properties: Arc<LatestProperties>,
    /// One-way messages waiting for devices offline with a persistent session.
    offline: OfflineQueues,
    /// Cluster mode: how commands reach devices held by other nodes.
    cluster: OnceLock<Arc<Cluster>>,
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commands")
            .field("waiting", &self.waiters.len())
            .finish_non_exhaustive()
    }
}

impl Commands {
    pub fn new(
        downlink: Downlink,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        settings: CommandSettings,
        properties: Arc<LatestProperties>,
    ) -> Commands {
        let rate = NonZeroU32::new(settings.broadcast_per_sec).unwrap_or(NonZeroU32::MIN);
        Commands {
            downlink,
            registry,
            metrics,
            forwarder: None,
            // Ids unique across restarts: milliseconds at start, then counting (a restart
            // within the same millisecond count would need >1000 commands per ms before it).
            next_id: AtomicU64::new(now_ms().max(0) as u64 * 1000),
            waiters: DashMap::new(),
            records: Records::new(settings.max_records.max(1)),
            // A burst of one second's worth, then the steady rate.
            broadcast_limit: RateLimiter::direct(Quota::per_second(rate)),
            properties,
            offline: OfflineQueues::new(
                settings.offline_queue_max,
                Duration::from_secs(settings.offline_queue_ttl_secs.max(1)),
            ),
            cluster: OnceLock::new(),
        }
    }

    /// Forwards answers of service calls to consumer groups (ignored while forwarding is off).
    pub fn with_forwarder(mut self, forwarder: Arc<Forwarder>) -> Self {
        self.forwarder = forwarder.enabled().then_some(forwarder);
        self
    }

    /// The latest-properties snapshots.
    pub fn properties(&self) -> &Arc<LatestProperties> {
        &self.properties
    }

    fn new_id(&self) -> String {
        self.next_id.fetch_add(1, Ordering::Relaxed).to_string()
    }

    fn count(&self, kind: DownlinkKind, outcome: &'static str) {
        self.metrics
            .downlinks
            .get_or_create(&[("kind", kind.as_str()), ("outcome", outcome)])
            .inc();
    }

    /// Where the device's session is: here, or (cluster mode, unless `local_only`) on another
    /// node. A device without a session anywhere is [`CommandError::Offline`].
    fn locate(
        &self,
        pk: &str,
        dn: &str,
        kind: DownlinkKind,
        local_only: bool,
    ) -> Result<Route, CommandError> {
        let route = self.route(pk, dn, kind, local_only)?;
        route.ok_or_else(|| {
            self.count(kind, "offline");
            CommandError::Offline {
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
            }
        })
    }

    /// [`locate`](Self::locate) without the verdict: `None` when the device has no session.
    /// A disabled device is refused ([`CommandError::Disabled`]), even in the moment before
    /// its session is closed.
    fn route(
        &self,
        pk: &str,
        dn: &str,
        kind: DownlinkKind,
        local_only: bool,
    ) -> Result<Option<Route>, CommandError> {
        let device = self.registry.get_device(pk, dn)?;
        if !device.enabled {
            self.count(kind, "refused");
            return Err(CommandError::Disabled {
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
            });
        }
        let key = DeviceKey {
            product_key: pk.to_owned(),
            device_name: dn.to_owned(),
        };
        if self.downlink.is_connected(&key) {
            return Ok(Some(Route::Here(key)));
        }
        if !local_only && device.node.is_some() && self.cluster.get().is_some() {
            return Ok(Some(Route::Remote(key)));
        }
        Ok(None)
    }

    fn send(&self, message: Message, kind: DownlinkKind) -> Result<(), CommandError> {
        let sent = match message.qos {
            Qos::AtMostOnce => self
                .downlink
                .publish_qos0(message.topic, message.payload)
                .map(|d| d != Delivery::Dropped),
            Qos::AtLeastOnce => self
                .downlink
                .publish(message.topic, message.payload)
                .map(|()| true),
        };
        match sent {
            Ok(true) => Ok(()),
            Ok(false) | Err(crate::broker::BrokerError::DownlinkFull) => {
                self.count(kind, "refused");
                Err(CommandError::Busy)
            }
            Err(e) => {
                self.count(kind, "refused");
                Err(CommandError::Broker(e.to_string()))
            }
        }
    }

    /// Checks that `topic` is one of the device's own topics a message may be sent on.
    pub fn check_namespace(pk: &str, dn: &str, topic: &str) -> Result<(), CommandError> {
        let own = topic.starts_with(&format!("/{pk}/{dn}/"))
            || topic.starts_with(&format!("/sys/{pk}/{dn}/"));
        if own && crate::broker::acl::topic_allowed(pk, dn, topic) {
            Ok(())
        } else {
            Err(CommandError::Namespace {
                topic: topic.to_owned(),
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
            })
        }
    }

    /// Publishes one message to a connected device (through the node holding it, in cluster
    /// mode).
    pub async fn publish(
        &self,
        pk: &str,
        dn: &str,
        message: Message,
    ) -> Result<Sent, CommandError> {
        self.publish_at(pk, dn, message, false).await
    }

    async fn publish_at(
        &self,
        pk: &str,
        dn: &str,
        message: Message,
        local_only: bool,
    ) -> Result<Sent, CommandError> {
        let kind = DownlinkKind::Publish;
        if let Err(e) = Self::check_namespace(pk, dn, &message.topic) {
            self.count(kind, "refused");
            return Err(e);
        }
        let message = match self.route(pk, dn, kind, local_only)? {
            Some(Route::Here(_)) => message,
            None => match self.keep_for_offline(pk, dn, message, local_only)? {
                Ok(sent) => return Ok(sent),
                // It came online meanwhile.
                Err(message) => message,
            },
            Some(Route::Remote(device)) => {
                let command = RemoteCommand::Publish {
                    qos1: message.qos == Qos::AtLeastOnce,
                    topic: message.topic,
                    payload: message.payload.to_vec(),
                };
                return match self.remote(&device, &command, Duration::ZERO).await? {
                    RemoteAnswer::Sent { sent } => Ok(sent),
                    _ => Err(unexpected()),
                };
            }
        };
        let topic = message.topic.clone();
        self.send(message, kind)?;
        self.count(kind, "delivered");
        Ok(Sent {
            message_id: self.new_id(),
            topic,
            status: SendStatus::Delivered,
        })
    }
}
