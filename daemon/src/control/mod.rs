//! The control reactor: accepts VMM connections on the `SOCK_SEQPACKET` socket, runs each
//! connection's protocol state machine, creates VMs and hands their uffds to workers.
//!
//! One thread, one mio poller. A connection owns its VMs: when it closes (or its process dies)
//! every VM it created is stopped and freed, and no other connection can name them.

mod attach;
mod create;
mod working_set;

pub use create::{check_create, memory_needed};

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

use crate::source::{FileSource, PageSource, ZeroSource};
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

struct VmEntry {
    vm: Arc<Vm>,
    /// The worker serving its uffd and/or its mailbox.
    worker: Option<usize>,
    attached: bool,
    exits: bool,
}

struct Conn {
    socket: Connection,
    state: State,
    vms: HashMap<u64, VmEntry>,
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
    shutdown: OwnedFd,
    config: Config,
    host: HostFeatures,
    workers: Vec<Worker>,
    conns: HashMap<usize, Conn>,
    next_token: usize,
    next_vm: AtomicU64,
    live: Arc<LiveVms>,
    refused: RateLimitedWarning,
    events: EventQueue,
    event_rx: crossbeam::channel::Receiver<ConversionEvent>,
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
            shutdown,
            config,
            host,
            workers,
            conns: HashMap::new(),
            next_token: FIRST_CONN,
            next_vm: AtomicU64::new(1),
            live,
            refused: RateLimitedWarning {
                last: None,
                suppressed: 0,
            },
            events,
            event_rx,
        })
    }

    /// Serves until shutdown.
    pub fn run(mut self) -> Result<(), ControlError> {
        let mut events = Events::with_capacity(128);
        loop {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ControlError::Poll(e));
            }
            for event in events.iter() {
                match event.token() {
                    SHUTDOWN => {
                        tracing::info!("shutting down");
                        let tokens: Vec<_> = self.conns.keys().copied().collect();
                        for t in tokens {
                            self.close(t);
                        }
                        let _ = self.shutdown.as_fd();
                        return Ok(());
                    }
                    LISTENER => self.accept(),
                    EVENTS => self.deliver_events(),
                    Token(t) => self.service(t),
                }
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match rustix::net::accept_with(
                &self.listener,
                SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            ) {
                Ok(fd) => {
                    if self.conns.len() >= self.config.max_connections {
                        self.refused
                            .note("connection limit reached, refusing clients");
                        continue; // dropped: closed
                    }
                    let peer = rustix::net::sockopt::socket_peercred(&fd).ok();
                    let uid = peer.as_ref().map(|p| p.uid.as_raw());
                    if !uid.is_some_and(|u| self.config.allowed_uids.contains(&u)) {
                        self.refused
                            .note("a peer whose uid is not allowed was refused");
                        continue;
                    }
                    let token = self.next_token;
                    self.next_token += 1;
                    if let Err(e) = self.poll.registry().register(
                        &mut SourceFd(&fd.as_raw_fd()),
                        Token(token),
                        Interest::READABLE,
                    ) {
                        tracing::warn!(error = %e, "cannot poll a connection");
                        continue;
                    }
                    tracing::debug!(
                        token,
                        pid = peer.as_ref().map(|p| p.pid.as_raw_nonzero().get()),
                        uid = peer.as_ref().map(|p| p.uid.as_raw()),
                        "client connected"
                    );
                    self.conns.insert(
                        token,
                        Conn {
                            socket: Connection::from_fd(fd),
                            state: State::Greeting,
                            vms: HashMap::new(),
                            peer,
                            bad_in_a_row: 0,
                            subscriptions: Vec::new(),
                        },
                    );
                }
                Err(rustix::io::Errno::AGAIN) => return,
                Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => continue,
                Err(e) => {
                    // EMFILE and friends: keep serving existing clients.
                    tracing::warn!(error = %e, "accept failed");
                    return;
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

    /// Stops and frees every VM of a connection, then closes it.
    fn close(&mut self, token: usize) {
        let Some(mut conn) = self.conns.remove(&token) else {
            return;
        };
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&conn.socket.as_fd().as_raw_fd()));
        let pid = conn.peer.map(|p| p.pid.as_raw_nonzero().get());
        // The socket first, the VMs after: once the VM count drops, nothing of the connection
        // is left open.
        let vms = std::mem::take(&mut conn.vms);
        drop(conn);
        for (id, entry) in vms {
            self.free_vm(id, entry);
        }
        tracing::debug!(token, pid, "client gone");
    }

    fn free_vm(&self, id: u64, entry: VmEntry) {
        if let Some(w) = entry.worker {
            if let Err(e) = self.workers[w].stop_vm(id) {
                tracing::error!(vm = id, error = %e, "cannot stop a VM's fault server");
            }
        }
        drop(entry.vm);
        self.live.add(-1);
    }

    fn dispatch(
        &mut self,
        token: usize,
        received: Received,
    ) -> Result<(Message, Vec<OwnedFd>), Refusal> {
        let Received { message, fds, .. } = received;
        let supported = self.supported_features();
        let Some(conn) = self.conns.get_mut(&token) else {
            return Err(refuse(ErrorCode::Internal, "connection vanished"));
        };
        match (&conn.state, message) {
            (State::Greeting, Message::Hello(hello)) => {
                if hello.version < PROTOCOL_VERSION {
                    return Err(refuse(
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "client speaks version {}, the daemon needs {PROTOCOL_VERSION}",
                            hello.version
                        ),
                    ));
                }
                let features = hello.features & supported;
                conn.state = State::Ready { features };
                Ok((
                    Message::Welcome(Welcome {
                        version: PROTOCOL_VERSION,
                        features,
                        max_regions: MAX_REGIONS as u32,
                        max_payload: MAX_PAYLOAD as u32,
                    }),
                    vec![],
                ))
            }
            (State::Greeting, m) => Err(refuse(
                ErrorCode::BadState,
                format!("{:?} before Hello", m.kind()),
            )),
            (State::Ready { features }, Message::CreateVm(create)) => {
                let features = *features;
                self.create_vm(token, features, create, fds)
            }
            (State::Ready { .. }, Message::AttachUffd(attach)) => self.attach(token, attach, fds),
            (State::Ready { features }, Message::AttachChannel(_))
                if features & features::FAULT_CHANNEL == 0 =>
            {
                Err(refuse(
                    ErrorCode::Unsupported,
                    "fault channels were not negotiated",
                ))
            }
            (State::Ready { .. }, Message::AttachChannel(attach)) => {
                self.attach_channel(token, attach, fds)
            }
            (
                State::Ready { features },
                Message::ReplayWorkingSet(_) | Message::GetWorkingSet { .. },
            ) if features & features::WORKING_SET == 0 => Err(refuse(
                ErrorCode::Unsupported,
                "working sets were not negotiated",
            )),
            (State::Ready { .. }, Message::ReplayWorkingSet(replay)) => {
                self.replay_working_set(token, replay)
            }
            (State::Ready { .. }, Message::GetWorkingSet { vm_id, from }) => {
                self.get_working_set(token, vm_id, from)
            }
            (State::Ready { features }, Message::OpenMailbox { .. })
                if features & features::MAILBOX == 0 =>
            {
                Err(refuse(
                    ErrorCode::Unsupported,
                    "the mailbox was not negotiated",
                ))
            }
            (State::Ready { .. }, Message::OpenMailbox { vm_id, vcpus }) => {
                self.open_mailbox(token, vm_id, vcpus)
            }
            (State::Ready { features }, Message::Subscribe { .. })
                if features & features::CONVERSION_EVENTS == 0 =>
            {
                Err(refuse(
                    ErrorCode::Unsupported,
                    "conversion events were not negotiated",
                ))
            }
            (
                State::Ready { .. },
                Message::Subscribe {
                    vm_id,
                    token: secret,
                },
            ) => {
                let known = self
                    .conns
                    .values()
                    .filter_map(|c| c.vms.get(&vm_id))
                    .any(|e| e.vm.token == secret);
                if !known {
                    // The same answer for a wrong token and an unknown VM.
                    return Err(unknown_vm(vm_id));
                }
                if let Some(conn) = self.conns.get_mut(&token) {
                    if !conn.subscriptions.contains(&vm_id) {
                        conn.subscriptions.push(vm_id);
                    }
                }
                Ok((Message::Subscribed { vm_id }, vec![]))
            }
            (State::Ready { .. }, Message::Detach { vm_id }) => {
                let entry = conn.vms.remove(&vm_id).ok_or_else(|| unknown_vm(vm_id))?;
                self.free_vm(vm_id, entry);
                Ok((Message::Detached { vm_id }, vec![]))
            }
            (State::Ready { features }, Message::GetStats { .. })
                if features & features::STATS == 0 =>
            {
                Err(refuse(ErrorCode::Unsupported, "stats were not negotiated"))
            }
            (State::Ready { .. }, Message::GetStats { vm_id }) => {
                let entry = conn.vms.get(&vm_id).ok_or_else(|| unknown_vm(vm_id))?;
                // Counters are bumped after the populate ioctl woke the faulting thread: let
                // the VM's worker finish what it read, so the snapshot includes every fault
                // the VMM has seen answered.
                if let Some(w) = entry.worker {
                    self.workers[w]
                        .sync()
                        .map_err(|e| refuse(ErrorCode::Internal, format!("worker: {e}")))?;
                }
                let method = entry.vm.populate.wire() as u64;
                Ok((
                    Message::Stats(entry.vm.metrics.snapshot(vm_id, method)),
                    vec![],
                ))
            }
            (State::Ready { .. }, m) => Err(refuse(
                ErrorCode::BadState,
                format!("{:?} is not a request the daemon serves here", m.kind()),
            )),
        }
    }

    fn supported_features(&self) -> u64 {
        let mut f = features::FILE_SOURCE
            | features::STATS
            | features::PRIVATE_MEMORY
            | features::MAILBOX
            | features::CONVERSION_EVENTS
            | features::VMM_MEMORY
            | features::FAULT_CHANNEL
            | features::WORKING_SET;
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
