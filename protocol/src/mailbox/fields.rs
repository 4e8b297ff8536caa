//! Decoding what the other process wrote into a mailbox: the layout of a received memfd, the
//! request fields of a slot (daemon side) and the answer fields (VMM side). Pure functions of
//! the words read, so they are tested and fuzzed without a mapping (`fuzz/`).

use super::{
    MailboxError, Request, RequestKind, Response, Status, HEADER_SIZE, MAILBOX_MAGIC,
    MAILBOX_VERSION, MAX_SLOTS, REQ_PRIVATE, SLOT_SIZE,
};

/// The number of slots of a mailbox memfd of `len` bytes: `BadLayout` unless `len` is a header
/// and 1 to [`MAX_SLOTS`] whole slots.
pub fn slots_for_len(len: usize) -> Result<u32, MailboxError> {
    let Some(body) = len.checked_sub(HEADER_SIZE) else {
        return Err(MailboxError::BadLayout);
    };
    let slots = body / SLOT_SIZE;
    if slots == 0 || slots > MAX_SLOTS as usize || body % SLOT_SIZE != 0 {
        return Err(MailboxError::BadLayout);
    }
    // At most MAX_SLOTS: fits.
    Ok(slots as u32)
}

/// The layout fields of a mailbox header as read from a received memfd (untrusted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderWords {
    /// Must be [`MAILBOX_MAGIC`].
    pub magic: u32,
    /// Must be [`MAILBOX_VERSION`].
    pub version: u32,
    /// Must be the slot count the memfd's size implies.
    pub slots: u32,
    /// Must be [`SLOT_SIZE`].
    pub slot_size: u32,
}

impl HeaderWords {
    /// Checks the header of a mailbox whose size implies `slots` slots.
    pub fn check(&self, slots: u32) -> Result<(), MailboxError> {
        if self.magic != MAILBOX_MAGIC
            || self.version != MAILBOX_VERSION
            || self.slots != slots
            || self.slot_size != SLOT_SIZE as u32
        {
            return Err(MailboxError::BadLayout);
        }
        Ok(())
    }
}

impl RequestKind {
    /// The kind for a wire value, if known.
    pub fn from_wire(v: u32) -> Option<RequestKind> {
        match v {
            1 => Some(RequestKind::MemoryFault),
            2 => Some(RequestKind::MapGpaRange),
            _ => None,
        }
    }
}

impl Request {
    /// Decodes the request fields a VMM wrote into a slot (untrusted): `Err(kind)` for an
    /// unknown kind; flag bits other than [`REQ_PRIVATE`] are ignored.
    pub fn from_slot(kind: u32, flags: u32, gpa: u64, size: u64) -> Result<Request, u32> {
        let kind = RequestKind::from_wire(kind).ok_or(kind)?;
        Ok(Request {
            kind,
            gpa,
            size,
            private: flags & REQ_PRIVATE != 0,
        })
    }

    /// The slot fields this request is written as: `(kind, flags, gpa, size)`.
    pub fn to_slot(&self) -> (u32, u32, u64, u64) {
        let flags = if self.private { REQ_PRIVATE } else { 0 };
        (self.kind as u32, flags, self.gpa, self.size)
    }
}

impl Status {
    /// The status for a wire value, if known.
    pub fn from_wire(v: u32) -> Option<Status> {
        match v {
            1 => Some(Status::Retry),
            2 => Some(Status::Denied),
            3 => Some(Status::Fatal),
            _ => None,
        }
    }
}

impl Response {
    /// Decodes the answer fields the daemon wrote into a slot (untrusted by the VMM): `None`
    /// for an unknown status.
    pub fn from_slot(status: u32, code: u32, ret: u64) -> Option<Response> {
        Some(Response {
            status: Status::from_wire(status)?,
            code,
            ret,
        })
    }

    /// The slot fields this answer is written as: `(status, code, ret)`.
    pub fn to_slot(&self) -> (u32, u32, u64) {
        (self.status as u32, self.code, self.ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_sizes_are_a_header_and_whole_slots() {
        assert_eq!(slots_for_len(HEADER_SIZE + SLOT_SIZE).ok(), Some(1));
        assert_eq!(
            slots_for_len(HEADER_SIZE + MAX_SLOTS as usize * SLOT_SIZE).ok(),
            Some(MAX_SLOTS)
        );
        for bad in [
            0,
            HEADER_SIZE - 1,
            HEADER_SIZE,
            HEADER_SIZE + SLOT_SIZE - 1,
            HEADER_SIZE + SLOT_SIZE + 1,
            HEADER_SIZE + (MAX_SLOTS as usize + 1) * SLOT_SIZE,
            usize::MAX,
        ] {
            assert!(slots_for_len(bad).is_err(), "{bad}");
        }
        let good = HeaderWords {
            magic: MAILBOX_MAGIC,
            version: MAILBOX_VERSION,
            slots: 4,
            slot_size: SLOT_SIZE as u32,
        };
        assert!(good.check(4).is_ok());
        assert!(good.check(5).is_err());
        assert!(HeaderWords {
            version: MAILBOX_VERSION + 1,
            ..good
        }
        .check(4)
        .is_err());
        assert!(HeaderWords { magic: 0, ..good }.check(4).is_err());
        assert!(HeaderWords {
            slot_size: 64,
            ..good
        }
        .check(4)
        .is_err());
    }

    #[test]
    fn slot_fields_round_trip_and_unknown_values_are_refused() {
        let r = Request::from_slot(2, REQ_PRIVATE | 0x8000_0000, 0x1000, 0x2000).unwrap();
        assert_eq!(r.kind, RequestKind::MapGpaRange);
        assert!(r.private);
        assert_eq!(r.to_slot(), (2, REQ_PRIVATE, 0x1000, 0x2000));
        assert_eq!(Request::from_slot(0, 0, 0, 0), Err(0));
        assert_eq!(Request::from_slot(3, 0, 0, 0), Err(3));
        let a = Response::from_slot(3, 7, u64::MAX).unwrap();
        assert_eq!(a.status, Status::Fatal);
        assert_eq!(a.to_slot(), (3, 7, u64::MAX));
        assert_eq!(Response::from_slot(0, 0, 0), None);
        assert_eq!(Response::from_slot(4, 0, 0), None);
    }
}
