//! Control messages: `Message::decode` of one `SOCK_SEQPACKET` record with the number of fds
//! that came with it (the daemon decodes every record a client sends; the client every reply).
//!
//! Input: a control byte, then the record. Control bits 0-6: the fds received (0-127, past
//! `MAX_FDS`); bit 7: rewrite the header's magic, version and payload length to match, so the
//! mutations reach every payload decoder.
//!
//! Properties of an accepted record: it re-encodes to exactly the same bytes (every field is
//! checked, every reserved field is zero), the fds declared by the header and by the message
//! equal those received, and every count and length respects its limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmpager_fuzz::regions_are_valid;
use vmpager_protocol::message::{MAX_REPLAY_PAGES, MAX_WORKING_SET_ENTRIES};
use vmpager_protocol::region::validate_regions;
use vmpager_protocol::{
    Message, HEADER_LEN, MAGIC, MAX_ERROR_TEXT, MAX_PAYLOAD, MAX_POLICY_TEXT, MAX_REGIONS,
    MAX_VCPUS, PROTOCOL_VERSION,
};

fuzz_target!(|data: &[u8]| {
    let Some((&control, record)) = data.split_first() else {
        return;
    };
    let fds = usize::from(control & 0x7f);
    let mut record = record.to_vec();
    if control & 0x80 != 0 && record.len() >= HEADER_LEN {
        let payload_len = (record.len() - HEADER_LEN) as u32;
        record[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        record[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        record[8..12].copy_from_slice(&payload_len.to_le_bytes());
    }
    let Ok((header, message)) = Message::decode(&record, fds) else {
        return;
    };
    assert!(record.len() - HEADER_LEN <= MAX_PAYLOAD);
    assert_eq!(header.payload_len.get() as usize, record.len() - HEADER_LEN);
    assert_eq!(header.fd_count.get() as usize, fds);
    assert_eq!(message.fd_count(), fds);
    assert_eq!(
        message.encode(header.request_id.get()),
        record,
        "{message:?} does not re-encode to the bytes it came from"
    );
    match &message {
        Message::CreateVm(c) => {
            assert!(c.regions.len() <= MAX_REGIONS);
            assert_eq!(validate_regions(&c.regions), Ok(()));
            assert!(regions_are_valid(&c.regions), "{:?}", c.regions);
            assert!(c
                .policy
                .as_ref()
                .is_none_or(|p| p.len() <= MAX_POLICY_TEXT && !p.is_empty()));
        }
        Message::VmCreated(v) => assert!(v.region_count as usize <= MAX_REGIONS),
        Message::AttachUffd(a) => {
            assert!(!a.host_addrs.is_empty() && a.host_addrs.len() <= MAX_REGIONS)
        }
        Message::OpenMailbox { vcpus, .. } | Message::MailboxOpened { vcpus, .. } => {
            assert!((1..=MAX_VCPUS).contains(vcpus))
        }
        Message::Error(e) => assert!(e.text.len() <= MAX_ERROR_TEXT),
        Message::ReplayWorkingSet(r) => assert!(r.pages.len() <= MAX_REPLAY_PAGES),
        Message::WorkingSet(w) => assert!(w.entries.len() <= MAX_WORKING_SET_ENTRIES),
        _ => {}
    }
    if let Some(vm_id) = vm_id(&message) {
        assert_ne!(vm_id, 0, "VM id 0 is reserved: {message:?}");
    }
});

/// The VM a message names, if it names one.
fn vm_id(m: &Message) -> Option<u64> {
    Some(match m {
        Message::VmCreated(v) => v.vm_id,
        Message::AttachUffd(a) => a.vm_id,
        Message::AttachChannel(a) => a.vm_id,
        Message::Attached { vm_id }
        | Message::Detach { vm_id }
        | Message::Detached { vm_id }
        | Message::GetStats { vm_id }
        | Message::OpenMailbox { vm_id, .. }
        | Message::MailboxOpened { vm_id, .. }
        | Message::Subscribe { vm_id, .. }
        | Message::Subscribed { vm_id }
        | Message::ReplayQueued { vm_id, .. }
        | Message::GetWorkingSet { vm_id, .. } => *vm_id,
        Message::ConversionEvent(e) => e.vm_id,
        Message::Stats(s) => s.vm_id,
        Message::ReplayWorkingSet(r) => r.vm_id,
        Message::WorkingSet(w) => w.vm_id,
        _ => return None,
    })
}
