//! The source side's view of a VM's memory: its pages by number in the remote address space
//! (the regions laid end to end, in order; `vmpager_protocol::message::migration`), each read
//! as the guest would see it now.
//!
//! A page's content is, by its state (`page_state`):
//! * populated, or in the memfd although untouched (the VMM or a backend wrote it): the memfd's
//!   bytes, read with `pread` (never through the daemon's mapping, whose holes are registered
//!   with its own userfaultfd);
//! * discarded: zeros (the guest gave it back; a REMOVE was seen);
//! * untouched and not in the memfd: the VM's page source (its snapshot, or zeros).

use crate::memory::PageDst;
use crate::session::Vm;
use crate::source::Fill;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use vmpager_protocol::PAGE_SIZE;

/// Errors reading a VM for migration.
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    /// The VM's memory cannot be migrated this way.
    #[error("this VM cannot be migrated: {0}")]
    Unsupported(&'static str),
    /// A page number beyond the VM.
    #[error("page {page} is beyond the VM's {total} pages")]
    OutOfRange {
        /// Asked for.
        page: u64,
        /// The VM's pages.
        total: u64,
    },
    /// Reading the memfd or the page source failed.
    #[error("reading page {page} failed")]
    Read {
        /// The page.
        page: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl ReaderError {
    /// The peer asked for something it cannot have (an answer, not a failure of ours).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, ReaderError::OutOfRange { .. })
    }
}

/// What one page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageContent {
    /// The buffer holds its bytes.
    Data,
    /// All zeros (the buffer is not written).
    Zero,
}

/// Reads a VM's pages in the remote address space.
#[derive(Debug)]
pub struct VmReader {
    vm: Arc<Vm>,
    /// First 4 KiB page of each region in the remote address space, and one past the last.
    starts: Vec<u64>,
}

impl VmReader {
    /// A reader of `vm`. Only memory the daemon owns can be read, and private memory is never
    /// sent (it lives in guest_memfds a destination could not use).
    pub fn new(vm: Arc<Vm>) -> Result<VmReader, ReaderError> {
        let regions = vm.memory.regions();
        if regions.iter().any(|r| !r.is_owned()) {
            return Err(ReaderError::Unsupported("its memory is the VMM's own"));
        }
        if regions.iter().any(|r| r.spec.is_private()) {
            return Err(ReaderError::Unsupported("it has private memory"));
        }
        let mut starts = Vec::with_capacity(regions.len() + 1);
        let mut at = 0;
        for r in regions {
            starts.push(at);
            at += r.size() / PAGE_SIZE;
        }
        starts.push(at);
        Ok(VmReader { vm, starts })
    }

    /// The VM read.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// 4 KiB pages in the remote address space.
    pub fn total_pages(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Region index and byte offset in it of 4 KiB page `page`.
    fn locate(&self, page: u64) -> Result<(usize, u64), ReaderError> {
        let total = self.total_pages();
        if page >= total {
            return Err(ReaderError::OutOfRange { page, total });
        }
        // `starts` is sorted and its last entry is `total` > page: some region holds it.
        let ri = self.starts.partition_point(|&s| s <= page) - 1;
        Ok((ri, (page - self.starts[ri]) * PAGE_SIZE))
    }

    /// Reads 4 KiB page `page` into `buf` (at least 4 KiB).
    pub fn read(&self, page: u64, buf: &mut [u8]) -> Result<PageContent, ReaderError> {
        let (ri, off) = self.locate(page)?;
        let region = &self.vm.memory.regions()[ri];
        let buf = &mut buf[..PAGE_SIZE as usize];
        let state_page = (off / region.page_size()) as usize;
        let read_err = |source| ReaderError::Read { page, source };
        if region.state.is_discarded(state_page) {
            return Ok(PageContent::Zero);
        }
        if region.state.is_untouched(state_page) && !region.is_resident(off) {
            let fill = self
                .vm
                .fill(
                    region.spec.source_offset() + off,
                    &mut PageDst::from_buf(buf),
                )
                .map_err(|e| read_err(std::io::Error::other(e)))?;
            return Ok(match fill {
                Fill::Zero => PageContent::Zero,
                Fill::Data if is_zero(buf) => PageContent::Zero,
                Fill::Data => PageContent::Data,
            });
        }
        let Some(memfd) = region.memfd() else {
            return Err(ReaderError::Unsupported("its memory is the VMM's own"));
        };
        pread_all(memfd, buf, region.spec.file_offset() + off).map_err(read_err)?;
        Ok(match is_zero(buf) {
            true => PageContent::Zero,
            false => PageContent::Data,
        })
    }
}

/// Whether every byte of `buf` is zero (whole words at a time).
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bit pattern is a valid u64; `align_to` only reinterprets the aligned
        // middle of the slice, which stays borrowed from `buf`.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// `pread` until `buf` is full; bytes past the file's end read as zeros.
fn pread_all(fd: BorrowedFd<'_>, buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match rustix::io::pread(fd, &mut buf[at..], offset) {
            Ok(0) => {
                buf[at..].fill(0);
                return Ok(());
            }
            Ok(n) => {
                at += n;
                offset += n as u64;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_detection_looks_at_every_byte() {
        let mut page = vec![0u8; 4096 + 3];
        assert!(is_zero(&page[1..4097]));
        for at in [1, 2, 8, 2048, 4095, 4096] {
            page[at] = 1;
            assert!(!is_zero(&page[1..4097]), "byte {at}");
            page[at] = 0;
        }
    }
}
