//! Simulated devices against a stock rumqttd and an in-test firmware server; the test plays the
//! gateway: it watches inform/progress topics and pushes `UpgradeMessage`s.

mod common;

use common::{FirmwareServer, Gateway, Seen};
use firmware_sim::faults::{FaultKind, FaultRule, FaultTarget};
use firmware_sim::scenario::EventSpec;
use firmware_sim::{
    DeviceSpec, DeviceState, Fleet, FleetConfig, FleetError, FleetHandle, UpgradeResult,
};
use fleetgate_topics::{
    FirmwareGetReply, FirmwareGetRequest, FirmwareSignMethod, PayloadError, ProgressStep,
    PropertyPostRequest, Reply, TopicKind,
};
use std::collections::HashMap;
use std::time::Duration;

const PK: &str = "a1SimTest";
const FW_LEN: usize = 256 * 1024;

fn config(broker: &str, names: &[&str]) -> FleetConfig {
    let devices = names
        .iter()
        .map(|n| DeviceSpec::new(PK, n, &format!("secret-{n}")))
        .collect();
    let mut c = FleetConfig::new(devices, broker);
    c.seed = 7;
    c.mqtt.start_jitter_secs = 0.0;
    c.mqtt.connect_rate = 1000;
    c.mqtt.sign_method = firmware_sim::SignChoice::Mixed;
    c.mqtt.reconnect_backoff_secs = [0.2, 1.0];
    c.ota.verify_secs = 0.01;
    c.ota.write_secs = 0.05;
    c.ota.reboot_secs = 0.1;
    c.telemetry.interval_secs = 0.0;
    c
}

fn pairs(names: &[&str]) -> Vec<(String, String)> {
    names
        .iter()
        .map(|n| (PK.to_owned(), n.to_string()))
        .collect()
}

fn steps(log: &[(String, String, Seen)], dn: &str) -> Vec<i32> {
    log.iter()
        .filter(|(_, d, _)| d == dn)
        .filter_map(|(_, _, s)| match s {
            Seen::Progress(p) => Some(p.params.step.code()),
            _ => None,
        })
        .collect()
}

fn informed(log: &[(String, String, Seen)], dn: &str, version: &str) -> bool {
    log.iter()
        .any(|(_, d, s)| d == dn && matches!(s, Seen::Inform(i) if i.params.version == version))
}

fn last_result(h: &FleetHandle, dn: &str) -> UpgradeResult {
    h.device(dn)
        .and_then(|o| o.upgrades.last().map(|u| u.result.clone()))
        .unwrap_or(UpgradeResult::InProgress)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_maps_to_its_progress_code() {
    let broker = common::start_broker().await;
    let fw = FirmwareServer::start(common::firmware(FW_LEN)).await;
    let names = [
        "ok",
        "fail-update",
        "fail-download",
        "fail-verify",
        "fail-write",
        "corrupt",
        "resume",
        "rogue",
        "hang",
        "chatty",
        "offline",
        "garbled",
    ];
    let mut gw = Gateway::start(
        &broker,
        &pairs(&names),
        &[TopicKind::Inform, TopicKind::Progress],
    )
    .await;

    let mut c = config(&broker, &names);
    let only = |k: FaultKind, dn: &str| FaultRule::new(k, 1.0).for_devices(dn);
    let mut offline = only(FaultKind::Offline, "offline").at(30, 30);
    offline.offline_secs = 0.3;
    c.faults = vec![
        only(FaultKind::UpdateFailed, "fail-update"),
        only(FaultKind::DownloadFailed, "fail-download"),
        only(FaultKind::VerifyFailed, "fail-verify"),
        only(FaultKind::WriteFailed, "fail-write"),
        only(FaultKind::InterruptDownload, "resume").at(50, 50),
        only(FaultKind::WrongVersion, "rogue"),
        only(FaultKind::Hang, "hang").at(40, 40),
        only(FaultKind::DuplicateProgress, "chatty"),
        only(FaultKind::OutOfOrderProgress, "chatty"),
        offline,
        only(FaultKind::MalformedJson, "garbled").at(20, 20),
    ];
    let handle = Fleet::start(c).await.unwrap();

    // Every device reports its version once connected (and subscribed before that).
    let mut log = Vec::new();
    gw.collect_until(&mut log, Duration::from_secs(30), |log| {
        names.iter().all(|n| informed(log, n, "1.0.0"))
    })
    .await;
    assert_eq!(handle.snapshot().online, names.len() as i64);

    for (i, n) in names.iter().enumerate() {
        let (file, method) = match *n {
            "corrupt" => ("corrupt", FirmwareSignMethod::Sha256),
            "ok" => ("good", FirmwareSignMethod::Md5),
            _ => ("good", FirmwareSignMethod::Sha256),
        };
        gw.push(PK, n, 100 + i as u64, fw.upgrade(file, "2.0.0", method))
            .await;
    }

    let all_done = handle
        .wait_for(Duration::from_secs(60), |h| {
            names
                .iter()
                .all(|n| last_result(h, n) != UpgradeResult::InProgress)
        })
        .await;
    assert!(all_done, "{:#?}", handle.outcomes());
    gw.collect_until(&mut log, Duration::from_secs(10), |log| {
        ["ok", "resume", "chatty", "offline", "garbled"]
            .iter()
            .all(|n| informed(log, n, "2.0.0"))
            && informed(log, "rogue", "2.0.0-rogue")
            && [
                ("fail-update", -1),
                ("fail-download", -2),
                ("fail-verify", -3),
                ("fail-write", -4),
                ("corrupt", -3),
            ]
            .iter()
            .all(|(n, code)| steps(log, n).contains(code))
    })
    .await;

    // Failures: the last step is the code, the outcome says the same.
    for (n, code) in [
        ("fail-update", -1),
        ("fail-download", -2),
        ("fail-verify", -3),
        ("fail-write", -4),
        ("corrupt", -3),
    ] {
        let s = steps(&log, n);
        assert_eq!(s.last(), Some(&code), "{n}: {s:?}");
        assert!(s.iter().filter(|&&x| x < 0).count() == 1, "{n}: {s:?}");
        match last_result(&handle, n) {
            UpgradeResult::Failed { code: c, .. } => assert_eq!(c, code, "{n}"),
            other => panic!("{n}: {other:?}"),
        }
        assert!(
            !informed(&log, n, "2.0.0"),
            "{n} must not report the target"
        );
        assert_eq!(handle.device(n).unwrap().versions["default"], "1.0.0");
    }
    // The corrupted download fails verification for real (no fault was drawn for it).
    let corrupt = handle.device("corrupt").unwrap();
    assert!(corrupt.upgrades[0].faults.is_empty());
    match &corrupt.upgrades[0].result {
        UpgradeResult::Failed { reason, .. } => {
            assert!(reason.contains("verification failed"), "{reason}")
        }
        other => panic!("{other:?}"),
    }

    // Success: steps rise to 100, the device reboots (a second CONNECT) and reports 2.0.0.
    let ok = handle.device("ok").unwrap();
    assert_eq!(ok.upgrades[0].result, UpgradeResult::Succeeded);
    assert_eq!(ok.versions["default"], "2.0.0");
    assert!(ok.connects >= 2, "{ok:?}");
    let s = steps(&log, "ok");
    assert!(s.windows(2).all(|w| w[0] < w[1]), "{s:?}");
    assert_eq!((s.first(), s.last()), (Some(&1), Some(&100)));
    let pos_100 = log
        .iter()
        .position(|(_, d, s)| {
            d == "ok"
                && matches!(s, Seen::Progress(p) if p.params.step == ProgressStep::Percent(100))
        })
        .unwrap();
    let pos_inform = log
        .iter()
        .position(|(_, d, s)| {
            d == "ok" && matches!(s, Seen::Inform(i) if i.params.version == "2.0.0")
        })
        .unwrap();
    assert!(
        pos_100 < pos_inform,
        "the new version comes after the reboot"
    );

    // Range resume after the injected interruption at exactly 50 %.
    let resume = handle.device("resume").unwrap();
    assert_eq!(resume.upgrades[0].result, UpgradeResult::Succeeded);
    assert!(resume.upgrades[0].range_resumes >= 1);
    let reqs = fw.requests();
    let half = format!("bytes={}-", FW_LEN / 2);
    assert!(
        reqs.iter()
            .any(|(p, r)| p == "good" && r.as_deref() == Some(half.as_str())),
        "{reqs:?}"
    );

    // Offline mid-update: gone, back (another CONNECT), resumed with Range, succeeded.
    let off = handle.device("offline").unwrap();
    assert_eq!(off.upgrades[0].result, UpgradeResult::Succeeded, "{off:?}");
    assert!(off.connects >= 3, "{off:?}");
    let at30 = format!("bytes={}-", FW_LEN * 30 / 100);
    assert!(
        reqs.iter()
            .any(|(_, r)| r.as_deref() == Some(at30.as_str())),
        "{reqs:?}"
    );

    // Wrong version.
    assert_eq!(
        last_result(&handle, "rogue"),
        UpgradeResult::WrongVersion {
            reported: "2.0.0-rogue".into()
        }
    );

    // Hang: progress stopped below 40 % of the download, no failure, no version.
    assert_eq!(last_result(&handle, "hang"), UpgradeResult::Hung);
    let s = steps(&log, "hang");
    assert!(
        !s.is_empty() && s.iter().all(|&x| (1..=36).contains(&x)),
        "{s:?}"
    );
    assert!(!informed(&log, "hang", "2.0.0"));

    // Duplicates and out-of-order progress, yet success.
    let s = steps(&log, "chatty");
    assert!(s.windows(2).any(|w| w[0] == w[1]), "duplicates: {s:?}");
    assert!(s.windows(2).any(|w| w[0] > w[1]), "out of order: {s:?}");
    assert_eq!(last_result(&handle, "chatty"), UpgradeResult::Succeeded);

    // Malformed JSON on the progress topic, yet success.
    assert!(log
        .iter()
        .any(|(_, d, s)| d == "garbled" && matches!(s, Seen::Malformed(TopicKind::Progress, _))));
    assert_eq!(last_result(&handle, "garbled"), UpgradeResult::Succeeded);

    let summary = handle.stop().await;
    let o = &summary.ota;
    assert_eq!(o.succeeded, 5);
    assert_eq!(o.failed.values().copied().collect::<Vec<_>>(), [1, 1, 2, 1]);
    assert_eq!((o.hung, o.wrong_version), (1, 1));
    assert!(o.range_resumes >= 2);
    assert_eq!(summary.devices.len(), names.len());
    assert!(summary
        .devices
        .iter()
        .all(|d| d.state == DeviceState::Stopped));
    let json = serde_json::to_value(&summary).unwrap();
    assert_eq!(json["ota"]["failed"]["-3"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_mode_takes_the_pending_upgrade() {
    let broker = common::start_broker().await;
    let fw = FirmwareServer::start(common::firmware(64 * 1024)).await;
    let names = ["puller", "idle"];
    let mut gw = Gateway::start(
        &broker,
        &pairs(&names),
        &[TopicKind::FirmwareGet, TopicKind::Inform],
    )
    .await;
    let mut c = config(&broker, &names);
    c.ota.pull_on_connect = true;
    let handle = Fleet::start(c).await.unwrap();

    let data = fw.upgrade("good", "3.1.0", FirmwareSignMethod::Md5);
    let mut puller_done = false;
    let mut gets: HashMap<String, u32> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(puller_done && gets.get("idle").is_some_and(|&n| n >= 1)) {
        let (_, dn, seen) = tokio::time::timeout_at(deadline, gw.rx.recv())
            .await
            .expect("timed out waiting for firmware/get")
            .unwrap();
        match seen {
            Seen::Other(TopicKind::FirmwareGet, payload) => {
                let req = FirmwareGetRequest::parse(&payload).unwrap();
                assert_eq!(req.module(), "default");
                *gets.entry(dn.clone()).or_default() += 1;
                let reply = if dn == "puller" && !puller_done {
                    FirmwareGetReply::Upgrade {
                        id: req.id.to_string(),
                        data: data.clone(),
                    }
                } else {
                    FirmwareGetReply::NoUpgrade {
                        id: req.id.to_string(),
                    }
                };
                gw.send(TopicKind::FirmwareGetReply, PK, &dn, None, reply.to_vec())
                    .await;
            }
            Seen::Inform(i) if dn == "puller" && i.params.version == "3.1.0" => puller_done = true,
            _ => {}
        }
    }
    // After the reboot the device asks again (pull on every connect) and hears "none".
    let ok = handle
        .wait_for(Duration::from_secs(10), |h| {
            h.device("puller").unwrap().connects >= 2
        })
        .await;
    assert!(ok);
    let puller = handle.device("puller").unwrap();
    assert_eq!(puller.upgrades.len(), 1);
    assert_eq!(puller.upgrades[0].via, "pull");
    assert_eq!(puller.upgrades[0].result, UpgradeResult::Succeeded);
    assert_eq!(puller.versions["default"], "3.1.0");
    assert!(handle.device("idle").unwrap().upgrades.is_empty());
    let summary = handle.stop().await;
    assert_eq!(summary.ota.get_replies_upgrade, 1);
    assert!(summary.ota.get_replies_none >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_replies_are_counted_by_code_and_missing_ones_noticed() {
    let broker = common::start_broker().await;
    let names = ["acked", "rejected", "ignored", "garbled"];
    let mut gw = Gateway::start(
        &broker,
        &pairs(&names),
        &[TopicKind::PropertyPost, TopicKind::EventPost],
    )
    .await;
    let mut c = config(&broker, &names);
    c.telemetry.interval_secs = 0.1;
    c.telemetry.reply_timeout_secs = 0.5;
    c.telemetry.events = vec![EventSpec {
        identifier: "overheat".into(),
        probability: 1.0,
        value: serde_json::json!({"Level": 2}).as_object().unwrap().clone(),
    }];
    let mut malformed = FaultRule::new(FaultKind::MalformedJson, 1.0).for_devices("garbled");
    malformed.on = FaultTarget::Telemetry;
    c.faults = vec![malformed];
    let handle = Fleet::start(c).await.unwrap();

    let done = |h: &FleetHandle| {
        let d = |n: &str| h.device(n).unwrap();
        d("acked").replies_ok >= 5
            && d("rejected").replies_error >= 5
            && d("ignored").replies_missing >= 3
            && d("garbled").property_posts >= 3
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut temps = Vec::new();
    while !done(&handle) {
        let Ok(Some((_, dn, seen))) =
            tokio::time::timeout(Duration::from_millis(200), gw.rx.recv()).await
        else {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:#?}",
                handle.outcomes()
            );
            continue;
        };
        let Seen::Other(kind, payload) = seen else {
            continue;
        };
        let reply_kind = if kind == TopicKind::PropertyPost {
            TopicKind::PropertyPostReply
        } else {
            TopicKind::EventPostReply
        };
        let ident = (kind == TopicKind::EventPost).then_some("overheat");
        let reply = if kind == TopicKind::EventPost {
            let ev = fleetgate_topics::EventPostRequest::parse(&payload).unwrap();
            ev.check_identifier("overheat").unwrap();
            Some(ev.id.to_string())
        } else {
            match PropertyPostRequest::parse(&payload) {
                Ok(post) => {
                    if let Some(t) = post.params.get("Temperature") {
                        temps.push(t.value().as_f64().unwrap());
                    }
                    Some(post.id.to_string())
                }
                Err(PayloadError::MalformedJson(_)) => {
                    assert_eq!(dn, "garbled", "only the faulty device sends malformed JSON");
                    gw.send(
                        reply_kind,
                        PK,
                        &dn,
                        ident,
                        Reply::error("", 400, "malformed JSON").to_vec(),
                    )
                    .await;
                    None
                }
                Err(e) => panic!("{dn}: {e}"),
            }
        };
        let Some(id) = reply else { continue };
        let r = match dn.as_str() {
            "acked" | "garbled" => Reply::success(id),
            "rejected" => Reply::error(id, 6300, "Temperature: out of range"),
            _ => continue,
        };
        gw.send(reply_kind, PK, &dn, ident, r.to_vec()).await;
    }
    // Realistic values: a random walk within its bounds, not a constant.
    assert!(temps.iter().all(|t| (-20.0..=60.0).contains(t)));
    assert!(temps.windows(2).any(|w| w[0] != w[1]), "{temps:?}");

    let summary = handle.stop().await;
    let t = &summary.telemetry;
    assert!(t.replies_by_code["200"] >= 5);
    assert!(t.replies_by_code["6300"] >= 5);
    assert!(t.replies_by_code["400"] >= 1);
    assert!(t.event_posts >= 4);
    assert!(t.malformed_sent >= 3);
    let by_name: HashMap<_, _> = summary
        .devices
        .iter()
        .map(|d| (d.device_name.as_str(), d))
        .collect();
    assert_eq!(by_name["acked"].replies_missing, 0);
    assert_eq!(
        by_name["ignored"].replies_ok + by_name["ignored"].replies_error,
        0
    );
    assert!(t.replies_missing >= 3);
}

#[tokio::test]
async fn unreachable_broker_is_a_clear_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let c = config(&format!("127.0.0.1:{port}"), &["x"]);
    match Fleet::start(c).await {
        Err(e @ FleetError::BrokerUnreachable { .. }) => {
            assert!(e.to_string().contains("cannot reach the MQTT broker"))
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("started without a broker"),
    }
    let mut bad = config("127.0.0.1:1", &["x"]);
    bad.devices.push(DeviceSpec::new(PK, "x", "s"));
    assert!(matches!(
        Fleet::start(bad).await,
        Err(FleetError::BadDevice(..))
    ));
}
