//! `ENF_FILE_FILTER` mapped into this process: the kernel's filter of listed inodes and
//! the records beside it (see `enforcer_common::FileFilter`).
use enforcer_common::{FileEntry, FileFilter, FileRecord, names};

use super::{BpfError, mapping::Mapping};

/// `ENF_FILE_FILTER` mapped into this process. Bytes are set in place: writing the
/// map's value whole would overwrite bytes the kernel set in the meantime. Records are
/// written word by word in the order `FileRecord` asks for.
pub(super) struct FileFilterMap {
    mapping: Mapping,
}

impl FileFilterMap {
    const SIZE: usize = size_of::<FileFilter>();

    pub(super) fn open_pinned() -> Result<Self, BpfError> {
        let mapping = Mapping::open_pinned(names::MAP_FILE_FILTER, Self::SIZE)?;
        Ok(Self { mapping })
    }

    /// Marks an inode before its entry is inserted.
    pub(super) fn mark(&mut self, dev: u32, ino: u64) {
        // SAFETY: `at` checked the offset against the mapping.
        unsafe { self.mapping.at(FileFilter::index(dev, ino)).write_volatile(1) };
    }

    fn record(&mut self, index: usize) -> *mut FileRecord {
        assert!(index < FileFilter::RECORDS);
        let offset = std::mem::offset_of!(FileFilter, records) + index * size_of::<FileRecord>();
        self.mapping.at(offset).cast()
    }

    /// Copies an entry of `slot` (bound to no cgroup yet) into its record, unless the
    /// record holds another entry. The key word goes last: it makes the record live.
    pub(super) fn add_record(&mut self, slot: u32, dev: u32, ino: u64, entry: &FileEntry) {
        let record = self.record(FileFilter::record_index(dev, ino, slot));
        // SAFETY: `record` points into the mapping, aligned; each field is one word.
        unsafe {
            if (&raw const (*record).dev_slot).read_volatile() != 0 {
                return;
            }
            (&raw mut (*record).ino).write_volatile(ino);
            (&raw mut (*record).entry).write_volatile(*entry);
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            (&raw mut (*record).dev_slot).write_volatile(FileRecord::dev_slot(dev, slot));
        }
    }

    /// Empties every record of `slot` (bound to no cgroup any more).
    pub(super) fn clear_records(&mut self, slot: u32) {
        for index in 0..FileFilter::RECORDS {
            let record = self.record(index);
            // SAFETY: as in add_record.
            unsafe {
                let dev_slot = (&raw const (*record).dev_slot).read_volatile();
                if dev_slot != 0 && (dev_slot >> 32) as u32 == slot {
                    (&raw mut (*record).dev_slot).write_volatile(0);
                }
            }
        }
    }
}
