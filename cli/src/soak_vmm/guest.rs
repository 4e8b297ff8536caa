//! The soak VMM's guest, run on host threads: it reads pages of guest memory (a first touch
//! is a fault the daemon serves), checks them, and writes its own marks.
//!
//! The rules a page must obey at any moment, whatever was killed before:
//! * a page in the progress log holds the snapshot's bytes with its mark word;
//! * any other page holds the snapshot's bytes, with or without its mark word (a VMM may have
//!   been killed between the mark and the log);
//! * nothing else: never zeros, never another page's bytes.
//!
//! A mark is one aligned 8-byte store, so a SIGKILL never leaves half of one.

use super::state::log_page;
use anyhow::{bail, Result};
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use vmpager_client::VmMemory;

pub(crate) const PAGE: usize = 4096;
pub(crate) const WORDS: usize = PAGE / 8;

/// The VM as the guest sees it: `pages` pages split evenly over the regions, the snapshot's
/// words, and where each region is mapped.
pub(crate) struct Guest {
    seed: u64,
    per_region: usize,
    /// The snapshot as 8-byte words, in memory order.
    snapshot: Vec<u64>,
    /// Host address of each region's mapping.
    bases: Vec<usize>,
}

/// Where a page is wrong, and how.
fn describe(
    page: usize,
    region: usize,
    word: usize,
    got: u64,
    want: &[u64],
    zeros: bool,
) -> String {
    format!(
        "page {page} (region {region}, byte {}) holds {got:#018x}, expected {}{}",
        word * 8,
        want.iter()
            .map(|w| format!("{w:#018x}"))
            .collect::<Vec<_>>()
            .join(" or "),
        if zeros {
            "; the whole page is zeros"
        } else {
            ""
        }
    )
}

impl Guest {
    /// `snapshot`: the image as 8-byte words in memory order.
    pub fn new(seed: u64, snapshot: Vec<u64>, regions: usize, memory: &VmMemory) -> Guest {
        let pages = snapshot.len() / WORDS;
        Guest {
            seed,
            per_region: pages / regions,
            snapshot,
            bases: memory
                .regions()
                .iter()
                .map(|r| r.host_addr().as_ptr() as usize)
                .collect(),
        }
    }

    pub fn pages(&self) -> usize {
        self.snapshot.len() / WORDS
    }

    /// The mark of page `page` and the word it goes in (a different word for each page).
    fn mark(&self, page: usize) -> (usize, u64) {
        let word = (page * 37 + 3) % WORDS;
        let value = 0x6d61_726b_0000_0000 ^ self.seed.rotate_left(20) ^ page as u64;
        (word, value)
    }

    fn addr(&self, page: usize) -> usize {
        self.bases[page / self.per_region] + (page % self.per_region) * PAGE
    }

    /// Checks page `page` against the rules (`listed`: it is in the progress log).
    fn check(&self, page: usize, listed: bool) -> Result<(), String> {
        let at = self.addr(page);
        let want = &self.snapshot[page * WORDS..(page + 1) * WORDS];
        let (mark_word, mark) = self.mark(page);
        let mut got = [0u64; WORDS];
        for (i, g) in got.iter_mut().enumerate() {
            // SAFETY: `at` is the start of a page inside a live, 8-aligned mapping of guest
            // memory (the `VmMemory` outlives every guest thread) and word `i < WORDS` lies in
            // that page; no Rust reference to guest memory exists, and a volatile read may fault
            // to the daemon, which is the point.
            *g = unsafe { (at as *const u64).add(i).read_volatile() };
        }
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let ok = match (i == mark_word, listed) {
                (false, _) => g == w,
                (true, true) => g == mark,
                (true, false) => g == w || g == mark,
            };
            if !ok {
                let allowed: Vec<u64> = match (i == mark_word, listed) {
                    (false, _) => vec![w],
                    (true, true) => vec![mark],
                    (true, false) => vec![w, mark],
                };
                let zeros = got.iter().all(|&x| x == 0);
                return Err(describe(
                    page,
                    page / self.per_region,
                    i,
                    g,
                    &allowed,
                    zeros,
                ));
            }
        }
        Ok(())
    }

    /// Writes page `page`'s mark (one aligned 8-byte store).
    fn write_mark(&self, page: usize) {
        let (word, value) = self.mark(page);
        // SAFETY: as in `check`; the guest thread that owns `page` in this pass is its only
        // writer, and the store is 8-aligned, so it is never torn.
        unsafe {
            (self.addr(page) as *mut u64)
                .add(word)
                .write_volatile(value)
        }
    }

    /// Checks every page on `threads` threads; the first rule broken is the error. Returns the
    /// bytes checked.
    pub fn verify_all(&self, listed: &[bool], threads: usize) -> Result<u64> {
        let next = AtomicUsize::new(0);
        let failed = Failure::default();
        on_threads(threads, || {
            while !failed.seen() {
                let p = next.fetch_add(1, Ordering::Relaxed);
                if p >= self.pages() {
                    return;
                }
                if let Err(e) = self.check(p, listed[p]) {
                    failed.set(e);
                }
            }
        });
        if let Some(e) = failed.take() {
            bail!("wrong guest memory: {e}");
        }
        Ok((self.pages() * PAGE) as u64)
    }

    /// Marks every page not yet `listed`, in a pseudo-random order (`order_seed`), on
    /// `threads` threads: check the page, write its mark, log it. Returns the pages marked.
    pub fn mark_rest(
        &self,
        listed: &mut [bool],
        log: &File,
        threads: usize,
        order_seed: u64,
    ) -> Result<usize> {
        let mut todo: Vec<usize> = (0..self.pages()).filter(|&p| !listed[p]).collect();
        shuffle(&mut todo, order_seed);
        let next = AtomicUsize::new(0);
        let failed = Failure::default();
        on_threads(threads, || {
            while !failed.seen() {
                let Some(&p) = todo.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                let done = self.check(p, false).and_then(|()| {
                    self.write_mark(p);
                    log_page(log, p).map_err(|e| format!("{e:#}"))
                });
                if let Err(e) = done {
                    failed.set(e);
                }
            }
        });
        if let Some(e) = failed.take() {
            bail!("while marking: {e}");
        }
        for &p in &todo {
            listed[p] = true;
        }
        Ok(todo.len())
    }
}

/// The first error of several threads; the others stop once there is one.
#[derive(Default)]
struct Failure {
    seen: AtomicBool,
    first: Mutex<Option<String>>,
}

impl Failure {
    fn seen(&self) -> bool {
        self.seen.load(Ordering::Relaxed)
    }

    fn set(&self, e: String) {
        self.seen.store(true, Ordering::Relaxed);
        self.first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    }

    fn take(self) -> Option<String> {
        self.first.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs `f` on `threads` threads and joins each one (`pthread_join`, which a scope alone does
/// not do): none is left exiting when this returns, so the process's thread count is exact.
fn on_threads(threads: usize, f: impl Fn() + Sync) {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(&f)).collect();
        for h in handles {
            let _ = h.join();
        }
    });
}

/// splitmix64: a small, good enough generator for a reproducible page order.
pub(crate) fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fisher–Yates with [`splitmix`].
fn shuffle(v: &mut [usize], seed: u64) {
    let mut s = seed;
    for i in (1..v.len()).rev() {
        let j = (splitmix(&mut s) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}
