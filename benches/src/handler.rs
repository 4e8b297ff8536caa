//! The in-process baseline: a uffd handler thread in the faulting process, doing exactly what
//! vmpagerd does per fault (the same `vmpagerd::uffd` ioctls, the same page source reads) but
//! without a process boundary, a control socket or a page-state table. Also the raw cost of the
//! populate ioctls with nobody waiting.

use crate::row::{histogram, record};
use crate::touch::PAGE;
use hdrhistogram::Histogram;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use userfaultfd::{FeatureFlags, RegisterMode, UffdBuilder};
use vmpager_protocol::mapping::SharedMapping;
use vmpagerd::uffd::{Event, Uffd, MSG_SIZE};

/// How a page is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `pread` of the image into a bounce buffer, `UFFDIO_COPY`.
    Copy,
    /// `pread` of the image into a second mapping of the memfd, `UFFDIO_CONTINUE`.
    Continue,
    /// `UFFDIO_ZEROPAGE` (a zero page source).
    Zero,
}

impl Method {
    /// Short name for row labels.
    pub fn name(self) -> &'static str {
        match self {
            Method::Copy => "copy",
            Method::Continue => "continue",
            Method::Zero => "zeropage",
        }
    }
}

/// How the handler thread waits for faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerWait {
    /// `poll(2)` on the uffd, then read.
    Blocking,
    /// Non-blocking reads in a loop.
    BusyPoll,
}

/// A memfd mapped twice: `vmm` registered with a fresh uffd (MISSING, plus MINOR for
/// CONTINUE), `own` unregistered (where CONTINUE's content is written).
#[derive(Debug)]
pub struct UffdMemory {
    /// The registered view (where faults happen).
    pub vmm: SharedMapping,
    own: SharedMapping,
    uffd: Arc<Uffd>,
    // Keeps the registration's owner alive (the registration lives with the uffd file).
    _registration: userfaultfd::Uffd,
    _memfd: OwnedFd,
}

impl UffdMemory {
    /// `pages` pages of fresh shared memory registered for `method`.
    pub fn new(pages: usize, method: Method) -> std::io::Result<UffdMemory> {
        let len = pages * PAGE;
        let memfd = rustix::fs::memfd_create("vmpager-bench", rustix::fs::MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&memfd, len as u64)?;
        let vmm = SharedMapping::new(memfd.as_fd(), len)?;
        let own = SharedMapping::new(memfd.as_fd(), len)?;
        // No REMOVE/UNMAP events: nobody reads them after the handler stops, and munmap would wait
        // for them (the hang `VmMemory` avoids by unregistering first).
        let mut features = FeatureFlags::empty();
        let mut mode = RegisterMode::MISSING;
        if method == Method::Continue {
            // UFFD_FEATURE_MINOR_SHMEM (linux/userfaultfd.h).
            features |= FeatureFlags::from_bits_retain(1 << 10);
            mode |= RegisterMode::MINOR;
        }
        let reg = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(features)
            .create()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        reg.register_with_mode(vmm.as_ptr().as_ptr().cast(), len, mode)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // SAFETY: `reg` owns this fd and outlives the borrow (dup'ed at once).
        let raw = unsafe { BorrowedFd::borrow_raw(reg.as_raw_fd()) };
        let uffd = Uffd::from_received(rustix::io::fcntl_dupfd_cloexec(raw, 3)?)
            .map_err(std::io::Error::from)?;
        Ok(UffdMemory {
            vmm,
            own,
            uffd: Arc::new(uffd),
            _registration: reg,
            _memfd: memfd,
        })
    }

    /// The registered view's first byte.
    pub fn base(&self) -> NonNull<u8> {
        self.vmm.as_ptr()
    }

    /// Pages mapped.
    pub fn pages(&self) -> usize {
        self.vmm.len() / PAGE
    }
}

/// The page address and its offset in the registered range `[base, base + len)` of a
/// page-fault event; `None` for other events and addresses outside the range.
fn fault_in(e: &[u8; MSG_SIZE], base: u64, len: u64) -> Option<(u64, u64)> {
    let Event::PageFault { address, .. } = Event::parse(e) else {
        return None;
    };
    let page = address & !(PAGE as u64 - 1);
    let off = page.checked_sub(base)?;
    (off < len).then_some((page, off))
}

/// `pread` of `len` bytes at `off` of `fd` into raw memory at `dst`: a shared mapping that
/// other threads and processes see, so no Rust reference to it is formed.
///
/// # Safety
/// `[dst, dst + len)` must be valid for writes for the duration of the call.
unsafe fn pread_into(fd: BorrowedFd<'_>, dst: *mut u8, len: usize, off: u64) {
    // SAFETY: the caller guarantees the destination range; the kernel only writes into it.
    unsafe { libc::pread(fd.as_raw_fd(), dst.cast(), len, off as libc::off_t) };
}

/// A running handler thread, borrowing the memory it serves (which therefore outlives it);
/// `stop` returns its service-time histogram (fault read → populate done). Dropping it stops
/// it too.
#[derive(Debug)]
pub struct Handler<'m> {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Histogram<u64>>>,
    _memory: std::marker::PhantomData<&'m UffdMemory>,
}

impl<'m> Handler<'m> {
    /// Serves `mem`'s faults from `image` with `method`, waiting as `wait` says, on `cpu` if
    /// given.
    pub fn start(
        mem: &'m UffdMemory,
        image: &File,
        method: Method,
        wait: HandlerWait,
        cpu: Option<usize>,
    ) -> std::io::Result<Handler<'m>> {
        let stop = Arc::new(AtomicBool::new(false));
        let uffd = mem.uffd.clone();
        let image = image.try_clone()?;
        let vmm_base = mem.vmm.as_ptr().as_ptr() as u64;
        let own_base = mem.own.as_ptr().as_ptr() as usize;
        let len = mem.vmm.len() as u64;
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            if let Some(cpu) = cpu {
                crate::touch::pin(cpu);
            }
            let mut h = histogram();
            let mut events = vec![[0u8; MSG_SIZE]; 64];
            let mut bounce = vec![0u8; PAGE];
            while !stop2.load(Ordering::Relaxed) {
                if wait == HandlerWait::Blocking {
                    let mut fds = [rustix::event::PollFd::new(
                        &*uffd,
                        rustix::event::PollFlags::IN,
                    )];
                    let timeout = rustix::event::Timespec {
                        tv_sec: 0,
                        tv_nsec: 20_000_000,
                    };
                    let _ = rustix::event::poll(&mut fds, Some(&timeout));
                }
                let n = match uffd.read_events(&mut events) {
                    Ok(n) => n,
                    Err(_) => {
                        // As vmpagerd's busy-polling workers do: let a thread sharing this CPU
                        // run.
                        std::thread::yield_now();
                        continue;
                    }
                };
                let read_at = Instant::now();
                for e in &events[..n] {
                    let Some((page, off)) = fault_in(e, vmm_base, len) else {
                        continue;
                    };
                    let done = match method {
                        Method::Copy => {
                            let _ = rustix::io::pread(&image, &mut bounce, off);
                            uffd.copy(page, &bounce)
                        }
                        Method::Continue => {
                            // SAFETY: `off < len`, so the page lies inside the handler's own
                            // mapping, which outlives this thread (`Handler<'m>` borrows the
                            // memory and joins the thread before the borrow ends).
                            unsafe {
                                pread_into(
                                    image.as_fd(),
                                    (own_base + off as usize) as *mut u8,
                                    PAGE,
                                    off,
                                )
                            };
                            uffd.r#continue(page, PAGE as u64)
                        }
                        Method::Zero => uffd.zeropage(page, PAGE as u64),
                    };
                    if done.is_err() {
                        let _ = uffd.wake(page, PAGE as u64);
                    }
                    record(&mut h, read_at.elapsed());
                }
            }
            h
        });
        Ok(Handler {
            stop,
            thread: Some(thread),
            _memory: std::marker::PhantomData,
        })
    }

    /// Stops the thread and returns its service-time histogram.
    pub fn stop(mut self) -> Histogram<u64> {
        self.halt().unwrap_or_else(histogram)
    }

    fn halt(&mut self) -> Option<Histogram<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("handler thread"))
    }
}

impl Drop for Handler<'_> {
    fn drop(&mut self) {
        self.halt();
    }
}

/// A minimal copy handler in a forked child process: what any handler outside the faulting
/// process pays (an address-space switch per hand-off on the same CPU), without anything
/// vmpagerd adds. Killed on drop.
#[derive(Debug)]
pub struct ChildHandler {
    pid: libc::pid_t,
}

impl ChildHandler {
    /// Forks a child that serves `mem`'s faults with pread + `UFFDIO_COPY` from `image`,
    /// blocking in `poll(2)`, pinned to `cpu`.
    pub fn start(mem: &UffdMemory, image: &File, cpu: usize) -> std::io::Result<ChildHandler> {
        let uffd = mem.uffd.clone();
        let vmm_base = mem.vmm.as_ptr().as_ptr() as u64;
        let len = mem.vmm.len() as u64;
        // Everything the child touches is allocated before the fork: after it, the child of a
        // multi-threaded process may only make system calls (the `Uffd` methods and rustix
        // calls below are exactly that: no allocation, no lock).
        let mut bounce = vec![0u8; PAGE];
        let mut events = vec![[0u8; MSG_SIZE]; 64];
        let mut set = rustix::thread::CpuSet::new();
        set.set(cpu);
        // SAFETY: fork has no memory-safety preconditions. The child (of a multi-threaded
        // process) only makes system calls on memory allocated before the fork and never
        // returns: it serves until killed, by `Drop` (SIGKILL) or, should this process die
        // first, by PR_SET_PDEATHSIG.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: prctl with integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            let _ = rustix::thread::sched_setaffinity(None, &set);
            loop {
                let mut fds = [rustix::event::PollFd::new(
                    &*uffd,
                    rustix::event::PollFlags::IN,
                )];
                let _ = rustix::event::poll(&mut fds, None);
                let Ok(n) = uffd.read_events(&mut events) else {
                    continue;
                };
                for e in &events[..n] {
                    let Some((page, off)) = fault_in(e, vmm_base, len) else {
                        continue;
                    };
                    let _ = rustix::io::pread(image, &mut bounce, off);
                    if uffd.copy(page, &bounce).is_err() {
                        let _ = uffd.wake(page, PAGE as u64);
                    }
                }
            }
        }
        Ok(ChildHandler { pid })
    }
}

impl Drop for ChildHandler {
    fn drop(&mut self) {
        // SAFETY: `pid` is our child; kill and waitpid take no pointers but the status out-param.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// The cost of one populate ioctl with nobody waiting: `pages` ioctls of `chunk` pages each
/// into fresh registered memory. Returns the per-ioctl latency.
pub fn ioctl_cost(
    method: Method,
    pages: usize,
    chunk: usize,
    image: &File,
) -> std::io::Result<Histogram<u64>> {
    let mem = UffdMemory::new(pages, method)?;
    let base = mem.vmm.as_ptr().as_ptr() as u64;
    let mut buf = vec![0u8; chunk * PAGE];
    let _ = rustix::io::pread(image, &mut buf, 0);
    if method == Method::Continue {
        // The content must be in the page cache first (not timed).
        for p in 0..pages {
            let off = (p * PAGE) as u64;
            // SAFETY: page `p < pages` of the handler's own live mapping of `pages` pages.
            unsafe {
                pread_into(
                    image.as_fd(),
                    mem.own.as_ptr().as_ptr().add(p * PAGE),
                    PAGE,
                    off,
                )
            };
        }
    }
    let mut h = histogram();
    for c in 0..pages / chunk {
        let dst = base + (c * chunk * PAGE) as u64;
        let len = (chunk * PAGE) as u64;
        let t = Instant::now();
        let r = match method {
            Method::Copy => mem.uffd.copy(dst, &buf),
            Method::Continue => mem.uffd.r#continue(dst, len),
            Method::Zero => mem.uffd.zeropage(dst, len),
        };
        record(&mut h, t.elapsed());
        r.map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    Ok(h)
}
