//! The control reactor: accepts VMM connections on the `SOCK_SEQPACKET` socket, runs each
//! connection's protocol state machine, creates VMs and hands their uffds to workers.
//!
//! One thread, one mio poller. A connection holds its VMs, and no other connection can name
//! them: only `ReattachVm`, `ReclaimVm` and `Subscribe` reach a VM the connection does not
//! hold, with the VM's token, from a peer of the uid that created the VM or root (the rules:
//! [`crate::access`]; `Reactor::owned` and `Reactor::presented` enforce them). When a
//! connection closes (or its process dies) its VMs are no longer served but kept for the grace
//! period (`Config::vm_grace`): a VMM that comes back with the VM's token (`ReattachVm`,
//! `ReclaimVm`) carries on with every byte; after the grace period they are freed.
//!
//! * [`registry`]: the VMs, who holds each, the grace period;
//! * [`dispatch`]: which request is served in which state;
//! * [`create`], [`attach`], [`session`], [`working_set`]: the requests.

mod accept;
mod attach;
mod create;
mod dispatch;
mod migration;
mod registry;
mod session;
mod working_set;

pub use create::{check_create, memory_needed};
use registry::{Owner, VmEntry};

use crate::exits::ExitServer;
use crate::fault::FaultServer;
use crate::memory::GuestMemory;
use crate::metrics::VmMetrics;
use crate::policy::RateLimit;
use crate::readahead::Readahead;
use crate::session::{AttributeKeeper, Populate, PrivateMemory, Vm};
use crate::working_set::{Recorder, ReplayQueue};
use vmpager_protocol::mailbox::Mailbox;
use vmpager_protocol::{
    ConversionEvent, VmType, VMCREATED_VMM_SETS_ATTRIBUTES, VM_RECORD_WORKING_SET,
};

use crate::source::{Completions, Fetcher, FileSource, PageSource, Source, ZeroSource};
use crate::uffd::Uffd;
use crate::worker::Worker;
use crate::{Config, LiveVms};
use linux_raw_sys::general as k;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use rustix::net::SocketFlags;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vmpager_protocol::socket::Received;
use vmpager_protocol::{
    features, AttachUffd, Connection, CreateVm, DecodeError, ErrorCode, ErrorReply, Message,
    PageSourceKind, PopulateMethod, SocketError, VmCreated, Welcome, MAX_PAYLOAD, MAX_REGIONS,
    PROTOCOL_VERSION,
};

const LISTENER: Token = Token(0);
const SHUTDOWN: Token = Token(1);
const EVENTS: Token = Token(2);
const FIRST_CONN: usize = 3;

/// Conversion events from the workers to the reactor, which sends them to subscribers.
#[derive(Clone)]
struct EventQueue {
    tx: crossbeam::channel::Sender<ConversionEvent>,
    waker: Arc<mio::Waker>,
}

impl EventQueue {
    fn send(&self, e: ConversionEvent) {
        if self.tx.send(e).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

/// Malformed messages in a row after which a connection is dropped.
const MAX_BAD_IN_A_ROW: u32 = 32;

/// Errors of the control reactor (fatal for the daemon).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Poller setup or wait failed.
    #[error("control poller failed")]
    Poll(#[source] std::io::Error),
    /// A worker could not start.
    #[error("cannot start workers")]
    Workers(#[from] crate::worker::WorkerError),
}

impl ControlError {
    /// Every control error stops the daemon.
    pub fn is_fatal(&self) -> bool {
        true
    }
}

/// A request refused with a typed code and the text of the `Error` reply.
#[derive(Debug)]
pub struct Refusal(pub ErrorCode, pub String);

fn refuse(code: ErrorCode, text: impl Into<String>) -> Refusal {
    Refusal(code, text.into())
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Greeting,
    Ready { features: u64 },
}

struct Conn {
    socket: Connection,
    state: State,
    peer: Option<rustix::net::UCred>,
    bad_in_a_row: u32,
    /// VMs whose conversion events this connection receives.
    subscriptions: Vec<u64>,
}

/// What the host offers that changes how VMs are served.
#[derive(Debug, Clone, Copy)]
pub struct HostFeatures {
    /// `UFFD_FEATURE_*` of this host.
    pub uffd: u64,
    /// `KVM_CAP_MEMORY_ATTRIBUTES` of this host's KVM (0 without KVM).
    pub memory_attributes: u64,
}

impl HostFeatures {
    fn has(&self, f: u32) -> bool {
        self.uffd & u64::from(f) != 0
    }
}

/// The reactor state.
pub struct Reactor {
    poll: Poll,
    listener: OwnedFd,
    /// Registered with the poller (kept open while it is).
    _shutdown: OwnedFd,
    config: Config,
    host: HostFeatures,
    workers: Vec<Worker>,
    conns: HashMap<usize, Conn>,
    vms: HashMap<u64, VmEntry>,
    next_token: usize,
    next_vm: AtomicU64,
    live: Arc<LiveVms>,
    refused: RateLimitedWarning,
    events: EventQueue,
    event_rx: crossbeam::channel::Receiver<ConversionEvent>,
    migrations: Arc<crate::migration::Migrations>,
    /// What VMs restored from snapshot URLs share (runtime, chunk cache).
    objects: crate::source::object::Objects,
}

/// A warning a client can trigger at will: logged at most once per second, with the number of
/// occurrences in between.
struct RateLimitedWarning {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl RateLimitedWarning {
    fn note(&mut self, what: &str) {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(suppressed = self.suppressed, "{what}");
        self.last = Some(now);
        self.suppressed = 0;
    }
}

impl Reactor {
    /// Sets up the poller and the workers. `listener` must be a listening `SOCK_SEQPACKET`
    /// socket; the reactor stops when `shutdown` becomes readable.
    pub fn new(
        listener: OwnedFd,
        shutdown: OwnedFd,
        config: Config,
        host: HostFeatures,
        live: Arc<LiveVms>,
        migrations: Arc<crate::migration::Migrations>,
    ) -> Result<Reactor, ControlError> {
        let poll = Poll::new().map_err(ControlError::Poll)?;
        rustix::fs::fcntl_setfl(&listener, rustix::fs::OFlags::NONBLOCK)
            .map_err(|e| ControlError::Poll(e.into()))?;
        poll.registry()
            .register(
                &mut SourceFd(&listener.as_raw_fd()),
                LISTENER,
                Interest::READABLE,
            )
            .map_err(ControlError::Poll)?;
        poll.registry()
            .register(
                &mut SourceFd(&shutdown.as_raw_fd()),
                SHUTDOWN,
                Interest::READABLE,
            )
            .map_err(ControlError::Poll)?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), EVENTS).map_err(ControlError::Poll)?);
        let (tx, event_rx) = crossbeam::channel::unbounded();
        let events = EventQueue { tx, waker };
        let config_snapshots = config.snapshots.clone();
        let workers = (0..config.workers.max(1))
            .map(|i| {
                let cpu = (!config.worker_cpus.is_empty())
                    .then(|| config.worker_cpus[i % config.worker_cpus.len()]);
                Worker::start(i, config.wait, cpu)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Reactor {
            poll,
            listener,
            _shutdown: shutdown,
            config,
            host,
            workers,
            conns: HashMap::new(),
            vms: HashMap::new(),
            next_token: FIRST_CONN,
            next_vm: AtomicU64::new(first_vm_id()),
            live,
            refused: RateLimitedWarning {
                last: None,
                suppressed: 0,
            },
            events,
            event_rx,
            migrations,
            objects: crate::source::object::Objects::new(config_snapshots),
        })
    }

    /// Serves until shutdown.
    pub fn run(mut self) -> Result<(), ControlError> {
        let mut events = Events::with_capacity(128);
        loop {
            let timeout = self.expire_orphans();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ControlError::Poll(e));
            }
            for event in events.iter() {
                match event.token() {
                    SHUTDOWN => {
                        self.say_goodbye();
                        return Ok(());
                    }
                    LISTENER => self.accept(),
                    EVENTS => self.deliver_events(),
                    Token(t) => self.service(t),
                }
            }
        }
    }

    fn service(&mut self, token: usize) {
        loop {
            let Some(conn) = self.conns.get_mut(&token) else {
                return;
            };
            match conn.socket.recv() {
                Ok(received) => {
                    conn.bad_in_a_row = 0;
                    let id = received.header.request_id.get();
                    let reply = if id == 0 {
                        Err(refuse(ErrorCode::BadMessage, "request id 0 is reserved"))
                    } else {
                        self.dispatch(token, received)
                    };
                    let Some(conn) = self.conns.get(&token) else {
                        return;
                    };
                    let sent = match reply {
                        Ok((message, fds)) => {
                            let borrowed: Vec<BorrowedFd<'_>> =
                                fds.iter().map(|f| f.as_fd()).collect();
                            conn.socket.send(&message, id, &borrowed)
                        }
                        Err(Refusal(code, text)) => {
                            tracing::debug!(token, ?code, %text, "request refused");
                            conn.socket
                                .send(&Message::Error(ErrorReply { code, text }), id, &[])
                        }
                    };
                    if sent.is_err() {
                        // A client that does not read its replies, or is gone.
                        self.close(token);
                        return;
                    }
                }
                Err(SocketError::WouldBlock) => return,
                Err(e) if e.is_bad_input() => {
                    conn.bad_in_a_row += 1;
                    tracing::debug!(token, error = %e, "malformed message");
                    let (code, id) = match &e {
                        SocketError::Decode {
                            request_id,
                            error: DecodeError::Regions(_),
                        } => (ErrorCode::InvalidRegions, *request_id),
                        SocketError::Decode { request_id, .. } => {
                            (ErrorCode::BadMessage, *request_id)
                        }
                        _ => (ErrorCode::BadMessage, 0),
                    };
                    let reply = Message::Error(ErrorReply {
                        code,
                        text: error_chain(&e),
                    });
                    if conn.bad_in_a_row > MAX_BAD_IN_A_ROW
                        || conn.socket.send(&reply, id, &[]).is_err()
                    {
                        self.close(token);
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(token, error = %e, "connection closed");
                    self.close(token);
                    return;
                }
            }
        }
    }

    /// Sends queued conversion events to the connections subscribed to their VM. A subscriber
    /// that does not keep up (its socket is full) is dropped.
    fn deliver_events(&mut self) {
        let mut dead = Vec::new();
        while let Ok(e) = self.event_rx.try_recv() {
            for (&t, conn) in &self.conns {
                if conn.subscriptions.contains(&e.vm_id)
                    && conn
                        .socket
                        .send(&Message::ConversionEvent(e), 0, &[])
                        .is_err()
                {
                    dead.push(t);
                }
            }
        }
        for t in dead {
            self.close(t);
        }
    }

    /// Closes a connection; its VMs are kept for the grace period (`orphan`).
    fn close(&mut self, token: usize) {
        let Some(conn) = self.conns.remove(&token) else {
            return;
        };
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&conn.socket.as_fd().as_raw_fd()));
        crate::metrics::VmMetrics::bump(&self.live.metrics().connections_closed);
        let pid = conn.peer.map(|p| p.pid.as_raw_nonzero().get());
        // The socket first, the VMs after: once a VM is freed, nothing of the connection is
        // left open.
        drop(conn);
        for id in self.held_by(token) {
            self.orphan(id);
        }
        tracing::debug!(token, pid, "client gone");
    }

    /// Stops serving a VM and frees what the daemon holds of it. Its vCPUs waiting in the
    /// mailbox stop waiting (the mailbox is closed first). Its subscriptions end: were the id
    /// ever served again (`ReclaimVm` of a VM the daemon freed rebuilds it, possibly for
    /// another uid), its events would reach only those who subscribe anew.
    fn free_vm(&mut self, id: u64, entry: VmEntry) {
        if let Some(m) = &entry.mailbox {
            m.mailbox.close();
        }
        for conn in self.conns.values_mut() {
            conn.subscriptions.retain(|&s| s != id);
        }
        if let Some(w) = entry.worker {
            if let Err(e) = self.workers[w].stop_vm(id) {
                tracing::error!(vm = id, error = %e, "cannot stop a VM's fault server");
            }
        }
        drop(entry);
        // A VM being served to a destination keeps its memory (the migration holds it) until
        // the destination has every page; a finished migration lets go now.
        self.migrations.outgoing.vm_freed(id);
        self.live.remove(id);
    }

    /// SIGTERM: the daemon exits at once and says what becomes of its VMs. Their VMMs keep
    /// every fd the VMs need and hand them to the next vmpagerd on this socket (a supervisor
    /// restarts it); VMs nobody holds (released for an update, or whose VMM died) are lost.
    fn say_goodbye(&mut self) {
        let held = self
            .vms
            .values()
            .filter(|e| matches!(e.owner, Owner::Conn(_)))
            .count();
        let orphans = self.vms.len() - held;
        if self.vms.is_empty() {
            tracing::info!("shutting down: no VMs");
        } else {
            tracing::warn!(
                vms = held,
                released = orphans,
                "shutting down: {held} VMs stop being served; their VMMs keep their memory and \
                 hand them to the next vmpagerd on this socket (faults wait until then){}",
                if orphans > 0 {
                    format!("; {orphans} VMs waiting for a reattach are freed")
                } else {
                    String::new()
                }
            );
        }
        // Connections close with the process: no VM is freed first, so nothing a VMM holds
        // changes before the next daemon takes it back.
    }

    fn supported_features(&self) -> u64 {
        let mut f = features::FILE_SOURCE
            | features::STATS
            | features::PRIVATE_MEMORY
            | features::MAILBOX
            | features::CONVERSION_EVENTS
            | features::VMM_MEMORY
            | features::FAULT_CHANNEL
            | features::WORKING_SET
            | features::SESSIONS
            | features::MIGRATION
            | features::SNAPSHOT_URL;
        if self.host.has(k::UFFD_FEATURE_MINOR_SHMEM) {
            f |= features::POPULATE_CONTINUE;
        }
        if self.host.has(k::UFFD_FEATURE_MISSING_HUGETLBFS) {
            f |= features::HUGE_PAGES;
        }
        f
    }
}

fn unknown_vm(vm_id: u64) -> Refusal {
    refuse(
        ErrorCode::UnknownVm,
        format!("no VM {vm_id} on this connection"),
    )
}

/// The first VM id of this daemon: random, so the ids of a restarted daemon's new VMs do not
/// collide with the ones its VMMs bring back (`ReclaimVm`). Below 2^48, so ids stay exact in
/// JSON.
fn first_vm_id() -> u64 {
    let mut b = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty());
    ((u64::from_ne_bytes(b) % (1 << 31)) << 16) + 1
}

/// "error: cause: cause" in one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
