//! VMM live update: the daemon owns the memory, so a VMM can be replaced without copying it.
//! The old VMM saves its vCPU and device state and releases its VM ([`Client::release`]); a new
//! VMM process takes it over by id and token ([`Client::reattach`]), gets the same memfds,
//! guest_memfds and mailbox, registers its own mapping on a new uffd with the same settings,
//! and the guest goes on. A VM whose VMM dies is kept the same way for the daemon's grace
//! period (`vmpagerd --vm-grace`).

use crate::client::{Client, ClientError, CreatedVm, VmExits};
use crate::link::KeptVm;
use crate::memory::VmMemory;
use std::os::fd::OwnedFd;
use std::time::Duration;
use vmpager_protocol::{CreateVm, Message, PageSourceKind, VMCREATED_VMM_SETS_ATTRIBUTES};

/// A VM taken over from another VMM process.
#[derive(Debug)]
pub struct ReattachedVm {
    /// Its memory, to map ([`VmMemory::map`]) and attach with a new uffd; `vm_fd` is `None`
    /// (set it for a VM whose attributes the VMM keeps).
    pub created: CreatedVm,
    /// Its mailbox, if it has one (vCPU channels carry on from where the slots are).
    pub exits: Option<VmExits>,
    /// Slots of the mailbox.
    pub mailbox_vcpus: u32,
    /// The VM as created (type, page source kind, flags).
    pub description: CreateVm,
}

impl Client {
    /// Lets go of VM `vm_id` for a VMM update: the daemon stops serving this process's uffd
    /// and keeps the VM (memory, page state, mailbox) for a reattach; returns how long it
    /// keeps it. Stop the vCPUs and save their state first; unmap the memory after.
    pub fn release(&self, vm_id: u64) -> Result<Duration, ClientError> {
        match self
            .call(&Message::ReleaseVm { vm_id }, &[], false)?
            .message
        {
            Message::Released {
                vm_id: id,
                grace_ms,
            } if id == vm_id => {
                self.link().kept().remove(&vm_id);
                Ok(Duration::from_millis(grace_ms))
            }
            other => Err(ClientError::Protocol(format!(
                "{:?} instead of Released",
                other.kind()
            ))),
        }
    }

    /// Takes over VM `vm_id` (released, or left by a VMM that died) with its `token`.
    pub fn reattach(&self, vm_id: u64, token: u64) -> Result<ReattachedVm, ClientError> {
        let reply = self.call(&Message::ReattachVm { vm_id, token }, &[], false)?;
        let session = match reply.message {
            Message::Reattached(s) if s.vm_id == vm_id => s,
            other => {
                return Err(ClientError::Protocol(format!(
                    "{:?} instead of Reattached",
                    other.kind()
                )))
            }
        };
        let create = session.create;
        let mut fds = reply.fds.into_iter();
        let missing = || ClientError::Protocol("Reattached without its fds".into());
        let source = match create.source {
            PageSourceKind::File => Some(fds.next().ok_or_else(missing)?),
            PageSourceKind::Zero | PageSourceKind::Remote | PageSourceKind::Snapshot => None,
        };
        let memfds: Vec<OwnedFd> = match create.memory_in_vmm() {
            true => Vec::new(),
            false => fds.by_ref().take(create.regions.len()).collect(),
        };
        let state = fds.next().ok_or_else(missing)?;
        let mut guest_memfds = Vec::with_capacity(create.regions.len());
        for r in &create.regions {
            guest_memfds.push(match r.is_private() {
                true => Some(fds.next().ok_or_else(missing)?),
                false => None,
            });
        }
        let mailbox = match session.mailbox_vcpus {
            0 => None,
            _ => Some((
                fds.next().ok_or_else(missing)?,
                fds.next().ok_or_else(missing)?,
            )),
        };
        let dup = |f: &OwnedFd| f.try_clone().map_err(ClientError::Io);
        let kept = KeptVm {
            vm_id,
            token,
            uffd_modes: session.uffd_modes,
            uffd_features: session.uffd_features,
            created_flags: session.created_flags,
            create: create.clone(),
            source,
            memfds: memfds.iter().map(dup).collect::<Result<_, _>>()?,
            state,
            guest_memfds: guest_memfds
                .iter()
                .flatten()
                .map(dup)
                .collect::<Result<_, _>>()?,
            migration: None,
            uffd: None,
            mailbox: match &mailbox {
                Some((m, d)) => Some((dup(m)?, dup(d)?, session.mailbox_vcpus)),
                None => None,
            },
            channel: None,
        };
        self.link().kept().insert(vm_id, kept);
        let exits = match mailbox {
            Some((m, d)) => Some(self.exits(m, d)?),
            None => None,
        };
        Ok(ReattachedVm {
            created: CreatedVm {
                vm_id,
                regions: create.regions.clone(),
                memfds,
                guest_memfds,
                vm_fd: None,
                vmm_sets_attributes: session.created_flags & VMCREATED_VMM_SETS_ATTRIBUTES != 0,
                token,
                uffd_modes: session.uffd_modes,
                uffd_features: session.uffd_features,
            },
            exits,
            mailbox_vcpus: session.mailbox_vcpus,
            description: create,
        })
    }

    /// Takes over VM `vm_id`, maps its memory here, registers it on a new uffd and hands that
    /// over: the VM is served again, for this process.
    pub fn reattach_mapped(
        &self,
        vm_id: u64,
        token: u64,
    ) -> Result<(VmMemory, Option<VmExits>), ClientError> {
        let r = self.reattach(vm_id, token)?;
        let memory = VmMemory::map(r.created)?;
        self.attach_uffd(vm_id, memory.uffd(), &memory.host_addrs())?;
        Ok((memory, r.exits))
    }
}
