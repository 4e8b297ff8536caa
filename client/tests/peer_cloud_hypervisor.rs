//! The cloud-hypervisor receiver peer (`vmpager_client::peers::cloud_hypervisor`) against a
//! minimal sender written here: memfds filled on demand from a test pattern, a Config with two
//! zones (one split into two slots sharing a memfd at different offsets), a fault connection
//! that answers `PageFault` by writing the page into the memfd and replying `Ok`.
//!
//! The 2 MiB hugepage test raises `/proc/sys/vm/nr_hugepages` if it must; when hugepages cannot
//! be had it prints why and passes, unless `VMPAGER_REQUIRE_KVM=1` is set (then it fails).

use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vmpager_client::peers::cloud_hypervisor::{
    ChReceiver, ChVm, PeerError, PeerErrorKind, ReceiverOptions,
};
use vmpager_compat::cloud_hypervisor::snapshot::common_cpuid_for;
use vmpager_compat::cloud_hypervisor::wire::{
    self, Command, ConnectionRole, MemoryRange, Request, Response, Status, WireError,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const WAIT: Duration = Duration::from_secs(30);

/// The byte the guest holds at `gpa`.
fn pattern(gpa: u64) -> u8 {
    let word = (gpa / 8 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (word >> ((gpa % 8) * 8)) as u8
}

fn pattern_of(gpa: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern(gpa + i)).collect()
}

/// A memfd and the sender's own mapping of it.
struct Memfd {
    fd: OwnedFd,
    addr: usize,
    len: usize,
}

impl Memfd {
    fn new(name: &str, len: u64, huge: bool) -> std::io::Result<Memfd> {
        use rustix::fs::MemfdFlags;
        let mut flags = MemfdFlags::CLOEXEC;
        if huge {
            flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
        }
        let fd = rustix::fs::memfd_create(name, flags)?;
        rustix::fs::ftruncate(&fd, len)?;
        let len = len as usize;
        // SAFETY: a new shared mapping at a kernel-chosen address aliases nothing; it is unmapped
        // once, in Drop, and only reached through raw pointers.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )
        }?;
        Ok(Memfd {
            fd,
            addr: ptr as usize,
            len,
        })
    }

    /// Writes `bytes` at `offset` of the file (through the sender's mapping).
    fn write(&self, offset: u64, bytes: &[u8]) {
        let offset = offset as usize;
        assert!(offset + bytes.len() <= self.len, "write past the memfd");
        // SAFETY: the range lies inside this live mapping (asserted); the source is a distinct
        // Rust buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (self.addr as *mut u8).add(offset),
                bytes.len(),
            )
        };
    }
}

impl Drop for Memfd {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`, owned by this value.
        let _ = unsafe { rustix::mm::munmap(self.addr as *mut std::ffi::c_void, self.len) };
    }
}

struct TestSlot {
    slot: u32,
    gpa: u64,
    size: u64,
    file_offset: u64,
    memfd: usize,
    zone: &'static str,
}

/// The guest as the sender knows it.
struct Guest {
    memfds: Vec<Memfd>,
    slots: Vec<TestSlot>,
    /// `vm_config.memory`.
    memory: Value,
    ranges: Vec<MemoryRange>,
}

impl Guest {
    /// Two 4 KiB zones: "zone0" (one memfd of 512 KiB split into slots 0 and 1 at file
    /// offsets 0 and 256 KiB) and "zone1" (slot 2). Every third page of the first memfd is
    /// already in the file (minor faults); the rest arrive on demand (missing faults).
    fn two_zones() -> Guest {
        let memfds = vec![
            Memfd::new("zone0", 512 * KIB, false).expect("memfd"),
            Memfd::new("zone1", 256 * KIB, false).expect("memfd"),
        ];
        let slots = vec![
            TestSlot {
                slot: 0,
                gpa: 0,
                size: 256 * KIB,
                file_offset: 0,
                memfd: 0,
                zone: "zone0",
            },
            TestSlot {
                slot: 1,
                gpa: MIB,
                size: 256 * KIB,
                file_offset: 256 * KIB,
                memfd: 0,
                zone: "zone0",
            },
            TestSlot {
                slot: 2,
                gpa: 2 * MIB,
                size: 256 * KIB,
                file_offset: 0,
                memfd: 1,
                zone: "zone1",
            },
        ];
        let memory = json!({
            "size": 0,
            "mergeable": false,
            "hotplug_method": "Acpi",
            "shared": true,
            "hugepages": false,
            "prefault": false,
            "zones": [
                {"id": "zone0", "size": 512 * KIB, "shared": true, "hugepages": false,
                 "hugepage_size": null, "prefault": false},
                {"id": "zone1", "size": 256 * KIB, "shared": true, "hugepages": false,
                 "hugepage_size": null, "prefault": false},
            ],
        });
        let ranges = slots
            .iter()
            .map(|s| MemoryRange {
                gpa: s.gpa,
                length: s.size,
            })
            .collect();
        let guest = Guest {
            memfds,
            slots,
            memory,
            ranges,
        };
        for page in (0..guest.slots[0].size / 4096).step_by(3) {
            guest.fill(page * 4096, 4096);
        }
        guest
    }

    /// One 4 MiB zone ("mem0", no zones list) of 2 MiB hugepages; the first hugepage is
    /// already in the file.
    fn hugepages() -> std::io::Result<Guest> {
        let memfds = vec![Memfd::new("huge", 4 * MIB, true)?];
        let slots = vec![TestSlot {
            slot: 0,
            gpa: 0,
            size: 4 * MIB,
            file_offset: 0,
            memfd: 0,
            zone: "mem0",
        }];
        let memory = json!({
            "size": 4 * MIB, "shared": true, "hugepages": true, "hugepage_size": null,
            "prefault": false, "zones": null,
        });
        let guest = Guest {
            memfds,
            slots,
            memory,
            ranges: vec![MemoryRange {
                gpa: 0,
                length: 4 * MIB,
            }],
        };
        guest.fill(0, 2 * MIB);
        Ok(guest)
    }

    fn total(&self) -> u64 {
        self.ranges.iter().map(|r| r.length).sum()
    }

    /// Writes the pattern for `[gpa, gpa + len)` into the memfd.
    fn fill(&self, gpa: u64, len: u64) {
        let s = self
            .slots
            .iter()
            .find(|s| gpa >= s.gpa && gpa + len <= s.gpa + s.size)
            .expect("gpa range in one slot");
        self.memfds[s.memfd].write(
            s.file_offset + (gpa - s.gpa),
            &pattern_of(gpa, len as usize),
        );
    }

    /// The `VmMigrationConfig` JSON a sender sends.
    fn config(&self) -> Value {
        let vm_config = json!({
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": false},
            "memory": self.memory,
            "payload": {"kernel": "/nonexistent"},
        });
        let mappings: Vec<Value> = self
            .slots
            .iter()
            .map(|s| {
                json!({"slot": s.slot, "gpa": s.gpa, "size": s.size, "zone_id": s.zone,
                       "virtio_mem": false, "file_offset": s.file_offset})
            })
            .collect();
        let ranges: Vec<Value> = self
            .ranges
            .iter()
            .map(|r| json!({"gpa": r.gpa, "length": r.length}))
            .collect();
        json!({
            "common_cpuid": common_cpuid_for(&vm_config),
            "vm_config": vm_config,
            "memory_manager_data": {
                "memory_ranges": {"data": ranges},
                "guest_ram_mappings": mappings,
                "next_memory_slot": self.slots.len(),
                "start_of_device_area": 0xc000_0000u64,
                "boot_ram": self.total(),
                "current_ram": self.total(),
                "arch_mem_regions": [],
            },
            "memory_mode": "Postcopy",
        })
    }
}

fn sock_path(test: &str) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("vmpager-chpeer-{test}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// Starts a receiver at `path` on its own thread.
fn spawn_receiver(path: &Path, opts: ReceiverOptions) -> JoinHandle<Result<ChVm, PeerError>> {
    let receiver = ChReceiver::listen(path).expect("listen");
    std::thread::spawn(move || receiver.receive(&opts))
}

/// The sender's main connection.
struct Sender {
    main: UnixStream,
    path: PathBuf,
}

impl Sender {
    fn connect(path: &Path) -> Sender {
        Sender {
            main: UnixStream::connect(path).expect("connect"),
            path: path.to_path_buf(),
        }
    }

    fn request(&mut self, request: Request, payload: &[u8]) -> Response {
        wire::write_request(&mut self.main, request).expect("write request");
        self.main.write_all(payload).expect("write payload");
        wire::read_response(&mut self.main).expect("read response")
    }

    fn start(&mut self) {
        assert_eq!(self.request(Request::start(), &[]).status(), Status::Ok);
    }

    fn memory_fds(&mut self, guest: &Guest) {
        for s in &guest.slots {
            wire::send_memory_fd(self.main.as_fd(), s.slot, guest.memfds[s.memfd].fd.as_fd())
                .expect("send MemoryFd");
            let response = wire::read_response(&mut self.main).expect("MemoryFd response");
            assert_eq!(response.status(), Status::Ok, "MemoryFd of slot {}", s.slot);
        }
    }

    fn config(&mut self, config: &Value) -> Response {
        let payload = serde_json::to_vec(config).expect("json");
        self.request(Request::config(payload.len() as u64), &payload)
    }

    fn state(&mut self) -> Response {
        let payload = br#"{"snapshots":{},"snapshot_data":null}"#;
        self.request(Request::state(payload.len() as u64), payload)
    }

    /// An additional connection opening with `role`.
    fn connect_role(&self, role: ConnectionRole) -> UnixStream {
        let mut conn = UnixStream::connect(&self.path).expect("connect");
        wire::write_role(&mut conn, role).expect("write role");
        conn
    }
}

/// What the fault-serving thread saw.
#[derive(Debug, Default)]
struct FaultLog {
    requests: Vec<MemoryRange>,
    /// The receiver shut the connection down (every page received, or it gave up).
    eof: bool,
}

#[derive(Default)]
struct FaultPolicy {
    /// Holds the answer to the first request until a message arrives, after announcing the
    /// request's gpa on the second channel.
    gate: Option<(mpsc::Receiver<()>, mpsc::Sender<u64>)>,
    /// Answers `Error` for this gpa.
    error_for: Option<u64>,
}

/// Serves `PageFault` requests: writes the page into the memfd, answers `Ok` with no payload.
fn serve_faults(mut conn: UnixStream, guest: Arc<Guest>, policy: FaultPolicy) -> FaultLog {
    let mut log = FaultLog::default();
    loop {
        let request = match wire::read_request(&mut conn) {
            Ok(request) => request,
            Err(WireError::Closed) => {
                log.eof = true;
                return log;
            }
            Err(e) => panic!("fault connection: {e}"),
        };
        assert_eq!(request.command(), Command::PageFault);
        assert_eq!(request.length(), 16);
        let range = wire::read_range(&mut conn).expect("read range");
        if log.requests.is_empty() {
            if let Some((gate, arrived)) = &policy.gate {
                arrived.send(range.gpa).expect("announce the first request");
                gate.recv().expect("gate");
            }
        }
        log.requests.push(range);
        if policy.error_for == Some(range.gpa) {
            wire::write_response(&mut conn, Response::error()).expect("write response");
            continue;
        }
        guest.fill(range.gpa, range.length);
        wire::write_response(&mut conn, Response::ok()).expect("write response");
    }
}

/// A sender that ran through `Complete` (or `CompletePaused`), its fault thread still serving.
struct Session {
    vm: ChVm,
    faults: JoinHandle<FaultLog>,
    guest: Arc<Guest>,
}

fn full_session(test: &str, guest: Guest, policy: FaultPolicy, paused: bool) -> Session {
    let path = sock_path(test);
    let receiver = spawn_receiver(&path, ReceiverOptions::default());
    let guest = Arc::new(guest);
    let mut sender = Sender::connect(&path);
    sender.start();
    sender.memory_fds(&guest);
    assert_eq!(sender.config(&guest.config()).status(), Status::Ok);
    // A connection with role 0 is dropped by the receiver; then the fault connection.
    drop(sender.connect_role(ConnectionRole::Invalid));
    let fault_conn = sender.connect_role(ConnectionRole::Fault);
    let faults = {
        let guest = Arc::clone(&guest);
        std::thread::spawn(move || serve_faults(fault_conn, guest, policy))
    };
    assert_eq!(sender.state().status(), Status::Ok);
    let complete = if paused {
        Request::complete_paused()
    } else {
        Request::complete()
    };
    assert_eq!(sender.request(complete, &[]).status(), Status::Ok);
    let vm = receiver.join().expect("receiver thread").expect("receive");
    assert_eq!(vm.resumed(), !paused);
    Session { vm, faults, guest }
}

/// Blocks until a fault is pending on the VM's uffd.
fn wait_for_fault(vm: &ChVm) {
    let uffd = vm.uffd();
    let mut fds = [rustix::event::PollFd::new(
        &uffd,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: 30,
        tv_nsec: 0,
    };
    let ready = rustix::event::poll(&mut fds, Some(&timeout)).expect("poll uffd");
    assert_eq!(ready, 1, "no fault became pending on the uffd");
}

/// Holds the answer to the first `PageFault` so a host read can fault while the handler waits.
struct Gate {
    open: mpsc::Sender<()>,
    arrived: mpsc::Receiver<u64>,
}

impl Gate {
    /// The gate and the fault policy that uses it.
    fn new(error_for: Option<u64>) -> (Gate, FaultPolicy) {
        let (open, gate) = mpsc::channel();
        let (announce, arrived) = mpsc::channel();
        let policy = FaultPolicy {
            gate: Some((gate, announce)),
            error_for,
        };
        (Gate { open, arrived }, policy)
    }

    /// Once the handler waits for the answer to its first background request (gpa 0), reads
    /// `buf.len()` bytes at `gpa` on another thread; once that read's fault is pending on the
    /// uffd, lets the first answer go.
    fn read_while_held(self, vm: &ChVm, gpa: u64, buf: &mut [u8]) -> Result<(), PeerError> {
        let first = self.arrived.recv().expect("first request");
        assert_eq!(first, 0, "the background pull starts at the table's start");
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| vm.read_gpa(gpa, buf));
            wait_for_fault(vm);
            self.open.send(()).expect("open the gate");
            reader.join().expect("reader thread")
        })
    }
}

fn pages(guest: &Guest) -> u64 {
    guest.total() / 4096
}

fn assert_every_page_once(log: &FaultLog, guest: &Guest, page_size: u64) {
    let mut seen = HashSet::new();
    for r in &log.requests {
        assert_eq!(r.length, page_size, "request {r:?}");
        assert_eq!(r.gpa % page_size, 0, "request {r:?}");
        assert!(seen.insert(r.gpa), "page {:#x} asked for twice", r.gpa);
    }
    let expected: HashSet<u64> = guest
        .ranges
        .iter()
        .flat_map(|r| (0..r.length / page_size).map(move |i| r.gpa + i * page_size))
        .collect();
    assert_eq!(seen, expected);
}

fn assert_guest_reads_pattern(vm: &ChVm, guest: &Guest) {
    for r in &guest.ranges {
        let mut buf = vec![0u8; r.length as usize];
        vm.read_gpa(r.gpa, &mut buf).expect("read_gpa");
        assert!(
            buf == pattern_of(r.gpa, buf.len()),
            "guest memory at {:#x} differs from the pattern",
            r.gpa
        );
    }
}

#[test]
fn full_session_pulls_every_page_in_table_order() {
    let Session { vm, faults, guest } =
        full_session("full", Guest::two_zones(), FaultPolicy::default(), false);
    // The handler shuts the fault connection down once every page is served.
    let log = faults.join().expect("fault thread");
    assert!(log.eof, "the fault connection did not reach EOF");
    assert_every_page_once(&log, &guest, 4096);
    let table_order: Vec<u64> = guest
        .ranges
        .iter()
        .flat_map(|r| (0..r.length / 4096).map(move |i| r.gpa + i * 4096))
        .collect();
    let asked: Vec<u64> = log.requests.iter().map(|r| r.gpa).collect();
    assert_eq!(asked, table_order, "background pull out of table order");

    assert_eq!(vm.slots().len(), 3);
    assert_eq!(vm.slots()[1].file_offset(), 256 * KIB);
    assert_eq!(vm.slots()[2].zone_id(), "zone1");
    assert!(vm.slots().iter().all(|s| s.page_size() == 4096));
    // Every page is mapped now: reads see the pattern without faulting.
    assert_guest_reads_pattern(&vm, &guest);
    let mut buf = [0u8; 8];
    let err = vm.read_gpa(512 * KIB, &mut buf).expect_err("hole");
    assert!(matches!(err, PeerError::OutOfRange { .. }), "{err}");
    let err = vm
        .read_gpa(256 * KIB - 4, &mut buf)
        .expect_err("past a slot");
    assert!(matches!(err, PeerError::OutOfRange { .. }), "{err}");

    let report = vm.wait(WAIT).expect("wait");
    assert_eq!(report.demand_faults, 0);
    assert_eq!(report.background_pulls, pages(&guest));
    assert_eq!(report.errors, 0);
    assert!(report.shutdown_sent);
}

#[test]
fn host_reads_raise_demand_faults() {
    let (gate, policy) = Gate::new(None);
    let Session { vm, faults, guest } = full_session("demand", Guest::two_zones(), policy, true);
    // While the first background request (gpa 0) is held, a read of two pages of slot 2
    // faults, far ahead of the background cursor.
    let gpa = 2 * MIB + 5 * 4096 - 100;
    let mut buf = vec![0u8; 200];
    gate.read_while_held(&vm, gpa, &mut buf).expect("read_gpa");
    assert_eq!(buf, pattern_of(gpa, buf.len()));

    let log = faults.join().expect("fault thread");
    assert!(log.eof);
    assert_every_page_once(&log, &guest, 4096);
    assert_eq!(
        log.requests[0].gpa, 0,
        "the background starts at the table's start"
    );
    assert_eq!(
        log.requests[1].gpa,
        2 * MIB + 4 * 4096,
        "the pending fault is served next"
    );
    assert_guest_reads_pattern(&vm, &guest);
    let report = vm.wait(WAIT).expect("wait");
    assert_eq!(report.demand_faults, 2, "{report:?}");
    assert_eq!(report.background_pulls, pages(&guest) - 2);
    assert_eq!(report.errors, 0);
    assert!(report.shutdown_sent);
}

#[test]
fn demand_fault_answered_with_error_fails_the_handler() {
    let bad = 2 * MIB + 4 * 4096;
    let (gate, policy) = Gate::new(Some(bad));
    let Session { vm, faults, .. } =
        full_session("demand-error", Guest::two_zones(), policy, false);
    let mut buf = [0u8; 16];
    let err = gate
        .read_while_held(&vm, bad + 8, &mut buf)
        .expect_err("the read must report the failed handler");
    assert!(matches!(err, PeerError::HandlerFailed { .. }), "{err}");
    assert_eq!(err.kind(), PeerErrorKind::SenderFailed);
    let log = faults.join().expect("fault thread");
    assert!(
        log.eof,
        "the receiver closes the fault connection when it fails"
    );
    assert_eq!(log.requests.len(), 2);
    let err = vm.wait(WAIT).expect_err("wait must fail");
    assert!(
        matches!(err, PeerError::PageFaultRefused { gpa, .. } if gpa == bad),
        "{err}"
    );
    assert!(err.to_string().contains("Error"), "{err}");
}

/// A receiver and a sender that got as far as `Start` and `MemoryFd`s.
fn started(
    test: &str,
    opts: ReceiverOptions,
) -> (JoinHandle<Result<ChVm, PeerError>>, Sender, Guest) {
    let path = sock_path(test);
    let receiver = spawn_receiver(&path, opts);
    let guest = Guest::two_zones();
    let mut sender = Sender::connect(&path);
    sender.start();
    sender.memory_fds(&guest);
    (receiver, sender, guest)
}

fn refused(receiver: JoinHandle<Result<ChVm, PeerError>>) -> PeerError {
    match receiver.join().expect("receiver thread") {
        Ok(_) => panic!("the receiver accepted the migration"),
        Err(e) => e,
    }
}

fn assert_config_refused(test: &str, edit: impl FnOnce(&mut Value), expect: &str) {
    let (receiver, mut sender, guest) = started(test, ReceiverOptions::default());
    let mut config = guest.config();
    edit(&mut config);
    assert_eq!(sender.config(&config).status(), Status::Error);
    let err = refused(receiver);
    assert_eq!(err.kind(), PeerErrorKind::Refused, "{err}");
    assert!(err.to_string().contains(expect), "{err}");
}

#[test]
fn refuses_a_bad_start_version() {
    let path = sock_path("start-version");
    let receiver = spawn_receiver(&path, ReceiverOptions::default());
    let mut sender = Sender::connect(&path);
    let response = sender.request(Request::start_with_version(1), &[]);
    assert_eq!(response.status(), Status::Error);
    let err = refused(receiver);
    assert!(matches!(err, PeerError::Refused(_)), "{err}");
    assert!(err.to_string().contains("version 1"), "{err}");
}

#[test]
fn refuses_prefault() {
    assert_config_refused(
        "prefault",
        |c| c["vm_config"]["memory"]["prefault"] = json!(true),
        "prefault",
    );
    assert_config_refused(
        "zone-prefault",
        |c| c["vm_config"]["memory"]["zones"][1]["prefault"] = json!(true),
        "\"zone1\"",
    );
}

#[test]
fn refuses_an_empty_common_cpuid() {
    assert_config_refused(
        "cpuid",
        |c| c["common_cpuid"] = json!([]),
        "hypervisor signature",
    );
}

#[test]
fn refuses_a_config_without_memory_mode_unless_the_option_says_postcopy() {
    let strip = |c: &mut Value| {
        c.as_object_mut().expect("object").remove("memory_mode");
    };
    assert_config_refused("no-mode", strip, "memory_mode");

    // Before #8819, `memory_mode=postcopy` on receive-migration: the Config passes.
    let opts = ReceiverOptions {
        memory_mode_option: true,
        ..ReceiverOptions::default()
    };
    let (receiver, mut sender, guest) = started("mode-option", opts);
    let mut config = guest.config();
    strip(&mut config);
    assert_eq!(sender.config(&config).status(), Status::Ok);
    assert_eq!(sender.request(Request::abandon(), &[]).status(), Status::Ok);
    let err = refused(receiver);
    assert!(matches!(err, PeerError::Abandoned), "{err}");
}

#[test]
fn refuses_a_memory_fd_without_an_fd() {
    let path = sock_path("no-fd");
    let receiver = spawn_receiver(&path, ReceiverOptions::default());
    let mut sender = Sender::connect(&path);
    sender.start();
    wire::write_request(&mut sender.main, Request::memory_fd()).expect("header");
    sender.main.write_all(&0u32.to_le_bytes()).expect("slot");
    let response = wire::read_response(&mut sender.main).expect("response");
    assert_eq!(response.status(), Status::Error);
    let err = refused(receiver);
    assert_eq!(err.kind(), PeerErrorKind::Protocol, "{err}");
    assert!(err.to_string().contains("no file descriptor"), "{err}");
}

#[test]
fn refuses_state_without_a_fault_connection() {
    let opts = ReceiverOptions {
        fault_accept_timeout: Duration::from_millis(200),
        ..ReceiverOptions::default()
    };
    let (receiver, mut sender, guest) = started("no-fault-conn", opts);
    assert_eq!(sender.config(&guest.config()).status(), Status::Ok);
    assert_eq!(sender.state().status(), Status::Error);
    let err = refused(receiver);
    assert!(matches!(err, PeerError::NoFaultConnection(_)), "{err}");
    assert_eq!(err.kind(), PeerErrorKind::Timeout);
    // The receiver closed the main connection.
    let mut rest = Vec::new();
    sender.main.read_to_end(&mut rest).expect("read to EOF");
    assert!(rest.is_empty());
}

/// Makes `count` 2 MiB hugepages free, raising `nr_hugepages` if needed, or says why not.
fn reserve_hugepages(count: u64) -> Result<(), String> {
    const DIR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";
    let read = |name: &str| -> Result<u64, String> {
        std::fs::read_to_string(format!("{DIR}/{name}"))
            .map_err(|e| format!("cannot read {DIR}/{name}: {e}"))?
            .trim()
            .parse()
            .map_err(|e| format!("{DIR}/{name}: {e}"))
    };
    let available = |read: &dyn Fn(&str) -> Result<u64, String>| -> Result<u64, String> {
        Ok(read("free_hugepages")?.saturating_sub(read("resv_hugepages")?))
    };
    let free = available(&read)?;
    if free < count {
        let total = read("nr_hugepages")?;
        std::fs::write(
            "/proc/sys/vm/nr_hugepages",
            (total + count - free).to_string(),
        )
        .map_err(|e| format!("cannot raise /proc/sys/vm/nr_hugepages: {e}"))?;
    }
    let free = available(&read)?;
    if free < count {
        return Err(format!(
            "only {free} free 2 MiB hugepages after raising nr_hugepages (need {count})"
        ));
    }
    Ok(())
}

#[test]
fn hugepage_zone() {
    let guest = reserve_hugepages(2)
        .and_then(|()| Guest::hugepages().map_err(|e| format!("hugetlb memfd: {e}")));
    let guest = match guest {
        Ok(guest) => guest,
        Err(why) => {
            if std::env::var("VMPAGER_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("hugepage_zone: {why}, but VMPAGER_REQUIRE_KVM=1");
            }
            eprintln!("hugepage_zone: SKIPPED, {why} (set VMPAGER_REQUIRE_KVM=1 to fail instead)");
            return;
        }
    };
    let (gate, policy) = Gate::new(None);
    let Session { vm, faults, guest } = full_session("huge", guest, policy, false);
    assert_eq!(vm.slots()[0].page_size(), 2 * MIB);
    assert_eq!(vm.slots()[0].zone_id(), "mem0");
    let gpa = 3 * MIB - 32;
    let mut buf = [0u8; 64];
    gate.read_while_held(&vm, gpa, &mut buf).expect("read_gpa");
    assert_eq!(buf.to_vec(), pattern_of(gpa, buf.len()));
    let log = faults.join().expect("fault thread");
    assert!(log.eof);
    assert_every_page_once(&log, &guest, 2 * MIB);
    assert_eq!(
        log.requests.iter().map(|r| r.gpa).collect::<Vec<_>>(),
        vec![0, 2 * MIB]
    );
    assert_guest_reads_pattern(&vm, &guest);
    let report = vm.wait(WAIT).expect("wait");
    assert_eq!(report.demand_faults, 1);
    assert_eq!(report.background_pulls, 1);
    assert!(report.shutdown_sent);
}
