//! vmpagerd as a separate process, started with the options a row needs.

use crate::BenchError;
use std::fs::File;
use std::path::{Path, PathBuf};
use vmpager_client::demo::DaemonProcess;
use vmpager_client::{Client, PageSource, PopulateMethod, RegionSpec, VmMemory, VmSpec};

/// A running vmpagerd and a connection to it.
pub struct Daemon {
    /// The connection.
    pub client: Client,
    process: DaemonProcess,
}

impl Daemon {
    /// Starts `binary` with `args` on a socket in `dir`.
    pub fn start(binary: &Path, dir: &Path, args: &[&str]) -> Result<Daemon, BenchError> {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let socket: PathBuf = dir.join(format!("vmpagerd-{n}.sock"));
        let process = DaemonProcess::spawn(binary, &socket, args)?;
        let client = Client::connect(process.socket_path())?;
        Ok(Daemon { client, process })
    }

    /// Its socket.
    pub fn socket_path(&self) -> &Path {
        self.process.socket_path()
    }

    /// The daemon's pid (for its memory figures).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// A VM of `pages` pages at GPA 4 GiB, mapped in this process and attached.
    pub fn vm(
        &self,
        pages: usize,
        image: Option<&File>,
        populate: PopulateMethod,
    ) -> Result<VmMemory, BenchError> {
        let source = match image {
            Some(f) => PageSource::File(f.try_clone().map_err(|e| BenchError::io("dup image", e))?),
            None => PageSource::Zero,
        };
        Ok(self.client.create_mapped_vm(VmSpec {
            regions: vec![RegionSpec::new(
                1 << 32,
                (pages * crate::touch::PAGE) as u64,
                0,
            )],
            source,
            populate,
            ..Default::default()
        })?)
    }

    /// Stops the daemon (SIGTERM, then waits).
    pub fn stop(self) -> Result<(), BenchError> {
        drop(self.client);
        self.process.terminate()?;
        Ok(())
    }
}
