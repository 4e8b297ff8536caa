//! A quick, clean exit on SIGTERM/SIGINT: the signals become readable on a signalfd that the
//! program polls with everything else.

use std::os::fd::{FromRawFd, OwnedFd};

/// Blocks SIGTERM/SIGINT in this thread and every thread it starts later, and returns a
/// signalfd that becomes readable on them. Call it before starting any thread.
pub fn shutdown_fd() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before any use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t; these calls only write it.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    // SAFETY: pthread_sigmask only reads `set`, initialised above, and changes this thread's
    // mask (callers start their threads after, so those inherit it); the old mask is not
    // requested.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: signalfd(-1, ...) creates a new fd from an initialised set; no memory is retained.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
