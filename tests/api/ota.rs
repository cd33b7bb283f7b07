//! OTA campaigns end to end: rumqttc devices against the in-process gateway, an operator over
//! HTTP. Every wait is a poll with a generous upper bound (`WAIT`); nothing asserts on
//! wall-clock durations. Timeouts use the smallest real values the API allows (1 s).

use crate::helpers::*;
use fleetgate::ota::firmware::NewFirmware;
use fleetgate::ota::FirmwareStatus;
use fleetgate_topics::{FirmwareGetReply, UpgradeMessage};
use rumqttc::{Packet, QoS};
use serde_json::{json, Value};
use std::time::Duration;

/// A device that subscribed to its upgrade and firmware-get reply topics.
struct OtaDevice {
    dev: Device,
    pk: String,
    dn: String,
    next_id: u64,
}

impl OtaDevice {
    async fn connect(t: &TestApp, pk: &str, dn: &str, secret: &str) -> OtaDevice {
        let mut dev = connect(t.mqtt_addr(), &credentials(pk, dn, secret)).await;
        for topic in [
            format!("/ota/device/upgrade/{pk}/{dn}"),
            format!("/sys/{pk}/{dn}/thing/ota/firmware/get_reply"),
        ] {
            dev.client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
            dev.wait_packet("SUBACK", |p| matches!(p, Packet::SubAck(_)))
                .await;
        }
        OtaDevice {
            dev,
            pk: pk.into(),
            dn: dn.into(),
            next_id: 1,
        }
    }

    fn id(&mut self) -> String {
        self.next_id += 1;
        self.next_id.to_string()
    }

    async fn publish(&mut self, topic: String, body: Value) {
        self.dev
            .client
            .publish(topic, QoS::AtLeastOnce, false, body.to_string())
            .await
            .unwrap();
        // The PUBACK comes after the gateway processed (and stored) the message.
        self.dev
            .wait_packet("PUBACK", |p| matches!(p, Packet::PubAck(_)))
            .await;
    }

    async fn inform(&mut self, version: &str) {
        let id = self.id();
        let topic = format!("/ota/device/inform/{}/{}", self.pk, self.dn);
        self.publish(topic, json!({"id": id, "params": {"version": version}}))
            .await;
    }

    async fn progress(&mut self, step: i32) {
        let id = self.id();
        let topic = format!("/ota/device/progress/{}/{}", self.pk, self.dn);
        self.publish(
            topic,
            json!({"id": id, "params": {"step": step.to_string(), "desc": "test"}}),
        )
        .await;
    }

    /// The next upgrade push (vendor shape checked).
    async fn upgrade(&mut self) -> UpgradeMessage {
        let p = self.dev.next_publish().await;
        assert_eq!(
            p.topic,
            format!("/ota/device/upgrade/{}/{}", self.pk, self.dn)
        );
        UpgradeMessage::parse(&p.payload).expect("an upgrade push in the vendor's shape")
    }

    /// No publish arrives within `d` (only used to show something does NOT happen; a late
    /// arrival would fail a later step too).
    async fn quiet_for(&mut self, d: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.dev.incoming.recv()).await {
                Ok(Some(Packet::Publish(_))) => return false,
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return true,
            }
        }
    }
}

struct Fleet {
    pk: String,
    secrets: Vec<(String, String)>,
    fid: String,
}

/// A product with `n` devices (`ota-dev-N`) and a firmware package `2.0.0`.
async fn fleet(t: &TestApp, n: usize, verified: bool) -> Fleet {
    let pk = t.create_product("ota product").await;
    let mut secrets = Vec::new();
    for i in 0..n {
        let dn = format!("ota-dev-{i}");
        let secret = t.create_device(&pk, &dn).await;
        secrets.push((dn, secret));
    }
    let fid = firmware(t, &pk, "2.0.0", verified).await;
    Fleet { pk, secrets, fid }
}

async fn firmware(t: &TestApp, pk: &str, version: &str, verified: bool) -> String {
    let repo = t.app().firmware().clone();
    let p = repo
        .create_from_bytes(
            NewFirmware::new(pk, version),
            format!("image {version}").as_bytes(),
        )
        .await
        .unwrap();
    if verified {
        repo.set_status(&p.firmware_id, FirmwareStatus::Verified)
            .await
            .unwrap();
    }
    p.firmware_id
}

impl Fleet {
    async fn device(&self, t: &TestApp, i: usize) -> OtaDevice {
        let (dn, secret) = &self.secrets[i];
        let mut d = OtaDevice::connect(t, &self.pk, dn, secret).await;
        d.inform("1.0.0").await;
        d
    }

    fn dn(&self, i: usize) -> &str {
        &self.secrets[i].0
    }
}

async fn create_job(t: &TestApp, body: Value) -> String {
    let (status, job) = t.post("/api/v1/ota/jobs", body).await;
    assert_eq!(status, 201, "{job}");
    job["job_id"].as_str().unwrap().to_owned()
}

async fn task(t: &TestApp, jid: &str, dn: &str) -> Value {
    let (status, body) = t.get(&format!("/api/v1/ota/jobs/{jid}/tasks/{dn}")).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn wait_task(
    t: &TestApp,
    jid: &str,
    dn: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = task(t, jid, dn).await;
        if pred(&v) {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("task {jid}/{dn} never got {what}: {v}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_job(t: &TestApp, jid: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, v) = t.get(&format!("/api/v1/ota/jobs/{jid}")).await;
        if pred(&v) {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("job {jid} never got {what}: {v}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_device_is_updated_and_every_read_api_shows_it() {
    let t = spawn_app().await;
    let f = fleet(&t, 1, true).await;
    let mut d = f.device(&t, 0).await;
    let mut events = t.app().ota().subscribe_events();
    let jid = create_job(
        &t,
        json!({"firmware_id": f.fid, "target": "ALL", "timeout_seconds": 600}),
    )
    .await;

    let push = d.upgrade().await;
    assert_eq!(push.code, "1000");
    assert_eq!(push.message, "success");
    assert_eq!(push.data.version, "2.0.0");
    assert_eq!(push.data.module, "default");
    // The pushed URL downloads the package (no bearer token).
    let body = reqwest::get(&push.data.url)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&body[..], b"image 2.0.0");
    wait_task(&t, &jid, f.dn(0), "NOTIFIED", |v| v["status"] == "NOTIFIED").await;

    d.progress(50).await;
    let v = task(&t, &jid, f.dn(0)).await;
    assert_eq!(v["status"], "IN_PROGRESS");
    assert_eq!(v["progress"], 50);
    d.progress(100).await;
    assert_eq!(
        task(&t, &jid, f.dn(0)).await["status"],
        "IN_PROGRESS",
        "100% is not success"
    );
    d.inform("2.0.0").await;
    let v = task(&t, &jid, f.dn(0)).await;
    assert_eq!(v["status"], "SUCCEEDED");
    let job = wait_job(&t, &jid, "COMPLETED", |j| j["status"] == "COMPLETED").await;
    assert_eq!(job["counters"]["succeeded"], 1);
    assert_eq!(job["counters"]["total"], 1);

    let (_, tasks) = t
        .get(&format!("/api/v1/ota/jobs/{jid}/tasks?status=SUCCEEDED"))
        .await;
    assert_eq!(tasks["total"], 1);
    let (_, tasks) = t
        .get(&format!("/api/v1/ota/jobs/{jid}/tasks?status=FAILED"))
        .await;
    assert_eq!(tasks["total"], 0);
    let (s, bad) = t
        .get(&format!("/api/v1/ota/jobs/{jid}/tasks?status=DONE"))
        .await;
    assert_eq!((s, bad["error_ext_msg"].as_str()), (400, Some("status")));
    let (_, by_fw) = t.get(&format!("/api/v1/firmware/{}/jobs", f.fid)).await;
    assert_eq!(by_fw["items"][0]["job_id"], jid);
    let (_, by_dev) = t
        .get(&format!(
            "/api/v1/products/{}/devices/{}/ota/jobs",
            f.pk,
            f.dn(0)
        ))
        .await;
    assert_eq!(by_dev["items"][0]["task"]["status"], "SUCCEEDED");
    let (_, timeline) = t
        .get(&format!(
            "/api/v1/products/{}/devices/{}/ota/timeline",
            f.pk,
            f.dn(0)
        ))
        .await;
    let events_seen: Vec<&str> = timeline
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events_seen,
        vec!["created", "pushed", "progress_started", "succeeded"]
    );
    let (_, versions) = t
        .get(&format!("/api/v1/products/{}/ota/versions", f.pk))
        .await;
    assert_eq!(versions["versions"][0]["version"], "2.0.0");
    assert_eq!(versions["versions"][0]["devices"], 1);
    let (_, stats) = t.get(&format!("/api/v1/ota/jobs/{jid}/statistics")).await;
    assert_eq!(stats["success_rate"], 1.0);
    let (_, fstats) = t
        .get(&format!("/api/v1/firmware/{}/statistics", f.fid))
        .await;
    assert_eq!(fstats["jobs"], 1);

    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e.to_state.as_str());
    }
    assert_eq!(seen, vec!["NOTIFIED", "IN_PROGRESS", "SUCCEEDED"]);
    let m = t.metrics().await;
    assert!(
        m.contains(r#"fleetgate_ota_tasks{state="SUCCEEDED"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"fleetgate_ota_pushes_total{kind="push"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn every_failure_code_and_a_wrong_version_are_kept_apart() {
    let t = spawn_app().await;
    let f = fleet(&t, 5, true).await;
    let mut devs = Vec::new();
    for i in 0..5 {
        devs.push(f.device(&t, i).await);
    }
    let jid = create_job(&t, json!({"firmware_id": f.fid, "target": "ALL"})).await;
    for (i, d) in devs.iter_mut().enumerate() {
        d.upgrade().await;
        d.progress(10).await;
        if i < 4 {
            d.progress(-(i as i32 + 1)).await;
        } else {
            d.inform("7.7.7").await;
        }
    }
    let expected = [
        "UPDATE_FAILED",
        "DOWNLOAD_FAILED",
        "VERIFY_FAILED",
        "WRITE_FAILED",
        "WRONG_VERSION",
    ];
    for (i, reason) in expected.iter().enumerate() {
        let v = task(&t, &jid, f.dn(i)).await;
        assert_eq!(v["status"], "FAILED");
        assert_eq!(v["failure"], *reason);
        if i < 4 {
            assert_eq!(v["failure_code"], -(i as i64 + 1));
        }
    }
    let (_, stats) = t.get(&format!("/api/v1/ota/jobs/{jid}/statistics")).await;
    for reason in expected {
        assert_eq!(stats["failures"][reason], 1, "{stats}");
    }
    assert_eq!(
        stats["failures_by_src_version"]["1.0.0"]["WRONG_VERSION"],
        1
    );
    assert_eq!(stats["success_rate"], 0.0);
}

#[tokio::test]
async fn a_stuck_update_times_out_and_is_not_retried() {
    let t = spawn_app().await;
    let f = fleet(&t, 1, true).await;
    let mut d = f.device(&t, 0).await;
    let jid = create_job(
        &t,
        json!({"firmware_id": f.fid, "target": "ALL", "timeout_seconds": 1,
               "retry_count": 2, "retry_interval_seconds": 0}),
    )
    .await;
    d.upgrade().await;
    d.progress(5).await;
    let v = wait_task(&t, &jid, f.dn(0), "FAILED", |v| v["status"] == "FAILED").await;
    assert_eq!(v["failure"], "TIMEOUT");
    assert_eq!(v["retries_used"], 0);
    assert!(
        d.quiet_for(Duration::from_millis(300)).await,
        "no retry push after a timeout"
    );
    assert!(t.metrics().await.contains("fleetgate_ota_timeouts_total 1"));
}

#[tokio::test]
async fn a_retry_pushes_again_then_succeeds_or_runs_out() {
    let t = spawn_app().await;
    let f = fleet(&t, 2, true).await;
    let mut a = f.device(&t, 0).await;
    let mut b = f.device(&t, 1).await;
    let jid = create_job(
        &t,
        json!({"firmware_id": f.fid, "target": "ALL", "retry_count": 1, "retry_interval_seconds": 0}),
    )
    .await;
    a.upgrade().await;
    b.upgrade().await;
    // a: download fails, the retry re-pushes, then it succeeds.
    a.progress(-2).await;
    let again = a.upgrade().await;
    assert_eq!(again.data.version, "2.0.0");
    let v = task(&t, &jid, f.dn(0)).await;
    assert_eq!(
        v["status"], "NOTIFIED",
        "the visible state is kept during a retry"
    );
    assert_eq!(v["retries_used"], 1);
    a.progress(30).await;
    a.inform("2.0.0").await;
    assert_eq!(task(&t, &jid, f.dn(0)).await["status"], "SUCCEEDED");
    // b: fails twice: the one retry is used up.
    b.progress(-4).await;
    b.upgrade().await;
    b.progress(-4).await;
    let v = wait_task(&t, &jid, f.dn(1), "FAILED", |v| v["status"] == "FAILED").await;
    assert_eq!(v["failure"], "WRITE_FAILED");
    assert_eq!(v["pushes"], 2);
    let history = v["history"].as_array().unwrap();
    assert!(history.iter().any(|h| h["event"] == "retry_scheduled"));
    assert!(history.last().unwrap()["reason"]
        .as_str()
        .unwrap()
        .contains("retries exhausted"));
}

#[tokio::test]
async fn an_offline_device_is_updated_when_it_comes_online() {
    let t = spawn_app().await;
    let f = fleet(&t, 1, true).await;
    let jid = create_job(&t, json!({"firmware_id": f.fid, "target": "ALL"})).await;
    let v = task(&t, &jid, f.dn(0)).await;
    assert_eq!(
        (v["status"].as_str(), v["queue_reason"].as_str()),
        (Some("QUEUED"), Some("OFFLINE"))
    );
    let mut d = f.device(&t, 0).await; // connects, subscribes, reports 1.0.0
    d.upgrade().await;
    wait_task(&t, &jid, f.dn(0), "NOTIFIED", |v| v["status"] == "NOTIFIED").await;
    d.inform("2.0.0").await;
    assert_eq!(task(&t, &jid, f.dn(0)).await["status"], "SUCCEEDED");
}

#[tokio::test]
async fn pull_mode_answers_firmware_get_with_the_pending_upgrade() {
    let t = spawn_app().await;
    let f = fleet(&t, 1, true).await;
    let mut d = f.device(&t, 0).await;
    let get = format!("/sys/{}/{}/thing/ota/firmware/get", f.pk, f.dn(0));
    d.publish(
        get.clone(),
        json!({"id": "77", "version": "1.0", "params": {}, "method": "thing.ota.firmware.get"}),
    )
    .await;
    let p = d.dev.next_publish().await;
    assert!(matches!(
        FirmwareGetReply::parse(&p.payload).unwrap(),
        FirmwareGetReply::NoUpgrade { .. }
    ));
    // A job that needs confirmation: once confirmed it is pushed, and a pull returns it too.
    let jid = create_job(&t, json!({"firmware_id": f.fid, "target": "ALL", "rate": {"per_minute": 1, "burst": 1}, "need_confirm": true})).await;
    let (s, _) = t
        .post(&format!("/api/v1/ota/jobs/{jid}/confirm"), json!({}))
        .await;
    assert_eq!(s, 200);
    // The confirmed task is pushed (rate allows one); ask anyway: the reply carries the same package.
    let pushed = d.upgrade().await;
    d.publish(get, json!({"id": "78", "params": {}})).await;
    let p = d.dev.next_publish().await;
    match FirmwareGetReply::parse(&p.payload).unwrap() {
        FirmwareGetReply::Upgrade { id, data } => {
            assert_eq!(id, "78");
            assert_eq!(data.version, pushed.data.version);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn pulling_a_queued_task_delivers_it() {
    let t = spawn_app().await;
    let f = fleet(&t, 2, true).await;
    let mut a = f.device(&t, 0).await;
    let mut b = f.device(&t, 1).await;
    // One push a minute, burst 1: the second device waits RATE_LIMITED…
    let jid = create_job(
        &t,
        json!({"firmware_id": f.fid, "target": "ALL", "rate": {"per_minute": 1, "burst": 1}}),
    )
    .await;
    let first = wait_job(&t, &jid, "one push", |j| j["counters"]["notified"] == 1).await;
    assert_eq!(first["counters"]["queued"], 1);
    let (waiting, dev) = if task(&t, &jid, f.dn(0)).await["status"] == "QUEUED" {
        (f.dn(0), &mut a)
    } else {
        (f.dn(1), &mut b)
    };
    assert_eq!(
        task(&t, &jid, waiting).await["queue_reason"],
        "RATE_LIMITED"
    );
    // …until it asks.
    let get = format!("/sys/{}/{}/thing/ota/firmware/get", f.pk, waiting);
    dev.publish(get, json!({"id": "5", "params": {"module": "default"}}))
        .await;
    let p = loop {
        let p = dev.dev.next_publish().await;
        if p.topic.ends_with("get_reply") {
            break p;
        }
    };
    assert!(matches!(
        FirmwareGetReply::parse(&p.payload).unwrap(),
        FirmwareGetReply::Upgrade { .. }
    ));
    let v = task(&t, &jid, waiting).await;
    assert_eq!(v["status"], "NOTIFIED");
    assert_eq!(
        v["history"].as_array().unwrap().last().unwrap()["event"],
        "pulled"
    );
}

#[tokio::test]
async fn the_push_rate_is_honoured() {
    let t = spawn_app().await;
    let f = fleet(&t, 5, true).await;
    let mut devs = Vec::new();
    for i in 0..5 {
        devs.push(f.device(&t, i).await);
    }
    // 1 per minute with a burst of 2: two pushes now, the next only a minute later.
    let jid = create_job(
        &t,
        json!({"firmware_id": f.fid, "target": "ALL", "rate": {"per_minute": 1, "burst": 2}}),
    )
    .await;
    let job = wait_job(&t, &jid, "two pushes", |j| j["counters"]["notified"] == 2).await;
    assert_eq!(job["counters"]["queued"], 3);
    assert_eq!(job["current_rate_per_minute"], 1.0);
    let (_, queued) = t
        .get(&format!("/api/v1/ota/jobs/{jid}/tasks?status=QUEUED"))
        .await;
    for q in queued["items"].as_array().unwrap() {
        assert_eq!(q["queue_reason"], "RATE_LIMITED");
    }
    // The two NOTIFIED devices got exactly their push; the others get none within the minute.
    for (i, d) in devs.iter_mut().enumerate() {
        if task(&t, &jid, f.dn(i)).await["status"] == "NOTIFIED" {
            d.upgrade().await;
        }
        assert!(
            d.quiet_for(Duration::from_millis(100)).await,
            "an extra push"
        );
    }
    assert!(t
        .metrics()
        .await
        .contains(r#"fleetgate_ota_pushes_total{kind="push"} 2"#));
}

#[tokio::test]
async fn cancel_static_cancels_all_cancel_dynamic_stops_the_policy() {
    let t = spawn_app().await;
    let f = fleet(&t, 2, true).await;
    let mut d = f.device(&t, 0).await;
    let jid = create_job(&t, json!({"firmware_id": f.fid, "target": "ALL"})).await;
    d.upgrade().await;
    d.progress(10).await;
    // A `null` body is an absent one, as the document's nullable body says.
    let (s, job) = t
        .post(&format!("/api/v1/ota/jobs/{jid}/cancel"), json!(null))
        .await;
    assert_eq!(s, 200, "{job}");
    assert_eq!(job["status"], "CANCELED");
    assert_eq!(
        job["counters"]["canceled"], 2,
        "STATIC: IN_PROGRESS and QUEUED"
    );
    let (s, e) = t
        .post(&format!("/api/v1/ota/jobs/{jid}/cancel"), json!({}))
        .await;
    assert_eq!((s, e["error_code"].as_str()), (409, Some("FG.0409")));

    let fid3 = firmware(&t, &f.pk, "3.0.0", true).await;
    let dj = create_job(
        &t,
        json!({"firmware_id": fid3, "target": "ALL", "selection": "DYNAMIC"}),
    )
    .await;
    d.upgrade().await;
    d.progress(10).await;
    let (_, job) = t
        .post(&format!("/api/v1/ota/jobs/{dj}/cancel"), json!({}))
        .await;
    assert_eq!(job["status"], "CANCELED");
    assert_eq!(job["dynamic_active"], false);
    assert_eq!(
        task(&t, &dj, f.dn(0)).await["status"],
        "IN_PROGRESS",
        "in-flight tasks continue"
    );
    // A device created now does not join the canceled dynamic job.
    let secret = t.create_device(&f.pk, "ota-late").await;
    let mut late = OtaDevice::connect(&t, &f.pk, "ota-late", &secret).await;
    late.inform("1.0.0").await;
    let (s, _) = t
        .get(&format!("/api/v1/ota/jobs/{dj}/tasks/ota-late"))
        .await;
    assert_eq!(s, 404);
    // The in-flight task still finishes.
    d.inform("3.0.0").await;
    assert_eq!(task(&t, &dj, f.dn(0)).await["status"], "SUCCEEDED");
}

#[tokio::test]
async fn a_dynamic_job_takes_devices_that_come_to_match() {
    let t = spawn_app().await;
    let f = fleet(&t, 1, true).await;
    let jid = create_job(&t, json!({"firmware_id": f.fid, "target": "ALL", "selection": "DYNAMIC", "src_versions": ["1.0.0"]})).await;
    assert_eq!(
        wait_job(&t, &jid, "no task", |_| true).await["counters"]["total"],
        0,
        "no version reported yet"
    );
    let mut d = f.device(&t, 0).await; // reports 1.0.0: joins and is pushed
    d.upgrade().await;
    d.inform("2.0.0").await;
    let v = task(&t, &jid, f.dn(0)).await;
    assert_eq!(v["status"], "SUCCEEDED");
    // Cancel with cancel_in_progress on a job with nothing in flight just stops it.
    let (_, job) = t
        .post(
            &format!("/api/v1/ota/jobs/{jid}/cancel"),
            json!({"cancel_in_progress": true}),
        )
        .await;
    assert_eq!(job["status"], "CANCELED");
}

#[tokio::test]
async fn need_confirm_holds_tasks_until_confirmed() {
    let t = spawn_app().await;
    let f = fleet(&t, 2, true).await;
    let mut a = f.device(&t, 0).await;
    let jid = create_job(
        &t,
        json!({"firmware_id": f.fid, "target": "ALL", "need_confirm": true}),
    )
    .await;
    assert_eq!(task(&t, &jid, f.dn(0)).await["status"], "CONFIRM");
    assert!(a.quiet_for(Duration::from_millis(200)).await);
    let (s, r) = t
        .post(
            &format!("/api/v1/ota/jobs/{jid}/confirm"),
            json!({"device_names": [f.dn(0)]}),
        )
        .await;
    assert_eq!((s, r["changed"].as_u64()), (200, Some(1)));
    a.upgrade().await;
    assert_eq!(task(&t, &jid, f.dn(1)).await["status"], "CONFIRM");
    let (s, e) = t
        .post(
            &format!("/api/v1/ota/jobs/{jid}/confirm"),
            json!({"device_names": ["ghost-dev"]}),
        )
        .await;
    assert_eq!(
        (s, e["error_ext_msg"].as_str()),
        (400, Some("device_names[0]"))
    );
    // Confirm with no body confirms the rest; the offline one waits OFFLINE.
    let resp = t
        .http
        .post(t.url(&format!("/api/v1/ota/jobs/{jid}/confirm")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(task(&t, &jid, f.dn(1)).await["queue_reason"], "OFFLINE");
}

#[tokio::test]
async fn overwrite_replaces_unfinished_tasks_but_never_in_progress_ones() {
    let t = spawn_app().await;
    let f = fleet(&t, 2, true).await;
    let mut a = f.device(&t, 0).await;
    let first = create_job(&t, json!({"firmware_id": f.fid, "target": "ALL"})).await;
    a.upgrade().await;
    a.progress(1).await; // a: IN_PROGRESS; b: QUEUED (offline)
    let fid3 = firmware(&t, &f.pk, "3.0.0", true).await;
    let second = create_job(&t, json!({"firmware_id": fid3, "target": "ALL"})).await;
    let v = task(&t, &second, f.dn(1)).await;
    assert_eq!(
        (v["status"].as_str(), v["failure"].as_str()),
        (Some("FAILED"), Some("CONFLICT"))
    );
    let third = create_job(
        &t,
        json!({"firmware_id": fid3, "target": "ALL", "overwrite": true}),
    )
    .await;
    assert_eq!(task(&t, &first, f.dn(1)).await["failure"], "OVERWRITTEN");
    assert_eq!(task(&t, &third, f.dn(1)).await["status"], "QUEUED");
    assert_eq!(task(&t, &third, f.dn(0)).await["failure"], "CONFLICT");
    assert_eq!(task(&t, &first, f.dn(0)).await["status"], "IN_PROGRESS");
    let (_, jobs) = t
        .get(&format!(
            "/api/v1/products/{}/devices/{}/ota/jobs",
            f.pk,
            f.dn(1)
        ))
        .await;
    assert_eq!(jobs["total"], 3);
}

#[tokio::test]
async fn the_campaign_resumes_after_a_restart() {
    let mut t = spawn_app().await;
    let f = fleet(&t, 3, true).await;
    let mut devs = Vec::new();
    for i in 0..3 {
        devs.push(f.device(&t, i).await);
    }
    // One push a minute (burst 1) and a 2 s timeout.
    let jid = create_job(
        &t,
        json!({"firmware_id": f.fid, "target": "ALL", "timeout_seconds": 2,
        "rate": {"per_minute": 1, "burst": 1}}),
    )
    .await;
    let job = wait_job(&t, &jid, "one push", |j| j["counters"]["notified"] == 1).await;
    assert_eq!(job["counters"]["queued"], 2);
    let (_, notified) = t
        .get(&format!("/api/v1/ota/jobs/{jid}/tasks?status=NOTIFIED"))
        .await;
    let pushed_dn = notified["items"][0]["device_name"]
        .as_str()
        .unwrap()
        .to_owned();
    let first = (0..3).find(|i| f.dn(*i) == pushed_dn).unwrap();
    devs[first].upgrade().await;
    devs[first].progress(20).await;
    drop(devs);

    t.restart().await;
    let job = wait_job(&t, &jid, "reloaded", |_| true).await;
    assert_eq!(job["counters"]["total"], 3, "no task lost");
    assert_eq!(job["counters"]["queued"], 2);
    // IN_PROGRESS, or already timed out if the restart took longer than the timeout.
    let started = job["counters"]["in_progress"].as_u64().unwrap()
        + job["counters"]["failed"].as_u64().unwrap();
    assert_eq!(started, 1);
    // The timeout runs from the persisted first progress and fires after the restart.
    let v = wait_task(&t, &jid, f.dn(first), "TIMEOUT", |v| {
        v["status"] == "FAILED"
    })
    .await;
    assert_eq!(v["failure"], "TIMEOUT");
    // Devices come back: the rate bucket remembers the push before the restart, so nobody is
    // pushed within this minute.
    let mut again = Vec::new();
    for i in (0..3).filter(|i| *i != first) {
        again.push(f.device(&t, i).await);
    }
    for d in again.iter_mut() {
        assert!(
            d.quiet_for(Duration::from_millis(300)).await,
            "pushed twice without cause"
        );
    }
    let (_, queued) = t
        .get(&format!("/api/v1/ota/jobs/{jid}/tasks?status=QUEUED"))
        .await;
    assert_eq!(queued["total"], 2);
}

#[tokio::test]
async fn job_requests_are_validated_and_need_an_operator() {
    let t = spawn_app().await;
    let f = fleet(&t, 1, false).await;
    let (s, e) = t
        .post(
            "/api/v1/ota/jobs",
            json!({"firmware_id": f.fid, "target": "ALL"}),
        )
        .await;
    assert_eq!(
        (s, e["error_code"].as_str(), e["error_ext_msg"].as_str()),
        (409, Some("FG.3103"), Some("force"))
    );
    let (s, e) = t
        .post(
            "/api/v1/ota/jobs",
            json!({"firmware_id": f.fid, "target": "GRAY", "force": true}),
        )
        .await;
    assert_eq!(
        (s, e["error_ext_msg"].as_str()),
        (400, Some("gray_percent"))
    );
    let (s, e) = t.post("/api/v1/ota/jobs", json!({"firmware_id": f.fid, "target": "ALL", "force": true, "rate": {"per_minute": 0}})).await;
    assert_eq!(
        (s, e["error_ext_msg"].as_str()),
        (400, Some("rate.per_minute"))
    );
    let (s, e) = t
        .post(
            "/api/v1/ota/jobs",
            json!({"firmware_id": f.fid, "target": "ALL", "force": true, "colour": 1}),
        )
        .await;
    assert_eq!((s, e["error_ext_msg"].as_str()), (400, Some("colour")));
    let (s, e) = t
        .post(
            "/api/v1/ota/jobs",
            json!({"firmware_id": "fw-nope", "target": "ALL"}),
        )
        .await;
    assert_eq!((s, e["error_code"].as_str()), (404, Some("FG.3001")));
    let (s, _) = t
        .request(
            reqwest::Method::POST,
            "/api/v1/ota/jobs",
            Some(json!({"firmware_id": f.fid, "target": "ALL", "force": true})),
            Some(VIEWER_TOKEN),
        )
        .await;
    assert_eq!(s, 403);
    let (s, e) = t.get("/api/v1/ota/jobs/job-doesnotexist00").await;
    assert_eq!((s, e["error_code"].as_str()), (404, Some("FG.3101")));
    // Deleting a package in use is refused; after the job is canceled it works.
    let jid = create_job(
        &t,
        json!({"firmware_id": f.fid, "target": "ALL", "force": true}),
    )
    .await;
    let (s, e) = t
        .request(
            reqwest::Method::DELETE,
            &format!("/api/v1/firmware/{}", f.fid),
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!((s, e["error_code"].as_str()), (409, Some("FG.3005")));
    t.post(&format!("/api/v1/ota/jobs/{jid}/cancel"), json!({}))
        .await;
    let (s, _) = t
        .request(
            reqwest::Method::DELETE,
            &format!("/api/v1/firmware/{}", f.fid),
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn a_device_list_can_be_uploaded() {
    let t = spawn_app().await;
    let f = fleet(&t, 3, true).await;
    let form = reqwest::multipart::Form::new()
        .text(
            "job",
            json!({"firmware_id": f.fid, "target": "ALL"}).to_string(),
        )
        .part(
            "device_list",
            reqwest::multipart::Part::bytes(
                format!("DeviceName\n{}\n{}\n", f.dn(0), f.dn(2)).into_bytes(),
            )
            .file_name("devices.csv"),
        );
    let resp = t
        .http
        .post(t.url("/api/v1/ota/jobs"))
        .bearer_auth(ADMIN_TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let job: Value = resp.json().await.unwrap();
    assert_eq!(job["spec"]["target"], "SPECIFIC");
    assert_eq!(job["counters"]["total"], 2);
    let (_, tasks) = t
        .get(&format!(
            "/api/v1/ota/jobs/{}/tasks",
            job["job_id"].as_str().unwrap()
        ))
        .await;
    let names: Vec<&str> = tasks["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["device_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec![f.dn(0), f.dn(2)]);
}

#[tokio::test]
async fn deleting_a_device_cancels_its_tasks_and_the_job_completes() {
    let mut t = spawn_app().await;
    let f = fleet(&t, 2, true).await;
    let jid = create_job(&t, json!({"firmware_id": f.fid, "target": "ALL"})).await;
    let mut d0 = f.device(&t, 0).await;
    d0.upgrade().await;
    d0.progress(20).await;
    wait_task(&t, &jid, f.dn(0), "IN_PROGRESS", |v| {
        v["status"] == "IN_PROGRESS"
    })
    .await;
    // ota-dev-1 never connected: QUEUED (OFFLINE). Both devices are deleted.
    for i in 0..2 {
        let (status, body) = t
            .request(
                reqwest::Method::DELETE,
                &format!("/api/v1/products/{}/devices/{}", f.pk, f.dn(i)),
                None,
                Some(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(status, 204, "{body}");
    }
    // Already done when the DELETE answered.
    for i in 0..2 {
        let v = task(&t, &jid, f.dn(i)).await;
        assert_eq!(v["status"], "CANCELED", "{v}");
        let last = v["history"].as_array().unwrap().last().unwrap().clone();
        assert!(
            last["reason"]
                .as_str()
                .unwrap()
                .starts_with("DEVICE_DELETED"),
            "{last}"
        );
    }
    let (_, job) = t.get(&format!("/api/v1/ota/jobs/{jid}")).await;
    assert_eq!(job["status"], "COMPLETED", "{job}");
    assert_eq!(job["counters"]["canceled"], 2, "{job}");
    // Survives a restart.
    t.restart().await;
    let (_, job) = t.get(&format!("/api/v1/ota/jobs/{jid}")).await;
    assert_eq!(job["status"], "COMPLETED", "{job}");
    assert_eq!(task(&t, &jid, f.dn(1)).await["status"], "CANCELED");
}

#[tokio::test]
async fn a_dynamic_job_takes_devices_created_or_tagged_after_it() {
    let t = spawn_app().await;
    let pk = t.create_product("dynamic fleet").await;
    let fid = firmware(&t, &pk, "2.0.0", true).await;
    let tag_job = create_job(
        &t,
        json!({"firmware_id": fid, "selection": "DYNAMIC", "target": "TAG",
               "target_tags": [{"key": "site", "value": "berlin"}]}),
    )
    .await;
    // Created over HTTP after the job, one by one and in a batch: matching ones join at once.
    let (status, body) = t
        .post(
            &format!("/api/v1/products/{pk}/devices"),
            json!({"device_name": "berlin-1", "tags": {"site": "berlin"}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let secret = body["device_secret"].as_str().unwrap().to_owned();
    let (status, body) = t
        .post(
            &format!("/api/v1/products/{pk}/devices/batch"),
            json!([{"device_name": "berlin-2", "tags": {"site": "berlin"}},
                   {"device_name": "paris-1", "tags": {"site": "paris"}}]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let v = task(&t, &tag_job, "berlin-1").await;
    assert_eq!(
        (v["status"].as_str(), v["queue_reason"].as_str()),
        (Some("QUEUED"), Some("OFFLINE"))
    );
    task(&t, &tag_job, "berlin-2").await;
    let (status, _) = t
        .get(&format!("/api/v1/ota/jobs/{tag_job}/tasks/paris-1"))
        .await;
    assert_eq!(status, 404, "paris-1 does not match");
    // Its tags change: now it matches.
    let (status, body) = t
        .request(
            reqwest::Method::PATCH,
            &format!("/api/v1/products/{pk}/devices/paris-1"),
            Some(json!({"tags": {"site": "berlin"}})),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(task(&t, &tag_job, "paris-1").await["status"], "QUEUED");
    let (_, job) = t.get(&format!("/api/v1/ota/jobs/{tag_job}")).await;
    assert_eq!(job["counters"]["total"], 3, "{job}");
    // The newcomer is updated when it comes online.
    let mut d = OtaDevice::connect(&t, &pk, "berlin-1", &secret).await;
    d.inform("1.0.0").await;
    d.upgrade().await;
    d.inform("2.0.0").await;
    assert_eq!(task(&t, &tag_job, "berlin-1").await["status"], "SUCCEEDED");
}

#[tokio::test]
async fn a_device_created_after_a_dynamic_job_joins_once_it_reports_a_source_version() {
    let t = spawn_app().await;
    let pk = t.create_product("dynamic versions").await;
    let fid = firmware(&t, &pk, "2.0.0", true).await;
    let jid = create_job(
        &t,
        json!({"firmware_id": fid, "selection": "DYNAMIC", "target": "ALL",
               "src_versions": ["1.0.0"]}),
    )
    .await;
    let secret = t.create_device(&pk, "late-device").await;
    let (status, _) = t
        .get(&format!("/api/v1/ota/jobs/{jid}/tasks/late-device"))
        .await;
    assert_eq!(status, 404, "no version reported yet");
    let mut d = OtaDevice::connect(&t, &pk, "late-device", &secret).await;
    d.inform("0.9.0").await;
    let (status, _) = t
        .get(&format!("/api/v1/ota/jobs/{jid}/tasks/late-device"))
        .await;
    assert_eq!(status, 404, "not a source version");
    d.inform("1.0.0").await;
    d.upgrade().await;
    d.inform("2.0.0").await;
    assert_eq!(task(&t, &jid, "late-device").await["status"], "SUCCEEDED");
}

/// One MQTT 3.1.1 connection over a raw socket, to send several packets in ONE write (the
/// gateway then handles them as one run, as it does a device's burst).
struct RawDevice {
    stream: tokio::net::TcpStream,
    buf: bytes::BytesMut,
}

impl RawDevice {
    async fn connect(t: &TestApp, pk: &str, dn: &str, secret: &str) -> RawDevice {
        use rumqttc::mqttbytes::v4::{Connect, Subscribe};
        let creds = credentials(pk, dn, secret);
        let stream = tokio::net::TcpStream::connect(t.mqtt_addr()).await.unwrap();
        let mut d = RawDevice {
            stream,
            buf: bytes::BytesMut::new(),
        };
        let mut connect = Connect::new(creds.client_id.clone());
        connect.set_login(creds.username.clone(), creds.password.clone());
        let mut out = bytes::BytesMut::new();
        connect.write(&mut out).unwrap();
        d.send(&out).await;
        assert!(matches!(d.next().await, rumqttc::Packet::ConnAck(_)));
        let mut out = bytes::BytesMut::new();
        let mut sub = Subscribe::new(
            format!("/sys/{pk}/{dn}/thing/ota/firmware/get_reply"),
            QoS::AtMostOnce,
        );
        sub.pkid = 1;
        sub.write(&mut out).unwrap();
        d.send(&out).await;
        assert!(matches!(d.next().await, rumqttc::Packet::SubAck(_)));
        d
    }

    async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn next(&mut self) -> rumqttc::Packet {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(p) = rumqttc::Packet::read(&mut self.buf, 1 << 20) {
                return p;
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
                .await
                .expect("a packet in time")
                .unwrap();
            assert!(n > 0, "connection closed");
        }
    }
}

#[tokio::test]
async fn a_firmware_get_right_after_a_wrong_version_report_gets_no_upgrade() {
    use rumqttc::mqttbytes::v4::Publish;
    let t = spawn_app().await;
    let f = fleet(&t, 1, true).await;
    let (dn, secret) = &f.secrets[0];
    let mut d = f.device(&t, 0).await;
    let jid = create_job(&t, json!({"firmware_id": f.fid, "target": "ALL"})).await;
    d.upgrade().await;
    d.progress(50).await;
    drop(d);
    let mut raw = RawDevice::connect(&t, &f.pk, dn, secret).await;
    // A device back from a bad flash: it reports a version that is neither source nor target,
    // and asks for an upgrade in the same breath (pull mode).
    let mut out = bytes::BytesMut::new();
    Publish::new(
        format!("/ota/device/inform/{}/{dn}", f.pk),
        QoS::AtMostOnce,
        json!({"id": "1", "params": {"version": "9.9.9"}}).to_string(),
    )
    .write(&mut out)
    .unwrap();
    Publish::new(
        format!("/sys/{}/{dn}/thing/ota/firmware/get", f.pk),
        QoS::AtMostOnce,
        json!({"id": "2", "params": {"module": "default"}}).to_string(),
    )
    .write(&mut out)
    .unwrap();
    raw.send(&out).await;
    let reply = loop {
        if let rumqttc::Packet::Publish(p) = raw.next().await {
            break p;
        }
    };
    assert!(
        matches!(
            FirmwareGetReply::parse(&reply.payload).unwrap(),
            FirmwareGetReply::NoUpgrade { .. }
        ),
        "the task failed with the report before the request: {:?}",
        String::from_utf8_lossy(&reply.payload)
    );
    let v = task(&t, &jid, dn).await;
    assert_eq!(
        (v["status"].as_str(), v["failure"].as_str()),
        (Some("FAILED"), Some("WRONG_VERSION"))
    );
}

#[tokio::test]
async fn a_specific_job_says_why_each_listed_device_was_not_taken() {
    let t = spawn_app().await;
    let pk = t.create_product("picky").await;
    for dn in ["at-src", "at-other", "at-target", "silent"] {
        t.create_device(&pk, dn).await;
    }
    let reg = t.app().registry();
    for (dn, v) in [
        ("at-src", "2.0.0"),
        ("at-other", "1.0.0"),
        ("at-target", "2.1.0"),
    ] {
        reg.report_version(&pk, dn, "default", v, 1).await.unwrap();
    }
    let repo = t.app().firmware().clone();
    let mut new = NewFirmware::new(&pk, "2.1.0");
    new.src_versions = vec!["2.0.0".into()];
    let fid = repo
        .create_from_bytes(new, b"image 2.1.0")
        .await
        .unwrap()
        .firmware_id;
    let (s, job) = t
        .post(
            "/api/v1/ota/jobs",
            json!({"firmware_id": fid, "target": "SPECIFIC", "force": true,
                   "device_names": ["at-src", "at-other", "at-target", "silent"]}),
        )
        .await;
    assert_eq!(s, 201, "{job}");
    assert_eq!(job["counters"]["total"], 1, "{job}");
    let reasons: std::collections::BTreeMap<String, String> = job["not_selected"]
        .as_array()
        .unwrap_or_else(|| panic!("no not_selected in {job}"))
        .iter()
        .map(|n| {
            (
                n["device_name"].as_str().unwrap().to_owned(),
                n["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(reasons.len(), 3, "{job}");
    assert_eq!(reasons["at-target"], "already at 2.1.0");
    assert!(reasons["at-other"].contains("reports 1.0.0") && reasons["at-other"].contains("2.0.0"));
    assert!(
        reasons["silent"].starts_with("never reported"),
        "{}",
        reasons["silent"]
    );
    // The job read back does not carry it.
    let jid = job["job_id"].as_str().unwrap();
    let (_, again) = t.get(&format!("/api/v1/ota/jobs/{jid}")).await;
    assert!(again.get("not_selected").is_none(), "{again}");
    // A VERIFY job none of whose devices can take the package names them in its 400.
    let (s, err) = t
        .post(
            "/api/v1/ota/jobs",
            json!({"firmware_id": fid, "job_type": "VERIFY_FIRMWARE", "target": "SPECIFIC",
                   "device_names": ["at-other"]}),
        )
        .await;
    assert_eq!(s, 400, "{err}");
    assert!(
        err["error_msg"]
            .as_str()
            .unwrap()
            .contains("at-other: reports 1.0.0"),
        "{err}"
    );
}
