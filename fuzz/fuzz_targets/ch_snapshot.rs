//! cloud-hypervisor snapshot directories: `config.json`, `state.json` (with the memory
//! manager's data as JSON text inside it) and the length of `memory-ranges`, checked by
//! `SnapshotDir::from_bytes` exactly as `SnapshotDir::open` checks the files it read.
//!
//! Input: a control byte, then by its value modulo 3:
//! 0. raw `config.json` and `state.json`, split at the first NUL byte (JSON has none);
//! 1. raw `config.json` and raw memory-manager text, put in a well-formed snapshot tree;
//! 2. structured (`arbitrary`): zones, memory ranges and guest RAM mappings made into JSON,
//!    mappings mostly placed inside ranges, so most inputs are accepted or nearly so.
//!
//! Properties: every refusal is bad input, never an I/O error; an accepted snapshot has 1 to
//! `MAX_SLOTS` distinct, non-overlapping, non-empty slots aligned to a power-of-two page size
//! of at least 4 KiB; each slot's bytes in `memory-ranges` start where a reference dense
//! layout of the range table puts them and end within it; `slot_for_gpa` finds each slot at
//! its first and last byte; the Config payload is JSON with the four fields a receiver reads.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use std::path::Path;
use vmpager_compat::cloud_hypervisor::snapshot::{
    common_cpuid_for, SnapshotDir, MAX_SLOTS, SMALL_PAGE,
};
use vmpager_fuzz::Num;

#[derive(Arbitrary, Debug)]
struct Zone {
    id: u8,
    hugepages: Option<bool>,
    hugepage_size: Option<Num>,
}

#[derive(Arbitrary, Debug)]
struct Range {
    gpa: Num,
    length: Num,
}

#[derive(Arbitrary, Debug)]
struct Mapping {
    slot: u16,
    /// Inside this range (by index) at this offset, or at a raw GPA.
    at: Result<(u8, Num), Num>,
    size: Num,
    zone: u8,
    file_offset: Num,
    virtio_mem: Option<bool>,
}

#[derive(Arbitrary, Debug)]
struct Structured {
    zones: Vec<Zone>,
    hugepages: Option<bool>,
    ranges: Vec<Range>,
    /// Ranges laid out one after another (plus their `gpa` as a gap).
    packed: bool,
    mappings: Vec<Mapping>,
    memory_len: u64,
}

fn zone_id(n: u8) -> String {
    if n.is_multiple_of(8) {
        "mem0".into()
    } else {
        format!("z{}", n % 8)
    }
}

fn tree(mm_text: &str) -> Vec<u8> {
    json!({"snapshots": {"memory-manager": {"snapshots": {}, "snapshot_data":
        {"state": mm_text}}}, "snapshot_data": null})
    .to_string()
    .into_bytes()
}

fn structured(s: &Structured) -> (Vec<u8>, Vec<u8>) {
    let zones: Vec<Value> = s
        .zones
        .iter()
        .map(|z| {
            json!({"id": zone_id(z.id), "hugepages": z.hugepages,
                   "hugepage_size": z.hugepage_size.map(Num::get)})
        })
        .collect();
    let config = json!({"memory": {"hugepages": s.hugepages, "zones": zones}});
    let mut next = 0u64;
    let ranges: Vec<(u64, u64)> = s
        .ranges
        .iter()
        .map(|r| {
            let gpa = if s.packed {
                next.wrapping_add(r.gpa.get())
            } else {
                r.gpa.get()
            };
            next = gpa.wrapping_add(r.length.get());
            (gpa, r.length.get())
        })
        .collect();
    let mappings: Vec<Value> = s
        .mappings
        .iter()
        .map(|m| {
            let gpa = match m.at {
                Ok((i, off)) if !ranges.is_empty() => ranges[usize::from(i) % ranges.len()]
                    .0
                    .wrapping_add(off.get()),
                Ok((_, off)) => off.get(),
                Err(raw) => raw.get(),
            };
            json!({"slot": m.slot, "gpa": gpa, "size": m.size.get(), "zone_id": zone_id(m.zone),
                   "virtio_mem": m.virtio_mem, "file_offset": m.file_offset.get()})
        })
        .collect();
    let table: Vec<Value> = ranges
        .iter()
        .map(|(gpa, length)| json!({"gpa": gpa, "length": length}))
        .collect();
    let mm = json!({"memory_ranges": {"data": table}, "guest_ram_mappings": mappings});
    (config.to_string().into_bytes(), tree(&mm.to_string()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let (config, state, memory_len) = match control % 3 {
        0 | 1 => {
            let split = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            let (config, other) = rest.split_at(split);
            let other = other.get(1..).unwrap_or_default();
            let state = match control % 3 {
                0 => other.to_vec(),
                _ => tree(&String::from_utf8_lossy(other)),
            };
            (config.to_vec(), state, u64::from(control))
        }
        _ => {
            let Ok(s) = Structured::arbitrary(&mut Unstructured::new(rest)) else {
                return;
            };
            let (config, state) = structured(&s);
            (config, state, s.memory_len)
        }
    };
    let snap = match SnapshotDir::from_bytes(Path::new("/snap"), &config, state.clone(), memory_len)
    {
        Ok(snap) => snap,
        Err(e) => {
            assert!(e.is_bad_input() && !e.is_io(), "{e:?}");
            return;
        }
    };
    assert_eq!(snap.state_bytes, state);
    assert_eq!(snap.memory_len, memory_len);
    check_slots(&snap);
    let payload: Value =
        match serde_json::from_slice(&snap.config_payload(common_cpuid_for(&snap.config))) {
            Ok(v) => v,
            Err(e) => panic!("the Config payload is not JSON: {e}"),
        };
    assert_eq!(payload["vm_config"], snap.config);
    assert_eq!(payload["memory_manager_data"], snap.memory_manager);
    assert_eq!(payload["memory_mode"], "Postcopy");
    assert!(payload["common_cpuid"].is_array());
});

fn check_slots(snap: &SnapshotDir) {
    assert!(!snap.slots.is_empty() && snap.slots.len() <= MAX_SLOTS);
    // The range table as a reference dense layout: (gpa, length, offset in memory-ranges).
    let mut dense = Vec::new();
    let mut offset = 0u128;
    for r in snap.memory_manager["memory_ranges"]["data"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let (Some(gpa), Some(length)) = (r["gpa"].as_u64(), r["length"].as_u64()) else {
            panic!("an accepted range table has a bad entry {r}");
        };
        dense.push((u128::from(gpa), u128::from(length), offset));
        offset += u128::from(length);
    }
    let total = offset;
    for (i, s) in snap.slots.iter().enumerate() {
        let ps = s.page_size;
        assert!(ps.is_power_of_two() && ps >= SMALL_PAGE, "{s:?}");
        assert!(
            s.size > 0
                && [s.gpa, s.size, s.file_offset]
                    .iter()
                    .all(|v| v.is_multiple_of(ps))
        );
        let (gpa, size) = (u128::from(s.gpa), u128::from(s.size));
        assert!(gpa + size <= u128::from(u64::MAX));
        let Some(&(rg, _, roff)) = dense
            .iter()
            .find(|(rg, rl, _)| *rg <= gpa && gpa + size <= rg + rl)
        else {
            panic!("slot {s:?} lies in no range");
        };
        assert_eq!(u128::from(s.snapshot_offset), roff + (gpa - rg));
        assert!(u128::from(s.snapshot_offset) + size <= total);
        for t in &snap.slots[i + 1..] {
            assert_ne!(s.slot, t.slot);
            let (tg, ts) = (u128::from(t.gpa), u128::from(t.size));
            assert!(gpa + size <= tg || tg + ts <= gpa, "{s:?} overlaps {t:?}");
        }
        assert_eq!(snap.slot_for_gpa(s.gpa), Some(s));
        assert_eq!(snap.slot_for_gpa(s.gpa + s.size - 1), Some(s));
    }
}
