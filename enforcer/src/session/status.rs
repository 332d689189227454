//! What is confined now, read from the pinned tables and the state in /run: for
//! `status` and for every metrics scrape.
use std::collections::BTreeMap;

use enforcer_common::{counter, hook, verdict};
use serde::Serialize;

use crate::{
    bpf::{BpfError, Tables, pins},
    metrics::{CgroupCounters, KernelCounters},
    model::grants::Grant,
    state,
};

#[derive(Debug, Default, Serialize)]
pub struct StatusReport {
    pub attached: Vec<CgroupStatus>,
    pub events_lost: u64,
    /// Operations denied because a binding held no policy.
    pub fail_closed: u64,
    pub file_table_full: u64,
}

#[derive(Debug, Serialize)]
pub struct CgroupStatus {
    pub cgroup: String,
    pub cgroup_id: u64,
    pub isolated: bool,
    pub slot: u32,
    pub policy: Option<String>,
    pub mode: String,
    pub links: usize,
    pub grants: Vec<Grant>,
    /// A file table overflowed: the cgroup's file access fails closed until re-attached.
    pub files_fail_closed: bool,
    /// `hook/verdict` -> decisions, the non-zero ones.
    pub decisions: BTreeMap<String, u64>,
}

/// `status`: every confined cgroup with its policy, links and decisions.
pub fn status_report() -> Result<StatusReport, BpfError> {
    let tables = match Tables::open_pinned() {
        Ok(t) => t,
        Err(BpfError::NotAttached) => return Ok(StatusReport::default()),
        Err(e) => return Err(e),
    };
    let attached = tables
        .confined()
        .into_iter()
        .map(|(cgroup_id, slot)| {
            let config = tables.config(slot);
            let info = state::read_slot_info(slot).unwrap_or_default();
            let decisions = tables
                .decisions(slot)
                .into_iter()
                .filter(|&(_, _, n)| n > 0)
                .map(|(h, v, n)| (format!("{}/{}", hook::name(h), verdict::name(v)), n))
                .collect();
            CgroupStatus {
                cgroup: info.cgroup,
                cgroup_id,
                isolated: tables.is_isolated(cgroup_id),
                slot,
                policy: config.map(|c| c.name_str().to_string()),
                mode: info.mode,
                links: pins::pinned_link_count(cgroup_id),
                grants: state::live_grants(cgroup_id),
                files_fail_closed: config.is_some_and(|c| c.files_overflow != 0),
                decisions,
            }
        })
        .collect();
    Ok(StatusReport {
        attached,
        events_lost: tables.counter(counter::EVENTS_LOST),
        fail_closed: tables.counter(counter::MISSING_POLICY),
        file_table_full: tables.counter(counter::FILES_FULL),
    })
}

/// The kernel's counters for a metrics scrape; `None` when nothing is attached.
pub fn kernel_counters() -> Option<KernelCounters> {
    let tables = Tables::open_pinned().ok()?;
    let cgroups = tables
        .confined()
        .into_iter()
        .filter_map(|(cgroup_id, slot)| {
            let config = tables.config(slot)?;
            let info = state::read_slot_info(slot).unwrap_or_default();
            Some(CgroupCounters {
                cgroup: info.cgroup,
                policy: config.name_str().to_string(),
                mode: info.mode,
                isolated: tables.is_isolated(cgroup_id),
                decisions: tables.decisions(slot),
            })
        })
        .collect();
    Some(KernelCounters {
        cgroups,
        events_lost: tables.counter(counter::EVENTS_LOST),
        fail_closed: tables.counter(counter::MISSING_POLICY),
        files_full: tables.counter(counter::FILES_FULL),
    })
}
