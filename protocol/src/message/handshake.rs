//! The connection handshake: `Hello` and `Welcome`.

use super::{DecodeError, Kind};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `Hello`: the client's version and the features it wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Highest protocol version the client speaks.
    pub version: u16,
    /// Features the client wants (`crate::features`).
    pub features: u64,
}

/// `Welcome`: the negotiated version and features, and the daemon's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Protocol version the daemon will speak.
    pub version: u16,
    /// Negotiated features: `Hello.features` & what the daemon supports.
    pub features: u64,
    /// Largest region count per VM.
    pub max_regions: u32,
    /// Largest payload the daemon accepts.
    pub max_payload: u32,
    /// Largest guest memory of one VM, in bytes (the sum of its regions' sizes; the daemon's
    /// `--max-vm-memory-mib`): a front-end can refuse a bigger VM before preparing it.
    pub max_vm_memory: u64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct HelloWire {
    version: U16,
    reserved0: U16,
    reserved1: U32,
    features: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct WelcomeWire {
    version: U16,
    reserved: U16,
    max_regions: U32,
    features: U64,
    max_payload: U32,
    reserved1: U32,
    max_vm_memory: U64,
}

impl Hello {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(
            HelloWire {
                version: self.version.into(),
                reserved0: 0.into(),
                reserved1: 0.into(),
                features: self.features.into(),
            }
            .as_bytes(),
        );
    }

    pub(super) fn decode(p: &[u8]) -> Result<Hello, DecodeError> {
        let w: HelloWire = super::exact(Kind::Hello, p)?;
        if w.reserved0.get() != 0 || w.reserved1.get() != 0 {
            return Err(DecodeError::Reserved(Kind::Hello));
        }
        Ok(Hello {
            version: w.version.get(),
            features: w.features.get(),
        })
    }
}

impl Welcome {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(
            WelcomeWire {
                version: self.version.into(),
                reserved: 0.into(),
                max_regions: self.max_regions.into(),
                features: self.features.into(),
                max_payload: self.max_payload.into(),
                reserved1: 0.into(),
                max_vm_memory: self.max_vm_memory.into(),
            }
            .as_bytes(),
        );
    }

    pub(super) fn decode(p: &[u8]) -> Result<Welcome, DecodeError> {
        let w: WelcomeWire = super::exact(Kind::Welcome, p)?;
        if w.reserved.get() != 0 || w.reserved1.get() != 0 {
            return Err(DecodeError::Reserved(Kind::Welcome));
        }
        Ok(Welcome {
            version: w.version.get(),
            features: w.features.get(),
            max_regions: w.max_regions.get(),
            max_payload: w.max_payload.get(),
            max_vm_memory: w.max_vm_memory.get(),
        })
    }
}
