//! Compiles a validated `Policy` into kernel table entries. Pure.
//!
//! The kernel makes one longest-prefix lookup of the destination and loops over the
//! clauses of the entry it finds (deny clauses win, then the first matching allow, then
//! the policy default). So every distinct rule prefix P becomes an entry holding the
//! clauses of *all* rules whose prefix contains P. That is exact: the rules containing
//! an address A are the listed prefixes containing A, each of which is at most as long
//! as the longest one, P, and therefore contains P too.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use enforcer_common::{Clause, PolicyConfig, PrefixClauses, action, limits, mode};

use ipnet::IpNet;

use super::{
    file_tables::FileTables,
    policy::{Action, DomainRule, Mode, NetRule, Policy, mask},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prefix4 {
    pub addr: [u8; 4],
    pub len: u8,
    pub clauses: PrefixClauses,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prefix6 {
    pub addr: [u8; 16],
    pub len: u8,
    pub clauses: PrefixClauses,
}

/// What events say about a rule; `rules[rule_id - 1]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    pub name: String,
    pub action: Action,
    pub text: String,
}

#[derive(Clone, Debug)]
pub struct CompiledPolicy {
    pub name: String,
    pub config: PolicyConfig,
    pub net4: Vec<Prefix4>,
    pub net6: Vec<Prefix6>,
    pub rules: Vec<RuleInfo>,
    /// File tables, compiled against the filesystem by `file_tables::compile` (the
    /// caller adds them).
    pub files: Option<FileTables>,
    /// The home `~` was expanded to, when the file tables were compiled.
    pub home: Option<std::path::PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(
        "{count} port/protocol clauses apply to {prefix} (rules {rules}); the kernel holds at \
         most {max} per prefix: merge port lists or split overlapping CIDRs"
    )]
    TooManyClauses { prefix: String, count: usize, max: usize, rules: String },
}

/// A rule with its id, in the form both families compile.
struct Numbered<'a> {
    id: u16,
    action: u8,
    rule: &'a NetRule,
}

/// One clause per port range of the rule; no ports listed = every port (0 included).
fn clauses_of(r: &Numbered<'_>) -> Vec<Clause> {
    let ranges = if r.rule.ports.is_empty() { vec![(0, u16::MAX)] } else { r.rule.ports.clone() };
    ranges
        .into_iter()
        .map(|(lo, hi)| Clause {
            port_lo: lo,
            port_hi: hi,
            protocols: r.rule.protocols,
            action: r.action,
            rule_id: r.id,
            expires_at: r.rule.expires_at,
        })
        .collect()
}

/// Compiles the prefixes of one family. `split` picks the family's rules.
fn compile_family<const N: usize>(
    rules: &[Numbered<'_>],
    split: impl Fn(&IpNet) -> Option<([u8; N], u8)>,
    all: &[RuleInfo],
) -> Result<Vec<([u8; N], u8, PrefixClauses)>, CompileError> {
    let mut own: HashMap<([u8; N], u8), Vec<usize>> = HashMap::new();
    for (i, r) in rules.iter().enumerate() {
        if let Some(key) = split(&r.rule.net) {
            own.entry(key).or_default().push(i);
        }
    }
    let lengths: BTreeSet<u8> = own.keys().map(|(_, len)| *len).collect();
    let mut prefixes: Vec<_> = own.keys().copied().collect();
    prefixes.sort();
    let mut out = Vec::with_capacity(prefixes.len());
    for (addr, len) in prefixes {
        let mut covering: Vec<usize> = Vec::new();
        for &l in lengths.range(..=len) {
            if let Some(ids) = own.get(&(mask(addr, l), l)) {
                covering.extend(ids);
            }
        }
        // Deny clauses first: the kernel stops at the first matching deny.
        covering.sort_by_key(|&i| (rules[i].action != action::DENY, rules[i].id));
        let clauses: Vec<Clause> = covering.iter().flat_map(|&i| clauses_of(&rules[i])).collect();
        if clauses.len() > limits::MAX_CLAUSES_PER_PREFIX {
            let names: Vec<&str> = covering.iter().map(|&i| all[rules[i].id as usize - 1].name.as_str()).collect();
            let shown = match <[u8; 4]>::try_from(&addr[..]) {
                Ok(v4) => format!("{}/{len}", std::net::Ipv4Addr::from(v4)),
                Err(_) => {
                    format!("{}/{len}", std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&addr[..]).expect("16 bytes")))
                }
            };
            return Err(CompileError::TooManyClauses {
                prefix: shown,
                count: clauses.len(),
                max: limits::MAX_CLAUSES_PER_PREFIX,
                rules: names.join(", "),
            });
        }
        let mut entry = PrefixClauses::empty();
        entry.count = clauses.len() as u32;
        entry.expiring = clauses.iter().filter(|c| c.expires_at != 0).count() as u32;
        entry.clauses[..clauses.len()].copy_from_slice(&clauses);
        out.push((addr, len, entry));
    }
    Ok(out)
}

fn ports_and_protocols(ports: &[(u16, u16)], protocols: u8) -> String {
    let ports = if ports.is_empty() {
        "all ports".to_string()
    } else {
        let list: Vec<String> =
            ports.iter().map(|&(lo, hi)| if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") }).collect();
        format!("ports {}", list.join(","))
    };
    let protocols = match protocols {
        enforcer_common::proto::TCP => "tcp",
        enforcer_common::proto::UDP => "udp",
        _ => "tcp,udp",
    };
    format!("{ports} {protocols}")
}

fn describe(action: Action, r: &NetRule) -> String {
    format!("{action} {} {}", r.net, ports_and_protocols(&r.ports, r.protocols))
}

fn describe_domain(d: &DomainRule) -> String {
    format!("{} domain {} {}", d.action, d.pattern, ports_and_protocols(&d.ports, d.protocols))
}

/// The rule id of `policy.network.domains[index]`.
pub fn domain_rule_id(index: usize) -> u16 {
    (index + 1) as u16
}

/// The kernel clauses an answer for a domain rule opens an address with, until `expires_at`.
pub fn learned_clauses(rule: &DomainRule, rule_id: u16, expires_at: u64) -> Vec<Clause> {
    let ranges = if rule.ports.is_empty() { vec![(0, u16::MAX)] } else { rule.ports.clone() };
    ranges
        .into_iter()
        .map(|(port_lo, port_hi)| Clause {
            port_lo,
            port_hi,
            protocols: rule.protocols,
            action: action::ALLOW,
            rule_id,
            expires_at,
        })
        .collect()
}

pub fn compile_policy(policy: &Policy) -> Result<CompiledPolicy, CompileError> {
    let net = &policy.network;
    // Domain rules take the first ids (`domain_rule_id`): grants append address rules,
    // and the ids in learned-address entries must not shift under them.
    let first_net_id = net.domains.len() + 1;
    let numbered: Vec<Numbered<'_>> = net
        .allow
        .iter()
        .map(|r| (action::ALLOW, r))
        .chain(net.deny.iter().map(|r| (action::DENY, r)))
        .enumerate()
        .map(|(i, (action, rule))| Numbered { id: (first_net_id + i) as u16, action, rule })
        .collect();
    let rules: Vec<RuleInfo> = net
        .domains
        .iter()
        .map(|d| RuleInfo { name: d.name.clone(), action: d.action, text: describe_domain(d) })
        .chain(numbered.iter().map(|n| {
            let a = if n.action == action::DENY { Action::Deny } else { Action::Allow };
            RuleInfo { name: n.rule.name.clone(), action: a, text: describe(a, n.rule) }
        }))
        .collect();
    let net4 = compile_family::<4>(
        &numbered,
        |n| match n {
            IpNet::V4(n) => Some((n.addr().octets(), n.prefix_len())),
            IpNet::V6(_) => None,
        },
        &rules,
    )?
    .into_iter()
    .map(|(addr, len, clauses)| Prefix4 { addr, len, clauses })
    .collect();
    let net6 = compile_family::<16>(
        &numbered,
        |n| match n {
            IpNet::V6(n) => Some((n.addr().octets(), n.prefix_len())),
            IpNet::V4(_) => None,
        },
        &rules,
    )?
    .into_iter()
    .map(|(addr, len, clauses)| Prefix6 { addr, len, clauses })
    .collect();

    let mut config = PolicyConfig::zeroed();
    config.name[..policy.name.len()].copy_from_slice(policy.name.as_bytes());
    config.in_use = 1;
    config.mode = if policy.mode == Mode::Audit { mode::AUDIT } else { mode::ENFORCE };
    config.network_default = if net.default == Action::Allow { action::ALLOW } else { action::DENY };
    // New-destination alerts need the allowed decisions too; the controller keeps them
    // out of the sinks unless log_allowed asks for them.
    config.log_allowed = (policy.log_allowed || policy.alerts.new_destination) as u8;
    config.allow_raw_sockets = net.raw_sockets as u8;
    config.allow_icmp = net.icmp as u8;
    Ok(CompiledPolicy { name: policy.name.clone(), config, net4, net6, rules, files: None, home: None })
}

/// A model of the kernel's decision, for tests and tooling: longest prefix, clauses
/// expired at `now` (CLOCK_BOOTTIME ns) skipped, deny clauses first, then the first
/// allow, then the default. Returns the action and the deciding rule id (0 = default).
pub fn evaluate(compiled: &CompiledPolicy, addr: IpAddr, port: u16, proto_bit: u8, now: u64) -> (Action, u16) {
    fn longest<'a, const N: usize>(
        entries: impl Iterator<Item = (&'a [u8; N], u8, &'a PrefixClauses)>,
        addr: [u8; N],
    ) -> Option<&'a PrefixClauses> {
        entries.filter(|(a, len, _)| mask(addr, *len) == **a).max_by_key(|(_, len, _)| *len).map(|(_, _, c)| c)
    }
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    let entry = match addr {
        IpAddr::V4(v4) => {
            let a = if v4.is_unspecified() { [127, 0, 0, 1] } else { v4.octets() };
            longest(compiled.net4.iter().map(|p| (&p.addr, p.len, &p.clauses)), a)
        }
        IpAddr::V6(v6) => {
            let a = if v6.is_unspecified() { std::net::Ipv6Addr::LOCALHOST.octets() } else { v6.octets() };
            longest(compiled.net6.iter().map(|p| (&p.addr, p.len, &p.clauses)), a)
        }
    };
    let mut allow = None;
    if let Some(e) = entry {
        for c in &e.clauses[..e.count as usize] {
            if c.expires_at != 0 && c.expires_at <= now {
                continue;
            }
            if c.protocols & proto_bit != 0 && c.port_lo <= port && port <= c.port_hi {
                if c.action == action::DENY {
                    return (Action::Deny, c.rule_id);
                }
                allow.get_or_insert(c.rule_id);
            }
        }
    }
    match allow {
        Some(id) => (Action::Allow, id),
        None if compiled.config.network_default == action::ALLOW => (Action::Allow, 0),
        None => (Action::Deny, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse::parse_policy_str;
    use enforcer_common::proto::{TCP, UDP};

    fn compile(network: &str) -> CompiledPolicy {
        let text =
            format!("apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: t\nspec:\n  network:\n{network}");
        compile_policy(&parse_policy_str(&text, "t.yaml").unwrap()).unwrap()
    }

    fn verdict(c: &CompiledPolicy, addr: &str, port: u16, proto: u8) -> (Action, u16) {
        evaluate(c, addr.parse().unwrap(), port, proto, 0)
    }

    #[test]
    fn deny_wins_over_allow_at_any_prefix_length() {
        let c = compile(
            "    allow:\n      - cidr: 10.0.0.0/8\n      - cidr: 10.1.2.3/32\n    deny:\n      - cidr: 10.1.0.0/16\n        ports: [22]\n",
        );
        assert_eq!(verdict(&c, "10.9.9.9", 22, TCP), (Action::Allow, 1));
        assert_eq!(verdict(&c, "10.1.9.9", 22, TCP), (Action::Deny, 3));
        assert_eq!(verdict(&c, "10.1.2.3", 22, TCP), (Action::Deny, 3), "a longer allow does not beat a covering deny");
        assert_eq!(verdict(&c, "10.1.2.3", 80, TCP), (Action::Allow, 1));
        assert_eq!(verdict(&c, "11.0.0.1", 80, TCP), (Action::Deny, 0));
        assert_eq!(c.net4.len(), 3);
    }

    #[test]
    fn ports_protocols_and_defaults() {
        let c = compile(
            "    default: allow\n    deny:\n      - cidr: 0.0.0.0/0\n        ports: [\"1000-2000\"]\n        protocols: [udp]\n",
        );
        assert_eq!(verdict(&c, "1.2.3.4", 1500, UDP).0, Action::Deny);
        assert_eq!(verdict(&c, "1.2.3.4", 1500, TCP).0, Action::Allow);
        assert_eq!(verdict(&c, "1.2.3.4", 2001, UDP), (Action::Allow, 0));
    }

    #[test]
    fn ipv6_mapped_and_unspecified_addresses() {
        let c = compile(
            "    allow:\n      - cidr: 127.0.0.1/32\n        ports: [80]\n      - ip: ::1\n        ports: [443]\n",
        );
        assert_eq!(verdict(&c, "::ffff:127.0.0.1", 80, TCP).0, Action::Allow);
        assert_eq!(verdict(&c, "::ffff:127.0.0.1", 81, TCP).0, Action::Deny);
        assert_eq!(verdict(&c, "0.0.0.0", 80, TCP).0, Action::Allow, "0.0.0.0 is judged as 127.0.0.1");
        assert_eq!(verdict(&c, "::", 443, TCP).0, Action::Allow, ":: is judged as ::1");
        assert_eq!(verdict(&c, "::1", 80, TCP).0, Action::Deny);
        assert_eq!(c.net6.len(), 1);
    }

    #[test]
    fn expired_clauses_no_longer_apply() {
        let text = "apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: t\nspec:\n  network:\n    deny:\n      - cidr: 10.0.0.0/8\n        ports: [22]\n";
        let mut policy = parse_policy_str(text, "t.yaml").unwrap();
        let mut grant = policy.network.deny[0].clone();
        grant.name = "grant-1".into();
        grant.ports = vec![];
        grant.expires_at = 1_000;
        policy.network.allow.push(grant);
        let c = compile_policy(&policy).unwrap();
        let at = |now| evaluate(&c, "10.1.2.3".parse().unwrap(), 443, TCP, now);
        assert_eq!(at(999), (Action::Allow, 1), "the grant opens the destination until it expires");
        assert_eq!(at(1_000), (Action::Deny, 0), "and closes when it does");
        assert_eq!(evaluate(&c, "10.1.2.3".parse().unwrap(), 22, TCP, 0).0, Action::Deny, "deny rules win over grants");
    }

    #[test]
    fn config_carries_the_settings() {
        let text = "apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: cfg\nspec:\n  mode: audit\n  network:\n    raw_sockets: true\n  audit:\n    log_allowed: true\n";
        let c = compile_policy(&parse_policy_str(text, "t.yaml").unwrap()).unwrap();
        assert_eq!(c.config.name_str(), "cfg");
        assert_eq!((c.config.in_use, c.config.mode, c.config.network_default), (1, mode::AUDIT, action::DENY));
        assert_eq!((c.config.log_allowed, c.config.allow_raw_sockets, c.config.allow_icmp), (1, 1, 0));
    }

    #[test]
    fn too_many_overlapping_clauses_is_an_error_not_a_truncation() {
        let ports: Vec<String> = (1..=40).map(|p| p.to_string()).collect();
        let text = format!(
            "apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: t\nspec:\n  network:\n    allow:\n      - cidr: 10.0.0.0/8\n        ports: [{}]\n",
            ports.join(", ")
        );
        let err = compile_policy(&parse_policy_str(&text, "t.yaml").unwrap()).unwrap_err();
        assert!(err.to_string().contains("40 port/protocol clauses apply to 10.0.0.0/8"), "{err}");
    }

    #[test]
    fn compiles_ten_thousand_rules() {
        let mut network = String::from("    allow:\n      - cidr: 10.0.0.0/8\n        ports: [443]\n");
        for i in 0..10_000u32 {
            network.push_str(&format!(
                "      - ip: 10.{}.{}.{}\n        ports: [80]\n",
                i >> 16,
                (i >> 8) & 0xff,
                i & 0xff
            ));
        }
        let c = compile(&network);
        assert_eq!(c.net4.len(), 10_001);
        assert_eq!(verdict(&c, "10.0.39.15", 80, TCP), (Action::Allow, 9_999 + 2));
        assert_eq!(verdict(&c, "10.0.39.15", 443, TCP), (Action::Allow, 1));
        assert_eq!(verdict(&c, "10.200.0.1", 80, TCP), (Action::Deny, 0));
    }
}
