//! What authenticating page data costs: seals `Pages` frames of 1 and 1024 pages with the
//! frame MAC (keyed BLAKE3, `MacState::seal`) and prints ns per 4 KiB page and MB/s.
//!
//! `cargo run --release -p vmpager-migration --example mac_cost`
//! (the figures in `docs/migration-protocol.md` come from this).

use std::time::Instant;
use vmpager_migration::frame::{Direction, MacState, FRAME_HEADER_LEN};

fn main() {
    let data: Vec<u8> = (0..1024 * 4096).map(|i| (i * 7 % 251) as u8).collect();
    let header = [0u8; FRAME_HEADER_LEN];
    let head = [0u8; 16];
    for pages in [1usize, 1024] {
        let mut mac = MacState::new([3; 32], Direction::ServerToClient);
        let total_pages = 256 * 1024; // 1 GiB of guest memory
        let frames = total_pages / pages;
        let mut sink = 0u8;
        let start = Instant::now();
        for f in 0..frames {
            let at = (f * pages % 1024) * 4096;
            let tag = mac
                .seal(&header, &[&head, &data[at..at + pages * 4096]])
                .unwrap();
            sink ^= tag[0];
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{pages:>5} page(s)/frame: {:.0} ns per 4 KiB page, {:.0} MB/s ({} MiB in {:.3} s) [{sink}]",
            secs * 1e9 / total_pages as f64,
            (total_pages * 4096) as f64 / secs / 1e6,
            (total_pages * 4096) >> 20,
            secs,
        );
    }
}
