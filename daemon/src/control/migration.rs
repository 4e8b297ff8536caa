//! Migration requests: `MigrateOut` (serve a VM to a destination daemon), `MigrateIn` (pull a
//! VM from a source daemon), `GetMigration` and `AbandonMigration` (docs/migration.md).

use super::*;
use crate::migration::outgoing::Outgoing;
use crate::migration::reader::VmReader;
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
        if m.flags & vmpager_protocol::MIGRATE_HYBRID != 0 {
            return Err(refuse(
                ErrorCode::Unsupported,
                "hybrid migration is not supported yet",
            ));
        }
        let reader = VmReader::new(entry.vm.clone())
            .map_err(|e| refuse(ErrorCode::BadState, error_chain(&e)))?;
        let out = Arc::new(Outgoing::new(
            m.migration_id,
            Key::from_bytes(m.key.0),
            reader,
        ));
        let status = out.status();
        self.migrations.outgoing.add(out);
        Ok((Message::MigrationStatus(status), vec![]))
    }

    pub(super) fn migrate_in(&mut self, token: usize, m: MigrateIn) -> Reply {
        self.owned(token, m.vm_id)?;
        Err(refuse(
            ErrorCode::Unsupported,
            "pulling a VM from a source daemon is not supported yet",
        ))
    }

    pub(super) fn get_migration(&mut self, token: usize, vm_id: u64) -> Reply {
        self.owned(token, vm_id)?;
        Ok((Message::MigrationStatus(self.migration_status(vm_id)), vec![]))
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
        Ok((Message::MigrationStatus(self.migration_status(vm_id)), vec![]))
    }

    fn migration_status(&self, vm_id: u64) -> MigrationStatus {
        match self.migrations.outgoing.of_vm(vm_id) {
            Some(out) => out.status(),
            None => MigrationStatus {
                vm_id,
                migration_id: 0,
                state: MigrationState::None,
                counters: Default::default(),
            },
        }
    }
}
