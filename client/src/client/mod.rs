//! The control connection to `vmpagerd`: [`Client`] and its requests. What a VM is created
//! from is in `spec`, the errors in `error`, a VM's exits (mailbox) and conversion events in
//! `exits`.

mod error;
mod exits;
mod migration;
mod spec;

pub use error::ClientError;
pub use exits::{Subscription, VmExits};
pub use spec::{ClientOptions, CreatedVm, PageSource, VmSpec};

use crate::link::{KeptVm, Link, LinkState};
use crate::memory::VmMemory;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use vmpager_protocol::message::MAX_REPLAY_PAGES;
use vmpager_protocol::socket::Received;
use vmpager_protocol::{
    features, AttachChannel, AttachUffd, ChannelProtocol, Connection, CreateVm, Hello, Message,
    PageSourceKind, PopulateMethod, ReplayWorkingSet, Stats, Welcome, WorkingSetEntry,
    PROTOCOL_VERSION, VMCREATED_VMM_SETS_ATTRIBUTES, VM_MEMORY_IN_VMM, VM_RECORD_WORKING_SET,
};

/// A connection to `vmpagerd`. Requests are synchronous; use one `Client` per thread that
/// issues them (each VM belongs to the connection that created it).
///
/// The client keeps what each of its VMs needs to survive the daemon: if the daemon goes away,
/// a supervisor thread keeps the VMM unblocked and hands the VMs to the next daemon on the
/// same socket (docs/survival.md); requests wait meanwhile.
#[derive(Debug)]
pub struct Client {
    link: Arc<Link>,
    welcome: Welcome,
    stop: OwnedFd,
    supervisor: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    /// Connects and negotiates every feature this crate knows. A daemon that will not serve
    /// this process (its uid is not allowed, the daemon is at its connection limit) answers
    /// [`ClientError::Refused`] with its reason (`PermissionDenied`, `LimitExceeded`).
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        Self::connect_with(path, ClientOptions::default())
    }

    /// As [`Client::connect`], with `options`.
    pub fn connect_with(path: &Path, options: ClientOptions) -> Result<Client, ClientError> {
        Self::start(Connection::connect(path)?, Some(path.to_owned()), options)
    }

    /// Negotiates over an already connected socket. Such a client cannot reconnect: its VMs
    /// are lost if the connection breaks.
    pub fn from_connection(conn: Connection) -> Result<Client, ClientError> {
        Self::start(
            conn,
            None,
            ClientOptions {
                restart_deadline: Duration::ZERO,
                ..ClientOptions::default()
            },
        )
    }

    fn start(
        conn: Connection,
        path: Option<std::path::PathBuf>,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let hello = Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            features: features::ALL,
        });
        let welcome = match request(&conn, &hello, &[])?.message {
            Message::Welcome(w) => w,
            other => {
                return Err(ClientError::Protocol(format!(
                    "{:?} instead of Welcome",
                    other.kind()
                )))
            }
        };
        let link = Arc::new(Link::new(conn, path, options).map_err(ClientError::Io)?);
        let stop = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)
            .map_err(|e| ClientError::Io(e.into()))?;
        let stop_reader = stop.try_clone().map_err(ClientError::Io)?;
        let watch = link
            .conn()
            .as_fd()
            .try_clone_to_owned()
            .map_err(ClientError::Io)?;
        let l = link.clone();
        let supervisor = std::thread::Builder::new()
            .name("vmpager-link".into())
            .spawn(move || crate::link::supervise(l, watch, stop_reader))
            .map_err(ClientError::Io)?;
        Ok(Client {
            link,
            welcome,
            stop,
            supervisor: Some(supervisor),
        })
    }

    pub(crate) fn link(&self) -> &Link {
        &self.link
    }

    /// The link's state: up, away (waiting for a restarted daemon), or lost.
    pub fn link_state(&self) -> LinkState {
        self.link.state().clone()
    }

    /// How many times the daemon went away and a daemon took the VMs back.
    pub fn restarts(&self) -> u64 {
        self.link.restarts.load(Ordering::Relaxed)
    }

    /// The process id of the daemon this client is connected to (`SO_PEERCRED` of the
    /// connection), or `None` while the link is not up. Once the link is up again after a
    /// restart, this is the daemon that took every VM of this client back, so a supervisor can
    /// tell which daemon holds them.
    pub fn daemon_pid(&self) -> Option<u32> {
        if *self.link.state() != LinkState::Up {
            return None;
        }
        let cred = rustix::net::sockopt::socket_peercred(self.link.conn().as_fd()).ok()?;
        u32::try_from(cred.pid.as_raw_nonzero().get()).ok()
    }

    /// An fd that becomes readable once the link is lost (no daemon took the VMs back in
    /// time): poll it to fail or pause the VMs.
    pub fn lost_fd(&self) -> BorrowedFd<'_> {
        self.link.lost_fd()
    }

    /// Sends `msg` and waits for the answer, waiting first while the daemon is away. A
    /// request the daemon's departure interrupted is sent again to the next daemon if
    /// `idempotent`, otherwise it fails with [`ClientError::Interrupted`].
    pub(crate) fn call(
        &self,
        msg: &Message,
        fds: &[BorrowedFd<'_>],
        idempotent: bool,
    ) -> Result<Received, ClientError> {
        loop {
            self.link.wait_up()?;
            let r = request(&self.link.conn(), msg, fds);
            match r {
                Err(e) if e.peer_gone() => {
                    self.link.note_broken();
                    self.link.wait_up()?;
                    if !idempotent {
                        return Err(ClientError::Interrupted);
                    }
                }
                r => return r,
            }
        }
    }

    /// Features both sides support.
    pub fn features(&self) -> u64 {
        self.welcome.features
    }

    /// The most guest memory the daemon gives one VM, in bytes (`vmpagerd
    /// --max-vm-memory-mib`): a bigger VM is refused (`LimitExceeded`), so check before
    /// preparing one.
    pub fn max_vm_memory(&self) -> u64 {
        self.welcome.max_vm_memory
    }

    /// Asks the daemon to create a VM and its memory; returns the memfds.
    pub fn create_vm(&self, spec: VmSpec) -> Result<CreatedVm, ClientError> {
        let (source, file, source_url) = match spec.source {
            PageSource::Zero => (PageSourceKind::Zero, None, None),
            PageSource::File(f) => (PageSourceKind::File, Some(f), None),
            PageSource::Remote => (PageSourceKind::Remote, None, None),
            PageSource::Snapshot(url) => {
                if self.features() & features::SNAPSHOT_URL == 0 {
                    return Err(ClientError::Protocol(
                        "this vmpagerd serves no snapshot URLs (feature SNAPSHOT_URL)".into(),
                    ));
                }
                (PageSourceKind::Snapshot, None, Some(url))
            }
        };
        let mut flags = 0;
        if spec.memory_in_vmm {
            flags |= VM_MEMORY_IN_VMM;
        }
        if spec.record_working_set {
            flags |= VM_RECORD_WORKING_SET;
        }
        let create = CreateVm {
            vm_type: spec.vm_type,
            policy: spec.policy.clone(),
            source_url,
            source,
            populate: spec.populate,
            flags,
            regions: spec.regions.clone(),
        };
        let msg = Message::CreateVm(create.clone());
        // One guest_memfd per private region, created here: only the VM's creator may.
        let mut gmems: Vec<Option<OwnedFd>> = Vec::with_capacity(spec.regions.len());
        for r in &spec.regions {
            gmems.push(match (r.is_private(), &spec.vm_fd) {
                (false, _) => None,
                (true, Some(vm_fd)) => Some(
                    crate::kvm_private::create_guest_memfd(vm_fd.as_fd(), r.size())
                        .map_err(ClientError::Io)?,
                ),
                (true, None) => {
                    return Err(ClientError::Protocol(
                        "private regions need the VM fd".into(),
                    ));
                }
            });
        }
        let mut fds: Vec<BorrowedFd<'_>> = file.iter().map(|f| f.as_fd()).collect();
        fds.extend(gmems.iter().flatten().map(|g| g.as_fd()));
        let reply = self.call(&msg, &fds, false)?;
        let memfds_expected = if spec.memory_in_vmm {
            0
        } else {
            spec.regions.len()
        };
        let v = match reply.message {
            Message::VmCreated(v) if v.region_count as usize == memfds_expected => v,
            other => {
                return Err(ClientError::Protocol(format!(
                    "{:?} instead of VmCreated",
                    other.kind()
                )))
            }
        };
        let mut memfds = reply.fds;
        let state = memfds
            .pop()
            .ok_or_else(|| ClientError::Protocol("VmCreated without its state file".into()))?;
        let mut create = create;
        create.populate = populate_of(v.uffd_modes);
        let dup = |f: BorrowedFd<'_>| f.try_clone_to_owned().map_err(ClientError::Io);
        let kept = KeptVm {
            vm_id: v.vm_id,
            token: v.token,
            uffd_modes: v.uffd_modes,
            uffd_features: v.uffd_features,
            created_flags: v.flags,
            create,
            source: file.as_ref().map(|f| dup(f.as_fd())).transpose()?,
            memfds: memfds
                .iter()
                .map(|m| dup(m.as_fd()))
                .collect::<Result<_, _>>()?,
            state,
            guest_memfds: gmems
                .iter()
                .flatten()
                .map(|g| dup(g.as_fd()))
                .collect::<Result<_, _>>()?,
            uffd: None,
            mailbox: None,
            channel: None,
            migration: None,
        };
        self.link.kept().insert(v.vm_id, kept);
        Ok(CreatedVm {
            vm_id: v.vm_id,
            regions: spec.regions,
            memfds,
            guest_memfds: gmems,
            vm_fd: spec.vm_fd,
            vmm_sets_attributes: v.flags & VMCREATED_VMM_SETS_ATTRIBUTES != 0,
            token: v.token,
            uffd_modes: v.uffd_modes,
            uffd_features: v.uffd_features,
        })
    }

    /// Hands the VMM's userfaultfd to the daemon: `host_addrs[i]` is where region `i` is mapped
    /// and registered. The VMM keeps its own copy of the uffd (DESIGN.md §4).
    pub fn attach_uffd(
        &self,
        vm_id: u64,
        uffd: BorrowedFd<'_>,
        host_addrs: &[u64],
    ) -> Result<(), ClientError> {
        let msg = Message::AttachUffd(AttachUffd {
            vm_id,
            host_addrs: host_addrs.to_vec(),
        });
        match self.call(&msg, &[uffd], false)?.message {
            Message::Attached { vm_id: id } if id == vm_id => {
                let copy = uffd.try_clone_to_owned().map_err(ClientError::Io)?;
                if let Some(k) = self.link.kept().get_mut(&vm_id) {
                    k.uffd = Some((copy, host_addrs.to_vec()));
                }
                Ok(())
            }
            other => Err(ClientError::Protocol(format!(
                "{:?} instead of Attached",
                other.kind()
            ))),
        }
    }

    /// Hands the daemon a fault channel: a connected stream socket on which a VMM (today
    /// cloud-hypervisor, `protocol`) asks for pages of `vm_id` by guest physical address. The
    /// daemon answers every request until the VMM closes it.
    pub fn attach_channel(
        &self,
        vm_id: u64,
        socket: BorrowedFd<'_>,
        protocol: ChannelProtocol,
    ) -> Result<(), ClientError> {
        let msg = Message::AttachChannel(AttachChannel { vm_id, protocol });
        match self.call(&msg, &[socket], false)?.message {
            Message::Attached { vm_id: id } if id == vm_id => {
                let copy = socket.try_clone_to_owned().map_err(ClientError::Io)?;
                if let Some(k) = self.link.kept().get_mut(&vm_id) {
                    k.channel = Some((protocol, copy));
                }
                Ok(())
            }
            other => Err(ClientError::Protocol(format!(
                "{:?} instead of Attached",
                other.kind()
            ))),
        }
    }

    /// Queues `pages` (source page numbers, `source offset / 4096`) to be pushed into the VM
    /// in this order ahead of its vCPUs; returns how many are waiting.
    pub fn replay_working_set(&self, vm_id: u64, pages: &[u64]) -> Result<u64, ClientError> {
        let mut queued = 0;
        for chunk in pages.chunks(MAX_REPLAY_PAGES) {
            let msg = Message::ReplayWorkingSet(ReplayWorkingSet {
                vm_id,
                pages: chunk.to_vec(),
            });
            queued = match self.call(&msg, &[], true)?.message {
                Message::ReplayQueued { vm_id: id, queued } if id == vm_id => queued,
                other => {
                    return Err(ClientError::Protocol(format!(
                        "{:?} instead of ReplayQueued",
                        other.kind()
                    )))
                }
            };
        }
        Ok(queued)
    }

    /// The VM's recorded working set so far: source pages in order of first need, with the
    /// time since VM creation (the VM must have been created with `record_working_set`).
    pub fn working_set(&self, vm_id: u64) -> Result<Vec<WorkingSetEntry>, ClientError> {
        let mut out = Vec::new();
        loop {
            let from = out.len() as u64;
            let msg = Message::GetWorkingSet { vm_id, from };
            match self.call(&msg, &[], true)?.message {
                Message::WorkingSet(w) if w.vm_id == vm_id && w.from == from => {
                    let done = w.entries.is_empty() || from + w.entries.len() as u64 >= w.total;
                    out.extend(w.entries);
                    if done {
                        return Ok(out);
                    }
                }
                other => {
                    return Err(ClientError::Protocol(format!(
                        "{:?} instead of WorkingSet",
                        other.kind()
                    )))
                }
            }
        }
    }

    /// Creates a VM, maps its memory here, registers it on a new userfaultfd and hands that over.
    pub fn create_mapped_vm(&self, spec: VmSpec) -> Result<VmMemory, ClientError> {
        let created = self.create_vm(spec)?;
        let vm_id = created.vm_id;
        let memory = VmMemory::map(created)?;
        self.attach_uffd(vm_id, memory.uffd(), &memory.host_addrs())?;
        Ok(memory)
    }
    /// The VM's page-state table (the file the daemon keeps it in, which this client holds for
    /// a restarted daemon): which pages are untouched, populated, discarded or private. The
    /// daemon updates it as it serves the VM; a VMM reads it (to copy only populated pages, say)
    /// and must not write it.
    pub fn page_state(
        &self,
        vm_id: u64,
    ) -> Result<vmpager_protocol::page_state::StateFile, ClientError> {
        let kept = self.link.kept();
        let vm = kept
            .get(&vm_id)
            .ok_or_else(|| ClientError::Protocol(format!("no VM {vm_id} on this client")))?;
        let pages: Vec<usize> = vm
            .create
            .regions
            .iter()
            .map(|r| (r.size() / r.page_size()) as usize)
            .collect();
        let file = File::from(vm.state.try_clone().map_err(ClientError::Io)?);
        vmpager_protocol::page_state::StateFile::adopt(file, vm_id, &pages)
            .map_err(|e| ClientError::Protocol(format!("page-state file: {e}")))
    }

    /// The VM's counters and fault latency percentiles.
    pub fn stats(&self, vm_id: u64) -> Result<Stats, ClientError> {
        match self.call(&Message::GetStats { vm_id }, &[], true)?.message {
            Message::Stats(s) => Ok(s),
            other => Err(ClientError::Protocol(format!(
                "{:?} instead of Stats",
                other.kind()
            ))),
        }
    }

    /// Stops serving and frees the VM in the daemon (the VMM unmaps its own mappings).
    pub fn detach(&self, vm_id: u64) -> Result<(), ClientError> {
        match self.call(&Message::Detach { vm_id }, &[], false)?.message {
            Message::Detached { vm_id: id } if id == vm_id => {
                self.link.kept().remove(&vm_id);
                Ok(())
            }
            other => Err(ClientError::Protocol(format!(
                "{:?} instead of Detached",
                other.kind()
            ))),
        }
    }
}

impl Client {
    /// Closes the connection and waits, at most `timeout`, until the daemon has let go of it:
    /// the daemon closes its end once it has handled this client's departure (VMs the client
    /// still holds are then kept for the grace period, or freed). Dropping a `Client` closes
    /// the connection without waiting. False if the daemon did not close its end in time.
    pub fn disconnect(mut self, timeout: Duration) -> bool {
        // The supervisor first: this departure is not an outage to ride through.
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
        if let Some(t) = self.supervisor.take() {
            let _ = t.join();
        }
        let conn = self.link.conn();
        let fd = conn.as_fd();
        if rustix::net::shutdown(fd, rustix::net::Shutdown::Write).is_err() {
            return true; // Not connected: nothing holds it.
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let t = rustix::event::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let flags = rustix::event::PollFlags::IN | rustix::event::PollFlags::RDHUP;
            let mut fds = [rustix::event::PollFd::new(&fd, flags)];
            match rustix::event::poll(&mut fds, Some(&t)) {
                Ok(0) => return false,
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return true,
            }
            let gone = rustix::event::PollFlags::HUP
                | rustix::event::PollFlags::RDHUP
                | rustix::event::PollFlags::ERR;
            // A message nobody waits for any more (a conversion event) is read and dropped.
            if fds[0].revents().intersects(gone) || conn.recv().is_err() {
                return true;
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
        if let Some(t) = self.supervisor.take() {
            let _ = t.join();
        }
    }
}

/// The populate method a VM's uffd registration modes imply.
pub(crate) fn populate_of(uffd_modes: u64) -> PopulateMethod {
    match uffd_modes & vmpager_protocol::uffd_modes::MINOR {
        0 => PopulateMethod::Copy,
        _ => PopulateMethod::Continue,
    }
}

/// One request and its answer on `conn`; an `Error` answer becomes [`ClientError::Refused`].
pub(crate) fn request(
    conn: &Connection,
    msg: &Message,
    fds: &[BorrowedFd<'_>],
) -> Result<Received, ClientError> {
    let reply = conn.request(msg, fds)?;
    if let Message::Error(e) = reply.message {
        return Err(ClientError::Refused {
            code: e.code,
            text: e.text,
        });
    }
    Ok(reply)
}
