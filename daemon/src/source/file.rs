//! The file source: a raw snapshot image of any size, read page by page on demand (never loaded
//! whole). Bytes past the end of the image read as zeros.

use super::{Fill, PageSource, SourceError};
use crate::memory::PageDst;
use std::fs::File;
use std::os::fd::AsFd;

/// A raw image file (or block device) read with `pread`.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    /// Wraps an image received from a client: it must be a regular file or a block device,
    /// opened for reading.
    pub fn new(file: File) -> Result<FileSource, SourceError> {
        let st = rustix::fs::fstat(&file).map_err(|e| SourceError::Unusable(e.to_string()))?;
        let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
        let len = match kind {
            rustix::fs::FileType::RegularFile => st.st_size as u64,
            rustix::fs::FileType::BlockDevice => {
                rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0))
                    .map_err(|e| SourceError::Unusable(e.to_string()))?
            }
            other => {
                return Err(SourceError::Unusable(format!(
                    "{other:?} is not an image file"
                )))
            }
        };
        let mode =
            rustix::fs::fcntl_getfl(&file).map_err(|e| SourceError::Unusable(e.to_string()))?;
        if mode.contains(rustix::fs::OFlags::WRONLY) {
            return Err(SourceError::Unusable(
                "the image is not open for reading".into(),
            ));
        }
        Ok(FileSource { file, len })
    }

    /// Image length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty image.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl PageSource for FileSource {
    fn name(&self) -> &'static str {
        "file"
    }

    fn data_end(&self) -> u64 {
        self.len
    }

    fn file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }

    fn fill(&self, offset: u64, dst: &mut PageDst<'_>) -> Result<Fill, SourceError> {
        if offset >= self.len {
            return Ok(Fill::Zero);
        }
        let mut done = 0;
        while done < dst.len() {
            let at = offset + done as u64;
            let n = dst
                .pread_at(done, self.file.as_fd(), at)
                .map_err(|source| SourceError::Read { offset: at, source })?;
            if n == 0 {
                break; // end of the image
            }
            done += n;
        }
        dst.fill_zero(done);
        Ok(Fill::Data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_pages_and_zero_fills_past_the_end() {
        let mut f = memfd::MemfdOptions::default()
            .create("img")
            .unwrap()
            .into_file();
        let image: Vec<u8> = (0..6000u32).map(|i| (i * 7) as u8).collect();
        f.write_all(&image).unwrap();
        let src = FileSource::new(f).unwrap();
        assert_eq!(src.len(), 6000);
        let mut buf = vec![0xffu8; 4096];
        assert_eq!(
            src.fill(0, &mut PageDst::from_buf(&mut buf)).unwrap(),
            Fill::Data
        );
        assert_eq!(&buf[..], &image[..4096]);
        assert_eq!(
            src.fill(4096, &mut PageDst::from_buf(&mut buf)).unwrap(),
            Fill::Data
        );
        assert_eq!(&buf[..6000 - 4096], &image[4096..]);
        assert!(buf[6000 - 4096..].iter().all(|&b| b == 0));
        assert_eq!(
            src.fill(8192, &mut PageDst::from_buf(&mut buf)).unwrap(),
            Fill::Zero
        );
    }

    #[test]
    fn refuses_non_files() {
        let (r, _w) = rustix::pipe::pipe().unwrap();
        assert!(matches!(
            FileSource::new(File::from(r)),
            Err(SourceError::Unusable(_))
        ));
    }
}
