//! A `MAP_SHARED` read/write mapping of an fd, unmapped on drop: the one piece of unsafe
//! memory management shared by the mailbox, the daemon's view of guest memory and the VMM's.
//!
//! The mapped bytes are shared with another process, so this type never hands out `&[u8]` or
//! `&mut [u8]`: callers get the base address and build only what is sound for their contents
//! (atomics for the mailbox, raw pointers handed to the kernel for guest memory).

use std::io;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

/// A shared mapping of `len` bytes of an fd.
#[derive(Debug)]
pub struct SharedMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; it is only reached through the
// raw base address, never through Rust references created here, so moving or sharing the value
// between threads cannot create aliasing references.
unsafe impl Send for SharedMapping {}
// SAFETY: as above.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Maps `len` bytes of `fd` read/write and shared, at an address the kernel chooses.
    pub fn new(fd: BorrowedFd<'_>, len: usize) -> io::Result<SharedMapping> {
        Self::new_at(fd, 0, len)
    }

    /// Maps `len` bytes of `fd` from `offset` (a multiple of the file's page size) read/write
    /// and shared, at an address the kernel chooses.
    pub fn new_at(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<SharedMapping> {
        // SAFETY: a new mapping at a kernel-chosen address aliases no Rust object; it is
        // unmapped exactly once, by `Drop`.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                fd,
                offset,
            )
        }?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("null mapping"))?;
        Ok(SharedMapping { ptr, len })
    }

    /// Base address (page aligned).
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty mapping (never: mmap refuses length 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly one mapping made by `new`, owned by this value; anything
        // borrowed from it borrows `self`, so nothing outlives the unmap.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
