//! The destination's side of a hybrid migration (docs/migration.md, "Hybrid"): the source's
//! `Invalidate`s and its `Switchover` marker, both handed to the VM's worker in order with the
//! pages that arrived before them.

use super::Remote;
use crate::source::{Arrival, Payload};
use std::sync::atomic::Ordering;
use vmpager_migration::PAGE_SIZE;

impl Remote {
    /// Hybrid: the source wrote these pages after it sent them. Before the switchover they are
    /// no longer here (asked for or pushed again) and the worker drops its copy, in order with
    /// the arrivals; after it (a source that cannot know we switched, on a new connection),
    /// ignored: the vCPUs run, and every page here is the frozen source's already.
    pub(super) fn invalidate(&self, ranges: &[vmpager_migration::PageRange]) {
        if self.marker_seen.load(Ordering::Acquire) {
            return;
        }
        let total = self.received.total();
        let arrivals = ranges.iter().filter_map(|r| {
            let end = r.first.saturating_add(r.count).min(total);
            if r.first >= end {
                return None; // Not pages of this VM.
            }
            for page in r.first..end {
                self.received.clear(page);
            }
            self.invalidated.fetch_add(end - r.first, Ordering::Relaxed);
            Some(Arrival {
                offset: r.first * PAGE_SIZE,
                data: Payload::Invalidate {
                    len: (end - r.first) * PAGE_SIZE,
                },
            })
        });
        self.completions.deliver_all(arrivals.collect::<Vec<_>>());
    }

    /// The source's `Switchover` marker: every invalidation came before it. The state is
    /// `Switched` once the worker handled everything queued before (the VMM may then run its
    /// vCPUs); the marker is acknowledged to the source (which believes our `Done` only then).
    pub(super) fn switchover(&self) {
        if !self.marker_seen.swap(true, Ordering::AcqRel) {
            self.completions.deliver(Arrival {
                offset: 0,
                data: Payload::Marker {
                    reached: self.switched.clone(),
                },
            });
        }
        self.ack_pending.store(true, Ordering::Release);
        self.wake.notify_all();
    }
}
