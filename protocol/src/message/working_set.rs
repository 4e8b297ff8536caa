//! Working-set messages: the pages a recording VM first needed, in order, and the pages to
//! push into a VM ahead of its vCPUs (REAP-style replay).
//!
//! Pages are named by their place in the page source: the 4 KiB page number of the source
//! offset (`source_offset / 4096`), so a working set recorded under one VMM layout replays
//! under another that restores the same snapshot.

use super::{nonzero_vm, prefix, DecodeError, Kind};
use crate::MAX_PAYLOAD;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// One recorded first need: a source page and when it was first needed.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct WorkingSetEntry {
    /// Source page number (source offset / 4096).
    pub page: U64,
    /// Nanoseconds since the VM was created.
    pub t_ns: U64,
}

impl WorkingSetEntry {
    /// An entry for `page` first needed `t_ns` after VM creation.
    pub fn new(page: u64, t_ns: u64) -> WorkingSetEntry {
        WorkingSetEntry {
            page: page.into(),
            t_ns: t_ns.into(),
        }
    }
}

/// Largest number of pages one `ReplayWorkingSet` carries.
pub const MAX_REPLAY_PAGES: usize = (MAX_PAYLOAD - 16) / 8;
/// Largest number of entries one `WorkingSet` reply carries.
pub const MAX_WORKING_SET_ENTRIES: usize = (MAX_PAYLOAD - 32) / 16;

/// `ReplayWorkingSet`: pages to push into the VM, in this order, after those queued before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayWorkingSet {
    /// VM id.
    pub vm_id: u64,
    /// Source page numbers, at most [`MAX_REPLAY_PAGES`].
    pub pages: Vec<u64>,
}

/// `WorkingSet`: a slice of a VM's recorded working set, from entry `from` on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkingSet {
    /// VM id.
    pub vm_id: u64,
    /// Entries recorded so far in all.
    pub total: u64,
    /// Index of the first entry carried.
    pub from: u64,
    /// At most [`MAX_WORKING_SET_ENTRIES`] entries, in order of first need.
    pub entries: Vec<WorkingSetEntry>,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ReplayWire {
    vm_id: U64,
    count: U32,
    reserved: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct WorkingSetWire {
    vm_id: U64,
    total: U64,
    from: U64,
    count: U32,
    reserved: U32,
}

impl ReplayWorkingSet {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(
            ReplayWire {
                vm_id: self.vm_id.into(),
                count: (self.pages.len() as u32).into(),
                reserved: 0.into(),
            }
            .as_bytes(),
        );
        for p in &self.pages {
            out.extend_from_slice(U64::new(*p).as_bytes());
        }
    }

    pub(super) fn decode(p: &[u8]) -> Result<ReplayWorkingSet, DecodeError> {
        let kind = Kind::ReplayWorkingSet;
        let (w, rest): (ReplayWire, _) = prefix(kind, p)?;
        if w.reserved.get() != 0 {
            return Err(DecodeError::Reserved(kind));
        }
        let count = w.count.get() as usize;
        if count > MAX_REPLAY_PAGES {
            return Err(DecodeError::Limit {
                field: "count",
                value: count as u64,
            });
        }
        let pages = <[U64]>::ref_from_bytes(rest)
            .ok()
            .filter(|a| a.len() == count)
            .ok_or(DecodeError::Malformed { kind, len: p.len() })?;
        Ok(ReplayWorkingSet {
            vm_id: nonzero_vm(w.vm_id.get())?,
            pages: pages.iter().map(|a| a.get()).collect(),
        })
    }
}

impl WorkingSet {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(
            WorkingSetWire {
                vm_id: self.vm_id.into(),
                total: self.total.into(),
                from: self.from.into(),
                count: (self.entries.len() as u32).into(),
                reserved: 0.into(),
            }
            .as_bytes(),
        );
        out.extend_from_slice(self.entries.as_bytes());
    }

    pub(super) fn decode(p: &[u8]) -> Result<WorkingSet, DecodeError> {
        let kind = Kind::WorkingSet;
        let (w, rest): (WorkingSetWire, _) = prefix(kind, p)?;
        if w.reserved.get() != 0 {
            return Err(DecodeError::Reserved(kind));
        }
        let count = w.count.get() as usize;
        if count > MAX_WORKING_SET_ENTRIES {
            return Err(DecodeError::Limit {
                field: "count",
                value: count as u64,
            });
        }
        let entries = <[WorkingSetEntry]>::ref_from_bytes(rest)
            .ok()
            .filter(|e| e.len() == count)
            .ok_or(DecodeError::Malformed { kind, len: p.len() })?;
        if w.from
            .get()
            .checked_add(count as u64)
            .is_none_or(|end| end > w.total.get())
        {
            return Err(DecodeError::Malformed { kind, len: p.len() });
        }
        Ok(WorkingSet {
            vm_id: nonzero_vm(w.vm_id.get())?,
            total: w.total.get(),
            from: w.from.get(),
            entries: entries.to_vec(),
        })
    }
}
