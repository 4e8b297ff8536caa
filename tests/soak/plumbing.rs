//! The rig's plumbing: what its processes tell it, how it waits for them and kills them.

use super::rig::HANG;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::process::{Child, ExitStatus};
use std::sync::mpsc::Sender;

/// What the rig hears, in one channel.
pub enum Event {
    /// A line a VMM printed.
    Line { slot: usize, gen: u64, line: String },
    /// Its stdout closed: it exited.
    Eof { slot: usize, gen: u64 },
    /// A datagram on the notify socket and the pid that sent it.
    Notify { pid: u32, text: String },
}

/// Waits for `child` to exit (a pidfd, so no polling); `None` if it has not within [`HANG`].
pub fn wait_exit(child: &mut Child) -> Option<ExitStatus> {
    let pid = rustix::process::Pid::from_raw(child.id() as i32)?;
    if let Ok(fd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        let t = rustix::event::Timespec {
            tv_sec: HANG.as_secs() as i64,
            tv_nsec: 0,
        };
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        loop {
            match rustix::event::poll(&mut fds, Some(&t)) {
                Ok(0) => return None,
                Err(rustix::io::Errno::INTR) => continue,
                _ => break,
            }
        }
    }
    child.wait().ok()
}

pub fn sigkill(pid: u32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
}

/// The number in `STATUS=serving N VMs`.
pub fn vms_in_status(text: &str) -> Option<i64> {
    let status = text
        .lines()
        .find_map(|l| l.strip_prefix("STATUS=serving "))?;
    status.split_whitespace().next()?.parse().ok()
}

/// The value of `key=` in a `done` line.
pub fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Receives the notify socket's datagrams with their sender's pid (`SCM_CREDENTIALS`), so a
/// killed daemon's last words are never taken for its successor's.
pub fn read_notifications(socket: OwnedFd, tx: Sender<Event>) {
    let mut buf = [0u8; 4096];
    loop {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
        let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let got = rustix::net::recvmsg(
            &socket,
            &mut iov,
            &mut control,
            rustix::net::RecvFlags::empty(),
        );
        let n = match got {
            Ok(m) if m.bytes > 0 => m.bytes,
            Err(rustix::io::Errno::INTR) => continue,
            _ => return, // Shut down: the rig is gone.
        };
        let pid = control.drain().find_map(|m| match m {
            rustix::net::RecvAncillaryMessage::ScmCredentials(c) => {
                Some(c.pid.as_raw_nonzero().get() as u32)
            }
            _ => None,
        });
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if tx
            .send(Event::Notify {
                pid: pid.unwrap_or(0),
                text,
            })
            .is_err()
        {
            return;
        }
    }
}

/// splitmix64, the rig's reproducible randomness.
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
