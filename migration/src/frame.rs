//! Authenticated framing: the 8-byte frame header, the payload, and a 16-byte MAC.
//!
//! ```text
//! | kind: u16 | reserved: u16 = 0 | payload_len: u32 | payload | mac: [u8; 16] |
//! ```
//!
//! `mac` is the first 16 bytes of keyed BLAKE3 under the direction's session key (derived at
//! handshake, [`crate::auth`]) over `direction (1 byte) ‖ sequence (u64 LE) ‖ header ‖
//! payload`. The sequence number is not sent: each side counts the frames it sends and
//! receives from 0, so a replayed, reordered, dropped or reflected frame fails the MAC.

use crate::message::{DecodeError, Message};
use crate::MAX_PAYLOAD;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of the frame header.
pub const FRAME_HEADER_LEN: usize = 8;
/// Size of the MAC that ends every frame.
pub const MAC_LEN: usize = 16;

/// Frame errors. A frame that fails here closes its connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header's reserved field is not zero.
    #[error("frame header has a non-zero reserved field")]
    Reserved,
    /// The header announces a payload above [`MAX_PAYLOAD`].
    #[error("frame payload of {0} bytes exceeds the limit")]
    TooLarge(u32),
    /// The MAC does not verify: the frame was altered, replayed, reordered, or is not from
    /// the peer that completed the handshake.
    #[error("frame {seq} failed authentication")]
    BadMac {
        /// The receive sequence number the frame was checked against.
        seq: u64,
    },
    /// The MAC verified but the payload does not decode.
    #[error("malformed message in frame")]
    Decode(#[source] DecodeError),
    /// The message to send breaks a limit of the protocol (a caller bug, not a peer's).
    #[error("{0:?} message breaks a protocol limit and was not sent")]
    Unencodable(crate::message::Kind),
    /// The sequence number would wrap (2^64 frames on one connection).
    #[error("sequence numbers exhausted")]
    SequenceExhausted,
}

impl FrameError {
    /// The peer sent bytes that do not verify or decode.
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            FrameError::Unencodable(_) | FrameError::SequenceExhausted
        )
    }
}

/// The frame header on the wire.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct FrameHeader {
    /// Message kind ([`crate::message::Kind`]); 0 is invalid.
    pub kind: U16,
    /// Must be 0.
    pub reserved: U16,
    /// Payload length in bytes, at most [`MAX_PAYLOAD`].
    pub payload_len: U32,
}

const _: () = assert!(core::mem::size_of::<FrameHeader>() == FRAME_HEADER_LEN);

impl FrameHeader {
    /// A header for `kind` and a payload of `len` bytes.
    pub fn new(kind: u16, len: usize) -> FrameHeader {
        FrameHeader {
            kind: kind.into(),
            reserved: 0.into(),
            payload_len: (len as u32).into(),
        }
    }

    /// Parses and checks a header; returns it and the payload length.
    pub fn parse(bytes: &[u8; FRAME_HEADER_LEN]) -> Result<(FrameHeader, usize), FrameError> {
        let h = FrameHeader::read_from_bytes(bytes).map_err(|_| FrameError::Reserved)?;
        if h.reserved.get() != 0 {
            return Err(FrameError::Reserved);
        }
        let len = h.payload_len.get();
        if len as usize > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        Ok((h, len as usize))
    }
}

/// Which way a frame travels; part of the MAC input (the session keys differ too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Direction {
    /// From the side that connected (the destination) to the side that accepted.
    ClientToServer = 1,
    /// From the side that accepted (the source) to the side that connected.
    ServerToClient = 2,
}

/// One direction's MAC state: the session key and the next sequence number.
pub struct MacState {
    key: [u8; 32],
    direction: Direction,
    seq: u64,
}

impl std::fmt::Debug for MacState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MacState")
            .field("direction", &self.direction)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl MacState {
    /// The state of a fresh connection (sequence 0) for this key and direction.
    pub fn new(key: [u8; 32], direction: Direction) -> MacState {
        MacState {
            key,
            direction,
            seq: 0,
        }
    }

    /// The sequence number of the next frame.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn compute(&self, header: &[u8; FRAME_HEADER_LEN], parts: &[&[u8]]) -> [u8; MAC_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&[self.direction as u8]);
        h.update(&self.seq.to_le_bytes());
        h.update(header);
        for p in parts {
            h.update(p);
        }
        let mut mac = [0; MAC_LEN];
        mac.copy_from_slice(&h.finalize().as_bytes()[..MAC_LEN]);
        mac
    }

    /// The MAC of the next frame sent (its payload given in pieces), advancing the sequence.
    pub fn seal(
        &mut self,
        header: &[u8; FRAME_HEADER_LEN],
        parts: &[&[u8]],
    ) -> Result<[u8; MAC_LEN], FrameError> {
        let next = self
            .seq
            .checked_add(1)
            .ok_or(FrameError::SequenceExhausted)?;
        let mac = self.compute(header, parts);
        self.seq = next;
        Ok(mac)
    }

    /// Verifies the MAC of the next frame received, advancing the sequence if it verifies.
    pub fn open(
        &mut self,
        header: &[u8; FRAME_HEADER_LEN],
        payload: &[u8],
        mac: &[u8],
    ) -> Result<(), FrameError> {
        let next = self
            .seq
            .checked_add(1)
            .ok_or(FrameError::SequenceExhausted)?;
        let expected = self.compute(header, &[payload]);
        if mac.len() != MAC_LEN || !constant_time_eq(&expected, mac) {
            return Err(FrameError::BadMac { seq: self.seq });
        }
        self.seq = next;
        Ok(())
    }
}

/// Compares without an early exit, so the time taken does not tell how many bytes matched.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Encodes `msg` as one complete frame (header, payload, MAC) appended to `out`.
pub fn seal_message(
    mac: &mut MacState,
    msg: &Message,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    if !msg.encode(out) {
        out.truncate(start);
        return Err(FrameError::Unencodable(msg.kind()));
    }
    let len = out.len() - start - FRAME_HEADER_LEN;
    let mut header = [0; FRAME_HEADER_LEN];
    header.copy_from_slice(FrameHeader::new(msg.kind() as u16, len).as_bytes());
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&header);
    let tag = match mac.seal(&header, &[&out[start + FRAME_HEADER_LEN..]]) {
        Ok(t) => t,
        Err(e) => {
            out.truncate(start);
            return Err(e);
        }
    };
    out.extend_from_slice(&tag);
    Ok(())
}

/// Verifies and decodes the frame at the start of `buf`. `Ok(None)` means `buf` holds only
/// part of a frame; `Ok(Some((message, used)))` consumed `used` bytes. The MAC is checked
/// before the payload is decoded, so nothing from an unauthenticated frame is interpreted
/// beyond its header.
pub fn open_frame(mac: &mut MacState, buf: &[u8]) -> Result<Option<(Message, usize)>, FrameError> {
    let Some(head) = buf.first_chunk::<FRAME_HEADER_LEN>() else {
        return Ok(None);
    };
    let (h, len) = FrameHeader::parse(head)?;
    let total = FRAME_HEADER_LEN + len + MAC_LEN;
    let Some(frame) = buf.get(..total) else {
        return Ok(None);
    };
    let payload = &frame[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
    mac.open(head, payload, &frame[FRAME_HEADER_LEN + len..])?;
    let msg = Message::decode(h.kind.get(), payload).map_err(FrameError::Decode)?;
    Ok(Some((msg, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (MacState, MacState) {
        let k = [7; 32];
        (
            MacState::new(k, Direction::ClientToServer),
            MacState::new(k, Direction::ClientToServer),
        )
    }

    #[test]
    fn frames_verify_in_order_only() {
        let (mut tx, mut rx) = pair();
        let mut a = Vec::new();
        let mut b = Vec::new();
        seal_message(&mut tx, &Message::Ping { nonce: 1 }, &mut a).unwrap();
        seal_message(&mut tx, &Message::Ping { nonce: 2 }, &mut b).unwrap();
        // Out of order: b checked as frame 0 fails.
        assert_eq!(open_frame(&mut rx, &b), Err(FrameError::BadMac { seq: 0 }));
        let (m, used) = open_frame(&mut rx, &a).unwrap().unwrap();
        assert_eq!((m, used), (Message::Ping { nonce: 1 }, a.len()));
        // Replay of a as frame 1 fails.
        assert_eq!(open_frame(&mut rx, &a), Err(FrameError::BadMac { seq: 1 }));
        assert!(open_frame(&mut rx, &b).unwrap().is_some());
    }

    #[test]
    fn every_flipped_bit_fails() {
        let mut a = Vec::new();
        let (mut tx, _) = pair();
        seal_message(&mut tx, &Message::Hint { page: 99 }, &mut a).unwrap();
        for i in 0..a.len() * 8 {
            let mut c = a.clone();
            c[i / 8] ^= 1 << (i % 8);
            let (_, mut rx) = pair();
            assert!(!matches!(open_frame(&mut rx, &c), Ok(Some(_))), "bit {i}");
        }
    }

    #[test]
    fn other_direction_fails() {
        let k = [7; 32];
        let mut tx = MacState::new(k, Direction::ClientToServer);
        let mut rx = MacState::new(k, Direction::ServerToClient);
        let mut a = Vec::new();
        seal_message(&mut tx, &Message::Done, &mut a).unwrap();
        assert!(matches!(
            open_frame(&mut rx, &a),
            Err(FrameError::BadMac { .. })
        ));
    }

    #[test]
    fn partial_and_oversized() {
        let (mut tx, mut rx) = pair();
        let mut a = Vec::new();
        seal_message(&mut tx, &Message::SentAll, &mut a).unwrap();
        for n in 0..a.len() {
            assert_eq!(open_frame(&mut rx, &a[..n]), Ok(None));
        }
        let big = FrameHeader::new(2, MAX_PAYLOAD + 1);
        assert_eq!(
            open_frame(&mut rx, big.as_bytes()),
            Err(FrameError::TooLarge(MAX_PAYLOAD as u32 + 1))
        );
    }
}
