//! The engine's clock: milliseconds since the Unix epoch, injectable so that tests can move
//! time by hand instead of sleeping. Every OTA timestamp (persisted or not) comes from here.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// A source of "now" in ms since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;

    /// True for a clock that only moves when a test moves it: the engine then does not run
    /// its own deadline task (the test calls [`OtaEngine::run_due`](super::OtaEngine::run_due)).
    fn is_manual(&self) -> bool {
        false
    }
}

/// Wall-clock time ([`crate::clock::now_ms`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        crate::clock::now_ms()
    }
}

/// A clock that stands still until [`ManualClock::advance`] or [`ManualClock::set`]. Cheap to
/// clone; clones share the time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(start_ms: i64) -> Self {
        ManualClock(Arc::new(AtomicI64::new(start_ms)))
    }

    pub fn advance_ms(&self, by: i64) {
        self.0.fetch_add(by, Ordering::SeqCst);
    }

    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }

    fn is_manual(&self) -> bool {
        true
    }
}
