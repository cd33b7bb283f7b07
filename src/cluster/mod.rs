//! Cluster mode: several gateway nodes serving one fleet, on existing engines only —
//! PostgreSQL as the system of record (the store's second backend), NATS (core) between the
//! nodes, HAProxy in front (docs/DESIGN.md §8, docs/CLUSTER.md).
//!
//! Every node runs the whole gateway and keeps the whole registry in memory. What one node
//! changes, the others learn from the **change feed** ([`feed`]): each transaction a node
//! commits that concerns the others becomes one numbered message on `fg.{name}.feed`. A node
//! that misses a message (a gap in an origin's numbers, a NATS reconnect, a heartbeat showing
//! it is behind) reloads the registry from PostgreSQL instead of serving stale state.
//!
//! - **Sessions** carry epochs ([`epoch`]): when a device connects to node B while node A
//!   holds it, B's session has the higher epoch, A hears of it on the feed and ends its own
//!   (a takeover across nodes); a late message about an older session never ends a newer one.
//! - **API writes settle** ([`Cluster::settle`]): a write answers only once every live node
//!   has applied it (or `settle_timeout_ms` passed), so a device created through node 1 can
//!   connect through node 3 right after the 201, and a disabled one cannot.
//! - **Membership** ([`members`]): heartbeats on `fg.{name}.hb`; a node not heard from for
//!   `node_timeout_ms` is gone and its devices go offline everywhere (they reconnect through
//!   HAProxy to the others). A node cut from NATS that long ends its own sessions.
//! - **Documents** ([`follow`]): a module that keeps store documents in memory (the
//!   forwarder's consumer groups and rate limits) registers a [`DocFollower`]
//!   ([`Cluster::follow_docs`]); the receiver re-reads the documents other nodes write and
//!   hands them over, and reloads every follower after a resynchronisation.
//! - **Downlinks** to a device held by another node ([`Cluster::deliver`]) go to that node's
//!   subject `fg.{name}.node.{id}`; the registry's sessions are the directory. "No responders"
//!   or "not here" means the device is offline.
//!
//! Subjects are prefixed with the cluster's name so several clusters (or test runs) can share
//! one NATS server.

mod delivery;
pub mod engines;
pub mod epoch;
pub mod feed;
pub mod follow;
pub mod lease;
pub mod members;
mod metrics;
mod receiver;
pub mod settings;
mod settle;

pub use delivery::{CommandHandler, Delivered};
pub use follow::{DocFollower, DocWrite, DocWrites, Document};
pub use metrics::ClusterMetrics;
pub use settings::ClusterSettings;
pub(crate) use settle::SettleRequest;

use crate::broker::Downlink;
use crate::clock::now_ms;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::{InstanceRecord, ProductRecord, Snapshot, Store, StoreError, StoredDevice};
use feed::{FeedMessage, FeedWriter};
use futures_util::future::BoxFuture;
use members::{Heartbeat, Member, Members};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Errors of cluster mode.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("NATS: {0}")]
    Nats(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Reads of the shared store that cluster mode needs besides the writer's: what another node
/// changed, and whole snapshots to resynchronise. Implemented by the PostgreSQL backend's
/// reader (its own connection, so reads never wait behind the writer's transactions).
pub trait SharedStore: Send + Sync + 'static {
    /// Everything, in one consistent read, with the feed position of every node.
    fn snapshot(&self) -> BoxFuture<'_, Result<Snapshot, StoreError>>;
    /// The instances with these ids that exist.
    fn instances(&self, ids: Vec<String>)
        -> BoxFuture<'_, Result<Vec<InstanceRecord>, StoreError>>;
    /// The products with these keys that exist.
    fn products(&self, keys: Vec<String>) -> BoxFuture<'_, Result<Vec<ProductRecord>, StoreError>>;
    /// The devices with these keys that exist (with versions and sessions).
    fn devices(
        &self,
        keys: Vec<(String, String)>,
    ) -> BoxFuture<'_, Result<Vec<StoredDevice>, StoreError>>;
    /// The documents with these `(kind, id)` keys that exist ([`Op::PutDoc`](crate::store::Op::PutDoc)).
    fn documents(
        &self,
        keys: Vec<(String, String)>,
    ) -> BoxFuture<'_, Result<Vec<Document>, StoreError>>;
    /// Every document of these kinds.
    fn all_documents(&self, kinds: Vec<String>)
        -> BoxFuture<'_, Result<Vec<Document>, StoreError>>;
    /// The last feed message of `node` the store has committed (0: none).
    fn feed_position(&self, node: u16) -> BoxFuture<'_, Result<u64, StoreError>>;
    /// Takes lease `name` for `node` if it is free or expired: its new epoch, or `None`
    /// when another node holds it.
    fn lease_acquire(
        &self,
        name: &'static str,
        node: u16,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Option<u64>, StoreError>>;
    /// Extends `node`'s term `epoch` of lease `name`; `false` when it is no longer its.
    fn lease_renew(
        &self,
        name: &'static str,
        node: u16,
        epoch: u64,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<bool, StoreError>>;
    /// Ends `node`'s term `epoch` of lease `name` now.
    fn lease_release(
        &self,
        name: &'static str,
        node: u16,
        epoch: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// NATS subjects of one cluster.
#[derive(Debug, Clone)]
pub(crate) struct Subjects {
    pub feed: String,
    pub heartbeat: String,
    pub settle: String,
    /// Device reports for the node that drives the engines (only it subscribes).
    pub engines: String,
    prefix: String,
}

impl Subjects {
    fn new(name: &str) -> Subjects {
        let prefix = format!("fg.{name}");
        Subjects {
            feed: format!("{prefix}.feed"),
            heartbeat: format!("{prefix}.hb"),
            settle: format!("{prefix}.settle"),
            engines: format!("{prefix}.engines"),
            prefix,
        }
    }

    pub fn node(&self, node: u16) -> String {
        format!("{}.node.{node}", self.prefix)
    }
}

/// This node's part of the cluster.
pub struct Cluster {
    settings: ClusterSettings,
    node: u16,
    boot_ms: i64,
    subjects: Subjects,
    client: async_nats::Client,
    shared: Arc<dyn SharedStore>,
    metrics: Arc<Metrics>,
    /// The last feed message the store committed (set on the writer thread).
    committed: Arc<AtomicU64>,
    /// The last feed message published on NATS.
    published: watch::Sender<u64>,
    members: Mutex<Members>,
    /// Connected to NATS and in sync with the store.
    ready: AtomicBool,
    /// Since when NATS is unreachable (0: it is not).
    cut_since_ms: AtomicI64,
    addresses: OnceLock<(SocketAddr, SocketAddr)>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    attached: OnceLock<Attached>,
    /// This node holds the engines' lease and its engine is active (announced in heartbeats).
    engines_held: AtomicBool,
    /// This node's keeper of the engines' lease ([`Cluster::engines_lease`]): the receiver
    /// makes it try at once when the holder announces it let the lease go.
    engines_keeper: OnceLock<Arc<lease::LeaseKeeper>>,
    /// While this node holds the engines' lease: where the feed receiver hands the other
    /// nodes' connects and version reports to the engine (see [`engines`]).
    engine_reports: Mutex<Option<mpsc::UnboundedSender<crate::ota::DeviceReport>>>,
    commands: OnceLock<Arc<dyn CommandHandler>>,
    /// Followers registered with [`Cluster::follow_docs`], on their way to the receiver.
    follow: mpsc::UnboundedSender<Arc<dyn DocFollower>>,
    /// The receiving end, until [`Cluster::attach`] hands it to the receiver.
    followers: Mutex<Option<mpsc::UnboundedReceiver<Arc<dyn DocFollower>>>>,
}

/// What the cluster acts on once the node's registry and broker exist.
struct Attached {
    registry: Arc<Registry>,
    downlink: Downlink,
}

/// Subscriptions made before the registry is loaded, so nothing published meanwhile is lost.
pub struct Pending {
    feed: async_nats::Subscriber,
    heartbeat: async_nats::Subscriber,
    settle: async_nats::Subscriber,
    node: async_nats::Subscriber,
    events: mpsc::UnboundedReceiver<async_nats::Event>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node)
            .field("name", &self.settings.name)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Joins: attaches the change feed to `store` (numbering on from the store's position),
    /// ends whatever sessions this node held before it (re)started, connects to NATS and
    /// subscribes. The registry is loaded after this (so no feed message is missed) and then
    /// handed over with [`Cluster::attach`].
    pub async fn join(
        settings: ClusterSettings,
        store: &Store,
        shared: Arc<dyn SharedStore>,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Cluster>, Pending), ClusterError> {
        let node = settings.node_id;
        let (client, subjects, pending) = connect(&settings).await?;

        let last = shared.feed_position(node).await?;
        let committed = Arc::new(AtomicU64::new(last));
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        store.set_feed(Box::new(FeedWriter::new(
            node,
            last,
            committed.clone(),
            out_tx,
        )));
        let (published, _) = watch::channel(last);
        let (follow, followers) = mpsc::unbounded_channel();
        let boot_ms = now_ms();
        let cluster = Arc::new(Cluster {
            settings,
            node,
            boot_ms,
            subjects,
            client,
            shared,
            metrics,
            committed,
            published,
            members: Mutex::new(Members::default()),
            ready: AtomicBool::new(false),
            cut_since_ms: AtomicI64::new(0),
            addresses: OnceLock::new(),
            tasks: Mutex::new(Vec::new()),
            attached: OnceLock::new(),
            engines_held: AtomicBool::new(false),
            engines_keeper: OnceLock::new(),
            engine_reports: Mutex::new(None),
            commands: OnceLock::new(),
            follow,
            followers: Mutex::new(Some(followers)),
        });
        let publisher = tokio::spawn(cluster.clone().publish(out_rx));
        cluster.track(publisher);
        // Sessions of this node's earlier incarnation ended with it (a crash leaves them in
        // the store); announced on the feed like any change.
        store
            .submit(vec![crate::store::Op::ReleaseNode {
                node,
                before_ms: boot_ms,
                at_ms: boot_ms,
            }])
            .await?;
        tracing::info!(
            node,
            cluster = %cluster.settings.name,
            feed_position = last,
            "joined the cluster"
        );
        Ok((cluster, pending))
    }

    /// Starts applying the other nodes' changes to `registry` (loaded from `snapshot`'s feed
    /// cuts on), announcing this node, and serving deliveries to its sessions.
    pub fn attach(
        self: &Arc<Self>,
        pending: Pending,
        registry: Arc<Registry>,
        downlink: Downlink,
        feed_cuts: std::collections::BTreeMap<u16, u64>,
        mqtt: SocketAddr,
        http: SocketAddr,
    ) {
        let _ = self.addresses.set((mqtt, http));
        let _ = self.attached.set(Attached {
            registry: registry.clone(),
            downlink: downlink.clone(),
        });
        let Pending {
            feed,
            heartbeat,
            settle,
            node,
            events,
        } = pending;
        let followers = self
            .followers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let receiver = receiver::Receiver::new(
            self.clone(),
            registry.clone(),
            downlink.clone(),
            feed_cuts,
            followers,
        );
        self.ready.store(true, Ordering::Release);
        let tasks = [
            tokio::spawn(receiver.run(feed, settle, heartbeat, events)),
            tokio::spawn(self.clone().announce()),
            tokio::spawn(self.clone().serve_deliveries(node, registry, downlink)),
        ];
        for t in tasks {
            self.track(t);
        }
    }

    /// Keeps `follower`'s documents current with what other nodes change (see [`follow`]): the
    /// receiver first hands it every document of its kinds (`reloaded`), then each change
    /// another node makes (`changed`), and everything again after each resynchronisation.
    /// Registering before or after [`Cluster::attach`] is the same: the first reload is read
    /// when the receiver takes the follower on, so nothing applied before then is missed.
    pub fn follow_docs(&self, follower: Arc<dyn DocFollower>) {
        if self.follow.send(follower).is_err() {
            tracing::warn!("the feed receiver is gone; a document follower was not registered");
        }
    }

    fn track(&self, task: JoinHandle<()>) {
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(task);
    }

    pub fn node(&self) -> u16 {
        self.node
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// Connected to NATS and in sync with the store (readiness).
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// This node as it announces itself.
    pub fn this_node(&self) -> Heartbeat {
        let (mqtt, http) = self
            .addresses
            .get()
            .map(|(m, h)| (m.to_string(), h.to_string()))
            .unwrap_or_default();
        Heartbeat {
            node: self.node,
            boot_ms: self.boot_ms,
            seq: *self.published.borrow(),
            mqtt,
            http,
            engines: self.engines_held.load(Ordering::Acquire),
        }
    }

    /// The other nodes heard from.
    pub fn members(&self) -> Vec<Member> {
        self.members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .list()
    }

    /// Publishes the feed: messages from the store's writer, in order, split to fit NATS.
    async fn publish(self: Arc<Self>, mut out: mpsc::UnboundedReceiver<FeedMessage>) {
        let max = self.client.server_info().max_payload.max(64 * 1024);
        while let Some(message) = out.recv().await {
            let seq = message.seq;
            for part in feed::split(message, max) {
                let bytes = feed::encode(&part);
                self.metrics.cluster.feed_bytes.inc_by(bytes.len() as u64);
                if let Err(error) = self
                    .client
                    .publish(self.subjects.feed.clone(), bytes.into())
                    .await
                {
                    // Receivers see the gap and resynchronise.
                    tracing::warn!(%error, seq, "cannot publish a feed message");
                }
            }
            self.metrics.cluster.feed_published.inc();
            self.published.send_replace(seq);
        }
    }

    /// Heartbeats, and the watch over other nodes and over this node's link to NATS.
    async fn announce(self: Arc<Self>) {
        let period = Duration::from_millis(self.settings.heartbeat_ms);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.beat().await;
            self.check_link();
        }
    }

    /// Publishes this node's heartbeat.
    async fn beat(&self) {
        if let Ok(body) = serde_json::to_vec(&self.this_node()) {
            let _ = self
                .client
                .publish(self.subjects.heartbeat.clone(), body.into())
                .await;
        }
    }

    /// Cut from NATS for `node_timeout_ms`: the others count this node as gone and release its
    /// devices, so it must not keep sessions it can no longer coordinate.
    fn check_link(&self) {
        let since = self.cut_since_ms.load(Ordering::Acquire);
        if since == 0 || now_ms() - since < self.settings.node_timeout_ms as i64 {
            return;
        }
        if self.ready.swap(false, Ordering::AcqRel) {
            let ended = self.attached.get().map_or(0, |a| a.downlink.kick_all());
            tracing::error!(
                sessions = ended,
                "cut from NATS for longer than the node timeout: sessions ended until it is back"
            );
        }
    }

    /// Stops the cluster's tasks once the feed's last committed message is published (or
    /// after 2 s).
    pub async fn shutdown(&self) {
        let committed = self.committed.load(Ordering::Acquire);
        let mut published = self.published.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            published.wait_for(|&p| p >= committed),
        )
        .await;
        let _ = self.client.flush().await;
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for t in tasks {
            t.abort();
        }
    }
}

/// Connects to NATS as node `settings.node_id` and subscribes to the cluster's subjects
/// (before the registry is loaded, so nothing published meanwhile is lost).
async fn connect(
    settings: &ClusterSettings,
) -> Result<(async_nats::Client, Subjects, Pending), ClusterError> {
    let node = settings.node_id;
    let url = settings
        .nats_url
        .as_ref()
        .map(|u| u.expose().to_owned())
        .unwrap_or_default();
    let (event_tx, events) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::new()
        .name(format!("fleetgate-{}-{node}", settings.name))
        .event_callback(move |event| {
            let event_tx = event_tx.clone();
            async move {
                let _ = event_tx.send(event);
            }
        })
        .connection_timeout(Duration::from_secs(5))
        .connect(url.as_str())
        .await
        .map_err(|e| ClusterError::Connect {
            url: redact(&url),
            message: e.to_string(),
        })?;
    let subjects = Subjects::new(&settings.name);
    let subscribe = |subject: String| {
        let client = client.clone();
        async move {
            client
                .subscribe(subject)
                .await
                .map_err(|e| ClusterError::Nats(e.to_string()))
        }
    };
    let pending = Pending {
        feed: subscribe(subjects.feed.clone()).await?,
        heartbeat: subscribe(subjects.heartbeat.clone()).await?,
        settle: subscribe(subjects.settle.clone()).await?,
        node: subscribe(subjects.node(node)).await?,
        events,
    };
    client
        .flush()
        .await
        .map_err(|e| ClusterError::Nats(e.to_string()))?;
    Ok((client, subjects, pending))
}

/// A URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((auth, host)) => {
                let user = auth.split(':').next().unwrap_or("");
                format!("{scheme}://{user}:***@{host}")
            }
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}
