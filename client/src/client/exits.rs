//! A VM's exits as vCPU threads use them (the mailbox), and conversion events for backends
//! that must follow them.

use super::{Client, ClientError};
use crate::link::Link;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use vmpager_protocol::mailbox::{Liveness, Mailbox, VcpuChannel, WaitPolicy};
use vmpager_protocol::{ConversionEvent, Message};

impl Client {
    /// Creates the VM's per-vCPU mailbox. Build one [`VcpuChannel`] per vCPU thread with
    /// [`VmExits::channel`].
    pub fn open_mailbox(&self, vm_id: u64, vcpus: u32) -> Result<VmExits, ClientError> {
        let reply = self.call(&Message::OpenMailbox { vm_id, vcpus }, &[], false)?;
        match reply.message {
            Message::MailboxOpened {
                vm_id: id,
                vcpus: n,
            } if id == vm_id && n == vcpus => {
                let mut fds = reply.fds.into_iter();
                let (Some(mailbox), Some(doorbell)) = (fds.next(), fds.next()) else {
                    return Err(ClientError::Protocol(
                        "MailboxOpened without its fds".into(),
                    ));
                };
                if let Some(k) = self.link.kept().get_mut(&vm_id) {
                    k.mailbox = Some((
                        mailbox.try_clone().map_err(ClientError::Io)?,
                        doorbell.try_clone().map_err(ClientError::Io)?,
                        vcpus,
                    ));
                }
                self.exits(mailbox, doorbell)
            }
            other => Err(ClientError::Protocol(format!(
                "{:?} instead of MailboxOpened",
                other.kind()
            ))),
        }
    }

    /// The mailbox `mailbox` (its doorbell `doorbell`) as vCPUs use it: waits go on while the
    /// daemon is away, and fail once the link is lost.
    pub(crate) fn exits(
        &self,
        mailbox: OwnedFd,
        doorbell: OwnedFd,
    ) -> Result<VmExits, ClientError> {
        let mailbox = Mailbox::map(mailbox.as_fd())
            .map_err(|e| ClientError::Protocol(format!("bad mailbox: {e}")))?;
        Ok(VmExits {
            mailbox: Arc::new(mailbox),
            doorbell: Arc::new(doorbell),
            liveness: self.link.clone(),
        })
    }

    /// Turns this connection into a listener of `vm_id`'s conversion events (what a VFIO or
    /// vhost-user backend needs). `token` comes from the VMM (`CreatedVm::token`), and this
    /// process must run as the VMM's uid, or root: the daemon refuses anyone else as it
    /// refuses an unknown VM. A subscription ends with an error when the daemon goes away
    /// (subscribe again).
    pub fn subscribe(self, vm_id: u64, token: u64) -> Result<Subscription, ClientError> {
        match self
            .call(&Message::Subscribe { vm_id, token }, &[], false)?
            .message
        {
            Message::Subscribed { vm_id: id } if id == vm_id => Ok(Subscription {
                link: self.link.clone(),
            }),
            other => Err(ClientError::Protocol(format!(
                "{:?} instead of Subscribed",
                other.kind()
            ))),
        }
    }
}

/// A VM's mailbox, as the VMM holds it: hand one [`VcpuChannel`] to each vCPU thread. It
/// (and each channel) keeps the client's link, so the connection, and the VM it holds, stay
/// while one lives.
#[derive(Debug, Clone)]
pub struct VmExits {
    mailbox: Arc<Mailbox>,
    doorbell: Arc<OwnedFd>,
    liveness: Arc<dyn Liveness>,
}

impl VmExits {
    /// The channel of vCPU `index` (one per vCPU thread; never share one between threads).
    pub fn channel(&self, index: u32, policy: WaitPolicy) -> Result<VcpuChannel, ClientError> {
        VcpuChannel::new(
            self.mailbox.clone(),
            index,
            self.doorbell.clone(),
            self.liveness.clone(),
            policy,
        )
        .map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

/// A connection that receives a VM's conversion events.
#[derive(Debug)]
pub struct Subscription {
    link: Arc<Link>,
}

impl Subscription {
    /// Waits for the next conversion event.
    pub fn next_event(&self) -> Result<ConversionEvent, ClientError> {
        match self.link.conn().recv()?.message {
            Message::ConversionEvent(e) => Ok(e),
            other => Err(ClientError::Protocol(format!(
                "{:?} instead of ConversionEvent",
                other.kind()
            ))),
        }
    }
}
