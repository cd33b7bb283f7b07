//! A cluster on this machine: gateway *processes* (the real binary, so a node can be killed
//! with SIGKILL) on ephemeral ports, sharing a fresh PostgreSQL database and a cluster name of
//! their own on the local NATS server, optionally behind an HAProxy with a generated config.
//!
//! Services: PostgreSQL at `FLEETGATE_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), NATS at `FLEETGATE_TEST_NATS_URL` (default
//! `nats://127.0.0.1:4222`), `haproxy` on the PATH. A missing service fails the test with a
//! message saying how to start it: these tests never pass without what they test.

use fleetgate_topics::sign::{LinkCredentials, SignMethod};
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tempfile::TempDir;

pub const ADMIN_TOKEN: &str = "cluster-admin-token-0123456789";
/// HAProxy's source address towards the nodes: loopback, but not the one the tests' own
/// clients use (127.0.0.1), so a node can tell the balancer from a device connecting directly.
/// Every node trusts it to send PROXY headers (`mqtt.proxy_protocol = "trusted"`: clients from
/// elsewhere still connect directly, as several tests do).
pub const HAPROXY_SOURCE: &str = "127.0.0.3";
/// Upper bound for anything a test waits on (a broken build fails instead of hanging).
pub const WAIT: Duration = Duration::from_secs(20);

fn pg_url() -> String {
    std::env::var("FLEETGATE_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn nats_url() -> String {
    std::env::var("FLEETGATE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// A fresh database, dropped when the value is.
pub struct Database {
    pub url: String,
    name: String,
}

impl Database {
    pub async fn fresh() -> Database {
        let admin = pg_url();
        let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL at {admin} is needed for cluster tests ({e}); start it with \
                     `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
                )
            });
        tokio::spawn(conn);
        let name = unique("fg_cluster");
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("FLEETGATE_TEST_PG_URL needs a database path"),
        };
        Database { url, name }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        // Synchronous: Drop cannot await, and the test's runtime may be shutting down.
        let name = self.name.clone();
        let admin = pg_url();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                    .await
                    .ok()?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// One gateway process.
pub struct Node {
    pub id: u16,
    child: Child,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    /// How it was started, for [`Node::restart`].
    start: NodeStart,
    _data_dir: Arc<TempDir>,
}

/// What a node was started with.
#[derive(Clone)]
struct NodeStart {
    db_url: String,
    cluster: String,
    options: NodeOptions,
}

/// What a test adds to every node of its cluster.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// A configuration file's text (`--config`).
    pub config: Option<String>,
    /// Environment variables (`FLEETGATE_…`).
    pub env: Vec<(String, String)>,
}

impl Node {
    /// Starts node `id` with the test's configuration file and environment, and waits until
    /// it listens.
    pub fn start_with(id: u16, db: &Database, cluster: &str, options: &NodeOptions) -> Node {
        let start = NodeStart {
            db_url: db.url.clone(),
            cluster: cluster.to_owned(),
            options: options.clone(),
        };
        let data_dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        Node::spawn(id, start, data_dir, None)
    }

    /// A clean stop (SIGTERM: leases released, sessions ended, outbox flushed) and a start of
    /// the same node — same id, data directory and ports, so HAProxy finds it again — waiting
    /// until it listens.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Starts a node that was [`stop`](Node::stop)ped again — same id, data directory and
    /// ports — and waits until it listens.
    pub fn start_again(&mut self) {
        let listen = Some((self.mqtt, self.http));
        let replacement = Node::spawn(self.id, self.start.clone(), self._data_dir.clone(), listen);
        let old = std::mem::replace(self, replacement);
        // Its process is gone already; its log stays readable in this test's output.
        let lines = old.logs.lock().unwrap().clone();
        self.logs.lock().unwrap().splice(0..0, lines);
    }

    /// SIGTERM, and waits until the process exited (within [`WAIT`], else SIGKILL and fail).
    pub fn stop(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success(), "kill -TERM node {}", self.id);
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "node {} exited with {status:?}", self.id);
                return;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("node {} still running {WAIT:?} after SIGTERM", self.id);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(
        id: u16,
        start: NodeStart,
        data_dir: Arc<TempDir>,
        listen: Option<(SocketAddr, SocketAddr)>,
    ) -> Node {
        let options = &start.options;
        let (mqtt_listen, http_listen) = listen.map_or_else(
            || ("127.0.0.1:0".to_owned(), "127.0.0.1:0".to_owned()),
            |(m, h)| (m.to_string(), h.to_string()),
        );
        // `FLEETGATE_TEST_BIN` runs another build of the gateway (e.g. a copy kept while the
        // tree changes).
        let bin = std::env::var_os("FLEETGATE_TEST_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_fleetgate").into());
        let mut command = Command::new(bin);
        command.arg("serve");
        if let Some(config) = &options.config {
            let path = data_dir.path().join("test.toml");
            std::fs::write(&path, config).expect("write the node's config");
            command.arg("--config").arg(path);
        }
        let mut child = command
            .args([
                "--log-json",
                "--mqtt-listen",
                &mqtt_listen,
                "--http-listen",
                &http_listen,
                "--api-token",
                ADMIN_TOKEN,
                "--store",
                &start.db_url,
                "--nats-url",
                &nats_url(),
                "--node-id",
                &id.to_string(),
                "--cluster-name",
                &start.cluster,
            ])
            .arg("--data-dir")
            .arg(data_dir.path())
            // Short enough that the tests see a dead node released, long enough for a busy
            // machine's heartbeats.
            .env("FLEETGATE_CLUSTER_HEARTBEAT_MS", "300")
            .env("FLEETGATE_CLUSTER_NODE_TIMEOUT_MS", "3000")
            // A dead holder of the engines' lease is replaced within about 2.7 s.
            .env("FLEETGATE_CLUSTER_LEASE_TTL_MS", "2000")
            // HAProxy sends PROXY v2 headers (`send-proxy-v2`, haproxy.cfg.in).
            .env("FLEETGATE_MQTT_PROXY_PROTOCOL", "trusted")
            .env("FLEETGATE_MQTT_PROXY_TRUSTED", HAPROXY_SOURCE)
            // `FLEETGATE_TEST_NODE_LOG` replaces the nodes' log filter (e.g.
            // `info,fleetgate::cluster=debug` to chase a flaky test).
            .env(
                "RUST_LOG",
                std::env::var("FLEETGATE_TEST_NODE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fleetgate");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let logs = logs.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(addrs) = listening(&line) {
                        let _ = tx.send(addrs);
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let (mqtt, http) = match rx.recv_timeout(WAIT) {
            Ok(addrs) => addrs,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "node {id} did not start:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        Node {
            id,
            child,
            mqtt,
            http,
            logs,
            start,
            _data_dir: data_dir,
        }
    }

    /// SIGKILL: no shutdown, no flush, no goodbye.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// The node's data directory (`--data-dir`).
    pub fn data_dir(&self) -> &std::path::Path {
        self._data_dir.path()
    }

    pub fn api(&self) -> Api {
        Api::new(self.http)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- node {} log ----\n{}", self.id, self.logs());
        }
    }
}

/// The "fleetgate listening" line of a JSON log: the bound MQTT and HTTP addresses.
fn listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let v: Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?;
    if fields.get("message")?.as_str()? != "fleetgate listening" {
        return None;
    }
    Some((
        fields.get("mqtt")?.as_str()?.parse().ok()?,
        fields.get("http")?.as_str()?.parse().ok()?,
    ))
}

/// The node whose engine runs (as it says itself), once one does.
pub async fn engines_node(cluster: &Cluster, alive: &[u16]) -> u16 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        for &id in alive {
            let (_, body) = cluster.node(id).api().get("/api/v1/cluster").await;
            let this = body["nodes"]
                .as_array()
                .and_then(|n| n.iter().find(|n| n["self"] == true).cloned());
            if this.is_some_and(|n| n["engines"] == true) {
                return id;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no node drives the engines"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A call that may meet a takeover (503) is retried.
pub async fn call_retrying(
    api: &Api,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, v) = api.call(method.clone(), path, body.clone()).await;
        if status / 100 == 2 {
            return v;
        }
        assert!(
            status == 503 && tokio::time::Instant::now() < deadline,
            "{method} {path}: {status} {v}"
        );
        assert_eq!(v["error_code"], "FG.0503", "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `path` through `api` (retrying over a handover) until `done` says so; its body.
pub async fn wait_for(
    api: &Api,
    path: &str,
    what: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let v = call_retrying(api, reqwest::Method::GET, path, None).await;
        if done(&v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "never {what}: {v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Uploads `image` as `version` of `pk` through `node` (passed on to the engines' node);
/// the package as the API returns it.
pub async fn upload_firmware(node: &Node, pk: &str, version: &str, image: &[u8]) -> Value {
    let form = reqwest::multipart::Form::new()
        .text("product_key", pk.to_owned())
        .text("version", version.to_owned())
        .part(
            "file",
            reqwest::multipart::Part::bytes(image.to_vec()).file_name("fw.bin"),
        );
    let resp = reqwest::Client::new()
        .post(format!("http://{}/api/v1/firmware", node.http))
        .bearer_auth(ADMIN_TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    resp.json().await.unwrap()
}

/// The operator API of one node.
#[derive(Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(addr: SocketAddr) -> Api {
        Api {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("http request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn create_product(&self, name: &str) -> String {
        let (status, body) = self.post("/api/v1/products", json!({ "name": name })).await;
        assert_eq!(status, 201, "{body}");
        body["product_key"].as_str().unwrap().to_owned()
    }

    /// Creates a device; returns its secret.
    pub async fn create_device(&self, pk: &str, dn: &str) -> String {
        let (status, body) = self
            .post(
                &format!("/api/v1/products/{pk}/devices"),
                json!({ "device_name": dn }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["device_secret"].as_str().unwrap().to_owned()
    }

    /// Creates `names` in `pk` with one batch call; their secrets, in order.
    pub async fn create_devices(&self, pk: &str, names: &[String]) -> Vec<String> {
        let rows: Vec<Value> = names.iter().map(|dn| json!({"device_name": dn})).collect();
        let (s, b) = self
            .post(
                &format!("/api/v1/products/{pk}/devices/batch"),
                json!({ "devices": rows }),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        b["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["device_secret"].as_str().expect("secret").to_owned())
            .collect()
    }

    /// Waits until every device of `names` is online reporting `version`; how many each node
    /// holds.
    pub async fn wait_online_at(
        &self,
        pk: &str,
        names: impl IntoIterator<Item = &String>,
        version: &str,
    ) -> std::collections::BTreeMap<u64, usize> {
        let mut placed = std::collections::BTreeMap::new();
        for dn in names {
            let d = self
                .wait_device(pk, dn, &format!("online with {version}"), |d| {
                    d["online"] == true && d["versions"]["default"] == version
                })
                .await;
            *placed.entry(d["node"].as_u64().unwrap()).or_default() += 1;
        }
        placed
    }

    /// A STATIC OTA job to every device of `fid`'s product at `per_minute`; its id.
    pub async fn start_job(&self, fid: &str, per_minute: u64, timeout_seconds: u64) -> String {
        let (status, job) = self
            .post(
                "/api/v1/ota/jobs",
                json!({
                    "firmware_id": fid,
                    "target": "ALL",
                    "force": true,
                    "timeout_seconds": timeout_seconds,
                    "rate": {"per_minute": per_minute}
                }),
            )
            .await;
        assert_eq!(status, 201, "{job}");
        job["job_id"].as_str().unwrap().to_owned()
    }

    /// A migration task of `pk` to `target` whose canary (`canary`, one device) is done; its id.
    pub async fn migration_past_canary(&self, pk: &str, target: &str, canary: &str) -> String {
        let (s, task) = self
            .post(
                "/api/v1/migrations",
                json!({"product_key": pk, "target_instance_id": target}),
            )
            .await;
        assert_eq!(s, 201, "{task}");
        let tid = task["task_id"].as_str().unwrap().to_owned();
        let (s, b) = self
            .post(
                &format!("/api/v1/migrations/{tid}/canary"),
                json!({ "device_names": [canary] }),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        wait_for(
            self,
            &format!("/api/v1/migrations/{tid}"),
            "CANARY_COMPLETED",
            Duration::from_secs(30),
            |t| t["state"] == "CANARY_COMPLETED",
        )
        .await;
        tid
    }

    pub async fn device(&self, pk: &str, dn: &str) -> Value {
        let (status, body) = self
            .get(&format!("/api/v1/products/{pk}/devices/{dn}"))
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Polls a device until `pred` holds.
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
            assert!(
                tokio::time::Instant::now() < deadline,
                "device {pk}/{dn} never got {what} (via {}): {d}",
                self.base
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

pub fn credentials(pk: &str, dn: &str, secret: &str) -> LinkCredentials {
    LinkCredentials::new(pk, dn, secret, SignMethod::HmacSha256, 3, None)
}

/// A device whose event loop runs in the background; `ended` turns true when its connection
/// ends (the tests do not reconnect unless asked).
pub struct Device {
    pub client: AsyncClient,
    pub incoming: tokio::sync::mpsc::UnboundedReceiver<Packet>,
    pub ended: tokio::sync::watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn options(addr: SocketAddr, creds: &LinkCredentials) -> MqttOptions {
    let mut opts = MqttOptions::new(creds.client_id.clone(), addr.ip().to_string(), addr.port());
    opts.set_credentials(creds.username.clone(), creds.password.clone());
    opts.set_keep_alive(Duration::from_secs(30));
    opts
}

/// Connects and waits for the CONNACK.
pub async fn try_connect(
    addr: SocketAddr,
    creds: &LinkCredentials,
) -> Result<Device, ConnectReturnCode> {
    try_connect_with(options(addr, creds)).await
}

/// Connects with a persistent session (`clean_session = 0`) and waits for the CONNACK.
pub async fn connect_persistent(addr: SocketAddr, creds: &LinkCredentials) -> Device {
    let mut opts = options(addr, creds);
    opts.set_clean_session(false);
    match try_connect_with(opts).await {
        Ok(d) => d,
        Err(code) => panic!("device {} refused: {code:?}", creds.username),
    }
}

async fn try_connect_with(opts: MqttOptions) -> Result<Device, ConnectReturnCode> {
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
    let (tx, incoming) = tokio::sync::mpsc::unbounded_channel();
    let (end_tx, ended) = tokio::sync::watch::channel(false);
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
        let _ = end_tx.send(true);
    });
    Ok(Device {
        client,
        incoming,
        ended,
        task,
    })
}

pub async fn connect(addr: SocketAddr, creds: &LinkCredentials) -> Device {
    match try_connect(addr, creds).await {
        Ok(d) => d,
        Err(code) => panic!("device {} refused: {code:?}", creds.username),
    }
}

/// A device that reconnects by itself (rumqttc re-polls after an error), counting its
/// successful CONNACKs.
pub struct ReconnectingDevice {
    /// Kept: the event loop ends when every client handle is gone.
    _client: AsyncClient,
    pub connacks: tokio::sync::watch::Receiver<u32>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ReconnectingDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn reconnecting(addr: SocketAddr, creds: &LinkCredentials) -> ReconnectingDevice {
    let (client, mut eventloop) = AsyncClient::new(options(addr, creds), 64);
    let (tx, connacks) = tokio::sync::watch::channel(0u32);
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack)))
                    if ack.code == ConnectReturnCode::Success =>
                {
                    tx.send_modify(|n| *n += 1);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    ReconnectingDevice {
        _client: client,
        connacks,
        task,
    }
}

/// A TCP relay on 127.0.0.1 that connects to `to` from `source` (another loopback address):
/// a client that cannot bind its own socket (rumqttc) seen at `to` as coming from `source`.
/// Each relayed connection starts with `prefix` (e.g. a PROXY header). Relays until the test's
/// runtime ends.
pub async fn relay_from(source: &str, to: SocketAddr, prefix: Vec<u8>) -> SocketAddr {
    let source: SocketAddr = SocketAddr::new(source.parse().expect("source address"), 0);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("relay listener");
    let addr = listener.local_addr().expect("relay address");
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let prefix = prefix.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                socket.bind(source).expect("bind the relay's source");
                if let Ok(mut server) = socket.connect(to).await {
                    if server.write_all(&prefix).await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                }
            });
        }
    });
    addr
}

/// An HAProxy in TCP mode in front of the nodes' MQTT listeners, hashing on the CONNECT
/// username and sending PROXY v2 headers from [`HAPROXY_SOURCE`] (`deploy/haproxy.cfg` is the
/// same configuration for a deployment).
pub struct Haproxy {
    child: Child,
    pub addr: SocketAddr,
    _dir: TempDir,
}

/// A port that was free a moment ago (HAProxy cannot report an ephemeral port back).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Haproxy {
    pub fn start(nodes: &[&Node]) -> Haproxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let servers: String = nodes
            .iter()
            .map(|n| {
                format!(
                    "    server node{id} {mqtt} send-proxy-v2 check port {http} inter 500ms fall 2 rise 2\n",
                    id = n.id,
                    mqtt = n.mqtt,
                    http = n.http.port()
                )
            })
            .collect();
        let config = format!(
            include_str!("haproxy.cfg.in"),
            bind = format!("127.0.0.1:{port}"),
            source = HAPROXY_SOURCE,
            servers = servers
        );
        let path: PathBuf = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("haproxy is needed for cluster tests ({e}); install it with `apt-get install haproxy`")
            });
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "haproxy did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Haproxy {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cluster of `n` nodes (ids 1..=n) on a fresh database and its own NATS subjects.
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// Dropped (the database with it) after the nodes.
    pub db: Database,
}

impl Cluster {
    pub async fn start(n: u16) -> Cluster {
        Cluster::start_with(n, &NodeOptions::default()).await
    }

    pub async fn start_with(n: u16, options: &NodeOptions) -> Cluster {
        let db = Database::fresh().await;
        let name = unique("t");
        let nodes = (1..=n)
            .map(|id| Node::start_with(id, &db, &name, options))
            .collect();
        let cluster = Cluster { nodes, db };
        cluster.wait_members(n as usize).await;
        cluster
    }

    pub fn node(&self, id: u16) -> &Node {
        self.nodes.iter().find(|n| n.id == id).expect("node")
    }

    pub fn node_mut(&mut self, id: u16) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.id == id).expect("node")
    }

    /// Waits until every node sees `n` live nodes (itself included).
    pub async fn wait_members(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        for node in &self.nodes {
            loop {
                let (_, body) = node.api().get("/api/v1/cluster").await;
                let seen = body["nodes"].as_array().map_or(0, |a| a.len());
                if seen == n {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "node {} sees {seen} nodes, not {n}: {body}",
                    node.id
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
