//! A small safe API over a userfaultfd that another process created and registered.
//!
//! The `userfaultfd` crate serves the VMM side (creation and registration). The daemon drives a
//! uffd it received over the socket, and needs what that crate gets wrong or lacks: wake on
//! `EEXIST`, a faithful `EAGAIN`, `UFFDIO_POISON`, and a feature probe. These are raw ioctls on
//! the same fd, with the kernel's structs from `linux-raw-sys` and ioctl numbers checked at
//! compile time.

use linux_raw_sys::general::{
    uffdio_api, uffdio_continue, uffdio_copy, uffdio_poison, uffdio_range, uffdio_register,
    uffdio_writeprotect, uffdio_zeropage, UFFD_API, UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMAP,
    UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP, UFFD_PAGEFAULT_FLAG_MINOR, UFFD_PAGEFAULT_FLAG_WP,
    UFFD_PAGEFAULT_FLAG_WRITE,
};
use rustix::io::Errno;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Features the daemon cannot work without: shared-memory MISSING faults, the events that keep
/// the page-state table true (removed ranges must read as zeros), and POISON (a page that
/// cannot be served must raise SIGBUS, never hang or read as zeros).
pub const REQUIRED_FEATURES: &[(u32, &str)] = &[
    (
        linux_raw_sys::general::UFFD_FEATURE_MISSING_SHMEM,
        "UFFD_FEATURE_MISSING_SHMEM",
    ),
    (
        linux_raw_sys::general::UFFD_FEATURE_EVENT_REMOVE,
        "UFFD_FEATURE_EVENT_REMOVE",
    ),
    (
        linux_raw_sys::general::UFFD_FEATURE_EVENT_UNMAP,
        "UFFD_FEATURE_EVENT_UNMAP",
    ),
    (
        linux_raw_sys::general::UFFD_FEATURE_EVENT_REMAP,
        "UFFD_FEATURE_EVENT_REMAP",
    ),
    (
        linux_raw_sys::general::UFFD_FEATURE_POISON,
        "UFFD_FEATURE_POISON",
    ),
];

/// The first required feature `features` lacks, if any.
pub fn missing_required(features: u64) -> Option<&'static str> {
    REQUIRED_FEATURES
        .iter()
        .find(|(bit, _)| features & u64::from(*bit) == 0)
        .map(|&(_, n)| n)
}

/// Size of one `struct uffd_msg`.
pub const MSG_SIZE: usize = 32;
const _: () = assert!(core::mem::size_of::<linux_raw_sys::general::uffd_msg>() == MSG_SIZE);

// ioctl numbers: _IOWR(UFFDIO = 0xAA, nr, size), checked against the kernel headers where
// linux-raw-sys has them, computed where it does not (UFFDIO_POISON).
const fn iowr(nr: u32, size: usize) -> u32 {
    (3 << 30) | ((size as u32) << 16) | (0xAA << 8) | nr
}
const fn ior(nr: u32, size: usize) -> u32 {
    (2 << 30) | ((size as u32) << 16) | (0xAA << 8) | nr
}
const UFFDIO_API: u32 = iowr(0x3F, core::mem::size_of::<uffdio_api>());
const UFFDIO_REGISTER: u32 = iowr(0x00, core::mem::size_of::<uffdio_register>());
const UFFDIO_WAKE: u32 = ior(0x02, core::mem::size_of::<uffdio_range>());
const UFFDIO_COPY: u32 = iowr(0x03, core::mem::size_of::<uffdio_copy>());
const UFFDIO_ZEROPAGE: u32 = iowr(0x04, core::mem::size_of::<uffdio_zeropage>());
const UFFDIO_CONTINUE: u32 = iowr(0x07, core::mem::size_of::<uffdio_continue>());
const UFFDIO_POISON: u32 = iowr(0x08, core::mem::size_of::<uffdio_poison>());
const UFFDIO_WRITEPROTECT: u32 = iowr(0x06, core::mem::size_of::<uffdio_writeprotect>());
const _: () = {
    use linux_raw_sys::ioctl as k;
    assert!(UFFDIO_API == k::UFFDIO_API);
    assert!(UFFDIO_REGISTER == k::UFFDIO_REGISTER);
    assert!(UFFDIO_WAKE == k::UFFDIO_WAKE);
    assert!(UFFDIO_COPY == k::UFFDIO_COPY);
    assert!(UFFDIO_ZEROPAGE == k::UFFDIO_ZEROPAGE);
    assert!(UFFDIO_CONTINUE == k::UFFDIO_CONTINUE);
    assert!(UFFDIO_POISON == 0xC020_AA08);
    assert!(UFFDIO_WRITEPROTECT == k::UFFDIO_WRITEPROTECT);
};

/// Errors of uffd operations, classified the way the kernel means them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UffdError {
    /// `EEXIST`: the page is already mapped; waiters must still be woken.
    #[error("page already present")]
    Exists,
    /// `EAGAIN`: the address space is changing (a remove/unmap event is pending); read events,
    /// then retry.
    #[error("address space is changing, retry after reading events")]
    Again,
    /// A multi-page COPY/ZEROPAGE/CONTINUE installed only the first `bytes` of its range (and
    /// woke their waiters) before stopping: at a page already present, or at a change of the
    /// address space.
    #[error("only the first {bytes} bytes were installed")]
    Partial {
        /// Bytes installed from the start of the range.
        bytes: u64,
    },
    /// `ESRCH`/`ENOENT`-class: the faulting process or its mapping is gone.
    #[error("the faulting address space is gone")]
    PeerGone,
    /// Any other errno: a bug or bad input (wrong range, unregistered address).
    #[error("userfaultfd ioctl failed: {0}")]
    Failed(Errno),
}

impl UffdError {
    /// A multi-page ioctl that stopped early reports `EAGAIN` with the bytes it did install
    /// (from the start of the range, mapped and woken) in its count field.
    fn partial(r: Result<(), UffdError>, done: i64) -> Result<(), UffdError> {
        match r {
            Err(UffdError::Again) if done > 0 => Err(UffdError::Partial { bytes: done as u64 }),
            r => r,
        }
    }

    fn from_errno(e: Errno) -> UffdError {
        match e {
            Errno::EXIST => UffdError::Exists,
            Errno::AGAIN => UffdError::Again,
            Errno::SRCH | Errno::NOENT => UffdError::PeerGone,
            e => UffdError::Failed(e),
        }
    }

    /// Retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, UffdError::Again)
    }

    /// The process on the other side is gone.
    pub fn peer_gone(&self) -> bool {
        matches!(self, UffdError::PeerGone)
    }
}

/// One event read from a uffd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted at `address`.
    PageFault {
        /// Faulting address (page aligned by the kernel unless `EXACT_ADDRESS`).
        address: u64,
        /// A write fault.
        write: bool,
        /// A MINOR fault: the page is in the page cache but not mapped.
        minor: bool,
        /// A write to a write-protected page (`UFFDIO_WRITEPROTECT`): the page is there;
        /// un-protecting it wakes the thread.
        wp: bool,
    },
    /// `[start, end)` was discarded (`MADV_DONTNEED` / `MADV_REMOVE`).
    Remove {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// `[start, end)` was unmapped.
    Unmap {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// `len` bytes moved from `from` to `to` (`mremap`).
    Remap {
        /// Old address.
        from: u64,
        /// New address.
        to: u64,
        /// Length.
        len: u64,
    },
    /// An event this daemon did not ask for.
    Other(u8),
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

impl Event {
    /// Decodes one `struct uffd_msg` (exactly [`MSG_SIZE`] bytes).
    pub fn parse(m: &[u8; MSG_SIZE]) -> Event {
        match u32::from(m[0]) {
            UFFD_EVENT_PAGEFAULT => {
                let flags = le64(m, 8);
                Event::PageFault {
                    address: le64(m, 16),
                    write: flags & u64::from(UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                    minor: flags & u64::from(UFFD_PAGEFAULT_FLAG_MINOR) != 0,
                    wp: flags & u64::from(UFFD_PAGEFAULT_FLAG_WP) != 0,
                }
            }
            UFFD_EVENT_REMOVE => Event::Remove {
                start: le64(m, 8),
                end: le64(m, 16),
            },
            UFFD_EVENT_UNMAP => Event::Unmap {
                start: le64(m, 8),
                end: le64(m, 16),
            },
            UFFD_EVENT_REMAP => Event::Remap {
                from: le64(m, 8),
                to: le64(m, 16),
                len: le64(m, 24),
            },
            _ => Event::Other(m[0]),
        }
    }
}

/// A userfaultfd the daemon serves. The registered ranges live in another process's address
/// space (or, for [`Uffd::create_own`], in the daemon's own mappings of guest memory): every
/// address here is only handed to the kernel, never dereferenced by the daemon.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

/// The result of a probe of the host's userfaultfd.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// `UFFD_FEATURE_*` bits the kernel supports.
    pub features: u64,
    /// `1 << _UFFDIO_*` bits of the ioctls available on the fd.
    pub ioctls: u64,
}

impl Uffd {
    /// Takes a uffd received from a VMM. Refuses an fd that is not a userfaultfd, and makes it
    /// non-blocking (the flag is shared with the VMM's copy, which does not read it).
    pub fn from_received(fd: OwnedFd) -> Result<Uffd, Errno> {
        let link = rustix::fs::readlinkat(
            rustix::fs::CWD,
            format!("/proc/self/fd/{}", fd.as_raw_fd()),
            Vec::new(),
        )?;
        if link.as_bytes() != b"anon_inode:[userfaultfd]" {
            return Err(Errno::BADF);
        }
        let flags = rustix::fs::fcntl_getfl(&fd)?;
        rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK)?;
        Ok(Uffd { fd })
    }

    /// Asks the kernel which features and ioctls a fresh userfaultfd offers.
    pub fn probe() -> Result<Probe, Errno> {
        let (_, probe) = Self::create(0)?;
        Ok(probe)
    }

    /// A new userfaultfd of this process (close-on-exec, non-blocking) with `features`
    /// enabled at `UFFDIO_API`.
    fn create(features: u64) -> Result<(Uffd, Probe), Errno> {
        // SAFETY: userfaultfd(2) takes only flags; it returns a new fd or -1 and touches no memory.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(last_errno());
        }
        // SAFETY: `raw` is a fresh fd returned by the kernel above, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = uffdio_api {
            api: u64::from(UFFD_API),
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `uffdio_api`, which `api` is, and the fd
        // is a userfaultfd that lives for the call.
        let rc =
            unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api as *mut uffdio_api) };
        if rc < 0 {
            return Err(last_errno());
        }
        Ok((
            Uffd { fd },
            Probe {
                features: api.features,
                ioctls: api.ioctls,
            },
        ))
    }

    /// A userfaultfd of the daemon's own, for installing pages into its own mappings of guest
    /// memory atomically (`UFFDIO_COPY` puts a page in the page cache whole or not at all).
    /// SIGBUS mode: nobody reads it, so a touch of a missing page through a registered mapping
    /// raises SIGBUS instead of blocking the daemon forever (the daemon never touches guest
    /// memory through its mappings; this makes a slip loud).
    pub fn create_own(huge: bool) -> Result<Uffd, Errno> {
        use linux_raw_sys::general as g;
        let mut features = g::UFFD_FEATURE_SIGBUS | g::UFFD_FEATURE_MISSING_SHMEM;
        if huge {
            features |= g::UFFD_FEATURE_MISSING_HUGETLBFS;
        }
        Self::create(u64::from(features)).map(|(u, _)| u)
    }

    /// Registers `[start, start + len)` of this process for missing faults.
    pub fn register_missing(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut arg = uffdio_register {
            range: uffdio_range { start, len },
            mode: u64::from(linux_raw_sys::general::UFFDIO_REGISTER_MODE_MISSING),
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut arg)
    }

    /// Reads as many events as fit in `buf` (non-blocking). Returns the number of whole messages
    /// read; `Err(AGAIN)` when none is pending.
    pub fn read_events(&self, buf: &mut [[u8; MSG_SIZE]]) -> Result<usize, Errno> {
        let bytes = buf.as_flattened_mut();
        let n = loop {
            match rustix::io::read(&self.fd, &mut *bytes) {
                Err(Errno::INTR) => continue,
                r => break r?,
            }
        };
        // The kernel only ever returns whole messages.
        Ok(n / MSG_SIZE)
    }

    fn ioctl<T>(&self, request: u32, arg: &mut T) -> Result<(), UffdError> {
        // SAFETY: every caller passes the `uffdio_*` struct that `request` is defined with (the
        // pairing is fixed in this module and the sizes are checked at compile time); the kernel
        // reads and writes only that struct. Addresses inside it refer to a registered range
        // (the other process's, or a live mapping of our own that no Rust reference covers),
        // or, for a COPY source, to a live buffer of ours of at least `len` bytes (see `copy`).
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, arg as *mut T) };
        if rc < 0 {
            return Err(UffdError::from_errno(last_errno()));
        }
        Ok(())
    }

    /// `UFFDIO_COPY` of `src` to `dst` and wake the waiters. On `EEXIST` the caller must wake.
    pub fn copy(&self, dst: u64, src: &[u8]) -> Result<(), UffdError> {
        self.copy_mode(dst, src, 0)
    }

    /// `UFFDIO_COPY` without waking anyone (`UFFDIO_COPY_MODE_DONTWAKE`), for pages installed
    /// ahead of any fault: a thread that faulted on one meanwhile has its event queued, and is
    /// woken when that event is served.
    pub fn copy_ahead(&self, dst: u64, src: &[u8]) -> Result<(), UffdError> {
        self.copy_mode(
            dst,
            src,
            u64::from(linux_raw_sys::general::UFFDIO_COPY_MODE_DONTWAKE),
        )
    }

    fn copy_mode(&self, dst: u64, src: &[u8], mode: u64) -> Result<(), UffdError> {
        let mut arg = uffdio_copy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode,
            copy: 0,
        };
        let r = self.ioctl(UFFDIO_COPY, &mut arg);
        UffdError::partial(r, arg.copy)
    }

    /// `UFFDIO_ZEROPAGE` of `[dst, dst + len)` and wake.
    pub fn zeropage(&self, dst: u64, len: u64) -> Result<(), UffdError> {
        let mut arg = uffdio_zeropage {
            range: uffdio_range { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        let r = self.ioctl(UFFDIO_ZEROPAGE, &mut arg);
        UffdError::partial(r, arg.zeropage)
    }

    /// `UFFDIO_CONTINUE`: map the page-cache pages of `[dst, dst + len)` and wake.
    pub fn r#continue(&self, dst: u64, len: u64) -> Result<(), UffdError> {
        let mut arg = uffdio_continue {
            range: uffdio_range { start: dst, len },
            mode: 0,
            mapped: 0,
        };
        let r = self.ioctl(UFFDIO_CONTINUE, &mut arg);
        UffdError::partial(r, arg.mapped)
    }

    /// `UFFDIO_POISON`: later accesses to `[dst, dst + len)` raise SIGBUS; wakes.
    pub fn poison(&self, dst: u64, len: u64) -> Result<(), UffdError> {
        let mut arg = uffdio_poison {
            range: uffdio_range { start: dst, len },
            mode: 0,
            updated: 0,
        };
        self.ioctl(UFFDIO_POISON, &mut arg)
    }

    /// `UFFDIO_WRITEPROTECT` of `[start, start + len)`: with `protect`, later writes there
    /// fault (`Event::PageFault { wp: true, .. }`) and nobody is woken; without, the range is
    /// writable again and the threads waiting on it are woken. Fails (`PeerGone`, the
    /// kernel's `ENOENT`) where the range is not registered for write-protect.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool) -> Result<(), UffdError> {
        // From the kernel's uapi header (linux-raw-sys lacks it). (DONTWAKE is refused with
        // WP: protecting wakes nobody anyway.)
        const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
        let mut arg = uffdio_writeprotect {
            range: uffdio_range { start, len },
            mode: match protect {
                true => UFFDIO_WRITEPROTECT_MODE_WP,
                false => 0,
            },
        };
        self.ioctl(UFFDIO_WRITEPROTECT, &mut arg)
    }

    /// Another handle on the same userfaultfd (for ioctls from another thread; only one
    /// handle reads events).
    pub fn try_clone(&self) -> Result<Uffd, Errno> {
        Ok(Uffd {
            fd: rustix::io::fcntl_dupfd_cloexec(&self.fd, 0)?,
        })
    }

    /// `UFFDIO_WAKE` the threads waiting on `[start, start + len)`.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut arg = uffdio_range { start, len };
        self.ioctl(UFFDIO_WAKE, &mut arg)
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn last_errno() -> Errno {
    Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events() {
        let mut m = [0u8; MSG_SIZE];
        m[0] = UFFD_EVENT_PAGEFAULT as u8;
        m[8..16].copy_from_slice(&u64::from(UFFD_PAGEFAULT_FLAG_WRITE).to_le_bytes());
        m[16..24].copy_from_slice(&0x7000_0000_1000u64.to_le_bytes());
        assert_eq!(
            Event::parse(&m),
            Event::PageFault {
                address: 0x7000_0000_1000,
                write: true,
                minor: false,
                wp: false
            }
        );
        m[0] = UFFD_EVENT_REMOVE as u8;
        assert_eq!(
            Event::parse(&m),
            Event::Remove {
                start: u64::from(UFFD_PAGEFAULT_FLAG_WRITE),
                end: 0x7000_0000_1000
            }
        );
        m[0] = 0x77;
        assert_eq!(Event::parse(&m), Event::Other(0x77));
    }

    #[test]
    fn refuses_a_non_uffd() {
        let (r, _w) = rustix::pipe::pipe().unwrap();
        assert_eq!(Uffd::from_received(r).unwrap_err(), Errno::BADF);
    }
}
