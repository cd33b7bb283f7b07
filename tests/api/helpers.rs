//! `spawn_app()` and the `TestApp` handle every integration test uses: an in-process gateway on
//! ephemeral ports (127.0.0.1:0) with its own temporary data dir, an HTTP client that speaks
//! the operator API, and signed rumqttc devices.

use fleetgate::app::Application;
use fleetgate::config::{Overrides, Secret, Settings, TokenSetting};
use fleetgate_topics::sign::{LinkCredentials, SignMethod};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet,
};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tempfile::TempDir;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const VIEWER_TOKEN: &str = "test-viewer-token-0123456789";
pub const OPERATOR_TOKEN: &str = "test-operator-token-0123456789";
/// Upper bound for anything a test waits on; only there so a broken build fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestApp {
    app: Option<Application>,
    settings: Settings,
    /// Kept so the data dir lives as long as the app.
    _data_dir: TempDir,
    pub http: reqwest::Client,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// [`spawn_app`] with settings adjusted by `adjust` first (e.g. an AMQP URL).
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let mut settings = Settings::load(
        None,
        Overrides {
            mqtt_listen: Some("127.0.0.1:0".parse().unwrap()),
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            data_dir: Some(data_dir.path().to_owned()),
            api_token: Some(ADMIN_TOKEN.into()),
            ..Default::default()
        },
    )
    .expect("settings");
    settings.api.tokens.push(TokenSetting {
        token: Secret::new(VIEWER_TOKEN),
        role: "viewer".into(),
    });
    settings.api.tokens.push(TokenSetting {
        token: Secret::new(OPERATOR_TOKEN),
        role: "operator".into(),
    });
    adjust(&mut settings);
    let app = Application::build(settings.clone())
        .await
        .expect("app starts");
    TestApp {
        app: Some(app),
        settings,
        _data_dir: data_dir,
        // Idle pooled connections are dropped well before the gateway's keep-alive idle
        // timeout (`http.header_read_timeout_secs`, 10 s), so a request never races the
        // gateway closing the connection it is sent on.
        http: reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(5))
            .build()
            .expect("HTTP client"),
    }
}

impl TestApp {
    pub fn app(&self) -> &Application {
        self.app.as_ref().expect("app running")
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.app().mqtt_addr()
    }

    /// The gateway's data directory (kept across [`restart`](Self::restart)).
    pub fn data_dir(&self) -> &std::path::Path {
        self._data_dir.path()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.app().http_addr(), path)
    }

    /// Stop the gateway cleanly and start it again on the same data dir (new ports).
    pub async fn restart(&mut self) {
        self.stop().await;
        let app = Application::build(self.settings.clone())
            .await
            .expect("app restarts");
        self.app = Some(app);
    }

    pub async fn stop(&mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().await.expect("clean shutdown");
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::GET, path, None, Some(ADMIN_TOKEN))
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, Some(body), Some(ADMIN_TOKEN))
            .await
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("http request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// Create a product and return its key.
    pub async fn create_product(&self, name: &str) -> String {
        let (status, body) = self.post("/api/v1/products", json!({ "name": name })).await;
        assert_eq!(status, 201, "{body}");
        body["product_key"]
            .as_str()
            .expect("product_key")
            .to_owned()
    }

    /// Create a device and return its secret.
    pub async fn create_device(&self, pk: &str, dn: &str) -> String {
        let (status, body) = self
            .post(
                &format!("/api/v1/products/{pk}/devices"),
                json!({ "device_name": dn }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["device_secret"]
            .as_str()
            .expect("device_secret")
            .to_owned()
    }

    pub async fn device(&self, pk: &str, dn: &str) -> Value {
        let (status, body) = self
            .get(&format!("/api/v1/products/{pk}/devices/{dn}"))
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// A device's secret, from `GET …/devices/{dn}/secret` (the only read that returns it).
    pub async fn device_secret(&self, pk: &str, dn: &str) -> String {
        let (status, body) = self
            .get(&format!("/api/v1/products/{pk}/devices/{dn}/secret"))
            .await;
        assert_eq!(status, 200, "{body}");
        body["device_secret"]
            .as_str()
            .expect("device_secret")
            .to_owned()
    }

    /// A product's secret, from `GET /api/v1/products/{pk}/secret` (admin).
    pub async fn product_secret(&self, pk: &str) -> String {
        let (status, body) = self.get(&format!("/api/v1/products/{pk}/secret")).await;
        assert_eq!(status, 200, "{body}");
        body["product_secret"]
            .as_str()
            .expect("product_secret")
            .to_owned()
    }

    /// Poll a device until `pred` holds (the gateway applies MQTT events asynchronously).
    pub async fn wait_device(
        &self,
        pk: &str,
        dn: &str,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let d = self.device(pk, dn).await;
            if pred(&d) {
                return d;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("device {pk}/{dn} never got {what}: {d}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one sample of `/metrics` (e.g. `fleetgate_forwarder_published_total`);
    /// 0 when it is not there yet.
    pub async fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

/// A connected rumqttc device whose event loop runs in the background.
pub struct Device {
    pub client: AsyncClient,
    pub incoming: tokio::sync::mpsc::UnboundedReceiver<Packet>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn options(addr: SocketAddr, creds: &LinkCredentials) -> MqttOptions {
    let mut opts = MqttOptions::new(creds.client_id.clone(), addr.ip().to_string(), addr.port());
    opts.set_credentials(creds.username.clone(), creds.password.clone());
    opts.set_keep_alive(Duration::from_secs(30));
    opts
}

pub fn credentials(pk: &str, dn: &str, secret: &str) -> LinkCredentials {
    LinkCredentials::new(pk, dn, secret, SignMethod::HmacSha256, 3, None)
}

/// Connect and wait for the CONNACK: `Ok(device)` or `Err(return code)`.
pub async fn try_connect(
    addr: SocketAddr,
    creds: &LinkCredentials,
) -> Result<Device, ConnectReturnCode> {
    try_connect_with(options(addr, creds)).await
}

/// [`try_connect`] with options of the caller's (e.g. `clean_session = false`).
pub async fn try_connect_with(opts: MqttOptions) -> Result<Device, ConnectReturnCode> {
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let first = tokio::time::timeout(WAIT, eventloop.poll())
        .await
        .expect("CONNACK in time");
    match first {
        Ok(Event::Incoming(Packet::ConnAck(ack))) if ack.code == ConnectReturnCode::Success => {}
        Ok(Event::Incoming(Packet::ConnAck(ack))) => return Err(ack.code),
        Err(ConnectionError::ConnectionRefused(code)) => return Err(code),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    Ok(spawn_eventloop(client, eventloop))
}

pub async fn connect(addr: SocketAddr, creds: &LinkCredentials) -> Device {
    match try_connect(addr, creds).await {
        Ok(d) => d,
        Err(code) => panic!("device refused: {code:?}"),
    }
}

fn spawn_eventloop(client: AsyncClient, mut eventloop: EventLoop) -> Device {
    let (tx, incoming) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(p)) => {
                    let _ = tx.send(p);
                }
                Ok(Event::Outgoing(_)) => {}
                Err(_) => break,
            }
        }
    });
    Device {
        client,
        incoming,
        task,
    }
}

impl Device {
    /// The next incoming PUBLISH (skipping acks and pings).
    pub async fn next_publish(&mut self) -> rumqttc::Publish {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.incoming.recv()).await {
                Ok(Some(Packet::Publish(p))) => return p,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("device connection closed"),
                Err(_) => panic!("no PUBLISH within {WAIT:?}"),
            }
        }
    }

    /// Wait for a packet matching `pred`.
    pub async fn wait_packet(&mut self, what: &str, pred: impl Fn(&Packet) -> bool) -> Packet {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.incoming.recv()).await {
                Ok(Some(p)) if pred(&p) => return p,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("device connection closed while waiting for {what}"),
                Err(_) => panic!("no {what} within {WAIT:?}"),
            }
        }
    }

    /// True when the event loop has ended (connection closed by the gateway).
    pub async fn closed_within(&mut self, d: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.incoming.recv()).await {
                Ok(Some(_)) => continue,
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }
}

/// A gateway forwarding to the RabbitMQ at `url` under exchange prefix `prefix`, returned once
/// its forwarder reports `connected` (within 60 s).
pub async fn spawn_app_with_amqp(url: &str, prefix: &str) -> TestApp {
    spawn_app_with_amqp_and(url, prefix, |_| {}).await
}

/// [`spawn_app_with_amqp`] with the settings adjusted by `adjust` first.
pub async fn spawn_app_with_amqp_and(
    url: &str,
    prefix: &str,
    adjust: impl FnOnce(&mut Settings),
) -> TestApp {
    let (url, prefix) = (url.to_owned(), prefix.to_owned());
    let app = spawn_app_with(move |s| {
        s.amqp.url = Some(fleetgate::config::Secret::new(url));
        s.amqp.exchange_prefix = prefix;
        adjust(s);
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, health) = app.get("/healthz").await;
        if health["amqp"] == "connected" {
            return app;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "forwarder never connected: {health}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A PostgreSQL database of its own for one test: created on the server at
/// `FLEETGATE_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`, trust auth)
/// and dropped when this guard is, also when the test fails. An unreachable server fails the
/// test.
pub struct PgTestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl PgTestDatabase {
    pub fn create() -> PgTestDatabase {
        let admin_url = std::env::var("FLEETGATE_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        // The process id keeps this binary apart from the library's tests (`fg_test_…`).
        let name = format!(
            "fg_apitest_{}_{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        pg_execute(&admin_url, &format!("CREATE DATABASE {name}")).unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {admin_url} is unreachable or refused ({e}): start it with \
                 `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, or \
                 point FLEETGATE_TEST_PG_URL at a server (trust auth)"
            )
        });
        let (base, params) = match admin_url.split_once('?') {
            Some((base, params)) => (base, format!("?{params}")),
            None => (admin_url.as_str(), String::new()),
        };
        let authority = base.find("://").map_or(0, |i| i + 3);
        let path = base[authority..]
            .find('/')
            .map_or(base.len(), |i| authority + i);
        let url = format!("{}/{name}{params}", &base[..path]);
        PgTestDatabase {
            admin_url,
            name,
            url,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The single integer `sql` selects.
    pub fn query_i64(&self, sql: &str) -> i64 {
        pg_query_i64(&self.url, sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

impl Drop for PgTestDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = pg_execute(&self.admin_url, &sql) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// Runs `work` with a connection to `url` on a thread and runtime of its own (the caller may
/// be a test's runtime thread, which cannot block on another runtime).
fn with_pg<T: Send + 'static>(
    url: &str,
    work: impl for<'c> FnOnce(
            &'c tokio_postgres::Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + 'c>,
        > + Send
        + 'static,
) -> Result<T, String> {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("{e:?}"))?;
            tokio::spawn(connection);
            work(&client).await.map_err(|e| format!("{e:?}"))
        })
    })
    .join()
    .map_err(|_| "the PostgreSQL helper thread panicked".to_owned())?
}

fn pg_execute(url: &str, sql: &str) -> Result<(), String> {
    let sql = sql.to_owned();
    with_pg(url, move |client| {
        Box::pin(async move { client.batch_execute(&sql).await })
    })
}

fn pg_query_i64(url: &str, sql: &str) -> Result<i64, String> {
    let sql = sql.to_owned();
    with_pg(url, move |client| {
        Box::pin(async move { client.query_one(&sql, &[]).await?.try_get(0) })
    })
}
