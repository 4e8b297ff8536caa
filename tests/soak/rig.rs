//! The soak rig: vmpagerd run the way a supervisor runs it (the same command line again after
//! each death; readiness and the number of VMs it holds through `NOTIFY_SOCKET`), VMM processes
//! (`vmpager soak-vmm`) in slots, one VM at a time per slot, and the SIGKILLs.
//!
//! What may be killed when: a VM lives in the memfds that the daemon and its VMM hold, so one
//! of them must survive each kill.
//! * A VMM may be killed while the current daemon holds its VM: before the VMM says `up`
//!   (creating or taking the VM over: the VM is in the current daemon, or nowhere yet) or once
//!   it said `up PID` of the current daemon (after a restart: once it handed its VM back).
//! * The daemon may be killed while every VMM holds its VM's fds (it said `up` at least once):
//!   not while a successor is taking a VM over, when the VM lives in the daemon only.

use super::plumbing::{
    field, read_notifications, sigkill, splitmix, vms_in_status, wait_exit, Event,
};
use super::procfs::{stacks, tail, Footprint};
use crate::common::{vmpager_binary, vmpagerd_binary};
use std::fmt::Write as _;
use std::io::BufRead;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// Longer than anything that must happen takes: a hang detector, never a timing expectation.
pub const HANG: Duration = Duration::from_secs(120);

/// The soak's size.
#[derive(Debug, Clone)]
pub struct Knobs {
    /// VMs alive at once (one VMM process each).
    pub slots: usize,
    /// Pages of each VM (4 KiB), over two regions.
    pub pages: usize,
    /// Guest threads per VMM.
    pub threads: usize,
    /// `vmpagerd --vm-grace`.
    pub grace_secs: u64,
    /// Longest pause between two kills (each pause is uniformly random below it).
    pub max_gap: Duration,
    /// Percent of the kills aimed at the daemon (when daemon kills are on).
    pub daemon_share: u64,
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    pub daemon_kills: u64,
    /// VMMs killed before they said their VM was held (creating it, or taking it over).
    pub vmm_kills_starting: u64,
    /// VMMs killed while their guest ran (or while they verified, detached).
    pub vmm_kills_running: u64,
    /// VMs run to the end: every byte verified by their last VMM.
    pub vms: u64,
    pub vmm_processes: u64,
    /// VMM processes started to take over a VM after a kill.
    pub successors: u64,
    /// Bytes of guest memory read and checked by VMMs that finished.
    pub bytes_verified: u64,
    /// Daemon restarts the VMMs that finished rode through (their `Client::restarts`).
    pub rides: u64,
    /// Most kills (of its VMMs or the daemon) one VM lived through.
    pub max_kills_one_vm: u64,
}

impl Figures {
    pub fn kills(&self) -> u64 {
        self.daemon_kills + self.vmm_kills_starting + self.vmm_kills_running
    }
}

struct Daemon {
    child: Child,
    pid: u32,
}

struct Vmm {
    child: Child,
    pid: u32,
    gen: u64,
    /// The daemon it last said holds its VM.
    up: Option<u32>,
    stderr: PathBuf,
    done: bool,
}

#[derive(Default)]
struct Slot {
    /// VMs this slot ran.
    vm: u64,
    /// VMM processes this slot started (tags their events).
    gen: u64,
    /// Kills the current VM lived through.
    kills: u64,
    dir: PathBuf,
    /// Seed of the marks of the current VM.
    seed: u64,
    /// Seed of the slot's snapshot image, which its VMs share (one runs at a time).
    image_seed: u64,
    populate: &'static str,
    vmm: Option<Vmm>,
}

enum Target {
    Daemon,
    Vmm(usize),
}

pub struct Rig {
    root: PathBuf,
    socket: PathBuf,
    notify_path: PathBuf,
    notify: OwnedFd,
    knobs: Knobs,
    seed: u64,
    rng: u64,
    started: Instant,
    daemon: Option<Daemon>,
    /// VMs the current daemon said it holds (-1: not said yet).
    vms_alive: i64,
    slots: Vec<Slot>,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    /// Start a new VM in a slot whose VM finished.
    starting: bool,
    /// The last kill.
    last_kill: Instant,
    /// The next kill is the daemon's, as soon as it may be killed.
    daemon_next: bool,
    pub figures: Figures,
    /// What was killed when, to reproduce a failure.
    log: Vec<String>,
}

impl Rig {
    pub fn new(root: &Path, knobs: Knobs, seed: u64) -> Rig {
        let (tx, rx) = channel();
        let notify_path = root.join("notify.sock");
        let socket = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::DGRAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .expect("notify socket");
        rustix::net::bind(
            &socket,
            &rustix::net::SocketAddrUnix::new(&notify_path).expect("notify path"),
        )
        .expect("bind the notify socket");
        rustix::net::sockopt::set_socket_passcred(&socket, true).expect("SO_PASSCRED");
        let reader = socket.try_clone().expect("dup");
        let tx2 = tx.clone();
        std::thread::spawn(move || read_notifications(reader, tx2));
        std::fs::create_dir_all(root.join("logs")).expect("logs dir");
        Rig {
            root: root.to_owned(),
            socket: root.join("vmpagerd.sock"),
            notify_path,
            notify: socket,
            knobs,
            seed,
            rng: seed,
            started: Instant::now(),
            daemon: None,
            vms_alive: -1,
            slots: Vec::new(),
            tx,
            rx,
            starting: false,
            last_kill: Instant::now(),
            daemon_next: false,
            figures: Figures::default(),
            log: Vec::new(),
        }
    }

    fn rand(&mut self) -> u64 {
        splitmix(&mut self.rng)
    }

    fn note(&mut self, what: String) {
        let line = format!("{:9.3}s {what}", self.started.elapsed().as_secs_f64());
        self.log.push(line);
    }

    pub fn daemon_pid(&self) -> u32 {
        self.daemon.as_ref().map_or(0, |d| d.pid)
    }

    /// The current daemon's fds, threads and memory.
    pub fn footprint(&self) -> Footprint {
        Footprint::of(self.daemon_pid())
    }

    /// `vmpagerd --socket-path S --vm-grace G`, the same command line every time, and its
    /// `READY=1`.
    pub fn start_daemon(&mut self) {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("vmpagerd.err"))
            .expect("daemon log");
        let child = Command::new(vmpagerd_binary())
            .arg("--socket-path")
            .arg(&self.socket)
            .arg("--vm-grace")
            .arg(self.knobs.grace_secs.to_string())
            .env("NOTIFY_SOCKET", &self.notify_path)
            .env("VMPAGER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start vmpagerd");
        let pid = child.id();
        self.daemon = Some(Daemon { child, pid });
        self.vms_alive = -1;
        let deadline = Instant::now() + HANG;
        loop {
            match self.rx.recv_timeout(Duration::from_secs(1)) {
                Ok(Event::Notify { pid: p, text }) if p == pid => {
                    self.status(&text);
                    if text.lines().any(|l| l == "READY=1") {
                        self.note(format!("vmpagerd {pid} ready"));
                        return;
                    }
                }
                Ok(ev) => self.handle(ev),
                Err(_) => {
                    let exited = self
                        .daemon
                        .as_mut()
                        .and_then(|d| d.child.try_wait().ok().flatten());
                    if let Some(status) = exited {
                        self.fail(&format!("vmpagerd exited before it was ready: {status}"));
                    }
                    if Instant::now() > deadline {
                        self.hang("vmpagerd never said READY=1");
                    }
                }
            }
        }
    }

    fn status(&mut self, text: &str) {
        if let Some(n) = vms_in_status(text) {
            self.vms_alive = n;
        }
    }

    /// Waits until the current daemon holds no VM (each was detached, or expired after the
    /// grace period). Every VMM has exited by then (after its daemon closed its connection:
    /// `Client::disconnect`), and the daemon says its VM count after each change.
    pub fn wait_no_vms(&mut self) {
        let deadline = Instant::now() + HANG + Duration::from_secs(self.knobs.grace_secs);
        while self.vms_alive != 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(ev) => self.handle(ev),
                Err(_) => self.hang(&format!(
                    "vmpagerd still holds {} VMs with no VMM left",
                    self.vms_alive
                )),
            }
        }
    }

    /// Runs a VM in every slot and `kills` SIGKILLs at random moments (the daemon's among them
    /// if `daemon_kills`), starting a new VM wherever one finishes while kills remain; then
    /// lets every VM finish.
    pub fn run(&mut self, kills: u64, daemon_kills: bool) {
        self.starting = true;
        while self.slots.len() < self.knobs.slots {
            let image_seed = self.rand();
            self.slots.push(Slot {
                image_seed,
                ..Slot::default()
            });
        }
        for s in 0..self.slots.len() {
            if self.slots[s].vmm.is_none() {
                self.new_vm(s);
            }
        }
        let mut done = 0;
        self.last_kill = Instant::now();
        while done < kills {
            let gap = self.rand() % (self.knobs.max_gap.as_micros() as u64).max(1);
            self.pump(Instant::now() + Duration::from_micros(gap));
            let killed = match self.pick(daemon_kills) {
                Some(Target::Daemon) => {
                    self.kill_daemon();
                    true
                }
                Some(Target::Vmm(s)) => self.kill_vmm(s),
                None => false,
            };
            if killed {
                done += 1;
                self.last_kill = Instant::now();
            } else if self.last_kill.elapsed() > HANG {
                self.hang("nothing could be killed safely: VMMs never said their VM is held");
            }
        }
        self.starting = false;
        let deadline = Instant::now() + HANG;
        while self.slots.iter().any(|s| s.vmm.is_some()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(ev) => self.handle(ev),
                Err(_) => self.hang("VMMs did not finish their VMs"),
            }
        }
    }

    /// Handles events until `until`.
    fn pump(&mut self, until: Instant) {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(ev) => self.handle(ev),
                Err(RecvTimeoutError::Timeout) => return,
                Err(RecvTimeoutError::Disconnected) => unreachable!("the rig holds a sender"),
            }
            if left.is_zero() {
                return;
            }
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Notify { pid, text } => {
                if pid == self.daemon_pid() {
                    self.status(&text);
                }
            }
            Event::Line { slot, gen, line } => {
                if line.starts_with("done ") {
                    self.figures.bytes_verified += field(&line, "bytes_verified");
                    self.figures.rides += field(&line, "restarts");
                }
                let Some(v) = self.slots[slot].vmm.as_mut().filter(|v| v.gen == gen) else {
                    return; // A VMM killed since.
                };
                if let Some(pid) = line.strip_prefix("up ").and_then(|p| p.parse().ok()) {
                    v.up = Some(pid);
                } else if line.starts_with("done ") {
                    v.done = true;
                }
            }
            Event::Eof { slot, gen } => {
                if self.slots[slot].vmm.as_ref().is_some_and(|v| v.gen == gen) {
                    let mut v = self.slots[slot].vmm.take().expect("checked");
                    let status = match wait_exit(&mut v.child) {
                        Some(s) => s,
                        None => {
                            self.slots[slot].vmm = Some(v);
                            self.hang("a VMM closed its stdout but did not exit");
                        }
                    };
                    if !status.success() || !v.done {
                        self.fail_vmm(slot, &v, status);
                    }
                    self.finished(slot);
                }
            }
        }
    }

    fn pick(&mut self, daemon_kills: bool) -> Option<Target> {
        let current = self.daemon_pid();
        let vmms: Vec<usize> = (0..self.slots.len())
            .filter(|&s| {
                self.slots[s]
                    .vmm
                    .as_ref()
                    .is_some_and(|v| v.up.is_none() || v.up == Some(current))
            })
            .collect();
        let daemon = daemon_kills
            && self
                .slots
                .iter()
                .all(|s| s.vmm.as_ref().is_none_or(|v| v.up.is_some()));
        // Once the daemon is drawn, it is the next one killed (when it may be): drawing
        // again would make daemon kills rarer the more often a VMM is taking its VM over.
        self.daemon_next |= daemon_kills && self.rand() % 100 < self.knobs.daemon_share;
        match self.daemon_next {
            true if daemon => {
                self.daemon_next = false;
                Some(Target::Daemon)
            }
            false if !vmms.is_empty() => {
                let i = (self.rand() % vmms.len() as u64) as usize;
                Some(Target::Vmm(vmms[i]))
            }
            _ => None,
        }
    }

    fn kill_daemon(&mut self) {
        let mut d = self.daemon.take().expect("a daemon runs");
        sigkill(d.pid);
        if wait_exit(&mut d.child).is_none() {
            self.daemon = Some(d);
            self.hang("vmpagerd did not die of SIGKILL");
        }
        self.figures.daemon_kills += 1;
        for s in &mut self.slots {
            if s.vmm.is_some() {
                s.kills += 1;
            }
        }
        self.note(format!("kill vmpagerd {}", d.pid));
        self.start_daemon();
    }

    /// Kills slot `s`'s VMM and starts its successor; false if it had finished already.
    fn kill_vmm(&mut self, s: usize) -> bool {
        let mut v = self.slots[s].vmm.take().expect("picked");
        sigkill(v.pid);
        let Some(status) = wait_exit(&mut v.child) else {
            self.slots[s].vmm = Some(v);
            self.hang("a VMM did not die of SIGKILL");
        };
        if status.success() {
            // It finished just before.
            self.finished(s);
            return false;
        }
        if status.signal() != Some(libc::SIGKILL) {
            self.fail_vmm(s, &v, status);
        }
        let running = v.up.is_some();
        match running {
            true => self.figures.vmm_kills_running += 1,
            false => self.figures.vmm_kills_starting += 1,
        }
        let slot = &mut self.slots[s];
        slot.kills += 1;
        let what = format!(
            "kill vmm {} (slot {s}, vm {}, {})",
            v.pid,
            slot.vm,
            if running { "running" } else { "starting" }
        );
        self.note(what);
        self.figures.successors += 1;
        self.spawn_vmm(s);
        true
    }

    /// Slot `s`'s VM finished: a new one if kills remain.
    fn finished(&mut self, s: usize) {
        self.figures.vms += 1;
        let slot = &mut self.slots[s];
        self.figures.max_kills_one_vm = self.figures.max_kills_one_vm.max(slot.kills);
        let _ = std::fs::remove_dir_all(&slot.dir);
        let what = format!(
            "vm {} of slot {s} finished after {} kills",
            slot.vm, slot.kills
        );
        self.note(what);
        if self.starting {
            self.new_vm(s);
        }
    }

    fn new_vm(&mut self, s: usize) {
        let seed = self.rand();
        let populate = if self.rand() & 1 == 0 {
            "copy"
        } else {
            "continue"
        };
        let slot = &mut self.slots[s];
        slot.vm += 1;
        slot.kills = 0;
        slot.dir = self.root.join(format!("slot{s}-vm{}", slot.vm));
        slot.seed = seed;
        slot.populate = populate;
        self.spawn_vmm(s);
    }

    fn spawn_vmm(&mut self, s: usize) {
        let slot = &mut self.slots[s];
        slot.gen += 1;
        let gen = slot.gen;
        let stderr = self
            .root
            .join(format!("logs/slot{s}-vm{}-vmm{gen}.err", slot.vm));
        let mut child = Command::new(vmpager_binary())
            .arg("soak-vmm")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&slot.dir)
            .args(["--seed", &slot.seed.to_string()])
            .arg("--image")
            .arg(self.root.join(format!("slot{s}.img")))
            .args(["--image-seed", &slot.image_seed.to_string()])
            .args(["--pages", &self.knobs.pages.to_string()])
            .args(["--threads", &self.knobs.threads.to_string()])
            .args(["--populate", slot.populate])
            .env("VMPAGER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("vmm log"))
            .spawn()
            .expect("start vmpager soak-vmm");
        let out = child.stdout.take().expect("piped");
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(Event::Line { slot: s, gen, line }).is_err() {
                    return;
                }
            }
            let _ = tx.send(Event::Eof { slot: s, gen });
        });
        slot.vmm = Some(Vmm {
            pid: child.id(),
            child,
            gen,
            up: None,
            stderr,
            done: false,
        });
        self.figures.vmm_processes += 1;
    }

    fn recent(&self) -> String {
        let from = self.log.len().saturating_sub(40);
        self.log[from..].join("\n")
    }

    fn fail_vmm(&self, s: usize, v: &Vmm, status: ExitStatus) -> ! {
        let slot = &self.slots[s];
        self.fail(&format!(
            "the VMM of slot {s} (vm {}, seed {}, image seed {}, populate {}) exited with {status}{}; its stderr:\n{}",
            slot.vm,
            slot.seed,
            slot.image_seed,
            slot.populate,
            if v.done { "" } else { " without finishing" },
            tail(&v.stderr, 60)
        ))
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "soak failed (VMPAGER_SOAK_SEED={}): {what}\nvmpagerd's stderr:\n{}\nlast events:\n{}",
            self.seed,
            tail(&self.root.join("vmpagerd.err"), 30),
            self.recent()
        )
    }

    fn hang(&self, what: &str) -> ! {
        let mut where_ = String::new();
        if let Some(d) = &self.daemon {
            where_.push_str(&stacks(d.pid, "vmpagerd"));
        }
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(v) = &s.vmm {
                let _ = write!(where_, "{}", stacks(v.pid, &format!("VMM of slot {i}")));
            }
        }
        self.fail(&format!("hang: {what}\n{where_}"))
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for s in &mut self.slots {
            if let Some(mut v) = s.vmm.take() {
                sigkill(v.pid);
                let _ = v.child.wait();
            }
        }
        if let Some(mut d) = self.daemon.take() {
            sigkill(d.pid);
            let _ = d.child.wait();
        }
        let _ = rustix::net::shutdown(self.notify.as_fd(), rustix::net::Shutdown::Both);
    }
}
