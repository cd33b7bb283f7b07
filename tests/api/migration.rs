//! Instance migration end to end (issue 6): tasks over HTTP, connected rumqttc devices that are
//! kicked and reconnect into the target instance, pause/continue, rollbacks, data-sync expiry
//! with the engine's clock moved 30 days, a restart in the middle, and every refusal.

use crate::helpers::*;
use fleetgate::forwarder::testing::test_amqp_url;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use rand::Rng;
use reqwest::Method;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, Packet, QoS};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const TARGET: &str = "iot-enterprise";

/// A device that reconnects by itself (like the Link SDKs), counting successful CONNACKs.
struct Reconnecting {
    client: AsyncClient,
    connects: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Reconnecting {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn reconnecting(addr: SocketAddr, pk: &str, dn: &str, secret: &str) -> Reconnecting {
    let (client, mut eventloop) = AsyncClient::new(options(addr, &credentials(pk, dn, secret)), 16);
    let connects = Arc::new(AtomicUsize::new(0));
    let counter = connects.clone();
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack)))
                    if ack.code == ConnectReturnCode::Success =>
                {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    Reconnecting {
        client,
        connects,
        task,
    }
}

async fn wait_for(what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !pred() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl TestApp {
    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(Method::PUT, path, Some(body), Some(ADMIN_TOKEN))
            .await
    }

    async fn post_csv(&self, path: &str, csv: String) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "text/csv")
            .body(csv)
            .send()
            .await
            .expect("http");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn target_instance(&self) {
        let (s, b) = self
            .post(
                "/api/v1/instances",
                json!({"instance_id": TARGET, "name": "Enterprise"}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
    }

    /// A product with devices `d000..`; returns the key and the secrets.
    async fn product_with(&self, n: usize) -> (String, Vec<String>) {
        let pk = self.create_product("Meter").await;
        let csv: String = std::iter::once("DeviceName".to_owned())
            .chain((0..n).map(|i| format!("d{i:03}")))
            .collect::<Vec<_>>()
            .join("\n");
        let (s, b) = self
            .post_csv(&format!("/api/v1/products/{pk}/devices/batch"), csv)
            .await;
        assert_eq!(s, 200, "{b}");
        let secrets = b["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["device_secret"].as_str().unwrap().to_owned())
            .collect();
        (pk, secrets)
    }

    async fn new_task(&self, pk: &str) -> String {
        let (s, b) = self
            .post(
                "/api/v1/migrations",
                json!({"product_key": pk, "target_instance_id": TARGET}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        assert_eq!(b["state"], "TO_MIGRATE");
        b["task_id"].as_str().unwrap().to_owned()
    }

    async fn task(&self, tid: &str) -> Value {
        let (s, b) = self.get(&format!("/api/v1/migrations/{tid}")).await;
        assert_eq!(s, 200, "{b}");
        b
    }

    async fn wait_task(&self, tid: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let t = self.task(tid).await;
            if pred(&t) {
                return t;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "task never got {what}: {t}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_state(&self, tid: &str, state: &str) -> Value {
        self.wait_task(tid, state, |t| {
            t.get("state").and_then(Value::as_str) == Some(state)
        })
        .await
    }

    async fn action(&self, tid: &str, action: &str, body: Value) -> (u16, Value) {
        self.post(&format!("/api/v1/migrations/{tid}/{action}"), body)
            .await
    }

    async fn ok(&self, tid: &str, action: &str, body: Value) -> Value {
        let (s, b) = self.action(tid, action, body).await;
        assert_eq!(s, 200, "{action}: {b}");
        b
    }

    async fn refused(&self, tid: &str, action: &str, body: Value, state: &str) {
        let (s, b) = self.action(tid, action, body).await;
        assert_eq!(s, 409, "{action} in {state}: {b}");
        assert_eq!(b["error_code"], "FG.5003", "{b}");
        let msg = b["error_msg"].as_str().unwrap();
        assert!(
            msg.contains(state),
            "{action}: the message names {state}: {msg}"
        );
    }
}

#[tokio::test]
async fn canary_then_full_moves_connected_devices_which_reconnect_into_the_target() {
    let app = spawn_app().await;
    app.target_instance().await;
    let (pk, secrets) = app.product_with(6).await;
    let devices: Vec<Reconnecting> = [0usize, 1, 4]
        .iter()
        .map(|&i| reconnecting(app.mqtt_addr(), &pk, &format!("d{i:03}"), &secrets[i]))
        .collect();
    for i in [0, 1, 4] {
        app.wait_device(&pk, &format!("d{i:03}"), "online", |d| d["online"] == true)
            .await;
    }
    let tid = app.new_task(&pk).await;
    let t = app.task(&tid).await;
    assert_eq!(t["product_key"], pk.as_str());
    assert_eq!(t["source_instance_id"], "default");
    assert_eq!(t["target_instance_id"], TARGET);
    assert_eq!(t["status"], "TERMINATED");
    assert_eq!(t["devices"]["total"], 6);
    assert_eq!(t["devices"]["not_migrated"], 6);
    assert_eq!(t["data_sync"]["enabled"], false);
    assert_eq!(
        t["config"],
        json!({"migration_method":"full_migration","resume_mode":"auto","bandwidth_limit_mb":null})
    );
    assert!(t["created_at_ms"].as_i64().unwrap() > 0);

    // Canary: d000 (connected) and d002 (offline); "ghost" refused on its row.
    let b = app
        .ok(
            &tid,
            "canary",
            json!({"device_names": ["d000", "ghost", "d002"]}),
        )
        .await;
    assert_eq!(b["accepted"], 2);
    assert_eq!(
        b["rejected"],
        json!([{"row": 2, "device_name": "ghost", "error_code": "FG.2003",
                "error_msg": format!("device \"ghost\" not found in product {pk}")}])
    );
    let t = app.wait_state(&tid, "CANARY_COMPLETED").await;
    assert_eq!(t["status"], "SUCCESS");
    assert_eq!(t["devices"]["migrated"], 2);
    // The connected canary device was kicked and came back, now owned by the target.
    wait_for("d000 reconnects", || {
        devices[0].connects.load(Ordering::SeqCst) >= 2
    })
    .await;
    let d = app
        .wait_device(&pk, "d000", "online in the target", |d| {
            d["online"] == true && d["instance_id"] == TARGET
        })
        .await;
    assert_eq!(d["instance_id"], TARGET);
    assert_eq!(app.device(&pk, "d001").await["instance_id"], "default");
    assert_eq!(
        devices[1].connects.load(Ordering::SeqCst),
        1,
        "a device that is not migrated is left alone"
    );

    app.ok(&tid, "full", json!({})).await;
    let t = app.wait_state(&tid, "COMPLETED").await;
    assert_eq!(t["devices"]["migrated"], 6);
    assert_eq!(t["status"], "SUCCESS");
    assert!(t["completed_at_ms"].as_i64().is_some());
    for (dev, i) in devices.iter().zip([0, 1, 4]) {
        let dn = format!("d{i:03}");
        wait_for("reconnect after full", || {
            dev.connects.load(Ordering::SeqCst) >= 2
        })
        .await;
        app.wait_device(&pk, &dn, "online in the target", |d| {
            d["online"] == true && d["instance_id"] == TARGET
        })
        .await;
    }
    assert_eq!(
        devices[0].connects.load(Ordering::SeqCst),
        2,
        "a device is kicked once, when it moves"
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"fleetgate_migration_devices_total{result="migrated"} 6"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleetgate_migration_kicks_total 3"),
        "{metrics}"
    );

    // Device list: search + filter + paging.
    let (s, b) = app
        .get(&format!(
            "/api/v1/migrations/{tid}/devices?status=MIGRATED&device_name=D00&page=2&page_size=4"
        ))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["total"], 6);
    assert_eq!(b["items"].as_array().unwrap().len(), 2);
    assert_eq!(b["items"][0]["device_name"], "d004");
    assert_eq!(b["items"][0]["instance_id"], TARGET);
    assert_eq!(b["items"][0]["status"], "MIGRATED");
    let (s, b) = app
        .get(&format!("/api/v1/migrations/{tid}/devices?status=WHATEVER"))
        .await;
    assert_eq!(
        (s, b["error_ext_msg"].as_str()),
        (400, Some("status")),
        "{b}"
    );

    // The log: who did what when.
    let (s, log) = app.get(&format!("/api/v1/migrations/{tid}/log")).await;
    assert_eq!(s, 200, "{log}");
    let actions: Vec<&str> = log["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["create", "canary", "finished", "full", "finished"]
    );
    let canary = &log["items"][1];
    assert_eq!(canary["actor"]["kind"], "api");
    assert_eq!(canary["actor"]["role"], "admin");
    let token_id = canary["actor"]["token_id"].as_str().unwrap();
    assert_eq!(token_id.len(), 12);
    assert!(
        !ADMIN_TOKEN.contains(token_id),
        "the token itself is never logged"
    );
    assert_eq!(canary["from_state"], "TO_MIGRATE");
    assert_eq!(canary["to_state"], "CANARY_IN_PROGRESS");
    assert!(canary["at_ms"].as_i64().unwrap() > 0);
    assert_eq!(log["items"][2]["actor"], json!({"kind": "system"}));

    // List.
    let (s, b) = app
        .get(&format!(
            "/api/v1/migrations?product_key={pk}&state=COMPLETED"
        ))
        .await;
    assert_eq!((s, &b["total"]), (200, &json!(1)), "{b}");
}

#[tokio::test]
async fn pause_continue_rollback_of_some_and_of_all() {
    let app = spawn_app().await;
    app.target_instance().await;
    let (pk, _) = app.product_with(80).await;
    let tid = app.new_task(&pk).await;
    let engine = app.app().migration().clone();
    // CSV canary.
    let (s, b) = app
        .post_csv(
            &format!("/api/v1/migrations/{tid}/canary"),
            "DeviceName\nd000\nd001\nd001\n".into(),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["accepted"], 2);
    assert_eq!(b["rejected"][0]["row"], 3);
    assert_eq!(b["rejected"][0]["error_code"], "FG.1001");
    app.wait_state(&tid, "CANARY_COMPLETED").await;

    engine.set_rate(20).await.unwrap();
    app.ok(&tid, "full", json!({})).await;
    app.wait_task(&tid, "progress", |t| {
        t["devices"]["migrated"].as_u64() >= Some(10)
    })
    .await;
    let t = app.ok(&tid, "pause", json!({})).await;
    assert_eq!(
        (t["state"].as_str(), t["status"].as_str()),
        (Some("PAUSED"), Some("TERMINATED"))
    );
    let frozen = app.task(&tid).await["devices"]["migrated"].clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        app.task(&tid).await["devices"]["migrated"],
        frozen,
        "paused means paused"
    );
    app.refused(&tid, "pause", json!({}), "PAUSED").await;
    let t = app.ok(&tid, "continue", json!({})).await;
    assert_eq!(t["state"], "CONTINUE_MIGRATING");
    assert_eq!(t["status"], "MIGRATING");
    engine.set_rate(0).await.unwrap();
    app.wait_state(&tid, "COMPLETED").await;

    // Rollback of some, from COMPLETED: BATCH_ROLLBACK, which cannot be paused.
    engine.set_rate(2).await.unwrap();
    let picked: String = std::iter::once("DeviceName".to_owned())
        .chain((10..30).map(|i| format!("d{i:03}")))
        .collect::<Vec<_>>()
        .join("\n");
    let (s, b) = app
        .post_csv(&format!("/api/v1/migrations/{tid}/rollback"), picked)
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["accepted"], 20);
    assert_eq!(b["task"]["state"], "BATCH_ROLLBACK");
    app.refused(&tid, "pause", json!({}), "BATCH_ROLLBACK")
        .await;
    engine.set_rate(0).await.unwrap();
    let t = app.wait_state(&tid, "TO_MIGRATE").await;
    assert_eq!(t["devices"]["rolled_back"], 20);
    assert_eq!(t["devices"]["migrated"], 60);
    assert_eq!(app.device(&pk, "d015").await["instance_id"], "default");
    assert_eq!(app.device(&pk, "d050").await["instance_id"], TARGET);

    // Again: canary, full, and roll everything back from MIGRATING, pausing the rollback.
    app.ok(&tid, "canary", json!({"device_names": ["d010"]}))
        .await;
    app.wait_state(&tid, "CANARY_COMPLETED").await;
    engine.set_rate(10).await.unwrap();
    app.ok(&tid, "full", json!({})).await;
    let b = app.ok(&tid, "rollback", json!({"all": true})).await;
    assert_eq!(b["task"]["state"], "ROLLING_BACK");
    let t = app.ok(&tid, "pause", json!({})).await;
    assert_eq!(t["state"], "ROLLBACK_PAUSED");
    app.refused(&tid, "rollback", json!({"all": true}), "ROLLBACK_PAUSED")
        .await;
    let t = app.ok(&tid, "continue", json!({})).await;
    assert_eq!(t["state"], "ROLLING_BACK");
    engine.set_rate(0).await.unwrap();
    let t = app.wait_state(&tid, "TO_MIGRATE").await;
    assert_eq!(t["devices"]["migrated"], 0);
    for i in (0..80).step_by(7) {
        assert_eq!(
            app.device(&pk, &format!("d{i:03}")).await["instance_id"],
            "default"
        );
    }
}

#[tokio::test]
async fn every_refused_transition_and_limit() {
    let app = spawn_app().await;
    app.target_instance().await;
    let (pk, _) = app.product_with(3).await;

    // Creation: each refused body, with the status, `error_code` and `error_ext_msg` it gets
    // (`None`: not checked). Every refusal has the whole error body.
    let create = |body: Value| {
        let app = &app;
        async move { app.post("/api/v1/migrations", body).await }
    };
    let bandwidth = |bad: Value| json!({"product_key": pk, "target_instance_id": TARGET, "bandwidth_limit_mb": bad});
    let refusals = [
        (
            json!({"product_key": "nope", "target_instance_id": TARGET}),
            404,
            Some("FG.2002"),
            None,
        ),
        (
            json!({"product_key": pk, "target_instance_id": "iot-nope"}),
            404,
            Some("FG.2001"),
            None,
        ),
        (
            json!({"product_key": pk, "target_instance_id": "default"}),
            400,
            None,
            Some("target_instance_id"),
        ),
        (json!({"product_key": pk}), 400, Some("FG.1002"), None),
        (
            bandwidth(json!(0)),
            400,
            Some("FG.1001"),
            Some("bandwidth_limit_mb"),
        ),
        (
            bandwidth(json!(10241)),
            400,
            Some("FG.1001"),
            Some("bandwidth_limit_mb"),
        ),
        (
            bandwidth(json!("abc")),
            400,
            Some("FG.1001"),
            Some("bandwidth_limit_mb"),
        ),
        (
            bandwidth(json!(-1)),
            400,
            Some("FG.1001"),
            Some("bandwidth_limit_mb"),
        ),
    ];
    for (body, status, code, field) in refusals {
        let (s, b) = create(body.clone()).await;
        assert_eq!(s, status, "{body}: {b}");
        if let Some(code) = code {
            assert_eq!(b["error_code"], code, "{body}: {b}");
        }
        if let Some(field) = field {
            assert_eq!(b["error_ext_msg"], field, "{body}: {b}");
        }
        assert!(b["request_id"].as_str().is_some(), "{body}: {b}");
        assert!(b["error_msg"].as_str().is_some(), "{body}: {b}");
        assert!(b.get("error_ext_msg").is_some(), "{body}: {b}");
    }
    let (s, b) = app
        .request(
            Method::POST,
            "/api/v1/migrations",
            Some(json!({"product_key": pk, "target_instance_id": TARGET})),
            Some(VIEWER_TOKEN),
        )
        .await;
    assert_eq!((s, b["error_code"].as_str()), (403, Some("FG.0403")), "{b}");
    let (s, _) = app
        .request(Method::GET, "/api/v1/migrations", None, None)
        .await;
    assert_eq!(s, 401);
    let tid = app.new_task(&pk).await;
    let (s, b) = create(json!({"product_key": pk, "target_instance_id": TARGET})).await;
    assert_eq!((s, b["error_code"].as_str()), (409, Some("FG.5002")), "{b}");
    assert!(b["error_msg"].as_str().unwrap().contains(&tid));
    let (s, b) = app.get("/api/v1/migrations/no-such-task").await;
    assert_eq!((s, b["error_code"].as_str()), (404, Some("FG.5001")), "{b}");
    let (s, b) = app.action("no-such-task", "pause", json!({})).await;
    assert_eq!((s, b["error_code"].as_str()), (404, Some("FG.5001")), "{b}");

    // Config (DCS shape).
    let (s, b) = app
        .put(
            &format!("/api/v1/migrations/{tid}/config"),
            json!({"migration_method": "incremental_migration", "resume_mode": "manual", "bandwidth_limit_mb": "123"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["id"], tid.as_str());
    assert_eq!(b["status"], "TERMINATED");
    assert!(b["error"].is_null(), "{b}");
    assert_eq!(b["config"]["bandwidth_limit_mb"], 123);
    for (body, field) in [
        (
            json!({"migration_method": "full_migration", "resume_mode": "auto", "bandwidth_limit_mb": 0}),
            "bandwidth_limit_mb",
        ),
        (
            json!({"migration_method": "full_migration", "resume_mode": "auto", "bandwidth_limit_mb": "10241"}),
            "bandwidth_limit_mb",
        ),
        (
            json!({"migration_method": "sideways", "resume_mode": "auto"}),
            "migration_method",
        ),
        (
            json!({"migration_method": "full_migration", "resume_mode": "sometimes"}),
            "resume_mode",
        ),
        (json!({"migration_method": "full_migration"}), "resume_mode"),
    ] {
        let (s, b) = app
            .put(&format!("/api/v1/migrations/{tid}/config"), body.clone())
            .await;
        assert_eq!(
            (s, b["error_ext_msg"].as_str()),
            (400, Some(field)),
            "{body}: {b}"
        );
    }
    // incremental_migration is data sync only.
    let (s, b) = app
        .action(&tid, "canary", json!({"device_names": ["d000"]}))
        .await;
    assert_eq!((s, b["error_code"].as_str()), (409, Some("FG.5003")), "{b}");
    assert!(b["error_msg"]
        .as_str()
        .unwrap()
        .contains("incremental_migration"));
    let (s, _) = app
        .put(
            &format!("/api/v1/migrations/{tid}/config"),
            json!({"migration_method": "full_migration", "resume_mode": "auto"}),
        )
        .await;
    assert_eq!(s, 200);

    // TO_MIGRATE refuses everything but canary.
    for a in ["full", "pause", "continue"] {
        app.refused(&tid, a, json!({}), "TO_MIGRATE").await;
    }
    app.refused(&tid, "rollback", json!({"all": true}), "TO_MIGRATE")
        .await;

    // Selection limits.
    let many: Vec<String> = (0..101).map(|i| format!("x{i}")).collect();
    let (s, b) = app
        .action(&tid, "canary", json!({"device_names": many}))
        .await;
    assert_eq!((s, b["error_code"].as_str()), (413, Some("FG.1003")), "{b}");
    let mut csv = String::from("DeviceName\n");
    for i in 0..10_001 {
        csv.push_str(&format!("x{i}\n"));
    }
    let (s, b) = app
        .post_csv(&format!("/api/v1/migrations/{tid}/canary"), csv)
        .await;
    assert_eq!((s, b["error_code"].as_str()), (413, Some("FG.1003")), "{b}");
    let (s, b) = app
        .post_csv(
            &format!("/api/v1/migrations/{tid}/canary"),
            "Name\nd000\n".into(),
        )
        .await;
    assert_eq!(
        (s, b["error_ext_msg"].as_str()),
        (400, Some("DeviceName")),
        "{b}"
    );
    let (s, b) = app
        .action(&tid, "canary", json!({"device_names": ["ghost", "ghost"]}))
        .await;
    assert_eq!(
        (s, b["error_ext_msg"].as_str()),
        (400, Some("device_names")),
        "{b}"
    );
    assert!(b["error_msg"].as_str().unwrap().contains("row 2"), "{b}");
    let (s, b) = app.action(&tid, "canary", json!({"all": true})).await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = app.action(&tid, "canary", json!({})).await;
    assert_eq!((s, b["error_code"].as_str()), (400, Some("FG.1002")), "{b}");
    assert_eq!(
        app.task(&tid).await["state"],
        "TO_MIGRATE",
        "refusals change nothing"
    );

    // CANARY_IN_PROGRESS: no rollback, no pause, nothing else.
    let engine = app.app().migration().clone();
    engine.set_rate(1).await.unwrap();
    app.ok(
        &tid,
        "canary",
        json!({"device_names": ["d000", "d001", "d002"]}),
    )
    .await;
    for a in ["canary", "full", "pause", "continue"] {
        app.refused(
            &tid,
            a,
            json!({"device_names": ["d000"]}),
            "CANARY_IN_PROGRESS",
        )
        .await;
    }
    app.refused(&tid, "rollback", json!({"all": true}), "CANARY_IN_PROGRESS")
        .await;
    engine.set_rate(0).await.unwrap();
    app.wait_state(&tid, "CANARY_COMPLETED").await;
    for a in ["canary", "pause", "continue"] {
        app.refused(
            &tid,
            a,
            json!({"device_names": ["d000"]}),
            "CANARY_COMPLETED",
        )
        .await;
    }
    // Rollback picks: unknown and not-migrated devices are refused per row; >10,000 refused.
    let many: Vec<String> = (0..10_001).map(|i| format!("x{i}")).collect();
    let (s, b) = app
        .action(&tid, "rollback", json!({"device_names": many}))
        .await;
    assert_eq!((s, b["error_code"].as_str()), (413, Some("FG.1003")), "{b}");
    let (s, b) = app
        .action(
            &tid,
            "rollback",
            json!({"device_names": ["d000"], "all": true}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    app.ok(&tid, "full", json!({})).await;
    app.wait_state(&tid, "COMPLETED").await;
    for a in ["canary", "full", "pause", "continue"] {
        app.refused(&tid, a, json!({"device_names": ["d000"]}), "COMPLETED")
            .await;
    }
    // A task that moved devices cannot be replaced; a COMPLETED one can be deleted later.
    let (s, b) = app
        .request(
            Method::DELETE,
            &format!("/api/v1/migrations/{tid}"),
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(s, 204, "{b}");

    // Rollback refused when the product is gone from the source instance.
    let (pk2, _) = app.product_with(1).await;
    let tid2 = app.new_task(&pk2).await;
    app.ok(&tid2, "canary", json!({"device_names": ["d000"]}))
        .await;
    app.wait_state(&tid2, "CANARY_COMPLETED").await;
    let (s, _) = app
        .request(
            Method::DELETE,
            &format!("/api/v1/products/{pk2}/devices/d000"),
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(s, 204);
    let (s, _) = app
        .request(
            Method::DELETE,
            &format!("/api/v1/products/{pk2}"),
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(s, 204);
    let (s, b) = app.action(&tid2, "rollback", json!({"all": true})).await;
    assert_eq!((s, b["error_code"].as_str()), (409, Some("FG.5004")), "{b}");
    assert!(b["error_msg"]
        .as_str()
        .unwrap()
        .contains("no longer exists in the source instance"));
}

#[tokio::test]
async fn data_sync_turns_itself_off_after_30_days_and_locks_after_completed() {
    let app = spawn_app().await;
    app.target_instance().await;
    let (pk, _) = app.product_with(2).await;
    let tid = app.new_task(&pk).await;
    let engine = app.app().migration().clone();
    let (s, b) = app
        .action(&tid, "data-sync", json!({"enabled": "yes"}))
        .await;
    assert_eq!(
        (s, b["error_ext_msg"].as_str()),
        (400, Some("enabled")),
        "{b}"
    );
    let t = app.ok(&tid, "data-sync", json!({"enabled": true})).await;
    assert_eq!(t["data_sync"]["enabled"], true);
    let started = t["data_sync"]["started_at_ms"].as_i64().unwrap();
    assert_eq!(
        t["data_sync"]["expires_at_ms"].as_i64().unwrap(),
        started + 30 * 24 * 3600 * 1000
    );
    assert_eq!(engine.extra_targets(&pk, "d000", "default"), [TARGET]);

    engine.clock().advance(Duration::from_secs(30 * 24 * 3600));
    engine.wake();
    let t = app
        .wait_task(&tid, "data sync expired", |t| {
            t["data_sync"]["enabled"] == false && t["data_sync"]["disabled_reason"] == "expired"
        })
        .await;
    assert_eq!(t["data_sync"]["can_enable"], true);
    assert!(engine.extra_targets(&pk, "d000", "default").is_empty());
    // Still before COMPLETED: it may be turned on again, for another 30 days.
    let t = app.ok(&tid, "data-sync", json!({"enabled": true})).await;
    assert!(t["data_sync"]["started_at_ms"].as_i64().unwrap() >= started + 30 * 24 * 3600 * 1000);

    app.ok(&tid, "canary", json!({"device_names": ["d000"]}))
        .await;
    app.wait_state(&tid, "CANARY_COMPLETED").await;
    // A migrated device's data goes to the target only; the others' also go there.
    assert!(engine.extra_targets(&pk, "d000", TARGET).is_empty());
    assert_eq!(engine.extra_targets(&pk, "d001", "default"), [TARGET]);
    app.ok(&tid, "full", json!({})).await;
    app.wait_state(&tid, "COMPLETED").await;
    let t = app.ok(&tid, "data-sync", json!({"enabled": false})).await;
    assert_eq!(t["data_sync"]["enabled"], false);
    assert_eq!(t["data_sync"]["can_enable"], false);
    let (s, b) = app
        .action(&tid, "data-sync", json!({"enabled": true}))
        .await;
    assert_eq!((s, b["error_code"].as_str()), (409, Some("FG.5003")), "{b}");
    assert!(b["error_msg"]
        .as_str()
        .unwrap()
        .contains("cannot be turned on again"));

    let (_, log) = app
        .get(&format!("/api/v1/migrations/{tid}/log?page_size=100"))
        .await;
    let actions: Vec<&str> = log["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "create",
            "data_sync_on",
            "data_sync_expired",
            "data_sync_on",
            "canary",
            "finished",
            "full",
            "finished",
            "data_sync_off"
        ]
    );
}

#[tokio::test]
async fn restart_in_the_middle_of_a_full_migration() {
    let mut app = spawn_app().await;
    app.target_instance().await;
    let (pk, _) = app.product_with(150).await;
    let tid = app.new_task(&pk).await;
    app.ok(&tid, "canary", json!({"device_names": ["d000"]}))
        .await;
    app.wait_state(&tid, "CANARY_COMPLETED").await;
    app.app().migration().set_rate(30).await.unwrap();
    app.ok(&tid, "full", json!({})).await;
    app.wait_task(&tid, "progress", |t| {
        t["devices"]["migrated"].as_u64() >= Some(20)
    })
    .await;
    let metrics_before = app.app().metrics().clone();
    app.restart().await;
    let moved_before = metrics_before
        .migration_devices
        .get_or_create(&[("result", "migrated")])
        .get();
    assert!(
        (20..150).contains(&moved_before),
        "stopped mid-way: {moved_before}"
    );
    let t = app.task(&tid).await;
    let resumed_at = t["devices"]["migrated"].as_u64().unwrap();
    assert!((20..=150).contains(&resumed_at), "{t}");
    assert!(
        ["MIGRATING", "COMPLETED"].contains(&t["state"].as_str().unwrap()),
        "resumed by itself: {t}"
    );
    let t = app.wait_state(&tid, "COMPLETED").await;
    assert_eq!(t["devices"]["migrated"], 150);
    assert_eq!(t["devices"]["not_migrated"], 0);
    let metrics = app.metrics().await;
    let moved_after: u64 = metrics
        .lines()
        .find(|l| l.starts_with(r#"fleetgate_migration_devices_total{result="migrated"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert_eq!(
        moved_before + moved_after,
        150,
        "every device moved exactly once over both runs"
    );
    let (_, devices) = app
        .get(&format!(
            "/api/v1/migrations/{tid}/devices?status=MIGRATED&page_size=100&page=2"
        ))
        .await;
    assert_eq!(devices["total"], 150);
    assert_eq!(devices["items"][0]["instance_id"], TARGET);
}

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

/// The next property post in a consumer group's queue: `(device_name, request id)`; status
/// messages are skipped.
async fn next_post(consumer: &mut lapin::Consumer) -> (String, String) {
    loop {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("a forwarded message in time")
            .expect("consumer open")
            .expect("delivery");
        d.ack(BasicAckOptions::default()).await.unwrap();
        if header(&d, "topic").ends_with("/thing/event/property/post") {
            let body: Value = serde_json::from_slice(&d.data).unwrap();
            return (
                header(&d, "deviceName"),
                body["requestId"].as_str().unwrap_or_default().to_owned(),
            );
        }
    }
}

async fn post_property(client: &AsyncClient, pk: &str, dn: &str, id: &str) {
    client
        .publish(
            format!("/sys/{pk}/{dn}/thing/event/property/post"),
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"id":"{id}","version":"1.0","params":{{"Temp":1}},"method":"thing.event.property.post"}}"#),
        )
        .await
        .unwrap();
}

/// Data sync with a real RabbitMQ: while on, a not-yet-migrated device's data reaches the
/// consumer groups of both instances; a migrated device's data reaches the target only; off,
/// the source only.
#[tokio::test]
async fn data_sync_mirrors_to_both_instances_groups_and_migrated_devices_go_to_the_target_only() {
    let test = "data_sync_mirrors_to_both_instances_groups";
    let url = test_amqp_url(test).await;
    let prefix = format!("fgmig-{:08x}", rand::thread_rng().gen::<u32>());
    let app = spawn_app_with_amqp(&url, &prefix).await;
    app.target_instance().await;
    for (iid, gid) in [("default", "src"), (TARGET, "dst")] {
        let (s, b) = app
            .post(
                &format!("/api/v1/instances/{iid}/consumer-groups"),
                json!({"group_id": gid, "name": gid}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
    }
    let rabbit = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = rabbit.create_channel().await.unwrap();
    let consume = |queue: String| {
        let ch = ch.clone();
        async move {
            ch.basic_consume(
                queue.as_str().into(),
                format!("migration-test-{queue}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap()
        }
    };
    let mut src = consume(format!("{prefix}.default.src")).await;
    let mut dst = consume(format!("{prefix}.{TARGET}.dst")).await;

    let (pk, secrets) = app.product_with(2).await;
    let moving = reconnecting(app.mqtt_addr(), &pk, "d000", &secrets[0]);
    let staying = reconnecting(app.mqtt_addr(), &pk, "d001", &secrets[1]);
    for dn in ["d000", "d001"] {
        app.wait_device(&pk, dn, "online", |d| d["online"] == true)
            .await;
    }
    let tid = app.new_task(&pk).await;
    let (s, b) = app
        .put(
            &format!("/api/v1/migrations/{tid}/config"),
            json!({"migration_method": "full_migration", "resume_mode": "auto", "bandwidth_limit_mb": 64}),
        )
        .await;
    assert_eq!(s, 200, "{b}");

    // Data sync off (the default): the source's group only.
    post_property(&staying.client, &pk, "d001", "1").await;
    assert_eq!(next_post(&mut src).await, ("d001".into(), "1".into()));
    // On: both instances' groups.
    let t = app.ok(&tid, "data-sync", json!({"enabled": true})).await;
    assert_eq!(t["data_sync"]["enabled"], true);
    post_property(&staying.client, &pk, "d001", "2").await;
    assert_eq!(next_post(&mut src).await, ("d001".into(), "2".into()));
    assert_eq!(
        next_post(&mut dst).await,
        ("d001".into(), "2".into()),
        "the unmigrated device's data is mirrored into the target"
    );

    // Migrate d000 (canary): it is kicked, reconnects, and its data goes to the target only.
    app.ok(&tid, "canary", json!({"device_names": ["d000"]}))
        .await;
    app.wait_state(&tid, "CANARY_COMPLETED").await;
    wait_for("d000 reconnects", || {
        moving.connects.load(Ordering::SeqCst) >= 2
    })
    .await;
    app.wait_device(&pk, "d000", "online in the target", |d| {
        d["online"] == true && d["instance_id"] == TARGET
    })
    .await;
    post_property(&moving.client, &pk, "d000", "3").await;
    assert_eq!(next_post(&mut dst).await, ("d000".into(), "3".into()));
    // d001's marker follows d000's post through the same ordered outbox: if d000's post had
    // gone to the source it would come first.
    post_property(&staying.client, &pk, "d001", "4").await;
    assert_eq!(
        next_post(&mut src).await,
        ("d001".into(), "4".into()),
        "the migrated device's data did not go to the source"
    );
    assert_eq!(next_post(&mut dst).await, ("d001".into(), "4".into()));

    // Off again: the unmigrated device's data stays in the source.
    app.ok(&tid, "data-sync", json!({"enabled": false})).await;
    post_property(&staying.client, &pk, "d001", "5").await;
    post_property(&moving.client, &pk, "d000", "6").await;
    assert_eq!(next_post(&mut src).await, ("d001".into(), "5".into()));
    assert_eq!(
        next_post(&mut dst).await,
        ("d000".into(), "6".into()),
        "no mirrored copy of d001 once data sync is off"
    );

    drop((moving, staying));
    for iid in ["default", TARGET] {
        let gid = if iid == "default" { "src" } else { "dst" };
        let _ = app
            .request(
                Method::DELETE,
                &format!("/api/v1/instances/{iid}/consumer-groups/{gid}"),
                None,
                Some(ADMIN_TOKEN),
            )
            .await;
        let _ = ch
            .exchange_delete(
                format!("{prefix}.{iid}").into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
}

#[tokio::test]
async fn device_details_show_the_migration_status_and_deleted_devices_leave_the_task() {
    let app = spawn_app().await;
    app.target_instance().await;
    let (pk, _) = app.product_with(4).await;
    // Never migrated: no migration status.
    let d = app.device(&pk, "d000").await;
    assert!(d["migration"].is_null(), "{d}");
    assert_eq!(
        d["device_name"], "d000",
        "the device's own fields stay: {d}"
    );
    let tid = app.new_task(&pk).await;
    let d = app.device(&pk, "d000").await;
    assert_eq!(d["migration"]["task_id"], tid.as_str(), "{d}");
    assert_eq!(d["migration"]["task_state"], "TO_MIGRATE");
    assert_eq!(d["migration"]["status"], "NOT_MIGRATED");
    assert_eq!(d["migration"]["target_instance_id"], TARGET);
    assert!(d["migration"]["updated_at_ms"].is_null());

    app.ok(&tid, "canary", json!({"device_names": ["d000", "d001"]}))
        .await;
    app.wait_state(&tid, "CANARY_COMPLETED").await;
    let d = app.device(&pk, "d000").await;
    assert_eq!(d["instance_id"], TARGET);
    assert_eq!(d["migration"]["status"], "MIGRATED", "{d}");
    assert_eq!(d["migration"]["task_state"], "CANARY_COMPLETED");
    assert!(d["migration"]["updated_at_ms"].is_i64());
    assert_eq!(
        app.device(&pk, "d002").await["migration"]["status"],
        "NOT_MIGRATED"
    );

    // A migrated device is deleted: it leaves the totals; its namesake starts NOT_MIGRATED.
    let (s, b) = app
        .request(
            Method::DELETE,
            &format!("/api/v1/products/{pk}/devices/d001"),
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(s, 204, "{b}");
    let t = app.task(&tid).await;
    assert_eq!(t["devices"]["total"], 3, "{t}");
    assert_eq!(t["devices"]["migrated"], 1, "{t}");
    assert_eq!(t["status"], "SUCCESS", "{t}");
    app.create_device(&pk, "d001").await;
    let d = app.device(&pk, "d001").await;
    assert_eq!(d["migration"]["status"], "NOT_MIGRATED", "{d}");

    app.ok(&tid, "rollback", json!({"device_names": ["d000"]}))
        .await;
    app.wait_state(&tid, "TO_MIGRATE").await;
    let d = app.device(&pk, "d000").await;
    assert_eq!(d["instance_id"], "default");
    assert_eq!(d["migration"]["status"], "ROLLED_BACK", "{d}");
}
