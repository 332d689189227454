//! Types and constants shared by the kernel programs (`enforcer-ebpf`) and the
//! controller (`enforcer`). Everything here crosses the kernel/user boundary, so every
//! type is `#[repr(C)]`, `Copy`, has no implicit padding and a size asserted at compile
//! time. The `user` feature adds `aya::Pod` impls.
#![no_std]

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
    /// Distinct prefixes per address family summed over all policy slots.
    pub const MAX_PREFIXES_PER_FAMILY: u32 = 131_072;
    /// Length of a policy name in the kernel config (NUL padded).
    pub const POLICY_NAME_LEN: usize = 64;
    /// Events ring buffer size in bytes (a power of two, a multiple of the page size).
    /// 16 MiB holds ~190,000 events: two seconds of a 100,000/s burst while the reader
    /// is descheduled (4 MiB lost events in `cargo xtask bench` on a 2-core machine).
    pub const EVENTS_RING_BYTES: u32 = 1 << 24;
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
}

/// The hook that produced a decision. Index into the decision counters.
pub mod hook {
    pub const CONNECT4: u8 = 0;
    pub const CONNECT6: u8 = 1;
    pub const SENDMSG4: u8 = 2;
    pub const SENDMSG6: u8 = 3;
    pub const SOCK_CREATE: u8 = 4;
    pub const COUNT: u8 = 5;

    pub const fn name(hook: u8) -> &'static str {
        match hook {
            CONNECT4 => "connect4",
            CONNECT6 => "connect6",
            SENDMSG4 => "sendmsg4",
            SENDMSG6 => "sendmsg6",
            SOCK_CREATE => "sock_create",
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
pub const DECISION_STRIDE: u32 = 16;
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
    pub isolated: u32,
}
const _: () = assert!(core::mem::size_of::<Binding>() == 16);

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
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PolicyConfig>() == 72);

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
            _pad: [0; 2],
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
const _: () = assert!(core::mem::size_of::<Net4Key>() == 8);

/// LPM trie key data for IPv6; prefix length `32 + cidr_len`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Net6Key {
    pub slot: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<Net6Key>() == 20);

/// Bits of a key's prefix length taken by the slot.
pub const SLOT_PREFIX_BITS: u32 = 32;

/// One port/protocol condition of a rule: matches when the protocol bit is in
/// `protocols` and `port_lo <= port <= port_hi` (host byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
const _: () = assert!(core::mem::size_of::<Clause>() == 16);

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
const _: () = assert!(core::mem::size_of::<PrefixClauses>() == 8 + 16 * limits::MAX_CLAUSES_PER_PREFIX);

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

/// One decision, as the kernel reports it through `ENF_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetEvent {
    /// `bpf_ktime_get_boot_ns`: CLOCK_BOOTTIME in nanoseconds.
    pub boot_ns: u64,
    pub cgroup_id: u64,
    /// Thread id and process id (tgid) of the caller.
    pub tid: u32,
    pub pid: u32,
    pub uid: u32,
    pub slot: u32,
    /// 1-based rule index into the policy's compiled rules; 0 = the default decided.
    pub rule_id: u32,
    pub hook: u8,
    pub verdict: u8,
    /// `family::INET` or `family::INET6` as the socket was opened. An IPv4-mapped IPv6
    /// destination is reported as family INET6 with the mapped address in `addr`.
    pub family: u8,
    /// IP protocol number (6 tcp, 17 udp, 1 icmp, ...).
    pub protocol: u8,
    /// Destination port, host byte order.
    pub port: u16,
    /// Socket type (1 stream, 2 dgram, 3 raw), for `sock_create` events.
    pub sock_type: u16,
    /// Destination address: 4 bytes for INET, 16 for INET6.
    pub addr: [u8; 16],
    pub comm: [u8; 16],
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<NetEvent>() == 80);

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all types are repr(C), Copy, with no implicit padding (sizes asserted).
    unsafe impl aya::Pod for Binding {}
    unsafe impl aya::Pod for PolicyConfig {}
    unsafe impl aya::Pod for Net4Key {}
    unsafe impl aya::Pod for Net6Key {}
    unsafe impl aya::Pod for Clause {}
    unsafe impl aya::Pod for PrefixClauses {}
    unsafe impl aya::Pod for NetEvent {}
}
