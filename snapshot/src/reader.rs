//! Reading a packed snapshot: the manifest, then single chunks by ranged GETs, each pinned to
//! the data object's ETag (`If-Match`) and checked against the manifest's hash before a byte
//! of it is returned. `verify` and `unpack` read every chunk through it.

use crate::location::Location;
use crate::manifest::{self, Manifest};
use crate::SnapshotError;
use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::{GetOptions, GetRange};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Chunks fetched at once by `verify` and `unpack`.
const CONCURRENCY: usize = 8;

/// One chunk read, and where its time went.
#[derive(Debug, Clone, Default)]
pub struct ChunkRead {
    /// Its plain bytes, checked.
    pub plain: Vec<u8>,
    /// Bytes fetched from the store (0 for a zero chunk).
    pub fetched: u64,
    /// Nanoseconds in the ranged GET (request to the last byte).
    pub get_ns: u64,
    /// Nanoseconds decompressing.
    pub decompress_ns: u64,
    /// Nanoseconds hashing.
    pub hash_ns: u64,
}

/// What a verify (or unpack) read.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Chunks in all.
    pub chunks: usize,
    /// All-zero chunks (nothing fetched).
    pub zero_chunks: usize,
    /// Bytes fetched (compressed).
    pub fetched_bytes: u64,
    /// Bytes of the image.
    pub image_bytes: u64,
}

/// An opened snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotReader {
    loc: Location,
    manifest: Arc<Manifest>,
    /// The data object's ETag at open: every read asks for this one.
    etag: Option<String>,
}

impl SnapshotReader {
    /// Reads and checks the manifest, and pins the data object: its size must be the
    /// manifest's, and its ETag the one the manifest recorded (when both are known).
    pub async fn open(loc: Location) -> Result<SnapshotReader, SnapshotError> {
        let at = loc.object(manifest::MANIFEST_NAME);
        let got = loc
            .store
            .get(&at)
            .await
            .map_err(|e| SnapshotError::store(format!("cannot read {at}"), e))?;
        if got.meta.size > manifest::MAX_MANIFEST {
            return Err(SnapshotError::Manifest {
                url: loc.url.clone(),
                source: manifest::ManifestError::TooLarge(got.meta.size),
            });
        }
        let bytes = got
            .bytes()
            .await
            .map_err(|e| SnapshotError::store(format!("cannot read {at}"), e))?;
        let m = Manifest::decode(&bytes).map_err(|source| SnapshotError::Manifest {
            url: loc.url.clone(),
            source,
        })?;
        let data = loc.object(&m.data);
        let meta = loc
            .store
            .head(&data)
            .await
            .map_err(|e| SnapshotError::store(format!("cannot find {data}"), e))?;
        if meta.size != m.data_size {
            return Err(SnapshotError::Changed {
                url: loc.url.clone(),
                what: format!(
                    "the data object is {} bytes, the manifest says {}",
                    meta.size, m.data_size
                ),
            });
        }
        if let (Some(want), Some(have)) = (&m.data_etag, &meta.e_tag) {
            if want != have {
                return Err(SnapshotError::Changed {
                    url: loc.url.clone(),
                    what: format!("the data object's ETag is {have}, the manifest's {want}"),
                });
            }
        }
        Ok(SnapshotReader {
            loc,
            manifest: Arc::new(m),
            etag: meta.e_tag,
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The data object's ETag pinned at open (`None` if the store gives none).
    pub fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.loc.url
    }

    /// The plain bytes of chunk `i`, checked against its hash (zeros for a zero chunk, nothing
    /// fetched), and the bytes fetched.
    pub async fn read_chunk(&self, i: usize) -> Result<(Vec<u8>, u64), SnapshotError> {
        self.read_chunk_timed(i).await.map(|r| (r.plain, r.fetched))
    }

    /// [`SnapshotReader::read_chunk`], with where the time went.
    pub async fn read_chunk_timed(&self, i: usize) -> Result<ChunkRead, SnapshotError> {
        let m = &self.manifest;
        let Some(c) = m.chunks.get(i) else {
            return Err(SnapshotError::Invalid(format!(
                "chunk {i} of {}",
                m.chunks.len()
            )));
        };
        let plain_len = m.plain_len(i) as usize;
        if c.zero {
            return Ok(ChunkRead {
                plain: vec![0u8; plain_len],
                ..ChunkRead::default()
            });
        }
        let started = Instant::now();
        let data = self.loc.object(&m.data);
        let opts = GetOptions {
            if_match: self.etag.clone(),
            range: Some(GetRange::Bounded(c.offset..c.offset + c.len)),
            ..GetOptions::default()
        };
        let got = self.loc.store.get_opts(&data, opts).await;
        let bytes = match got {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        }
        .map_err(|e| match e {
            object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. } => {
                SnapshotError::Changed {
                    url: self.loc.url.clone(),
                    what: format!("reading chunk {i}: {e}"),
                }
            }
            e => SnapshotError::store(format!("cannot read chunk {i} of {data}"), e),
        })?;
        let corrupt = |why: String| SnapshotError::Corrupt {
            url: self.loc.url.clone(),
            chunk: i,
            why,
        };
        if bytes.len() as u64 != c.len {
            return Err(corrupt(format!(
                "{} bytes came, the manifest says {}",
                bytes.len(),
                c.len
            )));
        }
        let fetched_at = Instant::now();
        let plain = zstd::bulk::decompress(&bytes, plain_len)
            .map_err(|e| corrupt(format!("it does not decompress: {e}")))?;
        let decompressed_at = Instant::now();
        if plain.len() != plain_len {
            return Err(corrupt(format!(
                "{} plain bytes, {plain_len} expected",
                plain.len()
            )));
        }
        if !manifest::hash_hex(&plain).eq_ignore_ascii_case(&c.hash) {
            return Err(corrupt("its hash is not the manifest's".into()));
        }
        let ns = |a: Instant, b: Instant| b.saturating_duration_since(a).as_nanos() as u64;
        Ok(ChunkRead {
            plain,
            fetched: c.len,
            get_ns: ns(started, fetched_at),
            decompress_ns: ns(fetched_at, decompressed_at),
            hash_ns: ns(decompressed_at, Instant::now()),
        })
    }

    /// Reads every chunk (`CONCURRENCY` at a time), handing each to `sink` in any order.
    async fn each_chunk(
        &self,
        mut sink: impl FnMut(usize, &[u8]) -> Result<(), SnapshotError>,
    ) -> Result<VerifyReport, SnapshotError> {
        let m = &self.manifest;
        let mut report = VerifyReport {
            chunks: m.chunks.len(),
            zero_chunks: m.zero_chunks(),
            fetched_bytes: 0,
            image_bytes: m.image_size,
        };
        let stored: Vec<usize> = (0..m.chunks.len()).filter(|&i| !m.chunks[i].zero).collect();
        let mut fetched = stream::iter(stored)
            .map(|i| async move { self.read_chunk(i).await.map(|(p, n)| (i, p, n)) })
            .buffer_unordered(CONCURRENCY);
        while let Some((i, plain, n)) = fetched.try_next().await? {
            report.fetched_bytes += n;
            sink(i, &plain)?;
        }
        Ok(report)
    }

    /// Fetches and checks every chunk.
    pub async fn verify(&self) -> Result<VerifyReport, SnapshotError> {
        self.each_chunk(|_, _| Ok(())).await
    }

    /// Writes the image to `path` (created or truncated; zero chunks stay holes).
    pub async fn unpack(&self, path: &Path) -> Result<VerifyReport, SnapshotError> {
        let io = |what: String| move |source| SnapshotError::Io { what, source };
        let file = File::create(path).map_err(io(format!("cannot create {}", path.display())))?;
        file.set_len(self.manifest.image_size)
            .map_err(io(format!("cannot size {}", path.display())))?;
        let chunk = self.manifest.chunk_size;
        let report = self
            .each_chunk(|i, plain| {
                file.write_all_at(plain, i as u64 * chunk)
                    .map_err(io(format!("cannot write {}", path.display())))
            })
            .await?;
        file.sync_all()
            .map_err(io(format!("cannot sync {}", path.display())))?;
        Ok(report)
    }
}
