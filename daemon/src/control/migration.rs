//! Migration requests: `MigrateOut` (serve a VM to a destination daemon), `MigrateIn` (pull a
//! VM from a source daemon), `GetMigration` and `AbandonMigration` (docs/migration.md).

use super::*;
use crate::migration::dirty::Tracker;
use crate::migration::outgoing::Outgoing;
use crate::migration::reader::VmReader;
use crate::migration::remote::{Remote, RemoteParams, RemoteSource};
use vmpager_migration::Key;
use vmpager_protocol::message::{MigrateIn, MigrateOut, MigrationState, MigrationStatus};

type Reply = Result<(Message, Vec<OwnedFd>), Refusal>;

impl Reactor {
    pub(super) fn migrate_out(&mut self, token: usize, m: MigrateOut) -> Reply {
        let entry = self.owned(token, m.vm_id)?;
        if self.migrations.listening.is_none() {
            return Err(refuse(
                ErrorCode::Unsupported,
                "this vmpagerd serves no migration (start it with --migration-listen ADDR)",
            ));
        }
        let hybrid = m.flags & vmpager_protocol::MIGRATE_HYBRID != 0;
        if let Some(out) = self.migrations.outgoing.get(m.migration_id) {
            if !hybrid && out.vm_id == m.vm_id && out.is_live() {
                // The switchover of a hybrid migration: the VMM paused every vCPU.
                out.freeze();
                return Ok((Message::MigrationStatus(out.status()), vec![]));
            }
        }
        let vm = entry.vm.clone();
        let uffd_features = entry.uffd_features;
        let reader =
            VmReader::new(vm.clone()).map_err(|e| refuse(ErrorCode::BadState, error_chain(&e)))?;
        let tracker =
            match hybrid {
                false => None,
                true if vm.source.fetcher().is_some() => return Err(refuse(
                    ErrorCode::Unsupported,
                    "hybrid migration of a VM with an asynchronous page source is not supported",
                )),
                true => Some(Tracker::start(&vm, uffd_features).map_err(|e| {
                    refuse(
                        ErrorCode::Unsupported,
                        format!("hybrid migration: {}", error_chain(&e)),
                    )
                })?),
            };
        let out = Arc::new(Outgoing::new(
            m.migration_id,
            Key::from_bytes(m.key.0),
            reader,
            tracker,
        ));
        let status = out.status();
        self.migrations.outgoing.add(out);
        Ok((Message::MigrationStatus(status), vec![]))
    }

    pub(super) fn migrate_in(&mut self, token: usize, m: MigrateIn) -> Reply {
        let entry = self.owned(token, m.vm_id)?;
        let vm = entry.vm.clone();
        let Some(remote) = RemoteSource::of(&vm.source).cloned() else {
            return Err(refuse(
                ErrorCode::BadState,
                "the VM was not created with the remote page source",
            ));
        };
        if remote.state() == MigrationState::None {
            // What the VM has already (a restarted daemon's VM: its page-state file) is not
            // asked for again.
            for region in vm.memory.regions() {
                let ps = region.page_size();
                let first = region.spec.source_offset() / vmpager_protocol::PAGE_SIZE;
                for page in 0..region.pages() {
                    if !region.state.is_untouched(page) {
                        let sub = ps / vmpager_protocol::PAGE_SIZE;
                        for k in 0..sub {
                            remote.mark_present(first + page as u64 * sub + k);
                        }
                    }
                }
            }
        }
        remote
            .start(RemoteParams {
                addr: m.addr,
                migration_id: m.migration_id,
                key: Key::from_bytes(m.key.0),
                timeouts: self.migrations.timeouts,
                deadline: self.migrations.deadline,
                push: self.migrations.push,
                one_channel: self.migrations.one_channel,
            })
            .map_err(|e| refuse(ErrorCode::Internal, format!("cannot start pulling: {e}")))?;
        Ok((Message::MigrationStatus(remote.status(m.vm_id)), vec![]))
    }

    pub(super) fn get_migration(&mut self, token: usize, vm_id: u64) -> Reply {
        self.owned(token, vm_id)?;
        Ok((
            Message::MigrationStatus(self.migration_status(vm_id)),
            vec![],
        ))
    }

    pub(super) fn abandon_migration(&mut self, token: usize, vm_id: u64) -> Reply {
        self.owned(token, vm_id)?;
        if let Some(out) = self.migrations.outgoing.of_vm(vm_id) {
            if out.state() == MigrationState::Running {
                out.set_abandoned();
            }
            self.migrations.outgoing.remove(out.migration_id);
            let mut status = out.status();
            status.state = MigrationState::Abandoned;
            return Ok((Message::MigrationStatus(status), vec![]));
        }
        if let Some(remote) = self.remote_of(vm_id) {
            remote.abandon();
            return Ok((Message::MigrationStatus(remote.status(vm_id)), vec![]));
        }
        Ok((
            Message::MigrationStatus(self.migration_status(vm_id)),
            vec![],
        ))
    }

    fn remote_of(&self, vm_id: u64) -> Option<Arc<Remote>> {
        let entry = self.vms.get(&vm_id)?;
        RemoteSource::of(&entry.vm.source).cloned()
    }

    fn migration_status(&self, vm_id: u64) -> MigrationStatus {
        if let Some(remote) = self.remote_of(vm_id) {
            return remote.status(vm_id);
        }
        match self.migrations.outgoing.of_vm(vm_id) {
            Some(out) => {
                let mut status = out.status();
                // Connections refused by this daemon's listener, whichever migration they
                // claimed to be.
                status.counters.refused = self
                    .migrations
                    .outgoing
                    .refused
                    .load(std::sync::atomic::Ordering::Relaxed);
                status
            }
            None => MigrationStatus {
                vm_id,
                migration_id: 0,
                state: MigrationState::None,
                counters: Default::default(),
            },
        }
    }
}
