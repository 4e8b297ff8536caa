//! The command-line interfaces users and scripts depend on: `vmpagerd --print-capabilities`,
//! `vmpager demo`, `vmpager bench --quick --json`, and a VMM process killed mid-run next to a
//! healthy session.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use vmpager_client::demo::{run_scenario, ScenarioConfig};
use vmpager_client::{Client, PopulateMethod};

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

/// `--update-at`: the vCPUs are stopped mid-run, the VM released, and a new VMM process takes
/// it over by id and token, restores the vCPUs' registers into a new KVM VM and finishes: every
/// checksum and every write of the guest is checked.
#[test]
fn demo_update_at_hands_the_running_guest_to_a_new_vmm_process() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("demo-update");
    let stdout = demo(
        &dir,
        &["--memory", "64M", "--vcpus", "2", "--update-at", "30"],
    );
    assert!(
        stdout.contains("vCPUs stopped and their state saved; VM"),
        "{stdout}"
    );
    let new_pid = number_after(&stdout, "new VMM (pid ");
    assert!(new_pid > 0, "{stdout}");
    assert!(
        stdout.lines().last().is_some_and(|l| l
            .starts_with("verified: guest saw every byte of the snapshot across a VMM update at ")),
        "{stdout}"
    );
    // Nothing is left behind: the daemon freed the VM (the new VMM detached it) and the demo
    // removed its directory.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
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
        "[snapshot]",
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
            // Percentiles of one histogram are ordered, and its CDF ends at 1. (A row of the
            // daemon's own figures has p50 and p99 only: the others are null.)
            assert!(q("p50_ns") <= q("p99_ns"), "{r}");
            if let (Some(p999), Some(max)) = (l["p999_ns"].as_f64(), l["max_ns"].as_f64()) {
                assert!(q("p99_ns") <= p999 && p999 <= max, "{r}");
            }
            if let Some(last) = l["cdf"].as_array().unwrap().last() {
                assert!((last[1].as_f64().unwrap() - 1.0).abs() < 1e-9, "{r}");
            }
        }
        if let Some(ratio) = r["ratio"].as_object() {
            let to = ratio["to"].as_str().unwrap();
            assert!(rows.iter().any(|b| b["id"] == to), "baseline {to} is a row");
        }
    }
    assert_eq!(groups.len(), 14, "{groups:?}");
    let targets = report["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 10);
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
    for cdf in ["run-cdf-migration.svg", "run-cdf-snapshot.svg"] {
        assert!(svgs.contains(&cdf.to_string()), "{svgs:?}");
    }
    assert_eq!(svgs.len(), 13, "{svgs:?}");
    for name in &svgs {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(text.starts_with("<svg"), "{name}");
    }
}

/// Starts `vmpager demo --socket-path` against `daemon`'s socket and returns once the guest
/// runs, with the daemon stopped (SIGSTOP) so the guest is surely waiting on it.
fn demo_on(
    socket: &std::path::Path,
    dir: &TestDir,
    daemon: &SocketDaemon,
    env: &[(&str, &str)],
) -> std::process::Child {
    use std::io::BufRead;
    let mut child = Command::new(vmpager_binary())
        .args(["demo", "--memory", "256M", "--vcpus", "2", "--socket-path"])
        .arg(socket)
        .arg("--workdir")
        .arg(dir.path())
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("guest starting") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the demo ended early"
        );
    }
    daemon.signal(rustix::process::Signal::STOP);
    // The rest of stdout is read after the demo ends.
    child.stdout = Some(out.into_inner());
    child
}

/// The new user's case of issue 10: vmpagerd killed with SIGKILL while `vmpager demo
/// --socket-path` runs, then started again with the same command line: the demo goes on and
/// verifies every byte.
#[test]
fn demo_rides_through_a_vmpagerd_restart() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("demo-restart");
    let sockdir = TestDir::new("demo-restart-sock");
    let socket = sockdir.join("vmpagerd.sock");
    let daemon = SocketDaemon::start(&socket, &[]);
    let child = demo_on(&socket, &dir, &daemon, &[]);
    daemon.kill9();
    let _again = SocketDaemon::start(&socket, &[]);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.lines().last() == Some("verified: guest saw every byte of the snapshot"),
        "{stdout}"
    );
}

/// ... and when no vmpagerd comes back, the demo says so and exits: no hang, no zeros.
#[test]
fn demo_fails_with_a_clear_error_when_vmpagerd_does_not_come_back() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("demo-lost");
    let sockdir = TestDir::new("demo-lost-sock");
    let socket = sockdir.join("vmpagerd.sock");
    let daemon = SocketDaemon::start(&socket, &[]);
    let child = demo_on(&socket, &dir, &daemon, &[("VMPAGER_RESTART_DEADLINE", "1")]);
    daemon.kill9();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("went away and did not come back within 1 s: the VM is failed"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "work dir left behind"
    );
}
