//! Asynchronous page sources: a source that answers later (post-copy over the network, an
//! object store) instead of filling a buffer on the worker thread.
//!
//! The worker asks with [`AsyncSource::fetch`], which never blocks, and goes on serving other
//! faults; the faulting thread stays asleep in the kernel. The source answers through the
//! VM's [`Completions`] handle, from any thread, with [`Arrival`]s: requested pages, or pages
//! nobody asked for (a bulk push). The first arrival queued into an empty queue rings an
//! eventfd that the VM's worker polls; the worker then installs the queue and wakes the
//! threads parked on those pages. The rules it follows (a discard wins over late data, a page
//! is installed at most once, a failed page is poisoned, never zero-filled) are in
//! `docs/async-sources.md`.
//!
//! Two queues: **urgent** arrivals (pages a fault asked for: [`Completions::deliver_urgent`])
//! are taken first and whole; **ordered** ones ([`Completions::deliver`]: pushes, invalidations,
//! markers) in order, at most [`ORDERED_PER_TAKE`] bytes per take, so a fault's page never
//! waits behind a push backlog in the daemon. The ordered queue is bounded
//! ([`ORDERED_LIMIT`] bytes): a source delivering faster than the worker installs waits (and a
//! network source stops reading its socket: TCP pushes back), so no backlog builds up that a
//! switchover would have to wait through.

use super::SourceError;
use rustix::event::{eventfd, EventfdFlags};
use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Bytes of ordered arrivals the queue holds before [`Completions::deliver`] waits for room.
pub const ORDERED_LIMIT: u64 = 4 << 20;
/// Bytes of ordered arrivals the worker takes at a time (it reads faults and urgent arrivals
/// between takes).
pub const ORDERED_PER_TAKE: u64 = 1 << 20;

/// Errors setting up an asynchronous source.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The eventfd that wakes the worker could not be created.
    #[error("cannot create the completion doorbell")]
    Doorbell(#[source] std::io::Error),
}

/// A page source that answers later. Offsets and lengths are bytes in the source's address
/// space (`RegionSpec.source_offset` + offset in the region), aligned to the region's page
/// size (4 KiB, or 2 MiB for huge-page regions).
pub trait AsyncSource: Send + Sync + std::fmt::Debug {
    /// Short name for stats and logs.
    fn name(&self) -> &'static str;

    /// Asks for `len` bytes at `offset`. Never blocks: the answer comes through the VM's
    /// [`Completions`], as one or several arrivals, in any order. `urgent`: a fault waits on
    /// it (serve it before background traffic); otherwise it is fault-around or prefetch.
    /// The same range may be asked again (a prefetched page that faults before it arrived is
    /// asked again as urgent); answering twice is harmless.
    fn fetch(&self, offset: u64, len: u64, urgent: bool);

    /// The range was discarded (removed, converted to private): data for it is dropped when
    /// it arrives, so the source may stop sending it.
    fn discarded(&self, _offset: u64, _len: u64) {}

    /// The source as `Any`, for the daemon to find its own kinds of source behind a VM's
    /// (a migration's, to start or ask about it).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// The content of an arrival.
#[derive(Debug)]
pub enum Payload {
    /// The pages' bytes (a multiple of the page size).
    Data(Vec<u8>),
    /// `len` bytes of zeros.
    Zero {
        /// Bytes.
        len: u64,
    },
    /// The source cannot deliver these `len` bytes: pages a fault waits on are poisoned (the
    /// VMM gets SIGBUS there, never zeros); the others are left missing and asked again when
    /// they fault.
    Failed {
        /// Bytes.
        len: u64,
        /// Why.
        error: SourceError,
    },
    /// The source's earlier copy of these `len` bytes is stale (a hybrid migration's source
    /// wrote them after it sent them): the worker drops the pages (punched from the memfd,
    /// untouched again) in order with the arrivals around it. Only for a VM none of whose
    /// vCPUs run yet: no fault can wait on such a page (docs/migration.md, "Hybrid").
    Invalidate {
        /// Bytes.
        len: u64,
    },
    /// Covers nothing: the worker sets `reached` once it has handled every arrival queued
    /// before this one (a hybrid migration's switchover: every invalidation is applied).
    Marker {
        /// Set by the worker.
        reached: Arc<AtomicBool>,
    },
}

/// Pages delivered by an asynchronous source.
#[derive(Debug)]
pub struct Arrival {
    /// Byte offset in the source (page aligned).
    pub offset: u64,
    /// What arrived.
    pub data: Payload,
}

impl Arrival {
    /// Bytes covered.
    pub fn len(&self) -> u64 {
        match &self.data {
            Payload::Data(d) => d.len() as u64,
            Payload::Zero { len } | Payload::Failed { len, .. } | Payload::Invalidate { len } => {
                *len
            }
            Payload::Marker { .. } => 0,
        }
    }

    /// Covers nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What is queued for the worker.
#[derive(Debug, Default)]
struct Queues {
    urgent: Vec<Arrival>,
    ordered: VecDeque<Arrival>,
    /// Bytes the ordered arrivals cover.
    ordered_bytes: u64,
    /// No worker takes any more (the VM is freed or its source lost): deliveries never wait.
    closed: bool,
}

impl Queues {
    fn is_empty(&self) -> bool {
        self.urgent.is_empty() && self.ordered.is_empty()
    }
}

/// The queue between an asynchronous source and the worker that serves its VM.
#[derive(Debug)]
struct Inbox {
    queue: Mutex<Queues>,
    /// Signalled when the worker took ordered arrivals (or the queue was closed).
    room: Condvar,
    lost: AtomicBool,
    /// Readable when the queue went from empty to non-empty (or the source was lost).
    bell: OwnedFd,
    /// Times the bell was rung (each an empty → non-empty transition).
    rings: AtomicU64,
}

/// Where an asynchronous source delivers its pages: cloneable, `Send`, usable from any
/// thread. Given to the source when its VM is set up.
#[derive(Debug, Clone)]
pub struct Completions {
    inbox: Arc<Inbox>,
}

impl Completions {
    /// An empty queue with its doorbell.
    pub fn new() -> Result<Completions, FetchError> {
        let bell = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| FetchError::Doorbell(e.into()))?;
        Ok(Completions {
            inbox: Arc::new(Inbox {
                queue: Mutex::new(Queues::default()),
                room: Condvar::new(),
                lost: AtomicBool::new(false),
                bell,
                rings: AtomicU64::new(0),
            }),
        })
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.inbox.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `arrival` for the worker, in order with the other ordered arrivals; wakes it if
    /// the queue was empty. Waits while [`ORDERED_LIMIT`] bytes are queued (not once the queue
    /// is closed): never call it from inside [`AsyncSource::fetch`], on the worker's thread.
    pub fn deliver(&self, arrival: Arrival) {
        self.deliver_all(std::iter::once(arrival));
    }

    /// Queues several ordered arrivals with at most one wakeup (and waits as
    /// [`Completions::deliver`] does).
    pub fn deliver_all(&self, arrivals: impl IntoIterator<Item = Arrival>) {
        let mut q = self.queues();
        while !q.closed && q.ordered_bytes >= ORDERED_LIMIT {
            q = self
                .inbox
                .room
                .wait_timeout(q, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let was_empty = q.is_empty();
        for a in arrivals {
            q.ordered_bytes += a.len();
            q.ordered.push_back(a);
        }
        let ring = was_empty && !q.is_empty();
        drop(q);
        if ring {
            self.ring();
        }
    }

    /// Queues pages a fault asked for: taken before every ordered arrival, never waits.
    pub fn deliver_urgent(&self, arrival: Arrival) {
        let ring = {
            let mut q = self.queues();
            let was_empty = q.is_empty();
            q.urgent.push(arrival);
            was_empty
        };
        if ring {
            self.ring();
        }
    }

    /// No worker takes arrivals any more: deliveries stop waiting for room.
    pub fn close(&self) {
        self.queues().closed = true;
        self.inbox.room.notify_all();
    }

    /// Declares the source lost for good (its peer died and will not come back): every page a
    /// fault waits on is poisoned, and so is every later fault on a page the source still
    /// owed; pages already installed stay. Arrivals queued before still count.
    pub fn lost(&self) {
        self.inbox.lost.store(true, Ordering::Release);
        self.ring();
    }

    /// Whether [`Completions::lost`] was called.
    pub fn is_lost(&self) -> bool {
        self.inbox.lost.load(Ordering::Acquire)
    }

    /// Times the worker was rung (a wakeup per empty → non-empty transition, and one per
    /// [`Completions::lost`]).
    pub fn rings(&self) -> u64 {
        self.inbox.rings.load(Ordering::Relaxed)
    }

    fn ring(&self) {
        self.inbox.rings.fetch_add(1, Ordering::Relaxed);
        // An eventfd write fails only when the counter would overflow: then it is readable.
        let _ = rustix::io::write(&self.inbox.bell, &1u64.to_ne_bytes());
    }

    /// The doorbell the worker polls.
    pub(crate) fn bell(&self) -> BorrowedFd<'_> {
        self.inbox.bell.as_fd()
    }

    /// Resets the doorbell and moves the queued arrivals to the end of `into`: every urgent
    /// one, then ordered ones up to [`ORDERED_PER_TAKE`] bytes (all of them once the source is
    /// lost: a fault is poisoned only when nothing queued can answer it). Returns whether
    /// ordered arrivals are left (take again soon: no ring announces them). (A delivery after
    /// the reset rings again, so none is left unannounced.)
    pub(crate) fn take(&self, into: &mut Vec<Arrival>) -> bool {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.inbox.bell, &mut buf);
        let all = self.is_lost();
        let mut q = self.queues();
        into.append(&mut q.urgent);
        let mut taken = 0;
        while let Some(a) = q.ordered.front() {
            if taken >= ORDERED_PER_TAKE && !all {
                break;
            }
            taken += a.len();
            q.ordered_bytes = q.ordered_bytes.saturating_sub(a.len());
            into.extend(q.ordered.pop_front());
        }
        let left = !q.ordered.is_empty();
        drop(q);
        if taken > 0 {
            self.inbox.room.notify_all();
        }
        left
    }
}

/// An asynchronous source and the queue it answers into.
#[derive(Debug, Clone)]
pub struct Fetcher {
    /// The source.
    pub source: Arc<dyn AsyncSource>,
    /// Its answers.
    pub completions: Completions,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_arrival_into_an_empty_queue_rings() {
        let c = Completions::new().unwrap();
        let page = |offset| Arrival {
            offset,
            data: Payload::Zero { len: 4096 },
        };
        c.deliver(page(0));
        c.deliver(page(4096));
        c.deliver_all([page(8192), page(12288)]);
        assert_eq!(c.rings(), 1);
        let mut got = Vec::new();
        assert!(!c.take(&mut got));
        assert_eq!(got.len(), 4);
        c.deliver(page(0));
        assert_eq!(c.rings(), 2);
        c.lost();
        assert!(c.is_lost());
        assert_eq!(c.rings(), 3);
    }

    #[test]
    fn urgent_first_ordered_in_slices_and_bounded() {
        let c = Completions::new().unwrap();
        let page = |offset| Arrival {
            offset,
            data: Payload::Zero { len: 4096 },
        };
        let per_take = (ORDERED_PER_TAKE / 4096) as usize;
        let pushed = 3 * per_take;
        c.deliver_all((0..pushed as u64).map(|p| page(p * 4096)));
        c.deliver_urgent(page(1 << 40));
        let mut got = Vec::new();
        assert!(c.take(&mut got), "ordered arrivals left");
        assert_eq!(got[0].offset, 1 << 40, "urgent first");
        assert_eq!(got.len(), 1 + per_take);
        assert!(got[1..]
            .iter()
            .enumerate()
            .all(|(i, a)| a.offset == i as u64 * 4096));
        // Past the limit a delivery waits until the worker takes.
        let full = (ORDERED_LIMIT / 4096) as usize;
        let more = full - (pushed - per_take);
        c.deliver_all((0..more as u64).map(|p| page(p * 4096)));
        let waiting = {
            let c = c.clone();
            std::thread::spawn(move || c.deliver(page(0)))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiting.is_finished(), "the queue is full");
        got.clear();
        c.take(&mut got);
        waiting.join().unwrap();
        // Lost: everything at once.
        c.lost();
        got.clear();
        assert!(!c.take(&mut got));
        assert_eq!(got.len(), full - per_take + 1);
        // Closed: deliveries never wait.
        c.deliver_all((0..full as u64).map(|p| page(p * 4096)));
        c.close();
        c.deliver(page(0));
    }
}
