//! Export/import jobs end to end: two in-process gateways, packages moved between them over
//! HTTP, devices reconnecting with their old secrets, tampering and wrong keys refused with
//! nothing changed, conflict policies, rate limiting.

use crate::helpers::{
    connect, credentials, spawn_app_with, try_connect, TestApp, ADMIN_TOKEN, OPERATOR_TOKEN, WAIT,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};

const KEY: &str = "correct horse battery staple";

/// PBKDF2 rounds of the packages these gateways write (the default is 100,000). A package
/// carries its rounds, so imports derive with the same number. The key derivation's cost is
/// not what these tests are about, and at the default every keyed export and import costs
/// ~0.7 s of CPU in a debug build: with several tests and builds sharing two cores, jobs took
/// longer than the tests waited for them.
const TEST_KDF_ITERATIONS: u32 = 1_000;

/// How long a test waits for an export or import job to leave IN_PROGRESS: a bound for a
/// broken job, not a measure of a working one (they take well under a second alone).
const JOB_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A gateway for these tests: the defaults, with [`TEST_KDF_ITERATIONS`].
async fn gateway() -> TestApp {
    spawn_app_with(|s| s.export.kdf_iterations = TEST_KDF_ITERATIONS).await
}

async fn upload_firmware(t: &TestApp, pk: &str, version: &str, data: &[u8]) -> Value {
    let form = reqwest::multipart::Form::new()
        .text("product_key", pk.to_owned())
        .text("version", version.to_owned())
        .part(
            "file",
            reqwest::multipart::Part::bytes(data.to_vec()).file_name("fw.bin"),
        );
    let resp = t
        .http
        .post(t.url("/api/v1/firmware"))
        .bearer_auth(ADMIN_TOKEN)
        .multipart(form)
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status().as_u16(), 201);
    resp.json().await.unwrap()
}

/// Polls a job until it leaves IN_PROGRESS and returns it with its objects.
async fn wait_job(t: &TestApp, kind: &str, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + JOB_WAIT;
    loop {
        let (status, job) = t.get(&format!("/api/v1/{kind}/{id}?expand=objects")).await;
        assert_eq!(status, 200, "{job}");
        if job["status"]["state"] != "IN_PROGRESS" {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} still running: {job}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn log_text(t: &TestApp, kind: &str, id: &str) -> String {
    let resp = t
        .http
        .get(t.url(&format!("/api/v1/{kind}/{id}/log")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    resp.text().await.unwrap()
}

/// Runs an export to completion and returns (job, package bytes).
async fn export(t: &TestApp, body: Value) -> (Value, Vec<u8>) {
    export_as(t, ADMIN_TOKEN, body).await
}

/// [`export`] started with `token`.
async fn export_as(t: &TestApp, token: &str, body: Value) -> (Value, Vec<u8>) {
    let (status, job) = t
        .request(
            reqwest::Method::POST,
            "/api/v1/export",
            Some(body),
            Some(token),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["status"]["state"], "IN_PROGRESS");
    assert!(job["objects"].is_null());
    let id = job["id"].as_str().unwrap().to_owned();
    let job = wait_job(t, "export", &id).await;
    assert_eq!(job["status"]["state"], "SUCCESSFUL", "{job}");
    let resp = t
        .http
        .get(t.url(&format!("/api/v1/export/{id}/package")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "application/zip");
    (job, resp.bytes().await.unwrap().to_vec())
}

/// `POST /api/v1/import`; returns (status, body).
async fn import(t: &TestApp, package: &[u8], key: Option<&str>, policy: &str) -> (u16, Value) {
    import_as(t, ADMIN_TOKEN, package, key, policy).await
}

/// [`import`] with `token`.
async fn import_as(
    t: &TestApp,
    token: &str,
    package: &[u8],
    key: Option<&str>,
    policy: &str,
) -> (u16, Value) {
    let mut form = reqwest::multipart::Form::new()
        .text("conflict_policy", policy.to_owned())
        .part(
            "package",
            reqwest::multipart::Part::bytes(package.to_vec()).file_name("p.zip"),
        );
    if let Some(k) = key {
        form = form.text("secrets_key", k.to_owned());
    }
    let resp = t
        .http
        .post(t.url("/api/v1/import"))
        .bearer_auth(token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn import_done(t: &TestApp, package: &[u8], key: Option<&str>, policy: &str) -> Value {
    let (status, job) = import(t, package, key, policy).await;
    assert_eq!(status, 202, "{job}");
    wait_job(t, "import", job["id"].as_str().unwrap()).await
}

fn result_of<'a>(job: &'a Value, id: &str) -> &'a Value {
    job["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["id"] == id)
        .unwrap_or_else(|| panic!("no object {id} in {job}"))
}

/// A source gateway with a product, two devices, a firmware package and an OTA job.
struct Source {
    t: TestApp,
    pk: String,
    secrets: Vec<(String, String)>,
    fw: Value,
    fw_bytes: Vec<u8>,
    job_id: String,
}

async fn source() -> Source {
    let t = gateway().await;
    let pk = t.create_product("export product").await;
    let mut secrets = Vec::new();
    for dn in ["dev-one", "dev-two"] {
        secrets.push((dn.to_owned(), t.create_device(&pk, dn).await));
    }
    let (s, _) = t
        .request(
            reqwest::Method::PATCH,
            &format!("/api/v1/products/{pk}/devices/dev-two"),
            Some(json!({"tags": {"region": "eu"}})),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(s, 200);
    let fw_bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let fw = upload_firmware(&t, &pk, "2.0.0", &fw_bytes).await;
    let (s, job) = t
        .post(
            "/api/v1/ota/jobs",
            json!({"firmware_id": fw["firmware_id"], "target": "SPECIFIC",
                   "device_names": ["dev-one"], "force": true, "name": "roll 2.0.0"}),
        )
        .await;
    assert_eq!(s, 201, "{job}");
    let job_id = job["job_id"].as_str().unwrap().to_owned();
    Source {
        t,
        pk,
        secrets,
        fw,
        fw_bytes,
        job_id,
    }
}

#[tokio::test]
async fn round_trip_moves_devices_with_their_secrets_and_firmware_with_its_bytes() {
    let src = source().await;
    let (job, package) = export(
        &src.t,
        json!({"name": "move-it", "secrets_key": KEY,
               "objects": [{"id": src.pk, "type": "PRODUCT"}, {"id": src.job_id, "type": "OTA_JOB"}]}),
    )
    .await;
    // Per-object status: the product brought its devices and firmware.
    let objects = job["objects"].as_array().unwrap();
    assert_eq!(objects.len(), 5, "{job}");
    for o in objects {
        assert_eq!(o["status"]["state"], "SUCCESSFUL", "{o}");
        assert!(o["path"].as_str().unwrap().starts_with("/default/"), "{o}");
    }
    let dev = result_of(&job, &format!("{}/dev-two", src.pk));
    assert_eq!(dev["type"], "DEVICE");
    assert_eq!(dev["name"], "dev-two");
    assert_eq!(job["name"], "move-it");
    assert_eq!(job["secrets_included"], true);
    let log = log_text(&src.t, "export", job["id"].as_str().unwrap()).await;
    assert!(log.contains("FGX_002 INFO"), "{log}");
    assert!(log.contains("FGX_003 INFO"), "{log}");
    assert!(log.contains("Status: SUCCESSFUL"), "{log}");
    assert!(
        log.contains(&format!(
            "Successfully exported object [/default/{}/dev-one] of type [DEVICE] id [{}/dev-one]",
            src.pk, src.pk
        )),
        "{log}"
    );
    // Lines carry RFC 3339 timestamps: `> CODE LEVEL 2025-…Z message`.
    let first = log.lines().next().unwrap();
    let ts = first.split(' ').nth(3).unwrap();
    assert!(ts.ends_with('Z') && ts.len() == 24, "{first}");

    // The package: a manifest with checksums, secrets never in clear text.
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&package)).unwrap();
    let mut manifest = String::new();
    zip.by_name("manifest.json")
        .unwrap()
        .read_to_string(&mut manifest)
        .unwrap();
    let manifest: Value = serde_json::from_str(&manifest).unwrap();
    assert_eq!(manifest["format_version"], 1);
    assert_eq!(manifest["encryption"]["cipher"], "AES-256-GCM");
    assert!(manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["path"] == format!("firmware/{}", src.fw["sha256"].as_str().unwrap())));
    let text = String::from_utf8_lossy(&package);
    for (_, secret) in &src.secrets {
        assert!(!text.contains(secret.as_str()));
    }

    // A fresh gateway imports it.
    let dst = gateway().await;
    let imported = import_done(&dst, &package, Some(KEY), "skip").await;
    assert_eq!(imported["status"]["state"], "SUCCESSFUL", "{imported}");
    assert_eq!(imported["summary"]["created"], 5, "{imported}");
    let log = log_text(&dst, "import", imported["id"].as_str().unwrap()).await;
    assert!(
        log.contains("FGI_004 INFO") && log.contains("Created object"),
        "{log}"
    );

    // Devices connect to the new gateway with their OLD secrets.
    for (dn, secret) in &src.secrets {
        let _device = connect(dst.mqtt_addr(), &credentials(&src.pk, dn, secret)).await;
    }
    assert!(try_connect(
        dst.mqtt_addr(),
        &credentials(&src.pk, "dev-one", "wrong-secret-0000")
    )
    .await
    .is_err());
    let d = dst.device(&src.pk, "dev-two").await;
    assert_eq!(d["tags"]["region"], "eu");
    assert_eq!(
        dst.product_secret(&src.pk).await,
        src.t.product_secret(&src.pk).await
    );

    // The firmware downloads with the same checksum.
    let new_fid = result_of(&imported, src.fw["firmware_id"].as_str().unwrap())["target_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, link) = dst
        .get(&format!("/api/v1/firmware/{new_fid}/download-url"))
        .await;
    assert_eq!(s, 200, "{link}");
    let url = link["url"].as_str().unwrap();
    let body = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    assert_eq!(body.len(), src.fw_bytes.len());
    assert_eq!(hex::encode(Sha256::digest(&body)), src.fw["sha256"]);

    // The OTA job was re-created against the new firmware id.
    let new_jid = result_of(&imported, &src.job_id)["target_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, j) = dst.get(&format!("/api/v1/ota/jobs/{new_jid}")).await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["spec"]["firmware_id"], new_fid.as_str());
    assert_eq!(j["spec"]["name"], "roll 2.0.0");

    // Importing the same package again changes nothing: everything is identical.
    let again = import_done(&dst, &package, Some(KEY), "fail").await;
    assert_eq!(again["status"]["state"], "SUCCESSFUL", "{again}");
    assert_eq!(again["summary"]["skipped_identical"], 5, "{again}");
}

/// Rewrites `package` with one byte of `file` changed (checksums in the manifest untouched).
fn tamper(package: &[u8], file_pred: impl Fn(&str) -> bool) -> Vec<u8> {
    let mut zin = zip::ZipArchive::new(std::io::Cursor::new(package)).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let mut changed = false;
    for i in 0..zin.len() {
        let mut f = zin.by_index(i).unwrap();
        let name = f.name().to_owned();
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        if !changed && file_pred(&name) {
            let at = data.len() / 2;
            data[at] ^= 0x01;
            changed = true;
        }
        out.start_file(name, zip::write::SimpleFileOptions::default())
            .unwrap();
        out.write_all(&data).unwrap();
    }
    assert!(changed);
    out.finish().unwrap().into_inner()
}

async fn product_count(t: &TestApp) -> u64 {
    t.get("/api/v1/products").await.1["total"].as_u64().unwrap()
}

#[tokio::test]
async fn tampered_damaged_or_wrongly_keyed_packages_are_refused_and_change_nothing() {
    let src = source().await;
    let (_, package) = export(
        &src.t,
        json!({"secrets_key": KEY, "objects": [{"id": src.pk, "type": "PRODUCT"}]}),
    )
    .await;
    let dst = gateway().await;

    // One byte of one device's JSON changed.
    let bad = tamper(&package, |n| n.starts_with("objects/device/"));
    let (s, e) = import(&dst, &bad, Some(KEY), "overwrite").await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["error_code"], "FG.4004");
    assert!(
        e["error_msg"]
            .as_str()
            .unwrap()
            .contains("checksum mismatch"),
        "{e}"
    );

    // One byte of the firmware.
    let bad = tamper(&package, |n| n.starts_with("firmware/"));
    let (s, e) = import(&dst, &bad, Some(KEY), "skip").await;
    assert_eq!((s, e["error_code"].as_str()), (400, Some("FG.4004")), "{e}");

    // The manifest rewritten (its MAC no longer matches).
    let bad = tamper(&package, |n| n == "manifest.json");
    let (s, e) = import(&dst, &bad, Some(KEY), "skip").await;
    assert_eq!(s, 400, "{e}");

    // Not a ZIP at all, or truncated.
    let (s, e) = import(&dst, b"definitely not a zip file", Some(KEY), "skip").await;
    assert_eq!((s, e["error_code"].as_str()), (400, Some("FG.4004")), "{e}");
    let (s, _) = import(&dst, &package[..package.len() / 2], Some(KEY), "skip").await;
    assert_eq!(s, 400);

    // Wrong key, and no key.
    let (s, e) = import(&dst, &package, Some("not the right key at all"), "skip").await;
    assert_eq!((s, e["error_code"].as_str()), (400, Some("FG.4005")), "{e}");
    assert_eq!(e["error_ext_msg"], "secrets_key");
    let (s, e) = import(&dst, &package, None, "skip").await;
    assert_eq!((s, e["error_code"].as_str()), (400, Some("FG.1002")), "{e}");

    // Nothing changed on the target.
    assert_eq!(product_count(&dst).await, 0);
    assert_eq!(
        dst.get("/api/v1/firmware").await.1["total"].as_u64(),
        Some(0)
    );
    // And the intact package still imports.
    let ok = import_done(&dst, &package, Some(KEY), "skip").await;
    assert_eq!(ok["status"]["state"], "SUCCESSFUL", "{ok}");
}

/// A raw DEFLATE stream (RFC 1951) of `1 + 258 * k` zero bytes, made without a compressor: one
/// fixed-Huffman block holding a literal 0, then `k` copies of (length 258, distance 1) — 13
/// bits per 258 bytes, so 200 MiB of zeros take 1.3 MB.
fn deflated_zeros(k: usize) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }
    impl Bits {
        /// `value`'s low `len` bits, least significant first (DEFLATE's bit order).
        fn put(&mut self, value: u32, len: u32) {
            self.acc |= u64::from(value) << self.n;
            self.n += len;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        /// A Huffman code: most significant bit first.
        fn code(&mut self, code: u32, len: u32) {
            self.put(code.reverse_bits() >> (32 - len), len);
        }
    }
    let mut b = Bits {
        out: Vec::with_capacity(k * 13 / 8 + 16),
        acc: 0,
        n: 0,
    };
    b.put(1, 1); // BFINAL
    b.put(1, 2); // BTYPE 01: fixed Huffman codes
    b.code(0x30, 8); // literal 0
    for _ in 0..k {
        b.code(0b1100_0101, 8); // length code 285: 258 bytes
        b.code(0, 5); // distance code 0: 1 byte back
    }
    b.code(0, 7); // end of block
    b.put(0, 7); // flush the last byte
    b.out
}

/// CRC-32 (IEEE) of a small buffer.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// One entry of [`raw_zip`]: name, compression method (0 stored, 8 deflated), the bytes as
/// stored, and the CRC-32 and size of the uncompressed content the headers announce.
struct RawEntry {
    name: String,
    method: u16,
    data: Vec<u8>,
    crc: u32,
    size: u32,
}

impl RawEntry {
    fn stored(name: &str, data: &[u8]) -> Self {
        RawEntry {
            name: name.to_owned(),
            method: 0,
            data: data.to_vec(),
            crc: crc32(data),
            size: data.len() as u32,
        }
    }

    /// `1 + 258 * k` zeros, deflated. The CRC is left 0: a reader that stops where the
    /// manifest says never checks it.
    fn zeros(name: &str, k: usize) -> Self {
        RawEntry {
            name: name.to_owned(),
            method: 8,
            data: deflated_zeros(k),
            crc: 0,
            size: (1 + 258 * k) as u32,
        }
    }
}

/// A ZIP archive written byte by byte (so an entry can hold a prepared DEFLATE stream).
fn raw_zip(entries: &[RawEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for e in entries {
        let offset = out.len() as u32;
        let fields = |v: &mut Vec<u8>| {
            v.extend_from_slice(&20u16.to_le_bytes()); // version needed
            v.extend_from_slice(&0u16.to_le_bytes()); // flags
            v.extend_from_slice(&e.method.to_le_bytes());
            v.extend_from_slice(&0u16.to_le_bytes()); // time
            v.extend_from_slice(&0x21u16.to_le_bytes()); // date: 1980-01-01
            v.extend_from_slice(&e.crc.to_le_bytes());
            v.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
            v.extend_from_slice(&e.size.to_le_bytes());
            v.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            v.extend_from_slice(&0u16.to_le_bytes()); // extra field length
        };
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        fields(&mut out);
        out.extend_from_slice(e.name.as_bytes());
        out.extend_from_slice(&e.data);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes()); // version made by
        fields(&mut central);
        central.extend_from_slice(&[0; 6]); // comment length, disk, internal attributes
        central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(e.name.as_bytes());
    }
    let central_at = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // disk numbers
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&central_at.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes()); // comment length
    out
}

/// A package (no secrets, so no MAC) listing `files` as `(path, sha256, size)` and no objects.
fn bomb_manifest(files: &[(&str, String, u64)]) -> Vec<u8> {
    let files: Vec<Value> = files
        .iter()
        .map(|(path, sha, size)| json!({"path": path, "sha256": sha, "size": size}))
        .collect();
    serde_json::to_vec(&json!({
        "format": "fleetgate-export", "format_version": 1, "gateway_version": "0.1.0",
        "created_at": "2025-01-01T00:00:00Z", "created_at_ms": 0, "job_id": "exp-bomb",
        "job_name": "bomb", "encryption": null, "objects": [], "files": files
    }))
    .unwrap()
}

/// Issue 14, item 4: ZIP bombs are refused with a clear 4xx error, without inflating what the
/// package claims (or what it holds beyond that), and change nothing.
#[tokio::test]
async fn zip_bombs_are_refused_without_being_inflated() {
    let dst = gateway().await;
    // 200 MiB of zeros in 1.3 MB.
    let k = 200 * 1024 * 1024 / 258;
    let zeros_sha = |n: usize| hex::encode(Sha256::digest(vec![0u8; n]));

    // The manifest lists 1 KiB; the file inflates to 200 MiB. Reading stops one byte past
    // the listed size.
    let bomb = raw_zip(&[
        RawEntry::stored(
            "manifest.json",
            &bomb_manifest(&[("firmware/zeros", zeros_sha(1024), 1024)]),
        ),
        RawEntry::zeros("firmware/zeros", k),
    ]);
    assert!(bomb.len() < 2 * 1024 * 1024, "{} bytes", bomb.len());
    let (s, e) = import(&dst, &bomb, None, "skip").await;
    assert_eq!((s, e["error_code"].as_str()), (400, Some("FG.4004")), "{e}");
    assert_eq!(
        e["error_msg"],
        "the package was refused: firmware/zeros holds more than the 1024 bytes the manifest \
         lists (the package was damaged or tampered with)"
    );

    // The manifest lists the file at 1 GiB: refused from the manifest, before inflating.
    let huge = raw_zip(&[
        RawEntry::stored(
            "manifest.json",
            &bomb_manifest(&[("firmware/zeros", zeros_sha(0), 1 << 30)]),
        ),
        RawEntry::zeros("firmware/zeros", k),
    ]);
    let (s, e) = import(&dst, &huge, None, "skip").await;
    assert_eq!((s, e["error_code"].as_str()), (413, Some("FG.4006")), "{e}");
    assert_eq!(e["error_ext_msg"], "package");
    assert_eq!(
        e["error_msg"],
        "the package was refused: firmware/zeros unpacks to more than 268435456 bytes \
         (export.max_unpacked_entry_bytes)"
    );

    // Five files listed at 250 MiB each: every one within the per-file limit, together past
    // the total.
    let names: Vec<String> = (0..5).map(|i| format!("firmware/part{i}")).collect();
    let listed: Vec<(&str, String, u64)> = names
        .iter()
        .map(|n| (n.as_str(), zeros_sha(0), 250 << 20))
        .collect();
    let mut entries = vec![RawEntry::stored("manifest.json", &bomb_manifest(&listed))];
    entries.extend(names.iter().map(|n| RawEntry::zeros(n, 1000)));
    let (s, e) = import(&dst, &raw_zip(&entries), None, "skip").await;
    assert_eq!((s, e["error_code"].as_str()), (413, Some("FG.4006")), "{e}");
    assert_eq!(
        e["error_msg"],
        "the package was refused: the package unpacks to more than 1073741824 bytes \
         (export.max_unpacked_bytes)"
    );

    // The crafted archives are well-formed: listed at its real size, the same file passes
    // (and the package, holding no objects, imports nothing).
    let honest = raw_zip(&[
        RawEntry::stored(
            "manifest.json",
            &bomb_manifest(&[("firmware/zeros", zeros_sha(1 + 258 * 1000), 1 + 258 * 1000)]),
        ),
        RawEntry {
            crc: crc32(&vec![0u8; 1 + 258 * 1000]),
            ..RawEntry::zeros("firmware/zeros", 1000)
        },
    ]);
    let ok = import_done(&dst, &honest, None, "skip").await;
    assert_eq!(ok["status"]["state"], "SUCCESSFUL", "{ok}");

    assert_eq!(product_count(&dst).await, 0);
    assert_eq!(
        dst.get("/api/v1/firmware").await.1["total"].as_u64(),
        Some(0)
    );
}

/// With secrets, the manifest's MAC is checked before the manifest is believed: a manifest
/// rewritten to list a huge file is refused as tampered, before its sizes are looked at.
#[tokio::test]
async fn a_keyed_package_is_authenticated_before_its_manifest_is_believed() {
    let src = source().await;
    let (_, package) = export(
        &src.t,
        json!({"secrets_key": KEY, "objects": [{"id": src.pk, "type": "PRODUCT"}]}),
    )
    .await;
    let dst = gateway().await;
    let mut zin = zip::ZipArchive::new(std::io::Cursor::new(&package[..])).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for i in 0..zin.len() {
        let mut f = zin.by_index(i).unwrap();
        let name = f.name().to_owned();
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        if name == "manifest.json" {
            let mut manifest: Value = serde_json::from_slice(&data).unwrap();
            for file in manifest["files"].as_array_mut().unwrap() {
                if file["path"].as_str().unwrap().starts_with("firmware/") {
                    file["size"] = json!(1u64 << 40);
                }
            }
            data = serde_json::to_vec(&manifest).unwrap();
        }
        out.start_file(name, zip::write::SimpleFileOptions::default())
            .unwrap();
        out.write_all(&data).unwrap();
    }
    let rewritten = out.finish().unwrap().into_inner();
    let (s, e) = import(&dst, &rewritten, Some(KEY), "skip").await;
    assert_eq!((s, e["error_code"].as_str()), (400, Some("FG.4005")), "{e}");
    assert!(e["error_msg"].as_str().unwrap().contains("tampered"), "{e}");
    assert_eq!(product_count(&dst).await, 0);
}

#[tokio::test]
async fn conflict_policies_skip_fail_and_overwrite() {
    let src = source().await;
    let (_, package) = export(
        &src.t,
        json!({"secrets_key": KEY, "objects": [{"id": src.pk, "type": "PRODUCT", "include_dependencies": true}]}),
    )
    .await;
    let dst = gateway().await;
    // First only the product, so the target has it identical...
    let (_, product_only) = export(
        &src.t,
        json!({"secrets_key": KEY, "objects": [{"id": src.pk, "type": "PRODUCT", "include_dependencies": false}]}),
    )
    .await;
    let first = import_done(&dst, &product_only, Some(KEY), "skip").await;
    assert_eq!(first["summary"]["created"], 1, "{first}");
    // ...then a device of the same name with another secret: a conflict.
    let (s, local) = dst
        .post(
            &format!("/api/v1/products/{}/devices", src.pk),
            json!({"device_name": "dev-one", "device_secret": "local-secret-0123456789"}),
        )
        .await;
    assert_eq!(s, 201, "{local}");
    let dev_one = format!("{}/dev-one", src.pk);
    let dev_two = format!("{}/dev-two", src.pk);

    // fail: nothing is written, not even the non-conflicting objects.
    let failed = import_done(&dst, &package, Some(KEY), "fail").await;
    assert_eq!(failed["status"]["state"], "FAILED", "{failed}");
    assert_eq!(result_of(&failed, &dev_one)["result"], "conflict");
    assert_eq!(result_of(&failed, &dev_two)["result"], "failed");
    let (s, _) = dst
        .get(&format!("/api/v1/products/{}/devices/dev-two", src.pk))
        .await;
    assert_eq!(s, 404, "fail policy must not create anything");
    assert_eq!(dst.get("/api/v1/firmware").await.1["total"], 0);
    let log = log_text(&dst, "import", failed["id"].as_str().unwrap()).await;
    assert!(
        log.contains("FGI_007 ERROR") && log.contains("Status: FAILED"),
        "{log}"
    );

    // skip: the conflict is kept, the rest imported.
    let skipped = import_done(&dst, &package, Some(KEY), "skip").await;
    assert_eq!(skipped["status"]["state"], "SUCCESSFUL", "{skipped}");
    assert_eq!(result_of(&skipped, &dev_one)["result"], "conflict");
    assert_eq!(result_of(&skipped, &dev_two)["result"], "created");
    assert_eq!(result_of(&skipped, &src.pk)["result"], "skipped_identical");
    assert_eq!(
        dst.device_secret(&src.pk, "dev-one").await,
        "local-secret-0123456789"
    );

    // overwrite: the package's secret wins; the old device connects with it.
    let over = import_done(&dst, &package, Some(KEY), "overwrite").await;
    assert_eq!(over["status"]["state"], "SUCCESSFUL", "{over}");
    assert_eq!(result_of(&over, &dev_one)["result"], "overwritten");
    assert_eq!(result_of(&over, &dev_two)["result"], "skipped_identical");
    let old_secret = &src.secrets[0].1;
    assert_eq!(dst.device_secret(&src.pk, "dev-one").await, *old_secret);
    let _d = connect(
        dst.mqtt_addr(),
        &credentials(&src.pk, "dev-one", old_secret),
    )
    .await;
}

#[tokio::test]
async fn export_requests_are_validated_up_front() {
    let t = gateway().await;
    let pk = t.create_product("validated").await;
    t.create_device(&pk, "dev-one").await;

    // Unknown ids fail the request, naming them.
    let (s, e) = t
        .post(
            "/api/v1/export",
            json!({"secrets_key": KEY, "objects": [{"id": pk, "type": "PRODUCT"},
                {"id": "nope123", "type": "PRODUCT"}, {"id": format!("{pk}/ghost"), "type": "DEVICE"}]}),
        )
        .await;
    assert_eq!(s, 400, "{e}");
    let msg = e["error_msg"].as_str().unwrap();
    assert!(
        msg.contains("PRODUCT nope123") && msg.contains("ghost"),
        "{msg}"
    );
    assert_eq!(e["error_ext_msg"], "objects");

    // 1,001 objects: refused with a clear error.
    let objects: Vec<Value> = (0..1001)
        .map(|i| json!({"id": format!("p{i}"), "type": "PRODUCT"}))
        .collect();
    let (s, e) = t.post("/api/v1/export", json!({"objects": objects})).await;
    assert_eq!(s, 413, "{e}");
    assert_eq!(e["error_code"], "FG.1003");
    assert!(e["error_msg"].as_str().unwrap().contains("1000"), "{e}");

    // Secrets need a key, unless explicitly left out.
    let (s, e) = t
        .post(
            "/api/v1/export",
            json!({"objects": [{"id": pk, "type": "PRODUCT"}]}),
        )
        .await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["error_ext_msg"], "secrets_key");
    let (job, package) = export(
        &t,
        json!({"include_secrets": false, "objects": [{"id": format!("{pk}/dev-one"), "type": "DEVICE"}]}),
    )
    .await;
    assert_eq!(job["secrets_included"], false);
    assert_eq!(
        job["objects"].as_array().unwrap().len(),
        2,
        "device brings its product"
    );
    assert!(job["name"].as_str().unwrap().starts_with("job-"));
    // Without secrets no key is needed to import; new secrets are generated.
    let dst = gateway().await;
    let imported = import_done(&dst, &package, None, "skip").await;
    assert_eq!(imported["summary"]["created"], 2, "{imported}");
    let old = t.device_secret(&pk, "dev-one").await;
    assert_ne!(dst.device_secret(&pk, "dev-one").await, old);

    // Unknown jobs: 404; the viewer cannot start one.
    let (s, e) = t.get("/api/v1/export/exp-nothere").await;
    assert_eq!((s, e["error_code"].as_str()), (404, Some("FG.4001")));
    let (s, _) = t.get("/api/v1/export/exp-nothere/package").await;
    assert_eq!(s, 404);
    let (s, e) = t.get("/api/v1/import/imp-nothere").await;
    assert_eq!((s, e["error_code"].as_str()), (404, Some("FG.4002")));
    let (s, _) = t
        .request(
            reqwest::Method::POST,
            "/api/v1/export",
            Some(json!({"include_secrets": false, "objects": [{"id": pk, "type": "PRODUCT"}]})),
            Some(crate::helpers::VIEWER_TOKEN),
        )
        .await;
    assert_eq!(s, 403);
}

#[tokio::test]
async fn a_burst_of_starts_gets_429_with_retry_after() {
    let t = gateway().await;
    let pk = t.create_product("burst").await;
    let body = json!({"include_secrets": false, "objects": [{"id": pk, "type": "PRODUCT"}]});
    let sends = (0..40).map(|_| {
        t.http
            .post(t.url("/api/v1/export"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
    });
    let responses = futures_util::future::join_all(sends).await;
    let mut accepted = 0;
    let mut limited = 0;
    for r in responses {
        let r = r.unwrap();
        match r.status().as_u16() {
            202 => accepted += 1,
            429 => {
                limited += 1;
                let retry: u64 = r.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(retry >= 1);
                let e: Value = r.json().await.unwrap();
                assert_eq!(e["error_code"], "FG.0429");
                assert!(
                    e["error_msg"]
                        .as_str()
                        .unwrap()
                        .contains("too many requests"),
                    "{e}"
                );
                assert!(e["request_id"].is_string());
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(accepted >= 1, "some starts pass");
    assert!(
        limited >= 1,
        "a burst of 40 exceeds the default burst of 10"
    );
}

#[tokio::test]
async fn a_migration_task_round_trips_in_to_migrate_with_its_config() {
    const TARGET: &str = "enterprise-1";
    let src = gateway().await;
    let pk = src.create_product("migrating product").await;
    src.create_device(&pk, "dev-one").await;
    let (s, b) = src
        .post(
            "/api/v1/instances",
            json!({"instance_id": TARGET, "name": "Enterprise"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, task) = src
        .post(
            "/api/v1/migrations",
            json!({"product_key": pk, "target_instance_id": TARGET, "name": "move meters",
                "migration_method": "incremental_migration", "resume_mode": "manual",
                "bandwidth_limit_mb": 20}),
        )
        .await;
    assert_eq!(s, 201, "{task}");
    let tid = task["task_id"].as_str().unwrap().to_owned();

    let (job, package) = export(
        &src,
        json!({"secrets_key": KEY, "objects": [{"id": tid, "type": "MIGRATION_TASK"}]}),
    )
    .await;
    // The task brings its product and the product's devices.
    assert_eq!(job["objects"].as_array().unwrap().len(), 3, "{job}");
    let exported = result_of(&job, &tid);
    assert_eq!(exported["type"], "MIGRATION_TASK");
    assert_eq!(exported["status"]["state"], "SUCCESSFUL");

    // Without the target instance on the importing gateway the task fails, clearly.
    let dst = gateway().await;
    let imported = import_done(&dst, &package, Some(KEY), "skip").await;
    assert_eq!(imported["status"]["state"], "FAILED", "{imported}");
    let o = result_of(&imported, &tid);
    assert_eq!(o["result"], "failed");
    let msg = o["status"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("target instance {TARGET} does not exist")),
        "{msg}"
    );
    assert_eq!(imported["summary"]["created"], 2, "product and device");

    // With it: created in TO_MIGRATE with the same definition.
    let (s, b) = dst
        .post(
            "/api/v1/instances",
            json!({"instance_id": TARGET, "name": "Enterprise"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let imported = import_done(&dst, &package, Some(KEY), "skip").await;
    assert_eq!(imported["status"]["state"], "SUCCESSFUL", "{imported}");
    let o = result_of(&imported, &tid);
    assert_eq!(o["result"], "created", "{imported}");
    let new_tid = o["target_id"].as_str().expect("a new task id").to_owned();
    let (s, t) = dst.get(&format!("/api/v1/migrations/{new_tid}")).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["state"], "TO_MIGRATE");
    assert_eq!(t["product_key"], pk);
    assert_eq!(t["target_instance_id"], TARGET);
    assert_eq!(t["name"], "move meters");
    assert_eq!(t["config"], task["config"]);
    assert_eq!(t["config"]["bandwidth_limit_mb"], 20);

    // Again: identical. A different task of the product conflicts, even under overwrite.
    let again = import_done(&dst, &package, Some(KEY), "skip").await;
    assert_eq!(result_of(&again, &tid)["result"], "skipped_identical");
    let (s, b) = src
        .request(
            reqwest::Method::PUT,
            &format!("/api/v1/migrations/{tid}/config"),
            Some(
                json!({"migration_method": "incremental_migration", "resume_mode": "manual",
                "bandwidth_limit_mb": 40}),
            ),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (_, changed) = export(
        &src,
        json!({"include_secrets": false, "objects": [{"id": tid, "type": "MIGRATION_TASK",
            "include_dependencies": false}]}),
    )
    .await;
    let over = import_done(&dst, &changed, None, "overwrite").await;
    let o = result_of(&over, &tid);
    assert_eq!(o["result"], "conflict", "{over}");
    assert!(
        o["status"]["message"]
            .as_str()
            .unwrap()
            .contains("never overwritten"),
        "{over}"
    );
    let (_, t) = dst.get(&format!("/api/v1/migrations/{new_tid}")).await;
    assert_eq!(t["config"]["bandwidth_limit_mb"], 20, "kept");
}

/// `package` (one without secrets, so without a MAC) with a product object added and its
/// manifest rewritten to match: what anyone holding such a package can make.
fn forge_product(package: &[u8], pk: &str, instance: &str) -> Vec<u8> {
    let mut zin = zip::ZipArchive::new(std::io::Cursor::new(package)).unwrap();
    let mut manifest = String::new();
    zin.by_name("manifest.json")
        .unwrap()
        .read_to_string(&mut manifest)
        .unwrap();
    let mut manifest: Value = serde_json::from_str(&manifest).unwrap();
    assert!(
        manifest["encryption"].is_null(),
        "forging needs a package without secrets"
    );
    let file = format!("objects/product/{pk}.json");
    let object = serde_json::to_vec(&json!({
        "type": "PRODUCT", "id": pk, "secrets": null,
        "data": {"product_key": pk, "name": "forged", "description": null,
                 "instance_id": instance, "instance_name": "forged instance"},
    }))
    .unwrap();
    let sha = hex::encode(Sha256::digest(&object));
    manifest["objects"].as_array_mut().unwrap().push(json!({
        "id": pk, "type": "PRODUCT", "name": "forged", "path": format!("/{instance}/{pk}"),
        "file": file, "sha256": sha, "secrets_nonce": null, "blob": null,
    }));
    manifest["files"]
        .as_array_mut()
        .unwrap()
        .push(json!({"path": file, "sha256": sha, "size": object.len()}));
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default();
    for i in 0..zin.len() {
        let mut f = zin.by_index(i).unwrap();
        let name = f.name().to_owned();
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        if name == "manifest.json" {
            data = serde_json::to_vec(&manifest).unwrap();
        }
        out.start_file(name, opts).unwrap();
        out.write_all(&data).unwrap();
    }
    out.start_file(file, opts).unwrap();
    out.write_all(&object).unwrap();
    out.finish().unwrap().into_inner()
}

/// Creating products is admin business; an operator's import may not do it either, not even
/// with a package it forged. Refused whole, before any job, naming the objects.
#[tokio::test]
async fn an_operator_cannot_create_products_by_importing_even_a_forged_package() {
    let t = gateway().await;
    let pk = t.create_product("real").await;
    t.create_device(&pk, "dev-one").await;
    let (_, package) = export_as(
        &t,
        OPERATOR_TOKEN,
        json!({"include_secrets": false,
               "objects": [{"id": format!("{pk}/dev-one"), "type": "DEVICE", "include_dependencies": false}]}),
    )
    .await;
    let forged = forge_product(&package, "forged1", "iot-forged");

    for policy in ["skip", "overwrite", "fail"] {
        let (s, e) = import_as(&t, OPERATOR_TOKEN, &forged, None, policy).await;
        assert_eq!(s, 403, "{policy}: {e}");
        assert_eq!(e["error_code"], "FG.0403");
        let msg = e["error_msg"].as_str().unwrap();
        assert!(
            msg.contains("PRODUCT forged1") && msg.contains("admin"),
            "{msg}"
        );
    }
    // Nothing changed: no product, no instance.
    assert_eq!(product_count(&t).await, 1);
    let (s, _) = t.get("/api/v1/products/forged1").await;
    assert_eq!(s, 404);
    let (s, _) = t.get("/api/v1/instances/iot-forged").await;
    assert_eq!(s, 404);

    // The same package from an admin is imported: the refusal was the role's.
    let done = import_done(&t, &forged, None, "skip").await;
    assert_eq!(done["status"]["state"], "SUCCESSFUL", "{done}");
    assert_eq!(result_of(&done, "forged1")["result"], "created");
    // Now that the product exists, the operator's import writes nothing it may not: accepted.
    let (s, job) = import_as(&t, OPERATOR_TOKEN, &forged, None, "skip").await;
    assert_eq!(s, 202, "{job}");
    let job = wait_job(&t, "import", job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"]["state"], "SUCCESSFUL", "{job}");
    assert_eq!(job["summary"]["skipped_identical"], 2, "{job}");
}

/// An operator may not read product secrets, so its export does not carry them (devices'
/// secrets it may read are carried, encrypted); an admin's does.
#[tokio::test]
async fn an_operators_export_leaves_product_secrets_out() {
    let src = source().await;
    let body = json!({"secrets_key": KEY,
                      "objects": [{"id": src.pk, "type": "PRODUCT", "include_dependencies": true}]});
    let (job, package) = export_as(&src.t, OPERATOR_TOKEN, body.clone()).await;
    assert_eq!(job["secrets_included"], true);
    let log = log_text(&src.t, "export", job["id"].as_str().unwrap()).await;
    assert!(
        log.contains("FGX_006 WARN")
            && log.contains("only an admin's export carries product secrets"),
        "{log}"
    );
    let nonce_of = |package: &[u8], kind: &str| -> Value {
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(package)).unwrap();
        let mut m = String::new();
        zip.by_name("manifest.json")
            .unwrap()
            .read_to_string(&mut m)
            .unwrap();
        let m: Value = serde_json::from_str(&m).unwrap();
        m["objects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["type"] == kind)
            .unwrap()["secrets_nonce"]
            .clone()
    };
    assert!(nonce_of(&package, "PRODUCT").is_null());
    assert!(nonce_of(&package, "DEVICE").is_string());

    // Imported elsewhere: the devices keep their secrets, the product gets a new one.
    let dst = gateway().await;
    let imported = import_done(&dst, &package, Some(KEY), "skip").await;
    assert_eq!(imported["status"]["state"], "SUCCESSFUL", "{imported}");
    for (dn, secret) in &src.secrets {
        let _d = connect(dst.mqtt_addr(), &credentials(&src.pk, dn, secret)).await;
    }
    let src_secret = src.t.product_secret(&src.pk).await;
    assert_ne!(dst.product_secret(&src.pk).await, src_secret);

    // An admin's export carries it.
    let (job, package) = export(&src.t, body).await;
    let log = log_text(&src.t, "export", job["id"].as_str().unwrap()).await;
    assert!(!log.contains("FGX_006"), "{log}");
    assert!(nonce_of(&package, "PRODUCT").is_string());
}

async fn kick_product(t: &TestApp, pk: &str) {
    let (s, p) = t
        .post(
            "/api/v1/products",
            json!({"name": "kick", "product_key": pk}),
        )
        .await;
    assert_eq!(s, 201, "{p}");
}

/// A device an import disables or gives a new secret is disconnected, like `PATCH
/// {"enabled":false}` does; a tag change keeps the session.
#[tokio::test]
async fn an_import_that_disables_or_rekeys_a_connected_device_disconnects_it() {
    const PK: &str = "kickpk1";
    let device = |dn: &str, secret: &str, tags: Value| json!({"device_name": dn, "device_secret": secret, "tags": tags});
    let devices_uri = format!("/api/v1/products/{PK}/devices");

    // The source: dev-one disabled, dev-two with another secret, dev-three other tags.
    let src = gateway().await;
    kick_product(&src, PK).await;
    for d in [
        device("dev-one", "secret-one-0000001", json!({})),
        device("dev-two", "secret-from-source-2", json!({})),
        device("dev-three", "secret-three-000003", json!({"a": "1"})),
    ] {
        let (s, b) = src.post(&devices_uri, d).await;
        assert_eq!(s, 201, "{b}");
    }
    let (s, _) = src
        .request(
            reqwest::Method::PATCH,
            &format!("{devices_uri}/dev-one"),
            Some(json!({"enabled": false})),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(s, 200);
    let objects: Vec<Value> = ["dev-one", "dev-two", "dev-three"]
        .iter()
        .map(|dn| json!({"id": format!("{PK}/{dn}"), "type": "DEVICE", "include_dependencies": false}))
        .collect();
    let (_, package) = export_as(
        &src,
        OPERATOR_TOKEN,
        json!({"secrets_key": KEY, "objects": objects}),
    )
    .await;

    // The target: the same devices, enabled, connected.
    let dst = gateway().await;
    kick_product(&dst, PK).await;
    for d in [
        device("dev-one", "secret-one-0000001", json!({})),
        device("dev-two", "secret-local-0000002", json!({})),
        device("dev-three", "secret-three-000003", json!({"a": "2"})),
    ] {
        let (s, b) = dst.post(&devices_uri, d).await;
        assert_eq!(s, 201, "{b}");
    }
    let addr = dst.mqtt_addr();
    let mut one = connect(addr, &credentials(PK, "dev-one", "secret-one-0000001")).await;
    let mut two = connect(addr, &credentials(PK, "dev-two", "secret-local-0000002")).await;
    let mut three = connect(addr, &credentials(PK, "dev-three", "secret-three-000003")).await;
    for dn in ["dev-one", "dev-two", "dev-three"] {
        dst.wait_device(PK, dn, "online", |d| d["online"] == true)
            .await;
    }

    // An operator imports with overwrite: all three are overwritten.
    let (s, job) = import_as(&dst, OPERATOR_TOKEN, &package, Some(KEY), "overwrite").await;
    assert_eq!(s, 202, "{job}");
    let job = wait_job(&dst, "import", job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"]["state"], "SUCCESSFUL", "{job}");
    for dn in ["dev-one", "dev-two", "dev-three"] {
        assert_eq!(
            result_of(&job, &format!("{PK}/{dn}"))["result"],
            "overwritten",
            "{job}"
        );
    }
    assert!(
        one.closed_within(WAIT).await,
        "disabled by import, still connected"
    );
    assert!(
        two.closed_within(WAIT).await,
        "re-keyed by import, still connected"
    );
    assert!(
        !three
            .closed_within(std::time::Duration::from_millis(500))
            .await,
        "a tag change must not disconnect"
    );
    dst.wait_device(PK, "dev-one", "offline", |d| d["online"] == false)
        .await;

    // And they cannot come back with what they had.
    assert_eq!(
        try_connect(addr, &credentials(PK, "dev-one", "secret-one-0000001"))
            .await
            .err(),
        Some(rumqttc::ConnectReturnCode::NotAuthorized)
    );
    assert_eq!(
        try_connect(addr, &credentials(PK, "dev-two", "secret-local-0000002"))
            .await
            .err(),
        Some(rumqttc::ConnectReturnCode::BadUserNamePassword)
    );
    let _two = connect(addr, &credentials(PK, "dev-two", "secret-from-source-2")).await;
}

#[tokio::test]
async fn a_finished_verify_job_is_skipped_and_paths_say_where_objects_landed() {
    let src = gateway().await;
    let pk = src.create_product("verified").await;
    for dn in ["dev-verify", "dev-moved"] {
        src.create_device(&pk, dn).await;
    }
    let fw = upload_firmware(&src, &pk, "2.0.0", b"verified image").await;
    let fid = fw["firmware_id"].as_str().unwrap();
    let (s, job) = src
        .post(
            "/api/v1/ota/jobs",
            json!({"firmware_id": fid, "job_type": "VERIFY_FIRMWARE", "target": "SPECIFIC",
                   "device_names": ["dev-verify"]}),
        )
        .await;
    assert_eq!(s, 201, "{job}");
    let jid = job["job_id"].as_str().unwrap().to_owned();
    // The device reports the target version: the verification succeeds.
    let app = src.app();
    app.registry()
        .report_version(&pk, "dev-verify", "default", "2.0.0", 1)
        .await
        .unwrap();
    app.ota()
        .on_version(&pk, "dev-verify", "default", "2.0.0")
        .await;
    let (_, job) = src.get(&format!("/api/v1/ota/jobs/{jid}")).await;
    assert_eq!(job["status"], "COMPLETED", "{job}");
    let (_, fw) = src.get(&format!("/api/v1/firmware/{fid}")).await;
    assert_eq!(fw["status"], "VERIFIED");
    // A device that moved to another instance on the source (a migration).
    app.registry()
        .create_instance(fleetgate::registry::NewInstance {
            instance_id: Some("iot-east".into()),
            name: "east".into(),
        })
        .await
        .unwrap();
    app.registry()
        .set_device_instance(&pk, "dev-moved", "iot-east")
        .await
        .unwrap();

    let (_, package) = export(
        &src,
        json!({"secrets_key": KEY, "objects": [{"id": pk, "type": "PRODUCT"}, {"id": jid, "type": "OTA_JOB"}]}),
    )
    .await;
    let dst = gateway().await;
    let done = import_done(&dst, &package, Some(KEY), "skip").await;
    assert_eq!(done["status"]["state"], "SUCCESSFUL", "{done}");
    let job = result_of(&done, &jid);
    assert_eq!(job["result"], "skipped", "{job}");
    assert!(
        job["status"]["message"]
            .as_str()
            .unwrap()
            .contains("VERIFY_FIRMWARE"),
        "{job}"
    );
    assert_eq!(done["summary"]["skipped"], 1, "{done}");
    let (_, fw) = dst.get(&format!("/api/v1/firmware?product_key={pk}")).await;
    assert_eq!(fw["items"][0]["status"], "VERIFIED", "{fw}");
    // The device was created in its product's instance here, and that is what the job says.
    let moved = result_of(&done, &format!("{pk}/dev-moved"));
    assert_eq!(moved["path"], format!("/default/{pk}/dev-moved"), "{moved}");
    assert_eq!(dst.device(&pk, "dev-moved").await["instance_id"], "default");
    let log = log_text(&dst, "import", done["id"].as_str().unwrap()).await;
    assert!(log.contains(&format!("[/default/{pk}/dev-moved]")), "{log}");
    assert!(!log.contains("iot-east"), "{log}");
}

/// An import's `name` follows the export's rule (≤ 128 characters, no control characters),
/// checked before the package is read; it was stored as given.
#[tokio::test]
async fn an_import_name_is_bounded_like_an_export_name() {
    let t = gateway().await;
    for name in ["x".repeat(129), "tab\tinside".to_owned()] {
        let form = reqwest::multipart::Form::new()
            .text("name", name.clone())
            .part(
                "package",
                reqwest::multipart::Part::bytes(b"not a zip".to_vec()).file_name("p.zip"),
            );
        let resp = t
            .http
            .post(t.url("/api/v1/import"))
            .bearer_auth(ADMIN_TOKEN)
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{name:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            (body["error_code"].as_str(), body["error_ext_msg"].as_str()),
            (Some("FG.1001"), Some("name")),
            "{name:?}: {body}"
        );
    }
}
