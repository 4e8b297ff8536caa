//! cloud-hypervisor migration wire format: byte layouts, refusals, stream helpers, MemoryFd.

use proptest::prelude::*;
use rustix::fs::{fstat, memfd_create, MemfdFlags};
use rustix::net::{
    socketpair, AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags,
    SocketType,
};
use std::io::{Cursor, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use vmpager_compat::cloud_hypervisor::wire::*;

const ALL_COMMANDS: [Command; 10] = [
    Command::Invalid,
    Command::Start,
    Command::Config,
    Command::State,
    Command::Memory,
    Command::Complete,
    Command::Abandon,
    Command::MemoryFd,
    Command::CompletePaused,
    Command::PageFault,
];

#[test]
fn request_layouts_byte_by_byte() {
    assert_eq!(
        Request::start().encode(),
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(Request::start().sender_version(), Some(PROTOCOL_VERSION));
    assert_eq!(
        Request::page_fault().encode(),
        [9, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        Request::new(Command::Config, 0x0102_0304_0506_0708).encode(),
        [2, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]
    );
    assert_eq!(
        Request::memory_fd().encode(),
        [7, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0]
    );
    let v = Request::start_with_version(0x0201);
    assert_eq!(v.encode(), [1, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(v.sender_version(), Some(0x0201));
    assert_eq!(Request::new(Command::Start, 0), Request::start());
    assert_eq!(Request::config(3).sender_version(), None);
    assert_eq!(Request::complete().command(), Command::Complete);
    assert_eq!(
        Request::complete_paused().command(),
        Command::CompletePaused
    );
    assert_eq!(Request::abandon().command(), Command::Abandon);
    assert_eq!(Request::state(9).length(), 9);
    assert_eq!(Request::memory(10).command(), Command::Memory);
}

#[test]
fn every_command_round_trips() {
    for (i, command) in ALL_COMMANDS.into_iter().enumerate() {
        assert_eq!(command.as_u16(), i as u16);
        assert_eq!(Command::from_u16(i as u16).unwrap(), command);
        for length in [0, 1, 16, u64::MAX] {
            let request = Request::new(command, length);
            let bytes = request.encode();
            assert_eq!(bytes[0..2], (i as u16).to_le_bytes());
            assert_eq!(bytes[8..16], length.to_le_bytes());
            let back = Request::decode(&bytes).unwrap();
            assert_eq!(back, request);
            assert_eq!(back.command(), command);
            assert_eq!(back.length(), length);
            assert_eq!(back.command_headers(), [0; 6]);
        }
    }
}

#[test]
fn bad_requests_are_refused() {
    for value in [10u16, 0x0100, u16::MAX] {
        let mut bytes = [0u8; 16];
        bytes[..2].copy_from_slice(&value.to_le_bytes());
        let err = Request::decode(&bytes).unwrap_err();
        assert!(matches!(err, WireError::UnknownCommand(v) if v == value));
        assert!(err.is_bad_input() && !err.peer_gone());
        assert!(matches!(
            Command::from_u16(value),
            Err(WireError::UnknownCommand(_))
        ));
    }
    let mut bytes = Request::config(5).encode();
    bytes[7] = 1;
    assert!(matches!(
        Request::decode(&bytes),
        Err(WireError::NonZeroHeaders(Command::Config))
    ));
    // Start's header bytes past the version are ignored, as cloud-hypervisor ignores them.
    let mut bytes = Request::start().encode();
    bytes[6] = 0xff;
    let start = Request::decode(&bytes).unwrap();
    assert_eq!(start.sender_version(), Some(0));
    assert_eq!(start.encode(), bytes);
}

#[test]
fn response_layouts_and_refusals() {
    assert_eq!(
        Response::ok().encode(),
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        Response::error().encode(),
        [2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        Response::ok_with(0x1000).encode(),
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0]
    );
    for status in [Status::Invalid, Status::Ok, Status::Error] {
        assert_eq!(Status::from_u16(status.as_u16()).unwrap(), status);
        let r = Response::new(status, 77);
        assert_eq!(Response::decode(&r.encode()).unwrap(), r);
    }
    assert!(Response::ok().is_ok() && !Response::error().is_ok());
    assert_eq!(Response::ok_with(5).length(), 5);
    assert_eq!(Response::error().status(), Status::Error);

    let mut bytes = Response::ok().encode();
    bytes[0] = 3;
    assert!(matches!(
        Response::decode(&bytes),
        Err(WireError::UnknownStatus(3))
    ));
    let mut bytes = Response::ok().encode();
    bytes[5] = 1;
    let err = Response::decode(&bytes).unwrap_err();
    assert!(matches!(err, WireError::NonZeroPadding) && err.is_bad_input());
}

#[test]
fn ranges_and_roles() {
    let range = MemoryRange {
        gpa: 0x1_0000_0000,
        length: 0x20_0000,
    };
    assert_eq!(
        range.encode(),
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0]
    );
    assert_eq!(MemoryRange::decode(&range.encode()), range);
    assert_eq!(range.end(), Some(0x1_0020_0000));
    assert_eq!(
        MemoryRange {
            gpa: u64::MAX,
            length: 1
        }
        .end(),
        None
    );

    for (role, bytes) in [
        (ConnectionRole::Invalid, [0, 0]),
        (ConnectionRole::PrecopyMemory, [1, 0]),
        (ConnectionRole::Fault, [2, 0]),
    ] {
        assert_eq!(role.encode(), bytes);
        assert_eq!(ConnectionRole::decode(&bytes).unwrap(), role);
        assert_eq!(ConnectionRole::from_u16(role.as_u16()).unwrap(), role);
    }
    assert!(matches!(
        ConnectionRole::decode(&[3, 0]),
        Err(WireError::UnknownRole(3))
    ));
    assert!(matches!(
        ConnectionRole::decode(&[0, 1]),
        Err(WireError::UnknownRole(256))
    ));
}

#[test]
fn stream_helpers_round_trip() {
    let mut out = Vec::new();
    write_role(&mut out, ConnectionRole::Fault).unwrap();
    write_request(&mut out, Request::page_fault()).unwrap();
    let range = MemoryRange {
        gpa: 0x4000,
        length: 0x1000,
    };
    write_range(&mut out, range).unwrap();
    write_response(&mut out, Response::ok_with(0x1000)).unwrap();
    assert_eq!(
        out.len(),
        ROLE_LEN + REQUEST_LEN + MEMORY_RANGE_LEN + RESPONSE_LEN
    );

    let mut input = Cursor::new(out);
    assert_eq!(read_role(&mut input).unwrap(), ConnectionRole::Fault);
    assert_eq!(read_request(&mut input).unwrap(), Request::page_fault());
    assert_eq!(read_range(&mut input).unwrap(), range);
    assert_eq!(
        read_response(&mut input).unwrap(),
        Response::ok_with(0x1000)
    );
    let err = read_request(&mut input).unwrap_err();
    assert!(matches!(err, WireError::Closed) && err.peer_gone() && !err.is_bad_input());

    // A header cut short is a closed connection, not garbage.
    let mut short = Cursor::new(Request::start().encode()[..9].to_vec());
    assert!(matches!(read_request(&mut short), Err(WireError::Closed)));
    let mut short = Cursor::new(vec![1u8]);
    assert!(matches!(read_role(&mut short), Err(WireError::Closed)));
    let mut garbage = Cursor::new(vec![0xffu8; 16]);
    assert!(matches!(
        read_response(&mut garbage),
        Err(WireError::UnknownStatus(0xffff))
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

#[test]
fn memory_fds_over_a_socket() {
    for nonblocking in [false, true] {
        let (sender, receiver) = pair(nonblocking);
        let (a, b) = (memfd(), memfd());
        send_memory_fd(sender.as_fd(), 3, a.as_fd()).unwrap();
        send_memory_fd(sender.as_fd(), 0x0102_0304, b.as_fd()).unwrap();
        write_request(&mut &UnixStream::from(sender), Request::config(0)).unwrap();

        // The receiver reads headers with plain reads: recv_memory_fd must take exactly the
        // 4 payload bytes so that the next header stays intact. (A blocking std stream over
        // the non-blocking socket is fine here: everything is already queued.)
        let stream = UnixStream::from(receiver);
        for (slot, fd) in [(3, &a), (0x0102_0304, &b)] {
            let header = read_request(&mut &stream).unwrap();
            assert_eq!(header, Request::memory_fd());
            assert_eq!(header.length(), MEMORY_FD_PAYLOAD_LEN);
            let (got_slot, got_fd) = recv_memory_fd(stream.as_fd()).unwrap();
            assert_eq!(got_slot, slot);
            assert!(same_file(got_fd.as_fd(), fd.as_fd()));
        }
        assert_eq!(read_request(&mut &stream).unwrap(), Request::config(0));
    }
}

#[test]
fn memory_fd_payload_exact_bytes_and_split() {
    let (sender, receiver) = pair(false);
    let fd = memfd();
    // Payload split in two sends; the fd comes with the first.
    send_raw(sender.as_fd(), &[0x78, 0x56], &[fd.as_fd()]);
    send_raw(sender.as_fd(), &[0x34, 0x12], &[]);
    let (slot, got) = recv_memory_fd(receiver.as_fd()).unwrap();
    assert_eq!(slot, 0x1234_5678);
    assert!(same_file(got.as_fd(), fd.as_fd()));
}

#[test]
fn memory_fd_refusals() {
    let (sender, receiver) = pair(false);
    send_raw(sender.as_fd(), &7u32.to_le_bytes(), &[]);
    let err = recv_memory_fd(receiver.as_fd()).unwrap_err();
    assert!(matches!(err, WireError::MissingFd) && err.is_bad_input());

    let (x, y) = (memfd(), memfd());
    send_raw(sender.as_fd(), &7u32.to_le_bytes(), &[x.as_fd(), y.as_fd()]);
    let err = recv_memory_fd(receiver.as_fd()).unwrap_err();
    assert!(matches!(err, WireError::ExtraFds(1)), "{err:?}");

    send_raw(sender.as_fd(), &[1, 2], &[x.as_fd()]);
    drop(sender);
    let err = recv_memory_fd(receiver.as_fd()).unwrap_err();
    assert!(matches!(err, WireError::Closed) && err.peer_gone());
}

proptest! {
    #[test]
    fn decoders_never_panic(bytes in any::<[u8; 16]>()) {
        if let Ok(request) = Request::decode(&bytes) {
            prop_assert_eq!(request.encode(), bytes);
        }
        if let Ok(response) = Response::decode(&bytes) {
            prop_assert_eq!(response.encode(), bytes);
        }
        prop_assert_eq!(MemoryRange::decode(&bytes).encode(), bytes);
        let role = [bytes[0], bytes[1]];
        if let Ok(r) = ConnectionRole::decode(&role) {
            prop_assert_eq!(r.encode(), role);
        }
        let _ = read_request(&mut &bytes[..bytes[2] as usize % 17]);
    }
}
