//! cloud-hypervisor's RECEIVER side of a local postcopy migration, played byte for byte as its
//! sources do (main at ae44c29 of 2026-08-20 plus PR #8819 of 2026-08-28, which moved the
//! memory mode from `receive-migration`'s `memory_mode=postcopy` into the sender's `Config`;
//! [`ReceiverOptions::memory_mode_option`] plays a receiver from before it). It stands in for
//! `cloud-hypervisor --api-socket API` + `ch-remote receive-migration receiver_url=unix:SOCK`
//! so that `vmpager ch-restore` (the sender) is tested and measured without cloud-hypervisor.
//!
//! The session ([`ChReceiver::receive`]), on the main connection, each request answered by one
//! `Response` (`Ok`, or `Error` and the migration is over):
//!
//! 1. `Start` with protocol version 0.
//! 2. `MemoryFd` per guest RAM slot: the slot number and its memfd in `SCM_RIGHTS` (several
//!    slots may share one memfd at different file offsets).
//! 3. `Config` (`VmMigrationConfig` JSON): postcopy mode, no prefault, the hypervisor CPUID
//!    signature, the slots (`guest_ram_mappings`) and the memory range table are checked; an
//!    accept thread starts taking additional connections, each opening with a `u16` role.
//! 4. The sender opens the fault connection (role `Fault`).
//! 5. `State`: within [`ReceiverOptions::fault_accept_timeout`] the fault connection must be
//!    there; every slot is mapped `MAP_SHARED` from its memfd at its file offset and registered
//!    `MISSING | MINOR` on a new userfaultfd, and the handler thread starts (cloud-hypervisor
//!    then restores devices and vCPUs).
//! 6. `Complete` or `CompletePaused`; `Abandon` at any point ends the migration.
//!
//! The handler thread turns every fault into a `PageFault` request on the fault connection,
//! and between faults pulls the memory range table page by page the same way; when every page
//! is served it shuts the fault connection down (the sender's "every page received").
//! [`ChVm`] holds the mappings and the handler; [`ChVm::read_gpa`] reads guest memory through
//! the registered mappings as a vCPU would, raising real faults; [`ChVm::wait`] waits for the
//! background pull and returns the counters ([`ChReport`]).
//!
//! Not modelled: precopy (`Memory` commands are refused), memory this receiver would allocate
//! itself (every slot needs a `MemoryFd`), CPUID leaves other than the hypervisor signature,
//! devices and vCPUs (the `State` payload must only be JSON).
//!
//! Beyond cloud-hypervisor (which would crash or hang instead): a slot whose memfd is shorter
//! than `file_offset + size` is refused at `Config`, and when the handler stops (success or
//! failure) it unregisters the mappings, waking any thread still blocked in a fault. The socket
//! file is removed when the [`ChReceiver`] is dropped (at the end of `receive`).

mod config;
mod error;
mod handler;
mod session;

pub use error::{PeerError, PeerErrorKind};

use config::SlotSpec;
use handler::{Phase, Shared};
use rustix::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use userfaultfd::Uffd;
use vmpager_compat::cloud_hypervisor::wire::MemoryRange;
use vmpager_protocol::mapping::SharedMapping;

/// How the receiver was started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverOptions {
    /// `memory_mode=postcopy` on `receive-migration` (before PR #8819): postcopy whatever the
    /// Config says. Without it the Config must announce `"memory_mode": "Postcopy"`.
    pub memory_mode_option: bool,
    /// How long `State` waits for the fault connection (`FAULT_CONNECTION_ACCEPT_TIMEOUT`).
    pub fault_accept_timeout: Duration,
    /// How long an additional connection may take to send its role.
    pub role_read_timeout: Duration,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        ReceiverOptions {
            memory_mode_option: false,
            fault_accept_timeout: Duration::from_secs(30),
            role_read_timeout: Duration::from_secs(10),
        }
    }
}

/// The handler's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChReport {
    /// `PageFault` requests for faults (host reads or writes of pages not served yet).
    pub demand_faults: u64,
    /// `PageFault` requests of the background pull.
    pub background_pulls: u64,
    /// Failed requests or mappings (at most one is fatal: the handler stops there).
    pub errors: u64,
    /// The handler shut the fault connection down after serving every page.
    pub shutdown_sent: bool,
}

/// A receiving cloud-hypervisor: a Unix listener at the `receiver_url` path.
#[derive(Debug)]
pub struct ChReceiver {
    listener: Arc<UnixListener>,
    path: PathBuf,
}

impl ChReceiver {
    /// Binds and listens at `path` (the sender may connect as soon as this returns).
    pub fn listen(path: &Path) -> Result<ChReceiver, PeerError> {
        let listener = UnixListener::bind(path)
            .map_err(|e| PeerError::io(format!("cannot listen on {}", path.display()), e))?;
        Ok(ChReceiver {
            listener: Arc::new(listener),
            path: path.to_path_buf(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts the main connection and runs the migration until `Complete`/`CompletePaused` is
    /// answered. On a refusal the receiver answers `Error` and returns why.
    pub fn receive(self, opts: &ReceiverOptions) -> Result<ChVm, PeerError> {
        let (sock, _) = self
            .listener
            .accept()
            .map_err(|e| PeerError::io("cannot accept the migration connection", e))?;
        session::run(opts, sock, &self.listener)
    }
}

impl Drop for ChReceiver {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A guest RAM slot: its memfd mapped `MAP_SHARED` at `file_offset`, registered on the uffd.
#[derive(Debug)]
pub struct MappedSlot {
    spec: SlotSpec,
    memfd: OwnedFd,
    mapping: SharedMapping,
}

impl MappedSlot {
    /// The memory slot number.
    pub fn slot(&self) -> u32 {
        self.spec.slot
    }

    /// First guest physical address.
    pub fn gpa(&self) -> u64 {
        self.spec.gpa
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.spec.size
    }

    /// Where the slot starts in its memfd.
    pub fn file_offset(&self) -> u64 {
        self.spec.file_offset
    }

    /// The zone's page size (its hugepage size, or 4096).
    pub fn page_size(&self) -> u64 {
        self.spec.page_size
    }

    /// The memory zone.
    pub fn zone_id(&self) -> &str {
        &self.spec.zone_id
    }

    /// Host address of the mapping (raw: the bytes are shared with the sender, so no Rust
    /// reference to them may be formed).
    pub fn host_addr(&self) -> NonNull<u8> {
        self.mapping.as_ptr()
    }

    /// The memfd received with `MemoryFd`.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }
}

/// A restored VM: the slot mappings, the uffd and its handler thread.
#[derive(Debug)]
pub struct ChVm {
    handler: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    stop_fd: Arc<OwnedFd>,
    fault_sock: UnixStream,
    resumed: bool,
    ranges: Vec<MemoryRange>,
    // Field order matters: the mappings are unmapped before the uffd is closed.
    slots: Vec<MappedSlot>,
    uffd: Arc<Uffd>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("report", &self.report())
            .finish()
    }
}

impl ChVm {
    /// The slot mappings, in `guest_ram_mappings` order.
    pub fn slots(&self) -> &[MappedSlot] {
        &self.slots
    }

    /// The memory range table, in the order the background pull walks it.
    pub fn memory_ranges(&self) -> &[MemoryRange] {
        &self.ranges
    }

    /// The migration ended with `Complete` (the VM runs), not `CompletePaused`.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The userfaultfd (to watch for pending faults; the handler thread reads it).
    pub fn uffd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }

    /// The counters now.
    pub fn stats(&self) -> ChReport {
        self.shared.report()
    }

    /// Reads guest memory at `gpa` into `buf` through the registered mappings, as a vCPU would:
    /// pages not served yet fault, and the handler thread asks the sender for them. Fails if the
    /// range is not all guest RAM or the handler has failed.
    pub fn read_gpa(&self, gpa: u64, buf: &mut [u8]) -> Result<(), PeerError> {
        self.check_handler()?;
        let len = buf.len() as u64;
        let out_of_range = PeerError::OutOfRange { gpa, len };
        let end = gpa
            .checked_add(len)
            .ok_or(PeerError::OutOfRange { gpa, len })?;
        // (slot index, offset in slot, bytes), checked before any byte is touched.
        let mut pieces = Vec::new();
        let mut pos = gpa;
        while pos < end {
            let Some((i, s)) = self
                .slots
                .iter()
                .enumerate()
                .find(|(_, s)| pos >= s.gpa() && pos - s.gpa() < s.size())
            else {
                return Err(out_of_range);
            };
            let n = (end - pos).min(s.gpa() + s.size() - pos);
            pieces.push((i, pos - s.gpa(), n));
            pos += n;
        }
        let mut done = 0usize;
        for (i, offset, n) in pieces {
            let (s, n) = (&self.slots[i], n as usize);
            let Some(dst) = buf.get_mut(done..done + n) else {
                return Err(out_of_range);
            };
            // SAFETY: `offset + n <= size` of this slot's live mapping (checked above), which
            // `self` keeps mapped while borrowed; `dst` is a distinct Rust buffer of `n` bytes.
            // No Rust reference to the mapped bytes is formed: they are copied raw, and reading
            // them may block in a userfaultfd fault until the handler thread serves the page.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    s.host_addr().as_ptr().add(offset as usize),
                    dst.as_mut_ptr(),
                    n,
                );
            }
            done += n;
        }
        // The handler may have failed while this thread was blocked (it then unregisters the
        // mappings, and the bytes read are whatever the memfd held).
        self.check_handler()
    }

    fn check_handler(&self) -> Result<(), PeerError> {
        match self.shared.failure() {
            Some((kind, message)) => Err(PeerError::HandlerFailed { kind, message }),
            None => Ok(()),
        }
    }

    /// Waits until the handler has pulled every page of the memory range table and shut the
    /// fault connection down (`Ok` with the counters), or failed: a failed fault ends the
    /// handler (its error is returned), a failed background pull ends the pull
    /// ([`PeerError::BackgroundAbandoned`]). The handler is stopped before this returns.
    pub fn wait(mut self, timeout: Duration) -> Result<ChReport, PeerError> {
        let deadline = Instant::now() + timeout;
        let outcome = {
            let mut phase = self.shared.lock_phase();
            loop {
                if !matches!(*phase, Phase::Running) {
                    break std::mem::replace(&mut *phase, Phase::Stopped);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break Phase::Running;
                }
                phase = self
                    .shared
                    .changed
                    .wait_timeout(phase, left)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
        };
        self.stop_handler();
        let report = self.stats();
        match outcome {
            Phase::Complete => Ok(report),
            Phase::Running => Err(PeerError::Timeout { timeout, report }),
            Phase::Abandoned(error) => Err(PeerError::BackgroundAbandoned {
                error: Box::new(error.unwrap_or_else(|| unknown("abandoned"))),
                report,
            }),
            Phase::Failed(error) => Err(error.unwrap_or_else(|| unknown("failed"))),
            Phase::Stopped => Err(unknown("stopped")),
        }
    }

    /// Stops and joins the handler thread; the fault connection is shut down.
    fn stop_handler(&mut self) {
        let Some(thread) = self.handler.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::Release);
        let _ = rustix::io::write(&*self.stop_fd, &1u64.to_ne_bytes());
        // Unblocks a handler waiting for a response from a sender that does not answer.
        let _ = rustix::net::shutdown(&self.fault_sock, Shutdown::Both);
        let _ = thread.join();
    }
}

fn unknown(what: &str) -> PeerError {
    PeerError::HandlerFailed {
        kind: PeerErrorKind::Local,
        message: format!("the handler {what} without saying why"),
    }
}

impl Drop for ChVm {
    fn drop(&mut self) {
        self.stop_handler();
        for s in &self.slots {
            let _ = self
                .uffd
                .unregister(s.host_addr().as_ptr().cast(), s.size() as usize);
        }
    }
}
