//! Post-copy migration with real vCPUs: `vmpager migrate`'s run ([`run_migration`]) for each
//! guest size and injected round-trip time, with two `vmpagerd` processes on loopback.
//!
//! Downtime is from the pause request at the source to the first `KVM_RUN` at the destination
//! (the reference VMM's guest writes a pattern into every page, then checksums; the switchover
//! is at 50 % of the pages installed at the source); total time from the pause to the
//! destination's `Complete`. Every run verifies every byte, as `vmpager migrate` does. One
//! hybrid run (`--hybrid`) shows what its switchover costs on the same guest.

use crate::row::Row;
use crate::BenchError;
use std::path::Path;
use std::time::Duration;
use vmpager_client::demo::migrate::{run_migration, MigrateConfig, MigrateReport};
use vmpager_client::demo::{DaemonProcess, ScenarioConfig};
use vmpager_client::PopulateMethod;

/// The rows' group (with the in-process migration rows).
const GROUP: &str = "migration";

/// One run: guest bytes, injected RTT in ms, hybrid.
type Run = (u64, u64, bool);

fn runs(quick: bool) -> Vec<Run> {
    if quick {
        vec![
            (256 << 20, 0, false),
            (256 << 20, 5, false),
            (256 << 20, 0, true),
        ]
    } else {
        let mut v = Vec::new();
        for bytes in [1u64 << 30, 4 << 30] {
            for rtt in [0, 1, 5] {
                v.push((bytes, rtt, false));
            }
        }
        v.push((1 << 30, 0, true));
        v.push((1 << 30, 5, true));
        v
    }
}

/// Runs the migrations with `vmpagerd` at `bin`, in `dir`.
pub fn run(
    quick: bool,
    bin: &Path,
    dir: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::new();
    for (bytes, rtt, hybrid) in runs(quick) {
        let tag = format!(
            "{} MiB guest, {rtt} ms RTT, 2 real vCPUs{}",
            bytes >> 20,
            if hybrid { ", hybrid" } else { "" }
        );
        log(&format!("migration: {tag}"));
        let cfg = MigrateConfig {
            scenario: ScenarioConfig {
                write_pattern: true,
                ..ScenarioConfig::new(bytes, 2, PopulateMethod::Default)
            },
            seed: 0x6d69_6772,
            switch_at: 50,
            delay: Duration::from_millis(rtt),
            drop_at: None,
            blackhole: None,
            liveness: Duration::from_secs(1),
            deadline: Duration::from_secs(60),
            hybrid,
        };
        let work = dir.join("migrate");
        std::fs::create_dir_all(&work).map_err(|e| BenchError::io("migration dir", e))?;
        let spawn = |socket: &Path, extra: &[&str]| DaemonProcess::spawn(bin, socket, extra);
        let report = run_migration(&spawn, &work, &cfg, &|_| {});
        let _ = std::fs::remove_dir_all(&work);
        rows.extend(report_rows(&tag, &report?));
    }
    Ok(rows)
}

fn report_rows(tag: &str, r: &MigrateReport) -> Vec<Row> {
    let c = r.status.counters;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    vec![
        Row::new(
            GROUP,
            &format!("{tag}: downtime (pause at the source -> first KVM_RUN at the destination)"),
            None,
            ms(r.downtime),
            "ms",
        ),
        Row::new(
            GROUP,
            &format!("{tag}: total (pause -> the destination has every page)"),
            None,
            ms(r.total),
            "ms",
        ),
        Row::new(
            GROUP,
            &format!(
                "{tag}: pages pulled by faults ({} pushed, {} invalidated; remote fault p50 {:.0} µs, p99 {:.0} µs)",
                c.pages_pushed,
                c.pages_invalidated,
                c.fault_p50_ns as f64 / 1e3,
                c.fault_p99_ns as f64 / 1e3
            ),
            None,
            c.pages_pulled as f64,
            "pages",
        ),
    ]
}
