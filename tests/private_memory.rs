//! Private memory on this host, for everything it can do for real (DESIGN.md §8): guest_memfd
//! created by the daemon through the VMM's VM fd, mmap and hole punching; exits forwarded over
//! the mailbox and answered after the policy and the conversion; listeners notified; the shared
//! side of a private page poisoned. This host has no KVM_SET_MEMORY_ATTRIBUTES, so the daemon
//! runs with `emulate_attributes` and says so in its stats; real attributes and real exits are
//! covered by the CoCo rig (`tests/coco/run`).

mod common;

use common::*;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use vmpager_client::demo::PatternGen;
use vmpager_client::{
    Client, ClientError, PageSource, RegionSpec, Request, RequestKind, Status, VmMemory, VmSpec,
    VmType, WaitPolicy,
};
use vmpager_protocol::mailbox::RETRY_ZAP_SHARED;
use vmpager_protocol::ErrorCode;
use vmpagerd::{policy::Policy, Config, DaemonHandle};

const PAGE: u64 = 4096;
const GPA: u64 = 4 << 30;
const SIZE: u64 = 64 * PAGE;
/// Codes from `vmpagerd::convert::codes`.
use vmpagerd::convert::codes;

fn daemon(dir: &TestDir, emulate: bool) -> DaemonHandle {
    let policy = Policy::parse(
        r#"
[policy]
implicit_conversions = true

[[policy.rule]]
start = 0x100030000   # GPA + 48 pages: an MMIO-like window
size = 0x4000
mode = "shared-only"
"#,
    )
    .unwrap();
    let config = Config {
        workers: 2,
        emulate_attributes: emulate,
        policy,
        ..Config::default()
    };
    vmpagerd::spawn(config, &dir.join("d.sock")).unwrap()
}

/// A KVM VM fd (default type: the only one this host can create).
fn vm_fd() -> OwnedFd {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    // SAFETY: `into_raw_fd`-like: VmFd owns the fd; we take it over and forget the VmFd.
    let fd = vm.as_raw_fd();
    let owned = rustix::io::dup(
        // SAFETY: `fd` is open for the duration of this call (owned by `vm`).
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
    )
    .unwrap();
    drop(vm);
    owned
}

fn private_spec(policy: Option<&str>) -> VmSpec {
    VmSpec {
        regions: vec![RegionSpec::new(GPA, SIZE, 0).private()],
        source: PageSource::Zero,
        vm_type: VmType::SwProtected,
        vm_fd: Some(vm_fd()),
        policy: policy.map(str::to_owned),
        ..Default::default()
    }
}

fn hypercall(gpa: u64, size: u64, private: bool) -> Request {
    Request {
        kind: RequestKind::MapGpaRange,
        gpa,
        size,
        private,
    }
}

/// Reads one byte of the VMM's mapping with process_vm_readv: the kernel's own access (a
/// uffd fault the daemon serves, like KVM's), where a poisoned page fails with EFAULT instead
/// of raising SIGBUS in the test.
fn probe(vm: &VmMemory, offset: u64) -> Result<u8, std::io::Error> {
    let mut b = [0u8; 1];
    let addr = vm.regions()[0].host_addr().as_ptr() as u64 + offset;
    let local = libc::iovec {
        iov_base: b.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: `local` points at a live 1-byte buffer; the remote side is only read by the
    // kernel, which validates it.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    if n != 1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(b[0])
}

#[test]
fn private_vm_types_need_memory_attributes_or_the_explicit_emulation() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("noattr");
    let d = daemon(&dir, false);
    let client = Client::connect(d.socket_path()).unwrap();
    match client.create_vm(private_spec(None)) {
        Err(ClientError::Refused {
            code: ErrorCode::Unsupported,
            text,
        }) => {
            assert!(text.contains("--emulate-attributes"), "{text}")
        }
        other => panic!("{other:?}"),
    }
    // sev/sev-es are encrypted but never private: no region may ask for private memory.
    let sev = VmSpec {
        regions: vec![RegionSpec::new(GPA, SIZE, 0).private()],
        vm_type: VmType::Sev,
        vm_fd: Some(vm_fd()),
        ..Default::default()
    };
    assert!(matches!(
        client.create_vm(sev),
        Err(ClientError::Refused {
            code: ErrorCode::InvalidRegions,
            ..
        })
    ));
}

#[test]
fn sev_memory_is_never_converted() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("sev");
    let d = daemon(&dir, true);
    let client = Client::connect(d.socket_path()).unwrap();
    let vm = client
        .create_mapped_vm(VmSpec {
            regions: vec![RegionSpec::new(GPA, SIZE, 0)],
            vm_type: VmType::Sev,
            ..Default::default()
        })
        .unwrap();
    let exits = client.open_mailbox(vm.vm_id(), 1).unwrap();
    let mut ch = exits.channel(0, WaitPolicy::default()).unwrap();
    let r = ch.exchange(hypercall(GPA, PAGE, true)).unwrap();
    assert_eq!(
        (r.status, r.code),
        (Status::Denied, codes::NO_PRIVATE_MEMORY)
    );
    assert_eq!(r.ret, (-(libc::EPERM as i64)) as u64);
    // To shared: nothing to do, success (QEMU's semantics).
    assert_eq!(
        ch.exchange(hypercall(GPA, PAGE, false)).unwrap().status,
        Status::Retry
    );
}

#[test]
fn guest_memfd_is_created_mappable_and_punchable() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("gmem");
    let d = daemon(&dir, true);
    let client = Client::connect(d.socket_path()).unwrap();
    let created = client.create_vm(private_spec(None)).unwrap();
    let gmem = created.guest_memfds[0]
        .as_ref()
        .expect("a guest_memfd for the private region");
    // It is a guest_memfd of the region's size.
    let link = std::fs::read_link(format!("/proc/self/fd/{}", gmem.as_raw_fd())).unwrap();
    assert!(link.to_string_lossy().contains("kvm-gmem"), "{link:?}");
    assert_eq!(rustix::fs::fstat(gmem).unwrap().st_size as u64, SIZE);
    // The host writes through its mmap (GUEST_MEMFD_FLAG_MMAP on this host), punching discards.
    // SAFETY: a fresh shared mapping of the guest_memfd, unmapped below.
    let p = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            SIZE as usize,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            gmem,
            0,
        )
    }
    .expect("guest_memfd mmap (needs GUEST_MEMFD_FLAG_MMAP)");
    let bytes = p.cast::<u8>();
    // SAFETY: inside the mapping.
    unsafe {
        bytes.add(5 * PAGE as usize).write_volatile(0xa5);
        bytes.add(6 * PAGE as usize).write_volatile(0x5a);
    }
    let file = std::fs::File::from(gmem.try_clone().unwrap());
    vmpagerd::guest_memfd::punch_hole(&file, 5 * PAGE, PAGE).unwrap();
    // SAFETY: inside the mapping.
    unsafe {
        assert_eq!(bytes.add(5 * PAGE as usize).read_volatile(), 0);
        assert_eq!(bytes.add(6 * PAGE as usize).read_volatile(), 0x5a);
        rustix::mm::munmap(p, SIZE as usize).unwrap();
    }
}

#[test]
fn conversions_follow_the_policy_discard_the_other_side_and_notify() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("convert");
    let d = daemon(&dir, true);
    let client = Client::connect(d.socket_path()).unwrap();
    // A snapshot so that "discarded" is distinguishable from "never touched".
    let img = image(&dir, "img", SIZE, 31);
    let mut snapshot = vec![0u8; SIZE as usize];
    PatternGen::new(31).fill(&mut snapshot);
    let created = client
        .create_vm(VmSpec {
            source: PageSource::File(img),
            ..private_spec(None)
        })
        .unwrap();
    let (vm_id, token) = (created.vm_id, created.token);
    let vm = VmMemory::map(created).unwrap();
    client
        .attach_uffd(vm_id, vm.uffd(), &vm.host_addrs())
        .unwrap();
    // A device backend listens on its own connection.
    let listener = Client::connect(d.socket_path())
        .unwrap()
        .subscribe(vm_id, token)
        .unwrap();
    assert!(matches!(
        Client::connect(d.socket_path())
            .unwrap()
            .subscribe(vm_id, token ^ 1),
        Err(ClientError::Refused {
            code: ErrorCode::UnknownVm,
            ..
        })
    ));
    let exits = client.open_mailbox(vm_id, 2).unwrap();
    let mut ch = exits.channel(1, WaitPolicy::default()).unwrap();

    // Shared data first: pages 2..4 populated from the snapshot through the VMM's mapping.
    assert_eq!(probe(&vm, 2 * PAGE).unwrap(), snapshot[2 * PAGE as usize]);
    assert_eq!(probe(&vm, 3 * PAGE).unwrap(), snapshot[3 * PAGE as usize]);

    // The guest converts pages 2..4 to private (explicit).
    let r = ch
        .exchange(hypercall(GPA + 2 * PAGE, 2 * PAGE, true))
        .unwrap();
    assert_eq!((r.status, r.ret), (Status::Retry, 0));
    let e = listener.next_event().unwrap();
    assert_eq!(
        (e.vm_id, e.gpa, e.size, e.to_private),
        (vm_id, GPA + 2 * PAGE, 2 * PAGE, true)
    );
    // The shared backing is gone from the memfd...
    let mut page = vec![0xffu8; PAGE as usize];
    rustix::io::pread(vm.regions()[0].memfd(), &mut page, 2 * PAGE).unwrap();
    assert!(page.iter().all(|&b| b == 0));
    // ...and the shared side of a private page is poisoned, never served with data.
    assert!(probe(&vm, 2 * PAGE).is_err());
    assert!(probe(&vm, 3 * PAGE).is_err());
    assert_eq!(probe(&vm, 4 * PAGE).unwrap(), snapshot[4 * PAGE as usize]);

    // Private data lives in the guest_memfd (written here through its mmap; guest_memfds
    // have no write(2)); converting back to shared discards it.
    let gmem = vm.regions()[0].guest_memfd().unwrap();
    // SAFETY: a fresh shared mapping of the guest_memfd, unmapped at the end of the test.
    let gmap = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            SIZE as usize,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            gmem,
            0,
        )
    }
    .unwrap()
    .cast::<u8>();
    // SAFETY: inside the mapping.
    unsafe { gmap.add(2 * PAGE as usize).write_volatile(0x77) };
    // The VMM touched pages 2..4 while private, so the answer says its mapping holds poison
    // markers there, and forward_exit drops them.
    let r = vm
        .forward_exit(&mut ch, hypercall(GPA + 2 * PAGE, 2 * PAGE, false))
        .unwrap();
    assert_eq!((r.status, r.code), (Status::Retry, RETRY_ZAP_SHARED));
    let e = listener.next_event().unwrap();
    assert!(!e.to_private);
    // SAFETY: inside the mapping.
    let after = unsafe { gmap.add(2 * PAGE as usize).read_volatile() };
    assert_eq!(
        after, 0,
        "private contents discarded on conversion to shared"
    );
    // SAFETY: the mapping made above, no longer used.
    unsafe { rustix::mm::munmap(gmap.cast(), SIZE as usize) }.unwrap();
    // Shared again: the page reads as zeros, never the old snapshot bytes.
    assert_eq!(probe(&vm, 2 * PAGE).unwrap(), 0);
    let mut shared = vec![0xffu8; PAGE as usize];
    rustix::io::pread(vm.regions()[0].memfd(), &mut shared, 2 * PAGE).unwrap();
    assert!(shared.iter().all(|&b| b == 0));

    // An implicit conversion (memory-fault exit with the PRIVATE flag) is honoured here.
    let fault = Request {
        kind: RequestKind::MemoryFault,
        gpa: GPA + 10 * PAGE,
        size: PAGE,
        private: true,
    };
    assert_eq!(ch.exchange(fault).unwrap().status, Status::Retry);
    assert!(listener.next_event().unwrap().to_private);
    // Back to shared, never touched by the VMM while private: nothing to zap.
    let back = ch
        .exchange(hypercall(GPA + 10 * PAGE, PAGE, false))
        .unwrap();
    assert_eq!((back.status, back.code), (Status::Retry, 0));
    assert!(!listener.next_event().unwrap().to_private);

    // Refusals: the shared-only window, bad ranges, outside the region.
    let denied = ch.exchange(hypercall(GPA + 48 * PAGE, PAGE, true)).unwrap();
    assert_eq!(
        (denied.status, denied.code, denied.ret),
        (
            Status::Denied,
            codes::POLICY_RULE,
            (-(libc::EPERM as i64)) as u64
        )
    );
    assert_eq!(
        ch.exchange(hypercall(GPA + 48 * PAGE, PAGE, false))
            .unwrap()
            .status,
        Status::Retry
    );
    let bad = ch.exchange(hypercall(GPA + 1, PAGE, true)).unwrap();
    assert_eq!(
        (bad.status, bad.code, bad.ret),
        (
            Status::Denied,
            codes::INVALID,
            (-(libc::EINVAL as i64)) as u64
        )
    );
    let outside = ch
        .exchange(hypercall(GPA + SIZE - PAGE, 2 * PAGE, true))
        .unwrap();
    assert_eq!(
        (outside.status, outside.code),
        (Status::Denied, codes::NOT_IN_ONE_REGION)
    );

    let s = client.stats(vm_id).unwrap();
    assert_eq!(
        s.attributes_emulated, 1,
        "stats say the attributes are emulated"
    );
    assert_eq!((s.hypercall_exits, s.memory_fault_exits), (7, 1));
    assert_eq!((s.converted_to_private, s.converted_to_shared), (2, 3));
    assert_eq!(s.conversions_denied, 3);
    assert!(s.private_faults_poisoned >= 2, "{s:?}");
}

#[test]
fn per_vm_policy_overrides_the_daemon_policy() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("override");
    let d = daemon(&dir, true);
    let client = Client::connect(d.socket_path()).unwrap();
    let policy = "[policy]\nimplicit_conversions = false\nmax_conversions_per_sec = 2\n";
    let vm = client.create_mapped_vm(private_spec(Some(policy))).unwrap();
    let exits = client.open_mailbox(vm.vm_id(), 1).unwrap();
    let mut ch = exits.channel(0, WaitPolicy::default()).unwrap();
    let fault = Request {
        kind: RequestKind::MemoryFault,
        gpa: GPA,
        size: PAGE,
        private: true,
    };
    let r = ch.exchange(fault).unwrap();
    assert_eq!(
        (r.status, r.code),
        (Status::Denied, codes::IMPLICIT_NOT_ALLOWED)
    );
    // The daemon's rule still applies (the override did not set rules).
    assert_eq!(
        ch.exchange(hypercall(GPA + 48 * PAGE, PAGE, true))
            .unwrap()
            .code,
        codes::POLICY_RULE
    );
    // Rate limit: a burst of 2 per second, then EAGAIN for the guest.
    let results: Vec<_> = (0..3)
        .map(|i| ch.exchange(hypercall(GPA + i * PAGE, PAGE, true)).unwrap())
        .collect();
    assert_eq!(results[0].status, Status::Retry);
    assert_eq!(results[1].status, Status::Retry);
    assert_eq!(
        (results[2].status, results[2].code, results[2].ret),
        (
            Status::Denied,
            codes::RATE_LIMITED,
            (-(libc::EAGAIN as i64)) as u64
        )
    );
    // A malformed override is refused at CreateVm.
    assert!(matches!(
        client.create_vm(private_spec(Some("[policy]\nbogus = 1\n"))),
        Err(ClientError::Refused {
            code: ErrorCode::BadMessage,
            ..
        })
    ));
    let _ = vm.uffd().as_fd();
}

#[test]
fn a_real_vcpu_runs_on_a_guest_memfd_memslot() {
    if !have_kvm() {
        return;
    }
    use vmpager_client::refvmm::{checksum_words, GuestRegion, RefVm, Task, Workload};
    // A default VM (the only type this host has) whose RAM slot is also bound to a guest_memfd
    // (created by the VMM: GUEST_MEMFD_FLAG_MMAP|INIT_SHARED on this host, so the slot's
    // memory *is* the guest_memfd's shared pages).
    let size: u64 = 2 << 20;
    // SAFETY: a fresh anonymous mapping for the slot's userspace address, unmapped at the end.
    let anon = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            size as usize,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE,
        )
    }
    .unwrap();
    let region = GuestRegion {
        gpa: GPA,
        host_addr: std::ptr::NonNull::new(anon.cast()).unwrap(),
        size,
    };
    // SAFETY: the mapping outlives `rvm` (unmapped after it is dropped).
    let rvm = unsafe { RefVm::new_with_guest_memfds(&[region], &[true], 1) }.unwrap();
    let gmem = rvm.guest_memfd(0).expect("a guest_memfd");
    // SAFETY: a fresh shared mapping of the guest_memfd, unmapped at the end.
    let host = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            size as usize,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            gmem,
            0,
        )
    }
    .unwrap()
    .cast::<u8>();
    let mut content = vec![0u8; size as usize];
    PatternGen::new(41).fill(&mut content);
    // SAFETY: `host` maps `size` bytes; nothing else references them.
    unsafe { std::ptr::copy_nonoverlapping(content.as_ptr(), host, size as usize) };
    let task = Task {
        workload: Workload::Checksum,
        gpa_start: GPA,
        gpa_end: GPA + size,
    };
    let before = rvm.run(&[vec![task]]).unwrap()[0].results[0].value;
    assert_eq!(
        before,
        checksum_words(&content),
        "the vCPU reads the guest_memfd's pages"
    );
    // Punching the guest_memfd discards pages under the running VM: the guest reads zeros.
    let file = std::fs::File::from(gmem.try_clone_to_owned().unwrap());
    vmpagerd::guest_memfd::punch_hole(&file, 0, size).unwrap();
    let after = rvm.run(&[vec![task]]).unwrap()[0].results[0].value;
    assert_eq!(after, 0);
    drop(rvm);
    // SAFETY: the mappings made above, no longer used.
    unsafe {
        rustix::mm::munmap(host.cast(), size as usize).unwrap();
        rustix::mm::munmap(anon, size as usize).unwrap();
    }
}
