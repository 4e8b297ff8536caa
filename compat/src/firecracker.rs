//! Firecracker's external UFFD handshake (Firecracker >= 1.12; checked against main at 81b38b9).
//!
//! The page-fault *handler* binds and listens on a Unix `SOCK_STREAM` socket. When Firecracker
//! restores a snapshot with a `Uffd` memory backend it connects and does exactly one `sendmsg`:
//! the data is the compact JSON text of an array of [`GuestRegionUffdMapping`] (no length
//! prefix, no terminator) and the control data is exactly one fd, the userfaultfd, in
//! `SCM_RIGHTS`. Firecracker then never reads from the socket and never closes it while it
//! lives, so the end of the message is found by parsing: [`parse_handshake`] tells a JSON value
//! that has not ended yet ([`HandshakeError::Incomplete`]) from a malformed one.
//!
//! [`recv_handshake`] is the handler's side, [`send_handshake`] Firecracker's (for tests and
//! for driving a handler without Firecracker). [`validate`] checks the regions against the
//! memory snapshot file before anything is mapped.

use crate::sockutil;
use rustix::event::PollFlags;
use rustix::io::Errno;
use rustix::net::RecvFlags;
use serde::{Deserialize, Serialize};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Instant;

/// Base page size of a region backed by ordinary (anonymous or shmem) memory.
pub const PAGE_4K: u64 = 4096;
/// Page size of a region backed by 2 MiB hugetlbfs pages.
pub const PAGE_2M: u64 = 2 << 20;
/// Most regions a handshake may list.
pub const MAX_REGIONS: usize = 64;
/// Most bytes a handshake may take.
pub const MAX_HANDSHAKE_BYTES: usize = 64 * 1024;

/// One guest memory region as Firecracker describes it in the handshake.
///
/// Unknown JSON fields are ignored, so newer Firecracker versions that add fields still parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegionUffdMapping {
    /// Firecracker's (host) virtual address of the region: faults arrive at these addresses.
    pub base_host_virt_addr: u64,
    /// Region size in bytes.
    pub size: u64,
    /// Byte offset of the region's contents in the memory snapshot file.
    pub offset: u64,
    /// Page size of the region's backing memory in bytes (4096 or 2097152).
    pub page_size: u64,
    /// Deprecated duplicate of `page_size`, also in bytes despite its name; may be absent in
    /// future Firecracker versions (and is not serialized when `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size_kib: Option<u64>,
}

/// A region that passed [`validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidRegion {
    /// Firecracker's virtual address of the region's first byte.
    pub host_addr: u64,
    /// Size in bytes: non-zero, a multiple of `page_size`.
    pub size: u64,
    /// Offset of the region's first byte in the memory file.
    pub file_offset: u64,
    /// [`PAGE_4K`] or [`PAGE_2M`].
    pub page_size: u64,
}

/// The handshake as received: the regions (not yet validated: see [`validate`]) and the
/// userfaultfd that came with them.
#[derive(Debug)]
pub struct Handshake {
    /// The regions in the order Firecracker listed them.
    pub regions: Vec<GuestRegionUffdMapping>,
    /// The userfaultfd (received close-on-exec).
    pub uffd: OwnedFd,
}

/// Why a handshake was refused or could not be received. Classified with
/// [`HandshakeError::is_bad_input`], [`HandshakeError::peer_gone`] and
/// [`HandshakeError::is_timeout`].
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The bytes are a valid prefix of a JSON value that has not ended yet.
    #[error("the handshake JSON has not ended yet")]
    Incomplete,
    /// The bytes are not the JSON of a region list (serde's message).
    #[error("malformed handshake JSON: {0}")]
    Json(String),
    /// The region list is empty.
    #[error("the handshake lists no regions")]
    NoRegions,
    /// More than [`MAX_REGIONS`] regions.
    #[error("the handshake lists {0} regions, more than the limit of {MAX_REGIONS}")]
    TooManyRegions(usize),
    /// More than [`MAX_HANDSHAKE_BYTES`] bytes without a complete value.
    #[error("the handshake exceeds the limit of {MAX_HANDSHAKE_BYTES} bytes")]
    TooLarge,
    /// A page size other than [`PAGE_4K`] or [`PAGE_2M`].
    #[error("region {index} has page size {page_size}, not 4096 or 2097152")]
    BadPageSize {
        /// Index of the region in the list.
        index: usize,
        /// Its `page_size`.
        page_size: u64,
    },
    /// `page_size_kib` is present and differs from `page_size`.
    #[error("region {index} has page_size_kib {page_size_kib}, which differs from its page_size {page_size}")]
    PageSizeMismatch {
        /// Index of the region in the list.
        index: usize,
        /// Its `page_size`.
        page_size: u64,
        /// Its `page_size_kib` (bytes, despite the name).
        page_size_kib: u64,
    },
    /// A region of size zero.
    #[error("region {index} has size zero")]
    EmptyRegion {
        /// Index of the region in the list.
        index: usize,
    },
    /// A region at host address zero.
    #[error("region {index} has host address zero")]
    NullAddress {
        /// Index of the region in the list.
        index: usize,
    },
    /// Address, size or file offset not a multiple of the region's page size.
    #[error(
        "region {index} has {field} {value:#x}, not a multiple of its page size {page_size:#x}"
    )]
    Unaligned {
        /// Index of the region in the list.
        index: usize,
        /// `base_host_virt_addr`, `size` or `offset`.
        field: &'static str,
        /// The field's value.
        value: u64,
        /// The region's page size.
        page_size: u64,
    },
    /// `base_host_virt_addr + size` overflows.
    #[error(
        "region {index} (host address {addr:#x}, {size:#x} bytes) overflows the address space"
    )]
    AddressOverflow {
        /// Index of the region in the list.
        index: usize,
        /// Its `base_host_virt_addr`.
        addr: u64,
        /// Its `size`.
        size: u64,
    },
    /// `offset + size` overflows.
    #[error("region {index} (file offset {offset}, {size} bytes) overflows a 64-bit file offset")]
    FileRangeOverflow {
        /// Index of the region in the list.
        index: usize,
        /// Its `offset`.
        offset: u64,
        /// Its `size`.
        size: u64,
    },
    /// The region's file range ends past the end of the memory file.
    #[error("region {index} (file bytes {start}..{end}) lies outside the memory file of {file_len} bytes")]
    OutsideFile {
        /// Index of the region in the list.
        index: usize,
        /// First file byte of the region.
        start: u64,
        /// One past its last file byte.
        end: u64,
        /// Length of the memory file.
        file_len: u64,
    },
    /// Two regions share host virtual addresses.
    #[error("regions {first} ({first_start:#x}..{first_end:#x}) and {second} ({second_start:#x}..{second_end:#x}) overlap in host address space")]
    HostOverlap {
        /// Index of the lower region.
        first: usize,
        /// Its first address.
        first_start: u64,
        /// One past its last address.
        first_end: u64,
        /// Index of the region it overlaps.
        second: usize,
        /// Its first address.
        second_start: u64,
        /// One past its last address.
        second_end: u64,
    },
    /// Two regions share bytes of the memory file.
    #[error("regions {first} (file bytes {first_start}..{first_end}) and {second} (file bytes {second_start}..{second_end}) overlap in the memory file")]
    FileOverlap {
        /// Index of the region with the lower file offset.
        first: usize,
        /// Its first file byte.
        first_start: u64,
        /// One past its last file byte.
        first_end: u64,
        /// Index of the region it overlaps.
        second: usize,
        /// Its first file byte.
        second_start: u64,
        /// One past its last file byte.
        second_end: u64,
    },
    /// A complete region list arrived without any fd.
    #[error("the handshake carried no userfaultfd")]
    MissingUffd,
    /// Fds beyond the userfaultfd arrived (they were closed); a count that includes fds the
    /// kernel dropped for lack of room is a lower bound.
    #[error("the handshake carried {0} file descriptors beyond the userfaultfd")]
    ExtraFds(usize),
    /// The deadline passed before a complete value arrived.
    #[error("no complete handshake before the deadline ({received_bytes} bytes received)")]
    Timeout {
        /// Bytes received until then.
        received_bytes: usize,
    },
    /// The peer closed the connection before a complete value arrived.
    #[error("the peer closed the connection before the handshake ended ({received_bytes} bytes received)")]
    Closed {
        /// Bytes received until then.
        received_bytes: usize,
    },
    /// A system call on the socket failed.
    #[error("handshake socket system call failed: {0}")]
    Io(std::io::Error),
}

impl HandshakeError {
    /// The peer sent something wrong: malformed or out-of-bounds JSON, invalid regions, or
    /// the wrong number of fds. (Not: incomplete, timed out, closed, or a system call error.)
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            HandshakeError::Incomplete
                | HandshakeError::Timeout { .. }
                | HandshakeError::Closed { .. }
                | HandshakeError::Io(_)
        )
    }

    /// The peer went away: it closed the connection or the socket reports it reset.
    pub fn peer_gone(&self) -> bool {
        match self {
            HandshakeError::Closed { .. } => true,
            HandshakeError::Io(e) => crate::io_peer_gone(e),
            _ => false,
        }
    }

    /// The deadline passed.
    pub fn is_timeout(&self) -> bool {
        matches!(self, HandshakeError::Timeout { .. })
    }
}

/// The bytes Firecracker sends: `serde_json::to_string` of the list (compact, fields in
/// declaration order, `page_size_kib` left out when `None`).
pub fn encode_handshake(regions: &[GuestRegionUffdMapping]) -> Vec<u8> {
    // Written by hand so that encoding cannot fail; a test checks it equals serde_json's output.
    let mut out = String::from("[");
    for (i, r) in regions.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            "{{\"base_host_virt_addr\":{},\"size\":{},\"offset\":{},\"page_size\":{}",
            r.base_host_virt_addr, r.size, r.offset, r.page_size
        ));
        if let Some(kib) = r.page_size_kib {
            out.push_str(&format!(",\"page_size_kib\":{kib}"));
        }
        out.push('}');
    }
    out.push(']');
    out.into_bytes()
}

/// Parses the handshake bytes received so far.
///
/// [`HandshakeError::Incomplete`] means "a valid prefix, keep reading"; any other error is
/// final. Trailing whitespace is accepted, anything else after the array is malformed. Does
/// not check the regions beyond their count: see [`validate`].
pub fn parse_handshake(bytes: &[u8]) -> Result<Vec<GuestRegionUffdMapping>, HandshakeError> {
    if bytes.len() > MAX_HANDSHAKE_BYTES {
        return Err(HandshakeError::TooLarge);
    }
    let regions: Vec<GuestRegionUffdMapping> =
        serde_json::from_slice(bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Eof => HandshakeError::Incomplete,
            _ => HandshakeError::Json(e.to_string()),
        })?;
    if regions.is_empty() {
        return Err(HandshakeError::NoRegions);
    }
    if regions.len() > MAX_REGIONS {
        return Err(HandshakeError::TooManyRegions(regions.len()));
    }
    Ok(regions)
}

/// Checks the regions against a memory file of `mem_file_len` bytes: page sizes, alignment,
/// overflow, file bounds, and no two regions sharing host addresses or file bytes. Returns
/// them in list order.
pub fn validate(
    regions: &[GuestRegionUffdMapping],
    mem_file_len: u64,
) -> Result<Vec<ValidRegion>, HandshakeError> {
    if regions.is_empty() {
        return Err(HandshakeError::NoRegions);
    }
    if regions.len() > MAX_REGIONS {
        return Err(HandshakeError::TooManyRegions(regions.len()));
    }
    let mut valid = Vec::with_capacity(regions.len());
    for (index, r) in regions.iter().enumerate() {
        valid.push(validate_one(index, r, mem_file_len)?);
    }

    // Overlaps: sort indices by start, then only neighbours need comparing. End values cannot
    // overflow: validate_one checked both sums.
    let mut order: Vec<(usize, ValidRegion)> = valid.iter().copied().enumerate().collect();
    order.sort_by_key(|(_, r)| r.host_addr);
    for pair in order.windows(2) {
        if let [(i, a), (j, b)] = pair {
            if a.host_addr + a.size > b.host_addr {
                return Err(HandshakeError::HostOverlap {
                    first: *i,
                    first_start: a.host_addr,
                    first_end: a.host_addr + a.size,
                    second: *j,
                    second_start: b.host_addr,
                    second_end: b.host_addr + b.size,
                });
            }
        }
    }
    order.sort_by_key(|(_, r)| r.file_offset);
    for pair in order.windows(2) {
        if let [(i, a), (j, b)] = pair {
            if a.file_offset + a.size > b.file_offset {
                return Err(HandshakeError::FileOverlap {
                    first: *i,
                    first_start: a.file_offset,
                    first_end: a.file_offset + a.size,
                    second: *j,
                    second_start: b.file_offset,
                    second_end: b.file_offset + b.size,
                });
            }
        }
    }
    Ok(valid)
}

fn validate_one(
    index: usize,
    r: &GuestRegionUffdMapping,
    mem_file_len: u64,
) -> Result<ValidRegion, HandshakeError> {
    let page_size = r.page_size;
    if page_size != PAGE_4K && page_size != PAGE_2M {
        return Err(HandshakeError::BadPageSize { index, page_size });
    }
    if let Some(page_size_kib) = r.page_size_kib {
        if page_size_kib != page_size {
            return Err(HandshakeError::PageSizeMismatch {
                index,
                page_size,
                page_size_kib,
            });
        }
    }
    if r.size == 0 {
        return Err(HandshakeError::EmptyRegion { index });
    }
    if r.base_host_virt_addr == 0 {
        return Err(HandshakeError::NullAddress { index });
    }
    for (field, value) in [
        ("base_host_virt_addr", r.base_host_virt_addr),
        ("size", r.size),
        ("offset", r.offset),
    ] {
        if value % page_size != 0 {
            return Err(HandshakeError::Unaligned {
                index,
                field,
                value,
                page_size,
            });
        }
    }
    if r.base_host_virt_addr.checked_add(r.size).is_none() {
        return Err(HandshakeError::AddressOverflow {
            index,
            addr: r.base_host_virt_addr,
            size: r.size,
        });
    }
    let Some(end) = r.offset.checked_add(r.size) else {
        return Err(HandshakeError::FileRangeOverflow {
            index,
            offset: r.offset,
            size: r.size,
        });
    };
    if end > mem_file_len {
        return Err(HandshakeError::OutsideFile {
            index,
            start: r.offset,
            end,
            file_len: mem_file_len,
        });
    }
    Ok(ValidRegion {
        host_addr: r.base_host_virt_addr,
        size: r.size,
        file_offset: r.offset,
        page_size,
    })
}

/// Sends the handshake exactly as Firecracker does: one `sendmsg` with the whole JSON and
/// `uffd` in `SCM_RIGHTS` (should the kernel take only part of the bytes, the rest follows
/// with plain sends; the fd goes only once). Works on blocking and non-blocking sockets.
pub fn send_handshake(
    sock: BorrowedFd<'_>,
    regions: &[GuestRegionUffdMapping],
    uffd: BorrowedFd<'_>,
) -> std::io::Result<()> {
    sockutil::send_with_fd(sock, &encode_handshake(regions), uffd)
}

/// Receives a handshake on a connected `SOCK_STREAM` socket (blocking or not), waiting at most
/// until `deadline`.
///
/// Reads with `recvmsg(MSG_DONTWAIT)` and polls for readability in between, accumulating bytes
/// until [`parse_handshake`] stops answering [`HandshakeError::Incomplete`]. The first fd to
/// arrive is the userfaultfd; every other fd is closed and reported as
/// [`HandshakeError::ExtraFds`] once the JSON is complete. The regions are not validated: call
/// [`validate`] with the memory file's length.
pub fn recv_handshake(
    sock: BorrowedFd<'_>,
    deadline: Instant,
) -> Result<Handshake, HandshakeError> {
    // One byte past the limit, so that an over-long handshake is seen as such.
    let mut buf = vec![0u8; MAX_HANDSHAKE_BYTES + 1];
    let mut filled = 0usize;
    let mut parsed_len = 0usize;
    let mut uffd: Option<OwnedFd> = None;
    let mut extra_fds = 0usize;
    let regions = loop {
        let Some(spare) = buf.get_mut(filled..) else {
            return Err(HandshakeError::TooLarge);
        };
        let spare_len = spare.len();
        match sockutil::recv_with_fds(sock, spare, RecvFlags::DONTWAIT) {
            Ok(received) => {
                for fd in received.fds {
                    if uffd.is_none() {
                        uffd = Some(fd);
                    } else {
                        extra_fds += 1; // `fd` is dropped, so closed, here.
                    }
                }
                if received.fds_truncated {
                    extra_fds += 1;
                }
                if received.bytes == 0 {
                    let data = buf.get(..filled).unwrap_or_default();
                    break match parse_handshake(data) {
                        Err(HandshakeError::Incomplete) => {
                            return Err(HandshakeError::Closed {
                                received_bytes: filled,
                            })
                        }
                        other => other?,
                    };
                }
                filled += received.bytes.min(spare_len);
                if filled > MAX_HANDSHAKE_BYTES {
                    return Err(HandshakeError::TooLarge);
                }
                let data = buf.get(..filled).unwrap_or_default();
                // A complete array ends in ']' (then whitespace); parsing only then, or once
                // the data has doubled, keeps a handshake trickled in byte by byte from costing
                // a full parse per byte.
                if ends_like_array(data) || filled >= 2 * parsed_len {
                    parsed_len = filled;
                    match parse_handshake(data) {
                        Err(HandshakeError::Incomplete) => {}
                        other => break other?,
                    }
                }
            }
            Err(Errno::AGAIN) => {
                let ready = sockutil::wait_ready(sock, PollFlags::IN, Some(deadline))
                    .map_err(HandshakeError::Io)?;
                if !ready {
                    // Report malformed data rather than a timeout where we can tell.
                    let data = buf.get(..filled).unwrap_or_default();
                    break match parse_handshake(data) {
                        Err(HandshakeError::Incomplete) => {
                            return Err(HandshakeError::Timeout {
                                received_bytes: filled,
                            })
                        }
                        other => other?,
                    };
                }
            }
            Err(e) => return Err(HandshakeError::Io(e.into())),
        }
    };
    let Some(uffd) = uffd else {
        return Err(HandshakeError::MissingUffd);
    };
    if extra_fds > 0 {
        return Err(HandshakeError::ExtraFds(extra_fds));
    }
    Ok(Handshake { regions, uffd })
}

/// The last byte that is not JSON whitespace is `]`.
fn ends_like_array(data: &[u8]) -> bool {
    data.iter()
        .rev()
        .find(|b| !matches!(b, b' ' | b'\n' | b'\r' | b'\t'))
        == Some(&b']')
}
