//! Guest memory regions as described on the wire, and their validation.

use crate::{MAX_REGIONS, PAGE_SIZE};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Region flag: the region can hold private memory; the VMM creates its guest_memfd and sends
/// it with `CreateVm` (only for VM types with private memory).
pub const REGION_PRIVATE: u32 = 1;

/// One region of guest RAM in `CreateVm` (32 bytes on the wire).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct RegionSpec {
    /// Guest physical address of the first byte; page aligned.
    pub gpa: U64,
    /// Size in bytes; non-zero, page aligned.
    pub size: U64,
    /// Offset of the region's first byte in the page source (the snapshot image); page aligned.
    pub source_offset: U64,
    /// Region flags: [`REGION_PRIVATE`] or `0`.
    pub flags: U32,
    /// Reserved, must be `0`.
    pub reserved: U32,
}

impl RegionSpec {
    /// A region at `gpa` of `size` bytes whose content starts at `source_offset` in the source.
    pub fn new(gpa: u64, size: u64, source_offset: u64) -> Self {
        RegionSpec {
            gpa: gpa.into(),
            size: size.into(),
            source_offset: source_offset.into(),
            flags: 0.into(),
            reserved: 0.into(),
        }
    }

    /// Guest physical address.
    pub fn gpa(&self) -> u64 {
        self.gpa.get()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size.get()
    }

    /// Offset in the page source.
    pub fn source_offset(&self) -> u64 {
        self.source_offset.get()
    }

    /// The same region, able to hold private memory.
    pub fn private(mut self) -> Self {
        self.flags = REGION_PRIVATE.into();
        self
    }

    /// Flagged [`REGION_PRIVATE`].
    pub fn is_private(&self) -> bool {
        self.flags.get() & REGION_PRIVATE != 0
    }
}

/// Why a set of regions was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// No region at all.
    #[error("a VM needs at least one region")]
    Empty,
    /// More than [`MAX_REGIONS`].
    #[error("{0} regions exceed the limit of {MAX_REGIONS}")]
    TooMany(usize),
    /// A zero-size region.
    #[error("region {0} has size zero")]
    ZeroSize(usize),
    /// Address, size or source offset not page aligned.
    #[error("region {0} is not page aligned")]
    Unaligned(usize),
    /// `gpa + size` or `source_offset + size` overflows.
    #[error("region {0} overflows the address space")]
    Overflow(usize),
    /// Two regions share guest physical addresses.
    #[error("regions {0} and {1} overlap")]
    Overlap(usize, usize),
    /// Unknown flag or non-zero reserved field.
    #[error("region {0} has unknown flags or a non-zero reserved field")]
    UnknownFlags(usize),
}

/// Checks a region list: non-empty, at most [`MAX_REGIONS`], each page aligned, non-zero,
/// non-overflowing, no unknown flags, and no two overlapping.
pub fn validate_regions(regions: &[RegionSpec]) -> Result<(), RegionError> {
    if regions.is_empty() {
        return Err(RegionError::Empty);
    }
    if regions.len() > MAX_REGIONS {
        return Err(RegionError::TooMany(regions.len()));
    }
    for (i, r) in regions.iter().enumerate() {
        if r.flags.get() & !REGION_PRIVATE != 0 || r.reserved.get() != 0 {
            return Err(RegionError::UnknownFlags(i));
        }
        if r.size() == 0 {
            return Err(RegionError::ZeroSize(i));
        }
        if (r.gpa() | r.size() | r.source_offset()) % PAGE_SIZE != 0 {
            return Err(RegionError::Unaligned(i));
        }
        if r.gpa().checked_add(r.size()).is_none()
            || r.source_offset().checked_add(r.size()).is_none()
            || usize::try_from(r.size()).is_err()
        {
            return Err(RegionError::Overflow(i));
        }
    }
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_by_key(|&i| regions[i].gpa());
    for pair in order.windows(2) {
        let (a, b) = (&regions[pair[0]], &regions[pair[1]]);
        // Overflow was excluded above.
        if a.gpa() + a.size() > b.gpa() {
            return Err(RegionError::Overlap(
                pair[0].min(pair[1]),
                pair[0].max(pair[1]),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[test]
    fn accepts_disjoint_aligned_regions() {
        let r = [
            RegionSpec::new(4 << 30, 64 * M, 0),
            RegionSpec::new(M, M, 64 * M),
        ];
        assert_eq!(validate_regions(&r), Ok(()));
    }

    #[test]
    fn refuses_bad_regions() {
        assert_eq!(validate_regions(&[]), Err(RegionError::Empty));
        assert_eq!(
            validate_regions(&[RegionSpec::new(0, 0, 0)]),
            Err(RegionError::ZeroSize(0))
        );
        assert_eq!(
            validate_regions(&[RegionSpec::new(1, 4096, 0)]),
            Err(RegionError::Unaligned(0))
        );
        assert_eq!(
            validate_regions(&[RegionSpec::new(0, 4097, 0)]),
            Err(RegionError::Unaligned(0))
        );
        assert_eq!(
            validate_regions(&[RegionSpec::new(0, 4096, 7)]),
            Err(RegionError::Unaligned(0))
        );
        assert_eq!(
            validate_regions(&[RegionSpec::new(u64::MAX - 4095, 8192, 0)]),
            Err(RegionError::Overflow(0))
        );
        assert_eq!(
            validate_regions(&[
                RegionSpec::new(2 * M, 2 * M, 0),
                RegionSpec::new(0, 3 * M, 0)
            ]),
            Err(RegionError::Overlap(0, 1))
        );
        let mut flagged = RegionSpec::new(0, 4096, 0);
        flagged.flags = 2.into();
        assert_eq!(
            validate_regions(&[flagged]),
            Err(RegionError::UnknownFlags(0))
        );
        let many = vec![RegionSpec::new(0, 4096, 0); MAX_REGIONS + 1];
        assert_eq!(
            validate_regions(&many),
            Err(RegionError::TooMany(MAX_REGIONS + 1))
        );
    }
}
