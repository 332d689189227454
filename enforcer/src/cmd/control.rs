//! The operator's commands on a confined cgroup: the kill switch, grants, detach,
//! status. Each change is recorded as an event before the command returns.
use std::process::ExitCode;

use anyhow::Context as _;
use tracing::info;

use crate::{
    events::{Cgroup, Enforcer, Event, GrantChange},
    host::{self, cgroup},
    model::grants::{self, Grant},
    session::{self, status::StatusReport},
    sinks::{Outgoing, Rotation, Sink},
};

/// A sink for one record; opened before the action: an action that cannot be recorded
/// is not taken.
fn record_sink(events: &str) -> anyhow::Result<Sink> {
    Sink::open(events, Rotation { max_bytes: u64::MAX, keep: 1 })
        .with_context(|| format!("opening events sink {events}"))
}

pub fn kill_switch(name: &str, isolate: bool, freeze: bool, events: &str) -> anyhow::Result<ExitCode> {
    let mount = cgroup::cgroup2_mount()?;
    let path = cgroup::resolve(&mount, name)?;
    let mut sink = record_sink(events)?;
    let record = session::kill_switch(&mount, &path, isolate, freeze)?;
    sink.write_event(&Outgoing::new(&record)).context("recording the action")?;
    Ok(ExitCode::SUCCESS)
}

pub fn grant(name: &str, allow: &str, ttl: &str, reason: Option<String>, events: &str) -> anyhow::Result<ExitCode> {
    let (net, ports) = grants::parse_allow(allow).map_err(anyhow::Error::msg)?;
    let ttl = grants::parse_ttl(ttl).map_err(anyhow::Error::msg)?;
    let allow = allow.to_string();
    change_grants(name, events, "grant", move |list| {
        let id = list.iter().map(|g| g.id).max().unwrap_or(0) + 1;
        list.push(Grant {
            id,
            allow,
            net,
            ports,
            expires_at: host::boot_now_ns() + ttl.as_nanos() as u64,
            expires: host::rfc3339_nanos(host::unix_now_ns() + ttl.as_nanos() as i128),
            reason,
            granted_by_uid: host::users::current_uid(),
        });
        Ok(id)
    })
}

pub fn revoke(name: &str, id: u32, events: &str) -> anyhow::Result<ExitCode> {
    change_grants(name, events, "revoke", move |list| {
        let before = list.len();
        list.retain(|g| g.id != id);
        anyhow::ensure!(list.len() < before, "no live grant with id {id}");
        Ok(id)
    })
}

/// Runs a grant change and records it as an event.
fn change_grants(
    name: &str,
    events: &str,
    action: &str,
    change: impl FnOnce(&mut Vec<Grant>) -> anyhow::Result<u32>,
) -> anyhow::Result<ExitCode> {
    let mount = cgroup::cgroup2_mount()?;
    let path = cgroup::resolve(&mount, name)?;
    let mut sink = record_sink(events)?;
    let mut changed = 0;
    let list = session::update_grants(&mount, &path, |list| {
        changed = change(list)?;
        Ok(())
    })?;
    let detail = list.into_iter().find(|g| g.id == changed);
    let record = Event::change(
        action,
        Cgroup { path: cgroup::display_path(&mount, &path), id: None },
        Enforcer { grant: Some(GrantChange { id: changed, detail }), ..Enforcer::default() },
    );
    sink.write_event(&Outgoing::new(&record)).context("recording the change")?;
    Ok(ExitCode::SUCCESS)
}

pub fn detach(name: &str) -> anyhow::Result<ExitCode> {
    let mount = cgroup::cgroup2_mount()?;
    let path = cgroup::resolve(&mount, name)?;
    let id = cgroup::cgroup_id(&path)?;
    let (links, slot) = session::unconfine(id)?;
    if links == 0 && slot.is_none() {
        anyhow::bail!("{} is not confined by enforcer", cgroup::display_path(&mount, &path));
    }
    info!(cgroup = %cgroup::display_path(&mount, &path), links, "detached");
    Ok(ExitCode::SUCCESS)
}

pub fn status(json: bool) -> anyhow::Result<ExitCode> {
    let report = session::status::status_report()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_status(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(report: &StatusReport) {
    if report.attached.is_empty() {
        println!("no cgroup is confined");
        return;
    }
    println!("{:<32} {:<20} {:<8} {:<8} {:>5}  decisions", "CGROUP", "POLICY", "MODE", "ISOLATED", "LINKS");
    for a in &report.attached {
        let decisions = a.decisions.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ");
        println!(
            "{:<32} {:<20} {:<8} {:<8} {:>5}  {}",
            a.cgroup,
            a.policy.as_deref().unwrap_or("<none>"),
            a.mode,
            if a.isolated { "YES" } else { "no" },
            a.links,
            decisions
        );
        for g in &a.grants {
            println!(
                "    grant {} allow {} until {}{}",
                g.id,
                g.allow,
                g.expires,
                g.reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default()
            );
        }
    }
    println!("events lost: {}   fail-closed denials: {}", report.events_lost, report.fail_closed);
}
