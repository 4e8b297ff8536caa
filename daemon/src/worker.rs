//! Worker threads: each owns a mio poller and the `FaultServer`s of the VMs assigned to it, and
//! serves their faults inline on the thread the kernel wakes, so a fault never pays a second
//! cross-thread hand-off (a wakeup costs 20–45 µs on this host).

use crate::fault::{Drained, FaultServer};
use crossbeam::channel::{Receiver, Sender};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

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
    /// Starts worker `index`.
    pub fn start(index: usize) -> Result<Worker, WorkerError> {
        let poll = Poll::new().map_err(WorkerError::Start)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(WorkerError::Start)?);
        let (tx, rx) = crossbeam::channel::unbounded();
        let thread = std::thread::Builder::new()
            .name(format!("vmpager-worker-{index}"))
            .spawn(move || run(poll, rx))
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
        let (done, wait) = crossbeam::channel::bounded(1);
        self.send(Command::Serve {
            server: Box::new(server),
            done,
        })?;
        match wait.recv() {
            Ok(r) => r.map_err(WorkerError::Start),
            Err(_) => Err(WorkerError::Gone(self.index)),
        }
    }

    /// Stops serving `vm_id` and waits until its uffd is dropped.
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

fn run(mut poll: Poll, commands: Receiver<Command>) {
    let mut events = Events::with_capacity(64);
    let mut servers: HashMap<usize, Box<FaultServer>> = HashMap::new();
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "worker poll failed");
            return;
        }
        for event in events.iter() {
            if event.token() == WAKER {
                continue;
            }
            let key = event.token().0;
            let closed = servers.get_mut(&key).map(|s| s.drain()) == Some(Drained::Closed);
            if closed {
                if let Some(s) = servers.remove(&key) {
                    let fd = s.uffd().as_fd().as_raw_fd();
                    let _ = poll.registry().deregister(&mut SourceFd(&fd));
                    tracing::debug!(vm = s.vm().id, "uffd closed");
                }
            }
        }
        loop {
            match commands.try_recv() {
                Ok(Command::Serve { mut server, done }) => {
                    let key = server.vm().id as usize;
                    let fd = server.uffd().as_fd().as_raw_fd();
                    let registered = poll.registry().register(
                        &mut SourceFd(&fd),
                        Token(key),
                        Interest::READABLE,
                    );
                    let failed = registered.is_err();
                    let _ = done.send(registered);
                    if failed {
                        continue;
                    }
                    // Faults may have queued before registration.
                    server.drain();
                    servers.insert(key, server);
                }
                Ok(Command::Stop { vm_id, done }) => {
                    if let Some(s) = servers.remove(&(vm_id as usize)) {
                        let fd = s.uffd().as_fd().as_raw_fd();
                        let _ = poll.registry().deregister(&mut SourceFd(&fd));
                    }
                    let _ = done.send(());
                }
                Err(crossbeam::channel::TryRecvError::Empty) => break,
                Err(crossbeam::channel::TryRecvError::Disconnected) => return,
            }
        }
    }
}
