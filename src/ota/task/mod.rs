//! The per-device upgrade task state machine, as a pure function.
//!
//! [`transition`] takes a task's [`TaskState`], its job's [`TaskPolicy`], one [`Event`] and
//! the current time, and returns either the next state with the [`Effect`]s the engine must
//! carry out (and a history [`Note`]), or [`Ignored`] with the reason the event does not apply.
//! It does no I/O and reads no clock, so every (state, event) pair is unit-tested
//! (`task/tests.rs`) and every timer is a pure function of persisted timestamps
//! ([`next_deadline`]): after a restart the engine recomputes the same deadlines. The types it
//! works on (statuses, reasons, [`TaskState`], [`TaskPolicy`]) are in `state.rs`.
//!
//! # States (Alibaba's names, docs/DESIGN.md §4)
//!
//! | status | meaning | leaves by |
//! |---|---|---|
//! | CONFIRM | waits for an operator | confirm → QUEUED; cancel; overwrite; abort |
//! | QUEUED (OFFLINE, SCHEDULED, RATE_LIMITED) | push not sent yet | pushed → NOTIFIED; target version reported → SUCCEEDED (nothing to push); cancel; overwrite; abort |
//! | NOTIFIED | push delivered, no progress yet | progress ≥ 0 → IN_PROGRESS; target version → SUCCEEDED; failure code → retry or FAILED; cancel; overwrite; abort |
//! | IN_PROGRESS | the device reports progress | target version → SUCCEEDED; failure code / wrong version → retry or FAILED; timeout / stall → FAILED(TIMEOUT); forced cancel |
//! | any unfinished | — | device deleted → CANCELED (history reason `DEVICE_DELETED`) |
//! | SUCCEEDED, FAILED, CANCELED | terminal: every event is ignored | — |
//!
//! # Retries
//!
//! A device failure (progress -1..-4) or a wrong version, while retries are left, keeps the
//! visible status (NOTIFIED or IN_PROGRESS, as the vendor does) and arms `retry_at_ms` =
//! now + interval × backoff^(n-1) (capped) + deterministic jitter. When it is due the attempt
//! counter grows, the attempt's timers reset and a re-push becomes due (`repush_at_ms`). While
//! a retry is pending, progress and failure reports of the failed attempt are ignored; the
//! target version still means SUCCEEDED. TIMEOUT (including a stall), cancel, overwrite and
//! abort are never retried.
//!
//! # Timers
//!
//! - timeout: `first_progress_at_ms + timeout` of the current attempt (IN_PROGRESS only);
//! - stall: `max(last_progress_at_ms, attempt_started_at_ms) + stall` (IN_PROGRESS only) —
//!   counts as TIMEOUT with the detail "stalled";
//! - retry: `retry_at_ms`; re-push: `repush_at_ms` (set by a due retry, or by the device coming
//!   online while the current attempt's push may have been lost).

mod state;

pub(crate) use state::splitmix;
pub use state::{FailureReason, QueueReason, RetryPolicy, TaskPolicy, TaskState, TaskStatus};

use fleetgate_topics::ProgressStep;

/// One input of the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// An operator confirmed the task; `queue` is where it waits now (OFFLINE or RATE_LIMITED).
    Confirm { queue: QueueReason },
    /// The engine moved a QUEUED task to another queue reason (job started, device went away).
    Queue(QueueReason),
    /// The first push of the task is about to be published (or the device pulled it).
    Pushed,
    /// A due re-push of the current attempt is about to be published.
    Repushed,
    /// A re-push was due but the device is offline: push when it connects.
    PushDeferred,
    /// The device connected.
    DeviceOnline,
    /// The device reported progress for `module`.
    Progress { module: &'a str, step: ProgressStep },
    /// The device reported `version` of `module`.
    Version { module: &'a str, version: &'a str },
    /// A deadline of this task may be due (stale deadlines are ignored).
    Deadline,
    /// Cancel; `force` also cancels an IN_PROGRESS task.
    Cancel { force: bool },
    /// A later job with `overwrite` takes the device.
    Overwrite,
    /// The job's abort rule fired.
    Abort,
    /// The device was deleted: the task ends CANCELED whatever its state (IN_PROGRESS too —
    /// no device will ever report again).
    DeviceDeleted,
}

/// History reason of a task canceled because its device was deleted.
pub const DEVICE_DELETED: &str = "DEVICE_DELETED";

impl Event<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Event::Confirm { .. } => "confirm",
            Event::Queue(_) => "queue",
            Event::Pushed => "pushed",
            Event::Repushed => "repushed",
            Event::PushDeferred => "push_deferred",
            Event::DeviceOnline => "device_online",
            Event::Progress { .. } => "progress",
            Event::Version { .. } => "version",
            Event::Deadline => "deadline",
            Event::Cancel { .. } => "cancel",
            Event::Overwrite => "overwrite",
            Event::Abort => "abort",
            Event::DeviceDeleted => "device_deleted",
        }
    }
}

/// What the engine must do after persisting the new state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The task entered its job's push queue.
    Enqueue,
    /// The task left its job's push queue.
    Dequeue,
    /// Publish the upgrade message to the device now (after the state is durable).
    Deliver,
    /// The task reached a terminal status.
    Finished,
}

/// The name of a history entry, and of the [`TaskEvent`](crate::ota::TaskEvent) it emits.
/// Stored and shown as [`HistoryEvent::as_str`] (`HistoryEntry::event`, the task event's
/// `event`): the engine matches on the variant, so a renamed string cannot silently stop a
/// counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HistoryEvent {
    /// The task was created (with its first status).
    Created,
    Confirmed,
    Queued,
    /// The upgrade was published to the device.
    Pushed,
    /// The upgrade was published again (retry, or a push the device may have missed).
    Repushed,
    /// The device asked for the upgrade (`firmware/get`) and got it in the reply.
    Pulled,
    /// A re-push was due while the device was offline.
    PushDeferred,
    RepushScheduled,
    ProgressStarted,
    RetryScheduled,
    Retrying,
    Succeeded,
    Failed,
    Canceled,
}

impl HistoryEvent {
    pub const ALL: [HistoryEvent; 14] = [
        HistoryEvent::Created,
        HistoryEvent::Confirmed,
        HistoryEvent::Queued,
        HistoryEvent::Pushed,
        HistoryEvent::Repushed,
        HistoryEvent::Pulled,
        HistoryEvent::PushDeferred,
        HistoryEvent::RepushScheduled,
        HistoryEvent::ProgressStarted,
        HistoryEvent::RetryScheduled,
        HistoryEvent::Retrying,
        HistoryEvent::Succeeded,
        HistoryEvent::Failed,
        HistoryEvent::Canceled,
    ];

    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            HistoryEvent::Created => "created",
            HistoryEvent::Confirmed => "confirmed",
            HistoryEvent::Queued => "queued",
            HistoryEvent::Pushed => "pushed",
            HistoryEvent::Repushed => "repushed",
            HistoryEvent::Pulled => "pulled",
            HistoryEvent::PushDeferred => "push_deferred",
            HistoryEvent::RepushScheduled => "repush_scheduled",
            HistoryEvent::ProgressStarted => "progress_started",
            HistoryEvent::RetryScheduled => "retry_scheduled",
            HistoryEvent::Retrying => "retrying",
            HistoryEvent::Succeeded => "succeeded",
            HistoryEvent::Failed => "failed",
            HistoryEvent::Canceled => "canceled",
        }
    }
}

impl std::fmt::Display for HistoryEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A history entry worth keeping (every state change, push, retry and failure; not every
/// progress percent). A transition without a note may be persisted lazily.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub event: HistoryEvent,
    pub reason: Option<String>,
}

/// The next state and what to do about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub state: TaskState,
    pub effects: Vec<Effect>,
    pub note: Option<Note>,
}

/// Why an event changed nothing (illegal in this state, stale, or for another module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ignored(pub &'static str);

fn note(event: HistoryEvent, reason: Option<String>) -> Option<Note> {
    Some(Note { event, reason })
}

/// The state machine. Pure: the result depends only on the arguments.
pub fn transition(
    state: &TaskState,
    policy: &TaskPolicy,
    event: Event<'_>,
    now: i64,
) -> Result<Transition, Ignored> {
    if state.status.is_terminal() {
        return Err(Ignored("task is finished"));
    }
    let mut s = state.clone();
    let mut effects = Vec::new();
    let mut n: Option<Note> = None;
    use TaskStatus as S;
    match event {
        Event::Confirm { queue } => {
            if s.status != S::Confirm {
                return Err(Ignored("not waiting for confirmation"));
            }
            s.status = S::Queued;
            s.queue_reason = Some(queue);
            n = note(HistoryEvent::Confirmed, None);
        }
        Event::Queue(reason) => {
            if s.status != S::Queued {
                return Err(Ignored("not queued"));
            }
            if s.queue_reason == Some(reason) {
                return Err(Ignored("already queued for that reason"));
            }
            s.queue_reason = Some(reason);
            if reason != QueueReason::Scheduled {
                s.scheduled_at_ms = None;
            }
            n = note(HistoryEvent::Queued, Some(reason.as_str().to_owned()));
        }
        Event::Pushed => {
            if s.status != S::Queued {
                return Err(Ignored("not queued"));
            }
            s.status = S::Notified;
            s.queue_reason = None;
            s.scheduled_at_ms = None;
            s.pushes += 1;
            s.attempt = 1;
            s.notified_at_ms = Some(now);
            s.attempt_started_at_ms = Some(now);
            effects.push(Effect::Deliver);
            n = note(HistoryEvent::Pushed, None);
        }
        Event::Repushed => {
            if !s.is_active() || !(s.repush_at_ms.is_some() || s.push_on_connect) {
                return Err(Ignored("no re-push pending"));
            }
            s.pushes += 1;
            s.repush_at_ms = None;
            s.push_on_connect = false;
            s.attempt_started_at_ms = Some(now);
            effects.push(Effect::Deliver);
            n = note(
                HistoryEvent::Repushed,
                Some(format!("attempt {}", s.attempt)),
            );
        }
        Event::PushDeferred => {
            if !s.is_active() || s.repush_at_ms.is_none() {
                return Err(Ignored("no re-push pending"));
            }
            s.repush_at_ms = None;
            s.push_on_connect = true;
            n = note(HistoryEvent::PushDeferred, Some("device offline".into()));
        }
        Event::DeviceOnline => match s.status {
            S::Queued if s.queue_reason == Some(QueueReason::Offline) => {
                s.queue_reason = Some(QueueReason::RateLimited);
                n = note(HistoryEvent::Queued, Some("device online".into()));
            }
            S::Notified | S::InProgress if s.push_on_connect || s.awaiting_first_progress() => {
                s.push_on_connect = false;
                s.repush_at_ms = Some(now + policy.connect_push_delay_ms.max(0));
                n = note(
                    HistoryEvent::RepushScheduled,
                    Some("device reconnected before starting".into()),
                );
            }
            _ => return Err(Ignored("nothing to do when the device connects")),
        },
        Event::Progress { module, step } => {
            if module != policy.module {
                return Err(Ignored("another module"));
            }
            if !s.is_active() {
                return Err(Ignored("not notified"));
            }
            if s.retry_at_ms.is_some() {
                return Err(Ignored("waiting for a retry"));
            }
            match step {
                ProgressStep::Percent(p) => {
                    let started = s.first_progress_at_ms.is_none();
                    let was = s.status;
                    s.status = S::InProgress;
                    s.first_progress_at_ms.get_or_insert(now);
                    s.last_progress_at_ms = Some(now);
                    s.progress = Some(p);
                    s.repush_at_ms = None;
                    s.push_on_connect = false;
                    if was != S::InProgress || started {
                        n = note(HistoryEvent::ProgressStarted, Some(format!("{p}%")));
                    }
                }
                ProgressStep::Failed(code) => {
                    let reason = FailureReason::from(code);
                    n = fail_or_retry(
                        &mut s,
                        policy,
                        reason,
                        format!("device reported {}", code.code()),
                        now,
                    );
                }
            }
        }
        Event::Version { module, version } => {
            if module != policy.module {
                return Err(Ignored("another module"));
            }
            if version == policy.dest_version {
                match s.status {
                    S::Queued | S::Notified | S::InProgress => {
                        let already = s.status == S::Queued;
                        s.status = S::Succeeded;
                        s.queue_reason = None;
                        s.scheduled_at_ms = None;
                        s.progress = Some(100);
                        s.finished_at_ms = Some(now);
                        s.clear_timers();
                        n = note(
                            HistoryEvent::Succeeded,
                            Some(if already {
                                format!("already at {version}")
                            } else {
                                format!("reported {version}")
                            }),
                        );
                    }
                    _ => return Err(Ignored("not confirmed yet")),
                }
            } else if s.status == S::InProgress
                && s.retry_at_ms.is_none()
                && s.src_version.as_deref() != Some(version)
                && !policy.src_versions.iter().any(|v| v == version)
            {
                n = fail_or_retry(
                    &mut s,
                    policy,
                    FailureReason::WrongVersion,
                    format!("reported {version}, expected {}", policy.dest_version),
                    now,
                );
            } else if s.is_active() && s.repush_at_ms.is_some_and(|t| t > now) {
                // The device is up and subscribed (SDKs report after subscribing): the re-push
                // waiting for the connect delay can go now.
                s.repush_at_ms = Some(now);
            } else {
                return Err(Ignored("not the target version"));
            }
        }
        Event::Deadline => {
            if let Some(at) = s.retry_at_ms.filter(|t| *t <= now) {
                let _ = at;
                s.retry_at_ms = None;
                s.attempt += 1;
                s.first_progress_at_ms = None;
                s.last_progress_at_ms = None;
                s.progress = None;
                s.repush_at_ms = Some(now);
                n = note(
                    HistoryEvent::Retrying,
                    Some(format!(
                        "attempt {} after {}",
                        s.attempt,
                        s.last_failure
                            .map(FailureReason::as_str)
                            .unwrap_or("failure")
                    )),
                );
            } else if s.status == S::InProgress && s.retry_at_ms.is_none() {
                let timeout_at = policy
                    .timeout_ms
                    .zip(s.first_progress_at_ms)
                    .map(|(t, first)| first + t);
                let stall_at = stall_at(&s, policy);
                if timeout_at.is_some_and(|t| t <= now) {
                    let secs = policy.timeout_ms.unwrap_or(0) / 1000;
                    finish_failed(
                        &mut s,
                        FailureReason::Timeout,
                        format!("no target version within {secs} s of the first progress"),
                        now,
                    );
                    n = note(
                        HistoryEvent::Failed,
                        Some(format!("TIMEOUT: no target version within {secs} s")),
                    );
                } else if stall_at.is_some_and(|t| t <= now) {
                    let secs = policy.stall_ms.unwrap_or(0) / 1000;
                    finish_failed(
                        &mut s,
                        FailureReason::Timeout,
                        format!("stalled: no progress for {secs} s"),
                        now,
                    );
                    n = note(
                        HistoryEvent::Failed,
                        Some(format!("TIMEOUT: stalled, no progress for {secs} s")),
                    );
                } else {
                    return Err(Ignored("not due"));
                }
            } else {
                return Err(Ignored("not due"));
            }
        }
        Event::Cancel { force } => {
            if s.status == S::InProgress && !force {
                return Err(Ignored("IN_PROGRESS is only canceled when forced"));
            }
            s.status = S::Canceled;
            s.queue_reason = None;
            s.scheduled_at_ms = None;
            s.finished_at_ms = Some(now);
            s.clear_timers();
            n = note(HistoryEvent::Canceled, None);
        }
        Event::DeviceDeleted => {
            s.status = S::Canceled;
            s.queue_reason = None;
            s.scheduled_at_ms = None;
            s.finished_at_ms = Some(now);
            s.clear_timers();
            n = note(
                HistoryEvent::Canceled,
                Some(format!("{DEVICE_DELETED}: the device was deleted")),
            );
        }
        Event::Overwrite | Event::Abort => {
            if s.status == S::InProgress {
                return Err(Ignored(
                    "an IN_PROGRESS task is never overwritten or aborted",
                ));
            }
            let (reason, detail) = if event == Event::Overwrite {
                (
                    FailureReason::Overwritten,
                    "replaced by a job with overwrite",
                )
            } else {
                (FailureReason::Aborted, "the job's abort rule fired")
            };
            finish_failed(&mut s, reason, detail.to_owned(), now);
            n = note(HistoryEvent::Failed, Some(format!("{reason}: {detail}")));
        }
    }
    s.updated_at_ms = now;
    if !state.is_ready() && s.is_ready() {
        effects.push(Effect::Enqueue);
    } else if state.is_ready() && !s.is_ready() {
        effects.push(Effect::Dequeue);
    }
    if s.status.is_terminal() {
        effects.push(Effect::Finished);
    }
    Ok(Transition {
        state: s,
        effects,
        note: n,
    })
}

fn stall_at(s: &TaskState, policy: &TaskPolicy) -> Option<i64> {
    let since = match (s.last_progress_at_ms, s.attempt_started_at_ms) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    policy.stall_ms.zip(since).map(|(stall, t)| t + stall)
}

fn finish_failed(s: &mut TaskState, reason: FailureReason, detail: String, now: i64) {
    s.status = TaskStatus::Failed;
    s.queue_reason = None;
    s.scheduled_at_ms = None;
    s.failure = Some(reason);
    s.failure_detail = Some(detail);
    s.finished_at_ms = Some(now);
    s.clear_timers();
}

fn fail_or_retry(
    s: &mut TaskState,
    policy: &TaskPolicy,
    reason: FailureReason,
    detail: String,
    now: i64,
) -> Option<Note> {
    if reason.retryable() && s.retries_used < policy.retry.count {
        s.retries_used += 1;
        let at = now + policy.retry.delay_ms(s.retries_used, s.seed);
        s.retry_at_ms = Some(at);
        s.repush_at_ms = None;
        s.push_on_connect = false;
        s.last_failure = Some(reason);
        s.failure_detail = Some(detail.clone());
        note(
            HistoryEvent::RetryScheduled,
            Some(format!(
                "{reason} ({detail}); retry {}/{} at {at}",
                s.retries_used, policy.retry.count
            )),
        )
    } else {
        let exhausted = reason.retryable() && policy.retry.count > 0;
        finish_failed(s, reason, detail.clone(), now);
        note(
            HistoryEvent::Failed,
            Some(if exhausted {
                format!("{reason} ({detail}); retries exhausted")
            } else {
                format!("{reason} ({detail})")
            }),
        )
    }
}

/// When this task next needs the deadline task (retry, re-push, timeout or stall); `None`
/// when only a device or an operator can move it.
pub fn next_deadline(s: &TaskState, policy: &TaskPolicy) -> Option<i64> {
    if s.status.is_terminal() {
        return None;
    }
    let mut next: Option<i64> = None;
    let mut consider = |t: Option<i64>| {
        if let Some(t) = t {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
    };
    consider(s.retry_at_ms);
    if s.is_active() {
        consider(s.repush_at_ms);
    }
    if s.status == TaskStatus::InProgress && s.retry_at_ms.is_none() {
        consider(
            policy
                .timeout_ms
                .zip(s.first_progress_at_ms)
                .map(|(t, f)| f + t),
        );
        consider(stall_at(s, policy));
    }
    next
}

#[cfg(test)]
mod tests;
