//! `vmpager`: the vmpager command-line tool.
//!
//! `vmpager demo` starts `vmpagerd` as a separate process (or uses `--socket-path` of a running
//! one), makes a snapshot image with pseudo-random content, runs the reference VMM so the guest
//! reads every page through daemon-served faults, and checks that the guest saw every byte.
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

mod ch_restore;
mod demo;
mod firecracker;
mod interrupt;
mod migrate;
mod restore;
mod snapshot;
mod soak_vmm;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use vmpager_client::demo::{find_vmpagerd, DaemonProcess};
use vmpager_client::Client;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "vmpager: userspace page-fault service for virtual machines"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum PopulateArg {
    /// Whatever the daemon defaults to.
    Default,
    /// Bounce buffer + UFFDIO_COPY.
    Copy,
    /// Write into the memfd + UFFDIO_CONTINUE.
    Continue,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Measure every fault and exit path side by side with its baselines (kernel first touch,
    /// an in-process uffd handler, raw ioctls, IPC round trips) and print the table.
    Bench {
        /// Fewer pages and rounds (under three minutes on a 2-CPU host).
        #[arg(long)]
        quick: bool,
        /// Write the report as JSON to FILE, and SVG pictures (latency CDFs, throughput) next
        /// to it.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Also write the table as Markdown to FILE.
        #[arg(long, value_name = "FILE")]
        markdown: Option<PathBuf>,
        /// Run only these sections (comma-separated): ipc, ioctl, faults, vcpu, firecracker,
        /// restore, conversion, memory, migration, snapshot.
        #[arg(long, value_name = "SECTIONS", value_delimiter = ',')]
        only: Vec<String>,
    },
    /// The guest side of the CoCo rig (tests/coco/run): a KVM_X86_SW_PROTECTED_VM whose
    /// conversion and memory-fault exits go to vmpagerd over the mailbox. Needs a kernel with
    /// KVM_SW_PROTECTED_VM and memory attributes (the rig's L1 guest).
    CocoGuest {
        /// Use a running vmpagerd at this socket instead of starting one.
        #[arg(long)]
        socket_path: Option<PathBuf>,
    },
    /// Serve Firecracker VMs restoring a snapshot with the UFFD memory backend: a drop-in for
    /// Firecracker's page-fault handler (snapshot load with `mem_backend: {backend_type:
    /// "Uffd", backend_path: SOCKET}`). Prints one JSON event per line on stdout.
    FirecrackerHandler {
        /// The Unix socket Firecracker connects to (`backend_path`).
        socket: PathBuf,
        /// The guest memory snapshot file (`mem_file_path` of the snapshot).
        mem_file: PathBuf,
        /// Hand each VM to the vmpagerd at this socket instead of serving it in this process.
        #[arg(long, value_name = "S")]
        daemon: Option<PathBuf>,
        /// Record the order in which each VM first needs its pages to FILE (when the VM ends).
        #[arg(long, value_name = "FILE")]
        record_working_set: Option<PathBuf>,
        /// Push the pages of this recorded working set into every VM ahead of its vCPUs.
        #[arg(long, value_name = "FILE")]
        working_set: Option<PathBuf>,
    },
    /// Restore a cloud-hypervisor snapshot directory into a cloud-hypervisor waiting in
    /// `receive-migration` on RECEIVER (unix:PATH), serving its memory on demand (postcopy).
    ChRestore {
        /// The snapshot directory (config.json, state.json, memory-ranges).
        snapshot_dir: PathBuf,
        /// The receiver_url given to `ch-remote receive-migration`: unix:PATH.
        receiver: String,
        /// Hand the VM to the vmpagerd at this socket instead of serving it in this process.
        #[arg(long, value_name = "S")]
        daemon: Option<PathBuf>,
        /// Resume the restored VM (Complete) instead of leaving it paused (CompletePaused).
        #[arg(long)]
        resume: bool,
        /// JSON file holding the common_cpuid list to send (default: the minimal list
        /// cloud-hypervisor's CPUID check accepts).
        #[arg(long, value_name = "FILE")]
        common_cpuid: Option<PathBuf>,
        /// Record the order in which the guest first needs its pages to FILE.
        #[arg(long, value_name = "FILE")]
        record_working_set: Option<PathBuf>,
        /// Push the pages of this recorded working set into memory ahead of the vCPUs.
        #[arg(long, value_name = "FILE")]
        working_set: Option<PathBuf>,
    },
    /// Firecracker's example page-fault handler, reproduced (one UFFDIO_COPY per fault, one VM):
    /// the baseline `vmpager bench` measures vmpager against.
    #[command(hide = true)]
    FcExampleHandler {
        /// The socket Firecracker connects to.
        socket: PathBuf,
        /// The memory snapshot file.
        mem_file: PathBuf,
    },
    /// The VMM of the soak test (tests/soak.rs): one VM, its guest on host threads, its state
    /// kept for a successor after a SIGKILL.
    #[command(hide = true)]
    SoakVmm(soak_vmm::SoakArgs),
    /// Serve a real KVM guest's memory from a snapshot through vmpagerd and verify every byte.
    Demo {
        /// Guest memory size, e.g. 256M, 1G (multiple of 4 KiB).
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        memory: u64,
        /// Number of vCPUs reading the memory in parallel (at least 1, at most what KVM allows).
        #[arg(long, default_value_t = 2, value_parser = at_least_one)]
        vcpus: usize,
        /// Use a running vmpagerd at this socket instead of starting one.
        #[arg(long)]
        socket_path: Option<PathBuf>,
        /// How the daemon installs pages.
        #[arg(long, value_enum, default_value = "default")]
        populate: PopulateArg,
        /// Where to work (default: $TMPDIR or /tmp): the snapshot image and the daemon's socket
        /// go in a directory vmpager-demo-PID inside it, removed when the demo ends, also on
        /// SIGTERM or SIGINT.
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// Seed of the snapshot's pseudo-random content.
        #[arg(long, default_value_t = 0x766d_7061_6765_72)]
        seed: u64,
        /// Percent of the pages the guest reads: 100 checksums all of RAM; less reads that
        /// share of the pages in a scattered order (a fixed working set; needs a power-of-two
        /// number of pages per vCPU).
        #[arg(long, value_name = "PCT", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100))]
        touch: u32,
        /// Record the order in which the guest first needs its pages to FILE (readahead is
        /// off while recording, so every first touch is seen).
        #[arg(long, value_name = "FILE")]
        record_working_set: Option<PathBuf>,
        /// Push the pages of this recorded working set into memory before the guest needs
        /// them.
        #[arg(long, value_name = "FILE")]
        working_set: Option<PathBuf>,
        /// VMM live update once PCT % of the guest's pages are in: stop the vCPUs, save their
        /// state, release the VM, and let a new VMM process take it over and finish the guest.
        #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u32).range(1..=99))]
        update_at: Option<u32>,
        /// Restore the guest from the packed snapshot at URL (file:///dir, s3://bucket/prefix;
        /// docs/snapshot-format.md) instead of the image file: the daemon fetches, checks and
        /// caches its chunks. The demo's own image (same --memory and --seed) is what every
        /// byte is verified against. S3 credentials and endpoint: the AWS_* variables.
        #[arg(long, value_name = "URL", conflicts_with_all = ["update_at", "record_working_set", "working_set"])]
        snapshot_url: Option<String>,
        /// First pack the demo's image to --snapshot-url (as `vmpager snapshot pack`).
        #[arg(long, requires = "snapshot_url")]
        pack: bool,
    },
    /// Migrate a running KVM guest post-copy between two vmpagerd processes started here
    /// (through a loopback link that can add latency or be cut) and verify every byte.
    Migrate(migrate::MigrateArgs),
    /// Pack a raw memory image into the object-store snapshot format (file://, s3://), verify
    /// a packed snapshot, or unpack it.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCmd),
    /// The new VMM process of `vmpager demo --update-at` (internal).
    #[command(hide = true)]
    DemoResume {
        /// The state the previous VMM saved.
        state: PathBuf,
    },
}

/// A count that must be at least 1.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let m: u64 = match mult
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return Err(format!("bad size suffix in {s:?} (use K, M or G)")),
    };
    let v = n
        .checked_mul(m)
        .ok_or_else(|| format!("size {s:?} is too large"))?;
    if v == 0 || v % 4096 != 0 {
        return Err(format!("size {s:?} must be a non-zero multiple of 4 KiB"));
    }
    Ok(v)
}

fn main() {
    let args = Args::parse();
    // The long-running front ends log what they serve; the others only warnings.
    let default_level = match args.command {
        Cmd::FirecrackerHandler { .. } | Cmd::ChRestore { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMPAGER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match args.command {
        Cmd::FirecrackerHandler {
            socket,
            mem_file,
            daemon,
            record_working_set,
            working_set,
        } => firecracker::run(firecracker::Options {
            socket,
            mem_file,
            daemon,
            record: record_working_set,
            replay: working_set,
        }),
        Cmd::ChRestore {
            snapshot_dir,
            receiver,
            daemon,
            resume,
            common_cpuid,
            record_working_set,
            working_set,
        } => ch_restore::run(ch_restore::Options {
            snapshot: snapshot_dir,
            receiver,
            daemon,
            resume,
            common_cpuid,
            record: record_working_set,
            replay: working_set,
        }),
        Cmd::Bench {
            quick,
            json,
            markdown,
            only,
        } => bench_cmd(quick, json, markdown, only),
        Cmd::CocoGuest { socket_path } => coco_cmd(socket_path),
        Cmd::SoakVmm(args) => soak_vmm::run(args),
        Cmd::FcExampleHandler { socket, mem_file } => {
            vmpager_bench::firecracker::example_handler(&socket, &mem_file)
                .context("the example handler failed")
        }
        Cmd::Demo {
            memory,
            vcpus,
            socket_path,
            populate,
            workdir,
            seed,
            touch,
            record_working_set,
            working_set,
            update_at,
            snapshot_url,
            pack,
        } => demo::run(demo::Options {
            memory,
            vcpus,
            socket_path,
            populate,
            workdir,
            seed,
            touch,
            record: record_working_set,
            replay: working_set,
            update_at,
            snapshot_url,
            pack,
        }),
        Cmd::DemoResume { state } => demo::resume(&state),
        Cmd::Migrate(args) => migrate::run(args),
        Cmd::Snapshot(cmd) => snapshot::run(cmd),
    };
    if let Err(e) = result {
        eprintln!("vmpager: {e:#}");
        std::process::exit(1);
    }
}

fn bench_cmd(
    quick: bool,
    json: Option<PathBuf>,
    markdown: Option<PathBuf>,
    only: Vec<String>,
) -> anyhow::Result<()> {
    // Written at the end of the run: refused before it if they cannot be.
    for (option, path) in [("--json", &json), ("--markdown", &markdown)] {
        if let Some(path) = path {
            check_writable(option, path)?;
        }
    }
    let opts = vmpager_bench::Options {
        quick,
        json: json.clone(),
        vmpagerd: None,
        vmpager: std::env::current_exe().ok(),
        only,
    };
    let report = vmpager_bench::run(&opts, &mut |step| eprintln!("bench: {step}"))?;
    println!(
        "vmpager bench{}: {}, {} rounds, {:.0} s",
        if quick { " --quick" } else { "" },
        report.host,
        report.rounds,
        report.elapsed_s
    );
    print!("{}", report.table());
    if let Some(path) = markdown {
        std::fs::write(&path, report.markdown())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = json {
        println!("wrote {} and its pictures", path.display());
    }
    Ok(())
}

/// A file that can be written at `path` (its directory is created if missing).
fn check_writable(option: &str, path: &std::path::Path) -> anyhow::Result<()> {
    if path.is_dir() {
        bail!("{option} {}: is a directory", path.display());
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{option}: cannot create {}", dir.display()))?;
    rustix::fs::access(dir, rustix::fs::Access::WRITE_OK)
        .with_context(|| format!("{option}: cannot write in {}", dir.display()))?;
    Ok(())
}

fn coco_cmd(socket_path: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("vmpager-coco-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveDir(dir.clone());
    let (daemon, socket) = match socket_path {
        Some(p) => (None, p),
        None => {
            let bin = find_vmpagerd().context("cannot find vmpagerd")?;
            let path = dir.join("vmpagerd.sock");
            (Some(DaemonProcess::spawn(&bin, &path, &[])?), path)
        }
    };
    let client = Client::connect(&socket)?;
    let report = vmpager_client::coco::run(&client)?;
    print!("{}", vmpager_client::coco::describe(&report));
    let s = report.stats;
    println!(
        "exits: hypercall={} memory_fault={} (private={}, refused={}); daemon: hypercall_exits={} memory_fault_exits={} to_private={} to_shared={} denied={} private_faults_poisoned={}; guest time {:.3} s",
        report.hypercall_exits,
        report.memory_fault_exits,
        report.private_fault_exits,
        report.denied_fault_exits,
        s.hypercall_exits,
        s.memory_fault_exits,
        s.converted_to_private,
        s.converted_to_shared,
        s.conversions_denied,
        s.private_faults_poisoned,
        report.elapsed.as_secs_f64()
    );
    drop(client);
    if let Some(d) = daemon {
        let status = d.terminate()?;
        if !status.success() {
            bail!("vmpagerd exited with {status}");
        }
    }
    if !report.passed() {
        bail!("some CoCo checks failed");
    }
    println!("coco-guest: all checks passed");
    Ok(())
}

pub(crate) struct RemoveDir(pub(crate) PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
