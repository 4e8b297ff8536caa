//! `vmpagerd`: the vmpager daemon.
//!
//! Conventions of QEMU's vhost-user backends: `--socket-path PATH` or `--fd N`,
//! `--print-capabilities`, no self-daemonizing, a quick clean exit on SIGTERM, and an early,
//! non-zero exit on any start-up error. Under systemd: socket activation when neither
//! `--socket-path` nor `--fd` is given, and `Type=notify` readiness (`vmpagerd::systemd`).
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use rustix::net::SocketType;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use vmpagerd::access::{Allowlist, SocketAccess};
use vmpagerd::readahead::Readahead;
use vmpagerd::systemd::{self, Notifier};
use vmpagerd::wait::WaitMode;
use vmpagerd::{listener, Config, LiveVms, Populate};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PopulateArg {
    /// Bounce buffer + UFFDIO_COPY.
    Copy,
    /// Write into the memfd + UFFDIO_CONTINUE.
    Continue,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum WaitArg {
    /// Sleep in epoll until a fault arrives.
    Blocking,
    /// Never sleep (one CPU per worker).
    BusyPoll,
    /// Poll while faults keep arriving, sleep after --spin-us without any.
    Adaptive,
}

/// vmpagerd owns guest memory and serves a VMM's page faults.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Listen on a new Unix SOCK_SEQPACKET socket at PATH (guarded by PATH.lock).
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    socket_path: Option<PathBuf>,
    /// Serve an inherited, already listening SOCK_SEQPACKET socket. (Without --socket-path
    /// and --fd, the socket a service manager passes, LISTEN_FDS, is served.)
    #[arg(long, value_name = "N")]
    fd: Option<i32>,
    /// Serve Prometheus metrics at http://ADDR/metrics (ADDR is HOST:PORT, e.g.
    /// 127.0.0.1:9464; anyone who can reach it can read them).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Serve migrating VMs' memory to destination daemons on TCP at ADDR (HOST:PORT; port 0
    /// picks a free one, logged). Peers must prove the migration's key (docs/migration.md).
    #[arg(long, value_name = "ADDR")]
    migration_listen: Option<String>,
    /// How long a migration connection may stay silent (a dead or black-holed network path)
    /// before it is made again, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    migration_liveness_ms: u64,
    /// How long a destination waits for an unreachable migration source before it gives up
    /// and poisons the pages it lacks (SIGBUS in the guest, never zeros), in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    migration_deadline: u64,
    /// Migrations into this daemon pull only the pages faults and readahead ask for, with no
    /// background push; such a migration completes once the guest has touched every page
    /// (docs/migration.md, "Pull only").
    #[arg(long)]
    migration_pull_only: bool,
    /// Migrations into this daemon open no urgent channel: fault requests go on the bulk
    /// channel, behind the push. Only to measure what the urgent channel buys.
    #[arg(long, hide = true, conflicts_with = "migration_pull_only")]
    migration_one_channel: bool,
    /// A directory for the chunk cache shared by every VM restored from a snapshot URL
    /// (docs/snapshot-format.md); none by default.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<std::path::PathBuf>,
    /// The chunk cache's size limit (K/M/G suffixes); least recently used chunks go first.
    #[arg(long, value_name = "SIZE", default_value = "4G", value_parser = parse_size)]
    cache_size: u64,
    /// How long a chunk of a snapshot URL is retried before the pages waiting on it are
    /// poisoned (SIGBUS in the guest, never zeros), in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    snapshot_deadline: u64,
    /// Print this host's capabilities as JSON and exit.
    #[arg(long)]
    print_capabilities: bool,
    /// Worker threads serving faults (default: number of CPUs).
    #[arg(long)]
    workers: Option<usize>,
    /// Populate method for VMs that ask for the daemon's default.
    #[arg(long, value_enum, default_value = "copy")]
    populate: PopulateArg,
    /// Maximum guest memory per VM, in MiB (at least 1).
    #[arg(long, default_value_t = 1 << 20)]
    max_vm_memory_mib: u64,
    /// Uid allowed to connect, checked with SO_PEERCRED (repeatable; replaces the default:
    /// root and the daemon's own uid).
    #[arg(long, value_name = "UID")]
    allow_uid: Vec<u32>,
    /// Gid allowed to connect: a peer whose gid (SO_PEERCRED's: its effective gid, never its
    /// supplementary groups) is listed is served whatever its uid (repeatable; adds to the
    /// allowed uids; default: none).
    #[arg(long, value_name = "GID")]
    allow_gid: Vec<u32>,
    /// Permission bits of the --socket-path socket, in octal (default 0600: only the daemon's
    /// uid and root can connect). Never writable by others. Not for --fd or socket
    /// activation: an inherited socket keeps the mode its creator gave it.
    #[arg(long, value_name = "MODE")]
    socket_mode: Option<String>,
    /// Group (numeric) of the --socket-path socket, with a --socket-mode that lets the group
    /// connect (e.g. 0660). Not for --fd or socket activation.
    #[arg(long, value_name = "GID")]
    socket_group: Option<u32>,
    /// Daemon configuration file (TOML; its [policy] table is the private/shared policy, see
    /// docs/private-memory.md).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// On hosts without KVM memory attributes, keep them in the daemon so private VM types can
    /// be tested (every stats reply says so). Never for production guests.
    #[arg(long)]
    emulate_attributes: bool,
    /// Maximum concurrent client connections (at least 1).
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// How workers wait for faults.
    #[arg(long, value_enum, default_value = "adaptive")]
    wait_mode: WaitArg,
    /// Adaptive mode only: microseconds a worker keeps polling after its last fault, at most
    /// 1000000 [default: 200].
    #[arg(long, value_name = "US")]
    spin_us: Option<u64>,
    /// Pin worker i to the i-th CPU of this comma-separated list, CPUs this process may run on
    /// (default: not pinned).
    #[arg(long, value_name = "CPUS", value_delimiter = ',')]
    worker_cpus: Vec<usize>,
    /// Pages of the aligned block installed around each missing fault (power of two, 1..512;
    /// 1 turns fault-around off).
    #[arg(long, value_name = "PAGES", default_value_t = Readahead::default().fault_around)]
    fault_around: usize,
    /// Largest sequential prefetch window in pages (1..512; at most --fault-around turns
    /// prefetch off).
    #[arg(long, value_name = "PAGES", default_value_t = Readahead::default().prefetch_max)]
    prefetch_max: usize,
    /// Seconds a VM whose VMM released it (for an update) or went away is kept for a reattach
    /// (0: freed at once). Its memory stays allocated meanwhile.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    vm_grace: u64,
}

/// Longest adaptive spin: a worker that polls for a second after each fault is busy-polling.
const MAX_SPIN_US: u64 = 1_000_000;

impl Args {
    /// Every option checked: a value that can never work is refused here, before anything
    /// starts, with the option's name.
    fn config(&self) -> anyhow::Result<Config> {
        let mut c = Config::default();
        if let Some(w) = self.workers {
            if w == 0 || w > 256 {
                bail!("--workers must be between 1 and 256");
            }
            c.workers = w;
        }
        c.populate = match self.populate {
            PopulateArg::Copy => Populate::Copy,
            PopulateArg::Continue => Populate::Continue,
        };
        if self.max_vm_memory_mib == 0 {
            bail!("--max-vm-memory-mib must be at least 1 (0 would refuse every VM)");
        }
        c.max_vm_memory = self
            .max_vm_memory_mib
            .checked_mul(1 << 20)
            .context("--max-vm-memory-mib is too large")?;
        if self.max_connections == 0 {
            bail!("--max-connections must be at least 1 (0 would refuse every client)");
        }
        c.max_connections = self.max_connections;
        c.emulate_attributes = self.emulate_attributes;
        c.wait = match (self.wait_mode, self.spin_us) {
            (WaitArg::Blocking | WaitArg::BusyPoll, Some(_)) => {
                bail!("--spin-us applies only to --wait-mode adaptive")
            }
            (WaitArg::Blocking, None) => WaitMode::Blocking,
            (WaitArg::BusyPoll, None) => WaitMode::BusyPoll,
            (WaitArg::Adaptive, Some(us)) if us > MAX_SPIN_US => bail!(
                "--spin-us must be at most {MAX_SPIN_US} (1 s); a worker that never sleeps is --wait-mode busy-poll"
            ),
            (WaitArg::Adaptive, spin) => WaitMode::Adaptive {
                spin: spin.map_or(WaitMode::DEFAULT_SPIN, Duration::from_micros),
            },
        };
        check_worker_cpus(&self.worker_cpus)?;
        c.worker_cpus = self.worker_cpus.clone();
        c.readahead = Readahead {
            fault_around: self.fault_around,
            prefetch_max: self.prefetch_max,
        }
        .validate()
        .map_err(|e| {
            anyhow::anyhow!(
                "--fault-around {} --prefetch-max {}: {e}",
                self.fault_around,
                self.prefetch_max
            )
        })?;
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            c.policy = vmpagerd::policy::Policy::parse(&text)
                .with_context(|| format!("in {}", path.display()))?;
        }
        c.vm_grace = Duration::from_secs(self.vm_grace);
        if !self.allow_uid.is_empty() {
            c.allow.uids = self.allow_uid.clone();
        }
        c.allow.gids = self.allow_gid.clone();
        c.metrics_listen = self
            .metrics_listen
            .as_deref()
            .map(|a| socket_addr("--metrics-listen", a))
            .transpose()?;
        if self.migration_liveness_ms < 100 {
            bail!("--migration-liveness-ms must be at least 100");
        }
        c.migration_liveness = Duration::from_millis(self.migration_liveness_ms);
        c.migration_deadline = Duration::from_secs(self.migration_deadline);
        c.migration_push = !self.migration_pull_only;
        c.migration_one_channel = self.migration_one_channel;
        c.snapshots = vmpagerd::source::object::ObjectConfig {
            cache_dir: self.cache_dir.clone(),
            cache_size: self.cache_size,
            options: vmpagerd::source::object::ObjectOptions {
                deadline: Duration::from_secs(self.snapshot_deadline),
                ..Default::default()
            },
        };
        c.migration_listen = self
            .migration_listen
            .as_deref()
            .map(|a| socket_addr("--migration-listen", a))
            .transpose()?;
        Ok(c)
    }
}

impl Args {
    /// The mode and group of the socket this daemon binds (`--socket-path`). Refused for a
    /// socket it inherits, whose creator decides them.
    fn socket_access(&self) -> anyhow::Result<SocketAccess> {
        if self.socket_path.is_none() {
            if let Some(option) = [
                self.socket_mode.as_ref().map(|_| "--socket-mode"),
                self.socket_group.map(|_| "--socket-group"),
            ]
            .into_iter()
            .flatten()
            .next()
            {
                bail!(
                    "{option} applies only to --socket-path: an inherited socket (--fd, socket \
                     activation) keeps the mode and group its creator gave it (systemd: \
                     SocketMode=, SocketGroup= in the .socket unit)"
                );
            }
        }
        let mode = match &self.socket_mode {
            Some(text) => SocketAccess::parse_mode(text)?,
            None => SocketAccess::DEFAULT_MODE,
        };
        Ok(SocketAccess::new(mode, self.socket_group)?)
    }
}

/// Each CPU of `--worker-cpus` must be one this process may run on (a worker pinned elsewhere
/// would not be pinned at all).
fn check_worker_cpus(cpus: &[usize]) -> anyhow::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    let allowed = rustix::thread::sched_getaffinity(None).context("sched_getaffinity failed")?;
    let usable = |c: usize| c < rustix::thread::CpuSet::MAX_CPU && allowed.is_set(c);
    if let Some(bad) = cpus.iter().find(|&&c| !usable(c)) {
        let list: Vec<String> = (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| allowed.is_set(c))
            .map(|c| c.to_string())
            .collect();
        bail!(
            "--worker-cpus: vmpagerd may not run on CPU {bad} (it may run on {})",
            list.join(",")
        );
    }
    Ok(())
}

/// The address of `--metrics-listen` (a name resolves to its first address).
fn socket_addr(option: &str, text: &str) -> anyhow::Result<SocketAddr> {
    text.to_socket_addrs()
        .with_context(|| format!("{option} {text}: not a HOST:PORT address"))?
        .next()
        .with_context(|| format!("{option} {text}: the name has no address"))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("vmpagerd: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_capabilities {
        println!(
            "{}",
            serde_json::to_string_pretty(&vmpagerd::caps::probe())?
        );
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMPAGER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Before any fd is opened or thread started: the passed fds are 3, 4, …, and these
    // variables must not reach child processes.
    let activation = if args.socket_path.is_none() && args.fd.is_none() {
        systemd::take_listen_fds().context("socket activation")?
    } else {
        systemd::forget_listen_env();
        None
    };
    let notifier = Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot notify the service manager");
        None
    });
    let config = args.config()?;
    let access = args.socket_access()?;
    let shutdown = vmpagerd::signals::shutdown_fd()?;
    let (listener_fd, _bound) = match (&args.socket_path, args.fd, activation) {
        (None, None, Some(activation)) => {
            if !activation.others.is_empty() {
                let names: Vec<&str> = activation.others.iter().map(|(n, _)| n.as_str()).collect();
                tracing::warn!(?names, "fds passed by the service manager that this daemon does not use: closed");
            }
            (activation.control, None)
        }
        (Some(path), None, _) => {
            let bound = listener::Bound::with_access(path, SocketType::SEQPACKET, access)?;
            warn_unreachable(&config.allow, access);
            let fd = bound.listener().try_clone_to_owned()?;
            (fd, Some(bound))
        }
        (None, Some(n), _) => {
            if n < 0 {
                bail!("--fd {n} is not a file descriptor");
            }
            if n < 3 {
                bail!("--fd {n} is a standard stream, not a socket");
            }
            // SAFETY: the user hands this fd to us on the command line (inherited from the
            // parent); we are its only owner in this process, and `check_inherited` verifies
            // its type before use.
            let fd = unsafe { OwnedFd::from_raw_fd(n) };
            listener::check_inherited(std::os::fd::AsFd::as_fd(&fd))?;
            (fd, None)
        }
        _ => bail!(
            "one of --socket-path PATH, --fd N or --print-capabilities is required (or a socket passed by socket activation, LISTEN_FDS)"
        ),
    };
    if config.emulate_attributes {
        tracing::warn!(
            "memory attributes are emulated by the daemon (--emulate-attributes): for testing only"
        );
    }
    tracing::info!(
        socket = ?args.socket_path,
        socket_mode = ?args
            .socket_path
            .as_ref()
            .map(|_| format!("{:04o}", access.mode())),
        allow_uids = ?config.allow.uids,
        allow_gids = ?config.allow.gids,
        metrics = ?config.metrics_listen,
        migration = ?config.migration_listen,
        workers = config.workers,
        populate = ?config.populate,
        wait = config.wait.name(),
        fault_around = config.readahead.fault_around,
        prefetch_max = config.readahead.prefetch_max,
        "vmpagerd serving"
    );
    let live = Arc::new(LiveVms::default());
    let notifier = notifier.map(Arc::new);
    let served = vmpagerd::serve_with(listener_fd, shutdown, config, live.clone(), |ready| {
        if let Some(addr) = ready.metrics_addr {
            tracing::info!("metrics at http://{addr}/metrics");
        }
        if let Some(addr) = ready.migration_addr {
            tracing::info!("serving migrations on {addr}");
        }
        if let Some(n) = &notifier {
            // The status thread first: at READY=1 the daemon runs every thread it will run
            // (a supervisor's baseline of its threads is taken then).
            report_status(n.clone(), live.clone());
            if let Err(e) = n.ready(&systemd::serving_status(0)) {
                tracing::warn!(error = %e, "cannot notify the service manager");
            }
        }
    });
    if let Some(n) = &notifier {
        let _ = n.stopping(&format!(
            "stopping, {}",
            systemd::serving_status(live.get())
        ));
    }
    served?;
    Ok(())
}

/// Warns when the allowlist admits peers that the socket's mode keeps out: only its owner
/// (the daemon's uid) and root can connect to a socket no group or other may write.
fn warn_unreachable(allow: &Allowlist, access: SocketAccess) {
    let defaults = Allowlist::default_uids();
    let beyond = allow.uids.iter().any(|u| !defaults.contains(u)) || !allow.gids.is_empty();
    if beyond && !access.shared() {
        tracing::warn!(
            "--allow-uid/--allow-gid admit peers that --socket-mode {:04o} keeps out (only the \
             socket's owner and root can connect): see --socket-mode and --socket-group",
            access.mode()
        );
    }
}

/// Keeps the service manager's status line (`systemctl status vmpagerd`) up to date with the
/// number of VMs, from a thread of its own (a notification never delays the control thread).
/// The thread ends with the process.
fn report_status(notifier: Arc<Notifier>, live: Arc<LiveVms>) {
    let spawned = std::thread::Builder::new()
        .name("vmpager-status".into())
        .spawn(move || {
            let mut shown = 0;
            loop {
                let now = live.wait_change(shown, Duration::from_secs(3600));
                if now != shown {
                    // Best effort: a status lost is replaced by the next one.
                    let _ = notifier.status(&systemd::serving_status(now));
                    shown = now;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the status thread");
    }
}

/// A size with an optional K/M/G suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits].parse().map_err(|_| format!("bad size {s:?}"))?;
    let shift = match s[digits..]
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        other => return Err(format!("bad size suffix {other:?} in {s:?}")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {s:?} is too large"))
}
