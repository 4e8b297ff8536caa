//! `vmpager demo --update-at PCT`: a VMM live update in the middle of the guest's run.
//!
//! The first VMM runs the guest until PCT % of the guest's pages have been installed, stops its
//! vCPUs wherever they are ([`Pause`]), saves their registers and where each is in its work
//! ([`UpdateState`]), releases the VM (`ReleaseVm`: the daemon keeps memory, page state and
//! mailbox) and unmaps it. A new VMM process reads the state, takes the VM over by id and token
//! (`ReattachVm`), maps the same memfds, registers them on its own uffd, creates a new KVM VM
//! whose vCPUs get the saved registers back, and lets the guest finish; every checksum is then
//! compared with the snapshot, and the guest's writes with the memfds.

use super::{finish_guest, guest_regions, read_plans, DemoError, ScenarioConfig, ScenarioReport};
use crate::client::Client;
use crate::refvmm::{Pause, RefVm, Run, VcpuState};
use crate::VmMemory;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vmpager_protocol::{PopulateMethod, PAGE_SIZE};

/// What the first VMM hands its successor (a JSON file).
#[derive(Debug)]
pub struct UpdateState {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// The snapshot image (to check the guest against).
    pub image: PathBuf,
    /// The VM and its secret.
    pub vm_id: u64,
    /// The VM's token.
    pub token: u64,
    /// The scenario.
    pub cfg: ScenarioConfig,
    /// Percent of the pages installed when the vCPUs were stopped.
    pub at_percent: u32,
    /// Each vCPU's state, as [`VcpuState::to_json`] wrote it.
    pub vcpus: Vec<serde_json::Value>,
}

impl UpdateState {
    fn to_json(&self) -> serde_json::Value {
        let c = &self.cfg;
        serde_json::json!({
            "socket": self.socket,
            "image": self.image,
            "vm_id": self.vm_id,
            "token": self.token,
            "at_percent": self.at_percent,
            "cfg": {
                "memory": c.memory,
                "vcpus": c.vcpus,
                "populate": c.populate as u32,
                "write_pattern": c.write_pattern,
                "touch_percent": c.touch_percent,
            },
            "vcpus": self.vcpus,
        })
    }

    /// Writes the state to `path` (atomically: a temporary file renamed).
    pub fn save(&self, path: &Path) -> Result<(), DemoError> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.to_json().to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| DemoError::Io(format!("cannot write {}", path.display()), e))
    }

    /// Reads a state [`UpdateState::save`] wrote.
    pub fn load(path: &Path) -> Result<UpdateState, DemoError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| DemoError::Io(format!("cannot read {}", path.display()), e))?;
        let bad = || DemoError::Config(format!("{} is not a VMM update state", path.display()));
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|_| bad())?;
        let u = |k: &str| v.get(k).and_then(|x| x.as_u64()).ok_or_else(bad);
        let c = v.get("cfg").ok_or_else(bad)?;
        let cu = |k: &str| c.get(k).and_then(|x| x.as_u64()).ok_or_else(bad);
        let populate = match cu("populate")? {
            1 => PopulateMethod::Copy,
            2 => PopulateMethod::Continue,
            _ => PopulateMethod::Default,
        };
        let cfg = ScenarioConfig {
            memory: cu("memory")?,
            vcpus: cu("vcpus")? as usize,
            populate,
            write_pattern: c
                .get("write_pattern")
                .and_then(|x| x.as_bool())
                .ok_or_else(bad)?,
            touch_percent: cu("touch_percent")? as u32,
            record_working_set: false,
        };
        let path_of = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .map(PathBuf::from)
                .ok_or_else(bad)
        };
        Ok(UpdateState {
            socket: path_of("socket")?,
            image: path_of("image")?,
            vm_id: u("vm_id")?,
            token: u("token")?,
            cfg,
            at_percent: u("at_percent")? as u32,
            vcpus: v
                .get("vcpus")
                .and_then(|x| x.as_array())
                .cloned()
                .ok_or_else(bad)?,
        })
    }
}

/// How the first VMM's run ended.
#[derive(Debug)]
pub enum FirstRun {
    /// The guest finished before the update point.
    Finished(ScenarioReport),
    /// The vCPUs were stopped and the VM released: hand this to a new VMM process.
    Paused(UpdateState),
}

/// The first VMM: runs the guest on `memory` until `percent` % of its pages are installed,
/// stops the vCPUs, releases the VM and unmaps it.
pub fn run_until_update(
    client: &Client,
    memory: VmMemory,
    image: (&File, &Path),
    socket: &Path,
    cfg: &ScenarioConfig,
    percent: u32,
) -> Result<FirstRun, DemoError> {
    let regions = guest_regions(&memory);
    // SAFETY: the regions are mapped by `memory`, which outlives `vm` (dropped below first).
    let vm = unsafe { RefVm::new(&regions, cfg.vcpus)? };
    let plans = read_plans(&regions, cfg)?;
    let pause = Arc::new(Pause::new());
    let total_pages = cfg.memory / PAGE_SIZE;
    let target = total_pages * u64::from(percent) / 100;
    let stop_watching = Arc::new(AtomicBool::new(false));
    let vm_id = memory.vm_id();
    let outcome = std::thread::scope(|s| {
        let (p, stop) = (pause.clone(), stop_watching.clone());
        let watcher = s.spawn(move || -> Result<u32, DemoError> {
            // Watch the daemon's counters; stop the vCPUs at the update point.
            while !stop.load(Ordering::Acquire) {
                let st = client.stats(vm_id)?;
                let installed = st.pages_from_source + st.pages_zero;
                if installed >= target {
                    p.request();
                    return Ok((installed * 100 / total_pages.max(1)) as u32);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(100)
        });
        let run = vm.run_pausable(&plans, &pause);
        stop_watching.store(true, Ordering::Release);
        let at = watcher.join().unwrap_or(Ok(100));
        (run, at)
    });
    let (run, at) = outcome;
    let at = at?;
    match run? {
        Run::Done(reports) => {
            let report = finish_guest(client, &memory, &vm, Some(image.0), cfg, &plans, &reports)?;
            Ok(FirstRun::Finished(report))
        }
        Run::Paused(states) => {
            let state = UpdateState {
                socket: socket.to_owned(),
                image: image.1.to_owned(),
                vm_id,
                token: memory.token(),
                cfg: cfg.clone(),
                at_percent: at,
                vcpus: states.iter().map(VcpuState::to_json).collect(),
            };
            drop(vm);
            client.release(vm_id)?;
            drop(memory);
            Ok(FirstRun::Paused(state))
        }
    }
}

/// The new VMM: takes the VM over, gives each new vCPU its saved state and lets the guest
/// finish; checks every byte.
pub fn resume_after_update(state: &UpdateState) -> Result<(Client, ScenarioReport), DemoError> {
    let client = Client::connect(&state.socket)?;
    let (memory, _exits) = client.reattach_mapped(state.vm_id, state.token)?;
    let image = File::open(&state.image)
        .map_err(|e| DemoError::Io(format!("cannot open {}", state.image.display()), e))?;
    let regions = guest_regions(&memory);
    // SAFETY: the regions are mapped by `memory`, which outlives `vm` (dropped at the end).
    let vm = unsafe { RefVm::new(&regions, state.cfg.vcpus)? };
    let base = vm.vcpu_sregs()?;
    let states = state
        .vcpus
        .iter()
        .map(|v| VcpuState::from_json(v, &base))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| DemoError::Config("a vCPU state of the update is malformed".into()))?;
    let plans = read_plans(&regions, &state.cfg)?;
    let reports = vm.resume(&plans, &states)?;
    let report = finish_guest(
        &client,
        &memory,
        &vm,
        Some(&image),
        &state.cfg,
        &plans,
        &reports,
    )?;
    drop(vm);
    client.detach(state.vm_id)?;
    Ok((client, report))
}
