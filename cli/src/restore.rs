//! What the restore front ends (`firecracker-handler`, `ch-restore`) share: the vmpagerd they
//! hand VMs to (a running one with `--daemon S`, or one started inside this process), the
//! working set they record or replay, and the events they print (one JSON object per line on
//! stdout, for supervisors and tests; logs go to stderr).

use anyhow::Context;
use rustix::event::{PollFd, PollFlags};
use std::fs::File;
use std::io::Write;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use vmpager_client::working_set::{SnapshotId, WorkingSet};
use vmpager_client::{Client, Stats};

/// The vmpagerd serving the restored VMs.
pub enum Daemon {
    /// A running daemon (`--daemon S`).
    External(PathBuf),
    /// A daemon on threads of this process, on a private socket.
    InProcess {
        /// Stops the daemon when dropped.
        _handle: vmpagerd::DaemonHandle,
        /// Its socket.
        socket: PathBuf,
        /// The private directory holding the socket (removed on drop).
        dir: PathBuf,
    },
}

impl Daemon {
    /// Uses the daemon at `external`, or starts one in this process with the default settings
    /// of `vmpagerd`.
    pub fn start(external: Option<PathBuf>) -> anyhow::Result<Daemon> {
        if let Some(path) = external {
            return Ok(Daemon::External(path));
        }
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("vmpager-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let socket = dir.join("vmpagerd.sock");
        let handle = vmpagerd::spawn(vmpagerd::Config::default(), &socket)
            .context("cannot start the in-process vmpagerd")?;
        Ok(Daemon::InProcess {
            _handle: handle,
            socket,
            dir,
        })
    }

    /// Where to connect.
    pub fn socket(&self) -> &Path {
        match self {
            Daemon::External(p) => p,
            Daemon::InProcess { socket, .. } => socket,
        }
    }

    /// A new connection to it.
    pub fn connect(&self) -> anyhow::Result<Client> {
        Client::connect_with(self.socket(), client_options()?)
            .with_context(|| format!("cannot reach vmpagerd at {}", self.socket().display()))
    }

    /// "vmpagerd at S" or "the in-process vmpagerd".
    pub fn describe(&self) -> String {
        match self {
            Daemon::External(p) => format!("vmpagerd at {}", p.display()),
            Daemon::InProcess { .. } => "the in-process vmpagerd".into(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Daemon::InProcess { dir, .. } = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The working set a restore records (`--record-working-set FILE`) and/or replays
/// (`--working-set FILE`).
pub struct WorkingSets {
    snapshot: Option<SnapshotId>,
    record: Option<PathBuf>,
    replay: Option<Vec<u64>>,
}

impl WorkingSets {
    /// Refuses paths that can never work, before anything else is done: a working set to
    /// replay that cannot be opened, one to record in a directory that does not exist.
    pub fn check_paths(record: Option<&Path>, replay: Option<&Path>) -> anyhow::Result<()> {
        if let Some(path) = replay {
            File::open(path)
                .with_context(|| format!("--working-set: cannot open {}", path.display()))?;
        }
        if let Some(path) = record {
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            if !parent.is_dir() {
                anyhow::bail!(
                    "--record-working-set {}: {} is not a directory",
                    path.display(),
                    parent.display()
                );
            }
        }
        Ok(())
    }

    /// Names the snapshot (if a working set is involved) and loads the one to replay, refusing
    /// one recorded from another snapshot.
    pub fn open(
        record: Option<PathBuf>,
        replay: Option<PathBuf>,
        snapshot: &File,
    ) -> anyhow::Result<WorkingSets> {
        Self::check_paths(record.as_deref(), replay.as_deref())?;
        if record.is_none() && replay.is_none() {
            return Ok(WorkingSets {
                snapshot: None,
                record,
                replay: None,
            });
        }
        let id = SnapshotId::of_file(snapshot).context("cannot hash the snapshot")?;
        let replay = match replay {
            Some(path) => Some(
                WorkingSet::load_for(&path, &id)
                    .with_context(|| format!("cannot replay {}", path.display()))?
                    .pages(),
            ),
            None => None,
        };
        Ok(WorkingSets {
            snapshot: Some(id),
            record,
            replay,
        })
    }

    /// Whether VMs are created to record.
    pub fn recording(&self) -> bool {
        self.record.is_some()
    }

    /// Queues the working set to replay into `vm_id`, if any; returns the pages queued.
    pub fn start(&self, client: &Client, vm_id: u64) -> anyhow::Result<usize> {
        match &self.replay {
            Some(pages) => {
                client
                    .replay_working_set(vm_id, pages)
                    .context("cannot queue the working set")?;
                Ok(pages.len())
            }
            None => Ok(0),
        }
    }

    /// Saves `vm_id`'s recorded working set, if recording; returns its pages.
    pub fn finish(&self, client: &Client, vm_id: u64) -> anyhow::Result<Option<usize>> {
        let (Some(path), Some(id)) = (&self.record, self.snapshot) else {
            return Ok(None);
        };
        let entries = client
            .working_set(vm_id)
            .context("cannot fetch the recorded working set")?;
        let ws = WorkingSet::from_recording(id, &entries);
        ws.save(path)
            .with_context(|| format!("cannot save {}", path.display()))?;
        Ok(Some(ws.entries.len()))
    }
}

/// Prints one event as a line of JSON on stdout: `{"event": kind, ...fields}`.
pub fn event(kind: &str, fields: serde_json::Value) {
    let mut obj = serde_json::Map::new();
    obj.insert("event".into(), kind.into());
    if let serde_json::Value::Object(m) = fields {
        obj.extend(m);
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::Value::Object(obj));
    let _ = out.flush();
}

/// A VM's counters as a JSON object (the `Stats` field names).
pub fn stats_json(s: &Stats) -> serde_json::Value {
    s.fields()
        .iter()
        .map(|&(k, v)| (k.to_string(), serde_json::Value::from(v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// How the tool's clients ride through a daemon restart: `VMPAGER_RESTART_DEADLINE` (seconds)
/// is how long they wait for a restarted vmpagerd to take their VMs back (default 30).
pub fn client_options() -> anyhow::Result<vmpager_client::ClientOptions> {
    let mut o = vmpager_client::ClientOptions::default();
    if let Some(v) = std::env::var_os("VMPAGER_RESTART_DEADLINE") {
        let secs: f64 = v
            .to_str()
            .and_then(|s| s.parse().ok())
            .filter(|s: &f64| s.is_finite() && *s >= 0.0)
            .context("VMPAGER_RESTART_DEADLINE must be a number of seconds")?;
        o.restart_deadline = std::time::Duration::from_secs_f64(secs);
    }
    Ok(o)
}

/// Waits until `peer` (a VMM's socket that is never read here) hangs up, or the daemon is
/// gone for good (it went away and none took the VM back within the client's deadline; a
/// restarted daemon is ridden through); true if the daemon is gone.
pub fn wait_for_hangup(peer: BorrowedFd<'_>, client: &Client) -> anyhow::Result<bool> {
    let hup = PollFlags::RDHUP | PollFlags::HUP;
    let lost = client.lost_fd();
    loop {
        let mut fds = [PollFd::new(&peer, hup), PollFd::new(&lost, PollFlags::IN)];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e).context("poll failed"),
        }
        if !fds[1].revents().is_empty() {
            return Ok(true);
        }
        if !fds[0].revents().is_empty() {
            return Ok(false);
        }
    }
}
