//! [`Application`]: builds every component from [`Settings`], reports the bound addresses, runs
//! until ctrl-c/SIGTERM (or [`Application::shutdown`]) and stops cleanly: listeners closed,
//! sessions ended, the store flushed.
//!
//! Start order: store → registry (rebuilt from the store) → broker router → ingest → listeners.
//! Stop order is the reverse, so nothing is accepted that cannot be stored.

use crate::api::{self, ApiState, TokenSet};
use crate::broker::{Broker, BrokerConfig, BrokerHandle, TlsConfig};
use crate::config::Settings;
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::migration::{Hooks as MigrationHooks, MigrationEngine};
use crate::registry::Registry;
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
    metrics: Arc<Metrics>,
    migration: Arc<MigrationEngine>,
    http_addr: SocketAddr,
    http_stop: oneshot::Sender<()>,
    http_task: JoinHandle<std::io::Result<()>>,
    created_admin_token: Option<String>,
}

impl Application {
    /// Open the store, rebuild the registry, bind every listener (port 0 allowed) and start
    /// serving. Returns once everything accepts connections.
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("cannot create data dir {}", settings.data_dir.display()))?;
        let metrics = Arc::new(Metrics::new());
        let store = Store::open(&settings.data_dir.join("fleetgate.db"), metrics.clone())
            .context("cannot open the store")?;
        let registry =
            Registry::open(store, metrics.clone()).context("cannot load the registry")?;

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
            },
            metrics.clone(),
        )
        .context("cannot start the MQTT router")?;
        let downlink = broker.downlink();
        let ingest = Arc::new(Ingest::new(
            registry.clone(),
            downlink.clone(),
            metrics.clone(),
        ));
        let broker = broker
            .start(ingest)
            .await
            .context("cannot start the MQTT listeners")?;

        // After the broker, so a task resumed at start can already kick connected devices.
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
                ..MigrationHooks::default()
            },
        )
        .context("cannot start the migration engine")?;

        let listener = tokio::net::TcpListener::bind(settings.http.listen)
            .await
            .with_context(|| format!("cannot bind HTTP on {}", settings.http.listen))?;
        let http_addr = listener.local_addr()?;

        let amqp_state = if settings.amqp.url.is_some() {
            "configured (forwarder not built yet)"
        } else {
            "disabled (no --amqp-url / FLEETGATE_AMQP_URL)"
        };
        let health_info = {
            let mqtt = broker.mqtt_addr();
            let tls = broker.tls_addr();
            let registry = registry.clone();
            move || {
                serde_json::json!({
                    "mqtt": mqtt.to_string(),
                    "mqtt_tls": tls.map(|a| a.to_string()),
                    "http": http_addr.to_string(),
                    "amqp": amqp_state,
                    "online_devices": registry.online_count(),
                })
            }
        };
        let state = ApiState {
            registry: registry.clone(),
            metrics: metrics.clone(),
            tokens: Arc::new(tokens),
            health: Arc::new(health_info),
            on_device_revoked: {
                let downlink = downlink.clone();
                Arc::new(move |pk: &str, dn: &str| {
                    downlink.kick(&crate::broker::DeviceKey {
                        product_key: pk.to_owned(),
                        device_name: dn.to_owned(),
                    });
                })
            },
            migration: Some(migration.clone()),
        };
        let router = api::router(state, settings.http.body_limit_bytes);
        let (http_stop, stop_rx) = oneshot::channel::<()>();
        let http_task = tokio::spawn(async move {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
        });

        tracing::info!(
            mqtt = %broker.mqtt_addr(),
            mqtt_tls = ?broker.tls_addr(),
            http = %http_addr,
            data_dir = %settings.data_dir.display(),
            "fleetgate listening"
        );
        tracing::info!(amqp = amqp_state, "AMQP forwarding");
        if let Some(token) = &created_admin_token {
            // Printed once, on the start that created it; it is stored in the data dir.
            println!(
                "Created the admin API token (stored in {}): {token}",
                settings.data_dir.join("api-token").display()
            );
        }

        Ok(Application {
            settings,
            broker,
            registry,
            metrics,
            migration,
            http_addr,
            http_stop,
            http_task,
            created_admin_token,
        })
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

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn migration(&self) -> &Arc<MigrationEngine> {
        &self.migration
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Serve until ctrl-c or SIGTERM, then shut down cleanly.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        shutdown_signal().await;
        tracing::info!("shutting down");
        self.shutdown().await
    }

    /// Stop accepting, end every session, flush the store.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.http_stop.send(());
        // Before the broker and the store: the batch in flight finishes and is durable.
        self.migration.shutdown().await;
        self.broker.shutdown().await;
        match tokio::time::timeout(Duration::from_secs(10), self.http_task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP server ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "HTTP task failed"),
            Err(_) => tracing::warn!("HTTP server did not stop within 10 s"),
        }
        self.registry
            .flush()
            .await
            .context("cannot flush the store")?;
        tracing::info!("stopped");
        Ok(())
    }
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
