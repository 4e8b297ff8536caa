//! The messages carried by authenticated frames, their payload layouts, encoding and bounded
//! decoding. Every integer is little-endian; every reserved field must be zero; a payload must
//! be exactly as long as its layout says. `docs/migration-protocol.md` is the normative text.

use crate::bitmap::{BitmapError, RleBitmap};
use crate::{
    MAX_ERROR_TEXT, MAX_INVALIDATE_RANGES, MAX_PAGES_PER_FRAME, MAX_PAYLOAD, MAX_REQUEST_PAGES,
    PAGE_SIZE,
};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Errors decoding a message payload. All of them are bad input from the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The kind is 0 or not one this version knows.
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    /// The payload is shorter or longer than the layout of its kind.
    #[error("{kind:?} payload has the wrong length ({len} bytes)")]
    Length {
        /// The message kind.
        kind: Kind,
        /// The payload length received.
        len: usize,
    },
    /// A reserved field is not zero.
    #[error("{0:?} has a non-zero reserved field")]
    Reserved(Kind),
    /// A count is zero or above its limit.
    #[error("{kind:?} count {count} is outside 1..={max}")]
    Count {
        /// The message kind.
        kind: Kind,
        /// The count received.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// A page range runs past page 2^64 - 1.
    #[error("{0:?} page range overflows")]
    Overflow(Kind),
    /// `Missing.reason` or `Error.code` is not a known value.
    #[error("{kind:?} has unknown code {code}")]
    UnknownCode {
        /// The message kind.
        kind: Kind,
        /// The code received.
        code: u32,
    },
    /// `Error.text` is not UTF-8.
    #[error("error text is not UTF-8")]
    Text,
    /// The `Resume` bitmap is malformed or longer than `total_pages - first`.
    #[error("malformed resume bitmap")]
    Bitmap(#[source] BitmapError),
}

impl DecodeError {
    /// Always bad input: the peer sent bytes that will never decode.
    pub fn is_bad_input(&self) -> bool {
        true
    }
}

/// Message kinds (the `kind` field of the frame header). `0` is reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// [`Message::Request`].
    Request = 1,
    /// [`Message::Pages`].
    Pages = 2,
    /// [`Message::Zeros`].
    Zeros = 3,
    /// [`Message::Missing`].
    Missing = 4,
    /// [`Message::Resume`].
    Resume = 5,
    /// [`Message::Hint`].
    Hint = 6,
    /// [`Message::Invalidate`].
    Invalidate = 7,
    /// [`Message::SentAll`].
    SentAll = 8,
    /// [`Message::Done`].
    Done = 9,
    /// [`Message::DoneAck`].
    DoneAck = 10,
    /// [`Message::Ping`].
    Ping = 11,
    /// [`Message::Pong`].
    Pong = 12,
    /// [`Message::Error`].
    Error = 13,
    /// [`Message::Switchover`].
    Switchover = 14,
}

impl Kind {
    /// The kind with this wire value.
    pub fn from_u16(v: u16) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Request,
            2 => Pages,
            3 => Zeros,
            4 => Missing,
            5 => Resume,
            6 => Hint,
            7 => Invalidate,
            8 => SentAll,
            9 => Done,
            10 => DoneAck,
            11 => Ping,
            12 => Pong,
            13 => Error,
            14 => Switchover,
            _ => return None,
        })
    }
}

/// Why the source cannot supply a page (`Missing.reason`). `0` is reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MissingReason {
    /// The page number is past the end of the VM's memory.
    OutOfRange = 1,
    /// Reading the page failed on the source (I/O error, poisoned page).
    ReadFailed = 2,
    /// The source no longer has the VM's memory (it was freed or the VM was discarded).
    Gone = 3,
}

/// `Error.code`. `0` is reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// A message could not be decoded.
    BadMessage = 1,
    /// A message is not allowed on this channel or in this state.
    BadState = 2,
    /// The migration is unknown or was cancelled.
    UnknownMigration = 3,
    /// The sender is shutting down; reconnecting later may work.
    ShuttingDown = 4,
    /// Anything else; the text says what.
    Internal = 5,
}

impl MissingReason {
    fn from_u32(v: u32) -> Option<MissingReason> {
        Some(match v {
            1 => MissingReason::OutOfRange,
            2 => MissingReason::ReadFailed,
            3 => MissingReason::Gone,
            _ => return None,
        })
    }
}

impl ErrorCode {
    fn from_u32(v: u32) -> Option<ErrorCode> {
        Some(match v {
            1 => ErrorCode::BadMessage,
            2 => ErrorCode::BadState,
            3 => ErrorCode::UnknownMigration,
            4 => ErrorCode::ShuttingDown,
            5 => ErrorCode::Internal,
            _ => return None,
        })
    }
}

/// A range of pages `[first, first + count)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRange {
    /// First page number.
    pub first: u64,
    /// Number of pages, at least 1.
    pub count: u64,
}

/// Every message after the handshake. Which side sends which, and on which channel, is in
/// `docs/migration-protocol.md`; the transport does not enforce it (the caller does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Destination → source, urgent: send these pages (1..=[`MAX_REQUEST_PAGES`]).
    Request {
        /// Page numbers, in the order the destination wants them.
        pages: Vec<u64>,
    },
    /// Source → destination: `count` contiguous pages from `first`; `data` is
    /// `count × PAGE_SIZE` bytes (1..=[`MAX_PAGES_PER_FRAME`] pages).
    Pages {
        /// First page number.
        first: u64,
        /// The pages' bytes.
        data: Vec<u8>,
    },
    /// Source → destination: these pages are all zero (no bytes follow).
    Zeros {
        /// First page number.
        first: u64,
        /// Number of pages, at least 1.
        count: u32,
    },
    /// Source → destination: this page cannot be had.
    Missing {
        /// The page number.
        page: u64,
        /// Why.
        reason: MissingReason,
    },
    /// Destination → source, bulk channel at (re)connect: the destination already has the
    /// set bits of `received`, which covers pages `[first, first + received.len())` of a VM of
    /// `total_pages` pages. A large bitmap is sent as several `Resume`s.
    Resume {
        /// The VM's size in pages.
        total_pages: u64,
        /// The page the bitmap's bit 0 stands for.
        first: u64,
        /// Pages the destination has.
        received: RleBitmap,
    },
    /// Destination → source, bulk: the destination faulted near this page lately; push from
    /// there.
    Hint {
        /// The page number.
        page: u64,
    },
    /// Source → destination: pages written on the source after they were sent; the
    /// destination must request them again (1..=[`MAX_INVALIDATE_RANGES`] ranges).
    Invalidate {
        /// The ranges.
        ranges: Vec<PageRange>,
    },
    /// Source → destination, bulk: every page has been pushed once.
    SentAll,
    /// Destination → source: every page was received; the source may free the memory.
    Done,
    /// Source → destination: answer to `Done`.
    DoneAck,
    /// Hybrid migration, on the bulk channel. Source → destination: the source VM is frozen;
    /// every `Invalidate` it will ever need came before this (the destination may run its
    /// vCPUs once it has applied them). Destination → source: the marker was received (the
    /// source accepts `Done` only after it); also sent by a destination that switched over
    /// before, on a new connection.
    Switchover,
    /// Either way: are you there? The peer answers `Pong` with the same nonce.
    Ping {
        /// Echoed in the `Pong`.
        nonce: u64,
    },
    /// Answer to `Ping`.
    Pong {
        /// The `Ping`'s nonce.
        nonce: u64,
    },
    /// Either way: the sender gives up on something; the text is for logs.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// A sentence, at most [`MAX_ERROR_TEXT`] bytes of UTF-8.
        text: String,
    },
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct CountHead {
    count: U32,
    reserved: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RunHead {
    first: U64,
    count: U32,
    reserved: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ResumeHead {
    total_pages: U64,
    first: U64,
    run_count: U32,
    reserved: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RangeWire {
    first: U64,
    count: U64,
}

const PAGE: usize = PAGE_SIZE as usize;

impl Message {
    /// The message's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Request { .. } => Kind::Request,
            Message::Pages { .. } => Kind::Pages,
            Message::Zeros { .. } => Kind::Zeros,
            Message::Missing { .. } => Kind::Missing,
            Message::Resume { .. } => Kind::Resume,
            Message::Hint { .. } => Kind::Hint,
            Message::Invalidate { .. } => Kind::Invalidate,
            Message::SentAll => Kind::SentAll,
            Message::Done => Kind::Done,
            Message::DoneAck => Kind::DoneAck,
            Message::Switchover => Kind::Switchover,
            Message::Ping { .. } => Kind::Ping,
            Message::Pong { .. } => Kind::Pong,
            Message::Error { .. } => Kind::Error,
        }
    }

    /// Appends the payload. Returns `false` (with `out` unchanged) when the message breaks a
    /// limit of the protocol and so would be refused by the peer: an empty or oversized batch,
    /// page data not a whole number of pages, a range that overflows, an error text too long,
    /// a `Resume` bitmap past `total_pages`, or a payload over [`MAX_PAYLOAD`].
    pub fn encode(&self, out: &mut Vec<u8>) -> bool {
        let start = out.len();
        let ok = self.encode_inner(out) && out.len() - start <= MAX_PAYLOAD;
        if !ok {
            out.truncate(start);
        }
        ok
    }

    fn encode_inner(&self, out: &mut Vec<u8>) -> bool {
        let count_head = |n: usize| CountHead {
            count: (n as u32).into(),
            reserved: 0.into(),
        };
        match self {
            Message::Request { pages } => {
                if pages.is_empty() || pages.len() > MAX_REQUEST_PAGES {
                    return false;
                }
                out.extend_from_slice(count_head(pages.len()).as_bytes());
                for &p in pages {
                    out.extend_from_slice(&p.to_le_bytes());
                }
            }
            Message::Pages { first, data } => {
                let Some(count) = pages_header(*first, data.len()) else {
                    return false;
                };
                out.extend_from_slice(run_head(*first, count).as_bytes());
                out.extend_from_slice(data);
            }
            Message::Zeros { first, count } => {
                if *count == 0 || first.checked_add(u64::from(*count) - 1).is_none() {
                    return false;
                }
                out.extend_from_slice(run_head(*first, *count).as_bytes());
            }
            Message::Missing { page, reason } => {
                out.extend_from_slice(run_head(*page, *reason as u32).as_bytes());
            }
            Message::Resume {
                total_pages,
                first,
                received,
            } => {
                let fits =
                    matches!(first.checked_add(received.len()), Some(end) if end <= *total_pages);
                if !fits || received.run_count() > u32::MAX as usize {
                    return false;
                }
                let head = ResumeHead {
                    total_pages: (*total_pages).into(),
                    first: (*first).into(),
                    run_count: (received.run_count() as u32).into(),
                    reserved: 0.into(),
                };
                out.extend_from_slice(head.as_bytes());
                received.encode(out);
            }
            Message::Hint { page } => out.extend_from_slice(&page.to_le_bytes()),
            Message::Invalidate { ranges } => {
                if ranges.is_empty() || ranges.len() > MAX_INVALIDATE_RANGES {
                    return false;
                }
                out.extend_from_slice(count_head(ranges.len()).as_bytes());
                for r in ranges {
                    if r.count == 0 || r.first.checked_add(r.count - 1).is_none() {
                        return false;
                    }
                    let w = RangeWire {
                        first: r.first.into(),
                        count: r.count.into(),
                    };
                    out.extend_from_slice(w.as_bytes());
                }
            }
            Message::SentAll | Message::Done | Message::DoneAck | Message::Switchover => {}
            Message::Ping { nonce } | Message::Pong { nonce } => {
                out.extend_from_slice(&nonce.to_le_bytes())
            }
            Message::Error { code, text } => {
                if text.len() > MAX_ERROR_TEXT {
                    return false;
                }
                out.extend_from_slice(&(*code as u32).to_le_bytes());
                out.extend_from_slice(&(text.len() as u32).to_le_bytes());
                out.extend_from_slice(text.as_bytes());
            }
        }
        true
    }

    /// Decodes the payload of a message of wire kind `kind`.
    pub fn decode(kind: u16, p: &[u8]) -> Result<Message, DecodeError> {
        let k = Kind::from_u16(kind).ok_or(DecodeError::UnknownKind(kind))?;
        let len_err = || DecodeError::Length {
            kind: k,
            len: p.len(),
        };
        Ok(match k {
            Kind::Request => {
                let (head, rest) = CountHead::read_from_prefix(p).map_err(|_| len_err())?;
                reserved(k, head.reserved.get())?;
                let n = counted(k, head.count.get().into(), MAX_REQUEST_PAGES)?;
                if rest.len() != n * 8 {
                    return Err(len_err());
                }
                let pages = rest
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                    .collect();
                Message::Request { pages }
            }
            Kind::Pages => {
                let (head, data) = RunHead::read_from_prefix(p).map_err(|_| len_err())?;
                reserved(k, head.reserved.get())?;
                let n = counted(k, head.count.get().into(), MAX_PAGES_PER_FRAME)?;
                if data.len() != n * PAGE {
                    return Err(len_err());
                }
                let first = head.first.get();
                first
                    .checked_add(n as u64 - 1)
                    .ok_or(DecodeError::Overflow(k))?;
                Message::Pages {
                    first,
                    data: data.to_vec(),
                }
            }
            Kind::Zeros => {
                let head = exact::<RunHead>(k, p)?;
                reserved(k, head.reserved.get())?;
                let count = head.count.get();
                counted(k, count.into(), u32::MAX as usize)?;
                let first = head.first.get();
                first
                    .checked_add(u64::from(count) - 1)
                    .ok_or(DecodeError::Overflow(k))?;
                Message::Zeros { first, count }
            }
            Kind::Missing => {
                let head = exact::<RunHead>(k, p)?;
                reserved(k, head.reserved.get())?;
                let code = head.count.get();
                let reason = MissingReason::from_u32(code)
                    .ok_or(DecodeError::UnknownCode { kind: k, code })?;
                Message::Missing {
                    page: head.first.get(),
                    reason,
                }
            }
            Kind::Resume => {
                let (head, rest) = ResumeHead::read_from_prefix(p).map_err(|_| len_err())?;
                reserved(k, head.reserved.get())?;
                let (total_pages, first) = (head.total_pages.get(), head.first.get());
                let limit = total_pages
                    .checked_sub(first)
                    .ok_or(DecodeError::Overflow(k))?;
                let runs = usize::try_from(head.run_count.get()).map_err(|_| len_err())?;
                let (received, used) =
                    RleBitmap::decode(rest, runs, limit).map_err(DecodeError::Bitmap)?;
                if used != rest.len() {
                    return Err(len_err());
                }
                Message::Resume {
                    total_pages,
                    first,
                    received,
                }
            }
            Kind::Hint => Message::Hint {
                page: exact::<U64>(k, p)?.get(),
            },
            Kind::Invalidate => {
                let (head, rest) = CountHead::read_from_prefix(p).map_err(|_| len_err())?;
                reserved(k, head.reserved.get())?;
                let n = counted(k, head.count.get().into(), MAX_INVALIDATE_RANGES)?;
                if rest.len() != n * 16 {
                    return Err(len_err());
                }
                let mut ranges = Vec::with_capacity(n);
                for c in rest.chunks_exact(16) {
                    let w = RangeWire::read_from_bytes(c).map_err(|_| len_err())?;
                    let (first, count) = (w.first.get(), w.count.get());
                    if count == 0 {
                        return Err(DecodeError::Count {
                            kind: k,
                            count: 0,
                            max: u64::MAX,
                        });
                    }
                    first
                        .checked_add(count - 1)
                        .ok_or(DecodeError::Overflow(k))?;
                    ranges.push(PageRange { first, count });
                }
                Message::Invalidate { ranges }
            }
            Kind::SentAll | Kind::Done | Kind::DoneAck | Kind::Switchover => {
                if !p.is_empty() {
                    return Err(len_err());
                }
                match k {
                    Kind::SentAll => Message::SentAll,
                    Kind::Done => Message::Done,
                    Kind::Switchover => Message::Switchover,
                    _ => Message::DoneAck,
                }
            }
            Kind::Ping => Message::Ping {
                nonce: exact::<U64>(k, p)?.get(),
            },
            Kind::Pong => Message::Pong {
                nonce: exact::<U64>(k, p)?.get(),
            },
            Kind::Error => {
                let (head, text) = CountHead::read_from_prefix(p).map_err(|_| len_err())?;
                let code = head.count.get();
                let code =
                    ErrorCode::from_u32(code).ok_or(DecodeError::UnknownCode { kind: k, code })?;
                let n = head.reserved.get() as usize;
                if n > MAX_ERROR_TEXT {
                    return Err(DecodeError::Count {
                        kind: k,
                        count: n as u64,
                        max: MAX_ERROR_TEXT as u64,
                    });
                }
                if text.len() != n {
                    return Err(len_err());
                }
                let text = std::str::from_utf8(text).map_err(|_| DecodeError::Text)?;
                Message::Error {
                    code,
                    text: text.to_owned(),
                }
            }
        })
    }
}

/// The `count` of a `Pages` frame with `len` bytes of data from `first`, if it is a valid one.
pub(crate) fn pages_header(first: u64, len: usize) -> Option<u32> {
    let count = len / PAGE;
    if !len.is_multiple_of(PAGE) || count == 0 || count > MAX_PAGES_PER_FRAME {
        return None;
    }
    first.checked_add(count as u64 - 1)?;
    Some(count as u32)
}

/// The 16-byte header of a `Pages` payload.
pub(crate) fn pages_head_bytes(first: u64, count: u32) -> [u8; 16] {
    let mut b = [0; 16];
    b.copy_from_slice(run_head(first, count).as_bytes());
    b
}

fn run_head(first: u64, count: u32) -> RunHead {
    RunHead {
        first: first.into(),
        count: count.into(),
        reserved: 0.into(),
    }
}

fn exact<T: FromBytes>(kind: Kind, p: &[u8]) -> Result<T, DecodeError> {
    T::read_from_bytes(p).map_err(|_| DecodeError::Length { kind, len: p.len() })
}

fn reserved(kind: Kind, v: u32) -> Result<(), DecodeError> {
    if v != 0 {
        return Err(DecodeError::Reserved(kind));
    }
    Ok(())
}

fn counted(kind: Kind, count: u64, max: usize) -> Result<usize, DecodeError> {
    match usize::try_from(count) {
        Ok(n) if n >= 1 && n <= max => Ok(n),
        _ => Err(DecodeError::Count {
            kind,
            count,
            max: max as u64,
        }),
    }
}
