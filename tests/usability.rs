//! What a new user runs into first: options that can never work refused at start, naming the
//! option, a socket path that is not a socket left alone, and `vmpager demo` refusing what cannot fit (the daemon's per-VM limit, the free
//! space) before it writes anything, and leaving nothing behind on SIGTERM or SIGINT.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Runs `binary args`, expecting it to exit at once with `code` and `message` on stderr.
fn refused(binary: &std::path::Path, args: &[&str], code: i32, message: &str) {
    let out = Command::new(binary).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?} not refused: {stderr}"
    );
    assert!(stderr.contains(message), "{args:?}: {stderr}");
}

#[test]
fn options_that_can_never_work_are_refused_at_start() {
    let dir = TestDir::new("bad-options");
    // A socket path no daemon can bind (its directory does not exist): were an option not
    // refused, vmpagerd would fail there with another message instead of serving.
    let s = "/nonexistent-vmpager-dir/never.sock";
    // Exit 2: clap's usage errors; exit 1: vmpagerd's own checks, before it binds anything.
    let vmpagerd: &[(&[&str], i32, &str)] = &[
        (
            &[],
            1,
            "one of --socket-path PATH, --fd N or --print-capabilities",
        ),
        (&["--fd", "1"], 1, "--fd 1 is a standard stream"),
        (&["--fd=-1"], 1, "--fd -1 is not a file descriptor"),
        (
            &["--workers", "0", "--socket-path", s],
            1,
            "--workers must be between 1 and 256",
        ),
        (
            &["--max-connections", "0", "--socket-path", s],
            1,
            "--max-connections must be at least 1",
        ),
        (
            &["--max-vm-memory-mib", "0", "--socket-path", s],
            1,
            "--max-vm-memory-mib must be at least 1",
        ),
        (
            &[
                "--max-vm-memory-mib",
                "18446744073709551615",
                "--socket-path",
                s,
            ],
            1,
            "--max-vm-memory-mib is too large",
        ),
        (
            &[
                "--wait-mode",
                "blocking",
                "--spin-us",
                "50",
                "--socket-path",
                s,
            ],
            1,
            "--spin-us applies only to --wait-mode adaptive",
        ),
        (
            &["--spin-us", "5000000", "--socket-path", s],
            1,
            "--spin-us must be at most 1000000",
        ),
        (
            &["--worker-cpus", "0,,1", "--socket-path", s],
            2,
            "--worker-cpus",
        ),
        (
            &["--worker-cpus", "4095", "--socket-path", s],
            1,
            "--worker-cpus: vmpagerd may not run on CPU 4095",
        ),
        (
            &["--fault-around", "0", "--socket-path", s],
            1,
            "--fault-around 0 --prefetch-max 512: fault-around must be a power of two",
        ),
        (
            &["--fault-around", "3", "--socket-path", s],
            1,
            "fault-around must be a power of two",
        ),
        (
            &["--prefetch-max", "0", "--socket-path", s],
            1,
            "the prefetch window must be between 1 and 512 pages",
        ),
        (
            &["--prefetch-max", "513", "--socket-path", s],
            1,
            "the prefetch window must be between 1 and 512 pages",
        ),
        (
            &["--config", "/nonexistent/vmpagerd.toml", "--socket-path", s],
            1,
            "cannot read /nonexistent/vmpagerd.toml",
        ),
    ];
    for &(args, code, message) in vmpagerd {
        refused(&vmpagerd_binary(), args, code, message);
    }

    let work = dir.join("work");
    let w = work.to_str().unwrap();
    let nodir = dir.join("no-such-dir").join("x.ws");
    let table = dir.path().to_str().unwrap();
    let mut vmpager: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["demo", "--vcpus", "0"], 2, "must be at least 1"),
        (
            vec!["demo", "--memory", "0"],
            2,
            "must be a non-zero multiple of 4 KiB",
        ),
        (
            vec!["demo", "--memory", "5000"],
            2,
            "must be a non-zero multiple of 4 KiB",
        ),
        (vec!["demo", "--memory", "1T"], 2, "bad size suffix"),
        (vec!["demo", "--touch", "0"], 2, "--touch"),
        (vec!["demo", "--touch", "101"], 2, "--touch"),
        (
            vec!["bench", "--only", "nosuch"],
            1,
            "--only: no section \"nosuch\"",
        ),
        (vec!["bench", "--json", table], 1, "is a directory"),
        (
            vec!["bench", "--markdown", "/proc/self/no/such/t.md"],
            1,
            "--markdown: cannot create",
        ),
        (
            vec!["ch-restore", table, "tcp:127.0.0.1:1"],
            1,
            "RECEIVER must be unix:PATH",
        ),
        (
            vec!["firecracker-handler", s, "/nonexistent/mem"],
            1,
            "cannot open /nonexistent/mem",
        ),
    ];
    // The demo's checks against this host's KVM come before it writes or starts anything.
    if have_kvm() {
        vmpager.extend([
            (
                vec!["demo", "--vcpus", "100000", "--workdir", w],
                1,
                "--vcpus 100000 is not between 1 and",
            ),
            (
                vec![
                    "demo",
                    "--memory",
                    "24K",
                    "--vcpus",
                    "2",
                    "--touch",
                    "50",
                    "--workdir",
                    w,
                ],
                1,
                "needs a power-of-two number of pages per vCPU",
            ),
            (
                vec!["demo", "--working-set", "/nonexistent/x.ws", "--workdir", w],
                1,
                "--working-set: cannot open /nonexistent/x.ws",
            ),
            (
                vec![
                    "demo",
                    "--record-working-set",
                    nodir.to_str().unwrap(),
                    "--workdir",
                    w,
                ],
                1,
                "no-such-dir is not a directory",
            ),
        ]);
    }
    for (args, code, message) in &vmpager {
        refused(&vmpager_binary(), args, *code, message);
    }
    assert!(!work.exists(), "the demo created its work directory");
}

#[test]
fn vmpagerd_never_replaces_what_is_not_a_socket() {
    let dir = TestDir::new("not-a-socket");
    let file = dir.join("notes.txt");
    std::fs::write(&file, b"my notes").unwrap();
    let sub = dir.join("a-dir");
    std::fs::create_dir(&sub).unwrap();
    let link = dir.join("link.sock");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    for (path, what) in [
        (&file, "is a regular file"),
        (&sub, "is a directory"),
        (&link, "is a symbolic link"),
    ] {
        let out = Command::new(vmpagerd_binary())
            .arg("--socket-path")
            .arg(path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("{} {what}, not a socket", path.display())),
            "{stderr}"
        );
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"my notes");
    assert!(sub.is_dir());
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
}

/// The entries of `dir` (the demo works in a `vmpager-demo-PID` directory inside it).
fn entries(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Runs `vmpager demo` with `args` in `dir`, expecting it to fail; returns (stdout, stderr).
fn demo_refused(dir: &std::path::Path, args: &[&str]) -> (String, String) {
    let out = Command::new(vmpager_binary())
        .arg("demo")
        .args(args)
        .arg("--workdir")
        .arg(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stdout}\n{stderr}");
    (stdout, stderr)
}

#[test]
fn demo_refuses_more_memory_than_the_daemon_allows_before_writing() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("demo-limit");
    let work = dir.join("work");
    // Its own daemon, default limit 1 TiB: 2000 GiB are refused before the image is written.
    let (stdout, stderr) = demo_refused(&work, &["--memory", "2000G"]);
    assert!(
        stderr.contains("--memory 2000 GiB exceeds the daemon's limit of 1024 GiB per VM"),
        "{stderr}"
    );
    assert!(!stdout.contains("snapshot:"), "{stdout}");
    assert!(entries(&work).is_empty(), "{:?}", entries(&work));
    // A running daemon with a limit of its own, told in its Welcome.
    let daemon = daemon_process(&dir, &["--max-vm-memory-mib", "64"]);
    let socket = daemon.socket_path().to_str().unwrap().to_owned();
    let (stdout, stderr) = demo_refused(&work, &["--memory", "128M", "--socket-path", &socket]);
    assert!(
        stderr.contains("--memory 128 MiB exceeds the daemon's limit of 64 MiB per VM"),
        "{stderr}"
    );
    assert!(!stdout.contains("snapshot:"), "{stdout}");
    assert!(entries(&work).is_empty(), "{:?}", entries(&work));
}

/// A tmpfs of `size` mounted on `dir` until dropped.
struct Tmpfs(std::ffi::CString);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        use std::os::unix::ffi::OsStrExt;
        let target = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
        let opts = std::ffi::CString::new(format!("size={size}")).unwrap();
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        (rc == 0).then_some(Tmpfs(target))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn demo_refuses_an_image_bigger_than_the_free_space_before_writing() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("demo-space");
    let small = dir.join("small");
    std::fs::create_dir(&small).unwrap();
    let Some(_tmpfs) = Tmpfs::mount(&small, "16m") else {
        have("a tmpfs mounted by this test (needs root)", false);
        return;
    };
    // Under the daemon's limit, over the free space (16 MiB).
    let (stdout, stderr) = demo_refused(&small, &["--memory", "64M"]);
    assert!(
        stderr.contains("not enough free space for the snapshot image: 64 MiB needed"),
        "{stderr}"
    );
    assert!(!stdout.contains("snapshot:"), "{stdout}");
    assert!(entries(&small).is_empty(), "{:?}", entries(&small));
}

/// A process held by a pidfd (signals reach that process, never a later one with its pid),
/// killed on drop if it is still there (a test that failed before it ended).
struct Held(std::os::fd::OwnedFd);

impl Held {
    fn new(pid: rustix::process::Pid) -> Held {
        Held(rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).unwrap())
    }

    fn signal(&self, sig: rustix::process::Signal) {
        rustix::process::pidfd_send_signal(&self.0, sig).unwrap();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = rustix::process::pidfd_send_signal(&self.0, rustix::process::Signal::KILL);
    }
}

#[test]
fn demo_interrupted_leaves_no_work_directory_and_no_daemon() {
    if !have_kvm() {
        return;
    }
    use rustix::process::{kill_process, Pid, Signal};
    // SIGTERM while the vCPUs run, SIGINT while the VM is being created. The demo's daemon is
    // stopped (SIGSTOP) first, so the demo cannot finish before the signal: its vCPUs (or its
    // request) wait for the daemon.
    for (signal, at) in [(Signal::TERM, "guest starting"), (Signal::INT, "snapshot:")] {
        let dir = TestDir::new("demo-signal");
        let mut demo = Command::new(vmpager_binary())
            .args(["demo", "--memory", "64M", "--vcpus", "1", "--workdir"])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let daemon = number_after(&first, "started vmpagerd (pid ");
        let daemon = Pid::from_raw(daemon as i32).unwrap();
        assert!(
            lines.any(|l| l.is_ok_and(|l| l.contains(at))),
            "the demo never printed {at:?}"
        );
        let held = Held::new(daemon);
        held.signal(Signal::STOP);
        kill_process(Pid::from_raw(demo.id() as i32).unwrap(), signal).unwrap();
        let status = demo.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut demo.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(
            status.code(),
            Some(128 + signal.as_raw()),
            "{signal:?} at {at:?}: {stderr}"
        );
        assert!(stderr.contains("stopped vmpagerd"), "{stderr}");
        assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
        // The daemon was stopped and reaped by the demo.
        assert!(
            !std::path::Path::new(&format!("/proc/{}", daemon.as_raw_nonzero())).exists(),
            "vmpagerd {daemon:?} outlived the demo"
        );
    }
}
