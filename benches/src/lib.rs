//! The vmpager benchmark harness: every path a fault or an exit can take, measured in one run
//! side by side with the baselines it should be judged against (DESIGN.md §10), reported as
//! p50/p99/p99.9 from HDR histograms, a rate, and a ratio to the baseline of the same run.
//!
//! Runs as `cargo bench` (`benches/cargo_bench.rs`) and as `vmpager bench [--quick] [--json
//! FILE]`. It never asserts a timing: the targets are judged and printed, not enforced.
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

pub mod conversion;
pub mod daemon;
pub mod footprint;
pub mod handler;
pub mod ipc;
pub mod mailbox;
pub mod plot;
pub mod report;
pub mod row;
pub mod touch;
pub mod vcpu;

use daemon::Daemon;
use handler::{Handler, HandlerWait, Method, UffdMemory};
use hdrhistogram::Histogram;
use mailbox::MailboxMode;
use report::Report;
use row::{histogram, Latency, RatioOf, Row};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
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
            }
        } else {
            Sizes {
                fault_pages: 8192,
                rounds: 5,
                round_trips: 200_000,
                vcpu_pages: 32768,
                ioctl_pages: 16384,
                conversions: 3000,
            }
        }
    }
}

/// One path accumulated over rounds: merged latency histogram, total events and time.
struct Acc {
    group: String,
    name: String,
    unit: String,
    latency: Option<Histogram<u64>>,
    /// Percentiles reported by vmpagerd (vCPU rows), from the latest round.
    reported: Option<Latency>,
    events: f64,
    secs: f64,
}

/// Rows in the order first measured.
#[derive(Default)]
struct Accs(Vec<Acc>);

impl Accs {
    fn add(
        &mut self,
        group: &str,
        name: &str,
        unit: &str,
        h: Option<&Histogram<u64>>,
        events: usize,
        d: Duration,
    ) {
        let i = match self
            .0
            .iter()
            .position(|a| a.group == group && a.name == name)
        {
            Some(i) => i,
            None => {
                self.0.push(Acc {
                    group: group.into(),
                    name: name.into(),
                    unit: unit.into(),
                    latency: None,
                    reported: None,
                    events: 0.0,
                    secs: 0.0,
                });
                self.0.len() - 1
            }
        };
        let a = &mut self.0[i];
        if let Some(h) = h {
            a.latency
                .get_or_insert_with(histogram)
                .add(h)
                .expect("same bounds");
        }
        a.events += events as f64;
        a.secs += d.as_secs_f64();
    }

    fn report(&mut self, group: &str, name: &str, l: Latency) {
        if let Some(a) = self
            .0
            .iter_mut()
            .find(|a| a.group == group && a.name == name)
        {
            a.reported = Some(l);
        }
    }

    fn rows(self) -> Vec<Row> {
        self.0
            .into_iter()
            .map(|a| {
                let mut r = Row::new(
                    &a.group,
                    &a.name,
                    a.latency.as_ref(),
                    a.events / a.secs.max(1e-9),
                    &a.unit,
                );
                if r.latency.is_none() {
                    r.latency = a.reported;
                }
                r
            })
            .collect()
    }
}

/// Runs every measurement; `log` gets one line per step.
pub fn run(opts: &Options, log: &mut dyn FnMut(&str)) -> Result<Report, BenchError> {
    let started = Instant::now();
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
    log("round trips: eventfd, unix socket, mailbox");
    rows.extend(round_trip_rows(sizes));
    log("populate ioctls with nobody waiting");
    rows.extend(ioctl_rows(sizes, &image)?);
    let mut accs = Accs::default();
    for round in 0..sizes.rounds {
        log(&format!(
            "host-thread faults, round {}/{}",
            round + 1,
            sizes.rounds
        ));
        fault_round(&mut accs, sizes, &image, &vmpagerd, &dir)?;
    }
    if kvm {
        for round in 0..sizes.rounds {
            log(&format!(
                "vCPU demand paging, round {}/{}",
                round + 1,
                sizes.rounds
            ));
            vcpu_round(&mut accs, sizes, &image, &vmpagerd, &dir)?;
        }
    } else {
        log("no /dev/kvm: vCPU rows skipped");
    }
    rows.extend(compare_fault_rows(accs.rows()));
    if kvm {
        log("conversions");
        rows.extend(conversion_rows(sizes, &vmpagerd, &dir, &rows)?);
    }
    log("daemon memory");
    rows.extend(memory_rows(&vmpagerd, &dir)?);

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

const METHODS: [(Method, PopulateMethod, bool); 3] = [
    (Method::Copy, PopulateMethod::Copy, true),
    (Method::Continue, PopulateMethod::Continue, true),
    (Method::Zero, PopulateMethod::Copy, false),
];

/// `len` bytes of fresh shared memory (a memfd and a mapping of it), no userfaultfd: the
/// kernel's own first touch of shmem.
fn shared_memory(
    len: usize,
) -> Result<
    (
        std::os::fd::OwnedFd,
        vmpager_protocol::mapping::SharedMapping,
    ),
    BenchError,
> {
    let memfd = rustix::fs::memfd_create("bench", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| BenchError::io("memfd", e.into()))?;
    rustix::fs::ftruncate(&memfd, len as u64).map_err(|e| BenchError::io("ftruncate", e.into()))?;
    let map = vmpager_protocol::mapping::SharedMapping::new(std::os::fd::AsFd::as_fd(&memfd), len)
        .map_err(|e| BenchError::io("mmap", e))?;
    Ok((memfd, map))
}

/// One round of every host-thread fault path.
fn fault_round(
    accs: &mut Accs,
    sizes: Sizes,
    image: &File,
    vmpagerd: &Path,
    dir: &Path,
) -> Result<(), BenchError> {
    let pages = sizes.fault_pages;
    let len = pages * PAGE;
    for placement in [Placement::OtherCpu, Placement::TwoThreads] {
        let (threads, cpus, tname) = (
            placement.threads(),
            Some(placement.cpus()),
            placement.name(),
        );
        let anon = vcpu::AnonMemory::new(len).map_err(|e| BenchError::io("anon", e))?;
        // SAFETY: fresh anonymous memory, alive for the call, no references into it.
        let t = unsafe {
            touch(
                Target {
                    base: anon.base(),
                    pages,
                },
                threads,
                cpus,
            )
        };
        accs.add(
            "kernel",
            &format!("first touch, anon, {tname}"),
            "faults/s",
            Some(&t.latency),
            t.pages,
            t.elapsed,
        );
        let (_memfd, map) = shared_memory(len)?;
        // SAFETY: a fresh shared mapping, alive for the call, no references into it.
        let t = unsafe {
            touch(
                Target {
                    base: map.as_ptr(),
                    pages,
                },
                threads,
                cpus,
            )
        };
        accs.add(
            "kernel",
            &format!("first touch, shmem, {tname}"),
            "faults/s",
            Some(&t.latency),
            t.pages,
            t.elapsed,
        );
    }
    // The in-process handler and vmpagerd in each waiting mode and placement.
    for (wait, wname) in [
        (HandlerWait::Blocking, "blocking"),
        (HandlerWait::BusyPoll, "busy-poll"),
    ] {
        for placement in Placement::ALL {
            if wait == HandlerWait::BusyPoll && placement == Placement::SameCpu {
                continue; // a spinner sharing the faulting thread's CPU: not a sane setup
            }
            for (method, _, _) in METHODS {
                let mem =
                    UffdMemory::new(pages, method).map_err(|e| BenchError::io("uffd memory", e))?;
                let h = Handler::start(&mem, image, method, wait, Some(0))
                    .map_err(|e| BenchError::io("handler", e))?;
                // SAFETY: `mem` stays mapped for the call and the handler serves its faults.
                let t = unsafe {
                    touch(
                        Target {
                            base: mem.base(),
                            pages,
                        },
                        placement.threads(),
                        Some(placement.cpus()),
                    )
                };
                drop(h.stop());
                let name = format!("{} {wname}, {}", method.name(), placement.name());
                accs.add(
                    "in-process handler",
                    &name,
                    "faults/s",
                    Some(&t.latency),
                    t.pages,
                    t.elapsed,
                );
            }
        }
    }
    // The floor of any handler in another process: a bare copy loop in a forked child.
    for placement in [Placement::OtherCpu, Placement::SameCpu] {
        let mem =
            UffdMemory::new(pages, Method::Copy).map_err(|e| BenchError::io("uffd memory", e))?;
        let child =
            handler::ChildHandler::start(&mem, image, 0).map_err(|e| BenchError::io("fork", e))?;
        // SAFETY: `mem` stays mapped for the call and the child serves its faults.
        let t = unsafe {
            touch(
                Target {
                    base: mem.base(),
                    pages,
                },
                1,
                Some(placement.cpus()),
            )
        };
        drop(child);
        let name = format!("copy blocking, {}", placement.name());
        accs.add(
            "child-process handler",
            &name,
            "faults/s",
            Some(&t.latency),
            t.pages,
            t.elapsed,
        );
    }
    // vmpagerd, one worker pinned to CPU 0, 4 KiB per fault.
    for mode in ["blocking", "busy-poll", "adaptive"] {
        let d = Daemon::start(
            vmpagerd,
            dir,
            &[
                "--workers",
                "1",
                "--worker-cpus",
                "0",
                "--wait-mode",
                mode,
                "--fault-around",
                "1",
                "--prefetch-max",
                "1",
            ],
        )?;
        for placement in Placement::ALL {
            if mode == "busy-poll" && placement == Placement::SameCpu {
                continue;
            }
            for (method, populate, file) in METHODS {
                let vm = d.vm(pages, file.then_some(image), populate)?;
                // SAFETY: the VM's region stays mapped for the call; vmpagerd serves it.
                let t = unsafe {
                    touch(
                        Target {
                            base: vm.regions()[0].host_addr(),
                            pages,
                        },
                        placement.threads(),
                        Some(placement.cpus()),
                    )
                };
                d.client.detach(vm.vm_id())?;
                drop(vm);
                let name = format!("{} {mode}, {}", method.name(), placement.name());
                accs.add(
                    "vmpagerd",
                    &name,
                    "faults/s",
                    Some(&t.latency),
                    t.pages,
                    t.elapsed,
                );
            }
        }
        d.stop()?;
    }
    // vmpagerd as it starts by default (adaptive, worker not pinned; readahead off so that
    // every touch is a 4 KiB fault), faulting thread not pinned either.
    let d = Daemon::start(
        vmpagerd,
        dir,
        &["--fault-around", "1", "--prefetch-max", "1"],
    )?;
    let vm = d.vm(pages, Some(image), PopulateMethod::Copy)?;
    // SAFETY: the VM's region stays mapped for the call; vmpagerd serves it.
    let t = unsafe {
        touch(
            Target {
                base: vm.regions()[0].host_addr(),
                pages,
            },
            1,
            None,
        )
    };
    d.client.detach(vm.vm_id())?;
    drop(vm);
    d.stop()?;
    accs.add(
        "vmpagerd",
        DEFAULT_ROW,
        "faults/s",
        Some(&t.latency),
        t.pages,
        t.elapsed,
    );
    Ok(())
}

/// The row of vmpagerd in its default configuration.
const DEFAULT_ROW: &str = "copy, daemon defaults (adaptive, not pinned), 1 thread not pinned";

/// Where the faulting threads run relative to the thread serving their faults (always CPU 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// One faulting thread on CPU 1: every wakeup crosses CPUs.
    OtherCpu,
    /// One faulting thread on CPU 0, sharing it with the handler.
    SameCpu,
    /// Two faulting threads, on CPUs 0 and 1.
    TwoThreads,
}

impl Placement {
    const ALL: [Placement; 3] = [
        Placement::OtherCpu,
        Placement::SameCpu,
        Placement::TwoThreads,
    ];

    fn name(self) -> &'static str {
        match self {
            Placement::OtherCpu => "1 thread on the other CPU",
            Placement::SameCpu => "1 thread on the same CPU",
            Placement::TwoThreads => "2 threads on 2 CPUs",
        }
    }

    fn threads(self) -> usize {
        if self == Placement::TwoThreads {
            2
        } else {
            1
        }
    }

    fn cpus(self) -> &'static [usize] {
        match self {
            Placement::OtherCpu => &[1],
            Placement::SameCpu => &[0],
            Placement::TwoThreads => &[0, 1],
        }
    }
}

/// The vCPU rows: no uffd (anon and shmem), the in-process handler, vmpagerd 4 KiB, with
/// fault-around, with fault-around and sequential prefetch.
fn vcpu_round(
    accs: &mut Accs,
    sizes: Sizes,
    image: &File,
    vmpagerd: &Path,
    dir: &Path,
) -> Result<(), BenchError> {
    let pages = sizes.vcpu_pages;
    let len = pages * PAGE;
    let anon = vcpu::AnonMemory::new(len).map_err(|e| BenchError::io("anon", e))?;
    // SAFETY: `anon` stays mapped for the call.
    let d = unsafe { vcpu::touch_all(anon.base(), len as u64, 1)? };
    accs.add(
        "vcpu",
        "kernel first touch, anon",
        "pages/s",
        None,
        pages,
        d,
    );
    drop(anon);
    let (_memfd, map) = shared_memory(len)?;
    // SAFETY: `map` stays mapped for the call.
    let d = unsafe { vcpu::touch_all(map.as_ptr(), len as u64, 1)? };
    accs.add(
        "vcpu",
        "kernel first touch, shmem",
        "pages/s",
        None,
        pages,
        d,
    );
    drop(map);
    for (wait, name) in [
        (
            HandlerWait::Blocking,
            "in-process handler, copy 4 KiB, blocking",
        ),
        (
            HandlerWait::BusyPoll,
            "in-process handler, copy 4 KiB, busy-poll",
        ),
    ] {
        let mem =
            UffdMemory::new(pages, Method::Copy).map_err(|e| BenchError::io("uffd memory", e))?;
        let h = Handler::start(&mem, image, Method::Copy, wait, None)
            .map_err(|e| BenchError::io("handler", e))?;
        // SAFETY: `mem` stays mapped for the call and the handler serves its faults.
        let d = unsafe { vcpu::touch_all(mem.base(), len as u64, 1)? };
        let service = h.stop();
        accs.add("vcpu", name, "pages/s", Some(&service), pages, d);
    }
    let copy = PopulateMethod::Copy;
    for (name, args, populate) in [
        (
            "vmpagerd, 4 KiB per fault",
            ["--fault-around", "1", "--prefetch-max", "1"],
            copy,
        ),
        (
            "vmpagerd, fault-around 64 KiB",
            ["--fault-around", "16", "--prefetch-max", "16"],
            copy,
        ),
        (
            "vmpagerd, fault-around + prefetch (default)",
            ["--fault-around", "16", "--prefetch-max", "512"],
            copy,
        ),
        (
            "vmpagerd, fault-around + prefetch, continue",
            ["--fault-around", "16", "--prefetch-max", "512"],
            PopulateMethod::Continue,
        ),
    ] {
        let mut all = vec!["--workers", "1"];
        all.extend(args);
        let daemon = Daemon::start(vmpagerd, dir, &all)?;
        let vm = daemon.vm(pages, Some(image), populate)?;
        // SAFETY: the VM's region stays mapped for the call; vmpagerd serves it.
        let d = unsafe { vcpu::touch_all(vm.regions()[0].host_addr(), len as u64, 1)? };
        let s = daemon.client.stats(vm.vm_id())?;
        daemon.client.detach(vm.vm_id())?;
        drop(vm);
        daemon.stop()?;
        accs.add("vcpu", name, "pages/s", None, pages, d);
        if s.latency_samples > 0 {
            accs.report(
                "vcpu",
                name,
                Latency {
                    samples: s.latency_samples,
                    p50_ns: s.latency_p50_ns as f64,
                    p99_ns: s.latency_p99_ns as f64,
                    p999_ns: s.latency_p999_ns as f64,
                    max_ns: s.latency_max_ns as f64,
                    cdf: Vec::new(),
                },
            );
        }
    }
    Ok(())
}

/// Ratios for the fault rows: in-process handler to the kernel's first touch of shmem,
/// vmpagerd to the in-process handler in the same waiting mode (adaptive to busy-poll: what it
/// spins like while faults arrive), vCPU rows to the kernel's anon first touch.
fn compare_fault_rows(rows: Vec<Row>) -> Vec<Row> {
    let find = |id: &str| rows.iter().find(|r| r.id == id).cloned();
    rows.iter()
        .cloned()
        .map(|r| {
            let two = r.name.contains(Placement::TwoThreads.name());
            let kernel = if two {
                Placement::TwoThreads
            } else {
                Placement::OtherCpu
            }
            .name();
            let base = match r.group.as_str() {
                "in-process handler" => find(&format!("kernel/first touch, shmem, {kernel}")),
                "child-process handler" => find(&format!("in-process handler/{}", r.name)),
                "vmpagerd" if r.name == DEFAULT_ROW => find(&format!(
                    "in-process handler/copy blocking, {}",
                    Placement::SameCpu.name()
                )),
                "vmpagerd" => [
                    r.name.clone(),
                    r.name.replace("adaptive", "busy-poll"),
                    r.name.replace("adaptive", "blocking"),
                ]
                .iter()
                .find_map(|n| find(&format!("in-process handler/{n}"))),
                "vcpu" if r.name != "kernel first touch, anon" => {
                    find("vcpu/kernel first touch, anon")
                }
                _ => None,
            };
            match base {
                Some(b) if r.group == "vcpu" => r.compare(&b, RatioOf::Rate),
                Some(b) => r.compare(&b, RatioOf::P50),
                None => r,
            }
        })
        .collect()
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
    let big = d.vm(16 << 30 >> 12, None, PopulateMethod::Copy)?;
    let with_big = measure(&d)?;
    let per_gib = (with_big.saturating_sub(eight) as f64 - per_vm).max(0.0) / 16.0;
    drop(big);
    drop(small);
    // Every page of a 1 GiB VM served (read sequentially by one thread).
    let before = measure(&d)?;
    let gib = d.vm(1 << 18, None, PopulateMethod::Copy)?;
    // SAFETY: the VM's region stays mapped for the call; vmpagerd serves it.
    unsafe {
        touch(
            Target {
                base: gib.regions()[0].host_addr(),
                pages: 1 << 18,
            },
            1,
            None,
        )
    };
    let served = measure(&d)?.saturating_sub(before) as f64 - per_vm;
    drop(gib);
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
        row("daemon at rest (RssAnon + page tables)", idle as f64),
        row("per VM (8 VMs of 64 MiB, untouched)", per_vm),
        row(
            "per GiB of guest memory (one 16 GiB VM, untouched)",
            per_gib,
        ),
        row(
            "per GiB of guest memory, every page served",
            served.max(0.0),
        ),
    ])
}
