//! Validates a policy: YAML in, `Policy` out. Pure: no kernel, no root.
//!
//! Checks live in `Deserialize`/`TryFrom` impls of small value types (`Cidr`, `Port`,
//! `Name`, ...), so serde_yaml attaches the line and column of the offending value and
//! every error reads `file:line:column: message`.
use std::{fmt, net::IpAddr, path::Path, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, de};

use enforcer_common::proto;

/// Rule ids are u16 in the kernel clauses; 0 means "the default decided".
pub const MAX_RULES: usize = u16::MAX as usize;
/// Matches the kernel's policy name buffer (64 bytes with a NUL).
pub const MAX_NAME_LEN: usize = enforcer_common::limits::POLICY_NAME_LEN - 1;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{file}:{line}:{column}: {message}")]
    Invalid { file: String, line: usize, column: usize, message: String },
    #[error("{file}: {source}")]
    Io { file: String, #[source] source: std::io::Error },
}

impl PolicyError {
    pub fn location(&self) -> Option<(usize, usize)> {
        match self {
            Self::Invalid { line, column, .. } => Some((*line, *column)),
            Self::Io { .. } => None,
        }
    }
}

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

/// An address prefix with no host bits set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IpNet {
    V4 { addr: [u8; 4], len: u8 },
    V6 { addr: [u8; 16], len: u8 },
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4 { addr, len } => write!(f, "{}/{len}", std::net::Ipv4Addr::from(*addr)),
            Self::V6 { addr, len } => write!(f, "{}/{len}", std::net::Ipv6Addr::from(*addr)),
        }
    }
}

/// Clears the bits after `len`.
pub fn mask<const N: usize>(mut addr: [u8; N], len: u8) -> [u8; N] {
    for (i, byte) in addr.iter_mut().enumerate() {
        let keep = (len as usize).saturating_sub(i * 8).min(8);
        *byte &= if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
    }
    addr
}

impl IpNet {
    /// Parses `addr/len` or a bare address (a host prefix). IPv4-mapped IPv6 prefixes
    /// (inside ::ffff:0:0/96) become IPv4 prefixes: the kernel judges mapped
    /// destinations by the IPv4 rules, so that is where such a rule must live.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr_text, len_text) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| format!("invalid IP address {addr_text:?} in {text:?}"))?;
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
            IpAddr::V4(a) => Self::V4 { addr: a.octets(), len },
            IpAddr::V6(a) => {
                let octets = a.octets();
                let mapped = octets[..10] == [0; 10] && octets[10..12] == [0xff, 0xff];
                if mapped && len >= 96 {
                    Self::V4 { addr: [octets[12], octets[13], octets[14], octets[15]], len: len - 96 }
                } else {
                    Self::V6 { addr: octets, len }
                }
            }
        };
        let masked = match net {
            Self::V4 { addr, len } => Self::V4 { addr: mask(addr, len), len },
            Self::V6 { addr, len } => Self::V6 { addr: mask(addr, len), len },
        };
        if masked != net {
            return Err(format!("{text:?} has host bits set; did you mean {masked}?"));
        }
        Ok(net)
    }
}

/// A CIDR value from the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr(IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if !text.contains('/') {
            return Err(de::Error::custom(format!(
                "invalid CIDR {text:?}: expected ADDRESS/LENGTH (use `ip:` for one address)"
            )));
        }
        IpNet::parse(&text).map(Cidr).map_err(de::Error::custom)
    }
}

/// A single address from the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HostIp(IpNet);

impl<'de> Deserialize<'de> for HostIp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.contains('/') {
            return Err(de::Error::custom(format!("ip {text:?} must be one address; use `cidr:` for a prefix")));
        }
        IpNet::parse(&text).map(HostIp).map_err(de::Error::custom)
    }
}

/// A policy or rule name: what events and metrics show.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Name(String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() || text.len() > MAX_NAME_LEN {
            return Err(de::Error::custom(format!("name {text:?} must be 1 to {MAX_NAME_LEN} bytes long")));
        }
        if let Some(bad) = text.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
            return Err(de::Error::custom(format!(
                "name {text:?} contains {bad:?}: use letters, digits, '.', '_' and '-'"
            )));
        }
        Ok(Name(text))
    }
}

/// One entry of `ports:` — `443` or `"8000-8100"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PortRange(u16, u16);

fn port_number(n: i64, whole: &str) -> Result<u16, String> {
    if (1..=65535).contains(&n) {
        Ok(n as u16)
    } else {
        Err(format!("port {n} in {whole} is out of range 1-65535"))
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (1-65535) or a range \"LOW-HIGH\"")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<PortRange, E> {
                let p = port_number(n, &n.to_string()).map_err(E::custom)?;
                Ok(PortRange(p, p))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<PortRange, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PortRange, E> {
                let quoted = format!("{s:?}");
                let parse = |t: &str| -> Result<u16, E> {
                    let n: i64 = t.trim().parse().map_err(|_| E::custom(format!("invalid port {t:?} in {quoted}")))?;
                    port_number(n, &quoted).map_err(E::custom)
                };
                let (lo, hi) = match s.split_once('-') {
                    Some((a, b)) => (parse(a)?, parse(b)?),
                    None => {
                        let p = parse(s)?;
                        (p, p)
                    }
                };
                if lo > hi {
                    return Err(E::custom(format!("port range {quoted} is reversed: {lo} > {hi}")));
                }
                Ok(PortRange(lo, hi))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Protocol {
    Tcp,
    Udp,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Name>,
    cidr: Option<Cidr>,
    ip: Option<HostIp>,
    domain: Option<String>,
    ports: Option<Vec<PortRange>>,
    protocols: Option<Vec<Protocol>>,
}

/// A rule after validation, before it is given its list's default name.
#[derive(Debug)]
struct CheckedRule {
    name: Option<String>,
    net: IpNet,
    ports: Vec<(u16, u16)>,
    protocols: u8,
}

impl TryFrom<RawRule> for CheckedRule {
    type Error = String;
    fn try_from(raw: RawRule) -> Result<Self, String> {
        if let Some(domain) = raw.domain {
            return Err(format!(
                "domain rules ({domain:?}) are not supported yet: they arrive with DNS-aware egress; \
                 use cidr: or ip: for now"
            ));
        }
        let net = match (raw.cidr, raw.ip) {
            (Some(Cidr(n)), None) | (None, Some(HostIp(n))) => n,
            (Some(_), Some(_)) => return Err("a rule takes one of cidr: or ip:, not both".into()),
            (None, None) => return Err("a rule needs cidr: or ip:".into()),
        };
        let ports = match raw.ports {
            None => Vec::new(),
            Some(p) if p.is_empty() => return Err("ports: is empty; omit it to match all ports".into()),
            Some(p) => p.into_iter().map(|PortRange(lo, hi)| (lo, hi)).collect(),
        };
        let protocols = match raw.protocols {
            None => proto::ANY,
            Some(p) if p.is_empty() => return Err("protocols: is empty; omit it to match tcp and udp".into()),
            Some(p) => p.iter().fold(0, |bits, p| bits | if *p == Protocol::Tcp { proto::TCP } else { proto::UDP }),
        };
        Ok(Self { name: raw.name.map(|n| n.0), net, ports, protocols })
    }
}

impl<'de> Deserialize<'de> for CheckedRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        CheckedRule::try_from(RawRule::deserialize(d)?).map_err(de::Error::custom)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    #[serde(default)]
    default: Action,
    #[serde(default)]
    allow: Vec<CheckedRule>,
    #[serde(default)]
    deny: Vec<CheckedRule>,
    #[serde(default)]
    raw_sockets: bool,
    #[serde(default)]
    icmp: bool,
}

impl Default for RawNetwork {
    fn default() -> Self {
        Self { default: Action::Deny, allow: Vec::new(), deny: Vec::new(), raw_sockets: false, icmp: false }
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    #[serde(default)]
    log_allowed: bool,
}

/// `10s`, `5m`, `1h` (whole units).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window(u64);

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let secs = parse_duration_secs(&text, "window").map_err(de::Error::custom)?;
        if secs == 0 || secs > 24 * 3600 {
            return Err(de::Error::custom(format!("window \"{text}\" must be between 1s and 24h")));
        }
        Ok(Window(secs))
    }
}

/// `90s`, `10m`, `2h` in seconds; `what` names the value in the error.
pub fn parse_duration_secs(text: &str, what: &str) -> Result<u64, String> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => 0,
    };
    match number.parse::<u64>() {
        Ok(n) if scale != 0 => n.checked_mul(scale).ok_or_else(|| format!("{what} \"{text}\" is too long")),
        _ => Err(format!("invalid {what} \"{text}\": use s, m or h after a number (e.g. 90s, 10m, 2h)")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBurst {
    count: u32,
    window: Window,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    /// `false` turns the burst alert off; a mapping sets its threshold.
    #[serde(default)]
    denial_burst: Option<BurstSetting>,
    #[serde(default)]
    new_destination: bool,
}

/// `true`/`false`, or a mapping with the threshold. Not `untagged`: that would replace
/// the mapping's own errors (a bad window) with "did not match any variant".
enum BurstSetting {
    Enabled(bool),
    Threshold(RawBurst),
}

impl<'de> Deserialize<'de> for BurstSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = BurstSetting;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false, or {count: N, window: 10s}")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<BurstSetting, E> {
                Ok(BurstSetting::Enabled(b))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<BurstSetting, A::Error> {
                RawBurst::deserialize(de::value::MapAccessDeserializer::new(map)).map(BurstSetting::Threshold)
            }
        }
        d.deserialize_any(V)
    }
}

/// A path from `spec.files`: absolute, or `~` / `~/...` for the agent's home.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PolicyPath(String);

impl<'de> Deserialize<'de> for PolicyPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        check_policy_path(&text).map_err(de::Error::custom)?;
        Ok(PolicyPath(text.trim_end_matches('/').to_string()).normalized())
    }
}

impl PolicyPath {
    /// "/" stays "/", "~/" becomes "~".
    fn normalized(self) -> Self {
        if self.0.is_empty() { PolicyPath("/".into()) } else { self }
    }
}

/// Paths are compiled against the filesystem later; here only their shape is checked.
fn check_policy_path(text: &str) -> Result<(), String> {
    if !(text.starts_with('/') || text == "~" || text.starts_with("~/")) {
        return Err(format!("path {text:?} must be absolute or start with ~/ (the agent's home)"));
    }
    if text.contains('\0') {
        return Err(format!("path {text:?} contains a NUL byte"));
    }
    if let Some(bad) = text.split('/').find(|c| *c == "." || *c == "..") {
        return Err(format!("path {text:?} contains {bad:?}: write the path it means"));
    }
    if let Some(long) = text.split('/').find(|c| c.len() > 255) {
        return Err(format!("path {text:?} has a component of {} bytes (at most 255)", long.len()));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFiles {
    #[serde(default)]
    default: Action,
    #[serde(default)]
    read: Vec<PolicyPath>,
    #[serde(default)]
    write: Vec<PolicyPath>,
    #[serde(default)]
    exec: Vec<PolicyPath>,
    #[serde(default)]
    deny: Vec<PolicyPath>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    alerts: Option<RawAlerts>,
    #[serde(default)]
    files: Option<RawFiles>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetadata {
    name: Name,
}

#[derive(Deserialize)]
enum Kind {
    AgentPolicy,
}

struct ApiVersion;

impl<'de> Deserialize<'de> for ApiVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = String::deserialize(d)?;
        if v == "enforcer/v1" {
            Ok(ApiVersion)
        } else {
            Err(de::Error::custom(format!("unsupported apiVersion {v:?}: expected \"enforcer/v1\"")))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(rename = "apiVersion")]
    _api_version: ApiVersion,
    #[serde(rename = "kind")]
    _kind: Kind,
    metadata: RawMetadata,
    #[serde(default)]
    spec: RawSpec,
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

fn name_rules(list: &str, rules: Vec<CheckedRule>) -> Vec<NetRule> {
    rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| NetRule {
            name: r.name.unwrap_or_else(|| format!("{list}[{i}]")),
            net: r.net,
            ports: r.ports,
            protocols: r.protocols,
            expires_at: 0,
        })
        .collect()
}

/// serde_yaml places errors raised by our value checks at the start of the enclosing
/// mapping. Our messages quote the offending value first, so point at where that text
/// next appears from there on; otherwise keep serde_yaml's location.
fn refine_location(text: &str, line: usize, column: usize, message: &str) -> (usize, usize) {
    let Some(quoted) = message.split('"').nth(1).filter(|q| !q.is_empty()) else {
        return (line, column);
    };
    for (i, l) in text.lines().enumerate().skip(line.saturating_sub(1)) {
        let from = if i + 1 == line { column.saturating_sub(1).min(l.len()) } else { 0 };
        if let Some(at) = l.get(from..).and_then(|rest| rest.find(quoted)) {
            return (i + 1, from + at + 1);
        }
    }
    (line, column)
}

pub fn parse_policy_file(path: &Path) -> Result<Policy, PolicyError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io { file: file.clone(), source })?;
    parse_policy_str(&text, &file)
}

pub fn parse_policy_str(text: &str, origin: &str) -> Result<Policy, PolicyError> {
    let invalid = |line: usize, column: usize, message: String| PolicyError::Invalid {
        file: origin.to_string(),
        line,
        column,
        message,
    };
    if text.trim().is_empty() || text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
        return Err(invalid(1, 1, "the policy is empty: expected apiVersion, kind, metadata and spec".into()));
    }
    let raw: RawPolicy = serde_yaml::from_str(text).map_err(|e| {
        let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((1, 1));
        let message = e.to_string();
        let mut message = match message.rfind(" at line ") {
            Some(i) => message[..i].to_string(),
            None => message,
        };
        let (line, column) = refine_location(text, line, column, &message);
        if text.lines().nth(line - 1).is_some_and(|l| l.contains('\t')) {
            message.push_str(" (YAML does not allow tabs for indentation)");
        }
        invalid(line, column, message)
    })?;
    let network = raw.spec.network;
    let rules = network.allow.len() + network.deny.len();
    if rules > MAX_RULES {
        return Err(invalid(1, 1, format!("{rules} network rules: at most {MAX_RULES} are supported")));
    }
    Ok(Policy {
        name: raw.metadata.name.0,
        mode: raw.spec.mode,
        network: NetworkPolicy {
            default: network.default,
            allow: name_rules("allow", network.allow),
            deny: name_rules("deny", network.deny),
            raw_sockets: network.raw_sockets,
            icmp: network.icmp,
        },
        log_allowed: raw.spec.audit.log_allowed,
        files: match raw.spec.files {
            None => None,
            Some(f) => {
                let mut rules = Vec::new();
                for (list, paths) in
                    [(FileList::Read, f.read), (FileList::Write, f.write), (FileList::Exec, f.exec), (FileList::Deny, f.deny)]
                {
                    rules.extend(paths.into_iter().map(|p| FileRule { list, path: p.0, expires_at: 0 }));
                }
                if rules.len() > MAX_FILE_RULES {
                    return Err(invalid(1, 1, format!("{} file rules: at most {MAX_FILE_RULES} are supported", rules.len())));
                }
                Some(FilePolicy { default: f.default, rules })
            }
        },
        alerts: match raw.spec.alerts {
            None => Alerts::default(),
            Some(a) => Alerts {
                denial_burst: match a.denial_burst {
                    None | Some(BurstSetting::Enabled(true)) => Some(DEFAULT_BURST),
                    Some(BurstSetting::Enabled(false)) => None,
                    Some(BurstSetting::Threshold(RawBurst { count, window })) => {
                        if count == 0 {
                            return Err(invalid(1, 1, "alerts.denial_burst.count must be at least 1".into()));
                        }
                        Some(Burst { count, window_secs: window.0 })
                    }
                },
                new_destination: a.new_destination,
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: t\nspec:\n";

    fn with_network(body: &str) -> String {
        format!("{HEAD}  network:\n{body}")
    }

    /// Asserts the error names `t.yaml:LINE:COL:` and contains `fragment`.
    fn assert_error(text: &str, line: usize, column: usize, fragment: &str) {
        let err = parse_policy_str(text, "t.yaml").expect_err("expected the policy to be refused");
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("t.yaml:{line}:{column}: ")),
            "expected location {line}:{column}, got: {shown}\n--- policy ---\n{text}"
        );
        assert!(shown.contains(fragment), "expected {fragment:?} in: {shown}");
    }

    #[test]
    fn parses_a_full_policy() {
        let p = parse_policy_str(
            &format!(
                "{HEAD}  mode: audit\n  network:\n    default: allow\n    allow:\n      - name: web\n        cidr: 10.0.0.0/8\n        ports: [80, \"8000-8100\"]\n        protocols: [tcp]\n      - ip: ::1\n    deny:\n      - cidr: 169.254.169.254/32\n    raw_sockets: true\n  audit:\n    log_allowed: true\n"
            ),
            "t.yaml",
        )
        .unwrap();
        assert_eq!(p.name, "t");
        assert_eq!(p.mode, Mode::Audit);
        assert!(p.log_allowed);
        assert_eq!(p.network.default, Action::Allow);
        assert!(p.network.raw_sockets && !p.network.icmp);
        assert_eq!(p.network.allow[0].name, "web");
        assert_eq!(p.network.allow[0].ports, vec![(80, 80), (8000, 8100)]);
        assert_eq!(p.network.allow[0].protocols, proto::TCP);
        assert_eq!(p.network.allow[1].name, "allow[1]");
        assert_eq!(p.network.allow[1].net.to_string(), "::1/128");
        assert_eq!(p.network.allow[1].protocols, proto::ANY);
        assert_eq!(p.network.deny[0].name, "deny[0]");
    }

    #[test]
    fn alerts_have_defaults_and_thresholds() {
        let p = parse_policy_str(&format!("{HEAD}  alerts:\n    denial_burst: {{count: 5, window: 2m}}\n    new_destination: true\n"), "t.yaml").unwrap();
        assert_eq!(p.alerts, Alerts { denial_burst: Some(Burst { count: 5, window_secs: 120 }), new_destination: true });
        let off = parse_policy_str(&format!("{HEAD}  alerts:\n    denial_burst: false\n"), "t.yaml").unwrap();
        assert_eq!(off.alerts.denial_burst, None);
        assert_eq!(parse_policy_str(HEAD, "t.yaml").unwrap().alerts, Alerts::default());
        let bad = parse_policy_str(&format!("{HEAD}  alerts:\n    denial_burst: {{count: 5, window: 2d}}\n"), "t.yaml").unwrap_err();
        assert!(bad.to_string().contains("t.yaml:7:") && bad.to_string().contains("use s, m or h"), "{bad}");
    }

    #[test]
    fn defaults_are_enforce_and_deny() {
        let p = parse_policy_str(HEAD.trim_end_matches("spec:\n"), "t.yaml").unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.network.default, Action::Deny);
        assert!(p.network.allow.is_empty() && !p.log_allowed);
    }

    #[test]
    fn mapped_ipv6_rules_become_ipv4_rules() {
        assert_eq!(IpNet::parse("::ffff:10.1.2.3").unwrap(), IpNet::V4 { addr: [10, 1, 2, 3], len: 32 });
        assert_eq!(IpNet::parse("::ffff:10.0.0.0/104").unwrap(), IpNet::V4 { addr: [10, 0, 0, 0], len: 8 });
    }

    #[test]
    fn malformed_policies_are_refused_with_location() {
        let cases: &[(String, usize, usize, &str)] = &[
            (format!("{HEAD}  bogus: 1\n"), 6, 3, "unknown field `bogus`"),
            (format!("extra: 1\n{HEAD}"), 1, 1, "unknown field `extra`"),
            (HEAD.replace("enforcer/v1", "enforcer/v2"), 1, 13, "unsupported apiVersion \"enforcer/v2\""),
            (HEAD.replace("AgentPolicy", "Policy"), 2, 7, "unknown variant `Policy`"),
            ("apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata: {}\n".into(), 3, 11, "missing field `name`"),
            (HEAD.replace("name: t", "name: \"bad name\""), 4, 10, "contains ' '"),
            (format!("{HEAD}  mode: strict\n"), 6, 9, "unknown variant `strict`"),
            (with_network("    default: maybe\n"), 7, 14, "unknown variant `maybe`"),
            (with_network("    allow:\n      - cidr: 10.0.0/8\n"), 8, 15, "invalid IP address \"10.0.0\""),
            (with_network("    allow:\n      - cidr: 10.0.0.0/33\n"), 8, 15, "prefix length 33 in \"10.0.0.0/33\" exceeds 32"),
            (with_network("    allow:\n      - cidr: 10.0.0.1/8\n"), 8, 15, "did you mean 10.0.0.0/8?"),
            (with_network("    allow:\n      - cidr: 10.0.0.0/8\n        ip: 10.0.0.1\n"), 8, 7, "not both"),
            (with_network("    allow:\n      - ports: [80]\n"), 8, 7, "needs cidr: or ip:"),
            (with_network("    allow:\n      - ip: 127.0.0.1\n        ports: [0]\n"), 9, 17, "port 0 in 0 is out of range"),
            (with_network("    allow:\n      - ip: 127.0.0.1\n        ports: [70000]\n"), 9, 17, "port 70000"),
            (with_network("    allow:\n      - ip: 127.0.0.1\n        ports: [\"90-80\"]\n"), 9, 18, "reversed: 90 > 80"),
            (with_network("    allow:\n      - ip: 127.0.0.1\n        ports: []\n"), 8, 7, "ports: is empty"),
            (with_network("    allow:\n      - ip: 127.0.0.1\n        protocols: [icmp]\n"), 9, 21, "unknown variant `icmp`"),
            (with_network("    allow:\n      - ip: 127.0.0.1\n        protocols: []\n"), 8, 7, "protocols: is empty"),
            (with_network("    allow:\n      - domain: api.example.com\n"), 8, 17, "domain rules (\"api.example.com\") are not supported yet"),
            (format!("{HEAD}  files:\n    read: [usr/lib]\n"), 7, 12, "path \"usr/lib\" must be absolute"),
            (format!("{HEAD}  files:\n    deny: [\"~/a/../.ssh\"]\n"), 7, 13, "contains \"..\""),
            (format!("{HEAD}  files:\n    default: maybe\n"), 7, 14, "unknown variant `maybe`"),
            (format!("{HEAD}  files:\n    raed: [/usr]\n"), 7, 5, "unknown field `raed`"),
            (format!("{HEAD}  files:\n    read: /usr\n"), 7, 11, "expected a sequence"),
            (with_network("    allow:\n      - ip: 127.0.0.1/32\n"), 8, 13, "must be one address"),
            (with_network("    allow:\n      - ip: 127.0.0.1\n        port: [80]\n"), 9, 9, "unknown field `port`"),
            ("just text\n".into(), 1, 1, "expected struct"),
            ("".into(), 1, 1, "the policy is empty"),
            (format!("{HEAD}  network:\n\t  default: deny\n"), 7, 1, "does not allow tabs"),
        ];
        assert!(cases.len() >= 15);
        let mut wrong = Vec::new();
        for (text, line, column, fragment) in cases {
            if let Err(e) = std::panic::catch_unwind(|| assert_error(text, *line, *column, fragment)) {
                wrong.push(e.downcast_ref::<String>().cloned().unwrap_or_default().lines().next().unwrap_or("").to_string());
            }
        }
        assert!(wrong.is_empty(), "{} cases wrong:\n{}", wrong.len(), wrong.join("\n"));
    }
}
