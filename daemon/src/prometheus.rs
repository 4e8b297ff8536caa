//! The Prometheus families: a `prometheus-client` collector that reads, at each scrape, the
//! counters the daemon keeps anyway (every VM's [`VmMetrics`](crate::metrics::VmMetrics), the
//! [`DaemonMetrics`](crate::metrics::DaemonMetrics)), so the fault path pays nothing for the
//! export. Encoded by `prometheus-client` in the OpenMetrics text format or the Prometheus text
//! format 0.0.4. Every family and label: docs/operations.md.

use crate::latency::{Buckets, BUCKET_BOUNDS_NS};
use crate::metrics::{Install, ASYNC_COUNTERS};
use crate::session::{AttributeKeeper, Populate, Vm};
use crate::LiveVms;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use vmpager_protocol::Stats;

/// Prefix of every family.
pub const PREFIX: &str = "vmpager";
/// `Content-Type` of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Text formats the endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text (asked for with `Accept: application/openmetrics-text`).
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (the default: curl, older scrapers).
    Prometheus,
}

impl Format {
    /// The format an `Accept` header asks for.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// Its `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::Prometheus => PROMETHEUS_CONTENT_TYPE,
        }
    }
}

/// The registry of the endpoint: one collector over the daemon's live VMs.
pub fn registry(live: Arc<LiveVms>) -> Registry {
    let mut r = Registry::with_prefix(PREFIX);
    r.register_collector(Box::new(VmCollector { live }));
    r
}

/// Encodes every family of `registry` in `format`.
pub fn encode(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry)?,
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?
        }
    }
    Ok(out)
}

/// Reads the live VMs at each scrape.
#[derive(Debug)]
struct VmCollector {
    live: Arc<LiveVms>,
}

/// What one scrape reads of one VM (each counter loaded once).
struct VmSnapshot {
    id: String,
    stats: Stats,
    installed: [u64; 4],
    asynchronous: [u64; 8],
    /// A snapshot-URL VM's object source counters.
    object: Option<[u64; 8]>,
    latency: Buckets,
    source: &'static str,
    populate: &'static str,
    vm_type: &'static str,
    attributes: &'static str,
    memory: u64,
}

impl VmSnapshot {
    fn of(vm: &Vm) -> VmSnapshot {
        VmSnapshot {
            id: vm.id.to_string(),
            stats: vm.metrics.snapshot(vm.id, vm.populate.wire() as u64),
            installed: Install::ALL.map(|m| vm.metrics.installed(m)),
            asynchronous: vm.metrics.async_counts(),
            object: crate::source::object::ObjectSource::of(&vm.source)
                .map(|o| o.counters().snapshot()),
            latency: vm.metrics.latency_buckets(),
            source: vm.source.name(),
            populate: match vm.populate {
                Populate::Copy => "copy",
                Populate::Continue => "continue",
            },
            vm_type: vm.vm_type.name(),
            attributes: match &vm.private {
                None => "none",
                Some(p) if p.attributes == AttributeKeeper::Kvm => "kvm",
                Some(_) => "emulated",
            },
            memory: vm.memory.regions().iter().map(|r| r.size()).sum(),
        }
    }
}

type Labels = Vec<(&'static str, String)>;

/// A counter family with one sample per row.
fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, v) in rows {
        m.encode_family(labels)?
            .encode_counter::<NoLabelSet, _, u64>(v, None)?;
    }
    Ok(())
}

/// A gauge family with one sample per row.
fn gauges<V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels, V)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, v) in rows {
        m.encode_family(labels)?.encode_gauge(v)?;
    }
    Ok(())
}

fn vm_label(s: &VmSnapshot) -> Labels {
    vec![("vm", s.id.clone())]
}

fn with(s: &VmSnapshot, key: &'static str, value: &str) -> Labels {
    vec![("vm", s.id.clone()), (key, value.to_string())]
}

/// One row per VM of `f`'s value.
fn per_vm(vms: &[VmSnapshot], f: impl Fn(&Stats) -> u64) -> Vec<(Labels, u64)> {
    vms.iter().map(|s| (vm_label(s), f(&s.stats))).collect()
}

/// One value of a split label, and how to read its counter from a VM's snapshot.
type Part<'a> = (&'a str, &'a dyn Fn(&VmSnapshot) -> u64);

/// Rows per VM and per value of one more label.
fn split(vms: &[VmSnapshot], key: &'static str, parts: &[Part<'_>]) -> Vec<(Labels, u64)> {
    vms.iter()
        .flat_map(|s| parts.iter().map(move |(v, f)| (with(s, key, v), f(s))))
        .collect()
}

impl Collector for VmCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Snapshot first: the VMs' references are dropped before any text is written.
        let vms: Vec<VmSnapshot> = self
            .live
            .vms()
            .iter()
            .map(|vm| VmSnapshot::of(vm))
            .collect();
        self.encode_daemon(&mut enc)?;
        let mut info = enc.encode_descriptor(
            "vm",
            "A VM the daemon serves (value 1): its type, populate method, page source and who keeps its memory attributes.",
            None,
            MetricType::Info,
        )?;
        for s in &vms {
            let labels: Labels = vec![
                ("vm", s.id.clone()),
                ("vm_type", s.vm_type.into()),
                ("populate", s.populate.into()),
                ("source", s.source.into()),
                ("attributes", s.attributes.into()),
            ];
            info.encode_info(&labels)?;
        }
        let memory: Vec<(Labels, u64)> = vms.iter().map(|s| (vm_label(s), s.memory)).collect();
        gauges(
            &mut enc,
            "guest_memory",
            "Guest memory of the VM (sum of its regions).",
            Some(&Unit::Bytes),
            &memory,
        )?;
        counters(
            &mut enc,
            "faults",
            "Page faults read from the VM's userfaultfd.",
            None,
            &per_vm(&vms, |s| s.faults),
        )?;
        counters(
            &mut enc,
            "faults_coalesced",
            "Faults on pages already installed (only woken).",
            None,
            &per_vm(&vms, |s| s.coalesced),
        )?;
        let by_source: Vec<(Labels, u64)> = vms
            .iter()
            .flat_map(|s| {
                [
                    (with(s, "source", s.source), s.stats.pages_from_source),
                    (with(s, "source", "zero"), s.stats.pages_zero),
                ]
            })
            .collect();
        counters(
            &mut enc,
            "pages_by_source",
            "Pages installed, by where their content came from: the VM's page source (file) or zeros.",
            None,
            &by_source,
        )?;
        let by_method: Vec<(Labels, u64)> = vms
            .iter()
            .flat_map(|s| {
                Install::ALL
                    .iter()
                    .zip(s.installed)
                    .map(move |(m, n)| (with(s, "method", m.name()), n))
            })
            .collect();
        counters(
            &mut enc,
            "pages_by_method",
            "Pages installed, by how: copy (UFFDIO_COPY), continue (UFFDIO_CONTINUE), zeropage (UFFDIO_ZEROPAGE), write (into the memfd, no ioctl).",
            None,
            &by_method,
        )?;
        counters(
            &mut enc,
            "pages_prefetched",
            "Pages installed ahead of a fault (fault-around, sequential prefetch).",
            None,
            &per_vm(&vms, |s| s.pages_prefetched),
        )?;
        counters(
            &mut enc,
            "pages_replayed",
            "Pages pushed from a replayed working set.",
            None,
            &per_vm(&vms, |s| s.pages_replayed),
        )?;
        let asynchronous: Vec<(Labels, u64)> = vms
            .iter()
            .flat_map(|s| {
                ASYNC_COUNTERS
                    .iter()
                    .zip(s.asynchronous)
                    .map(move |(e, n)| (with(s, "event", e), n))
            })
            .collect();
        counters(
            &mut enc,
            "async_source",
            "Asynchronous page source, by event: parked (faults waiting on a fetch), joined (faults on a page already waited on), fetched (pages asked), by_request / by_push (pages delivered asked / unasked), dropped_discarded / dropped_duplicate / dropped_failed (arrivals dropped: range discarded meanwhile, page there already, failed with no fault waiting).",
            None,
            &asynchronous,
        )?;
        let object: Vec<(Labels, u64)> = vms
            .iter()
            .filter_map(|s| s.object.map(|o| (s, o)))
            .flat_map(|(s, o)| {
                crate::source::object::OBJECT_COUNTERS
                    .iter()
                    .zip(o)
                    .map(move |(e, n)| (with(s, "event", e), n))
            })
            .collect();
        counters(
            &mut enc,
            "snapshot_source",
            "Object-store snapshot source (VMs restored from a snapshot URL), by event: chunks_fetched / bytes_fetched (from the store, compressed), cache_hits (chunks from the shared cache), corrupt (chunks whose bytes did not match the manifest), retries (store errors retried), failed (chunks given up on: their waiting pages poisoned), changed (the snapshot was replaced during the restore), bytes_delivered (plain bytes handed to the VM).",
            None,
            &object,
        )?;
        counters(
            &mut enc,
            "source_read",
            "Bytes read from the page source.",
            Some(&Unit::Bytes),
            &per_vm(&vms, |s| s.source_bytes_read),
        )?;
        let mut h = enc.encode_descriptor(
            "fault_latency",
            "Fault service time, from reading the fault to the wake (HDR histogram of 2 significant digits, bucket counts within 1 % of the bounds).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for s in &vms {
            let b = &s.latency;
            let buckets: Vec<(f64, u64)> = BUCKET_BOUNDS_NS
                .iter()
                .map(|&ns| ns as f64 / 1e9)
                .chain([f64::INFINITY])
                .zip(b.counts)
                .collect();
            h.encode_family(&vm_label(s))?
                .encode_histogram::<NoLabelSet>(b.sum_ns as f64 / 1e9, b.count, &buckets, None)?;
        }
        counters(
            &mut enc,
            "populate_eexist",
            "Populate ioctls that found the page already there (EEXIST; woken).",
            None,
            &per_vm(&vms, |s| s.eexist),
        )?;
        counters(
            &mut enc,
            "populate_eagain",
            "Populate ioctls retried after EAGAIN (a remove or unmap event pending).",
            None,
            &per_vm(&vms, |s| s.eagain),
        )?;
        counters(
            &mut enc,
            "uffd_events",
            "Non-fault userfaultfd events: remove (madvise, balloon), unmap, remap.",
            None,
            &split(
                &vms,
                "event",
                &[
                    ("remove", &|s| s.stats.remove_events),
                    ("unmap", &|s| s.stats.unmap_events),
                    ("remap", &|s| s.stats.remap_events),
                ],
            ),
        )?;
        counters(
            &mut enc,
            "pages_poisoned",
            "Pages poisoned (the VMM gets SIGBUS there), by reason: stray (outside every region), private (shared-side fault on a private page), source_error, populate_error.",
            None,
            &split(
                &vms,
                "reason",
                &[
                    ("stray", &|s| s.stats.stray_faults),
                    ("private", &|s| s.stats.private_faults_poisoned),
                    ("source_error", &|s| s.stats.source_errors),
                    ("populate_error", &|s| s.stats.populate_errors),
                ],
            ),
        )?;
        counters(
            &mut enc,
            "exits",
            "VM exits forwarded over the mailbox: memory_fault (KVM_EXIT_MEMORY_FAULT), hypercall (KVM_HC_MAP_GPA_RANGE).",
            None,
            &split(
                &vms,
                "exit",
                &[
                    ("memory_fault", &|s| s.stats.memory_fault_exits),
                    ("hypercall", &|s| s.stats.hypercall_exits),
                ],
            ),
        )?;
        counters(
            &mut enc,
            "conversions",
            "Ranges converted, by direction.",
            None,
            &split(
                &vms,
                "to",
                &[
                    ("private", &|s| s.stats.converted_to_private),
                    ("shared", &|s| s.stats.converted_to_shared),
                ],
            ),
        )?;
        counters(
            &mut enc,
            "conversions_denied",
            "Conversions refused (policy, alignment, rate limit).",
            None,
            &per_vm(&vms, |s| s.conversions_denied),
        )?;
        counters(
            &mut enc,
            "channel_requests",
            "Requests served on the VM's fault channel (cloud-hypervisor).",
            None,
            &per_vm(&vms, |s| s.channel_requests),
        )?;
        counters(
            &mut enc,
            "channel_errors",
            "Requests refused on the VM's fault channel.",
            None,
            &per_vm(&vms, |s| s.channel_errors),
        )?;
        Ok(())
    }
}

impl VmCollector {
    fn encode_daemon(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let d = self.live.metrics();
        let none = Labels::new;
        let mut build = enc.encode_descriptor(
            "build",
            "The daemon's version (value 1).",
            None,
            MetricType::Info,
        )?;
        build.encode_info(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])?;
        gauges(
            enc,
            "start_time",
            "When this daemon process started, seconds since the Unix epoch.",
            Some(&Unit::Seconds),
            &[(none(), d.start_time)],
        )?;
        gauges(
            enc,
            "vms",
            "VMs the daemon holds now.",
            None,
            &[(none(), self.live.get())],
        )?;
        gauges(
            enc,
            "connections",
            "Client connections open now.",
            None,
            &[(none(), d.connections())],
        )?;
        let daemon_counters = [
            (
                "connections_accepted",
                "Client connections accepted (past the connection limit and the uid check).",
                &d.connections_accepted,
            ),
            ("vms_created", "VMs created.", &d.vms_created),
            ("vms_freed", "VMs freed, for any reason.", &d.vms_freed),
            (
                "vms_restored",
                "VMs a VMM handed back (ReclaimVm): after a daemon restart or a lost connection.",
                &d.vms_restored,
            ),
            (
                "vms_rebuilt",
                "VMs handed back that this daemon did not know: rebuilt after a restart.",
                &d.vms_rebuilt,
            ),
            (
                "vms_reattached",
                "VMs a new VMM process took over (ReattachVm, a VMM live update).",
                &d.vms_reattached,
            ),
            (
                "vms_orphaned",
                "VMs whose VMM released them or went away, kept for the grace period.",
                &d.vms_orphaned,
            ),
            (
                "vms_expired",
                "Orphaned VMs freed when their grace period ran out.",
                &d.vms_expired,
            ),
            (
                "daemon_starts",
                "Starts of this daemon process (1); a restart shows as vms_rebuilt.",
                &d.daemon_starts,
            ),
        ];
        for (name, help, counter) in daemon_counters {
            counters(enc, name, help, None, &[(none(), counter.load(Relaxed))])?;
        }
        Ok(())
    }
}
