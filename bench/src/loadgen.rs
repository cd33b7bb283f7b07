//! The load generator: rumqttc v4 clients, one `EventLoop` per client, all in this process.
//!
//! - [`connect_all`]: connect many clients with signed Link CONNECTs, at most `concurrency`
//!   handshakes at a time; per-client handshake time is TCP connect → CONNACK.
//! - [`flood`]: every connected client publishes `messages` QoS1 messages with at most `window`
//!   unacknowledged (rumqttc's in-flight limit); latency is publish (leaving rumqttc's state)
//!   → PUBACK.
//! - [`Subscriber`]: one wildcard QoS1 subscriber counting distinct messages, to catch silent
//!   loss in a relay.
//!
//! A client never reconnects: rumqttc would on the next `poll` after an error, so every loop
//! stops at the first error and counts it.

use crate::api::Device;
use crate::stats::Latency;
use fleetgate_topics::sign::{LinkCredentials, SignMethod};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

/// MQTT + TCP connect timeout of one client (rumqttc's default of 5 s fails under storms).
const CONNECT_TIMEOUT_S: u64 = 30;
const KEEP_ALIVE: Duration = Duration::from_secs(120);

/// rumqttc options for a device: Link credentials (hmacsha256, securemode 3, ms timestamp).
pub fn options(broker: SocketAddr, d: &Device, window: u16) -> MqttOptions {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.as_millis().to_string())
        .ok();
    let c = LinkCredentials::new(
        &d.product_key,
        &d.device_name,
        &d.device_secret,
        SignMethod::HmacSha256,
        3,
        ts,
    );
    let mut o = MqttOptions::new(c.client_id, broker.ip().to_string(), broker.port());
    o.set_credentials(c.username, c.password)
        .set_keep_alive(KEEP_ALIVE)
        .set_clean_session(true)
        .set_inflight(window.max(1))
        .set_request_channel_capacity(usize::from(window.max(1)) * 2)
        .set_max_packet_size(64 * 1024, 64 * 1024);
    o
}

/// A connected client.
pub struct Connected {
    pub client: AsyncClient,
    pub eventloop: EventLoop,
}

/// Polls until CONNACK. `Err` carries a short reason.
pub async fn connect_one(opts: MqttOptions) -> Result<Connected, String> {
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    eventloop
        .network_options
        .set_connection_timeout(CONNECT_TIMEOUT_S);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                return if ack.code == ConnectReturnCode::Success {
                    Ok(Connected { client, eventloop })
                } else {
                    Err(format!("refused: {:?}", ack.code))
                };
            }
            Ok(_) => {}
            Err(e) => return Err(short_error(&e.to_string())),
        }
    }
}

fn short_error(e: &str) -> String {
    e.chars().take(60).collect()
}

/// Outcome of a connect storm.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnectStats {
    pub attempted: usize,
    pub connected: usize,
    pub failed: usize,
    /// First attempt → last CONNACK.
    pub elapsed_s: f64,
    pub rate_per_s: f64,
    pub handshake: Latency,
    pub errors: BTreeMap<String, usize>,
}

/// Connects every device, at most `concurrency` handshakes in flight. Returns the clients in
/// device order (`None` where the connect failed).
pub async fn connect_all(
    broker: SocketAddr,
    devices: &[Device],
    concurrency: usize,
    window: u16,
) -> (ConnectStats, Vec<Option<Connected>>) {
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    for (i, d) in devices.iter().enumerate() {
        let opts = options(broker, d, window);
        let sem = Arc::clone(&sem);
        let tx = tx.clone();
        tokio::spawn(async move {
            let Ok(_permit) = sem.acquire_owned().await else {
                return;
            };
            let t = Instant::now();
            let outcome = connect_one(opts).await;
            let _ = tx.send((i, outcome, t.elapsed(), Instant::now()));
        });
    }
    drop(tx);
    // Slot i is device i: a flood publishes on the topics of the device at its index.
    let mut slots: Vec<Option<Connected>> = devices.iter().map(|_| None).collect();
    let mut handshakes = Vec::with_capacity(devices.len());
    let mut errors = BTreeMap::new();
    let mut last = started;
    while let Some((i, outcome, took, at)) = rx.recv().await {
        match outcome {
            Ok(c) => {
                slots[i] = Some(c);
                handshakes.push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
                last = last.max(at);
            }
            Err(e) => *errors.entry(e).or_insert(0) += 1,
        }
    }
    let elapsed = last.duration_since(started).as_secs_f64();
    let connected = slots.iter().filter(|c| c.is_some()).count();
    let stats = ConnectStats {
        attempted: devices.len(),
        connected,
        failed: devices.len() - connected,
        elapsed_s: elapsed,
        rate_per_s: if elapsed > 0.0 {
            connected as f64 / elapsed
        } else {
            0.0
        },
        handshake: Latency::from_micros(&mut handshakes),
        errors,
    };
    (stats, slots)
}

/// Connected clients kept alive (keep-alive pings answered) until [`Idle::close`].
pub struct Idle {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    pub dropped: Arc<AtomicU64>,
    /// Successful SUBACKs received.
    pub subscribed: Arc<AtomicU64>,
}

impl Idle {
    /// Keeps the clients polled; a client given a filter first subscribes to it (QoS1).
    pub fn hold(clients: Vec<(Connected, Option<String>)>) -> Idle {
        let (stop, stop_rx) = watch::channel(false);
        let dropped = Arc::new(AtomicU64::new(0));
        let subscribed = Arc::new(AtomicU64::new(0));
        let tasks = clients
            .into_iter()
            .map(|(mut c, filter)| {
                let mut stop_rx = stop_rx.clone();
                let dropped = Arc::clone(&dropped);
                let subscribed = Arc::clone(&subscribed);
                tokio::spawn(async move {
                    let client = c.client;
                    if let Some(filter) = filter {
                        // Queued in rumqttc's request channel; sent by the polls below.
                        if client.subscribe(filter, QoS::AtLeastOnce).await.is_err() {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    loop {
                        tokio::select! {
                            _ = stop_rx.wait_for(|s| *s) => return,
                            r = c.eventloop.poll() => match r {
                                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                                    if ack.return_codes.iter().all(|c| {
                                        matches!(c, rumqttc::SubscribeReasonCode::Success(_))
                                    }) {
                                        subscribed.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                Ok(_) => {}
                                Err(_) => {
                                    dropped.fetch_add(1, Ordering::Relaxed);
                                    return;
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Idle {
            stop,
            tasks,
            dropped,
            subscribed,
        }
    }

    /// Waits until `n` SUBACKs arrived or `timeout` passed; returns how many arrived.
    pub async fn wait_subscribed(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.subscribed.load(Ordering::Relaxed);
            if got >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Closes every socket (drops the clients) and waits for the tasks.
    pub async fn close(self) {
        self.stop.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// What a client publishes: topic and payload of message `seq` of client `client`.
pub type MessageFn = Arc<dyn Fn(usize, usize) -> (String, Vec<u8>) + Send + Sync>;

/// Outcome of a flood.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FloodStats {
    pub clients: usize,
    pub sent: u64,
    pub acked: u64,
    /// First publish → last PUBACK.
    pub elapsed_s: f64,
    pub acked_per_s: f64,
    pub latency: Latency,
    pub client_errors: BTreeMap<String, usize>,
    /// Clients that got every PUBACK.
    pub complete_clients: usize,
}

/// One flooding client: publishes `messages` QoS 1 messages (`make(index, seq)`) and counts
/// its PUBACKs until they are all in, its connection fails or `give_up` comes.
async fn flood_one(
    index: usize,
    c: Connected,
    messages: usize,
    make: MessageFn,
    give_up: tokio::time::Instant,
) -> ClientOutcome {
    let Connected {
        client,
        mut eventloop,
    } = c;
    let producer = tokio::spawn(async move {
        for seq in 0..messages {
            let (topic, payload) = make(index, seq);
            if client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                return;
            }
        }
        // Keep `client` (the request channel) alive until the event loop is done.
        std::future::pending::<()>().await;
    });
    let mut out = ClientOutcome::default();
    let mut sent_at: HashMap<u16, Instant> = HashMap::new();
    while out.acked < messages as u64 {
        match tokio::time::timeout_at(give_up, eventloop.poll()).await {
            Err(_) => {
                out.error = Some("deadline".into());
                break;
            }
            Ok(Err(e)) => {
                out.error = Some(short_error(&e.to_string()));
                break;
            }
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                out.sent += 1;
                sent_at.insert(pkid, Instant::now());
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                if let Some(t) = sent_at.remove(&ack.pkid) {
                    out.acked += 1;
                    out.latencies
                        .push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                    out.last_ack = Some(Instant::now());
                }
            }
            Ok(Ok(_)) => {}
        }
    }
    producer.abort();
    out
}

/// Every client publishes `messages` QoS1 messages. Stops at `deadline` at the latest.
pub async fn flood(
    clients: Vec<Connected>,
    messages: usize,
    make: MessageFn,
    deadline: Duration,
) -> FloodStats {
    let n = clients.len();
    let started = Instant::now();
    let give_up = tokio::time::Instant::now() + deadline;
    let mut tasks = Vec::with_capacity(n);
    for (index, c) in clients.into_iter().enumerate() {
        let make = Arc::clone(&make);
        tasks.push(tokio::spawn(flood_one(index, c, messages, make, give_up)));
    }
    let mut stats = FloodStats {
        clients: n,
        sent: 0,
        acked: 0,
        elapsed_s: 0.0,
        acked_per_s: 0.0,
        latency: Latency::default(),
        client_errors: BTreeMap::new(),
        complete_clients: 0,
    };
    let mut latencies = Vec::with_capacity(n * messages);
    let mut last = started;
    for t in tasks {
        let Ok(out) = t.await else {
            *stats
                .client_errors
                .entry("task panicked".into())
                .or_insert(0) += 1;
            continue;
        };
        stats.sent += out.sent;
        stats.acked += out.acked;
        if out.acked == messages as u64 {
            stats.complete_clients += 1;
        }
        if let Some(e) = out.error {
            *stats.client_errors.entry(e).or_insert(0) += 1;
        }
        if let Some(at) = out.last_ack {
            last = last.max(at);
        }
        latencies.extend(out.latencies);
    }
    stats.elapsed_s = last.duration_since(started).as_secs_f64();
    if stats.elapsed_s > 0.0 {
        stats.acked_per_s = stats.acked as f64 / stats.elapsed_s;
    }
    stats.latency = Latency::from_micros(&mut latencies);
    stats
}

#[derive(Default)]
struct ClientOutcome {
    sent: u64,
    acked: u64,
    latencies: Vec<u32>,
    last_ack: Option<Instant>,
    error: Option<String>,
}

/// One QoS1 wildcard subscriber that counts distinct `(publisher, seq)` messages.
pub struct Subscriber {
    task: JoinHandle<SubscriberStats>,
    publishers_done: Arc<AtomicBool>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SubscriberStats {
    pub expected: u64,
    pub received: u64,
    pub duplicates: u64,
    pub unparsable: u64,
    /// Flood start → last distinct message received.
    pub elapsed_s: f64,
    pub received_per_s: f64,
    pub error: Option<String>,
}

impl Subscriber {
    /// Connects and subscribes (waits for the SUBACK). `started` is set by [`Subscriber::run`].
    pub async fn connect(
        broker: SocketAddr,
        filter: &str,
        inflight: u16,
    ) -> anyhow::Result<Connected> {
        let mut o = MqttOptions::new("bench-subscriber", broker.ip().to_string(), broker.port());
        o.set_keep_alive(KEEP_ALIVE)
            .set_inflight(inflight)
            .set_max_packet_size(64 * 1024, 64 * 1024);
        let mut c = connect_one(o).await.map_err(anyhow::Error::msg)?;
        c.client.subscribe(filter, QoS::AtLeastOnce).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), c.eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => return Ok(c),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => anyhow::bail!("subscriber: {e}"),
                Err(_) => anyhow::bail!("no SUBACK in 10 s"),
            }
        }
    }

    /// Starts counting. Message identity: publisher index from the topic's last segment
    /// (`devNNNNN`) and `seq` from the payload's leading `{"id":"SEQ"`.
    pub fn run(
        c: Connected,
        publishers: usize,
        messages: usize,
        started: Instant,
        idle_after_done: Duration,
    ) -> Subscriber {
        let publishers_done = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&publishers_done);
        let task = tokio::spawn(async move {
            let Connected {
                client: _client,
                mut eventloop,
            } = c;
            let expected = (publishers * messages) as u64;
            let mut seen = vec![0u64; (publishers * messages).div_ceil(64)];
            let mut stats = SubscriberStats {
                expected,
                received: 0,
                duplicates: 0,
                unparsable: 0,
                elapsed_s: 0.0,
                received_per_s: 0.0,
                error: None,
            };
            let mut last = started;
            while stats.received < expected {
                // Publishers still running: wait long; once they are done, stop after a quiet
                // spell (what did not arrive by then is lost).
                let wait = if done.load(Ordering::Relaxed) {
                    idle_after_done
                } else {
                    Duration::from_secs(60)
                };
                match tokio::time::timeout(wait, eventloop.poll()).await {
                    Err(_) => break,
                    Ok(Err(e)) => {
                        stats.error = Some(short_error(&e.to_string()));
                        break;
                    }
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        let Some(i) = message_index(&p.topic, &p.payload, messages)
                            .filter(|i| *i < publishers * messages)
                        else {
                            stats.unparsable += 1;
                            continue;
                        };
                        let (w, b) = (i / 64, 1u64 << (i % 64));
                        if seen[w] & b != 0 {
                            stats.duplicates += 1;
                        } else {
                            seen[w] |= b;
                            stats.received += 1;
                            last = Instant::now();
                        }
                    }
                    Ok(Ok(_)) => {}
                }
            }
            stats.elapsed_s = last.duration_since(started).as_secs_f64();
            if stats.elapsed_s > 0.0 {
                stats.received_per_s = stats.received as f64 / stats.elapsed_s;
            }
            stats
        });
        Subscriber {
            task,
            publishers_done,
        }
    }

    /// Tells the subscriber the publishers are done, and waits for its count.
    pub async fn finish(self) -> anyhow::Result<SubscriberStats> {
        self.publishers_done.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

fn message_index(topic: &str, payload: &[u8], messages: usize) -> Option<usize> {
    let publisher: usize = topic
        .rsplit('/')
        .next()?
        .strip_prefix("dev")?
        .parse()
        .ok()?;
    let rest = payload.strip_prefix(b"{\"id\":\"")?;
    let end = rest.iter().position(|b| *b == b'"')?;
    let seq: usize = std::str::from_utf8(&rest[..end]).ok()?.parse().ok()?;
    (seq < messages).then_some(publisher * messages + seq)
}

/// A JSON payload padded to exactly `size` bytes (when the content is shorter) through its
/// `desc` field. `kind` is `inform` (version report) or `progress` (step report).
pub fn payload(kind: PayloadKind, seq: usize, version: &str, size: usize) -> Vec<u8> {
    let build = |pad: &str| match kind {
        PayloadKind::Inform => format!(
            r#"{{"id":"{seq}","version":"1.0","method":"thing.ota.inform","params":{{"version":"{version}","module":"MCU","desc":"{pad}"}}}}"#
        ),
        PayloadKind::Progress => format!(
            r#"{{"id":"{seq}","version":"1.0","method":"thing.ota.progress","params":{{"step":"{}","module":"MCU","desc":"{pad}"}}}}"#,
            seq % 100 + 1
        ),
    };
    let bare = build("");
    let pad = "x".repeat(size.saturating_sub(bare.len()));
    build(&pad).into_bytes()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum PayloadKind {
    Inform,
    Progress,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse_and_have_the_size() {
        let inform = payload(PayloadKind::Inform, 7, "2.0.7-r1", 200);
        assert_eq!(inform.len(), 200);
        let req = fleetgate_topics::InformRequest::parse(&inform).unwrap();
        assert_eq!(req.params.version, "2.0.7-r1");
        assert_eq!(req.params.module, "MCU");
        let progress = payload(PayloadKind::Progress, 41, "", 200);
        assert_eq!(progress.len(), 200);
        fleetgate_topics::ProgressRequest::parse(&progress).unwrap();
    }

    #[test]
    fn message_identity() {
        let p = payload(PayloadKind::Inform, 12, "v", 200);
        assert_eq!(
            message_index("/ota/device/inform/pk/dev00003", &p, 100),
            Some(312)
        );
        assert_eq!(message_index("/ota/device/inform/pk/x", &p, 100), None);
        assert_eq!(message_index("/a/dev00001", &p, 10), None);
    }
}
