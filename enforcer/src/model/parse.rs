//! Validates a policy: YAML in, `Policy` out. Pure: no kernel, no root.
//!
//! Checks live in `Deserialize`/`TryFrom` impls of small value types (`Cidr`, `Port`,
//! `Name`, ...), so serde_yaml attaches the line and column of the offending value and
//! every error reads `file:line:column: message`.
use std::{fmt, net::IpAddr, path::Path, time::Duration};

use enforcer_common::proto;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, de};

use super::policy::{
    Action, Alerts, Burst, DEFAULT_BURST, DNS_MAX_LABEL, DNS_MAX_NAME, DnsSettings, DomainPattern, DomainRule,
    FileList, FilePolicy, FileRule, IpcPolicy, MAX_FILE_RULES, MAX_NAME_LEN, MAX_RULES, Mode, NetRule, NetworkPolicy,
    Policy, SocketFamily, parse_net,
};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{file}:{line}:{column}: {message}")]
    Invalid { file: String, line: usize, column: usize, message: String },
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

impl PolicyError {
    pub fn location(&self) -> Option<(usize, usize)> {
        match self {
            Self::Invalid { line, column, .. } => Some((*line, *column)),
            Self::Io { .. } => None,
        }
    }
}

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
        parse_net(&text).map(Cidr).map_err(de::Error::custom)
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
        parse_net(&text).map(HostIp).map_err(de::Error::custom)
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
    if (1..=65535).contains(&n) { Ok(n as u16) } else { Err(format!("port {n} in {whole} is out of range 1-65535")) }
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
    domain: Option<Domain>,
    ports: Option<Vec<PortRange>>,
    protocols: Option<Vec<Protocol>>,
}

/// A rule after validation, before it is given its list's default name.
#[derive(Debug)]
struct CheckedRule {
    name: Option<String>,
    target: Target,
    ports: Vec<(u16, u16)>,
    protocols: u8,
}

#[derive(Debug)]
enum Target {
    Net(IpNet),
    Domain(DomainPattern),
}

/// `api.example.test` or `*.example.test`: lower-cased, no trailing dot, ASCII only.
#[derive(Debug)]
struct Domain(DomainPattern);

impl<'de> Deserialize<'de> for Domain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        DomainPattern::parse(&text).map(Domain).map_err(de::Error::custom)
    }
}

impl TryFrom<RawRule> for CheckedRule {
    type Error = String;
    fn try_from(raw: RawRule) -> Result<Self, String> {
        let target = match (raw.cidr, raw.ip, raw.domain) {
            (Some(Cidr(n)), None, None) | (None, Some(HostIp(n)), None) => Target::Net(n),
            (None, None, Some(Domain(d))) => Target::Domain(d),
            (None, None, None) => return Err("a rule needs cidr:, ip: or domain:".into()),
            _ => return Err("a rule takes one of cidr:, ip: or domain:, not several".into()),
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
        Ok(Self { name: raw.name.map(|n| n.0), target, ports, protocols })
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
        let secs = parse_duration(&text, "window").map_err(de::Error::custom)?.as_secs();
        if secs == 0 || secs > 24 * 3600 {
            return Err(de::Error::custom(format!(
                "window \"{text}\" must be between 1s and 24h (use s, m or h after a number)"
            )));
        }
        Ok(Window(secs))
    }
}

/// `90s`, `10m`, `2h`, `1h30m` (humantime's units, whole seconds); `what` names the
/// value in the error.
pub fn parse_duration(text: &str, what: &str) -> Result<Duration, String> {
    let hint = "use s, m or h after a number (e.g. 90s, 10m, 2h)";
    let d = humantime::parse_duration(text).map_err(|e| format!("invalid {what} \"{text}\": {e}; {hint}"))?;
    if d.subsec_nanos() != 0 {
        return Err(format!("{what} \"{text}\" is not a whole number of seconds; {hint}"));
    }
    Ok(d)
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
    #[serde(default)]
    dns: Option<RawDns>,
    #[serde(default)]
    ipc: RawIpc,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIpc {
    /// Extra socket families (`vsock`, `packet`, `netlink`, ...).
    #[serde(default)]
    families: Vec<SocketFamily>,
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
fn name_rules(list: &str, action: Action, rules: Vec<CheckedRule>) -> (Vec<NetRule>, Vec<DomainRule>) {
    let (mut nets, mut domains) = (Vec::new(), Vec::new());
    for (i, r) in rules.into_iter().enumerate() {
        let name = r.name.unwrap_or_else(|| format!("{list}[{i}]"));
        match r.target {
            Target::Net(net) => nets.push(NetRule { name, net, ports: r.ports, protocols: r.protocols, expires_at: 0 }),
            Target::Domain(pattern) => {
                domains.push(DomainRule { name, action, pattern, ports: r.ports, protocols: r.protocols })
            }
        }
    }
    (nets, domains)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    #[serde(default)]
    upstream: Vec<Upstream>,
    min_ttl: Option<Window>,
    max_ttl: Option<Window>,
    #[serde(default)]
    allow_private_answers: bool,
    max_name_length: Option<Length<DNS_MAX_NAME>>,
    max_label_length: Option<Length<DNS_MAX_LABEL>>,
    queries_per_second: Option<u32>,
}

/// `127.0.0.53:53`, `[::1]:53`, or an address (port 53).
struct Upstream(std::net::SocketAddr);

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if let Ok(sa) = text.parse::<std::net::SocketAddr>() {
            if sa.port() == 0 {
                return Err(de::Error::custom(format!("upstream \"{text}\": port 0 is not a port")));
            }
            return Ok(Upstream(sa));
        }
        text.parse::<IpAddr>()
            .map(|ip| Upstream(std::net::SocketAddr::new(ip, 53)))
            .map_err(|_| de::Error::custom(format!("upstream \"{text}\" is not an address or address:port")))
    }
}

/// A length between 1 and MAX.
struct Length<const MAX: usize>(usize);

impl<'de, const MAX: usize> Deserialize<'de> for Length<MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        if n == 0 || n > MAX as u64 {
            return Err(de::Error::custom(format!("length \"{n}\" must be between 1 and {MAX}")));
        }
        Ok(Length(n as usize))
    }
}

impl RawDns {
    fn settings(self) -> Result<DnsSettings, String> {
        let d = DnsSettings::default();
        let min_ttl_secs = self.min_ttl.map_or(d.min_ttl_secs, |w| w.0 as u32);
        let max_ttl_secs = self.max_ttl.map_or(d.max_ttl_secs, |w| w.0 as u32);
        if min_ttl_secs > max_ttl_secs {
            return Err(format!("dns.min_ttl ({min_ttl_secs}s) is longer than dns.max_ttl ({max_ttl_secs}s)"));
        }
        Ok(DnsSettings {
            upstream: self.upstream.into_iter().map(|u| u.0).collect(),
            min_ttl_secs,
            max_ttl_secs,
            allow_private_answers: self.allow_private_answers,
            max_name_length: self.max_name_length.map_or(d.max_name_length, |l| l.0),
            max_label_length: self.max_label_length.map_or(d.max_label_length, |l| l.0),
            queries_per_second: self.queries_per_second.unwrap_or(d.queries_per_second),
        })
    }
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
    let (allow, allow_domains) = name_rules("allow", Action::Allow, network.allow);
    let (deny, deny_domains) = name_rules("deny", Action::Deny, network.deny);
    let domains: Vec<DomainRule> = allow_domains.into_iter().chain(deny_domains).collect();
    // A dns: section or any domain rule turns the proxy on: DNS from the cgroup goes to it.
    let dns = match (raw.spec.dns, domains.is_empty()) {
        (None, true) => None,
        (None, false) => Some(DnsSettings::default()),
        (Some(d), _) => Some(d.settings().map_err(|m| invalid(1, 1, m))?),
    };
    Ok(Policy {
        name: raw.metadata.name.0,
        mode: raw.spec.mode,
        network: NetworkPolicy {
            default: network.default,
            allow,
            deny,
            domains,
            raw_sockets: network.raw_sockets,
            icmp: network.icmp,
        },
        dns,
        ipc: IpcPolicy {
            families: {
                let mut families = raw.spec.ipc.families;
                families.sort();
                families.dedup();
                families
            },
        },
        log_allowed: raw.spec.audit.log_allowed,
        files: match raw.spec.files {
            None => None,
            Some(f) => {
                let mut rules = Vec::new();
                for (list, paths) in [
                    (FileList::Read, f.read),
                    (FileList::Write, f.write),
                    (FileList::Exec, f.exec),
                    (FileList::Deny, f.deny),
                ] {
                    rules.extend(paths.into_iter().map(|p| FileRule { list, path: p.0, expires_at: 0 }));
                }
                if rules.len() > MAX_FILE_RULES {
                    return Err(invalid(
                        1,
                        1,
                        format!("{} file rules: at most {MAX_FILE_RULES} are supported", rules.len()),
                    ));
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
        let p = parse_policy_str(
            &format!("{HEAD}  alerts:\n    denial_burst: {{count: 5, window: 2m}}\n    new_destination: true\n"),
            "t.yaml",
        )
        .unwrap();
        assert_eq!(
            p.alerts,
            Alerts { denial_burst: Some(Burst { count: 5, window_secs: 120 }), new_destination: true }
        );
        let off = parse_policy_str(&format!("{HEAD}  alerts:\n    denial_burst: false\n"), "t.yaml").unwrap();
        assert_eq!(off.alerts.denial_burst, None);
        assert_eq!(parse_policy_str(HEAD, "t.yaml").unwrap().alerts, Alerts::default());
        let bad = parse_policy_str(&format!("{HEAD}  alerts:\n    denial_burst: {{count: 5, window: 2d}}\n"), "t.yaml")
            .unwrap_err();
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
        assert_eq!(parse_net("::ffff:10.1.2.3").unwrap(), "10.1.2.3/32".parse::<IpNet>().unwrap());
        assert_eq!(parse_net("::ffff:10.0.0.0/104").unwrap(), "10.0.0.0/8".parse::<IpNet>().unwrap());
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
            (
                with_network("    allow:\n      - cidr: 10.0.0.0/33\n"),
                8,
                15,
                "prefix length 33 in \"10.0.0.0/33\" exceeds 32",
            ),
            (with_network("    allow:\n      - cidr: 10.0.0.1/8\n"), 8, 15, "did you mean 10.0.0.0/8?"),
            (with_network("    allow:\n      - cidr: 10.0.0.0/8\n        ip: 10.0.0.1\n"), 8, 7, "not several"),
            (with_network("    allow:\n      - ports: [80]\n"), 8, 7, "needs cidr:, ip: or domain:"),
            (
                with_network("    allow:\n      - ip: 127.0.0.1\n        ports: [0]\n"),
                9,
                17,
                "port 0 in 0 is out of range",
            ),
            (with_network("    allow:\n      - ip: 127.0.0.1\n        ports: [70000]\n"), 9, 17, "port 70000"),
            (
                with_network("    allow:\n      - ip: 127.0.0.1\n        ports: [\"90-80\"]\n"),
                9,
                18,
                "reversed: 90 > 80",
            ),
            (with_network("    allow:\n      - ip: 127.0.0.1\n        ports: []\n"), 8, 7, "ports: is empty"),
            (
                with_network("    allow:\n      - ip: 127.0.0.1\n        protocols: [icmp]\n"),
                9,
                21,
                "unknown variant `icmp`",
            ),
            (with_network("    allow:\n      - ip: 127.0.0.1\n        protocols: []\n"), 8, 7, "protocols: is empty"),
            (with_network("    allow:\n      - domain: api.example.com\n        ip: 127.0.0.1\n"), 8, 7, "not several"),
            (with_network("    allow:\n      - domain: \"*.\"\n"), 8, 18, "names nothing"),
            (
                with_network("    allow:\n      - domain: \"a.*.example.com\"\n"),
                8,
                18,
                "only allowed as the whole first label",
            ),
            (with_network("    allow:\n      - domain: \"bücher.example\"\n"), 8, 18, "punycode"),
            (with_network("    allow:\n      - domain: \"a..example.com\"\n"), 8, 18, "every label must be 1 to 63"),
            (with_network("    allow:\n      - domain: \"a b.com\"\n"), 8, 18, "letters, digits"),
            (format!("{HEAD}  dns:\n    upstream: [\"resolver.local\"]\n"), 7, 17, "is not an address"),
            (format!("{HEAD}  dns:\n    max_label_length: 64\n"), 7, 23, "between 1 and 63"),
            (format!("{HEAD}  dns:\n    min_ttl: 5x\n"), 7, 14, "invalid window"),
            (format!("{HEAD}  dns:\n    resolver: 1.1.1.1\n"), 7, 5, "unknown field `resolver`"),
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
                wrong.push(
                    e.downcast_ref::<String>().cloned().unwrap_or_default().lines().next().unwrap_or("").to_string(),
                );
            }
        }
        assert!(wrong.is_empty(), "{} cases wrong:\n{}", wrong.len(), wrong.join("\n"));
    }

    #[test]
    fn domain_rules_and_dns_settings() {
        let text = format!(
            "{HEAD}  network:\n    allow:\n      - domain: API.Example.test.\n        ports: [443]\n      - domain: \"*.cdn.example.test\"\n      - cidr: 10.0.0.0/8\n    deny:\n      - domain: bad.cdn.example.test\n  dns:\n    upstream: [127.0.0.53, \"[::1]:5353\"]\n    min_ttl: 1s\n    max_ttl: 10m\n"
        );
        let p = parse_policy_str(&text, "t.yaml").unwrap();
        let d = &p.network.domains;
        assert_eq!(d.len(), 3);
        assert_eq!(
            (d[0].pattern.to_string(), d[0].action, d[0].ports.clone()),
            ("api.example.test".into(), Action::Allow, vec![(443, 443)])
        );
        assert_eq!((d[1].name.as_str(), d[2].name.as_str(), d[2].action), ("allow[1]", "deny[0]", Action::Deny));
        assert_eq!(p.network.allow.len(), 1);
        let dns = p.dns.unwrap();
        assert_eq!(dns.upstream, vec!["127.0.0.53:53".parse().unwrap(), "[::1]:5353".parse().unwrap()]);
        assert_eq!((dns.min_ttl_secs, dns.max_ttl_secs, dns.allow_private_answers), (1, 600, false));
        let w = &d[1].pattern;
        assert!(w.matches("a.cdn.example.test") && w.matches("x.y.cdn.example.test"));
        assert!(!w.matches("cdn.example.test") && !w.matches("evilcdn.example.test") && !w.matches("example.test"));
        // No domain rules and no dns section: DNS is judged like any traffic.
        assert!(parse_policy_str(&with_network("    default: deny\n"), "t.yaml").unwrap().dns.is_none());
        // min_ttl above max_ttl is refused.
        assert!(
            parse_policy_str(&format!("{HEAD}  dns:\n    min_ttl: 2h\n    max_ttl: 1h\n"), "t.yaml")
                .unwrap_err()
                .to_string()
                .contains("longer than dns.max_ttl")
        );
    }

    #[test]
    fn ipc_families_parse_sorted_and_unknown_ones_are_refused_with_their_place() {
        let p = parse_policy_str(&format!("{HEAD}  ipc:\n    families: [vsock, netlink, vsock]\n"), "t.yaml").unwrap();
        assert_eq!(p.ipc.families, [SocketFamily::Netlink, SocketFamily::Vsock]);
        assert_eq!(parse_policy_str(HEAD, "t.yaml").unwrap().ipc, IpcPolicy::default(), "none unless listed");
        let bad = parse_policy_str(&format!("{HEAD}  ipc:\n    families: [vsock, bluetoth]\n"), "t.yaml").unwrap_err();
        assert_eq!(bad.location(), Some((7, 23)), "{bad}");
        assert!(bad.to_string().contains("bluetoth"), "{bad}");
        let unix = parse_policy_str(&format!("{HEAD}  ipc:\n    unix: [/run/x.sock]\n"), "t.yaml").unwrap_err();
        assert!(unix.to_string().contains("unknown field `unix`"), "not enforced yet, so not accepted: {unix}");
    }
}
