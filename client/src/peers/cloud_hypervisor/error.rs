//! What can go wrong while playing cloud-hypervisor's receiver, classified by [`PeerErrorKind`].

use super::ChReport;
use std::time::Duration;
use vmpager_compat::cloud_hypervisor::wire::WireError;

/// Who or what an error is due to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerErrorKind {
    /// The receiver refused what the sender sent (one of cloud-hypervisor's checks failed) and
    /// answered `Error`.
    Refused,
    /// The sender broke the wire format (bytes cloud-hypervisor cannot parse).
    Protocol,
    /// The sender went away (closed or reset a connection).
    PeerGone,
    /// The sender abandoned the migration.
    Abandoned,
    /// The sender answered a `PageFault` with `Error` or with a payload.
    SenderFailed,
    /// Something did not happen in time.
    Timeout,
    /// A local system call failed (not the sender's doing).
    Local,
}

/// An error of [`ChReceiver`](super::ChReceiver) or [`ChVm`](super::ChVm).
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// A check of cloud-hypervisor's failed; the receiver answered `Error` and stopped.
    #[error("the receiver refused the migration: {0}")]
    Refused(String),
    /// The sender sent `Abandon` (answered `Ok`).
    #[error("the sender abandoned the migration")]
    Abandoned,
    /// A message could not be read or written, or was malformed.
    #[error("{during}: {error}")]
    Wire {
        /// What the receiver was doing.
        during: String,
        /// Cause.
        error: WireError,
    },
    /// The fault connection did not arrive in time after `State`.
    #[error("the sender did not open the fault connection within {0:?} of State")]
    NoFaultConnection(Duration),
    /// The sender answered a `PageFault` with a status other than `Ok`.
    #[error("the sender answered the PageFault for gpa {gpa:#x} with {status}")]
    PageFaultRefused {
        /// The page asked for.
        gpa: u64,
        /// The status received.
        status: String,
    },
    /// The sender answered a `PageFault` with payload bytes (shared-backing mode expects none).
    #[error("shared-backing PageFault response carried {bytes} unexpected bytes (gpa {gpa:#x})")]
    PageFaultPayload {
        /// The page asked for.
        gpa: u64,
        /// The payload length announced.
        bytes: u64,
    },
    /// `UFFDIO_CONTINUE` (or the `UFFDIO_WAKE` after `EEXIST`) failed.
    #[error("cannot map gpa {gpa:#x} at host address {addr:#x} with UFFDIO_CONTINUE: {error}")]
    Continue {
        /// The page's guest address.
        gpa: u64,
        /// The page's host address.
        addr: u64,
        /// Cause.
        error: std::io::Error,
    },
    /// A local system call failed.
    #[error("{context}: {error}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        error: std::io::Error,
    },
    /// [`ChVm::read_gpa`](super::ChVm::read_gpa) was given addresses outside guest RAM.
    #[error("gpa range {gpa:#x}..+{len:#x} is not guest RAM of this VM")]
    OutOfRange {
        /// First address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The page-fault handler failed earlier (as cloud-hypervisor would have exited).
    #[error("the page-fault handler failed: {message}")]
    HandlerFailed {
        /// The kind of the handler's error.
        kind: PeerErrorKind,
        /// The handler's error.
        message: String,
    },
    /// The page-fault handler thread panicked.
    #[error("the page-fault handler thread panicked: {0}")]
    HandlerPanicked(String),
    /// A background pull failed, so the handler gave it up (demand faults were still served).
    #[error(
        "the background pull was abandoned after {} pages: {error}",
        report.background_pulls
    )]
    BackgroundAbandoned {
        /// Why.
        error: Box<PeerError>,
        /// The counters when [`ChVm::wait`](super::ChVm::wait) returned.
        report: ChReport,
    },
    /// [`ChVm::wait`](super::ChVm::wait) timed out.
    #[error(
        "the background pull did not finish within {timeout:?} ({} demand faults, {} background \
         pulls so far)",
        report.demand_faults,
        report.background_pulls
    )]
    Timeout {
        /// The time waited.
        timeout: Duration,
        /// The counters at the timeout.
        report: ChReport,
    },
}

impl PeerError {
    /// Who or what the error is due to.
    pub fn kind(&self) -> PeerErrorKind {
        match self {
            PeerError::Refused(_) => PeerErrorKind::Refused,
            PeerError::Abandoned => PeerErrorKind::Abandoned,
            PeerError::Wire { error, .. } => wire_kind(error),
            PeerError::NoFaultConnection(_) | PeerError::Timeout { .. } => PeerErrorKind::Timeout,
            PeerError::PageFaultRefused { .. } | PeerError::PageFaultPayload { .. } => {
                PeerErrorKind::SenderFailed
            }
            PeerError::Continue { .. } | PeerError::Io { .. } | PeerError::HandlerPanicked(_) => {
                PeerErrorKind::Local
            }
            PeerError::OutOfRange { .. } => PeerErrorKind::Local,
            PeerError::HandlerFailed { kind, .. } => *kind,
            PeerError::BackgroundAbandoned { error, .. } => error.kind(),
        }
    }

    pub(super) fn io(context: impl Into<String>, error: std::io::Error) -> PeerError {
        PeerError::Io {
            context: context.into(),
            error,
        }
    }

    pub(super) fn wire(during: impl Into<String>, error: WireError) -> PeerError {
        PeerError::Wire {
            during: during.into(),
            error,
        }
    }
}

fn wire_kind(error: &WireError) -> PeerErrorKind {
    if error.peer_gone() {
        PeerErrorKind::PeerGone
    } else if error.is_bad_input() {
        PeerErrorKind::Protocol
    } else {
        PeerErrorKind::Local
    }
}

/// The errno behind a userfaultfd crate error, as an `io::Error` (its own messages say only
/// "System error").
pub(super) fn uffd_io(error: userfaultfd::Error) -> std::io::Error {
    match error {
        userfaultfd::Error::SystemError(errno) => std::io::Error::from_raw_os_error(errno as i32),
        userfaultfd::Error::OpenDevUserfaultfd(e) => e,
        other => std::io::Error::other(other.to_string()),
    }
}
