//! Post-copy migration between daemons (docs/migration.md).
//!
//! * [`reader`]: the source side's view of a VM's pages;
//! * [`sent`]: a lock-free page bitmap (what a destination has);
//! * [`outgoing`]: the migrations this daemon serves, as a source;
//! * [`serve`]: the source's listener and its urgent and bulk channels.

pub mod outgoing;
pub mod reader;
pub mod sent;
pub mod serve;

use std::net::SocketAddr;
use std::sync::Arc;

/// The daemon's migrations, shared by the control thread and the network threads.
#[derive(Debug, Default)]
pub struct Migrations {
    /// VMs served to destinations.
    pub outgoing: Arc<outgoing::Outgoings>,
    /// Where `--migration-listen` listens (`None`: this daemon serves no migration as a
    /// source).
    pub listening: Option<SocketAddr>,
}
