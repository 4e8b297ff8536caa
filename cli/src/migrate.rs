//! `vmpager migrate`: a post-copy migration of a running guest between two `vmpagerd`
//! processes started here, through a loopback link that can add latency, cut its connections
//! or turn into a black hole; every byte is verified at the destination
//! ([`vmpager_client::demo::migrate`]). SIGTERM and SIGINT stop both daemons and remove the
//! work directory ([`crate::interrupt`]).

use crate::interrupt::{Interrupts, Leftovers};
use crate::{parse_size, PopulateArg, RemoveDir};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmpager_client::demo::migrate::{run_migration, MigrateConfig, MigrateReport};
use vmpager_client::demo::{self, DaemonProcess, ScenarioConfig};
use vmpager_client::refvmm::HostLimits;
use vmpager_client::PopulateMethod;

/// `vmpager migrate` options.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Guest memory size, e.g. 64M, 256M, 1G (multiple of 4 KiB).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// Number of vCPUs writing and reading the memory (at least 1).
    #[arg(long, default_value_t = 2, value_parser = crate::at_least_one)]
    vcpus: usize,
    /// How both daemons install pages.
    #[arg(long, value_enum, default_value = "default")]
    populate: PopulateArg,
    /// Switch over (stop the vCPUs at the source) once PCT % of the pages are in there.
    #[arg(long, value_name = "PCT", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=99))]
    switch_at: u32,
    /// Hybrid migration: the bulk push starts with the guest while it runs at the source; pages
    /// it writes after they were sent are invalidated at the destination and sent again.
    #[arg(long)]
    hybrid: bool,
    /// Round-trip time the link between the daemons adds, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    delay: u64,
    /// Cut every connection between the daemons once the destination has PCT % of the pages
    /// (the destination reconnects).
    #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u32).range(1..=99))]
    drop_at: Option<u32>,
    /// Black-hole the link (bytes dropped, nothing closed) once the destination has PCT % of
    /// the pages, for --blackhole-ms.
    #[arg(long, value_name = "PCT", hide = true, value_parser = clap::value_parser!(u32).range(1..=99))]
    blackhole_at: Option<u32>,
    /// How long the black hole lasts, in milliseconds.
    #[arg(long, value_name = "MS", hide = true, default_value_t = 2000)]
    blackhole_ms: u64,
    /// How long a silent migration connection lasts before it is made again (both daemons'
    /// --migration-liveness-ms).
    #[arg(long, value_name = "MS", hide = true, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..))]
    liveness_ms: u64,
    /// How long the destination waits for an unreachable source before it poisons what it
    /// lacks (its --migration-deadline), in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    deadline: u64,
    /// Where to work (default: $TMPDIR or /tmp): the snapshot image and the daemons' sockets
    /// go in a directory vmpager-migrate-PID inside it, removed at the end.
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Seed of the snapshot's pseudo-random content.
    #[arg(long, default_value_t = 0x766d_7061_6765_72)]
    seed: u64,
    /// Also write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

pub fn run(args: MigrateArgs) -> anyhow::Result<()> {
    // First, before any thread starts: every thread inherits the blocked signals.
    let interrupts = Interrupts::install()?;
    let scenario = ScenarioConfig {
        write_pattern: true,
        ..ScenarioConfig::new(
            args.memory,
            args.vcpus,
            match args.populate {
                PopulateArg::Default => PopulateMethod::Default,
                PopulateArg::Copy => PopulateMethod::Copy,
                PopulateArg::Continue => PopulateMethod::Continue,
            },
        )
    };
    let host = HostLimits::probe().context("vmpager migrate runs a KVM guest")?;
    demo::check_config(&scenario, &host)?;
    demo::check_guest_fits(args.memory, &host)?;
    let cfg = MigrateConfig {
        scenario,
        seed: args.seed,
        switch_at: args.switch_at,
        delay: Duration::from_millis(args.delay),
        drop_at: args.drop_at,
        blackhole: args
            .blackhole_at
            .map(|pct| (pct, Duration::from_millis(args.blackhole_ms))),
        liveness: Duration::from_millis(args.liveness_ms),
        deadline: Duration::from_secs(args.deadline),
        hybrid: args.hybrid,
    };
    let bin = demo::find_vmpagerd().context(
        "cannot find the vmpagerd binary (build it with `cargo build --release --workspace --all-features`, or set VMPAGERD)",
    )?;
    let dir = args
        .workdir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("vmpager-migrate-{}", std::process::id()));
    interrupts.register(|left| {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        left.dir = Some(dir.clone());
        anyhow::Ok(())
    })?;
    let _cleanup = RemoveDir(dir.clone());
    // Each daemon is registered as it starts, so a signal stops whatever has started.
    let spawn = |socket: &Path, extra: &[&str]| {
        interrupts.register(|left| {
            let d = DaemonProcess::spawn(&bin, socket, extra)?;
            left.daemons.push(d.pid());
            Ok(d)
        })
    };
    let result = run_migration(&spawn, &dir, &cfg, &|line| println!("{line}"));
    // The daemons are stopped (or being stopped by the drops of a failed run): nothing is
    // left for a signal to clean up but the directory.
    interrupts.register(|left| {
        *left = Leftovers::default();
        let _ = std::fs::remove_dir_all(&dir);
    });
    let report = result?;
    print_report(&cfg, &report);
    if let Some(path) = &args.json {
        std::fs::write(path, to_json(&cfg, &report).to_string())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if cfg.drop_at.is_some() && report.cut_at.is_none() {
        bail!("the migration completed before the link was cut (--drop-at)");
    }
    println!("verified");
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print_report(cfg: &MigrateConfig, r: &MigrateReport) {
    let c = r.status.counters;
    println!(
        "guest: {} vCPUs checksummed {} pages at the destination; every checksum and pattern word verified",
        cfg.scenario.vcpus, r.pages_checked
    );
    if cfg.hybrid {
        println!(
            "hybrid: {} of {} pages at the destination when the source paused; {} invalidated (written after they were sent) and sent again",
            r.pages_before_pause, c.total_pages, c.pages_invalidated
        );
    }
    if let Some(pct) = r.cut_at {
        println!("link cut at {pct}% of the pages");
    }
    if let Some(pct) = r.blackhole_at {
        println!(
            "link black-holed at {pct}% of the pages for {} ms",
            cfg.blackhole.map_or(0, |(_, d)| d.as_millis())
        );
    }
    println!(
        "downtime: {:.1} ms (pause requested at the source -> first KVM_RUN at the destination)",
        ms(r.downtime)
    );
    println!(
        "total migration time: {:.1} ms (pause -> destination complete)",
        ms(r.total)
    );
    println!(
        "pages: {} of {} at the destination; {} pulled by faults, {} pushed",
        c.pages_done, c.total_pages, c.pages_pulled, c.pages_pushed
    );
    println!(
        "remote fault latency: p50 {:.1} us, p99 {:.1} us",
        c.fault_p50_ns as f64 / 1e3,
        c.fault_p99_ns as f64 / 1e3
    );
    println!("reconnects: {}", c.reconnects);
}

fn to_json(cfg: &MigrateConfig, r: &MigrateReport) -> serde_json::Value {
    let c = r.status.counters;
    serde_json::json!({
        "memory": cfg.scenario.memory,
        "vcpus": cfg.scenario.vcpus,
        "delay_ms": ms(cfg.delay),
        "hybrid": cfg.hybrid,
        "pages_before_pause": r.pages_before_pause,
        "pages_invalidated": c.pages_invalidated,
        "switch_percent": r.switch_percent,
        "cut_at_percent": r.cut_at,
        "blackhole_at_percent": r.blackhole_at,
        "downtime_ms": ms(r.downtime),
        "total_ms": ms(r.total),
        "total_pages": c.total_pages,
        "pages_done": c.pages_done,
        "pages_pulled": c.pages_pulled,
        "pages_pushed": c.pages_pushed,
        "bytes": c.bytes,
        "fault_p50_ns": c.fault_p50_ns,
        "fault_p99_ns": c.fault_p99_ns,
        "reconnects": c.reconnects,
        "verified": true,
    })
}
