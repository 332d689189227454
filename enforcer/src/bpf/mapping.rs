//! A pinned `BPF_F_MMAPABLE` array mapped into this process, for maps the controller
//! writes field by field while the kernel reads and writes them too: a whole-value map
//! update would overwrite what the kernel (or another command) set in the meantime.
use std::{io, num::NonZeroUsize, os::fd::AsFd as _, ptr::NonNull};

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use super::{BpfError, maps_dir, pins::open_pinned_data};

pub(super) struct Mapping {
    base: NonNull<u8>,
    len: usize,
    /// Keeps the map alive while it is mapped.
    _map: aya::maps::MapData,
}

// SAFETY: the mapping is shared memory owned by this value; writers go through
// `&mut self` or through atomics/volatile stores of whole fields.
unsafe impl Send for Mapping {}
// SAFETY: as for Send: shared access only reads or stores whole fields atomically.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes (a multiple of the page size) of the pinned map `name`.
    pub(super) fn open_pinned(name: &'static str, len: usize) -> Result<Self, BpfError> {
        let map = open_pinned_data(name)?;
        let size = NonZeroUsize::new(len).expect("a mapping is not empty");
        // SAFETY: a fresh shared mapping of the map's values (BPF_F_MMAPABLE); nothing else
        // in this process aliases it as a Rust reference; unmapped on drop.
        let base = unsafe {
            mmap(None, size, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, map.fd().as_fd(), 0)
        }
        .map_err(|e| BpfError::Io {
            what: "mapping",
            path: maps_dir().join(name),
            source: io::Error::from(e),
        })?;
        Ok(Self { base: base.cast(), len, _map: map })
    }

    /// The address `offset` bytes in; panics outside the mapping.
    pub(super) fn at(&self, offset: usize) -> *mut u8 {
        assert!(offset < self.len, "offset {offset} outside a mapping of {} bytes", self.len);
        // SAFETY: in bounds, checked above.
        unsafe { self.base.as_ptr().add(offset) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open_pinned`, unmapped once; no reference into it
        // outlives `self`.
        let _ = unsafe { munmap(self.base.cast(), self.len) };
    }
}
