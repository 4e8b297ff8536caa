//! The source side's migrations: the VMs this daemon serves to destination daemons
//! (`MigrateOut`), what each destination has, and where the bulk push is.
//!
//! An [`Outgoing`] holds its VM (`Arc<Vm>`): the VM's memory stays until the destination says
//! it has every page (`Done`), even if the VMM detached or died meanwhile.

use super::dirty::Tracker;
use super::reader::VmReader;
use super::sent::PageBits;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vmpager_migration::Key;
use vmpager_protocol::message::{MigrationCounters, MigrationState, MigrationStatus};

/// One VM being served to a destination.
#[derive(Debug)]
pub struct Outgoing {
    /// The VM's id on this daemon.
    pub vm_id: u64,
    /// Its name on the wire.
    pub migration_id: u64,
    pub(super) key: Key,
    /// Reads its pages.
    pub reader: VmReader,
    /// Pages the destination has or was sent since its last `Resume`.
    pub(super) sent: PageBits,
    /// Where the bulk push goes on (a page number); moved by the destination's hints.
    pub(super) cursor: AtomicU64,
    /// Bumped by each new bulk connection: an older push loop stops.
    pub(super) bulk_generation: AtomicU64,
    state: AtomicU32,
    pub(super) pulled: AtomicU64,
    pub(super) pushed: AtomicU64,
    pub(super) bytes: AtomicU64,
    pub(super) connections: AtomicU64,
    /// Pages the destination said it had at its last `Resume`.
    pub(super) resumed_with: AtomicU64,
    /// The daemon freed the VM (its VMM detached or died): the migration is forgotten once it
    /// ends, and the VM's memory with it.
    orphaned: std::sync::atomic::AtomicBool,
    /// Hybrid: the dirty tracking (`None`: plain post-copy).
    pub tracker: Option<Arc<Tracker>>,
    /// Hybrid: the destination said it received the `Switchover` marker (only then is its
    /// `Done` believed).
    pub(super) switch_acked: std::sync::atomic::AtomicBool,
}

impl Outgoing {
    /// A migration of the VM `reader` reads.
    /// `tracker`: a hybrid migration's dirty tracking.
    pub fn new(
        migration_id: u64,
        key: Key,
        reader: VmReader,
        tracker: Option<Arc<Tracker>>,
    ) -> Outgoing {
        let total = reader.total_pages();
        Outgoing {
            vm_id: reader.vm().id,
            migration_id,
            key,
            sent: PageBits::new(total),
            reader,
            cursor: AtomicU64::new(0),
            bulk_generation: AtomicU64::new(0),
            state: AtomicU32::new(MigrationState::Running as u32),
            pulled: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            resumed_with: AtomicU64::new(0),
            orphaned: std::sync::atomic::AtomicBool::new(false),
            tracker,
            switch_acked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Hybrid and not frozen yet: the guest may still write.
    pub fn is_live(&self) -> bool {
        self.tracker.as_ref().is_some_and(|t| !t.is_frozen())
    }

    /// Hybrid: the switchover (the VMM paused every vCPU). The push's next pass invalidates
    /// what was written since it was sent, then sends the `Switchover` marker.
    pub fn freeze(&self) {
        if let Some(t) = &self.tracker {
            t.freeze();
        }
    }

    /// Where it is.
    pub fn state(&self) -> MigrationState {
        match self.state.load(Ordering::Acquire) {
            2 => MigrationState::Complete,
            3 => MigrationState::Abandoned,
            _ => MigrationState::Running,
        }
    }

    pub(super) fn set_state(&self, s: MigrationState) {
        self.state.store(s as u32, Ordering::Release);
    }

    /// Stops serving it: its connections end and no new one is accepted.
    pub fn set_abandoned(&self) {
        self.set_state(MigrationState::Abandoned);
        if let Some(t) = &self.tracker {
            t.stop();
        }
    }

    /// Its counters, as `MigrationStatus` carries them.
    pub fn status(&self) -> MigrationStatus {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let state = match self.state() {
            MigrationState::Running if self.tracker.as_ref().is_some_and(|t| t.is_frozen()) => {
                MigrationState::Switched
            }
            s => s,
        };
        MigrationStatus {
            vm_id: self.vm_id,
            migration_id: self.migration_id,
            state,
            counters: MigrationCounters {
                total_pages: self.reader.total_pages(),
                pages_done: self.sent.count(),
                pages_pulled: get(&self.pulled),
                pages_pushed: get(&self.pushed),
                reconnects: get(&self.connections).saturating_sub(2),
                bytes: get(&self.bytes),
                pages_invalidated: self.tracker.as_ref().map_or(0, |t| get(&t.invalidated)),
                ..MigrationCounters::default()
            },
        }
    }
}

/// Every migration this daemon serves, by migration id; shared by the control thread (which
/// adds them) and the migration listener (which serves them).
#[derive(Debug, Default)]
pub struct Outgoings {
    map: Mutex<HashMap<u64, Arc<Outgoing>>>,
    /// Connections refused (handshake, authentication, unknown migration).
    pub refused: AtomicU64,
}

impl Outgoings {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Outgoing>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `o` from now on, in place of an earlier migration with its id (a VMM that made
    /// its request again, to a restarted daemon or after a reattach).
    pub fn add(&self, o: Arc<Outgoing>) {
        if let Some(old) = self.map().insert(o.migration_id, o) {
            old.set_abandoned();
        }
    }

    /// The migration named `migration_id`.
    pub fn get(&self, migration_id: u64) -> Option<Arc<Outgoing>> {
        self.map().get(&migration_id).cloned()
    }

    /// The migration of VM `vm_id`.
    pub fn of_vm(&self, vm_id: u64) -> Option<Arc<Outgoing>> {
        self.map().values().find(|o| o.vm_id == vm_id).cloned()
    }

    /// The key of a running migration (for the handshake).
    pub fn key(&self, migration_id: u64) -> Option<Key> {
        self.map()
            .get(&migration_id)
            .filter(|o| o.state() == MigrationState::Running)
            .map(|o| o.key.clone())
    }

    /// Forgets migration `migration_id` (done or abandoned): its VM's memory goes with the
    /// last connection that still holds it.
    pub fn remove(&self, migration_id: u64) {
        self.map().remove(&migration_id);
    }

    /// The daemon freed VM `vm_id`: its finished migration is forgotten; a running one keeps
    /// the memory until it finishes ([`Outgoings::finished`]).
    pub fn vm_freed(&self, vm_id: u64) {
        let mut map = self.map();
        let ids: Vec<u64> = map
            .values()
            .filter(|o| o.vm_id == vm_id)
            .map(|o| o.migration_id)
            .collect();
        for id in ids {
            let running = map
                .get(&id)
                .is_some_and(|o| o.state() == MigrationState::Running);
            match running {
                true => {
                    if let Some(o) = map.get(&id) {
                        o.orphaned.store(true, Ordering::Release);
                    }
                }
                false => {
                    map.remove(&id);
                }
            }
        }
    }

    /// Migration `o` ended (done): forgotten if its VM was freed meanwhile; otherwise kept
    /// (for its status) until the VM is.
    pub fn finished(&self, o: &Outgoing) {
        if o.orphaned.load(Ordering::Acquire) {
            self.remove(o.migration_id);
        }
    }

    /// Migrations served now.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// No migration is served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
