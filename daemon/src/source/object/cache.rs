//! The on-disk chunk cache shared by every VM restored from the same snapshot
//! (`--cache-dir`, `--cache-size`): verified plain chunks, one file each, under a directory
//! named by the snapshot's identity (its URL and the data object's pinned ETag), so a replaced
//! snapshot never meets the old one's chunks. Files appear by rename (never half written);
//! every hit is checked against the manifest's hash again before use (a damaged file is
//! removed and fetched anew). Past the size limit the least recently used files go.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

/// A cache directory with a size limit.
#[derive(Debug)]
pub struct ChunkCache {
    root: PathBuf,
    limit: u64,
    /// Bytes in the cache as this process counts them (rescanned when it may be over).
    used: AtomicU64,
    evicting: Mutex<()>,
    /// Hits and stores, for the source's counters.
    pub hits: AtomicU64,
    /// Chunks written.
    pub stores: AtomicU64,
    /// Files removed to stay under the limit.
    pub evictions: AtomicU64,
    /// Names temporary files uniquely (two stores of one chunk may race).
    tmp_seq: AtomicU64,
}

/// Errors of the cache (never fatal to a restore: a failed cache is a miss).
#[derive(Debug, thiserror::Error)]
#[error("chunk cache {path}: {source}")]
pub struct CacheError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl ChunkCache {
    /// A cache in `root` (created) of at most `limit` bytes.
    pub fn open(root: &Path, limit: u64) -> Result<ChunkCache, CacheError> {
        fs::create_dir_all(root).map_err(|source| CacheError {
            path: root.into(),
            source,
        })?;
        let cache = ChunkCache {
            root: root.into(),
            limit,
            used: AtomicU64::new(0),
            evicting: Mutex::new(()),
            hits: AtomicU64::new(0),
            stores: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
        };
        cache
            .used
            .store(cache.scan().iter().map(|f| f.1).sum(), Ordering::Relaxed);
        Ok(cache)
    }

    /// The directory of one snapshot version.
    fn dir(&self, snapshot: &str) -> PathBuf {
        self.root.join(snapshot)
    }

    /// The plain chunk `i` of `snapshot`, if cached and `check` accepts it.
    pub fn get(&self, snapshot: &str, i: usize, check: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let path = self.dir(snapshot).join(i.to_string());
        let bytes = fs::read(&path).ok()?;
        if !check(&bytes) {
            let _ = fs::remove_file(&path);
            return None;
        }
        // Recently used: evicted last.
        let _ = fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(SystemTime::now()));
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(bytes)
    }

    /// Stores plain chunk `i` of `snapshot` (verified by the caller); evicts past the limit.
    pub fn put(&self, snapshot: &str, i: usize, plain: &[u8]) -> Result<(), CacheError> {
        if plain.len() as u64 > self.limit {
            return Ok(());
        }
        let dir = self.dir(snapshot);
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError { path, source }
        };
        fs::create_dir_all(&dir).map_err(err(&dir))?;
        let path = dir.join(i.to_string());
        if path.exists() {
            return Ok(());
        }
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{i}.{}.{seq}.tmp", std::process::id()));
        let mut f = fs::File::create(&tmp).map_err(err(&tmp))?;
        f.write_all(plain).map_err(err(&tmp))?;
        fs::rename(&tmp, &path).map_err(err(&path))?;
        self.stores.fetch_add(1, Ordering::Relaxed);
        let used = self.used.fetch_add(plain.len() as u64, Ordering::Relaxed) + plain.len() as u64;
        if used > self.limit {
            self.evict();
        }
        Ok(())
    }

    /// Every cached file: (path, size, modified).
    fn scan(&self) -> Vec<(PathBuf, u64, SystemTime)> {
        let mut files = Vec::new();
        let Ok(dirs) = fs::read_dir(&self.root) else {
            return files;
        };
        for d in dirs.flatten() {
            let Ok(entries) = fs::read_dir(d.path()) else {
                continue;
            };
            for e in entries.flatten() {
                if let Ok(m) = e.metadata() {
                    if m.is_file() && !e.file_name().to_string_lossy().starts_with('.') {
                        let t = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                        files.push((e.path(), m.len(), t));
                    }
                }
            }
        }
        files
    }

    /// Removes the least recently used files until the cache is at 90 % of its limit (other
    /// processes sharing the directory are counted by the rescan).
    fn evict(&self) {
        let Ok(_one) = self.evicting.try_lock() else {
            return;
        };
        let mut files = self.scan();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort_by_key(|f| f.2);
        let target = self.limit / 10 * 9;
        for (path, len, _) in files {
            if total <= target {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total -= len;
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.used.store(total, Ordering::Relaxed);
    }

    /// Bytes in the cache (this process's count).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_under_its_limit_and_checks_hits() {
        let root = std::env::temp_dir().join(format!("vmpager-cache-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let cache = ChunkCache::open(&root, 1 << 20).unwrap();
        for i in 0..10 {
            cache.put("snap", i, &vec![i as u8; 256 << 10]).unwrap();
        }
        assert!(cache.used() <= 1 << 20, "{}", cache.used());
        assert!(cache.evictions.load(Ordering::Relaxed) >= 6);
        // The newest are kept; a hit is checked.
        assert_eq!(
            cache.get("snap", 9, |b| b[0] == 9),
            Some(vec![9u8; 256 << 10])
        );
        assert_eq!(
            cache.get("snap", 9, |_| false),
            None,
            "refused by its check"
        );
        assert_eq!(cache.get("snap", 9, |_| true), None, "and removed");
        // A reopened cache counts what is there.
        let again = ChunkCache::open(&root, 1 << 20).unwrap();
        assert!(again.used() > 0 && again.used() <= 1 << 20);
        let _ = fs::remove_dir_all(&root);
    }
}
