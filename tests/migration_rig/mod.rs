//! The two-daemon rig the migration tests share: the VM's layout (two regions laid end to end
//! in the remote address space), in-process daemons, and where a page of the VM is mapped.

use crate::common::TestDir;
use std::time::Duration;
use vmpager_client::{MappedRegion, RegionSpec};
use vmpagerd::{Config, DaemonHandle};

pub const PAGE: usize = 4096;
/// Two regions of 1 MiB and 3 MiB: the remote address space spans both.
pub const REGIONS: [(u64, usize); 2] = [(1 << 32, 256), (2 << 32, 768)];
pub const PAGES: usize = 1024;
/// Bound on every wait: a bug shows as a failed test, not a hung one.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn daemon(dir: &TestDir, name: &str, listen: bool, deadline: Duration) -> DaemonHandle {
    daemon_with(dir, name, listen, deadline, true)
}

pub fn daemon_with(
    dir: &TestDir,
    name: &str,
    listen: bool,
    deadline: Duration,
    push: bool,
) -> DaemonHandle {
    daemon_adjusted(dir, name, listen, deadline, |c| c.migration_push = push)
}

/// A daemon of the rig whose configuration `adjust` changes.
pub fn daemon_adjusted(
    dir: &TestDir,
    name: &str,
    listen: bool,
    deadline: Duration,
    adjust: impl FnOnce(&mut Config),
) -> DaemonHandle {
    let mut config = Config {
        workers: 1,
        migration_listen: listen.then(|| "127.0.0.1:0".parse().unwrap()),
        migration_liveness: Duration::from_millis(1000),
        migration_deadline: deadline,
        ..Config::default()
    };
    adjust(&mut config);
    vmpagerd::spawn(config, &dir.join(name)).unwrap()
}

pub fn regions() -> Vec<RegionSpec> {
    let mut at = 0;
    REGIONS
        .iter()
        .map(|&(gpa, pages)| {
            let r = RegionSpec::new(gpa, (pages * PAGE) as u64, at);
            at += (pages * PAGE) as u64;
            r
        })
        .collect()
}

/// Page `p` of the VM (in the remote address space order) in `memory`.
pub fn locate(memory: &vmpager_client::VmMemory, p: usize) -> (&MappedRegion, usize) {
    let mut p = p;
    for (r, &(_, pages)) in memory.regions().iter().zip(&REGIONS) {
        if p < pages {
            return (r, p);
        }
        p -= pages;
    }
    unreachable!("page beyond the VM")
}
