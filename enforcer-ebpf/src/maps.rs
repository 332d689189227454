//! The maps. Policy tables and counters are pinned by name (shared by every attach and
//! kept when the controller dies); the events ring buffer belongs to one loaded
//! program set, so each controller reads the events of the cgroups it attached.
use aya_ebpf::{
    macros::map,
    maps::{Array, LpmTrie, PerCpuArray, RingBuf},
};
use enforcer_common::{
    Binding, DECISION_STRIDE, Net4Key, Net6Key, PolicyConfig, PrefixClauses, counter, limits,
};

/// binding (one per attached cgroup) -> cgroup id and policy slot.
#[map(name = "ENF_BINDINGS")]
pub static ENF_BINDINGS: Array<Binding> = Array::pinned(limits::MAX_BINDINGS, 0);

/// slot -> settings of the policy in that slot.
#[map(name = "ENF_POLICIES")]
pub static ENF_POLICIES: Array<PolicyConfig> = Array::pinned(limits::MAX_POLICY_SLOTS, 0);

/// (slot, IPv4 prefix) -> clauses of every rule covering the prefix.
#[map(name = "ENF_NET4")]
pub static ENF_NET4: LpmTrie<Net4Key, PrefixClauses> =
    LpmTrie::pinned(limits::MAX_PREFIXES_PER_FAMILY, 0);

/// (slot, IPv6 prefix) -> clauses of every rule covering the prefix.
#[map(name = "ENF_NET6")]
pub static ENF_NET6: LpmTrie<Net6Key, PrefixClauses> =
    LpmTrie::pinned(limits::MAX_PREFIXES_PER_FAMILY, 0);

/// Decisions per slot, hook and verdict (see `enforcer_common::decision_index`).
#[map(name = "ENF_DECISIONS")]
pub static ENF_DECISIONS: PerCpuArray<u64> =
    PerCpuArray::pinned(limits::MAX_POLICY_SLOTS * DECISION_STRIDE, 0);

/// Global counters (`enforcer_common::counter`).
#[map(name = "ENF_COUNTERS")]
pub static ENF_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

#[map(name = "ENF_EVENTS")]
pub static ENF_EVENTS: RingBuf = RingBuf::with_byte_size(limits::EVENTS_RING_BYTES, 0);
