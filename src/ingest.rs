//! Ingest: what the gateway does with device traffic. Implements the broker's
//! [`DeviceHooks`]: credentials and connection events go to the registry; every upstream
//! publish is parsed with the shared protocol crate, applied to the registry and answered on
//! its `_reply` topic where the protocol has one.
//!
//! OTA (when an [`OtaEngine`] is attached with [`Ingest::with_ota`]): a version report goes to
//! the registry, then to the engine (success, wrong version, DYNAMIC jobs); progress goes to the
//! engine; `firmware/get` is answered with the device's pending upgrade; a connect releases
//! pushes queued while the device was offline.
//!
//! The broker writes a QoS1 PUBACK only after [`DeviceHooks::on_publishes`] returns (a run of
//! a connection's PUBLISHes; see `ingest_run`), so a version report (or an OTA state change
//! from a progress report) that was acknowledged is durable. Malformed payloads are counted,
//! answered with an error code where there is a reply topic, and change nothing.
//!
//! Forwarding (when a [`Forwarder`] is attached and enabled): a valid property or event post is
//! enqueued before `on_publish` returns, so the PUBACK goes out only once the message is durable
//! in the outbox (docs/DESIGN.md §5); its `_reply` goes out at once, or, when the outbox is full,
//! once the outcome is known (see `forward_post`). When the outbox stays full for
//! `amqp.outbox_full_wait_ms`, a QoS 1 post is refused ([`OnFull::Refuse`]): `on_publish`
//! answers [`PublishOutcome::Withheld`], the broker closes the connection without its PUBACK
//! and the device sends it again after reconnecting — an acknowledged post is never dropped. A
//! QoS 0 post (nothing acknowledged) is dropped and counted instead ([`OnFull::Drop`]).
//! Online/offline status messages are enqueued from the connection callbacks (which must not
//! wait) and committed in the background (dropped and counted when the outbox stays full);
//! they keep their order relative to the device's posts because the forwarder hands rows to
//! its writer at call time.

use crate::broker::{
    DeviceCredentials, DeviceHooks, DisconnectReason, Downlink, PublishOutcome, QoS, RunOutcome,
    Session, UpMessage,
};
use crate::clock::now_ms;
use crate::command::Commands;
use crate::forwarder::{ForwardMessage, Forwarder, ForwarderError, OnFull};
use crate::metrics::Metrics;
use crate::ota::OtaEngine;
use crate::registry::{Registry, RegistryError, VersionWrites};
use fleetgate_topics::{
    codes, loose_id, Direction, EventPostRequest, FirmwareGetReply, FirmwareGetRequest,
    InformRequest, PayloadError, ProgressRequest, PropertyPostRequest, Reply, Topic, TopicKind,
};
use prometheus_client::metrics::counter::Counter;
use std::sync::Arc;

/// The gateway's [`DeviceHooks`].
pub struct Ingest {
    registry: Arc<Registry>,
    downlink: Downlink,
    metrics: Arc<Metrics>,
    /// Present and enabled only when AMQP forwarding is on.
    forwarder: Option<Arc<Forwarder>>,
    ota: Option<OtaEngine>,
    /// Cloud-to-device commands: device answers go there, property posts update its snapshots.
    commands: Option<Arc<Commands>>,
    /// `fleetgate_mqtt_messages_total` by topic kind (index: `TopicKind as usize`), then
    /// `other`: looked up once, not per message.
    counted: Vec<Counter>,
}

impl Ingest {
    pub fn new(registry: Arc<Registry>, downlink: Downlink, metrics: Arc<Metrics>) -> Self {
        let labels = TopicKind::ALL.iter().map(|k| k.as_str()).chain(["other"]);
        let counted = labels
            .map(|kind| metrics.messages.get_or_create(&[("kind", kind)]).clone())
            .collect();
        // Exported at 0 from the start, like every family with a closed label set.
        for kind in TopicKind::ALL {
            drop(
                metrics
                    .malformed_messages
                    .get_or_create(&[("kind", kind.as_str())]),
            );
        }
        for reason in ["module_limit", "invalid", "unknown_device", "other"] {
            drop(
                metrics
                    .version_reports_refused
                    .get_or_create(&[("reason", reason)]),
            );
        }
        Ingest {
            counted,
            registry,
            downlink,
            metrics,
            forwarder: None,
            ota: None,
            commands: None,
        }
    }

    /// Hands device answers (property set / service replies, RRPC responses) to `commands`
    /// and keeps its latest-properties snapshots.
    pub fn with_commands(mut self, commands: Arc<Commands>) -> Self {
        self.commands = Some(commands);
        self
    }

    /// A device's answer to a command (`…/thing/service/…_reply`, `…/rrpc/response/…`) of the
    /// session's own device: handed to [`Commands`]. Returns whether the topic was one.
    fn answer(&self, session: &Session, message: &UpMessage<'_>) -> bool {
        let Some(commands) = &self.commands else {
            return false;
        };
        let Some(answer) = fleetgate_topics::downlink::DeviceAnswer::parse(message.topic) else {
            return false;
        };
        self.counted[TopicKind::ALL.len()].inc();
        // The ACL guarantees it already; checked again because a wrong owner here would let a
        // device answer another device's command.
        if answer.product_key() == session.device.product_key
            && answer.device_name() == session.device.device_name
        {
            commands.on_answer(&session.device, &answer, &message.payload);
        }
        true
    }

    /// Routes OTA traffic (version reports, progress, `firmware/get`, connects) to `ota`.
    pub fn with_ota(mut self, ota: OtaEngine) -> Self {
        self.ota = Some(ota);
        self
    }

    /// Forwards device data through `forwarder` (ignored while forwarding is off).
    pub fn with_forwarder(mut self, forwarder: Arc<Forwarder>) -> Self {
        self.forwarder = forwarder.enabled().then_some(forwarder);
        self
    }

    /// Forwards a valid post received with `qos`, waits until it is durable (the caller's
    /// PUBACK depends on it) and answers it on its `_reply` topic when `reply_id` is given.
    ///
    /// The reply goes out at once when the outbox took the message without waiting (so replies
    /// never wait for a commit). When the outbox is full it goes out once the outcome is known:
    /// success if the post was stored; 429 if it was dropped (QoS 0: nothing was acknowledged,
    /// the forwarder counts it); none if it was refused (QoS 1/2: it is
    /// [`Withheld`](PublishOutcome::Withheld), never acknowledged, the connection closes and the
    /// device's resend is answered). A post the outbox failed to store is withheld alike.
    async fn forward_post(
        &self,
        topic: &Topic<'_>,
        qos: QoS,
        reply_id: Option<String>,
        msg: impl FnOnce() -> ForwardMessage,
    ) -> PublishOutcome {
        let success = |id: String| Reply::success(id).to_vec();
        let Some(fwd) = &self.forwarder else {
            if let Some(id) = reply_id {
                self.reply(topic, success(id));
            }
            return PublishOutcome::Processed;
        };
        let acknowledged = qos != QoS::AtMostOnce;
        let on_full = if acknowledged {
            OnFull::Refuse
        } else {
            OnFull::Drop
        };
        let pending = fwd.enqueue(msg(), on_full);
        let waiting = pending.waiting;
        let mut reply_id = reply_id;
        if !waiting {
            if let Some(id) = reply_id.take() {
                self.reply(topic, success(id));
            }
        }
        let stored = pending.await;
        if let Err(error) = &stored {
            if !matches!(error, ForwarderError::OutboxFull) {
                tracing::error!(%error, "cannot store a message for forwarding");
            }
        }
        match (stored, acknowledged) {
            (Ok(()), _) => {
                if let Some(id) = reply_id {
                    self.reply(topic, success(id));
                }
                PublishOutcome::Processed
            }
            (Err(_), true) => PublishOutcome::Withheld,
            (Err(_), false) => {
                if let Some(id) = reply_id {
                    let refusal = Reply::error(
                        id,
                        codes::TOO_MANY_REQUESTS,
                        "the gateway cannot take data now (forwarding outbox full): post dropped",
                    );
                    self.reply(topic, refusal.to_vec());
                }
                PublishOutcome::Processed
            }
        }
    }

    /// Status messages from the (synchronous) connection callbacks: routed and handed to the
    /// outbox writer now, committed in the background.
    fn forward_status(&self, session: &Session, online: bool, at_ms: i64, last_ms: Option<i64>) {
        let Some(fwd) = &self.forwarder else {
            return;
        };
        let d = &session.device;
        let ip = session.client_ip().to_string();
        fwd.enqueue_detached(ForwardMessage::status(
            &d.product_key,
            &d.device_name,
            online,
            Some(&ip),
            at_ms,
            last_ms,
        ));
    }

    /// A version report the registry refused (a module past the device's limit, an invalid
    /// module name or version): dropped, counted by reason. Logged at debug level only: the
    /// device decides how many there are.
    fn version_refused(&self, session: &Session, error: &RegistryError) {
        let reason = match error {
            RegistryError::TooMany { .. } => "module_limit",
            RegistryError::Invalid { .. } => "invalid",
            RegistryError::NotFound { .. } => "unknown_device",
            _ => "other",
        };
        self.metrics
            .version_reports_refused
            .get_or_create(&[("reason", reason)])
            .inc();
        tracing::debug!(
            pk = %session.device.product_key,
            dn = %session.device.device_name,
            reason,
            %error,
            "version report refused"
        );
    }

    fn malformed(&self, kind: TopicKind, session: &Session, error: &PayloadError) {
        self.metrics
            .malformed_messages
            .get_or_create(&[("kind", kind.as_str())])
            .inc();
        tracing::debug!(
            pk = %session.device.product_key,
            dn = %session.device.device_name,
            kind = kind.as_str(),
            %error,
            "malformed message"
        );
    }

    /// Publishes the reply to a request at QoS 0 (every `_reply` topic is QoS 0 in the topic
    /// catalog): straight to the device's session when it is subscribed, else via the router.
    fn reply(&self, topic: &Topic<'_>, body: Vec<u8>) {
        let Some(reply_topic) = topic.reply_topic() else {
            return;
        };
        if let Err(error) = self.downlink.publish_qos0(reply_topic.to_string(), body) {
            tracing::warn!(%error, topic = %reply_topic, "cannot publish reply");
        }
    }

    /// Answers a post that failed to parse with its error code (and counts it).
    fn refuse_post(&self, session: &Session, topic: &Topic<'_>, payload: &[u8], e: &PayloadError) {
        self.malformed(topic.kind(), session, e);
        self.reply(topic, Reply::from_error(loose_id(payload), e).to_vec());
    }

    /// Counts a PUBLISH by topic kind and returns its parsed topic when ingest handles it: an
    /// upstream topic of the session's own device.
    fn accept<'t>(&self, session: &Session, topic: &'t str) -> Option<Topic<'t>> {
        let Some(parsed) = Topic::parse(topic) else {
            // Custom topics (`/{pk}/{dn}/user/...`): allowed by the ACL, nothing consumes them yet.
            self.counted[TopicKind::ALL.len()].inc();
            return None;
        };
        let kind = parsed.kind();
        self.counted[kind as usize].inc();
        // The ACL already guarantees the topic is the session's own; a device publishing on a
        // gateway-to-device topic is ignored.
        (kind.direction() == Direction::Up
            && parsed.product_key() == session.device.product_key
            && parsed.device_name() == session.device.device_name)
            .then_some(parsed)
    }

    /// One run of a connection's PUBLISHes ([`DeviceHooks::on_publishes`]). Version reports are
    /// applied to the registry in arrival order and written with ONE store submission (a
    /// device's later report of the same module replaces its earlier one); the OTA engine
    /// hears of each, in order, once that write is durable. Every other message goes through
    /// [`Self::handle`], concurrently with the write; the run's outcome is theirs (a post the
    /// outbox could not take is withheld).
    async fn ingest_run(&self, session: &Session, run: &[UpMessage<'_>]) -> RunOutcome {
        let mut versions = VersionWrites::default();
        let mut reports: Vec<(Topic<'_>, InformRequest)> = Vec::new();
        // Boxed: the handler's state machine (about 1 KB: every topic kind's locals). The OTA
        // engine's calls box their own, rarely needed, state: before they did, it was ~6 KB,
        // and copying and first touching it per message was ~10% of the inform path's CPU.
        let mut others = Vec::new();
        // The run index of each of `others`.
        let mut other_index = Vec::new();
        for (index, message) in run.iter().enumerate() {
            if self.answer(session, message) {
                continue;
            }
            let Some(parsed) = self.accept(session, message.topic) else {
                continue;
            };
            let payload = &message.payload;
            if parsed.kind() != TopicKind::Inform {
                others.push(Box::pin(self.handle(session, parsed, payload, message.qos)));
                other_index.push(index);
                continue;
            }
            match InformRequest::parse(payload) {
                Ok(req) => {
                    let p = &req.params;
                    match self.registry.stage_version(
                        &mut versions,
                        parsed.product_key(),
                        parsed.device_name(),
                        &p.module,
                        &p.version,
                        now_ms(),
                    ) {
                        Ok(()) => reports.push((parsed, req)),
                        Err(error) => self.version_refused(session, &error),
                    }
                }
                Err(e) => self.malformed(TopicKind::Inform, session, &e),
            }
        }
        let stored = async {
            if reports.is_empty() {
                return Ok(());
            }
            self.registry.commit_versions(versions).await
        };
        let (stored, handled) =
            futures_util::future::join(stored, futures_util::future::join_all(others)).await;
        let mut outcome = RunOutcome::processed();
        for (index, handled) in other_index.into_iter().zip(handled) {
            if handled == PublishOutcome::Withheld {
                outcome.withhold(index);
            }
        }
        match stored {
            Err(error) => {
                let d = &session.device;
                tracing::warn!(%error, pk = %d.product_key, dn = %d.device_name, reports = reports.len(), "version reports not stored");
            }
            Ok(()) => {
                if let Some(ota) = &self.ota {
                    for (topic, req) in &reports {
                        let p = &req.params;
                        ota.on_version(
                            topic.product_key(),
                            topic.device_name(),
                            &p.module,
                            &p.version,
                        )
                        .await;
                    }
                }
            }
        }
        outcome
    }

    /// The answer to a `firmware/get`: the device's pending upgrade of the module, none, or
    /// the error of an unreadable request.
    async fn firmware_get(
        &self,
        session: &Session,
        topic: &Topic<'_>,
        payload: &[u8],
    ) -> FirmwareGetReply {
        let req = match FirmwareGetRequest::parse(payload) {
            Ok(req) => req,
            Err(e) => {
                self.malformed(TopicKind::FirmwareGet, session, &e);
                return FirmwareGetReply::Error {
                    id: loose_id(payload),
                    code: e.reply_code(),
                    message: e.to_string(),
                };
            }
        };
        let pending = match &self.ota {
            Some(ota) => {
                // Boxed: rare, and its state would enlarge every report's future (see
                // `ingest_run`).
                Box::pin(ota.pending_upgrade(
                    topic.product_key(),
                    topic.device_name(),
                    req.module(),
                ))
                .await
            }
            None => None,
        };
        let id = req.id.as_str().to_owned();
        match pending {
            Some(data) => FirmwareGetReply::Upgrade { id, data },
            None => FirmwareGetReply::NoUpgrade { id },
        }
    }

    /// Handles one message; only a forwarded post can be [`PublishOutcome::Withheld`].
    async fn handle(
        &self,
        session: &Session,
        topic: Topic<'_>,
        payload: &[u8],
        qos: QoS,
    ) -> PublishOutcome {
        let kind = topic.kind();
        match kind {
            // Staged and written per run by `ingest_run`.
            TopicKind::Inform => {}
            TopicKind::Progress => match ProgressRequest::parse(payload) {
                Ok(req) => {
                    if let Some(ota) = &self.ota {
                        ota.on_progress(
                            topic.product_key(),
                            topic.device_name(),
                            &req.params.module,
                            req.params.step,
                        )
                        .await;
                    }
                }
                Err(e) => self.malformed(kind, session, &e),
            },
            TopicKind::FirmwareGet => {
                let reply = self.firmware_get(session, &topic, payload).await;
                self.reply(&topic, reply.to_vec());
            }
            TopicKind::PropertyPost => {
                let received = now_ms();
                match PropertyPostRequest::parse(payload) {
                    Ok(req) => {
                        let (pk, dn) = (topic.product_key(), topic.device_name());
                        if let Some(commands) = &self.commands {
                            let items = req.items(received.max(0) as u64);
                            let properties = commands.properties();
                            properties.record(pk, dn, session.conn_id, items, received);
                        }
                        let reply_id = req.wants_reply().then(|| req.id.as_str().to_owned());
                        return self
                            .forward_post(&topic, qos, reply_id, || {
                                ForwardMessage::property_post(pk, dn, &req, received)
                            })
                            .await;
                    }
                    Err(e) => self.refuse_post(session, &topic, payload, &e),
                }
            }
            TopicKind::EventPost => {
                let received = now_ms();
                let identifier = topic.identifier().unwrap_or_default();
                let parsed = EventPostRequest::parse(payload).and_then(|req| {
                    req.check_identifier(identifier)?;
                    Ok(req)
                });
                match parsed {
                    Ok(req) => {
                        let (pk, dn) = (topic.product_key(), topic.device_name());
                        let reply_id = req.wants_reply().then(|| req.id.as_str().to_owned());
                        return self
                            .forward_post(&topic, qos, reply_id, || {
                                ForwardMessage::event_post(pk, dn, identifier, &req, received)
                            })
                            .await;
                    }
                    Err(e) => self.refuse_post(session, &topic, payload, &e),
                }
            }
            // Down kinds never reach here (see `accept`).
            TopicKind::Upgrade
            | TopicKind::FirmwareGetReply
            | TopicKind::PropertyPostReply
            | TopicKind::EventPostReply => {}
        }
        PublishOutcome::Processed
    }
}

impl DeviceHooks for Ingest {
    fn credentials(&self, product_key: &str, device_name: &str) -> Option<DeviceCredentials> {
        self.registry.credentials(product_key, device_name)
    }

    fn on_connect(&self, session: &Session) {
        let d = &session.device;
        if self.forwarder.is_some() {
            // lastTime: the previous contact, read before the connect overwrites it.
            let last = self
                .registry
                .get_device(&d.product_key, &d.device_name)
                .ok()
                .and_then(|dev| dev.last_seen_ms);
            self.forward_status(session, true, session.connected_at_ms, last);
        }
        self.registry.device_connected(
            &d.product_key,
            &d.device_name,
            session.conn_id,
            session.client_ip(),
            session.connected_at_ms,
        );
        if let Some(commands) = &self.commands {
            // Before the CONNACK: the router has the session's link, so what was kept for a
            // persistent session reaches it with its restored subscriptions.
            commands.session_started(d, !session.clean_session);
        }
        if let Some(ota) = &self.ota {
            // Off the connection's path: the CONNACK must not wait for OTA bookkeeping.
            let ota = ota.clone();
            let (pk, dn) = (d.product_key.clone(), d.device_name.clone());
            tokio::spawn(async move { ota.device_online(&pk, &dn).await });
        }
    }

    fn on_disconnect(&self, session: &Session, reason: DisconnectReason) {
        let d = &session.device;
        tracing::debug!(pk = %d.product_key, dn = %d.device_name, ?reason, "device disconnected");
        let at = now_ms();
        // A session taken over by a new connection of the same device: the device stays online.
        if reason != DisconnectReason::TakenOver {
            self.forward_status(session, false, at, Some(at));
        }
        self.registry
            .device_disconnected(&d.product_key, &d.device_name, session.conn_id, at);
    }

    async fn on_publish(&self, session: &Session, message: UpMessage<'_>) -> PublishOutcome {
        self.ingest_run(session, std::slice::from_ref(&message))
            .await
            .get(0)
    }

    async fn on_publishes(&self, session: &Session, run: &[UpMessage<'_>]) -> RunOutcome {
        let cuts = ordered_cuts(run.iter().map(|m| Topic::parse(m.topic).map(|t| t.kind())));
        if cuts.is_empty() {
            return self.ingest_run(session, run).await;
        }
        // A progress report or `firmware/get` after a version report in the same run must see
        // the OTA engine after that report (a wrong version ends the task: a `firmware/get`
        // handled before it would hand out the upgrade of a task about to fail).
        let mut outcome = RunOutcome::processed();
        let mut start = 0;
        for end in cuts.into_iter().chain(std::iter::once(run.len())) {
            let part = self.ingest_run(session, &run[start..end]).await;
            for i in 0..end - start {
                if part.get(i) == PublishOutcome::Withheld {
                    outcome.withhold(start + i);
                }
            }
            start = end;
        }
        outcome
    }
}

/// Where a run must be cut so that the OTA engine hears of messages in their order:
/// [`Ingest::ingest_run`] applies a run's version reports to the engine only after its other
/// messages, so a progress report or `firmware/get` that follows a version report starts a new
/// part. Empty for the common runs (telemetry, or reports alone). `None` kinds are topics
/// ingest does not read.
fn ordered_cuts(kinds: impl Iterator<Item = Option<TopicKind>>) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut inform_in_part = false;
    for (i, kind) in kinds.enumerate() {
        match kind {
            Some(TopicKind::Inform) => inform_in_part = true,
            Some(TopicKind::Progress | TopicKind::FirmwareGet) if inform_in_part => {
                cuts.push(i);
                inform_in_part = false;
            }
            _ => {}
        }
    }
    cuts
}

#[cfg(test)]
mod order_tests {
    use super::*;
    use TopicKind::{FirmwareGet as G, Inform as I, Progress as P, PropertyPost as T};

    #[test]
    fn ota_requests_after_a_version_report_start_a_new_part() {
        let cases: &[(&[Option<TopicKind>], &[usize])] = &[
            (&[], &[]),
            (&[Some(I), Some(I), Some(T)], &[]),
            (&[Some(G), Some(I)], &[]),
            (&[Some(P), Some(T), Some(I)], &[]),
            (&[Some(I), Some(G)], &[1]),
            (&[Some(I), Some(T), Some(P), Some(P)], &[2]),
            (&[Some(I), Some(P), Some(I), None, Some(G)], &[1, 4]),
        ];
        for (kinds, want) in cases {
            assert_eq!(ordered_cuts(kinds.iter().copied()), *want, "{kinds:?}");
        }
    }
}
