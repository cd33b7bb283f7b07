//! What one device can make the gateway keep, and for how long: modules per device, a deleted
//! device's persistent session, and CONNECTs whose signed timestamp is out of time.

use crate::helpers::*;
use fleetgate_topics::sign::{LinkCredentials, SignMethod};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, Packet, QoS};
use serde_json::json;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

#[tokio::test]
async fn version_reports_beyond_the_module_limit_are_dropped_and_counted() {
    let app = spawn_app_with(|s| s.mqtt.max_modules_per_device = 3).await;
    let pk = app.create_product("meter").await;
    let secret = app.create_device(&pk, "m-0001").await;
    let mut dev = connect(app.mqtt_addr(), &credentials(&pk, "m-0001", &secret)).await;
    let inform = format!("/ota/device/inform/{pk}/m-0001");
    for i in 1..=6 {
        let payload = format!(r#"{{"id":{i},"params":{{"version":"1.{i}","module":"m{i}"}}}}"#);
        dev.client
            .publish(&inform, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        // Every report is acknowledged (resending it could not help), refused or not.
        dev.wait_packet("PUBACK", |p| matches!(p, Packet::PubAck(_)))
            .await;
    }
    // A module it has can still be updated.
    dev.client
        .publish(
            &inform,
            QoS::AtLeastOnce,
            false,
            r#"{"id":7,"params":{"version":"2.0","module":"m2"}}"#,
        )
        .await
        .unwrap();
    dev.wait_packet("PUBACK", |p| matches!(p, Packet::PubAck(_)))
        .await;
    assert_eq!(
        app.device(&pk, "m-0001").await["versions"],
        json!({"m1": "1.1", "m2": "2.0", "m3": "1.3"})
    );
    assert_eq!(
        app.metric(r#"fleetgate_version_reports_refused_total{reason="module_limit"}"#)
            .await,
        3.0
    );
}

/// Connects with `clean_session = false`; returns the client, its event loop and
/// `session_present`.
async fn connect_persistent(
    addr: SocketAddr,
    creds: &LinkCredentials,
) -> (AsyncClient, EventLoop, bool) {
    let mut opts = options(addr, creds);
    opts.set_clean_session(false);
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let present = poll_until(&mut eventloop, |p| match p {
        Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => Some(ack.session_present),
        Packet::ConnAck(ack) => panic!("refused: {:?}", ack.code),
        _ => None,
    })
    .await;
    (client, eventloop, present)
}

async fn poll_until<T>(eventloop: &mut EventLoop, mut pick: impl FnMut(Packet) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(p))) => {
                if let Some(t) = pick(p) {
                    return t;
                }
            }
            Ok(Ok(Event::Outgoing(_))) => {}
            Ok(Err(e)) => panic!("connection ended: {e}"),
            Err(_) => panic!("nothing in time"),
        }
    }
}

#[tokio::test]
async fn a_device_created_again_does_not_inherit_the_deleted_ones_session() {
    let app = spawn_app().await;
    let addr = app.mqtt_addr();
    let pk = app.create_product("lamp").await;
    let secret = app.create_device(&pk, "lamp-1").await;
    let creds = credentials(&pk, "lamp-1", &secret);
    let upgrade = format!("/ota/device/upgrade/{pk}/lamp-1");

    // A persistent session with a subscription, offline.
    let (client, mut eventloop, present) = connect_persistent(addr, &creds).await;
    assert!(!present);
    client.subscribe(&upgrade, QoS::AtLeastOnce).await.unwrap();
    poll_until(&mut eventloop, |p| {
        matches!(p, Packet::SubAck(_)).then_some(())
    })
    .await;
    client.disconnect().await.unwrap();
    let _ = eventloop.poll().await;
    app.wait_device(&pk, "lamp-1", "offline", |d| d["online"] == false)
        .await;
    // It is there for the device (the control)...
    let (client, mut eventloop, present) = connect_persistent(addr, &creds).await;
    assert!(
        present,
        "the persistent session is kept while the device exists"
    );
    client.disconnect().await.unwrap();
    let _ = eventloop.poll().await;
    app.wait_device(&pk, "lamp-1", "offline", |d| d["online"] == false)
        .await;

    // ...but not for a device created again under its name, offline or online when deleted.
    for online in [false, true] {
        let live = match online {
            true => {
                let (client, mut eventloop, _) = connect_persistent(addr, &creds).await;
                client.subscribe(&upgrade, QoS::AtLeastOnce).await.unwrap();
                poll_until(&mut eventloop, |p| {
                    matches!(p, Packet::SubAck(_)).then_some(())
                })
                .await;
                Some(eventloop)
            }
            false => None,
        };
        let (status, body) = app
            .request(
                reqwest::Method::DELETE,
                &format!("/api/v1/products/{pk}/devices/lamp-1"),
                None,
                Some(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(status, 204, "{body}");
        if let Some(mut eventloop) = live {
            // Kicked by the delete.
            let deadline = tokio::time::Instant::now() + WAIT;
            while tokio::time::timeout_at(deadline, eventloop.poll())
                .await
                .expect("closed in time")
                .is_ok()
            {}
        }
        let (status, body) = app
            .post(
                &format!("/api/v1/products/{pk}/devices"),
                json!({ "device_name": "lamp-1", "device_secret": secret }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let (client, mut eventloop, present) = connect_persistent(addr, &creds).await;
        assert!(!present, "online when deleted: {online}");
        client.disconnect().await.unwrap();
        let _ = eventloop.poll().await;
        app.wait_device(&pk, "lamp-1", "offline", |d| d["online"] == false)
            .await;
    }
}

#[tokio::test]
async fn connects_with_a_timestamp_out_of_the_window_are_refused() {
    let app = spawn_app_with(|s| s.mqtt.connect_timestamp_window_secs = 300).await;
    let pk = app.create_product("auth").await;
    let secret = app.create_device(&pk, "dev-ts").await;
    let signed = |ts: Option<String>| {
        LinkCredentials::new(&pk, "dev-ts", &secret, SignMethod::HmacSha256, 3, ts)
    };
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    // 2001, and ten years ahead.
    for ts in [
        "978307200000".to_owned(),
        (now_ms + 315_360_000_000).to_string(),
    ] {
        assert_eq!(
            try_connect(app.mqtt_addr(), &signed(Some(ts))).await.err(),
            Some(ConnectReturnCode::NotAuthorized)
        );
    }
    assert_eq!(
        app.metric(r#"fleetgate_mqtt_connects_refused_total{reason="timestamp"}"#)
            .await,
        2.0
    );
    // In time, or without a timestamp: accepted.
    for ts in [Some(now_ms.to_string()), None] {
        let dev = connect(app.mqtt_addr(), &signed(ts)).await;
        dev.client.disconnect().await.unwrap();
    }
}
