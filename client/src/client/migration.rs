//! Migration requests (docs/migration.md): a source daemon serves a VM's memory to a
//! destination daemon, which pulls it into a VM created with [`PageSource::Remote`].
//!
//! The client remembers a VM's migration request and makes it again after handing the VM to a
//! restarted daemon, so the restarted daemon resumes its side of the migration.

#[cfg(doc)]
use super::PageSource;
use super::{Client, ClientError};
use vmpager_protocol::message::{MigrateIn, MigrateOut, MigrationKey, MigrationStatus};
use vmpager_protocol::{features, Message, MIGRATE_HYBRID};

impl Client {
    /// Source side: serve VM `vm_id`'s memory to the destination daemon that presents
    /// `migration_id` and proves it holds `key`. The VM's vCPUs should be paused (plain
    /// post-copy); with `hybrid`, they may still run: pages they write after they were sent are
    /// invalidated at the destination.
    pub fn migrate_out(
        &self,
        vm_id: u64,
        migration_id: u64,
        key: MigrationKey,
        hybrid: bool,
    ) -> Result<MigrationStatus, ClientError> {
        let msg = Message::MigrateOut(MigrateOut {
            vm_id,
            migration_id,
            key,
            flags: if hybrid { MIGRATE_HYBRID } else { 0 },
        });
        self.migration_request(vm_id, msg)
    }

    /// Destination side: pull VM `vm_id`'s memory (created with [`PageSource::Remote`]) from
    /// the source daemon listening at `addr` (`host:port`).
    pub fn migrate_in(
        &self,
        vm_id: u64,
        migration_id: u64,
        key: MigrationKey,
        addr: &str,
    ) -> Result<MigrationStatus, ClientError> {
        let msg = Message::MigrateIn(MigrateIn {
            vm_id,
            migration_id,
            key,
            addr: addr.to_owned(),
        });
        self.migration_request(vm_id, msg)
    }

    /// How this side of VM `vm_id`'s migration is going.
    pub fn migration(&self, vm_id: u64) -> Result<MigrationStatus, ClientError> {
        self.status(Message::GetMigration { vm_id }, vm_id, true)
    }

    /// Gives up on the other side: a destination poisons every page it does not have (the VM
    /// gets SIGBUS there, never zeros); a source stops serving.
    pub fn abandon_migration(&self, vm_id: u64) -> Result<MigrationStatus, ClientError> {
        let status = self.status(Message::AbandonMigration { vm_id }, vm_id, true)?;
        if let Some(k) = self.link.kept().get_mut(&vm_id) {
            k.migration = None;
        }
        Ok(status)
    }

    /// Sends `msg` (`MigrateOut` or `MigrateIn`) and keeps it for a restarted daemon.
    fn migration_request(&self, vm_id: u64, msg: Message) -> Result<MigrationStatus, ClientError> {
        if self.features() & features::MIGRATION == 0 {
            return Err(ClientError::Protocol(
                "the daemon does not migrate VMs (feature MIGRATION)".into(),
            ));
        }
        let status = self.status(msg.clone(), vm_id, false)?;
        if let Some(k) = self.link.kept().get_mut(&vm_id) {
            k.migration = Some(msg);
        }
        Ok(status)
    }

    fn status(
        &self,
        msg: Message,
        vm_id: u64,
        idempotent: bool,
    ) -> Result<MigrationStatus, ClientError> {
        match self.call(&msg, &[], idempotent)?.message {
            Message::MigrationStatus(s) if s.vm_id == vm_id => Ok(s),
            other => Err(ClientError::Protocol(format!(
                "{:?} instead of MigrationStatus",
                other.kind()
            ))),
        }
    }
}
