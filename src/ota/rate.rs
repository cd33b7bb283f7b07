//! Push-rate control for one job: a governor GCRA limiter that runs on the engine's clock
//! (so paused/manual time works and a restart can rebuild the bucket), and the exponential
//! ramp (AWS IoT Jobs' rollout: start rate × factor per step, capped).
//!
//! Crash safety: the bucket's only state is "when were the last pushes". [`PushLimiter`] keeps
//! the last `burst` push times and the engine rebuilds it after a restart from the persisted
//! `notified_at_ms` of the job's tasks, so a restart neither grants a fresh burst nor forgets
//! the rate.
//!
//! Catch-up ([`catch_up`]): while no engine runs (a restart; in a cluster, the takeover after
//! the driving node died) nothing is pushed. The engine that loads a running job gives its
//! bucket what the rate allowed in the job's current minute (minutes counted from its first
//! push) and was not pushed, beyond the bucket's own burst; that credit is pushed at once and
//! expires with the minute. So the minute a restart or takeover falls in still pushes its rate,
//! and no minute gets more than its rate plus the burst.

use super::model::RateSpec;
use governor::clock::Clock as GovClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// governor's view of the engine clock: set to "now" before every check.
#[derive(Clone, Debug, Default)]
struct SetClock(Arc<AtomicI64>);

impl GovClock for SetClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed).max(0) as u64)
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, SetClock, NoOpMiddleware<Duration>>;

/// The rate a job pushes at, at a given time.
#[derive(Debug, Clone, PartialEq)]
pub struct RatePlan {
    pub spec: RateSpec,
}

impl RatePlan {
    /// Ramp level: how many times the factor applies (time steps since `started_at`, or
    /// success steps, whichever is further).
    pub fn level(&self, started_at_ms: i64, now_ms: i64, succeeded: u64) -> u32 {
        let Some(r) = &self.spec.ramp else { return 0 };
        let by_time = r
            .every_seconds
            .map(|s| ((now_ms - started_at_ms).max(0) / (s as i64 * 1000)) as u64)
            .unwrap_or(0);
        let by_success = r.every_succeeded.map(|n| succeeded / n).unwrap_or(0);
        by_time.max(by_success).min(64) as u32
    }

    /// Devices per minute at `level`.
    pub fn per_minute(&self, level: u32) -> f64 {
        let start = f64::from(self.spec.per_minute);
        match &self.spec.ramp {
            None => start,
            Some(r) => (start * r.factor.powi(level as i32)).min(f64::from(r.max_per_minute)),
        }
    }

    /// When the time-based ramp next steps up (None without one, or at the cap).
    pub fn next_step_at(&self, started_at_ms: i64, level: u32) -> Option<i64> {
        let r = self.spec.ramp.as_ref()?;
        let every = r.every_seconds? as i64 * 1000;
        if self.per_minute(level) >= f64::from(r.max_per_minute) {
            return None;
        }
        Some(started_at_ms + (i64::from(level) + 1) * every)
    }

    /// The burst: as configured, else a second's worth of the current rate (at least 1).
    pub fn burst(&self, per_minute: f64) -> u32 {
        self.spec
            .burst
            .unwrap_or_else(|| (per_minute / 60.0).ceil().max(1.0) as u32)
            .max(1)
    }
}

/// One job's push bucket.
pub struct PushLimiter {
    clock: SetClock,
    limiter: Limiter,
    per_minute: f64,
    burst: u32,
    /// The last `burst` push times, to rebuild the bucket when the rate changes.
    recent: VecDeque<i64>,
    /// Pushes allowed beyond the bucket before `catch_up_until` ([`catch_up`]).
    catch_up: u32,
    catch_up_until: i64,
}

impl std::fmt::Debug for PushLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushLimiter")
            .field("per_minute", &self.per_minute)
            .field("burst", &self.burst)
            .finish_non_exhaustive()
    }
}

impl PushLimiter {
    /// A bucket for `per_minute` (> 0) with `burst`, primed with earlier push times.
    pub fn new(per_minute: f64, burst: u32, history: impl IntoIterator<Item = i64>) -> Self {
        let mut recent: Vec<i64> = history.into_iter().collect();
        recent.sort_unstable();
        let keep = recent.len().saturating_sub(burst as usize);
        let recent: VecDeque<i64> = recent.into_iter().skip(keep).collect();
        let clock = SetClock::default();
        clock
            .0
            .store(recent.front().copied().unwrap_or(0), Ordering::Relaxed);
        let period_ns = (60e9 / per_minute.max(1e-6)).max(1.0) as u64;
        let quota = Quota::with_period(Duration::from_nanos(period_ns))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN));
        let limiter = RateLimiter::direct_with_clock(quota, clock.clone());
        for t in &recent {
            clock.0.store(*t, Ordering::Relaxed);
            let _ = limiter.check();
        }
        PushLimiter {
            clock,
            limiter,
            per_minute,
            burst,
            recent,
            catch_up: 0,
            catch_up_until: i64::MIN,
        }
    }

    /// The same bucket with `n` pushes allowed beyond it until `until_ms` ([`catch_up`]).
    pub fn with_catch_up(mut self, n: u32, until_ms: i64) -> PushLimiter {
        self.catch_up = n;
        self.catch_up_until = until_ms;
        self
    }

    /// Pushes still allowed beyond the bucket at `now_ms`.
    pub fn catch_up_left(&self, now_ms: i64) -> u32 {
        if now_ms < self.catch_up_until {
            self.catch_up
        } else {
            0
        }
    }

    pub fn per_minute(&self) -> f64 {
        self.per_minute
    }

    /// The same bucket at another rate (keeps the recent pushes).
    pub fn with_rate(&self, per_minute: f64, burst: u32) -> PushLimiter {
        PushLimiter::new(per_minute, burst, self.recent.iter().copied())
            .with_catch_up(self.catch_up, self.catch_up_until)
    }

    /// Takes one push slot at `now`, or says when the next one opens.
    pub fn try_take(&mut self, now_ms: i64) -> Result<(), i64> {
        self.clock.0.store(now_ms, Ordering::Relaxed);
        let granted = match self.limiter.check() {
            Ok(()) => Ok(()),
            // What the rate allowed while no engine ran: beyond the bucket, not charged to it.
            Err(_) if self.catch_up_left(now_ms) > 0 => {
                self.catch_up -= 1;
                Ok(())
            }
            Err(not_until) => Err(not_until),
        };
        match granted {
            Ok(()) => {
                self.recent.push_back(now_ms);
                while self.recent.len() > self.burst as usize {
                    self.recent.pop_front();
                }
                Ok(())
            }
            Err(not_until) => {
                let at = not_until.earliest_possible().as_millis() as i64;
                // governor works in ns; never ask to be woken in the past.
                Err(at.max(now_ms + 1))
            }
        }
    }

    /// Records a push that did not wait for a slot (a device pulled its upgrade).
    pub fn consume(&mut self, now_ms: i64) {
        let _ = self.try_take(now_ms);
    }
}

/// The catch-up of a running job whose engine was just loaded (a restart, a takeover): what the
/// rate allowed and was not pushed in the job's current minute — minutes counted from its first
/// push (the earliest of `push_times`), and only since `since_ms` (the job's last change: a
/// resume, so a paused stretch is not made up) — less the `burst` the bucket grants anyway
/// after such a pause. Returns the count and when it expires (the minute's end); `None` when
/// nothing is owed.
///
/// No minute gets more than `per_minute` plus the burst from it: the credit is the minute's
/// budget so far minus what it pushed, and after it the bucket allows only the pace.
pub fn catch_up(
    push_times: &[i64],
    per_minute: f64,
    burst: u32,
    since_ms: i64,
    now_ms: i64,
) -> Option<(u32, i64)> {
    let first = push_times.iter().copied().min()?;
    if now_ms <= first {
        return None;
    }
    let minute = first + (now_ms - first) / 60_000 * 60_000;
    let from = minute.max(since_ms);
    if from >= now_ms {
        return None;
    }
    let allowed = (per_minute * (now_ms - from) as f64 / 60_000.0).floor();
    let pushed = push_times
        .iter()
        .filter(|&&t| from <= t && t < now_ms)
        .count();
    let owed = (allowed as i64 - pushed as i64 - i64::from(burst)).max(0);
    let owed = u32::try_from(owed).unwrap_or(u32::MAX);
    (owed > 0).then_some((owed, minute + 60_000))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ota::model::RampSpec;

    #[test]
    fn constant_rate_with_burst() {
        // 60/min = one per second, burst 3.
        let mut l = PushLimiter::new(60.0, 3, []);
        let t0 = 1_000_000;
        assert!(l.try_take(t0).is_ok());
        assert!(l.try_take(t0).is_ok());
        assert!(l.try_take(t0).is_ok());
        let next = l.try_take(t0).unwrap_err();
        assert!((t0 + 900..=t0 + 1_000).contains(&next), "{next}");
        assert!(l.try_take(next).is_ok());
        // Over a minute at saturation: burst + 60 pushes at most.
        let mut l = PushLimiter::new(60.0, 3, []);
        let mut pushed = 0;
        let mut t = t0;
        while t < t0 + 60_000 {
            match l.try_take(t) {
                Ok(()) => pushed += 1,
                Err(next) => t = next,
            }
        }
        assert!((60..=63).contains(&pushed), "{pushed}");
    }

    #[test]
    fn rebuilt_bucket_remembers_recent_pushes() {
        let t0 = 5_000_000;
        let mut l = PushLimiter::new(60.0, 2, []);
        assert!(l.try_take(t0).is_ok());
        assert!(l.try_take(t0 + 10).is_ok());
        // "Restart": a new bucket from the persisted push times grants no fresh burst.
        let mut again = PushLimiter::new(60.0, 2, [t0, t0 + 10]);
        assert!(again.try_take(t0 + 20).is_err());
        assert!(again.try_take(t0 + 1_100).is_ok());
    }

    #[test]
    fn ramp_levels_by_time_and_success() {
        let plan = RatePlan {
            spec: RateSpec {
                per_minute: 10,
                burst: None,
                ramp: Some(RampSpec {
                    factor: 2.0,
                    every_seconds: Some(60),
                    every_succeeded: Some(5),
                    max_per_minute: 50,
                }),
            },
        };
        assert_eq!(plan.level(0, 59_999, 0), 0);
        assert_eq!(plan.level(0, 60_000, 0), 1);
        assert_eq!(plan.level(0, 0, 10), 2);
        assert_eq!(plan.per_minute(0), 10.0);
        assert_eq!(plan.per_minute(1), 20.0);
        assert_eq!(plan.per_minute(2), 40.0);
        assert_eq!(plan.per_minute(3), 50.0, "capped");
        assert_eq!(plan.next_step_at(0, 1), Some(120_000));
        assert_eq!(plan.next_step_at(0, 3), None, "at the cap");
        assert_eq!(plan.burst(40.0), 1);
        assert_eq!(plan.burst(600.0), 10);
    }
}
