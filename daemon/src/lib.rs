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
//! * [`memory`]: memfds, the daemon's mappings, page state.
//! * [`source`]: page sources (`zero`, `file`).
//! * [`working_set`]: recording and replaying the order of first touches.
//! * [`metrics`]: counters and latency histograms.
//! * [`caps`]: host capability probe.
//! * [`listener`]: the control socket, its lock file and umask.
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

pub mod ahead;
pub mod caps;
pub mod ch_faults;
pub mod control;
pub mod convert;
pub mod exits;
pub mod fault;
pub mod guest_memfd;
pub mod latency;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod readahead;
pub mod session;
pub mod signals;
pub mod source;
pub mod uffd;
pub mod wait;
pub mod worker;
pub mod working_set;

pub use session::Populate;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
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
    /// Uids allowed to connect (checked with `SO_PEERCRED`); by default root and the daemon's
    /// own uid.
    pub allowed_uids: Vec<u32>,
    /// How workers wait for work.
    pub wait: wait::WaitMode,
    /// CPUs the workers are pinned to (worker `i` on `worker_cpus[i % len]`); empty: not
    /// pinned, the scheduler places them.
    pub worker_cpus: Vec<usize>,
    /// Pages installed along with a faulting one.
    pub readahead: readahead::Readahead,
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
            allowed_uids: {
                let own = rustix::process::getuid().as_raw();
                if own == 0 {
                    vec![0]
                } else {
                    vec![0, own]
                }
            },
        }
    }
}

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The control socket could not be set up.
    #[error("cannot set up the control socket")]
    Listener(#[from] listener::ListenerError),
    /// The control reactor failed.
    #[error("control reactor failed")]
    Control(#[from] control::ControlError),
    /// The host lacks a userfaultfd feature the daemon cannot work without.
    #[error("this host's userfaultfd lacks {0} (see vmpagerd --print-capabilities)")]
    MissingFeature(&'static str),
    /// Creating the shutdown eventfd or the thread failed.
    #[error("cannot start the daemon")]
    Start(#[source] std::io::Error),
}

/// Number of live VMs, observable by in-process tests without sleeping.
#[derive(Debug, Default)]
pub struct LiveVms {
    count: Mutex<i64>,
    changed: Condvar,
}

impl LiveVms {
    fn add(&self, delta: i64) {
        if let Ok(mut c) = self.count.lock() {
            *c += delta;
            self.changed.notify_all();
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

/// Probes the host and serves `listener` until `shutdown` becomes readable.
pub fn serve(
    listener: OwnedFd,
    shutdown: OwnedFd,
    config: Config,
    live: Arc<LiveVms>,
) -> Result<(), DaemonError> {
    let uffd = uffd::Uffd::probe().map(|p| p.features).unwrap_or(0);
    // Fail at start, not at the first fault.
    if let Some(name) = uffd::missing_required(uffd) {
        return Err(DaemonError::MissingFeature(name));
    }
    let reactor = control::Reactor::new(
        listener,
        shutdown,
        config,
        control::HostFeatures {
            uffd,
            memory_attributes: caps::memory_attributes(),
        },
        live,
    )?;
    Ok(reactor.run()?)
}

/// A daemon running on a thread of this process (for tests and benchmarks).
#[derive(Debug)]
pub struct DaemonHandle {
    socket_path: PathBuf,
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<Result<(), DaemonError>>>,
    live: Arc<LiveVms>,
    _lock: listener::Bound,
}

impl DaemonHandle {
    /// Where the daemon listens.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Live VM count.
    pub fn live_vms(&self) -> &LiveVms {
        &self.live
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

/// Starts a daemon on a thread, listening at `socket_path`.
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
    let thread = std::thread::Builder::new()
        .name("vmpager-control".into())
        .spawn(move || serve(listener, stop_reader, config, live2))
        .map_err(DaemonError::Start)?;
    Ok(DaemonHandle {
        socket_path: socket_path.to_owned(),
        stop: Some(stop),
        thread: Some(thread),
        live,
        _lock: bound,
    })
}
