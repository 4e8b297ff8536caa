//! Per-VM counters and the fault-service latency histogram (fault read → populate/wake done).
//!
//! Guest-triggerable events are counted here, never logged per event.

use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;
use vmpager_protocol::Stats;

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
    denial_log: Mutex<DenialLog>,
    latency: Mutex<Option<Histogram<u64>>>,
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

    /// Fresh counters and an empty histogram (1 ns .. 60 s, 3 significant digits).
    pub fn new() -> VmMetrics {
        let h = Histogram::new_with_bounds(1, 60_000_000_000, 3).ok();
        VmMetrics {
            latency: Mutex::new(h),
            ..Default::default()
        }
    }

    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Records latency samples of a batch of served faults.
    pub fn record_latencies(&self, samples: &[Duration]) {
        if samples.is_empty() {
            return;
        }
        if let Ok(mut guard) = self.latency.lock() {
            if let Some(h) = guard.as_mut() {
                for s in samples {
                    h.saturating_record(s.as_nanos().min(u128::from(u64::MAX)) as u64);
                }
            }
        }
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
        if let Ok(guard) = self.latency.lock() {
            if let Some(h) = guard.as_ref().filter(|h| !h.is_empty()) {
                s.latency_samples = h.len();
                s.latency_p50_ns = h.value_at_quantile(0.50);
                s.latency_p99_ns = h.value_at_quantile(0.99);
                s.latency_p999_ns = h.value_at_quantile(0.999);
                s.latency_max_ns = h.max();
            }
        }
        s
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
        assert!(
            (499_000..=501_000).contains(&s.latency_p50_ns),
            "{}",
            s.latency_p50_ns
        );
        assert!(
            (989_000..=991_000).contains(&s.latency_p99_ns),
            "{}",
            s.latency_p99_ns
        );
        assert!((999_000..=1_001_000).contains(&s.latency_max_ns));
    }
}
