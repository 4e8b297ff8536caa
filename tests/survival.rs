//! vmpagerd killed with SIGKILL while it serves a VM, then started again with the same command
//! line: the VM goes on with every byte it had and every byte it wrote; nothing in the VMM
//! blocks meanwhile; and a daemon that does not come back fails the VM loudly, never with zeros
//! and never with a hang (docs/survival.md).

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;
use vmpager_client::demo::PatternGen;
use vmpager_client::{
    Client, ClientError, ClientOptions, LinkState, MappedRegion, PageSource, PopulateMethod,
    RegionSpec, Request, RequestKind, VmSpec, WaitPolicy,
};

const PAGE: usize = 4096;
const PAGES: usize = 2048;
/// How long a test waits for something that must happen before it calls it a hang.
const HANG: Duration = Duration::from_secs(60);

fn snapshot(seed: u64) -> Vec<u8> {
    let mut s = vec![0u8; PAGES * PAGE];
    PatternGen::new(seed).fill(&mut s);
    s
}

fn spec(image: std::fs::File, populate: PopulateMethod) -> VmSpec {
    VmSpec {
        regions: vec![RegionSpec::new(1 << 32, (PAGES * PAGE) as u64, 0)],
        source: PageSource::File(image),
        populate,
        ..Default::default()
    }
}

fn addr(r: &MappedRegion, page: usize) -> usize {
    r.host_addr().as_ptr() as usize + page * PAGE
}

fn read_page(at: usize) -> Vec<u8> {
    (0..PAGE)
        // SAFETY: `at` is a page of a live mapping of guest memory; no Rust reference to it
        // exists, and a volatile read may fault to the daemon (the point of these tests).
        .map(|i| unsafe { ((at + i) as *const u8).read_volatile() })
        .collect()
}

fn write_mark(at: usize, page: usize) {
    // SAFETY: as in `read_page`; the test thread is the only writer of this page.
    unsafe { ((at) as *mut u64).write_volatile(0xfeed_0000_0000 | page as u64) }
}

fn marked(page: usize) -> bool {
    page % 4 == 1
}

/// What page `page` must hold: the snapshot, with the mark on marked pages.
fn expected(snap: &[u8], page: usize) -> Vec<u8> {
    let mut want = snap[page * PAGE..(page + 1) * PAGE].to_vec();
    if marked(page) {
        want[..8].copy_from_slice(&(0xfeed_0000_0000u64 | page as u64).to_ne_bytes());
    }
    want
}

/// Runs `f` on a thread; panics if it has not returned within [`HANG`].
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG)
        .unwrap_or_else(|_| panic!("{what} hung"))
}

fn restart_keeps_every_byte(populate: PopulateMethod, name: &str) {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new(name);
    let socket = dir.join("vmpagerd.sock");
    let daemon = SocketDaemon::start(&socket, &[]);
    let client = Client::connect(&socket).unwrap();
    let snap = snapshot(21);
    let img = image(&dir, "img", (PAGES * PAGE) as u64, 21);
    let memory = client.create_mapped_vm(spec(img, populate)).unwrap();
    let vm_id = memory.vm_id();
    let base = addr(&memory.regions()[0], 0);
    // The guest's first half: read every page, mark some.
    for p in 0..PAGES / 2 {
        assert_eq!(read_page(base + p * PAGE), snap[p * PAGE..(p + 1) * PAGE]);
        if marked(p) {
            write_mark(base + p * PAGE, p);
        }
    }
    // Faults in flight: the daemon is stopped, a thread faults on a page it will never
    // answer (far from the first half, so no readahead brought it in); then it dies.
    let far = PAGES - 32;
    daemon.signal(rustix::process::Signal::STOP);
    let (tx, rx) = mpsc::channel();
    let toucher = std::thread::spawn(move || {
        let p = far;
        let got = read_page(base + p * PAGE);
        let _ = tx.send(());
        got
    });
    daemon.kill9();
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "a fault was answered with no daemon"
    );
    // Nothing in the VMM blocks meanwhile: a balloon-style remove of pages the guest never
    // touched returns (the client reads the REMOVE) ...
    let removed = PAGES - 16..PAGES;
    let at = base + removed.start * PAGE;
    within("madvise(MADV_REMOVE) with no daemon", move || {
        // SAFETY: the range is inside the live guest mapping; no Rust reference to it exists.
        unsafe {
            rustix::mm::madvise(
                at as *mut std::ffi::c_void,
                removed.len() * PAGE,
                rustix::mm::Advice::LinuxRemove,
            )
        }
        .unwrap()
    });
    // ... and the client's requests wait for the daemon.
    assert!(matches!(client.link_state(), LinkState::Away { .. }));
    // The supervisor restarts it with the same command line.
    let _daemon = SocketDaemon::start(&socket, &[]);
    let first = toucher.join().unwrap();
    assert_eq!(first, expected(&snap, far));
    // The rest of the guest's run, then every byte checked.
    for p in PAGES / 2..PAGES - 16 {
        if marked(p) {
            write_mark(base + p * PAGE, p);
        }
    }
    for p in 0..PAGES - 16 {
        assert_eq!(read_page(base + p * PAGE), expected(&snap, p), "page {p}");
    }
    for p in PAGES - 16..PAGES {
        assert_eq!(
            read_page(base + p * PAGE),
            vec![0; PAGE],
            "removed page {p} must read as zeros, never as snapshot content"
        );
    }
    let stats = client.stats(vm_id).unwrap();
    assert!(stats.faults > 0, "the new daemon served faults");
    assert_eq!(client.restarts(), 1);
    assert_eq!(client.link_state(), LinkState::Up);
    client.detach(vm_id).unwrap();
}

#[test]
fn a_killed_daemon_restarted_keeps_every_byte_copy() {
    restart_keeps_every_byte(PopulateMethod::Copy, "survive-copy");
}

#[test]
fn a_killed_daemon_restarted_keeps_every_byte_continue() {
    restart_keeps_every_byte(PopulateMethod::Continue, "survive-continue");
}

#[test]
fn a_mailbox_exchange_in_flight_is_answered_by_the_next_daemon() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("survive-mailbox");
    let socket = dir.join("vmpagerd.sock");
    let daemon = SocketDaemon::start(&socket, &[]);
    let client = Client::connect(&socket).unwrap();
    let img = image(&dir, "img", (PAGES * PAGE) as u64, 5);
    let memory = client
        .create_mapped_vm(spec(img, PopulateMethod::Copy))
        .unwrap();
    let exits = client.open_mailbox(memory.vm_id(), 1).unwrap();
    let mut channel = exits.channel(0, WaitPolicy::default()).unwrap();
    let request = Request {
        kind: RequestKind::MemoryFault,
        gpa: 1 << 32,
        size: PAGE as u64,
        private: false,
    };
    let before = channel.exchange(request).unwrap();
    // The daemon is stopped first: the exchange, posted before or after its death, is one
    // it never answers.
    daemon.signal(rustix::process::Signal::STOP);
    let vcpu = std::thread::spawn(move || channel.exchange(request));
    daemon.kill9();
    let _daemon = SocketDaemon::start(&socket, &[]);
    let after = within("the vCPU's exchange", move || vcpu.join().unwrap()).unwrap();
    assert_eq!(after, before, "the same answer from the next daemon");
    // Requests wait until every VM is handed back.
    client.stats(memory.vm_id()).unwrap();
    assert_eq!(client.restarts(), 1);
}

#[test]
fn a_daemon_that_does_not_come_back_fails_the_vm_with_an_error_never_a_hang() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("survive-lost");
    let socket = dir.join("vmpagerd.sock");
    let daemon = SocketDaemon::start(&socket, &[]);
    let client = Client::connect_with(
        &socket,
        ClientOptions {
            restart_deadline: Duration::from_millis(500),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let img = image(&dir, "img", (PAGES * PAGE) as u64, 9);
    let memory = client
        .create_mapped_vm(spec(img, PopulateMethod::Copy))
        .unwrap();
    let exits = client.open_mailbox(memory.vm_id(), 1).unwrap();
    let mut channel = exits.channel(0, WaitPolicy::default()).unwrap();
    daemon.kill9();
    // The link is lost once the deadline passes: the fd says so, requests and the mailbox
    // fail with a clear error.
    let lost = client.lost_fd().try_clone_to_owned().unwrap();
    within("the lost fd", move || {
        let mut fds = [rustix::event::PollFd::new(
            &lost,
            rustix::event::PollFlags::IN,
        )];
        rustix::event::poll(&mut fds, None).unwrap();
    });
    assert!(matches!(client.link_state(), LinkState::Lost(_)));
    let e = client.stats(memory.vm_id()).unwrap_err();
    assert!(matches!(e, ClientError::DaemonLost(_)), "{e}");
    assert!(e.to_string().contains("did not come back"), "{e}");
    let request = Request {
        kind: RequestKind::MemoryFault,
        gpa: 1 << 32,
        size: PAGE as u64,
        private: false,
    };
    let e = within("a mailbox exchange", move || channel.exchange(request)).unwrap_err();
    assert!(e.peer_gone(), "{e}");
    // A thread that touches memory nobody serves gets SIGBUS (a VMM's vCPU: an error exit),
    // never zeros and never a hang: checked in a child process, which the signal kills.
    let status = within("the child touching lost memory", || {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "touch_lost_memory_in_a_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("VMPAGER_SURVIVAL_CHILD", "1")
            .output()
            .unwrap()
    });
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.status.signal(),
        Some(libc::SIGBUS),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
}

/// Run only as the child of the test above: a VM whose daemon dies and does not come back;
/// touching an untouched page must kill this process with SIGBUS.
#[test]
fn touch_lost_memory_in_a_child() {
    if std::env::var_os("VMPAGER_SURVIVAL_CHILD").is_none() || !have_uffd() {
        return;
    }
    let dir = TestDir::new(&format!("survive-child-{}", std::process::id()));
    let socket: PathBuf = dir.join("vmpagerd.sock");
    let daemon = SocketDaemon::start(&socket, &[]);
    let client = Client::connect_with(
        &socket,
        ClientOptions {
            restart_deadline: Duration::from_millis(200),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let img = image(&dir, "img", (PAGES * PAGE) as u64, 3);
    let memory = client
        .create_mapped_vm(spec(img, PopulateMethod::Copy))
        .unwrap();
    daemon.kill9();
    let lost = client.lost_fd();
    let mut fds = [rustix::event::PollFd::new(
        &lost,
        rustix::event::PollFlags::IN,
    )];
    rustix::event::poll(&mut fds, None).unwrap();
    eprintln!("link lost: touching an unserved page");
    let page = read_page(addr(&memory.regions()[0], 7));
    // Reaching this line means the touch was answered: with zeros or anything, it is wrong.
    eprintln!("touch answered with {:?}", &page[..8]);
    std::process::exit(3);
}

/// SIGTERM with a VM attached and running: the daemon exits at once and says what becomes of
/// the VM (its VMM keeps it for the next daemon), and the next daemon takes it back.
#[test]
fn sigterm_says_what_becomes_of_the_vms_and_a_restart_takes_them_back() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("survive-sigterm");
    let socket = dir.join("vmpagerd.sock");
    let notify = NotifySocket::new(dir.join("notify"));
    let daemon = Command::new(vmpagerd_binary())
        .arg("--socket-path")
        .arg(&socket)
        .env("VMPAGER_LOG", "warn")
        .env("NOTIFY_SOCKET", &notify.path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    notify.until("READY=1");
    let client = Client::connect(&socket).unwrap();
    let snap = snapshot(4);
    let img = image(&dir, "img", (PAGES * PAGE) as u64, 4);
    let memory = client
        .create_mapped_vm(spec(img, PopulateMethod::Copy))
        .unwrap();
    let base = addr(&memory.regions()[0], 0);
    assert_eq!(read_page(base), snap[..PAGE]);
    let pid = rustix::process::Pid::from_raw(daemon.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let out = daemon.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("shutting down: 1 VMs stop being served; their VMMs keep their memory"),
        "{stderr}"
    );
    let _again = SocketDaemon::start(&socket, &[]);
    for p in 0..PAGES {
        assert_eq!(read_page(base + p * PAGE), snap[p * PAGE..(p + 1) * PAGE]);
    }
    client.stats(memory.vm_id()).unwrap();
    assert_eq!(client.restarts(), 1);
}

/// A conversion to private in flight when the daemon dies (emulated memory attributes: this
/// host's KVM has none) is done by the next daemon, and the attributes survive: the converted
/// pages are private after the restart (their shared side is poisoned, never served), the
/// others still shared.
#[test]
fn a_conversion_in_flight_is_done_by_the_next_daemon_and_attributes_survive() {
    use std::os::fd::AsRawFd;
    use vmpager_client::{Status, VmType};
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("survive-convert");
    let socket = dir.join("vmpagerd.sock");
    let args = ["--emulate-attributes"];
    let daemon = SocketDaemon::start(&socket, &args);
    let client = Client::connect(&socket).unwrap();
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    // SAFETY: `vm` owns the fd and outlives this borrow.
    let vm_fd =
        rustix::io::dup(unsafe { std::os::fd::BorrowedFd::borrow_raw(vm.as_raw_fd()) }).unwrap();
    let gpa = 4u64 << 30;
    let memory = client
        .create_mapped_vm(VmSpec {
            regions: vec![RegionSpec::new(gpa, 64 * PAGE as u64, 0).private()],
            source: PageSource::Zero,
            vm_type: VmType::SwProtected,
            vm_fd: Some(vm_fd),
            ..Default::default()
        })
        .unwrap();
    let exits = client.open_mailbox(memory.vm_id(), 1).unwrap();
    let mut channel = exits.channel(0, WaitPolicy::default()).unwrap();
    let to_private = move |at: u64| Request {
        kind: RequestKind::MapGpaRange,
        gpa: gpa + at * PAGE as u64,
        size: 2 * PAGE as u64,
        private: true,
    };
    let before = channel.exchange(to_private(0)).unwrap();
    assert_eq!(before.status, Status::Retry, "{before:?}");
    daemon.signal(rustix::process::Signal::STOP);
    let vcpu = std::thread::spawn(move || channel.exchange(to_private(8)));
    daemon.kill9();
    let _again = SocketDaemon::start(&socket, &args);
    let after = within("the conversion across a restart", move || {
        vcpu.join().unwrap()
    })
    .unwrap();
    assert_eq!(after, before, "the same answer from the next daemon");
    // The shared side of private pages is never served (poisoned: EFAULT for the kernel's
    // access), both those converted before the death and the one in flight; the rest is.
    let probe = |page: u64| {
        let mut b = [0u8; 1];
        let local = libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let remote = libc::iovec {
            iov_base: (memory.regions()[0].host_addr().as_ptr() as u64 + page * PAGE as u64)
                as *mut libc::c_void,
            iov_len: 1,
        };
        // SAFETY: `local` is a live 1-byte buffer; the remote range is only read by the
        // kernel, which validates it.
        unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) == 1 }
    };
    for page in [0, 1, 8, 9] {
        assert!(
            !probe(page),
            "private page {page} was served on the shared side"
        );
    }
    for page in [2, 7, 10, 63] {
        assert!(probe(page), "shared page {page} was not served");
    }
    drop(vm);
}
