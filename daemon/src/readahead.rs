//! Which pages to install along with a faulting one: fault-around (the aligned block around the
//! fault, as the kernel's own `fault_around_bytes` does for file mappings) and sequential
//! prefetch (a stream of faults each on the page after the previous window doubles its window,
//! like the page cache's readahead). One `UFFDIO_COPY` of many pages costs far less than one
//! fault per page (DESIGN.md §8: ~0.7 µs per ioctl + ~0.84 µs per page, against a fault round
//! trip of 8–50 µs).
//!
//! A window has two parts: `now`, installed before the faulting thread is woken (kept small, so
//! the fault stays short), and `ahead`, installed after the wake in chunks while the thread
//! works through `now`: the copy overlaps the guest's own progress.

use std::ops::Range;

/// The largest window, in 4 KiB pages (2 MiB: one huge page's worth).
pub const MAX_PAGES: usize = 512;

/// Readahead settings of a daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readahead {
    /// Pages of the aligned block installed around a fault (1 = the faulting page only). A
    /// power of two, at most [`MAX_PAGES`].
    pub fault_around: usize,
    /// The largest sequential prefetch window, in pages; at most `fault_around` turns
    /// sequential prefetch off. At most [`MAX_PAGES`].
    pub prefetch_max: usize,
}

impl Readahead {
    /// Only the faulting page.
    pub const OFF: Readahead = Readahead {
        fault_around: 1,
        prefetch_max: 1,
    };

    /// Checks the bounds; the error says which setting is wrong.
    pub fn validate(self) -> Result<Readahead, String> {
        if !self.fault_around.is_power_of_two() || self.fault_around > MAX_PAGES {
            return Err(format!(
                "fault-around must be a power of two between 1 and {MAX_PAGES} pages"
            ));
        }
        if self.prefetch_max == 0 || self.prefetch_max > MAX_PAGES {
            return Err(format!(
                "the prefetch window must be between 1 and {MAX_PAGES} pages"
            ));
        }
        Ok(self)
    }

    /// The most pages one fault may install.
    pub fn max_pages(self) -> usize {
        self.fault_around.max(self.prefetch_max)
    }
}

impl Default for Readahead {
    /// 64 KiB fault-around (the kernel's default `fault_around_bytes`), prefetch up to 2 MiB.
    fn default() -> Readahead {
        Readahead {
            fault_around: 16,
            prefetch_max: MAX_PAGES,
        }
    }
}

/// What to install for one fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Pages to install before the faulting thread is woken; contains the faulting page.
    pub now: Range<usize>,
    /// Pages to install after the wake (empty unless the fault continues a sequential stream).
    pub ahead: Range<usize>,
}

/// Recently seen sequential streams of one VM.
#[derive(Debug)]
pub struct Streams {
    settings: Readahead,
    slots: [Stream; STREAMS],
    clock: u64,
}

/// Streams tracked per VM: a few vCPUs each sweeping memory.
const STREAMS: usize = 8;

#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    region: usize,
    /// The first page after the last window: a fault here continues the stream.
    next: usize,
    window: usize,
    used: u64,
}

impl Streams {
    /// No stream seen yet.
    pub fn new(settings: Readahead) -> Streams {
        Streams {
            settings,
            slots: [Stream::default(); STREAMS],
            clock: 0,
        }
    }

    /// The pages to try to install for a fault on `page` of `region` (which has `pages`
    /// pages): `now` always contains `page`; neither part reaches past the region. The caller
    /// installs the parts that are still missing.
    pub fn window(&mut self, region: usize, page: usize, pages: usize) -> Window {
        self.clock += 1;
        let s = self.settings;
        let sequential = s.prefetch_max > s.fault_around;
        let hit = self
            .slots
            .iter_mut()
            .find(|st| st.used != 0 && st.region == region && st.next == page);
        let range = match hit {
            Some(st) if sequential => {
                st.window = (st.window * 2).clamp(s.fault_around, s.prefetch_max);
                st.used = self.clock;
                let now = page..(page + s.fault_around).min(pages);
                let ahead = now.end..(page + st.window).min(pages).max(now.end);
                st.next = ahead.end;
                return Window { now, ahead };
            }
            _ => {
                let start = page & !(s.fault_around - 1);
                start..(start + s.fault_around).min(pages)
            }
        };
        let lru = self
            .slots
            .iter_mut()
            .min_by_key(|st| st.used)
            .expect("STREAMS > 0");
        *lru = Stream {
            region,
            next: range.end,
            window: s.fault_around,
            used: self.clock,
        };
        Window {
            ahead: range.end..range.end,
            now: range,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_around_is_the_aligned_block_clipped_to_the_region() {
        let mut s = Streams::new(Readahead {
            fault_around: 16,
            prefetch_max: 16,
        });
        assert_eq!(s.window(0, 37, 1000).now, 32..48);
        assert_eq!(s.window(0, 995, 1000).now, 992..1000);
        // Prefetch is off (its maximum is the fault-around size): a stream gets nothing ahead.
        let w = s.window(0, 48, 1000);
        assert_eq!((w.now, w.ahead.is_empty()), (48..64, true));
        let mut off = Streams::new(Readahead::OFF);
        assert_eq!(off.window(0, 37, 1000).now, 37..38);
    }

    #[test]
    fn a_sequential_stream_doubles_its_window_up_to_the_maximum() {
        let mut s = Streams::new(Readahead {
            fault_around: 16,
            prefetch_max: 64,
        });
        let w = |s: &mut Streams, r, p| {
            let w = s.window(r, p, 10_000);
            (w.now, w.ahead)
        };
        assert_eq!(w(&mut s, 1, 0), (0..16, 16..16));
        assert_eq!(w(&mut s, 1, 16), (16..32, 32..48));
        assert_eq!(w(&mut s, 1, 48), (48..64, 64..112));
        assert_eq!(w(&mut s, 1, 112), (112..128, 128..176));
        // Another region's stream, then a jump: each starts over with fault-around.
        assert_eq!(w(&mut s, 2, 176), (176..192, 192..192));
        assert_eq!(w(&mut s, 1, 5000), (4992..5008, 5008..5008));
        // The first stream is still tracked and continues where it stopped; the region's end
        // clips both parts.
        assert_eq!(w(&mut s, 1, 176), (176..192, 192..240));
        let end = s.window(1, 240, 250);
        assert_eq!((end.now, end.ahead), (240..250, 250..250));
    }

    #[test]
    fn validation_rejects_bad_sizes() {
        assert!(Readahead {
            fault_around: 3,
            prefetch_max: 16
        }
        .validate()
        .is_err());
        assert!(Readahead {
            fault_around: 16,
            prefetch_max: 4096
        }
        .validate()
        .is_err());
        assert!(Readahead::default().validate().is_ok());
    }
}
