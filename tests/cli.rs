//! The command-line interfaces users and scripts depend on: `vmpagerd --print-capabilities`,
//! `vmpager demo`, `vmpager bench --quick --json`, and a VMM process killed mid-run next to a
//! healthy session.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use vmpager_client::demo::{run_scenario, ScenarioConfig};
use vmpager_client::{Client, PopulateMethod};

fn vmpager_binary() -> PathBuf {
    let bin = vmpagerd_binary().with_file_name("vmpager");
    assert!(
        bin.is_file(),
        "{} missing: run `cargo build --workspace --all-features` first",
        bin.display()
    );
    bin
}

#[test]
fn print_capabilities_is_json_describing_this_host() {
    let out = Command::new(vmpagerd_binary())
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let caps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let uffd_ok = vmpagerd::uffd::Uffd::probe().is_ok();
    assert_eq!(caps["userfaultfd"]["available"], uffd_ok);
    assert_eq!(
        caps["kvm"]["available"],
        std::path::Path::new("/dev/kvm").exists() && kvm_ioctls::Kvm::new().is_ok()
    );
    assert_eq!(
        caps["protocol"]["version"],
        u64::from(vmpager_protocol::PROTOCOL_VERSION)
    );
    if uffd_ok {
        let names: Vec<_> = caps["userfaultfd"]["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(names.contains(&"missing_shmem"), "{names:?}");
        assert!(caps["protocol"]["populate_methods"]
            .as_array()
            .unwrap()
            .contains(&"copy".into()));
    }
    // Every key a management tool reads is there.
    for key in [
        "memory_attributes",
        "guest_memfd",
        "guest_memfd_flags",
        "vm_types",
        "memory_fault_info",
    ] {
        assert!(caps["kvm"].get(key).is_some(), "kvm.{key} missing");
    }
}

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

#[test]
fn demo_verifies_every_byte() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("demo");
    let out = Command::new(vmpager_binary())
        .args(["demo", "--memory", "16M", "--vcpus", "2", "--workdir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("pages installed: 4096 from the snapshot, 0 zero"),
        "{stdout}"
    );
    assert!(
        stdout.contains("fault latency (fault read -> wake): p50"),
        "{stdout}"
    );
    assert!(stdout.contains("pages/s"), "{stdout}");
    assert!(
        stdout.lines().last() == Some("verified: guest saw every byte of the snapshot"),
        "{stdout}"
    );
}

/// Runs `vmpager demo` with `args`, expecting success; returns its stdout.
fn demo(dir: &TestDir, args: &[&str]) -> String {
    let out = Command::new(vmpager_binary())
        .arg("demo")
        .args(args)
        .arg("--workdir")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The number after `prefix` on the line that has it.
fn number_after(text: &str, prefix: &str) -> u64 {
    let at = text
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in {text}"))
        + prefix.len();
    text[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {prefix:?} in {text}"))
}

#[test]
fn demo_records_a_working_set_and_replays_it() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("demo-ws");
    let ws = dir.join("demo.ws");
    let w = ws.to_str().unwrap();
    let common = ["--memory", "32M", "--vcpus", "2", "--touch", "20"];
    let recorded = demo(&dir, &[&common[..], &["--record-working-set", w]].concat());
    // 20 % of each vCPU's 4096 pages, every first touch a fault (no readahead while recording).
    let pages = number_after(&recorded, "working set: ");
    assert_eq!(pages, 2 * 819, "{recorded}");
    assert_eq!(number_after(&recorded, "faults served: "), pages);
    assert!(
        recorded.contains("verified: guest saw every word it read"),
        "{recorded}"
    );
    let replayed = demo(&dir, &[&common[..], &["--working-set", w]].concat());
    assert_eq!(
        number_after(&replayed, "working set: "),
        pages,
        "{replayed}"
    );
    let faults = number_after(&replayed, "faults served: ");
    let from_set = number_after(&replayed, "ahead of a fault (fault-around, prefetch), ");
    // Each page the guest read came from the working set or from its own fault, once.
    assert!(from_set + faults >= pages, "{replayed}");
    assert!(
        replayed.contains("verified: guest saw every word it read"),
        "{replayed}"
    );
    // A working set is refused for another snapshot (another seed).
    let out = Command::new(vmpager_binary())
        .args([
            "demo",
            "--memory",
            "32M",
            "--seed",
            "7",
            "--touch",
            "20",
            "--working-set",
            w,
        ])
        .arg("--workdir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another snapshot"));
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

#[test]
fn a_vmm_killed_mid_run_disturbs_no_other_session() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("killed");
    let daemon = daemon_process(&dir, &[]);
    // A VMM process (the demo against our daemon) killed with SIGKILL while its guest faults.
    let mut vmm = Command::new(vmpager_binary())
        .args(["demo", "--memory", "256M", "--vcpus", "1", "--socket-path"])
        .arg(daemon.socket_path())
        .arg("--workdir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(vmm.stdout.take().unwrap()).lines();
    // "snapshot: ..." is printed just before it connects and its guest starts faulting.
    // "vm N: ... guest starting" is printed once the VM is attached, just before its vCPU runs.
    let started = lines.find(|l| l.as_ref().is_ok_and(|l| l.contains("guest starting")));
    assert!(started.is_some(), "the VMM never started its guest");
    // A healthy session runs on the same daemon while the other VMM is killed.
    let path = daemon.socket_path().to_owned();
    let img = image(&dir, "steady.img", 16 << 20, 21);
    let steady = std::thread::spawn(move || {
        let client = Client::connect(&path).unwrap();
        let cfg = ScenarioConfig {
            write_pattern: true,
            ..ScenarioConfig::new(16 << 20, 1, PopulateMethod::Default)
        };
        run_scenario(&client, Some(&img), &cfg).map(|(_, r)| r.stats.pages_from_source)
    });
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(vmm.id() as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let status = vmm.wait().unwrap();
    assert!(!status.success());
    assert_eq!(steady.join().unwrap().unwrap(), 4096);
    // And the daemon goes on serving new VMMs.
    let client = Client::connect(daemon.socket_path()).unwrap();
    let cfg = ScenarioConfig::new(4 << 20, 2, PopulateMethod::Continue);
    let (_vm, report) = run_scenario(&client, None, &cfg).unwrap();
    assert_eq!(report.stats.pages_zero, 1024);
}

#[test]
fn bench_quick_prints_the_table_and_writes_json_and_pictures() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("bench");
    let json = dir.join("run.json");
    let out = Command::new(vmpager_binary())
        .args(["bench", "--quick", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for section in [
        "[ipc]",
        "[mailbox]",
        "[ioctl]",
        "[kernel]",
        "[in-process handler]",
        "[child-process handler]",
        "[vmpagerd]",
        "[vcpu]",
        "[conversion]",
        "[memory]",
        "[firecracker]",
        "[restore]",
        "[targets",
    ] {
        assert!(stdout.contains(section), "no {section} in\n{stdout}");
    }
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["quick"], true);
    let rows = report["rows"].as_array().unwrap();
    assert!(rows.len() >= 60, "{} rows", rows.len());
    let mut groups = std::collections::BTreeSet::new();
    for r in rows {
        groups.insert(r["group"].as_str().unwrap().to_string());
        assert!(
            r["value"]
                .as_f64()
                .is_some_and(|v| v.is_finite() && v >= 0.0),
            "{r}"
        );
        if let Some(l) = r["latency"].as_object() {
            let q = |k: &str| l[k].as_f64().unwrap();
            // Percentiles of one histogram are ordered, and its CDF ends at 1.
            assert!(
                q("p50_ns") <= q("p99_ns") && q("p99_ns") <= q("p999_ns"),
                "{r}"
            );
            assert!(q("p999_ns") <= q("max_ns"), "{r}");
            if let Some(last) = l["cdf"].as_array().unwrap().last() {
                assert!((last[1].as_f64().unwrap() - 1.0).abs() < 1e-9, "{r}");
            }
        }
        if let Some(ratio) = r["ratio"].as_object() {
            let to = ratio["to"].as_str().unwrap();
            assert!(rows.iter().any(|b| b["id"] == to), "baseline {to} is a row");
        }
    }
    assert_eq!(groups.len(), 12, "{groups:?}");
    let targets = report["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 9);
    assert!(
        targets.iter().all(|t| t["ratio"].as_f64().is_some()),
        "{targets:?}"
    );
    // The pictures: a CDF per group with latencies, and the throughput chart.
    let svgs: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".svg"))
        .collect();
    assert!(svgs.contains(&"run-throughput.svg".to_string()), "{svgs:?}");
    assert!(
        svgs.contains(&"run-cdf-vmpagerd.svg".to_string()),
        "{svgs:?}"
    );
    assert_eq!(svgs.len(), 11, "{svgs:?}");
    for name in &svgs {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(text.starts_with("<svg"), "{name}");
    }
}
