//! Every control message, its payload layout, encoding and bounded decoding.
//!
//! Decoding never panics: every length is checked against the bytes actually received, every
//! count against its limit, every reserved field must be zero, and the number of fds that arrived
//! must equal the number the message declares.
//!
//! * [`handshake`]: `Hello`, `Welcome`.
//! * [`vm`]: `CreateVm`, `VmCreated`, `AttachUffd`, `AttachChannel` and what they carry.
//! * [`stats`]: the counters of `Stats`.
//! * [`conversion`]: the `ConversionEvent` sent to subscribers.
//! * [`working_set`]: `ReplayWorkingSet`, `GetWorkingSet`, `WorkingSet`.
//! * [`session`]: `ReleaseVm`, `ReattachVm`, `ReclaimVm` and the [`VmSession`] they carry.
//! * [`error`]: the `Error` reply.

pub mod conversion;
pub mod error;
pub mod handshake;
mod kind;
pub mod migration;
pub mod session;
pub mod stats;
pub mod vm;
pub mod working_set;

pub use conversion::ConversionEvent;
pub use error::{ErrorCode, ErrorReply};
pub use handshake::{Hello, Welcome};
pub use kind::Kind;
pub use migration::{
    MigrateIn, MigrateOut, MigrationCounters, MigrationKey, MigrationState, MigrationStatus,
    MAX_MIGRATION_ADDR, MIGRATE_FLAGS, MIGRATE_HYBRID, MIGRATION_KEY_LEN,
};
pub use session::VmSession;
pub use stats::Stats;
pub use vm::{
    AttachChannel, AttachUffd, ChannelProtocol, CreateVm, PageSourceKind, PopulateMethod,
    VmCreated, VmType, VMCREATED_VMM_SETS_ATTRIBUTES, VM_FLAGS, VM_MEMORY_IN_VMM,
    VM_RECORD_WORKING_SET,
};
pub use working_set::{
    ReplayWorkingSet, WorkingSet, WorkingSetEntry, MAX_REPLAY_PAGES, MAX_WORKING_SET_ENTRIES,
};

use crate::header::{Header, HEADER_LEN, MAGIC};
use crate::region::RegionError;
use crate::{MAX_PAYLOAD, PROTOCOL_VERSION};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Every message of this protocol version.
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
    /// The uffd (or fault channel) of this VM is now served.
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
    /// Receive the VM's conversion events on this connection (a peer of the VM's creator's
    /// uid, or root).
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
    /// See [`AttachChannel`].
    AttachChannel(AttachChannel),
    /// See [`ReplayWorkingSet`].
    ReplayWorkingSet(ReplayWorkingSet),
    /// The pages of a `ReplayWorkingSet` are queued.
    ReplayQueued {
        /// VM id.
        vm_id: u64,
        /// Pages waiting to be pushed, these included.
        queued: u64,
    },
    /// Ask for the recorded working set, from entry `from` on.
    GetWorkingSet {
        /// VM id.
        vm_id: u64,
        /// Index of the first entry wanted.
        from: u64,
    },
    /// See [`WorkingSet`].
    WorkingSet(WorkingSet),
    /// Stop serving the VM's uffd and keep the VM (memory, mailbox, state) for a reattach
    /// within the grace period: a VMM about to be replaced by a new process.
    ReleaseVm {
        /// VM id.
        vm_id: u64,
    },
    /// Released: reattach within `grace_ms` or the VM is freed.
    Released {
        /// VM id.
        vm_id: u64,
        /// Milliseconds the daemon keeps it.
        grace_ms: u64,
    },
    /// Take over VM `vm_id`, presenting its token.
    ReattachVm {
        /// VM id.
        vm_id: u64,
        /// `VmCreated.token`.
        token: u64,
    },
    /// The VM taken over (see [`VmSession`] for its fds); attach a uffd next.
    Reattached(VmSession),
    /// Serve this VM again (see [`VmSession`] for its fds).
    ReclaimVm(VmSession),
    /// The VM is served again.
    Reclaimed {
        /// VM id.
        vm_id: u64,
    },
    /// See [`MigrateOut`].
    MigrateOut(MigrateOut),
    /// See [`MigrateIn`].
    MigrateIn(MigrateIn),
    /// See [`MigrationStatus`].
    MigrationStatus(MigrationStatus),
    /// Ask how the VM's migration is going.
    GetMigration {
        /// VM id.
        vm_id: u64,
    },
    /// Give up on the other side of the VM's migration.
    AbandonMigration {
        /// VM id.
        vm_id: u64,
    },
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
struct IdCountWire {
    vm_id: U64,
    count: U32,
    reserved: U32,
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
            Message::AttachChannel(_) => Kind::AttachChannel,
            Message::ReplayWorkingSet(_) => Kind::ReplayWorkingSet,
            Message::ReplayQueued { .. } => Kind::ReplayQueued,
            Message::GetWorkingSet { .. } => Kind::GetWorkingSet,
            Message::WorkingSet(_) => Kind::WorkingSet,
            Message::ReleaseVm { .. } => Kind::ReleaseVm,
            Message::Released { .. } => Kind::Released,
            Message::ReattachVm { .. } => Kind::ReattachVm,
            Message::Reattached(_) => Kind::Reattached,
            Message::ReclaimVm(_) => Kind::ReclaimVm,
            Message::Reclaimed { .. } => Kind::Reclaimed,
            Message::MigrateOut(_) => Kind::MigrateOut,
            Message::MigrateIn(_) => Kind::MigrateIn,
            Message::MigrationStatus(_) => Kind::MigrationStatus,
            Message::GetMigration { .. } => Kind::GetMigration,
            Message::AbandonMigration { .. } => Kind::AbandonMigration,
        }
    }

    /// How many fds this message carries.
    pub fn fd_count(&self) -> usize {
        match self {
            Message::CreateVm(c) => c.fd_count(),
            // The memfds, then the page-state file.
            Message::VmCreated(v) => v.region_count as usize + 1,
            Message::Reattached(s) => s.reattached_fds(),
            Message::ReclaimVm(s) => s.reclaim_fds(),
            Message::AttachUffd(_) | Message::AttachChannel(_) => 1,
            Message::MailboxOpened { .. } => 2,
            _ => 0,
        }
    }

    /// Encodes header + payload.
    pub fn encode(&self, request_id: u64) -> Vec<u8> {
        let mut payload = Vec::new();
        let words = |out: &mut Vec<u8>, w: &[u64]| {
            for v in w {
                out.extend_from_slice(U64::new(*v).as_bytes());
            }
        };
        match self {
            Message::Hello(h) => h.encode(&mut payload),
            Message::Welcome(w) => w.encode(&mut payload),
            Message::CreateVm(c) => c.encode(&mut payload),
            Message::VmCreated(v) => v.encode(&mut payload),
            Message::AttachUffd(a) => a.encode(&mut payload),
            Message::AttachChannel(a) => a.encode(&mut payload),
            Message::Attached { vm_id }
            | Message::Detach { vm_id }
            | Message::Detached { vm_id }
            | Message::GetStats { vm_id }
            | Message::Subscribed { vm_id }
            | Message::ReleaseVm { vm_id }
            | Message::Reclaimed { vm_id }
            | Message::GetMigration { vm_id }
            | Message::AbandonMigration { vm_id } => words(&mut payload, &[*vm_id]),
            Message::MigrateOut(m) => m.encode(&mut payload),
            Message::MigrateIn(m) => m.encode(&mut payload),
            Message::MigrationStatus(m) => m.encode(&mut payload),
            Message::Released { vm_id, grace_ms } => words(&mut payload, &[*vm_id, *grace_ms]),
            Message::ReattachVm { vm_id, token } => words(&mut payload, &[*vm_id, *token]),
            Message::Reattached(s) | Message::ReclaimVm(s) => s.encode(&mut payload),
            Message::OpenMailbox { vm_id, vcpus } | Message::MailboxOpened { vm_id, vcpus } => {
                payload.extend_from_slice(
                    IdCountWire {
                        vm_id: (*vm_id).into(),
                        count: (*vcpus).into(),
                        reserved: 0.into(),
                    }
                    .as_bytes(),
                )
            }
            Message::Subscribe { vm_id, token } => words(&mut payload, &[*vm_id, *token]),
            Message::ConversionEvent(e) => e.encode(&mut payload),
            Message::Stats(s) => s.encode(&mut payload),
            Message::Error(e) => e.encode(&mut payload),
            Message::ReplayWorkingSet(r) => r.encode(&mut payload),
            Message::ReplayQueued { vm_id, queued } => words(&mut payload, &[*vm_id, *queued]),
            Message::GetWorkingSet { vm_id, from } => words(&mut payload, &[*vm_id, *from]),
            Message::WorkingSet(w) => w.encode(&mut payload),
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

/// A VM id as decoded: never 0.
fn nonzero_vm(id: u64) -> Result<u64, DecodeError> {
    if id == 0 {
        return Err(DecodeError::BadValue {
            field: "vm_id",
            value: 0,
        });
    }
    Ok(id)
}

/// Exactly `N` little-endian u64 words, the first a non-zero VM id.
fn id_words<const N: usize>(kind: Kind, p: &[u8]) -> Result<[u64; N], DecodeError> {
    let w: [U64; N] = exact(kind, p)?;
    let words = w.map(|v| v.get());
    nonzero_vm(words[0])?;
    Ok(words)
}

fn decode_payload(kind: Kind, p: &[u8]) -> Result<Message, DecodeError> {
    Ok(match kind {
        Kind::Hello => Message::Hello(Hello::decode(p)?),
        Kind::Welcome => Message::Welcome(Welcome::decode(p)?),
        Kind::CreateVm => Message::CreateVm(CreateVm::decode(p)?),
        Kind::VmCreated => Message::VmCreated(VmCreated::decode(p)?),
        Kind::AttachUffd => Message::AttachUffd(AttachUffd::decode(p)?),
        Kind::AttachChannel => Message::AttachChannel(AttachChannel::decode(p)?),
        Kind::OpenMailbox | Kind::MailboxOpened => {
            let w: IdCountWire = exact(kind, p)?;
            if w.reserved.get() != 0 {
                return Err(DecodeError::Reserved(kind));
            }
            let (vm_id, vcpus) = (nonzero_vm(w.vm_id.get())?, w.count.get());
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
            let [vm_id, token] = id_words(kind, p)?;
            Message::Subscribe { vm_id, token }
        }
        Kind::Subscribed => Message::Subscribed {
            vm_id: id_words::<1>(kind, p)?[0],
        },
        Kind::ConversionEvent => Message::ConversionEvent(ConversionEvent::decode(p)?),
        Kind::Attached => Message::Attached {
            vm_id: id_words::<1>(kind, p)?[0],
        },
        Kind::Detach => Message::Detach {
            vm_id: id_words::<1>(kind, p)?[0],
        },
        Kind::Detached => Message::Detached {
            vm_id: id_words::<1>(kind, p)?[0],
        },
        Kind::GetStats => Message::GetStats {
            vm_id: id_words::<1>(kind, p)?[0],
        },
        Kind::Stats => Message::Stats(Stats::decode(p)?),
        Kind::Error => Message::Error(ErrorReply::decode(p)?),
        Kind::ReplayWorkingSet => Message::ReplayWorkingSet(ReplayWorkingSet::decode(p)?),
        Kind::ReplayQueued => {
            let [vm_id, queued] = id_words(kind, p)?;
            Message::ReplayQueued { vm_id, queued }
        }
        Kind::GetWorkingSet => {
            let [vm_id, from] = id_words(kind, p)?;
            Message::GetWorkingSet { vm_id, from }
        }
        Kind::WorkingSet => Message::WorkingSet(WorkingSet::decode(p)?),
        Kind::ReleaseVm => Message::ReleaseVm {
            vm_id: id_words::<1>(kind, p)?[0],
        },
        Kind::Released => {
            let [vm_id, grace_ms] = id_words(kind, p)?;
            Message::Released { vm_id, grace_ms }
        }
        Kind::ReattachVm => {
            let [vm_id, token] = id_words(kind, p)?;
            Message::ReattachVm { vm_id, token }
        }
        Kind::Reattached => Message::Reattached(VmSession::decode(kind, p)?),
        Kind::ReclaimVm => Message::ReclaimVm(VmSession::decode(kind, p)?),
        Kind::Reclaimed => Message::Reclaimed {
            vm_id: id_words::<1>(kind, p)?[0],
        },
        Kind::MigrateOut => Message::MigrateOut(MigrateOut::decode(p)?),
        Kind::MigrateIn => Message::MigrateIn(MigrateIn::decode(p)?),
        Kind::MigrationStatus => Message::MigrationStatus(MigrationStatus::decode(p)?),
        Kind::GetMigration => Message::GetMigration {
            vm_id: id_words::<1>(kind, p)?[0],
        },
        Kind::AbandonMigration => Message::AbandonMigration {
            vm_id: id_words::<1>(kind, p)?[0],
        },
    })
}
