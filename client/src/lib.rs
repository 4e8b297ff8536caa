//! vmpager-client: what a VMM links to use `vmpagerd`.
//!
//! ```no_run
//! use vmpager_client::{Client, PageSource, VmSpec};
//! use vmpager_protocol::RegionSpec;
//!
//! # fn main() -> Result<(), vmpager_client::ClientError> {
//! let client = Client::connect("/run/vmpager.sock".as_ref())?;
//! let snapshot = std::fs::File::open("/var/lib/vm/mem.img").map_err(vmpager_client::ClientError::Io)?;
//! // 1 GiB of guest RAM at GPA 4 GiB, content from the snapshot, served on first touch.
//! let vm = client.create_mapped_vm(VmSpec {
//!     regions: vec![RegionSpec::new(4 << 30, 1 << 30, 0)],
//!     source: PageSource::File(snapshot),
//!     populate: vmpager_protocol::PopulateMethod::Default,
//!     ..Default::default()
//! })?;
//! let region = &vm.regions()[0];
//! // Give region.host_addr() / region.len() to KVM_SET_USER_MEMORY_REGION; the guest's first
//! // touch of each page is now a fault that vmpagerd serves.
//! # let _ = region;
//! # Ok(()) }
//! ```
//!
//! * [`client`]: the control connection (handshake, create, attach, stats, detach).
//! * [`link`]: keeping the VMs served across daemon restarts.
//! * [`update`]: VMM live update (release a VM, reattach it from a new process).
//! * [`memory`]: mapping the daemon's memfds and registering them on the VMM's userfaultfd.
//! * [`working_set`]: the working-set file (record and replay of first touches).
//! * [`refvmm`] (feature `refvmm`): a small reference VMM that runs real guest code.
//! * [`peers`] (feature `refvmm`): Firecracker's and cloud-hypervisor's side of their
//!   page-server protocols, for tests and benchmarks.
//! * [`demo`] (feature `refvmm`): the end-to-end scenario of `vmpager demo` and the tests.
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

pub mod client;
#[cfg(feature = "refvmm")]
pub mod coco;
#[cfg(feature = "refvmm")]
pub mod demo;
pub mod kvm_private;
pub mod link;
pub mod memory;
#[cfg(feature = "refvmm")]
pub mod peers;
#[cfg(feature = "refvmm")]
pub mod refvmm;
pub mod update;
pub mod working_set;

pub use client::{
    Client, ClientError, ClientOptions, CreatedVm, PageSource, Subscription, VmExits, VmSpec,
};
pub use link::LinkState;
pub use memory::{MappedRegion, VmMemory};
pub use update::ReattachedVm;
pub use vmpager_protocol::mailbox::{
    Request, RequestKind, Response, Status, VcpuChannel, WaitPolicy,
};
pub use vmpager_protocol::{ChannelProtocol, PopulateMethod, RegionSpec, Stats, WorkingSetEntry};
pub use vmpager_protocol::{ConversionEvent, VmType, REGION_PRIVATE};
