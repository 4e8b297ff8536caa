//! One VM served by the daemon: its memory, page source, populate method and counters.

use crate::memory::{GuestMemory, PageDst};
use crate::metrics::VmMetrics;
use crate::policy::{Policy, RateLimit};
use crate::readahead::Readahead;
use crate::source::{Fill, Source, SourceError};
use crate::uffd::UffdError;
use crate::working_set::{Recorder, ReplayQueue};
use rustix::io::Errno;
use std::ops::Range;
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
    pub source: Source,
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
    /// Pages installed along with a faulting one (off while recording a working set).
    pub readahead: Readahead,
    /// Records the working set (`VM_RECORD_WORKING_SET`).
    pub recorder: Option<Recorder>,
    /// Pages to push ahead of the vCPUs (`ReplayWorkingSet`).
    pub replay: ReplayQueue,
    /// The VMM's uffd for write-protecting its mapping, and a hybrid migration's dirty
    /// tracking (`migration::dirty`).
    pub hybrid: crate::migration::dirty::HybridSlot,
}

/// Attempts to fetch a page from the source before giving up on it.
const SOURCE_ATTEMPTS: usize = 3;

impl Vm {
    /// The guest RAM is the VMM's own private memory (`VM_MEMORY_IN_VMM`).
    pub fn memory_in_vmm(&self) -> bool {
        self.memory.regions().iter().all(|r| !r.is_owned())
    }

    /// Fills `dst` from the page source at `source_offset`, retrying transient errors; counts
    /// the source bytes read.
    pub fn fill(&self, source_offset: u64, dst: &mut PageDst<'_>) -> Result<Fill, SourceError> {
        let source = match &self.source {
            Source::Sync(s) => s,
            // The fault path asks an asynchronous source instead; nothing fills from it.
            Source::Async(_) => {
                return Err(SourceError::Unusable("the source is asynchronous".into()))
            }
        };
        let mut last = None;
        for _ in 0..SOURCE_ATTEMPTS {
            match source.fill(source_offset, dst) {
                Ok(f) => {
                    if f == Fill::Data {
                        let read =
                            (source.data_end().saturating_sub(source_offset)).min(dst.len() as u64);
                        VmMetrics::add(&self.metrics.source_bytes_read, read);
                    }
                    return Ok(f);
                }
                Err(e) if e.is_retryable() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| SourceError::Unusable("no attempt made".into())))
    }

    /// Installs pages `pages` (of the region's page size) of owned region `ri` into its memfd
    /// from the source (zeros where the source has none), each page whole or not at all and
    /// never over a page that is there (`Region::install`), through `bounce`: at most as many
    /// pages as fit in it. Returns how they were filled and the pages installed, a prefix of
    /// `pages` (empty if the first one was there already).
    pub fn fill_owned(
        &self,
        ri: usize,
        pages: Range<usize>,
        bounce: &mut [u8],
    ) -> Result<(Fill, Range<usize>), FillError> {
        let region = self
            .memory
            .regions()
            .get(ri)
            .ok_or(FillError::Install(UffdError::Failed(Errno::INVAL)))?;
        let ps = region.page_size();
        let fit = (bounce.len() as u64 / ps) as usize;
        let pages = pages.start..pages.end.min(pages.start + fit);
        let off = pages.start as u64 * ps;
        let len = (pages.len() as u64 * ps) as usize;
        let buf = bounce
            .get_mut(..len)
            .ok_or(FillError::Install(UffdError::Failed(Errno::NOBUFS)))?;
        let fill = self.fill(
            region.spec.source_offset() + off,
            &mut PageDst::from_buf(buf),
        )?;
        let installed = match fill {
            Fill::Data => region.install(off, buf)?,
            Fill::Zero => region.install_zeros(off, len as u64, buf)?,
        };
        Ok((fill, pages.start..pages.start + (installed / ps) as usize))
    }
}

/// Errors putting pages into the daemon's memory.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// The page source failed.
    #[error("the page source failed")]
    Source(#[from] SourceError),
    /// The install ioctl failed.
    #[error("cannot install the pages")]
    Install(#[from] UffdError),
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
