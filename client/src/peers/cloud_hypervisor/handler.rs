//! cloud-hypervisor's userfaultfd handler thread in shared-backing postcopy (the memory came
//! with `MemoryFd`): each fault becomes a `PageFault` request on the fault connection, the
//! sender writes the page into the memfd and answers `Ok`, and the handler maps it with
//! `UFFDIO_CONTINUE`. While no fault is pending it pulls the next page of the memory range
//! table the same way; past the last page it shuts the fault connection down and exits.

use super::error::uffd_io;
use super::session::send_all;
use super::{ChReport, PeerError, PeerErrorKind};
use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use userfaultfd::{Event, Uffd};
use vmpager_compat::cloud_hypervisor::wire::{self, MemoryRange, Request, Status};

/// `UFFDIO_CONTINUE`: `_IOWR(0xAA, 0x07, struct uffdio_continue)`.
const UFFDIO_CONTINUE: u64 = 0xC020_AA07;

/// `struct uffdio_range`.
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_continue`.
#[repr(C)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

const _: () = assert!(std::mem::size_of::<UffdioContinue>() == 32);

/// Where the handler is, as [`ChVm::wait`](super::ChVm::wait) sees it.
pub(super) enum Phase {
    /// Pulling in the background (and serving faults).
    Running,
    /// Every page of the memory range table was served; the fault connection is shut down.
    Complete,
    /// A background pull failed; only faults are served now.
    Abandoned(Option<PeerError>),
    /// A fault could not be served: the handler stopped (cloud-hypervisor would exit).
    Failed(Option<PeerError>),
    /// Told to stop.
    Stopped,
}

/// State shared by the handler thread and its [`ChVm`](super::ChVm).
pub(super) struct Shared {
    pub demand_faults: AtomicU64,
    pub background_pulls: AtomicU64,
    pub errors: AtomicU64,
    pub shutdown_sent: AtomicBool,
    pub stop: AtomicBool,
    /// Set with the phase becoming `Failed`: the failure's kind and message.
    pub failure: Mutex<Option<(PeerErrorKind, String)>>,
    pub phase: Mutex<Phase>,
    pub changed: Condvar,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            demand_faults: AtomicU64::new(0),
            background_pulls: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            shutdown_sent: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            failure: Mutex::new(None),
            phase: Mutex::new(Phase::Running),
            changed: Condvar::new(),
        }
    }

    pub fn report(&self) -> ChReport {
        ChReport {
            demand_faults: self.demand_faults.load(Ordering::Relaxed),
            background_pulls: self.background_pulls.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            shutdown_sent: self.shutdown_sent.load(Ordering::Acquire),
        }
    }

    pub fn lock_phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn failure(&self) -> Option<(PeerErrorKind, String)> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_phase(&self, phase: Phase) {
        *self.lock_phase() = phase;
        self.changed.notify_all();
    }

    /// Records a fatal error for `read_gpa` (the phase follows with the error itself).
    pub fn record_failure(&self, error: &PeerError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.failure.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((error.kind(), error.to_string()));
    }

    /// Records a fatal error (for `read_gpa`, then for `wait`).
    pub fn fail(&self, error: PeerError) {
        self.record_failure(&error);
        self.set_phase(Phase::Failed(Some(error)));
    }
}

/// A registered slot mapping as the handler sees it (addresses only, never dereferenced here).
#[derive(Debug, Clone)]
pub(super) struct Geometry {
    pub gpa: u64,
    pub size: u64,
    pub host: u64,
    pub page_size: u64,
}

impl Geometry {
    fn pages(&self) -> u64 {
        self.size / self.page_size
    }
}

/// The handler thread's state.
pub(super) struct Handler {
    pub uffd: Arc<Uffd>,
    pub sock: UnixStream,
    pub stop_fd: Arc<OwnedFd>,
    pub slots: Vec<Geometry>,
    pub ranges: Vec<MemoryRange>,
    pub shared: Arc<Shared>,
    /// One bit per page of each slot: served (mapped by this handler).
    served: Vec<Vec<u64>>,
    /// The background cursor: index into `ranges`, and the next gpa in it (`None`: its start).
    range: usize,
    pos: Option<u64>,
    background: bool,
}

enum Exit {
    Complete,
    Stopped,
}

impl Handler {
    pub fn new(
        uffd: Arc<Uffd>,
        sock: UnixStream,
        stop_fd: Arc<OwnedFd>,
        slots: Vec<Geometry>,
        ranges: Vec<MemoryRange>,
        shared: Arc<Shared>,
    ) -> Handler {
        let served = slots
            .iter()
            .map(|s| vec![0u64; s.pages().div_ceil(64) as usize])
            .collect();
        Handler {
            uffd,
            sock,
            stop_fd,
            slots,
            ranges,
            shared,
            served,
            range: 0,
            pos: None,
            background: true,
        }
    }

    /// The thread body: serves until the background pull completes, a fault fails, or it is
    /// told to stop. Afterwards every slot is unregistered, which wakes any thread still blocked
    /// in a fault (it then reads the memfd as it is) so nothing hangs on a dead handler.
    pub fn run(mut self) {
        let result = self.serve();
        let stopping = self.shared.stop.load(Ordering::Acquire);
        if let Err(error) = &result {
            if !stopping {
                // Before unregistering: a reader woken by it must already see the failure.
                self.shared.record_failure(error);
            }
        }
        for s in &self.slots {
            let _ = self
                .uffd
                .unregister(s.host as *mut libc::c_void, s.size as usize);
        }
        match result {
            Ok(Exit::Complete) => {
                let _ = rustix::net::shutdown(&self.sock, Shutdown::Both);
                self.shared.shutdown_sent.store(true, Ordering::Release);
                tracing::debug!("background pull complete; fault connection shut down");
                self.shared.set_phase(Phase::Complete);
            }
            Ok(Exit::Stopped) => self.stopped(),
            Err(_) if stopping => self.stopped(),
            Err(error) => {
                tracing::error!("page-fault handler failed: {error}");
                let _ = rustix::net::shutdown(&self.sock, Shutdown::Both);
                self.shared.set_phase(Phase::Failed(Some(error)));
            }
        }
    }

    fn stopped(&self) {
        let mut phase = self.shared.lock_phase();
        if matches!(*phase, Phase::Running | Phase::Abandoned(_)) {
            *phase = Phase::Stopped;
        }
        drop(phase);
        self.shared.changed.notify_all();
    }

    fn serve(&mut self) -> Result<Exit, PeerError> {
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return Ok(Exit::Stopped);
            }
            match self.uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => {
                    self.demand(addr as u64)?;
                    continue;
                }
                Ok(Some(_)) | Err(userfaultfd::Error::UnrecognizedEvent(_)) => continue,
                Ok(None) => {}
                Err(e) => return Err(PeerError::io("cannot read the userfaultfd", uffd_io(e))),
            }
            if !self.background {
                self.idle()?;
                continue;
            }
            let Some((slot, page)) = self.next_background() else {
                return Ok(Exit::Complete);
            };
            match self.fetch(slot, page) {
                Ok(()) => {
                    self.shared.background_pulls.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) if self.shared.stop.load(Ordering::Acquire) => return Ok(Exit::Stopped),
                Err(error) => {
                    tracing::warn!("background pull abandoned: {error}");
                    self.shared.errors.fetch_add(1, Ordering::Relaxed);
                    self.background = false;
                    self.shared.set_phase(Phase::Abandoned(Some(error)));
                }
            }
        }
    }

    /// Waits for a fault or the stop signal.
    fn idle(&self) -> Result<(), PeerError> {
        let mut fds = [
            PollFd::new(&*self.uffd, PollFlags::IN),
            PollFd::new(&*self.stop_fd, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(Errno::INTR) => Ok(()),
            Err(e) => Err(PeerError::io("cannot poll the userfaultfd", e.into())),
        }
    }

    /// Serves a fault at host address `addr`.
    fn demand(&mut self, addr: u64) -> Result<(), PeerError> {
        let Some((slot, page)) = self.locate(addr) else {
            tracing::warn!("ignoring a fault at {addr:#x}, outside every slot");
            return Ok(());
        };
        if self.is_served(slot, page) {
            // A fault that raced with the page being served: map (or wake) without asking.
            if self.map(slot, page).is_ok() {
                return Ok(());
            }
        }
        self.shared.demand_faults.fetch_add(1, Ordering::Relaxed);
        self.fetch(slot, page)
    }

    /// Slot index and page index of a host address.
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.slots.iter().enumerate().find_map(|(i, s)| {
            (addr >= s.host && addr - s.host < s.size).then(|| (i, (addr - s.host) / s.page_size))
        })
    }

    fn is_served(&self, slot: usize, page: u64) -> bool {
        self.served
            .get(slot)
            .and_then(|bits| bits.get((page / 64) as usize))
            .is_some_and(|word| word & (1 << (page % 64)) != 0)
    }

    fn mark_served(&mut self, slot: usize, page: u64) {
        if let Some(word) = self
            .served
            .get_mut(slot)
            .and_then(|bits| bits.get_mut((page / 64) as usize))
        {
            *word |= 1 << (page % 64);
        }
    }

    /// The next page of the memory range table not served yet, advancing the cursor past it.
    fn next_background(&mut self) -> Option<(usize, u64)> {
        while let Some(range) = self.ranges.get(self.range).copied() {
            let end = range.gpa.saturating_add(range.length);
            let pos = self.pos.unwrap_or(range.gpa);
            if pos >= end {
                self.range += 1;
                self.pos = None;
                continue;
            }
            let found = self
                .slots
                .iter()
                .position(|s| pos >= s.gpa && pos - s.gpa < s.size);
            let Some(slot) = found else {
                // Config checked that ranges lie in slots; step over anything else anyway.
                self.pos = Some(pos.saturating_add(4096));
                continue;
            };
            let (start, page_size) = (self.slots[slot].gpa, self.slots[slot].page_size);
            let page = (pos - start) / page_size;
            self.pos = Some(start + (page + 1) * page_size);
            if !self.is_served(slot, page) {
                return Some((slot, page));
            }
        }
        None
    }

    /// Asks the sender for a page, then maps it: a `PageFault` request with one
    /// `MemoryRange`, an `Ok` response without payload, `UFFDIO_CONTINUE`.
    fn fetch(&mut self, slot: usize, page: u64) -> Result<(), PeerError> {
        let s = &self.slots[slot];
        let gpa = s.gpa + page * s.page_size;
        let range = MemoryRange {
            gpa,
            length: s.page_size,
        };
        let mut message = [0u8; 32];
        message[..16].copy_from_slice(&Request::page_fault().encode());
        message[16..].copy_from_slice(&range.encode());
        send_all(&self.sock, &message).map_err(|e| {
            PeerError::wire(
                format!("cannot send the PageFault for gpa {gpa:#x}"),
                wire_io(e),
            )
        })?;
        let response = wire::read_response(&mut &self.sock).map_err(|e| {
            PeerError::wire(
                format!("cannot read the PageFault response for gpa {gpa:#x}"),
                e,
            )
        })?;
        if response.status() != Status::Ok {
            return Err(PeerError::PageFaultRefused {
                gpa,
                status: format!("{:?}", response.status()),
            });
        }
        if response.length() != 0 {
            return Err(PeerError::PageFaultPayload {
                gpa,
                bytes: response.length(),
            });
        }
        self.map(slot, page)?;
        self.mark_served(slot, page);
        Ok(())
    }

    /// `UFFDIO_CONTINUE` on one page (waking its faulting threads): `EEXIST` (already mapped)
    /// becomes `UFFDIO_WAKE`, `EAGAIN` is retried on what is left.
    fn map(&self, slot: usize, page: u64) -> Result<(), PeerError> {
        let s = &self.slots[slot];
        let gpa = s.gpa + page * s.page_size;
        let addr = s.host + page * s.page_size;
        let fail = |error| PeerError::Continue { gpa, addr, error };
        let (mut start, end) = (addr, addr + s.page_size);
        while start < end {
            let mut arg = UffdioContinue {
                range: UffdioRange {
                    start,
                    len: end - start,
                },
                mode: 0,
                mapped: 0,
            };
            // SAFETY: UFFDIO_CONTINUE reads and writes exactly one `struct uffdio_continue`
            // (32 bytes, `#[repr(C)]` above), which `arg` is and outlives the call. The range is
            // inside a slot mapping that the ChVm keeps mapped until this thread is joined; the
            // ioctl only installs page-cache pages of the slot's memfd there (no Rust reference
            // to those bytes exists).
            let r = unsafe {
                libc::ioctl(
                    self.uffd.as_raw_fd(),
                    UFFDIO_CONTINUE as _,
                    &mut arg as *mut UffdioContinue,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let error = std::io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EEXIST) => {
                    return self
                        .uffd
                        .wake(start as *mut libc::c_void, (end - start) as usize)
                        .map_err(|e| fail(uffd_io(e)));
                }
                Some(libc::EAGAIN) => {
                    if let Ok(mapped @ 1..) = u64::try_from(arg.mapped) {
                        start = start.saturating_add(mapped);
                    }
                }
                Some(libc::EINTR) => {}
                _ => return Err(fail(error)),
            }
        }
        Ok(())
    }
}

fn wire_io(e: std::io::Error) -> wire::WireError {
    wire::WireError::Io(e)
}
