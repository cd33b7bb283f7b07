//! Router-level tests: the whole API over `oneshot`, on a registry backed by a tempdir store.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::*;
use crate::ota::FirmwareRepo;
use crate::registry::Registry;
use crate::store::Store;

mod firmware;

const ADMIN: &str = "admin-secret-token";
const OPERATOR: &str = "operator-secret-token";
const VIEWER: &str = "viewer-secret-token";

type Revoked = Arc<Mutex<Vec<(String, String)>>>;

struct TestApp {
    router: Router,
    metrics: Arc<Metrics>,
    revoked: Revoked,
    firmware: Arc<FirmwareRepo>,
    dir: tempfile::TempDir,
}

/// Base of the download links the test app mints.
const PUBLIC_URL: &str = "http://fleetgate.test:8080";

fn test_app_with(limits: BodyLimits) -> TestApp {
    test_app_in(
        tempfile::tempdir().expect("tempdir"),
        limits,
        crate::ota::firmware::DEFAULT_MAX_SIZE,
    )
}

/// An app over the data dir `dir` (reopening one keeps its state) with a firmware size limit.
fn test_app_in(dir: tempfile::TempDir, limits: BodyLimits, max_firmware: u64) -> TestApp {
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(&dir.path().join("fleetgate.db"), metrics.clone()).expect("store");
    let firmware = FirmwareRepo::open(dir.path(), store.clone(), PUBLIC_URL.into(), max_firmware)
        .expect("firmware repo");
    let registry = Registry::open(store.clone(), metrics.clone()).expect("registry");
    // Built the way the app builds it: config tokens folded in by role name, the state as a
    // struct literal with plain closures.
    let tokens = [(OPERATOR, "operator"), (VIEWER, "viewer")]
        .into_iter()
        .try_fold(TokenSet::new([(ADMIN, Role::Admin)]), |set, (t, role)| {
            set.with_token(t, role)
        })
        .expect("valid roles");
    let revoked: Revoked = Arc::default();
    let sink = revoked.clone();
    let state = ApiState {
        health: Arc::new(|| json!({"mqtt": "127.0.0.1:1883", "amqp": "disabled"})),
        on_device_revoked: Arc::new(move |pk: &str, dn: &str| {
            sink.lock().unwrap().push((pk.to_owned(), dn.to_owned()));
        }),
        ..ApiState::for_tests(
            dir.path(),
            store,
            registry,
            metrics.clone(),
            tokens,
            firmware.clone(),
        )
    };
    TestApp {
        router: router(state, limits),
        metrics,
        revoked,
        firmware,
        dir,
    }
}

fn test_app() -> TestApp {
    test_app_with(BodyLimits::default())
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// Asserts the standard error body with `status` and `code`; returns the body.
    fn error(&self, status: StatusCode, code: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.text);
        let body = self.json();
        assert_eq!(body["error_code"], code, "{body}");
        assert!(
            body["error_msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert!(body.get("error_ext_msg").is_some(), "{body}");
        let rid = self.headers["x-request-id"].to_str().unwrap();
        assert_eq!(
            body["request_id"], rid,
            "body and header request ids differ"
        );
        body
    }
}

impl TestApp {
    async fn send(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
        extra: &[(&str, &str)],
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let req = match body {
            Some((ct, bytes)) => req
                .header(header::CONTENT_TYPE, ct)
                .body(Body::from(bytes))
                .unwrap(),
            None => req.body(Body::empty()).unwrap(),
        };
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(
            headers.contains_key("x-request-id"),
            "every response has x-request-id"
        );
        Reply {
            status,
            headers,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn get(&self, uri: &str, token: Option<&str>) -> Reply {
        self.send(Method::GET, uri, token, None, &[]).await
    }

    async fn post_json(&self, uri: &str, token: Option<&str>, body: Value) -> Reply {
        let bytes = serde_json::to_vec(&body).unwrap();
        self.send(
            Method::POST,
            uri,
            token,
            Some(("application/json", bytes)),
            &[],
        )
        .await
    }

    async fn product(&self, key: &str) {
        let r = self
            .post_json(
                "/api/v1/products",
                Some(ADMIN),
                json!({"name": format!("product {key}"), "product_key": key}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }

    async fn device(&self, pk: &str, dn: &str) -> Value {
        let r = self
            .post_json(
                &format!("/api/v1/products/{pk}/devices"),
                Some(OPERATOR),
                json!({"device_name": dn}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.json()
    }
}

#[tokio::test]
async fn healthz_metrics_and_openapi_need_no_token() {
    let app = test_app();
    let r = app.get("/healthz", None).await;
    assert_eq!(r.status, StatusCode::OK);
    let body = r.json();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["amqp"], "disabled");
    assert_eq!(body["mqtt"], "127.0.0.1:1883");

    let r = app.get("/metrics", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    // The /healthz request above is already counted.
    assert!(
        r.text
            .contains(r#"fleetgate_http_requests_total{class="2xx"}"#),
        "{}",
        r.text
    );

    let r = app.get("/api/v1/openapi.json", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["openapi"].as_str().map(|v| &v[..2]), Some("3."));
}

#[tokio::test]
async fn http_requests_are_counted_by_class() {
    let app = test_app();
    app.get("/healthz", None).await;
    app.get("/api/v1/products", None).await; // 401
    app.get("/no/such/route", None).await; // 404
    let text = app.metrics.encode();
    assert!(
        text.contains(r#"fleetgate_http_requests_total{class="2xx"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"fleetgate_http_requests_total{class="4xx"} 2"#),
        "{text}"
    );
}

#[tokio::test]
async fn request_id_is_echoed_or_generated() {
    let app = test_app();
    let r = app
        .send(
            Method::GET,
            "/healthz",
            None,
            None,
            &[("x-request-id", "abc-123.x")],
        )
        .await;
    assert_eq!(r.headers["x-request-id"], "abc-123.x");

    let r = app
        .send(
            Method::GET,
            "/api/v1/products",
            None,
            None,
            &[("x-request-id", "trace-42")],
        )
        .await;
    let body = r.error(StatusCode::UNAUTHORIZED, "FG.0401");
    assert_eq!(body["request_id"], "trace-42");

    // A header that could inject into logs is replaced by a fresh UUID.
    let r = app
        .send(
            Method::GET,
            "/healthz",
            None,
            None,
            &[("x-request-id", "a b;c")],
        )
        .await;
    let rid = r.headers["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(rid).is_ok(), "{rid}");

    let a = app.get("/healthz", None).await;
    let b = app.get("/healthz", None).await;
    assert_ne!(a.headers["x-request-id"], b.headers["x-request-id"]);
}

#[tokio::test]
async fn missing_or_bad_token_is_401_with_challenge() {
    let app = test_app();
    let r = app.get("/api/v1/products", None).await;
    r.error(StatusCode::UNAUTHORIZED, "FG.0401");
    assert!(r.headers[header::WWW_AUTHENTICATE]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));

    let r = app.get("/api/v1/products", Some("wrong-token")).await;
    r.error(StatusCode::UNAUTHORIZED, "FG.0401");
    assert!(r.headers[header::WWW_AUTHENTICATE]
        .to_str()
        .unwrap()
        .contains("invalid_token"));

    let r = app
        .send(
            Method::GET,
            "/api/v1/products",
            None,
            None,
            &[("authorization", "Basic YWRtaW46YWRtaW4=")],
        )
        .await;
    r.error(StatusCode::UNAUTHORIZED, "FG.0401");

    // Writes are refused before the body is even looked at.
    let r = app
        .post_json("/api/v1/products", None, json!({"name": "x"}))
        .await;
    r.error(StatusCode::UNAUTHORIZED, "FG.0401");
    let r = app.get("/api/v1/products", Some(VIEWER)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test]
async fn roles_split() {
    let app = test_app();
    // Products and instances are admin business.
    let r = app
        .post_json("/api/v1/products", Some(OPERATOR), json!({"name": "p"}))
        .await;
    r.error(StatusCode::FORBIDDEN, "FG.0403");
    let r = app
        .post_json("/api/v1/instances", Some(OPERATOR), json!({"name": "i"}))
        .await;
    r.error(StatusCode::FORBIDDEN, "FG.0403");
    app.product("pk1").await;
    let r = app
        .send(
            Method::DELETE,
            "/api/v1/products/pk1",
            Some(OPERATOR),
            None,
            &[],
        )
        .await;
    r.error(StatusCode::FORBIDDEN, "FG.0403");

    // Viewers only read.
    let r = app
        .post_json(
            "/api/v1/products/pk1/devices",
            Some(VIEWER),
            json!({"device_name": "dev-0001"}),
        )
        .await;
    r.error(StatusCode::FORBIDDEN, "FG.0403");
    let r = app
        .send(
            Method::POST,
            "/api/v1/products/pk1/devices/batch",
            Some(VIEWER),
            Some(("text/csv", b"DeviceName\ndev-0001\n".to_vec())),
            &[],
        )
        .await;
    r.error(StatusCode::FORBIDDEN, "FG.0403");

    // Operators run the fleet.
    app.device("pk1", "dev-0001").await;
    let r = app
        .send(
            Method::PATCH,
            "/api/v1/products/pk1/devices/dev-0001",
            Some(VIEWER),
            Some(("application/json", br#"{"enabled":false}"#.to_vec())),
            &[],
        )
        .await;
    r.error(StatusCode::FORBIDDEN, "FG.0403");
    let r = app
        .get("/api/v1/products/pk1/devices/dev-0001", Some(VIEWER))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app
        .send(
            Method::DELETE,
            "/api/v1/products/pk1/devices/dev-0001",
            Some(OPERATOR),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let r = app
        .send(
            Method::DELETE,
            "/api/v1/products/pk1",
            Some(ADMIN),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
}

#[tokio::test]
async fn bad_json_names_the_field() {
    let app = test_app();
    app.product("pk1").await;
    let uri = "/api/v1/products/pk1/devices";

    let r = app
        .send(
            Method::POST,
            uri,
            Some(OPERATOR),
            Some(("application/json", br#"{"device_name": "#.to_vec())),
            &[],
        )
        .await;
    r.error(StatusCode::BAD_REQUEST, "FG.1000");

    let r = app
        .post_json(uri, Some(OPERATOR), json!({"tags": {}}))
        .await;
    let body = r.error(StatusCode::BAD_REQUEST, "FG.1002");
    assert_eq!(body["error_ext_msg"], "device_name");
    assert!(body["error_msg"].as_str().unwrap().contains("device_name"));

    let r = app
        .post_json(
            uri,
            Some(OPERATOR),
            json!({"device_name": "dev-0001", "tags": {"k": 1}}),
        )
        .await;
    let body = r.error(StatusCode::BAD_REQUEST, "FG.1001");
    assert_eq!(body["error_ext_msg"], "tags.k");

    let r = app
        .post_json(
            uri,
            Some(OPERATOR),
            json!({"device_name": "dev-0001", "colour": "red"}),
        )
        .await;
    let body = r.error(StatusCode::BAD_REQUEST, "FG.1001");
    assert_eq!(body["error_ext_msg"], "colour");

    let r = app
        .send(
            Method::POST,
            uri,
            Some(OPERATOR),
            Some(("text/plain", br#"{"device_name":"dev-0001"}"#.to_vec())),
            &[],
        )
        .await;
    r.error(StatusCode::BAD_REQUEST, "FG.1004");
}

#[tokio::test]
async fn registry_validation_names_the_field() {
    let app = test_app();
    app.product("pk1").await;
    let r = app
        .post_json(
            "/api/v1/products/pk1/devices",
            Some(OPERATOR),
            json!({"device_name": "no spaces allowed"}),
        )
        .await;
    let body = r.error(StatusCode::BAD_REQUEST, "FG.1001");
    assert_eq!(body["error_ext_msg"], "device_name");
    assert!(
        body["error_msg"].as_str().unwrap().contains("device_name"),
        "{body}"
    );

    let r = app
        .get("/api/v1/products/pk1/devices?page_size=1000", Some(VIEWER))
        .await;
    let body = r.error(StatusCode::BAD_REQUEST, "FG.1001");
    assert_eq!(body["error_ext_msg"], "page_size");

    let r = app
        .get("/api/v1/products/pk1/devices?page=two", Some(VIEWER))
        .await;
    let body = r.error(StatusCode::BAD_REQUEST, "FG.1001");
    assert_eq!(body["error_ext_msg"], "page");

    let r = app
        .get("/api/v1/products/pk1/devices?pagesize=10", Some(VIEWER))
        .await;
    let body = r.error(StatusCode::BAD_REQUEST, "FG.1001");
    assert_eq!(body["error_ext_msg"], "pagesize");
}

#[tokio::test]
async fn unknown_route_and_wrong_method_use_the_standard_body() {
    let app = test_app();
    app.get("/nope", None)
        .await
        .error(StatusCode::NOT_FOUND, "FG.0404");
    app.get("/api/v1/nope", Some(ADMIN))
        .await
        .error(StatusCode::NOT_FOUND, "FG.0404");
    let r = app
        .send(Method::PUT, "/api/v1/products", Some(ADMIN), None, &[])
        .await;
    r.error(StatusCode::METHOD_NOT_ALLOWED, "FG.0405");
    let r = app.send(Method::POST, "/healthz", None, None, &[]).await;
    r.error(StatusCode::METHOD_NOT_ALLOWED, "FG.0405");
}

#[tokio::test]
async fn not_found_and_conflict_codes() {
    let app = test_app();
    app.get("/api/v1/products/nope", Some(VIEWER))
        .await
        .error(StatusCode::NOT_FOUND, "FG.2002");
    app.product("pk1").await;
    app.get("/api/v1/products/pk1/devices/dev-0404", Some(VIEWER))
        .await
        .error(StatusCode::NOT_FOUND, "FG.2003");
    app.get("/api/v1/instances/nope", Some(VIEWER))
        .await
        .error(StatusCode::NOT_FOUND, "FG.2001");

    app.device("pk1", "dev-0001").await;
    let r = app
        .post_json(
            "/api/v1/products/pk1/devices",
            Some(OPERATOR),
            json!({"device_name": "dev-0001"}),
        )
        .await;
    r.error(StatusCode::CONFLICT, "FG.2103");
    let r = app
        .post_json(
            "/api/v1/products",
            Some(ADMIN),
            json!({"name": "again", "product_key": "pk1"}),
        )
        .await;
    r.error(StatusCode::CONFLICT, "FG.2102");
    // A product with devices cannot be deleted.
    let r = app
        .send(
            Method::DELETE,
            "/api/v1/products/pk1",
            Some(ADMIN),
            None,
            &[],
        )
        .await;
    r.error(StatusCode::CONFLICT, "FG.0409");
}

#[tokio::test]
async fn instances_create_list_get() {
    let app = test_app();
    let r = app
        .post_json(
            "/api/v1/instances",
            Some(ADMIN),
            json!({"instance_id": "iot-eu", "name": "Europe"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.json()["instance_id"], "iot-eu");
    let r = app
        .post_json(
            "/api/v1/instances",
            Some(ADMIN),
            json!({"instance_id": "iot-eu", "name": "Europe"}),
        )
        .await;
    r.error(StatusCode::CONFLICT, "FG.2101");

    let r = app.get("/api/v1/instances", Some(VIEWER)).await;
    let body = r.json();
    assert_eq!(body["total"], 2, "default + iot-eu: {body}");
    let ids: Vec<&str> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance_id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"default") && ids.contains(&"iot-eu"),
        "{ids:?}"
    );
    let r = app
        .get("/api/v1/instances?page=2&page_size=1", Some(VIEWER))
        .await;
    let body = r.json();
    assert_eq!(
        (
            body["total"].as_u64(),
            body["items"].as_array().unwrap().len()
        ),
        (Some(2), 1)
    );
    let r = app.get("/api/v1/instances/iot-eu", Some(VIEWER)).await;
    assert_eq!(r.json()["name"], "Europe");
}

/// Device and product secrets: in the create responses, then only from the `…/secret` routes
/// to the roles that may manage them; never in lists, single GETs or update responses.
#[tokio::test]
async fn secrets_only_to_their_creator_and_on_explicit_request() {
    let app = test_app();
    let r = app
        .post_json("/api/v1/products", Some(ADMIN), json!({"name": "meters"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let product = r.json();
    let pk = product["product_key"].as_str().unwrap().to_owned();
    let product_secret = product["product_secret"].as_str().unwrap().to_owned();
    assert!(!product_secret.is_empty());

    let created = app.device(&pk, "dev-0001").await;
    let secret = created["device_secret"].as_str().unwrap().to_owned();
    assert!(!secret.is_empty());
    assert_eq!(created["device_name"], "dev-0001");
    assert_eq!(created["enabled"], true);
    // `batch` is a valid device name; its secret route must not fall to the batch route.
    let batch_dev = app.device(&pk, "batch").await;
    let batch_secret = batch_dev["device_secret"].as_str().unwrap().to_owned();

    let no_secret = |r: &Reply| {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        for s in [&product_secret, &secret, &batch_secret] {
            assert!(!r.text.contains(s.as_str()), "a secret leaked: {}", r.text);
        }
        assert!(!r.text.contains("_secret"), "{}", r.text);
    };
    for role in [ADMIN, OPERATOR, VIEWER] {
        no_secret(&app.get("/api/v1/products", Some(role)).await);
        no_secret(&app.get(&format!("/api/v1/products/{pk}"), Some(role)).await);
        no_secret(
            &app.get(&format!("/api/v1/products/{pk}/devices"), Some(role))
                .await,
        );
        let r = app
            .get(
                &format!("/api/v1/products/{pk}/devices/dev-0001"),
                Some(role),
            )
            .await;
        no_secret(&r);
        assert_eq!(r.json()["device_name"], "dev-0001");
        assert!(r.json().get("migration").is_some(), "{}", r.text);
        no_secret(
            &app.get(&format!("/api/v1/products/{pk}/devices/batch"), Some(role))
                .await,
        );
    }
    // Updates answer with the device, without its secret.
    let r = app
        .send(
            Method::PATCH,
            &format!("/api/v1/products/{pk}/devices/dev-0001"),
            Some(OPERATOR),
            Some(("application/json", br#"{"tags":{"a":"b"}}"#.to_vec())),
            &[],
        )
        .await;
    no_secret(&r);
    assert_eq!(r.json()["tags"]["a"], "b");
    for action in ["disable", "enable"] {
        let r = app
            .send(
                Method::POST,
                &format!("/api/v1/products/{pk}/devices/dev-0001/{action}"),
                Some(OPERATOR),
                None,
                &[],
            )
            .await;
        no_secret(&r);
    }

    // Device secrets: operator and admin, on explicit request.
    let uri = format!("/api/v1/products/{pk}/devices/dev-0001/secret");
    for role in [ADMIN, OPERATOR] {
        let r = app.get(&uri, Some(role)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.headers[header::CACHE_CONTROL], "no-store");
        let body = r.json();
        assert_eq!(body["device_secret"], secret.as_str());
        assert_eq!(body["device_name"], "dev-0001");
        assert_eq!(body["product_key"], pk.as_str());
    }
    app.get(&uri, Some(VIEWER))
        .await
        .error(StatusCode::FORBIDDEN, "FG.0403");
    app.get(&uri, None)
        .await
        .error(StatusCode::UNAUTHORIZED, "FG.0401");
    let r = app
        .get(
            &format!("/api/v1/products/{pk}/devices/batch/secret"),
            Some(OPERATOR),
        )
        .await;
    assert_eq!(
        r.json()["device_secret"],
        batch_secret.as_str(),
        "{}",
        r.text
    );
    let ghost = format!("/api/v1/products/{pk}/devices/ghost-01/secret");
    app.get(&ghost, Some(OPERATOR))
        .await
        .error(StatusCode::NOT_FOUND, "FG.2003");
    // The role is checked first: a viewer cannot even learn whether the device exists.
    app.get(&ghost, Some(VIEWER))
        .await
        .error(StatusCode::FORBIDDEN, "FG.0403");

    // Product secrets: admin only (the role that creates products).
    let uri = format!("/api/v1/products/{pk}/secret");
    let r = app.get(&uri, Some(ADMIN)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(r.json()["product_secret"], product_secret.as_str());
    assert_eq!(r.json()["product_key"], pk.as_str());
    for role in [OPERATOR, VIEWER] {
        app.get(&uri, Some(role))
            .await
            .error(StatusCode::FORBIDDEN, "FG.0403");
    }
    app.get("/api/v1/products/nope1/secret", Some(ADMIN))
        .await
        .error(StatusCode::NOT_FOUND, "FG.2002");
    app.get("/api/v1/products/nope1/secret", Some(OPERATOR))
        .await
        .error(StatusCode::FORBIDDEN, "FG.0403");
}

#[tokio::test]
async fn device_paging_and_filters() {
    let app = test_app();
    app.product("pk1").await;
    for i in 0..25 {
        let r = app
            .post_json(
                "/api/v1/products/pk1/devices",
                Some(OPERATOR),
                json!({"device_name": format!("dev-{i:04}"),
                       "tags": if i % 5 == 0 { json!({"floor": "3"}) } else { json!({"floor": "1"}) }}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    let r = app
        .get(
            "/api/v1/products/pk1/devices?page=2&page_size=10",
            Some(VIEWER),
        )
        .await;
    let body = r.json();
    assert_eq!(body["total"], 25);
    assert_eq!(body["page"], 2);
    assert_eq!(body["page_size"], 10);
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 10);
    assert_eq!(items[0]["device_name"], "dev-0010");
    let r = app
        .get(
            "/api/v1/products/pk1/devices?page=3&page_size=10",
            Some(VIEWER),
        )
        .await;
    assert_eq!(r.json()["items"].as_array().unwrap().len(), 5);
    let r = app.get("/api/v1/products/pk1/devices", Some(VIEWER)).await;
    assert_eq!(r.json()["page_size"], 20, "default page size");

    let r = app
        .get("/api/v1/products/pk1/devices?tag=floor:3", Some(VIEWER))
        .await;
    assert_eq!(r.json()["total"], 5);
    let r = app
        .get("/api/v1/products/pk1/devices?tag=floor", Some(VIEWER))
        .await;
    assert_eq!(r.json()["total"], 25);
    let r = app
        .get("/api/v1/products/pk1/devices?online=true", Some(VIEWER))
        .await;
    assert_eq!(r.json()["total"], 0);
    let r = app
        .get(
            "/api/v1/products/pk1/devices?online=false&page_size=1",
            Some(VIEWER),
        )
        .await;
    assert_eq!(r.json()["total"], 25);
    let r = app
        .get("/api/v1/products/pk1/devices?tag=:x", Some(VIEWER))
        .await;
    let body = r.error(StatusCode::BAD_REQUEST, "FG.1001");
    assert_eq!(body["error_ext_msg"], "tag");
}

#[tokio::test]
async fn disable_and_delete_revoke_the_session() {
    let app = test_app();
    app.product("pk1").await;
    app.device("pk1", "dev-0001").await;
    app.device("pk1", "dev-0002").await;

    let r = app
        .send(
            Method::PATCH,
            "/api/v1/products/pk1/devices/dev-0001",
            Some(OPERATOR),
            Some(("application/json", br#"{"tags":{"a":"b"}}"#.to_vec())),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["tags"]["a"], "b");
    assert!(
        app.revoked.lock().unwrap().is_empty(),
        "tag change keeps the session"
    );

    let r = app
        .send(
            Method::PATCH,
            "/api/v1/products/pk1/devices/dev-0001",
            Some(OPERATOR),
            Some(("application/json", br#"{"enabled":false}"#.to_vec())),
            &[],
        )
        .await;
    assert_eq!(r.json()["enabled"], false);
    let r = app
        .send(
            Method::POST,
            "/api/v1/products/pk1/devices/dev-0001/enable",
            Some(OPERATOR),
            None,
            &[],
        )
        .await;
    assert_eq!(r.json()["enabled"], true);
    let r = app
        .send(
            Method::POST,
            "/api/v1/products/pk1/devices/dev-0002/disable",
            Some(OPERATOR),
            None,
            &[],
        )
        .await;
    assert_eq!(r.json()["enabled"], false);
    let r = app
        .send(
            Method::DELETE,
            "/api/v1/products/pk1/devices/dev-0001",
            Some(OPERATOR),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    // A failed delete revokes nothing.
    let r = app
        .send(
            Method::DELETE,
            "/api/v1/products/pk1/devices/dev-0001",
            Some(OPERATOR),
            None,
            &[],
        )
        .await;
    r.error(StatusCode::NOT_FOUND, "FG.2003");

    let pair = |dn: &str| ("pk1".to_owned(), dn.to_owned());
    assert_eq!(
        *app.revoked.lock().unwrap(),
        vec![pair("dev-0001"), pair("dev-0002"), pair("dev-0001")]
    );
}

#[tokio::test]
async fn batch_json_reports_per_row() {
    let app = test_app();
    app.product("pk1").await;
    app.device("pk1", "dev-0001").await;
    let r = app
        .post_json(
            "/api/v1/products/pk1/devices/batch",
            Some(OPERATOR),
            json!({"devices": [
                {"device_name": "dev-0002"},
                {"device_name": "dev-0001"},
                {"device_name": "x"},
                {"device_name": "dev-0003", "device_secret": "given-secret"},
                {"device_name": "dev-0002"},
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let body = r.json();
    assert_eq!(
        (body["created"].as_u64(), body["failed"].as_u64()),
        (Some(2), Some(3)),
        "{body}"
    );
    let rows = body["results"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[0]["status"], "created");
    assert!(rows[0]["device_secret"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(rows[1]["error_code"], "FG.2103");
    assert_eq!(rows[1]["row"], 2);
    assert_eq!(rows[2]["error_code"], "FG.1001");
    assert!(rows[2]["error_msg"]
        .as_str()
        .unwrap()
        .contains("device_name"));
    assert_eq!(rows[3]["device_secret"], "given-secret");
    assert_eq!(rows[4]["status"], "failed", "duplicate within the batch");

    // The bare-list form, and a shape error naming the row's field.
    let r = app
        .post_json(
            "/api/v1/products/pk1/devices/batch",
            Some(OPERATOR),
            json!([{"device_name": "dev-0004"}]),
        )
        .await;
    assert_eq!(r.json()["created"], 1);
    let r = app
        .post_json(
            "/api/v1/products/pk1/devices/batch",
            Some(OPERATOR),
            json!([{"device_name": "dev-0005"}, {"device_nam": "dev-0006"}]),
        )
        .await;
    let body = r.error(StatusCode::BAD_REQUEST, "FG.1001");
    assert_eq!(body["error_ext_msg"], "devices[1].device_nam");

    let r = app.get("/api/v1/products/pk1/devices", Some(VIEWER)).await;
    assert_eq!(
        r.json()["total"],
        4,
        "dev-0001..0004; nothing from the refused request"
    );

    let r = app
        .post_json(
            "/api/v1/products/nope/devices/batch",
            Some(OPERATOR),
            json!([{"device_name": "dev-0001"}]),
        )
        .await;
    r.error(StatusCode::NOT_FOUND, "FG.2002");
}

#[tokio::test]
async fn batch_csv_reports_per_row() {
    let app = test_app();
    app.product("pk1").await;
    let csv = "DeviceName,DeviceSecret\r\nmeter-0001,\r\nmeter-0002,s3cret\r\nbad name,\r\nmeter-0003,a,b\r\nmeter-0001,\r\n";
    let r = app
        .send(
            Method::POST,
            "/api/v1/products/pk1/devices/batch",
            Some(OPERATOR),
            Some(("text/csv; charset=utf-8", csv.as_bytes().to_vec())),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let body = r.json();
    assert_eq!(
        (body["created"].as_u64(), body["failed"].as_u64()),
        (Some(2), Some(3)),
        "{body}"
    );
    let rows = body["results"].as_array().unwrap();
    let summary: Vec<(u64, &str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["row"].as_u64().unwrap(),
                r["device_name"].as_str().unwrap(),
                r["error_code"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, "meter-0001", "-"),
            (2, "meter-0002", "-"),
            (3, "bad name", "FG.1001"),
            (4, "meter-0003", "FG.1001"),
            (5, "meter-0001", "FG.1001"),
        ]
    );
    assert_eq!(rows[1]["device_secret"], "s3cret");

    let r = app
        .send(
            Method::POST,
            "/api/v1/products/pk1/devices/batch",
            Some(OPERATOR),
            Some(("text/csv", b"Name\nmeter-0009\n".to_vec())),
            &[],
        )
        .await;
    r.error(StatusCode::BAD_REQUEST, "FG.1001");
    let r = app
        .send(
            Method::POST,
            "/api/v1/products/pk1/devices/batch",
            Some(OPERATOR),
            Some(("application/xml", b"<devices/>".to_vec())),
            &[],
        )
        .await;
    r.error(StatusCode::BAD_REQUEST, "FG.1004");
}

#[tokio::test]
async fn batch_over_10000_rows_is_refused_whole() {
    let app = test_app();
    app.product("pk1").await;
    let mut csv = String::from("DeviceName\n");
    for i in 0..=MAX_ROWS_FOR_TEST {
        csv.push_str(&format!("dev-{i:05}\n"));
    }
    let r = app
        .send(
            Method::POST,
            "/api/v1/products/pk1/devices/batch",
            Some(OPERATOR),
            Some(("text/csv", csv.into_bytes())),
            &[],
        )
        .await;
    let body = r.error(StatusCode::PAYLOAD_TOO_LARGE, "FG.1003");
    assert!(
        body["error_msg"].as_str().unwrap().contains("10000"),
        "{body}"
    );

    let rows: Vec<Value> = (0..=MAX_ROWS_FOR_TEST)
        .map(|i| json!({"device_name": format!("dev-{i:05}")}))
        .collect();
    let r = app
        .post_json(
            "/api/v1/products/pk1/devices/batch",
            Some(OPERATOR),
            json!({ "devices": rows }),
        )
        .await;
    r.error(StatusCode::PAYLOAD_TOO_LARGE, "FG.1003");
    let r = app.get("/api/v1/products/pk1/devices", Some(VIEWER)).await;
    assert_eq!(r.json()["total"], 0);
}

const MAX_ROWS_FOR_TEST: usize = 10_000;

#[tokio::test]
async fn body_limit_gives_413_in_standard_body() {
    let app = test_app_with(BodyLimits {
        json: 1024,
        batch: 64 * 1024,
    });
    app.product("pk1").await;
    let big = json!({"device_name": "dev-0001", "tags": {"note": "x".repeat(2000)}});
    let r = app
        .post_json("/api/v1/products/pk1/devices", Some(OPERATOR), big)
        .await;
    r.error(StatusCode::PAYLOAD_TOO_LARGE, "FG.0413");
    // Raw-body routes too, in the standard body.
    let r = app
        .send(
            Method::POST,
            "/api/v1/ota/jobs/job-x/cancel",
            Some(OPERATOR),
            Some(("application/json", vec![b' '; 4096])),
            &[],
        )
        .await;
    r.error(StatusCode::PAYLOAD_TOO_LARGE, "FG.0413");
    // The batch route has its own, larger limit.
    let mut csv = String::from("DeviceName\n");
    for i in 0..400 {
        csv.push_str(&format!("dev-{i:05}\n"));
    }
    assert!(csv.len() > 1024 && csv.len() < 64 * 1024);
    let r = app
        .send(
            Method::POST,
            "/api/v1/products/pk1/devices/batch",
            Some(OPERATOR),
            Some(("text/csv", csv.into_bytes())),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["created"], 400);
    let r = app
        .send(
            Method::POST,
            "/api/v1/products/pk1/devices/batch",
            Some(OPERATOR),
            Some(("text/csv", vec![b'a'; 65 * 1024])),
            &[],
        )
        .await;
    r.error(StatusCode::PAYLOAD_TOO_LARGE, "FG.0413");
    // An OTA job with an uploaded device list: over the batch limit is 413, not a 400.
    let mut form =
        b"--XB\r\nContent-Disposition: form-data; name=\"device_list\"; filename=\"l.csv\"\r\n\r\n"
            .to_vec();
    form.resize(form.len() + 65 * 1024, b'a');
    form.extend_from_slice(b"\r\n--XB--\r\n");
    let r = app
        .send(
            Method::POST,
            "/api/v1/ota/jobs",
            Some(OPERATOR),
            Some(("multipart/form-data; boundary=XB", form)),
            &[],
        )
        .await;
    r.error(StatusCode::PAYLOAD_TOO_LARGE, "FG.0413");
}

/// With the default limits, JSON routes refuse 2 MiB while a 2 MiB batch passes.
#[tokio::test]
async fn default_limits_are_small_for_json_and_large_for_batches() {
    let app = test_app();
    app.product("pk1").await;
    let two_mib = 2 * 1024 * 1024;
    let mut body = br#"{"device_name":"dev-0001","tags":{"note":""#.to_vec();
    body.resize(two_mib, b'x');
    body.extend_from_slice(br#""}}"#);
    for uri in ["/api/v1/products/pk1/devices", "/api/v1/products"] {
        let r = app
            .send(
                Method::POST,
                uri,
                Some(ADMIN),
                Some(("application/json", body.clone())),
                &[],
            )
            .await;
        r.error(StatusCode::PAYLOAD_TOO_LARGE, "FG.0413");
    }
    // 200 devices with 100 tags each: over 2 MiB of JSON, a legitimate batch.
    let tags: serde_json::Map<String, Value> = (0..100)
        .map(|i| (format!("tag{i:03}"), json!("v".repeat(100))))
        .collect();
    let rows: Vec<Value> = (0..200)
        .map(|i| json!({"device_name": format!("dev-{i:05}"), "tags": tags}))
        .collect();
    let batch = serde_json::to_vec(&json!({ "devices": rows })).unwrap();
    assert!(batch.len() > two_mib, "{}", batch.len());
    let r = app
        .send(
            Method::POST,
            "/api/v1/products/pk1/devices/batch",
            Some(OPERATOR),
            Some(("application/json", batch)),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["created"], 200);
}

#[tokio::test]
async fn openapi_lists_every_path_and_schema() {
    let app = test_app();
    let doc = app.get("/api/v1/openapi.json", None).await.json();
    let paths = doc["paths"].as_object().expect("paths");
    // Every operationId once (openapi-spec-validator refuses a document with duplicates).
    let mut ids = std::collections::HashSet::new();
    for (path, ops) in paths {
        for (method, op) in ops.as_object().expect("operations") {
            if let Some(id) = op["operationId"].as_str() {
                assert!(
                    ids.insert(id.to_owned()),
                    "{method} {path}: operationId {id} twice"
                );
            }
        }
    }
    let expected = [
        ("/healthz", "get"),
        ("/metrics", "get"),
        ("/api/v1/openapi.json", "get"),
        ("/api/v1/instances", "post"),
        ("/api/v1/instances", "get"),
        ("/api/v1/instances/{iid}", "get"),
        ("/api/v1/instances/{iid}", "delete"),
        ("/api/v1/instances/{iid}/consumer-groups", "post"),
        ("/api/v1/instances/{iid}/consumer-groups", "get"),
        ("/api/v1/instances/{iid}/consumer-groups/{gid}", "get"),
        ("/api/v1/instances/{iid}/consumer-groups/{gid}", "delete"),
        ("/api/v1/instances/{iid}/forwarding/rate-limit", "get"),
        ("/api/v1/instances/{iid}/forwarding/rate-limit", "put"),
        ("/api/v1/instances/{iid}/forwarding/rate-limit", "delete"),
        ("/api/v1/products", "post"),
        ("/api/v1/products", "get"),
        ("/api/v1/products/{pk}", "get"),
        ("/api/v1/products/{pk}", "delete"),
        ("/api/v1/products/{pk}/secret", "get"),
        ("/api/v1/products/{pk}/devices", "post"),
        ("/api/v1/products/{pk}/devices", "get"),
        ("/api/v1/products/{pk}/devices/batch", "post"),
        ("/api/v1/products/{pk}/devices/{dn}", "get"),
        ("/api/v1/products/{pk}/devices/{dn}", "patch"),
        ("/api/v1/products/{pk}/devices/{dn}", "delete"),
        ("/api/v1/products/{pk}/devices/{dn}/secret", "get"),
        ("/api/v1/products/{pk}/devices/{dn}/enable", "post"),
        ("/api/v1/products/{pk}/devices/{dn}/disable", "post"),
        ("/api/v1/products/{pk}/devices/{dn}/messages", "post"),
        ("/api/v1/products/{pk}/messages", "post"),
        ("/api/v1/products/{pk}/devices/{dn}/properties", "get"),
        ("/api/v1/products/{pk}/devices/{dn}/properties", "put"),
        (
            "/api/v1/products/{pk}/devices/{dn}/services/{identifier}",
            "post",
        ),
        ("/api/v1/products/{pk}/devices/{dn}/commands/{id}", "get"),
        ("/api/v1/products/{pk}/devices/{dn}/rrpc", "post"),
        ("/api/v1/migrations", "post"),
        ("/api/v1/migrations", "get"),
        ("/api/v1/migrations/{tid}", "get"),
        ("/api/v1/migrations/{tid}", "delete"),
        ("/api/v1/migrations/{tid}/config", "put"),
        ("/api/v1/migrations/{tid}/canary", "post"),
        ("/api/v1/migrations/{tid}/full", "post"),
        ("/api/v1/migrations/{tid}/pause", "post"),
        ("/api/v1/migrations/{tid}/continue", "post"),
        ("/api/v1/migrations/{tid}/rollback", "post"),
        ("/api/v1/migrations/{tid}/data-sync", "post"),
        ("/api/v1/migrations/{tid}/devices", "get"),
        ("/api/v1/migrations/{tid}/log", "get"),
        ("/api/v1/firmware", "post"),
        ("/api/v1/firmware", "get"),
        ("/api/v1/firmware/{fid}", "get"),
        ("/api/v1/firmware/{fid}/download-url", "get"),
        ("/firmware/{fid}/download", "get"),
        ("/api/v1/firmware/{fid}", "delete"),
        ("/api/v1/firmware/{fid}/jobs", "get"),
        ("/api/v1/firmware/{fid}/statistics", "get"),
        ("/api/v1/ota/jobs", "post"),
        ("/api/v1/ota/jobs", "get"),
        ("/api/v1/ota/jobs/{jid}", "get"),
        ("/api/v1/ota/jobs/{jid}/tasks", "get"),
        ("/api/v1/ota/jobs/{jid}/tasks/{dn}", "get"),
        ("/api/v1/ota/jobs/{jid}/tasks/cancel", "post"),
        ("/api/v1/ota/jobs/{jid}/cancel", "post"),
        ("/api/v1/ota/jobs/{jid}/confirm", "post"),
        ("/api/v1/ota/jobs/{jid}/pause", "post"),
        ("/api/v1/ota/jobs/{jid}/resume", "post"),
        ("/api/v1/ota/jobs/{jid}/statistics", "get"),
        ("/api/v1/products/{pk}/devices/{dn}/ota/jobs", "get"),
        ("/api/v1/products/{pk}/devices/{dn}/ota/timeline", "get"),
        ("/api/v1/products/{pk}/ota/versions", "get"),
        ("/api/v1/export", "post"),
        ("/api/v1/export/{id}", "get"),
        ("/api/v1/export/{id}/log", "get"),
        ("/api/v1/export/{id}/package", "get"),
        ("/api/v1/import", "post"),
        ("/api/v1/import/{id}", "get"),
        ("/api/v1/import/{id}/log", "get"),
        ("/readyz", "get"),
        ("/api/v1/cluster", "get"),
    ];
    for (path, method) in expected {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing from openapi.json"
        );
    }
    assert_eq!(
        paths.len(),
        62,
        "a routed path is missing from this test: {:?}",
        paths.keys()
    );
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for s in [
        "ErrorBody",
        "Instance",
        "CreatedDevice",
        "DeviceSecret",
        "CreatedProduct",
        "ProductSecret",
        "ProductSummary",
        "BatchCreateResponse",
        "DeviceSummary",
        "DeviceDetails",
        "DeviceMigrationStatus",
        "FirmwarePackage",
        "FirmwareStatus",
        "CommandRecord",
        "BroadcastResponse",
        "RrpcResponse",
        "PropertiesResponse",
        "PropertySnapshot",
    ] {
        assert!(schemas.contains_key(s), "schema {s} missing");
    }
    // One device: the device's fields (flattened) plus its migration status.
    assert_eq!(
        doc["paths"]["/api/v1/products/{pk}/devices/{dn}"]["get"]["responses"]["200"]["content"]
            ["application/json"]["schema"]["$ref"],
        "#/components/schemas/DeviceDetails"
    );
    let details = schemas["DeviceDetails"].to_string();
    assert!(
        details.contains("\"migration\"")
            && details.contains("#/components/schemas/DeviceSummary\"")
            && details.contains("#/components/schemas/DeviceMigrationStatus\""),
        "{details}"
    );
    // Secrets are in the create and `…/secret` shapes only.
    for (name, has_secret) in [
        ("DeviceSummary", false),
        ("DeviceDetails", false),
        ("ProductSummary", false),
        ("CreatedDevice", true),
        ("DeviceSecret", true),
        ("CreatedProduct", true),
        ("ProductSecret", true),
    ] {
        let text = schemas[name].to_string();
        assert_eq!(text.contains("_secret"), has_secret, "{name}: {text}");
    }
    for (path, schema) in [
        ("/api/v1/products/{pk}/devices/{dn}", "DeviceDetails"),
        ("/api/v1/products/{pk}", "ProductSummary"),
        ("/api/v1/products/{pk}/devices/{dn}/secret", "DeviceSecret"),
        ("/api/v1/products/{pk}/secret", "ProductSecret"),
    ] {
        assert_eq!(
            doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
                ["$ref"],
            format!("#/components/schemas/{schema}"),
            "{path}"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert!(doc["info"]["description"]
        .as_str()
        .unwrap()
        .contains("FG.1001"));
    // Protected operations declare the bearer requirement, open ones do not.
    assert!(doc["paths"]["/api/v1/products"]["get"]["security"][0]
        .get("bearer")
        .is_some());
}

/// What the shared extractors and middleware answer is in the document for every operation
/// (schemathesis checks the live answers against it: docs/SECURITY.md, "Schema testing").
#[tokio::test]
async fn openapi_documents_the_shared_answers_of_every_operation() {
    let app = test_app();
    let doc = app.get("/api/v1/openapi.json", None).await.json();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            let has = |status: &str| responses.contains_key(status);
            let secured = op["security"][0].get("bearer").is_some();
            let takes_input = path.contains('{')
                || op["parameters"].as_array().is_some_and(|p| !p.is_empty())
                || op.get("requestBody").is_some();
            let what = format!("{method} {path}");
            assert_eq!(has("401"), secured, "{what}: 401 iff a token is needed");
            if secured && method != "get" {
                assert!(has("403"), "{what}: viewer tokens get 403");
            }
            if takes_input {
                assert!(has("400"), "{what}: invalid input gets 400");
            }
            if op.get("requestBody").is_some() {
                assert!(has("413"), "{what}: bodies have a limit");
            }
            if path.starts_with("/api/v1/export") || path.starts_with("/api/v1/import") {
                assert!(has("429"), "{what}: rate limited");
            }
            for p in op["parameters"].as_array().into_iter().flatten() {
                match p["name"].as_str().unwrap() {
                    "page" => assert_eq!(p["schema"]["minimum"], 1, "{what}"),
                    "page_size" => {
                        assert_eq!(p["schema"]["minimum"], 1, "{what}");
                        assert_eq!(p["schema"]["maximum"], 100, "{what}");
                    }
                    "dn" => assert_eq!(p["schema"]["pattern"], "^[A-Za-z0-9_@.:-]{4,32}$"),
                    _ => {}
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 70, "{checked} operations");
    // An annotation's own description wins over the shared one.
    assert_eq!(
        doc["paths"]["/api/v1/products/{pk}/devices"]["post"]["responses"]["403"]["description"],
        "Viewer token"
    );
}

/// Every request body field and query parameter states in the document the bounds the server
/// enforces on it: a string a length, pattern or enum; a number a maximum; a list or map a
/// maximum size (and its items or keys and values their own bounds); an object
/// `additionalProperties: false` (every request type and form refuses unknown fields). A field
/// the server really leaves unbounded is listed in `FREE` with the reason, so a new field is
/// not added without deciding which it is (docs/SECURITY.md, "Schema testing").
#[tokio::test]
async fn openapi_request_fields_state_their_bounds() {
    const FREE: &[(&str, &str)] = &[
        (
            "PublishRequest.payload",
            "any bytes (text or base64); the body limit bounds it",
        ),
        (
            "BroadcastRequest.payload",
            "any bytes (text or base64); the body limit bounds it",
        ),
        (
            "RrpcRequest.payload",
            "any bytes (text or base64); the body limit bounds it",
        ),
        (
            "BroadcastRequest.device_names[]",
            "a name that is no device is reported per device",
        ),
        (
            "BroadcastRequest.tag_key",
            "a tag filter: any value, matching no device at worst",
        ),
        (
            "BroadcastRequest.tag_value",
            "a tag filter: any value, matching no device at worst",
        ),
        (
            "CallRequest.params",
            "the call's parameters: any JSON object, for the device",
        ),
        (
            "ConfirmRequest.device_names[]",
            "each must have a task in the job (400 otherwise)",
        ),
        (
            "CancelTasksRequest.device_names[]",
            "each must have a task in the job (400 otherwise)",
        ),
        (
            "CanaryRequest.device_names[]",
            "refused row by row (unknown, duplicate, ineligible)",
        ),
        (
            "RollbackRequest.device_names[]",
            "refused row by row (unknown, duplicate, ineligible)",
        ),
        (
            "JobRequest.finish_by_ms",
            "any time after now and start_at_ms",
        ),
        (
            "JobRequest.start_at_ms",
            "any time (ms since the epoch, ≥ 0)",
        ),
        (
            "JobRequest.target_tags",
            "each tag narrows the selection; the body limit bounds them",
        ),
        ("TagFilter.value", "a tag value to match: any"),
        ("RampSpec.every_succeeded", "any step ≥ 1"),
        ("AbortSpec.min_finished", "any count ≥ 1"),
        (
            "AbortSpec.failure_reasons",
            "a set of enum values: repeats change nothing",
        ),
        (
            "ObjectRequest.id",
            "an object's id: an unknown one is refused by name (404)",
        ),
        (
            "ExportRequest.secrets_key",
            "a passphrase: at least 12 characters, no maximum",
        ),
        (
            "ImportForm.secrets_key",
            "the export's passphrase, whatever it was",
        ),
        ("JobUploadForm.job", "the job as JSON: checked as a JobSpec"),
        (
            "/api/v1/ota/jobs?firmware_id",
            "a filter: any value, matching no job at worst",
        ),
        (
            "/api/v1/ota/jobs?product_key",
            "a filter: any value, matching no job at worst",
        ),
        (
            "/api/v1/firmware?product_key",
            "a filter: any value, matching nothing at worst",
        ),
        (
            "/api/v1/migrations?product_key",
            "a filter: any value, matching nothing at worst",
        ),
        (
            "/api/v1/migrations/{tid}/devices?device_name",
            "a name substring to search for",
        ),
        (
            "/api/v1/products/{pk}/devices/{dn}/ota/timeline?job_id",
            "a filter: any job id",
        ),
        (
            "/api/v1/products/{pk}/ota/versions?module",
            "a module name to count: any",
        ),
        (
            "/firmware/{fid}/download?expires",
            "the link's unix time; a stale or forged one is 403",
        ),
    ];
    let app = test_app();
    let doc = app.get("/api/v1/openapi.json", None).await.json();
    let schemas = &doc["components"]["schemas"];
    let mut walk = BoundsWalk {
        schemas,
        seen: Default::default(),
        unbounded: Vec::new(),
    };
    let mut bodies = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for (media, content) in op["requestBody"]["content"]
                .as_object()
                .into_iter()
                .flatten()
            {
                // A CSV body is one string; the handler bounds its rows (documented per route).
                if media != "text/csv" {
                    let name = format!("{method} {path} ({media})");
                    walk.schema(&content["schema"], &name);
                    bodies += 1;
                }
            }
            for p in op["parameters"].as_array().into_iter().flatten() {
                if p["in"] == "query" {
                    let name = format!("{path}?{}", p["name"].as_str().unwrap());
                    walk.schema(&p["schema"], &name);
                }
            }
        }
    }
    assert!(bodies >= 25, "{bodies} request bodies");
    let free: std::collections::BTreeSet<&str> = FREE.iter().map(|(f, _)| *f).collect();
    let missing: Vec<&String> = walk
        .unbounded
        .iter()
        .filter(|f| !free.contains(f.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "request fields without the bounds their validators enforce (state them in the \
         schema, or list the field in FREE with the reason): {missing:#?}"
    );
    let stale: Vec<&&str> = free
        .iter()
        .filter(|f| !walk.unbounded.iter().any(|u| u == *f))
        .collect();
    assert!(
        stale.is_empty(),
        "FREE lists fields that are bounded or gone: {stale:?}"
    );
}

/// Walks request schemas, collecting the fields that state no bound.
struct BoundsWalk<'a> {
    schemas: &'a Value,
    seen: std::collections::HashSet<String>,
    unbounded: Vec<String>,
}

impl BoundsWalk<'_> {
    fn schema(&mut self, s: &Value, name: &str) {
        if let Some(r) = s["$ref"].as_str() {
            let target = r.trim_start_matches("#/components/schemas/");
            if self.seen.insert(target.to_owned()) {
                let resolved = self.schemas[target].clone();
                assert!(!resolved.is_null(), "{name}: dangling {r}");
                self.schema(&resolved, target);
            }
            return;
        }
        for key in ["oneOf", "anyOf", "allOf"] {
            for alt in s[key].as_array().into_iter().flatten() {
                self.schema(alt, name);
            }
        }
        let types: Vec<&str> = match &s["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let has = |k: &str| s.get(k).is_some_and(|v| !v.is_null());
        let bounded = has("enum") || has("const");
        for t in types {
            match t {
                "object" if has("properties") => {
                    if s["additionalProperties"] != Value::Bool(false) {
                        self.unbounded
                            .push(format!("{name} (additionalProperties)"));
                    }
                    for (field, fs) in s["properties"].as_object().unwrap() {
                        self.schema(fs, &format!("{name}.{field}"));
                    }
                }
                "object" if s["additionalProperties"].is_object() => {
                    if !has("maxProperties") {
                        self.unbounded.push(name.to_owned());
                    }
                    if !has("propertyNames") {
                        self.unbounded.push(format!("{name}{{keys}}"));
                    }
                    self.schema(&s["propertyNames"], &format!("{name}{{keys}}"));
                    self.schema(&s["additionalProperties"], &format!("{name}{{values}}"));
                }
                "object" => self.unbounded.push(name.to_owned()),
                "array" => {
                    if !has("maxItems") && !bounded {
                        self.unbounded.push(name.to_owned());
                    }
                    self.schema(&s["items"], &format!("{name}[]"));
                }
                "string"
                    if !(bounded
                        || s["format"] == "binary"
                        || has("maxLength")
                        || has("pattern")) =>
                {
                    self.unbounded.push(name.to_owned())
                }
                "integer" | "number" if !(bounded || has("maximum") || has("exclusiveMaximum")) => {
                    self.unbounded.push(name.to_owned())
                }
                _ => {}
            }
        }
        if s.is_object() && s.get("type").is_none() && s.get("$ref").is_none() {
            // A schema with no type (free JSON), unless it only combines others.
            let combines = ["oneOf", "anyOf", "allOf"]
                .iter()
                .any(|k| s.get(*k).is_some());
            let empty_name_schema = s.as_object().is_some_and(|o| o.is_empty());
            if !combines && !empty_name_schema {
                self.unbounded.push(name.to_owned());
            }
        }
    }
}
