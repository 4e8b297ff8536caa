//! The mailbox round trip (VMM request → daemon answer → VMM sees it) between two threads over
//! the shared-memory channel of `vmpager_protocol::mailbox`, in its waiting modes. The "daemon"
//! thread runs on CPU 0, the "vCPU" thread on CPU 1.

use crate::row::{histogram, record};
use hdrhistogram::Histogram;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmpager_protocol::mailbox::*;

/// How the two sides wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailboxMode {
    /// The daemon busy-polls the slots; the vCPU spins for its answer.
    Spinning,
    /// The daemon drains and sleeps on the doorbell (its default); the vCPU spins, then sleeps.
    DaemonSleeps,
    /// Both sides sleep at once: a futex and a doorbell per exchange.
    BothSleep,
}

/// `n` round trips (after `n / 10` warm-up ones) in `mode`.
pub fn mailbox_rtt(n: usize, mode: MailboxMode) -> Histogram<u64> {
    let (mb, fd) = Mailbox::create(1).expect("mailbox");
    let daemon_mb = Arc::new(mb);
    let vmm_mb = Arc::new(Mailbox::map(fd.as_fd()).expect("map mailbox"));
    let doorbell =
        Arc::new(rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).expect("eventfd"));
    let (alive, _peer) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .expect("socketpair");
    let stop = Arc::new(AtomicBool::new(false));
    let daemon_sleeps = mode != MailboxMode::Spinning;
    let daemon = {
        let (mb, bell, stop) = (daemon_mb.clone(), doorbell.clone(), stop.clone());
        std::thread::spawn(move || {
            crate::touch::pin(0);
            let mut c = Consumer::new(mb);
            let mut answer = |_: u32, _: Result<Request, u32>| Response {
                status: Status::Retry,
                code: 0,
                ret: 0,
            };
            let mut buf = [0u8; 8];
            while !stop.load(Ordering::Relaxed) {
                if daemon_sleeps {
                    c.drain(&mut answer);
                    let _ = rustix::io::read(&*bell, &mut buf);
                } else {
                    c.poll(&mut answer);
                    std::hint::spin_loop();
                }
            }
        })
    };
    let policy = WaitPolicy {
        spin_for: if mode == MailboxMode::BothSleep {
            Duration::ZERO
        } else {
            WaitPolicy::DEFAULT_SPIN
        },
        liveness_check: Duration::from_millis(100),
    };
    let mut ch = VcpuChannel::new(vmm_mb, 0, doorbell.clone(), Arc::new(alive), policy)
        .expect("vcpu channel");
    let req = Request {
        kind: RequestKind::MemoryFault,
        gpa: 0x1000,
        size: 4096,
        private: true,
    };
    let h = crate::touch::on_cpu(1, || {
        let mut h = histogram();
        for i in 0..n + n / 10 {
            let t = Instant::now();
            ch.exchange(req).expect("exchange");
            if i >= n / 10 {
                record(&mut h, t.elapsed());
            }
        }
        h
    });
    stop.store(true, Ordering::Relaxed);
    let _ = rustix::io::write(&*doorbell, &1u64.to_ne_bytes());
    daemon.join().expect("mailbox daemon thread");
    h
}
