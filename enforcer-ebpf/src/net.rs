//! Network hooks: `connect4/6` (TCP and UDP connect, TCP Fast Open), `sendmsg4/6`
//! (unconnected UDP), and `sock_create` (raw, ICMP and other protocols).
use aya_ebpf::{bindings::bpf_sock_addr, helpers::generated::bpf_get_socket_cookie};
use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use enforcer_common::{
    DnsOrigin, Net4Key, Net6Key, PolicyConfig, RULE_FAIL_CLOSED, RULE_ISOLATED, SLOT_PREFIX_BITS, action, counter, dns,
    family, hook, mode, proto, verdict,
};

use crate::{
    emit::{Decision, count, count_decision, emit_event},
    maps::{ENF_DNS_ORIG, ENF_LEARN4, ENF_LEARN6, ENF_NET4, ENF_NET6},
    policy::{Governing, RuleVerdict, binding_index, dns_proxy_port, governing_policy, judge_clauses, judge_learned},
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

/// Replies of a redirected DNS socket come from the proxy: show the server it named.
#[cgroup_sock_addr(recvmsg4)]
pub fn enf_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_dns_origin4(&ctx);
    PASS
}

#[cgroup_sock_addr(getpeername4)]
pub fn enf_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_dns_origin4(&ctx);
    PASS
}

#[cgroup_sock_addr(recvmsg6)]
pub fn enf_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_dns_origin6(&ctx);
    PASS
}

#[cgroup_sock_addr(getpeername6)]
pub fn enf_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_dns_origin6(&ctx);
    PASS
}

#[cgroup_sock(sock_create)]
pub fn enf_sock_create(ctx: SockContext) -> i32 {
    let (slot, config, isolated) = match governing_policy() {
        Governing::Policy { slot, config, isolated, .. } => (slot, config, isolated),
        Governing::Broken { slot } => return fail_closed(slot, hook::SOCK_CREATE),
    };
    // SAFETY: the hook's context pointer, valid for the program run.
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
    let rule = RuleVerdict { action: if allowed { action::ALLOW } else { action::DENY }, rule_id: 0 };
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
    let addr = v4_as_connected(addr);
    let key = Key::new(SLOT_PREFIX_BITS + 32, Net4Key { slot, addr });
    let rule = judge_clauses(ENF_NET4.get(&key), port, bit, config.network_default);
    if rule.rule_id != 0 || rule.action != action::DENY {
        return rule;
    }
    // SAFETY: a map lookup; the value stays valid for the program run (RCU), and the verifier checks every access to it.
    let learned = unsafe { ENF_LEARN4.get(&Net4Key { slot: binding_index(), addr }) };
    judge_learned(rule, learned, port, bit)
}

#[inline(always)]
fn judge_sock_addr4(ctx: &SockAddrContext, hook: u8) -> i32 {
    let (slot, config, isolated, dns_port) = match governing_policy() {
        Governing::Policy { slot, config, isolated, dns_port } => (slot, config, isolated, dns_port),
        Governing::Broken { slot } => return fail_closed(slot, hook),
    };
    // SAFETY: the hook's context pointer, valid and writable for the program run (sock_addr hooks may rewrite the address).
    let sa = unsafe { &mut *ctx.sock_addr };
    // user_ip4 and user_port hold network byte order.
    let addr = sa.user_ip4.to_ne_bytes();
    let port = u16::from_be(sa.user_port as u16);
    let protocol = sa.protocol;
    if redirects_dns(dns_port, isolated, port, protocol) {
        let mut origin = DnsOrigin { addr: [0; 16], port, family: family::INET, _pad: [0; 5] };
        origin.addr[..4].copy_from_slice(&addr);
        remember_dns_origin(sa, &origin);
        sa.user_ip4 = u32::from_ne_bytes(LOOPBACK4);
        sa.user_port = dns_port.to_be() as u32;
        count_decision(slot, hook, verdict::ALLOW);
        return PASS;
    }
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
    let (slot, config, isolated, dns_port) = match governing_policy() {
        Governing::Policy { slot, config, isolated, dns_port } => (slot, config, isolated, dns_port),
        Governing::Broken { slot } => return fail_closed(slot, hook),
    };
    // SAFETY: the hook's context pointer, valid and writable for the program run (sock_addr hooks may rewrite the address).
    let sa = unsafe { &mut *ctx.sock_addr };
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
    let mapped = words[0] == 0 && words[1] == 0 && words[2] == u32::from_be(0x0000_ffff);
    if redirects_dns(dns_port, isolated, port, protocol) {
        remember_dns_origin(sa, &DnsOrigin { addr, port, family: family::INET6, _pad: [0; 5] });
        // A mapped destination leaves as IPv4: send it to the proxy's IPv4 socket.
        let proxy = if mapped { LOOPBACK4_MAPPED } else { LOOPBACK6 };
        write_ip6(sa, proxy);
        sa.user_port = dns_port.to_be() as u32;
        count_decision(slot, hook, verdict::ALLOW);
        return PASS;
    }
    let bit = proto_bit(protocol);
    let rule = if mapped {
        // ::ffff:a.b.c.d leaves as IPv4: judge it by the IPv4 rules.
        judge_v4([addr[12], addr[13], addr[14], addr[15]], slot, port, bit, config)
    } else {
        let mut lookup = addr;
        if words[0] == 0 && words[1] == 0 && words[2] == 0 && words[3] == 0 {
            lookup[15] = 1; // :: connects to ::1
        }
        let key = Key::new(SLOT_PREFIX_BITS + 128, Net6Key { slot, addr: lookup });
        let rule = judge_clauses(ENF_NET6.get(&key), port, bit, config.network_default);
        if rule.rule_id != 0 || rule.action != action::DENY {
            rule
        } else {
            // SAFETY: a map lookup; the value stays valid for the program run (RCU), and the verifier checks every access to it.
            let learned = unsafe { ENF_LEARN6.get(&Net6Key { slot: binding_index(), addr: lookup }) };
            judge_learned(rule, learned, port, bit)
        }
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

const LOOPBACK4: [u8; 4] = [127, 0, 0, 1];
const LOOPBACK6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const LOOPBACK4_MAPPED: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];

/// DNS (port 53, TCP or UDP) to any server goes to the cgroup's proxy, which answers
/// only the policy's names. Under the kill switch it is denied like everything else.
#[inline(always)]
fn redirects_dns(dns_port: u16, isolated: bool, port: u16, protocol: u32) -> bool {
    dns_port != 0 && port == dns::PORT && !isolated && (protocol == IPPROTO_UDP || protocol == IPPROTO_TCP)
}

#[inline(always)]
fn remember_dns_origin(sa: &mut bpf_sock_addr, origin: &DnsOrigin) {
    // SAFETY: the helper takes the hook's own context.
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut bpf_sock_addr as *mut _) };
    // If the table refuses, the reply shows the proxy's address and the resolver drops
    // it: the query fails, which is the safe way to fail.
    let _ = ENF_DNS_ORIG.insert(&cookie, origin, 0);
}

#[inline(always)]
fn write_ip6(sa: &mut bpf_sock_addr, addr: [u8; 16]) {
    // Whole-word stores: the verifier only allows 32-bit access to user_ip6.
    sa.user_ip6[0] = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
    sa.user_ip6[1] = u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]);
    sa.user_ip6[2] = u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]);
    sa.user_ip6[3] = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
}

#[inline(always)]
fn restore_dns_origin4(ctx: &SockAddrContext) {
    let dns_port = dns_proxy_port();
    // SAFETY: the hook's context pointer, valid and writable for the program run (sock_addr hooks may rewrite the address).
    let sa = unsafe { &mut *ctx.sock_addr };
    if dns_port == 0 || sa.user_ip4 != u32::from_ne_bytes(LOOPBACK4) || u16::from_be(sa.user_port as u16) != dns_port {
        return;
    }
    // SAFETY: the helper takes the hook's own context.
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut bpf_sock_addr as *mut _) };
    // SAFETY: a map lookup; the value stays valid for the program run (RCU), and the verifier checks every access to it.
    if let Some(origin) = unsafe { ENF_DNS_ORIG.get(&cookie) } {
        if origin.family == family::INET {
            sa.user_ip4 = u32::from_ne_bytes([origin.addr[0], origin.addr[1], origin.addr[2], origin.addr[3]]);
            sa.user_port = origin.port.to_be() as u32;
        }
    }
}

#[inline(always)]
fn restore_dns_origin6(ctx: &SockAddrContext) {
    let dns_port = dns_proxy_port();
    // SAFETY: the hook's context pointer, valid and writable for the program run (sock_addr hooks may rewrite the address).
    let sa = unsafe { &mut *ctx.sock_addr };
    if dns_port == 0 || u16::from_be(sa.user_port as u16) != dns_port || sa.user_ip6[0] != 0 || sa.user_ip6[1] != 0 {
        return;
    }
    let (w2, w3) = (sa.user_ip6[2], sa.user_ip6[3]);
    let from_proxy6 = w2 == 0 && w3 == u32::from_ne_bytes([0, 0, 0, 1]);
    let from_proxy4 = w2 == u32::from_ne_bytes([0, 0, 0xff, 0xff]) && w3 == u32::from_ne_bytes(LOOPBACK4);
    if !from_proxy6 && !from_proxy4 {
        return;
    }
    // SAFETY: the helper takes the hook's own context.
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut bpf_sock_addr as *mut _) };
    // SAFETY: a map lookup; the value stays valid for the program run (RCU), and the verifier checks every access to it.
    if let Some(origin) = unsafe { ENF_DNS_ORIG.get(&cookie) } {
        if origin.family == family::INET6 {
            write_ip6(sa, origin.addr);
        } else {
            // An IPv6 socket sending to a mapped address goes through the IPv4 send
            // hook, which stored the IPv4 form: show it mapped again.
            let a = origin.addr;
            write_ip6(sa, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]);
        }
        sa.user_port = origin.port.to_be() as u32;
    }
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
