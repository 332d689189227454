//! Types and constants shared by the kernel programs (`enforcer-ebpf`) and the
//! controller (`enforcer`). Everything here crosses the kernel/user boundary, so every
//! type is `#[repr(C)]`, `Copy`, has no implicit padding and a size asserted at compile
//! time. The `user` feature adds `aya::Pod` impls.
#![no_std]

#[cfg(feature = "std")]
extern crate std;

#[cfg(feature = "std")]
pub mod host;

pub mod limits {
    //! Bounds shared by the kernel tables and the policy compiler. Each has its reason.

    /// Policy slots in the kernel tables; slot 0 is never used so that a zeroed value
    /// means "no policy". A re-attach writes the new policy into a free slot and then
    /// flips the cgroup to it, so each attached cgroup may briefly need two slots.
    pub const MAX_POLICY_SLOTS: u32 = 256;
    /// Attached cgroups (bindings); binding 0 is never used.
    pub const MAX_BINDINGS: u32 = 4096;
    /// Port/protocol clauses that may apply to one address prefix (all allow and deny
    /// rules whose CIDR covers it, one clause per port range). Bounds the kernel loop.
    pub const MAX_CLAUSES_PER_PREFIX: usize = 32;
    /// Addresses learned from DNS answers, per family, summed over all bindings.
    pub const MAX_LEARNED_ADDRS: u32 = 16_384;
    /// Domain rules one learned address can be open for at once.
    pub const MAX_LEARNED_CLAUSES: usize = 8;
    /// Distinct prefixes per address family summed over all policy slots.
    pub const MAX_PREFIXES_PER_FAMILY: u32 = 131_072;
    /// Length of a policy name in the kernel config (NUL padded).
    pub const POLICY_NAME_LEN: usize = 64;
    /// Events ring buffer size in bytes (a power of two, a multiple of the page size).
    /// 16 MiB holds ~190,000 events: two seconds of a 100,000/s burst while the reader
    /// is descheduled (4 MiB lost events in `cargo xtask bench` on a 2-core machine).
    pub const EVENTS_RING_BYTES: u32 = 1 << 24;
    /// Inode entries over all policy slots (listed paths, plus hard-linked files found
    /// under denied trees).
    pub const MAX_FILE_ENTRIES: u32 = 65_536;
    /// Listed paths that did not exist at compile time, over all slots.
    pub const MAX_PENDING_PATHS: u32 = 4_096;
    /// Bytes of a pending path component compared in the kernel (NUL padded). Longer
    /// names are compared on their first bytes only: they are protected, never less.
    pub const PENDING_NAME_LEN: usize = 48;
    /// Missing components below the deepest existing ancestor of a pending path:
    /// one in the key, the rest in the value.
    pub const MAX_PENDING_DEPTH: usize = 4;
    /// Ancestors walked from an opened file to the root of its filesystem, and again
    /// from its mount point to the root (mount crossings included). A deeper file is
    /// denied (fail closed) and counted.
    pub const MAX_PATH_DEPTH: u32 = 64;
    /// The same bound for each of the two walks of a rename or link, which one program
    /// must verify together.
    pub const MAX_PATH_DEPTH_TWO_TARGETS: u32 = 32;
    /// Path components carried by a file event, deepest first, each NUL padded.
    pub const EVENT_PATH_PARTS: usize = 16;
    pub const EVENT_PART_LEN: usize = 32;
}

pub mod names {
    //! Names of maps and programs, declared once. Map names are at most 15 bytes.
    pub const MAP_BINDINGS: &str = "ENF_BINDINGS";
    /// The read-only global holding the binding index of a loaded program set.
    pub const GLOBAL_BINDING: &str = "ENF_BINDING";
    pub const MAP_POLICIES: &str = "ENF_POLICIES";
    pub const MAP_NET4: &str = "ENF_NET4";
    pub const MAP_NET6: &str = "ENF_NET6";
    pub const MAP_DECISIONS: &str = "ENF_DECISIONS";
    pub const MAP_COUNTERS: &str = "ENF_COUNTERS";
    pub const MAP_EVENTS: &str = "ENF_EVENTS";

    pub const PROG_CONNECT4: &str = "enf_connect4";
    pub const PROG_CONNECT6: &str = "enf_connect6";
    pub const PROG_SENDMSG4: &str = "enf_sendmsg4";
    pub const PROG_SENDMSG6: &str = "enf_sendmsg6";
    pub const PROG_SOCK_CREATE: &str = "enf_sock_create";
    pub const PROG_RECVMSG4: &str = "enf_recvmsg4";
    pub const PROG_RECVMSG6: &str = "enf_recvmsg6";
    pub const PROG_GETPEERNAME4: &str = "enf_getpeername4";
    pub const PROG_GETPEERNAME6: &str = "enf_getpeername6";
    pub const MAP_DNS_ORIGINS: &str = "ENF_DNS_ORIG";
    pub const MAP_LEARN4: &str = "ENF_LEARN4";
    pub const MAP_LEARN6: &str = "ENF_LEARN6";

    pub const MAP_FILES: &str = "ENF_FILES";
    pub const MAP_PENDING: &str = "ENF_PENDING";
    pub const MAP_FILE_FILTER: &str = "ENF_FILE_FILTER";
    /// Per-CPU room the kernel builds a pending value in (not pinned).
    pub const MAP_PENDING_SCRATCH: &str = "ENF_PEND_TMP";
    /// Every map of the kernel object; a test holds the object to this list.
    pub const MAPS: &[&str] = &[
        MAP_BINDINGS,
        MAP_POLICIES,
        MAP_NET4,
        MAP_NET6,
        MAP_DECISIONS,
        MAP_COUNTERS,
        MAP_EVENTS,
        MAP_DNS_ORIGINS,
        MAP_LEARN4,
        MAP_LEARN6,
        MAP_FILES,
        MAP_PENDING,
        MAP_FILE_FILTER,
        MAP_PENDING_SCRATCH,
    ];
    /// The read-only global with the cgroup level of the attach point: LSM programs
    /// run for every task and compare the caller's ancestor at that level.
    pub const GLOBAL_CGROUP_LEVEL: &str = "ENF_CGROUP_LEVEL";
    /// The read-only global with the running kernel's struct offsets.
    pub const GLOBAL_OFFSETS: &str = "ENF_OFFSETS";

    /// LSM programs: (program name, hook name).
    pub const LSM_PROGRAMS: &[(&str, &str)] = &[
        ("enf_file_open", "file_open"),
        ("enf_bprm_check", "bprm_check_security"),
        ("enf_mmap_file", "mmap_file"),
        ("enf_path_mknod", "path_mknod"),
        ("enf_path_mkdir", "path_mkdir"),
        ("enf_path_rmdir", "path_rmdir"),
        ("enf_path_unlink", "path_unlink"),
        ("enf_path_symlink", "path_symlink"),
        ("enf_path_link", "path_link"),
        ("enf_path_rename", "path_rename"),
        ("enf_path_truncate", "path_truncate"),
        ("enf_path_chmod", "path_chmod"),
        ("enf_path_chown", "path_chown"),
        ("enf_d_instantiate", "d_instantiate"),
    ];
}

/// The hook that produced a decision. Index into the decision counters.
pub mod hook {
    pub const CONNECT4: u8 = 0;
    pub const CONNECT6: u8 = 1;
    pub const SENDMSG4: u8 = 2;
    pub const SENDMSG6: u8 = 3;
    pub const SOCK_CREATE: u8 = 4;
    pub const FILE_OPEN: u8 = 5;
    pub const FILE_EXEC: u8 = 6;
    pub const FILE_MMAP: u8 = 7;
    /// create, unlink, rename, link, symlink, mkdir, rmdir, truncate, chmod, chown.
    pub const FILE_CHANGE: u8 = 8;
    pub const COUNT: u8 = 9;

    pub const fn name(hook: u8) -> &'static str {
        match hook {
            CONNECT4 => "connect4",
            CONNECT6 => "connect6",
            SENDMSG4 => "sendmsg4",
            SENDMSG6 => "sendmsg6",
            SOCK_CREATE => "sock_create",
            FILE_OPEN => "file_open",
            FILE_EXEC => "bprm_check",
            FILE_MMAP => "mmap_file",
            FILE_CHANGE => "path_change",
            _ => "unknown",
        }
    }
}

/// Outcome of one decision. Index into the decision counters.
pub mod verdict {
    pub const ALLOW: u8 = 0;
    pub const DENY: u8 = 1;
    /// Audit mode: the policy would deny, the operation was allowed.
    pub const AUDIT_DENY: u8 = 2;
    pub const COUNT: u8 = 3;

    pub const fn name(verdict: u8) -> &'static str {
        match verdict {
            ALLOW => "allow",
            DENY => "deny",
            AUDIT_DENY => "audit-deny",
            _ => "unknown",
        }
    }
}

/// Decision counters: `ENF_DECISIONS[slot * DECISION_STRIDE + hook * verdict::COUNT + verdict]`.
pub const DECISION_STRIDE: u32 = 32;
const _: () = assert!((hook::COUNT as u32) * (verdict::COUNT as u32) <= DECISION_STRIDE);

pub const fn decision_index(slot: u32, hook: u8, verdict: u8) -> u32 {
    slot * DECISION_STRIDE + (hook as u32) * (verdict::COUNT as u32) + verdict as u32
}

/// Global per-CPU counters in `ENF_COUNTERS`.
pub mod counter {
    /// Ring-buffer reservations that failed (events lost; verdicts unaffected).
    pub const EVENTS_LOST: u32 = 0;
    /// Decisions made by a program set whose binding holds no policy (fail closed: the
    /// operation is denied).
    pub const MISSING_POLICY: u32 = 1;
    /// Paths created after attach that the kernel could not list because a file table
    /// was full (the slot's file decisions then fail closed).
    pub const FILES_FULL: u32 = 2;
    pub const COUNT: u32 = 4;
}

/// `rule_id` of events decided by the kill switch rather than a rule.
pub const RULE_ISOLATED: u32 = u32::MAX;
/// `rule_id` of events denied because the binding held no policy.
pub const RULE_FAIL_CLOSED: u32 = u32::MAX - 1;

/// Protocol bits used in clauses and policy configs.
pub mod proto {
    pub const TCP: u8 = 1 << 0;
    pub const UDP: u8 = 1 << 1;
    pub const ANY: u8 = TCP | UDP;
}

/// File access kinds, as bits: a policy entry grants a set of them, a request asks for one
/// or more. `write` in a policy implies read.
pub mod access {
    pub const READ: u8 = 1 << 0;
    pub const WRITE: u8 = 1 << 1;
    pub const EXEC: u8 = 1 << 2;
    /// Changing a tree (create, unlink, rename, link, mkdir, rmdir, setattr) needs write.
    pub const ALL: u8 = READ | WRITE | EXEC;
}

pub mod mode {
    pub const ENFORCE: u8 = 0;
    pub const AUDIT: u8 = 1;
}

pub mod action {
    pub const ALLOW: u8 = 0;
    pub const DENY: u8 = 1;
}

/// One attached cgroup (`ENF_BINDINGS[binding]`). Each attach loads its own program
/// set with its binding index baked in as a read-only global, so the hot path finds its
/// policy with two inlined array lookups instead of a cgroup-id helper call and a hash
/// lookup. Replacing a policy rewrites `slot` (slots are < 256: one byte changes, so
/// readers see the old or the new slot, never a mix).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    /// cgroup v2 id of the attach point; 0 = free.
    pub cgroup_id: u64,
    /// Policy slot in force; 0 (or a slot not in use) denies everything.
    pub slot: u32,
    /// Kill switch (`enforcer isolate`): non-zero denies every network operation of the
    /// cgroup, whatever the policy and its mode say.
    pub isolated: u16,
    /// Loopback port (host order) of the controller's DNS proxy for this cgroup; 0 = DNS
    /// is judged like any other traffic. Non-zero sends every port-53 connect and send
    /// there, whichever server they name.
    pub dns_port: u16,
}
const _: () = assert!(size_of::<Binding>() == 16);

/// Per-slot policy settings (`ENF_POLICIES[slot]`). `in_use` is 0 for a free slot; a
/// binding that points at a slot not in use is denied (fail closed).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    pub name: [u8; limits::POLICY_NAME_LEN],
    pub in_use: u8,
    /// `mode::ENFORCE` or `mode::AUDIT`.
    pub mode: u8,
    /// `action::ALLOW` or `action::DENY`: what a destination matched by no rule gets.
    pub network_default: u8,
    /// Emit events for allowed decisions too (denials are always emitted).
    pub log_allowed: u8,
    /// Allow `SOCK_RAW` sockets (still subject to CAP_NET_RAW).
    pub allow_raw_sockets: u8,
    /// Allow ICMP/ICMPv6 datagram ("ping") sockets.
    pub allow_icmp: u8,
    /// Non-zero when the policy has a `files` section: only then are opens judged.
    pub files_enabled: u8,
    /// `access` bits granted where no listed path decides (`files.default`).
    pub files_default: u8,
    /// Set by the kernel when it could not list a path created after attach (a file
    /// table was full): from then on the slot's file decisions fail closed, since the
    /// unlisted path would be judged by a laxer ancestor. A new attach clears it.
    pub files_overflow: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(size_of::<PolicyConfig>() == 80);

impl PolicyConfig {
    pub const fn zeroed() -> Self {
        Self {
            name: [0; limits::POLICY_NAME_LEN],
            in_use: 0,
            mode: 0,
            network_default: 0,
            log_allowed: 0,
            allow_raw_sockets: 0,
            allow_icmp: 0,
            files_enabled: 0,
            files_default: 0,
            files_overflow: 0,
            _pad: [0; 7],
        }
    }

    /// The policy name, up to the first NUL.
    pub fn name_str(&self) -> &str {
        let len = self.name.iter().position(|&b| b == 0).unwrap_or(self.name.len());
        core::str::from_utf8(&self.name[..len]).unwrap_or("<invalid utf-8>")
    }
}

/// LPM trie key data for IPv4: the slot is matched in full (the prefix length of a key
/// is `32 + cidr_len`), then the address bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Net4Key {
    pub slot: u32,
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<Net4Key>() == 8);

/// LPM trie key data for IPv6; prefix length `32 + cidr_len`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Net6Key {
    pub slot: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<Net6Key>() == 20);

/// What DNS answers opened for one address (`ENF_LEARN4/6`, keyed by `Net4Key` /
/// `Net6Key` with the *binding* in `slot`: learned addresses outlive policy reloads and
/// grants). Every clause expires; the kernel skips expired ones, so the controller
/// needs not be alive for an address to close. Consulted only when the policy's own
/// rules left the destination to the default deny.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LearnedClauses {
    pub count: u32,
    pub _pad: u32,
    pub clauses: [Clause; limits::MAX_LEARNED_CLAUSES],
}
const _: () = assert!(size_of::<LearnedClauses>() == 8 + 16 * limits::MAX_LEARNED_CLAUSES);

/// Bits of a key's prefix length taken by the slot.
pub const SLOT_PREFIX_BITS: u32 = 32;

/// One port/protocol condition of a rule: matches when the protocol bit is in
/// `protocols` and `port_lo <= port <= port_hi` (host byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Clause {
    pub port_lo: u16,
    pub port_hi: u16,
    pub protocols: u8,
    /// `action::ALLOW` or `action::DENY`.
    pub action: u8,
    /// 1-based index into the compiled policy's rule list (for events); 0 = default.
    pub rule_id: u16,
    /// CLOCK_BOOTTIME nanoseconds after which the clause no longer applies (a
    /// time-limited grant); 0 = never expires. Checked in the kernel, so it lapses
    /// even if no controller runs.
    pub expires_at: u64,
}
const _: () = assert!(size_of::<Clause>() == 16);

/// Value of an LPM entry: every clause of every rule whose CIDR covers the entry's
/// prefix. Deny clauses win over allow clauses; no match falls back to the default.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixClauses {
    pub count: u32,
    /// How many clauses carry an expiry: the kernel reads the clock (once, before its
    /// loop) only when this is non-zero.
    pub expiring: u32,
    pub clauses: [Clause; limits::MAX_CLAUSES_PER_PREFIX],
}
const _: () = assert!(size_of::<PrefixClauses>() == 8 + 16 * limits::MAX_CLAUSES_PER_PREFIX);

impl PrefixClauses {
    pub const fn empty() -> Self {
        Self {
            count: 0,
            expiring: 0,
            clauses: [Clause { port_lo: 0, port_hi: 0, protocols: 0, action: 0, rule_id: 0, expires_at: 0 };
                limits::MAX_CLAUSES_PER_PREFIX],
        }
    }
}

pub mod family {
    pub const INET: u8 = 2;
    pub const INET6: u8 = 10;
}

/// The server a redirected DNS socket named (`ENF_DNS_ORIG`, keyed by socket cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsOrigin {
    /// The server the socket named, as the socket's family writes it (IPv4 in the first
    /// four bytes; IPv4-mapped for an IPv6 socket sending to IPv4).
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<DnsOrigin>() == 24);

/// DNS redirection to the controller's proxy.
pub mod dns {
    pub const PORT: u16 = 53;
    pub const MAX_REDIRECTED_SOCKETS: u32 = 65_536;
}

/// What follows an `EventHeader` in a record of `ENF_EVENTS`.
pub mod record {
    /// A `NetEvent`: a network decision.
    pub const NET: u8 = 1;
    /// A `FileEvent`: a file decision.
    pub const FILE: u8 = 2;
}

/// The first fields of every record in `ENF_EVENTS`: who decided what, and which record
/// kind follows (`record::*`). Kind 0 is no record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventHeader {
    /// `bpf_ktime_get_boot_ns`: CLOCK_BOOTTIME in nanoseconds.
    pub boot_ns: u64,
    /// The task's own cgroup (may be below the attach point).
    pub cgroup_id: u64,
    /// Thread id and process id (tgid) of the caller.
    pub tid: u32,
    pub pid: u32,
    pub uid: u32,
    pub slot: u32,
    /// 1-based rule index into the policy's compiled rules (or its file rules); 0 = the
    /// default decided; `RULE_ISOLATED` and `RULE_FAIL_CLOSED` for the kill switch and a
    /// binding with no policy.
    pub rule_id: u32,
    pub kind: u8,
    pub hook: u8,
    pub verdict: u8,
    pub _pad: u8,
    pub comm: [u8; 16],
}
const _: () = assert!(size_of::<EventHeader>() == 56);

/// A network decision (`record::NET`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetEvent {
    pub header: EventHeader,
    /// `family::INET` or `family::INET6` as the socket was opened. An IPv4-mapped IPv6
    /// destination is reported as family INET6 with the mapped address in `addr`.
    pub family: u8,
    /// IP protocol number (6 tcp, 17 udp, 1 icmp, ...).
    pub protocol: u8,
    /// Destination port, host byte order.
    pub port: u16,
    /// Socket type (1 stream, 2 dgram, 3 raw), for `sock_create` events.
    pub sock_type: u16,
    pub _pad: u16,
    /// Destination address: 4 bytes for INET, 16 for INET6.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<NetEvent>() == 80);

/// Key of `ENF_FILES`: an inode (device as the kernel encodes `s_dev`: major << 20 |
/// minor) under one policy slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub ino: u64,
    pub dev: u32,
    pub slot: u32,
}
const _: () = assert!(size_of::<FileKey>() == 16);

/// A filter in front of `ENF_FILES`: one byte per hash of (device, inode), non-zero
/// where some slot may list that inode. A walk looks an ancestor up in `ENF_FILES` only
/// where its byte is set, so the ancestors of a file that no rule names cost a load
/// each instead of a hash-table lookup.
///
/// Bytes are only ever set (by the controller through a shared mapping and by the
/// kernel when it lists a path created after attach), never cleared: a byte written by
/// one cannot be lost to the other, and a stale byte costs one lookup that misses.
/// Every inode is marked before its entry is inserted.
///
/// Behind the bytes, `records` holds copies of `ENF_FILES` entries at a hash of
/// (device, inode, slot), so that a walk's marked ancestor is usually answered without
/// a hash-table lookup (see `FileRecord`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FileFilter {
    pub listed: [u8; FileFilter::LEN],
    pub records: [FileRecord; FileFilter::RECORDS],
}
const _: () = assert!(size_of::<FileFilter>() == FileFilter::LEN + FileFilter::RECORDS * 24);
// Mapped whole by the controller: a multiple of the page size.
const _: () = assert!(size_of::<FileFilter>().is_multiple_of(4096));

/// A copy of one `ENF_FILES` entry, in place for the walk.
///
/// Written only while its slot is bound to no cgroup (filled before the binding,
/// emptied after it is gone, by setting `dev_slot` to 0), so a walk for a live slot
/// that finds its own `dev_slot` reads a complete record; `dev_slot` is one aligned
/// word, never seen half written. The one exception is the kernel listing an inode
/// that already has a record (a rename onto a pending path): it rewrites `entry` as
/// one word. An entry that found its record taken lives only in `ENF_FILES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRecord {
    pub ino: u64,
    /// `FileRecord::dev_slot(dev, slot)`; 0: empty (slot 0 is never used).
    pub dev_slot: u64,
    pub entry: FileEntry,
}
const _: () = assert!(size_of::<FileRecord>() == 24);

impl FileRecord {
    #[inline(always)]
    pub const fn dev_slot(dev: u32, slot: u32) -> u64 {
        dev as u64 | (slot as u64) << 32
    }
}

impl FileFilter {
    const BITS: u32 = 16;
    /// 64 KiB: false positives stay near 1.5% with 1,000 listed inodes.
    pub const LEN: usize = 1 << Self::BITS;
    /// 768 KiB of records: 1,000 listed inodes of one slot collide on about 3% of them.
    pub const RECORDS: usize = 1 << 15;

    /// The record of (device, inode) under `slot`: the filter's hash, moved by the
    /// slot so that one inode listed by many slots (`/usr`) takes many records.
    #[inline(always)]
    pub const fn record_index(dev: u32, ino: u64, slot: u32) -> usize {
        // A sum, masked last: the verifier must see the mask (from a xor the compiler
        // moved the mask before it, and 6.1 lost the bound).
        (Self::index(dev, ino) + ((slot as usize) << 7)) & (Self::RECORDS - 1)
    }

    /// The byte of (device, inode): a multiplicative hash, the same in both worlds.
    #[inline(always)]
    pub const fn index(dev: u32, ino: u64) -> usize {
        let mixed = (ino ^ ((dev as u64) << 40) ^ dev as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (mixed >> (64 - Self::BITS)) as usize
    }
}

/// What a listed inode decides for everything beneath it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileEntry {
    /// `access` bits granted (already including what listed ancestors grant).
    pub allow: u8,
    /// Non-zero: a deny rule covers this path; nothing is granted.
    pub deny: u8,
    /// 1-based index into the policy's file rules (for events).
    pub rule_id: u16,
    pub _pad: u32,
}
const _: () = assert!(size_of::<FileEntry>() == 8);

/// Key of `ENF_PENDING`: a listed path that did not exist when the policy was
/// compiled, as (existing parent inode, next component name). When a dentry with that
/// name under that parent gets an inode, the kernel adds it to `ENF_FILES` (or, for a
/// deeper path, adds the next pending component).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PendingKey {
    pub parent_ino: u64,
    pub parent_dev: u32,
    pub slot: u32,
    pub name: [u8; limits::PENDING_NAME_LEN],
}
const _: () = assert!(size_of::<PendingKey>() == 64);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingValue {
    pub entry: FileEntry,
    /// Components still to come after the key's name (0: the key's name is the listed
    /// path itself).
    pub remaining: u32,
    pub _pad: u32,
    pub names: [[u8; limits::PENDING_NAME_LEN]; limits::MAX_PENDING_DEPTH - 1],
}
const _: () = assert!(size_of::<PendingValue>() == 16 + 48 * 3);

/// Offsets into kernel structs, read from the running kernel's BTF when the programs
/// are loaded (Rust eBPF has no CO-RE relocations), so one build runs on 6.1 to 6.18.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelOffsets {
    pub file_f_path_dentry: u32,
    pub file_f_path_mnt: u32,
    pub file_f_mode: u32,
    pub path_dentry: u32,
    pub path_mnt: u32,
    pub dentry_d_parent: u32,
    pub dentry_d_inode: u32,
    pub dentry_d_name_name: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub super_block_s_dev: u32,
    /// Where `struct vfsmount mnt` sits inside `struct mount` (container_of).
    pub mount_mnt: u32,
    pub mount_mnt_parent: u32,
    pub mount_mnt_mountpoint: u32,
    pub linux_binprm_file: u32,
    /// `file.f_inode`, `inode.i_dentry` (its first alias) and `dentry.d_u.d_alias`:
    /// the real file of an overlayfs backing file that carries the overlay's path.
    pub file_f_inode: u32,
    pub inode_i_dentry: u32,
    pub dentry_d_alias: u32,
    /// 1 when this is the real table (a zeroed table makes the programs deny).
    pub valid: u32,
}

const _: () = assert!(size_of::<KernelOffsets>() == 19 * 4);

/// A file decision (`record::FILE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileEvent {
    pub header: EventHeader,
    pub ino: u64,
    /// Kernel-encoded device (major << 20 | minor).
    pub dev: u32,
    /// `access` bits asked for.
    pub requested: u8,
    /// Which change (`change::*`) for `hook::FILE_CHANGE`.
    pub change: u8,
    /// Path components filled, deepest first; more than `EVENT_PATH_PARTS` sets
    /// `truncated`.
    pub parts: u8,
    pub truncated: u8,
    pub path: [[u8; limits::EVENT_PART_LEN]; limits::EVENT_PATH_PARTS],
}
const _: () = assert!(size_of::<FileEvent>() == 72 + limits::EVENT_PART_LEN * limits::EVENT_PATH_PARTS);

/// Tree changes judged by the path hooks.
pub mod change {
    pub const NONE: u8 = 0;
    pub const CREATE: u8 = 1;
    pub const MKDIR: u8 = 2;
    pub const RMDIR: u8 = 3;
    pub const UNLINK: u8 = 4;
    pub const SYMLINK: u8 = 5;
    pub const LINK: u8 = 6;
    pub const RENAME: u8 = 7;
    pub const TRUNCATE: u8 = 8;
    pub const CHMOD: u8 = 9;
    pub const CHOWN: u8 = 10;

    pub const fn name(change: u8) -> &'static str {
        match change {
            CREATE => "create",
            MKDIR => "mkdir",
            RMDIR => "rmdir",
            UNLINK => "unlink",
            SYMLINK => "symlink",
            LINK => "link",
            RENAME => "rename",
            TRUNCATE => "truncate",
            CHMOD => "chmod",
            CHOWN => "chown",
            _ => "none",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    /// Marks map and event types as plain data for aya.
    macro_rules! pod {
        ($($t:ty),* $(,)?) => {$(
            // SAFETY: repr(C), Copy, with no implicit padding (every size is asserted
            // above), and valid for any bit pattern.
            unsafe impl aya::Pod for $t {}
        )*};
    }

    pod!(
        Binding,
        DnsOrigin,
        LearnedClauses,
        PolicyConfig,
        Net4Key,
        Net6Key,
        Clause,
        PrefixClauses,
        NetEvent,
        FileKey,
        FileEntry,
        PendingKey,
        PendingValue,
        KernelOffsets,
        FileEvent,
    );
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::FileFilter;

    /// Inode numbers come in runs (a tree created at once): a run must spread over the
    /// filter, or its false positives would cost a lookup at every ancestor.
    #[test]
    fn file_filter_spreads_runs_of_inodes() {
        let mut seen = std::collections::BTreeSet::new();
        for ino in 1_000_000..1_001_000u64 {
            let i = FileFilter::index(0x0080_0001, ino);
            assert!(i < FileFilter::LEN);
            seen.insert(i);
        }
        assert!(seen.len() >= 990, "1,000 consecutive inodes took {} bytes", seen.len());
        // The same inode number on another device is another byte.
        assert_ne!(FileFilter::index(0x0080_0001, 42), FileFilter::index(0x0080_0002, 42));
    }

    /// One inode listed by every slot (`/usr` in every policy) must not make the slots
    /// share its record, or all but one would pay a lookup at it.
    #[test]
    fn every_slot_has_its_own_record_of_an_inode() {
        let records: std::collections::BTreeSet<_> = (1..crate::limits::MAX_POLICY_SLOTS)
            .map(|slot| FileFilter::record_index(0x0080_0001, 1234, slot))
            .collect();
        assert_eq!(records.len(), crate::limits::MAX_POLICY_SLOTS as usize - 1);
        assert!(records.iter().all(|&r| r < FileFilter::RECORDS));
    }
}
