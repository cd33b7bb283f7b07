//! Interoperability with the vendor's own device SDK (`aliyun-iot-linkkit` from PyPI): it signs
//! its own CONNECT, reports a version and posts a property, and the gateway sees all three.
//!
//! Needs a Python with the SDK: `FLEETGATE_INTEROP_PYTHON` (set by `.ci/run`, which builds the
//! venv), else `tests/interop/.venv/bin/python` if it exists. Without one the tests fail with
//! the commands that create it (locally as in CI: a run that did not check must not pass).

use crate::helpers::*;
use std::path::PathBuf;
use std::process::Stdio;

fn interop_python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("FLEETGATE_INTEROP_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/.venv/bin/python");
    venv.exists().then_some(venv)
}

/// The interpreter to run. Without one the test fails with the commands that make one: a run
/// without the vendor SDK has not checked interoperability, so it must not report it passed.
fn interop_python_for(test: &str) -> PathBuf {
    interop_python().unwrap_or_else(|| {
        panic!(
            "{test}: no Python with aliyun-iot-linkkit: create tests/interop/.venv \
             (python3 -m venv tests/interop/.venv && tests/interop/.venv/bin/pip install -r tests/interop/requirements.txt) \
             or set FLEETGATE_INTEROP_PYTHON"
        )
    })
}

#[tokio::test]
async fn vendor_python_sdk_connects_reports_and_posts() {
    let python = interop_python_for("vendor_python_sdk_connects_reports_and_posts");
    let app = spawn_app().await;
    let pk = app.create_product("linkkit").await;
    let secret = app.create_device(&pk, "py-dev-1").await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/linkkit_device.py");
    let addr = app.mqtt_addr();
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::process::Command::new(&python)
            .arg(&script)
            .args([
                "127.0.0.1",
                &addr.port().to_string(),
                &pk,
                "py-dev-1",
                &secret,
                "4.5.6",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output(),
    )
    .await
    .expect("SDK script finished in time")
    .expect("SDK script runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK script failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains(r#""step": "property_post_reply", "code": 200"#),
        "{stdout}"
    );

    let d = app
        .wait_device(&pk, "py-dev-1", "the SDK's version", |d| {
            d["versions"]["default"] == "4.5.6"
        })
        .await;
    assert!(d["last_seen_ms"].as_i64().unwrap_or(0) > 0, "{d}");
    let m = app.metrics().await;
    assert!(
        m.contains(r#"fleetgate_mqtt_messages_total{kind="property_post"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn vendor_python_sdk_takes_an_ota_update() {
    let python = interop_python_for("vendor_python_sdk_takes_an_ota_update");
    let app = spawn_app().await;
    let pk = app.create_product("linkkit-ota").await;
    let secret = app.create_device(&pk, "py-ota-1").await;
    // A real multipart upload, as an operator does it.
    let image: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(image.clone()).file_name("fw.bin"),
        )
        .text("product_key", pk.clone())
        .text("version", "2.0.0")
        .text("sign_method", "SHA256");
    let resp = app
        .http
        .post(app.url("/api/v1/firmware"))
        .bearer_auth(ADMIN_TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let fw: serde_json::Value = resp.json().await.unwrap();
    let fid = fw["firmware_id"].as_str().unwrap().to_owned();
    let (status, job) = app
        .post(
            "/api/v1/ota/jobs",
            serde_json::json!({"firmware_id": fid, "target": "SPECIFIC", "device_names": ["py-ota-1"],
                               "force": true, "timeout_seconds": 120}),
        )
        .await;
    assert_eq!(status, 201, "{job}");
    let jid = job["job_id"].as_str().unwrap().to_owned();

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/linkkit_ota.py");
    let port = app.mqtt_addr().port().to_string();
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(90),
        tokio::process::Command::new(&python)
            .arg(&script)
            .args(["127.0.0.1", &port, &pk, "py-ota-1", &secret, "1.0.0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output(),
    )
    .await
    .expect("SDK script finished in time")
    .expect("SDK script runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (_, task) = app
        .get(&format!("/api/v1/ota/jobs/{jid}/tasks/py-ota-1"))
        .await;
    assert!(
        out.status.success(),
        "task {task}\nSDK OTA script failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains(r#""step": "downloaded", "rc": "ErrorCode.SUCCESS", "bytes": 300000"#),
        "{stdout}"
    );

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, task) = app
            .get(&format!("/api/v1/ota/jobs/{jid}/tasks/py-ota-1"))
            .await;
        if task["status"] == "SUCCEEDED" || task["state"] == "SUCCEEDED" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "task never SUCCEEDED: {task}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let d = app.device(&pk, "py-ota-1").await;
    assert_eq!(d["versions"]["default"], "2.0.0", "{d}");
}

/// Runs `tests/interop/pika_consumer.py` on `queue` until it has `count` distinct messages
/// (30 s at most); fails the test when it does not. Its JSON lines, and its output for messages.
async fn pika_consume(
    python: &std::path::Path,
    url: &str,
    queue: &str,
    count: usize,
) -> (Vec<serde_json::Value>, String) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/pika_consumer.py");
    let count = count.to_string();
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::process::Command::new(python)
            .arg(&script)
            .args([url, queue, count.as_str(), "30"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output(),
    )
    .await
    .expect("pika consumer finished in time")
    .expect("pika consumer runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pika consumer failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (lines, stdout)
}

/// A consumer app written for the vendor's server-side subscription (pika, Python) reads a
/// fleetgate consumer group: `topic`, `messageId`, `generateTime` headers, JSON bodies.
#[tokio::test]
async fn vendor_style_pika_consumer_reads_the_forwarded_stream() {
    let python = interop_python_for("vendor_style_pika_consumer_reads_the_forwarded_stream");
    let url = fleetgate::forwarder::testing::test_amqp_url("vendor_style_pika_consumer").await;
    let prefix = format!("fgtest-pika-{}", std::process::id());
    let app = spawn_app_with_amqp(&url, &prefix).await;
    let (status, group) = app
        .post(
            "/api/v1/instances/default/consumer-groups",
            serde_json::json!({"group_id": "pika", "name": "python consumers"}),
        )
        .await;
    assert_eq!(status, 201, "{group}");
    // The group's queue exists once the forwarder is connected and has declared it.
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.get("/healthz").await.1["amqp"] != "connected" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "forwarder never connected"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let pk = app.create_product("pika").await;
    let secret = app.create_device(&pk, "pika-0001").await;
    let mut dev = connect(app.mqtt_addr(), &credentials(&pk, "pika-0001", &secret)).await;
    for i in 0..5 {
        dev.client
            .publish(
                format!("/sys/{pk}/pika-0001/thing/event/property/post"),
                rumqttc::QoS::AtLeastOnce,
                false,
                format!(r#"{{"id":"{i}","params":{{"Temp":{}}}}}"#, 20 + i),
            )
            .await
            .unwrap();
        dev.wait_packet("PUBACK", |p| matches!(p, rumqttc::Packet::PubAck(_)))
            .await;
    }

    let (lines, stdout) = pika_consume(&python, &url, &format!("{prefix}.default.pika"), 6).await;
    assert_eq!(lines.len(), 6, "{stdout}");
    assert_eq!(lines[0]["topic"], format!("/as/mqtt/status/{pk}/pika-0001"));
    assert_eq!(lines[0]["body"]["status"], "online");
    for (i, m) in lines[1..].iter().enumerate() {
        assert_eq!(
            m["topic"],
            format!("/{pk}/pika-0001/thing/event/property/post")
        );
        assert_eq!(m["body"]["items"]["Temp"]["value"], 20 + i as i64, "{m}");
        assert_eq!(m["body"]["deviceName"], "pika-0001");
        assert!(
            m["generateTime"].as_i64().unwrap() > 1_600_000_000_000,
            "{m}"
        );
        assert_eq!(m["messageId"], m["amqpMessageId"], "{m}");
        assert_eq!(m["deliveryMode"], 2);
        assert_eq!(m["contentType"], "application/json");
    }
    let _ = app
        .request(
            reqwest::Method::DELETE,
            "/api/v1/instances/default/consumer-groups/pika",
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
}

/// The vendor's SDK as the target of cloud-to-device commands: a property set, a synchronous
/// service call and an RRPC request reach it and are answered through its own callbacks; the
/// API shows the SDK's answers, and a consumer application written with pika reads the two
/// answers from its consumer group in the vendor's `downlink/reply` format.
#[tokio::test]
async fn vendor_python_sdk_answers_commands() {
    use serde_json::json;
    use tokio::io::AsyncBufReadExt;

    let python = interop_python_for("vendor_python_sdk_answers_commands");
    let url =
        fleetgate::forwarder::testing::test_amqp_url("vendor_python_sdk_answers_commands").await;
    let prefix = format!("fgtest-c2d-pika-{}", std::process::id());
    let app = spawn_app_with_amqp(&url, &prefix).await;
    let (status, group) = app
        .post(
            "/api/v1/instances/default/consumer-groups",
            json!({"group_id": "apps", "name": "reply readers"}),
        )
        .await;
    assert_eq!(status, 201, "{group}");
    let pk = app.create_product("linkkit-c2d").await;
    let secret = app.create_device(&pk, "py-dev-2").await;
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/linkkit_commands.py");
    let port = app.mqtt_addr().port().to_string();
    let mut child = tokio::process::Command::new(&python)
        .arg(&script)
        .args(["127.0.0.1", &port, &pk, "py-dev-2", &secret])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("SDK script runs");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut transcript = String::new();
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            transcript.push_str(&line);
            transcript.push('\n');
            if line.contains(r#""step": "ready""#) {
                return;
            }
        }
        panic!("SDK script ended before it was ready:\n{transcript}");
    })
    .await
    .expect("SDK ready in time");

    let base = format!("/api/v1/products/{pk}/devices/py-dev-2");
    let (status, record) = app
        .request(
            reqwest::Method::PUT,
            &format!("{base}/properties"),
            Some(json!({"params": {"LightSwitch": 1}, "timeout_ms": 5000})),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["reply"]["code"], 200, "{record}");
    let set_id = record["id"].as_str().unwrap().to_owned();
    let (status, record) = app
        .post(
            &format!("{base}/services/reboot"),
            json!({"params": {"delay": 3}, "timeout_ms": 5000}),
        )
        .await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["reply"]["code"], 200, "{record}");
    assert_eq!(record["reply"]["data"], json!({"accepted": 3}), "{record}");
    let call_id = record["id"].as_str().unwrap().to_owned();
    let (status, body) = app
        .post(
            &format!("{base}/rrpc"),
            json!({"payload": "ping", "timeout_ms": 5000}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["payload_text"], "pong:ping", "{body}");

    let rest = tokio::time::timeout(std::time::Duration::from_secs(40), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            transcript.push_str(&line);
            transcript.push('\n');
        }
        child.wait().await.unwrap()
    })
    .await
    .expect("SDK script finished in time");
    assert!(rest.success(), "SDK script failed:\n{transcript}");
    assert!(
        transcript.contains(r#""step": "property_set", "params": {"LightSwitch": 1}"#),
        "{transcript}"
    );
    assert!(
        transcript.contains(r#""identifier": "reboot""#),
        "{transcript}"
    );

    // The group's first three messages: the device online, then the two answers, in order.
    let (lines, stdout) = pika_consume(&python, &url, &format!("{prefix}.default.apps"), 3).await;
    assert_eq!(lines.len(), 3, "{stdout}");
    assert_eq!(lines[0]["topic"], format!("/as/mqtt/status/{pk}/py-dev-2"));
    let reply_topic = format!("/{pk}/py-dev-2/thing/downlink/reply/message");
    for (line, (id, method_topic)) in lines[1..].iter().zip([
        (
            &set_id,
            format!("/sys/{pk}/py-dev-2/thing/service/property/set"),
        ),
        (&call_id, format!("/sys/{pk}/py-dev-2/thing/service/reboot")),
    ]) {
        assert_eq!(line["topic"], reply_topic, "{stdout}");
        let body = &line["body"];
        assert_eq!(body["requestId"], json!(id), "{stdout}");
        assert_eq!(body["code"], 200, "{stdout}");
        assert_eq!(body["productKey"], pk, "{stdout}");
        assert_eq!(body["deviceName"], "py-dev-2", "{stdout}");
        assert_eq!(body["topic"], method_topic, "{stdout}");
        assert!(body["gmtCreate"].is_u64(), "{stdout}");
    }
    let _ = app
        .request(
            reqwest::Method::DELETE,
            "/api/v1/instances/default/consumer-groups/apps",
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
}
