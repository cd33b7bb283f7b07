//! The task state machine as a pure function (docs/DESIGN.md §6). No I/O, no clock: the engine asks
//! [`transition`] what a request or an event does and then performs it.
//!
//! ```text
//! TO_MIGRATE ─canary─► CANARY_IN_PROGRESS ─finished─► CANARY_COMPLETED ─full─► MIGRATING ─finished─► COMPLETED
//!     ▲                                                     │                  │pause ▲continue          │
//!     │                                                     │              PAUSED ─continue─► CONTINUE_MIGRATING ─finished─► COMPLETED
//!     │                                                     └── rollback (from CANARY_COMPLETED, MIGRATING, PAUSED, CONTINUE_MIGRATING)
//!     │                                                              ▼                                 rollback from COMPLETED
//!     ├──────────────finished── ROLLING_BACK ⇄ ROLLBACK_PAUSED                                                ▼
//!     └──────────────finished───────────────────────────────────────────────────────────────────────── BATCH_ROLLBACK (not pausable)
//! ```
//!
//! `halted` (a fault under `resume_mode` manual) is orthogonal to the state: a halted running
//! task stays in its state and only `continue` (or `pause`/`rollback` where the state allows
//! them) moves it on.

use super::model::TaskState;
use std::fmt;

/// What happens to a task: an operator's request or the engine's "work done".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    Canary,
    Full,
    Pause,
    Continue,
    Rollback,
    /// The running state's work is done (engine only).
    Finished,
}

impl Event {
    pub const ALL: [Event; 6] = [
        Event::Canary,
        Event::Full,
        Event::Pause,
        Event::Continue,
        Event::Rollback,
        Event::Finished,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Event::Canary => "canary",
            Event::Full => "full",
            Event::Pause => "pause",
            Event::Continue => "continue",
            Event::Rollback => "rollback",
            Event::Finished => "finished",
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused transition: what was asked, in which state, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {event} a migration task in state {state}: {why}")]
pub struct Refused {
    pub state: TaskState,
    pub event: Event,
    pub why: &'static str,
}

/// The outcome of an accepted transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub to: TaskState,
    /// The halt (if any) is cleared.
    pub clears_halt: bool,
}

/// The state after `event` in `state` (with the task `halted` or not), or why it is refused.
pub fn transition(state: TaskState, halted: bool, event: Event) -> Result<Transition, Refused> {
    use Event as E;
    use TaskState as S;
    let to = |to| {
        Ok(Transition {
            to,
            clears_halt: true,
        })
    };
    let refuse = |why| Err(Refused { state, event, why });
    match (state, event) {
        (S::ToMigrate, E::Canary) => to(S::CanaryInProgress),
        (S::CanaryCompleted, E::Full) => to(S::Migrating),
        (S::Migrating | S::ContinueMigrating, E::Pause) => to(S::Paused),
        (S::Paused, E::Continue) => to(S::ContinueMigrating),
        (S::RollingBack, E::Pause) => to(S::RollbackPaused),
        (S::RollbackPaused, E::Continue) => to(S::RollingBack),
        (S::CanaryCompleted | S::Migrating | S::Paused | S::ContinueMigrating, E::Rollback) => {
            to(S::RollingBack)
        }
        (S::Completed, E::Rollback) => to(S::BatchRollback),
        (S::CanaryInProgress, E::Finished) => to(S::CanaryCompleted),
        (S::Migrating | S::ContinueMigrating, E::Finished) => to(S::Completed),
        (S::RollingBack | S::BatchRollback, E::Finished) => to(S::ToMigrate),
        // A halted running task: `continue` resumes it where it stopped.
        (s, E::Continue) if halted && s.is_running() => to(s),

        (S::CanaryInProgress, E::Rollback) => {
            refuse("a canary in progress cannot be rolled back; wait for CANARY_COMPLETED")
        }
        (S::CanaryInProgress, E::Pause) => refuse("a canary cannot be paused"),
        (S::BatchRollback, E::Pause) => refuse("a batch rollback cannot be paused"),
        (S::ToMigrate, E::Full) => refuse("run a canary first"),
        (S::ToMigrate, E::Rollback) => refuse("nothing has been migrated"),
        (S::CanaryCompleted, E::Canary) => {
            refuse("the canary is done; start the full migration or roll back")
        }
        (_, E::Canary) => refuse("a canary starts only from TO_MIGRATE"),
        (_, E::Full) => refuse("full migration starts only from CANARY_COMPLETED"),
        (_, E::Pause) => refuse("only MIGRATING, CONTINUE_MIGRATING or ROLLING_BACK can be paused"),
        (_, E::Continue) => {
            refuse("only PAUSED, ROLLBACK_PAUSED or a task halted by a fault can be continued")
        }
        (S::RollingBack | S::RollbackPaused | S::BatchRollback, E::Rollback) => {
            refuse("a rollback is already under way")
        }
        (_, E::Finished) => refuse("no work is running"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskState as S;

    /// Every accepted (state, event) pair for a task that is not halted. Anything not listed
    /// must be refused.
    const ALLOWED: &[(S, Event, S)] = &[
        (S::ToMigrate, Event::Canary, S::CanaryInProgress),
        (S::CanaryInProgress, Event::Finished, S::CanaryCompleted),
        (S::CanaryCompleted, Event::Full, S::Migrating),
        (S::CanaryCompleted, Event::Rollback, S::RollingBack),
        (S::Migrating, Event::Pause, S::Paused),
        (S::Migrating, Event::Rollback, S::RollingBack),
        (S::Migrating, Event::Finished, S::Completed),
        (S::Paused, Event::Continue, S::ContinueMigrating),
        (S::Paused, Event::Rollback, S::RollingBack),
        (S::ContinueMigrating, Event::Pause, S::Paused),
        (S::ContinueMigrating, Event::Rollback, S::RollingBack),
        (S::ContinueMigrating, Event::Finished, S::Completed),
        (S::Completed, Event::Rollback, S::BatchRollback),
        (S::RollingBack, Event::Pause, S::RollbackPaused),
        (S::RollingBack, Event::Finished, S::ToMigrate),
        (S::RollbackPaused, Event::Continue, S::RollingBack),
        (S::BatchRollback, Event::Finished, S::ToMigrate),
    ];

    fn allowed(state: S, event: Event) -> Option<S> {
        ALLOWED
            .iter()
            .find(|(s, e, _)| *s == state && *e == event)
            .map(|(_, _, to)| *to)
    }

    #[test]
    fn every_state_and_event() {
        let mut accepted = 0;
        for state in S::ALL {
            for event in Event::ALL {
                let got = transition(state, false, event);
                match (allowed(state, event), got) {
                    (Some(want), Ok(t)) => {
                        assert_eq!(t.to, want, "{state} + {event}");
                        accepted += 1;
                    }
                    (None, Err(r)) => {
                        assert_eq!((r.state, r.event), (state, event));
                        let msg = r.to_string();
                        assert!(
                            msg.contains(state.as_str()),
                            "the refusal names the state: {msg}"
                        );
                    }
                    (want, got) => panic!("{state} + {event}: want {want:?}, got {got:?}"),
                }
            }
        }
        assert_eq!(accepted, ALLOWED.len());
    }

    #[test]
    fn halted_tasks_continue_in_place_and_nothing_else_changes() {
        for state in S::ALL {
            for event in Event::ALL {
                let plain = transition(state, false, event);
                let halted = transition(state, true, event);
                if event == Event::Continue && state.is_running() {
                    assert_eq!(
                        halted,
                        Ok(Transition {
                            to: state,
                            clears_halt: true
                        }),
                        "{state}"
                    );
                    assert!(plain.is_err(), "{state}: continue needs a halt");
                } else {
                    assert_eq!(plain, halted, "{state} + {event}");
                }
            }
        }
    }

    #[test]
    fn the_rules_the_design_spells_out() {
        let refused = |s, e| transition(s, false, e).unwrap_err().why;
        assert!(refused(S::CanaryInProgress, Event::Rollback).contains("canary"));
        assert!(refused(S::BatchRollback, Event::Pause).contains("batch rollback"));
        // A finished rollback returns the task to the start, from either rollback kind.
        assert_eq!(
            transition(S::RollingBack, false, Event::Finished)
                .unwrap()
                .to,
            S::ToMigrate
        );
        assert_eq!(
            transition(S::BatchRollback, false, Event::Finished)
                .unwrap()
                .to,
            S::ToMigrate
        );
        // Running states are exactly those with work.
        let running: Vec<S> = S::ALL.into_iter().filter(|s| s.is_running()).collect();
        assert_eq!(
            running,
            [
                S::CanaryInProgress,
                S::Migrating,
                S::ContinueMigrating,
                S::RollingBack,
                S::BatchRollback
            ]
        );
    }
}
