//! Installing what an asynchronous source delivered: each arrived page that is still untouched
//! goes in once (a page there already is never overwritten; one removed or made private since
//! is dropped), the faults parked on it are woken, and a page the source failed is poisoned
//! if a fault waits on it. The rules are in `docs/async-sources.md`.

use super::parked::Waiter;
use super::FaultServer;
use crate::metrics::{Install, VmMetrics};
use crate::page_state::Page;
use crate::session::Populate;
use crate::source::{Arrival, Payload};
use crate::uffd::UffdError;
use rustix::io::Errno;

/// What arrived for one page.
#[derive(Debug, Clone, Copy)]
enum Content<'a> {
    Data(&'a [u8]),
    Zero,
    Failed,
}

/// An arrived page whose install met `EAGAIN` (a remove or unmap event pending): tried again
/// after the events are read, and checked against the page state again then.
#[derive(Debug)]
pub(super) struct Late {
    ri: usize,
    page: usize,
    /// The page's bytes; `None` for zeros.
    data: Option<Vec<u8>>,
}

impl FaultServer {
    /// Installs what the asynchronous source queued (its urgent arrivals, then a slice of the
    /// ordered ones: [`Completions::take`](crate::source::Completions)); then, if the source
    /// was declared lost, poisons every page a fault still waits on. Returns whether ordered
    /// arrivals are left for the next drain.
    pub(super) fn take_arrivals(&mut self) -> bool {
        let vm = self.vm.clone();
        let Some(f) = vm.source.fetcher() else {
            return false;
        };
        let mut arrivals = std::mem::take(&mut self.arrivals);
        let left = f.completions.take(&mut arrivals);
        for a in arrivals.drain(..) {
            self.arrive(a);
        }
        self.arrivals = arrivals;
        if f.completions.is_lost() && !left {
            self.lose();
        }
        left
    }

    /// Tries the installs that met `EAGAIN` again.
    pub(super) fn run_late(&mut self) {
        for _ in 0..self.late.len() {
            if let Some(l) = self.late.pop_front() {
                let content = l.data.as_deref().map_or(Content::Zero, Content::Data);
                self.arrive_page(l.ri, l.page, content);
            }
        }
    }

    /// The source is lost: every waited page is poisoned (SIGBUS, never zeros).
    fn lose(&mut self) {
        let vm = self.vm.clone();
        for ((ri, page), waiters) in self.parked.take_all() {
            let region = &vm.memory.regions()[ri];
            let ps = region.page_size();
            VmMetrics::bump(&vm.metrics.source_errors);
            let _ = self.uffd.poison(self.host[ri].start + page as u64 * ps, ps);
            region.state.mark_poisoned(page);
            self.woken(&waiters);
        }
    }

    /// Splits an arrival into the region pages it covers whole.
    fn arrive(&mut self, a: Arrival) {
        if let Payload::Marker { reached } = &a.data {
            reached.store(true, std::sync::atomic::Ordering::Release);
            return;
        }
        let vm = self.vm.clone();
        let len = a.len();
        let Some(end) = a.offset.checked_add(len) else {
            return;
        };
        for (ri, region) in vm.memory.regions().iter().enumerate() {
            let ps = region.page_size();
            let base = region.spec.source_offset();
            let lo = a.offset.max(base);
            let hi = end.min(base.saturating_add(region.size()));
            if lo >= hi {
                continue;
            }
            // Whole pages only: a partial page is not the page.
            let first = (lo - base).div_ceil(ps) as usize;
            let last = ((hi - base) / ps) as usize;
            for page in first..last {
                let at = (base + page as u64 * ps - a.offset) as usize;
                let content = match &a.data {
                    Payload::Data(d) => match d.get(at..at + ps as usize) {
                        Some(bytes) => Content::Data(bytes),
                        None => continue,
                    },
                    Payload::Zero { .. } => Content::Zero,
                    Payload::Failed { .. } => Content::Failed,
                    Payload::Invalidate { .. } => {
                        self.invalidate_page(ri, page);
                        continue;
                    }
                    Payload::Marker { .. } => continue,
                };
                self.arrive_page(ri, page, content);
            }
        }
        if let Payload::Failed { error, .. } = &a.data {
            tracing::trace!(offset = a.offset, len, error = %error, "source failed pages");
        }
    }

    /// One arrived page of region `ri`.
    fn arrive_page(&mut self, ri: usize, page: usize, content: Content<'_>) {
        let vm = self.vm.clone();
        let region = &vm.memory.regions()[ri];
        let ps = region.page_size();
        let off = page as u64 * ps;
        let dst = self.host[ri].start + off;
        let asked = self.parked.contains(ri, page);
        let waited = self.parked.is_waited(ri, page);
        match region.state.get(page) {
            Page::Untouched => {}
            state => {
                // Installed already (a second arrival), or removed / private since it was
                // asked: dropped. Its waiters fault again and get what the state says.
                let counter = match state {
                    Page::Populated => &vm.metrics.arrivals_duplicate,
                    _ => &vm.metrics.arrivals_discarded,
                };
                VmMetrics::bump(counter);
                let waiters = self.parked.take(ri, page);
                if !waiters.is_empty() {
                    let _ = self.uffd.wake(dst, ps);
                    self.woken(&waiters);
                }
                return;
            }
        }
        let data = match content {
            Content::Failed => {
                let waiters = self.parked.take(ri, page);
                if !waiters.is_empty() {
                    // Never zeros: the VMM gets SIGBUS on this page.
                    VmMetrics::bump(&vm.metrics.source_errors);
                    let _ = self.uffd.poison(dst, ps);
                    region.state.mark_poisoned(page);
                    self.woken(&waiters);
                }
                // Nobody waits: nothing installed; a later fault asks again.
                VmMetrics::bump(&vm.metrics.arrivals_failed);
                return;
            }
            Content::Data(d) => Some(d),
            Content::Zero => None,
        };
        let (result, method) = if region.is_owned() && !waited {
            // Nobody waits: straight into the memfd, no uffd call (the VMM's next touch
            // maps it), never over a page that is there.
            let r = match data {
                Some(d) => region.install(off, d),
                None => region.install_zeros(off, ps, &mut self.bounce),
            };
            let r = match r {
                Ok(0) => Err(UffdError::Exists),
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
            (r, Install::Write)
        } else {
            match data {
                None => (self.zeros(ri, dst, off, ps as usize), self.zero_method(ri)),
                Some(d) if !region.is_owned() || vm.populate == Populate::Copy => {
                    let r = if waited {
                        self.uffd.copy(dst, d)
                    } else {
                        self.uffd.copy_ahead(dst, d)
                    };
                    (r, Install::Copy)
                }
                Some(d) => {
                    // Into the memfd (never over a page there), then mapped for the waiters;
                    // a page found there is mapped too, and counted as EEXIST.
                    let r = region.install(off, d).and_then(|n| {
                        let mapped = self.uffd.r#continue(dst, ps);
                        match (n, mapped) {
                            (0, Ok(())) => Err(UffdError::Exists),
                            (_, r) => r,
                        }
                    });
                    (r, Install::Continue)
                }
            }
        };
        match result {
            Ok(()) => {
                region.state.mark_populated(page);
                let counter = match data {
                    Some(_) => &vm.metrics.pages_from_source,
                    None => &vm.metrics.pages_zero,
                };
                VmMetrics::bump(counter);
                vm.metrics.count_installed(method, 1);
                let by = match asked {
                    true => &vm.metrics.pages_by_request,
                    false => &vm.metrics.pages_by_push,
                };
                VmMetrics::bump(by);
                let waiters = self.parked.take(ri, page);
                self.woken(&waiters);
            }
            Err(UffdError::Exists) => {
                // There already (the VMM or a device wrote it): never overwritten; success.
                VmMetrics::bump(&vm.metrics.eexist);
                region.state.mark_populated(page);
                let waiters = self.parked.take(ri, page);
                if !waiters.is_empty() {
                    let _ = self.uffd.wake(dst, ps);
                    self.woken(&waiters);
                }
            }
            Err(UffdError::Again | UffdError::Partial { .. })
            | Err(UffdError::Failed(Errno::FAULT)) => {
                // A remove or unmap event is pending (or punched the page between install and
                // CONTINUE): after the events are read, the page state decides again.
                VmMetrics::bump(&vm.metrics.eagain);
                self.late.push_back(Late {
                    ri,
                    page,
                    data: data.map(<[u8]>::to_vec),
                });
            }
            Err(UffdError::PeerGone) => {
                let _ = self.uffd.wake(dst, ps);
                let waiters = self.parked.take(ri, page);
                self.woken(&waiters);
            }
            Err(UffdError::Failed(e)) => {
                tracing::trace!(
                    errno = e.raw_os_error(),
                    "installing an arrived page failed"
                );
                let waiters = self.parked.take(ri, page);
                if !waiters.is_empty() {
                    VmMetrics::bump(&vm.metrics.populate_errors);
                    let _ = self.uffd.poison(dst, ps);
                    region.state.mark_poisoned(page);
                    self.woken(&waiters);
                }
            }
        }
    }

    /// A hybrid migration's destination drops its copy of a page: punched from the memfd
    /// (which also unmaps it from every mapping, the VMM's included), untouched again, so the
    /// next copy that arrives goes in. No vCPU runs yet, so nobody waits on it; an install of
    /// it still waiting for a retry is forgotten.
    fn invalidate_page(&mut self, ri: usize, page: usize) {
        let vm = self.vm.clone();
        let region = &vm.memory.regions()[ri];
        let ps = region.page_size();
        if !region.is_owned() || region.state.is_private(page) {
            return;
        }
        self.late.retain(|l| (l.ri, l.page) != (ri, page));
        if let Err(e) = region.punch_shared(page as u64 * ps, ps) {
            tracing::trace!(error = %e, "cannot punch an invalidated page");
        }
        region.state.reset_untouched(page);
    }

    /// Records the service latency of faults just woken.
    fn woken(&mut self, waiters: &[Waiter]) {
        self.latencies
            .extend(waiters.iter().map(|w| w.read_at.elapsed()));
    }
}
