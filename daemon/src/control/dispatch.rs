//! Which request is served in which state of a connection, and by which handler.

use super::*;

impl Reactor {
    pub(super) fn dispatch(
        &mut self,
        token: usize,
        received: Received,
    ) -> Result<(Message, Vec<OwnedFd>), Refusal> {
        let Received { message, fds, .. } = received;
        let supported = self.supported_features();
        let Some(conn) = self.conns.get_mut(&token) else {
            return Err(refuse(ErrorCode::Internal, "connection vanished"));
        };
        match (&conn.state, message) {
            (State::Greeting, Message::Hello(hello)) => {
                if hello.version < PROTOCOL_VERSION {
                    return Err(refuse(
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "client speaks version {}, the daemon needs {PROTOCOL_VERSION}",
                            hello.version
                        ),
                    ));
                }
                let features = hello.features & supported;
                conn.state = State::Ready { features };
                Ok((
                    Message::Welcome(Welcome {
                        version: PROTOCOL_VERSION,
                        features,
                        max_regions: MAX_REGIONS as u32,
                        max_payload: MAX_PAYLOAD as u32,
                        max_vm_memory: self.config.max_vm_memory,
                    }),
                    vec![],
                ))
            }
            (State::Greeting, m) => Err(refuse(
                ErrorCode::BadState,
                format!("{:?} before Hello", m.kind()),
            )),
            (State::Ready { features }, Message::CreateVm(create)) => {
                let features = *features;
                self.create_vm(token, features, create, fds)
            }
            (State::Ready { .. }, Message::AttachUffd(attach)) => self.attach(token, attach, fds),
            (State::Ready { features }, Message::AttachChannel(_))
                if features & features::FAULT_CHANNEL == 0 =>
            {
                Err(refuse(
                    ErrorCode::Unsupported,
                    "fault channels were not negotiated",
                ))
            }
            (State::Ready { .. }, Message::AttachChannel(attach)) => {
                self.attach_channel(token, attach, fds)
            }
            (
                State::Ready { features },
                Message::ReplayWorkingSet(_) | Message::GetWorkingSet { .. },
            ) if features & features::WORKING_SET == 0 => Err(refuse(
                ErrorCode::Unsupported,
                "working sets were not negotiated",
            )),
            (State::Ready { .. }, Message::ReplayWorkingSet(replay)) => {
                self.replay_working_set(token, replay)
            }
            (State::Ready { .. }, Message::GetWorkingSet { vm_id, from }) => {
                self.get_working_set(token, vm_id, from)
            }
            (State::Ready { features }, Message::OpenMailbox { .. })
                if features & features::MAILBOX == 0 =>
            {
                Err(refuse(
                    ErrorCode::Unsupported,
                    "the mailbox was not negotiated",
                ))
            }
            (State::Ready { .. }, Message::OpenMailbox { vm_id, vcpus }) => {
                self.open_mailbox(token, vm_id, vcpus)
            }
            (State::Ready { features }, Message::Subscribe { .. })
                if features & features::CONVERSION_EVENTS == 0 =>
            {
                Err(refuse(
                    ErrorCode::Unsupported,
                    "conversion events were not negotiated",
                ))
            }
            (
                State::Ready { .. },
                Message::Subscribe {
                    vm_id,
                    token: secret,
                },
            ) => self.subscribe(token, vm_id, secret),
            (State::Ready { .. }, Message::Detach { vm_id }) => {
                self.owned(token, vm_id)?;
                if let Some(entry) = self.vms.remove(&vm_id) {
                    self.free_vm(vm_id, entry);
                }
                Ok((Message::Detached { vm_id }, vec![]))
            }
            (
                State::Ready { features },
                Message::ReleaseVm { .. } | Message::ReattachVm { .. } | Message::ReclaimVm(_),
            ) if features & features::SESSIONS == 0 => Err(refuse(
                ErrorCode::Unsupported,
                "sessions were not negotiated",
            )),
            (State::Ready { .. }, Message::ReleaseVm { vm_id }) => self.release(token, vm_id),
            (
                State::Ready { .. },
                Message::ReattachVm {
                    vm_id,
                    token: secret,
                },
            ) => self.reattach(token, vm_id, secret),
            (State::Ready { features }, Message::ReclaimVm(session)) => {
                let features = *features;
                self.reclaim(token, features, session, fds)
            }
            (State::Ready { features }, Message::GetStats { .. })
                if features & features::STATS == 0 =>
            {
                Err(refuse(ErrorCode::Unsupported, "stats were not negotiated"))
            }
            (State::Ready { .. }, Message::GetStats { vm_id }) => {
                let entry = self.owned(token, vm_id)?;
                // Counters are bumped after the populate ioctl woke the faulting thread: let
                // the VM's worker finish what it read, so the snapshot includes every fault
                // the VMM has seen answered.
                if let Some(w) = entry.worker {
                    self.workers[w]
                        .sync()
                        .map_err(|e| refuse(ErrorCode::Internal, format!("worker: {e}")))?;
                }
                let method = entry.vm.populate.wire() as u64;
                Ok((
                    Message::Stats(entry.vm.metrics.snapshot(vm_id, method)),
                    vec![],
                ))
            }
            (
                State::Ready { features },
                Message::MigrateOut(_)
                | Message::MigrateIn(_)
                | Message::GetMigration { .. }
                | Message::AbandonMigration { .. },
            ) if features & features::MIGRATION == 0 => Err(refuse(
                ErrorCode::Unsupported,
                "migration was not negotiated",
            )),
            (State::Ready { .. }, Message::MigrateOut(m)) => self.migrate_out(token, m),
            (State::Ready { .. }, Message::MigrateIn(m)) => self.migrate_in(token, m),
            (State::Ready { .. }, Message::GetMigration { vm_id }) => {
                self.get_migration(token, vm_id)
            }
            (State::Ready { .. }, Message::AbandonMigration { vm_id }) => {
                self.abandon_migration(token, vm_id)
            }
            (State::Ready { .. }, m) => Err(refuse(
                ErrorCode::BadState,
                format!("{:?} is not a request the daemon serves here", m.kind()),
            )),
        }
    }
}
