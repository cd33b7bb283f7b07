//! Firmware routes over `oneshot`: multipart upload (digests checked against an independent
//! computation), limits, validation, lists, and the signed, Range-capable download.

use super::*;
use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::{Digest, Sha256};

const BOUNDARY: &str = "fleetgate-test-boundary-7MA4YWxkTrZu0gW";

enum Part<'a> {
    Text(&'a str, &'a str),
    File(&'a [u8]),
}

fn multipart(parts: &[Part<'_>]) -> (String, Vec<u8>) {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match part {
            Part::Text(name, value) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                        .as_bytes(),
                );
            }
            Part::File(bytes) => {
                body.extend_from_slice(
                    b"Content-Disposition: form-data; name=\"file\"; filename=\"fw.bin\"\r\n\
                      Content-Type: application/octet-stream\r\n\r\n",
                );
                body.extend_from_slice(bytes);
                body.extend_from_slice(b"\r\n");
            }
        }
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={BOUNDARY}"), body)
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i * 7 + i / 251) as u8).wrapping_add(seed))
        .collect()
}

struct Raw {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header: {:?}", self.headers))
            .to_str()
            .unwrap()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn error(&self, status: StatusCode, code: &str) -> Value {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        let body = self.json();
        assert_eq!(body["error_code"], code, "{body}");
        assert_eq!(body["request_id"], self.header("x-request-id"));
        body
    }
}

impl TestApp {
    async fn upload(&self, token: Option<&str>, parts: &[Part<'_>]) -> Reply {
        let (ct, body) = multipart(parts);
        self.send(
            Method::POST,
            "/api/v1/firmware",
            token,
            Some((&ct, body)),
            &[],
        )
        .await
    }

    /// A request with raw bytes back (downloads are binary).
    async fn raw(&self, method: Method, uri: &str, headers: &[(&str, &str)]) -> Raw {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .router
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Raw {
            status,
            headers,
            body: body.to_vec(),
        }
    }

    /// Path and query of a fresh signed link to `fid` (minted through the API).
    async fn link(&self, fid: &str) -> String {
        let r = self
            .get(
                &format!("/api/v1/firmware/{fid}/download-url"),
                Some(VIEWER),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let body = r.json();
        let url = body["url"].as_str().unwrap().to_owned();
        let expires = body["expires"].as_u64().unwrap();
        assert!(url.contains(&format!("?expires={expires}&token=")), "{url}");
        assert!((now_secs() + 3590..=now_secs() + 3610).contains(&expires));
        url.strip_prefix(PUBLIC_URL)
            .unwrap_or_else(|| panic!("{url} is not under {PUBLIC_URL}"))
            .to_owned()
    }

    /// Signs a link the way the docs describe, with the key from the data dir.
    fn sign(&self, fid: &str, expires: u64) -> String {
        let key = hex::decode(
            std::fs::read_to_string(self.dir.path().join("download-key"))
                .unwrap()
                .trim(),
        )
        .unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{fid}\n{expires}").as_bytes());
        let token = hex::encode(mac.finalize().into_bytes());
        format!("/firmware/{fid}/download?expires={expires}&token={token}")
    }

    fn blob_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path().join("firmware"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    async fn uploaded(&self, pk: &str, version: &str, bytes: &[u8]) -> Value {
        let r = self
            .upload(
                Some(OPERATOR),
                &[
                    Part::Text("product_key", pk),
                    Part::Text("version", version),
                    Part::File(bytes),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.json()
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn upload_small_and_multi_megabyte_packages_with_correct_digests() {
    let app = test_app();
    app.product("fwprod1").await;

    let small = payload(1000, 1);
    let r = app
        .upload(
            Some(OPERATOR),
            &[
                Part::Text("product_key", "fwprod1"),
                Part::Text("version", "1.0.1"),
                Part::Text("description", "first"),
                Part::File(&small),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let p = r.json();
    let sha = hex::encode(Sha256::digest(&small));
    let md5 = hex::encode(Md5::digest(&small));
    assert_eq!(p["size"], 1000);
    assert_eq!(p["sha256"], sha);
    assert_eq!(p["md5"], md5);
    assert_eq!(p["sign_method"], "SHA256");
    assert_eq!(p["sign"], sha);
    assert_eq!(p["module"], "default");
    assert_eq!(p["name"], "1.0.1");
    assert_eq!(p["status"], "UNVERIFIED");
    assert_eq!(p["description"], "first");
    assert_eq!(p["src_versions"], json!([]));
    assert!(p["firmware_id"].as_str().unwrap().starts_with("fw-"));

    // 5 MiB, file part first, options after it.
    let big = payload(5 * 1024 * 1024 + 17, 9);
    let r = app
        .upload(
            Some(OPERATOR),
            &[
                Part::File(&big),
                Part::Text("product_key", "fwprod1"),
                Part::Text("version", "2.0.0"),
                Part::Text("module", "mcu"),
                Part::Text("name", "big one"),
                Part::Text("sign_method", "md5"),
                Part::Text("src_versions", "1.0.0, 1.0.1"),
                Part::Text("src_versions", "1.5.0"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let p = r.json();
    assert_eq!(p["size"], big.len());
    assert_eq!(p["sha256"], hex::encode(Sha256::digest(&big)));
    assert_eq!(p["md5"], hex::encode(Md5::digest(&big)));
    assert_eq!(p["sign_method"], "Md5");
    assert_eq!(p["sign"], p["md5"]);
    assert_eq!(p["module"], "mcu");
    assert_eq!(p["name"], "big one");
    assert_eq!(p["src_versions"], json!(["1.0.0", "1.0.1", "1.5.0"]));
    // Stored bytes are exactly the upload.
    let fid = p["firmware_id"].as_str().unwrap();
    let stored = std::fs::read(
        app.dir
            .path()
            .join("firmware")
            .join(p["sha256"].as_str().unwrap()),
    )
    .unwrap();
    assert!(stored == big, "stored bytes differ");
    assert_eq!(app.firmware.get(fid).unwrap().size, big.len() as u64);
    assert_eq!(app.blob_files().len(), 2, "no temp files left");
}

#[tokio::test]
async fn upload_limit_follows_the_firmware_size_not_the_api_body_limit() {
    // JSON routes take 1 MiB by default; firmware may be 4 MiB.
    let app = test_app_in(
        tempfile::tempdir().unwrap(),
        BodyLimits::default(),
        4 * 1024 * 1024,
    );
    app.product("fwprod2").await;
    let three_mib = payload(3 * 1024 * 1024, 3);
    app.uploaded("fwprod2", "1.0", &three_mib).await;
    // JSON routes keep the small limit.
    let r = app
        .send(
            Method::POST,
            "/api/v1/products",
            Some(ADMIN),
            Some(("application/json", vec![b' '; 2 * 1024 * 1024])),
            &[],
        )
        .await;
    r.error(StatusCode::PAYLOAD_TOO_LARGE, "FG.0413");
}

#[tokio::test]
async fn too_large_is_413_and_leaves_nothing_on_disk() {
    let app = test_app_in(tempfile::tempdir().unwrap(), BodyLimits::default(), 1000);
    app.product("fwprod3").await;
    app.uploaded("fwprod3", "1.0", &payload(1000, 0)).await;
    let before = app.blob_files();
    for size in [1001, 3 * 1024 * 1024] {
        let r = app
            .upload(
                Some(OPERATOR),
                &[
                    Part::Text("product_key", "fwprod3"),
                    Part::Text("version", "2.0"),
                    Part::File(&payload(size, 1)),
                ],
            )
            .await;
        let body = r.error(StatusCode::PAYLOAD_TOO_LARGE, "FG.3002");
        assert_eq!(body["error_ext_msg"], "file");
        assert_eq!(app.blob_files(), before, "size {size}");
    }
    let list = app.get("/api/v1/firmware", Some(VIEWER)).await.json();
    assert_eq!(list["total"], 1);
}

#[tokio::test]
async fn unknown_product_duplicate_and_dedup() {
    let app = test_app();
    app.product("fwprod4").await;
    app.product("fwprod5").await;
    let bytes = payload(4096, 4);
    // Unknown product, named before and after the file.
    for parts in [
        vec![
            Part::Text("product_key", "nosuch"),
            Part::Text("version", "1.0"),
            Part::File(&bytes),
        ],
        vec![
            Part::File(&bytes),
            Part::Text("product_key", "nosuch"),
            Part::Text("version", "1.0"),
        ],
    ] {
        app.upload(Some(OPERATOR), &parts)
            .await
            .error(StatusCode::NOT_FOUND, "FG.2002");
    }
    assert!(app.blob_files().is_empty());

    let a = app.uploaded("fwprod4", "1.0", &bytes).await;
    app.upload(
        Some(OPERATOR),
        &[
            Part::Text("product_key", "fwprod4"),
            Part::Text("version", "1.0"),
            Part::Text("module", "default"),
            Part::File(&payload(10, 0)),
        ],
    )
    .await
    .error(StatusCode::CONFLICT, "FG.3003");
    // Same bytes for another product: a new package sharing the blob.
    let b = app.uploaded("fwprod5", "1.0", &bytes).await;
    assert_ne!(a["firmware_id"], b["firmware_id"]);
    assert_eq!(a["sha256"], b["sha256"]);
    assert_eq!(
        app.blob_files(),
        vec![a["sha256"].as_str().unwrap().to_owned()]
    );
}

#[tokio::test]
async fn upload_fields_are_validated_and_named() {
    let app = test_app();
    app.product("fwprod6").await;
    let f = payload(100, 6);
    let long_version = "9".repeat(65);
    let cases: Vec<(Vec<Part<'_>>, &str, &str)> = vec![
        (
            vec![Part::Text("product_key", "fwprod6"), Part::File(&f)],
            "FG.1002",
            "version",
        ),
        (
            vec![Part::Text("version", "1"), Part::File(&f)],
            "FG.1002",
            "product_key",
        ),
        (
            vec![
                Part::Text("product_key", "fwprod6"),
                Part::Text("version", "1"),
            ],
            "FG.1002",
            "file",
        ),
        (
            vec![
                Part::Text("product_key", "fwprod6"),
                Part::Text("version", "1"),
                Part::Text("sign_method", "crc32"),
                Part::File(&f),
            ],
            "FG.1001",
            "sign_method",
        ),
        (
            vec![
                Part::Text("product_key", "fwprod6"),
                Part::Text("version", "1"),
                Part::Text("colour", "red"),
                Part::File(&f),
            ],
            "FG.1001",
            "colour",
        ),
        (
            vec![
                Part::Text("product_key", "fwprod6"),
                Part::Text("version", "1"),
                Part::Text("module", "no spaces"),
                Part::File(&f),
            ],
            "FG.1001",
            "module",
        ),
        (
            vec![
                Part::Text("product_key", "fwprod6"),
                Part::Text("version", &long_version),
                Part::File(&f),
            ],
            "FG.1001",
            "version",
        ),
        (
            vec![
                Part::Text("product_key", "fwprod6"),
                Part::Text("version", "1"),
                Part::Text("src_versions", "a,b,c,d,e,f,g,h,i,j,k"),
                Part::File(&f),
            ],
            "FG.1001",
            "src_versions",
        ),
        (
            vec![
                Part::Text("product_key", "fwprod6"),
                Part::Text("version", "1"),
                Part::File(b""),
            ],
            "FG.1001",
            "file",
        ),
        (
            vec![
                Part::Text("product_key", "fwprod6"),
                Part::Text("version", "1"),
                Part::File(&f),
                Part::File(&f),
            ],
            "FG.1001",
            "file",
        ),
        (
            vec![
                Part::Text("product_key", "fwprod6"),
                Part::Text("version", "1"),
                Part::Text("version", "2"),
                Part::File(&f),
            ],
            "FG.1001",
            "version",
        ),
    ];
    for (parts, code, field) in cases {
        let r = app.upload(Some(OPERATOR), &parts).await;
        let body = r.error(StatusCode::BAD_REQUEST, code);
        assert_eq!(body["error_ext_msg"], field, "{body}");
    }
    assert!(app.blob_files().is_empty(), "refused uploads leave nothing");
    // Not multipart at all.
    app.post_json("/api/v1/firmware", Some(OPERATOR), json!({"version": "1"}))
        .await
        .error(StatusCode::BAD_REQUEST, "FG.1004");
}

#[tokio::test]
async fn roles_get_list_and_paging() {
    let app = test_app();
    app.product("fwprodA").await;
    app.product("fwprodB").await;
    let f = payload(50, 0);
    app.upload(
        None,
        &[Part::Text("product_key", "fwprodA"), Part::File(&f)],
    )
    .await
    .error(StatusCode::UNAUTHORIZED, "FG.0401");
    app.upload(
        Some(VIEWER),
        &[
            Part::Text("product_key", "fwprodA"),
            Part::Text("version", "1"),
            Part::File(&f),
        ],
    )
    .await
    .error(StatusCode::FORBIDDEN, "FG.0403");
    app.get("/api/v1/firmware", None)
        .await
        .error(StatusCode::UNAUTHORIZED, "FG.0401");

    let mut ids = Vec::new();
    for i in 0..5u8 {
        let pk = if i < 3 { "fwprodA" } else { "fwprodB" };
        let p = app.uploaded(pk, &format!("1.{i}"), &payload(64, i)).await;
        ids.push(p["firmware_id"].as_str().unwrap().to_owned());
    }
    let one = app
        .get(&format!("/api/v1/firmware/{}", ids[0]), Some(VIEWER))
        .await;
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(one.json()["version"], "1.0");
    app.get("/api/v1/firmware/fw-doesnotexist0000", Some(VIEWER))
        .await
        .error(StatusCode::NOT_FOUND, "FG.3001");

    let all = app
        .get("/api/v1/firmware?page_size=100", Some(VIEWER))
        .await
        .json();
    assert_eq!(all["total"], 5);
    let listed: std::collections::HashSet<_> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["firmware_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, ids.iter().cloned().collect());
    let a = app
        .get(
            "/api/v1/firmware?product_key=fwprodA&page=2&page_size=2",
            Some(VIEWER),
        )
        .await
        .json();
    assert_eq!(a["total"], 3);
    assert_eq!(a["page"], 2);
    assert_eq!(a["items"].as_array().unwrap().len(), 1);
    assert_eq!(a["items"][0]["product_key"], "fwprodA");
    app.get("/api/v1/firmware?page_size=0", Some(VIEWER))
        .await
        .error(StatusCode::BAD_REQUEST, "FG.1001");
    app.get(
        &format!("/api/v1/firmware/{}/download-url?ttl_secs=0", ids[0]),
        Some(VIEWER),
    )
    .await
    .error(StatusCode::BAD_REQUEST, "FG.1001");
}

#[tokio::test]
async fn download_full_ranges_and_conditionals() {
    let app = test_app();
    app.product("fwprodD").await;
    let bytes = payload(100_000, 5);
    let p = app.uploaded("fwprodD", "3.0", &bytes).await;
    let fid = p["firmware_id"].as_str().unwrap();
    let sha = p["sha256"].as_str().unwrap();
    let link = app.link(fid).await;
    assert!(
        link.starts_with(&format!("/firmware/{fid}/download?expires=")),
        "{link}"
    );

    // Whole file, no bearer token.
    let r = app.raw(Method::GET, &link, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body == bytes, "full body differs");
    assert_eq!(r.header("content-length"), "100000");
    assert_eq!(r.header("accept-ranges"), "bytes");
    assert_eq!(r.header("content-type"), "application/octet-stream");
    let etag = format!("\"{sha}\"");
    assert_eq!(r.header("etag"), etag);

    // One range.
    let r = app
        .raw(Method::GET, &link, &[("range", "bytes=10-19")])
        .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.body, &bytes[10..20]);
    assert_eq!(r.header("content-range"), "bytes 10-19/100000");
    assert_eq!(r.header("content-length"), "10");
    assert_eq!(r.header("etag"), etag);

    // Suffix range: the last 5 bytes.
    let r = app.raw(Method::GET, &link, &[("range", "bytes=-5")]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.body, &bytes[99_995..]);
    assert_eq!(r.header("content-range"), "bytes 99995-99999/100000");

    // Open-ended resume.
    let r = app
        .raw(Method::GET, &link, &[("range", "bytes=99990-")])
        .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.body, &bytes[99_990..]);

    // Unsatisfiable.
    let r = app
        .raw(Method::GET, &link, &[("range", "bytes=100000-")])
        .await;
    r.error(StatusCode::RANGE_NOT_SATISFIABLE, "FG.0416");
    assert_eq!(r.header("content-range"), "bytes */100000");

    let r = app.raw(Method::GET, &link, &[("range", "bytes=abc")]).await;
    r.error(StatusCode::RANGE_NOT_SATISFIABLE, "FG.0416");

    // Several ranges: the whole file.
    let r = app
        .raw(Method::GET, &link, &[("range", "bytes=0-1,5-6")])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), 100_000);

    // A unit other than bytes is ignored (RFC 9110 §14.2): the whole file, 200.
    for unit in ["items=0-10", "pages=1-2", "none"] {
        let r = app.raw(Method::GET, &link, &[("range", unit)]).await;
        assert_eq!(r.status, StatusCode::OK, "{unit}");
        assert_eq!(r.body.len(), 100_000, "{unit}");
        assert!(r.headers.get("content-range").is_none(), "{unit}");
    }
    // The unit is case-insensitive.
    let r = app
        .raw(Method::GET, &link, &[("range", "Bytes=10-19")])
        .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.header("content-range"), "bytes 10-19/100000");

    // If-Range with our ETag resumes; with another validator restarts from 0.
    let r = app
        .raw(
            Method::GET,
            &link,
            &[("range", "bytes=5-9"), ("if-range", &etag)],
        )
        .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.body, &bytes[5..10]);
    let r = app
        .raw(
            Method::GET,
            &link,
            &[("range", "bytes=5-9"), ("if-range", "\"other\"")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), 100_000);

    // If-None-Match with our ETag: nothing to send.
    let r = app
        .raw(Method::GET, &link, &[("if-none-match", &etag)])
        .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert!(r.body.is_empty());

    // HEAD: headers only.
    let r = app.raw(Method::HEAD, &link, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-length"), "100000");
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn bad_links_are_403_without_any_file_bytes() {
    let app = test_app();
    app.product("fwprodE").await;
    // Recognisable content so a leak would show.
    let bytes = b"FIRMWARE-SECRET-BYTES-".repeat(100);
    let p = app.uploaded("fwprodE", "1.0", &bytes).await;
    let fid = p["firmware_id"].as_str().unwrap();

    let expired = app.sign(fid, now_secs() - 10);
    let valid = app.sign(fid, now_secs() + 600);
    let tampered = {
        let mut v = valid.clone().into_bytes();
        let last = v.len() - 1;
        v[last] = if v[last] == b'0' { b'1' } else { b'0' };
        String::from_utf8(v).unwrap()
    };
    let other_fid = app.sign("fw-someotherpackage", now_secs() + 600);
    let swapped = other_fid.replace("fw-someotherpackage", fid);
    let extended = {
        // Same token, later expiry.
        let (path, _) = valid.split_once("?").unwrap();
        let token = valid.split("token=").nth(1).unwrap();
        format!("{path}?expires={}&token={token}", now_secs() + 99_999)
    };
    for uri in [
        expired,
        tampered,
        swapped,
        extended,
        format!("/firmware/{fid}/download"),
        format!("/firmware/{fid}/download?expires={}", now_secs() + 600),
        format!("/firmware/{fid}/download?token=abcd"),
        format!("/firmware/{fid}/download?expires=soon&token=abcd"),
    ] {
        let r = app.raw(Method::GET, &uri, &[("range", "bytes=0-9")]).await;
        r.error(StatusCode::FORBIDDEN, "FG.3004");
        assert!(
            !String::from_utf8_lossy(&r.body).contains("FIRMWARE-SECRET"),
            "{uri} leaked bytes"
        );
    }
    // A bearer token does not replace the link's token.
    let r = app
        .raw(
            Method::GET,
            &format!("/firmware/{fid}/download"),
            &[("authorization", &format!("Bearer {ADMIN}"))],
        )
        .await;
    r.error(StatusCode::FORBIDDEN, "FG.3004");
    // The properly signed link works (the test's own signing matches the gateway's).
    let r = app.raw(Method::GET, &valid, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, bytes);
    // A valid signature for an id that does not exist: 404.
    let r = app
        .raw(
            Method::GET,
            &app.sign("fw-nosuchpackage0", now_secs() + 60),
            &[],
        )
        .await;
    r.error(StatusCode::NOT_FOUND, "FG.3001");
}

#[tokio::test]
async fn restart_keeps_packages_blobs_and_links() {
    let bytes = payload(300_000, 8);
    let (fid, link, dir) = {
        let app = test_app_in(tempfile::tempdir().unwrap(), BodyLimits::default(), 1 << 20);
        app.product("fwprodR").await;
        let p = app.uploaded("fwprodR", "7.1", &bytes).await;
        let fid = p["firmware_id"].as_str().unwrap().to_owned();
        let link = app.link(&fid).await;
        // Everything but the data dir is dropped here: the store closes.
        let TestApp { dir, .. } = app;
        (fid, link, dir)
    };
    let app = test_app_in(dir, BodyLimits::default(), 1 << 20);
    let r = app
        .get(&format!("/api/v1/firmware/{fid}"), Some(VIEWER))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["sha256"], hex::encode(Sha256::digest(&bytes)));
    assert_eq!(app.blob_files().len(), 1);
    // A link minted before the restart still works: the key is persistent.
    let r = app
        .raw(Method::GET, &link, &[("range", "bytes=-100")])
        .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.body, &bytes[bytes.len() - 100..]);
}
