//! A cloud-hypervisor snapshot directory, as `ch-remote snapshot file://DIR` writes it:
//!
//! - `config.json`: the `VmConfig` JSON. Used here: `memory.{hugepages, hugepage_size, zones}`
//!   (missing fields take their defaults) and `cpus.kvm_hyperv`.
//! - `state.json`: the `Snapshot` tree, `{"snapshots": {"<id>": Snapshot, ...},
//!   "snapshot_data": {"state": "<JSON text>"} | null}` at every level. The memory manager's
//!   data is the JSON *text* at `snapshots["memory-manager"].snapshot_data.state`: an object
//!   with `memory_ranges.data` (`[{gpa, length}]`), `guest_ram_mappings` (`[{slot, gpa, size,
//!   zone_id, virtio_mem, file_offset}]`) and other fields, all kept verbatim.
//! - `memory-ranges`: guest RAM, the ranges of `memory_ranges.data` concatenated densely in
//!   table order. The file may be sparse and shorter than the ranges' total: bytes past its end
//!   read as zeros.
//!
//! [`SnapshotDir::open`] reads and checks all three and maps each guest RAM slot to where its
//! bytes start in `memory-ranges`; [`SnapshotDir::config_payload`] builds the payload of the
//! migration `Config` command.

use serde::Serialize;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

mod error;
mod fields;
pub use error::SnapshotError;
use fields::{bad_field, opt_bool, opt_field, opt_u64, parse_json, req_u64};

/// The VM configuration file in a snapshot directory.
pub const CONFIG_FILE: &str = "config.json";
/// The snapshot tree file in a snapshot directory.
pub const STATE_FILE: &str = "state.json";
/// The guest RAM file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory-ranges";
/// Id of the memory manager's snapshot in the tree.
pub const MEMORY_MANAGER_ID: &str = "memory-manager";
/// Zone id of guest RAM when the configuration defines no zones.
pub const DEFAULT_ZONE_ID: &str = "mem0";
/// Most bytes `config.json` and `state.json` may each have.
pub const MAX_JSON_BYTES: u64 = 64 << 20;
/// Most memory ranges the memory manager may list.
pub const MAX_RANGES: usize = 512;
/// Most guest RAM slots the memory manager may list.
pub const MAX_SLOTS: usize = 512;
/// Most memory zones the configuration may list.
pub const MAX_ZONES: usize = 512;
/// Alignment of memory ranges, and page size of zones without hugepages.
pub const SMALL_PAGE: u64 = 4096;
/// Page size of a hugepage zone that does not name one.
pub const DEFAULT_HUGEPAGE_SIZE: u64 = 2 << 20;
/// The `memory_mode` value a postcopy sender announces in the Config payload.
pub const MEMORY_MODE_POSTCOPY: &str = "Postcopy";
/// The CPUID leaf holding the hypervisor signature.
pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;
/// EBX, ECX, EDX of [`HYPERVISOR_LEAF`] under KVM: `"KVMKVMKVM\0\0\0"`.
pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// EBX, ECX, EDX of [`HYPERVISOR_LEAF`] that cloud-hypervisor sets with `kvm_hyperv=on`:
/// `"Linux KVM Hv"`.
pub const KVM_HYPERV_SIGNATURE: [u32; 3] = [0x756e_694c, 0x564b_2078, 0x7648_204d];

/// A guest RAM slot of the snapshot and where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The memory slot number.
    pub slot: u32,
    /// First guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the slot in its backing file (as cloud-hypervisor recorded it).
    pub file_offset: u64,
    /// The memory zone it belongs to.
    pub zone_id: String,
    /// The zone's backing page size: its hugepage size if it uses hugepages, else 4096.
    pub page_size: u64,
    /// Where the slot's first byte lies in `memory-ranges`.
    pub snapshot_offset: u64,
}

/// A checked snapshot directory.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    /// `config.json` as JSON.
    pub config: Value,
    /// `state.json` as read (the payload of the migration `State` command).
    pub state_bytes: Vec<u8>,
    /// The memory manager's data, parsed from its state string, all fields kept.
    pub memory_manager: Value,
    /// The guest RAM slots, in `guest_ram_mappings` order.
    pub slots: Vec<Slot>,
    /// The `memory-ranges` file.
    pub memory_path: PathBuf,
    /// Its length (it may be shorter than the ranges' total: the rest reads as zeros).
    pub memory_len: u64,
}

impl SnapshotDir {
    /// Reads and checks the snapshot in `dir`.
    pub fn open(dir: &Path) -> Result<SnapshotDir, SnapshotError> {
        let config_path = dir.join(CONFIG_FILE);
        let state_path = dir.join(STATE_FILE);
        let memory_path = dir.join(MEMORY_FILE);

        let (config, zones) = parse_config(&config_path, &read_bounded(&config_path)?)?;
        let state_bytes = read_bounded(&state_path)?;
        let (memory_manager, slots) = parse_state(&state_path, &state_bytes, &zones)?;

        let meta = std::fs::metadata(&memory_path).map_err(|error| SnapshotError::Io {
            path: memory_path.clone(),
            error,
        })?;
        if !meta.is_file() {
            return Err(SnapshotError::NotAFile { path: memory_path });
        }
        Ok(SnapshotDir {
            config,
            state_bytes,
            memory_manager,
            slots,
            memory_path,
            memory_len: meta.len(),
        })
    }

    /// Checks a snapshot given as the bytes of its `config.json` and `state.json` and the
    /// length of its `memory-ranges`, exactly as [`SnapshotDir::open`] does once it has read
    /// them (`dir` only names the files, in errors and in `memory_path`).
    pub fn from_bytes(
        dir: &Path,
        config_json: &[u8],
        state_json: Vec<u8>,
        memory_len: u64,
    ) -> Result<SnapshotDir, SnapshotError> {
        let (config, zones) = parse_config(&dir.join(CONFIG_FILE), config_json)?;
        let (memory_manager, slots) = parse_state(&dir.join(STATE_FILE), &state_json, &zones)?;
        Ok(SnapshotDir {
            config,
            state_bytes: state_json,
            memory_manager,
            slots,
            memory_path: dir.join(MEMORY_FILE),
            memory_len,
        })
    }

    /// The slot holding guest physical address `gpa`.
    pub fn slot_for_gpa(&self, gpa: u64) -> Option<&Slot> {
        self.slots
            .iter()
            .find(|s| gpa >= s.gpa && gpa - s.gpa < s.size)
    }

    /// The payload of the migration `Config` command, `VmMigrationConfig` as JSON:
    /// `{"vm_config": <config.json>, "common_cpuid": <common_cpuid>, "memory_manager_data":
    /// <the memory manager's data>, "memory_mode": "Postcopy"}`.
    ///
    /// Since cloud-hypervisor's PR #8819 the sender announces the memory mode here
    /// (`VmMigrationConfig::set_memory_mode(MigrationMode::Postcopy)`); older receivers ignore
    /// the unknown field and take `memory_mode=postcopy` from their receive-migration command.
    /// `common_cpuid` normally comes from [`common_cpuid_for`].
    pub fn config_payload(&self, common_cpuid: Value) -> Vec<u8> {
        #[derive(Serialize)]
        struct VmMigrationConfig<'a> {
            vm_config: &'a Value,
            common_cpuid: &'a Value,
            memory_manager_data: &'a Value,
            memory_mode: &'static str,
        }
        let payload = VmMigrationConfig {
            vm_config: &self.config,
            common_cpuid: &common_cpuid,
            memory_manager_data: &self.memory_manager,
            memory_mode: MEMORY_MODE_POSTCOPY,
        };
        // Serializing JSON values (string keys only) into memory cannot fail.
        serde_json::to_vec(&payload).unwrap_or_default()
    }
}

/// The `common_cpuid` to send for a snapshot whose `config.json` is `config`.
///
/// A native snapshot does not store the source's `common_cpuid`, yet an x86_64 KVM receiver
/// checks the list it gets against its own with `check_cpuid_compatibility`: feature leaves
/// must be a bitwise subset (a source value of 0 always passes), leaf 7 EAX and leaf
/// 0x4000_0000 EAX must not be greater (0 passes), but leaf 0x4000_0000 EBX/ECX/EDX, the
/// hypervisor signature, must be EQUAL. An absent leaf reads as 0, so an empty list fails on
/// the signature. The minimal list that passes is therefore one entry for leaf 0x4000_0000
/// with EAX 0 and the signature the receiver itself sets: `"KVMKVMKVM\0\0\0"`
/// ([`KVM_SIGNATURE`]), or, when `config.cpus.kvm_hyperv` is true, the `"Linux KVM Hv"`
/// signature cloud-hypervisor sets for Hyper-V enlightenments ([`KVM_HYPERV_SIGNATURE`]).
pub fn common_cpuid_for(config: &Value) -> Value {
    let kvm_hyperv = config
        .get("cpus")
        .and_then(|cpus| cpus.get("kvm_hyperv"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let [ebx, ecx, edx] = if kvm_hyperv {
        KVM_HYPERV_SIGNATURE
    } else {
        KVM_SIGNATURE
    };
    json!([{
        "function": HYPERVISOR_LEAF,
        "index": 0,
        "flags": 0,
        "eax": 0,
        "ebx": ebx,
        "ecx": ecx,
        "edx": edx,
    }])
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    let io = |error| SnapshotError::Io {
        path: path.to_path_buf(),
        error,
    };
    let file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(SnapshotError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let too_large = |len| SnapshotError::TooLarge {
        path: path.to_path_buf(),
        len,
        limit: MAX_JSON_BYTES,
    };
    if meta.len() > MAX_JSON_BYTES {
        return Err(too_large(meta.len()));
    }
    // The file may grow between the check and the read: read one byte past the limit at most.
    let mut bytes = Vec::new();
    file.take(MAX_JSON_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if len > MAX_JSON_BYTES {
        return Err(too_large(len));
    }
    Ok(bytes)
}

/// `config.json`: the configuration and its memory zones.
fn parse_config(path: &Path, bytes: &[u8]) -> Result<(Value, Vec<Zone>), SnapshotError> {
    let config = parse_json(path, bytes)?;
    let zones = zones(&config, path)?;
    Ok((config, zones))
}

/// `state.json`: the memory manager's data and the guest RAM slots, checked against the
/// memory range table and the `zones`.
fn parse_state(
    path: &Path,
    bytes: &[u8],
    zones: &[Zone],
) -> Result<(Value, Vec<Slot>), SnapshotError> {
    let state = parse_json(path, bytes)?;
    let memory_manager = memory_manager_state(&state, path)?;
    let ranges = ranges(&memory_manager, path)?;
    let slots = slots(&memory_manager, &ranges, zones, path)?;
    Ok((memory_manager, slots))
}

/// A memory zone: its id and backing page size.
struct Zone {
    id: String,
    page_size: u64,
}

fn page_size(obj: &Value, at: &str, zone_id: &str, path: &Path) -> Result<u64, SnapshotError> {
    let hugepages = opt_bool(obj, "hugepages", at, path)?;
    let hugepage_size = opt_u64(obj, "hugepage_size", at, path)?;
    if !hugepages {
        return Ok(SMALL_PAGE);
    }
    let size = hugepage_size.unwrap_or(DEFAULT_HUGEPAGE_SIZE);
    if !size.is_power_of_two() || size < SMALL_PAGE {
        return Err(SnapshotError::BadHugepageSize {
            path: path.to_path_buf(),
            zone_id: zone_id.to_string(),
            size,
        });
    }
    Ok(size)
}

/// The zones of `config.memory`, or the single default zone when it defines none.
fn zones(config: &Value, path: &Path) -> Result<Vec<Zone>, SnapshotError> {
    let empty = json!({});
    let memory = match opt_field(config, "memory") {
        None => &empty,
        Some(m) if m.is_object() => m,
        Some(_) => return Err(bad_field(path, "memory".into(), "an object")),
    };
    let list = match opt_field(memory, "zones") {
        None => &[][..],
        Some(v) => v
            .as_array()
            .map(Vec::as_slice)
            .ok_or_else(|| bad_field(path, "memory.zones".into(), "an array"))?,
    };
    if list.is_empty() {
        return Ok(vec![Zone {
            id: DEFAULT_ZONE_ID.to_string(),
            page_size: page_size(memory, "memory", DEFAULT_ZONE_ID, path)?,
        }]);
    }
    if list.len() > MAX_ZONES {
        return Err(SnapshotError::TooMany {
            path: path.to_path_buf(),
            what: "memory.zones",
            count: list.len(),
            limit: MAX_ZONES,
        });
    }
    let mut zones: Vec<Zone> = Vec::with_capacity(list.len());
    for (i, zone) in list.iter().enumerate() {
        let at = format!("memory.zones[{i}]");
        let id = zone
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| bad_field(path, format!("{at}.id"), "a string"))?;
        if zones.iter().any(|z| z.id == id) {
            return Err(SnapshotError::DuplicateZone {
                path: path.to_path_buf(),
                zone_id: id.to_string(),
            });
        }
        zones.push(Zone {
            id: id.to_string(),
            page_size: page_size(zone, &at, id, path)?,
        });
    }
    Ok(zones)
}

/// Parses the memory manager's state string out of the snapshot tree.
fn memory_manager_state(state: &Value, path: &Path) -> Result<Value, SnapshotError> {
    let snapshots = state
        .get("snapshots")
        .filter(|s| s.is_object())
        .ok_or_else(|| bad_field(path, "snapshots".into(), "an object"))?;
    let mm = snapshots
        .get(MEMORY_MANAGER_ID)
        .ok_or_else(|| SnapshotError::NoMemoryManager {
            path: path.to_path_buf(),
        })?;
    let text = mm
        .get("snapshot_data")
        .and_then(|d| d.get("state"))
        .and_then(Value::as_str)
        .ok_or_else(|| SnapshotError::StateNotString {
            path: path.to_path_buf(),
        })?;
    let value: Value = serde_json::from_str(text).map_err(|e| SnapshotError::StateNotJson {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if !value.is_object() {
        return Err(SnapshotError::StateNotJson {
            path: path.to_path_buf(),
            message: "it is not an object".into(),
        });
    }
    Ok(value)
}

/// A checked memory range and its offset in `memory-ranges`.
struct DenseRange {
    gpa: u64,
    end: u64,
    file_offset: u64,
}

const MM: &str = "memory-manager state";

fn ranges(mm: &Value, path: &Path) -> Result<Vec<DenseRange>, SnapshotError> {
    let list = mm
        .get("memory_ranges")
        .and_then(|r| r.get("data"))
        .and_then(Value::as_array)
        .ok_or_else(|| bad_field(path, format!("{MM}: memory_ranges.data"), "an array"))?;
    if list.len() > MAX_RANGES {
        return Err(SnapshotError::TooMany {
            path: path.to_path_buf(),
            what: "memory_ranges.data",
            count: list.len(),
            limit: MAX_RANGES,
        });
    }
    let mut ranges = Vec::with_capacity(list.len());
    let mut file_offset = 0u64;
    for (index, range) in list.iter().enumerate() {
        let at = format!("{MM}: memory_ranges.data[{index}]");
        let gpa = req_u64(range, "gpa", &at, path)?;
        let length = req_u64(range, "length", &at, path)?;
        let p = path.to_path_buf();
        if length == 0 {
            return Err(SnapshotError::RangeEmpty {
                path: p,
                index,
                gpa,
            });
        }
        if gpa % SMALL_PAGE != 0 || length % SMALL_PAGE != 0 {
            return Err(SnapshotError::RangeUnaligned {
                path: p,
                index,
                gpa,
                length,
            });
        }
        let (Some(end), Some(next_offset)) =
            (gpa.checked_add(length), file_offset.checked_add(length))
        else {
            return Err(SnapshotError::RangeOverflow {
                path: p,
                index,
                gpa,
                length,
            });
        };
        ranges.push(DenseRange {
            gpa,
            end,
            file_offset,
        });
        file_offset = next_offset;
    }
    let mut order: Vec<(usize, &DenseRange)> = ranges.iter().enumerate().collect();
    order.sort_by_key(|(_, r)| r.gpa);
    for pair in order.windows(2) {
        if let [(i, a), (j, b)] = pair {
            if a.end > b.gpa {
                return Err(SnapshotError::RangesOverlap {
                    path: path.to_path_buf(),
                    first: *i,
                    first_gpa: a.gpa,
                    first_end: a.end,
                    second: *j,
                    second_gpa: b.gpa,
                    second_end: b.end,
                });
            }
        }
    }
    Ok(ranges)
}

fn slots(
    mm: &Value,
    ranges: &[DenseRange],
    zones: &[Zone],
    path: &Path,
) -> Result<Vec<Slot>, SnapshotError> {
    let list = mm
        .get("guest_ram_mappings")
        .and_then(Value::as_array)
        .ok_or_else(|| bad_field(path, format!("{MM}: guest_ram_mappings"), "an array"))?;
    if list.is_empty() {
        return Err(SnapshotError::NoSlots {
            path: path.to_path_buf(),
        });
    }
    if list.len() > MAX_SLOTS {
        return Err(SnapshotError::TooMany {
            path: path.to_path_buf(),
            what: "guest_ram_mappings",
            count: list.len(),
            limit: MAX_SLOTS,
        });
    }
    let mut seen = HashSet::new();
    let mut slots = Vec::with_capacity(list.len());
    for (i, mapping) in list.iter().enumerate() {
        let at = format!("{MM}: guest_ram_mappings[{i}]");
        let slot = mapping
            .get("slot")
            .and_then(Value::as_u64)
            .and_then(|s| u32::try_from(s).ok())
            .ok_or_else(|| bad_field(path, format!("{at}.slot"), "a 32-bit unsigned integer"))?;
        let gpa = req_u64(mapping, "gpa", &at, path)?;
        let size = req_u64(mapping, "size", &at, path)?;
        let file_offset = req_u64(mapping, "file_offset", &at, path)?;
        let zone_id = mapping
            .get("zone_id")
            .and_then(Value::as_str)
            .ok_or_else(|| bad_field(path, format!("{at}.zone_id"), "a string"))?;
        if !mapping.get("virtio_mem").is_some_and(Value::is_boolean) {
            return Err(bad_field(path, format!("{at}.virtio_mem"), "a boolean"));
        }
        slots.push(check_slot(
            slot,
            gpa,
            size,
            file_offset,
            zone_id,
            ranges,
            zones,
            path,
        )?);
        if !seen.insert(slot) {
            return Err(SnapshotError::DuplicateSlot {
                path: path.to_path_buf(),
                slot,
            });
        }
    }
    let mut order: Vec<&Slot> = slots.iter().collect();
    order.sort_by_key(|s| s.gpa);
    for pair in order.windows(2) {
        // Ends cannot overflow: check_slot checked them.
        if let [a, b] = pair {
            if a.gpa + a.size > b.gpa {
                return Err(SnapshotError::SlotsOverlap {
                    path: path.to_path_buf(),
                    first: a.slot,
                    second: b.slot,
                    gpa: b.gpa,
                });
            }
        }
    }
    Ok(slots)
}

#[allow(clippy::too_many_arguments)]
fn check_slot(
    slot: u32,
    gpa: u64,
    size: u64,
    file_offset: u64,
    zone_id: &str,
    ranges: &[DenseRange],
    zones: &[Zone],
    path: &Path,
) -> Result<Slot, SnapshotError> {
    let p = || path.to_path_buf();
    if size == 0 {
        return Err(SnapshotError::SlotEmpty { path: p(), slot });
    }
    let Some(zone) = zones.iter().find(|z| z.id == zone_id) else {
        return Err(SnapshotError::UnknownZone {
            path: p(),
            slot,
            zone_id: zone_id.to_string(),
        });
    };
    let page_size = zone.page_size;
    for (field, value) in [("gpa", gpa), ("size", size), ("file_offset", file_offset)] {
        if value % page_size != 0 {
            return Err(SnapshotError::SlotUnaligned {
                path: p(),
                slot,
                zone_id: zone_id.to_string(),
                field,
                value,
                page_size,
            });
        }
    }
    let (Some(end), Some(_)) = (gpa.checked_add(size), file_offset.checked_add(size)) else {
        return Err(SnapshotError::SlotOverflow {
            path: p(),
            slot,
            gpa,
            size,
            file_offset,
        });
    };
    // Ranges do not overlap, so at most one contains the slot. Inside it, the offset cannot
    // overflow: the range's dense end did not.
    let snapshot_offset = ranges
        .iter()
        .find(|r| r.gpa <= gpa && end <= r.end)
        .map(|r| r.file_offset + (gpa - r.gpa))
        .ok_or(SnapshotError::SlotOutsideRanges {
            path: p(),
            slot,
            gpa,
            end,
        })?;
    Ok(Slot {
        slot,
        gpa,
        size,
        file_offset,
        zone_id: zone_id.to_string(),
        page_size,
        snapshot_offset,
    })
}
