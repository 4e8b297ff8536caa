//! The VMM side of other VMMs' page-server protocols, played byte for byte as their sources do,
//! so vmpager's compat modes are tested and measured without Firecracker or cloud-hypervisor
//! installed (neither can be on hosts like this one).
//!
//! * [`firecracker`]: a Firecracker restoring a snapshot with `mem_backend: Uffd`.
//! * [`cloud_hypervisor`]: a cloud-hypervisor receiving a postcopy migration.

pub mod cloud_hypervisor;
pub mod firecracker;
