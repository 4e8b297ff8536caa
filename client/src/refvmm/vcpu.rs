//! The vCPU threads: a start gate, each thread's run of its plan, and the `KVM_RUN` loop.

use super::pause::{Pause, VcpuState};
use super::{guest, kvm_err, RefVmError, Task, TaskResult, VcpuReport, Workload, GUEST_RFLAGS};
use kvm_bindings::kvm_regs;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::{Barrier, Condvar, Mutex, PoisonError};
use std::time::Instant;

/// A one-shot start gate: threads wait until the spawner says go (true) or quit (false).
#[derive(Default)]
pub(super) struct Gate {
    state: Mutex<Option<bool>>,
    cv: Condvar,
}

impl Gate {
    pub(super) fn open(&self, go: bool) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = Some(go);
        self.cv.notify_all();
    }

    pub(super) fn wait(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(go) = *state {
                return go;
            }
            state = self.cv.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// What a vCPU thread did: its report, and its state if it stopped for a pause.
pub(super) struct PlanOutcome {
    pub report: VcpuReport,
    pub paused: Option<VcpuState>,
}

/// Body of vCPU thread `index`: its plan from the start, or from `start` (a saved state: the
/// task it was in, with its registers); stops when `pause` is requested.
pub(super) fn run_plan(
    index: usize,
    vcpu: &mut VcpuFd,
    plan: &[Task],
    start: Option<&VcpuState>,
    pause: Option<&Pause>,
    gate: &Gate,
    barrier: &Barrier,
) -> Result<PlanOutcome, RefVmError> {
    if let Some(p) = pause {
        p.join();
    }
    let outcome = run_plan_inner(index, vcpu, plan, start, pause, gate, barrier);
    if let Some(p) = pause {
        p.done();
    }
    outcome
}

fn run_plan_inner(
    index: usize,
    vcpu: &mut VcpuFd,
    plan: &[Task],
    start: Option<&VcpuState>,
    pause: Option<&Pause>,
    gate: &Gate,
    barrier: &Barrier,
) -> Result<PlanOutcome, RefVmError> {
    if !gate.wait() {
        return Ok(PlanOutcome {
            report: VcpuReport::default(),
            paused: None,
        });
    }
    barrier.wait();
    let started = Instant::now();
    let mut kvm_runs = 0u64;
    let mut results = start.map_or_else(|| Vec::with_capacity(plan.len()), |s| s.results.clone());
    let first = start.map_or(0, |s| s.task);
    for (t, task) in plan.iter().enumerate().skip(first) {
        match start.filter(|s| s.task == t) {
            Some(s) => {
                // Where the previous VMM stopped this vCPU.
                vcpu.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
                vcpu.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
            }
            None => {
                let (selector, key, count) = task.workload.guest_inputs();
                let regs = kvm_regs {
                    rip: guest::CODE_GPA,
                    rflags: GUEST_RFLAGS,
                    rdi: task.gpa_start,
                    rsi: task.gpa_end,
                    rbx: selector,
                    rdx: key,
                    r8: count,
                    ..Default::default()
                };
                vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            }
        }
        let t0 = Instant::now();
        if !run_until_done(index, vcpu, &mut kvm_runs, pause)? {
            let state = VcpuState {
                task: t,
                results,
                regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
                sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            };
            return Ok(PlanOutcome {
                report: VcpuReport {
                    results: state.results.clone(),
                    kvm_runs,
                    elapsed: started.elapsed(),
                },
                paused: Some(state),
            });
        }
        let elapsed = t0.elapsed();
        let value = match task.workload {
            Workload::Checksum | Workload::Scatter { .. } => {
                vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?.rax
            }
            Workload::WritePattern { .. } | Workload::Touch => 0,
        };
        results.push(TaskResult { value, elapsed });
    }
    Ok(PlanOutcome {
        report: VcpuReport {
            results,
            kvm_runs,
            elapsed: started.elapsed(),
        },
        paused: None,
    })
}

/// `KVM_RUN` until the guest's `out` on [`guest::DONE_PORT`] (true), re-entering after
/// interrupts, or until `pause` is requested (false: the vCPU stopped at an instruction
/// boundary, its registers say where).
pub(super) fn run_until_done(
    index: usize,
    vcpu: &mut VcpuFd,
    kvm_runs: &mut u64,
    pause: Option<&Pause>,
) -> Result<bool, RefVmError> {
    loop {
        if pause.is_some_and(Pause::requested) {
            return Ok(false);
        }
        *kvm_runs += 1;
        let failure = match vcpu.run() {
            Ok(VcpuExit::IoOut(guest::DONE_PORT, _)) => return Ok(true),
            Ok(VcpuExit::Intr) => continue,
            Err(e) if e.errno() == libc::EINTR => continue,
            Ok(exit) => Ok(describe_exit(&exit)),
            Err(e) => Err(e),
        };
        let rip = vcpu.get_regs().ok().map(|r| r.rip);
        let err = match failure {
            Ok(mut reason) => {
                let run = vcpu.get_kvm_run();
                let exit_reason = run.exit_reason;
                if exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
                    // SAFETY: exit_reason says the kernel filled the `internal` union member.
                    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                    reason.push_str(&format!(" (suberror {suberror})"));
                }
                RefVmError::UnexpectedExit {
                    vcpu: index,
                    exit_reason,
                    reason,
                    rip,
                }
            }
            Err(source) => RefVmError::RunFailed {
                vcpu: index,
                rip,
                source,
            },
        };
        settle(index, vcpu);
        return Err(err);
    }
}

/// Lets KVM finish whatever it left pending for userspace at the refused exit (e.g. the rest of
/// an emulated MMIO read, which would otherwise complete with stale state on the next `KVM_RUN`
/// and override the next task's registers) without entering the guest: one `KVM_RUN` with
/// `immediate_exit` set, which KVM answers with `EINTR`.
fn settle(index: usize, vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    let outcome = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => None,
        Err(e) => Some(e.to_string()),
        Ok(exit) => Some(format!("{exit:?}")),
    };
    vcpu.set_kvm_immediate_exit(0);
    if let Some(outcome) = outcome {
        tracing::debug!(vcpu = index, %outcome, "refvmm: settling KVM_RUN did not return EINTR");
    }
}

fn describe_exit(exit: &VcpuExit<'_>) -> String {
    match exit {
        VcpuExit::IoOut(guest::BAD_SELECTOR_PORT, _) => {
            "the guest rejected its workload selector (out on port 0x11)".to_string()
        }
        VcpuExit::IoOut(port, data) => format!("IO out of {} bytes on port {port:#x}", data.len()),
        VcpuExit::IoIn(port, data) => format!("IO in of {} bytes on port {port:#x}", data.len()),
        VcpuExit::MmioRead(gpa, data) => {
            format!(
                "MMIO read of {} bytes at GPA {gpa:#x} (no memslot there)",
                data.len()
            )
        }
        VcpuExit::MmioWrite(gpa, data) => {
            format!(
                "MMIO write of {} bytes at GPA {gpa:#x} (no memslot there)",
                data.len()
            )
        }
        VcpuExit::Hlt => "HLT".to_string(),
        VcpuExit::Shutdown => "shutdown (triple fault)".to_string(),
        VcpuExit::FailEntry(reason, cpu) => {
            format!("entry failure (hardware reason {reason:#x}, host CPU {cpu})")
        }
        VcpuExit::InternalError => "KVM internal error".to_string(),
        VcpuExit::Exception => "exception".to_string(),
        VcpuExit::MemoryFault { flags, gpa, size } => {
            format!("memory fault at GPA {gpa:#x} size {size:#x} flags {flags:#x}")
        }
        VcpuExit::SystemEvent(kind, _) => format!("system event of type {kind}"),
        VcpuExit::Unsupported(reason) => format!("exit reason {reason} unknown to kvm-ioctls"),
        other => format!("{other:?}"),
    }
}
