//! Firmware and export packages in a cluster: the bytes of record and the download-link key are
//! in PostgreSQL, so a package uploaded to one node is downloadable from every node, with a
//! link any node minted, also once the node that took the upload is dead; an export package
//! written by the engines' holder is served by the next holder.

use crate::harness::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// `path?query` of a signed link (its host is the node that minted it).
fn path_of(url: &str) -> String {
    let rest = url.split_once("://").expect("absolute URL").1;
    rest[rest.find('/').expect("a path")..].to_owned()
}

/// Mints a link through `node`'s API.
async fn link(node: &Node, fid: &str) -> String {
    let (status, body) = node
        .api()
        .get(&format!("/api/v1/firmware/{fid}/download-url"))
        .await;
    assert_eq!(status, 200, "{body}");
    path_of(body["url"].as_str().unwrap())
}

/// Downloads `path` (a signed link) from `node` without an API token.
async fn download(node: &Node, path: &str) -> Vec<u8> {
    let resp = reqwest::get(format!("http://{}{path}", node.http))
        .await
        .expect("download request");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.expect("download body").to_vec();
    assert_eq!(
        status,
        200,
        "download from node {}: {}\n{}",
        node.id,
        String::from_utf8_lossy(&bytes),
        node.logs()
    );
    bytes
}

/// Uploads `image` as `version` of `pk` through `node`; returns the firmware id.
async fn upload(node: &Node, pk: &str, version: &str, image: &[u8]) -> String {
    let fw = upload_firmware(node, pk, version, image).await;
    assert_eq!(fw["sha256"], hex::encode(Sha256::digest(image)));
    fw["firmware_id"].as_str().unwrap().to_owned()
}

/// `GET path` through `node`, retried while no node drives the engines (503); the body.
async fn get_engines(node: &Node, path: &str) -> (u16, Vec<u8>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let resp = reqwest::Client::new()
            .get(format!("http://{}{path}", node.http))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("request");
        let status = resp.status().as_u16();
        let body = resp.bytes().await.expect("body").to_vec();
        if status != 503 || tokio::time::Instant::now() > deadline {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts an export of `objects` through `node` and waits until it ends; the job.
async fn export(node: &Node, objects: Value) -> Value {
    let (status, job) = node
        .api()
        .post(
            "/api/v1/export",
            json!({ "objects": objects, "include_secrets": false }),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = get_engines(node, &format!("/api/v1/export/{id}")).await;
        let job: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert_eq!(status, 200, "{job}");
        if job["status"]["state"] != "IN_PROGRESS" {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "export stuck: {job}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A package uploaded to the node that stores it (the engines' holder) downloads
/// byte-identical from the two others with that node's link; that node is killed, and the
/// others still serve it — one of them never had it before — with the old link and with a
/// link the next holder mints.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_package_is_served_by_every_node_and_survives_the_node_that_took_it() {
    let mut cluster = Cluster::start(3).await;
    let receiver = engines_node(&cluster, &[1, 2, 3]).await;
    let others: Vec<u16> = [1, 2, 3].into_iter().filter(|&n| n != receiver).collect();
    let api = cluster.node(receiver).api();
    let pk = api.create_product("blobs").await;

    // Over three chunks of the shared table, not a multiple of the chunk size.
    let image: Vec<u8> = (0..3 * 1024 * 1024 + 4321u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let fid = upload(cluster.node(receiver), &pk, "5.0.0", &image).await;

    let minted_by_receiver = link(cluster.node(receiver), &fid).await;
    let first = cluster.node(others[0]);
    assert!(
        download(first, &minted_by_receiver).await == image,
        "node {} served other bytes",
        first.id
    );

    cluster.node_mut(receiver).kill9();
    // The other follower never served it: it fetches from PostgreSQL now.
    for &id in others.iter().rev() {
        assert!(
            download(cluster.node(id), &minted_by_receiver).await == image,
            "node {id} served other bytes after node {receiver} died"
        );
    }
    // The next holder's links work everywhere too.
    let next = engines_node(&cluster, &others).await;
    let minted_by_next = link(cluster.node(next), &fid).await;
    for &id in &others {
        assert!(
            download(cluster.node(id), &minted_by_next).await == image,
            "node {id} served other bytes with node {next}'s link"
        );
    }
}

/// An export package written by the engines' holder (with a firmware package in it) is
/// served by the next holder once the first is killed, byte-identical, and its job record is
/// shown; the next holder exports the firmware again although its bytes were never on its
/// disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_export_package_survives_the_node_that_wrote_it() {
    let mut cluster = Cluster::start(3).await;
    let holder = engines_node(&cluster, &[1, 2, 3]).await;
    let others: Vec<u16> = [1, 2, 3].into_iter().filter(|&n| n != holder).collect();
    let pk = cluster.node(holder).api().create_product("exports").await;
    let image: Vec<u8> = (0..1024 * 1024 + 999u32)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8)
        .collect();
    let fid = upload(cluster.node(holder), &pk, "7.0.0", &image).await;
    let objects = json!([{"id": fid, "type": "FIRMWARE"}]);
    let job = export(cluster.node(holder), objects.clone()).await;
    assert_eq!(job["status"]["state"], "SUCCESSFUL", "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let package_path = format!("/api/v1/export/{id}/package");
    let (status, package) = get_engines(cluster.node(holder), &package_path).await;
    assert_eq!(status, 200);

    cluster.node_mut(holder).kill9();
    let next = engines_node(&cluster, &others).await;
    let other = others.iter().copied().find(|&n| n != next).unwrap();
    // Through the follower (proxied to the next holder, which never ran the export).
    let (status, body) = get_engines(cluster.node(other), &format!("/api/v1/export/{id}")).await;
    let seen: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["status"]["state"], "SUCCESSFUL", "{seen}");
    let (status, again) = get_engines(cluster.node(other), &package_path).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&again));
    assert!(again == package, "node {next} served another package");

    // The next holder exports the firmware, fetching its bytes first.
    let job = export(cluster.node(next), objects).await;
    assert_eq!(job["status"]["state"], "SUCCESSFUL", "{job}");
}

/// A package deleted through a follower (the holder deletes it) leaves every node's blob cache:
/// the followers, which cached it by serving a download, remove their copy when the change
/// feed announces the deletion — not at their next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_package_leaves_the_cache_of_every_node() {
    let cluster = Cluster::start(3).await;
    let holder = engines_node(&cluster, &[1, 2, 3]).await;
    let followers: Vec<u16> = [1, 2, 3].into_iter().filter(|&n| n != holder).collect();
    let api = cluster.node(followers[0]).api();
    let pk = api.create_product("fw-cache").await;
    let image = b"image 3.0.0 cached on every node".to_vec();
    let fid = upload(cluster.node(followers[0]), &pk, "3.0.0", &image).await;
    let sha = hex::encode(Sha256::digest(&image));
    let path = link(cluster.node(holder), &fid).await;
    for &id in &[1, 2, 3] {
        assert_eq!(download(cluster.node(id), &path).await, image);
        let cached = cluster.node(id).data_dir().join("firmware").join(&sha);
        assert!(cached.exists(), "node {id} cached {}", cached.display());
    }

    let (status, body) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/firmware/{fid}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let deadline = tokio::time::Instant::now() + WAIT;
    for &id in &[1, 2, 3] {
        let cached = cluster.node(id).data_dir().join("firmware").join(&sha);
        while cached.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {id} still caches the deleted package ({})",
                cached.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let resp = reqwest::get(format!("http://{}{path}", cluster.node(followers[1]).http))
        .await
        .unwrap();
    assert_ne!(
        resp.status().as_u16(),
        200,
        "the package is gone everywhere"
    );
}
