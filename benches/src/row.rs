//! One line of the report: a measured path, its latency distribution, its rate, and how it
//! compares with the baseline measured in the same run.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency percentiles of a path (from an HDR histogram, 3 significant digits).
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Samples recorded.
    pub samples: u64,
    /// Median, nanoseconds.
    pub p50_ns: f64,
    /// 99th percentile, nanoseconds.
    pub p99_ns: f64,
    /// 99.9th percentile, nanoseconds.
    pub p999_ns: f64,
    /// Largest sample, nanoseconds.
    pub max_ns: f64,
    /// The cumulative distribution: `(nanoseconds, fraction of samples at or below)`, ascending.
    pub cdf: Vec<(f64, f64)>,
}

impl Latency {
    /// Percentiles and CDF of `h` (nanosecond samples); `None` if it is empty.
    pub fn from_histogram(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let mut cdf = Vec::new();
        for v in h.iter_quantiles(4) {
            let point = (v.value_iterated_to() as f64, v.quantile_iterated_to());
            if cdf.last() != Some(&point) {
                cdf.push(point);
            }
        }
        Some(Latency {
            samples: h.len(),
            p50_ns: h.value_at_quantile(0.50) as f64,
            p99_ns: h.value_at_quantile(0.99) as f64,
            p999_ns: h.value_at_quantile(0.999) as f64,
            max_ns: h.max() as f64,
            cdf,
        })
    }
}

/// What a ratio compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RatioOf {
    /// This row's p50 latency over the baseline's (lower is better).
    P50,
    /// This row's rate over the baseline's (higher is better).
    Rate,
}

/// A ratio to a baseline row of the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// The baseline row's `id`.
    pub to: String,
    /// What is compared.
    pub of: RatioOf,
    /// The ratio.
    pub value: f64,
}

/// One measured path.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Unique within a report, stable across runs (`group/name` in words, e.g.
    /// `vmpagerd/copy 1 thread busy-poll`).
    pub id: String,
    /// The section it belongs to (`kernel`, `in-process handler`, `vmpagerd`, `mailbox`,
    /// `ipc`, `vcpu`, `conversion`, `memory`, `ioctl`).
    pub group: String,
    /// The path, in words.
    pub name: String,
    /// Its latency distribution, when measured per event.
    pub latency: Option<Latency>,
    /// Its rate (events or pages per second) or amount (bytes), in `unit`.
    pub value: Option<f64>,
    /// Unit of `value`: `faults/s`, `pages/s`, `round trips/s`, `conversions/s`, `ioctls/s`,
    /// `bytes`.
    pub unit: String,
    /// The comparison with its baseline, when it has one.
    pub ratio: Option<Ratio>,
}

impl Row {
    /// A row with a latency distribution and a rate.
    pub fn new(group: &str, name: &str, h: Option<&Histogram<u64>>, value: f64, unit: &str) -> Row {
        Row {
            id: format!("{group}/{name}"),
            group: group.into(),
            name: name.into(),
            latency: h.and_then(Latency::from_histogram),
            value: Some(value),
            unit: unit.into(),
            ratio: None,
        }
    }

    /// The median latency, nanoseconds.
    pub fn p50(&self) -> Option<f64> {
        self.latency.as_ref().map(|l| l.p50_ns)
    }

    /// Compares this row with `base` (`of` says how); no ratio if either lacks the figure.
    pub fn compare(mut self, base: &Row, of: RatioOf) -> Row {
        let value = match of {
            RatioOf::P50 => self.p50().zip(base.p50()).map(|(a, b)| a / b),
            RatioOf::Rate => self.value.zip(base.value).map(|(a, b)| a / b),
        };
        self.ratio = value.filter(|v| v.is_finite()).map(|value| Ratio {
            to: base.id.clone(),
            of,
            value,
        });
        self
    }
}

/// A latency histogram in nanoseconds, 1 ns to 100 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

/// Records `d` in `h` (saturating).
pub fn record(h: &mut Histogram<u64>, d: std::time::Duration) {
    h.saturating_record(d.as_nanos().min(u128::from(u64::MAX)) as u64);
}
