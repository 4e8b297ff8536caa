//! `vmpager snapshot pack|verify|unpack`: a raw memory image to and from the object-store
//! snapshot format (`vmpager_snapshot`, docs/snapshot-format.md), at any `file://`, `s3://` or
//! `memory://` URL. S3 credentials, region and endpoint come from the standard `AWS_*`
//! environment variables, or `--endpoint`/`--region`/`--allow-http`.

use crate::parse_size;
use anyhow::Context;
use std::path::PathBuf;
use vmpager_snapshot::{Snapshots, StoreOptions, DEFAULT_CHUNK};

/// `vmpager snapshot` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCmd {
    /// Cut IMAGE into chunks, skip the all-zero ones, compress each with zstd, and write them
    /// with a manifest (per-chunk BLAKE3 hashes) to URL.
    Pack {
        /// The raw memory image.
        image: PathBuf,
        /// Where: file:///dir, s3://bucket/prefix.
        url: String,
        /// Plain bytes per chunk (a power of two, 4K to 64M).
        #[arg(long, default_value_t = DEFAULT_CHUNK, value_parser = parse_size)]
        chunk_size: u64,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Fetch every chunk of the snapshot at URL and check it against the manifest.
    Verify {
        /// The snapshot.
        url: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write the snapshot at URL back to a raw image (every chunk checked).
    Unpack {
        /// The snapshot.
        url: String,
        /// The image to write (created or truncated).
        image: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Object-store options beside the environment.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// S3 endpoint (default: AWS_ENDPOINT_URL, else AWS itself).
    #[arg(long)]
    endpoint: Option<String>,
    /// S3 region (default: AWS_REGION).
    #[arg(long)]
    region: Option<String>,
    /// Allow a plain http:// endpoint (default: AWS_ALLOW_HTTP).
    #[arg(long)]
    allow_http: bool,
}

impl StoreArgs {
    fn options(&self) -> StoreOptions {
        StoreOptions {
            endpoint: self.endpoint.clone(),
            allow_http: self.allow_http,
            region: self.region.clone(),
            credentials: None,
        }
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

pub fn run(cmd: SnapshotCmd) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Pack {
            image,
            url,
            chunk_size,
            store,
        } => {
            let s = Snapshots::new(store.options())?;
            let started = std::time::Instant::now();
            let r = s
                .pack(&image, &url, chunk_size)
                .with_context(|| format!("cannot pack {} to {url}", image.display()))?;
            println!(
                "packed {} ({:.1} MiB) to {url}: {} chunks of {} KiB, {} all zeros (not stored); {:.1} MiB stored ({:.1} % of the image) in {:.2} s",
                image.display(),
                mib(r.image_bytes),
                r.chunks,
                chunk_size >> 10,
                r.zero_chunks,
                mib(r.stored_bytes),
                r.stored_bytes as f64 * 100.0 / r.image_bytes.max(1) as f64,
                started.elapsed().as_secs_f64()
            );
        }
        SnapshotCmd::Verify { url, store } => {
            let s = Snapshots::new(store.options())?;
            let r = s
                .verify(&url)
                .with_context(|| format!("{url} does not verify"))?;
            println!(
                "verified {url}: {} chunks ({} all zeros), {:.1} MiB fetched for a {:.1} MiB image",
                r.chunks,
                r.zero_chunks,
                mib(r.fetched_bytes),
                mib(r.image_bytes)
            );
        }
        SnapshotCmd::Unpack { url, image, store } => {
            let s = Snapshots::new(store.options())?;
            let r = s
                .unpack(&url, &image)
                .with_context(|| format!("cannot unpack {url} to {}", image.display()))?;
            println!(
                "unpacked {url} to {}: {:.1} MiB, {} chunks checked ({} all zeros)",
                image.display(),
                mib(r.image_bytes),
                r.chunks,
                r.zero_chunks
            );
        }
    }
    Ok(())
}
