//! What operators run against: readiness (`/readyz`, distinct from liveness `/healthz`) and
//! the Grafana dashboard in `deploy/grafana/`, whose every query must name a metric a live
//! gateway exports.

use crate::helpers::*;
use fleetgate::config::Secret;
use serde_json::Value;
use std::collections::BTreeSet;

async fn open_get(app: &TestApp, path: &str) -> (u16, Value) {
    app.request(reqwest::Method::GET, path, None, None).await
}

#[tokio::test]
async fn readyz_checks_each_part_of_a_single_node() {
    let app = spawn_app().await;
    let (s, b) = open_get(&app, "/readyz").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["ready"], true);
    assert_eq!(b["checks"]["listeners"], "ok", "{b}");
    assert_eq!(b["checks"]["store"], "ok", "{b}");
    assert_eq!(b["checks"]["amqp"], "disabled", "forwarding is off: {b}");
    assert!(b["checks"].get("cluster").is_none(), "single node: {b}");
    let (s, h) = open_get(&app, "/healthz").await;
    assert_eq!((s, &h["status"]), (200, &Value::from("ok")));
}

#[tokio::test]
async fn readyz_is_503_while_the_configured_forwarder_is_not_connected_and_healthz_stays_200() {
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = spawn_app_with(|s| {
        s.amqp.url = Some(Secret::new(format!(
            "amqp://guest:guest@127.0.0.1:{port}/%2f"
        )));
    })
    .await;
    let (s, b) = open_get(&app, "/readyz").await;
    assert_eq!(s, 503, "{b}");
    assert_eq!(b["ready"], false);
    let amqp = b["checks"]["amqp"].as_str().unwrap_or_default();
    assert!(amqp != "ok" && amqp != "disabled", "{b}");
    assert_eq!(
        b["checks"]["store"], "ok",
        "only the forwarder is missing: {b}"
    );
    let (s, _) = open_get(&app, "/healthz").await;
    assert_eq!(s, 200, "liveness does not depend on RabbitMQ");
}

#[tokio::test]
async fn readyz_is_ready_once_the_forwarder_connects() {
    let url =
        fleetgate::forwarder::testing::test_amqp_url("readyz_is_ready_once_the_forwarder_connects")
            .await;
    let prefix = format!("fgready-{:08x}", rand::random::<u32>());
    // Returns once /healthz reports the forwarder connected.
    let app = spawn_app_with_amqp(&url, &prefix).await;
    let (s, b) = open_get(&app, "/readyz").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["checks"]["amqp"], "ok", "{b}");
}

/// Metric names a PromQL expression refers to (identifiers of our families; functions,
/// label names and keywords never start with these prefixes).
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("fleetgate_") || w.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

/// Every series name the exposition can hold: the samples present, plus each declared
/// family's possible sample names (a labelled family may have no series yet).
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            } else {
                names.insert(name.to_owned());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            names.insert(line.split(['{', ' ']).next().unwrap().to_owned());
        }
    }
    names
}

#[tokio::test]
async fn the_grafana_dashboard_queries_only_exported_metrics() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/fleetgate.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("valid JSON");
    assert_eq!(dashboard["uid"], "fleetgate");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a PromQL expr per target");
            exprs.push((
                panel["title"].as_str().unwrap_or("?").to_owned(),
                expr.to_owned(),
            ));
        }
    }
    assert!(exprs.len() >= 15, "{exprs:?}");

    // A gateway with a consumer group, so that the families labelled by group (sampled from
    // RabbitMQ) have their series too.
    let url = fleetgate::forwarder::testing::test_amqp_url(
        "the_grafana_dashboard_queries_only_exported_metrics",
    )
    .await;
    let prefix = format!("fgdash-{:08x}", rand::random::<u32>());
    let app = spawn_app_with_amqp_and(&url, &prefix, |s| s.amqp.stats_interval_secs = 1).await;
    let (s, g) = app
        .post(
            "/api/v1/instances/default/consumer-groups",
            serde_json::json!({"group_id": "dash", "name": "dashboard"}),
        )
        .await;
    assert_eq!(s, 201, "{g}");
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        let text = app.metrics().await;
        if text.contains("fleetgate_forwarder_group_backlog{") {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the group's backlog was never sampled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let exported = exported_names(&text);
    let mut used = BTreeSet::new();
    for (title, expr) in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "panel {title:?}: no metric in {expr}");
        for name in names {
            assert!(
                exported.contains(&name),
                "panel {title:?} queries {name}, which the gateway does not export"
            );
            used.insert(name);
        }
    }
    // What the dashboard is for: each of these areas has a panel.
    for needle in [
        "fleetgate_connected_devices",
        "fleetgate_mqtt_connects_refused_total",
        "fleetgate_mqtt_messages_total",
        "fleetgate_store_write_seconds_bucket",
        "fleetgate_ota_tasks",
        "fleetgate_forwarder_outbox_messages",
        "fleetgate_forwarder_published_total",
    ] {
        assert!(used.contains(needle), "no panel shows {needle}");
    }

    // Clean up RabbitMQ: the group's queue (through the API), then the instance's exchange.
    let (s, _) = app
        .request(
            reqwest::Method::DELETE,
            "/api/v1/instances/default/consumer-groups/dash",
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(s, 204);
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let _ = ch
        .exchange_delete(
            format!("{prefix}.default").as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
}
