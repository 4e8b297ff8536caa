//! The mailbox channel under concurrency, across processes, and when a peer dies mid-exchange.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmpager_protocol::mailbox::*;

fn eventfd() -> OwnedFd {
    rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap()
}

/// The answer the test daemon gives: derived from the request so the VMM can check it got the
/// answer to *its* request.
fn answer_for(slot: u32, r: Result<Request, u32>) -> Response {
    match r {
        Ok(r) => Response {
            status: if r.private {
                Status::Retry
            } else {
                Status::Denied
            },
            code: slot,
            ret: r.gpa ^ r.size.rotate_left(17) ^ r.kind as u64,
        },
        Err(kind) => Response {
            status: Status::Fatal,
            code: kind,
            ret: 0,
        },
    }
}

/// Serves `mailbox` until `stop` is set: drain, then sleep on the doorbell.
fn serve(mailbox: Arc<Mailbox>, doorbell: &OwnedFd, stop: &std::sync::atomic::AtomicBool) -> usize {
    let mut consumer = Consumer::new(mailbox);
    let mut served = 0;
    let mut buf = [0u8; 8];
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        served += consumer.drain(&mut answer_for);
        let _ = rustix::io::read(doorbell, &mut buf);
    }
    served
}

fn exchange_many(ch: &mut VcpuChannel, slot: u32, n: u64) {
    for i in 0..n {
        let req = Request {
            kind: if i % 3 == 0 {
                RequestKind::MapGpaRange
            } else {
                RequestKind::MemoryFault
            },
            gpa: (u64::from(slot) << 40) | (i << 12),
            size: 4096 << (i % 5),
            private: i % 2 == 0,
        };
        let resp = ch.exchange(req).unwrap();
        assert_eq!(resp, answer_for(slot, Ok(req)), "slot {slot} exchange {i}");
    }
}

#[test]
fn layout_is_checked_when_mapping() {
    let (_mb, fd) = Mailbox::create(4).unwrap();
    let mapped = Mailbox::map(fd.as_fd()).unwrap();
    assert_eq!(mapped.slots(), 4);
    assert!(mapped.slot(4).is_none());
    // A memfd of the wrong size or with garbage in it is refused.
    let junk = rustix::fs::memfd_create("junk", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&junk, (HEADER_SIZE + 2 * SLOT_SIZE) as u64).unwrap();
    assert!(matches!(
        Mailbox::map(junk.as_fd()),
        Err(MailboxError::BadLayout)
    ));
    rustix::fs::ftruncate(&junk, 100).unwrap();
    assert!(matches!(
        Mailbox::map(junk.as_fd()),
        Err(MailboxError::BadLayout)
    ));
    assert!(Mailbox::create(0).is_err());
    assert!(Mailbox::create(MAX_SLOTS + 1).is_err());
}

/// Many vCPU threads, one daemon thread that sleeps on the doorbell between bursts; with and
/// without spinning (without, every exchange takes the futex path).
#[test]
fn many_vcpus_one_daemon_no_lost_wakeups() {
    for spin_for in [WaitPolicy::DEFAULT_SPIN, Duration::ZERO] {
        let vcpus = 8;
        let (mb, fd) = Mailbox::create(vcpus).unwrap();
        let daemon_mb = Arc::new(mb);
        let vmm_mb = Arc::new(Mailbox::map(fd.as_fd()).unwrap());
        let doorbell = Arc::new(eventfd());
        let (alive, _keep) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let alive = Arc::new(alive);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let daemon = s.spawn(|| serve(daemon_mb.clone(), &doorbell, &stop));
            let vcpu_threads: Vec<_> = (0..vcpus)
                .map(|i| {
                    let mut ch = VcpuChannel::new(
                        vmm_mb.clone(),
                        i,
                        doorbell.clone(),
                        alive.clone(),
                        WaitPolicy {
                            spin_for,
                            liveness_check: Duration::from_millis(50),
                        },
                    )
                    .unwrap();
                    s.spawn(move || exchange_many(&mut ch, i, 2000))
                })
                .collect();
            for t in vcpu_threads {
                t.join().unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Release);
            rustix::io::write(&*doorbell, &1u64.to_ne_bytes()).unwrap();
            assert_eq!(daemon.join().unwrap(), 8 * 2000);
        });
    }
}

#[test]
fn unknown_request_kinds_are_answered_fatal_not_trusted() {
    let (mb, fd) = Mailbox::create(1).unwrap();
    let vmm = Mailbox::map(fd.as_fd()).unwrap();
    // A buggy or hostile VMM writes a kind that does not exist: the daemon answers Fatal with
    // the kind, and never interprets the fields.
    let slot = vmm.slot(0).unwrap();
    let raw = slot as *const Slot as *const std::sync::atomic::AtomicU32;
    // SAFETY: offsets 8 (kind) and 0 (req_seq) of a slot are AtomicU32 fields (layout above).
    unsafe {
        (*raw.add(2)).store(77, std::sync::atomic::Ordering::Relaxed);
        (*raw.add(0)).store(5, std::sync::atomic::Ordering::Release);
    }
    let mut consumer = Consumer::new(Arc::new(mb));
    let mut seen = Vec::new();
    assert_eq!(
        consumer.poll(&mut |i, r| {
            seen.push((i, r));
            answer_for(i, r)
        }),
        1
    );
    assert_eq!(seen, vec![(0, Err(77))]);
    assert_eq!(consumer.poll(&mut answer_for), 0, "answered once");
}

const CHILD_ENV: &str = "VMPAGER_MAILBOX_CHILD";

/// Entry point of the daemon side when this test binary runs as a child process.
#[test]
fn child_daemon_entry() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut it = spec.split(',').map(|v| v.parse::<i64>().unwrap());
    let (mb_fd, bell_fd, serve_count) =
        (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    // SAFETY: the parent passed these fds open (without CLOEXEC) for this process to own.
    let (mb_fd, bell) = unsafe {
        (
            OwnedFd::from_raw_fd(mb_fd as i32),
            OwnedFd::from_raw_fd(bell_fd as i32),
        )
    };
    let mut consumer = Consumer::new(Arc::new(Mailbox::map(mb_fd.as_fd()).unwrap()));
    let mut served = 0i64;
    let mut buf = [0u8; 8];
    loop {
        consumer.drain(&mut |i, r| {
            // Die before answering request number `serve_count` (mid-exchange): the VMM must
            // notice within bounded time.
            if serve_count >= 0 && served >= serve_count {
                std::process::exit(0);
            }
            served += 1;
            answer_for(i, r)
        });
        let _ = rustix::io::read(&bell, &mut buf);
    }
}

fn spawn_child_daemon(
    mailbox: &OwnedFd,
    doorbell: &OwnedFd,
    serve_count: i64,
    liveness: OwnedFd,
) -> std::process::Child {
    let fds = [
        mailbox.as_raw_fd(),
        doorbell.as_raw_fd(),
        liveness.as_raw_fd(),
    ];
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_daemon_entry",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env(CHILD_ENV, format!("{},{},{}", fds[0], fds[1], serve_count))
    .stdout(std::process::Stdio::null());
    // SAFETY: between fork and exec only fcntl (async-signal-safe) on fds the parent holds open.
    unsafe {
        cmd.pre_exec(move || {
            for fd in fds {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(liveness);
    child
}

#[test]
fn daemon_in_another_process() {
    let vcpus = 4;
    let (mb, fd) = Mailbox::create(vcpus).unwrap();
    drop(mb);
    let vmm_mb = Arc::new(Mailbox::map(fd.as_fd()).unwrap());
    let doorbell = eventfd();
    let (ours, theirs) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    let mut child = spawn_child_daemon(&fd, &doorbell, -1, theirs);
    let (doorbell, ours) = (Arc::new(doorbell), Arc::new(ours));
    std::thread::scope(|s| {
        for i in 0..vcpus {
            let mut ch = VcpuChannel::new(
                vmm_mb.clone(),
                i,
                doorbell.clone(),
                ours.clone(),
                WaitPolicy::default(),
            )
            .unwrap();
            s.spawn(move || exchange_many(&mut ch, i, 3000));
        }
    });
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn daemon_dying_mid_exchange_is_reported_not_waited_for() {
    let (mb, fd) = Mailbox::create(2).unwrap();
    drop(mb);
    let vmm_mb = Arc::new(Mailbox::map(fd.as_fd()).unwrap());
    let doorbell = eventfd();
    let (ours, theirs) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    // The child answers 10 requests, then exits while the 11th waits.
    let mut child = spawn_child_daemon(&fd, &doorbell, 10, theirs);
    let mut ch = VcpuChannel::new(
        vmm_mb,
        1,
        Arc::new(doorbell),
        Arc::new(ours),
        WaitPolicy {
            spin_for: WaitPolicy::DEFAULT_SPIN,
            liveness_check: Duration::from_millis(20),
        },
    )
    .unwrap();
    exchange_many(&mut ch, 1, 10);
    let started = Instant::now();
    let err = ch
        .exchange(Request {
            kind: RequestKind::MemoryFault,
            gpa: 0x1000,
            size: 4096,
            private: true,
        })
        .unwrap_err();
    eprintln!("peer death noticed after {:?}", started.elapsed());
    assert!(err.peer_gone(), "{err:?}");
    child.wait().unwrap();
}
