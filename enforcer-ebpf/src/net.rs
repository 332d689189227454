//! Network hooks: `connect4/6` (TCP and UDP connect, TCP Fast Open), `sendmsg4/6`
//! (unconnected UDP), and `sock_create` (raw, ICMP and other protocols).
use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use enforcer_common::{
    Net4Key, Net6Key, PolicyConfig, RULE_FAIL_CLOSED, RULE_ISOLATED, SLOT_PREFIX_BITS, action,
    counter, family, hook, mode, proto, verdict,
};

use crate::{
    emit::{Decision, count, count_decision, emit_event},
    maps::{ENF_NET4, ENF_NET6},
    policy::{Governing, RuleVerdict, governing_policy, judge_clauses},
};
use aya_ebpf::maps::lpm_trie::Key;

/// Return values of cgroup socket programs.
const PASS: i32 = 1;
const REJECT: i32 = 0;

const IPPROTO_ICMP: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_ICMPV6: u32 = 58;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;

#[cgroup_sock_addr(connect4)]
pub fn enf_connect4(ctx: SockAddrContext) -> i32 {
    judge_sock_addr4(&ctx, hook::CONNECT4)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn enf_sendmsg4(ctx: SockAddrContext) -> i32 {
    judge_sock_addr4(&ctx, hook::SENDMSG4)
}

#[cgroup_sock_addr(connect6)]
pub fn enf_connect6(ctx: SockAddrContext) -> i32 {
    judge_sock_addr6(&ctx, hook::CONNECT6)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn enf_sendmsg6(ctx: SockAddrContext) -> i32 {
    judge_sock_addr6(&ctx, hook::SENDMSG6)
}

#[cgroup_sock(sock_create)]
pub fn enf_sock_create(ctx: SockContext) -> i32 {
    let (slot, config, isolated) = match governing_policy() {
        Governing::Policy { slot, config, isolated } => (slot, config, isolated),
        Governing::Broken { slot } => return fail_closed(slot, hook::SOCK_CREATE),
    };
    let sk = unsafe { &*ctx.sock };
    let (sock_family, sock_type, protocol) = (sk.family, sk.type_, sk.protocol);
    let plain_tcp_udp = matches!((sock_type, protocol), (SOCK_STREAM, IPPROTO_TCP) | (SOCK_DGRAM, IPPROTO_UDP));
    let allowed = match (sock_type, protocol) {
        _ if plain_tcp_udp => true,
        (SOCK_DGRAM, IPPROTO_ICMP | IPPROTO_ICMPV6) => config.allow_icmp != 0,
        (SOCK_RAW, _) => config.allow_raw_sockets != 0,
        // SCTP, UDP-Lite, MPTCP, ...: their destinations are not judged by our
        // connect/sendmsg rules, so only a default-allow policy lets them through.
        _ => config.network_default == action::ALLOW,
    };
    let rule = RuleVerdict {
        action: if allowed { action::ALLOW } else { action::DENY },
        rule_id: 0,
    };
    // Under isolation plain TCP/UDP sockets may still be made: their connects and sends
    // are denied with the destination on record. Anything else would bypass those hooks.
    finish(
        config,
        isolated && !plain_tcp_udp,
        rule,
        Decision {
            slot,
            rule_id: 0,
            hook: hook::SOCK_CREATE,
            verdict: verdict::ALLOW,
            family: sock_family as u8,
            protocol: protocol as u8,
            port: 0,
            sock_type: sock_type as u16,
            addr: [0; 16],
        },
    )
}

#[inline(always)]
fn fail_closed(slot: u32, hook: u8) -> i32 {
    count(counter::MISSING_POLICY);
    count_decision(slot, hook, verdict::DENY);
    emit_event(&Decision {
        slot,
        rule_id: RULE_FAIL_CLOSED,
        hook,
        verdict: verdict::DENY,
        family: 0,
        protocol: 0,
        port: 0,
        sock_type: 0,
        addr: [0; 16],
    });
    REJECT
}

#[inline(always)]
fn proto_bit(protocol: u32) -> u8 {
    match protocol {
        IPPROTO_TCP => proto::TCP,
        IPPROTO_UDP => proto::UDP,
        _ => 0,
    }
}

/// Linux connects the unspecified address to loopback, so judge it as loopback: a
/// policy that denies 127.0.0.1 must also deny 0.0.0.0.
#[inline(always)]
fn v4_as_connected(addr: [u8; 4]) -> [u8; 4] {
    if addr == [0, 0, 0, 0] { [127, 0, 0, 1] } else { addr }
}

#[inline(always)]
fn judge_v4(addr: [u8; 4], slot: u32, port: u16, bit: u8, config: &PolicyConfig) -> RuleVerdict {
    let key = Key::new(SLOT_PREFIX_BITS + 32, Net4Key { slot, addr: v4_as_connected(addr) });
    judge_clauses(ENF_NET4.get(&key), port, bit, config.network_default)
}

#[inline(always)]
fn judge_sock_addr4(ctx: &SockAddrContext, hook: u8) -> i32 {
    let (slot, config, isolated) = match governing_policy() {
        Governing::Policy { slot, config, isolated } => (slot, config, isolated),
        Governing::Broken { slot } => return fail_closed(slot, hook),
    };
    let sa = unsafe { &*ctx.sock_addr };
    // user_ip4 and user_port hold network byte order.
    let addr = sa.user_ip4.to_ne_bytes();
    let port = u16::from_be(sa.user_port as u16);
    let protocol = sa.protocol;
    let rule = judge_v4(addr, slot, port, proto_bit(protocol), config);
    let mut event_addr = [0u8; 16];
    event_addr[..4].copy_from_slice(&addr);
    finish(
        config,
        isolated,
        rule,
        Decision {
            slot,
            rule_id: 0,
            hook,
            verdict: verdict::ALLOW,
            family: family::INET,
            protocol: protocol as u8,
            port,
            sock_type: sa.type_ as u16,
            addr: event_addr,
        },
    )
}

#[inline(always)]
fn judge_sock_addr6(ctx: &SockAddrContext, hook: u8) -> i32 {
    let (slot, config, isolated) = match governing_policy() {
        Governing::Policy { slot, config, isolated } => (slot, config, isolated),
        Governing::Broken { slot } => return fail_closed(slot, hook),
    };
    let sa = unsafe { &*ctx.sock_addr };
    let mut addr = [0u8; 16];
    // Four 32-bit loads: the verifier only allows whole-word access to user_ip6.
    let words = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
    let mut w = 0;
    while w < 4 {
        let bytes = words[w].to_ne_bytes();
        addr[w * 4] = bytes[0];
        addr[w * 4 + 1] = bytes[1];
        addr[w * 4 + 2] = bytes[2];
        addr[w * 4 + 3] = bytes[3];
        w += 1;
    }
    let port = u16::from_be(sa.user_port as u16);
    let protocol = sa.protocol;
    let bit = proto_bit(protocol);
    let rule = if words[0] == 0 && words[1] == 0 && words[2] == u32::from_be(0x0000_ffff) {
        // ::ffff:a.b.c.d leaves as IPv4: judge it by the IPv4 rules.
        judge_v4([addr[12], addr[13], addr[14], addr[15]], slot, port, bit, config)
    } else {
        let mut lookup = addr;
        if words[0] == 0 && words[1] == 0 && words[2] == 0 && words[3] == 0 {
            lookup[15] = 1; // :: connects to ::1
        }
        let key = Key::new(SLOT_PREFIX_BITS + 128, Net6Key { slot, addr: lookup });
        judge_clauses(ENF_NET6.get(&key), port, bit, config.network_default)
    };
    finish(
        config,
        isolated,
        rule,
        Decision {
            slot,
            rule_id: 0,
            hook,
            verdict: verdict::ALLOW,
            family: family::INET6,
            protocol: protocol as u8,
            port,
            sock_type: sa.type_ as u16,
            addr,
        },
    )
}

/// Applies the kill switch and the mode, counts, emits, and returns the program's
/// answer. Isolation denies even in audit mode: it is the incident responder's call.
#[inline(always)]
fn finish(config: &PolicyConfig, isolated: bool, rule: RuleVerdict, mut decision: Decision) -> i32 {
    let rule = if isolated { RuleVerdict { action: action::DENY, rule_id: RULE_ISOLATED } } else { rule };
    let (outcome, ret) = if isolated {
        (verdict::DENY, REJECT)
    } else if rule.action == action::DENY {
        if config.mode == mode::AUDIT { (verdict::AUDIT_DENY, PASS) } else { (verdict::DENY, REJECT) }
    } else {
        (verdict::ALLOW, PASS)
    };
    decision.verdict = outcome;
    decision.rule_id = rule.rule_id;
    count_decision(decision.slot, decision.hook, outcome);
    // Allowed socket creations are not reported even with log_allowed: every socket
    // makes one, and the connect/sendmsg that follows says what the socket did.
    if outcome != verdict::ALLOW || (config.log_allowed != 0 && decision.hook != hook::SOCK_CREATE) {
        emit_event(&decision);
    }
    ret
}
