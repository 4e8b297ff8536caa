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

use super::SourceError;
use rustix::event::{eventfd, EventfdFlags};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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

/// The queue between an asynchronous source and the worker that serves its VM.
#[derive(Debug)]
struct Inbox {
    queue: Mutex<Vec<Arrival>>,
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
                queue: Mutex::new(Vec::new()),
                lost: AtomicBool::new(false),
                bell,
                rings: AtomicU64::new(0),
            }),
        })
    }

    /// Queues `arrival` for the worker; wakes it if the queue was empty.
    pub fn deliver(&self, arrival: Arrival) {
        self.deliver_all(std::iter::once(arrival));
    }

    /// Queues several arrivals with at most one wakeup.
    pub fn deliver_all(&self, arrivals: impl IntoIterator<Item = Arrival>) {
        let was_empty = {
            let mut q = self.inbox.queue.lock().unwrap_or_else(|e| e.into_inner());
            let was_empty = q.is_empty();
            q.extend(arrivals);
            was_empty && !q.is_empty()
        };
        if was_empty {
            self.ring();
        }
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

    /// Resets the doorbell and moves every queued arrival to the end of `into`. (A delivery
    /// after the reset rings again, so none is left unannounced.)
    pub(crate) fn take(&self, into: &mut Vec<Arrival>) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.inbox.bell, &mut buf);
        let mut q = self.inbox.queue.lock().unwrap_or_else(|e| e.into_inner());
        into.append(&mut q);
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
        c.take(&mut got);
        assert_eq!(got.len(), 4);
        c.deliver(page(0));
        assert_eq!(c.rings(), 2);
        c.lost();
        assert!(c.is_lost());
        assert_eq!(c.rings(), 3);
    }
}
