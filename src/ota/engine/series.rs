//! The push series of a job page's chart: tasks notified per time bucket. Pure: the engine
//! collects each task's latest push time ([`OtaEngine::push_series`](super::OtaEngine::push_series)),
//! this module only counts them.

/// One minute, the finest bucket.
pub const MINUTE_MS: i64 = 60_000;

/// Tasks notified per bucket: `counts[i]` pushes in `[start_ms + i·bucket_ms, +bucket_ms)`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PushSeries {
    pub start_ms: i64,
    /// A whole number of minutes, so the axis reads as minutes.
    pub bucket_ms: i64,
    pub counts: Vec<u64>,
}

impl PushSeries {
    /// Counts `times` (ms since the epoch, any order) per minute, or per as many whole
    /// minutes as keep the series at most `max_buckets` long. Empty without times.
    pub fn of(times: &[i64], max_buckets: usize) -> PushSeries {
        let (Some(&min), Some(&max)) = (times.iter().min(), times.iter().max()) else {
            return PushSeries::default();
        };
        let max_buckets = max_buckets.max(1) as i64;
        let start_ms = min.div_euclid(MINUTE_MS) * MINUTE_MS;
        let minutes = (max - start_ms) / MINUTE_MS + 1;
        let per_bucket = (minutes + max_buckets - 1) / max_buckets;
        let bucket_ms = per_bucket.max(1) * MINUTE_MS;
        let len = ((max - start_ms) / bucket_ms + 1) as usize;
        let mut counts = vec![0u64; len];
        for t in times {
            counts[((t - start_ms) / bucket_ms) as usize] += 1;
        }
        PushSeries {
            start_ms,
            bucket_ms,
            counts,
        }
    }

    /// The busiest bucket's count, per minute.
    pub fn peak_per_minute(&self) -> f64 {
        let peak = self.counts.iter().copied().max().unwrap_or(0);
        peak as f64 * MINUTE_MS as f64 / self.bucket_ms.max(MINUTE_MS) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: i64 = MINUTE_MS;

    #[test]
    fn pushes_are_counted_per_minute_or_coarser() {
        let base = 1_765_000_040_000; // 20 s into a minute
        let start = base - 20_000;
        #[allow(clippy::type_complexity)]
        let cases: &[(&str, Vec<i64>, usize, PushSeries)] = &[
            ("nothing", vec![], 60, PushSeries::default()),
            (
                "one push",
                vec![base],
                60,
                PushSeries {
                    start_ms: start,
                    bucket_ms: M,
                    counts: vec![1],
                },
            ),
            (
                "per minute, gaps kept, any order",
                vec![base + 2 * M, base, base + 1, base + 2 * M + 39_999],
                60,
                PushSeries {
                    start_ms: start,
                    bucket_ms: M,
                    counts: vec![2, 0, 2],
                },
            ),
            (
                "a bucket ends just before the next minute",
                vec![start + M - 1, start + M],
                60,
                PushSeries {
                    start_ms: start,
                    bucket_ms: M,
                    counts: vec![1, 1],
                },
            ),
            (
                "ten minutes in at most four buckets: three minutes each",
                (0..10).map(|i| start + i * M).collect(),
                4,
                PushSeries {
                    start_ms: start,
                    bucket_ms: 3 * M,
                    counts: vec![3, 3, 3, 1],
                },
            ),
            (
                "max_buckets 0 is 1",
                vec![start, start + 5 * M],
                0,
                PushSeries {
                    start_ms: start,
                    bucket_ms: 6 * M,
                    counts: vec![2],
                },
            ),
        ];
        for (what, times, max, want) in cases {
            let got = PushSeries::of(times, *max);
            assert_eq!(&got, want, "{what}");
            assert!(got.counts.len() <= (*max).max(1), "{what}");
            assert_eq!(got.counts.iter().sum::<u64>(), times.len() as u64, "{what}");
        }
    }

    #[test]
    fn the_peak_is_per_minute() {
        let s = PushSeries {
            start_ms: 0,
            bucket_ms: 3 * M,
            counts: vec![3, 9, 0],
        };
        assert_eq!(s.peak_per_minute(), 3.0);
        assert_eq!(PushSeries::default().peak_per_minute(), 0.0);
    }
}
