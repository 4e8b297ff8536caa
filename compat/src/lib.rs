//! vmpager-compat: the wire formats of other VMMs' external page-server protocols, so vmpager can
//! stand in for their handlers without changing them.
//!
//! Modules:
//! - [`firecracker`]: Firecracker's UFFD handshake (the region list in JSON plus the
//!   userfaultfd), its validation against the memory snapshot file, and the socket exchange.
//! - [`cloud_hypervisor`]: cloud-hypervisor's live-migration wire format
//!   ([`cloud_hypervisor::wire`]) and its snapshot directory layout
//!   ([`cloud_hypervisor::snapshot`]).
//!
//! Only parsing, validation, encoding and small blocking socket helpers live here: no daemon
//! logic, no userfaultfd handling, no threads. Nothing here panics on bytes read from a socket
//! or a file.
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod cloud_hypervisor;
pub mod firecracker;
mod sockutil;

/// The I/O error says the peer went away (reset, closed for writing, or never connected).
pub(crate) fn io_peer_gone(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
    ) || e.raw_os_error().is_some_and(|code| {
        code == Errno::PIPE.raw_os_error()
            || code == Errno::CONNRESET.raw_os_error()
            || code == Errno::NOTCONN.raw_os_error()
    })
}
