//! VMs whose guest RAM is the VMM's own private anonymous memory (`VM_MEMORY_IN_VMM`, how
//! Firecracker maps it), served by a daemon on a thread of this process to host threads faulting
//! on the mapping: every byte arrives with `UFFDIO_COPY`, removed ranges read as zeros, 2 MiB
//! huge pages are installed whole; and working sets: recorded in order of first touch, and
//! replayed into memory before the guest touches it, so those touches take no fault.
//! (The Firecracker protocol on top of this: `tests/firecracker.rs`.)

mod common;

use common::*;
use std::ptr::NonNull;
use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};
use vmpager_client::demo::PatternGen;
use vmpager_client::{Client, PageSource, PopulateMethod, RegionSpec, Stats, VmSpec};
use vmpagerd::{Config, DaemonHandle};

const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;

fn daemon(dir: &TestDir) -> DaemonHandle {
    vmpagerd::spawn(
        Config {
            workers: 2,
            ..Config::default()
        },
        &dir.join("d.sock"),
    )
    .unwrap()
}

/// Private anonymous memory registered on a uffd made as Firecracker makes it (EVENT_REMOVE
/// only, MISSING mode), unmapped on drop.
struct AnonVm {
    regions: Vec<(NonNull<u8>, usize)>,
    uffd: Uffd,
}

impl AnonVm {
    fn new(sizes: &[usize], huge: bool) -> AnonVm {
        let uffd = UffdBuilder::new()
            .require_features(FeatureFlags::EVENT_REMOVE)
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .unwrap();
        let mut flags = rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::NORESERVE;
        if huge {
            flags |= rustix::mm::MapFlags::HUGETLB | rustix::mm::MapFlags::HUGE_2MB;
        }
        let regions = sizes
            .iter()
            .map(|&len| {
                // SAFETY: a new anonymous mapping at a kernel-chosen address aliases nothing.
                let p = unsafe {
                    rustix::mm::mmap_anonymous(
                        std::ptr::null_mut(),
                        len,
                        rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                        flags,
                    )
                }
                .unwrap();
                uffd.register(p, len).unwrap();
                (NonNull::new(p.cast()).unwrap(), len)
            })
            .collect();
        AnonVm { regions, uffd }
    }

    fn host_addrs(&self) -> Vec<u64> {
        self.regions.iter().map(|r| r.0.as_ptr() as u64).collect()
    }

    /// Reads `len` bytes at `offset` of region `r` (faulting pages in).
    fn read(&self, r: usize, offset: usize, len: usize) -> Vec<u8> {
        let (base, size) = self.regions[r];
        assert!(offset + len <= size);
        (0..len)
            // SAFETY: inside the live mapping; volatile reads of memory the daemon fills
            // through the kernel (each first touch blocks in the fault until then).
            .map(|i| unsafe { base.as_ptr().add(offset + i).read_volatile() })
            .collect()
    }

    fn remove(&self, r: usize, offset: usize, len: usize) {
        // SAFETY: a range of our own mapping; its contents are discarded, which is the point.
        unsafe {
            rustix::mm::madvise(
                self.regions[r].0.as_ptr().add(offset).cast(),
                len,
                rustix::mm::Advice::LinuxDontNeed,
            )
        }
        .unwrap();
    }
}

impl Drop for AnonVm {
    fn drop(&mut self) {
        for &(p, len) in &self.regions {
            let _ = self.uffd.unregister(p.as_ptr().cast(), len);
            // SAFETY: our mapping, unmapped once.
            let _ = unsafe { rustix::mm::munmap(p.as_ptr().cast(), len) };
        }
    }
}

fn image_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    PatternGen::new(seed).fill(&mut v);
    v
}

/// Creates a VMM-memory VM over `anon` (4 KiB pages), the image `img`, region i at source
/// offset `offs[i]`.
fn attach(client: &Client, anon: &AnonVm, img: std::fs::File, offs: &[usize], record: bool) -> u64 {
    let regions = anon
        .regions
        .iter()
        .zip(offs)
        .map(|(&(_, len), &off)| RegionSpec::new(off as u64, len as u64, off as u64))
        .collect();
    let created = client
        .create_vm(VmSpec {
            regions,
            source: PageSource::File(img),
            populate: PopulateMethod::Copy,
            memory_in_vmm: true,
            record_working_set: record,
            ..Default::default()
        })
        .unwrap();
    assert!(created.memfds.is_empty(), "the daemon made no memory");
    client
        .attach_uffd(created.vm_id, anon.uffd.as_fd(), &anon.host_addrs())
        .unwrap();
    created.vm_id
}

use std::os::fd::AsFd;

#[test]
fn the_vmms_own_memory_gets_every_byte_and_removed_pages_read_as_zeros() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("vmm-mem");
    let d = daemon(&dir);
    let client = Client::connect(d.socket_path()).unwrap();
    let sizes = [64 * PAGE, 16 * PAGE, 200 * PAGE];
    let total: usize = sizes.iter().sum();
    let img = image(&dir, "img", total as u64, 5);
    let bytes = image_bytes(total, 5);
    let anon = AnonVm::new(&sizes, false);
    let offs = [0, 64 * PAGE, 80 * PAGE];
    let vm = attach(&client, &anon, img, &offs, false);
    for (r, (&len, &off)) in sizes.iter().zip(&offs).enumerate() {
        assert!(anon.read(r, 0, len) == bytes[off..off + len], "region {r}");
    }
    let before: Stats = client.stats(vm).unwrap();
    assert_eq!(before.pages_from_source as usize, total / PAGE);
    // A balloon: the range is discarded; touched again, it is zeros, never the snapshot.
    anon.remove(2, 10 * PAGE, 5 * PAGE);
    assert!(anon.read(2, 10 * PAGE, 5 * PAGE).iter().all(|&b| b == 0));
    assert_eq!(anon.read(2, 15 * PAGE, PAGE), bytes[95 * PAGE..96 * PAGE]);
    let s = client.stats(vm).unwrap();
    assert_eq!(s.remove_events, 1);
    assert_eq!(s.pages_zero, 5);
    assert_eq!(s.populate_errors + s.stray_faults + s.source_errors, 0);
    client.detach(vm).unwrap();
}

/// A page the page-state table says is populated, but that is not in the VMM's memory, was
/// removed by a REMOVE event nobody recorded (a daemon killed between reading the event and
/// marking the page, docs/survival.md): it reads as zeros, never as snapshot content, and
/// the thread that faults on it never spins. A page that is there is never overwritten.
#[test]
fn a_populated_page_that_faults_again_is_a_removed_page_and_reads_as_zeros() {
    use vmpager_protocol::page_state::Page;
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("vmm-lost-remove");
    let d = daemon(&dir);
    let client = Client::connect(d.socket_path()).unwrap();
    let sizes = [32 * PAGE];
    let img = image(&dir, "img", (32 * PAGE) as u64, 8);
    let bytes = image_bytes(32 * PAGE, 8);
    let anon = AnonVm::new(&sizes, false);
    let vm = attach(&client, &anon, img, &[0], false);
    assert_eq!(anon.read(0, 0, PAGE), bytes[..PAGE]);
    // The page is marked once the ioctl that woke the reader returned: wait for the worker to
    // finish what it read (GetStats syncs with it).
    client.stats(vm).unwrap();
    // Page 20: marked populated as if installed and then removed without a record.
    let state = client.page_state(vm).unwrap();
    let table = state.table(0).unwrap();
    assert_eq!(table.get(0), Page::Populated);
    table.update(20, 21, |_| Page::Populated);
    assert!(anon.read(0, 20 * PAGE, PAGE).iter().all(|&b| b == 0));
    // Page 0 is there: a duplicate fault cannot happen from a read, and the daemon's zero page
    // answers EEXIST over a present page; its bytes stay.
    assert_eq!(anon.read(0, 0, PAGE), bytes[..PAGE]);
    let s = client.stats(vm).unwrap();
    assert_eq!(s.pages_zero, 1);
    assert_eq!(s.populate_errors, 0);
    client.detach(vm).unwrap();
}

#[test]
fn huge_pages_of_the_vmms_memory_are_installed_whole() {
    if !have_uffd() || !have_hugepages(4) {
        return;
    }
    let dir = TestDir::new("vmm-huge");
    let d = daemon(&dir);
    let client = Client::connect(d.socket_path()).unwrap();
    let len = 2 * HUGE;
    let img = image(&dir, "img", (len + HUGE) as u64, 8);
    let bytes = image_bytes(len + HUGE, 8);
    let anon = AnonVm::new(&[len], true);
    let created = client
        .create_vm(VmSpec {
            regions: vec![RegionSpec::new(0, len as u64, HUGE as u64).huge_2m()],
            source: PageSource::File(img),
            memory_in_vmm: true,
            ..Default::default()
        })
        .unwrap();
    client
        .attach_uffd(created.vm_id, anon.uffd.as_fd(), &anon.host_addrs())
        .unwrap();
    assert!(anon.read(0, 0, len) == bytes[HUGE..HUGE + len]);
    let s = client.stats(created.vm_id).unwrap();
    assert_eq!(s.faults, 2, "one fault per 2 MiB page");
    assert_eq!(s.source_bytes_read, len as u64);
    // Huge pages have no zero page: a removed one comes back as copied zeros.
    anon.remove(0, HUGE, HUGE);
    assert!(anon.read(0, HUGE, HUGE).iter().all(|&b| b == 0));
    assert_eq!(client.stats(created.vm_id).unwrap().pages_zero, 1);
}

/// A scattered order over `pages` pages touching `n` of them, with repeats.
fn scattered(pages: usize, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).map(|k| (k * 7919 + 13) % pages).collect();
    order.extend_from_slice(&order.clone()[..n / 4]);
    order
}

#[test]
fn a_recorded_working_set_lists_each_first_touch_once_in_order() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("ws-record");
    let d = daemon(&dir);
    let client = Client::connect(d.socket_path()).unwrap();
    let pages = 512;
    let img = image(&dir, "img", (pages * PAGE) as u64, 3);
    let anon = AnonVm::new(&[pages * PAGE], false);
    let created = client
        .create_vm(VmSpec {
            regions: vec![RegionSpec::new(0, (pages * PAGE) as u64, 0)],
            source: PageSource::File(img),
            memory_in_vmm: true,
            record_working_set: true,
            ..Default::default()
        })
        .unwrap();
    client
        .attach_uffd(created.vm_id, anon.uffd.as_fd(), &anon.host_addrs())
        .unwrap();
    let order = scattered(pages, 100);
    for &p in &order {
        anon.read(0, p * PAGE, 8);
    }
    let ws = client.working_set(created.vm_id).unwrap();
    let got: Vec<usize> = ws.iter().map(|e| e.page.get() as usize).collect();
    assert_eq!(got, order[..100].to_vec());
    assert!(ws.windows(2).all(|w| w[0].t_ns.get() <= w[1].t_ns.get()));
    let s = client.stats(created.vm_id).unwrap();
    assert_eq!(s.pages_prefetched, 0, "no readahead while recording");
    assert_eq!(s.faults, 100);
}

/// Asks for stats until `pages_replayed` reaches `n` (each request waits for the worker).
fn wait_replayed(client: &Client, vm: u64, n: u64) -> Stats {
    for _ in 0..100_000 {
        let s = client.stats(vm).unwrap();
        if s.pages_replayed >= n {
            return s;
        }
        std::thread::yield_now();
    }
    panic!("the working set was not replayed");
}

#[test]
fn a_replayed_working_set_is_in_memory_before_the_guest_touches_it() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("ws-replay");
    let d = daemon(&dir);
    let client = Client::connect(d.socket_path()).unwrap();
    let pages = 1024;
    let bytes = image_bytes(pages * PAGE, 4);
    let set: Vec<usize> = scattered(pages, 300)[..300].to_vec();
    let source_pages: Vec<u64> = set.iter().map(|&p| p as u64).collect();

    // The daemon's memory (memfds): replayed pages are written into the memfd, so the guest's
    // touches are ordinary page-cache faults with no uffd event at all.
    let vm = client
        .create_mapped_vm(VmSpec {
            regions: vec![RegionSpec::new(1 << 32, (pages * PAGE) as u64, 0)],
            source: PageSource::File(image(&dir, "img", (pages * PAGE) as u64, 4)),
            populate: PopulateMethod::Copy,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        client
            .replay_working_set(vm.vm_id(), &source_pages)
            .unwrap(),
        300
    );
    wait_replayed(&client, vm.vm_id(), 300);
    let r = &vm.regions()[0];
    for &p in &set {
        let mut page = vec![0u8; PAGE];
        for (i, b) in page.iter_mut().enumerate() {
            // SAFETY: inside the live mapping of `r`.
            *b = unsafe { r.host_addr().as_ptr().add(p * PAGE + i).read_volatile() };
        }
        assert!(page == bytes[p * PAGE..(p + 1) * PAGE], "page {p}");
    }
    let s = client.stats(vm.vm_id()).unwrap();
    assert_eq!((s.faults, s.pages_replayed), (0, 300));

    // The VMM's own memory: pushed with UFFDIO_COPY, likewise no fault.
    let anon = AnonVm::new(&[pages * PAGE], false);
    let vm2 = attach(
        &client,
        &anon,
        image(&dir, "img2", (pages * PAGE) as u64, 4),
        &[0],
        false,
    );
    client.replay_working_set(vm2, &source_pages).unwrap();
    wait_replayed(&client, vm2, 300);
    for &p in &set {
        assert!(anon.read(0, p * PAGE, PAGE) == bytes[p * PAGE..(p + 1) * PAGE]);
    }
    let s = client.stats(vm2).unwrap();
    assert_eq!((s.faults, s.pages_replayed), (0, 300));
    // A page outside the set still faults, and is served.
    let other = (0..pages).find(|p| !set.contains(p)).unwrap();
    assert!(anon.read(0, other * PAGE, PAGE) == bytes[other * PAGE..(other + 1) * PAGE]);
    assert_eq!(client.stats(vm2).unwrap().faults, 1);
}
