//! Where a fleet's devices come from: a device list (CSV or JSON), locally made-up devices, or
//! devices created through the gateway's HTTP API (`POST /api/v1/products/{pk}/devices/batch`).
//!
//! Only the HTTP API is used, never the gateway's internals. Responses are parsed tolerantly:
//! the created rows' `device_name`/`device_secret` are taken wherever they sit.

use fleetgate_topics::sign::SignMethod;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One device's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    pub product_key: String,
    pub device_name: String,
    pub device_secret: String,
    /// Overrides the fleet's sign method for this device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign_method: Option<String>,
}

impl DeviceSpec {
    pub fn new(pk: &str, dn: &str, secret: &str) -> Self {
        DeviceSpec {
            product_key: pk.into(),
            device_name: dn.into(),
            device_secret: secret.into(),
            sign_method: None,
        }
    }

    /// The per-device sign method, if set and valid.
    pub fn sign_method(&self) -> Option<SignMethod> {
        self.sign_method.as_deref().and_then(|s| s.parse().ok())
    }
}

/// Why a device list could not be loaded or devices not provisioned.
#[derive(Debug, thiserror::Error)]
pub enum DeviceListError {
    #[error("cannot read device list {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("device list {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("device list {path} has no devices")]
    Empty { path: PathBuf },
    #[error("cannot write device list {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("provisioning through {url}: {message}")]
    Provision { url: String, message: String },
    #[error("the gateway's MQTT address ({url}): {message}")]
    GatewayMqtt { url: String, message: String },
}

/// The MQTT address of the gateway whose API is at `api`, as its `/healthz` reports it (see
/// [`mqtt_address_for`]), checked against `explicit` (`--mqtt` / `mqtt.address`, when the user
/// gave one): provisioning through one gateway and connecting to another broker would only
/// produce refused CONNECTs or, worse, a foreign broker that accepts anything.
pub async fn gateway_mqtt(api: &str, explicit: Option<&str>) -> Result<String, DeviceListError> {
    let url = format!("{}/healthz", api.trim_end_matches('/'));
    let err = |message: String| DeviceListError::GatewayMqtt {
        url: url.clone(),
        message,
    };
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| err(e.to_string()))?;
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| err(format!("{e} (is the gateway running there?)")))?;
    if !resp.status().is_success() {
        return Err(err(format!("HTTP {}", resp.status())));
    }
    let body: Value = resp.json().await.map_err(|e| err(e.to_string()))?;
    let reported = body["mqtt"]
        .as_str()
        .ok_or_else(|| err("no `mqtt` address in the answer".into()))?;
    mqtt_address_for(api, reported, explicit).map_err(err)
}

/// Where to connect to the gateway that reported `reported` (its bound MQTT address) on its
/// API at `api`: an unspecified bind address (`0.0.0.0`, `::`) is reached through the API's
/// host. With `explicit` (the user's `--mqtt`) the port must agree: its host may differ (a
/// name, a NAT), a different port is another broker.
pub fn mqtt_address_for(
    api: &str,
    reported: &str,
    explicit: Option<&str>,
) -> Result<String, String> {
    let addr: std::net::SocketAddr = reported
        .parse()
        .map_err(|_| format!("the gateway reported {reported:?}, not an address"))?;
    let resolved = if addr.ip().is_unspecified() {
        let url = reqwest::Url::parse(api).map_err(|e| format!("--api {api}: {e}"))?;
        let host = url
            .host_str()
            .ok_or_else(|| format!("--api {api} has no host"))?;
        format!("{host}:{}", addr.port())
    } else {
        addr.to_string()
    };
    match explicit {
        None => Ok(resolved),
        Some(given) => {
            let port = given
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok());
            if port == Some(addr.port()) {
                Ok(given.to_owned())
            } else {
                Err(format!(
                    "the gateway at {api} takes MQTT on {reported}, but the MQTT address given \
                     is {given}: drop --mqtt (the simulator then uses the gateway's) or point \
                     --api at the gateway that listens there"
                ))
            }
        }
    }
}

/// Loads a CSV (`ProductKey,DeviceName,DeviceSecret[,SignMethod]`, header required, column
/// names case-insensitive and also in snake_case) or JSON (an array of objects, or
/// `{"devices": [...]}`, keys `product_key`/`productKey`/`ProductKey`, …) device list.
pub fn load(path: &Path) -> Result<Vec<DeviceSpec>, DeviceListError> {
    let text = std::fs::read_to_string(path).map_err(|source| DeviceListError::Read {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |message: String| DeviceListError::Invalid {
        path: path.to_owned(),
        message,
    };
    let is_json =
        path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with(['[', '{']);
    let devices = if is_json {
        parse_json(&text).map_err(invalid)?
    } else {
        parse_csv(&text).map_err(invalid)?
    };
    if devices.is_empty() {
        return Err(DeviceListError::Empty {
            path: path.to_owned(),
        });
    }
    let mut seen = std::collections::HashSet::new();
    for d in &devices {
        if !seen.insert((&d.product_key, &d.device_name)) {
            return Err(invalid(format!(
                "device {}/{} is listed twice",
                d.product_key, d.device_name
            )));
        }
    }
    Ok(devices)
}

fn norm(h: &str) -> String {
    h.trim()
        .trim_start_matches('\u{feff}')
        .chars()
        .filter(|c| *c != '_' && *c != '-' && *c != ' ')
        .collect::<String>()
        .to_ascii_lowercase()
}

fn check(d: &DeviceSpec, row: &str) -> Result<(), String> {
    for (field, v) in [
        ("ProductKey", &d.product_key),
        ("DeviceName", &d.device_name),
        ("DeviceSecret", &d.device_secret),
    ] {
        if v.is_empty() {
            return Err(format!("{row}: {field} is empty"));
        }
    }
    for (field, v) in [
        ("ProductKey", &d.product_key),
        ("DeviceName", &d.device_name),
    ] {
        if v.contains(['/', '+', '#', '&', '\0']) {
            return Err(format!("{row}: {field} `{v}` contains / + # & or NUL"));
        }
    }
    if let Some(m) = &d.sign_method {
        m.parse::<SignMethod>()
            .map_err(|e| format!("{row}: SignMethod: {e}"))?;
    }
    Ok(())
}

/// Parses the CSV form.
pub fn parse_csv(text: &str) -> Result<Vec<DeviceSpec>, String> {
    let mut r = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(true)
        .from_reader(text.as_bytes());
    let headers = r.headers().map_err(|e| e.to_string())?.clone();
    let col = |name: &str| headers.iter().position(|h| norm(h) == name);
    let (pk, dn, secret) = match (col("productkey"), col("devicename"), col("devicesecret")) {
        (Some(a), Some(b), Some(c)) => (a, b, c),
        _ => {
            return Err(format!(
                "header must name ProductKey, DeviceName and DeviceSecret (found: {})",
                headers.iter().collect::<Vec<_>>().join(",")
            ))
        }
    };
    let sign = col("signmethod");
    let mut out = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let row = format!("row {}", i + 2);
        let rec = rec.map_err(|e| format!("{row}: {e}"))?;
        if rec.iter().all(|f| f.is_empty()) {
            continue;
        }
        let get = |c: usize| rec.get(c).unwrap_or("").to_owned();
        let d = DeviceSpec {
            product_key: get(pk),
            device_name: get(dn),
            device_secret: get(secret),
            sign_method: sign.map(get).filter(|s| !s.is_empty()),
        };
        check(&d, &row)?;
        out.push(d);
    }
    Ok(out)
}

/// Parses the JSON form.
pub fn parse_json(text: &str) -> Result<Vec<DeviceSpec>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let items = match &v {
        Value::Array(a) => a,
        Value::Object(o) => match o.get("devices") {
            Some(Value::Array(a)) => a,
            _ => return Err("expected an array or {\"devices\": [...]}".into()),
        },
        _ => return Err("expected an array or {\"devices\": [...]}".into()),
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let row = format!("devices[{i}]");
        let get = |names: &[&str]| -> String {
            item.as_object()
                .and_then(|o| {
                    o.iter()
                        .find(|(k, _)| names.contains(&norm(k).as_str()))
                        .and_then(|(_, v)| v.as_str())
                })
                .unwrap_or("")
                .to_owned()
        };
        let sign = get(&["signmethod"]);
        let d = DeviceSpec {
            product_key: get(&["productkey"]),
            device_name: get(&["devicename"]),
            device_secret: get(&["devicesecret"]),
            sign_method: (!sign.is_empty()).then_some(sign),
        };
        check(&d, &row)?;
        out.push(d);
    }
    Ok(out)
}

/// Writes a device list as CSV (the format [`load`] reads).
pub fn save(path: &Path, devices: &[DeviceSpec]) -> Result<(), DeviceListError> {
    let err = |message: String| DeviceListError::Write {
        path: path.to_owned(),
        message,
    };
    let mut w = csv::Writer::from_path(path).map_err(|e| err(e.to_string()))?;
    w.write_record(["ProductKey", "DeviceName", "DeviceSecret", "SignMethod"])
        .map_err(|e| err(e.to_string()))?;
    for d in devices {
        w.write_record([
            &d.product_key,
            &d.device_name,
            &d.device_secret,
            d.sign_method.as_deref().unwrap_or(""),
        ])
        .map_err(|e| err(e.to_string()))?;
    }
    w.flush().map_err(|e| err(e.to_string()))
}

/// A short random tag, so that names of two provisioning runs never collide.
pub fn run_tag(seed: u64) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7461_6773);
    format!("{:04x}", rng.gen::<u16>())
}

/// Device names `{prefix}{00001..}`.
pub fn names(prefix: &str, n: usize) -> Vec<String> {
    let width = n.to_string().len().max(5);
    (1..=n).map(|i| format!("{prefix}{i:0width$}")).collect()
}

fn secret(rng: &mut ChaCha8Rng) -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..32)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

/// `n` made-up devices with random secrets (for brokers that do not authenticate).
pub fn generate(product_key: &str, prefix: &str, n: usize, seed: u64) -> Vec<DeviceSpec> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6765_6e65_7261_7465);
    names(prefix, n)
        .into_iter()
        .map(|dn| DeviceSpec::new(product_key, &dn, &secret(&mut rng)))
        .collect()
}

/// What provisioning did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Provisioned {
    pub devices: Vec<DeviceSpec>,
    /// `(device name, message)` of rows the gateway refused.
    pub failed: Vec<(String, String)>,
}

/// Rows per batch request (the API accepts at most 10,000).
const BATCH: usize = 5_000;

/// Creates `n` devices named `{prefix}{i}` in product `product_key` through the gateway's batch
/// API, sending secrets it generated (CSV `DeviceName,DeviceSecret`), and returns them with the
/// secrets the gateway reports (its own when it reports one).
pub async fn provision(
    api: &str,
    token: Option<&str>,
    product_key: &str,
    prefix: &str,
    n: usize,
    seed: u64,
) -> Result<Provisioned, DeviceListError> {
    let url = format!(
        "{}/api/v1/products/{}/devices/batch",
        api.trim_end_matches('/'),
        product_key
    );
    let perr = |message: String| DeviceListError::Provision {
        url: url.clone(),
        message,
    };
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .map_err(|e| perr(e.to_string()))?;
    let wanted = generate(product_key, prefix, n, seed);
    let mut out = Provisioned::default();
    for chunk in wanted.chunks(BATCH) {
        let mut body = String::from("DeviceName,DeviceSecret\n");
        for d in chunk {
            body.push_str(&d.device_name);
            body.push(',');
            body.push_str(&d.device_secret);
            body.push('\n');
        }
        let mut req = client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "text/csv")
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| perr(format!("cannot reach the API: {e}")))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| perr(e.to_string()))?;
        if !status.is_success() {
            let hint = match status.as_u16() {
                401 => " (set --api-token or FLEETGATE_API_TOKEN)",
                403 => " (the token may not create devices)",
                404 => " (does the product exist?)",
                _ => "",
            };
            return Err(perr(format!("HTTP {status}{hint}: {}", truncate(&text))));
        }
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| perr(format!("response is not JSON ({e}): {}", truncate(&text))))?;
        let parsed = parse_batch_response(&v, product_key, chunk);
        out.devices.extend(parsed.devices);
        out.failed.extend(parsed.failed);
    }
    Ok(out)
}

fn truncate(s: &str) -> String {
    if s.len() <= 300 {
        s.to_owned()
    } else {
        let mut end = 300;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

fn str_at<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a str> {
    let o = v.as_object()?;
    keys.iter()
        .find_map(|k| o.get(*k).and_then(Value::as_str))
        .filter(|s| !s.is_empty())
}

/// Reads a batch response: `results[]` rows with `status` `created`/`failed`, the device either
/// nested under `device` or inline. Created rows without a secret keep the one we sent.
pub fn parse_batch_response(v: &Value, product_key: &str, sent: &[DeviceSpec]) -> Provisioned {
    let mut out = Provisioned::default();
    let sent_secret = |dn: &str| {
        sent.iter()
            .find(|d| d.device_name == dn)
            .map(|d| d.device_secret.clone())
    };
    let results = v
        .get("results")
        .or_else(|| v.get("devices"))
        .and_then(Value::as_array);
    let Some(results) = results else {
        // No per-row results: trust the count of created devices if there is one.
        if v.get("failed").and_then(Value::as_u64) == Some(0) {
            out.devices = sent.to_vec();
        } else {
            out.failed = sent
                .iter()
                .map(|d| (d.device_name.clone(), "no per-row result".to_owned()))
                .collect();
        }
        return out;
    };
    for r in results {
        let dev = r.get("device").unwrap_or(r);
        let name = str_at(dev, &["device_name", "deviceName", "DeviceName"])
            .or_else(|| str_at(r, &["device_name", "deviceName"]));
        let status = str_at(r, &["status"]).unwrap_or("created");
        let failed = status.eq_ignore_ascii_case("failed")
            || status.eq_ignore_ascii_case("error")
            || r.get("error_code").is_some();
        match (name, failed) {
            (Some(name), false) => {
                let secret = str_at(dev, &["device_secret", "deviceSecret", "DeviceSecret"])
                    .map(str::to_owned)
                    .or_else(|| sent_secret(name));
                match secret {
                    Some(secret) => out.devices.push(DeviceSpec {
                        product_key: str_at(dev, &["product_key", "productKey"])
                            .unwrap_or(product_key)
                            .to_owned(),
                        device_name: name.to_owned(),
                        device_secret: secret,
                        sign_method: None,
                    }),
                    None => out
                        .failed
                        .push((name.to_owned(), "created but no secret known".into())),
                }
            }
            (name, _) => {
                let msg = [
                    str_at(r, &["error_code"]),
                    str_at(r, &["message", "error_msg"]),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(": ");
                out.failed.push((
                    name.unwrap_or("?").to_owned(),
                    if msg.is_empty() { "failed".into() } else { msg },
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_mqtt_address_comes_from_the_gateway_and_must_agree_with_an_explicit_one() {
        let api = "http://gw.local:8081";
        assert_eq!(
            mqtt_address_for(api, "0.0.0.0:1884", None).unwrap(),
            "gw.local:1884"
        );
        assert_eq!(
            mqtt_address_for(api, "[::]:1884", None).unwrap(),
            "gw.local:1884"
        );
        assert_eq!(
            mqtt_address_for(api, "127.0.0.1:18831", None).unwrap(),
            "127.0.0.1:18831"
        );
        assert_eq!(
            mqtt_address_for(api, "0.0.0.0:1884", Some("10.1.2.3:1884")).unwrap(),
            "10.1.2.3:1884"
        );
        let err = mqtt_address_for(api, "0.0.0.0:1884", Some("127.0.0.1:1883")).unwrap_err();
        assert!(
            err.contains("127.0.0.1:1883") && err.contains("0.0.0.0:1884"),
            "{err}"
        );
        assert!(err.contains("--mqtt"), "{err}");
        assert!(mqtt_address_for(api, "nonsense", None).is_err());
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn csv_forms() {
        let d = parse_csv(
            "\u{feff}ProductKey,DeviceName,DeviceSecret,SignMethod\n\
             a1,dev1,s1,\n\
             a1, dev2 ,s2,hmacmd5\n\n",
        )
        .unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[1].device_name, "dev2");
        assert_eq!(d[1].sign_method(), Some(SignMethod::HmacMd5));
        assert_eq!(d[0].sign_method, None);
        let snake = parse_csv("device_name,product_key,device_secret\nx,p,s\n").unwrap();
        assert_eq!(snake, [DeviceSpec::new("p", "x", "s")]);
        assert!(parse_csv("DeviceName,DeviceSecret\nx,s\n")
            .unwrap_err()
            .contains("header"));
        assert!(parse_csv("ProductKey,DeviceName,DeviceSecret\np,,s\n")
            .unwrap_err()
            .contains("row 2: DeviceName is empty"));
        assert!(parse_csv("ProductKey,DeviceName,DeviceSecret\np,a/b,s\n").is_err());
        assert!(parse_csv("ProductKey,DeviceName,DeviceSecret,SignMethod\np,a,s,rot13\n").is_err());
    }

    #[test]
    fn json_forms() {
        let a = parse_json(r#"[{"ProductKey":"p","DeviceName":"d","DeviceSecret":"s"}]"#).unwrap();
        let b = parse_json(
            r#"{"devices":[{"product_key":"p","device_name":"d","device_secret":"s"}]}"#,
        )
        .unwrap();
        let c = parse_json(r#"[{"productKey":"p","deviceName":"d","deviceSecret":"s"}]"#).unwrap();
        assert_eq!(a, b);
        assert_eq!(b, c);
        assert!(parse_json(r#"[{"productKey":"p"}]"#).is_err());
        assert!(parse_json(r#"{"x":1}"#).is_err());
    }

    #[test]
    fn load_and_save_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.csv");
        let mut devs = generate("pk", "sim-", 3, 1);
        devs[1].sign_method = Some("hmacsha1".into());
        save(&path, &devs).unwrap();
        assert_eq!(load(&path).unwrap(), devs);
        std::fs::write(&path, "ProductKey,DeviceName,DeviceSecret\n").unwrap();
        assert!(matches!(load(&path), Err(DeviceListError::Empty { .. })));
        std::fs::write(&path, "ProductKey,DeviceName,DeviceSecret\np,d,s\np,d,s\n").unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("twice"));
        assert!(matches!(
            load(&dir.path().join("missing.csv")),
            Err(DeviceListError::Read { .. })
        ));
    }

    #[test]
    fn generated_names_and_secrets() {
        let a = generate("pk", "sim-", 12, 5);
        assert_eq!(a[0].device_name, "sim-00001");
        assert_eq!(a[11].device_name, "sim-00012");
        assert_eq!(a, generate("pk", "sim-", 12, 5));
        assert_ne!(a[0].device_secret, a[1].device_secret);
        assert_eq!(names("x", 123_456)[0], "x000001");
    }

    #[test]
    fn batch_responses_parse_tolerantly() {
        let sent = generate("pk", "d", 3, 1);
        let v = json!({
            "created": 2, "failed": 1,
            "results": [
                {"status":"created","device":{"product_key":"pk","device_name":"d00001","device_secret":"theirs"}},
                {"status":"created","device_name":"d00002"},
                {"status":"failed","row":3,"device_name":"d00003","error_code":"FG.DEVICE_EXISTS","message":"exists"}
            ]
        });
        let p = parse_batch_response(&v, "pk", &sent);
        assert_eq!(p.devices.len(), 2);
        assert_eq!(p.devices[0].device_secret, "theirs");
        assert_eq!(p.devices[1].device_secret, sent[1].device_secret);
        assert_eq!(
            p.failed,
            [("d00003".to_owned(), "FG.DEVICE_EXISTS: exists".to_owned())]
        );
        let bare = parse_batch_response(&json!({"created":3,"failed":0}), "pk", &sent);
        assert_eq!(bare.devices, sent);
    }
}
