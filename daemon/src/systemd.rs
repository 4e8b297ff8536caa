//! Running under systemd: socket activation (the service manager passes the listening control
//! socket, `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES`, fds from 3 on) and readiness
//! notification (`sd_notify`: datagrams such as `READY=1` to `$NOTIFY_SOCKET`). Both protocols
//! are small and stable (systemd's `sd_listen_fds(3)`, `sd_notify(3)`); they are spoken here
//! directly, without libsystemd. Units and how to install them: `contrib/systemd/`,
//! docs/operations.md.

use crate::listener::{check_inherited, ListenerError};
use rustix::net::{AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// The first fd passed by socket activation (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;
/// `FileDescriptorName=` of the control socket in `vmpagerd.socket`: the fd with this name is
/// the control socket; without names, the first fd is.
pub const CONTROL_FD_NAME: &str = "control";
/// Most fds taken from the service manager (the control socket, and VM fds parked in its fd
/// store by a later daemon).
const MAX_LISTEN_FDS: usize = 4096;

/// Errors of socket activation and notification.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    /// `LISTEN_FDS` or `LISTEN_PID` is not a number.
    #[error("{name}={value:?} is not a valid number")]
    BadVariable {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
    },
    /// `LISTEN_FDS` passes more fds than the daemon takes.
    #[error("LISTEN_FDS={0} passes more than {MAX_LISTEN_FDS} fds")]
    TooManyFds(usize),
    /// An fd that `LISTEN_FDS` announces is not open.
    #[error("fd {0} announced by LISTEN_FDS is not open")]
    NotOpen(RawFd),
    /// The passed control socket is unusable.
    #[error("the socket passed by the service manager")]
    Control(#[source] ListenerError),
    /// `NOTIFY_SOCKET` is not an address the daemon can send to.
    #[error("NOTIFY_SOCKET={0:?} is not a Unix socket path or @abstract name")]
    BadNotifySocket(String),
    /// Creating the notification socket or sending on it failed.
    #[error("cannot notify the service manager")]
    Notify(#[source] std::io::Error),
}

impl SystemdError {
    /// Fatal at start-up (a broken activation environment); notification errors are not:
    /// the daemon serves on and logs them.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, SystemdError::Notify(_))
    }
}

/// What `LISTEN_*` announce for this process: the number of fds and their names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    /// Fds passed, from [`LISTEN_FDS_START`] on.
    pub count: usize,
    /// Their names (`LISTEN_FDNAMES`, colon-separated; `unknown` where none was given).
    pub names: Vec<String>,
}

impl Announced {
    /// Index of the control socket among the passed fds.
    pub fn control_index(&self) -> usize {
        self.names
            .iter()
            .position(|n| n == CONTROL_FD_NAME)
            .unwrap_or(0)
    }
}

/// Reads the `LISTEN_*` values: `None` unless they are meant for `own_pid` and pass at least
/// one fd (a `LISTEN_PID` of another process means the variables leaked from a parent).
pub fn parse_listen_env(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    own_pid: u32,
) -> Result<Option<Announced>, SystemdError> {
    let (Some(pid), Some(fds)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    let number = |name, value: &str| {
        value
            .trim()
            .parse::<usize>()
            .map_err(|_| SystemdError::BadVariable {
                name,
                value: value.to_string(),
            })
    };
    if number("LISTEN_PID", pid)? != own_pid as usize {
        return Ok(None);
    }
    let count = number("LISTEN_FDS", fds)?;
    if count == 0 {
        return Ok(None);
    }
    if count > MAX_LISTEN_FDS {
        return Err(SystemdError::TooManyFds(count));
    }
    let mut names: Vec<String> = listen_fdnames
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    names.resize(count, "unknown".to_string());
    Ok(Some(Announced { count, names }))
}

/// Fds passed by socket activation.
#[derive(Debug)]
pub struct Activation {
    /// The control socket: a listening `SOCK_SEQPACKET` socket.
    pub control: OwnedFd,
    /// Every other fd passed, with its name (none is expected: VMs survive a restart through
    /// their VMMs, not an fd store).
    pub others: Vec<(String, OwnedFd)>,
}

const LISTEN_VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// Removes `LISTEN_*` from the environment (so no child process takes them for its own),
/// for a daemon told where to listen on its command line. Call before starting any thread.
pub fn forget_listen_env() {
    for v in LISTEN_VARS {
        std::env::remove_var(v);
    }
}

/// Takes the fds the service manager passed to this process, if any, and removes `LISTEN_*`
/// from the environment either way. Each fd is made close-on-exec; the control socket (named
/// [`CONTROL_FD_NAME`], else the first) is checked to be a listening `SOCK_SEQPACKET` socket.
/// Call before starting any thread and before opening any fd (the passed fds must be the
/// ones at 3, 4, …).
pub fn take_listen_fds() -> Result<Option<Activation>, SystemdError> {
    let var = |name| std::env::var(name).ok();
    let announced = parse_listen_env(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    );
    forget_listen_env();
    let Some(announced) = announced? else {
        return Ok(None);
    };
    let control_index = announced.control_index();
    let mut control = None;
    let mut others = Vec::new();
    for (i, name) in announced.names.into_iter().enumerate() {
        let raw = LISTEN_FDS_START + i as RawFd;
        // SAFETY: fcntl(F_GETFD) on any number only queries the fd table; it dereferences no
        // memory, and an fd that is not open yields EBADF.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
        if flags < 0 {
            return Err(SystemdError::NotOpen(raw));
        }
        // SAFETY: the service manager passed fds 3..3+LISTEN_FDS to this very process
        // (LISTEN_PID is ours), the fd is open (checked above), and nothing in this process
        // owns it: the caller takes them before opening any fd of its own, and each number is
        // wrapped once.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)
            .map_err(|_| SystemdError::NotOpen(raw))?;
        if i == control_index {
            control = Some(fd);
        } else {
            others.push((name, fd));
        }
    }
    let control = control.ok_or(SystemdError::NotOpen(LISTEN_FDS_START))?;
    check_inherited(control.as_fd()).map_err(SystemdError::Control)?;
    Ok(Some(Activation { control, others }))
}

/// Sends state changes to the service manager (`sd_notify`).
#[derive(Debug)]
pub struct Notifier {
    socket: OwnedFd,
    addr: SocketAddrUnix,
}

impl Notifier {
    /// A notifier for `$NOTIFY_SOCKET`, which is removed from the environment (children must
    /// not notify in the daemon's name); `None` when it is unset (not run by a service manager
    /// that wants notifications). Call before starting any thread.
    pub fn from_env() -> Result<Option<Notifier>, SystemdError> {
        let addr = std::env::var("NOTIFY_SOCKET").ok();
        std::env::remove_var("NOTIFY_SOCKET");
        addr.map(|a| Notifier::new(&a)).transpose()
    }

    /// A notifier for `addr`: a socket path, or `@name` for an abstract socket.
    pub fn new(addr: &str) -> Result<Notifier, SystemdError> {
        let bad = || SystemdError::BadNotifySocket(addr.to_string());
        let unix = match addr.strip_prefix('@') {
            Some(name) if !name.is_empty() => SocketAddrUnix::new_abstract_name(name.as_bytes()),
            Some(_) => return Err(bad()),
            None if addr.starts_with('/') => SocketAddrUnix::new(addr),
            None => return Err(bad()),
        }
        .map_err(|_| bad())?;
        let socket = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| SystemdError::Notify(e.into()))?;
        // A service manager that stops reading must not wedge the thread that notifies.
        rustix::net::sockopt::set_socket_timeout(
            &socket,
            rustix::net::sockopt::Timeout::Send,
            Some(Duration::from_secs(1)),
        )
        .map_err(|e| SystemdError::Notify(e.into()))?;
        Ok(Notifier { socket, addr: unix })
    }

    /// Sends `state` (newline-separated `KEY=VALUE` assignments) in one datagram.
    pub fn notify(&self, state: &str) -> Result<(), SystemdError> {
        rustix::net::sendto(
            &self.socket,
            state.as_bytes(),
            SendFlags::NOSIGNAL,
            &self.addr,
        )
        .map(|_| ())
        .map_err(|e| SystemdError::Notify(e.into()))
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> Result<(), SystemdError> {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    /// A new status line (`systemctl status` shows it).
    pub fn status(&self, status: &str) -> Result<(), SystemdError> {
        self.notify(&format!("STATUS={}", one_line(status)))
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) -> Result<(), SystemdError> {
        self.notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)))
    }
}

/// A status is one assignment: no newline may end it early.
fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// The status line for `n` VMs.
pub fn serving_status(vms: i64) -> String {
    match vms {
        1 => "serving 1 VM".to_string(),
        n => format!("serving {n} VMs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn listen_variables_for_this_process_are_read_and_others_ignored() {
        let got = parse_listen_env(Some("42"), Some("1"), None, 42).unwrap();
        assert_eq!(
            got,
            Some(Announced {
                count: 1,
                names: vec!["unknown".into()]
            })
        );
        assert_eq!(
            parse_listen_env(Some("41"), Some("1"), None, 42).unwrap(),
            None
        );
        assert_eq!(parse_listen_env(None, Some("1"), None, 42).unwrap(), None);
        assert_eq!(parse_listen_env(Some("42"), None, None, 42).unwrap(), None);
        assert_eq!(
            parse_listen_env(Some("42"), Some("0"), None, 42).unwrap(),
            None
        );
        assert!(matches!(
            parse_listen_env(Some("42"), Some("x"), None, 42),
            Err(SystemdError::BadVariable {
                name: "LISTEN_FDS",
                ..
            })
        ));
        assert!(matches!(
            parse_listen_env(Some("-1"), Some("1"), None, 42),
            Err(SystemdError::BadVariable {
                name: "LISTEN_PID",
                ..
            })
        ));
        assert!(matches!(
            parse_listen_env(Some("42"), Some("100000"), None, 42),
            Err(SystemdError::TooManyFds(100000))
        ));
    }

    #[test]
    fn the_fd_named_control_is_the_control_socket() {
        let a = parse_listen_env(Some("7"), Some("3"), Some("vm-1-mem:control"), 7)
            .unwrap()
            .unwrap();
        assert_eq!(a.names, ["vm-1-mem", "control", "unknown"]);
        assert_eq!(a.control_index(), 1);
        let unnamed = parse_listen_env(Some("7"), Some("2"), None, 7)
            .unwrap()
            .unwrap();
        assert_eq!(unnamed.control_index(), 0);
    }

    fn receiver(addr: &SocketAddrUnix) -> OwnedFd {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        rustix::net::bind(&fd, addr).unwrap();
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(Duration::from_secs(10)),
        )
        .unwrap();
        fd
    }

    fn recv(fd: &OwnedFd) -> String {
        let mut buf = [0u8; 512];
        let n = rustix::io::read(fd, &mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn notifications_reach_a_path_socket_and_an_abstract_one() {
        let dir = std::env::temp_dir().join(format!("vmpager-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let rx = receiver(&SocketAddrUnix::new(&path).unwrap());
        let n = Notifier::new(path.to_str().unwrap()).unwrap();
        n.ready(&serving_status(0)).unwrap();
        assert_eq!(recv(&rx), "READY=1\nSTATUS=serving 0 VMs");
        n.status("two\nlines").unwrap();
        assert_eq!(recv(&rx), "STATUS=two lines");
        n.stopping(&serving_status(1)).unwrap();
        assert_eq!(recv(&rx), "STOPPING=1\nSTATUS=serving 1 VM");

        let name = format!("vmpager-notify-test-{}", std::process::id());
        let rx = receiver(&SocketAddrUnix::new_abstract_name(name.as_bytes()).unwrap());
        let n = Notifier::new(&format!("@{name}")).unwrap();
        n.ready("up").unwrap();
        assert_eq!(recv(&rx), "READY=1\nSTATUS=up");
        assert!(rx.as_raw_fd() >= 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unusable_notify_addresses_are_refused_and_a_vanished_manager_is_an_error() {
        for bad in ["", "@", "relative/path", "vsock:2:1234"] {
            assert!(
                matches!(Notifier::new(bad), Err(SystemdError::BadNotifySocket(_))),
                "{bad:?}"
            );
        }
        let gone = Notifier::new("/nonexistent/vmpager/notify").unwrap();
        let e = gone.ready("x").unwrap_err();
        assert!(!e.is_fatal());
    }
}
