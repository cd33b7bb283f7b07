//! The gateway's operator API as the benchmark uses it: provisioning (product + CSV batch
//! create), the checks afterwards (stored versions, online count, message counters), and the
//! plain JSON calls of the OTA and migration benchmarks (firmware upload, jobs, tasks,
//! migration tasks).

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// Rows per batch call (the API's maximum).
const BATCH_ROWS: usize = 10_000;
/// The API's largest page.
const PAGE_SIZE: usize = 100;

#[derive(Clone)]
pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// A provisioned device.
#[derive(Debug, Clone)]
pub struct Device {
    pub product_key: String,
    pub device_name: String,
    pub device_secret: String,
}

/// Device names `dev00000`, `dev00001`, …, with per-device secrets.
pub fn devices(product_key: &str, count: usize) -> Vec<Device> {
    (0..count)
        .map(|i| Device {
            product_key: product_key.to_owned(),
            device_name: format!("dev{i:05}"),
            device_secret: format!("s3cr3t-{product_key}-{i:05}-bench"),
        })
        .collect()
}

impl Api {
    pub fn new(http: SocketAddr, token: &str) -> Api {
        Api {
            base: format!("http://{http}"),
            token: token.to_owned(),
            // A gateway closes a connection that sends no request head for
            // `http.header_read_timeout_secs` (10 s by default); a pooled connection idle that
            // long could be reused just as it closes ("connection closed before message
            // completed" on a POST). Idle connections are dropped before that.
            http: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(4))
                .build()
                .unwrap_or_default(),
        }
    }

    /// Creates the product and its devices (CSV batches of ≤10,000 rows); every row must succeed.
    pub async fn provision(&self, product_key: &str, devices: &[Device]) -> anyhow::Result<()> {
        let resp = self
            .http
            .post(format!("{}/api/v1/products", self.base))
            .bearer_auth(&self.token)
            .json(&json!({"name": format!("bench {product_key}"), "product_key": product_key}))
            .send()
            .await?;
        let status = resp.status();
        ensure!(
            status.is_success(),
            "create product {product_key}: {status} {}",
            resp.text().await.unwrap_or_default()
        );
        for chunk in devices.chunks(BATCH_ROWS) {
            let mut csv = String::from("DeviceName,DeviceSecret\n");
            for d in chunk {
                csv.push_str(&format!("{},{}\n", d.device_name, d.device_secret));
            }
            let resp = self
                .http
                .post(format!(
                    "{}/api/v1/products/{product_key}/devices/batch",
                    self.base
                ))
                .bearer_auth(&self.token)
                .header("content-type", "text/csv")
                .body(csv)
                .send()
                .await?;
            let status = resp.status();
            let body: Value = resp.json().await.context("batch response")?;
            ensure!(status.is_success(), "batch create: {status} {body}");
            ensure!(
                body["failed"] == 0 && body["created"] == chunk.len(),
                "batch create: not every row created: created {} failed {}",
                body["created"],
                body["failed"]
            );
        }
        Ok(())
    }

    /// `{device_name: version}` of one module for every device of a product (paged).
    pub async fn versions(
        &self,
        product_key: &str,
        module: &str,
    ) -> anyhow::Result<HashMap<String, Option<String>>> {
        let mut out = HashMap::new();
        for page in 1.. {
            let resp = self
                .http
                .get(format!(
                    "{}/api/v1/products/{product_key}/devices",
                    self.base
                ))
                .query(&[("page", page), ("page_size", PAGE_SIZE)])
                .bearer_auth(&self.token)
                .send()
                .await?;
            let status = resp.status();
            let body: Value = resp.json().await?;
            ensure!(status.is_success(), "list devices: {status} {body}");
            let items = body["items"].as_array().context("no items")?;
            for d in items {
                let name = d["device_name"].as_str().context("no device_name")?;
                let version = d["versions"][module].as_str().map(str::to_owned);
                out.insert(name.to_owned(), version);
            }
            let total = body["total"].as_u64().context("no total")? as usize;
            if items.is_empty() || page * PAGE_SIZE >= total {
                break;
            }
        }
        Ok(out)
    }

    /// `GET {path}` with a query; the JSON body of a 2xx answer, otherwise an error naming it.
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Value> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .query(query)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        Self::json_of("GET", path, resp).await
    }

    /// `POST {path}` with a JSON body (`Value::Null`: no body).
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if !body.is_null() {
            req = req.json(body);
        }
        let resp = req.send().await.with_context(|| format!("POST {path}"))?;
        Self::json_of("POST", path, resp).await
    }

    async fn json_of(method: &str, path: &str, resp: reqwest::Response) -> anyhow::Result<Value> {
        let status = resp.status();
        let text = resp.text().await?;
        ensure!(status.is_success(), "{method} {path}: {status} {text}");
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).with_context(|| format!("{method} {path}: not JSON: {text}"))
    }

    /// Every item of a paged list (`{items, total}`), 100 per page.
    pub async fn all_items(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        for page in 1.. {
            let mut q = query.to_vec();
            q.push(("page", page.to_string()));
            q.push(("page_size", PAGE_SIZE.to_string()));
            let body = self.get(path, &q).await?;
            let items = body["items"].as_array().context("no items")?;
            out.extend(items.iter().cloned());
            let total = body["total"].as_u64().context("no total")? as usize;
            if items.is_empty() || page * PAGE_SIZE >= total {
                break;
            }
        }
        Ok(out)
    }

    /// Uploads a firmware package (`POST /api/v1/firmware`, multipart) and returns its id.
    pub async fn upload_firmware(
        &self,
        product_key: &str,
        version: &str,
        bytes: Vec<u8>,
    ) -> anyhow::Result<String> {
        let form = reqwest::multipart::Form::new()
            .text("product_key", product_key.to_owned())
            .text("version", version.to_owned())
            .part(
                "file",
                reqwest::multipart::Part::bytes(bytes).file_name("firmware.bin"),
            );
        let resp = self
            .http
            .post(format!("{}/api/v1/firmware", self.base))
            .bearer_auth(&self.token)
            .multipart(form)
            .send()
            .await?;
        let body = Self::json_of("POST", "/api/v1/firmware", resp).await?;
        Ok(body["firmware_id"]
            .as_str()
            .context("no firmware_id")?
            .to_owned())
    }

    /// `online_devices` from `/healthz`.
    pub async fn online(&self) -> anyhow::Result<u64> {
        let v: Value = self
            .http
            .get(format!("{}/healthz", self.base))
            .send()
            .await?
            .json()
            .await?;
        v["online_devices"].as_u64().context("no online_devices")
    }

    /// One sample of `/metrics` (exact series name with labels, e.g.
    /// `fleetgate_mqtt_messages_total{kind="inform"}`); 0 when the series does not exist yet.
    pub async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(series) {
                if let Some(v) = rest.strip_prefix(' ') {
                    return v.trim().parse().context("metric value");
                }
            }
        }
        if text.is_empty() {
            bail!("empty /metrics");
        }
        Ok(0.0)
    }
}
