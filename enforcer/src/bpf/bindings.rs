//! `ENF_BINDINGS` mapped into this process: each binding's fields are stored one by one
//! (atomically), so the kill switch (`isolated`) is one store that needs no lock, and a
//! policy install (which rewrites `slot` and `dns_port` under the state lock) can never
//! undo an isolate that raced it.
use std::{
    collections::BTreeMap,
    mem::offset_of,
    sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering},
};

use enforcer_common::{Binding, limits, names};

use super::{BpfError, mapping::Mapping};

pub(super) struct Bindings {
    mapping: Mapping,
}

/// The mapped size: the values rounded up to whole pages.
const LEN: usize = (size_of::<Binding>() * limits::MAX_BINDINGS as usize).next_multiple_of(4096);

impl Bindings {
    pub(super) fn open_pinned() -> Result<Self, BpfError> {
        Ok(Self { mapping: Mapping::open_pinned(names::MAP_BINDINGS, LEN)? })
    }

    fn field<A>(&self, index: u32, offset: usize) -> &A {
        assert!(index < limits::MAX_BINDINGS, "binding {index} out of range");
        let at = self.mapping.at(index as usize * size_of::<Binding>() + offset);
        // SAFETY: `at` is a naturally aligned field of binding `index` inside the mapping,
        // which lives as long as `self`; the kernel and other processes access it too, so
        // it is only read and written through atomics.
        unsafe { &*at.cast::<A>() }
    }

    fn cgroup_id(&self, index: u32) -> &AtomicU64 {
        self.field(index, offset_of!(Binding, cgroup_id))
    }

    fn slot(&self, index: u32) -> &AtomicU32 {
        self.field(index, offset_of!(Binding, slot))
    }

    fn isolated(&self, index: u32) -> &AtomicU16 {
        self.field(index, offset_of!(Binding, isolated))
    }

    fn dns_port(&self, index: u32) -> &AtomicU16 {
        self.field(index, offset_of!(Binding, dns_port))
    }

    pub(super) fn get(&self, index: u32) -> Binding {
        Binding {
            cgroup_id: self.cgroup_id(index).load(Ordering::Acquire),
            slot: self.slot(index).load(Ordering::Acquire),
            isolated: self.isolated(index).load(Ordering::Acquire),
            dns_port: self.dns_port(index).load(Ordering::Acquire),
        }
    }

    /// cgroup id -> (binding index, binding), for every binding in use (binding 0 is
    /// never used).
    pub(super) fn in_use(&self) -> BTreeMap<u64, (u32, Binding)> {
        (1..limits::MAX_BINDINGS)
            .map(|i| (i, self.get(i)))
            .filter(|(_, b)| b.cgroup_id != 0)
            .map(|(i, b)| (b.cgroup_id, (i, b)))
            .collect()
    }

    /// Takes a free binding for `cgroup_id`: no policy yet (slot 0 denies), not isolated.
    pub(super) fn reserve(&self, index: u32, cgroup_id: u64) {
        self.slot(index).store(0, Ordering::Release);
        self.dns_port(index).store(0, Ordering::Release);
        self.isolated(index).store(0, Ordering::Release);
        self.cgroup_id(index).store(cgroup_id, Ordering::Release);
    }

    /// Points the binding at `slot` with the proxy's port; `isolated` is left as it is.
    pub(super) fn point(&self, index: u32, slot: u32, dns_port: u16) {
        self.dns_port(index).store(dns_port, Ordering::Release);
        self.slot(index).store(slot, Ordering::Release);
    }

    /// Sets the kill switch of binding `index`, one store, no lock.
    pub(super) fn set_isolated(&self, index: u32, on: bool) {
        self.isolated(index).store(u16::from(on), Ordering::Release);
    }

    /// Frees a binding: its programs (if any are left) fail closed on slot 0.
    pub(super) fn release(&self, index: u32) {
        self.slot(index).store(0, Ordering::Release);
        self.cgroup_id(index).store(0, Ordering::Release);
        self.dns_port(index).store(0, Ordering::Release);
        self.isolated(index).store(0, Ordering::Release);
    }
}
