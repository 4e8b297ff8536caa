//! The mailbox: what the daemon reads out of a slot a VMM wrote (the request words, then the
//! range checked against the VM's regions and its policy, as a conversion would), what the
//! VMM reads back (the answer words), and the layout of a mailbox memfd the VMM received.
//!
//! Input: structured (`arbitrary`): the memfd length and header words, a slot's request and
//! answer words, validated regions, and a policy.
//!
//! Properties: a decoded request or answer writes back as the same words (unknown kinds and
//! statuses are refused, unknown flag bits dropped); a memfd is accepted only at a header plus
//! 1 to `MAX_SLOTS` whole slots, with exactly the expected header; a range is located only
//! when it is non-empty, page aligned and wholly inside the region returned, and refused as
//! "not in one region" only when no region holds it; the policy decides like the reference.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmpager_fuzz::{build_regions, check_policy_decisions, policy_text, regions_are_valid};
use vmpager_fuzz::{ArbRegion, ArbRule, Num};
use vmpager_protocol::mailbox::{
    slots_for_len, HeaderWords, Request, Response, HEADER_SIZE, MAILBOX_MAGIC, MAILBOX_VERSION,
    MAX_SLOTS, REQ_PRIVATE, SLOT_SIZE,
};
use vmpager_protocol::PAGE_SIZE;
use vmpagerd::convert::{codes, locate};
use vmpagerd::policy::Policy;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Memfd length: slots (`Ok`) or any value (`Err`).
    len: Result<u16, usize>,
    /// Which header word to spoil (0-3), if any.
    spoil: Option<(u8, u32)>,
    kind: u32,
    flags: u32,
    gpa: Num,
    size: Num,
    status: u32,
    code: u32,
    ret: u64,
    regions: Vec<ArbRegion>,
    packed: bool,
    default_mode: u8,
    implicit: Option<bool>,
    rules: Vec<ArbRule>,
}

fuzz_target!(|input: Input| {
    // The layout of a received memfd.
    let len = match input.len {
        Ok(slots) => HEADER_SIZE + usize::from(slots) * SLOT_SIZE,
        Err(len) => len,
    };
    match slots_for_len(len) {
        Ok(slots) => {
            assert!((1..=MAX_SLOTS).contains(&slots));
            assert_eq!(len, HEADER_SIZE + slots as usize * SLOT_SIZE);
            let mut words = HeaderWords {
                magic: MAILBOX_MAGIC,
                version: MAILBOX_VERSION,
                slots,
                slot_size: SLOT_SIZE as u32,
            };
            assert!(words.check(slots).is_ok());
            if let Some((which, value)) = input.spoil {
                let field = match which % 4 {
                    0 => &mut words.magic,
                    1 => &mut words.version,
                    2 => &mut words.slots,
                    _ => &mut words.slot_size,
                };
                let changed = *field != value;
                *field = value;
                assert_eq!(words.check(slots).is_ok(), !changed, "{words:?}");
            }
        }
        Err(_) => assert!(
            len < HEADER_SIZE + SLOT_SIZE
                || !(len - HEADER_SIZE).is_multiple_of(SLOT_SIZE)
                || (len - HEADER_SIZE) / SLOT_SIZE > MAX_SLOTS as usize
        ),
    }

    // The answer the VMM reads back.
    match Response::from_slot(input.status, input.code, input.ret) {
        Some(r) => assert_eq!(r.to_slot(), (input.status, input.code, input.ret)),
        None => assert!(!(1..=3).contains(&input.status)),
    }

    // The request the daemon reads.
    let (gpa, size) = (input.gpa.get(), input.size.get());
    let kind = input.kind % 4;
    let request = match Request::from_slot(kind, input.flags, gpa, size) {
        Ok(r) => r,
        Err(k) => {
            assert_eq!(k, kind);
            assert!(kind != 1 && kind != 2);
            return;
        }
    };
    assert_eq!(
        request.to_slot(),
        (kind, input.flags & REQ_PRIVATE, gpa, size)
    );

    // The range against the VM's regions (validated ones, as a VM has).
    let regions = build_regions(&input.regions, input.packed);
    if !regions_are_valid(&regions) {
        return;
    }
    let spans = || regions.iter().map(|r| (r.gpa(), r.size()));
    let inside = |(start, len): (u64, u64)| {
        gpa >= start && u128::from(gpa) + u128::from(size) <= u128::from(start) + u128::from(len)
    };
    match locate(spans(), gpa, size) {
        Ok(i) => {
            assert!(size > 0 && gpa.is_multiple_of(PAGE_SIZE) && size.is_multiple_of(PAGE_SIZE));
            let r = &regions[i];
            assert!(
                inside((r.gpa(), r.size())),
                "{gpa:#x}+{size:#x} not in {r:?}"
            );
            // The page range a conversion touches lies inside the region.
            let last = (gpa - r.gpa() + size) / PAGE_SIZE;
            assert!(last <= r.size() / PAGE_SIZE);
        }
        Err(e) if e.code() == codes::INVALID => {
            assert!(
                size == 0
                    || !(gpa | size).is_multiple_of(PAGE_SIZE)
                    || gpa.checked_add(size).is_none()
            )
        }
        Err(e) => {
            assert_eq!(e.code(), codes::NOT_IN_ONE_REGION);
            assert!(
                !spans().any(inside),
                "{gpa:#x}+{size:#x} is inside a region"
            );
        }
    }

    // The VM's policy on the same range.
    let text = policy_text(input.default_mode, input.implicit, None, &input.rules);
    if let Ok(policy) = Policy::parse(&text) {
        check_policy_decisions(&policy, request.gpa, request.size);
    }
});
