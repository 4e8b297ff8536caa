//! The control socket: a `SOCK_SEQPACKET` Unix socket created under a restrictive umask, given
//! its mode and group (`--socket-mode`, `--socket-group`) before it listens, and guarded by a
//! lock file, so two daemons never share a socket path.

use crate::access::SocketAccess;
use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
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
    /// The socket could not be given its group (`--socket-group`).
    #[error("cannot give {path} the group {gid} (the daemon's user must be root or a member of that group)")]
    Group {
        /// The socket path.
        path: PathBuf,
        /// The group.
        gid: u32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An inherited fd is not a listening `SOCK_SEQPACKET` socket.
    #[error("fd {0} is not a listening SOCK_SEQPACKET socket")]
    NotSeqpacket(i32),
    /// Something that is not a socket is at the socket path: it is never removed.
    #[error("{path} is {what}, not a socket: refusing to replace it (choose another path, or remove it yourself)")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
        /// What is there ("a regular file", "a directory", "a symbolic link", ...).
        what: &'static str,
    },
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
    /// and binds a new `SOCK_SEQPACKET` one with mode 0600 (bound under umask 077, then
    /// given its mode). Anything at `path` that is not a socket (a regular file, a directory, a
    /// symbolic link, a fifo, a device) is refused and left untouched.
    pub fn new(path: &Path) -> Result<Bound, ListenerError> {
        Self::new_of(path, SocketType::SEQPACKET)
    }

    /// As [`Bound::new`], for a socket of type `kind` (Firecracker's handler socket is a
    /// `SOCK_STREAM`).
    pub fn new_of(path: &Path, kind: SocketType) -> Result<Bound, ListenerError> {
        Self::with_access(path, kind, SocketAccess::default())
    }

    /// As [`Bound::new_of`], giving the socket `access`'s group (if any) and then its mode,
    /// both before it listens: no client connects before the socket has them.
    pub fn with_access(
        path: &Path,
        kind: SocketType,
        access: SocketAccess,
    ) -> Result<Bound, ListenerError> {
        let io = |what, source: rustix::io::Errno| ListenerError::Io {
            what,
            path: path.to_owned(),
            source: source.into(),
        };
        // Checked before the lock file is created (refusing leaves nothing behind) and again
        // under the lock (what is there may have changed meanwhile).
        refuse_non_socket(path)?;
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
        // We hold the lock: a socket file there is stale; anything else is not ours to remove.
        refuse_non_socket(path)?;
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
        let bound = Bound {
            listener: sock,
            path: path.to_owned(),
            _lock: lock,
        };
        // From here on, a failure removes the socket (`Drop`).
        give_access(path, access)?;
        rustix::net::listen(&bound.listener, 128).map_err(|e| io("cannot listen on", e))?;
        Ok(bound)
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

/// Gives the socket just bound at `path` the group and then the mode of `access`. The path is
/// opened without following a symbolic link and must still be a socket, so that a path
/// replaced meanwhile never has its target's mode changed.
fn give_access(path: &Path, access: SocketAccess) -> Result<(), ListenerError> {
    let io = |what, source: rustix::io::Errno| ListenerError::Io {
        what,
        path: path.to_owned(),
        source: source.into(),
    };
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io("cannot open the socket just bound at", e))?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| io("cannot inspect", e))?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Socket {
        return Err(ListenerError::NotASocket {
            path: path.to_owned(),
            what: "no longer the socket just bound",
        });
    }
    if let Some(gid) = access.group() {
        rustix::fs::chownat(
            &fd,
            "",
            None,
            Some(rustix::fs::Gid::from_raw(gid)),
            rustix::fs::AtFlags::EMPTY_PATH,
        )
        .map_err(|e| ListenerError::Group {
            path: path.to_owned(),
            gid,
            source: e.into(),
        })?;
    }
    // chmod cannot take an O_PATH fd; its /proc link names the same inode.
    rustix::fs::chmodat(
        rustix::fs::CWD,
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        Mode::from_raw_mode(access.mode() as _),
        rustix::fs::AtFlags::empty(),
    )
    .map_err(|e| io("cannot set the mode of", e))?;
    Ok(())
}

/// Refuses anything at `path` that is not a socket, without following a symbolic link.
fn refuse_non_socket(path: &Path) -> Result<(), ListenerError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ListenerError::Io {
                what: "cannot inspect",
                path: path.to_owned(),
                source,
            })
        }
    };
    let t = meta.file_type();
    let what = if t.is_socket() {
        return Ok(());
    } else if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a fifo"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "not a socket"
    };
    Err(ListenerError::NotASocket {
        path: path.to_owned(),
        what,
    })
}

/// Checks that an inherited fd (`--fd N`) is a listening `SOCK_SEQPACKET` socket.
pub fn check_inherited(fd: BorrowedFd<'_>) -> Result<(), ListenerError> {
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
        assert_eq!(mode, 0o600, "socket mode {mode:o}");
        check_inherited(first.listener()).unwrap();
        drop(first);
        assert!(!path.exists());
        let again = Bound::new(&path).unwrap();
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn test_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vmpager-listener-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn assert_refused(path: &Path, what: &str) {
        match Bound::new(path) {
            Err(e @ ListenerError::NotASocket { .. }) => {
                let text = e.to_string();
                assert!(text.contains(&path.display().to_string()), "{text}");
                assert!(text.contains(what), "{text}");
            }
            other => panic!("{} ({what}) was not refused: {other:?}", path.display()),
        }
    }

    #[test]
    fn a_regular_file_at_the_socket_path_is_refused_and_kept() {
        let dir = test_dir("file");
        let path = dir.join("precious.txt");
        std::fs::write(&path, b"do not delete").unwrap();
        assert_refused(&path, "a regular file");
        assert_eq!(std::fs::read(&path).unwrap(), b"do not delete");
        // Refused before anything was created next to it.
        assert!(!dir.join("precious.txt.lock").exists());
        // The firecracker handler's stream socket is refused the same way.
        assert!(matches!(
            Bound::new_of(&path, SocketType::STREAM),
            Err(ListenerError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"do not delete");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn directories_symlinks_and_fifos_are_refused() {
        let dir = test_dir("kinds");
        let sub = dir.join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("f"), b"x").unwrap();
        assert_refused(&sub, "a directory");
        assert!(sub.join("f").exists());

        let target = dir.join("target.txt");
        std::fs::write(&target, b"kept").unwrap();
        let link = dir.join("link.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_refused(&link, "a symbolic link");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"kept");

        // A symbolic link to a socket is not followed either.
        let real = dir.join("real.sock");
        let bound = Bound::new(&real).unwrap();
        let to_socket = dir.join("to-socket.sock");
        std::os::unix::fs::symlink(&real, &to_socket).unwrap();
        assert_refused(&to_socket, "a symbolic link");
        drop(bound);

        let fifo = dir.join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert_refused(&fifo, "a fifo");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_socket_gets_its_mode_and_group_before_it_listens() {
        let dir = test_dir("access");
        let path = dir.join("s.sock");
        // A group this process may always give its files: its own.
        let gid = rustix::process::getgid().as_raw();
        let access = SocketAccess::new(0o660, Some(gid)).unwrap();
        let bound = Bound::with_access(&path, SocketType::SEQPACKET, access).unwrap();
        let st = rustix::fs::stat(&path).unwrap();
        assert_eq!(st.st_mode & 0o7777, 0o660);
        assert_eq!(st.st_gid, gid);
        check_inherited(bound.listener()).unwrap();
        drop(bound);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let dir = test_dir("stale");
        let path = dir.join("s.sock");
        // A socket file nobody listens on any more (a daemon that was killed).
        let sock = rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None).unwrap();
        rustix::net::bind(&sock, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        drop(sock);
        assert!(path.exists());
        let bound = Bound::new(&path).unwrap();
        // The new socket accepts connections.
        let client = rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None).unwrap();
        rustix::net::connect(&client, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        drop(bound);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
