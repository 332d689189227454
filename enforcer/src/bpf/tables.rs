//! The pinned policy tables and counters: bindings (cgroup -> slot), policy slots with
//! their prefixes and file entries, decision counters.
use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuValues, lpm_trie::Key};
use enforcer_common::{
    Binding, FileEntry, FileKey, Net4Key, Net6Key, PendingKey, PendingValue, PolicyConfig, PrefixClauses,
    SLOT_PREFIX_BITS, decision_index, hook, limits, names, verdict,
};

use super::{BpfError, LearnedTables, bindings::Bindings, file_filter::FileFilterMap, pins, pins::typed_map};
use crate::model::{CompiledPolicy, file_tables::Pending};

/// Where the binding's DNS proxy listens: a controller sets it; a process that only
/// recompiles the policy (`grant`) keeps what is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsPort {
    Keep,
    Set(u16),
}

/// The pinned policy tables and counters.
pub struct Tables {
    bindings: Bindings,
    policies: Array<MapData, PolicyConfig>,
    net4: LpmTrie<MapData, Net4Key, PrefixClauses>,
    net6: LpmTrie<MapData, Net6Key, PrefixClauses>,
    decisions: PerCpuArray<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    files: HashMap<MapData, FileKey, FileEntry>,
    pending: HashMap<MapData, PendingKey, PendingValue>,
}

impl Tables {
    pub fn open_pinned() -> Result<Self, BpfError> {
        pins::check_pinned_layouts()?;
        Ok(Self {
            bindings: Bindings::open_pinned()?,
            policies: typed_map!(names::MAP_POLICIES),
            net4: typed_map!(names::MAP_NET4),
            net6: typed_map!(names::MAP_NET6),
            decisions: typed_map!(names::MAP_DECISIONS),
            counters: typed_map!(names::MAP_COUNTERS),
            files: typed_map!(names::MAP_FILES),
            pending: typed_map!(names::MAP_PENDING),
        })
    }

    /// cgroup id -> (binding index, binding), for every confined cgroup (a binding
    /// reserved by an attach still verifying its programs has slot 0).
    fn bound(&self) -> BTreeMap<u64, (u32, Binding)> {
        self.bindings.in_use()
    }

    /// Turns the kill switch of a confined cgroup on or off: one store into the binding,
    /// no lock (see `Bindings`). Returns false when the cgroup is not confined.
    pub fn set_isolated(&self, cgroup_id: u64, on: bool) -> bool {
        let Some(&(index, _)) = self.bound().get(&cgroup_id) else { return false };
        self.bindings.set_isolated(index, on);
        true
    }

    pub fn is_isolated(&self, cgroup_id: u64) -> bool {
        self.bound().get(&cgroup_id).is_some_and(|(_, b)| b.isolated != 0)
    }

    /// cgroup id -> slot, for every confined cgroup.
    pub fn confined(&self) -> BTreeMap<u64, u32> {
        self.bound().into_iter().map(|(cg, (_, b))| (cg, b.slot)).collect()
    }

    pub fn slot_of(&self, cgroup_id: u64) -> Option<u32> {
        self.bound().get(&cgroup_id).map(|(_, b)| b.slot)
    }

    /// The cgroup's binding; for a cgroup not bound yet, a free binding reserved for it
    /// (no policy: its programs, once attached, deny until `bind`). Call with the
    /// `StateLock` held; `uninstall` frees it again.
    pub fn reserve_binding(&mut self, cgroup_id: u64) -> Result<u32, BpfError> {
        let bound = self.bound();
        if let Some(&(binding, _)) = bound.get(&cgroup_id) {
            return Ok(binding);
        }
        let used: BTreeSet<u32> = bound.values().map(|&(b, _)| b).collect();
        let binding = (1..limits::MAX_BINDINGS)
            .find(|b| !used.contains(b))
            .ok_or(BpfError::NoFreeBinding(limits::MAX_BINDINGS - 1))?;
        self.bindings.reserve(binding, cgroup_id);
        Ok(binding)
    }

    /// The cgroup's binding, if it has one.
    pub fn binding_of(&self, cgroup_id: u64) -> Option<u32> {
        self.bound().get(&cgroup_id).map(|&(b, _)| b)
    }

    pub fn config(&self, slot: u32) -> Option<PolicyConfig> {
        self.policies.get(&slot, 0).ok().filter(|c| c.in_use != 0)
    }

    /// Writes the policy into a free slot, bound to no cgroup yet; returns the slot. On
    /// error the slot is cleared again. Call with the `StateLock` held; `bind` then makes
    /// it the cgroup's policy.
    pub fn prepare_slot(&mut self, cgroup_id: u64, compiled: &CompiledPolicy) -> Result<u32, BpfError> {
        let used: BTreeSet<u32> = self.confined().into_values().collect();
        // Round-robin from the cgroup's current slot, so a freed slot is not reused at
        // once (event decoders cache a slot's rule names for a moment).
        let start = self.slot_of(cgroup_id).unwrap_or(0);
        let slot = (1..limits::MAX_POLICY_SLOTS)
            .map(|i| (start + i - 1) % (limits::MAX_POLICY_SLOTS - 1) + 1)
            .find(|s| !used.contains(s))
            .ok_or(BpfError::NoFreeSlot(limits::MAX_POLICY_SLOTS - 1))?;
        // A slot nobody points at may hold leftovers of a controller that died mid-write.
        self.clear_slot(slot)?;
        if let Err(e) = self.write_slot(slot, compiled) {
            let _ = self.clear_slot(slot);
            return Err(e);
        }
        Ok(slot)
    }

    /// Points the cgroup's binding at a prepared slot (one store: the programs see the
    /// old or the new slot), then empties the slot it held before and returns that slot.
    /// Only `slot` and `dns_port` are written: a kill switch set meanwhile stays set.
    pub fn bind(
        &mut self,
        binding: u32,
        cgroup_id: u64,
        slot: u32,
        dns_port: DnsPort,
    ) -> Result<Option<u32>, BpfError> {
        let current = self.bindings.get(binding);
        if current.cgroup_id != cgroup_id {
            self.bindings.reserve(binding, cgroup_id);
        }
        let dns_port = match dns_port {
            DnsPort::Keep => current.dns_port,
            DnsPort::Set(port) => port,
        };
        self.bindings.point(binding, slot, dns_port);
        match Some(current.slot).filter(|&old| current.cgroup_id == cgroup_id && old != 0 && old != slot) {
            Some(old) => {
                // Programs that read the binding before the flip may still be reading the
                // old slot: emptied under them, a deny prefix could vanish before the
                // allow prefix around it, or the config read as zero.
                wait_for_readers();
                self.clear_slot(old).map(|()| Some(old))
            }
            None => Ok(None),
        }
    }

    fn write_slot(&mut self, slot: u32, compiled: &CompiledPolicy) -> Result<(), BpfError> {
        for p in &compiled.net4 {
            let key = Key::new(SLOT_PREFIX_BITS + p.len as u32, Net4Key { slot, addr: p.addr });
            self.net4
                .insert(&key, p.clauses, 0)
                .map_err(|source| BpfError::TableFull { table: names::MAP_NET4, source })?;
        }
        for p in &compiled.net6 {
            let key = Key::new(SLOT_PREFIX_BITS + p.len as u32, Net6Key { slot, addr: p.addr });
            self.net6
                .insert(&key, p.clauses, 0)
                .map_err(|source| BpfError::TableFull { table: names::MAP_NET6, source })?;
        }
        if let Some(files) = &compiled.files {
            let mut filter = FileFilterMap::open_pinned()?;
            for (&(dev, ino), entry) in &files.inodes {
                filter.mark(dev, ino);
                self.files
                    .insert(FileKey { ino, dev, slot }, entry, 0)
                    .map_err(|source| BpfError::TableFull { table: names::MAP_FILES, source })?;
                filter.add_record(slot, dev, ino, entry);
            }
            for p in &files.pending {
                let (key, value) = pending_entry(slot, p);
                self.pending
                    .insert(key, value, 0)
                    .map_err(|source| BpfError::TableFull { table: names::MAP_PENDING, source })?;
            }
        }
        self.reset_decisions(slot)?;
        // The config goes last: a slot is live only once its rules are complete.
        self.policies
            .set(slot, compiled.config, 0)
            .map_err(|source| BpfError::Map { name: names::MAP_POLICIES, source })
    }

    fn reset_decisions(&mut self, slot: u32) -> Result<(), BpfError> {
        let cpus = aya::util::nr_cpus().map_err(|(what, source)| BpfError::Io {
            what: "counting CPUs",
            path: what.into(),
            source,
        })?;
        for index in decision_index(slot, 0, 0)..decision_index(slot + 1, 0, 0) {
            let zeros = PerCpuValues::try_from(vec![0u64; cpus]).expect("non-empty");
            self.decisions
                .set(index, zeros, 0)
                .map_err(|source| BpfError::Map { name: names::MAP_DECISIONS, source })?;
        }
        Ok(())
    }

    /// Empties a slot: config first (lookups that still reach it fail closed), then
    /// its prefixes.
    pub fn clear_slot(&mut self, slot: u32) -> Result<(), BpfError> {
        self.policies
            .set(slot, PolicyConfig::zeroed(), 0)
            .map_err(|source| BpfError::Map { name: names::MAP_POLICIES, source })?;
        let keys4: Vec<_> = self.net4.keys().flatten().filter(|k| k.data().slot == slot).collect();
        for key in keys4 {
            let _ = self.net4.remove(&key);
        }
        let keys6: Vec<_> = self.net6.keys().flatten().filter(|k| k.data().slot == slot).collect();
        for key in keys6 {
            let _ = self.net6.remove(&key);
        }
        FileFilterMap::open_pinned()?.clear_records(slot);
        let files: Vec<_> = self.files.keys().flatten().filter(|k| k.slot == slot).collect();
        for key in files {
            let _ = self.files.remove(&key);
        }
        let pending: Vec<_> = self.pending.keys().flatten().filter(|k| k.slot == slot).collect();
        for key in pending {
            let _ = self.pending.remove(&key);
        }
        Ok(())
    }

    /// Forgets a cgroup's policy (after its links are gone) and frees its binding;
    /// returns the slot it held.
    pub fn uninstall(&mut self, cgroup_id: u64) -> Result<Option<u32>, BpfError> {
        let Some(&(binding, Binding { slot, .. })) = self.bound().get(&cgroup_id) else { return Ok(None) };
        self.bindings.release(binding);
        if slot != 0 {
            wait_for_readers();
            self.clear_slot(slot)?;
        }
        LearnedTables::open_pinned()?.forget(binding, |_| true);
        Ok(Some(slot).filter(|&s| s != 0))
    }

    fn sum(values: Result<PerCpuValues<u64>, aya::maps::MapError>) -> u64 {
        values.map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Decisions of a slot: `[hook][verdict]`.
    pub fn decisions(&self, slot: u32) -> Vec<(u8, u8, u64)> {
        let mut out = Vec::new();
        for h in 0..hook::COUNT {
            for v in 0..verdict::COUNT {
                out.push((h, v, Self::sum(self.decisions.get(&decision_index(slot, h, v), 0))));
            }
        }
        out
    }

    pub fn counter(&self, index: u32) -> u64 {
        Self::sum(self.counters.get(&index, 0))
    }
}

/// Waits until every BPF program run that started before now has finished: program
/// runs are RCU read-side sections, and `membarrier(MEMBARRIER_CMD_GLOBAL)` is a
/// `synchronize_rcu()` on a machine with more than one CPU. With one CPU (where the
/// kernel skips it) or without membarrier, a pause lets a preempted run finish.
fn wait_for_readers() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0) };
    let online = nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN).ok().flatten().unwrap_or(1);
    if rc != 0 || online <= 1 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A name as the kernel compares it: NUL padded, cut to the key's length.
fn kernel_name(name: &str) -> [u8; limits::PENDING_NAME_LEN] {
    let mut out = [0u8; limits::PENDING_NAME_LEN];
    let bytes = name.as_bytes();
    let n = bytes.len().min(limits::PENDING_NAME_LEN - 1);
    out[..n].copy_from_slice(&bytes[..n]);
    out
}

fn pending_entry(slot: u32, p: &Pending) -> (PendingKey, PendingValue) {
    let key = PendingKey { parent_ino: p.parent_ino, parent_dev: p.parent_dev, slot, name: kernel_name(&p.names[0]) };
    let mut names = [[0u8; limits::PENDING_NAME_LEN]; limits::MAX_PENDING_DEPTH - 1];
    for (i, n) in p.names.iter().skip(1).enumerate() {
        names[i] = kernel_name(n);
    }
    (key, PendingValue { entry: p.entry, remaining: (p.names.len() - 1) as u32, _pad: 0, names })
}
