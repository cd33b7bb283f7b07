//! Per-device limits, CONNECT timestamps, forgetting a deleted device's session, and packets that
//! break the protocol (closed unanswered). Same helpers as the parent module.

use super::*;
use std::time::{SystemTime, UNIX_EPOCH};

/// `/{pk}/{dn}/user/f{i}`: a filter `dn` owns.
fn user_filter(dn: &str, i: usize) -> String {
    format!("/{PK}/{dn}/user/f{i}")
}

/// Options for `dn` with `_ss=1` (not signed: the same credentials with the flag added).
fn ss1_options(addr: SocketAddr, dn: &str) -> MqttOptions {
    let c = creds(dn);
    let mut opts = options(addr, &c, true);
    let id = c.client_id.strip_suffix('|').unwrap();
    opts.set_client_id(format!("{id},_ss=1|"));
    opts
}

const GRANTED: SubscribeReasonCode = SubscribeReasonCode::Success(QoS::AtMostOnce);

#[tokio::test]
async fn filters_beyond_the_device_limit_are_refused_for_good() {
    let mut config = test_config();
    config.max_subscriptions_per_device = 3;
    let mut tb = start_with(config).await;
    let addr = tb.addr();
    let mut dev = connect(addr, "dev1").await;
    tb.expect_connect("dev1").await;
    let f = |i| user_filter("dev1", i);
    // A foreign filter is the ACL's refusal and uses no slot; the fourth own one is over.
    dev.client
        .subscribe_many([
            SubscribeFilter::new(f(1), QoS::AtMostOnce),
            SubscribeFilter::new(user_filter("dev2", 1), QoS::AtMostOnce),
            SubscribeFilter::new(f(2), QoS::AtMostOnce),
            SubscribeFilter::new(f(3), QoS::AtMostOnce),
            SubscribeFilter::new(f(4), QoS::AtMostOnce),
        ])
        .await
        .unwrap();
    let failure = SubscribeReasonCode::Failure;
    assert_eq!(
        dev.suback().await,
        [GRANTED, failure, GRANTED, GRANTED, failure]
    );
    assert!(tb.metric("fleetgate_mqtt_subscriptions_refused_total 1"));
    assert!(tb.metric(r#"fleetgate_mqtt_acl_denied_total{kind="subscribe"} 1"#));
    // The granted ones are in place, the refused one is not.
    let downlink = tb.handle.downlink();
    downlink.publish(f(4), "refused").unwrap();
    downlink.publish(f(3), "granted").unwrap();
    let p = dev.next_publish().await;
    assert_eq!((p.topic, &p.payload[..]), (f(3), &b"granted"[..]));

    // Unsubscribing gives no slot back, and neither does a new connection: the router keeps
    // every filter's log. A filter used before stays free.
    dev.client.unsubscribe(f(1)).await.unwrap();
    dev.next(|p| matches!(p, Packet::UnsubAck(_)).then_some(()))
        .await;
    dev.client.subscribe(f(5), QoS::AtMostOnce).await.unwrap();
    assert_eq!(dev.suback().await, [failure]);
    dev.client.disconnect().await.unwrap();
    tb.expect_disconnect("dev1").await;
    let mut dev = connect(addr, "dev1").await;
    tb.expect_connect("dev1").await;
    dev.client
        .subscribe_many([
            SubscribeFilter::new(f(5), QoS::AtMostOnce),
            SubscribeFilter::new(f(1), QoS::AtMostOnce),
            SubscribeFilter::new(f(2), QoS::AtMostOnce),
        ])
        .await
        .unwrap();
    assert_eq!(dev.suback().await, [failure, GRANTED, GRANTED]);
    assert!(tb.metric("fleetgate_mqtt_subscriptions_refused_total 3"));

    // Another device has a budget of its own, and the `_ss=1` filters the gateway subscribes
    // (which the device may also subscribe itself) do not use it.
    let mut dev2 = connect_with(ss1_options(addr, "dev2")).await.unwrap();
    tb.expect_connect("dev2").await;
    let g = |i| user_filter("dev2", i);
    dev2.client
        .subscribe_many([
            SubscribeFilter::new(g(1), QoS::AtMostOnce),
            SubscribeFilter::new(g(2), QoS::AtMostOnce),
            SubscribeFilter::new(g(3), QoS::AtMostOnce),
            SubscribeFilter::new(format!("/sys/{PK}/dev2/#"), QoS::AtMostOnce),
            SubscribeFilter::new(g(4), QoS::AtMostOnce),
        ])
        .await
        .unwrap();
    assert_eq!(
        dev2.suback().await,
        [GRANTED, GRANTED, GRANTED, GRANTED, failure]
    );
    assert!(tb.metric("fleetgate_mqtt_subscriptions_refused_total 4"));
}

#[tokio::test]
async fn a_disconnected_session_leaves_nothing_in_the_gateway() {
    let mut tb = start().await;
    let mut dev = connect(tb.addr(), "dev1").await;
    tb.expect_connect("dev1").await;
    dev.client
        .subscribe_many(
            (1..=3).map(|i| SubscribeFilter::new(user_filter("dev1", i), QoS::AtMostOnce)),
        )
        .await
        .unwrap();
    dev.suback().await;
    let downlink = tb.handle.downlink();
    // The grants are recorded (a reply goes straight to the session)...
    assert_eq!(
        downlink.publish_qos0(user_filter("dev1", 2), "r").unwrap(),
        Delivery::Direct
    );
    dev.next_publish().await;
    let handle = Arc::downgrade(&downlink.session(&device("dev1")).expect("in the table"));
    // ...and go with the session once it ended: out of the table, the handle itself freed.
    dev.client.disconnect().await.unwrap();
    tb.expect_disconnect("dev1").await;
    assert!(downlink.session(&device("dev1")).is_none());
    let deadline = tokio::time::Instant::now() + WAIT;
    while handle.upgrade().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "session handle still alive"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `dev` got a message published through the downlink after everything published
/// before it: the router then holds those earlier messages too (one link, one order).
async fn router_caught_up(downlink: &Downlink, marker_dev: &mut Client, dn: &str) {
    downlink.publish(upgrade_topic(dn), "marker").unwrap();
    let p = marker_dev.next_publish().await;
    assert_eq!(&p.payload[..], b"marker");
}

#[tokio::test]
async fn a_forgotten_persistent_session_leaves_nothing_to_the_next_connection() {
    let mut tb = start().await;
    let addr = tb.addr();
    let downlink = tb.handle.downlink();
    let mut marker = connect(addr, "dev2").await;
    tb.expect_connect("dev2").await;
    marker
        .client
        .subscribe(upgrade_topic("dev2"), QoS::AtMostOnce)
        .await
        .unwrap();
    marker.suback().await;

    // Offline with a subscription and a message queued: forgotten, the next connection of the
    // client id starts with no session, no subscription and none of the queued messages.
    let mut dev = connect_with(options(addr, &creds("dev1"), false))
        .await
        .unwrap();
    tb.expect_connect("dev1").await;
    dev.client
        .subscribe(upgrade_topic("dev1"), QoS::AtLeastOnce)
        .await
        .unwrap();
    dev.suback().await;
    dev.client.disconnect().await.unwrap();
    tb.expect_disconnect("dev1").await;
    downlink
        .publish(upgrade_topic("dev1"), "queued while offline")
        .unwrap();
    router_caught_up(&downlink, &mut marker, "dev2").await;
    downlink.forget_session(&device("dev1")).await.unwrap();
    let mut back = connect_with(options(addr, &creds("dev1"), false))
        .await
        .unwrap();
    tb.expect_connect("dev1").await;
    assert!(!back.session_present);
    back.client
        .subscribe(upgrade_topic("dev1"), QoS::AtLeastOnce)
        .await
        .unwrap();
    back.suback().await;
    downlink.publish(upgrade_topic("dev1"), "fresh").unwrap();
    assert_eq!(&back.next_publish().await.payload[..], b"fresh");

    // Online: the session is ended first (kicked), then forgotten.
    downlink.forget_session(&device("dev1")).await.unwrap();
    assert_eq!(
        tb.expect_disconnect("dev1").await.1,
        DisconnectReason::Kicked
    );
    back.closed().await;
    let again = connect_with(options(addr, &creds("dev1"), false))
        .await
        .unwrap();
    tb.expect_connect("dev1").await;
    assert!(!again.session_present);
}

#[tokio::test]
async fn a_device_deleted_while_it_connects_gets_no_session() {
    let mut tb = start().await;
    // Its credentials are found by the signature check and gone right after.
    *tb.hooks.deleted_on_lookup.lock().unwrap() = Some("dev1".into());
    let refused = connect_with(options(tb.addr(), &creds("dev1"), false)).await;
    assert_eq!(
        refused_code(refused),
        ConnectReturnCode::BadUserNamePassword
    );
    assert!(tb.metric(r#"fleetgate_mqtt_connects_refused_total{reason="unknown_device"} 1"#));
    assert!(tb.handle.downlink().session(&device("dev1")).is_none());
    assert!(tb.events.try_recv().is_err(), "never online");
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn connect_timestamps_outside_the_window_are_refused() {
    let mut config = test_config();
    config.connect_timestamp_window = Some(Duration::from_secs(300));
    let mut tb = start_with(config).await;
    let addr = tb.addr();
    let signed = |ts: Option<String>| {
        let c = LinkCredentials::new(PK, "dev1", SECRET, SignMethod::HmacSha256, 3, ts);
        options(addr, &c, true)
    };
    let ten_years = 10 * 365 * 86_400;
    for ts in [
        "978307200".to_owned(),
        (unix_secs() + ten_years).to_string(),
    ] {
        let code = refused_code(connect_with(signed(Some(ts.clone()))).await);
        assert_eq!(code, ConnectReturnCode::NotAuthorized, "{ts}");
    }
    assert!(tb.metric(r#"fleetgate_mqtt_connects_refused_total{reason="timestamp"} 2"#));
    // Now (in seconds or milliseconds), or no timestamp at all: accepted. The same CONNECT
    // again is accepted too: within the window a replay is not told apart.
    let now_ms = (unix_secs() * 1000).to_string();
    for ts in [
        Some(unix_secs().to_string()),
        Some(now_ms.clone()),
        Some(now_ms),
        None,
    ] {
        let dev = connect_with(signed(ts)).await.expect("accepted");
        tb.expect_connect("dev1").await;
        dev.client.disconnect().await.unwrap();
        tb.expect_disconnect("dev1").await;
    }
}

/// A raw MQTT UNSUBSCRIBE (packet id 1) in bytes.
fn raw_unsubscribe(filter: &str) -> Vec<u8> {
    use rumqttd::protocol as p;
    raw(p::Packet::Unsubscribe(
        p::Unsubscribe {
            pkid: 1,
            filters: vec![filter.to_owned()],
        },
        None,
    ))
}

#[tokio::test]
async fn packets_that_break_the_protocol_close_the_connection_unanswered() {
    let mut tb = start().await;
    let own = format!("/sys/{PK}/dev1/thing/event/property/post");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "PUBLISH QoS 1, zero-length topic",
            raw_publish_qos1("", 7, "x"),
            "empty_topic",
        ),
        (
            "PUBLISH QoS 0, zero-length topic",
            vec![0x30, 0x03, 0x00, 0x00, b'x'],
            "empty_topic",
        ),
        (
            "PUBLISH, NUL in the topic",
            raw_publish_qos1(&format!("{own}\0"), 7, "x"),
            "nul_in_topic",
        ),
        (
            "PUBLISH QoS 2, NUL in the topic",
            {
                let mut p = raw_publish_qos1(&format!("/{PK}/dev1/user/\0"), 7, "x");
                p[0] = 0x34;
                p
            },
            "nul_in_topic",
        ),
        (
            "SUBSCRIBE, zero-length filter",
            raw_subscribe(""),
            "empty_topic",
        ),
        (
            "SUBSCRIBE, NUL in a filter",
            raw_subscribe(&format!("/{PK}/dev1/user/\0")),
            "nul_in_topic",
        ),
        (
            "SUBSCRIBE without filters",
            vec![0x82, 0x02, 0x00, 0x01],
            "empty_subscribe",
        ),
        (
            "UNSUBSCRIBE without filters",
            vec![0xA2, 0x02, 0x00, 0x01],
            "empty_unsubscribe",
        ),
        (
            "UNSUBSCRIBE, zero-length filter",
            raw_unsubscribe(""),
            "empty_topic",
        ),
        (
            "UNSUBSCRIBE, NUL in a filter",
            raw_unsubscribe(&format!("/{PK}/dev1/user/\0")),
            "nul_in_topic",
        ),
    ];
    let mut counts: HashMap<&str, u64> = HashMap::new();
    for (what, evil, reason) in cases {
        let (mut s, connack) = raw_session(tb.addr(), "dev1", 0).await;
        assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "{what}");
        tb.expect_connect("dev1").await;
        // A good QoS 1 PUBLISH in the same write, before it, is processed and acknowledged;
        // the bad packet gets nothing.
        let mut burst = raw_publish_qos1(&own, 1, "before");
        burst.extend(evil);
        s.write_all(&burst).await.unwrap();
        assert_eq!(
            assert_closed(&mut s).await,
            [0x40, 0x02, 0x00, 0x01],
            "{what}: only the PUBACK of the good PUBLISH"
        );
        let (_, topic, _) = tb.expect_publish().await;
        assert_eq!(topic, own, "{what}");
        assert_eq!(
            tb.expect_disconnect("dev1").await.1,
            DisconnectReason::ConnectionLost,
            "{what}"
        );
        *counts.entry(reason).or_default() += 1;
        let sample = format!(
            r#"fleetgate_mqtt_protocol_violations_total{{reason="{reason}"}} {}"#,
            counts[reason]
        );
        assert!(tb.metric(&sample), "{what}: {}", tb.metrics.encode());
    }
    assert_eq!(tb.hooks.processed.load(Ordering::SeqCst), 10);
}
