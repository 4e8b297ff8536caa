//! cloud-hypervisor's live-migration wire format: the 16-byte `Request` and `Response`
//! headers, `MemoryRange`, the 2-byte `ConnectionRole`, and the blocking stream readers
//! (`read_request`, `read_range`, ...) over a byte stream that may end anywhere.
//!
//! Input: raw bytes. The first 16 (and 2) bytes are decoded as each fixed-size type; then the
//! whole input is read as a migration stream: requests, each followed by its payload (a
//! `PageFault`'s range read with `read_range`), until the stream ends or is refused.
//!
//! Properties: every accepted header encodes back to exactly its bytes; a refused request has
//! an unknown command or, not being `Start`, non-zero command headers; only `Start` has a
//! sender version; a stream that ends mid-header is `Closed` (peer gone), not bad input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{Cursor, Read};
use vmpager_compat::cloud_hypervisor::wire::{
    read_range, read_request, read_response, read_role, Command, ConnectionRole, MemoryRange,
    Request, Response, WireError, MEMORY_RANGE_LEN, REQUEST_LEN, RESPONSE_LEN, ROLE_LEN,
};

fn array<const N: usize>(data: &[u8]) -> Option<[u8; N]> {
    data.get(..N)?.try_into().ok()
}

fuzz_target!(|data: &[u8]| {
    if let Some(bytes) = array::<REQUEST_LEN>(data) {
        match Request::decode(&bytes) {
            Ok(r) => {
                assert_eq!(r.encode(), bytes);
                assert_eq!(r.sender_version().is_some(), r.command() == Command::Start);
            }
            Err(WireError::UnknownCommand(c)) => {
                assert_eq!(c, u16::from_le_bytes([bytes[0], bytes[1]]));
                assert!(Command::from_u16(c).is_err());
            }
            Err(WireError::NonZeroHeaders(c)) => {
                assert_ne!(c, Command::Start);
                assert_ne!(bytes[2..8], [0; 6]);
            }
            Err(e) => panic!("unexpected request error {e:?}"),
        }
    }
    if let Some(bytes) = array::<RESPONSE_LEN>(data) {
        if let Ok(r) = Response::decode(&bytes) {
            assert_eq!(r.encode(), bytes);
        }
    }
    if let Some(bytes) = array::<MEMORY_RANGE_LEN>(data) {
        let range = MemoryRange::decode(&bytes);
        assert_eq!(range.encode(), bytes);
        assert_eq!(range.end(), range.gpa.checked_add(range.length));
    }
    if let Some(bytes) = array::<ROLE_LEN>(data) {
        if let Ok(role) = ConnectionRole::decode(&bytes) {
            assert_eq!(role.encode(), bytes);
        }
    }

    // The same bytes as a stream, as a receiver reads them.
    let mut stream = Cursor::new(data);
    let at_end = |s: &Cursor<&[u8]>, need: usize| data.len() - (s.position() as usize) < need;
    if let Some(&first) = data.first() {
        // A connection opening with a role instead of a request.
        if first & 1 == 1 {
            let short = at_end(&stream, ROLE_LEN);
            match read_role(&mut stream) {
                Err(e) if short => assert!(matches!(e, WireError::Closed) && e.peer_gone()),
                Err(e) => assert!(e.is_bad_input()),
                Ok(_) => {}
            }
        }
    }
    loop {
        let short = at_end(&stream, REQUEST_LEN);
        let request = match read_request(&mut stream) {
            Ok(r) => r,
            Err(e) => {
                if short {
                    assert!(matches!(e, WireError::Closed) && e.peer_gone(), "{e:?}");
                } else {
                    assert!(e.is_bad_input() && !e.peer_gone(), "{e:?}");
                }
                break;
            }
        };
        if request.command() == Command::PageFault && request.length() == MEMORY_RANGE_LEN as u64 {
            let short = at_end(&stream, MEMORY_RANGE_LEN);
            match read_range(&mut stream) {
                Ok(_) => assert!(!short),
                Err(e) => {
                    assert!(short && matches!(e, WireError::Closed));
                    break;
                }
            }
            continue;
        }
        // Skip the payload, as far as there is one; a response may follow a short one.
        let left = data.len() as u64 - stream.position();
        let skip = request.length().min(left);
        let mut sink = Vec::new();
        let _ = (&mut stream).take(skip).read_to_end(&mut sink);
        if request.length() > left {
            break;
        }
        if request.command() == Command::Start {
            let short = at_end(&stream, RESPONSE_LEN);
            if let Err(e) = read_response(&mut stream) {
                assert!(!short || matches!(e, WireError::Closed));
                break;
            }
        }
    }
});
