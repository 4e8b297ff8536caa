//! SVG pictures of a report: one latency CDF per group and one throughput bar chart.
//!
//! Drawn with `plotters`' SVG backend, which writes text as SVG `<text>` elements, so no font
//! is loaded and no system library is needed. Odd data (NaN, infinities, zero or negative
//! values, empty distributions) is skipped rather than drawn.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use plotters::coord::combinators::BindKeyPoints;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::row::Row;

/// Errors drawing a picture.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// `plotters` failed to lay out or render the picture (its error text).
    #[error("drawing failed: {0}")]
    Draw(String),
    /// Creating the directory or writing a file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Size of a CDF picture, pixels.
const CDF_SIZE: (u32, u32) = (1000, 600);
/// Width of the throughput picture, pixels.
const BAR_WIDTH: u32 = 1200;
/// Height given to each bar of the throughput picture, pixels.
const BAR_PITCH: u32 = 22;
/// Height of the throughput picture outside its bars (title, axis, margins), pixels.
const BAR_CHROME: u32 = 130;
/// Longest bar label, characters (longer ones are cut, ending in `…`).
const MAX_LABEL: usize = 80;
/// Font of the titles.
const TITLE_FONT: (&str, u32) = ("sans-serif", 24);
/// Font of the axis descriptions.
const DESC_FONT: (&str, u32) = ("sans-serif", 16);
/// Font of the tick labels, legends and bar values.
const LABEL_FONT: (&str, u32) = ("sans-serif", 13);

/// Writes, next to each other in `dir`:
/// - `<stem>-cdf-<group>.svg` for each group that has rows with latency: one line per row (its
///   CDF, x = latency in microseconds on a log axis, y = fraction 0..1), legend = row name;
/// - `<stem>-throughput.svg`: a horizontal bar chart of every row whose `unit` ends in "/s", one
///   bar per row, label "group: name (unit)", log-scaled value axis, bars coloured by group.
///
/// Returns the paths written. `<group>` is the group name made file-safe (lowercase,
/// non-alphanumerics -> '-'). A picture with nothing to draw (no latency point or no positive,
/// finite rate) is not written; `dir` is created if missing. Odd values (NaN, infinite, zero
/// or negative, absurdly small or large) are left out of the pictures.
///
/// # Errors
///
/// [`PlotError::Io`] if `dir` cannot be created or a file cannot be written, and
/// [`PlotError::Draw`] if `plotters` fails to draw a picture.
pub fn write_svgs(rows: &[Row], dir: &Path, stem: &str) -> Result<Vec<PathBuf>, PlotError> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let mut used = HashSet::new();

    for group in groups(rows) {
        let curves: Vec<(&str, Vec<(f64, f64)>)> = rows
            .iter()
            .filter(|r| r.group == group)
            .filter_map(|r| Some((r.name.as_str(), cdf_points(r)?)))
            .collect();
        if curves.is_empty() {
            continue;
        }
        let mut name = format!("{stem}-cdf-{}", file_safe(group));
        // Two groups may map to the same file-safe name ("a b" and "a-b"): keep both.
        let base = name.clone();
        let mut n = 2;
        while !used.insert(name.clone()) {
            name = format!("{base}-{n}");
            n += 1;
        }
        let path = dir.join(format!("{name}.svg"));
        std::fs::write(&path, cdf_svg(group, &curves)?)?;
        written.push(path);
    }

    let bars = bars(rows);
    if !bars.is_empty() {
        let path = dir.join(format!("{stem}-throughput.svg"));
        std::fs::write(&path, throughput_svg(&bars)?)?;
        written.push(path);
    }
    Ok(written)
}

/// Maps a `plotters` error to [`PlotError::Draw`].
fn draw_err(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// The distinct group names of `rows`, in order of first appearance.
fn groups(rows: &[Row]) -> Vec<&str> {
    let mut seen = HashSet::new();
    rows.iter()
        .map(|r| r.group.as_str())
        .filter(|g| seen.insert(*g))
        .collect()
}

/// `group` lowercased with every character other than an ASCII letter or digit replaced by
/// `-` (`group` if it is empty).
fn file_safe(group: &str) -> String {
    if group.is_empty() {
        return "group".into();
    }
    group
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// Whether `v` can go on a log axis: positive, finite and not absurdly small or large (so
/// that axis bounds computed from it stay finite and positive).
fn plottable(v: f64) -> bool {
    (1e-200..=1e200).contains(&v)
}

/// The drawable points of `row`'s CDF as `(microseconds, fraction)`: [`plottable`] latency,
/// finite fraction clamped to 0..=1. `None` if there is none.
fn cdf_points(row: &Row) -> Option<Vec<(f64, f64)>> {
    let points: Vec<(f64, f64)> = row
        .latency
        .as_ref()?
        .cdf
        .iter()
        .map(|&(ns, q)| (ns / 1000.0, q))
        .filter(|&(us, q)| plottable(us) && q.is_finite())
        .map(|(us, q)| (us, q.clamp(0.0, 1.0)))
        .collect();
    (!points.is_empty()).then_some(points)
}

/// The largest of 1, 2 or 5 times a power of ten that is at most `x` (positive, finite);
/// strictly below `x` if `strict`.
fn nice_floor(x: f64, strict: bool) -> f64 {
    let p = 10f64.powf(x.log10().floor());
    [10.0, 5.0, 2.0, 1.0, 0.5]
        .into_iter()
        .map(|m| m * p)
        .find(|&v| if strict { v < x } else { v <= x })
        .unwrap_or(p / 10.0)
}

/// The smallest of 1, 2 or 5 times a power of ten that is at least `x` (positive, finite).
fn nice_ceil(x: f64) -> f64 {
    let p = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&v| v >= x)
        .unwrap_or(p * 10.0)
}

/// Labelled (bold) and grid-only (light) ticks of a log axis over `range` (positive, finite):
/// 1, 2 and 5 times powers of ten when it spans at most three decades, else powers of ten (at
/// most about a dozen); grid lines at every multiple of a power of ten.
fn log_ticks(range: &std::ops::Range<f64>) -> (Vec<f64>, Vec<f64>) {
    let (lo, hi) = (range.start * (1.0 - 1e-9), range.end * (1.0 + 1e-9));
    let first = range.start.log10().floor() as i32;
    let last = range.end.log10().ceil() as i32;
    let span = (range.end / range.start).log10();
    let bold_mantissas: &[f64] = if span <= 3.0 {
        &[1.0, 2.0, 5.0]
    } else {
        &[1.0]
    };
    let every = ((span / 12.0).ceil() as i32).max(1);
    let (mut bold, mut light) = (Vec::new(), Vec::new());
    for k in first..=last {
        let p = 10f64.powi(k);
        for m in 1..=9 {
            let v = f64::from(m) * p;
            if v < lo || v > hi {
                continue;
            }
            if every == 1 {
                light.push(v);
            }
            if bold_mantissas.contains(&f64::from(m)) && k.rem_euclid(every) == 0 {
                bold.push(v);
            }
        }
    }
    (bold, light)
}

/// A tick label: up to three significant digits, no trailing zeros, exponent form outside
/// 0.001..1e6.
fn tick(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if !(1e-3..1e6).contains(&a) {
        return format!("{v:.0e}");
    }
    let decimals = (2 - a.log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// `v` with an SI suffix (k, M, G, T) and three significant digits, e.g. `1.23M` (exponent
/// form from 1e15).
fn si(v: f64) -> String {
    const STEPS: [(f64, &str); 4] = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    if v.abs() >= 1e15 {
        return tick(v);
    }
    for (scale, suffix) in STEPS {
        if v.abs() >= scale {
            return format!("{}{suffix}", tick(v / scale));
        }
    }
    tick(v)
}

/// The SVG text of the CDF picture of `group`, one line per `(name, points)` (points as
/// returned by [`cdf_points`], non-empty).
fn cdf_svg(group: &str, curves: &[(&str, Vec<(f64, f64)>)]) -> Result<String, PlotError> {
    let all = curves.iter().flat_map(|(_, p)| p.iter().map(|&(us, _)| us));
    let (lo, hi) = all.fold((f64::INFINITY, 0f64), |(lo, hi), us| {
        (lo.min(us), hi.max(us))
    });
    let (mut start, mut end) = (nice_floor(lo, false), nice_ceil(hi));
    if start >= end {
        // Every sample has the same latency.
        (start, end) = (nice_floor(lo, true), nice_ceil(hi * 1.01));
    }
    let x_range = start..end;
    let (bold, light) = log_ticks(&x_range);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, CDF_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("Latency CDF: {group}"), TITLE_FONT)
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(
                x_range
                    .log_scale()
                    .with_key_points(bold)
                    .with_light_points(light),
                0f64..1f64,
            )
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("latency (µs, log scale)")
            .y_desc("fraction of samples at or below")
            .axis_desc_style(DESC_FONT)
            .label_style(LABEL_FONT)
            .x_label_formatter(&|v| tick(*v))
            .y_labels(11)
            .y_label_formatter(&|v| tick(*v))
            .bold_line_style(RGBColor(200, 200, 200))
            .light_line_style(RGBColor(238, 238, 238))
            .draw()
            .map_err(draw_err)?;

        for (i, (name, points)) in curves.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            // The points sample the CDF (they are not its every step): join them, rising from
            // 0 at the smallest latency, so that even a single point draws.
            let rise = points.first().map(|&(us, _)| (us, 0.0));
            let line = rise.into_iter().chain(points.iter().copied());
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)))
                .map_err(draw_err)?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(LABEL_FONT)
            .margin(15)
            .draw()
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// One bar of the throughput picture.
struct Bar {
    /// `group: name (unit)`, cut to [`MAX_LABEL`] characters.
    label: String,
    /// Index of the row's group among the groups of the bars, for its colour.
    group: usize,
    /// The rate, [`plottable`].
    value: f64,
}

/// The bars of the throughput picture: every row whose unit ends in `/s` and whose value is
/// [`plottable`], in row order.
fn bars(rows: &[Row]) -> Vec<Bar> {
    let mut group_names: Vec<&str> = Vec::new();
    rows.iter()
        .filter(|r| r.unit.ends_with("/s"))
        .filter_map(|r| {
            let value = r.value.filter(|&v| plottable(v))?;
            let group = match group_names.iter().position(|g| *g == r.group) {
                Some(i) => i,
                None => {
                    group_names.push(&r.group);
                    group_names.len() - 1
                }
            };
            let mut label = format!("{}: {} ({})", r.group, r.name, r.unit);
            if label.chars().count() > MAX_LABEL {
                label = label.chars().take(MAX_LABEL - 1).chain(['…']).collect();
            }
            Some(Bar {
                label,
                group,
                value,
            })
        })
        .collect()
}

/// The SVG text of the throughput picture: `bars` (non-empty) top to bottom in order.
fn throughput_svg(bars: &[Bar]) -> Result<String, PlotError> {
    let n = bars.len();
    let rows = u32::try_from(n).unwrap_or(u32::MAX);
    let height = BAR_CHROME.saturating_add(BAR_PITCH.saturating_mul(rows));
    let (lo, hi) = bars.iter().fold((f64::INFINITY, 0f64), |(lo, hi), b| {
        (lo.min(b.value), hi.max(b.value))
    });
    // Every bar gets a length, and the largest room for its value label.
    let x_range = nice_floor(lo, true)..nice_ceil(hi * 3.0);
    let start = x_range.start;
    let (bold, light) = log_ticks(&x_range);
    // The y axis counts half bars: bar `i` (0 = first) fills `2 (n - 1 - i) ..= 2 (n - i)`,
    // so the first is on top, and its label sits at the odd middle.
    let n64 = i64::try_from(n).unwrap_or(i64::MAX / 4);
    let bottom = |i: usize| 2 * (n64 - 1 - i64::try_from(i).unwrap_or(n64));
    let centers: Vec<i64> = (0..n).map(|i| bottom(i) + 1).collect();
    let label_of = |y: &i64| {
        usize::try_from(n64 - 1 - (y - 1) / 2)
            .ok()
            .and_then(|i| bars.get(i))
            .map(|b| b.label.clone())
            .unwrap_or_default()
    };
    // Room for the longest label at about 6.5 px a character (13 px sans-serif).
    let longest = bars
        .iter()
        .map(|b| b.label.chars().count())
        .max()
        .unwrap_or(0);
    let label_area = u32::try_from(longest)
        .unwrap_or(u32::MAX)
        .saturating_mul(13)
        .saturating_div(2)
        .saturating_add(20)
        .min(BAR_WIDTH / 2);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (BAR_WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Throughput", TITLE_FONT)
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(label_area)
            .build_cartesian_2d(
                x_range
                    .log_scale()
                    .with_key_points(bold)
                    .with_light_points(light),
                (0..2 * n64).with_key_points(centers),
            )
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc("rate per second, in each bar's unit (log scale)")
            .axis_desc_style(DESC_FONT)
            .label_style(LABEL_FONT)
            .x_label_formatter(&|v| si(*v))
            .y_label_formatter(&label_of)
            .bold_line_style(RGBColor(200, 200, 200))
            .light_line_style(RGBColor(238, 238, 238))
            .draw()
            .map_err(draw_err)?;

        chart
            .draw_series(bars.iter().enumerate().map(|(i, b)| {
                let y = bottom(i);
                let color = Palette99::pick(b.group).filled();
                let mut rect = Rectangle::new([(start, y), (b.value, y + 2)], color);
                rect.set_margin(3, 3, 0, 0);
                rect
            }))
            .map_err(draw_err)?;
        let value_style =
            TextStyle::from(LABEL_FONT.into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        chart
            .draw_series(bars.iter().enumerate().map(|(i, b)| {
                EmptyElement::at((b.value, bottom(i) + 1))
                    + Text::new(si(b.value), (5, 0), value_style.clone())
            }))
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::row::{histogram, record};

    /// A row of `group` whose latencies are `base_ns` times 1..=100, at `rate` in `unit`.
    fn row(group: &str, name: &str, base_ns: u64, rate: f64, unit: &str) -> Row {
        let mut h = histogram();
        for i in 1..=100 {
            record(&mut h, Duration::from_nanos(base_ns * i));
        }
        Row::new(group, name, Some(&h), rate, unit)
    }

    /// A fresh empty directory under the system temp directory.
    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmpager-plot-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn writes_one_cdf_per_group_and_a_throughput_chart() {
        let rows = vec![
            row("kernel", "anonymous fault", 300, 2.5e6, "faults/s"),
            row("kernel", "uffd copy", 900, 8.0e5, "pages/s"),
            row(
                "In-Process handler",
                "copy 1 thread",
                2_000,
                3.0e5,
                "faults/s",
            ),
            Row::new("memory", "resident", None, 4096.0, "bytes"),
        ];
        let dir = temp_dir("files");
        let paths = write_svgs(&rows, &dir, "run").expect("pictures drawn");
        let names: Vec<String> = paths
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(String::from))
            .collect();
        assert_eq!(
            names,
            [
                "run-cdf-kernel.svg",
                "run-cdf-in-process-handler.svg",
                "run-throughput.svg"
            ]
        );
        let read = |i: usize| std::fs::read_to_string(&paths[i]).expect("written");
        let (kernel, handler, throughput) = (read(0), read(1), read(2));
        for svg in [&kernel, &handler, &throughput] {
            assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        }
        assert!(kernel.contains("anonymous fault") && kernel.contains("uffd copy"));
        assert!(handler.contains("copy 1 thread") && !handler.contains("uffd copy"));
        assert!(throughput.contains("kernel: uffd copy (pages/s)"));
        assert!(!throughput.contains("resident"), "bytes are not a rate");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn odd_data_is_skipped_not_drawn() {
        let mut nan = row("ipc", "nan", 1_000, f64::NAN, "round trips/s");
        if let Some(l) = nan.latency.as_mut() {
            l.cdf = vec![(f64::NAN, 0.5), (0.0, 0.7), (-3.0, 1.0)];
        }
        let rows = vec![
            nan,
            row("ipc", "zero", 1_000, 0.0, "round trips/s"),
            Row::new(
                "vcpu",
                "no samples",
                Some(&histogram()),
                f64::INFINITY,
                "faults/s",
            ),
            Row::new("vcpu", "huge", None, 1e300, "faults/s"),
            Row::new("vcpu", "tiny", None, f64::MIN_POSITIVE / 2.0, "faults/s"),
        ];
        let dir = temp_dir("odd");
        let paths = write_svgs(&rows, &dir, "odd").expect("no error on odd data");
        let names: Vec<String> = paths
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(String::from))
            .collect();
        assert_eq!(names, ["odd-cdf-ipc.svg"]);
        let svg = std::fs::read_to_string(&paths[0]).expect("written");
        assert!(svg.starts_with("<svg") && svg.contains("zero") && !svg.contains(">nan<"));
        assert_eq!(write_svgs(&[], &dir, "empty").expect("nothing").len(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
