//! The guest side of the CoCo rig (`tests/coco/run`): a `KVM_X86_SW_PROTECTED_VM` whose private
//! memory is a daemon-created guest_memfd, whose exits — `KVM_HC_MAP_GPA_RANGE` hypercalls and
//! `KVM_EXIT_MEMORY_FAULT` with the PRIVATE flag — go to `vmpagerd` over the mailbox. It only
//! runs where KVM offers that VM type (inside the rig's L1 guest, not on this host).
//!
//! Guest program (ring 0, 64-bit long mode; `as --64` of this source, bytes below):
//!
//! ```text
//! start:  cmp r8, 1 ; je read ; cmp r8, 2 ; je hcall
//! write:  mov [rdi], rsi ; xor eax, eax ; out 0x10, al
//! read:   mov rax, [rdi] ; out 0x10, al
//! hcall:  mov eax, 12 ; vmmcall ; out 0x10, al      # KVM_HC_MAP_GPA_RANGE(rbx, rcx, rdx)
//! ```

use crate::client::{Client, ClientError, PageSource, VmSpec};
use crate::memory::{MemoryError, VmMemory};
use crate::refvmm::guest;
use kvm_bindings::{
    kvm_enable_cap, kvm_memory_attributes, kvm_userspace_memory_region2, KVM_CAP_EXIT_HYPERCALL,
    KVM_MAX_CPUID_ENTRIES, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEM_GUEST_MEMFD,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};
use vmpager_protocol::mailbox::{Request, RequestKind, Status, VcpuChannel, WaitPolicy};
use vmpager_protocol::{RegionSpec, Stats, VmType};

const PROGRAM: [u8; 34] = [
    0x49, 0x83, 0xf8, 0x01, 0x74, 0x0d, 0x49, 0x83, 0xf8, 0x02, 0x74, 0x0c, 0x48, 0x89, 0x37, 0x31,
    0xc0, 0xe6, 0x10, 0x48, 0x8b, 0x07, 0xe6, 0x10, 0xb8, 0x0c, 0x00, 0x00, 0x00, 0x0f, 0x01, 0xd9,
    0xe6, 0x10,
];
const KVM_HC_MAP_GPA_RANGE: u64 = 12;
const KVM_MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;
const KVM_MEMORY_EXIT_FLAG_PRIVATE: u64 = 1 << 3;
const PAGE: u64 = 4096;
/// Region with private memory (guest_memfd), 2 MiB at 1 GiB.
pub const PRIVATE_GPA: u64 = 1 << 30;
/// Region without guest_memfd, 2 MiB right after it.
pub const SHARED_GPA: u64 = PRIVATE_GPA + (2 << 20);
const REGION: u64 = 2 << 20;
/// A shared-only window (the policy the rig gives the VM): the last 64 KiB of the private region.
pub const WINDOW_GPA: u64 = PRIVATE_GPA + REGION - (64 << 10);

/// Errors of the rig.
#[derive(Debug, thiserror::Error)]
pub enum CocoError {
    /// A KVM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The daemon refused or failed.
    #[error("vmpagerd request failed")]
    Client(#[from] ClientError),
    /// Guest memory or the exit channel failed.
    #[error("guest memory or exit channel failed")]
    Memory(#[from] MemoryError),
    /// The guest stopped in an unexpected way.
    #[error("unexpected exit: {0}")]
    Exit(String),
    /// Host memory for the low slot.
    #[error("cannot map the low slot")]
    Io(#[source] std::io::Error),
}

/// One check the rig makes.
#[derive(Debug, Clone)]
pub struct Check {
    /// What is checked.
    pub what: &'static str,
    /// Whether it held.
    pub ok: bool,
    /// Detail (values seen).
    pub detail: String,
}

/// What the rig saw.
#[derive(Debug, Clone)]
pub struct CocoReport {
    /// `KVM_EXIT_HYPERCALL` (`KVM_HC_MAP_GPA_RANGE`) exits seen by the VMM.
    pub hypercall_exits: u64,
    /// `KVM_EXIT_MEMORY_FAULT` exits seen by the VMM (and how many had the PRIVATE flag).
    pub memory_fault_exits: u64,
    /// Of those, flagged private.
    pub private_fault_exits: u64,
    /// Memory-fault exits the daemon refused (the harness then undid the state it caused).
    pub denied_fault_exits: u64,
    /// Checks, in order.
    pub checks: Vec<Check>,
    /// The daemon's counters at the end.
    pub stats: Stats,
    /// Wall time of the guest part.
    pub elapsed: Duration,
}

impl CocoReport {
    /// Every check held.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

struct Vm<'a> {
    vm: VmFd,
    vcpu: VcpuFd,
    memory: &'a VmMemory,
    channel: VcpuChannel,
    hypercalls: u64,
    faults: u64,
    private_faults: u64,
    denied_faults: u64,
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CocoError {
    move |e| CocoError::Kvm(op, e)
}

impl Vm<'_> {
    /// Runs one guest operation (r8 = 0 write, 1 read, 2 hypercall) and returns rax.
    fn op(
        &mut self,
        r8: u64,
        rdi: u64,
        rsi: u64,
        rbx: u64,
        rcx: u64,
        rdx: u64,
    ) -> Result<u64, CocoError> {
        let mut regs = self.vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        regs.rip = guest::CODE_GPA;
        regs.rflags = 2;
        (regs.r8, regs.rdi, regs.rsi, regs.rbx, regs.rcx, regs.rdx) = (r8, rdi, rsi, rbx, rcx, rdx);
        self.vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
        loop {
            let exit = match self.vcpu.run() {
                Ok(e) => e,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(CocoError::Kvm("KVM_RUN", e)),
            };
            match exit {
                VcpuExit::IoOut(0x10, _) => break,
                VcpuExit::Hypercall(h) if h.nr == KVM_HC_MAP_GPA_RANGE => {
                    self.hypercalls += 1;
                    let request = Request {
                        kind: RequestKind::MapGpaRange,
                        gpa: h.args[0],
                        size: h.args[1].saturating_mul(PAGE),
                        private: h.args[2] & KVM_MAP_GPA_RANGE_ENCRYPTED != 0,
                    };
                    let r = self.memory.forward_exit(&mut self.channel, request)?;
                    if r.status == Status::Fatal {
                        return Err(CocoError::Exit(format!(
                            "daemon failed the conversion: code {}",
                            r.code
                        )));
                    }
                    *h.ret = r.ret;
                }
                VcpuExit::MemoryFault { flags, gpa, size } => {
                    self.faults += 1;
                    let private = flags & KVM_MEMORY_EXIT_FLAG_PRIVATE != 0;
                    self.private_faults += u64::from(private);
                    let request = Request {
                        kind: RequestKind::MemoryFault,
                        gpa,
                        size,
                        private,
                    };
                    let r = self.memory.forward_exit(&mut self.channel, request)?;
                    if r.status != Status::Retry {
                        // The daemon refused: this harness put the page in that state itself
                        // (attributes private on a slot without guest_memfd), so it undoes it.
                        self.denied_faults += 1;
                        set_attributes(&self.vm, gpa, size, false)?;
                    }
                }
                VcpuExit::Intr => {}
                other => return Err(CocoError::Exit(format!("{other:?}"))),
            }
        }
        Ok(self.vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?.rax)
    }

    fn write(&mut self, gpa: u64, value: u64) -> Result<(), CocoError> {
        self.op(0, gpa, value, 0, 0, 0).map(drop)
    }

    fn read(&mut self, gpa: u64) -> Result<u64, CocoError> {
        self.op(1, gpa, 0, 0, 0, 0)
    }

    fn map_gpa_range(&mut self, gpa: u64, pages: u64, private: bool) -> Result<u64, CocoError> {
        let attrs = if private {
            KVM_MAP_GPA_RANGE_ENCRYPTED
        } else {
            0
        };
        self.op(2, 0, 0, gpa, pages, attrs)
    }
}

fn set_attributes(vm: &VmFd, gpa: u64, size: u64, private: bool) -> Result<(), CocoError> {
    let attributes = if private {
        u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE)
    } else {
        0
    };
    vm.set_memory_attributes(kvm_memory_attributes {
        address: gpa,
        size,
        attributes,
        flags: 0,
    })
    .map_err(kvm("KVM_SET_MEMORY_ATTRIBUTES"))
}

fn check(checks: &mut Vec<Check>, what: &'static str, ok: bool, detail: String) {
    checks.push(Check { what, ok, detail });
}

/// Runs the rig's scenario against the daemon behind `client`.
pub fn run(client: &Client) -> Result<CocoReport, CocoError> {
    let kvm_sys = Kvm::new().map_err(kvm("open /dev/kvm"))?;
    let vm = kvm_sys
        .create_vm_with_type(u64::from(kvm_bindings::KVM_X86_SW_PROTECTED_VM))
        .map_err(kvm("KVM_CREATE_VM(KVM_X86_SW_PROTECTED_VM)"))?;
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_EXIT_HYPERCALL,
        ..Default::default()
    };
    cap.args[0] = 1 << KVM_HC_MAP_GPA_RANGE;
    vm.enable_cap(&cap)
        .map_err(kvm("KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)"))?;
    let vm_fd: OwnedFd = rustix::io::fcntl_dupfd_cloexec(
        // SAFETY: the raw fd is `vm`'s, open for the duration of this call.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(vm.as_raw_fd()) },
        3,
    )
    .map_err(|e| CocoError::Io(e.into()))?;

    let policy = format!(
        "[policy]\nimplicit_conversions = true\n\n[[policy.rule]]\nstart = {WINDOW_GPA}\nsize = {}\nmode = \"shared-only\"\n",
        64 << 10
    );
    let created = client.create_vm(VmSpec {
        regions: vec![
            RegionSpec::new(PRIVATE_GPA, REGION, 0).private(),
            RegionSpec::new(SHARED_GPA, REGION, 0),
        ],
        source: PageSource::Zero,
        vm_type: VmType::SwProtected,
        vm_fd: Some(vm_fd),
        policy: Some(policy),
        ..Default::default()
    })?;
    let vm_id = created.vm_id;
    let memory = VmMemory::map(created)?;
    client.attach_uffd(vm_id, memory.uffd(), &memory.host_addrs())?;

    // Low slot: code and identity page tables, VMM-private memory.
    let pds = guest::pds_for(SHARED_GPA + REGION);
    let low_len = guest::low_slot_len(pds) as usize;
    // SAFETY: a fresh private anonymous mapping; it stays mapped (leaked) for the life of the
    // process, longer than the VM that uses it.
    let low = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            low_len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE,
        )
    }
    .map_err(|e| CocoError::Io(e.into()))?;
    // SAFETY: the mapping above is `low_len` bytes, zeroed, and owned by nobody else.
    let low_bytes = unsafe { std::slice::from_raw_parts_mut(low.cast::<u8>(), low_len) };
    guest::build_low_slot(low_bytes, pds);
    let code = guest::CODE_GPA as usize;
    low_bytes[code..code + PROGRAM.len()].copy_from_slice(&PROGRAM);

    let slot = |slot: u32, gpa: u64, size: u64, addr: u64, gmem: Option<u32>| {
        kvm_userspace_memory_region2 {
            slot,
            flags: if gmem.is_some() {
                KVM_MEM_GUEST_MEMFD
            } else {
                0
            },
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: addr,
            guest_memfd_offset: 0,
            guest_memfd: gmem.unwrap_or(0),
            ..Default::default()
        }
    };
    let regions = memory.regions();
    let gmem = regions[0].guest_memfd().map(|f| f.as_raw_fd() as u32);
    // SAFETY: each userspace range is mapped for the life of `memory`/`low`, which outlive the VM.
    unsafe {
        vm.set_user_memory_region2(slot(0, 0, low_len as u64, low as u64, None))
            .map_err(kvm("KVM_SET_USER_MEMORY_REGION2 (low)"))?;
        vm.set_user_memory_region2(slot(
            1,
            PRIVATE_GPA,
            REGION,
            regions[0].host_addr().as_ptr() as u64,
            gmem,
        ))
        .map_err(kvm("KVM_SET_USER_MEMORY_REGION2 (private-capable)"))?;
        vm.set_user_memory_region2(slot(
            2,
            SHARED_GPA,
            REGION,
            regions[1].host_addr().as_ptr() as u64,
            None,
        ))
        .map_err(kvm("KVM_SET_USER_MEMORY_REGION2 (shared)"))?;
    }
    let vcpu = vm.create_vcpu(0).map_err(kvm("KVM_CREATE_VCPU"))?;
    let cpuid = kvm_sys
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    crate::refvmm::set_long_mode(&mut sregs, 0);
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    let exits = client.open_mailbox(vm_id, 1)?;
    let channel = exits.channel(0, WaitPolicy::default())?;
    let mut g = Vm {
        vm,
        vcpu,
        memory: &memory,
        channel,
        hypercalls: 0,
        faults: 0,
        private_faults: 0,
        denied_faults: 0,
    };

    let started = Instant::now();
    let mut checks = Vec::new();
    let memfd = regions[0].memfd();
    let host_word = |off: u64| -> u64 {
        let mut b = [0u8; 8];
        let _ = rustix::io::pread(memfd, &mut b, off);
        u64::from_le_bytes(b)
    };
    let a = PRIVATE_GPA;
    // (1) Shared data written by the guest is visible to the host.
    g.write(a, 0x1111)?;
    check(
        &mut checks,
        "shared write visible to the host",
        host_word(0) == 0x1111,
        format!("{:#x}", host_word(0)),
    );
    // (2) Convert to private (hypercall), write a secret there.
    let ret = g.map_gpa_range(a, 1, true)?;
    check(
        &mut checks,
        "conversion to private accepted",
        ret == 0,
        format!("ret {ret:#x}"),
    );
    g.write(a, 0x2222)?;
    let seen = g.read(a)?;
    check(
        &mut checks,
        "private memory holds the guest's data",
        seen == 0x2222,
        format!("{seen:#x}"),
    );
    check(
        &mut checks,
        "private data never reaches the shared memfd",
        host_word(0) == 0,
        format!("{:#x}", host_word(0)),
    );
    // (3) Convert back to shared: the private contents are discarded.
    let ret = g.map_gpa_range(a, 1, false)?;
    check(
        &mut checks,
        "conversion to shared accepted",
        ret == 0,
        format!("ret {ret:#x}"),
    );
    let seen = g.read(a)?;
    check(
        &mut checks,
        "private contents discarded on conversion to shared",
        seen == 0,
        format!("{seen:#x}"),
    );
    // (4) A conversion the policy denies gets its error.
    let ret = g.map_gpa_range(WINDOW_GPA, 1, true)?;
    let eperm = (-(libc::EPERM as i64)) as u64;
    check(
        &mut checks,
        "denied conversion answered -EPERM",
        ret == eperm,
        format!("ret {ret:#x}"),
    );
    // (5) A private access to a slot without guest_memfd: KVM_EXIT_MEMORY_FAULT (PRIVATE).
    set_attributes(&g.vm, SHARED_GPA, PAGE, true)?;
    let _ = g.read(SHARED_GPA)?;
    check(
        &mut checks,
        "memory-fault exit with the PRIVATE flag forwarded",
        g.private_faults >= 1,
        format!("{} faults", g.faults),
    );
    // (6) End state: page 1 private, page 0 shared, as converted.
    let ret = g.map_gpa_range(a + PAGE, 1, true)?;
    check(
        &mut checks,
        "second conversion to private accepted",
        ret == 0,
        format!("ret {ret:#x}"),
    );
    rustix::io::pwrite(memfd, &0x3333u64.to_le_bytes(), 0).map_err(|e| CocoError::Io(e.into()))?;
    rustix::io::pwrite(memfd, &0x4444u64.to_le_bytes(), PAGE)
        .map_err(|e| CocoError::Io(e.into()))?;
    let (p0, p1) = (g.read(a)?, g.read(a + PAGE)?);
    check(
        &mut checks,
        "attributes end as converted (page 0 shared, page 1 private)",
        p0 == 0x3333 && p1 == 0,
        format!("{p0:#x} {p1:#x}"),
    );
    let elapsed = started.elapsed();

    let stats = client.stats(vm_id)?;
    check(
        &mut checks,
        "every exit reached the daemon over the mailbox",
        stats.hypercall_exits == g.hypercalls && stats.memory_fault_exits == g.faults,
        format!(
            "VMM saw {} hypercalls + {} faults; daemon {} + {}",
            g.hypercalls, g.faults, stats.hypercall_exits, stats.memory_fault_exits
        ),
    );
    check(
        &mut checks,
        "attributes kept by KVM, not emulated",
        stats.attributes_emulated == 0,
        String::new(),
    );
    let report = CocoReport {
        hypercall_exits: g.hypercalls,
        memory_fault_exits: g.faults,
        private_fault_exits: g.private_faults,
        denied_fault_exits: g.denied_faults,
        checks,
        stats,
        elapsed,
    };
    Ok(report)
}

/// One line per check: `ok  what (detail)` or `FAIL what (detail)`.
pub fn describe(report: &CocoReport) -> String {
    let mut s = String::new();
    for c in &report.checks {
        s.push_str(&format!(
            "{} {}{}\n",
            if c.ok { "ok  " } else { "FAIL" },
            c.what,
            if c.detail.is_empty() {
                String::new()
            } else {
                format!(" ({})", c.detail)
            }
        ));
    }
    s
}
