//! vmpager-migration: the post-copy migration protocol between two vmpager daemons.
//!
//! A source daemon serves a VM's pages over TCP; the destination pulls them. Two connections
//! per migration, like QEMU's postcopy-preempt: the **urgent** channel carries fault
//! requests and their pages (`TCP_NODELAY`, never behind bulk data), the **bulk** channel the
//! background push of every page not yet received. This crate holds the wire types, framing,
//! authentication and blocking transport; the daemon's page server and remote page source
//! are built on it. The normative description is `docs/migration-protocol.md`.
//!
//! * [`auth`]: the pre-shared [`Key`] and the mutual-authentication handshake.
//! * [`frame`]: the frame header and the per-direction keyed-BLAKE3 MAC with implicit
//!   sequence numbers.
//! * [`message`]: every message, its payload layout, encoding and bounded decoding.
//! * [`bitmap`]: the run-length-encoded bitmap `Resume` carries.
//! * [`channel`]: blocking TCP `connect` / `accept_and_authenticate`, [`Channel`] and its
//!   halves, liveness deadlines.
//! * [`backoff`]: reconnect pacing.
//!
//! **Authenticity and integrity, not confidentiality**: frames are MAC'd, not encrypted. Run
//! migrations over a trusted network or inside WireGuard/IPsec when guest memory must not be
//! seen on the wire.
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

pub mod auth;
pub mod backoff;
pub mod bitmap;
pub mod channel;
pub mod frame;
pub mod message;
pub mod netem;

pub use auth::{AuthError, ChannelKind, Key};
pub use backoff::Backoff;
pub use bitmap::{BitmapError, RleBitmap};
pub use channel::{
    accept_and_authenticate, connect, Channel, ChannelError, Reader, Timeouts, Writer,
};
pub use frame::FrameError;
pub use message::{DecodeError, ErrorCode, Message, MissingReason, PageRange};
pub use netem::{FaultyLink, LinkError};

/// The protocol version both sides must speak (handshake records carry it).
pub const PROTOCOL_VERSION: u16 = 1;
/// Guest page size: `Pages` carries whole pages of this size.
pub const PAGE_SIZE: u64 = 4096;
/// Most pages in one `Pages` frame (4 MiB).
pub const MAX_PAGES_PER_FRAME: usize = 1024;
/// Most page numbers in one `Request` frame.
pub const MAX_REQUEST_PAGES: usize = 512;
/// Most ranges in one `Invalidate` frame.
pub const MAX_INVALIDATE_RANGES: usize = 65536;
/// Longest `Error` text, in bytes.
pub const MAX_ERROR_TEXT: usize = 1024;
/// Largest frame payload: a full `Pages` frame (16-byte head and 4 MiB of pages). A header
/// announcing more is refused before anything is allocated.
pub const MAX_PAYLOAD: usize = 16 + MAX_PAGES_PER_FRAME * PAGE_SIZE as usize;
