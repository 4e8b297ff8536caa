//! What can go wrong talking to the daemon, classified.

use crate::memory::MemoryError;
use vmpager_protocol::{ErrorCode, SocketError};

/// Errors talking to the daemon, classified with [`ClientError::peer_gone`] and
/// [`ClientError::is_retryable`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Transport failure.
    #[error("control connection failed")]
    Socket(#[from] SocketError),
    /// The daemon refused the request.
    #[error("vmpagerd refused the request ({code:?}): {text}")]
    Refused {
        /// Typed code.
        code: ErrorCode,
        /// The daemon's explanation.
        text: String,
    },
    /// The daemon answered with something that is not the reply to the request.
    #[error("unexpected reply from vmpagerd: {0}")]
    Protocol(String),
    /// Mapping or registering guest memory failed.
    #[error("cannot set up guest memory")]
    Memory(#[from] MemoryError),
    /// Opening or reading a local file failed.
    #[error("I/O error")]
    Io(#[source] std::io::Error),
    /// The daemon went away and no daemon took the VMs back in time: the VMs cannot be served
    /// (pause or fail them).
    #[error("vmpagerd is gone: {0}")]
    DaemonLost(String),
    /// The daemon went away while the request was in flight; a restarted daemon took the VMs
    /// back, but whether it acted on this request is unknown.
    #[error("vmpagerd restarted while the request was in flight")]
    Interrupted,
}

impl ClientError {
    /// The daemon went away (for good: [`ClientError::DaemonLost`]).
    pub fn peer_gone(&self) -> bool {
        match self {
            ClientError::Socket(e) => e.is_peer_gone(),
            ClientError::DaemonLost(_) => true,
            _ => false,
        }
    }

    /// The same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Socket(e) => e.is_retryable(),
            ClientError::Interrupted => true,
            ClientError::Refused { code, .. } => {
                matches!(code, ErrorCode::Internal | ErrorCode::LimitExceeded)
            }
            _ => false,
        }
    }
}
