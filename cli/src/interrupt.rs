//! SIGTERM and SIGINT during `vmpager demo` (and `vmpager migrate`): whatever the demo is doing
//! (writing its image, waiting for the daemon, running vCPUs), it stops the vmpagerds it started, removes its work
//! directory and exits with status 128 + the signal's number.
//!
//! The signals are blocked in every thread and read from a signalfd by a thread of their own,
//! which does the cleanup with ordinary code (nothing runs in a signal handler). What there is
//! to clean up is registered under a lock that the cleanup takes and never gives back: the
//! demo cannot register a directory or a daemon the cleanup has already missed, and it does its
//! own final cleanup under that lock too, so a demo that fails because the signal thread
//! stopped its daemon waits there for the exit with the signal's status. The process then
//! exits, which ends every other thread, vCPU threads included (a vCPU thread waiting for a
//! fault the stopped daemon will not serve is killable).

use anyhow::Context;
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal, WaitOptions};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// How long a stopped vmpagerd may take to exit on SIGTERM before it is killed.
const DAEMON_EXIT_TIMEOUT: Timespec = Timespec {
    tv_sec: 5,
    tv_nsec: 0,
};

/// What an interrupted demo leaves behind unless it is cleaned up.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// The work directory (snapshot image, daemon socket).
    pub dir: Option<PathBuf>,
    /// The vmpagerd child processes.
    pub daemons: Vec<u32>,
}

/// Cleanup on SIGTERM and SIGINT; see the module documentation.
#[derive(Clone)]
pub struct Interrupts {
    leftovers: Arc<Mutex<Leftovers>>,
}

impl Interrupts {
    /// Blocks SIGTERM and SIGINT in this thread, and so in every thread it starts afterwards
    /// (call it before starting any), and starts the thread that handles them.
    pub fn install() -> anyhow::Result<Interrupts> {
        let signals = vmpagerd::signals::shutdown_fd().context("cannot block SIGTERM/SIGINT")?;
        let leftovers = Arc::new(Mutex::new(Leftovers::default()));
        let shared = leftovers.clone();
        std::thread::Builder::new()
            .name("vmpager-signals".into())
            .spawn(move || handle(&signals, &shared))
            .context("cannot start the signal thread")?;
        Ok(Interrupts { leftovers })
    }

    /// Runs `f` with the leftovers locked: register there what `f` creates.
    pub fn register<R>(&self, f: impl FnOnce(&mut Leftovers) -> R) -> R {
        f(&mut lock(&self.leftovers))
    }

    /// Cleans up as for a signal and exits with `status` (the demo failed from another thread).
    pub fn exit_now(&self, status: i32) -> ! {
        let left = lock(&self.leftovers);
        let _ = clean_up(&left);
        std::process::exit(status);
    }
}

/// Stops the daemons and removes the directory registered in `left`; says what it did.
fn clean_up(left: &Leftovers) -> Vec<String> {
    let mut done = Vec::new();
    for &pid in &left.daemons {
        stop_daemon(pid);
        done.push(format!("stopped vmpagerd (pid {pid})"));
    }
    if let Some(dir) = &left.dir {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => done.push(format!("removed {}", dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("vmpager: cannot remove {}: {e}", dir.display()),
        }
    }
    done
}

fn lock(m: &Mutex<Leftovers>) -> MutexGuard<'_, Leftovers> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits for SIGTERM or SIGINT, cleans up and exits.
fn handle(signals: &OwnedFd, leftovers: &Mutex<Leftovers>) {
    let signo = loop {
        let mut fds = [PollFd::new(signals, PollFlags::IN)];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot wait for signals");
                return;
            }
        }
        // struct signalfd_siginfo: 128 bytes, ssi_signo (u32) first.
        let mut info = [0u8; 128];
        match rustix::io::read(signals, &mut info) {
            Ok(128) => break u32::from_ne_bytes([info[0], info[1], info[2], info[3]]),
            Ok(_) | Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the signalfd");
                return;
            }
        }
    };
    // Held until the process exits: nothing new is registered after this point.
    let left = lock(leftovers);
    let name = if signo == Signal::INT.as_raw() as u32 {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    let done = clean_up(&left);
    if done.is_empty() {
        eprintln!("vmpager: {name}");
    } else {
        eprintln!("vmpager: {name}: {}", done.join(", "));
    }
    std::process::exit(128 + signo as i32);
}

/// SIGTERM (and SIGCONT, should it be stopped) to the daemon, SIGKILL if it has not exited
/// within [`DAEMON_EXIT_TIMEOUT`]; then reaps it.
fn stop_daemon(pid: u32) {
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return;
    };
    let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok();
    let _ = rustix::process::kill_process(pid, Signal::TERM);
    let _ = rustix::process::kill_process(pid, Signal::CONT);
    let exited = pidfd.as_ref().is_some_and(|fd| {
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        matches!(rustix::event::poll(&mut fds, Some(&DAEMON_EXIT_TIMEOUT)), Ok(n) if n > 0)
    });
    if !exited {
        let _ = rustix::process::kill_process(pid, Signal::KILL);
    }
    let _ = rustix::process::waitpid(Some(pid), WaitOptions::empty());
}
