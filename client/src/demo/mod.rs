//! The end-to-end scenario behind `vmpager demo` and the end-to-end tests: a snapshot image, a
//! `vmpagerd` process, and real vCPUs that read every page of the snapshot through
//! daemon-served faults.
//!
//! * [`update`]: the same scenario with a VMM live update in the middle (`--update-at`).
//! * [`migrate`]: the same guest migrated post-copy between two daemons (`vmpager migrate`).

pub mod migrate;
pub mod update;
use crate::client::{Client, ClientError, PageSource, VmSpec};
use crate::refvmm::{split_evenly, GuestRegion, RefVm, RefVmError, Workload};
use crate::VmMemory;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use vmpager_protocol::{PopulateMethod, RegionSpec, Stats, PAGE_SIZE};

/// Guest physical address where the demo's RAM starts.
pub const DEMO_GPA: u64 = 4 << 30;

/// Errors of the scenario.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Talking to the daemon failed.
    #[error("vmpagerd request failed")]
    Client(#[from] ClientError),
    /// The reference VMM failed.
    #[error("the reference VMM failed")]
    Vm(#[from] RefVmError),
    /// Local I/O (image, socket, process) failed.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    /// The guest saw something else than the snapshot.
    #[error("verification failed: {0}")]
    Mismatch(String),
    /// The scenario can never run as configured.
    #[error("{0}")]
    Config(String),
    /// A migration did not complete.
    #[error("migration failed: {0}")]
    Migration(String),
    /// The faulty link between the daemons could not start.
    #[error("cannot start the link between the daemons")]
    Link(#[from] vmpager_migration::LinkError),
    /// No migration key could be drawn.
    #[error("cannot draw a migration key")]
    Key(#[from] vmpager_migration::AuthError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |e| DemoError::Io(what, e)
}

/// Deterministic pseudo-random bytes (xorshift64*), 8 at a time.
#[derive(Debug, Clone)]
pub struct PatternGen(u64);

impl PatternGen {
    /// A generator from a non-zero seed.
    pub fn new(seed: u64) -> PatternGen {
        PatternGen(seed | 1)
    }

    /// Fills `buf` (length multiple of 8).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_exact_mut(8) {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            chunk.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
    }
}

/// Writes a snapshot image of `size` bytes (multiple of 8) of pseudo-random content.
pub fn write_image(path: &Path, size: u64, seed: u64) -> Result<(), DemoError> {
    let file = File::create(path).map_err(io(format!("cannot create {}", path.display())))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut gen = PatternGen::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        gen.fill(&mut buf[..n]);
        out.write_all(&buf[..n])
            .map_err(io("cannot write the image"))?;
        left -= n as u64;
    }
    out.flush().map_err(io("cannot write the image"))
}

/// The guest checksum (`refvmm::checksum_words`) of `[offset, offset + len)` of `file`, computed
/// on the host in 1 MiB chunks (bytes past the end of the file count as zeros, as the daemon
/// serves them).
pub fn expected_checksum(file: &File, offset: u64, len: u64) -> Result<u64, DemoError> {
    checksum_with(file, offset, len, |_, word| word)
}

/// As [`expected_checksum`], with each word replaced by `word_at(position in the range, word)`.
pub(crate) fn checksum_with(
    file: &File,
    offset: u64,
    len: u64,
    word_at: impl Fn(u64, u64) -> u64,
) -> Result<u64, DemoError> {
    let mut buf = vec![0u8; (len as usize).min(1 << 20)];
    let mut h = 0u64;
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        let chunk = &mut buf[..n];
        let mut got = 0;
        while got < n {
            let r = rustix::io::pread(file, &mut chunk[got..], offset + done + got as u64)
                .map_err(|e| DemoError::Io("cannot read the image".into(), e.into()))?;
            if r == 0 {
                break;
            }
            got += r;
        }
        chunk[got..].fill(0);
        // Continue the same rolling checksum across chunks: h = rol(h, 7) ^ word.
        for (i, w) in chunk.chunks_exact(8).enumerate() {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            let word = word_at(done + 8 * i as u64, u64::from_le_bytes(word));
            h = h.rotate_left(7) ^ word;
        }
        done += n as u64;
    }
    Ok(h)
}

/// The guest checksum of a [`Workload::Scatter`] over `pages` pages of `file` from `offset`.
pub fn expected_scatter(
    file: &File,
    offset: u64,
    pages: u64,
    stride: u64,
    count: u64,
) -> Result<u64, DemoError> {
    let mut words = Vec::with_capacity(count as usize);
    for page in crate::refvmm::scatter_order(pages, stride, count) {
        let mut w = [0u8; 8];
        // Past the end of the image: zeros, as the daemon serves them.
        rustix::io::pread(file, &mut w, offset + page * PAGE_SIZE)
            .map_err(|e| DemoError::Io("cannot read the image".into(), e.into()))?;
        words.push(u64::from_le_bytes(w));
    }
    Ok(crate::refvmm::scatter_checksum(words.into_iter()))
}

/// What each vCPU reads: every word of its share of RAM, or (`touch_percent` < 100) a
/// scattered share of its pages.
pub(crate) fn read_plans(
    regions: &[GuestRegion],
    cfg: &ScenarioConfig,
) -> Result<Vec<Vec<crate::refvmm::Task>>, DemoError> {
    let plans = split_evenly(regions, cfg.vcpus, Workload::Checksum);
    if cfg.touch_percent >= 100 {
        return Ok(plans);
    }
    plans
        .into_iter()
        .map(|plan| {
            plan.into_iter()
                .map(|mut t| {
                    let pages = (t.gpa_end - t.gpa_start) / PAGE_SIZE;
                    if !pages.is_power_of_two() {
                        return Err(DemoError::Config(format!(
                            "touching {}% of the pages (--touch) needs a power-of-two number of pages per vCPU (memory / vCPUs / 4 KiB), not {pages}",
                            cfg.touch_percent
                        )));
                    }
                    let (stride, count) = scatter_plan(pages, cfg.touch_percent);
                    t.workload = Workload::Scatter { stride, count };
                    Ok(t)
                })
                .collect()
        })
        .collect()
}

/// Checks that `cfg` can run on the reference VMM with `host`'s limits before anything is
/// prepared for it (an image written, a VM created): vCPUs, memory size, the scattered reads'
/// plan. Whether the memory fits the guest's addresses is [`check_guest_fits`].
pub fn check_config(
    cfg: &ScenarioConfig,
    host: &crate::refvmm::HostLimits,
) -> Result<(), DemoError> {
    let bad = |text: String| Err(DemoError::Config(text));
    if cfg.vcpus == 0 || cfg.vcpus > host.max_vcpus {
        return bad(format!(
            "--vcpus {} is not between 1 and {}, the most this host's KVM allows",
            cfg.vcpus, host.max_vcpus
        ));
    }
    if cfg.memory == 0 || !cfg.memory.is_multiple_of(PAGE_SIZE) {
        return bad(format!(
            "the guest memory ({} bytes) must be a non-zero multiple of 4 KiB",
            cfg.memory
        ));
    }
    if cfg.memory / PAGE_SIZE < cfg.vcpus as u64 {
        return bad(format!(
            "{} vCPUs need at least {} KiB of guest memory (a page each)",
            cfg.vcpus,
            cfg.vcpus * 4
        ));
    }
    // The plan of each vCPU, over a region that is only described (never touched).
    let region = GuestRegion {
        gpa: DEMO_GPA,
        host_addr: std::ptr::NonNull::dangling(),
        size: cfg.memory,
    };
    read_plans(&[region], cfg).map(drop)
}

/// Checks that `memory` bytes from [`DEMO_GPA`] fit the reference VMM's guest addresses on
/// this host.
pub fn check_guest_fits(memory: u64, host: &crate::refvmm::HostLimits) -> Result<(), DemoError> {
    let most = host.guest_addr_limit.saturating_sub(DEMO_GPA);
    if memory > most {
        return Err(DemoError::Config(format!(
            "{} of guest memory does not fit the reference VMM's guest: its RAM starts at GPA {DEMO_GPA:#x} and this host's guest addresses end at {:#x}, so at most {}",
            human_size(memory),
            host.guest_addr_limit,
            human_size(most)
        )));
    }
    Ok(())
}

/// `N GiB` when whole, else `N.N GiB` from 1 GiB, else whole MiB.
pub fn human_size(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    if bytes >= GIB && bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// A `vmpagerd` child process serving a listening socket that this process created, so the
/// socket accepts connections before the child has even started (no readiness race).
#[derive(Debug)]
pub struct DaemonProcess {
    child: Child,
    socket_path: PathBuf,
}

impl DaemonProcess {
    /// Binds `socket_path` here and starts `binary --fd N` with the listening socket, plus
    /// `extra_args`.
    pub fn spawn(
        binary: &Path,
        socket_path: &Path,
        extra_args: &[&str],
    ) -> Result<DaemonProcess, DemoError> {
        let _ = std::fs::remove_file(socket_path);
        let sock = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| DemoError::Io("cannot create a socket".into(), e.into()))?;
        let addr = rustix::net::SocketAddrUnix::new(socket_path)
            .map_err(|e| DemoError::Io("bad socket path".into(), e.into()))?;
        rustix::net::bind(&sock, &addr)
            .and_then(|()| rustix::net::listen(&sock, 128))
            .map_err(|e| {
                DemoError::Io(
                    format!("cannot listen on {}", socket_path.display()),
                    e.into(),
                )
            })?;
        Self::spawn_with_listener(binary, sock, socket_path, extra_args)
    }

    fn spawn_with_listener(
        binary: &Path,
        listener: OwnedFd,
        socket_path: &Path,
        extra_args: &[&str],
    ) -> Result<DaemonProcess, DemoError> {
        let raw = listener.as_raw_fd();
        let mut cmd = Command::new(binary);
        cmd.arg("--fd")
            .arg(raw.to_string())
            .args(extra_args)
            .stdin(Stdio::null());
        if std::env::var_os("VMPAGER_LOG").is_none() {
            cmd.env("VMPAGER_LOG", "warn");
        }
        // The daemon starts with no signal blocked, whatever this thread blocks (`vmpager demo`
        // blocks SIGTERM and SIGINT to handle them on a thread of its own): a blocked mask
        // survives exec.
        // SAFETY: sigset_t is plain data; sigemptyset initialises it before any use.
        let mut unblocked: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `unblocked` is a valid, exclusively borrowed sigset_t; this only writes it.
        unsafe { libc::sigemptyset(&mut unblocked) };
        // SAFETY: the closure runs in the child between fork and exec and only calls fcntl on an
        // fd number that is open in the parent (kept alive by `listener` until spawn returns)
        // and sigprocmask with a set initialised above (copied into the closure), all of which
        // are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let flags = libc::fcntl(raw, libc::F_GETFD);
                if flags < 0 || libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::sigprocmask(libc::SIG_SETMASK, &unblocked, std::ptr::null_mut()) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(io(format!("cannot start {}", binary.display())))?;
        drop(listener);
        Ok(DaemonProcess {
            child,
            socket_path: socket_path.to_owned(),
        })
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> Result<std::process::ExitStatus, DemoError> {
        self.signal_term();
        self.child.wait().map_err(io("cannot wait for vmpagerd"))
    }

    fn signal_term(&self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal_term();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

/// Finds the `vmpagerd` binary: `$VMPAGERD`, next to the running executable (or its parent,
/// for test binaries in `target/*/deps`), then `$PATH`.
pub fn find_vmpagerd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VMPAGERD") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("vmpagerd");
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("vmpagerd"))
            .find(|p| p.is_file())
    })
}

/// What one scenario run should do.
#[derive(Debug, Clone)]
pub struct ScenarioConfig {
    /// Guest RAM bytes (multiple of 4 KiB).
    pub memory: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// Populate method.
    pub populate: PopulateMethod,
    /// Also write a pattern from the guest and check it from the host.
    pub write_pattern: bool,
    /// Percent of the pages the guest reads: 100 checksums every word of RAM; less reads one
    /// word of that share of the pages in a scattered order ([`Workload::Scatter`]; needs a
    /// power-of-two number of pages per vCPU).
    pub touch_percent: u32,
    /// Create the VM to record its working set.
    pub record_working_set: bool,
}

impl ScenarioConfig {
    /// Every page read, nothing recorded.
    pub fn new(memory: u64, vcpus: usize, populate: PopulateMethod) -> ScenarioConfig {
        ScenarioConfig {
            memory,
            vcpus,
            populate,
            write_pattern: false,
            touch_percent: 100,
            record_working_set: false,
        }
    }
}

/// The scatter each vCPU runs over its share of `pages` pages when `percent` < 100: the odd
/// stride (near the golden ratio of the share, so visits spread out) and the pages visited.
pub fn scatter_plan(pages_per_vcpu: u64, percent: u32) -> (u64, u64) {
    let stride = ((pages_per_vcpu as f64 * 0.618_033_988_7) as u64) | 1;
    let count = pages_per_vcpu * u64::from(percent.min(100)) / 100;
    (stride, count)
}

/// What a scenario run saw.
#[derive(Debug, Clone)]
pub struct ScenarioReport {
    /// The daemon's counters after the run.
    pub stats: Stats,
    /// Pages the guest read.
    pub pages: u64,
    /// Wall time of the read pass (slowest vCPU).
    pub read_elapsed: Duration,
    /// Pages per second of the read pass.
    pub pages_per_sec: f64,
}

/// Creates a VM over `image` (or zeros when `image` is `None`) on `client`, runs the guest
/// checksum over all RAM on `cfg.vcpus` vCPUs and compares every vCPU's checksum with the image;
/// optionally writes a pattern from the guest and checks it from the host.
pub fn run_scenario(
    client: &Client,
    image: Option<&File>,
    cfg: &ScenarioConfig,
) -> Result<(VmMemory, ScenarioReport), DemoError> {
    let memory = create_scenario_vm(client, image, cfg)?;
    let report = run_guest(client, &memory, image, cfg)?;
    Ok((memory, report))
}

/// The first half of [`run_scenario`]: one region of `cfg.memory` bytes at [`DEMO_GPA`], mapped
/// here and attached.
pub fn create_scenario_vm(
    client: &Client,
    image: Option<&File>,
    cfg: &ScenarioConfig,
) -> Result<VmMemory, DemoError> {
    let source = match image {
        Some(f) => PageSource::File(f.try_clone().map_err(io("cannot duplicate the image fd"))?),
        None => PageSource::Zero,
    };
    create_scenario_vm_from(client, source, cfg)
}

/// [`create_scenario_vm`] with any page source (a packed snapshot's URL, say).
pub fn create_scenario_vm_from(
    client: &Client,
    source: PageSource,
    cfg: &ScenarioConfig,
) -> Result<VmMemory, DemoError> {
    let memory = client.create_mapped_vm(VmSpec {
        regions: vec![RegionSpec::new(DEMO_GPA, cfg.memory, 0)],
        source,
        populate: cfg.populate,
        record_working_set: cfg.record_working_set,
        ..Default::default()
    })?;
    Ok(memory)
}

/// The second half of [`run_scenario`]: the guest reads (and optionally writes) all of `memory`.
pub fn run_guest(
    client: &Client,
    memory: &VmMemory,
    image: Option<&File>,
    cfg: &ScenarioConfig,
) -> Result<ScenarioReport, DemoError> {
    let regions = guest_regions(memory);
    // SAFETY: the regions are mapped by `memory`, borrowed for longer than `vm` lives (it is
    // dropped at the end of this function).
    let vm = unsafe { RefVm::new(&regions, cfg.vcpus)? };
    let plans = read_plans(&regions, cfg)?;
    let reports = vm.run(&plans)?;
    finish_guest(client, memory, &vm, image, cfg, &plans, &reports)
}

/// The regions of `memory` as the reference VMM maps them.
pub(crate) fn guest_regions(memory: &VmMemory) -> Vec<GuestRegion> {
    memory
        .regions()
        .iter()
        .map(|r| GuestRegion {
            gpa: r.spec().gpa(),
            host_addr: r.host_addr(),
            size: r.len() as u64,
        })
        .collect()
}

/// After the read pass (`reports` of `plans`): checks every checksum against the image, runs
/// and checks the write pattern if asked, and reports with the daemon's counters.
pub(crate) fn finish_guest(
    client: &Client,
    memory: &VmMemory,
    vm: &RefVm,
    image: Option<&File>,
    cfg: &ScenarioConfig,
    plans: &[Vec<crate::refvmm::Task>],
    reports: &[crate::refvmm::VcpuReport],
) -> Result<ScenarioReport, DemoError> {
    let regions = guest_regions(memory);
    let mut read_elapsed = Duration::ZERO;
    for (vcpu, (plan, report)) in plans.iter().zip(reports).enumerate() {
        read_elapsed = read_elapsed.max(report.elapsed);
        for (task, result) in plan.iter().zip(&report.results) {
            let offset = task.gpa_start - DEMO_GPA;
            let len = task.gpa_end - task.gpa_start;
            let expected = match (image, task.workload) {
                (Some(f), Workload::Scatter { stride, count }) => {
                    expected_scatter(f, offset, len / PAGE_SIZE, stride, count)?
                }
                (Some(f), _) => expected_checksum(f, offset, len)?,
                (None, _) => 0,
            };
            if result.value != expected {
                return Err(DemoError::Mismatch(format!(
                    "vCPU {vcpu}: checksum of GPA {:#x}..{:#x} is {:#018x}, the snapshot's is {expected:#018x}",
                    task.gpa_start, task.gpa_end, result.value
                )));
            }
        }
        if report.results.len() != plan.len() {
            return Err(DemoError::Mismatch(format!(
                "vCPU {vcpu} finished {} of its {} tasks",
                report.results.len(),
                plan.len()
            )));
        }
    }
    if cfg.write_pattern {
        let key = 0x005e_ed0f_da7a;
        vm.run(&split_evenly(
            &regions,
            cfg.vcpus,
            Workload::WritePattern { key },
        ))?;
        for r in memory.regions() {
            for page in 0..(r.len() as u64 / PAGE_SIZE) {
                let mut word = [0u8; 8];
                rustix::io::pread(r.memfd(), &mut word, page * PAGE_SIZE)
                    .map_err(|e| DemoError::Io("cannot read guest memory".into(), e.into()))?;
                let gpa = r.spec().gpa() + page * PAGE_SIZE;
                if u64::from_le_bytes(word) != gpa ^ key {
                    return Err(DemoError::Mismatch(format!(
                        "the guest's write to GPA {gpa:#x} is not in the memfd"
                    )));
                }
            }
        }
    }
    let stats = client.stats(memory.vm_id())?;
    let pages = plans
        .iter()
        .flatten()
        .map(|t| match t.workload {
            Workload::Scatter { count, .. } => count,
            _ => (t.gpa_end - t.gpa_start) / PAGE_SIZE,
        })
        .sum::<u64>();
    let pages_per_sec = pages as f64 / read_elapsed.as_secs_f64().max(1e-9);
    Ok(ScenarioReport {
        stats,
        pages,
        read_elapsed,
        pages_per_sec,
    })
}
