//! `vmpager ch-restore` as a separate process restoring a cloud-hypervisor snapshot directory
//! into cloud-hypervisor's receive side, played byte for byte from this process
//! (`peers::cloud_hypervisor`: `Start`, the memfds, `Config` checked for postcopy, the CPUID
//! signature and no prefault, the fault connection, `State`, `Complete`, then its uffd handler:
//! demand faults, the background pull of every page, `UFFDIO_CONTINUE`, the final shutdown).
//! Every byte is checked through the memfds: slots sharing one memfd, a hugepage zone, `--daemon`,
//! working sets, bad snapshots, and a cloud-hypervisor that goes away.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;
use vmpager_client::demo::PatternGen;
use vmpager_client::peers::cloud_hypervisor::{ChReceiver, ChVm, ReceiverOptions};
use vmpager_client::working_set::WorkingSet;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

fn vmpager_binary() -> PathBuf {
    vmpagerd_binary().with_file_name("vmpager")
}

/// One slot: (slot, gpa, size, zone, file offset).
type Slot = (u32, u64, u64, &'static str, u64);

/// A snapshot directory as `ch-remote snapshot` writes it. `mem0` (4 KiB pages) is split into
/// two slots around the 32-bit hole, sharing one memfd; with `huge`, `huge0` (2 MiB pages) comes
/// first in the memory range table (cloud-hypervisor walks zones from a hash map). Returns the
/// slots and the bytes of `memory-ranges`.
fn write_snapshot(dir: &Path, huge: bool) -> (Vec<Slot>, Vec<u8>) {
    let mut slots: Vec<Slot> = Vec::new();
    let mut zones = vec![
        json!({"id": "mem0", "size": 2 * MIB, "shared": true, "hugepages": false,
        "hugepage_size": null, "prefault": false}),
    ];
    if huge {
        zones.push(
            json!({"id": "huge0", "size": 4 * MIB, "shared": true, "hugepages": true,
            "hugepage_size": null, "prefault": false}),
        );
        slots.push((2, 4 * GIB + 8 * MIB, 4 * MIB, "huge0", 0));
    }
    slots.push((0, 0, MIB, "mem0", 0));
    slots.push((1, 4 * GIB, MIB, "mem0", MIB));
    let config = json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": false},
        "memory": {"size": 0, "shared": true, "hugepages": false, "hugepage_size": null,
                   "prefault": false, "zones": zones},
        "payload": {"kernel": "/boot/vmlinux"}
    });
    let ranges: Vec<Value> = slots
        .iter()
        .map(|s| json!({"gpa": s.1, "length": s.2}))
        .collect();
    let mappings: Vec<Value> = slots
        .iter()
        .map(|s| {
            json!({"slot": s.0, "gpa": s.1, "size": s.2, "zone_id": s.3,
                         "virtio_mem": false, "file_offset": s.4})
        })
        .collect();
    let mm = json!({
        "memory_ranges": {"data": ranges},
        "guest_ram_mappings": mappings,
        "start_of_device_area": 8 * GIB, "boot_ram": 0, "current_ram": 0,
        "arch_mem_regions": [], "hotplug_slots": [], "next_memory_slot": 3,
        "selected_slot": 0, "next_hotplug_slot": 0
    });
    let state = json!({
        "snapshots": {
            "memory-manager": {"snapshots": {}, "snapshot_data": {"state": mm.to_string()}},
            "cpu-manager": {"snapshots": {}, "snapshot_data": {"state": "{}"}}
        },
        "snapshot_data": null
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
    let total: u64 = slots.iter().map(|s| s.2).sum();
    let mut bytes = vec![0u8; total as usize];
    PatternGen::new(42).fill(&mut bytes);
    std::fs::write(dir.join("memory-ranges"), &bytes).unwrap();
    (slots, bytes)
}

/// Where slot `i`'s bytes are in `memory-ranges` (the table order is the slots' order).
fn snapshot_offset(slots: &[Slot], i: usize) -> usize {
    slots[..i].iter().map(|s| s.2).sum::<u64>() as usize
}

/// `vmpager ch-restore` as a child; stdout lines collected by a thread.
fn ch_restore(snapshot: &Path, receiver: &Path, args: &[&str]) -> Child {
    Command::new(vmpager_binary())
        .arg("ch-restore")
        .arg(snapshot)
        .arg(format!("unix:{}", receiver.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmpager ch-restore")
}

fn events(out: &Output) -> Vec<Value> {
    BufReader::new(&out.stdout[..])
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

/// Restores the snapshot in `dir` through ch-restore with `args` into a receiver at `sock`;
/// `during` runs on the restored VM before the background pull is awaited.
fn restore(
    dir: &TestDir,
    args: &[&str],
    during: impl FnOnce(&ChVm),
) -> (
    ChVm,
    vmpager_client::peers::cloud_hypervisor::ChReport,
    Vec<Value>,
) {
    let sock = dir.join("mig.sock");
    let receiver = ChReceiver::listen(&sock).unwrap();
    let child = ch_restore(dir.path(), &sock, args);
    let vm = receiver
        .receive(&ReceiverOptions::default())
        .expect("migration received");
    during(&vm);
    // ch-restore returns once cloud-hypervisor's handler has pulled every page and shut the
    // fault connection down; the VM's memory stays mapped for the checks.
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ch-restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = vm.stats();
    (vm, report, events(&out))
}

fn check_memfds(vm: &ChVm, slots: &[Slot], bytes: &[u8]) {
    for (i, s) in slots.iter().enumerate() {
        let m = vm.slots().iter().find(|m| m.slot() == s.0).unwrap();
        let mut got = vec![0u8; s.2 as usize];
        rustix::io::pread(m.memfd(), &mut got, s.4).unwrap();
        let at = snapshot_offset(slots, i);
        assert!(got == bytes[at..at + s.2 as usize], "slot {} differs", s.0);
    }
}

#[test]
fn a_snapshot_is_restored_and_every_page_served_through_the_memfds() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("ch-restore");
    let (slots, bytes) = write_snapshot(dir.path(), false);
    let (vm, report, ev) = restore(&dir, &["--resume"], |vm| {
        // Demand faults from a host thread, in both slots.
        let mut buf = vec![0u8; 8192];
        vm.read_gpa(4 * GIB + 512 * KIB, &mut buf).unwrap();
        let at = snapshot_offset(&slots, 1) + (512 * KIB) as usize;
        assert!(buf == bytes[at..at + 8192]);
        vm.read_gpa(12 * KIB, &mut buf).unwrap();
        assert!(buf == bytes[(12 * KIB) as usize..(20 * KIB) as usize]);
    });
    assert!(vm.resumed());
    // ch-restore returned only after cloud-hypervisor shut the fault connection down.
    assert!(report.shutdown_sent, "{report:?}");
    let pages = 2 * MIB / 4096;
    assert_eq!(report.demand_faults + report.background_pulls, pages);
    assert_eq!(report.errors, 0);
    check_memfds(&vm, &slots, &bytes);
    let kinds: Vec<&str> = ev.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds, ["restored", "done"]);
    let stats = &ev[1]["stats"];
    assert_eq!(stats["channel_requests"], pages);
    assert_eq!(stats["channel_errors"], 0);
    assert_eq!(stats["pages_from_source"], pages, "each page read once");
    // Slots 0 and 1 got the same memfd, as cloud-hypervisor gives a zone's slots.
    let ino = |i: usize| rustix::fs::fstat(vm.slots()[i].memfd()).unwrap().st_ino;
    assert_eq!(ino(0), ino(1));
    let end = vm.wait(Duration::from_secs(10)).unwrap();
    assert_eq!(end.demand_faults + end.background_pulls, pages);
}

#[test]
fn a_hugepage_zone_is_served_two_mib_at_a_time() {
    if !have_uffd() || !have_hugepages(2) {
        return;
    }
    let dir = TestDir::new("ch-huge");
    let (slots, bytes) = write_snapshot(dir.path(), true);
    let (vm, report, ev) = restore(&dir, &[], |vm| {
        let mut buf = vec![0u8; 4096];
        vm.read_gpa(4 * GIB + 8 * MIB + 3 * MIB + 100, &mut buf)
            .unwrap();
        let at = (3 * MIB + 100) as usize;
        assert!(buf == bytes[at..at + 4096]);
    });
    assert!(!vm.resumed(), "CompletePaused without --resume");
    assert!(report.shutdown_sent);
    // 2 huge pages + 512 small ones.
    assert_eq!(report.demand_faults + report.background_pulls, 2 + 512);
    check_memfds(&vm, &slots, &bytes);
    assert_eq!(ev[1]["stats"]["channel_requests"], 2 + 512);
    let huge = vm.slots().iter().find(|s| s.slot() == 2).unwrap();
    assert_eq!(huge.page_size(), 2 * MIB);
}

#[test]
fn a_running_daemon_serves_it_and_the_working_set_is_recorded_and_replayed() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("ch-ws");
    let daemon = daemon_process(&dir, &[]);
    let s = daemon.socket_path().to_str().unwrap().to_string();
    let (slots, bytes) = write_snapshot(dir.path(), false);
    let ws = dir.join("vm.ws");
    let w = ws.to_str().unwrap();
    // Demand faults in the last range of the table (the background pull starts at the first).
    let wanted: Vec<u64> = (0..24).map(|k| 4 * GIB + ((k * 37) % 256) * 4096).collect();
    let read_all = |vm: &ChVm| {
        let mut buf = [0u8; 8];
        for &gpa in &wanted {
            vm.read_gpa(gpa, &mut buf).unwrap();
        }
    };
    let (vm, _, ev) = restore(&dir, &["--daemon", &s, "--record-working-set", w], read_all);
    check_memfds(&vm, &slots, &bytes);
    drop(vm);
    let recorded = WorkingSet::load(&ws).unwrap();
    let source_pages: Vec<u64> = wanted.iter().map(|g| (MIB + g - 4 * GIB) / 4096).collect();
    // Every recorded page is one the guest asked for (a demand fault on the very page the
    // background pull would ask for next cannot be told from it, and is not recorded).
    assert!(recorded.pages().iter().all(|p| source_pages.contains(p)));
    assert!(!recorded.pages().is_empty());
    assert_eq!(ev[1]["recorded_pages"], recorded.entries.len());
    let (vm, report, ev) = restore(&dir, &["--daemon", &s, "--working-set", w], read_all);
    assert_eq!(ev[0]["replay_pages"], recorded.entries.len());
    assert!(report.shutdown_sent);
    check_memfds(&vm, &slots, &bytes);
    drop(vm);
    assert!(daemon.terminate().unwrap().success());
}

#[test]
fn bad_snapshots_and_a_vanished_cloud_hypervisor_end_with_a_clear_error() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("ch-bad");
    write_snapshot(dir.path(), false);
    let run = |snapshot: &Path, receiver: &str| {
        let out = Command::new(vmpager_binary())
            .arg("ch-restore")
            .arg(snapshot)
            .arg(receiver)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let sock = dir.join("nobody.sock");
    let err = run(dir.path(), "tcp:127.0.0.1:6000");
    assert!(err.contains("unix:PATH"), "{err}");
    let err = run(dir.path(), &format!("unix:{}", sock.display()));
    assert!(err.contains("receive-migration"), "{err}");
    // A snapshot without its state.
    let broken = TestDir::new("ch-broken");
    write_snapshot(broken.path(), false);
    std::fs::remove_file(broken.join("state.json")).unwrap();
    let err = run(broken.path(), &format!("unix:{}", sock.display()));
    assert!(err.contains("state.json"), "{err}");
    // A memory manager slot outside every memory range.
    let state = std::fs::read_to_string(dir.join("state.json")).unwrap();
    std::fs::write(
        broken.join("state.json"),
        state.replace(
            "\\\"gpa\\\":4294967296,\\\"size\\\"",
            "\\\"gpa\\\":4294971392,\\\"size\\\"",
        ),
    )
    .unwrap();
    let err = run(broken.path(), &format!("unix:{}", sock.display()));
    assert!(err.contains("bad snapshot"), "{err}");
    // cloud-hypervisor goes away after answering Start.
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let child = ch_restore(dir.path(), &sock, &[]);
    let (mut conn, _) = listener.accept().unwrap();
    let req = vmpager_compat::cloud_hypervisor::wire::read_request(&mut conn).unwrap();
    assert_eq!(
        req.command(),
        vmpager_compat::cloud_hypervisor::wire::Command::Start
    );
    vmpager_compat::cloud_hypervisor::wire::write_response(
        &mut conn,
        vmpager_compat::cloud_hypervisor::wire::Response::ok(),
    )
    .unwrap();
    drop(conn);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("went away"), "{err}");
    // cloud-hypervisor refuses the configuration.
    let child = ch_restore(dir.path(), &sock, &[]);
    let (mut conn, _) = listener.accept().unwrap();
    use vmpager_compat::cloud_hypervisor::wire as w;
    w::read_request(&mut conn).unwrap();
    w::write_response(&mut conn, w::Response::ok()).unwrap();
    loop {
        let req = w::read_request(&mut conn).unwrap();
        if req.command() == w::Command::MemoryFd {
            w::recv_memory_fd(std::os::fd::AsFd::as_fd(&conn)).unwrap();
            w::write_response(&mut conn, w::Response::ok()).unwrap();
            continue;
        }
        assert_eq!(req.command(), w::Command::Config);
        let mut payload = vec![0u8; req.length() as usize];
        std::io::Read::read_exact(&mut conn, &mut payload).unwrap();
        let config: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(config["memory_mode"], "Postcopy");
        w::write_response(&mut conn, w::Response::error()).unwrap();
        break;
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Config"), "{err}");
}
