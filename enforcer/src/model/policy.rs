//! The validated policy: what `parse` produces and `compile` consumes. Plain data with
//! serde derives (enforcer's own state files keep the base policy of each slot).
use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// Rule ids are u16 in the kernel clauses; 0 means "the default decided".
pub const MAX_RULES: usize = u16::MAX as usize;
/// Matches the kernel's policy name buffer (64 bytes with a NUL).
pub const MAX_NAME_LEN: usize = enforcer_common::limits::POLICY_NAME_LEN - 1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        })
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "enforce" => Ok(Self::Enforce),
            "audit" => Ok(Self::Audit),
            other => Err(format!("unknown mode {other:?}: expected enforce or audit")),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    #[default]
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        })
    }
}

/// Parses `addr/len` or a bare address (a host prefix) into a prefix with no host bits
/// set. IPv4-mapped IPv6 prefixes (inside ::ffff:0:0/96) become IPv4 prefixes: the
/// kernel judges mapped destinations by the IPv4 rules, so that is where such a rule
/// must live.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let (addr_text, len_text) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let addr: IpAddr = addr_text.parse().map_err(|_| format!("invalid IP address {addr_text:?} in {text:?}"))?;
    let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len_text {
        None => max,
        Some(l) => {
            let len: u32 = l.parse().map_err(|_| format!("invalid prefix length {l:?} in {text:?}"))?;
            if len > u32::from(max) {
                return Err(format!("prefix length {len} in {text:?} exceeds {max}"));
            }
            len as u8
        }
    };
    let net = match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) if len >= 96 => IpNet::V4(Ipv4Net::new_assert(v4, len - 96)),
            _ => IpNet::V6(Ipv6Net::new_assert(v6, len)),
        },
        IpAddr::V4(v4) => IpNet::V4(Ipv4Net::new_assert(v4, len)),
    };
    if net.trunc() != net {
        return Err(format!("{text:?} has host bits set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

/// Clears the bits after `len`.
pub fn mask<const N: usize>(mut addr: [u8; N], len: u8) -> [u8; N] {
    for (i, byte) in addr.iter_mut().enumerate() {
        let keep = (len as usize).saturating_sub(i * 8).min(8);
        *byte &= if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
    }
    addr
}

/// A validated policy. Serialize/Deserialize are for enforcer's own state files
/// (the base policy of a slot, re-compiled when grants change); user input always goes
/// through `parse_policy_*`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    pub mode: Mode,
    pub network: NetworkPolicy,
    pub log_allowed: bool,
    #[serde(default)]
    pub alerts: Alerts,
    /// `spec.files`; None = the policy says nothing about files (nothing is judged).
    #[serde(default)]
    pub files: Option<FilePolicy>,
    /// Some when the policy has domain rules or a `dns:` section: the cgroup's DNS goes
    /// through the controller's proxy.
    #[serde(default)]
    pub dns: Option<DnsSettings>,
    /// `spec.ipc`: local IPC beyond the network rules.
    #[serde(default)]
    pub ipc: IpcPolicy,
}

/// `spec.ipc`. Sockets of families the network rules do not judge are refused unless
/// listed here: AF_UNIX, AF_INET and AF_INET6 are always allowed (the rules judge inet;
/// AF_UNIX is judged separately), and AF_NETLINK only for NETLINK_ROUTE, which the C
/// library's name lookups use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcPolicy {
    pub families: Vec<SocketFamily>,
}

/// A socket family `spec.ipc.families` may allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketFamily {
    /// Every NETLINK protocol (NETLINK_ROUTE is allowed without it).
    Netlink,
    Packet,
    Vsock,
    Xdp,
    Alg,
    Key,
    Can,
    Bluetooth,
    Tipc,
    Rds,
    Llc,
    Qipcrtr,
    Smc,
    Mctp,
}

impl SocketFamily {
    /// The `AF_*` number.
    pub fn number(self) -> u32 {
        match self {
            Self::Netlink => 16,
            Self::Packet => 17,
            Self::Vsock => 40,
            Self::Xdp => 44,
            Self::Alg => 38,
            Self::Key => 15,
            Self::Can => 29,
            Self::Bluetooth => 31,
            Self::Tipc => 30,
            Self::Rds => 21,
            Self::Llc => 26,
            Self::Qipcrtr => 42,
            Self::Smc => 43,
            Self::Mctp => 45,
        }
    }
}

/// File-access capabilities. A path covers itself and everything beneath it; `write`
/// implies read; deny wins at any depth; otherwise the nearest listed ancestor decides,
/// and a listed path also grants what its listed ancestors grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePolicy {
    pub default: Action,
    /// (list, path) in policy order: the list is "read", "write", "exec" or "deny"; the
    /// path is as written (`~` not yet expanded). The index is the rule id in events.
    pub rules: Vec<FileRule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRule {
    pub list: FileList,
    pub path: String,
    /// CLOCK_BOOTTIME ns when a grant lapses; 0 = never.
    #[serde(default)]
    pub expires_at: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileList {
    Read,
    Write,
    Exec,
    Deny,
}

impl FileList {
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Exec => "exec",
            Self::Deny => "deny",
        }
    }
    /// Access bits a listed path grants (deny grants none).
    pub fn grants(self) -> u8 {
        use enforcer_common::access;
        match self {
            Self::Read => access::READ,
            Self::Write => access::READ | access::WRITE,
            Self::Exec => access::EXEC,
            Self::Deny => 0,
        }
    }
}

impl FileRule {
    /// What events and `status` show: `deny:~/.ssh`.
    pub fn name(&self) -> String {
        format!("{}:{}", self.list.name(), self.path)
    }
}

/// Most file rules one policy may list (rule ids must fit the kernel's u16 rule field).
pub const MAX_FILE_RULES: usize = 4096;

/// Detection rules: what makes an `event.kind: alert`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alerts {
    /// `count` denials in one cgroup within `window_secs`; None = off.
    pub denial_burst: Option<Burst>,
    /// Alert on the first allowed connection to a destination (IP and port) this policy
    /// has not been seen to reach.
    pub new_destination: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Burst {
    pub count: u32,
    pub window_secs: u64,
}

/// The default burst alert: 20 denials within 10 seconds.
pub const DEFAULT_BURST: Burst = Burst { count: 20, window_secs: 10 };

impl Default for Alerts {
    fn default() -> Self {
        Self { denial_burst: Some(DEFAULT_BURST), new_destination: false }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    pub default: Action,
    pub allow: Vec<NetRule>,
    pub deny: Vec<NetRule>,
    /// `domain:` rules of both lists, allow rules first.
    #[serde(default)]
    pub domains: Vec<DomainRule>,
    pub raw_sockets: bool,
    pub icmp: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRule {
    pub name: String,
    pub net: IpNet,
    /// Inclusive port ranges; empty = every port.
    pub ports: Vec<(u16, u16)>,
    /// `enforcer_common::proto` bits.
    pub protocols: u8,
    /// CLOCK_BOOTTIME ns when the rule lapses (grants); 0 = never. Policy files cannot
    /// set it.
    pub expires_at: u64,
}

/// Splits a list into its address rules and its domain rules, each named by its given
/// name or its place in the list (`allow[3]`).
/// A name or a wildcard from a `domain:` rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainPattern {
    /// Lower case, no trailing dot: `api.example.test`, or `example.test` for `*.example.test`.
    pub name: String,
    /// `*.name`: any name below `name` (one or more labels), not `name` itself.
    pub wildcard: bool,
}

/// Longest name DNS carries (RFC 1035: 255 bytes on the wire, 253 as text).
pub const DNS_MAX_NAME: usize = 253;
/// Longest label DNS carries.
pub const DNS_MAX_LABEL: usize = 63;

impl DomainPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.strip_suffix('.').unwrap_or(text);
        let (wildcard, name) = match trimmed.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        if name.is_empty() || name == "*" {
            return Err(format!("domain {text:?} names nothing; a wildcard needs a name after \"*.\""));
        }
        if name.contains('*') {
            return Err(format!("domain {text:?}: \"*\" is only allowed as the whole first label (\"*.example.com\")"));
        }
        if !name.is_ascii() {
            return Err(format!("domain {text:?} is not ASCII: write internationalized names in punycode (xn--...)"));
        }
        if name.len() > DNS_MAX_NAME {
            return Err(format!("domain {text:?} is longer than {DNS_MAX_NAME} characters"));
        }
        for label in name.split('.') {
            if label.is_empty() || label.len() > DNS_MAX_LABEL {
                return Err(format!("domain {text:?}: every label must be 1 to {DNS_MAX_LABEL} characters"));
            }
            if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(format!("domain {text:?}: labels hold letters, digits, '-' and '_' only"));
            }
        }
        Ok(Self { name: name.to_ascii_lowercase(), wildcard })
    }

    /// `query` in lower case without the trailing dot.
    pub fn matches(&self, query: &str) -> bool {
        if !self.wildcard {
            return query == self.name;
        }
        query.len() > self.name.len() + 1
            && query.ends_with(self.name.as_str())
            && query.as_bytes()[query.len() - self.name.len() - 1] == b'.'
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard { write!(f, "*.{}", self.name) } else { f.write_str(&self.name) }
    }
}

/// A `domain:` rule. Allowed names resolve (through the proxy), and the addresses in
/// their answers open for the rule's ports and protocols until the answer's TTL.
/// Denied names are refused even when an allow rule's wildcard covers them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainRule {
    pub name: String,
    pub action: Action,
    pub pattern: DomainPattern,
    /// Inclusive port ranges; empty = every port.
    pub ports: Vec<(u16, u16)>,
    pub protocols: u8,
}

/// `spec.dns`: how the proxy resolves and what it lets through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsSettings {
    /// Servers the proxy asks; empty = the host's /etc/resolv.conf servers at attach time.
    pub upstream: Vec<std::net::SocketAddr>,
    /// An answer opens its addresses for at least this long, and for at most `max_ttl_secs`
    /// (the TTLs in the answer the agent sees are lowered to it too).
    pub min_ttl_secs: u32,
    pub max_ttl_secs: u32,
    /// Allowed names may resolve to private, loopback or link-local space.
    pub allow_private_answers: bool,
    /// Longer names or labels are refused: they are how data leaves through DNS.
    pub max_name_length: usize,
    pub max_label_length: usize,
    /// Queries per second the cgroup may make (bursts up to twice that); 0 = unlimited.
    pub queries_per_second: u32,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            upstream: Vec::new(),
            min_ttl_secs: 5,
            max_ttl_secs: 3600,
            allow_private_answers: false,
            max_name_length: 128,
            max_label_length: 40,
            queries_per_second: 100,
        }
    }
}
