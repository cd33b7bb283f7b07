//! Logging setup: `tracing` to stderr with an env filter (`RUST_LOG`, default
//! [`DEFAULT_FILTER`]), as text (coloured only on a terminal) or JSON lines. Stdout is kept for
//! the few things a person must read once (the admin token created on first start, in text
//! mode only: with JSON logs it stays in its file).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing_subscriber::{fmt, EnvFilter};

/// `info`, except rumqttd's own INFO lines (one per connection and more: "Overriding segment
/// config", link and router chatter — nearly half of all lines on a busy gateway, saying nothing
/// our own lines do not), which only show from `warn` on. `RUST_LOG` replaces the whole filter
/// (e.g. `RUST_LOG=info,rumqttd=info` brings them back).
pub const DEFAULT_FILTER: &str = "info,rumqttd=warn";

static JSON: AtomicBool = AtomicBool::new(false);

/// Whether logs are JSON lines (set by [`init`]).
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// Install the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(json: bool) {
    JSON.store(json, Ordering::Relaxed);
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}

/// At most one log line per period for an event that can repeat thousands of times a second
/// (refused sockets, timeouts of a flood): [`Throttle::ready`] says whether to log now and how
/// many occurrences went unlogged since the last line. Counting is the metrics' job; this only
/// keeps the log readable and cheap under attack.
pub struct Throttle<C: governor::clock::Clock = governor::clock::DefaultClock> {
    limiter: governor::RateLimiter<
        governor::state::NotKeyed,
        governor::state::InMemoryState,
        C,
        governor::middleware::NoOpMiddleware<C::Instant>,
    >,
    suppressed: std::sync::atomic::AtomicU64,
}

impl Throttle {
    /// One line per `period` (at least 1 ms).
    pub fn new(period: std::time::Duration) -> Throttle {
        Throttle::with_clock(period, governor::clock::DefaultClock::default())
    }
}

impl<C: governor::clock::Clock> Throttle<C> {
    /// With a given clock (tests pass a fake one).
    pub fn with_clock(period: std::time::Duration, clock: C) -> Throttle<C> {
        let quota = governor::Quota::with_period(period.max(std::time::Duration::from_millis(1)))
            .expect("a period of at least 1 ms is a valid quota");
        Throttle {
            limiter: governor::RateLimiter::direct_with_clock(quota, clock),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log now, `n` occurrences were not logged since the previous line. `None`:
    /// stay quiet (this occurrence is added to the next line's `n`).
    pub fn ready(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        if self.limiter.check().is_ok() {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;

    #[test]
    fn throttle_logs_once_per_period_and_counts_the_rest() {
        let clock = FakeRelativeClock::default();
        // Clones of the fake clock share its time.
        let t = Throttle::with_clock(Duration::from_secs(10), clock.clone());
        assert_eq!(t.ready(), Some(0), "the first occurrence is logged");
        for _ in 0..99 {
            assert_eq!(t.ready(), None);
        }
        clock.advance(Duration::from_secs(9));
        assert_eq!(t.ready(), None, "still within the period");
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            t.ready(),
            Some(100),
            "the next line reports what it skipped"
        );
        clock.advance(Duration::from_secs(60));
        assert_eq!(
            t.ready(),
            Some(0),
            "a quiet spell does not build up a burst"
        );
        assert_eq!(t.ready(), None);
    }
}
