//! Integration tests of `vmpager_client::peers::firecracker` (Firecracker's side of the UFFD
//! handler protocol), driven by a tiny in-test handler thread that serves the uffd's faults
//! from a test-made image. The real handler (`vmpager firecracker-handler`) is tested elsewhere.
#![cfg(feature = "refvmm")]

use std::collections::HashSet;
use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use userfaultfd::{Event, Uffd};
use vmpager_client::peers::firecracker::{FirecrackerRegion, FirecrackerVm, Handshake, PeerError};
use vmpager_compat::firecracker::{
    self as fc, GuestRegionUffdMapping, HandshakeError, PAGE_2M, PAGE_4K,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// How long a test waits for a note from its handler before failing instead of hanging.
const WAIT: Duration = Duration::from_secs(60);

/// A private directory holding the socket and the memory file; removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmpager-fcpeer-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        Scratch(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("handler.sock")
    }

    fn listen(&self) -> UnixListener {
        UnixListener::bind(self.socket()).expect("bind the handler socket")
    }

    fn file(&self, name: &str, contents: &[u8]) -> File {
        let path = self.0.join(name);
        let mut f = File::create(&path).expect("create the memory file");
        f.write_all(contents).expect("write the memory file");
        File::open(&path).expect("reopen the memory file")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pseudo-random bytes (xorshift64), no zero words in practice.
fn image(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len as usize + 8);
    while (out.len() as u64) < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len as usize);
    out
}

fn le_word(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
}

fn regions_4k(sizes: &[u64]) -> Vec<FirecrackerRegion> {
    sizes
        .iter()
        .map(|&size| FirecrackerRegion {
            size,
            page_size: PAGE_4K,
        })
        .collect()
}

/// What the test handler saw.
#[derive(Debug, PartialEq, Eq)]
enum Note {
    Handshake(Vec<GuestRegionUffdMapping>),
    Remove { start: u64, end: u64 },
}

/// The in-test page-fault handler: accepts one connection, receives the handshake, then serves
/// page faults from `image` (zero past its end, zero for pages removed by a REMOVE event)
/// until the VM closes the socket. Returns the number of faults it resolved.
struct TestHandler {
    notes: mpsc::Receiver<Note>,
    join: JoinHandle<u64>,
}

impl TestHandler {
    fn spawn(listener: UnixListener, image: Vec<u8>) -> TestHandler {
        let (tx, notes) = mpsc::channel();
        let join = std::thread::spawn(move || match handle(&listener, &image, &tx) {
            Ok(served) => served,
            Err(e) => {
                // A fault nobody serves would block the test forever: fail loudly instead.
                eprintln!("test handler failed: {e}; aborting");
                std::process::abort();
            }
        });
        TestHandler { notes, join }
    }

    fn note(&self) -> Note {
        self.notes
            .recv_timeout(WAIT)
            .expect("a note from the handler")
    }

    /// Waits for the handler to see the socket close (the VM must have been dropped).
    fn finish(self) -> u64 {
        self.join.join().expect("the handler thread")
    }
}

fn handle(
    listener: &UnixListener,
    image: &[u8],
    notes: &mpsc::Sender<Note>,
) -> Result<u64, String> {
    let (conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    let handshake = fc::recv_handshake(conn.as_fd(), Instant::now() + WAIT)
        .map_err(|e| format!("handshake: {e}"))?;
    let regions = handshake.regions;
    let _ = notes.send(Note::Handshake(regions.clone()));
    // SAFETY: the fd is the userfaultfd just received and owned by nobody else; `Uffd` takes
    // over its ownership and closes it on drop.
    let uffd = unsafe { Uffd::from_raw_fd(handshake.uffd.into_raw_fd()) };

    let mut removed: HashSet<u64> = HashSet::new();
    let mut page = vec![0u8; PAGE_2M as usize];
    let mut served = 0u64;
    loop {
        let mut fds = [
            PollFd::new(&uffd, PollFlags::IN),
            PollFd::new(&conn, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        let (uffd_ready, conn_ready) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
        if uffd_ready {
            while let Some(event) = uffd.read_event().map_err(|e| format!("read_event: {e}"))? {
                match event {
                    Event::Pagefault { addr, .. } => {
                        let addr = addr as u64;
                        let r = regions
                            .iter()
                            .find(|r| {
                                addr >= r.base_host_virt_addr
                                    && addr < r.base_host_virt_addr + r.size
                            })
                            .ok_or_else(|| format!("fault at {addr:#x} outside every region"))?;
                        let ps = r.page_size;
                        let page_addr = addr & !(ps - 1);
                        let dst = page_addr as *mut libc::c_void;
                        let buf = &mut page[..ps as usize];
                        if removed.contains(&page_addr) {
                            buf.fill(0);
                        } else {
                            let start = (r.offset + page_addr - r.base_host_virt_addr) as usize;
                            let from = image.get(start..).unwrap_or_default();
                            let n = from.len().min(buf.len());
                            buf[..n].copy_from_slice(&from[..n]);
                            buf[n..].fill(0);
                        }
                        let result = if removed.contains(&page_addr) && ps == PAGE_4K {
                            // SAFETY: `dst` is a whole page inside a region registered on
                            // this uffd (the VM keeps it mapped while it can fault).
                            unsafe { uffd.zeropage(dst, ps as usize, true) }.map(|_| ())
                        } else {
                            // SAFETY: `buf` holds `ps` readable bytes; `dst` is a whole page
                            // inside a region registered on this uffd.
                            unsafe { uffd.copy(buf.as_ptr().cast(), dst, ps as usize, true) }
                                .map(|_| ())
                        };
                        match result {
                            Ok(()) => served += 1,
                            // Another fault on the same (huge) page was served first, or the
                            // mm was changing: wake the thread, it refaults if it must.
                            Err(userfaultfd::Error::CopyFailed(e))
                            | Err(userfaultfd::Error::ZeropageFailed(e))
                                if e as i32 == libc::EEXIST || e as i32 == libc::EAGAIN =>
                            {
                                uffd.wake(dst, ps as usize)
                                    .map_err(|e| format!("wake: {e}"))?;
                            }
                            Err(userfaultfd::Error::PartiallyCopied(_)) => {
                                uffd.wake(dst, ps as usize)
                                    .map_err(|e| format!("wake: {e}"))?;
                            }
                            Err(e) => return Err(format!("resolving {page_addr:#x}: {e}")),
                        }
                    }
                    Event::Remove { start, end } => {
                        let (start, end) = (start as u64, end as u64);
                        let ps = regions
                            .iter()
                            .find(|r| {
                                start >= r.base_host_virt_addr
                                    && start < r.base_host_virt_addr + r.size
                            })
                            .map_or(PAGE_4K, |r| r.page_size);
                        removed.extend((start..end).step_by(ps as usize));
                        let _ = notes.send(Note::Remove { start, end });
                    }
                    other => return Err(format!("unexpected uffd event {other:?}")),
                }
            }
        }
        if conn_ready {
            let mut byte = [0u8; 1];
            return match (&conn).read(&mut byte) {
                Ok(0) => Ok(served),
                Ok(_) => Err("the VM wrote to the socket after the handshake".into()),
                Err(e) => Err(format!("reading the socket: {e}")),
            };
        }
    }
}

/// Receives exactly `len` bytes, collecting every fd that comes with them.
fn recv_exact_with_fds(sock: &UnixStream, len: usize) -> (Vec<u8>, Vec<OwnedFd>) {
    let mut data = vec![0u8; len];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < len {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut data[got..])];
        let msg = rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)
            .expect("recvmsg");
        assert_ne!(msg.bytes, 0, "the peer closed after {got} of {len} bytes");
        got += msg.bytes;
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                fds.extend(received);
            }
        }
    }
    (data, fds)
}

fn is_userfaultfd(fd: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|target| target == Path::new("anon_inode:[userfaultfd]"))
}

/// While the VM lives, nothing more arrives and the socket stays open; once it is dropped, the
/// handler's end reads end-of-stream.
fn assert_open_until_dropped(conn: &UnixStream, vm: FirecrackerVm) {
    conn.set_nonblocking(true).expect("non-blocking");
    let mut byte = [0u8; 1];
    let e = (&*conn).read(&mut byte).expect_err("nothing more is sent");
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    drop(vm);
    conn.set_nonblocking(false).expect("blocking");
    assert_eq!((&*conn).read(&mut byte).expect("read after drop"), 0);
}

#[test]
fn handshake_is_firecrackers_json_with_the_uffd() {
    let scratch = Scratch::new();
    let listener = scratch.listen();
    let sizes = [64 * KIB, 2 * MIB, 12 * KIB];
    // The listener's backlog takes the connection, so restore returns before any accept.
    let vm = FirecrackerVm::restore(&scratch.socket(), &regions_4k(&sizes)).expect("restore");
    let (conn, _) = listener.accept().expect("accept");

    let expected: Vec<GuestRegionUffdMapping> = vm
        .regions()
        .iter()
        .map(|r| GuestRegionUffdMapping {
            base_host_virt_addr: r.host_addr().as_ptr() as u64,
            size: r.size(),
            offset: r.file_offset(),
            page_size: r.page_size(),
            page_size_kib: Some(r.page_size()),
        })
        .collect();
    let json = fc::encode_handshake(&expected);
    let (bytes, fds) = recv_exact_with_fds(&conn, json.len());
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        String::from_utf8_lossy(&json)
    );
    assert!(String::from_utf8_lossy(&bytes).contains("\"page_size\":4096,\"page_size_kib\":4096"));
    assert_eq!(fds.len(), 1, "exactly one fd");
    assert!(is_userfaultfd(&fds[0]), "the fd is a userfaultfd");

    let parsed = fc::parse_handshake(&bytes).expect("parses");
    let offsets: Vec<u64> = parsed.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [0, 64 * KIB, 64 * KIB + 2 * MIB]);
    for (r, size) in parsed.iter().zip(sizes) {
        assert_eq!(r.size, size);
        assert_eq!(r.page_size, PAGE_4K);
        assert_eq!(r.page_size_kib, Some(r.page_size));
    }
    assert_open_until_dropped(&conn, vm);
}

#[test]
fn raw_and_nofd_handshakes_arrive_as_sent() {
    let scratch = Scratch::new();
    let listener = scratch.listen();
    let regions = regions_4k(&[MIB]);

    let raw = b"[{\"base_host_virt_addr\": oops".to_vec();
    let vm = FirecrackerVm::restore_with(&scratch.socket(), &regions, Handshake::Raw(raw.clone()))
        .expect("restore with raw bytes");
    let (conn, _) = listener.accept().expect("accept");
    let (bytes, fds) = recv_exact_with_fds(&conn, raw.len());
    assert_eq!(bytes, raw);
    assert_eq!(fds.len(), 1);
    assert!(is_userfaultfd(&fds[0]));
    assert_open_until_dropped(&conn, vm);

    let vm = FirecrackerVm::restore_with(&scratch.socket(), &regions, Handshake::NoFd)
        .expect("restore without fd");
    let (conn, _) = listener.accept().expect("accept");
    let json = fc::encode_handshake(&[GuestRegionUffdMapping {
        base_host_virt_addr: vm.regions()[0].host_addr().as_ptr() as u64,
        size: MIB,
        offset: 0,
        page_size: PAGE_4K,
        page_size_kib: Some(PAGE_4K),
    }]);
    let (bytes, fds) = recv_exact_with_fds(&conn, json.len());
    assert_eq!(bytes, json);
    assert!(fds.is_empty(), "no fd travels");
    assert_open_until_dropped(&conn, vm);

    // What the compat handler-side parser makes of them.
    let deadline = || Instant::now() + WAIT;
    let _vm = FirecrackerVm::restore_with(&scratch.socket(), &regions, Handshake::Raw(raw))
        .expect("restore with raw bytes");
    let (conn, _) = listener.accept().expect("accept");
    let err = fc::recv_handshake(conn.as_fd(), deadline()).expect_err("malformed");
    assert!(matches!(err, HandshakeError::Json(_)), "{err:?}");
    let _vm = FirecrackerVm::restore_with(&scratch.socket(), &regions, Handshake::NoFd)
        .expect("restore without fd");
    let (conn, _) = listener.accept().expect("accept");
    let err = fc::recv_handshake(conn.as_fd(), deadline()).expect_err("no fd");
    assert!(matches!(err, HandshakeError::MissingUffd), "{err:?}");

    let err = FirecrackerVm::restore_with(&scratch.socket(), &regions, Handshake::Raw(Vec::new()))
        .expect_err("an fd needs data to travel with");
    assert!(matches!(err, PeerError::Send(_)), "{err:?}");
}

#[test]
fn restore_refuses_bad_regions_and_missing_handler() {
    let scratch = Scratch::new();
    let err = FirecrackerVm::restore(&scratch.socket(), &regions_4k(&[MIB])).expect_err("none");
    assert!(matches!(err, PeerError::Connect { .. }), "{err:?}");
    assert!(err.to_string().starts_with("Connecting"), "{err}");

    let _listener = scratch.listen();
    for (region, bad) in [(1, vec![MIB, 0]), (0, vec![MIB + 100])] {
        let err = FirecrackerVm::restore(&scratch.socket(), &regions_4k(&bad)).expect_err("bad");
        assert!(
            matches!(err, PeerError::Map { region: r, .. } if r == region),
            "{err:?}"
        );
    }
    let odd = [FirecrackerRegion {
        size: MIB,
        page_size: 8192,
    }];
    let err = FirecrackerVm::restore(&scratch.socket(), &odd).expect_err("bad page size");
    assert!(matches!(err, PeerError::Map { region: 0, .. }), "{err:?}");
}

#[test]
fn verify_against_three_regions_over_a_random_image() {
    let scratch = Scratch::new();
    let listener = scratch.listen();
    let sizes = [2 * MIB, MIB + 64 * KIB, 3 * MIB + 12 * KIB];
    let total: u64 = sizes.iter().sum();
    // The file ends inside the last page: the rest reads as zero on both sides.
    let mut img = image(total - 10_000, 0x5eed);
    let file = scratch.file("mem", &img);
    let handler = TestHandler::spawn(listener, img.clone());
    let vm = FirecrackerVm::restore(&scratch.socket(), &regions_4k(&sizes)).expect("restore");

    let Note::Handshake(announced) = handler.note() else {
        panic!("the handshake comes first");
    };
    assert_eq!(announced.len(), 3);
    let mut offset = 0;
    for (a, r) in announced.iter().zip(vm.regions()) {
        assert_eq!(a.base_host_virt_addr, r.host_addr().as_ptr() as u64);
        assert_eq!(
            (a.size, a.offset, r.file_offset()),
            (r.size(), offset, offset)
        );
        assert_eq!((a.page_size, a.page_size_kib), (PAGE_4K, Some(PAGE_4K)));
        offset += a.size;
    }

    assert_eq!(vm.verify_against(&file, 4).expect("verifies"), total);
    let mut buf = [0u8; 16];
    vm.read(2, 5, &mut buf).expect("read");
    let start = (3 * MIB + 64 * KIB + 5) as usize;
    assert_eq!(buf[..], img[start..start + 16]);

    // Guest writes make the first differing word (in region order) the one reported.
    vm.write(2, 4096, b"later").expect("write");
    vm.write(0, 100, b"hello").expect("write");
    vm.read(0, 96, &mut buf[..8]).expect("read back");
    let got = le_word(&buf[..8]);
    img[100..105].copy_from_slice(b"hello");
    assert_eq!(got, le_word(&img[96..104]));
    let err = vm.verify_against(&file, 4).expect_err("differs");
    let PeerError::Mismatch {
        region: 0,
        offset: 96,
        expected,
        got: seen,
    } = err
    else {
        panic!("unexpected {err:?}");
    };
    assert_eq!(seen, got);
    assert_ne!(expected, got);

    for (region, offset, len) in [(3, 0, 1), (0, 2 * MIB - 4, 8), (1, u64::MAX, 2)] {
        let mut buf = vec![0u8; len];
        let err = vm.read(region, offset, &mut buf).expect_err("out of range");
        assert!(matches!(err, PeerError::OutOfRange { .. }), "{err:?}");
        let err = vm.write(region, offset, &buf).expect_err("out of range");
        assert!(matches!(err, PeerError::OutOfRange { .. }), "{err:?}");
    }

    drop(vm);
    // Every page faulted exactly once; the handler saw the socket close.
    assert_eq!(handler.finish(), total / PAGE_4K);
}

#[test]
fn balloon_inflate_raises_remove_and_pages_then_read_zero() {
    let scratch = Scratch::new();
    let listener = scratch.listen();
    let img = image(MIB, 0xba11);
    let file = scratch.file("mem", &img);
    let handler = TestHandler::spawn(listener, img.clone());
    let vm = FirecrackerVm::restore(&scratch.socket(), &regions_4k(&[MIB])).expect("restore");
    assert!(matches!(handler.note(), Note::Handshake(_)));
    assert_eq!(vm.verify_against(&file, 2).expect("verifies"), MIB);

    let base = vm.regions()[0].host_addr().as_ptr() as u64;
    vm.balloon_inflate(0, 64 * KIB, 12 * KIB).expect("inflate");
    assert_eq!(
        handler.note(),
        Note::Remove {
            start: base + 64 * KIB,
            end: base + 76 * KIB
        }
    );
    let mut buf = vec![0xffu8; 20 * KIB as usize];
    vm.read(0, 60 * KIB, &mut buf).expect("re-read");
    let (before, rest) = buf.split_at(4 * KIB as usize);
    let (ballooned, after) = rest.split_at(12 * KIB as usize);
    assert_eq!(before, &img[60 * KIB as usize..64 * KIB as usize]);
    assert!(
        ballooned.iter().all(|&b| b == 0),
        "ballooned pages read zero"
    );
    assert_eq!(after, &img[76 * KIB as usize..80 * KIB as usize]);
    let err = vm.verify_against(&file, 3).expect_err("zeros now");
    assert!(
        matches!(err, PeerError::Mismatch { region: 0, offset, got: 0, .. } if offset == 64 * KIB),
        "{err:?}"
    );

    for (offset, len) in [(100, 4096), (0, 100), (MIB, 4096), (MIB - 4096, 8192)] {
        let err = vm.balloon_inflate(0, offset, len).expect_err("refused");
        assert!(matches!(err, PeerError::OutOfRange { .. }), "{err:?}");
    }
    drop(vm);
    assert_eq!(handler.finish(), MIB / PAGE_4K + 3);
}

/// Makes `needed` 2 MiB pages free (raising nr_hugepages by what is missing), or says why not.
fn reserve_hugepages(needed: u64) -> Result<(), String> {
    let available = || -> Result<u64, String> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| e.to_string())?;
        let field = |name: &str| {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .ok_or(format!("no {name} in /proc/meminfo"))
        };
        let size_kib = field("Hugepagesize:")?;
        if size_kib != PAGE_2M / KIB {
            return Err(format!(
                "the default huge page size is {size_kib} KiB, not 2 MiB"
            ));
        }
        Ok(field("HugePages_Free:")?.saturating_sub(field("HugePages_Rsvd:")?))
    };
    let free = available()?;
    if free >= needed {
        return Ok(());
    }
    let path = "/proc/sys/vm/nr_hugepages";
    let nr: u64 = std::fs::read_to_string(path)
        .map_err(|e| format!("reading {path}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("parsing {path}: {e}"))?;
    std::fs::write(path, format!("{}\n", nr + needed - free))
        .map_err(|e| format!("writing {path}: {e}"))?;
    let free = available()?;
    if free < needed {
        return Err(format!(
            "only {free} of {needed} huge pages are free after raising {path}"
        ));
    }
    Ok(())
}

#[test]
fn hugepage_region_is_announced_served_and_ballooned() {
    if let Err(why) = reserve_hugepages(2) {
        if std::env::var("VMPAGER_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("2 MiB pages are needed: {why}");
        }
        eprintln!("skipping the 2 MiB region test: {why}");
        return;
    }
    let scratch = Scratch::new();
    let listener = scratch.listen();
    let regions = [
        FirecrackerRegion {
            size: MIB,
            page_size: PAGE_4K,
        },
        FirecrackerRegion {
            size: 2 * PAGE_2M,
            page_size: PAGE_2M,
        },
    ];
    let total = MIB + 2 * PAGE_2M;
    let img = image(total, 0x2b1f);
    let file = scratch.file("mem", &img);
    let handler = TestHandler::spawn(listener, img.clone());
    let vm = FirecrackerVm::restore(&scratch.socket(), &regions).expect("restore");
    let Note::Handshake(announced) = handler.note() else {
        panic!("the handshake comes first");
    };
    let huge = &announced[1];
    assert_eq!((huge.offset, huge.size), (MIB, 2 * PAGE_2M));
    assert_eq!(
        (huge.page_size, huge.page_size_kib),
        (PAGE_2M, Some(PAGE_2M))
    );
    assert_eq!(huge.base_host_virt_addr % PAGE_2M, 0);

    // 1 MiB chunks on 3 threads: two threads may fault the same huge page.
    assert_eq!(vm.verify_against(&file, 3).expect("verifies"), total);

    let err = vm
        .balloon_inflate(1, 0, PAGE_4K)
        .expect_err("not huge-page aligned");
    assert!(matches!(err, PeerError::OutOfRange { .. }), "{err:?}");
    vm.balloon_inflate(1, PAGE_2M, PAGE_2M).expect("inflate");
    assert_eq!(
        handler.note(),
        Note::Remove {
            start: huge.base_host_virt_addr + PAGE_2M,
            end: huge.base_host_virt_addr + 2 * PAGE_2M
        }
    );
    let mut buf = vec![0xffu8; 8 * KIB as usize];
    vm.read(1, PAGE_2M - 4 * KIB, &mut buf).expect("re-read");
    let start = (MIB + PAGE_2M - 4 * KIB) as usize;
    assert_eq!(
        buf[..4 * KIB as usize],
        img[start..start + 4 * KIB as usize]
    );
    assert!(buf[4 * KIB as usize..].iter().all(|&b| b == 0));
    drop(vm);
    handler.finish();
}
