//! The AMQP forwarder: mirrors device data into RabbitMQ consumer groups of the instance that
//! owns each device (docs/DESIGN.md §5), at least once, through a durable outbox.
//!
//! # Shape
//!
//! ```text
//! ingest ──enqueue(ForwardMessage).await──► outbox.db (own SQLite file + writer, group commit)
//!   (PUBACK after it resolves)                   │ in seq order: just-committed rows from the
//!                                                │ writer's in-memory tail, the rest from the file
//!                                                ▼
//!                        publisher task ── lapin, confirms, ≤ window in flight ──► RabbitMQ
//!                          │  ack → delete row; return (no group) → count, delete;      exchange {prefix}.{iid} (fanout)
//!                          │  nack → drain, re-read from the oldest unacked;              └► queue {prefix}.{iid}.{gid} per group
//!                          │  channel/connection error → reconnect with backoff, re-read everything left
//!                          ▼
//!                        sampler task ── passive queue_declare per group ──► backlog, consumers, consume rate
//! ```
//!
//! - [`Forwarder`] always exists (the API's consumer-group CRUD needs it); forwarding itself is
//!   on only with an AMQP URL. Off, [`Forwarder::enqueue`] resolves at once without storing
//!   anything and `/healthz` says `disabled`; groups are still created, persisted and listed,
//!   and declared once a broker is configured.
//! - Routing: a message goes to the exchange of the instance owning the device at enqueue time,
//!   plus whatever the route hook ([`Forwarder::set_route_hook`]) adds (the migration engine's
//!   data sync). Each target is its own outbox row, acked and deleted on its own. The one
//!   message about a device the registry no longer knows is its OTA tasks' `DEVICE_DELETED`
//!   cancel: the OTA engine puts the former owner in the event
//!   ([`TaskEvent::instance_id`](crate::ota::TaskEvent::instance_id)) and
//!   [`Forwarder::ota_event_sink`] routes it there; anything else for an unknown device is
//!   dropped and counted.
//! - Order: the publisher publishes in outbox order over one channel and, after any failure,
//!   starts again from the oldest row not acked; RabbitMQ keeps one channel's publishes in
//!   order, so each device's messages arrive in order (with possible duplicates of the
//!   unconfirmed tail, which consumers drop by `messageId`). The one exception is a broker
//!   `nack` of a single message while later ones were acked: the nacked one is re-sent after them.
//! - A full outbox (RabbitMQ unreachable long enough for `outbox_max_bytes` to fill) never
//!   acknowledges and drops: an enqueue waits up to `outbox_full_wait_ms` for room
//!   (back-pressure), then gives up without storing. A QoS 1 post is refused
//!   ([`OnFull::Refuse`]): ingest withholds its PUBACK, the broker closes the connection and
//!   the device sends it again after reconnecting. Messages nobody was promised (QoS 0 posts,
//!   online/offline status, OTA task events) are dropped and counted ([`OnFull::Drop`]).
//! - Returned messages (`mandatory`, no queue bound: the instance has no consumer group) are
//!   counted and dropped, like the vendor, which forwards only to existing subscriptions.
//! - Rate limits per target (`limits.rs`: an override set at runtime with
//!   [`Forwarder::set_rate_limit`] — `PUT /api/v1/instances/{iid}/forwarding/rate-limit`,
//!   persisted — else the configured default) are applied by the publisher, never on the
//!   enqueue path, so MQTT ingest is never slowed by them. The publisher consults them for
//!   every row and is woken when one changes, so a change applies at once. A rate-limited
//!   target's rows wait in the publisher's read buffer while other targets' rows pass them;
//!   when that buffer is full of one target's rows everything waits.
//! - Mirror limits ([`Forwarder::set_mirror_rate_limit`], the migration's `bandwidth_limit_mb`
//!   while data sync is on) apply only to *mirrored* rows: those whose target is not the
//!   device's owning instance at publish time (the copies data sync adds). The target's own
//!   devices' rows pass them. A device is wholly mirrored or wholly direct at any moment, so its
//!   rows keep their order.
//! - Retention: group queues carry `x-message-ttl` (`amqp.queue_message_ttl_secs`, default one
//!   day like the vendor, or the group's own `message_ttl_secs`). A queue that exists with
//!   other arguments is kept as it is, with a warning, instead of failing the connection
//!   (`groups.rs`).
//! - Queue type: every group queue is of `amqp.queue_type` (`classic`, or `quorum` to survive
//!   the loss of a RabbitMQ node). A queue that exists with the other type is kept and fed too,
//!   and reported — error log, `fleetgate_forwarder_group_queue_error{group,status}`, the
//!   group's `queue_status`/`queue_error` — without holding up the other groups.
//!
//! Files: `mod.rs` the [`Forwarder`] value and its lifecycle; `settings.rs` its configuration;
//! `message.rs` the forwarded message; `enqueue.rs` routing and enqueueing;
//! `channel.rs` the broker admin operations; `link.rs` what a new connection must do;
//! `publisher.rs` the publisher task; `outbox.rs`/`pg_outbox.rs` the outboxes; `groups.rs`,
//! `group_admin.rs`, `limits.rs`, `limit_admin.rs`, `instance_delete.rs` and `follow.rs` the
//! consumer groups, rate limits and their cluster documents.
//!
//! This module owns `outbox.db`, the AMQP connection and the consumer-group and rate-limit
//! documents; it reads the registry (device ownership, instances) and never changes it.

mod channel;
mod enqueue;
mod follow;
mod group_admin;
mod groups;
mod instance_delete;
mod limit_admin;
mod limits;
mod link;
mod message;
mod outbox;
mod pg_outbox;
mod publisher;
mod settings;

#[doc(hidden)]
pub mod testing;

#[cfg(test)]
mod amqp_tests;
#[cfg(test)]
mod queue_type_tests;
#[cfg(test)]
mod tests;

pub use groups::{
    ConsumerGroup, ConsumerGroupDetails, NewConsumerGroup, QueueStatus, Topology,
    EXCHANGE_TOMBSTONE_DOC_KIND, GROUP_DOC_KIND,
};
pub use limits::{InstanceRateLimit, RateLimit, RateLimitRequest, RateLimitSource};
pub use message::{format_time, iot_id, ForwardMessage, MessageKind, OtaTaskStateChange};
pub use outbox::{Outbox, OutboxError, OutboxRow, OUTBOX_FILE_NAME};
pub use pg_outbox::SharedOutboxSettings;
pub use settings::{AmqpSettings, ForwarderConfig, QueueType};

use crate::clock::now_ms;
use crate::cluster::DocWrites;
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryError};
use crate::store::{Op, Store, StoreError};
use channel::{declare_on, delete_exchange_on, delete_on, inspect_on};
use groups::{Declared, RateSampler, TOMBSTONE_DOC_KIND};
pub(crate) use limits::Limiter;
use limits::{Limits, RATE_LIMIT_DOC_KIND};
use outbox::NewRow;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::{Future, IntoFuture};
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Errors of the forwarder.
#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    /// The outbox stayed full for the whole back-pressure wait; the message was not stored
    /// (refused or dropped, as the enqueue's [`OnFull`] said).
    #[error("the forwarding outbox is full; message not stored")]
    OutboxFull,
    #[error("outbox: {0}")]
    Outbox(#[from] OutboxError),
    #[error("instance {0:?} not found")]
    InstanceNotFound(String),
    #[error("consumer group {group_id:?} not found in instance {instance_id:?}")]
    GroupNotFound {
        instance_id: String,
        group_id: String,
    },
    #[error("consumer group {group_id:?} already exists in instance {instance_id:?}")]
    GroupExists {
        instance_id: String,
        group_id: String,
    },
    /// Deleting an instance that has consumer groups, without `force`.
    #[error("instance {instance_id:?} has {} consumer groups ({}); delete them first, or delete the instance with force=true (their queues and the messages in them go too)", groups.len(), groups.join(", "))]
    InstanceHasGroups {
        instance_id: String,
        groups: Vec<String>,
    },
    /// Deleting an instance while messages for it wait in the outbox.
    #[error("{messages} messages for instance {instance_id:?} still wait in the forwarding outbox; retry once they are forwarded (RabbitMQ must be reachable)")]
    InstanceOutboxBusy { instance_id: String, messages: u64 },
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("corrupt forwarder document {id}: {message}")]
    Corrupt { id: String, message: String },
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("cannot start the forwarder: {0}")]
    Spawn(String),
}

/// State of the broker connection, as `/healthz` and the group details show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AmqpStatus {
    /// No AMQP URL configured: nothing is forwarded.
    Disabled,
    Connecting,
    Connected,
    /// Lost or never established; the outbox accumulates and a reconnect is scheduled.
    Disconnected,
}

impl AmqpStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AmqpStatus::Disabled => "disabled",
            AmqpStatus::Connecting => "connecting",
            AmqpStatus::Connected => "connected",
            AmqpStatus::Disconnected => "disconnected",
        }
    }

    fn from_u8(v: u8) -> AmqpStatus {
        match v {
            1 => AmqpStatus::Connecting,
            2 => AmqpStatus::Connected,
            3 => AmqpStatus::Disconnected,
            _ => AmqpStatus::Disabled,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            AmqpStatus::Disabled => 0,
            AmqpStatus::Connecting => 1,
            AmqpStatus::Connected => 2,
            AmqpStatus::Disconnected => 3,
        }
    }
}

/// What [`Forwarder::enqueue`] does with a message the outbox has no room for, once
/// `outbox_full_wait_ms` passed. Either way the message is not stored and the enqueue returns
/// [`ForwarderError::OutboxFull`]; what differs is who still holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFull {
    /// The sender still holds it, because it was not acknowledged and must not be: a QoS 1/2
    /// post, whose PUBACK is withheld so the device sends it again. Counted as
    /// `fleetgate_forwarder_refused_total`.
    Refuse,
    /// Nobody holds it any more (QoS 0 posts, online/offline status, OTA task events): it is
    /// lost, counted as `fleetgate_forwarder_dropped_total{reason="outbox_full"}`.
    Drop,
}

/// A message handed to the outbox by [`Forwarder::enqueue`]; `.await` it for the outcome.
pub struct Enqueued<F> {
    /// The outbox had no room at the time of the call: the outcome waits for space, up to
    /// `outbox_full_wait_ms` (ingest then answers the post only once it knows).
    pub waiting: bool,
    done: F,
}

impl<F: Future> std::future::IntoFuture for Enqueued<F> {
    type Output = F::Output;
    type IntoFuture = F;

    fn into_future(self) -> F {
        self.done
    }
}

/// Extra targets for a device's data: `(product_key, device_name, owner_instance) -> instances`.
/// The owner is always a target; duplicates are ignored.
pub type RouteHook = Arc<dyn Fn(&str, &str, &str) -> Vec<String> + Send + Sync>;

/// A group to declare on a new connection.
struct GroupToDeclare {
    instance_id: String,
    group_id: String,
    exchange: String,
    queue: String,
    /// `x-message-ttl` in seconds; 0 = none.
    ttl_secs: u32,
}

/// What a new connection must do before publishing ([`Forwarder::attach_link`]).
struct LinkWork {
    groups: Vec<GroupToDeclare>,
    /// Deleted groups: `(doc id, queue)`.
    tombstones: Vec<(String, String)>,
    /// Deleted instances: `(instance id, exchange)`.
    exchanges: Vec<(String, String)>,
}

/// An instance the forwarder let go ([`Forwarder::delete_instance`]): for the caller's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRemoved {
    /// Its exchange.
    pub exchange: String,
    /// Consumer groups deleted with it (`force`), by group id.
    pub groups: Vec<String>,
    /// What happened in RabbitMQ: `deleted` (exchange and queues are gone), `pending` (the
    /// broker is not connected or failed: deleted on the next connection), or `disabled` (no
    /// AMQP URL: deleted once a broker is configured).
    pub amqp: &'static str,
}

/// The broker connection while it is up, shared with the API (group create/delete/inspect).
pub(crate) struct AmqpLink {
    pub conn: lapin::Connection,
}

struct GroupEntry {
    group: ConsumerGroup,
    /// Declared on the current connection.
    declared: bool,
    /// What was wrong with its queue at the last declare (kept across reconnects until a
    /// declare goes as asked): the status and the message the API shows.
    problem: Option<(QueueStatus, String)>,
    rate: RateSampler,
}

#[derive(Default)]
struct GroupState {
    groups: BTreeMap<(String, String), GroupEntry>,
    /// Deleted groups whose queues are still to be deleted in RabbitMQ: doc id → queue name.
    tombstones: BTreeMap<String, String>,
    /// Deleted instances whose exchanges are still to be deleted: instance id → exchange.
    exchange_tombstones: BTreeMap<String, String>,
    link: Option<Arc<AmqpLink>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The forwarder. Share it as `Arc<Forwarder>`.
pub struct Forwarder {
    config: ForwarderConfig,
    topology: Topology,
    /// Where the consumer groups, tombstones and rate-limit overrides are kept.
    store: Store,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    outbox: Option<Outbox>,
    status: AtomicU8,
    groups: Mutex<GroupState>,
    route_hook: RwLock<Option<RouteHook>>,
    /// Rate-limit overrides and the limiters per target ([`limits`]).
    limits: Mutex<Limits>,
    /// Serializes override changes, so the store's order of documents is the memory's.
    limits_admin: tokio::sync::Mutex<()>,
    /// Serializes consumer-group creates and deletes against deleting an instance, so no group
    /// is created for an instance being deleted.
    groups_admin: tokio::sync::Mutex<()>,
    /// Held by every write of this forwarder's documents from before its commit until memory
    /// follows it; in cluster mode the feed receiver holds it while it applies the other
    /// nodes' writes (`follow.rs`), so memory ends with the store's value.
    doc_writes: DocWrites,
    /// Bumped whenever an instance's exchange is deleted: the publisher then forgets which
    /// exchanges it declared (a row for a deleted instance is dropped, not re-declared).
    exchanges_deleted: AtomicU64,
    /// Wakes the publisher when a limit changed (a held-back row may go now).
    limits_changed: tokio::sync::Notify,
    /// Limits of mirrored rows per target instance (see the module docs).
    mirror_limits: Mutex<HashMap<String, Arc<Limiter>>>,
    /// Confirmed publishes per target instance (feeds the consume-rate estimate).
    published: Mutex<HashMap<String, u64>>,
    /// Queues already warned about keeping their existing arguments (warned once each).
    kept_queues: Mutex<HashSet<String>>,
    last_drop_log_ms: Arc<AtomicI64>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Cluster mode: the keeper of the `outbox` lease, stopped (and the lease released) after
    /// the publisher.
    drain_lease: Mutex<Option<(watch::Sender<bool>, JoinHandle<()>)>>,
}

/// Cluster mode's outbox: the shared table, drained by the holder of the `outbox` lease.
pub struct ClusterOutbox {
    /// The cluster's PostgreSQL database.
    pub url: crate::store::PostgresUrl,
    /// This node's id.
    pub node: u16,
    /// Lease time to live: a dead drain holder is replaced after at most this (plus a third).
    pub lease_ttl: Duration,
    /// Where the leases are taken (a reading connection of the shared store).
    pub leases: Arc<dyn crate::cluster::SharedStore>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("status", &self.status())
            .field("outbox", &self.outbox)
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// Loads the consumer groups and, when `config.url` is set, opens
    /// `{data_dir}/outbox.db` and starts the publisher and the sampler (so it must then be
    /// called inside a tokio runtime). Blocks briefly reading the store (start-up).
    pub fn open(
        config: ForwarderConfig,
        data_dir: &Path,
        store: Store,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Forwarder>, ForwarderError> {
        let outbox = match &config.url {
            Some(_) => Some(Outbox::open(
                &data_dir.join(OUTBOX_FILE_NAME),
                config.outbox_max_bytes,
                metrics.clone(),
            )?),
            None => None,
        };
        Self::build(config, outbox, store, registry, metrics)
    }

    /// Cluster mode: like [`open`](Self::open), but the outbox is the table every node shares
    /// (`pg_outbox`), and this node publishes from it only while it holds the `outbox` lease
    /// (a [`LeaseKeeper`](crate::cluster::lease::LeaseKeeper) the forwarder runs). Without an
    /// AMQP URL nothing is stored and no lease is taken.
    pub fn open_clustered(
        config: ForwarderConfig,
        cluster: ClusterOutbox,
        store: Store,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Forwarder>, ForwarderError> {
        if config.url.is_none() {
            return Self::build(config, None, store, registry, metrics);
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ForwarderError::Spawn(
                "forwarding needs a tokio runtime".into(),
            ));
        }
        let keeper = Arc::new(crate::cluster::lease::LeaseKeeper::new(
            crate::cluster::lease::OUTBOX,
            cluster.node,
            cluster.lease_ttl,
            cluster.leases,
        ));
        let outbox = pg_outbox::open(
            SharedOutboxSettings {
                url: cluster.url,
                node: cluster.node,
                term: keeper.watch(),
            },
            config.outbox_max_bytes,
            metrics.clone(),
        )?;
        let forwarder = Self::build(config, Some(outbox), store, registry, metrics)?;
        let (lease_stop, lease_stop_rx) = watch::channel(false);
        let task = tokio::spawn(keeper.run(lease_stop_rx));
        *lock(&forwarder.drain_lease) = Some((lease_stop, task));
        Ok(forwarder)
    }

    /// A forwarder with forwarding off (consumer groups still work). Blocks briefly reading the
    /// store.
    pub fn disabled(
        store: Store,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Forwarder>, ForwarderError> {
        Self::build(ForwarderConfig::default(), None, store, registry, metrics)
    }

    fn build(
        config: ForwarderConfig,
        outbox: Option<Outbox>,
        store: Store,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Forwarder>, ForwarderError> {
        let mut state = GroupState::default();
        for (id, body) in store.load_documents(GROUP_DOC_KIND)? {
            let group: ConsumerGroup =
                serde_json::from_str(&body).map_err(|e| ForwarderError::Corrupt {
                    id: id.clone(),
                    message: e.to_string(),
                })?;
            state.groups.insert(
                (group.instance_id.clone(), group.group_id.clone()),
                GroupEntry {
                    group,
                    declared: false,
                    problem: None,
                    rate: RateSampler::default(),
                },
            );
        }
        for (id, body) in store.load_documents(TOMBSTONE_DOC_KIND)? {
            state.tombstones.insert(id, body);
        }
        for (id, body) in store.load_documents(EXCHANGE_TOMBSTONE_DOC_KIND)? {
            state.exchange_tombstones.insert(id, body);
        }
        let mut overrides = HashMap::new();
        for (id, body) in store.load_documents(RATE_LIMIT_DOC_KIND)? {
            let limit: RateLimit =
                serde_json::from_str(&body).map_err(|e| ForwarderError::Corrupt {
                    id: format!("{RATE_LIMIT_DOC_KIND}/{id}"),
                    message: e.to_string(),
                })?;
            overrides.insert(id, limit);
        }
        let limits = Limits::new(config.default_rate_limit(), overrides);
        let (stop, _) = watch::channel(false);
        let forwarder = Arc::new(Forwarder {
            topology: Topology::new(config.exchange_prefix.clone()),
            status: AtomicU8::new(AmqpStatus::Disabled.to_u8()),
            config,
            store,
            registry,
            metrics,
            outbox,
            groups: Mutex::new(state),
            route_hook: RwLock::new(None),
            limits: Mutex::new(limits),
            limits_admin: tokio::sync::Mutex::new(()),
            groups_admin: tokio::sync::Mutex::new(()),
            doc_writes: DocWrites::default(),
            exchanges_deleted: AtomicU64::new(0),
            limits_changed: tokio::sync::Notify::new(),
            mirror_limits: Mutex::new(HashMap::new()),
            published: Mutex::new(HashMap::new()),
            kept_queues: Mutex::new(HashSet::new()),
            last_drop_log_ms: Arc::new(AtomicI64::new(0)),
            stop,
            tasks: Mutex::new(Vec::new()),
            drain_lease: Mutex::new(None),
        });
        match (&forwarder.outbox, &forwarder.config.url) {
            (Some(outbox), Some(url)) => {
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(ForwarderError::Spawn(
                        "forwarding needs a tokio runtime".into(),
                    ));
                }
                forwarder.set_status(AmqpStatus::Connecting);
                let publisher = tokio::spawn(publisher::run(
                    forwarder.clone(),
                    outbox.clone(),
                    url.expose().to_owned(),
                    forwarder.stop.subscribe(),
                ));
                let sampler = tokio::spawn(publisher::sample(
                    forwarder.clone(),
                    forwarder.stop.subscribe(),
                ));
                lock(&forwarder.tasks).extend([publisher, sampler]);
                tracing::info!(
                    groups = lock(&forwarder.groups).groups.len(),
                    outbox_messages = outbox.len(),
                    "AMQP forwarding on"
                );
            }
            _ => tracing::info!("AMQP forwarding off (no AMQP URL); consumer groups are kept"),
        }
        Ok(forwarder)
    }

    /// Forwarding is on (an AMQP URL is configured).
    pub fn enabled(&self) -> bool {
        self.outbox.is_some()
    }

    pub fn status(&self) -> AmqpStatus {
        AmqpStatus::from_u8(self.status.load(Ordering::Relaxed))
    }

    fn set_status(&self, s: AmqpStatus) {
        self.status.store(s.to_u8(), Ordering::Relaxed);
        self.metrics
            .forwarder_connected
            .set(i64::from(s == AmqpStatus::Connected));
    }

    pub fn config(&self) -> &ForwarderConfig {
        &self.config
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The outbox (none while forwarding is off).
    pub fn outbox(&self) -> Option<&Outbox> {
        self.outbox.as_ref()
    }

    /// `/healthz` fields: `{"amqp": status, "amqp_outbox_messages": n, "amqp_outbox_bytes": b}`.
    pub fn health(&self) -> serde_json::Value {
        let mut v = serde_json::json!({ "amqp": self.status().as_str() });
        if let Some(o) = &self.outbox {
            v["amqp_outbox_messages"] = o.len().into();
            v["amqp_outbox_bytes"] = o.bytes().into();
            if o.is_shared() {
                // Cluster mode: the counts above are this node's rows in the shared table.
                v["amqp_outbox_shared"] = true.into();
                v["amqp_outbox_drain"] = o.drain_term().borrow().is_some().into();
            }
        }
        v
    }

    /// Stops the publisher (waiting a few seconds for confirms in flight), closes the broker
    /// connection and commits the outbox. Undelivered messages stay for the next start.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let tasks: Vec<_> = lock(&self.tasks).drain(..).collect();
        for t in tasks {
            let _ = t.await;
        }
        if let Some(o) = &self.outbox {
            o.flush().await;
        }
        // After the publisher's last deletes: the lease is released, and the next holder
        // starts from what is left.
        let lease = lock(&self.drain_lease).take();
        if let Some((stop, task)) = lease {
            let _ = stop.send(true);
            let _ = task.await;
        }
        if self.enabled() {
            self.set_status(AmqpStatus::Disconnected);
        }
    }
}
