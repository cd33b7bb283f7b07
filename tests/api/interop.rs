//! Interoperability with the vendor's own device SDK (`aliyun-iot-linkkit` from PyPI): it signs
//! its own CONNECT, reports a version and posts a property, and the gateway sees all three.
//!
//! Needs a Python with the SDK: `FLEETGATE_INTEROP_PYTHON` (set by `.ci/run`, which builds the
//! venv), else `tests/interop/.venv/bin/python` if it exists. Without one the test is skipped
//! with a message in a plain local run, and fails under CI (`CI` set).

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

#[tokio::test]
async fn vendor_python_sdk_connects_reports_and_posts() {
    let Some(python) = interop_python() else {
        if std::env::var_os("CI").is_some() {
            panic!("CI: no Python with aliyun-iot-linkkit (FLEETGATE_INTEROP_PYTHON unset and no tests/interop/.venv)");
        }
        eprintln!(
            "SKIPPED vendor_python_sdk_connects_reports_and_posts: create tests/interop/.venv \
             (python3 -m venv tests/interop/.venv && tests/interop/.venv/bin/pip install -r tests/interop/requirements.txt)"
        );
        return;
    };
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
