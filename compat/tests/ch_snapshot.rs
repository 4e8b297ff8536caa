//! cloud-hypervisor snapshot directories: slot mapping, the Config payload, unreadable files and
//! bad snapshot trees.

mod snapshot_fixture;

use serde_json::{json, Value};
use snapshot_fixture::*;
use vmpager_compat::cloud_hypervisor::snapshot::*;

#[test]
fn opens_a_two_zone_snapshot() {
    let dir = TempDir::new("good");
    // Shorter than the ranges' total (4 MiB + 128 KiB): reported, not refused.
    write_dir(
        &dir.0,
        &config(),
        &state(&memory_manager()),
        4 * MIB + 4 * KIB,
    );
    let snap = SnapshotDir::open(&dir.0).unwrap();

    assert_eq!(snap.memory_len, 4 * MIB + 4 * KIB);
    assert_eq!(snap.memory_path, dir.0.join("memory-ranges"));
    assert_eq!(snap.config, config());
    assert_eq!(snap.memory_manager, memory_manager());
    assert_eq!(
        snap.state_bytes,
        std::fs::read(dir.0.join("state.json")).unwrap()
    );
    let slot = |slot, gpa, size, file_offset, zone: &str, page_size, snapshot_offset| Slot {
        slot,
        gpa,
        size,
        file_offset,
        zone_id: zone.to_string(),
        page_size,
        snapshot_offset,
    };
    assert_eq!(
        snap.slots,
        vec![
            slot(0, 0, 64 * KIB, 0, "mem0", 4096, 4 * MIB),
            slot(
                1,
                4 * GIB,
                64 * KIB,
                64 * KIB,
                "mem0",
                4096,
                4 * MIB + 64 * KIB
            ),
            slot(2, 4 * GIB + 2 * MIB, 4 * MIB, 0, "huge0", 2 * MIB, 0),
        ]
    );

    assert_eq!(snap.slot_for_gpa(0).unwrap().slot, 0);
    assert_eq!(snap.slot_for_gpa(64 * KIB - 1).unwrap().slot, 0);
    assert!(snap.slot_for_gpa(64 * KIB).is_none());
    assert!(snap.slot_for_gpa(3 * GIB).is_none());
    assert_eq!(snap.slot_for_gpa(4 * GIB + 4095).unwrap().slot, 1);
    assert_eq!(snap.slot_for_gpa(4 * GIB + 6 * MIB - 1).unwrap().slot, 2);
    assert!(snap.slot_for_gpa(4 * GIB + 6 * MIB).is_none());
    assert!(snap.slot_for_gpa(u64::MAX).is_none());
}

#[test]
fn from_bytes_checks_exactly_what_open_reads() {
    let dir = TempDir::new("frombytes");
    write_dir(&dir.0, &config(), &state(&memory_manager()), 8 * KIB);
    let opened = SnapshotDir::open(&dir.0).unwrap();
    let config_json = std::fs::read(dir.0.join(CONFIG_FILE)).unwrap();
    let parsed =
        SnapshotDir::from_bytes(&dir.0, &config_json, opened.state_bytes.clone(), 8 * KIB).unwrap();
    assert_eq!(parsed.slots, opened.slots);
    assert_eq!(parsed.config, opened.config);
    assert_eq!(parsed.memory_manager, opened.memory_manager);
    assert_eq!(parsed.memory_path, opened.memory_path);
    let err = SnapshotDir::from_bytes(&dir.0, b"{", Vec::new(), 0).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn a_range_may_hold_several_slots() {
    let mut mm = memory_manager();
    mm["memory_ranges"] = json!({"data": [{"gpa": 0, "length": 64 * KIB},
                                           {"gpa": 4 * GIB, "length": 6 * MIB}]});
    mm["guest_ram_mappings"][1]["size"] = json!(2 * MIB);
    let snap = open_with("coalesced", &config(), &mm).unwrap();
    let offsets: Vec<u64> = snap.slots.iter().map(|s| s.snapshot_offset).collect();
    assert_eq!(offsets, vec![0, 64 * KIB, 64 * KIB + 2 * MIB]);
}

#[test]
fn global_memory_settings_apply_without_zones() {
    let mm = json!({
        "memory_ranges": {"data": [{"gpa": 0, "length": 8 * MIB}]},
        "guest_ram_mappings": [mapping(0, 0, 8 * MIB, "mem0", 0)],
        "boot_ram": 8 * MIB
    });
    let mut config = json!({"memory": {"size": 8 * MIB, "hugepages": true}});
    let snap = open_with("nozones", &config, &mm).unwrap();
    assert_eq!(snap.slots[0].page_size, 2 * MIB);
    assert_eq!(snap.slots[0].zone_id, "mem0");

    config["memory"]["hugepage_size"] = json!(4 * MIB);
    let snap = open_with("nozones-4m", &config, &mm).unwrap();
    assert_eq!(snap.slots[0].page_size, 4 * MIB);

    // No memory section at all, or null zones: 4 KiB pages.
    for config in [
        json!({}),
        json!({"memory": {"size": 8 * MIB, "zones": null}}),
    ] {
        let snap = open_with("defaults", &config, &mm).unwrap();
        assert_eq!(snap.slots[0].page_size, 4096);
    }
}

#[test]
fn config_payload_is_vm_migration_config() {
    let dir = TempDir::new("payload");
    write_dir(&dir.0, &config(), &state(&memory_manager()), 0);
    let snap = SnapshotDir::open(&dir.0).unwrap();
    let cpuid = common_cpuid_for(&snap.config);
    let payload = snap.config_payload(cpuid.clone());
    assert!(payload.starts_with(br#"{"vm_config":{"#));
    let parsed: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        parsed,
        json!({"vm_config": config(), "common_cpuid": cpuid,
               "memory_manager_data": memory_manager(), "memory_mode": "Postcopy"})
    );
}

fn signature(cpuid: &Value) -> Vec<u8> {
    let entry = &cpuid.as_array().unwrap()[0];
    assert_eq!(entry["function"], json!(0x4000_0000u32));
    assert_eq!(entry["index"], json!(0));
    assert_eq!(entry["flags"], json!(0));
    assert_eq!(entry["eax"], json!(0));
    ["ebx", "ecx", "edx"]
        .iter()
        .flat_map(|r| (entry[r].as_u64().unwrap() as u32).to_le_bytes())
        .collect()
}

#[test]
fn common_cpuid_carries_the_hypervisor_signature() {
    let kvm = common_cpuid_for(&config());
    assert_eq!(kvm.as_array().unwrap().len(), 1);
    assert_eq!(signature(&kvm), b"KVMKVMKVM\0\0\0");
    assert_eq!(signature(&common_cpuid_for(&json!({}))), b"KVMKVMKVM\0\0\0");
    let mut hyperv = config();
    hyperv["cpus"]["kvm_hyperv"] = json!(true);
    assert_eq!(signature(&common_cpuid_for(&hyperv)), b"Linux KVM Hv");
}

#[test]
fn missing_files_are_io_errors_naming_the_file() {
    for file in [CONFIG_FILE, STATE_FILE, MEMORY_FILE] {
        let dir = TempDir::new("missing");
        write_dir(&dir.0, &config(), &state(&memory_manager()), 0);
        std::fs::remove_file(dir.0.join(file)).unwrap();
        let err = SnapshotDir::open(&dir.0).unwrap_err();
        assert!(err.is_io() && !err.is_bad_input(), "{err:?}");
        assert!(err.to_string().contains(file), "{err}");
    }
    let dir = TempDir::new("memdir");
    write_dir(&dir.0, &config(), &state(&memory_manager()), 0);
    std::fs::remove_file(dir.0.join(MEMORY_FILE)).unwrap();
    std::fs::create_dir(dir.0.join(MEMORY_FILE)).unwrap();
    let err = SnapshotDir::open(&dir.0).unwrap_err();
    assert!(matches!(err, SnapshotError::NotAFile { .. }), "{err:?}");
}

#[test]
fn bad_json_files_are_refused() {
    let dir = TempDir::new("badjson");
    write_dir(&dir.0, &config(), &state(&memory_manager()), 0);
    std::fs::write(dir.0.join(CONFIG_FILE), b"{\"memory\": ").unwrap();
    let err = SnapshotDir::open(&dir.0).unwrap_err();
    assert!(matches!(err, SnapshotError::Json { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("config.json is not valid JSON: EOF"),
        "{err}"
    );

    let dir = TempDir::new("toolarge");
    write_dir(&dir.0, &config(), &state(&memory_manager()), 0);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.0.join(STATE_FILE))
        .unwrap();
    f.set_len(MAX_JSON_BYTES + 1).unwrap(); // Sparse: nothing is written.
    let err = SnapshotDir::open(&dir.0).unwrap_err();
    assert!(matches!(err, SnapshotError::TooLarge { len, .. } if len == MAX_JSON_BYTES + 1));
    assert!(err.to_string().contains("state.json"));
}

#[test]
fn bad_snapshot_trees_are_refused() {
    let cases: Vec<(&str, Value)> = vec![
        (
            "nomm",
            json!({"snapshots": {"cpu-manager": {"snapshots": {}, "snapshot_data": null}},
                        "snapshot_data": null}),
        ),
        ("nosnapshots", json!({"snapshot_data": null})),
        ("nulldata", state_with_mm_data(Value::Null)),
        (
            "notstring",
            state_with_mm_data(json!({"state": {"memory_ranges": {}}})),
        ),
        (
            "notjson",
            state_with_mm_data(json!({"state": "{\"memory_ranges\": "})),
        ),
        ("notobject", state_with_mm_data(json!({"state": "[1, 2]"}))),
    ];
    for (name, state) in cases {
        let dir = TempDir::new(name);
        write_dir(&dir.0, &config(), &state, 0);
        let err = SnapshotDir::open(&dir.0).unwrap_err();
        let ok = match name {
            "nomm" => matches!(err, SnapshotError::NoMemoryManager { .. }),
            "nosnapshots" => matches!(err, SnapshotError::BadField { .. }),
            "nulldata" | "notstring" => matches!(err, SnapshotError::StateNotString { .. }),
            _ => matches!(err, SnapshotError::StateNotJson { .. }),
        };
        assert!(ok, "{name}: {err:?}");
        assert!(
            err.is_bad_input() && err.to_string().contains("state.json"),
            "{err}"
        );
    }
}
