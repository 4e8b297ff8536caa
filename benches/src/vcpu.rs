//! Real vCPUs demand-paging memory: a ring-3 long-mode guest (the only guest code that runs
//! natively on `kvm_pvm` hosts, DESIGN.md §8) writes one byte per 4 KiB page.

use crate::BenchError;
use std::ptr::NonNull;
use std::time::Duration;
use vmpager_client::refvmm::{split_evenly, GuestRegion, RefVm, Workload};

/// Guest physical address of the measured region.
pub const GPA: u64 = 1 << 32;

/// Runs `vcpus` vCPUs touching every page of `len` bytes at `host` and returns the time the
/// slowest took.
///
/// # Safety
/// `[host, host + len)` must stay mapped (shared or anonymous, writable) for the call.
pub unsafe fn touch_all(host: NonNull<u8>, len: u64, vcpus: usize) -> Result<Duration, BenchError> {
    let regions = [GuestRegion {
        gpa: GPA,
        host_addr: host,
        size: len,
    }];
    // SAFETY: the caller keeps the range mapped for the call; `vm` is dropped before return.
    let vm = unsafe { RefVm::new(&regions, vcpus)? };
    let reports = vm.run(&split_evenly(&regions, vcpus, Workload::Touch))?;
    Ok(reports.iter().map(|r| r.elapsed).max().unwrap_or_default())
}

/// Anonymous private memory (the kernel's own first-touch path), unmapped on drop.
#[derive(Debug)]
pub struct AnonMemory {
    ptr: NonNull<u8>,
    len: usize,
}

impl AnonMemory {
    /// `len` bytes of fresh anonymous memory.
    pub fn new(len: usize) -> std::io::Result<AnonMemory> {
        // SAFETY: a new private anonymous mapping; nothing else refers to it.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }?;
        Ok(AnonMemory {
            ptr: NonNull::new(p.cast()).ok_or_else(|| std::io::Error::other("mmap gave null"))?,
            len,
        })
    }

    /// First byte.
    pub fn base(&self) -> NonNull<u8> {
        self.ptr
    }
}

impl Drop for AnonMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, not used after this.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
