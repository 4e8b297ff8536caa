//! `vmpager firecracker-handler SOCKET MEM_FILE`: a drop-in for Firecracker's UFFD page-fault
//! handler (its snapshot load with `mem_backend: {backend_type: "Uffd", backend_path: SOCKET}`).
//!
//! It listens on SOCKET; each Firecracker that connects sends its region mappings (JSON) and its
//! userfaultfd in one message and never reads the socket (docs/firecracker.md). Each VM gets a
//! thread that checks the handshake against MEM_FILE, hands the VM to vmpagerd (its guest memory
//! is Firecracker's own private anonymous mapping: pages are installed with `UFFDIO_COPY` /
//! `UFFDIO_ZEROPAGE` from MEM_FILE, with vmpagerd's fault-around, prefetch and counters), and
//! waits until that Firecracker goes away (its socket closes), then prints the VM's counters and
//! frees it. A bad handshake is refused with a log line and an event; the other VMs go on.

use crate::restore::{event, stats_json, wait_for_hangup, Daemon, WorkingSets};
use anyhow::{bail, Context};
use rustix::event::{PollFd, PollFlags};
use rustix::net::SocketFlags;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmpager_client::{PageSource, PopulateMethod, RegionSpec, VmSpec};
use vmpager_compat::firecracker::{self, PAGE_2M};

/// How long a connecting Firecracker may take to send its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What `vmpager firecracker-handler` was asked to do.
pub struct Options {
    /// The socket Firecracker connects to.
    pub socket: PathBuf,
    /// The memory snapshot file.
    pub mem_file: PathBuf,
    /// A running vmpagerd to hand the VMs to (else one in this process).
    pub daemon: Option<PathBuf>,
    /// Record each VM's working set here.
    pub record: Option<PathBuf>,
    /// Replay this working set into every VM.
    pub replay: Option<PathBuf>,
}

struct Shared {
    daemon: Daemon,
    mem_file: File,
    mem_len: u64,
    working_sets: WorkingSets,
}

/// Serves Firecrackers until SIGTERM/SIGINT.
pub fn run(opts: Options) -> anyhow::Result<()> {
    // Before any thread starts, so every thread has the signals blocked.
    let stop = vmpagerd::signals::shutdown_fd().context("cannot set up SIGTERM")?;
    let mem_file = File::open(&opts.mem_file)
        .with_context(|| format!("cannot open {}", opts.mem_file.display()))?;
    let mem_len = mem_file.metadata()?.len();
    let working_sets = WorkingSets::open(opts.record, opts.replay, &mem_file)?;
    let daemon = Daemon::start(opts.daemon)?;
    // Fail now, not at the first VM, if the daemon is not there.
    drop(daemon.connect()?);
    let bound = vmpagerd::listener::Bound::new_of(&opts.socket, rustix::net::SocketType::STREAM)
        .with_context(|| format!("cannot listen on {}", opts.socket.display()))?;
    let shared = Arc::new(Shared {
        daemon,
        mem_file,
        mem_len,
        working_sets,
    });
    tracing::info!(
        socket = %opts.socket.display(),
        mem_file = %opts.mem_file.display(),
        daemon = shared.daemon.describe(),
        "firecracker-handler listening"
    );
    event(
        "listening",
        serde_json::json!({"socket": opts.socket, "mem_file": opts.mem_file, "mem_file_bytes": mem_len}),
    );
    let listener = bound.listener();
    loop {
        let mut fds = [
            PollFd::new(&listener, PollFlags::IN),
            PollFd::new(&stop, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e).context("poll failed"),
        }
        if !fds[1].revents().is_empty() {
            tracing::info!("firecracker-handler stopping");
            return Ok(());
        }
        if fds[0].revents().is_empty() {
            continue;
        }
        match rustix::net::accept_with(listener, SocketFlags::CLOEXEC) {
            Ok(conn) => {
                let shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("vmpager-fc-vm".into())
                    .spawn(move || serve_vm(&shared, conn));
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a VM thread");
                }
            }
            Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => {}
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
            }
        }
    }
}

fn serve_vm(shared: &Shared, conn: OwnedFd) {
    let pid = rustix::net::sockopt::socket_peercred(&conn)
        .map(|c| c.pid.as_raw_nonzero().get())
        .unwrap_or(0);
    if let Err(e) = serve(shared, &conn, pid) {
        let why = format!("{e:#}");
        tracing::warn!(firecracker_pid = pid, "Firecracker VM refused: {why}");
        event(
            "vm-refused",
            serde_json::json!({"firecracker_pid": pid, "error": why}),
        );
    }
}

fn serve(shared: &Shared, conn: &OwnedFd, pid: i32) -> anyhow::Result<()> {
    let hs = firecracker::recv_handshake(conn.as_fd(), Instant::now() + HANDSHAKE_TIMEOUT)
        .context("bad handshake")?;
    let regions = firecracker::validate(&hs.regions, shared.mem_len).context("bad regions")?;
    let client = shared.daemon.connect()?;
    let specs: Vec<RegionSpec> = regions
        .iter()
        .map(|r| {
            // Firecracker's handshake has no guest physical address: each region is named by
            // its place in the snapshot, which is unique.
            let spec = RegionSpec::new(r.file_offset, r.size, r.file_offset);
            if r.page_size == PAGE_2M {
                spec.huge_2m()
            } else {
                spec
            }
        })
        .collect();
    let created = client
        .create_vm(VmSpec {
            regions: specs,
            source: PageSource::File(shared.mem_file.try_clone()?),
            populate: PopulateMethod::Copy,
            memory_in_vmm: true,
            record_working_set: shared.working_sets.recording(),
            ..Default::default()
        })
        .context("vmpagerd refused the VM")?;
    let vm_id = created.vm_id;
    let host: Vec<u64> = regions.iter().map(|r| r.host_addr).collect();
    client
        .attach_uffd(vm_id, hs.uffd.as_fd(), &host)
        .context("vmpagerd refused the uffd")?;
    // The daemon holds the uffd now (and Firecracker its own copy).
    drop(hs.uffd);
    let replayed = shared.working_sets.start(&client, vm_id)?;
    let bytes: u64 = regions.iter().map(|r| r.size).sum();
    tracing::info!(
        firecracker_pid = pid,
        vm = vm_id,
        regions = regions.len(),
        mib = bytes >> 20,
        replayed,
        "Firecracker VM served"
    );
    event(
        "vm-start",
        serde_json::json!({
            "firecracker_pid": pid, "vm_id": vm_id, "regions": regions.len(),
            "bytes": bytes, "replay_pages": replayed,
        }),
    );
    // Firecracker never writes again and never closes while it lives: its socket hanging up is
    // the VM's end. The daemon's connection hanging up is the daemon's.
    let daemon_gone = wait_for_hangup(conn.as_fd(), &client)?;
    if daemon_gone {
        bail!("vmpagerd is gone and did not come back: VM {vm_id} is no longer served");
    }
    let stats = client.stats(vm_id)?;
    let recorded = shared.working_sets.finish(&client, vm_id)?;
    client.detach(vm_id)?;
    tracing::info!(
        firecracker_pid = pid,
        vm = vm_id,
        faults = stats.faults,
        "Firecracker VM gone"
    );
    event(
        "vm-end",
        serde_json::json!({
            "firecracker_pid": pid, "vm_id": vm_id, "stats": stats_json(&stats),
            "recorded_pages": recorded,
        }),
    );
    Ok(())
}
