//! The error type of [`super`]: why a snapshot directory was refused.

use std::path::PathBuf;

/// Why a snapshot directory was refused. Classified with [`SnapshotError::is_bad_input`] and
/// [`SnapshotError::is_io`]. Every message names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be opened or read.
    #[error("cannot read {}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        error: std::io::Error,
    },
    /// A snapshot file is not a regular file.
    #[error("{} is not a regular file", path.display())]
    NotAFile {
        /// The file.
        path: PathBuf,
    },
    /// A JSON file exceeds [`MAX_JSON_BYTES`](super::MAX_JSON_BYTES).
    #[error("{} has {len} bytes, more than the limit of {limit}", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its length (at least).
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A file is not JSON (serde's message).
    #[error("{} is not valid JSON: {message}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// serde's message.
        message: String,
    },
    /// A field is missing or of the wrong type.
    #[error("{}: {field} is missing or not {expected}", path.display())]
    BadField {
        /// The file.
        path: PathBuf,
        /// Where the field is, e.g. `memory-manager state: guest_ram_mappings[1].gpa`.
        field: String,
        /// What it should be, e.g. `an unsigned integer`.
        expected: &'static str,
    },
    /// The snapshot tree has no `memory-manager` child.
    #[error("{} has no \"memory-manager\" snapshot", path.display())]
    NoMemoryManager {
        /// The state file.
        path: PathBuf,
    },
    /// The memory manager's `snapshot_data.state` is missing or not a string.
    #[error("{}: the memory-manager snapshot_data.state is missing or not a string", path.display())]
    StateNotString {
        /// The state file.
        path: PathBuf,
    },
    /// The memory manager's state string is not a JSON object.
    #[error("{}: the memory-manager state is not a JSON object: {message}", path.display())]
    StateNotJson {
        /// The state file.
        path: PathBuf,
        /// serde's message, or what the value is instead.
        message: String,
    },
    /// A list exceeds its bound.
    #[error("{}: {what} has {count} entries, more than the limit of {limit}", path.display())]
    TooMany {
        /// The file.
        path: PathBuf,
        /// The list.
        what: &'static str,
        /// Its length.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A memory range of length zero.
    #[error("{}: memory range {index} at {gpa:#x} has length zero", path.display())]
    RangeEmpty {
        /// The state file.
        path: PathBuf,
        /// Index in `memory_ranges.data`.
        index: usize,
        /// Its address.
        gpa: u64,
    },
    /// A memory range whose address or length is not a multiple of 4 KiB.
    #[error("{}: memory range {index} ({gpa:#x}, {length:#x} bytes) is not 4 KiB aligned", path.display())]
    RangeUnaligned {
        /// The state file.
        path: PathBuf,
        /// Index in `memory_ranges.data`.
        index: usize,
        /// Its address.
        gpa: u64,
        /// Its length.
        length: u64,
    },
    /// A memory range whose end, or whose end in `memory-ranges`, overflows 64 bits.
    #[error("{}: memory range {index} ({gpa:#x}, {length:#x} bytes) overflows 64 bits", path.display())]
    RangeOverflow {
        /// The state file.
        path: PathBuf,
        /// Index in `memory_ranges.data`.
        index: usize,
        /// Its address.
        gpa: u64,
        /// Its length.
        length: u64,
    },
    /// Two memory ranges share addresses.
    #[error("{}: memory ranges {first} ({first_gpa:#x}..{first_end:#x}) and {second} ({second_gpa:#x}..{second_end:#x}) overlap", path.display())]
    RangesOverlap {
        /// The state file.
        path: PathBuf,
        /// Index of the lower range.
        first: usize,
        /// Its first address.
        first_gpa: u64,
        /// One past its last address.
        first_end: u64,
        /// Index of the range it overlaps.
        second: usize,
        /// Its first address.
        second_gpa: u64,
        /// One past its last address.
        second_end: u64,
    },
    /// The memory manager lists no guest RAM slot.
    #[error("{}: the memory manager lists no guest RAM mapping", path.display())]
    NoSlots {
        /// The state file.
        path: PathBuf,
    },
    /// Two guest RAM mappings with the same slot number.
    #[error("{}: slot {slot} appears twice in guest_ram_mappings", path.display())]
    DuplicateSlot {
        /// The state file.
        path: PathBuf,
        /// The slot number.
        slot: u32,
    },
    /// A slot of size zero.
    #[error("{}: slot {slot} has size zero", path.display())]
    SlotEmpty {
        /// The state file.
        path: PathBuf,
        /// The slot number.
        slot: u32,
    },
    /// A slot whose end address or end file offset overflows 64 bits.
    #[error("{}: slot {slot} ({gpa:#x}, {size:#x} bytes at file offset {file_offset:#x}) overflows 64 bits", path.display())]
    SlotOverflow {
        /// The state file.
        path: PathBuf,
        /// The slot number.
        slot: u32,
        /// Its address.
        gpa: u64,
        /// Its size.
        size: u64,
        /// Its backing file offset.
        file_offset: u64,
    },
    /// A slot names a zone the configuration does not define.
    #[error("{}: slot {slot} names zone {zone_id:?}, which config.json does not define", path.display())]
    UnknownZone {
        /// The state file.
        path: PathBuf,
        /// The slot number.
        slot: u32,
        /// The zone it names.
        zone_id: String,
    },
    /// A slot's address, size or file offset is not a multiple of its zone's page size.
    #[error("{}: slot {slot} has {field} {value:#x}, not a multiple of the page size {page_size:#x} of zone {zone_id:?}", path.display())]
    SlotUnaligned {
        /// The state file.
        path: PathBuf,
        /// The slot number.
        slot: u32,
        /// Its zone.
        zone_id: String,
        /// `gpa`, `size` or `file_offset`.
        field: &'static str,
        /// The field's value.
        value: u64,
        /// The zone's page size.
        page_size: u64,
    },
    /// A slot that does not lie inside one memory range.
    #[error("{}: slot {slot} ({gpa:#x}..{end:#x}) does not lie inside any one memory range", path.display())]
    SlotOutsideRanges {
        /// The state file.
        path: PathBuf,
        /// The slot number.
        slot: u32,
        /// Its first address.
        gpa: u64,
        /// One past its last address.
        end: u64,
    },
    /// Two slots share addresses.
    #[error("{}: slots {first} and {second} overlap at {gpa:#x}", path.display())]
    SlotsOverlap {
        /// The state file.
        path: PathBuf,
        /// The lower slot's number.
        first: u32,
        /// The other slot's number.
        second: u32,
        /// Where the second one starts.
        gpa: u64,
    },
    /// Two zones with the same id.
    #[error("{}: zone {zone_id:?} is defined twice", path.display())]
    DuplicateZone {
        /// The config file.
        path: PathBuf,
        /// The zone id.
        zone_id: String,
    },
    /// A hugepage size that is not a power of two of at least 4 KiB.
    #[error("{}: zone {zone_id:?} has hugepage size {size}, not a power of two of at least 4096", path.display())]
    BadHugepageSize {
        /// The config file.
        path: PathBuf,
        /// The zone id.
        zone_id: String,
        /// The hugepage size.
        size: u64,
    },
}

impl SnapshotError {
    /// A file's content is wrong (as opposed to a file that could not be read).
    pub fn is_bad_input(&self) -> bool {
        !self.is_io()
    }

    /// A file could not be opened or read.
    pub fn is_io(&self) -> bool {
        matches!(self, SnapshotError::Io { .. })
    }
}
