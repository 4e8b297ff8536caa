//! Attaching a VM's fault sources: the VMM's uffd, its mailbox, a fault channel.

use super::registry::MailboxFds;
use super::*;
use crate::ch_faults::ChFaultServer;
use vmpager_protocol::{AttachChannel, ChannelProtocol};

impl Reactor {
    pub(super) fn open_mailbox(
        &mut self,
        token: usize,
        vm_id: u64,
        vcpus: u32,
    ) -> Result<(Message, Vec<OwnedFd>), Refusal> {
        let entry = self.owned(token, vm_id)?;
        if entry.mailbox.is_some() {
            return Err(refuse(
                ErrorCode::BadState,
                format!("VM {vm_id} already has a mailbox"),
            ));
        }
        let internal = |e: &dyn std::error::Error| refuse(ErrorCode::Internal, error_chain(e));
        let (mailbox, mailbox_fd) = Mailbox::create(vcpus).map_err(|e| internal(&e))?;
        let doorbell = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| internal(&std::io::Error::from(e)))?;
        let fds = MailboxFds {
            memfd: mailbox_fd,
            doorbell,
            vcpus,
            mailbox: Arc::new(mailbox),
        };
        let reply = vec![
            fds.memfd.try_clone().map_err(|e| internal(&e))?,
            fds.doorbell.try_clone().map_err(|e| internal(&e))?,
        ];
        self.serve_mailbox(vm_id, fds)?;
        Ok((Message::MailboxOpened { vm_id, vcpus }, reply))
    }

    /// Serves VM `vm_id`'s mailbox (its mapping and fds in `fds`) on the VM's worker.
    pub(super) fn serve_mailbox(&mut self, vm_id: u64, fds: MailboxFds) -> Result<(), Refusal> {
        let w = self.worker_of(vm_id);
        let internal = |e: &dyn std::error::Error| refuse(ErrorCode::Internal, error_chain(e));
        let entry = self.vms.get_mut(&vm_id).ok_or_else(|| unknown_vm(vm_id))?;
        let doorbell = fds.doorbell.try_clone().map_err(|e| internal(&e))?;
        let server = ExitServer::new(entry.vm.clone(), fds.mailbox.clone(), doorbell);
        self.workers[w]
            .serve_exits(server)
            .map_err(|e| internal(&e))?;
        entry.mailbox = Some(fds);
        entry.worker = Some(w);
        Ok(())
    }

    /// The worker of VM `vm_id`: the same for its uffd and its mailbox, so one VM's work
    /// stays on one thread.
    pub(super) fn worker_of(&self, vm_id: u64) -> usize {
        (vm_id % self.workers.len() as u64) as usize
    }

    pub(super) fn attach(
        &mut self,
        token: usize,
        attach: AttachUffd,
        mut fds: Vec<OwnedFd>,
    ) -> Result<(Message, Vec<OwnedFd>), Refusal> {
        let vm_id = attach.vm_id;
        let entry = unattached(self.owned(token, vm_id)?)?;
        let fd = fds
            .pop()
            .ok_or_else(|| refuse(ErrorCode::BadMessage, "AttachUffd without a uffd"))?;
        let vm = entry.vm.clone();
        self.serve_uffd(&vm, fd, &attach.host_addrs, false)?;
        Ok((Message::Attached { vm_id }, vec![]))
    }

    /// Serves `vm`'s uffd `fd`, whose regions the VMM mapped at `host_addrs`, on the VM's
    /// worker. `wake_all`: first wake every thread waiting on the VM's memory (faults read by
    /// a daemon that died, or by the VMM while none served them): each retries its access and
    /// faults again if its page is still missing.
    pub(super) fn serve_uffd(
        &mut self,
        vm: &Arc<Vm>,
        fd: OwnedFd,
        host_addrs: &[u64],
        wake_all: bool,
    ) -> Result<(), Refusal> {
        let vm_id = vm.id;
        let regions = vm.memory.regions();
        if host_addrs.len() != regions.len() {
            return Err(refuse(
                ErrorCode::BadMessage,
                format!(
                    "{} host addresses for {} regions",
                    host_addrs.len(),
                    regions.len()
                ),
            ));
        }
        let mut spans: Vec<(u64, u64)> = Vec::with_capacity(regions.len());
        for (r, &addr) in regions.iter().zip(host_addrs) {
            let end = addr
                .checked_add(r.size())
                .filter(|_| addr % r.page_size() == 0 && addr != 0);
            let Some(end) = end else {
                return Err(refuse(
                    ErrorCode::BadMessage,
                    format!("bad host address {addr:#x}"),
                ));
            };
            spans.push((addr, end));
        }
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[0].1 > w[1].0) {
            return Err(refuse(ErrorCode::BadMessage, "host mappings overlap"));
        }
        let uffd = Uffd::from_received(fd).map_err(|e| {
            refuse(
                ErrorCode::BadMessage,
                format!("the fd is not a usable userfaultfd: {e}"),
            )
        })?;
        let server = FaultServer::new(vm.clone(), uffd, host_addrs);
        if let Ok(handle) = server.uffd().try_clone() {
            // For a hybrid migration's write-protect (without it, hybrid is refused).
            vm.hybrid.attached(vm.memory.regions(), handle, host_addrs);
        }
        if wake_all {
            server.wake_all();
        }
        let w = self.worker_of(vm_id);
        self.workers[w]
            .serve(server)
            .map_err(|e| refuse(ErrorCode::Internal, error_chain(&e)))?;
        if let Some(entry) = self.vms.get_mut(&vm_id) {
            entry.worker = Some(w);
            entry.attached = true;
        }
        Ok(())
    }

    /// Serves a VMM's fault channel (a connected stream socket on which it asks for pages by
    /// GPA) instead of a uffd: the VMM keeps its uffd and maps what the daemon put in the memfds.
    pub(super) fn attach_channel(
        &mut self,
        token: usize,
        attach: AttachChannel,
        mut fds: Vec<OwnedFd>,
    ) -> Result<(Message, Vec<OwnedFd>), Refusal> {
        let vm_id = attach.vm_id;
        let entry = unattached(self.owned(token, vm_id)?)?;
        if entry.vm.memory_in_vmm() {
            return Err(refuse(
                ErrorCode::BadState,
                "a fault channel serves memory the daemon owns, not the VMM's",
            ));
        }
        if entry.vm.source.fetcher().is_some() {
            return Err(refuse(
                ErrorCode::Unsupported,
                "a fault channel needs a synchronous page source",
            ));
        }
        let fd = fds
            .pop()
            .ok_or_else(|| refuse(ErrorCode::BadMessage, "AttachChannel without its socket"))?;
        let vm = entry.vm.clone();
        self.serve_channel(&vm, fd, attach.protocol)?;
        Ok((Message::Attached { vm_id }, vec![]))
    }

    /// Serves `vm`'s fault channel `fd` (speaking `protocol`) on the VM's worker.
    pub(super) fn serve_channel(
        &mut self,
        vm: &Arc<Vm>,
        fd: OwnedFd,
        protocol: ChannelProtocol,
    ) -> Result<(), Refusal> {
        let server = match protocol {
            ChannelProtocol::CloudHypervisor => ChFaultServer::new(vm.clone(), fd)
                .map_err(|e| refuse(ErrorCode::BadMessage, error_chain(&e)))?,
        };
        let w = self.worker_of(vm.id);
        self.workers[w]
            .serve_channel(server)
            .map_err(|e| refuse(ErrorCode::Internal, error_chain(&e)))?;
        if let Some(entry) = self.vms.get_mut(&vm.id) {
            entry.worker = Some(w);
            entry.attached = true;
            entry.channel = Some(protocol);
        }
        Ok(())
    }
}

/// `entry`, if it has no uffd or fault channel yet (a VM has one fault source).
fn unattached(entry: &VmEntry) -> Result<&VmEntry, Refusal> {
    if entry.attached {
        return Err(refuse(
            ErrorCode::BadState,
            format!("VM {} already has a uffd or a fault channel", entry.vm.id),
        ));
    }
    Ok(entry)
}
