//! Stopping the vCPUs for a VMM update, and the state each one leaves: where it was in its plan,
//! the results it had, and its registers — enough for a new VMM process to go on.
//!
//! A vCPU thread is taken out of `KVM_RUN` by a signal (`SIGUSR2`, whose handler does nothing:
//! `KVM_RUN` returns `EINTR`), then sees the request and stops. The requester signals again
//! until every vCPU has stopped, so a signal that lands just before a thread enters `KVM_RUN`
//! is not lost.

use super::{TaskResult, VcpuReport};
use kvm_bindings::{kvm_regs, kvm_sregs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, Once, PoisonError};
use std::time::Duration;

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
const KICK: libc::c_int = libc::SIGUSR2;

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the no-op handler of [`KICK`] once per process (without `SA_RESTART`, so `KVM_RUN`
/// returns `EINTR`).
fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed `sigaction` is a valid "no flags, empty mask" value; the handler is a
        // plain `extern "C"` function that does nothing (async-signal-safe), installed for a
        // signal this crate alone uses.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(KICK, &sa, std::ptr::null_mut());
        }
    });
}

/// A request to stop every vCPU of a [`super::RefVm::run_pausable`].
#[derive(Debug, Default)]
pub struct Pause {
    requested: AtomicBool,
    threads: Mutex<Vec<libc::pthread_t>>,
    expected: AtomicUsize,
    stopped: AtomicUsize,
}

impl Pause {
    /// A pause not yet requested.
    pub fn new() -> Pause {
        install_kick_handler();
        Pause::default()
    }

    /// Whether a pause was requested.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Stops every vCPU of the run and returns once each has stopped (or finished its plan).
    pub fn request(&self) {
        self.requested.store(true, Ordering::Release);
        while self.stopped.load(Ordering::Acquire) < self.expected.load(Ordering::Acquire) {
            for &t in self
                .threads
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
            {
                // SAFETY: `t` is a vCPU thread of the running scope: it deregisters itself
                // (`done`) before it exits, under this lock, so it is alive here.
                unsafe { libc::pthread_kill(t, KICK) };
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub(super) fn expect(&self, threads: usize) {
        self.expected.store(threads, Ordering::Release);
    }

    /// The calling vCPU thread takes part.
    pub(super) fn join(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(me);
    }

    /// The calling vCPU thread stopped or finished: no more signals for it.
    pub(super) fn done(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|&t| t != me);
        self.stopped.fetch_add(1, Ordering::AcqRel);
    }
}

/// Where a vCPU stopped: the task it was in (its plan's length if it had finished), the results
/// of the tasks before, and its registers.
#[derive(Debug, Clone)]
pub struct VcpuState {
    /// Index of the task in progress.
    pub task: usize,
    /// Results of the tasks before it.
    pub results: Vec<TaskResult>,
    /// General registers, `rip` and `rflags` (meaningless once the plan is done).
    pub regs: kvm_regs,
    /// System registers (control registers and segments).
    pub sregs: kvm_sregs,
}

impl VcpuState {
    pub(super) fn finished(report: VcpuReport, tasks: usize) -> VcpuState {
        VcpuState {
            task: tasks,
            results: report.results,
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
        }
    }

    /// The state as JSON: what a VMM saves for its successor.
    pub fn to_json(&self) -> serde_json::Value {
        let r = &self.regs;
        let s = &self.sregs;
        serde_json::json!({
            "task": self.task,
            "results": self.results.iter().map(|t| t.value).collect::<Vec<_>>(),
            "regs": [r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9,
                     r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags],
            "cr": [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer],
        })
    }

    /// Reads [`VcpuState::to_json`]'s output back; `sregs` starts from `base` (the new vCPU's,
    /// set up as the reference guest's) with the saved control registers. `None` if malformed.
    pub fn from_json(v: &serde_json::Value, base: &kvm_sregs) -> Option<VcpuState> {
        let words = |k: &str, n: usize| -> Option<Vec<u64>> {
            let a = v.get(k)?.as_array()?;
            let w: Option<Vec<u64>> = a.iter().map(|x| x.as_u64()).collect();
            w.filter(|w| w.len() == n)
        };
        let g = words("regs", 18)?;
        let c = words("cr", 6)?;
        let results = v
            .get("results")?
            .as_array()?
            .iter()
            .map(|x| {
                x.as_u64().map(|value| TaskResult {
                    value,
                    elapsed: Duration::ZERO,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let regs = kvm_regs {
            rax: g[0],
            rbx: g[1],
            rcx: g[2],
            rdx: g[3],
            rsi: g[4],
            rdi: g[5],
            rsp: g[6],
            rbp: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: g[16],
            rflags: g[17],
        };
        let mut sregs = *base;
        (
            sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8, sregs.efer,
        ) = (c[0], c[1], c[2], c[3], c[4], c[5]);
        Some(VcpuState {
            task: usize::try_from(v.get("task")?.as_u64()?).ok()?,
            results,
            regs,
            sregs,
        })
    }
}

impl super::RefVm {
    /// The system registers of vCPU 0 as the reference guest sets them up (the base a saved
    /// [`VcpuState`] is read onto).
    pub fn vcpu_sregs(&self) -> Result<kvm_sregs, super::RefVmError> {
        let vcpus = self.vcpus.lock().unwrap_or_else(PoisonError::into_inner);
        let v = vcpus.first().ok_or(super::RefVmError::BadVcpuCount {
            requested: 0,
            max: 0,
        })?;
        v.get_sregs().map_err(super::kvm_err("KVM_GET_SREGS"))
    }
}
