//! DNS messages and names: parsing hostile bytes, building replies, following CNAME
//! chains, and which answers are private.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    panic::{self, AssertUnwindSafe},
};

use hickory_proto::{
    op::{Header, Message, MessageType, Query, ResponseCode},
    rr::{Name, RData, RecordType},
    serialize::binary::{BinDecodable as _, BinDecoder},
};

use super::*;

/// Parses a message and says how many bytes it used (trailing bytes are not forwarded).
/// The parser is a dependency fed hostile bytes: a panic in it must not take the proxy.
pub(super) fn parse_prefix(packet: &[u8]) -> Option<(Message, usize)> {
    panic::catch_unwind(|| {
        let mut decoder = BinDecoder::new(packet);
        let message = Message::read(&mut decoder).ok()?;
        Some((message, decoder.index()))
    })
    .ok()
    .flatten()
}

pub(super) fn serialize(message: &Message) -> Option<Vec<u8>> {
    panic::catch_unwind(AssertUnwindSafe(|| message.to_vec().ok())).ok().flatten().filter(|b| b.len() <= MAX_TCP_QUERY)
}

/// A bare header answering `packet`: for queries whose question cannot be trusted.
pub(super) fn header_reply(packet: &[u8], rcode: ResponseCode) -> Vec<u8> {
    let mut reply = vec![0u8; HEADER_LEN];
    reply[..2].copy_from_slice(&packet[..2]);
    // QR set; opcode and RD copied.
    reply[2] = 0x80 | (packet[2] & 0x79);
    // RA set; CD copied (RFC 6840 §5.9).
    reply[3] = 0x80 | (packet[3] & 0x10) | (u16::from(rcode) as u8 & 0x0f);
    reply
}

/// REFUSED or SERVFAIL carrying the question back.
pub(super) fn reply_to(request: &Message, rcode: ResponseCode, packet: &[u8]) -> Vec<u8> {
    let mut header = Header::response_from_request(request.header());
    header.set_recursion_available(true).set_response_code(rcode);
    let mut reply = Message::new();
    reply.set_header(header);
    reply.add_queries(request.queries().iter().cloned());
    serialize(&reply).unwrap_or_else(|| header_reply(packet, rcode))
}

/// The question and TC=1, nothing else: the client retries over TCP.
pub(super) fn truncated_reply(request: &Message, upstream: &Message, packet: &[u8]) -> Vec<u8> {
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
pub(super) fn udp_payload_limit(request: &Message) -> usize {
    match request.extensions() {
        Some(edns) => usize::from(edns.max_payload()).clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_QUERY),
        None => CLASSIC_UDP_PAYLOAD,
    }
}

/// A name compared as DNS compares it: labels, ASCII case-folded, length-prefixed so
/// that a label holding a '.' byte cannot pass for two labels.
pub(super) fn name_key(name: &Name) -> Vec<u8> {
    let mut key = Vec::with_capacity(64);
    for label in name.iter() {
        key.push(label.len() as u8);
        key.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    key
}

/// The text `DomainPattern::matches` takes, or None when a label holds a byte no
/// pattern can (a '.' inside a label would otherwise match as a label boundary).
pub(super) fn match_key(labels: &[&[u8]]) -> Option<String> {
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
pub(super) fn display_name(labels: &[&[u8]]) -> String {
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

pub(super) fn qtype_name(qtype: RecordType) -> String {
    match qtype {
        RecordType::Unknown(code) => format!("TYPE{code}"),
        other => other.to_string(),
    }
}

/// The names on a CNAME chain, and the ones it ends at.
#[derive(Debug)]
pub(super) struct Chain {
    pub(super) names: HashSet<Vec<u8>>,
    pub(super) finals: HashSet<Vec<u8>>,
}

/// Follows CNAMEs from `start` through `answers`. Several CNAMEs for one owner (not
/// valid DNS, but possible) fork the chain; every branch ends within the hop limit.
pub(super) fn follow_cnames(start: &Name, answers: &[hickory_proto::rr::Record]) -> Result<Chain, &'static str> {
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

pub(super) fn is_private_v4(v4: Ipv4Addr) -> bool {
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
pub(super) fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
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
pub(super) fn matching_reply(bytes: &[u8], id: u16, question: &Query) -> Option<Message> {
    let (reply, _) = parse_prefix(bytes)?;
    answers(&reply, id, question).then_some(reply)
}

pub(super) fn answers(reply: &Message, id: u16, question: &Query) -> bool {
    reply.id() == id
        && reply.message_type() == MessageType::Response
        && matches!(reply.queries(), [q] if q.query_type() == question.query_type()
            && q.query_class() == question.query_class()
            && name_key(q.name()) == name_key(question.name()))
}
