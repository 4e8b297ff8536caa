//! The fixed header at the start of every message.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `"VMPG"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"VMPG");
/// Size of [`Header`] on the wire.
pub const HEADER_LEN: usize = 24;

/// The 24-byte header. All fields little-endian.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | magic `"VMPG"` |
/// | 4 | 2 | protocol version |
/// | 6 | 2 | message kind |
/// | 8 | 4 | payload length (bytes after the header) |
/// | 12 | 4 | number of fds sent with this message (`SCM_RIGHTS`) |
/// | 16 | 8 | request id (a reply carries the id of its request) |
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Header {
    /// Must be [`MAGIC`].
    pub magic: U32,
    /// Protocol version of the sender.
    pub version: U16,
    /// Message kind (see `message::Kind`).
    pub kind: U16,
    /// Payload length in bytes.
    pub payload_len: U32,
    /// Number of fds attached to this message.
    pub fd_count: U32,
    /// Request id; `0` is reserved for unsolicited messages.
    pub request_id: U64,
}

const _: () = assert!(core::mem::size_of::<Header>() == HEADER_LEN);
