//! Page sources: where a page's content comes from the first time the guest touches it.

pub mod delayed;
pub mod fetch;
mod file;
pub mod object;
mod zero;

pub use delayed::{DelayedOptions, DelayedSource};
pub use fetch::{Arrival, AsyncSource, Completions, Fetcher, Payload};
pub use file::FileSource;
pub use zero::ZeroSource;

use crate::memory::PageDst;

/// Errors of a page source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Reading the backing store failed.
    #[error("reading the page source at offset {offset:#x} failed")]
    Read {
        /// Byte offset in the source.
        offset: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The source cannot be used at all (wrong file type, ...).
    #[error("unusable page source: {0}")]
    Unusable(String),
}

impl SourceError {
    /// A later attempt may succeed (transient I/O error).
    pub fn is_retryable(&self) -> bool {
        matches!(self, SourceError::Read { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock))
    }
}

/// What a fill produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// The destination now holds the page's bytes.
    Data,
    /// The page is all zeros; the destination was not written (install a zero page instead).
    Zero,
}

/// A source of page content, addressed by byte offset (`RegionSpec.source_offset` + offset in
/// the region). Implementations are shared by the threads that serve faults.
pub trait PageSource: Send + Sync + std::fmt::Debug {
    /// Short name for stats and logs.
    fn name(&self) -> &'static str;

    /// Fills `dst` with the bytes at `offset`, or answers that they are all zeros.
    fn fill(&self, offset: u64, dst: &mut PageDst<'_>) -> Result<Fill, SourceError>;

    /// Where the source's data ends: every byte from here on reads as zero. Readahead never
    /// mixes pages before and after it in one fill, so data pages and zero pages are counted
    /// (and installed) as what they are.
    fn data_end(&self) -> u64 {
        u64::MAX
    }

    /// The file the source reads, if it has one (a VMM that takes the VM over gets a copy, to
    /// hand to a restarted daemon).
    fn file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

/// A VM's page source: synchronous (filled on the worker thread) or asynchronous (asked, and
/// answered later through [`Completions`]).
#[derive(Debug)]
pub enum Source {
    /// Filled on the worker thread (zero, file).
    Sync(Box<dyn PageSource>),
    /// Answers later (network, object store).
    Async(Fetcher),
}

impl Source {
    /// Short name for stats and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Source::Sync(s) => s.name(),
            Source::Async(f) => f.source.name(),
        }
    }

    /// Where the source's data ends (see [`PageSource::data_end`]); unknown for asynchronous
    /// sources.
    pub fn data_end(&self) -> u64 {
        match self {
            Source::Sync(s) => s.data_end(),
            Source::Async(_) => u64::MAX,
        }
    }

    /// The file the source reads, if it has one.
    pub fn file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match self {
            Source::Sync(s) => s.file(),
            Source::Async(_) => None,
        }
    }

    /// The asynchronous source and its queue, if the source is one.
    pub fn fetcher(&self) -> Option<&Fetcher> {
        match self {
            Source::Sync(_) => None,
            Source::Async(f) => Some(f),
        }
    }
}
