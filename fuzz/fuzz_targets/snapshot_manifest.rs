//! The packed snapshot's manifest (`vmpager_snapshot::Manifest::decode`,
//! docs/snapshot-format.md): JSON read from an object store, before a byte of the snapshot is
//! fetched or a buffer sized from it.
//!
//! Input: a control byte, then either (bit 0 clear) the manifest bytes as they are, or (bit 0
//! set) a structured manifest built from `arbitrary` fields and encoded, so that mutations
//! reach the consistency checks behind the JSON syntax.
//!
//! Properties: no panic; an accepted manifest has one entry per chunk, every stored chunk
//! inside the data object, contiguous and in order, lengths within zstd's bound, plain lengths
//! summing to the image size, and it re-encodes to a manifest that decodes to itself.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use vmpager_snapshot::manifest::{chunk_count, zero_hash, zstd_bound, MAX_IMAGE};
use vmpager_snapshot::{ChunkEntry, Manifest};

#[derive(Arbitrary, Debug)]
struct Structured {
    image_pages: u32,
    chunk_shift: u8,
    chunks: Vec<(bool, u32, u8)>,
    data_slack: i16,
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let bytes = if control & 1 == 0 {
        rest.to_vec()
    } else {
        let Ok(s) = Structured::arbitrary(&mut Unstructured::new(rest)) else {
            return;
        };
        let chunk = 1u64 << (12 + u64::from(s.chunk_shift % 16));
        let mut m = Manifest::new(u64::from(s.image_pages) * 4096, chunk);
        let mut at = 0u64;
        for (zero, len, tag) in s.chunks.iter().take(256) {
            let len = u64::from(*len);
            m.chunks.push(ChunkEntry {
                offset: if *zero { 0 } else { at },
                len: if *zero { 0 } else { len },
                hash: if *zero && tag % 2 == 0 {
                    zero_hash(chunk.min(1 << 20) as usize)
                } else {
                    format!("{tag:064x}")
                },
                zero: *zero,
            });
            if !zero {
                at += len;
            }
        }
        m.data_size = at.saturating_add_signed(i64::from(s.data_slack));
        m.encode()
    };
    let Ok(m) = Manifest::decode(&bytes) else {
        return;
    };
    assert!(m.image_size > 0 && m.image_size <= MAX_IMAGE);
    assert_eq!(m.chunks.len() as u64, chunk_count(m.image_size, m.chunk_size));
    let mut at = 0;
    let mut plain = 0;
    for (i, c) in m.chunks.iter().enumerate() {
        plain += m.plain_len(i);
        if c.zero {
            assert_eq!((c.offset, c.len), (0, 0));
            continue;
        }
        assert_eq!(c.offset, at, "stored in order");
        assert!(c.len > 0 && c.len <= zstd_bound(m.chunk_size));
        at += c.len;
    }
    assert_eq!(at, m.data_size);
    assert_eq!(plain, m.image_size);
    assert_eq!(Manifest::decode(&m.encode()).expect("re-encoded"), m);
});
