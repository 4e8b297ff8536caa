//! Serving one VM's userfaultfd: read events, fetch the page from the source, populate, wake.
//!
//! A `FaultServer` is owned by exactly one worker thread, so the page-state table needs no
//! locking and duplicate faults on one page are coalesced by that table: the first fault fills
//! the page (the populate ioctl wakes every thread waiting on it), later ones only wake.

use crate::memory::PageDst;
use crate::metrics::VmMetrics;
use crate::readahead::{Readahead, Streams};
use crate::session::{Populate, Vm};
use crate::source::{Fill, SourceError};
use crate::uffd::{Event, Uffd, UffdError, MSG_SIZE};
use rustix::io::Errno;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmpager_protocol::PAGE_SIZE;

/// Events read per `read(2)`.
const BATCH: usize = 64;
/// Attempts to fetch a page from the source before poisoning it.
const SOURCE_ATTEMPTS: usize = 3;
/// Pages per ioctl when installing ahead of a stream: small enough that a thread catching up
/// with the copy waits for one chunk, not the whole window.
const AHEAD_CHUNK: usize = 64;
/// Ranges queued for installing ahead (one per recent stream).
const AHEAD_QUEUE: usize = 8;
/// Chunks installed ahead per `drain`: then the worker serves its other sources (VMs,
/// mailboxes, commands) before it comes back (`Drained::More`).
const AHEAD_PER_DRAIN: usize = 8;

/// Pages of a region still to install ahead of a sequential stream.
#[derive(Debug, Clone)]
struct Ahead {
    region: usize,
    pages: Range<usize>,
}

/// Where a region is mapped in the VMM.
#[derive(Debug, Clone, Copy)]
struct HostRange {
    start: u64,
    len: u64,
}

/// A fault waiting for a retry after `EAGAIN`.
#[derive(Debug, Clone, Copy)]
struct Pending {
    address: u64,
    minor: bool,
    read_at: Instant,
}

/// What became of a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Nothing more to read now.
    Idle,
    /// Pages are left to install ahead of a stream: drain again soon, even without an event.
    More,
    /// The uffd failed for good (the peer is gone); stop serving it.
    Closed,
}

/// Serves one VM's uffd.
#[derive(Debug)]
pub struct FaultServer {
    vm: Arc<Vm>,
    uffd: Uffd,
    host: Vec<HostRange>,
    bounce: Vec<u8>,
    events: Vec<[u8; MSG_SIZE]>,
    retry: VecDeque<Pending>,
    latencies: Vec<Duration>,
    /// `mincore` output for `continue` runs.
    residency: Vec<u8>,
    streams: Streams,
    ahead: VecDeque<Ahead>,
    /// Whether a fault may install more than its own page.
    readahead_on: bool,
}

impl FaultServer {
    /// A server for `vm`'s `uffd`, whose regions the VMM mapped at `host_addrs` (region order),
    /// installing pages around each fault as `readahead` says.
    pub fn new(vm: Arc<Vm>, uffd: Uffd, host_addrs: &[u64], readahead: Readahead) -> FaultServer {
        let regions = vm.memory.regions();
        let host = regions
            .iter()
            .zip(host_addrs)
            .map(|(r, &start)| HostRange {
                start,
                len: r.size(),
            })
            .collect();
        FaultServer {
            vm,
            uffd,
            host,
            bounce: vec![0; readahead.max_pages() * PAGE_SIZE as usize],
            events: vec![[0; MSG_SIZE]; BATCH],
            retry: VecDeque::new(),
            latencies: Vec::with_capacity(BATCH),
            residency: Vec::with_capacity(readahead.max_pages()),
            streams: Streams::new(readahead),
            readahead_on: readahead.max_pages() > 1,
            ahead: VecDeque::with_capacity(AHEAD_QUEUE),
        }
    }

    /// The VM served.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// The uffd (for registration with a poller).
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// Reads and serves every pending event (edge-triggered pollers must drain), then installs
    /// up to [`AHEAD_PER_DRAIN`] chunks ahead of sequential streams, looking for new faults
    /// between chunks.
    pub fn drain(&mut self) -> Drained {
        let mut chunks = 0;
        loop {
            match self.uffd.read_events(&mut self.events) {
                Ok(n) => {
                    let read_at = Instant::now();
                    // Removes first: the kernel lets populate ioctls through again as soon as
                    // a REMOVE is read and zaps the range after, so a run installed for an
                    // earlier fault of the batch must already see the range as removed.
                    for i in 0..n {
                        if let e @ Event::Remove { .. } = Event::parse(&self.events[i]) {
                            self.handle(e, read_at);
                        }
                    }
                    for i in 0..n {
                        match Event::parse(&self.events[i]) {
                            Event::Remove { .. } => {}
                            e => self.handle(e, read_at),
                        }
                    }
                    if n > 0 {
                        // Read until EAGAIN, even after a short read that emptied the queue.
                        // Stopping at the short read saves a syscall, yet measured 0.4 µs
                        // slower per fault with the worker on the faulting CPU
                        // (docs/performance.md); the woken faulting thread seems to get the
                        // CPU at that syscall's return, before the worker's bookkeeping.
                        continue;
                    }
                }
                Err(Errno::AGAIN) => {}
                Err(_) => {
                    self.flush_latencies();
                    return Drained::Closed;
                }
            }
            if !self.retry.is_empty() {
                // The events that caused EAGAIN may not be queued yet: retry, and read again.
                self.run_retries();
                if !self.retry.is_empty() {
                    std::thread::yield_now();
                }
                continue;
            }
            self.flush_latencies();
            if self.ahead.is_empty() {
                return Drained::Idle;
            }
            if chunks == AHEAD_PER_DRAIN {
                return Drained::More;
            }
            self.install_ahead();
            chunks += 1;
        }
    }

    fn flush_latencies(&mut self) {
        if !self.latencies.is_empty() {
            self.vm.metrics.record_latencies(&self.latencies);
            self.latencies.clear();
        }
    }

    /// Installs the next chunk ahead of a stream (nobody waits on it yet), if any is left.
    fn install_ahead(&mut self) {
        while let Some(mut a) = self.ahead.pop_front() {
            let state = &self.vm.memory.regions()[a.region].state;
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
            let region = a.region;
            let run = self.without_resident(region, lo..hi, lo);
            // Whatever part was installed is marked; on failure (a page raced in, the source
            // failed) the rest of the chunk is left to ordinary faults.
            if run.is_empty() {
                hi = lo + 1;
            } else if let Ok(run) = self.populate(region, run, true) {
                let state = &self.vm.memory.regions()[region].state;
                for q in run.clone() {
                    state.mark_populated(q);
                }
                VmMetrics::add(&self.vm.metrics.pages_prefetched, run.len() as u64);
            }
            a.pages.start = hi;
            if !a.pages.is_empty() {
                // Round robin between streams.
                self.ahead.push_back(a);
            }
            return;
        }
    }

    fn run_retries(&mut self) {
        for _ in 0..self.retry.len() {
            if let Some(p) = self.retry.pop_front() {
                self.fault(p);
            }
        }
    }

    fn handle(&mut self, event: Event, read_at: Instant) {
        match event {
            Event::PageFault { address, minor, .. } => {
                VmMetrics::bump(&self.vm.metrics.faults);
                self.fault(Pending {
                    address,
                    minor,
                    read_at,
                });
            }
            Event::Remove { start, end } => {
                VmMetrics::bump(&self.vm.metrics.remove_events);
                self.discard(start, end);
            }
            Event::Unmap { .. } => {
                // An unmapped range cannot fault; its memory and page state stay (the memfd
                // still holds what the guest wrote).
                VmMetrics::bump(&self.vm.metrics.unmap_events);
            }
            Event::Remap { from, to, len } => {
                VmMetrics::bump(&self.vm.metrics.remap_events);
                for h in &mut self.host {
                    if h.start == from && h.len == len {
                        h.start = to;
                    }
                }
                tracing::trace!(from, to, len, "remap");
            }
            Event::Other(kind) => tracing::trace!(kind, "ignored uffd event"),
        }
    }

    /// Region index and offset of a VMM address.
    fn locate(&self, address: u64) -> Option<(usize, u64)> {
        self.host.iter().enumerate().find_map(|(i, h)| {
            let off = address.checked_sub(h.start)?;
            (off < h.len).then_some((i, off & !(PAGE_SIZE - 1)))
        })
    }

    fn discard(&mut self, start: u64, end: u64) {
        for (i, h) in self.host.iter().enumerate() {
            let lo = start.max(h.start);
            let hi = end.min(h.start.saturating_add(h.len));
            if lo < hi {
                let first = ((lo - h.start) / PAGE_SIZE) as usize;
                let last = (hi - h.start).div_ceil(PAGE_SIZE) as usize;
                self.vm.memory.regions()[i].state.discard(first, last);
            }
        }
    }

    fn fault(&mut self, p: Pending) {
        let page_addr = p.address & !(PAGE_SIZE - 1);
        let Some((ri, off)) = self.locate(p.address) else {
            // Not memory this VM declared: no content can be right, so the VMM gets SIGBUS
            // rather than a thread stuck in a fault forever.
            VmMetrics::bump(&self.vm.metrics.stray_faults);
            let _ = self.uffd.poison(page_addr, PAGE_SIZE);
            tracing::trace!(address = p.address, "stray fault poisoned");
            return;
        };
        let page = (off / PAGE_SIZE) as usize;
        if self.vm.memory.regions()[ri].state.is_private(page) {
            // The shared side of a private page: never serve data (DESIGN.md §5); the VMM gets
            // a clear SIGBUS on it.
            VmMetrics::bump(&self.vm.metrics.private_faults_poisoned);
            let _ = self.uffd.poison(page_addr, PAGE_SIZE);
            self.vm.memory.regions()[ri].state.mark_poisoned(page);
            return;
        }
        let region = &self.vm.memory.regions()[ri];
        if !p.minor && region.state.is_populated(page) {
            // A duplicate: the page was installed (and its waiters woken) after this fault was
            // raised; wake in case this thread started waiting after that wake. The bit is only
            // a hint: a REMOVE event arrives *before* the kernel zaps the range, so a page
            // installed between the two is gone although marked populated. The page cache
            // (seen through the daemon's own mapping) says whether it really is there.
            if region.is_resident(off) {
                VmMetrics::bump(&self.vm.metrics.coalesced);
                let _ = self.uffd.wake(page_addr, PAGE_SIZE);
                self.latencies.push(p.read_at.elapsed());
                return;
            }
            region.state.discard(page, page + 1);
        }
        let run = if p.minor {
            page..page
        } else {
            let run = self.run_around(ri, page);
            self.without_resident(ri, run, page)
        };
        let result = if run.is_empty() {
            // The page is already in the memfd (the VMM, a device backend or the kernel put it
            // there): map it, never overwrite it.
            self.uffd
                .r#continue(page_addr, PAGE_SIZE)
                .map(|()| page..page + 1)
        } else {
            let several = run.len() > 1;
            match self.populate(ri, run, false) {
                Ok(done) if done.contains(&page) => {
                    VmMetrics::add(&self.vm.metrics.pages_prefetched, done.len() as u64 - 1);
                    Ok(done)
                }
                Ok(done) => {
                    // The run stopped before the faulting page (a neighbour raced in): keep
                    // what was installed, then the faulting page alone.
                    let state = &self.vm.memory.regions()[ri].state;
                    for q in done.clone() {
                        state.mark_populated(q);
                    }
                    VmMetrics::add(&self.vm.metrics.pages_prefetched, done.len() as u64);
                    self.populate(ri, page..page + 1, false)
                }
                Err(UffdError::Exists | UffdError::Again | UffdError::Failed(Errno::FAULT))
                    if several =>
                {
                    // A neighbour raced in (installed, removed or punched): the faulting page
                    // alone gets the usual careful treatment.
                    self.populate(ri, page..page + 1, false)
                }
                r => r,
            }
        };
        match result {
            Ok(run) => {
                let state = &self.vm.memory.regions()[ri].state;
                for q in run {
                    state.mark_populated(q);
                }
            }
            Err(UffdError::Exists) => {
                VmMetrics::bump(&self.vm.metrics.eexist);
                self.vm.memory.regions()[ri].state.mark_populated(page);
                let _ = self.uffd.wake(page_addr, PAGE_SIZE);
            }
            Err(UffdError::Again | UffdError::Partial { .. }) => {
                VmMetrics::bump(&self.vm.metrics.eagain);
                self.retry.push_back(p);
                return;
            }
            Err(UffdError::Failed(Errno::FAULT)) if self.vm.populate == Populate::Continue => {
                // UFFDIO_CONTINUE found no page in the page cache: a REMOVE punched it between
                // our fill and the ioctl (its event is already read, so the page is marked
                // discarded). Retry as a missing page: it becomes a zero page.
                VmMetrics::bump(&self.vm.metrics.eagain);
                self.retry.push_back(Pending { minor: false, ..p });
                return;
            }
            Err(UffdError::PeerGone) => {
                // The mapping or the process is gone. Wake anyway: should a thread still wait
                // on this address, it re-faults and gets a fresh answer.
                let _ = self.uffd.wake(page_addr, PAGE_SIZE);
                return;
            }
            Err(UffdError::Failed(e)) => {
                VmMetrics::bump(&self.vm.metrics.populate_errors);
                tracing::trace!(
                    address = p.address,
                    errno = e.raw_os_error(),
                    "populate failed"
                );
                let _ = self.uffd.poison(page_addr, PAGE_SIZE);
                self.vm.memory.regions()[ri].state.mark_poisoned(page);
            }
        }
        self.latencies.push(p.read_at.elapsed());
    }

    /// The pages to install for a missing fault on `page` of region `ri`: the contiguous run
    /// of untouched pages (neither installed, removed nor private) around `page` inside the
    /// readahead window, so one source read and one ioctl cover them all. Just `page` if it was
    /// removed (it becomes a zero page on its own). Queues the window's part to install after
    /// the wake.
    fn run_around(&mut self, ri: usize, page: usize) -> Range<usize> {
        let region = &self.vm.memory.regions()[ri];
        let state = &region.state;
        if !self.readahead_on || state.is_discarded(page) {
            return page..page + 1;
        }
        let crate::readahead::Window {
            now: mut window,
            mut ahead,
        } = self.streams.window(ri, page, region.pages());
        // The first page whose source bytes are all past the end of the data.
        let data_end = self
            .vm
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

    /// With `continue`, the part of `run` around `keep` whose pages are not in the memfd: a
    /// page the table calls untouched may still hold data written through another mapping of
    /// the memfd (a device backend's), and filling it from the source would overwrite that.
    /// Empty if `keep` itself is there. (`copy` cannot overwrite: UFFDIO_COPY stops with
    /// EEXIST at a page in the page cache.)
    fn without_resident(&mut self, ri: usize, run: Range<usize>, keep: usize) -> Range<usize> {
        if self.vm.populate != Populate::Continue || run.len() == 1 {
            return run;
        }
        let region = &self.vm.memory.regions()[ri];
        region.residency(run.clone(), &mut self.residency);
        let resident = |q: usize| self.residency[q - run.start] & 1 != 0;
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

    /// Installs pages `run` of region `ri`: a single removed page becomes zeros; otherwise the
    /// source fills them all. Returns the pages installed (a prefix of `run` when the ioctl
    /// stopped early). `speculative` runs (ahead of any fault) never poison: a page the source
    /// failed to deliver is left to its own fault.
    fn populate(
        &mut self,
        ri: usize,
        run: Range<usize>,
        speculative: bool,
    ) -> Result<Range<usize>, UffdError> {
        let vm = &*self.vm;
        let region = &vm.memory.regions()[ri];
        let off = run.start as u64 * PAGE_SIZE;
        let len = run.len() * PAGE_SIZE as usize;
        let dst = self.host[ri].start + off;
        if run.len() == 1 && region.state.is_discarded(run.start) {
            return self
                .uffd
                .zeropage(dst, PAGE_SIZE)
                .inspect(|()| VmMetrics::bump(&vm.metrics.pages_zero))
                .map(|()| run);
        }
        let source_off = region.spec.source_offset() + off;
        let attempt = |dst: &mut PageDst<'_>| -> Result<Fill, SourceError> {
            let mut last = None;
            for _ in 0..SOURCE_ATTEMPTS {
                match vm.source.fill(source_off, dst) {
                    Ok(f) => return Ok(f),
                    Err(e) if e.is_retryable() => last = Some(e),
                    Err(e) => return Err(e),
                }
            }
            Err(last.unwrap_or_else(|| SourceError::Unusable("no attempt made".into())))
        };
        let fill = match vm.populate {
            Populate::Copy => attempt(&mut PageDst::from_buf(&mut self.bounce[..len])),
            Populate::Continue => match region.page_dst(off, len) {
                Some(mut d) => attempt(&mut d),
                None => Err(SourceError::Unusable("page outside region".into())),
            },
        };
        let (installed, counter) = match fill {
            Ok(Fill::Zero) => (self.uffd.zeropage(dst, len as u64), &vm.metrics.pages_zero),
            Ok(Fill::Data) => (
                match vm.populate {
                    Populate::Copy => self.uffd.copy(dst, &self.bounce[..len]),
                    Populate::Continue => self.uffd.r#continue(dst, len as u64),
                },
                &vm.metrics.pages_from_source,
            ),
            Err(e) if speculative || run.len() > 1 => {
                // Only the faulting page must be answered: it is retried alone.
                tracing::trace!(error = %e, "page source failed for a readahead run");
                return Err(UffdError::Again);
            }
            Err(e) => {
                // Never silently zero-fill a page the source could not deliver: poison it, so
                // the VMM gets SIGBUS on this page.
                VmMetrics::bump(&vm.metrics.source_errors);
                tracing::trace!(error = %e, "page source failed, poisoning");
                region.state.mark_poisoned(run.start);
                return match self.uffd.poison(dst, PAGE_SIZE) {
                    Ok(()) | Err(UffdError::Exists) => Ok(run),
                    Err(e) => Err(e),
                };
            }
        };
        // Counted once installed: EEXIST and EAGAIN have their own counters.
        let done = match installed {
            Ok(()) => run,
            Err(UffdError::Partial { bytes }) => {
                run.start..run.start + (bytes / PAGE_SIZE) as usize
            }
            Err(e) => return Err(e),
        };
        VmMetrics::add(counter, done.len() as u64);
        Ok(done)
    }
}
