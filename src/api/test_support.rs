//! Tests: an [`ApiState`] with every component, built as the app builds them (forwarding off,
//! an MQTT router no device connects to, the OTA engine not started).

use super::{ApiState, TokenSet};
use crate::broker::{Broker, BrokerConfig};
use crate::clock::Clock;
use crate::command::{CommandSettings, Commands, LatestProperties};
use crate::config::ExportSettings;
use crate::export::ExportService;
use crate::forwarder::Forwarder;
use crate::metrics::Metrics;
use crate::migration::{Hooks, MigrationEngine};
use crate::ota::{FirmwareRepo, OtaEngine};
use crate::registry::Registry;
use crate::store::Store;
use std::path::Path;
use std::sync::Arc;

impl ApiState {
    /// Every component over `store` and `registry`, export packages in `dir`; no extra health
    /// fields, no revocation hook, always ready, single node. Override fields with struct
    /// update syntax (`ApiState { forwarder, ..ApiState::for_tests(…) }`). Needs a tokio
    /// runtime.
    pub(crate) fn for_tests(
        dir: &Path,
        store: Store,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        tokens: TokenSet,
        firmware: Arc<FirmwareRepo>,
    ) -> ApiState {
        let broker = Broker::new(
            BrokerConfig {
                max_connections: 16,
                ..BrokerConfig::default()
            },
            metrics.clone(),
        )
        .expect("MQTT router");
        let downlink = broker.downlink();
        let clock = Clock::system();
        let ota = OtaEngine::open(
            registry.clone(),
            store.clone(),
            firmware.clone(),
            Arc::new(downlink.clone()),
            clock.clone(),
            crate::ota::EngineConfig::default(),
            metrics.clone(),
        )
        .expect("OTA engine");
        let migration = MigrationEngine::start(
            registry.clone(),
            store.clone(),
            metrics.clone(),
            crate::migration::EngineConfig::default(),
            Hooks::default(),
            clock,
        )
        .expect("migration engine");
        let export = ExportService::open(
            dir,
            store.clone(),
            registry.clone(),
            firmware.clone(),
            ota.clone(),
            migration.clone(),
            ExportSettings::default(),
            Arc::new(|_: &str, _: &str| {}),
            crate::export::Start::Running,
        )
        .expect("export service");
        let forwarder = Forwarder::disabled(store.clone(), registry.clone(), metrics.clone())
            .expect("forwarder");
        let properties =
            LatestProperties::load(store, registry.clone()).expect("latest properties");
        let commands = Commands::new(
            downlink,
            registry.clone(),
            metrics.clone(),
            CommandSettings::default(),
            properties,
        )
        .with_forwarder(forwarder.clone());
        ApiState {
            registry,
            metrics,
            tokens: Arc::new(tokens),
            firmware,
            ota,
            export,
            health: Arc::new(|| serde_json::Value::Object(Default::default())),
            on_device_revoked: Arc::new(|_, _| {}),
            migration,
            forwarder,
            ready: Arc::new(|| (true, serde_json::Value::Object(Default::default()))),
            cluster: None,
            commands: Arc::new(commands),
            console_sessions: Arc::default(),
            forward_proxy_header: false,
        }
    }
}
