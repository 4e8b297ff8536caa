//! The `Config` payload (`VmMigrationConfig` JSON) and the checks cloud-hypervisor's receiver
//! makes on it before answering `Ok`: postcopy mode, no prefault, the hypervisor signature in
//! `common_cpuid`, and guest RAM slots and memory ranges it can map.
//!
//! Every refusal is a sentence for [`PeerError::Refused`](super::PeerError::Refused).

use serde_json::Value;
use vmpager_compat::cloud_hypervisor::snapshot::{
    DEFAULT_HUGEPAGE_SIZE, DEFAULT_ZONE_ID, HYPERVISOR_LEAF, KVM_HYPERV_SIGNATURE, KVM_SIGNATURE,
    MAX_RANGES, MAX_SLOTS, MAX_ZONES, MEMORY_MODE_POSTCOPY, SMALL_PAGE,
};
use vmpager_compat::cloud_hypervisor::wire::MemoryRange;

/// A guest RAM slot as `memory_manager_data.guest_ram_mappings` lists it, with its zone's page
/// size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SlotSpec {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub file_offset: u64,
    pub zone_id: String,
    pub page_size: u64,
}

impl SlotSpec {
    /// One past the last guest address (checked not to overflow).
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }
}

/// What the receiver keeps of an accepted `Config`.
#[derive(Debug, Clone)]
pub(super) struct MigrationConfig {
    /// `guest_ram_mappings`, in their order.
    pub slots: Vec<SlotSpec>,
    /// `memory_ranges.data`, in table order (the background pull's order).
    pub ranges: Vec<MemoryRange>,
    /// Some zone uses hugepages (the uffd then needs the hugetlbfs features).
    pub hugepages: bool,
}

type Refusal = String;

/// Parses and checks the payload. `memory_mode_option` is the pre-#8819 `memory_mode=postcopy`
/// of `receive-migration`.
pub(super) fn parse(payload: &[u8], memory_mode_option: bool) -> Result<MigrationConfig, Refusal> {
    let root: Value = serde_json::from_slice(payload)
        .map_err(|e| format!("the Config payload is not VmMigrationConfig JSON: {e}"))?;
    let vm_config = object(&root, "vm_config")?;
    let memory_manager = object(&root, "memory_manager_data")?;

    check_memory_mode(&root, memory_mode_option)?;
    let memory = match opt(vm_config, "memory") {
        None => &Value::Null,
        Some(m) if m.is_object() => m,
        Some(_) => return Err("vm_config.memory is not an object".into()),
    };
    check_prefault(memory)?;
    check_cpuid(&root, vm_config)?;

    let zones = zones(memory)?;
    let ranges = ranges(memory_manager)?;
    let slots = slots(memory_manager, &zones)?;
    check_coverage(&ranges, &slots)?;
    Ok(MigrationConfig {
        slots,
        ranges,
        hugepages: zones.iter().any(|z| z.hugepages),
    })
}

/// A field that is present and not null.
fn opt<'v>(obj: &'v Value, key: &str) -> Option<&'v Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn object<'v>(obj: &'v Value, key: &str) -> Result<&'v Value, Refusal> {
    opt(obj, key)
        .filter(|v| v.is_object())
        .ok_or_else(|| format!("the Config payload has no {key} object"))
}

fn opt_bool(obj: &Value, key: &str, at: &str) -> Result<bool, Refusal> {
    match opt(obj, key) {
        None => Ok(false),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| format!("{at}.{key} is not a boolean")),
    }
}

fn req_u64(obj: &Value, key: &str, at: &str) -> Result<u64, Refusal> {
    obj.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("{at}.{key} is not an unsigned integer"))
}

/// Since #8819 the sender announces the mode; before it, `receive-migration` took
/// `memory_mode=postcopy` and the field was ignored. This receiver plays postcopy only.
fn check_memory_mode(root: &Value, memory_mode_option: bool) -> Result<(), Refusal> {
    if memory_mode_option {
        return Ok(());
    }
    match opt(root, "memory_mode") {
        Some(Value::String(mode)) if mode == MEMORY_MODE_POSTCOPY => Ok(()),
        None => Err(
            "the Config announces no memory_mode and receive-migration was not given \
                     memory_mode=postcopy: this receiver plays postcopy only"
                .into(),
        ),
        Some(other) => Err(format!(
            "the Config announces memory_mode {other}: this receiver plays postcopy only"
        )),
    }
}

/// Postcopy cannot populate memory up front.
fn check_prefault(memory: &Value) -> Result<(), Refusal> {
    if !memory.is_object() {
        return Ok(());
    }
    if opt_bool(memory, "prefault", "vm_config.memory")? {
        return Err("postcopy is refused: vm_config.memory.prefault is set".into());
    }
    if let Some(zones) = opt(memory, "zones").and_then(Value::as_array) {
        for (i, zone) in zones.iter().enumerate() {
            if opt_bool(zone, "prefault", &format!("vm_config.memory.zones[{i}]"))? {
                let id = zone.get("id").and_then(Value::as_str).unwrap_or("?");
                return Err(format!(
                    "postcopy is refused: memory zone {id:?} (vm_config.memory.zones[{i}]) sets \
                     prefault"
                ));
            }
        }
    }
    Ok(())
}

/// The hypervisor signature (leaf 0x4000_0000 EBX, ECX, EDX) must equal the receiver's; an
/// absent leaf reads as zeros. (cloud-hypervisor checks other leaves as subsets; not modelled.)
fn check_cpuid(root: &Value, vm_config: &Value) -> Result<(), Refusal> {
    let entries = match opt(root, "common_cpuid") {
        None => &[][..],
        Some(v) => v
            .as_array()
            .map(Vec::as_slice)
            .ok_or("common_cpuid is not a list of CPUID entries")?,
    };
    let kvm_hyperv = vm_config
        .get("cpus")
        .map(|cpus| opt_bool(cpus, "kvm_hyperv", "vm_config.cpus"))
        .transpose()?
        .unwrap_or(false);
    let ours = if kvm_hyperv {
        KVM_HYPERV_SIGNATURE
    } else {
        KVM_SIGNATURE
    };
    let mut theirs = [0u32; 3];
    for (i, entry) in entries.iter().enumerate() {
        let at = format!("common_cpuid[{i}]");
        let field = |key: &str| -> Result<u32, Refusal> {
            match entry.get(key) {
                None => Ok(0),
                Some(v) => v
                    .as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| format!("{at}.{key} is not a 32-bit unsigned integer")),
            }
        };
        if field("function")? == HYPERVISOR_LEAF && field("index")? == 0 {
            theirs = [field("ebx")?, field("ecx")?, field("edx")?];
        }
    }
    if theirs != ours {
        return Err(format!(
            "common_cpuid is not compatible: the hypervisor signature (leaf {HYPERVISOR_LEAF:#x} \
             EBX/ECX/EDX) is {:#010x}/{:#010x}/{:#010x}, this host's is \
             {:#010x}/{:#010x}/{:#010x}{}",
            theirs[0],
            theirs[1],
            theirs[2],
            ours[0],
            ours[1],
            ours[2],
            if entries.is_empty() {
                " (the list is empty)"
            } else {
                ""
            }
        ));
    }
    Ok(())
}

struct Zone {
    id: String,
    page_size: u64,
    hugepages: bool,
}

fn zone(obj: &Value, id: &str, at: &str) -> Result<Zone, Refusal> {
    let hugepages = opt_bool(obj, "hugepages", at)?;
    let page_size = if hugepages {
        let size = match opt(obj, "hugepage_size") {
            None => DEFAULT_HUGEPAGE_SIZE,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| format!("{at}.hugepage_size is not an unsigned integer"))?,
        };
        if !size.is_power_of_two() || size < SMALL_PAGE {
            return Err(format!(
                "memory zone {id:?} has hugepage_size {size}, not a power of two of at least \
                 {SMALL_PAGE}"
            ));
        }
        size
    } else {
        SMALL_PAGE
    };
    Ok(Zone {
        id: id.to_string(),
        page_size,
        hugepages,
    })
}

fn zones(memory: &Value) -> Result<Vec<Zone>, Refusal> {
    let list = match opt(memory, "zones") {
        None => &[][..],
        Some(v) => v
            .as_array()
            .map(Vec::as_slice)
            .ok_or("vm_config.memory.zones is not a list")?,
    };
    if list.is_empty() {
        let at = "vm_config.memory";
        return if memory.is_object() {
            Ok(vec![zone(memory, DEFAULT_ZONE_ID, at)?])
        } else {
            Ok(vec![zone(&Value::Null, DEFAULT_ZONE_ID, at)?])
        };
    }
    if list.len() > MAX_ZONES {
        return Err(format!(
            "vm_config.memory.zones lists {} zones (at most {MAX_ZONES})",
            list.len()
        ));
    }
    let mut zones: Vec<Zone> = Vec::with_capacity(list.len());
    for (i, z) in list.iter().enumerate() {
        let at = format!("vm_config.memory.zones[{i}]");
        let id = z
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{at}.id is not a string"))?;
        if zones.iter().any(|other| other.id == id) {
            return Err(format!("memory zone {id:?} is defined twice"));
        }
        zones.push(zone(z, id, &at)?);
    }
    Ok(zones)
}

const MM: &str = "memory_manager_data";

fn ranges(mm: &Value) -> Result<Vec<MemoryRange>, Refusal> {
    let list = mm
        .get("memory_ranges")
        .and_then(|r| r.get("data"))
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{MM}.memory_ranges.data is not a list"))?;
    if list.len() > MAX_RANGES {
        return Err(format!(
            "{MM}.memory_ranges.data lists {} ranges (at most {MAX_RANGES})",
            list.len()
        ));
    }
    let mut ranges = Vec::with_capacity(list.len());
    for (i, r) in list.iter().enumerate() {
        let at = format!("{MM}.memory_ranges.data[{i}]");
        let range = MemoryRange {
            gpa: req_u64(r, "gpa", &at)?,
            length: req_u64(r, "length", &at)?,
        };
        if range.length == 0 || !(range.gpa | range.length).is_multiple_of(SMALL_PAGE) {
            return Err(format!(
                "{at} ({:#x}+{:#x}) is empty or not aligned to {SMALL_PAGE} bytes",
                range.gpa, range.length
            ));
        }
        if range.end().is_none() {
            return Err(format!("{at} runs past the end of the address space"));
        }
        ranges.push(range);
    }
    Ok(ranges)
}

fn slots(mm: &Value, zones: &[Zone]) -> Result<Vec<SlotSpec>, Refusal> {
    let list = mm
        .get("guest_ram_mappings")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{MM}.guest_ram_mappings is not a list"))?;
    if list.is_empty() {
        return Err(format!("{MM}.guest_ram_mappings is empty"));
    }
    if list.len() > MAX_SLOTS {
        return Err(format!(
            "{MM}.guest_ram_mappings lists {} slots (at most {MAX_SLOTS})",
            list.len()
        ));
    }
    let mut slots: Vec<SlotSpec> = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let at = format!("{MM}.guest_ram_mappings[{i}]");
        let slot = m
            .get("slot")
            .and_then(Value::as_u64)
            .and_then(|s| u32::try_from(s).ok())
            .ok_or_else(|| format!("{at}.slot is not a 32-bit unsigned integer"))?;
        let gpa = req_u64(m, "gpa", &at)?;
        let size = req_u64(m, "size", &at)?;
        let file_offset = req_u64(m, "file_offset", &at)?;
        let zone_id = m
            .get("zone_id")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{at}.zone_id is not a string"))?;
        if !m.get("virtio_mem").is_some_and(Value::is_boolean) {
            return Err(format!("{at}.virtio_mem is not a boolean"));
        }
        let zone = zones.iter().find(|z| z.id == zone_id).ok_or_else(|| {
            format!(
                "slot {slot} belongs to memory zone {zone_id:?}, not defined in vm_config.memory"
            )
        })?;
        let page_size = zone.page_size;
        if size == 0 || !(gpa | size | file_offset).is_multiple_of(page_size) {
            return Err(format!(
                "slot {slot} (gpa {gpa:#x}, size {size:#x}, file_offset {file_offset:#x}) is \
                 empty or not aligned to its zone's {page_size}-byte pages"
            ));
        }
        if gpa.checked_add(size).is_none()
            || file_offset.checked_add(size).is_none()
            || usize::try_from(size).is_err()
        {
            return Err(format!(
                "slot {slot} runs past the end of the address space"
            ));
        }
        if slots.iter().any(|s| s.slot == slot) {
            return Err(format!("slot {slot} is listed twice"));
        }
        if let Some(other) = slots.iter().find(|s| gpa < s.end() && s.gpa < gpa + size) {
            return Err(format!("slots {} and {slot} overlap", other.slot));
        }
        slots.push(SlotSpec {
            slot,
            gpa,
            size,
            file_offset,
            zone_id: zone_id.to_string(),
            page_size,
        });
    }
    Ok(slots)
}

/// Every memory range must lie in guest RAM slots (the background pull walks the ranges).
fn check_coverage(ranges: &[MemoryRange], slots: &[SlotSpec]) -> Result<(), Refusal> {
    for (i, r) in ranges.iter().enumerate() {
        // Ends cannot overflow: ranges() checked them.
        let end = r.gpa + r.length;
        let mut pos = r.gpa;
        while pos < end {
            let Some(slot) = slots.iter().find(|s| s.gpa <= pos && pos < s.end()) else {
                return Err(format!(
                    "{MM}.memory_ranges.data[{i}] ({:#x}+{:#x}) is not guest RAM: gpa {pos:#x} \
                     lies in no slot of guest_ram_mappings",
                    r.gpa, r.length
                ));
            };
            pos = slot.end();
        }
    }
    Ok(())
}
