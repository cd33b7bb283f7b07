use super::*;
use crate::store::Store;
use std::net::Ipv4Addr;

fn metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new())
}

fn registry() -> Arc<Registry> {
    let m = metrics();
    Registry::open(Store::open_in_memory(m.clone()).unwrap(), m).unwrap()
}

fn new_product(name: &str) -> NewProduct {
    NewProduct::named(name)
}

fn new_device(name: &str) -> NewDevice {
    NewDevice {
        device_name: name.into(),
        ..Default::default()
    }
}

fn tagged(name: &str, tags: &[(&str, &str)]) -> NewDevice {
    NewDevice {
        device_name: name.into(),
        tags: tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// Creates the product "Lamp"; returns its product key.
async fn lamp(r: &Registry) -> String {
    r.create_product(new_product("Lamp"))
        .await
        .unwrap()
        .product_key
}

/// Creates the product "Lamp" with one device, `dev1`; returns the product key.
async fn lamp_with_dev1(r: &Registry) -> String {
    let pk = lamp(r).await;
    r.create_device(&pk, new_device("dev1")).await.unwrap();
    pk
}

fn invalid_field(r: Result<impl std::fmt::Debug>) -> &'static str {
    match r {
        Err(RegistryError::Invalid { field, .. }) => field,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

#[test]
fn validation_table() {
    let ok_name = |s: &str| validate::device_name(s).is_ok();
    for good in ["abcd", "dev_1-2@x.y:z", &"a".repeat(32), "ABCD"] {
        assert!(ok_name(good), "{good:?} should be valid");
    }
    for bad in [
        "abc",
        "",
        &"a".repeat(33),
        "dev 1",
        "dev/1",
        "dev#1",
        "dév1",
        "dev+1",
    ] {
        assert!(!ok_name(bad), "{bad:?} should be invalid");
    }

    let cases: Vec<(Result<()>, bool, &str)> = vec![
        (validate::product_key("a1B2c3"), true, "product_key"),
        (validate::product_key(&"k".repeat(32)), true, "product_key"),
        (validate::product_key(""), false, "product_key"),
        (validate::product_key(&"k".repeat(33)), false, "product_key"),
        (validate::product_key("a1-b"), false, "product_key"),
        (validate::product_key("sys"), false, "product_key"),
        (validate::product_key("OTA"), false, "product_key"),
        (validate::product_key("system"), true, "product_key"),
        (validate::instance_id("iot-06z_x"), true, "instance_id"),
        (validate::instance_id(&"i".repeat(64)), true, "instance_id"),
        (validate::instance_id(&"i".repeat(65)), false, "instance_id"),
        (validate::instance_id("a.b"), false, "instance_id"),
        (validate::instance_id(""), false, "instance_id"),
        (validate::name("name", "Smart lamp 灯"), true, "name"),
        (validate::name("name", &"n".repeat(64)), true, "name"),
        (validate::name("name", &"n".repeat(65)), false, "name"),
        (validate::name("name", "   "), false, "name"),
        (validate::name("name", "a\u{0}b"), false, "name"),
        (
            validate::description(&"d".repeat(101)),
            false,
            "description",
        ),
        (validate::device_secret("abc"), true, "device_secret"),
        (validate::device_secret("has space"), false, "device_secret"),
        (validate::device_secret(""), false, "device_secret"),
        (validate::module("MCU"), true, "module"),
        (validate::module(""), false, "module"),
        (validate::version("1.0.0-rc1"), true, "version"),
        (validate::version(""), false, "version"),
    ];
    for (i, (result, valid, field)) in cases.into_iter().enumerate() {
        match result {
            Ok(()) => assert!(valid, "case {i} ({field}) accepted"),
            Err(RegistryError::Invalid { field: f, .. }) => {
                assert!(!valid, "case {i} ({field}) refused");
                assert_eq!(f, field, "case {i}");
            }
            Err(e) => panic!("case {i}: {e}"),
        }
    }

    let tags = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert!(validate::tags(&tags(&[("floor", "3"), ("a.b-c_d", "")])).is_ok());
    assert!(validate::tags(&tags(&[(&"k".repeat(30), &"v".repeat(128))])).is_ok());
    assert_eq!(
        invalid_field(validate::tags(&tags(&[(&"k".repeat(31), "v")]))),
        "tags"
    );
    assert_eq!(invalid_field(validate::tags(&tags(&[("", "v")]))), "tags");
    assert_eq!(
        invalid_field(validate::tags(&tags(&[("bad key", "v")]))),
        "tags"
    );
    assert_eq!(
        invalid_field(validate::tags(&tags(&[("k", &"v".repeat(129))]))),
        "tags"
    );
    let many: BTreeMap<String, String> = (0..101)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    assert!(matches!(
        validate::tags(&many),
        Err(RegistryError::TooMany {
            field: "tags",
            max: 100
        })
    ));
}

#[test]
fn generated_identifiers_have_the_vendor_shape() {
    let pk = validate::generate_product_key();
    assert_eq!(pk.len(), 11);
    assert!(
        pk.starts_with("a1") && pk.chars().all(|c| c.is_ascii_alphanumeric()),
        "{pk}"
    );
    validate::product_key(&pk).unwrap();
    let ps = validate::generate_product_secret();
    assert!(
        ps.len() == 16 && ps.chars().all(|c| c.is_ascii_alphanumeric()),
        "{ps}"
    );
    let ds = validate::generate_device_secret();
    assert!(
        ds.len() == 32 && ds.chars().all(|c| c.is_ascii_alphanumeric()),
        "{ds}"
    );
    validate::device_secret(&ds).unwrap();
    let iid = validate::generate_instance_id();
    assert!(iid.starts_with("iot-") && iid.len() == 18, "{iid}");
    validate::instance_id(&iid).unwrap();
    assert_ne!(validate::generate_device_secret(), ds);
    assert_ne!(validate::generate_product_key(), pk);
}

#[test]
fn page_bounds_name_the_field() {
    assert_eq!(
        Page::new(1, 1).unwrap(),
        Page {
            page: 1,
            page_size: 1
        }
    );
    Page::new(7, 100).unwrap();
    assert_eq!(invalid_field(Page::new(0, 20)), "page");
    assert_eq!(invalid_field(Page::new(1, 0)), "page_size");
    assert_eq!(invalid_field(Page::new(1, 101)), "page_size");
    assert_eq!(
        Page::default(),
        Page {
            page: 1,
            page_size: 20
        }
    );
}

#[tokio::test]
async fn instances_and_products() {
    let r = registry();
    assert_eq!(
        r.list_instances()
            .iter()
            .map(|i| i.instance_id.as_str())
            .collect::<Vec<_>>(),
        ["default"]
    );
    let other = r
        .create_instance(NewInstance {
            instance_id: None,
            name: "Other".into(),
        })
        .await
        .unwrap();
    assert!(other.instance_id.starts_with("iot-"));
    let err = r
        .create_instance(NewInstance {
            instance_id: Some("default".into()),
            name: "x".into(),
        })
        .await;
    assert!(matches!(
        err,
        Err(RegistryError::AlreadyExists {
            kind: "instance",
            ..
        })
    ));
    assert_eq!(
        invalid_field(
            r.create_instance(NewInstance {
                instance_id: Some("a b".into()),
                name: "x".into()
            })
            .await
        ),
        "instance_id"
    );
    assert_eq!(r.get_instance(&other.instance_id).unwrap(), other);
    assert!(matches!(
        r.get_instance("nope"),
        Err(RegistryError::NotFound {
            kind: "instance",
            ..
        })
    ));

    let p = r.create_product(new_product("Lamp")).await.unwrap();
    assert_eq!(
        (
            p.product_key.len(),
            p.product_secret.len(),
            p.instance_id.as_str()
        ),
        (11, 16, "default")
    );
    let given = NewProduct {
        product_key: Some("myKey1".into()),
        instance_id: Some(other.instance_id.clone()),
        description: Some("a product".into()),
        ..new_product("Sensor")
    };
    let q = r.create_product(given.clone()).await.unwrap();
    assert_eq!(
        (q.product_key.as_str(), q.instance_id.as_str()),
        ("myKey1", other.instance_id.as_str())
    );
    assert!(matches!(
        r.create_product(given).await,
        Err(RegistryError::AlreadyExists {
            kind: "product",
            ..
        })
    ));
    let missing = NewProduct {
        instance_id: Some("ghost".into()),
        ..new_product("X")
    };
    assert!(matches!(
        r.create_product(missing).await,
        Err(RegistryError::NotFound {
            kind: "instance",
            ..
        })
    ));
    assert_eq!(
        invalid_field(r.create_product(new_product("")).await),
        "name"
    );
    let bad_key = NewProduct {
        product_key: Some("bad-key".into()),
        ..new_product("X")
    };
    assert_eq!(
        invalid_field(r.create_product(bad_key).await),
        "product_key"
    );
    assert!(matches!(
        r.get_product("nope"),
        Err(RegistryError::NotFound {
            kind: "product",
            ..
        })
    ));

    // Paging by name: "Lamp" < "Sensor" < "Zeta".
    r.create_product(new_product("Zeta")).await.unwrap();
    let first = r.list_products(Page::new(1, 2).unwrap());
    assert_eq!(first.total, 3);
    assert_eq!(
        first
            .items
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["Lamp", "Sensor"]
    );
    let second = r.list_products(Page::new(2, 2).unwrap());
    assert_eq!(
        second
            .items
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["Zeta"]
    );
    assert!(r.list_products(Page::new(3, 2).unwrap()).items.is_empty());
}

#[tokio::test]
async fn delete_product_with_devices_is_a_conflict() {
    let r = registry();
    let p = r.create_product(new_product("Lamp")).await.unwrap();
    r.create_device(&p.product_key, new_device("dev1"))
        .await
        .unwrap();
    assert_eq!(r.get_product(&p.product_key).unwrap().device_count, 1);
    assert!(matches!(
        r.delete_product(&p.product_key).await,
        Err(RegistryError::Conflict(_))
    ));
    r.delete_device(&p.product_key, "dev1").await.unwrap();
    assert!(matches!(
        r.delete_device(&p.product_key, "dev1").await,
        Err(RegistryError::NotFound { kind: "device", .. })
    ));
    r.delete_product(&p.product_key).await.unwrap();
    assert!(matches!(
        r.get_product(&p.product_key),
        Err(RegistryError::NotFound { .. })
    ));
    assert!(matches!(
        r.delete_product(&p.product_key).await,
        Err(RegistryError::NotFound { .. })
    ));
    assert!(matches!(
        r.create_device(&p.product_key, new_device("dev2")).await,
        Err(RegistryError::NotFound {
            kind: "product",
            ..
        })
    ));
    assert_eq!(r.list_products(Page::default()).total, 0);
    // The key is free again.
    let again = NewProduct {
        product_key: Some(p.product_key.clone()),
        ..new_product("Lamp 2")
    };
    r.create_product(again).await.unwrap();
}

#[tokio::test]
async fn devices_crud_and_generated_secrets() {
    let r = registry();
    let pk = lamp(&r).await;
    let d = r
        .create_device(&pk, tagged("dev1", &[("floor", "3")]))
        .await
        .unwrap();
    assert_eq!(d.device_secret.len(), 32);
    assert!(d.enabled && !d.online && d.versions.is_empty() && d.last_seen_ms.is_none());
    assert_eq!(d.instance_id, "default");
    let given = NewDevice {
        device_secret: Some("mysecret".into()),
        ..new_device("dev2")
    };
    assert_eq!(
        r.create_device(&pk, given).await.unwrap().device_secret,
        "mysecret"
    );
    assert!(matches!(
        r.create_device(&pk, new_device("dev1")).await,
        Err(RegistryError::AlreadyExists { kind: "device", .. })
    ));
    assert_eq!(
        invalid_field(r.create_device(&pk, new_device("x")).await),
        "device_name"
    );
    assert!(matches!(
        r.create_device("nope", new_device("dev9")).await,
        Err(RegistryError::NotFound {
            kind: "product",
            ..
        })
    ));
    assert_eq!(r.get_device(&pk, "dev1").unwrap(), d);
    assert!(matches!(
        r.get_device(&pk, "nope"),
        Err(RegistryError::NotFound { kind: "device", .. })
    ));

    let creds = r.credentials(&pk, "dev1").unwrap();
    assert_eq!(
        (creds.device_secret.as_str(), creds.enabled),
        (d.device_secret.as_str(), true)
    );
    assert!(r.credentials(&pk, "nope").is_none());
    assert!(r.credentials("nope", "dev1").is_none());

    let updated = r
        .update_device(
            &pk,
            "dev1",
            DeviceUpdate {
                enabled: Some(false),
                tags: Some(BTreeMap::new()),
            },
        )
        .await
        .unwrap();
    assert!(!updated.enabled && updated.tags.is_empty());
    assert!(!r.credentials(&pk, "dev1").unwrap().enabled);
    let only_tags = DeviceUpdate {
        enabled: None,
        tags: Some(BTreeMap::from([("a".into(), "b".into())])),
    };
    let updated = r.update_device(&pk, "dev1", only_tags).await.unwrap();
    assert!(!updated.enabled && updated.tags.len() == 1);
    let bad_tags = DeviceUpdate {
        enabled: None,
        tags: Some(BTreeMap::from([("bad key".into(), "b".into())])),
    };
    assert_eq!(
        invalid_field(r.update_device(&pk, "dev1", bad_tags).await),
        "tags"
    );
    assert!(r
        .update_device(&pk, "nope", DeviceUpdate::default())
        .await
        .is_err());
}

#[tokio::test]
async fn paging_and_filters() {
    let r = registry();
    let pk = lamp(&r).await;
    // Created out of order; listed by name.
    for i in (0..25).rev() {
        let tags: &[(&str, &str)] = match i % 3 {
            0 => &[("floor", "1")],
            1 => &[("floor", "2")],
            _ => &[],
        };
        r.create_device(&pk, tagged(&format!("dev{i:02}"), tags))
            .await
            .unwrap();
    }
    let names = |p: &Paged<Device>| {
        p.items
            .iter()
            .map(|d| d.device_name.clone())
            .collect::<Vec<_>>()
    };
    let all = DeviceFilter::default();
    let p1 = r.list_devices(&pk, &all, Page::default()).unwrap();
    assert_eq!(
        (p1.total, p1.items.len(), p1.page, p1.page_size),
        (25, 20, 1, 20)
    );
    assert_eq!(names(&p1)[..3], ["dev00", "dev01", "dev02"]);
    let p2 = r
        .list_devices(&pk, &all, Page::new(2, 20).unwrap())
        .unwrap();
    assert_eq!(names(&p2), ["dev20", "dev21", "dev22", "dev23", "dev24"]);

    for i in [3, 4, 5] {
        r.device_connected(&pk, &format!("dev{i:02}"), i, IP, 1_000);
    }
    let online = DeviceFilter {
        online: Some(true),
        ..Default::default()
    };
    let page = r
        .list_devices(&pk, &online, Page::new(1, 2).unwrap())
        .unwrap();
    assert_eq!(
        (page.total, names(&page)),
        (3, vec!["dev03".to_string(), "dev04".to_string()])
    );
    let page = r
        .list_devices(&pk, &online, Page::new(2, 2).unwrap())
        .unwrap();
    assert_eq!((page.total, names(&page)), (3, vec!["dev05".to_string()]));
    let offline = DeviceFilter {
        online: Some(false),
        ..Default::default()
    };
    assert_eq!(
        r.list_devices(&pk, &offline, Page::default())
            .unwrap()
            .total,
        22
    );

    let has_floor = DeviceFilter {
        tag_key: Some("floor".into()),
        ..Default::default()
    };
    assert_eq!(
        r.list_devices(&pk, &has_floor, Page::default())
            .unwrap()
            .total,
        17
    );
    let floor2 = DeviceFilter {
        tag_key: Some("floor".into()),
        tag_value: Some("2".into()),
        ..Default::default()
    };
    let page = r
        .list_devices(&pk, &floor2, Page::new(1, 100).unwrap())
        .unwrap();
    assert_eq!(page.total, 8);
    assert!(page
        .items
        .iter()
        .all(|d| d.tags.get("floor").map(String::as_str) == Some("2")));
    let floor1_online = DeviceFilter {
        online: Some(true),
        tag_key: Some("floor".into()),
        tag_value: Some("1".into()),
    };
    assert_eq!(
        names(
            &r.list_devices(&pk, &floor1_online, Page::default())
                .unwrap()
        ),
        ["dev03"]
    );
    let value_only = DeviceFilter {
        tag_value: Some("1".into()),
        ..Default::default()
    };
    assert_eq!(
        invalid_field(r.list_devices(&pk, &value_only, Page::default())),
        "tag_value"
    );
    assert!(matches!(
        r.list_devices("nope", &all, Page::default()),
        Err(RegistryError::NotFound { .. })
    ));
}

#[tokio::test]
async fn batch_create_reports_each_row() {
    let r = registry();
    let pk = lamp(&r).await;
    r.create_device(&pk, new_device("exists")).await.unwrap();
    let rows = vec![
        new_device("good1"),
        new_device("no"),     // too short
        new_device("exists"), // already there
        new_device("good2"),
        new_device("good1"), // duplicate in batch
        NewDevice {
            device_secret: Some("bad secret".into()),
            ..new_device("good3")
        },
        tagged("good4", &[("k", "v")]),
    ];
    let results = r.batch_create_devices(&pk, rows).await.unwrap();
    assert_eq!(results.len(), 7);
    let summary: Vec<(usize, &str, &str)> = results
        .iter()
        .enumerate()
        .map(|(i, res)| match res {
            RowResult::Created(d) => (i + 1, d.device_name.as_str(), "created"),
            RowResult::Failed {
                row,
                device_name,
                error_code,
                ..
            } => {
                assert_eq!(*row, i + 1);
                (*row, device_name.as_str(), error_code.as_str())
            }
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, "good1", "created"),
            (2, "no", "FG.InvalidParameter"),
            (3, "exists", "FG.AlreadyExists"),
            (4, "good2", "created"),
            (5, "good1", "FG.InvalidParameter"),
            (6, "good3", "FG.InvalidParameter"),
            (7, "good4", "created"),
        ]
    );
    assert_eq!(r.get_product(&pk).unwrap().device_count, 4);
    assert_eq!(r.get_device(&pk, "good4").unwrap().tags.len(), 1);

    let json = serde_json::to_value(&results[0]).unwrap();
    assert_eq!(
        (json["status"].as_str(), json["device_name"].as_str()),
        (Some("created"), Some("good1"))
    );
    let json = serde_json::to_value(&results[1]).unwrap();
    assert_eq!(
        (json["status"].as_str(), json["row"].as_u64()),
        (Some("failed"), Some(2))
    );

    let too_many: Vec<NewDevice> = (0..=MAX_BATCH_ROWS)
        .map(|i| new_device(&format!("d{i:05}")))
        .collect();
    assert!(matches!(
        r.batch_create_devices(&pk, too_many).await,
        Err(RegistryError::TooMany {
            field: "devices",
            max: 10_000
        })
    ));
    assert!(matches!(
        r.batch_create_devices("nope", vec![]).await,
        Err(RegistryError::NotFound { .. })
    ));
    assert_eq!(r.get_product(&pk).unwrap().device_count, 4);

    let full: Vec<NewDevice> = (0..MAX_BATCH_ROWS)
        .map(|i| new_device(&format!("d{i:05}")))
        .collect();
    let results = r.batch_create_devices(&pk, full).await.unwrap();
    assert!(results.iter().all(|r| matches!(r, RowResult::Created(_))));
    assert_eq!(r.get_product(&pk).unwrap().device_count, 10_004);
}

#[tokio::test]
async fn takeover_race_in_device_disconnected() {
    let r = registry();
    let pk = lamp_with_dev1(&r).await;
    let other_ip = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2));

    r.device_connected(&pk, "dev1", 1, IP, 100);
    assert_eq!(r.online_count(), 1);
    // Takeover: connection 2 arrives before connection 1's disconnect is processed.
    r.device_connected(&pk, "dev1", 2, other_ip, 200);
    assert_eq!(r.online_count(), 1);
    r.device_disconnected(&pk, "dev1", 1, 300);
    let d = r.get_device(&pk, "dev1").unwrap();
    assert!(
        d.online,
        "the old connection's disconnect took the device offline"
    );
    assert_eq!(
        (d.last_seen_ms, d.client_ip.as_deref()),
        (Some(200), Some("198.51.100.2"))
    );
    assert_eq!(r.online_count(), 1);

    r.device_disconnected(&pk, "dev1", 2, 400);
    let d = r.get_device(&pk, "dev1").unwrap();
    assert!(!d.online);
    assert_eq!(d.last_seen_ms, Some(400));
    assert_eq!(r.online_count(), 0);
    // A repeated disconnect changes nothing.
    r.device_disconnected(&pk, "dev1", 2, 500);
    assert_eq!(
        (
            r.online_count(),
            r.get_device(&pk, "dev1").unwrap().last_seen_ms
        ),
        (0, Some(400))
    );

    // Unknown devices are ignored, and deleting an online device takes it out of the count.
    r.device_connected(&pk, "ghost", 3, IP, 600);
    r.device_connected(&pk, "dev1", 4, IP, 700);
    assert_eq!(r.online_count(), 1);
    r.delete_device(&pk, "dev1").await.unwrap();
    assert_eq!(r.online_count(), 0);
    r.device_disconnected(&pk, "dev1", 4, 800);
    assert_eq!(r.online_count(), 0);
}

#[tokio::test]
async fn report_version_validates_and_records() {
    let r = registry();
    let pk = lamp_with_dev1(&r).await;
    r.report_version(&pk, "dev1", "default", "1.0.0", 10)
        .await
        .unwrap();
    r.report_version(&pk, "dev1", "MCU", "0.1", 11)
        .await
        .unwrap();
    r.report_version(&pk, "dev1", "default", "1.0.1", 12)
        .await
        .unwrap();
    r.report_version(&pk, "dev1", "default", "1.0.1", 13)
        .await
        .unwrap();
    let versions = r.get_device(&pk, "dev1").unwrap().versions;
    assert_eq!(
        versions,
        BTreeMap::from([
            ("MCU".into(), "0.1".into()),
            ("default".into(), "1.0.1".into())
        ])
    );
    assert_eq!(
        invalid_field(r.report_version(&pk, "dev1", "", "1", 1).await),
        "module"
    );
    assert_eq!(
        invalid_field(r.report_version(&pk, "dev1", "MCU", "", 1).await),
        "version"
    );
    assert!(matches!(
        r.report_version(&pk, "ghost", "MCU", "1", 1).await,
        Err(RegistryError::NotFound { .. })
    ));
}

#[tokio::test]
async fn modules_beyond_the_limit_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::db_path(dir.path());
    let m = metrics();
    let limits = RegistryLimits {
        max_modules_per_device: 2,
    };
    let r = Registry::open_with(Store::open(&path, m.clone()).unwrap(), m.clone(), limits).unwrap();
    let pk = lamp_with_dev1(&r).await;
    r.report_version(&pk, "dev1", "default", "1", 1)
        .await
        .unwrap();
    r.report_version(&pk, "dev1", "MCU", "1", 2).await.unwrap();
    // A third module: refused, in a run as alone; the record keeps two.
    let mut writes = VersionWrites::default();
    for (i, module) in ["m3", "m4", "m5"].into_iter().enumerate() {
        assert!(matches!(
            r.stage_version(&mut writes, &pk, "dev1", module, "1", 3 + i as i64),
            Err(RegistryError::TooMany {
                field: "modules",
                max: 2
            })
        ));
    }
    assert!(writes.is_empty());
    assert!(matches!(
        r.report_version(&pk, "dev1", "m6", "1", 9).await,
        Err(RegistryError::TooMany { .. })
    ));
    // The modules it has keep being updated.
    r.report_version(&pk, "dev1", "MCU", "2", 10).await.unwrap();
    let expected = BTreeMap::from([
        ("MCU".to_owned(), "2".to_owned()),
        ("default".to_owned(), "1".to_owned()),
    ]);
    assert_eq!(r.get_device(&pk, "dev1").unwrap().versions, expected);
    // Another device has its own two.
    r.create_device(&pk, new_device("dev2")).await.unwrap();
    r.report_version(&pk, "dev2", "m3", "1", 11).await.unwrap();
    r.flush().await.unwrap();
    drop(r);

    // A lower limit after a restart: what a device has is kept, nothing new is added.
    let limits = RegistryLimits {
        max_modules_per_device: 1,
    };
    let r = Registry::open_with(Store::open(&path, m.clone()).unwrap(), m, limits).unwrap();
    assert_eq!(r.get_device(&pk, "dev1").unwrap().versions, expected);
    r.report_version(&pk, "dev1", "default", "3", 12)
        .await
        .unwrap();
    assert!(matches!(
        r.report_version(&pk, "dev1", "m7", "1", 13).await,
        Err(RegistryError::TooMany { .. })
    ));
}

#[tokio::test]
async fn staged_reports_are_applied_at_once_and_written_as_one_submission() {
    let r = registry();
    let pk = lamp_with_dev1(&r).await;
    r.report_version(&pk, "dev1", "MCU", "0.9", 1)
        .await
        .unwrap();

    let mut writes = VersionWrites::default();
    r.stage_version(&mut writes, &pk, "dev1", "MCU", "1.0", 2)
        .unwrap();
    r.stage_version(&mut writes, &pk, "dev1", "default", "3", 3)
        .unwrap();
    r.stage_version(&mut writes, &pk, "dev1", "MCU", "1.1", 4)
        .unwrap();
    // The registry has them before the write (the device's order is the registry's order).
    let versions = r.get_device(&pk, "dev1").unwrap().versions;
    assert_eq!(versions.get("MCU").map(String::as_str), Some("1.1"));
    // The MCU report replaced the earlier one of the same row: two writes, not three.
    assert_eq!(writes.len(), 2);
    // Unchanged: no write. Refused: nothing staged, nothing changed.
    r.stage_version(&mut writes, &pk, "dev1", "MCU", "1.1", 5)
        .unwrap();
    assert_eq!(writes.len(), 2);
    assert_eq!(
        invalid_field(r.stage_version(&mut writes, &pk, "dev1", "", "1", 6)),
        "module"
    );
    assert!(matches!(
        r.stage_version(&mut writes, &pk, "ghost", "MCU", "1", 7),
        Err(RegistryError::NotFound { .. })
    ));
    assert_eq!(writes.len(), 2);
    r.commit_versions(writes).await.unwrap();

    // An empty batch still waits for what is queued before it.
    r.commit_versions(VersionWrites::default()).await.unwrap();
}

#[tokio::test]
async fn restart_brings_everything_back_but_online() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::db_path(dir.path());
    let m = metrics();
    let r = Registry::open(Store::open(&path, m.clone()).unwrap(), m.clone()).unwrap();
    let inst = r
        .create_instance(NewInstance {
            instance_id: Some("iot-east".into()),
            name: "East".into(),
        })
        .await
        .unwrap();
    let lamp = r
        .create_product(NewProduct {
            instance_id: Some(inst.instance_id.clone()),
            description: Some("lamps".into()),
            ..new_product("Lamp")
        })
        .await
        .unwrap();
    let pk = lamp.product_key.clone();
    let doomed = r.create_product(new_product("Doomed")).await.unwrap();
    r.delete_product(&doomed.product_key).await.unwrap();
    r.create_device(&pk, tagged("dev1", &[("floor", "3")]))
        .await
        .unwrap();
    r.batch_create_devices(&pk, vec![new_device("dev2"), new_device("dev3")])
        .await
        .unwrap();
    r.delete_device(&pk, "dev3").await.unwrap();
    r.update_device(
        &pk,
        "dev2",
        DeviceUpdate {
            enabled: Some(false),
            tags: None,
        },
    )
    .await
    .unwrap();
    r.report_version(&pk, "dev1", "MCU", "2.0", 5)
        .await
        .unwrap();
    r.device_connected(&pk, "dev1", 7, IP, 1_000);
    r.device_connected(&pk, "dev2", 8, IP, 1_100);
    r.device_disconnected(&pk, "dev2", 8, 1_200);
    r.flush().await.unwrap();
    let before: Vec<Device> = ["dev1", "dev2"]
        .iter()
        .map(|dn| r.get_device(&pk, dn).unwrap())
        .collect();
    let instances = r.list_instances();
    drop(r); // last handle: closes the store

    let r = Registry::open(Store::open(&path, m.clone()).unwrap(), m).unwrap();
    assert_eq!(r.list_instances(), instances);
    assert_eq!(
        r.get_product(&pk).unwrap(),
        Product {
            device_count: 2,
            ..lamp
        }
    );
    assert!(r.get_product(&doomed.product_key).is_err());
    assert!(r.get_device(&pk, "dev3").is_err());
    for d in before {
        let after = r.get_device(&pk, &d.device_name).unwrap();
        assert!(!after.online, "{} online after restart", d.device_name);
        assert_eq!(
            after,
            Device {
                online: false,
                node: None,
                ..d
            }
        );
    }
    let dev1 = r.get_device(&pk, "dev1").unwrap();
    assert_eq!(
        (dev1.last_seen_ms, dev1.client_ip.as_deref()),
        (Some(1_000), Some("192.0.2.1"))
    );
    assert_eq!(dev1.versions.get("MCU").map(String::as_str), Some("2.0"));
    assert_eq!(r.get_device(&pk, "dev2").unwrap().last_seen_ms, Some(1_200));
    assert!(!r.get_device(&pk, "dev2").unwrap().enabled);
    assert_eq!(r.online_count(), 0);
    // A device can be created with a previously deleted name.
    r.create_device(&pk, new_device("dev3")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_version_reports_are_group_committed() {
    let dir = tempfile::tempdir().unwrap();
    let m = metrics();
    let r = Registry::open(
        Store::open(&Store::db_path(dir.path()), m.clone()).unwrap(),
        m.clone(),
    )
    .unwrap();
    let pk = lamp(&r).await;
    let rows: Vec<NewDevice> = (0..100)
        .map(|i| new_device(&format!("dev{i:03}")))
        .collect();
    r.batch_create_devices(&pk, rows).await.unwrap();
    let (sum_before, count_before) = crate::store::tests::batch_size_sum_and_count(&m);

    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let r = Arc::clone(&r);
            let pk = pk.clone();
            tokio::spawn(async move {
                let dn = format!("dev{:03}", i % 100);
                r.report_version(
                    &pk,
                    &dn,
                    &format!("m{}", i / 100),
                    &format!("1.{i}"),
                    i as i64,
                )
                .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let (sum, count) = crate::store::tests::batch_size_sum_and_count(&m);
    assert_eq!(sum - sum_before, 1000.0);
    assert!(
        count - count_before < 1000.0,
        "1,000 reports took {} transactions",
        count - count_before
    );

    drop(r);
    let r = Registry::open(
        Store::open(&Store::db_path(dir.path()), m.clone()).unwrap(),
        m,
    )
    .unwrap();
    let d = r.get_device(&pk, "dev042").unwrap();
    assert_eq!(d.versions.len(), 10);
    assert_eq!(d.versions.get("m3").map(String::as_str), Some("1.342"));
}

/// A backend whose commits fail while `failing` is set (a full disk, say).
struct FlakyBackend {
    inner: crate::store::SqliteBackend,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl crate::store::StoreBackend for FlakyBackend {
    fn load(&mut self) -> std::result::Result<crate::store::Snapshot, StoreError> {
        self.inner.load()
    }

    fn load_documents(
        &mut self,
        kind: &str,
    ) -> std::result::Result<Vec<(String, String)>, StoreError> {
        self.inner.load_documents(kind)
    }

    fn commit(
        &mut self,
        submissions: &[&[Op]],
    ) -> std::result::Result<Vec<std::result::Result<(), StoreError>>, StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Corrupt {
                what: "test",
                message: "disk full".into(),
            });
        }
        self.inner.commit(submissions)
    }
}

/// A registry on a [`FlakyBackend`], and the switch that makes its commits fail.
fn flaky_registry() -> (Arc<Registry>, Arc<std::sync::atomic::AtomicBool>) {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let backend = FlakyBackend {
        inner: crate::store::SqliteBackend::open_in_memory().unwrap(),
        failing: failing.clone(),
    };
    let m = metrics();
    let r = Registry::open(Store::with_backend(backend, m.clone()).unwrap(), m).unwrap();
    (r, failing)
}

#[tokio::test]
async fn a_create_that_did_not_commit_is_taken_back() {
    let (r, failing) = flaky_registry();
    let pk = lamp(&r).await;

    failing.store(true, Ordering::SeqCst);
    assert!(matches!(
        r.create_device(&pk, new_device("dev1")).await,
        Err(RegistryError::Store(_))
    ));
    assert!(r.get_device(&pk, "dev1").is_err());
    let batch = r
        .batch_create_devices(&pk, vec![new_device("dev2"), new_device("dev3")])
        .await;
    assert!(matches!(batch, Err(RegistryError::Store(_))));
    assert_eq!(r.get_product(&pk).unwrap().device_count, 0);
    assert!(matches!(
        r.create_product(new_product("Other")).await,
        Err(RegistryError::Store(_))
    ));
    assert_eq!(r.list_products(Page::default()).total, 1);
    let new = NewInstance {
        instance_id: Some("east".into()),
        name: "East".into(),
    };
    assert!(r.create_instance(new.clone()).await.is_err());
    assert!(r.get_instance("east").is_err());

    failing.store(false, Ordering::SeqCst);
    r.create_device(&pk, new_device("dev1")).await.unwrap();
    r.batch_create_devices(&pk, vec![new_device("dev2"), new_device("dev3")])
        .await
        .unwrap();
    r.create_instance(new).await.unwrap();
    assert_eq!(r.get_product(&pk).unwrap().device_count, 3);
}

#[test]
fn models_have_openapi_schemas() {
    use utoipa::PartialSchema;
    let row = serde_json::to_string(&RowResult::schema()).unwrap();
    assert!(
        row.contains("\"status\"") && row.contains("error_code"),
        "{row}"
    );
    let paged = serde_json::to_string(&<Paged<Device> as PartialSchema>::schema()).unwrap();
    assert!(
        paged.contains("items") && paged.contains("total"),
        "{paged}"
    );
}

#[tokio::test]
async fn set_devices_instance_moves_ownership_durably_with_extra_ops() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::db_path(dir.path());
    let m = metrics();
    let r = Registry::open(Store::open(&path, m.clone()).unwrap(), m.clone()).unwrap();
    r.create_instance(NewInstance {
        instance_id: Some("iot-target".into()),
        name: "Target".into(),
    })
    .await
    .unwrap();
    let pk = lamp(&r).await;
    r.batch_create_devices(&pk, vec![new_device("dev1"), new_device("dev2")])
        .await
        .unwrap();
    r.device_connected(&pk, "dev1", 1, IP, 10);

    // Unknown instance / product are errors of the whole call.
    assert!(matches!(
        r.set_device_instance(&pk, "dev1", "iot-nope").await,
        Err(RegistryError::NotFound {
            kind: "instance",
            ..
        })
    ));
    assert!(matches!(
        r.set_device_instance("nope", "dev1", "iot-target").await,
        Err(RegistryError::NotFound {
            kind: "product",
            ..
        })
    ));

    let names: Vec<String> = ["dev1", "ghost", "dev2"].map(String::from).into();
    let mut extra_for = Vec::new();
    let results = r
        .set_devices_instance(&pk, &names, "iot-target", |dn| {
            extra_for.push(dn.to_owned());
            vec![Op::PutDoc {
                kind: "test.moved",
                id: dn.to_owned(),
                body: "{}".into(),
            }]
        })
        .await
        .unwrap();
    assert_eq!(
        extra_for,
        ["dev1", "dev2"],
        "no extra ops for unknown names"
    );
    assert_eq!(results.len(), 3);
    let dev1 = results[0].as_ref().unwrap();
    assert_eq!(dev1.instance_id, "iot-target");
    assert!(
        dev1.online,
        "the result says whether the device is connected"
    );
    assert!(matches!(
        results[1],
        Err(RegistryError::NotFound { kind: "device", .. })
    ));
    assert_eq!(results[2].as_ref().unwrap().instance_id, "iot-target");
    assert_eq!(r.get_device(&pk, "dev2").unwrap().instance_id, "iot-target");

    // Idempotent: already there.
    let again = r
        .set_device_instance(&pk, "dev2", "iot-target")
        .await
        .unwrap();
    assert_eq!(again.instance_id, "iot-target");
    // And back, one device.
    r.set_device_instance(&pk, "dev2", DEFAULT_INSTANCE_ID)
        .await
        .unwrap();

    assert_eq!(
        r.device_names_after(&pk, None, 10).unwrap(),
        ["dev1", "dev2"]
    );
    assert_eq!(
        r.device_names_after(&pk, Some("dev1"), 10).unwrap(),
        ["dev2"]
    );
    assert_eq!(r.device_names_after(&pk, None, 1).unwrap(), ["dev1"]);
    assert!(r
        .device_names_after(&pk, Some("dev2"), 10)
        .unwrap()
        .is_empty());

    drop(r);
    let store = Store::open(&path, m.clone()).unwrap();
    let docs = store.load_documents("test.moved").unwrap();
    assert_eq!(docs.len(), 2, "extra ops committed with the moves");
    let r = Registry::open(store, m).unwrap();
    assert_eq!(r.get_device(&pk, "dev1").unwrap().instance_id, "iot-target");
    assert_eq!(
        r.get_device(&pk, "dev2").unwrap().instance_id,
        DEFAULT_INSTANCE_ID
    );
}

#[tokio::test]
async fn a_move_that_did_not_commit_is_put_back() {
    let (r, failing) = flaky_registry();
    r.create_instance(NewInstance {
        instance_id: Some("iot-target".into()),
        name: "Target".into(),
    })
    .await
    .unwrap();
    let pk = lamp_with_dev1(&r).await;
    failing.store(true, Ordering::SeqCst);
    assert!(matches!(
        r.set_device_instance(&pk, "dev1", "iot-target").await,
        Err(RegistryError::Store(_))
    ));
    assert_eq!(
        r.get_device(&pk, "dev1").unwrap().instance_id,
        DEFAULT_INSTANCE_ID
    );
    failing.store(false, Ordering::SeqCst);
    r.set_device_instance(&pk, "dev1", "iot-target")
        .await
        .unwrap();
    assert_eq!(r.get_device(&pk, "dev1").unwrap().instance_id, "iot-target");
}

#[tokio::test]
async fn debug_output_never_shows_a_secret() {
    let r = registry();
    let product = r.create_product(new_product("Lamp")).await.unwrap();
    let device = r
        .create_device(
            &product.product_key,
            NewDevice {
                device_name: "dev1".into(),
                device_secret: Some("sekrit-device-0123456789".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let new = NewDevice {
        device_name: "dev2".into(),
        device_secret: Some("sekrit-request-0123456789".into()),
        ..Default::default()
    };
    let printed = [
        format!("{product:?}"),
        format!("{device:?}"),
        format!("{new:?}"),
        format!("{:?}", RowResult::Created(device.clone())),
        format!("{:?}", product_record(&product)),
    ];
    for text in &printed {
        assert!(!text.contains(&product.product_secret), "{text}");
        assert!(!text.contains("sekrit"), "{text}");
    }
    assert!(printed[1].contains("dev1") && printed[1].contains(REDACTED));
    let record = crate::store::DeviceRecord {
        product_key: product.product_key.clone(),
        device_name: "dev1".into(),
        device_secret: device.device_secret.clone(),
        instance_id: "default".into(),
        enabled: true,
        tags: Default::default(),
        created_at_ms: 0,
    };
    let text = format!("{:?}", crate::store::Op::PutDevice(record));
    assert!(!text.contains("sekrit") && text.contains("dev1"), "{text}");
}

#[tokio::test]
async fn delete_instance_refuses_what_still_names_it_and_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::db_path(dir.path());
    let m = metrics();
    let r = Registry::open(Store::open(&path, m.clone()).unwrap(), m.clone()).unwrap();
    let east = |id: &str| NewInstance {
        instance_id: Some(id.into()),
        name: "East".into(),
    };
    r.create_instance(east("iot-east")).await.unwrap();
    r.create_instance(east("iot-west")).await.unwrap();
    let home = r
        .create_product(NewProduct {
            instance_id: Some("iot-east".into()),
            ..new_product("Lamp")
        })
        .await
        .unwrap()
        .product_key;
    // A device of a `default` product owned by iot-west (moved there by a migration).
    let pk = lamp_with_dev1(&r).await;
    r.set_devices_instance(&pk, &["dev1".into()], "iot-west", |_| Vec::new())
        .await
        .unwrap();

    // Bad input and refusals change nothing.
    assert_eq!(
        invalid_field(r.delete_instance("bad id!", Vec::new()).await),
        "instance_id"
    );
    assert!(matches!(
        r.delete_instance("iot-none", Vec::new()).await,
        Err(RegistryError::NotFound {
            kind: "instance",
            ..
        })
    ));
    assert!(matches!(
        r.delete_instance(DEFAULT_INSTANCE_ID, Vec::new()).await,
        Err(RegistryError::DefaultInstance)
    ));
    assert!(matches!(
        r.delete_instance("iot-east", Vec::new()).await,
        Err(RegistryError::InstanceInUse {
            products: 1,
            devices: 0,
            ..
        })
    ));
    assert!(matches!(
        r.check_instance_deletable("iot-west"),
        Err(RegistryError::InstanceInUse {
            products: 0,
            devices: 1,
            ..
        })
    ));
    assert!(r.delete_instance("iot-west", Vec::new()).await.is_err());
    assert_eq!(r.list_instances().len(), 3);

    // Freed, they go; the ops given along commit with the delete.
    r.delete_product(&home).await.unwrap();
    let doc = Op::PutDoc {
        kind: "test.note",
        id: "iot-east".into(),
        body: "gone".into(),
    };
    let gone = r.delete_instance("iot-east", vec![doc]).await.unwrap();
    assert_eq!(gone.instance_id, "iot-east");
    assert!(r.get_instance("iot-east").is_err());
    assert!(matches!(
        r.create_product(NewProduct {
            instance_id: Some("iot-east".into()),
            ..new_product("Late")
        })
        .await,
        Err(RegistryError::NotFound { .. })
    ));
    r.set_devices_instance(&pk, &["dev1".into()], DEFAULT_INSTANCE_ID, |_| Vec::new())
        .await
        .unwrap();
    r.delete_instance("iot-west", Vec::new()).await.unwrap();
    drop(r);

    let r = Registry::open(Store::open(&path, m.clone()).unwrap(), m).unwrap();
    let ids: Vec<String> = r
        .list_instances()
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    assert_eq!(ids, [DEFAULT_INSTANCE_ID]);
    assert_eq!(
        r.store().load_documents("test.note").unwrap(),
        vec![("iot-east".to_owned(), "gone".to_owned())]
    );
    // The id can be used again.
    r.create_instance(east("iot-east")).await.unwrap();
}

#[tokio::test]
async fn an_instance_delete_that_did_not_commit_is_put_back() {
    let (r, failing) = flaky_registry();
    r.create_instance(NewInstance {
        instance_id: Some("east".into()),
        name: "East".into(),
    })
    .await
    .unwrap();
    failing.store(true, Ordering::SeqCst);
    assert!(matches!(
        r.delete_instance("east", Vec::new()).await,
        Err(RegistryError::Store(_))
    ));
    assert_eq!(r.get_instance("east").unwrap().name, "East");
    failing.store(false, Ordering::SeqCst);
    r.delete_instance("east", Vec::new()).await.unwrap();
    assert!(r.get_instance("east").is_err());
}
