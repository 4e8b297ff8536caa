//! Running plans on the vCPU threads: all at once ([`RefVm::run`]), stoppable for a VMM update
//! ([`RefVm::run_pausable`]), and continued from saved vCPU states ([`RefVm::resume`]).

use super::pause::{Pause, VcpuState};
use super::plan::check_task;
use super::vcpu::{run_plan, Gate, PlanOutcome};
use super::{RefVm, RefVmError, Task, VcpuReport};
use std::sync::{Barrier, PoisonError};
use std::thread;

/// How a pausable run ended.
#[derive(Debug)]
pub enum Run {
    /// Every plan ran to its end.
    Done(Vec<VcpuReport>),
    /// Stopped on request: each vCPU's state, to [`RefVm::resume`] from.
    Paused(Vec<VcpuState>),
}

impl RefVm {
    /// Runs `plans[i]` on vCPU `i`, each vCPU on its own thread, all released together by a
    /// barrier before their first `KVM_RUN`. Returns one report per plan. Every task is checked
    /// before any thread starts. On a guest or KVM failure the failing vCPU stops its plan, the
    /// other vCPUs still finish theirs, and the error of the lowest-numbered failing vCPU is
    /// returned. The failing vCPU's pending exit is settled first (see `settle`), so later runs
    /// start from clean registers; a guest that triple-faulted may still need a new `RefVm`.
    pub fn run(&self, plans: &[Vec<Task>]) -> Result<Vec<VcpuReport>, RefVmError> {
        let outcomes = self.run_threads(plans, &[], None)?;
        Ok(outcomes.into_iter().map(|o| o.report).collect())
    }

    /// As [`RefVm::run`], but [`Pause::request`] stops every vCPU wherever it is (out of
    /// `KVM_RUN` at an instruction boundary) and the run returns their states instead.
    pub fn run_pausable(&self, plans: &[Vec<Task>], pause: &Pause) -> Result<Run, RefVmError> {
        let outcomes = self.run_threads(plans, &[], Some(pause))?;
        Ok(match pause.requested() {
            true => Run::Paused(
                outcomes
                    .into_iter()
                    .zip(plans)
                    .map(|(o, plan)| {
                        o.paused
                            .unwrap_or_else(|| VcpuState::finished(o.report, plan.len()))
                    })
                    .collect(),
            ),
            false => Run::Done(outcomes.into_iter().map(|o| o.report).collect()),
        })
    }

    /// Continues `plans` from `states` (one per plan, saved by [`RefVm::run_pausable`], perhaps
    /// in another process): each vCPU gets its saved registers back and goes on with the task it
    /// was in, then the rest. The reports hold every task's result, the earlier ones included.
    pub fn resume(
        &self,
        plans: &[Vec<Task>],
        states: &[VcpuState],
    ) -> Result<Vec<VcpuReport>, RefVmError> {
        if states.len() != plans.len() {
            return Err(RefVmError::TooManyPlans {
                plans: states.len(),
                vcpus: plans.len(),
            });
        }
        let outcomes = self.run_threads(plans, states, None)?;
        Ok(outcomes.into_iter().map(|o| o.report).collect())
    }

    fn run_threads(
        &self,
        plans: &[Vec<Task>],
        starts: &[VcpuState],
        pause: Option<&Pause>,
    ) -> Result<Vec<PlanOutcome>, RefVmError> {
        let mut vcpus = self.vcpus.lock().unwrap_or_else(PoisonError::into_inner);
        if plans.len() > vcpus.len() {
            return Err(RefVmError::TooManyPlans {
                plans: plans.len(),
                vcpus: vcpus.len(),
            });
        }
        for (v, plan) in plans.iter().enumerate() {
            for (t, task) in plan.iter().enumerate() {
                check_task(&self.spans, v, t, task)?;
            }
        }
        if plans.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(p) = pause {
            p.expect(plans.len());
        }
        let gate = &Gate::default();
        let barrier = &Barrier::new(plans.len());
        thread::scope(|s| {
            let mut handles = Vec::with_capacity(plans.len());
            let mut first_err = None;
            for (i, (vcpu, plan)) in vcpus.iter_mut().zip(plans).enumerate() {
                let start = starts.get(i);
                let spawned = thread::Builder::new()
                    .name(format!("refvmm-vcpu{i}"))
                    .spawn_scoped(s, move || {
                        run_plan(i, vcpu, plan, start, pause, gate, barrier)
                    });
                match spawned {
                    Ok(h) => handles.push(h),
                    Err(source) => {
                        first_err = Some(RefVmError::ThreadSpawn { vcpu: i, source });
                        break;
                    }
                }
            }
            // Started threads wait on the gate, so a failed spawn cannot leave them stuck on the
            // barrier: they are told to quit instead.
            gate.open(first_err.is_none());
            let mut outcomes = Vec::with_capacity(handles.len());
            for (i, h) in handles.into_iter().enumerate() {
                match h.join() {
                    Ok(Ok(o)) => outcomes.push(o),
                    Ok(Err(e)) => {
                        first_err.get_or_insert(e);
                    }
                    Err(_) => {
                        first_err.get_or_insert(RefVmError::ThreadPanicked { vcpu: i });
                    }
                }
            }
            match first_err {
                Some(e) => Err(e),
                None => Ok(outcomes),
            }
        })
    }
}
