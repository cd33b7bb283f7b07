//! A rolling restart of every node (SIGTERM, start again on the same ports) while an OTA
//! campaign and a migration run: the engines' lease moves to another node whenever its holder
//! stops (the holder comes back only once another node drives), and no task, no timer and no
//! device move is lost.

use crate::harness::*;
use crate::ota::{all_tasks, sim_device, SimDevice};
use reqwest::Method;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

const TARGET: &str = "iot-target";

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
    let names: Vec<String> = (0..DEVICES).map(|i| format!("r-{i:03}")).collect();
    let secrets: BTreeMap<String, String> = names
        .iter()
        .cloned()
        .zip(api.create_devices(&pk, &names).await)
        .collect();
    let fw = upload_firmware(cluster.node(2), &pk, "2.0.0", b"image 2.0.0").await;
    let fid = fw["firmware_id"].as_str().unwrap().to_owned();
    let devices: BTreeMap<String, SimDevice> = secrets
        .iter()
        .map(|(dn, secret)| (dn.clone(), sim_device(proxy.addr, &pk, dn, secret)))
        .collect();
    api.wait_online_at(&pk, secrets.keys(), "1.0.0").await;

    // The migration's devices (not connected).
    let (s, b) = api
        .post(
            "/api/v1/instances",
            json!({"instance_id": TARGET, "name": "Target"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let moved_pk = api.create_product("rolling-migration").await;
    let moved: Vec<String> = (0..MOVED).map(|i| format!("m{i:03}")).collect();
    api.create_devices(&moved_pk, &moved).await;
    let tid = api.migration_past_canary(&moved_pk, TARGET, "m000").await;

    let jid = api.start_job(&fid, 90, 600).await;
    let (s, b) = api
        .post(&format!("/api/v1/migrations/{tid}/full"), json!({}))
        .await;
    assert_eq!(s, 200, "{b}");

    // Every node in turn: a clean stop, the same node back, the cluster whole again. The
    // engines' holder comes back only once another node took the lease over (else a node that
    // restarts fast takes its own lease back at start, and the lease never moves).
    let mut holders = Vec::new();
    for id in 1..=3u16 {
        let holder = engines_node(&cluster, &[1, 2, 3]).await;
        holders.push(holder);
        cluster.node_mut(id).stop();
        if id == holder {
            let others: Vec<u16> = [1, 2, 3].into_iter().filter(|&n| n != id).collect();
            engines_node(&cluster, &others).await;
        }
        cluster.node_mut(id).start_again();
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let job = loop {
        let j = call_retrying(
            &watcher,
            Method::GET,
            &format!("/api/v1/ota/jobs/{jid}"),
            None,
        )
        .await;
        if j["status"] == "COMPLETED" {
            break j;
        }
        if tokio::time::Instant::now() > deadline {
            // What the unfinished tasks went through, for the failure's report.
            for t in all_tasks(&watcher, &jid).await {
                if t["status"] != "SUCCEEDED" {
                    let dn = t["device_name"].as_str().unwrap_or_default().to_owned();
                    let task = call_retrying(
                        &watcher,
                        Method::GET,
                        &format!("/api/v1/ota/jobs/{jid}/tasks/{dn}"),
                        None,
                    )
                    .await;
                    let d = watcher.device(&pk, &dn).await;
                    eprintln!(
                        "unfinished {dn} (received {} pushes): {task}\n  device: {d}\n  trail: {}",
                        devices[&dn].pushes.load(Ordering::SeqCst),
                        devices[&dn].trail()
                    );
                }
            }
            panic!("never COMPLETED (engines held by {holders:?} before each restart): {j}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
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
