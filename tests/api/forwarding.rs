//! AMQP forwarding end to end: a device's MQTT traffic reaches a consumer group created through
//! the HTTP API, in the vendor's format. Needs RabbitMQ (`FLEETGATE_AMQP_URL`); skipped with a
//! `SKIPPED` line without one, failed under `CI`.

use crate::helpers::*;
use fleetgate::forwarder::testing::amqp_url_or_skip;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use rand::Rng;
use rumqttc::{Packet, QoS};
use serde_json::{json, Value};
use std::time::Duration;

fn header(d: &lapin::message::Delivery, key: &str) -> String {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(key))
    {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("header {key}: {other:?}"),
    }
}

#[tokio::test]
async fn device_traffic_reaches_a_consumer_group() {
    let Some(url) = amqp_url_or_skip("device_traffic_reaches_a_consumer_group").await else {
        return;
    };
    let prefix = format!("fgtest-{:08x}", rand::thread_rng().gen::<u32>());
    let app = {
        let (url, prefix) = (url.clone(), prefix.clone());
        spawn_app_with(move |s| {
            s.amqp.url = Some(fleetgate::config::Secret::new(url));
            s.amqp.exchange_prefix = prefix;
        })
        .await
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, health) = app.get("/healthz").await;
        if health["amqp"] == "connected" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never connected: {health}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, group) = app
        .post(
            "/api/v1/instances/default/consumer-groups",
            json!({"group_id": "e2e", "name": "end to end"}),
        )
        .await;
    assert_eq!(status, 201, "{group}");

    let rabbit = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = rabbit.create_channel().await.unwrap();
    let queue = format!("{prefix}.default.e2e");
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "e2e".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let pk = app.create_product("forwarded").await;
    let secret = app.create_device(&pk, "sensor01").await;
    let mut device = connect(app.mqtt_addr(), &credentials(&pk, "sensor01", &secret)).await;
    device
        .client
        .publish(
            format!("/sys/{pk}/sensor01/thing/event/property/post"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":"11","version":"1.0","params":{"Temp":21.5},"method":"thing.event.property.post"}"#,
        )
        .await
        .unwrap();
    device
        .wait_packet("PUBACK", |p| matches!(p, Packet::PubAck(_)))
        .await;
    device
        .client
        .publish(
            format!("/sys/{pk}/sensor01/thing/event/overheat/post"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":"12","params":{"value":{"t":99}},"method":"thing.event.overheat.post"}"#,
        )
        .await
        .unwrap();
    device
        .wait_packet("PUBACK", |p| matches!(p, Packet::PubAck(_)))
        .await;
    device.client.disconnect().await.unwrap();

    let mut got: Vec<(String, Value)> = Vec::new();
    while got.len() < 4 {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("forwarded messages arrive")
            .expect("consumer open")
            .expect("delivery");
        d.ack(BasicAckOptions::default()).await.unwrap();
        assert_eq!(header(&d, "productKey"), pk);
        assert_eq!(header(&d, "deviceName"), "sensor01");
        assert_eq!(header(&d, "instanceId"), "default");
        got.push((
            header(&d, "topic"),
            serde_json::from_slice(&d.data).unwrap(),
        ));
    }
    let topics: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        topics,
        vec![
            format!("/as/mqtt/status/{pk}/sensor01"),
            format!("/{pk}/sensor01/thing/event/property/post"),
            format!("/{pk}/sensor01/thing/event/overheat/post"),
            format!("/as/mqtt/status/{pk}/sensor01"),
        ],
        "in the device's order"
    );
    assert_eq!(got[0].1["status"], "online");
    assert_eq!(got[0].1["clientIp"], "127.0.0.1");
    assert_eq!(got[1].1["items"]["Temp"]["value"], 21.5);
    assert_eq!(got[1].1["requestId"], "11");
    assert_eq!(got[2].1["identifier"], "overheat");
    assert_eq!(got[2].1["value"], json!({"t": 99}));
    assert_eq!(got[3].1["status"], "offline");

    let (status, details) = app
        .get("/api/v1/instances/default/consumer-groups/e2e")
        .await;
    assert_eq!(status, 200, "{details}");
    assert_eq!(details["consumers"], 1);
    assert_eq!(details["backlog"], 0);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("fleetgate_forwarder_published_total"),
        "{metrics}"
    );

    let (status, _) = app
        .request(
            reqwest::Method::DELETE,
            "/api/v1/instances/default/consumer-groups/e2e",
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 204);
    let _ = ch
        .exchange_delete(
            format!("{prefix}.default").into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
}
