//! The commands: each turns parsed arguments into calls of the session, bpf, model and
//! sinks layers and says what happened. `main` is the binary's whole body.
mod agent;
mod control;
pub mod doctor;
pub mod probe;
mod selftest;

use std::{path::Path, process::ExitCode};

use anyhow::Context as _;
use clap::Parser as _;

use crate::{
    cli::{AuditCommand, Cli, Command, FileArgs, PolicyCommand},
    host,
    model::{CompiledPolicy, Policy, compile_policy, parse_policy_file, policy::Mode},
    session::FileOptions,
    sinks::{self, FanOut, Sink, SyslogTarget},
};

/// Parses the arguments, runs the command, reports an error on stderr.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENFORCER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("enforcer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Attach { cgroup, policy, mode, events, rotation, syslog, metrics_addr, files, agent_user } => {
            agent::attach(agent::AttachArgs {
                cgroup,
                policy_file: policy,
                mode,
                events,
                rotation: rotation.rotation(),
                syslog,
                metrics_addr,
                files,
                agent_user,
            })
        }
        Command::Run { policy, mode, events, rotation, syslog, user, metrics_addr, files, command } => {
            agent::run(agent::RunArgs {
                policy_file: policy,
                mode,
                events,
                rotation: rotation.rotation(),
                syslog,
                user,
                metrics_addr,
                files,
                command,
            })
        }
        Command::Isolate { cgroup, freeze, events } => control::kill_switch(&cgroup, true, freeze, &events),
        Command::Release { cgroup, events } => control::kill_switch(&cgroup, false, false, &events),
        Command::Grant { cgroup, allow, ttl, reason, events } => control::grant(&cgroup, &allow, &ttl, reason, &events),
        Command::Revoke { cgroup, id, events } => control::revoke(&cgroup, id, &events),
        Command::Detach { cgroup } => control::detach(&cgroup),
        Command::Status { json } => control::status(json),
        Command::Doctor { json } => {
            let report = doctor::run();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", doctor::render(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Selftest { json, user } => selftest::run(&user, json),
        Command::Policy { command: PolicyCommand::Check { files } } => {
            for file in &files {
                let (_, compiled) = load_policy(file, None)?;
                println!(
                    "{}: ok: policy {:?}, {} rules, {} IPv4 and {} IPv6 prefixes",
                    file.display(),
                    compiled.name,
                    compiled.rules.len(),
                    compiled.net4.len(),
                    compiled.net6.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { command: AuditCommand::Verify { files } } => match sinks::chain::verify(&files) {
            Ok(v) => {
                let from = if v.starts_mid_chain { " (the chain starts in an earlier, missing segment)" } else { "" };
                println!("ok: {} records, chain intact{from}", v.records);
                Ok(ExitCode::SUCCESS)
            }
            Err(tampering) => {
                eprintln!("enforcer: audit chain broken: {tampering}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Probe { targets } => {
            for target in &targets {
                println!("{}", probe::line(target));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Parses and compiles a policy file (so every error shows before anything is
/// touched); returns the policy with `mode` applied, and its compiled form.
fn load_policy(path: &Path, mode: Option<Mode>) -> anyhow::Result<(Policy, CompiledPolicy)> {
    let mut policy = parse_policy_file(path)?;
    if let Some(mode) = mode {
        policy.mode = mode;
    }
    let compiled = compile_policy(&policy).with_context(|| format!("{}", path.display()))?;
    Ok((policy, compiled))
}

fn file_options(args: FileArgs, home: Option<String>) -> FileOptions {
    let home = home.or_else(|| std::env::var("HOME").ok()).unwrap_or_else(|| "/root".into());
    FileOptions { home: home.into(), backend: args.file_backend }
}

/// The controller's runtime: the event stream runs on the calling thread (`block_on`),
/// reloads, metrics and signals on a worker of their own, so a flood of decisions
/// never delays a policy change.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("enforcer-control")
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// The event sink and any syslog targets, each on its own thread.
fn fan_out(name: &str, sink: Sink, syslog: &[SyslogTarget]) -> anyhow::Result<FanOut> {
    let mut fan = FanOut::new();
    fan.add_event_sink(if name == "-" { "stdout" } else { name }, sink);
    let host = host::hostname();
    for target in syslog {
        fan.add_syslog(target, host.clone()).context("opening the syslog socket")?;
    }
    Ok(fan)
}
