//! The proxy against a fake upstream on 127.0.0.1. The upstream is an imitation on
//! purpose: the cases here (a CNAME loop, TC over UDP only, replies with a wrong ID or
//! question, answers that break the rules) are ones a real resolver will not serve.
use std::sync::atomic::{AtomicBool, AtomicUsize};

use hickory_proto::{
    op::{Edns, OpCode},
    rr::{
        Record,
        rdata::{
            A, AAAA, CNAME,
            opt::{EdnsCode, EdnsOption},
        },
    },
};

use super::*;
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr, SocketAddrV6},
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Header, Message, MessageType, Query, ResponseCode},
    rr::{DNSClass, Name, RData, RecordType},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    task::JoinSet,
};

use crate::model::policy::{Action, DnsSettings, DomainPattern};

const EDNS_TEST_OPTION: u16 = 65001;
const SHORT_TIMEOUT: Duration = Duration::from_millis(300);
/// How long the fake upstream takes over `slow.allowed.test`: past SHORT_TIMEOUT.
const SLOW_REPLY: Duration = Duration::from_millis(450);

// ---------------------------------------------------------------- fake upstream

struct FakeUpstream {
    addr: SocketAddr,
    /// Every query it got, as received.
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Where each UDP query came from, in order.
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    _tasks: JoinSet<()>,
}

impl FakeUpstream {
    /// UDP and TCP on the same port, as a resolver listens.
    async fn start() -> Self {
        for _ in 0..20 {
            let udp = UdpSocket::bind("127.0.0.1:0").await.expect("binding the fake upstream's UDP socket");
            let addr = udp.local_addr().expect("local address");
            let Ok(tcp) = TcpListener::bind(addr).await else { continue };
            let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
            let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
            let mut tasks = JoinSet::new();
            tasks.spawn(fake_udp(udp, Arc::clone(&received), Arc::clone(&peers)));
            tasks.spawn(fake_tcp(tcp, Arc::clone(&received)));
            return Self { addr, received, peers, _tasks: tasks };
        }
        panic!("no port on 127.0.0.1 was free for both UDP and TCP after 20 tries");
    }

    fn received(&self) -> Vec<Vec<u8>> {
        self.received.lock().unwrap().clone()
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }

    /// Waits until `n` queries have arrived.
    async fn wait_for_queries(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.received.lock().unwrap().len() < n {
            assert!(
                Instant::now() < deadline,
                "the upstream got {} queries in 5 s, expected {n}",
                self.received().len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn fake_udp(socket: UdpSocket, received: Arc<Mutex<Vec<Vec<u8>>>>, peers: Arc<Mutex<Vec<SocketAddr>>>) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 65536];
    let mut slow = JoinSet::new();
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else { continue };
        received.lock().unwrap().push(buf[..n].to_vec());
        peers.lock().unwrap().push(peer);
        let replies = fake_answers(&buf[..n], Transport::Udp);
        let is_slow = Message::from_vec(&buf[..n])
            .is_ok_and(|m| m.queries().first().is_some_and(|q| q.name() == &name("slow.allowed.test.")));
        if is_slow {
            let socket = Arc::clone(&socket);
            slow.spawn(async move {
                tokio::time::sleep(SLOW_REPLY).await;
                for reply in replies {
                    let _ = socket.send_to(&reply, peer).await;
                }
            });
            continue;
        }
        for reply in replies {
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

async fn fake_tcp(listener: TcpListener, received: Arc<Mutex<Vec<Vec<u8>>>>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let received = Arc::clone(&received);
        connections.spawn(async move {
            loop {
                let mut len = [0u8; 2];
                if stream.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if stream.read_exact(&mut query).await.is_err() {
                    return;
                }
                received.lock().unwrap().push(query.clone());
                for reply in fake_answers(&query, Transport::Tcp) {
                    let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&reply);
                    if stream.write_all(&framed).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

fn name(text: &str) -> Name {
    Name::from_ascii(text).unwrap_or_else(|e| panic!("test name {text:?}: {e}"))
}

fn a(owner: &str, ttl: u32, ip: &str) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A(ip.parse().unwrap())))
}

fn aaaa(owner: &str, ttl: u32, ip: &str) -> Record {
    Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA(ip.parse().unwrap())))
}

fn cname(owner: &str, target: &str) -> Record {
    Record::from_rdata(name(owner), 300, RData::CNAME(CNAME(name(target))))
}

/// The fake zone. Every reply echoes the query's EDNS, options included.
fn fake_answers(bytes: &[u8], transport: Transport) -> Vec<Vec<u8>> {
    let Ok(query) = Message::from_vec(bytes) else { return Vec::new() };
    let Some(question) = query.queries().first().cloned() else { return Vec::new() };
    let mut header = Header::response_from_request(query.header());
    header.set_recursion_available(true);
    let mut reply = Message::new();
    reply.set_header(header);
    reply.add_query(question.clone());
    if let Some(edns) = query.extensions() {
        reply.set_edns(edns.clone());
    }
    let qname = question.name().to_lowercase().to_ascii();
    let v6 = question.query_type() == RecordType::AAAA;
    let mut extra_replies = Vec::new();
    match qname.as_str() {
        "a.allowed.test." | "sub.wild.test." if v6 => {
            reply.add_answer(aaaa(&qname, 300, "2001:db8::1"));
        }
        "a.allowed.test." => {
            reply.add_answer(a(&qname, 300, "192.0.2.1"));
        }
        "slow.allowed.test." => {
            reply.add_answer(a(&qname, 300, "192.0.2.80"));
        }
        "c1.allowed.test." => {
            reply.add_answers([
                cname("c1.allowed.test.", "c2.cdn.test."),
                cname("c2.cdn.test.", "c3.cdn.test."),
                cname("c3.cdn.test.", "final.cdn.test."),
                a("final.cdn.test.", 60, "192.0.2.33"),
                a("stray.test.", 60, "198.51.100.7"),
            ]);
        }
        "loop.allowed.test." => {
            reply.add_answers([
                cname("loop.allowed.test.", "loop2.allowed.test."),
                cname("loop2.allowed.test.", "loop.allowed.test."),
                a("loop2.allowed.test.", 60, "192.0.2.99"),
            ]);
        }
        "huge.allowed.test." => {
            reply.add_answer(a(&qname, 999_999, "192.0.2.50"));
        }
        "tiny.allowed.test." => {
            reply.add_answer(a(&qname, 1, "192.0.2.51"));
        }
        "private.allowed.test." => {
            reply.add_answer(a(&qname, 300, "10.0.0.1"));
        }
        "mapped.allowed.test." => {
            reply.add_answer(aaaa(&qname, 300, "::ffff:192.168.1.1"));
        }
        "big.allowed.test." if transport == Transport::Udp => {
            reply.set_truncated(true);
        }
        "big.allowed.test." => {
            reply.add_answers([
                a(&qname, 300, "192.0.2.71"),
                a(&qname, 300, "192.0.2.72"),
                a(&qname, 300, "192.0.2.73"),
            ]);
        }
        "many.allowed.test." => {
            // Too big for 512 bytes, sent whole anyway: the proxy must truncate itself.
            reply.add_answers((100..140).map(|i| a(&qname, 300, &format!("192.0.2.{i}"))));
        }
        "spoof.allowed.test." => {
            let mut wrong_id = reply.clone();
            wrong_id.set_id(query.id() ^ 0x5555).add_answer(a(&qname, 300, "203.0.113.66"));
            let mut wrong_question = reply.clone();
            wrong_question.queries_mut()[0].set_name(name("other.test."));
            wrong_question.add_answer(a("other.test.", 300, "203.0.113.67"));
            extra_replies = vec![wrong_id, wrong_question];
            reply.add_answer(a(&qname, 300, "192.0.2.60"));
        }
        "servfail.allowed.test." => {
            reply.set_response_code(ResponseCode::ServFail);
        }
        _ => {
            reply.set_response_code(ResponseCode::NXDomain);
        }
    }
    extra_replies.push(reply);
    extra_replies
        .into_iter()
        .map(|m| {
            m.to_vec().unwrap_or_else(|_| {
                // An echoed EDNS the encoder rejects: answer without it rather than not at all.
                let mut plain = Message::error_msg(m.id(), m.op_code(), ResponseCode::ServFail);
                plain.add_queries(m.queries().iter().cloned());
                plain.to_vec().expect("a plain SERVFAIL encodes")
            })
        })
        .collect()
}

// ---------------------------------------------------------------- the proxy's owner

#[derive(Clone, Debug, PartialEq)]
enum Event {
    Open(u16, Vec<(IpAddr, Duration)>),
    Record(DnsDecision),
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
    fail_open: AtomicBool,
}

impl Opener for Recorder {
    fn open(&self, rule_id: u16, ips: &[(IpAddr, Duration)]) -> Result<(), String> {
        self.events.lock().unwrap().push(Event::Open(rule_id, ips.to_vec()));
        if self.fail_open.load(Ordering::Relaxed) { Err("learned-address table full".into()) } else { Ok(()) }
    }
    fn record(&self, decision: DnsDecision) {
        self.events.lock().unwrap().push(Event::Record(decision));
    }
}

impl Recorder {
    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}

/// For the fuzz loops: counts instead of keeping 100,000 decisions.
#[derive(Default)]
struct Counter {
    opens: AtomicUsize,
    records: AtomicUsize,
    reasons: Mutex<HashMap<&'static str, usize>>,
}

impl Opener for Counter {
    fn open(&self, _: u16, ips: &[(IpAddr, Duration)]) -> Result<(), String> {
        assert!(!ips.is_empty(), "open called with no addresses");
        self.opens.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn record(&self, decision: DnsDecision) {
        self.records.fetch_add(1, Ordering::Relaxed);
        *self.reasons.lock().unwrap().entry(decision.reason).or_default() += 1;
    }
}

// ---------------------------------------------------------------- helpers

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn settings(upstream: Vec<SocketAddr>) -> DnsSettings {
    DnsSettings { upstream, queries_per_second: 0, ..DnsSettings::default() }
}

/// Rule ids count from 1 in list order; names are `rule-<id>`.
fn rules(list: &[(&str, Action)], settings: DnsSettings) -> ProxyRules {
    let domains = list
        .iter()
        .enumerate()
        .map(|(i, (pattern, action))| DomainMatch {
            rule_id: i as u16 + 1,
            rule_name: format!("rule-{}", i + 1),
            action: *action,
            pattern: DomainPattern::parse(pattern).unwrap(),
        })
        .collect();
    ProxyRules { policy: "test".into(), domains, settings, audit: false }
}

const STANDARD: &[(&str, Action)] = &[
    ("*.allowed.test", Action::Allow),
    ("blocked.allowed.test", Action::Deny),
    ("*.wild.test", Action::Allow),
    ("a.allowed.test", Action::Allow),
];

fn query(id: u16, qname: &str, qtype: RecordType) -> Message {
    let mut m = Message::new();
    m.set_id(id).set_message_type(MessageType::Query).set_op_code(OpCode::Query).set_recursion_desired(true);
    m.add_query(Query::query(name(qname), qtype));
    m
}

fn with_edns(mut m: Message, payload: u16) -> Message {
    let mut edns = Edns::new();
    edns.set_max_payload(payload);
    edns.options_mut().insert(EdnsOption::Unknown(EDNS_TEST_OPTION, b"enforcer".to_vec()));
    m.set_edns(edns);
    m
}

fn wire(m: &Message) -> Vec<u8> {
    m.to_vec().expect("test query encodes")
}

fn answer_ips(m: &Message) -> Vec<IpAddr> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

struct Harness {
    upstream: FakeUpstream,
    recorder: Arc<Recorder>,
    proxy: Arc<Proxy>,
}

impl Harness {
    async fn new() -> Self {
        Self::with(|_| {}).await
    }

    async fn with(adjust: impl FnOnce(&mut DnsSettings)) -> Self {
        let upstream = FakeUpstream::start().await;
        let mut s = settings(vec![upstream.addr]);
        adjust(&mut s);
        let recorder = Arc::new(Recorder::default());
        let proxy = Proxy::with_timeout(rules(STANDARD, s), recorder.clone(), SHORT_TIMEOUT);
        Self { upstream, recorder, proxy }
    }

    /// Sends one query through `handle`; returns the parsed reply and what the owner saw.
    async fn ask(&self, m: &Message, transport: Transport) -> (Message, Vec<Event>) {
        let reply = self.proxy.handle(&wire(m), transport).await.expect("the proxy answered the query");
        let reply = Message::from_vec(&reply).unwrap_or_else(|e| panic!("reply does not parse: {e}"));
        assert_eq!(reply.id(), m.id(), "the reply carries the client's ID");
        assert_eq!(reply.message_type(), MessageType::Response);
        (reply, self.recorder.take())
    }
}

/// The single decision in `events`, which must come last.
fn decision(events: &[Event]) -> &DnsDecision {
    match events {
        [.., Event::Record(d)] if events.iter().filter(|e| matches!(e, Event::Record(_))).count() == 1 => d,
        other => panic!("expected exactly one recorded decision, last; got {other:?}"),
    }
}

fn assert_refused(reply: &Message, events: &[Event], reason: &str) {
    assert_eq!(reply.response_code(), ResponseCode::Refused, "{events:?}");
    assert!(reply.recursion_available(), "REFUSED sets RA");
    assert_eq!(reply.queries().len(), 1, "REFUSED carries the question back");
    assert!(reply.answers().is_empty());
    let d = decision(events);
    assert_eq!((d.verdict, d.reason), (DnsVerdict::Refused, reason), "{d:?}");
    assert!(!events.iter().any(|e| matches!(e, Event::Open(..))), "a refused query opened something: {events:?}");
}

// ---------------------------------------------------------------- answers

#[tokio::test]
async fn allowed_name_opens_its_addresses_before_the_answer_returns() {
    let h = Harness::new().await;
    let (reply, events) = h.ask(&query(0x1234, "a.allowed.test.", RecordType::A), Transport::Udp).await;
    assert_eq!(reply.response_code(), ResponseCode::NoError);
    assert_eq!(answer_ips(&reply), [ip("192.0.2.1")]);
    match events.as_slice() {
        [Event::Open(1, ips), Event::Record(d)] => {
            assert_eq!(ips, &[(ip("192.0.2.1"), secs(300))]);
            assert_eq!((d.verdict, d.reason, d.rule_id), (DnsVerdict::Allowed, "allowed", 1), "{d:?}");
            assert_eq!(d.rule_name.as_deref(), Some("rule-1"), "the first matching allow rule decides");
            assert_eq!((d.name.as_str(), d.qtype.as_str(), d.transport), ("a.allowed.test", "A", "udp"));
            assert_eq!(d.resolved, [ip("192.0.2.1")]);
            assert!(d.upstream_latency.is_some());
        }
        other => panic!("expected open(rule 1) and then the decision, got {other:?}"),
    }

    let (reply, events) = h.ask(&query(7, "A.Allowed.TEST.", RecordType::AAAA), Transport::Tcp).await;
    assert_eq!(answer_ips(&reply), [ip("2001:db8::1")]);
    assert!(
        matches!(events.as_slice(), [Event::Open(1, ips), Event::Record(d)]
        if ips == &[(ip("2001:db8::1"), secs(300))] && d.qtype == "AAAA" && d.transport == "tcp"),
        "mixed case still matches, AAAA opens: {events:?}"
    );
}

#[tokio::test]
async fn unlisted_name_is_refused_without_asking_upstream() {
    let h = Harness::new().await;
    let (reply, events) = h.ask(&query(0xbeef, "nowhere.test.", RecordType::A), Transport::Udp).await;
    assert_refused(&reply, &events, "not-allowed");
    assert_eq!(reply.queries()[0].name(), &name("nowhere.test."));
    assert!(reply.recursion_desired(), "RD is copied");
    let d = decision(&events);
    assert_eq!((d.rule_id, d.rule_name.as_deref(), d.name.as_str()), (0, None, "nowhere.test"));
    assert!(h.upstream.received().is_empty(), "a refused name reached the upstream");
}

#[tokio::test]
async fn deny_rule_beats_a_wildcard_allow() {
    let h = Harness::new().await;
    for qname in ["blocked.allowed.test.", "BLOCKED.allowed.test."] {
        let (reply, events) = h.ask(&query(1, qname, RecordType::A), Transport::Udp).await;
        assert_refused(&reply, &events, "denied-by-rule");
        let d = decision(&events);
        assert_eq!((d.rule_id, d.rule_name.as_deref()), (2, Some("rule-2")));
    }
    assert!(h.upstream.received().is_empty());
}

#[tokio::test]
async fn wildcard_matches_names_below_it_but_not_its_apex() {
    let h = Harness::new().await;
    for qname in ["sub.wild.test.", "deep.sub.wild.test."] {
        let (reply, events) = h.ask(&query(2, qname, RecordType::A), Transport::Udp).await;
        assert_eq!(reply.response_code(), ResponseCode::NXDomain, "the upstream's NXDOMAIN is passed on");
        assert!(
            matches!(events.as_slice(), [Event::Record(d)] if d.verdict == DnsVerdict::Allowed && d.rule_id == 3 && d.resolved.is_empty()),
            "NXDOMAIN: allowed, nothing to open: {events:?}"
        );
    }
    let (reply, events) = h.ask(&query(3, "wild.test.", RecordType::A), Transport::Udp).await;
    assert_refused(&reply, &events, "not-allowed");
}

#[tokio::test]
async fn a_dot_inside_a_label_does_not_pass_for_a_label_boundary() {
    let h = Harness::new().await;
    let mut m = Message::new();
    m.set_id(9).set_recursion_desired(true);
    let sneaky = Name::from_labels(vec![b"x.allowed".to_vec(), b"test".to_vec()]).unwrap();
    m.add_query(Query::query(sneaky, RecordType::A));
    let (reply, events) = h.ask(&m, Transport::Udp).await;
    assert_refused(&reply, &events, "not-allowed");
    assert_eq!(decision(&events).name, "x\\046allowed.test");
}

#[tokio::test]
async fn cname_chain_opens_only_the_final_addresses() {
    let h = Harness::new().await;
    let (reply, events) = h.ask(&query(4, "c1.allowed.test.", RecordType::A), Transport::Udp).await;
    assert_eq!(reply.response_code(), ResponseCode::NoError);
    assert!(
        matches!(events.as_slice(), [Event::Open(1, ips), Event::Record(d)]
        if ips == &[(ip("192.0.2.33"), secs(60))] && d.resolved == [ip("192.0.2.33")]),
        "only final.cdn.test's address opens: {events:?}"
    );
    assert_eq!(reply.answers().iter().filter(|r| r.record_type() == RecordType::CNAME).count(), 3);
    assert_eq!(answer_ips(&reply), [ip("192.0.2.33")], "the stray record off the chain is removed");
}

#[tokio::test]
async fn cname_loop_is_servfail_and_opens_nothing() {
    let h = Harness::new().await;
    let (reply, events) = h.ask(&query(5, "loop.allowed.test.", RecordType::A), Transport::Udp).await;
    assert_eq!(reply.response_code(), ResponseCode::ServFail);
    assert!(reply.answers().is_empty());
    assert!(
        matches!(events.as_slice(), [Event::Record(d)] if d.verdict == DnsVerdict::Failed && d.reason == "cname-loop"),
        "{events:?}"
    );
}

#[test]
fn cname_chains_longer_than_the_limit_are_refused() {
    let hops: Vec<Record> =
        (0..=MAX_CNAME_HOPS).map(|i| cname(&format!("n{i}.test."), &format!("n{}.test.", i + 1))).collect();
    assert_eq!(follow_cnames(&name("n0.test."), &hops).unwrap_err(), "cname-too-long");
    let chain = follow_cnames(&name("n0.test."), &hops[..MAX_CNAME_HOPS]).expect("16 hops are followed");
    assert_eq!(chain.finals, HashSet::from([name_key(&name(&format!("n{MAX_CNAME_HOPS}.test.")))]));
}

#[tokio::test]
async fn ttls_are_clamped_for_opening_and_lowered_for_the_agent() {
    let h = Harness::new().await;
    let (reply, events) = h.ask(&query(6, "huge.allowed.test.", RecordType::A), Transport::Udp).await;
    assert!(
        matches!(events.as_slice(), [Event::Open(1, ips), _] if ips == &[(ip("192.0.2.50"), secs(3600))]),
        "{events:?}"
    );
    assert_eq!(reply.answers()[0].ttl(), 3600, "the agent never caches longer than the kernel holds");
    let (reply, events) = h.ask(&query(6, "tiny.allowed.test.", RecordType::A), Transport::Udp).await;
    assert!(
        matches!(events.as_slice(), [Event::Open(1, ips), _] if ips == &[(ip("192.0.2.51"), secs(5))]),
        "{events:?}"
    );
    assert_eq!(reply.answers()[0].ttl(), 1, "short TTLs are not raised in the reply");

    let h = Harness::with(|s| (s.min_ttl_secs, s.max_ttl_secs) = (30, 600)).await;
    let (reply, events) = h.ask(&query(6, "huge.allowed.test.", RecordType::A), Transport::Udp).await;
    assert!(
        matches!(events.as_slice(), [Event::Open(1, ips), _] if ips == &[(ip("192.0.2.50"), secs(600))]),
        "{events:?}"
    );
    assert_eq!(reply.answers()[0].ttl(), 600);
    let (_, events) = h.ask(&query(6, "tiny.allowed.test.", RecordType::A), Transport::Udp).await;
    assert!(
        matches!(events.as_slice(), [Event::Open(1, ips), _] if ips == &[(ip("192.0.2.51"), secs(30))]),
        "{events:?}"
    );
}

#[tokio::test]
async fn private_answers_are_refused_unless_the_policy_allows_them() {
    let h = Harness::new().await;
    let (reply, events) = h.ask(&query(8, "private.allowed.test.", RecordType::A), Transport::Udp).await;
    assert_refused(&reply, &events, "private-answer");
    assert_eq!(decision(&events).resolved, [ip("10.0.0.1")], "the refused address is reported");
    let (reply, events) = h.ask(&query(8, "mapped.allowed.test.", RecordType::AAAA), Transport::Udp).await;
    assert_refused(&reply, &events, "private-answer");

    let h = Harness::with(|s| s.allow_private_answers = true).await;
    let (reply, events) = h.ask(&query(8, "private.allowed.test.", RecordType::A), Transport::Udp).await;
    assert_eq!(answer_ips(&reply), [ip("10.0.0.1")]);
    assert!(
        matches!(events.as_slice(), [Event::Open(1, ips), _] if ips == &[(ip("10.0.0.1"), secs(300))]),
        "{events:?}"
    );
}

#[test]
fn private_address_table() {
    let private = [
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.0.1",
        "127.0.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "0.1.2.3",
        "100.64.0.1",
        "100.127.255.255",
        "224.0.0.1",
        "255.255.255.255",
        "240.0.0.1",
        "::",
        "::1",
        "fc00::1",
        "fdff::1",
        "fe80::1",
        "fec0::1",
        "ff02::1",
        "::ffff:10.0.0.1",
        "::ffff:127.0.0.1",
        "::10.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:c0a8:0101::1",
    ];
    let public = [
        "1.1.1.1",
        "8.8.8.8",
        "100.63.255.255",
        "100.128.0.0",
        "172.32.0.1",
        "192.0.2.1",
        "2001:db8::1",
        "2606:4700::1111",
        "::ffff:1.1.1.1",
        "64:ff9b::808:808",
        "2002:0808:0808::1",
    ];
    for a in private {
        assert!(is_private_address(ip(a)), "{a} should count as private");
    }
    for a in public {
        assert!(!is_private_address(ip(a)), "{a} should count as public");
    }
}

#[tokio::test]
async fn truncation_passes_through_udp_and_tcp_gets_the_whole_answer() {
    let h = Harness::new().await;
    let (reply, events) = h.ask(&query(10, "big.allowed.test.", RecordType::A), Transport::Udp).await;
    assert!(reply.truncated(), "TC from the upstream reaches the client");
    assert!(reply.answers().is_empty());
    assert!(
        matches!(events.as_slice(), [Event::Record(d)] if d.verdict == DnsVerdict::Allowed && d.reason == "truncated"),
        "a truncated answer opens nothing: {events:?}"
    );

    let (reply, events) = h.ask(&query(10, "big.allowed.test.", RecordType::A), Transport::Tcp).await;
    assert!(!reply.truncated());
    assert_eq!(answer_ips(&reply).len(), 3);
    assert!(matches!(events.as_slice(), [Event::Open(1, ips), _] if ips.len() == 3), "{events:?}");

    // 40 records do not fit 512 bytes: without EDNS the proxy truncates itself.
    let (reply, events) = h.ask(&query(11, "many.allowed.test.", RecordType::A), Transport::Udp).await;
    assert!(reply.truncated() && reply.answers().is_empty());
    assert!(matches!(events.as_slice(), [Event::Record(d)] if d.reason == "truncated"), "{events:?}");
    let (reply, events) = h.ask(&with_edns(query(11, "many.allowed.test.", RecordType::A), 4096), Transport::Udp).await;
    assert_eq!(answer_ips(&reply).len(), 40, "EDNS 4096 takes the whole answer");
    assert!(matches!(events.as_slice(), [Event::Open(1, ips), _] if ips.len() == 40), "{events:?}");
}

#[tokio::test]
async fn edns_passes_upstream_untouched_and_its_opt_survives_the_rewrite() {
    let h = Harness::new().await;
    let sent = wire(&with_edns(query(12, "a.allowed.test.", RecordType::A), 1232));
    // Trailing bytes after the message are not forwarded.
    let mut packet = sent.clone();
    packet.extend_from_slice(b"trailing");
    let reply = h.proxy.handle(&packet, Transport::Udp).await.expect("an answer");
    let received = h.upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0][2..], sent[2..], "the upstream got the client's query, only the ID changed");

    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(answer_ips(&reply), [ip("192.0.2.1")]);
    let edns = reply.extensions().as_ref().expect("the OPT record survives re-serialization");
    assert_eq!(edns.max_payload(), 1232);
    assert_eq!(
        edns.option(EdnsCode::from(EDNS_TEST_OPTION)),
        Some(&EdnsOption::Unknown(EDNS_TEST_OPTION, b"enforcer".to_vec())),
        "the echoed option reached the client"
    );
}

#[tokio::test]
async fn long_names_and_labels_are_refused_before_anything_else() {
    let h = Harness::new().await;
    let long_label = format!("{}.allowed.test.", "x".repeat(41));
    let (reply, events) = h.ask(&query(13, &long_label, RecordType::TXT), Transport::Udp).await;
    assert_refused(&reply, &events, "label-too-long");
    assert_eq!(decision(&events).qtype, "TXT");
    let long_name = format!("{0}.{0}.{0}.{0}.allowed.test.", "y".repeat(30));
    let (reply, events) = h.ask(&query(13, &long_name, RecordType::TXT), Transport::Udp).await;
    assert_refused(&reply, &events, "name-too-long");
    assert!(h.upstream.received().is_empty());

    let at_limit = format!("{}.allowed.test.", "z".repeat(40));
    let (reply, _) = h.ask(&query(13, &at_limit, RecordType::A), Transport::Udp).await;
    assert_eq!(reply.response_code(), ResponseCode::NXDomain, "a 40-byte label is within the default limit");
}

#[tokio::test]
async fn rate_limit_allows_a_burst_of_twice_the_rate_then_refuses() {
    let h = Harness::with(|s| s.queries_per_second = 2).await;
    for i in 0..4 {
        let (reply, events) = h.ask(&query(i, "nowhere.test.", RecordType::A), Transport::Udp).await;
        assert_refused(&reply, &events, "not-allowed");
    }
    let (reply, events) = h.ask(&query(5, "a.allowed.test.", RecordType::A), Transport::Udp).await;
    assert_refused(&reply, &events, "rate-limited");

    // A reload that lifts the limit takes effect at once.
    let mut lifted = h.proxy.rules().as_ref().clone();
    lifted.settings.queries_per_second = 0;
    h.proxy.replace_rules(lifted);
    let (reply, _) = h.ask(&query(6, "a.allowed.test.", RecordType::A), Transport::Udp).await;
    assert_eq!(reply.response_code(), ResponseCode::NoError);
}

#[tokio::test]
async fn audit_mode_answers_what_enforce_would_refuse_and_opens_only_allowed_names() {
    let h = Harness::new().await;
    let mut audit = rules(STANDARD, h.proxy.rules().settings.clone());
    audit.audit = true;
    h.proxy.replace_rules(audit);
    let audited = |events: &[Event], reason: &str| {
        assert!(
            matches!(events, [Event::Record(d)] if d.verdict == DnsVerdict::AuditRefused && d.reason == reason),
            "{reason}: answered, nothing opened, reported: {events:?}"
        );
    };
    let (reply, events) = h.ask(&query(1, "blocked.allowed.test.", RecordType::A), Transport::Udp).await;
    assert_ne!(reply.response_code(), ResponseCode::Refused);
    audited(&events, "denied-by-rule");
    let (reply, events) = h.ask(&query(2, "private.allowed.test.", RecordType::A), Transport::Udp).await;
    assert_eq!(answer_ips(&reply), [ip("10.0.0.1")]);
    audited(&events, "private-answer");
    let (reply, events) = h.ask(&query(3, "elsewhere.test.", RecordType::A), Transport::Udp).await;
    assert_ne!(reply.response_code(), ResponseCode::Refused);
    audited(&events, "not-allowed");
    let (_, events) = h.ask(&query(4, "a.allowed.test.", RecordType::A), Transport::Udp).await;
    assert!(
        matches!(events.as_slice(), [Event::Open(1, _), Event::Record(d)] if d.verdict == DnsVerdict::Allowed),
        "{events:?}"
    );
}

#[tokio::test]
async fn replaced_rules_apply_to_later_queries() {
    let h = Harness::new().await;
    let (reply, _) = h.ask(&query(1, "a.allowed.test.", RecordType::A), Transport::Udp).await;
    assert_eq!(reply.response_code(), ResponseCode::NoError);
    let settings = h.proxy.rules().settings.clone();
    h.proxy.replace_rules(rules(&[("*.wild.test", Action::Allow)], settings));
    let (reply, events) = h.ask(&query(2, "a.allowed.test.", RecordType::A), Transport::Udp).await;
    assert_refused(&reply, &events, "not-allowed");
}

#[tokio::test]
async fn open_failure_is_servfail() {
    let h = Harness::new().await;
    h.recorder.fail_open.store(true, Ordering::Relaxed);
    let (reply, events) = h.ask(&query(14, "a.allowed.test.", RecordType::A), Transport::Udp).await;
    assert_eq!(reply.response_code(), ResponseCode::ServFail);
    assert!(reply.answers().is_empty(), "the answer is withheld when the kernel did not take its addresses");
    assert!(
        matches!(events.as_slice(), [Event::Open(1, _), Event::Record(d)]
        if d.verdict == DnsVerdict::Failed && d.reason == "open-failed"),
        "{events:?}"
    );
}

#[tokio::test]
async fn upstream_failures_are_servfail_and_the_next_upstream_is_tried() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let recorder = Arc::new(Recorder::default());
    let proxy = Proxy::with_timeout(rules(STANDARD, settings(vec![silent_addr])), recorder.clone(), SHORT_TIMEOUT);
    let started = Instant::now();
    let reply = proxy.handle(&wire(&query(15, "a.allowed.test.", RecordType::A)), Transport::Udp).await.unwrap();
    assert!(started.elapsed() >= SHORT_TIMEOUT, "gave up before the timeout");
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!((reply.id(), reply.response_code()), (15, ResponseCode::ServFail));
    assert!(matches!(recorder.take().as_slice(), [Event::Record(d)]
        if d.verdict == DnsVerdict::Failed && d.reason == "upstream-failed" && d.upstream_latency.is_none()));

    let upstream = FakeUpstream::start().await;
    proxy.replace_rules(rules(STANDARD, settings(vec![silent_addr, upstream.addr])));
    let reply = proxy.handle(&wire(&query(16, "a.allowed.test.", RecordType::A)), Transport::Udp).await.unwrap();
    assert_eq!(answer_ips(&Message::from_vec(&reply).unwrap()), [ip("192.0.2.1")], "the second upstream answered");

    let reply = proxy.handle(&wire(&query(17, "servfail.allowed.test.", RecordType::A)), Transport::Tcp).await.unwrap();
    assert_eq!(Message::from_vec(&reply).unwrap().response_code(), ResponseCode::ServFail);
    let events = recorder.take();
    assert!(matches!(events.as_slice(), [_, _, Event::Record(d)] if d.reason == "upstream-failed"), "{events:?}");
    drop(silent);
}

#[tokio::test]
async fn replies_with_a_wrong_id_or_question_are_ignored() {
    let h = Harness::new().await;
    let (reply, events) = h.ask(&query(18, "spoof.allowed.test.", RecordType::A), Transport::Udp).await;
    assert_eq!(answer_ips(&reply), [ip("192.0.2.60")]);
    assert!(
        matches!(events.as_slice(), [Event::Open(1, ips), _] if ips == &[(ip("192.0.2.60"), secs(300))]),
        "{events:?}"
    );
}

// ---------------------------------------------------------------- upstream sockets

/// Queries waiting on the proxy's current upstream sockets (retired ones not counted).
fn pending_upstream(proxy: &Proxy) -> usize {
    let pending_on = |pool: &UpstreamPool| {
        lock(&pool.state).sockets.iter().flatten().map(|s| lock(&s.shared.pending).waiters.len()).sum::<usize>()
    };
    proxy.active().pools.iter().map(|pool| pending_on(pool)).sum()
}

fn spawn_handle(proxy: &Arc<Proxy>, m: &Message) -> tokio::task::JoinHandle<Option<Vec<u8>>> {
    let (proxy, bytes) = (Arc::clone(proxy), wire(m));
    tokio::spawn(async move { proxy.handle(&bytes, Transport::Udp).await })
}

fn parsed(reply: Option<Vec<u8>>) -> Message {
    Message::from_vec(&reply.expect("the proxy answered")).unwrap_or_else(|e| panic!("reply does not parse: {e}"))
}

// Two workers: the pool is shared across threads as it would be on a multi-thread runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_queries_share_the_upstream_sockets_and_each_gets_its_own_answer() {
    const CASES: &[(&str, RecordType, &str)] = &[
        ("a.allowed.test.", RecordType::A, "192.0.2.1"),
        ("a.allowed.test.", RecordType::AAAA, "2001:db8::1"),
        ("sub.wild.test.", RecordType::AAAA, "2001:db8::1"),
        ("c1.allowed.test.", RecordType::A, "192.0.2.33"),
        ("huge.allowed.test.", RecordType::A, "192.0.2.50"),
        ("tiny.allowed.test.", RecordType::A, "192.0.2.51"),
    ];
    const QUERIES: u16 = 200;
    let h = Harness::new().await;
    let mut queries = JoinSet::new();
    for i in 0..QUERIES {
        let (qname, qtype, expected) = CASES[usize::from(i) % CASES.len()];
        let asked = spawn_handle(&h.proxy, &query(1000 + i, qname, qtype));
        queries.spawn(async move { (i, qname, expected, parsed(asked.await.expect("query task"))) });
    }
    while let Some(done) = queries.join_next().await {
        let (i, qname, expected, reply) = done.expect("query task");
        assert_eq!(reply.id(), 1000 + i, "query {i} ({qname}) got a reply with another query's ID");
        assert_eq!(answer_ips(&reply), [ip(expected)], "query {i} ({qname}) got another answer: {reply:?}");
    }
    assert_eq!(h.upstream.received().len(), usize::from(QUERIES), "one upstream query per client query");
    let ports: HashSet<u16> = h.upstream.peers().iter().map(SocketAddr::port).collect();
    assert!(
        ports.len() <= UPSTREAM_SOCKETS.sockets,
        "{QUERIES} queries came from {} source ports; the pool has {} sockets",
        ports.len(),
        UPSTREAM_SOCKETS.sockets
    );
    assert_eq!(pending_upstream(&h.proxy), 0, "answered queries left entries behind");
}

#[tokio::test]
async fn a_late_reply_finds_no_waiter_and_never_reaches_another_query() {
    // A hand-driven upstream: it answers when and with what the test says.
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let recorder = Arc::new(Recorder::default());
    let one_socket = PoolLimits { sockets: 1, ..UPSTREAM_SOCKETS };
    let upstream = settings(vec![server.local_addr().unwrap()]);
    let proxy = Proxy::with_limits(rules(STANDARD, upstream), recorder.clone(), SHORT_TIMEOUT, one_socket);
    let mut buf = vec![0u8; 4096];

    let first = spawn_handle(&proxy, &query(31, "a.allowed.test.", RecordType::A));
    let (n, proxy_addr) = server.recv_from(&mut buf).await.unwrap();
    let late = fake_answers(&buf[..n], Transport::Udp).pop().unwrap();
    assert_eq!(pending_upstream(&proxy), 1, "the query waits on the socket");
    let reply = parsed(first.await.unwrap());
    assert_eq!((reply.id(), reply.response_code()), (31, ResponseCode::ServFail), "no answer in time: SERVFAIL");
    assert_eq!(pending_upstream(&proxy), 0, "a timed-out query left its entry behind");
    recorder.take();

    // The next query goes out on the same socket. The late reply arrives first, then
    // again as if its ID had come round to the new query, then the real answer.
    let second = spawn_handle(&proxy, &query(32, "tiny.allowed.test.", RecordType::A));
    let (n, from) = server.recv_from(&mut buf).await.unwrap();
    assert_eq!(from, proxy_addr, "one pooled socket carries both queries");
    let asked = buf[..n].to_vec();
    let mut disguised = late.clone();
    disguised[..2].copy_from_slice(&asked[..2]);
    for datagram in [late, disguised, fake_answers(&asked, Transport::Udp).pop().unwrap()] {
        server.send_to(&datagram, from).await.unwrap();
    }
    let reply = parsed(second.await.unwrap());
    assert_eq!((reply.id(), answer_ips(&reply)), (32, vec![ip("192.0.2.51")]), "the late reply was taken: {reply:?}");
    let events = recorder.take();
    assert!(
        matches!(events.as_slice(), [Event::Open(1, ips), _] if ips.len() == 1 && ips[0].0 == ip("192.0.2.51")),
        "only the second query's own answer may be opened: {events:?}"
    );
    assert_eq!(pending_upstream(&proxy), 0);

    // A query dropped while it waits (its client went away) takes its entry with it.
    let third = spawn_handle(&proxy, &query(33, "a.allowed.test.", RecordType::A));
    server.recv_from(&mut buf).await.unwrap();
    assert_eq!(pending_upstream(&proxy), 1);
    third.abort();
    assert!(third.await.unwrap_err().is_cancelled());
    assert_eq!(pending_upstream(&proxy), 0, "a cancelled query left its entry behind");
}

#[tokio::test]
async fn upstream_sockets_retire_after_their_query_limit_and_age_and_queries_on_them_finish() {
    let upstream = FakeUpstream::start().await;
    let recorder = Arc::new(Recorder::default());
    let limits = PoolLimits { sockets: 1, queries_per_socket: 3, lifetime: Duration::from_secs(30) };
    let s = settings(vec![upstream.addr]);
    let proxy = Proxy::with_limits(rules(STANDARD, s.clone()), recorder.clone(), Duration::from_secs(2), limits);
    let slow = spawn_handle(&proxy, &query(40, "slow.allowed.test.", RecordType::A));
    upstream.wait_for_queries(1).await;
    for i in 0..8 {
        let reply = parsed(proxy.handle(&wire(&query(41 + i, "a.allowed.test.", RecordType::A)), Transport::Udp).await);
        assert_eq!(answer_ips(&reply), [ip("192.0.2.1")], "query {i}: {reply:?}");
    }
    assert!(!slow.is_finished(), "the slow answer came before its socket was retired; the test proves nothing");
    let reply = parsed(slow.await.unwrap());
    assert_eq!(answer_ips(&reply), [ip("192.0.2.80")], "the query on the retired socket was not answered: {reply:?}");
    let ports: Vec<u16> = upstream.peers().iter().map(SocketAddr::port).collect();
    assert_eq!(ports.len(), 9, "{ports:?}");
    for (socket, queries) in ports.chunks(3).enumerate() {
        assert!(queries.iter().all(|p| *p == queries[0]), "socket {socket} did not carry 3 queries: {ports:?}");
    }
    assert!(ports[0] != ports[3] && ports[3] != ports[6] && ports[0] != ports[6], "a socket was reused: {ports:?}");
    assert_eq!(pending_upstream(&proxy), 0);

    let upstream = FakeUpstream::start().await;
    let limits = PoolLimits { sockets: 1, queries_per_socket: 1000, lifetime: Duration::from_millis(100) };
    let proxy = Proxy::with_limits(rules(STANDARD, settings(vec![upstream.addr])), recorder, SHORT_TIMEOUT, limits);
    for pause in [Duration::ZERO, Duration::ZERO, Duration::from_millis(150)] {
        tokio::time::sleep(pause).await;
        let reply = parsed(proxy.handle(&wire(&query(50, "a.allowed.test.", RecordType::A)), Transport::Udp).await);
        assert_eq!(answer_ips(&reply), [ip("192.0.2.1")]);
    }
    let ports: Vec<u16> = upstream.peers().iter().map(SocketAddr::port).collect();
    assert!(ports.len() == 3 && ports[0] == ports[1] && ports[1] != ports[2], "retired by age: {ports:?}");
}

#[tokio::test]
async fn a_refused_upstream_port_falls_through_to_the_next_at_once() {
    // Bound and let go: nothing listens there, so the kernel answers ICMP port unreachable.
    let closed = UdpSocket::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let upstream = FakeUpstream::start().await;
    let recorder = Arc::new(Recorder::default());
    let s = settings(vec![closed, upstream.addr]);
    let proxy = Proxy::with_timeout(rules(STANDARD, s), recorder, Duration::from_secs(5));
    for id in [60, 61] {
        let started = Instant::now();
        let reply = parsed(proxy.handle(&wire(&query(id, "a.allowed.test.", RecordType::A)), Transport::Udp).await);
        assert_eq!(answer_ips(&reply), [ip("192.0.2.1")], "the second upstream answered");
        assert!(started.elapsed() < Duration::from_secs(1), "waited {:?} on a refused port", started.elapsed());
    }
    assert_eq!(pending_upstream(&proxy), 0);
}

#[tokio::test]
async fn malformed_queries_get_formerr_or_are_dropped() {
    let h = Harness::new().await;
    let good = wire(&query(0x4242, "a.allowed.test.", RecordType::A));
    assert_eq!(h.proxy.handle(&good[..11], Transport::Udp).await, None, "no header: dropped");
    let mut response = good.clone();
    response[2] |= 0x80;
    assert_eq!(h.proxy.handle(&response, Transport::Udp).await, None, "responses are never answered");
    let mut oversize = good.clone();
    oversize.resize(MAX_UDP_QUERY + 1, 0);
    assert_eq!(h.proxy.handle(&oversize, Transport::Udp).await, None, "UDP over 4096 bytes: dropped");
    assert!(h.recorder.take().is_empty(), "dropped packets are not decisions");

    let rcode_of = |reply: Option<Vec<u8>>| {
        let m = Message::from_vec(&reply.expect("a reply")).unwrap();
        assert_eq!(m.id(), 0x4242);
        m.response_code()
    };
    let mut status = good.clone();
    status[2] = (status[2] & !0x78) | (2 << 3);
    assert_eq!(rcode_of(h.proxy.handle(&status, Transport::Udp).await), ResponseCode::Refused);
    assert_eq!(decision(&h.recorder.take()).reason, "bad-opcode");

    let mut two = query(0x4242, "a.allowed.test.", RecordType::A);
    two.add_query(Query::query(name("b.allowed.test."), RecordType::A));
    assert_eq!(rcode_of(h.proxy.handle(&wire(&two), Transport::Udp).await), ResponseCode::FormErr);
    assert_eq!(decision(&h.recorder.take()).reason, "malformed");

    let mut chaos = query(0x4242, "version.bind.", RecordType::TXT);
    chaos.queries_mut()[0].set_query_class(DNSClass::CH);
    assert_eq!(rcode_of(h.proxy.handle(&wire(&chaos), Transport::Udp).await), ResponseCode::FormErr);
    assert_eq!(decision(&h.recorder.take()).reason, "bad-class");

    let mut with_answer = query(0x4242, "a.allowed.test.", RecordType::A);
    with_answer.add_answer(a("a.allowed.test.", 1, "192.0.2.1"));
    assert_eq!(rcode_of(h.proxy.handle(&wire(&with_answer), Transport::Udp).await), ResponseCode::FormErr);
    assert_eq!(decision(&h.recorder.take()).reason, "malformed");

    let axfr = query(0x4242, "a.allowed.test.", RecordType::AXFR);
    assert_eq!(rcode_of(h.proxy.handle(&wire(&axfr), Transport::Tcp).await), ResponseCode::Refused);
    assert_eq!(decision(&h.recorder.take()).reason, "qtype-refused");

    let mut garbage = good[..12].to_vec();
    garbage.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    assert_eq!(rcode_of(h.proxy.handle(&garbage, Transport::Udp).await), ResponseCode::FormErr, "self-pointer");
    assert!(h.upstream.received().is_empty());
}

#[tokio::test]
async fn serve_answers_udp_and_several_tcp_queries_per_connection() {
    let h = Harness::new().await;
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
    let server = tokio::spawn(Arc::clone(&h.proxy).serve(vec![udp], vec![tcp]));
    let deadline = Duration::from_secs(5);

    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(&wire(&query(21, "a.allowed.test.", RecordType::A)), udp_addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, from) =
        tokio::time::timeout(deadline, client.recv_from(&mut buf)).await.expect("UDP reply in time").unwrap();
    assert_eq!(from, udp_addr);
    let reply = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!((reply.id(), answer_ips(&reply)), (21, vec![ip("192.0.2.1")]));

    let mut stream = TcpStream::connect(tcp_addr).await.unwrap();
    let mut both = Vec::new();
    for (id, qname) in [(22, "big.allowed.test."), (23, "nowhere.test.")] {
        let q = wire(&query(id, qname, RecordType::A));
        both.extend_from_slice(&(q.len() as u16).to_be_bytes());
        both.extend_from_slice(&q);
    }
    stream.write_all(&both).await.unwrap();
    for (id, rcode, answers) in [(22, ResponseCode::NoError, 3), (23, ResponseCode::Refused, 0)] {
        let mut len = [0u8; 2];
        tokio::time::timeout(deadline, stream.read_exact(&mut len)).await.expect("TCP reply in time").unwrap();
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut body).await.unwrap();
        let reply = Message::from_vec(&body).unwrap();
        assert_eq!((reply.id(), reply.response_code(), reply.answers().len()), (id, rcode, answers));
    }

    server.abort();
    let _ = server.await;
    assert!(TcpStream::connect(tcp_addr).await.is_err(), "the listener closes when serve is dropped");
}

#[test]
fn resolv_conf_nameservers() {
    let text = "# generated\nsearch example.test\nnameserver 192.0.2.53\n; nameserver 192.0.2.99\n\
        nameserver   2001:db8::53  # trailing comment\nnameserver 192.0.2.53\noptions edns0\n\
        nameserver not-an-address\nnameserver fe80::1%1\nnameserver 192.0.2.54\n";
    assert_eq!(
        resolv_conf_servers(text),
        vec![
            "192.0.2.53:53".parse::<SocketAddr>().unwrap(),
            "[2001:db8::53]:53".parse().unwrap(),
            SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 53, 0, 1)),
        ],
        "duplicates and junk skipped, at most three kept"
    );
    assert!(resolv_conf_servers("").is_empty());
}

#[tokio::test]
async fn metrics_count_queries_and_drops() {
    let h = Harness::new().await;
    h.ask(&query(1, "a.allowed.test.", RecordType::A), Transport::Udp).await;
    h.ask(&query(2, "nowhere.test.", RecordType::A), Transport::Udp).await;
    assert_eq!(h.proxy.handle(&[0u8; 3], Transport::Udp).await, None);
    crate::metrics::set_dns_learned("dns-test-policy", 7);
    let text = crate::metrics::render(None);
    for expected in [
        r#"enforcer_dns_queries_total{reason="allowed",verdict="allowed"}"#,
        r#"enforcer_dns_queries_total{reason="not-allowed",verdict="refused"}"#,
        "enforcer_dns_upstream_seconds_bucket{le=\"0.0005\"}",
        "enforcer_dns_dropped_packets_total",
        r#"enforcer_dns_learned_ips{policy="dns-test-policy"} 7"#,
    ] {
        assert!(text.contains(expected), "metrics lack {expected:?}:\n{text}");
    }
}

// ---------------------------------------------------------------- fuzzing

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn bytes_below(&mut self, n: usize) -> Vec<u8> {
        let len = self.below(n);
        self.bytes(len)
    }
}

fn header(id: u16, qdcount: u16, ancount: u16) -> Vec<u8> {
    let mut h = id.to_be_bytes().to_vec();
    h.extend_from_slice(&[0x01, 0x00]);
    for count in [qdcount, ancount, 0, 0] {
        h.extend_from_slice(&count.to_be_bytes());
    }
    h
}

/// Valid queries and hand-made traps for the parser.
fn fuzz_seeds(names: &[&str]) -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (i, qname) in names.iter().enumerate() {
        for qtype in [RecordType::A, RecordType::AAAA, RecordType::TXT, RecordType::HTTPS] {
            seeds.push(wire(&query(i as u16, qname, qtype)));
            seeds.push(wire(&with_edns(query(i as u16, qname, qtype), 1232)));
        }
    }
    let question_tail = [0, 1, 0, 1];
    let mut trap = |body: &[u8]| {
        let mut packet = header(0x7777, 1, 0);
        packet.extend_from_slice(body);
        packet.extend_from_slice(&question_tail);
        seeds.push(packet);
    };
    trap(&[0xc0, 0x0c]); // pointer to itself
    trap(&[0xc0, 0x0e, 0xc0, 0x0c]); // two pointers pointing at each other
    trap(&[0xc0, 0xff]); // pointer past the end
    trap(&[0x01, b'a', 0xc0, 0x0c]); // label, then back to the start
    trap(&[0x3f, b'a', b'b']); // label longer than the packet
    trap(&[0x40, 0x00]); // extended label type
    trap(&[0x80, 0x00]); // reserved label type
    let chain: Vec<u8> =
        (0..200u16).flat_map(|i| [0xc0 | ((12 + 2 * (i + 1)) >> 8) as u8, (12 + 2 * (i + 1)) as u8]).collect();
    trap(&chain); // 0xC0 chain walking forwards off the end
    let mut cycle: Vec<u8> = (0..100u16).flat_map(|i| [0xc0, (12 + 2 * ((i + 1) % 100)) as u8]).collect();
    cycle.truncate(200);
    trap(&cycle); // 0xC0 chain that comes round again
    seeds.push(header(0x7777, u16::MAX, u16::MAX)); // counts with nothing behind them
    let mut opt = wire(&query(0x7777, "a.allowed.test.", RecordType::A));
    opt[11] = 1; // ARCOUNT 1: an OPT whose option lengths lie
    opt.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 8, 0, 8, 0, 40, 0, 1, 200, 0]);
    seeds.push(opt);
    seeds
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(b.len() + 1);
        match rng.below(9) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = [0x00, 0x01, 0x3f, 0x40, 0x80, 0xc0, 0xff, 0x0c, rng.next() as u8][rng.below(9)];
            }
            2 => b.truncate(at),
            3 => {
                // A length prefix and that many (or fewer) bytes.
                let len = rng.below(70);
                let mut label = vec![len as u8];
                label.extend(rng.bytes_below(len + 2));
                b.splice(at..at, label);
            }
            4 if b.len() >= 12 => {
                let counts = rng.bytes(8);
                b[4..12].copy_from_slice(&counts);
            }
            5 if !b.is_empty() => {
                let from = rng.below(b.len());
                let to = (from + rng.below(40)).min(b.len());
                let slice = b[from..to].to_vec();
                b.splice(at..at, slice);
            }
            6 => {
                // A compression pointer at itself, or anywhere.
                let target = if rng.below(2) == 0 { at } else { rng.below(b.len() + 2) };
                b.splice(at..at, [0xc0 | ((target >> 8) & 0x3f) as u8, target as u8]);
            }
            7 => {
                let n = rng.below(64);
                b.extend(rng.bytes(n));
            }
            _ => b = rng.bytes_below(600),
        }
    }
    b
}

/// Feeds `count` inputs to `handle`; every reply must parse and carry the input's ID.
async fn fuzz_handle(proxy: &Proxy, rng: &mut Rng, seeds: &[Vec<u8>], count: usize) -> (usize, usize) {
    let mut answered = 0;
    let mut noerror = 0;
    for i in 0..count {
        let input = match rng.below(20) {
            0 => rng.bytes_below(64),
            1 => rng.bytes_below(600),
            2 if i % 100 == 0 => rng.bytes(65536),
            3 if i % 100 == 1 => {
                let mut big = seeds[0][..12].to_vec();
                big.extend(rng.bytes(65535 - 12));
                big
            }
            _ => {
                let seed = rng.below(seeds.len());
                mutate(rng, &seeds[seed])
            }
        };
        let transport = if rng.below(2) == 0 { Transport::Udp } else { Transport::Tcp };
        let Some(reply) = proxy.handle(&input, transport).await else { continue };
        answered += 1;
        let parsed = Message::from_vec(&reply)
            .unwrap_or_else(|e| panic!("iteration {i}: reply to {input:02x?} does not parse ({e}): {reply:02x?}"));
        assert_eq!(
            parsed.id(),
            u16::from_be_bytes([input[0], input[1]]),
            "iteration {i}: reply ID differs from input {input:02x?}"
        );
        assert_eq!(parsed.message_type(), MessageType::Response);
        if parsed.response_code() == ResponseCode::NoError {
            noerror += 1;
        }
    }
    (answered, noerror)
}

#[tokio::test]
async fn fuzz_packet_path_with_nothing_allowed() {
    let counter = Arc::new(Counter::default());
    // Nothing is allowed, so no input reaches an upstream; the upstream is a dead
    // address to make that certain.
    let mut s = settings(vec!["127.0.0.1:9".parse().unwrap()]);
    (s.max_name_length, s.max_label_length) = (253, 63);
    let proxy = Proxy::with_timeout(rules(&[], s), counter.clone(), SHORT_TIMEOUT);
    let seeds = fuzz_seeds(&["a.allowed.test.", "nowhere.test.", "x.y.z.example.test."]);
    let mut rng = Rng(0x005e_ed0f_d15e_a5e5);
    let (answered, _) = fuzz_handle(&proxy, &mut rng, &seeds, 100_000).await;
    assert!(answered > 30_000, "only {answered} of 100000 inputs got a reply: the mutations are too destructive");
    assert_eq!(counter.records.load(Ordering::Relaxed), answered, "record is called once per answered query");
    assert_eq!(counter.opens.load(Ordering::Relaxed), 0);
    let reached_matching = counter.reasons.lock().unwrap().get("not-allowed").copied().unwrap_or(0);
    assert!(reached_matching > 5_000, "only {reached_matching} inputs got as far as rule matching");
}

#[tokio::test]
async fn fuzz_packet_path_with_allowed_names_and_a_real_upstream() {
    let upstream = FakeUpstream::start().await;
    let counter = Arc::new(Counter::default());
    let proxy = Proxy::with_timeout(rules(STANDARD, settings(vec![upstream.addr])), counter.clone(), SHORT_TIMEOUT);
    let seeds = fuzz_seeds(&["a.allowed.test.", "c1.allowed.test.", "big.allowed.test.", "spoof.allowed.test."]);
    let mut rng = Rng(0xa110_7ed0);
    let (answered, noerror) = fuzz_handle(&proxy, &mut rng, &seeds, 2_000).await;
    assert_eq!(counter.records.load(Ordering::Relaxed), answered);
    assert!(
        noerror > 50 && counter.opens.load(Ordering::Relaxed) > 50,
        "too few inputs reached the upstream: {noerror}"
    );
}

#[tokio::test]
async fn fuzz_upstream_replies() {
    // The upstream is trusted less than it seems (a compromised resolver, a spoofed
    // datagram that matched): its replies go through the same parser and rewrite.
    let counter = Arc::new(Counter::default());
    let proxy = Proxy::with_timeout(rules(STANDARD, settings(vec![])), counter.clone(), SHORT_TIMEOUT);
    let mut rng = Rng(0xbad_da7a);
    let (mut checked, mut passed) = (0, 0);
    for qname in
        ["a.allowed.test.", "c1.allowed.test.", "loop.allowed.test.", "many.allowed.test.", "huge.allowed.test."]
    {
        let request = with_edns(query(0x4242, qname, RecordType::A), 1232);
        let request_bytes = wire(&request);
        let question = request.queries()[0].clone();
        let replies = fake_answers(&request_bytes, Transport::Tcp);
        let valid = replies.last().unwrap();
        let question_end = 12 + request_bytes[12..].iter().position(|&b| b == 0).unwrap() + 5;
        for _ in 0..10_000 {
            // Mutate only past the question so most replies still match and get rewritten.
            let mut reply = valid[..question_end].to_vec();
            reply.extend(mutate(&mut rng, &valid[question_end..]));
            let Some(parsed) = matching_reply(&reply, 0x4242, &question) else { continue };
            checked += 1;
            let d = DnsDecision {
                name: qname.into(),
                qtype: "A".into(),
                verdict: DnsVerdict::Refused,
                reason: "",
                rule_id: 1,
                rule_name: None,
                resolved: Vec::new(),
                transport: "udp",
                upstream_latency: None,
            };
            let (bytes, d) =
                proxy.pass_on(&proxy.rules().settings, false, &request, &request_bytes, 1, parsed, Transport::Udp, d);
            let out = Message::from_vec(&bytes).unwrap_or_else(|e| panic!("rewritten reply does not parse: {e}"));
            assert_eq!(out.id(), 0x4242);
            assert!(bytes.len() <= 1232 || out.truncated(), "a UDP reply larger than the client's buffer");
            if d.verdict == DnsVerdict::Allowed {
                passed += 1;
                assert!(out.answers().iter().all(|r| r.ttl() <= 3600), "a TTL above max_ttl reached the agent");
                assert!(d.resolved.iter().all(|ip| !is_private_address(*ip)), "a private answer passed: {d:?}");
            }
        }
    }
    assert!(checked > 5_000 && passed > 1_000, "only {checked} mutated replies matched the question, {passed} passed");
}
