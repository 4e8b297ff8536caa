//! `vmpager firecracker-handler` as a separate process, driven by Firecracker's side of the
//! protocol played byte for byte from another process (`peers::firecracker`: private anonymous
//! memory registered on a uffd, the JSON handshake with the uffd in one sendmsg, a socket never
//! read). Every byte the "guest" reads is checked against the memory file; removed ranges read
//! as zeros; 2 MiB pages; several VMs on one handler; bad handshakes refused while the other VMs
//! keep being served; `--daemon`; working sets recorded and replayed.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;
use vmpager_client::demo::PatternGen;
use vmpager_client::peers::firecracker::{FirecrackerRegion, FirecrackerVm, Handshake};
use vmpager_client::working_set::WorkingSet;
use vmpager_compat::firecracker::{GuestRegionUffdMapping, PAGE_2M, PAGE_4K};

const MIB: u64 = 1 << 20;

fn vmpager_binary() -> PathBuf {
    vmpagerd_binary().with_file_name("vmpager")
}

/// `vmpager firecracker-handler` as a child process, its JSON events read line by line.
struct Handler {
    child: Child,
    events: Receiver<serde_json::Value>,
    socket: PathBuf,
}

impl Handler {
    fn start(dir: &TestDir, mem_file: &Path, args: &[&str]) -> Handler {
        let socket = dir.join(&format!("fc{}.sock", args.len()));
        let mut child = Command::new(vmpager_binary())
            .arg("firecracker-handler")
            .arg(&socket)
            .arg(mem_file)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start vmpager firecracker-handler");
        let out = child.stdout.take().unwrap();
        let (tx, events) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        let h = Handler {
            child,
            events,
            socket,
        };
        h.expect("listening");
        h
    }

    /// The next event, which must be of `kind`.
    fn expect(&self, kind: &str) -> serde_json::Value {
        match self.events.recv_timeout(Duration::from_secs(60)) {
            Ok(e) if e["event"] == kind => e,
            Ok(e) => panic!("expected a {kind} event, got {e}"),
            Err(RecvTimeoutError::Timeout) => panic!("no {kind} event within 60 s"),
            Err(RecvTimeoutError::Disconnected) => panic!("the handler exited before {kind}"),
        }
    }

    fn restore(&self, regions: &[FirecrackerRegion]) -> FirecrackerVm {
        let vm = FirecrackerVm::restore(&self.socket, regions).expect("restore");
        self.expect("vm-start");
        vm
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.child.wait();
    }
}

fn regions(sizes: &[u64]) -> Vec<FirecrackerRegion> {
    sizes
        .iter()
        .map(|&size| FirecrackerRegion {
            size,
            page_size: PAGE_4K,
        })
        .collect()
}

fn stat(event: &serde_json::Value, name: &str) -> u64 {
    event["stats"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {event}"))
}

#[test]
fn firecracker_vms_get_every_byte_of_the_snapshot() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("fc-bytes");
    let sizes = [64 << 10, 2 * MIB, 6 * MIB];
    let total: u64 = sizes.iter().sum();
    let mem = dir.join("mem");
    vmpager_client::demo::write_image(&mem, total, 3).unwrap();
    let file = std::fs::File::open(&mem).unwrap();
    let h = Handler::start(&dir, &mem, &[]);
    // Two VMs from the same snapshot, served at the same time.
    let a = h.restore(&regions(&sizes));
    let b = h.restore(&regions(&sizes));
    std::thread::scope(|s| {
        s.spawn(|| assert_eq!(a.verify_against(&file, 2).unwrap(), total));
        s.spawn(|| assert_eq!(b.verify_against(&file, 2).unwrap(), total));
    });
    drop(a);
    let end = h.expect("vm-end");
    let pages = total / 4096;
    assert_eq!(stat(&end, "pages_from_source"), pages);
    assert_eq!(stat(&end, "source_bytes_read"), total);
    assert!(
        stat(&end, "pages_prefetched") > 0,
        "fault-around installed neighbours"
    );
    assert!(stat(&end, "faults") < pages);
    assert_eq!(
        stat(&end, "source_errors") + stat(&end, "populate_errors"),
        0
    );
    // The other VM is still served after the first is gone.
    let mut buf = vec![0u8; 4096];
    b.read(2, 4 * MIB, &mut buf).unwrap();
    drop(b);
    h.expect("vm-end");
}

#[test]
fn a_ballooned_range_reads_as_zeros_and_huge_pages_arrive_whole() {
    if !have_uffd() || !have_hugepages(2) {
        return;
    }
    let dir = TestDir::new("fc-balloon");
    let mem = dir.join("mem");
    vmpager_client::demo::write_image(&mem, 8 * MIB, 5).unwrap();
    let mut image = vec![0u8; (8 * MIB) as usize];
    PatternGen::new(5).fill(&mut image);
    let h = Handler::start(&dir, &mem, &[]);
    let vm = h.restore(&[
        FirecrackerRegion {
            size: 4 * MIB,
            page_size: PAGE_4K,
        },
        FirecrackerRegion {
            size: 4 * MIB,
            page_size: PAGE_2M,
        },
    ]);
    let file = std::fs::File::open(&mem).unwrap();
    vm.verify_against(&file, 2).unwrap();
    // Balloon inflation: REMOVE events; touched again, the ranges are zeros, never the snapshot.
    vm.balloon_inflate(0, MIB, 64 << 10).unwrap();
    vm.balloon_inflate(1, 2 * MIB, 2 * MIB).unwrap();
    let mut buf = vec![0xffu8; (64 << 10) as usize];
    vm.read(0, MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let mut huge = vec![0xffu8; (2 * MIB) as usize];
    vm.read(1, 2 * MIB, &mut huge).unwrap();
    assert!(huge.iter().all(|&b| b == 0));
    vm.read(1, 0, &mut huge).unwrap();
    assert!(huge == image[(4 * MIB) as usize..(6 * MIB) as usize]);
    drop(vm);
    let end = h.expect("vm-end");
    assert_eq!(stat(&end, "remove_events"), 2);
    assert_eq!(stat(&end, "pages_zero"), 16 + 1);
}

/// The handshake Firecracker would send for `regions` of `vm`, with `edit` applied.
fn handshake_of(vm: &FirecrackerVm, edit: impl Fn(&mut Vec<GuestRegionUffdMapping>)) -> Vec<u8> {
    let mut m: Vec<GuestRegionUffdMapping> = vm
        .regions()
        .iter()
        .map(|r| GuestRegionUffdMapping {
            base_host_virt_addr: r.host_addr().as_ptr() as u64,
            size: r.size(),
            offset: r.file_offset(),
            page_size: r.page_size(),
            page_size_kib: Some(r.page_size()),
        })
        .collect();
    edit(&mut m);
    vmpager_compat::firecracker::encode_handshake(&m)
}

#[test]
fn bad_handshakes_are_refused_and_the_other_vms_keep_being_served() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("fc-bad");
    let mem = dir.join("mem");
    vmpager_client::demo::write_image(&mem, 8 * MIB, 7).unwrap();
    let file = std::fs::File::open(&mem).unwrap();
    let h = Handler::start(&dir, &mem, &[]);
    let good = h.restore(&regions(&[4 * MIB]));
    let refused = |handshake: Handshake, sizes: &[u64]| {
        let vm = FirecrackerVm::restore_with(&h.socket, &regions(sizes), handshake).unwrap();
        let e = h.expect("vm-refused");
        drop(vm);
        e["error"].as_str().unwrap().to_string()
    };
    let why = refused(
        Handshake::Raw(b"[{\"base_host_virt_addr\": 1".to_vec()),
        &[MIB],
    );
    assert!(why.contains("bad handshake"), "{why}");
    let why = refused(Handshake::Raw(b"{\"not\": \"an array\"}".to_vec()), &[MIB]);
    assert!(why.contains("bad handshake"), "{why}");
    let why = refused(Handshake::NoFd, &[MIB]);
    assert!(
        why.to_lowercase().contains("uffd") || why.contains("fd"),
        "{why}"
    );
    // Regions that run past the end of the memory file.
    let why = refused(Handshake::Firecracker, &[4 * MIB, 6 * MIB]);
    assert!(why.contains("bad regions"), "{why}");
    // Overlapping regions, and an unknown page size; unknown fields are fine.
    let probe = FirecrackerVm::restore_with(
        &h.socket,
        &regions(&[MIB, MIB]),
        Handshake::Raw(b"x".to_vec()),
    )
    .unwrap();
    h.expect("vm-refused");
    for (edit, what) in [
        (
            Box::new(|m: &mut Vec<GuestRegionUffdMapping>| {
                m[1].base_host_virt_addr = m[0].base_host_virt_addr + 4096;
            }) as Box<dyn Fn(&mut Vec<GuestRegionUffdMapping>)>,
            "overlap",
        ),
        (
            Box::new(|m: &mut Vec<GuestRegionUffdMapping>| {
                m[0].page_size = 8192;
                m[0].page_size_kib = Some(8192);
            }),
            "page size",
        ),
    ] {
        let why = refused(Handshake::Raw(handshake_of(&probe, edit)), &[MIB, MIB]);
        assert!(why.contains("bad regions"), "{what}: {why}");
    }
    let mut extra = handshake_of(&probe, |_| {});
    extra.splice(2..2, b"\"firecracker_future_field\":[1,2],".iter().copied());
    let accepted =
        FirecrackerVm::restore_with(&h.socket, &regions(&[MIB, MIB]), Handshake::Raw(extra));
    drop(accepted);
    // (the probe's own memory is what that handshake names, so the handler serves it)
    h.expect("vm-start");
    h.expect("vm-end");
    drop(probe);
    // The first VM was served all along.
    assert_eq!(good.verify_against(&file, 2).unwrap(), 4 * MIB);
}

#[test]
fn the_handler_hands_its_vms_to_a_running_daemon() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("fc-daemon");
    let daemon = daemon_process(&dir, &[]);
    let mem = dir.join("mem");
    vmpager_client::demo::write_image(&mem, 4 * MIB, 9).unwrap();
    let file = std::fs::File::open(&mem).unwrap();
    let socket = daemon.socket_path().to_str().unwrap().to_string();
    let h = Handler::start(&dir, &mem, &["--daemon", &socket]);
    let vm = h.restore(&regions(&[4 * MIB]));
    vm.verify_against(&file, 1).unwrap();
    drop(vm);
    let end = h.expect("vm-end");
    assert_eq!(stat(&end, "pages_from_source"), 1024);
    // The daemon is still up for the next VM; SIGTERM ends it cleanly.
    let vm = h.restore(&regions(&[4 * MIB]));
    vm.verify_against(&file, 1).unwrap();
    drop(vm);
    h.expect("vm-end");
    drop(h);
    assert!(daemon.terminate().unwrap().success());
}

#[test]
fn a_recorded_working_set_is_replayed_into_the_next_vms() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("fc-ws");
    let mem = dir.join("mem");
    let size = 16 * MIB;
    vmpager_client::demo::write_image(&mem, size, 11).unwrap();
    let file = std::fs::File::open(&mem).unwrap();
    let ws_path = dir.join("fn.ws");
    let pages = size / 4096;
    let order: Vec<u64> = (0..200u64).map(|k| (k * 1237 + 5) % pages).collect();
    let touch = |vm: &FirecrackerVm| {
        let mut w = [0u8; 8];
        for &p in &order {
            vm.read(0, p * 4096, &mut w).unwrap();
        }
    };
    {
        let h = Handler::start(
            &dir,
            &mem,
            &["--record-working-set", ws_path.to_str().unwrap()],
        );
        let vm = h.restore(&regions(&[size]));
        touch(&vm);
        drop(vm);
        let end = h.expect("vm-end");
        assert_eq!(end["recorded_pages"], 200);
        assert_eq!(
            stat(&end, "pages_prefetched"),
            0,
            "no readahead while recording"
        );
    }
    let ws = WorkingSet::load(&ws_path).unwrap();
    assert_eq!(ws.pages(), order, "the first touches, in order");
    assert_eq!(ws.snapshot.size, size);
    let h = Handler::start(&dir, &mem, &["--working-set", ws_path.to_str().unwrap()]);
    let vm = FirecrackerVm::restore(&h.socket, &regions(&[size])).unwrap();
    let start = h.expect("vm-start");
    assert_eq!(start["replay_pages"], 200);
    touch(&vm);
    vm.verify_against(&file, 2).unwrap();
    drop(vm);
    let end = h.expect("vm-end");
    assert!(stat(&end, "pages_replayed") <= 200);
    assert_eq!(
        stat(&end, "pages_from_source"),
        pages,
        "every page once: replayed, faulted or installed around a fault"
    );
    drop(h);
    // A working set of another snapshot is refused before anything is served.
    let other = dir.join("other");
    vmpager_client::demo::write_image(&other, size, 12).unwrap();
    let out = Command::new(vmpager_binary())
        .arg("firecracker-handler")
        .arg(dir.join("x.sock"))
        .arg(&other)
        .args(["--working-set", ws_path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another snapshot"), "{err}");
}
