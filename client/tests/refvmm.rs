//! Tests of the reference VMM against the real /dev/kvm.
//!
//! Without /dev/kvm the KVM tests print why and pass, unless `VMPAGER_REQUIRE_KVM=1` is set, in
//! which case they fail. The layout and planning tests need no KVM.
#![cfg(feature = "refvmm")]

use std::ptr::NonNull;
use std::time::Instant;

use vmpager_client::refvmm::{
    checksum_words, split_evenly, GuestRegion, RefVm, RefVmError, Task, Workload,
};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// True if /dev/kvm is usable; otherwise skip (or fail when VMPAGER_REQUIRE_KVM=1).
fn kvm_or_skip(test: &str) -> bool {
    if RefVm::kvm_available() {
        return true;
    }
    if std::env::var("VMPAGER_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: /dev/kvm is not usable but VMPAGER_REQUIRE_KVM=1");
    }
    eprintln!(
        "{test}: SKIPPED, /dev/kvm is not usable (set VMPAGER_REQUIRE_KVM=1 to fail instead)"
    );
    false
}

/// Private anonymous memory owned by the test, unmapped on drop.
struct Anon {
    ptr: NonNull<u8>,
    len: usize,
}

impl Anon {
    fn new(len: u64) -> Anon {
        let len = len as usize;
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::NORESERVE,
            )
        }
        .expect("mmap anonymous test memory");
        Anon {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned null"),
            len,
        }
    }

    fn region(&self, gpa: u64) -> GuestRegion {
        GuestRegion {
            gpa,
            host_addr: self.ptr,
            size: self.len as u64,
        }
    }

    /// Host view. Only used while no vCPU runs (between `RefVm::run` calls).
    fn bytes(&self) -> &[u8] {
        // SAFETY: our own live mapping of `len` bytes; guests only write it inside `RefVm::run`,
        // which these tests never overlap with a host borrow.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` excludes other host borrows.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    fn fill_random(&mut self, seed: u64) {
        let mut x = seed | 1;
        for chunk in self.bytes_mut().chunks_exact_mut(8) {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            chunk.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`; the VM using it was dropped first (each
        // test declares its `Anon`s before its `RefVm`).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The host bytes behind `[start, end)` of the region at `gpa` backed by `mem`.
fn host_range(mem: &Anon, gpa: u64, start: u64, end: u64) -> &[u8] {
    &mem.bytes()[(start - gpa) as usize..(end - gpa) as usize]
}

/// Finds which of `mems` (with their GPAs) holds a task.
fn backing<'a>(mems: &[(&'a Anon, u64)], t: &Task) -> (&'a Anon, u64) {
    *mems
        .iter()
        .find(|(m, gpa)| *gpa <= t.gpa_start && t.gpa_end <= gpa + m.len as u64)
        .expect("task inside a region")
}

#[test]
fn checksum_pattern_touch_on_two_vcpus() {
    if !kvm_or_skip("checksum_pattern_touch_on_two_vcpus") {
        return;
    }
    let (gpa_a, gpa_b) = (4 * GIB, 8 * GIB);
    let mut a = Anon::new(64 * MIB);
    let mut b = Anon::new(8 * MIB);
    a.fill_random(0x1234_5678);
    b.fill_random(0x9abc_def0);
    let regions = [a.region(gpa_a), b.region(gpa_b)];
    // SAFETY: `a` and `b` are declared before `vm`, so they stay mapped while it lives.
    let vm = unsafe { RefVm::new(&regions, 2) }.expect("create VM");
    assert_eq!(vm.vcpu_count(), 2);
    let mems = [(&a, gpa_a), (&b, gpa_b)];

    // Checksum: every task's value matches the host-side checksum of the same bytes.
    let plans = split_evenly(&regions, 2, Workload::Checksum);
    let reports = vm.run(&plans).expect("checksum run");
    assert_eq!(reports.len(), 2);
    let mut tasks = 0;
    for (plan, report) in plans.iter().zip(&reports) {
        assert_eq!(plan.len(), report.results.len());
        assert!(report.kvm_runs >= plan.len() as u64);
        for (t, r) in plan.iter().zip(&report.results) {
            let (mem, gpa) = backing(&mems, t);
            let want = checksum_words(host_range(mem, gpa, t.gpa_start, t.gpa_end));
            assert_eq!(
                r.value, want,
                "checksum of {:#x}..{:#x}",
                t.gpa_start, t.gpa_end
            );
            assert_ne!(want, 0);
            tasks += 1;
        }
    }
    assert!(tasks >= 3, "the split crosses the region boundary");

    // WritePattern: word 0 of every page is page_gpa ^ key; word 1 is untouched.
    let key = 0xdead_beef_0bad_f00d;
    let before: Vec<Vec<u8>> = vec![a.bytes().to_vec(), b.bytes().to_vec()];
    let plans = split_evenly(&regions, 2, Workload::WritePattern { key });
    let reports = vm.run(&plans).expect("pattern run");
    for report in &reports {
        assert!(report.results.iter().all(|r| r.value == 0));
    }
    for ((mem, gpa), old) in mems.iter().zip(&before) {
        for (i, (page, old_page)) in mem
            .bytes()
            .chunks_exact(PAGE as usize)
            .zip(old.chunks_exact(PAGE as usize))
            .enumerate()
        {
            let page_gpa = gpa + i as u64 * PAGE;
            let word = u64::from_le_bytes(page[..8].try_into().expect("8 bytes"));
            assert_eq!(word, page_gpa ^ key, "pattern at {page_gpa:#x}");
            assert_eq!(
                page[8..],
                old_page[8..],
                "rest of page {page_gpa:#x} untouched"
            );
        }
    }

    // Checksum again over the patterned memory, now split across one vCPU only.
    let plans = split_evenly(&regions, 1, Workload::Checksum);
    let reports = vm.run(&plans).expect("second checksum run");
    for (t, r) in plans[0].iter().zip(&reports[0].results) {
        let (mem, gpa) = backing(&mems, t);
        assert_eq!(
            r.value,
            checksum_words(host_range(mem, gpa, t.gpa_start, t.gpa_end))
        );
    }

    // Touch: byte 0 of every page becomes 1, byte 1 keeps the pattern's byte.
    let plans = split_evenly(&regions, 2, Workload::Touch);
    vm.run(&plans).expect("touch run");
    for (mem, gpa) in mems {
        for (i, page) in mem.bytes().chunks_exact(PAGE as usize).enumerate() {
            let page_gpa = gpa + i as u64 * PAGE;
            assert_eq!(page[0], 1, "touch at {page_gpa:#x}");
            assert_eq!(
                page[1],
                ((page_gpa ^ key) >> 8) as u8,
                "byte 1 at {page_gpa:#x}"
            );
        }
    }
}

#[test]
fn region_near_64_gib_uses_many_page_directories() {
    if !kvm_or_skip("region_near_64_gib_uses_many_page_directories") {
        return;
    }
    let gpa = 63 * GIB + 2 * MIB + 3 * PAGE; // not 2 MiB aligned, only 4 KiB
    let mut mem = Anon::new(2 * MIB + 5 * PAGE);
    mem.fill_random(42);
    let regions = [mem.region(gpa)];
    // SAFETY: `mem` is declared before `vm`.
    let vm = unsafe { RefVm::new(&regions, 1) }.expect("create VM");
    assert!(vm.guest_addr_limit() >= 64 * GIB);
    assert!(vm.low_slot_len() >= 0x4000 + 64 * PAGE);
    let plans = split_evenly(&regions, 1, Workload::Checksum);
    let reports = vm.run(&plans).expect("checksum");
    assert_eq!(reports[0].results[0].value, checksum_words(mem.bytes()));
    vm.run(&split_evenly(
        &regions,
        1,
        Workload::WritePattern { key: 7 },
    ))
    .expect("pattern");
    let last = (mem.len - PAGE as usize)..(mem.len - PAGE as usize + 8);
    let word = u64::from_le_bytes(mem.bytes()[last].try_into().expect("8 bytes"));
    assert_eq!(word, (gpa + mem.len as u64 - PAGE) ^ 7);
}

fn region(gpa: u64, host: usize, size: u64) -> GuestRegion {
    GuestRegion {
        gpa,
        host_addr: NonNull::new(host as *mut u8).expect("non-null"),
        size,
    }
}

#[test]
fn bad_layouts_are_refused() {
    let h = 0x7f00_0000_0000usize;
    let cases: Vec<(&str, Vec<GuestRegion>)> = vec![
        ("empty", vec![]),
        ("below 1 GiB", vec![region(512 * MIB, h, 2 * MIB)]),
        ("at 1 MiB", vec![region(MIB, h, 2 * MIB)]),
        ("overlapping the low slot", vec![region(0, h, 4 * MIB)]),
        ("zero size", vec![region(4 * GIB, h, 0)]),
        ("unaligned GPA", vec![region(4 * GIB + 512, h, 2 * MIB)]),
        ("unaligned size", vec![region(4 * GIB, h, 2 * MIB + 8)]),
        (
            "unaligned host address",
            vec![region(4 * GIB, h + 16, 2 * MIB)],
        ),
        (
            "overlapping",
            vec![
                region(4 * GIB, h, 64 * MIB),
                region(4 * GIB + 32 * MIB, h + 0x1000_0000, 64 * MIB),
            ],
        ),
        (
            "overlapping, second first",
            vec![
                region(4 * GIB + 32 * MIB, h, 64 * MIB),
                region(4 * GIB, h + 0x1000_0000, 64 * MIB),
            ],
        ),
        (
            "beyond 512 GiB",
            vec![region(512 * GIB - 2 * MIB, h, 4 * MIB)],
        ),
        ("GPA wraps", vec![region(u64::MAX - PAGE + 1, h, 2 * PAGE)]),
    ];
    for (what, regions) in &cases {
        let err = RefVm::check_layout(regions).expect_err(what);
        eprintln!("{what}: {err}");
        assert!(
            matches!(err, RefVmError::BadRegion { .. } | RefVmError::NoRegions),
            "{what}: {err:?}"
        );
        if RefVm::kvm_available() {
            // SAFETY: refused before any memslot is registered, so the bogus host addresses are
            // never used.
            let err = unsafe { RefVm::new(regions, 1) }.expect_err(what);
            assert!(
                matches!(err, RefVmError::BadRegion { .. } | RefVmError::NoRegions),
                "{what}: {err:?}"
            );
        }
    }
    // Adjacent (touching) regions are fine.
    RefVm::check_layout(&[
        region(GIB, h, 2 * MIB),
        region(GIB + 2 * MIB, h + 0x1000_0000, PAGE),
    ])
    .expect("adjacent regions");
}

#[test]
fn bad_tasks_and_plans_are_refused() {
    if !kvm_or_skip("bad_tasks_and_plans_are_refused") {
        return;
    }
    let a = Anon::new(2 * MIB);
    let b = Anon::new(2 * MIB);
    let regions = [a.region(4 * GIB), b.region(4 * GIB + 2 * MIB)];
    // SAFETY: `a` and `b` are declared before `vm`.
    let vm = unsafe { RefVm::new(&regions, 2) }.expect("create VM");
    let task = |s, e| Task {
        workload: Workload::Touch,
        gpa_start: s,
        gpa_end: e,
    };
    let bad = [
        task(4 * GIB, 4 * GIB + 4 * MIB),     // crosses into the next region
        task(4 * GIB + 8, 4 * GIB + PAGE),    // unaligned
        task(4 * GIB + PAGE, 4 * GIB + PAGE), // empty
        task(4 * GIB + 2 * PAGE, 4 * GIB),    // reversed
        task(2 * GIB, 2 * GIB + PAGE),        // no region
        task(4 * GIB - PAGE, 4 * GIB + PAGE), // starts before the region
    ];
    for t in bad {
        let err = vm.run(&[vec![], vec![t]]).expect_err("bad task refused");
        assert!(
            matches!(
                err,
                RefVmError::BadTask {
                    vcpu: 1,
                    task: 0,
                    ..
                }
            ),
            "{err:?}"
        );
        eprintln!("{err}");
    }
    let err = vm
        .run(&[vec![], vec![], vec![]])
        .expect_err("3 plans on 2 vCPUs");
    assert!(
        matches!(err, RefVmError::TooManyPlans { plans: 3, vcpus: 2 }),
        "{err:?}"
    );
    assert!(vm.run(&[]).expect("no plans").is_empty());
    // Fewer plans than vCPUs, and an empty plan, are fine.
    let reports = vm
        .run(&[vec![task(4 * GIB, 4 * GIB + PAGE)]])
        .expect("one plan");
    assert_eq!(reports.len(), 1);
    assert_eq!(a.bytes()[0], 1);
    // SAFETY: `a` is still mapped; zero vCPUs is refused before anything is registered.
    let err = unsafe { RefVm::new(&regions, 0) }.expect_err("zero vCPUs");
    assert!(matches!(err, RefVmError::BadVcpuCount { .. }), "{err:?}");
}

#[test]
fn split_evenly_covers_all_pages_once() {
    let h = 0x7f00_0000_0000usize;
    // Given out of GPA order on purpose.
    let regions = [
        region(8 * GIB, h, 3 * PAGE),
        region(4 * GIB, h + 0x1000_0000, 10 * PAGE),
    ];
    for n in 1..=15 {
        let plans = split_evenly(&regions, n, Workload::Touch);
        assert_eq!(plans.len(), n);
        let mut pages = Vec::new();
        let mut counts = Vec::new();
        for plan in &plans {
            let mut count = 0;
            for t in plan {
                assert!(t.gpa_start < t.gpa_end);
                assert_eq!(t.workload, Workload::Touch);
                let inside = regions
                    .iter()
                    .any(|r| r.gpa <= t.gpa_start && t.gpa_end <= r.gpa + r.size);
                assert!(inside, "task {t:?} inside one region");
                pages.extend((t.gpa_start..t.gpa_end).step_by(PAGE as usize));
                count += (t.gpa_end - t.gpa_start) / PAGE;
            }
            counts.push(count);
        }
        let want: Vec<u64> = (0..10)
            .map(|i| 4 * GIB + i * PAGE)
            .chain((0..3).map(|i| 8 * GIB + i * PAGE))
            .collect();
        assert_eq!(pages, want, "n = {n}: every page once, in GPA order");
        let (min, max) = (counts.iter().min(), counts.iter().max());
        assert!(
            max.zip(min).is_some_and(|(x, y)| x - y <= 1),
            "n = {n}: {counts:?}"
        );
    }
    assert!(split_evenly(&regions, 0, Workload::Checksum).is_empty());
}

#[test]
fn checksum_words_matches_definition() {
    let bytes: Vec<u8> = (0..64u8).collect();
    let mut h = 0u64;
    for w in bytes.chunks_exact(8) {
        h = h.rotate_left(7) ^ u64::from_le_bytes(w.try_into().expect("8 bytes"));
    }
    assert_eq!(checksum_words(&bytes), h);
}

/// Informational only (never asserted): first-touch rate of `Touch` over 64 MiB of fresh anon
/// memory (kernel demand faults through KVM), then the same pages again.
#[test]
fn touch_rate_info() {
    if !kvm_or_skip("touch_rate_info") {
        return;
    }
    let len = 64 * MIB;
    let pages = len / PAGE;
    for vcpus in [1usize, 2] {
        let mem = Anon::new(len);
        // SAFETY: an advice call on our own mapping.
        let _ = unsafe {
            rustix::mm::madvise(
                mem.ptr.as_ptr().cast(),
                mem.len,
                rustix::mm::Advice::LinuxNoHugepage,
            )
        };
        let regions = [mem.region(4 * GIB)];
        let t_new = Instant::now();
        // SAFETY: `mem` outlives `vm` (dropped at the end of this iteration, after `vm`).
        let vm = unsafe { RefVm::new(&regions, vcpus) }.expect("create VM");
        let new_time = t_new.elapsed();
        let plans = split_evenly(&regions, vcpus, Workload::Touch);
        for pass in ["first touch", "second pass"] {
            let reports = vm.run(&plans).expect("touch");
            let wall = reports.iter().map(|r| r.elapsed).max().unwrap_or_default();
            let runs: u64 = reports.iter().map(|r| r.kvm_runs).sum();
            println!(
                "refvmm touch, {vcpus} vCPU(s), 64 MiB anon (4 KiB pages), {pass}: {:.0} pages/s \
                 ({:.0} ns/page, {runs} KVM_RUNs, {:.2} ms wall; RefVm::new {:.2} ms)",
                pages as f64 / wall.as_secs_f64(),
                wall.as_nanos() as f64 / pages as f64,
                wall.as_secs_f64() * 1e3,
                new_time.as_secs_f64() * 1e3,
            );
        }
        drop(vm);
    }
}

/// A run stopped mid-task (a VMM update) and continued on a new VM from the saved states — as
/// JSON, as a successor process would read them — gives the checksums of an uninterrupted run.
#[test]
fn a_paused_run_resumed_on_a_new_vm_gives_the_same_checksums() {
    use vmpager_client::refvmm::{Pause, Run, VcpuState};
    if !kvm_or_skip("a_paused_run_resumed_on_a_new_vm_gives_the_same_checksums") {
        return;
    }
    let mut mem = Anon::new(64 * MIB);
    mem.fill_random(77);
    let regions = [mem.region(GIB)];
    let plans = split_evenly(&regions, 2, Workload::Checksum);
    let want: Vec<Vec<u64>> = plans
        .iter()
        .map(|p| {
            p.iter()
                .map(|t| checksum_words(host_range(&mem, GIB, t.gpa_start, t.gpa_end)))
                .collect()
        })
        .collect();
    // Stop before the first instruction (the pause requested before the run: it is always
    // taken), then early, mid-run and late, wherever the delay lands: a run that finished
    // before its pause came must have the right checksums too.
    let mut paused = 0;
    for delay_ms in [0u64, 2, 10, 40] {
        let pause = std::sync::Arc::new(Pause::new());
        if delay_ms == 0 {
            pause.request();
        }
        // SAFETY: `mem` outlives both VMs.
        let first = unsafe { RefVm::new(&regions, 2) }.unwrap();
        let p2 = pause.clone();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            p2.request()
        });
        let run = first.run_pausable(&plans, &pause).unwrap();
        stopper.join().unwrap();
        let states = match run {
            Run::Paused(states) => states,
            Run::Done(reports) => {
                assert_ne!(
                    delay_ms, 0,
                    "a pause requested before the run was not taken"
                );
                for (v, report) in reports.iter().enumerate() {
                    let got: Vec<u64> = report.results.iter().map(|r| r.value).collect();
                    assert_eq!(got, want[v], "vCPU {v}, finished before {delay_ms} ms");
                }
                continue;
            }
        };
        paused += 1;
        drop(first);
        eprintln!(
            "paused after {delay_ms} ms at {:?}",
            states
                .iter()
                .map(|s| (s.task, s.regs.rip, s.regs.rdi))
                .collect::<Vec<_>>()
        );
        // SAFETY: as above.
        let second = unsafe { RefVm::new(&regions, 2) }.unwrap();
        let base = kvm_bindings::kvm_sregs::default();
        let saved: Vec<VcpuState> = states
            .iter()
            .map(|s| {
                let mut v = VcpuState::from_json(&s.to_json(), &base).unwrap();
                assert_eq!((v.sregs.cr3, v.sregs.efer), (s.sregs.cr3, s.sregs.efer));
                v.sregs = s.sregs; // the segments, as the reference guest sets them up
                v
            })
            .collect();
        for (a, b) in states.iter().zip(&saved) {
            assert_eq!(
                (a.task, a.regs.rip, a.regs.rax, a.regs.rdi),
                (b.task, b.regs.rip, b.regs.rax, b.regs.rdi)
            );
        }
        let reports = second.resume(&plans, &saved).unwrap();
        for (v, report) in reports.iter().enumerate() {
            let got: Vec<u64> = report.results.iter().map(|r| r.value).collect();
            assert_eq!(got, want[v], "vCPU {v}, paused after {delay_ms} ms");
        }
    }
    assert!(paused >= 1);
}
