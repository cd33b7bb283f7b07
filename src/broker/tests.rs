//! End-to-end tests of the broker over real sockets on 127.0.0.1, with rumqttc (and raw bytes
//! where a well-behaved client cannot produce the case) against a fake, recording
//! [`DeviceHooks`].

use super::*;
use crate::metrics::Metrics;
use fleetgate_topics::sign::{LinkCredentials, SignMethod};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, LastWill, MqttOptions,
    Packet, QoS, SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Generous bound so a broken test fails instead of hanging; never an assertion on speed.
const WAIT: Duration = Duration::from_secs(15);
const PK: &str = "a1Prod";
const SECRET: &str = "s3cr3t-s3cr3t";
/// Payloads [`FakeHooks`] does not take.
const WITHHOLD: &[u8] = b"withhold";

#[derive(Debug)]
enum HookEvent {
    Connect(Session),
    Disconnect(Session, DisconnectReason),
    Publish(Session, String, Bytes),
}

struct FakeHooks {
    devices: Mutex<HashMap<(String, String), DeviceCredentials>>,
    events: mpsc::UnboundedSender<HookEvent>,
    /// How long `on_publish` takes (to make "PUBACK only after processing" observable).
    publish_delay: Mutex<Duration>,
    processed: AtomicUsize,
    /// When set, every processed publish is answered on `{topic}_reply` through the router.
    replies: Mutex<Option<Downlink>>,
    /// A device that is deleted by the first lookup of its credentials (which still finds it):
    /// a delete racing with its CONNECT.
    deleted_on_lookup: Mutex<Option<String>>,
}

impl DeviceHooks for FakeHooks {
    fn credentials(&self, product_key: &str, device_name: &str) -> Option<DeviceCredentials> {
        let key = (product_key.to_owned(), device_name.to_owned());
        let mut devices = self.devices.lock().unwrap();
        let found = devices.get(&key).cloned();
        let mut deleted = self.deleted_on_lookup.lock().unwrap();
        if deleted.as_deref() == Some(device_name) {
            *deleted = None;
            devices.remove(&key);
        }
        found
    }
    fn on_connect(&self, session: &Session) {
        let _ = self.events.send(HookEvent::Connect(session.clone()));
    }
    fn on_disconnect(&self, session: &Session, reason: DisconnectReason) {
        let _ = self
            .events
            .send(HookEvent::Disconnect(session.clone(), reason));
    }
    /// A payload starting with [`WITHHOLD`] is not taken ([`PublishOutcome::Withheld`]).
    fn on_publish(
        &self,
        session: &Session,
        message: UpMessage<'_>,
    ) -> impl Future<Output = PublishOutcome> + Send {
        let delay = *self.publish_delay.lock().unwrap();
        let UpMessage { topic, payload, .. } = message;
        let withheld = payload.starts_with(WITHHOLD);
        if let Some(downlink) = &*self.replies.lock().unwrap() {
            let _ = downlink.publish(format!("{topic}_reply"), payload.clone());
        }
        let event = HookEvent::Publish(session.clone(), topic.to_owned(), payload);
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if withheld {
                return PublishOutcome::Withheld;
            }
            self.processed.fetch_add(1, Ordering::SeqCst);
            let _ = self.events.send(event);
            PublishOutcome::Processed
        }
    }
}

struct TestBroker {
    handle: BrokerHandle,
    hooks: Arc<FakeHooks>,
    events: mpsc::UnboundedReceiver<HookEvent>,
    metrics: Arc<Metrics>,
}

fn test_config() -> BrokerConfig {
    BrokerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        max_connections: 64,
        connect_timeout: Duration::from_secs(5),
        max_payload_size: 64 * 1024,
        ..BrokerConfig::default()
    }
}

async fn start_with(config: BrokerConfig) -> TestBroker {
    let (tx, events) = mpsc::unbounded_channel();
    let mut devices = HashMap::new();
    for dn in ["dev1", "dev2", "dev3"] {
        devices.insert(
            (PK.to_owned(), dn.to_owned()),
            DeviceCredentials {
                device_secret: SECRET.to_owned(),
                enabled: true,
            },
        );
    }
    devices.insert(
        (PK.to_owned(), "off".to_owned()),
        DeviceCredentials {
            device_secret: SECRET.to_owned(),
            enabled: false,
        },
    );
    let hooks = Arc::new(FakeHooks {
        devices: Mutex::new(devices),
        events: tx,
        publish_delay: Mutex::new(Duration::ZERO),
        processed: AtomicUsize::new(0),
        replies: Mutex::new(None),
        deleted_on_lookup: Mutex::new(None),
    });
    let metrics = Arc::new(Metrics::new());
    let broker = Broker::new(config, Arc::clone(&metrics)).unwrap();
    let handle = broker.start(Arc::clone(&hooks)).await.unwrap();
    TestBroker {
        handle,
        hooks,
        events,
        metrics,
    }
}

async fn start() -> TestBroker {
    start_with(test_config()).await
}

impl TestBroker {
    async fn next_event(&mut self) -> HookEvent {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("no hook event in time")
            .expect("hooks gone")
    }

    async fn expect_connect(&mut self, dn: &str) -> Session {
        match self.next_event().await {
            HookEvent::Connect(s) if s.device.device_name == dn => s,
            other => panic!("expected connect of {dn}, got {other:?}"),
        }
    }

    async fn expect_disconnect(&mut self, dn: &str) -> (Session, DisconnectReason) {
        match self.next_event().await {
            HookEvent::Disconnect(s, r) if s.device.device_name == dn => (s, r),
            other => panic!("expected disconnect of {dn}, got {other:?}"),
        }
    }

    async fn expect_publish(&mut self) -> (Session, String, Bytes) {
        match self.next_event().await {
            HookEvent::Publish(s, t, p) => (s, t, p),
            other => panic!("expected publish, got {other:?}"),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.handle.mqtt_addr()
    }

    fn metric(&self, needle: &str) -> bool {
        self.metrics.encode().lines().any(|l| l == needle)
    }
}

fn device(dn: &str) -> DeviceKey {
    DeviceKey {
        product_key: PK.to_owned(),
        device_name: dn.to_owned(),
    }
}

fn creds(dn: &str) -> LinkCredentials {
    LinkCredentials::new(PK, dn, SECRET, SignMethod::HmacSha256, 3, None)
}

fn options(addr: SocketAddr, c: &LinkCredentials, clean: bool) -> MqttOptions {
    let mut opts = MqttOptions::new(c.client_id.clone(), addr.ip().to_string(), addr.port());
    opts.set_credentials(c.username.clone(), c.password.clone());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(clean);
    opts
}

/// A connected rumqttc client whose event loop runs in the background; incoming packets (and
/// the error that ends it) arrive on `incoming`.
struct Client {
    client: AsyncClient,
    incoming: mpsc::UnboundedReceiver<Result<Packet, String>>,
    session_present: bool,
}

async fn connect_with(opts: MqttOptions) -> Result<Client, ConnectionError> {
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let session_present = tokio::time::timeout(WAIT, wait_connack(&mut eventloop))
        .await
        .expect("no CONNACK in time")?;
    let (tx, incoming) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(p)) => {
                    if tx.send(Ok(p)).is_err() {
                        return;
                    }
                }
                Ok(Event::Outgoing(_)) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    Ok(Client {
        client,
        incoming,
        session_present,
    })
}

async fn wait_connack(eventloop: &mut EventLoop) -> Result<bool, ConnectionError> {
    loop {
        if let Event::Incoming(Packet::ConnAck(ack)) = eventloop.poll().await? {
            return Ok(ack.session_present);
        }
    }
}

async fn connect(addr: SocketAddr, dn: &str) -> Client {
    connect_with(options(addr, &creds(dn), true))
        .await
        .expect("connect")
}

fn refused_code(result: Result<Client, ConnectionError>) -> ConnectReturnCode {
    match result {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got a session"),
    }
}

impl Client {
    /// The next incoming packet that `pick` accepts (others are skipped).
    async fn next<T>(&mut self, mut pick: impl FnMut(Packet) -> Option<T>) -> T {
        loop {
            let packet = tokio::time::timeout(WAIT, self.incoming.recv())
                .await
                .expect("no packet in time")
                .expect("event loop gone");
            match packet {
                Ok(p) => {
                    if let Some(t) = pick(p) {
                        return t;
                    }
                }
                Err(e) => panic!("connection ended: {e}"),
            }
        }
    }

    async fn next_publish(&mut self) -> rumqttc::Publish {
        self.next(|p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .await
    }

    async fn suback(&mut self) -> Vec<SubscribeReasonCode> {
        self.next(|p| match p {
            Packet::SubAck(a) => Some(a.return_codes),
            _ => None,
        })
        .await
    }

    async fn puback(&mut self) -> u16 {
        self.next(|p| match p {
            Packet::PubAck(a) => Some(a.pkid),
            _ => None,
        })
        .await
    }

    /// Waits until the connection ends (the broker closed it).
    async fn closed(&mut self) {
        loop {
            match tokio::time::timeout(WAIT, self.incoming.recv())
                .await
                .expect("still open")
            {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    }
}

fn upgrade_topic(dn: &str) -> String {
    format!("/ota/device/upgrade/{PK}/{dn}")
}

#[tokio::test]
async fn every_sign_method_with_and_without_timestamp_connects() {
    let mut tb = start().await;
    let mut count = 0;
    for method in SignMethod::ALL {
        for ts in [
            None,
            Some("1700000000".to_owned()),
            Some("1700000000123".to_owned()),
        ] {
            let c = LinkCredentials::new(PK, "dev1", SECRET, method, 3, ts.clone());
            let client = connect_with(options(tb.addr(), &c, true))
                .await
                .unwrap_or_else(|e| panic!("{method} {ts:?}: {e}"));
            let session = tb.expect_connect("dev1").await;
            assert_eq!(session.client_id, c.client_id);
            assert!(!session.tls);
            assert_eq!(session.client_ip(), tb.addr().ip());
            client.client.disconnect().await.unwrap();
            let (s, reason) = tb.expect_disconnect("dev1").await;
            assert_eq!(
                (s.conn_id, reason),
                (session.conn_id, DisconnectReason::ClientDisconnect)
            );
            count += 1;
        }
    }
    // securemode=2 on the plain listener is accepted too (documented leniency).
    let c = LinkCredentials::new(PK, "dev1", SECRET, SignMethod::HmacSha1, 2, None);
    let _client = connect_with(options(tb.addr(), &c, true)).await.unwrap();
    tb.expect_connect("dev1").await;
    assert!(tb.metric(&format!("fleetgate_mqtt_connects_total {}", count + 1)));
    assert_eq!(tb.handle.downlink().connected_count(), 1);
}

#[tokio::test]
async fn bad_credentials_are_refused_with_the_right_code_and_counted() {
    let mut tb = start().await;
    let addr = tb.addr();
    let wrong_secret =
        LinkCredentials::new(PK, "dev1", "not-the-secret", SignMethod::HmacMd5, 3, None);
    assert_eq!(
        refused_code(connect_with(options(addr, &wrong_secret, true)).await),
        ConnectReturnCode::BadUserNamePassword
    );
    let unknown = LinkCredentials::new(PK, "nobody", SECRET, SignMethod::HmacSha256, 3, None);
    assert_eq!(
        refused_code(connect_with(options(addr, &unknown, true)).await),
        ConnectReturnCode::BadUserNamePassword
    );
    let disabled = LinkCredentials::new(PK, "off", SECRET, SignMethod::HmacSha256, 3, None);
    assert_eq!(
        refused_code(connect_with(options(addr, &disabled, true)).await),
        ConnectReturnCode::NotAuthorized
    );
    let mut malformed = options(addr, &creds("dev1"), true);
    malformed.set_client_id("no-link-params".to_owned());
    assert_eq!(
        refused_code(connect_with(malformed).await),
        ConnectReturnCode::BadClientId
    );
    let mut bad_user = options(addr, &creds("dev1"), true);
    bad_user.set_credentials("dev1-without-pk", creds("dev1").password);
    assert_eq!(
        refused_code(connect_with(bad_user).await),
        ConnectReturnCode::BadUserNamePassword
    );

    for reason in [
        "bad_signature",
        "unknown_device",
        "disabled_device",
        "malformed_client_id",
        "bad_username",
    ] {
        assert!(
            tb.metric(&format!(
                r#"fleetgate_mqtt_connects_refused_total{{reason="{reason}"}} 1"#
            )),
            "{reason}: {}",
            tb.metrics.encode()
        );
    }
    // None of them reached on_connect: the first hook event is the next good device.
    let _ok = connect(addr, "dev2").await;
    tb.expect_connect("dev2").await;
}

#[tokio::test]
async fn own_publish_reaches_on_publish_and_is_acked_after_it() {
    let mut tb = start().await;
    *tb.hooks.publish_delay.lock().unwrap() = Duration::from_millis(200);
    let mut dev = connect(tb.addr(), "dev1").await;
    tb.expect_connect("dev1").await;
    let topic = format!("/sys/{PK}/dev1/thing/event/property/post");
    dev.client
        .publish(&topic, QoS::AtLeastOnce, false, &b"{\"id\":\"1\"}"[..])
        .await
        .unwrap();
    dev.puback().await;
    // The PUBACK arrived: on_publish must have finished by then (it sleeps before counting).
    assert_eq!(tb.hooks.processed.load(Ordering::SeqCst), 1);
    let (session, t, payload) = tb.expect_publish().await;
    assert_eq!(
        (session.device, t, &payload[..]),
        (device("dev1"), topic, &b"{\"id\":\"1\"}"[..])
    );
}

#[tokio::test]
async fn publish_on_another_devices_topic_is_dropped() {
    let mut tb = start().await;
    let mut dev = connect(tb.addr(), "dev1").await;
    tb.expect_connect("dev1").await;
    for foreign in [
        format!("/ota/device/progress/{PK}/dev2"),
        format!("/sys/{PK}/dev2/thing/event/property/post"),
        "/sys/a1Prod/dev10/thing/event/property/post".to_owned(),
    ] {
        dev.client
            .publish(foreign, QoS::AtLeastOnce, false, "x")
            .await
            .unwrap();
        dev.puback().await; // acked like the vendor does, but not processed
    }
    dev.client
        .publish("/sys/other/dev1/x", QoS::AtMostOnce, false, "x")
        .await
        .unwrap();
    let own = format!("/ota/device/progress/{PK}/dev1");
    dev.client
        .publish(&own, QoS::AtLeastOnce, false, "42")
        .await
        .unwrap();
    dev.puback().await;
    // Packets of a connection are handled in order: the first processed publish is the own one.
    let (_, topic, _) = tb.expect_publish().await;
    assert_eq!(topic, own);
    assert_eq!(tb.hooks.processed.load(Ordering::SeqCst), 1);
    assert!(
        tb.metric(r#"fleetgate_mqtt_acl_denied_total{kind="publish"} 4"#),
        "{}",
        tb.metrics.encode()
    );
}

#[tokio::test]
async fn subscriptions_to_foreign_topics_get_suback_failure() {
    let mut tb = start().await;
    let mut dev = connect(tb.addr(), "dev1").await;
    tb.expect_connect("dev1").await;
    dev.client
        .subscribe_many([
            SubscribeFilter::new(upgrade_topic("dev1"), QoS::AtLeastOnce),
            SubscribeFilter::new(upgrade_topic("dev2"), QoS::AtLeastOnce),
            SubscribeFilter::new(format!("/sys/{PK}/dev1/#"), QoS::AtMostOnce),
            SubscribeFilter::new("#".to_owned(), QoS::AtMostOnce),
        ])
        .await
        .unwrap();
    assert_eq!(
        dev.suback().await,
        vec![
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtMostOnce),
            SubscribeReasonCode::Failure,
        ]
    );
    dev.client
        .subscribe(upgrade_topic("dev2"), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(dev.suback().await, vec![SubscribeReasonCode::Failure]);
    assert!(tb.metric(r#"fleetgate_mqtt_acl_denied_total{kind="subscribe"} 3"#));

    // The foreign subscription really is not there: a message for dev2 does not reach dev1,
    // the next one for dev1 does.
    let downlink = tb.handle.downlink();
    downlink.publish(upgrade_topic("dev2"), "for dev2").unwrap();
    downlink.publish(upgrade_topic("dev1"), "for dev1").unwrap();
    let p = dev.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        (upgrade_topic("dev1").as_str(), &b"for dev1"[..])
    );
}

#[tokio::test]
async fn downlink_reaches_subscribed_devices_at_their_qos_and_no_one_else() {
    let mut tb = start().await;
    let mut dev1 = connect(tb.addr(), "dev1").await;
    tb.expect_connect("dev1").await;
    let mut dev2 = connect(tb.addr(), "dev2").await;
    tb.expect_connect("dev2").await;
    dev1.client
        .subscribe(upgrade_topic("dev1"), QoS::AtMostOnce)
        .await
        .unwrap();
    assert_eq!(
        dev1.suback().await,
        vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    dev2.client
        .subscribe(upgrade_topic("dev2"), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        dev2.suback().await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );

    let downlink = tb.handle.downlink();
    assert!(downlink.is_connected(&device("dev1")));
    assert!(!downlink.is_connected(&device("dev3")));
    downlink.publish(upgrade_topic("dev1"), "m1").unwrap();
    let p = dev1.next_publish().await;
    assert_eq!((p.qos, &p.payload[..]), (QoS::AtMostOnce, &b"m1"[..]));

    // Many QoS 1 messages: exercises in-order acks, the router's inflight window and the
    // Unschedule → wake path.
    const N: usize = 600;
    for i in 0..N {
        downlink
            .publish(upgrade_topic("dev2"), format!("n{i}"))
            .unwrap();
    }
    for i in 0..N {
        let p = dev2.next_publish().await;
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert_eq!(p.payload, format!("n{i}").into_bytes(), "message {i}");
    }
    // dev1 got nothing of dev2's: its next message is the next one addressed to it.
    downlink.publish(upgrade_topic("dev1"), "m2").unwrap();
    assert_eq!(&dev1.next_publish().await.payload[..], b"m2");

    // A QoS 0 burst fills the link's outgoing buffer (200): rumqttd then unschedules the link
    // until it is woken, which the connection task must do.
    const BURST: usize = 2000;
    for i in 0..BURST {
        downlink
            .publish(upgrade_topic("dev1"), format!("b{i}"))
            .unwrap();
    }
    for i in 0..BURST {
        assert_eq!(
            dev1.next_publish().await.payload,
            format!("b{i}").into_bytes(),
            "burst {i}"
        );
    }
    assert!(tb.metric(&format!(
        "fleetgate_mqtt_downlink_messages_total {}",
        N + BURST + 2
    )));

    assert!(matches!(
        downlink.publish("/a/+/b", "x"),
        Err(BrokerError::InvalidTopic(_))
    ));
}

#[tokio::test]
async fn a_second_connection_takes_over() {
    let mut tb = start().await;
    let mut first = connect(tb.addr(), "dev1").await;
    let s1 = tb.expect_connect("dev1").await;
    let mut second = connect(tb.addr(), "dev1").await;
    // The old session ends before the new one starts, so hooks see offline → online.
    let (old, reason) = tb.expect_disconnect("dev1").await;
    assert_eq!(
        (old.conn_id, reason),
        (s1.conn_id, DisconnectReason::TakenOver)
    );
    let s2 = tb.expect_connect("dev1").await;
    assert_ne!(s1.conn_id, s2.conn_id);
    first.closed().await;

    second
        .client
        .subscribe(upgrade_topic("dev1"), QoS::AtLeastOnce)
        .await
        .unwrap();
    second.suback().await;
    tb.handle
        .downlink()
        .publish(upgrade_topic("dev1"), "after takeover")
        .unwrap();
    assert_eq!(&second.next_publish().await.payload[..], b"after takeover");
    assert_eq!(tb.handle.downlink().connected_count(), 1);
}

#[tokio::test]
async fn kick_closes_the_session() {
    let mut tb = start().await;
    let mut dev = connect(tb.addr(), "dev1").await;
    tb.expect_connect("dev1").await;
    let downlink = tb.handle.downlink();
    assert!(downlink.kick(&device("dev1")));
    let (_, reason) = tb.expect_disconnect("dev1").await;
    assert_eq!(reason, DisconnectReason::Kicked);
    dev.closed().await;
    assert!(!downlink.is_connected(&device("dev1")));
    assert!(!downlink.kick(&device("dev1")));
    // The device can come back.
    let _again = connect(tb.addr(), "dev1").await;
    tb.expect_connect("dev1").await;
    assert!(downlink.is_connected(&device("dev1")));
}

#[tokio::test]
async fn shutdown_disconnects_everyone_before_returning() {
    let mut tb = start().await;
    let _d1 = connect(tb.addr(), "dev1").await;
    tb.expect_connect("dev1").await;
    let _d2 = connect(tb.addr(), "dev2").await;
    tb.expect_connect("dev2").await;
    let addr = tb.addr();
    let downlink = tb.handle.downlink();
    let TestBroker {
        handle, mut events, ..
    } = tb;
    handle.shutdown().await;
    let mut ended = Vec::new();
    while let Ok(event) = events.try_recv() {
        match event {
            HookEvent::Disconnect(s, reason) => ended.push((s.device.device_name, reason)),
            other => panic!("unexpected {other:?}"),
        }
    }
    ended.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        ended,
        vec![
            ("dev1".to_owned(), DisconnectReason::Kicked),
            ("dev2".to_owned(), DisconnectReason::Kicked)
        ]
    );
    assert_eq!(downlink.connected_count(), 0);
    assert!(!downlink.is_connected(&device("dev1")));
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}

#[tokio::test]
async fn tls_connect_with_a_self_signed_certificate() {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let mut config = test_config();
    config.tls = Some(TlsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert_path,
        key_path,
    });
    let mut tb = start_with(config).await;
    let tls_addr = tb.handle.tls_addr().expect("TLS listener");
    assert_ne!(tls_addr.port(), 0);

    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let c = LinkCredentials::new(PK, "dev1", SECRET, SignMethod::HmacSha256, 2, None);
    let mut opts = options(tls_addr, &c, true);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(client_config),
    )));
    let mut dev = connect_with(opts).await.expect("TLS connect");
    let session = tb.expect_connect("dev1").await;
    assert!(session.tls);

    dev.client
        .publish(
            format!("/{PK}/dev1/user/update"),
            QoS::AtLeastOnce,
            false,
            "hi",
        )
        .await
        .unwrap();
    dev.puback().await;
    let (_, topic, _) = tb.expect_publish().await;
    assert_eq!(topic, format!("/{PK}/dev1/user/update"));

    // A plain MQTT client on the TLS port does not get anywhere, and nothing breaks.
    let mut raw = TcpStream::connect(tls_addr).await.unwrap();
    raw.write_all(&raw_connect(&creds("dev2"), 30))
        .await
        .unwrap();
    assert_closed(&mut raw).await;
    assert!(
        tb.metric(r#"fleetgate_mqtt_connects_refused_total{reason="tls"} 1"#),
        "{}",
        tb.metrics.encode()
    );
}

/// A packet in bytes, built with rumqttd's encoder.
fn raw(packet: rumqttd::protocol::Packet) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    codec::encode(packet, &mut out).unwrap();
    out.to_vec()
}

/// A raw socket that sent a signed CONNECT for `dn` and read the 4-byte CONNACK, which is
/// returned with it.
async fn raw_session(addr: SocketAddr, dn: &str, keep_alive: u16) -> (TcpStream, [u8; 4]) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&raw_connect(&creds(dn), keep_alive))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut connack))
        .await
        .expect("no CONNACK in time")
        .unwrap();
    (s, connack)
}

/// A v4 CONNECT in bytes, built with rumqttd's encoder.
fn raw_connect(c: &LinkCredentials, keep_alive: u16) -> Vec<u8> {
    use rumqttd::protocol as p;
    let connect = p::Packet::Connect(
        p::Connect {
            keep_alive,
            client_id: c.client_id.clone(),
            clean_session: true,
        },
        None,
        None,
        None,
        Some(p::Login {
            username: c.username.clone(),
            password: c.password.clone(),
        }),
    );
    raw(connect)
}

/// Reads until the broker closes the socket; returns what it sent.
async fn assert_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("socket still open")
        {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn garbage_mqtt5_and_protocol_violations_do_not_hurt_the_broker() {
    let mut tb = start().await;
    let addr = tb.addr();

    // Garbage instead of CONNECT.
    let mut s = TcpStream::connect(addr).await.unwrap();
    // ("G" reads as a PUBACK announcing 69 bytes: send enough to frame it.)
    s.write_all(format!("GET / HTTP/1.1\r\nHost: x\r\n{}\r\n\r\n", "x".repeat(100)).as_bytes())
        .await
        .unwrap();
    assert_closed(&mut s).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0xFF; 64]).await.unwrap();
    assert_closed(&mut s).await;

    // An MQTT 5 CONNECT gets CONNACK "unacceptable protocol version".
    let body = [
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3C, 0x00, 0x00, 0x01, b'a',
    ];
    let mut v5 = vec![0x10, body.len() as u8];
    v5.extend_from_slice(&body);
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&v5).await.unwrap();
    assert_eq!(assert_closed(&mut s).await, vec![0x20, 0x02, 0x00, 0x01]);
    assert!(
        tb.metric(r#"fleetgate_mqtt_connects_refused_total{reason="protocol"} 3"#),
        "{}",
        tb.metrics.encode()
    );

    // After a good CONNECT: an oversized packet, a second CONNECT, garbage — each ends only
    // that session (ConnectionLost).
    let oversized: Vec<u8> = vec![0x30, 0xFF, 0xFF, 0x7F]; // PUBLISH announcing ~2 MiB
    let second_connect = raw_connect(&creds("dev1"), 30);
    for (i, evil) in [oversized, second_connect, vec![0xF0, 0x00]]
        .into_iter()
        .enumerate()
    {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&raw_connect(&creds("dev1"), 30)).await.unwrap();
        tb.expect_connect("dev1").await;
        s.write_all(&evil).await.unwrap();
        let got = assert_closed(&mut s).await;
        assert_eq!(
            &got[..4],
            &[0x20, 0x02, 0x00, 0x00],
            "case {i}: CONNACK first"
        );
        let (_, reason) = tb.expect_disconnect("dev1").await;
        assert_eq!(reason, DisconnectReason::ConnectionLost, "case {i}");
    }

    // The broker still serves a good client.
    let mut dev = connect(addr, "dev2").await;
    tb.expect_connect("dev2").await;
    dev.client
        .publish(format!("/sys/{PK}/dev2/x"), QoS::AtLeastOnce, false, "ok")
        .await
        .unwrap();
    dev.puback().await;
}

#[tokio::test]
async fn silent_sockets_and_expired_keep_alives_are_closed() {
    let mut config = test_config();
    config.connect_timeout = Duration::from_millis(300);
    let mut tb = start_with(config).await;
    let mut s = TcpStream::connect(tb.addr()).await.unwrap();
    assert!(assert_closed(&mut s).await.is_empty());
    assert!(tb.metric(r#"fleetgate_mqtt_connects_refused_total{reason="timeout"} 1"#));

    // keep-alive 1 s and then silence: closed after 1.5 s without packets.
    let mut s = TcpStream::connect(tb.addr()).await.unwrap();
    s.write_all(&raw_connect(&creds("dev1"), 1)).await.unwrap();
    tb.expect_connect("dev1").await;
    assert_eq!(assert_closed(&mut s).await, vec![0x20, 0x02, 0x00, 0x00]);
    assert_eq!(
        tb.expect_disconnect("dev1").await.1,
        DisconnectReason::ConnectionLost
    );
}

#[tokio::test]
async fn packets_within_the_keep_alive_keep_the_session_open() {
    let mut tb = start().await;
    let mut s = TcpStream::connect(tb.addr()).await.unwrap();
    s.write_all(&raw_connect(&creds("dev1"), 1)).await.unwrap();
    tb.expect_connect("dev1").await;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    // Keep-alive 1 s: the session expires 1.5 s after the last packet. A PINGREQ every 0.5 s
    // for 3.5 s carries it past two such deadlines counted from the CONNECT.
    for _ in 0..7 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.write_all(&[0xC0, 0x00]).await.unwrap();
        let mut pingresp = [0u8; 2];
        s.read_exact(&mut pingresp).await.unwrap();
        assert_eq!(pingresp, [0xD0, 0x00]);
    }
    assert!(tb.events.try_recv().is_err(), "no disconnect while pinging");
    // Then silence: closed.
    assert!(assert_closed(&mut s).await.is_empty());
    assert_eq!(
        tb.expect_disconnect("dev1").await.1,
        DisconnectReason::ConnectionLost
    );
}

#[tokio::test]
async fn persistent_session_gets_messages_queued_while_offline() {
    let mut tb = start().await;
    let addr = tb.addr();
    let dev = connect_with(options(addr, &creds("dev1"), false))
        .await
        .unwrap();
    tb.expect_connect("dev1").await;
    let mut dev = dev;
    dev.client
        .subscribe(upgrade_topic("dev1"), QoS::AtLeastOnce)
        .await
        .unwrap();
    dev.suback().await;
    dev.client.disconnect().await.unwrap();
    assert_eq!(
        tb.expect_disconnect("dev1").await.1,
        DisconnectReason::ClientDisconnect
    );

    let downlink = tb.handle.downlink();
    downlink
        .publish(upgrade_topic("dev1"), "while offline 1")
        .unwrap();
    downlink
        .publish(upgrade_topic("dev1"), "while offline 2")
        .unwrap();

    let mut back = connect_with(options(addr, &creds("dev1"), false))
        .await
        .unwrap();
    tb.expect_connect("dev1").await;
    assert!(back.session_present);
    for expected in ["while offline 1", "while offline 2"] {
        let p = back.next_publish().await;
        assert_eq!(
            (p.qos, &p.payload[..]),
            (QoS::AtLeastOnce, expected.as_bytes())
        );
    }

    // A clean session starts from scratch.
    back.client.disconnect().await.unwrap();
    tb.expect_disconnect("dev1").await;
    let clean = connect_with(options(addr, &creds("dev1"), true))
        .await
        .unwrap();
    assert!(!clean.session_present);
}

#[tokio::test]
async fn last_will_is_published_on_an_unclean_end_only_on_own_topics() {
    let mut tb = start().await;
    let addr = tb.addr();
    let will_topic = format!("/{PK}/dev1/user/will");
    let mut opts = options(addr, &creds("dev1"), false);
    opts.set_last_will(LastWill::new(&will_topic, "gone", QoS::AtLeastOnce, false));
    let mut dev = connect_with(opts).await.unwrap();
    tb.expect_connect("dev1").await;
    // The will's only possible subscriber is the device itself (topic isolation): a persistent
    // session lets it collect the will when it comes back.
    dev.client
        .subscribe(&will_topic, QoS::AtLeastOnce)
        .await
        .unwrap();
    dev.suback().await;
    tb.handle.downlink().kick(&device("dev1"));
    assert_eq!(
        tb.expect_disconnect("dev1").await.1,
        DisconnectReason::Kicked
    );

    let mut back = connect_with(options(addr, &creds("dev1"), false))
        .await
        .unwrap();
    tb.expect_connect("dev1").await;
    let p = back.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        (will_topic.as_str(), &b"gone"[..])
    );

    // A will on a foreign topic is refused at CONNECT time (the connection itself is fine).
    let mut opts = options(addr, &creds("dev2"), true);
    opts.set_last_will(LastWill::new(
        upgrade_topic("dev1"),
        "evil",
        QoS::AtMostOnce,
        false,
    ));
    let _dev2 = connect_with(opts).await.unwrap();
    tb.expect_connect("dev2").await;
    assert!(tb.metric(r#"fleetgate_mqtt_acl_denied_total{kind="will"} 1"#));
}

#[tokio::test]
async fn qos2_publish_is_processed_once() {
    let mut tb = start().await;
    let mut dev = connect(tb.addr(), "dev1").await;
    tb.expect_connect("dev1").await;
    let topic = format!("/sys/{PK}/dev1/thing/event/alarm/post");
    dev.client
        .publish(&topic, QoS::ExactlyOnce, false, "q2")
        .await
        .unwrap();
    dev.next(|p| matches!(p, Packet::PubComp(_)).then_some(()))
        .await;
    let (_, t, payload) = tb.expect_publish().await;
    assert_eq!((t, &payload[..]), (topic, &b"q2"[..]));
    assert_eq!(tb.hooks.processed.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn unsubscribe_is_acked_and_stops_delivery() {
    let mut tb = start().await;
    let mut dev = connect(tb.addr(), "dev1").await;
    tb.expect_connect("dev1").await;
    let custom = format!("/{PK}/dev1/user/get");
    dev.client
        .subscribe(upgrade_topic("dev1"), QoS::AtLeastOnce)
        .await
        .unwrap();
    dev.suback().await;
    dev.client
        .subscribe(&custom, QoS::AtMostOnce)
        .await
        .unwrap();
    dev.suback().await;
    dev.client.unsubscribe(upgrade_topic("dev1")).await.unwrap();
    dev.next(|p| matches!(p, Packet::UnsubAck(_)).then_some(()))
        .await;
    // Never subscribed, or not even its own: still answered (rumqttd alone would stay silent).
    dev.client
        .unsubscribe(format!("/{PK}/dev1/user/never"))
        .await
        .unwrap();
    dev.next(|p| matches!(p, Packet::UnsubAck(_)).then_some(()))
        .await;
    dev.client.unsubscribe(upgrade_topic("dev2")).await.unwrap();
    dev.next(|p| matches!(p, Packet::UnsubAck(_)).then_some(()))
        .await;

    let downlink = tb.handle.downlink();
    downlink
        .publish(upgrade_topic("dev1"), "not any more")
        .unwrap();
    downlink.publish(&custom, "still").unwrap();
    let p = dev.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        (custom.as_str(), &b"still"[..])
    );
}

#[tokio::test]
async fn connection_limit_refuses_new_devices_but_allows_takeover() {
    let mut config = test_config();
    config.max_connections = 1;
    let mut tb = start_with(config).await;
    let _dev1 = connect(tb.addr(), "dev1").await;
    tb.expect_connect("dev1").await;
    assert_eq!(
        refused_code(connect_with(options(tb.addr(), &creds("dev2"), true)).await),
        ConnectReturnCode::ServiceUnavailable
    );
    assert!(tb.metric(r#"fleetgate_mqtt_connects_refused_total{reason="limit"} 1"#));
    let _again = connect(tb.addr(), "dev1").await;
    assert_eq!(
        tb.expect_disconnect("dev1").await.1,
        DisconnectReason::TakenOver
    );
    tb.expect_connect("dev1").await;
}

#[tokio::test]
async fn a_connect_storm_registers_every_link() {
    const N: usize = 200;
    let mut config = test_config();
    config.max_connections = N;
    let mut tb = start_with(config).await;
    {
        let mut devices = tb.hooks.devices.lock().unwrap();
        for i in 0..N {
            devices.insert(
                (PK.to_owned(), format!("storm{i}")),
                DeviceCredentials {
                    device_secret: SECRET.to_owned(),
                    enabled: true,
                },
            );
        }
    }
    let addr = tb.addr();
    // All CONNECTs at once, raw (no client library timeouts in the way): every one must get
    // CONNACK "accepted" — their links are registered one after the other by one thread.
    let sockets = futures_util::future::join_all(
        (0..N).map(|i| async move { raw_session(addr, &format!("storm{i}"), 60).await }),
    )
    .await;
    for (i, (_, connack)) in sockets.iter().enumerate() {
        assert_eq!(connack, &[0x20, 0x02, 0x00, 0x00], "device storm{i}");
    }
    let mut connected = std::collections::HashSet::new();
    for _ in 0..N {
        match tb.next_event().await {
            HookEvent::Connect(s) => assert!(connected.insert(s.device.device_name)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(tb.handle.downlink().connected_count(), N);
    assert!(tb.metric(&format!("fleetgate_mqtt_connects_total {N}")));
}

fn post_reply_topic(dn: &str) -> String {
    format!("/sys/{PK}/{dn}/thing/event/property/post_reply")
}

/// `(direct, direct dropped, router)` downlink counters.
fn downlink_counts(tb: &TestBroker) -> (u64, u64, u64) {
    let m = &tb.metrics;
    (
        m.downlink_direct.get(),
        m.downlink_direct_dropped.get(),
        m.downlink_messages.get(),
    )
}

#[tokio::test]
async fn qos0_replies_go_straight_to_a_subscribed_session() {
    let mut tb = start().await;
    let mut dev = connect(tb.addr(), "dev1").await;
    tb.expect_connect("dev1").await;
    let downlink = tb.handle.downlink();
    let reply = post_reply_topic("dev1");
    // Subscribed at QoS 1 through a wildcard: delivered directly, at QoS 0, in order.
    dev.client
        .subscribe(
            format!("/sys/{PK}/dev1/thing/event/+/post_reply"),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    dev.suback().await;
    for i in 0..20 {
        assert_eq!(
            downlink.publish_qos0(&reply, format!("r{i}")).unwrap(),
            Delivery::Direct
        );
    }
    for i in 0..20 {
        let p = dev.next_publish().await;
        assert_eq!(
            (p.topic.as_str(), p.qos, &p.payload[..]),
            (reply.as_str(), QoS::AtMostOnce, format!("r{i}").as_bytes())
        );
    }
    assert_eq!(downlink_counts(&tb), (20, 0, 0));
    assert!(tb.metric("fleetgate_mqtt_downlink_direct_total 20"));

    // After UNSUBSCRIBE the direct path is closed again and nothing arrives.
    dev.client
        .unsubscribe(format!("/sys/{PK}/dev1/thing/event/+/post_reply"))
        .await
        .unwrap();
    dev.next(|p| matches!(p, Packet::UnsubAck(_)).then_some(()))
        .await;
    assert_eq!(
        downlink.publish_qos0(&reply, "gone").unwrap(),
        Delivery::Router
    );
    dev.client
        .subscribe(upgrade_topic("dev1"), QoS::AtLeastOnce)
        .await
        .unwrap();
    dev.suback().await;
    downlink.publish(upgrade_topic("dev1"), "marker").unwrap();
    // "gone" went through the router after the UNSUBSCRIBE (both in FIFO order): the next
    // message is the marker.
    assert_eq!(&dev.next_publish().await.payload[..], b"marker");
    assert_eq!(downlink_counts(&tb), (20, 0, 2));
    // A QoS 0 message still needs a valid topic.
    assert!(matches!(
        downlink.publish_qos0("/sys/a1Prod/dev1/#", "x"),
        Err(BrokerError::InvalidTopic(_))
    ));
}

#[tokio::test]
async fn auto_subscribed_devices_get_replies_directly() {
    let mut tb = start().await;
    let c = creds("dev1");
    let mut opts = options(tb.addr(), &c, true);
    // `_ss=1` is not signed: the same credentials with the flag added.
    let id = c.client_id.strip_suffix('|').unwrap();
    opts.set_client_id(format!("{id},_ss=1|"));
    let mut dev = connect_with(opts).await.unwrap();
    tb.expect_connect("dev1").await;
    let downlink = tb.handle.downlink();
    // The server-side SUBSCRIBE is answered asynchronously: wait until it is granted.
    let reply = post_reply_topic("dev1");
    let mut path = downlink.publish_qos0(&reply, "r").unwrap();
    for _ in 0..100 {
        if path == Delivery::Direct {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        path = downlink.publish_qos0(&reply, "r").unwrap();
    }
    assert_eq!(path, Delivery::Direct);
    let p = dev.next_publish().await;
    assert_eq!((p.topic.as_str(), p.qos), (reply.as_str(), QoS::AtMostOnce));
    // The OTA upgrade push stays on the router path at the auto-subscription's QoS 1.
    downlink.publish(upgrade_topic("dev1"), "push").unwrap();
    let p = dev
        .next(|p| match p {
            Packet::Publish(p) if p.topic == upgrade_topic("dev1") => Some(p),
            _ => None,
        })
        .await;
    assert_eq!((p.qos, &p.payload[..]), (QoS::AtLeastOnce, &b"push"[..]));
}

#[tokio::test]
async fn a_device_not_subscribed_gets_no_direct_message() {
    let mut tb = start().await;
    let mut dev1 = connect(tb.addr(), "dev1").await;
    tb.expect_connect("dev1").await;
    let mut dev2 = connect(tb.addr(), "dev2").await;
    tb.expect_connect("dev2").await;
    dev1.client
        .subscribe(format!("/sys/{PK}/dev1/#"), QoS::AtMostOnce)
        .await
        .unwrap();
    dev1.suback().await;
    // dev2 subscribed only to its upgrade topic, not to its replies.
    dev2.client
        .subscribe(upgrade_topic("dev2"), QoS::AtLeastOnce)
        .await
        .unwrap();
    dev2.suback().await;
    let downlink = tb.handle.downlink();
    assert_eq!(
        downlink
            .publish_qos0(post_reply_topic("dev2"), "not for anyone")
            .unwrap(),
        Delivery::Router
    );
    // Another device's reply topic never reaches dev1, even though dev1 has a `#` grant.
    assert_eq!(
        downlink
            .publish_qos0(
                format!("/sys/{PK}/dev10/thing/event/property/post_reply"),
                "x"
            )
            .unwrap(),
        Delivery::Router
    );
    downlink.publish(upgrade_topic("dev2"), "marker2").unwrap();
    let p = dev2.next_publish().await;
    assert_eq!(&p.payload[..], b"marker2");
    assert_eq!(
        downlink
            .publish_qos0(post_reply_topic("dev1"), "for dev1")
            .unwrap(),
        Delivery::Direct
    );
    let p = dev1.next_publish().await;
    assert_eq!(&p.payload[..], b"for dev1");
    assert_eq!(downlink_counts(&tb), (1, 0, 3));
}

#[tokio::test]
async fn a_persistent_session_keeps_qos0_messages_on_the_router_path() {
    let mut tb = start().await;
    let addr = tb.addr();
    let mut dev = connect_with(options(addr, &creds("dev1"), false))
        .await
        .unwrap();
    tb.expect_connect("dev1").await;
    dev.client
        .subscribe(format!("/sys/{PK}/dev1/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    dev.suback().await;
    let downlink = tb.handle.downlink();
    let reply = post_reply_topic("dev1");
    // Online but persistent: the router delivers it (at the subscription's QoS, as before).
    assert_eq!(
        downlink.publish_qos0(&reply, "online").unwrap(),
        Delivery::Router
    );
    let p = dev.next_publish().await;
    assert_eq!((p.qos, &p.payload[..]), (QoS::AtLeastOnce, &b"online"[..]));
    dev.client.disconnect().await.unwrap();
    tb.expect_disconnect("dev1").await;

    // Offline: queued by the router and delivered on reconnect.
    assert_eq!(
        downlink.publish_qos0(&reply, "offline").unwrap(),
        Delivery::Router
    );
    let mut back = connect_with(options(addr, &creds("dev1"), false))
        .await
        .unwrap();
    tb.expect_connect("dev1").await;
    assert!(back.session_present);
    let p = back.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), p.qos, &p.payload[..]),
        (reply.as_str(), QoS::AtLeastOnce, &b"offline"[..])
    );
    assert_eq!(downlink_counts(&tb), (0, 0, 2));
}

/// A raw MQTT SUBSCRIBE (packet id 1) in bytes.
fn raw_subscribe(filter: &str) -> Vec<u8> {
    use rumqttd::protocol as p;
    let subscribe = p::Packet::Subscribe(
        p::Subscribe {
            pkid: 1,
            filters: vec![p::Filter {
                path: filter.to_owned(),
                qos: p::QoS::AtMostOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: p::RetainForwardRule::Never,
            }],
        },
        None,
    );
    raw(subscribe)
}

#[tokio::test]
async fn a_device_that_stops_reading_loses_direct_messages_without_blocking_anyone() {
    let mut tb = start().await;
    // dev1 subscribes and then never reads again.
    let (mut stuck, _) = raw_session(tb.addr(), "dev1", 0).await;
    tb.expect_connect("dev1").await;
    stuck
        .write_all(&raw_subscribe(&format!("/sys/{PK}/dev1/#")))
        .await
        .unwrap();
    let mut suback = [0u8; 5];
    tokio::time::timeout(WAIT, stuck.read_exact(&mut suback))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(suback, [0x90, 0x03, 0x00, 0x01, 0x00]);
    let mut reader = connect(tb.addr(), "dev2").await;
    tb.expect_connect("dev2").await;
    reader
        .client
        .subscribe(post_reply_topic("dev2"), QoS::AtMostOnce)
        .await
        .unwrap();
    reader.suback().await;

    // Large messages fill the socket buffers; then dev1's task is stuck writing, its queue
    // fills and further messages are dropped. No call ever waits.
    let payload = Bytes::from(vec![b'x'; 60 * 1024]);
    let downlink = tb.handle.downlink();
    let (mut direct, mut dropped) = (0u64, 0u64);
    for _ in 0..5_000 {
        match downlink
            .publish_qos0(post_reply_topic("dev1"), payload.clone())
            .unwrap()
        {
            Delivery::Direct => direct += 1,
            Delivery::Dropped => dropped += 1,
            Delivery::Router => panic!("dev1 is subscribed"),
        }
        if dropped >= 10 {
            break;
        }
        // Let the connection tasks write.
        tokio::task::yield_now().await;
    }
    assert!(
        dropped >= 10,
        "never dropped after {direct} direct messages"
    );
    assert_eq!(downlink_counts(&tb), (direct, dropped, 0));
    assert!(tb.metric(&format!(
        "fleetgate_mqtt_downlink_direct_dropped_total {dropped}"
    )));

    // The other device is not affected, and dev1's session is still up.
    assert_eq!(
        downlink
            .publish_qos0(post_reply_topic("dev2"), "fine")
            .unwrap(),
        Delivery::Direct
    );
    assert_eq!(&reader.next_publish().await.payload[..], b"fine");
    assert!(downlink.is_connected(&device("dev1")));
}

/// A raw QoS 0 PUBLISH in bytes.
fn raw_publish(topic: &str, payload: &str) -> Vec<u8> {
    use rumqttd::protocol as p;
    let publish = p::Packet::Publish(
        p::Publish::new(
            Bytes::copy_from_slice(topic.as_bytes()),
            Bytes::copy_from_slice(payload.as_bytes()),
            false,
        ),
        None,
    );
    raw(publish)
}

#[tokio::test]
async fn a_subscription_is_in_place_for_replies_to_requests_in_the_same_write() {
    let mut tb = start().await;
    *tb.hooks.replies.lock().unwrap() = Some(tb.handle.downlink());
    let (mut s, _) = raw_session(tb.addr(), "dev1", 0).await;
    tb.expect_connect("dev1").await;
    // SUBSCRIBE and a request in one write: the reply (router path, no grant yet) must find the
    // subscription in the router.
    let post = format!("/sys/{PK}/dev1/thing/event/property/post");
    let mut burst = raw_subscribe(&post_reply_topic("dev1"));
    burst.extend(raw_publish(&post, "req"));
    s.write_all(&burst).await.unwrap();
    let suback = [0x90, 0x03, 0x00, 0x01, 0x00];
    let reply = raw_publish(&post_reply_topic("dev1"), "req");
    let mut got = vec![0u8; suback.len() + reply.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut got))
        .await
        .expect("no reply")
        .unwrap();
    assert_eq!(got, [&suback[..], &reply[..]].concat());
}

/// A raw QoS 1 PUBLISH in bytes (short: one-byte remaining length).
fn raw_publish_qos1(topic: &str, pkid: u16, payload: &str) -> Vec<u8> {
    let len = 2 + topic.len() + 2 + payload.len();
    let mut out = vec![0x32, u8::try_from(len).expect("short packet")];
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&pkid.to_be_bytes());
    out.extend_from_slice(payload.as_bytes());
    out
}

#[tokio::test]
async fn publishes_arriving_while_a_run_is_processed_are_all_acknowledged_in_order() {
    let tb = start().await;
    // Each run takes 20 ms: the writes below arrive while earlier ones are processed, so the
    // connection picks them up before writing acks (several rounds share one write).
    *tb.hooks.publish_delay.lock().unwrap() = Duration::from_millis(20);
    let (mut s, _) = raw_session(tb.addr(), "dev1", 0).await;
    let topic = format!("/sys/{PK}/dev1/thing/event/property/post");
    for pkid in 1..=12u16 {
        s.write_all(&raw_publish_qos1(&topic, pkid, "x"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let mut acks = vec![0u8; 4 * 12];
    tokio::time::timeout(WAIT, s.read_exact(&mut acks))
        .await
        .expect("every PUBACK in time")
        .unwrap();
    let expected: Vec<u8> = (1..=12u16)
        .flat_map(|pkid| {
            let [hi, lo] = pkid.to_be_bytes();
            [0x40, 0x02, hi, lo]
        })
        .collect();
    assert_eq!(acks, expected);
    assert_eq!(tb.hooks.processed.load(Ordering::SeqCst), 12);
}

mod limits;
#[tokio::test]
async fn a_withheld_qos1_publish_closes_the_connection_without_its_puback() {
    let mut tb = start().await;
    let (mut s, _) = raw_session(tb.addr(), "dev1", 0).await;
    tb.expect_connect("dev1").await;
    let topic = format!("/sys/{PK}/dev1/thing/event/property/post");
    // One write, one run: the message before the withheld one is acknowledged; it and every
    // QoS 1 message after it are not (they were processed with the run, and a resend is
    // processed again: at least once).
    let mut burst = raw_publish_qos1(&topic, 1, "first");
    burst.extend(raw_publish_qos1(&topic, 2, "withhold me"));
    burst.extend(raw_publish_qos1(&topic, 3, "third"));
    burst.extend(raw_publish(&topic, "fourth"));
    s.write_all(&burst).await.unwrap();
    assert_eq!(assert_closed(&mut s).await, vec![0x40, 0x02, 0x00, 0x01]);
    let reason = loop {
        match tb.next_event().await {
            HookEvent::Publish(_, _, payload) => assert!(!payload.starts_with(WITHHOLD)),
            HookEvent::Disconnect(session, reason) if session.device == device("dev1") => {
                break reason
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(reason, DisconnectReason::Withheld);
    assert!(tb.metric("fleetgate_mqtt_publishes_withheld_total 2"));

    // The one-at-a-time path (QoS 2): no PUBREC either.
    let (mut s, _) = raw_session(tb.addr(), "dev2", 0).await;
    tb.expect_connect("dev2").await;
    let topic = format!("/sys/{PK}/dev2/thing/event/property/post");
    let mut q2 = raw_publish_qos1(&topic, 7, "withhold me too");
    q2[0] = 0x34;
    s.write_all(&q2).await.unwrap();
    assert_eq!(assert_closed(&mut s).await, Vec::<u8>::new());
    let (_, reason) = tb.expect_disconnect("dev2").await;
    assert_eq!(reason, DisconnectReason::Withheld);
    assert!(tb.metric("fleetgate_mqtt_publishes_withheld_total 3"));
}

#[tokio::test]
async fn a_withheld_qos0_publish_keeps_the_connection() {
    let mut tb = start().await;
    let (mut s, _) = raw_session(tb.addr(), "dev1", 0).await;
    tb.expect_connect("dev1").await;
    let topic = format!("/sys/{PK}/dev1/thing/event/property/post");
    // Nothing was promised for a QoS 0 message: the session goes on and acks what follows.
    let mut burst = raw_publish(&topic, "withhold me");
    burst.extend(raw_publish_qos1(&topic, 5, "after"));
    s.write_all(&burst).await.unwrap();
    let mut ack = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut ack))
        .await
        .expect("PUBACK in time")
        .unwrap();
    assert_eq!(ack, [0x40, 0x02, 0x00, 0x05]);
    let (_, t, payload) = tb.expect_publish().await;
    assert_eq!((t, &payload[..]), (topic, &b"after"[..]));
    assert!(tb.metric("fleetgate_mqtt_publishes_withheld_total 0"));
}

// ---- PROXY protocol (a balancer in front of the listener) ----

/// The balancer's address: loopback, but not the one test clients use by default.
const BALANCER: &str = "127.0.0.3";

fn proxied_config(mode: crate::proxy_protocol::ProxyMode) -> BrokerConfig {
    BrokerConfig {
        proxy: crate::proxy_protocol::ProxyPolicy {
            mode,
            trusted: vec![BALANCER.parse().unwrap()],
        },
        ..test_config()
    }
}

async fn tcp_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.expect("TCP connect")
}

/// A PROXY v2 header (HAProxy's `send-proxy-v2`), built with ppp's encoder.
fn v2_header(client: &str, command: ppp::v2::Command) -> Vec<u8> {
    use ppp::v2;
    let client: SocketAddr = client.parse().unwrap();
    let to: SocketAddr = match client {
        SocketAddr::V4(_) => "10.0.0.1:1883".parse().unwrap(),
        SocketAddr::V6(_) => "[2001:db8::1]:1883".parse().unwrap(),
    };
    v2::Builder::with_addresses(
        v2::Version::Two | command,
        v2::Protocol::Stream,
        (client, to),
    )
    .build()
    .unwrap()
}

fn proxied(client: &str) -> Vec<u8> {
    v2_header(client, ppp::v2::Command::Proxy)
}

/// A raw session through "the balancer": a socket from `from` that sends `header`, then a
/// signed CONNECT for `dn` in the same write (as HAProxy does), and reads the CONNACK.
async fn session_via(
    from: &str,
    addr: SocketAddr,
    header: &[u8],
    dn: &str,
) -> (TcpStream, Option<[u8; 4]>) {
    let mut s = tcp_from(from, addr).await;
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(&raw_connect(&creds(dn), 30));
    // A socket closed at accept may already refuse the write: the read below tells.
    let _ = s.write_all(&bytes).await;
    let mut connack = [0u8; 4];
    let got = tokio::time::timeout(WAIT, s.read_exact(&mut connack))
        .await
        .expect("neither CONNACK nor close in time");
    (s, got.ok().map(|_| connack))
}

const CONNACK_OK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

#[tokio::test]
async fn behind_a_trusted_balancer_the_header_names_the_peer() {
    use crate::proxy_protocol::ProxyMode;
    let mut tb = start_with(proxied_config(ProxyMode::Trusted)).await;
    let addr = tb.addr();
    let v2 = proxied("198.51.100.7:40000");
    let v1 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 1883\r\n".to_vec();
    let local = v2_header("10.9.9.9:1", ppp::v2::Command::Local);
    // (header, device, the session's client address: the header's, or the balancer's own for
    // LOCAL)
    let cases = [
        (v2, "dev1", Some("198.51.100.7:40000")),
        (v1, "dev2", Some("[2001:db8::7]:40001")),
        (local, "dev3", None),
    ];
    for (header, dn, client) in cases {
        let (s, connack) = session_via(BALANCER, addr, &header, dn).await;
        assert_eq!(connack, Some(CONNACK_OK), "{dn}");
        let session = tb.expect_connect(dn).await;
        match client {
            Some(client) => assert_eq!(session.client_addr, client.parse().unwrap(), "{dn}"),
            None => assert_eq!(session.client_addr, s.local_addr().unwrap(), "{dn}"),
        }
        drop(s);
        tb.expect_disconnect(dn).await;
    }
    // In `trusted` mode a client from elsewhere connects as it is, at its own address.
    let (s, connack) = raw_session(addr, "dev1", 30).await;
    assert_eq!(connack, CONNACK_OK);
    assert_eq!(
        tb.expect_connect("dev1").await.client_addr,
        s.local_addr().unwrap()
    );
}

#[tokio::test]
async fn a_header_from_an_untrusted_source_is_not_believed() {
    use crate::proxy_protocol::ProxyMode;
    // `trusted`: a forged header from an ordinary client is not a PROXY header to the broker
    // but the client's first bytes, which are not MQTT: closed, nothing connects.
    let mut tb = start_with(proxied_config(ProxyMode::Trusted)).await;
    let (mut s, connack) =
        session_via("127.0.0.1", tb.addr(), &proxied("198.51.100.7:1"), "dev1").await;
    assert_eq!(connack, None, "a forged header must not get a session");
    assert_closed(&mut s).await;
    assert!(tb.events.try_recv().is_err(), "no hook was called");
    assert!(tb.metric(r#"fleetgate_mqtt_connects_refused_total{reason="protocol"} 1"#));

    // `required`: closed at accept, before a byte is read; counted by the gate.
    let mut tb = start_with(proxied_config(ProxyMode::Required)).await;
    let (mut s, connack) =
        session_via("127.0.0.1", tb.addr(), &proxied("198.51.100.7:1"), "dev1").await;
    assert_eq!(connack, None);
    assert_closed(&mut s).await;
    let (mut s, connack) = session_via("127.0.0.2", tb.addr(), &[], "dev1").await;
    assert_eq!(connack, None, "without a header either");
    assert_closed(&mut s).await;
    assert!(tb.events.try_recv().is_err(), "no hook was called");
    assert!(
        tb.metric(
            r#"fleetgate_connections_refused_total{listener="mqtt",reason="proxy_untrusted"} 2"#
        ),
        "{}",
        tb.metrics.encode()
    );
    assert_eq!(tb.handle.gate().open(), 0);
    // The balancer still gets its devices through.
    let (_s, connack) = session_via(BALANCER, tb.addr(), &proxied("198.51.100.7:1"), "dev1").await;
    assert_eq!(connack, Some(CONNACK_OK));
    tb.expect_connect("dev1").await;
}

#[tokio::test]
async fn a_malformed_or_late_header_closes_the_socket() {
    use crate::proxy_protocol::ProxyMode;
    let mut config = proxied_config(ProxyMode::Required);
    config.connect_timeout = Duration::from_secs(1);
    let mut tb = start_with(config).await;
    let addr = tb.addr();

    // A trusted socket that starts with MQTT instead of a header; an HTTP request; a v2 header
    // announcing more than the bound; a v1 line that never ends.
    let mut oversized = proxied("198.51.100.7:1");
    oversized[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    let endless = [
        b"PROXY TCP4 198.51.100.7 10.0.0.1 1 1883".as_slice(),
        &[b' '; 200],
    ]
    .concat();
    let bad: [&[u8]; 4] = [
        &raw_connect(&creds("dev1"), 30),
        b"GET / HTTP/1.1\r\n\r\n",
        &oversized,
        &endless,
    ];
    for bytes in bad {
        let mut s = tcp_from(BALANCER, addr).await;
        s.write_all(bytes).await.unwrap();
        assert_eq!(assert_closed(&mut s).await, b"", "closed without an answer");
    }
    assert!(
        tb.metric(r#"fleetgate_mqtt_connects_refused_total{reason="proxy_header"} 4"#),
        "{}",
        tb.metrics.encode()
    );

    // Half a header, then silence: closed at the CONNECT deadline.
    let mut s = tcp_from(BALANCER, addr).await;
    s.write_all(&proxied("198.51.100.7:1")[..10]).await.unwrap();
    assert_closed(&mut s).await;
    assert!(tb.metric(r#"fleetgate_mqtt_connects_refused_total{reason="timeout"} 1"#));
    // Closed before sending anything: not a refusal.
    drop(tcp_from(BALANCER, addr).await);

    assert!(tb.events.try_recv().is_err(), "no hook was called");
    let gate = tb.handle.gate();
    let deadline = tokio::time::Instant::now() + WAIT;
    while gate.open() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "sockets left open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gate.unauthenticated(), 0);
    // The broker still serves the balancer.
    let (_s, connack) = session_via(BALANCER, addr, &proxied("198.51.100.7:1"), "dev1").await;
    assert_eq!(connack, Some(CONNACK_OK));
    tb.expect_connect("dev1").await;
}

#[tokio::test]
async fn the_per_source_cap_counts_the_client_behind_the_balancer() {
    use crate::proxy_protocol::ProxyMode;
    let mut config = proxied_config(ProxyMode::Required);
    config.max_unauthenticated_per_ip = 2;
    // The flood's sockets must outlive the test's steps.
    config.connect_timeout = Duration::from_secs(60);
    let mut tb = start_with(config).await;
    let addr = tb.addr();
    let flooder: std::net::IpAddr = "198.51.100.66".parse().unwrap();
    let gate = Arc::clone(tb.handle.gate());

    // Two sockets of one client (headers, no CONNECT) fill its cap...
    let mut flood = Vec::new();
    for port in [1, 2] {
        let mut s = tcp_from(BALANCER, addr).await;
        s.write_all(&proxied(&format!("{flooder}:{port}")))
            .await
            .unwrap();
        flood.push(s);
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while gate.unauthenticated_from(flooder) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "headers not read");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...so its next one is closed, even with a valid CONNECT,
    let (mut s, connack) =
        session_via(BALANCER, addr, &proxied(&format!("{flooder}:3")), "dev1").await;
    assert_eq!(connack, None);
    assert_closed(&mut s).await;
    assert!(tb.metric(r#"fleetgate_connections_refused_total{listener="mqtt",reason="per_ip"} 1"#));
    // ...while another client's device connects through the same balancer (whose own address
    // holds no slot: more than two sockets from it are open).
    let (_s, connack) = session_via(BALANCER, addr, &proxied("198.51.100.7:1"), "dev1").await;
    assert_eq!(connack, Some(CONNACK_OK));
    tb.expect_connect("dev1").await;
    assert_eq!(gate.unauthenticated_from(BALANCER.parse().unwrap()), 0);
    assert_eq!(gate.unauthenticated_from(flooder), 2);
    // A slot given back is the flooder's to use again.
    drop(flood.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    while gate.unauthenticated_from(flooder) > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot not given back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_s2, connack) =
        session_via(BALANCER, addr, &proxied(&format!("{flooder}:4")), "dev2").await;
    assert_eq!(connack, Some(CONNACK_OK));
    assert_eq!(tb.expect_connect("dev2").await.client_addr.ip(), flooder);
}

#[tokio::test]
async fn a_shutdown_does_not_wait_for_a_balancers_header() {
    use crate::proxy_protocol::ProxyMode;
    let mut config = proxied_config(ProxyMode::Required);
    // Far beyond WAIT: a shutdown that waited for the header's deadline would fail the test.
    config.connect_timeout = Duration::from_secs(600);
    let tb = start_with(config).await;
    let mut s = tcp_from(BALANCER, tb.addr()).await;
    s.write_all(&proxied("198.51.100.7:1")[..5]).await.unwrap();
    let gate = Arc::clone(tb.handle.gate());
    let deadline = tokio::time::Instant::now() + WAIT;
    while gate.open() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "not admitted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::timeout(WAIT, tb.handle.shutdown())
        .await
        .expect("the shutdown waited for a half-sent PROXY header");
    assert_closed(&mut s).await;
    assert_eq!(gate.open(), 0);
}
