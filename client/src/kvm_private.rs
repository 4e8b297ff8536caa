//! The KVM VM ioctls of private memory, done by the VMM: KVM refuses VM ioctls from every
//! process but the VM's creator (`kvm->mm != current->mm` → `EIO`), so the daemon cannot create
//! guest_memfds or set memory attributes itself. Raw ioctls on the VMM's VM fd (`kvm-ioctls`
//! 0.25 returns a bare `RawFd` from `create_guest_memfd` and lacks the flag constants).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `GUEST_MEMFD_FLAG_MMAP`.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED`.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
/// `KVM_CAP_GUEST_MEMFD_FLAGS` (Linux 6.18).
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u64 = 244;
/// `KVM_MEMORY_ATTRIBUTE_PRIVATE`.
pub const KVM_MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;

#[repr(C)]
struct CreateGuestMemfd {
    size: u64,
    flags: u64,
    reserved: [u64; 6],
}

#[repr(C)]
struct MemoryAttributes {
    address: u64,
    size: u64,
    attributes: u64,
    flags: u64,
}

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
}
const KVM_CHECK_EXTENSION: u64 = 0xAE03;
/// `_IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)`.
const KVM_CREATE_GUEST_MEMFD: u64 = ioc(3, 0xd4, std::mem::size_of::<CreateGuestMemfd>());
/// `_IOW(KVMIO, 0xd2, struct kvm_memory_attributes)`.
const KVM_SET_MEMORY_ATTRIBUTES: u64 = ioc(1, 0xd2, std::mem::size_of::<MemoryAttributes>());
const _: () = assert!(KVM_CREATE_GUEST_MEMFD == 0xC040_AED4);
const _: () = assert!(KVM_SET_MEMORY_ATTRIBUTES == 0x4020_AED2);

/// `KVM_CHECK_EXTENSION` on a VM fd.
pub fn vm_capability(vm_fd: BorrowedFd<'_>, cap: u64) -> io::Result<u64> {
    // SAFETY: KVM_CHECK_EXTENSION takes an integer argument and touches no memory.
    let rc = unsafe { libc::ioctl(vm_fd.as_raw_fd(), KVM_CHECK_EXTENSION as _, cap) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as u64)
}

/// Creates a guest_memfd of `size` bytes for the VM, with the flags the host offers among
/// `MMAP` and `INIT_SHARED` (so the host can map and inspect it where the kernel allows).
pub fn create_guest_memfd(vm_fd: BorrowedFd<'_>, size: u64) -> io::Result<OwnedFd> {
    let supported = vm_capability(vm_fd, KVM_CAP_GUEST_MEMFD_FLAGS).unwrap_or(0);
    let flags = supported & (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
    let arg = CreateGuestMemfd {
        size,
        flags,
        reserved: [0; 6],
    };
    // SAFETY: KVM_CREATE_GUEST_MEMFD reads one `kvm_create_guest_memfd` (layout above, size
    // checked by the ioctl number), live for the call; it returns a new fd or -1.
    let fd = unsafe { libc::ioctl(vm_fd.as_raw_fd(), KVM_CREATE_GUEST_MEMFD as _, &arg) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd from the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `KVM_SET_MEMORY_ATTRIBUTES`: `[gpa, gpa + size)` private or shared.
pub fn set_memory_attributes(
    vm_fd: BorrowedFd<'_>,
    gpa: u64,
    size: u64,
    private: bool,
) -> io::Result<()> {
    let arg = MemoryAttributes {
        address: gpa,
        size,
        attributes: if private {
            KVM_MEMORY_ATTRIBUTE_PRIVATE
        } else {
            0
        },
        flags: 0,
    };
    // SAFETY: KVM_SET_MEMORY_ATTRIBUTES reads one `kvm_memory_attributes` (layout above).
    let rc = unsafe { libc::ioctl(vm_fd.as_raw_fd(), KVM_SET_MEMORY_ATTRIBUTES as _, &arg) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
