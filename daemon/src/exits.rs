//! Serving a VM's mailbox: memory-fault and conversion exits forwarded by the VMM's vCPU
//! threads, answered after the policy and the conversion (DESIGN.md §5, §6).

use crate::convert::{codes, convert};
use crate::metrics::VmMetrics;
use crate::session::Vm;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use vmpager_protocol::mailbox::{
    Consumer, Mailbox, Request, RequestKind, Response, Status, RETRY_SET_ATTRIBUTES,
    RETRY_ZAP_SHARED,
};

/// Serves one VM's mailbox; owned by one worker thread, woken by the doorbell eventfd.
#[derive(Debug)]
pub struct ExitServer {
    vm: Arc<Vm>,
    consumer: Consumer,
    doorbell: OwnedFd,
}

impl ExitServer {
    /// A server of `mailbox` for `vm`; `doorbell` is a non-blocking eventfd.
    pub fn new(vm: Arc<Vm>, mailbox: Arc<Mailbox>, doorbell: OwnedFd) -> ExitServer {
        ExitServer {
            vm,
            consumer: Consumer::new(mailbox),
            doorbell,
        }
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// The doorbell (for a poller).
    pub fn doorbell(&self) -> BorrowedFd<'_> {
        self.doorbell.as_fd()
    }

    /// Clears the doorbell and answers every pending exit; returns how many.
    pub fn drain(&mut self) -> usize {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.doorbell, &mut buf);
        let vm = &*self.vm;
        self.consumer
            .drain(&mut |_slot, request| handle(vm, request))
    }
}

/// Answers one exit.
pub fn handle(vm: &Vm, request: Result<Request, u32>) -> Response {
    let Ok(request) = request else {
        return Response {
            status: Status::Fatal,
            code: codes::UNKNOWN_REQUEST,
            ret: 0,
        };
    };
    let explicit = match request.kind {
        RequestKind::MemoryFault => {
            VmMetrics::bump(&vm.metrics.memory_fault_exits);
            false
        }
        RequestKind::MapGpaRange => {
            VmMetrics::bump(&vm.metrics.hypercall_exits);
            true
        }
    };
    match convert(vm, request.gpa, request.size, request.private, explicit) {
        Ok(work) => Response {
            status: Status::Retry,
            code: if work.set_attributes {
                RETRY_SET_ATTRIBUTES
            } else {
                0
            } | if work.zap_shared { RETRY_ZAP_SHARED } else { 0 },
            ret: 0,
        },
        Err(e) if e.is_fatal() => Response {
            status: Status::Fatal,
            code: e.code(),
            ret: e.hypercall_ret(),
        },
        Err(e) => Response {
            status: Status::Denied,
            code: e.code(),
            ret: e.hypercall_ret(),
        },
    }
}
