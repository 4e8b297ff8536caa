//! The per-vCPU mailbox: the lock-free channel that carries KVM memory-fault and conversion
//! exits from a VMM's vCPU threads to the daemon and the answers back (DESIGN.md §6).
//!
//! A mailbox is a memfd mapped by both processes: a 128-byte header, then one 128-byte slot per
//! vCPU. A vCPU has at most one outstanding exit, so each slot is a single-producer /
//! single-consumer exchange:
//!
//! 1. the VMM writes the request fields, then release-stores a new `req_seq`;
//! 2. if the daemon said it sleeps (`daemon_idle`, read after a SeqCst fence), the VMM rings
//!    the doorbell eventfd;
//! 3. the daemon reads `req_seq` (acquire), the fields, answers into the slot's second cache
//!    line, release-stores `resp_seq = req_seq`, and if the VMM said it sleeps
//!    (`vmm_waiting`, after a SeqCst fence) wakes the futex on `resp_seq`;
//! 4. the VMM polls `resp_seq` for up to `WaitPolicy::spin_for`, then sets `vmm_waiting`, fences
//!    and sleeps on the futex with a timeout, checking that the daemon is alive in between.
//!
//! Every field is an atomic: both processes may touch the memory at any time, and nothing in a
//! slot is trusted by the daemon before it is validated. No lock is shared between the
//! processes, so a crashed peer can never wedge the other: the survivor's waits are bounded.
//!
//! Layout (all little-endian, offsets in bytes):
//!
//! | header | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `"VMPM"` |
//! | 4 | 4 | layout version (1) |
//! | 8 | 4 | number of slots (vCPUs) |
//! | 12 | 4 | slot size (128) |
//! | 64 | 4 | `daemon_idle`: non-zero while the daemon sleeps on the doorbell |
//! | 68 | 4 | `closed`: non-zero once the daemon freed the VM: no request will be answered |
//!
//! | slot | size | field | written by |
//! |---|---|---|---|
//! | 0 | 4 | `req_seq` | VMM |
//! | 4 | 4 | `vmm_waiting` | VMM |
//! | 8 | 4 | `kind` ([`RequestKind`]) | VMM |
//! | 12 | 4 | `flags` ([`REQ_PRIVATE`]) | VMM |
//! | 16 | 8 | `gpa` | VMM |
//! | 24 | 8 | `size` | VMM |
//! | 64 | 4 | `resp_seq` (futex word) | daemon |
//! | 68 | 4 | `status` ([`Status`]) | daemon |
//! | 72 | 4 | `code` (why when denied/fatal; `RETRY_*` bits on retry) | daemon |
//! | 80 | 8 | `ret` (hypercall return value) | daemon |

use crate::mapping::SharedMapping;
use crossbeam_utils::Backoff;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod fields;
pub use fields::{slots_for_len, HeaderWords};

/// `"VMPM"` as a little-endian u32.
pub const MAILBOX_MAGIC: u32 = u32::from_le_bytes(*b"VMPM");
/// Layout version (2: the `closed` word).
pub const MAILBOX_VERSION: u32 = 2;
/// Bytes per slot (two cache lines: requests, responses).
pub const SLOT_SIZE: usize = 128;
/// Bytes of the header.
pub const HEADER_SIZE: usize = 128;
/// Largest number of slots.
pub const MAX_SLOTS: u32 = 1024;
/// Request flag: the access or the conversion target is private.
pub const REQ_PRIVATE: u32 = 1;

/// Mailbox header (only atomics: both processes touch it).
#[repr(C, align(64))]
pub struct Header {
    magic: AtomicU32,
    version: AtomicU32,
    slots: AtomicU32,
    slot_size: AtomicU32,
    _reserved: [AtomicU64; 6],
    daemon_idle: AtomicU32,
    closed: AtomicU32,
    _reserved2: [AtomicU32; 14],
}

/// One vCPU's slot.
#[repr(C, align(64))]
pub struct Slot {
    req_seq: AtomicU32,
    vmm_waiting: AtomicU32,
    kind: AtomicU32,
    flags: AtomicU32,
    gpa: AtomicU64,
    size: AtomicU64,
    _req_pad: [AtomicU64; 4],
    resp_seq: AtomicU32,
    status: AtomicU32,
    code: AtomicU32,
    _resp_pad0: AtomicU32,
    ret: AtomicU64,
    _resp_pad: [AtomicU64; 5],
}

const _: () = assert!(std::mem::size_of::<Header>() == HEADER_SIZE);
const _: () = assert!(std::mem::size_of::<Slot>() == SLOT_SIZE);

/// What a vCPU asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum RequestKind {
    /// `KVM_EXIT_MEMORY_FAULT`: an access KVM could not map; `REQ_PRIVATE` when KVM set
    /// `KVM_MEMORY_EXIT_FLAG_PRIVATE` (the access wants the page private).
    MemoryFault = 1,
    /// `KVM_HC_MAP_GPA_RANGE`: the guest asks to convert a range; `REQ_PRIVATE` when the
    /// target is private (`KVM_MAP_GPA_RANGE_ENCRYPTED`).
    MapGpaRange = 2,
}

/// One exit forwarded by a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// What it is.
    pub kind: RequestKind,
    /// First guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// The access / conversion target is private.
    pub private: bool,
}

/// The daemon's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    /// Done: re-enter the guest (for a memory fault, the access will now succeed).
    Retry = 1,
    /// Refused by policy or validation; `code` says why. For a hypercall, put `ret` in
    /// `kvm_run` and re-enter; for a memory fault the VMM must not re-enter blindly.
    Denied = 2,
    /// The daemon failed; the VM cannot go on.
    Fatal = 3,
}

/// `Response.code` of a `Retry` after a conversion of a VM whose attributes KVM keeps: the VMM
/// must set the KVM memory attributes of the request's range to the request's direction
/// (`KVM_SET_MEMORY_ATTRIBUTES`) before re-entering the guest. (Only the process that created
/// a KVM VM may issue its VM ioctls, so the daemon cannot.)
pub const RETRY_SET_ATTRIBUTES: u32 = 1;

/// `Response.code` bit of a `Retry` after a conversion to shared: the daemon answered touches
/// of the VMM's mapping of this range with poison while it was private, and those markers stay
/// in the VMM's page table until it drops them (`MADV_DONTNEED` of the range). Without this
/// bit the range holds no marker and the VMM skips that (a `madvise` of a registered range
/// costs a userfaultfd event round trip to the daemon).
pub const RETRY_ZAP_SHARED: u32 = 2;

/// Why a `Denied`/`Fatal` answer was given (`Response.code`).
pub mod codes {
    /// Bad range.
    pub const INVALID: u32 = 1;
    /// Not inside one region.
    pub const NOT_IN_ONE_REGION: u32 = 2;
    /// No private memory there.
    pub const NO_PRIVATE_MEMORY: u32 = 3;
    /// Refused by a policy rule.
    pub const POLICY_RULE: u32 = 4;
    /// Implicit conversions are not honoured.
    pub const IMPLICIT_NOT_ALLOWED: u32 = 5;
    /// Over the conversion rate limit.
    pub const RATE_LIMITED: u32 = 6;
    /// The kernel failed the conversion.
    pub const KERNEL: u32 = 7;
    /// Unknown request kind in the mailbox.
    pub const UNKNOWN_REQUEST: u32 = 8;
}

/// An answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// Verdict.
    pub status: Status,
    /// For `Denied`/`Fatal`: why (`codes`). For `Retry`: what the VMM still has to do, a set
    /// of bits ([`RETRY_SET_ATTRIBUTES`], [`RETRY_ZAP_SHARED`]); 0: nothing.
    pub code: u32,
    /// Hypercall return value for `kvm_run.hypercall.ret` (0 = success, else a negative
    /// errno as u64, as KVM defines).
    pub ret: u64,
}

/// Errors of the mailbox.
#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    /// The memfd is not a mailbox of this layout version.
    #[error("not a vmpager mailbox of layout version {MAILBOX_VERSION}")]
    BadLayout,
    /// Slot index out of range.
    #[error("no slot {0}")]
    NoSlot(u32),
    /// The daemon went away (and, for a client that waits for a restart, did not come back
    /// in time) while we waited.
    #[error("the daemon went away during the exchange")]
    PeerGone,
    /// The daemon freed the VM (`Detach`, or the end of a grace period): no exit of it will
    /// be answered.
    #[error("the daemon freed the VM: its exits are no longer served")]
    Closed,
    /// The daemon answered with values outside the protocol.
    #[error("malformed answer in slot {0}")]
    BadAnswer(u32),
    /// A system call failed.
    #[error("mailbox system call failed")]
    Io(#[from] std::io::Error),
}

impl MailboxError {
    /// The daemon is gone, or freed the VM: the VM must stop.
    pub fn peer_gone(&self) -> bool {
        matches!(self, MailboxError::PeerGone | MailboxError::Closed)
    }
}

/// A mapped mailbox.
#[derive(Debug)]
pub struct Mailbox {
    mapping: SharedMapping,
    slots: u32,
}

fn len_for(slots: u32) -> usize {
    HEADER_SIZE + slots as usize * SLOT_SIZE
}

impl Mailbox {
    /// Creates a mailbox memfd with `slots` slots (daemon side) and maps it.
    pub fn create(slots: u32) -> Result<(Mailbox, OwnedFd), MailboxError> {
        if slots == 0 || slots > MAX_SLOTS {
            return Err(MailboxError::NoSlot(slots));
        }
        let fd = rustix::fs::memfd_create(
            "vmpager-mailbox",
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )
        .map_err(std::io::Error::from)?;
        rustix::fs::ftruncate(&fd, len_for(slots) as u64).map_err(std::io::Error::from)?;
        rustix::fs::fcntl_add_seals(
            &fd,
            rustix::fs::SealFlags::GROW
                | rustix::fs::SealFlags::SHRINK
                | rustix::fs::SealFlags::SEAL,
        )
        .map_err(std::io::Error::from)?;
        let mb = Self::map_raw(fd.as_fd(), len_for(slots), slots)?;
        let h = mb.header();
        h.version.store(MAILBOX_VERSION, Ordering::Relaxed);
        h.slots.store(slots, Ordering::Relaxed);
        h.slot_size.store(SLOT_SIZE as u32, Ordering::Relaxed);
        h.magic.store(MAILBOX_MAGIC, Ordering::Release);
        Ok((mb, fd))
    }

    /// Maps a mailbox received from the daemon (VMM side) after checking its size and header.
    pub fn map(fd: BorrowedFd<'_>) -> Result<Mailbox, MailboxError> {
        let size = rustix::fs::fstat(fd).map_err(std::io::Error::from)?.st_size;
        let size = usize::try_from(size).map_err(|_| MailboxError::BadLayout)?;
        let slots = slots_for_len(size)?;
        let mb = Self::map_raw(fd, size, slots)?;
        let h = mb.header();
        let words = HeaderWords {
            magic: h.magic.load(Ordering::Acquire),
            version: h.version.load(Ordering::Relaxed),
            slots: h.slots.load(Ordering::Relaxed),
            slot_size: h.slot_size.load(Ordering::Relaxed),
        };
        words.check(slots)?;
        Ok(mb)
    }

    fn map_raw(fd: BorrowedFd<'_>, len: usize, slots: u32) -> Result<Mailbox, MailboxError> {
        Ok(Mailbox {
            mapping: SharedMapping::new(fd, len)?,
            slots,
        })
    }

    /// Number of slots.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is page aligned and at least HEADER_SIZE bytes long; `Header` is
        // made only of atomics, valid for any bit pattern and for concurrent access by another
        // process; the reference borrows `self`, which keeps the mapping alive.
        unsafe { &*self.mapping.as_ptr().as_ptr().cast::<Header>() }
    }

    /// Slot `i`, if it exists.
    pub fn slot(&self, i: u32) -> Option<&Slot> {
        if i >= self.slots {
            return None;
        }
        // SAFETY: `i < slots` and the mapping is `HEADER_SIZE + slots * SLOT_SIZE` bytes, so the
        // slot lies inside it, 64-byte aligned (page-aligned base, sizes multiples of 64); `Slot`
        // is only atomics (any bit pattern is valid, concurrent access is fine); the reference
        // borrows `self`.
        Some(unsafe {
            &*self
                .mapping
                .as_ptr()
                .as_ptr()
                .add(HEADER_SIZE + i as usize * SLOT_SIZE)
                .cast::<Slot>()
        })
    }

    /// Daemon side: announce sleeping on the doorbell (`true`) or running (`false`). After
    /// announcing sleep, the daemon must scan every slot once more before it really sleeps.
    pub fn set_daemon_idle(&self, idle: bool) {
        self.header()
            .daemon_idle
            .store(u32::from(idle), Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    fn daemon_idle(&self) -> bool {
        self.header().daemon_idle.load(Ordering::Relaxed) != 0
    }

    /// Daemon side: the VM is freed; no request will be answered. Every waiting vCPU is woken
    /// and gets [`MailboxError::Closed`], and so does every later exchange.
    pub fn close(&self) {
        self.header().closed.store(1, Ordering::Release);
        fence(Ordering::SeqCst);
        for i in 0..self.slots {
            if let Some(slot) = self.slot(i) {
                let _ = rustix::thread::futex::wake(
                    &slot.resp_seq,
                    rustix::thread::futex::Flags::empty(),
                    u32::MAX,
                );
            }
        }
    }

    /// Whether the daemon closed the mailbox.
    pub fn is_closed(&self) -> bool {
        self.header().closed.load(Ordering::Acquire) != 0
    }
}

impl Slot {
    /// Daemon side: the pending request's sequence number and fields, if a request newer than
    /// `answered` is there. The fields are untrusted: `kind` may be unknown (`Err` with the
    /// sequence number, so it can be answered).
    pub fn pending(&self, answered: u32) -> Option<(u32, Result<Request, u32>)> {
        let seq = self.req_seq.load(Ordering::Acquire);
        if seq == answered {
            return None;
        }
        Some((
            seq,
            Request::from_slot(
                self.kind.load(Ordering::Relaxed),
                self.flags.load(Ordering::Relaxed),
                self.gpa.load(Ordering::Relaxed),
                self.size.load(Ordering::Relaxed),
            ),
        ))
    }

    /// Daemon side: answers request `seq` and wakes the vCPU if it sleeps.
    pub fn answer(&self, seq: u32, response: Response) {
        let (status, code, ret) = response.to_slot();
        self.status.store(status, Ordering::Relaxed);
        self.code.store(code, Ordering::Relaxed);
        self.ret.store(ret, Ordering::Relaxed);
        self.resp_seq.store(seq, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.vmm_waiting.load(Ordering::Relaxed) != 0 {
            let _ = rustix::thread::futex::wake(
                &self.resp_seq,
                rustix::thread::futex::Flags::empty(),
                1,
            );
        }
    }
}

/// How the VMM side waits for an answer.
#[derive(Debug, Clone, Copy)]
pub struct WaitPolicy {
    /// How long to poll for the answer (spinning, then yielding the CPU) before sleeping on
    /// the futex; zero sleeps at once. Sleeping costs a cross-CPU wakeup (20–45 µs on hosts
    /// that are themselves VMs), so the default outlasts a conversion's host-side work.
    pub spin_for: Duration,
    /// Longest single futex sleep before checking that the daemon is alive.
    pub liveness_check: Duration,
}

impl WaitPolicy {
    /// The default `spin_for`: measured to cover a 4 KiB or 2 MiB conversion round trip
    /// (`vmpager bench`, conversion rows), like KVM's own halt polling (up to 200 µs).
    pub const DEFAULT_SPIN: Duration = Duration::from_micros(100);
}

impl Default for WaitPolicy {
    fn default() -> Self {
        WaitPolicy {
            spin_for: WaitPolicy::DEFAULT_SPIN,
            liveness_check: Duration::from_millis(20),
        }
    }
}

/// Whether the daemon serving a mailbox is there, as a waiting vCPU asks it between sleeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Serving: keep waiting.
    Alive,
    /// Away, expected back (a daemon restart within the client's deadline): keep waiting;
    /// the next daemon finds the request in the slot and answers it.
    Away,
    /// Gone for good: stop waiting.
    Gone,
}

/// Tells a waiting vCPU whether its daemon is there.
pub trait Liveness: Send + Sync + std::fmt::Debug {
    /// The daemon's state now (must not block).
    fn peer(&self) -> Peer;
}

/// An fd that reports `POLLHUP` when the daemon is gone (the control connection): alive until
/// then, gone after.
impl Liveness for OwnedFd {
    fn peer(&self) -> Peer {
        let mut fds = [rustix::event::PollFd::new(
            self,
            rustix::event::PollFlags::empty(),
        )];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match rustix::event::poll(&mut fds, Some(&zero)) {
            Ok(_)
                if !fds[0]
                    .revents()
                    .intersects(rustix::event::PollFlags::HUP | rustix::event::PollFlags::ERR) =>
            {
                Peer::Alive
            }
            _ => Peer::Gone,
        }
    }
}

/// The VMM end of one vCPU's slot. Owned by that vCPU's thread.
#[derive(Debug)]
pub struct VcpuChannel {
    mailbox: std::sync::Arc<Mailbox>,
    index: u32,
    seq: u32,
    doorbell: std::sync::Arc<OwnedFd>,
    liveness: std::sync::Arc<dyn Liveness>,
    policy: WaitPolicy,
}

impl VcpuChannel {
    /// The channel of slot `index`. `doorbell` is the daemon's eventfd; `liveness` says whether
    /// the daemon is there (the control connection's fd says so with `POLLHUP`; a client that
    /// waits for a restarted daemon says `Away` meanwhile).
    pub fn new(
        mailbox: std::sync::Arc<Mailbox>,
        index: u32,
        doorbell: std::sync::Arc<OwnedFd>,
        liveness: std::sync::Arc<dyn Liveness>,
        policy: WaitPolicy,
    ) -> Result<VcpuChannel, MailboxError> {
        let slot = mailbox.slot(index).ok_or(MailboxError::NoSlot(index))?;
        // Continue from whatever the slot holds (a restarted VMM reattaching).
        let seq = slot.req_seq.load(Ordering::Relaxed);
        Ok(VcpuChannel {
            mailbox,
            index,
            seq,
            doorbell,
            liveness,
            policy,
        })
    }

    /// Forwards one exit and waits for the answer.
    pub fn exchange(&mut self, request: Request) -> Result<Response, MailboxError> {
        let slot = self
            .mailbox
            .slot(self.index)
            .ok_or(MailboxError::NoSlot(self.index))?;
        self.seq = self.seq.wrapping_add(1);
        if self.seq == 0 {
            self.seq = 1; // 0 is "never used"
        }
        if self.mailbox.is_closed() {
            return Err(MailboxError::Closed);
        }
        let seq = self.seq;
        let (kind, flags, gpa, size) = request.to_slot();
        slot.kind.store(kind, Ordering::Relaxed);
        slot.flags.store(flags, Ordering::Relaxed);
        slot.gpa.store(gpa, Ordering::Relaxed);
        slot.size.store(size, Ordering::Relaxed);
        slot.req_seq.store(seq, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.mailbox.daemon_idle() {
            rustix::io::write(&*self.doorbell, &1u64.to_ne_bytes())
                .map_err(std::io::Error::from)?;
        }
        self.wait(slot, seq)?;
        Response::from_slot(
            slot.status.load(Ordering::Relaxed),
            slot.code.load(Ordering::Relaxed),
            slot.ret.load(Ordering::Relaxed),
        )
        .ok_or(MailboxError::BadAnswer(self.index))
    }

    fn wait(&self, slot: &Slot, seq: u32) -> Result<(), MailboxError> {
        if !self.policy.spin_for.is_zero() {
            // Busy-spin briefly (crossbeam `Backoff`), then keep polling between yields so a
            // daemon thread sharing this CPU can run, until `spin_for` has passed.
            let backoff = Backoff::new();
            let start = Instant::now();
            loop {
                if slot.resp_seq.load(Ordering::Acquire) == seq {
                    return Ok(());
                }
                if !backoff.is_completed() {
                    backoff.snooze();
                } else if start.elapsed() < self.policy.spin_for {
                    std::thread::yield_now();
                } else {
                    break;
                }
            }
        }
        slot.vmm_waiting.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let result = loop {
            let now = slot.resp_seq.load(Ordering::Acquire);
            if now == seq {
                break Ok(());
            }
            let started = Instant::now();
            let timeout = rustix::thread::futex::Timespec {
                tv_sec: self.policy.liveness_check.as_secs() as i64,
                tv_nsec: i64::from(self.policy.liveness_check.subsec_nanos()),
            };
            match rustix::thread::futex::wait(
                &slot.resp_seq,
                rustix::thread::futex::Flags::empty(),
                now,
                Some(&timeout),
            ) {
                Ok(()) | Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::TIMEDOUT) => {}
                Err(e) => break Err(MailboxError::Io(e.into())),
            }
            if slot.resp_seq.load(Ordering::Acquire) == seq {
                break Ok(());
            }
            if self.mailbox.is_closed() {
                break Err(MailboxError::Closed);
            }
            if started.elapsed() >= self.policy.liveness_check && self.liveness.peer() == Peer::Gone
            {
                break Err(MailboxError::PeerGone);
            }
        };
        slot.vmm_waiting.store(0, Ordering::Relaxed);
        result
    }
}

/// The daemon end of a mailbox: finds pending requests in every slot and answers them.
#[derive(Debug)]
pub struct Consumer {
    mailbox: std::sync::Arc<Mailbox>,
    answered: Vec<u32>,
}

impl Consumer {
    /// A consumer of `mailbox`; requests already answered (a reattached mailbox) stay answered.
    pub fn new(mailbox: std::sync::Arc<Mailbox>) -> Consumer {
        let answered = (0..mailbox.slots())
            .map(|i| {
                mailbox
                    .slot(i)
                    .map_or(0, |s| s.resp_seq.load(Ordering::Acquire))
            })
            .collect();
        Consumer { mailbox, answered }
    }

    /// The mailbox.
    pub fn mailbox(&self) -> &std::sync::Arc<Mailbox> {
        &self.mailbox
    }

    /// One pass over every slot: answers each pending request with `handle(slot, request)`
    /// (`Err(kind)` for an unknown request kind). Returns how many were answered.
    pub fn poll(
        &mut self,
        handle: &mut impl FnMut(u32, Result<Request, u32>) -> Response,
    ) -> usize {
        let mut served = 0;
        for (i, answered) in self.answered.iter_mut().enumerate() {
            let Some(slot) = self.mailbox.slot(i as u32) else {
                continue;
            };
            if let Some((seq, request)) = slot.pending(*answered) {
                let response = handle(i as u32, request);
                slot.answer(seq, response);
                *answered = seq;
                served += 1;
            }
        }
        served
    }

    /// Serves until nothing is pending: polls, spins briefly (crossbeam `Backoff`) while more
    /// requests may follow, then announces that the daemon sleeps and polls once more. On
    /// return the caller may block on the doorbell: any request made after that last pass
    /// rings it.
    pub fn drain(
        &mut self,
        handle: &mut impl FnMut(u32, Result<Request, u32>) -> Response,
    ) -> usize {
        let mut served = 0;
        loop {
            self.mailbox.set_daemon_idle(false);
            let backoff = Backoff::new();
            loop {
                let n = self.poll(handle);
                served += n;
                if n > 0 {
                    backoff.reset();
                } else if backoff.is_completed() {
                    break;
                } else {
                    backoff.snooze();
                }
            }
            self.mailbox.set_daemon_idle(true);
            let late = self.poll(handle);
            served += late;
            if late == 0 {
                return served;
            }
        }
    }
}
