//! Cluster mode end to end: three gateway processes on one PostgreSQL database and NATS,
//! HAProxy in front (docs/CLUSTER.md).

mod harness;

use harness::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

fn online_at(node: u16) -> impl Fn(&Value) -> bool {
    move |d: &Value| d["online"] == true && d["node"] == node
}

/// 1. Devices connecting through HAProxy land on one node each, the same one every time, and
///    every node's API lists them online.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_land_on_consistent_nodes_through_haproxy() {
    let cluster = Cluster::start(3).await;
    let proxy = Haproxy::start(&cluster.nodes.iter().collect::<Vec<_>>());
    let api = cluster.node(1).api();
    let pk = api.create_product("lamp").await;
    let mut secrets = BTreeMap::new();
    for i in 0..24 {
        let dn = format!("lamp-{i:03}");
        secrets.insert(dn.clone(), api.create_device(&pk, &dn).await);
    }
    let mut placed: BTreeMap<String, u64> = BTreeMap::new();
    for round in 0..2 {
        let mut devices = Vec::new();
        for (dn, secret) in &secrets {
            devices.push(connect(proxy.addr, &credentials(&pk, dn, secret)).await);
        }
        for dn in secrets.keys() {
            for node in &cluster.nodes {
                let d = node
                    .api()
                    .wait_device(&pk, dn, "online", |d| {
                        d["online"] == true && d["node"].is_u64()
                    })
                    .await;
                let at = d["node"].as_u64().unwrap();
                let first = *placed.entry(dn.clone()).or_insert(at);
                assert_eq!(
                    first, at,
                    "{dn} moved from node {first} to {at} in round {round}"
                );
            }
        }
        for d in &devices {
            d.client.disconnect().await.unwrap();
        }
        drop(devices);
        for dn in secrets.keys() {
            api.wait_device(&pk, dn, "offline", |d| d["online"] == false)
                .await;
        }
    }
    let used: BTreeSet<u64> = placed.values().copied().collect();
    assert!(
        used.len() >= 2,
        "24 devices all hashed to one node: {placed:?}"
    );
    // What is not MQTT is turned away at the balancer.
    let mut junk = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, junk.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "a non-MQTT client got an answer");
}

/// 2. Takeover across nodes: the device's second connection (node 2) ends the first (node 1)
///    within a second, and node 1's disconnect does not mark the device offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_on_another_node_takes_the_device_over() {
    let cluster = Cluster::start(2).await;
    let api = cluster.node(1).api();
    let pk = api.create_product("meter").await;
    let secret = api.create_device(&pk, "meter-01").await;
    let creds = credentials(&pk, "meter-01", &secret);
    let first = connect(cluster.node(1).mqtt, &creds).await;
    cluster
        .node(2)
        .api()
        .wait_device(&pk, "meter-01", "online at node 1", online_at(1))
        .await;

    let second = connect(cluster.node(2).mqtt, &creds).await;
    let started = tokio::time::Instant::now();
    let mut ended = first.ended.clone();
    tokio::time::timeout(Duration::from_secs(1), ended.wait_for(|e| *e))
        .await
        .expect("node 1's session ends within a second")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(!*second.ended.borrow(), "the new session must stay");
    for node in &cluster.nodes {
        node.api()
            .wait_device(&pk, "meter-01", "online at node 2", online_at(2))
            .await;
    }
    // Stays online at node 2 (the old session's end arrived and changed nothing).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for node in &cluster.nodes {
        let d = node.api().device(&pk, "meter-01").await;
        assert!(online_at(2)(&d), "via node {}: {d}", node.id);
    }
    assert!(!*second.ended.borrow());
}

/// 3. A device created, disabled or deleted through node 1 can / cannot connect through node 3
///    right after the answer; one connected elsewhere is kicked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_through_one_node_apply_on_every_node_at_once() {
    let cluster = Cluster::start(3).await;
    let (one, three) = (cluster.node(1).api(), cluster.node(3));
    let pk = one.create_product("valve").await;
    for i in 0..5 {
        let dn = format!("valve-{i}");
        let secret = one.create_device(&pk, &dn).await;
        // Right after the 201: no waiting, no retry.
        let d = connect(three.mqtt, &credentials(&pk, &dn, &secret)).await;
        drop(d);
    }

    // Disabled through node 1 while connected to node 2: kicked, and refused on node 3.
    let secret = one.create_device(&pk, "valve-x").await;
    let creds = credentials(&pk, "valve-x", &secret);
    let held = connect(cluster.node(2).mqtt, &creds).await;
    let (status, body) = one
        .call(
            reqwest::Method::PATCH,
            &format!("/api/v1/products/{pk}/devices/valve-x"),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mut ended = held.ended.clone();
    tokio::time::timeout(WAIT, ended.wait_for(|e| *e))
        .await
        .unwrap()
        .unwrap();
    assert!(
        try_connect(three.mqtt, &creds).await.is_err(),
        "disabled device connected"
    );

    // Deleted through node 1: refused on node 3 at once.
    let secret = one.create_device(&pk, "valve-y").await;
    let creds = credentials(&pk, "valve-y", &secret);
    let held = connect(three.mqtt, &creds).await;
    let (status, _) = one
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/products/{pk}/devices/valve-y"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let mut ended = held.ended.clone();
    tokio::time::timeout(WAIT, ended.wait_for(|e| *e))
        .await
        .unwrap()
        .unwrap();
    assert!(
        try_connect(three.mqtt, &creds).await.is_err(),
        "deleted device connected"
    );
    let (status, _) = three
        .api()
        .get(&format!("/api/v1/products/{pk}/devices/valve-y"))
        .await;
    assert_eq!(status, 404);
}

/// 4. A version report node 2 acknowledged is visible through node 3 and survives SIGKILL of
///    node 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_acknowledged_report_survives_the_node_that_took_it() {
    let mut cluster = Cluster::start(3).await;
    let api = cluster.node(1).api();
    let pk = api.create_product("pump").await;
    let secret = api.create_device(&pk, "pump-01").await;
    let mut device = connect(cluster.node(2).mqtt, &credentials(&pk, "pump-01", &secret)).await;
    let topic = format!("/ota/device/inform/{pk}/pump-01");
    let body = json!({"id": "1", "params": {"version": "4.2.0", "module": "MCU"}}).to_string();
    // QoS 1: `publish` returns once queued; the PUBACK is awaited below.
    device
        .client
        .publish(topic, rumqttc::QoS::AtLeastOnce, false, body)
        .await
        .unwrap();
    let acked = tokio::time::timeout(WAIT, async {
        while let Some(p) = device.incoming.recv().await {
            if matches!(p, rumqttc::Packet::PubAck(_)) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(acked, "no PUBACK");
    cluster.node_mut(2).kill9();
    for id in [1, 3] {
        cluster
            .node(id)
            .api()
            .wait_device(&pk, "pump-01", "version 4.2.0", |d| {
                d["versions"]["MCU"] == "4.2.0"
            })
            .await;
    }
    // Node 2 is gone for good: the device is released everywhere after the node timeout.
    cluster
        .node(3)
        .api()
        .wait_device(&pk, "pump-01", "offline", |d| d["online"] == false)
        .await;
}

/// 5. SIGKILL of a node: its devices reconnect through HAProxy to the others and are online
///    again in every node's registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_nodes_devices_reconnect_to_the_others() {
    let mut cluster = Cluster::start(3).await;
    let proxy = Haproxy::start(&cluster.nodes.iter().collect::<Vec<_>>());
    let api = cluster.node(1).api();
    let pk = api.create_product("sensor").await;
    let mut devices = Vec::new();
    let mut names = Vec::new();
    for i in 0..30 {
        let dn = format!("sensor-{i:03}");
        let secret = api.create_device(&pk, &dn).await;
        devices.push(reconnecting(proxy.addr, &credentials(&pk, &dn, &secret)));
        names.push(dn);
    }
    let mut at = BTreeMap::new();
    for dn in &names {
        let d = api
            .wait_device(&pk, dn, "online", |d| {
                d["online"] == true && d["node"].is_u64()
            })
            .await;
        at.insert(dn.clone(), d["node"].as_u64().unwrap() as u16);
    }
    // The node holding the most devices dies (never node 1, whose API the test reads).
    let mut count: BTreeMap<u16, usize> = BTreeMap::new();
    for n in at.values() {
        *count.entry(*n).or_default() += 1;
    }
    let victim = count
        .iter()
        .filter(|(n, _)| **n != 1)
        .max_by_key(|(_, c)| **c)
        .map(|(n, _)| *n)
        .expect("devices on nodes 2 or 3");
    let moved: Vec<&String> = at
        .iter()
        .filter(|(_, n)| **n == victim)
        .map(|(d, _)| d)
        .collect();
    assert!(!moved.is_empty());
    cluster.node_mut(victim).kill9();
    let survivor = cluster
        .nodes
        .iter()
        .find(|n| n.id != victim && n.id != 1)
        .unwrap()
        .id;
    for dn in &moved {
        for id in [1, survivor] {
            cluster
                .node(id)
                .api()
                .wait_device(&pk, dn, "online on a live node", |d| {
                    d["online"] == true && d["node"].as_u64().is_some_and(|n| n as u16 != victim)
                })
                .await;
        }
    }
    for (i, d) in devices.iter().enumerate() {
        let expected = if moved.contains(&&names[i]) { 2 } else { 1 };
        assert!(
            *d.connacks.borrow() >= expected,
            "{}: {} CONNACKs",
            names[i],
            *d.connacks.borrow()
        );
    }
}

/// Cloud-to-device calls taken by a node that does not hold the device go to the node that
/// does and come back with the device's answer (docs/COMMANDS.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_reach_a_device_held_by_another_node() {
    let cluster = Cluster::start(2).await;
    let one = cluster.node(1).api();
    let pk = one.create_product("c2d").await;
    let secret = one.create_device(&pk, "lamp-01").await;
    let mut device = connect(cluster.node(2).mqtt, &credentials(&pk, "lamp-01", &secret)).await;
    device
        .client
        .subscribe(format!("/sys/{pk}/lamp-01/#"), rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, device.incoming.recv()).await {
            Ok(Some(rumqttc::Packet::SubAck(_))) => break,
            Ok(Some(_)) => continue,
            other => panic!("no SUBACK: {other:?}"),
        }
    }
    one.wait_device(&pk, "lamp-01", "online at node 2", online_at(2))
        .await;

    // The device answers RRPC requests and service calls.
    let client = device.client.clone();
    let mut incoming = std::mem::replace(
        &mut device.incoming,
        tokio::sync::mpsc::unbounded_channel().1,
    );
    let responder = tokio::spawn(async move {
        while let Some(p) = incoming.recv().await {
            let rumqttc::Packet::Publish(p) = p else {
                continue;
            };
            let (topic, body) = if p.topic.contains("/rrpc/request/") {
                (
                    p.topic.replace("/rrpc/request/", "/rrpc/response/"),
                    format!("pong:{}", String::from_utf8_lossy(&p.payload)).into_bytes(),
                )
            } else if p.topic.ends_with("/thing/service/property/set") {
                let req: Value = serde_json::from_slice(&p.payload).unwrap();
                let reply = json!({"id": req["id"], "code": 200, "data": {}});
                (
                    format!("{}_reply", p.topic),
                    serde_json::to_vec(&reply).unwrap(),
                )
            } else {
                continue;
            };
            client
                .publish(topic, rumqttc::QoS::AtMostOnce, false, body)
                .await
                .unwrap();
        }
    });

    let path = format!("/api/v1/products/{pk}/devices/lamp-01");
    let (status, body) = one
        .post(
            &format!("{path}/rrpc"),
            json!({"payload": "ping", "timeout_ms": 5000}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["payload_text"], "pong:ping");
    let (status, record) = one
        .call(
            reqwest::Method::PUT,
            &format!("{path}/properties"),
            Some(json!({"params": {"LightSwitch": 1}, "timeout_ms": 5000})),
        )
        .await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["reply"]["code"], 200);

    // Timeouts and refusals travel back as such.
    responder.abort();
    let (status, body) = one
        .post(
            &format!("{path}/rrpc"),
            json!({"payload": "ping", "timeout_ms": 1000}),
        )
        .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error_code"], "FG.6002");
    let (status, body) = one
        .post(
            &format!("{path}/messages"),
            json!({"topic": format!("/{pk}/lamp-01/user/get"), "payload": "hi"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    drop(device);
    one.wait_device(&pk, "lamp-01", "offline", |d| d["online"] == false)
        .await;
    let (status, body) = one
        .post(
            &format!("{path}/rrpc"),
            json!({"payload": "ping", "timeout_ms": 8000}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error_code"], "FG.6001");
}
