//! Test harness: a stock rumqttd broker, a firmware server with `Range` support, and a
//! "gateway" MQTT client that watches devices and pushes upgrades. Everything on 127.0.0.1.

#![allow(dead_code)]

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use fleetgate_topics::{
    FirmwareSignMethod, InformRequest, ProgressRequest, Topic, TopicKind, UpgradeData,
    UpgradeMessage,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Starts rumqttd (no auth) on a free port and waits until it accepts connections.
pub async fn start_broker() -> String {
    // rumqttd cannot report the port it bound: take a free one and hand it over.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = format!(
        r#"
        id = 0
        [router]
        max_connections = 1000
        max_outgoing_packet_count = 200
        max_segment_size = 1048576
        max_segment_count = 10
        [v4.1]
        name = "v4-1"
        listen = "127.0.0.1:{port}"
        next_connection_delay_ms = 0
        [v4.1.connections]
        connection_timeout_ms = 60000
        max_payload_size = 65536
        max_inflight_count = 100
        dynamic_filters = true
        "#
    );
    let config: rumqttd::Config = toml::from_str(&cfg).unwrap();
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(config);
        let _ = broker.start();
    });
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            return addr;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("rumqttd did not start on {addr}");
}

/// Deterministic firmware bytes.
pub fn firmware(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

/// `(path, Range header)` of each request.
type RequestLog = Arc<Mutex<Vec<(String, Option<String>)>>>;

#[derive(Clone)]
struct Files {
    good: Bytes,
    corrupt: Bytes,
    log: RequestLog,
}

/// The firmware server: `/fw/good` serves the package, `/fw/corrupt` the same length with one
/// byte flipped. Both honour `Range: bytes=N-` and stream in 4 KiB chunks.
pub struct FirmwareServer {
    pub base: String,
    pub bytes: Vec<u8>,
    log: RequestLog,
}

impl FirmwareServer {
    pub async fn start(bytes: Vec<u8>) -> Self {
        let mut corrupt = bytes.clone();
        let i = corrupt.len() / 3;
        corrupt[i] ^= 0xff;
        let log = Arc::new(Mutex::new(Vec::new()));
        let files = Files {
            good: Bytes::from(bytes.clone()),
            corrupt: Bytes::from(corrupt),
            log: log.clone(),
        };
        let app = Router::new()
            .route("/fw/{name}", get(serve))
            .with_state(files);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FirmwareServer { base, bytes, log }
    }

    /// `(path, Range header)` of every request so far.
    pub fn requests(&self) -> Vec<(String, Option<String>)> {
        self.log.lock().unwrap().clone()
    }

    /// The upgrade description of `/fw/{name}` (sign of the good bytes in any case).
    pub fn upgrade(&self, name: &str, version: &str, method: FirmwareSignMethod) -> UpgradeData {
        let d = firmware_sim::firmware::digests(&self.bytes);
        UpgradeData {
            size: self.bytes.len() as u64,
            version: version.into(),
            url: format!("{}/fw/{name}", self.base),
            sign_method: method,
            sign: match method {
                FirmwareSignMethod::Sha256 => d.sha256,
                FirmwareSignMethod::Md5 => d.md5.clone(),
            },
            md5: d.md5,
            module: "default".into(),
            ext_data: None,
        }
    }
}

async fn serve(State(f): State<Files>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    f.log.lock().unwrap().push((name.clone(), range.clone()));
    let data = match name.as_str() {
        "good" => f.good.clone(),
        "corrupt" => f.corrupt.clone(),
        _ => {
            return Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Body::empty())
                .unwrap()
        }
    };
    let len = data.len();
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(s, _)| s.parse::<usize>().ok());
    let (status, body) = match start {
        Some(s) if s < len => (StatusCode::PARTIAL_CONTENT, data.slice(s..)),
        Some(_) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .body(Body::empty())
                .unwrap()
        }
        None => (StatusCode::OK, data),
    };
    let offset = start.unwrap_or(0);
    let chunks: Vec<Result<Bytes, Infallible>> = (0..body.len())
        .step_by(4096)
        .map(|i| Ok(body.slice(i..(i + 4096).min(body.len()))))
        .collect();
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::ACCEPT_RANGES, "bytes");
    if status == StatusCode::PARTIAL_CONTENT {
        b = b.header(
            header::CONTENT_RANGE,
            format!("bytes {offset}-{}/{len}", len - 1),
        );
    }
    b.body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap()
}

/// What the gateway saw from a device.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    Inform(InformRequest),
    Progress(ProgressRequest),
    /// A payload on an up topic that did not parse.
    Malformed(TopicKind, Vec<u8>),
    Other(TopicKind, Vec<u8>),
}

/// The test's stand-in for the gateway: one MQTT client.
pub struct Gateway {
    pub client: AsyncClient,
    pub rx: mpsc::UnboundedReceiver<(String, String, Seen)>,
}

impl Gateway {
    /// Connects and subscribes to `kinds` of every `(pk, dn)`; returns once subscribed.
    pub async fn start(broker: &str, devices: &[(String, String)], kinds: &[TopicKind]) -> Self {
        let (host, port) = broker.rsplit_once(':').unwrap();
        let mut o = MqttOptions::new("test-gateway", host, port.parse().unwrap());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(o, 1000);
        let mut filters = Vec::new();
        for (pk, dn) in devices {
            for &k in kinds {
                let ident = k.has_identifier().then_some("overheat");
                let t = Topic::from_kind(k, pk.as_str(), dn.as_str(), ident).unwrap();
                filters.push(rumqttc::SubscribeFilter::new(
                    t.to_string(),
                    QoS::AtLeastOnce,
                ));
            }
        }
        let n_filters = filters.len();
        client.subscribe_many(filters).await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(s))) => {
                        assert_eq!(s.return_codes.len(), n_filters);
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let Some(t) = Topic::parse(&p.topic) else {
                            continue;
                        };
                        let (pk, dn) = (t.product_key().to_owned(), t.device_name().to_owned());
                        let seen = match t.kind() {
                            TopicKind::Inform => match InformRequest::parse(&p.payload) {
                                Ok(i) => Seen::Inform(i),
                                Err(_) => Seen::Malformed(t.kind(), p.payload.to_vec()),
                            },
                            TopicKind::Progress => match ProgressRequest::parse(&p.payload) {
                                Ok(i) => Seen::Progress(i),
                                Err(_) => Seen::Malformed(t.kind(), p.payload.to_vec()),
                            },
                            k => Seen::Other(k, p.payload.to_vec()),
                        };
                        if tx.send((pk, dn, seen)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("gateway client: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("gateway subscribed")
            .unwrap();
        Gateway { client, rx }
    }

    /// Pushes an upgrade to a device.
    pub async fn push(&self, pk: &str, dn: &str, id: u64, data: UpgradeData) {
        let t = Topic::from_kind(TopicKind::Upgrade, pk, dn, None).unwrap();
        self.client
            .publish(
                t.to_string(),
                QoS::AtLeastOnce,
                false,
                UpgradeMessage::new(id, data).to_vec(),
            )
            .await
            .unwrap();
    }

    /// Publishes a raw payload on `kind` of a device.
    pub async fn send(
        &self,
        kind: TopicKind,
        pk: &str,
        dn: &str,
        ident: Option<&str>,
        payload: Vec<u8>,
    ) {
        let t = Topic::from_kind(kind, pk, dn, ident).unwrap();
        self.client
            .publish(t.to_string(), QoS::AtMostOnce, false, payload)
            .await
            .unwrap();
    }

    /// Collects messages until `done` says so (or panics after `timeout`).
    pub async fn collect_until(
        &mut self,
        log: &mut Vec<(String, String, Seen)>,
        timeout: Duration,
        mut done: impl FnMut(&[(String, String, Seen)]) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(log) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) => log.push(m),
                Ok(None) => panic!("gateway client ended"),
                Err(_) => panic!(
                    "timed out; seen so far: {:#?}",
                    log.iter().rev().take(30).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Drains what has arrived without waiting.
    pub fn drain(&mut self, log: &mut Vec<(String, String, Seen)>) {
        while let Ok(m) = self.rx.try_recv() {
            log.push(m);
        }
    }
}
