//! The client's link to `vmpagerd`, kept across daemon restarts.
//!
//! A VMM's VMs must not die with the daemon (DESIGN.md §4): the client keeps a copy of every
//! fd a VM needs (memfds, page-state file, guest_memfds, snapshot, uffd, mailbox, fault
//! channel) and its description. A supervisor thread watches the control connection. When it
//! breaks, the link is *away*:
//!
//! * requests wait, vCPUs waiting in their mailbox keep waiting ([`Liveness`] says `Away`),
//!   threads that fault on guest memory wait in the kernel;
//! * the supervisor reads every VM's uffd, so nothing in the VMM blocks on the daemon's
//!   absence: a REMOVE is marked in the page-state file (the pages read as zeros afterwards,
//!   never as snapshot content), faults are left for the next daemon (it wakes every waiting
//!   thread, which faults again);
//! * it reconnects to the same socket path and hands every VM back (`ReclaimVm`).
//!
//! If no daemon takes them back within the deadline the link is *lost*: requests and mailbox
//! exchanges fail with a clear error, faults are answered with `UFFDIO_POISON` (the faulting
//! thread gets SIGBUS, KVM an error exit), never with zeros, and [`crate::Client::lost_fd`]
//! becomes readable.

use crate::client::{request, ClientError};
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmpager_protocol::mailbox::{Liveness, Peer};
use vmpager_protocol::page_state::StateFile;
use vmpager_protocol::{
    features, ChannelProtocol, Connection, CreateVm, Hello, Message, VmSession, PROTOCOL_VERSION,
};

/// How long a client waits for a restarted daemon by default.
pub const DEFAULT_RESTART_DEADLINE: Duration = Duration::from_secs(30);

/// The state of the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Connected and served.
    Up,
    /// The daemon went away at `since`; waiting for it to come back.
    Away {
        /// When the connection broke.
        since: Instant,
    },
    /// No daemon took the VMs back in time (or reconnecting is impossible): why.
    Lost(String),
}

/// What the client keeps of one VM to hand it to a restarted daemon.
#[derive(Debug)]
pub(crate) struct KeptVm {
    pub vm_id: u64,
    pub token: u64,
    pub uffd_modes: u64,
    pub uffd_features: u64,
    pub created_flags: u32,
    /// As created, with the populate method the daemon chose.
    pub create: CreateVm,
    pub source: Option<OwnedFd>,
    pub memfds: Vec<OwnedFd>,
    pub state: OwnedFd,
    pub guest_memfds: Vec<OwnedFd>,
    pub uffd: Option<(OwnedFd, Vec<u64>)>,
    pub mailbox: Option<(OwnedFd, OwnedFd, u32)>,
    pub channel: Option<(ChannelProtocol, OwnedFd)>,
    /// The `MigrateOut` or `MigrateIn` of a migrating VM, made again after a reclaim.
    pub migration: Option<Message>,
}

impl KeptVm {
    /// The `ReclaimVm` for this VM and its fds, in protocol order.
    fn reclaim(&self) -> (Message, Vec<BorrowedFd<'_>>) {
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        fds.extend(self.source.iter().map(|f| f.as_fd()));
        fds.extend(self.memfds.iter().map(|f| f.as_fd()));
        fds.push(self.state.as_fd());
        fds.extend(self.guest_memfds.iter().map(|f| f.as_fd()));
        if let Some((u, _)) = &self.uffd {
            fds.push(u.as_fd());
        }
        if let Some((m, d, _)) = &self.mailbox {
            fds.push(m.as_fd());
            fds.push(d.as_fd());
        }
        if let Some((_, c)) = &self.channel {
            fds.push(c.as_fd());
        }
        let session = VmSession {
            vm_id: self.vm_id,
            token: self.token,
            uffd_modes: self.uffd_modes,
            uffd_features: self.uffd_features,
            created_flags: self.created_flags,
            mailbox_vcpus: self.mailbox.as_ref().map_or(0, |m| m.2),
            channel: self.channel.as_ref().map(|c| c.0),
            host_addrs: self.uffd.as_ref().map_or(Vec::new(), |u| u.1.clone()),
            create: self.create.clone(),
        };
        (Message::ReclaimVm(session), fds)
    }
}

/// The connection, its state, and the VMs kept for a restarted daemon.
#[derive(Debug)]
pub(crate) struct Link {
    /// Where to reconnect (none for a connection made elsewhere: lost when it breaks).
    path: Option<PathBuf>,
    conn: Mutex<Connection>,
    state: Mutex<LinkState>,
    changed: Condvar,
    pub vms: Mutex<HashMap<u64, KeptVm>>,
    deadline: Duration,
    /// Poison faults once lost (`ClientOptions::poison_when_lost`).
    poison_when_lost: bool,
    /// Readable once the link is lost.
    lost: OwnedFd,
    /// Times the daemon went away and the VMs were handed back.
    pub restarts: AtomicU64,
}

impl Liveness for Link {
    fn peer(&self) -> Peer {
        match *self.state() {
            LinkState::Up => Peer::Alive,
            LinkState::Away { .. } => Peer::Away,
            LinkState::Lost(_) => Peer::Gone,
        }
    }
}

impl Link {
    pub fn new(
        conn: Connection,
        path: Option<PathBuf>,
        options: crate::client::ClientOptions,
    ) -> std::io::Result<Link> {
        let lost = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
        Ok(Link {
            path,
            conn: Mutex::new(conn),
            state: Mutex::new(LinkState::Up),
            changed: Condvar::new(),
            vms: Mutex::new(HashMap::new()),
            deadline: options.restart_deadline,
            poison_when_lost: options.poison_when_lost,
            lost,
            restarts: AtomicU64::new(0),
        })
    }

    pub fn state(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn kept(&self) -> MutexGuard<'_, HashMap<u64, KeptVm>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lost_fd(&self) -> BorrowedFd<'_> {
        self.lost.as_fd()
    }

    fn set(&self, s: LinkState) {
        let lost = matches!(s, LinkState::Lost(_));
        *self.state() = s;
        self.changed.notify_all();
        if lost {
            let _ = rustix::io::write(&self.lost, &1u64.to_ne_bytes());
        }
    }

    /// Marks the link away after a request found the connection broken (the supervisor will
    /// notice too); nothing if it is away or lost already.
    pub fn note_broken(&self) {
        let mut s = self.state();
        if *s == LinkState::Up {
            *s = match self.path {
                Some(_) => LinkState::Away {
                    since: Instant::now(),
                },
                None => LinkState::Lost("the connection to vmpagerd broke".into()),
            };
        }
    }

    /// Waits while the link is away; an error once it is lost.
    pub fn wait_up(&self) -> Result<(), ClientError> {
        let mut s = self.state();
        loop {
            match &*s {
                LinkState::Up => return Ok(()),
                LinkState::Lost(why) => return Err(ClientError::DaemonLost(why.clone())),
                LinkState::Away { .. } => {
                    s = self
                        .changed
                        .wait_timeout(s, Duration::from_millis(100))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            }
        }
    }
}

/// Watches the connection (`watch` is a copy of it) and carries the VMs over a daemon
/// restart; ends when `stop` is readable.
pub(crate) fn supervise(link: Arc<Link>, mut watch: OwnedFd, stop: OwnedFd) {
    loop {
        let hup = rustix::event::PollFlags::RDHUP;
        let mut fds = [
            rustix::event::PollFd::new(&watch, hup),
            rustix::event::PollFd::new(&stop, rustix::event::PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => return,
        }
        if !fds[1].revents().is_empty() {
            return;
        }
        if fds[0].revents().is_empty() {
            continue;
        }
        match outage(&link, &stop) {
            Some(w) => watch = w,
            None => return,
        }
    }
}

/// One outage: keeps the VMM unblocked, reconnects, hands every VM back. Returns a dup of the
/// new connection to watch, or `None` when the link is lost (after serving the uffds with
/// poison until `stop`) or stopped.
fn outage(link: &Link, stop: &OwnedFd) -> Option<OwnedFd> {
    let since = match link.path {
        Some(_) => Instant::now(),
        None => {
            link.set(LinkState::Lost("the connection to vmpagerd broke".into()));
            return lost(link, stop);
        }
    };
    link.set(LinkState::Away { since });
    tracing::warn!("vmpagerd went away: waiting for it to come back");
    let mut reader = OutageReader::new(link);
    let mut tries = 0u32;
    loop {
        reader.drain();
        if since.elapsed() >= link.deadline {
            link.set(LinkState::Lost(format!(
                "vmpagerd did not come back within {} s",
                link.deadline.as_secs_f64()
            )));
            if link.poison_when_lost {
                reader.poison_read();
            }
            return lost(link, stop);
        }
        if let Some(path) = &link.path {
            if let Ok(conn) = Connection::connect(path) {
                // The next daemon reads the uffds from here on: stop first, so an event is
                // read by one side only.
                reader.drain();
                // A listening socket that outlives the daemon (socket activation, `--fd`)
                // accepts connections nobody serves yet: never wait past the deadline.
                let left = link.deadline.saturating_sub(since.elapsed());
                let _ = conn.set_timeout(Some(left.max(Duration::from_millis(10))));
                match reclaim_all(link, &conn) {
                    Ok(()) => {
                        let _ = conn.set_timeout(None);
                        let watch = conn.as_fd().try_clone_to_owned().ok()?;
                        *link.conn() = conn;
                        link.restarts.fetch_add(1, Ordering::Relaxed);
                        link.set(LinkState::Up);
                        tracing::info!(
                            away_ms = since.elapsed().as_millis() as u64,
                            "vmpagerd is back: every VM handed back"
                        );
                        return Some(watch);
                    }
                    // That daemon died too, or has not answered yet, or still holds a VM for
                    // the connection this loop left a moment ago: try again.
                    Err(e) if e.peer_gone() || e.is_retryable() || still_held(&e) => {}
                    Err(e) => {
                        link.set(LinkState::Lost(format!(
                            "vmpagerd refused to take the VMs back: {e}"
                        )));
                        if link.poison_when_lost {
                            reader.poison_read();
                        }
                        return lost(link, stop);
                    }
                }
            }
        }
        tries += 1;
        // Retry quickly at first (a supervisor restarts a daemon in milliseconds), then
        // every 100 ms, reading the uffds meanwhile.
        let wait = Duration::from_millis(u64::from(tries.min(10)) * 10);
        if reader.wait(stop, wait) {
            return None;
        }
    }
}

/// After the link is lost: keeps reading the uffds (so `madvise`/`munmap` never block) and
/// poisons every fault, until `stop`.
fn lost(link: &Link, stop: &OwnedFd) -> Option<OwnedFd> {
    tracing::error!(
        "{}",
        match &*link.state() {
            LinkState::Lost(why) => why.clone(),
            _ => String::new(),
        }
    );
    let mut reader = OutageReader::new(link);
    reader.poison_all = link.poison_when_lost;
    loop {
        reader.drain();
        if reader.wait(stop, Duration::from_secs(1)) {
            return None;
        }
    }
}

/// The daemon refused a `ReclaimVm` because another connection holds the VM: an earlier try
/// of this loop whose close the daemon has not processed yet.
fn still_held(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Refused {
            code: vmpager_protocol::ErrorCode::BadState,
            ..
        }
    )
}

/// Hello, then `ReclaimVm` for every kept VM.
fn reclaim_all(link: &Link, conn: &Connection) -> Result<(), ClientError> {
    let hello = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        features: features::ALL,
    });
    match request(conn, &hello, &[])?.message {
        Message::Welcome(w) if w.features & features::SESSIONS != 0 => {}
        _ => {
            return Err(ClientError::Protocol(
                "the daemon that answered does not take VMs back".into(),
            ))
        }
    }
    let kept = link.kept();
    for vm in kept.values() {
        let (msg, fds) = vm.reclaim();
        match request(conn, &msg, &fds)?.message {
            Message::Reclaimed { vm_id } if vm_id == vm.vm_id => {}
            other => {
                return Err(ClientError::Protocol(format!(
                    "{:?} instead of Reclaimed",
                    other.kind()
                )))
            }
        }
        if let Some(m) = &vm.migration {
            // The restarted daemon resumes its side of the migration.
            match request(conn, m, &[])?.message {
                Message::MigrationStatus(_) => {}
                other => {
                    return Err(ClientError::Protocol(format!(
                        "{:?} instead of MigrationStatus",
                        other.kind()
                    )))
                }
            }
        }
    }
    Ok(())
}

/// Reads the kept VMs' uffds while no daemon does.
struct OutageReader {
    vms: Vec<ReadVm>,
    /// Answer every fault with poison (the link is lost).
    poison_all: bool,
}

struct ReadVm {
    uffd: userfaultfd::Uffd,
    /// Start of each region's mapping, its length and page size.
    regions: Vec<(u64, u64, u64)>,
    state: Option<StateFile>,
    state_fd: OwnedFd,
    vm_id: u64,
    pages: Vec<usize>,
    /// Fault addresses read, for poisoning if the link is lost.
    faults: Vec<u64>,
    poison: bool,
}

impl OutageReader {
    fn new(link: &Link) -> OutageReader {
        let kept = link.kept();
        let vms = kept
            .values()
            .filter_map(|vm| {
                let (uffd, addrs) = vm.uffd.as_ref()?;
                let fd = uffd.try_clone().ok()?;
                // SAFETY: `fd` is a fresh duplicate of a userfaultfd, owned by nobody else; the
                // `Uffd` takes it over and closes it on drop.
                let uffd = unsafe { userfaultfd::Uffd::from_raw_fd(into_raw(fd)) };
                let regions = vm
                    .create
                    .regions
                    .iter()
                    .zip(addrs)
                    .map(|(r, &a)| (a, r.size(), r.page_size()))
                    .collect();
                Some(ReadVm {
                    uffd,
                    regions,
                    state: None,
                    state_fd: vm.state.try_clone().ok()?,
                    vm_id: vm.vm_id,
                    pages: vm
                        .create
                        .regions
                        .iter()
                        .map(|r| (r.size() / r.page_size()) as usize)
                        .collect(),
                    faults: Vec::new(),
                    poison: vm.uffd_features
                        & u64::from(linux_raw_sys::general::UFFD_FEATURE_POISON)
                        != 0,
                })
            })
            .collect();
        OutageReader {
            vms,
            poison_all: false,
        }
    }

    /// Reads every pending event of every uffd.
    fn drain(&mut self) {
        for vm in &mut self.vms {
            loop {
                match vm.uffd.read_event() {
                    Ok(Some(userfaultfd::Event::Remove { start, end })) => {
                        vm.removed(start as u64, end as u64)
                    }
                    Ok(Some(userfaultfd::Event::Remap { from, to, len })) => {
                        for r in &mut vm.regions {
                            if r.0 == from as u64 && r.1 == len as u64 {
                                r.0 = to as u64;
                            }
                        }
                    }
                    Ok(Some(userfaultfd::Event::Pagefault { addr, .. })) => {
                        if self.poison_all {
                            vm.poison_at(addr as u64);
                        } else {
                            vm.faults.push(addr as u64);
                        }
                    }
                    Ok(Some(_)) => {} // UNMAP: nothing to keep.
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }

    /// Poisons the faults read so far (the link is lost: their threads must not wait forever).
    fn poison_read(&mut self) {
        for vm in &mut self.vms {
            for a in std::mem::take(&mut vm.faults) {
                vm.poison_at(a);
            }
        }
    }

    /// Waits up to `wait` for a uffd event or `stop`; true on `stop`.
    fn wait(&self, stop: &OwnedFd, wait: Duration) -> bool {
        let mut fds: Vec<rustix::event::PollFd<'_>> = self
            .vms
            .iter()
            .map(|v| rustix::event::PollFd::new(&v.uffd, rustix::event::PollFlags::IN))
            .collect();
        fds.push(rustix::event::PollFd::new(
            stop,
            rustix::event::PollFlags::IN,
        ));
        let t = rustix::event::Timespec {
            tv_sec: wait.as_secs() as i64,
            tv_nsec: i64::from(wait.subsec_nanos()),
        };
        let _ = rustix::event::poll(&mut fds, Some(&t));
        fds.last().is_some_and(|f| !f.revents().is_empty())
    }
}

impl ReadVm {
    /// `[start, end)` of the VMM's address space was removed: its pages read as zeros from
    /// now on, never as snapshot content. Marked in the page-state file, where the next
    /// daemon finds it.
    fn removed(&mut self, start: u64, end: u64) {
        if self.state.is_none() {
            let Ok(copy) = self.state_fd.try_clone() else {
                return;
            };
            self.state = StateFile::adopt(File::from(copy), self.vm_id, &self.pages).ok();
        }
        let Some(state) = &self.state else { return };
        for (i, &(at, len, ps)) in self.regions.iter().enumerate() {
            let lo = start.max(at);
            let hi = end.min(at.saturating_add(len));
            if lo < hi {
                if let Some(t) = state.table(i) {
                    t.discard(((lo - at) / ps) as usize, (hi - at).div_ceil(ps) as usize);
                }
            }
        }
    }

    fn poison_at(&self, addr: u64) {
        let Some(&(_, _, ps)) = self
            .regions
            .iter()
            .find(|&&(at, len, _)| addr >= at && addr - at < len)
        else {
            return;
        };
        if self.poison {
            poison(self.uffd.as_raw_fd(), addr & !(ps - 1), ps);
        }
    }
}

fn into_raw(fd: OwnedFd) -> std::os::fd::RawFd {
    use std::os::fd::IntoRawFd;
    fd.into_raw_fd()
}

/// `UFFDIO_POISON` of `[start, start + len)` (the `userfaultfd` crate lacks it).
fn poison(uffd: std::os::fd::RawFd, start: u64, len: u64) {
    use linux_raw_sys::general::{uffdio_poison, uffdio_range};
    let mut arg = uffdio_poison {
        range: uffdio_range { start, len },
        mode: 0,
        updated: 0,
    };
    const UFFDIO_POISON: u32 = 0xC020_AA08;
    const _: () = assert!(core::mem::size_of::<uffdio_poison>() == 0x20);
    // SAFETY: UFFDIO_POISON reads and writes exactly one `uffdio_poison` (its size is checked
    // above and in the ioctl number), which `arg` is; `uffd` is a live userfaultfd; the range is
    // only handed to the kernel, which checks it against the registered ranges.
    let _ = unsafe { libc::ioctl(uffd, UFFDIO_POISON as _, &mut arg as *mut uffdio_poison) };
}
