//! The engine's wall clock: system time plus an offset that tests move forward, so a 30-day
//! data-sync expiry is testable in milliseconds (`clock.advance(30 days)` then
//! [`super::MigrationEngine::wake`]). Production code never advances it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Milliseconds since the Unix epoch, shifted by an adjustable offset.
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
}

impl Clock {
    pub fn new() -> Clock {
        Clock::default()
    }

    pub fn now_ms(&self) -> i64 {
        crate::clock::now_ms().saturating_add(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Moves this clock forward by `by` (tests).
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advances() {
        let c = Clock::new();
        let before = c.now_ms();
        c.advance(Duration::from_secs(30 * 24 * 3600));
        assert!(c.now_ms() - before >= 30 * 24 * 3600 * 1000);
    }
}
