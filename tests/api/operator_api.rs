//! The operator API as a client sees it over real HTTP: auth, the error body, paging, batch
//! create with per-row results, and that a disabled device is disconnected.

use crate::helpers::*;
use reqwest::Method;
use serde_json::{json, Value};

fn assert_error_body(body: &Value, code_prefix: &str) {
    assert!(
        body["error_code"]
            .as_str()
            .unwrap_or("")
            .starts_with(code_prefix),
        "{body}"
    );
    assert!(
        body["error_msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(body.get("error_ext_msg").is_some(), "{body}");
    assert!(
        body["request_id"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn auth_is_required_and_roles_are_enforced() {
    let app = spawn_app().await;
    let (s, body) = app
        .request(Method::GET, "/api/v1/products", None, None)
        .await;
    assert_eq!(s, 401);
    assert_error_body(&body, "FG.");
    let (s, _) = app
        .request(
            Method::GET,
            "/api/v1/products",
            None,
            Some("wrong-token-wrong-token"),
        )
        .await;
    assert_eq!(s, 401);
    let (s, _) = app
        .request(Method::GET, "/api/v1/products", None, Some(VIEWER_TOKEN))
        .await;
    assert_eq!(s, 200);
    let (s, body) = app
        .request(
            Method::POST,
            "/api/v1/products",
            Some(json!({"name": "x"})),
            Some(VIEWER_TOKEN),
        )
        .await;
    assert_eq!(s, 403);
    assert_error_body(&body, "FG.");
    // Health and metrics are open.
    let (s, body) = app.request(Method::GET, "/healthz", None, None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["status"], "ok");
}

#[tokio::test]
async fn errors_use_the_standard_body() {
    let app = spawn_app().await;
    let resp = app
        .http
        .post(app.url("/api/v1/products"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.headers().contains_key("x-request-id"));
    let body: Value = resp.json().await.unwrap();
    assert_error_body(&body, "FG.");

    let (s, body) = app.get("/api/v1/no-such-route").await;
    assert_eq!(s, 404);
    assert_error_body(&body, "FG.");

    let pk = app.create_product("errs").await;
    let (s, body) = app
        .get(&format!("/api/v1/products/{pk}/devices/nobody"))
        .await;
    assert_eq!(s, 404);
    assert_error_body(&body, "FG.");

    let (s, body) = app
        .post(
            &format!("/api/v1/products/{pk}/devices"),
            json!({"device_name": "x"}),
        )
        .await;
    assert_eq!(s, 400);
    assert!(
        body["error_msg"].as_str().unwrap().contains("device_name"),
        "{body}"
    );

    app.create_device(&pk, "dup-1").await;
    let (s, body) = app
        .post(
            &format!("/api/v1/products/{pk}/devices"),
            json!({"device_name": "dup-1"}),
        )
        .await;
    assert_eq!(s, 409);
    assert_error_body(&body, "FG.");
}

#[tokio::test]
async fn paging_and_batch_create() {
    let app = spawn_app().await;
    let pk = app.create_product("batch").await;
    let mut csv = String::from("DeviceName,DeviceSecret\n");
    for i in 0..25 {
        csv.push_str(&format!("b-{i:04},\n"));
    }
    csv.push_str("x,\n"); // too short
    csv.push_str("b-0001,\n"); // duplicate in the batch
    let resp = app
        .http
        .post(app.url(&format!("/api/v1/products/{pk}/devices/batch")))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    assert!(status == 200 || status == 201, "{status} {body}");
    assert_eq!(body["created"], 25, "{body}");
    assert_eq!(body["failed"], 2, "{body}");

    let (s, page2) = app
        .get(&format!(
            "/api/v1/products/{pk}/devices?page=2&page_size=10"
        ))
        .await;
    assert_eq!(s, 200, "{page2}");
    assert_eq!(page2["total"], 25);
    assert_eq!(page2["items"].as_array().unwrap().len(), 10);
    assert_eq!(page2["items"][0]["device_name"], "b-0010");
    // Lists never carry secrets.
    assert!(page2["items"][0].get("device_secret").is_none(), "{page2}");

    let (s, body) = app
        .get(&format!("/api/v1/products/{pk}/devices?page_size=1000"))
        .await;
    assert_eq!(s, 400, "{body}");

    // More than 10,000 rows is refused as a whole.
    let rows: Vec<Value> = (0..10_001)
        .map(|i| json!({"device_name": format!("big-{i:05}")}))
        .collect();
    let (s, body) = app
        .post(
            &format!("/api/v1/products/{pk}/devices/batch"),
            json!({ "devices": rows }),
        )
        .await;
    assert!(s == 400 || s == 413, "{s} {body}");
    let (_, list) = app
        .get(&format!("/api/v1/products/{pk}/devices?page_size=1"))
        .await;
    assert_eq!(list["total"], 25);
}

/// Who can read secrets, over real HTTP: nobody from lists or single GETs; device secrets for
/// operators and admins, product secrets for admins, each on its own route.
#[tokio::test]
async fn secrets_are_read_only_by_the_roles_that_manage_them() {
    let app = spawn_app().await;
    let pk = app.create_product("secrets").await;
    let secret = app.create_device(&pk, "s-0001").await;
    let product_secret = app.product_secret(&pk).await;
    let device_uri = format!("/api/v1/products/{pk}/devices/s-0001/secret");
    let product_uri = format!("/api/v1/products/{pk}/secret");
    // (token, device secret status, product secret status)
    let table = [
        (ADMIN_TOKEN, 200, 200),
        (OPERATOR_TOKEN, 200, 403),
        (VIEWER_TOKEN, 403, 403),
    ];
    for (token, device_status, product_status) in table {
        for path in [
            "/api/v1/products".to_owned(),
            format!("/api/v1/products/{pk}"),
            format!("/api/v1/products/{pk}/devices"),
            format!("/api/v1/products/{pk}/devices/s-0001"),
        ] {
            let (s, body) = app.request(Method::GET, &path, None, Some(token)).await;
            assert_eq!(s, 200, "{path}: {body}");
            let text = body.to_string();
            assert!(
                !text.contains(&secret) && !text.contains(&product_secret),
                "{path} leaked a secret to {token}: {text}"
            );
        }
        let (s, body) = app
            .request(Method::GET, &device_uri, None, Some(token))
            .await;
        assert_eq!(s, device_status, "{token}: {body}");
        if s == 200 {
            assert_eq!(body["device_secret"], secret.as_str());
        } else {
            assert_error_body(&body, "FG.0403");
        }
        let (s, body) = app
            .request(Method::GET, &product_uri, None, Some(token))
            .await;
        assert_eq!(s, product_status, "{token}: {body}");
        if s != 200 {
            assert_error_body(&body, "FG.0403");
        }
        let (s, _) = app
            .request(
                Method::GET,
                &format!("/api/v1/products/{pk}/devices/nobody-01/secret"),
                None,
                Some(token),
            )
            .await;
        assert_eq!(s, if device_status == 200 { 404 } else { 403 }, "{token}");
    }
    // What an operator reads is what the device signs with.
    let (_, body) = app
        .request(Method::GET, &device_uri, None, Some(OPERATOR_TOKEN))
        .await;
    let read = body["device_secret"].as_str().unwrap();
    let _dev = connect(app.mqtt_addr(), &credentials(&pk, "s-0001", read)).await;
}

#[tokio::test]
async fn disabling_a_device_drops_its_session() {
    let app = spawn_app().await;
    let pk = app.create_product("kick").await;
    let secret = app.create_device(&pk, "k-0001").await;
    let mut dev = connect(app.mqtt_addr(), &credentials(&pk, "k-0001", &secret)).await;
    app.wait_device(&pk, "k-0001", "online", |d| d["online"] == true)
        .await;
    let (s, body) = app
        .request(
            Method::PATCH,
            &format!("/api/v1/products/{pk}/devices/k-0001"),
            Some(json!({"enabled": false})),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert!(dev.closed_within(WAIT).await, "session survived disabling");
    app.wait_device(&pk, "k-0001", "offline", |d| d["online"] == false)
        .await;
}

/// The jemalloc heap statistics are on /metrics, read at each scrape (these tests run on
/// jemalloc, like the binary).
#[cfg(feature = "jemalloc")]
#[tokio::test]
async fn metrics_show_the_allocator_heap() {
    let app = spawn_app().await;
    let m = app.metrics().await;
    let allocated = app
        .metric(r#"fleetgate_allocator_bytes{kind="allocated"}"#)
        .await;
    let resident = app
        .metric(r#"fleetgate_allocator_bytes{kind="resident"}"#)
        .await;
    assert!(allocated > 0.0 && resident > 0.0, "{m}");
    // Live objects are refreshed per scrape: a big allocation shows in the next one.
    // (Large, so what the tests running alongside free meanwhile cannot hide it.)
    let ballast = std::hint::black_box(vec![1u8; 256 << 20]);
    let after = app
        .metric(r#"fleetgate_allocator_bytes{kind="allocated"}"#)
        .await;
    assert!(
        after >= allocated + (192u64 << 20) as f64,
        "{allocated} -> {after}"
    );
    drop(ballast);
}

/// The `Allow` header of `resp` as a set of methods.
fn allow_set(resp: &reqwest::Response) -> std::collections::BTreeSet<String> {
    resp.headers()
        .get(reqwest::header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(',')
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
        .collect()
}

/// On every documented path, `OPTIONS` answers 204 with an `Allow` header naming exactly the
/// path's methods (the documented ones, `HEAD` with `GET`, and `OPTIONS`), and a method the
/// path lacks gets 405 `FG.0405` with the same header; neither needs a token. No CORS header
/// is sent (none is configured).
#[tokio::test]
async fn options_and_405_name_the_methods_of_every_path() {
    let app = spawn_app().await;
    let (s, doc) = app.get("/api/v1/openapi.json").await;
    assert_eq!(s, 200);
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let mut expected: std::collections::BTreeSet<String> = item
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| ["get", "put", "post", "delete", "patch"].contains(&k.as_str()))
            .map(|m| m.to_uppercase())
            .collect();
        // `…/devices/batch` is also the device named `batch` (`…/devices/{dn}`).
        if path.ends_with("/devices/batch") {
            expected.extend(["GET", "PATCH", "DELETE"].map(String::from));
        }
        if expected.contains("GET") {
            expected.insert("HEAD".into());
        }
        expected.insert("OPTIONS".into());
        let concrete = path
            .replace("{pk}", "pk1")
            .replace("{dn}", "dev-0001")
            .replace("{identifier}", "svc")
            .replace(['{', '}'], "");
        let resp = app
            .http
            .request(Method::OPTIONS, app.url(&concrete))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204, "OPTIONS {concrete}");
        assert_eq!(allow_set(&resp), expected, "OPTIONS {concrete}");
        assert!(
            !resp
                .headers()
                .contains_key(reqwest::header::ACCESS_CONTROL_ALLOW_ORIGIN),
            "OPTIONS {concrete}"
        );
        assert!(resp.bytes().await.unwrap().is_empty(), "OPTIONS {concrete}");
        let missing = ["PUT", "PATCH", "DELETE", "POST", "GET"]
            .into_iter()
            .find(|m| !expected.contains(*m))
            .unwrap_or("TRACE");
        for token in [None, Some(ADMIN_TOKEN)] {
            let mut req = app.http.request(
                Method::from_bytes(missing.as_bytes()).unwrap(),
                app.url(&concrete),
            );
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 405, "{missing} {concrete}");
            assert_eq!(allow_set(&resp), expected, "{missing} {concrete}");
            let body: Value = resp.json().await.unwrap();
            assert_eq!(
                body["error_code"], "FG.0405",
                "{missing} {concrete}: {body}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 60, "{checked} paths");
    // A path that is no route has no methods: 404, for OPTIONS too.
    let resp = app
        .http
        .request(Method::OPTIONS, app.url("/api/v1/no-such-route"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(!resp.headers().contains_key(reqwest::header::ALLOW));
}
