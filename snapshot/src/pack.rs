//! `vmpager snapshot pack`: a raw image into a manifest and one data object.
//!
//! Chunks are read from the image in order, compressed on as many threads as there are CPUs
//! (a batch at a time), and appended to the data object by a multipart upload in order; the
//! manifest is written last, so a reader never sees a manifest without its data.

use crate::location::Location;
use crate::manifest::{self, ChunkEntry, Manifest};
use crate::SnapshotError;
use object_store::{PutPayload, WriteMultipart};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// zstd level: fast, and already most of the gain on memory images.
const LEVEL: i32 = 3;
/// Multipart part size (S3's minimum is 5 MiB).
const PART: usize = 8 << 20;
/// Parts uploading at once.
const UPLOADS: usize = 4;

/// What a pack did.
#[derive(Debug, Clone)]
pub struct PackReport {
    /// The manifest written.
    pub manifest: Manifest,
    /// Bytes of the image.
    pub image_bytes: u64,
    /// Bytes stored (compressed non-zero chunks).
    pub stored_bytes: u64,
    /// Chunks in all, and those all zeros (not stored).
    pub chunks: usize,
    /// All-zero chunks.
    pub zero_chunks: usize,
}

/// A chunk compressed (`None`: all zeros, nothing stored), and the hash of its plain bytes.
type Packed = (Option<Vec<u8>>, String);

/// One chunk, compressed (or `None`: all zeros), with the hash of its plain bytes.
fn compress(plain: &[u8]) -> Result<Packed, std::io::Error> {
    let hash = manifest::hash_hex(plain);
    if plain.iter().all(|&b| b == 0) {
        return Ok((None, hash));
    }
    Ok((Some(zstd::bulk::compress(plain, LEVEL)?), hash))
}

pub(crate) async fn pack(
    image: &Path,
    loc: &Location,
    chunk_size: u64,
) -> Result<PackReport, SnapshotError> {
    if !chunk_size.is_power_of_two()
        || !(manifest::MIN_CHUNK..=manifest::MAX_CHUNK).contains(&chunk_size)
    {
        return Err(SnapshotError::Invalid(format!(
            "--chunk-size {chunk_size}: a power of two from 4 KiB to 64 MiB"
        )));
    }
    let io = |what: String| move |source| SnapshotError::Io { what, source };
    let file = File::open(image).map_err(io(format!("cannot open {}", image.display())))?;
    let size = file
        .metadata()
        .map_err(io(format!("cannot stat {}", image.display())))?
        .len();
    if size == 0 || size % manifest::MIN_CHUNK != 0 || size > manifest::MAX_IMAGE {
        return Err(SnapshotError::Invalid(format!(
            "{}: {size} bytes; a memory image is a non-zero multiple of 4096 bytes",
            image.display()
        )));
    }
    let mut m = Manifest::new(size, chunk_size);
    let count = manifest::chunk_count(size, chunk_size) as usize;
    let data = loc.object(manifest::DATA_NAME);
    let upload = loc
        .store
        .put_multipart(&data)
        .await
        .map_err(|e| SnapshotError::store(format!("cannot start writing {data}"), e))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut offset = 0u64;
    let mut next = 0usize;
    while next < count {
        let batch: Vec<usize> = (next..count.min(next + threads)).collect();
        next += batch.len();
        // Read and compress the batch on scoped threads, each chunk independently.
        let results: Vec<Result<Packed, SnapshotError>> = std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .iter()
                .map(|&i| {
                    let file = &file;
                    let len = m.plain_len(i) as usize;
                    s.spawn(move || {
                        let mut plain = vec![0u8; len];
                        file.read_exact_at(&mut plain, i as u64 * chunk_size)
                            .map_err(|source| SnapshotError::Io {
                                what: format!("cannot read chunk {i} of the image"),
                                source,
                            })?;
                        compress(&plain).map_err(|source| SnapshotError::Io {
                            what: format!("cannot compress chunk {i}"),
                            source,
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(SnapshotError::Invalid(
                            "a compression thread panicked".into(),
                        ))
                    })
                })
                .collect()
        });
        for r in results {
            let (stored, hash) = r?;
            match stored {
                None => m.chunks.push(ChunkEntry {
                    offset: 0,
                    len: 0,
                    hash,
                    zero: true,
                }),
                Some(bytes) => {
                    let len = bytes.len() as u64;
                    writer
                        .wait_for_capacity(UPLOADS)
                        .await
                        .map_err(|e| SnapshotError::store(format!("cannot write {data}"), e))?;
                    writer.write(&bytes);
                    m.chunks.push(ChunkEntry {
                        offset,
                        len,
                        hash,
                        zero: false,
                    });
                    offset += len;
                }
            }
        }
    }
    let put = if offset == 0 {
        // All zeros: no part to upload (S3 refuses a multipart upload without parts).
        let _ = writer.abort().await;
        loc.store.put(&data, PutPayload::default()).await
    } else {
        writer.finish().await
    }
    .map_err(|e| SnapshotError::store(format!("cannot finish {data}"), e))?;
    m.data_size = offset;
    m.data_etag = put.e_tag;
    let at = loc.object(manifest::MANIFEST_NAME);
    loc.store
        .put(&at, PutPayload::from(m.encode()))
        .await
        .map_err(|e| SnapshotError::store(format!("cannot write {at}"), e))?;
    Ok(PackReport {
        image_bytes: size,
        stored_bytes: offset,
        chunks: count,
        zero_chunks: m.zero_chunks(),
        manifest: m,
    })
}
