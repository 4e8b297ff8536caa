//! The post-copy migration protocol's decoders (`migration/src/`): `Message::decode` of a
//! payload, `open_frame` of a frame stream (header, MAC, payload), and `RleBitmap::decode`.
//!
//! Input: a control byte, then by its value mod 4:
//! * 0 — a kind (2 bytes LE) and a payload: `Message::decode`.
//! * 1 — raw bytes read as a stream of frames under a fixed session key (only a forged MAC
//!   passes, so this checks the header bounds and that nothing is decoded before the MAC).
//! * 2 — a kind and a payload sealed into a frame with a valid MAC, then opened: the frame
//!   path must agree with `Message::decode`, so mutations reach every decoder behind the MAC.
//! * 3 — a run count (1 byte), a limit (8 bytes LE) and varint bytes: `RleBitmap::decode`.
//!
//! Properties: no panic; whatever decodes re-encodes to exactly its bytes (every field and
//! reserved field checked, one encoding per value); payloads within `MAX_PAYLOAD`; every count
//! within its limit; `Resume` bitmaps end at or before `total_pages`; a frame whose MAC does
//! not verify yields no message; a bitmap's length is within the limit and its set bits
//! agree with its runs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmpager_migration::frame::{
    open_frame, Direction, FrameError, FrameHeader, MacState, FRAME_HEADER_LEN, MAC_LEN,
};
use vmpager_migration::{
    Message, RleBitmap, MAX_ERROR_TEXT, MAX_INVALIDATE_RANGES, MAX_PAGES_PER_FRAME, MAX_PAYLOAD,
    MAX_REQUEST_PAGES, PAGE_SIZE,
};
use zerocopy::IntoBytes;

const KEY: [u8; 32] = [0x5a; 32];

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    match control % 4 {
        0 => {
            if let Some((kind, payload)) = split_kind(rest) {
                check_decode(kind, payload);
            }
        }
        1 => {
            let mut rx = MacState::new(KEY, Direction::ServerToClient);
            let mut at = 0;
            while let Ok(Some((m, used))) = open_frame(&mut rx, &rest[at..]) {
                assert!(used >= FRAME_HEADER_LEN + MAC_LEN && used <= rest.len() - at);
                check_message(&m);
                at += used;
            }
        }
        2 => {
            let Some((kind, payload)) = split_kind(rest) else {
                return;
            };
            if payload.len() > MAX_PAYLOAD {
                return;
            }
            let header = FrameHeader::new(kind, payload.len());
            let mut header_bytes = [0; FRAME_HEADER_LEN];
            header_bytes.copy_from_slice(header.as_bytes());
            let mut tx = MacState::new(KEY, Direction::ClientToServer);
            let tag = tx.seal(&header_bytes, &[payload]).unwrap();
            let mut frame = header_bytes.to_vec();
            frame.extend_from_slice(payload);
            frame.extend_from_slice(&tag);
            let mut rx = MacState::new(KEY, Direction::ClientToServer);
            let direct = Message::decode(kind, payload);
            match open_frame(&mut rx, &frame) {
                Ok(Some((m, used))) => {
                    assert_eq!(used, frame.len());
                    assert_eq!(Ok(&m), direct.as_ref());
                }
                Err(FrameError::Decode(e)) => assert_eq!(Err(e), direct),
                other => panic!("a sealed frame gave {other:?}"),
            }
            // The same frame checked as the next one (a replay) never verifies.
            assert!(matches!(
                open_frame(&mut rx, &frame),
                Err(FrameError::BadMac { .. })
            ));
            check_decode(kind, payload);
        }
        _ => {
            let (Some(&runs), Some(limit)) = (rest.first(), rest.get(1..9)) else {
                return;
            };
            let limit = u64::from_le_bytes(limit.try_into().unwrap_or_default());
            let bytes = &rest[9..];
            if let Ok((b, used)) = RleBitmap::decode(bytes, usize::from(runs), limit) {
                assert!(b.len() <= limit && used <= bytes.len());
                assert_eq!(b.run_count(), usize::from(runs));
                let mut out = Vec::new();
                b.encode(&mut out);
                assert_eq!(&out[..], &bytes[..used]);
                check_bitmap(&b);
            }
        }
    }
});

fn split_kind(b: &[u8]) -> Option<(u16, &[u8])> {
    let k = b.get(..2)?;
    Some((u16::from_le_bytes([k[0], k[1]]), &b[2..]))
}

fn check_decode(kind: u16, payload: &[u8]) {
    if let Ok(m) = Message::decode(kind, payload) {
        assert_eq!(m.kind() as u16, kind);
        let mut out = Vec::new();
        assert!(m.encode(&mut out), "{m:?} decoded but does not encode");
        assert_eq!(out, payload);
        check_message(&m);
    }
}

fn check_message(m: &Message) {
    let mut out = Vec::new();
    assert!(m.encode(&mut out));
    assert!(out.len() <= MAX_PAYLOAD);
    match m {
        Message::Request { pages } => assert!((1..=MAX_REQUEST_PAGES).contains(&pages.len())),
        Message::Pages { first, data } => {
            let n = data.len() / PAGE_SIZE as usize;
            assert_eq!(data.len() % PAGE_SIZE as usize, 0);
            assert!((1..=MAX_PAGES_PER_FRAME).contains(&n));
            assert!(first.checked_add(n as u64 - 1).is_some());
        }
        Message::Zeros { first, count } => {
            assert!(*count >= 1 && first.checked_add(u64::from(*count) - 1).is_some())
        }
        Message::Resume {
            total_pages,
            first,
            received,
        } => {
            assert!(first
                .checked_add(received.len())
                .is_some_and(|e| e <= *total_pages));
            check_bitmap(received);
        }
        Message::Invalidate { ranges } => {
            assert!((1..=MAX_INVALIDATE_RANGES).contains(&ranges.len()));
            for r in ranges {
                assert!(r.count >= 1 && r.first.checked_add(r.count - 1).is_some());
            }
        }
        Message::Error { text, .. } => assert!(text.len() <= MAX_ERROR_TEXT),
        _ => {}
    }
}

/// The runs tile `[0, len)` in order, alternating, and the set bits add up.
fn check_bitmap(b: &RleBitmap) {
    let mut at = 0u64;
    let mut set = 0u64;
    let mut last: Option<bool> = None;
    for (start, n, s) in b.runs() {
        assert_eq!(start, at);
        assert!(n > 0);
        assert_ne!(last, Some(s));
        last = Some(s);
        at += n;
        if s {
            set += n;
        }
    }
    assert_eq!(at, b.len());
    assert_eq!(set, b.count_set());
}
