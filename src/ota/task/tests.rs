//! Exhaustive, table-driven tests of the pure task state machine: every (state, event) pair,
//! legal or not, with time injected as a plain number.

use super::*;
use fleetgate_topics::{FailureCode, ProgressStep};

const NOW: i64 = 10_000;

fn policy() -> TaskPolicy {
    TaskPolicy {
        module: "MCU".into(),
        dest_version: "2.0".into(),
        src_versions: vec!["1.0".into()],
        timeout_ms: Some(5_000),
        stall_ms: Some(3_000),
        retry: RetryPolicy {
            count: 2,
            interval_ms: 1_000,
            backoff: 1.0,
            max_interval_ms: 0,
            jitter_percent: 0,
        },
        connect_push_delay_ms: 500,
    }
}

fn base(status: TaskStatus) -> TaskState {
    TaskState::new(status, None, Some("0.9".into()), 42, 1_000)
}

fn queued(reason: QueueReason) -> TaskState {
    let mut s = TaskState::new(
        TaskStatus::Queued,
        Some(reason),
        Some("0.9".into()),
        42,
        1_000,
    );
    if reason == QueueReason::Scheduled {
        s.scheduled_at_ms = Some(20_000);
    }
    s
}

fn notified() -> TaskState {
    let mut s = base(TaskStatus::Notified);
    s.pushes = 1;
    s.attempt = 1;
    s.notified_at_ms = Some(9_000);
    s.attempt_started_at_ms = Some(9_000);
    s
}

fn in_progress(first: i64, last: i64) -> TaskState {
    let mut s = notified();
    s.status = TaskStatus::InProgress;
    s.notified_at_ms = Some(first - 500);
    s.attempt_started_at_ms = Some(first - 500);
    s.first_progress_at_ms = Some(first);
    s.last_progress_at_ms = Some(last);
    s.progress = Some(40);
    s
}

/// The states of the table, by column.
fn states() -> Vec<(&'static str, TaskState)> {
    let mut notir = notified();
    notir.retry_at_ms = Some(9_500);
    notir.retries_used = 1;
    notir.last_failure = Some(FailureReason::DownloadFailed);
    notir.attempt_started_at_ms = Some(8_000);

    let mut inpr = in_progress(5_000, 5_000);
    inpr.retry_at_ms = Some(20_000);
    inpr.retries_used = 1;

    let mut inpd = in_progress(5_000, 5_000);
    inpd.attempt = 2;
    inpd.retries_used = 1;
    inpd.first_progress_at_ms = None;
    inpd.last_progress_at_ms = None;
    inpd.attempt_started_at_ms = Some(4_000);
    inpd.push_on_connect = true;

    let mut succ = base(TaskStatus::Succeeded);
    succ.finished_at_ms = Some(5_000);
    let failed =
        TaskState::failed_at_birth(FailureReason::DownloadFailed, "x".into(), None, 1, 5_000);
    let mut canc = base(TaskStatus::Canceled);
    canc.finished_at_ms = Some(5_000);

    vec![
        ("CONF", base(TaskStatus::Confirm)),
        ("QOFF", queued(QueueReason::Offline)),
        ("QSCH", queued(QueueReason::Scheduled)),
        ("QRL", queued(QueueReason::RateLimited)),
        ("NOTI", notified()),
        ("NOTIR", notir),
        // timeout at 14_000, stall at 12_900: nothing due
        ("INP", in_progress(9_000, 9_900)),
        // timeout at 9_000: due
        ("INPT", in_progress(4_000, 9_900)),
        // timeout at 11_000, stall at 9_500: stall due
        ("INPS", in_progress(6_000, 6_500)),
        ("INPR", inpr),
        ("INPD", inpd),
        ("SUCC", succ),
        ("FAIL", failed),
        ("CANC", canc),
    ]
}

fn events() -> Vec<(&'static str, Event<'static>)> {
    vec![
        (
            "confirm",
            Event::Confirm {
                queue: QueueReason::RateLimited,
            },
        ),
        ("queue_off", Event::Queue(QueueReason::Offline)),
        ("queue_rl", Event::Queue(QueueReason::RateLimited)),
        ("pushed", Event::Pushed),
        ("repushed", Event::Repushed),
        ("deferred", Event::PushDeferred),
        ("online", Event::DeviceOnline),
        (
            "prog50",
            Event::Progress {
                module: "MCU",
                step: ProgressStep::Percent(50),
            },
        ),
        (
            "prog100",
            Event::Progress {
                module: "MCU",
                step: ProgressStep::Percent(100),
            },
        ),
        (
            "progfail",
            Event::Progress {
                module: "MCU",
                step: ProgressStep::Failed(FailureCode::DownloadFailed),
            },
        ),
        (
            "prog_wifi",
            Event::Progress {
                module: "WIFI",
                step: ProgressStep::Percent(50),
            },
        ),
        (
            "ver_target",
            Event::Version {
                module: "MCU",
                version: "2.0",
            },
        ),
        (
            "ver_src",
            Event::Version {
                module: "MCU",
                version: "1.0",
            },
        ),
        (
            "ver_own",
            Event::Version {
                module: "MCU",
                version: "0.9",
            },
        ),
        (
            "ver_wrong",
            Event::Version {
                module: "MCU",
                version: "3.3",
            },
        ),
        (
            "ver_wifi",
            Event::Version {
                module: "WIFI",
                version: "9.9",
            },
        ),
        ("deadline", Event::Deadline),
        ("cancel", Event::Cancel { force: false }),
        ("cancel_force", Event::Cancel { force: true }),
        ("overwrite", Event::Overwrite),
        ("abort", Event::Abort),
        ("dev_deleted", Event::DeviceDeleted),
    ]
}

/// Expected outcome per event (rows) and state (columns, in `states()` order). `-` means
/// ignored; otherwise the new status with markers: `+retry` (retry pending), `+repush`
/// (re-push due), `+defer` (push on connect), `+deliver` (publish now).
#[rustfmt::skip]
const TABLE: [(&str, [&str; 14]); 22] = [
    //                 CONF                QOFF                QSCH                QRL                 NOTI                NOTIR               INP                 INPT                INPS                INPR                INPD                SUCC FAIL CANC
    ("confirm",      ["Q.RL",             "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-", "-", "-"]),
    ("queue_off",    ["-",                "-",                "Q.OFF",            "Q.OFF",            "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-", "-", "-"]),
    ("queue_rl",     ["-",                "Q.RL",             "Q.RL",             "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-", "-", "-"]),
    ("pushed",       ["-",                "NOTI+deliver",     "NOTI+deliver",     "NOTI+deliver",     "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-", "-", "-"]),
    ("repushed",     ["-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "INP+deliver",      "-", "-", "-"]),
    ("deferred",     ["-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-", "-", "-"]),
    ("online",       ["-",                "Q.RL",             "-",                "-",                "NOTI+repush",      "-",                "-",                "-",                "-",                "-",                "INP+repush",       "-", "-", "-"]),
    ("prog50",       ["-",                "-",                "-",                "-",                "INP",              "-",                "INP",              "INP",              "INP",              "-",                "INP",              "-", "-", "-"]),
    ("prog100",      ["-",                "-",                "-",                "-",                "INP",              "-",                "INP",              "INP",              "INP",              "-",                "INP",              "-", "-", "-"]),
    ("progfail",     ["-",                "-",                "-",                "-",                "NOTI+retry",       "-",                "INP+retry",        "INP+retry",        "INP+retry",        "-",                "INP+retry",        "-", "-", "-"]),
    ("prog_wifi",    ["-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-", "-", "-"]),
    ("ver_target",   ["-",                "SUCC",             "SUCC",             "SUCC",             "SUCC",             "SUCC",             "SUCC",             "SUCC",             "SUCC",             "SUCC",             "SUCC",             "-", "-", "-"]),
    ("ver_src",      ["-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-", "-", "-"]),
    ("ver_own",      ["-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-", "-", "-"]),
    ("ver_wrong",    ["-",                "-",                "-",                "-",                "-",                "-",                "INP+retry",        "INP+retry",        "INP+retry",        "-",                "INP+retry",        "-", "-", "-"]),
    ("ver_wifi",     ["-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-",                "-", "-", "-"]),
    ("deadline",     ["-",                "-",                "-",                "-",                "-",                "NOTI+repush",      "-",                "FAIL:TIMEOUT",     "FAIL:TIMEOUT",     "-",                "FAIL:TIMEOUT",     "-", "-", "-"]),
    ("cancel",       ["CANC",             "CANC",             "CANC",             "CANC",             "CANC",             "CANC",             "-",                "-",                "-",                "-",                "-",                "-", "-", "-"]),
    ("cancel_force", ["CANC",             "CANC",             "CANC",             "CANC",             "CANC",             "CANC",             "CANC",             "CANC",             "CANC",             "CANC",             "CANC",             "-", "-", "-"]),
    ("overwrite",    ["FAIL:OVERWRITTEN", "FAIL:OVERWRITTEN", "FAIL:OVERWRITTEN", "FAIL:OVERWRITTEN", "FAIL:OVERWRITTEN", "FAIL:OVERWRITTEN", "-",                "-",                "-",                "-",                "-",                "-", "-", "-"]),
    ("abort",        ["FAIL:ABORTED",     "FAIL:ABORTED",     "FAIL:ABORTED",     "FAIL:ABORTED",     "FAIL:ABORTED",     "FAIL:ABORTED",     "-",                "-",                "-",                "-",                "-",                "-", "-", "-"]),
    ("dev_deleted",  ["CANC",             "CANC",             "CANC",             "CANC",             "CANC",             "CANC",             "CANC",             "CANC",             "CANC",             "CANC",             "CANC",             "-", "-", "-"]),
];

fn describe(t: &Transition) -> String {
    let s = &t.state;
    let mut out = match s.status {
        TaskStatus::Confirm => "CONF".to_owned(),
        TaskStatus::Queued => match s.queue_reason {
            Some(QueueReason::Offline) => "Q.OFF".to_owned(),
            Some(QueueReason::Scheduled) => "Q.SCH".to_owned(),
            Some(QueueReason::RateLimited) => "Q.RL".to_owned(),
            None => "Q.?".to_owned(),
        },
        TaskStatus::Notified => "NOTI".to_owned(),
        TaskStatus::InProgress => "INP".to_owned(),
        TaskStatus::Succeeded => "SUCC".to_owned(),
        TaskStatus::Failed => format!("FAIL:{}", s.failure.map(|f| f.as_str()).unwrap_or("?")),
        TaskStatus::Canceled => "CANC".to_owned(),
    };
    if s.retry_at_ms.is_some() {
        out.push_str("+retry");
    }
    if s.repush_at_ms.is_some() {
        out.push_str("+repush");
    }
    if s.push_on_connect {
        out.push_str("+defer");
    }
    if t.effects.contains(&Effect::Deliver) {
        out.push_str("+deliver");
    }
    out
}

#[test]
fn every_state_event_pair_matches_the_table() {
    let states = states();
    let events = events();
    assert_eq!(TABLE.len(), events.len(), "one row per event");
    let p = policy();
    let mut failures = Vec::new();
    for ((row_name, expected), (event_name, event)) in TABLE.iter().zip(&events) {
        assert_eq!(row_name, event_name, "table rows follow events()");
        for (want, (state_name, state)) in expected.iter().zip(&states) {
            let got = match transition(state, &p, *event, NOW) {
                Ok(t) => {
                    // Invariants of every applied transition.
                    assert_eq!(t.state.updated_at_ms, NOW);
                    assert_eq!(
                        t.effects.contains(&Effect::Finished),
                        t.state.status.is_terminal(),
                        "{state_name} × {event_name}"
                    );
                    if t.state.status.is_terminal() {
                        assert_eq!(t.state.finished_at_ms, Some(NOW));
                        assert_eq!(next_deadline(&t.state, &p), None);
                        assert!(t.note.is_some(), "a terminal change is always noted");
                    }
                    if t.state.status != state.status {
                        assert!(
                            t.note.is_some(),
                            "{state_name} × {event_name}: status changes are noted"
                        );
                    }
                    describe(&t)
                }
                Err(Ignored(why)) => {
                    assert!(!why.is_empty());
                    "-".to_owned()
                }
            };
            if got != *want {
                failures.push(format!(
                    "{state_name} × {event_name}: expected {want}, got {got}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn table_columns_cover_every_status() {
    let seen: std::collections::HashSet<TaskStatus> =
        states().iter().map(|(_, s)| s.status).collect();
    for status in TaskStatus::ALL {
        assert!(seen.contains(&status), "{status} has no column");
    }
    let reasons: std::collections::HashSet<Option<QueueReason>> = states()
        .iter()
        .filter(|(_, s)| s.status == TaskStatus::Queued)
        .map(|(_, s)| s.queue_reason)
        .collect();
    assert_eq!(reasons.len(), 3, "every queue reason has a column");
}

#[test]
fn failure_codes_stay_distinct_without_retries() {
    let mut p = policy();
    p.retry.count = 0;
    for code in FailureCode::ALL {
        for start in [notified(), in_progress(9_000, 9_900)] {
            let t = transition(
                &start,
                &p,
                Event::Progress {
                    module: "MCU",
                    step: ProgressStep::Failed(code),
                },
                NOW,
            )
            .unwrap();
            assert_eq!(t.state.status, TaskStatus::Failed);
            let reason = t.state.failure.unwrap();
            assert_eq!(reason.step_code(), Some(code.code()));
            assert_eq!(reason.as_str(), code.as_str());
        }
    }
}

#[test]
fn retry_keeps_visible_status_then_exhausts() {
    let mut p = policy();
    p.retry.count = 1;
    let s = notified();
    let fail = Event::Progress {
        module: "MCU",
        step: ProgressStep::Failed(FailureCode::WriteFailed),
    };
    // First failure: retry armed, still NOTIFIED.
    let t = transition(&s, &p, fail, NOW).unwrap();
    assert_eq!(t.state.status, TaskStatus::Notified);
    assert_eq!(t.state.retry_at_ms, Some(NOW + 1_000));
    assert_eq!(t.note.as_ref().unwrap().event.as_str(), "retry_scheduled");
    assert_eq!(next_deadline(&t.state, &p), Some(NOW + 1_000));
    // Not due yet: a deadline is ignored.
    assert!(transition(&t.state, &p, Event::Deadline, NOW + 999).is_err());
    // Due: a new attempt with a re-push due now.
    let t = transition(&t.state, &p, Event::Deadline, NOW + 1_000).unwrap();
    assert_eq!(t.state.attempt, 2);
    assert!(t.state.repush_due(NOW + 1_000));
    let t = transition(&t.state, &p, Event::Repushed, NOW + 1_001).unwrap();
    assert_eq!(t.effects, vec![Effect::Deliver]);
    assert_eq!(t.state.pushes, 2);
    assert_eq!(
        t.state.status,
        TaskStatus::Notified,
        "the vendor shows the pre-retry status"
    );
    // Second failure: no retries left.
    let t = transition(&t.state, &p, fail, NOW + 2_000).unwrap();
    assert_eq!(t.state.status, TaskStatus::Failed);
    assert_eq!(t.state.failure, Some(FailureReason::WriteFailed));
    assert!(t
        .note
        .unwrap()
        .reason
        .unwrap()
        .contains("retries exhausted"));
}

#[test]
fn retry_then_success_and_deferred_push() {
    let p = policy();
    let s = in_progress(9_000, 9_900);
    let t = transition(
        &s,
        &p,
        Event::Version {
            module: "MCU",
            version: "7.7",
        },
        NOW,
    )
    .unwrap();
    assert_eq!(t.state.last_failure, Some(FailureReason::WrongVersion));
    let t = transition(&t.state, &p, Event::Deadline, NOW + 1_000).unwrap();
    // Device offline at retry time: deferred until it connects.
    let t = transition(&t.state, &p, Event::PushDeferred, NOW + 1_000).unwrap();
    assert!(t.state.push_on_connect);
    assert_eq!(t.state.status, TaskStatus::InProgress);
    let t = transition(&t.state, &p, Event::DeviceOnline, NOW + 5_000).unwrap();
    assert_eq!(t.state.repush_at_ms, Some(NOW + 5_500));
    let t = transition(&t.state, &p, Event::Repushed, NOW + 5_500).unwrap();
    let t = transition(
        &t.state,
        &p,
        Event::Progress {
            module: "MCU",
            step: ProgressStep::Percent(10),
        },
        NOW + 6_000,
    )
    .unwrap();
    assert_eq!(
        t.state.first_progress_at_ms,
        Some(NOW + 6_000),
        "the timeout restarts per attempt"
    );
    let t = transition(
        &t.state,
        &p,
        Event::Version {
            module: "MCU",
            version: "2.0",
        },
        NOW + 7_000,
    )
    .unwrap();
    assert_eq!(t.state.status, TaskStatus::Succeeded);
    assert_eq!(t.state.retries_used, 1);
}

#[test]
fn progress_percent_updates_are_not_noted_but_the_first_is() {
    let p = policy();
    let t = transition(
        &notified(),
        &p,
        Event::Progress {
            module: "MCU",
            step: ProgressStep::Percent(5),
        },
        NOW,
    )
    .unwrap();
    assert_eq!(t.note.unwrap().event.as_str(), "progress_started");
    let t2 = transition(
        &t.state,
        &p,
        Event::Progress {
            module: "MCU",
            step: ProgressStep::Percent(50),
        },
        NOW + 10,
    )
    .unwrap();
    assert!(t2.note.is_none());
    assert_eq!(t2.state.progress, Some(50));
    assert_eq!(t2.state.first_progress_at_ms, Some(NOW));
    assert_eq!(t2.state.last_progress_at_ms, Some(NOW + 10));
}

#[test]
fn progress_100_is_not_success() {
    let p = policy();
    let t = transition(
        &notified(),
        &p,
        Event::Progress {
            module: "MCU",
            step: ProgressStep::Percent(100),
        },
        NOW,
    )
    .unwrap();
    assert_eq!(t.state.status, TaskStatus::InProgress);
    assert!(!t.effects.contains(&Effect::Finished));
}

#[test]
fn deadlines_follow_persisted_timestamps() {
    let p = policy();
    assert_eq!(
        next_deadline(&notified(), &p),
        None,
        "NOTIFIED has no timer (vendor semantics)"
    );
    // timeout 9_000 + 5_000, stall 9_900 + 3_000: the stall comes first.
    assert_eq!(next_deadline(&in_progress(9_000, 9_900), &p), Some(12_900));
    let mut no_stall = p.clone();
    no_stall.stall_ms = None;
    assert_eq!(
        next_deadline(&in_progress(9_000, 9_900), &no_stall),
        Some(14_000)
    );
    let mut none = no_stall.clone();
    none.timeout_ms = None;
    assert_eq!(next_deadline(&in_progress(9_000, 9_900), &none), None);
    assert_eq!(
        next_deadline(&queued(QueueReason::Scheduled), &p),
        None,
        "job-level schedule"
    );
}

#[test]
fn queue_transitions_maintain_the_push_queue() {
    let p = policy();
    let t = transition(&queued(QueueReason::Offline), &p, Event::DeviceOnline, NOW).unwrap();
    assert_eq!(t.effects, vec![Effect::Enqueue]);
    let t = transition(&t.state, &p, Event::Queue(QueueReason::Offline), NOW).unwrap();
    assert_eq!(t.effects, vec![Effect::Dequeue]);
    let t = transition(&queued(QueueReason::RateLimited), &p, Event::Pushed, NOW).unwrap();
    assert_eq!(t.effects, vec![Effect::Deliver, Effect::Dequeue]);
    let t = transition(
        &queued(QueueReason::RateLimited),
        &p,
        Event::Cancel { force: false },
        NOW,
    )
    .unwrap();
    assert_eq!(t.effects, vec![Effect::Dequeue, Effect::Finished]);
}

#[test]
fn backoff_and_jitter_are_bounded_and_deterministic() {
    let r = RetryPolicy {
        count: 5,
        interval_ms: 1_000,
        backoff: 2.0,
        max_interval_ms: 5_000,
        jitter_percent: 20,
    };
    let d: Vec<i64> = (1..=5).map(|n| r.delay_ms(n, 7)).collect();
    let bases = [1_000, 2_000, 4_000, 5_000, 5_000];
    for (got, base) in d.iter().zip(bases) {
        assert!(*got >= base && *got <= base + base / 5, "{got} vs {base}");
    }
    assert_eq!(d, (1..=5).map(|n| r.delay_ms(n, 7)).collect::<Vec<_>>());
    let other: Vec<i64> = (1..=5).map(|n| r.delay_ms(n, 8)).collect();
    assert_ne!(d, other, "different tasks spread out");
    let fixed = RetryPolicy {
        count: 2,
        interval_ms: 600_000,
        backoff: 1.0,
        max_interval_ms: 0,
        jitter_percent: 0,
    };
    assert_eq!(fixed.delay_ms(1, 1), 600_000);
    assert_eq!(fixed.delay_ms(2, 1), 600_000);
}

#[test]
fn status_and_reason_names_round_trip() {
    for s in TaskStatus::ALL {
        assert_eq!(TaskStatus::parse(s.as_str()), Some(s));
        assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
    }
    for r in FailureReason::ALL {
        assert_eq!(FailureReason::parse(r.as_str()), Some(r));
        assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
    }
    assert!(!FailureReason::Timeout.retryable());
    assert!(FailureReason::Timeout.device_caused());
    assert!(!FailureReason::Conflict.device_caused());
}

#[test]
fn a_deleted_device_cancels_even_in_progress_with_its_reason() {
    let p = policy();
    let mut retrying = in_progress(9_000, 9_900);
    retrying.retry_at_ms = Some(20_000);
    for start in [base(TaskStatus::Confirm), notified(), retrying] {
        let t = transition(&start, &p, Event::DeviceDeleted, NOW).unwrap();
        assert_eq!(t.state.status, TaskStatus::Canceled);
        assert_eq!(t.state.failure, None, "a cancel, not a failure");
        assert_eq!(next_deadline(&t.state, &p), None, "no retry, no re-push");
        let note = t.note.unwrap();
        assert_eq!(note.event.as_str(), "canceled");
        assert!(note.reason.unwrap().starts_with(DEVICE_DELETED));
    }
}

#[test]
fn history_event_names_are_the_stored_ones() {
    let names: Vec<&str> = HistoryEvent::ALL.iter().map(|e| e.as_str()).collect();
    assert_eq!(
        names,
        [
            "created",
            "confirmed",
            "queued",
            "pushed",
            "repushed",
            "pulled",
            "push_deferred",
            "repush_scheduled",
            "progress_started",
            "retry_scheduled",
            "retrying",
            "succeeded",
            "failed",
            "canceled",
        ],
        "stored task documents, the timeline API and forwarded task events carry these names"
    );
}
