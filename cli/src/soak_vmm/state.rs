//! What a soak VMM keeps in its state directory for the process that takes its VM over after
//! a SIGKILL. Every file is either written whole (a temporary file, fsync, rename) or made of
//! fixed-size records whose trailing partial record, if any, is dropped.
//!
//! * `image`: the snapshot the daemon serves the VM's pages from (unless `--image` names one
//!   shared by VMs that run one after another).
//! * `session`: `vm_id token`, written once the daemon created the VM.
//! * `progress`: little-endian `u32` page numbers, one appended after each page's mark reached
//!   guest memory.
//! * `verified`: exists once a VMM verified every byte of a VM whose every page is marked (it
//!   detaches next: a successor that finds the VM gone has nothing left to do).

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use vmpager_client::demo::PatternGen;

/// The state directory of one VM.
pub(crate) struct StateDir(PathBuf);

impl StateDir {
    pub fn new(dir: &Path) -> Result<StateDir> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(StateDir(dir.to_owned()))
    }

    pub fn image(&self) -> PathBuf {
        self.0.join("image")
    }

    fn write_atomically(&self, name: &str, bytes: &[u8]) -> Result<()> {
        write_atomically(&self.0.join(name), bytes)
    }

    /// The VM's id and token, if a VMM created one.
    pub fn session(&self) -> Result<Option<(u64, u64)>> {
        let path = self.0.join("session");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let mut words = text.split_whitespace().map(str::parse::<u64>);
        match (words.next(), words.next(), words.next()) {
            (Some(Ok(id)), Some(Ok(token)), None) => Ok(Some((id, token))),
            _ => bail!("{} is not `vm_id token`: {text:?}", path.display()),
        }
    }

    pub fn save_session(&self, vm_id: u64, token: u64) -> Result<()> {
        self.write_atomically("session", format!("{vm_id} {token}\n").as_bytes())
    }

    /// The progress log: which pages hold their mark (`listed[p]`), and the log opened for
    /// appending (a partial record a SIGKILL left at its end is cut off first).
    pub fn progress(&self, pages: usize) -> Result<(Vec<bool>, File)> {
        let path = self.0.join("progress");
        let log = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let whole = bytes.len() - bytes.len() % 4;
        if whole != bytes.len() {
            log.set_len(whole as u64)
                .with_context(|| format!("cannot truncate {}", path.display()))?;
        }
        let mut listed = vec![false; pages];
        for r in bytes[..whole].chunks_exact(4) {
            let p = u32::from_le_bytes([r[0], r[1], r[2], r[3]]) as usize;
            match listed.get_mut(p) {
                Some(l) if !*l => *l = true,
                Some(_) => bail!("{}: page {p} is listed twice", path.display()),
                None => bail!("{}: page {p} is beyond the VM's {pages}", path.display()),
            }
        }
        Ok((listed, log))
    }

    pub fn verified(&self) -> bool {
        self.0.join("verified").exists()
    }

    pub fn set_verified(&self) -> Result<()> {
        self.write_atomically("verified", b"")
    }
}

/// Writes `path` whole: a reader (after any SIGKILL) sees the old file or the new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    // The rename itself survives a crash of the machine, not only of this process.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

/// The snapshot in `path`: read if a complete one is there, otherwise made from `seed` and
/// written (so a successor, or the next VM sharing the image, reads what the daemon reads).
pub(crate) fn snapshot(path: &Path, seed: u64, content: &mut [u8]) -> Result<()> {
    match File::open(path) {
        Ok(mut f) => f
            .read_exact(content)
            .and_then(|()| match f.read(&mut [0u8; 1])? {
                0 => Ok(()),
                _ => Err(std::io::Error::other("longer than the VM")),
            })
            .with_context(|| format!("bad image {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            PatternGen::new(seed).fill(content);
            write_atomically(path, content)
        }
        Err(e) => Err(e).with_context(|| format!("cannot open {}", path.display())),
    }
}

/// Appends page `page` to the progress log: one `write(2)` of one record on an `O_APPEND`
/// file, so a SIGKILL leaves it whole or absent.
pub(crate) fn log_page(log: &File, page: usize) -> Result<()> {
    let record = u32::try_from(page)
        .context("page number beyond the log's u32")?
        .to_le_bytes();
    let n = rustix::io::write(log, &record).context("cannot append to the progress log")?;
    if n != record.len() {
        bail!("short write to the progress log ({n} of 4 bytes)");
    }
    Ok(())
}
