//! Firmware over real HTTP: multipart upload with reqwest, then the device-facing download at
//! the URL the gateway itself puts into upgrade pushes (full, Range, after a restart).

use crate::helpers::*;
use sha2::{Digest, Sha256};
use std::time::Duration;

fn bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ (i / 251) as u8).collect()
}

#[tokio::test]
async fn upload_then_download_through_the_pushed_url() {
    let mut t = spawn_app().await;
    let pk = t.create_product("fw product").await;
    let data = bytes(2 * 1024 * 1024 + 3);

    let form = reqwest::multipart::Form::new()
        .text("product_key", pk.clone())
        .text("version", "2.0.0")
        .text("src_versions", "1.0.0")
        .part(
            "file",
            reqwest::multipart::Part::bytes(data.clone()).file_name("fw.bin"),
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
    let p: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(p["sha256"], hex::encode(Sha256::digest(&data)));
    let fid = p["firmware_id"].as_str().unwrap().to_owned();

    // The URL an upgrade push would carry; no bearer token needed.
    let repo = t.app().firmware().clone();
    let package = repo.get(&fid).unwrap();
    let push = repo.upgrade_data(&package, Duration::from_secs(600));
    assert_eq!(push.sign, p["sha256"].as_str().unwrap());
    let resp = reqwest::get(&push.url).await.expect("download");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-length"].to_str().unwrap(),
        data.len().to_string()
    );
    let body = resp.bytes().await.unwrap();
    assert_eq!(hex::encode(Sha256::digest(&body)), push.sign);

    let resp = t
        .http
        .get(&push.url)
        .header("range", "bytes=1048576-1048675")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 206);
    assert_eq!(
        &resp.bytes().await.unwrap()[..],
        &data[1_048_576..1_048_676]
    );

    // A range unit the gateway does not know is ignored (RFC 9110 §14.2): 200, whole body.
    let resp = t
        .http
        .get(&push.url)
        .header("range", "items=0-10")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers().get("content-range").is_none());
    assert_eq!(&resp.bytes().await.unwrap()[..], &data[..]);

    // After a restart (new port) the same signed path still works.
    let path = push.url.splitn(4, '/').nth(3).unwrap().to_owned();
    t.restart().await;
    let resp = t
        .http
        .get(t.url(&format!("/{path}")))
        .header("range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 206);
    assert_eq!(&resp.bytes().await.unwrap()[..], &data[data.len() - 10..]);
    t.stop().await;
}

/// Body limits with the default settings: JSON routes refuse 2 MiB (413 in the standard body)
/// while a 2 MiB firmware upload goes through.
#[tokio::test]
async fn a_2_mib_json_body_is_413_while_a_2_mib_firmware_upload_works() {
    let t = spawn_app().await;
    let pk = t.create_product("limits").await;
    let mut json = br#"{"device_name":"dev-0001","tags":{"note":""#.to_vec();
    json.resize(2 * 1024 * 1024, b'x');
    json.extend_from_slice(br#""}}"#);
    for path in [
        format!("/api/v1/products/{pk}/devices"),
        "/api/v1/migrations".to_owned(),
        "/api/v1/export".to_owned(),
    ] {
        let resp = t
            .http
            .post(t.url(&path))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(json.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 413, "{path}");
        let rid = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        let e: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(e["error_code"], "FG.0413", "{path}: {e}");
        assert_eq!(e["request_id"], rid.as_str());
    }
    let (s, _) = t
        .get(&format!("/api/v1/products/{pk}/devices/dev-0001"))
        .await;
    assert_eq!(s, 404, "nothing was created");

    let data = bytes(2 * 1024 * 1024);
    let form = reqwest::multipart::Form::new()
        .text("product_key", pk.clone())
        .text("version", "3.0.0")
        .part(
            "file",
            reqwest::multipart::Part::bytes(data.clone()).file_name("fw.bin"),
        );
    let resp = t
        .http
        .post(t.url("/api/v1/firmware"))
        .bearer_auth(OPERATOR_TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let p: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(p["size"], data.len());
}
