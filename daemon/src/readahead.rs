//! Which pages to install along with a faulting one: fault-around (the aligned block around the
//! fault, as the kernel's own `fault_around_bytes` does for file mappings) and sequential
//! prefetch (a stream of faults each on the page after the previous install doubles its window,
//! like the page cache's readahead). One `UFFDIO_COPY` of many pages costs far less than one
//! fault per page (DESIGN.md §8: ~0.7 µs per ioctl + ~0.84 µs per page, against a fault round
//! trip of 8–50 µs).

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
    /// pages): always contains `page`, never reaches past the region. The caller installs the
    /// part of it around `page` that is still missing.
    pub fn window(&mut self, region: usize, page: usize, pages: usize) -> Range<usize> {
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
                let r = page..(page + st.window).min(pages);
                st.next = r.end;
                return r;
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
        range
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
        assert_eq!(s.window(0, 37, 1000), 32..48);
        assert_eq!(s.window(0, 995, 1000), 992..1000);
        let mut off = Streams::new(Readahead::OFF);
        assert_eq!(off.window(0, 37, 1000), 37..38);
    }

    #[test]
    fn a_sequential_stream_doubles_its_window_up_to_the_maximum() {
        let mut s = Streams::new(Readahead {
            fault_around: 16,
            prefetch_max: 64,
        });
        assert_eq!(s.window(1, 0, 10_000), 0..16);
        assert_eq!(s.window(1, 16, 10_000), 16..48);
        assert_eq!(s.window(1, 48, 10_000), 48..112);
        assert_eq!(s.window(1, 112, 10_000), 112..176);
        // Another region's stream, then a jump: each starts over with fault-around.
        assert_eq!(s.window(2, 176, 10_000), 176..192);
        assert_eq!(s.window(1, 5000, 10_000), 4992..5008);
        // The first stream is still tracked and continues where it stopped.
        assert_eq!(s.window(1, 176, 10_000), 176..240);
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
