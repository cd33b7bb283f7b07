//! Reading packages: firmware streamed out again after verification, listed sizes past the
//! limits refused before inflating.

use super::*;

/// A package with one firmware object whose bytes are `firmware` (written to `dir`).
fn package(dir: &Path, firmware: &[u8]) -> Bytes {
    let sha = sha256_hex(firmware);
    let blob = dir.join("blob");
    std::fs::write(&blob, firmware).unwrap();
    let item = ExportItem {
        id: "fw-1".into(),
        object_type: ObjectType::Firmware,
        name: "fw".into(),
        path: "/default/pk/fw".into(),
        data: serde_json::json!({"sha256": sha}),
        secrets: None,
        blob: Some((sha, blob)),
    };
    let dest = dir.join("p.zip");
    write_package(&dest, ("exp-1", "t", 0), &[item], None).unwrap();
    Bytes::from(std::fs::read(dest).unwrap())
}

fn limits(entry_bytes: u64, total_bytes: u64) -> UnpackLimits {
    UnpackLimits {
        entry_bytes,
        total_bytes,
    }
}

#[test]
fn firmware_is_streamed_out_again_after_verification() {
    let dir = tempfile::tempdir().unwrap();
    let firmware: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let pkg = read_package(
        package(dir.path(), &firmware),
        None,
        limits(1 << 20, 1 << 22),
    )
    .unwrap();
    let name = pkg.objects[0].meta.blob.clone().unwrap();
    let source = pkg.blob(&name).unwrap();
    assert_eq!(source.size(), firmware.len() as u64);
    let mut out = Vec::new();
    let mut chunks = 0;
    source
        .stream(|chunk| {
            assert!(chunk.len() <= CHUNK);
            chunks += 1;
            out.extend_from_slice(chunk);
            true
        })
        .unwrap();
    assert_eq!(out, firmware);
    assert!(chunks > 1);
    // A sink that stops early gets an error, not a short file.
    let source = pkg.blob(&name).unwrap();
    assert!(matches!(source.stream(|_| false), Err(PackageError::Io(_))));
    assert!(pkg.blob("firmware/none").is_none());
}

#[test]
fn listed_sizes_past_the_limits_are_refused_before_inflating() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = package(dir.path(), &[7u8; 100_000]);
    // The firmware file is over the per-file limit.
    match read_package(bytes.clone(), None, limits(50_000, 1 << 20)) {
        Err(PackageError::EntryTooLarge {
            path,
            limit: 50_000,
            setting: "export.max_unpacked_entry_bytes",
        }) => assert!(path.starts_with("firmware/"), "{path}"),
        other => panic!("{other:?}"),
    }
    // Every file fits alone, not all together.
    assert!(matches!(
        read_package(bytes.clone(), None, limits(100_000, 100_100)),
        Err(PackageError::TooLarge { limit: 100_100 })
    ));
    // The manifest itself is bounded as well.
    assert!(matches!(
        read_package(bytes.clone(), None, limits(100, 1 << 20)),
        Err(PackageError::EntryTooLarge { path, .. }) if path == MANIFEST
    ));
    assert!(read_package(bytes, None, limits(100_000, 1 << 20)).is_ok());
}
