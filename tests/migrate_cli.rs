//! `vmpager migrate`: a running KVM guest migrates post-copy between two vmpagerd processes,
//! over a healthy link, a link cut mid-migration and a link that turns into a black hole; the
//! command verifies every byte and says so on its last line. Only the outcome is asserted,
//! never a timing.

mod common;

use common::*;
use std::process::Command;

/// Runs `vmpager migrate` with `args` in `dir`; returns its exit success and stdout.
fn migrate(dir: &TestDir, args: &[&str]) -> (bool, String) {
    let out = Command::new(vmpager_binary())
        .arg("migrate")
        .args(args)
        .arg("--workdir")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (
        out.status.success(),
        format!("{stdout}\n--- stderr ---\n{stderr}"),
    )
}

fn assert_verified(ok: bool, out: &str) {
    assert!(ok, "{out}");
    let stdout = out.split("\n--- stderr ---\n").next().unwrap_or("");
    assert_eq!(stdout.lines().last(), Some("verified"), "{out}");
    assert!(
        stdout.contains("every checksum and pattern word verified"),
        "{out}"
    );
}

#[test]
fn a_running_guest_migrates_and_every_byte_is_verified() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("migrate-cli");
    let json = dir.join("figures.json");
    let (ok, out) = migrate(
        &dir,
        &[
            "--memory",
            "64M",
            "--vcpus",
            "2",
            "--json",
            json.to_str().unwrap(),
        ],
    );
    assert_verified(ok, &out);
    assert!(
        out.contains("pages: 16384 of 16384 at the destination"),
        "{out}"
    );
    for line in [
        "downtime: ",
        "total migration time: ",
        "remote fault latency: p50 ",
    ] {
        assert!(out.contains(line), "{line:?} missing: {out}");
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["verified"], true);
    assert_eq!(v["total_pages"], 16384);
    assert_eq!(v["pages_done"], 16384);
    let moved = v["pages_pulled"].as_u64().unwrap() + v["pages_pushed"].as_u64().unwrap();
    assert!(
        moved >= 16384,
        "every page came by a fault or the push: {v}"
    );
    // Nothing is left behind but the figures: the work directory is gone.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("figures.json")]);
}

#[test]
fn a_migration_recovers_from_a_cut_link() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("migrate-cli-cut");
    let (ok, out) = migrate(
        &dir,
        &[
            "--memory",
            "64M",
            "--vcpus",
            "2",
            "--drop-at",
            "50",
            "--delay",
            "1",
        ],
    );
    assert_verified(ok, &out);
    assert!(out.contains("link cut at "), "{out}");
    assert!(number_after(&out, "reconnects: ") >= 1, "{out}");
}

#[test]
fn a_hybrid_migration_pushes_while_the_guest_runs_and_verifies() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("migrate-cli-hybrid");
    let json = dir.join("figures.json");
    let (ok, out) = migrate(
        &dir,
        &[
            "--memory",
            "64M",
            "--vcpus",
            "2",
            "--hybrid",
            "--json",
            json.to_str().unwrap(),
        ],
    );
    assert_verified(ok, &out);
    assert!(out.contains("hybrid: "), "{out}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["hybrid"], true);
    assert_eq!(v["pages_done"], 16384);
    // The push began with the guest: pages were at the destination before the pause (the
    // guest had faulted half of its memory in at the source by then).
    assert!(v["pages_before_pause"].as_u64().unwrap() > 0, "{v}");
    // Every page the guest wrote at the source, before or after it was pushed, is verified at
    // the destination (`verified`): a stale page would fail the run.
}

#[test]
fn a_migration_recovers_from_a_black_hole() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("migrate-cli-hole");
    let (ok, out) = migrate(
        &dir,
        &[
            "--memory",
            "64M",
            "--vcpus",
            "2",
            "--blackhole-at",
            "30",
            "--blackhole-ms",
            "500",
        ],
    );
    assert_verified(ok, &out);
    assert!(out.contains("link black-holed at "), "{out}");
    assert!(number_after(&out, "reconnects: ") >= 1, "{out}");
}

#[test]
fn bad_options_fail_before_anything_starts() {
    let dir = TestDir::new("migrate-cli-bad");
    for args in [
        &["--switch-at", "0"][..],
        &["--drop-at", "100"],
        &["--memory", "12345"],
    ] {
        let (ok, out) = migrate(&dir, args);
        assert!(!ok, "{args:?}: {out}");
        assert!(!out.contains("verified"), "{args:?}: {out}");
    }
}

/// SIGTERM in the middle of a migration (held in a black hole) stops both daemons and removes
/// the work directory; the exit status says which signal.
#[test]
fn sigterm_mid_migration_stops_both_daemons() {
    use std::io::{BufRead, BufReader};
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("migrate-cli-term");
    let mut child = Command::new(vmpager_binary())
        .args([
            "migrate",
            "--memory",
            "64M",
            "--delay",
            "5",
            "--blackhole-at",
            "1",
            "--blackhole-ms",
            "60000",
            "--workdir",
        ])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let pids = [
        number_after(&first, "source vmpagerd (pid "),
        number_after(&first, "destination vmpagerd (pid "),
    ];
    // Wait until the destination's vCPUs are about to run: the link is (or will shortly be)
    // a black hole for a minute.
    for line in lines.by_ref() {
        if line.unwrap().starts_with("switchover: ") {
            break;
        }
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "vmpagerd {pid} is still there"
        );
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
