//! The DNS proxy. The kernel redirects a confined cgroup's port-53 traffic (UDP and TCP)
//! to one loopback proxy per cgroup. The proxy answers only names the policy's `domain:`
//! rules allow, forwards those to the upstream resolvers, and has its owner open the
//! answer's addresses in the kernel (`Opener::open`) before the agent sees the answer, so
//! an agent's connect can never race its own lookup. Every packet is untrusted: anything
//! malformed gets FORMERR or is dropped, and every doubt ends in REFUSED or SERVFAIL.
mod packet;
mod proxy;
pub mod service;
#[cfg(test)]
mod tests;
mod upstream;

use std::{net::IpAddr, time::Duration};

use crate::model::policy::{Action, DnsSettings, DomainPattern};

pub use packet::is_private_address;
pub use proxy::Proxy;
pub use upstream::resolv_conf_servers;
use {packet::*, upstream::*};

/// A DNS header; a shorter packet has no ID to answer to.
const HEADER_LEN: usize = 12;
/// Largest UDP query taken: EDNS buffers above 4096 are not used (RFC 6891 §6.2.5).
pub const MAX_UDP_QUERY: usize = 4096;
/// TCP's 16-bit length prefix is the limit.
pub const MAX_TCP_QUERY: usize = 65535;
/// How long one upstream server gets to answer before the next is asked.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// CNAME hops followed; resolvers give up at about this depth too.
const MAX_CNAME_HOPS: usize = 16;
/// UDP queries in flight per proxy; beyond it datagrams wait in the socket buffer.
const MAX_UDP_IN_FLIGHT: usize = 512;
/// TCP connections per proxy; more are closed at once so idle ones cannot pile up.
const MAX_TCP_CONNECTIONS: usize = 64;
/// A TCP connection with no complete query for this long is closed (RFC 7766 §6.2.3).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The UDP answer limit for a query without EDNS (RFC 1035 §4.2.1).
const CLASSIC_UDP_PAYLOAD: usize = 512;
/// glibc's resolver reads only the first three `nameserver` lines (MAXNS).
const RESOLV_CONF_MAX_SERVERS: usize = 3;
/// Room for any UDP datagram, so an oversize one is seen (and dropped) whole.
const MAX_DATAGRAM: usize = 65536;
/// Random IDs drawn for one upstream query before giving up: with at most a few hundred
/// queries pending on a socket out of 65,536 IDs, a second draw is already rare.
const MAX_ID_DRAWS: usize = 32;
/// The upstream UDP sockets: see `UpstreamPool`.
const UPSTREAM_SOCKETS: PoolLimits = PoolLimits {
    // Enough that one socket's receive queue is not the bottleneck at full load.
    sockets: 4,
    // A source port is retired after this many queries or this long, whichever comes
    // first; at full load that is every few tenths of a second.
    queries_per_socket: 2_000,
    lifetime: Duration::from_secs(30),
};

/// A `domain:` rule as the proxy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainMatch {
    /// The rule's id in events and in the kernel's learned-address entries.
    pub rule_id: u16,
    pub rule_name: String,
    pub action: Action,
    pub pattern: DomainPattern,
}

/// What one proxy enforces: its policy's domain rules, in policy order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyRules {
    /// The policy's name, for events.
    pub policy: String,
    pub domains: Vec<DomainMatch>,
    /// `upstream` is already filled in (never empty): see `resolv_conf_servers`.
    pub settings: DnsSettings,
    /// Audit mode: what the policy would refuse is answered all the same and recorded
    /// as `AuditRefused` (its addresses are not opened: the kernel only reports them).
    pub audit: bool,
}

/// The proxy's owner: it opens answers' addresses in the kernel and reports outcomes.
pub trait Opener: Send + Sync + 'static {
    /// Called before an allowed answer is sent. `ips`: the final A/AAAA addresses of the
    /// CNAME chain with the clamped TTL. Err = the kernel could not take them: the proxy
    /// replies SERVFAIL instead of the answer.
    fn open(&self, rule_id: u16, ips: &[(IpAddr, Duration)]) -> Result<(), String>;
    /// Every query's outcome (allowed and refused), for events and metrics.
    fn record(&self, decision: DnsDecision);
}

/// One query's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsDecision {
    /// The question's name, lower case, without the trailing dot; bytes outside
    /// `[a-z0-9-_]` written as `\DDD`. Empty when the packet had no readable question.
    pub name: String,
    /// "A", "AAAA", "TXT", ... ("TYPE65280" for types without a name); empty when unread.
    pub qtype: String,
    pub verdict: DnsVerdict,
    /// Why, in one word: "allowed", "truncated", "not-allowed", "denied-by-rule",
    /// "name-too-long", "label-too-long", "rate-limited", "private-answer",
    /// "open-failed", "upstream-failed", "cname-loop", "cname-too-long", "malformed",
    /// "bad-opcode", "bad-class", "qtype-refused".
    pub reason: &'static str,
    /// The rule that decided; 0 = none.
    pub rule_id: u16,
    pub rule_name: Option<String>,
    /// The final addresses of the answer (also when they were refused as private).
    pub resolved: Vec<IpAddr>,
    /// "udp" or "tcp".
    pub transport: &'static str,
    pub upstream_latency: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsVerdict {
    Allowed,
    Refused,
    /// Audit mode: the policy would have refused it; it was answered.
    AuditRefused,
    /// Upstream failure, or an answer the proxy could not pass on: the agent got SERVFAIL.
    Failed,
}

impl DnsVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Refused => "refused",
            Self::AuditRefused => "audit-refused",
            Self::Failed => "failed",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}
