//! What a fault server installs: the run around a faulting page (fault-around), chunks ahead of
//! a sequential stream (prefetch), and chunks of a replayed working set; and how a run gets into
//! memory (a bounce buffer and `UFFDIO_COPY`, the daemon's own memfd mapping and
//! `UFFDIO_CONTINUE`, zero pages).

use super::FaultServer;
use crate::memory::PageDst;
use crate::metrics::{Install, VmMetrics};
use crate::session::Populate;
use crate::source::Fill;
use crate::uffd::UffdError;
use crate::working_set::locate_source_page;
use std::ops::Range;
use vmpager_protocol::PAGE_SIZE;

use crate::ahead::AHEAD_CHUNK;
impl FaultServer {
    /// Installs the next chunk ahead of a stream (nobody waits on it yet), if any is left.
    pub(super) fn install_ahead(&mut self) {
        let Some((region, chunk)) = self.plan.next_ahead(&self.vm) else {
            return;
        };
        if self.vm.source.fetcher().is_some() {
            self.request(region, chunk);
            return;
        }
        let run = self.without_resident(region, chunk.clone(), chunk.start);
        // Whatever part was installed is marked; on failure (a page raced in, the source
        // failed) the rest of the chunk is left to ordinary faults.
        if run.is_empty() {
            return;
        }
        if let Ok(run) = self.populate(region, run, true) {
            let state = &self.vm.memory.regions()[region].state;
            for q in run.clone() {
                state.mark_populated(q);
            }
            VmMetrics::add(&self.vm.metrics.pages_prefetched, run.len() as u64);
        }
    }

    /// Pushes the next chunk of the replay queue into memory: contiguous pages of one region
    /// in one go, pages already there (or removed, or private) skipped.
    pub(super) fn replay_chunk(&mut self) {
        let mut pages = std::mem::take(&mut self.replay);
        self.vm.replay.take(AHEAD_CHUNK, &mut pages);
        let mut run: Option<(usize, Range<usize>)> = None;
        for &source_page in &pages {
            let Some((ri, page)) = locate_source_page(&self.vm.memory, source_page) else {
                continue;
            };
            let region = &self.vm.memory.regions()[ri];
            if !region.state.is_untouched(page) {
                continue;
            }
            let max = (self.bounce.len() as u64 / region.page_size()).max(1) as usize;
            match &mut run {
                Some((r, pages)) if *r == ri && pages.end == page && pages.len() < max => {
                    pages.end += 1
                }
                Some((r, pages)) if *r == ri && pages.end == page + 1 => {} // same huge page
                _ => {
                    if let Some((r, pages)) = run.take() {
                        self.install_replayed(r, pages);
                    }
                    run = Some((ri, page..page + 1));
                }
            }
        }
        if let Some((r, pages)) = run {
            self.install_replayed(r, pages);
        }
        self.replay = pages;
    }

    /// Installs replayed pages `run` of region `ri`. The daemon's memory gets them straight in
    /// its memfd (the VMM's next touch finds them in the page cache and takes no uffd fault);
    /// the VMM's own memory gets them with `UFFDIO_COPY`.
    fn install_replayed(&mut self, ri: usize, run: Range<usize>) {
        let vm = self.vm.clone();
        let region = &vm.memory.regions()[ri];
        let run = {
            let mut r = run;
            while r.start < r.end && !region.state.is_untouched(r.start) {
                r.start += 1;
            }
            let mut end = r.start;
            while end < r.end && region.state.is_untouched(end) {
                end += 1;
            }
            r.start..end
        };
        if run.is_empty() {
            return;
        }
        if vm.source.fetcher().is_some() {
            self.request(ri, run);
            return;
        }
        if !region.is_owned() {
            if let Ok(done) = self.populate(ri, run, true) {
                for q in done.clone() {
                    region.state.mark_populated(q);
                }
                VmMetrics::add(&vm.metrics.pages_replayed, done.len() as u64);
            }
            return;
        }
        // Never overwrite what is in the memfd: the run goes in piece by piece, around the
        // pages that are there already.
        let ps = region.page_size();
        if ps == PAGE_SIZE {
            region.residency(run.clone(), &mut self.residency);
        }
        let resident = |q: usize| match ps {
            PAGE_SIZE => self.residency[q - run.start] & 1 != 0,
            _ => region.is_resident(q as u64 * ps),
        };
        let mut pieces = Vec::new();
        let mut q = run.start;
        while q < run.end {
            if resident(q) {
                q += 1;
                continue;
            }
            let start = q;
            while q < run.end && !resident(q) {
                q += 1;
            }
            pieces.push(start..q);
        }
        let fit = (self.bounce.len() as u64 / ps).max(1) as usize;
        for piece in pieces {
            let mut at = piece.start;
            while at < piece.end {
                let want = at..piece.end.min(at + fit);
                match vm.fill_owned(ri, want.clone(), &mut self.bounce) {
                    Ok((fill, done)) => {
                        let counter = match fill {
                            Fill::Data => &vm.metrics.pages_from_source,
                            Fill::Zero => &vm.metrics.pages_zero,
                        };
                        VmMetrics::add(counter, done.len() as u64);
                        VmMetrics::add(&vm.metrics.pages_replayed, done.len() as u64);
                        vm.metrics
                            .count_installed(Install::Write, done.len() as u64);
                        for q in done.clone() {
                            region.state.mark_populated(q);
                        }
                        // A page that raced in stops the run: step over it.
                        at = done.end + usize::from(done.end < want.end);
                    }
                    Err(e) => {
                        tracing::trace!(error = %e, "a replayed run could not be installed");
                        break;
                    }
                }
            }
        }
    }

    /// With `continue`, the part of `run` around `keep` whose pages are not in the memfd
    /// (`ahead::without_resident`). A lone page needs no check: it faulted as missing. (`copy`
    /// cannot overwrite: UFFDIO_COPY stops with EEXIST at a page in the page cache.)
    pub(super) fn without_resident(
        &mut self,
        ri: usize,
        run: Range<usize>,
        keep: usize,
    ) -> Range<usize> {
        if self.vm.populate != Populate::Continue || run.len() == 1 {
            return run;
        }
        crate::ahead::without_resident(&self.vm, ri, run, keep, &mut self.residency)
    }

    /// Installs pages `run` of region `ri` (in the region's page size): a single removed page
    /// becomes zeros; otherwise the source fills them all. Returns the pages installed (a
    /// prefix of `run` when the ioctl stopped early). `speculative` runs (ahead of any fault)
    /// never poison: a page the source failed to deliver is left to its own fault.
    pub(super) fn populate(
        &mut self,
        ri: usize,
        run: Range<usize>,
        speculative: bool,
    ) -> Result<Range<usize>, UffdError> {
        let r = self.populate_run(ri, run.clone(), speculative);
        if let Some(t) = self.vm.hybrid.tracker() {
            // A hybrid migration's source: the run is now mapped writable in the VMM, where a
            // write would not be seen; whatever went in is dirty (after the install, so a
            // push that reads it from now on protects it again first).
            let ps = self.vm.memory.regions()[ri].page_size();
            t.mark(ri, run.start as u64 * ps, run.len() as u64 * ps);
        }
        r
    }

    fn populate_run(
        &mut self,
        ri: usize,
        run: Range<usize>,
        speculative: bool,
    ) -> Result<Range<usize>, UffdError> {
        let vm = self.vm.clone();
        let region = &vm.memory.regions()[ri];
        let ps = region.page_size();
        let off = run.start as u64 * ps;
        let len = (run.len() as u64 * ps) as usize;
        let dst = self.host[ri].start + off;
        let installed = |r: Result<(), UffdError>| match r {
            Ok(()) => Ok(run.clone()),
            Err(UffdError::Partial { bytes }) => Ok(run.start..run.start + (bytes / ps) as usize),
            Err(e) => Err(e),
        };
        if run.len() == 1 && region.state.is_discarded(run.start) {
            let r = self.zeros(ri, dst, off, len);
            let done = installed(r)?;
            VmMetrics::add(&vm.metrics.pages_zero, done.len() as u64);
            vm.metrics
                .count_installed(self.zero_method(ri), done.len() as u64);
            return Ok(done);
        }
        if len > self.bounce.len() {
            return Err(UffdError::Failed(rustix::io::Errno::NOBUFS));
        }
        let source_off = region.spec.source_offset() + off;
        let fill = vm.fill(source_off, &mut PageDst::from_buf(&mut self.bounce[..len]));
        let (r, counter, method) = match fill {
            Ok(Fill::Zero) => (
                self.zeros(ri, dst, off, len),
                &vm.metrics.pages_zero,
                self.zero_method(ri),
            ),
            Ok(Fill::Data) => match vm.populate {
                Populate::Copy => (
                    if speculative {
                        self.uffd.copy_ahead(dst, &self.bounce[..len])
                    } else {
                        self.uffd.copy(dst, &self.bounce[..len])
                    },
                    &vm.metrics.pages_from_source,
                    Install::Copy,
                ),
                Populate::Continue => (
                    self.install_and_map(ri, off, dst, len),
                    &vm.metrics.pages_from_source,
                    Install::Continue,
                ),
            },
            Err(e) if speculative || run.len() > 1 => {
                // Only the faulting page must be answered: it is retried alone.
                tracing::trace!(error = %e, "page source failed for a readahead run");
                return Err(UffdError::Again);
            }
            Err(e) => {
                // Never silently zero-fill a page the source could not deliver: poison it, so
                // the VMM gets SIGBUS on this page. (A uffd created without
                // UFFD_FEATURE_POISON, like Firecracker's, refuses: the thread then keeps
                // waiting on that page, and the failure is counted.)
                VmMetrics::bump(&vm.metrics.source_errors);
                tracing::trace!(error = %e, "page source failed, poisoning");
                region.state.mark_poisoned(run.start);
                return match self.uffd.poison(dst, ps) {
                    Ok(()) | Err(UffdError::Exists) => Ok(run),
                    Err(e) => Err(e),
                };
            }
        };
        // Counted once installed: EEXIST and EAGAIN have their own counters.
        let done = installed(r)?;
        VmMetrics::add(counter, done.len() as u64);
        vm.metrics.count_installed(method, done.len() as u64);
        Ok(done)
    }

    /// How [`FaultServer::zeros`] installs zeros in region `ri`.
    pub(super) fn zero_method(&self, ri: usize) -> Install {
        match (self.vm.memory.regions()[ri].page_size(), self.vm.populate) {
            (PAGE_SIZE, _) => Install::ZeroPage,
            (_, Populate::Copy) => Install::Copy,
            (_, Populate::Continue) => Install::Continue,
        }
    }

    /// Zeros at `dst` (`len` bytes, offset `off` of region `ri`): `UFFDIO_ZEROPAGE` for 4 KiB
    /// pages; huge pages have no zero page, so a zeroed buffer is copied (or, for `continue`,
    /// the memfd's pages zeroed and mapped).
    pub(super) fn zeros(
        &mut self,
        ri: usize,
        dst: u64,
        off: u64,
        len: usize,
    ) -> Result<(), UffdError> {
        let region = &self.vm.memory.regions()[ri];
        if region.page_size() == PAGE_SIZE {
            return self.uffd.zeropage(dst, len as u64);
        }
        match self.vm.populate {
            Populate::Copy => {
                let zeros = self
                    .bounce
                    .get_mut(..len)
                    .ok_or(UffdError::Failed(rustix::io::Errno::NOBUFS))?;
                zeros.fill(0);
                self.uffd.copy(dst, zeros)
            }
            Populate::Continue => {
                let installed = region.install_zeros(off, len as u64, &mut self.bounce)?;
                self.map_installed(dst, len, installed)
            }
        }
    }

    /// `continue`: puts the bounce buffer's first `len` bytes into the memfd at `off` of
    /// region `ri` (whole pages, never over one that is there), then maps what went in at
    /// `dst` in the VMM and wakes its waiters.
    fn install_and_map(
        &mut self,
        ri: usize,
        off: u64,
        dst: u64,
        len: usize,
    ) -> Result<(), UffdError> {
        let region = &self.vm.memory.regions()[ri];
        let installed = region.install(off, &self.bounce[..len])?;
        self.map_installed(dst, len, installed)
    }

    /// Maps the first `installed` of `len` bytes at `dst` with `UFFDIO_CONTINUE`; a short
    /// install (a page raced in) reports what was mapped, as a short ioctl does.
    fn map_installed(&self, dst: u64, len: usize, installed: u64) -> Result<(), UffdError> {
        match installed {
            0 => Err(UffdError::Exists),
            n if n == len as u64 => self.uffd.r#continue(dst, n),
            n => match self.uffd.r#continue(dst, n) {
                Ok(()) => Err(UffdError::Partial { bytes: n }),
                Err(UffdError::Partial { bytes }) => Err(UffdError::Partial { bytes }),
                Err(e) => Err(e),
            },
        }
    }
}
