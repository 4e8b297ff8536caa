//! With no grace period (`--vm-grace 0`), a VMM that disconnects leaves nothing behind in the
//! daemon and disturbs no other session. (With one, its VMs are kept for a reattach:
//! tests/sessions.rs.)
//!
//! Alone in its own test binary: it counts this process's open fds, which tests running in
//! parallel threads of the same process would disturb.

mod common;

use common::*;
use std::time::Duration;
use vmpager_client::demo::PatternGen;
use vmpager_client::{Client, PageSource, PopulateMethod, RegionSpec, VmSpec};
use vmpagerd::Config;

const PAGE: usize = 4096;

#[test]
fn a_vmm_that_disconnects_leaves_nothing_behind_and_disturbs_no_other() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("disconnect");
    let d = vmpagerd::spawn(
        Config {
            workers: 2,
            vm_grace: Duration::ZERO,
            ..Config::default()
        },
        &dir.join("d.sock"),
    )
    .unwrap();
    let img = image(&dir, "img", 64 * PAGE as u64, 13);
    let mut snapshot = vec![0u8; 64 * PAGE];
    PatternGen::new(13).fill(&mut snapshot);
    let spec = || VmSpec {
        regions: vec![RegionSpec::new(1 << 32, 64 * PAGE as u64, 0)],
        source: PageSource::File(img.try_clone().unwrap()),
        populate: PopulateMethod::Default,
        ..Default::default()
    };
    // A long-lived session on its own connection.
    let steady = Client::connect(d.socket_path()).unwrap();
    let steady_vm = steady.create_mapped_vm(spec()).unwrap();
    assert_eq!(read_page(&steady_vm.regions()[0], 0), snapshot[..PAGE]);
    assert!(d.live_vms().wait_for(1, Duration::from_secs(10)));

    let fds_before = open_fds();
    for round in 0..20 {
        let client = Client::connect(d.socket_path()).unwrap();
        let vm = client.create_mapped_vm(spec()).unwrap();
        let r = &vm.regions()[0];
        for p in 0..(round % 8) {
            assert_eq!(read_page(r, p), snapshot[p * PAGE..(p + 1) * PAGE]);
        }
        // Sometimes with a second VM, sometimes without detaching: the connection's close
        // frees whatever it owns.
        let extra = (round % 3 == 0).then(|| client.create_vm(spec()).unwrap());
        drop(extra);
        drop(vm);
        drop(client);
        assert!(
            d.live_vms().wait_for(1, Duration::from_secs(10)),
            "round {round}: VMs not freed"
        );
    }
    // Every memfd, mapping fd, uffd copy and socket of those sessions is closed (the daemon
    // closes a connection's socket before it frees the connection's VMs).
    assert_eq!(open_fds(), fds_before);
    // The steady session never noticed.
    let r = &steady_vm.regions()[0];
    for p in 0..64 {
        assert_eq!(read_page(r, p), snapshot[p * PAGE..(p + 1) * PAGE]);
    }
    assert_eq!(
        steady.stats(steady_vm.vm_id()).unwrap().pages_from_source,
        64
    );
}
