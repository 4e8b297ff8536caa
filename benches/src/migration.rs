//! Post-copy migration (docs/migration.md), measured side by side in one run on one loopback:
//!
//! 1. a remote 4 KiB fault (a destination VM pulling from a source daemon, pull only, readahead
//!    off) against a fault served from a local file by the same daemon code, and a raw TCP
//!    round trip carrying 4 KiB: the remote fault should cost about a local fault plus one
//!    round trip;
//! 2. faults while the bulk push saturates a link shared by both channels (a [`FaultyLink`]
//!    with a shared rate), with the urgent channel separate (the default) and with a
//!    one-channel destination (requests and answers on the bulk channel, behind the push),
//!    against the same faults through the same link with the push off;
//! 3. the time a migration takes (`migrate_in` to `Complete`) at 0, 1 and 5 ms of injected
//!    round-trip time, with a host thread touching a scattered 10 % of the pages meanwhile, and
//!    how many pages its faults pulled (the rest were pushed).
//!
//! Both daemons run on threads of this process (`vmpagerd::spawn`), host threads play the
//! guest, nothing is pinned. Downtime with real vCPUs is `vmpager migrate`'s, not measured here.

use crate::report::Target;
use crate::row::{histogram, record, Latency, RatioOf, Row};
use crate::touch::{Target as Pages, PAGE};
use crate::BenchError;
use hdrhistogram::Histogram;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use vmpager_client::{Client, PageSource, PopulateMethod, RegionSpec, VmMemory, VmSpec};
use vmpager_migration::FaultyLink;
use vmpager_protocol::message::{MigrationKey, MigrationState, MigrationStatus};
use vmpagerd::readahead::Readahead;
use vmpagerd::{Config, DaemonHandle};

/// The rows' group.
const GROUP: &str = "migration";
/// The link rate of the push-contention rows, bytes per second, shared by a migration's
/// connections.
const PUSH_RATE: u64 = 200_000_000;
/// Every `PUSH_STRIDE`th page is faulted while the push runs.
const PUSH_STRIDE: usize = 32;
/// Injected round-trip times of the migration-time rows, milliseconds.
const RTTS_MS: [u64; 3] = [0, 1, 5];
const KEY: MigrationKey = MigrationKey([0x6d; 32]);
/// Bound on every wait for a migration to complete.
const PATIENCE: Duration = Duration::from_secs(300);

/// How much of each path to measure.
#[derive(Debug, Clone)]
struct Sizes {
    /// Pages faulted for the latency rows (each once).
    latency_pages: usize,
    /// Raw TCP round trips.
    round_trips: usize,
    /// Guest size of the push-contention rows, in pages.
    push_pages: usize,
    /// Guest sizes of the migration-time rows, bytes.
    guests: Vec<u64>,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                latency_pages: 2048,
                round_trips: 5000,
                push_pages: 32768,
                guests: vec![256 << 20],
            }
        } else {
            Sizes {
                latency_pages: 8192,
                round_trips: 20_000,
                push_pages: 65536,
                guests: vec![1 << 30, 4 << 30],
            }
        }
    }
}

/// The rows of the section, and its target.
#[derive(Debug, Default)]
pub struct Measured {
    /// Rows, in the order measured.
    pub rows: Vec<Row>,
    /// Judged from the rows.
    pub targets: Vec<Target>,
}

/// Runs the section: `dir` holds the daemons' sockets and the snapshot image.
pub fn run(quick: bool, dir: &Path, log: &mut dyn FnMut(&str)) -> Result<Measured, BenchError> {
    let sizes = Sizes::new(quick);
    let image_bytes = sizes
        .guests
        .iter()
        .copied()
        .chain([(sizes.push_pages * PAGE) as u64])
        .max()
        .unwrap_or(0)
        .max((sizes.latency_pages * PAGE) as u64);
    log(&format!(
        "migration: writing a {} MiB snapshot",
        image_bytes >> 20
    ));
    let image_path = dir.join("migration.img");
    vmpager_client::demo::write_image(&image_path, image_bytes, 23)?;
    let image = File::open(&image_path).map_err(|e| BenchError::io("open image", e))?;
    let mut out = Measured::default();
    log("migration: remote 4 KiB fault vs local file source vs raw TCP round trip");
    latency_rows(&sizes, dir, &image, &mut out)?;
    log(&format!(
        "migration: faults while the push runs, {} MB/s shared link, two channels vs one",
        PUSH_RATE / 1_000_000
    ));
    push_rows(&sizes, dir, &image, &mut out)?;
    for &bytes in &sizes.guests {
        let mut base: Option<Vec<Row>> = None;
        for rtt in RTTS_MS {
            log(&format!(
                "migration: {} MiB guest, {rtt} ms RTT",
                bytes >> 20
            ));
            let mut two = time_rows(dir, &image, bytes, rtt)?;
            match &base {
                None => base = Some(two.clone()),
                Some(b) => {
                    two[0] = two[0].clone().compare(&b[0], RatioOf::Rate);
                }
            }
            out.rows.extend(two);
        }
    }
    drop(image);
    let _ = std::fs::remove_file(&image_path);
    Ok(out)
}

/// Section 1: raw TCP, local file source, remote source (pull only), all with readahead off.
fn latency_rows(
    sizes: &Sizes,
    dir: &Path,
    image: &File,
    out: &mut Measured,
) -> Result<(), BenchError> {
    let pages = sizes.latency_pages;
    let tcp = tcp_rtt(sizes.round_trips).map_err(|e| BenchError::io("TCP round trips", e))?;
    let tcp_row = Row::new(
        GROUP,
        "raw TCP 4 KiB round trip (8 B request, 4 KiB reply, TCP_NODELAY)",
        Some(&tcp),
        1e9 / tcp.mean().max(1.0),
        "round trips/s",
    );
    // Local: the same daemon code serving the snapshot file.
    let d = daemon(dir, false)?;
    let client = connect(&d)?;
    let vm = client.create_mapped_vm(spec(pages, source_file(image)?))?;
    let order = scattered(pages, pages);
    // SAFETY: the VM stays mapped (and served) until it is dropped below.
    let (local, _, elapsed) = unsafe { touch_pages(pages_of(&vm), &order, None, false) };
    drop(vm);
    drop(client);
    shutdown(d)?;
    let local_row = Row::new(
        GROUP,
        "local file source, readahead off: host-thread fault",
        Some(&local),
        pages as f64 / elapsed.as_secs_f64().max(1e-9),
        "faults/s",
    );
    // Remote, pull only: every touch is one urgent request on the loopback.
    let pair = Pair::start(dir, image, pages, Mode::PullOnly, Readahead::OFF, None)?;
    // SAFETY: the VM stays mapped until `finish`.
    let (remote, _, elapsed) = unsafe { touch_pages(pages_of(&pair.dst_mem), &order, None, false) };
    let status = pair.wait_complete()?;
    pair.finish()?;
    let remote_row = Row::new(
        GROUP,
        "remote source, pull only, readahead off: host-thread fault",
        Some(&remote),
        pages as f64 / elapsed.as_secs_f64().max(1e-9),
        "faults/s",
    )
    .compare(&local_row, RatioOf::P50);
    let own = daemon_latency_row(
        "remote source, pull only: the daemon's request to arrival (fault_p50/p99_ns)",
        &status,
    );
    let (r, l, t) = (remote_row.p50(), local_row.p50(), tcp_row.p50());
    let ratio = match (r, l, t) {
        (Some(r), Some(l), Some(t)) => Some(r / (1.5 * l + t)),
        _ => None,
    };
    out.targets.push(Target {
        name: "remote 4 KiB fault p50 / (1.5 x local file fault p50 + TCP 4 KiB round trip p50)"
            .into(),
        ratio,
        bound: 1.0,
        at_most: true,
        met: ratio.map(|r| r <= 1.0),
    });
    out.rows.extend([tcp_row, local_row, remote_row, own]);
    Ok(())
}

/// Section 2: pages faulted ahead of the push (descending, every [`PUSH_STRIDE`]th page: each
/// fault's hint moves the push there and it goes on upward, behind the faults), through a link
/// of [`PUSH_RATE`] that the migration's connections share: with the push off, with it on and
/// the urgent channel separate, and with it on and one channel (the faults' answers queue
/// behind the pushed pages already in the socket and the link's queue). Ratios: two channels
/// to push off, one channel to two channels.
fn push_rows(
    sizes: &Sizes,
    dir: &Path,
    image: &File,
    out: &mut Measured,
) -> Result<(), BenchError> {
    let pages = sizes.push_pages;
    let order: Vec<usize> = (0..pages / PUSH_STRIDE)
        .map(|k| pages - 1 - k * PUSH_STRIDE)
        .collect();
    // Each configuration's two rows: host-thread fault, the daemon's request to arrival.
    let mut measured: Vec<(Row, Row)> = Vec::new();
    for mode in [Mode::PullOnly, Mode::Push, Mode::PushOneChannel] {
        let push = mode != Mode::PullOnly;
        let link = Some((Duration::ZERO, PUSH_RATE));
        let pair = Pair::start(dir, image, pages, mode, Readahead::OFF, link)?;
        let stop = AtomicBool::new(false);
        let target = pages_of(&pair.dst_mem);
        let (h, touched, elapsed, status) = std::thread::scope(|s| {
            // SAFETY: the VM stays mapped until `finish`, after the scope joined the thread.
            // Pages the push brought before their touch are skipped: only faults are timed.
            let t = s.spawn(|| unsafe { touch_pages(target, &order, Some(&stop), true) });
            // With the push on, touches after it completed are no faults: stop them.
            while push && !t.is_finished() {
                if pair.status()?.state == MigrationState::Complete {
                    stop.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            let (h, touched, elapsed) = t.join().expect("touch thread");
            Ok::<_, BenchError>((h, touched, elapsed, pair.status()?))
        })?;
        pair.finish()?;
        let name = match mode {
            Mode::PullOnly => "push off (pull only)",
            Mode::Push => "push on, two channels (urgent separate)",
            Mode::PushOneChannel => "push on, one channel (requests behind the push)",
        };
        let name = format!("{} MB/s shared link, {name}", PUSH_RATE / 1_000_000);
        let mut fault = Row::new(
            GROUP,
            &format!("{name}: host-thread fault"),
            Some(&h),
            touched as f64 / elapsed.as_secs_f64().max(1e-9),
            "faults/s",
        );
        let mut own =
            daemon_latency_row(&format!("{name}: the daemon's request to arrival"), &status);
        // Two channels against push off, one channel against two channels.
        let base = match mode {
            Mode::PullOnly => None,
            Mode::Push => measured.first(),
            Mode::PushOneChannel => measured.get(1),
        };
        if let Some((base_fault, base_own)) = base {
            fault = fault.compare(base_fault, RatioOf::P50);
            own = own.compare(base_own, RatioOf::P50);
        }
        measured.push((fault, own));
    }
    out.rows
        .extend(measured.into_iter().flat_map(|(fault, own)| [fault, own]));
    Ok(())
}

/// Section 3: one migration of `bytes` through a link of `rtt_ms`, a host thread touching a
/// scattered 10 % of the pages until it completes. Two rows: the time (with the touches'
/// latency), the pages the touches pulled.
fn time_rows(dir: &Path, image: &File, bytes: u64, rtt_ms: u64) -> Result<Vec<Row>, BenchError> {
    let pages = (bytes as usize) / PAGE;
    let link = Some((Duration::from_millis(rtt_ms), 0));
    let pair = Pair::start(dir, image, pages, Mode::Push, Readahead::default(), link)?;
    let order = scattered(pages, pages / 10);
    let stop = AtomicBool::new(false);
    let target = pages_of(&pair.dst_mem);
    let (h, elapsed, status) = std::thread::scope(|s| {
        // SAFETY: the VM stays mapped until `finish`, after the scope joined the thread.
        let t = s.spawn(|| unsafe { touch_pages(target, &order, Some(&stop), false) });
        let status = pair.wait_complete();
        let elapsed = pair.started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let (h, _, _) = t.join().expect("touch thread");
        status.map(|s| (h, elapsed, s))
    })?;
    pair.finish()?;
    let tag = format!("{} MiB guest, {rtt_ms} ms RTT", bytes >> 20);
    Ok(vec![
        Row::new(
            GROUP,
            &format!("{tag}: migrate_in to Complete (latency: the 10 % touches)"),
            Some(&h),
            elapsed.as_secs_f64() * 1e3,
            "ms",
        ),
        Row::new(
            GROUP,
            &format!("{tag}: pages pulled by faults (the rest pushed)"),
            None,
            status.counters.pages_pulled as f64,
            "pages",
        ),
    ])
}

/// A row of the daemon's own remote fault latency (p50 and p99 only: p99.9 is not kept).
fn daemon_latency_row(name: &str, status: &MigrationStatus) -> Row {
    let c = &status.counters;
    let mut row = Row::new(GROUP, name, None, c.pages_pulled as f64, "pages pulled");
    row.latency = (c.fault_p50_ns > 0).then(|| Latency {
        samples: c.pages_pulled,
        p50_ns: c.fault_p50_ns as f64,
        p99_ns: c.fault_p99_ns as f64,
        p999_ns: f64::NAN,
        max_ns: f64::NAN,
        cdf: Vec::new(),
    });
    row
}

/// How the destination migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Only the pages faults ask for move (`migration_push` off).
    PullOnly,
    /// Pushed, faults on their own urgent channel (the default).
    Push,
    /// Pushed, faults' requests on the bulk channel (`migration_one_channel`).
    PushOneChannel,
}

/// Two daemons on threads of this process and a VM migrating from one to the other.
struct Pair {
    // Dropped in this order: the VMs, the connections, then the daemons are shut down.
    dst_mem: VmMemory,
    src_mem: VmMemory,
    dst: Client,
    src: Client,
    dst_d: DaemonHandle,
    src_d: DaemonHandle,
    _link: Option<FaultyLink>,
    started: Instant,
}

impl Pair {
    /// A source VM of `pages` over `image`, served to a destination VM (`mode`, `readahead`),
    /// directly or through a link of `(rtt, rate)`, the rate shared by the migration's
    /// connections (0: none); the migration has been started.
    fn start(
        dir: &Path,
        image: &File,
        pages: usize,
        mode: Mode,
        readahead: Readahead,
        link: Option<(Duration, u64)>,
    ) -> Result<Pair, BenchError> {
        let src_d = daemon(dir, true)?;
        let dst_d = daemon_with(dir, false, mode, readahead)?;
        let src = connect(&src_d)?;
        let dst = connect(&dst_d)?;
        let src_mem = src.create_mapped_vm(spec(pages, source_file(image)?))?;
        let target = src_d
            .migration_addr()
            .ok_or_else(|| BenchError::Setup("the source daemon does not listen".into()))?;
        let link = link
            .map(|(rtt, rate)| {
                let l = FaultyLink::start(target, rtt)
                    .map_err(|e| BenchError::Setup(format!("faulty link: {e}")))?;
                l.set_shared_rate(rate);
                Ok::<_, BenchError>(l)
            })
            .transpose()?;
        let addr: SocketAddr = link.as_ref().map_or(target, FaultyLink::addr);
        static IDS: AtomicUsize = AtomicUsize::new(1);
        let id = IDS.fetch_add(1, Ordering::Relaxed) as u64;
        src.migrate_out(src_mem.vm_id(), id, KEY, false)?;
        let dst_mem = dst.create_mapped_vm(spec(pages, PageSource::Remote))?;
        let started = Instant::now();
        dst.migrate_in(dst_mem.vm_id(), id, KEY, &addr.to_string())?;
        Ok(Pair {
            dst_mem,
            src_mem,
            dst,
            src,
            dst_d,
            src_d,
            _link: link,
            started,
        })
    }

    fn status(&self) -> Result<MigrationStatus, BenchError> {
        Ok(self.dst.migration(self.dst_mem.vm_id())?)
    }

    /// Waits until the destination has every page; its last status.
    fn wait_complete(&self) -> Result<MigrationStatus, BenchError> {
        loop {
            let s = self.status()?;
            match s.state {
                MigrationState::Complete => return Ok(s),
                MigrationState::Running if self.started.elapsed() < PATIENCE => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => {
                    return Err(BenchError::Setup(format!(
                        "the migration did not complete: {s:?}"
                    )))
                }
            }
        }
    }

    fn finish(self) -> Result<(), BenchError> {
        let Pair {
            dst_mem,
            src_mem,
            dst,
            src,
            dst_d,
            src_d,
            _link,
            ..
        } = self;
        drop((dst_mem, src_mem, dst, src));
        shutdown(dst_d)?;
        shutdown(src_d)
    }
}

/// A daemon with one worker and readahead off (serving a migration out if `listen`).
fn daemon(dir: &Path, listen: bool) -> Result<DaemonHandle, BenchError> {
    daemon_with(dir, listen, Mode::Push, Readahead::OFF)
}

fn daemon_with(
    dir: &Path,
    listen: bool,
    mode: Mode,
    readahead: Readahead,
) -> Result<DaemonHandle, BenchError> {
    static STARTED: AtomicUsize = AtomicUsize::new(0);
    let n = STARTED.fetch_add(1, Ordering::Relaxed);
    vmpagerd::spawn(
        Config {
            workers: 1,
            readahead,
            migration_listen: listen.then(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            migration_push: mode != Mode::PullOnly,
            migration_one_channel: mode == Mode::PushOneChannel,
            vm_grace: Duration::ZERO,
            ..Config::default()
        },
        &dir.join(format!("migration-{n}.sock")),
    )
    .map_err(|e| BenchError::Setup(format!("in-process vmpagerd: {e}")))
}

fn connect(d: &DaemonHandle) -> Result<Client, BenchError> {
    Ok(Client::connect(d.socket_path())?)
}

fn shutdown(d: DaemonHandle) -> Result<(), BenchError> {
    d.shutdown()
        .map_err(|e| BenchError::Setup(format!("in-process vmpagerd shutdown: {e}")))
}

pub(crate) fn source_file(image: &File) -> Result<PageSource, BenchError> {
    Ok(PageSource::File(
        image
            .try_clone()
            .map_err(|e| BenchError::io("dup image", e))?,
    ))
}

pub(crate) fn spec(pages: usize, source: PageSource) -> VmSpec {
    VmSpec {
        regions: vec![RegionSpec::new(1 << 32, (pages * PAGE) as u64, 0)],
        source,
        populate: PopulateMethod::Copy,
        ..Default::default()
    }
}

/// `count` distinct pages of `pages` (a power of two) in a scattered order.
pub(crate) fn scattered(pages: usize, count: usize) -> Vec<usize> {
    // An odd stride visits every page of a power-of-two range once.
    const STRIDE: usize = 2_654_435_761;
    (0..count.min(pages)).map(|k| k * STRIDE % pages).collect()
}

/// The pages of `vm`'s (only) region.
pub(crate) fn pages_of(vm: &VmMemory) -> Pages {
    let region = &vm.regions()[0];
    Pages {
        base: region.host_addr(),
        pages: region.len() / PAGE,
    }
}

/// Writes one byte to each page of `order` in `t`, each write timed, until `stop` is set. The
/// latency histogram, the pages touched, the time taken. With `only_faults`, a page already in
/// memory (the push brought it first) is skipped: touching it is no fault.
///
/// # Safety
/// `t` must stay mapped writable for the call, and no reference to its bytes may exist.
pub(crate) unsafe fn touch_pages(
    t: Pages,
    order: &[usize],
    stop: Option<&AtomicBool>,
    only_faults: bool,
) -> (Histogram<u64>, usize, Duration) {
    let mut h = histogram();
    let start = Instant::now();
    let mut touched = 0;
    for &p in order.iter().filter(|&&p| p < t.pages) {
        if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            break;
        }
        // SAFETY: `p < t.pages`, and the caller keeps `t` mapped.
        if only_faults && unsafe { resident(t, p) } {
            continue;
        }
        let at = Instant::now();
        // SAFETY: `p < t.pages`: inside the mapping the caller keeps live; a volatile store
        // through a raw pointer, no reference to the shared bytes.
        unsafe { t.base.as_ptr().add(p * PAGE).write_volatile(1) };
        record(&mut h, at.elapsed());
        touched += 1;
    }
    (h, touched, start.elapsed())
}

/// Whether page `p` of `t` is in memory (the VM's memfd has it): a touch would not fault.
///
/// # Safety
/// `p < t.pages`, and `t` must stay mapped for the call.
unsafe fn resident(t: Pages, p: usize) -> bool {
    let mut vec = 0u8;
    // SAFETY: the caller's contract: page `p` is inside the live mapping `t`, whose base is
    // page-aligned; mincore writes one byte, for the one page, to `vec`.
    let r = unsafe { libc::mincore(t.base.as_ptr().add(p * PAGE).cast(), PAGE, &mut vec) };
    r == 0 && vec & 1 != 0
}

/// `n` round trips of an 8-byte request and a 4 KiB reply between two threads over loopback
/// TCP with `TCP_NODELAY`.
fn tcp_rtt(n: usize) -> std::io::Result<Histogram<u64>> {
    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let (mut req, reply) = ([0u8; 8], vec![7u8; PAGE]);
        while s.read_exact(&mut req).is_ok() {
            s.write_all(&reply)?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut h = histogram();
    let mut page = vec![0u8; PAGE];
    for i in 0..n as u64 {
        let at = Instant::now();
        c.write_all(&i.to_ne_bytes())?;
        c.read_exact(&mut page)?;
        record(&mut h, at.elapsed());
    }
    drop(c);
    server.join().expect("TCP server thread")?;
    Ok(h)
}
