//! One VM served by the daemon: its memory, page source, populate method and counters.

use crate::memory::GuestMemory;
use crate::metrics::VmMetrics;
use crate::policy::{Policy, RateLimit};
use crate::source::PageSource;
use std::sync::Mutex;
use vmpager_protocol::{ConversionEvent, PopulateMethod, VmType};

/// How pages are installed. Both are measured in `docs/populate.md`; see there for why the
/// default is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Populate {
    /// Source → bounce buffer → `UFFDIO_COPY` (uffd registered MISSING).
    Copy,
    /// Source → the daemon's memfd mapping → `UFFDIO_CONTINUE` (registered MISSING | MINOR).
    Continue,
}

impl Populate {
    /// The wire value.
    pub fn wire(self) -> PopulateMethod {
        match self {
            Populate::Copy => PopulateMethod::Copy,
            Populate::Continue => PopulateMethod::Continue,
        }
    }

    /// The uffd registration modes the VMM must use.
    pub fn register_modes(self) -> u64 {
        use vmpager_protocol::uffd_modes::{MINOR, MISSING};
        match self {
            Populate::Copy => MISSING,
            Populate::Continue => MISSING | MINOR,
        }
    }
}

/// Who keeps the memory attributes (private/shared) of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttributeKeeper {
    /// KVM, through `KVM_SET_MEMORY_ATTRIBUTES`; the daemon mirrors them in its page state.
    Kvm,
    /// The daemon alone (`--emulate-attributes`, hosts without memory attributes); reported
    /// in every stats reply.
    Emulated,
}

/// Private memory of a VM whose type has it. (The guest_memfds are in its regions.)
#[derive(Debug)]
pub struct PrivateMemory {
    /// Who keeps the attributes.
    pub attributes: AttributeKeeper,
}

/// Receives every conversion (to notify listeners such as VFIO or vhost-user backends).
pub type ConversionListener = Box<dyn Fn(ConversionEvent) + Send + Sync>;

/// A VM: shared by the control thread and the workers that serve its uffd and its exits.
pub struct Vm {
    /// Non-zero id.
    pub id: u64,
    /// Guest memory the daemon owns.
    pub memory: GuestMemory,
    /// Where first-touch content comes from.
    pub source: Box<dyn PageSource>,
    /// How pages are installed.
    pub populate: Populate,
    /// Counters and latency.
    pub metrics: VmMetrics,
    /// KVM VM type.
    pub vm_type: VmType,
    /// Private memory, for VM types that have it.
    pub private: Option<PrivateMemory>,
    /// The private/shared policy.
    pub policy: Policy,
    /// The conversion rate limit's state.
    pub rate: Mutex<RateLimit>,
    /// Told of every conversion.
    pub listener: ConversionListener,
    /// Secret a `Subscribe` must present.
    pub token: u64,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.id)
            .field("vm_type", &self.vm_type)
            .field("populate", &self.populate)
            .field("private", &self.private)
            .finish_non_exhaustive()
    }
}
