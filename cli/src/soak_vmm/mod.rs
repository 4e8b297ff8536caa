//! `vmpager soak-vmm` (hidden): the VMM process of the soak test (tests/soak.rs,
//! docs/soak.md), made to be killed with SIGKILL at any instruction.
//!
//! It runs one VM whose pages come from a pseudo-random snapshot image, maps it, and acts as
//! its guest from host threads (`guest`). Everything a successor needs is in the state
//! directory (`state`). The first VMM of a state directory creates the VM; a VMM that finds a
//! session there takes the VM over with its id and token (`ReattachVm`, within the daemon's
//! grace period) and checks every page against the rules before it goes on. A VMM that marked
//! every page verifies every byte, detaches and exits 0.
//!
//! On stdout, one line per event, for the driver:
//! * `attached vm=ID reattached=BOOL listed=N`: the VM is served for this process;
//! * `up PID`: the daemon with process id PID holds the VM (after the attach, and again each
//!   time a restarted daemon took it back): killing this VMM now leaves the VM to that daemon;
//! * `done vm=ID ...`: every byte verified, detached; the figures of this process.

mod guest;
mod state;

use crate::PopulateArg;
use anyhow::{bail, Context, Result};
use guest::{Guest, PAGE, WORDS};
use state::StateDir;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vmpager_client::{
    Client, ClientError, ClientOptions, PageSource, PopulateMethod, RegionSpec, VmMemory, VmSpec,
};
use vmpager_protocol::ErrorCode;
use zerocopy::IntoBytes;

/// Longer than anything that must happen takes: a hang detector, not a timing expectation.
const HANG: Duration = Duration::from_secs(120);
/// How long an exited thread may stay listed: a bound, not an expectation.
const SETTLE: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub(crate) struct SoakArgs {
    /// The daemon's socket.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Where this VM's state lives (shared with the VMMs that take it over).
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Seed of the marks the guest writes, and of the snapshot's content.
    #[arg(long)]
    seed: u64,
    /// The snapshot image (made from --image-seed if missing; default: in --state-dir).
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
    /// Seed of the snapshot's content, if not --seed.
    #[arg(long, value_name = "N")]
    image_seed: Option<u64>,
    /// Pages of guest memory (4 KiB each), split evenly over the regions.
    #[arg(long, default_value_t = 2048)]
    pages: usize,
    /// Regions of guest memory.
    #[arg(long, default_value_t = 2)]
    regions: usize,
    /// Guest threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// How the daemon installs pages.
    #[arg(long, value_enum, default_value = "default")]
    populate: PopulateArg,
}

/// Open fds and threads of this process.
fn footprint() -> (usize, usize) {
    let count = |p: &str| std::fs::read_dir(p).map_or(0, |d| d.count());
    (count("/proc/self/fd"), count("/proc/self/task"))
}

pub(crate) fn run(args: SoakArgs) -> Result<()> {
    if args.regions == 0 || args.pages == 0 || !args.pages.is_multiple_of(args.regions) {
        bail!("--pages must be a non-zero multiple of --regions");
    }
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let before = footprint();
    let dir = StateDir::new(&args.state_dir)?;
    let mut snapshot = vec![0u64; args.pages * WORDS];
    let image = args.image.clone().unwrap_or_else(|| dir.image());
    state::snapshot(
        &image,
        args.image_seed.unwrap_or(args.seed),
        snapshot.as_mut_bytes(),
    )?;
    let session = dir.session()?;
    let client = connect(&args.socket)?;
    let (memory, reattached) = match session {
        Some((vm_id, token)) => match take_over(&client, vm_id, token) {
            Ok(m) => (m, true),
            // The previous VMM verified every byte and was killed after (or while) it
            // detached: nothing is left to do.
            Err(ClientError::Refused {
                code: ErrorCode::UnknownVm,
                ..
            }) if dir.verified() => {
                println!("done vm={vm_id} detached-by-predecessor");
                return Ok(());
            }
            Err(e) => return Err(e).context(format!("cannot take VM {vm_id} over")),
        },
        None => (create(&client, &args, &dir, &image)?, false),
    };
    let vm_id = memory.vm_id();
    let (mut listed, log) = dir.progress(args.pages)?;
    let marked_before = listed.iter().filter(|&&l| l).count();
    println!("attached vm={vm_id} reattached={reattached} listed={marked_before}");
    let guest = Guest::new(args.seed, snapshot, args.regions, &memory);
    let stop = AtomicBool::new(false);
    // Every thread is joined (`pthread_join`), not only waited for as a scope does: the
    // footprint check below must not count a thread that is still exiting.
    let (verified, marked) = std::thread::scope(|s| {
        let monitor = s.spawn(|| report_daemon(&client, &stop));
        let work = (|| -> Result<(u64, usize)> {
            let mut verified = 0;
            if reattached {
                verified += guest
                    .verify_all(&listed, args.threads)
                    .context("checking the VM taken over")?;
            }
            let order = args.seed ^ (marked_before as u64).rotate_left(32);
            let marked = guest.mark_rest(&mut listed, &log, args.threads, order)?;
            verified += guest
                .verify_all(&listed, args.threads)
                .context("the final check of every byte")?;
            dir.set_verified()?;
            detach(&client, vm_id)?;
            Ok((verified, marked))
        })();
        stop.store(true, Ordering::Relaxed);
        let _ = monitor.join();
        work
    })?;
    drop(log);
    drop(guest);
    drop(memory);
    let restarts = client.restarts();
    // Gone from the daemon (not only from here) once this returns: the driver measures the
    // daemon as soon as every VMM has exited.
    if !client.disconnect(HANG) {
        bail!(
            "vmpagerd did not close the connection within {} s",
            HANG.as_secs()
        );
    }
    let after = settled(before);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mapped = maps.lines().filter(|l| l.contains("/memfd:")).count();
    println!(
        "done vm={vm_id} reattached={reattached} bytes_verified={verified} pages_marked={marked} restarts={restarts} fds={}->{} threads={}->{} memfd_mappings={mapped}",
        before.0, after.0, before.1, after.1
    );
    // The client side leaks nothing, however many daemon restarts it rode through.
    if after != before || mapped != 0 {
        bail!(
            "the client leaked: fds {} -> {}, threads {} -> {}, {mapped} memfd mappings left",
            before.0,
            after.0,
            before.1,
            after.1
        );
    }
    Ok(())
}

/// The footprint once it is back at `before`, or what it is after [`SETTLE`]: a thread that
/// was joined can still be listed in /proc for a moment (the kernel reaps it after the join
/// returns); a leaked thread or fd stays.
fn settled(before: (usize, usize)) -> (usize, usize) {
    let started = Instant::now();
    loop {
        let now = footprint();
        if now == before || started.elapsed() > SETTLE {
            return now;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Connects, retrying while the socket is not there (a daemon being restarted).
fn connect(socket: &Path) -> Result<Client> {
    let started = Instant::now();
    let options = ClientOptions {
        restart_deadline: HANG,
        ..ClientOptions::default()
    };
    loop {
        match Client::connect_with(socket, options) {
            Ok(c) => return Ok(c),
            Err(e) if started.elapsed() < HANG => {
                tracing::debug!(error = %e, "cannot connect yet");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot connect to {}", socket.display()))
            }
        }
    }
}

/// Creates the VM and saves its session before anything else happens to it.
fn create(client: &Client, args: &SoakArgs, dir: &StateDir, image: &Path) -> Result<VmMemory> {
    let per_region = (args.pages / args.regions * PAGE) as u64;
    let regions = (0..args.regions as u64)
        .map(|i| RegionSpec::new((4 + 4 * i) << 30, per_region, i * per_region))
        .collect();
    let image = std::fs::File::open(image).context("cannot open the image")?;
    let created = client
        .create_vm(VmSpec {
            regions,
            source: PageSource::File(image),
            populate: match args.populate {
                PopulateArg::Default => PopulateMethod::Default,
                PopulateArg::Copy => PopulateMethod::Copy,
                PopulateArg::Continue => PopulateMethod::Continue,
            },
            ..Default::default()
        })
        .context("cannot create the VM")?;
    let vm_id = created.vm_id;
    // Killed before this line, the VM has no successor: the daemon frees it after its grace
    // period, and the next VMM creates another.
    dir.save_session(vm_id, created.token)?;
    let memory = VmMemory::map(created).context("cannot map the VM")?;
    client
        .attach_uffd(vm_id, memory.uffd(), &memory.host_addrs())
        .context("cannot attach the uffd")?;
    Ok(memory)
}

/// `ReattachVm`, retried while the daemon has not yet seen the previous VMM's connection close
/// (it still holds the VM: `BadState`).
fn take_over(client: &Client, vm_id: u64, token: u64) -> Result<VmMemory, ClientError> {
    let started = Instant::now();
    loop {
        match client.reattach_mapped(vm_id, token) {
            Err(ClientError::Refused {
                code: ErrorCode::BadState,
                ..
            }) if started.elapsed() < HANG => std::thread::sleep(Duration::from_millis(5)),
            r => return r.map(|(memory, _)| memory),
        }
    }
}

/// `Detach`, sent again if a daemon restart interrupted it (the restarted daemon took the VM
/// back first, so it knows it).
fn detach(client: &Client, vm_id: u64) -> Result<()> {
    loop {
        match client.detach(vm_id) {
            Err(ClientError::Interrupted) => continue,
            r => return r.with_context(|| format!("cannot detach VM {vm_id}")),
        }
    }
}

/// Prints `up PID` whenever the daemon holding this client's VM changes, until `stop`.
fn report_daemon(client: &Client, stop: &AtomicBool) {
    let mut shown = None;
    while !stop.load(Ordering::Relaxed) {
        let now = client.daemon_pid();
        if now.is_some() && now != shown {
            println!("up {}", now.unwrap_or_default());
            shown = now;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
