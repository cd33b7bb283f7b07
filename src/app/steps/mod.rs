//! The start steps of [`super::Application::build`], one function each with typed inputs and
//! outputs, in the order `build` calls them, and the small types they hand to each other. This
//! file holds the steps up to the loaded registry, the broker's, the cluster's and the connection
//! budgets; `services.rs` those that open the services (firmware, forwarder, engines, jobs,
//! commands); `http.rs` those of the API server.

mod http;
mod services;

pub(super) use http::*;
pub(super) use services::*;

use crate::admission::{self, BudgetSettings, Budgets};
use crate::api::{self, TokenSet};
use crate::broker::{Broker, BrokerConfig, BrokerHandle, DeviceKey, Downlink, TlsConfig};
use crate::cluster::engines::Engines;
use crate::cluster::epoch::EpochClock;
use crate::cluster::lease::LeaseKeeper;
use crate::cluster::{Cluster, Pending};
use crate::command::Commands;
use crate::config::Settings;
use crate::forwarder::Forwarder;
use crate::ingest::Ingest;
use crate::listen;
use crate::metrics::Metrics;
use crate::ota::OtaEngine;
use crate::registry::{DeviceChange, DeviceObserver, ObserverFuture, Registry, RegistryLimits};
use crate::store::{PostgresReader, Store};
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

/// Cluster mode: the engines' lease keeper and the task that drives the engines while this node
/// holds it ([`EnginesLease::hand_over`] stops both). Nothing on a single node.
pub(super) struct EnginesLease {
    cluster: Option<Arc<Cluster>>,
    /// Stops the task driving the engines (which stops them).
    stop: watch::Sender<bool>,
    drive: Option<JoinHandle<()>>,
    /// Stops the keeper (which releases the lease).
    release: watch::Sender<bool>,
    keeper: Option<JoinHandle<()>>,
}

impl EnginesLease {
    /// Cluster mode: another node is up (heard from within the node timeout) to take the
    /// engines over.
    pub(super) fn others_up(&self) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|c| !c.members().is_empty())
    }

    /// Cluster mode, first thing on a clean stop: the engines stop (no push, batch or timer of
    /// this node after it), then the lease is released and the others hear of it at once, so
    /// one of them drives the engines within moments instead of after the lease's TTL.
    pub(super) async fn hand_over(self) {
        let _ = self.stop.send(true);
        if let Some(drive) = self.drive {
            if tokio::time::timeout(Duration::from_secs(10), drive)
                .await
                .is_err()
            {
                // The lease's fence refuses this node's writes from the release on.
                tracing::warn!("the engines did not stop within 10 s; releasing their lease");
            }
        }
        let _ = self.release.send(true);
        if let Some(keeper) = self.keeper {
            let _ = tokio::time::timeout(Duration::from_secs(5), keeper).await;
        }
        if let Some(cluster) = self.cluster {
            cluster.engines_released().await;
        }
    }
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
    let (release, _) = watch::channel(false);
    let mut lease = EnginesLease {
        cluster: None,
        stop,
        drive: None,
        release,
        keeper: None,
    };
    if let Some(Attached {
        cluster,
        engines_lease,
    }) = attached
    {
        lease.keeper = Some(tokio::spawn(
            engines_lease.clone().run(lease.release.subscribe()),
        ));
        lease.drive = Some(tokio::spawn(crate::cluster::engines::drive(
            cluster.clone(),
            engines_lease.clone(),
            engines,
            lease.stop.subscribe(),
        )));
        lease.cluster = Some(cluster.clone());
    }
    lease
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
