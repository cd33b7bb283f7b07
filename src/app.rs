//! [`Application`]: builds every component from [`Settings`], reports the bound addresses, runs
//! until ctrl-c/SIGTERM (or [`Application::shutdown`]) and stops cleanly: listeners closed,
//! sessions ended, the store flushed.
//!
//! Start order: store → registry (rebuilt from the store) → HTTP bind (its address is the
//! default base of firmware download links) → firmware repository → forwarder (consumer groups;
//! with an AMQP URL also its outbox and publisher) → broker router → OTA engine (jobs and tasks
//! reloaded, every timer re-armed) → migration engine (kicks via the router, data-sync routes
//! and limits into the forwarder) → export/import jobs (which use the OTA and migration
//! engines) → ingest → MQTT accepting → admin token → HTTP serving. Before all of it the MQTT
//! and HTTP listeners are bound ([`crate::listen`]: a taken built-in default port falls back to
//! the next free one), so a start that cannot listen creates nothing, and the connection
//! budgets are derived from the open-files limit ([`crate::admission`]). The admin token is
//! created only by a start that got that far, and printed by it. Stop order is the reverse, so nothing is accepted that cannot be stored.

use crate::admission::{self, BudgetSettings, Budgets, Gate, GateLimits};
use crate::api::{self, ApiState, TokenSet};
use crate::broker::{Broker, BrokerConfig, BrokerHandle, DeviceKey, Downlink, TlsConfig};
use crate::clock::Clock;
use crate::cluster::engines::{ClusterPusher, EnginesRelay};
use crate::cluster::epoch::EpochClock;
use crate::cluster::Cluster;
use crate::command::properties::PropertiesReaper;
use crate::command::{Commands, LatestProperties};
use crate::config::Settings;
use crate::export::ExportService;
use crate::forwarder::{AmqpSettings, Forwarder, ForwarderConfig};
use crate::ingest::Ingest;
use crate::listen;
use crate::metrics::{Listener, Metrics};
use crate::migration::{Hooks as MigrationHooks, MigrationEngine};
use crate::ota::{EngineConfig, FirmwareRepo, OtaEngine};
use crate::registry::{DeviceChange, DeviceObserver, ObserverFuture, Registry, RegistryLimits};
use crate::store::Store;
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running gateway.
pub struct Application {
    settings: Settings,
    broker: BrokerHandle,
    registry: Arc<Registry>,
    firmware: Arc<FirmwareRepo>,
    forwarder: Arc<Forwarder>,
    ota: OtaEngine,
    migration: Arc<MigrationEngine>,
    metrics: Arc<Metrics>,
    http_addr: SocketAddr,
    http_stop: oneshot::Sender<()>,
    http_task: JoinHandle<()>,
    budgets: Budgets,
    created_admin_token: Option<String>,
    cluster: Option<Arc<Cluster>>,
    /// Cluster mode: stops the engines' lease keeper (which releases the lease) and the task
    /// that follows it.
    engines_stop: tokio::sync::watch::Sender<bool>,
    engines_tasks: Vec<JoinHandle<()>>,
    commands: Arc<Commands>,
}

impl Application {
    /// Open the store, rebuild the registry, bind every listener (port 0 allowed) and start
    /// serving. Returns once everything accepts connections.
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        // First of all, so that a start that cannot listen changes nothing on disk. A taken
        // built-in default port falls back to the next free one (`crate::listen`).
        let listener = listen::bind_listener(
            listen::HTTP,
            settings.http.listen,
            settings.http.listen_is_default,
            api::serve::bind,
        )?;
        let mqtt_listener = listen::bind_listener(
            listen::MQTT,
            settings.mqtt.listen,
            settings.mqtt.listen_is_default,
            crate::broker::bind_listener,
        )?;
        // Checked before anything is created: a start that fails never makes an admin token
        // nobody sees (it is created and printed at the end).
        settings
            .api
            .tokens
            .iter()
            .try_fold(TokenSet::default(), |set, t| {
                set.with_token(t.token.expose(), &t.role)
            })
            .context("invalid api.tokens")?;
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("cannot create data dir {}", settings.data_dir.display()))?;
        let metrics = Arc::new(Metrics::new());
        let budgets = connection_budgets(&settings, &metrics)?;
        let location = settings.store.location(&settings.data_dir);
        let store = Store::open_with(&location, &settings.store, metrics.clone())
            .with_context(|| format!("cannot open the store ({location})"))?;
        // Cluster mode joins before the registry loads, so that no change another node makes
        // meanwhile is missed (the snapshot says which feed messages it already contains).
        let joined = match (&settings.cluster.nats_url, &settings.store.url) {
            (Some(_), Some(url)) => {
                let reader = crate::store::PostgresReader::connect(url)
                    .await
                    .context("cannot open a reading connection to PostgreSQL")?;
                let joined = Cluster::join(
                    settings.cluster.clone(),
                    &store,
                    Arc::new(reader),
                    metrics.clone(),
                )
                .await
                .context("cannot join the cluster")?;
                Some(joined)
            }
            _ => None,
        };
        let snapshot = store.load().context("cannot load the registry")?;
        let feed_cuts = snapshot.feed_cuts.clone();
        let registry = Registry::from_snapshot(
            store,
            metrics.clone(),
            RegistryLimits {
                max_modules_per_device: settings.mqtt.max_modules_per_device,
            },
            Arc::new(EpochClock::new(settings.cluster.node_id)),
            snapshot,
        )
        .context("cannot load the registry")?;

        // Download links default to the bound HTTP address.
        let http_addr = listener.local_addr()?;
        let public_url = settings
            .http
            .public_url
            .clone()
            .unwrap_or_else(|| default_public_url(http_addr));
        let firmware = FirmwareRepo::open(
            &settings.data_dir,
            registry.store().clone(),
            public_url,
            settings.ota.max_firmware_bytes,
        )
        .context("cannot open the firmware repository")?;

        // Always built: consumer groups are managed (and persisted) with forwarding off too. In
        // cluster mode the outbox is the shared table, drained by the `outbox` lease's holder.
        let forwarder_config = forwarder_config(&settings.amqp, registry.store())?;
        let forwarder = match (&joined, &settings.store.url) {
            (Some(_), Some(url)) => {
                let leases = crate::store::PostgresReader::connect(url)
                    .await
                    .context("cannot open a lease connection to PostgreSQL")?;
                Forwarder::open_clustered(
                    forwarder_config,
                    crate::forwarder::ClusterOutbox {
                        url: url.clone(),
                        node: settings.cluster.node_id,
                        lease_ttl: Duration::from_millis(settings.cluster.lease_ttl_ms),
                        leases: Arc::new(leases),
                    },
                    registry.clone(),
                    metrics.clone(),
                )
            }
            _ => Forwarder::open(
                forwarder_config,
                &settings.data_dir,
                registry.clone(),
                metrics.clone(),
            ),
        }
        .context("cannot start the AMQP forwarder")?;

        let broker = Broker::new(
            BrokerConfig {
                listen: settings.mqtt.listen,
                tls: settings.mqtt.tls.as_ref().map(|t| TlsConfig {
                    listen: t.listen,
                    cert_path: t.cert.clone(),
                    key_path: t.key.clone(),
                }),
                max_connections: settings.mqtt.max_connections,
                connect_timeout: Duration::from_secs(settings.mqtt.connect_timeout_secs),
                max_payload_size: settings.mqtt.max_payload_bytes,
                epochs: registry.epochs().clone(),
                max_subscriptions_per_device: settings.mqtt.max_subscriptions_per_device,
                connect_timestamp_window: settings.mqtt.connect_timestamp_window(),
                max_sockets: budgets.mqtt_sockets,
                max_unauthenticated_per_ip: budgets.mqtt_per_ip,
                pressure_unauthenticated: budgets.mqtt_pressure,
                connect_timeout_under_pressure: Duration::from_secs(
                    settings.mqtt.connect_timeout_under_pressure_secs,
                ),
            },
            metrics.clone(),
        )
        .context("cannot start the MQTT router")?;
        let downlink = broker.downlink();
        registry.add_observer(Arc::new(SessionReaper(downlink.clone())));
        // One clock for both engines (system time; tests move it through the engines).
        let clock = Clock::system();
        let ota_config = EngineConfig {
            connect_push_delay_ms: settings.ota.connect_push_delay_ms as i64,
            download_url_ttl: Duration::from_secs(settings.ota.download_url_ttl_secs),
            progress_flush_ms: settings.ota.progress_flush_ms as i64,
            ..EngineConfig::default()
        };
        // Cluster mode: the engine runs on the holder of the engines' lease only (activated
        // once the cluster is attached, below); here it starts in standby, relaying reports.
        let engines_lease = joined.as_ref().map(|(cluster, _)| cluster.engines_lease());
        let ota = match (&joined, &engines_lease) {
            (Some((cluster, _)), Some(lease)) => OtaEngine::open_standby(
                registry.clone(),
                registry.store().fenced(lease.fence()),
                firmware.clone(),
                Arc::new(ClusterPusher::new(cluster.clone(), registry.clone())),
                clock.clone(),
                ota_config,
                metrics.clone(),
                Arc::new(EnginesRelay::new(cluster.clone())),
            ),
            _ => OtaEngine::open(
                registry.clone(),
                firmware.clone(),
                Arc::new(downlink.clone()),
                clock.clone(),
                ota_config,
                metrics.clone(),
            )
            .context("cannot load the OTA jobs")?,
        };
        // OTA task state changes are forwarded to consumer groups (no-op with forwarding off).
        ota.set_event_sink(forwarder.ota_event_sink());
        if joined.is_none() {
            ota.start();
        }

        // Before ingest starts: the data-sync routes must be in place for the first message.
        let migration = MigrationEngine::start(
            registry.clone(),
            metrics.clone(),
            settings.migration,
            MigrationHooks {
                kick: {
                    let downlink = downlink.clone();
                    Arc::new(move |pk: &str, dn: &str| {
                        downlink.kick(&crate::broker::DeviceKey {
                            product_key: pk.to_owned(),
                            device_name: dn.to_owned(),
                        });
                    })
                },
                set_rate_limit: {
                    let forwarder = forwarder.clone();
                    Arc::new(move |instance_id: &str, bytes_per_sec: Option<u64>| {
                        let limit = bytes_per_sec.map(|b| crate::forwarder::RateLimit {
                            msgs_per_sec: None,
                            // 10,240 MB/s does not fit governor's u32; that much is unlimited
                            // in practice.
                            bytes_per_sec: std::num::NonZeroU32::new(
                                u32::try_from(b).unwrap_or(u32::MAX),
                            ),
                        });
                        // Only the mirrored copies (data sync) are limited, not the data of
                        // devices the target already owns.
                        forwarder.set_mirror_rate_limit(instance_id, limit);
                    })
                },
            },
            clock,
        )
        .context("cannot start the migration engine")?;
        {
            // Weak: the engine's hooks hold the forwarder; no reference cycle.
            let engine = Arc::downgrade(&migration);
            forwarder.set_route_hook(Some(Arc::new(move |pk: &str, dn: &str, owner: &str| {
                engine
                    .upgrade()
                    .map(|e| e.extra_targets(pk, dn, owner))
                    .unwrap_or_default()
            })));
        }
        // A device the API or an import disables, re-keys, moves or deletes loses its session.
        let revoke_session: crate::export::DeviceRevokedHook = {
            let downlink = downlink.clone();
            Arc::new(move |pk: &str, dn: &str| {
                downlink.kick(&crate::broker::DeviceKey {
                    product_key: pk.to_owned(),
                    device_name: dn.to_owned(),
                });
            })
        };
        // After the migration engine: migration tasks are exported and imported through it.
        let export = ExportService::open(
            &settings.data_dir,
            registry.clone(),
            firmware.clone(),
            Some(ota.clone()),
            Some(migration.clone()),
            settings.export.clone(),
            revoke_session.clone(),
        )
        .context("cannot load the export/import jobs")?;

        let properties = LatestProperties::load(registry.store().clone())
            .context("cannot load the latest-properties snapshots")?;
        LatestProperties::spawn_flusher(
            &properties,
            Duration::from_millis(settings.commands.properties_flush_ms),
        );
        registry.add_observer(Arc::new(PropertiesReaper(Arc::downgrade(&properties))));
        let commands = Arc::new(
            Commands::new(
                downlink.clone(),
                registry.clone(),
                metrics.clone(),
                settings.commands,
                properties,
            )
            .with_forwarder(forwarder.clone()),
        );
        let ingest = Arc::new(
            Ingest::new(registry.clone(), downlink.clone(), metrics.clone())
                .with_ota(ota.clone())
                .with_forwarder(forwarder.clone())
                .with_commands(commands.clone()),
        );
        let broker = broker
            .start_on(ingest, mqtt_listener)
            .await
            .context("cannot start the MQTT listeners")?;

        let cluster = joined.map(|(cluster, pending)| {
            cluster.attach(
                pending,
                registry.clone(),
                downlink.clone(),
                feed_cuts,
                broker.mqtt_addr(),
                http_addr,
            );
            commands.attach_cluster(cluster.clone());
            cluster
        });
        // Cluster mode: take part in the engines' lease; the holder drives the OTA engine.
        let (engines_stop, _) = tokio::sync::watch::channel(false);
        let mut engines_tasks = Vec::new();
        if let (Some(cluster), Some(lease)) = (&cluster, engines_lease) {
            engines_tasks.push(tokio::spawn(lease.clone().run(engines_stop.subscribe())));
            engines_tasks.push(tokio::spawn(crate::cluster::engines::drive(
                cluster.clone(),
                lease,
                ota.clone(),
                engines_stop.subscribe(),
            )));
        }
        // The last step that can fail: an admin token created here is printed below.
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

        let health_info = {
            let mqtt = broker.mqtt_addr();
            let tls = broker.tls_addr();
            let registry = registry.clone();
            let forwarder = forwarder.clone();
            let node = settings.cluster.node_id;
            move || {
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
                if let (Some(v), serde_json::Value::Object(amqp)) =
                    (v.as_object_mut(), forwarder.health())
                {
                    v.extend(amqp);
                }
                v
            }
        };
        let state = ApiState {
            registry: registry.clone(),
            metrics: metrics.clone(),
            tokens: Arc::new(tokens),
            firmware: firmware.clone(),
            ota: Some(ota.clone()),
            export: Some(export),
            health: Arc::new(health_info),
            on_device_revoked: revoke_session,
            forwarder: Some(forwarder.clone()),
            migration: Some(migration.clone()),
            ready: readiness(
                Box::new(broker.accepting()),
                registry.clone(),
                forwarder.clone(),
                cluster.clone(),
            ),
            cluster: cluster.clone(),
            commands: Some(commands.clone()),
        };
        let router = api::router(
            state,
            api::BodyLimits {
                json: settings.http.json_body_limit_bytes,
                batch: settings.http.batch_body_limit_bytes,
            },
        );
        let http_gate = Gate::new(
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
        let (http_stop, stop_rx) = oneshot::channel::<()>();
        let http_task = tokio::spawn(api::serve::serve(
            listener,
            router,
            timeouts,
            http_gate,
            metrics.clone(),
            async {
                let _ = stop_rx.await;
            },
        ));

        tracing::info!(
            mqtt = %broker.mqtt_addr(),
            mqtt_tls = ?broker.tls_addr(),
            http = %http_addr,
            public_url = %firmware.public_url(),
            data_dir = %settings.data_dir.display(),
            "fleetgate listening"
        );
        if forwarder.enabled() {
            tracing::info!(
                outbox_messages = forwarder.outbox().map_or(0, |o| o.len()),
                "AMQP forwarding on"
            );
        } else {
            tracing::info!("AMQP forwarding disabled (no --amqp-url / FLEETGATE_AMQP_URL); consumer groups are kept and declared once a broker is configured");
        }
        if let Some(token) = &created_admin_token {
            let path = settings.data_dir.join("api-token");
            if crate::telemetry::json() {
                // JSON logs go to collectors and other people's screens: the secret stays in
                // its file (and off stdout, which is often collected with the log).
                tracing::warn!(path = %path.display(), "created the admin API token; it is in this file (not logged)");
            } else {
                // Printed once, on the start that created it; it is stored in the data dir.
                println!(
                    "Created the admin API token (stored in {}): {token}",
                    path.display()
                );
            }
        }

        Ok(Application {
            settings,
            broker,
            registry,
            firmware,
            forwarder,
            ota,
            migration,
            metrics,
            http_addr,
            http_stop,
            http_task,
            budgets,
            created_admin_token,
            cluster,
            engines_stop,
            engines_tasks,
            commands,
        })
    }

    /// Cloud-to-device commands and the latest-properties snapshots.
    pub fn commands(&self) -> &Arc<Commands> {
        &self.commands
    }

    /// What can be checked of `settings` without starting anything (`fleetgate check-config`;
    /// [`Settings::load`] has validated every value already): the TLS certificate and key
    /// load, and the data dir is a directory or can be created.
    pub fn check_settings(settings: &Settings) -> anyhow::Result<()> {
        if let Some(tls) = &settings.mqtt.tls {
            crate::broker::check_tls(&TlsConfig {
                listen: tls.listen,
                cert_path: tls.cert.clone(),
                key_path: tls.key.clone(),
            })
            .context("mqtt.tls")?;
        }
        let dir = &settings.data_dir;
        if dir.exists() {
            anyhow::ensure!(
                dir.is_dir(),
                "data_dir {} is not a directory",
                dir.display()
            );
        } else {
            let parent = dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            anyhow::ensure!(
                parent.is_dir(),
                "data_dir {}: its parent {} does not exist",
                dir.display(),
                parent.display()
            );
        }
        Ok(())
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.broker.mqtt_addr()
    }

    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.broker.tls_addr()
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The admin token this start created (first start without `--api-token`).
    pub fn created_admin_token(&self) -> Option<&str> {
        self.created_admin_token.as_deref()
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn firmware(&self) -> &Arc<FirmwareRepo> {
        &self.firmware
    }

    /// The OTA engine (jobs, tasks, task events for the forwarder).
    pub fn ota(&self) -> &OtaEngine {
        &self.ota
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn forwarder(&self) -> &Arc<Forwarder> {
        &self.forwarder
    }

    pub fn migration(&self) -> &Arc<MigrationEngine> {
        &self.migration
    }

    /// Cluster mode: this node's part of the cluster.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The connection budgets in force (derived from the open-files limit at start).
    pub fn budgets(&self) -> Budgets {
        self.budgets
    }

    /// Serve until ctrl-c or SIGTERM, then shut down cleanly.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        shutdown_signal().await;
        tracing::info!("shutting down");
        self.shutdown().await
    }

    /// Stop accepting, end every session, stop forwarding, flush the store.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.http_stop.send(());
        // Before the broker and the store: the batch in flight finishes and is durable.
        self.migration.shutdown().await;
        self.broker.shutdown().await;
        match tokio::time::timeout(Duration::from_secs(10), self.http_task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "HTTP task failed"),
            Err(_) => tracing::warn!("HTTP server did not stop within 10 s"),
        }
        // After the broker: no device event can reach the engine any more.
        self.ota.shutdown().await;
        // Cluster mode: the engine's last writes are in; the lease is released so another node
        // takes over at once instead of after its expiry.
        let _ = self.engines_stop.send(true);
        for task in self.engines_tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        // After the broker: no property post can change a snapshot any more.
        if let Err(error) = self.commands.properties().flush().await {
            tracing::warn!(%error, "cannot write the latest-properties snapshots");
        }
        // After the broker and the OTA engine: nothing can enqueue any more. Confirms in flight
        // get a few seconds; whatever is left stays in the outbox for the next start.
        self.forwarder.shutdown().await;
        self.registry
            .flush()
            .await
            .context("cannot flush the store")?;
        // Last: the sessions' ends and everything flushed above are announced to the others.
        if let Some(cluster) = &self.cluster {
            cluster.shutdown().await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// `/readyz`: the MQTT listeners accept (the HTTP one answers this very request), the store
/// answers (its writer is alive), the node is in sync with the cluster (cluster mode), and the
/// forwarder is connected when AMQP forwarding is on.
fn readiness(
    accepting: Box<dyn Fn() -> bool + Send + Sync>,
    registry: Arc<Registry>,
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
        let store = if registry.store().is_open() {
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

async fn shutdown_signal() {
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
fn connection_budgets(settings: &Settings, metrics: &Metrics) -> anyhow::Result<Budgets> {
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

/// What the forwarder runs with: `[amqp]` with its exchange prefix resolved — the configured
/// one, else this installation's own (chosen on first start, kept in the store).
fn forwarder_config(amqp: &AmqpSettings, store: &Store) -> anyhow::Result<ForwarderConfig> {
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

/// `http://{addr}` for download links when no `http.public_url` is set; an unspecified bind
/// address (`0.0.0.0`, `::`) is not something a device can connect to, so it becomes loopback.
fn default_public_url(addr: SocketAddr) -> String {
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
struct SessionReaper(Downlink);

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
