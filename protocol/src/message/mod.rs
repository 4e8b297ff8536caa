//! Every control message, its payload layout, encoding and bounded decoding.
//!
//! Decoding never panics: every length is checked against the bytes actually received, every
//! count against its limit, every reserved field must be zero, and the number of fds that arrived
//! must equal the number the message declares.

use crate::header::{Header, HEADER_LEN, MAGIC};
use crate::region::{validate_regions, RegionError, RegionSpec};
use crate::{MAX_ERROR_TEXT, MAX_PAYLOAD, MAX_POLICY_TEXT, MAX_REGIONS, PROTOCOL_VERSION};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Message kinds (`Header.kind`). `0` is reserved as invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Client → daemon: first message on a connection.
    Hello = 1,
    /// Daemon → client: answer to `Hello`.
    Welcome = 2,
    /// Client → daemon: create a VM and its memory.
    CreateVm = 3,
    /// Daemon → client: the VM's id and one memfd per region.
    VmCreated = 4,
    /// Client → daemon: the VMM's userfaultfd and its mapping addresses.
    AttachUffd = 5,
    /// Daemon → client: the daemon now serves the uffd.
    Attached = 6,
    /// Client → daemon: stop serving and free a VM.
    Detach = 7,
    /// Daemon → client: the VM is gone.
    Detached = 8,
    /// Client → daemon: ask for a VM's counters.
    GetStats = 9,
    /// Daemon → client: a VM's counters and latency percentiles.
    Stats = 10,
    /// Daemon → client: a request failed.
    Error = 11,
    /// Client → daemon: create the VM's per-vCPU mailbox.
    OpenMailbox = 12,
    /// Daemon → client: the mailbox memfd and the doorbell eventfd.
    MailboxOpened = 13,
    /// Any client → daemon: receive the VM's conversion events on this connection.
    Subscribe = 14,
    /// Daemon → client: subscribed.
    Subscribed = 15,
    /// Daemon → subscriber (unsolicited, request id 0): a range changed between private and
    /// shared.
    ConversionEvent = 16,
}

impl Kind {
    fn from_wire(v: u16) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => Welcome,
            3 => CreateVm,
            4 => VmCreated,
            5 => AttachUffd,
            6 => Attached,
            7 => Detach,
            8 => Detached,
            9 => GetStats,
            10 => Stats,
            11 => Error,
            12 => OpenMailbox,
            13 => MailboxOpened,
            14 => Subscribe,
            15 => Subscribed,
            16 => ConversionEvent,
            _ => return None,
        })
    }
}

/// Where a VM's pages come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum PageSourceKind {
    /// Every page starts as zeros.
    Zero = 1,
    /// A raw snapshot image; its fd travels with `CreateVm`. Bytes past its end read as zeros.
    File = 2,
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

/// Typed error codes of the `Error` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// The message could not be decoded.
    BadMessage = 1,
    /// The peer's protocol version is not supported.
    UnsupportedVersion = 2,
    /// The message is not allowed in the connection's current state.
    BadState = 3,
    /// The region list was refused.
    InvalidRegions = 4,
    /// No VM with that id on this connection.
    UnknownVm = 5,
    /// A limit (VMs, memory, ...) was reached.
    LimitExceeded = 6,
    /// The page source cannot be used.
    BadSource = 7,
    /// The request needs a feature that was not negotiated or that this host lacks.
    Unsupported = 8,
    /// The daemon failed (out of memory, kernel error); the request may be retried.
    Internal = 9,
}

impl ErrorCode {
    /// Decodes a wire value; unknown values are a decode error.
    pub fn from_wire(v: u32) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match v {
            1 => BadMessage,
            2 => UnsupportedVersion,
            3 => BadState,
            4 => InvalidRegions,
            5 => UnknownVm,
            6 => LimitExceeded,
            7 => BadSource,
            8 => Unsupported,
            9 => Internal,
            _ => return None,
        })
    }
}

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
}

/// `CreateVm`: regions and page source. Carries one fd (the snapshot) when `source` is `File`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateVm {
    /// KVM VM type.
    pub vm_type: VmType,
    /// Per-VM policy overrides (TOML, same schema as the daemon's `--config`), if any.
    pub policy: Option<String>,
    /// Page source.
    pub source: PageSourceKind,
    /// Populate method wanted.
    pub populate: PopulateMethod,
    /// Regions of guest RAM (validated on decode).
    pub regions: Vec<RegionSpec>,
}

/// `VmCreated`: the VM id, how to register the uffd, and one memfd per region (in order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmCreated {
    /// Non-zero VM id, unique within the daemon.
    pub vm_id: u64,
    /// `UFFDIO_REGISTER_MODE_*` bits the VMM must register its mapping with.
    pub uffd_modes: u64,
    /// `UFFD_FEATURE_*` bits the VMM must enable at `UFFDIO_API`.
    pub uffd_features: u64,
    /// Number of regions (= memfds carried first).
    pub region_count: u32,
    /// [`VMCREATED_VMM_SETS_ATTRIBUTES`] or 0.
    pub flags: u32,
    /// Secret a listener must present with `Subscribe`.
    pub token: u64,
}

/// `VmCreated.flags`: KVM keeps this VM's memory attributes, and only the VMM's process may
/// issue VM ioctls, so the VMM sets them (`KVM_SET_MEMORY_ATTRIBUTES`) whenever the daemon
/// answers a conversion with `mailbox::RETRY_SET_ATTRIBUTES`.
pub const VMCREATED_VMM_SETS_ATTRIBUTES: u32 = 1;

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

/// `AttachUffd`: the VMM's uffd (one fd) and where it mapped each region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachUffd {
    /// VM id from `VmCreated`.
    pub vm_id: u64,
    /// Host virtual address of each region's mapping in the VMM, in region order.
    pub host_addrs: Vec<u64>,
}

/// `Error`: a typed code and a human-readable sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorReply {
    /// What went wrong.
    pub code: ErrorCode,
    /// Why, in words (at most [`MAX_ERROR_TEXT`] bytes of UTF-8).
    pub text: String,
}

macro_rules! stats_struct {
    ($(#[doc = $doc:literal] $field:ident,)*) => {
        /// `Stats`: a VM's counters and fault-service latency (fault read → wake) percentiles.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct Stats {
            $(#[doc = $doc] pub $field: u64,)*
        }
        impl Stats {
            /// Number of u64 fields on the wire.
            pub const FIELDS: usize = [$(stringify!($field)),*].len();
            fn to_words(self) -> [u64; Self::FIELDS] {
                [$(self.$field),*]
            }
            fn from_words(w: &[U64]) -> Stats {
                let mut it = w.iter().map(|v| v.get());
                Stats { $($field: it.next().unwrap_or(0),)* }
            }
            /// `(name, value)` of every field, in wire order.
            pub fn fields(&self) -> [(&'static str, u64); Self::FIELDS] {
                [$((stringify!($field), self.$field)),*]
            }
        }
    };
}

stats_struct! {
    /// VM id.
    vm_id,
    /// Page-fault events read from the uffd.
    faults,
    /// Pages installed from the page source's data.
    pages_from_source,
    /// Pages installed as zeros (zero source, past the end of a file, or removed ranges).
    pages_zero,
    /// Faults on pages already installed (duplicates): only woken.
    coalesced,
    /// Populate ioctls that found the page already present (`EEXIST`): woken.
    eexist,
    /// Populate ioctls retried after `EAGAIN` (pending remove/unmap events).
    eagain,
    /// `UFFD_EVENT_REMOVE` events handled.
    remove_events,
    /// `UFFD_EVENT_UNMAP` events handled.
    unmap_events,
    /// `UFFD_EVENT_REMAP` events handled.
    remap_events,
    /// Faults outside every region the VMM declared: poisoned (the VMM gets SIGBUS).
    stray_faults,
    /// Populate ioctls that failed for another reason than EEXIST/EAGAIN: page poisoned.
    populate_errors,
    /// Pages poisoned because the page source failed to deliver them.
    source_errors,
    /// Shared-side faults on private pages: poisoned, never served with data.
    private_faults_poisoned,
    /// Memory-fault exits received over the mailbox.
    memory_fault_exits,
    /// `KVM_HC_MAP_GPA_RANGE` exits received over the mailbox.
    hypercall_exits,
    /// Ranges converted to private.
    converted_to_private,
    /// Ranges converted to shared.
    converted_to_shared,
    /// Conversions refused (policy, validation, rate limit).
    conversions_denied,
    /// 1 when the daemon keeps the attributes itself (`--emulate-attributes`), not KVM.
    attributes_emulated,
    /// Populate method in use (`PopulateMethod` value).
    populate_method,
    /// Pages installed ahead of a fault (fault-around, prefetch); also counted in pages_from_source or pages_zero.
    pages_prefetched,
    /// Latency samples recorded.
    latency_samples,
    /// Median fault-service latency, nanoseconds.
    latency_p50_ns,
    /// 99th percentile, nanoseconds.
    latency_p99_ns,
    /// 99.9th percentile, nanoseconds.
    latency_p999_ns,
    /// Largest latency, nanoseconds.
    latency_max_ns,
}

/// Every message of protocol version 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`CreateVm`].
    CreateVm(CreateVm),
    /// See [`VmCreated`].
    VmCreated(VmCreated),
    /// See [`AttachUffd`].
    AttachUffd(AttachUffd),
    /// The uffd of this VM is now served.
    Attached {
        /// VM id.
        vm_id: u64,
    },
    /// Stop serving a VM and free it.
    Detach {
        /// VM id.
        vm_id: u64,
    },
    /// The VM is freed.
    Detached {
        /// VM id.
        vm_id: u64,
    },
    /// Ask for a VM's counters.
    GetStats {
        /// VM id.
        vm_id: u64,
    },
    /// See [`Stats`].
    Stats(Stats),
    /// See [`ErrorReply`].
    Error(ErrorReply),
    /// Create the VM's mailbox with one slot per vCPU.
    OpenMailbox {
        /// VM id.
        vm_id: u64,
        /// vCPUs (slots).
        vcpus: u32,
    },
    /// The mailbox memfd and the doorbell eventfd (2 fds, in that order).
    MailboxOpened {
        /// VM id.
        vm_id: u64,
        /// Slots.
        vcpus: u32,
    },
    /// Receive the VM's conversion events on this connection.
    Subscribe {
        /// VM id.
        vm_id: u64,
        /// The token from `VmCreated`.
        token: u64,
    },
    /// Subscribed.
    Subscribed {
        /// VM id.
        vm_id: u64,
    },
    /// See [`ConversionEvent`].
    ConversionEvent(ConversionEvent),
}

/// Why a received message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than a header.
    #[error("message of {0} bytes is shorter than the header")]
    Short(usize),
    /// Wrong magic number.
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// Unsupported protocol version in the header.
    #[error("unsupported protocol version {0}")]
    BadVersion(u16),
    /// Unknown message kind.
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    /// Declared payload length does not match the bytes received.
    #[error("payload length {declared} does not match the {received} bytes received")]
    LengthMismatch {
        /// From the header.
        declared: usize,
        /// Actually received.
        received: usize,
    },
    /// Payload larger than [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The fd count does not match what the header or the message declares.
    #[error("message carries {received} fds, expected {expected}")]
    FdCount {
        /// Fds the message must carry.
        expected: usize,
        /// Fds that arrived (or the header declared).
        received: usize,
    },
    /// Payload size wrong for its kind.
    #[error("payload of {len} bytes is malformed for {kind:?}")]
    Malformed {
        /// Message kind.
        kind: Kind,
        /// Payload length.
        len: usize,
    },
    /// A reserved field is not zero.
    #[error("reserved field is not zero in {0:?}")]
    Reserved(Kind),
    /// An enumerated field has an unknown value.
    #[error("unknown value {value} for {field}")]
    BadValue {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A count exceeds its limit.
    #[error("{field} of {value} exceeds the limit")]
    Limit {
        /// Which count.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// `CreateVm` regions refused.
    #[error("invalid regions")]
    Regions(#[from] RegionError),
    /// Error text is not UTF-8.
    #[error("error text is not UTF-8")]
    BadText,
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
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct CreateVmWire {
    source_kind: U32,
    region_count: U32,
    populate: U32,
    vm_type: U32,
    policy_len: U32,
    reserved: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct IdCountWire {
    vm_id: U64,
    count: U32,
    reserved: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ConversionWire {
    vm_id: U64,
    gpa: U64,
    size: U64,
    to_private: U32,
    reserved: U32,
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
struct ErrorWire {
    code: U32,
    text_len: U32,
}

impl Message {
    /// The message's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Welcome(_) => Kind::Welcome,
            Message::CreateVm(_) => Kind::CreateVm,
            Message::VmCreated(_) => Kind::VmCreated,
            Message::AttachUffd(_) => Kind::AttachUffd,
            Message::Attached { .. } => Kind::Attached,
            Message::Detach { .. } => Kind::Detach,
            Message::Detached { .. } => Kind::Detached,
            Message::GetStats { .. } => Kind::GetStats,
            Message::Stats(_) => Kind::Stats,
            Message::Error(_) => Kind::Error,
            Message::OpenMailbox { .. } => Kind::OpenMailbox,
            Message::MailboxOpened { .. } => Kind::MailboxOpened,
            Message::Subscribe { .. } => Kind::Subscribe,
            Message::Subscribed { .. } => Kind::Subscribed,
            Message::ConversionEvent(_) => Kind::ConversionEvent,
        }
    }

    /// How many fds this message carries.
    pub fn fd_count(&self) -> usize {
        match self {
            // [snapshot if file source][one guest_memfd per private region, in region order]
            Message::CreateVm(c) => {
                usize::from(c.source == PageSourceKind::File)
                    + c.regions.iter().filter(|r| r.is_private()).count()
            }
            Message::VmCreated(v) => v.region_count as usize,
            Message::AttachUffd(_) => 1,
            Message::MailboxOpened { .. } => 2,
            _ => 0,
        }
    }

    /// Encodes header + payload.
    pub fn encode(&self, request_id: u64) -> Vec<u8> {
        let mut payload = Vec::new();
        match self {
            Message::Hello(h) => payload.extend_from_slice(
                HelloWire {
                    version: h.version.into(),
                    reserved0: 0.into(),
                    reserved1: 0.into(),
                    features: h.features.into(),
                }
                .as_bytes(),
            ),
            Message::Welcome(w) => payload.extend_from_slice(
                WelcomeWire {
                    version: w.version.into(),
                    reserved: 0.into(),
                    max_regions: w.max_regions.into(),
                    features: w.features.into(),
                    max_payload: w.max_payload.into(),
                    reserved1: 0.into(),
                }
                .as_bytes(),
            ),
            Message::CreateVm(c) => {
                payload.extend_from_slice(
                    CreateVmWire {
                        source_kind: (c.source as u32).into(),
                        region_count: (c.regions.len() as u32).into(),
                        populate: (c.populate as u32).into(),
                        vm_type: (c.vm_type as u32).into(),
                        policy_len: (c.policy.as_ref().map_or(0, String::len) as u32).into(),
                        reserved: 0.into(),
                    }
                    .as_bytes(),
                );
                payload.extend_from_slice(c.regions.as_bytes());
                if let Some(policy) = &c.policy {
                    payload.extend_from_slice(policy.as_bytes());
                }
            }
            Message::VmCreated(v) => payload.extend_from_slice(
                VmCreatedWire {
                    vm_id: v.vm_id.into(),
                    uffd_modes: v.uffd_modes.into(),
                    uffd_features: v.uffd_features.into(),
                    region_count: v.region_count.into(),
                    flags: v.flags.into(),
                    token: v.token.into(),
                }
                .as_bytes(),
            ),
            Message::AttachUffd(a) => {
                payload.extend_from_slice(
                    AttachUffdWire {
                        vm_id: a.vm_id.into(),
                        region_count: (a.host_addrs.len() as u32).into(),
                        reserved: 0.into(),
                    }
                    .as_bytes(),
                );
                for addr in &a.host_addrs {
                    payload.extend_from_slice(U64::new(*addr).as_bytes());
                }
            }
            Message::Attached { vm_id }
            | Message::Detach { vm_id }
            | Message::Detached { vm_id }
            | Message::GetStats { vm_id } => payload.extend_from_slice(U64::new(*vm_id).as_bytes()),
            Message::OpenMailbox {
                vm_id,
                vcpus: count,
            }
            | Message::MailboxOpened {
                vm_id,
                vcpus: count,
            } => payload.extend_from_slice(
                IdCountWire {
                    vm_id: (*vm_id).into(),
                    count: (*count).into(),
                    reserved: 0.into(),
                }
                .as_bytes(),
            ),
            Message::Subscribe { vm_id, token } => {
                payload.extend_from_slice(U64::new(*vm_id).as_bytes());
                payload.extend_from_slice(U64::new(*token).as_bytes());
            }
            Message::Subscribed { vm_id } => payload.extend_from_slice(U64::new(*vm_id).as_bytes()),
            Message::ConversionEvent(e) => payload.extend_from_slice(
                ConversionWire {
                    vm_id: e.vm_id.into(),
                    gpa: e.gpa.into(),
                    size: e.size.into(),
                    to_private: u32::from(e.to_private).into(),
                    reserved: 0.into(),
                }
                .as_bytes(),
            ),
            Message::Stats(s) => {
                for w in s.to_words() {
                    payload.extend_from_slice(U64::new(w).as_bytes());
                }
            }
            Message::Error(e) => {
                let text = truncate_utf8(&e.text, MAX_ERROR_TEXT);
                payload.extend_from_slice(
                    ErrorWire {
                        code: (e.code as u32).into(),
                        text_len: (text.len() as u32).into(),
                    }
                    .as_bytes(),
                );
                payload.extend_from_slice(text.as_bytes());
            }
        }
        let header = Header {
            magic: MAGIC.into(),
            version: PROTOCOL_VERSION.into(),
            kind: (self.kind() as u16).into(),
            payload_len: (payload.len() as u32).into(),
            fd_count: (self.fd_count() as u32).into(),
            request_id: request_id.into(),
        };
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Decodes one whole message (as one `SOCK_SEQPACKET` record) that arrived with `fds_received`
    /// fds. Returns the header and the message.
    pub fn decode(bytes: &[u8], fds_received: usize) -> Result<(Header, Message), DecodeError> {
        let (header, payload) =
            Header::read_from_prefix(bytes).map_err(|_| DecodeError::Short(bytes.len()))?;
        if header.magic.get() != MAGIC {
            return Err(DecodeError::BadMagic(header.magic.get()));
        }
        if header.version.get() != PROTOCOL_VERSION {
            return Err(DecodeError::BadVersion(header.version.get()));
        }
        let declared = header.payload_len.get() as usize;
        if declared > MAX_PAYLOAD {
            return Err(DecodeError::TooLarge(declared));
        }
        if declared != payload.len() {
            return Err(DecodeError::LengthMismatch {
                declared,
                received: payload.len(),
            });
        }
        let kind = Kind::from_wire(header.kind.get())
            .ok_or(DecodeError::UnknownKind(header.kind.get()))?;
        let declared_fds = header.fd_count.get() as usize;
        if declared_fds != fds_received {
            return Err(DecodeError::FdCount {
                expected: declared_fds,
                received: fds_received,
            });
        }
        let message = decode_payload(kind, payload)?;
        if message.fd_count() != fds_received {
            return Err(DecodeError::FdCount {
                expected: message.fd_count(),
                received: fds_received,
            });
        }
        Ok((header, message))
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Reads a fixed-size struct that must be exactly the whole payload.
fn exact<T: FromBytes + KnownLayout + Immutable>(kind: Kind, p: &[u8]) -> Result<T, DecodeError> {
    T::read_from_bytes(p).map_err(|_| DecodeError::Malformed { kind, len: p.len() })
}

/// Reads a fixed-size struct at the start of the payload, returning the rest.
fn prefix<T: FromBytes + KnownLayout + Immutable>(
    kind: Kind,
    p: &[u8],
) -> Result<(T, &[u8]), DecodeError> {
    T::read_from_prefix(p).map_err(|_| DecodeError::Malformed { kind, len: p.len() })
}

fn vm_id(kind: Kind, p: &[u8]) -> Result<u64, DecodeError> {
    let id = exact::<U64>(kind, p)?.get();
    if id == 0 {
        return Err(DecodeError::BadValue {
            field: "vm_id",
            value: 0,
        });
    }
    Ok(id)
}

fn decode_payload(kind: Kind, p: &[u8]) -> Result<Message, DecodeError> {
    Ok(match kind {
        Kind::Hello => {
            let w: HelloWire = exact(kind, p)?;
            if w.reserved0.get() != 0 || w.reserved1.get() != 0 {
                return Err(DecodeError::Reserved(kind));
            }
            Message::Hello(Hello {
                version: w.version.get(),
                features: w.features.get(),
            })
        }
        Kind::Welcome => {
            let w: WelcomeWire = exact(kind, p)?;
            if w.reserved.get() != 0 || w.reserved1.get() != 0 {
                return Err(DecodeError::Reserved(kind));
            }
            Message::Welcome(Welcome {
                version: w.version.get(),
                features: w.features.get(),
                max_regions: w.max_regions.get(),
                max_payload: w.max_payload.get(),
            })
        }
        Kind::CreateVm => {
            let (w, rest): (CreateVmWire, _) = prefix(kind, p)?;
            if w.reserved.get() != 0 {
                return Err(DecodeError::Reserved(kind));
            }
            let source = match w.source_kind.get() {
                1 => PageSourceKind::Zero,
                2 => PageSourceKind::File,
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
            Message::CreateVm(CreateVm {
                vm_type,
                policy,
                source,
                populate,
                regions,
            })
        }
        Kind::VmCreated => {
            let w: VmCreatedWire = exact(kind, p)?;
            let count = w.region_count.get();
            if w.flags.get() & !VMCREATED_VMM_SETS_ATTRIBUTES != 0 {
                return Err(DecodeError::Reserved(kind));
            }
            if count as usize > MAX_REGIONS || count == 0 {
                return Err(DecodeError::Limit {
                    field: "region_count",
                    value: count.into(),
                });
            }
            if w.vm_id.get() == 0 {
                return Err(DecodeError::BadValue {
                    field: "vm_id",
                    value: 0,
                });
            }
            Message::VmCreated(VmCreated {
                vm_id: w.vm_id.get(),
                uffd_modes: w.uffd_modes.get(),
                uffd_features: w.uffd_features.get(),
                region_count: count,
                flags: w.flags.get(),
                token: w.token.get(),
            })
        }
        Kind::OpenMailbox | Kind::MailboxOpened => {
            let w: IdCountWire = exact(kind, p)?;
            if w.reserved.get() != 0 {
                return Err(DecodeError::Reserved(kind));
            }
            let (vm_id, vcpus) = (w.vm_id.get(), w.count.get());
            if vm_id == 0 {
                return Err(DecodeError::BadValue {
                    field: "vm_id",
                    value: 0,
                });
            }
            if vcpus == 0 || vcpus > crate::MAX_VCPUS {
                return Err(DecodeError::Limit {
                    field: "vcpus",
                    value: vcpus.into(),
                });
            }
            if kind == Kind::OpenMailbox {
                Message::OpenMailbox { vm_id, vcpus }
            } else {
                Message::MailboxOpened { vm_id, vcpus }
            }
        }
        Kind::Subscribe => {
            let words = <[U64]>::ref_from_bytes(p)
                .ok()
                .filter(|w| w.len() == 2)
                .ok_or(DecodeError::Malformed { kind, len: p.len() })?;
            let vm_id = words[0].get();
            if vm_id == 0 {
                return Err(DecodeError::BadValue {
                    field: "vm_id",
                    value: 0,
                });
            }
            Message::Subscribe {
                vm_id,
                token: words[1].get(),
            }
        }
        Kind::Subscribed => Message::Subscribed {
            vm_id: vm_id(kind, p)?,
        },
        Kind::ConversionEvent => {
            let w: ConversionWire = exact(kind, p)?;
            if w.reserved.get() != 0 || w.to_private.get() > 1 {
                return Err(DecodeError::Reserved(kind));
            }
            if w.vm_id.get() == 0 {
                return Err(DecodeError::BadValue {
                    field: "vm_id",
                    value: 0,
                });
            }
            Message::ConversionEvent(ConversionEvent {
                vm_id: w.vm_id.get(),
                gpa: w.gpa.get(),
                size: w.size.get(),
                to_private: w.to_private.get() == 1,
            })
        }
        Kind::AttachUffd => {
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
            if w.vm_id.get() == 0 {
                return Err(DecodeError::BadValue {
                    field: "vm_id",
                    value: 0,
                });
            }
            Message::AttachUffd(AttachUffd {
                vm_id: w.vm_id.get(),
                host_addrs: addrs.iter().map(|a| a.get()).collect(),
            })
        }
        Kind::Attached => Message::Attached {
            vm_id: vm_id(kind, p)?,
        },
        Kind::Detach => Message::Detach {
            vm_id: vm_id(kind, p)?,
        },
        Kind::Detached => Message::Detached {
            vm_id: vm_id(kind, p)?,
        },
        Kind::GetStats => Message::GetStats {
            vm_id: vm_id(kind, p)?,
        },
        Kind::Stats => {
            let words = <[U64]>::ref_from_bytes(p)
                .ok()
                .filter(|w| w.len() == Stats::FIELDS)
                .ok_or(DecodeError::Malformed { kind, len: p.len() })?;
            let stats = Stats::from_words(words);
            if stats.vm_id == 0 {
                return Err(DecodeError::BadValue {
                    field: "vm_id",
                    value: 0,
                });
            }
            Message::Stats(stats)
        }
        Kind::Error => {
            let (w, rest): (ErrorWire, _) = prefix(kind, p)?;
            let code = ErrorCode::from_wire(w.code.get()).ok_or(DecodeError::BadValue {
                field: "error code",
                value: w.code.get().into(),
            })?;
            let len = w.text_len.get() as usize;
            if len > MAX_ERROR_TEXT {
                return Err(DecodeError::Limit {
                    field: "text_len",
                    value: len as u64,
                });
            }
            if rest.len() != len {
                return Err(DecodeError::Malformed { kind, len: p.len() });
            }
            let text = core::str::from_utf8(rest)
                .map_err(|_| DecodeError::BadText)?
                .to_owned();
            Message::Error(ErrorReply { code, text })
        }
    })
}
