//! Instance migration in a cluster: the holder of the engines' lease drives every task; the
//! other nodes pass migration calls on to it and keep a mirror of its records. `kill -9` of
//! the holder in the middle of a full migration hands the task to another node, which resumes
//! it from the last committed batch.

use crate::harness::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

const TARGET: &str = "iot-target";

/// Waits (through `api`, retrying over a takeover) until the task is in `state`.
async fn wait_state(api: &Api, tid: &str, state: &str, within: Duration) -> Value {
    wait_for(
        api,
        &format!("/api/v1/migrations/{tid}"),
        state,
        within,
        |t| t["state"] == state,
    )
    .await
}

/// 3. A full migration of 1,200 devices at 100 devices/s, created and steered through
///    followers: the driving node is killed mid-way, another node takes the lease and
///    finishes it — every device in the target instance once, none failed, the records on
///    every surviving node agreeing — and a rollback of everything sent to the node that did
///    not drive it brings them all back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migration_survives_the_kill_of_the_node_that_drives_it() {
    const DEVICES: usize = 1_200;
    let options = NodeOptions {
        config: Some("[migration]\ndevices_per_sec = 100\nbatch_size = 50\n".into()),
        env: Vec::new(),
    };
    let mut cluster = Cluster::start_with(3, &options).await;
    let holder = engines_node(&cluster, &[1, 2, 3]).await;
    let followers: Vec<u16> = [1, 2, 3].into_iter().filter(|&n| n != holder).collect();
    let api = cluster.node(followers[0]).api();
    let other = cluster.node(followers[1]).api();

    let (s, b) = api
        .post(
            "/api/v1/instances",
            json!({"instance_id": TARGET, "name": "Target"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let pk = api.create_product("migrating").await;
    let names: Vec<String> = (0..DEVICES).map(|i| format!("m{i:04}")).collect();
    let secret = api.create_devices(&pk, &names).await.swap_remove(7);
    // One device online on a follower: moved while connected, it is kicked there.
    let device = reconnecting(
        cluster.node(followers[1]).mqtt,
        &credentials(&pk, "m0007", &secret),
    );
    api.wait_device(&pk, "m0007", "online", |d| d["online"] == true)
        .await;

    // Created on a follower: the calls are served by the holder.
    let tid = api.migration_past_canary(&pk, TARGET, "m0000").await;
    let (s, b) = other
        .post(&format!("/api/v1/migrations/{tid}/full"), json!({}))
        .await;
    assert_eq!(s, 200, "{b}");

    // Mid-way (at 100 devices/s the whole run takes about 12 s): kill the driver.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let before = loop {
        let (_, t) = api.get(&format!("/api/v1/migrations/{tid}")).await;
        let migrated = t["devices"]["migrated"].as_u64().unwrap_or(0);
        if migrated >= 300 {
            break migrated;
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress: {t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        before < DEVICES as u64,
        "finished before the kill: {before}"
    );
    cluster.node_mut(holder).kill9();
    let next = engines_node(&cluster, &followers).await;
    assert_ne!(next, holder);

    let done = wait_state(&api, &tid, "COMPLETED", Duration::from_secs(90)).await;
    assert_eq!(done["devices"]["total"], DEVICES, "{done}");
    assert_eq!(done["devices"]["migrated"], DEVICES, "{done}");
    assert_eq!(done["devices"]["failed"], 0, "{done}");
    assert_eq!(done["status"], "SUCCESS", "{done}");
    // The holder's log says it took the task over where the killed node left it: no device
    // is listed twice, none is missing.
    let mut listed = Vec::new();
    for page in 1.. {
        let (s, b) = api
            .get(&format!(
                "/api/v1/migrations/{tid}/devices?page={page}&page_size=100"
            ))
            .await;
        assert_eq!(s, 200, "{b}");
        let items = b["items"].as_array().unwrap().clone();
        if items.is_empty() {
            break;
        }
        listed.extend(items);
    }
    assert_eq!(listed.len(), DEVICES);
    assert!(
        listed.iter().all(|d| d["status"] == "MIGRATED"),
        "not all migrated: {:?}",
        listed.iter().find(|d| d["status"] != "MIGRATED")
    );
    // Every surviving node's own records (device details are not passed on): the device is
    // in the target, and its migration record is the holder's.
    for &id in &followers {
        let node = cluster.node(id).api();
        for dn in ["m0000", "m0007", "m0999", "m1199"] {
            let d = node
                .wait_device(&pk, dn, "migrated here too", |d| {
                    d["instance_id"] == TARGET && d["migration"]["status"] == "MIGRATED"
                })
                .await;
            assert_eq!(d["migration"]["task_id"], tid.as_str(), "{d}");
        }
    }
    // The connected device was kicked once when it moved, and came back.
    let mut connacks = device.connacks.clone();
    tokio::time::timeout(Duration::from_secs(30), connacks.wait_for(|n| *n >= 2))
        .await
        .expect("the moved device was not kicked")
        .unwrap();

    // Rollback of everything, sent to the node that did not drive the task.
    let rollback_via = followers.iter().copied().find(|&n| n != next).unwrap();
    let via = cluster.node(rollback_via).api();
    let b = call_retrying(
        &via,
        Method::POST,
        &format!("/api/v1/migrations/{tid}/rollback"),
        Some(json!({"all": true})),
    )
    .await;
    assert_eq!(b["task"]["state"], "BATCH_ROLLBACK", "{b}");
    let back = wait_state(&via, &tid, "TO_MIGRATE", Duration::from_secs(60)).await;
    assert_eq!(back["devices"]["migrated"], 0, "{back}");
    assert_eq!(back["devices"]["rolled_back"], DEVICES, "{back}");
    for dn in ["m0000", "m0007", "m1199"] {
        let d = via
            .wait_device(&pk, dn, "back in the source", |d| {
                d["instance_id"] == "default"
            })
            .await;
        assert_eq!(d["migration"]["status"], "ROLLED_BACK", "{d}");
    }
}
