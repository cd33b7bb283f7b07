//! The receiving side of the change feed: one task applies the other nodes' messages to this
//! node's registry (and to the document followers, [`super::follow`]) in each origin's order,
//! answers settle requests once it has applied what they ask for, keeps the member table, and
//! resynchronises from the store whenever it may have missed something.

use super::feed::{self, FeedMessage, Item, Position, Verdict};
use super::follow::{self, DocFollower, Followers};
use super::members::{Heard, Heartbeat};
use super::{epoch, Cluster, SettleRequest};
use crate::broker::{DeviceKey, DisconnectReason, Downlink};
use crate::clock::now_ms;
use crate::ota::DeviceReport;
use crate::registry::{Registry, SessionEvent, Superseded};
use crate::store::{Op, StoreError};
use async_nats::{Event, Subject, Subscriber};
use futures_util::StreamExt;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;

/// Why the receiver reloads from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resync {
    /// An origin's message numbers skipped.
    Gap { origin: u16 },
    /// An origin's heartbeat says it published messages that never arrived.
    Behind { origin: u16 },
    /// NATS reconnected, or dropped messages for this slow consumer.
    Link,
    /// Applying a message failed (the store could not be read).
    Failed,
    /// A node is gone, and the store has changes of it that it never announced.
    Unannounced { origin: u16 },
}

pub(super) struct Receiver {
    cluster: Arc<Cluster>,
    registry: Arc<Registry>,
    downlink: Downlink,
    positions: HashMap<u16, Position>,
    /// Settle requests waiting for a message still to be applied.
    parked: Vec<(SettleRequest, Subject)>,
    /// Per origin: the position its previous heartbeat reported.
    reported: HashMap<u16, u64>,
    /// Document followers taken on ([`super::Cluster::follow_docs`]).
    followers: Followers,
    /// Followers registered and not yet taken on.
    joining: Option<mpsc::UnboundedReceiver<Arc<dyn DocFollower>>>,
}

impl Receiver {
    pub(super) fn new(
        cluster: Arc<Cluster>,
        registry: Arc<Registry>,
        downlink: Downlink,
        cuts: BTreeMap<u16, u64>,
        joining: Option<mpsc::UnboundedReceiver<Arc<dyn DocFollower>>>,
    ) -> Receiver {
        Receiver {
            cluster,
            registry,
            downlink,
            positions: positions(cuts),
            parked: Vec::new(),
            reported: HashMap::new(),
            followers: Followers::default(),
            joining,
        }
    }

    pub(super) async fn run(
        mut self,
        mut feed: Subscriber,
        mut settle: Subscriber,
        mut heartbeat: Subscriber,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) {
        let period = Duration::from_millis(self.cluster.settings.heartbeat_ms);
        let mut expiry = tokio::time::interval(period);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut registrations = self.joining.take();
        loop {
            let resync = tokio::select! {
                Some(m) = feed.next() => self.on_feed(&m.payload).await,
                Some(m) = settle.next() => {
                    self.on_settle(&m.payload, m.reply).await;
                    None
                }
                Some(m) = heartbeat.next() => self.on_heartbeat(&m.payload),
                Some(e) = events.recv() => self.on_event(e),
                Some(f) = joining(&mut registrations) => self.take_on(f).await,
                _ = expiry.tick() => self.expire().await,
                else => return,
            };
            if let Some(why) = resync {
                self.resync(why).await;
            }
        }
    }

    async fn on_feed(&mut self, payload: &[u8]) -> Option<Resync> {
        let message = match feed::decode(payload) {
            Ok(m) => m,
            Err(error) => {
                tracing::warn!(%error, "malformed feed message ignored");
                return None;
            }
        };
        if message.node == self.cluster.node {
            return None;
        }
        let origin = message.node;
        let at = self.positions.entry(origin).or_default();
        match at.judge(message.seq, message.part) {
            Verdict::Old => None,
            Verdict::Gap => Some(Resync::Gap { origin }),
            Verdict::Apply => {
                let (seq, last) = (message.seq, message.last);
                if let Err(error) = self.apply(message).await {
                    tracing::warn!(%error, origin, seq, "cannot apply a feed message");
                    return Some(Resync::Failed);
                }
                self.positions.entry(origin).or_default().advance(seq, last);
                self.cluster.metrics.cluster.feed_applied.inc();
                self.answer_parked().await;
                None
            }
        }
    }

    /// Applies one message: configuration first (re-read from the store, so it is current),
    /// then sessions, versions and releases in their order.
    async fn apply(&self, message: FeedMessage) -> Result<(), StoreError> {
        self.refresh_configuration(&message.items).await?;
        let shared = &self.cluster.shared;
        // Documents after the configuration: an instance deleted with its documents is gone
        // from the registry when the followers hear of them.
        let docs = self
            .followers
            .keys(message.items.iter().filter_map(|item| match item {
                Item::Doc { kind, id } => Some((kind.as_str(), id.as_str())),
                _ => None,
            }));
        self.followers.apply(shared.as_ref(), docs).await?;
        self.apply_events(message.items);
        Ok(())
    }

    /// Re-reads the instances, products and devices the message names from the store (so
    /// they are current) into the registry; a device whose record ended its local session is
    /// disconnected.
    async fn refresh_configuration(&self, items: &[Item]) -> Result<(), StoreError> {
        let mut instances = BTreeSet::new();
        let mut products = BTreeSet::new();
        let mut devices = BTreeSet::new();
        for item in items {
            match item {
                Item::Instance { id } => {
                    instances.insert(id.clone());
                }
                Item::Product { pk } => {
                    products.insert(pk.clone());
                }
                Item::Device { pk, dn } => {
                    devices.insert((pk.clone(), dn.clone()));
                }
                _ => {}
            }
        }
        let shared = &self.cluster.shared;
        if !instances.is_empty() {
            let ids: Vec<String> = instances.into_iter().collect();
            let mut found: HashMap<String, _> = shared
                .instances(ids.clone())
                .await?
                .into_iter()
                .map(|i| (i.instance_id.clone(), i))
                .collect();
            for id in ids {
                match found.remove(&id) {
                    Some(record) => self.registry.refresh_instance(record),
                    // Deleted through another node.
                    None => self.registry.forget_instance(&id),
                }
            }
        }
        if !products.is_empty() {
            let keys: Vec<String> = products.into_iter().collect();
            let mut found: HashMap<String, _> = shared
                .products(keys.clone())
                .await?
                .into_iter()
                .map(|p| (p.product_key.clone(), p))
                .collect();
            for pk in keys {
                let record = found.remove(&pk);
                for ended in self.registry.refresh_product(&pk, record).await {
                    self.end_local(&ended, DisconnectReason::Kicked);
                }
            }
        }
        if !devices.is_empty() {
            let keys: Vec<(String, String)> = devices.into_iter().collect();
            let mut found: HashMap<(String, String), _> = shared
                .devices(keys.clone())
                .await?
                .into_iter()
                .map(|d| {
                    (
                        (d.record.product_key.clone(), d.record.device_name.clone()),
                        d,
                    )
                })
                .collect();
            for key in keys {
                let stored = found.remove(&key);
                if let Some(ended) = self.registry.refresh_device(&key.0, &key.1, stored).await {
                    self.end_local(&ended, DisconnectReason::Kicked);
                }
            }
        }
        Ok(())
    }

    /// Sessions, versions and node releases, in the message's order; versions and devices
    /// coming online are reported to the engines.
    fn apply_events(&self, items: Vec<Item>) {
        let engine = self.cluster.engine_reports();
        for item in items {
            match item {
                Item::Session {
                    pk,
                    dn,
                    epoch,
                    online,
                    at_ms,
                    ip,
                } => {
                    let event = SessionEvent {
                        epoch,
                        online,
                        at_ms,
                        client_ip: ip,
                    };
                    if let Some(ended) = self.registry.apply_session(&pk, &dn, &event) {
                        self.end_local(&ended, DisconnectReason::TakenOver);
                    }
                    if online {
                        Cluster::engine_report(&engine, || DeviceReport::Online { pk, dn });
                    }
                }
                Item::Version {
                    pk,
                    dn,
                    module,
                    version,
                } => {
                    self.registry.apply_version(&pk, &dn, &module, &version);
                    Cluster::engine_report(&engine, || DeviceReport::Version {
                        pk,
                        dn,
                        module,
                        version,
                    });
                }
                Item::NodeReleased {
                    node,
                    before_ms,
                    at_ms,
                } => self.released(node, before_ms, at_ms),
                Item::Instance { .. }
                | Item::Product { .. }
                | Item::Device { .. }
                | Item::Doc { .. } => {}
            }
        }
    }

    /// Takes a document follower on: it gets every document of its kinds first, read now, so
    /// whatever this receiver applied before is in it; the changes of later messages follow.
    /// A failed read makes the receiver resynchronise, which reloads every follower.
    async fn take_on(&mut self, follower: Arc<dyn DocFollower>) -> Option<Resync> {
        self.followers.add(follower.clone());
        match follow::take_on(self.cluster.shared.as_ref(), follower.as_ref()).await {
            Ok(()) => None,
            Err(error) => {
                tracing::warn!(%error, "cannot read the documents of a new follower");
                Some(Resync::Failed)
            }
        }
    }

    /// Sessions of `node` drawn before `before_ms` ended. When `node` is this one and the
    /// release covers this incarnation, the others counted it as gone: its sessions can no
    /// longer stand, and its devices reconnect (through the balancer) to be counted again.
    fn released(&self, node: u16, before_ms: i64, at_ms: i64) {
        if node != self.cluster.node {
            self.registry.release_node(node, before_ms, at_ms);
            return;
        }
        if before_ms > self.cluster.boot_ms {
            let ended = self.downlink.kick_all();
            tracing::warn!(
                sessions = ended,
                "another node released this node's devices (it was counted as gone): sessions ended"
            );
        }
    }

    /// Ends a session of this node that a change elsewhere superseded.
    fn end_local(&self, ended: &Superseded, reason: DisconnectReason) {
        if epoch::node_of(ended.epoch) != self.cluster.node {
            return;
        }
        let device = DeviceKey {
            product_key: ended.product_key.clone(),
            device_name: ended.device_name.clone(),
        };
        if self.downlink.retire(&device, ended.epoch, reason) {
            self.cluster.metrics.cluster.sessions_ended.inc();
            tracing::info!(
                pk = %device.product_key,
                dn = %device.device_name,
                ?reason,
                "session ended by a change on another node"
            );
        }
    }

    async fn on_settle(&mut self, payload: &[u8], reply: Option<Subject>) {
        let (Ok(request), Some(reply)) = (serde_json::from_slice::<SettleRequest>(payload), reply)
        else {
            return;
        };
        if request.origin == self.cluster.node {
            return;
        }
        if self.applied(request.origin) >= request.seq {
            self.confirm(reply).await;
        } else {
            self.parked.push((request, reply));
        }
    }

    fn applied(&self, origin: u16) -> u64 {
        self.positions.get(&origin).map_or(0, |p| p.applied)
    }

    async fn confirm(&self, reply: Subject) {
        let body = serde_json::to_vec(&self.cluster.node).unwrap_or_default();
        let _ = self.cluster.client.publish(reply, body.into()).await;
    }

    async fn answer_parked(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|(r, _)| self.applied(r.origin) >= r.seq);
        self.parked = waiting;
        for (_, reply) in ready {
            self.confirm(reply).await;
        }
    }

    fn on_heartbeat(&mut self, payload: &[u8]) -> Option<Resync> {
        let hb: Heartbeat = serde_json::from_slice(payload).ok()?;
        if hb.node == self.cluster.node {
            return None;
        }
        let (origin, seq) = (hb.node, hb.seq);
        let (heard, let_go) = {
            let mut members = self
                .cluster
                .members
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let held = members.drives_engines(origin);
            let heard = members.heard(hb.clone(), now_ms());
            (heard, held && !members.drives_engines(origin))
        };
        if let_go {
            self.cluster.engines_let_go(origin);
        }
        match heard {
            Heard::Joined => tracing::info!(node = origin, mqtt = %hb.mqtt, "node joined"),
            Heard::Restarted { boot_ms } => {
                let released = self.registry.release_node(origin, boot_ms, boot_ms);
                tracing::info!(node = origin, released, "node restarted");
            }
            Heard::Known => {}
        }
        // What the previous heartbeat announced must have arrived by now (one period later).
        let behind = self
            .reported
            .insert(origin, seq)
            .is_some_and(|before| self.applied(origin) < before);
        behind.then_some(Resync::Behind { origin })
    }

    fn on_event(&mut self, event: Event) -> Option<Resync> {
        let cut = &self.cluster.cut_since_ms;
        match event {
            Event::Disconnected => {
                let _ = cut.compare_exchange(0, now_ms(), Ordering::AcqRel, Ordering::Acquire);
                tracing::warn!("NATS connection lost; reconnecting");
                None
            }
            Event::Connected => {
                let was_cut = cut.swap(0, Ordering::AcqRel) != 0;
                tracing::info!("NATS connection (re)established");
                was_cut.then_some(Resync::Link)
            }
            Event::SlowConsumer(_) => Some(Resync::Link),
            _ => None,
        }
    }

    /// Nodes not heard from for the node timeout are gone: their devices go offline here, and
    /// the lowest-numbered live node records that in the store (which announces it). A node
    /// that died between a commit and its announcement left changes nobody heard of: when the
    /// store says it committed more than this node applied, this node resynchronises.
    async fn expire(&mut self) -> Option<Resync> {
        let now = now_ms();
        let (gone, lowest) = {
            let mut members = self
                .cluster
                .members
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let gone = members.expire(now, self.cluster.settings.node_timeout_ms as i64);
            let lowest = members
                .ids()
                .into_iter()
                .chain([self.cluster.node])
                .min()
                .unwrap_or(self.cluster.node);
            (gone, lowest)
        };
        let mut resync = None;
        for member in gone {
            match self.cluster.shared.feed_position(member.node).await {
                Ok(committed) if committed > self.applied(member.node) => {
                    resync = Some(Resync::Unannounced {
                        origin: member.node,
                    });
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, node = member.node, "cannot read a gone node's feed position");
                    resync = Some(Resync::Failed);
                }
            }
            let released = self.registry.release_node(member.node, now, now);
            self.reported.remove(&member.node);
            tracing::warn!(
                node = member.node,
                released,
                "node gone (no heartbeat): its devices are offline"
            );
            if lowest == self.cluster.node {
                drop(self.registry.store().submit(vec![Op::ReleaseNode {
                    node: member.node,
                    before_ms: now,
                    at_ms: now,
                }]));
            }
        }
        resync
    }

    /// Reloads everything from the store (retrying until it can be read), ends this node's
    /// sessions that the store says were superseded, and continues from the snapshot's feed
    /// positions.
    async fn resync(&mut self, why: Resync) {
        self.cluster.ready.store(false, Ordering::Release);
        tracing::warn!(?why, "resynchronising the registry from the store");
        let mut backoff = Duration::from_millis(100);
        let snapshot = loop {
            match self.cluster.shared.snapshot().await {
                Ok(snapshot) => break snapshot,
                Err(error) => {
                    tracing::warn!(%error, "cannot read the store to resynchronise; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        let cuts = snapshot.feed_cuts.clone();
        let resynced = self.registry.resync(snapshot).await;
        for e in &resynced.ended {
            self.end_local(e, DisconnectReason::TakenOver);
        }
        // A version report whose feed message never arrived is only in the store: the
        // engines' holder hears of it now, as of any version report.
        let engine = self.cluster.engine_reports();
        for v in resynced.versions {
            Cluster::engine_report(&engine, || DeviceReport::Version {
                pk: v.product_key,
                dn: v.device_name,
                module: v.module,
                version: v.version,
            });
        }
        // The followers' documents are read after the snapshot: what they get is at least as
        // recent as the feed positions the receiver continues from.
        let mut backoff = Duration::from_millis(100);
        while let Err(error) = self.followers.reload(self.cluster.shared.as_ref()).await {
            tracing::warn!(%error, "cannot read the followed documents to resynchronise; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        // Positions only move forward: messages applied after the snapshot was read stay
        // applied (their numbers are above the cut).
        for (origin, at) in positions(cuts) {
            let p = self.positions.entry(origin).or_default();
            if at.applied > p.applied {
                *p = at;
            }
        }
        self.reported.clear();
        self.cluster.metrics.cluster.resyncs.inc();
        self.cluster.ready.store(true, Ordering::Release);
        self.answer_parked().await;
    }
}

/// The next follower registered; `None` at once without a registrations' channel (the
/// receiver's `select!` then skips the branch).
async fn joining(
    joining: &mut Option<mpsc::UnboundedReceiver<Arc<dyn DocFollower>>>,
) -> Option<Arc<dyn DocFollower>> {
    match joining {
        Some(rx) => rx.recv().await,
        None => None,
    }
}

fn positions(cuts: BTreeMap<u16, u64>) -> HashMap<u16, Position> {
    cuts.into_iter()
        .map(|(node, seq)| {
            (
                node,
                Position {
                    applied: seq,
                    parts: 0,
                },
            )
        })
        .collect()
}
