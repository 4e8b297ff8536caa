//! Real KVM guests over memory owned by vmpagerd running as a separate process: every first
//! touch of guest RAM is a userfaultfd fault served by the daemon.

mod common;

use common::*;
use vmpager_client::demo::{expected_checksum, run_scenario, ScenarioConfig, DEMO_GPA};
use vmpager_client::refvmm::{split_evenly, GuestRegion, RefVm, Task, Workload};
use vmpager_client::{Client, PageSource, PopulateMethod, RegionSpec, VmSpec};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn scenario(memory: u64, vcpus: usize, populate: PopulateMethod) -> ScenarioConfig {
    ScenarioConfig {
        write_pattern: true,
        ..ScenarioConfig::new(memory, vcpus, populate)
    }
}

#[test]
fn guest_sees_the_snapshot_exactly_with_copy_and_with_continue() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("snapshot");
    let daemon = daemon_process(&dir, &[]);
    let img = image(&dir, "snap.img", 32 * MIB, 1);
    let client = Client::connect(daemon.socket_path()).unwrap();
    for (populate, wire) in [(PopulateMethod::Copy, 1), (PopulateMethod::Continue, 2)] {
        let (vm, report) =
            run_scenario(&client, Some(&img), &scenario(32 * MIB, 2, populate)).unwrap();
        let s = report.stats;
        assert_eq!(s.populate_method, wire);
        // Every page came from the snapshot, each installed exactly once.
        assert_eq!(s.pages_from_source, report.pages, "{s:?}");
        assert_eq!(s.pages_zero, 0);
        // Every fault installed a run (its page plus prefetched ones), or was a duplicate.
        assert_eq!(
            s.faults,
            s.pages_from_source - s.pages_prefetched + s.coalesced + s.eexist,
            "{s:?}"
        );
        assert_eq!(s.latency_samples, s.faults);
        assert!(s.latency_p50_ns > 0 && s.latency_p50_ns <= s.latency_max_ns);
        client.detach(vm.vm_id()).unwrap();
    }
}

#[test]
fn bytes_past_the_end_of_a_short_image_are_zeros() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("short");
    let daemon = daemon_process(&dir, &[]);
    // 5 MiB + 104 bytes of image for 8 MiB of RAM: the page holding the end is part data, part
    // zeros; later pages are zero pages.
    let img = image(&dir, "short.img", 5 * MIB + 104, 2);
    let client = Client::connect(daemon.socket_path()).unwrap();
    let (_vm, report) = run_scenario(
        &client,
        Some(&img),
        &scenario(8 * MIB, 2, PopulateMethod::Copy),
    )
    .unwrap();
    let data_pages = (5 * MIB + 104).div_ceil(PAGE);
    assert_eq!(report.stats.pages_from_source, data_pages);
    assert_eq!(report.stats.pages_zero, report.pages - data_pages);
}

#[test]
fn zero_source_serves_zero_pages() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("zero");
    let daemon = daemon_process(&dir, &[]);
    let client = Client::connect(daemon.socket_path()).unwrap();
    // run_scenario checks every vCPU's checksum against all-zero memory and the written pattern.
    let (_vm, report) = run_scenario(
        &client,
        None,
        &scenario(16 * MIB, 2, PopulateMethod::Default),
    )
    .unwrap();
    assert_eq!(report.stats.pages_zero, report.pages);
    assert_eq!(report.stats.pages_from_source, 0);
}

#[test]
fn vcpus_faulting_on_the_same_pages_are_coalesced() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("same");
    let daemon = daemon_process(&dir, &[]);
    let memory = 8 * MIB;
    let img = image(&dir, "same.img", memory, 3);
    let client = Client::connect(daemon.socket_path()).unwrap();
    for populate in [PopulateMethod::Copy, PopulateMethod::Continue] {
        let vm_mem = client
            .create_mapped_vm(VmSpec {
                regions: vec![RegionSpec::new(DEMO_GPA, memory, 0)],
                source: PageSource::File(img.try_clone().unwrap()),
                populate,
                ..Default::default()
            })
            .unwrap();
        let r = &vm_mem.regions()[0];
        let regions = [GuestRegion {
            gpa: DEMO_GPA,
            host_addr: r.host_addr(),
            size: memory,
        }];
        // SAFETY: `vm_mem` keeps the region mapped for longer than `vm` lives.
        let vm = unsafe { RefVm::new(&regions, 4) }.unwrap();
        // Four vCPUs read all of memory at once, two of them in the same order, two of them
        // starting in the middle: many faults hit a page another vCPU is already waiting on.
        let whole = Task {
            workload: Workload::Checksum,
            gpa_start: DEMO_GPA,
            gpa_end: DEMO_GPA + memory,
        };
        let half = DEMO_GPA + memory / 2;
        let second_half_first = vec![
            Task {
                gpa_start: half,
                ..whole
            },
            Task {
                gpa_end: half,
                ..whole
            },
        ];
        let plans = vec![
            vec![whole],
            vec![whole],
            second_half_first.clone(),
            second_half_first,
        ];
        let reports = vm.run(&plans).unwrap();
        let all = expected_checksum(&img, 0, memory).unwrap();
        let upper = expected_checksum(&img, memory / 2, memory / 2).unwrap();
        let lower = expected_checksum(&img, 0, memory / 2).unwrap();
        assert_eq!(reports[0].results[0].value, all);
        assert_eq!(reports[1].results[0].value, all);
        for r in &reports[2..] {
            assert_eq!((r.results[0].value, r.results[1].value), (upper, lower));
        }
        let s = client.stats(vm_mem.vm_id()).unwrap();
        // Each page was fetched from the source and installed exactly once, however many
        // vCPUs faulted on it.
        assert_eq!(s.pages_from_source, memory / PAGE, "{populate:?}: {s:?}");
        assert_eq!(
            s.faults,
            s.pages_from_source - s.pages_prefetched + s.coalesced + s.eexist,
            "{s:?}"
        );
        drop(vm);
        client.detach(vm_mem.vm_id()).unwrap();
    }
}

#[test]
fn vcpus_on_different_pages_in_several_regions() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("regions");
    let daemon = daemon_process(&dir, &[]);
    let img = image(&dir, "regions.img", 12 * MIB, 4);
    let client = Client::connect(daemon.socket_path()).unwrap();
    // Two regions whose content comes from different parts of the image.
    let specs = vec![
        RegionSpec::new(DEMO_GPA, 4 * MIB, 8 * MIB),
        RegionSpec::new(2 * DEMO_GPA, 6 * MIB, 0),
    ];
    let vm_mem = client
        .create_mapped_vm(VmSpec {
            regions: specs.clone(),
            source: PageSource::File(img.try_clone().unwrap()),
            populate: PopulateMethod::Default,
            ..Default::default()
        })
        .unwrap();
    let regions: Vec<_> = vm_mem
        .regions()
        .iter()
        .map(|r| GuestRegion {
            gpa: r.spec().gpa(),
            host_addr: r.host_addr(),
            size: r.len() as u64,
        })
        .collect();
    // SAFETY: `vm_mem` keeps the regions mapped for longer than `vm` lives.
    let vm = unsafe { RefVm::new(&regions, 3) }.unwrap();
    let plans = split_evenly(&regions, 3, Workload::Checksum);
    let reports = vm.run(&plans).unwrap();
    for (plan, report) in plans.iter().zip(&reports) {
        for (task, result) in plan.iter().zip(&report.results) {
            let spec = specs
                .iter()
                .find(|s| (s.gpa()..s.gpa() + s.size()).contains(&task.gpa_start))
                .unwrap();
            let off = spec.source_offset() + task.gpa_start - spec.gpa();
            assert_eq!(
                result.value,
                expected_checksum(&img, off, task.gpa_end - task.gpa_start).unwrap()
            );
        }
    }
    assert_eq!(
        client.stats(vm_mem.vm_id()).unwrap().pages_from_source,
        10 * MIB / PAGE
    );
}

#[test]
fn two_vms_on_one_daemon_at_once() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("two");
    let daemon = daemon_process(&dir, &[]);
    let images = [
        image(&dir, "a.img", 16 * MIB, 5),
        image(&dir, "b.img", 16 * MIB, 6),
    ];
    std::thread::scope(|s| {
        let runs: Vec<_> = images
            .iter()
            .map(|img| {
                let path = daemon.socket_path().to_owned();
                s.spawn(move || {
                    let client = Client::connect(&path).unwrap();
                    let (vm, report) = run_scenario(
                        &client,
                        Some(img),
                        &scenario(16 * MIB, 2, PopulateMethod::Default),
                    )
                    .unwrap();
                    (vm.vm_id(), report.stats.pages_from_source)
                })
            })
            .collect();
        let results: Vec<_> = runs.into_iter().map(|h| h.join().unwrap()).collect();
        assert_ne!(results[0].0, results[1].0, "distinct VM ids");
        assert!(results.iter().all(|&(_, pages)| pages == 16 * MIB / PAGE));
    });
}
