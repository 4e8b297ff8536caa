//! Conversion events: `ConversionEvent`, sent to the connections that `Subscribe`d.

use super::{DecodeError, Kind};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{Immutable, IntoBytes, KnownLayout, Unaligned};

/// `ConversionEvent`: `[gpa, gpa + size)` became private (`to_private`) or shared. Its old
/// backing on the other side has been discarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConversionEvent {
    /// VM id.
    pub vm_id: u64,
    /// First guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Converted to private (else to shared).
    pub to_private: bool,
}

#[derive(zerocopy::FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ConversionWire {
    vm_id: U64,
    gpa: U64,
    size: U64,
    to_private: U32,
    reserved: U32,
}

impl ConversionEvent {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(
            ConversionWire {
                vm_id: self.vm_id.into(),
                gpa: self.gpa.into(),
                size: self.size.into(),
                to_private: u32::from(self.to_private).into(),
                reserved: 0.into(),
            }
            .as_bytes(),
        );
    }

    pub(super) fn decode(p: &[u8]) -> Result<ConversionEvent, DecodeError> {
        let kind = Kind::ConversionEvent;
        let w: ConversionWire = super::exact(kind, p)?;
        if w.reserved.get() != 0 || w.to_private.get() > 1 {
            return Err(DecodeError::Reserved(kind));
        }
        Ok(ConversionEvent {
            vm_id: super::nonzero_vm(w.vm_id.get())?,
            gpa: w.gpa.get(),
            size: w.size.get(),
            to_private: w.to_private.get() == 1,
        })
    }
}
