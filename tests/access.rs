//! Access control, tried as other uids (docs/operations.md, "Access control"). The real
//! `vmpagerd` runs as root on a `--socket-path` with an allowlist; clients run as other uids and
//! gids in child processes ([`other_uid`]: this test binary again, entry [`child`]).
//!
//! Needs root (to start processes as other uids) and userfaultfd.

mod common;
mod other_uid;

use common::*;
use other_uid::*;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use vmpager_client::demo::PatternGen;
use vmpager_client::{Client, PageSource, RegionSpec, VmMemory, VmSpec};
use vmpager_protocol::ErrorCode;

fn have_root_and_uffd() -> bool {
    have_uffd()
        && have(
            "root (to run clients as other uids)",
            rustix::process::getuid().is_root(),
        )
}

/// Not a test of its own: the entry point of the child processes the other tests start as
/// other uids ([`other_uid`]). Does nothing in a test run.
#[test]
fn child() {
    other_uid::run_if_child();
}

/// vmpagerd serving a `--socket-path` in a test directory, ready once it logged that it
/// serves (by then the socket is bound, has its mode and group, and listens). Stopped with
/// SIGTERM on drop.
struct Daemon {
    child: Child,
    path: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    fn start(dir: &TestDir, args: &[&str]) -> Daemon {
        let path = dir.join("vmpagerd.sock");
        let mut child = Command::new(vmpagerd_binary())
            .arg("--socket-path")
            .arg(&path)
            .args(args)
            .env("VMPAGER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vmpagerd");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut log = String::new();
        loop {
            let mut line = String::new();
            if stderr.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.wait();
                panic!("vmpagerd {args:?} ended before it served:\n{log}");
            }
            log.push_str(&line);
            if line.contains("vmpagerd serving") {
                break;
            }
        }
        let log = Arc::new(Mutex::new(log));
        let sink = log.clone();
        // Drained so the daemon never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Daemon { child, path, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let _ = self.child.wait();
    }
}

fn assert_every_page(memory: &VmMemory, snapshot: &[u8]) {
    for p in 0..PAGES {
        assert!(
            read_page(&memory.regions()[0], p) == snapshot[p * PAGE..(p + 1) * PAGE],
            "page {p}"
        );
    }
}

#[test]
fn another_uid_reaches_none_of_roots_vms() {
    if !have_root_and_uffd() {
        return;
    }
    let dir = TestDir::new("access-uid");
    // nobody (65534) is allowed and reaches the socket through its group.
    let d = Daemon::start(
        &dir,
        &[
            "--allow-uid",
            "0",
            "--allow-uid",
            "65534",
            "--socket-mode",
            "0660",
            "--socket-group",
            "65534",
            "--vm-grace",
            "600",
        ],
    );
    let img = image(&dir, "img", SIZE as u64, 21);
    let mut snapshot = vec![0u8; SIZE];
    PatternGen::new(21).fill(&mut snapshot);
    let region = || vec![RegionSpec::new(GPA, SIZE as u64, 0)];

    // Root's VMs: one served (its uffd attached, recording its working set, a few pages in),
    // one only created (no uffd, no mailbox: an intruder's AttachUffd or OpenMailbox would
    // succeed were it not refused).
    let root = Client::connect(&d.path).unwrap();
    let served = root
        .create_mapped_vm(VmSpec {
            regions: region(),
            source: PageSource::File(img.try_clone().unwrap()),
            record_working_set: true,
            ..Default::default()
        })
        .unwrap();
    for p in 0..4 {
        assert_eq!(
            read_page(&served.regions()[0], p),
            snapshot[p * PAGE..(p + 1) * PAGE]
        );
    }
    let idle = root
        .create_vm(VmSpec {
            regions: region(),
            ..Default::default()
        })
        .unwrap();
    let targets = [(served.vm_id(), served.token()), (idle.vm_id, idle.token)];
    let stats = |id| root.stats(id).unwrap();
    let before = [stats(targets[0].0), stats(targets[1].0)];
    let recorded = root.working_set(served.vm_id()).unwrap();
    assert!(!recorded.is_empty());

    // nobody is let in, and holds none of them: every request is UnknownVm, tokens or not.
    assert_intruder_refused(NOBODY, &d.path, &targets);

    // Root's VMs did not notice: the same counters and recording, every byte served.
    assert_eq!([stats(targets[0].0), stats(targets[1].0)], before);
    assert_eq!(root.working_set(served.vm_id()).unwrap(), recorded);
    assert_every_page(&served, &snapshot);
    assert_eq!(
        stats(targets[0].0).pages_from_source,
        PAGES as u64,
        "recording: one page per fault"
    );
    // The idle VM is still root's to attach and give a mailbox.
    let (idle_id, idle_token) = targets[1];
    let idle = VmMemory::map(idle).unwrap();
    root.attach_uffd(idle_id, idle.uffd(), &idle.host_addrs())
        .unwrap();
    root.open_mailbox(idle_id, 1).unwrap();
    assert_eq!(read_page(&idle.regions()[0], 0), vec![0u8; PAGE]);
    // The tokens nobody presented were right: root subscribes with one, from another
    // connection.
    Client::connect(&d.path)
        .unwrap()
        .subscribe(idle_id, idle_token)
        .unwrap();

    // A uid that is not allowed, whose group reaches the socket, is turned away at once.
    let stranger = Ids {
        uid: 65533,
        gid: 65534,
        groups: &[],
    };
    assert_eq!(
        run_child(&mut child_as(stranger, "connect", &d.path)),
        [
            "refused PermissionDenied: uid 65533 is not allowed to use this vmpagerd; see \
          --allow-uid and --allow-gid (its gid 65534 is not allowed either)"
        ]
    );

    // Released for an update: nobody holds the VM, and still only root (its creator) may
    // take it over with its token.
    let (served_id, served_token) = targets[0];
    let released = stats(served_id);
    root.release(served_id).unwrap();
    drop(served);
    assert_intruder_refused(NOBODY, &d.path, &targets[..1]);
    let vmm = Client::connect(&d.path).unwrap();
    let (memory, _) = vmm.reattach_mapped(served_id, served_token).unwrap();
    assert_eq!(vmm.stats(served_id).unwrap(), released);
    assert_every_page(&memory, &snapshot);
}

#[test]
fn a_gid_on_the_allowlist_lets_its_members_in_but_not_into_each_others_vms() {
    if !have_root_and_uffd() {
        return;
    }
    let dir = TestDir::new("access-gid");
    // Only --allow-gid: root and the daemon's uid (root) stay allowed.
    let d = Daemon::start(
        &dir,
        &[
            "--allow-gid",
            "65532",
            "--socket-mode",
            "0660",
            "--socket-group",
            "65532",
        ],
    );
    let st = std::fs::metadata(&d.path).unwrap();
    assert_eq!(st.mode() & 0o7777, 0o660);
    assert_eq!((st.uid(), st.gid()), (0, 65532));
    assert!(
        !d.log().contains("keeps out"),
        "the socket lets the group in: {}",
        d.log()
    );

    let member = |uid| Ids {
        uid,
        gid: 65532,
        groups: &[],
    };
    // Let in by its gid alone.
    assert_eq!(
        run_child(&mut child_as(member(65531), "connect", &d.path)),
        ["welcome"]
    );
    // In neither group: the socket's mode keeps it out (EACCES).
    let outsider = Ids {
        uid: 65533,
        gid: 65533,
        groups: &[],
    };
    assert_eq!(
        run_child(&mut child_as(outsider, "connect", &d.path)),
        [format!("cannot connect: errno {}", libc::EACCES)]
    );
    // A supplementary member reaches the socket, but SO_PEERCRED's gid is what is allowed.
    let supplementary = Ids {
        groups: &[65532],
        ..outsider
    };
    assert_eq!(
        run_child(&mut child_as(supplementary, "connect", &d.path)),
        [
            "refused PermissionDenied: uid 65533 is not allowed to use this vmpagerd; see \
          --allow-uid and --allow-gid (its gid 65533 is not allowed either)"
        ]
    );
    // Root is still allowed.
    let root = Client::connect(&d.path).unwrap();

    // A member's VM: another member is let in, but reaches none of it.
    let mut owner = child_as(member(65531), "own", &d.path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut owner_out = BufReader::new(owner.stdout.take().unwrap());
    let (vm_id, token) = loop {
        let mut line = String::new();
        assert_ne!(
            owner_out.read_line(&mut line).unwrap(),
            0,
            "the owner ended"
        );
        if let Some(rest) = line.trim().strip_prefix("ACCESS vm ") {
            let (id, token) = rest.split_once(' ').unwrap();
            break (id.parse::<u64>().unwrap(), token.parse::<u64>().unwrap());
        }
    };
    assert_intruder_refused(member(65530), &d.path, &[(vm_id, token)]);
    // Root may present the token (it subscribes), but acts on no VM it does not hold.
    match root.stats(vm_id) {
        Err(vmpager_client::ClientError::Refused {
            code: ErrorCode::UnknownVm,
            ..
        }) => {}
        other => panic!("root read another connection's VM: {other:?}"),
    }
    Client::connect(&d.path)
        .unwrap()
        .subscribe(vm_id, token)
        .unwrap();
    drop(owner.stdin.take());
    let mut rest = String::new();
    owner_out.read_to_string(&mut rest).unwrap();
    let status = owner.wait().unwrap();
    assert!(status.success() && rest.contains("ACCESS intact"), "{rest}");
}

#[test]
fn socket_options_are_applied_and_checked() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("access-socket");
    // By default only the daemon's uid (and root) can connect.
    let d = Daemon::start(&dir, &[]);
    let st = std::fs::metadata(&d.path).unwrap();
    assert_eq!(st.mode() & 0o7777, 0o600);
    assert_eq!(st.uid(), rustix::process::getuid().as_raw());
    drop(d);
    // An allowlist the socket's mode makes useless is worth a warning.
    let d = Daemon::start(&dir, &["--allow-gid", "65532"]);
    assert!(
        d.log()
            .contains("admit peers that --socket-mode 0600 keeps out"),
        "{}",
        d.log()
    );
    drop(d);

    let path = dir.join("never.sock");
    let s = path.to_str().unwrap();
    let refused: &[(&[&str], &str)] = &[
        (
            &["--socket-path", s, "--socket-mode", "0666"],
            "--socket-mode 0666 lets every user of this host connect",
        ),
        (
            &["--socket-path", s, "--socket-mode", "0602"],
            "--socket-mode 0602 lets every user of this host connect",
        ),
        (
            &["--socket-path", s, "--socket-mode", "1770"],
            "--socket-mode 1770: not an octal permission mode",
        ),
        (
            &["--socket-path", s, "--socket-mode", "rw-rw----"],
            "--socket-mode rw-rw----: not an octal permission mode",
        ),
        (
            &["--socket-path", s, "--socket-group", "65532"],
            "--socket-group 65532 gives that group no access with --socket-mode 0600",
        ),
        (
            &["--fd", "3", "--socket-mode", "0660"],
            "--socket-mode applies only to --socket-path",
        ),
        (
            &["--socket-group", "65532"],
            "--socket-group applies only to --socket-path",
        ),
    ];
    for (args, message) in refused {
        let out = Command::new(vmpagerd_binary())
            .args(*args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?} not refused: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!path.exists(), "{args:?} left a socket");
    }
}
