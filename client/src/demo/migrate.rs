//! `vmpager migrate`: a complete post-copy migration of a running guest between two `vmpagerd`
//! processes on this host.
//!
//! The source daemon serves a VM over a snapshot image; real vCPUs write a pattern word into
//! every page of their share of memory, then checksum all of it. Once PCT % of the pages are
//! installed, the source VMM stops the vCPUs ([`Pause`]) and saves their state, and the source
//! daemon is told to serve the VM (`MigrateOut`). The destination daemon pulls it (`MigrateIn`)
//! through a [`FaultyLink`] (latency, a cut, a black hole) into a VM created with
//! [`PageSource::Remote`]; a new KVM VM there gets the saved vCPU states and the guest finishes.
//! Every checksum is compared with the snapshot with the pattern applied, every pattern word
//! with the destination's memfds, and the destination must report every page present.
//!
//! Hybrid ([`MigrateConfig::hybrid`]): the migration starts with the guest, the source's uffd
//! tracks writes ([`VmMemory::track_writes`]), the push runs while the vCPUs write, and pages
//! written after they went are invalidated at the destination. At the pause the source is told
//! to switch over; the destination's vCPUs start once it reports `Switched` (every
//! invalidation applied), which is inside the measured downtime.

use super::{
    checksum_with, create_scenario_vm, guest_regions, write_image, DaemonProcess, DemoError,
    ScenarioConfig, DEMO_GPA,
};
use crate::client::{Client, PageSource, VmSpec};
use crate::refvmm::{split_evenly, Pause, RefVm, Run, Task, VcpuReport, VcpuState, Workload};
use crate::VmMemory;
use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vmpager_migration::{FaultyLink, Key};
use vmpager_protocol::message::{MigrationKey, MigrationState, MigrationStatus};
use vmpager_protocol::{RegionSpec, PAGE_SIZE};

/// XORed into each page's GPA by the guest's pattern writes.
pub const PATTERN_KEY: u64 = 0x6d69_6772_6174_6521;

/// What one `vmpager migrate` run does.
#[derive(Debug, Clone)]
pub struct MigrateConfig {
    /// Memory, vCPUs and populate method (the same on both daemons).
    pub scenario: ScenarioConfig,
    /// Seed of the snapshot's pseudo-random content.
    pub seed: u64,
    /// Switch over once this percentage of the pages is installed at the source.
    pub switch_at: u32,
    /// Round-trip time the link between the daemons adds.
    pub delay: Duration,
    /// Cut every connection of the link once the destination has this percentage of pages.
    pub drop_at: Option<u32>,
    /// Black-hole the link at this percentage, for this long.
    pub blackhole: Option<(u32, Duration)>,
    /// `vmpagerd --migration-liveness-ms` of both daemons.
    pub liveness: Duration,
    /// `vmpagerd --migration-deadline` of the destination.
    pub deadline: Duration,
    /// Hybrid: push while the guest runs at the source, invalidate what it writes after.
    pub hybrid: bool,
}

/// What a migration run measured.
#[derive(Debug, Clone)]
pub struct MigrateReport {
    /// Percent of the pages installed at the source when the vCPUs were stopped.
    pub switch_percent: u32,
    /// From the pause request at the source to the first `KVM_RUN` at the destination.
    pub downtime: Duration,
    /// From the pause request at the source to the destination's `Complete`.
    pub total: Duration,
    /// The destination's final counters.
    pub status: MigrationStatus,
    /// Percent of the pages at the destination when the link was cut (`None`: not cut).
    pub cut_at: Option<u32>,
    /// Percent of the pages at the destination when the black hole began (`None`: none).
    pub blackhole_at: Option<u32>,
    /// Pages each vCPU checksummed.
    pub pages_checked: u64,
    /// Hybrid: pages at the destination when the source was paused.
    pub pages_before_pause: u64,
}

/// A free TCP port on loopback (bound, read, closed: the daemon binds it right after).
fn free_port() -> Result<u16, DemoError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| DemoError::Io("cannot find a free port".into(), e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| DemoError::Io("cannot find a free port".into(), e))
}

/// A random non-zero migration id.
fn migration_id() -> Result<u64, DemoError> {
    let mut b = [0u8; 8];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty())
        .map_err(|e| DemoError::Io("cannot draw a migration id".into(), e.into()))?;
    Ok(u64::from_le_bytes(b) | 1)
}

/// Each vCPU writes the pattern over its share of memory, then checksums that share.
fn plans(memory: &VmMemory, vcpus: usize) -> Vec<Vec<Task>> {
    let regions = guest_regions(memory);
    let writes = split_evenly(&regions, vcpus, Workload::WritePattern { key: PATTERN_KEY });
    let reads = split_evenly(&regions, vcpus, Workload::Checksum);
    writes
        .into_iter()
        .zip(reads)
        .map(|(mut w, r)| {
            w.extend(r);
            w
        })
        .collect()
}

/// Starts a `vmpagerd` serving the socket at the path, with the extra arguments (usually
/// [`DaemonProcess::spawn`] of a binary, perhaps registering the child for cleanup).
pub type SpawnDaemon<'a> = &'a dyn Fn(&Path, &[&str]) -> Result<DaemonProcess, DemoError>;

/// Runs the migration with daemons from `spawn`, sockets and image in `dir`; `say` gets
/// progress lines.
pub fn run_migration(
    spawn: SpawnDaemon<'_>,
    dir: &Path,
    cfg: &MigrateConfig,
    say: &dyn Fn(String),
) -> Result<MigrateReport, DemoError> {
    let memory = cfg.scenario.memory;
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let liveness = cfg.liveness.as_millis().to_string();
    let deadline = cfg.deadline.as_secs().max(1).to_string();
    let src_d = spawn(
        &dir.join("source.sock"),
        &[
            "--migration-listen",
            &listen.to_string(),
            "--migration-liveness-ms",
            &liveness,
        ],
    )?;
    let dst_d = spawn(
        &dir.join("destination.sock"),
        &[
            "--migration-liveness-ms",
            &liveness,
            "--migration-deadline",
            &deadline,
        ],
    )?;
    say(format!(
        "source vmpagerd (pid {}) serving migrations on {listen}; destination vmpagerd (pid {})",
        src_d.pid(),
        dst_d.pid()
    ));
    let src = Client::connect(src_d.socket_path())?;
    let dst = Client::connect(dst_d.socket_path())?;
    for c in [&src, &dst] {
        if memory > c.max_vm_memory() {
            return Err(DemoError::Config(format!(
                "--memory {} exceeds the daemon's limit of {} per VM",
                super::human_size(memory),
                super::human_size(c.max_vm_memory())
            )));
        }
    }
    let image_path = dir.join("snapshot.img");
    write_image(&image_path, memory, cfg.seed)?;
    let image = File::open(&image_path)
        .map_err(|e| DemoError::Io(format!("cannot open {}", image_path.display()), e))?;

    // The source VM and its guest.
    let mut src_mem = create_scenario_vm(&src, Some(&image), &cfg.scenario)?;
    if cfg.hybrid {
        src_mem.track_writes().map_err(|e| match e {
            crate::memory::MemoryError::NoWriteProtect => DemoError::Config(
                "--hybrid needs userfaultfd write-protection of shared memory, which this kernel lacks".into(),
            ),
            e => DemoError::Migration(format!("cannot track the guest's writes: {e}")),
        })?;
    }
    let src_regions = guest_regions(&src_mem);
    // SAFETY: the regions are mapped by `src_mem`, which outlives `src_vm` (dropped explicitly
    // at the switchover, and declared after `src_mem`).
    let src_vm = unsafe { RefVm::new(&src_regions, cfg.scenario.vcpus)? };
    let plans = plans(&src_mem, cfg.scenario.vcpus);

    // The destination, ready before the switchover: a VM whose every page comes from the
    // source, mapped, with a KVM VM of its own; the link the daemons talk through.
    let dst_mem = dst.create_mapped_vm(VmSpec {
        regions: src_mem
            .regions()
            .iter()
            .scan(0u64, |at, r| {
                let spec = RegionSpec::new(r.spec().gpa(), r.len() as u64, *at);
                *at += r.len() as u64;
                Some(spec)
            })
            .collect(),
        source: PageSource::Remote,
        populate: cfg.scenario.populate,
        ..Default::default()
    })?;
    let dst_regions = guest_regions(&dst_mem);
    // SAFETY: the regions are mapped by `dst_mem`, declared before `dst_vm` and so dropped
    // after it.
    let dst_vm = unsafe { RefVm::new(&dst_regions, cfg.scenario.vcpus)? };
    let link = FaultyLink::start(listen, cfg.delay)?;
    let key = MigrationKey(*Key::generate()?.as_bytes());
    let id = migration_id()?;
    say(format!(
        "vm {}: {} at GPA {DEMO_GPA:#x} on the source, {} vCPUs writing a pattern, then checksumming",
        src_mem.vm_id(),
        super::human_size(memory),
        cfg.scenario.vcpus
    ));

    if cfg.hybrid {
        // The push starts with the guest; what it writes after a page went is sent again.
        src.migrate_out(src_mem.vm_id(), id, key, true)?;
        dst.migrate_in(dst_mem.vm_id(), id, key, &link.addr().to_string())?;
        say("hybrid: the push runs while the guest writes at the source".into());
    }
    let (paused_at, switch_percent, states) = run_source(&src, &src_mem, &src_vm, &plans, cfg)?;
    drop(src_vm);
    say(format!(
        "switchover: {switch_percent}% of the pages in at the source; vCPUs stopped, state saved"
    ));
    let mut pages_before_pause = 0;
    let started = if cfg.hybrid {
        pages_before_pause = dst.migration(dst_mem.vm_id())?.counters.pages_done;
        let switched = src.migrate_out(src_mem.vm_id(), id, key, false)?;
        if switched.state != MigrationState::Switched {
            return Err(DemoError::Migration(format!(
                "the source did not switch over: {:?}",
                switched.state
            )));
        }
        wait_switched(&dst, dst_mem.vm_id(), cfg)?
    } else {
        src.migrate_out(src_mem.vm_id(), id, key, false)?;
        dst.migrate_in(dst_mem.vm_id(), id, key, &link.addr().to_string())?
    };
    let total_pages = started.counters.total_pages;
    if total_pages != memory / PAGE_SIZE {
        return Err(DemoError::Mismatch(format!(
            "the destination expects {total_pages} pages, the VM has {}",
            memory / PAGE_SIZE
        )));
    }
    let base = dst_vm.vcpu_sregs()?;
    // Through the saved form a VMM would send, onto the new vCPUs' system registers.
    let states = states
        .iter()
        .map(|s| VcpuState::from_json(&s.to_json(), &base))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| DemoError::Config("a saved vCPU state is malformed".into()))?;

    let guest_over = AtomicBool::new(false);
    let (resumed, watched) = std::thread::scope(|s| {
        let watcher = s.spawn(|| watch(&dst, dst_mem.vm_id(), &link, cfg, &guest_over));
        let reports = dst_vm.resume(&plans, &states);
        let returned = Instant::now();
        guest_over.store(true, Ordering::Release);
        let watched = watcher
            .join()
            .unwrap_or_else(|_| Err(DemoError::Migration("the watcher panicked".into())));
        (reports.map(|r| (r, returned)), watched)
    });
    let watched = watched?;
    let (reports, returned) = resumed?;
    let slowest = reports.iter().map(|r| r.elapsed).max().unwrap_or_default();
    let first_run = returned.checked_sub(slowest).unwrap_or(returned);

    let pages_checked = verify(&image, &plans, &reports, &dst_mem)?;
    let status = watched.status;
    if status.state != MigrationState::Complete || status.counters.pages_done != total_pages {
        return Err(DemoError::Migration(format!(
            "the destination is {:?} with {} of {total_pages} pages",
            status.state, status.counters.pages_done
        )));
    }
    // The source learns that the destination has everything, then lets the VM go.
    let patience = Instant::now() + cfg.liveness * 10;
    while src.migration(src_mem.vm_id())?.state != MigrationState::Complete {
        if Instant::now() >= patience {
            return Err(DemoError::Migration(
                "the source never learnt that the destination has every page".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(dst_vm);
    dst.detach(dst_mem.vm_id())?;
    src.detach(src_mem.vm_id())?;
    drop((src_mem, dst_mem, src, dst, link));
    for d in [src_d, dst_d] {
        let st = d.terminate()?;
        if !st.success() {
            return Err(DemoError::Migration(format!("a vmpagerd exited with {st}")));
        }
    }
    Ok(MigrateReport {
        switch_percent,
        downtime: first_run.saturating_duration_since(paused_at),
        total: watched.complete_at.saturating_duration_since(paused_at),
        status,
        cut_at: watched.cut_at,
        blackhole_at: watched.blackhole_at,
        pages_checked,
        pages_before_pause,
    })
}

/// Hybrid: waits until the destination applied every invalidation the source sent before it
/// froze (`Switched`, or `Complete`): only then may its vCPUs run.
fn wait_switched(
    dst: &Client,
    vm_id: u64,
    cfg: &MigrateConfig,
) -> Result<MigrationStatus, DemoError> {
    let give_up = Instant::now() + cfg.deadline + cfg.liveness * 4;
    loop {
        let s = dst.migration(vm_id)?;
        match s.state {
            MigrationState::Switched | MigrationState::Complete => return Ok(s),
            MigrationState::Abandoned => {
                return Err(DemoError::Migration(
                    "the destination gave up on the source before the switchover".into(),
                ))
            }
            _ if Instant::now() >= give_up => {
                return Err(DemoError::Migration(format!(
                    "the destination never switched over: {:?}",
                    s.state
                )))
            }
            _ => std::thread::sleep(Duration::from_micros(100)),
        }
    }
}

/// Runs the guest at the source until `cfg.switch_at` % of the pages are installed, then
/// stops the vCPUs: the instant of the pause request, the percentage, the vCPU states.
fn run_source(
    src: &Client,
    memory: &VmMemory,
    vm: &RefVm,
    plans: &[Vec<Task>],
    cfg: &MigrateConfig,
) -> Result<(Instant, u32, Vec<VcpuState>), DemoError> {
    let pause = Pause::new();
    let total = cfg.scenario.memory / PAGE_SIZE;
    let target = total * u64::from(cfg.switch_at) / 100;
    let stop = AtomicBool::new(false);
    let vm_id = memory.vm_id();
    let (run, at) = std::thread::scope(|s| {
        let watcher = s.spawn(|| -> Result<Option<(Instant, u32)>, DemoError> {
            while !stop.load(Ordering::Acquire) {
                let st = src.stats(vm_id)?;
                let installed = st.pages_from_source + st.pages_zero;
                if installed >= target {
                    let at = Instant::now();
                    pause.request();
                    return Ok(Some((at, (installed * 100 / total.max(1)) as u32)));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(None)
        });
        let run = vm.run_pausable(plans, &pause);
        stop.store(true, Ordering::Release);
        let at = watcher
            .join()
            .unwrap_or_else(|_| Err(DemoError::Migration("the watcher panicked".into())));
        (run, at)
    });
    match (run?, at?) {
        (Run::Paused(states), Some((at, pct))) => Ok((at, pct, states)),
        _ => Err(DemoError::Config(format!(
            "the guest finished at the source before {}% of its pages were in: nothing to migrate (use more --memory or a lower --switch-at)",
            cfg.switch_at
        ))),
    }
}

/// What the destination's watcher saw.
struct Watched {
    status: MigrationStatus,
    complete_at: Instant,
    cut_at: Option<u32>,
    blackhole_at: Option<u32>,
}

/// Follows the destination's migration until it is `Complete`; cuts the link or black-holes
/// it on the way when asked. Gives up if it is abandoned, or (once the guest is over) after
/// the destination's deadline.
fn watch(
    dst: &Client,
    vm_id: u64,
    link: &FaultyLink,
    cfg: &MigrateConfig,
    guest_over: &AtomicBool,
) -> Result<Watched, DemoError> {
    let mut cut_at = None;
    let mut blackhole_at = None;
    let mut hole_until: Option<Instant> = None;
    let mut give_up: Option<Instant> = None;
    loop {
        let status = dst.migration(vm_id)?;
        let now = Instant::now();
        let c = status.counters;
        let pct = (c.pages_done * 100 / c.total_pages.max(1)) as u32;
        match status.state {
            MigrationState::Complete => {
                link.set_blackhole(false);
                return Ok(Watched {
                    status,
                    complete_at: now,
                    cut_at,
                    blackhole_at,
                });
            }
            MigrationState::Abandoned => {
                link.set_blackhole(false);
                return Err(DemoError::Migration(format!(
                    "the destination gave up on the source with {} of {} pages ({} poisoned)",
                    c.pages_done, c.total_pages, c.pages_poisoned
                )));
            }
            _ => {}
        }
        if let Some(at) = cfg.drop_at {
            if cut_at.is_none() && pct >= at {
                link.cut();
                cut_at = Some(pct);
            }
        }
        if let Some((at, long)) = cfg.blackhole {
            if blackhole_at.is_none() && pct >= at {
                link.set_blackhole(true);
                blackhole_at = Some(pct);
                hole_until = Some(now + long);
            }
        }
        if hole_until.is_some_and(|t| now >= t) {
            link.set_blackhole(false);
            hole_until = None;
        }
        if guest_over.load(Ordering::Acquire) && hole_until.is_none() {
            let limit = *give_up.get_or_insert(now + cfg.deadline + cfg.liveness * 4);
            if now >= limit {
                return Err(DemoError::Migration(format!(
                    "the destination is still {:?} with {} of {} pages",
                    status.state, c.pages_done, c.total_pages
                )));
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Checks every checksum the guest reported against the snapshot with the pattern applied,
/// and every pattern word in the destination's memfds; returns the pages checksummed.
fn verify(
    image: &File,
    plans: &[Vec<Task>],
    reports: &[VcpuReport],
    memory: &VmMemory,
) -> Result<u64, DemoError> {
    let mut pages = 0;
    for (vcpu, (plan, report)) in plans.iter().zip(reports).enumerate() {
        if report.results.len() != plan.len() {
            return Err(DemoError::Mismatch(format!(
                "vCPU {vcpu} finished {} of its {} tasks",
                report.results.len(),
                plan.len()
            )));
        }
        for (task, result) in plan.iter().zip(&report.results) {
            if task.workload != Workload::Checksum {
                continue;
            }
            let len = task.gpa_end - task.gpa_start;
            let gpa = task.gpa_start;
            let expected = checksum_with(image, gpa - DEMO_GPA, len, |pos, word| {
                if pos % PAGE_SIZE == 0 {
                    (gpa + pos) ^ PATTERN_KEY
                } else {
                    word
                }
            })?;
            if result.value != expected {
                return Err(DemoError::Mismatch(format!(
                    "vCPU {vcpu}: checksum of GPA {gpa:#x}..{:#x} is {:#018x}, the snapshot with the pattern gives {expected:#018x}",
                    task.gpa_end, result.value
                )));
            }
            pages += len / PAGE_SIZE;
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    for r in memory.regions() {
        let len = r.len() as u64;
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            let chunk = &mut buf[..n];
            let mut got = 0;
            while got < n {
                let k = rustix::io::pread(r.memfd(), &mut chunk[got..], off + got as u64)
                    .map_err(|e| DemoError::Io("cannot read guest memory".into(), e.into()))?;
                if k == 0 {
                    break;
                }
                got += k;
            }
            chunk[got..].fill(0);
            for (p, page) in chunk.chunks(PAGE_SIZE as usize).enumerate() {
                let gpa = r.spec().gpa() + off + p as u64 * PAGE_SIZE;
                let mut w = [0u8; 8];
                w.copy_from_slice(&page[..8]);
                if u64::from_le_bytes(w) != gpa ^ PATTERN_KEY {
                    return Err(DemoError::Mismatch(format!(
                        "the guest's write to GPA {gpa:#x} is not in the destination's memfd"
                    )));
                }
            }
            off += n as u64;
        }
    }
    Ok(pages)
}
