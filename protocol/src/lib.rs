//! vmpager-protocol: the wire protocol between a VMM (`vmpager-client`) and `vmpagerd`.
//!
//! This crate holds wire types, framing and fd passing only: no policy and no daemon state.
//! The normative description is `docs/protocol.md`; the constants here are the ones it names.
//!
//! * [`header`]: the fixed 24-byte little-endian header that starts every message.
//! * [`region`]: guest memory region descriptions and their validation.
//! * [`message`]: every message, its payload layout, encoding and bounded decoding.
//! * [`socket`]: `SOCK_SEQPACKET` transport with `SCM_RIGHTS` fd passing.
//! * [`mailbox`]: the per-vCPU exit channel in shared memory.
//! * [`page_state`]: the page-state file (two bits per page) the VMM keeps for a restarted
//!   daemon.
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

pub mod header;
pub mod mailbox;
pub mod mapping;
pub mod message;
pub mod page_state;
pub mod region;
pub mod socket;

pub use header::{Header, HEADER_LEN, MAGIC};
pub use message::{
    AttachChannel, AttachUffd, ChannelProtocol, ConversionEvent, CreateVm, DecodeError, ErrorCode,
    ErrorReply, Hello, Kind, Message, MigrateIn, MigrateOut, MigrationCounters, MigrationKey,
    MigrationState, MigrationStatus, PageSourceKind, PopulateMethod, ReplayWorkingSet, Stats,
    VmCreated, VmSession, VmType, Welcome, WorkingSet, WorkingSetEntry, MIGRATE_HYBRID,
    MIGRATION_KEY_LEN, VMCREATED_VMM_SETS_ATTRIBUTES, VM_MEMORY_IN_VMM, VM_RECORD_WORKING_SET,
};
pub use region::{RegionError, RegionSpec, HUGE_PAGE_SIZE, REGION_HUGE_2M, REGION_PRIVATE};
pub use socket::{Connection, SocketError};

/// The protocol version this crate speaks and puts in every header. A record whose header
/// carries another version is malformed; `Hello.version` is the highest version the client
/// speaks, and the daemon answers with the version it will use (at most its own). The history
/// of versions is in `docs/protocol.md` (*Versioning and extensions*).
pub const PROTOCOL_VERSION: u16 = 4;

/// Largest payload a peer may send (bytes after the header). Bigger messages are refused.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Largest number of fds one message may carry (a `ReclaimVm` of a VM with `MAX_REGIONS`
/// private regions carries 2 × 64 + 6; the kernel's own limit is 253).
pub const MAX_FDS: usize = 192;
/// Largest number of regions in one VM.
pub const MAX_REGIONS: usize = 64;
/// Guest page size that regions are aligned to.
pub const PAGE_SIZE: u64 = 4096;
/// Longest per-VM policy text in `CreateVm`.
pub const MAX_POLICY_TEXT: usize = 16 * 1024;
/// Longest `CreateVm::source_url` (bytes).
pub const MAX_SOURCE_URL: usize = 4096;
/// Largest number of vCPUs (mailbox slots) per VM.
pub const MAX_VCPUS: u32 = crate::mailbox::MAX_SLOTS;
/// Longest error text carried by an `Error` reply.
pub const MAX_ERROR_TEXT: usize = 1024;

/// Feature bits negotiated at handshake (`Hello.features & Welcome.features`).
pub mod features {
    /// Page source `file`: a snapshot image fd sent with `CreateVm`.
    pub const FILE_SOURCE: u64 = 1 << 0;
    /// `GetStats` / `Stats` messages.
    pub const STATS: u64 = 1 << 1;
    /// Populate by writing the daemon's memfd mapping and `UFFDIO_CONTINUE` (MINOR faults).
    pub const POPULATE_CONTINUE: u64 = 1 << 2;
    /// Private memory: VM types and guest_memfds in `CreateVm`, `VmCreated.flags`.
    pub const PRIVATE_MEMORY: u64 = 1 << 3;
    /// The per-vCPU mailbox (`OpenMailbox`/`MailboxOpened`) for memory-fault and conversion exits.
    pub const MAILBOX: u64 = 1 << 4;
    /// `Subscribe` and `ConversionEvent`.
    pub const CONVERSION_EVENTS: u64 = 1 << 5;
    /// `CreateVm.flags` `VM_MEMORY_IN_VMM`: serve the VMM's own private memory.
    pub const VMM_MEMORY: u64 = 1 << 6;
    /// `AttachChannel`: serve a VMM's page requests on a socket (cloud-hypervisor).
    pub const FAULT_CHANNEL: u64 = 1 << 7;
    /// `VM_RECORD_WORKING_SET`, `GetWorkingSet`/`WorkingSet`, `ReplayWorkingSet`.
    pub const WORKING_SET: u64 = 1 << 8;
    /// Regions flagged `REGION_HUGE_2M`.
    pub const HUGE_PAGES: u64 = 1 << 9;
    /// Sessions that outlive connections: `ReleaseVm`, `ReattachVm`, `ReclaimVm`.
    pub const SESSIONS: u64 = 1 << 10;
    /// Post-copy migration between daemons: page source `Remote`, `MigrateOut`, `MigrateIn`,
    /// `GetMigration`, `AbandonMigration`, `MigrationStatus`.
    pub const MIGRATION: u64 = 1 << 11;
    /// Page source `Snapshot`: a packed snapshot at an object-store URL
    /// (`CreateVm::source_url`).
    pub const SNAPSHOT_URL: u64 = 1 << 12;
    /// Every feature this version of the crate knows.
    pub const ALL: u64 = FILE_SOURCE
        | STATS
        | POPULATE_CONTINUE
        | PRIVATE_MEMORY
        | MAILBOX
        | CONVERSION_EVENTS
        | VMM_MEMORY
        | FAULT_CHANNEL
        | WORKING_SET
        | HUGE_PAGES
        | SESSIONS
        | MIGRATION
        | SNAPSHOT_URL;
}

/// Registration modes the daemon asks the VMM to use on its uffd (`VmCreated.uffd_modes`); the
/// same values as the kernel's `UFFDIO_REGISTER_MODE_*`.
pub mod uffd_modes {
    /// `UFFDIO_REGISTER_MODE_MISSING`.
    pub const MISSING: u64 = 1;
    /// `UFFDIO_REGISTER_MODE_MINOR`.
    pub const MINOR: u64 = 4;
}
