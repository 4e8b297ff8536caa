//! `vmpager`: the vmpager command-line tool.
//!
//! `vmpager demo` starts `vmpagerd` as a separate process (or uses `--socket-path` of a running
//! one), makes a snapshot image with pseudo-random content, runs the reference VMM so the guest
//! reads every page through daemon-served faults, and checks that the guest saw every byte.
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use vmpager_client::demo::{self, DaemonProcess, ScenarioConfig};
use vmpager_client::{Client, PopulateMethod};

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
enum PopulateArg {
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
    },
    /// The guest side of the CoCo rig (tests/coco/run): a KVM_X86_SW_PROTECTED_VM whose
    /// conversion and memory-fault exits go to vmpagerd over the mailbox. Needs a kernel with
    /// KVM_SW_PROTECTED_VM and memory attributes (the rig's L1 guest).
    CocoGuest {
        /// Use a running vmpagerd at this socket instead of starting one.
        #[arg(long)]
        socket_path: Option<PathBuf>,
    },
    /// Serve a real KVM guest's memory from a snapshot through vmpagerd and verify every byte.
    Demo {
        /// Guest memory size, e.g. 256M, 1G (multiple of 4 KiB).
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        memory: u64,
        /// Number of vCPUs reading the memory in parallel.
        #[arg(long, default_value_t = 2)]
        vcpus: usize,
        /// Use a running vmpagerd at this socket instead of starting one.
        #[arg(long)]
        socket_path: Option<PathBuf>,
        /// How the daemon installs pages.
        #[arg(long, value_enum, default_value = "default")]
        populate: PopulateArg,
        /// Directory for the snapshot image and the socket (default: $TMPDIR or /tmp).
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// Seed of the snapshot's pseudo-random content.
        #[arg(long, default_value_t = 0x766d_7061_6765_72)]
        seed: u64,
    },
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMPAGER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Args::parse().command {
        Cmd::Bench {
            quick,
            json,
            markdown,
        } => bench_cmd(quick, json, markdown),
        Cmd::CocoGuest { socket_path } => coco_cmd(socket_path),
        Cmd::Demo {
            memory,
            vcpus,
            socket_path,
            populate,
            workdir,
            seed,
        } => demo_cmd(memory, vcpus, socket_path, populate, workdir, seed),
    };
    if let Err(e) = result {
        eprintln!("vmpager: {e:#}");
        std::process::exit(1);
    }
}

fn bench_cmd(quick: bool, json: Option<PathBuf>, markdown: Option<PathBuf>) -> anyhow::Result<()> {
    let opts = vmpager_bench::Options {
        quick,
        json: json.clone(),
        vmpagerd: None,
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

fn demo_cmd(
    memory: u64,
    vcpus: usize,
    socket_path: Option<PathBuf>,
    populate: PopulateArg,
    workdir: Option<PathBuf>,
    seed: u64,
) -> anyhow::Result<()> {
    if vcpus == 0 {
        bail!("--vcpus must be at least 1");
    }
    let dir = workdir
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("vmpager-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _cleanup = RemoveDir(dir.clone());

    let (daemon, socket) = match socket_path {
        Some(path) => (None, path),
        None => {
            let bin = demo::find_vmpagerd().context(
                "cannot find the vmpagerd binary (build it with `cargo build --release --workspace --all-features`, or set VMPAGERD)",
            )?;
            let path = dir.join("vmpagerd.sock");
            let d = DaemonProcess::spawn(&bin, &path, &[])?;
            println!("started vmpagerd (pid {}) from {}", d.pid(), bin.display());
            (Some(d), path)
        }
    };

    let image_path = dir.join("snapshot.img");
    demo::write_image(&image_path, memory, seed)?;
    let image = std::fs::File::open(&image_path)?;
    println!(
        "snapshot: {} MiB of pseudo-random content at {}",
        memory >> 20,
        image_path.display()
    );

    let client = Client::connect(&socket)
        .with_context(|| format!("cannot reach vmpagerd at {}", socket.display()))?;
    let cfg = ScenarioConfig {
        memory,
        vcpus,
        populate: match populate {
            PopulateArg::Default => PopulateMethod::Default,
            PopulateArg::Copy => PopulateMethod::Copy,
            PopulateArg::Continue => PopulateMethod::Continue,
        },
        write_pattern: true,
    };
    let vm = demo::create_scenario_vm(&client, Some(&image), &cfg)?;
    println!(
        "vm {}: {} MiB at GPA {:#x} attached to vmpagerd; guest starting",
        vm.vm_id(),
        memory >> 20,
        demo::DEMO_GPA
    );
    let report = demo::run_guest(&client, &vm, Some(&image), &cfg)?;
    let s = report.stats;
    let method = match s.populate_method {
        1 => "copy (UFFDIO_COPY)",
        2 => "continue (write memfd + UFFDIO_CONTINUE)",
        _ => "unknown",
    };
    println!(
        "guest: {vcpus} vCPUs (ring-3 long mode) read {} pages in {:.3} s",
        report.pages,
        report.read_elapsed.as_secs_f64()
    );
    println!("populate method: {method}");
    println!(
        "faults served: {} ({} coalesced, {} EEXIST)",
        s.faults, s.coalesced, s.eexist
    );
    println!(
        "pages installed: {} from the snapshot, {} zero; {} of them ahead of a fault (fault-around, prefetch)",
        s.pages_from_source, s.pages_zero, s.pages_prefetched
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
    client.detach(vm.vm_id())?;
    drop(vm);
    if let Some(d) = daemon {
        let status = d.terminate()?;
        if !status.success() {
            bail!("vmpagerd exited with {status}");
        }
    }
    println!("verified: guest saw every byte of the snapshot");
    Ok(())
}

fn coco_cmd(socket_path: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("vmpager-coco-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveDir(dir.clone());
    let (daemon, socket) = match socket_path {
        Some(p) => (None, p),
        None => {
            let bin = demo::find_vmpagerd().context("cannot find vmpagerd")?;
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

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
