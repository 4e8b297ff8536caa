//! The manifest: what a packed snapshot holds and where (docs/snapshot-format.md).
//!
//! JSON, next to the data object: the format and version, the image size, the chunk size, the
//! data object's name, size and ETag at packing, and one entry per chunk of the image, in
//! order: its offset and compressed length in the data object, the BLAKE3 hash of its plain
//! bytes, and whether it is all zeros (then nothing is stored for it). [`Manifest::decode`]
//! checks everything a reader relies on, so a manifest from a store never makes a reader
//! index out of bounds or allocate more than the image.

use serde::{Deserialize, Serialize};

/// The `format` field.
pub const FORMAT: &str = "vmpager-snapshot";
/// The version this code writes and reads.
pub const VERSION: u32 = 1;
/// The manifest's object name under the snapshot's prefix.
pub const MANIFEST_NAME: &str = "manifest.json";
/// The data object's name under the snapshot's prefix.
pub const DATA_NAME: &str = "chunks";
/// Smallest chunk size (one page).
pub const MIN_CHUNK: u64 = 4096;
/// Largest chunk size.
pub const MAX_CHUNK: u64 = 64 << 20;
/// Default chunk size.
pub const DEFAULT_CHUNK: u64 = 2 << 20;
/// Largest image described (16 TiB).
pub const MAX_IMAGE: u64 = 1 << 44;
/// Largest manifest read (bytes).
pub const MAX_MANIFEST: u64 = 64 << 20;

/// Why a manifest is refused (bad input: it came from a store).
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON of this shape.
    #[error("the manifest is not valid: {0}")]
    Syntax(#[from] serde_json::Error),
    /// Another format, or a version this code does not read.
    #[error("not a vmpager snapshot manifest of version {VERSION} (format {format:?}, version {version})")]
    Version {
        /// What it says it is.
        format: String,
        /// Its version.
        version: u32,
    },
    /// A field is out of range or inconsistent.
    #[error("the manifest is inconsistent: {0}")]
    Invalid(String),
    /// Larger than [`MAX_MANIFEST`].
    #[error("the manifest is {0} bytes, more than the {MAX_MANIFEST} allowed")]
    TooLarge(u64),
}

/// One chunk of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    /// Offset of its compressed bytes in the data object (0 for a zero chunk).
    pub offset: u64,
    /// Compressed length (0 for a zero chunk).
    pub len: u64,
    /// BLAKE3 of the plain bytes, lowercase hex.
    pub hash: String,
    /// All zeros: nothing stored.
    pub zero: bool,
}

/// A snapshot's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// Bytes of the raw image.
    pub image_size: u64,
    /// Bytes of plain data per chunk (the last may be shorter).
    pub chunk_size: u64,
    /// `"zstd"`: each stored chunk is one zstd frame.
    pub compression: String,
    /// `"blake3"`.
    pub hash: String,
    /// The data object's name, next to the manifest.
    pub data: String,
    /// The data object's size.
    pub data_size: u64,
    /// The data object's ETag when it was written, if the store gave one: a reader pins it
    /// (`If-Match`), so a replaced snapshot is an error, never a mix.
    pub data_etag: Option<String>,
    /// One per chunk of the image, in order.
    pub chunks: Vec<ChunkEntry>,
}

/// Chunks of an image of `image_size` bytes.
pub fn chunk_count(image_size: u64, chunk_size: u64) -> u64 {
    image_size.div_ceil(chunk_size.max(1))
}

/// The hex BLAKE3 hash of `bytes`.
pub fn hash_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// The hash of `len` zero bytes.
pub fn zero_hash(len: usize) -> String {
    let mut h = blake3::Hasher::new();
    let zeros = [0u8; 65536];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len());
        h.update(&zeros[..n]);
        left -= n;
    }
    h.finalize().to_hex().to_string()
}

impl Manifest {
    /// An empty manifest for an image (chunks to be pushed in order).
    pub fn new(image_size: u64, chunk_size: u64) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            image_size,
            chunk_size,
            compression: "zstd".into(),
            hash: "blake3".into(),
            data: DATA_NAME.into(),
            data_size: 0,
            data_etag: None,
            chunks: Vec::new(),
        }
    }

    /// Plain bytes of chunk `i` (the last may be short).
    pub fn plain_len(&self, i: usize) -> u64 {
        let start = i as u64 * self.chunk_size;
        self.chunk_size.min(self.image_size.saturating_sub(start))
    }

    /// Stored (compressed) bytes of every non-zero chunk.
    pub fn stored_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.len).sum()
    }

    /// Chunks that are all zeros.
    pub fn zero_chunks(&self) -> usize {
        self.chunks.iter().filter(|c| c.zero).count()
    }

    /// The JSON form.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings, integers and vectors always serializes.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Parses and checks a manifest read from a store.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() as u64 > MAX_MANIFEST {
            return Err(ManifestError::TooLarge(bytes.len() as u64));
        }
        let m: Manifest = serde_json::from_slice(bytes)?;
        m.check()?;
        Ok(m)
    }

    /// Everything a reader relies on: sizes in range, one entry per chunk, stored chunks
    /// contiguous in order inside the data object, hashes well formed, zero chunks' hashes
    /// those of zeros.
    pub fn check(&self) -> Result<(), ManifestError> {
        let bad = |s: String| Err(ManifestError::Invalid(s));
        if self.format != FORMAT || self.version != VERSION {
            return Err(ManifestError::Version {
                format: self.format.clone(),
                version: self.version,
            });
        }
        if self.compression != "zstd" || self.hash != "blake3" {
            return bad(format!(
                "compression {:?} and hash {:?} (only zstd and blake3)",
                self.compression, self.hash
            ));
        }
        if !self.chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&self.chunk_size)
        {
            return bad(format!(
                "chunk size {} (a power of two from {MIN_CHUNK} to {MAX_CHUNK})",
                self.chunk_size
            ));
        }
        if self.image_size == 0
            || self.image_size > MAX_IMAGE
            || !self.image_size.is_multiple_of(MIN_CHUNK)
        {
            return bad(format!(
                "image size {} (a multiple of 4096, at most {MAX_IMAGE})",
                self.image_size
            ));
        }
        if self.data.is_empty()
            || self.data.contains('/')
            || self.data == MANIFEST_NAME
            || self.data.starts_with('.')
        {
            return bad(format!("data object name {:?}", self.data));
        }
        let n = chunk_count(self.image_size, self.chunk_size);
        if self.chunks.len() as u64 != n {
            return bad(format!(
                "{} chunk entries for {n} chunks",
                self.chunks.len()
            ));
        }
        let bound = zstd_bound(self.chunk_size);
        let mut at = 0u64;
        let mut zero_hashes: Vec<(u64, String)> = Vec::new();
        for (i, c) in self.chunks.iter().enumerate() {
            if c.hash.len() != 64 || !c.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad(format!("chunk {i}: hash {:?}", c.hash));
            }
            if c.zero {
                if c.len != 0 || c.offset != 0 {
                    return bad(format!("chunk {i}: a zero chunk with stored bytes"));
                }
                let len = self.plain_len(i);
                let want = match zero_hashes.iter().find(|(l, _)| *l == len) {
                    Some((_, h)) => h.clone(),
                    None => {
                        let h = zero_hash(len as usize);
                        zero_hashes.push((len, h.clone()));
                        h
                    }
                };
                if !c.hash.eq_ignore_ascii_case(&want) {
                    return bad(format!(
                        "chunk {i}: a zero chunk whose hash is not of zeros"
                    ));
                }
                continue;
            }
            if c.len == 0 || c.len > bound {
                return bad(format!("chunk {i}: {} stored bytes (1 to {bound})", c.len));
            }
            if c.offset != at {
                return bad(format!(
                    "chunk {i}: at {} in the data, expected {at} (chunks are stored in order)",
                    c.offset
                ));
            }
            at += c.len;
        }
        if at != self.data_size {
            return bad(format!(
                "the chunks hold {at} bytes, the data object {}",
                self.data_size
            ));
        }
        Ok(())
    }
}

/// The most a zstd frame of `n` plain bytes can take (zstd's `ZSTD_COMPRESSBOUND`).
pub fn zstd_bound(n: u64) -> u64 {
    n + (n >> 8)
        + if n < (128 << 10) {
            ((128 << 10) - n) >> 11
        } else {
            0
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut m = Manifest::new(3 * 4096 + 4096, 8192);
        m.chunks.push(ChunkEntry {
            offset: 0,
            len: 100,
            hash: hash_hex(b"x"),
            zero: false,
        });
        m.chunks.push(ChunkEntry {
            offset: 0,
            len: 0,
            hash: zero_hash(8192),
            zero: true,
        });
        m.data_size = 100;
        m
    }

    #[test]
    fn round_trip_and_checks() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        let mut bad = m.clone();
        bad.chunks[1].hash = hash_hex(b"not zeros");
        assert!(Manifest::decode(&bad.encode()).is_err());
        let mut bad = m.clone();
        bad.data_size = 99;
        assert!(Manifest::decode(&bad.encode()).is_err());
        let mut bad = m.clone();
        bad.chunks.pop();
        assert!(Manifest::decode(&bad.encode()).is_err());
        let mut bad = m.clone();
        bad.chunk_size = 3000;
        assert!(Manifest::decode(&bad.encode()).is_err());
        let mut bad = m;
        bad.version = 2;
        assert!(matches!(
            Manifest::decode(&bad.encode()),
            Err(ManifestError::Version { .. })
        ));
    }

    #[test]
    fn zstd_bound_matches_the_library() {
        for n in [0u64, 1, 4096, 128 << 10, 2 << 20] {
            assert_eq!(
                zstd_bound(n),
                zstd::zstd_safe::compress_bound(n as usize) as u64
            );
        }
    }
}
