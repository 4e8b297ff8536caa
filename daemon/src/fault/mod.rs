//! Serving one VM's userfaultfd: read events, fetch the page from the source, populate, wake.
//!
//! A `FaultServer` is owned by exactly one worker thread, so the page-state table needs no
//! locking and duplicate faults on one page are coalesced by that table: the first fault fills
//! the page (the populate ioctl wakes every thread waiting on it), later ones only wake.
//!
//! Regions have a page size (4 KiB, or 2 MiB for huge-page regions): page indices, runs and
//! ioctl lengths are in that unit. The memory is either the daemon's (memfds it maps) or, for
//! `VM_MEMORY_IN_VMM` VMs, the VMM's own private mapping, which the daemon can only fill with
//! `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` and never inspect.
//!
//! * this module: the event loop and the decisions per fault;
//! * [`install`]: what is installed for a fault, ahead of a stream, and from a replayed
//!   working set;
//! * [`parked`]: faults waiting on an asynchronous source, and what it is asked for;
//! * [`arrive`]: installing what an asynchronous source delivered.

mod arrive;
mod install;
mod parked;

use crate::ahead::{Planner, AHEAD_CHUNK};
use crate::metrics::{Install, VmMetrics};
use crate::session::{Populate, Vm};
use crate::uffd::{Event, Uffd, UffdError, MSG_SIZE};
use rustix::io::Errno;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmpager_protocol::{HUGE_PAGE_SIZE, PAGE_SIZE};

/// Events read per `read(2)`.
const BATCH: usize = 64;
/// Chunks installed ahead (of a stream, or from a working set) per `drain`: then the worker
/// serves its other sources (VMs, mailboxes, commands) before it comes back (`Drained::More`).
const AHEAD_PER_DRAIN: usize = 8;

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
    /// Pages are left to install ahead of the guest: drain again soon, even without an event.
    More,
    /// The uffd failed for good (the peer is gone); stop serving it.
    Closed,
}

/// Buffers that hold data only while a server drains: a worker owns one set and lends it to
/// each server it drains, so they cost once per worker instead of once per VM (the bounce
/// buffer alone is up to 2 MiB). Grown to what the largest server needs, never shrunk.
#[derive(Debug, Default)]
pub struct Scratch {
    bounce: Vec<u8>,
    events: Vec<[u8; MSG_SIZE]>,
    latencies: Vec<Duration>,
    residency: Vec<u8>,
    replay: Vec<u64>,
}

/// Serves one VM's uffd.
#[derive(Debug)]
pub struct FaultServer {
    vm: Arc<Vm>,
    uffd: Uffd,
    host: Vec<HostRange>,
    /// Bounce buffer bytes this VM's runs need (its readahead window, 2 MiB pages).
    bounce_len: usize,
    retry: VecDeque<Pending>,
    plan: Planner,
    // Lent by the worker for the duration of a drain (`Scratch`), empty otherwise.
    bounce: Vec<u8>,
    events: Vec<[u8; MSG_SIZE]>,
    latencies: Vec<Duration>,
    /// `mincore` output for `continue` runs.
    residency: Vec<u8>,
    /// Source pages taken from the replay queue.
    replay: Vec<u64>,
    /// Pages asked of an asynchronous source, and the faults waiting on them.
    parked: parked::Parked,
    /// Arrivals taken from the source's queue (kept for its capacity).
    arrivals: Vec<crate::source::Arrival>,
    /// Arrived pages to install again after `EAGAIN`.
    late: VecDeque<arrive::Late>,
}

impl FaultServer {
    /// A server for `vm`'s `uffd`, whose regions the VMM mapped at `host_addrs` (region order),
    /// installing pages around each fault as the VM's readahead says.
    pub fn new(vm: Arc<Vm>, uffd: Uffd, host_addrs: &[u64]) -> FaultServer {
        let regions = vm.memory.regions();
        let host = regions
            .iter()
            .zip(host_addrs)
            .map(|(r, &start)| HostRange {
                start,
                len: r.size(),
            })
            .collect();
        let mut bounce_len = vm.readahead.max_pages() * PAGE_SIZE as usize;
        if regions.iter().any(|r| r.spec.is_huge()) {
            bounce_len = bounce_len.max(HUGE_PAGE_SIZE as usize);
        }
        bounce_len = bounce_len.max(AHEAD_CHUNK * PAGE_SIZE as usize);
        FaultServer {
            uffd,
            host,
            bounce_len,
            retry: VecDeque::new(),
            plan: Planner::new(&vm),
            bounce: Vec::new(),
            events: Vec::new(),
            latencies: Vec::new(),
            residency: Vec::new(),
            replay: Vec::new(),
            parked: parked::Parked::default(),
            arrivals: Vec::new(),
            late: VecDeque::new(),
            vm,
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

    /// The doorbell an asynchronous source rings when pages arrive (for registration with
    /// the same poller), if the VM has such a source.
    pub fn arrivals_bell(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.vm.source.fetcher().map(|f| f.completions.bell())
    }

    /// Wakes every thread waiting on the VM's memory: each retries its access, and faults
    /// again (a new event) if its page is still missing. For a uffd taken over after a daemon
    /// restart: faults read by the daemon that died, or by the VMM while none served them,
    /// are never answered otherwise.
    pub fn wake_all(&self) {
        for h in &self.host {
            let _ = self.uffd.wake(h.start, h.len);
        }
    }

    /// Reads and serves every pending event (edge-triggered pollers must drain), then installs
    /// up to [`AHEAD_PER_DRAIN`] chunks ahead of sequential streams or from the replay queue,
    /// looking for new faults between chunks. `scratch` lends the buffers for it.
    pub fn drain(&mut self, scratch: &mut Scratch) -> Drained {
        self.borrow(scratch);
        let arrivals_left = self.vm.source.fetcher().is_some() && self.take_arrivals();
        let drained = match self.serve_pending() {
            Drained::Idle if arrivals_left => Drained::More,
            d => d,
        };
        self.flush_latencies();
        self.give_back(scratch);
        drained
    }

    /// Takes the worker's buffers, grown to what this VM needs. A new bounce buffer comes
    /// zeroed from the allocator (its pages untouched until a run is read into them).
    fn borrow(&mut self, scratch: &mut Scratch) {
        if scratch.bounce.len() < self.bounce_len {
            scratch.bounce = vec![0; self.bounce_len];
        }
        if scratch.events.len() < BATCH {
            scratch.events = vec![[0; MSG_SIZE]; BATCH];
        }
        std::mem::swap(&mut self.bounce, &mut scratch.bounce);
        std::mem::swap(&mut self.events, &mut scratch.events);
        std::mem::swap(&mut self.latencies, &mut scratch.latencies);
        std::mem::swap(&mut self.residency, &mut scratch.residency);
        std::mem::swap(&mut self.replay, &mut scratch.replay);
    }

    fn give_back(&mut self, scratch: &mut Scratch) {
        std::mem::swap(&mut self.bounce, &mut scratch.bounce);
        std::mem::swap(&mut self.events, &mut scratch.events);
        std::mem::swap(&mut self.latencies, &mut scratch.latencies);
        std::mem::swap(&mut self.residency, &mut scratch.residency);
        std::mem::swap(&mut self.replay, &mut scratch.replay);
    }

    fn serve_pending(&mut self) -> Drained {
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
            if !self.retry.is_empty() || !self.late.is_empty() {
                // The events that caused EAGAIN may not be queued yet: retry, and read again.
                self.run_retries();
                self.run_late();
                if !self.retry.is_empty() || !self.late.is_empty() {
                    std::thread::yield_now();
                }
                continue;
            }
            self.flush_latencies();
            let replay_left = !self.vm.replay.is_empty();
            if !self.plan.has_ahead() && !replay_left {
                return Drained::Idle;
            }
            if chunks == AHEAD_PER_DRAIN {
                return Drained::More;
            }
            if self.plan.has_ahead() {
                self.install_ahead();
            } else {
                self.replay_chunk();
            }
            chunks += 1;
        }
    }

    fn flush_latencies(&mut self) {
        if !self.latencies.is_empty() {
            self.vm.metrics.record_latencies(&self.latencies);
            self.latencies.clear();
        }
    }

    fn run_retries(&mut self) {
        for _ in 0..self.retry.len() {
            if let Some(p) = self.retry.pop_front() {
                self.fault(p);
                self.note_dirty(p.address);
            }
        }
    }

    fn handle(&mut self, event: Event, read_at: Instant) {
        match event {
            Event::PageFault {
                address, minor, wp, ..
            } => {
                VmMetrics::bump(&self.vm.metrics.faults);
                if wp {
                    // Only a hybrid migration's source write-protects.
                    self.write_fault(address);
                    return;
                }
                self.fault(Pending {
                    address,
                    minor,
                    read_at,
                });
                self.note_dirty(address);
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

    /// A write to a page a hybrid migration's push write-protected: the page is dirty (marked
    /// before the writer is woken), then writable again. A WP fault read after the tracking
    /// ended (the switchover) is only un-protected.
    fn write_fault(&mut self, address: u64) {
        let page_addr = address & !(PAGE_SIZE - 1);
        if let (Some(t), Some((ri, off))) = (self.vm.hybrid.tracker(), self.locate(address)) {
            t.mark(ri, off, PAGE_SIZE); // 4 KiB pages: hybrid refuses huge pages.
        }
        let _ = self.uffd.write_protect(page_addr, PAGE_SIZE, false);
    }

    /// Any other fault while a hybrid migration tracks writes: the page is mapped now (and
    /// writable), so it is dirty whether this access reads or writes it (marked after it was
    /// served, so a push that reads it from now on protects it again first).
    fn note_dirty(&self, address: u64) {
        let Some(t) = self.vm.hybrid.tracker() else {
            return;
        };
        if let Some((ri, off)) = self.locate(address) {
            let ps = self.vm.memory.regions()[ri].page_size();
            t.mark(ri, off, ps);
        }
    }

    /// Region index and offset (aligned to the region's page size) of a VMM address.
    fn locate(&self, address: u64) -> Option<(usize, u64)> {
        let regions = self.vm.memory.regions();
        self.host.iter().enumerate().find_map(|(i, h)| {
            let off = address.checked_sub(h.start)?;
            let ps = regions.get(i)?.page_size();
            (off < h.len).then_some((i, off & !(ps - 1)))
        })
    }

    fn discard(&mut self, start: u64, end: u64) {
        let asynchronous = self.vm.source.fetcher().is_some();
        let mut ranges = Vec::new();
        for (i, h) in self.host.iter().enumerate() {
            let lo = start.max(h.start);
            let hi = end.min(h.start.saturating_add(h.len));
            if lo < hi {
                let region = &self.vm.memory.regions()[i];
                let ps = region.page_size();
                let first = ((lo - h.start) / ps) as usize;
                let last = (hi - h.start).div_ceil(ps) as usize;
                region.state.discard(first, last);
                if asynchronous {
                    ranges.push((i, first..last));
                }
            }
        }
        for (i, pages) in ranges {
            self.forget(i, pages);
        }
    }

    fn fault(&mut self, p: Pending) {
        let Some((ri, off)) = self.locate(p.address) else {
            // Not memory this VM declared: no content can be right, so the VMM gets SIGBUS
            // rather than a thread stuck in a fault forever.
            VmMetrics::bump(&self.vm.metrics.stray_faults);
            let _ = self.uffd.poison(p.address & !(PAGE_SIZE - 1), PAGE_SIZE);
            tracing::trace!(address = p.address, "stray fault poisoned");
            return;
        };
        let region = &self.vm.memory.regions()[ri];
        let ps = region.page_size();
        let page_addr = self.host[ri].start + off;
        let page = (off / ps) as usize;
        if region.state.is_private(page) {
            // The shared side of a private page: never serve data (DESIGN.md §5); the VMM gets
            // a clear SIGBUS on it.
            VmMetrics::bump(&self.vm.metrics.private_faults_poisoned);
            let _ = self.uffd.poison(page_addr, ps);
            region.state.mark_poisoned(page);
            return;
        }
        if let Some(rec) = &self.vm.recorder {
            rec.note(ri, page, region.spec.source_offset() + off);
        }
        if !p.minor && region.state.is_populated(page) {
            // Installed before, faulting again: a duplicate (the page went in after this fault
            // was raised), or the page was removed since — normally seen as a REMOVE event
            // first, but not by a daemon that died between reading the event and recording it.
            if region.is_owned() {
                // The daemon's memory: the page cache says which. (A REMOVE arrives *before*
                // the kernel zaps the range, so a page installed between the two is gone
                // although marked populated.)
                if region.is_resident(off) {
                    VmMetrics::bump(&self.vm.metrics.coalesced);
                    let _ = self.uffd.wake(page_addr, ps);
                    self.latencies.push(p.read_at.elapsed());
                    return;
                }
                region.state.discard(page, page + 1);
            } else {
                // The VMM's own memory cannot be inspected: a zero page tells them apart.
                // EEXIST: it is there, a duplicate (wake). Installed: it had been removed, and
                // a removed page reads as zeros.
                let vm = self.vm.clone();
                match self.zeros(ri, page_addr, off, ps as usize) {
                    Ok(()) => {
                        VmMetrics::add(&vm.metrics.pages_zero, 1);
                        vm.metrics.count_installed(self.zero_method(ri), 1);
                    }
                    Err(UffdError::Exists) => {
                        VmMetrics::bump(&vm.metrics.coalesced);
                        let _ = self.uffd.wake(page_addr, ps);
                    }
                    Err(UffdError::Again | UffdError::Partial { .. }) => {
                        VmMetrics::bump(&vm.metrics.eagain);
                        self.retry.push_back(p);
                        return;
                    }
                    Err(_) => {
                        VmMetrics::bump(&vm.metrics.populate_errors);
                        let _ = self.uffd.poison(page_addr, ps);
                        vm.memory.regions()[ri].state.mark_poisoned(page);
                    }
                }
                self.latencies.push(p.read_at.elapsed());
                return;
            }
        }
        if self.vm.source.fetcher().is_some() && !p.minor && region.state.is_untouched(page) {
            // An asynchronous source provides it: the fault waits, the worker goes on.
            self.park(ri, page, page_addr, p);
            return;
        }
        let run = if p.minor {
            page..page
        } else {
            let run = self.plan.run_around(&self.vm, ri, page);
            self.without_resident(ri, run, page)
        };
        let result = if run.is_empty() {
            // The page is already in the memfd (the VMM, a device backend or the kernel put it
            // there): map it, never overwrite it.
            self.uffd.r#continue(page_addr, ps).map(|()| {
                self.vm.metrics.count_installed(Install::Continue, 1);
                page..page + 1
            })
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
        let state = &self.vm.memory.regions()[ri].state;
        match result {
            Ok(run) => {
                for q in run {
                    state.mark_populated(q);
                }
            }
            Err(UffdError::Exists) => {
                VmMetrics::bump(&self.vm.metrics.eexist);
                state.mark_populated(page);
                let _ = self.uffd.wake(page_addr, ps);
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
                let _ = self.uffd.wake(page_addr, ps);
                return;
            }
            Err(UffdError::Failed(e)) => {
                VmMetrics::bump(&self.vm.metrics.populate_errors);
                tracing::trace!(
                    address = p.address,
                    errno = e.raw_os_error(),
                    "populate failed"
                );
                let _ = self.uffd.poison(page_addr, ps);
                state.mark_poisoned(page);
            }
        }
        self.latencies.push(p.read_at.elapsed());
    }
}
