//! Confining a cgroup and changing what confines it: attach, reload, grants, the kill
//! switch, detach. Each puts the pure policy/compile output, the BPF tables and the
//! state in /run together, under the state lock.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, bail};
use tracing::{info, warn};

use super::backend::{self, FanotifyState, FileEnforcement, FileOptions};
use crate::{
    bpf::{BpfError, DnsPort, ProgramSet, Tables, pins},
    dns::service::{self as dns, DnsListeners, DnsService},
    events::{Cgroup, Enforcer, Event, PolicyRef},
    host::cgroup,
    model::{
        CompiledPolicy, Policy, compile_policy, file_tables,
        grants::{self, Grant},
        policy::Mode,
    },
    state::{self, SlotInfo, StateLock},
};

/// A cgroup under enforcement by this controller.
pub struct Confinement {
    pub id: u64,
    /// The cgroup as users name it (`/agent.slice`).
    pub display: String,
    pub programs: ProgramSet,
    pub files: Arc<FileEnforcement>,
    pub policy: String,
    pub slot: u32,
    pub binding: u32,
    /// The DNS proxy's sockets, bound before the policy was installed (their port is in
    /// the binding); the session serves them.
    pub dns: Option<DnsListeners>,
}

impl Confinement {
    /// Says that enforcement is complete (kernel hooks and, for fanotify, the listener):
    /// scripts and tests wait for this line.
    pub fn announce(&self) {
        info!(cgroup = %self.display, cgroup_id = self.id, policy = %self.policy, slot = self.slot, files = self.files.name(), "attached");
    }
}

/// Compiles the network rules (pure) and, when the policy has file rules, the file
/// tables against this machine's filesystem.
pub fn compile_all(policy: &Policy, home: &Path) -> anyhow::Result<CompiledPolicy> {
    let mut compiled = compile_policy(policy)?;
    if let Some(fp) = &policy.files {
        let tables = file_tables::compile(fp, home).map_err(|e| anyhow::anyhow!("policy {}: {e}", policy.name))?;
        compiled.config.files_enabled = 1;
        compiled.config.files_default = tables.default_grants;
        compiled.files = Some(tables);
        compiled.home = Some(home.to_path_buf());
    }
    Ok(compiled)
}

/// Installs a compiled policy for a cgroup: written into a free slot, named in the
/// state (so its first event can be named), then bound in one map update; the slot it
/// replaces is emptied. On any error the cgroup keeps its previous policy. Call with the
/// `StateLock` held.
fn install(
    tables: &mut Tables,
    binding: u32,
    cgroup_id: u64,
    shown: &str,
    compiled: &CompiledPolicy,
    base: &Policy,
    dns_port: DnsPort,
) -> anyhow::Result<u32> {
    let slot = tables.prepare_slot(cgroup_id, compiled)?;
    let info = SlotInfo {
        policy: compiled.name.clone(),
        mode: if compiled.config.mode == enforcer_common::mode::AUDIT { "audit" } else { "enforce" }.into(),
        cgroup: shown.into(),
        rules: compiled.rules.iter().map(|r| r.name.clone()).collect(),
        file_rules: compiled
            .files
            .as_ref()
            .map(|f| f.rules.iter().map(|r| r.name.clone()).collect())
            .unwrap_or_default(),
        home: compiled.home.clone(),
        spec: Some(base.clone()),
    };
    let bound = state::write_slot_info(slot, &info)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(tables.bind(binding, cgroup_id, slot, dns_port)?));
    match bound {
        Ok(replaced) => {
            if let Some(old) = replaced {
                state::remove_slot_info(old);
            }
            Ok(slot)
        }
        Err(e) => {
            let _ = tables.clear_slot(slot);
            state::remove_slot_info(slot);
            Err(e)
        }
    }
}

/// How many times a policy is compiled again for paths created while it was installed.
const MAX_RECOMPILES: usize = 3;

/// A listed path that was missing at compile time and exists now was created before
/// the kernel could adopt it (between compile and the flip, or, for a first attach,
/// before the programs were attached): compiles and installs the policy again, so the
/// path is listed by its inode. Returns the compiled policy in force.
fn relist_created(
    tables: &mut Tables,
    binding: u32,
    cgroup_id: u64,
    shown: &str,
    compile: &dyn Fn() -> anyhow::Result<CompiledPolicy>,
    mut compiled: CompiledPolicy,
    base: &Policy,
) -> anyhow::Result<(u32, CompiledPolicy)> {
    let mut slot = tables.slot_of(cgroup_id).unwrap_or(0);
    for _ in 0..MAX_RECOMPILES {
        if !compiled.files.as_ref().is_some_and(|f| f.missed_creations()) {
            break;
        }
        info!(cgroup = %shown, "a listed path appeared while the policy was installed; compiling it again");
        compiled = compile()?;
        slot = install(tables, binding, cgroup_id, shown, &compiled, base, DnsPort::Keep)?;
    }
    Ok((slot, compiled))
}

/// Writes the policy for the cgroup, then attaches the hooks (policy first, so the
/// first decision already has it). A re-attach replaces the policy in one map update.
///
/// The state lock is held only around table changes: the programs verify (seconds, and
/// minutes under emulation) without it, so other commands are not kept waiting; the
/// binding they are loaded for is reserved first.
pub fn confine(mount: &Path, path: &Path, base: &Policy, opts: &FileOptions) -> anyhow::Result<Confinement> {
    cgroup::check_safe_to_confine(mount, path)?;
    cgroup::create(path)?;
    let id = cgroup::cgroup_id(path)?;
    let shown = cgroup::display_path(mount, path);
    // Grants outlive a re-attach until they expire.
    let compiled = compile_all(&grants::apply(base, &state::live_grants(id)), &opts.home)?;
    // The proxy's port goes into the binding with the policy, so DNS is redirected from
    // the first decision on; its settings are checked before anything is attached.
    let dns = match &base.dns {
        None => None,
        Some(_) => {
            dns::proxy_rules(base)?;
            Some(dns::bind_listeners()?)
        }
    };
    let dns_port = DnsPort::Set(dns.as_ref().map_or(0, |l| l.port));
    let lock = StateLock::acquire()?;
    let (binding, reserved, lock) = match Tables::open_pinned() {
        Ok(mut tables) => {
            let reserved = tables.binding_of(id).is_none();
            let binding = tables.reserve_binding(id)?;
            drop(lock);
            (binding, reserved, None)
        }
        // The first attach creates the tables: it keeps the lock while it loads.
        Err(BpfError::NotAttached) => (1, true, Some(lock)),
        Err(e) => return Err(e.into()),
    };
    let started = std::time::Instant::now();
    info!(cgroup = %shown, "loading and verifying the kernel programs (seconds; minutes under software emulation)");
    let loaded = backend::load_programs(mount, path, binding, &compiled, opts.backend);
    let _lock = match lock {
        Some(held) => held,
        None => StateLock::acquire()?,
    };
    let mut tables = Tables::open_pinned()?;
    let forget = |tables: &mut Tables| {
        if reserved && let Ok(Some(slot)) = tables.uninstall(id) {
            state::remove_slot_info(slot);
        }
    };
    let (mut programs, files) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            forget(&mut tables);
            return Err(e);
        }
    };
    info!(elapsed_ms = started.elapsed().as_millis() as u64, files = files.name(), "programs loaded and verified");
    anyhow::ensure!(tables.reserve_binding(id)? == binding, "binding {binding} of {shown} was taken meanwhile");
    // Compiled again: paths may have been created while the programs verified.
    let compile = || compile_all(&grants::apply(base, &state::live_grants(id)), &opts.home);
    let compiled = match compile() {
        Ok(compiled) => compiled,
        Err(e) => {
            forget(&mut tables);
            return Err(e);
        }
    };
    let had_links = pins::pinned_link_count(id) > 0;
    if let Err(e) = install(&mut tables, binding, id, &shown, &compiled, base, dns_port) {
        forget(&mut tables);
        return Err(e);
    }
    if let Err(e) = programs.attach(path, id) {
        if !had_links {
            // Nothing of ours was enforcing here before: leave no policy behind.
            let _ = pins::detach_links(id);
            forget(&mut tables);
        }
        return Err(e.into());
    }
    let (slot, compiled) = relist_created(&mut tables, binding, id, &shown, &compile, compiled, base)?;
    if let (FileEnforcement::Fanotify { state }, Some(tables)) = (&files, &compiled.files) {
        *state.write().expect("file tables lock") = FanotifyState::new(slot, &compiled, tables.clone());
    }
    tracing::debug!(cgroup = %shown, cgroup_id = id, policy = %compiled.name, binding, slot, "policy installed");
    Ok(Confinement { id, display: shown, programs, files: Arc::new(files), policy: compiled.name, slot, binding, dns })
}

/// Re-installs a confined cgroup's policy from `base` (SIGHUP in `attach`), keeping its
/// grants, in one binding update. The programs stay as they are.
pub fn reinstall(
    mount: &Path,
    path: &Path,
    base: &Policy,
    opts: &FileOptions,
    files: &FileEnforcement,
    dns: Option<&DnsService>,
) -> anyhow::Result<u32> {
    let id = cgroup::cgroup_id(path)?;
    let shown = cgroup::display_path(mount, path);
    let _lock = StateLock::acquire()?;
    let mut tables = Tables::open_pinned()?;
    anyhow::ensure!(tables.slot_of(id).is_some(), "{shown} is no longer confined (detached?)");
    let compile = || compile_all(&grants::apply(base, &state::live_grants(id)), &opts.home);
    let compiled = compile()?;
    // Never leave file rules unenforced: the programs (or fanotify) come with an attach.
    anyhow::ensure!(
        compiled.files.is_none() || !matches!(files, FileEnforcement::None),
        "the new policy has file rules but this attach started without them: attach again to enforce them"
    );
    anyhow::ensure!(
        base.dns.is_none() || dns.is_some(),
        "the new policy has domain rules or a dns section but this attach started without them: attach again"
    );
    if base.dns.is_some() {
        dns::proxy_rules(base)?;
    }
    let binding = tables.binding_of(id).with_context(|| format!("{shown} is no longer confined (detached?)"))?;
    // Without DNS rules port 53 is judged like any port again; the proxy idles.
    let dns_port = match (base.dns.is_some(), dns) {
        (true, Some(service)) => DnsPort::Set(service.port),
        _ => DnsPort::Set(0),
    };
    install(&mut tables, binding, id, &shown, &compiled, base, dns_port)?;
    let (slot, compiled) = relist_created(&mut tables, binding, id, &shown, &compile, compiled, base)?;
    if let (FileEnforcement::Fanotify { state }, Some(new)) = (files, compiled.files.clone()) {
        *state.write().expect("file tables lock") = FanotifyState::new(slot, &compiled, new);
    }
    if let (Some(service), Some(_)) = (dns, &base.dns) {
        service.reload(base)?;
    }
    Ok(slot)
}

/// Parses the policy file again and applies `mode` over it.
pub fn reload_policy(file: &Path, mode: Option<Mode>) -> anyhow::Result<Policy> {
    let mut policy = crate::model::parse_policy_file(file)?;
    if let Some(mode) = mode {
        policy.mode = mode;
    }
    Ok(policy)
}

/// `grant` / `revoke`: changes a confined cgroup's grants and re-installs its policy
/// with them (a new slot and one binding update, as for a re-attach). Returns the
/// grants after the change.
pub fn update_grants(
    mount: &Path,
    path: &Path,
    change: impl FnOnce(&mut Vec<Grant>) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Grant>> {
    let id = cgroup::cgroup_id(path)?;
    let shown = cgroup::display_path(mount, path);
    let _lock = StateLock::acquire()?;
    let not_confined = || anyhow::anyhow!("{shown} is not confined by enforcer: attach a policy first");
    let mut tables = match Tables::open_pinned() {
        Ok(t) => t,
        Err(BpfError::NotAttached) => return Err(not_confined()),
        Err(e) => return Err(e.into()),
    };
    let slot = tables.slot_of(id).ok_or_else(not_confined)?;
    let info = state::read_slot_info(slot).unwrap_or_default();
    let base = info.spec.clone().with_context(|| {
        format!("the state of {shown}'s policy is missing under {}; attach it again", state::STATE_DIR)
    })?;
    let before = state::live_grants(id);
    let mut grants = before.clone();
    change(&mut grants)?;
    let home = info.home.clone().unwrap_or_else(|| PathBuf::from("/root"));
    let compile = || compile_all(&grants::apply(&base, &grants), &home);
    let compiled = compile()?;
    let binding = tables.binding_of(id).ok_or_else(not_confined)?;
    // Recorded first: a grant that cannot be recorded is not given.
    state::save_grants(id, &grants).context("saving grants")?;
    let installed = install(&mut tables, binding, id, &shown, &compiled, &base, DnsPort::Keep)
        .and_then(|_| relist_created(&mut tables, binding, id, &shown, &compile, compiled, &base));
    if let Err(e) = installed {
        let _ = state::save_grants(id, &before);
        return Err(e);
    }
    Ok(grants)
}

/// Removes enforcement from a cgroup: links first (the programs stop), then the policy.
pub fn unconfine(id: u64) -> anyhow::Result<(usize, Option<u32>)> {
    let _lock = StateLock::acquire()?;
    let links = pins::detach_links(id)?;
    let _ = state::save_grants(id, &[]);
    let slot = match Tables::open_pinned() {
        Ok(mut tables) => {
            let slot = tables.uninstall(id)?;
            if let Some(slot) = slot {
                state::remove_slot_info(slot);
            }
            if tables.confined().is_empty() {
                drop(tables);
                // Nothing is confined any more: leave no pins behind.
                pins::remove_pins()?;
            }
            slot
        }
        Err(BpfError::NotAttached) => None,
        Err(e @ BpfError::IncompatiblePin { .. }) => {
            // Another build's state: this cgroup's links are gone with the rest of its
            // pins once no cgroup has links left (nothing of that build enforces then).
            if pins::any_links_pinned() {
                warn!("{e}; its other cgroups are still attached, so its maps stay pinned");
            } else {
                pins::remove_pins()?;
                info!("removed the pinned state another enforcer build left behind");
            }
            None
        }
        Err(e) => return Err(e.into()),
    };
    Ok((links, slot))
}

/// `isolate` / `release`: flips the kill switch of a confined cgroup and, with
/// `freeze`, freezes or thaws its processes (cgroup.freeze) for forensics. Returns the
/// event that records it.
pub fn kill_switch(mount: &Path, path: &Path, isolate: bool, freeze: bool) -> anyhow::Result<Event> {
    let id = cgroup::cgroup_id(path)?;
    let shown = cgroup::display_path(mount, path);
    // No state lock: the switch is one store into the binding, which a concurrent
    // install leaves alone (see `bpf::bindings`). An agent or a stuck command cannot
    // delay it.
    let tables = match Tables::open_pinned() {
        Ok(t) => t,
        Err(BpfError::NotAttached) => bail!("{shown} is not confined by enforcer: attach a policy first"),
        Err(e) => return Err(e.into()),
    };
    let policy = tables.slot_of(id).and_then(|s| tables.config(s)).map(|c| c.name_str().to_string());
    if !tables.set_isolated(id, isolate) {
        bail!("{shown} is not confined by enforcer: attach a policy first");
    }
    let frozen = if freeze || !isolate {
        // release always thaws: a frozen cgroup that is released must run again.
        let value = if isolate { "1" } else { "0" };
        let file = path.join("cgroup.freeze");
        match std::fs::write(&file, value) {
            Ok(()) => Some(isolate),
            Err(e) if freeze => return Err(e).with_context(|| format!("writing {}", file.display())),
            Err(_) => None,
        }
    } else {
        None
    };
    let action = if isolate { "isolate" } else { "release" };
    info!(cgroup = %shown, action, frozen = ?frozen, "kill switch");
    let mut event = Event::change(
        action,
        Cgroup { path: shown, id: Some(id) },
        Enforcer { isolated: Some(isolate), frozen, ..Enforcer::default() },
    );
    event.policy = Some(PolicyRef { name: policy, mode: None });
    Ok(event)
}
