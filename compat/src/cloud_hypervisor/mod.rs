//! cloud-hypervisor (main at ae44c29, plus its PR #8819, which announces the memory mode in the
//! Config payload): the live-migration protocol as a *sender* speaks it, and the snapshot
//! directory that `ch-remote snapshot file://DIR` writes.
//!
//! - [`wire`]: the 16-byte request/response headers, memory ranges, connection roles, and the
//!   `MemoryFd` exchange (a slot number with a memfd in `SCM_RIGHTS`).
//! - [`snapshot`]: reads `config.json`, `state.json` and `memory-ranges`, maps each guest RAM
//!   slot to its bytes in `memory-ranges`, and builds the Config payload
//!   (`VmMigrationConfig`) that a sender sends to a receiving cloud-hypervisor.

pub mod snapshot;
pub mod wire;
