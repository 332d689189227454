//! Running the agent of `enforcer run`: who it runs as, joining the cgroup before its
//! first instruction, and removing the cgroup afterwards.
use std::{
    ffi::CString,
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    path::Path,
    process::ExitStatus,
};

use anyhow::Context as _;
use nix::{
    fcntl::OFlag,
    sys::stat::Mode,
    unistd::{Gid, Uid, setgid, setgroups, setuid},
};
use tracing::warn;

use crate::host::{
    cgroup,
    users::{self, Account},
};

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
    let join_and_drop = move || -> std::io::Result<()> {
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
        Ok(())
    };
    // SAFETY: the closure runs between fork and exec and makes only async-signal-safe
    // calls (open, write, close, setgroups, setgid, setuid), allocating nothing.
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
