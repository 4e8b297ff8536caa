//! Post-copy migration when things break (docs/migration.md, "Failures"): the daemons run as
//! processes and talk through a [`FaultyLink`] on loopback (a slow link, so the migration is
//! still going when it breaks). A cut connection, a black hole, a source daemon killed with
//! SIGKILL and a destination daemon killed with SIGKILL, each restarted with the same command
//! line: every time the migration resumes, and every page the destination ends with is the
//! source's.

mod common;

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};
use vmpager_client::demo::PatternGen;
use vmpager_client::{Client, ClientOptions, PageSource, PopulateMethod, RegionSpec, VmSpec};
use vmpager_migration::FaultyLink;
use vmpager_protocol::message::{MigrationKey, MigrationState, MigrationStatus};

const PAGE: usize = 4096;
const PAGES: usize = 2048;
/// The link's rate: the push of 8 MiB takes about a second.
const RATE: u64 = 8 << 20;
/// Bound on every wait: a bug shows as a failed test, not a hung one.
const PATIENCE: Duration = Duration::from_secs(90);
const KEY: MigrationKey = MigrationKey([0x4b; 32]);
const ID: u64 = 77;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

struct Side {
    socket: std::path::PathBuf,
    args: Vec<String>,
    daemon: Option<SocketDaemon>,
}

impl Side {
    fn start(dir: &TestDir, name: &str, args: Vec<String>) -> Side {
        let socket = dir.join(name);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let daemon = Some(SocketDaemon::start(&socket, &refs));
        Side {
            socket,
            args,
            daemon,
        }
    }

    /// SIGKILL, then the same command line again.
    fn kill_and_restart(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.kill9();
        }
        let refs: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.daemon = Some(SocketDaemon::start(&self.socket, &refs));
    }

    fn client(&self) -> Client {
        Client::connect_with(
            &self.socket,
            ClientOptions {
                restart_deadline: PATIENCE,
                ..ClientOptions::default()
            },
        )
        .unwrap()
    }
}

struct Rig {
    source: Side,
    destination: Side,
    link: FaultyLink,
    src: Client,
    dst: Client,
    src_mem: vmpager_client::VmMemory,
    dst_mem: vmpager_client::VmMemory,
    want: Vec<u8>,
    _dir: TestDir,
}

fn rig(name: &str) -> Rig {
    let dir = TestDir::new(name);
    let port = free_port();
    let liveness = ["--migration-liveness-ms".to_string(), "500".to_string()];
    let mut src_args = vec![
        "--migration-listen".to_string(),
        format!("127.0.0.1:{port}"),
    ];
    src_args.extend(liveness.clone());
    let mut dst_args = liveness.to_vec();
    dst_args.extend(["--migration-deadline".to_string(), "90".to_string()]);
    let source = Side::start(&dir, "src.sock", src_args);
    let destination = Side::start(&dir, "dst.sock", dst_args);
    let link = FaultyLink::start(([127, 0, 0, 1], port).into(), Duration::ZERO).unwrap();
    link.set_rate(RATE);
    let src = source.client();
    let dst = destination.client();
    let mut image = vec![0u8; PAGES * PAGE];
    PatternGen::new(11).fill(&mut image);
    let path = dir.join("snapshot.img");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&image)
        .unwrap();
    let spec = |source| VmSpec {
        regions: vec![RegionSpec::new(1 << 32, (PAGES * PAGE) as u64, 0)],
        source,
        populate: PopulateMethod::Copy,
        ..Default::default()
    };
    let src_mem = src
        .create_mapped_vm(spec(PageSource::File(std::fs::File::open(&path).unwrap())))
        .unwrap();
    // The guest's writes on the source before the switchover: a mark in every other page.
    let mut want = image;
    for p in (0..PAGES).step_by(2) {
        let mark = 0xfeed_0000_0000_0000 | p as u64;
        write_word(&src_mem.regions()[0], p, mark);
        want[p * PAGE..p * PAGE + 8].copy_from_slice(&mark.to_ne_bytes());
    }
    src.migrate_out(src_mem.vm_id(), ID, KEY, false).unwrap();
    let dst_mem = dst.create_mapped_vm(spec(PageSource::Remote)).unwrap();
    dst.migrate_in(dst_mem.vm_id(), ID, KEY, &link.addr().to_string())
        .unwrap();
    Rig {
        source,
        destination,
        link,
        src,
        dst,
        src_mem,
        dst_mem,
        want,
        _dir: dir,
    }
}

impl Rig {
    fn status(&self) -> MigrationStatus {
        self.dst.migration(self.dst_mem.vm_id()).unwrap()
    }

    /// Waits until the destination has at least `share` percent of the pages (and not all).
    fn wait_share(&self, share: u64) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let s = self.status();
            let c = s.counters;
            assert!(
                c.pages_done < c.total_pages,
                "the migration ended before {share} %: the link is too fast for this test: {s:?}"
            );
            if c.pages_done * 100 >= c.total_pages * share {
                return;
            }
            assert!(Instant::now() < deadline, "never {share} %: {s:?}");
            std::thread::yield_now();
        }
    }

    /// Reads every page on the destination (faults where the push has not been) and waits
    /// for the migration to complete; returns its last status.
    fn finish_and_verify(&self) -> MigrationStatus {
        let r = &self.dst_mem.regions()[0];
        for k in 0..PAGES {
            let p = (k * 997) % PAGES;
            assert_eq!(
                read_page(r, p),
                self.want[p * PAGE..(p + 1) * PAGE],
                "page {p}"
            );
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            let s = self.status();
            if s.state == MigrationState::Complete {
                assert_eq!(s.counters.pages_done, PAGES as u64);
                return s;
            }
            assert!(Instant::now() < deadline, "never complete: {s:?}");
            std::thread::yield_now();
        }
    }
}

#[test]
fn a_cut_connection_is_made_again_and_the_migration_goes_on() {
    if !have_uffd() {
        return;
    }
    let rig = rig("migrate-cut");
    rig.wait_share(25);
    rig.link.cut();
    let s = rig.finish_and_verify();
    assert!(s.counters.reconnects >= 1, "{s:?}");
}

#[test]
fn a_black_hole_is_detected_and_the_migration_goes_on_after_it() {
    if !have_uffd() {
        return;
    }
    let rig = rig("migrate-hole");
    rig.wait_share(25);
    rig.link.set_blackhole(true);
    // Nothing arrives any more: the destination must notice (liveness, 500 ms) and try again.
    let deadline = Instant::now() + PATIENCE;
    let stuck = rig.status().counters.pages_done;
    while rig.link.accepted() < 3 {
        assert!(
            Instant::now() < deadline,
            "no reconnect into the black hole"
        );
        std::thread::yield_now();
    }
    assert_eq!(
        rig.status().counters.pages_done,
        stuck,
        "pages through a black hole"
    );
    rig.link.set_blackhole(false);
    let s = rig.finish_and_verify();
    assert!(s.counters.reconnects >= 1, "{s:?}");
}

#[test]
fn a_killed_source_daemon_restarted_resumes_its_side() {
    if !have_uffd() {
        return;
    }
    let mut rig = rig("migrate-kill-src");
    rig.wait_share(25);
    rig.source.kill_and_restart();
    // The source VMM's client hands its VM to the new daemon and asks it again to serve the
    // migration; the destination reconnects.
    let s = rig.finish_and_verify();
    assert!(s.counters.reconnects >= 1, "{s:?}");
    assert!(rig.src.restarts() >= 1);
    drop(rig.src_mem);
}

#[test]
fn a_killed_destination_daemon_restarted_resumes_its_side() {
    if !have_uffd() {
        return;
    }
    let mut rig = rig("migrate-kill-dst");
    rig.wait_share(25);
    let before = rig.status().counters.pages_done;
    rig.destination.kill_and_restart();
    // The destination VMM's client hands the VM back; the new daemon pulls what it lacks and
    // keeps what the page-state file says it has.
    let s = rig.finish_and_verify();
    assert!(rig.dst.restarts() >= 1);
    assert!(
        s.counters.pages_pulled + s.counters.pages_pushed <= PAGES as u64 - before / 2,
        "the restarted destination asked again for what it had: {s:?} after {before}"
    );
    drop(rig.src_mem);
}

#[test]
fn abandoning_an_unreachable_source_poisons_what_is_missing_never_zeros() {
    if !have_uffd() {
        return;
    }
    let rig = rig("migrate-abandon");
    rig.wait_share(10);
    rig.link.set_blackhole(true);
    let s = rig.dst.abandon_migration(rig.dst_mem.vm_id()).unwrap();
    assert_eq!(s.state, MigrationState::Abandoned);
    let missing = s.counters.total_pages - s.counters.pages_done;
    assert!(missing > 0 && s.counters.pages_poisoned == missing, "{s:?}");
    // Pages that arrived are the source's; a page that did not is poisoned (EFAULT here,
    // SIGBUS in a guest), never zeros.
    let r = &rig.dst_mem.regions()[0];
    let (mut here, mut poisoned) = (0, 0);
    for p in 0..PAGES {
        match probe(r, p) {
            Ok(_) => {
                assert_eq!(
                    read_page(r, p),
                    rig.want[p * PAGE..(p + 1) * PAGE],
                    "page {p}"
                );
                here += 1;
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "page {p}: {e}");
                poisoned += 1;
            }
        }
    }
    assert!(
        here > 0 && poisoned > 0,
        "{here} pages here, {poisoned} poisoned"
    );
}
