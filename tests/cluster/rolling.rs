//! A rolling restart of every node (SIGTERM, start again on the same ports) while an OTA
//! campaign and a migration run: the engines' lease moves from node to node, and no task, no
//! timer and no device move is lost.

use crate::harness::*;
use crate::ota::{call_retrying, engines_node, sim_device, SimDevice};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

const TARGET: &str = "iot-target";

/// Polls `path` through `api` (retrying over a handover) until `done` says so.
async fn wait_for(
    api: &Api,
    path: &str,
    what: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let v = call_retrying(api, Method::GET, path, None).await;
        if done(&v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "never {what}: {v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// 5. Campaign over 45 devices behind HAProxy at 90/min and a full migration of 400 devices at
///    20/s; nodes 1, 2, 3 restarted one after the other (each time the cluster waits for the
///    node to be back): every task SUCCEEDED and every push a device received is one its task
///    accounts for; the migration COMPLETED with all 400 devices moved once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_loses_no_task_no_timer_and_no_move() {
    const DEVICES: usize = 45;
    const MOVED: usize = 400;
    let options = NodeOptions {
        config: Some("[migration]\ndevices_per_sec = 20\nbatch_size = 20\n".into()),
        env: Vec::new(),
    };
    let mut cluster = Cluster::start_with(3, &options).await;
    let proxy = Haproxy::start(&cluster.nodes.iter().collect::<Vec<_>>());
    let api = cluster.node(1).api();

    // The campaign's devices, connected through HAProxy.
    let pk = api.create_product("rolling-ota").await;
    let mut secrets = BTreeMap::new();
    for i in 0..DEVICES {
        let dn = format!("r-{i:03}");
        secrets.insert(dn.clone(), api.create_device(&pk, &dn).await);
    }
    let form = reqwest::multipart::Form::new()
        .text("product_key", pk.clone())
        .text("version", "2.0.0")
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"image 2.0.0".to_vec()).file_name("fw.bin"),
        );
    let resp = reqwest::Client::new()
        .post(format!("http://{}/api/v1/firmware", cluster.node(2).http))
        .bearer_auth(ADMIN_TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let fw: Value = resp.json().await.unwrap();
    let fid = fw["firmware_id"].as_str().unwrap().to_owned();
    let devices: BTreeMap<String, SimDevice> = secrets
        .iter()
        .map(|(dn, secret)| (dn.clone(), sim_device(proxy.addr, &pk, dn, secret)))
        .collect();
    for dn in secrets.keys() {
        api.wait_device(&pk, dn, "online with 1.0.0", |d| {
            d["online"] == true && d["versions"]["default"] == "1.0.0"
        })
        .await;
    }

    // The migration's devices (not connected).
    let (s, b) = api
        .post(
            "/api/v1/instances",
            json!({"instance_id": TARGET, "name": "Target"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let moved_pk = api.create_product("rolling-migration").await;
    let rows: Vec<Value> = (0..MOVED)
        .map(|i| json!({"device_name": format!("m{i:03}")}))
        .collect();
    let (s, b) = api
        .post(
            &format!("/api/v1/products/{moved_pk}/devices/batch"),
            json!({ "devices": rows }),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, task) = api
        .post(
            "/api/v1/migrations",
            json!({"product_key": moved_pk, "target_instance_id": TARGET}),
        )
        .await;
    assert_eq!(s, 201, "{task}");
    let tid = task["task_id"].as_str().unwrap().to_owned();
    let (s, b) = api
        .post(
            &format!("/api/v1/migrations/{tid}/canary"),
            json!({"device_names": ["m000"]}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    wait_for(
        &api,
        &format!("/api/v1/migrations/{tid}"),
        "CANARY_COMPLETED",
        Duration::from_secs(30),
        |t| t["state"] == "CANARY_COMPLETED",
    )
    .await;

    let (s, job) = api
        .post(
            "/api/v1/ota/jobs",
            json!({
                "firmware_id": fid,
                "target": "ALL",
                "force": true,
                "timeout_seconds": 600,
                "rate": {"per_minute": 90}
            }),
        )
        .await;
    assert_eq!(s, 201, "{job}");
    let jid = job["job_id"].as_str().unwrap().to_owned();
    let (s, b) = api
        .post(&format!("/api/v1/migrations/{tid}/full"), json!({}))
        .await;
    assert_eq!(s, 200, "{b}");

    // Every node in turn: a clean stop, the same node back, the cluster whole again.
    let mut holders = Vec::new();
    for id in 1..=3u16 {
        holders.push(engines_node(&cluster, &[1, 2, 3]).await);
        cluster.node_mut(id).restart();
        cluster.wait_members(3).await;
    }
    let (_, j) = api.get(&format!("/api/v1/ota/jobs/{jid}")).await;
    let (_, t) = api.get(&format!("/api/v1/migrations/{tid}")).await;
    assert_ne!(
        j["status"], "COMPLETED",
        "the campaign ended before the restarts: {j}"
    );
    assert_ne!(
        t["state"], "COMPLETED",
        "the migration ended before the restarts: {t}"
    );

    let watcher = cluster.node(3).api();
    let job = wait_for(
        &watcher,
        &format!("/api/v1/ota/jobs/{jid}"),
        "COMPLETED",
        Duration::from_secs(120),
        |j| j["status"] == "COMPLETED",
    )
    .await;
    assert_eq!(job["counters"]["succeeded"], DEVICES as u64, "{job}");
    assert_eq!(job["counters"]["total"], DEVICES as u64, "{job}");
    for (dn, device) in &devices {
        let task = call_retrying(
            &watcher,
            Method::GET,
            &format!("/api/v1/ota/jobs/{jid}/tasks/{dn}"),
            None,
        )
        .await;
        assert_eq!(task["status"], "SUCCEEDED", "{task}");
        let received = u64::from(device.pushes.load(Ordering::SeqCst));
        let accounted = task["pushes"].as_u64().unwrap();
        assert!(
            (1..=accounted).contains(&received),
            "{dn} received {received} pushes, its task accounts for {accounted}: {task}"
        );
    }
    let done = wait_for(
        &watcher,
        &format!("/api/v1/migrations/{tid}"),
        "COMPLETED",
        Duration::from_secs(120),
        |t| t["state"] == "COMPLETED",
    )
    .await;
    assert_eq!(done["devices"]["migrated"], MOVED as u64, "{done}");
    assert_eq!(done["devices"]["failed"], 0, "{done}");
    for dn in ["m000", "m199", "m399"] {
        let d = watcher.device(&moved_pk, dn).await;
        assert_eq!(d["instance_id"], TARGET, "{d}");
    }
    eprintln!("rolling restart: engines held by {holders:?} before each restart");
    drop(devices);
}
