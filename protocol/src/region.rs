//! Guest memory regions as described on the wire, and their validation.

use crate::{MAX_REGIONS, PAGE_SIZE};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Region flag: the region can hold private memory; the VMM creates its guest_memfd and sends
/// it with `CreateVm` (only for VM types with private memory).
pub const REGION_PRIVATE: u32 = 1;
/// Region flag: the region is backed by 2 MiB huge pages (a hugetlb memfd, or for
/// `VM_MEMORY_IN_VMM` the VMM's `MAP_HUGETLB` mapping). Its address, size and offsets are
/// multiples of [`HUGE_PAGE_SIZE`] and pages are installed 2 MiB at a time. Needs
/// `features::HUGE_PAGES`.
pub const REGION_HUGE_2M: u32 = 2;
/// Every region flag this version knows.
pub const REGION_FLAGS: u32 = REGION_PRIVATE | REGION_HUGE_2M;
/// The page size of [`REGION_HUGE_2M`] regions.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// One region of guest RAM in `CreateVm` (40 bytes on the wire).
///
/// Each region lives in a memory file (a memfd the daemon creates) at `file_offset`; regions
/// with the same non-zero `memfd_group` share one memfd (cloud-hypervisor maps several slots of
/// a memory zone from one file), group 0 gives the region a memfd of its own. A memfd is sized
/// to the end of the furthest region in it.
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
    /// Offset of the region's first byte in its memfd; page aligned.
    pub file_offset: U64,
    /// Region flags: [`REGION_PRIVATE`], [`REGION_HUGE_2M`].
    pub flags: U32,
    /// `0`: a memfd of its own; otherwise the group of regions sharing one memfd.
    pub memfd_group: U32,
}

impl RegionSpec {
    /// A region at `gpa` of `size` bytes whose content starts at `source_offset` in the source.
    pub fn new(gpa: u64, size: u64, source_offset: u64) -> Self {
        RegionSpec {
            gpa: gpa.into(),
            size: size.into(),
            source_offset: source_offset.into(),
            file_offset: 0.into(),
            flags: 0.into(),
            memfd_group: 0.into(),
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

    /// The same region, backed by 2 MiB huge pages.
    pub fn huge_2m(mut self) -> Self {
        self.flags = (self.flags.get() | REGION_HUGE_2M).into();
        self
    }

    /// Flagged [`REGION_HUGE_2M`].
    pub fn is_huge(&self) -> bool {
        self.flags.get() & REGION_HUGE_2M != 0
    }

    /// The region's page size: [`HUGE_PAGE_SIZE`] or [`PAGE_SIZE`].
    pub fn page_size(&self) -> u64 {
        if self.is_huge() {
            HUGE_PAGE_SIZE
        } else {
            PAGE_SIZE
        }
    }

    /// The same region, placed at `file_offset` of the memfd shared by memfd group `group`
    /// (`0`: a memfd of its own).
    pub fn in_memfd(mut self, group: u32, file_offset: u64) -> Self {
        self.memfd_group = group.into();
        self.file_offset = file_offset.into();
        self
    }

    /// Offset in its memfd.
    pub fn file_offset(&self) -> u64 {
        self.file_offset.get()
    }

    /// Its memfd group (`0`: none).
    pub fn memfd_group(&self) -> u32 {
        self.memfd_group.get()
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
    /// Address, size, source or file offset not a multiple of the region's page size.
    #[error("region {0} is not aligned to its page size")]
    Unaligned(usize),
    /// Two regions of one memfd group overlap in the file, or differ in page size.
    #[error("regions {0} and {1} share a memfd but overlap in it or differ in page size")]
    FileOverlap(usize, usize),
    /// `gpa + size`, `source_offset + size` or `file_offset + size` overflows.
    #[error("region {0} overflows the address space")]
    Overflow(usize),
    /// Two regions share guest physical addresses.
    #[error("regions {0} and {1} overlap")]
    Overlap(usize, usize),
    /// Unknown flag.
    #[error("region {0} has unknown flags")]
    UnknownFlags(usize),
}

/// Checks a region list: non-empty, at most [`MAX_REGIONS`], each aligned to its page size,
/// non-zero, non-overflowing, no unknown flags, no two overlapping in guest physical addresses,
/// and no two of one memfd group overlapping in their file or differing in page size.
pub fn validate_regions(regions: &[RegionSpec]) -> Result<(), RegionError> {
    if regions.is_empty() {
        return Err(RegionError::Empty);
    }
    if regions.len() > MAX_REGIONS {
        return Err(RegionError::TooMany(regions.len()));
    }
    for (i, r) in regions.iter().enumerate() {
        if r.flags.get() & !REGION_FLAGS != 0 {
            return Err(RegionError::UnknownFlags(i));
        }
        if r.size() == 0 {
            return Err(RegionError::ZeroSize(i));
        }
        if (r.gpa() | r.size() | r.source_offset() | r.file_offset()) % r.page_size() != 0 {
            return Err(RegionError::Unaligned(i));
        }
        if r.gpa().checked_add(r.size()).is_none()
            || r.source_offset().checked_add(r.size()).is_none()
            || r.file_offset().checked_add(r.size()).is_none()
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
    // Regions sharing a memfd: same page size, disjoint file ranges (overflow excluded above).
    for (i, a) in regions.iter().enumerate() {
        for (j, b) in regions.iter().enumerate().skip(i + 1) {
            if a.memfd_group() == 0 || a.memfd_group() != b.memfd_group() {
                continue;
            }
            let disjoint = a.file_offset() + a.size() <= b.file_offset()
                || b.file_offset() + b.size() <= a.file_offset();
            if !disjoint || a.page_size() != b.page_size() {
                return Err(RegionError::FileOverlap(i, j));
            }
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
    fn regions_may_share_a_memfd_at_disjoint_offsets() {
        // A zone split around a hole: one file, two slots.
        let low = RegionSpec::new(0, 3 * M, 0).in_memfd(1, 0);
        let high = RegionSpec::new(4 << 30, M, 3 * M).in_memfd(1, 3 * M);
        assert_eq!(validate_regions(&[low, high]), Ok(()));
        let clash = RegionSpec::new(4 << 30, M, 3 * M).in_memfd(1, 2 * M);
        assert_eq!(
            validate_regions(&[low, clash]),
            Err(RegionError::FileOverlap(0, 1))
        );
        // Another group, or none, may use the same offsets.
        let other = RegionSpec::new(4 << 30, M, 3 * M).in_memfd(2, 0);
        assert_eq!(validate_regions(&[low, other]), Ok(()));
        let huge = RegionSpec::new(4 << 30, 2 * M, 0)
            .huge_2m()
            .in_memfd(1, 4 * M);
        assert_eq!(
            validate_regions(&[low, huge]),
            Err(RegionError::FileOverlap(0, 1))
        );
        assert_eq!(huge.page_size(), HUGE_PAGE_SIZE);
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
        flagged.flags = 4.into();
        assert_eq!(
            validate_regions(&[flagged]),
            Err(RegionError::UnknownFlags(0))
        );
        assert_eq!(
            validate_regions(&[RegionSpec::new(0, 4096, 0).huge_2m()]),
            Err(RegionError::Unaligned(0))
        );
        assert_eq!(
            validate_regions(&[RegionSpec::new(2 * M, 2 * M, 0).huge_2m().in_memfd(0, 4096)]),
            Err(RegionError::Unaligned(0))
        );
        let many = vec![RegionSpec::new(0, 4096, 0); MAX_REGIONS + 1];
        assert_eq!(
            validate_regions(&many),
            Err(RegionError::TooMany(MAX_REGIONS + 1))
        );
    }
}
