//! Mailbox round trip (VMM request → daemon answer → VMM sees it), two threads of one process
//! over the shared-memory channel, side by side with an eventfd ping-pong in the same run:
//! - daemon busy-polling the slots, VMM spinning;
//! - daemon sleeping on the doorbell between requests (the default), VMM spinning then sleeping;
//! - eventfd round trip between two blocking threads (the wakeup floor).
//!
//! Reports p50/p99 over N round trips; asserts nothing. `cargo bench --bench mailbox`.

use hdrhistogram::Histogram;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmpager_protocol::mailbox::*;

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("histogram")
}

fn report(name: &str, h: &Histogram<u64>, base: Option<f64>) -> f64 {
    let p50 = h.value_at_quantile(0.5) as f64 / 1e3;
    let ratio = base
        .map(|b| format!("{:.3}", p50 / b))
        .unwrap_or_else(|| "-".into());
    println!(
        "{name:<58} {:>9.2} {:>9.2} {:>9.2} {:>8}",
        p50,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.value_at_quantile(0.999) as f64 / 1e3,
        ratio
    );
    p50
}

fn eventfd() -> OwnedFd {
    rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).expect("eventfd")
}

fn mailbox_rtt(n: usize, daemon_sleeps: bool, vmm_spins: bool) -> Histogram<u64> {
    let (mb, fd) = Mailbox::create(1).expect("mailbox");
    let daemon_mb = Arc::new(mb);
    let vmm_mb = Arc::new(Mailbox::map(fd.as_fd()).expect("map"));
    let doorbell = Arc::new(eventfd());
    let (alive, _peer) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .expect("socketpair");
    let stop = Arc::new(AtomicBool::new(false));
    let daemon = {
        let (mb, bell, stop) = (daemon_mb.clone(), doorbell.clone(), stop.clone());
        std::thread::spawn(move || {
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
        spin: vmm_spins,
        liveness_check: Duration::from_millis(100),
    };
    let mut ch =
        VcpuChannel::new(vmm_mb, 0, doorbell.clone(), Arc::new(alive), policy).expect("channel");
    let req = Request {
        kind: RequestKind::MemoryFault,
        gpa: 0x1000,
        size: 4096,
        private: true,
    };
    let mut h = hist();
    for i in 0..n + n / 10 {
        let t = Instant::now();
        ch.exchange(req).expect("exchange");
        if i >= n / 10 {
            h.saturating_record(t.elapsed().as_nanos() as u64);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = rustix::io::write(&*doorbell, &1u64.to_ne_bytes());
    daemon.join().expect("daemon thread");
    h
}

fn eventfd_rtt(n: usize) -> Histogram<u64> {
    let (ping, pong) = (Arc::new(eventfd()), Arc::new(eventfd()));
    let peer = {
        let (ping, pong) = (ping.clone(), pong.clone());
        std::thread::spawn(move || {
            let mut b = [0u8; 8];
            loop {
                if rustix::io::read(&*ping, &mut b).is_err() || u64::from_ne_bytes(b) > 1 {
                    return;
                }
                let _ = rustix::io::write(&*pong, &1u64.to_ne_bytes());
            }
        })
    };
    let mut h = hist();
    let mut b = [0u8; 8];
    for i in 0..n + n / 10 {
        let t = Instant::now();
        let _ = rustix::io::write(&*ping, &1u64.to_ne_bytes());
        let _ = rustix::io::read(&*pong, &mut b);
        if i >= n / 10 {
            h.saturating_record(t.elapsed().as_nanos() as u64);
        }
    }
    let _ = rustix::io::write(&*ping, &2u64.to_ne_bytes());
    peer.join().expect("peer");
    h
}

fn main() {
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    println!("mailbox round trip, {n} exchanges per row, two threads (this host: 2 CPUs)");
    println!(
        "{:<58} {:>9} {:>9} {:>9} {:>8}",
        "path", "p50 us", "p99 us", "p99.9 us", "vs efd"
    );
    let efd = eventfd_rtt(n);
    let base = report("eventfd ping-pong, both blocking (baseline)", &efd, None);
    report(
        "mailbox: daemon busy-polls, vCPU spins",
        &mailbox_rtt(n, false, true),
        Some(base),
    );
    report(
        "mailbox: daemon sleeps on doorbell, vCPU spins then sleeps",
        &mailbox_rtt(n, true, true),
        Some(base),
    );
    report(
        "mailbox: daemon sleeps on doorbell, vCPU sleeps at once",
        &mailbox_rtt(n / 4, true, false),
        Some(base),
    );
}
