//! Migration requests on the control socket (docs/migration.md): a source daemon is told to
//! serve a VM's memory to a destination daemon (`MigrateOut`), a destination daemon to pull a
//! VM's memory from a source daemon (`MigrateIn`, for a VM created with the `Remote` page
//! source), and either is asked how its side is going (`GetMigration`) or to give up on the
//! other side (`AbandonMigration`). The pages themselves travel between the daemons on TCP
//! (`vmpager-migration`, docs/migration-protocol.md), never on this socket.
//!
//! The remote address space is the source VM's regions laid end to end in order: byte `o` of
//! region `i` is at `sum(size of regions before i) + o`. A destination region's
//! `source_offset` says where it starts in that space (the same layout: the running sums).

use super::{nonzero_vm, prefix, DecodeError, Kind};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Bytes of a migration's pre-shared key.
pub const MIGRATION_KEY_LEN: usize = 32;
/// Longest source address (`host:port`) a `MigrateIn` carries.
pub const MAX_MIGRATION_ADDR: usize = 255;
/// `MigrateOut.flags`: hybrid migration. The VM still runs here: push every page now, track
/// what the guest writes after it was sent, and invalidate it at the destination.
pub const MIGRATE_HYBRID: u32 = 1;
/// Every `MigrateOut` flag this version knows.
pub const MIGRATE_FLAGS: u32 = MIGRATE_HYBRID;

/// A migration's pre-shared key: both daemons prove they hold it before a page moves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MigrationKey(pub [u8; MIGRATION_KEY_LEN]);

impl std::fmt::Debug for MigrationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MigrationKey(..)") // Never in a log.
    }
}

/// `MigrateOut` (source daemon): serve VM `vm_id`'s memory to the destination that presents
/// `migration_id` and proves it holds `key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrateOut {
    /// VM id (on this daemon).
    pub vm_id: u64,
    /// Names the migration on the wire; non-zero.
    pub migration_id: u64,
    /// The pre-shared key.
    pub key: MigrationKey,
    /// [`MIGRATE_HYBRID`].
    pub flags: u32,
}

/// `MigrateIn` (destination daemon): pull VM `vm_id`'s memory (created with the `Remote` page
/// source) from the source daemon at `addr`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrateIn {
    /// VM id (on this daemon).
    pub vm_id: u64,
    /// Names the migration on the wire; non-zero.
    pub migration_id: u64,
    /// The pre-shared key.
    pub key: MigrationKey,
    /// The source daemon's `--migration-listen` address, `host:port`.
    pub addr: String,
}

/// Where a side of a migration is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u32)]
pub enum MigrationState {
    /// Not a migrating VM.
    #[default]
    None = 0,
    /// Pages are moving (or the other side is being waited for).
    Running = 1,
    /// Every page is at the destination and the source was told so.
    Complete = 2,
    /// The other side was given up on: the destination poisoned every missing page.
    Abandoned = 3,
    /// Hybrid migration only, pages still moving (as `Running`) after the switchover: the
    /// source VM is frozen (source), or every invalidation was applied and the vCPUs may run
    /// (destination). Plain post-copy migrations never report it.
    Switched = 4,
}

impl MigrationState {
    fn from_wire(v: u32) -> Option<MigrationState> {
        Some(match v {
            0 => MigrationState::None,
            1 => MigrationState::Running,
            2 => MigrationState::Complete,
            3 => MigrationState::Abandoned,
            4 => MigrationState::Switched,
            _ => return None,
        })
    }
}

/// `MigrationStatus`: one side's counters.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct MigrationCounters {
    /// Pages of the VM (4 KiB).
    pub total_pages: u64,
    /// Destination: pages present (received, or discarded and needing none). Source: pages
    /// the destination said it has, at its last (re)connect, plus pages sent since.
    pub pages_done: u64,
    /// Pages that went because a fault asked (urgent channel).
    pub pages_pulled: u64,
    /// Pages pushed by the bulk channel.
    pub pages_pushed: u64,
    /// Pages re-sent or invalidated because the guest wrote them after they were sent.
    pub pages_invalidated: u64,
    /// Pages the destination poisoned (the source was given up on).
    pub pages_poisoned: u64,
    /// Connections re-established after a failure.
    pub reconnects: u64,
    /// Connections or frames refused (authentication, MAC, decoding).
    pub refused: u64,
    /// Bytes of page data received (destination) or sent (source).
    pub bytes: u64,
    /// Remote fault latency (destination): p50, p99, in nanoseconds; 0 without faults.
    pub fault_p50_ns: u64,
    /// See `fault_p50_ns`.
    pub fault_p99_ns: u64,
}

/// `MigrationStatus`: the answer to every migration request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrationStatus {
    /// VM id.
    pub vm_id: u64,
    /// The migration's id (0 if none).
    pub migration_id: u64,
    /// Where it is.
    pub state: MigrationState,
    /// Counters.
    pub counters: MigrationCounters,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct MigrateWire {
    vm_id: U64,
    migration_id: U64,
    key: [u8; MIGRATION_KEY_LEN],
    /// `MigrateOut`: flags; `MigrateIn`: the address's length (the address follows).
    word: U32,
    reserved: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct StatusWire {
    vm_id: U64,
    migration_id: U64,
    state: U32,
    reserved: U32,
}

fn head(kind: Kind, p: &[u8]) -> Result<(MigrateWire, &[u8]), DecodeError> {
    let (w, rest): (MigrateWire, _) = prefix(kind, p)?;
    nonzero_vm(w.vm_id.get())?;
    if w.migration_id.get() == 0 {
        return Err(DecodeError::BadValue {
            field: "migration_id",
            value: 0,
        });
    }
    if w.reserved.get() != 0 {
        return Err(DecodeError::Reserved(kind));
    }
    Ok((w, rest))
}

impl MigrateOut {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        let w = MigrateWire {
            vm_id: self.vm_id.into(),
            migration_id: self.migration_id.into(),
            key: self.key.0,
            word: self.flags.into(),
            reserved: 0.into(),
        };
        out.extend_from_slice(w.as_bytes());
    }

    pub(super) fn decode(p: &[u8]) -> Result<MigrateOut, DecodeError> {
        let kind = Kind::MigrateOut;
        let (w, rest) = head(kind, p)?;
        if !rest.is_empty() {
            return Err(DecodeError::Malformed { kind, len: p.len() });
        }
        let flags = w.word.get();
        if flags & !MIGRATE_FLAGS != 0 {
            return Err(DecodeError::BadValue {
                field: "flags",
                value: flags.into(),
            });
        }
        Ok(MigrateOut {
            vm_id: w.vm_id.get(),
            migration_id: w.migration_id.get(),
            key: MigrationKey(w.key),
            flags,
        })
    }
}

impl MigrateIn {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        let w = MigrateWire {
            vm_id: self.vm_id.into(),
            migration_id: self.migration_id.into(),
            key: self.key.0,
            word: (self.addr.len() as u32).into(),
            reserved: 0.into(),
        };
        out.extend_from_slice(w.as_bytes());
        out.extend_from_slice(self.addr.as_bytes());
    }

    pub(super) fn decode(p: &[u8]) -> Result<MigrateIn, DecodeError> {
        let kind = Kind::MigrateIn;
        let (w, rest) = head(kind, p)?;
        let len = w.word.get() as usize;
        if len == 0 || len > MAX_MIGRATION_ADDR {
            return Err(DecodeError::Limit {
                field: "addr",
                value: len as u64,
            });
        }
        if rest.len() != len {
            return Err(DecodeError::Malformed { kind, len: p.len() });
        }
        let addr = std::str::from_utf8(rest).map_err(|_| DecodeError::BadText)?;
        Ok(MigrateIn {
            vm_id: w.vm_id.get(),
            migration_id: w.migration_id.get(),
            key: MigrationKey(w.key),
            addr: addr.to_owned(),
        })
    }
}

impl MigrationStatus {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        let w = StatusWire {
            vm_id: self.vm_id.into(),
            migration_id: self.migration_id.into(),
            state: (self.state as u32).into(),
            reserved: 0.into(),
        };
        out.extend_from_slice(w.as_bytes());
        for v in self.counters.as_bytes().chunks_exact(8) {
            // The counters as little-endian words, whatever the host's order.
            let n = u64::from_ne_bytes(v.try_into().unwrap_or([0; 8]));
            out.extend_from_slice(&n.to_le_bytes());
        }
    }

    pub(super) fn decode(p: &[u8]) -> Result<MigrationStatus, DecodeError> {
        let kind = Kind::MigrationStatus;
        let (w, rest): (StatusWire, _) = prefix(kind, p)?;
        let vm_id = nonzero_vm(w.vm_id.get())?;
        if w.reserved.get() != 0 {
            return Err(DecodeError::Reserved(kind));
        }
        let state = MigrationState::from_wire(w.state.get()).ok_or(DecodeError::BadValue {
            field: "state",
            value: w.state.get().into(),
        })?;
        if rest.len() != std::mem::size_of::<MigrationCounters>() {
            return Err(DecodeError::Malformed { kind, len: p.len() });
        }
        let mut counters = MigrationCounters::default();
        for (dst, src) in counters
            .as_mut_bytes()
            .chunks_exact_mut(8)
            .zip(rest.chunks_exact(8))
        {
            let n = u64::from_le_bytes(src.try_into().unwrap_or([0; 8]));
            dst.copy_from_slice(&n.to_ne_bytes());
        }
        Ok(MigrationStatus {
            vm_id,
            migration_id: w.migration_id.get(),
            state,
            counters,
        })
    }
}
