//! One VM served by the daemon: its memory, page source, populate method and counters.

use crate::memory::GuestMemory;
use crate::metrics::VmMetrics;
use crate::source::PageSource;
use vmpager_protocol::PopulateMethod;

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

/// A VM: shared by the control thread and the worker that serves its uffd.
#[derive(Debug)]
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
}
