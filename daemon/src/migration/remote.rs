//! The destination side: a VM created with the `Remote` page source pulls its memory from the
//! source daemon named by `MigrateIn` (docs/migration.md).
//!
//! [`RemoteSource`] is the VM's asynchronous source ([`crate::source::AsyncSource`]): a fault's
//! urgent request goes out on the **urgent** channel at once (batched with whatever else is
//! waiting), background requests only steer the **bulk** push (`Hint`), and every page that
//! comes back on either channel is delivered to the VM's worker ([`Completions`]). Pull only
//! ([`RemoteParams::push`] false): background requests are pulled on the urgent channel too,
//! and the bulk channel is opened only once every page is here, to say `Done`. One channel
//! ([`RemoteParams::one_channel`], for comparison only): no urgent channel, requests go on the
//! bulk channel and their answers queue behind the push.
//!
//! Failures: a connection that breaks (or falls silent past the liveness deadline) is made
//! again with back-off; the bulk channel then says again what is here (`Resume`) and the
//! urgent one asks again for every page still awaited. Faults meanwhile stay parked. If no
//! connection can be made for the migration deadline, or the VMM abandons the migration, the
//! source is *lost*: every page not here is poisoned when touched, never zero-filled.

mod channels;
mod hybrid;

use super::sent::PageBits;
use crate::source::{Arrival, AsyncSource, Completions, Payload};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vmpager_migration::{ChannelKind, Key, Timeouts, PAGE_SIZE};
use vmpager_protocol::message::{MigrationCounters, MigrationState, MigrationStatus};

/// Pages of one `Resume` frame's bitmap (its runs stay far below the frame limit).
const RESUME_CHUNK: u64 = 1 << 20;

/// Where the source is and how to prove who we are.
#[derive(Debug, Clone)]
pub struct RemoteParams {
    /// `host:port` of the source daemon's `--migration-listen`.
    pub addr: String,
    /// The migration's id.
    pub migration_id: u64,
    /// Its key.
    pub key: Key,
    /// Connection timeouts (liveness: how long a silent connection is trusted).
    pub timeouts: Timeouts,
    /// How long the source may stay unreachable before it is declared lost.
    pub deadline: Duration,
    /// The source pushes every page nobody asked for (`false`: pull only, see
    /// [`crate::Config::migration_push`]).
    pub push: bool,
    /// No urgent channel: requests go on the bulk channel, behind the push (see
    /// [`crate::Config::migration_one_channel`]; needs `push`).
    pub one_channel: bool,
}

#[derive(Debug, Default)]
struct Requests {
    /// Urgent pages asked for and not yet here (asked again after a reconnect).
    pending: BTreeSet<u64>,
    /// Pages to ask for on the next send.
    queue: Vec<u64>,
    /// When each pending page was first asked for (the remote fault latency).
    asked: std::collections::HashMap<u64, Instant>,
}

/// The state shared by the VM's source and the migration's threads.
#[derive(Debug)]
pub struct Remote {
    completions: Completions,
    /// Pages here (arrived, or here before the migration began).
    received: PageBits,
    requests: Mutex<Requests>,
    wake: Condvar,
    /// The latest background request: where the bulk push should go on.
    hint: AtomicU64,
    hint_sent: AtomicU64,
    started: AtomicBool,
    /// `false`: pull only (background requests are pulled too, nothing is pushed).
    push: AtomicBool,
    /// No urgent channel: the bulk channel carries the requests too.
    one_channel: AtomicBool,
    stop: AtomicBool,
    state: AtomicU32,
    migration_id: AtomicU64,
    pulled: AtomicU64,
    pushed: AtomicU64,
    bytes: AtomicU64,
    reconnects: AtomicU64,
    refused: AtomicU64,
    poisoned: AtomicU64,
    /// Hybrid: pages invalidated by the source.
    invalidated: AtomicU64,
    /// Hybrid: the source's `Switchover` marker was received (later `Invalidate`s are
    /// ignored: the vCPUs may run from then on).
    marker_seen: AtomicBool,
    /// Hybrid: the worker applied every invalidation before the marker (state `Switched`).
    switched: Arc<AtomicBool>,
    /// Hybrid: the marker is to be acknowledged (a `Switchover` to the source).
    ack_pending: AtomicBool,
    /// Request to arrival of urgent pages, in nanoseconds (`None` if it could not be made).
    latency: Mutex<Option<hdrhistogram::Histogram<u64>>>,
}

impl Remote {
    /// The state of a VM of `total_pages` pages (4 KiB, the remote address space) whose pages
    /// go to `completions`.
    pub fn new(completions: Completions, total_pages: u64) -> Arc<Remote> {
        Arc::new(Remote {
            completions,
            received: PageBits::new(total_pages),
            requests: Mutex::new(Requests::default()),
            wake: Condvar::new(),
            hint: AtomicU64::new(u64::MAX),
            hint_sent: AtomicU64::new(u64::MAX),
            started: AtomicBool::new(false),
            push: AtomicBool::new(true),
            one_channel: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            state: AtomicU32::new(MigrationState::None as u32),
            migration_id: AtomicU64::new(0),
            pulled: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            poisoned: AtomicU64::new(0),
            invalidated: AtomicU64::new(0),
            marker_seen: AtomicBool::new(false),
            switched: Arc::new(AtomicBool::new(false)),
            ack_pending: AtomicBool::new(false),
            latency: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1_000, 60_000_000_000, 2).ok(),
            ),
        })
    }

    fn requests(&self) -> std::sync::MutexGuard<'_, Requests> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where it is.
    pub fn state(&self) -> MigrationState {
        match self.state.load(Ordering::Acquire) {
            1 => MigrationState::Running,
            2 => MigrationState::Complete,
            3 => MigrationState::Abandoned,
            _ => MigrationState::None,
        }
    }

    fn set_state(&self, s: MigrationState) {
        self.state.store(s as u32, Ordering::Release);
    }

    /// Marks page `page` as here before the migration starts (a page the VM already has: after
    /// a daemon restart, from its page-state file).
    pub fn mark_present(&self, page: u64) {
        self.received.set(page);
    }

    /// Its counters.
    pub fn status(&self, vm_id: u64) -> MigrationStatus {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (p50, p99) = {
            let h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
            match h.as_ref() {
                Some(h) if !h.is_empty() => (h.value_at_quantile(0.5), h.value_at_quantile(0.99)),
                _ => (0, 0),
            }
        };
        let missing = self.received.total() - self.received.count();
        let state = match self.state() {
            MigrationState::Running if self.switched.load(Ordering::Acquire) => {
                MigrationState::Switched
            }
            s => s,
        };
        MigrationStatus {
            vm_id,
            migration_id: get(&self.migration_id),
            state,
            counters: MigrationCounters {
                total_pages: self.received.total(),
                pages_done: self.received.count(),
                pages_pulled: get(&self.pulled),
                pages_pushed: get(&self.pushed),
                pages_poisoned: match self.state() {
                    MigrationState::Abandoned => missing,
                    _ => get(&self.poisoned),
                },
                reconnects: get(&self.reconnects),
                refused: get(&self.refused),
                pages_invalidated: get(&self.invalidated),
                bytes: get(&self.bytes),
                fault_p50_ns: p50,
                fault_p99_ns: p99,
            },
        }
    }

    /// Starts pulling from the source (once; a second call with the same migration is a
    /// no-op).
    pub fn start(self: &Arc<Remote>, params: RemoteParams) -> std::io::Result<()> {
        if params.one_channel && !params.push {
            // The bulk channel of a pull-only migration opens only at the end.
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "one channel needs the push (not pull only)",
            ));
        }
        if self.started.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.migration_id
            .store(params.migration_id, Ordering::Relaxed);
        self.push.store(params.push, Ordering::Relaxed);
        self.one_channel
            .store(params.one_channel, Ordering::Relaxed);
        self.set_state(if self.received.is_full() {
            MigrationState::Complete
        } else {
            MigrationState::Running
        });
        if self.received.is_full() {
            return Ok(());
        }
        let params = Arc::new(params);
        let kinds: &[ChannelKind] = if params.one_channel {
            &[ChannelKind::Bulk]
        } else {
            &[ChannelKind::Urgent, ChannelKind::Bulk]
        };
        for &kind in kinds {
            let (r, p) = (self.clone(), params.clone());
            std::thread::Builder::new()
                .name(match kind {
                    ChannelKind::Urgent => "vmpager-pull-u".into(),
                    ChannelKind::Bulk => "vmpager-pull-b".into(),
                })
                .spawn(move || r.run_channel(kind, &p))?;
        }
        Ok(())
    }

    /// Gives up on the source: every page not here is poisoned when touched.
    pub fn abandon(&self) {
        if self.state() == MigrationState::Complete {
            return;
        }
        self.set_state(MigrationState::Abandoned);
        self.stop.store(true, Ordering::Release);
        self.completions.lost();
        self.completions.close();
        self.wake.notify_all();
    }

    /// Stops the threads (the VM is freed).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        self.completions.close();
        self.wake.notify_all();
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// `count` pages from `first` arrived: counted, marked here, handed to the worker. Counted
    /// as pulled if they came on the urgent channel, or (one channel) if they answer a pending
    /// request; as pushed otherwise.
    fn arrived(&self, first: u64, count: u64, urgent: bool, data: Payload) {
        let total = self.received.total();
        if first >= total || count == 0 || first + count > total {
            return; // Not pages of this VM: never installed.
        }
        let now = Instant::now();
        let (mut fresh, mut answered) = (0, 0);
        {
            let mut r = self.requests();
            let mut h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
            for page in first..first + count {
                let new = self.received.set(page);
                fresh += u64::from(new);
                if r.pending.remove(&page) {
                    answered += u64::from(new);
                    if let (Some(t), Some(h)) = (r.asked.remove(&page), h.as_mut()) {
                        h.saturating_record((now - t).as_nanos() as u64);
                    }
                }
            }
        }
        let pulled = if urgent {
            fresh
        } else if self.one_channel.load(Ordering::Relaxed) {
            answered
        } else {
            0
        };
        self.pulled.fetch_add(pulled, Ordering::Relaxed);
        self.pushed.fetch_add(fresh - pulled, Ordering::Relaxed);
        if let Payload::Data(d) = &data {
            self.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        let arrival = Arrival {
            offset: first * PAGE_SIZE,
            data,
        };
        if urgent {
            // A fault waits on it: never behind the push backlog.
            self.completions.deliver_urgent(arrival);
        } else {
            self.completions.deliver(arrival);
        }
        if self.received.is_full() {
            self.wake.notify_all();
        }
    }
}

/// The VM's asynchronous source: requests go to the migration's threads.
#[derive(Debug)]
pub struct RemoteSource(pub Arc<Remote>);

impl AsyncSource for RemoteSource {
    fn name(&self) -> &'static str {
        "remote"
    }

    fn fetch(&self, offset: u64, len: u64, urgent: bool) {
        let remote = &self.0;
        let first = offset / PAGE_SIZE;
        let end = offset.saturating_add(len).div_ceil(PAGE_SIZE);
        if remote.state() == MigrationState::Abandoned {
            return; // Lost: the worker poisons (`Completions::lost`).
        }
        if !urgent && remote.push.load(Ordering::Relaxed) {
            // The bulk push brings every page; a background request only says where to push.
            remote.hint.store(first, Ordering::Relaxed);
            remote.wake.notify_all();
            return;
        }
        let now = Instant::now();
        let mut r = remote.requests();
        for page in first..end {
            if !remote.received.get(page) && r.pending.insert(page) {
                r.queue.push(page);
                // Only faults count in the remote fault latency (pull only: readahead is
                // pulled too).
                if urgent {
                    r.asked.insert(page, now);
                }
            }
        }
        remote.hint.store(first, Ordering::Relaxed);
        drop(r);
        remote.wake.notify_all();
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Drop for RemoteSource {
    fn drop(&mut self) {
        // The VM is freed: its migration's threads end.
        self.0.shutdown();
    }
}

impl RemoteSource {
    /// The remote source behind `source`, if it is one.
    pub fn of(source: &crate::source::Source) -> Option<&Arc<Remote>> {
        let f = source.fetcher()?;
        f.source
            .as_any()
            .downcast_ref::<RemoteSource>()
            .map(|r| &r.0)
    }
}
