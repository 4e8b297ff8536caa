//! Post-copy migration between daemons (docs/migration.md).
//!
//! * [`reader`]: the source side's view of a VM's pages;
//! * [`sent`]: a lock-free page bitmap (what a destination has);
//! * [`dirty`]: a hybrid migration's dirty tracking (uffd write-protect) on the source;
//! * [`outgoing`]: the migrations this daemon serves, as a source;
//! * [`serve`]: the source's listener and its urgent and bulk channels;
//! * [`remote`]: the destination's source, pulling from a source daemon.

pub mod dirty;
pub mod outgoing;
pub mod reader;
pub mod remote;
pub mod sent;
pub mod serve;

use std::net::SocketAddr;
use std::sync::Arc;

/// The daemon's migrations, shared by the control thread and the network threads.
#[derive(Debug)]
pub struct Migrations {
    /// VMs served to destinations.
    pub outgoing: Arc<outgoing::Outgoings>,
    /// Where `--migration-listen` listens (`None`: this daemon serves no migration as a
    /// source).
    pub listening: Option<SocketAddr>,
    /// Connection timeouts of the destination side.
    pub timeouts: vmpager_migration::Timeouts,
    /// How long a destination waits for an unreachable source before it gives up on it (and
    /// poisons the pages it lacks).
    pub deadline: std::time::Duration,
    /// Whether a destination's source pushes the pages nobody asked for (`false`: pull only).
    pub push: bool,
    /// Whether a destination opens no urgent channel (its requests go on the bulk channel;
    /// for comparison only).
    pub one_channel: bool,
}

impl Default for Migrations {
    fn default() -> Migrations {
        Migrations {
            outgoing: Arc::default(),
            listening: None,
            timeouts: vmpager_migration::Timeouts::default(),
            deadline: DEFAULT_DEADLINE,
            push: true,
            one_channel: false,
        }
    }
}

/// How long a destination waits for an unreachable source by default.
pub const DEFAULT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);
