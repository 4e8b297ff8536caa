//! `vmpager demo`: starts `vmpagerd` as a separate process (or uses `--socket-path` of a running
//! one), makes a snapshot image with pseudo-random content, runs the reference VMM so the guest
//! reads every page through daemon-served faults, and checks that the guest saw every byte.
//!
//! Nothing is written before the demo knows it can run: the options against this host's KVM,
//! the memory against the daemon's per-VM limit (from its `Welcome`) and the reference guest's
//! addresses, and the image against the free space where it goes. SIGTERM and SIGINT stop it
//! cleanly ([`crate::interrupt`]).

use crate::interrupt::{Interrupts, Leftovers};
use crate::{restore, PopulateArg, RemoveDir};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use vmpager_client::demo::{self, human_size, DaemonProcess, ScenarioConfig};
use vmpager_client::refvmm::HostLimits;
use vmpager_client::{Client, PopulateMethod};

/// Free space the image leaves on its filesystem, at least.
const SPARE: u64 = 64 << 20;

/// What `vmpager demo` was asked to do.
pub struct Options {
    pub memory: u64,
    pub vcpus: usize,
    pub socket_path: Option<PathBuf>,
    pub populate: PopulateArg,
    pub workdir: Option<PathBuf>,
    pub seed: u64,
    pub touch: u32,
    pub record: Option<PathBuf>,
    pub replay: Option<PathBuf>,
    pub update_at: Option<u32>,
    pub snapshot_url: Option<String>,
    pub pack: bool,
}

/// Refuses an image of `bytes` that would not leave [`SPARE`] free on the filesystem of `dir`.
fn check_free_space(dir: &Path, bytes: u64) -> anyhow::Result<()> {
    let st = rustix::fs::statvfs(dir)
        .with_context(|| format!("cannot read the free space of {}", dir.display()))?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if free < bytes.saturating_add(SPARE) {
        bail!(
            "not enough free space for the snapshot image: {} needed (--memory) plus {} to spare, {} free where it goes, {} (choose another filesystem with --workdir)",
            human_size(bytes),
            human_size(SPARE),
            human_size(free),
            dir.parent().unwrap_or(dir).display()
        );
    }
    Ok(())
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    // First, before any thread starts: every thread inherits the blocked signals.
    let interrupts = Interrupts::install()?;
    let cfg = ScenarioConfig {
        memory: opts.memory,
        vcpus: opts.vcpus,
        populate: match opts.populate {
            PopulateArg::Default => PopulateMethod::Default,
            PopulateArg::Copy => PopulateMethod::Copy,
            PopulateArg::Continue => PopulateMethod::Continue,
        },
        write_pattern: opts.touch == 100,
        touch_percent: opts.touch,
        record_working_set: opts.record.is_some(),
    };
    if opts.update_at.is_some() && (opts.record.is_some() || opts.replay.is_some()) {
        bail!("--update-at cannot be combined with --record-working-set or --working-set");
    }
    let host = HostLimits::probe().context("the demo runs a KVM guest")?;
    demo::check_config(&cfg, &host)?;
    restore::WorkingSets::check_paths(opts.record.as_deref(), opts.replay.as_deref())?;

    let dir = opts
        .workdir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("vmpager-demo-{}", std::process::id()));
    interrupts.register(|left| {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        left.dir = Some(dir.clone());
        anyhow::Ok(())
    })?;
    let _cleanup = RemoveDir(dir.clone());
    let mut daemon = None;
    let result = scenario(&interrupts, &mut daemon, &dir, &opts, &cfg, &host);
    // The demo's own cleanup, under the lock the signal thread takes: if a signal is being
    // handled, this waits for the process to exit with its status (the scenario may have
    // failed only because the signal thread stopped the daemon); a signal from here on finds
    // nothing left to clean up.
    let stopped = interrupts.register(|left| {
        *left = Leftovers::default();
        let status = daemon.take().map(DaemonProcess::terminate).transpose();
        let _ = std::fs::remove_dir_all(&dir);
        status
    });
    result?;
    if let Some(status) = stopped? {
        if !status.success() {
            bail!("vmpagerd exited with {status}");
        }
    }
    if opts.update_at.is_some() {
        // The new VMM process said what it verified.
    } else if opts.touch == 100 {
        println!("verified: guest saw every byte of the snapshot");
    } else {
        println!(
            "verified: guest saw every word it read of the snapshot ({}% of the pages, scattered)",
            opts.touch
        );
    }
    Ok(())
}

/// Everything that may wait for the daemon: start it (unless `--socket-path`), check the
/// memory, write the image, run and verify the guest.
fn scenario(
    interrupts: &Interrupts,
    daemon: &mut Option<DaemonProcess>,
    dir: &Path,
    opts: &Options,
    cfg: &ScenarioConfig,
    host: &HostLimits,
) -> anyhow::Result<()> {
    let memory = cfg.memory;
    let socket = match &opts.socket_path {
        Some(path) => path.clone(),
        None => {
            let bin = demo::find_vmpagerd().context(
                "cannot find the vmpagerd binary (build it with `cargo build --release --workspace --all-features`, or set VMPAGERD)",
            )?;
            let path = dir.join("vmpagerd.sock");
            let d = interrupts.register(|left| {
                let d = DaemonProcess::spawn(&bin, &path, &[])?;
                left.daemons.push(d.pid());
                anyhow::Ok(d)
            })?;
            println!("started vmpagerd (pid {}) from {}", d.pid(), bin.display());
            *daemon = Some(d);
            path
        }
    };
    // The demo fails the VM itself when vmpagerd is lost (`watch_for_loss`): its vCPUs are not
    // to die of SIGBUS first.
    let options = vmpager_client::ClientOptions {
        poison_when_lost: false,
        ..restore::client_options()?
    };
    let client = Client::connect_with(&socket, options)
        .with_context(|| format!("cannot reach vmpagerd at {}", socket.display()))?;
    watch_for_loss(&client, &socket, interrupts)?;
    if memory > client.max_vm_memory() {
        bail!(
            "--memory {} exceeds the daemon's limit of {} per VM (vmpagerd --max-vm-memory-mib); nothing was written",
            human_size(memory),
            human_size(client.max_vm_memory())
        );
    }
    demo::check_guest_fits(memory, host)?;
    check_free_space(dir, memory)?;

    let image_path = dir.join("snapshot.img");
    demo::write_image(&image_path, memory, opts.seed)?;
    let image = std::fs::File::open(&image_path)?;
    println!(
        "snapshot: {} MiB of pseudo-random content at {}",
        memory >> 20,
        image_path.display()
    );
    let working_sets =
        restore::WorkingSets::open(opts.record.clone(), opts.replay.clone(), &image)?;
    let vm = match &opts.snapshot_url {
        None => demo::create_scenario_vm(&client, Some(&image), cfg)?,
        Some(url) => {
            if opts.pack {
                let s = vmpager_snapshot::Snapshots::new(Default::default())?;
                let r = s
                    .pack(&image_path, url, vmpager_snapshot::DEFAULT_CHUNK)
                    .with_context(|| format!("cannot pack the snapshot to {url}"))?;
                println!(
                    "packed to {url}: {} chunks, {} all zeros, {:.1} MiB stored",
                    r.chunks,
                    r.zero_chunks,
                    r.stored_bytes as f64 / (1 << 20) as f64
                );
            }
            println!("restoring from {url} (the image above is what the guest must see)");
            demo::create_scenario_vm_from(
                &client,
                vmpager_client::PageSource::Snapshot(url.clone()),
                cfg,
            )
            .with_context(|| format!("cannot restore from {url}"))?
        }
    };
    let replayed = working_sets.start(&client, vm.vm_id())?;
    println!(
        "vm {}: {} MiB at GPA {:#x} attached to vmpagerd; guest starting",
        vm.vm_id(),
        memory >> 20,
        demo::DEMO_GPA
    );
    if replayed > 0 {
        println!("working set: {replayed} pages queued to be pushed ahead of the guest");
    }
    let vm_id = vm.vm_id();
    let report = match opts.update_at {
        None => demo::run_guest(&client, &vm, Some(&image), cfg)?,
        Some(pct) => {
            use demo::update::{run_until_update, FirstRun};
            match run_until_update(&client, vm, (&image, &image_path), &socket, cfg, pct)? {
                FirstRun::Finished(report) => {
                    println!("update: the guest finished before {pct}% of its pages were in");
                    report
                }
                FirstRun::Paused(state) => {
                    let path = dir.join("update.json");
                    state.save(&path)?;
                    println!(
                        "update: {}% of the pages in; vCPUs stopped and their state saved; VM {vm_id} released; starting a new VMM process",
                        state.at_percent
                    );
                    return hand_over(&path);
                }
            }
        }
    };
    print_report(cfg, &report)?;
    if let Some(n) = working_sets.finish(&client, vm_id)? {
        println!("working set: {n} pages recorded");
    }
    client.detach(vm_id)?;
    Ok(())
}

/// If vmpagerd goes away and no vmpagerd takes the VM back in time, the VM is failed: say so
/// and exit (the vCPUs would otherwise get SIGBUS on the next page nobody serves). A vmpagerd
/// started again on the same socket in time takes the VM back and the guest goes on.
fn watch_for_loss(client: &Client, socket: &Path, interrupts: &Interrupts) -> anyhow::Result<()> {
    let lost = client.lost_fd().try_clone_to_owned()?;
    let socket = socket.to_owned();
    let deadline = restore::client_options()?.restart_deadline;
    let cleanup = interrupts.clone();
    std::thread::Builder::new()
        .name("demo-watch".into())
        .spawn(move || {
            let mut fds = [rustix::event::PollFd::new(&lost, rustix::event::PollFlags::IN)];
            while rustix::event::poll(&mut fds, None).is_err() {}
            eprintln!(
                "vmpager demo: vmpagerd at {} went away and did not come back within {} s: the VM is failed",
                socket.display(),
                deadline.as_secs_f64()
            );
            cleanup.exit_now(1);
        })?;
    Ok(())
}

/// Starts the new VMM process (`vmpager demo-resume STATE`) and waits for it: it takes the VM
/// over and finishes the guest.
fn hand_over(state: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the vmpager binary")?;
    let status = std::process::Command::new(exe)
        .arg("demo-resume")
        .arg(state)
        .status()
        .context("cannot start the new VMM process")?;
    if !status.success() {
        bail!("the new VMM process failed ({status})");
    }
    Ok(())
}

/// `vmpager demo-resume STATE`: the new VMM of a live update.
pub fn resume(state: &Path) -> anyhow::Result<()> {
    let state = demo::update::UpdateState::load(state)?;
    println!(
        "new VMM (pid {}): taking VM {} over from the saved state",
        std::process::id(),
        state.vm_id
    );
    let (_client, report) = demo::update::resume_after_update(&state)?;
    print_report(&state.cfg, &report)?;
    println!(
        "verified: guest saw every byte of the snapshot across a VMM update at {}% (new VMM pid {})",
        state.at_percent,
        std::process::id()
    );
    Ok(())
}

/// The lines every demo run prints about what the guest and the daemon did.
fn print_report(cfg: &ScenarioConfig, report: &demo::ScenarioReport) -> anyhow::Result<()> {
    let s = report.stats;
    let method = match s.populate_method {
        1 => "copy (UFFDIO_COPY)",
        2 => "continue (write memfd + UFFDIO_CONTINUE)",
        _ => "unknown",
    };
    println!(
        "guest: {} vCPUs (ring-3 long mode) read {} pages in {:.3} s",
        cfg.vcpus,
        report.pages,
        report.read_elapsed.as_secs_f64()
    );
    println!("populate method: {method}");
    println!(
        "faults served: {} ({} coalesced, {} EEXIST)",
        s.faults, s.coalesced, s.eexist
    );
    println!(
        "pages installed: {} from the snapshot, {} zero; {} of them ahead of a fault (fault-around, prefetch), {} from the working set",
        s.pages_from_source, s.pages_zero, s.pages_prefetched, s.pages_replayed
    );
    println!(
        "fault latency (fault read -> wake): p50 {:.1} us, p99 {:.1} us, max {:.1} us",
        s.latency_p50_ns as f64 / 1e3,
        s.latency_p99_ns as f64 / 1e3,
        s.latency_max_ns as f64 / 1e3
    );
    println!("throughput: {:.0} pages/s", report.pages_per_sec);
    if s.pages_from_source + s.pages_zero < report.pages {
        bail!(
            "the daemon installed {} pages but the guest has {}",
            s.pages_from_source + s.pages_zero,
            report.pages
        );
    }
    Ok(())
}
