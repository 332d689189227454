//! Shared lookups: which policy governs the current task, and what a destination's
//! clauses say.
use aya_ebpf::{Global, helpers::generated::bpf_ktime_get_boot_ns};
use enforcer_common::{LearnedClauses, PolicyConfig, PrefixClauses, action, limits};

use crate::maps::{ENF_BINDINGS, ENF_POLICIES};

/// This program set's binding, set by the loader (`names::GLOBAL_BINDING`). The
/// programs only run for sockets of the attached cgroup and its descendants, so the
/// binding names the policy without looking up the task's cgroup.
#[unsafe(no_mangle)]
pub(crate) static ENF_BINDING: Global<u32> = Global::new(0);

/// The policy this program set enforces.
pub enum Governing {
    /// The binding holds no policy (being detached, or a controller died mid-write):
    /// fail closed.
    Broken { slot: u32 },
    /// `isolated`: the kill switch is on; deny whatever the rules say. `dns_port`: the
    /// loopback port of the cgroup's DNS proxy (0 = none).
    Policy { slot: u32, config: &'static PolicyConfig, isolated: bool, dns_port: u16 },
}

#[inline(always)]
pub fn governing_policy() -> Governing {
    let (slot, isolated, dns_port) = match ENF_BINDINGS.get(ENF_BINDING.load()) {
        Some(b) => (b.slot, b.isolated != 0, b.dns_port),
        None => (0, false, 0),
    };
    if slot == 0 || slot >= limits::MAX_POLICY_SLOTS {
        return Governing::Broken { slot: 0 };
    }
    match ENF_POLICIES.get(slot) {
        Some(config) if config.in_use != 0 => {
            // SAFETY: a map value lives as long as the map, which the loaded program keeps: 'static for a program run.
            Governing::Policy { slot, config: unsafe { &*(config as *const PolicyConfig) }, isolated, dns_port }
        }
        _ => Governing::Broken { slot },
    }
}

/// What the rules say about one destination.
pub struct RuleVerdict {
    pub action: u8,
    /// 1-based rule index; 0 when the policy default decided.
    pub rule_id: u32,
}

/// Deny clauses win; otherwise the first matching allow; otherwise the default.
#[inline(always)]
pub fn judge_clauses(clauses: Option<&PrefixClauses>, port: u16, proto_bit: u8, default_action: u8) -> RuleVerdict {
    let mut allow_rule: u32 = 0;
    if let Some(entry) = clauses {
        let count = entry.count as usize;
        // Read the clock only when a clause can expire (most never do), and outside the
        // loop: a helper call inside it multiplies the verifier's work.
        // SAFETY: a helper with no arguments.
        let now = if entry.expiring != 0 { unsafe { bpf_ktime_get_boot_ns() } } else { 0 };
        let mut i = 0;
        while i < limits::MAX_CLAUSES_PER_PREFIX {
            if i >= count {
                break;
            }
            let clause = &entry.clauses[i];
            i += 1;
            if clause.expires_at != 0 && clause.expires_at <= now {
                continue;
            }
            if clause.protocols & proto_bit != 0 && clause.port_lo <= port && port <= clause.port_hi {
                if clause.action == action::DENY {
                    return RuleVerdict { action: action::DENY, rule_id: clause.rule_id as u32 };
                }
                if allow_rule == 0 {
                    allow_rule = clause.rule_id as u32;
                }
            }
        }
    }
    if allow_rule != 0 {
        RuleVerdict { action: action::ALLOW, rule_id: allow_rule }
    } else {
        RuleVerdict { action: default_action, rule_id: 0 }
    }
}

/// The DNS proxy port of this program set's binding (0 = none).
#[inline(always)]
pub fn dns_proxy_port() -> u16 {
    ENF_BINDINGS.get(ENF_BINDING.load()).map_or(0, |b| b.dns_port)
}

/// A destination the rules left to the default deny may still have been opened by a DNS
/// answer: the first unexpired learned clause matching port and protocol allows.
#[inline(always)]
pub fn judge_learned(rule: RuleVerdict, learned: Option<&LearnedClauses>, port: u16, proto_bit: u8) -> RuleVerdict {
    let Some(entry) = learned else { return rule };
    let count = entry.count as usize;
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let mut i = 0;
    while i < limits::MAX_LEARNED_CLAUSES {
        if i >= count {
            break;
        }
        let clause = &entry.clauses[i];
        i += 1;
        if clause.expires_at > now
            && clause.protocols & proto_bit != 0
            && clause.port_lo <= port
            && port <= clause.port_hi
        {
            return RuleVerdict { action: action::ALLOW, rule_id: clause.rule_id as u32 };
        }
    }
    rule
}

/// This program set's binding index.
#[inline(always)]
pub fn binding_index() -> u32 {
    ENF_BINDING.load()
}
