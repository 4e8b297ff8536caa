//! guest_memfd and memfd backing: discarding a range (`FALLOC_FL_PUNCH_HOLE`), a file operation
//! any process holding the fd may do. (KVM VM ioctls — creating a guest_memfd, setting memory
//! attributes — are refused to every process but the VM's creator, so the VMM does those:
//! `vmpager_client::kvm_private`.)

use std::fs::File;
use std::io;

/// Discards `[offset, offset + len)` of a memfd or guest_memfd (`FALLOC_FL_PUNCH_HOLE`): the
/// pages are freed and unmapped everywhere, and read back as zeros.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    rustix::fs::fallocate(
        file,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .map_err(io::Error::from)
}
