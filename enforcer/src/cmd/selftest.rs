//! `enforcer selftest`: tries the known ways around a confinement on this host, from
//! inside one. A scratch cgroup gets a test policy through `enforcer run` (the same
//! confinement and agent hardening a user gets), its agent runs as an unprivileged user
//! and probes every vector, and each vector is reported closed, open, or not applicable
//! on this kernel with the reason.
use std::{
    fs,
    net::{TcpListener, UdpSocket},
    os::unix::{
        fs::{PermissionsExt as _, chown},
        net::{SocketAddr as UnixAddr, UnixListener},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::host::{self, users};

#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    /// Who enforced the file rules: `bpf-lsm` or `fanotify`.
    pub backend: String,
    pub landlock_abi: i32,
    pub vectors: Vec<Vector>,
}

#[derive(Debug, Serialize)]
pub struct Vector {
    pub name: &'static str,
    /// `closed`, `open` or `n/a`.
    pub result: &'static str,
    pub reason: String,
}

/// What a vector's probe line must say for the vector to be closed.
enum Expect {
    /// The operation is refused (EPERM or EACCES).
    Refused,
    /// Either this probe's operation or the one after it (`then`) is refused.
    RefusedOrThen(String),
    /// The script prints this line when the layer is in place.
    Line(&'static str),
}

/// One vector: its name, the probe (or script line) that tries it, and why it matters.
struct Case {
    name: &'static str,
    probe: String,
    expect: Expect,
    why: &'static str,
}

/// The scratch world the agent is let loose in; removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn scratch(agent: &users::Account) -> anyhow::Result<Scratch> {
    let dir = std::env::temp_dir().join(format!("enforcer-selftest-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let scratch = Scratch { dir: dir.clone() };
    for sub in ["", "denied", "public"] {
        let d = dir.join(sub);
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755))?;
    }
    // The agent owns the denied file and may write the public tree: a hard link needs
    // nothing more.
    fs::write(dir.join("denied/secret"), "selftest secret\n")?;
    chown(dir.join("denied/secret"), Some(agent.uid), Some(agent.gid))?;
    chown(dir.join("public"), Some(agent.uid), Some(agent.gid))?;
    std::os::unix::fs::symlink(dir.join("denied/secret"), dir.join("public/symlink"))?;
    let bin = dir.join("enforcer");
    fs::copy(std::env::current_exe().context("locating this binary")?, &bin)?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
    Ok(scratch)
}

fn policy(dir: &Path, allowed: u16) -> String {
    format!(
        "apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: selftest\nspec:\n  network:\n    default: deny\n    \
         allow:\n      - ip: 127.0.0.1\n        ports: [{allowed}]\n        protocols: [tcp]\n  files:\n    default: allow\n    \
         deny: [\"{}\"]\n  alerts:\n    denial_burst: false\n",
        dir.join("denied").display()
    )
}

fn cases(dir: &Path, denied: u16, neighbour: u32, abstract_name: &str, unix_path: &Path) -> Vec<Case> {
    let refused = |name, probe: String, why| Case { name, probe, expect: Expect::Refused, why };
    let secret = dir.join("denied/secret");
    vec![
        refused("connect-denied-port", format!("tcp:127.0.0.1:{denied}"), "a destination no rule allows"),
        refused("ipv4-mapped-ipv6", format!("tcp:[::ffff:127.0.0.1]:{denied}"), "the same destination spelled as IPv6"),
        refused("unspecified-address", format!("tcp:0.0.0.0:{denied}"), "0.0.0.0, which Linux connects to loopback"),
        refused("tcp-fast-open", format!("tfo:127.0.0.1:{denied}"), "connect and data in one sendto(MSG_FASTOPEN)"),
        refused("udp-connect", format!("udp:127.0.0.1:{denied}"), "UDP through connect()"),
        refused("udp-sendto", format!("sendto:127.0.0.1:{denied}"), "UDP without connect()"),
        refused("raw-socket", "raw".into(), "a raw socket sends to anything"),
        refused("icmp-socket", "icmp".into(), "an ICMP ping socket"),
        refused("read-denied-file", format!("read:{}", secret.display()), "a file under a denied tree"),
        refused("symlink-to-denied", format!("read:{}", dir.join("public/symlink").display()), "a symlink elsewhere"),
        refused("proc-fd-reopen", format!("reopen:{}", secret.display()), "O_PATH, then /proc/self/fd/N"),
        Case {
            name: "hard-link-to-denied",
            probe: format!("link:{}:{}", secret.display(), dir.join("public/hardlink").display()),
            expect: Expect::RefusedOrThen(format!("read:{}", dir.join("public/hardlink").display())),
            why: "a hard link the agent makes into an allowed tree, then reads",
        },
        refused("ptrace-neighbour", format!("ptrace:{neighbour}"), "ptrace of the user's own process outside"),
        refused("memory-read-neighbour", format!("vm-read:{neighbour}"), "process_vm_readv of it"),
        refused("signal-neighbour", format!("signal:{neighbour}"), "a signal to it"),
        refused(
            "abstract-unix-socket",
            format!("unix:@{abstract_name}"),
            "a session bus or tmux over an abstract socket",
        ),
        refused(
            "unix-socket-path",
            format!("unix:{}", unix_path.display()),
            "docker.sock, ssh-agent, a service manager",
        ),
        refused("socket-vsock", "socket:vsock".into(), "AF_VSOCK to the VM host"),
        refused("socket-netlink", "socket:netlink-uevent".into(), "AF_NETLINK beyond NETLINK_ROUTE"),
        refused("socket-alg", "socket:alg".into(), "AF_ALG"),
        refused("state-lock", "read:/run/enforcer/lock".into(), "holding the state lock stalls the kill switch"),
        Case {
            name: "setuid-privileges",
            probe: String::new(),
            expect: Expect::Line("NoNewPrivs:1"),
            why: "sudo, su, pkexec",
        },
        Case {
            name: "terminal-injection",
            probe: String::new(),
            expect: Expect::Line("own-session"),
            why: "TIOCSTI into the operator's shell, its sudo ticket",
        },
    ]
}

/// What the agent printed for `probe`.
fn outcome<'a>(lines: &'a [String], probe: &str) -> &'a str {
    lines.iter().find_map(|l| l.strip_prefix(probe)?.strip_prefix(' ')).unwrap_or("no answer")
}

fn refused(outcome: &str) -> bool {
    matches!(outcome, "EPERM" | "EACCES")
}

/// The verdict on one vector from the agent's output.
fn judge(case: &Case, lines: &[String], landlock_abi: i32) -> (&'static str, String) {
    let why = case.why;
    match &case.expect {
        Expect::Line(want) => match lines.iter().any(|l| l == want) {
            true => ("closed", format!("{why}: refused")),
            false => ("open", format!("{why}: the layer is missing")),
        },
        Expect::RefusedOrThen(then) => {
            let (first, second) = (outcome(lines, &case.probe), outcome(lines, then));
            if refused(first) {
                ("closed", format!("{why}: the link is refused ({first})"))
            } else if refused(second) {
                ("closed", format!("{why}: the link is made, reading through it is refused ({second})"))
            } else {
                ("open", format!("{why}: link {first}, read {second}"))
            }
        }
        Expect::Refused => match outcome(lines, &case.probe) {
            o if refused(o) => ("closed", format!("{why}: {o}")),
            "EAFNOSUPPORT" => ("n/a", format!("{why}: this kernel has no such sockets")),
            "ok" if matches!(case.name, "abstract-unix-socket" | "signal-neighbour") && landlock_abi < 6 => {
                ("open", format!("{why}: Landlock ABI {landlock_abi} cannot scope it (6 can)"))
            }
            "ok" => ("open", format!("{why}: let through")),
            other => ("open", format!("{why}: unexpected outcome {other}")),
        },
    }
}

pub fn run(user: &str, json: bool) -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("selftest confines a scratch cgroup and needs root");
    }
    let agent = users::lookup(user)?;
    let scratch = scratch(&agent)?;
    let dir = scratch.dir.clone();
    let allowed = TcpListener::bind("127.0.0.1:0").context("a loopback listener")?;
    let denied = TcpListener::bind("127.0.0.1:0").context("a loopback listener")?;
    let denied_udp = UdpSocket::bind(denied.local_addr()?).context("a loopback UDP socket")?;
    for listener in [allowed.try_clone()?, denied.try_clone()?] {
        std::thread::spawn(move || for _conn in listener.incoming() {});
    }
    // The agent's user, outside the agent: a process and two sockets it made.
    let mut neighbour = Command::new("sleep")
        .arg("600")
        .uid(agent.uid)
        .gid(agent.gid)
        .stdin(Stdio::null())
        .spawn()
        .context("starting a neighbour process as the agent's user")?;
    let abstract_name = format!("enforcer-selftest-{}", std::process::id());
    let _abstract = {
        use std::os::linux::net::SocketAddrExt as _;
        UnixListener::bind_addr(&UnixAddr::from_abstract_name(abstract_name.as_bytes())?)?
    };
    let unix_path = dir.join("neighbour.sock");
    let _unix = UnixListener::bind(&unix_path)?;
    fs::set_permissions(&unix_path, fs::Permissions::from_mode(0o777))?;

    let denied_port = denied.local_addr()?.port();
    let cases = cases(&dir, denied_port, neighbour.id(), &abstract_name, &unix_path);
    let policy_file = dir.join("policy.yaml");
    fs::write(&policy_file, policy(&dir, allowed.local_addr()?.port()))?;
    let probes: Vec<&str> = cases
        .iter()
        .flat_map(|c| {
            let then = match &c.expect {
                Expect::RefusedOrThen(then) => Some(then.as_str()),
                _ => None,
            };
            std::iter::once(c.probe.as_str()).chain(then)
        })
        .filter(|p| !p.is_empty())
        .collect();
    let script = format!(
        "grep -E '^NoNewPrivs:' /proc/self/status | tr -d '\\t '; \
         [ \"$(cut -d' ' -f6 /proc/$$/stat)\" = \"$$\" ] && echo own-session; \
         {} probe tcp:127.0.0.1:{} {}",
        dir.join("enforcer").display(),
        allowed.local_addr()?.port(),
        probes.join(" ")
    );
    let out = Command::new(std::env::current_exe()?)
        .args(["run", "--policy"])
        .arg(&policy_file)
        .args(["--user", user, "--events"])
        .arg(dir.join("events.jsonl"))
        .args(["--", "/bin/sh", "-c", &script])
        .env("ENFORCER_LOG", "info")
        .env("NO_COLOR", "1")
        .output()
        .context("starting enforcer run")?;
    let _ = neighbour.kill();
    let _ = neighbour.wait();
    drop(denied_udp);
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let control = format!("tcp:127.0.0.1:{} ok", allowed.local_addr()?.port());
    if !out.status.success() || !lines.contains(&control) {
        bail!(
            "the selftest agent did not run as expected (exit {}; the allowed destination must connect):\n{}\n{stderr}",
            out.status,
            lines.join("\n")
        );
    }
    let backend = ["bpf-lsm", "fanotify"]
        .into_iter()
        .find(|b| stderr.lines().any(|l| l.contains(" attached") && l.contains(b)))
        .unwrap_or("unknown")
        .to_string();
    let landlock_abi = host::landlock_abi();
    let vectors: Vec<Vector> = cases
        .iter()
        .map(|case| {
            let (result, reason) = judge(case, &lines, landlock_abi);
            Vector { name: case.name, result, reason }
        })
        .collect();
    let open = vectors.iter().filter(|v| v.result == "open").count();
    let report = Report {
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
        backend,
        landlock_abi,
        vectors,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("kernel {}, file backend {}, Landlock ABI {}\n", report.kernel, report.backend, report.landlock_abi);
        println!("{:<24} {:<7} reason", "VECTOR", "RESULT");
        for v in &report.vectors {
            println!("{:<24} {:<7} {}", v.name, v.result, v.reason);
        }
        println!("\n{open} of {} vectors open", report.vectors.len());
    }
    drop(scratch);
    Ok(if open == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
