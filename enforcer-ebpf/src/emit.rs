//! Decision counters and events. A failed ring-buffer reservation is counted and never
//! changes a verdict.
use aya_ebpf::helpers::generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns};
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_probe_read_kernel_str_bytes,
};
use enforcer_common::{EventHeader, FileEvent, KernelOffsets, NetEvent, counter, decision_index, limits, record};

use crate::{
    kmem::{read_ptr, read_u32, read_u64},
    maps::{ENF_COUNTERS, ENF_DECISIONS, ENF_EVENTS},
};

#[inline(always)]
fn bump(map: &aya_ebpf::maps::PerCpuArray<u64>, index: u32) {
    if let Some(value) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU counter slot the map returned for this CPU, valid for the program run.
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
        header: EventHeader {
            // SAFETY: a helper with no arguments.
            boot_ns: unsafe { bpf_ktime_get_boot_ns() },
            // Looked up only here, off the hot allow path: names the task's own cgroup,
            // which may be below the attach point.
            // SAFETY: a helper with no arguments.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            tid: pid_tgid as u32,
            pid: (pid_tgid >> 32) as u32,
            uid: bpf_get_current_uid_gid() as u32,
            slot: d.slot,
            rule_id: d.rule_id,
            kind: record::NET,
            hook: d.hook,
            verdict: d.verdict,
            _pad: 0,
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
        },
        family: d.family,
        protocol: d.protocol,
        port: d.port,
        sock_type: d.sock_type,
        _pad: 0,
        addr: d.addr,
    };
    entry.write(event);
    entry.submit(0);
}

/// What a file hook knows about a decision.
pub struct FileDecision {
    pub slot: u32,
    pub rule_id: u32,
    pub hook: u8,
    pub verdict: u8,
    pub requested: u8,
    pub change: u8,
}

/// Emits a file decision with the path's components, deepest first (the controller
/// joins them). Walks the same way as the judge, but only when an event is due.
#[inline(always)]
pub fn emit_file_event(d: &FileDecision, o: &KernelOffsets, dentry: *const u8, vfsmount: *const u8) {
    let Some(mut entry) = ENF_EVENTS.reserve::<FileEvent>(0) else {
        count(counter::EVENTS_LOST);
        return;
    };
    let event = entry.as_mut_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    let inode = read_ptr(dentry, o.dentry_d_inode);
    let sb = read_ptr(inode, o.inode_i_sb);
    // Field by field, scalars only: array assignments into ring-buffer memory become
    // calls to a `memset` subprogram, which LSM programs cannot pass that memory to.
    // SAFETY: `event` points at a reserved record of FileEvent's size, ours until
    // submitted; the helpers take no pointers but `comm`, which is 16 bytes inside it.
    unsafe {
        let header = core::ptr::addr_of_mut!((*event).header);
        (*header).boot_ns = bpf_ktime_get_boot_ns();
        (*header).cgroup_id = bpf_get_current_cgroup_id();
        (*header).tid = pid_tgid as u32;
        (*header).pid = (pid_tgid >> 32) as u32;
        (*header).uid = bpf_get_current_uid_gid() as u32;
        (*header).slot = d.slot;
        (*header).rule_id = d.rule_id;
        (*header).kind = record::FILE;
        (*header).hook = d.hook;
        (*header).verdict = d.verdict;
        (*header)._pad = 0;
        (*event).ino = read_u64(inode, o.inode_i_ino);
        (*event).dev = read_u32(sb, o.super_block_s_dev);
        (*event).requested = d.requested;
        (*event).change = d.change;
        (*event).truncated = 0;
        let comm = core::ptr::addr_of_mut!((*header).comm);
        if aya_ebpf::helpers::generated::bpf_get_current_comm(comm.cast(), 16) != 0 {
            (*header).comm[0] = 0;
        }
    }
    let mut dentry = dentry;
    let mut vfsmount = vfsmount;
    // One component per step, a mount crossing's "/" included (the controller drops
    // those): every step then leaves the same state and the verifier prunes.
    let mut parts: usize = 0;
    while parts < limits::EVENT_PATH_PARTS {
        let parent = read_ptr(dentry, o.dentry_d_parent);
        let mount = (vfsmount as usize).wrapping_sub(o.mount_mnt as usize) as *const u8;
        let parent_mount = read_ptr(mount, o.mount_mnt_parent);
        let mountpoint = read_ptr(mount, o.mount_mnt_mountpoint);
        if dentry.is_null() || (parent == dentry && (parent_mount.is_null() || parent_mount == mount)) {
            break;
        }
        let name = read_ptr(dentry, o.dentry_d_name_name);
        // SAFETY: `event` is our reserved record; `parts` < EVENT_PATH_PARTS indexes inside it.
        let slot = unsafe { &mut (*event).path[parts] };
        // SAFETY: the helper bounds its write by `slot`, a 32-byte array of our record.
        if unsafe { bpf_probe_read_kernel_str_bytes(name, slot) }.is_err() {
            slot[0] = 0;
        }
        parts += 1;
        if parent == dentry {
            dentry = mountpoint;
            vfsmount = (parent_mount as usize).wrapping_add(o.mount_mnt as usize) as *const u8;
        } else {
            dentry = parent;
        }
    }
    // SAFETY: `event` points at our reserved record until it is submitted.
    unsafe {
        (*event).parts = parts as u8;
        // Stopped by the bound with ancestors left: the path is cut at the top.
        (*event).truncated = (!dentry.is_null() && read_ptr(dentry, o.dentry_d_parent) != dentry) as u8;
    }
    entry.submit(0);
}
