//! VMs outlive their VMM's connection: a VMM that dies or releases its VM for an update leaves
//! it to a new VMM that presents the token (`ReattachVm`), within the grace period; after it
//! the VM is freed. A VMM hands a VM back over a new connection with `ReclaimVm`.

mod common;

use common::*;
use std::os::fd::AsFd;
use std::time::Duration;
use vmpager_client::demo::PatternGen;
use vmpager_client::{
    Client, ClientError, MappedRegion, PageSource, PopulateMethod, RegionSpec, VmSpec,
};
use vmpager_protocol::{
    features, Connection, CreateVm, ErrorCode, Hello, Message, PageSourceKind, VmSession,
    PROTOCOL_VERSION,
};
use vmpagerd::Config;

const PAGE: usize = 4096;
const PAGES: usize = 256;

fn daemon(dir: &TestDir, grace: Duration) -> vmpagerd::DaemonHandle {
    vmpagerd::spawn(
        Config {
            workers: 1,
            vm_grace: grace,
            ..Config::default()
        },
        &dir.join("d.sock"),
    )
    .unwrap()
}

fn spec(dir: &TestDir) -> VmSpec {
    VmSpec {
        regions: vec![RegionSpec::new(1 << 32, (PAGES * PAGE) as u64, 0)],
        source: PageSource::File(image(dir, "img", (PAGES * PAGE) as u64, 17)),
        populate: PopulateMethod::Default,
        ..Default::default()
    }
}

fn snapshot() -> Vec<u8> {
    let mut s = vec![0u8; PAGES * PAGE];
    PatternGen::new(17).fill(&mut s);
    s
}

fn page(r: &MappedRegion, p: usize) -> Vec<u8> {
    let at = r.host_addr().as_ptr() as usize + p * PAGE;
    // SAFETY: inside the live mapping; a volatile read may fault to the daemon.
    (0..PAGE)
        .map(|i| unsafe { ((at + i) as *const u8).read_volatile() })
        .collect()
}

fn write(r: &MappedRegion, p: usize, v: u64) {
    let at = r.host_addr().as_ptr() as usize + p * PAGE;
    // SAFETY: inside the live mapping; this test is its only writer.
    unsafe { (at as *mut u64).write_volatile(v) }
}

#[test]
fn a_vmm_that_dies_leaves_its_vm_to_a_new_vmm_with_the_token() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("sess-die");
    let d = daemon(&dir, Duration::from_secs(60));
    let snap = snapshot();
    let (vm_id, token) = {
        let old = Client::connect(d.socket_path()).unwrap();
        let vm = old.create_mapped_vm(spec(&dir)).unwrap();
        let r = &vm.regions()[0];
        for p in 0..PAGES / 4 {
            assert_eq!(page(r, p), snap[p * PAGE..(p + 1) * PAGE]);
            write(r, p, 0xabcd_0000 + p as u64);
        }
        (vm.vm_id(), vm.token())
        // The VMM "dies": its mapping, uffd and connection go.
    };
    assert!(d.live_vms().wait_for(1, Duration::from_secs(10)));
    let new = Client::connect(d.socket_path()).unwrap();
    // The id alone is not enough.
    let e = new.reattach(vm_id, token ^ 1).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                code: ErrorCode::UnknownVm,
                ..
            }
        ),
        "{e}"
    );
    let (vm, _) = new.reattach_mapped(vm_id, token).unwrap();
    let r = &vm.regions()[0];
    for p in 0..PAGES {
        let mut want = snap[p * PAGE..(p + 1) * PAGE].to_vec();
        if p < PAGES / 4 {
            want[..8].copy_from_slice(&(0xabcd_0000u64 + p as u64).to_ne_bytes());
        }
        assert_eq!(page(r, p), want, "page {p}");
    }
    let m = d.live_vms().metrics();
    assert_eq!(m.vms_orphaned.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(
        m.vms_reattached.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Held by the new VMM now: nobody else takes it, even with the token.
    let third = Client::connect(d.socket_path()).unwrap();
    let e = third.reattach(vm_id, token).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                code: ErrorCode::BadState,
                ..
            }
        ),
        "{e}"
    );
    new.detach(vm_id).unwrap();
    assert!(d.live_vms().wait_for(0, Duration::from_secs(10)));
}

#[test]
fn a_released_vm_is_taken_over_and_one_nobody_takes_is_freed_after_the_grace_period() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("sess-release");
    let d = daemon(&dir, Duration::from_millis(300));
    let snap = snapshot();
    let old = Client::connect(d.socket_path()).unwrap();
    let vm = old.create_mapped_vm(spec(&dir)).unwrap();
    let exits = old.open_mailbox(vm.vm_id(), 2).unwrap();
    drop(exits);
    write(&vm.regions()[0], 3, 42);
    let (id, token) = (vm.vm_id(), vm.token());
    let grace = old.release(id).unwrap();
    assert_eq!(grace, Duration::from_millis(300));
    drop(vm);
    // The old VMM can no longer name it.
    assert!(old.stats(id).is_err());
    let new = Client::connect(d.socket_path()).unwrap();
    let r = new.reattach(id, token).unwrap();
    assert_eq!(r.mailbox_vcpus, 2);
    // vCPU channels keep the link (and the VM) while they live: the VM's mailbox is back.
    assert!(r.exits.is_some());
    drop(r.exits);
    assert_eq!(r.description.source, PageSourceKind::File);
    let memory = vmpager_client::VmMemory::map(r.created).unwrap();
    new.attach_uffd(id, memory.uffd(), &memory.host_addrs())
        .unwrap();
    let got = page(&memory.regions()[0], 3);
    assert_eq!(&got[..8], &42u64.to_ne_bytes());
    assert_eq!(got[8..], snap[3 * PAGE + 8..4 * PAGE]);
    assert_eq!(
        page(&memory.regions()[0], 200),
        snap[200 * PAGE..201 * PAGE]
    );
    // Its VMM goes away and nobody comes back: freed after the grace period.
    drop(memory);
    drop(new);
    assert!(d.live_vms().wait_for(0, Duration::from_secs(30)));
    let late = Client::connect(d.socket_path()).unwrap();
    let e = late.reattach(id, token).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                code: ErrorCode::UnknownVm,
                ..
            }
        ),
        "{e}"
    );
    let m = d.live_vms().metrics();
    assert_eq!(m.vms_expired.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn without_a_grace_period_release_is_refused_and_a_closed_connection_frees() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("sess-nograce");
    let d = daemon(&dir, Duration::ZERO);
    let c = Client::connect(d.socket_path()).unwrap();
    let vm = c.create_vm(spec(&dir)).unwrap();
    let e = c.release(vm.vm_id).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                code: ErrorCode::Unsupported,
                ..
            }
        ),
        "{e}"
    );
    drop(c);
    assert!(d.live_vms().wait_for(0, Duration::from_secs(10)));
}

/// `ReclaimVm` on the wire: a VMM that lost its connection hands its VM back over a new one
/// with every fd it kept; the wrong token, other regions, or a VM another connection holds are
/// refused.
#[test]
fn a_vm_is_reclaimed_over_a_new_connection_by_its_token_only() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("sess-reclaim");
    let d = daemon(&dir, Duration::from_secs(60));
    let hello = |c: &Connection| {
        let w = c
            .request(
                &Message::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    features: features::ALL,
                }),
                &[],
            )
            .unwrap();
        assert!(matches!(w.message, Message::Welcome(_)));
    };
    let create = CreateVm {
        vm_type: Default::default(),
        policy: None,
        source_url: None,
        source: PageSourceKind::Zero,
        populate: vmpager_protocol::PopulateMethod::Copy,
        flags: 0,
        regions: vec![RegionSpec::new(0, 1 << 20, 0)],
    };
    let first = Connection::connect(d.socket_path()).unwrap();
    hello(&first);
    let reply = first
        .request(&Message::CreateVm(create.clone()), &[])
        .unwrap();
    let Message::VmCreated(v) = reply.message else {
        panic!("{:?}", reply.message)
    };
    let fds = reply.fds; // memfd, state file
    assert_eq!(fds.len(), 2);
    drop(first);
    let session = |token: u64, regions: Vec<RegionSpec>| VmSession {
        vm_id: v.vm_id,
        token,
        uffd_modes: v.uffd_modes,
        uffd_features: v.uffd_features,
        created_flags: v.flags,
        mailbox_vcpus: 0,
        channel: None,
        host_addrs: Vec::new(),
        create: CreateVm {
            regions,
            ..create.clone()
        },
    };
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let second = Connection::connect(d.socket_path()).unwrap();
    hello(&second);
    let refused = |c: &Connection, s: VmSession| match c
        .request(&Message::ReclaimVm(s), &borrowed)
        .unwrap()
        .message
    {
        Message::Error(e) => e.code,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        refused(&second, session(v.token ^ 7, create.regions.clone())),
        ErrorCode::UnknownVm
    );
    assert_eq!(
        refused(
            &second,
            session(v.token, vec![RegionSpec::new(0, 2 << 20, 0)])
        ),
        ErrorCode::BadMessage
    );
    let ok = second
        .request(
            &Message::ReclaimVm(session(v.token, create.regions.clone())),
            &borrowed,
        )
        .unwrap();
    assert_eq!(ok.message, Message::Reclaimed { vm_id: v.vm_id });
    // Held by `second` now.
    let third = Connection::connect(d.socket_path()).unwrap();
    hello(&third);
    assert_eq!(
        refused(&third, session(v.token, create.regions.clone())),
        ErrorCode::BadState
    );
    let stats = second
        .request(&Message::GetStats { vm_id: v.vm_id }, &[])
        .unwrap();
    assert!(matches!(stats.message, Message::Stats(_)));
    assert_eq!(d.live_vms().get(), 1);
}
