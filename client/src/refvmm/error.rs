//! Errors of the reference VMM.

use std::fmt;

/// Errors of the reference VMM.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum RefVmError {
    /// `/dev/kvm` could not be opened.
    #[error("KVM is not available: opening /dev/kvm failed: {0}")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// A KVM ioctl other than `KVM_RUN` failed.
    #[error("KVM request {op} failed: {source}")]
    Kvm {
        /// The request, e.g. `KVM_SET_SREGS`.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The VMM-private low slot could not be mapped.
    #[error("Mapping {len} bytes of VMM-private low memory failed: {source}")]
    LowMemory {
        /// Bytes requested.
        len: u64,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// The vCPU count is zero or above what KVM supports.
    #[error("Invalid vCPU count {requested}: it must be between 1 and {max}")]
    BadVcpuCount {
        /// Count asked for.
        requested: usize,
        /// KVM's limit.
        max: usize,
    },
    /// No regions were given.
    #[error("No guest regions were given")]
    NoRegions,
    /// More regions than KVM has memslots for (slot 0 is the VMM's own).
    #[error("Too many guest regions: {regions} given, KVM allows {max} besides the low slot")]
    TooManyRegions {
        /// Regions given.
        regions: usize,
        /// Regions possible.
        max: usize,
    },
    /// A region breaks the layout rules.
    #[error("Guest region {index} is rejected: {reason}")]
    BadRegion {
        /// Index in the slice given to [`RefVm::new`](super::RefVm::new).
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// More plans than vCPUs.
    #[error("Too many plans: {plans} given but the VM has {vcpus} vCPUs")]
    TooManyPlans {
        /// Plans given.
        plans: usize,
        /// vCPUs of the VM.
        vcpus: usize,
    },
    /// A task is malformed or outside the regions.
    #[error("Task {task} of vCPU {vcpu} is rejected: {reason}")]
    BadTask {
        /// vCPU (plan) index.
        vcpu: usize,
        /// Task index in the plan.
        task: usize,
        /// What is wrong.
        reason: String,
    },
    /// `KVM_RUN` itself failed (other than `EINTR`), e.g. `EFAULT` when the host memory behind a
    /// region could not be faulted in.
    #[error("KVM_RUN failed on vCPU {vcpu} at rip {}: {source}", Rip(*.rip))]
    RunFailed {
        /// vCPU index.
        vcpu: usize,
        /// Guest rip, if `KVM_GET_REGS` worked.
        rip: Option<u64>,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest stopped for anything but its done `out` (or an interrupt).
    #[error(
        "Unexpected exit on vCPU {vcpu}: {reason} (exit reason {exit_reason}, rip {})",
        Rip(*.rip)
    )]
    UnexpectedExit {
        /// vCPU index.
        vcpu: usize,
        /// Raw `kvm_run.exit_reason`.
        exit_reason: u32,
        /// Human-readable description of the exit.
        reason: String,
        /// Guest rip, if `KVM_GET_REGS` worked.
        rip: Option<u64>,
    },
    /// A vCPU thread could not be started.
    #[error("Starting the thread for vCPU {vcpu} failed: {source}")]
    ThreadSpawn {
        /// vCPU index.
        vcpu: usize,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU thread panicked (a bug in this module).
    #[error("The thread for vCPU {vcpu} panicked")]
    ThreadPanicked {
        /// vCPU index.
        vcpu: usize,
    },
}

/// Formats an optional rip for error messages.
pub(super) struct Rip(Option<u64>);

impl fmt::Display for Rip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(rip) => write!(f, "{rip:#x}"),
            None => f.write_str("unknown"),
        }
    }
}

pub(super) fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RefVmError {
    move |source| RefVmError::Kvm { op, source }
}
