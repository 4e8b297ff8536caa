//! Round trips between two threads through the kernel: the floor any cross-thread hand-off pays
//! on this host (a wakeup on the other CPU). The two threads are pinned to CPUs 0 and 1 (the
//! scheduler would otherwise sometimes put both on one CPU, and the wakeup would be local).

use crate::row::{histogram, record};
use hdrhistogram::Histogram;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

fn eventfd() -> OwnedFd {
    rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).expect("eventfd")
}

/// `n` eventfd ping-pongs between two blocking threads (after `n / 10` warm-up ones).
pub fn eventfd_rtt(n: usize) -> Histogram<u64> {
    let (ping, pong) = (Arc::new(eventfd()), Arc::new(eventfd()));
    let peer = {
        let (ping, pong) = (ping.clone(), pong.clone());
        std::thread::spawn(move || {
            crate::touch::pin(0);
            let mut b = [0u8; 8];
            loop {
                if rustix::io::read(&*ping, &mut b).is_err() || u64::from_ne_bytes(b) > 1 {
                    return;
                }
                let _ = rustix::io::write(&*pong, &1u64.to_ne_bytes());
            }
        })
    };
    let h = crate::touch::on_cpu(1, || {
        let mut h = histogram();
        let mut b = [0u8; 8];
        for i in 0..n + n / 10 {
            let t = Instant::now();
            let _ = rustix::io::write(&*ping, &1u64.to_ne_bytes());
            let _ = rustix::io::read(&*pong, &mut b);
            if i >= n / 10 {
                record(&mut h, t.elapsed());
            }
        }
        h
    });
    let _ = rustix::io::write(&*ping, &2u64.to_ne_bytes());
    peer.join().expect("eventfd peer");
    h
}

/// `n` request/reply round trips of a 24-byte message (a protocol header) over a Unix
/// `SOCK_SEQPACKET` pair between two blocking threads.
pub fn unix_socket_rtt(n: usize) -> Histogram<u64> {
    let (a, b) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .expect("socketpair");
    let peer = std::thread::spawn(move || {
        crate::touch::pin(0);
        let mut buf = [0u8; 64];
        while let Ok(n) = rustix::io::read(&b, &mut buf) {
            if n == 0 || rustix::io::write(&b, &buf[..n]).is_err() {
                return;
            }
        }
    });
    let h = crate::touch::on_cpu(1, || {
        let msg = [7u8; 24];
        let mut buf = [0u8; 64];
        let mut h = histogram();
        for i in 0..n + n / 10 {
            let t = Instant::now();
            let _ = rustix::io::write(&a, &msg);
            let _ = rustix::io::read(&a, &mut buf);
            if i >= n / 10 {
                record(&mut h, t.elapsed());
            }
        }
        h
    });
    drop(a);
    peer.join().expect("socket peer");
    h
}
