//! The daemon's view of a region's page-state table (`vmpager_protocol::page_state`, two bits
//! per page in the VM's state file, which outlives the daemon): the transitions serving faults
//! and conversions make, and the poison markers the daemon placed.
//!
//! The table is a hint the fault path checks against the kernel (the memfd's page cache, or
//! `EEXIST` from a populate ioctl), never the only truth: a daemon killed between an ioctl and
//! the store that records it leaves a bit behind, and the rules in `fault` and `convert` are
//! written so that a stale bit costs a retry, never wrong data.
//!
//! Poison markers (a shared-side touch of a private page, a page the source failed) are rare:
//! they live in a bitmap allocated on first use, in the daemon only. A table adopted after a
//! restart does not know them, so every conversion to shared asks the VMM to zap
//! (`RETRY_ZAP_SHARED`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
pub use vmpager_protocol::page_state::{Page, StateError, StateFile, Table};

/// One region's page state.
#[derive(Debug)]
pub struct PageState {
    table: Table,
    poisoned: OnceLock<Box<[AtomicU64]>>,
    poison_unknown: AtomicBool,
}

impl PageState {
    /// The daemon's view of `table`; `adopted` for a table a previous daemon kept (its
    /// poison markers are unknown).
    pub fn new(table: Table, adopted: bool) -> PageState {
        PageState {
            table,
            poisoned: OnceLock::new(),
            poison_unknown: AtomicBool::new(adopted),
        }
    }

    /// A table of `pages` untouched pages in a state file of its own.
    #[cfg(test)]
    pub fn standalone(pages: usize) -> PageState {
        let f = StateFile::create(0, &[pages]).unwrap();
        PageState::new(f.table(0).unwrap(), false)
    }

    /// The state of `page`.
    pub fn get(&self, page: usize) -> Page {
        self.table.get(page)
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
        self.table.update(page, page + 1, |s| match s {
            Page::Private => Page::Private,
            _ => Page::Populated,
        });
    }

    /// Makes an installed (or removed) `page` untouched again: a hybrid migration's destination
    /// dropped it (`Invalidate`), its memfd page was punched, and its content is the source's
    /// again, to be asked for. The one transition back to untouched, safe only because no
    /// vCPU runs at a hybrid destination before the switchover, so no fault and no request can
    /// be pending on the page (docs/migration.md, "Hybrid"). Private pages stay private.
    pub fn reset_untouched(&self, page: usize) {
        self.table.update(page, page + 1, |s| match s {
            Page::Private => Page::Private,
            _ => Page::Untouched,
        });
    }

    /// Records that pages `[first, end)` were removed: not populated any more, and never to be
    /// filled from the source again. Private pages stay private.
    pub fn discard(&self, first: usize, end: usize) {
        self.table.discard(first, end);
    }

    /// Marks pages `[first, end)` private, or (`false`) turns private ones into shared,
    /// discarded pages (their shared side was punched when they became private).
    pub fn set_private(&self, first: usize, end: usize, private: bool) {
        self.table.update(first, end, |s| match (private, s) {
            (true, _) => Page::Private,
            (false, Page::Private) => Page::Discarded,
            (false, s) => s,
        });
    }

    /// Records that the VMM's mapping of `page` got a poison marker.
    pub fn mark_poisoned(&self, page: usize) {
        let pages = self.table.len();
        if page >= pages {
            return;
        }
        let bits = self
            .poisoned
            .get_or_init(|| (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect());
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
            for p in first..end.min(self.table.len()) {
                if let Some(w) = bits.get(p / 64) {
                    let m = 1 << (p % 64);
                    any |= w.fetch_and(!m, Ordering::AcqRel) & m != 0;
                }
            }
        }
        any
    }

    /// Number of populated pages.
    pub fn populated_count(&self) -> usize {
        self.table.count(Page::Populated)
    }

    /// Number of private pages.
    pub fn private_count(&self) -> usize {
        self.table.count(Page::Private)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_state_tracks_populate_and_discard() {
        let s = PageState::standalone(130);
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
    fn poison_bits_exist_only_once_used_and_are_unknown_after_adoption() {
        let s = PageState::standalone(1 << 20);
        assert!(s.poisoned.get().is_none());
        assert!(!s.take_poisoned(0, 1 << 20));
        s.mark_poisoned(5);
        assert!(s.take_poisoned(0, 10) && !s.take_poisoned(0, 10));
        let f = StateFile::create(3, &[8]).unwrap();
        let adopted = PageState::new(f.table(0).unwrap(), true);
        assert!(adopted.take_poisoned(0, 1), "unknown poison asks for a zap");
    }
}
