//! Firecracker handshake: encoding, parsing, validation and the socket exchange.

use proptest::prelude::*;
use rustix::fs::{fstat, memfd_create, MemfdFlags};
use rustix::net::{
    socketpair, AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags,
    SocketType,
};
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};
use vmpager_compat::firecracker::*;

fn region(addr: u64, size: u64, offset: u64, page_size: u64) -> GuestRegionUffdMapping {
    GuestRegionUffdMapping {
        base_host_virt_addr: addr,
        size,
        offset,
        page_size,
        page_size_kib: Some(page_size),
    }
}

/// What Firecracker sends for a VM with RAM split around the 32-bit hole.
fn two_regions() -> Vec<GuestRegionUffdMapping> {
    vec![
        region(0x7f00_0000_0000, 0x40_0000, 0, PAGE_4K),
        region(0x7f10_0000_0000, 0x40_0000, 0x40_0000, PAGE_2M),
    ]
}

#[test]
fn encoding_matches_serde_json_and_firecracker_bytes() {
    let regions = two_regions();
    assert_eq!(
        encode_handshake(&regions),
        serde_json::to_vec(&regions).unwrap()
    );
    let one = [region(4096, 8192, 0, PAGE_4K)];
    assert_eq!(
        encode_handshake(&one),
        br#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096}]"#
    );
    let future = [GuestRegionUffdMapping {
        page_size_kib: None,
        ..one[0]
    }];
    assert_eq!(
        encode_handshake(&future),
        br#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096}]"#
    );
    assert_eq!(
        encode_handshake(&future),
        serde_json::to_vec(&future).unwrap()
    );
}

#[test]
fn parse_round_trips_and_ignores_unknown_fields() {
    let regions = two_regions();
    assert_eq!(
        parse_handshake(&encode_handshake(&regions)).unwrap(),
        regions
    );

    let text = br#" [ {"base_host_virt_addr": 4096, "size": 4096, "offset": 0,
        "page_size": 4096, "is_guest_memfd": false, "extra": {"nested": [1, 2]}} ]
    "#;
    let parsed = parse_handshake(text).unwrap();
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].page_size_kib, None);
    assert_eq!(parsed[0].base_host_virt_addr, 4096);
}

#[test]
fn every_strict_prefix_is_incomplete() {
    let bytes = encode_handshake(&two_regions());
    for len in 0..bytes.len() {
        assert!(
            matches!(
                parse_handshake(&bytes[..len]),
                Err(HandshakeError::Incomplete)
            ),
            "prefix of {len} bytes"
        );
    }
    assert!(matches!(
        parse_handshake(b"  \n"),
        Err(HandshakeError::Incomplete)
    ));
}

#[test]
fn malformed_json_is_refused() {
    let valid = encode_handshake(&two_regions());
    let mut trailing = valid.clone();
    trailing.extend_from_slice(b" x");
    let mut two_values = valid.clone();
    two_values.extend_from_slice(&valid);
    let mut whitespace = valid.clone();
    whitespace.extend_from_slice(b" \r\n\t");
    assert!(parse_handshake(&whitespace).is_ok());

    let cases: [&[u8]; 8] = [
        &trailing,
        &two_values,
        b"[1, 2]",
        br#"{"base_host_virt_addr": 1}"#,
        br#"[{"base_host_virt_addr": 4096, "size": 4096, "offset": 0}]"#,
        br#"[{"base_host_virt_addr": -1, "size": 4096, "offset": 0, "page_size": 4096}]"#,
        br#"[{"base_host_virt_addr": "4096", "size": 4096, "offset": 0, "page_size": 4096}]"#,
        b"]",
    ];
    for case in cases {
        let err = parse_handshake(case).unwrap_err();
        assert!(
            matches!(err, HandshakeError::Json(_)),
            "{:?}: {err:?}",
            String::from_utf8_lossy(case)
        );
        assert!(err.is_bad_input());
        assert!(err.to_string().starts_with("malformed handshake JSON: "));
    }
}

#[test]
fn counts_and_size_are_bounded() {
    assert!(matches!(
        parse_handshake(b"[]"),
        Err(HandshakeError::NoRegions)
    ));
    let many: Vec<_> = (0..MAX_REGIONS as u64 + 1)
        .map(|i| region((i + 1) << 30, 4096, i * 4096, PAGE_4K))
        .collect();
    assert!(matches!(
        parse_handshake(&encode_handshake(&many)),
        Err(HandshakeError::TooManyRegions(65))
    ));
    assert_eq!(
        parse_handshake(&encode_handshake(&many[..MAX_REGIONS]))
            .unwrap()
            .len(),
        MAX_REGIONS
    );
    let mut padded = encode_handshake(&two_regions());
    padded.resize(MAX_HANDSHAKE_BYTES, b' ');
    assert!(parse_handshake(&padded).is_ok());
    padded.push(b' ');
    assert!(matches!(
        parse_handshake(&padded),
        Err(HandshakeError::TooLarge)
    ));
}

#[test]
fn validate_accepts_good_regions() {
    let regions = two_regions();
    let valid = validate(&regions, 0x80_0000).unwrap();
    assert_eq!(
        valid,
        vec![
            ValidRegion {
                host_addr: 0x7f00_0000_0000,
                size: 0x40_0000,
                file_offset: 0,
                page_size: PAGE_4K
            },
            ValidRegion {
                host_addr: 0x7f10_0000_0000,
                size: 0x40_0000,
                file_offset: 0x40_0000,
                page_size: PAGE_2M
            },
        ]
    );
    // A file longer than needed is fine, and page_size_kib may be absent.
    let mut no_kib = regions.clone();
    no_kib[1].page_size_kib = None;
    assert!(validate(&no_kib, u64::MAX).is_ok());
}

fn refusal(regions: &[GuestRegionUffdMapping], file_len: u64) -> HandshakeError {
    let err = validate(regions, file_len).unwrap_err();
    assert!(err.is_bad_input(), "{err:?}");
    assert!(!err.peer_gone() && !err.is_timeout());
    err
}

#[test]
fn validate_refuses_each_problem() {
    let good = two_regions();
    let len = 0x80_0000;
    let with = |i: usize, f: &dyn Fn(&mut GuestRegionUffdMapping)| {
        let mut r = good.clone();
        f(&mut r[i]);
        r
    };

    let e = refusal(
        &with(1, &|r| {
            r.page_size = 8192;
            r.page_size_kib = None;
        }),
        len,
    );
    assert!(matches!(
        e,
        HandshakeError::BadPageSize {
            index: 1,
            page_size: 8192
        }
    ));
    let e = refusal(&with(0, &|r| r.page_size_kib = Some(4)), len);
    assert!(matches!(
        e,
        HandshakeError::PageSizeMismatch {
            index: 0,
            page_size: 4096,
            page_size_kib: 4
        }
    ));
    let e = refusal(&with(0, &|r| r.size = 0), len);
    assert!(matches!(e, HandshakeError::EmptyRegion { index: 0 }));
    let e = refusal(&with(0, &|r| r.base_host_virt_addr = 0), len);
    assert!(matches!(e, HandshakeError::NullAddress { index: 0 }));
    let e = refusal(&with(1, &|r| r.base_host_virt_addr += 4096), len);
    assert!(matches!(
        e,
        HandshakeError::Unaligned {
            index: 1,
            field: "base_host_virt_addr",
            page_size: PAGE_2M,
            ..
        }
    ));
    let e = refusal(&with(0, &|r| r.size += 1), len);
    assert!(matches!(
        e,
        HandshakeError::Unaligned {
            index: 0,
            field: "size",
            ..
        }
    ));
    let e = refusal(&with(1, &|r| r.offset += 4096), len);
    assert!(matches!(
        e,
        HandshakeError::Unaligned {
            index: 1,
            field: "offset",
            value: 0x40_1000,
            ..
        }
    ));
    let e = refusal(
        &with(0, &|r| r.base_host_virt_addr = u64::MAX - 4095),
        u64::MAX,
    );
    assert!(matches!(
        e,
        HandshakeError::AddressOverflow { index: 0, .. }
    ));
    let e = refusal(&with(0, &|r| r.offset = u64::MAX - 4095), u64::MAX);
    assert!(matches!(
        e,
        HandshakeError::FileRangeOverflow { index: 0, .. }
    ));

    let e = refusal(&good, len - 4096);
    assert!(matches!(e, HandshakeError::OutsideFile { index: 1, .. }));
    assert_eq!(
        e.to_string(),
        "region 1 (file bytes 4194304..8388608) lies outside the memory file of 8384512 bytes"
    );

    let e = refusal(&with(1, &|r| r.base_host_virt_addr = 0x7f00_0020_0000), len);
    assert!(matches!(
        e,
        HandshakeError::HostOverlap {
            first: 0,
            second: 1,
            ..
        }
    ));
    assert!(e.to_string().contains("overlap in host address space"));
    let e = refusal(&with(1, &|r| r.offset = 0x20_0000), len);
    assert!(matches!(
        e,
        HandshakeError::FileOverlap {
            first: 0,
            second: 1,
            ..
        }
    ));

    assert!(matches!(refusal(&[], len), HandshakeError::NoRegions));
    let many = vec![good[0]; MAX_REGIONS + 1];
    assert!(matches!(
        refusal(&many, len),
        HandshakeError::TooManyRegions(65)
    ));
}

fn pair(nonblocking: bool) -> (OwnedFd, OwnedFd) {
    let mut flags = SocketFlags::CLOEXEC;
    if nonblocking {
        flags |= SocketFlags::NONBLOCK;
    }
    socketpair(AddressFamily::UNIX, SocketType::STREAM, flags, None).unwrap()
}

fn memfd() -> OwnedFd {
    memfd_create("vmpager-compat-test", MemfdFlags::CLOEXEC).unwrap()
}

fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    let (a, b) = (fstat(a).unwrap(), fstat(b).unwrap());
    a.st_ino == b.st_ino && a.st_dev == b.st_dev
}

fn send_raw(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    let n = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .unwrap();
    assert_eq!(n, bytes.len());
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

#[test]
fn handshake_over_a_socket() {
    for nonblocking in [false, true] {
        let (fc, handler) = pair(nonblocking);
        let uffd = memfd();
        send_handshake(fc.as_fd(), &two_regions(), uffd.as_fd()).unwrap();
        let got = recv_handshake(handler.as_fd(), soon()).unwrap();
        assert_eq!(got.regions, two_regions());
        assert!(same_file(got.uffd.as_fd(), uffd.as_fd()));
        // The received fd is close-on-exec.
        let flags = rustix::io::fcntl_getfd(&got.uffd).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    }
}

/// Bytes waiting in `sock`'s receive queue.
fn queued(sock: &OwnedFd) -> u64 {
    rustix::io::ioctl_fionread(sock).unwrap_or(0)
}

#[test]
fn handshake_split_in_two_writes() {
    let (fc, handler) = pair(false);
    let uffd = memfd();
    let bytes = encode_handshake(&two_regions());
    let (first, second) = bytes.split_at(bytes.len() / 2);
    let second = second.to_vec();
    send_raw(fc.as_fd(), first, &[uffd.as_fd()]);
    // The second half goes once the handler has taken the first off the socket (its receive
    // queue is empty), so the handler really sees two reads.
    let watch = handler.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        while queued(&watch) > 0 {
            std::thread::yield_now();
        }
        send_raw(fc.as_fd(), &second, &[]);
        fc // Firecracker keeps the socket open.
    });
    let got = recv_handshake(handler.as_fd(), soon()).unwrap();
    assert_eq!(got.regions, two_regions());
    assert!(same_file(got.uffd.as_fd(), uffd.as_fd()));
    drop(writer.join().unwrap());
}

#[test]
fn handshake_trickled_byte_by_byte() {
    let (fc, handler) = pair(false);
    let uffd = memfd();
    let bytes = encode_handshake(&two_regions());
    let writer = std::thread::spawn(move || {
        send_raw(fc.as_fd(), &bytes[..1], &[uffd.as_fd()]);
        for b in &bytes[1..] {
            send_raw(fc.as_fd(), std::slice::from_ref(b), &[]);
        }
        (fc, uffd)
    });
    let got = recv_handshake(handler.as_fd(), soon()).unwrap();
    assert_eq!(got.regions, two_regions());
    let (_fc, uffd) = writer.join().unwrap();
    assert!(same_file(got.uffd.as_fd(), uffd.as_fd()));
}

#[test]
fn handshake_without_fd_is_refused() {
    let (fc, handler) = pair(false);
    send_raw(fc.as_fd(), &encode_handshake(&two_regions()), &[]);
    let err = recv_handshake(handler.as_fd(), soon()).unwrap_err();
    assert!(matches!(err, HandshakeError::MissingUffd), "{err:?}");
    assert!(err.is_bad_input());
}

#[test]
fn handshake_with_extra_fds_is_refused() {
    let (fc, handler) = pair(false);
    let (a, b, c) = (memfd(), memfd(), memfd());
    send_raw(
        fc.as_fd(),
        &encode_handshake(&two_regions()),
        &[a.as_fd(), b.as_fd(), c.as_fd()],
    );
    let err = recv_handshake(handler.as_fd(), soon()).unwrap_err();
    assert!(matches!(err, HandshakeError::ExtraFds(2)), "{err:?}");
    assert!(err.is_bad_input());
}

#[test]
fn malformed_handshake_over_a_socket() {
    let (fc, handler) = pair(false);
    let uffd = memfd();
    send_raw(
        fc.as_fd(),
        br#"[{"base_host_virt_addr": nope}]"#,
        &[uffd.as_fd()],
    );
    let err = recv_handshake(handler.as_fd(), soon()).unwrap_err();
    assert!(matches!(err, HandshakeError::Json(_)), "{err:?}");
    // Garbage without a closing bracket is reported as such, not as a timeout.
    let (fc, handler) = pair(false);
    send_raw(fc.as_fd(), b"hello", &[uffd.as_fd()]);
    let err = recv_handshake(handler.as_fd(), soon()).unwrap_err();
    assert!(matches!(err, HandshakeError::Json(_)), "{err:?}");
}

#[test]
fn eof_before_the_end_is_closed() {
    let (fc, handler) = pair(false);
    let uffd = memfd();
    send_raw(fc.as_fd(), b"[{\"base_host_virt_addr\":", &[uffd.as_fd()]);
    drop(fc);
    let err = recv_handshake(handler.as_fd(), soon()).unwrap_err();
    assert!(
        matches!(err, HandshakeError::Closed { received_bytes: 24 }),
        "{err:?}"
    );
    assert!(err.peer_gone() && !err.is_bad_input());

    let (fc, handler) = pair(true);
    drop(fc);
    let err = recv_handshake(handler.as_fd(), soon()).unwrap_err();
    assert!(matches!(err, HandshakeError::Closed { received_bytes: 0 }));
}

#[test]
fn silence_times_out() {
    let (fc, handler) = pair(false);
    let uffd = memfd();
    send_raw(fc.as_fd(), b"[{\"size\": 4096", &[uffd.as_fd()]);
    let start = Instant::now();
    let err = recv_handshake(handler.as_fd(), start + Duration::from_millis(100)).unwrap_err();
    assert!(
        matches!(err, HandshakeError::Timeout { received_bytes: 14 }),
        "{err:?}"
    );
    assert!(err.is_timeout() && !err.is_bad_input() && !err.peer_gone());
    assert!(start.elapsed() >= Duration::from_millis(100));
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(fc);
}

#[test]
fn oversized_handshake_is_refused() {
    let (fc, handler) = pair(false);
    let uffd = memfd();
    let writer = std::thread::spawn(move || {
        send_raw(fc.as_fd(), b"[", &[uffd.as_fd()]);
        let spaces = vec![b' '; MAX_HANDSHAKE_BYTES];
        // The reader stops reading at the limit, so this write may fail once it is gone.
        let _ = rustix::net::send(&fc, &spaces, SendFlags::NOSIGNAL);
        fc
    });
    let err = recv_handshake(handler.as_fd(), soon()).unwrap_err();
    assert!(matches!(err, HandshakeError::TooLarge), "{err:?}");
    drop(handler);
    drop(writer.join().unwrap());
}

fn arb_region() -> impl Strategy<Value = GuestRegionUffdMapping> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        prop_oneof![Just(PAGE_4K), Just(PAGE_2M), any::<u64>()],
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(a, s, o, p, k)| GuestRegionUffdMapping {
            base_host_virt_addr: a,
            size: s,
            offset: o,
            page_size: p,
            page_size_kib: k,
        })
}

proptest! {
    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_handshake(&bytes);
    }

    #[test]
    fn parse_never_panics_on_mangled_handshakes(
        regions in proptest::collection::vec(arb_region(), 1..4),
        cut in any::<usize>(),
        flip in any::<(usize, u8)>(),
    ) {
        let mut bytes = encode_handshake(&regions);
        prop_assert_eq!(parse_handshake(&bytes).unwrap(), regions.clone());
        let cut = cut % bytes.len();
        prop_assert!(matches!(parse_handshake(&bytes[..cut]), Err(HandshakeError::Incomplete)));
        let at = flip.0 % bytes.len();
        bytes[at] = flip.1;
        let _ = parse_handshake(&bytes);
    }

    #[test]
    fn validate_never_panics(
        regions in proptest::collection::vec(arb_region(), 0..6),
        len in any::<u64>(),
    ) {
        if let Ok(valid) = validate(&regions, len) {
            for v in valid {
                prop_assert!(v.size > 0 && v.file_offset + v.size <= len);
            }
        }
    }
}
