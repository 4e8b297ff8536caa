//! The `Error` reply: a typed code and a sentence.

use super::{DecodeError, Kind};
use crate::MAX_ERROR_TEXT;
use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Typed error codes of the `Error` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// The message could not be decoded.
    BadMessage = 1,
    /// The peer's protocol version is not supported.
    UnsupportedVersion = 2,
    /// The message is not allowed in the connection's current state.
    BadState = 3,
    /// The region list was refused.
    InvalidRegions = 4,
    /// No VM with that id on this connection.
    UnknownVm = 5,
    /// A limit (VMs, memory, ...) was reached.
    LimitExceeded = 6,
    /// The page source cannot be used.
    BadSource = 7,
    /// The request needs a feature that was not negotiated or that this host lacks.
    Unsupported = 8,
    /// The daemon failed (out of memory, kernel error); the request may be retried.
    Internal = 9,
    /// The peer may not use this daemon (its uid is not allowed); sent once, with request id 0,
    /// before the daemon closes the connection.
    PermissionDenied = 10,
}

impl ErrorCode {
    /// Decodes a wire value; unknown values are a decode error.
    pub fn from_wire(v: u32) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match v {
            1 => BadMessage,
            2 => UnsupportedVersion,
            3 => BadState,
            4 => InvalidRegions,
            5 => UnknownVm,
            6 => LimitExceeded,
            7 => BadSource,
            8 => Unsupported,
            9 => Internal,
            10 => PermissionDenied,
            _ => return None,
        })
    }
}

/// `Error`: a typed code and a human-readable sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorReply {
    /// What went wrong.
    pub code: ErrorCode,
    /// Why, in words (at most [`MAX_ERROR_TEXT`] bytes of UTF-8).
    pub text: String,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ErrorWire {
    code: U32,
    text_len: U32,
}

impl ErrorReply {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        let text = truncate_utf8(&self.text, MAX_ERROR_TEXT);
        out.extend_from_slice(
            ErrorWire {
                code: (self.code as u32).into(),
                text_len: (text.len() as u32).into(),
            }
            .as_bytes(),
        );
        out.extend_from_slice(text.as_bytes());
    }

    pub(super) fn decode(p: &[u8]) -> Result<ErrorReply, DecodeError> {
        let (w, rest): (ErrorWire, _) = super::prefix(Kind::Error, p)?;
        let code = ErrorCode::from_wire(w.code.get()).ok_or(DecodeError::BadValue {
            field: "error code",
            value: w.code.get().into(),
        })?;
        let len = w.text_len.get() as usize;
        if len > MAX_ERROR_TEXT {
            return Err(DecodeError::Limit {
                field: "text_len",
                value: len as u64,
            });
        }
        if rest.len() != len {
            return Err(DecodeError::Malformed {
                kind: Kind::Error,
                len: p.len(),
            });
        }
        let text = core::str::from_utf8(rest)
            .map_err(|_| DecodeError::BadText)?
            .to_owned();
        Ok(ErrorReply { code, text })
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
