//! [`Application`]: builds every component from [`Settings`], reports the bound addresses, runs
//! until ctrl-c/SIGTERM (or [`Application::shutdown`]) and stops cleanly: listeners closed,
//! sessions ended, the store flushed.
//!
//! [`Application::build`] is the list of start steps, each a function in `steps.rs` with typed inputs
//! and outputs: bind the listeners ([`crate::listen`]: a taken built-in default port falls back
//! to the next free one), so a start that cannot listen creates nothing → check the configured
//! API tokens → derive the connection budgets from the open-files limit ([`crate::admission`])
//! → open the store → join the cluster (cluster mode) → load the registry from the store → open
//! the firmware repository (the bound HTTP address is the default base of download links) →
//! open the forwarder (consumer groups; with an AMQP URL also its outbox and publisher; in
//! cluster mode it follows the groups and rate limits written through other nodes) → start
//! the broker's router → open the OTA engine (jobs and tasks reloaded, every timer re-armed) →
//! start the migration engine (kicks via the router, data-sync routes and limits into the
//! forwarder) → open the export/import jobs (which use the OTA and migration engines) → start
//! the commands → accept MQTT (ingest) → attach the cluster and take part in the engines' lease
//! (cluster mode) → load or create the API tokens → serve HTTP → announce. The admin token is
//! created only by a start that got that far, and printed by it. Stop order is the reverse, so
//! nothing is accepted that cannot be stored.

use crate::admission::Budgets;
use crate::broker::{BrokerHandle, TlsConfig};
use crate::clock::Clock;
use crate::cluster::engines::Engines;
use crate::cluster::Cluster;
use crate::command::Commands;
use crate::config::Settings;
use crate::forwarder::Forwarder;
use crate::metrics::Metrics;
use crate::migration::MigrationEngine;
use crate::ota::{FirmwareRepo, OtaEngine};
use crate::registry::Registry;
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

mod signal;
mod steps;
pub use signal::StopSignal;
use steps::*;

/// A running gateway.
pub struct Application {
    settings: Settings,
    parts: Parts,
    broker: BrokerHandle,
    http: HttpServer,
    budgets: Budgets,
    created_admin_token: Option<String>,
    engines_lease: EnginesLease,
}

/// The long-lived components: what the API serves, the accessors show and the shutdown stops.
struct Parts {
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    firmware: Arc<FirmwareRepo>,
    forwarder: Arc<Forwarder>,
    ota: OtaEngine,
    migration: Arc<MigrationEngine>,
    commands: Arc<Commands>,
    /// The console's session keys and revocations.
    console_sessions: Arc<crate::console::session::Sessions>,
    /// Cluster mode: this node's part of the cluster.
    cluster: Option<Arc<Cluster>>,
}

impl Application {
    /// Open the store, rebuild the registry, bind every listener (port 0 allowed) and start
    /// serving. Returns once everything accepts connections.
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        // First of all, so that a start that cannot listen changes nothing on disk.
        let listeners = bind_listeners(&settings)?;
        // Before anything is created: a start that fails never makes an admin token nobody
        // sees (it is created and printed at the end).
        check_api_tokens(&settings)?;
        create_data_dir(&settings)?;
        let metrics = Arc::new(Metrics::new());
        let budgets = connection_budgets(&settings, &metrics)?;
        let store = open_store(&settings, &metrics)?;
        // Before the registry loads, so that no change another node makes meanwhile is missed.
        let joined = join_cluster(&settings, &store, &metrics).await?;
        let (registry, feed_cuts) = load_registry(&settings, &store, &metrics)?;
        let core = Core::new(&settings, &store, &registry, &metrics);
        let http_addr = listeners.http.local_addr()?;
        let firmware = open_firmware(core, http_addr, joined.as_ref()).await?;
        let forwarder = open_forwarder(core, joined.as_ref()).await?;
        follow_forwarder_docs(joined.as_ref(), &forwarder);
        let console_sessions = console_sessions(core, joined.as_ref()).await?;
        let broker = start_router(core, &budgets)?;
        let downlink = broker.downlink();
        registry.add_observer(Arc::new(SessionReaper(downlink.clone())));
        // One clock for both engines (system time; tests move it through the engines).
        let clock = Clock::system();
        let ota = open_ota(
            core,
            &firmware,
            &forwarder,
            &downlink,
            &clock,
            joined.as_ref(),
        )?;
        // A device the API or an import disables, re-keys, moves or deletes loses its session.
        let revoke_session = revoke_session_hook(&downlink);
        let migration = start_migration(core, &forwarder, &revoke_session, clock, joined.as_ref())?;
        let export = open_export(
            core,
            &firmware,
            &ota,
            &migration,
            &revoke_session,
            joined.as_ref(),
        )
        .await?;
        let commands = start_commands(core, &downlink, &forwarder, joined.as_ref()).await?;
        let ingest = ingest(core, &downlink, &ota, &forwarder, &commands);
        let broker = accept_mqtt(broker, ingest, listeners.mqtt).await?;
        let addresses = (broker.mqtt_addr(), http_addr);
        let attached =
            joined.map(|j| attach_cluster(j, core, &downlink, &commands, feed_cuts, addresses));
        let engines_lease = run_engines_lease(
            attached.as_ref(),
            Engines {
                ota: ota.clone(),
                migration: migration.clone(),
                export: export.clone(),
            },
        );
        // The last step that can fail: an admin token created here is printed below.
        let (tokens, created_admin_token) = load_api_tokens(&settings)?;
        let parts = Parts {
            metrics,
            registry,
            firmware,
            forwarder,
            ota,
            migration,
            commands,
            console_sessions,
            cluster: attached.map(|a| a.cluster),
        };
        let health = health_info(&parts, &broker, settings.cluster.node_id, http_addr);
        let state = crate::api::ApiState {
            // The nodes' HTTP listeners expect PROXY headers from each other too.
            forward_proxy_header: settings.http.proxy_protocol
                != crate::proxy_protocol::ProxyMode::Off,
            ..api_state(
                &parts,
                &store,
                &broker,
                tokens,
                export,
                revoke_session,
                health,
            )
        };
        let http = serve_http(listeners.http, http_addr, state, &settings, &budgets);
        let app = Application {
            settings,
            parts,
            broker,
            http,
            budgets,
            created_admin_token,
            engines_lease,
        };
        app.announce();
        Ok(app)
    }

    /// Logs where the gateway listens and whether it forwards, and shows the admin token this
    /// start created.
    fn announce(&self) {
        let (settings, parts, broker) = (&self.settings, &self.parts, &self.broker);
        tracing::info!(
            mqtt = %broker.mqtt_addr(),
            mqtt_tls = ?broker.tls_addr(),
            http = %self.http.addr,
            public_url = %parts.firmware.public_url(),
            data_dir = %settings.data_dir.display(),
            "fleetgate listening"
        );
        let forwarder = &parts.forwarder;
        if forwarder.enabled() {
            tracing::info!(
                outbox_messages = forwarder.outbox().map_or(0, |o| o.len()),
                "AMQP forwarding on"
            );
        } else {
            tracing::info!("AMQP forwarding disabled (no --amqp-url / FLEETGATE_AMQP_URL); consumer groups are kept and declared once a broker is configured");
        }
        if let Some(token) = &self.created_admin_token {
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
    }

    /// Cloud-to-device commands and the latest-properties snapshots.
    pub fn commands(&self) -> &Arc<Commands> {
        &self.parts.commands
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
        self.http.addr
    }

    /// The admin token this start created (first start without `--api-token`).
    pub fn created_admin_token(&self) -> Option<&str> {
        self.created_admin_token.as_deref()
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.parts.registry
    }

    pub fn firmware(&self) -> &Arc<FirmwareRepo> {
        &self.parts.firmware
    }

    /// The OTA engine (jobs, tasks, task events for the forwarder).
    pub fn ota(&self) -> &OtaEngine {
        &self.parts.ota
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.parts.metrics
    }

    pub fn forwarder(&self) -> &Arc<Forwarder> {
        &self.parts.forwarder
    }

    pub fn migration(&self) -> &Arc<MigrationEngine> {
        &self.parts.migration
    }

    /// Cluster mode: this node's part of the cluster.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.parts.cluster.as_ref()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The connection budgets in force (derived from the open-files limit at start).
    pub fn budgets(&self) -> Budgets {
        self.budgets
    }

    /// Serve until `stop` (ctrl-c or SIGTERM, installed before the build), then shut down
    /// cleanly.
    pub async fn run_until_stopped(self, stop: StopSignal) -> anyhow::Result<()> {
        stop.recv().await;
        tracing::info!("shutting down");
        self.shutdown().await
    }

    /// Stop accepting, end every session, stop forwarding, flush the store.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.http.stop.send(());
        // Cluster mode with other nodes up, first: the engines stop and their lease is
        // released, so another node drives them while this one is still ending its sessions.
        // With no other node up there is nobody to hand them to (a report relayed now would
        // find no holder and be dropped after the relay's patience): the engines go on serving
        // this node's devices until the broker has stopped, and are handed over after it.
        let mut engines_lease = Some(self.engines_lease);
        if engines_lease.as_ref().is_some_and(EnginesLease::others_up) {
            if let Some(lease) = engines_lease.take() {
                lease.hand_over().await;
            }
        }
        // Before the broker and the store: the batch in flight finishes and is durable.
        self.parts.migration.shutdown().await;
        self.broker.shutdown().await;
        match tokio::time::timeout(Duration::from_secs(10), self.http.task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "HTTP task failed"),
            Err(_) => tracing::warn!("HTTP server did not stop within 10 s"),
        }
        // After the broker: no device event can reach the engine any more.
        self.parts.ota.shutdown().await;
        if let Some(lease) = engines_lease {
            lease.hand_over().await;
        }
        // After the broker: no property post can change a snapshot any more.
        if let Err(error) = self.parts.commands.properties().flush().await {
            tracing::warn!(%error, "cannot write the latest-properties snapshots");
        }
        // After the broker and the OTA engine: nothing can enqueue any more. Confirms in flight
        // get a few seconds; whatever is left stays in the outbox for the next start.
        self.parts.forwarder.shutdown().await;
        self.parts
            .registry
            .flush()
            .await
            .context("cannot flush the store")?;
        // Last: the sessions' ends and everything flushed above are announced to the others.
        if let Some(cluster) = &self.parts.cluster {
            cluster.shutdown().await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}
