//! Working-set requests: pages to replay into a VM, and the recorded working set.

use super::*;
use crate::worker::Command;
use vmpager_protocol::message::MAX_WORKING_SET_ENTRIES;
use vmpager_protocol::{ReplayWorkingSet, WorkingSet};

impl Reactor {
    /// Queues pages to push into the VM ahead of its vCPUs, and nudges the VM's worker.
    pub(super) fn replay_working_set(
        &mut self,
        token: usize,
        replay: ReplayWorkingSet,
    ) -> Result<(Message, Vec<OwnedFd>), Refusal> {
        let vm_id = replay.vm_id;
        let entry = self.owned(token, vm_id)?;
        let queued = entry.vm.replay.push(&replay.pages).ok_or_else(|| {
            refuse(
                ErrorCode::LimitExceeded,
                format!(
                    "more than {} pages queued for replay",
                    crate::working_set::MAX_QUEUED
                ),
            )
        })?;
        if let Some(w) = entry.worker {
            // A server registered later drains its queue as soon as it starts.
            self.workers[w]
                .send(Command::Kick { vm_id })
                .map_err(|e| refuse(ErrorCode::Internal, error_chain(&e)))?;
        }
        Ok((
            Message::ReplayQueued {
                vm_id,
                queued: queued as u64,
            },
            vec![],
        ))
    }

    /// A slice of the VM's recorded working set, after its worker has accounted for every
    /// fault it read.
    pub(super) fn get_working_set(
        &mut self,
        token: usize,
        vm_id: u64,
        from: u64,
    ) -> Result<(Message, Vec<OwnedFd>), Refusal> {
        let entry = self.owned(token, vm_id)?;
        let Some(recorder) = &entry.vm.recorder else {
            return Err(refuse(
                ErrorCode::BadState,
                format!("VM {vm_id} was not created to record its working set"),
            ));
        };
        if let Some(w) = entry.worker {
            self.workers[w]
                .sync()
                .map_err(|e| refuse(ErrorCode::Internal, format!("worker: {e}")))?;
        }
        let (total, entries) = recorder.slice(from, MAX_WORKING_SET_ENTRIES);
        Ok((
            Message::WorkingSet(WorkingSet {
                vm_id,
                total,
                from: from.min(total),
                entries,
            }),
            vec![],
        ))
    }
}
