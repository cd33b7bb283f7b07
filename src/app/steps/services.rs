//! The start steps that open the services: the firmware repository, the forwarder, the console's
//! sessions, the OTA and migration engines, the export/import jobs and the commands.

use super::{default_public_url, Core, Joined};
use crate::broker::{DeviceKey, Downlink};
use crate::clock::Clock;
use crate::cluster::engines::{ClusterPusher, EnginesRelay};
use crate::cluster::DocFollower;
use crate::command::properties::PropertiesReaper;
use crate::command::OfflineReaper;
use crate::command::{Commands, LatestProperties};
use crate::console::session::Sessions as ConsoleSessions;
use crate::export::{DeviceRevokedHook, ExportService, Start as ExportStart};
use crate::forwarder::{AmqpSettings, ClusterOutbox, Forwarder, ForwarderConfig, RateLimit};
use crate::migration::{Hooks as MigrationHooks, MigrationEngine};
use crate::ota::firmware::Backing;
use crate::ota::{EngineConfig, FirmwareRepo, OtaEngine};
use crate::store::{PostgresExports, PostgresFirmware, PostgresReader, Store, FIRMWARE_ORPHAN_AGE};
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The firmware repository; download links default to the bound HTTP address. Cluster mode:
/// the bytes of record and the download-link key are the cluster's, in PostgreSQL (this node's
/// blob directory caches them); unreferenced bytes older than an hour are swept.
pub(in crate::app) async fn open_firmware(
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
    let repo = FirmwareRepo::open_with(
        &settings.data_dir,
        core.store.clone(),
        public_url,
        settings.ota.max_firmware_bytes,
        backing,
    )
    .context("cannot open the firmware repository")?;
    // Cluster mode: packages deleted through another node leave this node's cache too.
    if let Some(joined) = joined {
        joined.cluster.follow_docs(repo.cache_follower());
    }
    Ok(repo)
}

/// What the forwarder runs with: `[amqp]` with its exchange prefix resolved — the configured
/// one, else this installation's own (chosen on first start, kept in the store).
pub(in crate::app) fn forwarder_config(
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
pub(in crate::app) async fn open_forwarder(
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
pub(in crate::app) fn follow_forwarder_docs(joined: Option<&Joined>, forwarder: &Arc<Forwarder>) {
    if let Some(joined) = joined {
        joined.cluster.follow_docs(forwarder.doc_follower());
    }
}

/// The console's sessions. Cluster mode: sealed with the cluster's key (a cookie from one node
/// opens on all), and logouts are `console.revoked` documents every node follows; registered
/// before the cluster is attached, like the forwarder's documents.
pub(in crate::app) async fn console_sessions(
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

/// The OTA engine, jobs and tasks loaded, its task state changes forwarded to consumer groups
/// (no-op with forwarding off). Single node: it pushes through the broker and runs. Cluster
/// mode: it starts in standby, relaying reports; the holder of the engines' lease activates it
/// ([`run_engines_lease`]).
pub(in crate::app) fn open_ota(
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
pub(in crate::app) fn revoke_session_hook(downlink: &Downlink) -> DeviceRevokedHook {
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
pub(in crate::app) fn start_migration(
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
pub(in crate::app) async fn open_export(
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
/// periodically (cluster mode: read from the shared store, on a connection of their own).
pub(in crate::app) async fn start_commands(
    core: Core<'_>,
    downlink: &Downlink,
    forwarder: &Arc<Forwarder>,
    joined: Option<&Joined>,
) -> anyhow::Result<Arc<Commands>> {
    let settings = &core.settings.commands;
    let properties = match (joined, &core.settings.store.url) {
        (Some(_), Some(url)) => {
            let shared = PostgresReader::connect(url)
                .await
                .context("cannot open a latest-properties connection to PostgreSQL")?;
            LatestProperties::on_shared(core.store.clone(), core.registry.clone(), Arc::new(shared))
        }
        _ => LatestProperties::load(core.store.clone(), core.registry.clone())
            .context("cannot load the latest-properties snapshots")?,
    };
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
