//! Restores from a packed snapshot (docs/snapshot-format.md), side by side in one run: the
//! same image served from the raw file (the file source), from a `file://` packed snapshot and
//! from S3 (`moto_server` on loopback, when it is installed), cold and warm cache; compressed
//! against raw bytes moved; a scattered 20 % working set with and without prefetch; and where
//! a chunk's time goes (the GET, decompression, hashing).
//!
//! One in-process daemon per path (one worker), a host thread faulting every page in a
//! scattered order (or the 20 %); the object source is the daemon's own
//! (`vmpagerd::source::object`), made through `Config::async_source` so its counters can be
//! read. Nothing pinned.

use crate::migration::{pages_of, scattered, source_file, spec, touch_pages};
use crate::row::{RatioOf, Row};
use crate::BenchError;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use vmpager_client::{Client, PageSource};
use vmpager_snapshot::{Snapshots, StoreOptions, DEFAULT_CHUNK};
use vmpagerd::source::object::{ChunkCache, ObjectCounters, ObjectOptions, ObjectSource};
use vmpagerd::source::AsyncSource;
use vmpagerd::{AsyncSourceFactory, Config};

const GROUP: &str = "snapshot";
const PAGE: usize = 4096;

/// `moto_server` on a free loopback port, killed on drop.
struct Moto(Child, u16);

impl Moto {
    fn start() -> Option<Moto> {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let m = Moto(child, port);
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        write!(
            s,
            "PUT /bench HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).ok()?;
        reply.starts_with("HTTP/1.1 200").then_some(m)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One restore: the touches' latency and rate, and the object source's counters (none for the
/// raw file).
struct Restore {
    row: Row,
    counters: Option<Arc<ObjectCounters>>,
}

/// Where a restore reads: the raw file (`url` `None`), or a packed snapshot through `cache`.
struct ReadFrom<'a> {
    url: Option<&'a str>,
    cache: Option<Arc<ChunkCache>>,
    options: ObjectOptions,
}

/// Restores `pages` of `image` from `from`, touching `order`.
fn restore(
    dir: &Path,
    snapshots: &Arc<Snapshots>,
    image: &File,
    from: ReadFrom<'_>,
    pages: usize,
    order: &[usize],
    name: &str,
) -> Result<Restore, BenchError> {
    let ReadFrom {
        url,
        cache,
        options,
    } = from;
    let (tx, rx) = mpsc::channel();
    let async_source = url.map(|url| {
        let (s, url) = (snapshots.clone(), url.to_owned());
        AsyncSourceFactory::new(move |completions| {
            let src =
                ObjectSource::open(s.clone(), &url, completions, options.clone(), cache.clone())
                    .ok()?;
            tx.send(src.counters()).ok()?;
            Some(Arc::new(src) as Arc<dyn AsyncSource>)
        })
    });
    let source = match url {
        Some(_) => PageSource::Zero,
        None => source_file(image)?,
    };
    let d = vmpagerd::spawn(
        Config {
            workers: 1,
            async_source,
            ..Config::default()
        },
        &dir.join("snap-bench.sock"),
    )
    .map_err(|e| BenchError::Setup(format!("in-process vmpagerd: {e}")))?;
    let client = Client::connect(d.socket_path())?;
    let vm = client.create_mapped_vm(spec(pages, source))?;
    let counters = match url {
        Some(_) => Some(
            rx.recv_timeout(Duration::from_secs(60))
                .map_err(|_| BenchError::Setup(format!("{name}: no object source")))?,
        ),
        None => None,
    };
    // SAFETY: the VM stays mapped (and served) until it is dropped below.
    let (h, touched, elapsed) = unsafe { touch_pages(pages_of(&vm), order, None, false) };
    drop(vm);
    drop(client);
    d.shutdown()
        .map_err(|e| BenchError::Setup(format!("in-process vmpagerd shutdown: {e}")))?;
    let row = Row::new(
        GROUP,
        name,
        Some(&h),
        touched as f64 / elapsed.as_secs_f64().max(1e-9),
        "pages/s",
    );
    Ok(Restore { row, counters })
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Runs the section in `dir`.
pub fn run(quick: bool, dir: &Path, log: &mut dyn FnMut(&str)) -> Result<Vec<Row>, BenchError> {
    let bytes: u64 = if quick { 256 << 20 } else { 1 << 30 };
    let pages = (bytes as usize) / PAGE;
    let image_path = dir.join("snapshot-bench.img");
    log(&format!(
        "snapshot: a {} MiB image (the demo's), packed to file:// and S3",
        bytes >> 20
    ));
    vmpager_client::demo::write_image(&image_path, bytes, 0x0076_6d70_6167_6572)?;
    let image = File::open(&image_path).map_err(|e| BenchError::io("open image", e))?;
    let moto = Moto::start();
    if moto.is_none() {
        log("snapshot: moto_server not found or not starting: no S3 rows (scripts/install-deps)");
    }
    let snapshots = Arc::new(
        Snapshots::new(StoreOptions {
            endpoint: moto.as_ref().map(|m| format!("http://127.0.0.1:{}", m.1)),
            allow_http: true,
            region: Some("us-east-1".into()),
            credentials: Some(("bench".into(), "bench".into())),
        })
        .map_err(|e| BenchError::Setup(e.to_string()))?,
    );
    let file_url = format!("file://{}", dir.join("packed").display());
    let mut urls = vec![("file://", file_url)];
    if moto.is_some() {
        urls.push(("S3 (moto)", "s3://bench/snap".to_owned()));
    }
    let mut rows = Vec::new();
    let mut stored = 0;
    for (label, url) in &urls {
        let t = Instant::now();
        let r = snapshots
            .pack(&image_path, url, DEFAULT_CHUNK)
            .map_err(|e| BenchError::Setup(format!("pack to {url}: {e}")))?;
        let s = t.elapsed().as_secs_f64();
        stored = r.stored_bytes;
        rows.push(Row::new(
            GROUP,
            &format!(
                "pack to {label}: {} MiB image -> {:.1} MiB stored ({} of {} chunks all zeros)",
                bytes >> 20,
                r.stored_bytes as f64 / (1 << 20) as f64,
                r.zero_chunks,
                r.chunks
            ),
            None,
            bytes as f64 / (1 << 20) as f64 / s.max(1e-9),
            "MiB/s",
        ));
    }
    let all = scattered(pages, pages);
    let opts = ObjectOptions::default();
    log("snapshot: every page, raw file");
    let raw = restore(
        dir,
        &snapshots,
        &image,
        ReadFrom {
            url: None,
            cache: None,
            options: opts.clone(),
        },
        pages,
        &all,
        "raw image file (file source): every page, scattered",
    )?;
    let base = raw.row.clone();
    rows.push(raw.row);
    for (label, url) in &urls {
        let cache_dir = dir.join(format!("cache-{}", label.len()));
        let _ = std::fs::remove_dir_all(&cache_dir);
        let cache = Arc::new(
            ChunkCache::open(&cache_dir, 4 << 30).map_err(|e| BenchError::Setup(e.to_string()))?,
        );
        for warm in [false, true] {
            let state = if warm { "warm cache" } else { "cold cache" };
            log(&format!("snapshot: every page, {label}, {state}"));
            let r = restore(
                dir,
                &snapshots,
                &image,
                ReadFrom {
                    url: Some(url),
                    cache: Some(cache.clone()),
                    options: opts.clone(),
                },
                pages,
                &all,
                &format!("{label} packed, {state}: every page, scattered"),
            )?;
            rows.push(r.row.compare(&base, RatioOf::Rate));
            if let Some(c) = r.counters {
                let chunks = load(&c.chunks_fetched).max(1);
                rows.push(Row::new(
                    GROUP,
                    &format!(
                        "{label} packed, {state}: bytes moved ({} chunks fetched, {} from the cache; raw image {} MiB)",
                        load(&c.chunks_fetched),
                        load(&c.cache_hits),
                        bytes >> 20
                    ),
                    None,
                    load(&c.bytes_fetched) as f64 / (1 << 20) as f64,
                    "MiB fetched",
                ));
                if !warm {
                    let us = |ns: u64| ns as f64 / chunks as f64 / 1e3;
                    rows.push(Row::new(
                        GROUP,
                        &format!(
                            "{label} packed, cold: per 2 MiB chunk, GET {:.0} us, zstd {:.0} us, BLAKE3 {:.0} us",
                            us(load(&c.get_ns)),
                            us(load(&c.decompress_ns)),
                            us(load(&c.hash_ns))
                        ),
                        None,
                        us(load(&c.get_ns) + load(&c.decompress_ns) + load(&c.hash_ns)),
                        "us per chunk",
                    ));
                }
            }
        }
    }
    // A working set: a fixed, scattered 20 %, from the farthest store, cold, with and without
    // prefetch of the next chunks.
    let (label, url) = urls.last().expect("file:// is always there");
    let set = scattered(pages, pages / 5);
    let mut first: Option<Row> = None;
    for prefetch in [0usize, 2] {
        log(&format!(
            "snapshot: 20 % working set, {label}, prefetch {prefetch}"
        ));
        let r = restore(
            dir,
            &snapshots,
            &image,
            ReadFrom {
                url: Some(url),
                cache: None,
                options: ObjectOptions {
                    prefetch,
                    ..ObjectOptions::default()
                },
            },
            pages,
            &set,
            &format!("{label} packed, no cache: a scattered 20 % working set, prefetch {prefetch} chunks"),
        )?;
        let row = match &first {
            Some(b) => r.row.compare(b, RatioOf::Rate),
            None => r.row,
        };
        first.get_or_insert_with(|| row.clone());
        rows.push(row);
    }
    drop(image);
    let _ = std::fs::remove_file(&image_path);
    let _ = std::fs::remove_dir_all(dir.join("packed"));
    log(&format!(
        "snapshot: packed size {:.1} MiB of {} MiB",
        stored as f64 / (1 << 20) as f64,
        bytes >> 20
    ));
    Ok(rows)
}
