//! The working-set file: which pages of a snapshot a restored guest needed first, in order, with
//! the time of first need — recorded by `--record-working-set FILE` and replayed by
//! `--working-set FILE` (REAP-style: the pages are pushed into memory ahead of the vCPUs).
//!
//! A working set belongs to one snapshot: the file names it by size and BLAKE3 hash, and a set
//! recorded from another snapshot is refused. Replaying the wrong set could never put wrong bytes
//! in memory (pages always come from the snapshot being restored), but it would waste the
//! restore's time, so it is an error. Hashing a snapshot reads it whole; the result is cached in
//! the snapshot's `user.vmpager.blake3` extended attribute, valid while the file's inode, size
//! and modification time stay the same (like `make`), where the file system keeps such
//! attributes.
//!
//! # Format (version 1, little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `VMPGWSET` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | flags (0) |
//! | 16 | 8 | snapshot size in bytes |
//! | 24 | 32 | snapshot BLAKE3 hash |
//! | 56 | 8 | entry count `n` |
//! | 64 | … | `n` entries: LEB128 of the zigzag page-number delta, LEB128 of the microsecond delta |
//! | end − 32 | 32 | BLAKE3 of every byte before it |
//!
//! Page numbers are 4 KiB pages of the snapshot (`offset / 4096`); the first entry's deltas are
//! from page 0 and time 0, and times never decrease. A typical entry takes 2–4 bytes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use vmpager_protocol::WorkingSetEntry;

/// The file's magic number.
pub const MAGIC: &[u8; 8] = b"VMPGWSET";
/// The format version written.
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
const HASH_LEN: usize = 32;
/// Most entries a file may hold (1 TiB of 4 KiB pages).
pub const MAX_ENTRIES: u64 = 1 << 28;
/// The extended attribute caching a snapshot's identity.
pub const XATTR: &str = "user.vmpager.blake3";

/// Errors reading or writing a working set.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// Reading or writing the file failed.
    #[error("cannot access {path}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Not a working-set file, or damaged.
    #[error("not a valid working-set file: {0}")]
    Malformed(String),
    /// A format version this build does not read.
    #[error("working-set file version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    /// Recorded from another snapshot.
    #[error(
        "the working set was recorded from another snapshot ({recorded}), not this one ({actual})"
    )]
    OtherSnapshot {
        /// The snapshot the file names.
        recorded: SnapshotId,
        /// The snapshot being restored.
        actual: SnapshotId,
    },
}

impl WorkingSetError {
    /// The file (or its snapshot) is wrong, not the system.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, WorkingSetError::Io { .. })
    }
}

/// A snapshot named by its size and the BLAKE3 hash of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotId {
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 of every byte.
    pub hash: [u8; HASH_LEN],
}

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes, blake3 ", self.size)?;
        for b in &self.hash[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

impl SnapshotId {
    /// The identity of `file`'s contents: from its cached attribute when the file has not
    /// changed since it was computed, else by hashing it (and caching the result).
    pub fn of_file(file: &File) -> io::Result<SnapshotId> {
        let st = rustix::fs::fstat(file)?;
        let stamp = Stamp {
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_sec: st.st_mtime as i64,
            mtime_nsec: st.st_mtime_nsec as i64,
        };
        if let Some(id) = cached(file, &stamp) {
            return Ok(id);
        }
        let id = Self::hash(file, stamp.size)?;
        // Best effort: a file system without user attributes just hashes every time.
        let mut value = stamp.bytes().to_vec();
        value.extend_from_slice(&id.hash);
        let _ = rustix::fs::fsetxattr(file, XATTR, &value, rustix::fs::XattrFlags::empty());
        Ok(id)
    }

    /// Hashes `size` bytes of `file` from offset 0.
    pub fn hash(file: &File, size: u64) -> io::Result<SnapshotId> {
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < size {
            let want = (size - done).min(buf.len() as u64) as usize;
            let n = rustix::io::pread(file, &mut buf[..want], done)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the snapshot shrank while it was hashed",
                ));
            }
            hasher.update(&buf[..n]);
            done += n as u64;
        }
        Ok(SnapshotId {
            size,
            hash: *hasher.finalize().as_bytes(),
        })
    }
}

/// What a cached identity is valid for.
struct Stamp {
    ino: u64,
    size: u64,
    mtime_sec: i64,
    mtime_nsec: i64,
}

impl Stamp {
    fn bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&self.ino.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.mtime_sec.to_le_bytes());
        b[24..].copy_from_slice(&self.mtime_nsec.to_le_bytes());
        b
    }
}

fn cached(file: &File, stamp: &Stamp) -> Option<SnapshotId> {
    let mut value = [0u8; 64];
    let n = rustix::fs::fgetxattr(file.as_fd(), XATTR, &mut value).ok()?;
    if n != value.len() || value[..32] != stamp.bytes() {
        return None;
    }
    let mut hash = [0u8; HASH_LEN];
    hash.copy_from_slice(&value[32..]);
    Some(SnapshotId {
        size: stamp.size,
        hash,
    })
}

/// One page's first need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirstNeed {
    /// 4 KiB page number in the snapshot.
    pub page: u64,
    /// Microseconds after the restore began.
    pub t_us: u64,
}

/// A working set: the snapshot it belongs to and its pages in order of first need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    /// The snapshot recorded from.
    pub snapshot: SnapshotId,
    /// Pages, each once, in order of first need.
    pub entries: Vec<FirstNeed>,
}

impl WorkingSet {
    /// A working set from a daemon's recording (`Client::working_set`), deduplicated (several
    /// VMM pages of one snapshot page, or several recordings, keep the first).
    pub fn from_recording(snapshot: SnapshotId, recorded: &[WorkingSetEntry]) -> WorkingSet {
        let mut seen = std::collections::HashSet::with_capacity(recorded.len());
        let mut t_last = 0;
        let entries = recorded
            .iter()
            .filter(|e| seen.insert(e.page.get()))
            .map(|e| {
                // Times never decrease in the file.
                t_last = (e.t_ns.get() / 1000).max(t_last);
                FirstNeed {
                    page: e.page.get(),
                    t_us: t_last,
                }
            })
            .collect();
        WorkingSet { snapshot, entries }
    }

    /// The pages in replay order.
    pub fn pages(&self) -> Vec<u64> {
        self.entries.iter().map(|e| e.page).collect()
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 4 * self.entries.len() + HASH_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.snapshot.size.to_le_bytes());
        out.extend_from_slice(&self.snapshot.hash);
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        let (mut page, mut t) = (0u64, 0u64);
        for e in &self.entries {
            let delta = e.page.wrapping_sub(page) as i64;
            put_varint(&mut out, ((delta << 1) ^ (delta >> 63)) as u64);
            put_varint(&mut out, e.t_us.saturating_sub(t));
            page = e.page;
            t = e.t_us.max(t);
        }
        let digest = blake3::hash(&out);
        out.extend_from_slice(digest.as_bytes());
        out
    }

    /// Parses a file's bytes (bounded: every count and length is checked).
    pub fn decode(bytes: &[u8]) -> Result<WorkingSet, WorkingSetError> {
        let bad = |why: &str| WorkingSetError::Malformed(why.into());
        if bytes.len() < HEADER_LEN + HASH_LEN || &bytes[..8] != MAGIC {
            return Err(bad("no working-set header"));
        }
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let version = (word(8) & 0xffff_ffff) as u32;
        if version != VERSION {
            return Err(WorkingSetError::Version(version));
        }
        if word(8) >> 32 != 0 {
            return Err(bad("unknown flags"));
        }
        let (body, trailer) = bytes.split_at(bytes.len() - HASH_LEN);
        if blake3::hash(body).as_bytes() != trailer {
            return Err(bad("checksum mismatch (damaged or truncated)"));
        }
        let mut hash = [0u8; HASH_LEN];
        hash.copy_from_slice(&bytes[24..56]);
        let snapshot = SnapshotId {
            size: word(16),
            hash,
        };
        let count = word(56);
        if count > MAX_ENTRIES || count > (body.len() - HEADER_LEN) as u64 {
            return Err(bad("entry count exceeds the file"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        let mut at = HEADER_LEN;
        let (mut page, mut t) = (0u64, 0u64);
        for _ in 0..count {
            let zz = get_varint(body, &mut at).ok_or_else(|| bad("truncated or overlong entry"))?;
            let dt = get_varint(body, &mut at).ok_or_else(|| bad("truncated or overlong entry"))?;
            let delta = ((zz >> 1) as i64) ^ -((zz & 1) as i64);
            page = page.wrapping_add(delta as u64);
            t = t.checked_add(dt).ok_or_else(|| bad("time overflows"))?;
            entries.push(FirstNeed { page, t_us: t });
        }
        if at != body.len() {
            return Err(bad("bytes after the last entry"));
        }
        Ok(WorkingSet { snapshot, entries })
    }

    /// Writes the file atomically (a temporary file next to it, synced, renamed over it).
    pub fn save(&self, path: &Path) -> Result<(), WorkingSetError> {
        let io = |source| WorkingSetError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp);
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&self.encode())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(e)
        })
    }

    /// Reads a file.
    pub fn load(path: &Path) -> Result<WorkingSet, WorkingSetError> {
        let io = |source| WorkingSetError::Io {
            path: path.display().to_string(),
            source,
        };
        let f = File::open(path).map_err(io)?;
        // Entries take at least 2 bytes.
        let limit = (HEADER_LEN + HASH_LEN) as u64 + 20 * MAX_ENTRIES;
        let mut bytes = Vec::new();
        f.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
        if bytes.len() as u64 > limit {
            return Err(WorkingSetError::Malformed("file too large".into()));
        }
        Self::decode(&bytes)
    }

    /// Reads a file and checks that it was recorded from `snapshot`.
    pub fn load_for(path: &Path, snapshot: &SnapshotId) -> Result<WorkingSet, WorkingSetError> {
        let ws = Self::load(path)?;
        if ws.snapshot != *snapshot {
            return Err(WorkingSetError::OtherSnapshot {
                recorded: ws.snapshot,
                actual: *snapshot,
            });
        }
        Ok(ws)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads one LEB128 value: `None` if the bytes end first or the value does not fit 64 bits (the
/// tenth byte may carry only the top bit).
fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        let part = u64::from(b & 0x7f);
        if shift == 63 && part > 1 {
            return None;
        }
        v |= part << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> SnapshotId {
        SnapshotId {
            size: 1 << 30,
            hash: [n; 32],
        }
    }

    #[test]
    fn round_trips_compactly_and_keeps_the_first_need() {
        let rec: Vec<WorkingSetEntry> = [(9, 1_000), (3, 2_000), (9, 3_000), (1 << 40, 5_000_000)]
            .iter()
            .map(|&(p, t)| WorkingSetEntry::new(p, t))
            .collect();
        let ws = WorkingSet::from_recording(id(1), &rec);
        assert_eq!(ws.pages(), vec![9, 3, 1 << 40]);
        assert_eq!(ws.entries[1].t_us, 2);
        let bytes = ws.encode();
        assert!(bytes.len() < HEADER_LEN + HASH_LEN + 3 * 12);
        assert_eq!(WorkingSet::decode(&bytes).unwrap(), ws);
    }

    #[test]
    fn refuses_damage_other_versions_and_other_snapshots() {
        let ws = WorkingSet {
            snapshot: id(2),
            entries: (0..1000)
                .map(|i| FirstNeed {
                    page: (i * 7919) % 4096,
                    t_us: i,
                })
                .collect(),
        };
        let bytes = ws.encode();
        for cut in [0, 10, HEADER_LEN, bytes.len() - 1] {
            assert!(WorkingSet::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[HEADER_LEN + 5] ^= 1;
        assert!(matches!(
            WorkingSet::decode(&flipped),
            Err(WorkingSetError::Malformed(_))
        ));
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(matches!(
            WorkingSet::decode(&v2),
            Err(WorkingSetError::Version(2))
        ));
        let dir = std::env::temp_dir().join(format!("vmpager-ws-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("set");
        ws.save(&path).unwrap();
        assert_eq!(WorkingSet::load_for(&path, &id(2)).unwrap(), ws);
        assert!(matches!(
            WorkingSet::load_for(&path, &id(3)),
            Err(WorkingSetError::OtherSnapshot { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Found by `fuzz/fuzz_targets/working_set.rs`: a page delta whose tenth LEB128 byte is 0x7b
    /// does not fit 64 bits; it was decoded with its high bits dropped, so the file named a page
    /// it does not hold. (The fuzz input after its header and checksum were made valid.)
    #[test]
    fn a_value_past_64_bits_is_refused() {
        let mut file: Vec<u8> = [
            &b"VMPGWSET"[..],
            &[1, 0, 0, 0, 0, 0, 0, 0],
            &[0, 0, 0, 0x40, 0, 0, 0, 0],
            &[7; 20],
            &[0xf3, 7, 7, 7, 7, 7, 7, 7, 0x47, 7, 7, 7],
            &[4, 0, 0, 0, 0, 0, 0, 0],
            &[
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x94, 0x7b, 0x22,
            ],
            &[1, 0, 0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(file.len(), HEADER_LEN + 17);
        let digest = blake3::hash(&file);
        file.extend_from_slice(digest.as_bytes());
        let decoded = WorkingSet::decode(&file);
        assert!(
            matches!(&decoded, Err(WorkingSetError::Malformed(why)) if why.contains("overlong")),
            "{decoded:?}"
        );
        // The largest value that fits still decodes: ten bytes, the last one 1.
        let mut at = 0;
        let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(get_varint(&max, &mut at), Some(u64::MAX));
        assert_eq!(at, 10);
        let mut at = 0;
        assert_eq!(
            get_varint(
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
                &mut at
            ),
            None
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0x1234_5678_9abc_def0u64;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = WorkingSet::decode(&bytes);
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&bytes);
            let _ = WorkingSet::decode(&framed);
        }
    }

    #[test]
    fn a_snapshot_id_is_cached_until_the_file_changes() {
        let dir = std::env::temp_dir().join(format!("vmpager-wsid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        std::fs::write(&path, vec![7u8; 100_000]).unwrap();
        let f = File::open(&path).unwrap();
        let a = SnapshotId::of_file(&f).unwrap();
        assert_eq!(a, SnapshotId::hash(&f, 100_000).unwrap());
        assert_eq!(a.size, 100_000);
        assert_eq!(SnapshotId::of_file(&f).unwrap(), a);
        // Rewritten (a new mtime): hashed again, so a different content is seen.
        std::fs::write(&path, vec![8u8; 100_000]).unwrap();
        let f = File::open(&path).unwrap();
        assert_ne!(SnapshotId::of_file(&f).unwrap(), a);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
