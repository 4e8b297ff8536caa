//! `Stats`: a VM's counters and fault-service latency percentiles, as a fixed array of u64.

use super::{DecodeError, Kind};
use zerocopy::little_endian::U64;
use zerocopy::{FromBytes, IntoBytes};

macro_rules! stats_struct {
    ($(#[doc = $doc:literal] $field:ident,)*) => {
        /// `Stats`: a VM's counters and fault-service latency (fault read → wake) percentiles.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct Stats {
            $(#[doc = $doc] pub $field: u64,)*
        }
        impl Stats {
            /// Number of u64 fields on the wire.
            pub const FIELDS: usize = [$(stringify!($field)),*].len();
            fn to_words(self) -> [u64; Self::FIELDS] {
                [$(self.$field),*]
            }
            fn from_words(w: &[U64]) -> Stats {
                let mut it = w.iter().map(|v| v.get());
                Stats { $($field: it.next().unwrap_or(0),)* }
            }
            /// `(name, value)` of every field, in wire order.
            pub fn fields(&self) -> [(&'static str, u64); Self::FIELDS] {
                [$((stringify!($field), self.$field)),*]
            }
        }
    };
}

stats_struct! {
    /// VM id.
    vm_id,
    /// Page-fault events read from the uffd.
    faults,
    /// Pages installed from the page source's data.
    pages_from_source,
    /// Pages installed as zeros (zero source, past the end of a file, or removed ranges).
    pages_zero,
    /// Faults on pages already installed (duplicates): only woken.
    coalesced,
    /// Populate ioctls that found the page already present (`EEXIST`): woken.
    eexist,
    /// Populate ioctls retried after `EAGAIN` (pending remove/unmap events).
    eagain,
    /// `UFFD_EVENT_REMOVE` events handled.
    remove_events,
    /// `UFFD_EVENT_UNMAP` events handled.
    unmap_events,
    /// `UFFD_EVENT_REMAP` events handled.
    remap_events,
    /// Faults outside every region the VMM declared: poisoned (the VMM gets SIGBUS).
    stray_faults,
    /// Populate ioctls that failed for another reason than EEXIST/EAGAIN: page poisoned.
    populate_errors,
    /// Pages poisoned because the page source failed to deliver them.
    source_errors,
    /// Shared-side faults on private pages: poisoned, never served with data.
    private_faults_poisoned,
    /// Memory-fault exits received over the mailbox.
    memory_fault_exits,
    /// `KVM_HC_MAP_GPA_RANGE` exits received over the mailbox.
    hypercall_exits,
    /// Ranges converted to private.
    converted_to_private,
    /// Ranges converted to shared.
    converted_to_shared,
    /// Conversions refused (policy, validation, rate limit).
    conversions_denied,
    /// 1 when the daemon keeps the attributes itself (`--emulate-attributes`), not KVM.
    attributes_emulated,
    /// Populate method in use (`PopulateMethod` value).
    populate_method,
    /// Pages installed ahead of a fault (fault-around, prefetch); also counted in pages_from_source or pages_zero.
    pages_prefetched,
    /// Pages pushed ahead of the guest from a replayed working set; also counted in pages_from_source or pages_zero.
    pages_replayed,
    /// Bytes read from the page source.
    source_bytes_read,
    /// Requests served on a fault channel (`AttachChannel`), e.g. cloud-hypervisor's PageFault.
    channel_requests,
    /// Fault-channel requests refused (outside every region, wrong page size, source failure).
    channel_errors,
    /// Latency samples recorded.
    latency_samples,
    /// Median fault-service latency, nanoseconds.
    latency_p50_ns,
    /// 99th percentile, nanoseconds.
    latency_p99_ns,
    /// 99.9th percentile, nanoseconds.
    latency_p999_ns,
    /// Largest latency, nanoseconds.
    latency_max_ns,
}

impl Stats {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        for w in self.to_words() {
            out.extend_from_slice(U64::new(w).as_bytes());
        }
    }

    pub(super) fn decode(p: &[u8]) -> Result<Stats, DecodeError> {
        let words = <[U64]>::ref_from_bytes(p)
            .ok()
            .filter(|w| w.len() == Stats::FIELDS)
            .ok_or(DecodeError::Malformed {
                kind: Kind::Stats,
                len: p.len(),
            })?;
        let stats = Stats::from_words(words);
        super::nonzero_vm(stats.vm_id)?;
        Ok(stats)
    }
}
