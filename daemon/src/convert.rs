//! Converting guest memory between shared and private, with the semantics of QEMU's
//! `kvm_convert_memory` (DESIGN.md §5): validate, apply the policy, set the attributes, discard
//! the other side's backing, update page state, notify listeners, answer.

use crate::guest_memfd;
use crate::metrics::VmMetrics;
use crate::policy::Denial;
use crate::session::{AttributeKeeper, Vm};
use vmpager_protocol::{ConversionEvent, PAGE_SIZE};

/// Hypercall return values are negative errnos (`-EPERM`, `-EINVAL`, `-EAGAIN`, `-EFAULT`).
fn neg_errno(e: i32) -> u64 {
    (-(e as i64)) as u64
}

/// Why a conversion did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Unaligned, empty or overflowing range.
    #[error("range {gpa:#x}+{size:#x} is empty, unaligned or overflows")]
    Invalid {
        /// First GPA.
        gpa: u64,
        /// Length.
        size: u64,
    },
    /// The range is not inside one region.
    #[error("range {gpa:#x}+{size:#x} is not inside one region")]
    NotInOneRegion {
        /// First GPA.
        gpa: u64,
        /// Length.
        size: u64,
    },
    /// Conversion to private of memory that has no private backing (a VM type without private
    /// memory, `sev`/`sev-es`, or a region without guest_memfd).
    #[error("range {gpa:#x} has no private memory")]
    NoPrivateMemory {
        /// First GPA.
        gpa: u64,
    },
    /// The policy refused.
    #[error("the policy refuses it: {0:?}")]
    Denied(Denial),
    /// Discarding a range (hole punch) failed: the VM's memory state is no longer known to be
    /// consistent.
    #[error("conversion failed in the kernel")]
    Kernel(#[source] std::io::Error),
}

pub use vmpager_protocol::mailbox::codes;

impl ConvertError {
    /// The VM cannot go on safely.
    pub fn is_fatal(&self) -> bool {
        matches!(self, ConvertError::Kernel(_))
    }

    /// A guest could succeed later (rate limit).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ConvertError::Denied(Denial::RateLimited))
    }

    /// Code for `Response.code`.
    pub fn code(&self) -> u32 {
        match self {
            ConvertError::Invalid { .. } => codes::INVALID,
            ConvertError::NotInOneRegion { .. } => codes::NOT_IN_ONE_REGION,
            ConvertError::NoPrivateMemory { .. } => codes::NO_PRIVATE_MEMORY,
            ConvertError::Denied(Denial::Rule(_)) => codes::POLICY_RULE,
            ConvertError::Denied(Denial::ImplicitNotAllowed) => codes::IMPLICIT_NOT_ALLOWED,
            ConvertError::Denied(Denial::RateLimited) => codes::RATE_LIMITED,
            ConvertError::Kernel(_) => codes::KERNEL,
        }
    }

    /// The value for `kvm_run.hypercall.ret`, as KVM's ABI defines errors.
    pub fn hypercall_ret(&self) -> u64 {
        match self {
            ConvertError::Invalid { .. } | ConvertError::NotInOneRegion { .. } => {
                neg_errno(libc::EINVAL)
            }
            ConvertError::Denied(Denial::RateLimited) => neg_errno(libc::EAGAIN),
            ConvertError::NoPrivateMemory { .. } | ConvertError::Denied(_) => {
                neg_errno(libc::EPERM)
            }
            ConvertError::Kernel(_) => neg_errno(libc::EFAULT),
        }
    }
}

/// Converts `[gpa, gpa + size)` of `vm` to private (`to_private`) or shared. `explicit`: asked
/// by the guest (`KVM_HC_MAP_GPA_RANGE`), else implied by a memory-fault exit.
///
/// Returns what the VMM still has to do (only the VM's creator may issue VM ioctls, and only
/// the VMM can drop entries of its own page table).
pub fn convert(
    vm: &Vm,
    gpa: u64,
    size: u64,
    to_private: bool,
    explicit: bool,
) -> Result<VmmWork, ConvertError> {
    let result = convert_inner(vm, gpa, size, to_private, explicit);
    match &result {
        Ok(_) if to_private => VmMetrics::bump(&vm.metrics.converted_to_private),
        Ok(_) => VmMetrics::bump(&vm.metrics.converted_to_shared),
        Err(e) => {
            VmMetrics::bump(&vm.metrics.conversions_denied);
            vm.metrics.note_denial(vm.id, gpa, size, to_private, e);
        }
    }
    result
}

/// What the VMM must do after a conversion, besides re-entering the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmmWork {
    /// Set the KVM memory attributes of the range (KVM keeps them).
    pub set_attributes: bool,
    /// Drop its page-table entries of the range: poison markers are there.
    pub zap_shared: bool,
}

/// Checks a conversion range a guest asked for (untrusted: from a mailbox slot) against the
/// VM's regions, given as `(gpa, size)` of validated regions: non-empty, page aligned, not
/// overflowing, and inside one region, whose index is returned.
pub fn locate(
    regions: impl IntoIterator<Item = (u64, u64)>,
    gpa: u64,
    size: u64,
) -> Result<usize, ConvertError> {
    let end = gpa.checked_add(size);
    if size == 0 || !(gpa | size).is_multiple_of(PAGE_SIZE) || end.is_none() {
        return Err(ConvertError::Invalid { gpa, size });
    }
    let end = end.unwrap_or(u64::MAX);
    regions
        .into_iter()
        .position(|(start, len)| start <= gpa && end <= start + len)
        .ok_or(ConvertError::NotInOneRegion { gpa, size })
}

fn convert_inner(
    vm: &Vm,
    gpa: u64,
    size: u64,
    to_private: bool,
    explicit: bool,
) -> Result<VmmWork, ConvertError> {
    let regions = vm.memory.regions();
    let index = locate(regions.iter().map(|r| (r.spec.gpa(), r.size())), gpa, size)?;
    let region = &regions[index];
    let (Some(private), Some(gmem)) = (&vm.private, region.gmem_file()) else {
        // No private side: converting to shared is a no-op, to private impossible (QEMU).
        return if to_private {
            Err(ConvertError::NoPrivateMemory { gpa })
        } else {
            Ok(VmmWork::default())
        };
    };
    vm.policy
        .check(gpa, size, to_private, explicit)
        .map_err(ConvertError::Denied)?;
    if !vm.rate.lock().map(|mut r| r.allow()).unwrap_or(false) {
        return Err(ConvertError::Denied(Denial::RateLimited));
    }
    let offset = gpa - region.spec.gpa();
    let first = (offset / PAGE_SIZE) as usize;
    let last = ((offset + size) / PAGE_SIZE) as usize;
    let mut zap_shared = false;
    if to_private {
        // Private first, so a racing shared-side fault is poisoned instead of refilled; then
        // the shared backing goes (its pages are unmapped from the VMM too).
        region.state.set_private(first, last, true);
        region.state.discard(first, last);
        region
            .punch_shared(offset, size)
            .map_err(ConvertError::Kernel)?;
    } else {
        guest_memfd::punch_hole(gmem, offset, size).map_err(ConvertError::Kernel)?;
        region.state.discard(first, last);
        region.state.set_private(first, last, false);
        // The VMM's page table may still hold poison markers from shared-side touches while the
        // range was private; only the VMM can drop them (`VmMemory::forward_exit` does when
        // told). Shared-side faults are served on this thread, so none is poisoned meanwhile.
        zap_shared = region.state.take_poisoned(first, last);
    }
    (vm.listener)(ConversionEvent {
        vm_id: vm.id,
        gpa,
        size,
        to_private,
    });
    Ok(VmmWork {
        set_attributes: private.attributes == AttributeKeeper::Kvm,
        zap_shared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversion_range_must_lie_inside_one_region() {
        let regions = [(0u64, 0x10000u64), (0x10000, 0x10000), (1 << 32, 0x1000)];
        let at = |gpa, size| locate(regions, gpa, size).map_err(|e| e.code());
        assert_eq!(at(0, 0x10000), Ok(0));
        assert_eq!(at(0x1f000, 0x1000), Ok(1));
        assert_eq!(at(1 << 32, 0x1000), Ok(2));
        // Adjacent regions are still two regions.
        assert_eq!(at(0xf000, 0x2000), Err(codes::NOT_IN_ONE_REGION));
        assert_eq!(at(0x20000, 0x1000), Err(codes::NOT_IN_ONE_REGION));
        for (gpa, size) in [
            (0, 0),
            (0x800, 0x1000),
            (0, 0x800),
            (u64::MAX - 0xfff, 0x2000),
        ] {
            assert_eq!(at(gpa, size), Err(codes::INVALID), "{gpa:#x}+{size:#x}");
        }
    }
}
