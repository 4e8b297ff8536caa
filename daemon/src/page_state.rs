//! The page-state table of a VM: two bits per page, kept in a sealed memfd (the *state file*)
//! that the daemon maps and the VMM holds a copy of, so the table outlives the daemon: a
//! restarted daemon maps the copy the VMM hands back and carries on (docs/survival.md).
//!
//! A page is in one of four states:
//!
//! | bits | state | meaning |
//! |---|---|---|
//! | `00` | untouched | its content is still the source's; readahead may install it |
//! | `01` | populated | installed (shared) since it was last discarded |
//! | `10` | discarded | removed (balloon, conversion): its next fill is zeros, never the source |
//! | `11` | private | KVM's notion: its memory is in the guest_memfd |
//!
//! The table is a hint the fault path checks against the kernel (the memfd's page cache, or
//! `EEXIST` from a populate ioctl), never the only truth: a daemon killed between an ioctl and
//! the store that records it leaves a bit behind, and the rules in `fault` and `convert` are
//! written so that a stale bit costs a retry, never wrong data.
//!
//! Poison markers (a shared-side touch of a private page, a page the source failed) are rare:
//! they live in a bitmap allocated on first use, in the daemon only. A table adopted after a
//! restart does not know them, so every conversion to shared asks the VMM to zap
//! (`RETRY_ZAP_SHARED`) until the daemon has seen every poison itself.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use vmpager_protocol::mapping::SharedMapping;

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

/// The mapped state file of one VM: a header, then one table per region.
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
        let memfd = memfd::MemfdOptions::default()
            .close_on_exec(true)
            .allow_sealing(true)
            .create(format!("vmpager-vm{vm_id}-state"))
            .map_err(io::Error::other)?;
        memfd.as_file().set_len((words * 8) as u64)?;
        memfd
            .add_seals(&[
                memfd::FileSeal::SealGrow,
                memfd::FileSeal::SealShrink,
                memfd::FileSeal::SealSeal,
            ])
            .map_err(io::Error::other)?;
        let file = memfd.into_file();
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

    /// Takes over the state file a VMM handed back (after a daemon restart): checks that it is
    /// sealed against resizing (the daemon maps it: a shrink would fault the daemon) and that
    /// its header names VM `vm_id` with regions of `pages` pages.
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

    /// The memfd (a copy goes to the VMM).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The table of region `i`.
    pub fn table(&self, i: usize) -> Option<PageState> {
        let &(offset, pages) = self.tables.get(i)?;
        Some(PageState {
            map: self.map.clone(),
            offset,
            pages,
            poisoned: OnceLock::new(),
            poison_unknown: AtomicBool::new(false),
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

/// One region's table: two bits per page (of the region's page size), in the state file.
#[derive(Debug)]
pub struct PageState {
    map: Arc<SharedMapping>,
    offset: usize,
    pages: usize,
    poisoned: OnceLock<Box<[AtomicU64]>>,
    poison_unknown: AtomicBool,
}

impl PageState {
    /// A table of `pages` untouched pages in a state file of its own.
    #[cfg(test)]
    pub fn new(pages: usize) -> PageState {
        match StateFile::create(0, &[pages]).map(|s| s.table(0)) {
            Ok(Some(t)) => t,
            // Only out of memory or fds gets here.
            _ => panic!("cannot create a page-state table"),
        }
    }

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

    /// Rewrites every page of `[first, end)` with `f(old)` (atomically per word).
    fn update(&self, first: usize, end: usize, f: impl Fn(Page) -> Page) {
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

    /// The page has been installed since it was last discarded.
    pub fn is_populated(&self, page: usize) -> bool {
        self.get(page) == Page::Populated
    }

    /// The page's source content was discarded (its next fill is zeros).
    pub fn is_discarded(&self, page: usize) -> bool {
        self.get(page) == Page::Discarded
    }

    /// The page is private (KVM's notion: its memory is in the guest_memfd).
    pub fn is_private(&self, page: usize) -> bool {
        self.get(page) == Page::Private
    }

    /// Neither installed, nor removed, nor private: its content is still the source's, and
    /// readahead may install it.
    pub fn is_untouched(&self, page: usize) -> bool {
        self.get(page) == Page::Untouched
    }

    /// Records that `page` was installed (a page that became private meanwhile stays private).
    pub fn mark_populated(&self, page: usize) {
        self.update(page, page + 1, |s| match s {
            Page::Private => Page::Private,
            _ => Page::Populated,
        });
    }

    /// Records that pages `[first, end)` were removed: not populated any more, and never to be
    /// filled from the source again. Private pages stay private.
    pub fn discard(&self, first: usize, end: usize) {
        self.update(first, end, |s| match s {
            Page::Private => Page::Private,
            _ => Page::Discarded,
        });
    }

    /// Marks pages `[first, end)` private, or (`false`) turns private ones into shared,
    /// discarded pages (their shared side was punched when they became private).
    pub fn set_private(&self, first: usize, end: usize, private: bool) {
        self.update(first, end, |s| match (private, s) {
            (true, _) => Page::Private,
            (false, Page::Private) => Page::Discarded,
            (false, s) => s,
        });
    }

    /// Records that the VMM's mapping of `page` got a poison marker.
    pub fn mark_poisoned(&self, page: usize) {
        if page >= self.pages {
            return;
        }
        let bits = self.poisoned.get_or_init(|| {
            (0..self.pages.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect()
        });
        if let Some(w) = bits.get(page / 64) {
            w.fetch_or(1 << (page % 64), Ordering::AcqRel);
        }
    }

    /// Whether any page of `[first, end)` may carry a poison marker since the last call for it
    /// (always true for a table adopted after a restart: its poison markers are unknown);
    /// clears them.
    pub fn take_poisoned(&self, first: usize, end: usize) -> bool {
        let mut any = self.poison_unknown.load(Ordering::Acquire);
        if let Some(bits) = self.poisoned.get() {
            for p in first..end.min(self.pages) {
                if let Some(w) = bits.get(p / 64) {
                    let m = 1 << (p % 64);
                    any |= w.fetch_and(!m, Ordering::AcqRel) & m != 0;
                }
            }
        }
        any
    }

    /// Called on a table adopted after a restart: poison markers placed by the previous daemon
    /// are unknown.
    pub fn forget_poison(&self) {
        self.poison_unknown.store(true, Ordering::Release);
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

    /// Number of populated pages.
    pub fn populated_count(&self) -> usize {
        self.count(Page::Populated)
    }

    /// Number of private pages.
    pub fn private_count(&self) -> usize {
        self.count(Page::Private)
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
        assert!(!s.is_discarded(5) && s.is_untouched(5));
        assert_eq!(s.populated_count(), 1);
        // Out of range is ignored, never a panic.
        s.mark_populated(10_000);
        s.discard(120, 10_000);
        assert!(!s.is_populated(10_000) && s.is_discarded(129));
        s.set_private(0, 3, true);
        assert!(s.is_private(2) && !s.is_private(3));
        assert_eq!(s.private_count(), 3);
        // Private pages stay private through a late populate or a remove ...
        s.mark_populated(1);
        s.discard(0, 2);
        assert!(s.is_private(0) && s.is_private(1));
        // ... and come back shared as discarded (zeros), never as source content.
        s.set_private(0, 4, false);
        assert!((0..4).all(|p| s.is_discarded(p)));
    }

    #[test]
    fn two_bits_per_page_and_poison_only_when_used() {
        let pages = 1 << 20;
        let f = StateFile::create(7, &[pages, 64]).unwrap();
        let bytes = f.fd_len();
        assert_eq!(bytes, 8 * (HEADER_WORDS + 2 + pages / 32 + 2) as u64);
        let t = f.table(0).unwrap();
        assert!(t.poisoned.get().is_none());
        assert!(!t.take_poisoned(0, pages));
        t.mark_poisoned(5);
        assert!(t.take_poisoned(0, 10) && !t.take_poisoned(0, 10));
    }

    #[test]
    fn an_adopted_table_keeps_every_state_and_forgets_poison() {
        let f = StateFile::create(9, &[100, 40]).unwrap();
        let (a, b) = (f.table(0).unwrap(), f.table(1).unwrap());
        a.mark_populated(99);
        a.set_private(10, 20, true);
        b.discard(0, 40);
        a.mark_poisoned(15);
        let copy = File::from(f.fd().try_clone_to_owned().unwrap());
        drop((a, b, f));
        let f = StateFile::adopt(copy, 9, &[100, 40]).unwrap();
        let (a, b) = (f.table(0).unwrap(), f.table(1).unwrap());
        assert!(a.is_populated(99) && a.is_private(10) && a.is_private(19));
        assert!(!a.is_private(20) && (0..40).all(|p| b.is_discarded(p)));
        a.forget_poison();
        assert!(a.take_poisoned(0, 1), "unknown poison asks for a zap");
    }

    #[test]
    fn adopt_refuses_another_vm_other_regions_and_unsealed_files() {
        let f = StateFile::create(9, &[100]).unwrap();
        let copy = || File::from(f.fd().try_clone_to_owned().unwrap());
        assert!(matches!(
            StateFile::adopt(copy(), 8, &[100]),
            Err(StateError::Mismatch(_))
        ));
        assert!(StateFile::adopt(copy(), 9, &[101]).is_err());
        assert!(StateFile::adopt(copy(), 9, &[100, 1]).is_err());
        let loose = memfd::MemfdOptions::default()
            .create("loose")
            .unwrap()
            .into_file();
        loose.set_len(4096).unwrap();
        let e = StateFile::adopt(loose, 9, &[100]).unwrap_err();
        assert!(e.is_bad_input(), "{e}");
    }

    impl StateFile {
        fn fd_len(&self) -> u64 {
            self.file.metadata().unwrap().len()
        }
    }
}
