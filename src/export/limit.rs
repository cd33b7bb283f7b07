//! Dynamic rate limiting of the export/import endpoints (the seed's "too many requests").
//!
//! Three checks, all answered with 429 `FG.0429` and a `Retry-After`:
//! - starts (`POST /export`, `POST /import`): a governor GCRA bucket (`start_per_minute`,
//!   `start_burst`);
//! - reads (status, log, package downloads): a second, larger bucket, so polling clients
//!   cannot starve each other;
//! - load: a start is refused while `max_jobs_in_flight` jobs run, or when its package would
//!   push the bytes held by running jobs past `max_bytes_in_flight`. This is the "dynamic"
//!   part: the same request passes or not depending on what the gateway is doing.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::ExportSettings;

/// Why a request was limited, and when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub retry_after: Duration,
    pub reason: String,
}

pub struct ExportLimiter {
    starts: DefaultDirectRateLimiter,
    reads: DefaultDirectRateLimiter,
    clock: DefaultClock,
    max_jobs: usize,
    max_bytes: u64,
    jobs: AtomicUsize,
    bytes: AtomicU64,
}

impl std::fmt::Debug for ExportLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportLimiter")
            .field("jobs", &self.jobs.load(Ordering::Relaxed))
            .field("bytes", &self.bytes.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn nz(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v.max(1)).unwrap_or(NonZeroU32::MIN)
}

/// Releases a job's share of the in-flight load when dropped.
#[derive(Debug)]
pub struct InFlight {
    limiter: Arc<ExportLimiter>,
    bytes: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.limiter.jobs.fetch_sub(1, Ordering::AcqRel);
        self.limiter.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl ExportLimiter {
    pub fn new(s: &ExportSettings) -> Self {
        let starts = Quota::per_minute(nz(s.start_per_minute)).allow_burst(nz(s.start_burst));
        let reads = Quota::per_second(nz(s.reads_per_second)).allow_burst(nz(s.reads_burst));
        ExportLimiter {
            starts: RateLimiter::direct(starts),
            reads: RateLimiter::direct(reads),
            clock: DefaultClock::default(),
            max_jobs: s.max_jobs_in_flight.max(1),
            max_bytes: s.max_bytes_in_flight.max(1),
            jobs: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    fn bucket(&self, l: &DefaultDirectRateLimiter, what: &str) -> Result<(), Limited> {
        l.check().map_err(|not_until| Limited {
            retry_after: not_until.wait_time_from(self.clock.now()),
            reason: format!("too many requests: {what} rate exceeded"),
        })
    }

    /// A status/log/package read.
    pub fn check_read(&self) -> Result<(), Limited> {
        self.bucket(&self.reads, "export/import read")
    }

    /// A new job announcing `bytes` (the upload's length, or the firmware it will pack).
    /// Checks the bucket first so a refused start still costs a token.
    pub fn check_start(&self) -> Result<(), Limited> {
        self.bucket(&self.starts, "export/import start")
    }

    /// Reserves a slot for a running job of `bytes`; refused when the gateway is busy.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Result<InFlight, Limited> {
        let jobs = self.jobs.fetch_add(1, Ordering::AcqRel) + 1;
        let total = self
            .bytes
            .fetch_add(bytes, Ordering::AcqRel)
            .saturating_add(bytes);
        let guard = InFlight {
            limiter: Arc::clone(self),
            bytes,
        };
        if jobs > self.max_jobs {
            return Err(Limited {
                retry_after: Duration::from_secs(2),
                reason: format!(
                    "too many requests: {} export/import jobs are running (at most {})",
                    jobs - 1,
                    self.max_jobs
                ),
            });
        }
        if total > self.max_bytes {
            return Err(Limited {
                retry_after: Duration::from_secs(5),
                reason: format!(
                    "too many requests: {total} bytes of export/import packages in flight (at most {})",
                    self.max_bytes
                ),
            });
        }
        Ok(guard)
    }

    /// Jobs running now.
    pub fn jobs_in_flight(&self) -> usize {
        self.jobs.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ExportSettings {
        ExportSettings {
            start_per_minute: 1,
            start_burst: 2,
            max_jobs_in_flight: 1,
            max_bytes_in_flight: 100,
            ..ExportSettings::default()
        }
    }

    #[test]
    fn burst_then_limited_with_retry_after() {
        let l = ExportLimiter::new(&settings());
        assert!(l.check_start().is_ok());
        assert!(l.check_start().is_ok());
        let e = l.check_start().unwrap_err();
        assert!(e.retry_after > Duration::ZERO && e.retry_after <= Duration::from_secs(60));
    }

    #[test]
    fn in_flight_jobs_and_bytes_are_bounded_and_released() {
        let l = Arc::new(ExportLimiter::new(&settings()));
        let a = l.reserve(10).unwrap();
        assert!(l.reserve(10).is_err(), "second job while one runs");
        drop(a);
        assert_eq!(l.jobs_in_flight(), 0);
        assert!(l.reserve(101).is_err(), "too many bytes");
        assert_eq!(l.jobs_in_flight(), 0);
        let _b = l.reserve(100).unwrap();
    }
}
