//! A small reference VMM on `kvm-ioctls` that runs real guest code over memory someone else
//! provides.
//!
//! The caller maps the guest RAM regions (in the product: memfds owned by `vmpagerd`, registered on
//! a userfaultfd so every first touch is a fault the daemon serves). The VMM registers them as
//! memslots and **never touches them from the host**: only the guest reads and writes them.
//!
//! # Guest
//!
//! Every vCPU runs the same tiny program (see [`guest`] for its source and bytes) at CPL 3 in
//! 64-bit long mode with IOPL 3 over identity page tables of 2 MiB pages — the only kind of guest
//! this host's PVM backend runs natively. Each [`Task`] sets the registers, runs `KVM_RUN` until
//! the program's `out 0x10, al`, and reads the result from `rax`.
//!
//! # Memory layout
//!
//! * Slot 0, GPA `0 .. low_slot_len`: VMM-private anonymous memory (`MAP_PRIVATE|MAP_ANONYMOUS`,
//!   populated) with the program at `0x1000`, the PML4 at `0x2000`, the PDPT at `0x3000` and one
//!   page directory per GiB of guest address space from `0x4000` on (at most 2 MiB + 16 KiB for
//!   the full 512 GiB).
//! * Slots 1..: the caller's regions, in the order given, each at or above
//!   [`RefVm::MIN_REGION_GPA`] (1 GiB) and ending at or below [`RefVm::guest_addr_limit`] (the
//!   smaller of [`RefVm::MAX_GPA`] = 512 GiB and the guest's `MAXPHYADDR` from KVM's supported
//!   CPUID). The identity map covers GPA 0 up to the highest region end rounded up to 1 GiB.
//!
//! # Threads
//!
//! [`RefVm::run`] starts one thread per plan; thread `i` alone uses vCPU `i`. The threads are
//! released together by a [`Barrier`] right before their first `KVM_RUN`.

pub mod guest;
mod plan;

use std::fmt;
use std::ptr::NonNull;
use std::sync::{Barrier, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region, CpuId};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

pub use guest::checksum_words;
pub use plan::split_evenly;
use plan::{check_regions, check_task, Span};

/// One region of guest RAM, mapped by the caller at `host_addr`.
///
/// `gpa`, `host_addr` and `size` must be 4 KiB aligned (`size` need not be a multiple of 2 MiB).
#[derive(Clone, Copy, Debug)]
pub struct GuestRegion {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Host virtual address of the first byte.
    pub host_addr: NonNull<u8>,
    /// Length in bytes.
    pub size: u64,
}

/// What a task does over its page range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Read every 8-byte word of every page in the range; report the checksum
    /// (see [`checksum_words`]).
    Checksum,
    /// Write one 8-byte word per 4 KiB page at offset 0: value = `page_gpa ^ key`.
    WritePattern {
        /// XORed into each page's GPA.
        key: u64,
    },
    /// Write one byte (value 1) per 4 KiB page at offset 0 (demand-paging rate measurement).
    Touch,
}

/// One run of the guest program over `[gpa_start, gpa_end)`: both 4 KiB aligned, non-empty, and
/// inside one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Task {
    /// The work to do.
    pub workload: Workload,
    /// First GPA (inclusive).
    pub gpa_start: u64,
    /// End GPA (exclusive).
    pub gpa_end: u64,
}

/// The outcome of one [`Task`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskResult {
    /// The checksum for [`Workload::Checksum`], 0 otherwise.
    pub value: u64,
    /// Wall time of this task's `KVM_RUN` loop (from the first `KVM_RUN` to the done exit).
    pub elapsed: Duration,
}

/// What one vCPU did in one [`RefVm::run`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuReport {
    /// One result per task, in plan order.
    pub results: Vec<TaskResult>,
    /// `KVM_RUN` calls made (one per task plus one per interrupted run).
    pub kvm_runs: u64,
    /// Wall time from the start barrier to the end of the last task.
    pub elapsed: Duration,
}

/// Errors of the reference VMM.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum RefVmError {
    /// `/dev/kvm` could not be opened.
    #[error("KVM is not available: opening /dev/kvm failed: {0}")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// A KVM ioctl other than `KVM_RUN` failed.
    #[error("KVM request {op} failed: {source}")]
    Kvm {
        /// The request, e.g. `KVM_SET_SREGS`.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The VMM-private low slot could not be mapped.
    #[error("Mapping {len} bytes of VMM-private low memory failed: {source}")]
    LowMemory {
        /// Bytes requested.
        len: u64,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// The vCPU count is zero or above what KVM supports.
    #[error("Invalid vCPU count {requested}: it must be between 1 and {max}")]
    BadVcpuCount {
        /// Count asked for.
        requested: usize,
        /// KVM's limit.
        max: usize,
    },
    /// No regions were given.
    #[error("No guest regions were given")]
    NoRegions,
    /// More regions than KVM has memslots for (slot 0 is the VMM's own).
    #[error("Too many guest regions: {regions} given, KVM allows {max} besides the low slot")]
    TooManyRegions {
        /// Regions given.
        regions: usize,
        /// Regions possible.
        max: usize,
    },
    /// A region breaks the layout rules.
    #[error("Guest region {index} is rejected: {reason}")]
    BadRegion {
        /// Index in the slice given to [`RefVm::new`].
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// More plans than vCPUs.
    #[error("Too many plans: {plans} given but the VM has {vcpus} vCPUs")]
    TooManyPlans {
        /// Plans given.
        plans: usize,
        /// vCPUs of the VM.
        vcpus: usize,
    },
    /// A task is malformed or outside the regions.
    #[error("Task {task} of vCPU {vcpu} is rejected: {reason}")]
    BadTask {
        /// vCPU (plan) index.
        vcpu: usize,
        /// Task index in the plan.
        task: usize,
        /// What is wrong.
        reason: String,
    },
    /// `KVM_RUN` itself failed (other than `EINTR`), e.g. `EFAULT` when the host memory behind a
    /// region could not be faulted in.
    #[error("KVM_RUN failed on vCPU {vcpu} at rip {}: {source}", Rip(*.rip))]
    RunFailed {
        /// vCPU index.
        vcpu: usize,
        /// Guest rip, if `KVM_GET_REGS` worked.
        rip: Option<u64>,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest stopped for anything but its done `out` (or an interrupt).
    #[error(
        "Unexpected exit on vCPU {vcpu}: {reason} (exit reason {exit_reason}, rip {})",
        Rip(*.rip)
    )]
    UnexpectedExit {
        /// vCPU index.
        vcpu: usize,
        /// Raw `kvm_run.exit_reason`.
        exit_reason: u32,
        /// Human-readable description of the exit.
        reason: String,
        /// Guest rip, if `KVM_GET_REGS` worked.
        rip: Option<u64>,
    },
    /// A vCPU thread could not be started.
    #[error("Starting the thread for vCPU {vcpu} failed: {source}")]
    ThreadSpawn {
        /// vCPU index.
        vcpu: usize,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU thread panicked (a bug in this module).
    #[error("The thread for vCPU {vcpu} panicked")]
    ThreadPanicked {
        /// vCPU index.
        vcpu: usize,
    },
}

/// Formats an optional rip for error messages.
struct Rip(Option<u64>);

impl fmt::Display for Rip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(rip) => write!(f, "{rip:#x}"),
            None => f.write_str("unknown"),
        }
    }
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RefVmError {
    move |source| RefVmError::Kvm { op, source }
}

/// The VMM-private low slot mapping (code and page tables); unmapped on drop.
struct LowMem {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `LowMem` owns its private anonymous mapping; the host writes it only in `RefVm::new`
// before any vCPU exists and afterwards only unmaps it in `drop`, so moving or sharing the handle
// across threads cannot race on the memory.
unsafe impl Send for LowMem {}
// SAFETY: see the `Send` impl: no `&self` method touches the memory.
unsafe impl Sync for LowMem {}

impl LowMem {
    fn new(len: u64) -> Result<LowMem, RefVmError> {
        let fail = |source: std::io::Error| RefVmError::LowMemory { len, source };
        let size =
            usize::try_from(len).map_err(|_| fail(std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases no Rust object.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                size,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::POPULATE,
            )
        }
        .map_err(|e| fail(e.into()))?;
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| fail(std::io::ErrorKind::Other.into()))?;
        Ok(LowMem { ptr, len: size })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr..ptr+len` is our own live read/write mapping (zero-filled by the kernel),
        // and `&mut self` guarantees no other reference to it exists on the host.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
}

impl Drop for LowMem {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` is exactly the mapping created in `new`, no slice into it outlives
        // `as_mut_slice`'s borrow, and the VM using it as a memslot was dropped before (field order
        // of `RefVm`).
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            tracing::warn!(error = %e, "refvmm: munmap of the low slot failed");
        }
    }
}

/// A KVM VM with `vcpus` vCPUs running the reference guest program over caller-mapped regions.
pub struct RefVm {
    // Field order is drop order: vCPUs, then the VM, then the low slot memory.
    vcpus: Mutex<Vec<VcpuFd>>,
    _vm: VmFd,
    /// guest_memfd of each region that has one (kept open for the VM's life).
    gmems: Vec<Option<std::os::fd::OwnedFd>>,
    spans: Vec<Span>,
    addr_limit: u64,
    low_len: u64,
    _low: LowMem,
}

impl fmt::Debug for RefVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefVm")
            .field("spans", &self.spans)
            .field("addr_limit", &self.addr_limit)
            .field("low_len", &self.low_len)
            .finish_non_exhaustive()
    }
}

/// `rflags` for the guest: IOPL 3 (so `out` works at CPL 3) plus the always-one bit 1.
const GUEST_RFLAGS: u64 = 0x3002;

impl RefVm {
    /// Regions must start at or above this GPA (1 GiB); the VMM-private low slot lies below.
    pub const MIN_REGION_GPA: u64 = guest::GIB;
    /// Architectural limit of the identity map (one PDPT: 512 GiB). The usable limit may be lower,
    /// see [`RefVm::guest_addr_limit`].
    pub const MAX_GPA: u64 = guest::MAX_PDS * guest::GIB;

    /// Whether `/dev/kvm` can be opened (tests use this to skip cleanly).
    pub fn kvm_available() -> bool {
        Kvm::new().is_ok()
    }

    /// Checks the layout rules that do not need KVM: every region non-empty, 4 KiB aligned (GPA,
    /// host address and size), at or above [`Self::MIN_REGION_GPA`], ending at or below
    /// [`Self::MAX_GPA`], and no two regions overlapping. [`RefVm::new`] also checks the guest's
    /// `MAXPHYADDR`.
    pub fn check_layout(regions: &[GuestRegion]) -> Result<(), RefVmError> {
        check_regions(regions, Self::MIN_REGION_GPA, Self::MAX_GPA).map(drop)
    }

    /// Creates the VM: the low slot, one memslot per region (slots 1.., in the given order) and
    /// `vcpus` vCPUs in ring-3 long mode.
    ///
    /// # Safety
    ///
    /// Every region's host range must stay mapped read/write for the life of the `RefVm`.
    pub unsafe fn new(regions: &[GuestRegion], vcpus: usize) -> Result<RefVm, RefVmError> {
        // SAFETY: the caller's contract is this function's.
        unsafe { Self::new_with_guest_memfds(regions, &[], vcpus) }
    }

    /// Like [`RefVm::new`], but where `guest_memfd[i]` is true, region `i` is also backed by
    /// a new guest_memfd of this VM (bound with `KVM_SET_USER_MEMORY_REGION2` and
    /// `KVM_MEM_GUEST_MEMFD`, offset 0); [`RefVm::guest_memfd`] returns it.
    ///
    /// # Safety
    /// As [`RefVm::new`].
    pub unsafe fn new_with_guest_memfds(
        regions: &[GuestRegion],
        guest_memfd: &[bool],
        vcpus: usize,
    ) -> Result<RefVm, RefVmError> {
        Self::check_layout(regions)?;
        let kvm = Kvm::new().map_err(RefVmError::KvmUnavailable)?;
        let max_vcpus = kvm.get_max_vcpus();
        if vcpus == 0 || vcpus > max_vcpus {
            return Err(RefVmError::BadVcpuCount {
                requested: vcpus,
                max: max_vcpus,
            });
        }
        let max_regions = kvm.get_nr_memslots().saturating_sub(1);
        if regions.len() > max_regions {
            return Err(RefVmError::TooManyRegions {
                regions: regions.len(),
                max: max_regions,
            });
        }
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let addr_limit = Self::MAX_GPA.min(1u64 << guest_phys_bits(&cpuid));
        let spans = check_regions(regions, Self::MIN_REGION_GPA, addr_limit)?;
        let highest = spans
            .iter()
            .map(Span::end)
            .max()
            .unwrap_or(Self::MIN_REGION_GPA);
        let pds = guest::pds_for(highest);
        let low_len = guest::low_slot_len(pds);
        let mut low = LowMem::new(low_len)?;
        guest::build_low_slot(low.as_mut_slice(), pds);

        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let low_slot = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: low_len,
            userspace_addr: low.addr(),
        };
        // SAFETY: the low slot is our own mapping of `low_len` bytes, which outlives the VM
        // (`RefVm` drops `_vm` before `_low`).
        unsafe { vm.set_user_memory_region(low_slot) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (low slot)"))?;
        let mut gmems = Vec::with_capacity(regions.len());
        for (i, r) in regions.iter().enumerate() {
            if guest_memfd.get(i).copied().unwrap_or(false) {
                use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
                // SAFETY: the raw fd is `vm`'s, open for this call.
                let vm_fd = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) };
                let gmem = crate::kvm_private::create_guest_memfd(vm_fd, r.size).map_err(|e| {
                    RefVmError::Kvm {
                        op: "KVM_CREATE_GUEST_MEMFD",
                        source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(0)),
                    }
                })?;
                let slot = kvm_bindings::kvm_userspace_memory_region2 {
                    slot: i as u32 + 1,
                    flags: kvm_bindings::KVM_MEM_GUEST_MEMFD,
                    guest_phys_addr: r.gpa,
                    memory_size: r.size,
                    userspace_addr: r.host_addr.as_ptr() as u64,
                    guest_memfd_offset: 0,
                    guest_memfd: gmem.as_fd().as_raw_fd() as u32,
                    ..Default::default()
                };
                // SAFETY: as below; KVM takes its own reference to the guest_memfd.
                unsafe { vm.set_user_memory_region2(slot) }
                    .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION2"))?;
                gmems.push(Some(gmem));
                continue;
            }
            gmems.push(None);
            let slot = kvm_userspace_memory_region {
                slot: i as u32 + 1,
                flags: 0,
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: r.host_addr.as_ptr() as u64,
            };
            // SAFETY: the caller guarantees (contract of `new`) that the region's host range stays
            // mapped read/write for the life of the `RefVm`, hence of the VM; layout was checked.
            unsafe { vm.set_user_memory_region(slot) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let mut fds = Vec::with_capacity(vcpus);
        for id in 0..vcpus {
            let vcpu = vm
                .create_vcpu(id as u64)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            set_long_mode(&mut sregs, 3);
            vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            fds.push(vcpu);
        }
        tracing::debug!(
            regions = regions.len(),
            vcpus,
            pds,
            low_len,
            addr_limit,
            "refvmm: VM created"
        );
        Ok(RefVm {
            vcpus: Mutex::new(fds),
            gmems,
            _vm: vm,
            spans,
            addr_limit,
            low_len,
            _low: low,
        })
    }

    /// The guest_memfd of region `region`, if it was created with one.
    pub fn guest_memfd(&self, region: usize) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.gmems.get(region)?.as_ref().map(|f| f.as_fd())
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Highest GPA (exclusive) a region may reach in this VM: the smaller of [`Self::MAX_GPA`] and
    /// `2^MAXPHYADDR` of the guest CPU model.
    pub fn guest_addr_limit(&self) -> u64 {
        self.addr_limit
    }

    /// Size of the VMM-private low slot at GPA 0.
    pub fn low_slot_len(&self) -> u64 {
        self.low_len
    }

    /// Runs `plans[i]` on vCPU `i`, each vCPU on its own thread, all released together by a
    /// barrier before their first `KVM_RUN`. Returns one report per plan. Every task is checked
    /// before any thread starts. On a guest or KVM failure the failing vCPU stops its plan, the
    /// other vCPUs still finish theirs, and the error of the lowest-numbered failing vCPU is
    /// returned. The failing vCPU's pending exit is settled first (see `settle`), so later runs
    /// start from clean registers; a guest that triple-faulted may still need a new `RefVm`.
    pub fn run(&self, plans: &[Vec<Task>]) -> Result<Vec<VcpuReport>, RefVmError> {
        let mut vcpus = self.vcpus.lock().unwrap_or_else(PoisonError::into_inner);
        if plans.len() > vcpus.len() {
            return Err(RefVmError::TooManyPlans {
                plans: plans.len(),
                vcpus: vcpus.len(),
            });
        }
        for (v, plan) in plans.iter().enumerate() {
            for (t, task) in plan.iter().enumerate() {
                check_task(&self.spans, v, t, task)?;
            }
        }
        if plans.is_empty() {
            return Ok(Vec::new());
        }
        let gate = &Gate::default();
        let barrier = &Barrier::new(plans.len());
        thread::scope(|s| {
            let mut handles = Vec::with_capacity(plans.len());
            let mut first_err = None;
            for (i, (vcpu, plan)) in vcpus.iter_mut().zip(plans).enumerate() {
                let spawned = thread::Builder::new()
                    .name(format!("refvmm-vcpu{i}"))
                    .spawn_scoped(s, move || run_plan(i, vcpu, plan, gate, barrier));
                match spawned {
                    Ok(h) => handles.push(h),
                    Err(source) => {
                        first_err = Some(RefVmError::ThreadSpawn { vcpu: i, source });
                        break;
                    }
                }
            }
            // Started threads wait on the gate, so a failed spawn cannot leave them stuck on the
            // barrier: they are told to quit instead.
            gate.open(first_err.is_none());
            let mut reports = Vec::with_capacity(handles.len());
            for (i, h) in handles.into_iter().enumerate() {
                match h.join() {
                    Ok(Ok(report)) => reports.push(report),
                    Ok(Err(e)) => {
                        first_err.get_or_insert(e);
                    }
                    Err(_) => {
                        first_err.get_or_insert(RefVmError::ThreadPanicked { vcpu: i });
                    }
                }
            }
            match first_err {
                Some(e) => Err(e),
                None => Ok(reports),
            }
        })
    }
}

/// `MAXPHYADDR` of the guest CPU model (CPUID leaf 0x8000_0008, EAX[7:0]); 36 if absent, as KVM
/// assumes.
fn guest_phys_bits(cpuid: &CpuId) -> u32 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map(|e| e.eax & 0xff)
        .filter(|&bits| (32..=52).contains(&bits))
        .unwrap_or(36)
}

/// 64-bit long mode with paging (identity tables at `PML4_GPA`), flat segments at privilege
/// level `cpl` (3 for the measured ring-3 guests; 0 where KVM hypercalls are needed).
pub(crate) fn set_long_mode(sregs: &mut kvm_sregs, cpl: u8) {
    let seg = |selector: u16, type_: u8, code: bool| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: selector | u16::from(cpl),
        type_,
        present: 1,
        dpl: cpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = seg(0x8, 0xb, true); // execute/read, accessed
    let data = seg(0x10, 0x3, false); // read/write, accessed
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr.type_ = 11; // busy 64-bit TSS
    sregs.tr.present = 1;
    sregs.tr.s = 0;
    sregs.cr3 = guest::PML4_GPA;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = (1 << 31) | (1 << 4) | 1; // PG | ET | PE
    sregs.efer = (1 << 10) | (1 << 8); // LMA | LME
}

/// A one-shot start gate: threads wait until the spawner says go (true) or quit (false).
#[derive(Default)]
struct Gate {
    state: Mutex<Option<bool>>,
    cv: Condvar,
}

impl Gate {
    fn open(&self, go: bool) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = Some(go);
        self.cv.notify_all();
    }

    fn wait(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(go) = *state {
                return go;
            }
            state = self.cv.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Body of vCPU thread `index`.
fn run_plan(
    index: usize,
    vcpu: &mut VcpuFd,
    plan: &[Task],
    gate: &Gate,
    barrier: &Barrier,
) -> Result<VcpuReport, RefVmError> {
    if !gate.wait() {
        return Ok(VcpuReport::default());
    }
    barrier.wait();
    let start = Instant::now();
    let mut kvm_runs = 0u64;
    let mut results = Vec::with_capacity(plan.len());
    for task in plan {
        let (selector, key) = task.workload.guest_inputs();
        let regs = kvm_regs {
            rip: guest::CODE_GPA,
            rflags: GUEST_RFLAGS,
            rdi: task.gpa_start,
            rsi: task.gpa_end,
            rbx: selector,
            rdx: key,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let t0 = Instant::now();
        run_until_done(index, vcpu, &mut kvm_runs)?;
        let elapsed = t0.elapsed();
        let value = match task.workload {
            Workload::Checksum => vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?.rax,
            Workload::WritePattern { .. } | Workload::Touch => 0,
        };
        results.push(TaskResult { value, elapsed });
    }
    Ok(VcpuReport {
        results,
        kvm_runs,
        elapsed: start.elapsed(),
    })
}

/// `KVM_RUN` until the guest's `out` on [`guest::DONE_PORT`], re-entering after interrupts.
fn run_until_done(index: usize, vcpu: &mut VcpuFd, kvm_runs: &mut u64) -> Result<(), RefVmError> {
    loop {
        *kvm_runs += 1;
        let failure = match vcpu.run() {
            Ok(VcpuExit::IoOut(guest::DONE_PORT, _)) => return Ok(()),
            Ok(VcpuExit::Intr) => continue,
            Err(e) if e.errno() == libc::EINTR => continue,
            Ok(exit) => Ok(describe_exit(&exit)),
            Err(e) => Err(e),
        };
        let rip = vcpu.get_regs().ok().map(|r| r.rip);
        let err = match failure {
            Ok(mut reason) => {
                let run = vcpu.get_kvm_run();
                let exit_reason = run.exit_reason;
                if exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
                    // SAFETY: exit_reason says the kernel filled the `internal` union member.
                    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                    reason.push_str(&format!(" (suberror {suberror})"));
                }
                RefVmError::UnexpectedExit {
                    vcpu: index,
                    exit_reason,
                    reason,
                    rip,
                }
            }
            Err(source) => RefVmError::RunFailed {
                vcpu: index,
                rip,
                source,
            },
        };
        settle(index, vcpu);
        return Err(err);
    }
}

/// Lets KVM finish whatever it left pending for userspace at the refused exit (e.g. the rest of
/// an emulated MMIO read, which would otherwise complete with stale state on the next `KVM_RUN`
/// and override the next task's registers) without entering the guest: one `KVM_RUN` with
/// `immediate_exit` set, which KVM answers with `EINTR`.
fn settle(index: usize, vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    let outcome = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => None,
        Err(e) => Some(e.to_string()),
        Ok(exit) => Some(format!("{exit:?}")),
    };
    vcpu.set_kvm_immediate_exit(0);
    if let Some(outcome) = outcome {
        tracing::debug!(vcpu = index, %outcome, "refvmm: settling KVM_RUN did not return EINTR");
    }
}

fn describe_exit(exit: &VcpuExit<'_>) -> String {
    match exit {
        VcpuExit::IoOut(guest::BAD_SELECTOR_PORT, _) => {
            "the guest rejected its workload selector (out on port 0x11)".to_string()
        }
        VcpuExit::IoOut(port, data) => format!("IO out of {} bytes on port {port:#x}", data.len()),
        VcpuExit::IoIn(port, data) => format!("IO in of {} bytes on port {port:#x}", data.len()),
        VcpuExit::MmioRead(gpa, data) => {
            format!(
                "MMIO read of {} bytes at GPA {gpa:#x} (no memslot there)",
                data.len()
            )
        }
        VcpuExit::MmioWrite(gpa, data) => {
            format!(
                "MMIO write of {} bytes at GPA {gpa:#x} (no memslot there)",
                data.len()
            )
        }
        VcpuExit::Hlt => "HLT".to_string(),
        VcpuExit::Shutdown => "shutdown (triple fault)".to_string(),
        VcpuExit::FailEntry(reason, cpu) => {
            format!("entry failure (hardware reason {reason:#x}, host CPU {cpu})")
        }
        VcpuExit::InternalError => "KVM internal error".to_string(),
        VcpuExit::Exception => "exception".to_string(),
        VcpuExit::MemoryFault { flags, gpa, size } => {
            format!("memory fault at GPA {gpa:#x} size {size:#x} flags {flags:#x}")
        }
        VcpuExit::SystemEvent(kind, _) => format!("system event of type {kind}"),
        VcpuExit::Unsupported(reason) => format!("exit reason {reason} unknown to kvm-ioctls"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm_or_skip(test: &str) -> bool {
        if RefVm::kvm_available() {
            return true;
        }
        assert!(
            std::env::var("VMPAGER_REQUIRE_KVM").as_deref() != Ok("1"),
            "{test}: /dev/kvm is not usable but VMPAGER_REQUIRE_KVM=1"
        );
        eprintln!("{test}: SKIPPED, /dev/kvm is not usable");
        false
    }

    /// Runs the program on vCPU 0 with raw inputs (bypassing task checks) and returns the error.
    fn run_raw(vm: &RefVm, rdi: u64, rsi: u64, rbx: u64) -> Result<u64, RefVmError> {
        let mut vcpus = vm.vcpus.lock().unwrap_or_else(PoisonError::into_inner);
        let vcpu = vcpus.first_mut().ok_or(RefVmError::NoRegions)?;
        let regs = kvm_regs {
            rip: guest::CODE_GPA,
            rflags: GUEST_RFLAGS,
            rdi,
            rsi,
            rbx,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let mut runs = 0;
        run_until_done(0, vcpu, &mut runs)?;
        Ok(vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?.rax)
    }

    #[test]
    fn unexpected_exits_carry_reason_and_rip() {
        if !kvm_or_skip("unexpected_exits_carry_reason_and_rip") {
            return;
        }
        // Declared before `vm`, so it outlives the VM.
        let mut mem = LowMem::new(2 << 20).expect("map test memory");
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for w in mem.as_mut_slice().chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let want = checksum_words(mem.as_mut_slice());
        assert_ne!(want, 0);
        let first_page = checksum_words(&mem.as_mut_slice()[..4096]);
        let gpa = 4 * guest::GIB;
        let region = GuestRegion {
            gpa,
            host_addr: mem.ptr,
            size: 2 << 20,
        };
        // SAFETY: `mem` is mapped read/write and outlives `vm`.
        let vm = unsafe { RefVm::new(&[region], 1) }.expect("create VM");

        // A good raw run first; an empty range gives 0.
        assert_eq!(
            run_raw(&vm, gpa, gpa + 4096, guest::SEL_CHECKSUM).ok(),
            Some(first_page)
        );
        assert_eq!(run_raw(&vm, gpa, gpa, guest::SEL_TOUCH).ok(), Some(0));

        // Unknown selector: the guest's `out 0x11` at program offset 0x18.
        let err = run_raw(&vm, gpa, gpa + 4096, 7).expect_err("bad selector");
        eprintln!("{err}");
        match &err {
            RefVmError::UnexpectedExit {
                vcpu: 0,
                exit_reason,
                rip: Some(rip),
                reason,
            } => {
                assert_eq!(*exit_reason, kvm_bindings::KVM_EXIT_IO);
                assert!(reason.contains("workload selector"), "{reason}");
                assert!(
                    (guest::CODE_GPA + 0x18..=guest::CODE_GPA + 0x1a).contains(rip),
                    "rip {rip:#x}"
                );
            }
            other => panic!("wrong error: {other:?}"),
        }
        assert!(err.to_string().starts_with("Unexpected exit on vCPU 0: "));

        // A read where no memslot is (2 GiB is identity-mapped but not backed): MMIO exit at the
        // checksum loop's load (offset 0x1e).
        let hole = 2 * guest::GIB;
        let err = run_raw(&vm, hole, hole + 4096, guest::SEL_CHECKSUM).expect_err("MMIO");
        eprintln!("{err}");
        match &err {
            RefVmError::UnexpectedExit {
                exit_reason,
                rip: Some(rip),
                reason,
                ..
            } => {
                assert_eq!(*exit_reason, kvm_bindings::KVM_EXIT_MMIO);
                assert!(reason.contains("0x80000000"), "{reason}");
                assert_eq!(*rip, guest::CODE_GPA + 0x1e);
            }
            other => panic!("wrong error: {other:?}"),
        }

        // The vCPU is still usable afterwards through the public API.
        let plans = split_evenly(&[region], 1, Workload::Checksum);
        let reports = vm.run(&plans).expect("run after errors");
        assert_eq!(reports[0].results[0].value, want);
    }
}
