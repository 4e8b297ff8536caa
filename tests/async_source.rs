//! Asynchronous page sources (`docs/async-sources.md`) with the daemon on a thread of this
//! process, a [`DelayedSource`] answering from its own thread, and host threads faulting on the
//! VMM mapping: a parked fault never blocks the worker, faults on a pending page join it, a
//! discard wins over data in flight, a page is never overwritten nor installed twice, and a
//! failed or lost page is poisoned, never zero-filled. Each for `copy` and `continue`.
//! Waits are on channels (the source's request log) or on counters, never on sleeps.

mod common;

use common::*;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmpager_client::demo::PatternGen;
use vmpager_client::{Client, MappedRegion, PageSource, PopulateMethod, RegionSpec, VmSpec};
use vmpagerd::session::Vm;
use vmpagerd::source::delayed::Request;
use vmpagerd::source::{DelayedOptions, DelayedSource};
use vmpagerd::{AsyncSourceFactory, Config, DaemonHandle};

const PAGE: usize = 4096;
const PAGES: usize = 64;
const BOTH: [PopulateMethod; 2] = [PopulateMethod::Copy, PopulateMethod::Continue];
/// Bound on every wait: a bug shows as a failed test, not a hung one.
const PATIENCE: Duration = Duration::from_secs(60);

struct Rig {
    daemon: DaemonHandle,
    client: Client,
    sources: mpsc::Receiver<Arc<DelayedSource>>,
    data: Vec<u8>,
    _dir: TestDir,
}

fn rig(name: &str, options: DelayedOptions) -> Rig {
    let dir = TestDir::new(name);
    let mut data = vec![0u8; PAGES * PAGE];
    PatternGen::new(41).fill(&mut data);
    let (tx, sources) = mpsc::channel();
    let bytes = data.clone();
    let factory = AsyncSourceFactory::new(move |completions| {
        let s = DelayedSource::new(bytes.clone(), completions, options).ok()?;
        tx.send(s.clone()).ok()?;
        Some(s)
    });
    let daemon = vmpagerd::spawn(
        Config {
            workers: 1,
            async_source: Some(factory),
            ..Config::default()
        },
        &dir.join("d.sock"),
    )
    .unwrap();
    let client = Client::connect(daemon.socket_path()).unwrap();
    Rig {
        daemon,
        client,
        sources,
        data,
        _dir: dir,
    }
}

impl Rig {
    /// A VM over the source's data, mapped here, with its source and daemon-side state.
    fn vm(
        &self,
        populate: PopulateMethod,
    ) -> (vmpager_client::VmMemory, Arc<DelayedSource>, Arc<Vm>) {
        let mem = self
            .client
            .create_mapped_vm(VmSpec {
                regions: vec![RegionSpec::new(1 << 32, (PAGES * PAGE) as u64, 0)],
                source: PageSource::Zero,
                populate,
                ..Default::default()
            })
            .unwrap();
        let src = self.sources.recv_timeout(PATIENCE).unwrap();
        let vm = self
            .daemon
            .live_vms()
            .vms()
            .into_iter()
            .find(|v| v.id == mem.vm_id())
            .unwrap();
        (mem, src, vm)
    }

    fn page(&self, p: usize) -> &[u8] {
        &self.data[p * PAGE..(p + 1) * PAGE]
    }
}

fn write_page(r: &MappedRegion, page: usize, byte: u8) {
    for i in 0..PAGE {
        // SAFETY: inside the live mapping of `r`; nothing else borrows this memory.
        unsafe {
            r.host_addr()
                .as_ptr()
                .add(page * PAGE + i)
                .write_volatile(byte)
        };
    }
}

fn discard(r: &MappedRegion, page: usize) {
    // SAFETY: the page is inside the mapping; its contents are not borrowed anywhere.
    unsafe {
        rustix::mm::madvise(
            r.host_addr().as_ptr().add(page * PAGE).cast(),
            PAGE,
            rustix::mm::Advice::LinuxRemove,
        )
    }
    .unwrap();
}

/// Waits for the source to receive an urgent request for `page` (the fault is parked).
fn urgent_request(src: &DelayedSource, page: usize) -> Request {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = src
            .requests()
            .recv_timeout(left)
            .expect("an urgent request");
        if r.urgent && r.covers((page * PAGE) as u64) {
            return r;
        }
    }
}

/// Waits until `cond` holds of the VM's counters (each check is a few atomic loads).
fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::yield_now();
    }
}

fn load(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn a_parked_fault_does_not_stop_the_worker_serving_others() {
    if !have_uffd() {
        return;
    }
    let rig = rig("async-park", DelayedOptions::default());
    for populate in BOTH {
        let (mem, src, vm) = rig.vm(populate);
        let r = &mem.regions()[0];
        let (a, b) = (5, 50);
        src.hold((a * PAGE) as u64);
        std::thread::scope(|s| {
            let reader = s.spawn(|| read_page(r, a));
            urgent_request(&src, a);
            // Page A's data is held at the source: page B is served meanwhile.
            assert_eq!(read_page(r, b), rig.page(b), "{populate:?}");
            assert!(!reader.is_finished(), "A's data has not arrived");
            src.release((a * PAGE) as u64);
            assert_eq!(reader.join().unwrap(), rig.page(a), "{populate:?}");
        });
        assert!(load(&vm.metrics.parked_faults) >= 1);
        assert!(load(&vm.metrics.pages_by_request) >= 2);
        assert_eq!(load(&vm.metrics.source_errors), 0);
        rig.client.detach(mem.vm_id()).unwrap();
    }
}

#[test]
fn faults_on_a_pending_page_join_its_request() {
    if !have_uffd() {
        return;
    }
    let rig = rig("async-join", DelayedOptions::default());
    for populate in BOTH {
        let (mem, src, vm) = rig.vm(populate);
        let r = &mem.regions()[0];
        let a = 9;
        src.hold((a * PAGE) as u64);
        std::thread::scope(|s| {
            let readers: Vec<_> = (0..3).map(|_| s.spawn(|| read_page(r, a))).collect();
            urgent_request(&src, a);
            until("the other two faults joined", || {
                load(&vm.metrics.joined_faults) == 2
            });
            src.release((a * PAGE) as u64);
            for t in readers {
                assert_eq!(t.join().unwrap(), rig.page(a), "{populate:?}");
            }
        });
        src.flush();
        let urgent: Vec<Request> = src
            .requests()
            .try_iter()
            .filter(|q| q.urgent && q.covers((a * PAGE) as u64))
            .collect();
        assert!(urgent.is_empty(), "one fetch for the page: {urgent:?}");
        assert_eq!(load(&vm.metrics.parked_faults), 1);
        rig.client.detach(mem.vm_id()).unwrap();
    }
}

#[test]
fn a_discard_wins_over_data_in_flight() {
    if !have_uffd() {
        return;
    }
    let rig = rig("async-discard", DelayedOptions::default());
    for populate in BOTH {
        let (mem, src, vm) = rig.vm(populate);
        let r = &mem.regions()[0];
        let a = 20;
        src.hold((a * PAGE) as u64);
        std::thread::scope(|s| {
            let reader = s.spawn(|| read_page(r, a));
            urgent_request(&src, a);
            // madvise returns once the daemon read the REMOVE: the parked fault is woken,
            // faults again on a removed page, and reads zeros.
            discard(r, a);
            assert_eq!(reader.join().unwrap(), vec![0; PAGE], "{populate:?}");
        });
        // The held data arrives late: dropped, never installed over the removed page.
        src.release((a * PAGE) as u64);
        src.flush();
        // (Counted as what the page is when the data arrives: removed, or installed since —
        // the woken fault installed zeros.)
        let dropped =
            || load(&vm.metrics.arrivals_discarded) + load(&vm.metrics.arrivals_duplicate);
        until("the late page was dropped", || dropped() == 1);
        assert_eq!(read_page(r, a), vec![0; PAGE], "{populate:?}");
        // A page removed before its (pushed) data arrives: the same.
        let c = 60;
        discard(r, c);
        src.push((c * PAGE) as u64, PAGE as u64);
        src.flush();
        until("the pushed page was dropped", || dropped() == 2);
        assert!(load(&vm.metrics.arrivals_discarded) >= 1);
        assert_eq!(read_page(r, c), vec![0; PAGE], "{populate:?}");
        assert_eq!(load(&vm.metrics.pages_by_push), 0);
        rig.client.detach(mem.vm_id()).unwrap();
    }
}

#[test]
fn a_page_already_there_is_never_overwritten() {
    if !have_uffd() {
        return;
    }
    let rig = rig("async-present", DelayedOptions::default());
    for populate in BOTH {
        let (mem, src, vm) = rig.vm(populate);
        let r = &mem.regions()[0];
        let theirs = vec![0xabu8; PAGE];
        let a = 30;
        src.hold((a * PAGE) as u64);
        std::thread::scope(|s| {
            let reader = s.spawn(|| read_page(r, a));
            urgent_request(&src, a);
            // The page appears in the memfd by another path while its data is in flight.
            rustix::io::pwrite(r.memfd(), &theirs, (a * PAGE) as u64).unwrap();
            src.release((a * PAGE) as u64);
            assert_eq!(reader.join().unwrap(), theirs, "{populate:?}: EEXIST wakes");
        });
        // Nobody waits, the page is there: a push leaves it alone.
        let d = 62;
        rustix::io::pwrite(r.memfd(), &theirs, (d * PAGE) as u64).unwrap();
        src.push((d * PAGE) as u64, PAGE as u64);
        src.flush();
        until("both found the page there", || {
            load(&vm.metrics.eexist) == 2
        });
        assert_eq!(read_page(r, d), theirs, "{populate:?}");
        rig.client.detach(mem.vm_id()).unwrap();
    }
}

#[test]
fn a_page_arriving_twice_is_installed_once() {
    if !have_uffd() {
        return;
    }
    let rig = rig(
        "async-twice",
        DelayedOptions {
            duplicates: true,
            ..DelayedOptions::default()
        },
    );
    for populate in BOTH {
        let (mem, src, vm) = rig.vm(populate);
        let r = &mem.regions()[0];
        for p in 0..PAGES {
            assert_eq!(read_page(r, p), rig.page(p), "{populate:?} page {p}");
        }
        // Every copy sent so far (readahead answers too) is handled: counts are final.
        assert!(src.settle(PATIENCE), "the worker never took the copies");
        assert_eq!(load(&vm.metrics.pages_from_source), PAGES as u64);
        assert!(load(&vm.metrics.arrivals_duplicate) >= PAGES as u64);
        // The guest writes a page; a late copy of it must not undo the write.
        write_page(r, 3, 0x5a);
        let before = load(&vm.metrics.arrivals_duplicate);
        src.push((3 * PAGE) as u64, PAGE as u64);
        assert!(
            src.settle(PATIENCE),
            "the worker never took the late copies"
        );
        assert_eq!(load(&vm.metrics.arrivals_duplicate), before + 2);
        assert_eq!(read_page(r, 3), vec![0x5a; PAGE], "{populate:?}");
        assert_eq!(load(&vm.metrics.pages_from_source), PAGES as u64);
        rig.client.detach(mem.vm_id()).unwrap();
    }
}

#[test]
fn a_failed_page_is_poisoned_never_zeros() {
    if !have_uffd() {
        return;
    }
    let rig = rig("async-fail", DelayedOptions::default());
    for populate in BOTH {
        let (mem, src, vm) = rig.vm(populate);
        let r = &mem.regions()[0];
        let a = 12;
        src.fail((a * PAGE) as u64);
        let e = probe(r, a).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{populate:?}: {e}");
        assert_eq!(load(&vm.metrics.source_errors), 1);
        // Failed with nobody waiting: nothing installed, and a later fault asks again.
        let c = 40;
        src.fail((c * PAGE) as u64);
        src.push((c * PAGE) as u64, PAGE as u64);
        src.heal((c * PAGE) as u64);
        // The worker must have dropped the failed push before the next fault, or that fault
        // would take the failure as its answer.
        assert!(
            src.settle(PATIENCE),
            "the worker never took the failed push"
        );
        assert!(load(&vm.metrics.arrivals_failed) >= 1);
        assert_eq!(read_page(r, c), rig.page(c), "{populate:?}");
        assert_eq!(load(&vm.metrics.source_errors), 1);
        rig.client.detach(mem.vm_id()).unwrap();
    }
}

#[test]
fn a_lost_source_poisons_waiting_and_later_faults() {
    if !have_uffd() {
        return;
    }
    let rig = rig("async-lost", DelayedOptions::default());
    for populate in BOTH {
        let (mem, src, vm) = rig.vm(populate);
        let r = &mem.regions()[0];
        let (a, b, c) = (7, 33, 55);
        assert_eq!(read_page(r, c), rig.page(c));
        src.hold((a * PAGE) as u64);
        std::thread::scope(|s| {
            let waiting = s.spawn(|| probe(r, a));
            urgent_request(&src, a);
            src.lose();
            let e = waiting.join().unwrap().unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{populate:?}: {e}");
        });
        let e = probe(r, b).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{populate:?}: {e}");
        assert_eq!(load(&vm.metrics.source_errors), 2);
        // What was installed stays.
        assert_eq!(read_page(r, c), rig.page(c));
        rig.client.detach(mem.vm_id()).unwrap();
    }
}

#[test]
fn pushed_pages_go_in_without_a_request() {
    if !have_uffd() {
        return;
    }
    let rig = rig("async-push", DelayedOptions::default());
    for populate in BOTH {
        let (mem, src, vm) = rig.vm(populate);
        let r = &mem.regions()[0];
        src.push(0, (8 * PAGE) as u64);
        src.flush();
        until("the pushed pages are in", || {
            load(&vm.metrics.pages_by_push) == 8
        });
        for p in 0..8 {
            assert_eq!(read_page(r, p), rig.page(p), "{populate:?} page {p}");
        }
        if populate == PopulateMethod::Copy {
            // In the memfd already: the VMM's touch maps them without a uffd fault.
            assert_eq!(load(&vm.metrics.faults), 0);
        }
        assert_eq!(load(&vm.metrics.pages_fetched), 0);
        rig.client.detach(mem.vm_id()).unwrap();
    }
}
