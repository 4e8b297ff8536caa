//! Region lists as fuzz input, and region validation written independently of
//! `vmpager_protocol::region::validate_regions` (checked against it by the targets).

use crate::Num;
use arbitrary::Arbitrary;
use vmpager_protocol::region::REGION_FLAGS;
use vmpager_protocol::{RegionSpec, MAX_REGIONS};

/// One region as fuzz input.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct ArbRegion {
    /// With `packed`: the gap after the previous region's end; else the GPA itself.
    pub gpa: Num,
    /// Size.
    pub size: Num,
    /// Offset in the page source.
    pub source_offset: Num,
    /// Offset in the memfd.
    pub file_offset: Num,
    /// Region flags (only the known ones most of the time).
    pub flags: u8,
    /// Memfd group (small, so groups are shared).
    pub group: u8,
}

/// Builds region specs. `packed`: each region starts after the previous one (plus its gap), so
/// valid lists are common; otherwise every GPA is taken as given.
pub fn build_regions(input: &[ArbRegion], packed: bool) -> Vec<RegionSpec> {
    let mut next = 0u64;
    input
        .iter()
        .map(|a| {
            let size = a.size.get();
            let gpa = if packed {
                next.wrapping_add(a.gpa.get())
            } else {
                a.gpa.get()
            };
            next = gpa.wrapping_add(size);
            let flags = if a.flags & 0x80 != 0 {
                u32::from(a.flags)
            } else {
                u32::from(a.flags) & REGION_FLAGS
            };
            let mut r = RegionSpec::new(gpa, size, a.source_offset.get())
                .in_memfd(u32::from(a.group % 4), a.file_offset.get());
            r.flags = flags.into();
            r
        })
        .collect()
}

fn page_size(r: &RegionSpec) -> u64 {
    if r.flags.get() & vmpager_protocol::REGION_HUGE_2M != 0 {
        vmpager_protocol::HUGE_PAGE_SIZE
    } else {
        vmpager_protocol::PAGE_SIZE
    }
}

/// `[a, a + len)` and `[b, b + len_b)` share a byte (computed in 128 bits: never overflows).
fn overlap(a: u64, len_a: u64, b: u64, len_b: u64) -> bool {
    let (a, len_a, b, len_b) = (
        u128::from(a),
        u128::from(len_a),
        u128::from(b),
        u128::from(len_b),
    );
    a < b + len_b && b < a + len_a
}

/// Whether a region list is acceptable, by the rules of docs/protocol.md: 1 to `MAX_REGIONS`
/// regions, known flags, non-empty, every address, size and offset a multiple of the region's
/// page size, nothing past 2^64 (nor a size past `usize`), no two regions sharing a GPA, and
/// regions of one non-zero memfd group disjoint in the file with the same page size.
pub fn regions_are_valid(regions: &[RegionSpec]) -> bool {
    if regions.is_empty() || regions.len() > MAX_REGIONS {
        return false;
    }
    let limit = u128::from(u64::MAX);
    for r in regions {
        let ps = page_size(r);
        let ends = [r.gpa(), r.source_offset(), r.file_offset()]
            .map(|start| u128::from(start) + u128::from(r.size()));
        if r.flags.get() & !REGION_FLAGS != 0
            || r.size() == 0
            || [r.gpa(), r.size(), r.source_offset(), r.file_offset()]
                .iter()
                .any(|v| !v.is_multiple_of(ps))
            || ends.iter().any(|&e| e > limit)
            || usize::try_from(r.size()).is_err()
        {
            return false;
        }
    }
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            if overlap(a.gpa(), a.size(), b.gpa(), b.size()) {
                return false;
            }
            let shared = a.memfd_group() != 0 && a.memfd_group() == b.memfd_group();
            if shared
                && (page_size(a) != page_size(b)
                    || overlap(a.file_offset(), a.size(), b.file_offset(), b.size()))
            {
                return false;
            }
        }
    }
    true
}
