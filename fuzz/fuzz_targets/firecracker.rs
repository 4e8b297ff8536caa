//! Firecracker's UFFD handshake: `parse_handshake` of the JSON bytes received so far, then
//! `validate` of the regions against the memory snapshot file, before anything is mapped.
//!
//! Input: a control byte and the memory file's length (8 bytes), then either the handshake
//! bytes (control bit 0 clear) or, structured (`arbitrary`), regions that are encoded as
//! Firecracker would, so most inputs reach `validate`.
//!
//! Properties: an accepted list has 1 to `MAX_REGIONS` regions and encodes back to a list that
//! parses equal; every strict prefix of that encoding is `Incomplete` (what lets the receiver
//! wait for more bytes) and never accepted; `validate` accepts exactly when an independent
//! check does: known page sizes (and a matching `page_size_kib`), non-empty, non-null,
//! aligned, not overflowing, inside the file, and no two regions sharing host addresses or
//! file bytes.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use vmpager_compat::firecracker::{
    encode_handshake, parse_handshake, validate, GuestRegionUffdMapping, HandshakeError,
    MAX_REGIONS, PAGE_2M, PAGE_4K,
};
use vmpager_fuzz::Num;

#[derive(Arbitrary, Debug)]
struct ArbMapping {
    addr: Num,
    size: Num,
    offset: Num,
    huge: Option<bool>,
    page_size_kib: Option<Option<Num>>,
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let (control, rest) = (data[0], &data[9..]);
    let mut len = [0u8; 8];
    len.copy_from_slice(&data[1..9]);
    let file_len = u64::from_le_bytes(len);
    let bytes = if control & 1 == 0 {
        rest.to_vec()
    } else {
        let mut u = Unstructured::new(rest);
        let Ok(list) = Vec::<ArbMapping>::arbitrary(&mut u) else {
            return;
        };
        let regions: Vec<GuestRegionUffdMapping> = list.iter().map(mapping).collect();
        encode_handshake(&regions)
    };
    let regions = match parse_handshake(&bytes) {
        Ok(r) => r,
        Err(HandshakeError::Incomplete) => return,
        Err(e) => {
            assert!(e.is_bad_input(), "{e:?}");
            return;
        }
    };
    assert!(!regions.is_empty() && regions.len() <= MAX_REGIONS);
    let encoded = encode_handshake(&regions);
    assert_eq!(parse_handshake(&encoded).ok().as_ref(), Some(&regions));
    // What arrives in pieces is never taken for a complete handshake.
    for cut in [1, encoded.len() / 2, encoded.len() - 1] {
        assert!(
            matches!(
                parse_handshake(&encoded[..cut]),
                Err(HandshakeError::Incomplete)
            ),
            "prefix of {cut} bytes"
        );
    }

    let verdict = validate(&regions, file_len);
    assert_eq!(
        verdict.is_ok(),
        acceptable(&regions, file_len),
        "{regions:?} in a file of {file_len} bytes: {verdict:?}"
    );
    if let Ok(valid) = verdict {
        assert_eq!(valid.len(), regions.len());
        for (v, r) in valid.iter().zip(&regions) {
            assert_eq!(
                (v.host_addr, v.size, v.file_offset, v.page_size),
                (r.base_host_virt_addr, r.size, r.offset, r.page_size)
            );
        }
    }
});

fn mapping(a: &ArbMapping) -> GuestRegionUffdMapping {
    let page_size = match a.huge {
        Some(false) => PAGE_4K,
        Some(true) => PAGE_2M,
        None => a.size.get() >> 40,
    };
    GuestRegionUffdMapping {
        base_host_virt_addr: a.addr.get(),
        size: a.size.get(),
        offset: a.offset.get(),
        page_size,
        page_size_kib: a.page_size_kib.map(|k| k.map_or(page_size, Num::get)),
    }
}

/// `[a, a + n)` and `[b, b + m)` share a byte (in 128 bits: no overflow).
fn overlap(a: u64, n: u64, b: u64, m: u64) -> bool {
    let (a, n, b, m) = (a as u128, n as u128, b as u128, m as u128);
    a < b + m && b < a + n
}

/// The validation rules of docs/firecracker.md, written independently.
fn acceptable(regions: &[GuestRegionUffdMapping], file_len: u64) -> bool {
    let max = u128::from(u64::MAX);
    let each = regions.iter().all(|r| {
        let ps = r.page_size;
        (ps == PAGE_4K || ps == PAGE_2M)
            && r.page_size_kib.is_none_or(|k| k == ps)
            && r.size != 0
            && r.base_host_virt_addr != 0
            && [r.base_host_virt_addr, r.size, r.offset]
                .iter()
                .all(|v| v.is_multiple_of(ps))
            && u128::from(r.base_host_virt_addr) + u128::from(r.size) <= max
            && u128::from(r.offset) + u128::from(r.size) <= u128::from(file_len)
    });
    let pairs = regions.iter().enumerate().all(|(i, a)| {
        regions[i + 1..].iter().all(|b| {
            !overlap(a.base_host_virt_addr, a.size, b.base_host_virt_addr, b.size)
                && !overlap(a.offset, a.size, b.offset, b.size)
        })
    });
    !regions.is_empty() && regions.len() <= MAX_REGIONS && each && pairs
}
