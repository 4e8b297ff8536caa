//! Hybrid migration (docs/migration.md, "Hybrid"): the bulk channel pushes while the guest
//! still runs on the source, pages written after they were sent are invalidated at the
//! destination and sent again, and once the source VMM paused its guest and asked for the
//! switchover, the destination reports `Switched` only after every invalidation was applied.
//! Host threads play the guest: on the source a writer keeps marking pages (some already
//! pushed) while the push runs; the destination's pages are read only after `Switched`, and
//! each must be the source's final content.

mod common;
#[path = "migration_rig/mod.rs"]
mod rig;

use common::*;
use rig::*;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use vmpager_client::demo::PatternGen;
use vmpager_client::{memory::MemoryError, Client, PageSource, PopulateMethod, VmSpec};
use vmpager_protocol::message::{MigrationKey, MigrationState, MigrationStatus};

fn wait_for(client: &Client, vm_id: u64, what: &str, ok: impl Fn(&MigrationStatus) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let s = client.migration(vm_id).unwrap();
        if ok(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "never {what}: {s:?}");
        std::thread::yield_now();
    }
}

/// The guest on the source: rounds of marks into word 0 of every page (each round in a
/// different order) until `stop`; returns the last mark of each page (0: never written).
fn guest_writer(addrs: &[usize], stop: &AtomicBool) -> Vec<u64> {
    let mut last = vec![0u64; PAGES];
    let mut round = 1u64;
    while !stop.load(Ordering::Acquire) {
        for k in 0..PAGES {
            let p = (k * 389 + round as usize * 17) % PAGES;
            let mark = (round << 32) | 0x5eed_0000 | p as u64;
            // SAFETY: `addrs[p]` is word 0 of page p inside the source VM's live mapping
            // (kept alive by the caller until this thread is joined), 8-byte aligned; the
            // test reads the page only through `read_page` after this thread ended.
            unsafe { (addrs[p] as *mut u64).write_volatile(mark) };
            last[p] = mark;
        }
        round += 1;
    }
    last
}

fn word0(page: &[u8]) -> u64 {
    u64::from_ne_bytes(page[..8].try_into().unwrap())
}

#[test]
fn a_hybrid_migration_invalidates_what_the_running_guest_wrote_after_it_was_pushed() {
    if !have_uffd() {
        return;
    }
    for (i, populate) in [PopulateMethod::Copy, PopulateMethod::Continue]
        .into_iter()
        .enumerate()
    {
        let dir = TestDir::new("migrate-hybrid");
        let src_d = daemon(&dir, "src.sock", true, PATIENCE);
        let dst_d = daemon(&dir, "dst.sock", false, PATIENCE);
        let src = Client::connect(src_d.socket_path()).unwrap();
        let dst = Client::connect(dst_d.socket_path()).unwrap();
        let mut image = vec![0u8; PAGES * PAGE];
        PatternGen::new(11).fill(&mut image);
        for p in (5..PAGES).step_by(97) {
            image[p * PAGE..(p + 1) * PAGE].fill(0);
        }
        let path = dir.join("snapshot.img");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&image)
            .unwrap();
        let mut src_mem = src
            .create_mapped_vm(VmSpec {
                regions: regions(),
                source: PageSource::File(std::fs::File::open(&path).unwrap()),
                populate,
                ..Default::default()
            })
            .unwrap();
        match src_mem.track_writes() {
            Err(MemoryError::NoWriteProtect) => {
                eprintln!("skipped: this host's userfaultfd cannot write-protect shared memory");
                return;
            }
            r => r.unwrap(),
        }
        let addrs: Vec<usize> = (0..PAGES)
            .map(|p| {
                let (r, page) = locate(&src_mem, p);
                r.host_addr().as_ptr() as usize + page * PAGE
            })
            .collect();
        let id = 77 + i as u64;
        let key = MigrationKey([9; 32]);
        let addr = src_d.migration_addr().unwrap().to_string();
        let dst_mem = dst
            .create_mapped_vm(VmSpec {
                regions: regions(),
                source: PageSource::Remote,
                populate,
                ..Default::default()
            })
            .unwrap();
        let stop = AtomicBool::new(false);
        let last = std::thread::scope(|s| {
            let writer = s.spawn(|| guest_writer(&addrs, &stop));
            let started = src.migrate_out(src_mem.vm_id(), id, key, true).unwrap();
            assert_eq!(started.state, MigrationState::Running, "{started:?}");
            dst.migrate_in(dst_mem.vm_id(), id, key, &addr).unwrap();
            // The push runs while the guest writes; some pages are written after they went.
            wait_for(&src, src_mem.vm_id(), "an invalidation", |s| {
                s.counters.pages_invalidated > 0
            });
            // The source VMM pauses its guest...
            stop.store(true, Ordering::Release);
            writer.join().unwrap()
        });
        // ... and asks for the switchover.
        let switched = src.migrate_out(src_mem.vm_id(), id, key, false).unwrap();
        assert_eq!(switched.state, MigrationState::Switched, "{switched:?}");
        // The destination VMM resumes its vCPUs once every invalidation is applied.
        wait_for(&dst, dst_mem.vm_id(), "switched", |s| {
            matches!(s.state, MigrationState::Switched | MigrationState::Complete)
        });
        let mut want = image;
        for (p, &mark) in last.iter().enumerate() {
            if mark != 0 {
                want[p * PAGE..p * PAGE + 8].copy_from_slice(&mark.to_ne_bytes());
            }
        }
        // The guest on the destination reads every page, in a scattered order.
        for k in 0..PAGES {
            let p = k * 613 % PAGES;
            let (r, page) = locate(&dst_mem, p);
            let got = read_page(r, page);
            let want = &want[p * PAGE..(p + 1) * PAGE];
            assert!(
                got == want,
                "page {p} ({populate:?}): word 0 {:#x}, want {:#x}; the rest {}",
                word0(&got),
                word0(want),
                if got[8..] == want[8..] {
                    "equal"
                } else {
                    "differs"
                },
            );
        }
        wait_for(&dst, dst_mem.vm_id(), "complete", |s| {
            s.state == MigrationState::Complete
        });
        let done = dst.migration(dst_mem.vm_id()).unwrap();
        assert!(done.counters.pages_invalidated > 0, "{done:?}");
        assert_eq!(done.counters.pages_done, PAGES as u64, "{done:?}");
        wait_for(&src, src_mem.vm_id(), "complete at the source", |s| {
            s.state == MigrationState::Complete
        });
        // Everything stays at the destination once the source is gone.
        drop(src_mem);
        drop(src);
        src_d.shutdown().unwrap();
        for p in 0..PAGES {
            let (r, page) = locate(&dst_mem, p);
            assert!(
                read_page(r, page) == want[p * PAGE..(p + 1) * PAGE],
                "page {p}"
            );
        }
    }
}
