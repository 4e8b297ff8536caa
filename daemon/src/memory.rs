//! Guest memory the daemon serves: the sealed memfds it owns (one per region, or one shared by a
//! memfd group), the daemon's own shared mapping of each region, and the per-region page-state
//! table (in the VM's state file, `page_state`). For `VM_MEMORY_IN_VMM` VMs (Firecracker) the
//! memory is the VMM's own private mapping: only the page state is kept here.
//!
//! The daemon never writes guest memory through its mappings: it installs whole pages with
//! `UFFDIO_COPY` through a userfaultfd of its own registered on them ([`Region::install`]), so
//! a page is in the memfd whole or not at all. Nobody — the VMM mapping it without a fault, a
//! VMM that maps what the daemon put there, a daemon restarted after a crash — ever sees a
//! half-written page.

pub use crate::page_state::PageState;
use crate::page_state::{StateError, StateFile};
use crate::uffd::{Uffd, UffdError};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
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
    /// The daemon's own userfaultfd (for atomic installs) could not be set up.
    #[error("cannot register the daemon's mapping of region {region} for atomic installs")]
    Installer {
        /// Region index.
        region: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The page-state file could not be created or adopted.
    #[error("cannot set up the page-state table")]
    State(#[from] StateError),
    /// A memfd handed back after a restart is not what the region needs.
    #[error("region {region}: {why}")]
    Adopt {
        /// Region index.
        region: usize,
        /// What is wrong.
        why: String,
    },
}

impl MemoryError {
    /// Out of a resource (memory, fds, address space): the request may succeed later.
    pub fn is_retryable(&self) -> bool {
        !self.is_bad_input()
    }

    /// The peer handed over memory that cannot be this VM's.
    pub fn is_bad_input(&self) -> bool {
        match self {
            MemoryError::Adopt { .. } => true,
            MemoryError::State(e) => e.is_bad_input(),
            _ => false,
        }
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
    /// The daemon's own shared mapping of `[file_offset, file_offset + size)`, registered for
    /// missing faults on `installer`.
    mapping: SharedMapping,
    /// The VM's own userfaultfd: installs pages into `mapping` atomically.
    installer: Arc<Uffd>,
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

    /// Puts `src` (whole pages of the region's page size) into the memfd at `offset` of the
    /// region, each page appearing whole or not at all, and never over a page that is there
    /// already. Returns the bytes installed from the start: fewer than `src.len()` when it
    /// stopped at a page already present. Errors for the VMM's own memory and out-of-range
    /// offsets.
    pub fn install(&self, offset: u64, src: &[u8]) -> Result<u64, UffdError> {
        let b = self.installable(offset, src.len() as u64)?;
        let dst = b.mapping.as_ptr().as_ptr() as u64 + offset;
        match b.installer.copy_ahead(dst, src) {
            Ok(()) => Ok(src.len() as u64),
            Err(UffdError::Exists) => Ok(0),
            Err(UffdError::Partial { bytes }) => Ok(bytes),
            Err(e) => Err(e),
        }
    }

    /// As [`Region::install`], with zero pages; `scratch` (at least `len` bytes) is used for
    /// huge pages, which have no shared zero page.
    pub fn install_zeros(
        &self,
        offset: u64,
        len: u64,
        scratch: &mut [u8],
    ) -> Result<u64, UffdError> {
        if self.page_size() != PAGE_SIZE {
            let zeros = scratch
                .get_mut(..len as usize)
                .ok_or(UffdError::Failed(rustix::io::Errno::NOBUFS))?;
            zeros.fill(0);
            return self.install(offset, zeros);
        }
        let b = self.installable(offset, len)?;
        let dst = b.mapping.as_ptr().as_ptr() as u64 + offset;
        match b.installer.zeropage(dst, len) {
            Ok(()) => Ok(len),
            Err(UffdError::Exists) => Ok(0),
            Err(UffdError::Partial { bytes }) => Ok(bytes),
            Err(e) => Err(e),
        }
    }

    fn installable(&self, offset: u64, len: u64) -> Result<&Backing, UffdError> {
        let inval = UffdError::Failed(rustix::io::Errno::INVAL);
        let b = self.backing.as_ref().ok_or(inval)?;
        let end = offset.checked_add(len).ok_or(inval)?;
        let ps = self.page_size();
        if end > b.mapping.len() as u64 || !offset.is_multiple_of(ps) || !len.is_multiple_of(ps) {
            return Err(inval);
        }
        Ok(b)
    }
}

/// A destination for page data: a daemon buffer that a page source fills (then installed with
/// an ioctl). Only the kernel (`pread`) and `fill_zero` write through it.
pub struct PageDst<'a> {
    ptr: *mut u8,
    len: usize,
    _lifetime: std::marker::PhantomData<&'a mut [u8]>,
}

impl<'a> PageDst<'a> {
    /// A destination backed by an ordinary buffer (the only kind there is).
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
            // borrowed buffer), and `at <= len`.
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
    state: StateFile,
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
        let state = StateFile::create(vm_id, &page_counts(regions))?;
        Self::assemble(regions, files, gmems, state, false)
    }

    /// Takes back the memory of VM `vm_id` that a VMM kept while no daemon served it (after a
    /// daemon restart): `memfds[i]` is region `i`'s memfd as `VmCreated` gave it (none for the
    /// VMM's own memory), `state` the page-state file. Each memfd must be a memfd sealed
    /// against resizing (the daemon maps it), large enough, of the region's page size, and the
    /// regions of one memfd group must share one file.
    pub fn adopt(
        vm_id: u64,
        regions: &[RegionSpec],
        memfds: Vec<File>,
        gmems: Vec<Option<File>>,
        state: File,
        in_vmm: bool,
    ) -> Result<GuestMemory, MemoryError> {
        let bad = |region: usize, why: String| MemoryError::Adopt { region, why };
        let mut files: Vec<Option<Arc<File>>> = vec![None; regions.len()];
        if !in_vmm {
            if memfds.len() != regions.len() {
                return Err(bad(
                    0,
                    format!("{} memfds for {} regions", memfds.len(), regions.len()),
                ));
            }
            let mut groups: Vec<(u32, (u64, u64), Arc<File>)> = Vec::new();
            for (i, (spec, file)) in regions.iter().zip(memfds).enumerate() {
                check_adopted_memfd(&file, spec).map_err(|why| bad(i, why))?;
                let st = rustix::fs::fstat(&file).map_err(|e| bad(i, e.to_string()))?;
                let id = (st.st_dev, st.st_ino);
                let g = spec.memfd_group();
                let shared = groups.iter().find(|(gg, _, _)| g != 0 && *gg == g);
                files[i] = Some(match shared {
                    Some((_, gid, f)) if *gid == id => f.clone(),
                    Some(_) => return Err(bad(i, format!("not the memfd of group {g}"))),
                    None => {
                        let f = Arc::new(file);
                        groups.push((g, id, f.clone()));
                        f
                    }
                });
            }
        }
        let state = StateFile::adopt(state, vm_id, &page_counts(regions))?;
        Self::assemble(regions, files, gmems, state, true)
    }

    /// Maps each region's window of its memfd (`files[i]`, `None` for the VMM's own memory),
    /// registers the mappings for atomic installs, and gives each region its table of `state`
    /// (`adopted`: kept by a previous daemon).
    pub(crate) fn assemble(
        regions: &[RegionSpec],
        files: Vec<Option<Arc<File>>>,
        gmems: Vec<Option<File>>,
        state: StateFile,
        adopted: bool,
    ) -> Result<GuestMemory, MemoryError> {
        let mut gmems = gmems.into_iter();
        let installer = match files.iter().any(Option::is_some) {
            false => None,
            true => Some(Arc::new(
                Uffd::create_own(regions.iter().any(RegionSpec::is_huge)).map_err(|e| {
                    MemoryError::Installer {
                        region: 0,
                        source: e.into(),
                    }
                })?,
            )),
        };
        let mut out = Vec::with_capacity(regions.len());
        for (i, (spec, file)) in regions.iter().zip(files).enumerate() {
            let backing = match (file, &installer) {
                (Some(memfd), Some(installer)) => {
                    // The size fits in usize: validate_regions checked it.
                    let mapping = SharedMapping::new_at(
                        memfd.as_fd(),
                        spec.file_offset(),
                        spec.size() as usize,
                    )
                    .map_err(|source| MemoryError::Map { region: i, source })?;
                    installer
                        .register_missing(mapping.as_ptr().as_ptr() as u64, spec.size())
                        .map_err(|e| MemoryError::Installer {
                            region: i,
                            source: io::Error::other(e),
                        })?;
                    Some(Backing {
                        memfd,
                        mapping,
                        installer: installer.clone(),
                    })
                }
                _ => None,
            };
            let table = state
                .table(i)
                .ok_or(MemoryError::State(StateError::Mismatch(format!(
                    "no table for region {i}"
                ))))?;
            out.push(Region {
                spec: *spec,
                state: PageState::new(table, adopted),
                backing,
                gmem: gmems.next().flatten(),
            });
        }
        Ok(GuestMemory {
            regions: out,
            state,
        })
    }

    /// The regions, in `CreateVm` order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total bytes of guest memory.
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(Region::size).sum()
    }

    /// The page-state file (the VMM keeps a copy, and hands it back to a restarted daemon).
    pub fn state_file(&self) -> BorrowedFd<'_> {
        self.state.fd()
    }
}

/// Checks a memfd a VMM handed back for `spec`: a memfd, sealed against resizing (the daemon
/// maps it: a shrink would fault the daemon), large enough, and hugetlb exactly for 2 MiB
/// regions.
fn check_adopted_memfd(file: &File, spec: &RegionSpec) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let link = rustix::fs::readlinkat(
        rustix::fs::CWD,
        format!("/proc/self/fd/{}", file.as_raw_fd()),
        Vec::new(),
    )
    .map_err(|e| e.to_string())?;
    if !link.to_string_lossy().starts_with("/memfd:") {
        return Err("not a memfd".into());
    }
    let seals = rustix::fs::fcntl_get_seals(file).map_err(|e| e.to_string())?;
    if !seals.contains(rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW) {
        return Err("the memfd is not sealed against resizing".into());
    }
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let need = spec.file_offset().saturating_add(spec.size());
    if len < need {
        return Err(format!(
            "the memfd has {len} bytes, the region needs {need}"
        ));
    }
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    let fs = rustix::fs::fstatfs(file).map_err(|e| e.to_string())?;
    if (fs.f_type as i64 == HUGETLBFS_MAGIC) != spec.is_huge() {
        return Err("the memfd's page size is not the region's".into());
    }
    Ok(())
}

/// Pages (of each region's page size) of each region.
pub fn page_counts(regions: &[RegionSpec]) -> Vec<usize> {
    regions
        .iter()
        .map(|r| (r.size() / r.page_size()) as usize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(r.install(8192, &[0; 4096]).is_err(), "outside the region");
        assert!(r.install(100, &[0; 4096]).is_err(), "not page aligned");
        let mut page = vec![0u8; 4096];
        let (rd, wr) = rustix::pipe::pipe().unwrap();
        rustix::io::write(&wr, b"hello").unwrap();
        drop(wr);
        // A pipe cannot pread; a file can.
        let mut dst = PageDst::from_buf(&mut page);
        assert!(dst.pread_at(0, rd.as_fd(), 0).is_err());
        let f = tempfile_with(b"snapshot");
        assert_eq!(dst.pread_at(0, f.as_fd(), 0).unwrap(), 8);
        assert_eq!(r.install(4096, &page).unwrap(), 4096);
        let mut back = [0u8; 8];
        rustix::io::pread(fd, &mut back, 4096).unwrap();
        assert_eq!(&back, b"snapshot");
        // Never over a page that is there: the second install stops at once, and so does a
        // run that starts before it.
        assert_eq!(r.install(4096, &[7; 4096]).unwrap(), 0);
        assert_eq!(r.install(0, &[7; 8192]).unwrap(), 4096);
        rustix::io::pread(fd, &mut back, 4096).unwrap();
        assert_eq!(&back, b"snapshot");
        let mut scratch = [];
        assert_eq!(
            mem.regions()[0]
                .install_zeros(0, 8192, &mut scratch)
                .unwrap(),
            8192
        );
        assert!(mem.regions()[0].is_resident(4096));
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
        let mut full = b"window".to_vec();
        full.resize(4096, 0);
        assert_eq!(b.install(4096, &full).unwrap(), 4096);
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
        assert!(r.install(0, &[0; 4096]).is_err());
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
