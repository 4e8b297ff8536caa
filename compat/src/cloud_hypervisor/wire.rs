//! cloud-hypervisor's live-migration wire format (`vm-migration/src/protocol.rs`).
//!
//! Every command is a 16-byte [`Request`] followed by `length` payload bytes; the peer answers
//! each with a 16-byte [`Response`] (followed by `length` payload bytes, normally none). All
//! integers are little-endian. An additional connection starts with a bare 2-byte
//! [`ConnectionRole`] instead of a request. The `MemoryFd` command (local migration) carries a
//! 4-byte slot number and the slot's memfd in `SCM_RIGHTS`: see [`send_memory_fd`].
//!
//! The stream helpers read and write exactly the bytes of one header, so they may share a
//! socket with [`recv_memory_fd`] as long as the socket is not wrapped in a buffered reader.

use crate::sockutil;
use rustix::event::PollFlags;
use rustix::io::Errno;
use rustix::net::RecvFlags;
use std::io::{Read, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use zerocopy::little_endian::{U16, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The sender protocol version this crate announces in [`Request::start`].
pub const PROTOCOL_VERSION: u16 = 0;
/// Bytes of a [`Request`] on the wire.
pub const REQUEST_LEN: usize = 16;
/// Bytes of a [`Response`] on the wire.
pub const RESPONSE_LEN: usize = 16;
/// Bytes of a [`MemoryRange`] on the wire.
pub const MEMORY_RANGE_LEN: usize = 16;
/// Bytes of a [`ConnectionRole`] on the wire.
pub const ROLE_LEN: usize = 2;
/// Payload bytes of a `MemoryFd` request: the slot number.
pub const MEMORY_FD_PAYLOAD_LEN: u64 = 4;

/// Why a message was refused or could not be exchanged. Classified with
/// [`WireError::is_bad_input`] and [`WireError::peer_gone`].
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A request with a command number this crate does not know.
    #[error("unknown migration command {0}")]
    UnknownCommand(u16),
    /// A response with a status number this crate does not know.
    #[error("unknown migration response status {0}")]
    UnknownStatus(u16),
    /// A connection role this crate does not know.
    #[error("unknown migration connection role {0}")]
    UnknownRole(u16),
    /// A request other than `Start` with non-zero command header bytes.
    #[error("the {0:?} request carries non-zero command header bytes")]
    NonZeroHeaders(Command),
    /// A response with non-zero padding bytes.
    #[error("the response carries non-zero padding bytes")]
    NonZeroPadding,
    /// The `MemoryFd` payload arrived without an fd.
    #[error("the MemoryFd payload carried no file descriptor")]
    MissingFd,
    /// The `MemoryFd` payload arrived with more than one fd (the others were closed); a count
    /// that includes fds the kernel dropped for lack of room is a lower bound.
    #[error("the MemoryFd payload carried {0} file descriptors beyond the memfd")]
    ExtraFds(usize),
    /// The peer closed the connection in the middle of (or before) a message.
    #[error("the peer closed the migration connection")]
    Closed,
    /// A system call on the connection failed.
    #[error("migration socket I/O failed: {0}")]
    Io(std::io::Error),
}

impl WireError {
    /// The peer sent something this protocol does not allow.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, WireError::Closed | WireError::Io(_))
    }

    /// The peer went away (closed or reset the connection).
    pub fn peer_gone(&self) -> bool {
        match self {
            WireError::Closed => true,
            WireError::Io(e) => crate::io_peer_gone(e),
            _ => false,
        }
    }
}

fn io_error(e: std::io::Error) -> WireError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        WireError::Closed
    } else {
        WireError::Io(e)
    }
}

/// A migration command.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Reserved: never a valid command.
    Invalid = 0,
    /// Starts a migration; the headers carry the sender's protocol version.
    Start = 1,
    /// The VM configuration (`VmMigrationConfig` JSON).
    Config = 2,
    /// The device and vCPU state (snapshot JSON).
    State = 3,
    /// A memory range table followed by the ranges' contents.
    Memory = 4,
    /// Finishes the migration and resumes the VM on the receiver.
    Complete = 5,
    /// Abandons the migration.
    Abandon = 6,
    /// A slot number with the slot's memfd (local migration).
    MemoryFd = 7,
    /// Finishes the migration without resuming the VM.
    CompletePaused = 8,
    /// Asks for a page: the payload is one [`MemoryRange`].
    PageFault = 9,
}

impl Command {
    /// The command for a wire value.
    pub fn from_u16(value: u16) -> Result<Command, WireError> {
        Ok(match value {
            0 => Command::Invalid,
            1 => Command::Start,
            2 => Command::Config,
            3 => Command::State,
            4 => Command::Memory,
            5 => Command::Complete,
            6 => Command::Abandon,
            7 => Command::MemoryFd,
            8 => Command::CompletePaused,
            9 => Command::PageFault,
            other => return Err(WireError::UnknownCommand(other)),
        })
    }

    /// The wire value.
    pub fn as_u16(self) -> u16 {
        self as u16
    }
}

/// A response status.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Reserved: never a valid status.
    Invalid = 0,
    /// The command succeeded.
    Ok = 1,
    /// The command failed; the migration is over.
    Error = 2,
}

impl Status {
    /// The status for a wire value.
    pub fn from_u16(value: u16) -> Result<Status, WireError> {
        Ok(match value {
            0 => Status::Invalid,
            1 => Status::Ok,
            2 => Status::Error,
            other => return Err(WireError::UnknownStatus(other)),
        })
    }

    /// The wire value.
    pub fn as_u16(self) -> u16 {
        self as u16
    }
}

/// What an additional connection is for: its first two bytes (no request header).
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionRole {
    /// Reserved: never a valid role.
    Invalid = 0,
    /// Carries precopy memory chunks.
    PrecopyMemory = 1,
    /// Carries page faults.
    Fault = 2,
}

impl ConnectionRole {
    /// The role for a wire value.
    pub fn from_u16(value: u16) -> Result<ConnectionRole, WireError> {
        Ok(match value {
            0 => ConnectionRole::Invalid,
            1 => ConnectionRole::PrecopyMemory,
            2 => ConnectionRole::Fault,
            other => return Err(WireError::UnknownRole(other)),
        })
    }

    /// The wire value.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The 2 bytes on the wire.
    pub fn encode(self) -> [u8; ROLE_LEN] {
        self.as_u16().to_le_bytes()
    }

    /// Decodes the 2 bytes on the wire.
    pub fn decode(bytes: &[u8; ROLE_LEN]) -> Result<ConnectionRole, WireError> {
        ConnectionRole::from_u16(u16::from_le_bytes(*bytes))
    }
}

/// Wire layout of a request.
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct RawRequest {
    command: U16,
    command_headers: [u8; 6],
    length: U64,
}

/// Wire layout of a response.
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct RawResponse {
    status: U16,
    padding: [u8; 6],
    length: U64,
}

/// Wire layout of a memory range.
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct RawMemoryRange {
    gpa: U64,
    length: U64,
}

const _: () = assert!(std::mem::size_of::<RawRequest>() == REQUEST_LEN);
const _: () = assert!(std::mem::size_of::<RawResponse>() == RESPONSE_LEN);
const _: () = assert!(std::mem::size_of::<RawMemoryRange>() == MEMORY_RANGE_LEN);

/// A request header: `command: u16`, `command_headers: [u8; 6]`, `length: u64` (the payload
/// bytes that follow). Only `Start` has non-zero command headers: the sender's protocol
/// version, a `u16` in the first two bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    command: Command,
    command_headers: [u8; 6],
    length: u64,
}

impl Request {
    /// A request for `command` with `length` payload bytes; a `Start` request carries
    /// [`PROTOCOL_VERSION`].
    pub fn new(command: Command, length: u64) -> Request {
        let mut command_headers = [0; 6];
        if command == Command::Start {
            let [lo, hi] = PROTOCOL_VERSION.to_le_bytes();
            command_headers = [lo, hi, 0, 0, 0, 0];
        }
        Request {
            command,
            command_headers,
            length,
        }
    }

    /// `Start` announcing [`PROTOCOL_VERSION`].
    pub fn start() -> Request {
        Request::start_with_version(PROTOCOL_VERSION)
    }

    /// `Start` announcing `version` (to test a receiver's version check).
    pub fn start_with_version(version: u16) -> Request {
        let [lo, hi] = version.to_le_bytes();
        Request {
            command: Command::Start,
            command_headers: [lo, hi, 0, 0, 0, 0],
            length: 0,
        }
    }

    /// `Config` with a `length`-byte `VmMigrationConfig` JSON payload.
    pub fn config(length: u64) -> Request {
        Request::new(Command::Config, length)
    }

    /// `State` with a `length`-byte snapshot JSON payload.
    pub fn state(length: u64) -> Request {
        Request::new(Command::State, length)
    }

    /// `Memory` with a `length`-byte payload.
    pub fn memory(length: u64) -> Request {
        Request::new(Command::Memory, length)
    }

    /// `MemoryFd` with its 4-byte slot payload.
    pub fn memory_fd() -> Request {
        Request::new(Command::MemoryFd, MEMORY_FD_PAYLOAD_LEN)
    }

    /// `Complete` (the receiver resumes the VM).
    pub fn complete() -> Request {
        Request::new(Command::Complete, 0)
    }

    /// `CompletePaused` (the receiver leaves the VM paused).
    pub fn complete_paused() -> Request {
        Request::new(Command::CompletePaused, 0)
    }

    /// `Abandon`.
    pub fn abandon() -> Request {
        Request::new(Command::Abandon, 0)
    }

    /// `PageFault`, whose payload is always one [`MemoryRange`] (16 bytes).
    pub fn page_fault() -> Request {
        Request::new(Command::PageFault, MEMORY_RANGE_LEN as u64)
    }

    /// The command.
    pub fn command(&self) -> Command {
        self.command
    }

    /// Payload bytes following the header.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// The six command header bytes.
    pub fn command_headers(&self) -> [u8; 6] {
        self.command_headers
    }

    /// The sender's protocol version, for a `Start` request.
    pub fn sender_version(&self) -> Option<u16> {
        match (self.command, self.command_headers) {
            (Command::Start, [lo, hi, ..]) => Some(u16::from_le_bytes([lo, hi])),
            _ => None,
        }
    }

    /// The 16 bytes on the wire.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let raw = RawRequest {
            command: U16::new(self.command.as_u16()),
            command_headers: self.command_headers,
            length: U64::new(self.length),
        };
        zerocopy::transmute!(raw)
    }

    /// Decodes the 16 bytes on the wire: the command must be known, and the command headers
    /// zero unless it is `Start` (whose bytes past the version cloud-hypervisor ignores, as
    /// this does).
    pub fn decode(bytes: &[u8; REQUEST_LEN]) -> Result<Request, WireError> {
        let raw: RawRequest = zerocopy::transmute!(*bytes);
        let command = Command::from_u16(raw.command.get())?;
        if command != Command::Start && raw.command_headers != [0; 6] {
            return Err(WireError::NonZeroHeaders(command));
        }
        Ok(Request {
            command,
            command_headers: raw.command_headers,
            length: raw.length.get(),
        })
    }
}

/// A response header: `status: u16`, 6 zero padding bytes, `length: u64` (the payload bytes
/// that follow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    status: Status,
    length: u64,
}

impl Response {
    /// A response with `status` and `length` payload bytes.
    pub fn new(status: Status, length: u64) -> Response {
        Response { status, length }
    }

    /// `Ok` without payload.
    pub fn ok() -> Response {
        Response::new(Status::Ok, 0)
    }

    /// `Ok` followed by `length` payload bytes.
    pub fn ok_with(length: u64) -> Response {
        Response::new(Status::Ok, length)
    }

    /// `Error` without payload.
    pub fn error() -> Response {
        Response::new(Status::Error, 0)
    }

    /// The status.
    pub fn status(&self) -> Status {
        self.status
    }

    /// The status is `Ok`.
    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok
    }

    /// Payload bytes following the header.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// The 16 bytes on the wire.
    pub fn encode(&self) -> [u8; RESPONSE_LEN] {
        let raw = RawResponse {
            status: U16::new(self.status.as_u16()),
            padding: [0; 6],
            length: U64::new(self.length),
        };
        zerocopy::transmute!(raw)
    }

    /// Decodes the 16 bytes on the wire: the status must be known and the padding zero.
    pub fn decode(bytes: &[u8; RESPONSE_LEN]) -> Result<Response, WireError> {
        let raw: RawResponse = zerocopy::transmute!(*bytes);
        let status = Status::from_u16(raw.status.get())?;
        if raw.padding != [0; 6] {
            return Err(WireError::NonZeroPadding);
        }
        Ok(Response {
            status,
            length: raw.length.get(),
        })
    }
}

/// A range of guest physical memory: `gpa: u64`, `length: u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryRange {
    /// First guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub length: u64,
}

impl MemoryRange {
    /// One past the last address, unless that overflows.
    pub fn end(&self) -> Option<u64> {
        self.gpa.checked_add(self.length)
    }

    /// The 16 bytes on the wire.
    pub fn encode(&self) -> [u8; MEMORY_RANGE_LEN] {
        let raw = RawMemoryRange {
            gpa: U64::new(self.gpa),
            length: U64::new(self.length),
        };
        zerocopy::transmute!(raw)
    }

    /// Decodes the 16 bytes on the wire (every value is a valid range).
    pub fn decode(bytes: &[u8; MEMORY_RANGE_LEN]) -> MemoryRange {
        let raw: RawMemoryRange = zerocopy::transmute!(*bytes);
        MemoryRange {
            gpa: raw.gpa.get(),
            length: raw.length.get(),
        }
    }
}

fn read_array<const N: usize, R: Read + ?Sized>(r: &mut R) -> Result<[u8; N], WireError> {
    let mut buf = [0u8; N];
    r.read_exact(&mut buf).map_err(io_error)?;
    Ok(buf)
}

/// Reads exactly one request header (blocking).
pub fn read_request<R: Read + ?Sized>(r: &mut R) -> Result<Request, WireError> {
    Request::decode(&read_array(r)?)
}

/// Writes one request header.
pub fn write_request<W: Write + ?Sized>(w: &mut W, request: Request) -> Result<(), WireError> {
    w.write_all(&request.encode()).map_err(io_error)
}

/// Reads exactly one response header (blocking).
pub fn read_response<R: Read + ?Sized>(r: &mut R) -> Result<Response, WireError> {
    Response::decode(&read_array(r)?)
}

/// Writes one response header.
pub fn write_response<W: Write + ?Sized>(w: &mut W, response: Response) -> Result<(), WireError> {
    w.write_all(&response.encode()).map_err(io_error)
}

/// Reads exactly one memory range (blocking).
pub fn read_range<R: Read + ?Sized>(r: &mut R) -> Result<MemoryRange, WireError> {
    Ok(MemoryRange::decode(&read_array(r)?))
}

/// Writes one memory range.
pub fn write_range<W: Write + ?Sized>(w: &mut W, range: MemoryRange) -> Result<(), WireError> {
    w.write_all(&range.encode()).map_err(io_error)
}

/// Reads the role that opens an additional connection (blocking).
pub fn read_role<R: Read + ?Sized>(r: &mut R) -> Result<ConnectionRole, WireError> {
    ConnectionRole::decode(&read_array(r)?)
}

/// Writes the role that opens an additional connection.
pub fn write_role<W: Write + ?Sized>(w: &mut W, role: ConnectionRole) -> Result<(), WireError> {
    w.write_all(&role.encode()).map_err(io_error)
}

/// Sends a `MemoryFd` command as cloud-hypervisor's sender does: the request header
/// (`MemoryFd`, length 4) with plain writes, then one `sendmsg` carrying exactly the 4 bytes of
/// `slot` (little-endian) and `memfd` in `SCM_RIGHTS`. The caller then reads the response.
pub fn send_memory_fd(
    sock: BorrowedFd<'_>,
    slot: u32,
    memfd: BorrowedFd<'_>,
) -> std::io::Result<()> {
    sockutil::send_all(sock, &Request::memory_fd().encode())?;
    sockutil::send_with_fd(sock, &slot.to_le_bytes(), memfd)
}

/// Receives a `MemoryFd` payload after its request header was read (with an exact 16-byte
/// read such as [`read_request`]): reads exactly 4 bytes with `recvmsg` and returns the slot
/// number and the memfd (received close-on-exec). Blocks until the 4 bytes arrive (waiting for
/// readability on a non-blocking socket).
pub fn recv_memory_fd(sock: BorrowedFd<'_>) -> Result<(u32, OwnedFd), WireError> {
    let mut buf = [0u8; 4];
    let mut filled = 0usize;
    let mut memfd: Option<OwnedFd> = None;
    let mut extra_fds = 0usize;
    while filled < buf.len() {
        let Some(spare) = buf.get_mut(filled..) else {
            break;
        };
        let spare_len = spare.len();
        match sockutil::recv_with_fds(sock, spare, RecvFlags::empty()) {
            Ok(received) => {
                for fd in received.fds {
                    if memfd.is_none() {
                        memfd = Some(fd);
                    } else {
                        extra_fds += 1; // `fd` is dropped, so closed, here.
                    }
                }
                if received.fds_truncated {
                    extra_fds += 1;
                }
                if received.bytes == 0 {
                    return Err(WireError::Closed);
                }
                filled += received.bytes.min(spare_len);
            }
            Err(Errno::AGAIN) => {
                sockutil::wait_ready(sock, PollFlags::IN, None).map_err(WireError::Io)?;
            }
            Err(e) => return Err(WireError::Io(e.into())),
        }
    }
    let Some(memfd) = memfd else {
        return Err(WireError::MissingFd);
    };
    if extra_fds > 0 {
        return Err(WireError::ExtraFds(extra_fds));
    }
    Ok((u32::from_le_bytes(buf), memfd))
}
