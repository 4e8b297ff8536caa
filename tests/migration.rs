//! Post-copy migration between two daemons on loopback TCP (docs/migration.md), both on
//! threads of this process; host threads play the guest on each side. Every page that arrives
//! is compared with what the source VM held (snapshot bytes, and the marks written on the
//! source before the switchover); a destination that cannot prove the key gets nothing and
//! poisons, never zero-fills; garbage on the migration port harms no migration.

mod common;
#[path = "migration_rig/mod.rs"]
mod rig;

use common::*;
use rig::*;
use std::io::Write;
use std::time::{Duration, Instant};
use vmpager_client::demo::PatternGen;
use vmpager_client::{Client, PageSource, PopulateMethod, VmSpec};
use vmpager_migration::FaultyLink;
use vmpager_protocol::message::{MigrationKey, MigrationState, MigrationStatus};

fn key(byte: u8) -> MigrationKey {
    MigrationKey([byte; 32])
}

/// A source VM over a snapshot, with a mark written into every third page (guest writes
/// before the switchover); returns the VM and the bytes the destination must see.
fn source_vm(
    dir: &TestDir,
    client: &Client,
    populate: PopulateMethod,
) -> (vmpager_client::VmMemory, Vec<u8>) {
    let mut image = vec![0u8; PAGES * PAGE];
    PatternGen::new(7).fill(&mut image);
    // Some all-zero pages: they travel as `Zeros`.
    for p in (5..PAGES).step_by(97) {
        image[p * PAGE..(p + 1) * PAGE].fill(0);
    }
    let path = dir.join("snapshot.img");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&image)
        .unwrap();
    let memory = client
        .create_mapped_vm(VmSpec {
            regions: regions(),
            source: PageSource::File(std::fs::File::open(&path).unwrap()),
            populate,
            ..Default::default()
        })
        .unwrap();
    let mut want = image;
    for p in (0..PAGES).step_by(3) {
        let (r, page) = locate(&memory, p);
        let mark = 0x5eed_0000_0000_0000 | p as u64;
        write_word(r, page, mark);
        want[p * PAGE..p * PAGE + 8].copy_from_slice(&mark.to_ne_bytes());
    }
    (memory, want)
}

fn destination_vm(client: &Client, populate: PopulateMethod) -> vmpager_client::VmMemory {
    client
        .create_mapped_vm(VmSpec {
            regions: regions(),
            source: PageSource::Remote,
            populate,
            ..Default::default()
        })
        .unwrap()
}

fn wait_state(client: &Client, vm_id: u64, state: MigrationState) -> MigrationStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let s = client.migration(vm_id).unwrap();
        if s.state == state {
            return s;
        }
        assert!(Instant::now() < deadline, "never {state:?}: {s:?}");
        std::thread::yield_now();
    }
}

#[test]
fn a_vm_migrates_with_every_byte_faulted_or_pushed() {
    if !have_uffd() {
        return;
    }
    for populate in [PopulateMethod::Copy, PopulateMethod::Continue] {
        let dir = TestDir::new("migrate-all");
        let src_d = daemon(&dir, "src.sock", true, PATIENCE);
        let dst_d = daemon(&dir, "dst.sock", false, PATIENCE);
        let src = Client::connect(src_d.socket_path()).unwrap();
        let dst = Client::connect(dst_d.socket_path()).unwrap();
        let (src_mem, want) = source_vm(&dir, &src, populate);
        let addr = src_d.migration_addr().unwrap().to_string();
        src.migrate_out(src_mem.vm_id(), 42, key(1), false).unwrap();
        let dst_mem = destination_vm(&dst, populate);
        let started = dst.migrate_in(dst_mem.vm_id(), 42, key(1), &addr).unwrap();
        assert_eq!(started.counters.total_pages, PAGES as u64);
        // The guest on the destination touches pages in a scattered order while the bulk
        // channel pushes the rest; every page must be the source's.
        for k in 0..PAGES {
            let p = k * 389 % PAGES;
            let (r, page) = locate(&dst_mem, p);
            assert_eq!(
                read_page(r, page),
                want[p * PAGE..(p + 1) * PAGE],
                "page {p} ({populate:?})"
            );
        }
        let done = wait_state(&dst, dst_mem.vm_id(), MigrationState::Complete);
        assert_eq!(done.counters.pages_done, PAGES as u64);
        assert_eq!(
            done.counters.pages_pulled + done.counters.pages_pushed,
            PAGES as u64,
            "every page came once, by a fault or by the push: {done:?}"
        );
        let src_done = wait_state(&src, src_mem.vm_id(), MigrationState::Complete);
        assert_eq!(src_done.counters.pages_done, PAGES as u64);
        // The destination no longer needs the source: its pages stay when the source is gone.
        drop(src_mem);
        drop(src);
        src_d.shutdown().unwrap();
        for p in 0..PAGES {
            let (r, page) = locate(&dst_mem, p);
            assert_eq!(read_page(r, page), want[p * PAGE..(p + 1) * PAGE]);
        }
    }
}

#[test]
fn a_pull_only_destination_gets_every_page_by_faults_and_nothing_pushed() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("migrate-pull-only");
    let src_d = daemon(&dir, "src.sock", true, PATIENCE);
    let dst_d = daemon_with(&dir, "dst.sock", false, PATIENCE, false);
    let src = Client::connect(src_d.socket_path()).unwrap();
    let dst = Client::connect(dst_d.socket_path()).unwrap();
    let (src_mem, want) = source_vm(&dir, &src, PopulateMethod::Copy);
    let addr = src_d.migration_addr().unwrap().to_string();
    src.migrate_out(src_mem.vm_id(), 5, key(4), false).unwrap();
    let dst_mem = destination_vm(&dst, PopulateMethod::Copy);
    dst.migrate_in(dst_mem.vm_id(), 5, key(4), &addr).unwrap();
    for k in 0..PAGES {
        let p = k * 389 % PAGES;
        let (r, page) = locate(&dst_mem, p);
        assert_eq!(
            read_page(r, page),
            want[p * PAGE..(p + 1) * PAGE],
            "page {p}"
        );
        if k == 0 {
            // One fault (and its fault-around): nothing came that nobody asked for.
            let s = dst.migration(dst_mem.vm_id()).unwrap();
            assert_eq!(s.state, MigrationState::Running, "{s:?}");
            assert_eq!(s.counters.pages_pushed, 0, "{s:?}");
        }
    }
    let done = wait_state(&dst, dst_mem.vm_id(), MigrationState::Complete);
    assert_eq!(done.counters.pages_pulled, PAGES as u64, "{done:?}");
    assert_eq!(done.counters.pages_pushed, 0, "{done:?}");
    wait_state(&src, src_mem.vm_id(), MigrationState::Complete);
}

#[test]
fn a_one_channel_destination_gets_every_page_with_fault_requests_on_the_bulk_channel() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("migrate-one-channel");
    let src_d = daemon(&dir, "src.sock", true, PATIENCE);
    let dst_d = daemon_adjusted(&dir, "dst.sock", false, PATIENCE, |c| {
        c.migration_one_channel = true;
    });
    let src = Client::connect(src_d.socket_path()).unwrap();
    let dst = Client::connect(dst_d.socket_path()).unwrap();
    let (src_mem, want) = source_vm(&dir, &src, PopulateMethod::Copy);
    // A slow link (the VM takes about a second to cross it): the first faults come long before
    // the push reaches their pages.
    let link = FaultyLink::start(src_d.migration_addr().unwrap(), Duration::ZERO).unwrap();
    link.set_shared_rate(4_000_000);
    src.migrate_out(src_mem.vm_id(), 11, key(5), false).unwrap();
    let dst_mem = destination_vm(&dst, PopulateMethod::Copy);
    dst.migrate_in(dst_mem.vm_id(), 11, key(5), &link.addr().to_string())
        .unwrap();
    for k in 0..PAGES {
        let p = k * 389 % PAGES;
        let (r, page) = locate(&dst_mem, p);
        assert_eq!(
            read_page(r, page),
            want[p * PAGE..(p + 1) * PAGE],
            "page {p}"
        );
    }
    let done = wait_state(&dst, dst_mem.vm_id(), MigrationState::Complete);
    assert_eq!(done.counters.pages_done, PAGES as u64);
    assert_eq!(
        done.counters.pages_pulled + done.counters.pages_pushed,
        PAGES as u64,
        "every page came once: {done:?}"
    );
    assert!(
        done.counters.pages_pulled > 0,
        "the faults' pages were answered on the bulk channel: {done:?}"
    );
    assert!(done.counters.fault_p50_ns > 0, "{done:?}");
    assert_eq!(link.accepted(), 1, "one connection, no urgent channel");
    wait_state(&src, src_mem.vm_id(), MigrationState::Complete);
}

#[test]
fn one_channel_without_the_push_is_refused_at_start() {
    let dir = TestDir::new("migrate-one-channel-pull-only");
    let config = vmpagerd::Config {
        migration_push: false,
        migration_one_channel: true,
        ..vmpagerd::Config::default()
    };
    let err = vmpagerd::spawn(config, &dir.join("d.sock")).expect_err("refused");
    assert!(matches!(err, vmpagerd::DaemonError::Config(_)), "{err}");
}

#[test]
fn a_destination_without_the_key_gets_no_page_and_poisons_never_zeros() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("migrate-badkey");
    let src_d = daemon(&dir, "src.sock", true, PATIENCE);
    let dst_d = daemon(&dir, "dst.sock", false, Duration::from_secs(2));
    let src = Client::connect(src_d.socket_path()).unwrap();
    let dst = Client::connect(dst_d.socket_path()).unwrap();
    let (src_mem, _) = source_vm(&dir, &src, PopulateMethod::Copy);
    let addr = src_d.migration_addr().unwrap().to_string();
    src.migrate_out(src_mem.vm_id(), 7, key(1), false).unwrap();
    let dst_mem = destination_vm(&dst, PopulateMethod::Copy);
    dst.migrate_in(dst_mem.vm_id(), 7, key(2), &addr).unwrap();
    let (r, page) = locate(&dst_mem, 3);
    // The fault waits until the source is declared lost, then the page is poisoned.
    let err = probe(r, page).expect_err("a page from a source that never proved itself");
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{err}");
    let s = wait_state(&dst, dst_mem.vm_id(), MigrationState::Abandoned);
    assert_eq!(s.counters.pages_done, 0, "{s:?}");
    assert!(s.counters.refused > 0, "the handshake was refused: {s:?}");
    assert_eq!(s.counters.pages_poisoned, PAGES as u64);
    let out = src.migration(src_mem.vm_id()).unwrap();
    assert_eq!(out.counters.pages_pulled + out.counters.pages_pushed, 0);
    assert!(
        out.counters.refused > 0,
        "the source counted the refusals: {out:?}"
    );
}

#[test]
fn garbage_on_the_migration_port_harms_no_migration() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("migrate-garbage");
    let src_d = daemon(&dir, "src.sock", true, PATIENCE);
    let dst_d = daemon(&dir, "dst.sock", false, PATIENCE);
    let src = Client::connect(src_d.socket_path()).unwrap();
    let dst = Client::connect(dst_d.socket_path()).unwrap();
    let (src_mem, want) = source_vm(&dir, &src, PopulateMethod::Copy);
    let addr = src_d.migration_addr().unwrap();
    src.migrate_out(src_mem.vm_id(), 9, key(3), false).unwrap();
    // Garbage, an HTTP request and a truncated handshake: each connection is dropped.
    for junk in [
        &b"\x00\xff garbage garbage"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"VMPM",
    ] {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(junk).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut rest);
    }
    let dst_mem = destination_vm(&dst, PopulateMethod::Copy);
    dst.migrate_in(dst_mem.vm_id(), 9, key(3), &addr.to_string())
        .unwrap();
    for p in [0, 1, 300, PAGES - 1] {
        let (r, page) = locate(&dst_mem, p);
        assert_eq!(read_page(r, page), want[p * PAGE..(p + 1) * PAGE]);
    }
    wait_state(&dst, dst_mem.vm_id(), MigrationState::Complete);
    let out = src.migration(src_mem.vm_id()).unwrap();
    assert!(
        out.counters.refused >= 3,
        "each junk connection counted: {out:?}"
    );
}
