//! The VMM-private low slot: the guest program and its page tables.

use super::RefVmError;
use std::ptr::NonNull;

/// The VMM-private low slot mapping (code and page tables); unmapped on drop.
pub(super) struct LowMem {
    pub(super) ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `LowMem` owns its private anonymous mapping; the host writes it only in `RefVm::new`
// before any vCPU exists and afterwards only unmaps it in `drop`, so moving or sharing the handle
// across threads cannot race on the memory.
unsafe impl Send for LowMem {}
// SAFETY: see the `Send` impl: no `&self` method touches the memory.
unsafe impl Sync for LowMem {}

impl LowMem {
    pub(super) fn new(len: u64) -> Result<LowMem, RefVmError> {
        let fail = |source: std::io::Error| RefVmError::LowMemory { len, source };
        let size =
            usize::try_from(len).map_err(|_| fail(std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases no Rust object.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                size,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::POPULATE,
            )
        }
        .map_err(|e| fail(e.into()))?;
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| fail(std::io::ErrorKind::Other.into()))?;
        Ok(LowMem { ptr, len: size })
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr..ptr+len` is our own live read/write mapping (zero-filled by the kernel),
        // and `&mut self` guarantees no other reference to it exists on the host.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub(super) fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
}

impl Drop for LowMem {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` is exactly the mapping created in `new`, no slice into it outlives
        // `as_mut_slice`'s borrow, and the VM using it as a memslot was dropped before (field order
        // of `RefVm`).
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            tracing::warn!(error = %e, "refvmm: munmap of the low slot failed");
        }
    }
}
