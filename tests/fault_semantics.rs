//! Fault-serving semantics with the daemon on a thread of this process and host threads
//! faulting on the VMM mapping (as the kernel's uffd selftests do): removed ranges read as
//! zeros, duplicate faults from many threads are coalesced, EEXIST wakes the faulting thread,
//! and faults racing with removes never hang; fault-around and sequential prefetch install
//! exactly the untouched pages they should; every waiting mode serves faults.
//! (Leaks on disconnect: `tests/session_lifecycle.rs`.)

mod common;

use common::*;
use vmpager_client::demo::PatternGen;
use vmpager_client::{Client, PageSource, PopulateMethod, RegionSpec, VmSpec};
use vmpagerd::readahead::Readahead;
use vmpagerd::wait::WaitMode;
use vmpagerd::{Config, DaemonHandle};

const PAGE: usize = 4096;

fn daemon(dir: &TestDir) -> DaemonHandle {
    daemon_with(
        dir,
        Config {
            workers: 2,
            ..Config::default()
        },
    )
}

fn daemon_with(dir: &TestDir, config: Config) -> DaemonHandle {
    vmpagerd::spawn(config, &dir.join("d.sock")).unwrap()
}

/// A VM over a `pages`-page snapshot made with `seed`, mapped in this process.
fn snapshot_vm(
    client: &Client,
    dir: &TestDir,
    pages: usize,
    seed: u64,
    populate: PopulateMethod,
) -> (vmpager_client::VmMemory, Vec<u8>) {
    let img = image(dir, &format!("img{seed}"), (pages * PAGE) as u64, seed);
    let vm = client
        .create_mapped_vm(VmSpec {
            regions: vec![RegionSpec::new(1 << 32, (pages * PAGE) as u64, 0)],
            source: PageSource::File(img),
            populate,
            ..Default::default()
        })
        .unwrap();
    (vm, image_bytes(pages * PAGE, seed))
}

fn image_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    PatternGen::new(seed).fill(&mut v);
    v
}

#[test]
fn a_removed_range_reads_as_zeros_never_the_old_snapshot() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("remove");
    let d = daemon(&dir);
    let pages = 64;
    let client = Client::connect(d.socket_path()).unwrap();
    for populate in [PopulateMethod::Copy, PopulateMethod::Continue] {
        let (vm, snapshot) = snapshot_vm(&client, &dir, pages, 11, populate);
        let r = &vm.regions()[0];
        for p in 0..pages {
            assert_eq!(
                read_page(r, p),
                snapshot[p * PAGE..(p + 1) * PAGE],
                "page {p}"
            );
        }
        // The VMM discards pages 8..24 (balloon, or a guest's free-page report): the daemon
        // gets UFFD_EVENT_REMOVE before madvise returns.
        // SAFETY: the range is inside the mapping; its contents are not borrowed anywhere.
        unsafe {
            rustix::mm::madvise(
                r.host_addr().as_ptr().add(8 * PAGE).cast(),
                16 * PAGE,
                rustix::mm::Advice::LinuxRemove,
            )
        }
        .unwrap();
        for p in 0..pages {
            let expect = if (8..24).contains(&p) {
                vec![0; PAGE]
            } else {
                snapshot[p * PAGE..(p + 1) * PAGE].to_vec()
            };
            assert_eq!(
                read_page(r, p),
                expect,
                "{populate:?}: page {p} after remove"
            );
        }
        let s = client.stats(vm.vm_id()).unwrap();
        assert_eq!(s.remove_events, 1);
        assert_eq!(s.pages_from_source, pages as u64);
        assert_eq!(s.pages_zero, 16);
        client.detach(vm.vm_id()).unwrap();
    }
}

#[test]
fn many_threads_faulting_on_the_same_pages_are_coalesced() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("threads");
    let d = daemon(&dir);
    let pages = 512;
    let client = Client::connect(d.socket_path()).unwrap();
    for populate in [PopulateMethod::Copy, PopulateMethod::Continue] {
        let (vm, snapshot) = snapshot_vm(&client, &dir, pages, 12, populate);
        let r = &vm.regions()[0];
        let barrier = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            for t in 0..8 {
                let (barrier, snapshot) = (&barrier, &snapshot);
                s.spawn(move || {
                    barrier.wait();
                    // Threads walk the pages from different starting points and directions,
                    // so most pages are faulted on by several threads at once.
                    for i in 0..pages {
                        let p = if t % 2 == 0 {
                            (i + t * 64) % pages
                        } else {
                            pages - 1 - (i + t * 64) % pages
                        };
                        let got = read_page(r, p);
                        assert!(
                            got == snapshot[p * PAGE..(p + 1) * PAGE],
                            "thread {t} page {p}"
                        );
                    }
                });
            }
        });
        let s = client.stats(vm.vm_id()).unwrap();
        assert_eq!(
            s.pages_from_source, pages as u64,
            "{populate:?}: each page installed once: {s:?}"
        );
        // Every fault installed a run (its page plus prefetched ones), or was a duplicate.
        assert_eq!(
            s.faults,
            s.pages_from_source - s.pages_prefetched + s.coalesced + s.eexist,
            "{s:?}"
        );
        client.detach(vm.vm_id()).unwrap();
    }
}

#[test]
fn eexist_wakes_the_faulting_thread() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("eexist");
    let d = daemon(&dir);
    let client = Client::connect(d.socket_path()).unwrap();
    // Create, map and register, but keep the uffd to ourselves for a moment.
    let created = client
        .create_vm(VmSpec {
            regions: vec![RegionSpec::new(1 << 32, 16 * PAGE as u64, 0)],
            source: PageSource::Zero,
            populate: PopulateMethod::Copy,
            ..Default::default()
        })
        .unwrap();
    let vm_id = created.vm_id;
    let vm = vmpager_client::VmMemory::map(created).unwrap();
    let r = &vm.regions()[0];
    std::thread::scope(|s| {
        let reader = s.spawn(|| read_page(r, 3));
        // Wait until the reader is blocked in its fault: the uffd becomes readable.
        let uffd = vm.uffd();
        let mut fds = [rustix::event::PollFd::new(
            &uffd,
            rustix::event::PollFlags::IN,
        )];
        rustix::event::poll(&mut fds, None).unwrap();
        // The page appears in the memfd by another path than the fault (the VMM restoring it
        // with pwrite): UFFDIO_COPY will find it there and fail with EEXIST.
        let content = vec![0xabu8; PAGE];
        rustix::io::pwrite(r.memfd(), &content, 3 * PAGE as u64).unwrap();
        client
            .attach_uffd(vm_id, vm.uffd(), &vm.host_addrs())
            .unwrap();
        // Without the wake on EEXIST this join would hang forever.
        assert_eq!(reader.join().unwrap(), content);
    });
    let s = client.stats(vm_id).unwrap();
    assert_eq!((s.faults, s.eexist), (1, 1), "{s:?}");
}

#[test]
fn faults_racing_with_removes_never_hang_or_resurrect_old_bytes() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("race");
    let d = daemon(&dir);
    let pages = 128;
    let client = Client::connect(d.socket_path()).unwrap();
    for populate in [PopulateMethod::Copy, PopulateMethod::Continue] {
        let (vm, snapshot) = snapshot_vm(&client, &dir, pages, 14, populate);
        let r = &vm.regions()[0];
        let removes = 300;
        let removed_once = std::sync::Mutex::new(vec![false; pages]);
        std::thread::scope(|s| {
            for t in 0..3 {
                let (snapshot, removed_once) = (&snapshot, &removed_once);
                s.spawn(move || {
                    for i in 0..pages * 8 {
                        let p = (i * (2 * t + 1) + t) % pages;
                        // SAFETY: inside the live mapping; a read of shared memory.
                        let word = unsafe {
                            (r.host_addr().as_ptr().add(p * PAGE) as *const u64).read_volatile()
                        };
                        let mut w = [0u8; 8];
                        w.copy_from_slice(&snapshot[p * PAGE..p * PAGE + 8]);
                        // A page is the snapshot's until removed, zeros after: never anything else.
                        if word != u64::from_le_bytes(w) {
                            assert_eq!(word, 0, "page {p}");
                            assert!(
                                removed_once.lock().unwrap()[p],
                                "page {p} zero but never removed"
                            );
                        }
                    }
                });
            }
            s.spawn(|| {
                let mut gen = 0x9e37_79b9_7f4a_7c15u64;
                for _ in 0..removes {
                    gen = gen.rotate_left(13).wrapping_mul(0x2545_f491_4f6c_dd1d);
                    let first = (gen % pages as u64) as usize;
                    let len = 1 + (gen >> 32) as usize % 8.min(pages - first);
                    // Marked before the madvise: a reader may see zeros as soon as it starts.
                    removed_once.lock().unwrap()[first..first + len].fill(true);
                    // SAFETY: inside the mapping; nothing borrows its contents.
                    unsafe {
                        rustix::mm::madvise(
                            r.host_addr().as_ptr().add(first * PAGE).cast(),
                            len * PAGE,
                            rustix::mm::Advice::LinuxRemove,
                        )
                    }
                    .unwrap();
                }
            });
        });
        let s = client.stats(vm.vm_id()).unwrap();
        assert_eq!(s.remove_events, removes);
        assert_eq!(
            s.populate_errors + s.stray_faults + s.source_errors,
            0,
            "{s:?}"
        );
        eprintln!("{populate:?}: {s:?}");
        client.detach(vm.vm_id()).unwrap();
    }
}

#[test]
fn fault_around_installs_the_untouched_aligned_block_in_one_fault() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("around");
    let d = daemon_with(
        &dir,
        Config {
            workers: 1,
            readahead: Readahead {
                fault_around: 16,
                prefetch_max: 16,
            },
            ..Config::default()
        },
    );
    let client = Client::connect(d.socket_path()).unwrap();
    for (seed, populate) in [(21, PopulateMethod::Copy), (22, PopulateMethod::Continue)] {
        let (vm, snapshot) = snapshot_vm(&client, &dir, 64, seed, populate);
        let r = &vm.regions()[0];
        // Page 37 faults: pages 32..48 arrive with it.
        assert_eq!(read_page(r, 37), snapshot[37 * PAGE..38 * PAGE]);
        let s = client.stats(vm.vm_id()).unwrap();
        assert_eq!(
            (s.faults, s.pages_prefetched),
            (1, 15),
            "{populate:?}: {s:?}"
        );
        for p in 32..48 {
            assert_eq!(
                read_page(r, p),
                snapshot[p * PAGE..(p + 1) * PAGE],
                "page {p}"
            );
        }
        assert_eq!(
            client.stats(vm.vm_id()).unwrap().faults,
            1,
            "neighbours were installed"
        );
        // Remove 18..20 after installing block 16..32: a fault on 19 installs 19 alone (as a
        // zero page), and a fault on 17 stops at the removed page.
        assert_eq!(read_page(r, 24), snapshot[24 * PAGE..25 * PAGE]);
        // SAFETY: inside the mapping; its contents are not borrowed anywhere.
        unsafe {
            rustix::mm::madvise(
                r.host_addr().as_ptr().add(18 * PAGE).cast(),
                2 * PAGE,
                rustix::mm::Advice::LinuxRemove,
            )
        }
        .unwrap();
        assert_eq!(read_page(r, 19), vec![0; PAGE]);
        assert_eq!(read_page(r, 18), vec![0; PAGE]);
        assert_eq!(read_page(r, 17), snapshot[17 * PAGE..18 * PAGE]);
        let s = client.stats(vm.vm_id()).unwrap();
        assert_eq!((s.faults, s.pages_zero), (4, 2), "{populate:?}: {s:?}");
        client.detach(vm.vm_id()).unwrap();
    }
}

#[test]
fn a_sequential_sweep_is_prefetched_in_growing_windows() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("prefetch");
    let pages = 4096;
    // Off: one fault per page. On: a fault installs its 64 KiB block, and a fault continuing a
    // stream also queues up to 2 MiB ahead, installed while the thread reads on; the thread
    // may catch up with that copy, and then faults inside it, but never more than once per
    // block.
    for (readahead, max_faults) in [
        (Readahead::default(), pages as u64 / 16),
        (Readahead::OFF, pages as u64),
    ] {
        let d = daemon_with(
            &dir,
            Config {
                workers: 1,
                readahead,
                ..Config::default()
            },
        );
        let client = Client::connect(d.socket_path()).unwrap();
        let (vm, snapshot) = snapshot_vm(&client, &dir, pages, 23, PopulateMethod::Copy);
        let r = &vm.regions()[0];
        for p in 0..pages {
            assert!(
                read_page(r, p) == snapshot[p * PAGE..(p + 1) * PAGE],
                "page {p}"
            );
        }
        let s = client.stats(vm.vm_id()).unwrap();
        assert!(s.faults <= max_faults, "{readahead:?}: {s:?}");
        if readahead == Readahead::OFF {
            assert_eq!((s.faults, s.pages_prefetched), (pages as u64, 0), "{s:?}");
        } else {
            assert!(s.pages_prefetched >= pages as u64 * 15 / 16, "{s:?}");
        }
        assert_eq!(s.pages_from_source, pages as u64, "{s:?}");
        client.detach(vm.vm_id()).unwrap();
        drop(client);
        d.shutdown().unwrap();
    }
}

#[test]
fn every_wait_mode_serves_concurrent_faults() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("wait");
    let pages = 1024;
    for wait in [
        WaitMode::Blocking,
        WaitMode::BusyPoll,
        WaitMode::Adaptive {
            spin: std::time::Duration::from_micros(50),
        },
    ] {
        let d = daemon_with(
            &dir,
            Config {
                workers: 2,
                wait,
                readahead: Readahead::OFF,
                worker_cpus: vec![0],
                ..Config::default()
            },
        );
        let client = Client::connect(d.socket_path()).unwrap();
        let (vm, snapshot) = snapshot_vm(&client, &dir, pages, 24, PopulateMethod::Copy);
        let r = &vm.regions()[0];
        std::thread::scope(|s| {
            for t in 0..2 {
                let snapshot = &snapshot;
                s.spawn(move || {
                    for p in (t..pages).step_by(2) {
                        assert!(
                            read_page(r, p) == snapshot[p * PAGE..(p + 1) * PAGE],
                            "{wait:?}: page {p}"
                        );
                    }
                });
            }
        });
        let s = client.stats(vm.vm_id()).unwrap();
        assert_eq!(
            (s.faults, s.pages_from_source),
            (pages as u64, pages as u64),
            "{wait:?}"
        );
        client.detach(vm.vm_id()).unwrap();
        drop(client);
        d.shutdown().unwrap();
    }
}

/// A device backend (vhost-user, VFIO) writes guest memory through its own mapping of the
/// memfd; readahead must never overwrite such a page with snapshot bytes.
#[test]
fn readahead_never_overwrites_a_page_written_through_another_mapping() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("backend");
    let d = daemon_with(
        &dir,
        Config {
            workers: 1,
            readahead: Readahead {
                fault_around: 16,
                prefetch_max: 16,
            },
            ..Config::default()
        },
    );
    let client = Client::connect(d.socket_path()).unwrap();
    let written = vec![0xa5u8; PAGE];
    for (seed, populate) in [(25, PopulateMethod::Copy), (26, PopulateMethod::Continue)] {
        let (vm, snapshot) = snapshot_vm(&client, &dir, 64, seed, populate);
        let r = &vm.regions()[0];
        // The backend writes page 5 before the guest touches anything around it.
        rustix::io::pwrite(r.memfd(), &written, 5 * PAGE as u64).unwrap();
        // A fault on page 7: its block is 0..16, page 5 included.
        assert_eq!(
            read_page(r, 7),
            snapshot[7 * PAGE..8 * PAGE],
            "{populate:?}"
        );
        assert_eq!(
            read_page(r, 5),
            written,
            "{populate:?}: the backend's page survives"
        );
        for p in (0..16).filter(|&p| p != 5) {
            assert_eq!(
                read_page(r, p),
                snapshot[p * PAGE..(p + 1) * PAGE],
                "page {p}"
            );
        }
        let s = client.stats(vm.vm_id()).unwrap();
        // Every fault installed a run, was a duplicate, or (continue) mapped the backend's
        // page as it is; nothing was counted that the kernel did not install (with copy, the
        // 16-page COPY stops at page 5 after installing 0..5: those five count, then page 7
        // alone, then one more fault for page 6).
        let mapped_as_is = u64::from(populate == PopulateMethod::Continue);
        assert_eq!(
            s.faults,
            s.pages_from_source - s.pages_prefetched + s.coalesced + s.eexist + mapped_as_is,
            "{populate:?}: {s:?}"
        );
        assert!(s.faults <= 4, "{populate:?}: {s:?}");
        assert_eq!(s.populate_errors, 0, "{s:?}");
        client.detach(vm.vm_id()).unwrap();
    }
}
