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
//! released together by a barrier right before their first `KVM_RUN`. [`RefVm::run_pausable`]
//! stops them on request (a VMM update) and hands back each vCPU's state, which
//! [`RefVm::resume`] — in this process or a new one — continues from.

mod error;
pub mod guest;
mod host;
mod low;
mod pause;
mod plan;
mod run;
mod vcpu;

use error::kvm_err;
pub use error::RefVmError;
pub use host::HostLimits;
use low::LowMem;
pub use pause::{Pause, VcpuState};
pub use run::Run;

use std::fmt;
use std::ptr::NonNull;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use kvm_bindings::{kvm_segment, kvm_sregs, kvm_userspace_memory_region, CpuId};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

pub use guest::checksum_words;
pub use plan::split_evenly;
use plan::{check_regions, Span};

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
    /// Read the first 8-byte word of `count` pages of the task's range in a scattered order —
    /// page `k · stride mod n` for `k` in `0..count`, where the range is `n` pages (`n` a power
    /// of two) and `stride` is odd, so every page visited is a different one — and report the
    /// checksum of the words in visiting order (see [`scatter_checksum`]): a workload whose
    /// working set is a fixed, scattered part of memory.
    Scatter {
        /// Odd step, in pages.
        stride: u64,
        /// Pages visited, at most `n`.
        count: u64,
    },
}

/// The order of pages a [`Workload::Scatter`] over `pages` pages visits.
pub fn scatter_order(pages: u64, stride: u64, count: u64) -> impl Iterator<Item = u64> {
    let mask = pages.wrapping_sub(1);
    (0..count).map(move |k| k.wrapping_mul(stride) & mask)
}

/// The checksum a [`Workload::Scatter`] reports, from the first word of each visited page:
/// `h = h.rotate_left(7) ^ word`, in visiting order.
pub fn scatter_checksum(first_words: impl Iterator<Item = u64>) -> u64 {
    first_words.fold(0, |h, w| h.rotate_left(7) ^ w)
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
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let host = HostLimits::of(&kvm, &cpuid);
        if vcpus == 0 || vcpus > host.max_vcpus {
            return Err(RefVmError::BadVcpuCount {
                requested: vcpus,
                max: host.max_vcpus,
            });
        }
        let max_regions = kvm.get_nr_memslots().saturating_sub(1);
        if regions.len() > max_regions {
            return Err(RefVmError::TooManyRegions {
                regions: regions.len(),
                max: max_regions,
            });
        }
        let addr_limit = host.guest_addr_limit;
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

#[cfg(test)]
mod tests {
    use super::vcpu::run_until_done;
    use super::*;
    use kvm_bindings::kvm_regs;

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
        run_until_done(0, vcpu, &mut runs, None)?;
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

        // Unknown selector: the guest's `out 0x11` at program offset 0x7e.
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
                    (guest::CODE_GPA + 0x7e..=guest::CODE_GPA + 0x80).contains(rip),
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

        // A scatter over the 512 pages: the first word of every page visited, in its order.
        let word = |p: u64| {
            let at = (p * guest::PAGE_SIZE) as usize;
            let mut w = [0u8; 8];
            w.copy_from_slice(&mem.as_mut_slice()[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let (stride, count) = (317, 100);
        let task = Task {
            workload: Workload::Scatter { stride, count },
            gpa_start: gpa,
            gpa_end: gpa + (2 << 20),
        };
        let reports = vm.run(&[vec![task]]).expect("scatter");
        let want = scatter_checksum(scatter_order(512, stride, count).map(word));
        assert_eq!(reports[0].results[0].value, want);
        let visited: std::collections::HashSet<u64> = scatter_order(512, stride, count).collect();
        assert_eq!(visited.len(), 100, "every page visited is a different one");
        // An even stride, or a range that is not a power of two, is refused.
        let bad = Task {
            workload: Workload::Scatter { stride: 2, count },
            ..task
        };
        assert!(matches!(
            vm.run(&[vec![bad]]),
            Err(RefVmError::BadTask { .. })
        ));
        let bad = Task {
            gpa_end: gpa + 3 * guest::PAGE_SIZE,
            ..task
        };
        assert!(matches!(
            vm.run(&[vec![bad]]),
            Err(RefVmError::BadTask { .. })
        ));
    }
}
