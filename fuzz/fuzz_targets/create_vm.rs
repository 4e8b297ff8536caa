//! `CreateVm` parameters: the payload decoder with its region validation, then what the daemon
//! does with a decoded `CreateVm` before touching the host: `check_create` (features, host,
//! VM type and region flags), `memory_needed` (guest and memfd bytes) and the per-VM policy
//! override of the daemon's policy.
//!
//! Input: a control byte, then by its bit 0 either a whole `CreateVm` record (header and
//! payload, as a client sends it; seeds are real records) received with the fds it declares,
//! checked against every feature and a host that has them all, or structured input
//! (`arbitrary`): the six payload words, regions built to be valid often (`ArbRegion`), the
//! policy text, the fds received, the negotiated features and the host.
//!
//! Properties: the decoder accepts the regions exactly when an independent validation does;
//! an accepted message re-encodes to the same bytes and carries as many fds as it declares;
//! the memory sums do not overflow and memfds hold at least the guest memory; `check_create`
//! accepts only what was negotiated and what the host and VM type allow; an accepted policy
//! has only non-empty, aligned, non-overflowing rules and decides like the reference.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use vmpager_fuzz::{build_regions, check_policy_decisions, check_policy_invariants};
use vmpager_fuzz::{regions_are_valid, ArbRegion};
use vmpager_protocol::{
    features, CreateVm, Header, Message, VmType, HEADER_LEN, MAGIC, PROTOCOL_VERSION,
    VM_MEMORY_IN_VMM, VM_RECORD_WORKING_SET,
};
use vmpagerd::control::{check_create, memory_needed, HostFeatures};
use vmpagerd::policy::Policy;
use vmpagerd::Populate;
use zerocopy::IntoBytes;

#[derive(Arbitrary, Debug)]
struct Input {
    source_kind: u8,
    populate: u8,
    vm_type: u8,
    flags: u8,
    /// Overrides the region count word when set.
    region_count: Option<u32>,
    regions: Vec<ArbRegion>,
    packed: bool,
    policy: Option<String>,
    /// Added to the fds the message needs (wrapping), so wrong counts are tried too.
    fd_skew: i8,
    features: u64,
    host_uffd: u64,
    default_continue: bool,
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    if control & 1 == 0 {
        let fds = rest
            .get(12..16)
            .and_then(|w| w.try_into().ok())
            .map_or(0, |w| u32::from_le_bytes(w) as usize % 128);
        if let Ok((_, Message::CreateVm(create))) = Message::decode(rest, fds) {
            assert!(regions_are_valid(&create.regions));
            for default in [Populate::Copy, Populate::Continue] {
                let host = HostFeatures {
                    uffd: u64::MAX,
                    memory_attributes: u64::MAX,
                };
                check_daemon_side(&create, features::ALL, default, &host);
            }
        }
        return;
    }
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(rest)) {
        structured(input);
    }
});

fn structured(input: Input) {
    let regions = build_regions(&input.regions, input.packed);
    let policy = input.policy.as_deref().unwrap_or("");
    let mut payload = Vec::new();
    for word in [
        u32::from(input.source_kind % 4),
        input.region_count.unwrap_or(regions.len() as u32),
        u32::from(input.populate % 4),
        u32::from(input.vm_type % 7),
        policy.len() as u32,
        u32::from(input.flags),
    ] {
        payload.extend_from_slice(&word.to_le_bytes());
    }
    payload.extend_from_slice(regions.as_bytes());
    payload.extend_from_slice(policy.as_bytes());
    let private = regions.iter().filter(|r| r.is_private()).count();
    let needed = usize::from(input.source_kind % 4 == 2) + private;
    let fds = needed.wrapping_add_signed(isize::from(input.fd_skew)) % 128;
    let header = Header {
        magic: MAGIC.into(),
        version: PROTOCOL_VERSION.into(),
        kind: 3.into(), // CreateVm
        payload_len: (payload.len() as u32).into(),
        fd_count: (fds as u32).into(),
        request_id: 7.into(),
    };
    let mut record = header.as_bytes().to_vec();
    record.extend_from_slice(&payload);
    assert_eq!(HEADER_LEN + payload.len(), record.len());

    let decoded = Message::decode(&record, fds);
    let source_kind = u32::from(input.source_kind % 4);
    let plausible = (source_kind == 1 || source_kind == 2)
        && input.populate % 4 != 3
        && input.vm_type % 7 != 6
        && u32::from(input.flags) & !(VM_MEMORY_IN_VMM | VM_RECORD_WORKING_SET) == 0
        && input
            .region_count
            .is_none_or(|n| n as usize == regions.len())
        && policy.len() <= vmpager_protocol::MAX_POLICY_TEXT
        && fds == needed
        && record.len() - HEADER_LEN <= vmpager_protocol::MAX_PAYLOAD;
    if plausible {
        assert_eq!(
            decoded.is_ok(),
            regions_are_valid(&regions),
            "decoder and reference disagree on {regions:?}: {decoded:?}"
        );
    }
    let Ok((_, Message::CreateVm(create))) = decoded else {
        assert!(decoded.is_err(), "a CreateVm record decoded as {decoded:?}");
        return;
    };
    assert!(regions_are_valid(&create.regions));
    assert_eq!(create.regions, regions);
    assert_eq!(Message::CreateVm(create.clone()).encode(7), record);
    let host = HostFeatures {
        uffd: input.host_uffd,
        memory_attributes: 0,
    };
    let default = if input.default_continue {
        Populate::Continue
    } else {
        Populate::Copy
    };
    check_daemon_side(&create, input.features, default, &host);
}

/// What the daemon does with a decoded `CreateVm` before touching the host.
fn check_daemon_side(create: &CreateVm, negotiated: u64, default: Populate, host: &HostFeatures) {
    let (total, file_bytes) = memory_needed(&create.regions);
    let exact: u128 = create.regions.iter().map(|r| u128::from(r.size())).sum();
    assert_eq!(u128::from(total), exact);
    assert!(
        file_bytes >= total,
        "memfds of {file_bytes} bytes hold {total}"
    );
    if let Ok(populate) = check_create(create, negotiated, default, host) {
        check_accepted(create, negotiated, populate);
    }

    if let Some(text) = &create.policy {
        let daemon = Policy::default();
        if let Ok(p) = daemon.overridden_by(text) {
            check_policy_invariants(&p);
            for r in p.rules.iter().take(8) {
                check_policy_decisions(&p, r.start, r.size);
            }
        }
    }
}

/// What an accepted `CreateVm` must satisfy.
fn check_accepted(c: &CreateVm, negotiated: u64, populate: Populate) {
    let has = |f: u64| negotiated & f != 0;
    let huge = c.regions.iter().any(|r| r.is_huge());
    let private = c.regions.iter().any(|r| r.is_private());
    if populate == Populate::Continue {
        assert!(has(features::POPULATE_CONTINUE) && !c.memory_in_vmm());
    }
    assert!(c.vm_type == VmType::Default || has(features::PRIVATE_MEMORY));
    assert!(c.flags & VM_RECORD_WORKING_SET == 0 || has(features::WORKING_SET));
    assert!(!huge || has(features::HUGE_PAGES));
    assert!(!c.regions.iter().any(|r| r.is_huge() && r.is_private()));
    assert!(!private || c.vm_type.has_private_memory());
    if c.memory_in_vmm() {
        assert!(has(features::VMM_MEMORY) && !private && c.vm_type == VmType::Default);
        assert!(c
            .regions
            .iter()
            .all(|r| r.memfd_group() == 0 && r.file_offset() == 0));
    }
}
