//! The maps. Policy tables and counters are pinned by name (shared by every attach and
//! kept when the controller dies); the events ring buffer belongs to one loaded
//! program set, so each controller reads the events of the cgroups it attached.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use enforcer_common::{
    Binding, DECISION_STRIDE, DnsOrigin, FileEntry, FileFilter, FileKey, LearnedClauses, Net4Key, Net6Key, PendingKey,
    PendingValue, PolicyConfig, PrefixClauses, counter, dns, limits,
};

/// `BPF_F_MMAPABLE` (include/uapi/linux/bpf.h).
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// binding (one per attached cgroup) -> cgroup id and policy slot. Mappable: the
/// controller stores each field on its own (the kill switch with no lock).
#[map(name = "ENF_BINDINGS")]
pub static ENF_BINDINGS: Array<Binding> = Array::pinned(limits::MAX_BINDINGS, BPF_F_MMAPABLE);

/// slot -> settings of the policy in that slot.
#[map(name = "ENF_POLICIES")]
pub static ENF_POLICIES: Array<PolicyConfig> = Array::pinned(limits::MAX_POLICY_SLOTS, 0);

/// (slot, IPv4 prefix) -> clauses of every rule covering the prefix.
#[map(name = "ENF_NET4")]
pub static ENF_NET4: LpmTrie<Net4Key, PrefixClauses> = LpmTrie::pinned(limits::MAX_PREFIXES_PER_FAMILY, 0);

/// (slot, IPv6 prefix) -> clauses of every rule covering the prefix.
#[map(name = "ENF_NET6")]
pub static ENF_NET6: LpmTrie<Net6Key, PrefixClauses> = LpmTrie::pinned(limits::MAX_PREFIXES_PER_FAMILY, 0);

/// Decisions per slot, hook and verdict (see `enforcer_common::decision_index`).
#[map(name = "ENF_DECISIONS")]
pub static ENF_DECISIONS: PerCpuArray<u64> = PerCpuArray::pinned(limits::MAX_POLICY_SLOTS * DECISION_STRIDE, 0);

/// Global counters (`enforcer_common::counter`).
#[map(name = "ENF_COUNTERS")]
pub static ENF_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

/// (inode, slot) -> what a listed path decides for itself and everything beneath.
#[map(name = "ENF_FILES")]
pub static ENF_FILES: HashMap<FileKey, FileEntry> = HashMap::pinned(limits::MAX_FILE_ENTRIES, 0);

/// Which inodes `ENF_FILES` may hold, over all slots (see `FileFilter`). Mappable,
/// so the controller sets bytes in place without overwriting the kernel's.
#[map(name = "ENF_FILE_FILTER")]
pub static ENF_FILE_FILTER: Array<FileFilter> = Array::pinned(1, BPF_F_MMAPABLE);

/// (existing parent inode, name, slot) -> a listed path not created yet.
#[map(name = "ENF_PENDING")]
pub static ENF_PENDING: HashMap<PendingKey, PendingValue> = HashMap::pinned(limits::MAX_PENDING_PATHS, 0);

/// Per-CPU room to build a pending value (too large for the BPF stack).
#[map(name = "ENF_PEND_TMP")]
pub static ENF_PENDING_SCRATCH: PerCpuArray<PendingValue> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "ENF_EVENTS")]
pub static ENF_EVENTS: RingBuf = RingBuf::with_byte_size(limits::EVENTS_RING_BYTES, 0);

/// Socket cookie -> the DNS server a redirected socket named (see `net::redirect_dns4`).
/// LRU: sockets close without telling us, so old entries must make room by themselves.
#[map(name = "ENF_DNS_ORIG")]
pub static ENF_DNS_ORIG: LruHashMap<u64, DnsOrigin> = LruHashMap::pinned(dns::MAX_REDIRECTED_SOCKETS, 0);

/// (binding, IPv4 address) -> domain rules a DNS answer opened it for, with expiries.
#[map(name = "ENF_LEARN4")]
pub static ENF_LEARN4: HashMap<Net4Key, LearnedClauses> = HashMap::pinned(limits::MAX_LEARNED_ADDRS, 0);

/// (binding, IPv6 address) -> the same for IPv6.
#[map(name = "ENF_LEARN6")]
pub static ENF_LEARN6: HashMap<Net6Key, LearnedClauses> = HashMap::pinned(limits::MAX_LEARNED_ADDRS, 0);
