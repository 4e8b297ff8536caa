//! Mapping the daemon's memfds into the VMM and registering them on the VMM's userfaultfd.
//!
//! The uffd must be created here, in the VMM: a userfaultfd belongs to the address space of the
//! process that created it. It is created with `user_mode_only(false)` (without it, KVM's own
//! accesses to guest memory never reach the daemon and the guest dies with an emulation error),
//! close-on-exec and non-blocking, with exactly the features the daemon asked for. The VMM keeps
//! its copy for the life of the VM so a daemon crash never unregisters the range (DESIGN.md §4).

use crate::client::CreatedVm;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use userfaultfd::{FeatureFlags, RegisterMode, Uffd, UffdBuilder};
use vmpager_protocol::mailbox::{
    Request, Response, Status, VcpuChannel, RETRY_SET_ATTRIBUTES, RETRY_ZAP_SHARED,
};
use vmpager_protocol::mapping::SharedMapping;
use vmpager_protocol::RegionSpec;

/// Errors mapping or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of a memfd failed.
    #[error("cannot map region {region}")]
    Map {
        /// Region index.
        region: usize,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Creating the userfaultfd failed (the kernel lacks a feature the daemon needs, or
    /// userfaultfd is not permitted).
    #[error("cannot create a userfaultfd with features {features:#x}")]
    UffdCreate {
        /// Features asked for.
        features: u64,
        /// Cause.
        #[source]
        source: userfaultfd::Error,
    },
    /// Registering a mapping failed.
    #[error("cannot register region {region} on the userfaultfd")]
    Register {
        /// Region index.
        region: usize,
        /// Cause.
        #[source]
        source: userfaultfd::Error,
    },
    /// `MADV_DONTNEED` of a range that became shared failed.
    #[error("cannot drop the mapping of region {region}")]
    Zap {
        /// Region index.
        region: usize,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The daemon asked for attributes to be set but this VM has no VM fd here.
    #[error("the daemon asked to set memory attributes but no VM fd was given")]
    NoVmFd,
    /// `KVM_SET_MEMORY_ATTRIBUTES` failed.
    #[error("cannot set KVM memory attributes")]
    Attributes(#[source] std::io::Error),
    /// The exit channel failed (the daemon is gone, or answered out of protocol).
    #[error("exit channel failed")]
    Channel(#[source] vmpager_protocol::mailbox::MailboxError),
    /// The uffd was created without write-protect on shared memory (the daemon did not ask
    /// for it: this host's kernel lacks `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`).
    #[error("this VM's userfaultfd cannot write-protect its memory (no UFFD_FEATURE_WP_HUGETLBFS_SHMEM)")]
    NoWriteProtect,
    /// The daemon sent a different number of memfds than regions.
    #[error("{memfds} memfds for {regions} regions")]
    Mismatch {
        /// Memfds received.
        memfds: usize,
        /// Regions.
        regions: usize,
    },
}

/// One region mapped `MAP_SHARED` in the VMM.
#[derive(Debug)]
pub struct MappedRegion {
    spec: RegionSpec,
    memfd: OwnedFd,
    guest_memfd: Option<OwnedFd>,
    mapping: SharedMapping,
}

impl MappedRegion {
    /// The region's spec.
    pub fn spec(&self) -> &RegionSpec {
        &self.spec
    }

    /// Host address of the mapping (for `KVM_SET_USER_MEMORY_REGION`).
    pub fn host_addr(&self) -> NonNull<u8> {
        self.mapping.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.mapping.len()
    }

    /// True for an empty region (never: regions are non-empty).
    pub fn is_empty(&self) -> bool {
        self.mapping.is_empty()
    }

    /// The region's memfd (owned by the daemon too); the region starts at
    /// [`RegionSpec::file_offset`] in it.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// The region's guest_memfd (private memory), for `KVM_SET_USER_MEMORY_REGION2` with
    /// `KVM_MEM_GUEST_MEMFD`, if the region is private-capable.
    pub fn guest_memfd(&self) -> Option<BorrowedFd<'_>> {
        self.guest_memfd.as_ref().map(|f| f.as_fd())
    }
}

/// A VM's guest memory as the VMM sees it: mapped, registered, and the VMM's copy of the uffd.
#[derive(Debug)]
pub struct VmMemory {
    vm_id: u64,
    token: u64,
    vm_fd: Option<OwnedFd>,
    vmm_sets_attributes: bool,
    // Field order matters: the uffd is dropped after the regions are unmapped.
    regions: Vec<MappedRegion>,
    uffd: Uffd,
    mode: RegisterMode,
    features: u64,
}

impl VmMemory {
    /// Maps every memfd `MAP_SHARED` and registers it on a new uffd as the daemon asked.
    pub fn map(created: CreatedVm) -> Result<VmMemory, MemoryError> {
        if created.memfds.len() != created.regions.len() {
            return Err(MemoryError::Mismatch {
                memfds: created.memfds.len(),
                regions: created.regions.len(),
            });
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(FeatureFlags::from_bits_retain(created.uffd_features))
            .create()
            .map_err(|source| MemoryError::UffdCreate {
                features: created.uffd_features,
                source,
            })?;
        let mode = RegisterMode::from_bits_retain(created.uffd_modes);
        let mut regions = Vec::with_capacity(created.regions.len());
        let (vm_fd, vmm_sets_attributes) = (created.vm_fd, created.vmm_sets_attributes);
        let gmems = created
            .guest_memfds
            .into_iter()
            .chain(std::iter::repeat_with(|| None));
        for (i, ((spec, memfd), guest_memfd)) in created
            .regions
            .into_iter()
            .zip(created.memfds)
            .zip(gmems)
            .enumerate()
        {
            let len = usize::try_from(spec.size()).map_err(|_| MemoryError::Map {
                region: i,
                source: std::io::Error::other("region larger than the address space"),
            })?;
            let mapping = SharedMapping::new_at(memfd.as_fd(), spec.file_offset(), len)
                .map_err(|source| MemoryError::Map { region: i, source })?;
            let ptr = mapping.as_ptr().as_ptr().cast();
            let region = MappedRegion {
                spec,
                memfd,
                guest_memfd,
                mapping,
            };
            uffd.register_with_mode(ptr, len, mode)
                .map_err(|source| MemoryError::Register { region: i, source })?;
            regions.push(region);
        }
        Ok(VmMemory {
            vm_id: created.vm_id,
            token: created.token,
            vm_fd,
            vmm_sets_attributes,
            regions,
            uffd,
            mode,
            features: created.uffd_features,
        })
    }

    /// Registers every region for write-protect as well (a range registered again on the same
    /// uffd takes the new modes), so that the daemon can track what the guest writes during a
    /// hybrid migration: call it before `Client::migrate_out(.., hybrid = true)`. The daemon
    /// write-protects and un-protects; a write to a protected page waits on the uffd until
    /// the daemon noted it.
    pub fn track_writes(&mut self) -> Result<(), MemoryError> {
        let wp = u64::from(linux_raw_sys::general::UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
        if self.features & wp == 0 {
            return Err(MemoryError::NoWriteProtect);
        }
        let mode = self.mode | RegisterMode::WRITE_PROTECT;
        for (i, r) in self.regions.iter().enumerate() {
            self.uffd
                .register_with_mode(r.host_addr().as_ptr().cast(), r.len(), mode)
                .map_err(|source| MemoryError::Register { region: i, source })?;
        }
        self.mode = mode;
        Ok(())
    }

    /// VM id.
    pub fn vm_id(&self) -> u64 {
        self.vm_id
    }

    /// The secret device backends present with `Client::subscribe` to hear of conversions.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The mapped regions.
    pub fn regions(&self) -> &[MappedRegion] {
        &self.regions
    }

    /// Host address of every region, in order.
    pub fn host_addrs(&self) -> Vec<u64> {
        self.regions
            .iter()
            .map(|r| r.host_addr().as_ptr() as u64)
            .collect()
    }

    /// The VMM's copy of the uffd.
    pub fn uffd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }

    /// Forwards one exit over a vCPU's channel; sets the KVM memory attributes when the daemon
    /// says so (`RETRY_SET_ATTRIBUTES`); and, when a range became shared and the daemon says it
    /// holds poison markers (`RETRY_ZAP_SHARED`), drops this process's stale view of it: while
    /// it was private, shared-side touches were answered with `UFFDIO_POISON`, and those
    /// markers stay in the page table until the VMM zaps the range (`MADV_DONTNEED`); the next
    /// touch then faults to the daemon again.
    pub fn forward_exit(
        &self,
        channel: &mut VcpuChannel,
        request: Request,
    ) -> Result<Response, MemoryError> {
        let response = channel.exchange(request).map_err(MemoryError::Channel)?;
        if response.status == Status::Retry && response.code & RETRY_SET_ATTRIBUTES != 0 {
            let vm_fd = self
                .vm_fd
                .as_ref()
                .filter(|_| self.vmm_sets_attributes)
                .ok_or(MemoryError::NoVmFd)?;
            crate::kvm_private::set_memory_attributes(
                vm_fd.as_fd(),
                request.gpa,
                request.size,
                request.private,
            )
            .map_err(MemoryError::Attributes)?;
        }
        if response.status == Status::Retry && response.code & RETRY_ZAP_SHARED != 0 {
            self.zap_shared(request.gpa, request.size)?;
        }
        Ok(response)
    }

    /// `MADV_DONTNEED` on the VMM's mapping of `[gpa, gpa + size)` (ignored outside every
    /// region). The daemon keeps the page contents; only this process's page-table entries go.
    pub fn zap_shared(&self, gpa: u64, size: u64) -> Result<(), MemoryError> {
        for (i, r) in self.regions.iter().enumerate() {
            let (start, end) = (r.spec.gpa(), r.spec.gpa() + r.len() as u64);
            let lo = gpa.max(start);
            let hi = gpa.saturating_add(size).min(end);
            if lo >= hi {
                continue;
            }
            // SAFETY: `[lo - start, hi - start)` lies inside this region's live mapping; no Rust
            // reference to the mapped bytes exists (addresses are only handed out raw).
            unsafe {
                rustix::mm::madvise(
                    r.host_addr().as_ptr().add((lo - start) as usize).cast(),
                    (hi - lo) as usize,
                    rustix::mm::Advice::LinuxDontNeed,
                )
            }
            .map_err(|e| MemoryError::Zap {
                region: i,
                source: e.into(),
            })?;
        }
        Ok(())
    }
}

impl Drop for VmMemory {
    fn drop(&mut self) {
        // Unregister before unmapping: with UFFD_FEATURE_EVENT_UNMAP, munmap of a registered
        // range blocks until someone reads the UNMAP event, and after a Detach (or a daemon
        // crash) nobody will.
        for r in &self.regions {
            let _ = self.uffd.unregister(r.host_addr().as_ptr().cast(), r.len());
        }
    }
}
