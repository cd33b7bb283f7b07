//! The start steps of [`super::Application::build`], one function each with typed inputs and
//! outputs, in the order `build` calls them, and the small types they hand to each other.

use super::Parts;
use crate::admission::{self, BudgetSettings, Budgets, Gate, GateLimits};
use crate::api::{self, ApiState, TokenSet};
use crate::broker::{Broker, BrokerConfig, BrokerHandle, DeviceKey, Downlink, TlsConfig};
use crate::clock::Clock;
use crate::cluster::engines::{ClusterPusher, Engines, EnginesRelay};
use crate::cluster::epoch::EpochClock;
use crate::cluster::lease::LeaseKeeper;
use crate::cluster::{Cluster, DocFollower, Pending};
use crate::command::properties::PropertiesReaper;
use crate::command::OfflineReaper;
use crate::command::{Commands, LatestProperties};
use crate::config::Settings;
use crate::console::session::Sessions as ConsoleSessions;
use crate::export::{DeviceRevokedHook, ExportService, Start as ExportStart};
use crate::forwarder::{AmqpSettings, ClusterOutbox, Forwarder, ForwarderConfig, RateLimit};
use crate::ingest::Ingest;
use crate::listen;
use crate::metrics::{Listener, Metrics};
use crate::migration::{Hooks as MigrationHooks, MigrationEngine};
use crate::ota::firmware::Backing;
use crate::ota::{EngineConfig, FirmwareRepo, OtaEngine};
use crate::registry::{DeviceChange, DeviceObserver, ObserverFuture, Registry, RegistryLimits};
use crate::store::{PostgresExports, PostgresFirmware, PostgresReader, Store, FIRMWARE_ORPHAN_AGE};
use anyhow::Context;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// What most start steps use, once the registry is loaded.
#[derive(Clone, Copy)]
pub(super) struct Core<'a> {
    pub(super) settings: &'a Settings,
    pub(super) store: &'a Store,
    pub(super) registry: &'a Arc<Registry>,
    pub(super) metrics: &'a Arc<Metrics>,
}

impl<'a> Core<'a> {
    pub(super) fn new(
        settings: &'a Settings,
        store: &'a Store,
        registry: &'a Arc<Registry>,
        metrics: &'a Arc<Metrics>,
    ) -> Self {
        Core {
            settings,
            store,
            registry,
            metrics,
        }
    }
}

/// The listeners, bound before anything else.
pub(super) struct Listeners {
    pub(super) http: TcpListener,
    pub(super) mqtt: TcpListener,
}

/// Cluster mode: this node joined the cluster; it is attached once the registry and the MQTT
/// listeners run.
pub(super) struct Joined {
    pub(super) cluster: Arc<Cluster>,
    pub(super) pending: Pending,
    /// The engines' lease: its holder drives the OTA and migration engines.
    pub(super) engines_lease: Arc<LeaseKeeper>,
}

/// Which feed messages (by node) the registry's snapshot already contains (cluster mode).
pub(super) type FeedCuts = BTreeMap<u16, u64>;

/// Cluster mode: the attached cluster and the engines' lease keeper.
pub(super) struct Attached {
    pub(super) cluster: Arc<Cluster>,
    pub(super) engines_lease: Arc<LeaseKeeper>,
}

/// Cluster mode: the engines' lease keeper and the task that follows it; the sender stops both
/// (the keeper releases the lease). No tasks on a single node.
pub(super) struct EnginesLease {
    pub(super) stop: watch::Sender<bool>,
    pub(super) tasks: Vec<JoinHandle<()>>,
}

/// The HTTP server task and what stops it.
pub(super) struct HttpServer {
    pub(super) addr: SocketAddr,
    pub(super) stop: oneshot::Sender<()>,
    pub(super) task: JoinHandle<()>,
}

/// Binds the HTTP and MQTT listeners. A taken built-in default port falls back to the next
/// free one ([`crate::listen`]).
pub(super) fn bind_listeners(settings: &Settings) -> anyhow::Result<Listeners> {
    let http = listen::bind_listener(
        listen::HTTP,
        settings.http.listen,
        settings.http.listen_is_default,
        api::serve::bind,
    )?;
    let mqtt = listen::bind_listener(
        listen::MQTT,
        settings.mqtt.listen,
        settings.mqtt.listen_is_default,
        crate::broker::bind_listener,
    )?;
    Ok(Listeners { http, mqtt })
}

/// `api.tokens` are valid (their roles exist); checked before anything is created.
pub(super) fn check_api_tokens(settings: &Settings) -> anyhow::Result<()> {
    settings
        .api
        .tokens
        .iter()
        .try_fold(TokenSet::default(), |set, t| {
            set.with_token(t.token.expose(), &t.role)
        })
        .context("invalid api.tokens")?;
    Ok(())
}

pub(super) fn create_data_dir(settings: &Settings) -> anyhow::Result<()> {
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("cannot create data dir {}", settings.data_dir.display()))
}

/// The registry store: SQLite in the data dir, or PostgreSQL with `[store] url`.
pub(super) fn open_store(settings: &Settings, metrics: &Arc<Metrics>) -> anyhow::Result<Store> {
    let location = settings.store.location(&settings.data_dir);
    Store::open_with(&location, &settings.store, metrics.clone())
        .with_context(|| format!("cannot open the store ({location})"))
}

/// Cluster mode (a NATS URL and a PostgreSQL store): joins the others. The registry snapshot
/// taken next says which feed messages it already contains.
pub(super) async fn join_cluster(
    settings: &Settings,
    store: &Store,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<Joined>> {
    let (Some(_), Some(url)) = (&settings.cluster.nats_url, &settings.store.url) else {
        return Ok(None);
    };
    let reader = PostgresReader::connect(url)
        .await
        .context("cannot open a reading connection to PostgreSQL")?;
    let (cluster, pending) = Cluster::join(
        settings.cluster.clone(),
        store,
        Arc::new(reader),
        metrics.clone(),
    )
    .await
    .context("cannot join the cluster")?;
    let engines_lease = cluster.engines_lease();
    Ok(Some(Joined {
        cluster,
        pending,
        engines_lease,
    }))
}

/// The registry, rebuilt from the store's snapshot, and the feed positions that snapshot
/// contains.
pub(super) fn load_registry(
    settings: &Settings,
    store: &Store,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Arc<Registry>, FeedCuts)> {
    let snapshot = store.load().context("cannot load the registry")?;
    let feed_cuts = snapshot.feed_cuts.clone();
    let registry = Registry::from_snapshot(
        store.clone(),
        metrics.clone(),
        RegistryLimits {
            max_modules_per_device: settings.mqtt.max_modules_per_device,
        },
        Arc::new(EpochClock::new(settings.cluster.node_id)),
        snapshot,
    )
    .context("cannot load the registry")?;
    Ok((registry, feed_cuts))
}

/// The firmware repository; download links default to the bound HTTP address. Cluster mode:
/// the bytes of record and the download-link key are the cluster's, in PostgreSQL (this node's
/// blob directory caches them); unreferenced bytes older than an hour are swept.
pub(super) async fn open_firmware(
    core: Core<'_>,
    http_addr: SocketAddr,
    joined: Option<&Joined>,
) -> anyhow::Result<Arc<FirmwareRepo>> {
    let settings = core.settings;
    let public_url = settings
        .http
        .public_url
        .clone()
        .unwrap_or_else(|| default_public_url(http_addr));
    let backing = match (joined, &settings.store.url) {
        (Some(_), Some(url)) => {
            let shared = PostgresFirmware::connect(url)
                .await
                .context("cannot open a firmware connection to PostgreSQL")?;
            let key = shared
                .download_key()
                .await
                .context("cannot read the cluster's download-link key")?;
            match shared.sweep(FIRMWARE_ORPHAN_AGE).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(blobs = n, "unreferenced shared firmware removed"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot sweep unreferenced shared firmware")
                }
            }
            Backing::Shared {
                firmware: Arc::new(shared),
                key,
            }
        }
        _ => Backing::Local,
    };
    FirmwareRepo::open_with(
        &settings.data_dir,
        core.store.clone(),
        public_url,
        settings.ota.max_firmware_bytes,
        backing,
    )
    .context("cannot open the firmware repository")
}

/// What the forwarder runs with: `[amqp]` with its exchange prefix resolved — the configured
/// one, else this installation's own (chosen on first start, kept in the store).
pub(super) fn forwarder_config(
    amqp: &AmqpSettings,
    store: &Store,
) -> anyhow::Result<ForwarderConfig> {
    let exchange_prefix = crate::installation::exchange_prefix(store, &amqp.exchange_prefix)
        .context("cannot read this installation's AMQP exchange prefix")?;
    if amqp.url.is_some() && exchange_prefix == crate::installation::SHARED_PREFIX {
        tracing::warn!(
            prefix = crate::installation::SHARED_PREFIX,
            "amqp.exchange_prefix is the old shared default: another gateway on the same RabbitMQ with it feeds this one's consumer groups and the other way round; set a prefix of this installation's own (docs/OPERATIONS.md, \"AMQP exchange prefix\")"
        );
    }
    ForwarderConfig::new(AmqpSettings {
        exchange_prefix,
        ..amqp.clone()
    })
    .context("invalid amqp settings")
}

/// The forwarder. Always built: consumer groups are managed (and persisted) with forwarding off
/// too. In cluster mode the outbox is the shared table, drained by the `outbox` lease's holder.
pub(super) async fn open_forwarder(
    core: Core<'_>,
    joined: Option<&Joined>,
) -> anyhow::Result<Arc<Forwarder>> {
    let settings = core.settings;
    let config = forwarder_config(&settings.amqp, core.store)?;
    let forwarder = match (joined, &settings.store.url) {
        (Some(_), Some(url)) => {
            let leases = PostgresReader::connect(url)
                .await
                .context("cannot open a lease connection to PostgreSQL")?;
            Forwarder::open_clustered(
                config,
                ClusterOutbox {
                    url: url.clone(),
                    node: settings.cluster.node_id,
                    lease_ttl: Duration::from_millis(settings.cluster.lease_ttl_ms),
                    leases: Arc::new(leases),
                },
                core.store.clone(),
                core.registry.clone(),
                core.metrics.clone(),
            )
        }
        _ => Forwarder::open(
            config,
            &settings.data_dir,
            core.store.clone(),
            core.registry.clone(),
            core.metrics.clone(),
        ),
    };
    forwarder.context("cannot start the AMQP forwarder")
}

/// Cluster mode: the forwarder follows the consumer groups, rate-limit overrides and tombstones
/// written through the other nodes. Registered before the cluster is attached: the receiver
/// hands it every such document when it starts, then the changes.
pub(super) fn follow_forwarder_docs(joined: Option<&Joined>, forwarder: &Arc<Forwarder>) {
    if let Some(joined) = joined {
        joined.cluster.follow_docs(forwarder.doc_follower());
    }
}

/// The console's sessions. Cluster mode: sealed with the cluster's key (a cookie from one node
/// opens on all), and logouts are `console.revoked` documents every node follows; registered
/// before the cluster is attached, like the forwarder's documents.
pub(super) async fn console_sessions(
    core: Core<'_>,
    joined: Option<&Joined>,
) -> anyhow::Result<Arc<ConsoleSessions>> {
    let (Some(joined), Some(url)) = (joined, &core.settings.store.url) else {
        return Ok(Arc::default());
    };
    let shared = PostgresFirmware::connect(url)
        .await
        .context("cannot open a connection to PostgreSQL for the console's key")?;
    let key = shared
        .cluster_secret(crate::console::session::KEY_NAME)
        .await
        .context("cannot read the cluster's console session key")?;
    let sessions = Arc::new(ConsoleSessions::with_key(&key));
    // Before the node serves: a cookie logged out before this start is refused at once (the
    // feed's receiver reloads the documents again when it takes the follower on).
    let revoked = core
        .store
        .load_documents(crate::console::session::REVOKED_DOC)
        .context("cannot load the console's revoked sessions")?;
    sessions.reloaded(crate::console::session::REVOKED_DOC, &revoked);
    sessions.share(core.store.clone(), joined.cluster.clone());
    joined.cluster.follow_docs(sessions.clone());
    Ok(sessions)
}

/// The broker with its router thread running; it accepts once ingest is ready
/// ([`Broker::start_on`]).
pub(super) fn start_router(core: Core<'_>, budgets: &Budgets) -> anyhow::Result<Broker> {
    let mqtt = &core.settings.mqtt;
    let config = BrokerConfig {
        listen: mqtt.listen,
        tls: mqtt.tls.as_ref().map(|t| TlsConfig {
            listen: t.listen,
            cert_path: t.cert.clone(),
            key_path: t.key.clone(),
        }),
        max_connections: mqtt.max_connections,
        connect_timeout: Duration::from_secs(mqtt.connect_timeout_secs),
        max_payload_size: mqtt.max_payload_bytes,
        epochs: core.registry.epochs().clone(),
        max_subscriptions_per_device: mqtt.max_subscriptions_per_device,
        connect_timestamp_window: mqtt.connect_timestamp_window(),
        max_sockets: budgets.mqtt_sockets,
        max_unauthenticated_per_ip: budgets.mqtt_per_ip,
        pressure_unauthenticated: budgets.mqtt_pressure,
        connect_timeout_under_pressure: Duration::from_secs(
            mqtt.connect_timeout_under_pressure_secs,
        ),
        proxy: mqtt.proxy_policy(),
    };
    Broker::new(config, core.metrics.clone()).context("cannot start the MQTT router")
}

/// The OTA engine, jobs and tasks loaded, its task state changes forwarded to consumer groups
/// (no-op with forwarding off). Single node: it pushes through the broker and runs. Cluster
/// mode: it starts in standby, relaying reports; the holder of the engines' lease activates it
/// ([`run_engines_lease`]).
pub(super) fn open_ota(
    core: Core<'_>,
    firmware: &Arc<FirmwareRepo>,
    forwarder: &Arc<Forwarder>,
    downlink: &Downlink,
    clock: &Clock,
    joined: Option<&Joined>,
) -> anyhow::Result<OtaEngine> {
    let settings = &core.settings.ota;
    let config = EngineConfig {
        connect_push_delay_ms: settings.connect_push_delay_ms as i64,
        download_url_ttl: Duration::from_secs(settings.download_url_ttl_secs),
        progress_flush_ms: settings.progress_flush_ms as i64,
        ..EngineConfig::default()
    };
    let registry = core.registry;
    let ota = match joined {
        Some(joined) => OtaEngine::open_standby(
            registry.clone(),
            core.store.fenced(joined.engines_lease.fence()),
            firmware.clone(),
            Arc::new(ClusterPusher::new(joined.cluster.clone(), registry.clone())),
            clock.clone(),
            config,
            core.metrics.clone(),
            Arc::new(EnginesRelay::new(joined.cluster.clone())),
        ),
        None => OtaEngine::open(
            registry.clone(),
            core.store.clone(),
            firmware.clone(),
            Arc::new(downlink.clone()),
            clock.clone(),
            config,
            core.metrics.clone(),
        )
        .context("cannot load the OTA jobs")?,
    };
    ota.set_event_sink(forwarder.ota_event_sink());
    if joined.is_none() {
        ota.start();
    }
    Ok(ota)
}

/// Ends the MQTT session of a device the API or an import disables, re-keys, moves or deletes
/// (and of a device a migration moves).
pub(super) fn revoke_session_hook(downlink: &Downlink) -> DeviceRevokedHook {
    let downlink = downlink.clone();
    Arc::new(move |pk: &str, dn: &str| {
        downlink.kick(&DeviceKey {
            product_key: pk.to_owned(),
            device_name: dn.to_owned(),
        });
    })
}

/// The migration engine, before ingest starts: the data-sync routes must be in place for the
/// first message. Its devices are kicked through `kick`; its data-sync limits and routes go
/// into the forwarder. Single node: it runs. Cluster mode: it starts as a mirror of the tasks
/// (its writes fenced by the engines' lease); the lease's holder drives it
/// ([`run_engines_lease`]).
pub(super) fn start_migration(
    core: Core<'_>,
    forwarder: &Arc<Forwarder>,
    kick: &DeviceRevokedHook,
    clock: Clock,
    joined: Option<&Joined>,
) -> anyhow::Result<Arc<MigrationEngine>> {
    let set_rate_limit = {
        let forwarder = forwarder.clone();
        Arc::new(move |instance_id: &str, bytes_per_sec: Option<u64>| {
            let limit = bytes_per_sec.map(|b| RateLimit {
                msgs_per_sec: None,
                // 10,240 MB/s does not fit governor's u32; that much is unlimited in practice.
                bytes_per_sec: std::num::NonZeroU32::new(u32::try_from(b).unwrap_or(u32::MAX)),
            });
            // Only the mirrored copies (data sync) are limited, not the data of devices the
            // target already owns.
            forwarder.set_mirror_rate_limit(instance_id, limit);
        })
    };
    let hooks = MigrationHooks {
        kick: kick.clone(),
        set_rate_limit,
    };
    let (registry, metrics, config) = (
        core.registry.clone(),
        core.metrics.clone(),
        core.settings.migration,
    );
    let migration = match joined {
        Some(joined) => MigrationEngine::standby(
            registry,
            core.store.fenced(joined.engines_lease.fence()),
            metrics,
            config,
            hooks,
            clock,
        ),
        None => MigrationEngine::start(registry, core.store.clone(), metrics, config, hooks, clock),
    }
    .context("cannot start the migration engine")?;
    // Weak: the engine's hooks hold the forwarder; no reference cycle.
    let engine = Arc::downgrade(&migration);
    forwarder.set_route_hook(Some(Arc::new(move |pk: &str, dn: &str, owner: &str| {
        engine
            .upgrade()
            .map(|e| e.extra_targets(pk, dn, owner))
            .unwrap_or_default()
    })));
    // Cluster mode: the mirror follows the holder's migration documents from the change feed.
    if let Some(joined) = joined {
        joined
            .cluster
            .follow_docs(Arc::new(MigrationMirror(migration.clone())));
    }
    Ok(migration)
}

/// Cluster mode: the migration engine's mirror of the documents the engines' lease holder
/// writes, as a follower of the change feed (the engine ignores it while it drives).
struct MigrationMirror(Arc<MigrationEngine>);

impl DocFollower for MigrationMirror {
    fn kinds(&self) -> Vec<&'static str> {
        crate::migration::MIRRORED_KINDS.to_vec()
    }

    fn changed(&self, kind: &str, id: &str, body: Option<&str>) {
        self.0.mirror_changed(kind, id, body);
    }

    fn reloaded(&self, kind: &str, docs: &[(String, String)]) {
        self.0.mirror_reloaded(kind, docs);
    }
}

/// The export/import jobs, after the migration engine: migration tasks are exported and
/// imported through it. Cluster mode: finished packages are stored in PostgreSQL too, so the
/// next holder of the engines serves them.
pub(super) async fn open_export(
    core: Core<'_>,
    firmware: &Arc<FirmwareRepo>,
    ota: &OtaEngine,
    migration: &Arc<MigrationEngine>,
    revoke_session: &DeviceRevokedHook,
    joined: Option<&Joined>,
) -> anyhow::Result<ExportService> {
    let (store, start) = match joined {
        Some(joined) => (
            core.store.fenced(joined.engines_lease.fence()),
            ExportStart::Standby,
        ),
        None => (core.store.clone(), ExportStart::Running),
    };
    let export = ExportService::open(
        &core.settings.data_dir,
        store,
        core.registry.clone(),
        firmware.clone(),
        ota.clone(),
        migration.clone(),
        core.settings.export.clone(),
        revoke_session.clone(),
        start,
    )
    .context("cannot load the export/import jobs")?;
    if let (Some(_), Some(url)) = (joined, &core.settings.store.url) {
        let shared = PostgresExports::connect(url)
            .await
            .map_err(anyhow::Error::msg)
            .context("cannot open an export connection to PostgreSQL")?;
        export.share_packages(Arc::new(shared));
    }
    Ok(export)
}

/// Cloud-to-device commands, with the latest-properties snapshots loaded and flushed
/// periodically.
pub(super) fn start_commands(
    core: Core<'_>,
    downlink: &Downlink,
    forwarder: &Arc<Forwarder>,
) -> anyhow::Result<Arc<Commands>> {
    let settings = &core.settings.commands;
    let properties = LatestProperties::load(core.store.clone(), core.registry.clone())
        .context("cannot load the latest-properties snapshots")?;
    LatestProperties::spawn_flusher(
        &properties,
        Duration::from_millis(settings.properties_flush_ms),
    );
    core.registry
        .add_observer(Arc::new(PropertiesReaper(Arc::downgrade(&properties))));
    let commands = Commands::new(
        downlink.clone(),
        core.registry.clone(),
        core.metrics.clone(),
        *settings,
        properties,
    )
    .with_forwarder(forwarder.clone());
    let commands = Arc::new(commands);
    Commands::spawn_offline_sweeper(&commands);
    core.registry
        .add_observer(Arc::new(OfflineReaper(Arc::downgrade(&commands))));
    Ok(commands)
}

/// What the broker hands device traffic to.
pub(super) fn ingest(
    core: Core<'_>,
    downlink: &Downlink,
    ota: &OtaEngine,
    forwarder: &Arc<Forwarder>,
    commands: &Arc<Commands>,
) -> Arc<Ingest> {
    Arc::new(
        Ingest::new(
            core.registry.clone(),
            downlink.clone(),
            core.metrics.clone(),
        )
        .with_ota(ota.clone())
        .with_forwarder(forwarder.clone())
        .with_commands(commands.clone()),
    )
}

/// MQTT accepting on `listener` (and the TLS listener), device traffic going to `ingest`.
pub(super) async fn accept_mqtt(
    broker: Broker,
    ingest: Arc<Ingest>,
    listener: TcpListener,
) -> anyhow::Result<BrokerHandle> {
    broker
        .start_on(ingest, listener)
        .await
        .context("cannot start the MQTT listeners")
}

/// Cluster mode: the cluster gets the registry, the downlink and this node's (MQTT, HTTP)
/// addresses, and starts applying the others' changes; commands use it.
pub(super) fn attach_cluster(
    joined: Joined,
    core: Core<'_>,
    downlink: &Downlink,
    commands: &Arc<Commands>,
    feed_cuts: FeedCuts,
    (mqtt, http): (SocketAddr, SocketAddr),
) -> Attached {
    let Joined {
        cluster,
        pending,
        engines_lease,
    } = joined;
    cluster.attach(
        pending,
        core.registry.clone(),
        downlink.clone(),
        feed_cuts,
        mqtt,
        http,
    );
    commands.attach_cluster(cluster.clone());
    Attached {
        cluster,
        engines_lease,
    }
}

/// Cluster mode: take part in the engines' lease; the holder drives the OTA and migration
/// engines and the export/import jobs.
pub(super) fn run_engines_lease(attached: Option<&Attached>, engines: Engines) -> EnginesLease {
    let (stop, _) = watch::channel(false);
    let mut tasks = Vec::new();
    if let Some(Attached {
        cluster,
        engines_lease,
    }) = attached
    {
        tasks.push(tokio::spawn(engines_lease.clone().run(stop.subscribe())));
        tasks.push(tokio::spawn(crate::cluster::engines::drive(
            cluster.clone(),
            engines_lease.clone(),
            engines,
            stop.subscribe(),
        )));
    }
    EnginesLease { stop, tasks }
}

/// The API tokens: the admin token (configured, else read from the data dir, else created
/// there: the second value) and the configured further tokens.
pub(super) fn load_api_tokens(settings: &Settings) -> anyhow::Result<(TokenSet, Option<String>)> {
    let (tokens, created_admin_token) = TokenSet::load_or_create_admin(
        &settings.data_dir,
        settings.api.token.as_ref().map(|t| t.expose().to_owned()),
    )
    .context("cannot set up API tokens")?;
    let tokens = settings
        .api
        .tokens
        .iter()
        .try_fold(tokens, |set, t| set.with_token(t.token.expose(), &t.role))
        .context("invalid api.tokens")?;
    Ok((tokens, created_admin_token))
}

/// What the API handlers get.
pub(super) fn api_state(
    parts: &Parts,
    store: &Store,
    broker: &BrokerHandle,
    tokens: TokenSet,
    export: ExportService,
    revoke_session: DeviceRevokedHook,
    health: api::HealthFn,
) -> ApiState {
    ApiState {
        registry: parts.registry.clone(),
        metrics: parts.metrics.clone(),
        tokens: Arc::new(tokens),
        firmware: parts.firmware.clone(),
        ota: parts.ota.clone(),
        export,
        health,
        on_device_revoked: revoke_session,
        forwarder: parts.forwarder.clone(),
        migration: parts.migration.clone(),
        ready: readiness(
            Box::new(broker.accepting()),
            store.clone(),
            parts.forwarder.clone(),
            parts.cluster.clone(),
        ),
        cluster: parts.cluster.clone(),
        commands: parts.commands.clone(),
        console_sessions: parts.console_sessions.clone(),
        forward_proxy_header: false,
    }
}

/// `/healthz`'s fields after `"status":"ok"`: the bound addresses, online devices, this node
/// (cluster mode) and the forwarder's state.
pub(super) fn health_info(
    parts: &Parts,
    broker: &BrokerHandle,
    node: u16,
    http_addr: SocketAddr,
) -> api::HealthFn {
    let mqtt = broker.mqtt_addr();
    let tls = broker.tls_addr();
    let registry = parts.registry.clone();
    let forwarder = parts.forwarder.clone();
    Arc::new(move || {
        let mut v = serde_json::json!({
            "mqtt": mqtt.to_string(),
            "mqtt_tls": tls.map(|a| a.to_string()),
            "http": http_addr.to_string(),
            "online_devices": registry.online_count(),
        });
        if node != 0 {
            v["node"] = node.into();
        }
        // "amqp": disabled | connecting | connected | disconnected, plus outbox depth.
        if let (Some(v), serde_json::Value::Object(amqp)) = (v.as_object_mut(), forwarder.health())
        {
            v.extend(amqp);
        }
        v
    })
}

/// Serves the API (and the console) on `listener` behind the HTTP connection gate.
pub(super) fn serve_http(
    listener: TcpListener,
    addr: SocketAddr,
    state: ApiState,
    settings: &Settings,
    budgets: &Budgets,
) -> HttpServer {
    let metrics = state.metrics.clone();
    let router = api::router(
        state,
        api::BodyLimits {
            json: settings.http.json_body_limit_bytes,
            batch: settings.http.batch_body_limit_bytes,
        },
    );
    let gate = Gate::new(
        Listener::Http,
        GateLimits {
            max_open: budgets.http_connections,
            max_per_source: budgets.http_per_ip,
        },
        &metrics,
    );
    let timeouts = api::serve::HttpTimeouts {
        header_read: Duration::from_secs(settings.http.header_read_timeout_secs),
        body_read: Duration::from_secs(settings.http.body_read_timeout_secs),
        write: Duration::from_secs(settings.http.write_timeout_secs),
    };
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(api::serve::serve(
        listener,
        router,
        timeouts,
        settings.http.proxy_policy(),
        gate,
        metrics,
        async {
            let _ = stop_rx.await;
        },
    ));
    HttpServer { addr, stop, task }
}

/// `/readyz`: the MQTT listeners accept (the HTTP one answers this very request), the store
/// answers (its writer is alive), the node is in sync with the cluster (cluster mode), and the
/// forwarder is connected when AMQP forwarding is on.
pub(super) fn readiness(
    accepting: Box<dyn Fn() -> bool + Send + Sync>,
    store: Store,
    forwarder: Arc<Forwarder>,
    cluster: Option<Arc<Cluster>>,
) -> api::ReadyFn {
    Arc::new(move || {
        let mut ready = true;
        let mut checks = serde_json::Map::new();
        let listeners = if accepting() {
            "ok"
        } else {
            ready = false;
            "stopped accepting (shutting down)"
        };
        checks.insert("listeners".into(), listeners.into());
        let store = if store.is_open() {
            "ok"
        } else {
            ready = false;
            "closed"
        };
        checks.insert("store".into(), store.into());
        if let Some(cluster) = &cluster {
            let state = if cluster.ready() {
                "ok"
            } else {
                ready = false;
                "not in sync with the cluster (NATS unreachable or resynchronising)"
            };
            checks.insert("cluster".into(), state.into());
        }
        let amqp = match forwarder.health().get("amqp").and_then(|v| v.as_str()) {
            Some("connected") => "ok".to_owned(),
            Some("disabled") | None => "disabled".to_owned(),
            Some(other) => {
                ready = false;
                other.to_owned()
            }
        };
        checks.insert("amqp".into(), amqp.into());
        (ready, serde_json::Value::Object(checks))
    })
}

pub(super) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The MQTT and HTTP connection budgets from the open-files limit in force and the settings;
/// logged, with any configured value the limit could not hold.
pub(super) fn connection_budgets(
    settings: &Settings,
    metrics: &Metrics,
) -> anyhow::Result<Budgets> {
    let open_files = admission::open_files_limit()?;
    let (budgets, lowered) = Budgets::derive(
        open_files,
        &BudgetSettings {
            reserve: settings.open_files_reserve,
            mqtt_sockets: settings.mqtt.max_sockets,
            http_connections: settings.http.max_connections,
            mqtt_pressure: settings.mqtt.pressure_unauthenticated,
            mqtt_per_ip: settings.mqtt.max_unauthenticated_per_ip,
            http_per_ip: settings.http.max_connections_per_ip,
        },
    )?;
    for l in lowered {
        tracing::warn!(
            setting = l.setting,
            configured = l.asked,
            used = l.allowed,
            open_files,
            "connection budget lowered to what the open-files limit can hold"
        );
    }
    for (listener, per_ip, budget) in [
        ("mqtt", budgets.mqtt_per_ip, budgets.mqtt_sockets),
        ("http", budgets.http_per_ip, budgets.http_connections),
    ] {
        if per_ip >= budget {
            tracing::warn!(
                listener,
                per_ip,
                budget,
                "one source address can use the whole connection budget (raise the open-files \
                 limit or lower the per-address cap)"
            );
        }
    }
    metrics
        .open_files_limit
        .set(i64::try_from(open_files).unwrap_or(i64::MAX));
    tracing::info!(
        open_files,
        reserve = budgets.reserve,
        mqtt_sockets = budgets.mqtt_sockets,
        http_connections = budgets.http_connections,
        mqtt_pressure_unauthenticated = budgets.mqtt_pressure,
        mqtt_unauthenticated_per_ip = budgets.mqtt_per_ip,
        http_connections_per_ip = budgets.http_per_ip,
        "connection budgets"
    );
    Ok(budgets)
}

/// `http://{addr}` for download links when no `http.public_url` is set; an unspecified bind
/// address (`0.0.0.0`, `::`) is not something a device can connect to, so it becomes loopback.
pub(super) fn default_public_url(addr: SocketAddr) -> String {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    // SocketAddr's Display brackets IPv6 addresses, as URLs need.
    format!("http://{addr}")
}

/// Ends a deleted device's MQTT session and makes the broker forget its persistent session, so
/// that a device created again under the same name starts without it (no `session_present`,
/// none of the old subscriptions or queued messages). A registry observer: every delete path
/// goes through it, and the delete returns once it is done.
pub(super) struct SessionReaper(pub(super) Downlink);

impl DeviceObserver for SessionReaper {
    fn device_changed<'a>(&'a self, change: &'a DeviceChange) -> ObserverFuture<'a> {
        Box::pin(async move {
            let DeviceChange::Deleted {
                product_key,
                device_name,
                ..
            } = change
            else {
                return;
            };
            let device = DeviceKey {
                product_key: product_key.clone(),
                device_name: device_name.clone(),
            };
            if let Err(error) = self.0.forget_session(&device).await {
                tracing::warn!(%error, pk = %product_key, dn = %device_name, "the deleted device's MQTT session was not cleared");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_public_url_replaces_unspecified_addresses() {
        let url = |s: &str| default_public_url(s.parse().unwrap());
        assert_eq!(url("0.0.0.0:8080"), "http://127.0.0.1:8080");
        assert_eq!(url("[::]:8080"), "http://[::1]:8080");
        assert_eq!(url("10.1.2.3:80"), "http://10.1.2.3:80");
        assert_eq!(url("[fe80::1]:9000"), "http://[fe80::1]:9000");
    }
}
