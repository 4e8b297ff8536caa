//! Guest memory the daemon serves: the sealed memfds it owns (one per region, or one shared by a
//! memfd group), the daemon's own shared mapping of each region, and the per-region page-state
//! table. For `VM_MEMORY_IN_VMM` VMs (Firecracker) the memory is the VMM's own private
//! mapping: only the page state is kept here.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vmpager_protocol::mapping::SharedMapping;
use vmpager_protocol::{RegionSpec, PAGE_SIZE};

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd creation, sizing or sealing failed.
    #[error("cannot create the memfd of region {region}")]
    Memfd {
        /// Region index.
        region: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Mapping the memfd into the daemon failed.
    #[error("cannot map region {region}")]
    Map {
        /// Region index.
        region: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

impl MemoryError {
    /// Out of a resource (memory, fds, address space): the request may succeed later.
    pub fn is_retryable(&self) -> bool {
        true
    }
}

/// One region: its spec, its page state and, unless the memory is the VMM's own, the memfd it
/// lives in and the daemon's mapping of it.
#[derive(Debug)]
pub struct Region {
    /// As requested in `CreateVm`.
    pub spec: RegionSpec,
    /// Page state (one bit per page of the region's page size), shared by fault serving and
    /// conversions.
    pub state: PageState,
    /// `None`: the VMM's own private memory (`VM_MEMORY_IN_VMM`), which the daemon never maps.
    backing: Option<Backing>,
    gmem: Option<File>,
}

/// A region's memory file and the daemon's mapping of the region's window of it.
#[derive(Debug)]
struct Backing {
    /// The memfd; regions of one memfd group share it.
    memfd: Arc<File>,
    /// The daemon's own shared mapping of `[file_offset, file_offset + size)`.
    mapping: SharedMapping,
}

impl Region {
    /// The memfd the region lives in (sent to the VMM), unless the memory is the VMM's own.
    pub fn memfd(&self) -> Option<BorrowedFd<'_>> {
        self.backing.as_ref().map(|b| b.memfd.as_fd())
    }

    /// Whether the daemon owns (and maps) this region's memory.
    pub fn is_owned(&self) -> bool {
        self.backing.is_some()
    }

    /// The region's guest_memfd (private memory), if it has one.
    pub fn guest_memfd(&self) -> Option<BorrowedFd<'_>> {
        self.gmem.as_ref().map(|f| f.as_fd())
    }

    /// The guest_memfd as a file (hole punching on conversion to shared).
    pub fn gmem_file(&self) -> Option<&File> {
        self.gmem.as_ref()
    }

    /// Frees `[offset, offset + len)` of the region's memfd (conversion to private): the
    /// shared side's pages are gone and read as zeros. A no-op for the VMM's own memory.
    pub fn punch_shared(&self, offset: u64, len: u64) -> io::Result<()> {
        match &self.backing {
            Some(b) => {
                crate::guest_memfd::punch_hole(&b.memfd, self.spec.file_offset() + offset, len)
            }
            None => Ok(()),
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.spec.size()
    }

    /// The region's page size (4 KiB, or 2 MiB for huge-page regions).
    pub fn page_size(&self) -> u64 {
        self.spec.page_size()
    }

    /// Number of pages of the region's page size.
    pub fn pages(&self) -> usize {
        (self.spec.size() / self.page_size()) as usize
    }

    /// For each page of `pages` (4 KiB page indices of this region), whether it is in the
    /// memfd's page cache: one `mincore` for the whole range into `out` (resized to fit). Pages
    /// outside the region, and every page of the VMM's own memory, read as resident (the
    /// safe answer for a caller about to overwrite).
    pub fn residency(&self, pages: std::ops::Range<usize>, out: &mut Vec<u8>) {
        out.clear();
        out.resize(pages.len(), 1);
        let Some(b) = &self.backing else {
            return;
        };
        let end = pages.end.min((self.size() / PAGE_SIZE) as usize);
        if pages.start >= end {
            return;
        }
        // SAFETY: `[start, end)` pages lie inside the live mapping (`end` is clamped to the
        // region's 4 KiB pages), and `out` holds at least one byte per page of that range,
        // which is all mincore writes.
        let rc = unsafe {
            libc::mincore(
                b.mapping
                    .as_ptr()
                    .as_ptr()
                    .add(pages.start * PAGE_SIZE as usize)
                    .cast(),
                (end - pages.start) * PAGE_SIZE as usize,
                out.as_mut_ptr(),
            )
        };
        if rc != 0 {
            out.fill(1);
        }
    }

    /// Whether the page at `offset` is in the memfd's page cache (`mincore` on the daemon's
    /// mapping). False for offsets outside the region and for the VMM's own memory.
    pub fn is_resident(&self, offset: u64) -> bool {
        let Some(b) = &self.backing else {
            return false;
        };
        if offset >= b.mapping.len() as u64 {
            return false;
        }
        let page = offset & !(PAGE_SIZE - 1);
        let mut vec = 0u8;
        // SAFETY: `[ptr + page, ptr + page + PAGE_SIZE)` lies inside the live mapping (checked
        // above, the length is a multiple of the page size); mincore writes one byte to `vec`.
        let rc = unsafe {
            libc::mincore(
                b.mapping.as_ptr().as_ptr().add(page as usize).cast(),
                PAGE_SIZE as usize,
                &mut vec,
            )
        };
        rc == 0 && vec & 1 != 0
    }

    /// A writable view of `len` bytes at `offset` of the daemon's mapping, for a page source to
    /// fill. `None` if the range is outside the region or the memory is the VMM's own.
    pub fn page_dst(&self, offset: u64, len: usize) -> Option<PageDst<'_>> {
        let b = self.backing.as_ref()?;
        let end = offset.checked_add(len as u64)?;
        if end > b.mapping.len() as u64 {
            return None;
        }
        // SAFETY: `offset + len <= mapping.len` was checked above, so the pointer stays inside the
        // live mapping, which `PageDst`'s lifetime ties to `self`.
        let ptr = unsafe { b.mapping.as_ptr().as_ptr().add(offset as usize) };
        Some(PageDst {
            ptr,
            len,
            _lifetime: std::marker::PhantomData,
        })
    }
}

/// A destination for page data: either a daemon buffer or a window of the daemon's mapping of
/// guest memory. Only the kernel (`pread`) and `fill_zero` write through it: guest memory is
/// shared with another process, so no Rust reference to it is ever formed.
pub struct PageDst<'a> {
    ptr: *mut u8,
    len: usize,
    _lifetime: std::marker::PhantomData<&'a mut [u8]>,
}

impl<'a> PageDst<'a> {
    /// A destination backed by an ordinary buffer.
    pub fn from_buf(buf: &'a mut [u8]) -> PageDst<'a> {
        PageDst {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _lifetime: std::marker::PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false for a page; here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `pread` from `fd` at `offset` into `[at, len)` of this destination; returns bytes read
    /// (0 at end of file).
    pub fn pread_at(&mut self, at: usize, fd: BorrowedFd<'_>, offset: u64) -> io::Result<usize> {
        let Some(room) = self.len.checked_sub(at) else {
            return Ok(0);
        };
        loop {
            // SAFETY: `[ptr + at, ptr + len)` is valid for writes for the lifetime `'a` (a
            // borrowed buffer, or a checked window of a live mapping), and `at <= len`.
            let n = unsafe {
                libc::pread(
                    fd_raw(fd),
                    self.ptr.add(at).cast(),
                    room,
                    offset as libc::off_t,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Zero `[at, len)`.
    pub fn fill_zero(&mut self, at: usize) {
        if at < self.len {
            // SAFETY: as in `pread_at`: the range is valid for writes and `at < len`.
            unsafe { std::ptr::write_bytes(self.ptr.add(at), 0, self.len - at) };
        }
    }
}

fn fd_raw(fd: BorrowedFd<'_>) -> i32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

/// A sealed memfd of `len` bytes (hugetlb 2 MiB pages with `huge`).
fn create_memfd(name: &str, len: u64, huge: bool) -> io::Result<File> {
    let mut opts = memfd::MemfdOptions::default()
        .close_on_exec(true)
        .allow_sealing(true);
    if huge {
        opts = opts.hugetlb(Some(memfd::HugetlbSize::Huge2MB));
    }
    let memfd = opts.create(name).map_err(io::Error::other)?;
    memfd.as_file().set_len(len)?;
    memfd
        .add_seals(&[
            memfd::FileSeal::SealGrow,
            memfd::FileSeal::SealShrink,
            memfd::FileSeal::SealSeal,
        ])
        .map_err(io::Error::other)?;
    Ok(memfd.into_file())
}

/// All of one VM's guest memory.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<Region>,
}

impl GuestMemory {
    /// Creates the memory files (one per region, or one per memfd group; hugetlb for 2 MiB
    /// regions; sized to their furthest region, sealed against grow/shrink and further sealing)
    /// and maps each region's window into the daemon; `gmems[i]` is region `i`'s guest_memfd,
    /// if it has one (the VMM creates them). With `in_vmm`, the memory is the VMM's own: no
    /// file is created. `regions` must have passed `validate_regions`.
    pub fn new(
        vm_id: u64,
        regions: &[RegionSpec],
        gmems: Vec<Option<File>>,
        in_vmm: bool,
    ) -> Result<GuestMemory, MemoryError> {
        let mut gmems = gmems.into_iter();
        // Memfd of each region: its own, or the first of its group's.
        let mut files: Vec<Option<Arc<File>>> = vec![None; regions.len()];
        if !in_vmm {
            for (i, spec) in regions.iter().enumerate() {
                if files[i].is_some() {
                    continue;
                }
                let group = spec.memfd_group();
                let members: Vec<usize> = match group {
                    0 => vec![i],
                    g => (i..regions.len())
                        .filter(|&j| regions[j].memfd_group() == g)
                        .collect(),
                };
                let len = members
                    .iter()
                    .map(|&j| regions[j].file_offset() + regions[j].size())
                    .max()
                    .unwrap_or(0);
                let name = match group {
                    0 => format!("vmpager-vm{vm_id}-r{i}"),
                    g => format!("vmpager-vm{vm_id}-g{g}"),
                };
                let file = Arc::new(
                    create_memfd(&name, len, spec.is_huge())
                        .map_err(|source| MemoryError::Memfd { region: i, source })?,
                );
                for j in members {
                    files[j] = Some(file.clone());
                }
            }
        }
        let mut out = Vec::with_capacity(regions.len());
        for (i, (spec, file)) in regions.iter().zip(files).enumerate() {
            let backing = match file {
                None => None,
                Some(memfd) => {
                    // The size fits in usize: validate_regions checked it.
                    let mapping = SharedMapping::new_at(
                        memfd.as_fd(),
                        spec.file_offset(),
                        spec.size() as usize,
                    )
                    .map_err(|source| MemoryError::Map { region: i, source })?;
                    Some(Backing { memfd, mapping })
                }
            };
            out.push(Region {
                spec: *spec,
                state: PageState::new((spec.size() / spec.page_size()) as usize),
                backing,
                gmem: gmems.next().flatten(),
            });
        }
        Ok(GuestMemory { regions: out })
    }

    /// The regions, in `CreateVm` order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total bytes of guest memory.
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(Region::size).sum()
    }
}

/// Per-region page state: atomic bitmaps shared by the thread serving the VM's uffd and the
/// one serving its exits (conversions). One bit per 4 KiB page in each map.
#[derive(Debug)]
pub struct PageState {
    populated: Vec<AtomicU64>,
    discarded: Vec<AtomicU64>,
    private: Vec<AtomicU64>,
    poisoned: Vec<AtomicU64>,
}

impl PageState {
    /// All pages unpopulated, none discarded, all shared.
    pub fn new(pages: usize) -> PageState {
        let words = pages.div_ceil(64);
        let zeros = || (0..words).map(|_| AtomicU64::new(0)).collect();
        PageState {
            populated: zeros(),
            discarded: zeros(),
            private: zeros(),
            poisoned: zeros(),
        }
    }

    fn get(bits: &[AtomicU64], page: usize) -> bool {
        bits.get(page / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    fn set(bits: &[AtomicU64], page: usize, on: bool) {
        if let Some(w) = bits.get(page / 64) {
            if on {
                w.fetch_or(1 << (page % 64), Ordering::AcqRel);
            } else {
                w.fetch_and(!(1 << (page % 64)), Ordering::AcqRel);
            }
        }
    }

    /// The page has been installed since it was last discarded.
    pub fn is_populated(&self, page: usize) -> bool {
        Self::get(&self.populated, page)
    }

    /// The page's source content was discarded (its next fill is zeros).
    pub fn is_discarded(&self, page: usize) -> bool {
        Self::get(&self.discarded, page)
    }

    /// The page is private (KVM's notion: its memory is in the guest_memfd).
    pub fn is_private(&self, page: usize) -> bool {
        Self::get(&self.private, page)
    }

    /// Neither installed, nor removed, nor private: its content is still the source's, and
    /// readahead may install it.
    pub fn is_untouched(&self, page: usize) -> bool {
        !self.is_populated(page) && !self.is_discarded(page) && !self.is_private(page)
    }

    /// Records that `page` was installed.
    pub fn mark_populated(&self, page: usize) {
        Self::set(&self.populated, page, true);
    }

    /// Records that pages `[first, end)` were removed: not populated any more, and never to be
    /// filled from the source again.
    pub fn discard(&self, first: usize, end: usize) {
        for p in first..end {
            Self::set(&self.populated, p, false);
            Self::set(&self.discarded, p, true);
        }
    }

    /// Marks pages `[first, end)` private or shared.
    pub fn set_private(&self, first: usize, end: usize, private: bool) {
        for p in first..end {
            Self::set(&self.private, p, private);
        }
    }

    /// Records that the VMM's mapping of `page` got a poison marker (a shared-side touch of a
    /// private page).
    pub fn mark_poisoned(&self, page: usize) {
        Self::set(&self.poisoned, page, true);
    }

    /// Whether any page of `[first, end)` got a poison marker since the last call for it;
    /// clears them.
    pub fn take_poisoned(&self, first: usize, end: usize) -> bool {
        let mut any = false;
        for p in first..end {
            if Self::get(&self.poisoned, p) {
                Self::set(&self.poisoned, p, false);
                any = true;
            }
        }
        any
    }

    /// Number of populated pages.
    pub fn populated_count(&self) -> usize {
        Self::count(&self.populated)
    }

    /// Number of private pages.
    pub fn private_count(&self) -> usize {
        Self::count(&self.private)
    }

    fn count(bits: &[AtomicU64]) -> usize {
        bits.iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as usize)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_state_tracks_populate_and_discard() {
        let s = PageState::new(130);
        assert!(!s.is_populated(129));
        s.mark_populated(129);
        s.mark_populated(3);
        assert!(s.is_populated(129) && s.is_populated(3));
        assert_eq!(s.populated_count(), 2);
        s.discard(2, 5);
        assert!(!s.is_populated(3) && s.is_discarded(3) && s.is_discarded(4));
        assert!(!s.is_discarded(5));
        assert_eq!(s.populated_count(), 1);
        // Out of range is ignored, never a panic.
        s.mark_populated(10_000);
        assert!(!s.is_populated(10_000));
        s.set_private(0, 3, true);
        assert!(s.is_private(2) && !s.is_private(3));
        assert_eq!(s.private_count(), 3);
    }

    #[test]
    fn memory_is_sealed_sized_and_mapped() {
        let regions = [
            RegionSpec::new(0, 1 << 20, 0),
            RegionSpec::new(1 << 30, 8192, 0),
        ];
        let mem = GuestMemory::new(1, &regions, vec![], false).unwrap();
        assert_eq!(mem.total_size(), (1 << 20) + 8192);
        let r = &mem.regions()[1];
        let fd = r.memfd().unwrap();
        assert_eq!(rustix::fs::fstat(fd).unwrap().st_size, 8192);
        let seals = rustix::fs::fcntl_get_seals(fd).unwrap();
        assert!(seals.contains(rustix::fs::SealFlags::GROW | rustix::fs::SealFlags::SHRINK));
        assert!(r.page_dst(8192, 1).is_none());
        let mut dst = r.page_dst(4096, 4096).unwrap();
        dst.fill_zero(0);
        let (rd, wr) = rustix::pipe::pipe().unwrap();
        rustix::io::write(&wr, b"hello").unwrap();
        drop(wr);
        // A pipe cannot pread; a file can.
        assert!(dst.pread_at(0, rd.as_fd(), 0).is_err());
        let f = tempfile_with(b"snapshot");
        assert_eq!(dst.pread_at(0, f.as_fd(), 0).unwrap(), 8);
        let mut back = [0u8; 8];
        rustix::io::pread(fd, &mut back, 4096).unwrap();
        assert_eq!(&back, b"snapshot");
    }

    #[test]
    fn a_memfd_group_is_one_file_and_each_region_maps_its_window() {
        let m = 1u64 << 20;
        let regions = [
            RegionSpec::new(0, m, 0).in_memfd(7, 0),
            RegionSpec::new(1 << 32, 2 * m, m).in_memfd(7, 3 * m),
            RegionSpec::new(1 << 33, m, 0),
        ];
        let mem = GuestMemory::new(2, &regions, vec![], false).unwrap();
        let [a, b, c] = mem.regions() else {
            panic!("three regions")
        };
        let ino = |r: &Region| rustix::fs::fstat(r.memfd().unwrap()).unwrap().st_ino;
        assert_eq!(ino(a), ino(b));
        assert_ne!(ino(a), ino(c));
        assert_eq!(
            rustix::fs::fstat(a.memfd().unwrap()).unwrap().st_size as u64,
            5 * m,
            "sized to the furthest region of the group"
        );
        // Region b's page 1 is file offset 3 MiB + 4 KiB.
        let f = tempfile_with(b"window");
        b.page_dst(4096, 4096)
            .unwrap()
            .pread_at(0, f.as_fd(), 0)
            .unwrap();
        let mut back = [0u8; 6];
        rustix::io::pread(a.memfd().unwrap(), &mut back, 3 * m + 4096).unwrap();
        assert_eq!(&back, b"window");
        assert!(b.is_resident(4096) && !b.is_resident(0));
    }

    #[test]
    fn the_vmms_own_memory_has_no_file_and_reads_as_resident() {
        let regions = [RegionSpec::new(0, 1 << 21, 0).huge_2m()];
        let mem = GuestMemory::new(3, &regions, vec![], true).unwrap();
        let r = &mem.regions()[0];
        assert!(r.memfd().is_none() && !r.is_owned());
        assert_eq!((r.page_size(), r.pages()), (2 << 20, 1));
        assert!(r.page_dst(0, 4096).is_none());
        let mut out = Vec::new();
        r.residency(0..4, &mut out);
        assert_eq!(out, vec![1; 4]);
        r.punch_shared(0, 4096).unwrap();
    }

    fn tempfile_with(bytes: &[u8]) -> File {
        let f = memfd::MemfdOptions::default()
            .create("t")
            .unwrap()
            .into_file();
        rustix::io::pwrite(&f, bytes, 0).unwrap();
        f
    }
}
