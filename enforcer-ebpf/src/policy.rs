//! Shared lookups: which policy governs the current task, and what a destination's
//! clauses say.
use aya_ebpf::helpers::generated::{
    bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id,
};
use enforcer_common::{PolicyConfig, PrefixClauses, action, limits};

use crate::maps::{ENF_CGROUPS, ENF_POLICIES};

/// The policy governing the current task.
pub enum Governing {
    /// No policy on the task's cgroup or any ancestor: not ours to judge.
    None,
    /// The slot is mapped but holds no policy: fail closed.
    Broken { cgroup_id: u64, slot: u32 },
    Policy { cgroup_id: u64, slot: u32, config: &'static PolicyConfig },
}

/// Nearest policy: the task's own cgroup first (the common case: the agent runs in the
/// attached cgroup), then its ancestors from the deepest up.
#[inline(always)]
pub fn governing_policy() -> Governing {
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if let Some(slot) = unsafe { ENF_CGROUPS.get(&cgroup_id) } {
        return with_config(cgroup_id, *slot);
    }
    // Levels deeper than the task's cgroup return 0; level 0 is the root.
    let mut level = limits::MAX_CGROUP_DEPTH as i32;
    while level > 0 {
        level -= 1;
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor == 0 {
            continue;
        }
        if let Some(slot) = unsafe { ENF_CGROUPS.get(&ancestor) } {
            return with_config(cgroup_id, *slot);
        }
    }
    Governing::None
}

#[inline(always)]
fn with_config(cgroup_id: u64, slot: u32) -> Governing {
    match ENF_POLICIES.get(slot) {
        Some(config) if config.in_use != 0 => Governing::Policy {
            cgroup_id,
            slot,
            config: unsafe { &*(config as *const PolicyConfig) },
        },
        _ => Governing::Broken { cgroup_id, slot },
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
pub fn judge_clauses(
    clauses: Option<&PrefixClauses>,
    port: u16,
    proto_bit: u8,
    default_action: u8,
) -> RuleVerdict {
    let mut allow_rule: u32 = 0;
    if let Some(entry) = clauses {
        let count = entry.count as usize;
        let mut i = 0;
        while i < limits::MAX_CLAUSES_PER_PREFIX {
            if i >= count {
                break;
            }
            let clause = &entry.clauses[i];
            if clause.protocols & proto_bit != 0 && clause.port_lo <= port && port <= clause.port_hi {
                if clause.action == action::DENY {
                    return RuleVerdict { action: action::DENY, rule_id: clause.rule_id as u32 };
                }
                if allow_rule == 0 {
                    allow_rule = clause.rule_id as u32;
                }
            }
            i += 1;
        }
    }
    if allow_rule != 0 {
        RuleVerdict { action: action::ALLOW, rule_id: allow_rule }
    } else {
        RuleVerdict { action: default_action, rule_id: 0 }
    }
}
