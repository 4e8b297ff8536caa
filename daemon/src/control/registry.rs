//! The daemon's VMs and who holds each: a connection, or nobody for a grace period (its VMM
//! released it for an update, or died) during which a VMM may reattach or reclaim it.

use super::*;
use std::time::{Duration, Instant};
use vmpager_protocol::VmSession;

/// Who holds a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Owner {
    /// The connection with this token.
    Conn(usize),
    /// Nobody: freed at `until` unless a VMM reattaches or reclaims it first.
    Orphan {
        /// When the grace period ends.
        until: Instant,
    },
}

/// The mailbox of a VM, as the VMM got it (copies, handed to a VMM that takes the VM over).
pub(super) struct MailboxFds {
    pub memfd: OwnedFd,
    pub doorbell: OwnedFd,
    pub vcpus: u32,
    /// The daemon's mapping (closed when the VM is freed, so waiting vCPUs stop waiting).
    pub mailbox: Arc<Mailbox>,
}

/// One VM of the daemon.
pub(super) struct VmEntry {
    pub vm: Arc<Vm>,
    /// The worker serving its uffd, fault channel or mailbox.
    pub worker: Option<usize>,
    /// A uffd or fault channel is being served.
    pub attached: bool,
    /// The fault channel's protocol, if it is served on one.
    pub channel: Option<vmpager_protocol::ChannelProtocol>,
    pub mailbox: Option<MailboxFds>,
    pub owner: Owner,
    /// Uid of the process that created it (only that uid, or root, may take it over).
    pub uid: u32,
    /// The VM as created, with the populate method the daemon chose, and what `VmCreated`
    /// told the VMM.
    pub description: CreateVm,
    pub uffd_modes: u64,
    pub uffd_features: u64,
    pub created_flags: u32,
}

impl VmEntry {
    /// The session a VMM needs to take this VM over (without host addresses: it maps anew).
    pub fn session(&self) -> VmSession {
        VmSession {
            vm_id: self.vm.id,
            token: self.vm.token,
            uffd_modes: self.uffd_modes,
            uffd_features: self.uffd_features,
            created_flags: self.created_flags,
            mailbox_vcpus: self.mailbox.as_ref().map_or(0, |m| m.vcpus),
            channel: None,
            host_addrs: Vec::new(),
            create: self.description.clone(),
        }
    }

    /// Copies of the fds of `Reattached`: snapshot, memfds, state file, guest_memfds, mailbox.
    pub fn session_fds(&self) -> std::io::Result<Vec<OwnedFd>> {
        let regions = self.vm.memory.regions();
        let mut fds = Vec::new();
        if let Some(f) = self.vm.source.file() {
            fds.push(f.try_clone_to_owned()?);
        }
        for r in regions {
            if let Some(m) = r.memfd() {
                fds.push(m.try_clone_to_owned()?);
            }
        }
        fds.push(self.vm.memory.state_file().try_clone_to_owned()?);
        for r in regions {
            if let Some(g) = r.guest_memfd() {
                fds.push(g.try_clone_to_owned()?);
            }
        }
        if let Some(m) = &self.mailbox {
            fds.push(m.memfd.try_clone()?);
            fds.push(m.doorbell.try_clone()?);
        }
        Ok(fds)
    }
}

/// Constant-time comparison of two secrets.
pub(super) fn same_secret(a: u64, b: u64) -> bool {
    let d = a ^ b;
    std::hint::black_box(d) == 0
}

impl Reactor {
    /// VM `vm_id`, which connection `token` must hold: every request that acts on a VM goes
    /// through here, except those that take a VM over or listen to it ([`Self::presented`]).
    /// Another connection's VM, a VM nobody holds and an unknown id get the same answer.
    pub(super) fn owned(&self, token: usize, vm_id: u64) -> Result<&VmEntry, Refusal> {
        self.vms
            .get(&vm_id)
            .filter(|e| e.owner == Owner::Conn(token))
            .ok_or_else(|| unknown_vm(vm_id))
    }

    /// VM `vm_id`, which connection `token` does not need to hold, if it presents the VM's
    /// `secret` and its peer is of the uid that created the VM, or root
    /// ([`crate::access::may_act_for_creator`]). Every refusal gets the answer of an unknown id:
    /// no reply tells whether the id exists, whose it is, or which check failed.
    pub(super) fn presented(
        &self,
        token: usize,
        vm_id: u64,
        secret: u64,
    ) -> Result<&VmEntry, Refusal> {
        let peer = self.peer_uid(token);
        self.vms
            .get(&vm_id)
            .filter(|e| {
                // Both checks, whatever the first says.
                let token_ok = same_secret(e.vm.token, secret);
                let uid_ok = crate::access::may_act_for_creator(peer, e.uid);
                token_ok & uid_ok
            })
            .ok_or_else(|| unknown_vm(vm_id))
    }

    /// The uid of connection `token`'s peer (`SO_PEERCRED` at accept), if known.
    pub(super) fn peer_uid(&self, token: usize) -> Option<u32> {
        self.conns
            .get(&token)
            .and_then(|c| c.peer)
            .map(|p| p.uid.as_raw())
    }

    /// `Subscribe`: connection `token` receives VM `vm_id`'s conversion events from now on,
    /// until it closes or the VM is freed. It need not hold the VM (device backends subscribe
    /// on connections of their own), but must present its token from a peer of the uid that
    /// created it, or root.
    pub(super) fn subscribe(
        &mut self,
        token: usize,
        vm_id: u64,
        secret: u64,
    ) -> Result<(Message, Vec<OwnedFd>), Refusal> {
        self.presented(token, vm_id, secret)?;
        if let Some(conn) = self.conns.get_mut(&token) {
            if !conn.subscriptions.contains(&vm_id) {
                conn.subscriptions.push(vm_id);
            }
        }
        Ok((Message::Subscribed { vm_id }, vec![]))
    }

    /// VMs connection `token` holds.
    pub(super) fn held_by(&self, token: usize) -> Vec<u64> {
        self.vms
            .iter()
            .filter(|(_, e)| e.owner == Owner::Conn(token))
            .map(|(&id, _)| id)
            .collect()
    }

    /// Lets go of VM `vm_id`: its uffd or fault channel is no longer served (the VMM that
    /// registered it is going or gone), its memory, state and mailbox stay for the grace
    /// period. A grace period of zero frees it at once.
    pub(super) fn orphan(&mut self, vm_id: u64) {
        let grace = self.config.vm_grace;
        if grace.is_zero() {
            if let Some(entry) = self.vms.remove(&vm_id) {
                self.free_vm(vm_id, entry);
            }
            return;
        }
        let Some(entry) = self.vms.get_mut(&vm_id) else {
            return;
        };
        if entry.attached {
            if let Some(w) = entry.worker {
                if let Err(e) = self.workers[w].stop_faults(vm_id) {
                    tracing::error!(vm = vm_id, error = %e, "cannot stop a VM's fault server");
                }
            }
            entry.attached = false;
            entry.channel = None;
        }
        entry.owner = Owner::Orphan {
            until: Instant::now() + grace,
        };
        crate::metrics::VmMetrics::bump(&self.live.metrics().vms_orphaned);
        tracing::info!(
            vm = vm_id,
            grace_secs = grace.as_secs_f64(),
            "VM kept for a reattach"
        );
    }

    /// Frees the VMs whose grace period is over; returns how long until the next one ends.
    pub(super) fn expire_orphans(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let expired: Vec<u64> = self
            .vms
            .iter()
            .filter(|(_, e)| matches!(e.owner, Owner::Orphan { until } if until <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            if let Some(entry) = self.vms.remove(&id) {
                tracing::info!(vm = id, "no VMM reattached within the grace period: freed");
                crate::metrics::VmMetrics::bump(&self.live.metrics().vms_expired);
                self.free_vm(id, entry);
            }
        }
        self.vms
            .values()
            .filter_map(|e| match e.owner {
                Owner::Orphan { until } => Some(until.saturating_duration_since(now)),
                Owner::Conn(_) => None,
            })
            .min()
    }
}
