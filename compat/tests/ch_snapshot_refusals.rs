//! cloud-hypervisor snapshot directories: refusals of missing or ill-typed fields, bad memory
//! ranges, slots and zones.

mod snapshot_fixture;

use serde_json::{json, Value};
use snapshot_fixture::*;
use vmpager_compat::cloud_hypervisor::snapshot::*;

/// A change to a JSON value.
type Edit = fn(&mut Value);

#[test]
fn missing_and_ill_typed_fields_are_refused() {
    let mut mm = memory_manager();
    mm["memory_ranges"]["data"][1]
        .as_object_mut()
        .unwrap()
        .remove("gpa");
    let err = refusal("nogpa", &config(), &mm);
    assert_eq!(
        err.to_string(),
        format!(
            "{}: memory-manager state: memory_ranges.data[1].gpa is missing or not an unsigned integer",
            match &err { SnapshotError::BadField { path, .. } => path.display().to_string(), _ => panic!() }
        )
    );

    let edits: Vec<(&str, Edit)> = vec![
        ("noranges", |mm| {
            mm.as_object_mut().unwrap().remove("memory_ranges");
        }),
        ("nomappings", |mm| mm["guest_ram_mappings"] = json!({})),
        ("negative", |mm| {
            mm["guest_ram_mappings"][0]["size"] = json!(-4096)
        }),
        ("bigslot", |mm| {
            mm["guest_ram_mappings"][0]["slot"] = json!(1u64 << 32)
        }),
        ("zonenum", |mm| {
            mm["guest_ram_mappings"][0]["zone_id"] = json!(0)
        }),
        ("novirtiomem", |mm| {
            mm["guest_ram_mappings"][0]
                .as_object_mut()
                .unwrap()
                .remove("virtio_mem");
        }),
        ("fileoffset", |mm| {
            mm["guest_ram_mappings"][2]["file_offset"] = json!("0")
        }),
    ];
    for (name, edit) in edits {
        let mut mm = memory_manager();
        edit(&mut mm);
        let err = refusal(name, &config(), &mm);
        assert!(
            matches!(err, SnapshotError::BadField { .. }),
            "{name}: {err:?}"
        );
    }

    let config_edits: Vec<(&str, Edit)> = vec![
        ("hugeyes", |c| {
            c["memory"]["zones"][1]["hugepages"] = json!("yes")
        }),
        ("zoneid", |c| {
            c["memory"]["zones"][0]
                .as_object_mut()
                .unwrap()
                .remove("id");
        }),
        ("zonesobj", |c| c["memory"]["zones"] = json!({})),
        ("memorynum", |c| c["memory"] = json!(1)),
        ("hugesize", |c| {
            c["memory"]["zones"][1]["hugepage_size"] = json!(2.5)
        }),
    ];
    for (name, edit) in config_edits {
        let mut config = config();
        edit(&mut config);
        let err = refusal(name, &config, &memory_manager());
        assert!(
            matches!(err, SnapshotError::BadField { .. }),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}

#[test]
fn bad_ranges_are_refused() {
    let with_ranges = |ranges: Value| {
        let mut mm = memory_manager();
        mm["memory_ranges"]["data"] = ranges;
        mm
    };
    let err = refusal(
        "unaligned",
        &config(),
        &with_ranges(json!([{"gpa": 512, "length": 4096}])),
    );
    assert!(
        matches!(
            err,
            SnapshotError::RangeUnaligned {
                index: 0,
                gpa: 512,
                ..
            }
        ),
        "{err:?}"
    );
    let err = refusal(
        "shortlen",
        &config(),
        &with_ranges(json!([{"gpa": 0, "length": 100}])),
    );
    assert!(
        matches!(err, SnapshotError::RangeUnaligned { .. }),
        "{err:?}"
    );
    let err = refusal(
        "empty",
        &config(),
        &with_ranges(json!([{"gpa": 0, "length": 0}])),
    );
    assert!(
        matches!(err, SnapshotError::RangeEmpty { index: 0, .. }),
        "{err:?}"
    );
    let top = u64::MAX - 4095;
    let err = refusal(
        "overflow",
        &config(),
        &with_ranges(json!([{"gpa": top, "length": 8192}])),
    );
    assert!(
        matches!(err, SnapshotError::RangeOverflow { index: 0, .. }),
        "{err:?}"
    );
    let half = 1u64 << 63;
    let err = refusal(
        "denseoverflow",
        &config(),
        &with_ranges(json!([{"gpa": 0, "length": half}, {"gpa": half, "length": half}])),
    );
    assert!(
        matches!(err, SnapshotError::RangeOverflow { index: 1, .. }),
        "{err:?}"
    );
    let err = refusal(
        "overlap",
        &config(),
        &with_ranges(json!([{"gpa": 8192, "length": 8192}, {"gpa": 0, "length": 12288}])),
    );
    assert!(
        matches!(
            err,
            SnapshotError::RangesOverlap {
                first: 1,
                second: 0,
                ..
            }
        ),
        "{err:?}"
    );
    let many: Vec<Value> = (0..=MAX_RANGES as u64)
        .map(|i| json!({"gpa": i * 4096, "length": 4096}))
        .collect();
    let err = refusal("many", &config(), &with_ranges(Value::Array(many)));
    assert!(
        matches!(err, SnapshotError::TooMany { count: 513, .. }),
        "{err:?}"
    );
}

#[test]
fn bad_slots_are_refused() {
    let with_slot = |i: usize, edit: &dyn Fn(&mut Value)| {
        let mut mm = memory_manager();
        edit(&mut mm["guest_ram_mappings"][i]);
        mm
    };
    let err = refusal(
        "outside",
        &config(),
        &with_slot(0, &|m| m["gpa"] = json!(GIB)),
    );
    assert!(
        matches!(err, SnapshotError::SlotOutsideRanges { slot: 0, .. }),
        "{err:?}"
    );
    // Straddling the end of its range (into the next one) is outside too.
    let mut mm = memory_manager();
    mm["memory_ranges"]["data"][1]["length"] = json!(64 * KIB);
    mm["memory_ranges"]["data"]
        .as_array_mut()
        .unwrap()
        .push(json!({"gpa": 64 * KIB, "length": 64 * KIB}));
    mm["guest_ram_mappings"][0]["size"] = json!(128 * KIB);
    let err = refusal("straddle", &config(), &mm);
    assert!(
        matches!(err, SnapshotError::SlotOutsideRanges { slot: 0, .. }),
        "{err:?}"
    );

    let err = refusal(
        "huge",
        &config(),
        &with_slot(2, &|m| m["file_offset"] = json!(4096)),
    );
    assert!(
        matches!(&err, SnapshotError::SlotUnaligned { slot: 2, field: "file_offset",
            page_size, .. } if *page_size == 2 * MIB),
        "{err:?}"
    );
    let err = refusal(
        "hugesz",
        &config(),
        &with_slot(2, &|m| m["size"] = json!(MIB)),
    );
    assert!(
        matches!(err, SnapshotError::SlotUnaligned { field: "size", .. }),
        "{err:?}"
    );
    let err = refusal(
        "smallgpa",
        &config(),
        &with_slot(0, &|m| m["gpa"] = json!(100)),
    );
    assert!(
        matches!(err, SnapshotError::SlotUnaligned { field: "gpa", .. }),
        "{err:?}"
    );
    let err = refusal(
        "zone",
        &config(),
        &with_slot(1, &|m| m["zone_id"] = json!("mem9")),
    );
    assert!(
        matches!(&err, SnapshotError::UnknownZone { slot: 1, zone_id, .. } if zone_id == "mem9")
    );
    let err = refusal("dup", &config(), &with_slot(1, &|m| m["slot"] = json!(0)));
    assert!(
        matches!(err, SnapshotError::DuplicateSlot { slot: 0, .. }),
        "{err:?}"
    );
    let err = refusal("zero", &config(), &with_slot(1, &|m| m["size"] = json!(0)));
    assert!(
        matches!(err, SnapshotError::SlotEmpty { slot: 1, .. }),
        "{err:?}"
    );
    let err = refusal(
        "slotoverflow",
        &config(),
        &with_slot(0, &|m| m["file_offset"] = json!(u64::MAX - 4095)),
    );
    assert!(
        matches!(err, SnapshotError::SlotOverflow { slot: 0, .. }),
        "{err:?}"
    );

    let mut mm = memory_manager();
    mm["guest_ram_mappings"] = json!([]);
    assert!(matches!(
        refusal("none", &config(), &mm),
        SnapshotError::NoSlots { .. }
    ));
    let mut mm = memory_manager();
    mm["guest_ram_mappings"]
        .as_array_mut()
        .unwrap()
        .push(mapping(7, 4 * GIB + 4 * MIB, 2 * MIB, "huge0", 0));
    let err = refusal("slotsoverlap", &config(), &mm);
    assert!(
        matches!(
            err,
            SnapshotError::SlotsOverlap {
                first: 2,
                second: 7,
                ..
            }
        ),
        "{err:?}"
    );
    let mut mm = memory_manager();
    mm["guest_ram_mappings"] = Value::Array(vec![mapping(0, 0, 4096, "mem0", 0); MAX_SLOTS + 1]);
    let err = refusal("manyslots", &config(), &mm);
    assert!(
        matches!(
            err,
            SnapshotError::TooMany {
                what: "guest_ram_mappings",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn bad_zones_are_refused() {
    let mut config = config();
    config["memory"]["zones"][1]["id"] = json!("mem0");
    let err = refusal("dupzone", &config, &memory_manager());
    assert!(matches!(&err, SnapshotError::DuplicateZone { zone_id, .. } if zone_id == "mem0"));

    for size in [3 * MIB, 2048] {
        let mut config = self::config();
        config["memory"]["zones"][1]["hugepage_size"] = json!(size);
        let err = refusal("hugesize", &config, &memory_manager());
        assert!(matches!(err, SnapshotError::BadHugepageSize { size: s, .. } if s == size));
    }
    // A slot naming a zone when the config has none other than the default.
    let config = json!({"memory": {"size": 8 * MIB}});
    let err = refusal("nozone", &config, &memory_manager());
    assert!(matches!(err, SnapshotError::UnknownZone { .. }), "{err:?}");
}
