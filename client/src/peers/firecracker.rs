//! Firecracker's side of its external UFFD page-fault handler protocol: a Firecracker process
//! restoring a snapshot with `mem_backend: { backend_type: Uffd }`, played byte for byte as
//! Firecracker's sources do (main at 81b38b9, behaviour unchanged since v1.12), so tests and
//! benchmarks can drive `vmpager firecracker-handler` (or any other handler) without Firecracker.
//!
//! What [`FirecrackerVm::restore`] does, in Firecracker's order:
//!
//! 1. maps every guest region `mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE |
//!    MAP_ANONYMOUS | MAP_NORESERVE)`, plus `MAP_HUGETLB | MAP_HUGE_2MB` for 2 MiB pages;
//! 2. creates the userfaultfd with only `UFFD_FEATURE_EVENT_REMOVE` required, close-on-exec,
//!    non-blocking, kernel faults included (`UFFD_USER_MODE_ONLY` off), and registers each
//!    region whole in `MISSING` mode;
//! 3. `connect()`s to the handler's Unix `SOCK_STREAM` socket and does one `sendmsg`: the
//!    compact JSON of the regions (file offsets cumulative, `page_size_kib` carrying the page
//!    size in bytes like `page_size`) with the uffd in `SCM_RIGHTS`;
//! 4. keeps the socket open, never reading it, for as long as the VM lives (Firecracker
//!    `mem::forget`s it); dropping the [`FirecrackerVm`] closes it, which is how a handler
//!    learns the VM is gone.
//!
//! No vCPU runs: [`FirecrackerVm::read`], [`FirecrackerVm::write`] and
//! [`FirecrackerVm::verify_against`] touch guest memory from host threads, which faults the
//! pages in through the handler exactly as a vCPU's first touch would.
//! [`FirecrackerVm::balloon_inflate`] is Firecracker's balloon: `madvise(MADV_DONTNEED)`, which
//! raises `UFFD_EVENT_REMOVE` and blocks in the kernel until the handler reads it.
//!
//! Guest memory is foreign memory here, as in a VMM: the handler fills it through the kernel
//! (`UFFDIO_COPY`) concurrently with this process. So no Rust reference to it is ever formed;
//! it is only copied to and from through raw pointers.

use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use rustix::io::Errno;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};
use vmpager_compat::firecracker::{self as fc, GuestRegionUffdMapping, PAGE_2M, PAGE_4K};

/// Bytes [`FirecrackerVm::verify_against`] reads and compares at a time.
const CHUNK: u64 = 1 << 20;

/// One guest memory region to restore (input of [`FirecrackerVm::restore`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirecrackerRegion {
    /// Size in bytes: non-zero, a multiple of `page_size`.
    pub size: u64,
    /// [`PAGE_4K`] (anonymous memory) or [`PAGE_2M`] (2 MiB hugetlb pages).
    pub page_size: u64,
}

/// A mapped guest region of a [`FirecrackerVm`], as announced in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRegion {
    host_addr: NonNull<u8>,
    size: u64,
    file_offset: u64,
    page_size: u64,
}

// SAFETY: a `GuestRegion` is an address and three numbers; this type never dereferences the
// address. Every access to the memory goes through `FirecrackerVm`, which checks the range
// against its live mappings.
unsafe impl Send for GuestRegion {}
// SAFETY: as for `Send`: shared `GuestRegion`s only hand out the address, never access it.
unsafe impl Sync for GuestRegion {}

impl GuestRegion {
    /// The region's first byte in this process (the `base_host_virt_addr` of the handshake,
    /// where the handler's faults arrive).
    pub fn host_addr(&self) -> NonNull<u8> {
        self.host_addr
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Offset of the region's contents in the memory snapshot file (the handshake's `offset`).
    pub fn file_offset(&self) -> u64 {
        self.file_offset
    }

    /// Page size in bytes: [`PAGE_4K`] or [`PAGE_2M`].
    pub fn page_size(&self) -> u64 {
        self.page_size
    }
}

/// What [`FirecrackerVm::restore_with`] sends after connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// Firecracker's handshake: the regions' JSON with the uffd in `SCM_RIGHTS`.
    Firecracker,
    /// These bytes instead of the JSON (one `sendmsg`, with the uffd in `SCM_RIGHTS`); they
    /// must not be empty, since a stream socket carries an fd only with data.
    Raw(Vec<u8>),
    /// Firecracker's JSON, but without any fd.
    NoFd,
}

/// Why playing Firecracker failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// A region is invalid or `mmap` refused it.
    #[error(
        "Mapping guest region {region} ({size} bytes, page size {page_size}) failed: {source}"
    )]
    Map {
        /// Index of the region.
        region: usize,
        /// Its size.
        size: u64,
        /// Its page size.
        page_size: u64,
        /// Why.
        source: io::Error,
    },
    /// Creating the userfaultfd or registering a region on it failed.
    #[error("Userfaultfd operation failed: {0}")]
    Uffd(#[from] userfaultfd::Error),
    /// Connecting to the handler's socket failed.
    #[error("Connecting to the page-fault handler at {path} failed: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Sending the handshake failed.
    #[error("Sending the handshake failed: {0}")]
    Send(io::Error),
    /// A range that is not inside a region, or not page aligned where it must be.
    #[error("Bytes {offset:#x}..+{len:#x} of region {region} are {reason}")]
    OutOfRange {
        /// Index of the region.
        region: usize,
        /// Offset of the range in the region.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Guest memory differs from the memory file.
    #[error(
        "Region {region} differs from the memory file at offset {offset:#x}: expected \
         {expected:#018x}, got {got:#018x}"
    )]
    Mismatch {
        /// Index of the region.
        region: usize,
        /// Offset in the region of the first differing 8-byte word.
        offset: u64,
        /// The word in the file (little-endian; bytes past the file's end are zero).
        expected: u64,
        /// The word in guest memory (little-endian).
        got: u64,
    },
    /// Another system call failed (reading the memory file, `madvise`, spawning a thread).
    #[error("I/O failed: {0}")]
    Io(#[source] io::Error),
}

/// Owns the guest mappings; unmaps them when dropped.
#[derive(Debug)]
struct Mappings(Vec<GuestRegion>);

impl Drop for Mappings {
    fn drop(&mut self) {
        for r in &self.0 {
            // SAFETY: `r` was mapped by `map_region` with exactly `r.size` bytes and is unmapped
            // only here, once. Dropping needs exclusive access, so no copy into or out of it is
            // in progress, and no Rust reference into it exists (none is ever formed).
            let rc = unsafe { libc::munmap(r.host_addr.as_ptr().cast(), r.size as usize) };
            if rc != 0 {
                tracing::warn!(
                    "munmap of a guest region failed: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }
}

/// A restored Firecracker VM without vCPUs: guest memory registered on a userfaultfd whose
/// faults the handler at the other end of the socket serves.
///
/// Dropping it unregisters the regions from the uffd, unmaps them, and closes the socket and
/// the uffd.
#[derive(Debug)]
pub struct FirecrackerVm {
    mappings: Mappings,
    /// The connection to the handler: kept open, never read, for the VM's whole life, as
    /// Firecracker does.
    _socket: UnixStream,
    uffd: Uffd,
}

impl Drop for FirecrackerVm {
    fn drop(&mut self) {
        // Unregister before `mappings` unmaps (fields drop after this).
        for r in &self.mappings.0 {
            if let Err(e) = self
                .uffd
                .unregister(r.host_addr.as_ptr().cast(), r.size as usize)
            {
                tracing::warn!("unregistering a guest region from the uffd failed: {e}");
            }
        }
    }
}

impl FirecrackerVm {
    /// Restores a VM as Firecracker does: maps `regions`, creates and registers the uffd,
    /// connects to the handler at `socket_path` and sends the handshake.
    pub fn restore(
        socket_path: &Path,
        regions: &[FirecrackerRegion],
    ) -> Result<FirecrackerVm, PeerError> {
        Self::restore_with(socket_path, regions, Handshake::Firecracker)
    }

    /// [`FirecrackerVm::restore`], sending `handshake` instead of Firecracker's (everything
    /// else is the same).
    pub fn restore_with(
        socket_path: &Path,
        regions: &[FirecrackerRegion],
        handshake: Handshake,
    ) -> Result<FirecrackerVm, PeerError> {
        // 1. Guest memory.
        let mut mappings = Mappings(Vec::with_capacity(regions.len()));
        let mut file_offset = 0u64;
        for (index, r) in regions.iter().enumerate() {
            let host_addr = map_region(index, r)?;
            mappings.0.push(GuestRegion {
                host_addr,
                size: r.size,
                file_offset,
                page_size: r.page_size,
            });
            file_offset = file_offset
                .checked_add(r.size)
                .ok_or_else(|| map_error(index, r, "the regions' total size overflows"))?;
        }

        // 2. The uffd (dropped, so unregistered, before `mappings` unmaps on an error).
        let uffd = UffdBuilder::new()
            .require_features(FeatureFlags::EVENT_REMOVE)
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()?;
        for r in &mappings.0 {
            uffd.register(r.host_addr.as_ptr().cast(), r.size as usize)?;
        }

        // 3. Connect and send.
        let socket = UnixStream::connect(socket_path).map_err(|source| PeerError::Connect {
            path: socket_path.to_owned(),
            source,
        })?;
        let announced: Vec<GuestRegionUffdMapping> = mappings
            .0
            .iter()
            .map(|r| GuestRegionUffdMapping {
                base_host_virt_addr: r.host_addr.as_ptr() as u64,
                size: r.size,
                offset: r.file_offset,
                page_size: r.page_size,
                page_size_kib: Some(r.page_size),
            })
            .collect();
        match handshake {
            Handshake::Firecracker => fc::send_handshake(socket.as_fd(), &announced, uffd.as_fd()),
            Handshake::Raw(bytes) => send_with_fd(&socket, &bytes, uffd.as_fd()),
            Handshake::NoFd => (&socket).write_all(&fc::encode_handshake(&announced)),
        }
        .map_err(PeerError::Send)?;
        tracing::debug!(
            regions = announced.len(),
            bytes = file_offset,
            "restored a Firecracker VM"
        );
        Ok(FirecrackerVm {
            mappings,
            _socket: socket,
            uffd,
        })
    }

    /// The mapped regions, in handshake order.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.mappings.0
    }

    /// The VM's own copy of the userfaultfd.
    pub fn uffd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }

    /// Copies guest memory at `offset` of region `region` into `buf`. Pages not present yet
    /// fault, and the handler serves them; this blocks until it has.
    pub fn read(&self, region: usize, offset: u64, buf: &mut [u8]) -> Result<(), PeerError> {
        let src = self.range(region, offset, buf.len() as u64)?;
        // SAFETY: `range` checked that `buf.len()` bytes from `src` lie inside a live mapping
        // of this VM (it stays mapped while `&self` is borrowed), and `buf` is ordinary memory
        // that cannot overlap it. Guest memory is written concurrently by the kernel on the
        // handler's behalf (UFFDIO_COPY fills a page completely before the faulting access is
        // woken), so it is only read through this raw-pointer copy, never through a Rust
        // reference that would let the compiler assume it unchanged; every byte value is a
        // valid `u8`.
        unsafe { std::ptr::copy_nonoverlapping(src.cast_const(), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into guest memory at `offset` of region `region` (faulting pages in first
    /// like a guest write would).
    pub fn write(&self, region: usize, offset: u64, data: &[u8]) -> Result<(), PeerError> {
        let dst = self.range(region, offset, data.len() as u64)?;
        // SAFETY: `range` checked that `data.len()` bytes from `dst` lie inside a live,
        // writable mapping of this VM that `data` cannot overlap. Guest memory is only ever
        // accessed through raw-pointer copies (no Rust reference to it exists), so writing it
        // through a shared `&self` invalidates no reference; concurrent overlapping accesses
        // from other host threads see unspecified bytes, as with real guest memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// Firecracker's balloon inflation: `madvise(MADV_DONTNEED)` on `len` bytes at `offset` of
    /// region `region` (both multiples of its page size). The kernel raises
    /// `UFFD_EVENT_REMOVE` and blocks this call until the handler has read it; pages touched
    /// afterwards fault again.
    pub fn balloon_inflate(&self, region: usize, offset: u64, len: u64) -> Result<(), PeerError> {
        let addr = self.range(region, offset, len)?;
        let page_size = self.mappings.0.get(region).map_or(PAGE_4K, |r| r.page_size);
        if !offset.is_multiple_of(page_size) || !len.is_multiple_of(page_size) {
            return Err(PeerError::OutOfRange {
                region,
                offset,
                len,
                reason: "not aligned to the region's page size",
            });
        }
        if len == 0 {
            return Ok(());
        }
        // SAFETY: `[addr, addr + len)` is a page-aligned range inside a live private anonymous
        // mapping of this VM. MADV_DONTNEED only discards its pages (later accesses fault them
        // in anew through the uffd); no Rust reference into guest memory exists to observe it.
        let rc = unsafe { libc::madvise(addr.cast(), len as usize, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(PeerError::Io(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Reads every byte of every region through the mapping (so every missing page is faulted
    /// in through the handler) and compares it with `mem_file` at the region's file offset;
    /// bytes past the file's end count as zero. Works in 1 MiB chunks shared out to `threads`
    /// host threads (at least one). Returns the number of bytes verified, or the first
    /// mismatch in (region, offset) order. Like a Firecracker vCPU, it waits as long as it
    /// takes for the handler to serve each fault.
    pub fn verify_against(&self, mem_file: &File, threads: usize) -> Result<u64, PeerError> {
        let chunks: Vec<(usize, u64, u64)> = self
            .regions()
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                (0..r.size)
                    .step_by(CHUNK as usize)
                    .map(move |off| (i, off, CHUNK.min(r.size - off)))
            })
            .collect();
        let total: u64 = self.regions().iter().map(|r| r.size).sum();
        let threads = threads.clamp(1, chunks.len().max(1));

        // Chunks are claimed in index order, so when chunk `k` fails every chunk before it has
        // been claimed and is still checked: the smallest failing index is the first mismatch.
        let next = AtomicUsize::new(0);
        let stop_at = AtomicUsize::new(usize::MAX);
        let failures: Mutex<Vec<(usize, PeerError)>> = Mutex::new(Vec::new());
        let (chunks, next, stop_at, failures) = (&chunks, &next, &stop_at, &failures);
        let worker = move || {
            let mut mem = vec![0u8; CHUNK as usize];
            let mut file = vec![0u8; CHUNK as usize];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= stop_at.load(Ordering::Relaxed) {
                    break;
                }
                let Some(&(region, offset, len)) = chunks.get(i) else {
                    break;
                };
                let (mem, file) = (&mut mem[..len as usize], &mut file[..len as usize]);
                if let Err(e) = self.check_chunk(mem_file, region, offset, mem, file) {
                    stop_at.fetch_min(i, Ordering::Relaxed);
                    failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((i, e));
                }
            }
        };
        std::thread::scope(|s| {
            for _ in 0..threads {
                let spawned = std::thread::Builder::new()
                    .name("fc-verify".into())
                    .spawn_scoped(s, worker);
                if let Err(e) = spawned {
                    stop_at.store(0, Ordering::Relaxed);
                    failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((0, PeerError::Io(e)));
                    break;
                }
            }
        });
        let failures = std::mem::take(&mut *failures.lock().unwrap_or_else(|p| p.into_inner()));
        match failures.into_iter().min_by_key(|(i, _)| *i) {
            Some((_, e)) => Err(e),
            None => Ok(total),
        }
    }

    /// Compares `mem.len()` bytes at `offset` of `region` with the file; `mem` and `file` are
    /// scratch buffers of that length.
    fn check_chunk(
        &self,
        mem_file: &File,
        region: usize,
        offset: u64,
        mem: &mut [u8],
        file: &mut [u8],
    ) -> Result<(), PeerError> {
        self.read(region, offset, mem)?;
        let file_offset = self.mappings.0.get(region).map_or(0, |r| r.file_offset) + offset;
        read_at_zero_filled(mem_file, file, file_offset).map_err(PeerError::Io)?;
        if mem == file {
            return Ok(());
        }
        let words = mem.chunks(8).zip(file.chunks(8)).enumerate();
        for (w, (got, expected)) in words {
            if got != expected {
                return Err(PeerError::Mismatch {
                    region,
                    offset: offset + 8 * w as u64,
                    expected: le_word(expected),
                    got: le_word(got),
                });
            }
        }
        Ok(())
    }

    /// The address of `len` bytes at `offset` of region `region`, checked to lie inside it.
    fn range(&self, region: usize, offset: u64, len: u64) -> Result<*mut u8, PeerError> {
        let out_of_range = |reason| PeerError::OutOfRange {
            region,
            offset,
            len,
            reason,
        };
        let r = self
            .mappings
            .0
            .get(region)
            .ok_or(out_of_range("unavailable: there is no such region"))?;
        match offset.checked_add(len) {
            Some(end) if end <= r.size => {}
            _ => return Err(out_of_range("not inside the region")),
        }
        // In bounds: `offset <= size`, and the mapping of `size` bytes exists.
        Ok(r.host_addr.as_ptr().wrapping_add(offset as usize))
    }
}

/// Maps one region as Firecracker does.
fn map_region(index: usize, r: &FirecrackerRegion) -> Result<NonNull<u8>, PeerError> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    match r.page_size {
        PAGE_4K => {}
        PAGE_2M => flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB,
        _ => return Err(map_error(index, r, "the page size is not 4096 or 2097152")),
    }
    if r.size == 0 || !r.size.is_multiple_of(r.page_size) {
        return Err(map_error(
            index,
            r,
            "the size is not a non-zero multiple of the page size",
        ));
    }
    let len = usize::try_from(r.size)
        .map_err(|_| map_error(index, r, "the size does not fit the address space"))?;
    // SAFETY: a new anonymous mapping at an address the kernel chooses (NULL hint, no
    // MAP_FIXED) cannot replace or alias any existing memory.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(PeerError::Map {
            region: index,
            size: r.size,
            page_size: r.page_size,
            source: io::Error::last_os_error(),
        });
    }
    NonNull::new(addr.cast()).ok_or_else(|| map_error(index, r, "mmap returned address zero"))
}

fn map_error(index: usize, r: &FirecrackerRegion, why: &'static str) -> PeerError {
    PeerError::Map {
        region: index,
        size: r.size,
        page_size: r.page_size,
        source: io::Error::new(io::ErrorKind::InvalidInput, why),
    }
}

/// One `sendmsg` of `bytes` with `fd` in `SCM_RIGHTS` on a blocking socket; any remainder the
/// kernel did not take follows with plain writes.
fn send_with_fd(sock: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    if bytes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an fd needs at least one data byte to travel with",
        ));
    }
    let fds = [fd];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other(
            "the control buffer has no room for one fd",
        ));
    }
    let iov = [IoSlice::new(bytes)];
    let sent = loop {
        match rustix::net::sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL) {
            Ok(n) => break n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    let mut sock = sock;
    sock.write_all(bytes.get(sent..).unwrap_or_default())
}

/// Fills `buf` from `file` at `pos`; whatever lies past the end of the file reads as zero.
fn read_at_zero_filled(file: &File, buf: &mut [u8], mut pos: u64) -> io::Result<()> {
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..).filter(|rest| !rest.is_empty()) {
        match file.read_at(rest, pos) {
            Ok(0) => {
                rest.fill(0);
                break;
            }
            Ok(n) => {
                done += n;
                pos += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Up to 8 bytes as a little-endian word (missing bytes are zero).
fn le_word(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    for (w, b) in word.iter_mut().zip(bytes) {
        *w = *b;
    }
    u64::from_le_bytes(word)
}
