//! The page-state file: two bits per guest page in a sealed memfd that the daemon creates and
//! maps, and the VMM keeps a copy of. Shared-memory layout only (like the mailbox): the daemon
//! decides what the states mean for serving faults; a VMM whose daemon is away marks the
//! ranges the kernel told it were removed, so a restarted daemon finds them discarded
//! (docs/survival.md).
//!
//! Layout (little-endian u64 words): `magic` (`"VMPGSTAT"`), `version` (1), `vm_id`,
//! `regions`, then one word per region with its page count, then each region's table in
//! region order, 32 pages per word (page `p` in bits `2(p % 32)..2(p % 32)+2` of word
//! `p / 32`):
//!
//! | bits | state | meaning |
//! |---|---|---|
//! | `00` | untouched | its content is still the source's; readahead may install it |
//! | `01` | populated | installed (shared) since it was last discarded |
//! | `10` | discarded | removed (balloon, conversion): its next fill is zeros, never the source |
//! | `11` | private | KVM's notion: its memory is in the guest_memfd |
//!
//! Every bit pattern is a valid table: a peer that scribbles on it can only hurt its own VM.

use crate::mapping::SharedMapping;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The state of one page (two bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Page {
    /// Still the source's content.
    Untouched = 0,
    /// Installed since last discarded.
    Populated = 1,
    /// Removed: the next fill is zeros.
    Discarded = 2,
    /// Private (in the guest_memfd).
    Private = 3,
}

impl Page {
    fn from_bits(b: u64) -> Page {
        match b & 3 {
            0 => Page::Untouched,
            1 => Page::Populated,
            2 => Page::Discarded,
            _ => Page::Private,
        }
    }
}

/// Pages per 64-bit word.
const PER_WORD: usize = 32;
/// `"VMPGSTAT"`, little-endian.
const MAGIC: u64 = u64::from_le_bytes(*b"VMPGSTAT");
/// Layout version of the state file.
const VERSION: u64 = 1;
/// Header words: magic, version, VM id, region count.
const HEADER_WORDS: usize = 4;

/// Errors creating or adopting a state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Creating, sizing, sealing or mapping the memfd failed (out of memory or fds: retry later).
    #[error("cannot set up the page-state file")]
    Io(#[from] io::Error),
    /// An adopted file is not the state file of this VM's memory.
    #[error("the page-state file does not match the VM: {0}")]
    Mismatch(String),
}

impl StateError {
    /// The request may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StateError::Io(_))
    }

    /// The peer handed over something that cannot be right.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, StateError::Mismatch(_))
    }
}

/// A mapped state file: a header, then one table per region.
#[derive(Debug)]
pub struct StateFile {
    file: File,
    map: Arc<SharedMapping>,
    /// Word offset and page count of each region's table.
    tables: Vec<(usize, usize)>,
}

/// Word offset of each region's table, and the file's total words.
fn layout(pages: &[usize]) -> (Vec<(usize, usize)>, usize) {
    let mut at = HEADER_WORDS + pages.len();
    let tables = pages
        .iter()
        .map(|&p| {
            let t = (at, p);
            at += p.div_ceil(PER_WORD);
            t
        })
        .collect();
    (tables, at)
}

impl StateFile {
    /// A new state file for VM `vm_id` whose regions have `pages` pages each (of the region's
    /// page size): every page untouched. Sealed against grow, shrink and further seals.
    pub fn create(vm_id: u64, pages: &[usize]) -> Result<StateFile, StateError> {
        let (tables, words) = layout(pages);
        let fd = rustix::fs::memfd_create(
            format!("vmpager-vm{vm_id}-state"),
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )
        .map_err(io::Error::from)?;
        rustix::fs::ftruncate(&fd, (words * 8) as u64).map_err(io::Error::from)?;
        rustix::fs::fcntl_add_seals(
            &fd,
            rustix::fs::SealFlags::GROW
                | rustix::fs::SealFlags::SHRINK
                | rustix::fs::SealFlags::SEAL,
        )
        .map_err(io::Error::from)?;
        let file = File::from(fd);
        let map = Arc::new(SharedMapping::new(file.as_fd(), words * 8)?);
        let s = StateFile { file, map, tables };
        let w = s.words();
        w[0].store(MAGIC, Ordering::Relaxed);
        w[1].store(VERSION, Ordering::Relaxed);
        w[2].store(vm_id, Ordering::Relaxed);
        w[3].store(pages.len() as u64, Ordering::Relaxed);
        for (i, &p) in pages.iter().enumerate() {
            w[HEADER_WORDS + i].store(p as u64, Ordering::Release);
        }
        Ok(s)
    }

    /// Maps a state file received from a peer: checks that it is sealed against resizing (a
    /// shrink would fault whoever maps it) and that its header names VM `vm_id` with regions
    /// of `pages` pages.
    pub fn adopt(file: File, vm_id: u64, pages: &[usize]) -> Result<StateFile, StateError> {
        let mismatch = |s: String| StateError::Mismatch(s);
        let seals = rustix::fs::fcntl_get_seals(&file)
            .map_err(|_| mismatch("not a sealed memfd".into()))?;
        let need = rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW;
        if !seals.contains(need) {
            return Err(mismatch("not sealed against resizing".into()));
        }
        let (tables, words) = layout(pages);
        let size = file.metadata()?.len();
        if size != (words * 8) as u64 {
            return Err(mismatch(format!(
                "{size} bytes where the regions need {}",
                words * 8
            )));
        }
        let map = Arc::new(SharedMapping::new(file.as_fd(), words * 8)?);
        let s = StateFile { file, map, tables };
        let w = s.words();
        let header = [
            w[0].load(Ordering::Acquire),
            w[1].load(Ordering::Acquire),
            w[2].load(Ordering::Acquire),
            w[3].load(Ordering::Acquire),
        ];
        if header != [MAGIC, VERSION, vm_id, pages.len() as u64] {
            return Err(mismatch(format!("header {header:x?}, expected VM {vm_id}")));
        }
        for (i, &p) in pages.iter().enumerate() {
            let got = w[HEADER_WORDS + i].load(Ordering::Acquire);
            if got != p as u64 {
                return Err(mismatch(format!("region {i} has {got} pages, not {p}")));
            }
        }
        Ok(s)
    }

    /// The memfd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Bytes of the file.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Never true: the header alone is 32 bytes.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The table of region `i`.
    pub fn table(&self, i: usize) -> Option<Table> {
        let &(offset, pages) = self.tables.get(i)?;
        Some(Table {
            map: self.map.clone(),
            offset,
            pages,
        })
    }

    fn words(&self) -> &[AtomicU64] {
        words_of(&self.map)
    }
}

fn words_of(map: &SharedMapping) -> &[AtomicU64] {
    // SAFETY: the mapping is live while `map` is borrowed, page aligned (so 8-byte aligned)
    // and `len` bytes long; the file is sealed against shrinking (checked at adopt, done at
    // create), so every byte stays backed. `AtomicU64` has the layout of `u64`, any bit
    // pattern is a valid value, and all access, including the other process's, is atomic.
    unsafe { std::slice::from_raw_parts(map.as_ptr().as_ptr().cast::<AtomicU64>(), map.len() / 8) }
}

/// One region's table: two bits per page (of the region's page size).
#[derive(Debug, Clone)]
pub struct Table {
    map: Arc<SharedMapping>,
    offset: usize,
    pages: usize,
}

impl Table {
    fn words(&self) -> &[AtomicU64] {
        let all = words_of(&self.map);
        let end = (self.offset + self.pages.div_ceil(PER_WORD)).min(all.len());
        &all[self.offset.min(end)..end]
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pages
    }

    /// No pages.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// The state of `page` (`Untouched` outside the table).
    pub fn get(&self, page: usize) -> Page {
        if page >= self.pages {
            return Page::Untouched;
        }
        self.words()
            .get(page / PER_WORD)
            .map_or(Page::Untouched, |w| {
                Page::from_bits(w.load(Ordering::Acquire) >> (2 * (page % PER_WORD)))
            })
    }

    /// Rewrites every page of `[first, end)` (clamped to the table) with `f(old)`, atomically
    /// per word.
    pub fn update(&self, first: usize, end: usize, f: impl Fn(Page) -> Page) {
        let end = end.min(self.pages);
        let words = self.words();
        let mut p = first;
        while p < end {
            let wi = p / PER_WORD;
            let stop = ((wi + 1) * PER_WORD).min(end);
            let Some(w) = words.get(wi) else { return };
            let _ = w.fetch_update(Ordering::AcqRel, Ordering::Acquire, |mut v| {
                for q in p..stop {
                    let shift = 2 * (q % PER_WORD);
                    let new = f(Page::from_bits(v >> shift)) as u64;
                    v = (v & !(3 << shift)) | (new << shift);
                }
                Some(v)
            });
            p = stop;
        }
    }

    /// Records that pages `[first, end)` were removed: never to be filled from the source
    /// again. Private pages stay private.
    pub fn discard(&self, first: usize, end: usize) {
        self.update(first, end, |s| match s {
            Page::Private => Page::Private,
            _ => Page::Discarded,
        });
    }

    /// Number of pages in state `s`.
    pub fn count(&self, s: Page) -> usize {
        let pattern = s as u64;
        let mut n = 0;
        for (wi, w) in self.words().iter().enumerate() {
            let v = w.load(Ordering::Relaxed);
            let in_word = (self.pages - wi * PER_WORD).min(PER_WORD);
            n += (0..in_word)
                .filter(|q| (v >> (2 * q)) & 3 == pattern)
                .count();
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_bits_per_page() {
        let pages = 1 << 20;
        let f = StateFile::create(7, &[pages, 64]).unwrap();
        assert_eq!(f.len(), 8 * (HEADER_WORDS + 2 + pages / 32 + 2));
        let t = f.table(1).unwrap();
        t.update(0, 64, |_| Page::Populated);
        t.discard(10, 12);
        assert_eq!(t.count(Page::Populated), 62);
        assert_eq!(
            (t.get(11), t.get(12), t.get(64)),
            (Page::Discarded, Page::Populated, Page::Untouched)
        );
        assert_eq!(f.table(0).unwrap().count(Page::Untouched), pages);
    }

    #[test]
    fn adopt_keeps_every_state_and_refuses_what_does_not_match() {
        let f = StateFile::create(9, &[100, 40]).unwrap();
        f.table(0).unwrap().update(10, 20, |_| Page::Private);
        f.table(1).unwrap().discard(0, 40);
        let copy = || File::from(f.fd().try_clone_to_owned().unwrap());
        let g = StateFile::adopt(copy(), 9, &[100, 40]).unwrap();
        assert_eq!(g.table(0).unwrap().count(Page::Private), 10);
        assert_eq!(g.table(1).unwrap().count(Page::Discarded), 40);
        for (vm, pages) in [(8, &[100, 40][..]), (9, &[101, 40]), (9, &[100])] {
            let e = StateFile::adopt(copy(), vm, pages).unwrap_err();
            assert!(e.is_bad_input(), "{e}");
        }
        let loose =
            File::from(rustix::fs::memfd_create("loose", rustix::fs::MemfdFlags::empty()).unwrap());
        loose.set_len(4096).unwrap();
        assert!(StateFile::adopt(loose, 9, &[100])
            .unwrap_err()
            .is_bad_input());
    }
}
