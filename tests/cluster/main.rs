//! Cluster mode end to end: three gateway processes on one PostgreSQL database and NATS,
//! HAProxy in front (docs/CLUSTER.md).

mod campaign;
mod console;
mod documents;
mod firmware;
mod handover;
mod harness;
mod migration;
mod ota;
mod rolling;

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

/// 1b. Behind HAProxy (`send-proxy-v2` from [`HAPROXY_SOURCE`], 127.0.0.3), each device's
///     `client_ip` is its own address — 127.0.0.1, or 127.0.0.2 for one connecting from there —
///     and never HAProxy's; a PROXY header sent straight to a node by a client outside
///     `mqtt.proxy_trusted` is not believed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn behind_haproxy_nodes_see_each_devices_own_address() {
    let cluster = Cluster::start(2).await;
    let proxy = Haproxy::start(&cluster.nodes.iter().collect::<Vec<_>>());
    let api = cluster.node(1).api();
    let pk = api.create_product("proxied").await;
    let mut devices = Vec::new();
    // (device, the address it connects to HAProxy from)
    let sources = [
        ("near-1", "127.0.0.1"),
        ("far-2", "127.0.0.2"),
        ("far-3", "127.0.0.2"),
    ];
    for (dn, source) in sources {
        let secret = api.create_device(&pk, dn).await;
        let to = relay_from(source, proxy.addr, Vec::new()).await;
        devices.push(connect(to, &credentials(&pk, dn, &secret)).await);
    }
    for (dn, source) in sources {
        for node in &cluster.nodes {
            let d = node
                .api()
                .wait_device(&pk, dn, "online", |d| d["online"] == true)
                .await;
            assert_eq!(
                d["client_ip"], source,
                "{dn} via node {} (HAProxy connects from {HAPROXY_SOURCE}): {d}",
                node.id
            );
        }
    }

    // A forged header straight to a node from 127.0.0.1, followed by a valid CONNECT: the
    // node reads it as the client's first MQTT bytes and closes the socket.
    let secret = api.create_device(&pk, "forger").await;
    let creds = credentials(&pk, "forger", &secret);
    let forged = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "198.51.100.7:40000"
                .parse::<std::net::SocketAddr>()
                .unwrap(),
            cluster.node(1).mqtt,
        ),
    )
    .build()
    .unwrap();
    let to = relay_from("127.0.0.1", cluster.node(1).mqtt, forged).await;
    let mut opts = rumqttc::MqttOptions::new(creds.client_id.clone(), "127.0.0.1", to.port());
    opts.set_credentials(creds.username.clone(), creds.password.clone());
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(opts, 8);
    let first = tokio::time::timeout(WAIT, eventloop.poll())
        .await
        .expect("an answer or a close in time");
    assert!(
        !matches!(
            first,
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))
        ),
        "a forged PROXY header got a CONNACK: {first:?}"
    );
    let d = api.device(&pk, "forger").await;
    assert!(
        d["online"] == false && d["client_ip"] != "198.51.100.7",
        "{d}"
    );
    drop(devices);
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
///    right after the answer; one connected elsewhere is kicked. An instance deleted through
///    node 1 is gone from node 3 right after the answer.
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

    // An instance created and deleted through node 1: gone from node 3 right after the 204.
    let (status, body) = one
        .post(
            "/api/v1/instances",
            json!({"instance_id": "iot-brief", "name": "brief"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(three.api().get("/api/v1/instances/iot-brief").await.0, 200);
    let (status, body) = one
        .call(reqwest::Method::DELETE, "/api/v1/instances/iot-brief", None)
        .await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = three.api().get("/api/v1/instances/iot-brief").await;
    assert_eq!(status, 404, "{body}");
    // And created again through node 3: the id is free everywhere.
    let (status, body) = three
        .api()
        .post(
            "/api/v1/instances",
            json!({"instance_id": "iot-brief", "name": "again"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        one.get("/api/v1/instances/iot-brief").await.1["name"],
        "again"
    );
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

/// The test RabbitMQ (`FLEETGATE_AMQP_URL`, default guest on localhost). Like every service of
/// these tests, a missing broker fails the test.
async fn amqp_url() -> String {
    let url = std::env::var("FLEETGATE_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    if let Err(e) = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await {
        panic!("RabbitMQ at {url} is needed for the forwarding cluster test ({e}); start it with `rabbitmq-server -detached`");
    }
    url
}

/// Waits until one node of `cluster` drains the shared outbox while connected to RabbitMQ.
async fn drain_holder(cluster: &Cluster) -> u16 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        for node in &cluster.nodes {
            let (_, health) = node.api().get("/healthz").await;
            if health["amqp"] == "connected" && health["amqp_outbox_drain"] == true {
                return node.id;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no node drains the shared outbox"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 6. Forwarding survives the node that took the posts: devices post properties to the node
///    that also drains the shared outbox, publishing lags behind (a rate limit), and that node
///    is killed for good mid-stream. Every post a device got a PUBACK for reaches the consumer
///    group's queue (published by the other node once it takes the drain lease over), each
///    device's posts first arrive in order, and redeliveries keep their message ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_posts_reach_the_consumer_group_after_their_node_dies_for_good() {
    use futures_util::StreamExt;
    let amqp = amqp_url().await;
    let prefix = unique("fgc");
    let options = NodeOptions {
        config: Some(format!("[amqp]\nexchange_prefix = \"{prefix}\"\n")),
        env: vec![
            ("FLEETGATE_AMQP_URL".into(), amqp.clone()),
            ("FLEETGATE_CLUSTER_LEASE_TTL_MS".into(), "2000".into()),
        ],
    };
    let mut cluster = Cluster::start_with(2, &options).await;
    let victim = drain_holder(&cluster).await;
    let survivor = if victim == 1 { 2 } else { 1 };
    let api = cluster.node(victim).api();
    let (status, body) = api
        .post(
            "/api/v1/instances/default/consumer-groups",
            json!({"group_id": "survivors", "name": "survivors"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // The drain holder publishes slowly: a backlog builds up in the shared outbox.
    let (status, body) = api
        .call(
            reqwest::Method::PUT,
            "/api/v1/instances/default/forwarding/rate-limit",
            Some(json!({"msgs_per_sec": 150})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let pk = api.create_product("meter").await;
    let mut devices = Vec::new();
    for i in 0..8 {
        let dn = format!("meter-{i}");
        let secret = api.create_device(&pk, &dn).await;
        let device = connect(cluster.node(victim).mqtt, &credentials(&pk, &dn, &secret)).await;
        devices.push((dn, device));
    }

    // Each device posts one property report after the other, each once the last was PUBACKed.
    let posting: Vec<_> = devices
        .into_iter()
        .map(|(dn, mut device)| {
            let topic = format!("/sys/{pk}/{dn}/thing/event/property/post");
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for k in 0u32.. {
                    let body = json!({"id": format!("{dn}:{k}"), "version": "1.0",
                        "params": {"n": k}, "method": "thing.event.property.post"});
                    if device
                        .client
                        .publish(&topic, rumqttc::QoS::AtLeastOnce, false, body.to_string())
                        .await
                        .is_err()
                    {
                        break;
                    }
                    let puback = tokio::time::timeout(Duration::from_secs(3), async {
                        while let Some(p) = device.incoming.recv().await {
                            if matches!(p, rumqttc::Packet::PubAck(_)) {
                                return true;
                            }
                        }
                        false
                    })
                    .await;
                    if puback != Ok(true) {
                        break;
                    }
                    acked.push(k);
                }
                (dn, acked)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    cluster.node_mut(victim).kill9();
    let mut acked: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for t in posting {
        let (dn, ks) = tokio::time::timeout(WAIT, t).await.unwrap().unwrap();
        acked.insert(dn, ks);
    }
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(total >= 200, "only {total} posts acknowledged: {acked:?}");
    let (pg, conn) = tokio_postgres::connect(&cluster.db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let backlog: i64 = pg
        .query_one("SELECT count(*) FROM forward_outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        backlog > 0,
        "nothing was left to publish when the node died: the test proves nothing"
    );

    // The survivor takes the drain over after the lease expires and publishes the rest.
    let rabbit = lapin::Connection::connect(&amqp, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = rabbit.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            format!("{prefix}.default.survivors").as_str().into(),
            "test".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let header = |d: &lapin::message::Delivery, key: &str| -> Option<String> {
        match d.properties.headers().as_ref()?.inner().get(key)? {
            lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
            _ => None,
        }
    };
    // message id → (device, k); per device, the k of each first arrival in arrival order.
    let mut ids: BTreeMap<String, (String, u32)> = BTreeMap::new();
    let mut first_arrivals: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut deliveries = 0usize;
    let missing = |first: &BTreeMap<String, Vec<u32>>| -> usize {
        acked
            .iter()
            .map(|(dn, ks)| {
                let got: BTreeSet<u32> = first.get(dn).into_iter().flatten().copied().collect();
                ks.iter().filter(|k| !got.contains(k)).count()
            })
            .sum()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while missing(&first_arrivals) > 0 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(Some(Ok(d))) = tokio::time::timeout(left, consumer.next()).await else {
            panic!(
                "{} of {total} acknowledged posts never arrived ({deliveries} deliveries); node {survivor}:\n{}",
                missing(&first_arrivals),
                cluster.node(survivor).logs()
            );
        };
        deliveries += 1;
        if !header(&d, "topic").is_some_and(|t| t.ends_with("/thing/event/property/post")) {
            continue;
        }
        let body: Value = serde_json::from_slice(&d.data).unwrap();
        let request = body["requestId"].as_str().unwrap().to_owned();
        let (dn, k) = request.split_once(':').unwrap();
        let k: u32 = k.parse().unwrap();
        let id = d.properties.message_id().as_ref().unwrap().to_string();
        match ids.get(&id) {
            // A redelivery (the dead holder's unconfirmed tail): same id, same post.
            Some(seen) => assert_eq!(seen, &(dn.to_owned(), k), "message id {id} reused"),
            None => {
                ids.insert(id, (dn.to_owned(), k));
                let firsts = first_arrivals.entry(dn.to_owned()).or_default();
                assert!(
                    !firsts.contains(&k),
                    "{dn}:{k} arrived under two message ids"
                );
                if let Some(last) = firsts.last() {
                    assert!(*last < k, "{dn}: {k} arrived after {last}");
                }
                firsts.push(k);
            }
        }
    }
    // At most one post per device was committed but not acknowledged when the node died.
    assert!(
        ids.len() <= total + acked.len(),
        "{} distinct posts for {total} acknowledged",
        ids.len()
    );
    let (_, health) = cluster.node(survivor).api().get("/healthz").await;
    assert_eq!(health["amqp_outbox_drain"], true, "{health}");
    eprintln!(
        "acknowledged {total}, left in the outbox at the kill {backlog}, deliveries {deliveries}, distinct {}",
        ids.len()
    );
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

    // An asynchronous call's record is kept by the node holding the device (2); every node
    // reads it, with the device's answer once it came.
    let (status, record) = one
        .call(
            reqwest::Method::PUT,
            &format!("{path}/properties"),
            Some(json!({"params": {"LightSwitch": 0}})),
        )
        .await;
    assert_eq!(status, 202, "{record}");
    let id = record["id"].as_str().unwrap().to_owned();
    for node in [1, 2] {
        let api = cluster.node(node).api();
        let deadline = tokio::time::Instant::now() + FOLLOW;
        loop {
            let (status, body) = api.get(&format!("{path}/commands/{id}")).await;
            assert_eq!(status, 200, "node {node}: {body}");
            if body["status"] == "replied" {
                assert_eq!(body["reply"]["code"], 200, "{body}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {node}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (status, body) = one.get(&format!("{path}/commands/1")).await;
    assert_eq!(
        (status, body["error_code"].clone()),
        (404, json!("FG.6004")),
        "{body}"
    );

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

    // A persistent session keeps nothing in cluster mode (the device may come back elsewhere):
    // a one-way message to it offline is refused by the node that held it and by the others.
    let device =
        connect_persistent(cluster.node(2).mqtt, &credentials(&pk, "lamp-01", &secret)).await;
    one.wait_device(&pk, "lamp-01", "online at node 2", online_at(2))
        .await;
    drop(device);
    one.wait_device(&pk, "lamp-01", "offline", |d| d["online"] == false)
        .await;
    for node in [1, 2] {
        let (status, body) = cluster
            .node(node)
            .api()
            .post(
                &format!("{path}/messages"),
                json!({"topic": format!("/{pk}/lamp-01/user/get"), "payload": "later", "qos": 1}),
            )
            .await;
        assert_eq!(
            (status, body["error_code"].clone()),
            (409, json!("FG.6001")),
            "node {node}: {body}"
        );
    }
}

/// `thing.event.property.post` of `params` as device `dn` of `pk`, QoS 1.
async fn post_properties(client: &rumqttc::AsyncClient, pk: &str, dn: &str, params: Value) {
    let body = json!({"id": "1", "version": "1.0", "params": params,
        "method": "thing.event.property.post"});
    client
        .publish(
            format!("/sys/{pk}/{dn}/thing/event/property/post"),
            rumqttc::QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&body).unwrap(),
        )
        .await
        .unwrap();
}

/// The latest properties: every node shows what a device posted, whichever node it posted
/// through, and a device that posts through another node later keeps what it posted before
/// (docs/COMMANDS.md, "Latest properties").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_shows_the_latest_properties_of_a_device_that_moved() {
    let cluster = Cluster::start(3).await;
    let one = cluster.node(1).api();
    let pk = one.create_product("props").await;
    let secret = one.create_device(&pk, "meter-01").await;
    let creds = credentials(&pk, "meter-01", &secret);
    let path = format!("/api/v1/products/{pk}/devices/meter-01/properties");
    // The flush interval (1 s by default) and a busy machine.
    let within = Duration::from_secs(10);

    let device = connect(cluster.node(1).mqtt, &creds).await;
    one.wait_device(&pk, "meter-01", "online at node 1", online_at(1))
        .await;
    post_properties(
        &device.client,
        &pk,
        "meter-01",
        json!({"Temp": {"value": 21.5, "time": 1_765_000_000_000u64}}),
    )
    .await;
    for node in [1, 2, 3] {
        let api = cluster.node(node).api();
        let v = wait_for(&api, &path, "Temp shown", within, |v| {
            v["properties"]["Temp"]["value"] == 21.5
        })
        .await;
        assert_eq!(v["properties"]["Temp"]["time"], 1_765_000_000_000u64, "{v}");
    }

    // Through node 2 now (its memory never saw Temp): a different property.
    device.client.disconnect().await.unwrap();
    drop(device);
    let device = connect(cluster.node(2).mqtt, &creds).await;
    one.wait_device(&pk, "meter-01", "online at node 2", online_at(2))
        .await;
    post_properties(&device.client, &pk, "meter-01", json!({"Power": "on"})).await;
    for node in [1, 2, 3] {
        let api = cluster.node(node).api();
        wait_for(&api, &path, "Power shown", within, |v| {
            v["properties"]["Power"]["value"] == "on"
        })
        .await;
    }
    // Node 2's flush has written its document by now (node 1 and 3 show Power): Temp is
    // still there, on every node.
    for node in [1, 2, 3] {
        let (status, v) = cluster.node(node).api().get(&path).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["properties"]["Temp"]["value"], 21.5, "node {node}: {v}");
        assert_eq!(v["properties"]["Power"]["value"], "on", "node {node}: {v}");
    }
}

/// How long a node may take to show what another node wrote. The write's answer already
/// waited for every node to apply it (settle); this only absorbs a busy machine.
const FOLLOW: Duration = Duration::from_secs(3);

/// Polls `check` on node `node` until it holds, at most [`FOLLOW`].
async fn within_follow<F, Fut>(node: u16, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (bool, Value)>,
{
    let deadline = tokio::time::Instant::now() + FOLLOW;
    loop {
        let (done, seen) = check().await;
        if done {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {node} does not {what}: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The group ids node `api` lists for instance `default`, and the body it answered.
async fn group_ids(api: &Api) -> (Vec<String>, Value) {
    let (status, body) = api
        .get("/api/v1/instances/default/consumer-groups?page_size=100")
        .await;
    assert_eq!(status, 200, "{body}");
    let ids = body["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|g| g["group_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    (ids, body)
}

/// Consumer groups and forwarding rate limits are documents every node keeps in memory and
/// follows on the change feed: a group created through node 1 is listed by nodes 2 and 3, a
/// rate limit set through node 2 is the one in force on node 1, and a group deleted through
/// node 3 is gone from node 1 (docs/CLUSTER.md, "Documents").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groups_and_rate_limits_written_through_one_node_hold_on_every_node() {
    let cluster = Cluster::start(3).await;
    let api = |id: u16| cluster.node(id).api();
    let (status, body) = api(1)
        .post(
            "/api/v1/instances/default/consumer-groups",
            json!({"group_id": "everywhere", "name": "everywhere"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    for node in [2, 3] {
        within_follow(
            node,
            "list the group created through node 1",
            move || async move {
                let (ids, body) = group_ids(&api(node)).await;
                (ids == ["everywhere"], body)
            },
        )
        .await;
    }

    let (status, body) = api(2)
        .call(
            reqwest::Method::PUT,
            "/api/v1/instances/default/forwarding/rate-limit",
            Some(json!({"msgs_per_sec": 7, "bytes_per_sec": 4096})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    within_follow(
        1,
        "run with the rate limit set through node 2",
        move || async move {
            let (status, body) = api(1)
                .get("/api/v1/instances/default/forwarding/rate-limit")
                .await;
            let done = status == 200
                && body["msgs_per_sec"] == 7
                && body["bytes_per_sec"] == 4096
                && body["source"] == "instance";
            (done, body)
        },
    )
    .await;

    let (status, body) = api(3)
        .call(
            reqwest::Method::DELETE,
            "/api/v1/instances/default/consumer-groups/everywhere",
            None,
        )
        .await;
    assert_eq!(status, 204, "{body}");
    within_follow(
        1,
        "forget the group deleted through node 3",
        move || async move {
            let (ids, body) = group_ids(&api(1)).await;
            (ids.is_empty(), body)
        },
    )
    .await;
    // And the id is free everywhere: created again through node 2, listed by node 3.
    let (status, body) = api(2)
        .post(
            "/api/v1/instances/default/consumer-groups",
            json!({"group_id": "everywhere", "name": "again"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    within_follow(
        3,
        "list the group created again through node 2",
        move || async move {
            let (ids, body) = group_ids(&api(3)).await;
            (ids == ["everywhere"], body)
        },
    )
    .await;
}

/// Whether `queue` exists in RabbitMQ (a passive declare on a channel of its own: a missing
/// queue closes it).
async fn queue_exists(rabbit: &lapin::Connection, queue: &str) -> bool {
    let ch = rabbit.create_channel().await.expect("AMQP channel");
    let exists = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .is_ok();
    if ch.status().connected() {
        let _ = ch.close(200, "done".into()).await;
    }
    exists
}

/// The node that drains the shared outbox declares the queue of a consumer group created
/// through another node, and deletes it once the group is deleted there — here the other node
/// cannot reach RabbitMQ at all, so nobody else would.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_drain_holder_declares_and_deletes_the_queues_of_groups_written_elsewhere() {
    let amqp = amqp_url().await;
    let prefix = unique("fgf");
    let with = |url: &str| NodeOptions {
        config: Some(format!("[amqp]\nexchange_prefix = \"{prefix}\"\n")),
        env: vec![("FLEETGATE_AMQP_URL".into(), url.into())],
    };
    let db = Database::fresh().await;
    let name = unique("t");
    let first = Node::start_with(1, &db, &name, &with(&amqp));
    let mut cluster = Cluster {
        nodes: vec![first],
        db,
    };
    assert_eq!(drain_holder(&cluster).await, 1);
    // Nothing listens on port 1: node 2 never reaches RabbitMQ (and cannot take the lease
    // node 1 holds).
    let second = Node::start_with(
        2,
        &cluster.db,
        &name,
        &with("amqp://guest:guest@127.0.0.1:1/%2f"),
    );
    cluster.nodes.push(second);
    cluster.wait_members(2).await;
    let rabbit = lapin::Connection::connect(&amqp, lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let queue = format!("{prefix}.default.elsewhere");
    assert!(!queue_exists(&rabbit, &queue).await);

    let two = cluster.node(2).api();
    let (status, body) = two
        .post(
            "/api/v1/instances/default/consumer-groups",
            json!({"group_id": "elsewhere", "name": "elsewhere"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (rabbit, queue) = (&rabbit, queue.as_str());
    within_follow(1, "declare the group's queue", move || async move {
        (queue_exists(rabbit, queue).await, Value::Null)
    })
    .await;

    let (status, body) = two
        .call(
            reqwest::Method::DELETE,
            "/api/v1/instances/default/consumer-groups/elsewhere",
            None,
        )
        .await;
    assert_eq!(status, 204, "{body}");
    within_follow(1, "delete the deleted group's queue", move || async move {
        (!queue_exists(rabbit, queue).await, Value::Null)
    })
    .await;

    let ch = rabbit.create_channel().await.unwrap();
    let _ = ch
        .exchange_delete(
            format!("{prefix}.default").as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
}
