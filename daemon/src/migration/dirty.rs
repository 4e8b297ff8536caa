//! Hybrid migration's dirty tracking on the source: which pages the guest wrote after they were
//! sent (docs/migration.md, "Hybrid").
//!
//! The tracking is userfaultfd write-protect on the VMM's own mapping (the VMM registered it
//! with `UFFDIO_REGISTER_MODE_WP` as well: `VmMemory::track_writes`). It sees every write
//! through that mapping: the vCPUs' (KVM's accesses fault there too) and the VMM's device
//! models'. KVM's dirty log would see only the vCPUs', and needs KVM on the daemon's side.
//!
//! * before a run of pages is read to be pushed, the push write-protects it in the VMM's
//!   mapping ([`Tracker::protect`]);
//! * a write to a protected page raises a WP fault on the VMM's uffd, which the VM's worker
//!   serves: it marks the page dirty, then un-protects it (which wakes the writer);
//! * every other fault and every install of the worker while tracking is on marks its pages
//!   dirty too: an install maps the page writable, so a later write would not be seen;
//! * the push takes the dirty pages ([`Tracker::take_dirty`]) before each run: each one
//!   already sent is invalidated at the destination and sent again.
//!
//! A page is marked before the writer is woken, so once the VMM has paused every vCPU (each
//! blocked write was served), every write is in the dirty set: [`Tracker::freeze`] then ends the
//! tracking, and the push's next pass is the final one.

use super::sent::PageBits;
use crate::session::Vm;
use crate::uffd::{Uffd, UffdError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vmpager_protocol::PAGE_SIZE;

/// Errors starting dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The VM's uffd is not served here (not attached yet, or attached as a fault channel).
    #[error("the VM's userfaultfd is not attached to this daemon")]
    NoUffd,
    /// The VMM's uffd was not created with write-protect on shared memory.
    #[error(
        "the VM's userfaultfd lacks UFFD_FEATURE_WP_HUGETLBFS_SHMEM (this host's kernel has no \
         write-protect on shared memory)"
    )]
    NoFeature,
    /// Huge-page regions are not tracked.
    #[error("hybrid migration of huge-page regions is not supported")]
    Huge,
    /// The VMM did not register its mapping for write-protect.
    #[error(
        "region {region} is not registered for write-protect on the VMM's userfaultfd (call \
         VmMemory::track_writes before a hybrid MigrateOut)"
    )]
    NotRegistered {
        /// The region.
        region: usize,
        /// Cause.
        #[source]
        source: UffdError,
    },
}

/// One region: where the VMM maps it, and its first page in the remote address space.
#[derive(Debug, Clone, Copy)]
struct Span {
    host: u64,
    len: u64,
    first: u64,
}

/// A handle on the VMM's uffd for write-protecting its mapping, kept from `AttachUffd`.
#[derive(Debug)]
struct WpHandle {
    uffd: Uffd,
    spans: Vec<Span>,
}

/// A VM's part in hybrid migration: the handle set at attach, and the tracker of a running
/// hybrid migration.
#[derive(Debug, Default)]
pub struct HybridSlot {
    handle: Mutex<Option<Arc<WpHandle>>>,
    tracker: Mutex<Option<Arc<Tracker>>>,
    on: AtomicBool,
}

impl HybridSlot {
    /// The VMM's `uffd` (a second handle on it) serves this VM, whose regions it maps at
    /// `host_addrs`.
    pub fn attached(&self, vm_regions: &[crate::memory::Region], uffd: Uffd, host_addrs: &[u64]) {
        let mut first = 0;
        let spans = vm_regions
            .iter()
            .zip(host_addrs)
            .map(|(r, &host)| {
                let s = Span {
                    host,
                    len: r.size(),
                    first,
                };
                first += r.size() / PAGE_SIZE;
                s
            })
            .collect();
        *lock(&self.handle) = Some(Arc::new(WpHandle { uffd, spans }));
    }

    /// The tracker, while tracking is on (one atomic load when it is not).
    pub fn tracker(&self) -> Option<Arc<Tracker>> {
        if !self.on.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.tracker).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The dirty pages of one hybrid migration (pages in the remote address space, 4 KiB).
#[derive(Debug)]
pub struct Tracker {
    handle: Arc<WpHandle>,
    vm: std::sync::Weak<Vm>,
    /// Written since they were last taken by the push.
    dirty: PageBits,
    /// Written at any time since tracking began: a destination that reconnects may still hold
    /// a stale copy of these (an `Invalidate` lost with its connection).
    ever: PageBits,
    frozen: AtomicBool,
    /// Pages invalidated at the destination.
    pub invalidated: AtomicU64,
}

impl Tracker {
    /// Starts tracking `vm`'s writes, whose uffd was created with `uffd_features`. Checks
    /// that every region is registered for write-protect (un-protecting it, which changes
    /// nothing).
    pub fn start(vm: &Arc<Vm>, uffd_features: u64) -> Result<Arc<Tracker>, DirtyError> {
        let wp = u64::from(linux_raw_sys::general::UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
        if uffd_features & wp == 0 {
            return Err(DirtyError::NoFeature);
        }
        if vm.memory.regions().iter().any(|r| r.spec.is_huge()) {
            return Err(DirtyError::Huge);
        }
        let handle = lock(&vm.hybrid.handle).clone().ok_or(DirtyError::NoUffd)?;
        for (region, s) in handle.spans.iter().enumerate() {
            handle
                .uffd
                .write_protect(s.host, s.len, false)
                .map_err(|source| DirtyError::NotRegistered { region, source })?;
        }
        let total = handle.spans.iter().map(|s| s.len / PAGE_SIZE).sum();
        let t = Arc::new(Tracker {
            handle,
            vm: Arc::downgrade(vm),
            dirty: PageBits::new(total),
            ever: PageBits::new(total),
            frozen: AtomicBool::new(false),
            invalidated: AtomicU64::new(0),
        });
        *lock(&vm.hybrid.tracker) = Some(t.clone());
        vm.hybrid.on.store(true, Ordering::Release);
        Ok(t)
    }

    /// Write-protects pages `[first, first + count)` in the VMM's mapping: a write there from
    /// now on is seen.
    pub fn protect(&self, first: u64, count: u64) -> Result<(), UffdError> {
        let end = first.saturating_add(count);
        for s in &self.handle.spans {
            let s_end = s.first + s.len / PAGE_SIZE;
            let (lo, hi) = (first.max(s.first), end.min(s_end));
            if lo < hi {
                let at = s.host + (lo - s.first) * PAGE_SIZE;
                self.handle
                    .uffd
                    .write_protect(at, (hi - lo) * PAGE_SIZE, true)?;
            }
        }
        Ok(())
    }

    /// Bytes `[off, off + len)` of region `ri` were (or are about to be) written, or mapped
    /// writable.
    pub fn mark(&self, ri: usize, off: u64, len: u64) {
        let Some(s) = self.handle.spans.get(ri) else {
            return;
        };
        let first = s.first + off / PAGE_SIZE;
        for page in first..first + len.div_ceil(PAGE_SIZE) {
            self.ever.set(page);
            self.dirty.set(page);
        }
    }

    /// Marks page `page` dirty again (a reconnecting destination may hold a stale copy).
    pub fn mark_page(&self, page: u64) {
        self.dirty.set(page);
    }

    /// Pages written at any time since tracking began.
    pub fn ever_dirty(&self, page: u64) -> bool {
        self.ever.get(page)
    }

    /// Takes the dirty pages (ascending).
    pub fn take_dirty(&self) -> Vec<u64> {
        self.dirty.take_set()
    }

    /// Whether the VM was frozen (the switchover).
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    /// The switchover: the VMM paused every vCPU (so every write was seen). Tracking ends and
    /// the VMM's mapping is writable again; the push's next pass is the final one.
    pub fn freeze(&self) {
        self.stop();
        self.frozen.store(true, Ordering::Release);
    }

    /// Ends tracking (also when the migration is abandoned): no fault is marked any more, and
    /// every page is un-protected (waking any writer still waiting).
    /// A tracker that replaced this one (a `MigrateOut` made again) is left alone.
    pub fn stop(&self) {
        let Some(vm) = self.vm.upgrade() else {
            return;
        };
        let mut t = lock(&vm.hybrid.tracker);
        if !t
            .as_ref()
            .is_some_and(|t| std::ptr::eq(Arc::as_ptr(t), self))
        {
            return;
        }
        vm.hybrid.on.store(false, Ordering::Release);
        *t = None;
        drop(t);
        for s in &self.handle.spans {
            let _ = self.handle.uffd.write_protect(s.host, s.len, false);
        }
    }
}
