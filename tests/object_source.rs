//! The object-store page source (daemon/src/source/object) with the daemon on a thread of this
//! process and host threads faulting on the VMM mapping: a restore from a packed snapshot
//! reads every byte right and fetches each stored chunk once; a chunk that does not match its
//! hash is poisoned, never installed; a snapshot replaced under the restore poisons what is
//! missing, never mixes two snapshots; a shared cache serves a second VM without a fetch.

mod common;

use common::moto::Moto;
use common::*;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use vmpager_client::{Client, PageSource, PopulateMethod, RegionSpec, VmMemory, VmSpec};
use vmpager_snapshot::manifest::{hash_hex, MANIFEST_NAME};
use vmpager_snapshot::{Manifest, Snapshots, StoreOptions};
use vmpagerd::source::object::{ChunkCache, ObjectCounters, ObjectOptions, ObjectSource};
use vmpagerd::source::AsyncSource;
use vmpagerd::{AsyncSourceFactory, Config, DaemonHandle};

const PAGE: usize = 4096;
const CHUNK: usize = 256 << 10;
const CHUNKS: usize = 24;
const PAGES: usize = CHUNK * CHUNKS / PAGE;
const PATIENCE: Duration = Duration::from_secs(60);

/// An image where every fourth chunk is zeros and the rest pseudo-random.
fn write_image(path: &Path, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; CHUNK * CHUNKS];
    let mut x = seed | 1;
    for (i, c) in data.chunks_mut(CHUNK).enumerate() {
        if i % 4 == 2 {
            continue;
        }
        for b in c.iter_mut().step_by(3) {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (x >> 56) as u8;
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}

struct Rig {
    daemon: DaemonHandle,
    client: Client,
    sources: mpsc::Receiver<ObjectSource>,
    _dir: TestDir,
}

/// A daemon whose VMs are restored from `url` (through `cache`, if any).
fn rig(
    dir: TestDir,
    snapshots: &Arc<Snapshots>,
    url: &str,
    cache: Option<Arc<ChunkCache>>,
    options: ObjectOptions,
) -> Rig {
    let (tx, sources) = mpsc::channel();
    let (s, url) = (snapshots.clone(), url.to_owned());
    let factory = AsyncSourceFactory::new(move |completions| {
        let src = ObjectSource::open(s.clone(), &url, completions, options.clone(), cache.clone())
            .ok()?;
        tx.send(src.clone()).ok()?;
        Some(Arc::new(src) as Arc<dyn AsyncSource>)
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
        _dir: dir,
    }
}

impl Rig {
    fn vm(&self, populate: PopulateMethod) -> (VmMemory, ObjectSource) {
        let mem = self
            .client
            .create_mapped_vm(VmSpec {
                regions: vec![RegionSpec::new(1 << 32, (PAGES * PAGE) as u64, 0)],
                source: PageSource::Zero,
                populate,
                ..Default::default()
            })
            .unwrap();
        let src = self
            .sources
            .recv_timeout(PATIENCE)
            .expect("the VM's object source");
        (mem, src)
    }
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn stored(m: &Manifest) -> u64 {
    m.chunks.iter().filter(|c| !c.zero).count() as u64
}

fn snapshots() -> Arc<Snapshots> {
    Arc::new(Snapshots::new(StoreOptions::default()).unwrap())
}

/// A test directory with an image of `seed` packed to `memory://NAME/snap`: the directory, the
/// image's bytes, the snapshots' runtime and the URL.
fn packed_in_memory(name: &str, seed: u64) -> (TestDir, Vec<u8>, Arc<Snapshots>, String) {
    let dir = TestDir::new(name);
    let img = dir.join("image");
    let data = write_image(&img, seed);
    let s = snapshots();
    let url = format!("memory://{name}/snap");
    s.pack(&img, &url, CHUNK as u64).unwrap();
    (dir, data, s, url)
}

fn page_of_chunk(i: usize) -> usize {
    i * CHUNK / PAGE + 5
}

/// The EFAULT of a poisoned page (SIGBUS for the guest), never its bytes or zeros.
fn assert_poisoned(r: &vmpager_client::MappedRegion, page: usize, what: &str) {
    let e = probe(r, page).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{what}: {e}");
}

/// Page `p` of the VM is page `p` of `data`.
fn assert_page(r: &vmpager_client::MappedRegion, data: &[u8], p: usize) {
    assert!(
        read_page(r, p) == data[p * PAGE..(p + 1) * PAGE],
        "page {p}"
    );
}

#[test]
fn a_restore_reads_every_byte_and_fetches_each_chunk_once() {
    if !have_uffd() {
        return;
    }
    let (dir, data, s, url) = packed_in_memory("object-restore", 1);
    let url = url.as_str();
    let rig = rig(dir, &s, url, None, ObjectOptions::default());
    let _ = &rig.daemon;
    for populate in [PopulateMethod::Copy, PopulateMethod::Continue] {
        let (mem, src) = rig.vm(populate);
        let r = &mem.regions()[0];
        // A scattered order: faults land in the middle of chunks, and on zero chunks.
        for k in 0..PAGES {
            let p = k * 389 % PAGES;
            assert!(
                read_page(r, p) == data[p * PAGE..(p + 1) * PAGE],
                "{populate:?}: page {p}"
            );
        }
        let c: Arc<ObjectCounters> = src.counters();
        let m = src.reader().manifest();
        assert_eq!(
            load(&c.chunks_fetched),
            stored(m),
            "{populate:?}: each stored chunk once"
        );
        assert_eq!(load(&c.bytes_fetched), m.stored_bytes());
        assert_eq!(load(&c.failed), 0);
        rig.client.detach(mem.vm_id()).unwrap();
    }
}

#[test]
fn a_corrupt_chunk_is_poisoned_never_installed() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("object-corrupt");
    let img = dir.join("image");
    let data = write_image(&img, 2);
    let store = dir.join("store");
    let url = format!("file://{}", store.display());
    let s = snapshots();
    s.pack(&img, &url, CHUNK as u64).unwrap();
    // The manifest names other bytes for chunk 5 (the data object is untouched).
    let path = store.join(MANIFEST_NAME);
    let mut m = Manifest::decode(&std::fs::read(&path).unwrap()).unwrap();
    m.chunks[5].hash = hash_hex(b"other bytes");
    std::fs::write(&path, m.encode()).unwrap();
    let rig = rig(
        dir,
        &s,
        &url,
        None,
        ObjectOptions {
            prefetch: 0,
            ..ObjectOptions::default()
        },
    );
    let (mem, src) = rig.vm(PopulateMethod::Copy);
    let r = &mem.regions()[0];
    assert_poisoned(r, page_of_chunk(5), "corrupt");
    let c = src.counters();
    assert!(load(&c.corrupt) >= 1);
    assert!(load(&c.failed) >= 1);
    // The other chunks are served.
    let p = page_of_chunk(6);
    assert_page(r, &data, p);
}

#[test]
fn a_snapshot_replaced_during_a_restore_poisons_what_is_missing() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("object-changed");
    let (a, b) = (dir.join("a"), dir.join("b"));
    let da = write_image(&a, 3);
    write_image(&b, 4);
    let url = format!("file://{}", dir.join("store").display());
    let s = snapshots();
    s.pack(&a, &url, CHUNK as u64).unwrap();
    let rig = rig(
        dir,
        &s,
        &url,
        None,
        ObjectOptions {
            prefetch: 0,
            ..ObjectOptions::default()
        },
    );
    let (mem, src) = rig.vm(PopulateMethod::Copy);
    let r = &mem.regions()[0];
    let p0 = page_of_chunk(0);
    assert_page(r, &da, p0);
    // Another snapshot packed to the same URL mid-restore.
    s.pack(&b, &url, CHUNK as u64).unwrap();
    assert_poisoned(r, page_of_chunk(9), "poisoned");
    assert!(load(&src.counters().changed) >= 1);
    // Lost for good: later faults on missing pages are poisoned too, never the new bytes.
    assert_poisoned(r, page_of_chunk(17), "poisoned");
    // What came before stays.
    assert_page(r, &da, p0);
}

#[test]
fn a_shared_cache_serves_the_next_vm_without_a_fetch() {
    if !have_uffd() {
        return;
    }
    let (dir, data, s, url) = packed_in_memory("object-cache", 5);
    let url = url.as_str();
    let cache_dir = dir.join("cache");
    let cache = Arc::new(ChunkCache::open(&cache_dir, 64 << 20).unwrap());
    let rig = rig(dir, &s, url, Some(cache.clone()), ObjectOptions::default());
    let read_all = |mem: &VmMemory| {
        let r = &mem.regions()[0];
        for p in 0..PAGES {
            assert!(
                read_page(r, p) == data[p * PAGE..(p + 1) * PAGE],
                "page {p}"
            );
        }
    };
    // Cold: every stored chunk fetched, and cached.
    let (cold, src) = rig.vm(PopulateMethod::Copy);
    read_all(&cold);
    let n = stored(src.reader().manifest());
    assert_eq!(load(&src.counters().chunks_fetched), n);
    assert_eq!(load(&src.counters().cache_hits), 0);
    // Warm, while the first VM still runs: nothing fetched, everything from the cache.
    let (warm, src2) = rig.vm(PopulateMethod::Continue);
    read_all(&warm);
    assert_eq!(load(&src2.counters().chunks_fetched), 0);
    assert_eq!(load(&src2.counters().cache_hits), n);
    assert!(cache.used() >= n * CHUNK as u64 / 2);
    rig.client.detach(warm.vm_id()).unwrap();
    drop(warm);
    // A damaged cache file is not used: the chunk is fetched again, the guest sees the truth.
    let snap_dir = std::fs::read_dir(&cache_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    std::fs::write(snap_dir.join("1"), vec![0xee; CHUNK]).unwrap();
    let (third, src3) = rig.vm(PopulateMethod::Copy);
    read_all(&third);
    assert_eq!(
        load(&src3.counters().chunks_fetched),
        1,
        "only the damaged chunk"
    );
    assert_eq!(load(&src3.counters().cache_hits), n - 1);
}

/// Snapshots reaching `moto`'s S3 with test credentials (no `AWS_*` variable needed).
fn s3_snapshots(moto: &Moto) -> Arc<Snapshots> {
    Arc::new(
        Snapshots::new(StoreOptions {
            endpoint: Some(moto.endpoint()),
            allow_http: true,
            region: Some("us-east-1".into()),
            credentials: Some(("testing".into(), "testing".into())),
        })
        .unwrap(),
    )
}

#[test]
fn a_restore_from_s3_reads_every_byte() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("object-s3");
    let img = dir.join("image");
    let data = write_image(&img, 6);
    let moto = Moto::start();
    moto.create_bucket("restore");
    let s = s3_snapshots(&moto);
    let url = "s3://restore/snapshots/one";
    s.pack(&img, url, CHUNK as u64).unwrap();
    let rig = rig(dir, &s, url, None, ObjectOptions::default());
    let (mem, src) = rig.vm(PopulateMethod::Copy);
    let r = &mem.regions()[0];
    for k in 0..PAGES {
        let p = k * 613 % PAGES;
        assert!(
            read_page(r, p) == data[p * PAGE..(p + 1) * PAGE],
            "page {p}"
        );
    }
    let c = src.counters();
    assert_eq!(load(&c.chunks_fetched), stored(src.reader().manifest()));
    assert_eq!(load(&c.failed), 0);
}

#[test]
fn a_store_that_goes_away_is_retried_then_poisoned_never_zeros() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("object-s3-dead");
    let img = dir.join("image");
    let data = write_image(&img, 7);
    let mut moto = Moto::start();
    moto.create_bucket("dead");
    let s = s3_snapshots(&moto);
    let url = "s3://dead/snap";
    s.pack(&img, url, CHUNK as u64).unwrap();
    let options = ObjectOptions {
        prefetch: 0,
        deadline: Duration::from_secs(2),
        ..ObjectOptions::default()
    };
    let rig = rig(dir, &s, url, None, options);
    let (mem, src) = rig.vm(PopulateMethod::Copy);
    let r = &mem.regions()[0];
    let p0 = page_of_chunk(0);
    assert_page(r, &data, p0);
    // The store dies mid-restore: the fault waits while the chunk is retried, then SIGBUS.
    moto.kill();
    assert_poisoned(r, page_of_chunk(9), "poisoned");
    let c = src.counters();
    assert!(load(&c.retries) >= 1, "retried before giving up");
    assert!(load(&c.failed) >= 1);
    // A zero chunk needs no store: still zeros. What came before stays.
    assert_eq!(read_page(r, page_of_chunk(2)), vec![0; PAGE]);
    assert_page(r, &data, p0);
}

#[test]
fn a_replayed_working_set_is_prefetched_from_the_store() {
    if !have_uffd() {
        return;
    }
    let (dir, data, s, url) = packed_in_memory("object-replay", 8);
    let url = url.as_str();
    let rig = rig(
        dir,
        &s,
        url,
        None,
        ObjectOptions {
            prefetch: 0,
            ..ObjectOptions::default()
        },
    );
    let (mem, src) = rig.vm(PopulateMethod::Copy);
    // A recorded working set: pages in chunks 7 and 13, queued before the guest runs.
    let set: Vec<u64> = [7usize, 13]
        .iter()
        .map(|&c| page_of_chunk(c) as u64)
        .collect();
    rig.client.replay_working_set(mem.vm_id(), &set).unwrap();
    let c = src.counters();
    let deadline = std::time::Instant::now() + PATIENCE;
    while load(&c.chunks_fetched) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the working set was never fetched"
        );
        std::thread::yield_now();
    }
    // Installed ahead of the guest: its reads take no fault.
    let before = rig.client.stats(mem.vm_id()).unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    while rig.client.stats(mem.vm_id()).unwrap().pages_from_source < 2 * (CHUNK / PAGE) as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the chunks were never installed"
        );
        std::thread::yield_now();
    }
    let r = &mem.regions()[0];
    for &p in &set {
        let p = p as usize;
        assert!(
            read_page(r, p) == data[p * PAGE..(p + 1) * PAGE],
            "page {p}"
        );
    }
    assert_eq!(
        rig.client.stats(mem.vm_id()).unwrap().faults,
        before.faults,
        "no fault"
    );
    assert_eq!(load(&c.chunks_fetched), 2, "only the working set's chunks");
}

#[test]
fn on_s3_a_corrupt_chunk_and_a_replaced_snapshot_are_poisoned() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("object-s3-bad");
    let (a, b) = (dir.join("a"), dir.join("b"));
    let da = write_image(&a, 9);
    write_image(&b, 10);
    let moto = Moto::start();
    moto.create_bucket("bad");
    let s = s3_snapshots(&moto);
    let url = "s3://bad/snap";
    s.pack(&a, url, CHUNK as u64).unwrap();
    // The manifest in the bucket names other bytes for chunk 5 (the data object is untouched).
    let loc = s.location(url).unwrap();
    let at = loc.object(MANIFEST_NAME);
    let mut m = s.block_on(async {
        let got = loc.store.get(&at).await.unwrap();
        Manifest::decode(&got.bytes().await.unwrap()).unwrap()
    });
    m.chunks[5].hash = hash_hex(b"other bytes");
    s.block_on(loc.store.put(&at, m.encode().into())).unwrap();
    let options = ObjectOptions {
        prefetch: 0,
        ..ObjectOptions::default()
    };
    let rig = rig(dir, &s, url, None, options);
    let (mem, src) = rig.vm(PopulateMethod::Copy);
    let r = &mem.regions()[0];
    assert_poisoned(r, page_of_chunk(5), "corrupt");
    assert!(load(&src.counters().corrupt) >= 1);
    let p0 = page_of_chunk(0);
    assert_page(r, &da, p0);
    // Another snapshot packed to the same URL mid-restore: S3's ETag changes, If-Match fails.
    s.pack(&b, url, CHUNK as u64).unwrap();
    assert_poisoned(r, page_of_chunk(9), "replaced");
    assert!(load(&src.counters().changed) >= 1);
    assert_page(r, &da, p0);
}
