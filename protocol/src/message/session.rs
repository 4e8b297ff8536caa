//! VM sessions that outlive a connection: `ReleaseVm` (a VMM lets go of its VM for an update),
//! `ReattachVm` (a new VMM process takes it over by id and token), `ReclaimVm` (a VMM hands its
//! VM back to a restarted daemon, or over a new connection) and their answers. Both directions
//! carry a [`VmSession`]: what a VMM needs to take a VM over, or a daemon to serve one again.

use super::vm::{ChannelProtocol, CreateVm, PageSourceKind};
use super::{nonzero_vm, prefix, DecodeError, Kind};
use crate::MAX_REGIONS;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// A VM as a VMM and a daemon both know it.
///
/// In `Reattached` (daemon → new VMM), the fds are: the snapshot if the source is a file (for
/// the new VMM to keep, in case it must hand the VM to a restarted daemon), one memfd per
/// region (none for the VMM's own memory), the page-state file, one guest_memfd per private
/// region, then the mailbox memfd and its doorbell if `mailbox_vcpus` is not 0. `host_addrs`
/// is empty and `channel` 0.
///
/// In `ReclaimVm` (VMM → daemon), the fds are: the snapshot if the source is a file, the
/// memfds, the page-state file, the guest_memfds, then the VMM's uffd if `host_addrs` is not
/// empty, the mailbox memfd and doorbell if `mailbox_vcpus` is not 0, and the fault channel's
/// socket if `channel` is set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSession {
    /// The VM's id.
    pub vm_id: u64,
    /// Its secret (`VmCreated.token`): the capability to reattach or reclaim it, for a peer of
    /// the uid that created it or root.
    pub token: u64,
    /// `UFFDIO_REGISTER_MODE_*` the VMM's mapping is registered with.
    pub uffd_modes: u64,
    /// `UFFD_FEATURE_*` of the VMM's uffd.
    pub uffd_features: u64,
    /// `VmCreated.flags`.
    pub created_flags: u32,
    /// Slots of the VM's mailbox (0: it has none).
    pub mailbox_vcpus: u32,
    /// The fault channel the VM is served on, if any (instead of a uffd).
    pub channel: Option<ChannelProtocol>,
    /// Where each region is mapped and registered on the uffd handed over (empty: no uffd).
    pub host_addrs: Vec<u64>,
    /// The VM as created; `populate` is the method the daemon chose (never `Default`).
    pub create: CreateVm,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct SessionWire {
    vm_id: U64,
    token: U64,
    uffd_modes: U64,
    uffd_features: U64,
    created_flags: U32,
    mailbox_vcpus: U32,
    channel: U32,
    host_addr_count: U32,
    reserved: [U64; 2],
}

impl VmSession {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(
            SessionWire {
                vm_id: self.vm_id.into(),
                token: self.token.into(),
                uffd_modes: self.uffd_modes.into(),
                uffd_features: self.uffd_features.into(),
                created_flags: self.created_flags.into(),
                mailbox_vcpus: self.mailbox_vcpus.into(),
                channel: self.channel.map_or(0, |c| c as u32).into(),
                host_addr_count: (self.host_addrs.len() as u32).into(),
                reserved: [0.into(); 2],
            }
            .as_bytes(),
        );
        for a in &self.host_addrs {
            out.extend_from_slice(U64::new(*a).as_bytes());
        }
        self.create.encode(out);
    }

    pub(super) fn decode(kind: Kind, p: &[u8]) -> Result<VmSession, DecodeError> {
        let (w, rest): (SessionWire, _) = prefix(kind, p)?;
        if w.reserved.iter().any(|r| r.get() != 0) {
            return Err(DecodeError::Reserved(kind));
        }
        let count = w.host_addr_count.get() as usize;
        if count > MAX_REGIONS {
            return Err(DecodeError::Limit {
                field: "host_addr_count",
                value: count as u64,
            });
        }
        let vcpus = w.mailbox_vcpus.get();
        if vcpus > crate::MAX_VCPUS {
            return Err(DecodeError::Limit {
                field: "mailbox_vcpus",
                value: vcpus.into(),
            });
        }
        let channel = match w.channel.get() {
            0 => None,
            1 => Some(ChannelProtocol::CloudHypervisor),
            v => {
                return Err(DecodeError::BadValue {
                    field: "channel",
                    value: v.into(),
                })
            }
        };
        let (addrs, create) = rest
            .split_at_checked(count * 8)
            .ok_or(DecodeError::Malformed { kind, len: p.len() })?;
        let host_addrs = <[U64]>::ref_from_bytes(addrs)
            .map_err(|_| DecodeError::Malformed { kind, len: p.len() })?
            .iter()
            .map(|a| a.get())
            .collect::<Vec<_>>();
        let create = CreateVm::decode(create)?;
        if !host_addrs.is_empty() && host_addrs.len() != create.regions.len() {
            return Err(DecodeError::Malformed { kind, len: p.len() });
        }
        if create.populate == super::PopulateMethod::Default {
            return Err(DecodeError::BadValue {
                field: "populate",
                value: 0,
            });
        }
        Ok(VmSession {
            vm_id: nonzero_vm(w.vm_id.get())?,
            token: w.token.get(),
            uffd_modes: w.uffd_modes.get(),
            uffd_features: w.uffd_features.get(),
            created_flags: w.created_flags.get(),
            mailbox_vcpus: vcpus,
            channel,
            host_addrs,
            create,
        })
    }

    /// The snapshot, memfds (one per region unless the memory is the VMM's own), the state
    /// file and the guest_memfds: what both directions carry.
    fn memory_fds(&self) -> usize {
        let memfds = match self.create.memory_in_vmm() {
            true => 0,
            false => self.create.regions.len(),
        };
        usize::from(self.create.source == PageSourceKind::File)
            + memfds
            + 1
            + self
                .create
                .regions
                .iter()
                .filter(|r| r.is_private())
                .count()
    }

    /// Fds a `Reattached` carries.
    pub(super) fn reattached_fds(&self) -> usize {
        self.memory_fds() + if self.mailbox_vcpus > 0 { 2 } else { 0 }
    }

    /// Fds a `ReclaimVm` carries.
    pub(super) fn reclaim_fds(&self) -> usize {
        self.memory_fds()
            + usize::from(!self.host_addrs.is_empty())
            + if self.mailbox_vcpus > 0 { 2 } else { 0 }
            + usize::from(self.channel.is_some())
    }
}
