//! The vmpager benchmark harness: every path a fault or an exit can take, measured in one run
//! side by side with the baselines it should be judged against (DESIGN.md §10), reported as
//! p50/p99/p99.9 from HDR histograms, a rate, and a ratio to the baseline of the same run.
//!
//! Runs as `cargo bench` (`benches/cargo_bench.rs`) and as `vmpager bench [--quick] [--json
//! FILE]`. It never asserts a timing: the targets are judged and printed, not enforced.
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

pub mod conversion;
pub mod daemon;
mod faults;
use faults::{compare_fault_rows, fault_round, vcpu_round, Accs, Placement, DEFAULT_ROW};
pub mod firecracker;
pub mod footprint;
pub mod handler;
pub mod ipc;
pub mod mailbox;
pub mod migration;
pub mod migration_downtime;
pub mod plot;
pub mod report;
pub mod row;
pub mod snapshot_restore;
pub mod touch;
pub mod vcpu;

use daemon::Daemon;
use handler::Method;
use hdrhistogram::Histogram;
use mailbox::MailboxMode;
use report::Report;
use row::{RatioOf, Row};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;
use touch::{touch, Target, PAGE};
use vmpager_client::PopulateMethod;

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The host or the build lacks something a path needs.
    #[error("{0}")]
    Setup(String),
    /// A system call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Talking to vmpagerd failed.
    #[error("vmpagerd")]
    Client(#[from] vmpager_client::ClientError),
    /// Starting vmpagerd or making the image failed.
    #[error("demo setup")]
    Demo(#[from] vmpager_client::demo::DemoError),
    /// The reference VMM failed.
    #[error("reference VMM")]
    RefVm(#[from] vmpager_client::refvmm::RefVmError),
    /// Drawing the pictures failed.
    #[error("plot")]
    Plot(#[from] plot::PlotError),
}

impl BenchError {
    fn io(what: &str, source: std::io::Error) -> BenchError {
        BenchError::Io {
            what: what.into(),
            source,
        }
    }
}

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Fewer pages and rounds (under three minutes on a 2-CPU host).
    pub quick: bool,
    /// Write the report as JSON here, and the SVG pictures next to it.
    pub json: Option<PathBuf>,
    /// The vmpagerd binary (default: next to this executable, `$VMPAGERD`, or `$PATH`).
    pub vmpagerd: Option<PathBuf>,
    /// The vmpager binary, for the Firecracker handlers (default: next to vmpagerd).
    pub vmpager: Option<PathBuf>,
    /// Run only these sections ([`SECTIONS`]); empty: all.
    pub only: Vec<String>,
}

/// The sections of a run, in order: IPC round trips, populate ioctls, host-thread faults,
/// vCPU demand paging, Firecracker's protocol, the restore benchmark, conversions, daemon
/// memory, post-copy migration between two daemons, restores from packed snapshots.
pub const SECTIONS: [&str; 10] = [
    "ipc",
    "ioctl",
    "faults",
    "vcpu",
    "firecracker",
    "restore",
    "conversion",
    "memory",
    "migration",
    "snapshot",
];

impl Options {
    fn wants(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

/// How much of each path to measure.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    fault_pages: usize,
    rounds: usize,
    round_trips: usize,
    vcpu_pages: usize,
    ioctl_pages: usize,
    conversions: usize,
    restore_bytes: u64,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                fault_pages: 2048,
                rounds: 2,
                round_trips: 20_000,
                vcpu_pages: 8192,
                ioctl_pages: 4096,
                conversions: 300,
                restore_bytes: 256 << 20,
            }
        } else {
            Sizes {
                fault_pages: 8192,
                rounds: 5,
                round_trips: 200_000,
                vcpu_pages: 32768,
                ioctl_pages: 16384,
                conversions: 3000,
                restore_bytes: 1 << 30,
            }
        }
    }
}

/// Runs every measurement; `log` gets one line per step.
pub fn run(opts: &Options, log: &mut dyn FnMut(&str)) -> Result<Report, BenchError> {
    let started = Instant::now();
    // Before anything is measured or written.
    if let Some(bad) = opts.only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
        return Err(BenchError::Setup(format!(
            "--only: no section {bad:?} (sections: {})",
            SECTIONS.join(", ")
        )));
    }
    let sizes = Sizes::new(opts.quick);
    let vmpagerd = opts
        .vmpagerd
        .clone()
        .or_else(vmpager_client::demo::find_vmpagerd)
        .ok_or_else(|| {
            BenchError::Setup(
                "vmpagerd not found: build it (cargo build --release --workspace) or set VMPAGERD"
                    .into(),
            )
        })?;
    if vmpagerd::uffd::Uffd::probe().is_err() {
        return Err(BenchError::Setup(
            "userfaultfd is not available on this host".into(),
        ));
    }
    let kvm = vmpager_client::refvmm::RefVm::kvm_available();
    let dir = std::env::temp_dir().join(format!("vmpager-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::io("bench dir", e))?;
    let _cleanup = RemoveOnDrop(dir.clone());
    let image_path = dir.join("image");
    let image_pages = sizes
        .fault_pages
        .max(sizes.vcpu_pages)
        .max(sizes.ioctl_pages);
    vmpager_client::demo::write_image(&image_path, (image_pages * PAGE) as u64, 9)?;
    let image = File::open(&image_path).map_err(|e| BenchError::io("open image", e))?;

    let mut rows = Vec::new();
    if opts.wants("ipc") {
        log("round trips: eventfd, unix socket, mailbox");
        rows.extend(round_trip_rows(sizes));
    }
    if opts.wants("ioctl") {
        log("populate ioctls with nobody waiting");
        rows.extend(ioctl_rows(sizes, &image)?);
    }
    let mut accs = Accs::default();
    for round in (0..sizes.rounds).filter(|_| opts.wants("faults")) {
        log(&format!(
            "host-thread faults, round {}/{}",
            round + 1,
            sizes.rounds
        ));
        fault_round(&mut accs, sizes, &image, &vmpagerd, &dir)?;
    }
    if kvm && opts.wants("vcpu") {
        for round in 0..sizes.rounds {
            log(&format!(
                "vCPU demand paging, round {}/{}",
                round + 1,
                sizes.rounds
            ));
            vcpu_round(&mut accs, sizes, &image, &vmpagerd, &dir)?;
        }
    } else if !kvm {
        log("no /dev/kvm: vCPU rows skipped");
    }
    rows.extend(compare_fault_rows(accs.rows()));
    let vmpager = opts
        .vmpager
        .clone()
        .unwrap_or_else(|| vmpagerd.with_file_name("vmpager"));
    if opts.wants("firecracker") {
        log("Firecracker's protocol: host-thread faults");
        let baseline = rows
            .iter()
            .find(|r| {
                r.id == format!(
                    "in-process handler/copy blocking, {}",
                    Placement::OtherCpu.name()
                )
            })
            .cloned();
        rows.extend(firecracker::host_fault_rows(
            &vmpager,
            &vmpagerd,
            &dir,
            &image_path,
            sizes.fault_pages,
            baseline.as_ref(),
        )?);
    }
    if kvm && opts.wants("restore") {
        log(&format!(
            "restore: {} MiB snapshot, 20 % read scattered by 2 vCPUs, three ways (median of {})",
            sizes.restore_bytes >> 20,
            if opts.quick { 1 } else { 3 }
        ));
        let snapshot = dir.join("restore.img");
        vmpager_client::demo::write_image(&snapshot, sizes.restore_bytes, 17)?;
        rows.extend(firecracker::restore_rows(
            &vmpager,
            &dir,
            &snapshot,
            sizes.restore_bytes,
            2,
            20,
            if opts.quick { 1 } else { 3 },
        )?);
        let _ = std::fs::remove_file(&snapshot);
    }
    if kvm && opts.wants("conversion") {
        log("conversions");
        rows.extend(conversion_rows(sizes, &vmpagerd, &dir, &rows)?);
    }
    if opts.wants("memory") {
        log("daemon memory");
        rows.extend(memory_rows(&vmpagerd, &dir)?);
    }
    let mut migration_targets = Vec::new();
    if opts.wants("migration") {
        let m = migration::run(opts.quick, &dir, log)?;
        rows.extend(m.rows);
        migration_targets = m.targets;
        if kvm {
            rows.extend(migration_downtime::run(opts.quick, &vmpagerd, &dir, log)?);
        } else {
            log("migration: no /dev/kvm here, so no downtime rows with real vCPUs");
        }
    }
    if opts.wants("snapshot") {
        rows.extend(snapshot_restore::run(opts.quick, &dir, log)?);
    }

    let mut report = Report {
        quick: opts.quick,
        rounds: sizes.rounds,
        host: host_description(),
        elapsed_s: 0.0,
        rows,
        targets: Vec::new(),
    };
    for (mode, placement) in [
        ("blocking", Placement::OtherCpu),
        ("blocking", Placement::SameCpu),
        ("busy-poll", Placement::OtherCpu),
    ] {
        let p = placement.name();
        report.target(
            &format!("vmpagerd 4 KiB fault p50 / in-process handler: copy {mode}, {p}"),
            &format!("vmpagerd/copy {mode}, {p}"),
            &format!("in-process handler/copy {mode}, {p}"),
            RatioOf::P50,
            1.1,
        );
    }
    report.target(
        "vmpagerd default waiting mode (adaptive) p50 / in-process handler, both on the faulting CPU",
        &format!("vmpagerd/copy adaptive, {}", Placement::SameCpu.name()),
        &format!("in-process handler/copy blocking, {}", Placement::SameCpu.name()),
        RatioOf::P50,
        1.5,
    );
    report.target(
        "vmpagerd defaults, nothing pinned, p50 / in-process handler on the faulting CPU",
        &format!("vmpagerd/{DEFAULT_ROW}"),
        &format!(
            "in-process handler/copy blocking, {}",
            Placement::SameCpu.name()
        ),
        RatioOf::P50,
        1.5,
    );
    report.target(
        "vCPU demand paging, vmpagerd default / kernel first touch (anon)",
        "vcpu/vmpagerd, fault-around + prefetch (default)",
        "vcpu/kernel first touch, anon",
        RatioOf::Rate,
        2.5,
    );
    report.target_at_most(
        "restore time, working set replayed / Firecracker's example handler",
        "restore/(c) vmpager replaying the working set: until the workload is done",
        "restore/(a) Firecracker's example handler: until the workload is done",
        1.0 / 3.0,
    );
    report.target_at_most(
        "restore faults, working set replayed / Firecracker's example handler",
        "restore/(c) vmpager replaying the working set: faults",
        "restore/(a) Firecracker's example handler: faults",
        0.1,
    );
    let spin = report
        .row("mailbox/mailbox, both sides spinning")
        .and_then(Row::p50);
    report.targets.push(report::Target {
        name: "mailbox round trip p50, spinning (microseconds, not a ratio)".into(),
        ratio: spin.map(|ns| ns / 1e3),
        bound: 0.5,
        at_most: true,
        met: spin.map(|ns| ns / 1e3 <= 0.5),
    });
    report.targets.extend(migration_targets);
    report.elapsed_s = started.elapsed().as_secs_f64();
    if let Some(json) = &opts.json {
        write_outputs(&report, json)?;
    }
    Ok(report)
}

/// Writes `report` as JSON to `json`, and its pictures next to it.
pub fn write_outputs(report: &Report, json: &Path) -> Result<Vec<PathBuf>, BenchError> {
    let dir = json
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| BenchError::io("output dir", e))?;
    let text =
        serde_json::to_string_pretty(report).map_err(|e| BenchError::io("json", e.into()))?;
    std::fs::write(json, text).map_err(|e| BenchError::io("write json", e))?;
    let stem = json.file_stem().and_then(|s| s.to_str()).unwrap_or("bench");
    let mut written = vec![json.to_path_buf()];
    written.extend(plot::write_svgs(&report.rows, dir, stem)?);
    Ok(written)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn host_description() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("Linux {} ({cpus} CPUs)", release.trim())
}

fn round_trip_rows(sizes: Sizes) -> Vec<Row> {
    let n = sizes.round_trips;
    let rate = |h: &Histogram<u64>| 1e9 / h.mean().max(1.0);
    let efd = ipc::eventfd_rtt(n);
    let efd_row = Row::new(
        "ipc",
        "eventfd ping-pong, both blocking",
        Some(&efd),
        rate(&efd),
        "round trips/s",
    );
    let sock = ipc::unix_socket_rtt(n);
    let sock_row = Row::new(
        "ipc",
        "unix SOCK_SEQPACKET request/reply, blocking",
        Some(&sock),
        rate(&sock),
        "round trips/s",
    )
    .compare(&efd_row, RatioOf::P50);
    let mut rows = vec![efd_row.clone(), sock_row];
    for (mode, name, count) in [
        (MailboxMode::Spinning, "mailbox, both sides spinning", n),
        (
            MailboxMode::DaemonSleeps,
            "mailbox, default (daemon sleeps on doorbell, vCPU spins first)",
            n,
        ),
        (MailboxMode::BothSleep, "mailbox, both sides asleep", n / 4),
    ] {
        let h = mailbox::mailbox_rtt(count, mode);
        rows.push(
            Row::new("mailbox", name, Some(&h), rate(&h), "round trips/s")
                .compare(&efd_row, RatioOf::P50),
        );
    }
    rows
}

fn ioctl_rows(sizes: Sizes, image: &File) -> Result<Vec<Row>, BenchError> {
    let mut rows: Vec<Row> = Vec::new();
    for (method, chunk) in [
        (Method::Copy, 1),
        (Method::Continue, 1),
        (Method::Zero, 1),
        (Method::Copy, 512),
        (Method::Continue, 512),
    ] {
        let pages = if chunk == 1 {
            sizes.ioctl_pages.min(4096)
        } else {
            sizes.ioctl_pages
        };
        let h = handler::ioctl_cost(method, pages, chunk, image)
            .map_err(|e| BenchError::io("populate ioctl", e))?;
        let size = if chunk == 1 { "4 KiB" } else { "2 MiB" };
        let name = format!("UFFDIO_{} {size}", method.name().to_uppercase());
        let pages_per_sec = chunk as f64 * 1e9 / h.mean().max(1.0);
        let mut row = Row::new("ioctl", &name, Some(&h), pages_per_sec, "pages/s");
        if let Some(base) = rows
            .iter()
            .find(|r| r.name == format!("UFFDIO_{} 4 KiB", method.name().to_uppercase()))
        {
            row = row.compare(base, RatioOf::Rate);
        }
        rows.push(row);
    }
    Ok(rows)
}

fn conversion_rows(
    sizes: Sizes,
    vmpagerd: &Path,
    dir: &Path,
    rows: &[Row],
) -> Result<Vec<Row>, BenchError> {
    // The worker on CPU 0, the vCPU thread on CPU 1 (as the IPC and mailbox rows).
    let d = Daemon::start(
        vmpagerd,
        dir,
        &[
            "--workers",
            "1",
            "--worker-cpus",
            "0",
            "--emulate-attributes",
        ],
    )?;
    let base = rows
        .iter()
        .find(|r| r.id.starts_with("mailbox/mailbox, default"));
    let mut out = Vec::new();
    for (pages, name) in [
        (1, "4 KiB to private and back"),
        (512, "2 MiB to private and back"),
    ] {
        let (h, elapsed) = conversion::convert(&d.client, pages, sizes.conversions)?;
        let rate = (sizes.conversions * 2) as f64 / elapsed.as_secs_f64().max(1e-9);
        let mut row = Row::new("conversion", name, Some(&h), rate, "conversions/s");
        if let Some(b) = base {
            row = row.compare(b, RatioOf::P50);
        }
        out.push(row);
    }
    d.stop()?;
    Ok(out)
}

fn memory_rows(vmpagerd: &Path, dir: &Path) -> Result<Vec<Row>, BenchError> {
    const MIB: usize = 1 << 20;
    let d = Daemon::start(vmpagerd, dir, &["--workers", "1"])?;
    let measure = |d: &Daemon| {
        footprint::overhead_bytes(d.pid()).map_err(|e| BenchError::io("/proc status", e))
    };
    let idle = measure(&d)?;
    let small: Vec<_> = (0..8)
        .map(|_| d.vm(64 * MIB / PAGE, None, PopulateMethod::Copy))
        .collect::<Result<_, _>>()?;
    let eight = measure(&d)?;
    let per_vm = eight.saturating_sub(idle) as f64 / 8.0;
    // One fault in each: what serving adds to a VM (its latency histogram, allocated at the
    // first fault; its share of the worker's buffers).
    for vm in &small {
        // SAFETY: the VM's region stays mapped for the call; vmpagerd serves it.
        unsafe {
            touch(
                Target {
                    base: vm.regions()[0].host_addr(),
                    pages: 1,
                },
                1,
                None,
            )
        };
    }
    let active = measure(&d)?;
    let per_active_vm = active.saturating_sub(idle) as f64 / 8.0;
    let big = d.vm(16 << 30 >> 12, None, PopulateMethod::Copy)?;
    let with_big = measure(&d)?;
    let per_gib = (with_big.saturating_sub(active) as f64 - per_vm).max(0.0) / 16.0;
    drop(big);
    drop(small);
    // Every page of a GiB served, at the margin: the second GiB of a 2 GiB VM read
    // sequentially by one thread, after the first (one-time costs — the worker's buffers
    // becoming resident, the VM's histogram — are in the first); with copy, then continue
    // (which installs each page through the daemon's own mapping first).
    let mut served = [0.0; 2];
    for (i, method) in [PopulateMethod::Copy, PopulateMethod::Continue]
        .into_iter()
        .enumerate()
    {
        let gib = d.vm(2 << 18, None, method)?;
        let half = |h: usize| Target {
            // SAFETY: inside the VM's 2 GiB region.
            base: unsafe { gib.regions()[0].host_addr().add(h << 30) },
            pages: 1 << 18,
        };
        // SAFETY: the VM's region stays mapped for the calls; vmpagerd serves it.
        unsafe { touch(half(0), 1, None) };
        let first = measure(&d)?;
        // SAFETY: as above.
        unsafe { touch(half(1), 1, None) };
        served[i] = measure(&d)?.saturating_sub(first) as f64;
    }
    d.stop()?;
    let row = |name: &str, v: f64| Row {
        id: format!("memory/{name}"),
        group: "memory".into(),
        name: name.into(),
        latency: None,
        value: Some(v),
        unit: "bytes".into(),
        ratio: None,
    };
    Ok(vec![
        row(
            "daemon at rest (RssAnon + page tables + page-state files)",
            idle as f64,
        ),
        row("per VM (8 VMs of 64 MiB, untouched)", per_vm),
        row(
            "per VM that served a fault (the same 8 VMs, one fault each)",
            per_active_vm,
        ),
        row(
            "per GiB of guest memory (one 16 GiB VM, untouched)",
            per_gib,
        ),
        row(
            "per GiB of guest memory, every page served (the 2nd GiB of a VM)",
            served[0],
        ),
        row(
            "per GiB of guest memory, every page served with continue",
            served[1],
        ),
    ])
}
