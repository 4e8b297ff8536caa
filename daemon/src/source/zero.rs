//! The zero source: every page starts as zeros.

use super::{Fill, PageSource, SourceError};
use crate::memory::PageDst;

/// Every page is zero.
#[derive(Debug, Default)]
pub struct ZeroSource;

impl PageSource for ZeroSource {
    fn name(&self) -> &'static str {
        "zero"
    }

    fn data_end(&self) -> u64 {
        0
    }

    fn fill(&self, _offset: u64, _dst: &mut PageDst<'_>) -> Result<Fill, SourceError> {
        Ok(Fill::Zero)
    }
}
