//! One simulated device: a tokio task owning its MQTT connection, with a small state machine
//! (starting → connecting → online ⇄ offline/rebooting → stopped), telemetry, and at most one
//! upgrade per module running as a child task.
//!
//! The device task owns the connection; an upgrade task never touches it. Upgrades talk to
//! their device through [`Cmd`]s (publish this, go offline, I am done — reboot), so a reboot or
//! an injected outage is simply the device task ending one session and starting the next. Every
//! topic and payload comes from `fleetgate_topics`; nothing here writes a topic string.
//!
//! Shared state is limited to [`DeviceRecord`] (the device's outcome, behind a std mutex that is
//! never held across an `.await`) and the fleet's atomic counters.

mod ota;
mod telemetry;
mod upgrade;

use upgrade::Job;

use crate::faults::{device_rng, TerminalFault, UpgradeContext, UpgradeFaults};
use crate::firmware::{self, Download};
use crate::fleet::Shared;
use crate::report::{
    DeviceOutcome, DeviceState, UpgradeRecord, UpgradeResult, MAX_UPGRADE_RECORDS,
};
use crate::scenario::PropertyKind;
use crate::DeviceSpec;
use fleetgate_topics::sign::{LinkCredentials, SignMethod};
use fleetgate_topics::{
    catalog, EventPostRequest, FirmwareGetReply, FirmwareGetRequest, InformRequest, Item,
    ProgressRequest, ProgressStep, PropertyPostRequest, Reply, Topic, TopicKind, UpgradeData,
    UpgradeMessage,
};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet,
    QoS, SubscribeFilter,
};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::{interval_at, Interval, MissedTickBehavior};

/// RNG salt of a device's own choices (jitter, telemetry values).
pub(crate) const SALT_DEVICE: u64 = 0x4445_5649_4345_3031;

/// Pending replies kept per device; older ones count as missing when more are outstanding.
const MAX_PENDING_REPLIES: usize = 256;

/// What is shared between a device task, its upgrade tasks and the fleet handle.
pub(crate) struct DeviceRecord {
    pub spec: DeviceSpec,
    pub sign_method: SignMethod,
    /// The device's place in the fleet's list (which broker entry point it uses).
    pub index: usize,
    outcome: Mutex<DeviceOutcome>,
    next_id: AtomicU32,
}

impl DeviceRecord {
    pub fn new(
        spec: DeviceSpec,
        sign_method: SignMethod,
        versions: BTreeMap<String, String>,
        index: usize,
    ) -> Self {
        let outcome = DeviceOutcome {
            product_key: spec.product_key.clone(),
            device_name: spec.device_name.clone(),
            sign_method: sign_method.as_str().to_owned(),
            state: DeviceState::Starting,
            connects: 0,
            connect_failures: 0,
            connect_refused: 0,
            versions,
            upgrades: Vec::new(),
            property_posts: 0,
            event_posts: 0,
            replies_ok: 0,
            replies_error: 0,
            replies_missing: 0,
            last_error: None,
        };
        DeviceRecord {
            spec,
            sign_method,
            index,
            outcome: Mutex::new(outcome),
            next_id: AtomicU32::new(1),
        }
    }

    /// A copy of the device's outcome so far.
    pub fn outcome(&self) -> DeviceOutcome {
        self.with(|o| o.clone())
    }

    fn with<R>(&self, f: impl FnOnce(&mut DeviceOutcome) -> R) -> R {
        // Poisoning only means a device task panicked while holding it: the data is still a
        // valid outcome, so keep reporting it.
        let mut g = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    fn with_upgrade(&self, seq: u32, f: impl FnOnce(&mut UpgradeRecord)) {
        self.with(|o| {
            if let Some(u) = o.upgrades.iter_mut().rev().find(|u| u.seq == seq) {
                f(u)
            }
        })
    }

    /// A fresh Alink message id.
    fn next_id(&self) -> u32 {
        self.next_id.fetch_add(1, Relaxed)
    }

    fn topic(&self, kind: TopicKind, identifier: Option<&str>) -> String {
        // Device names are validated when the fleet starts, so this never comes out empty.
        Topic::from_kind(
            kind,
            self.spec.product_key.as_str(),
            self.spec.device_name.as_str(),
            identifier,
        )
        .map(|t| t.to_string())
        .unwrap_or_default()
    }
}

/// Messages from an upgrade task to its device task.
enum Cmd {
    Publish {
        topic: String,
        payload: Vec<u8>,
        ota: bool,
    },
    /// Drop the connection, stay away for `duration`, then reconnect and answer `resume`.
    Offline {
        duration: Duration,
        resume: oneshot::Sender<()>,
    },
    /// The upgrade ended; `reboot` carries the version to boot into.
    Done {
        seq: u32,
        module: String,
        result: UpgradeResult,
        reboot: Option<String>,
    },
}

/// How one MQTT session ended.
enum SessionEnd {
    Shutdown,
    /// Connection error: retry after the delay.
    Error(Duration),
    /// Injected outage.
    Offline(Duration),
    /// Rebooting into new firmware.
    Reboot(Duration),
}

struct Active {
    seq: u32,
    push_id: u64,
    to_version: String,
    started: Instant,
    abort: AbortHandle,
}

/// Runs one device until the fleet's shutdown signal.
pub(crate) async fn run(rec: Arc<DeviceRecord>, sh: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    let mut d = Device::new(rec, sh);
    let mut shutdown = shutdown;
    d.run(&mut shutdown).await;
    d.finish();
}

struct Device {
    rec: Arc<DeviceRecord>,
    sh: Arc<Shared>,
    rng: ChaCha8Rng,
    state: DeviceState,
    versions: BTreeMap<String, String>,
    /// Current numeric value of each random-walk/counter property.
    values: Vec<f64>,
    pending: VecDeque<(String, Instant)>,
    post_seq: u64,
    active: HashMap<String, Active>,
    attempts: HashMap<(String, String), u32>,
    upgrade_seq: u32,
    cmd_tx: Option<mpsc::Sender<Cmd>>,
    cmd_rx: Option<mpsc::Receiver<Cmd>>,
    resume: Vec<oneshot::Sender<()>>,
    /// Upgrades that end once the device is back from its reboot and has reported its version.
    after_reboot: Vec<(u32, UpgradeResult, Instant)>,
    connected_once: bool,
    first_attempt_done: bool,
    backoff: f64,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn qos(kind: TopicKind) -> QoS {
    match catalog().qos(kind) {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Sleeps unless the fleet stops first; `false` = stopping.
async fn sleep_or_stop(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.changed() => false,
    }
}

async fn tick(i: &mut Option<Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn recv(rx: &mut Option<mpsc::Receiver<Cmd>>) -> Option<Cmd> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Device {
    fn new(rec: Arc<DeviceRecord>, sh: Arc<Shared>) -> Self {
        let mut rng = device_rng(sh.seed, &rec.spec.device_name, SALT_DEVICE);
        let values = sh
            .telemetry
            .properties
            .iter()
            .map(|p| match p.kind {
                // Devices do not all start at the same reading.
                PropertyKind::RandomWalk if p.step > 0.0 => {
                    (p.start + rng.gen_range(-3.0..=3.0) * p.step).clamp(p.min, p.max)
                }
                _ => p.start,
            })
            .collect();
        let versions = rec.with(|o| o.versions.clone());
        let backoff = sh.mqtt.reconnect_backoff_secs[0];
        Device {
            rec,
            sh,
            rng,
            state: DeviceState::Starting,
            versions,
            values,
            pending: VecDeque::new(),
            post_seq: 0,
            active: HashMap::new(),
            attempts: HashMap::new(),
            upgrade_seq: 0,
            cmd_tx: None,
            cmd_rx: None,
            resume: Vec::new(),
            after_reboot: Vec::new(),
            connected_once: false,
            first_attempt_done: false,
            backoff,
        }
    }

    fn set_state(&mut self, new: DeviceState) {
        let old = self.state;
        if old == new {
            return;
        }
        if old == DeviceState::Online {
            self.sh.stats.online.fetch_sub(1, Relaxed);
        }
        if new == DeviceState::Online {
            self.sh.stats.online.fetch_add(1, Relaxed);
        }
        self.state = new;
        self.rec.with(|o| o.state = new);
    }

    fn first_attempt(&mut self) {
        if !self.first_attempt_done {
            self.first_attempt_done = true;
            self.sh.stats.first_attempts_done.fetch_add(1, Relaxed);
        }
    }

    async fn run(&mut self, shutdown: &mut watch::Receiver<bool>) {
        let jitter = self.sh.mqtt.start_jitter_secs;
        let wait = if jitter > 0.0 {
            self.rng.gen_range(0.0..jitter)
        } else {
            0.0
        };
        if !sleep_or_stop(secs(wait), shutdown).await {
            return;
        }
        loop {
            self.set_state(DeviceState::Connecting);
            let slot = self.sh.pacer.reserve();
            tokio::select! {
                _ = tokio::time::sleep_until(slot) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            let (client, mut el) = self.connection();
            let end = self.session(&client, &mut el, shutdown).await;
            let pause = match end {
                SessionEnd::Shutdown => {
                    disconnect(&client, &mut el).await;
                    return;
                }
                SessionEnd::Error(delay) => {
                    self.set_state(DeviceState::Offline);
                    delay
                }
                SessionEnd::Offline(d) => {
                    // A network loss: no DISCONNECT, the socket just goes away.
                    drop(el);
                    self.set_state(DeviceState::Offline);
                    d
                }
                SessionEnd::Reboot(d) => {
                    disconnect(&client, &mut el).await;
                    self.set_state(DeviceState::Rebooting);
                    d
                }
            };
            if !sleep_or_stop(pause, shutdown).await {
                return;
            }
        }
    }

    fn connection(&self) -> (AsyncClient, EventLoop) {
        let m = &self.sh.mqtt;
        let spec = &self.rec.spec;
        let ts = m.timestamp.then(|| unix_ms().to_string());
        let c = LinkCredentials::new(
            &spec.product_key,
            &spec.device_name,
            &spec.device_secret,
            self.rec.sign_method,
            3,
            ts,
        );
        let (host, port) = self.sh.entry(self.rec.index);
        let mut o = MqttOptions::new(c.client_id, host, port);
        o.set_credentials(c.username, c.password);
        o.set_keep_alive(Duration::from_secs(m.keep_alive_secs.max(1)));
        o.set_clean_session(true);
        // Few messages are ever in flight per device; the default (100) costs ~10 KB each.
        o.set_inflight(16);
        o.set_max_packet_size(64 * 1024, 64 * 1024);
        let (client, mut el) = AsyncClient::new(o, 32);
        let mut net = NetworkOptions::new();
        net.set_connection_timeout(m.connect_timeout_secs.max(1));
        el.set_network_options(net);
        (client, el)
    }

    async fn session(
        &mut self,
        client: &AsyncClient,
        el: &mut EventLoop,
        shutdown: &mut watch::Receiver<bool>,
    ) -> SessionEnd {
        let mut online = false;
        let mut telemetry: Option<Interval> = None;
        let mut pull: Option<Interval> = None;
        loop {
            // Ticks and upgrade commands wait until the device is online: cancelling `poll`
            // mid-connect would only restart the handshake.
            tokio::select! {
                _ = shutdown.changed() => return SessionEnd::Shutdown,
                ev = el.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        online = true;
                        self.on_connected(client);
                        telemetry = self.interval(self.sh.telemetry.interval_secs);
                        pull = self.interval(self.sh.ota.pull_interval_secs);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => self.on_publish(client, &p.topic, &p.payload),
                    Ok(_) => {}
                    Err(e) => return self.on_error(e, online),
                },
                _ = tick(&mut telemetry), if online => self.post_telemetry(client),
                _ = tick(&mut pull), if online => self.pull(client),
                cmd = recv(&mut self.cmd_rx), if online => {
                    if let Some(end) = cmd.and_then(|c| self.on_cmd(client, c)) {
                        return end;
                    }
                }
            }
        }
    }

    /// A periodic timer with a random phase, so devices do not post in lockstep.
    fn interval(&mut self, period: f64) -> Option<Interval> {
        if period <= 0.0 {
            return None;
        }
        let phase = self.rng.gen_range(0.0..period);
        let mut i = interval_at(tokio::time::Instant::now() + secs(phase), secs(period));
        i.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Some(i)
    }

    fn publish(&self, client: &AsyncClient, topic: String, kind: TopicKind, payload: Vec<u8>) {
        if client
            .try_publish(topic, qos(kind), false, payload)
            .is_err()
        {
            self.sh.stats.publish_dropped.fetch_add(1, Relaxed);
        }
    }

    fn on_connected(&mut self, client: &AsyncClient) {
        let st = &self.sh.stats;
        st.connects.fetch_add(1, Relaxed);
        self.rec.with(|o| o.connects += 1);
        if !self.connected_once {
            self.connected_once = true;
            st.ever_connected.fetch_add(1, Relaxed);
            st.last_first_connect_ms
                .fetch_max(self.sh.now_ms(), Relaxed);
        }
        self.first_attempt();
        self.backoff = self.sh.mqtt.reconnect_backoff_secs[0];
        self.set_state(DeviceState::Online);

        // Clean sessions: subscribe again on every connect. Only what this device will use, as
        // every filter costs the broker memory.
        let mut filters = vec![SubscribeFilter::new(
            self.rec.topic(TopicKind::Upgrade, None),
            QoS::AtLeastOnce,
        )];
        let sh = self.sh.clone();
        let ota = &sh.ota;
        if ota.pull_on_connect || ota.pull_interval_secs > 0.0 {
            filters.push(SubscribeFilter::new(
                self.rec.topic(TopicKind::FirmwareGetReply, None),
                QoS::AtMostOnce,
            ));
        }
        let tel = &self.sh.telemetry;
        if tel.interval_secs > 0.0 && tel.reply_timeout_secs > 0.0 {
            filters.push(SubscribeFilter::new(
                self.rec.topic(TopicKind::PropertyPostReply, None),
                QoS::AtMostOnce,
            ));
            for e in &tel.events {
                filters.push(SubscribeFilter::new(
                    self.rec
                        .topic(TopicKind::EventPostReply, Some(&e.identifier)),
                    QoS::AtMostOnce,
                ));
            }
        }
        if client.try_subscribe_many(filters).is_err() {
            self.sh.stats.publish_dropped.fetch_add(1, Relaxed);
        }

        // Like the Link SDK: report every module's version after connecting.
        for (module, version) in &self.versions {
            let p = InformRequest::new(self.rec.next_id(), version.clone(), module.clone());
            self.publish(
                client,
                self.rec.topic(TopicKind::Inform, None),
                TopicKind::Inform,
                p.to_vec(),
            );
        }
        let now = self.sh.now_ms();
        for (seq, result, started) in std::mem::take(&mut self.after_reboot) {
            self.sh.stats.ota_activity(now);
            self.end_upgrade(seq, result, started);
        }
        for r in self.resume.drain(..) {
            let _ = r.send(());
        }
        if ota.pull_on_connect {
            self.pull(client);
        }
    }

    fn on_error(&mut self, e: ConnectionError, was_online: bool) -> SessionEnd {
        let st = &self.sh.stats;
        let msg = match &e {
            ConnectionError::ConnectionRefused(code) => {
                st.connect_refused.fetch_add(1, Relaxed);
                self.rec.with(|o| o.connect_refused += 1);
                format!("CONNACK refused: {code:?}")
            }
            e if was_online => {
                st.disconnects.fetch_add(1, Relaxed);
                format!("connection lost: {e}")
            }
            e => {
                st.connect_failures.fetch_add(1, Relaxed);
                self.rec.with(|o| o.connect_failures += 1);
                format!("connect failed: {e}")
            }
        };
        tracing::debug!(device = %self.rec.spec.device_name, %msg);
        self.rec.with(|o| o.last_error = Some(msg));
        self.first_attempt();
        let [lo, hi] = self.sh.mqtt.reconnect_backoff_secs;
        let delay = if was_online {
            lo
        } else {
            let d = self.backoff;
            self.backoff = (self.backoff * 2.0).min(hi);
            d
        };
        // ±25 % so that a fleet dropped at once does not come back at once.
        SessionEnd::Error(secs(delay * self.rng.gen_range(0.75..1.25)))
    }

    fn on_publish(&mut self, client: &AsyncClient, topic: &str, payload: &[u8]) {
        let Some(t) = Topic::parse(topic) else { return };
        if t.product_key() != self.rec.spec.product_key
            || t.device_name() != self.rec.spec.device_name
        {
            return;
        }
        let st = &self.sh.stats;
        match t.kind() {
            TopicKind::Upgrade => {
                st.pushes_received.fetch_add(1, Relaxed);
                st.ota_activity(self.sh.now_ms());
                match UpgradeMessage::parse(payload) {
                    Ok(m) => self.start_upgrade(client, m.data, m.id, "push"),
                    Err(e) => {
                        st.bad_pushes.fetch_add(1, Relaxed);
                        self.rec
                            .with(|o| o.last_error = Some(format!("bad upgrade push: {e}")));
                    }
                }
            }
            TopicKind::FirmwareGetReply => {
                st.ota_activity(self.sh.now_ms());
                match FirmwareGetReply::parse(payload) {
                    Ok(FirmwareGetReply::Upgrade { id, data }) => {
                        st.get_replies_upgrade.fetch_add(1, Relaxed);
                        self.start_upgrade(client, data, id.parse().unwrap_or(0), "pull");
                    }
                    Ok(_) => {
                        st.get_replies_none.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        st.bad_pushes.fetch_add(1, Relaxed);
                        self.rec
                            .with(|o| o.last_error = Some(format!("bad get_reply: {e}")));
                    }
                }
            }
            TopicKind::PropertyPostReply | TopicKind::EventPostReply => self.on_reply(payload),
            _ => {}
        }
    }

    /// After the run: stop child upgrades, count replies that are overdue by now.
    fn finish(&mut self) {
        for (_, a) in std::mem::take(&mut self.active) {
            a.abort.abort();
            self.end_upgrade(a.seq, UpgradeResult::Interrupted, a.started);
        }
        for (seq, result, started) in std::mem::take(&mut self.after_reboot) {
            // Stopped while rebooting: the new version was never reported.
            let _ = result;
            self.end_upgrade(seq, UpgradeResult::Interrupted, started);
        }
        let timeout = secs(self.sh.telemetry.reply_timeout_secs);
        self.pending.retain(|(_, at)| at.elapsed() >= timeout);
        let missing = self.pending.len() as u64;
        if missing > 0 {
            self.sh.stats.replies_missing.fetch_add(missing, Relaxed);
            self.rec.with(|o| o.replies_missing += missing);
        }
        self.set_state(DeviceState::Stopped);
    }
}

/// Sends DISCONNECT and gives the event loop a moment to write it.
async fn disconnect(client: &AsyncClient, el: &mut EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match el.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}
