//! A bitmap of pages shared by threads without a lock: which pages a destination has (source
//! side), or which arrived (destination side). Bits are set with one atomic OR each, so a page
//! is counted once whoever sets it first.

use std::sync::atomic::{AtomicU64, Ordering};
use vmpager_migration::RleBitmap;

/// One bit per page, and the number of bits set.
#[derive(Debug)]
pub struct PageBits {
    words: Vec<AtomicU64>,
    total: u64,
    count: AtomicU64,
}

impl PageBits {
    /// `total` pages, none set.
    pub fn new(total: u64) -> PageBits {
        PageBits {
            words: (0..total.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            total,
            count: AtomicU64::new(0),
        }
    }

    /// Pages covered.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bits set.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Every page is set.
    pub fn is_full(&self) -> bool {
        self.count() == self.total
    }

    /// Whether page `page` is set (false beyond the end).
    pub fn get(&self, page: u64) -> bool {
        page < self.total
            && self
                .words
                .get((page / 64) as usize)
                .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    /// Sets page `page`; true if this call set it (false if it was set, or beyond the end).
    pub fn set(&self, page: u64) -> bool {
        let Some(w) = self
            .words
            .get((page / 64) as usize)
            .filter(|_| page < self.total)
        else {
            return false;
        };
        let bit = 1 << (page % 64);
        let was = w.fetch_or(bit, Ordering::AcqRel);
        let newly = was & bit == 0;
        if newly {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        newly
    }

    /// Clears page `page`; true if it was set.
    pub fn clear(&self, page: u64) -> bool {
        let Some(w) = self
            .words
            .get((page / 64) as usize)
            .filter(|_| page < self.total)
        else {
            return false;
        };
        let bit = 1 << (page % 64);
        let was = w.fetch_and(!bit, Ordering::AcqRel);
        let cleared = was & bit != 0;
        if cleared {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        cleared
    }

    /// Clears every page.
    pub fn clear_all(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
        self.count.store(0, Ordering::Relaxed);
    }

    /// Clears every page and returns those that were set, in ascending order (each word is
    /// taken with one atomic swap: a page set meanwhile is either taken or left set).
    pub fn take_set(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        if self.count() == 0 {
            return pages;
        }
        for (wi, w) in self.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            if bits != 0 {
                self.count
                    .fetch_sub(u64::from(bits.count_ones()), Ordering::Relaxed);
            }
            while bits != 0 {
                pages.push(wi as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        pages
    }

    /// The first unset page at or after `from`, wrapping around to 0; `None` when all are set.
    pub fn next_unset(&self, from: u64) -> Option<u64> {
        if self.is_full() || self.total == 0 {
            return None;
        }
        let from = if from >= self.total { 0 } else { from };
        let n = self.words.len();
        let start = (from / 64) as usize;
        for i in 0..=n {
            let wi = (start + i) % n;
            let mut free = !self.words[wi].load(Ordering::Acquire);
            if i == 0 {
                // Only bits at or after `from` in the first word (its lower bits come last).
                free &= u64::MAX << (from % 64);
            }
            if i == n {
                free = !self.words[wi].load(Ordering::Acquire) & !(u64::MAX << (from % 64));
            }
            while free != 0 {
                let page = wi as u64 * 64 + u64::from(free.trailing_zeros());
                if page < self.total {
                    return Some(page);
                }
                free &= free - 1;
            }
        }
        None
    }

    /// The pages set, run-length encoded, from `first` for at most `len` pages.
    pub fn to_rle(&self, first: u64, len: u64) -> RleBitmap {
        let end = first.saturating_add(len).min(self.total);
        let mut b = RleBitmap::new();
        let mut page = first;
        while page < end {
            let set = self.get(page);
            let mut run = 1;
            while page + run < end && self.get(page + run) == set {
                run += 1;
            }
            b.push(set, run);
            page += run;
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::PageBits;

    #[test]
    fn bits_count_once_and_the_next_unset_page_wraps() {
        let b = PageBits::new(130);
        assert_eq!(b.next_unset(0), Some(0));
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(!b.set(130), "beyond the end");
        assert_eq!(b.count(), 1);
        assert_eq!(b.next_unset(0), Some(1));
        for p in 1..130 {
            if p != 70 {
                b.set(p);
            }
        }
        assert_eq!(b.next_unset(100), Some(70), "wraps to the start");
        assert_eq!(b.next_unset(70), Some(70));
        assert_eq!(b.next_unset(71), Some(70));
        b.set(70);
        assert!(b.is_full());
        assert_eq!(b.next_unset(5), None);
        assert!(b.clear(64));
        assert_eq!(b.next_unset(65), Some(64));
        let rle = b.to_rle(60, 10);
        assert_eq!(rle.len(), 10);
        assert_eq!(rle.count_set(), 9);
        b.clear_all();
        assert_eq!(b.count(), 0);
        b.set(3);
        b.set(100);
        assert_eq!(b.take_set(), vec![3, 100]);
        assert_eq!(b.count(), 0);
        assert!(b.take_set().is_empty());
        assert_eq!(b.next_unset(129), Some(129));
    }
}
