//! `SOCK_SEQPACKET` transport: one message per record, fds passed with `SCM_RIGHTS`.

use crate::header::{Header, HEADER_LEN};
use crate::message::{DecodeError, Message};
use crate::{MAX_FDS, MAX_PAYLOAD};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use zerocopy::FromBytes;

/// Transport errors, classified with [`SocketError::is_peer_gone`] and
/// [`SocketError::is_retryable`].
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The peer closed the connection.
    #[error("peer closed the connection")]
    Closed,
    /// Non-blocking socket has nothing to read (or no room to write) now.
    #[error("operation would block")]
    WouldBlock,
    /// A record larger than the protocol allows arrived (it was discarded).
    #[error("message exceeds the size limit")]
    Truncated,
    /// More fds than the protocol allows arrived (all of them were closed).
    #[error("message carries more than {MAX_FDS} fds")]
    TooManyFds,
    /// The caller passed a different number of fds than the message declares.
    #[error("message declares {declared} fds but {given} were given")]
    FdArity {
        /// What the message declares.
        declared: usize,
        /// What the caller passed.
        given: usize,
    },
    /// The record could not be decoded.
    #[error("malformed message (request {request_id})")]
    Decode {
        /// The request id from the header, or 0 if the header itself was unreadable.
        request_id: u64,
        /// Why.
        #[source]
        error: DecodeError,
    },
    /// The reply did not match the request.
    #[error("unexpected reply {0}")]
    UnexpectedReply(String),
    /// A system call failed.
    #[error("socket system call failed")]
    Io(#[from] std::io::Error),
}

impl SocketError {
    /// The connection is unusable because the peer went away.
    pub fn is_peer_gone(&self) -> bool {
        match self {
            SocketError::Closed => true,
            SocketError::Io(e) => matches!(
                e.raw_os_error(),
                Some(libc_errno) if libc_errno == Errno::PIPE.raw_os_error()
                    || libc_errno == Errno::CONNRESET.raw_os_error()
                    || libc_errno == Errno::NOTCONN.raw_os_error()
            ),
            _ => false,
        }
    }

    /// Trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            SocketError::WouldBlock => true,
            SocketError::Io(e) => e.raw_os_error() == Some(Errno::INTR.raw_os_error()),
            _ => false,
        }
    }

    /// The peer sent something that violates the protocol (the connection may still be used).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            SocketError::Truncated | SocketError::TooManyFds | SocketError::Decode { .. }
        )
    }
}

fn io(e: Errno) -> SocketError {
    if e == Errno::AGAIN {
        SocketError::WouldBlock
    } else {
        SocketError::Io(e.into())
    }
}

/// A received message with the fds that came with it (in order).
#[derive(Debug)]
pub struct Received {
    /// The decoded header.
    pub header: Header,
    /// The message.
    pub message: Message,
    /// Fds carried by the message; as many as the message declares.
    pub fds: Vec<OwnedFd>,
}

/// One end of a control connection.
#[derive(Debug)]
pub struct Connection {
    fd: OwnedFd,
    next_request: AtomicU64,
}

impl Connection {
    /// Connects (blocking) to a daemon listening at `path`.
    pub fn connect(path: &Path) -> Result<Connection, SocketError> {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(io)?;
        let addr = SocketAddrUnix::new(path).map_err(io)?;
        rustix::net::connect(&fd, &addr).map_err(io)?;
        Ok(Connection::from_fd(fd))
    }

    /// Wraps a connected `SOCK_SEQPACKET` socket.
    pub fn from_fd(fd: OwnedFd) -> Connection {
        Connection {
            fd,
            next_request: AtomicU64::new(1),
        }
    }

    /// A connected pair (for tests and in-process use).
    pub fn pair() -> Result<(Connection, Connection), SocketError> {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(io)?;
        Ok((Connection::from_fd(a), Connection::from_fd(b)))
    }

    /// Sends `message` with `request_id` and exactly the fds it declares.
    pub fn send(
        &self,
        message: &Message,
        request_id: u64,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), SocketError> {
        if fds.len() != message.fd_count() {
            return Err(SocketError::FdArity {
                declared: message.fd_count(),
                given: fds.len(),
            });
        }
        let bytes = message.encode(request_id);
        self.send_raw(&bytes, fds)
    }

    /// Sends raw bytes as one record (tests use this to send malformed messages).
    pub fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), SocketError> {
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(SocketError::TooManyFds);
        }
        loop {
            match rustix::net::sendmsg(
                &self.fd,
                &[IoSlice::new(bytes)],
                &mut control,
                SendFlags::NOSIGNAL,
            ) {
                Ok(_) => return Ok(()),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(io(e)),
            }
        }
    }

    /// Bounds every blocking send and receive to `timeout` (`None`: no bound); a wait that
    /// runs out fails with `WouldBlock`.
    pub fn set_timeout(&self, timeout: Option<std::time::Duration>) -> Result<(), SocketError> {
        for kind in [
            rustix::net::sockopt::Timeout::Recv,
            rustix::net::sockopt::Timeout::Send,
        ] {
            rustix::net::sockopt::set_socket_timeout(&self.fd, kind, timeout).map_err(io)?;
        }
        Ok(())
    }

    /// Receives and decodes one message. On a non-blocking socket with nothing queued (or
    /// after the timeout of [`Connection::set_timeout`]), returns [`SocketError::WouldBlock`].
    /// A malformed record is consumed whole (its fds closed) and reported as bad input; the
    /// connection stays usable.
    pub fn recv(&self) -> Result<Received, SocketError> {
        self.recv_with(RecvFlags::empty())
    }

    fn recv_with(&self, flags: RecvFlags) -> Result<Received, SocketError> {
        let mut buf = vec![0u8; HEADER_LEN + MAX_PAYLOAD + 1];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = loop {
            match rustix::net::recvmsg(
                &self.fd,
                &mut [IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC | flags,
            ) {
                Ok(m) => break m,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(io(e)),
            }
        };
        // Take ownership of every fd that arrived first, so each is closed on every error path.
        let mut fds = Vec::new();
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = m {
                fds.extend(rights);
            }
        }
        if msg.flags.contains(ReturnFlags::CTRUNC) {
            return Err(SocketError::TooManyFds);
        }
        if msg.flags.contains(ReturnFlags::TRUNC) || msg.bytes > HEADER_LEN + MAX_PAYLOAD {
            return Err(SocketError::Truncated);
        }
        if msg.bytes == 0 && fds.is_empty() {
            return Err(SocketError::Closed);
        }
        let bytes = &buf[..msg.bytes];
        let (header, message) = Message::decode(bytes, fds.len()).map_err(|error| {
            let request_id = Header::read_from_prefix(bytes).map_or(0, |(h, _)| h.request_id.get());
            SocketError::Decode { request_id, error }
        })?;
        Ok(Received {
            header,
            message,
            fds,
        })
    }

    /// Sends a request with a fresh request id and waits (blocking) for the reply carrying that id.
    /// An `Error` reply is returned as a message, not as an `Err`. An `Error` with request id 0
    /// answers the request too: a daemon that will not serve this connection (its uid, its
    /// connection limit) sends one before it closes, and that `Error` is returned even when the
    /// peer was already gone when the request was sent.
    pub fn request(
        &self,
        message: &Message,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Received, SocketError> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let reply = match self.send(message, id, fds).and_then(|()| self.recv()) {
            Ok(reply) => reply,
            Err(e) if e.is_peer_gone() => return self.parting_error().ok_or(e),
            Err(e) => return Err(e),
        };
        let got = reply.header.request_id.get();
        if got != id && !(got == 0 && matches!(reply.message, Message::Error(_))) {
            return Err(SocketError::UnexpectedReply(format!(
                "reply to request {got} while waiting for {id}"
            )));
        }
        Ok(reply)
    }

    /// Once the peer is gone: the `Error` with request id 0 it sent before closing, if it is
    /// still queued here. Never blocks. (A peer that closes with records of ours unread leaves
    /// `ECONNRESET`, reported once, ahead of the records it sent.)
    fn parting_error(&self) -> Option<Received> {
        // Bounded: the peer is gone, so the queue only shrinks; the bound guards against a peer
        // that is in fact alive and keeps sending.
        for _ in 0..64 {
            match self.recv_with(RecvFlags::DONTWAIT) {
                Ok(r)
                    if r.header.request_id.get() == 0 && matches!(r.message, Message::Error(_)) =>
                {
                    return Some(r)
                }
                Ok(_) => continue,
                Err(e) if e.is_peer_gone() && !matches!(e, SocketError::Closed) => continue,
                Err(e) if e.is_bad_input() => continue,
                Err(_) => return None,
            }
        }
        None
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
