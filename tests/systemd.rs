//! vmpagerd under a service manager: socket activation (`LISTEN_FDS`, set by the test itself and
//! by systemd's own `systemd-socket-activate`), `Type=notify` readiness (`READY=1`, `STATUS=`,
//! `STOPPING=1` on `$NOTIFY_SOCKET`), and the unit files in `contrib/systemd/` as
//! `systemd-analyze verify` reads them. PID 1 here is not systemd, so the units themselves
//! cannot be started; these are the parts of their contract the daemon implements.

mod common;

use common::*;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use vmpager_client::{Client, PageSource, PopulateMethod, RegionSpec, VmSpec};

const SOCKET_ACTIVATE: &str = "/usr/bin/systemd-socket-activate";
const SYSTEMD_ANALYZE: &str = "/usr/bin/systemd-analyze";

fn listening_seqpacket(path: &Path) -> OwnedFd {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    rustix::net::bind(&fd, &SocketAddrUnix::new(path).unwrap()).unwrap();
    rustix::net::listen(&fd, 16).unwrap();
    fd
}

/// `vmpagerd ARGS` with `fd` as its fd 3 and `LISTEN_PID` set to its own pid (a shell sets it
/// to `$$` and execs vmpagerd in its place, so the pid is the daemon's), plus `env`.
fn activated(fd: &OwnedFd, args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
        .arg(vmpagerd_binary())
        .args(args)
        .env("VMPAGER_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let raw = fd.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec and only calls dup2/fcntl on
    // fd numbers (`raw` stays open in the parent until spawn returns), which are
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let ok = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(raw, 3) == 3
            };
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    cmd.spawn().expect("start vmpagerd")
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    child.wait().unwrap()
}

fn stderr_of(mut child: Child) -> (std::process::ExitStatus, String) {
    let out = child.wait().unwrap();
    let mut text = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut text).unwrap();
    }
    (out, text)
}

fn a_vm_is_served(socket: &Path) {
    let client = Client::connect(socket).unwrap();
    let vm = client
        .create_vm(VmSpec {
            regions: vec![RegionSpec::new(1 << 32, 1 << 20, 0)],
            source: PageSource::Zero,
            populate: PopulateMethod::Default,
            ..Default::default()
        })
        .unwrap();
    let stats = client.stats(vm.vm_id).unwrap();
    assert_eq!(stats.vm_id, vm.vm_id);
}

#[test]
fn a_socket_passed_with_listen_fds_is_served_and_readiness_is_notified() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("listen-fds");
    let sock = dir.join("control.sock");
    let listener = listening_seqpacket(&sock);
    let notify = NotifySocket::new(dir.join("notify"));
    let mut child = activated(
        &listener,
        &["--workers", "1"],
        &[
            ("LISTEN_FDS", "1"),
            ("LISTEN_FDNAMES", "control"),
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
        ],
    );
    drop(listener);
    assert_eq!(notify.next(), "READY=1\nSTATUS=serving 0 VMs");
    {
        let client = Client::connect(&sock).unwrap();
        let vm = client
            .create_vm(VmSpec {
                regions: vec![RegionSpec::new(1 << 32, 1 << 20, 0)],
                source: PageSource::Zero,
                ..Default::default()
            })
            .unwrap();
        notify.until("STATUS=serving 1 VM");
        client.detach(vm.vm_id).unwrap();
        drop(vm);
        drop(client);
        notify.until("STATUS=serving 0 VMs");
    }
    let status = terminate(&mut child);
    assert!(notify.until("STOPPING=1").contains("STATUS=stopping"));
    assert!(status.success(), "{status}");
}

#[test]
fn listen_fds_for_another_process_or_a_wrong_socket_are_refused() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("listen-fds-bad");
    let sock = dir.join("control.sock");
    let listener = listening_seqpacket(&sock);
    // LISTEN_PID names another process (the variables leaked from a parent): not ours to take,
    // so vmpagerd has nothing to serve.
    let mut cmd = Command::new(vmpagerd_binary());
    cmd.env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .stderr(Stdio::piped());
    let (status, err) = stderr_of(cmd.spawn().unwrap());
    assert!(!status.success());
    assert!(err.contains("--socket-path"), "{err}");
    drop(listener);

    // A stream socket is not a control socket.
    let stream = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    rustix::net::bind(&stream, &SocketAddrUnix::new(dir.join("s.sock")).unwrap()).unwrap();
    rustix::net::listen(&stream, 1).unwrap();
    let (status, err) = stderr_of(activated(&stream, &[], &[("LISTEN_FDS", "1")]));
    assert!(!status.success());
    assert!(
        err.contains("not a listening SOCK_SEQPACKET socket"),
        "{err}"
    );

    // LISTEN_FDS announcing fds that are not there.
    let (status, err) = stderr_of(activated(&stream, &[], &[("LISTEN_FDS", "3")]));
    assert!(!status.success());
    assert!(err.contains("is not open"), "{err}");
}

#[test]
fn readiness_and_stopping_reach_notify_socket() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("notify");
    let notify = NotifySocket::new(dir.join("notify"));
    let sock = dir.join("d.sock");
    let mut child = Command::new(vmpagerd_binary())
        .args(["--workers", "1", "--socket-path", sock.to_str().unwrap()])
        .env("VMPAGER_LOG", "warn")
        .env("NOTIFY_SOCKET", &notify.path)
        .spawn()
        .unwrap();
    // READY=1 comes once the daemon serves: a client connects at once.
    assert_eq!(notify.next(), "READY=1\nSTATUS=serving 0 VMs");
    // ... and once every thread it runs is started (the status reporter included): a
    // supervisor's baseline of its threads, taken then, holds (tests/soak.rs).
    let threads = || {
        std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .unwrap()
            .count()
    };
    let at_ready = threads();
    a_vm_is_served(&sock);
    assert_eq!(
        threads(),
        at_ready,
        "threads at READY=1 and after serving a VM"
    );
    let status = terminate(&mut child);
    assert!(notify
        .until("STOPPING=1")
        .starts_with("STOPPING=1\nSTATUS="));
    assert!(status.success(), "{status}");
}

#[test]
fn systemd_socket_activate_starts_vmpagerd_on_the_first_connection() {
    if !Path::new(SOCKET_ACTIVATE).exists() {
        eprintln!("SKIPPED: {SOCKET_ACTIVATE} is not installed (Debian package systemd)");
        return;
    }
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("socket-activate");
    let sock = dir.join("control.sock");
    let notify = NotifySocket::new(dir.join("notify"));
    let mut child = Command::new(SOCKET_ACTIVATE)
        .args(["--seqpacket", "--fdname=control", "-l"])
        .arg(&sock)
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notify.path.display()))
        .args(["-E", "VMPAGER_LOG=warn"])
        .arg(vmpagerd_binary())
        .args(["--workers", "1"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // systemd-socket-activate says when it listens, then starts vmpagerd in its own place
    // (same pid) when the first client connects.
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.starts_with("Listening on"), "{line}");
    // Keep reading its stderr so that it never blocks on a full pipe.
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut rest);
        rest
    });
    a_vm_is_served(&sock);
    assert_eq!(notify.until("READY=1"), "READY=1\nSTATUS=serving 0 VMs");
    let status = terminate(&mut child);
    let rest = drain.join().unwrap();
    assert!(rest.contains("Execing"), "{rest}");
    assert!(status.success(), "{status}\n{rest}");
}

#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    if !Path::new(SYSTEMD_ANALYZE).exists() {
        eprintln!("SKIPPED: {SYSTEMD_ANALYZE} is not installed (Debian package systemd)");
        return;
    }
    let dir = TestDir::new("units");
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    let service = std::fs::read_to_string(contrib.join("vmpagerd.service")).unwrap();
    // Everything as shipped but the binary's path (verify checks that it is executable).
    assert!(service.contains("ExecStart=/usr/local/bin/vmpagerd "));
    let here = service.replace(
        "/usr/local/bin/vmpagerd",
        vmpagerd_binary().to_str().unwrap(),
    );
    std::fs::write(dir.join("vmpagerd.service"), here).unwrap();
    std::fs::copy(contrib.join("vmpagerd.socket"), dir.join("vmpagerd.socket")).unwrap();
    for (key, value) in [("Type", "notify"), ("Restart", "always")] {
        assert!(
            service.lines().any(|l| l == format!("{key}={value}")),
            "{key}"
        );
    }
    let out = Command::new(SYSTEMD_ANALYZE)
        .args([
            "verify",
            "--man=no",
            "./vmpagerd.socket",
            "./vmpagerd.service",
        ])
        .current_dir(dir.path())
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 even for settings it ignores; every complaint names the file.
    let complaints: Vec<&str> = err.lines().filter(|l| l.contains("vmpagerd.")).collect();
    assert!(out.status.success() && complaints.is_empty(), "{err}");
}
