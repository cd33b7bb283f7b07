//! `/metrics` as scrapers see it: the content type matches the body (negotiated on `Accept`),
//! every family has HELP, the standard `process_*` families and `fleetgate_build_info` are
//! there, closed label sets are exported at zero from the start, and `promtool check metrics`
//! (Debian package `prometheus`) accepts the exposition of a live gateway.

use crate::helpers::*;
use std::collections::BTreeSet;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0";

/// The body and `Content-Type` of `/metrics` for an `Accept` header.
async fn scrape(app: &TestApp, accept: Option<&str>) -> (String, String) {
    let mut req = app.http.get(app.url("/metrics"));
    if let Some(a) = accept {
        req = req.header(reqwest::header::ACCEPT, a);
    }
    let resp = req.send().await.expect("GET /metrics");
    assert_eq!(resp.status(), 200);
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (content_type, resp.text().await.expect("body"))
}

/// `promtool` (`FLEETGATE_PROMTOOL`, else from `PATH`). The lint it runs is the point of the
/// test, so a machine without it fails the test rather than passing it unchecked.
fn promtool() -> std::path::PathBuf {
    let candidate = std::env::var_os("FLEETGATE_PROMTOOL").map_or_else(
        || std::path::PathBuf::from("promtool"),
        std::path::PathBuf::from,
    );
    match std::process::Command::new(&candidate)
        .arg("--version")
        .output()
    {
        Ok(o) if o.status.success() => candidate,
        _ => panic!(
            "promtool not found ({}): install it (`apt-get install prometheus`) or point \
             FLEETGATE_PROMTOOL at it",
            candidate.display()
        ),
    }
}

#[tokio::test]
async fn content_type_follows_accept() {
    let app = spawn_app().await;
    let (ct, text) = scrape(&app, None).await;
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    assert!(!text.contains("# EOF"), "0.0.4 has no EOF marker");
    assert!(
        text.contains("# TYPE fleetgate_mqtt_connects_total counter\n"),
        "a counter's family is named after its _total sample in 0.0.4:\n{text}"
    );
    assert!(
        text.contains("# TYPE fleetgate_build_info gauge\n"),
        "{text}"
    );

    let prometheus_accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (ct, text) = scrape(&app, Some(prometheus_accept)).await;
    assert!(ct.starts_with(OPENMETRICS), "{ct}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(
        text.contains("# TYPE fleetgate_mqtt_connects counter\n"),
        "{text}"
    );
    assert!(text.contains("# TYPE fleetgate_build info\n"), "{text}");
}

#[tokio::test]
async fn standard_families_and_zeros_are_there_from_the_start() {
    let app = spawn_app().await;
    let (_, text) = scrape(&app, None).await;
    let version = env!("CARGO_PKG_VERSION");
    for needle in [
        format!("fleetgate_build_info{{version=\"{version}\","),
        "process_cpu_seconds_total ".into(),
        "process_resident_memory_bytes ".into(),
        "process_open_fds ".into(),
        "process_max_fds ".into(),
        "process_start_time_seconds ".into(),
        "process_threads ".into(),
        r#"fleetgate_ota_failures_total{reason="UPDATE_FAILED"} 0"#.into(),
        r#"fleetgate_ota_failures_total{reason="TIMEOUT"} 0"#.into(),
        r#"fleetgate_mqtt_connects_refused_total{reason="bad_signature"} 0"#.into(),
        r#"fleetgate_connections_refused_total{listener="mqtt",reason="budget"} 0"#.into(),
        r#"fleetgate_forwarder_dropped_total{reason="outbox_full"} 0"#.into(),
        r#"fleetgate_ota_tasks{state="IN_PROGRESS"} 0"#.into(),
    ] {
        assert!(text.contains(&needle), "missing `{needle}` in:\n{text}");
    }
    let open_fds: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("process_open_fds "))
        .and_then(|v| v.parse().ok())
        .expect("process_open_fds value");
    assert!(open_fds >= 3.0, "a gateway holds sockets and files open");
}

#[tokio::test]
async fn every_family_has_help_and_one_type() {
    let app = spawn_app().await;
    let (_, text) = scrape(&app, None).await;
    let mut helped = BTreeSet::new();
    let mut typed = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(!help.trim().is_empty(), "empty HELP for {name}");
            assert!(helped.insert(name.to_owned()), "two HELP lines for {name}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_once(' ').expect("TYPE name type").0;
            assert!(typed.insert(name.to_owned()), "two TYPE lines for {name}");
        }
    }
    assert_eq!(
        helped, typed,
        "every family has exactly one HELP and one TYPE"
    );
    assert!(typed.len() > 40, "{typed:?}");
}

#[tokio::test]
async fn promtool_checks_a_live_exposition() {
    let promtool = promtool();
    let app = spawn_app().await;
    // Some traffic first, so labelled families carry samples beyond the prefilled zeros.
    let _ = app.get("/api/v1/products").await;
    let _ = app.get("/api/v1/no-such-thing").await;
    let (_, text) = scrape(&app, None).await;
    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
