//! Creating a VM and attaching its fault sources: `CreateVm`, `VmCreated`, `AttachUffd`,
//! `AttachChannel`, and the enumerations they carry.

use super::{nonzero_vm, prefix, DecodeError, Kind};
use crate::region::{validate_regions, RegionSpec};
use crate::{MAX_POLICY_TEXT, MAX_REGIONS, MAX_SOURCE_URL};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Where a VM's pages come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum PageSourceKind {
    /// Every page starts as zeros.
    Zero = 1,
    /// A raw snapshot image; its fd travels with `CreateVm`. Bytes past its end read as zeros.
    File = 2,
    /// Another daemon, over the network (post-copy migration): nothing is served until a
    /// `MigrateIn` names the source; faults wait meanwhile. Needs [`crate::features::MIGRATION`].
    Remote = 3,
    /// A packed snapshot (docs/snapshot-format.md) at the object-store URL in
    /// [`CreateVm::source_url`] (`file://`, `s3://`), fetched by chunks, checked and cached by
    /// the daemon. Needs [`crate::features::SNAPSHOT_URL`].
    Snapshot = 4,
}

/// KVM VM type, as the VMM created it. Only KVM's notion of private memory counts: `sev` and
/// `sev-es` encrypt memory but KVM cannot support private memslots for them, so no region of
/// theirs may be private and every conversion to private is refused (to shared is a no-op
/// success, DESIGN.md §5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u32)]
pub enum VmType {
    /// `KVM_X86_DEFAULT_VM`: no private memory.
    #[default]
    Default = 0,
    /// `KVM_X86_SW_PROTECTED_VM`.
    SwProtected = 1,
    /// `KVM_X86_SEV_VM`.
    Sev = 2,
    /// `KVM_X86_SEV_ES_VM`.
    SevEs = 3,
    /// `KVM_X86_SNP_VM`.
    Snp = 4,
    /// `KVM_X86_TDX_VM`.
    Tdx = 5,
}

impl VmType {
    /// Decodes a wire value (the same numbers as KVM's `KVM_X86_*_VM`).
    pub fn from_wire(v: u32) -> Option<VmType> {
        use VmType::*;
        Some(match v {
            0 => Default,
            1 => SwProtected,
            2 => Sev,
            3 => SevEs,
            4 => Snp,
            5 => Tdx,
            _ => return None,
        })
    }

    /// KVM can back this type's memory with guest_memfd and convert it (regions flagged
    /// `REGION_PRIVATE` come with a guest_memfd the VMM created).
    pub fn has_private_memory(self) -> bool {
        matches!(self, VmType::SwProtected | VmType::Snp | VmType::Tdx)
    }

    /// The name used in configs and `--print-capabilities`.
    pub fn name(self) -> &'static str {
        match self {
            VmType::Default => "default",
            VmType::SwProtected => "sw-protected",
            VmType::Sev => "sev",
            VmType::SevEs => "sev-es",
            VmType::Snp => "snp",
            VmType::Tdx => "tdx",
        }
    }
}

/// How the daemon installs a page (a per-VM choice; `Default` lets the daemon decide).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u32)]
pub enum PopulateMethod {
    /// The daemon's configured default.
    #[default]
    Default = 0,
    /// Read into a bounce buffer, then `UFFDIO_COPY` (uffd registered MISSING).
    Copy = 1,
    /// Read straight into the daemon's memfd mapping, then `UFFDIO_CONTINUE`
    /// (uffd registered MISSING | MINOR).
    Continue = 2,
}

/// `CreateVm.flags`: the guest RAM is the VMM's own private memory (Firecracker maps it
/// `MAP_PRIVATE | MAP_ANONYMOUS`). The daemon creates and sends no memfd; it installs pages
/// into the VMM's mapping with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` only. Needs
/// [`crate::features::VMM_MEMORY`].
pub const VM_MEMORY_IN_VMM: u32 = 1;
/// `CreateVm.flags`: record the order in which pages are first needed (`GetWorkingSet`).
/// Readahead is off for such a VM, so every first touch is seen. Needs
/// [`crate::features::WORKING_SET`].
pub const VM_RECORD_WORKING_SET: u32 = 2;
/// Every `CreateVm` flag this version knows.
pub const VM_FLAGS: u32 = VM_MEMORY_IN_VMM | VM_RECORD_WORKING_SET;

/// `CreateVm`: regions and page source. Carries one fd (the snapshot) when `source` is `File`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateVm {
    /// KVM VM type.
    pub vm_type: VmType,
    /// Per-VM policy overrides (TOML, same schema as the daemon's `--config`), if any.
    pub policy: Option<String>,
    /// The snapshot's URL: present exactly when `source` is [`PageSourceKind::Snapshot`]. On
    /// the wire, after the policy text: its length (u32 LE), then its UTF-8 bytes.
    pub source_url: Option<String>,
    /// Page source.
    pub source: PageSourceKind,
    /// Populate method wanted.
    pub populate: PopulateMethod,
    /// [`VM_MEMORY_IN_VMM`], [`VM_RECORD_WORKING_SET`].
    pub flags: u32,
    /// Regions of guest RAM (validated on decode).
    pub regions: Vec<RegionSpec>,
}

impl CreateVm {
    /// The daemon creates no memory: the VMM's own mappings are served.
    pub fn memory_in_vmm(&self) -> bool {
        self.flags & VM_MEMORY_IN_VMM != 0
    }
}

/// `VmCreated`: the VM id, how to register the uffd, one memfd per region (in order; none when
/// the memory is the VMM's own), then the VM's page-state file (keep it: a restarted daemon
/// needs it back, `ReclaimVm`). Regions that share a memory file (`RegionSpec::memfd_group`)
/// each get a copy of the same memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmCreated {
    /// Non-zero VM id, unique within the daemon.
    pub vm_id: u64,
    /// `UFFDIO_REGISTER_MODE_*` bits the VMM must register its mapping with.
    pub uffd_modes: u64,
    /// `UFFD_FEATURE_*` bits the VMM must enable at `UFFDIO_API`.
    pub uffd_features: u64,
    /// Number of memfds carried (the regions' count, or 0 for [`VM_MEMORY_IN_VMM`]); the
    /// page-state file follows them.
    pub region_count: u32,
    /// [`VMCREATED_VMM_SETS_ATTRIBUTES`] or 0.
    pub flags: u32,
    /// The VM's secret: presented with `Subscribe`, `ReattachVm` and `ReclaimVm`, and only
    /// from a peer of the uid that created the VM, or root.
    pub token: u64,
}

/// `VmCreated.flags`: KVM keeps this VM's memory attributes, and only the VMM's process may
/// issue VM ioctls, so the VMM sets them (`KVM_SET_MEMORY_ATTRIBUTES`) whenever the daemon
/// answers a conversion with `mailbox::RETRY_SET_ATTRIBUTES`.
pub const VMCREATED_VMM_SETS_ATTRIBUTES: u32 = 1;

/// `AttachUffd`: the VMM's uffd (one fd) and where it mapped each region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachUffd {
    /// VM id from `VmCreated`.
    pub vm_id: u64,
    /// Host virtual address of each region's mapping in the VMM, in region order.
    pub host_addrs: Vec<u64>,
}

/// The protocol spoken on a fault channel (`AttachChannel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ChannelProtocol {
    /// cloud-hypervisor's postcopy fault connection: `PageFault` requests (a GPA and the
    /// zone's page size) answered, once the page is in the memfd, with `Ok` and length 0
    /// (docs/cloud-hypervisor.md).
    CloudHypervisor = 1,
}

/// `AttachChannel`: a connected stream socket (one fd) on which a VMM asks for pages by
/// guest physical address, in `protocol`. The VM's memory must be the daemon's (memfds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttachChannel {
    /// VM id from `VmCreated`.
    pub vm_id: u64,
    /// What the VMM speaks on it.
    pub protocol: ChannelProtocol,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct CreateVmWire {
    source_kind: U32,
    region_count: U32,
    populate: U32,
    vm_type: U32,
    policy_len: U32,
    flags: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct VmCreatedWire {
    vm_id: U64,
    uffd_modes: U64,
    uffd_features: U64,
    region_count: U32,
    flags: U32,
    token: U64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct AttachUffdWire {
    vm_id: U64,
    region_count: U32,
    reserved: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct AttachChannelWire {
    vm_id: U64,
    protocol: U32,
    reserved: U32,
}

impl CreateVm {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(
            CreateVmWire {
                source_kind: (self.source as u32).into(),
                region_count: (self.regions.len() as u32).into(),
                populate: (self.populate as u32).into(),
                vm_type: (self.vm_type as u32).into(),
                policy_len: (self.policy.as_ref().map_or(0, String::len) as u32).into(),
                flags: self.flags.into(),
            }
            .as_bytes(),
        );
        out.extend_from_slice(self.regions.as_bytes());
        if let Some(policy) = &self.policy {
            out.extend_from_slice(policy.as_bytes());
        }
        if self.source == PageSourceKind::Snapshot {
            let url = self.source_url.as_deref().unwrap_or_default();
            out.extend_from_slice(&(url.len() as u32).to_le_bytes());
            out.extend_from_slice(url.as_bytes());
        }
    }

    pub(super) fn decode(p: &[u8]) -> Result<CreateVm, DecodeError> {
        let kind = Kind::CreateVm;
        let (w, rest): (CreateVmWire, _) = prefix(kind, p)?;
        if w.flags.get() & !VM_FLAGS != 0 {
            return Err(DecodeError::Reserved(kind));
        }
        let source = match w.source_kind.get() {
            1 => PageSourceKind::Zero,
            2 => PageSourceKind::File,
            3 => PageSourceKind::Remote,
            4 => PageSourceKind::Snapshot,
            v => {
                return Err(DecodeError::BadValue {
                    field: "source_kind",
                    value: v.into(),
                })
            }
        };
        let populate = match w.populate.get() {
            0 => PopulateMethod::Default,
            1 => PopulateMethod::Copy,
            2 => PopulateMethod::Continue,
            v => {
                return Err(DecodeError::BadValue {
                    field: "populate",
                    value: v.into(),
                })
            }
        };
        let count = w.region_count.get() as usize;
        if count > MAX_REGIONS {
            return Err(DecodeError::Limit {
                field: "region_count",
                value: count as u64,
            });
        }
        let vm_type = VmType::from_wire(w.vm_type.get()).ok_or(DecodeError::BadValue {
            field: "vm_type",
            value: w.vm_type.get().into(),
        })?;
        let policy_len = w.policy_len.get() as usize;
        if policy_len > MAX_POLICY_TEXT {
            return Err(DecodeError::Limit {
                field: "policy_len",
                value: policy_len as u64,
            });
        }
        let regions_len = count * core::mem::size_of::<RegionSpec>();
        let malformed = DecodeError::Malformed { kind, len: p.len() };
        let (rest, source_url) = match source {
            PageSourceKind::Snapshot => {
                let head = regions_len + policy_len;
                let len_bytes = rest.get(head..head + 4).ok_or(malformed.clone())?;
                let url_len =
                    u32::from_le_bytes(len_bytes.try_into().map_err(|_| malformed.clone())?)
                        as usize;
                if url_len == 0 || url_len > MAX_SOURCE_URL {
                    return Err(DecodeError::Limit {
                        field: "source_url_len",
                        value: url_len as u64,
                    });
                }
                if rest.len() != head + 4 + url_len {
                    return Err(malformed);
                }
                let url = core::str::from_utf8(&rest[head + 4..])
                    .map_err(|_| DecodeError::BadText)?
                    .to_owned();
                (&rest[..head], Some(url))
            }
            _ => (rest, None),
        };
        if rest.len() != regions_len + policy_len {
            return Err(DecodeError::Malformed { kind, len: p.len() });
        }
        let (region_bytes, policy_bytes) = rest.split_at(regions_len);
        let regions = <[RegionSpec]>::ref_from_bytes(region_bytes)
            .map_err(|_| DecodeError::Malformed { kind, len: p.len() })?
            .to_vec();
        validate_regions(&regions)?;
        let policy = match policy_len {
            0 => None,
            _ => Some(
                core::str::from_utf8(policy_bytes)
                    .map_err(|_| DecodeError::BadText)?
                    .to_owned(),
            ),
        };
        Ok(CreateVm {
            vm_type,
            policy,
            source_url,
            source,
            populate,
            flags: w.flags.get(),
            regions,
        })
    }

    /// Fds this message carries: [snapshot if file source][one guest_memfd per private
    /// region, in region order].
    pub(super) fn fd_count(&self) -> usize {
        usize::from(self.source == PageSourceKind::File)
            + self.regions.iter().filter(|r| r.is_private()).count()
    }
}

impl VmCreated {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(
            VmCreatedWire {
                vm_id: self.vm_id.into(),
                uffd_modes: self.uffd_modes.into(),
                uffd_features: self.uffd_features.into(),
                region_count: self.region_count.into(),
                flags: self.flags.into(),
                token: self.token.into(),
            }
            .as_bytes(),
        );
    }

    pub(super) fn decode(p: &[u8]) -> Result<VmCreated, DecodeError> {
        let w: VmCreatedWire = super::exact(Kind::VmCreated, p)?;
        let count = w.region_count.get();
        if w.flags.get() & !VMCREATED_VMM_SETS_ATTRIBUTES != 0 {
            return Err(DecodeError::Reserved(Kind::VmCreated));
        }
        if count as usize > MAX_REGIONS {
            return Err(DecodeError::Limit {
                field: "region_count",
                value: count.into(),
            });
        }
        Ok(VmCreated {
            vm_id: nonzero_vm(w.vm_id.get())?,
            uffd_modes: w.uffd_modes.get(),
            uffd_features: w.uffd_features.get(),
            region_count: count,
            flags: w.flags.get(),
            token: w.token.get(),
        })
    }
}

impl AttachUffd {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(
            AttachUffdWire {
                vm_id: self.vm_id.into(),
                region_count: (self.host_addrs.len() as u32).into(),
                reserved: 0.into(),
            }
            .as_bytes(),
        );
        for addr in &self.host_addrs {
            out.extend_from_slice(U64::new(*addr).as_bytes());
        }
    }

    pub(super) fn decode(p: &[u8]) -> Result<AttachUffd, DecodeError> {
        let kind = Kind::AttachUffd;
        let (w, rest): (AttachUffdWire, _) = prefix(kind, p)?;
        if w.reserved.get() != 0 {
            return Err(DecodeError::Reserved(kind));
        }
        let count = w.region_count.get() as usize;
        if count > MAX_REGIONS || count == 0 {
            return Err(DecodeError::Limit {
                field: "region_count",
                value: count as u64,
            });
        }
        let addrs = <[U64]>::ref_from_bytes(rest)
            .ok()
            .filter(|a| a.len() == count)
            .ok_or(DecodeError::Malformed { kind, len: p.len() })?;
        Ok(AttachUffd {
            vm_id: nonzero_vm(w.vm_id.get())?,
            host_addrs: addrs.iter().map(|a| a.get()).collect(),
        })
    }
}

impl AttachChannel {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(
            AttachChannelWire {
                vm_id: self.vm_id.into(),
                protocol: (self.protocol as u32).into(),
                reserved: 0.into(),
            }
            .as_bytes(),
        );
    }

    pub(super) fn decode(p: &[u8]) -> Result<AttachChannel, DecodeError> {
        let w: AttachChannelWire = super::exact(Kind::AttachChannel, p)?;
        if w.reserved.get() != 0 {
            return Err(DecodeError::Reserved(Kind::AttachChannel));
        }
        let protocol = match w.protocol.get() {
            1 => ChannelProtocol::CloudHypervisor,
            v => {
                return Err(DecodeError::BadValue {
                    field: "protocol",
                    value: v.into(),
                })
            }
        };
        Ok(AttachChannel {
            vm_id: nonzero_vm(w.vm_id.get())?,
            protocol,
        })
    }
}
