//! Decision counters and events. A failed ring-buffer reservation is counted and never
//! changes a verdict.
use aya_ebpf::helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid};
use aya_ebpf::helpers::generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns};
use enforcer_common::{NetEvent, counter, decision_index};

use crate::maps::{ENF_COUNTERS, ENF_DECISIONS, ENF_EVENTS};

#[inline(always)]
fn bump(map: &aya_ebpf::maps::PerCpuArray<u64>, index: u32) {
    if let Some(value) = map.get_ptr_mut(index) {
        unsafe { *value += 1 };
    }
}

#[inline(always)]
pub fn count_decision(slot: u32, hook: u8, verdict: u8) {
    bump(&ENF_DECISIONS, decision_index(slot, hook, verdict));
}

#[inline(always)]
pub fn count(counter_index: u32) {
    bump(&ENF_COUNTERS, counter_index);
}

/// The fields of an event that the hook knows; the rest is filled in here.
pub struct Decision {
    pub slot: u32,
    pub rule_id: u32,
    pub hook: u8,
    pub verdict: u8,
    pub family: u8,
    pub protocol: u8,
    pub port: u16,
    pub sock_type: u16,
    pub addr: [u8; 16],
}

#[inline(always)]
pub fn emit_event(d: &Decision) {
    let Some(mut entry) = ENF_EVENTS.reserve::<NetEvent>(0) else {
        count(counter::EVENTS_LOST);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let event = NetEvent {
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        // Looked up only here, off the hot allow path: names the task's own cgroup,
        // which may be below the attach point.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tid: pid_tgid as u32,
        pid: (pid_tgid >> 32) as u32,
        uid: bpf_get_current_uid_gid() as u32,
        slot: d.slot,
        rule_id: d.rule_id,
        hook: d.hook,
        verdict: d.verdict,
        family: d.family,
        protocol: d.protocol,
        port: d.port,
        sock_type: d.sock_type,
        addr: d.addr,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        _pad: 0,
    };
    entry.write(event);
    entry.submit(0);
}
