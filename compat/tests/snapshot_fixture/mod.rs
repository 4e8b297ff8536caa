//! Snapshot directories for the cloud-hypervisor snapshot tests: a realistic two-zone snapshot
//! and helpers to write variants of it.
// Each test crate uses a subset of these helpers.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use vmpager_compat::cloud_hypervisor::snapshot::*;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// A snapshot directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "vmpager-compat-{}-{name}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two zones: `mem0` (4 KiB pages) split around the 32-bit hole, and `huge0` (2 MiB pages).
pub fn config() -> Value {
    json!({
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "topology": null, "kvm_hyperv": false,
                 "max_phys_bits": 46, "affinity": null, "features": {"amx": false}},
        "memory": {
            "size": 0, "mergeable": false, "hotplug_method": "Acpi", "hotplug_size": null,
            "hotplugged_size": null, "shared": false, "hugepages": false, "hugepage_size": null,
            "prefault": false, "thp": true,
            "zones": [
                {"id": "mem0", "size": 128 * KIB, "file": null, "shared": true, "hugepages": false,
                 "hugepage_size": null, "host_numa_node": null, "hotplug_size": null,
                 "hotplugged_size": null, "prefault": false},
                {"id": "huge0", "size": 4 * MIB, "file": null, "shared": true, "hugepages": true,
                 "hugepage_size": null, "host_numa_node": null, "hotplug_size": null,
                 "hotplugged_size": null, "prefault": false}
            ]
        },
        "payload": {"kernel": "/boot/vmlinux", "cmdline": "console=ttyS0"},
        "serial": {"mode": "Null"}, "console": {"mode": "Off"}
    })
}

pub fn mapping(slot: u32, gpa: u64, size: u64, zone: &str, file_offset: u64) -> Value {
    json!({"slot": slot, "gpa": gpa, "size": size, "zone_id": zone, "virtio_mem": false,
           "file_offset": file_offset})
}

/// The memory manager's data: ranges in cloud-hypervisor's (hash map) zone order, `huge0` first.
pub fn memory_manager() -> Value {
    json!({
        "memory_ranges": {"data": [
            {"gpa": 4 * GIB + 2 * MIB, "length": 4 * MIB},
            {"gpa": 0, "length": 64 * KIB},
            {"gpa": 4 * GIB, "length": 64 * KIB}
        ]},
        "guest_ram_mappings": [
            mapping(0, 0, 64 * KIB, "mem0", 0),
            mapping(1, 4 * GIB, 64 * KIB, "mem0", 64 * KIB),
            mapping(2, 4 * GIB + 2 * MIB, 4 * MIB, "huge0", 0)
        ],
        "start_of_device_area": 4 * GIB + 6 * MIB,
        "boot_ram": 4 * MIB + 128 * KIB,
        "current_ram": 4 * MIB + 128 * KIB,
        "arch_mem_regions": [{"base": 0, "size": 3 * GIB, "r_type": "Ram"}],
        "hotplug_slots": [{"active": false, "inserting": false, "removing": false,
                           "base": 0, "length": 0}],
        "next_memory_slot": 3,
        "selected_slot": 0,
        "next_hotplug_slot": 0
    })
}

/// The snapshot tree with the memory manager's data as a JSON string.
pub fn state(mm: &Value) -> Value {
    state_with_mm_data(json!({"state": mm.to_string()}))
}

pub fn state_with_mm_data(snapshot_data: Value) -> Value {
    json!({
        "snapshots": {
            "cpu-manager": {"snapshots": {"0": {"snapshots": {}, "snapshot_data":
                {"state": "{\"regs\":[]}"}}}, "snapshot_data": null},
            "memory-manager": {"snapshots": {}, "snapshot_data": snapshot_data},
            "device-manager": {"snapshots": {}, "snapshot_data": {"state": "{}"}}
        },
        "snapshot_data": {"state": "{\"version\":1}"}
    })
}

pub fn write_dir(dir: &Path, config: &Value, state: &Value, memory_len: u64) {
    std::fs::write(dir.join(CONFIG_FILE), config.to_string()).unwrap();
    std::fs::write(
        dir.join(STATE_FILE),
        serde_json::to_vec_pretty(state).unwrap(),
    )
    .unwrap();
    let memory = std::fs::File::create(dir.join(MEMORY_FILE)).unwrap();
    memory.set_len(memory_len).unwrap();
}

pub fn open_with(name: &str, config: &Value, mm: &Value) -> Result<SnapshotDir, SnapshotError> {
    let dir = TempDir::new(name);
    write_dir(&dir.0, config, &state(mm), 4 * MIB);
    SnapshotDir::open(&dir.0)
}

/// Opens a variant of the good snapshot and returns its refusal.
pub fn refusal(name: &str, config: &Value, mm: &Value) -> SnapshotError {
    let err = open_with(name, config, mm).unwrap_err();
    assert!(err.is_bad_input() && !err.is_io(), "{err:?}");
    assert!(err.to_string().contains(name_of(&err)), "{err}");
    err
}

/// The file an error should name.
pub fn name_of(err: &SnapshotError) -> &'static str {
    match err {
        SnapshotError::DuplicateZone { .. } | SnapshotError::BadHugepageSize { .. } => CONFIG_FILE,
        SnapshotError::BadField { path, .. } | SnapshotError::Json { path, .. }
            if path.ends_with(CONFIG_FILE) =>
        {
            CONFIG_FILE
        }
        _ => STATE_FILE,
    }
}
