//! The working-set file (`VMPGWSET`, client/src/working_set.rs): `WorkingSet::decode` of a
//! file given with `--working-set`, before any page of it is replayed.
//!
//! Input: a control byte, then the file. Control bit 0: write a valid magic, version and
//! flags into the header and replace the trailer with the right BLAKE3 checksum, so that
//! mutations reach the entry decoder behind the checksum. Bit 1: instead, build a working set
//! from structured (`arbitrary`) entries and encode it.
//!
//! Properties: an accepted file holds at most `MAX_ENTRIES` entries, fewer than its bytes,
//! with times that never decrease; its re-encoding is no longer than the file, is the file
//! itself when it is as long (so every value decoded is the value written), and decodes to
//! the same set; an encoded set decodes to itself.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use vmpager_client::working_set::{FirstNeed, SnapshotId, WorkingSet, MAGIC, MAX_ENTRIES, VERSION};

const HEADER_LEN: usize = 64;
const HASH_LEN: usize = 32;

#[derive(Arbitrary, Debug)]
struct Structured {
    size: u64,
    hash: [u8; 32],
    /// Page and time step of each entry.
    entries: Vec<(u64, u32)>,
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    if control & 2 != 0 {
        let Ok(s) = Structured::arbitrary(&mut Unstructured::new(rest)) else {
            return;
        };
        let mut t = 0u64;
        let ws = WorkingSet {
            snapshot: SnapshotId {
                size: s.size,
                hash: s.hash,
            },
            entries: s
                .entries
                .iter()
                .map(|&(page, dt)| {
                    t = t.saturating_add(u64::from(dt));
                    FirstNeed { page, t_us: t }
                })
                .collect(),
        };
        let bytes = ws.encode();
        match WorkingSet::decode(&bytes) {
            Ok(back) => assert_eq!(back, ws),
            Err(e) => panic!("an encoded working set is refused: {e}"),
        }
        return;
    }
    let mut file = rest.to_vec();
    if control & 1 != 0 && file.len() >= HEADER_LEN + HASH_LEN {
        file[..8].copy_from_slice(MAGIC);
        file[8..12].copy_from_slice(&VERSION.to_le_bytes());
        file[12..16].copy_from_slice(&0u32.to_le_bytes());
        let body = file.len() - HASH_LEN;
        let digest = blake3::hash(&file[..body]);
        file[body..].copy_from_slice(digest.as_bytes());
    }
    let Ok(ws) = WorkingSet::decode(&file) else {
        return;
    };
    let n = ws.entries.len() as u64;
    assert!(n <= MAX_ENTRIES);
    assert!(2 * n <= (file.len() - HEADER_LEN - HASH_LEN) as u64);
    assert!(ws.entries.windows(2).all(|w| w[0].t_us <= w[1].t_us));
    let again = ws.encode();
    assert!(again.len() <= file.len());
    // Re-encoding writes the shortest varints: as long as the file means every varint of the
    // file was already the shortest one, so it must be byte for byte the file (a value that
    // does not fit 64 bits, decoded to another value, is not).
    if again.len() == file.len() {
        assert_eq!(again, file, "the file decodes to values it does not hold");
    }
    match WorkingSet::decode(&again) {
        Ok(back) => assert_eq!(back, ws),
        Err(e) => panic!("a re-encoded working set is refused: {e}"),
    }
});
