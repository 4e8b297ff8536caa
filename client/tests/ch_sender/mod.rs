//! The minimal cloud-hypervisor migration sender shared by the receiver peer's tests.
#![allow(dead_code)]

pub use serde_json::{json, Value};
pub use std::collections::HashSet;
pub use std::io::Write;
pub use std::os::fd::{AsFd, OwnedFd};
pub use std::os::unix::net::UnixStream;
pub use std::path::{Path, PathBuf};
pub use std::sync::mpsc;
pub use std::sync::Arc;
pub use std::thread::JoinHandle;
pub use std::time::Duration;
pub use vmpager_client::peers::cloud_hypervisor::{
    ChReceiver, ChVm, PeerError, PeerErrorKind, ReceiverOptions,
};
pub use vmpager_compat::cloud_hypervisor::snapshot::common_cpuid_for;
pub use vmpager_compat::cloud_hypervisor::wire::{
    self, Command, ConnectionRole, MemoryRange, Request, Response, Status, WireError,
};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const WAIT: Duration = Duration::from_secs(30);

/// The byte the guest holds at `gpa`.
pub fn pattern(gpa: u64) -> u8 {
    let word = (gpa / 8 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (word >> ((gpa % 8) * 8)) as u8
}

pub fn pattern_of(gpa: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern(gpa + i)).collect()
}

/// A memfd and the sender's own mapping of it.
pub struct Memfd {
    pub fd: OwnedFd,
    pub addr: usize,
    pub len: usize,
}

impl Memfd {
    pub fn new(name: &str, len: u64, huge: bool) -> std::io::Result<Memfd> {
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
    pub fn write(&self, offset: u64, bytes: &[u8]) {
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

pub struct TestSlot {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub file_offset: u64,
    pub memfd: usize,
    pub zone: &'static str,
}

/// The guest as the sender knows it.
pub struct Guest {
    pub memfds: Vec<Memfd>,
    pub slots: Vec<TestSlot>,
    /// `vm_config.memory`.
    pub memory: Value,
    pub ranges: Vec<MemoryRange>,
}

impl Guest {
    /// Two 4 KiB zones: "zone0" (one memfd of 512 KiB split into slots 0 and 1 at file
    /// offsets 0 and 256 KiB) and "zone1" (slot 2). Every third page of the first memfd is
    /// already in the file (minor faults); the rest arrive on demand (missing faults).
    pub fn two_zones() -> Guest {
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
    pub fn hugepages() -> std::io::Result<Guest> {
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

    pub fn total(&self) -> u64 {
        self.ranges.iter().map(|r| r.length).sum()
    }

    /// Writes the pattern for `[gpa, gpa + len)` into the memfd.
    pub fn fill(&self, gpa: u64, len: u64) {
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
    pub fn config(&self) -> Value {
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

pub fn sock_path(test: &str) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("vmpager-chpeer-{test}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// Starts a receiver at `path` on its own thread.
pub fn spawn_receiver(path: &Path, opts: ReceiverOptions) -> JoinHandle<Result<ChVm, PeerError>> {
    let receiver = ChReceiver::listen(path).expect("listen");
    std::thread::spawn(move || receiver.receive(&opts))
}

/// The sender's main connection.
pub struct Sender {
    pub main: UnixStream,
    pub path: PathBuf,
}

impl Sender {
    pub fn connect(path: &Path) -> Sender {
        Sender {
            main: UnixStream::connect(path).expect("connect"),
            path: path.to_path_buf(),
        }
    }

    pub fn request(&mut self, request: Request, payload: &[u8]) -> Response {
        wire::write_request(&mut self.main, request).expect("write request");
        self.main.write_all(payload).expect("write payload");
        wire::read_response(&mut self.main).expect("read response")
    }

    pub fn start(&mut self) {
        assert_eq!(self.request(Request::start(), &[]).status(), Status::Ok);
    }

    pub fn memory_fds(&mut self, guest: &Guest) {
        for s in &guest.slots {
            wire::send_memory_fd(self.main.as_fd(), s.slot, guest.memfds[s.memfd].fd.as_fd())
                .expect("send MemoryFd");
            let response = wire::read_response(&mut self.main).expect("MemoryFd response");
            assert_eq!(response.status(), Status::Ok, "MemoryFd of slot {}", s.slot);
        }
    }

    pub fn config(&mut self, config: &Value) -> Response {
        let payload = serde_json::to_vec(config).expect("json");
        self.request(Request::config(payload.len() as u64), &payload)
    }

    pub fn state(&mut self) -> Response {
        let payload = br#"{"snapshots":{},"snapshot_data":null}"#;
        self.request(Request::state(payload.len() as u64), payload)
    }

    /// An additional connection opening with `role`.
    pub fn connect_role(&self, role: ConnectionRole) -> UnixStream {
        let mut conn = UnixStream::connect(&self.path).expect("connect");
        wire::write_role(&mut conn, role).expect("write role");
        conn
    }
}

/// What the fault-serving thread saw.
#[derive(Debug, Default)]
pub struct FaultLog {
    pub requests: Vec<MemoryRange>,
    /// The receiver shut the connection down (every page received, or it gave up).
    pub eof: bool,
}

#[derive(Default)]
pub struct FaultPolicy {
    /// Holds the answer to the first request until a message arrives, after announcing the
    /// request's gpa on the second channel.
    pub gate: Option<(mpsc::Receiver<()>, mpsc::Sender<u64>)>,
    /// Answers `Error` for this gpa.
    pub error_for: Option<u64>,
}

/// Serves `PageFault` requests: writes the page into the memfd, answers `Ok` with no payload.
pub fn serve_faults(mut conn: UnixStream, guest: Arc<Guest>, policy: FaultPolicy) -> FaultLog {
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
pub struct Session {
    pub vm: ChVm,
    pub faults: JoinHandle<FaultLog>,
    pub guest: Arc<Guest>,
}

pub fn full_session(test: &str, guest: Guest, policy: FaultPolicy, paused: bool) -> Session {
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
pub fn wait_for_fault(vm: &ChVm) {
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
pub struct Gate {
    pub open: mpsc::Sender<()>,
    pub arrived: mpsc::Receiver<u64>,
}

impl Gate {
    /// The gate and the fault policy that uses it.
    pub fn new(error_for: Option<u64>) -> (Gate, FaultPolicy) {
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
    pub fn read_while_held(self, vm: &ChVm, gpa: u64, buf: &mut [u8]) -> Result<(), PeerError> {
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

pub fn pages(guest: &Guest) -> u64 {
    guest.total() / 4096
}

pub fn assert_every_page_once(log: &FaultLog, guest: &Guest, page_size: u64) {
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

pub fn assert_guest_reads_pattern(vm: &ChVm, guest: &Guest) {
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
