//! Planning what to install along with a requested page and ahead of it, for any server of a
//! VM's faults (the uffd's, or a VMM's fault channel): the run around the page (fault-around,
//! clipped to the source's data and to untouched pages), and the chunks still to install ahead
//! of sequential streams (prefetch), round robin between streams.

use crate::readahead::{Streams, Window};
use crate::session::Vm;
use std::collections::VecDeque;
use std::ops::Range;
use vmpager_protocol::PAGE_SIZE;

/// Pages per chunk installed ahead of a stream or from a working set: small enough that a
/// thread catching up with it waits for one chunk, not the whole window.
pub const AHEAD_CHUNK: usize = 64;
/// Ranges queued for installing ahead (one per recent stream).
const AHEAD_QUEUE: usize = 8;

/// Pages of a region still to install ahead of a sequential stream.
#[derive(Debug, Clone)]
struct Ahead {
    region: usize,
    pages: Range<usize>,
}

/// One server's readahead state.
#[derive(Debug)]
pub struct Planner {
    streams: Streams,
    ahead: VecDeque<Ahead>,
    on: bool,
}

impl Planner {
    /// A planner following the VM's readahead settings.
    pub fn new(vm: &Vm) -> Planner {
        Planner {
            streams: Streams::new(vm.readahead),
            ahead: VecDeque::with_capacity(AHEAD_QUEUE),
            on: vm.readahead.max_pages() > 1,
        }
    }

    /// The pages to install for a request of `page` of region `ri`: the contiguous run of
    /// untouched pages (neither installed, removed nor private) around `page` inside the
    /// readahead window, so one source read and one install cover them all. Just `page` if it
    /// was removed (it becomes a zero page on its own), if the region has huge pages (a 2 MiB
    /// page is its own fault-around), or while a working set is being replayed (it names the
    /// pages the guest will need; the neighbours of a page it missed mostly are not).
    /// Queues the window's part to install later.
    pub fn run_around(&mut self, vm: &Vm, ri: usize, page: usize) -> Range<usize> {
        let region = &vm.memory.regions()[ri];
        let state = &region.state;
        if !self.on
            || state.is_discarded(page)
            || region.page_size() != PAGE_SIZE
            || !vm.replay.is_empty()
        {
            return page..page + 1;
        }
        let Window {
            now: mut window,
            mut ahead,
        } = self.streams.window(ri, page, region.pages());
        // The first page whose source bytes are all past the end of the data.
        let data_end = vm
            .source
            .data_end()
            .saturating_sub(region.spec.source_offset())
            .div_ceil(PAGE_SIZE)
            .min(region.pages() as u64) as usize;
        if page < data_end {
            window.end = window.end.min(data_end);
            ahead.end = ahead.end.min(data_end);
        } else {
            window.start = window.start.max(data_end);
        }
        if !ahead.is_empty() {
            if self.ahead.len() == AHEAD_QUEUE {
                self.ahead.pop_front();
            }
            self.ahead.push_back(Ahead {
                region: ri,
                pages: ahead,
            });
        }
        let mut lo = page;
        while lo > window.start && state.is_untouched(lo - 1) {
            lo -= 1;
        }
        let mut hi = page + 1;
        while hi < window.end && state.is_untouched(hi) {
            hi += 1;
        }
        lo..hi
    }

    /// Whether chunks are left to install ahead.
    pub fn has_ahead(&self) -> bool {
        !self.ahead.is_empty()
    }

    /// The next chunk to install ahead: up to [`AHEAD_CHUNK`] untouched pages of one region
    /// (the caller installs what it can of them and marks those populated).
    pub fn next_ahead(&mut self, vm: &Vm) -> Option<(usize, Range<usize>)> {
        while let Some(mut a) = self.ahead.pop_front() {
            let state = &vm.memory.regions()[a.region].state;
            while a.pages.start < a.pages.end && !state.is_untouched(a.pages.start) {
                a.pages.start += 1;
            }
            if a.pages.is_empty() {
                continue;
            }
            let lo = a.pages.start;
            let mut hi = lo + 1;
            while hi < a.pages.end && hi - lo < AHEAD_CHUNK && state.is_untouched(hi) {
                hi += 1;
            }
            a.pages.start = hi;
            let region = a.region;
            if !a.pages.is_empty() {
                // Round robin between streams.
                self.ahead.push_back(a);
            }
            return Some((region, lo..hi));
        }
        None
    }
}

/// The part of `run` (4 KiB pages of owned region `ri`) around `keep` whose pages are not in
/// the memfd: a page the table calls untouched may still hold data written through another
/// mapping of the memfd (the VMM's, a device backend's), and filling it from the source would
/// overwrite that. Empty if `keep` itself is there. `scratch` holds the `mincore` output.
pub fn without_resident(
    vm: &Vm,
    ri: usize,
    run: Range<usize>,
    keep: usize,
    scratch: &mut Vec<u8>,
) -> Range<usize> {
    let region = &vm.memory.regions()[ri];
    if region.page_size() != PAGE_SIZE {
        let there = region.is_resident(keep as u64 * region.page_size());
        return if there { keep..keep } else { run };
    }
    if run.len() == 1 {
        return if region.is_resident(keep as u64 * PAGE_SIZE) {
            keep..keep
        } else {
            run
        };
    }
    region.residency(run.clone(), scratch);
    let resident = |q: usize| scratch[q - run.start] & 1 != 0;
    if resident(keep) {
        return keep..keep;
    }
    let mut lo = keep;
    while lo > run.start && !resident(lo - 1) {
        lo -= 1;
    }
    let mut hi = keep + 1;
    while hi < run.end && !resident(hi) {
        hi += 1;
    }
    lo..hi
}
