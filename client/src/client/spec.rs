//! What a VM is created from, what the daemon answers, and how a client rides out a daemon's
//! absence.

#[cfg(doc)]
use super::{Client, ClientError};
use crate::link::DEFAULT_RESTART_DEADLINE;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::time::Duration;
use vmpager_protocol::{PopulateMethod, RegionSpec, VmType};

/// Where the VM's pages come from.
#[derive(Debug)]
pub enum PageSource {
    /// Zeros.
    Zero,
    /// A raw snapshot image, read by the daemon on demand (the fd is passed, not the path).
    File(File),
    /// Another daemon (post-copy migration): faults wait until [`Client::migrate_in`] names
    /// the source.
    Remote,
    /// A packed snapshot at an object-store URL (`file:///dir`, `s3://bucket/prefix`;
    /// docs/snapshot-format.md), fetched, checked and cached by the daemon.
    Snapshot(String),
}

/// What to create.
#[derive(Debug)]
pub struct VmSpec {
    /// Guest RAM regions (flag private-capable ones with `RegionSpec::private`).
    pub regions: Vec<RegionSpec>,
    /// Page source.
    pub source: PageSource,
    /// Populate method (`Default` lets the daemon choose).
    pub populate: PopulateMethod,
    /// KVM VM type the VMM created.
    pub vm_type: VmType,
    /// The VMM's KVM VM fd: required for private regions (the client creates their
    /// guest_memfds through it and sets memory attributes when conversions say so).
    pub vm_fd: Option<OwnedFd>,
    /// Per-VM policy overrides (TOML with a `[policy]` table), if any.
    pub policy: Option<String>,
    /// The guest RAM is the VMM's own private memory (Firecracker's anonymous mappings): the
    /// daemon creates no memfd and installs pages with `UFFDIO_COPY` only.
    pub memory_in_vmm: bool,
    /// Record the order in which pages are first needed (`Client::working_set`); the daemon
    /// turns readahead off for this VM so every first touch is seen.
    pub record_working_set: bool,
}

impl Default for VmSpec {
    fn default() -> VmSpec {
        VmSpec {
            regions: Vec::new(),
            source: PageSource::Zero,
            populate: PopulateMethod::Default,
            vm_type: VmType::Default,
            vm_fd: None,
            policy: None,
            memory_in_vmm: false,
            record_working_set: false,
        }
    }
}

/// A VM the daemon created, before the VMM maps it.
#[derive(Debug)]
pub struct CreatedVm {
    /// VM id.
    pub vm_id: u64,
    /// Regions, as requested.
    pub regions: Vec<RegionSpec>,
    /// One memfd per region (regions sharing a memory file get copies of one memfd); none
    /// when the memory is the VMM's own.
    pub memfds: Vec<OwnedFd>,
    /// One guest_memfd per private-capable region, in region order (`None` for the others);
    /// created here (the daemon holds a copy).
    pub guest_memfds: Vec<Option<OwnedFd>>,
    /// The VMM's VM fd, for the memory attributes it must set (`vmm_sets_attributes`).
    pub vm_fd: Option<OwnedFd>,
    /// KVM keeps the attributes: the VMM sets them whenever a conversion answer says so.
    pub vmm_sets_attributes: bool,
    /// Secret for `Client::subscribe` (hand it to device backends that must see conversions;
    /// they must run as this process's uid, or root) and `Client::reattach`.
    pub token: u64,
    /// `UFFDIO_REGISTER_MODE_*` to register the mappings with.
    pub uffd_modes: u64,
    /// `UFFD_FEATURE_*` to enable at `UFFDIO_API`.
    pub uffd_features: u64,
}

/// How a [`Client`] behaves when the daemon goes away.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// How long to wait for a restarted daemon to take the VMs back before giving up on them
    /// ([`ClientError::DaemonLost`]).
    pub restart_deadline: Duration,
    /// Once the link is lost, answer every fault on the VMs' memory with `UFFDIO_POISON` (the
    /// faulting thread gets SIGBUS; a vCPU, an error exit): the default, so nothing waits
    /// forever. A VMM that acts on [`Client::lost_fd`] itself (pauses or exits) may turn it
    /// off: faults then wait, and the client still reads the uffds' events so the VMM never
    /// blocks in `madvise`/`munmap`.
    pub poison_when_lost: bool,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            restart_deadline: DEFAULT_RESTART_DEADLINE,
            poison_when_lost: true,
        }
    }
}
