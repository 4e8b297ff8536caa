//! Attaching a VM's fault sources: the VMM's uffd, its mailbox, a fault channel.

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
        let workers = self.workers.len();
        let Some(conn) = self.conns.get_mut(&token) else {
            return Err(refuse(ErrorCode::Internal, "connection vanished"));
        };
        let entry = conn.vms.get_mut(&vm_id).ok_or_else(|| unknown_vm(vm_id))?;
        if entry.exits {
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
        let doorbell_copy = doorbell.try_clone().map_err(|e| internal(&e))?;
        let server = ExitServer::new(entry.vm.clone(), Arc::new(mailbox), doorbell);
        // The same worker as the VM's uffd: one VM's work stays on one thread.
        let w = (vm_id as usize) % workers;
        self.workers[w]
            .serve_exits(server)
            .map_err(|e| internal(&e))?;
        entry.exits = true;
        entry.worker = Some(w);
        Ok((
            Message::MailboxOpened { vm_id, vcpus },
            vec![mailbox_fd, doorbell_copy],
        ))
    }

    pub(super) fn attach(
        &mut self,
        token: usize,
        attach: AttachUffd,
        mut fds: Vec<OwnedFd>,
    ) -> Result<(Message, Vec<OwnedFd>), Refusal> {
        let vm_id = attach.vm_id;
        let entry = unattached(&mut self.conns, token, vm_id)?;
        let regions = entry.vm.memory.regions();
        if attach.host_addrs.len() != regions.len() {
            return Err(refuse(
                ErrorCode::BadMessage,
                format!(
                    "{} host addresses for {} regions",
                    attach.host_addrs.len(),
                    regions.len()
                ),
            ));
        }
        let mut spans: Vec<(u64, u64)> = Vec::with_capacity(regions.len());
        for (r, &addr) in regions.iter().zip(&attach.host_addrs) {
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
        let fd = fds
            .pop()
            .ok_or_else(|| refuse(ErrorCode::BadMessage, "AttachUffd without a uffd"))?;
        let uffd = Uffd::from_received(fd).map_err(|e| {
            refuse(
                ErrorCode::BadMessage,
                format!("the fd is not a usable userfaultfd: {e}"),
            )
        })?;
        let server = FaultServer::new(entry.vm.clone(), uffd, &attach.host_addrs);
        let w = (vm_id as usize) % self.workers.len();
        self.workers[w]
            .serve(server)
            .map_err(|e| refuse(ErrorCode::Internal, error_chain(&e)))?;
        entry.worker = Some(w);
        entry.attached = true;
        Ok((Message::Attached { vm_id }, vec![]))
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
        let entry = unattached(&mut self.conns, token, vm_id)?;
        if entry.vm.memory_in_vmm() {
            return Err(refuse(
                ErrorCode::BadState,
                "a fault channel serves memory the daemon owns, not the VMM's",
            ));
        }
        let fd = fds
            .pop()
            .ok_or_else(|| refuse(ErrorCode::BadMessage, "AttachChannel without its socket"))?;
        let server = match attach.protocol {
            ChannelProtocol::CloudHypervisor => ChFaultServer::new(entry.vm.clone(), fd)
                .map_err(|e| refuse(ErrorCode::BadMessage, error_chain(&e)))?,
        };
        let w = (vm_id as usize) % self.workers.len();
        self.workers[w]
            .serve_channel(server)
            .map_err(|e| refuse(ErrorCode::Internal, error_chain(&e)))?;
        entry.worker = Some(w);
        entry.attached = true;
        Ok((Message::Attached { vm_id }, vec![]))
    }
}

/// VM `vm_id` of connection `token`, which has no uffd or fault channel yet (a VM has one fault
/// source).
fn unattached(
    conns: &mut HashMap<usize, Conn>,
    token: usize,
    vm_id: u64,
) -> Result<&mut VmEntry, Refusal> {
    let conn = conns
        .get_mut(&token)
        .ok_or_else(|| refuse(ErrorCode::Internal, "connection vanished"))?;
    let entry = conn.vms.get_mut(&vm_id).ok_or_else(|| unknown_vm(vm_id))?;
    if entry.attached {
        return Err(refuse(
            ErrorCode::BadState,
            format!("VM {vm_id} already has a uffd or a fault channel"),
        ));
    }
    Ok(entry)
}
