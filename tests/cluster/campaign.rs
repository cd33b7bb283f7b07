//! A campaign with every kind of device fault over 300 devices on 3 nodes, its driving node
//! killed with SIGKILL in the middle: every task ends in the state its device's behaviour
//! implies, no device gets a push its task does not account for, and the job completes.

use crate::harness::*;
use crate::ota::{sim_device_with, Behaviour, SimDevice};
use reqwest::Method;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

const DEVICES: usize = 300;

/// Device `i`'s behaviour (`None`: offline until after the kill, then it upgrades).
fn behaviour(i: usize) -> Option<Behaviour> {
    match i % 10 {
        k @ 0..=3 => Some(Behaviour::Fail(-(k as i32) - 1)),
        4 => Some(Behaviour::Hang),
        5 => Some(Behaviour::WrongVersion),
        6 => None,
        _ => Some(Behaviour::Upgrade),
    }
}

/// The terminal (status, failure) device `i`'s task must end in.
fn expected(i: usize) -> (&'static str, Option<&'static str>) {
    match behaviour(i) {
        Some(Behaviour::Fail(-1)) => ("FAILED", Some("UPDATE_FAILED")),
        Some(Behaviour::Fail(-2)) => ("FAILED", Some("DOWNLOAD_FAILED")),
        Some(Behaviour::Fail(-3)) => ("FAILED", Some("VERIFY_FAILED")),
        Some(Behaviour::Fail(_)) => ("FAILED", Some("WRITE_FAILED")),
        Some(Behaviour::Hang) => ("FAILED", Some("TIMEOUT")),
        Some(Behaviour::WrongVersion) => ("FAILED", Some("WRONG_VERSION")),
        Some(Behaviour::Upgrade) | None => ("SUCCEEDED", None),
    }
}

/// 1. 300 devices behind HAProxy — failure codes -1..-4, hangs, wrong versions, devices
///    offline until the end and devices that upgrade — in one job at 600/min with a 20 s
///    timeout; the node driving the engines is killed once a third of the tasks started.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_campaign_with_every_fault_survives_the_kill_of_its_driving_node() {
    let mut cluster = Cluster::start(3).await;
    let proxy = Haproxy::start(&cluster.nodes.iter().collect::<Vec<_>>());
    let holder = engines_node(&cluster, &[1, 2, 3]).await;
    let followers: Vec<u16> = [1, 2, 3].into_iter().filter(|&n| n != holder).collect();
    let api = cluster.node(followers[0]).api();
    let pk = api.create_product("faults").await;
    let names: Vec<String> = (0..DEVICES).map(|i| format!("f-{i:03}")).collect();
    let secrets = api.create_devices(&pk, &names).await;
    let fw = upload_firmware(cluster.node(followers[1]), &pk, "2.0.0", b"image 2.0.0").await;
    let fid = fw["firmware_id"].as_str().unwrap().to_owned();

    let dn = |i: usize| format!("f-{i:03}");
    let mut devices: BTreeMap<usize, SimDevice> = BTreeMap::new();
    for (i, secret) in secrets.iter().enumerate() {
        if let Some(b) = behaviour(i) {
            devices.insert(i, sim_device_with(proxy.addr, &pk, &dn(i), secret, b));
        }
    }
    let online: Vec<String> = devices.keys().map(|&i| dn(i)).collect();
    let placed = api.wait_online_at(&pk, &online, "1.0.0").await;
    assert_eq!(placed.len(), 3, "devices not on every node: {placed:?}");

    let jid = api.start_job(&fid, 600, 20).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, j) = api.get(&format!("/api/v1/ota/jobs/{jid}")).await;
        let c = &j["counters"];
        let started = ["notified", "in_progress", "succeeded", "failed"]
            .iter()
            .map(|k| c[k].as_u64().unwrap_or(0))
            .sum::<u64>();
        if started >= DEVICES as u64 / 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "campaign stuck: {j}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.node_mut(holder).kill9();
    let next = engines_node(&cluster, &followers).await;
    // The offline devices come online now, on the surviving nodes.
    for i in (0..DEVICES).filter(|&i| behaviour(i).is_none()) {
        devices.insert(
            i,
            sim_device_with(proxy.addr, &pk, &dn(i), &secrets[i], Behaviour::Upgrade),
        );
    }

    let watcher = cluster.node(followers[1]).api();
    let job = wait_for(
        &watcher,
        &format!("/api/v1/ota/jobs/{jid}"),
        "COMPLETED",
        Duration::from_secs(180),
        |j| j["status"] == "COMPLETED",
    )
    .await;
    assert_eq!(job["counters"]["total"], DEVICES as u64, "{job}");
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for (&i, device) in &devices {
        let task = call_retrying(
            &watcher,
            Method::GET,
            &format!("/api/v1/ota/jobs/{jid}/tasks/{}", dn(i)),
            None,
        )
        .await;
        let (status, failure) = expected(i);
        assert_eq!(task["status"], status, "{}: {task}", dn(i));
        if let Some(failure) = failure {
            assert_eq!(task["failure"], failure, "{}: {task}", dn(i));
        }
        let received = u64::from(device.pushes.load(Ordering::SeqCst));
        let accounted = task["pushes"].as_u64().unwrap();
        assert!(
            (1..=accounted).contains(&received) && accounted <= 2,
            "{} received {received} pushes, its task accounts for {accounted}: {task}",
            dn(i)
        );
        *outcomes
            .entry(failure.unwrap_or(status).to_owned())
            .or_default() += 1;
    }
    assert_eq!(outcomes["SUCCEEDED"], 120, "{outcomes:?}");
    assert_eq!(job["counters"]["succeeded"], 120, "{job}");
    assert_eq!(job["counters"]["failed"], 180, "{job}");
    eprintln!(
        "campaign with faults: devices on nodes {placed:?}, holder {holder} killed, node {next} finished: {outcomes:?}"
    );
}
