//! vmpagerd: a separate process that owns guest memory and serves a VMM's page faults.
//!
//! The binary (`vmpagerd`) is a thin CLI over this library; tests run the same code in process
//! with [`spawn`].
//!
//! * [`control`]: the control reactor (connections, protocol state machine, VM lifecycle).
//! * [`worker`]: worker threads that serve uffds.
//! * [`fault`]: serving one VM's userfaultfd.
//! * [`ch_faults`]: serving cloud-hypervisor's postcopy fault connection.
//! * [`ahead`]: what to install with a requested page and ahead of it.
//! * [`uffd`]: the uffd ioctls the daemon drives.
//! * [`memory`]: memfds, the daemon's mappings, atomic installs.
//! * [`page_state`]: the two-bit page-state table, in a file that outlives the daemon.
//! * [`source`]: page sources (`zero`, `file`).
//! * [`working_set`]: recording and replaying the order of first touches.
//! * [`metrics`]: counters and latency histograms ([`latency`]).
//! * [`prometheus`], [`exporter`]: the metrics endpoint (`--metrics-listen`).
//! * [`systemd`]: socket activation and readiness notification.
//! * [`caps`]: host capability probe.
//! * [`listener`]: the control socket, its lock file, mode and group.
//! * [`access`]: who may connect, and who may act on a VM.
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

pub mod access;
pub mod ahead;
pub mod caps;
pub mod ch_faults;
pub mod control;
pub mod convert;
pub mod exits;
pub mod exporter;
pub mod fault;
pub mod guest_memfd;
pub mod latency;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod migration;
pub mod page_state;
pub mod policy;
pub mod prometheus;
pub mod readahead;
pub mod session;
pub mod signals;
pub mod source;
pub mod systemd;
pub mod uffd;
pub mod wait;
pub mod worker;
pub mod working_set;

pub use session::Populate;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Validated daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Worker threads serving uffds.
    pub workers: usize,
    /// Populate method for VMs that ask for the default.
    pub populate: Populate,
    /// Concurrent client connections.
    pub max_connections: usize,
    /// VMs one connection may own.
    pub max_vms_per_connection: usize,
    /// Guest memory per VM, bytes.
    pub max_vm_memory: u64,
    /// Keep memory attributes in the daemon on hosts without `KVM_CAP_MEMORY_ATTRIBUTES`, so
    /// private VM types can be tested there (every stats reply says so).
    pub emulate_attributes: bool,
    /// The daemon-wide private/shared policy (`--config`), overridable per VM.
    pub policy: policy::Policy,
    /// Peers allowed to connect, by uid or gid (checked with `SO_PEERCRED`); by default root
    /// and the daemon's own uid.
    pub allow: access::Allowlist,
    /// How workers wait for work.
    pub wait: wait::WaitMode,
    /// CPUs the workers are pinned to (worker `i` on `worker_cpus[i % len]`); empty: not
    /// pinned, the scheduler places them.
    pub worker_cpus: Vec<usize>,
    /// Pages installed along with a faulting one.
    pub readahead: readahead::Readahead,
    /// How long a VM whose VMM released it or went away is kept for a reattach (zero: freed
    /// at once).
    pub vm_grace: Duration,
    /// Serve Prometheus metrics over HTTP here (`GET /metrics`); port 0 picks a free port
    /// (see [`Ready::metrics_addr`]).
    pub metrics_listen: Option<SocketAddr>,
    /// Serve migrating VMs' memory to destination daemons here (TCP, `MigrateOut`); port 0
    /// picks a free port (see [`Ready::migration_addr`]). `None`: no VM migrates out.
    pub migration_listen: Option<SocketAddr>,
    /// How long a migration connection may stay silent before it is made again (the
    /// destination pings every quarter of it).
    pub migration_liveness: Duration,
    /// How long a destination waits for an unreachable source before it gives up on it and
    /// poisons the pages it lacks.
    pub migration_deadline: Duration,
    /// A destination's source pushes every page in the background (`true`, the default), or
    /// only the pages faults and readahead ask for move (`false`, pull only: for benchmarks
    /// that time remote faults alone, and for links too slow to carry the whole VM); a
    /// pull-only migration is `Complete` once every page was asked for.
    pub migration_push: bool,
    /// A destination opens no urgent channel: its fault requests go on the bulk channel and
    /// their answers queue behind the push (`false`, the default: two channels, like QEMU's
    /// postcopy-preempt). Only to measure what the separate urgent channel buys
    /// (`vmpager bench --only migration`); needs [`Config::migration_push`].
    pub migration_one_channel: bool,
    /// VMs restored from snapshot URLs (`PageSourceKind::Snapshot`): the chunk cache and how
    /// chunks are fetched.
    pub snapshots: source::object::ObjectConfig,
    /// An embedder's asynchronous page source (a network or object-store source, or the
    /// tests' [`source::DelayedSource`]): consulted for every VM created with a zero source;
    /// a VM it gives a source to is served from that source. Not settable from the command line.
    pub async_source: Option<AsyncSourceFactory>,
}

/// Makes the asynchronous source of a new VM from the [`source::Completions`] it answers
/// into, or declines (`None`: the VM keeps its own source).
#[derive(Clone)]
pub struct AsyncSourceFactory(
    Arc<dyn Fn(source::Completions) -> Option<Arc<dyn source::AsyncSource>> + Send + Sync>,
);

impl AsyncSourceFactory {
    /// A factory calling `make` for each new VM with a zero source.
    pub fn new(
        make: impl Fn(source::Completions) -> Option<Arc<dyn source::AsyncSource>>
            + Send
            + Sync
            + 'static,
    ) -> AsyncSourceFactory {
        AsyncSourceFactory(Arc::new(make))
    }

    /// The source of a new VM answering into `completions`, if any.
    pub fn make(&self, completions: source::Completions) -> Option<Arc<dyn source::AsyncSource>> {
        (self.0)(completions)
    }
}

impl std::fmt::Debug for AsyncSourceFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AsyncSourceFactory")
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            populate: Populate::Copy,
            max_connections: 256,
            max_vms_per_connection: 64,
            max_vm_memory: 1 << 40,
            emulate_attributes: false,
            policy: policy::Policy::default(),
            wait: wait::WaitMode::default(),
            worker_cpus: Vec::new(),
            readahead: readahead::Readahead::default(),
            vm_grace: Duration::from_secs(60),
            metrics_listen: None,
            migration_listen: None,
            migration_liveness: Duration::from_secs(10),
            migration_deadline: migration::DEFAULT_DEADLINE,
            migration_push: true,
            migration_one_channel: false,
            allow: access::Allowlist::default(),
            snapshots: source::object::ObjectConfig::default(),
            async_source: None,
        }
    }
}

/// Why `migration_one_channel` needs `migration_push`.
const ONE_CHANNEL_NEEDS_PUSH: &str = "migration_one_channel (--migration-one-channel) needs the \
     push: a pull-only destination opens its bulk channel only once it has every page, so its \
     requests have no channel to go on (and nothing to queue behind)";

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The control socket could not be set up.
    #[error("cannot set up the control socket")]
    Listener(#[from] listener::ListenerError),
    /// The control reactor failed.
    #[error("control reactor failed")]
    Control(#[from] control::ControlError),
    /// Options that cannot work together.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// The host lacks a userfaultfd feature the daemon cannot work without.
    #[error("this host's userfaultfd lacks {0} (see vmpagerd --print-capabilities)")]
    MissingFeature(&'static str),
    /// Creating the shutdown eventfd or the thread failed.
    #[error("cannot start the daemon")]
    Start(#[source] std::io::Error),
    /// The metrics endpoint could not start.
    #[error("cannot start the metrics endpoint")]
    Metrics(#[from] exporter::ExportError),
    /// The migration listener could not start.
    #[error("cannot start the migration listener")]
    Migration(#[from] migration::serve::ServeError),
}

/// The daemon's VMs as its other threads see them: their number (tests wait on it without
/// sleeping), the VMs themselves (the metrics endpoint reads their counters at each scrape), and
/// the daemon-wide counters.
#[derive(Debug, Default)]
pub struct LiveVms {
    count: Mutex<i64>,
    changed: Condvar,
    /// Every VM inserted and not yet removed, by id (weak: this list never keeps a VM alive).
    directory: Mutex<Vec<(u64, Weak<session::Vm>)>>,
    metrics: metrics::DaemonMetrics,
}

impl LiveVms {
    fn add(&self, delta: i64) {
        if let Ok(mut c) = self.count.lock() {
            *c += delta;
            self.changed.notify_all();
        }
    }

    /// A VM was created: counted (`vms_created`), and listed for the metrics endpoint.
    pub fn insert(&self, vm: &Arc<session::Vm>) {
        if let Ok(mut d) = self.directory.lock() {
            d.retain(|(_, w)| w.strong_count() > 0);
            d.push((vm.id, Arc::downgrade(vm)));
        }
        metrics::VmMetrics::bump(&self.metrics.vms_created);
        self.add(1);
    }

    /// VM `id` was freed.
    pub fn remove(&self, id: u64) {
        if let Ok(mut d) = self.directory.lock() {
            d.retain(|(i, w)| *i != id && w.strong_count() > 0);
        }
        metrics::VmMetrics::bump(&self.metrics.vms_freed);
        self.add(-1);
    }

    /// The VMs alive now, by id. (The caller's references keep them alive until it drops them:
    /// hold them briefly.)
    pub fn vms(&self) -> Vec<Arc<session::Vm>> {
        let mut vms: Vec<_> = self
            .directory
            .lock()
            .map(|d| d.iter().filter_map(|(_, w)| w.upgrade()).collect())
            .unwrap_or_default();
        vms.sort_by_key(|vm| vm.id);
        vms
    }

    /// The daemon-wide counters.
    pub fn metrics(&self) -> &metrics::DaemonMetrics {
        &self.metrics
    }

    /// Waits until the number of VMs differs from `seen`, at most `timeout`; returns the number.
    pub fn wait_change(&self, seen: i64, timeout: Duration) -> i64 {
        let Ok(c) = self.count.lock() else {
            return seen;
        };
        match self.changed.wait_timeout_while(c, timeout, |c| *c == seen) {
            Ok((c, _)) => *c,
            Err(_) => seen,
        }
    }

    /// Current number of VMs.
    pub fn get(&self) -> i64 {
        self.count.lock().map_or(0, |c| *c)
    }

    /// Waits until the number of VMs equals `n`; false on timeout.
    pub fn wait_for(&self, n: i64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(mut c) = self.count.lock() else {
            return false;
        };
        while *c != n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.changed.wait_timeout(c, left) {
                Ok((guard, _)) => c = guard,
                Err(_) => return false,
            }
        }
        true
    }
}

/// What a daemon that is ready to serve reports to [`serve_with`]'s `ready`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ready {
    /// Where the metrics endpoint listens (`Config::metrics_listen` with its port resolved).
    pub metrics_addr: Option<SocketAddr>,
    /// Where migrations are served (`Config::migration_listen` with its port resolved).
    pub migration_addr: Option<SocketAddr>,
}

/// Probes the host and serves `listener` until `shutdown` becomes readable.
pub fn serve(
    listener: OwnedFd,
    shutdown: OwnedFd,
    config: Config,
    live: Arc<LiveVms>,
) -> Result<(), DaemonError> {
    serve_with(listener, shutdown, config, live, |_| {})
}

/// As [`serve`], calling `ready` once everything is set up (workers started, the metrics
/// endpoint listening), right before the first request is read: the moment to tell a service
/// manager. The metrics endpoint stops when this returns.
pub fn serve_with(
    listener: OwnedFd,
    shutdown: OwnedFd,
    config: Config,
    live: Arc<LiveVms>,
    ready: impl FnOnce(&Ready),
) -> Result<(), DaemonError> {
    if config.migration_one_channel && !config.migration_push {
        return Err(DaemonError::Config(ONE_CHANNEL_NEEDS_PUSH));
    }
    let uffd = uffd::Uffd::probe().map(|p| p.features).unwrap_or(0);
    // Fail at start, not at the first fault.
    if let Some(name) = uffd::missing_required(uffd) {
        return Err(DaemonError::MissingFeature(name));
    }
    // `--populate continue` could never take effect: every VM would get Copy.
    let minor = u64::from(linux_raw_sys::general::UFFD_FEATURE_MINOR_SHMEM);
    if config.populate == Populate::Continue && uffd & minor == 0 {
        return Err(DaemonError::MissingFeature(
            "UFFD_FEATURE_MINOR_SHMEM, which --populate continue needs",
        ));
    }
    let exporter = config
        .metrics_listen
        .map(|addr| exporter::Exporter::start(addr, live.clone()))
        .transpose()?;
    let mut migrations = migration::Migrations {
        timeouts: vmpager_migration::Timeouts {
            liveness: config.migration_liveness,
            ping_interval: config.migration_liveness / 4,
            handshake: config.migration_liveness,
            connect: config.migration_liveness,
        },
        deadline: config.migration_deadline,
        push: config.migration_push,
        one_channel: config.migration_one_channel,
        ..migration::Migrations::default()
    };
    let migration_listener = config
        .migration_listen
        .map(|addr| {
            migration::serve::MigrationListener::start(
                &addr.to_string(),
                migrations.outgoing.clone(),
                migrations.timeouts,
            )
        })
        .transpose()?;
    migrations.listening = migration_listener.as_ref().map(|l| l.addr());
    let migration_addr = migrations.listening;
    let reactor = control::Reactor::new(
        listener,
        shutdown,
        config,
        control::HostFeatures {
            uffd,
            memory_attributes: caps::memory_attributes(),
        },
        live,
        Arc::new(migrations),
    )?;
    ready(&Ready {
        metrics_addr: exporter.as_ref().map(exporter::Exporter::local_addr),
        migration_addr,
    });
    let served = reactor.run();
    drop(exporter);
    drop(migration_listener);
    Ok(served?)
}

/// A daemon running on a thread of this process (for tests and benchmarks).
#[derive(Debug)]
pub struct DaemonHandle {
    socket_path: PathBuf,
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<Result<(), DaemonError>>>,
    live: Arc<LiveVms>,
    ready: Ready,
    _lock: listener::Bound,
}

impl DaemonHandle {
    /// Where the daemon listens.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Live VM count (VMs kept for a reattach included).
    pub fn live_vms(&self) -> &LiveVms {
        &self.live
    }

    /// Where the metrics endpoint listens, if `Config::metrics_listen` was set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.ready.metrics_addr
    }

    /// Where migrations are served, if `Config::migration_listen` was set.
    pub fn migration_addr(&self) -> Option<SocketAddr> {
        self.ready.migration_addr
    }

    /// Stops the daemon and waits for it.
    pub fn shutdown(mut self) -> Result<(), DaemonError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), DaemonError> {
        if let Some(stop) = self.stop.take() {
            let _ = rustix::io::write(&stop, &1u64.to_ne_bytes());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(DaemonError::Start(std::io::Error::other(
                "daemon thread panicked",
            ))),
            None => Ok(()),
        }
    }
}

impl Drop for DaemonHandle {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Starts a daemon on a thread, listening at `socket_path`, and waits until it is ready (or
/// returns why it could not start).
pub fn spawn(config: Config, socket_path: &Path) -> Result<DaemonHandle, DaemonError> {
    let bound = listener::Bound::new(socket_path)?;
    let listener = bound
        .listener()
        .try_clone_to_owned()
        .map_err(DaemonError::Start)?;
    let stop = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)
        .map_err(|e| DaemonError::Start(e.into()))?;
    let stop_reader = stop.try_clone().map_err(DaemonError::Start)?;
    let live = Arc::new(LiveVms::default());
    let live2 = live.clone();
    let (ready_tx, ready_rx) = crossbeam::channel::bounded(1);
    let thread = std::thread::Builder::new()
        .name("vmpager-control".into())
        .spawn(move || {
            serve_with(listener, stop_reader, config, live2, |r| {
                let _ = ready_tx.send(*r);
            })
        })
        .map_err(DaemonError::Start)?;
    let ready = match ready_rx.recv() {
        Ok(r) => r,
        // The daemon ended before it was ready: its error says why.
        Err(_) => {
            return Err(match thread.join() {
                Ok(Err(e)) => e,
                Ok(Ok(())) => DaemonError::Start(std::io::Error::other(
                    "the daemon stopped before it was ready",
                )),
                Err(_) => DaemonError::Start(std::io::Error::other("daemon thread panicked")),
            })
        }
    };
    Ok(DaemonHandle {
        socket_path: socket_path.to_owned(),
        stop: Some(stop),
        thread: Some(thread),
        live,
        ready,
        _lock: bound,
    })
}
