//! Engine tests on a manual clock: nothing sleeps, time moves when a test moves it and the
//! test runs the deadline task's work with `run_due`. Devices are a fake [`Pusher`] (who is
//! connected, what was published) plus direct calls of the device hooks.

use super::*;
use crate::ota::firmware::FirmwareStatus;
use crate::ota::model::{
    AbortAction, AbortSpec, JobStatus, JobType, RampSpec, RateSpec, Selection, TagFilter,
    TargetKind,
};
use crate::ota::task::{FailureReason, QueueReason, TaskStatus};
use crate::registry::{NewDevice, Page};
use crate::store::Op;
use crate::testing::ota::{H, T0};
use fleetgate_topics::{FailureCode, ProgressStep, UpgradeMessage};
use std::collections::BTreeMap;

#[tokio::test]
async fn a_push_has_the_vendor_shape_and_the_target_version_means_success() {
    let h = H::new().await;
    h.devices(2, "1.0").await;
    h.connect("dev-0000").await;
    h.connect("dev-0001").await;
    let fid = h.firmware("2.0", true).await;
    let mut events = h.engine.subscribe_events();
    let job = h.engine.create_job(h.spec(&fid)).await.unwrap();
    let jid = job.job.job_id.clone();
    assert_eq!(job.counters.queued, 2);
    h.engine.run_due().await;
    assert_eq!(h.pusher.total(), 2);
    let (topic, payload) = lock(&h.pusher.published)[0].clone();
    assert_eq!(topic, format!("/ota/device/upgrade/{}/dev-0000", h.pk));
    let msg = UpgradeMessage::parse(&payload).expect("vendor shape");
    assert_eq!(msg.code, "1000");
    assert_eq!(msg.data.version, "2.0");
    assert!(msg
        .data
        .url
        .starts_with(&format!("http://gw.test/firmware/{fid}/download?expires=")));
    assert_eq!(h.status(&jid, "dev-0000"), TaskStatus::Notified);

    h.progress("dev-0000", 30).await;
    assert_eq!(h.status(&jid, "dev-0000"), TaskStatus::InProgress);
    h.progress("dev-0000", 100).await;
    assert_eq!(
        h.status(&jid, "dev-0000"),
        TaskStatus::InProgress,
        "100% is not success"
    );
    h.report("dev-0000", "2.0").await;
    assert_eq!(h.status(&jid, "dev-0000"), TaskStatus::Succeeded);
    // The second device goes straight from NOTIFIED to SUCCEEDED.
    h.report("dev-0001", "2.0").await;
    let view = h.engine.get_job(&jid).unwrap();
    assert_eq!(view.counters.succeeded, 2);
    assert_eq!(view.job.status, JobStatus::Completed);
    let stats = h.engine.job_statistics(&jid).unwrap();
    assert_eq!(stats.success_rate, Some(1.0));
    assert_eq!(stats.pushes, 2);

    // Events, in order, after durability.
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        if e.device_name == "dev-0000" {
            seen.push((e.event.clone(), e.to_state));
        }
    }
    assert_eq!(
        seen,
        vec![
            ("pushed".to_owned(), TaskStatus::Notified),
            ("progress_started".to_owned(), TaskStatus::InProgress),
            ("succeeded".to_owned(), TaskStatus::Succeeded),
        ]
    );
    let timeline = h.engine.timeline(&h.pk, "dev-0000", None);
    let names: Vec<&str> = timeline.iter().map(|t| t.entry.event.as_str()).collect();
    assert_eq!(
        names,
        vec!["created", "pushed", "progress_started", "succeeded"]
    );
    assert!(h
        .metrics
        .encode()
        .contains(r#"fleetgate_ota_tasks{state="SUCCEEDED"} 2"#));
}

#[tokio::test]
async fn unverified_firmware_needs_force_and_validation_names_fields() {
    let h = H::new().await;
    h.devices(1, "1.0").await;
    let fid = h.firmware("2.0", false).await;
    let err = h.engine.create_job(h.spec(&fid)).await.unwrap_err();
    assert!(matches!(err, OtaError::FirmwareNotVerified { .. }), "{err}");
    let mut spec = h.spec(&fid);
    spec.force = true;
    assert!(h.engine.create_job(spec).await.is_ok());
    let mut spec = h.spec(&fid);
    spec.force = true;
    spec.retry_count = Some(2);
    match h.engine.create_job(spec).await.unwrap_err() {
        OtaError::Invalid { field, .. } => assert_eq!(field, "retry_interval_seconds"),
        e => panic!("{e}"),
    }
    let mut spec = h.spec(&fid);
    spec.force = true;
    spec.rate = Some(RateSpec {
        per_minute: 10,
        burst: None,
        ramp: Some(RampSpec {
            factor: 9.0,
            every_seconds: Some(1),
            every_succeeded: None,
            max_per_minute: 20,
        }),
    });
    match h.engine.create_job(spec).await.unwrap_err() {
        OtaError::Invalid { field, .. } => assert_eq!(field, "rate.ramp.factor"),
        e => panic!("{e}"),
    }
    // A ramp step so long that it overflows milliseconds (2^61 s × 1000 wraps to 0, a division
    // by zero in the push scheduler) is refused, not accepted.
    for every in [1u64 << 61, crate::ota::model::MAX_RAMP_EVERY_SECS + 1] {
        let mut spec = h.spec(&fid);
        spec.force = true;
        spec.rate = Some(RateSpec {
            per_minute: 10,
            burst: None,
            ramp: Some(RampSpec {
                factor: 2.0,
                every_seconds: Some(every),
                every_succeeded: None,
                max_per_minute: 20,
            }),
        });
        match h.engine.create_job(spec).await.unwrap_err() {
            OtaError::Invalid { field, .. } => assert_eq!(field, "rate.ramp.every_seconds"),
            e => panic!("{e}"),
        }
    }
    assert!(matches!(
        h.engine.create_job(h.spec("fw-nope")).await.unwrap_err(),
        OtaError::FirmwareNotFound(_)
    ));
}

#[tokio::test]
async fn offline_device_is_pushed_after_it_connects() {
    let h = H::new().await;
    h.devices(1, "1.0").await;
    let fid = h.firmware("2.0", true).await;
    let jid = h.engine.create_job(h.spec(&fid)).await.unwrap().job.job_id;
    let t = h.engine.get_task(&jid, "dev-0000").unwrap();
    assert_eq!(
        (t.status, t.queue_reason),
        (TaskStatus::Queued, Some(QueueReason::Offline))
    );
    h.advance(60_000).await;
    assert_eq!(h.pusher.total(), 0);
    h.connect("dev-0000").await;
    h.engine.run_due().await;
    assert_eq!(h.pusher.total(), 0, "waits for the device to subscribe");
    // A version report says the device is ready: the push goes at once.
    h.report("dev-0000", "1.0").await;
    h.engine.run_due().await;
    assert_eq!(h.pusher.total(), 1);
    assert_eq!(h.status(&jid, "dev-0000"), TaskStatus::Notified);
}

#[tokio::test]
async fn offline_device_is_pushed_after_the_connect_delay() {
    let h = H::new().await;
    h.devices(1, "1.0").await;
    let fid = h.firmware("2.0", true).await;
    let jid = h.engine.create_job(h.spec(&fid)).await.unwrap().job.job_id;
    h.connect("dev-0000").await;
    h.advance(999).await;
    assert_eq!(h.pusher.total(), 0);
    h.advance(1).await;
    assert_eq!(h.pusher.total(), 1);
    // Reconnecting before any progress re-pushes (the push may have been lost); after
    // progress it does not.
    h.disconnect("dev-0000");
    h.connect("dev-0000").await;
    h.advance(1_000).await;
    assert_eq!(h.pusher.total(), 2);
    assert_eq!(h.engine.get_task(&jid, "dev-0000").unwrap().pushes, 2);
    h.progress("dev-0000", 10).await;
    h.disconnect("dev-0000");
    h.connect("dev-0000").await;
    h.advance(5_000).await;
    assert_eq!(h.pusher.total(), 2);
}

#[tokio::test]
async fn timeout_and_stall_fail_with_timeout_and_are_never_retried() {
    let h = H::new().await;
    h.devices(2, "1.0").await;
    h.connect("dev-0000").await;
    h.connect("dev-0001").await;
    let fid = h.firmware("2.0", true).await;
    let mut spec = h.spec(&fid);
    spec.timeout_seconds = Some(60);
    spec.stall_seconds = Some(20);
    spec.retry_count = Some(3);
    spec.retry_interval_seconds = Some(0);
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    h.engine.run_due().await;
    h.progress("dev-0000", 1).await;
    h.progress("dev-0001", 1).await;
    // dev-0000 keeps reporting (no stall) but never finishes: TIMEOUT at 60 s.
    for _ in 0..5 {
        h.advance(10_000).await;
        h.progress("dev-0000", 50).await;
    }
    // dev-0001 went silent: stall after 20 s.
    let t1 = h.engine.get_task(&jid, "dev-0001").unwrap();
    assert_eq!(t1.status, TaskStatus::Failed);
    assert_eq!(t1.failure, Some(FailureReason::Timeout));
    assert!(t1.failure_detail.unwrap().contains("stalled"));
    assert_eq!(h.status(&jid, "dev-0000"), TaskStatus::InProgress);
    h.advance(10_000).await;
    let t0 = h.engine.get_task(&jid, "dev-0000").unwrap();
    assert_eq!(t0.failure, Some(FailureReason::Timeout));
    assert_eq!(t0.retries_used, 0, "TIMEOUT is never retried");
    assert!(h
        .metrics
        .encode()
        .contains("fleetgate_ota_timeouts_total 2"));
    assert_eq!(
        h.engine.get_job(&jid).unwrap().job.status,
        JobStatus::Completed
    );
}

#[tokio::test]
async fn each_failure_code_is_kept_and_retries_back_off() {
    let h = H::new().await;
    h.devices(4, "1.0").await;
    for i in 0..4 {
        h.connect(&format!("dev-{i:04}")).await;
    }
    let fid = h.firmware("2.0", true).await;
    let jid = h.engine.create_job(h.spec(&fid)).await.unwrap().job.job_id;
    h.engine.run_due().await;
    for (i, code) in FailureCode::ALL.iter().enumerate() {
        h.progress(&format!("dev-{i:04}"), i64::from(code.code()))
            .await;
    }
    let stats = h.engine.job_statistics(&jid).unwrap();
    for code in FailureCode::ALL {
        assert_eq!(stats.failures.get(code.as_str()), Some(&1), "{code}");
    }
    let t = h.engine.get_task(&jid, "dev-0001").unwrap();
    assert_eq!(t.failure_code, Some(-2));
    assert_eq!(stats.success_rate, Some(0.0));
}

#[tokio::test]
async fn retry_then_success_and_retry_exhausted() {
    let h = H::new().await;
    h.devices(2, "1.0").await;
    h.connect("dev-0000").await;
    h.connect("dev-0001").await;
    let fid = h.firmware("2.0", true).await;
    let mut spec = h.spec(&fid);
    spec.retry_count = Some(2);
    spec.retry_interval_seconds = Some(60);
    spec.retry_backoff = Some(2.0);
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    h.engine.run_due().await;
    assert_eq!(h.pusher.total(), 2);
    // dev-0000: fails once, then succeeds on the retry.
    h.progress("dev-0000", 20).await;
    h.progress("dev-0000", -2).await;
    let t = h.engine.get_task(&jid, "dev-0000").unwrap();
    assert_eq!(
        t.status,
        TaskStatus::InProgress,
        "visible state kept during the retry"
    );
    assert_eq!(t.next_retry_at_ms, Some(T0 + 60_000));
    h.advance(59_999).await;
    assert_eq!(h.pusher.pushes_to("dev-0000"), 1);
    h.advance(1).await;
    assert_eq!(
        h.pusher.pushes_to("dev-0000"),
        2,
        "re-pushed at the retry time"
    );
    h.progress("dev-0000", 50).await;
    h.report("dev-0000", "2.0").await;
    assert_eq!(h.status(&jid, "dev-0000"), TaskStatus::Succeeded);

    // dev-0001: wrong version, then failures until the retries run out (60 s, then 120 s).
    h.progress("dev-0001", 10).await;
    h.report("dev-0001", "9.9").await;
    let t = h.engine.get_task(&jid, "dev-0001").unwrap();
    assert_eq!(t.retries_used, 1);
    h.advance(60_000).await;
    assert_eq!(h.pusher.pushes_to("dev-0001"), 2);
    h.progress("dev-0001", -4).await;
    let t = h.engine.get_task(&jid, "dev-0001").unwrap();
    assert_eq!(
        t.next_retry_at_ms,
        Some(h.clock.now_ms() + 120_000),
        "backoff doubles"
    );
    h.advance(120_000).await;
    assert_eq!(h.pusher.pushes_to("dev-0001"), 3);
    h.progress("dev-0001", -1).await;
    let t = h.engine.get_task(&jid, "dev-0001").unwrap();
    assert_eq!(t.status, TaskStatus::Failed);
    assert_eq!(t.failure, Some(FailureReason::UpdateFailed));
    assert_eq!(t.retries_used, 2);
    let history = t.history.unwrap();
    assert!(
        history
            .iter()
            .filter(|h| h.event == "retry_scheduled")
            .count()
            == 2
    );
    assert!(history
        .last()
        .unwrap()
        .reason
        .as_deref()
        .unwrap()
        .contains("retries exhausted"));
    assert_eq!(h.engine.job_statistics(&jid).unwrap().retries, 3);
}

#[tokio::test]
async fn push_rate_is_honoured_with_its_burst() {
    let h = H::new().await;
    h.connected_devices(200, "1.0").await;
    let fid = h.firmware("2.0", true).await;
    let spec = h.spec_at_rate(&fid, 60, Some(5));
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    h.engine.run_due().await;
    assert_eq!(h.pusher.total(), 5, "the burst");
    let t = h.engine.get_task(&jid, "dev-0100").unwrap();
    assert_eq!(t.queue_reason, Some(QueueReason::RateLimited));
    // One minute in 250 ms steps: 60 more.
    for _ in 0..240 {
        h.advance(250).await;
    }
    let n = h.pusher.total();
    assert!((64..=66).contains(&n), "{n} pushes in the first minute");
    assert_eq!(
        h.engine.get_job(&jid).unwrap().current_rate_per_minute,
        Some(60.0)
    );
}

#[tokio::test]
async fn ramp_grows_the_rate_by_successes() {
    let h = H::new().await;
    let names = h.devices(100, "1.0").await;
    for dn in &names {
        lock(&h.pusher.connected).insert(dn.clone());
    }
    let fid = h.firmware("2.0", true).await;
    let mut spec = h.spec(&fid);
    spec.rate = Some(RateSpec {
        per_minute: 6,
        burst: Some(1),
        ramp: Some(RampSpec {
            factor: 10.0_f64.min(5.0),
            every_seconds: None,
            every_succeeded: Some(2),
            max_per_minute: 600,
        }),
    });
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    h.engine.run_due().await;
    assert_eq!(h.pusher.total(), 1);
    h.advance(10_000).await;
    assert_eq!(h.pusher.total(), 2);
    h.report("dev-0000", "2.0").await;
    h.report("dev-0001", "2.0").await;
    // Two successes: 6 → 30 per minute (one per 2 s).
    assert_eq!(
        h.engine.get_job(&jid).unwrap().current_rate_per_minute,
        Some(30.0)
    );
    h.advance(2_000).await;
    h.advance(2_000).await;
    h.advance(2_000).await;
    let n = h.pusher.total();
    assert!((4..=5).contains(&n), "{n}");
}

#[tokio::test]
async fn cancel_static_cancels_everything_dynamic_only_stops_the_policy() {
    let h = H::new().await;
    h.devices(2, "1.0").await;
    h.connect("dev-0000").await;
    let fid = h.firmware("2.0", true).await;
    let static_job = h.engine.create_job(h.spec(&fid)).await.unwrap().job.job_id;
    h.engine.run_due().await;
    h.progress("dev-0000", 5).await;
    let v = h.engine.cancel_job(&static_job, false).await.unwrap();
    assert_eq!(v.job.status, JobStatus::Canceled);
    assert_eq!(v.counters.canceled, 2, "IN_PROGRESS included for STATIC");
    assert!(
        h.engine.cancel_job(&static_job, false).await.is_err(),
        "twice is a conflict"
    );

    let fid3 = h.firmware("3.0", true).await;
    let mut spec = h.spec(&fid3);
    spec.selection = Selection::Dynamic;
    let dynamic = h.engine.create_job(spec).await.unwrap().job.job_id;
    h.engine.run_due().await;
    h.progress("dev-0000", 5).await;
    let v = h.engine.cancel_job(&dynamic, false).await.unwrap();
    assert_eq!(v.job.status, JobStatus::Canceled);
    assert!(!v.job.dynamic_active);
    assert_eq!(
        h.status(&dynamic, "dev-0000"),
        TaskStatus::InProgress,
        "in-flight tasks continue"
    );
    assert_eq!(h.status(&dynamic, "dev-0001"), TaskStatus::Queued);
    // The offline device still gets its push when it connects; new devices do not join.
    h.connect("dev-0001").await;
    h.advance(1_000).await;
    assert_eq!(h.status(&dynamic, "dev-0001"), TaskStatus::Notified);
    h.device("dev-new", Some("1.0"), &[]).await;
    h.connect("dev-new").await;
    assert!(h.engine.get_task(&dynamic, "dev-new").is_err());

    // A second DYNAMIC job canceled with cancel_in_progress.
    let fid4 = h.firmware("4.0", true).await;
    let mut spec = h.spec(&fid4);
    spec.selection = Selection::Dynamic;
    spec.overwrite = true;
    spec.target = TargetKind::Specific;
    spec.device_names = vec!["dev-new".into()];
    let d2 = h.engine.create_job(spec).await.unwrap().job.job_id;
    h.engine.run_due().await;
    h.advance(1_000).await;
    h.progress("dev-new", 1).await;
    let v = h.engine.cancel_job(&d2, true).await.unwrap();
    assert_eq!(v.counters.canceled, 1);
}

#[tokio::test]
async fn dynamic_jobs_take_devices_that_come_to_match() {
    let h = H::new().await;
    h.devices(1, "1.0").await;
    h.device("late-1", Some("0.5"), &[]).await;
    let fid = h.firmware("2.0", true).await;
    let mut spec = h.spec(&fid);
    spec.selection = Selection::Dynamic;
    spec.src_versions = Some(vec!["1.0".into()]);
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    assert_eq!(h.engine.get_job(&jid).unwrap().counters.total, 1);
    // "late" reaches a source version: it joins.
    h.report("late-1", "1.0").await;
    assert_eq!(h.status(&jid, "late-1"), TaskStatus::Queued);
    // A new device connecting with a source version joins too.
    h.device("newcomer", Some("1.0"), &[]).await;
    h.connect("newcomer").await;
    assert_eq!(h.engine.get_job(&jid).unwrap().counters.total, 3);
    // The job never completes by itself while the policy runs.
    for dn in ["dev-0000", "late-1", "newcomer"] {
        h.report(dn, "2.0").await;
    }
    assert_eq!(
        h.engine.get_job(&jid).unwrap().job.status,
        JobStatus::InProgress
    );
}

#[tokio::test]
async fn confirm_flow() {
    let h = H::new().await;
    h.devices(2, "1.0").await;
    h.connect("dev-0000").await;
    let fid = h.firmware("2.0", true).await;
    let mut spec = h.spec(&fid);
    spec.need_confirm = true;
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    h.engine.run_due().await;
    assert_eq!(h.pusher.total(), 0);
    assert_eq!(h.status(&jid, "dev-0000"), TaskStatus::Confirm);
    // Pull does not bypass confirmation.
    assert!(h
        .engine
        .pending_upgrade(&h.pk, "dev-0000", "default")
        .await
        .is_none());
    assert_eq!(
        h.engine
            .confirm(&jid, Some(&["dev-0000".into()]))
            .await
            .unwrap(),
        1
    );
    h.engine.run_due().await;
    assert_eq!(h.pusher.total(), 1);
    assert_eq!(h.status(&jid, "dev-0001"), TaskStatus::Confirm);
    assert_eq!(h.engine.confirm(&jid, None).await.unwrap(), 1);
    let t = h.engine.get_task(&jid, "dev-0001").unwrap();
    assert_eq!(t.queue_reason, Some(QueueReason::Offline));
    assert!(matches!(
        h.engine
            .confirm(&jid, Some(&["ghost".into()]))
            .await
            .unwrap_err(),
        OtaError::Invalid { .. }
    ));
}

#[tokio::test]
async fn overwrite_and_conflict_between_jobs() {
    let h = H::new().await;
    h.devices(2, "1.0").await;
    h.connect("dev-0000").await;
    let fid2 = h.firmware("2.0", true).await;
    let first = h.engine.create_job(h.spec(&fid2)).await.unwrap().job.job_id;
    h.engine.run_due().await;
    h.progress("dev-0000", 10).await; // IN_PROGRESS: never overwritten
    let fid3 = h.firmware("3.0", true).await;
    // Without overwrite: both conflict.
    let second = h.engine.create_job(h.spec(&fid3)).await.unwrap();
    assert_eq!(second.counters.failed, 2);
    assert_eq!(second.job.status, JobStatus::Completed);
    let t = h.engine.get_task(&second.job.job_id, "dev-0001").unwrap();
    assert_eq!(t.failure, Some(FailureReason::Conflict));
    // With overwrite: the QUEUED task is replaced, the IN_PROGRESS one still conflicts.
    let mut spec = h.spec(&fid3);
    spec.overwrite = true;
    let third = h.engine.create_job(spec).await.unwrap().job.job_id;
    assert_eq!(
        h.engine.get_task(&first, "dev-0001").unwrap().failure,
        Some(FailureReason::Overwritten)
    );
    assert_eq!(h.status(&third, "dev-0001"), TaskStatus::Queued);
    assert_eq!(
        h.engine.get_task(&third, "dev-0000").unwrap().failure,
        Some(FailureReason::Conflict)
    );
    assert_eq!(h.status(&first, "dev-0000"), TaskStatus::InProgress);
    let jobs = h.engine.jobs_by_device(&h.pk, "dev-0001", Page::default());
    assert_eq!(jobs.total, 3);
}

#[tokio::test]
async fn abort_rule_cancels_after_the_failure_threshold() {
    let h = H::new().await;
    let names = h.devices(10, "1.0").await;
    for dn in &names {
        h.connect(dn).await;
    }
    let fid = h.firmware("2.0", true).await;
    let mut spec = h.spec(&fid);
    spec.rate = Some(RateSpec {
        per_minute: 60,
        burst: Some(4),
        ramp: None,
    });
    spec.abort = Some(AbortSpec {
        min_finished: 3,
        failure_percent: 50.0,
        failure_reasons: vec![FailureReason::DownloadFailed],
        action: AbortAction::Cancel,
    });
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    h.advance(1_000).await;
    let pushed = h.engine.task_devices(&jid, &[TaskStatus::Notified]);
    assert_eq!(pushed.len(), 4);
    h.report(&pushed[0], "2.0").await;
    h.progress(&pushed[1], -2).await;
    assert_eq!(
        h.engine.get_job(&jid).unwrap().job.status,
        JobStatus::InProgress,
        "below min_finished"
    );
    h.progress(&pushed[2], 5).await;
    h.progress(&pushed[2], -2).await;
    let v = h.engine.get_job(&jid).unwrap();
    assert_eq!(v.job.status, JobStatus::Canceled);
    assert!(v.job.status_reason.unwrap().contains("abort rule"));
    // Not yet pushed tasks failed ABORTED; the NOTIFIED one too.
    assert_eq!(v.counters.failed, 2 + 7);
    assert_eq!(
        h.engine.get_task(&jid, &pushed[3]).unwrap().failure,
        Some(FailureReason::Aborted)
    );
}

#[tokio::test]
async fn abort_rule_can_pause_and_resume() {
    let h = H::new().await;
    let names = h.devices(4, "1.0").await;
    for dn in &names {
        h.connect(dn).await;
    }
    let fid = h.firmware("2.0", true).await;
    let mut spec = h.spec(&fid);
    spec.rate = Some(RateSpec {
        per_minute: 60,
        burst: Some(1),
        ramp: None,
    });
    spec.abort = Some(AbortSpec {
        min_finished: 1,
        failure_percent: 100.0,
        failure_reasons: vec![],
        action: AbortAction::Pause,
    });
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    h.engine.run_due().await;
    h.progress("dev-0000", -3).await;
    assert_eq!(
        h.engine.get_job(&jid).unwrap().job.status,
        JobStatus::Paused
    );
    h.advance(10_000).await;
    assert_eq!(h.pusher.total(), 1, "paused: no pushes");
    h.engine.set_paused(&jid, false).await.unwrap();
    h.advance(1_000).await;
    assert_eq!(h.pusher.total(), 2);
}

#[tokio::test]
async fn pull_mode_delivers_the_pending_upgrade() {
    let h = H::new().await;
    h.devices(1, "1.0").await;
    let fid = h.firmware("2.0", true).await;
    let jid = h.engine.create_job(h.spec(&fid)).await.unwrap().job.job_id;
    assert!(h
        .engine
        .pending_upgrade(&h.pk, "dev-0000", "other")
        .await
        .is_none());
    let data = h
        .engine
        .pending_upgrade(&h.pk, "dev-0000", "default")
        .await
        .unwrap();
    assert_eq!(data.version, "2.0");
    let t = h.engine.get_task(&jid, "dev-0000").unwrap();
    assert_eq!(t.status, TaskStatus::Notified);
    assert_eq!(t.history.unwrap().last().unwrap().event, "pulled");
    assert_eq!(h.pusher.total(), 0, "the reply is the delivery");
    // Asking again returns the same package without a state change.
    assert!(h
        .engine
        .pending_upgrade(&h.pk, "dev-0000", "default")
        .await
        .is_some());
    // One delivery, counted once: in the job's statistics and as a pull.
    assert_eq!(h.engine.job_statistics(&jid).unwrap().pushes, 1);
    let metrics = h.metrics.encode();
    assert!(
        metrics.contains(r#"fleetgate_ota_pushes_total{kind="pull"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"fleetgate_ota_pushes_total{kind="push"} 0"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_pull_gets_nothing_while_a_retry_waits_nor_after_the_task_ended() {
    let h = H::new().await;
    h.devices(2, "1.0").await;
    let fid = h.firmware("2.0", true).await;
    let mut spec = h.spec(&fid);
    spec.retry_count = Some(1);
    spec.retry_interval_seconds = Some(60);
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    for dn in ["dev-0000", "dev-0001"] {
        assert!(h
            .engine
            .pending_upgrade(&h.pk, dn, "default")
            .await
            .is_some());
        h.progress(dn, 10).await;
    }
    // A wrong version: the attempt failed, a retry waits (the visible status stays).
    h.report("dev-0000", "1.5").await;
    let t = h.engine.get_task(&jid, "dev-0000").unwrap();
    assert_eq!(t.status, TaskStatus::InProgress);
    assert!(t.next_retry_at_ms.is_some());
    assert!(
        h.engine
            .pending_upgrade(&h.pk, "dev-0000", "default")
            .await
            .is_none(),
        "a pull during the retry wait would start an attempt whose reports are ignored"
    );
    // The retry comes due: the task's data is handed out again.
    h.advance(61_000).await;
    assert!(h
        .engine
        .pending_upgrade(&h.pk, "dev-0000", "default")
        .await
        .is_some());
    // The same wrong version again: retries used up, failed for good: nothing to pull.
    h.progress("dev-0000", 10).await;
    h.report("dev-0000", "1.5").await;
    let t = h.engine.get_task(&jid, "dev-0000").unwrap();
    assert_eq!(
        (t.status, t.failure),
        (TaskStatus::Failed, Some(FailureReason::WrongVersion))
    );
    assert!(h
        .engine
        .pending_upgrade(&h.pk, "dev-0000", "default")
        .await
        .is_none());
    // A device that succeeded has nothing pending either.
    h.report("dev-0001", "2.0").await;
    assert!(h
        .engine
        .pending_upgrade(&h.pk, "dev-0001", "default")
        .await
        .is_none());
}

#[tokio::test]
async fn targets_gray_tag_specific_and_source_filter() {
    let h = H::new().await;
    for i in 0..20 {
        let region = if i % 2 == 0 { "eu" } else { "us" };
        h.device(
            &format!("dv{i:02}"),
            Some(if i < 15 { "1.0" } else { "0.1" }),
            &[("region", region)],
        )
        .await;
    }
    h.device("at-target", Some("2.0"), &[("region", "eu")])
        .await;
    let fid = h.firmware("2.0", true).await;
    let mut spec = h.spec(&fid);
    spec.target = TargetKind::Gray;
    spec.gray_percent = Some(50.0);
    let v = h.engine.create_job(spec).await.unwrap();
    assert_eq!(
        v.counters.total, 10,
        "ceil(20 × 50%), the device at the target excluded"
    );
    h.engine.cancel_job(&v.job.job_id, true).await.unwrap();

    let mut spec = h.spec(&fid);
    spec.target = TargetKind::Tag;
    spec.target_tags = vec![TagFilter {
        key: "region".into(),
        value: Some("eu".into()),
    }];
    spec.src_versions = Some(vec!["1.0".into()]);
    let v = h.engine.create_job(spec).await.unwrap();
    assert_eq!(v.counters.total, 8, "eu devices dv00..dv14 even");
    h.engine.cancel_job(&v.job.job_id, true).await.unwrap();

    let mut spec = h.spec(&fid);
    spec.target = TargetKind::Specific;
    spec.device_names = vec!["dv01".into(), "nope-nope".into()];
    match h.engine.create_job(spec).await.unwrap_err() {
        OtaError::Invalid { field, .. } => assert_eq!(field, "device_names[1]"),
        e => panic!("{e}"),
    }
}

#[tokio::test]
async fn verify_job_marks_the_package() {
    let h = H::new().await;
    h.devices(2, "1.0").await;
    h.connect("dev-0000").await;
    h.connect("dev-0001").await;
    let fid = h.firmware("2.0", false).await;
    let mut spec = h.spec(&fid);
    spec.job_type = JobType::VerifyFirmware;
    spec.target = TargetKind::Specific;
    spec.device_names = vec!["dev-0000".into(), "dev-0001".into()];
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    assert_eq!(
        h.firmware.get(&fid).unwrap().status,
        FirmwareStatus::Verifying
    );
    h.engine.run_due().await;
    h.report("dev-0000", "2.0").await;
    h.report("dev-0001", "2.0").await;
    assert_eq!(
        h.engine.get_job(&jid).unwrap().job.status,
        JobStatus::Completed
    );
    assert_eq!(
        h.firmware.get(&fid).unwrap().status,
        FirmwareStatus::Verified
    );
    // Now an upgrade job needs no force.
    assert!(h.engine.create_job(h.spec(&fid)).await.is_ok());

    let bad = h.firmware("3.0", false).await;
    let mut spec = h.spec(&bad);
    spec.job_type = JobType::VerifyFirmware;
    spec.target = TargetKind::Specific;
    spec.device_names = vec!["dev-0000".into()];
    spec.overwrite = true;
    h.engine.create_job(spec).await.unwrap();
    h.advance(1_000).await;
    h.progress("dev-0000", -3).await;
    assert_eq!(
        h.firmware.get(&bad).unwrap().status,
        FirmwareStatus::VerifyFailed
    );
}

#[tokio::test]
async fn schedule_and_finish_by() {
    let h = H::new().await;
    h.devices(2, "1.0").await;
    h.connect("dev-0000").await;
    let fid = h.firmware("2.0", true).await;
    let mut spec = h.spec(&fid);
    spec.start_at_ms = Some(T0 + 3_600_000);
    spec.finish_by_ms = Some(T0 + 7_200_000);
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    let v = h.engine.get_job(&jid).unwrap();
    assert_eq!(v.job.status, JobStatus::Planned);
    let t = h.engine.get_task(&jid, "dev-0000").unwrap();
    assert_eq!(t.queue_reason, Some(QueueReason::Scheduled));
    assert_eq!(t.scheduled_at_ms, Some(T0 + 3_600_000));
    h.advance(3_599_999).await;
    assert_eq!(h.pusher.total(), 0);
    h.advance(1).await;
    assert_eq!(
        h.engine.get_job(&jid).unwrap().job.status,
        JobStatus::InProgress
    );
    assert_eq!(h.pusher.total(), 1);
    assert_eq!(
        h.engine.get_task(&jid, "dev-0001").unwrap().queue_reason,
        Some(QueueReason::Offline)
    );
    h.advance(3_600_000).await;
    let v = h.engine.get_job(&jid).unwrap();
    assert_eq!(v.counters.canceled, 2, "not started by finish_by: canceled");
    assert_eq!(v.job.status, JobStatus::Completed);
}

#[tokio::test]
async fn restart_resumes_timers_and_does_not_push_twice() {
    let mut h = H::new().await;
    let names = h.devices(6, "1.0").await;
    for dn in &names {
        h.connect(dn).await;
    }
    let fid = h.firmware("2.0", true).await;
    let mut spec = h.spec(&fid);
    spec.timeout_seconds = Some(600);
    spec.retry_count = Some(1);
    spec.retry_interval_seconds = Some(300);
    spec.rate = Some(RateSpec {
        per_minute: 60,
        burst: Some(3),
        ramp: None,
    });
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    h.engine.run_due().await;
    assert_eq!(h.pusher.total(), 3);
    h.progress("dev-0000", 10).await; // timeout at +600 s
    h.progress("dev-0001", -2).await; // retry at +300 s
    h.progress("dev-0002", 40).await; // a coalesced update only
    h.progress("dev-0002", 41).await;
    h.restart().await;
    h.engine.run_due().await;
    assert_eq!(
        h.pusher.total(),
        3,
        "nothing re-pushed by the restart itself"
    );
    assert_eq!(
        h.engine.get_task(&jid, "dev-0002").unwrap().progress,
        Some(41),
        "coalesced progress was flushed"
    );
    // The bucket remembers the burst: one more slot after a second, not three at once.
    for dn in &names {
        h.connect(dn).await;
    }
    h.report("dev-0003", "1.0").await;
    h.report("dev-0004", "1.0").await;
    h.advance(1_000).await;
    let after = h.pusher.total();
    assert!((4..=5).contains(&after), "{after}: rate after restart");
    // The retry fires at its persisted time, the timeout at its own.
    h.advance(300_000).await;
    assert!(h.pusher.pushes_to("dev-0001") >= 2);
    h.advance(300_000).await;
    let t = h.engine.get_task(&jid, "dev-0000").unwrap();
    assert_eq!(t.failure, Some(FailureReason::Timeout));
    let counters = h.engine.get_job(&jid).unwrap().counters;
    assert_eq!(counters.total, 6, "no task lost");
}

#[tokio::test]
async fn a_crash_keeps_every_noted_transition_and_its_timers() {
    let mut h = H::new().await;
    h.devices(3, "1.0").await;
    for dn in ["dev-0000", "dev-0001", "dev-0002"] {
        h.connect(dn).await;
    }
    let fid = h.firmware("2.0", true).await;
    let mut spec = h.spec(&fid);
    spec.stall_seconds = Some(120);
    spec.retry_count = Some(1);
    spec.retry_interval_seconds = Some(60);
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    h.engine.run_due().await;
    h.progress("dev-0000", 10).await; // noted (durable before the call returns)
    h.progress("dev-0000", 70).await; // coalesced: lost in a crash, harmlessly
    h.progress("dev-0001", -2).await; // retry at +60 s
    h.crash();
    let t0 = h.engine.get_task(&jid, "dev-0000").unwrap();
    assert_eq!(t0.status, TaskStatus::InProgress);
    assert_eq!(t0.progress, Some(10));
    let t1 = h.engine.get_task(&jid, "dev-0001").unwrap();
    assert_eq!(t1.next_retry_at_ms, Some(T0 + 60_000));
    assert_eq!(h.status(&jid, "dev-0002"), TaskStatus::Notified);
    // The retry re-pushes when due, though the device is offline now: deferred to its connect.
    h.advance(60_000).await;
    assert!(h
        .engine
        .get_task(&jid, "dev-0001")
        .unwrap()
        .history
        .unwrap()
        .iter()
        .any(|e| e.event == "push_deferred"));
    let before = h.pusher.pushes_to("dev-0001");
    h.connect("dev-0001").await;
    h.report("dev-0001", "1.0").await;
    assert_eq!(h.pusher.pushes_to("dev-0001"), before + 1);
    // The stall deadline comes from the persisted last progress.
    h.advance(60_000).await;
    let t0 = h.engine.get_task(&jid, "dev-0000").unwrap();
    assert_eq!(t0.failure, Some(FailureReason::Timeout));
}

#[tokio::test]
async fn version_distribution_and_firmware_statistics() {
    let h = H::new().await;
    h.devices(3, "1.0").await;
    h.device("dev-x", Some("2.0"), &[]).await;
    h.device("dev-y", None, &[]).await;
    let d = h.engine.version_distribution(&h.pk, "default").unwrap();
    assert_eq!(d.total_devices, 5);
    assert_eq!(d.unknown, 1);
    assert_eq!(d.versions[0].version, "1.0");
    assert_eq!(d.versions[0].devices, 3);
    let fid = h.firmware("2.0", true).await;
    h.engine.create_job(h.spec(&fid)).await.unwrap();
    let s = h.engine.firmware_statistics(&fid);
    assert_eq!(s.jobs, 1);
    assert_eq!(
        s.stats.counters.total, 4,
        "the device at the target is not a task"
    );
    assert!(h.engine.firmware_in_use(&fid));
}

#[tokio::test]
async fn deleting_a_device_cancels_its_unfinished_tasks_and_lets_the_job_complete() {
    let mut h = H::new().await;
    h.devices(4, "1.0").await;
    for dn in ["dev-0000", "dev-0001", "dev-0002"] {
        h.connect(dn).await;
    }
    let fid = h.firmware("2.0", true).await;
    let mut spec = h.spec(&fid);
    spec.timeout_seconds = Some(600);
    spec.retry_count = Some(2);
    spec.retry_interval_seconds = Some(60);
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    h.engine.run_due().await;
    assert_eq!(h.pusher.total(), 3);
    h.progress("dev-0000", 10).await; // IN_PROGRESS, timeout armed
    h.progress("dev-0001", -2).await; // a retry pending
    h.report("dev-0002", "2.0").await; // SUCCEEDED: stays as history
                                       // dev-0003 is offline: QUEUED (OFFLINE).
    let mut events = h.engine.subscribe_events();
    for dn in ["dev-0000", "dev-0001", "dev-0002", "dev-0003"] {
        h.registry.delete_device(&h.pk, dn).await.unwrap();
    }
    // Done when delete_device returns (the registry awaits its observers).
    for dn in ["dev-0000", "dev-0001", "dev-0003"] {
        let t = h.engine.get_task(&jid, dn).unwrap();
        assert_eq!(t.status, TaskStatus::Canceled, "{dn}");
        let last = t.history.unwrap().last().cloned().unwrap();
        assert_eq!(last.event, "canceled");
        assert!(
            last.reason
                .as_deref()
                .unwrap()
                .starts_with("DEVICE_DELETED"),
            "{last:?}"
        );
    }
    assert_eq!(h.status(&jid, "dev-0002"), TaskStatus::Succeeded);
    let view = h.engine.get_job(&jid).unwrap();
    assert_eq!((view.counters.canceled, view.counters.succeeded), (3, 1));
    assert_eq!(
        view.job.status,
        JobStatus::Completed,
        "not waiting for devices that no longer exist"
    );
    let mut reasons = Vec::new();
    while let Ok(e) = events.try_recv() {
        // The registry no longer knows the device; the event still names its instance (so the
        // forwarder can route it to that instance's consumer groups).
        assert_eq!(e.instance_id.as_deref(), Some("default"), "{e:?}");
        reasons.push((e.device_name, e.to_state, e.reason.unwrap_or_default()));
    }
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons
        .iter()
        .all(|(_, s, r)| *s == TaskStatus::Canceled && r.starts_with("DEVICE_DELETED")));
    // No retry, re-push or timeout ever fires for them.
    h.advance(3_600_000).await;
    assert_eq!(h.pusher.total(), 3);
    assert_eq!(h.status(&jid, "dev-0000"), TaskStatus::Canceled);
    // Persisted like any transition.
    h.restart().await;
    h.engine.run_due().await;
    let view = h.engine.get_job(&jid).unwrap();
    assert_eq!(view.counters.canceled, 3);
    assert_eq!(view.job.status, JobStatus::Completed);
    assert_eq!(h.pusher.total(), 3);
}

#[tokio::test]
async fn tasks_of_a_device_deleted_just_before_a_crash_end_at_start() {
    let mut h = H::new().await;
    h.devices(2, "1.0").await;
    let fid = h.firmware("2.0", true).await;
    let jid = h.engine.create_job(h.spec(&fid)).await.unwrap().job.job_id;
    // The registry's delete committed, the crash came before the engine heard of it.
    h.registry
        .store()
        .submit(vec![Op::DeleteDevice {
            product_key: h.pk.clone(),
            device_name: "dev-0001".into(),
        }])
        .await
        .unwrap();
    h.crash();
    // start() cancels them in the background.
    for _ in 0..1_000 {
        if h.status(&jid, "dev-0001") == TaskStatus::Canceled {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(h.status(&jid, "dev-0001"), TaskStatus::Canceled);
    assert_eq!(h.status(&jid, "dev-0000"), TaskStatus::Queued);
    let counters = h.engine.get_job(&jid).unwrap().counters;
    assert_eq!((counters.canceled, counters.queued), (1, 1));
}

#[tokio::test]
async fn dynamic_jobs_take_new_devices_and_devices_whose_tags_come_to_match() {
    let h = H::new().await;
    h.device("dev-a", Some("1.0"), &[("site", "berlin")]).await;
    h.device("elsewhere", Some("1.0"), &[("site", "paris")])
        .await;
    let fid = h.firmware("2.0", true).await;
    let mut spec = h.spec(&fid);
    spec.target = TargetKind::Tag;
    spec.target_tags = vec![TagFilter {
        key: "site".into(),
        value: Some("berlin".into()),
    }];
    let mut static_spec = spec.clone();
    spec.selection = Selection::Dynamic;
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    let members = |jid: &str| {
        let mut m: Vec<String> = h
            .engine
            .list_tasks(jid, None, Page::default())
            .unwrap()
            .items
            .into_iter()
            .map(|t| t.device_name)
            .collect();
        m.sort();
        m
    };
    assert_eq!(members(&jid), ["dev-a"]);

    // A device created after the job with a matching tag joins at once, QUEUED (OFFLINE).
    h.device("dev-b", None, &[("site", "berlin")]).await;
    let t = h.engine.get_task(&jid, "dev-b").unwrap();
    assert_eq!(
        (t.status, t.queue_reason),
        (TaskStatus::Queued, Some(QueueReason::Offline))
    );
    // A batch create too (one row does not match).
    let rows = ["dev-c1", "dev-c2", "dev-c3"]
        .iter()
        .map(|dn| NewDevice {
            device_name: dn.to_string(),
            device_secret: None,
            tags: if *dn == "dev-c3" {
                BTreeMap::new()
            } else {
                BTreeMap::from([("site".to_owned(), "berlin".to_owned())])
            },
        })
        .collect();
    h.registry.batch_create_devices(&h.pk, rows).await.unwrap();
    assert_eq!(members(&jid), ["dev-a", "dev-b", "dev-c1", "dev-c2"]);
    // Tags that come to match.
    h.registry
        .update_device(
            &h.pk,
            "elsewhere",
            crate::registry::DeviceUpdate {
                enabled: None,
                tags: Some(BTreeMap::from([("site".into(), "berlin".into())])),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        members(&jid),
        ["dev-a", "dev-b", "dev-c1", "dev-c2", "elsewhere"]
    );
    // The newcomer is pushed when it connects, after the connect delay.
    h.connect("dev-b").await;
    h.engine.run_due().await;
    assert_eq!(h.pusher.pushes_to("dev-b"), 0);
    h.advance(1_000).await;
    assert_eq!(h.pusher.pushes_to("dev-b"), 1);

    // A STATIC job never takes devices after its creation.
    h.device("dev-z0", Some("1.0"), &[("zone", "x")]).await;
    let fid3 = h.firmware("3.0", true).await;
    static_spec.firmware_id = fid3;
    static_spec.target_tags = vec![TagFilter {
        key: "zone".into(),
        value: None,
    }];
    let sid = h.engine.create_job(static_spec).await.unwrap().job.job_id;
    h.device("dev-z1", Some("1.0"), &[("zone", "x")]).await;
    assert_eq!(members(&sid), ["dev-z0"]);

    // z0 comes to match the DYNAMIC job while its STATIC task is unfinished: skipped (no
    // CONFLICT for DYNAMIC jobs). Once that task ended it joins when it connects — and its
    // push waits for the connect delay like every first push after a connect.
    h.registry
        .update_device(
            &h.pk,
            "dev-z0",
            crate::registry::DeviceUpdate {
                enabled: None,
                tags: Some(BTreeMap::from([("site".into(), "berlin".into())])),
            },
        )
        .await
        .unwrap();
    assert!(h.engine.get_task(&jid, "dev-z0").is_err());
    h.engine
        .cancel_tasks(&sid, &["dev-z0".to_owned()], false)
        .await
        .unwrap();
    h.connect("dev-z0").await;
    assert_eq!(h.status(&jid, "dev-z0"), TaskStatus::Queued);
    h.engine.run_due().await;
    assert_eq!(
        h.pusher.pushes_to("dev-z0"),
        0,
        "waits for the device to subscribe"
    );
    h.advance(1_000).await;
    assert_eq!(h.pusher.pushes_to("dev-z0"), 1);
}

/// What a standby engine relayed.
#[derive(Default)]
struct FakeRelay {
    reports: Mutex<Vec<DeviceReport>>,
}

impl Relay for FakeRelay {
    fn forward(
        &self,
        report: DeviceReport,
    ) -> futures_util::future::BoxFuture<'_, Option<fleetgate_topics::UpgradeData>> {
        lock(&self.reports).push(report);
        Box::pin(async { None })
    }
}

/// A second node's engine in standby on `store` (the harness's store, or a fenced handle of it),
/// with the harness's registry, firmware, pusher and clock.
fn standby(h: &H, store: Store, metrics: Arc<Metrics>, relay: Arc<FakeRelay>) -> OtaEngine {
    OtaEngine::open_standby(
        h.registry.clone(),
        store,
        h.firmware.clone(),
        h.pusher.clone(),
        h.clock.clone(),
        EngineConfig::default(),
        metrics,
        relay,
    )
}

fn gauge_total(metrics: &Metrics) -> i64 {
    TaskStatus::ALL
        .iter()
        .map(|s| {
            metrics
                .ota_tasks
                .get_or_create(&[("state", s.as_str())])
                .get()
        })
        .sum()
}

#[tokio::test]
async fn a_standby_engine_relays_reports_and_takes_over_the_campaign_when_activated() {
    let h = H::new().await;
    h.devices(2, "1.0").await;
    h.connect("dev-0000").await;
    h.connect("dev-0001").await;
    let fid = h.firmware("2.0", true).await;
    let jid = h.engine.create_job(h.spec(&fid)).await.unwrap().job.job_id;
    h.engine.run_due().await;
    assert_eq!(h.pusher.total(), 2);
    h.progress("dev-0000", 30).await;

    // Cluster mode: a second node's engine, in standby on the same store.
    let relay = Arc::new(FakeRelay::default());
    let metrics = Arc::new(Metrics::new());
    let standby = standby(
        &h,
        h.registry.store().clone(),
        metrics.clone(),
        relay.clone(),
    );
    assert!(!standby.driving());
    assert!(
        standby.get_task(&jid, "dev-0000").is_err(),
        "standby is empty"
    );
    standby
        .on_progress(&h.pk, "dev-0000", "default", ProgressStep::Percent(60))
        .await;
    assert!(standby
        .pending_upgrade(&h.pk, "dev-0001", "default")
        .await
        .is_none());
    // Connects and version reports are not relayed: the driving node applies them from the
    // change feed (`cluster::receiver`), so a follower's ingest never waits for it.
    standby.device_online(&h.pk, "dev-0001").await;
    standby
        .on_version(&h.pk, "dev-0001", "default", "1.0")
        .await;
    assert_eq!(
        *lock(&relay.reports),
        vec![
            DeviceReport::Progress {
                pk: h.pk.clone(),
                dn: "dev-0000".into(),
                module: "default".into(),
                step: ProgressStep::Percent(60),
            },
            DeviceReport::FirmwareGet {
                pk: h.pk.clone(),
                dn: "dev-0001".into(),
                module: "default".into(),
            },
        ]
    );
    // A report relayed to a node that does not drive the engine changes nothing.
    let report = DeviceReport::Progress {
        pk: h.pk.clone(),
        dn: "dev-0000".into(),
        module: "default".into(),
        step: ProgressStep::Percent(70),
    };
    assert!(standby.handle_report(report.clone()).await.is_none());

    // The first node loses the lease: it stops and empties; nothing of it fires any more.
    h.engine.deactivate().await;
    assert!(!h.engine.driving());
    assert!(h.engine.get_task(&jid, "dev-0000").is_err());
    assert_eq!(gauge_total(&h.metrics), 0, "its tasks left the gauge");
    assert_eq!(h.engine.run_due().await, 0);

    // dev-0001 upgraded while nobody drove the engine (its report reached no holder).
    h.registry
        .report_version(&h.pk, "dev-0001", "default", "2.0", T0)
        .await
        .unwrap();
    standby.activate().await.unwrap();
    assert!(standby.driving());
    assert_eq!(
        standby.get_task(&jid, "dev-0000").unwrap().status,
        TaskStatus::InProgress,
        "loaded from the store"
    );
    assert_eq!(
        standby.get_task(&jid, "dev-0001").unwrap().status,
        TaskStatus::Succeeded,
        "reconciled with the registry's version"
    );
    assert_eq!(gauge_total(&metrics), 2);
    // Relayed reports now apply here.
    assert!(standby.handle_report(report).await.is_none());
    assert_eq!(
        standby.get_task(&jid, "dev-0000").unwrap().progress,
        Some(70)
    );
    let done = DeviceReport::Version {
        pk: h.pk.clone(),
        dn: "dev-0000".into(),
        module: "default".into(),
        version: "2.0".into(),
    };
    h.registry
        .report_version(&h.pk, "dev-0000", "default", "2.0", T0)
        .await
        .unwrap();
    standby.handle_report(done).await;
    assert_eq!(
        standby.get_task(&jid, "dev-0000").unwrap().status,
        TaskStatus::Succeeded
    );
    assert_eq!(h.pusher.total(), 2, "no push repeated by the takeover");
}

/// First pushes of `jid` per whole minute since `from` (from the tasks' `notified_at_ms`).
fn first_pushes_per_minute(engine: &OtaEngine, jid: &str, from: i64, minutes: i64) -> Vec<usize> {
    let tasks = engine
        .list_tasks(
            jid,
            None,
            Page {
                page: 1,
                page_size: 10_000,
            },
        )
        .unwrap()
        .items;
    (0..minutes)
        .map(|m| {
            let (a, b) = (from + m * 60_000, from + (m + 1) * 60_000);
            tasks
                .iter()
                .filter_map(|t| t.notified_at_ms)
                .filter(|&t| a <= t && t < b)
                .count()
        })
        .collect()
}

#[tokio::test]
async fn a_takeover_after_a_pause_still_pushes_the_minutes_rate() {
    // 60/min, default burst (1); the engine driving it stops 30 s into the first minute and
    // the next one takes over 13 s later (a dead holder's default lease: 10 s, plus a third,
    // plus the load).
    let h = H::new().await;
    h.connected_devices(200, "1.0").await;
    let fid = h.firmware("2.0", true).await;
    let spec = h.spec_at_rate(&fid, 60, None);
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    h.engine.run_due().await;
    let first = h.clock.now_ms();
    for _ in 0..120 {
        h.advance(250).await;
    }
    h.engine.deactivate().await;
    h.clock.advance_ms(13_000);

    let next = standby(
        &h,
        h.registry.store().clone(),
        Arc::new(Metrics::new()),
        Arc::default(),
    );
    next.activate().await.unwrap();
    // Two more minutes on the new engine.
    while h.clock.now_ms() < first + 3 * 60_000 {
        h.clock.advance_ms(250);
        next.run_due().await;
    }
    let minutes = first_pushes_per_minute(&next, &jid, first, 3);
    // The minute of the takeover made up its pause; none pushed more than the rate (+ burst).
    for (m, &n) in minutes.iter().enumerate() {
        assert!(
            (57..=61).contains(&n),
            "minute {} pushed {n}, not 60 ± 5% (every minute: {minutes:?})",
            m + 1
        );
    }
    assert_eq!(
        h.pusher.total(),
        minutes.iter().sum::<usize>(),
        "one push per task"
    );
}

#[test]
fn catch_up_owes_the_current_minutes_missed_pushes_only() {
    use crate::ota::rate::catch_up;
    let t0 = 1_000_000;
    // One a second from t0 to t0 + 30 s, then nothing until t0 + 43 s.
    let pushes: Vec<i64> = (0..=30).map(|s| t0 + s * 1_000).collect();
    // 43 allowed so far this minute, 31 pushed, 1 the bucket grants itself.
    assert_eq!(
        catch_up(&pushes, 60.0, 1, t0, t0 + 43_000),
        Some((11, t0 + 60_000))
    );
    // The job resumed at +40 s: only the 3 s since then count.
    assert_eq!(
        catch_up(&pushes, 60.0, 1, t0 + 40_000, t0 + 43_000),
        Some((2, t0 + 60_000))
    );
    // A pause across the minute's end: only the new minute's part is owed.
    assert_eq!(
        catch_up(&pushes, 60.0, 1, t0, t0 + 65_000),
        Some((4, t0 + 120_000))
    );
    // At the pace, or before any push: nothing.
    assert_eq!(catch_up(&pushes, 60.0, 1, t0, t0 + 31_500), None);
    assert_eq!(catch_up(&[], 60.0, 1, t0, t0 + 31_500), None);
}

#[tokio::test]
async fn a_device_whose_connect_the_push_pass_missed_is_not_left_offline() {
    // The push pass looks at a device just before its connect is visible, and queues its task
    // OFFLINE after the connect was told to the engine (which found the task waiting for its
    // push and left it alone): the task must not wait for a connect that already happened.
    let h = H::new().await;
    h.devices(2, "1.0").await;
    h.connect("dev-0000").await;
    h.connect("dev-0001").await;
    let fid = h.firmware("2.0", true).await;
    let mut spec = h.spec(&fid);
    spec.rate = Some(RateSpec {
        per_minute: 60,
        burst: Some(1),
        ramp: None,
    });
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    h.engine.run_due().await;
    assert_eq!(h.pusher.total(), 1, "the burst");
    // dev-0001 reconnects; the engine hears of it while its task waits for the rate.
    h.disconnect("dev-0001");
    h.connect("dev-0001").await;
    lock(&h.pusher.unseen_once).insert("dev-0001".into());
    // Its slot and its connect delay: +1 s, when the pass does not see it connected.
    for _ in 0..4 {
        h.advance(250).await;
    }
    let t = h.engine.get_task(&jid, "dev-0001").unwrap();
    assert_eq!(
        (t.status, t.queue_reason),
        (TaskStatus::Queued, Some(QueueReason::RateLimited)),
        "queued for a push again: {t:?}"
    );
    h.advance(1_000).await;
    assert_eq!(
        h.pusher.pushes_to("dev-0001"),
        1,
        "pushed after the connect delay"
    );
    assert_eq!(h.status(&jid, "dev-0001"), TaskStatus::Notified);
}

#[tokio::test]
async fn a_report_relayed_to_a_node_whose_term_ended_is_not_applied_there() {
    let h = H::new().await;
    h.devices(1, "1.0").await;
    h.connect("dev-0000").await;
    let fid = h.firmware("2.0", true).await;
    let mut spec = h.spec(&fid);
    spec.retry_count = Some(1);
    spec.retry_interval_seconds = Some(60);
    let jid = h.engine.create_job(spec).await.unwrap().job.job_id;
    h.engine.run_due().await;
    let failed = DeviceReport::Progress {
        pk: h.pk.clone(),
        dn: "dev-0000".into(),
        module: "default".into(),
        step: ProgressStep::Failed(FailureCode::DownloadFailed),
    };

    // A node that drives the engine through a fenced store handle, whose term ends (the fence
    // is cleared at once; the engine stops a moment later).
    let fence = Arc::new(crate::store::FenceSlot::default());
    fence.set(Some(("engines", 1, 1)));
    let holder = standby(
        &h,
        h.registry.store().fenced(fence.clone()),
        Arc::new(Metrics::new()),
        Arc::default(),
    );
    h.engine.deactivate().await;
    holder.activate().await.unwrap();
    fence.set(None);
    assert!(holder.driving());
    assert_eq!(
        holder.handle_relayed(failed.clone()).await,
        Handled::NotApplied,
        "the failure was not stored: the sender must ask the next holder"
    );
    holder.deactivate().await;
    assert_eq!(
        holder.handle_relayed(failed.clone()).await,
        Handled::NotApplied,
        "not the holder"
    );

    // The next holder applies it.
    h.engine.activate().await.unwrap();
    assert_eq!(
        h.engine.handle_relayed(failed).await,
        Handled::Applied(None)
    );
    let t = h.engine.get_task(&jid, "dev-0000").unwrap();
    assert_eq!(t.retries_used, 1, "{t:?}");
}
