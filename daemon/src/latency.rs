//! The fault-service latency histogram of one VM: allocated at its first sample (an idle VM
//! costs nothing) and compact (about 30 KiB for the whole range).
//!
//! **Precision.** An HDR histogram with 2 significant digits, 1 ns .. 60 s: every sample is
//! counted in a bucket whose width is at most 1/128 of its value (exact below 256 ns). A
//! reported quantile or maximum is the upper edge of its bucket, so it is never below the
//! sample it stands for and at most 0.8 % (< 1 %) above it. Samples above 60 s count as 60 s.
//! (Three significant digits, the HDR default, cost 8× the memory — 221 KiB per VM — for a
//! precision no fault-service measurement on a shared host has.)
//!
//! The sum of the samples is kept exactly (for Prometheus' `_sum`).

use hdrhistogram::Histogram;
use std::time::Duration;

/// Significant digits kept (relative bucket width ≤ 1/128).
pub const SIGNIFICANT_DIGITS: u8 = 2;
/// Largest sample kept apart, nanoseconds (larger ones count as this).
pub const MAX_NS: u64 = 60_000_000_000;

/// Upper bounds of the Prometheus buckets derived from the histogram, nanoseconds (a last
/// `+Inf` bucket holds the rest). Fault service takes microseconds to milliseconds.
pub const BUCKET_BOUNDS_NS: [u64; 19] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
];

/// Quantiles of a latency histogram, nanoseconds (all zero when nothing was recorded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quantiles {
    /// Samples recorded.
    pub samples: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
}

/// A Prometheus histogram snapshot: per-bucket (not cumulative) counts for
/// [`BUCKET_BOUNDS_NS`] then `+Inf`, the sample count and the exact sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Buckets {
    /// Samples per bucket; the last one is `+Inf`.
    pub counts: [u64; BUCKET_BOUNDS_NS.len() + 1],
    /// Samples.
    pub count: u64,
    /// Sum of the samples, nanoseconds.
    pub sum_ns: u128,
}

/// One VM's latency samples.
#[derive(Debug, Default)]
pub struct Latency {
    /// `None` until the first sample.
    hist: Option<Histogram<u64>>,
    sum_ns: u128,
}

impl Latency {
    /// An empty histogram that allocates nothing yet.
    pub const fn new() -> Latency {
        Latency {
            hist: None,
            sum_ns: 0,
        }
    }

    /// Records samples (allocating the histogram at the first one).
    pub fn record(&mut self, samples: &[Duration]) {
        if samples.is_empty() {
            return;
        }
        if self.hist.is_none() {
            // The bounds are constants that `new_with_bounds` accepts (a unit test checks);
            // should it ever refuse them, samples are dropped rather than the worker stopped.
            self.hist = Histogram::new_with_bounds(1, MAX_NS, SIGNIFICANT_DIGITS).ok();
        }
        let Some(h) = self.hist.as_mut() else {
            return;
        };
        for s in samples {
            let ns = s.as_nanos().min(u128::from(MAX_NS)) as u64;
            h.saturating_record(ns);
            self.sum_ns += u128::from(ns);
        }
    }

    /// Bytes this histogram holds on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.hist
            .as_ref()
            .map_or(0, |h| h.distinct_values() * std::mem::size_of::<u64>())
    }

    /// p50, p99, p99.9 and the maximum (within the stated precision, see the module doc).
    pub fn quantiles(&self) -> Quantiles {
        match self.hist.as_ref().filter(|h| !h.is_empty()) {
            None => Quantiles::default(),
            Some(h) => Quantiles {
                samples: h.len(),
                p50: h.value_at_quantile(0.50),
                p99: h.value_at_quantile(0.99),
                p999: h.value_at_quantile(0.999),
                max: h.max(),
            },
        }
    }

    /// The samples per Prometheus bucket. A histogram bucket that straddles a bound counts
    /// below it (its lowest value is at or under the bound): off by at most the precision.
    pub fn buckets(&self) -> Buckets {
        let mut b = Buckets {
            sum_ns: self.sum_ns,
            ..Buckets::default()
        };
        let Some(h) = self.hist.as_ref() else {
            return b;
        };
        b.count = h.len();
        for v in h.iter_recorded() {
            let low = h.lowest_equivalent(v.value_iterated_to());
            let i = BUCKET_BOUNDS_NS.partition_point(|&bound| bound < low);
            b.counts[i] += v.count_at_value();
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(range: std::ops::RangeInclusive<u64>) -> Vec<Duration> {
        range.map(Duration::from_micros).collect()
    }

    #[test]
    fn nothing_is_allocated_before_the_first_sample() {
        let mut l = Latency::new();
        assert_eq!(l.heap_bytes(), 0);
        assert_eq!(l.quantiles(), Quantiles::default());
        assert_eq!(l.buckets().count, 0);
        l.record(&[]);
        assert_eq!(l.heap_bytes(), 0);
        l.record(&[Duration::from_micros(20)]);
        let bytes = l.heap_bytes();
        assert!(bytes > 0 && bytes <= 32 * 1024, "{bytes} bytes");
    }

    #[test]
    fn quantiles_are_never_below_the_sample_and_at_most_one_percent_above() {
        let mut l = Latency::new();
        // 1 µs .. 100 ms: every order of magnitude a fault can take.
        let samples: Vec<Duration> = (0..10_000u64)
            .map(|i| Duration::from_nanos(1_000 + i * i))
            .collect();
        l.record(&samples);
        let mut sorted: Vec<u64> = samples.iter().map(|d| d.as_nanos() as u64).collect();
        sorted.sort_unstable();
        let exact = |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).max(1) - 1];
        let got = l.quantiles();
        assert_eq!(got.samples, sorted.len() as u64);
        for (q, v) in [
            (0.5, got.p50),
            (0.99, got.p99),
            (0.999, got.p999),
            (1.0, got.max),
        ] {
            let e = exact(q);
            assert!(v >= e && v as f64 <= e as f64 * 1.01, "q{q}: {v} vs {e}");
        }
    }

    #[test]
    fn small_values_are_exact_and_huge_ones_are_clamped() {
        let mut l = Latency::new();
        l.record(&[Duration::from_nanos(200), Duration::from_secs(3600)]);
        let q = l.quantiles();
        assert_eq!(q.p50, 200);
        assert!(q.max >= MAX_NS && q.max as f64 <= MAX_NS as f64 * 1.01);
        assert_eq!(l.buckets().sum_ns, 200 + u128::from(MAX_NS));
    }

    #[test]
    fn buckets_count_every_sample_once_below_its_bound() {
        let mut l = Latency::new();
        l.record(&micros(1..=1000));
        l.record(&[Duration::from_secs(5)]);
        let b = l.buckets();
        assert_eq!(b.count, 1001);
        assert_eq!(b.counts.iter().sum::<u64>(), 1001);
        assert_eq!(
            b.sum_ns,
            (1..=1000u128).sum::<u128>() * 1000 + 5_000_000_000
        );
        // Each bound's cumulative count holds every sample at or under it, plus at most those
        // within the precision above it.
        let mut cumulative = 0;
        for (i, bound) in BUCKET_BOUNDS_NS.iter().enumerate() {
            cumulative += b.counts[i];
            let under = |limit: f64| {
                (1..=1000u64)
                    .filter(|&us| (us * 1000) as f64 <= limit)
                    .count()
            };
            let exact = under(*bound as f64) as u64;
            let loose = under(*bound as f64 * (1.0 + 1.0 / 128.0)) as u64;
            assert!(
                (exact..=loose).contains(&cumulative),
                "le {bound}: {cumulative} not in {exact}..={loose}"
            );
        }
        assert_eq!(b.counts[BUCKET_BOUNDS_NS.len()], 1);
    }
}
