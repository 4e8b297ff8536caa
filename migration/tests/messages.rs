//! Message encoding and decoding: examples, limits, and properties (round trip, no panics).

use proptest::prelude::*;
use vmpager_migration::frame::{open_frame, seal_message, Direction, MacState};
use vmpager_migration::message::Kind;
use vmpager_migration::{
    DecodeError, ErrorCode, Message, MissingReason, PageRange, RleBitmap, MAX_PAYLOAD,
};

fn round_trip(m: &Message) -> Message {
    let mut out = Vec::new();
    assert!(m.encode(&mut out), "{m:?} refused");
    assert!(out.len() <= MAX_PAYLOAD);
    Message::decode(m.kind() as u16, &out).unwrap()
}

#[test]
fn layouts_are_as_documented() {
    let mut out = Vec::new();
    assert!(Message::Zeros { first: 5, count: 3 }.encode(&mut out));
    assert_eq!(out, [5, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
    out.clear();
    assert!(Message::Request { pages: vec![1, 2] }.encode(&mut out));
    assert_eq!(out.len(), 8 + 16);
    assert_eq!(&out[..8], [2, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn limits_are_refused_both_ways() {
    let mut out = Vec::new();
    assert!(!Message::Request { pages: vec![] }.encode(&mut out));
    assert!(!Message::Request {
        pages: vec![0; 513]
    }
    .encode(&mut out));
    assert!(!Message::Pages {
        first: 0,
        data: vec![0; 100]
    }
    .encode(&mut out));
    assert!(!Message::Pages {
        first: 0,
        data: vec![0; 1025 * 4096]
    }
    .encode(&mut out));
    assert!(!Message::Pages {
        first: u64::MAX,
        data: vec![0; 8192]
    }
    .encode(&mut out));
    assert!(!Message::Zeros { first: 1, count: 0 }.encode(&mut out));
    assert!(out.is_empty());
    // A Pages header whose count disagrees with the data.
    let mut p = vec![0u8; 16 + 4096];
    p[8] = 2;
    assert!(matches!(
        Message::decode(Kind::Pages as u16, &p),
        Err(DecodeError::Length { .. })
    ));
    // Reserved field.
    p[8] = 1;
    p[12] = 1;
    assert_eq!(
        Message::decode(Kind::Pages as u16, &p),
        Err(DecodeError::Reserved(Kind::Pages))
    );
    assert_eq!(Message::decode(0, &[]), Err(DecodeError::UnknownKind(0)));
    assert_eq!(Message::decode(99, &[]), Err(DecodeError::UnknownKind(99)));
    assert!(Message::decode(Kind::Done as u16, &[0]).is_err());
}

#[test]
fn large_pages_round_trip() {
    let data: Vec<u8> = (0..1024 * 4096).map(|i| (i % 251) as u8).collect();
    let m = Message::Pages {
        first: 1 << 30,
        data,
    };
    assert_eq!(round_trip(&m), m);
}

#[test]
fn resume_past_total_pages_is_refused() {
    let received = RleBitmap::from_bits([true; 10]);
    let ok = Message::Resume {
        total_pages: 12,
        first: 2,
        received: received.clone(),
    };
    assert_eq!(round_trip(&ok), ok);
    let mut out = Vec::new();
    let past = Message::Resume {
        total_pages: 11,
        first: 2,
        received,
    };
    assert!(!past.encode(&mut out));
    // Forge it on the wire: the decoder refuses it too.
    assert!(ok.encode(&mut out));
    out[0] = 11;
    assert!(matches!(
        Message::decode(Kind::Resume as u16, &out),
        Err(DecodeError::Bitmap(_))
    ));
    // first beyond total.
    out[0] = 1;
    assert_eq!(
        Message::decode(Kind::Resume as u16, &out),
        Err(DecodeError::Overflow(Kind::Resume))
    );
}

fn bitmap() -> impl Strategy<Value = RleBitmap> {
    prop::collection::vec((any::<bool>(), 0u64..1 << 40), 0..40).prop_map(|runs| {
        let mut b = RleBitmap::new();
        for (set, n) in runs {
            b.push(set, n);
        }
        b
    })
}

fn message() -> impl Strategy<Value = Message> {
    let reason = prop_oneof![
        Just(MissingReason::OutOfRange),
        Just(MissingReason::ReadFailed),
        Just(MissingReason::Gone)
    ];
    let code = prop_oneof![
        Just(ErrorCode::BadMessage),
        Just(ErrorCode::BadState),
        Just(ErrorCode::UnknownMigration),
        Just(ErrorCode::ShuttingDown),
        Just(ErrorCode::Internal)
    ];
    prop_oneof![
        prop::collection::vec(any::<u64>(), 1..=512).prop_map(|pages| Message::Request { pages }),
        (0u64..1 << 50, 1usize..4, any::<u8>()).prop_map(|(first, n, b)| Message::Pages {
            first,
            data: vec![b; n * 4096]
        }),
        (0u64..1 << 50, 1u32..).prop_map(|(first, count)| Message::Zeros { first, count }),
        (any::<u64>(), reason).prop_map(|(page, reason)| Message::Missing { page, reason }),
        (bitmap(), 0u64..1 << 20, 0u64..1 << 20).prop_map(|(received, first, extra)| {
            Message::Resume {
                total_pages: first + received.len() + extra,
                first,
                received,
            }
        }),
        any::<u64>().prop_map(|page| Message::Hint { page }),
        prop::collection::vec((0u64..1 << 50, 1u64..1 << 12), 1..50).prop_map(|r| {
            Message::Invalidate {
                ranges: r
                    .into_iter()
                    .map(|(first, count)| PageRange { first, count })
                    .collect(),
            }
        }),
        Just(Message::SentAll),
        Just(Message::Done),
        Just(Message::DoneAck),
        any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Message::Pong { nonce }),
        (code, "[a-z é]{0,200}").prop_map(|(code, text)| Message::Error { code, text }),
    ]
}

proptest! {
    #[test]
    fn decode_inverts_encode(m in message()) {
        prop_assert_eq!(round_trip(&m), m);
    }

    #[test]
    fn frames_round_trip(ms in prop::collection::vec(message(), 1..8)) {
        let mut tx = MacState::new([9; 32], Direction::ServerToClient);
        let mut rx = MacState::new([9; 32], Direction::ServerToClient);
        let mut stream = Vec::new();
        for m in &ms {
            seal_message(&mut tx, m, &mut stream).unwrap();
        }
        let mut at = 0;
        for m in &ms {
            let (got, used) = open_frame(&mut rx, &stream[at..]).unwrap().unwrap();
            prop_assert_eq!(&got, m);
            at += used;
        }
        prop_assert_eq!(at, stream.len());
    }

    #[test]
    fn any_payload_decodes_or_errors(kind in 0u16..16, p in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(m) = Message::decode(kind, &p) {
            // What decodes re-encodes to exactly the same bytes.
            let mut out = Vec::new();
            prop_assert!(m.encode(&mut out));
            prop_assert_eq!(out, p);
        }
    }

    #[test]
    fn any_frame_bytes_error_cleanly(b in prop::collection::vec(any::<u8>(), 0..128)) {
        let mut rx = MacState::new([9; 32], Direction::ServerToClient);
        let _ = open_frame(&mut rx, &b);
    }

    #[test]
    fn bitmap_round_trips(b in bitmap(), bits in prop::collection::vec(any::<bool>(), 0..300)) {
        for b in [b, RleBitmap::from_bits(bits.iter().copied())] {
            let mut out = Vec::new();
            b.encode(&mut out);
            prop_assert_eq!(out.len(), b.encoded_len());
            let (d, used) = RleBitmap::decode(&out, b.run_count(), b.len()).unwrap();
            prop_assert_eq!(used, out.len());
            prop_assert_eq!(&d, &b);
            if !b.is_empty() {
                prop_assert!(RleBitmap::decode(&out, b.run_count(), b.len() - 1).is_err());
            }
        }
        let b = RleBitmap::from_bits(bits.iter().copied());
        for (i, &bit) in bits.iter().enumerate() {
            prop_assert_eq!(b.get(i as u64), bit);
        }
        prop_assert_eq!(b.count_set(), bits.iter().filter(|&&x| x).count() as u64);
    }

    #[test]
    fn any_bitmap_bytes_decode_or_error(b in prop::collection::vec(any::<u8>(), 0..64), runs in 0usize..80, limit: u64) {
        if let Ok((d, used)) = RleBitmap::decode(&b, runs, limit) {
            prop_assert!(d.len() <= limit);
            let mut out = Vec::new();
            d.encode(&mut out);
            prop_assert_eq!(&out[..], &b[..used]);
        }
    }
}
