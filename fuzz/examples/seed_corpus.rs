//! Writes the seed corpora under `fuzz/corpus/<target>/`: real bytes, as the crates send them
//! and as the tests and docs show them, framed the way each target reads its input (see the
//! target's header). Run from the repository root:
//!
//! ```sh
//! cargo +nightly run --manifest-path fuzz/Cargo.toml --example seed_corpus
//! ```
//!
//! Structured-only targets (`mailbox`) get no seeds: libFuzzer builds their corpus itself.

use std::path::{Path, PathBuf};
use vmpager_client::working_set::{FirstNeed, SnapshotId, WorkingSet};
use vmpager_compat::cloud_hypervisor::wire::{ConnectionRole, MemoryRange, Request, Response};
use vmpager_compat::firecracker::{encode_handshake, GuestRegionUffdMapping};
use vmpager_protocol::message::{ErrorCode, ErrorReply, Stats, WorkingSet as WorkingSetReply};
use vmpager_protocol::*;

const M: u64 = 1 << 20;

/// The docs/private-memory.md config file.
const POLICY_FILE: &str = r#"[policy]
default = "convertible"
implicit_conversions = true
max_conversions_per_sec = 10000

[[policy.rule]]
start = 0xfec00000
size = 0x1000000
mode = "shared-only"

[[policy.rule]]
start = 0x7c000000
size = 0x4000000
mode = "shared-only"

[[policy.rule]]
start = 0x100000000
size = 0x40000000
mode = "private-only"
"#;

/// The docs/private-memory.md per-VM override.
const POLICY_OVERRIDE: &str =
    "[policy]\nimplicit_conversions = false\nmax_conversions_per_sec = 100\n";

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    std::fs::write(d.join(name), bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
}

fn framed(control: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![control];
    out.extend_from_slice(bytes);
    out
}

fn create_vms() -> Vec<CreateVm> {
    let base = CreateVm {
        vm_type: VmType::Default,
        policy: None,
        source_url: None,
        source: PageSourceKind::Zero,
        populate: PopulateMethod::Default,
        flags: 0,
        regions: vec![RegionSpec::new(4 << 30, 256 * M, 0)],
    };
    vec![
        base.clone(),
        CreateVm {
            source: PageSourceKind::File,
            policy: Some(POLICY_OVERRIDE.into()),
            source_url: None,
            populate: PopulateMethod::Continue,
            flags: VM_RECORD_WORKING_SET,
            regions: vec![
                RegionSpec::new(0, 3 * M, 0).in_memfd(1, 0),
                RegionSpec::new(4 << 30, 2 * M, 3 * M).in_memfd(1, 3 * M),
                RegionSpec::new(8 << 30, 4 * M, 5 * M).huge_2m(),
            ],
            ..base.clone()
        },
        CreateVm {
            vm_type: VmType::SwProtected,
            regions: vec![RegionSpec::new(0, 64 * M, 0).private()],
            ..base.clone()
        },
        CreateVm {
            source: PageSourceKind::Snapshot,
            source_url: Some("s3://bucket/snapshots/demo".into()),
            ..base.clone()
        },
        CreateVm {
            flags: VM_MEMORY_IN_VMM,
            populate: PopulateMethod::Copy,
            ..base
        },
    ]
}

fn messages() -> Vec<Message> {
    let mut m: Vec<Message> = create_vms().into_iter().map(Message::CreateVm).collect();
    m.extend([
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            features: features::ALL,
        }),
        Message::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            features: features::ALL,
            max_regions: MAX_REGIONS as u32,
            max_payload: MAX_PAYLOAD as u32,
        }),
        Message::VmCreated(VmCreated {
            vm_id: 1,
            uffd_modes: 5,
            uffd_features: 0x1ff,
            region_count: 2,
            flags: VMCREATED_VMM_SETS_ATTRIBUTES,
            token: 0x1234_5678_9abc_def0,
        }),
        Message::AttachUffd(AttachUffd {
            vm_id: 1,
            host_addrs: vec![0x7f00_0000_0000, 0x7f10_0000_0000],
        }),
        Message::AttachChannel(AttachChannel {
            vm_id: 1,
            protocol: ChannelProtocol::CloudHypervisor,
        }),
        Message::Attached { vm_id: 1 },
        Message::Detach { vm_id: 1 },
        Message::Detached { vm_id: 1 },
        Message::GetStats { vm_id: 1 },
        Message::Stats(Stats {
            vm_id: 1,
            ..Stats::default()
        }),
        Message::Error(ErrorReply {
            code: ErrorCode::InvalidRegions,
            text: "regions 0 and 1 overlap".into(),
        }),
        Message::OpenMailbox { vm_id: 1, vcpus: 2 },
        Message::MailboxOpened { vm_id: 1, vcpus: 2 },
        Message::Subscribe {
            vm_id: 1,
            token: 0x1234_5678_9abc_def0,
        },
        Message::Subscribed { vm_id: 1 },
        Message::ConversionEvent(ConversionEvent {
            vm_id: 1,
            gpa: 0x1000,
            size: 0x2000,
            to_private: true,
        }),
        Message::ReplayWorkingSet(ReplayWorkingSet {
            vm_id: 1,
            pages: vec![9, 3, 1 << 20],
        }),
        Message::ReplayQueued {
            vm_id: 1,
            queued: 3,
        },
        Message::GetWorkingSet { vm_id: 1, from: 0 },
        Message::WorkingSet(WorkingSetReply {
            vm_id: 1,
            total: 2,
            from: 0,
            entries: vec![
                WorkingSetEntry::new(9, 1_000),
                WorkingSetEntry::new(3, 2_000),
            ],
        }),
    ]);
    m
}

fn control_plane(dir: &Path) {
    for (i, m) in messages().iter().enumerate() {
        let fds = m.fd_count() as u8;
        write(
            dir,
            "message",
            &format!("{i:02}-{:?}", m.kind()),
            &framed(fds, &m.encode(i as u64 + 1)),
        );
    }
    for (i, c) in create_vms().into_iter().enumerate() {
        let record = Message::CreateVm(c).encode(7);
        write(
            dir,
            "create_vm",
            &format!("record-{i}"),
            &framed(0, &record),
        );
    }
    write(
        dir,
        "policy",
        "config-file",
        &framed(0, POLICY_FILE.as_bytes()),
    );
    write(
        dir,
        "policy",
        "override",
        &framed(1, POLICY_OVERRIDE.as_bytes()),
    );
    write(
        dir,
        "policy",
        "no-rules",
        &framed(1, b"[policy]\nrule = []\ndefault = \"shared-only\"\n"),
    );
}

fn firecracker(dir: &Path) {
    // docs/firecracker.md, and a layout with a hole and 2 MiB pages.
    let doc = br#"[{"base_host_virt_addr":140067285049344,"size":134217728,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
    let two = encode_handshake(&[
        GuestRegionUffdMapping {
            base_host_virt_addr: 0x7f00_0000_0000,
            size: 3 << 30,
            offset: 0,
            page_size: 4096,
            page_size_kib: None,
        },
        GuestRegionUffdMapping {
            base_host_virt_addr: 0x7f80_0000_0000,
            size: 1 << 30,
            offset: 3 << 30,
            page_size: 2 << 20,
            page_size_kib: Some(2 << 20),
        },
    ]);
    for (name, json, file_len) in [
        ("doc", &doc[..], 128 * M),
        ("two-regions", &two[..], 4 << 30),
    ] {
        let mut input = vec![0u8];
        input.extend_from_slice(&file_len.to_le_bytes());
        input.extend_from_slice(json);
        write(dir, "firecracker", name, &input);
    }
}

fn cloud_hypervisor(dir: &Path) {
    let page_fault = |gpa, length| {
        let mut b = Request::page_fault().encode().to_vec();
        b.extend_from_slice(&MemoryRange { gpa, length }.encode());
        b
    };
    // The main connection of a migration, as `vmpager ch-restore` sends it.
    let mut main = Vec::new();
    main.extend_from_slice(&Request::start().encode());
    main.extend_from_slice(&Response::ok().encode());
    main.extend_from_slice(&Request::memory_fd().encode());
    main.extend_from_slice(&7u32.to_le_bytes());
    main.extend_from_slice(&Request::config(2).encode());
    main.extend_from_slice(b"{}");
    main.extend_from_slice(&Request::state(2).encode());
    main.extend_from_slice(b"{}");
    main.extend_from_slice(&Request::complete().encode());
    write(dir, "ch_wire", "main-connection", &main);
    let mut fault = ConnectionRole::Fault.encode().to_vec();
    fault.extend(page_fault(0x1000, 4096));
    write(dir, "ch_wire", "fault-connection", &framed(1, &fault[1..]));
    write(
        dir,
        "ch_wire",
        "error-response",
        &Response::error().encode(),
    );

    // The fault connection as cloud-hypervisor's handler sends it, read in pieces.
    let mut stream = page_fault(0x3000, 4096);
    stream.extend(page_fault((1 << 32) + (2 << 20), 2 << 20));
    stream.extend(page_fault(2 << 20, 4096));
    stream.extend(Request::abandon().encode());
    let mut input = vec![0u8, 3, 1, 7, 16];
    input.extend_from_slice(&stream);
    write(dir, "ch_fault_channel", "page-faults", &input);
}

fn ch_snapshot(dir: &Path) {
    // The two-zone snapshot of compat/tests/snapshot_fixture.
    let (kib, gib) = (1024u64, 1u64 << 30);
    let config = serde_json::json!({
        "cpus": {"boot_vcpus": 2, "kvm_hyperv": false},
        "memory": {"size": 0, "hugepages": false, "hugepage_size": null, "prefault": false,
            "zones": [
                {"id": "mem0", "size": 128 * kib, "hugepages": false, "hugepage_size": null},
                {"id": "huge0", "size": 4 * M, "hugepages": true, "hugepage_size": null}
            ]}
    });
    let mapping = |slot: u32, gpa: u64, size: u64, zone: &str, file_offset: u64| {
        serde_json::json!({"slot": slot, "gpa": gpa, "size": size, "zone_id": zone,
                           "virtio_mem": false, "file_offset": file_offset})
    };
    let mm = serde_json::json!({
        "memory_ranges": {"data": [
            {"gpa": 4 * gib + 2 * M, "length": 4 * M},
            {"gpa": 0, "length": 64 * kib},
            {"gpa": 4 * gib, "length": 64 * kib}
        ]},
        "guest_ram_mappings": [
            mapping(0, 0, 64 * kib, "mem0", 0),
            mapping(1, 4 * gib, 64 * kib, "mem0", 64 * kib),
            mapping(2, 4 * gib + 2 * M, 4 * M, "huge0", 0)
        ],
        "boot_ram": 4 * M + 128 * kib
    });
    let state = serde_json::json!({
        "snapshots": {
            "cpu-manager": {"snapshots": {}, "snapshot_data": {"state": "{\"regs\":[]}"}},
            "memory-manager": {"snapshots": {}, "snapshot_data": {"state": mm.to_string()}}
        },
        "snapshot_data": null
    });
    let mut raw = vec![0u8];
    raw.extend_from_slice(config.to_string().as_bytes());
    raw.push(0);
    raw.extend_from_slice(state.to_string().as_bytes());
    write(dir, "ch_snapshot", "two-zones", &raw);
    let mut inner = vec![1u8];
    inner.extend_from_slice(config.to_string().as_bytes());
    inner.push(0);
    inner.extend_from_slice(mm.to_string().as_bytes());
    write(dir, "ch_snapshot", "two-zones-mm", &inner);
}

fn working_set(dir: &Path) {
    let ws = WorkingSet {
        snapshot: SnapshotId {
            size: 1 << 30,
            hash: [7; 32],
        },
        entries: [(9, 1), (3, 2), (1 << 28, 5_000), (10, 5_000)]
            .iter()
            .map(|&(page, t_us)| FirstNeed { page, t_us })
            .collect(),
    };
    let bytes = ws.encode();
    write(dir, "working_set", "four-pages", &framed(0, &bytes));
    write(
        dir,
        "working_set",
        "four-pages-rechecked",
        &framed(1, &bytes),
    );
}

fn main() {
    let dir: PathBuf = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("fuzz/corpus"), PathBuf::from);
    control_plane(&dir);
    firecracker(&dir);
    cloud_hypervisor(&dir);
    ch_snapshot(&dir);
    working_set(&dir);
    println!("seed corpora written under {}", dir.display());
}
