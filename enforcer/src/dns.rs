//! The DNS proxy. The kernel redirects a confined cgroup's port-53 traffic (UDP and TCP)
//! to one loopback proxy per cgroup. The proxy answers only names the policy's `domain:`
//! rules allow, forwards those to the upstream resolvers, and has its owner open the
//! answer's addresses in the kernel (`Opener::open`) before the agent sees the answer, so
//! an agent's connect can never race its own lookup. Every packet is untrusted: anything
//! malformed gets FORMERR or is dropped, and every doubt ends in REFUSED or SERVFAIL.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    panic::{self, AssertUnwindSafe},
    sync::{
        Arc, Mutex, MutexGuard, RwLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Header, Message, MessageType, Query, ResponseCode},
    rr::{DNSClass, Name, RData, RecordType},
    serialize::binary::{BinDecodable as _, BinDecoder},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{OwnedSemaphorePermit, Semaphore, oneshot},
    task::{AbortHandle, JoinSet},
};
use tracing::{debug, warn};

use crate::metrics;
use crate::policy::{Action, DnsSettings, DomainPattern};

#[cfg(test)]
mod tests;

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

/// The per-proxy query budget: `rate` per second, bursts up to twice that.
#[derive(Debug)]
struct TokenBucket {
    qps: u32,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(qps: u32) -> Self {
        Self { qps, tokens: 2.0 * f64::from(qps), last: Instant::now() }
    }

    fn take(&mut self, now: Instant) -> bool {
        if self.qps == 0 {
            return true;
        }
        let rate = f64::from(self.qps);
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * rate;
        self.tokens = (self.tokens + refill).min(2.0 * rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One confined cgroup's DNS proxy.
pub struct Proxy {
    active: RwLock<Arc<Active>>,
    opener: Arc<dyn Opener>,
    bucket: Mutex<TokenBucket>,
    /// Per upstream server and attempt.
    timeout: Duration,
    limits: PoolLimits,
}

/// The rules in force and the UDP sockets to their upstream servers, swapped together.
struct Active {
    rules: Arc<ProxyRules>,
    /// One per `rules.settings.upstream` entry, in the same order.
    pools: Vec<Arc<UpstreamPool>>,
}

impl Active {
    /// Keeps the pools of servers that stay, so a reload does not churn sockets; queries
    /// in flight hold on to the pools they started with.
    fn new(rules: ProxyRules, limits: PoolLimits, previous: Option<&Active>) -> Self {
        let pools = rules
            .settings
            .upstream
            .iter()
            .map(|&server| {
                previous
                    .and_then(|p| p.pools.iter().find(|pool| pool.server == server))
                    .map_or_else(|| Arc::new(UpstreamPool::new(server, limits)), Arc::clone)
            })
            .collect();
        Self { rules: Arc::new(rules), pools }
    }
}

/// A reply and the decision it carries out.
type Outcome = (Vec<u8>, DnsDecision);

impl Proxy {
    pub fn new(rules: ProxyRules, opener: Arc<dyn Opener>) -> Arc<Self> {
        Self::with_timeout(rules, opener, UPSTREAM_TIMEOUT)
    }

    /// As `new`, with another upstream timeout (tests use a short one).
    pub fn with_timeout(rules: ProxyRules, opener: Arc<dyn Opener>, timeout: Duration) -> Arc<Self> {
        Self::with_limits(rules, opener, timeout, UPSTREAM_SOCKETS)
    }

    /// As `with_timeout`, with other upstream socket limits (tests retire sockets early).
    fn with_limits(rules: ProxyRules, opener: Arc<dyn Opener>, timeout: Duration, limits: PoolLimits) -> Arc<Self> {
        let bucket = Mutex::new(TokenBucket::new(rules.settings.queries_per_second));
        let active = RwLock::new(Arc::new(Active::new(rules, limits, None)));
        Arc::new(Self { active, opener, bucket, timeout, limits })
    }

    /// Policy reload: queries that arrive from now on use `rules`; queries in flight
    /// finish under the rules they started with.
    pub fn replace_rules(&self, rules: ProxyRules) {
        let qps = rules.settings.queries_per_second;
        {
            let mut active = self.active.write().unwrap_or_else(|e| e.into_inner());
            *active = Arc::new(Active::new(rules, self.limits, Some(&active)));
        }
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        if bucket.qps != qps {
            *bucket = TokenBucket::new(qps);
        }
    }

    /// The rules in force.
    pub fn rules(&self) -> Arc<ProxyRules> {
        Arc::clone(&self.active().rules)
    }

    fn active(&self) -> Arc<Active> {
        Arc::clone(&self.active.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The whole packet path for one query: returns the bytes to send back, or None to
    /// drop silently.
    pub async fn handle(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let active = self.active();
        let Some((reply, decision)) = self.answer(&active, query, transport).await else {
            metrics::DNS_DROPPED.inc();
            return None;
        };
        metrics::DNS_QUERIES.with_label_values(&[decision.verdict.as_str(), decision.reason]).inc();
        self.opener.record(decision);
        Some(reply)
    }

    async fn answer(&self, active: &Active, packet: &[u8], transport: Transport) -> Option<Outcome> {
        let rules = &*active.rules;
        let limit = match transport {
            Transport::Udp => MAX_UDP_QUERY,
            Transport::Tcp => MAX_TCP_QUERY,
        };
        if packet.len() < HEADER_LEN || packet.len() > limit {
            return None;
        }
        // Never answer a response: two responders answering each other's errors loop.
        if packet[2] & 0x80 != 0 {
            return None;
        }
        let mut d = DnsDecision {
            name: String::new(),
            qtype: String::new(),
            verdict: DnsVerdict::Refused,
            reason: "malformed",
            rule_id: 0,
            rule_name: None,
            resolved: Vec::new(),
            transport: transport.as_str(),
            upstream_latency: None,
        };
        if (packet[2] >> 3) & 0x0f != 0 {
            return Some((header_reply(packet, ResponseCode::Refused), refused(d, "bad-opcode")));
        }
        let Some((request, request_len)) = parse_prefix(packet) else {
            return Some((header_reply(packet, ResponseCode::FormErr), d));
        };
        // Only the question travels upstream: records in a query's other sections
        // would be a channel to the upstream that no rule looked at.
        let [question] = request.queries() else {
            return Some((header_reply(packet, ResponseCode::FormErr), d));
        };
        if !request.answers().is_empty()
            || !request.name_servers().is_empty()
            || !request.additionals().is_empty()
            || !request.signature().is_empty()
        {
            return Some((header_reply(packet, ResponseCode::FormErr), d));
        }
        let labels: Vec<&[u8]> = question.name().iter().collect();
        d.name = display_name(&labels);
        d.qtype = qtype_name(question.query_type());
        if question.query_class() != DNSClass::IN {
            return Some((header_reply(packet, ResponseCode::FormErr), refused(d, "bad-class")));
        }

        let settings = &rules.settings;
        let refuse =
            |d: DnsDecision, reason| Some((reply_to(&request, ResponseCode::Refused, packet), refused(d, reason)));
        // What the policy refuses; in audit mode it is noted and the query goes on.
        let mut audited: Option<&'static str> = None;
        macro_rules! policy_refuses {
            ($reason:expr) => {
                if rules.audit {
                    audited.get_or_insert($reason);
                } else {
                    return refuse(d, $reason);
                }
            };
        }
        let text_len = labels.iter().map(|l| l.len()).sum::<usize>() + labels.len().saturating_sub(1);
        if text_len > settings.max_name_length {
            policy_refuses!("name-too-long");
        }
        if labels.iter().any(|l| l.len() > settings.max_label_length) {
            policy_refuses!("label-too-long");
        }
        if !self.bucket.lock().unwrap_or_else(|e| e.into_inner()).take(Instant::now()) {
            policy_refuses!("rate-limited");
        }
        // Zone transfers span several TCP messages and have no use in an agent.
        if matches!(question.query_type(), RecordType::AXFR | RecordType::IXFR | RecordType::OPT) {
            return refuse(d, "qtype-refused");
        }
        let key = match_key(&labels);
        let matching = |action| {
            key.as_deref().and_then(|k| rules.domains.iter().find(|r| r.action == action && r.pattern.matches(k)))
        };
        // The rule whose answers open addresses: none for a name the policy refuses.
        let mut open_for = 0;
        if let Some(deny) = matching(Action::Deny) {
            d.rule_id = deny.rule_id;
            d.rule_name = Some(deny.rule_name.clone());
            policy_refuses!("denied-by-rule");
        } else if let Some(rule) = matching(Action::Allow) {
            d.rule_id = rule.rule_id;
            d.rule_name = Some(rule.rule_name.clone());
            open_for = rule.rule_id;
        } else {
            policy_refuses!("not-allowed");
        }
        if audited.is_some() {
            open_for = 0;
        }

        let (reply, latency) = match self.forward(&active.pools, &packet[..request_len], question, transport).await {
            Ok(r) => r,
            Err(e) => {
                debug!(name = %d.name, error = %e, "dns upstream failed");
                return Some((reply_to(&request, ResponseCode::ServFail, packet), failed(d, "upstream-failed")));
            }
        };
        metrics::DNS_UPSTREAM_SECONDS.observe(latency.as_secs_f64());
        d.upstream_latency = Some(latency);
        let (bytes, mut d) = self.pass_on(settings, rules.audit, &request, packet, open_for, reply, transport, d);
        if let (Some(reason), DnsVerdict::Allowed) = (audited, d.verdict) {
            d.verdict = DnsVerdict::AuditRefused;
            d.reason = reason;
        }
        Some((bytes, d))
    }

    /// Asks each upstream in turn; returns the first reply that answers our question.
    async fn forward(
        &self,
        pools: &[Arc<UpstreamPool>],
        query: &[u8],
        question: &Query,
        transport: Transport,
    ) -> io::Result<(Message, Duration)> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no upstream server configured");
        for pool in pools {
            let server = pool.server;
            let started = Instant::now();
            // A fresh random ID per attempt, so a spoofer cannot guess the reply it would
            // have to forge; over UDP the pool also rotates the source port.
            let result = match transport {
                Transport::Udp => pool.exchange(query, question, self.timeout).await,
                Transport::Tcp => exchange_tcp(server, query, question, self.timeout).await,
            };
            match result {
                Ok(reply) => return Ok((reply, started.elapsed())),
                Err(e) => {
                    debug!(upstream = %server, error = %e, "dns upstream did not answer");
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Turns the upstream's reply into the agent's: follows the CNAME chain, clamps
    /// TTLs, refuses private answers, opens the final addresses, and only then returns
    /// the bytes to send.
    #[allow(clippy::too_many_arguments)]
    fn pass_on(
        &self,
        settings: &DnsSettings,
        audit: bool,
        request: &Message,
        packet: &[u8],
        rule_id: u16,
        mut reply: Message,
        transport: Transport,
        mut d: DnsDecision,
    ) -> Outcome {
        let servfail = |d, reason| (reply_to(request, ResponseCode::ServFail, packet), failed(d, reason));
        if reply.truncated() {
            // A truncated answer is incomplete: open nothing and let the client retry
            // over TCP, which is redirected here too.
            return (truncated_reply(request, &reply, packet), allowed(d, "truncated"));
        }
        if !matches!(reply.response_code(), ResponseCode::NoError | ResponseCode::NXDomain) {
            return servfail(d, "upstream-failed");
        }
        let Some(question) = request.queries().first() else { return servfail(d, "upstream-failed") };
        let chain = match follow_cnames(question.name(), reply.answers()) {
            Ok(chain) => chain,
            Err(reason) => return servfail(d, reason),
        };
        let (min_ttl, max_ttl) = (settings.min_ttl_secs, settings.max_ttl_secs);
        let mut ips: BTreeMap<IpAddr, u32> = BTreeMap::new();
        for record in reply.answers() {
            let ip = match record.data() {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => continue,
            };
            if chain.finals.contains(&name_key(record.name())) {
                // max() then min(): if a policy ever had min > max, the shorter wins.
                let ttl = record.ttl().max(min_ttl).min(max_ttl);
                let held = ips.entry(ip).or_insert(ttl);
                *held = (*held).max(ttl);
            }
        }
        d.resolved = ips.keys().copied().collect();
        let mut private = false;
        if !settings.allow_private_answers && ips.keys().any(|ip| is_private_address(*ip)) {
            if !audit {
                return (reply_to(request, ResponseCode::Refused, packet), refused(d, "private-answer"));
            }
            private = true;
        }
        // Records off the chain were not opened; an agent that used them would only hit
        // the kernel's default deny, so they go.
        reply.answers_mut().retain(|r| chain.names.contains(&name_key(r.name())));
        // The agent must not cache an address longer than the kernel keeps it open.
        let lower = |records: &mut Vec<hickory_proto::rr::Record>| {
            for record in records.iter_mut().filter(|r| r.ttl() > max_ttl) {
                record.set_ttl(max_ttl);
            }
        };
        lower(reply.answers_mut());
        lower(reply.name_servers_mut());
        lower(reply.additionals_mut());
        reply.set_id(request.id());
        let Some(bytes) = serialize(&reply) else { return servfail(d, "upstream-failed") };
        if transport == Transport::Udp && bytes.len() > udp_payload_limit(request) {
            return (truncated_reply(request, &reply, packet), allowed(d, "truncated"));
        }
        let ips: Vec<(IpAddr, Duration)> =
            ips.into_iter().map(|(ip, ttl)| (ip, Duration::from_secs(u64::from(ttl)))).collect();
        if private {
            // Audit mode: answered, not opened, and reported as what enforce would do.
            let mut d = allowed(d, "private-answer");
            d.verdict = DnsVerdict::AuditRefused;
            return (bytes, d);
        }
        if !ips.is_empty() && rule_id != 0 {
            if let Err(e) = self.opener.open(rule_id, &ips) {
                warn!(name = %d.name, error = %e, "dns answer not passed on: its addresses could not be opened");
                return servfail(d, "open-failed");
            }
        }
        (bytes, allowed(d, "allowed"))
    }

    /// Serves queries on these sockets until the future is dropped.
    pub async fn serve(self: Arc<Self>, udp: Vec<UdpSocket>, tcp: Vec<TcpListener>) {
        // Dropping the set aborts every loop, and each loop's own set its queries.
        let mut loops = JoinSet::new();
        for socket in udp {
            loops.spawn(Arc::clone(&self).serve_udp(socket));
        }
        for listener in tcp {
            loops.spawn(Arc::clone(&self).serve_tcp(listener));
        }
        while let Some(result) = loops.join_next().await {
            if let Err(e) = result {
                warn!(error = %e, "dns proxy loop ended");
            }
        }
    }

    async fn serve_udp(self: Arc<Self>, socket: UdpSocket) {
        let socket = Arc::new(socket);
        let slots = Arc::new(Semaphore::new(MAX_UDP_IN_FLIGHT));
        let mut queries = JoinSet::new();
        // Room for any datagram, so an oversize one is seen (and dropped) whole.
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            while queries.try_join_next().is_some() {}
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
            let (n, peer) = match socket.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    debug!(error = %e, "dns udp receive failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let packet = buf[..n].to_vec();
            let (proxy, socket) = (Arc::clone(&self), Arc::clone(&socket));
            queries.spawn(async move {
                let _permit = permit;
                if let Some(reply) = proxy.handle(&packet, Transport::Udp).await {
                    if let Err(e) = socket.send_to(&reply, peer).await {
                        debug!(error = %e, "dns udp reply not sent");
                    }
                }
            });
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
        let mut connections = JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!(error = %e, "dns tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                metrics::DNS_DROPPED.inc();
                continue;
            };
            connections.spawn(Arc::clone(&self).serve_connection(stream, permit));
        }
    }

    /// Queries on one connection are answered in order; the connection closes on idle,
    /// on a query that gets no answer, or on any error.
    async fn serve_connection(self: Arc<Self>, mut stream: TcpStream, _permit: OwnedSemaphorePermit) {
        loop {
            let mut len = [0u8; 2];
            if !matches!(tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await, Ok(Ok(_))) {
                return;
            }
            let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if !matches!(tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await, Ok(Ok(_))) {
                return;
            }
            let Some(reply) = self.handle(&query, Transport::Tcp).await else { return };
            let Ok(reply_len) = u16::try_from(reply.len()) else { return };
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&reply_len.to_be_bytes());
            framed.extend_from_slice(&reply);
            if stream.write_all(&framed).await.is_err() {
                return;
            }
        }
    }
}

fn refused(mut d: DnsDecision, reason: &'static str) -> DnsDecision {
    d.verdict = DnsVerdict::Refused;
    d.reason = reason;
    d
}

fn failed(mut d: DnsDecision, reason: &'static str) -> DnsDecision {
    d.verdict = DnsVerdict::Failed;
    d.reason = reason;
    d
}

fn allowed(mut d: DnsDecision, reason: &'static str) -> DnsDecision {
    d.verdict = DnsVerdict::Allowed;
    d.reason = reason;
    d
}

/// Parses a message and says how many bytes it used (trailing bytes are not forwarded).
/// The parser is a dependency fed hostile bytes: a panic in it must not take the proxy.
fn parse_prefix(packet: &[u8]) -> Option<(Message, usize)> {
    panic::catch_unwind(|| {
        let mut decoder = BinDecoder::new(packet);
        let message = Message::read(&mut decoder).ok()?;
        Some((message, decoder.index()))
    })
    .ok()
    .flatten()
}

fn serialize(message: &Message) -> Option<Vec<u8>> {
    panic::catch_unwind(AssertUnwindSafe(|| message.to_vec().ok())).ok().flatten().filter(|b| b.len() <= MAX_TCP_QUERY)
}

/// A bare header answering `packet`: for queries whose question cannot be trusted.
fn header_reply(packet: &[u8], rcode: ResponseCode) -> Vec<u8> {
    let mut reply = vec![0u8; HEADER_LEN];
    reply[..2].copy_from_slice(&packet[..2]);
    // QR set; opcode and RD copied.
    reply[2] = 0x80 | (packet[2] & 0x79);
    // RA set; CD copied (RFC 6840 §5.9).
    reply[3] = 0x80 | (packet[3] & 0x10) | (u16::from(rcode) as u8 & 0x0f);
    reply
}

/// REFUSED or SERVFAIL carrying the question back.
fn reply_to(request: &Message, rcode: ResponseCode, packet: &[u8]) -> Vec<u8> {
    let mut header = Header::response_from_request(request.header());
    header.set_recursion_available(true).set_response_code(rcode);
    let mut reply = Message::new();
    reply.set_header(header);
    reply.add_queries(request.queries().iter().cloned());
    serialize(&reply).unwrap_or_else(|| header_reply(packet, rcode))
}

/// The question and TC=1, nothing else: the client retries over TCP.
fn truncated_reply(request: &Message, upstream: &Message, packet: &[u8]) -> Vec<u8> {
    let mut header = Header::response_from_request(request.header());
    header
        .set_truncated(true)
        .set_recursion_available(upstream.recursion_available())
        .set_response_code(upstream.response_code());
    let mut reply = Message::new();
    reply.set_header(header);
    reply.add_queries(request.queries().iter().cloned());
    serialize(&reply).unwrap_or_else(|| header_reply(packet, ResponseCode::ServFail))
}

/// What the client said it can take over UDP.
fn udp_payload_limit(request: &Message) -> usize {
    match request.extensions() {
        Some(edns) => usize::from(edns.max_payload()).clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_QUERY),
        None => CLASSIC_UDP_PAYLOAD,
    }
}

/// A name compared as DNS compares it: labels, ASCII case-folded, length-prefixed so
/// that a label holding a '.' byte cannot pass for two labels.
fn name_key(name: &Name) -> Vec<u8> {
    let mut key = Vec::with_capacity(64);
    for label in name.iter() {
        key.push(label.len() as u8);
        key.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    key
}

/// The text `DomainPattern::matches` takes, or None when a label holds a byte no
/// pattern can (a '.' inside a label would otherwise match as a label boundary).
fn match_key(labels: &[&[u8]]) -> Option<String> {
    let mut key = String::new();
    for (i, label) in labels.iter().enumerate() {
        if !label.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_') {
            return None;
        }
        if i > 0 {
            key.push('.');
        }
        key.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
    }
    Some(key)
}

/// The name for events: lower case, unusual bytes escaped so logs stay one line.
fn display_name(labels: &[&[u8]]) -> String {
    let mut text = String::new();
    for (i, label) in labels.iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        for &b in *label {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                text.push(char::from(b.to_ascii_lowercase()));
            } else {
                text.push_str(&format!("\\{b:03}"));
            }
        }
    }
    text
}

fn qtype_name(qtype: RecordType) -> String {
    match qtype {
        RecordType::Unknown(code) => format!("TYPE{code}"),
        other => other.to_string(),
    }
}

/// The names on a CNAME chain, and the ones it ends at.
#[derive(Debug)]
struct Chain {
    names: HashSet<Vec<u8>>,
    finals: HashSet<Vec<u8>>,
}

/// Follows CNAMEs from `start` through `answers`. Several CNAMEs for one owner (not
/// valid DNS, but possible) fork the chain; every branch ends within the hop limit.
fn follow_cnames(start: &Name, answers: &[hickory_proto::rr::Record]) -> Result<Chain, &'static str> {
    let mut aliases: HashMap<Vec<u8>, Vec<Vec<u8>>> = HashMap::new();
    for record in answers {
        if let RData::CNAME(target) = record.data() {
            aliases.entry(name_key(record.name())).or_default().push(name_key(&target.0));
        }
    }
    let start = name_key(start);
    let mut chain = Chain { names: HashSet::from([start.clone()]), finals: HashSet::new() };
    let mut frontier = vec![start];
    for _ in 0..=MAX_CNAME_HOPS {
        let mut next = Vec::new();
        for name in frontier {
            match aliases.get(&name) {
                None => {
                    chain.finals.insert(name);
                }
                Some(targets) => {
                    for target in targets {
                        if !chain.names.insert(target.clone()) {
                            return Err("cname-loop");
                        }
                        next.push(target.clone());
                    }
                }
            }
        }
        if next.is_empty() {
            return Ok(chain);
        }
        frontier = next;
    }
    Err("cname-too-long")
}

/// Addresses an allowed public name must not resolve to unless the policy says so:
/// they would turn a domain rule into a door to the host's own networks.
pub fn is_private_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            v6.is_unspecified()
                || v6.is_loopback()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated, still routed locally)
                || (s[0] & 0xff00) == 0xff00 // multicast
                || embedded_v4(v6).is_some_and(is_private_v4)
        }
    }
}

fn is_private_v4(v4: Ipv4Addr) -> bool {
    let [a, b, ..] = v4.octets();
    v4.is_private()
        || v4.is_loopback()
        || v4.is_link_local()
        || v4.is_broadcast()
        || v4.is_multicast()
        || a == 0 // "this network"
        || a >= 240 // reserved
        || (a == 100 && (b & 0xc0) == 64) // CGNAT 100.64.0.0/10
}

/// The IPv4 address inside IPv4-mapped, IPv4-compatible, NAT64 and 6to4 addresses: the
/// kernel or a gateway may deliver to it.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let o = v6.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if let Some(mapped) = v6.to_ipv4_mapped() {
        Some(mapped)
    } else if s[..6] == [0; 6] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        Some(tail)
    } else if s[0] == 0x2002 {
        Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
    } else {
        None
    }
}

/// A reply is ours only if it comes with our random ID and repeats our question.
fn matching_reply(bytes: &[u8], id: u16, question: &Query) -> Option<Message> {
    let (reply, _) = parse_prefix(bytes)?;
    answers(&reply, id, question).then_some(reply)
}

fn answers(reply: &Message, id: u16, question: &Query) -> bool {
    reply.id() == id
        && reply.message_type() == MessageType::Response
        && matches!(reply.queries(), [q] if q.query_type() == question.query_type()
            && q.query_class() == question.query_class()
            && name_key(q.name()) == name_key(question.name()))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many long-lived UDP sockets an upstream server gets and when one is retired.
#[derive(Clone, Copy, Debug)]
struct PoolLimits {
    sockets: usize,
    queries_per_socket: u32,
    lifetime: Duration,
}

/// The UDP sockets to one upstream server. A socket per query cost socket, bind, connect,
/// close, two epoll_ctl calls and a 64 KiB buffer each; these sockets are connected once
/// and shared, and one reader task per socket hands each reply to the query waiting on
/// its ID.
///
/// Spoofing: a forged reply must hit the socket's source port and a pending random ID,
/// and repeat the question. A socket per query drew a fresh port every time; a shared
/// socket keeps its port, so a spoofer who learns it (by a side channel such as SAD
/// DNS's ICMP probing) would get many queries to aim at. Each socket therefore carries
/// at most `queries_per_socket` queries and lives at most `lifetime`, then a fresh
/// socket (a fresh random port from the kernel) takes its place; queries still waiting
/// on the old one finish there. IDs stay random per query (getrandom), never sequential.
struct UpstreamPool {
    server: SocketAddr,
    limits: PoolLimits,
    state: Mutex<PoolState>,
}

struct PoolState {
    /// Taken in turn; None until first used or after a failed open.
    sockets: Vec<Option<Arc<PooledSocket>>>,
    next: usize,
}

impl UpstreamPool {
    fn new(server: SocketAddr, limits: PoolLimits) -> Self {
        let sockets = (0..limits.sockets.max(1)).map(|_| None).collect();
        Self { server, limits, state: Mutex::new(PoolState { sockets, next: 0 }) }
    }

    /// The next socket in turn, replaced first if it is used up, too old, or its reader
    /// has stopped.
    fn socket(&self) -> io::Result<Arc<PooledSocket>> {
        let mut state = lock(&self.state);
        let i = state.next;
        state.next = (i + 1) % state.sockets.len();
        let slot = &mut state.sockets[i];
        let socket = match slot {
            Some(s) if s.usable(&self.limits) => Arc::clone(s),
            _ => {
                // Opened before the old one is let go, so the port differs from it; the
                // old one stays open for the queries still waiting on it.
                let fresh = PooledSocket::open(self.server)?;
                *slot = Some(Arc::clone(&fresh));
                fresh
            }
        };
        socket.carried.fetch_add(1, Ordering::Relaxed);
        Ok(socket)
    }

    /// One query over UDP: `query` is sent with a fresh ID, and the answer is the first
    /// reply with that ID that repeats `question`.
    async fn exchange(&self, query: &[u8], question: &Query, timeout: Duration) -> io::Result<Message> {
        let socket = self.socket()?;
        let (waiting, reply) = socket.wait_for(question)?;
        let mut bytes = query.to_vec();
        bytes[..2].copy_from_slice(&waiting.id.to_be_bytes());
        socket.shared.socket.send(&bytes).await?;
        // `waiting` is dropped on every way out, the future's own cancellation included,
        // and takes the entry with it: a late reply then finds no one and is dropped.
        match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "upstream socket failed")),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no matching reply in time")),
        }
    }
}

/// A connected UDP socket and its reader; the pool and each query using it hold one.
/// When the last holder lets go, the reader stops and the socket closes.
struct PooledSocket {
    shared: Arc<SocketShared>,
    reader: AbortHandle,
    born: Instant,
    /// Queries sent on it, for retirement.
    carried: AtomicU32,
}

/// What the reader task needs too.
struct SocketShared {
    socket: UdpSocket,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    waiters: HashMap<u16, Waiter>,
    /// Tells a waiter's own entry from a later one under the same ID.
    next_ticket: u64,
    /// The reader stopped: nothing will be delivered on this socket any more.
    closed: bool,
}

struct Waiter {
    ticket: u64,
    question: Query,
    reply: oneshot::Sender<Message>,
}

/// A query's entry in `Pending`; removed when this is dropped, unless a later query
/// already holds the ID again.
struct Waiting<'a> {
    shared: &'a SocketShared,
    id: u16,
    ticket: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut pending = lock(&self.shared.pending);
        if pending.waiters.get(&self.id).is_some_and(|w| w.ticket == self.ticket) {
            pending.waiters.remove(&self.id);
        }
    }
}

impl PooledSocket {
    fn open(server: SocketAddr) -> io::Result<Arc<Self>> {
        let local: SocketAddr = match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = std::net::UdpSocket::bind(local)?;
        // Connected: the kernel hands us only datagrams from the server's address and port.
        socket.connect(server)?;
        socket.set_nonblocking(true)?;
        let shared = Arc::new(SocketShared { socket: UdpSocket::from_std(socket)?, pending: Mutex::default() });
        let reader = tokio::spawn(read_replies(Arc::clone(&shared))).abort_handle();
        Ok(Arc::new(Self { shared, reader, born: Instant::now(), carried: AtomicU32::new(0) }))
    }

    fn usable(&self, limits: &PoolLimits) -> bool {
        self.carried.load(Ordering::Relaxed) < limits.queries_per_socket
            && self.born.elapsed() < limits.lifetime
            && !lock(&self.shared.pending).closed
    }

    /// Takes a random ID no query on this socket is waiting on.
    fn wait_for(&self, question: &Query) -> io::Result<(Waiting<'_>, oneshot::Receiver<Message>)> {
        for _ in 0..MAX_ID_DRAWS {
            let id = random_id()?;
            let mut pending = lock(&self.shared.pending);
            if pending.closed {
                return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "upstream socket failed"));
            }
            if pending.waiters.contains_key(&id) {
                continue;
            }
            let ticket = pending.next_ticket;
            pending.next_ticket += 1;
            let (tx, rx) = oneshot::channel();
            pending.waiters.insert(id, Waiter { ticket, question: question.clone(), reply: tx });
            return Ok((Waiting { shared: &self.shared, id, ticket }, rx));
        }
        Err(io::Error::new(io::ErrorKind::WouldBlock, "no free query ID on the upstream socket"))
    }
}

impl Drop for PooledSocket {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Marks the socket closed and fails its waiters (so they try the next server at once)
/// however the reader ends: an error, an abort, or its runtime shutting down.
struct ReaderEnd(Arc<SocketShared>);

impl Drop for ReaderEnd {
    fn drop(&mut self) {
        let mut pending = lock(&self.0.pending);
        pending.closed = true;
        pending.waiters.clear();
    }
}

/// The reader: one buffer for the socket's life; a reply leaves it parsed, and only to
/// the query whose ID and question it carries. Anything else is dropped.
async fn read_replies(shared: Arc<SocketShared>) {
    let end = ReaderEnd(shared);
    let shared = &end.0;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let n = match shared.socket.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                // On a connected UDP socket these are ICMP reports (port or host
                // unreachable) about the one server it talks to: no use waiting on it.
                debug!(error = %e, "dns upstream socket failed");
                return;
            }
        };
        let datagram = &buf[..n];
        let Some(id) = datagram.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else { continue };
        // Parse only what someone waits for: a flood of stray datagrams stays cheap.
        if !lock(&shared.pending).waiters.contains_key(&id) {
            continue;
        }
        let Some((reply, _)) = parse_prefix(datagram) else { continue };
        let mut pending = lock(&shared.pending);
        if pending.waiters.get(&id).is_some_and(|w| answers(&reply, id, &w.question)) {
            if let Some(waiter) = pending.waiters.remove(&id) {
                // The query may have timed out just now; then the reply goes nowhere.
                let _ = waiter.reply.send(reply);
            }
        }
    }
}

/// One query over its own TCP connection (rare: truncated answers), with a fresh ID.
async fn exchange_tcp(server: SocketAddr, query: &[u8], question: &Query, timeout: Duration) -> io::Result<Message> {
    let id = random_id()?;
    let exchange = async {
        let mut stream = TcpStream::connect(server).await?;
        let len = u16::try_from(query.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(query);
        framed[2..4].copy_from_slice(&id.to_be_bytes());
        stream.write_all(&framed).await?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await?;
        matching_reply(&reply, id, question)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "reply does not answer the query"))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reply in time"))?
}

/// Query IDs, drawn from the kernel's CSPRNG this many bytes at a time: one getrandom per
/// query was a syscall on the hot path. Every ID is used once.
const RANDOM_ID_BATCH: usize = 256;

struct RandomIds {
    bytes: [u8; RANDOM_ID_BATCH],
    used: usize,
}

static RANDOM_IDS: Mutex<RandomIds> = Mutex::new(RandomIds { bytes: [0; RANDOM_ID_BATCH], used: RANDOM_ID_BATCH });

/// A query ID from the kernel's CSPRNG. With an upstream socket's port fixed for its
/// life, the ID is most of what a spoofer must guess: a userspace generator could be
/// predicted from the IDs it has already sent, getrandom's output cannot. Without it the
/// proxy does not forward at all.
fn random_id() -> io::Result<u16> {
    let mut ids = lock(&RANDOM_IDS);
    if ids.used + 2 > RANDOM_ID_BATCH {
        fill_random(&mut ids.bytes)?;
        ids.used = 0;
    }
    let at = ids.used;
    ids.used += 2;
    Ok(u16::from_ne_bytes([ids.bytes[at], ids.bytes[at + 1]]))
}

fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, which outlives the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n > 0 {
            filled += n as usize;
            continue;
        }
        let e = io::Error::last_os_error();
        if n == 0 || e.kind() != io::ErrorKind::Interrupted {
            return Err(io::Error::other(format!("getrandom: {e}")));
        }
    }
    Ok(())
}

/// Nameservers from /etc/resolv.conf (port 53), for when the policy lists no upstream.
/// Like glibc, only the first three count.
pub fn resolv_conf_servers(text: &str) -> Vec<SocketAddr> {
    let mut servers: Vec<SocketAddr> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next().and_then(parse_nameserver) else { continue };
        if !servers.contains(&addr) {
            servers.push(addr);
        }
        if servers.len() == RESOLV_CONF_MAX_SERVERS {
            break;
        }
    }
    servers
}

/// `1.1.1.1`, `2606:4700::1111` or a scoped link-local `fe80::1%eth0`.
fn parse_nameserver(text: &str) -> Option<SocketAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 53));
    }
    let (ip, scope) = text.split_once('%')?;
    let ip: Ipv6Addr = ip.parse().ok()?;
    let scope_id = match scope.parse::<u32>() {
        Ok(index) => index,
        Err(_) => {
            let name = std::ffi::CString::new(scope).ok()?;
            // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if index == 0 {
                return None;
            }
            index
        }
    };
    Some(SocketAddr::V6(SocketAddrV6::new(ip, 53, 0, scope_id)))
}
