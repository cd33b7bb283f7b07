//! Repository tests on a tempdir store: persistence across reopen, dedup, deletion, URLs.

use super::*;
use crate::metrics::Metrics;
use md5::Md5;
use sha2::{Digest, Sha256};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn open(&self, max_size: u64) -> (Store, Arc<FirmwareRepo>) {
        let store = Store::open(
            &self.dir.path().join("fleetgate.db"),
            Arc::new(Metrics::new()),
        )
        .expect("store");
        let repo = FirmwareRepo::open(
            self.dir.path(),
            store.clone(),
            "http://gw.example:8080/".into(),
            max_size,
        )
        .expect("repo");
        (store, repo)
    }

    fn blobs(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path().join(BLOB_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn create_persists_and_survives_reopen() {
    let env = Env::new();
    let data = bytes(200_000, 1);
    let created = {
        let (store, repo) = env.open(DEFAULT_MAX_SIZE);
        let mut new = NewFirmware::new("pk1", "1.2.0");
        new.src_versions = vec!["1.0.0".into(), "1.1.0".into(), "1.0.0".into()];
        new.sign_method = Some(FirmwareSignMethod::Md5);
        new.description = Some("fixes".into());
        let p = repo.create_from_bytes(new, &data).await.unwrap();
        assert!(p.firmware_id.starts_with("fw-") && p.firmware_id.len() == 19);
        assert!(p.firmware_id[3..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        assert_eq!(p.size, 200_000);
        assert_eq!(p.sha256, hex::encode(Sha256::digest(&data)));
        assert_eq!(p.md5, hex::encode(Md5::digest(&data)));
        assert_eq!(p.sign, p.md5);
        assert_eq!(p.module, "default");
        assert_eq!(p.name, "1.2.0");
        assert_eq!(p.src_versions, vec!["1.0.0", "1.1.0"], "deduplicated");
        assert_eq!(p.status, FirmwareStatus::Unverified);
        let p = repo
            .set_status(&p.firmware_id, FirmwareStatus::Verified)
            .await
            .unwrap();
        drop(repo);
        store.close();
        p
    };
    let (_store, repo) = env.open(DEFAULT_MAX_SIZE);
    assert_eq!(repo.get(&created.firmware_id), Some(created.clone()));
    assert_eq!(
        std::fs::read(repo.blob_path(&created)).unwrap(),
        data,
        "bytes survive"
    );
    assert_eq!(
        repo.find("pk1", "default", "1.2.0").map(|p| p.firmware_id),
        Some(created.firmware_id)
    );
}

#[tokio::test]
async fn identical_bytes_share_one_blob_until_the_last_delete() {
    let env = Env::new();
    let (_store, repo) = env.open(DEFAULT_MAX_SIZE);
    let data = bytes(1000, 2);
    let a = repo
        .create_from_bytes(NewFirmware::new("pk1", "1.0"), &data)
        .await
        .unwrap();
    let b = repo
        .create_from_bytes(NewFirmware::new("pk2", "1.0"), &data)
        .await
        .unwrap();
    assert_eq!(a.sha256, b.sha256);
    assert_eq!(env.blobs(), vec![a.sha256.clone()]);
    assert!(matches!(
        repo.delete(&a.firmware_id, true).await,
        Err(FirmwareError::InUse(_))
    ));
    repo.delete(&a.firmware_id, false).await.unwrap();
    assert_eq!(env.blobs(), vec![a.sha256.clone()], "b still needs it");
    assert!(std::fs::read(repo.blob_path(&b)).is_ok());
    repo.delete(&b.firmware_id, false).await.unwrap();
    assert!(env.blobs().is_empty());
    assert!(matches!(
        repo.delete(&b.firmware_id, false).await,
        Err(FirmwareError::NotFound(_))
    ));
    // A deleted identity can be uploaded again.
    repo.create_from_bytes(NewFirmware::new("pk1", "1.0"), &data)
        .await
        .unwrap();
}

#[tokio::test]
async fn same_product_module_version_is_a_conflict() {
    let env = Env::new();
    let (_store, repo) = env.open(DEFAULT_MAX_SIZE);
    let a = repo
        .create_from_bytes(NewFirmware::new("pk1", "2.0"), b"one")
        .await
        .unwrap();
    let mut dup = NewFirmware::new("pk1", "2.0");
    dup.module = Some("default".into());
    match repo.create_from_bytes(dup.clone(), b"two").await {
        Err(FirmwareError::AlreadyExists { existing, .. }) => {
            assert_eq!(existing, a.firmware_id)
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        repo.validate(&dup),
        Err(FirmwareError::AlreadyExists { .. })
    ));
    assert_eq!(
        env.blobs(),
        vec![a.sha256.clone()],
        "the refused bytes are gone"
    );
    // Another module or product is another identity.
    dup.module = Some("wifi".into());
    repo.create_from_bytes(dup, b"two").await.unwrap();
    repo.create_from_bytes(NewFirmware::new("pk2", "2.0"), b"two")
        .await
        .unwrap();
}

#[tokio::test]
async fn concurrent_uploads_of_one_identity_store_one() {
    let env = Env::new();
    let (_store, repo) = env.open(DEFAULT_MAX_SIZE);
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            repo.create_from_bytes(NewFirmware::new("pk1", "3.0"), &bytes(5000, i))
                .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(FirmwareError::AlreadyExists { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(env.blobs().len(), 1, "losers leave no bytes behind");
}

#[tokio::test]
async fn validation_names_the_field() {
    let env = Env::new();
    let (_store, repo) = env.open(DEFAULT_MAX_SIZE);
    let field_of = |new: NewFirmware| match repo.validate(&new) {
        Err(FirmwareError::Invalid { field, .. }) => field,
        other => panic!("{new:?}: {other:?}"),
    };
    assert_eq!(field_of(NewFirmware::new("pk-1", "1")), "product_key");
    assert_eq!(field_of(NewFirmware::new("pk", "")), "version");
    assert_eq!(field_of(NewFirmware::new("pk", "x".repeat(65))), "version");
    assert_eq!(field_of(NewFirmware::new("pk", "1.0\n")), "version");
    assert_eq!(field_of(NewFirmware::new("pk", " 1.0")), "version");
    let with = |f: &dyn Fn(&mut NewFirmware)| {
        let mut n = NewFirmware::new("pk", "1.0");
        f(&mut n);
        n
    };
    assert_eq!(
        field_of(with(&|n| n.module = Some("wi fi".into()))),
        "module"
    );
    assert_eq!(
        field_of(with(&|n| n.module = Some("m".repeat(65)))),
        "module"
    );
    assert_eq!(field_of(with(&|n| n.name = Some("  ".into()))), "name");
    assert_eq!(
        field_of(with(
            &|n| n.src_versions = (0..11).map(|i| i.to_string()).collect()
        )),
        "src_versions"
    );
    assert_eq!(
        field_of(with(&|n| n.src_versions = vec!["1.0".into()])),
        "src_versions"
    );
    assert_eq!(
        field_of(with(&|n| n.description = Some("d".repeat(1025)))),
        "description"
    );
    // The edges that are fine.
    repo.validate(&with(&|n| {
        n.module = Some("a.B_c-9".into());
        n.src_versions = (0..10).map(|i| format!("0.{i}")).collect();
        n.version = "v 1.0-rc1+build.7".into();
    }))
    .unwrap();
    assert!(env.blobs().is_empty());
}

#[tokio::test]
async fn size_limit_is_enforced_while_streaming() {
    let env = Env::new();
    let (_store, repo) = env.open(1000);
    let p = repo
        .create_from_bytes(NewFirmware::new("pk", "1"), &bytes(1000, 0))
        .await
        .unwrap();
    assert_eq!(p.size, 1000);
    assert!(matches!(
        repo.create_from_bytes(NewFirmware::new("pk", "2"), &bytes(1001, 0))
            .await,
        Err(FirmwareError::TooLarge { max: 1000 })
    ));
    assert_eq!(env.blobs(), vec![p.sha256]);
    assert!(repo.get_by_version_for_test("pk", "2").is_none());
}

impl FirmwareRepo {
    fn get_by_version_for_test(&self, pk: &str, version: &str) -> Option<FirmwarePackage> {
        self.find(pk, DEFAULT_MODULE, version)
    }
}

#[tokio::test]
async fn list_is_newest_first_filtered_and_paged() {
    let env = Env::new();
    let (_store, repo) = env.open(DEFAULT_MAX_SIZE);
    let mut ids = Vec::new();
    for i in 0..5 {
        let pk = if i % 2 == 0 { "even" } else { "odd" };
        let p = repo
            .create_from_bytes(NewFirmware::new(pk, format!("1.{i}")), &[i as u8])
            .await
            .unwrap();
        ids.push(p.firmware_id);
        // Distinct creation times make the order observable.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let all = repo.list(None, Page::new(1, 100).unwrap());
    assert_eq!(all.total, 5);
    let listed: Vec<_> = all.items.iter().map(|p| p.firmware_id.clone()).collect();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first);
    let even = repo.list(Some("even"), Page::new(2, 2).unwrap());
    assert_eq!(even.total, 3);
    assert_eq!(even.items.len(), 1);
    assert_eq!(even.items[0].firmware_id, ids[0]);
    let none = repo.list(Some("nope"), Page::default());
    assert_eq!((none.total, none.items.len()), (0, 0));
    let beyond = repo.list(None, Page::new(9, 2).unwrap());
    assert_eq!((beyond.total, beyond.items.len()), (5, 0));
}

#[tokio::test]
async fn open_sweeps_temp_files_and_orphan_blobs() {
    let env = Env::new();
    let kept = {
        let (store, repo) = env.open(DEFAULT_MAX_SIZE);
        let p = repo
            .create_from_bytes(NewFirmware::new("pk", "1"), b"kept")
            .await
            .unwrap();
        // An interrupted upload and bytes whose metadata never committed.
        let mut w = repo.begin_upload().await.unwrap();
        w.write(b"half").await.unwrap();
        std::mem::forget(w);
        std::fs::write(
            env.dir.path().join(BLOB_DIR).join("f".repeat(64)),
            b"orphan",
        )
        .unwrap();
        drop(repo);
        store.close();
        p
    };
    assert_eq!(env.blobs().len(), 3);
    let (_store, repo) = env.open(DEFAULT_MAX_SIZE);
    assert_eq!(env.blobs(), vec![kept.sha256.clone()]);
    assert!(repo.get(&kept.firmware_id).is_some());
}

#[tokio::test]
async fn urls_and_upgrade_data_carry_a_valid_token() {
    let env = Env::new();
    let (_store, repo) = env.open(DEFAULT_MAX_SIZE);
    let mut new = NewFirmware::new("pk", "4.0");
    new.module = Some("mcu".into());
    let p = repo.create_from_bytes(new, b"firmware").await.unwrap();
    assert_eq!(
        repo.download_url("fw-missing", Duration::from_secs(60)),
        None
    );
    let url = repo
        .download_url(&p.firmware_id, Duration::from_secs(60))
        .unwrap();
    let prefix = format!(
        "http://gw.example:8080/firmware/{}/download?expires=",
        p.firmware_id
    );
    assert!(url.starts_with(&prefix), "{url}");
    let query = &url[url.find('?').unwrap() + 1..];
    let q: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let expires: u64 = q["expires"].parse().unwrap();
    let now = now_secs();
    assert!(
        (now + 59..=now + 61).contains(&expires),
        "{expires} vs {now}"
    );
    assert_eq!(
        repo.verify_download(&p.firmware_id, Some(&q["expires"]), Some(&q["token"])),
        Ok(())
    );

    let data = repo.upgrade_data(&p, Duration::from_secs(3600));
    assert_eq!(data.size, 8);
    assert_eq!(data.version, "4.0");
    assert_eq!(data.module, "mcu");
    assert_eq!(data.sign_method, FirmwareSignMethod::Sha256);
    assert_eq!(data.sign, hex::encode(Sha256::digest(b"firmware")));
    assert_eq!(data.md5, hex::encode(Md5::digest(b"firmware")));
    assert!(data.url.starts_with(&prefix));
    assert!(data.ext_data.is_none());
    // What a device parses: the topics crate's own validation accepts it.
    let msg = fleetgate_topics::UpgradeMessage::new(1, data.clone());
    let json = serde_json::to_vec(&msg).unwrap();
    let back = fleetgate_topics::UpgradeMessage::parse(&json).unwrap();
    assert_eq!(back.data, data);
}

#[tokio::test]
async fn set_status_of_unknown_package_is_not_found() {
    let env = Env::new();
    let (_store, repo) = env.open(DEFAULT_MAX_SIZE);
    assert!(matches!(
        repo.set_status("fw-nope", FirmwareStatus::Verifying).await,
        Err(FirmwareError::NotFound(_))
    ));
}

#[test]
fn status_names_are_the_api_names() {
    for s in [
        FirmwareStatus::Unverified,
        FirmwareStatus::Verifying,
        FirmwareStatus::Verified,
        FirmwareStatus::VerifyFailed,
    ] {
        assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
    }
}
