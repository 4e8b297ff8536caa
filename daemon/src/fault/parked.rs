//! Faults parked on an asynchronous source: the pages asked of the source and not arrived yet,
//! with the faults waiting on each. A fault on a page already asked for joins it (no second
//! fetch); a page asked in the background (fault-around, prefetch) that faults is asked again
//! as urgent. A discard (REMOVE) forgets the pages it covers and wakes their waiters: they
//! fault again and get what the page state says (zeros for a removed page). The rules are in
//! `docs/async-sources.md`.

use super::{FaultServer, Pending};
use crate::metrics::VmMetrics;
use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Instant;

/// A fault waiting for its page.
#[derive(Debug, Clone, Copy)]
pub(super) struct Waiter {
    /// When the fault was read (its latency runs until it is woken).
    pub read_at: Instant,
}

/// What a fault on a page did to its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Join {
    /// Nobody had asked for the page: ask for it, urgently.
    New,
    /// It was asked for in the background: ask again, urgently.
    Upgraded,
    /// A fault already waits on it: wait with it.
    Joined,
}

/// Pages asked of the source, by (region, page), with the faults waiting on each (none for a
/// background request).
#[derive(Debug, Default)]
pub(super) struct Parked {
    pages: BTreeMap<(usize, usize), Vec<Waiter>>,
}

impl Parked {
    /// The page was asked for and has not arrived.
    pub fn contains(&self, ri: usize, page: usize) -> bool {
        self.pages.contains_key(&(ri, page))
    }

    /// A fault waits on the page.
    pub fn is_waited(&self, ri: usize, page: usize) -> bool {
        self.pages.get(&(ri, page)).is_some_and(|w| !w.is_empty())
    }

    /// Records a background request of the page.
    pub fn ask(&mut self, ri: usize, page: usize) {
        self.pages.entry((ri, page)).or_default();
    }

    /// Records a fault on the page.
    pub fn join(&mut self, ri: usize, page: usize, waiter: Waiter) -> Join {
        match self.pages.get_mut(&(ri, page)) {
            None => {
                self.pages.insert((ri, page), vec![waiter]);
                Join::New
            }
            Some(w) => {
                let join = if w.is_empty() {
                    Join::Upgraded
                } else {
                    Join::Joined
                };
                w.push(waiter);
                join
            }
        }
    }

    /// Forgets the page; returns its waiters (empty if none, or not asked).
    pub fn take(&mut self, ri: usize, page: usize) -> Vec<Waiter> {
        self.pages.remove(&(ri, page)).unwrap_or_default()
    }

    /// Forgets pages `pages` of region `ri`; returns the waited ones with their waiters.
    pub fn take_range(&mut self, ri: usize, pages: Range<usize>) -> Vec<(usize, Vec<Waiter>)> {
        let keys: Vec<(usize, usize)> = self
            .pages
            .range((ri, pages.start)..(ri, pages.end))
            .map(|(&k, _)| k)
            .collect();
        keys.into_iter()
            .filter_map(|k| {
                let w = self.pages.remove(&k)?;
                (!w.is_empty()).then_some((k.1, w))
            })
            .collect()
    }

    /// Forgets every page; returns the waited ones with their waiters.
    pub fn take_all(&mut self) -> Vec<((usize, usize), Vec<Waiter>)> {
        std::mem::take(&mut self.pages)
            .into_iter()
            .filter(|(_, w)| !w.is_empty())
            .collect()
    }
}

impl FaultServer {
    /// A fault on untouched page `page` of region `ri` (at `page_addr` in the VMM), whose
    /// content an asynchronous source must provide: park it and ask (once).
    pub(super) fn park(&mut self, ri: usize, page: usize, page_addr: u64, p: Pending) {
        let vm = self.vm.clone();
        let Some(f) = vm.source.fetcher() else {
            return;
        };
        let region = &vm.memory.regions()[ri];
        let ps = region.page_size();
        if f.completions.is_lost() {
            // Nobody will ever deliver it: SIGBUS, never zeros.
            VmMetrics::bump(&vm.metrics.source_errors);
            let _ = self.uffd.poison(page_addr, ps);
            region.state.mark_poisoned(page);
            self.latencies.push(p.read_at.elapsed());
            return;
        }
        let waiter = Waiter { read_at: p.read_at };
        let join = self.parked.join(ri, page, waiter);
        if join == Join::Joined {
            VmMetrics::bump(&vm.metrics.joined_faults);
            return;
        }
        VmMetrics::bump(&vm.metrics.parked_faults);
        VmMetrics::bump(&vm.metrics.pages_fetched);
        let source_off = region.spec.source_offset() + page as u64 * ps;
        f.source.fetch(source_off, ps, true);
        tracing::trace!(address = p.address, "fault parked");
        if join == Join::New {
            // Fault-around: the neighbours in the background (only the faulting page wakes).
            let run = self.plan.run_around(&vm, ri, page);
            self.request(ri, run);
        }
    }

    /// Asks the source, in the background, for the pages of `run` (region `ri`) that are
    /// untouched and not asked for already, in contiguous requests.
    pub(super) fn request(&mut self, ri: usize, run: Range<usize>) {
        let vm = self.vm.clone();
        let Some(f) = vm.source.fetcher() else {
            return;
        };
        if f.completions.is_lost() {
            return;
        }
        let region = &vm.memory.regions()[ri];
        let ps = region.page_size();
        let wanted = |q: usize, parked: &Parked| {
            q < region.pages() && region.state.is_untouched(q) && !parked.contains(ri, q)
        };
        let mut q = run.start;
        while q < run.end {
            if !wanted(q, &self.parked) {
                q += 1;
                continue;
            }
            let start = q;
            while q < run.end && wanted(q, &self.parked) {
                self.parked.ask(ri, q);
                q += 1;
            }
            VmMetrics::add(&vm.metrics.pages_fetched, (q - start) as u64);
            let off = region.spec.source_offset() + start as u64 * ps;
            f.source.fetch(off, (q - start) as u64 * ps, false);
        }
    }

    /// Pages `pages` of region `ri` were discarded: forget their requests (late data is
    /// dropped when it arrives, as the page state says), tell the source, and wake the faults
    /// waiting on them: they fault again and get what a discarded page gets.
    pub(super) fn forget(&mut self, ri: usize, pages: Range<usize>) {
        let vm = self.vm.clone();
        let Some(f) = vm.source.fetcher() else {
            return;
        };
        let region = &vm.memory.regions()[ri];
        let ps = region.page_size();
        for (page, waiters) in self.parked.take_range(ri, pages.clone()) {
            let _ = self.uffd.wake(self.host[ri].start + page as u64 * ps, ps);
            self.latencies
                .extend(waiters.iter().map(|w| w.read_at.elapsed()));
        }
        let off = region.spec.source_offset() + pages.start as u64 * ps;
        f.source.discarded(off, pages.len() as u64 * ps);
    }
}
