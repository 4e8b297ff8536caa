//! guest_memfd and memory attributes: the KVM ioctls of private memory, on the VMM's VM fd.
//!
//! `kvm-ioctls` 0.25 returns a bare `RawFd` from `create_guest_memfd` and needs a `VmFd` built
//! from `/dev/kvm`; the daemon only holds the VM fd it received, so these are raw ioctls on it,
//! with the kernel's structs from `kvm-bindings`.

use kvm_bindings::{kvm_create_guest_memfd, kvm_memory_attributes, KVM_MEMORY_ATTRIBUTE_PRIVATE};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `GUEST_MEMFD_FLAG_MMAP`: the guest_memfd can be mmapped (shared pages).
pub const FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED`: pages start shared.
pub const FLAG_INIT_SHARED: u64 = 1 << 1;

const fn iow(nr: u32, size: usize) -> u64 {
    (1u64 << 30) | ((size as u64) << 16) | (0xAE << 8) | nr as u64
}
const fn iowr(nr: u32, size: usize) -> u64 {
    (3u64 << 30) | ((size as u64) << 16) | (0xAE << 8) | nr as u64
}
/// `KVM_CREATE_GUEST_MEMFD = _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)`.
const KVM_CREATE_GUEST_MEMFD: u64 = iowr(0xd4, std::mem::size_of::<kvm_create_guest_memfd>());
/// `KVM_SET_MEMORY_ATTRIBUTES = _IOW(KVMIO, 0xd2, struct kvm_memory_attributes)`.
const KVM_SET_MEMORY_ATTRIBUTES: u64 = iow(0xd2, std::mem::size_of::<kvm_memory_attributes>());
const _: () = assert!(KVM_CREATE_GUEST_MEMFD == 0xC040_AED4);
const _: () = assert!(KVM_SET_MEMORY_ATTRIBUTES == 0x4020_AED2);

/// Creates a guest_memfd of `size` bytes through `vm_fd`.
pub fn create(vm_fd: BorrowedFd<'_>, size: u64, flags: u64) -> io::Result<File> {
    let arg = kvm_create_guest_memfd {
        size,
        flags,
        reserved: [0; 6],
    };
    // SAFETY: KVM_CREATE_GUEST_MEMFD reads one `kvm_create_guest_memfd`, which `arg` is, for the
    // duration of the call; it returns a new fd or -1.
    let fd = unsafe { libc::ioctl(vm_fd.as_raw_fd(), KVM_CREATE_GUEST_MEMFD as _, &arg) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd from the kernel, owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// `KVM_SET_MEMORY_ATTRIBUTES`: marks `[gpa, gpa + size)` private or shared in KVM.
pub fn set_attributes(vm_fd: BorrowedFd<'_>, gpa: u64, size: u64, private: bool) -> io::Result<()> {
    let arg = kvm_memory_attributes {
        address: gpa,
        size,
        attributes: if private {
            u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE)
        } else {
            0
        },
        flags: 0,
    };
    // SAFETY: KVM_SET_MEMORY_ATTRIBUTES reads one `kvm_memory_attributes`, which `arg` is.
    let rc = unsafe { libc::ioctl(vm_fd.as_raw_fd(), KVM_SET_MEMORY_ATTRIBUTES as _, &arg) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

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

/// `KVM_CHECK_EXTENSION` on a VM fd: the capability's value (0 when unknown). Fails when the
/// fd is not a KVM VM.
pub fn vm_capability(vm_fd: BorrowedFd<'_>, cap: u64) -> io::Result<u64> {
    const KVM_CHECK_EXTENSION: u64 = 0xAE03;
    // SAFETY: KVM_CHECK_EXTENSION takes an integer argument and touches no memory; on a non-KVM
    // fd it fails with ENOTTY.
    let rc = unsafe { libc::ioctl(vm_fd.as_raw_fd(), KVM_CHECK_EXTENSION as _, cap) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as u64)
}
