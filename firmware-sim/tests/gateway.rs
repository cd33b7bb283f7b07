//! The simulator takes the MQTT address from the gateway it provisions through (its
//! `/healthz`), and refuses an explicit one that disagrees — before creating any device.

use firmware_sim::devices;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A stand-in gateway API answering `/healthz` with `mqtt`; returns its URL and the request
/// lines it saw.
async fn stub_gateway(mqtt: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buf).to_string();
            let line = head.lines().next().unwrap_or_default().to_owned();
            log.lock().unwrap().push(line.clone());
            let (status, body) = if line.starts_with("GET /healthz ") {
                (
                    "200 OK",
                    format!(r#"{{"status":"ok","mqtt":"{mqtt}","http":"x"}}"#),
                )
            } else {
                ("500 Internal Server Error", "{}".to_owned())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    (url, seen)
}

#[tokio::test]
async fn the_mqtt_address_comes_from_the_gateways_healthz() {
    let (api, _) = stub_gateway("0.0.0.0:18883").await;
    assert_eq!(
        devices::gateway_mqtt(&api, None).await.unwrap(),
        "127.0.0.1:18883"
    );
    assert_eq!(
        devices::gateway_mqtt(&api, Some("localhost:18883"))
            .await
            .unwrap(),
        "localhost:18883"
    );
    let err = devices::gateway_mqtt(&api, Some("127.0.0.1:1883"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("0.0.0.0:18883") && err.contains("--mqtt"),
        "{err}"
    );
}

#[tokio::test]
async fn a_disagreeing_mqtt_address_is_refused_before_any_device_is_created() {
    let (api, seen) = stub_gateway("127.0.0.1:18884").await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
        .args(["--provision", "2", "--product", "a1Prod", "--api", &api])
        .args([
            "--mqtt",
            "127.0.0.1:1883",
            "--api-token",
            "t",
            "--duration",
            "1",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("127.0.0.1:18884"), "{stderr}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].starts_with("GET /healthz "), "{seen:?}");
}
