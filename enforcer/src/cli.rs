//! The command line's definitions (clap): what `enforcer --help` shows. The commands
//! themselves are in `cmd`.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

use crate::{
    model::policy::Mode,
    session::FileBackendChoice,
    sinks::{Rotation, SyslogTarget},
};

#[derive(Parser)]
#[command(name = "enforcer", version, about = "eBPF egress enforcer for autonomous AI agents")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
        syslog: Vec<SyslogTarget>,
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
        syslog: Vec<SyslogTarget>,
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
    /// Try the known ways around a confinement from inside one: a scratch cgroup with a
    /// test policy, an agent run as an unprivileged user, one row per vector (closed,
    /// open, or n/a on this kernel with the reason). Exits 1 when any vector is open.
    Selftest {
        #[arg(long)]
        json: bool,
        /// The unprivileged user the agent runs as.
        #[arg(long, default_value = "nobody")]
        user: String,
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
        targets: Vec<Probe>,
    },
}

#[derive(clap::Args)]
pub struct RotationArgs {
    /// Rotate an events file before it would pass this many bytes.
    #[arg(long, default_value_t = 100 * 1024 * 1024)]
    pub events_max_bytes: u64,
    /// Rotated events files to keep (FILE.1 is the newest).
    #[arg(long, default_value_t = 5)]
    pub events_keep: usize,
}

impl RotationArgs {
    pub fn rotation(&self) -> Rotation {
        Rotation { max_bytes: self.events_max_bytes, keep: self.events_keep }
    }
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Verify hash-chained events files (rotated ones oldest first: FILE.2 FILE.1
    /// FILE); exits non-zero at the first edited, deleted, inserted or reordered record.
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files; exits non-zero on the first error.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// How file rules are enforced.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct FileArgs {
    /// auto: BPF-LSM where its programs load, else fanotify permission events (with a
    /// warning naming why). A policy with file rules is never attached unenforced.
    #[arg(long, value_enum, default_value = "auto")]
    pub file_backend: FileBackendChoice,
}

/// One operation to try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// TCP connect (ok, or ECONNREFUSED when nothing listens: the kernel let it out).
    Tcp(SocketAddr),
    /// UDP socket connect().
    UdpConnect(SocketAddr),
    /// Unconnected UDP sendto().
    UdpSendto(SocketAddr),
    /// TCP Fast Open: sendto(MSG_FASTOPEN) on an unconnected TCP socket.
    TcpFastOpen(SocketAddr),
    /// socket(AF_INET, SOCK_RAW, IPPROTO_ICMP).
    Raw,
    /// socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP): a "ping" socket.
    Icmp,
    /// Open a file with O_PATH (no access asked), then read it through
    /// /proc/self/fd/N: the re-open must be judged like a direct open.
    Reopen(PathBuf),
    /// A DNS A query for the name, sent with sendto() on an unconnected UDP socket;
    /// `ok` when a NOERROR answer came back from the very address asked (a redirect
    /// that did not restore the source shows as `from-ADDR`), else the RCODE's name.
    DnsUdp(String, SocketAddr),
    /// The same over TCP; the peer's address (getpeername) must be the one asked.
    DnsTcp(String, SocketAddr),
    /// PTRACE_SEIZE of a process (released when the probe exits).
    Ptrace(u32),
    /// process_vm_readv of a process (a fault reading counts as let through).
    VmRead(u32),
    /// kill(pid, 0): may a signal reach the process?
    Signal(u32),
    /// A stream connect to a unix socket: a path, or `@name` for an abstract one.
    Unix(String),
    /// socket() of a family the network rules do not judge: `netlink-route`,
    /// `netlink-uevent`, `vsock`, `alg`, `packet`.
    Socket(String),
    /// Open a file and read it.
    Read(PathBuf),
    /// `link:SRC:DST`: a hard link.
    Link(PathBuf, PathBuf),
    /// `flood:tcp|udp:ADDR:PORT:MILLIS`: TCP connects or UDP sendto()s in a tight loop
    /// for that long; prints how many the kernel let through and how many it refused.
    Flood { tcp: bool, addr: SocketAddr, millis: u64 },
}

impl std::str::FromStr for Probe {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => return Ok(Self::Raw),
            "icmp" => return Ok(Self::Icmp),
            _ => {}
        }
        if let Some(path) = s.strip_prefix("reopen:") {
            return Ok(Self::Reopen(path.into()));
        }
        if let Some(path) = s.strip_prefix("read:") {
            return Ok(Self::Read(path.into()));
        }
        if let Some(rest) = s.strip_prefix("link:") {
            let (from, to) = rest.split_once(':').ok_or_else(|| format!("{s:?}: expected link:SRC:DST"))?;
            return Ok(Self::Link(from.into(), to.into()));
        }
        if let Some(target) = s.strip_prefix("unix:") {
            return Ok(Self::Unix(target.into()));
        }
        if let Some(family) = s.strip_prefix("socket:") {
            return Ok(Self::Socket(family.into()));
        }
        if let Some(rest) = s.strip_prefix("flood:") {
            let bad = || format!("{s:?}: expected flood:tcp|udp:ADDR:PORT:MILLIS");
            let (kind, rest) = rest.split_once(':').ok_or_else(bad)?;
            let (addr, millis) = rest.rsplit_once(':').ok_or_else(bad)?;
            return Ok(Self::Flood {
                tcp: match kind {
                    "tcp" => true,
                    "udp" => false,
                    _ => return Err(bad()),
                },
                addr: addr.parse().map_err(|_| bad())?,
                millis: millis.parse().map_err(|_| bad())?,
            });
        }
        for (prefix, make) in
            [("ptrace:", Self::Ptrace as fn(u32) -> Self), ("vm-read:", Self::VmRead), ("signal:", Self::Signal)]
        {
            if let Some(pid) = s.strip_prefix(prefix) {
                return pid.parse().map(make).map_err(|e| format!("{s:?}: {e} (expected {prefix}PID)"));
            }
        }
        for (prefix, tcp) in [("dns-udp:", false), ("dns-tcp:", true)] {
            if let Some(rest) = s.strip_prefix(prefix) {
                let (name, server) =
                    rest.split_once('@').ok_or_else(|| format!("{s:?}: expected {prefix}NAME@ADDR:PORT"))?;
                let server: SocketAddr = server.parse().map_err(|e| format!("{s:?}: {e} (IPv6 as [::1]:53)"))?;
                return Ok(if tcp { Self::DnsTcp(name.into(), server) } else { Self::DnsUdp(name.into(), server) });
            }
        }
        let (kind, addr) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected KIND:ADDR:PORT (tcp, udp, sendto, tfo), raw or icmp"))?;
        let addr: SocketAddr = addr.parse().map_err(|e| format!("{s:?}: {e} (IPv6 as tcp:[::1]:80)"))?;
        match kind {
            "tcp" => Ok(Self::Tcp(addr)),
            "udp" => Ok(Self::UdpConnect(addr)),
            "sendto" => Ok(Self::UdpSendto(addr)),
            "tfo" => Ok(Self::TcpFastOpen(addr)),
            other => Err(format!("{s:?}: unknown kind {other:?}: tcp, udp, sendto, tfo, raw or icmp")),
        }
    }
}

impl std::fmt::Display for Probe {
    /// The probe as it was given on the command line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp:{a}"),
            Self::UdpConnect(a) => write!(f, "udp:{a}"),
            Self::UdpSendto(a) => write!(f, "sendto:{a}"),
            Self::TcpFastOpen(a) => write!(f, "tfo:{a}"),
            Self::Raw => f.write_str("raw"),
            Self::Icmp => f.write_str("icmp"),
            Self::Reopen(p) => write!(f, "reopen:{}", p.display()),
            Self::DnsUdp(name, a) => write!(f, "dns-udp:{name}@{a}"),
            Self::DnsTcp(name, a) => write!(f, "dns-tcp:{name}@{a}"),
            Self::Ptrace(pid) => write!(f, "ptrace:{pid}"),
            Self::VmRead(pid) => write!(f, "vm-read:{pid}"),
            Self::Signal(pid) => write!(f, "signal:{pid}"),
            Self::Unix(target) => write!(f, "unix:{target}"),
            Self::Socket(family) => write!(f, "socket:{family}"),
            Self::Read(path) => write!(f, "read:{}", path.display()),
            Self::Link(from, to) => write!(f, "link:{}:{}", from.display(), to.display()),
            Self::Flood { tcp, addr, millis } => {
                write!(f, "flood:{}:{addr}:{millis}", if *tcp { "tcp" } else { "udp" })
            }
        }
    }
}
