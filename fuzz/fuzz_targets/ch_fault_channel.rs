//! The daemon's side of cloud-hypervisor's fault connection (`AttachChannel`): the byte stream
//! framed into requests by `frame` over what the connection holds (the daemon peeks, and
//! consumes a request once answered), as it arrives in pieces of any size, then each
//! `PageFault` range located in the VM's regions by `locate_page`.
//!
//! Input: a control byte, then by its bit 0 either raw bytes (a byte of read sizes count, the
//! read sizes, then the stream as cloud-hypervisor sends it; seeds are real requests) against
//! a VM of a 4 KiB-page and a 2 MiB-page region, or structured input (`arbitrary`): the
//! stream's pieces, the read sizes, and regions built to be valid often.
//!
//! Properties: the requests seen do not depend on how the stream is cut (they equal a
//! reference parse of the whole stream), nothing is read past the request that ends the
//! session, and a page is located only when the range is exactly one aligned page of the
//! region returned; "outside" only when no region holds the GPA.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use vmpager_compat::cloud_hypervisor::wire::{
    Command, MemoryRange, Request, MEMORY_RANGE_LEN, REQUEST_LEN,
};
use vmpager_fuzz::{build_regions, regions_are_valid, ArbRegion, Num};
use vmpager_protocol::RegionSpec;
use vmpagerd::ch_faults::{frame, locate_page, Framed, Refused};

#[derive(Arbitrary, Debug)]
enum Piece {
    /// A well-formed `PageFault` for this range.
    PageFault(Num, Num),
    /// Any 16-byte header (a `PageFault` of the right length only by chance).
    Header([u8; 16]),
    /// Raw bytes.
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    stream: Vec<Piece>,
    reads: Vec<u8>,
    regions: Vec<ArbRegion>,
    packed: bool,
}

/// The whole stream parsed at once: the frames, and whether a partial request is left.
fn reference(bytes: &[u8]) -> (Vec<Framed>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let Some(h) = bytes.get(at..at + REQUEST_LEN) else {
            return (out, bytes.len() - at);
        };
        let header = Request::decode(h.try_into().unwrap_or(&[0; REQUEST_LEN])).ok();
        let page_fault = header.is_some_and(|r| {
            r.command() == Command::PageFault && r.length() == MEMORY_RANGE_LEN as u64
        });
        if !page_fault {
            out.push(Framed::Other(header));
            return (out, 0);
        }
        let Some(r) = bytes.get(at + REQUEST_LEN..at + REQUEST_LEN + MEMORY_RANGE_LEN) else {
            return (out, bytes.len() - at);
        };
        out.push(Framed::PageFault(MemoryRange::decode(
            r.try_into().unwrap_or(&[0; MEMORY_RANGE_LEN]),
        )));
        at += REQUEST_LEN + MEMORY_RANGE_LEN;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    if control & 1 == 0 {
        let n = rest.first().map_or(0, |&n| usize::from(n));
        let reads = rest.get(1..1 + n).unwrap_or_default();
        let stream = rest.get(1 + n..).unwrap_or_default();
        let regions = [
            RegionSpec::new(0, 1 << 20, 0),
            RegionSpec::new(1 << 32, 8 << 20, 1 << 20).huge_2m(),
        ];
        check(stream, reads, &regions);
        return;
    }
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(rest)) else {
        return;
    };
    let mut bytes = Vec::new();
    for p in &input.stream {
        match p {
            Piece::PageFault(gpa, len) => {
                bytes.extend_from_slice(&Request::page_fault().encode());
                let range = MemoryRange {
                    gpa: gpa.get(),
                    length: len.get(),
                };
                bytes.extend_from_slice(&range.encode());
            }
            Piece::Header(h) => bytes.extend_from_slice(h),
            Piece::Raw(b) => bytes.extend_from_slice(b),
        }
    }
    let regions = build_regions(&input.regions, input.packed);
    check(&bytes, &input.reads, &regions);
});

fn check(bytes: &[u8], reads: &[u8], regions: &[RegionSpec]) {
    let (expected, partial) = reference(bytes);

    // The connection's queue: bytes arrive in pieces; after each, the daemon peeks at most one
    // request's worth and consumes what it framed.
    let mut queued: Vec<u8> = Vec::new();
    let mut frames = Vec::new();
    let mut rest = bytes;
    let mut reads = reads.iter().cycle();
    'arrive: while !rest.is_empty() {
        let want = reads.next().map_or(usize::MAX, |&n| usize::from(n).max(1));
        let n = want.min(rest.len());
        queued.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            let head = &queued[..queued.len().min(REQUEST_LEN + MEMORY_RANGE_LEN)];
            let f = frame(head);
            assert!(f.len() <= head.len());
            match f {
                Framed::Partial => break,
                f => {
                    queued.drain(..f.len());
                    let end = matches!(f, Framed::Other(_));
                    frames.push(f);
                    if end {
                        break 'arrive;
                    }
                }
            }
        }
    }
    assert_eq!(frames, expected);
    if !matches!(frames.last(), Some(Framed::Other(_))) {
        assert_eq!(queued.len(), partial);
    }

    if !regions_are_valid(regions) {
        return;
    }
    let spans = || regions.iter().map(|r| (r.gpa(), r.size(), r.page_size()));
    let holds = |gpa: u64, (start, size, _): (u64, u64, u64)| gpa >= start && gpa - start < size;
    for f in &frames {
        let Framed::PageFault(range) = *f else {
            continue;
        };
        match locate_page(spans(), range) {
            Ok((ri, page)) => {
                let r = &regions[ri];
                let ps = r.page_size();
                assert_eq!(range.length, ps);
                assert!((page as u64) < r.size() / ps);
                assert_eq!(range.gpa, r.gpa() + page as u64 * ps);
            }
            Err(Refused::Outside) => assert!(!spans().any(|s| holds(range.gpa, s))),
            Err(Refused::BadPage) => {
                let s = spans().find(|&s| holds(range.gpa, s));
                let (start, _, ps) = s.unwrap_or_else(|| panic!("{range:?} is in no region"));
                assert!(range.length != ps || !(range.gpa - start).is_multiple_of(ps));
            }
            Err(e) => panic!("unexpected refusal {e:?}"),
        }
    }
}
