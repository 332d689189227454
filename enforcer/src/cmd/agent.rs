//! `attach` and `run`: one session start, then serving until a signal (attach) or until
//! the agent exits (run).
use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use tracing::info;

use super::{fan_out, file_options, load_policy, runtime};
use crate::{
    cli::FileArgs,
    host::{cgroup, users},
    model::policy::Mode,
    session::{self, Session, spawn},
    sinks::{Rotation, Sink, SyslogTarget},
};

pub struct AttachArgs {
    pub cgroup: String,
    pub policy_file: PathBuf,
    pub mode: Option<Mode>,
    pub events: String,
    pub rotation: Rotation,
    pub syslog: Vec<SyslogTarget>,
    pub metrics_addr: Option<String>,
    pub files: FileArgs,
    pub agent_user: Option<String>,
}

pub fn attach(args: AttachArgs) -> anyhow::Result<ExitCode> {
    let (policy, _) = load_policy(&args.policy_file, args.mode)?;
    let mount = cgroup::cgroup2_mount()?;
    let path = cgroup::resolve(&mount, &args.cgroup)?;
    let sink =
        Sink::open(&args.events, args.rotation).with_context(|| format!("opening events sink {}", args.events))?;
    let sinks = fan_out(&args.events, sink, &args.syslog)?;
    // Only `~` in file rules needs the agent's user; the caller's home otherwise.
    let agent = match args.agent_user.or_else(|| std::env::var("SUDO_USER").ok()) {
        Some(name) => Some(users::lookup(&name)?),
        None => None,
    };
    let opts = file_options(args.files, agent.map(|a| a.home));
    let session = Session::start(&mount, &path, &policy, &opts, sinks)?;
    let confinement = runtime()?.block_on(async {
        session::start_metrics(args.metrics_addr.as_deref()).await?;
        session.reload_on_hangup(args.policy_file, args.mode, opts);
        session.serve(session::terminated(), true).await
    })?;
    info!(cgroup = %confinement.display, "controller stopping; enforcement stays in force until `enforcer detach`");
    Ok(ExitCode::SUCCESS)
}

pub struct RunArgs {
    pub policy_file: PathBuf,
    pub mode: Option<Mode>,
    pub events: Option<String>,
    pub rotation: Rotation,
    pub syslog: Vec<SyslogTarget>,
    pub user: Option<String>,
    pub metrics_addr: Option<String>,
    pub files: FileArgs,
    pub command: Vec<String>,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let (policy, _) = load_policy(&args.policy_file, args.mode)?;
    let run_as = spawn::choose_run_as(args.user.as_deref())?;
    let mount = cgroup::cgroup2_mount()?;
    let path = mount.join(format!("enforcer-run-{}", std::process::id()));
    let sink = match args.events.as_deref() {
        None => Sink::Stderr,
        Some(target) => Sink::open(target, args.rotation).with_context(|| format!("opening events sink {target}"))?,
    };
    let sinks = fan_out(args.events.as_deref().unwrap_or("stderr"), sink, &args.syslog)?;
    let opts = file_options(args.files, run_as.as_ref().map(|r| r.home.clone()));
    let session = match Session::start(&mount, &path, &policy, &opts, sinks) {
        Ok(s) => s,
        Err(e) => {
            spawn::remove_run_cgroup(&path);
            return Err(e);
        }
    };
    let cgroup_id = session.confinement.id;
    let outcome = (|| -> anyhow::Result<i32> {
        let hardening = spawn::Hardening::new(&policy.ipc)?;
        let mut child = spawn::spawn_confined(&path, &args.command, run_as.as_ref(), hardening)?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        runtime()?.block_on(async {
            session::start_metrics(args.metrics_addr.as_deref()).await?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let _ = tx.send(child.wait());
            });
            let mut status = None;
            let exited = async {
                tokio::pin!(rx);
                loop {
                    tokio::select! {
                        res = &mut rx => { status = res.ok(); break; }
                        // Pass the signal on; the command decides how to end.
                        () = session::terminated() => {
                            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                        }
                    }
                }
            };
            session.serve(exited, false).await?;
            let status = status.context("lost the command's exit status")?.context("waiting for the command")?;
            Ok(spawn::exit_code(status))
        })
    })();
    spawn::remove_run_cgroup(&path);
    session::unconfine(cgroup_id)?;
    let code = outcome?;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}
