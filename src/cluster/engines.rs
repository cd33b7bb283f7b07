//! The engines in a cluster: ONE node at a time — the holder of the [`ENGINES`] lease —
//! drives the OTA engine (its timers, its global push rate, timeouts, retries) and the
//! migration engine (its batches of device moves, data-sync expiry, sweeps); every other node
//! keeps its OTA engine in standby, relaying what its devices report to the holder, and its
//! migration engine as a mirror of the holder's documents (kept current from the feed).
//!
//! - **Term** ([`drive`]): taking the lease activates the engines (everything reloaded from
//!   PostgreSQL, reconciled with the registry; running migration tasks resume from their last
//!   committed batch), then the node serves `fg.{name}.engines` and
//!   announces itself as the holder in its heartbeats; losing it stops serving and deactivates
//!   the engine. Every write the engine makes carries the lease's fence, so a node that
//!   stalled past its term cannot overwrite the next holder's work.
//! - **Reports**: connects and version reports — the hot path, one per device report — reach
//!   the holder by the change feed it already receives: its feed receiver hands the other
//!   nodes' `Session` (online) and `Version` items to the engine ([`Cluster::engine_report`]),
//!   so a follower's ingest sends nothing more for them and never waits for the holder.
//!   Progress reports, `firmware/get` (which waits for the answer) and device deletions are
//!   not in the feed: a follower's standby engine sends each as a NATS request on
//!   `fg.{name}.engines` ([`EnginesRelay`]), which only the holder subscribes. No responders
//!   (no holder during a takeover) means nobody applied it: the follower asks again until the
//!   next holder answers (for up to twice the lease's TTL plus the answer timeout, then it is
//!   dropped and counted), so a failure code reported in the middle of a takeover is not lost;
//!   a holder whose term ended while it applied one answers "not applied" (`NOT_APPLIED`),
//!   and the follower asks again the same way. The next holder reconciles versions and
//!   connects from the registry.
//! - **Pushes** ([`ClusterPusher`]): the holder publishes an upgrade through the node that
//!   holds the device's connection ([`Cluster::deliver`]); "online" means online on any node.
//! - **API** (`crate::api::cluster::engines_proxy`): OTA, firmware, migration and
//!   export/import calls that reach a follower are proxied to the holder's HTTP address from
//!   its heartbeat.

use super::lease::{LeaseKeeper, ENGINES};
use super::Cluster;
use crate::broker::DeviceKey;
use crate::export::ExportService;
use crate::migration::MigrationEngine;
use crate::ota::{DeviceReport, Handled, OtaEngine, Pusher, Relay};
use crate::registry::Registry;
use fleetgate_topics::UpgradeData;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How many workers apply relayed reports on the holder (one device's reports always go to
/// the same worker, so they apply in the order they were sent).
const WORKERS: usize = 16;
/// How long a follower waits for the holder's answer to a relayed report.
const RELAY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a follower asks again while no node holds the engines' lease.
const NO_HOLDER_RETRY: Duration = Duration::from_millis(100);
/// The holder's answer to a relayed report it did not apply ([`Handled::NotApplied`]: its term
/// ended meanwhile). Any other answer is the report's answer, an `Option<UpgradeData>`.
const NOT_APPLIED: &[u8] = br#"{"not_applied":true}"#;

/// Where the OTA engine is driven, as this node knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnginesAt {
    /// This node holds the lease and its engine is active.
    Here,
    /// Another node announces it holds the lease; its HTTP address.
    Node { node: u16, http: String },
    /// No node announces it (a takeover in progress).
    Nobody,
}

impl Cluster {
    /// Where the engines run now (for the API proxy).
    pub fn engines_at(&self) -> EnginesAt {
        if self.engines_held.load(Ordering::Acquire) {
            return EnginesAt::Here;
        }
        self.members()
            .into_iter()
            .filter(|m| m.engines)
            .max_by_key(|m| m.heard_ms)
            .map_or(EnginesAt::Nobody, |m| EnginesAt::Node {
                node: m.node,
                http: m.http,
            })
    }

    /// Hands another node's connect or version report, applied from the feed, to this node's
    /// engine while it drives it (in the order the feed applies them); nothing otherwise.
    pub(super) fn engine_report(
        reports: &Option<mpsc::UnboundedSender<DeviceReport>>,
        report: impl FnOnce() -> DeviceReport,
    ) {
        if let Some(reports) = reports {
            let _ = reports.send(report());
        }
    }

    /// Where the feed receiver hands reports to the engine now (`None`: not the holder).
    pub(super) fn engine_reports(&self) -> Option<mpsc::UnboundedSender<DeviceReport>> {
        self.engine_reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_engine_reports(&self, reports: Option<mpsc::UnboundedSender<DeviceReport>>) {
        *self
            .engine_reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = reports;
    }

    /// This node's keeper of the engines' lease (`lease_ttl_ms`).
    pub fn engines_lease(&self) -> Arc<LeaseKeeper> {
        self.engines_keeper
            .get_or_init(|| {
                Arc::new(LeaseKeeper::new(
                    ENGINES,
                    self.node,
                    Duration::from_millis(self.settings.lease_ttl_ms),
                    self.shared.clone(),
                ))
            })
            .clone()
    }

    /// This node stopped its engines and released their lease (a clean stop): it says so in a
    /// heartbeat now, and every node hearing it tries to take the lease at once.
    pub async fn engines_released(&self) {
        self.engines_held.store(false, Ordering::Release);
        self.beat().await;
        let _ = self.client.flush().await;
    }

    /// Node `node` announced it no longer drives the engines: this node's keeper tries to take
    /// the lease now (it fails, harmlessly, if the lease is not free yet).
    pub(super) fn engines_let_go(&self, node: u16) {
        if let Some(keeper) = self.engines_keeper.get() {
            tracing::info!(node, "the engines' node let them go; taking the lease over");
            keeper.try_now();
        }
    }
}

/// A follower's relay: each report is a request on `fg.{name}.engines`.
pub struct EnginesRelay {
    cluster: Arc<Cluster>,
}

impl EnginesRelay {
    pub fn new(cluster: Arc<Cluster>) -> EnginesRelay {
        EnginesRelay { cluster }
    }
}

impl Relay for EnginesRelay {
    fn forward(&self, report: DeviceReport) -> BoxFuture<'_, Option<UpgradeData>> {
        Box::pin(async move {
            let body: bytes::Bytes = serde_json::to_vec(&report).ok()?.into();
            // No holder (a takeover: the next one takes the lease within its TTL plus one
            // attempt) means nobody applied it: asked again until a holder answers, so a
            // report the device got its PUBACK for is not lost to a takeover. A timeout is not
            // retried (the holder may have applied it).
            let patience =
                Duration::from_millis(self.cluster.settings.lease_ttl_ms * 2) + RELAY_TIMEOUT;
            let deadline = tokio::time::Instant::now() + patience;
            loop {
                let request = self
                    .cluster
                    .client
                    .request(self.cluster.subjects.engines.clone(), body.clone());
                match tokio::time::timeout(RELAY_TIMEOUT, request).await {
                    // The node answering lost the lease while applying it: asked again, like
                    // no holder, so the next holder applies it.
                    Ok(Ok(reply))
                        if reply.payload.as_ref() == NOT_APPLIED
                            && tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(NO_HOLDER_RETRY).await;
                    }
                    Ok(Ok(reply)) if reply.payload.as_ref() == NOT_APPLIED => {
                        self.cluster.metrics.cluster.engine_reports_dropped.inc();
                        tracing::warn!(?report, "report not applied by the engines' node in time");
                        return None;
                    }
                    Ok(Ok(reply)) => {
                        self.cluster.metrics.cluster.engine_reports_relayed.inc();
                        return serde_json::from_slice::<Option<UpgradeData>>(&reply.payload)
                            .ok()
                            .flatten();
                    }
                    Ok(Err(error))
                        if error.kind() == async_nats::RequestErrorKind::NoResponders
                            && tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(NO_HOLDER_RETRY).await;
                    }
                    Ok(Err(error)) => {
                        self.cluster.metrics.cluster.engine_reports_dropped.inc();
                        tracing::warn!(%error, ?report, "report not relayed to the engines' node");
                        return None;
                    }
                    Err(_) => {
                        self.cluster.metrics.cluster.engine_reports_dropped.inc();
                        tracing::warn!(
                            ?report,
                            "the engines' node did not answer a relayed report"
                        );
                        return None;
                    }
                }
            }
        })
    }
}

/// The holder's pusher: a device is online when any node holds its connection, and its
/// upgrade goes out through that node.
pub struct ClusterPusher {
    cluster: Arc<Cluster>,
    registry: Arc<Registry>,
}

impl ClusterPusher {
    pub fn new(cluster: Arc<Cluster>, registry: Arc<Registry>) -> ClusterPusher {
        ClusterPusher { cluster, registry }
    }
}

impl Pusher for ClusterPusher {
    fn is_connected(&self, product_key: &str, device_name: &str) -> bool {
        self.registry.session_of(product_key, device_name).is_some()
    }

    fn publish(&self, topic: String, _payload: Vec<u8>) -> Result<(), String> {
        Err(format!("{topic}: a push in a cluster names its device"))
    }

    fn push_to(
        &self,
        product_key: &str,
        device_name: &str,
        topic: String,
        payload: Vec<u8>,
    ) -> Result<(), String> {
        let cluster = self.cluster.clone();
        let device = DeviceKey {
            product_key: product_key.to_owned(),
            device_name: device_name.to_owned(),
        };
        // The task is NOTIFIED (durable) already; a push that finds the device gone is
        // recovered like a lost one on one node (reconnect, re-push, firmware/get).
        tokio::spawn(async move {
            match cluster.deliver(&device, topic, payload.into(), true).await {
                Ok(super::Delivered::Sent { .. }) => {}
                Ok(super::Delivered::Offline) => tracing::info!(
                    pk = %device.product_key,
                    dn = %device.device_name,
                    "upgrade push found the device offline"
                ),
                Err(error) => tracing::warn!(
                    %error,
                    pk = %device.product_key,
                    dn = %device.device_name,
                    "upgrade push not delivered"
                ),
            }
        });
        Ok(())
    }
}

/// What the holder of the engines' lease drives.
pub struct Engines {
    pub ota: OtaEngine,
    pub migration: Arc<MigrationEngine>,
    pub export: ExportService,
}

/// Follows the lease: activates the engines for each term this node holds it and serves relayed
/// reports meanwhile; deactivates them when the term ends. Runs until `stop`: then the engines
/// stop — the OTA engine's progress written and its deadline task ended, the migration
/// actor's batch finished — before it returns, and only then may the keeper release the lease
/// ([`hand_over`]), so nothing of this term is pushed or moved after another node took it.
pub async fn drive(
    cluster: Arc<Cluster>,
    keeper: Arc<LeaseKeeper>,
    engines: Engines,
    mut stop: watch::Receiver<bool>,
) {
    let Engines {
        ota,
        migration,
        export,
    } = engines;
    let mut term = keeper.watch();
    loop {
        let held = *term.borrow_and_update();
        let serving = match held {
            Some(epoch) => {
                // Registered before the engine loads: what the feed applies meanwhile waits in
                // the channel and is applied once the engine drives (a report handled before
                // would be dropped by the standby engine).
                let (reports, local) = mpsc::unbounded_channel();
                cluster.set_engine_reports(Some(reports));
                match ota.activate().await {
                    Ok(()) => {}
                    Err(error) => {
                        // Retried at the next change of the lease; the writes of a half-loaded
                        // engine are fenced like any other.
                        tracing::error!(%error, epoch, "cannot load the OTA engine for this term");
                    }
                }
                // Running tasks resume from their last committed batch.
                if let Err(error) = migration.activate().await {
                    tracing::error!(%error, epoch, "cannot load the migration engine for this term");
                }
                // Jobs the previous holder left running are marked FAILED.
                if let Err(error) = export.activate().await {
                    tracing::error!(%error, epoch, "cannot load the export/import jobs for this term");
                }
                match cluster
                    .client
                    .subscribe(cluster.subjects.engines.clone())
                    .await
                {
                    Ok(requests) => {
                        cluster.engines_held.store(true, Ordering::Release);
                        cluster.metrics.cluster.engine_terms.inc();
                        tracing::info!(epoch, "driving the engines");
                        Some(tokio::spawn(serve(
                            cluster.clone(),
                            requests,
                            local,
                            ota.clone(),
                        )))
                    }
                    Err(error) => {
                        tracing::error!(%error, "cannot serve relayed reports");
                        None
                    }
                }
            }
            None => {
                cluster.set_engine_reports(None);
                cluster.engines_held.store(false, Ordering::Release);
                ota.deactivate().await;
                migration.deactivate().await;
                None
            }
        };
        let changed = tokio::select! {
            r = term.changed() => r.is_ok(),
            _ = stop.wait_for(|s| *s) => false,
        };
        if let Some(task) = serving {
            task.abort();
        }
        if !changed {
            // Still announced as the holder until the lease is released (`hand_over`): the
            // others try to take it as soon as this node says it no longer holds it.
            cluster.set_engine_reports(None);
            ota.shutdown().await;
            ota.deactivate().await;
            migration.shutdown().await;
            return;
        }
    }
}

/// The holder's side of `fg.{name}.engines`, and of the reports its feed receiver hands over
/// (`local`: no answer is sent for those).
async fn serve(
    cluster: Arc<Cluster>,
    mut requests: async_nats::Subscriber,
    mut local: mpsc::UnboundedReceiver<DeviceReport>,
    ota: OtaEngine,
) {
    let mut workers = Vec::with_capacity(WORKERS);
    let mut handles = Vec::with_capacity(WORKERS);
    for _ in 0..WORKERS {
        let (tx, mut rx) = mpsc::unbounded_channel::<(DeviceReport, Option<async_nats::Subject>)>();
        let (cluster, ota) = (cluster.clone(), ota.clone());
        handles.push(tokio::spawn(async move {
            while let Some((report, reply)) = rx.recv().await {
                let Some(reply) = reply else {
                    // From this node's feed receiver: a report lost to the end of the term is
                    // covered by the next holder's reconcile.
                    ota.handle_report(report).await;
                    continue;
                };
                let body = match ota.handle_relayed(report).await {
                    Handled::Applied(answer) => serde_json::to_vec(&answer).unwrap_or_default(),
                    Handled::NotApplied => NOT_APPLIED.to_vec(),
                };
                let _ = cluster.client.publish(reply, body.into()).await;
            }
        }));
        workers.push(tx);
    }
    // Aborting this task drops the senders: the workers finish what they hold and end.
    loop {
        let (report, reply) = tokio::select! {
            Some(report) = local.recv() => (report, None),
            Some(message) = requests.next() => {
                let Some(reply) = message.reply else {
                    continue;
                };
                match serde_json::from_slice::<DeviceReport>(&message.payload) {
                    Ok(report) => (report, Some(reply)),
                    Err(error) => {
                        tracing::warn!(%error, "malformed relayed report ignored");
                        continue;
                    }
                }
            }
            else => return,
        };
        let mut hash = std::collections::hash_map::DefaultHasher::new();
        report.device().hash(&mut hash);
        let worker = (hash.finish() % WORKERS as u64) as usize;
        let _ = workers[worker].send((report, reply));
    }
}
