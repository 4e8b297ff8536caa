//! What this host's KVM lets a reference VM have, known before any VM exists: a front end
//! refuses a configuration that can never run before it prepares anything for it.

use super::{guest_phys_bits, kvm_err, RefVm, RefVmError};
use kvm_bindings::CpuId;
use kvm_ioctls::Kvm;

/// This host's limits for a [`RefVm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// Most vCPUs in one VM (`KVM_CAP_MAX_VCPUS`).
    pub max_vcpus: usize,
    /// Highest GPA (exclusive) a region may reach: the smaller of [`RefVm::MAX_GPA`] and
    /// `2^MAXPHYADDR` of the guest CPU model KVM supports.
    pub guest_addr_limit: u64,
}

impl HostLimits {
    /// Asks `/dev/kvm`.
    pub fn probe() -> Result<HostLimits, RefVmError> {
        let kvm = Kvm::new().map_err(RefVmError::KvmUnavailable)?;
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(Self::of(&kvm, &cpuid))
    }

    pub(super) fn of(kvm: &Kvm, cpuid: &CpuId) -> HostLimits {
        HostLimits {
            max_vcpus: kvm.get_max_vcpus(),
            guest_addr_limit: RefVm::MAX_GPA.min(1u64 << guest_phys_bits(cpuid)),
        }
    }
}
