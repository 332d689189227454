//! Time-limited grants: extra allow rules for one cgroup that lapse in the kernel at
//! their expiry (`Clause::expires_at`), whether or not a controller is running. The
//! grants of each cgroup are kept by `state`, so that `grant`, `revoke` and a re-attach
//! can recompile the cgroup's policy with the grants still live.
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{
    parse::parse_duration,
    policy::{NetRule, Policy, parse_net},
};

/// The longest grant: a grant is a stopgap; a standing need belongs in the policy.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: u32,
    /// What was asked for, as given (`10.0.0.0/8`, `1.2.3.4:443`).
    pub allow: String,
    pub net: IpNet,
    pub ports: Vec<(u16, u16)>,
    /// CLOCK_BOOTTIME ns when the grant lapses.
    pub expires_at: u64,
    /// The same moment as a date, for people.
    pub expires: String,
    pub reason: Option<String>,
    pub granted_by_uid: u32,
}

/// Parses `CIDR`, `IP`, `IP:PORT` or `[IPv6]:PORT`. File grants (`PATH[:ACCESS]`)
/// arrive with file-access rules.
pub fn parse_allow(spec: &str) -> Result<(IpNet, Vec<(u16, u16)>), String> {
    if spec.starts_with('/') || spec.starts_with('~') {
        return Err(format!("{spec:?}: file grants are not supported yet: they arrive with file-access rules"));
    }
    if let Ok(sa) = spec.parse::<std::net::SocketAddr>() {
        if sa.port() == 0 {
            return Err(format!("{spec:?}: port 0 is not a port"));
        }
        return Ok((parse_net(&sa.ip().to_string())?, vec![(sa.port(), sa.port())]));
    }
    parse_net(spec).map(|net| (net, Vec::new())).map_err(|e| format!("{e} (expected CIDR, IP or IP:PORT)"))
}

/// `90`, `90s`, `10m`, `2h` (a bare number is seconds).
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let with_unit = if text.bytes().all(|b| b.is_ascii_digit()) { format!("{text}s") } else { text.to_string() };
    let ttl = parse_duration(&with_unit, "TTL")?;
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(format!("TTL {text:?} must be between 1s and {}h", MAX_TTL.as_secs() / 3600));
    }
    Ok(ttl)
}

/// The policy with the grants added as expiring allow rules.
pub fn apply(base: &Policy, grants: &[Grant]) -> Policy {
    let mut policy = base.clone();
    policy.network.allow.extend(grants.iter().map(|g| NetRule {
        name: format!("grant-{}", g.id),
        net: g.net,
        ports: g.ports.clone(),
        protocols: enforcer_common::proto::ANY,
        expires_at: g.expires_at,
    }));
    policy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grant_targets_and_ttls() {
        assert_eq!(parse_allow("10.0.0.0/8").unwrap().1, vec![]);
        assert_eq!(
            parse_allow("127.0.0.1:8080").unwrap(),
            ("127.0.0.1/32".parse::<IpNet>().unwrap(), vec![(8080, 8080)])
        );
        assert_eq!(parse_allow("[::1]:443").unwrap().0.to_string(), "::1/128");
        assert!(parse_allow("~/.ssh:read").unwrap_err().contains("file grants are not supported yet"));
        assert!(parse_allow("10.0.0.1/8").unwrap_err().contains("did you mean 10.0.0.0/8"));
        assert_eq!(parse_ttl("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert!(parse_ttl("0s").is_err() && parse_ttl("25h").is_err() && parse_ttl("5d").is_err());
    }
}
