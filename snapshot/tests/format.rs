//! The snapshot format end to end on `memory://` and `file://` stores: pack → verify → unpack
//! gives the image back byte for byte (zero chunks skipped, a short last chunk); a chunk whose
//! bytes do not match the manifest's hash is `Corrupt`; a snapshot replaced under an open
//! reader is `Changed`, never a mix; a manifest from a store never panics its reader.

use proptest::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use vmpager_snapshot::manifest::{MANIFEST_NAME, MAX_IMAGE};
use vmpager_snapshot::{Manifest, SnapshotError, Snapshots, StoreOptions};

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("vmpager-snap-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An image of `chunks` chunks of `chunk` bytes plus `tail` bytes: every third chunk zeros,
/// the others pseudo-random words with some repetition (compressible, not trivially).
fn image(path: &Path, chunk: usize, chunks: usize, tail: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; chunk * chunks + tail];
    let mut x = seed | 1;
    for (i, c) in data.chunks_mut(chunk).enumerate() {
        if i % 3 == 1 {
            continue;
        }
        for w in c.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = (x % 251).to_le_bytes();
            w.copy_from_slice(&v[..w.len()]);
        }
    }
    std::fs::File::create(path)
        .unwrap()
        .write_all(&data)
        .unwrap();
    data
}

fn snapshots() -> Snapshots {
    Snapshots::new(StoreOptions::default()).unwrap()
}

#[test]
fn pack_verify_unpack_round_trips_on_memory_and_file_stores() {
    let dir = Dir::new("rt");
    let chunk = 64 << 10;
    let img = dir.0.join("image");
    let data = image(&img, chunk, 10, 12 << 10, 7);
    let s = snapshots();
    let file_url = format!("file://{}", dir.0.join("store").display());
    for url in ["memory://rt/snap/one".to_owned(), file_url] {
        let r = s.pack(&img, &url, chunk as u64).unwrap();
        assert_eq!(r.chunks, 11, "{url}");
        assert_eq!(
            r.zero_chunks, 4,
            "{url}: chunks 1, 4, 7 and the short last one"
        );
        assert!(r.stored_bytes < data.len() as u64 / 2, "{url}: compressed");
        assert_eq!(r.manifest.plain_len(10), 12 << 10, "the short last chunk");
        let v = s.verify(&url).unwrap();
        assert_eq!(v.chunks, 11);
        assert_eq!(v.fetched_bytes, r.stored_bytes);
        let out = dir.0.join("out");
        s.unpack(&url, &out).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == data,
            "{url}: unpacked image differs"
        );
        // Any single chunk decodes alone.
        let reader = s.open(&url).unwrap();
        let (plain, _) = s.block_on(reader.read_chunk(5)).unwrap();
        assert!(plain == data[5 * chunk..6 * chunk]);
    }
}

#[test]
fn an_all_zero_image_stores_nothing() {
    let dir = Dir::new("zero");
    let img = dir.0.join("image");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let s = snapshots();
    let r = s.pack(&img, "memory://zero/s", 2 << 20).unwrap();
    assert_eq!((r.chunks, r.zero_chunks, r.stored_bytes), (4, 4, 0));
    let out = dir.0.join("out");
    let v = s.unpack("memory://zero/s", &out).unwrap();
    assert_eq!(v.fetched_bytes, 0);
    assert!(std::fs::read(&out).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn a_chunk_that_does_not_match_its_hash_is_corrupt() {
    let dir = Dir::new("corrupt");
    let chunk = 64 << 10;
    let img = dir.0.join("image");
    image(&img, chunk, 6, 0, 3);
    let s = snapshots();
    let store = dir.0.join("store");
    let url = format!("file://{}", store.display());
    s.pack(&img, &url, chunk as u64).unwrap();
    // The manifest names other bytes for chunk 2 than those stored (the data object is
    // untouched, so its ETag still matches: only the hash can tell).
    let path = store.join(MANIFEST_NAME);
    let mut m = Manifest::decode(&std::fs::read(&path).unwrap()).unwrap();
    m.chunks[2].hash = vmpager_snapshot::manifest::hash_hex(b"something else");
    std::fs::write(&path, m.encode()).unwrap();
    match s.verify(&url) {
        Err(SnapshotError::Corrupt { chunk: 2, .. }) => {}
        other => panic!("verify of a corrupt chunk: {other:?}"),
    }
    let reader = s.open(&url).unwrap();
    assert!(
        s.block_on(reader.read_chunk(0)).is_ok(),
        "the other chunks are fine"
    );
    assert!(matches!(
        s.block_on(reader.read_chunk(2)),
        Err(SnapshotError::Corrupt { chunk: 2, .. })
    ));
    assert!(s.unpack(&url, &dir.0.join("out")).is_err());
}

#[test]
fn a_snapshot_replaced_under_a_reader_is_an_error_never_a_mix() {
    let dir = Dir::new("changed");
    let chunk = 64 << 10;
    let (a, b) = (dir.0.join("a"), dir.0.join("b"));
    let da = image(&a, chunk, 4, 0, 11);
    image(&b, chunk, 4, 0, 12);
    let s = snapshots();
    let file_url = format!("file://{}", dir.0.join("store").display());
    for url in ["memory://changed/s".to_owned(), file_url] {
        s.pack(&a, &url, chunk as u64).unwrap();
        let reader = s.open(&url).unwrap();
        let (first, _) = s.block_on(reader.read_chunk(0)).unwrap();
        assert!(first == da[..chunk]);
        // Another image packed to the same URL while the reader is open.
        s.pack(&b, &url, chunk as u64).unwrap();
        match s.block_on(reader.read_chunk(2)) {
            Err(e @ SnapshotError::Changed { .. }) => assert!(!e.is_transient(), "{url}"),
            other => panic!("{url}: a read of a replaced snapshot: {other:?}"),
        }
        // A new reader sees the new snapshot whole.
        assert!(s.verify(&url).is_ok());
    }
}

#[test]
fn bad_arguments_are_refused() {
    let dir = Dir::new("bad");
    let img = dir.0.join("image");
    std::fs::write(&img, vec![1u8; 5000]).unwrap();
    let s = snapshots();
    assert!(matches!(
        s.pack(&img, "memory://bad/s", 2 << 20),
        Err(SnapshotError::Invalid(_))
    ));
    std::fs::write(&img, vec![1u8; 8192]).unwrap();
    assert!(matches!(
        s.pack(&img, "memory://bad/s", 3000),
        Err(SnapshotError::Invalid(_))
    ));
    assert!(s.pack(&img, "ftp://x/y", 4096).is_err());
    assert!(s.verify("memory://bad/nothing-here").is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_manifest_bytes_decode_or_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Manifest::decode(&bytes);
    }

    #[test]
    fn mangled_manifests_decode_to_consistent_ones_or_error(
        image_size in 0u64..(1 << 24),
        chunk_shift in 10u32..28,
        lens in proptest::collection::vec((any::<bool>(), 0u64..(1 << 22)), 0..40),
        data_size in 0u64..(1 << 26),
    ) {
        let chunk = 1u64 << chunk_shift;
        let mut m = Manifest::new(image_size, chunk);
        let mut at = 0;
        for (zero, len) in lens {
            m.chunks.push(vmpager_snapshot::ChunkEntry {
                offset: if zero { 0 } else { at },
                len: if zero { 0 } else { len },
                hash: vmpager_snapshot::manifest::zero_hash(if zero { chunk.min(1 << 20) as usize } else { 0 }),
                zero,
            });
            if !zero { at += len; }
        }
        m.data_size = data_size;
        if let Ok(d) = Manifest::decode(&m.encode()) {
            // Whatever is accepted is safe to read: chunks inside the data, the image bounded.
            prop_assert!(d.image_size <= MAX_IMAGE);
            for c in &d.chunks {
                prop_assert!(c.offset + c.len <= d.data_size);
            }
        }
    }
}
