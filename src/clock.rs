//! Time as the gateway stores it: milliseconds since the Unix epoch.
//!
//! [`now_ms`] reads the system clock. [`Clock`] is the injectable clock the OTA and migration
//! engines take every timestamp from: system time in production (shifted by an offset only a
//! test moves, e.g. 30 days of data sync), or a manual clock that stands still until a test
//! moves it (the OTA engine then runs no deadline task of its own). One type for both engines,
//! so the app hands the same clock to each.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the system clock is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A UTC civil time (proleptic Gregorian), as [`civil`] splits milliseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: i64,
    pub day: i64,
    pub hour: i64,
    pub minute: i64,
    pub second: i64,
    pub millis: i64,
}

/// `ms` since the Unix epoch as a UTC date and time (Howard Hinnant's `civil_from_days`).
pub fn civil(ms: i64) -> Civil {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    Civil {
        year: yoe + era * 400 + i64::from(month <= 2),
        month,
        day,
        hour: sod / 3600,
        minute: sod % 3600 / 60,
        second: sod % 60,
        millis: ms.rem_euclid(1000),
    }
}

/// A source of "now" in ms since the Unix epoch. Cheap to clone; clones share the time.
#[derive(Debug, Clone)]
pub struct Clock(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    manual: bool,
    /// Manual: the time itself. System: the offset added to [`now_ms`].
    ms: AtomicI64,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl Clock {
    /// System time ([`now_ms`]); [`Clock::advance`] shifts it (tests only).
    pub fn system() -> Clock {
        Clock(Arc::new(Inner {
            manual: false,
            ms: AtomicI64::new(0),
        }))
    }

    /// A clock that reads `start_ms` until [`Clock::advance`] moves it.
    pub fn manual(start_ms: i64) -> Clock {
        Clock(Arc::new(Inner {
            manual: true,
            ms: AtomicI64::new(start_ms),
        }))
    }

    pub fn now_ms(&self) -> i64 {
        let ms = self.0.ms.load(Ordering::SeqCst);
        if self.0.manual {
            ms
        } else {
            now_ms().saturating_add(ms)
        }
    }

    /// Moves the clock forward by `by` (tests; production code never moves it).
    pub fn advance(&self, by: Duration) {
        self.advance_ms(i64::try_from(by.as_millis()).unwrap_or(i64::MAX));
    }

    /// [`Clock::advance`] in milliseconds.
    pub fn advance_ms(&self, by: i64) {
        let _ = self
            .0
            .ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |ms| {
                Some(ms.saturating_add(by))
            });
    }

    /// True for a clock that only moves when a test moves it.
    pub fn is_manual(&self) -> bool {
        self.0.manual
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_follows_the_system_and_advances_by_an_offset() {
        let c = Clock::system();
        assert!(!c.is_manual());
        let before = now_ms();
        let read = c.now_ms();
        assert!(read >= before && read <= now_ms());
        c.advance(Duration::from_secs(30 * 24 * 3600));
        assert!(c.now_ms() - now_ms() >= 30 * 24 * 3600 * 1000 - 1_000);
    }

    #[test]
    fn manual_clock_stands_still_until_moved_and_clones_share_it() {
        let c = Clock::manual(1_000);
        let shared = c.clone();
        assert!(c.is_manual());
        assert_eq!(c.now_ms(), 1_000);
        shared.advance_ms(500);
        assert_eq!(c.now_ms(), 1_500);
        c.advance(Duration::from_secs(2));
        assert_eq!(shared.now_ms(), 3_500);
        c.advance_ms(i64::MAX);
        assert_eq!(c.now_ms(), i64::MAX, "saturates instead of wrapping");
    }
}
