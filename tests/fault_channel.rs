//! The fault channel (`AttachChannel`, cloud-hypervisor's postcopy fault connection) at the
//! byte level, with the daemon on a thread of this process and this test writing the requests
//! cloud-hypervisor writes: pages arrive in the memfds before `Ok` (length 0), several slots
//! share one memfd at their file offsets, pages already there are never overwritten, removed
//! pages come back as zeros, bad requests get `Error` and the channel goes on, `Abandon` and
//! unknown commands end it, EOF ends it, and demand requests are recorded but background pulls
//! are not. (With cloud-hypervisor's whole receive side: `tests/cloud_hypervisor.rs`.)

mod common;

use common::*;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use vmpager_client::demo::PatternGen;
use vmpager_client::{ChannelProtocol, Client, CreatedVm, PageSource, RegionSpec, VmSpec};
use vmpager_compat::cloud_hypervisor::wire::{
    self, Command, MemoryRange, Request, Response, Status,
};
use vmpagerd::DaemonHandle;

const PAGE: u64 = 4096;
const KIB: u64 = 1024;

fn daemon(dir: &TestDir) -> DaemonHandle {
    vmpagerd::spawn(vmpagerd::Config::default(), &dir.join("d.sock")).unwrap()
}

/// A zone of 512 KiB split into two slots sharing one memfd (GPA 0 at file offset 0, GPA 1 MiB at
/// file offset 256 KiB), whose bytes are 256 KiB into the snapshot and at its start.
fn slots() -> Vec<RegionSpec> {
    vec![
        RegionSpec::new(0, 256 * KIB, 256 * KIB).in_memfd(1, 0),
        RegionSpec::new(1 << 20, 256 * KIB, 0).in_memfd(1, 256 * KIB),
    ]
}

/// A VM over `slots()` and a channel to it.
fn channel_vm(client: &Client, dir: &TestDir, record: bool) -> (CreatedVm, UnixStream, Vec<u8>) {
    let img = image(dir, "img", 512 * KIB, 3);
    let mut bytes = vec![0u8; (512 * KIB) as usize];
    PatternGen::new(3).fill(&mut bytes);
    let vm = client
        .create_vm(VmSpec {
            regions: slots(),
            source: PageSource::File(img),
            record_working_set: record,
            ..Default::default()
        })
        .unwrap();
    let (ours, daemons) = UnixStream::pair().unwrap();
    client
        .attach_channel(vm.vm_id, daemons.as_fd(), ChannelProtocol::CloudHypervisor)
        .unwrap();
    drop(daemons);
    (vm, ours, bytes)
}

fn page_fault(s: &mut UnixStream, gpa: u64, length: u64) -> Response {
    wire::write_request(s, Request::page_fault()).unwrap();
    wire::write_range(s, MemoryRange { gpa, length }).unwrap();
    wire::read_response(s).unwrap()
}

fn memfd_page(vm: &CreatedVm, file_offset: u64) -> Vec<u8> {
    let mut buf = vec![0u8; PAGE as usize];
    rustix::io::pread(&vm.memfds[0], &mut buf, file_offset).unwrap();
    buf
}

#[test]
fn pages_are_in_the_memfd_before_ok_and_never_overwritten() {
    let dir = TestDir::new("chan-pages");
    let d = daemon(&dir);
    let client = Client::connect(d.socket_path()).unwrap();
    let (vm, mut s, bytes) = channel_vm(&client, &dir, false);
    // Both slots' memfds are one file.
    let ino = |fd| rustix::fs::fstat(fd).unwrap().st_ino;
    assert_eq!(ino(&vm.memfds[0]), ino(&vm.memfds[1]));
    // Slot 1's page 3: file offset 256 KiB + 12 KiB, snapshot offset 12 KiB.
    let r = page_fault(&mut s, (1 << 20) + 3 * PAGE, PAGE);
    assert_eq!((r.status(), r.length()), (Status::Ok, 0));
    assert!(
        memfd_page(&vm, 256 * KIB + 3 * PAGE) == bytes[(3 * PAGE) as usize..(4 * PAGE) as usize]
    );
    // Slot 0's page 0: file offset 0, snapshot offset 256 KiB.
    assert_eq!(page_fault(&mut s, 0, PAGE).status(), Status::Ok);
    assert!(memfd_page(&vm, 0) == bytes[(256 * KIB) as usize..(256 * KIB + PAGE) as usize]);
    // A page someone else wrote into the memfd is left alone.
    rustix::io::pwrite(&vm.memfds[0], &[0xab; 4096], 40 * PAGE).unwrap();
    assert_eq!(page_fault(&mut s, 40 * PAGE, PAGE).status(), Status::Ok);
    assert!(memfd_page(&vm, 40 * PAGE).iter().all(|&b| b == 0xab));
    // A page served, then removed by the VMM (a balloon), comes back as zeros.
    rustix::fs::fallocate(
        &vm.memfds[0],
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        0,
        PAGE,
    )
    .unwrap();
    assert_eq!(page_fault(&mut s, 0, PAGE).status(), Status::Ok);
    assert!(memfd_page(&vm, 0).iter().all(|&b| b == 0));
    let st = client.stats(vm.vm_id).unwrap();
    assert_eq!((st.channel_requests, st.channel_errors), (4, 0));
}

#[test]
fn bad_requests_get_error_and_the_channel_goes_on() {
    let dir = TestDir::new("chan-bad");
    let d = daemon(&dir);
    let client = Client::connect(d.socket_path()).unwrap();
    let (vm, mut s, _) = channel_vm(&client, &dir, false);
    // A GPA outside every slot, a length other than the slot's page size, an unaligned GPA.
    assert_eq!(page_fault(&mut s, 512 * KIB, PAGE).status(), Status::Error);
    assert_eq!(page_fault(&mut s, 0, 2 << 20).status(), Status::Error);
    assert_eq!(page_fault(&mut s, 100, PAGE).status(), Status::Error);
    assert_eq!(page_fault(&mut s, PAGE, PAGE).status(), Status::Ok);
    let st = client.stats(vm.vm_id).unwrap();
    assert_eq!((st.channel_requests, st.channel_errors), (4, 3));
    // Abandon: Ok, then the daemon closes the channel.
    wire::write_request(&mut s, Request::abandon()).unwrap();
    assert_eq!(wire::read_response(&mut s).unwrap().status(), Status::Ok);
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "EOF after Abandon");

    // Another command than PageFault on a new channel: Error, and closed.
    let (vm2, mut s2, _) = channel_vm(&client, &dir, false);
    wire::write_request(&mut s2, Request::new(Command::State, 0)).unwrap();
    assert_eq!(
        wire::read_response(&mut s2).unwrap().status(),
        Status::Error
    );
    assert_eq!(s2.read_to_end(&mut rest).unwrap(), 0);
    // A request split into single bytes is still one request.
    let (_vm3, mut s3, _) = channel_vm(&client, &dir, false);
    let mut msg = Request::page_fault().encode().to_vec();
    msg.extend_from_slice(
        &MemoryRange {
            gpa: 0,
            length: PAGE,
        }
        .encode(),
    );
    for b in msg {
        s3.write_all(&[b]).unwrap();
    }
    assert_eq!(wire::read_response(&mut s3).unwrap().status(), Status::Ok);
    // The VM is not attached twice.
    let (_, extra) = UnixStream::pair().unwrap();
    assert!(client
        .attach_channel(vm2.vm_id, extra.as_fd(), ChannelProtocol::CloudHypervisor)
        .is_err());
    // A fault channel needs memory the daemon owns.
    let own = client
        .create_vm(VmSpec {
            regions: vec![RegionSpec::new(0, 1 << 20, 0)],
            memory_in_vmm: true,
            ..Default::default()
        })
        .unwrap();
    assert!(client
        .attach_channel(own.vm_id, extra.as_fd(), ChannelProtocol::CloudHypervisor)
        .is_err());
}

#[test]
fn demand_requests_are_recorded_and_the_background_pull_is_not() {
    let dir = TestDir::new("chan-record");
    let d = daemon(&dir);
    let client = Client::connect(d.socket_path()).unwrap();
    let (vm, mut s, _) = channel_vm(&client, &dir, true);
    // cloud-hypervisor walks its ranges in table order (the snapshot's order: slot 1 first, at
    // snapshot offset 0), asking for the first page it has not asked for yet.
    let background = |s: &mut UnixStream, page: u64| {
        assert_eq!(
            page_fault(s, (1 << 20) + page * PAGE, PAGE).status(),
            Status::Ok
        )
    };
    background(&mut s, 0);
    background(&mut s, 1);
    // Demand faults anywhere else.
    assert_eq!(page_fault(&mut s, 7 * PAGE, PAGE).status(), Status::Ok);
    assert_eq!(
        page_fault(&mut s, (1 << 20) + 40 * PAGE, PAGE).status(),
        Status::Ok
    );
    background(&mut s, 2);
    // The walk skips what was asked already.
    for p in 3..40 {
        background(&mut s, p);
    }
    background(&mut s, 41);
    assert_eq!(page_fault(&mut s, 9 * PAGE, PAGE).status(), Status::Ok);
    let ws = client.working_set(vm.vm_id).unwrap();
    let pages: Vec<u64> = ws.iter().map(|e| e.page.get()).collect();
    // Source pages: slot 0 starts at snapshot page 64, slot 1 at 0.
    assert_eq!(pages, vec![64 + 7, 40, 64 + 9]);
}
