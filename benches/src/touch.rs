//! Host threads faulting on memory, as the kernel's uffd selftests do: each thread writes one
//! byte to each of its pages and records how long that write took (a first-touch fault).

use crate::row::{histogram, record};
use hdrhistogram::Histogram;
use std::ptr::NonNull;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// 4 KiB.
pub const PAGE: usize = 4096;

/// A region of this process's address space that faults on first touch.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// First byte.
    pub base: NonNull<u8>,
    /// Pages to touch.
    pub pages: usize,
}

// SAFETY: `Target` is an address range; threads only ever write to disjoint pages of it with
// volatile stores, never forming references (see `touch`).
unsafe impl Send for Target {}
// SAFETY: as above.
unsafe impl Sync for Target {}

/// What a run of `touch` measured.
#[derive(Debug)]
pub struct Touched {
    /// Per-page write latency of every thread.
    pub latency: Histogram<u64>,
    /// Wall time from the start barrier until the last thread finished.
    pub elapsed: Duration,
    /// Pages touched in all.
    pub pages: usize,
}

impl Touched {
    /// Pages per second.
    pub fn rate(&self) -> f64 {
        self.pages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Pins the calling thread to `cpu` (best effort).
pub fn pin(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    let _ = rustix::thread::sched_setaffinity(None, &set);
}

/// Runs `f` on a new thread pinned to `cpu` (the caller's own affinity, which threads and
/// processes it starts later inherit, stays as it was).
pub fn on_cpu<T: Send>(cpu: usize, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            pin(cpu);
            f()
        })
        .join()
        .expect("pinned thread")
    })
}

/// Writes one byte to every page of `t` from `threads` threads (thread `i` takes pages `i`,
/// `i + threads`, ...: neighbours fault at the same time), each pinned to `cpus[i]` if given.
///
/// # Safety
/// `t` must be mapped writable for its whole length for the duration of the call, and no
/// reference to its bytes may exist.
pub unsafe fn touch(t: Target, threads: usize, cpus: Option<&[usize]>) -> Touched {
    let barrier = Barrier::new(threads + 1);
    let mut start = Instant::now();
    let hists: Vec<Histogram<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (barrier, cpu) = (&barrier, cpus.and_then(|c| c.get(i)).copied());
                s.spawn(move || {
                    // The whole `Target` (which is `Send`), not its raw-pointer field.
                    let t = t;
                    if let Some(cpu) = cpu {
                        pin(cpu);
                    }
                    let mut h = histogram();
                    barrier.wait();
                    for p in (i..t.pages).step_by(threads) {
                        let at = Instant::now();
                        // SAFETY: `p < t.pages`, so the byte is inside the mapping the caller
                        // guarantees; a volatile store through a raw pointer, no reference.
                        unsafe { t.base.as_ptr().add(p * PAGE).write_volatile(1) };
                        record(&mut h, at.elapsed());
                    }
                    h
                })
            })
            .collect();
        barrier.wait();
        start = Instant::now();
        handles
            .into_iter()
            .map(|h| h.join().expect("touch thread"))
            .collect()
    });
    let elapsed = start.elapsed();
    let mut latency = histogram();
    for h in &hists {
        latency.add(h).expect("same bounds");
    }
    Touched {
        latency,
        elapsed,
        pages: t.pages,
    }
}
