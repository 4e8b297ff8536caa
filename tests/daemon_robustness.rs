//! Garbage on the control socket never takes vmpagerd down: after random bytes, bad headers,
//! huge lengths, 200 fds in one message, out-of-state requests and connect/close storms, the
//! daemon (a separate process) still serves a well-formed client, never panics, and exits 0 on
//! SIGTERM.

mod common;

use common::*;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::time::Instant;
use vmpager_client::demo::{DaemonProcess, PatternGen};
use vmpager_client::{Client, ClientError, PageSource, PopulateMethod, RegionSpec, VmSpec};
use vmpager_protocol::{
    features, AttachUffd, Connection, CreateVm, ErrorCode, Hello, Message, PageSourceKind, VmType,
    HEADER_LEN, PROTOCOL_VERSION,
};

fn hello() -> Message {
    Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        features: features::ALL,
    })
}

/// Expects an Error reply with `code` on `conn`.
fn expect_error(conn: &Connection, code: ErrorCode) {
    match conn.recv().expect("a reply").message {
        Message::Error(e) => assert_eq!(e.code, code, "{}", e.text),
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

/// A well-formed client: create a VM on the zero source, touch its memory from this process
/// (faults served by the daemon), detach.
fn well_formed_client_works(daemon: &DaemonProcess) {
    // Right after a storm the daemon may still be at its connection limit, reaping closed
    // connections: it then refuses new ones (LimitExceeded, a retryable refusal) and closes
    // them at once. A real client retries; so does this one
    // (each attempt is a full round trip, no sleeping).
    let client = (0..10_000)
        .find_map(|_| match Client::connect(daemon.socket_path()) {
            Ok(c) => Some(c),
            Err(e) if e.peer_gone() || e.is_retryable() => None,
            Err(e) => panic!("{e:?}"),
        })
        .expect("the daemon never accepted a well-formed client");
    let vm = client
        .create_mapped_vm(VmSpec {
            regions: vec![RegionSpec::new(1 << 32, 1 << 20, 0)],
            source: PageSource::Zero,
            populate: PopulateMethod::Default,
            ..Default::default()
        })
        .unwrap();
    let r = &vm.regions()[0];
    for page in 0..r.len() / 4096 {
        // SAFETY: inside the live mapping; a read of shared memory the daemon populates.
        let v = unsafe { r.host_addr().as_ptr().add(page * 4096).read_volatile() };
        assert_eq!(v, 0);
    }
    assert_eq!(client.stats(vm.vm_id()).unwrap().pages_zero, 256);
    client.detach(vm.vm_id()).unwrap();
}

#[test]
fn garbage_never_takes_the_daemon_down() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("garbage");
    let mut daemon = daemon_process(&dir, &["--max-connections", "64"]);
    let path = daemon.socket_path().to_owned();

    // Random records, before and after a handshake.
    let mut gen = PatternGen::new(42);
    for round in 0..200 {
        let conn = Connection::connect(&path).unwrap();
        if round % 2 == 1 {
            conn.send(&hello(), 1, &[]).unwrap();
            assert!(matches!(conn.recv().unwrap().message, Message::Welcome(_)));
        }
        let mut bytes = vec![0u8; 8 * (1 + round % 40)];
        gen.fill(&mut bytes);
        if round % 3 == 0 {
            // A valid-looking header with random contents after it.
            bytes.splice(0..0, hello().encode(9)[..HEADER_LEN].iter().copied());
        }
        conn.send_raw(&bytes, &[]).unwrap();
        expect_error(&conn, ErrorCode::BadMessage);
    }

    // Bad headers: wrong magic, wrong version, unknown kind, huge and lying lengths.
    let conn = Connection::connect(&path).unwrap();
    let good = hello().encode(1);
    let mut cases = Vec::new();
    for (at, val) in [(0, b'X'), (4, 7), (6, 99), (6, 0)] {
        let mut b = good.clone();
        b[at] = val;
        cases.push(b);
    }
    for len in [u32::MAX, 1 << 20, 65_537, 3] {
        let mut b = good.clone();
        b[8..12].copy_from_slice(&len.to_le_bytes());
        cases.push(b);
    }
    let mut fd_liar = good.clone();
    fd_liar[12..16].copy_from_slice(&5u32.to_le_bytes());
    cases.push(fd_liar);
    cases.push(vec![0u8; 70_000]); // larger than any record the daemon accepts
    cases.push(good[..10].to_vec());
    for b in &cases {
        conn.send_raw(b, &[]).unwrap();
        expect_error(&conn, ErrorCode::BadMessage);
    }

    // 200 fds in one message: refused and closed by the daemon; the connection still works.
    let pipes: Vec<_> = (0..200).map(|_| rustix::pipe::pipe().unwrap()).collect();
    let fds: Vec<_> = pipes.iter().map(|(r, _)| r.as_fd()).collect();
    conn.send_raw(&good, &fds).unwrap();
    expect_error(&conn, ErrorCode::BadMessage);
    // The daemon closed every one of them: each pipe's write end now sees no reader.
    drop(fds);
    let readers_left = pipes
        .iter()
        .filter(|(_, w)| rustix::io::write(w, b"x") != Err(rustix::io::Errno::PIPE))
        .count();
    // Our own read ends are still open, so writes succeed; close ours and check the daemon's.
    assert_eq!(readers_left, pipes.len());
    let write_ends: Vec<_> = pipes
        .into_iter()
        .map(|(r, w)| {
            drop(r);
            w
        })
        .collect();
    assert!(
        write_ends
            .iter()
            .all(|w| rustix::io::write(w, b"x") == Err(rustix::io::Errno::PIPE)),
        "the daemon kept some of the 200 fds open"
    );

    // Out of state: requests before Hello, replies sent as requests, a second Hello.
    let conn = Connection::connect(&path).unwrap();
    conn.send(&Message::Detach { vm_id: 1 }, 2, &[]).unwrap();
    expect_error(&conn, ErrorCode::BadState);
    conn.send(&hello(), 3, &[]).unwrap();
    assert!(matches!(conn.recv().unwrap().message, Message::Welcome(_)));
    conn.send(&hello(), 4, &[]).unwrap();
    expect_error(&conn, ErrorCode::BadState);
    conn.send(&Message::Detached { vm_id: 1 }, 5, &[]).unwrap();
    expect_error(&conn, ErrorCode::BadState);
    conn.send(&Message::GetStats { vm_id: 77 }, 6, &[]).unwrap();
    expect_error(&conn, ErrorCode::UnknownVm);
    // A pipe is not a snapshot image, and not a userfaultfd.
    let (r, _w) = rustix::pipe::pipe().unwrap();
    let create = Message::CreateVm(CreateVm {
        vm_type: VmType::Default,
        policy: None,
        source_url: None,
        source: PageSourceKind::File,
        populate: PopulateMethod::Copy,
        flags: 0,
        regions: vec![RegionSpec::new(0, 1 << 20, 0)],
    });
    conn.send(&create, 7, &[r.as_fd()]).unwrap();
    expect_error(&conn, ErrorCode::BadSource);
    let zero = Message::CreateVm(CreateVm {
        vm_type: VmType::Default,
        policy: None,
        source_url: None,
        source: PageSourceKind::Zero,
        populate: PopulateMethod::Copy,
        flags: 0,
        regions: vec![RegionSpec::new(0, 1 << 20, 0)],
    });
    conn.send(&zero, 8, &[]).unwrap();
    let vm_id = match conn.recv().unwrap().message {
        Message::VmCreated(v) => v.vm_id,
        other => panic!("{other:?}"),
    };
    let attach = Message::AttachUffd(AttachUffd {
        vm_id,
        host_addrs: vec![0x7f00_0000_0000],
    });
    conn.send(&attach, 9, &[r.as_fd()]).unwrap();
    expect_error(&conn, ErrorCode::BadMessage);
    let attach = Message::AttachUffd(AttachUffd {
        vm_id,
        host_addrs: vec![0x1001],
    });
    conn.send(&attach, 10, &[r.as_fd()]).unwrap();
    expect_error(&conn, ErrorCode::BadMessage);
    // Another connection cannot reach this connection's VM.
    let other = Client::connect(&path).unwrap();
    assert!(matches!(
        other.stats(vm_id),
        Err(ClientError::Refused {
            code: ErrorCode::UnknownVm,
            ..
        })
    ));
    assert!(matches!(
        other.detach(vm_id),
        Err(ClientError::Refused {
            code: ErrorCode::UnknownVm,
            ..
        })
    ));
    drop(conn);

    // Connect/close storms, some closing mid-handshake. The daemon may still be reaping closed
    // connections and be at its limit: it then refuses new ones (an Error) and closes them at
    // once, which a client that sends sees as the peer gone, never as anything else.
    for i in 0..500 {
        let conn = Connection::connect(&path).unwrap();
        if i % 2 == 0 {
            if let Err(e) = conn.send(&hello(), 1, &[]) {
                assert!(e.is_peer_gone(), "{e:?}");
            }
        }
    }
    // More connections at once than the daemon allows: the extra ones are closed, and the
    // daemon keeps serving once they are gone.
    let many: Vec<_> = (0..100)
        .map(|_| Connection::connect(&path).unwrap())
        .collect();
    drop(many);

    assert!(daemon.is_running(), "vmpagerd died");
    well_formed_client_works(&daemon);

    let started = Instant::now();
    let status = daemon.terminate().unwrap();
    eprintln!("vmpagerd exited {:?} after SIGTERM", started.elapsed());
    assert!(status.success(), "vmpagerd exited with {status}");
}

#[test]
fn daemon_never_panics_and_exits_cleanly_on_sigterm() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("sigterm");
    // Run the binary directly so its stderr can be read.
    let sock = dir.join("d.sock");
    let mut child = KillOnDrop(
        std::process::Command::new(vmpagerd_binary())
            .arg("--socket-path")
            .arg(&sock)
            .env("VMPAGER_LOG", "debug")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = child.0.stderr.take().unwrap();
    // Readiness: the daemon logs "vmpagerd serving" once it listens; read until then.
    let mut log = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&log).contains("vmpagerd serving") {
        let n = stderr.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "vmpagerd exited early: {}",
            String::from_utf8_lossy(&log)
        );
        log.extend_from_slice(&buf[..n]);
    }
    // A second daemon on the same socket is refused, early and non-zero.
    let second = std::process::Command::new(vmpagerd_binary())
        .arg("--socket-path")
        .arg(&sock)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already serves"),
        "{second:?}"
    );

    // Malformed records get an Error each; after 32 in a row the daemon drops the connection.
    let conn = Connection::connect(&sock).unwrap();
    let mut gen = PatternGen::new(7);
    let mut answered = 0;
    for _ in 0..100 {
        let mut bytes = vec![0u8; 64];
        gen.fill(&mut bytes);
        if conn.send_raw(&bytes, &[]).is_err() {
            break;
        }
        match conn.recv() {
            Ok(r) => {
                assert!(matches!(r.message, Message::Error(_)));
                answered += 1;
            }
            Err(e) => {
                assert!(e.is_peer_gone(), "{e:?}");
                break;
            }
        }
    }
    assert_eq!(answered, 32);
    let started = Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.0.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.0.wait().unwrap();
    eprintln!("vmpagerd exited after SIGTERM in {:?}", started.elapsed());
    stderr.read_to_end(&mut log).unwrap();
    let log = String::from_utf8_lossy(&log);
    assert!(status.success(), "exit status {status}: {log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(!sock.exists(), "the socket file is removed on exit");
}

/// Set in the child process of [`refused_peers_are_told_why`]: the socket to connect to.
const CONNECT_AS_CHILD: &str = "VMPAGER_TEST_CONNECT_AS_CHILD";

#[test]
fn refused_peers_are_told_why() {
    if let Some(path) = std::env::var_os(CONNECT_AS_CHILD) {
        // The child, running as another uid: what does a client see?
        match Client::connect(std::path::Path::new(&path)) {
            Err(ClientError::Refused { code, text }) => println!("refused {code:?}: {text}"),
            other => println!("not refused: {other:?}"),
        }
        return;
    }
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("refused");
    let daemon = daemon_process(&dir, &["--max-connections", "1"]);
    let path = daemon.socket_path().to_owned();

    // A client whose uid is not allowed (the default allows root and the daemon's uid).
    if have(
        "root (to run a client as uid 65534)",
        rustix::process::getuid().is_root(),
    ) {
        // The socket file's mode must let that uid connect, so SO_PEERCRED is what decides.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "refused_peers_are_told_why", "--nocapture"])
            .env(CONNECT_AS_CHILD, &path)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(
            stdout.contains(
                "refused PermissionDenied: uid 65534 is not allowed to use this vmpagerd; see --allow-uid"
            ),
            "{stdout}"
        );
    }

    // Over the connection limit: told so, and that it may retry.
    let first = Client::connect(&path).unwrap();
    match Client::connect(&path) {
        Err(
            e @ ClientError::Refused {
                code: ErrorCode::LimitExceeded,
                ..
            },
        ) => {
            assert!(e.is_retryable());
            assert!(e.to_string().contains("--max-connections"), "{e}");
        }
        other => panic!("a second client was not refused: {other:?}"),
    }
    // A raw connection that sends nothing still gets the reason, with request id 0.
    let raw = Connection::connect(&path).unwrap();
    let reply = raw.recv().unwrap();
    assert_eq!(reply.header.request_id.get(), 0);
    match reply.message {
        Message::Error(e) => assert_eq!(e.code, ErrorCode::LimitExceeded),
        other => panic!("{other:?}"),
    }
    assert!(raw.recv().unwrap_err().is_peer_gone());
    // A client that sends its Hello only after the daemon has refused and closed (its send
    // fails with EPIPE) still reports the reason, not the broken pipe.
    let late = Connection::connect(&path).unwrap();
    loop {
        let mut fds = [rustix::event::PollFd::new(
            &late,
            rustix::event::PollFlags::RDHUP,
        )];
        rustix::event::poll(&mut fds, None).unwrap();
        if fds[0]
            .revents()
            .intersects(rustix::event::PollFlags::RDHUP | rustix::event::PollFlags::HUP)
        {
            break;
        }
    }
    match Client::from_connection(late) {
        Err(ClientError::Refused {
            code: ErrorCode::LimitExceeded,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    drop(first);
    // Once the first client is gone, a new one is served.
    well_formed_client_works(&daemon);
}

/// Kills the child if the test fails before it exits.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
