//! Every blocking wait of a VMM on vmpagerd has a defined outcome when the daemon dies or frees
//! the VM: the restart path, or an error within a bounded time; never "waits forever"
//! (DESIGN.md §9; the table in docs/survival.md). The waits covered elsewhere: a fault and a
//! mailbox exchange across a restart, and after a loss (tests/survival.rs); the daemon's side
//! of a VMM that dies (tests/sessions.rs, tests/daemon_robustness.rs).

mod common;

use common::*;
use std::sync::mpsc;
use std::time::Duration;
use vmpager_client::{
    Client, ClientError, ClientOptions, LinkState, PageSource, PopulateMethod, RegionSpec, Request,
    RequestKind, VmSpec, WaitPolicy,
};
use vmpager_protocol::mailbox::MailboxError;

const PAGE: u64 = 4096;
/// How long a test waits for something that must happen before it calls it a hang.
const HANG: Duration = Duration::from_secs(60);

fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG)
        .unwrap_or_else(|_| panic!("{what} hung"))
}

fn spec() -> VmSpec {
    VmSpec {
        regions: vec![RegionSpec::new(1 << 32, 256 * PAGE, 0)],
        source: PageSource::Zero,
        populate: PopulateMethod::Copy,
        ..Default::default()
    }
}

fn fault_request() -> Request {
    Request {
        kind: RequestKind::MemoryFault,
        gpa: 1 << 32,
        size: PAGE,
        private: false,
    }
}

/// A vCPU that forwards an exit of a VM the daemon has freed gets `Closed` at once (it used to
/// wait forever: the daemon was alive, so its liveness said nothing).
#[test]
fn a_vcpu_of_a_freed_vm_gets_an_error_not_a_wait() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("nohang-freed");
    let d = vmpagerd::spawn(vmpagerd::Config::default(), &dir.join("d.sock")).unwrap();
    let client = Client::connect(d.socket_path()).unwrap();
    let vm = client.create_vm(spec()).unwrap();
    let exits = client.open_mailbox(vm.vm_id, 1).unwrap();
    let mut channel = exits.channel(0, WaitPolicy::default()).unwrap();
    channel.exchange(fault_request()).unwrap();
    client.detach(vm.vm_id).unwrap();
    let e = within("an exchange after Detach", move || {
        channel.exchange(fault_request())
    })
    .unwrap_err();
    assert!(matches!(e, MailboxError::Closed), "{e}");
    assert!(e.peer_gone());
}

/// A request in flight when the daemon dies: an idempotent one (stats) is sent again to the
/// next daemon and answered; any other ends with `Interrupted` once the VMs are back.
#[test]
fn a_request_in_flight_when_the_daemon_dies_is_resent_or_reported() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("nohang-request");
    let socket = dir.join("vmpagerd.sock");
    let daemon = SocketDaemon::start(&socket, &[]);
    let client = std::sync::Arc::new(Client::connect(&socket).unwrap());
    let vm = client.create_vm(spec()).unwrap();
    let id = vm.vm_id;
    daemon.signal(rustix::process::Signal::STOP);
    let (c1, c2) = (client.clone(), client.clone());
    let stats = std::thread::spawn(move || c1.stats(id));
    let mailbox = std::thread::spawn(move || c2.open_mailbox(id, 1).map(drop));
    daemon.kill9();
    let _again = SocketDaemon::start(&socket, &[]);
    let stats = within("GetStats across a restart", move || stats.join().unwrap());
    assert_eq!(stats.unwrap().vm_id, id);
    match within("OpenMailbox across a restart", move || {
        mailbox.join().unwrap()
    }) {
        // Sent after the VMs were back (the two requests raced for the connection): fine.
        Ok(()) => {}
        Err(e) => assert!(matches!(e, ClientError::Interrupted), "{e}"),
    }
}

/// A listener of conversion events learns that the daemon died: an error, not a wait.
#[test]
fn a_subscription_ends_with_an_error_when_the_daemon_dies() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("nohang-subscribe");
    let socket = dir.join("vmpagerd.sock");
    let daemon = SocketDaemon::start(&socket, &[]);
    let client = Client::connect(&socket).unwrap();
    let vm = client.create_vm(spec()).unwrap();
    let sub = Client::connect(&socket)
        .unwrap()
        .subscribe(vm.vm_id, vm.token)
        .unwrap();
    let waiting = std::thread::spawn(move || sub.next_event());
    daemon.kill9();
    let e = within("a subscriber's wait", move || waiting.join().unwrap()).unwrap_err();
    assert!(e.peer_gone(), "{e}");
}

/// A listening socket that outlives the daemon (socket activation, `--fd`) accepts a
/// reconnecting client and never answers: the client gives up at its deadline, it does not wait
/// in that connection forever.
#[test]
fn a_socket_nobody_serves_does_not_hold_the_client_past_its_deadline() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("nohang-backlog");
    let socket = dir.join("vmpagerd.sock");
    let daemon = SocketDaemon::start(&socket, &[]);
    let client = Client::connect_with(
        &socket,
        ClientOptions {
            restart_deadline: Duration::from_secs(1),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let vm = client.create_vm(spec()).unwrap();
    daemon.kill9();
    // Something listens where the daemon was, and never accepts.
    let _ = std::fs::remove_file(&socket);
    let sock = rustix::net::socket(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        None,
    )
    .unwrap();
    rustix::net::bind(&sock, &rustix::net::SocketAddrUnix::new(&socket).unwrap()).unwrap();
    rustix::net::listen(&sock, 16).unwrap();
    let client = std::sync::Arc::new(client);
    let c = client.clone();
    let e = within("a request with a mute listener", move || c.stats(vm.vm_id)).unwrap_err();
    assert!(matches!(e, ClientError::DaemonLost(_)), "{e}");
    assert!(matches!(client.link_state(), LinkState::Lost(_)));
}

/// The VMM unmapping part of its guest memory while the daemon is away: `munmap` returns (the
/// client reads the UNMAP event), and the daemon that comes back serves the rest.
#[test]
fn munmap_with_no_daemon_returns() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("nohang-munmap");
    let socket = dir.join("vmpagerd.sock");
    let daemon = SocketDaemon::start(&socket, &[]);
    let client = Client::connect(&socket).unwrap();
    let memory = client.create_mapped_vm(spec()).unwrap();
    let base = memory.regions()[0].host_addr().as_ptr() as usize;
    daemon.kill9();
    let last = base + 255 * PAGE as usize;
    within("munmap with no daemon", move || {
        // SAFETY: the last page of the live guest mapping, which no Rust reference covers; the
        // mapping's owner unmaps the whole range later, which is fine for an unmapped page.
        unsafe { rustix::mm::munmap(last as *mut std::ffi::c_void, PAGE as usize) }.unwrap()
    });
    let _again = SocketDaemon::start(&socket, &[]);
    let first = within("a fault after the restart", move || {
        // SAFETY: the first page of the live guest mapping; a read that faults to the daemon.
        unsafe { (base as *const u64).read_volatile() }
    });
    assert_eq!(first, 0);
    client.detach(memory.vm_id()).unwrap();
}
