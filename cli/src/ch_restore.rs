//! `vmpager ch-restore SNAPSHOT_DIR RECEIVER`: restores a cloud-hypervisor snapshot directory
//! (`config.json`, `state.json`, `memory-ranges`, as `ch-remote snapshot` writes them) into a
//! cloud-hypervisor waiting in `receive-migration` on RECEIVER (`unix:PATH`), as the sender of a
//! postcopy migration (docs/cloud-hypervisor.md).
//!
//! Guest RAM is handed over as memfds that vmpagerd owns (one per memory zone, shared by the
//! zone's slots at their file offsets, hugetlb for hugepage zones). Pages are written into them
//! on demand: cloud-hypervisor asks for each page on the fault connection (its demand faults and
//! its own background pull of every page) and maps it with `UFFDIO_CONTINUE`. This command
//! connects, sends the memfds, the configuration and the state built from the snapshot, opens the
//! fault connection where cloud-hypervisor expects it and hands it to vmpagerd, and returns when
//! cloud-hypervisor closes the fault connection: every page is in.

use crate::restore::{event, stats_json, wait_for_hangup, Daemon, WorkingSets};
use anyhow::{bail, Context};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use vmpager_client::{ChannelProtocol, PageSource, PopulateMethod, RegionSpec, VmSpec};
use vmpager_compat::cloud_hypervisor::snapshot::{common_cpuid_for, SnapshotDir};
use vmpager_compat::cloud_hypervisor::wire::{self, ConnectionRole, Request, Status};
use vmpager_protocol::{HUGE_PAGE_SIZE, PAGE_SIZE};

/// What `vmpager ch-restore` was asked to do.
pub struct Options {
    /// The snapshot directory.
    pub snapshot: PathBuf,
    /// `unix:PATH` of the waiting cloud-hypervisor.
    pub receiver: String,
    /// A running vmpagerd (else one in this process).
    pub daemon: Option<PathBuf>,
    /// Resume the VM (`Complete`) instead of leaving it paused (`CompletePaused`).
    pub resume: bool,
    /// A JSON file with the `common_cpuid` list to send (default: the minimal list that
    /// cloud-hypervisor's compatibility check accepts, see docs/cloud-hypervisor.md).
    pub common_cpuid: Option<PathBuf>,
    /// Record the working set here.
    pub record: Option<PathBuf>,
    /// Replay this working set.
    pub replay: Option<PathBuf>,
}

/// Restores the snapshot and serves it until cloud-hypervisor has every page.
pub fn run(opts: Options) -> anyhow::Result<()> {
    let path = match opts.receiver.strip_prefix("unix:") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => bail!(
            "RECEIVER must be unix:PATH, the receiver_url given to `ch-remote receive-migration` (got {:?})",
            opts.receiver
        ),
    };
    let snap = SnapshotDir::open(&opts.snapshot)
        .with_context(|| format!("bad snapshot {}", opts.snapshot.display()))?;
    let memory = File::open(&snap.memory_path)
        .with_context(|| format!("cannot open {}", snap.memory_path.display()))?;
    let common_cpuid = match &opts.common_cpuid {
        Some(p) => serde_json::from_slice(
            &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        )
        .with_context(|| format!("{} is not JSON", p.display()))?,
        None => common_cpuid_for(&snap.config),
    };
    let regions = regions_of(&snap)?;
    let working_sets = WorkingSets::open(opts.record, opts.replay, &memory)?;
    let daemon = Daemon::start(opts.daemon)?;
    let client = daemon.connect()?;
    let created = client
        .create_vm(VmSpec {
            regions,
            source: PageSource::File(memory.try_clone()?),
            populate: PopulateMethod::Copy,
            record_working_set: working_sets.recording(),
            ..Default::default()
        })
        .context("vmpagerd refused the VM")?;
    let vm_id = created.vm_id;

    let mut main = connect(&path)?;
    step(&mut main, Request::start(), &[], "Start")?;
    for (slot, memfd) in snap.slots.iter().zip(&created.memfds) {
        wire::send_memory_fd(main.as_fd(), slot.slot, memfd.as_fd()).with_context(|| {
            format!(
                "cloud-hypervisor went away before the memfd of slot {} was sent",
                slot.slot
            )
        })?;
        expect_ok(&mut main, "MemoryFd")?;
    }
    let config = snap.config_payload(common_cpuid);
    step(
        &mut main,
        Request::config(config.len() as u64),
        &config,
        "Config",
    )
    .context(
        "cloud-hypervisor refused the configuration (its log says why: prefault is not allowed with postcopy, an incompatible CPUID, or a receiver older than PR #8819 started without memory_mode=postcopy)",
    )?;
    // The fault connection, after Config's Ok and before State: cloud-hypervisor waits for it
    // while it handles State, and may fault memory while restoring devices.
    let mut fault = connect(&path)?;
    wire::write_role(&mut fault, ConnectionRole::Fault)
        .context("cannot open the fault connection")?;
    client
        .attach_channel(vm_id, fault.as_fd(), ChannelProtocol::CloudHypervisor)
        .context("vmpagerd refused the fault connection")?;
    let replayed = working_sets.start(&client, vm_id)?;
    step(
        &mut main,
        Request::state(snap.state_bytes.len() as u64),
        &snap.state_bytes,
        "State",
    )?;
    let last = if opts.resume {
        Request::complete()
    } else {
        Request::complete_paused()
    };
    step(&mut main, last, &[], "Complete")?;
    let bytes: u64 = snap.slots.iter().map(|s| s.size).sum();
    tracing::info!(
        vm = vm_id,
        slots = snap.slots.len(),
        mib = bytes >> 20,
        replayed,
        "restored; serving the fault connection"
    );
    event(
        "restored",
        serde_json::json!({
            "vm_id": vm_id, "slots": snap.slots.len(), "bytes": bytes,
            "resumed": opts.resume, "replay_pages": replayed,
        }),
    );
    // cloud-hypervisor shuts the fault connection down once its background pull has every
    // page (or when the VM stops). This copy is only watched, never read: vmpagerd reads it.
    let daemon_gone = wait_for_hangup(fault.as_fd(), &client)?;
    if daemon_gone {
        bail!("vmpagerd is gone and did not come back before cloud-hypervisor had every page");
    }
    let stats = client.stats(vm_id)?;
    let recorded = working_sets.finish(&client, vm_id)?;
    client.detach(vm_id)?;
    drop(main);
    tracing::info!(
        requests = stats.channel_requests,
        refused = stats.channel_errors,
        "cloud-hypervisor closed the fault connection: every page is in"
    );
    event(
        "done",
        serde_json::json!({"vm_id": vm_id, "stats": stats_json(&stats), "recorded_pages": recorded}),
    );
    Ok(())
}

/// One region per slot, at its GPA, its place in `memory-ranges`, its zone's page size, and its
/// file offset in the zone's memfd.
fn regions_of(snap: &SnapshotDir) -> anyhow::Result<Vec<RegionSpec>> {
    let mut groups: HashMap<&str, u32> = HashMap::new();
    snap.slots
        .iter()
        .map(|s| {
            let next = groups.len() as u32 + 1;
            let group = *groups.entry(s.zone_id.as_str()).or_insert(next);
            let r = RegionSpec::new(s.gpa, s.size, s.snapshot_offset).in_memfd(group, s.file_offset);
            match s.page_size {
                PAGE_SIZE => Ok(r),
                HUGE_PAGE_SIZE => Ok(r.huge_2m()),
                other => bail!(
                    "slot {} of zone {} uses {other}-byte pages: only 4 KiB and 2 MiB pages are served",
                    s.slot,
                    s.zone_id
                ),
            }
        })
        .collect()
}

fn connect(path: &Path) -> anyhow::Result<UnixStream> {
    UnixStream::connect(path).with_context(|| {
        format!(
            "cannot connect to cloud-hypervisor at {} (is it waiting in `ch-remote receive-migration receiver_url=unix:{}`?)",
            path.display(),
            path.display()
        )
    })
}

/// Sends a request (and its payload) and expects `Ok`.
fn step(main: &mut UnixStream, req: Request, payload: &[u8], name: &str) -> anyhow::Result<()> {
    wire::write_request(main, req)
        .and_then(|()| main.write_all(payload).map_err(wire::WireError::Io))
        .with_context(|| format!("cloud-hypervisor went away before {name}"))?;
    expect_ok(main, name)
}

fn expect_ok(main: &mut UnixStream, name: &str) -> anyhow::Result<()> {
    let resp = wire::read_response(main)
        .with_context(|| format!("cloud-hypervisor went away answering {name}"))?;
    match resp.status() {
        Status::Ok => Ok(()),
        s => bail!("cloud-hypervisor answered {name} with {s:?}"),
    }
}
