//! Sessions that outlive a connection: a VMM releases its VM for an update (`ReleaseVm`), a
//! new VMM process takes it over (`ReattachVm`), a VMM hands it back after a daemon restart
//! or a lost connection (`ReclaimVm`). The VM's token is the capability, and only the uid that
//! created the VM (or root) may present it (`Reactor::presented`, [`crate::access`]).

use super::create::guest_memfds;
use super::registry::MailboxFds;
use super::*;
use vmpager_protocol::VmSession;

impl Reactor {
    /// `ReleaseVm`: stop serving the VM's uffd; keep the VM for the grace period.
    pub(super) fn release(
        &mut self,
        token: usize,
        vm_id: u64,
    ) -> Result<(Message, Vec<OwnedFd>), Refusal> {
        self.owned(token, vm_id)?;
        let grace = self.config.vm_grace;
        if grace.is_zero() {
            return Err(refuse(
                ErrorCode::Unsupported,
                "this vmpagerd keeps no released VM (--vm-grace 0): detach or keep the VM",
            ));
        }
        self.orphan(vm_id);
        Ok((
            Message::Released {
                vm_id,
                grace_ms: grace.as_millis() as u64,
            },
            vec![],
        ))
    }

    /// `ReattachVm`: connection `token` takes over a VM nobody holds, and gets its fds.
    pub(super) fn reattach(
        &mut self,
        token: usize,
        vm_id: u64,
        secret: u64,
    ) -> Result<(Message, Vec<OwnedFd>), Refusal> {
        self.presented(token, vm_id, secret)?;
        let entry = self.vms.get_mut(&vm_id).ok_or_else(|| unknown_vm(vm_id))?;
        if let Owner::Conn(_) = entry.owner {
            return Err(refuse(
                ErrorCode::BadState,
                format!("VM {vm_id} is held by a connection: its VMM must release it first"),
            ));
        }
        let fds = entry
            .session_fds()
            .map_err(|e| refuse(ErrorCode::Internal, format!("cannot duplicate an fd: {e}")))?;
        entry.owner = Owner::Conn(token);
        let session = entry.session();
        crate::metrics::VmMetrics::bump(&self.live.metrics().vms_reattached);
        tracing::info!(vm = vm_id, "VM reattached by a new VMM");
        Ok((Message::Reattached(session), fds))
    }

    /// `ReclaimVm`: serve a VM again. A VM this daemon knows (its connection was lost, or it
    /// was released) is taken back by its token; one it does not know (the daemon restarted)
    /// is rebuilt from what the VMM kept: the description, the memfds, the page-state file,
    /// the guest_memfds, the mailbox.
    pub(super) fn reclaim(
        &mut self,
        token: usize,
        features: u64,
        session: VmSession,
        fds: Vec<OwnedFd>,
    ) -> Result<(Message, Vec<OwnedFd>), Refusal> {
        let vm_id = session.vm_id;
        let create = &session.create;
        let mut fds = fds.into_iter();
        let memory_fds = usize::from(create.source == PageSourceKind::File)
            + if create.memory_in_vmm() {
                0
            } else {
                create.regions.len()
            }
            + 1
            + create.regions.iter().filter(|r| r.is_private()).count();
        let rebuilt = !self.vms.contains_key(&vm_id);
        match rebuilt {
            false => {
                let entry = self.presented(token, vm_id, session.token)?;
                match entry.owner {
                    Owner::Conn(t) if t != token => {
                        return Err(refuse(
                            ErrorCode::BadState,
                            format!("VM {vm_id} is held by another connection"),
                        ))
                    }
                    Owner::Conn(_) if entry.attached => {
                        return Err(refuse(
                            ErrorCode::BadState,
                            format!("VM {vm_id} is served on this connection already"),
                        ))
                    }
                    _ => {}
                }
                if entry.description.regions != create.regions {
                    return Err(refuse(
                        ErrorCode::BadMessage,
                        format!("VM {vm_id} has other regions"),
                    ));
                }
                // The daemon has its memory: the copies the VMM sent are dropped.
                fds.by_ref().take(memory_fds).for_each(drop);
                if let Some(e) = self.vms.get_mut(&vm_id) {
                    e.owner = Owner::Conn(token);
                }
            }
            true => {
                if self.held_by(token).len() >= self.config.max_vms_per_connection {
                    return Err(refuse(
                        ErrorCode::LimitExceeded,
                        "too many VMs on this connection",
                    ));
                }
                let entry = self.rebuild(token, features, &session, &mut fds)?;
                if (entry.uffd_modes, entry.uffd_features)
                    != (session.uffd_modes, session.uffd_features)
                {
                    return Err(refuse(
                        ErrorCode::BadMessage,
                        "the uffd settings do not match the VM's description",
                    ));
                }
                self.live.insert(&entry.vm);
                self.vms.insert(vm_id, entry);
            }
        }
        if let Err(r) = self.serve_reclaimed(&session, &mut fds) {
            // Kept for the grace period: the VMM may try again.
            self.orphan(vm_id);
            return Err(r);
        }
        crate::metrics::VmMetrics::bump(&self.live.metrics().vms_restored);
        if rebuilt {
            crate::metrics::VmMetrics::bump(&self.live.metrics().vms_rebuilt);
        }
        tracing::info!(vm = vm_id, rebuilt, "VM reclaimed by its VMM");
        Ok((Message::Reclaimed { vm_id }, vec![]))
    }

    /// Rebuilds a VM this daemon does not know from what its VMM kept.
    fn rebuild(
        &mut self,
        token: usize,
        features: u64,
        session: &VmSession,
        fds: &mut impl Iterator<Item = OwnedFd>,
    ) -> Result<VmEntry, Refusal> {
        let create = &session.create;
        let bad = |why: String| refuse(ErrorCode::BadMessage, why);
        let parts = self.vm_parts(features, create, fds)?;
        let memfds: Vec<File> = match create.memory_in_vmm() {
            true => Vec::new(),
            false => fds
                .by_ref()
                .take(create.regions.len())
                .map(File::from)
                .collect(),
        };
        let state = fds
            .next()
            .map(File::from)
            .ok_or_else(|| bad("ReclaimVm without its page-state file".into()))?;
        let gmems = guest_memfds(create, fds)?;
        let memory = GuestMemory::adopt(
            session.vm_id,
            &create.regions,
            memfds,
            gmems,
            state,
            create.memory_in_vmm(),
        )
        .map_err(|e| match e.is_bad_input() {
            true => bad(error_chain(&e)),
            false => refuse(ErrorCode::Internal, error_chain(&e)),
        })?;
        let entry = self.assemble_vm(
            session.vm_id,
            session.token,
            create.clone(),
            parts,
            memory,
            token,
        )?;
        // A restarted daemon's new VMs never reuse an id a VMM may still bring back.
        let next = self.next_vm.load(Ordering::Relaxed);
        if (next..next + (1 << 16)).contains(&session.vm_id) {
            self.next_vm.store(session.vm_id + 1, Ordering::Relaxed);
        }
        Ok(entry)
    }

    /// Serves a reclaimed VM's uffd, mailbox and fault channel from the rest of `fds`.
    fn serve_reclaimed(
        &mut self,
        session: &VmSession,
        fds: &mut impl Iterator<Item = OwnedFd>,
    ) -> Result<(), Refusal> {
        let vm_id = session.vm_id;
        let bad = |why: &str| refuse(ErrorCode::BadMessage, why.to_string());
        let vm = self
            .vms
            .get(&vm_id)
            .map(|e| e.vm.clone())
            .ok_or_else(|| unknown_vm(vm_id))?;
        let uffd = match session.host_addrs.is_empty() {
            true => None,
            false => Some(
                fds.next()
                    .ok_or_else(|| bad("ReclaimVm without its uffd"))?,
            ),
        };
        let mailbox = match session.mailbox_vcpus {
            0 => None,
            _ => Some((
                fds.next()
                    .ok_or_else(|| bad("ReclaimVm without its mailbox"))?,
                fds.next()
                    .ok_or_else(|| bad("ReclaimVm without its doorbell"))?,
            )),
        };
        let channel = match session.channel {
            None => None,
            Some(p) => Some((
                p,
                fds.next()
                    .ok_or_else(|| bad("ReclaimVm without its channel"))?,
            )),
        };
        let has_mailbox = self.vms.get(&vm_id).is_some_and(|e| e.mailbox.is_some());
        if let (Some((memfd, doorbell)), false) = (mailbox, has_mailbox) {
            let fds = adopt_mailbox(memfd, doorbell, session.mailbox_vcpus)?;
            self.serve_mailbox(vm_id, fds)?;
        }
        if let Some(fd) = uffd {
            self.serve_uffd(&vm, fd, &session.host_addrs, true)?;
        }
        if let Some((protocol, fd)) = channel {
            self.serve_channel(&vm, fd, protocol)?;
        }
        Ok(())
    }
}

/// Maps a mailbox a VMM handed back: a memfd sealed against resizing (the daemon maps it),
/// laid out for `vcpus` slots, and an eventfd as its doorbell (made non-blocking).
fn adopt_mailbox(memfd: OwnedFd, doorbell: OwnedFd, vcpus: u32) -> Result<MailboxFds, Refusal> {
    let bad = |why: String| refuse(ErrorCode::BadMessage, why);
    let seals = rustix::fs::fcntl_get_seals(&memfd).map_err(|e| bad(format!("mailbox: {e}")))?;
    if !seals.contains(rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW) {
        return Err(bad("the mailbox is not sealed against resizing".into()));
    }
    let mailbox = Mailbox::map(memfd.as_fd()).map_err(|e| bad(format!("mailbox: {e}")))?;
    if mailbox.slots() != vcpus {
        return Err(bad(format!(
            "the mailbox has {} slots, not {vcpus}",
            mailbox.slots()
        )));
    }
    let link = rustix::fs::readlinkat(
        rustix::fs::CWD,
        format!("/proc/self/fd/{}", doorbell.as_raw_fd()),
        Vec::new(),
    )
    .map_err(|e| bad(format!("doorbell: {e}")))?;
    if link.as_bytes() != b"anon_inode:[eventfd]" {
        return Err(bad("the doorbell is not an eventfd".into()));
    }
    let flags = rustix::fs::fcntl_getfl(&doorbell).map_err(|e| bad(format!("doorbell: {e}")))?;
    rustix::fs::fcntl_setfl(&doorbell, flags | rustix::fs::OFlags::NONBLOCK)
        .map_err(|e| bad(format!("doorbell: {e}")))?;
    Ok(MailboxFds {
        memfd,
        doorbell,
        vcpus,
        mailbox: Arc::new(mailbox),
    })
}
