//! The `enforcer` command line.
use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use enforcer::{
    audit, cgroup, compile, controller,
    events::{Enricher, Rotation, Sink},
    grants,
    policy::{self, Mode},
    probe, sinks,
};
use tracing::{info, warn};

#[derive(Parser)]
#[command(name = "enforcer", version, about = "eBPF egress enforcer for autonomous AI agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Confine a cgroup with a policy, then stream its decision events until SIGINT or
    /// SIGTERM; SIGHUP reloads the policy file. Enforcement stays after the controller
    /// exits; only `detach` removes it.
    Attach {
        /// cgroup path, relative to the cgroup v2 mount (created if missing) or absolute.
        #[arg(long)]
        cgroup: String,
        #[arg(long)]
        policy: PathBuf,
        /// Override the policy's mode.
        #[arg(long)]
        mode: Option<Mode>,
        /// Where events go: a file (hash-chained, continued if it exists) or - for stdout.
        #[arg(long, default_value = "-")]
        events: String,
        #[command(flatten)]
        rotation: RotationArgs,
        /// Also send events to syslog (RFC 5424): udp://HOST:PORT or unix:///dev/log.
        /// Repeatable.
        #[arg(long)]
        syslog: Vec<sinks::SyslogTarget>,
        /// Serve Prometheus metrics at http://ADDR/metrics.
        #[arg(long)]
        metrics_addr: Option<String>,
        #[command(flatten)]
        files: FileArgs,
        /// The user the agent runs as: `~` in file rules is this user's home (default:
        /// SUDO_USER, else the caller).
        #[arg(long)]
        agent_user: Option<String>,
    },
    /// Run a command in a fresh confined cgroup; exits with the command's status and
    /// removes the cgroup and its pins afterwards.
    Run {
        #[arg(long)]
        policy: PathBuf,
        #[arg(long)]
        mode: Option<Mode>,
        /// Where events go: a file (hash-chained), - for stdout; default stderr.
        #[arg(long)]
        events: Option<String>,
        #[command(flatten)]
        rotation: RotationArgs,
        /// Also send events to syslog (RFC 5424): udp://HOST:PORT or unix:///dev/log.
        #[arg(long)]
        syslog: Vec<sinks::SyslogTarget>,
        /// Run the command as this user (default: SUDO_USER, else the caller).
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        metrics_addr: Option<String>,
        #[command(flatten)]
        files: FileArgs,
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Kill switch: deny every new network operation of a confined cgroup at once,
    /// whatever its policy says; `--freeze` also freezes its processes for forensics.
    Isolate {
        #[arg(long)]
        cgroup: String,
        #[arg(long)]
        freeze: bool,
        /// Where the record of this action goes: a file (hash-chained) or - for stdout.
        #[arg(long, default_value = "-")]
        events: String,
    },
    /// Undo `isolate` (and thaw a frozen cgroup); the policy applies again.
    Release {
        #[arg(long)]
        cgroup: String,
        #[arg(long, default_value = "-")]
        events: String,
    },
    /// Open a destination for a confined cgroup for a limited time. The kernel closes
    /// it at expiry, controller or not. Deny rules still win.
    Grant {
        #[arg(long)]
        cgroup: String,
        /// CIDR, IP, IP:PORT or [IPv6]:PORT.
        #[arg(long)]
        allow: String,
        /// 90s, 10m, 2h (at most 24h).
        #[arg(long)]
        ttl: String,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value = "-")]
        events: String,
    },
    /// Remove a grant before it expires (ids are shown by `grant` and `status`).
    Revoke {
        #[arg(long)]
        cgroup: String,
        #[arg(long)]
        id: u32,
        #[arg(long, default_value = "-")]
        events: String,
    },
    /// Remove enforcement from a cgroup.
    Detach {
        #[arg(long)]
        cgroup: String,
    },
    /// Show confined cgroups, their policies and decision counts.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Report what this machine offers enforcer, trying each program type for real.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Audit trail tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Try network operations and print what the kernel answered (one line each).
    #[command(hide = true)]
    Probe {
        /// tcp:ADDR:PORT, udp:ADDR:PORT, sendto:ADDR:PORT, tfo:ADDR:PORT, raw or icmp.
        #[arg(required = true)]
        targets: Vec<probe::Probe>,
    },
}

#[derive(clap::Args)]
struct RotationArgs {
    /// Rotate an events file before it would pass this many bytes.
    #[arg(long, default_value_t = 100 * 1024 * 1024)]
    events_max_bytes: u64,
    /// Rotated events files to keep (FILE.1 is the newest).
    #[arg(long, default_value_t = 5)]
    events_keep: usize,
}

impl RotationArgs {
    fn rotation(&self) -> Rotation {
        Rotation { max_bytes: self.events_max_bytes, keep: self.events_keep }
    }
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify hash-chained events files (rotated ones oldest first: FILE.2 FILE.1
    /// FILE); exits non-zero at the first edited, deleted, inserted or reordered record.
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate policy files; exits non-zero on the first error.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Parses and compiles a policy file (so every error shows before anything is
/// touched); returns the policy with `mode` applied, and its compiled form.
fn load_policy(
    path: &std::path::Path,
    mode: Option<Mode>,
) -> anyhow::Result<(policy::Policy, compile::CompiledPolicy)> {
    let mut policy = policy::parse_policy_file(path)?;
    if let Some(mode) = mode {
        policy.mode = mode;
    }
    let compiled = compile::compile_policy(&policy).with_context(|| format!("{}", path.display()))?;
    Ok((policy, compiled))
}

fn main() -> ExitCode {
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

/// How file rules are enforced.
#[derive(clap::Args, Clone, Copy, Debug)]
struct FileArgs {
    /// auto: BPF-LSM where its programs load, else fanotify permission events (with a
    /// warning naming why). A policy with file rules is never attached unenforced.
    #[arg(long, value_enum, default_value = "auto")]
    file_backend: controller::FileBackendChoice,
}

fn file_options(args: FileArgs, home: Option<String>) -> controller::FileOptions {
    let home = home.or_else(|| std::env::var("HOME").ok()).unwrap_or_else(|| "/root".into());
    controller::FileOptions { home: PathBuf::from(home), backend: args.file_backend }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Attach { cgroup: name, policy, mode, events, rotation, syslog, metrics_addr, files, agent_user } => {
            let policy_file = policy;
            let (policy, _) = load_policy(&policy_file, mode)?;
            let mount = cgroup::cgroup2_mount()?;
            let path = cgroup::resolve(&mount, &name)?;
            let sink =
                Sink::open(&events, rotation.rotation()).with_context(|| format!("opening events sink {events}"))?;
            let fan_out = fan_out(&events, sink, &syslog)?;
            // Only `~` in file rules needs the agent's user; the caller's home otherwise.
            let agent = match agent_user.or_else(|| std::env::var("SUDO_USER").ok()) {
                Some(name) => Some(controller::lookup_user(&name)?),
                None => None,
            };
            let opts = file_options(files, agent.map(|a| a.home));
            let mut confinement = controller::confine(&mount, &path, &policy, &opts)?;
            let ring = confinement.programs.take_events()?;
            let enricher = Enricher::new(&mount, &path);
            let fanotify = controller::start_fanotify(&confinement, &mount, &path, fan_out.publisher())?;
            let dns = controller::start_dns(&mut confinement, &policy, fan_out.publisher())?;
            confinement.announce();
            let file_enforcement =
                std::sync::Arc::new(std::mem::replace(&mut confinement.files, controller::FileEnforcement::None));
            runtime()?.block_on(async {
                controller::start_metrics(metrics_addr.as_deref()).await?;
                let dns_for_stop = dns.clone();
                tokio::spawn(controller::reload_on_hangup(mount.clone(), path.clone(), policy_file, mode, opts, file_enforcement, dns));
                controller::stream_events(ring, enricher, fan_out, async {
                    controller::terminated().await;
                    if let Some(dns) = dns_for_stop {
                        warn!("the DNS proxy stops with this controller: the cgroup's names stop resolving until it is back");
                        dns.stop();
                    }
                    // File rules enforced here end with the controller; say so first.
                    if fanotify.is_some() {
                        tracing::warn!("file rules were enforced by fanotify in this controller and stop with it");
                    }
                    drop(fanotify);
                })
                .await
            })?;
            info!(cgroup = %confinement.display, "controller stopping; enforcement stays in force until `enforcer detach`");
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { policy, mode, events, rotation, syslog, user, metrics_addr, files, command } => {
            let (policy, _) = load_policy(&policy, mode)?;
            let run_as = controller::choose_run_as(user.as_deref())?;
            let mount = cgroup::cgroup2_mount()?;
            let path = mount.join(format!("enforcer-run-{}", std::process::id()));
            let sink = match events.as_deref() {
                None => Sink::Stderr,
                Some(target) => {
                    Sink::open(target, rotation.rotation()).with_context(|| format!("opening events sink {target}"))?
                }
            };
            let fan_out = fan_out(events.as_deref().unwrap_or("stderr"), sink, &syslog)?;
            let opts = file_options(files, run_as.as_ref().map(|r| r.home.clone()));
            let mut confinement = match controller::confine(&mount, &path, &policy, &opts) {
                Ok(c) => c,
                Err(e) => {
                    controller::remove_run_cgroup(&path);
                    return Err(e);
                }
            };
            let outcome = (|| -> anyhow::Result<i32> {
                let ring = confinement.programs.take_events()?;
                let enricher = Enricher::new(&mount, &path);
                let fanotify = controller::start_fanotify(&confinement, &mount, &path, fan_out.publisher())?;
                let dns = controller::start_dns(&mut confinement, &policy, fan_out.publisher())?;
                confinement.announce();
                let mut child = controller::spawn_confined(&path, &command, run_as.as_ref())?;
                let pid = child.id();
                runtime()?.block_on(async {
                    controller::start_metrics(metrics_addr.as_deref()).await?;
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    std::thread::spawn(move || {
                        let _ = tx.send(child.wait());
                    });
                    let mut status = None;
                    let stop = async {
                        tokio::pin!(rx);
                        loop {
                            tokio::select! {
                                res = &mut rx => { status = res.ok(); break; }
                                () = controller::terminated() => {
                                    // Pass the signal on; the command decides how to end.
                                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                                }
                            }
                        }
                        drop(fanotify);
                        if let Some(dns) = dns {
                            dns.stop();
                        }
                    };
                    controller::stream_events(ring, enricher, fan_out, stop).await?;
                    let status =
                        status.context("lost the command's exit status")?.context("waiting for the command")?;
                    Ok(controller::exit_code(status))
                })
            })();
            controller::remove_run_cgroup(&path);
            controller::unconfine(confinement.id)?;
            let code = outcome?;
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
        Command::Isolate { cgroup: name, freeze, events } => kill_switch(&name, true, freeze, &events),
        Command::Release { cgroup: name, events } => kill_switch(&name, false, false, &events),
        Command::Grant { cgroup: name, allow, ttl, reason, events } => {
            let (net, ports) = grants::parse_allow(&allow).map_err(anyhow::Error::msg)?;
            let ttl = grants::parse_ttl(&ttl).map_err(anyhow::Error::msg)?;
            change_grants(&name, &events, "grant", move |list| {
                let id = list.iter().map(|g| g.id).max().unwrap_or(0) + 1;
                let expires_at = grants::boot_now_ns() + ttl.as_nanos() as u64;
                let unix_ns = enforcer::events::unix_now_ns() + ttl.as_nanos() as i128;
                list.push(grants::Grant {
                    id,
                    allow,
                    net,
                    ports,
                    expires_at,
                    expires: enforcer::events::rfc3339_nanos(unix_ns),
                    reason,
                    granted_by_uid: unsafe { libc::getuid() },
                });
                Ok(id)
            })
        }
        Command::Revoke { cgroup: name, id, events } => change_grants(&name, &events, "revoke", move |list| {
            let before = list.len();
            list.retain(|g| g.id != id);
            anyhow::ensure!(list.len() < before, "no live grant with id {id}");
            Ok(id)
        }),
        Command::Detach { cgroup: name } => {
            let mount = cgroup::cgroup2_mount()?;
            let path = cgroup::resolve(&mount, &name)?;
            let id = cgroup::cgroup_id(&path)?;
            let (links, slot) = controller::unconfine(id)?;
            if links == 0 && slot.is_none() {
                anyhow::bail!("{} is not confined by enforcer", cgroup::display_path(&mount, &path));
            }
            info!(cgroup = %cgroup::display_path(&mount, &path), links, "detached");
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor { json } => {
            let report = enforcer::doctor::run();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", enforcer::doctor::render(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let report = controller::status_report()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_status(&report);
            }
            Ok(ExitCode::SUCCESS)
        }
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
        Command::Audit { command: AuditCommand::Verify { files } } => match audit::verify(&files) {
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
                println!("{} {}", describe(target), probe::outcome(&probe::run(target)));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn kill_switch(name: &str, isolate: bool, freeze: bool, events: &str) -> anyhow::Result<ExitCode> {
    let mount = cgroup::cgroup2_mount()?;
    let path = cgroup::resolve(&mount, name)?;
    // Open the sink first: an action that cannot be recorded is not taken.
    let mut sink = Sink::open(events, Rotation { max_bytes: u64::MAX, keep: 1 })
        .with_context(|| format!("opening events sink {events}"))?;
    let record = controller::kill_switch(&mount, &path, isolate, freeze)?;
    sink.write_event(&sinks::Outgoing::new(&record)).context("recording the action")?;
    Ok(ExitCode::SUCCESS)
}

/// The event sink and any syslog targets, each on its own thread.
fn fan_out(name: &str, sink: Sink, syslog: &[sinks::SyslogTarget]) -> anyhow::Result<sinks::FanOut> {
    let mut fan = sinks::FanOut::new();
    fan.add_event_sink(if name == "-" { "stdout" } else { name }, sink);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    for target in syslog {
        fan.add_syslog(target, host.clone()).context("opening the syslog socket")?;
    }
    Ok(fan)
}

/// Runs a grant change and records it as an event.
fn change_grants(
    name: &str,
    events: &str,
    action: &str,
    change: impl FnOnce(&mut Vec<grants::Grant>) -> anyhow::Result<u32>,
) -> anyhow::Result<ExitCode> {
    let mount = cgroup::cgroup2_mount()?;
    let path = cgroup::resolve(&mount, name)?;
    let mut sink = Sink::open(events, Rotation { max_bytes: u64::MAX, keep: 1 })
        .with_context(|| format!("opening events sink {events}"))?;
    let mut changed = 0;
    let list = controller::update_grants(&mount, &path, |list| {
        changed = change(list)?;
        Ok(())
    })?;
    let grant = list.iter().find(|g| g.id == changed);
    sink.write_event(&sinks::Outgoing::new(&serde_json::json!({
        "@timestamp": enforcer::events::rfc3339_nanos(enforcer::events::unix_now_ns()),
        "event": { "kind": "event", "category": ["configuration"], "action": action, "type": ["change"], "outcome": "success" },
        "enforcer": { "grant": { "id": changed, "detail": grant } },
        "cgroup": { "path": cgroup::display_path(&mount, &path) },
        "user": { "id": unsafe { libc::getuid() }.to_string() },
    })))
    .context("recording the change")?;
    Ok(ExitCode::SUCCESS)
}

fn describe(p: &probe::Probe) -> String {
    match p {
        probe::Probe::Tcp(a) => format!("tcp:{a}"),
        probe::Probe::UdpConnect(a) => format!("udp:{a}"),
        probe::Probe::UdpSendto(a) => format!("sendto:{a}"),
        probe::Probe::TcpFastOpen(a) => format!("tfo:{a}"),
        probe::Probe::Raw => "raw".into(),
        probe::Probe::Icmp => "icmp".into(),
        probe::Probe::Reopen(p) => format!("reopen:{}", p.display()),
        probe::Probe::DnsUdp(name, a) => format!("dns-udp:{name}@{a}"),
        probe::Probe::DnsTcp(name, a) => format!("dns-tcp:{name}@{a}"),
    }
}

fn print_status(report: &serde_json::Value) {
    let attached = report["attached"].as_array().cloned().unwrap_or_default();
    if attached.is_empty() {
        println!("no cgroup is confined");
        return;
    }
    println!("{:<32} {:<20} {:<8} {:<8} {:>5}  decisions", "CGROUP", "POLICY", "MODE", "ISOLATED", "LINKS");
    for a in attached {
        let decisions = a["decisions"]
            .as_object()
            .map(|d| d.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        println!(
            "{:<32} {:<20} {:<8} {:<8} {:>5}  {}",
            a["cgroup"].as_str().unwrap_or("?"),
            a["policy"].as_str().unwrap_or("<none>"),
            a["mode"].as_str().unwrap_or("?"),
            if a["isolated"] == true { "YES" } else { "no" },
            a["links"],
            decisions
        );
        for g in a["grants"].as_array().into_iter().flatten() {
            println!(
                "    grant {} allow {} until {}{}",
                g["id"],
                g["allow"].as_str().unwrap_or("?"),
                g["expires"].as_str().unwrap_or("?"),
                g["reason"].as_str().map(|r| format!(" ({r})")).unwrap_or_default()
            );
        }
    }
    println!("events lost: {}   fail-closed denials: {}", report["events_lost"], report["fail_closed"]);
}
