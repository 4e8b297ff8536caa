//! The control socket: a `SOCK_SEQPACKET` Unix socket created under a restrictive umask and
//! guarded by a lock file, so two daemons never share a socket path.

use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Errors setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// Another daemon holds the lock of this socket path.
    #[error("another vmpagerd already serves {0}")]
    InUse(PathBuf),
    /// A system call failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An inherited fd is not a listening `SOCK_SEQPACKET` socket.
    #[error("fd {0} is not a listening SOCK_SEQPACKET socket")]
    NotSeqpacket(i32),
}

impl ListenerError {
    /// Every listener error is fatal at start-up.
    pub fn is_fatal(&self) -> bool {
        true
    }
}

/// A bound, listening socket plus its lock file. Dropping it removes the socket path.
#[derive(Debug)]
pub struct Bound {
    listener: OwnedFd,
    path: PathBuf,
    _lock: OwnedFd,
}

impl Bound {
    /// Takes `PATH.lock` (fails if another daemon holds it), removes a stale socket at `path`,
    /// and binds a new `SOCK_SEQPACKET` one with mode 0600 (umask 077 around the bind).
    pub fn new(path: &Path) -> Result<Bound, ListenerError> {
        Self::new_of(path, SocketType::SEQPACKET)
    }

    /// As [`Bound::new`], for a socket of type `kind` (Firecracker's handler socket is a
    /// `SOCK_STREAM`).
    pub fn new_of(path: &Path, kind: SocketType) -> Result<Bound, ListenerError> {
        let io = |what, source: rustix::io::Errno| ListenerError::Io {
            what,
            path: path.to_owned(),
            source: source.into(),
        };
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock = rustix::fs::open(
            Path::new(&lock_path),
            OFlags::CREATE | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io("cannot open the lock file of", e))?;
        match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(ListenerError::InUse(path.to_owned()))
            }
            Err(e) => return Err(io("cannot lock", e)),
        }
        // We hold the lock: whatever socket file is there is stale.
        match rustix::fs::unlink(path) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(io("cannot remove the stale socket", e)),
        }
        let sock = rustix::net::socket_with(AddressFamily::UNIX, kind, SocketFlags::CLOEXEC, None)
            .map_err(|e| io("cannot create a socket for", e))?;
        let addr = SocketAddrUnix::new(path).map_err(|e| io("bad socket path", e))?;
        let old = rustix::process::umask(Mode::from_raw_mode(0o077));
        let bound = rustix::net::bind(&sock, &addr);
        rustix::process::umask(old);
        bound.map_err(|e| io("cannot bind", e))?;
        rustix::net::listen(&sock, 128).map_err(|e| io("cannot listen on", e))?;
        Ok(Bound {
            listener: sock,
            path: path.to_owned(),
            _lock: lock,
        })
    }

    /// The listening socket.
    pub fn listener(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        let _ = rustix::fs::unlink(&self.path);
    }
}

/// Checks that an inherited fd (`--fd N`) is a listening `SOCK_SEQPACKET` socket.
pub fn check_inherited(fd: BorrowedFd<'_>) -> Result<(), ListenerError> {
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    let ty = rustix::net::sockopt::socket_type(fd).map_err(|_| ListenerError::NotSeqpacket(raw))?;
    let listening = rustix::net::sockopt::socket_acceptconn(fd)
        .map_err(|_| ListenerError::NotSeqpacket(raw))?;
    if ty != SocketType::SEQPACKET || !listening {
        return Err(ListenerError::NotSeqpacket(raw));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_daemon_is_refused_and_socket_is_private() {
        let dir = std::env::temp_dir().join(format!("vmpager-listener-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let first = Bound::new(&path).unwrap();
        assert!(matches!(Bound::new(&path), Err(ListenerError::InUse(_))));
        let mode = rustix::fs::stat(&path).unwrap().st_mode & 0o777;
        assert_eq!(mode & 0o077, 0, "socket mode {mode:o}");
        check_inherited(first.listener()).unwrap();
        drop(first);
        assert!(!path.exists());
        let again = Bound::new(&path).unwrap();
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
