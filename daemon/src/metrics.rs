//! Per-VM counters and the fault-service latency histogram (fault read → populate/wake done),
//! and the daemon-wide counters ([`DaemonMetrics`]).
//!
//! Guest-triggerable events are counted here, never logged per event. Every counter is a
//! relaxed atomic add on the path that counts it; readers (a `Stats` reply, a Prometheus
//! scrape) take snapshots.

use crate::latency::{Buckets, Latency};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;
use vmpager_protocol::Stats;

/// How pages got into the guest's view of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// `UFFDIO_COPY` from a bounce buffer (also the zeros of a huge page with `copy`).
    Copy,
    /// `UFFDIO_CONTINUE` of pages in the memfd (filled by the daemon, or found there).
    Continue,
    /// `UFFDIO_ZEROPAGE`.
    ZeroPage,
    /// Written straight into the memfd, no uffd ioctl (replayed working sets, pages asked for
    /// over a fault channel): the VMM's next touch maps them.
    Write,
}

impl Install {
    /// Every method, in [`VmMetrics::installed`]'s order.
    pub const ALL: [Install; 4] = [
        Install::Copy,
        Install::Continue,
        Install::ZeroPage,
        Install::Write,
    ];

    /// The label value (Prometheus `method`).
    pub fn name(self) -> &'static str {
        match self {
            Install::Copy => "copy",
            Install::Continue => "continue",
            Install::ZeroPage => "zeropage",
            Install::Write => "write",
        }
    }
}

/// Names of [`VmMetrics::async_counts`] (Prometheus `event` label of `vmpager_vm_async_source`).
pub const ASYNC_COUNTERS: [&str; 8] = [
    "parked",
    "joined",
    "fetched",
    "by_request",
    "by_push",
    "dropped_discarded",
    "dropped_duplicate",
    "dropped_failed",
];

/// Counters of one VM. Written by the thread serving its uffd, read by the control thread.
#[derive(Debug, Default)]
pub struct VmMetrics {
    /// Page-fault events read.
    pub faults: AtomicU64,
    /// Pages installed with source data.
    pub pages_from_source: AtomicU64,
    /// Pages installed as zeros.
    pub pages_zero: AtomicU64,
    /// Faults on pages already installed.
    pub coalesced: AtomicU64,
    /// `EEXIST` from a populate ioctl.
    pub eexist: AtomicU64,
    /// `EAGAIN` retries.
    pub eagain: AtomicU64,
    /// Remove events.
    pub remove_events: AtomicU64,
    /// Unmap events.
    pub unmap_events: AtomicU64,
    /// Remap events.
    pub remap_events: AtomicU64,
    /// Faults outside every declared region.
    pub stray_faults: AtomicU64,
    /// Pages poisoned because the source failed.
    pub source_errors: AtomicU64,
    /// Populate ioctls that failed (page poisoned).
    pub populate_errors: AtomicU64,
    /// Shared-side faults on private pages (poisoned).
    pub private_faults_poisoned: AtomicU64,
    /// Memory-fault exits received.
    pub memory_fault_exits: AtomicU64,
    /// Hypercall exits received.
    pub hypercall_exits: AtomicU64,
    /// Ranges converted to private.
    pub converted_to_private: AtomicU64,
    /// Ranges converted to shared.
    pub converted_to_shared: AtomicU64,
    /// Conversions refused.
    pub conversions_denied: AtomicU64,
    /// Set when the daemon keeps the attributes itself.
    pub attributes_emulated: AtomicU64,
    /// Pages installed ahead of a fault.
    pub pages_prefetched: AtomicU64,
    /// Pages pushed from a replayed working set.
    pub pages_replayed: AtomicU64,
    /// Bytes read from the page source.
    pub source_bytes_read: AtomicU64,
    /// Fault-channel requests served.
    pub channel_requests: AtomicU64,
    /// Fault-channel requests refused.
    pub channel_errors: AtomicU64,
    /// Faults parked on a page an asynchronous source was asked for.
    pub parked_faults: AtomicU64,
    /// Faults that joined a page already parked on (no second fetch).
    pub joined_faults: AtomicU64,
    /// Pages asked of an asynchronous source (urgent and background).
    pub pages_fetched: AtomicU64,
    /// Pages an asynchronous source delivered that had been asked for.
    pub pages_by_request: AtomicU64,
    /// Pages an asynchronous source delivered unasked (a bulk push).
    pub pages_by_push: AtomicU64,
    /// Arrived pages dropped because their range was discarded (removed, private) meanwhile.
    pub arrivals_discarded: AtomicU64,
    /// Arrived pages dropped because the page was installed already (a second arrival).
    pub arrivals_duplicate: AtomicU64,
    /// Pages a source reported failed while no fault waited on them: nothing installed, the
    /// next fault asks again.
    pub arrivals_failed: AtomicU64,
    /// Pages installed, by method ([`Install::ALL`] order; see [`VmMetrics::count_installed`]).
    installed: [AtomicU64; 4],
    denial_log: Mutex<DenialLog>,
    latency: Mutex<Latency>,
}

/// Rate limit of denial log lines (a guest can trigger denials at will).
#[derive(Debug, Default)]
struct DenialLog {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl VmMetrics {
    /// Logs a refused conversion: at most one line per second per VM, with the count of the
    /// ones not logged in between (every denial is counted in `conversions_denied`).
    pub fn note_denial(
        &self,
        vm: u64,
        gpa: u64,
        size: u64,
        to_private: bool,
        why: &dyn std::fmt::Display,
    ) {
        let Ok(mut log) = self.denial_log.lock() else {
            return;
        };
        let now = std::time::Instant::now();
        if log
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            log.suppressed += 1;
            tracing::trace!(vm, gpa, size, to_private, %why, "conversion refused");
            return;
        }
        tracing::info!(vm, gpa, size, to_private, %why, suppressed = log.suppressed, "conversion refused");
        log.last = Some(now);
        log.suppressed = 0;
    }

    /// Fresh counters and an empty latency histogram (allocated at the first sample; 1 ns ..
    /// 60 s, 2 significant digits: precision in [`crate::latency`]).
    pub fn new() -> VmMetrics {
        VmMetrics::default()
    }

    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Counts `n` pages installed with `method`.
    pub fn count_installed(&self, method: Install, n: u64) {
        let i = Install::ALL.iter().position(|&m| m == method).unwrap_or(0);
        self.installed[i].fetch_add(n, Relaxed);
    }

    /// Pages installed with `method` so far.
    pub fn installed(&self, method: Install) -> u64 {
        let i = Install::ALL.iter().position(|&m| m == method).unwrap_or(0);
        self.installed[i].load(Relaxed)
    }

    /// Records latency samples of a batch of served faults.
    pub fn record_latencies(&self, samples: &[Duration]) {
        if samples.is_empty() {
            return;
        }
        if let Ok(mut latency) = self.latency.lock() {
            latency.record(samples);
        }
    }

    /// The latency samples per Prometheus bucket (one pass over the histogram under its lock).
    pub fn latency_buckets(&self) -> Buckets {
        self.latency.lock().map(|l| l.buckets()).unwrap_or_default()
    }

    /// Bytes the latency histogram holds on the heap (0 before the first fault).
    pub fn latency_heap_bytes(&self) -> usize {
        self.latency.lock().map_or(0, |l| l.heap_bytes())
    }

    /// The asynchronous-source counters, in [`ASYNC_COUNTERS`] order (not in the wire
    /// `Stats`: the Prometheus endpoint and in-process readers get them here).
    pub fn async_counts(&self) -> [u64; 8] {
        [
            &self.parked_faults,
            &self.joined_faults,
            &self.pages_fetched,
            &self.pages_by_request,
            &self.pages_by_push,
            &self.arrivals_discarded,
            &self.arrivals_duplicate,
            &self.arrivals_failed,
        ]
        .map(|c| c.load(Relaxed))
    }

    /// A consistent-enough snapshot for a `Stats` reply.
    pub fn snapshot(&self, vm_id: u64, populate_method: u64) -> Stats {
        let mut s = Stats {
            vm_id,
            faults: self.faults.load(Relaxed),
            pages_from_source: self.pages_from_source.load(Relaxed),
            pages_zero: self.pages_zero.load(Relaxed),
            coalesced: self.coalesced.load(Relaxed),
            eexist: self.eexist.load(Relaxed),
            eagain: self.eagain.load(Relaxed),
            remove_events: self.remove_events.load(Relaxed),
            unmap_events: self.unmap_events.load(Relaxed),
            remap_events: self.remap_events.load(Relaxed),
            stray_faults: self.stray_faults.load(Relaxed),
            source_errors: self.source_errors.load(Relaxed),
            populate_errors: self.populate_errors.load(Relaxed),
            private_faults_poisoned: self.private_faults_poisoned.load(Relaxed),
            memory_fault_exits: self.memory_fault_exits.load(Relaxed),
            hypercall_exits: self.hypercall_exits.load(Relaxed),
            converted_to_private: self.converted_to_private.load(Relaxed),
            converted_to_shared: self.converted_to_shared.load(Relaxed),
            conversions_denied: self.conversions_denied.load(Relaxed),
            attributes_emulated: self.attributes_emulated.load(Relaxed),
            populate_method,
            pages_prefetched: self.pages_prefetched.load(Relaxed),
            pages_replayed: self.pages_replayed.load(Relaxed),
            source_bytes_read: self.source_bytes_read.load(Relaxed),
            channel_requests: self.channel_requests.load(Relaxed),
            channel_errors: self.channel_errors.load(Relaxed),
            ..Stats::default()
        };
        if let Ok(latency) = self.latency.lock() {
            let q = latency.quantiles();
            s.latency_samples = q.samples;
            s.latency_p50_ns = q.p50;
            s.latency_p99_ns = q.p99;
            s.latency_p999_ns = q.p999;
            s.latency_max_ns = q.max;
        }
        s
    }
}

/// Daemon-wide counters, read by the metrics endpoint. Each field says what increments it;
/// the VM lifecycle ones that no code path reaches yet stay 0 until restarts and grace periods
/// exist.
#[derive(Debug)]
pub struct DaemonMetrics {
    /// VMs created (a `CreateVm` accepted): [`crate::LiveVms::insert`].
    pub vms_created: AtomicU64,
    /// VMs freed, for any reason: [`crate::LiveVms::remove`].
    pub vms_freed: AtomicU64,
    /// VMs a VMM handed back (`ReclaimVm`): after a daemon restart, or over a new connection.
    pub vms_restored: AtomicU64,
    /// Of those, VMs this daemon did not know: rebuilt from what the VMM kept (a restart).
    pub vms_rebuilt: AtomicU64,
    /// VMs a new VMM process took over (`ReattachVm`).
    pub vms_reattached: AtomicU64,
    /// VMs whose VMM released them or went away, kept for the grace period.
    pub vms_orphaned: AtomicU64,
    /// Kept VMs freed because no VMM came back within the grace period.
    pub vms_expired: AtomicU64,
    /// Client connections accepted (past the limit and uid checks).
    pub connections_accepted: AtomicU64,
    /// Client connections closed.
    pub connections_closed: AtomicU64,
    /// Starts of this daemon process: 1 (a restart shows as `vms_rebuilt`: the VMs its VMMs
    /// handed back).
    pub daemon_starts: AtomicU64,
    /// When this process started, seconds since the Unix epoch.
    pub start_time: f64,
}

impl Default for DaemonMetrics {
    fn default() -> DaemonMetrics {
        DaemonMetrics {
            vms_created: AtomicU64::new(0),
            vms_freed: AtomicU64::new(0),
            vms_restored: AtomicU64::new(0),
            vms_rebuilt: AtomicU64::new(0),
            vms_reattached: AtomicU64::new(0),
            vms_orphaned: AtomicU64::new(0),
            vms_expired: AtomicU64::new(0),
            connections_accepted: AtomicU64::new(0),
            connections_closed: AtomicU64::new(0),
            daemon_starts: AtomicU64::new(1),
            start_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        }
    }
}

impl DaemonMetrics {
    /// Connections open now.
    pub fn connections(&self) -> u64 {
        let closed = self.connections_closed.load(Relaxed);
        self.connections_accepted
            .load(Relaxed)
            .saturating_sub(closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reports_counters_and_percentiles() {
        let m = VmMetrics::new();
        VmMetrics::bump(&m.faults);
        VmMetrics::bump(&m.faults);
        let samples: Vec<_> = (1..=1000).map(Duration::from_micros).collect();
        m.record_latencies(&samples);
        let s = m.snapshot(7, 1);
        assert_eq!(
            (s.vm_id, s.faults, s.latency_samples, s.populate_method),
            (7, 2, 1000, 1)
        );
        // Never below the exact value, at most 1 % above (crate::latency).
        assert!(
            (500_000..=505_000).contains(&s.latency_p50_ns),
            "{}",
            s.latency_p50_ns
        );
        assert!(
            (990_000..=999_900).contains(&s.latency_p99_ns),
            "{}",
            s.latency_p99_ns
        );
        assert!((1_000_000..=1_010_000).contains(&s.latency_max_ns));
    }

    #[test]
    fn installs_are_counted_per_method_and_idle_vms_hold_no_histogram() {
        let m = VmMetrics::new();
        assert_eq!(m.latency_heap_bytes(), 0);
        m.count_installed(Install::Copy, 3);
        m.count_installed(Install::Write, 2);
        m.count_installed(Install::Copy, 1);
        let got: Vec<u64> = Install::ALL.iter().map(|&i| m.installed(i)).collect();
        assert_eq!(got, [4, 0, 0, 2]);
        m.record_latencies(&[Duration::from_micros(30)]);
        assert!(m.latency_heap_bytes() > 0);
        assert_eq!(m.latency_buckets().count, 1);
    }

    #[test]
    fn open_connections_are_accepted_minus_closed() {
        let d = DaemonMetrics::default();
        d.connections_accepted.fetch_add(3, Relaxed);
        d.connections_closed.fetch_add(1, Relaxed);
        assert_eq!(d.connections(), 2);
        assert_eq!(d.daemon_starts.load(Relaxed), 1);
        assert!(d.start_time > 1.6e9);
    }
}
