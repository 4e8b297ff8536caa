//! The report: a table for people, JSON for tools, and the targets of issue 4 judged against
//! ratios measured in the same run.

use crate::row::{RatioOf, Row};
use serde::Serialize;

/// A performance target: a ratio between two rows of the same run and its bound.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What it says, in words.
    pub name: String,
    /// The measured ratio.
    pub ratio: Option<f64>,
    /// The bound.
    pub bound: f64,
    /// True when the bound is an upper bound (latency ratios).
    pub at_most: bool,
    /// Whether the ratio meets the bound.
    pub met: Option<bool>,
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Quick (fewer pages and rounds) or full.
    pub quick: bool,
    /// Rounds of interleaved fault measurements.
    pub rounds: usize,
    /// `uname -r`, CPUs and when.
    pub host: String,
    /// Wall time of the run, seconds.
    pub elapsed_s: f64,
    /// Every row.
    pub rows: Vec<Row>,
    /// The targets.
    pub targets: Vec<Target>,
}

impl Report {
    /// The row with `id`.
    pub fn row(&self, id: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.id == id)
    }

    /// Judges `name`: `row`'s `of` compared with `base`'s against `bound`.
    pub fn target(&mut self, name: &str, row: &str, base: &str, of: RatioOf, bound: f64) {
        let ratio = match (self.row(row), self.row(base)) {
            (Some(r), Some(b)) => r.clone().compare(b, of).ratio.map(|r| r.value),
            _ => None,
        };
        let at_most = of == RatioOf::P50;
        self.targets.push(Target {
            name: name.into(),
            ratio,
            bound,
            at_most,
            met: ratio.map(|r| if at_most { r <= bound } else { r >= bound }),
        });
    }

    /// Adds a target on the ratio of two rows' values that must stay at or below `bound`
    /// (times and counts, where lower is better).
    pub fn target_at_most(&mut self, name: &str, row: &str, base: &str, bound: f64) {
        let ratio = match (self.row(row), self.row(base)) {
            (Some(r), Some(b)) => r.clone().compare(b, RatioOf::Rate).ratio.map(|r| r.value),
            _ => None,
        };
        self.targets.push(Target {
            name: name.into(),
            ratio,
            bound,
            at_most: true,
            met: ratio.map(|r| r <= bound),
        });
    }

    /// The table, as printed by `vmpager bench`.
    pub fn table(&self) -> String {
        let mut out = String::new();
        // Not-a-number: a figure the row does not have (the daemon keeps no p99.9).
        let us = |v: Option<f64>| {
            v.filter(|v| v.is_finite())
                .map_or("-".to_string(), |v| format!("{:.2}", v / 1e3))
        };
        let mut group = "";
        for r in &self.rows {
            if r.group != group {
                group = &r.group;
                out += &format!(
                    "\n{:<52} {:>9} {:>9} {:>9} {:>13} {:<14} {:>8}  {}\n",
                    format!("[{group}]"),
                    "p50 us",
                    "p99 us",
                    "p99.9 us",
                    "value",
                    "unit",
                    "ratio",
                    "baseline"
                );
            }
            let l = r.latency.as_ref();
            let (ratio, base) = match &r.ratio {
                Some(x) => (
                    format!(
                        "{:.2}{}",
                        x.value,
                        if x.of == RatioOf::P50 { "" } else { "x" }
                    ),
                    format!(
                        "{} of {}",
                        if x.of == RatioOf::P50 { "p50" } else { "rate" },
                        x.to
                    ),
                ),
                None => ("-".into(), String::new()),
            };
            let value = r.value.map_or("-".into(), |v| {
                if v >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            });
            out += &format!(
                "{:<52} {:>9} {:>9} {:>9} {:>13} {:<14} {:>8}  {}\n",
                r.name,
                us(l.map(|l| l.p50_ns)),
                us(l.map(|l| l.p99_ns)),
                us(l.map(|l| l.p999_ns)),
                value,
                r.unit,
                ratio,
                base
            );
        }
        out += "\n[targets: ratios measured in this run]\n";
        for t in &self.targets {
            out += &format!(
                "{:<72} {:>8} {} {:<5} {}\n",
                t.name,
                t.ratio.map_or("-".into(), |r| format!("{r:.2}")),
                if t.at_most { "<=" } else { ">=" },
                t.bound,
                match t.met {
                    Some(true) => "met",
                    Some(false) => "MISSED",
                    None => "not measured",
                }
            );
        }
        out
    }

    /// A Markdown table of the rows (for the README).
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| group | path | p50 µs | p99 µs | p99.9 µs | value | ratio (to) |\n|---|---|---:|---:|---:|---:|---|\n",
        );
        for r in &self.rows {
            let l = r.latency.as_ref();
            let f = |v: Option<f64>| {
                v.filter(|v| v.is_finite())
                    .map_or("–".to_string(), |v| format!("{:.2}", v / 1e3))
            };
            out += &format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                r.group,
                r.name,
                f(l.map(|l| l.p50_ns)),
                f(l.map(|l| l.p99_ns)),
                f(l.map(|l| l.p999_ns)),
                r.value.map_or("–".into(), |v| format!("{v:.0} {}", r.unit)),
                r.ratio.as_ref().map_or("–".into(), |x| format!(
                    "{:.2} ({} of {})",
                    x.value,
                    if x.of == RatioOf::P50 { "p50" } else { "rate" },
                    x.to
                )),
            );
        }
        out
    }
}
