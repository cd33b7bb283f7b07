//! Applying other nodes' changes: session epochs, config refreshes, resync.

use super::*;
use crate::cluster::epoch::EpochClock;
use crate::store::Store;
use std::net::Ipv4Addr;

const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

/// A registry of node 1 with product "Lamp" and device `dev1`.
async fn node1() -> (Arc<Registry>, String) {
    let m = Arc::new(Metrics::new());
    let store = Store::open_in_memory(m.clone()).unwrap();
    let snapshot = store.load().unwrap();
    let r = Registry::from_snapshot(
        store,
        m,
        RegistryLimits::default(),
        Arc::new(EpochClock::new(1)),
        snapshot,
    )
    .unwrap();
    let pk = r
        .create_product(NewProduct::named("Lamp"))
        .await
        .unwrap()
        .product_key;
    r.create_device(
        &pk,
        NewDevice {
            device_name: "dev1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    (r, pk)
}

/// An epoch of node `node` at millisecond `ms`.
fn epoch(node: u16, ms: i64) -> u64 {
    ((ms as u64) << 21) | u64::from(node)
}

fn online(epoch: u64) -> SessionEvent {
    SessionEvent {
        epoch,
        online: true,
        at_ms: crate::cluster::epoch::millis_of(epoch),
        client_ip: Some("10.1.1.1".into()),
    }
}

fn offline(epoch: u64) -> SessionEvent {
    SessionEvent {
        online: false,
        ..online(epoch)
    }
}

#[tokio::test]
async fn the_higher_epoch_holds_the_device_whatever_the_order() {
    let (a, b) = (epoch(2, 1_000), epoch(3, 2_000));
    // Every order in which node 1 can hear of two sessions and their ends.
    let orders: [&[(u64, bool)]; 4] = [
        &[(a, true), (b, true), (a, false)],
        &[(b, true), (a, true), (a, false)],
        &[(b, true), (b, false), (a, true), (a, false)],
        &[(a, true), (a, false), (b, true)],
    ];
    let expect_online = [true, true, false, true];
    for (order, want) in orders.iter().zip(expect_online) {
        let (r, pk) = node1().await;
        for &(e, up) in *order {
            let event = if up { online(e) } else { offline(e) };
            r.apply_session(&pk, "dev1", &event);
        }
        let d = r.get_device(&pk, "dev1").unwrap();
        assert_eq!(d.online, want, "order {order:?}");
        assert_eq!(r.online_count(), usize::from(want), "order {order:?}");
        assert_eq!(
            r.session_of(&pk, "dev1"),
            want.then_some(b),
            "order {order:?}"
        );
    }
}

#[tokio::test]
async fn a_newer_session_elsewhere_supersedes_the_local_one_and_the_old_end_changes_nothing() {
    let (r, pk) = node1().await;
    let local = r.epochs().next();
    r.device_connected(&pk, "dev1", local, IP, 10);
    let remote = r.epochs().next() + (5 << 21) - 1; // node 2, a little later
    let remote = (remote & !0x1ff) | 2;
    let ended = r.apply_session(&pk, "dev1", &online(remote));
    assert_eq!(
        ended,
        Some(Superseded {
            product_key: pk.clone(),
            device_name: "dev1".into(),
            epoch: local,
        })
    );
    // The local session's end (after the broker retired it) does not take the device offline.
    r.device_disconnected(&pk, "dev1", local, 20);
    assert!(r.get_device(&pk, "dev1").unwrap().online);
    assert_eq!(r.session_of(&pk, "dev1"), Some(remote));
    // This node's clock has moved past the remote epoch: a reconnect here wins next.
    assert!(r.epochs().next() > remote);
}

#[tokio::test]
async fn an_older_remote_session_does_not_take_a_local_one_over() {
    let (r, pk) = node1().await;
    let local = r.epochs().next();
    r.device_connected(&pk, "dev1", local, IP, 10);
    let older = (local - (1 << 21)) & !0x1ff | 2;
    assert_eq!(r.apply_session(&pk, "dev1", &online(older)), None);
    assert_eq!(r.session_of(&pk, "dev1"), Some(local));
    assert_eq!(r.apply_session(&pk, "dev1", &offline(older)), None);
    assert!(r.get_device(&pk, "dev1").unwrap().online);
}

#[tokio::test]
async fn releasing_a_node_ends_only_its_earlier_sessions() {
    let (r, pk) = node1().await;
    r.create_device(
        &pk,
        NewDevice {
            device_name: "dev2".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    r.apply_session(&pk, "dev1", &online(epoch(2, 1_000)));
    r.apply_session(&pk, "dev2", &online(epoch(2, 5_000)));
    assert_eq!(r.online_count(), 2);
    assert_eq!(r.release_node(3, 10_000, 10_000), 0);
    assert_eq!(r.release_node(2, 4_000, 4_000), 1);
    assert!(!r.get_device(&pk, "dev1").unwrap().online);
    assert!(r.get_device(&pk, "dev2").unwrap().online);
    assert_eq!(r.online_count(), 1);
}

fn stored(pk: &str, dn: &str, r: &Registry) -> StoredDevice {
    let d = r.get_device(pk, dn).unwrap();
    StoredDevice {
        record: DeviceRecord {
            product_key: d.product_key,
            device_name: d.device_name,
            device_secret: d.device_secret,
            instance_id: d.instance_id,
            enabled: d.enabled,
            tags: d.tags,
            created_at_ms: d.created_at_ms,
        },
        last_seen_ms: d.last_seen_ms,
        client_ip: d.client_ip,
        versions: d.versions,
        session: None,
        epoch_seen: 0,
    }
}

#[tokio::test]
async fn refreshes_revoke_local_sessions_table() {
    type Edit = fn(&mut StoredDevice);
    let cases: [(&str, Edit, bool); 5] = [
        (
            "tags only",
            |s| {
                s.record.tags.insert("floor".into(), "2".into());
            },
            false,
        ),
        ("disabled", |s| s.record.enabled = false, true),
        (
            "re-keyed",
            |s| s.record.device_secret = "new-secret-0123".into(),
            true,
        ),
        ("moved", |s| s.record.instance_id = "iot-other".into(), true),
        ("unchanged", |_| {}, false),
    ];
    for (name, edit, revoked) in cases {
        let (r, pk) = node1().await;
        let local = r.epochs().next();
        r.device_connected(&pk, "dev1", local, IP, 10);
        let mut s = stored(&pk, "dev1", &r);
        edit(&mut s);
        let want = s.record.clone();
        let ended = r.refresh_device(&pk, "dev1", Some(s)).await;
        assert_eq!(ended.map(|e| e.epoch), revoked.then_some(local), "{name}");
        let d = r.get_device(&pk, "dev1").unwrap();
        assert_eq!(
            (d.enabled, d.device_secret, d.instance_id, d.tags),
            (
                want.enabled,
                want.device_secret,
                want.instance_id,
                want.tags
            ),
            "{name}"
        );
    }
}

#[tokio::test]
async fn refresh_creates_deletes_and_replaces_a_recreated_device() {
    let (r, pk) = node1().await;
    let local = r.epochs().next();
    r.device_connected(&pk, "dev1", local, IP, 10);
    // Created elsewhere, held by node 2.
    let mut dev2 = stored(&pk, "dev1", &r);
    dev2.record.device_name = "dev2".into();
    dev2.session = Some(epoch(2, 50));
    assert_eq!(r.refresh_device(&pk, "dev2", Some(dev2)).await, None);
    assert!(r.get_device(&pk, "dev2").unwrap().online);
    assert_eq!(r.online_count(), 2);
    // Deleted elsewhere while connected here: gone, and the local session is returned.
    let ended = r.refresh_device(&pk, "dev1", None).await;
    assert_eq!(ended.map(|e| e.epoch), Some(local));
    assert!(r.get_device(&pk, "dev1").is_err());
    assert_eq!(r.online_count(), 1);
    // Deleted and created again elsewhere (another creation time): replaced whole.
    let mut again = stored(&pk, "dev2", &r);
    again.record.created_at_ms += 1;
    again.session = None;
    again.versions.clear();
    r.refresh_device(&pk, "dev2", Some(again)).await;
    assert!(!r.get_device(&pk, "dev2").unwrap().online);
    assert_eq!(r.online_count(), 0);
    assert_eq!(
        r.list_devices(&pk, &DeviceFilter::default(), Page::default())
            .unwrap()
            .total,
        1
    );
}

#[tokio::test]
async fn resync_makes_memory_equal_to_the_store() {
    let (r, pk) = node1().await;
    let local = r.epochs().next();
    r.device_connected(&pk, "dev1", local, IP, 10);
    let dev1 = stored(&pk, "dev1", &r);
    let product = r.get_product(&pk).unwrap();
    let mut dev9 = dev1.clone();
    dev9.record.device_name = "dev9".into();
    dev9.versions = BTreeMap::from([("MCU".into(), "3.1".into())]);
    dev9.session = Some(epoch(2, 70));
    // The store has a newer session of dev1 (node 2), dev9 which this node never heard of,
    // a second product, and no longer the product "Other" this node still has.
    let mut newer_dev1 = dev1.clone();
    newer_dev1.session = Some((local + (1 << 21)) & !0x1ff | 2);
    r.create_product(NewProduct {
        name: "Other".into(),
        product_key: Some("other0001".into()),
        instance_id: None,
        description: None,
    })
    .await
    .unwrap();
    let snapshot = Snapshot {
        instances: r
            .list_instances()
            .into_iter()
            .map(|i| InstanceRecord {
                instance_id: i.instance_id,
                name: i.name,
                created_at_ms: i.created_at_ms,
            })
            .collect(),
        products: vec![
            product_record(&product),
            ProductRecord {
                product_key: "fresh0001".into(),
                product_secret: "s".into(),
                name: "Fresh".into(),
                instance_id: DEFAULT_INSTANCE_ID.into(),
                description: None,
                created_at_ms: 5,
            },
        ],
        devices: vec![newer_dev1, dev9],
        feed_cuts: BTreeMap::new(),
    };
    // An instance the store no longer has (deleted through another node).
    r.create_instance(NewInstance {
        instance_id: Some("iot-gone".into()),
        name: "Gone".into(),
    })
    .await
    .unwrap();
    let ended = r.resync(snapshot).await.ended;
    assert!(r.get_instance("iot-gone").is_err());
    assert!(r.get_instance(DEFAULT_INSTANCE_ID).is_ok());
    assert_eq!(
        ended.iter().map(|e| e.epoch).collect::<Vec<_>>(),
        vec![local]
    );
    assert!(r.get_product("other0001").is_err());
    assert!(r.get_product("fresh0001").is_ok());
    let d9 = r.get_device(&pk, "dev9").unwrap();
    assert!(d9.online);
    assert_eq!(d9.versions.get("MCU").map(String::as_str), Some("3.1"));
    assert_eq!(r.online_count(), 2);
    let names: Vec<String> = r
        .list_products(Page::default())
        .items
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, vec!["Fresh", "Lamp"]);
}

/// A version report another node committed whose feed message never arrived (the node died
/// between COMMIT and publishing) is taken from the store at the resync; this node's own
/// device keeps the version it reported, which the store may not have yet.
#[tokio::test]
async fn resync_takes_the_versions_of_devices_another_node_held_and_keeps_its_own() {
    let (r, pk) = node1().await;
    r.create_device(
        &pk,
        NewDevice {
            device_name: "dev2".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // dev1 is held by node 2; dev2 by this node, which has just taken its report of 2.0.
    let remote = epoch(2, 70);
    assert!(r.apply_session(&pk, "dev1", &online(remote)).is_none());
    let local = r.epochs().next();
    r.device_connected(&pk, "dev2", local, IP, 10);
    r.apply_version(&pk, "dev2", "MCU", "2.0");
    let product = r.get_product(&pk).unwrap();
    let mut dev1 = stored(&pk, "dev1", &r);
    dev1.session = Some(remote);
    dev1.epoch_seen = remote;
    dev1.versions = BTreeMap::from([("MCU".into(), "4.2".into())]);
    let mut dev2 = stored(&pk, "dev2", &r);
    dev2.session = Some(local);
    dev2.epoch_seen = local;
    dev2.versions = BTreeMap::from([("MCU".into(), "1.0".into())]);
    let snapshot = Snapshot {
        instances: r
            .list_instances()
            .into_iter()
            .map(|i| InstanceRecord {
                instance_id: i.instance_id,
                name: i.name,
                created_at_ms: i.created_at_ms,
            })
            .collect(),
        products: vec![product_record(&product)],
        devices: vec![dev1, dev2],
        feed_cuts: BTreeMap::new(),
    };
    let taken = r.resync(snapshot).await.versions;
    let version = |dn: &str| r.get_device(&pk, dn).unwrap().versions.get("MCU").cloned();
    // The engines' holder is told of dev1's version (and of nothing of dev2's).
    assert_eq!(
        taken,
        vec![VersionTaken {
            product_key: pk.clone(),
            device_name: "dev1".into(),
            module: "MCU".into(),
            version: "4.2".into(),
        }]
    );
    assert_eq!(version("dev1").as_deref(), Some("4.2"));
    assert_eq!(version("dev2").as_deref(), Some("2.0"));
}

#[tokio::test]
async fn an_instance_deleted_elsewhere_is_forgotten() {
    let (r, _) = node1().await;
    r.create_instance(NewInstance {
        instance_id: Some("iot-east".into()),
        name: "East".into(),
    })
    .await
    .unwrap();
    r.forget_instance("iot-east");
    assert!(r.get_instance("iot-east").is_err());
    // Twice, or an instance never heard of: nothing happens.
    r.forget_instance("iot-east");
    r.forget_instance("iot-none");
    assert_eq!(r.list_instances().len(), 1);
}

/// Records what observers are told.
#[derive(Default)]
struct Heard(std::sync::Mutex<Vec<DeviceChange>>);

impl Heard {
    fn on(r: &Registry) -> Arc<Heard> {
        let heard = Arc::new(Heard::default());
        r.add_observer(heard.clone());
        heard
    }

    fn take(&self) -> Vec<DeviceChange> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl DeviceObserver for Heard {
    fn device_changed<'a>(&'a self, change: &'a DeviceChange) -> ObserverFuture<'a> {
        self.0.lock().unwrap().push(change.clone());
        Box::pin(async {})
    }
}

/// An import's overwrite of a device is told as an update is: a disabling, then new tags
/// (DYNAMIC OTA jobs targeting tags follow them); the same tags again tell nothing.
#[tokio::test]
async fn an_overwrite_tells_a_disabling_and_new_tags() {
    let (r, pk) = node1().await;
    let heard = Heard::on(&r);
    let tags = BTreeMap::from([("room".to_owned(), "hall".to_owned())]);
    r.overwrite_device(&pk, "dev1", None, false, tags.clone())
        .await
        .unwrap();
    let tagged = DeviceChange::TagsChanged {
        product_key: pk.clone(),
        device_name: "dev1".into(),
    };
    assert_eq!(heard.take(), vec![disabled(&pk, "dev1"), tagged.clone()]);
    r.overwrite_device(&pk, "dev1", None, false, tags)
        .await
        .unwrap();
    assert_eq!(heard.take(), vec![]);
    r.overwrite_device(&pk, "dev1", None, true, BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(heard.take(), vec![tagged]);
}

fn disabled(pk: &str, dn: &str) -> DeviceChange {
    DeviceChange::Disabled {
        product_key: pk.into(),
        device_name: dn.into(),
    }
}

fn deleted(pk: &str, dn: &str) -> DeviceChange {
    DeviceChange::Deleted {
        product_key: pk.into(),
        device_name: dn.into(),
        instance_id: DEFAULT_INSTANCE_ID.into(),
        elsewhere: true,
    }
}

fn created(pk: &str, dn: &str) -> DeviceChange {
    DeviceChange::Created {
        product_key: pk.into(),
        device_names: vec![dn.into()],
    }
}

/// Observers hear of a device another node disabled as of a local disabling (the offline
/// queue's reaper drops what was kept for it): once, when it goes from enabled to disabled,
/// before new tags, from the change feed and from a resync alike.
#[tokio::test]
async fn a_device_disabled_elsewhere_is_told_as_a_local_disabling() {
    // The local change, for comparison.
    let (r, pk) = node1().await;
    let heard = Heard::on(&r);
    r.update_device(
        &pk,
        "dev1",
        DeviceUpdate {
            enabled: Some(false),
            tags: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(heard.take(), vec![disabled(&pk, "dev1")]);

    // From the feed.
    let (r, pk) = node1().await;
    let heard = Heard::on(&r);
    let mut s = stored(&pk, "dev1", &r);
    s.record.enabled = false;
    s.record.tags.insert("floor".into(), "2".into());
    r.refresh_device(&pk, "dev1", Some(s.clone())).await;
    let tagged = DeviceChange::TagsChanged {
        product_key: pk.clone(),
        device_name: "dev1".into(),
    };
    assert_eq!(heard.take(), vec![disabled(&pk, "dev1"), tagged]);
    // Told again (a replay, or a later read) or enabled again: no disabling.
    r.refresh_device(&pk, "dev1", Some(s.clone())).await;
    assert_eq!(heard.take(), vec![]);
    s.record.enabled = true;
    r.refresh_device(&pk, "dev1", Some(s)).await;
    assert_eq!(heard.take(), vec![]);

    // From a resync.
    let (r, pk) = node1().await;
    let heard = Heard::on(&r);
    let mut s = stored(&pk, "dev1", &r);
    s.record.enabled = false;
    let snapshot = Snapshot {
        instances: vec![instance_record(
            &r.get_instance(DEFAULT_INSTANCE_ID).unwrap(),
        )],
        products: vec![product_record(&r.get_product(&pk).unwrap())],
        devices: vec![s],
        feed_cuts: BTreeMap::new(),
    };
    r.resync(snapshot).await;
    assert_eq!(heard.take(), vec![disabled(&pk, "dev1")]);
    assert!(!r.get_device(&pk, "dev1").unwrap().enabled);
}

/// A deletion applied from elsewhere is told as a local one (with the instance that owned the
/// device, marked as made elsewhere), also when it is only seen as a device created again
/// under the name, or as its product gone or created again: the old device's observers'
/// records and its session go.
#[tokio::test]
async fn deletions_elsewhere_are_told_as_local_ones() {
    // The local delete, for comparison.
    let (r, pk) = node1().await;
    let heard = Heard::on(&r);
    r.delete_device(&pk, "dev1").await.unwrap();
    let mut local = deleted(&pk, "dev1");
    if let DeviceChange::Deleted { elsewhere, .. } = &mut local {
        *elsewhere = false;
    }
    assert_eq!(heard.take(), vec![local]);

    // From the feed.
    let (r, pk) = node1().await;
    let heard = Heard::on(&r);
    r.refresh_device(&pk, "dev1", None).await;
    assert_eq!(heard.take(), vec![deleted(&pk, "dev1")]);

    // Deleted and created again elsewhere (another creation), seen as one refresh.
    let (r, pk) = node1().await;
    let heard = Heard::on(&r);
    let mut again = stored(&pk, "dev1", &r);
    again.record.created_at_ms += 1;
    r.refresh_device(&pk, "dev1", Some(again)).await;
    assert_eq!(
        heard.take(),
        vec![deleted(&pk, "dev1"), created(&pk, "dev1")]
    );

    // Its product deleted and created again elsewhere (the device's own deletion missed, or
    // in the same feed message after the product's): the device goes with the old product,
    // and a session of it here is returned to end.
    let (r, pk) = node1().await;
    let local = r.epochs().next();
    r.device_connected(&pk, "dev1", local, IP, 10);
    let heard = Heard::on(&r);
    let mut product = product_record(&r.get_product(&pk).unwrap());
    product.created_at_ms += 1;
    let ended = r.refresh_product(&pk, Some(product.clone())).await;
    assert_eq!(ended.iter().map(|e| e.epoch).collect::<Vec<_>>(), [local]);
    assert_eq!(heard.take(), vec![deleted(&pk, "dev1")]);
    assert!(r.get_device(&pk, "dev1").is_err());
    assert_eq!(r.online_count(), 0);

    // The same through a resync, and a product the store no longer has.
    for gone in [true, false] {
        let (r, pk) = node1().await;
        let heard = Heard::on(&r);
        let mut product = product_record(&r.get_product(&pk).unwrap());
        product.created_at_ms += 1;
        let snapshot = Snapshot {
            instances: vec![instance_record(
                &r.get_instance(DEFAULT_INSTANCE_ID).unwrap(),
            )],
            products: if gone { vec![] } else { vec![product] },
            devices: vec![],
            feed_cuts: BTreeMap::new(),
        };
        r.resync(snapshot).await;
        assert_eq!(heard.take(), vec![deleted(&pk, "dev1")], "gone: {gone}");
    }
}
