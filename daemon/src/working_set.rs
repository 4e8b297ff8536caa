//! Working sets (REAP, FaaSnap): the order in which a restored guest first needed its pages,
//! recorded while it runs, and replayed on the next restore of the same snapshot by pushing
//! those pages into memory ahead of the vCPUs (the fault and channel servers take chunks of the
//! replay queue between their faults, so faults always go first).
//!
//! Pages are named by their place in the page source — the 4 KiB page number of the source
//! offset — so a working set is a property of the snapshot, not of one VMM's layout.

use crate::memory::GuestMemory;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use vmpager_protocol::{WorkingSetEntry, PAGE_SIZE};

/// Records the first need of every page of one VM, in order.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    inner: Mutex<Recorded>,
}

#[derive(Debug)]
struct Recorded {
    /// One bit per page (of the region's page size) of each region: already recorded.
    seen: Vec<Vec<u64>>,
    entries: Vec<WorkingSetEntry>,
}

impl Recorder {
    /// A recorder for `memory`, its clock starting now.
    pub fn new(memory: &GuestMemory) -> Recorder {
        Recorder {
            start: Instant::now(),
            inner: Mutex::new(Recorded {
                seen: memory
                    .regions()
                    .iter()
                    .map(|r| vec![0; r.pages().div_ceil(64)])
                    .collect(),
                entries: Vec::new(),
            }),
        }
    }

    /// Notes that page `page` (of the region's page size) of region `region`, whose bytes start
    /// at `source_offset` in the page source, was needed now; a page already noted is ignored.
    pub fn note(&self, region: usize, page: usize, source_offset: u64) {
        let Ok(mut r) = self.inner.lock() else {
            return;
        };
        let Some(word) = r.seen.get_mut(region).and_then(|s| s.get_mut(page / 64)) else {
            return;
        };
        let bit = 1u64 << (page % 64);
        if *word & bit != 0 {
            return;
        }
        *word |= bit;
        let t = self.start.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        r.entries
            .push(WorkingSetEntry::new(source_offset / PAGE_SIZE, t));
    }

    /// Number of pages recorded.
    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |r| r.entries.len())
    }

    /// True before the first page.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `max` entries from index `from` on, and the total recorded.
    pub fn slice(&self, from: u64, max: usize) -> (u64, Vec<WorkingSetEntry>) {
        let Ok(r) = self.inner.lock() else {
            return (0, Vec::new());
        };
        let total = r.entries.len();
        let start = usize::try_from(from).unwrap_or(usize::MAX).min(total);
        let end = start.saturating_add(max).min(total);
        (total as u64, r.entries[start..end].to_vec())
    }
}

/// Source pages waiting to be pushed into a VM, in replay order.
#[derive(Debug, Default)]
pub struct ReplayQueue {
    pages: Mutex<VecDeque<u64>>,
    /// The queue's length, readable without the lock (every fault asks whether a replay runs).
    waiting: AtomicUsize,
}

/// Most pages a replay queue holds (16 GiB of 4 KiB pages); more are refused.
pub const MAX_QUEUED: usize = 1 << 22;

impl ReplayQueue {
    /// Appends `pages` (source page numbers); returns how many are queued now, or `None` if
    /// that would exceed [`MAX_QUEUED`].
    pub fn push(&self, pages: &[u64]) -> Option<usize> {
        let mut q = self.pages.lock().ok()?;
        if q.len() + pages.len() > MAX_QUEUED {
            return None;
        }
        q.extend(pages);
        self.waiting.store(q.len(), Ordering::Release);
        Some(q.len())
    }

    /// Takes up to `max` pages from the front.
    pub fn take(&self, max: usize, out: &mut Vec<u64>) {
        out.clear();
        if let Ok(mut q) = self.pages.lock() {
            let n = max.min(q.len());
            out.extend(q.drain(..n));
            self.waiting.store(q.len(), Ordering::Release);
        }
    }

    /// Pages waiting.
    pub fn len(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where source page `page` lives in `memory`: (region, page of the region's page size). The
/// first region whose source range holds it; `None` if none does.
pub fn locate_source_page(memory: &GuestMemory, page: u64) -> Option<(usize, usize)> {
    let offset = page.checked_mul(PAGE_SIZE)?;
    memory.regions().iter().enumerate().find_map(|(i, r)| {
        let within = offset.checked_sub(r.spec.source_offset())?;
        (within < r.size()).then(|| (i, (within / r.page_size()) as usize))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmpager_protocol::RegionSpec;

    #[test]
    fn records_each_page_once_in_order_of_first_need() {
        let regions = [
            RegionSpec::new(0, 1 << 20, 0),
            RegionSpec::new(1 << 30, 4 << 20, 8 << 20).huge_2m(),
        ];
        let mem = GuestMemory::new(1, &regions, vec![], true).unwrap();
        let r = Recorder::new(&mem);
        r.note(0, 5, 5 * PAGE_SIZE);
        r.note(1, 1, (8 << 20) + (2 << 20));
        r.note(0, 5, 5 * PAGE_SIZE);
        r.note(0, 2, 2 * PAGE_SIZE);
        r.note(9, 0, 0); // no such region: ignored
        assert_eq!(r.len(), 3);
        let (total, e) = r.slice(0, 10);
        let pages: Vec<u64> = e.iter().map(|e| e.page.get()).collect();
        assert_eq!((total, pages), (3, vec![5, (10 << 20) / 4096, 2]));
        assert!(e.windows(2).all(|w| w[0].t_ns.get() <= w[1].t_ns.get()));
        assert_eq!(r.slice(2, 10).1.len(), 1);
        assert_eq!(r.slice(7, 10), (3, vec![]));
    }

    #[test]
    fn source_pages_map_back_to_regions_and_huge_pages() {
        let regions = [
            RegionSpec::new(0, 1 << 20, 0),
            RegionSpec::new(1 << 30, 4 << 20, 8 << 20).huge_2m(),
        ];
        let mem = GuestMemory::new(1, &regions, vec![], true).unwrap();
        assert_eq!(locate_source_page(&mem, 3), Some((0, 3)));
        assert_eq!(locate_source_page(&mem, 256), None, "the gap 1..8 MiB");
        assert_eq!(
            locate_source_page(&mem, (8 << 20) / 4096 + 600),
            Some((1, 1))
        );
        assert_eq!(locate_source_page(&mem, u64::MAX), None);
    }

    #[test]
    fn the_replay_queue_is_bounded_and_ordered() {
        let q = ReplayQueue::default();
        assert_eq!(q.push(&[4, 1, 9]), Some(3));
        let mut out = Vec::new();
        q.take(2, &mut out);
        assert_eq!(out, vec![4, 1]);
        assert_eq!(q.len(), 1);
        assert!(q.push(&vec![0; MAX_QUEUED]).is_none());
    }
}
