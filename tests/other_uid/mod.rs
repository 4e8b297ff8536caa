//! Clients of another uid, for tests/access.rs: that test binary started again as another uid
//! and gid (groups, gid and uid set between fork and exec), doing one role: connect and say
//! hello, try every request on VMs it does not hold, or own a VM until told to check it.

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use vmpager_client::{Client, RegionSpec, VmSpec};
use vmpager_protocol::{
    features, AttachChannel, AttachUffd, ChannelProtocol, Connection, CreateVm, ErrorCode, Hello,
    Message, PageSourceKind, PopulateMethod, ReplayWorkingSet, SocketError, VmSession, VmType,
    PROTOCOL_VERSION,
};

/// The VMs of these tests have one region of `PAGES` pages of `PAGE` bytes at `GPA`.
pub const PAGE: usize = 4096;
/// Pages of the region.
pub const PAGES: usize = 64;
/// Bytes of the region.
pub const SIZE: usize = PAGES * PAGE;
/// Where the region is in guest physical memory.
pub const GPA: u64 = 1 << 32;

/// Set in a child process: what it does (`connect`, `intrude`, `own`).
const ROLE: &str = "VMPAGER_ACCESS_ROLE";
/// The daemon's socket, for a child.
const SOCKET: &str = "VMPAGER_ACCESS_SOCKET";
/// The VMs an intruder tries, `ID:TOKEN,ID:TOKEN`.
const TARGETS: &str = "VMPAGER_ACCESS_TARGETS";

/// Every request that names a VM, in the order an intruder sends them (the two that would
/// end the VM's service last).
const REQUESTS: [&str; 11] = [
    "AttachUffd",
    "AttachChannel",
    "OpenMailbox",
    "GetStats",
    "GetWorkingSet",
    "ReplayWorkingSet",
    "Subscribe",
    "ReattachVm",
    "ReclaimVm",
    "ReleaseVm",
    "Detach",
];

/// Who a child process runs as.
#[derive(Clone, Copy, Debug)]
pub struct Ids {
    /// Its uid.
    pub uid: u32,
    /// Its gid (what SO_PEERCRED reports).
    pub gid: u32,
    /// Supplementary groups.
    pub groups: &'static [u32],
}

/// `nobody`.
pub const NOBODY: Ids = Ids {
    uid: 65534,
    gid: 65534,
    groups: &[],
};

/// The child's work, if this process is one (`VMPAGER_ACCESS_ROLE` is set).
pub fn run_if_child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let socket = PathBuf::from(std::env::var_os(SOCKET).expect("socket path"));
    match role.as_str() {
        "connect" => connect(&socket),
        "intrude" => intrude(&socket),
        "own" => own_a_vm(&socket),
        other => panic!("unknown role {other}"),
    }
}

/// Connects and says hello; prints what the daemon answered.
fn connect(socket: &Path) {
    let conn = match Connection::connect(socket) {
        Ok(c) => c,
        Err(SocketError::Io(e)) => {
            println!(
                "ACCESS cannot connect: errno {}",
                e.raw_os_error().unwrap_or(0)
            );
            return;
        }
        Err(e) => panic!("connect: {e}"),
    };
    match hello(&conn) {
        Ok(()) => println!("ACCESS welcome"),
        Err((code, text)) => println!("ACCESS refused {code:?}: {text}"),
    }
}

fn hello(conn: &Connection) -> Result<(), (ErrorCode, String)> {
    let hello = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        features: features::ALL,
    });
    match conn.request(&hello, &[]).expect("Hello").message {
        Message::Welcome(_) => Ok(()),
        Message::Error(e) => Err((e.code, e.text)),
        other => panic!("{other:?} instead of Welcome"),
    }
}

/// Sends every request of [`REQUESTS`] for each VM of `VMPAGER_ACCESS_TARGETS`, with the
/// VM's token where one is asked for; prints `ACCESS <vm> <request> <answer>`.
fn intrude(socket: &Path) {
    let targets = std::env::var(TARGETS).expect("targets");
    let conn = Connection::connect(socket).expect("connect");
    hello(&conn).expect("an allowed peer is welcomed");
    for target in targets.split(',') {
        let (id, token) = target.split_once(':').expect("ID:TOKEN");
        let (vm_id, token) = (id.parse().unwrap(), token.parse().unwrap());
        for (name, message) in REQUESTS.iter().zip(attempts(vm_id, token)) {
            let fds = fds_for(&message);
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
            let answer = match conn.request(&message, &borrowed) {
                Ok(reply) => match reply.message {
                    Message::Error(e) => format!("{:?}", e.code),
                    other => format!("served-{:?}", other.kind()),
                },
                Err(e) => format!("failed-{e}"),
            };
            println!("ACCESS {vm_id} {name} {answer}");
        }
    }
}

/// The requests of [`REQUESTS`], in that order, for VM `vm_id`.
fn attempts(vm_id: u64, token: u64) -> Vec<Message> {
    let create = CreateVm {
        vm_type: VmType::Default,
        policy: None,
        source_url: None,
        source: PageSourceKind::Zero,
        populate: PopulateMethod::Copy,
        flags: 0,
        regions: vec![RegionSpec::new(GPA, SIZE as u64, 0)],
    };
    vec![
        Message::AttachUffd(AttachUffd {
            vm_id,
            host_addrs: vec![0x7f00_0000_0000],
        }),
        Message::AttachChannel(AttachChannel {
            vm_id,
            protocol: ChannelProtocol::CloudHypervisor,
        }),
        Message::OpenMailbox { vm_id, vcpus: 1 },
        Message::GetStats { vm_id },
        Message::GetWorkingSet { vm_id, from: 0 },
        Message::ReplayWorkingSet(ReplayWorkingSet {
            vm_id,
            pages: vec![0, 1, 2],
        }),
        Message::Subscribe { vm_id, token },
        Message::ReattachVm { vm_id, token },
        Message::ReclaimVm(VmSession {
            vm_id,
            token,
            uffd_modes: 0,
            uffd_features: 0,
            created_flags: 0,
            mailbox_vcpus: 0,
            channel: None,
            host_addrs: Vec::new(),
            create,
        }),
        Message::ReleaseVm { vm_id },
        Message::Detach { vm_id },
    ]
}

/// Fds of this process for `message`, as a VMM would send them: its own uffd, a stream socket
/// for a fault channel, memfds for the memory and state files of a session.
fn fds_for(message: &Message) -> Vec<OwnedFd> {
    match message {
        Message::AttachUffd(_) => vec![own_uffd()],
        Message::AttachChannel(_) => {
            let (a, _b) = rustix::net::socketpair(
                rustix::net::AddressFamily::UNIX,
                rustix::net::SocketType::STREAM,
                rustix::net::SocketFlags::CLOEXEC,
                None,
            )
            .expect("socketpair");
            vec![a]
        }
        m => (0..m.fd_count())
            .map(|_| {
                let fd = rustix::fs::memfd_create("intruder", rustix::fs::MemfdFlags::CLOEXEC)
                    .expect("memfd");
                rustix::fs::ftruncate(&fd, SIZE as u64).expect("ftruncate");
                fd
            })
            .collect(),
    }
}

/// A userfaultfd of this (unprivileged) process: user-mode faults only, which is what an
/// unprivileged process may create; an eventfd where even that is not allowed (the daemon
/// must refuse before it looks at the fd either way).
fn own_uffd() -> OwnedFd {
    match userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(true)
        .create()
    {
        Ok(uffd) => uffd.as_fd().try_clone_to_owned().expect("dup"),
        Err(_) => rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).expect("eventfd"),
    }
}

/// Creates a VM, prints `ACCESS vm ID TOKEN`, and once stdin closes checks that the VM is
/// still its own and untouched (the same counters, its mailbox still to be opened, still its
/// own to detach): prints `ACCESS intact`.
fn own_a_vm(socket: &Path) {
    let client = Client::connect(socket).expect("the owner is welcomed");
    let created = client
        .create_vm(VmSpec {
            regions: vec![RegionSpec::new(GPA, SIZE as u64, 0)],
            ..Default::default()
        })
        .expect("CreateVm");
    let vm_id = created.vm_id;
    let before = client.stats(vm_id).expect("stats");
    println!("ACCESS vm {vm_id} {}", created.token);
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    assert_eq!(client.stats(vm_id).expect("stats after"), before);
    client
        .open_mailbox(vm_id, 1)
        .expect("nobody else opened its mailbox");
    client.detach(vm_id).expect("still its own to detach");
    println!("ACCESS intact");
}

/// This test binary's `child` entry (which calls [`run_if_child`]) as `ids`, in `role`.
pub fn child_as(ids: Ids, role: &str, socket: &Path) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--exact", "child", "--nocapture"])
        .env(ROLE, role)
        .env(SOCKET, socket)
        .stdin(Stdio::null());
    let groups: Vec<libc::gid_t> = ids.groups.to_vec();
    // SAFETY: the closure runs in the child between fork and exec and makes only the
    // async-signal-safe system calls setgroups, setgid and setuid, on `groups`, allocated
    // before the fork and moved into the closure (its length is the count passed).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(ids.gid) != 0
                || libc::setuid(ids.uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Runs a child to its end; its `ACCESS` lines.
pub fn run_child(cmd: &mut Command) -> Vec<String> {
    let out = cmd.output().expect("start the child");
    access_lines(&out)
}

fn access_lines(out: &Output) -> Vec<String> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("ACCESS "))
        .map(str::to_owned)
        .collect()
}

/// An intruder as `ids` tries every request on `targets`: each must be answered `UnknownVm`,
/// as for an id that does not exist.
pub fn assert_intruder_refused(ids: Ids, socket: &Path, targets: &[(u64, u64)]) {
    let list: Vec<String> = targets.iter().map(|(v, t)| format!("{v}:{t}")).collect();
    let lines = run_child(child_as(ids, "intrude", socket).env(TARGETS, list.join(",")));
    let expected: Vec<String> = targets
        .iter()
        .flat_map(|(vm, _)| REQUESTS.iter().map(move |r| format!("{vm} {r} UnknownVm")))
        .collect();
    assert_eq!(lines, expected, "as uid {} gid {}", ids.uid, ids.gid);
}
