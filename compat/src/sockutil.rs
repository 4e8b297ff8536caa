//! Small socket helpers shared by the protocol modules: sends that finish on blocking and
//! non-blocking sockets alike, one-fd `SCM_RIGHTS` sends, `recvmsg` that collects fds, and a
//! readiness wait with an optional deadline. `EINTR` is retried everywhere.

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Instant;

/// Most fds one `recvmsg` accepts; more are truncated (and closed) by the kernel.
pub(crate) const MAX_RECV_FDS: usize = 4;

/// Waits until `sock` reports one of `events` (or an error/hang-up condition, which the next
/// system call on it will report). Returns `Ok(false)` once `deadline` has passed; `None` waits
/// forever.
pub(crate) fn wait_ready(
    sock: BorrowedFd<'_>,
    events: PollFlags,
    deadline: Option<Instant>,
) -> std::io::Result<bool> {
    loop {
        let timeout = match deadline {
            None => None,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                // A duration too large for a timespec is as good as forever.
                Some(Timespec::try_from(left).unwrap_or(Timespec {
                    tv_sec: i64::MAX,
                    tv_nsec: 0,
                }))
            }
        };
        let mut fds = [PollFd::from_borrowed_fd(sock, events)];
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(0) => continue, // Timed out: the next round sees the deadline passed.
            Ok(_) => return Ok(true),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends all of `bytes` with plain `send` (no ancillary data), waiting for room on a
/// non-blocking socket.
pub(crate) fn send_all(sock: BorrowedFd<'_>, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match rustix::net::send(sock, bytes, SendFlags::NOSIGNAL) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => {
                wait_ready(sock, PollFlags::OUT, None)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sends `bytes` with exactly one `sendmsg` carrying `fd` in `SCM_RIGHTS`; if the kernel takes
/// only part of the bytes, the rest follows with plain sends (the fd goes only once).
pub(crate) fn send_with_fd(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fd: BorrowedFd<'_>,
) -> std::io::Result<()> {
    if bytes.is_empty() {
        // A stream socket cannot carry ancillary data without at least one byte.
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "an fd needs at least one data byte to travel with",
        ));
    }
    let fds = [fd];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other(
            "the control buffer has no room for one fd",
        ));
    }
    let sent = loop {
        match rustix::net::sendmsg(
            sock,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => break n,
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => {
                wait_ready(sock, PollFlags::OUT, None)?;
            }
            Err(e) => return Err(e.into()),
        }
    };
    send_all(sock, bytes.get(sent..).unwrap_or_default())
}

/// What one `recvmsg` brought.
pub(crate) struct Received {
    /// Data bytes written to the front of the buffer (0 means end of stream).
    pub(crate) bytes: usize,
    /// The fds that came with them, in order (owned: dropping closes them).
    pub(crate) fds: Vec<OwnedFd>,
    /// The kernel dropped fds that did not fit in [`MAX_RECV_FDS`].
    pub(crate) fds_truncated: bool,
}

/// One `recvmsg` into `buf` accepting up to [`MAX_RECV_FDS`] fds (received close-on-exec),
/// retrying `EINTR`. `EAGAIN` is returned to the caller.
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: RecvFlags,
) -> Result<Received, Errno> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_RECV_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = loop {
        match rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            flags | RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(msg) => break msg,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    };
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    Ok(Received {
        bytes: msg.bytes,
        fds,
        fds_truncated: msg.flags.contains(ReturnFlags::CTRUNC),
    })
}
