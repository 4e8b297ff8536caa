//! Worker threads: each owns a mio poller and the `FaultServer`s of the VMs assigned to it, and
//! serves their faults inline on the thread the kernel wakes, so a fault never pays a second
//! cross-thread hand-off (a wakeup costs 20–45 µs on this host).

use crate::ch_faults::ChFaultServer;
use crate::exits::ExitServer;
use crate::fault::{Drained, FaultServer, Scratch};
use crate::wait::WaitMode;
use crossbeam::channel::{Receiver, Sender};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

const WAKER: Token = Token(usize::MAX);

/// What the control thread asks of a worker.
#[derive(Debug)]
pub enum Command {
    /// Start serving a VM's uffd.
    Serve {
        /// The server.
        server: Box<FaultServer>,
        /// Signalled once the uffd is registered with the poller (or could not be).
        done: Sender<std::io::Result<()>>,
    },
    /// Start serving a VM's fault channel (instead of a uffd).
    ServeChannel {
        /// The server.
        server: Box<ChFaultServer>,
        /// Signalled once the socket is registered with the poller (or could not be).
        done: Sender<std::io::Result<()>>,
    },
    /// Work was queued for a VM that no event announces (pages to replay): drain it soon.
    Kick {
        /// VM id.
        vm_id: u64,
    },
    /// Start serving a VM's mailbox.
    ServeExits {
        /// The server.
        server: Box<ExitServer>,
        /// Signalled once the doorbell is registered with the poller (or could not be).
        done: Sender<std::io::Result<()>>,
    },
    /// Signal `done` once every event read so far is fully accounted for (a stats snapshot
    /// taken after that includes every fault whose thread was woken).
    Sync {
        /// Signalled when done.
        done: Sender<()>,
    },
    /// Stop serving a VM's uffd or fault channel (its mailbox stays served); `done` is
    /// signalled once the server is dropped.
    StopFaults {
        /// VM id.
        vm_id: u64,
        /// Signalled when done.
        done: Sender<()>,
    },
    /// Stop serving a VM; `done` is signalled once the server (and its uffd) is dropped.
    Stop {
        /// VM id.
        vm_id: u64,
        /// Signalled when done.
        done: Sender<()>,
    },
}

/// Errors of the worker pool.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Creating a poller, waker or thread failed.
    #[error("cannot start a worker")]
    Start(#[source] std::io::Error),
    /// The worker thread is gone.
    #[error("worker {0} is gone")]
    Gone(usize),
}

impl WorkerError {
    /// Fatal for the daemon: no worker, no service.
    pub fn is_fatal(&self) -> bool {
        true
    }
}

/// A handle on one worker thread.
#[derive(Debug)]
pub struct Worker {
    index: usize,
    commands: Sender<Command>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts worker `index`, waiting for work in `wait` mode, pinned to `cpu` if given.
    pub fn start(index: usize, wait: WaitMode, cpu: Option<usize>) -> Result<Worker, WorkerError> {
        let poll = Poll::new().map_err(WorkerError::Start)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(WorkerError::Start)?);
        let (tx, rx) = crossbeam::channel::unbounded();
        let thread = std::thread::Builder::new()
            // At most 15 bytes: the kernel's thread name (ps, top, perf) keeps no more.
            .name(format!("vmpager-w{index}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to_cpu(cpu);
                }
                run(poll, rx, wait)
            })
            .map_err(WorkerError::Start)?;
        Ok(Worker {
            index,
            commands: tx,
            waker,
            thread: Some(thread),
        })
    }

    /// Sends a command and wakes the worker.
    pub fn send(&self, command: Command) -> Result<(), WorkerError> {
        self.commands
            .send(command)
            .map_err(|_| WorkerError::Gone(self.index))?;
        self.waker.wake().map_err(|_| WorkerError::Gone(self.index))
    }

    /// Hands a VM's fault server to this worker and waits until its uffd is polled.
    pub fn serve(&self, server: FaultServer) -> Result<(), WorkerError> {
        self.register(|done| Command::Serve {
            server: Box::new(server),
            done,
        })
    }

    /// Hands a VM's fault-channel server to this worker and waits until its socket is polled.
    pub fn serve_channel(&self, server: ChFaultServer) -> Result<(), WorkerError> {
        self.register(|done| Command::ServeChannel {
            server: Box::new(server),
            done,
        })
    }

    /// Hands a VM's mailbox server to this worker and waits until its doorbell is polled.
    pub fn serve_exits(&self, server: ExitServer) -> Result<(), WorkerError> {
        self.register(|done| Command::ServeExits {
            server: Box::new(server),
            done,
        })
    }

    /// Sends a command that registers a source and waits for the registration's outcome.
    fn register(
        &self,
        command: impl FnOnce(Sender<std::io::Result<()>>) -> Command,
    ) -> Result<(), WorkerError> {
        let (done, wait) = crossbeam::channel::bounded(1);
        self.send(command(done))?;
        match wait.recv() {
            Ok(r) => r.map_err(WorkerError::Start),
            Err(_) => Err(WorkerError::Gone(self.index)),
        }
    }

    /// Waits until the worker is between two drains: every event it has read is accounted for
    /// in the metrics (counters are bumped after the populate ioctl wakes the faulting thread).
    pub fn sync(&self) -> Result<(), WorkerError> {
        let (done, wait) = crossbeam::channel::bounded(1);
        self.send(Command::Sync { done })?;
        wait.recv().map_err(|_| WorkerError::Gone(self.index))
    }

    /// Stops serving `vm_id`'s uffd or fault channel and waits until it is dropped.
    pub fn stop_faults(&self, vm_id: u64) -> Result<(), WorkerError> {
        let (done, wait) = crossbeam::channel::bounded(1);
        self.send(Command::StopFaults { vm_id, done })?;
        wait.recv().map_err(|_| WorkerError::Gone(self.index))
    }

    /// Stops serving `vm_id` and waits until its uffd and mailbox are dropped.
    pub fn stop_vm(&self, vm_id: u64) -> Result<(), WorkerError> {
        let (done, wait) = crossbeam::channel::bounded(1);
        self.send(Command::Stop { vm_id, done })?;
        wait.recv().map_err(|_| WorkerError::Gone(self.index))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the channel tells the thread to exit.
        let (dead, _) = crossbeam::channel::unbounded();
        self.commands = dead;
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Poll keys: a VM's uffd (or fault channel) is `4 * id`, its mailbox doorbell `4 * id + 1`,
/// its asynchronous source's doorbell `4 * id + 2` ([`bell_key`]).
fn key(vm_id: u64, exits: bool) -> usize {
    (vm_id as usize) * 4 + usize::from(exits)
}

/// The poll key of a VM's asynchronous-source doorbell: it drains the VM's fault server.
fn bell_key(vm_id: u64) -> usize {
    (vm_id as usize) * 4 + 2
}

/// The source a poll key drains.
fn source_key(token: usize) -> usize {
    match token % 4 {
        2 => token - 2,
        _ => token,
    }
}

enum Source {
    Faults(Box<FaultServer>),
    Channel(Box<ChFaultServer>),
    Exits(Box<ExitServer>),
}

impl Source {
    /// Stops polling the source's fds.
    fn deregister(&self, poll: &Poll) {
        let _ = poll.registry().deregister(&mut SourceFd(&self.fd()));
        if let Source::Faults(s) = self {
            if let Some(bell) = s.arrivals_bell() {
                let _ = poll.registry().deregister(&mut SourceFd(&bell.as_raw_fd()));
            }
        }
    }

    /// Starts polling the source's fds under key `k`.
    fn register(&self, poll: &Poll, k: usize) -> std::io::Result<()> {
        poll.registry()
            .register(&mut SourceFd(&self.fd()), Token(k), Interest::READABLE)?;
        if let Source::Faults(s) = self {
            if let Some(bell) = s.arrivals_bell() {
                let token = Token(bell_key(s.vm().id));
                let r = poll.registry().register(
                    &mut SourceFd(&bell.as_raw_fd()),
                    token,
                    Interest::READABLE,
                );
                if let Err(e) = r {
                    let _ = poll.registry().deregister(&mut SourceFd(&self.fd()));
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn fd(&self) -> i32 {
        match self {
            Source::Faults(s) => s.uffd().as_fd().as_raw_fd(),
            Source::Channel(s) => s.socket().as_raw_fd(),
            Source::Exits(s) => s.doorbell().as_raw_fd(),
        }
    }

    /// Serves what is pending, with the worker's `scratch` buffers.
    fn drain(&mut self, scratch: &mut Scratch) -> Drained {
        match self {
            Source::Faults(s) => s.drain(scratch),
            Source::Channel(s) => s.drain(),
            Source::Exits(s) => {
                s.drain();
                Drained::Idle
            }
        }
    }
}

/// Pins the calling thread to `cpu` (best effort: a CPU outside the allowed set is logged once).
fn pin_to_cpu(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        tracing::warn!(cpu, error = %e, "cannot pin worker");
    }
}

fn run(mut poll: Poll, commands: Receiver<Command>, wait: WaitMode) {
    let mut events = Events::with_capacity(64);
    let mut sources: HashMap<usize, Source> = HashMap::new();
    let mut last_work = Instant::now();
    // Sources with work left that no event will announce (pages to install ahead).
    let mut more: Vec<usize> = Vec::new();
    let mut due: Vec<usize> = Vec::new();
    // Buffers every fault server of this worker borrows while it drains.
    let mut scratch = Scratch::default();
    loop {
        let timeout = if more.is_empty() {
            wait.timeout(last_work.elapsed())
        } else {
            Some(std::time::Duration::ZERO)
        };
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "worker poll failed");
            return;
        }
        if events.is_empty() && more.is_empty() {
            // A zero-timeout poll found nothing. Yield, so a thread that shares this CPU (on a
            // 2-CPU host, often the vCPU whose fault was just served) runs at once instead of
            // waiting for the spinner's time slice to end.
            std::thread::yield_now();
        }
        due.clear();
        for t in events.iter().map(|e| e.token()).filter(|&t| t != WAKER) {
            let k = source_key(t.0);
            if !due.contains(&k) {
                due.push(k);
            }
        }
        for k in more.drain(..) {
            if !due.contains(&k) {
                due.push(k);
            }
        }
        for &k in &due {
            match sources.get_mut(&k).map(|s| s.drain(&mut scratch)) {
                Some(Drained::Closed) => {
                    if let Some(s) = sources.remove(&k) {
                        s.deregister(&poll);
                        tracing::debug!(key = k, "uffd closed");
                    }
                }
                Some(Drained::More) => more.push(k),
                Some(Drained::Idle) | None => {}
            }
        }
        if !due.is_empty() {
            // After the work, so a long drain does not use up the adaptive spin window.
            last_work = Instant::now();
        }
        loop {
            let (k, mut source, done) = match commands.try_recv() {
                Ok(Command::Serve { server, done }) => {
                    (key(server.vm().id, false), Source::Faults(server), done)
                }
                Ok(Command::ServeChannel { server, done }) => {
                    (key(server.vm().id, false), Source::Channel(server), done)
                }
                Ok(Command::Kick { vm_id }) => {
                    let k = key(vm_id, false);
                    if sources.contains_key(&k) && !more.contains(&k) {
                        more.push(k);
                    }
                    continue;
                }
                Ok(Command::ServeExits { server, done }) => {
                    (key(server.vm().id, true), Source::Exits(server), done)
                }
                Ok(Command::Sync { done }) => {
                    let _ = done.send(());
                    continue;
                }
                Ok(Command::StopFaults { vm_id, done }) => {
                    if let Some(s) = sources.remove(&key(vm_id, false)) {
                        s.deregister(&poll);
                    }
                    more.retain(|&k| k != key(vm_id, false));
                    let _ = done.send(());
                    continue;
                }
                Ok(Command::Stop { vm_id, done }) => {
                    more.retain(|&k| k != key(vm_id, false));
                    for k in [key(vm_id, false), key(vm_id, true)] {
                        if let Some(s) = sources.remove(&k) {
                            s.deregister(&poll);
                        }
                    }
                    let _ = done.send(());
                    continue;
                }
                Err(crossbeam::channel::TryRecvError::Empty) => break,
                Err(crossbeam::channel::TryRecvError::Disconnected) => return,
            };
            let registered = source.register(&poll, k);
            let failed = registered.is_err();
            let _ = done.send(registered);
            if failed {
                continue;
            }
            // Work may have queued before registration.
            if source.drain(&mut scratch) == Drained::More {
                more.push(k);
            }
            sources.insert(k, source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Cpus_allowed_list` of this process's thread named `name`.
    fn allowed_cpus_of(name: &str) -> Option<String> {
        // Threads of other tests come and go: skip what cannot be read.
        std::fs::read_dir("/proc/self/task")
            .ok()?
            .filter_map(|t| t.ok().map(|t| t.path()))
            .filter(|p| std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim() == name))
            .find_map(|p| cpus_allowed(&std::fs::read_to_string(p.join("status")).ok()?))
    }

    fn cpus_allowed(status: &str) -> Option<String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|v| v.trim().to_string())
    }

    #[test]
    fn a_worker_given_a_cpu_runs_only_there_and_one_without_is_left_alone() {
        let own =
            cpus_allowed(&std::fs::read_to_string("/proc/thread-self/status").unwrap()).unwrap();
        let pinned = Worker::start(97, WaitMode::Blocking, Some(0)).unwrap();
        let free = Worker::start(98, WaitMode::BusyPoll, None).unwrap();
        // Each worker pins itself first thing; a registration round trip proves it ran.
        pinned.sync().unwrap();
        free.sync().unwrap();
        assert_eq!(allowed_cpus_of("vmpager-w97").as_deref(), Some("0"));
        assert_eq!(allowed_cpus_of("vmpager-w98"), Some(own));
        drop(pinned);
        drop(free);
        assert_eq!(allowed_cpus_of("vmpager-w97"), None, "the thread is gone");
    }
}
