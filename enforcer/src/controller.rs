//! The commands users script against: attach, run, detach, status. Each puts the pure
//! policy/compile output and the loader together; nothing here speaks bpf(2) itself.
use std::{
    ffi::CString,
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    path::{Path, PathBuf},
    process::ExitStatus,
    sync::{Arc, RwLock, atomic::Ordering},
};

use anyhow::{Context as _, bail};
use aya::maps::{MapData, RingBuf};
use serde_json::json;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};
use tracing::{info, warn};

use crate::{
    alerts::Detector,
    cgroup,
    compile::{CompiledPolicy, compile_policy},
    events::{self, Enricher},
    files::{self, FileTables},
    grants::{self, Grant},
    loader::{self, ProgramSet, StateLock, Tables},
    policy::Policy,
    sinks::{FanOut, Outgoing},
};
use enforcer_common::{hook, verdict};

/// A cgroup under enforcement by this controller.
pub struct Confinement {
    pub id: u64,
    /// The cgroup as users name it (`/agent.slice`).
    pub display: String,
    pub programs: ProgramSet,
    pub files: FileEnforcement,
    pub policy: String,
    pub slot: u32,
    pub binding: u32,
    /// The DNS proxy's sockets, bound before the policy was installed (their port is in
    /// the binding); `start_dns` serves them.
    pub dns: Option<crate::learned::DnsListeners>,
}

impl Confinement {
    /// Says that enforcement is complete (kernel hooks and, for fanotify, the listener):
    /// scripts and tests wait for this line.
    pub fn announce(&self) {
        info!(cgroup = %self.display, cgroup_id = self.id, policy = %self.policy, slot = self.slot, files = self.files.name(), "attached");
    }
}

/// `--file-backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FileBackendChoice {
    /// BPF-LSM when its programs load here, else fanotify (with a warning saying why).
    Auto,
    BpfLsm,
    Fanotify,
}

/// How file rules are applied to a cgroup and what `~` means in them.
#[derive(Clone, Debug)]
pub struct FileOptions {
    pub home: PathBuf,
    pub backend: FileBackendChoice,
}

/// Who enforces the file rules of a confinement.
pub enum FileEnforcement {
    /// The policy has no file rules.
    None,
    /// The kernel: stays in force without a controller.
    BpfLsm,
    /// This controller, through fanotify permission events: only while it runs. The
    /// tables are shared with the judge and replaced on reload.
    Fanotify { state: Arc<RwLock<FanotifyState>> },
}

impl FileEnforcement {
    pub fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::BpfLsm => "bpf-lsm",
            Self::Fanotify { .. } => "fanotify",
        }
    }
}

/// What the fanotify judge needs of the policy in force, in memory: its listener
/// thread must not open files (its own open would wait for itself).
pub struct FanotifyState {
    pub slot: u32,
    pub audit: bool,
    pub log_allowed: bool,
    pub tables: FileTables,
}

impl FanotifyState {
    fn new(slot: u32, compiled: &CompiledPolicy, tables: FileTables) -> Self {
        Self {
            slot,
            audit: compiled.config.mode == enforcer_common::mode::AUDIT,
            log_allowed: compiled.config.log_allowed != 0,
            tables,
        }
    }
}

/// Compiles the network rules (pure) and, when the policy has file rules, the file
/// tables against this machine's filesystem.
pub fn compile_all(policy: &Policy, home: &Path) -> anyhow::Result<CompiledPolicy> {
    let mut compiled = compile_policy(policy)?;
    if let Some(fp) = &policy.files {
        let tables = files::compile(fp, home).map_err(|e| anyhow::anyhow!("policy {}: {e}", policy.name))?;
        compiled.config.files_enabled = 1;
        compiled.config.files_default = tables.default_grants;
        compiled.files = Some(tables);
        compiled.home = Some(home.to_path_buf());
    }
    Ok(compiled)
}

/// Offsets and cgroup level for the BPF-LSM programs of a cgroup.
fn lsm_hooks(mount: &Path, path: &Path) -> anyhow::Result<loader::FileHooks> {
    let btf = crate::btf::KernelBtf::from_running_kernel()?;
    let offsets = loader::kernel_offsets(&btf)?;
    let level = path.strip_prefix(mount).map(|rel| rel.components().count() as u32).unwrap_or(0);
    Ok(loader::FileHooks { offsets, cgroup_level: level })
}

/// Writes the policy for the cgroup, then attaches the hooks (policy first, so the
/// first decision already has it). A re-attach replaces the policy in one map update.
pub fn confine(mount: &Path, path: &Path, base: &Policy, opts: &FileOptions) -> anyhow::Result<Confinement> {
    cgroup::check_safe_to_confine(mount, path)?;
    cgroup::create(path)?;
    let id = cgroup::cgroup_id(path)?;
    let shown = cgroup::display_path(mount, path);
    let _lock = StateLock::acquire()?;
    // Grants outlive a re-attach until they expire.
    let compiled = compile_all(&grants::apply(base, &grants::live(id)), &opts.home)?;
    let binding = match Tables::open_pinned() {
        Ok(tables) => tables.binding_for(id)?,
        Err(loader::LoaderError::NotAttached) => 1, // the first attach creates the tables
        Err(e) => return Err(e.into()),
    };
    // The proxy's port goes into the binding with the policy, so DNS is redirected from
    // the first decision on; its settings are checked before anything is attached.
    let dns = match &base.dns {
        None => None,
        Some(_) => {
            crate::learned::proxy_rules(base)?;
            Some(crate::learned::bind_listeners()?)
        }
    };
    let dns_port = loader::DnsPort::Set(dns.as_ref().map_or(0, |l| l.port));
    let started = std::time::Instant::now();
    let (mut programs, files) = match &compiled.files {
        None => (ProgramSet::load(binding, None)?, FileEnforcement::None),
        Some(tables) => {
            let lsm = match opts.backend {
                FileBackendChoice::Fanotify => Err(anyhow::anyhow!("--file-backend fanotify was asked for")),
                _ => lsm_hooks(mount, path).and_then(|hooks| Ok(ProgramSet::load(binding, Some(hooks))?)),
            };
            match lsm {
                Ok(programs) => (programs, FileEnforcement::BpfLsm),
                Err(e) if opts.backend == FileBackendChoice::BpfLsm => {
                    return Err(e.context("--file-backend bpf-lsm: the BPF-LSM programs cannot be used"));
                }
                Err(e) => {
                    crate::fanotify::Fanotify::probe().map_err(|why| {
                        anyhow::anyhow!(
                            "the policy has file rules but neither backend works here: BPF-LSM: {e:#}; fanotify: {why}"
                        )
                    })?;
                    let reason = format!("{e:#}");
                    if opts.backend == FileBackendChoice::Auto {
                        warn!(
                            "BPF-LSM not used ({reason}); file rules are enforced by fanotify permission events \
                             in this controller: they stop when it stops"
                        );
                    }
                    let shared = Arc::new(RwLock::new(FanotifyState::new(0, &compiled, tables.clone())));
                    (ProgramSet::load(binding, None)?, FileEnforcement::Fanotify { state: shared })
                }
            }
        }
    };
    info!(elapsed_ms = started.elapsed().as_millis() as u64, files = files.name(), "programs loaded and verified");
    let mut tables = Tables::open_pinned()?;
    let had_links = loader::pinned_link_count(id) > 0;
    let slot = tables.install(binding, id, &shown, &compiled, base, dns_port)?;
    if let FileEnforcement::Fanotify { state, .. } = &files {
        state.write().expect("file tables lock").slot = slot;
    }
    if let Err(e) = programs.attach(path, id) {
        if !had_links {
            // Nothing of ours was enforcing here before: leave no policy behind.
            let _ = loader::detach_links(id);
            let _ = tables.uninstall(id);
        }
        return Err(e.into());
    }
    tracing::debug!(cgroup = %shown, cgroup_id = id, policy = %compiled.name, binding, slot, "policy installed");
    Ok(Confinement { id, display: shown, programs, files, policy: compiled.name, slot, binding, dns })
}

/// Re-installs a confined cgroup's policy from `base` (SIGHUP in `attach`), keeping its
/// grants, in one binding update. The programs stay as they are.
pub fn reinstall(
    mount: &Path,
    path: &Path,
    base: &Policy,
    opts: &FileOptions,
    files: &FileEnforcement,
    dns: Option<&crate::learned::DnsService>,
) -> anyhow::Result<u32> {
    let id = cgroup::cgroup_id(path)?;
    let shown = cgroup::display_path(mount, path);
    let _lock = StateLock::acquire()?;
    let mut tables = Tables::open_pinned()?;
    anyhow::ensure!(tables.slot_of(id).is_some(), "{shown} is no longer confined (detached?)");
    let compiled = compile_all(&grants::apply(base, &grants::live(id)), &opts.home)?;
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
        crate::learned::proxy_rules(base)?;
    }
    let binding = tables.binding_for(id)?;
    // Without DNS rules port 53 is judged like any port again; the proxy idles.
    let dns_port = match (base.dns.is_some(), dns) {
        (true, Some(service)) => loader::DnsPort::Set(service.port),
        _ => loader::DnsPort::Set(0),
    };
    let slot = tables.install(binding, id, &shown, &compiled, base, dns_port)?;
    if let (FileEnforcement::Fanotify { state, .. }, Some(new)) = (files, compiled.files.clone()) {
        *state.write().expect("file tables lock") = FanotifyState::new(slot, &compiled, new);
    }
    if let (Some(service), Some(_)) = (dns, &base.dns) {
        service.reload(base)?;
    }
    Ok(slot)
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
        Err(loader::LoaderError::NotAttached) => return Err(not_confined()),
        Err(e) => return Err(e.into()),
    };
    let slot = tables.slot_of(id).ok_or_else(not_confined)?;
    let base = loader::read_slot_info(slot).and_then(|info| info.spec).with_context(|| {
        format!("the state of {shown}'s policy is missing under {}; attach it again", loader::STATE_DIR)
    })?;
    let mut grants = grants::live(id);
    change(&mut grants)?;
    let info = loader::read_slot_info(slot).unwrap_or_default();
    let home = info.home.clone().unwrap_or_else(|| PathBuf::from("/root"));
    let compiled = compile_all(&grants::apply(&base, &grants), &home)?;
    let binding = tables.binding_for(id)?;
    tables.install(binding, id, &shown, &compiled, &base, loader::DnsPort::Keep)?;
    grants::save(id, &grants).context("saving grants")?;
    Ok(grants)
}

/// Removes enforcement from a cgroup: links first (the programs stop), then the policy.
pub fn unconfine(id: u64) -> anyhow::Result<(usize, Option<u32>)> {
    let _lock = StateLock::acquire()?;
    let links = loader::detach_links(id)?;
    let _ = grants::save(id, &[]);
    let slot = match Tables::open_pinned() {
        Ok(mut tables) => {
            let slot = tables.uninstall(id)?;
            if tables.confined().is_empty() {
                drop(tables);
                // Nothing is confined any more: leave no pins behind.
                loader::remove_pins()?;
            }
            slot
        }
        Err(loader::LoaderError::NotAttached) => None,
        Err(e @ loader::LoaderError::IncompatiblePin { .. }) => {
            // Another build's state: this cgroup's links are gone with the rest of its
            // pins once no cgroup has links left (nothing of that build enforces then).
            if loader::any_links_pinned() {
                warn!("{e}; its other cgroups are still attached, so its maps stay pinned");
            } else {
                loader::remove_pins()?;
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
pub fn kill_switch(mount: &Path, path: &Path, isolate: bool, freeze: bool) -> anyhow::Result<serde_json::Value> {
    let id = cgroup::cgroup_id(path)?;
    let shown = cgroup::display_path(mount, path);
    let _lock = StateLock::acquire()?;
    let mut tables = match Tables::open_pinned() {
        Ok(t) => t,
        Err(loader::LoaderError::NotAttached) => bail!("{shown} is not confined by enforcer: attach a policy first"),
        Err(e) => return Err(e.into()),
    };
    let policy = tables.slot_of(id).and_then(|s| tables.config(s)).map(|c| c.name_str().to_string());
    if !tables.set_isolated(id, isolate)? {
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
    Ok(json!({
        "@timestamp": events::rfc3339_nanos(events::unix_now_ns()),
        "event": { "kind": "event", "category": ["configuration"], "action": action, "type": ["change"], "outcome": "success" },
        "enforcer": { "isolated": isolate, "frozen": frozen },
        "cgroup": { "path": shown, "id": id },
        "policy": { "name": policy },
        "user": { "id": unsafe { libc::getuid() }.to_string() },
        "process": { "pid": std::process::id() },
    }))
}

/// Pause after draining the ring, so that one wakeup reads a batch.
const READ_BATCH_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

/// Reads decision events from the ring buffer and hands them to the sinks until `stop`
/// resolves; then lets the sinks write what they hold.
pub async fn stream_events(
    ring: RingBuf<MapData>,
    mut enricher: Enricher,
    sinks: FanOut,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    // SAFETY: the RingBuf owns its fd and lives inside the AsyncFd, so the fd stays open
    // for as long as it is registered.
    let mut ring =
        unsafe { AsyncFd::register(ring) }.map_err(|e| anyhow::anyhow!("polling the events ring buffer: {e}"))?;
    let mut detector = Detector::new(Path::new(loader::STATE_DIR).join("seen"));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("events ring buffer")?;
                drain(guard.get_inner_mut(), &mut enricher, &mut detector, &sinks);
                guard.clear_ready();
                // Let events gather: without this a busy agent wakes us once per event.
                // The ring holds about half a second at 100,000 events/s.
                tokio::time::sleep(READ_BATCH_PAUSE).await;
            }
            () = &mut stop => break,
        }
    }
    // Decisions made just before the stop are still in the ring.
    drain(ring.get_mut(), &mut enricher, &mut detector, &sinks);
    sinks.finish();
    Ok(())
}

fn drain(ring: &mut RingBuf<MapData>, enricher: &mut Enricher, detector: &mut Detector, sinks: &FanOut) {
    while let Some(item) = ring.next() {
        let Some(ev) = events::decode(&item) else { continue };
        let doc = enricher.to_ecs(&ev);
        let slot = enricher.slot_info(ev.slot());
        let default_alerts = crate::policy::Alerts::default();
        let alerts = slot.spec.as_ref().map_or(&default_alerts, |p| &p.alerts);
        for alert in detector.observe(&doc, alerts, std::time::Instant::now()) {
            sinks.publish(Outgoing::new(&alert));
        }
        // Allowed decisions reach the kernel's ring for new-destination alerts too;
        // only log_allowed puts them in the sinks.
        let log_allowed = slot.spec.as_ref().is_none_or(|p| p.log_allowed);
        if ev.verdict() != enforcer_common::verdict::ALLOW || log_allowed {
            sinks.publish(Outgoing::new(&doc));
        }
    }
}

/// Reloads the policy file on every SIGHUP; a policy that fails to parse or compile is
/// refused with its file:line:column and the one in force stays.
pub async fn reload_on_hangup(
    mount: PathBuf,
    path: PathBuf,
    file: PathBuf,
    mode: Option<crate::policy::Mode>,
    opts: FileOptions,
    files: Arc<FileEnforcement>,
    dns: Option<Arc<crate::learned::DnsService>>,
) {
    let Ok(mut hup) = tokio::signal::unix::signal(SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        let result = crate::policy::parse_policy_file(&file).map_err(anyhow::Error::from).and_then(|mut policy| {
            if let Some(mode) = mode {
                policy.mode = mode;
            }
            reinstall(&mount, &path, &policy, &opts, &files, dns.as_deref())
        });
        match result {
            Ok(slot) => {
                crate::POLICY_RELOADS.fetch_add(1, Ordering::Relaxed);
                info!(policy = %file.display(), slot, "policy reloaded");
            }
            Err(e) => {
                crate::POLICY_RELOAD_FAILURES.fetch_add(1, Ordering::Relaxed);
                tracing::error!("policy reload refused, the previous policy stays in force: {e:#}");
            }
        }
    }
}

/// Serves the confinement's DNS proxy, if its policy has one.
pub fn start_dns(
    confinement: &mut Confinement,
    policy: &Policy,
    publisher: crate::sinks::Publisher,
) -> anyhow::Result<Option<Arc<crate::learned::DnsService>>> {
    let Some(listeners) = confinement.dns.take() else { return Ok(None) };
    let port = listeners.port;
    let service = crate::learned::start(
        listeners,
        confinement.binding,
        policy,
        publisher,
        confinement.display.clone(),
        confinement.id,
    )?;
    info!(port, "DNS proxy serving the cgroup's DNS on 127.0.0.1 and ::1");
    Ok(Some(Arc::new(service)))
}

pub async fn terminated() {
    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
}

pub async fn start_metrics(addr: Option<&str>) -> anyhow::Result<()> {
    if let Some(addr) = addr {
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening for metrics on {addr}"))?;
        info!(addr = %listener.local_addr()?, "serving metrics at /metrics");
        tokio::spawn(crate::metrics::serve(listener));
    }
    Ok(())
}

/// The user a confined command runs as.
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub home: String,
}

pub fn lookup_user(name: &str) -> anyhow::Result<RunAs> {
    let c_name = CString::new(name).context("user name contains NUL")?;
    let pw = unsafe { libc::getpwnam(c_name.as_ptr()) };
    if pw.is_null() {
        bail!("no such user: {name}");
    }
    let (uid, gid, home) =
        unsafe { ((*pw).pw_uid, (*pw).pw_gid, std::ffi::CStr::from_ptr((*pw).pw_dir).to_string_lossy().into_owned()) };
    let mut count: libc::c_int = 64;
    let mut groups = vec![0 as libc::gid_t; count as usize];
    if unsafe { libc::getgrouplist(c_name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) } < 0 {
        groups.resize(count as usize, 0);
        unsafe { libc::getgrouplist(c_name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
    }
    groups.truncate(count.max(0) as usize);
    Ok(RunAs { name: name.into(), uid, gid, groups, home })
}

/// Who `run` runs the command as: `--user`, else the sudo caller, else the caller.
pub fn choose_run_as(user: Option<&str>) -> anyhow::Result<Option<RunAs>> {
    if let Some(name) = user {
        return lookup_user(name).map(Some);
    }
    if let Ok(name) = std::env::var("SUDO_USER") {
        if !name.is_empty() && name != "root" {
            return lookup_user(&name).map(Some);
        }
    }
    if unsafe { libc::geteuid() } == 0 {
        warn!(
            "no unprivileged user known (no --user, no SUDO_USER): the command runs as root, \
             and root can leave its cgroup or detach the programs; pass --user NAME"
        );
    }
    Ok(None)
}

/// Starts `argv` inside the cgroup: the child joins it between fork and exec, so the
/// command's first instruction already runs confined; then it drops to `run_as`.
pub fn spawn_confined(
    cgroup_path: &Path,
    argv: &[String],
    run_as: Option<&RunAs>,
) -> anyhow::Result<std::process::Child> {
    let procs = CString::new(cgroup_path.join("cgroup.procs").as_os_str().as_encoded_bytes())
        .context("cgroup path contains NUL")?;
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    let ids = run_as.map(|u| (u.uid, u.gid, u.groups.clone()));
    if let Some(user) = run_as {
        cmd.env("HOME", &user.home).env("USER", &user.name).env("LOGNAME", &user.name);
    }
    // SAFETY: only async-signal-safe calls (open, write, close, set*id) after fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writing process itself.
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((uid, gid, groups)) = &ids {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting {}", argv[0]))
}

/// Kills what is left in a cgroup we created and removes it.
pub fn remove_run_cgroup(path: &Path) {
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    for _ in 0..100 {
        let empty = std::fs::read_to_string(path.join("cgroup.procs")).map(|p| p.trim().is_empty()).unwrap_or(true);
        if empty {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if let Err(e) = cgroup::remove(path) {
        warn!(error = %e, "could not remove the run cgroup");
    }
}

/// Exit code of the confined command, shell style (128 + signal when killed).
pub fn exit_code(status: ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// `status`: every confined cgroup with its policy, links and decisions.
pub fn status_report() -> anyhow::Result<serde_json::Value> {
    let tables = match Tables::open_pinned() {
        Ok(t) => t,
        Err(loader::LoaderError::NotAttached) => return Ok(json!({ "attached": [] })),
        Err(e) => return Err(e.into()),
    };
    let mut attached = Vec::new();
    for (cgroup_id, slot) in tables.confined() {
        let config = tables.config(slot);
        let info = loader::read_slot_info(slot).unwrap_or_default();
        let mut decisions = serde_json::Map::new();
        for (h, v, n) in tables.decisions(slot) {
            if n > 0 {
                decisions.insert(format!("{}/{}", hook::name(h), verdict::name(v)), json!(n));
            }
        }
        attached.push(json!({
            "cgroup": info.cgroup,
            "cgroup_id": cgroup_id,
            "isolated": tables.is_isolated(cgroup_id),
            "slot": slot,
            "policy": config.map(|c| c.name_str().to_string()),
            "mode": info.mode,
            "links": loader::pinned_link_count(cgroup_id),
            "grants": grants::live(cgroup_id),
            // A file table overflowed: the cgroup's file access fails closed until re-attached.
            "files_fail_closed": config.is_some_and(|c| c.files_overflow != 0),
            "decisions": decisions,
        }));
    }
    Ok(json!({
        "attached": attached,
        "events_lost": tables.counter(enforcer_common::counter::EVENTS_LOST),
        "fail_closed": tables.counter(enforcer_common::counter::MISSING_POLICY),
        "file_table_full": tables.counter(enforcer_common::counter::FILES_FULL),
    }))
}

/// Whether `pid` sits in the cgroup `shown` (as `display_path` names it) or below.
fn pid_in_cgroup(pid: u32, shown: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else { return false };
    text.lines()
        .filter_map(|l| l.strip_prefix("0::"))
        .any(|rel| rel == shown || (rel.starts_with(shown) && rel.as_bytes().get(shown.len()) == Some(&b'/')))
}

/// Starts the fanotify backend for a confinement whose file rules it enforces: opens
/// by processes of the cgroup are judged with the shared tables, the same way as the
/// kernel's walk (`files::judge_path`). The listener only stats paths and reads /proc;
/// events are built and published on another thread (enrichment opens files).
pub fn start_fanotify(
    conf: &Confinement,
    mount: &Path,
    attach_point: &Path,
    publisher: crate::sinks::Publisher,
) -> anyhow::Result<Option<crate::fanotify::Fanotify>> {
    let FileEnforcement::Fanotify { state, .. } = &conf.files else { return Ok(None) };
    let state = state.clone();
    let shown = conf.display.clone();
    let cgroup_id = conf.id;
    let (tx, rx) = std::sync::mpsc::sync_channel::<events::FileFacts>(65_536);
    let mut enricher = Enricher::new(mount, attach_point);
    std::thread::Builder::new()
        .name("fanotify-events".into())
        .spawn(move || {
            for facts in rx {
                let doc = enricher.file_to_ecs(&facts);
                publisher.publish(Outgoing::new(&doc));
            }
        })
        .context("starting the fanotify event thread")?;
    let judge = move |req: &crate::fanotify::FileRequest| -> bool {
        if !pid_in_cgroup(req.pid, &shown) {
            return true;
        }
        let guard = state.read().expect("file tables lock");
        let decided = files::judge_path(&guard.tables, &req.path, req.access);
        let v = if decided.allowed {
            verdict::ALLOW
        } else if guard.audit {
            verdict::AUDIT_DENY
        } else {
            verdict::DENY
        };
        if v != verdict::ALLOW || guard.log_allowed {
            let proc_file =
                |name: &str| std::fs::read_to_string(format!("/proc/{}/{name}", req.pid)).unwrap_or_default();
            let uid = proc_file("status")
                .lines()
                .find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().next()?.parse().ok())
                .unwrap_or(u32::MAX);
            let facts = events::FileFacts {
                unix_ns: events::unix_now_ns(),
                pid: req.pid,
                tid: req.pid,
                uid,
                comm: proc_file("comm").trim().to_string(),
                cgroup_id,
                slot: guard.slot,
                rule_id: decided.rule_id as u32,
                hook: if req.access & enforcer_common::access::EXEC != 0 { hook::FILE_EXEC } else { hook::FILE_OPEN },
                verdict: v,
                requested: req.access,
                change: enforcer_common::change::NONE,
                path: req.path.display().to_string(),
                inode: req.ino,
                device: files::kernel_dev(req.dev),
                backend: "fanotify",
            };
            if tx.try_send(facts).is_err() {
                crate::sinks::count_dropped("fanotify-events");
            }
        }
        v != verdict::DENY
    };
    Ok(Some(crate::fanotify::Fanotify::start(Box::new(judge))?))
}
