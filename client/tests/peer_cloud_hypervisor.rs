//! The cloud-hypervisor receiver peer (`vmpager_client::peers::cloud_hypervisor`) against a
//! minimal sender written here: memfds filled on demand from a test pattern, a Config with two
//! zones (one split into two slots sharing a memfd at different offsets), a fault connection
//! that answers `PageFault` by writing the page into the memfd and replying `Ok`.
//!
//! The 2 MiB hugepage test raises `/proc/sys/vm/nr_hugepages` if it must; when hugepages cannot
//! be had it prints why and passes, unless `VMPAGER_REQUIRE_KVM=1` is set (then it fails).

mod ch_sender;

use ch_sender::*;

#[test]
fn full_session_pulls_every_page_in_table_order() {
    let Session { vm, faults, guest } =
        full_session("full", Guest::two_zones(), FaultPolicy::default(), false);
    // The handler shuts the fault connection down once every page is served.
    let log = faults.join().expect("fault thread");
    assert!(log.eof, "the fault connection did not reach EOF");
    assert_every_page_once(&log, &guest, 4096);
    let table_order: Vec<u64> = guest
        .ranges
        .iter()
        .flat_map(|r| (0..r.length / 4096).map(move |i| r.gpa + i * 4096))
        .collect();
    let asked: Vec<u64> = log.requests.iter().map(|r| r.gpa).collect();
    assert_eq!(asked, table_order, "background pull out of table order");

    assert_eq!(vm.slots().len(), 3);
    assert_eq!(vm.slots()[1].file_offset(), 256 * KIB);
    assert_eq!(vm.slots()[2].zone_id(), "zone1");
    assert!(vm.slots().iter().all(|s| s.page_size() == 4096));
    // Every page is mapped now: reads see the pattern without faulting.
    assert_guest_reads_pattern(&vm, &guest);
    let mut buf = [0u8; 8];
    let err = vm.read_gpa(512 * KIB, &mut buf).expect_err("hole");
    assert!(matches!(err, PeerError::OutOfRange { .. }), "{err}");
    let err = vm
        .read_gpa(256 * KIB - 4, &mut buf)
        .expect_err("past a slot");
    assert!(matches!(err, PeerError::OutOfRange { .. }), "{err}");

    let report = vm.wait(WAIT).expect("wait");
    assert_eq!(report.demand_faults, 0);
    assert_eq!(report.background_pulls, pages(&guest));
    assert_eq!(report.errors, 0);
    assert!(report.shutdown_sent);
}

#[test]
fn host_reads_raise_demand_faults() {
    let (gate, policy) = Gate::new(None);
    let Session { vm, faults, guest } = full_session("demand", Guest::two_zones(), policy, true);
    // While the first background request (gpa 0) is held, a read of two pages of slot 2
    // faults, far ahead of the background cursor.
    let gpa = 2 * MIB + 5 * 4096 - 100;
    let mut buf = vec![0u8; 200];
    gate.read_while_held(&vm, gpa, &mut buf).expect("read_gpa");
    assert_eq!(buf, pattern_of(gpa, buf.len()));

    let log = faults.join().expect("fault thread");
    assert!(log.eof);
    assert_every_page_once(&log, &guest, 4096);
    assert_eq!(
        log.requests[0].gpa, 0,
        "the background starts at the table's start"
    );
    assert_eq!(
        log.requests[1].gpa,
        2 * MIB + 4 * 4096,
        "the pending fault is served next"
    );
    assert_guest_reads_pattern(&vm, &guest);
    let report = vm.wait(WAIT).expect("wait");
    assert_eq!(report.demand_faults, 2, "{report:?}");
    assert_eq!(report.background_pulls, pages(&guest) - 2);
    assert_eq!(report.errors, 0);
    assert!(report.shutdown_sent);
}

#[test]
fn demand_fault_answered_with_error_fails_the_handler() {
    let bad = 2 * MIB + 4 * 4096;
    let (gate, policy) = Gate::new(Some(bad));
    let Session { vm, faults, .. } =
        full_session("demand-error", Guest::two_zones(), policy, false);
    let mut buf = [0u8; 16];
    let err = gate
        .read_while_held(&vm, bad + 8, &mut buf)
        .expect_err("the read must report the failed handler");
    assert!(matches!(err, PeerError::HandlerFailed { .. }), "{err}");
    assert_eq!(err.kind(), PeerErrorKind::SenderFailed);
    let log = faults.join().expect("fault thread");
    assert!(
        log.eof,
        "the receiver closes the fault connection when it fails"
    );
    assert_eq!(log.requests.len(), 2);
    let err = vm.wait(WAIT).expect_err("wait must fail");
    assert!(
        matches!(err, PeerError::PageFaultRefused { gpa, .. } if gpa == bad),
        "{err}"
    );
    assert!(err.to_string().contains("Error"), "{err}");
}

/// Makes `count` 2 MiB hugepages free, raising `nr_hugepages` if needed, or says why not.
fn reserve_hugepages(count: u64) -> Result<(), String> {
    const DIR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";
    let read = |name: &str| -> Result<u64, String> {
        std::fs::read_to_string(format!("{DIR}/{name}"))
            .map_err(|e| format!("cannot read {DIR}/{name}: {e}"))?
            .trim()
            .parse()
            .map_err(|e| format!("{DIR}/{name}: {e}"))
    };
    let available = |read: &dyn Fn(&str) -> Result<u64, String>| -> Result<u64, String> {
        Ok(read("free_hugepages")?.saturating_sub(read("resv_hugepages")?))
    };
    let free = available(&read)?;
    if free < count {
        let total = read("nr_hugepages")?;
        std::fs::write(
            "/proc/sys/vm/nr_hugepages",
            (total + count - free).to_string(),
        )
        .map_err(|e| format!("cannot raise /proc/sys/vm/nr_hugepages: {e}"))?;
    }
    let free = available(&read)?;
    if free < count {
        return Err(format!(
            "only {free} free 2 MiB hugepages after raising nr_hugepages (need {count})"
        ));
    }
    Ok(())
}

#[test]
fn hugepage_zone() {
    let guest = reserve_hugepages(2)
        .and_then(|()| Guest::hugepages().map_err(|e| format!("hugetlb memfd: {e}")));
    let guest = match guest {
        Ok(guest) => guest,
        Err(why) => {
            if std::env::var("VMPAGER_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("hugepage_zone: {why}, but VMPAGER_REQUIRE_KVM=1");
            }
            eprintln!("hugepage_zone: SKIPPED, {why} (set VMPAGER_REQUIRE_KVM=1 to fail instead)");
            return;
        }
    };
    let (gate, policy) = Gate::new(None);
    let Session { vm, faults, guest } = full_session("huge", guest, policy, false);
    assert_eq!(vm.slots()[0].page_size(), 2 * MIB);
    assert_eq!(vm.slots()[0].zone_id(), "mem0");
    let gpa = 3 * MIB - 32;
    let mut buf = [0u8; 64];
    gate.read_while_held(&vm, gpa, &mut buf).expect("read_gpa");
    assert_eq!(buf.to_vec(), pattern_of(gpa, buf.len()));
    let log = faults.join().expect("fault thread");
    assert!(log.eof);
    assert_every_page_once(&log, &guest, 2 * MIB);
    assert_eq!(
        log.requests.iter().map(|r| r.gpa).collect::<Vec<_>>(),
        vec![0, 2 * MIB]
    );
    assert_guest_reads_pattern(&vm, &guest);
    let report = vm.wait(WAIT).expect("wait");
    assert_eq!(report.demand_faults, 1);
    assert_eq!(report.background_pulls, 1);
    assert!(report.shutdown_sent);
}
