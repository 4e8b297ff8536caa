//! Post-copy migration between daemons (docs/migration.md).
//!
//! * [`reader`]: the source side's view of a VM's pages.

pub mod reader;
