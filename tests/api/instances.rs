//! Deleting an instance over real HTTP: roles, every refusal (which changes nothing), the
//! consumer groups it may take along, durability across a restart, and, with RabbitMQ, its
//! exchange and queues going while the other instances keep forwarding.

use crate::helpers::*;
use fleetgate::forwarder::testing::{broker_addr, test_amqp_url, url_via, Proxy};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use rand::Rng;
use reqwest::Method;
use rumqttc::{Packet, QoS};
use serde_json::{json, Value};
use std::time::Duration;

async fn delete(app: &TestApp, path: &str, token: Option<&str>) -> (u16, Value) {
    app.request(Method::DELETE, path, None, token).await
}

/// Deletes instance `iid` with its consumer groups; 204 expected.
async fn force_delete(app: &TestApp, iid: &str) {
    let path = format!("/api/v1/instances/{iid}?force=true");
    let (s, b) = delete(app, &path, Some(ADMIN_TOKEN)).await;
    assert_eq!(s, 204, "{b}");
}

/// Neither the exchange of instance `iid` nor the queue of its group `g` is left in RabbitMQ.
async fn assert_gone_from_rabbitmq(rabbit: &Connection, prefix: &str, iid: &str) {
    assert!(!exchange_exists(rabbit, &format!("{prefix}.{iid}")).await);
    assert!(!queue_exists(rabbit, &format!("{prefix}.{iid}.g")).await);
}

async fn create_instance(app: &TestApp, iid: &str) {
    let (s, b) = app
        .post(
            "/api/v1/instances",
            json!({"instance_id": iid, "name": iid}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
}

/// `(status, error_code)` of an answer.
fn outcome(answer: &(u16, Value)) -> (u16, Option<&str>) {
    (answer.0, answer.1["error_code"].as_str())
}

#[tokio::test]
async fn an_instance_is_deleted_by_an_admin_once_nothing_needs_it() {
    let mut app = spawn_app().await;
    const IID: &str = "iot-doomed";
    const PATH: &str = "/api/v1/instances/iot-doomed";
    create_instance(&app, IID).await;

    // Roles: only an admin.
    assert_eq!(delete(&app, PATH, None).await.0, 401);
    for token in [VIEWER_TOKEN, OPERATOR_TOKEN] {
        let answer = delete(&app, PATH, Some(token)).await;
        assert_eq!(outcome(&answer), (403, Some("FG.0403")), "{}", answer.1);
    }

    // Bad input.
    let long = format!("/api/v1/instances/{}", "a".repeat(65));
    for path in [
        "/api/v1/instances/has.dot",
        "/api/v1/instances/sp%20ace",
        &long,
    ] {
        let answer = delete(&app, path, Some(ADMIN_TOKEN)).await;
        assert_eq!(
            outcome(&answer),
            (400, Some("FG.1001")),
            "{path}: {}",
            answer.1
        );
        assert_eq!(answer.1["error_ext_msg"], "instance_id");
    }
    for query in ["?force=maybe", "?forse=true"] {
        let answer = delete(&app, &format!("{PATH}{query}"), Some(ADMIN_TOKEN)).await;
        assert_eq!(answer.0, 400, "{query}: {}", answer.1);
    }
    let answer = delete(&app, "/api/v1/instances/iot-never", Some(ADMIN_TOKEN)).await;
    assert_eq!(outcome(&answer), (404, Some("FG.2001")), "{}", answer.1);
    let answer = delete(&app, "/api/v1/instances/default", Some(ADMIN_TOKEN)).await;
    assert_eq!(outcome(&answer), (409, Some("FG.2201")), "{}", answer.1);

    // A product's home.
    let (s, product) = app
        .post(
            "/api/v1/products",
            json!({"name": "lamp", "instance_id": IID}),
        )
        .await;
    assert_eq!(s, 201, "{product}");
    let pk = product["product_key"].as_str().unwrap().to_owned();
    let answer = delete(&app, PATH, Some(ADMIN_TOKEN)).await;
    assert_eq!(outcome(&answer), (409, Some("FG.2202")), "{}", answer.1);
    assert!(
        answer.1["error_msg"]
            .as_str()
            .unwrap()
            .contains("1 products"),
        "{}",
        answer.1
    );
    let (s, _) = delete(&app, &format!("/api/v1/products/{pk}"), Some(ADMIN_TOKEN)).await;
    assert_eq!(s, 204);

    // The target of a migration task that has not finished.
    let other = app.create_product("moving").await;
    let (s, task) = app
        .post(
            "/api/v1/migrations",
            json!({"product_key": other, "target_instance_id": IID}),
        )
        .await;
    assert_eq!(s, 201, "{task}");
    let tid = task["task_id"].as_str().unwrap().to_owned();
    let answer = delete(&app, PATH, Some(ADMIN_TOKEN)).await;
    assert_eq!(outcome(&answer), (409, Some("FG.2203")), "{}", answer.1);
    assert!(
        answer.1["error_msg"].as_str().unwrap().contains(&tid),
        "{}",
        answer.1
    );
    let (s, b) = delete(
        &app,
        &format!("/api/v1/migrations/{tid}"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(s, 204, "{b}");

    // Consumer groups: refused unless force=true, naming them.
    for gid in ["g-one", "g-two"] {
        let (s, b) = app
            .post(
                &format!("{PATH}/consumer-groups"),
                json!({"group_id": gid, "name": gid}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
    }
    let (s, b) = app
        .request(
            Method::PUT,
            &format!("{PATH}/forwarding/rate-limit"),
            Some(json!({"msgs_per_sec": 5})),
            Some(OPERATOR_TOKEN),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    for path in [PATH.to_owned(), format!("{PATH}?force=false")] {
        let answer = delete(&app, &path, Some(ADMIN_TOKEN)).await;
        assert_eq!(outcome(&answer), (409, Some("FG.2204")), "{}", answer.1);
        let msg = answer.1["error_msg"].as_str().unwrap();
        assert!(msg.contains("g-one") && msg.contains("g-two"), "{msg}");
    }

    // Every refusal changed nothing.
    assert_eq!(app.get(PATH).await.0, 200);
    let (_, groups) = app.get(&format!("{PATH}/consumer-groups")).await;
    assert_eq!(groups["total"], 2, "{groups}");
    let (_, limit) = app.get(&format!("{PATH}/forwarding/rate-limit")).await;
    assert_eq!(limit["source"], "instance", "{limit}");

    let (s, b) = delete(&app, &format!("{PATH}?force=true"), Some(ADMIN_TOKEN)).await;
    assert_eq!(s, 204, "{b}");
    assert_eq!(outcome(&app.get(PATH).await), (404, Some("FG.2001")));
    let (_, list) = app.get("/api/v1/instances").await;
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["default"]);
    for path in [
        format!("{PATH}/consumer-groups"),
        format!("{PATH}/consumer-groups/g-one"),
        format!("{PATH}/forwarding/rate-limit"),
    ] {
        assert_eq!(app.get(&path).await.0, 404, "{path}");
    }
    let answer = delete(&app, PATH, Some(ADMIN_TOKEN)).await;
    assert_eq!(outcome(&answer), (404, Some("FG.2001")), "{}", answer.1);

    // Durable; the id is free again, and nothing of the old instance comes back with it.
    app.restart().await;
    assert_eq!(app.get(PATH).await.0, 404);
    create_instance(&app, IID).await;
    let (_, groups) = app.get(&format!("{PATH}/consumer-groups")).await;
    assert_eq!(groups["total"], 0, "{groups}");
    let (_, limit) = app.get(&format!("{PATH}/forwarding/rate-limit")).await;
    assert_eq!(limit["source"], "none", "{limit}");
}

/// A device owned by an instance (moved there by a migration) keeps it, even when the
/// device's product lives elsewhere.
#[tokio::test]
async fn an_instance_that_owns_a_migrated_device_is_kept() {
    let app = spawn_app().await;
    create_instance(&app, "iot-target").await;
    let pk = app.create_product("moved").await;
    app.create_device(&pk, "mover01").await;
    let (s, task) = app
        .post(
            "/api/v1/migrations",
            json!({"product_key": pk, "target_instance_id": "iot-target"}),
        )
        .await;
    assert_eq!(s, 201, "{task}");
    let tid = task["task_id"].as_str().unwrap().to_owned();
    let wait_state = |state: &'static str| {
        let (app, tid) = (&app, tid.clone());
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                let (_, t) = app.get(&format!("/api/v1/migrations/{tid}")).await;
                if t["state"] == state {
                    return;
                }
                assert!(tokio::time::Instant::now() < deadline, "{state}: {t}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let (s, b) = app
        .post(
            &format!("/api/v1/migrations/{tid}/canary"),
            json!({"device_names": ["mover01"]}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    wait_state("CANARY_COMPLETED").await;
    let (s, b) = app
        .post(&format!("/api/v1/migrations/{tid}/full"), json!({}))
        .await;
    assert_eq!(s, 200, "{b}");
    wait_state("COMPLETED").await;
    // The task is finished, but the instance owns the device.
    let answer = delete(&app, "/api/v1/instances/iot-target", Some(ADMIN_TOKEN)).await;
    assert_eq!(outcome(&answer), (409, Some("FG.2202")), "{}", answer.1);
    assert!(
        answer.1["error_msg"]
            .as_str()
            .unwrap()
            .contains("owns 1 devices"),
        "{}",
        answer.1
    );
    assert_eq!(app.get("/api/v1/instances/iot-target").await.0, 200);
    // Once the device is gone, the finished task no longer holds it.
    let (s, _) = delete(
        &app,
        &format!("/api/v1/products/{pk}/devices/mover01"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(s, 204);
    let (s, b) = delete(&app, "/api/v1/instances/iot-target", Some(ADMIN_TOKEN)).await;
    assert_eq!(s, 204, "{b}");
}

/// Whether `exchange` exists in RabbitMQ.
async fn exchange_exists(rabbit: &Connection, exchange: &str) -> bool {
    declared(rabbit, Declared::Exchange, exchange).await
}

/// Whether `queue` exists in RabbitMQ.
async fn queue_exists(rabbit: &Connection, queue: &str) -> bool {
    declared(rabbit, Declared::Queue, queue).await
}

enum Declared {
    Exchange,
    Queue,
}

/// A passive declare of `name`, on a channel of its own (a missing one closes the channel).
async fn declared(rabbit: &Connection, kind: Declared, name: &str) -> bool {
    let ch = rabbit.create_channel().await.unwrap();
    let (passive, table) = (true, FieldTable::default());
    let found = match kind {
        Declared::Exchange => ch
            .exchange_declare(
                name.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    passive,
                    durable: true,
                    ..Default::default()
                },
                table,
            )
            .await
            .is_ok(),
        Declared::Queue => ch
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive,
                    durable: true,
                    ..Default::default()
                },
                table,
            )
            .await
            .is_ok(),
    };
    if ch.status().connected() {
        let _ = ch.close(200, "checked".into()).await;
    }
    found
}

async fn wait_health(app: &TestApp, what: &str, ok: impl Fn(&Value) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, health) = app.get("/healthz").await;
        if ok(&health) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {health}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A QoS 1 property post of `dn`, acknowledged.
async fn post_property(app: &TestApp, pk: &str, dn: &str, secret: &str, value: u32) {
    let mut device = connect(app.mqtt_addr(), &credentials(pk, dn, secret)).await;
    device
        .client
        .publish(
            format!("/sys/{pk}/{dn}/thing/event/property/post"),
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"id":"{value}","params":{{"Temp":{value}}}}}"#),
        )
        .await
        .unwrap();
    device
        .wait_packet("PUBACK", |p| matches!(p, Packet::PubAck(_)))
        .await;
    device.client.disconnect().await.unwrap();
}

#[tokio::test]
async fn deleting_an_instance_deletes_its_exchange_and_queues_in_rabbitmq() {
    let url =
        test_amqp_url("deleting_an_instance_deletes_its_exchange_and_queues_in_rabbitmq").await;
    let proxy = Proxy::start(broker_addr(&url).await).await;
    let prefix = format!("fgtest-{:08x}", rand::thread_rng().gen::<u32>());
    let app = spawn_app_with_amqp_and(&url_via(&url, proxy.addr), &prefix, |s| {
        s.amqp.reconnect_initial_ms = 50;
        s.amqp.reconnect_max_ms = 200;
    })
    .await;
    let rabbit = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    for iid in ["iot-a", "iot-b", "iot-c", "iot-d"] {
        create_instance(&app, iid).await;
        let (s, b) = app
            .post(
                &format!("/api/v1/instances/{iid}/consumer-groups"),
                json!({"group_id": "g", "name": "g"}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        assert!(exchange_exists(&rabbit, &format!("{prefix}.{iid}")).await);
    }
    // iot-b keeps forwarding to a consumer.
    let (s, product) = app
        .post(
            "/api/v1/products",
            json!({"name": "kept", "instance_id": "iot-b"}),
        )
        .await;
    assert_eq!(s, 201, "{product}");
    let kept = product["product_key"].as_str().unwrap().to_owned();
    let kept_secret = app.create_device(&kept, "keeper01").await;
    let ch = rabbit.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            format!("{prefix}.iot-b.g").as_str().into(),
            "kept".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    // Connected: the exchange and the group's queue go with the instance.
    let answer = delete(&app, "/api/v1/instances/iot-a", Some(ADMIN_TOKEN)).await;
    assert_eq!(outcome(&answer), (409, Some("FG.2204")), "{}", answer.1);
    assert!(exchange_exists(&rabbit, &format!("{prefix}.iot-a")).await);
    force_delete(&app, "iot-a").await;
    assert_gone_from_rabbitmq(&rabbit, &prefix, "iot-a").await;
    assert!(exchange_exists(&rabbit, &format!("{prefix}.iot-b")).await);
    assert!(queue_exists(&rabbit, &format!("{prefix}.iot-b.g")).await);

    // The other instances still forward.
    post_property(&app, &kept, "keeper01", &kept_secret, 1).await;
    let mut seen_post = false;
    while !seen_post {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("iot-b's data within 30 s")
            .expect("consumer open")
            .expect("delivery");
        d.ack(BasicAckOptions::default()).await.unwrap();
        let body: Value = serde_json::from_slice(&d.data).unwrap();
        seen_post = body["items"]["Temp"]["value"] == 1;
    }

    // Messages for an instance wait in the outbox while RabbitMQ is away: its delete is
    // refused until they are forwarded. (Its device posted, then left it.)
    let (s, product) = app
        .post(
            "/api/v1/products",
            json!({"name": "leaving", "instance_id": "iot-c"}),
        )
        .await;
    assert_eq!(s, 201, "{product}");
    let leaving = product["product_key"].as_str().unwrap().to_owned();
    let secret = app.create_device(&leaving, "leaver01").await;
    proxy.cut();
    wait_health(&app, "forwarder still connected", |h| {
        h["amqp"] != "connected"
    })
    .await;
    post_property(&app, &leaving, "leaver01", &secret, 2).await;
    for path in [
        format!("/api/v1/products/{leaving}/devices/leaver01"),
        format!("/api/v1/products/{leaving}"),
    ] {
        let (s, b) = delete(&app, &path, Some(ADMIN_TOKEN)).await;
        assert_eq!(s, 204, "{path}: {b}");
    }
    let answer = delete(
        &app,
        "/api/v1/instances/iot-c?force=true",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(outcome(&answer), (409, Some("FG.2205")), "{}", answer.1);
    assert_eq!(app.get("/api/v1/instances/iot-c").await.0, 200);
    assert_eq!(
        app.get("/api/v1/instances/iot-c/consumer-groups/g").await.0,
        200
    );

    // RabbitMQ unreachable, but nothing waits for iot-d: deleted now, its exchange and
    // queue once the forwarder is back.
    force_delete(&app, "iot-d").await;
    assert_eq!(app.get("/api/v1/instances/iot-d").await.0, 404);
    assert!(exchange_exists(&rabbit, &format!("{prefix}.iot-d")).await);
    assert!(queue_exists(&rabbit, &format!("{prefix}.iot-d.g")).await);

    proxy.restore();
    wait_health(&app, "outbox not drained", |h| {
        h["amqp"] == "connected" && h["amqp_outbox_messages"] == 0
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while exchange_exists(&rabbit, &format!("{prefix}.iot-d")).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "iot-d's exchange never deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!queue_exists(&rabbit, &format!("{prefix}.iot-d.g")).await);
    // The post that waited reached iot-c's group; now iot-c may go.
    force_delete(&app, "iot-c").await;
    assert_gone_from_rabbitmq(&rabbit, &prefix, "iot-c").await;
    assert!(exchange_exists(&rabbit, &format!("{prefix}.iot-b")).await);

    // Clean up what the test made in the shared broker.
    let ch = rabbit.create_channel().await.unwrap();
    for iid in ["iot-b"] {
        let _ = ch
            .queue_delete(
                format!("{prefix}.{iid}.g").as_str().into(),
                Default::default(),
            )
            .await;
        let _ = ch
            .exchange_delete(
                format!("{prefix}.{iid}").as_str().into(),
                Default::default(),
            )
            .await;
    }
    for iid in ["default"] {
        let _ = ch
            .exchange_delete(
                format!("{prefix}.{iid}").as_str().into(),
                Default::default(),
            )
            .await;
    }
}
