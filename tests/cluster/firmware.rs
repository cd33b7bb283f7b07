//! Firmware in a cluster: the bytes of record and the download-link key are in PostgreSQL, so
//! a package uploaded to one node is downloadable from every node, with a link any node
//! minted, also once the node that took the upload is dead.

use crate::harness::*;
use crate::ota::engines_node;
use serde_json::Value;
use sha2::{Digest, Sha256};

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
    let form = reqwest::multipart::Form::new()
        .text("product_key", pk.clone())
        .text("version", "5.0.0")
        .part(
            "file",
            reqwest::multipart::Part::bytes(image.clone()).file_name("fw.bin"),
        );
    let resp = reqwest::Client::new()
        .post(format!(
            "http://{}/api/v1/firmware",
            cluster.node(receiver).http
        ))
        .bearer_auth(ADMIN_TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let fw: Value = resp.json().await.unwrap();
    let fid = fw["firmware_id"].as_str().unwrap().to_owned();
    assert_eq!(fw["sha256"], hex::encode(Sha256::digest(&image)));

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
