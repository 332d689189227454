//! One cgroup's proxy: the rate limit, the decision on each query, and serving
//! UDP and TCP.
use std::{
    collections::BTreeMap,
    io,
    net::IpAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, Query, ResponseCode},
    rr::{DNSClass, RData, RecordType},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tracing::{debug, warn};

use crate::{
    metrics,
    model::policy::{Action, DnsSettings},
};

use super::*;

/// The per-proxy query budget: `rate` per second, bursts up to twice that.
#[derive(Debug)]
pub(super) struct TokenBucket {
    pub(super) qps: u32,
    pub(super) tokens: f64,
    pub(super) last: Instant,
}

impl TokenBucket {
    pub(super) fn new(qps: u32) -> Self {
        Self { qps, tokens: 2.0 * f64::from(qps), last: Instant::now() }
    }

    pub(super) fn take(&mut self, now: Instant) -> bool {
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
pub(super) struct Active {
    pub(super) rules: Arc<ProxyRules>,
    /// One per `rules.settings.upstream` entry, in the same order.
    pub(super) pools: Vec<Arc<UpstreamPool>>,
}

impl Active {
    /// Keeps the pools of servers that stay, so a reload does not churn sockets; queries
    /// in flight hold on to the pools they started with.
    pub(super) fn new(rules: ProxyRules, limits: PoolLimits, previous: Option<&Active>) -> Self {
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
pub(super) type Outcome = (Vec<u8>, DnsDecision);

impl Proxy {
    pub fn new(rules: ProxyRules, opener: Arc<dyn Opener>) -> Arc<Self> {
        Self::with_timeout(rules, opener, UPSTREAM_TIMEOUT)
    }

    /// As `new`, with another upstream timeout (tests use a short one).
    pub fn with_timeout(rules: ProxyRules, opener: Arc<dyn Opener>, timeout: Duration) -> Arc<Self> {
        Self::with_limits(rules, opener, timeout, UPSTREAM_SOCKETS)
    }

    /// As `with_timeout`, with other upstream socket limits (tests retire sockets early).
    pub(super) fn with_limits(
        rules: ProxyRules,
        opener: Arc<dyn Opener>,
        timeout: Duration,
        limits: PoolLimits,
    ) -> Arc<Self> {
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

    pub(super) fn active(&self) -> Arc<Active> {
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

    pub(super) async fn answer(&self, active: &Active, packet: &[u8], transport: Transport) -> Option<Outcome> {
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
    pub(super) async fn forward(
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
    pub(super) fn pass_on(
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

    pub(super) async fn serve_udp(self: Arc<Self>, socket: UdpSocket) {
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

    pub(super) async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
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
    pub(super) async fn serve_connection(self: Arc<Self>, mut stream: TcpStream, _permit: OwnedSemaphorePermit) {
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

pub(super) fn refused(mut d: DnsDecision, reason: &'static str) -> DnsDecision {
    d.verdict = DnsVerdict::Refused;
    d.reason = reason;
    d
}

pub(super) fn failed(mut d: DnsDecision, reason: &'static str) -> DnsDecision {
    d.verdict = DnsVerdict::Failed;
    d.reason = reason;
    d
}

pub(super) fn allowed(mut d: DnsDecision, reason: &'static str) -> DnsDecision {
    d.verdict = DnsVerdict::Allowed;
    d.reason = reason;
    d
}
