//! The object-store page source: a VM's memory restored from a packed snapshot
//! (docs/snapshot-format.md) at any `object_store` URL (`file://`, `s3://`).
//!
//! An [`AsyncSource`]: a fault's page is fetched as its whole chunk (one ranged GET, pinned to
//! the data object's ETag), checked against the manifest's hash, and delivered whole, so the
//! neighbouring pages go in with it; the next chunks are prefetched in the background. At most
//! [`ObjectOptions::concurrency`] GETs run at once (in the order asked; a chunk a fault waits on
//! reaches the worker through its urgent queue). Zero chunks are never
//! fetched. A shared on-disk [`ChunkCache`] serves chunks another VM (or an earlier restore)
//! fetched.
//!
//! Failures: transient store errors are retried with back-off until
//! [`ObjectOptions::deadline`]; then, like a corrupt chunk, the chunk is `Failed` and the pages
//! a fault waits on are poisoned, never zero-filled. A snapshot replaced under the restore
//! (`If-Match` fails) is an error for the whole VM: the source is declared lost, and every
//! page not yet in is poisoned when touched.

mod cache;

pub use cache::{CacheError, ChunkCache};

use super::{Arrival, AsyncSource, Completions, Payload, SourceError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmpager_migration::Backoff;
use vmpager_snapshot::{SnapshotError, SnapshotReader, Snapshots};

/// How an object source fetches.
#[derive(Debug, Clone)]
pub struct ObjectOptions {
    /// GETs in flight at once.
    pub concurrency: usize,
    /// Chunks after a faulted one fetched in the background.
    pub prefetch: usize,
    /// How long a chunk is retried before its waiting pages are poisoned.
    pub deadline: Duration,
}

impl Default for ObjectOptions {
    fn default() -> ObjectOptions {
        ObjectOptions {
            concurrency: 8,
            prefetch: 2,
            deadline: Duration::from_secs(30),
        }
    }
}

/// The daemon's settings for VMs restored from snapshot URLs (`--cache-dir`, `--cache-size`,
/// `--snapshot-deadline`).
#[derive(Debug, Clone, Default)]
pub struct ObjectConfig {
    /// The shared chunk cache's directory (`None`: no cache).
    pub cache_dir: Option<std::path::PathBuf>,
    /// Its size limit in bytes.
    pub cache_size: u64,
    /// How each VM's source fetches.
    pub options: ObjectOptions,
}

/// The runtime the stores run on and the chunk cache (if any).
type Shared = (Arc<Snapshots>, Option<Arc<ChunkCache>>);

/// What every object source of a daemon shares: the runtime the stores run on and the chunk
/// cache, made at the first VM that needs them.
#[derive(Debug)]
pub struct Objects {
    config: ObjectConfig,
    shared: std::sync::OnceLock<Result<Shared, String>>,
}

impl Objects {
    /// Nothing made yet.
    pub fn new(config: ObjectConfig) -> Objects {
        Objects {
            config,
            shared: std::sync::OnceLock::new(),
        }
    }

    /// The source of a new VM restored from `url`, answering into `completions`. Reads the
    /// manifest and pins the data object (blocking: a few requests to the store). Store
    /// credentials and endpoint come from the daemon's environment (`AWS_*`).
    pub fn open(&self, url: &str, completions: Completions) -> Result<ObjectSource, String> {
        let shared = self.shared.get_or_init(|| {
            let snapshots = Snapshots::new(vmpager_snapshot::StoreOptions::default())
                .map_err(|e| e.to_string())?;
            let cache = match &self.config.cache_dir {
                Some(dir) => Some(Arc::new(
                    ChunkCache::open(dir, self.config.cache_size).map_err(|e| e.to_string())?,
                )),
                None => None,
            };
            Ok((Arc::new(snapshots), cache))
        });
        let (snapshots, cache) = shared.as_ref().map_err(Clone::clone)?;
        ObjectSource::open(
            snapshots.clone(),
            url,
            completions,
            self.config.options.clone(),
            cache.clone(),
        )
        .map_err(|e| {
            let mut text = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                text.push_str(": ");
                text.push_str(&s.to_string());
                src = s.source();
            }
            text
        })
    }
}

/// The names of [`ObjectCounters::snapshot`]'s values (the Prometheus `event` label).
pub const OBJECT_COUNTERS: [&str; 8] = [
    "chunks_fetched",
    "bytes_fetched",
    "cache_hits",
    "corrupt",
    "retries",
    "failed",
    "changed",
    "bytes_delivered",
];

/// What the source did (all monotonic).
#[derive(Debug, Default)]
pub struct ObjectCounters {
    /// Chunks fetched from the store.
    pub chunks_fetched: AtomicU64,
    /// Compressed bytes fetched from the store.
    pub bytes_fetched: AtomicU64,
    /// Plain bytes delivered.
    pub bytes_delivered: AtomicU64,
    /// Chunks served by the cache.
    pub cache_hits: AtomicU64,
    /// Chunks whose bytes did not match the manifest (poisoned).
    pub corrupt: AtomicU64,
    /// Store errors retried.
    pub retries: AtomicU64,
    /// Chunks given up on (their waiting pages poisoned).
    pub failed: AtomicU64,
    /// The snapshot changed under the restore (the VM's source is lost).
    pub changed: AtomicU64,
    /// Nanoseconds in ranged GETs, summed.
    pub get_ns: AtomicU64,
    /// Nanoseconds decompressing, summed.
    pub decompress_ns: AtomicU64,
    /// Nanoseconds hashing, summed.
    pub hash_ns: AtomicU64,
}

impl ObjectCounters {
    /// The counters in [`OBJECT_COUNTERS`] order.
    pub fn snapshot(&self) -> [u64; 8] {
        [
            &self.chunks_fetched,
            &self.bytes_fetched,
            &self.cache_hits,
            &self.corrupt,
            &self.retries,
            &self.failed,
            &self.changed,
            &self.bytes_delivered,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }
}

/// Chunks asked for and not yet delivered, and those delivered.
#[derive(Debug, Default)]
struct InFlight {
    /// Chunk → urgent (a fault waits on it).
    chunks: HashMap<usize, bool>,
    /// Delivered whole: never asked again. The worker installs every page of it that is
    /// still untouched (a fault on one of them meanwhile is answered by that install), and a
    /// page discarded since comes back as zeros without asking the source.
    delivered: std::collections::HashSet<usize>,
}

#[derive(Debug)]
struct Inner {
    reader: SnapshotReader,
    snapshots: Arc<Snapshots>,
    completions: Completions,
    options: ObjectOptions,
    cache: Option<(Arc<ChunkCache>, String)>,
    inflight: Mutex<InFlight>,
    gets: Arc<tokio::sync::Semaphore>,
    lost: AtomicBool,
    counters: Arc<ObjectCounters>,
}

/// A VM's object-store source.
#[derive(Debug, Clone)]
pub struct ObjectSource(Arc<Inner>);

impl ObjectSource {
    /// Opens the snapshot at `url` (its manifest read and checked, the data object pinned) as
    /// the source of a VM answering into `completions`; chunks are cached in `cache`, if any.
    pub fn open(
        snapshots: Arc<Snapshots>,
        url: &str,
        completions: Completions,
        options: ObjectOptions,
        cache: Option<Arc<ChunkCache>>,
    ) -> Result<ObjectSource, SnapshotError> {
        let reader = snapshots.open(url)?;
        let cache = cache.map(|c| {
            let id =
                blake3::hash(format!("{url}\n{}", reader.etag().unwrap_or("no-etag")).as_bytes())
                    .to_hex()[..32]
                    .to_owned();
            (c, id)
        });
        Ok(ObjectSource(Arc::new(Inner {
            gets: Arc::new(tokio::sync::Semaphore::new(options.concurrency.max(1))),
            reader,
            snapshots,
            completions,
            options,
            cache,
            inflight: Mutex::new(InFlight::default()),
            lost: AtomicBool::new(false),
            counters: Arc::new(ObjectCounters::default()),
        })))
    }

    /// Its counters.
    pub fn counters(&self) -> Arc<ObjectCounters> {
        self.0.counters.clone()
    }

    /// The snapshot's reader (its manifest).
    pub fn reader(&self) -> &SnapshotReader {
        &self.0.reader
    }

    /// The object source behind `source`, if it is one.
    pub fn of(source: &super::Source) -> Option<&ObjectSource> {
        source
            .fetcher()?
            .source
            .as_any()
            .downcast_ref::<ObjectSource>()
    }
}

impl Inner {
    fn chunk_size(&self) -> u64 {
        self.reader.manifest().chunk_size
    }

    /// Asks for chunk `i` unless it is in flight (an urgent ask upgrades a background one).
    fn want(self: &Arc<Inner>, i: usize, urgent: bool) {
        {
            let mut f = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if f.delivered.contains(&i) {
                return;
            }
            match f.chunks.get_mut(&i) {
                Some(u) => {
                    *u |= urgent;
                    return;
                }
                None => {
                    f.chunks.insert(i, urgent);
                }
            }
        }
        let me = self.clone();
        self.snapshots
            .handle()
            .spawn(async move { me.serve(i).await });
    }

    /// Fetches chunk `i` (cache, then store with retries) and delivers it.
    async fn serve(self: Arc<Inner>, i: usize) {
        let m = self.reader.manifest();
        let offset = i as u64 * self.chunk_size();
        let len = m.plain_len(i);
        let payload = match self.get(i).await {
            Ok(plain) => {
                self.counters
                    .bytes_delivered
                    .fetch_add(plain.len() as u64, Ordering::Relaxed);
                Payload::Data(plain)
            }
            Err(e) => {
                tracing::trace!(chunk = i, error = %e, "object source: chunk failed");
                if matches!(e, SnapshotError::Changed { .. }) {
                    self.counters.changed.fetch_add(1, Ordering::Relaxed);
                    if !self.lost.swap(true, Ordering::AcqRel) {
                        tracing::warn!(url = self.reader.url(), error = %e, "the snapshot changed under a restore: its missing pages are poisoned");
                    }
                }
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                Payload::Failed {
                    len,
                    error: SourceError::Unusable(e.to_string()),
                }
            }
        };
        let urgent = {
            let mut f = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(payload, Payload::Data(_)) {
                f.delivered.insert(i);
            }
            f.chunks.remove(&i).unwrap_or(false)
        };
        let arrival = Arrival {
            offset,
            data: payload,
        };
        if urgent {
            self.completions.deliver_urgent(arrival);
        } else {
            // Waits while the VM's ordered queue is full: on a runtime thread, which is
            // allowed to block briefly (two threads, bounded by the worker's pace).
            let c = self.completions.clone();
            let _ = tokio::task::spawn_blocking(move || c.deliver(arrival)).await;
        }
        if self.lost.load(Ordering::Acquire) {
            self.completions.lost();
        }
    }

    /// The plain bytes of chunk `i`: from the cache, or the store (then cached).
    async fn get(&self, i: usize) -> Result<Vec<u8>, SnapshotError> {
        let entry = &self.reader.manifest().chunks[i];
        if let Some((cache, id)) = &self.cache {
            let hash = entry.hash.clone();
            if let Some(plain) = cache.get(id, i, |b| {
                vmpager_snapshot::manifest::hash_hex(b).eq_ignore_ascii_case(&hash)
            }) {
                self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(plain);
            }
        }
        let deadline = Instant::now() + self.options.deadline;
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
        loop {
            let result = {
                let _permit = self.gets.acquire().await;
                let left = deadline.saturating_duration_since(Instant::now());
                // One attempt never outlives the chunk's deadline (a silent store).
                match tokio::time::timeout(left, self.reader.read_chunk_timed(i)).await {
                    Ok(r) => r,
                    Err(_) => Err(SnapshotError::TimedOut {
                        url: self.reader.url().into(),
                        chunk: i,
                    }),
                }
            };
            match result {
                Ok(read) => {
                    let c = &self.counters;
                    c.get_ns.fetch_add(read.get_ns, Ordering::Relaxed);
                    c.decompress_ns
                        .fetch_add(read.decompress_ns, Ordering::Relaxed);
                    c.hash_ns.fetch_add(read.hash_ns, Ordering::Relaxed);
                    let (plain, fetched) = (read.plain, read.fetched);
                    self.counters.chunks_fetched.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .bytes_fetched
                        .fetch_add(fetched, Ordering::Relaxed);
                    if let Some((cache, id)) = &self.cache {
                        if let Err(e) = cache.put(id, i, &plain) {
                            tracing::trace!(error = %e, "chunk cache: not stored");
                        }
                    }
                    return Ok(plain);
                }
                Err(e @ SnapshotError::Corrupt { .. }) => {
                    self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    let wait = backoff
                        .next_delay()
                        .min(deadline.saturating_duration_since(Instant::now()));
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsyncSource for ObjectSource {
    fn name(&self) -> &'static str {
        "object"
    }

    fn fetch(&self, offset: u64, len: u64, urgent: bool) {
        let inner = &self.0;
        let m = inner.reader.manifest();
        let size = m.image_size;
        let end = offset.saturating_add(len);
        if offset >= size {
            // Past the image: zeros (as for a short file).
            inner.completions.deliver_urgent(Arrival {
                offset,
                data: Payload::Zero { len },
            });
            return;
        }
        let cs = inner.chunk_size();
        let first = (offset / cs) as usize;
        let last = (end.min(size).div_ceil(cs)) as usize;
        if end > size {
            inner.completions.deliver_urgent(Arrival {
                offset: size,
                data: Payload::Zero { len: end - size },
            });
        }
        for i in first..last {
            if m.chunks[i].zero {
                let arrival = Arrival {
                    offset: i as u64 * cs,
                    data: Payload::Zero {
                        len: m.plain_len(i),
                    },
                };
                // Nothing to fetch: zeros at once (never waits: from the worker's thread).
                inner.completions.deliver_urgent(arrival);
                continue;
            }
            inner.want(i, urgent);
        }
        if urgent {
            // Read ahead of the fault: the next stored chunks, in the background.
            let mut k = 0;
            let mut i = last;
            while k < inner.options.prefetch && i < m.chunks.len() {
                if !m.chunks[i].zero {
                    inner.want(i, false);
                    k += 1;
                }
                i += 1;
            }
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
