//! vmpager's snapshot format for object storage (docs/snapshot-format.md).
//!
//! A raw memory image is cut into fixed chunks (2 MiB by default); all-zero chunks are not
//! stored; every other chunk is one zstd frame (so any chunk decodes alone) in one data object,
//! and a JSON [`Manifest`] next to it gives each chunk's offset, compressed length and the
//! BLAKE3 hash of its plain bytes. The same code packs to and reads from any `object_store`
//! URL: `file://` on one machine, `s3://` across a fleet, `memory://` in tests
//! ([`Location`]).
//!
//! [`Snapshots`] is the blocking face (it owns a small tokio runtime): [`Snapshots::pack`],
//! [`Snapshots::verify`], [`Snapshots::unpack`], and [`Snapshots::open`] for a reader that
//! fetches single chunks, every one checked against the manifest before it is returned and
//! pinned to the data object's ETag, so a snapshot replaced under a reader is an error, never
//! a mix of two.

pub mod location;
pub mod manifest;
mod pack;
mod reader;

pub use location::{Location, LocationError, StoreOptions};
pub use manifest::{ChunkEntry, Manifest, ManifestError, DEFAULT_CHUNK};
pub use pack::PackReport;
pub use reader::{ChunkRead, SnapshotReader, VerifyReport};

use std::future::Future;
use std::path::Path;

/// Errors of snapshot operations, classified by [`SnapshotError::is_transient`].
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The URL cannot be opened (bad input).
    #[error(transparent)]
    Location(#[from] LocationError),
    /// The manifest is refused (bad input: it came from the store).
    #[error("{url}: {source}")]
    Manifest {
        /// Where.
        url: String,
        /// Why.
        #[source]
        source: ManifestError,
    },
    /// A local file could not be read or written.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The object store failed (perhaps transient: a timeout, a 5xx, a refused connection).
    #[error("{what}: {source}")]
    Store {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: object_store::Error,
    },
    /// The data object is not the one the manifest (or the reader, at open) saw: the snapshot
    /// was replaced. Never retried: mixing two snapshots is never right.
    #[error("{url}: the snapshot changed under its reader ({what})")]
    Changed {
        /// Where.
        url: String,
        /// What differs.
        what: String,
    },
    /// A chunk does not decode to the bytes its hash names (bad input).
    #[error("{url}: chunk {chunk} is corrupt: {why}")]
    Corrupt {
        /// Where.
        url: String,
        /// Its index.
        chunk: usize,
        /// What is wrong.
        why: String,
    },
    /// A read of a chunk did not finish by its deadline (transient: the store may come back).
    #[error("{url}: chunk {chunk} did not come in time")]
    TimedOut {
        /// Where.
        url: String,
        /// Its index.
        chunk: usize,
    },
    /// Bad arguments (a chunk size, an image size).
    #[error("{0}")]
    Invalid(String),
    /// The runtime could not be started.
    #[error("cannot start the object-store runtime")]
    Runtime(#[source] std::io::Error),
}

impl SnapshotError {
    /// Worth trying again later: a store error that is not a "not found", "precondition",
    /// "not supported" or configuration error.
    pub fn is_transient(&self) -> bool {
        match self {
            SnapshotError::Store { source, .. } => matches!(
                source,
                object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
            ),
            SnapshotError::TimedOut { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn store(what: impl Into<String>, source: object_store::Error) -> SnapshotError {
        SnapshotError::Store {
            what: what.into(),
            source,
        }
    }
}

/// Blocking access to snapshots: owns the runtime the object stores run on.
#[derive(Debug)]
pub struct Snapshots {
    runtime: tokio::runtime::Runtime,
    options: StoreOptions,
}

impl Snapshots {
    /// A runtime of two threads, stores opened with `options` (and the environment).
    pub fn new(options: StoreOptions) -> Result<Snapshots, SnapshotError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmpager-objstore")
            .enable_all()
            .build()
            .map_err(SnapshotError::Runtime)?;
        Ok(Snapshots { runtime, options })
    }

    /// Runs `f` on the runtime and waits for it.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// The runtime, for readers that spawn their fetches on it.
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.runtime.handle().clone()
    }

    /// Opens `url` with this instance's options.
    pub fn location(&self, url: &str) -> Result<Location, SnapshotError> {
        Ok(Location::open(url, &self.options)?)
    }

    /// Packs the raw image at `image` to `url` in chunks of `chunk_size` bytes.
    pub fn pack(
        &self,
        image: &Path,
        url: &str,
        chunk_size: u64,
    ) -> Result<PackReport, SnapshotError> {
        let loc = self.location(url)?;
        self.block_on(pack::pack(image, &loc, chunk_size))
    }

    /// Opens the snapshot at `url` for reading: its manifest, and the data object pinned.
    pub fn open(&self, url: &str) -> Result<SnapshotReader, SnapshotError> {
        let loc = self.location(url)?;
        self.block_on(SnapshotReader::open(loc))
    }

    /// Fetches and checks every chunk of the snapshot at `url`.
    pub fn verify(&self, url: &str) -> Result<VerifyReport, SnapshotError> {
        let r = self.open(url)?;
        self.block_on(r.verify())
    }

    /// Writes the snapshot at `url` back to a raw image at `image` (zero chunks as holes).
    pub fn unpack(&self, url: &str, image: &Path) -> Result<VerifyReport, SnapshotError> {
        let r = self.open(url)?;
        self.block_on(r.unpack(image))
    }
}
