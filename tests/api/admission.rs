//! Connection limits under attack (docs/SECURITY.md, "Limits and timeouts"): half-open HTTP
//! requests and pre-CONNECT MQTT sockets flooding from one address (127.0.0.2) are capped per
//! source and closed by their timeouts, while a device from another address (127.0.0.1)
//! connects and the API answers; and a full HTTP budget leaves MQTT alone, and the reverse.
//!
//! Limits are small and timeouts short so the tests run fast; the only waits bounded by time
//! are generous ones (a timeout of a few seconds against [`WAIT`]).

use crate::helpers::*;
use fleetgate::config::Settings;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, Packet, QoS};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The flooding address: loopback, but not the one the device and the operator use.
const FLOODER: &str = "127.0.0.2";
const HALF_OPEN_REQUEST: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n";
/// A CONNECT that announces 32 bytes and sends 4 of them.
const PARTIAL_CONNECT: &[u8] = &[0x10, 0x20, 0x00, 0x04, b'M', b'Q'];

/// A gateway with `adjust`ed settings whose operator client opens a connection per request:
/// the tests count the gateway's connections, so none may linger in a client pool.
async fn spawn_limited(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let mut app = spawn_app_with(adjust).await;
    app.http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    app
}

async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.expect("TCP connect")
}

/// Reads until the gateway closes the socket (end of stream or reset); what it sent first.
async fn closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("socket not closed within {WAIT:?}"),
        }
    }
}

/// Open and silent: the gateway neither closed it nor answered.
fn still_open(s: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// A sample of the gateway's metrics, read in-process (the HTTP side may be what is full).
fn sample(app: &TestApp, name: &str) -> f64 {
    app.app()
        .metrics()
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn wait_sample(app: &TestApp, name: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = sample(app, name);
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} is {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The device connects (CONNACK accepted) and one QoS 1 report is acknowledged.
async fn device_works(app: &TestApp, pk: &str, dn: &str, secret: &str) -> Device {
    let mut dev = connect(app.mqtt_addr(), &credentials(pk, dn, secret)).await;
    dev.client
        .publish(
            format!("/ota/device/inform/{pk}/{dn}"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":1,"params":{"version":"1.0.0"}}"#,
        )
        .await
        .unwrap();
    dev.wait_packet("PUBACK", |p| matches!(p, Packet::PubAck(_)))
        .await;
    dev
}

#[tokio::test]
async fn half_open_http_flood_is_capped_per_source_and_timed_out_while_devices_and_api_work() {
    let app = spawn_limited(|s| {
        s.http.header_read_timeout_secs = 5;
        s.http.max_connections_per_ip = Some(20);
    })
    .await;
    let pk = app.create_product("flood").await;
    let secret = app.create_device(&pk, "dev-1").await;
    let http = app.app().http_addr();

    let mut flood = Vec::new();
    for _ in 0..60 {
        let mut s = connect_from(FLOODER, http).await;
        // Unanswered or refused, the write itself succeeds (the request is never finished).
        let _ = s.write_all(HALF_OPEN_REQUEST).await;
        flood.push(s);
    }
    // Beyond the per-source cap: closed at once (a 503 when the socket still takes it).
    for s in &mut flood[20..] {
        let got = closed(s).await;
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 503"),
            "{}",
            String::from_utf8_lossy(&got)
        );
    }
    assert_eq!(
        sample(
            &app,
            r#"fleetgate_connections_refused_total{listener="http",reason="per_ip"}"#
        ),
        40.0
    );
    // Meanwhile a device from another address connects and the API answers.
    let _dev = device_works(&app, &pk, "dev-1", &secret).await;
    let d = app.device(&pk, "dev-1").await;
    assert_eq!(d["online"], true, "{d}");
    // The capped ones were held all along, unanswered...
    for s in &flood[..20] {
        assert!(
            still_open(s),
            "a request within the cap is held until its timeout"
        );
    }
    // ...until the header timeout closed them.
    for s in &mut flood[..20] {
        closed(s).await;
    }
    wait_sample(
        &app,
        r#"fleetgate_http_timeouts_total{kind="header"}"#,
        20.0,
    )
    .await;
    wait_sample(&app, r#"fleetgate_connections_open{listener="http"}"#, 0.0).await;
    // The source may connect again, and a complete request is served.
    let mut again = connect_from(FLOODER, http).await;
    again
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let got = closed(&mut again).await;
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

#[tokio::test]
async fn pre_connect_mqtt_flood_is_capped_per_source_and_timed_out_while_devices_and_api_work() {
    let app = spawn_limited(|s| {
        s.mqtt.connect_timeout_secs = 5;
        s.mqtt.connect_timeout_under_pressure_secs = 5;
        s.mqtt.max_unauthenticated_per_ip = Some(20);
    })
    .await;
    let pk = app.create_product("flood").await;
    let secret = app.create_device(&pk, "dev-1").await;

    let mut flood = Vec::new();
    for i in 0..60 {
        let mut s = connect_from(FLOODER, app.mqtt_addr()).await;
        // Half send nothing, half a CONNECT that never completes.
        if i % 2 == 1 {
            let _ = s.write_all(PARTIAL_CONNECT).await;
        }
        flood.push(s);
    }
    for s in &mut flood[20..] {
        assert!(closed(s).await.is_empty(), "refused without a word");
    }
    assert_eq!(
        sample(
            &app,
            r#"fleetgate_connections_refused_total{listener="mqtt",reason="per_ip"}"#
        ),
        40.0
    );
    assert_eq!(
        sample(&app, "fleetgate_mqtt_unauthenticated_connections"),
        20.0
    );
    // A device from another address connects (and leaves the unauthenticated count once it
    // has), and the API answers.
    let _dev = device_works(&app, &pk, "dev-1", &secret).await;
    let d = app.device(&pk, "dev-1").await;
    assert_eq!(d["online"], true, "{d}");
    assert_eq!(
        sample(&app, "fleetgate_mqtt_unauthenticated_connections"),
        20.0
    );
    for s in &flood[..20] {
        assert!(
            still_open(s),
            "a socket within the cap is held until its timeout"
        );
    }
    // The CONNECT timeout closes the held ones.
    for s in &mut flood[..20] {
        assert!(closed(s).await.is_empty());
    }
    wait_sample(
        &app,
        r#"fleetgate_mqtt_connects_refused_total{reason="timeout"}"#,
        20.0,
    )
    .await;
    wait_sample(&app, "fleetgate_mqtt_unauthenticated_connections", 0.0).await;
    // Only the device's socket is left.
    wait_sample(&app, r#"fleetgate_connections_open{listener="mqtt"}"#, 1.0).await;
}

#[tokio::test]
async fn pre_connect_pressure_shortens_the_connect_timeout_of_new_sockets() {
    let app = spawn_limited(|s| {
        s.mqtt.connect_timeout_secs = 60;
        s.mqtt.connect_timeout_under_pressure_secs = 1;
        s.mqtt.pressure_unauthenticated = Some(5);
    })
    .await;
    let pk = app.create_product("pressure").await;
    let secret = app.create_device(&pk, "dev-1").await;

    let mut early = Vec::new();
    for _ in 0..4 {
        early.push(connect_from(FLOODER, app.mqtt_addr()).await);
    }
    wait_sample(&app, "fleetgate_mqtt_unauthenticated_connections", 4.0).await;
    // From the fifth waiting socket on, the pressure timeout (1 s) applies.
    let mut late = Vec::new();
    for _ in 0..6 {
        late.push(connect_from(FLOODER, app.mqtt_addr()).await);
    }
    for s in &mut late {
        assert!(closed(s).await.is_empty());
    }
    for s in &early {
        assert!(
            still_open(s),
            "sockets accepted before the pressure keep their 60 s"
        );
    }
    assert_eq!(
        sample(&app, "fleetgate_mqtt_connect_timeout_shortened_total"),
        6.0
    );
    // A device has its CONNECT in well within the short timeout.
    device_works(&app, &pk, "dev-1", &secret).await;
}

#[tokio::test]
async fn a_full_http_budget_leaves_mqtt_alone_and_a_full_mqtt_budget_leaves_http_alone() {
    let app = spawn_limited(|s| {
        s.http.max_connections = Some(10);
        s.mqtt.max_sockets = Some(10);
        // Only the budgets apply here: no per-source cap, no timeout, no pressure in the way.
        s.http.max_connections_per_ip = Some(1000);
        s.mqtt.max_unauthenticated_per_ip = Some(1000);
        s.http.header_read_timeout_secs = 600;
        s.mqtt.connect_timeout_secs = 600;
        s.mqtt.pressure_unauthenticated = Some(1000);
    })
    .await;
    assert_eq!(
        (
            app.app().budgets().http_connections,
            app.app().budgets().mqtt_sockets
        ),
        (10, 10)
    );
    let pk = app.create_product("budgets").await;
    let secret = app.create_device(&pk, "dev-1").await;
    let http = app.app().http_addr();
    wait_sample(&app, r#"fleetgate_connections_open{listener="http"}"#, 0.0).await;

    // HTTP full...
    let mut http_flood = Vec::new();
    for _ in 0..10 {
        http_flood.push(connect_from(FLOODER, http).await);
    }
    wait_sample(&app, r#"fleetgate_connections_open{listener="http"}"#, 10.0).await;
    let mut refused = connect_from("127.0.0.3", http).await;
    let got = closed(&mut refused).await;
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(
        sample(
            &app,
            r#"fleetgate_connections_refused_total{listener="http",reason="budget"}"#
        ),
        1.0
    );
    // ...and devices connect and publish all the same.
    let dev = device_works(&app, &pk, "dev-1", &secret).await;
    dev.client.disconnect().await.unwrap();
    drop(dev);
    drop(http_flood);
    wait_sample(&app, r#"fleetgate_connections_open{listener="http"}"#, 0.0).await;
    wait_sample(&app, r#"fleetgate_connections_open{listener="mqtt"}"#, 0.0).await;

    // MQTT full...
    let mut mqtt_flood = Vec::new();
    for _ in 0..10 {
        mqtt_flood.push(connect_from(FLOODER, app.mqtt_addr()).await);
    }
    wait_sample(&app, r#"fleetgate_connections_open{listener="mqtt"}"#, 10.0).await;
    // A device is turned away before its CONNECT is read.
    let (_client, mut eventloop) = AsyncClient::new(
        options(app.mqtt_addr(), &credentials(&pk, "dev-1", &secret)),
        8,
    );
    match tokio::time::timeout(WAIT, eventloop.poll()).await {
        Ok(Err(_)) => {}
        Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
            assert_ne!(ack.code, ConnectReturnCode::Success, "device let in")
        }
        other => panic!("expected the connection closed, got {other:?}"),
    }
    assert!(
        sample(
            &app,
            r#"fleetgate_connections_refused_total{listener="mqtt",reason="budget"}"#
        ) >= 1.0
    );
    // ...and the API answers all the same.
    let (status, body) = app.get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    let d = app.device(&pk, "dev-1").await;
    assert_eq!(d["versions"]["default"], "1.0.0", "{d}");
    drop(mqtt_flood);
    wait_sample(&app, r#"fleetgate_connections_open{listener="mqtt"}"#, 0.0).await;
    device_works(&app, &pk, "dev-1", &secret).await;
}

#[tokio::test]
async fn http_timeouts_end_stalled_bodies_stalled_readers_and_idle_connections() {
    let app = spawn_limited(|s| {
        s.http.header_read_timeout_secs = 2;
        s.http.body_read_timeout_secs = 1;
        s.http.write_timeout_secs = 1;
    })
    .await;
    let http = app.app().http_addr();

    // A body that stops after 10 of its 100 bytes: the request fails and the connection closes.
    let mut s = connect_from(FLOODER, http).await;
    let head = format!(
        "POST /api/v1/products HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\":"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let got = closed(&mut s).await;
    assert!(
        got.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    wait_sample(&app, r#"fleetgate_http_timeouts_total{kind="body"}"#, 1.0).await;
    let (_, products) = app.get("/api/v1/products").await;
    assert_eq!(products["total"], 0, "nothing was created: {products}");

    // A download whose client stops reading: the stalled write closes the connection. The
    // response is larger than what the kernel buffers on both sides of a loopback socket.
    let pk = app.create_product("fw").await;
    let data = vec![0x5a_u8; 12 * 1024 * 1024];
    let form = reqwest::multipart::Form::new()
        .text("product_key", pk)
        .text("version", "2.0.0")
        .part(
            "file",
            reqwest::multipart::Part::bytes(data).file_name("fw.bin"),
        );
    let resp = app
        .http
        .post(app.url("/api/v1/firmware"))
        .bearer_auth(ADMIN_TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let fid = resp.json::<serde_json::Value>().await.unwrap()["firmware_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let repo = app.app().firmware().clone();
    let push = repo.upgrade_data(&repo.get(&fid).unwrap(), Duration::from_secs(600));
    let path = push.url.splitn(4, '/').nth(3).unwrap().to_owned();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(http).await.unwrap();
    s.write_all(format!("GET /{path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    wait_sample(&app, r#"fleetgate_http_timeouts_total{kind="write"}"#, 1.0).await;
    let got = closed(&mut s).await;
    assert!(got.len() < 12 * 1024 * 1024, "the download did not finish");

    // A keep-alive connection that goes quiet after its request is closed as idle.
    let mut s = connect_from(FLOODER, http).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = closed(&mut s).await;
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    wait_sample(&app, r#"fleetgate_http_timeouts_total{kind="idle"}"#, 1.0).await;
    assert_eq!(
        sample(&app, r#"fleetgate_http_timeouts_total{kind="header"}"#),
        0.0,
        "a connection that served a request is not counted as a header timeout"
    );
}

/// HAProxy's address in front of the API (`http.proxy_trusted`).
const BALANCER: &str = "127.0.0.3";

/// A PROXY v2 header naming `client` (HAProxy's `send-proxy-v2`).
fn proxy_v2(client: &str) -> Vec<u8> {
    use ppp::v2;
    let client: SocketAddr = client.parse().unwrap();
    v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (client, "10.0.0.1:8080".parse::<SocketAddr>().unwrap()),
    )
    .build()
    .unwrap()
}

#[tokio::test]
async fn behind_an_http_balancer_the_per_source_cap_counts_each_client() {
    let app = spawn_limited(|s| {
        s.http.proxy_protocol = fleetgate::proxy_protocol::ProxyMode::Trusted;
        s.http.proxy_trusted = vec![BALANCER.parse().unwrap()];
        s.http.max_connections_per_ip = Some(2);
    })
    .await;
    let http = app.app().http_addr();
    let flooder = "198.51.100.66";

    // Two half-open requests of one client through the balancer fill its cap...
    let mut flood = Vec::new();
    for port in [1, 2] {
        let mut s = connect_from(BALANCER, http).await;
        s.write_all(
            &[
                proxy_v2(&format!("{flooder}:{port}")),
                HALF_OPEN_REQUEST.to_vec(),
            ]
            .concat(),
        )
        .await
        .unwrap();
        flood.push(s);
    }
    wait_sample(&app, r#"fleetgate_connections_open{listener="http"}"#, 2.0).await;
    // ...so its third is refused,
    let mut third = connect_from(BALANCER, http).await;
    let _ = third
        .write_all(
            &[
                proxy_v2(&format!("{flooder}:3")),
                HALF_OPEN_REQUEST.to_vec(),
            ]
            .concat(),
        )
        .await;
    let got = closed(&mut third).await;
    assert!(
        got.starts_with(b"HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(
        sample(
            &app,
            r#"fleetgate_connections_refused_total{listener="http",reason="per_ip"}"#
        ),
        1.0
    );
    // ...while other clients of the same balancer are served (more than two connections from
    // its own address), and so is the operator straight from 127.0.0.1.
    for client in ["198.51.100.7:1", "198.51.100.8:1"] {
        let mut s = connect_from(BALANCER, http).await;
        s.write_all(
            &[
                proxy_v2(client),
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            ]
            .concat(),
        )
        .await
        .unwrap();
        let got = closed(&mut s).await;
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
    }
    app.create_product("behind-a-balancer").await;
    // A header from an address that is not the balancer's is not believed: not HTTP.
    let mut forged = connect_from(FLOODER, http).await;
    let _ = forged
        .write_all(
            &[
                proxy_v2("198.51.100.9:1"),
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            ]
            .concat(),
        )
        .await;
    let got = closed(&mut forged).await;
    assert!(
        !got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    drop(flood);
}
