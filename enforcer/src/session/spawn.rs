//! Running the agent of `enforcer run`: who it runs as, joining the cgroup before its
//! first instruction, and removing the cgroup afterwards.
use std::{
    ffi::CString,
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    path::Path,
    process::ExitStatus,
};

use std::collections::BTreeMap;

use anyhow::Context as _;
use landlock::{
    Access as _, AccessFs, CompatLevel, Compatible as _, PathBeneath, PathFd, Ruleset, RulesetAttr as _,
    RulesetCreated, RulesetCreatedAttr as _, Scope,
};
use nix::{
    fcntl::OFlag,
    sys::stat::Mode,
    unistd::{Gid, Uid, setgid, setgroups, setsid, setuid},
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition as Cond, SeccompFilter, SeccompRule,
};
use tracing::{info, warn};

use crate::{
    host::{
        self, cgroup,
        users::{self, Account},
    },
    model::policy::IpcPolicy,
};

/// Socket families every agent may create: the network rules judge inet, AF_UNIX is
/// local, and AF_NETLINK is allowed for NETLINK_ROUTE only (the C library's lookups).
const BASE_FAMILIES: [u64; 4] =
    [libc::AF_UNIX as u64, libc::AF_INET as u64, libc::AF_INET6 as u64, libc::AF_NETLINK as u64];

/// What `run` puts around the agent beyond its cgroup, in every process it starts:
/// - a session of its own (`setsid`): no controlling terminal, so no TIOCSTI into the
///   operator's shell and no sudo ticket bound to that terminal;
/// - `no_new_privs`: setuid programs (sudo, su, pkexec) do not raise its privileges;
/// - a Landlock domain: no ptrace, process_vm_readv/writev or pidfd_getfd of processes
///   outside it (ABI 2+), no signals to them and no connects to abstract unix sockets
///   they made (ABI 6+);
/// - a seccomp filter: sockets only of the families the rules judge or `spec.ipc.families`
///   lists, no io_uring (its socket operation would pass the filter), and, where the
///   kernel has no Landlock, no ptrace family at all.
pub struct Hardening {
    landlock: Option<RulesetCreated>,
    seccomp: BpfProgram,
}

impl Hardening {
    pub fn new(ipc: &IpcPolicy) -> anyhow::Result<Self> {
        let abi = host::landlock_abi();
        // ABI 1 refuses every link and rename across directories under any ruleset
        // (git and package managers would break): a domain needs ABI 2, whose Refer
        // right, granted everywhere, keeps them working.
        let landlock = if abi >= 2 {
            let ruleset = Ruleset::default()
                .set_compatibility(CompatLevel::BestEffort)
                // MakeBlock: a right the agent has no use for (block devices need
                // CAP_MKNOD); the domain is what matters, and it needs a handled right.
                .handle_access(AccessFs::MakeBlock | AccessFs::Refer)?
                .scope(Scope::from_all(landlock::ABI::V6))?
                .create()
                .context("creating the agent's Landlock ruleset")?
                .add_rule(PathBeneath::new(PathFd::new("/")?, AccessFs::Refer))
                .context("letting the agent link and rename across directories")?;
            Some(ruleset)
        } else {
            None
        };
        match abi {
            0 | 1 => warn!(
                abi,
                "no usable Landlock on this kernel (ABI 2 is needed): the agent may still signal, and connect to \
                 abstract sockets of, its user's other processes (ptrace is refused by seccomp)"
            ),
            2..=5 => warn!(
                abi,
                "Landlock ABI below 6: the agent may still signal its user's other processes and connect to \
                 their abstract unix sockets"
            ),
            _ => info!(abi, "agent hardening: own session, no_new_privs, Landlock domain and scopes, seccomp"),
        }
        Ok(Self { landlock, seccomp: seccomp_filter(ipc, abi < 2)? })
    }
}

/// The agent's seccomp filter: EPERM for the listed syscalls (and arguments), everything
/// else allowed.
fn seccomp_filter(ipc: &IpcPolicy, deny_ptrace: bool) -> anyhow::Result<BpfProgram> {
    let family_is = |op, family: u64| Cond::new(0, SeccompCmpArgLen::Dword, op, family);
    let allowed: Vec<u64> =
        BASE_FAMILIES.into_iter().chain(ipc.families.iter().map(|f| u64::from(f.number()))).collect();
    let mut family_rules = vec![SeccompRule::new(
        allowed.iter().map(|&f| family_is(SeccompCmpOp::Ne, f)).collect::<Result<Vec<_>, _>>()?,
    )?];
    if !ipc.families.iter().any(|f| f.number() == libc::AF_NETLINK as u32) {
        // AF_NETLINK for any protocol but NETLINK_ROUTE (0).
        family_rules.push(SeccompRule::new(vec![
            family_is(SeccompCmpOp::Eq, libc::AF_NETLINK as u64)?,
            Cond::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, 0)?,
        ])?);
    }
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_socket, family_rules.clone());
    rules.insert(libc::SYS_socketpair, family_rules);
    rules.insert(libc::SYS_io_uring_setup, Vec::new());
    if deny_ptrace {
        for nr in [libc::SYS_ptrace, libc::SYS_process_vm_readv, libc::SYS_process_vm_writev, libc::SYS_pidfd_getfd] {
            rules.insert(nr, Vec::new());
        }
    }
    let arch = std::env::consts::ARCH.try_into().context("seccomp: this architecture")?;
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch)?;
    Ok(filter.try_into()?)
}

/// Who `run` runs the command as: `--user`, else the sudo caller, else the caller.
pub fn choose_run_as(user: Option<&str>) -> anyhow::Result<Option<Account>> {
    if let Some(name) = user {
        return Ok(Some(users::lookup(name)?));
    }
    if let Ok(name) = std::env::var("SUDO_USER")
        && !name.is_empty()
        && name != "root"
    {
        return Ok(Some(users::lookup(&name)?));
    }
    if nix::unistd::geteuid().is_root() {
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
    run_as: Option<&Account>,
    hardening: Hardening,
) -> anyhow::Result<std::process::Child> {
    let procs = CString::new(cgroup_path.join("cgroup.procs").as_os_str().as_encoded_bytes())
        .context("cgroup path contains NUL")?;
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    let ids = run_as.map(|u| {
        (Uid::from_raw(u.uid), Gid::from_raw(u.gid), u.groups.iter().map(|&g| Gid::from_raw(g)).collect::<Vec<_>>())
    });
    if let Some(user) = run_as {
        cmd.env("HOME", &user.home).env("USER", &user.name).env("LOGNAME", &user.name);
    }
    let Hardening { mut landlock, seccomp } = hardening;
    let join_and_drop = move || -> std::io::Result<()> {
        setsid()?;
        let fd = nix::fcntl::open(procs.as_c_str(), OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
        // "0" moves the writing process itself.
        if nix::unistd::write(&fd, b"0")? != 1 {
            return Err(std::io::Error::other("short write to cgroup.procs"));
        }
        drop(fd);
        if let Some((uid, gid, groups)) = &ids {
            setgroups(groups)?;
            setgid(*gid)?;
            setuid(*uid)?;
        }
        nix::sys::prctl::set_no_new_privs()?;
        if let Some(ruleset) = landlock.take() {
            ruleset.restrict_self().map_err(std::io::Error::other)?;
        }
        seccompiler::apply_filter(&seccomp).map_err(std::io::Error::other)?;
        Ok(())
    };
    // SAFETY: the closure runs between fork and exec and makes only async-signal-safe
    // calls (setsid, open, write, close, set*id, prctl, landlock_restrict_self, seccomp),
    // allocating nothing on the way that succeeds.
    unsafe { cmd.pre_exec(join_and_drop) };
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
