//! The main connection, as cloud-hypervisor's `receive-migration` runs it: one request at a
//! time, each answered `Ok` or, on any refusal, `Error` and the end of the migration; and the
//! accept thread that takes the additional connections from `Config` on.

use super::config::{self, MigrationConfig, SlotSpec};
use super::error::{self, PeerError};
use super::handler::{Geometry, Handler, Shared};
use super::{ChVm, MappedSlot, ReceiverOptions};
use rustix::event::EventfdFlags;
use rustix::io::Errno;
use rustix::net::{SendFlags, Shutdown};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;
use userfaultfd::{FeatureFlags, RegisterMode, UffdBuilder};
use vmpager_compat::cloud_hypervisor::snapshot::MAX_JSON_BYTES;
use vmpager_compat::cloud_hypervisor::wire::{
    self, Command, ConnectionRole, Request, Response, WireError, MEMORY_FD_PAYLOAD_LEN,
    PROTOCOL_VERSION,
};
use vmpager_protocol::mapping::SharedMapping;

/// `UFFD_FEATURE_MISSING_HUGETLBFS`.
const FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// `UFFD_FEATURE_MISSING_SHMEM`.
const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_MINOR_HUGETLBFS`.
const FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
/// `UFFD_FEATURE_MINOR_SHMEM`.
const FEATURE_MINOR_SHMEM: u64 = 1 << 10;

/// The thread taking additional connections (from `Config` on), as cloud-hypervisor's.
struct Acceptor {
    thread: JoinHandle<()>,
    faults: mpsc::Receiver<UnixStream>,
}

impl Acceptor {
    fn start(listener: Arc<UnixListener>, role_timeout: Duration) -> Result<Acceptor, PeerError> {
        let (tx, faults) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ch-accept".into())
            .spawn(move || loop {
                let conn = match listener.accept() {
                    Ok((conn, _)) => conn,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                    // EINVAL: the listener was shut down (the migration is over).
                    Err(_) => return,
                };
                let _ = conn.set_read_timeout(Some(role_timeout));
                match wire::read_role(&mut &conn) {
                    Ok(ConnectionRole::Fault) => {
                        let _ = conn.set_read_timeout(None);
                        if tx.send(conn).is_err() {
                            return;
                        }
                    }
                    Ok(role) => tracing::debug!("dropping a connection with role {role:?}"),
                    Err(e) => tracing::warn!("rejecting an additional connection: {e}"),
                }
            })
            .map_err(|e| PeerError::io("cannot start the accept thread", e))?;
        Ok(Acceptor { thread, faults })
    }

    fn stop(self, listener: &UnixListener) {
        // shutdown() of a listening Unix socket makes a blocked accept() fail with EINVAL. A
        // connection still sending its role delays the join by up to the role timeout.
        let _ = rustix::net::shutdown(listener, Shutdown::Both);
        let _ = self.thread.join();
    }
}

/// What a request leads to.
enum Step {
    Next,
    Done,
    Abandon,
}

/// Runs the migration on the accepted main connection `sock`.
pub(super) fn run(
    opts: &ReceiverOptions,
    sock: UnixStream,
    listener: &Arc<UnixListener>,
) -> Result<ChVm, PeerError> {
    let mut session = Session {
        opts,
        sock,
        listener,
        started: false,
        memory_fds: BTreeMap::new(),
        config: None,
        acceptor: None,
        vm: None,
    };
    let result = session.run();
    if let Some(acceptor) = session.acceptor.take() {
        acceptor.stop(listener);
    }
    result
}

struct Session<'a> {
    opts: &'a ReceiverOptions,
    sock: UnixStream,
    listener: &'a Arc<UnixListener>,
    started: bool,
    memory_fds: BTreeMap<u32, OwnedFd>,
    config: Option<MigrationConfig>,
    acceptor: Option<Acceptor>,
    vm: Option<ChVm>,
}

fn refuse<T>(reason: impl Into<String>) -> Result<T, PeerError> {
    Err(PeerError::Refused(reason.into()))
}

impl Session<'_> {
    fn run(&mut self) -> Result<ChVm, PeerError> {
        loop {
            let request = match wire::read_request(&mut &self.sock) {
                Ok(request) => request,
                Err(e) => {
                    if e.is_bad_input() {
                        self.answer(Response::error());
                    }
                    return Err(PeerError::wire("cannot read a migration request", e));
                }
            };
            tracing::debug!("received {:?}", request.command());
            match self.step(request) {
                Ok(Step::Next) => self.ok(request.command())?,
                Ok(Step::Done) => {
                    self.ok(request.command())?;
                    return self.vm.take().ok_or(PeerError::Refused(
                        "the migration completed without a VM".into(),
                    ));
                }
                Ok(Step::Abandon) => {
                    self.answer(Response::ok());
                    return Err(PeerError::Abandoned);
                }
                Err(e) => {
                    tracing::warn!("refusing {:?}: {e}", request.command());
                    self.answer(Response::error());
                    return Err(e);
                }
            }
        }
    }

    fn answer(&self, response: Response) {
        let _ = send_all(&self.sock, &response.encode());
    }

    fn ok(&self, command: Command) -> Result<(), PeerError> {
        send_all(&self.sock, &Response::ok().encode())
            .map_err(|e| PeerError::wire(format!("cannot answer {command:?}"), WireError::Io(e)))
    }

    fn step(&mut self, request: Request) -> Result<Step, PeerError> {
        let command = request.command();
        let no_payload = || {
            if request.length() == 0 {
                Ok(())
            } else {
                refuse(format!(
                    "{command:?} carries {} payload bytes (it has none)",
                    request.length()
                ))
            }
        };
        if command == Command::Abandon {
            return Ok(Step::Abandon);
        }
        if command != Command::Start && !self.started {
            return refuse(format!("{command:?} before Start"));
        }
        match command {
            Command::Start => {
                no_payload()?;
                if self.started {
                    return refuse("a second Start");
                }
                let version = request.sender_version().unwrap_or(u16::MAX);
                if version != PROTOCOL_VERSION {
                    return refuse(format!(
                        "the sender speaks migration protocol version {version}; this receiver \
                         speaks {PROTOCOL_VERSION}"
                    ));
                }
                self.started = true;
                Ok(Step::Next)
            }
            Command::MemoryFd => {
                if self.config.is_some() {
                    return refuse("MemoryFd after Config");
                }
                if request.length() != MEMORY_FD_PAYLOAD_LEN {
                    return refuse(format!(
                        "MemoryFd announces {} payload bytes (not {MEMORY_FD_PAYLOAD_LEN})",
                        request.length()
                    ));
                }
                let (slot, fd) = wire::recv_memory_fd(self.sock.as_fd())
                    .map_err(|e| PeerError::wire("cannot receive the MemoryFd payload", e))?;
                tracing::debug!("slot {slot}: memory fd received");
                self.memory_fds.insert(slot, fd);
                Ok(Step::Next)
            }
            Command::Config => {
                if self.config.is_some() {
                    return refuse("a second Config");
                }
                let payload = self.payload(request)?;
                let config = config::parse(&payload, self.opts.memory_mode_option)
                    .map_err(PeerError::Refused)?;
                self.check_memory_fds(&config.slots)?;
                self.config = Some(config);
                self.acceptor = Some(Acceptor::start(
                    Arc::clone(self.listener),
                    self.opts.role_read_timeout,
                )?);
                Ok(Step::Next)
            }
            Command::State => {
                if self.config.is_none() {
                    return refuse("State before Config");
                }
                if self.vm.is_some() {
                    return refuse("a second State");
                }
                let payload = self.payload(request)?;
                if let Err(e) = serde_json::from_slice::<serde_json::Value>(&payload) {
                    return refuse(format!("the State payload is not a snapshot in JSON: {e}"));
                }
                self.vm = Some(self.restore()?);
                Ok(Step::Next)
            }
            Command::Complete | Command::CompletePaused => {
                no_payload()?;
                match self.vm.as_mut() {
                    None => refuse(format!("{command:?} before State")),
                    Some(vm) => {
                        vm.resumed = command == Command::Complete;
                        Ok(Step::Done)
                    }
                }
            }
            Command::Memory => refuse(
                "a Memory command: memory arrives through MemoryFd and PageFault in shared-backing \
                 postcopy",
            ),
            Command::Invalid | Command::PageFault | Command::Abandon => {
                refuse(format!("{command:?} on the main connection"))
            }
        }
    }

    /// Reads a `Config` or `State` payload.
    fn payload(&mut self, request: Request) -> Result<Vec<u8>, PeerError> {
        let len = request.length();
        if len > MAX_JSON_BYTES {
            return refuse(format!(
                "the {:?} payload of {len} bytes exceeds {MAX_JSON_BYTES}",
                request.command()
            ));
        }
        let mut payload = Vec::new();
        (&self.sock)
            .take(len)
            .read_to_end(&mut payload)
            .map_err(|e| PeerError::wire("cannot read a payload", WireError::Io(e)))?;
        if payload.len() as u64 != len {
            return Err(PeerError::wire(
                format!("cannot read the {:?} payload", request.command()),
                WireError::Closed,
            ));
        }
        Ok(payload)
    }

    /// Every slot needs its memfd (shared backing), long enough for the slot.
    fn check_memory_fds(&self, slots: &[SlotSpec]) -> Result<(), PeerError> {
        if self.memory_fds.is_empty() {
            return refuse(
                "no MemoryFd was sent: this receiver plays shared-backing (local) postcopy only",
            );
        }
        for s in slots {
            let Some(fd) = self.memory_fds.get(&s.slot) else {
                return refuse(format!("slot {} has no MemoryFd", s.slot));
            };
            let len = rustix::fs::fstat(fd)
                .map_err(|e| {
                    PeerError::io(
                        format!("cannot stat the memfd of slot {}", s.slot),
                        e.into(),
                    )
                })?
                .st_size;
            let need = s.file_offset + s.size;
            if u64::try_from(len).unwrap_or(0) < need {
                return refuse(format!(
                    "the memfd of slot {} holds {len} bytes; the slot needs {need:#x} \
                     (file_offset + size)",
                    s.slot
                ));
            }
        }
        Ok(())
    }

    /// `State` in postcopy: the fault connection, the mappings, the uffd, the handler.
    fn restore(&mut self) -> Result<ChVm, PeerError> {
        let timeout = self.opts.fault_accept_timeout;
        let fault = self
            .acceptor
            .as_ref()
            .and_then(|a| a.faults.recv_timeout(timeout).ok())
            .ok_or(PeerError::NoFaultConnection(timeout))?;
        let Some(config) = self.config.take() else {
            return refuse("State before Config");
        };
        let mut features = FEATURE_MISSING_SHMEM | FEATURE_MINOR_SHMEM;
        if config.hugepages {
            features |= FEATURE_MISSING_HUGETLBFS | FEATURE_MINOR_HUGETLBFS;
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(FeatureFlags::from_bits_retain(features))
            .create()
            .map_err(|e| {
                PeerError::io(
                    format!("cannot create a userfaultfd with features {features:#x}"),
                    error::uffd_io(e),
                )
            })?;
        let uffd = Arc::new(uffd);
        let mut slots = Vec::with_capacity(config.slots.len());
        for spec in config.slots {
            let Some(memfd) = self.memory_fds.remove(&spec.slot) else {
                return refuse(format!("slot {} has no MemoryFd", spec.slot));
            };
            // Config checked that the size fits in usize.
            let len = spec.size as usize;
            let mapping = SharedMapping::new_at(memfd.as_fd(), spec.file_offset, len)
                .map_err(|e| PeerError::io(format!("cannot map slot {}", spec.slot), e))?;
            let slot = MappedSlot {
                spec,
                memfd,
                mapping,
            };
            uffd.register_with_mode(
                slot.mapping.as_ptr().as_ptr().cast(),
                len,
                RegisterMode::MISSING | RegisterMode::MINOR,
            )
            .map_err(|e| {
                PeerError::io(
                    format!("cannot register slot {} on the userfaultfd", slot.spec.slot),
                    error::uffd_io(e),
                )
            })?;
            slots.push(slot);
        }
        let stop_fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| PeerError::io("cannot create an eventfd", e.into()))?;
        let stop_fd = Arc::new(stop_fd);
        let fault_sock = fault
            .try_clone()
            .map_err(|e| PeerError::io("cannot duplicate the fault connection", e))?;
        let shared = Arc::new(Shared::new());
        let geometry = slots
            .iter()
            .map(|s| Geometry {
                gpa: s.spec.gpa,
                size: s.spec.size,
                host: s.mapping.as_ptr().as_ptr() as u64,
                page_size: s.spec.page_size,
            })
            .collect();
        let handler = Handler::new(
            Arc::clone(&uffd),
            fault,
            Arc::clone(&stop_fd),
            geometry,
            config.ranges.clone(),
            Arc::clone(&shared),
        );
        let mut vm = ChVm {
            handler: None,
            shared: Arc::clone(&shared),
            stop_fd,
            fault_sock,
            resumed: false,
            ranges: config.ranges,
            slots,
            uffd,
        };
        let thread = std::thread::Builder::new()
            .name("ch-uffd".into())
            .spawn(move || {
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.run()));
                if let Err(panic) = run {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    shared.fail(PeerError::HandlerPanicked(what));
                }
            })
            .map_err(|e| PeerError::io("cannot start the page-fault handler thread", e))?;
        vm.handler = Some(thread);
        Ok(vm)
    }
}

/// Writes all of `bytes` without raising `SIGPIPE`.
pub(super) fn send_all(sock: &UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match rustix::net::send(sock.as_fd(), bytes, SendFlags::NOSIGNAL) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
