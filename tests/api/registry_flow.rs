//! Connection state, version reports and replies seen through the API, and a restart that
//! keeps the registry.

use crate::helpers::*;
use rumqttc::QoS;
use serde_json::{json, Value};

#[tokio::test]
async fn online_offline_and_versions_are_visible_and_survive_restart() {
    let mut app = spawn_app().await;
    let pk = app.create_product("thermostat").await;
    let secret = app.create_device(&pk, "t-0001").await;
    let d = app.device(&pk, "t-0001").await;
    assert_eq!(d["online"], false);

    let dev = connect(app.mqtt_addr(), &credentials(&pk, "t-0001", &secret)).await;
    let d = app
        .wait_device(&pk, "t-0001", "online", |d| d["online"] == true)
        .await;
    assert_eq!(d["client_ip"], "127.0.0.1");
    assert!(d["last_seen_ms"].as_i64().unwrap() > 0);

    // Version reports: default module and a named one, id as number and as string.
    dev.client
        .publish(
            format!("/ota/device/inform/{pk}/t-0001"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":1,"params":{"version":"1.0.0"}}"#,
        )
        .await
        .unwrap();
    dev.client
        .publish(
            format!("/ota/device/inform/{pk}/t-0001"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":"2","params":{"version":"3.2.1","module":"MCU"}}"#,
        )
        .await
        .unwrap();
    app.wait_device(&pk, "t-0001", "versions", |d| {
        d["versions"] == json!({"default": "1.0.0", "MCU": "3.2.1"})
    })
    .await;

    dev.client.disconnect().await.unwrap();
    app.wait_device(&pk, "t-0001", "offline", |d| d["online"] == false)
        .await;

    app.restart().await;
    let d = app.device(&pk, "t-0001").await;
    assert_eq!(d["versions"], json!({"default": "1.0.0", "MCU": "3.2.1"}));
    assert!(d.get("device_secret").is_none(), "{d}");
    assert_eq!(app.device_secret(&pk, "t-0001").await, secret);
    assert_eq!(d["online"], false);
    assert!(d["last_seen_ms"].as_i64().unwrap() > 0);
    // The same secret still works after the restart.
    let _dev = connect(app.mqtt_addr(), &credentials(&pk, "t-0001", &secret)).await;
    app.wait_device(&pk, "t-0001", "online again", |d| d["online"] == true)
        .await;
}

#[tokio::test]
async fn property_posts_are_answered_on_their_reply_topic() {
    let app = spawn_app().await;
    let pk = app.create_product("meter").await;
    let secret = app.create_device(&pk, "m-0001").await;
    let mut dev = connect(app.mqtt_addr(), &credentials(&pk, "m-0001", &secret)).await;
    let reply_topic = format!("/sys/{pk}/m-0001/thing/event/property/post_reply");
    dev.client
        .subscribe(&reply_topic, QoS::AtLeastOnce)
        .await
        .unwrap();
    dev.wait_packet("SUBACK", |p| matches!(p, rumqttc::Packet::SubAck(_)))
        .await;

    let post = format!("/sys/{pk}/m-0001/thing/event/property/post");
    dev.client
        .publish(&post, QoS::AtLeastOnce, false, r#"{"id":"7","version":"1.0","params":{"Temp":21.5},"method":"thing.event.property.post"}"#)
        .await
        .unwrap();
    let reply = dev.next_publish().await;
    assert_eq!(reply.topic, reply_topic);
    let body: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(body["code"], 200, "{body}");
    assert_eq!(body["id"], "7");

    // Malformed JSON gets an error code, never a 200, and is counted.
    dev.client
        .publish(&post, QoS::AtLeastOnce, false, "{not json")
        .await
        .unwrap();
    let reply = dev.next_publish().await;
    let body: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_ne!(body["code"], 200, "{body}");
    let m = app.metrics().await;
    assert!(
        m.contains(r#"fleetgate_mqtt_malformed_messages_total{kind="property_post"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn ss1_devices_are_subscribed_to_their_system_topics_by_the_server() {
    // The vendor SDKs send `_ss=1` and subscribe to nothing themselves.
    let app = spawn_app().await;
    let pk = app.create_product("ss").await;
    let secret = app.create_device(&pk, "ss-0001").await;
    let id = fleetgate_topics::sign::LinkClientId {
        client_id: format!("{pk}&ss-0001"),
        secure_mode: 3,
        sign_method: fleetgate_topics::sign::SignMethod::HmacSha1,
        timestamp: Some("1700000000000".into()),
        auto_subscribe: true,
    };
    let creds = fleetgate_topics::sign::LinkCredentials {
        client_id: id.to_client_id_string(),
        username: format!("ss-0001&{pk}"),
        password: id.password(&pk, "ss-0001", &secret),
    };
    let mut dev = connect(app.mqtt_addr(), &creds).await;
    dev.client
        .publish(
            format!("/sys/{pk}/ss-0001/thing/event/property/post"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":"9","params":{"Temp":{"value":20.5,"time":1700000000000}}}"#,
        )
        .await
        .unwrap();
    let reply = dev.next_publish().await;
    assert_eq!(
        reply.topic,
        format!("/sys/{pk}/ss-0001/thing/event/property/post_reply")
    );
    let body: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(
        (body["code"].as_i64(), body["id"].as_str()),
        (Some(200), Some("9")),
        "{body}"
    );
    // The server's SUBACK for its own subscription never reaches the device.
    assert!(dev.incoming.try_recv().is_err());
}

/// MQTT 3.1.1 by hand, for a device that writes several packets at once (no client library
/// lets a test choose how its packets share a TCP write).
mod wire {
    fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let mut byte = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if n == 0 {
                return;
            }
        }
    }

    fn string(s: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn packet(first: u8, body: Vec<u8>) -> Vec<u8> {
        let mut out = vec![first];
        remaining_length(body.len(), &mut out);
        out.extend(body);
        out
    }

    /// CONNECT, clean session, username and password, keep-alive 60 s.
    pub fn connect(client_id: &str, username: &str, password: &str) -> Vec<u8> {
        let mut body = Vec::new();
        string("MQTT", &mut body);
        body.extend_from_slice(&[4, 0b1100_0010, 0, 60]);
        string(client_id, &mut body);
        string(username, &mut body);
        string(password, &mut body);
        packet(0x10, body)
    }

    /// PUBLISH at QoS 1.
    pub fn publish_qos1(topic: &str, pkid: u16, payload: &str) -> Vec<u8> {
        let mut body = Vec::new();
        string(topic, &mut body);
        body.extend_from_slice(&pkid.to_be_bytes());
        body.extend_from_slice(payload.as_bytes());
        packet(0x32, body)
    }

    pub fn puback(pkid: u16) -> [u8; 4] {
        let [hi, lo] = pkid.to_be_bytes();
        [0x40, 0x02, hi, lo]
    }
}

#[tokio::test]
async fn reports_sent_in_one_write_are_acknowledged_in_order_and_the_last_one_is_kept() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut app = spawn_app().await;
    let pk = app.create_product("meter").await;
    let secret = app.create_device(&pk, "m-0001").await;
    let c = credentials(&pk, "m-0001", &secret);
    let mut s = tokio::net::TcpStream::connect(app.mqtt_addr())
        .await
        .unwrap();
    s.write_all(&wire::connect(&c.client_id, &c.username, &c.password))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);

    // One write, one run: three reports of one module (only the last is written), one of
    // another module, a malformed one and a progress report in between.
    let inform = format!("/ota/device/inform/{pk}/m-0001");
    let progress = format!("/ota/device/progress/{pk}/m-0001");
    let run = [
        (
            inform.as_str(),
            r#"{"id":1,"params":{"version":"1.0","module":"MCU"}}"#,
        ),
        (
            inform.as_str(),
            r#"{"id":2,"params":{"version":"1.1","module":"MCU"}}"#,
        ),
        (inform.as_str(), r#"{"id":3,"params":{"version":"7.0"}}"#),
        (inform.as_str(), r#"{"id":4,"params":"#),
        (
            progress.as_str(),
            r#"{"id":5,"params":{"step":"10","desc":""}}"#,
        ),
        (
            inform.as_str(),
            r#"{"id":6,"params":{"version":"1.2","module":"MCU"}}"#,
        ),
    ];
    let mut burst = Vec::new();
    for (pkid, (topic, payload)) in (1u16..).zip(run) {
        burst.extend(wire::publish_qos1(topic, pkid, payload));
    }
    s.write_all(&burst).await.unwrap();
    let mut acks = vec![0u8; 4 * run.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut acks))
        .await
        .expect("every PUBACK in time")
        .unwrap();
    let expected: Vec<u8> = (1..=run.len() as u16).flat_map(wire::puback).collect();
    assert_eq!(acks, expected, "one PUBACK per PUBLISH, in order");

    // Acknowledged means applied and durable: visible at once, and after a restart.
    let want = json!({"MCU": "1.2", "default": "7.0"});
    assert_eq!(app.device(&pk, "m-0001").await["versions"], want);
    let m = app.metrics().await;
    assert!(
        m.contains(r#"fleetgate_mqtt_malformed_messages_total{kind="inform"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"fleetgate_mqtt_messages_total{kind="progress"} 1"#),
        "{m}"
    );
    drop(s);
    app.restart().await;
    assert_eq!(app.device(&pk, "m-0001").await["versions"], want);
}
