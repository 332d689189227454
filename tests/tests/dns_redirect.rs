//! The kernel side of DNS-aware egress with no tools but our own, so that it also runs
//! in the VM on stock kernels: port-53 traffic to any address reaches the proxy, and
//! the replies show the server the agent asked (recvmsg for unconnected UDP,
//! getpeername for TCP). The upstream is a tiny responder in this process on loopback.
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, UdpSocket},
    time::Duration,
};

use enforcer_tests::*;

/// Answers every A query with `answer` (TTL 60), over UDP and TCP on one loopback port.
fn responder(answer: [u8; 4]) -> u16 {
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let port = udp.local_addr().unwrap().port();
    let tcp = TcpListener::bind(("127.0.0.1", port)).expect("bind tcp");
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            if let Some(reply) = reply_to(&buf[..n], answer) {
                let _ = udp.send_to(&reply, peer);
            }
        }
    });
    std::thread::spawn(move || {
        for mut s in tcp.incoming().map_while(Result::ok) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
            let mut len = [0u8; 2];
            if s.read_exact(&mut len).is_err() {
                continue;
            }
            let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
            if s.read_exact(&mut query).is_err() {
                continue;
            }
            if let Some(reply) = reply_to(&query, answer) {
                let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&reply);
                let _ = s.write_all(&framed);
            }
        }
    });
    port
}

/// The query with QR/RA set and one A record for its question (a pointer to it).
fn reply_to(query: &[u8], answer: [u8; 4]) -> Option<Vec<u8>> {
    if query.len() < 17 {
        return None;
    }
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += 1 + query[end] as usize;
    }
    let question_end = end + 5;
    let mut reply = query.get(..question_end)?.to_vec();
    reply[2] = 0x81;
    reply[3] = 0x80;
    reply[6..8].copy_from_slice(&[0, 1]); // ANCOUNT 1
    reply[8..12].copy_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    reply.extend_from_slice(&answer);
    Some(reply)
}

#[test]
fn dns_to_any_server_reaches_the_proxy_and_replies_show_the_server_asked() {
    let cg = TestCgroup::new("dns-redirect");
    let web = [127, 0, 78, 10];
    let upstream = responder(web);
    let web_port = loopback_port("127.0.78.10");
    let p = policy(
        "dns-redirect",
        "enforce",
        &format!(
            "    allow:\n      - domain: probe.example.test\n  dns:\n    upstream: [\"127.0.0.1:{upstream}\"]\n    allow_private_answers: true\n"
        ),
    );
    let _c = Controller::attach(cg.arg(), &p, &[]);
    let t = [
        format!("tcp:127.0.78.10:{web_port}"),
        "dns-udp:probe.example.test@127.0.0.99:53".to_string(),
        "dns-udp:other.example.test@127.0.0.99:53".to_string(),
        "dns-tcp:probe.example.test@127.0.0.99:53".to_string(),
        "dns-udp:probe.example.test@[::1]:53".to_string(),
        "dns-udp:probe.example.test@[::ffff:127.0.0.99]:53".to_string(),
        "dns-tcp:probe.example.test@[::1]:53".to_string(),
        format!("tcp:127.0.78.10:{web_port}"),
    ];
    let out = probe_in(&cg.path, &t);
    assert_eq!(out[0], "EPERM", "the address is closed before it is resolved");
    assert_eq!(&out[1..7], ["ok", "REFUSED", "ok", "ok", "ok", "ok"], "{t:?}");
    assert!(allowed(&out[7]), "the answer opened the address: {}", out[7]);
}

#[test]
fn without_dns_rules_port_53_is_judged_like_any_port() {
    let cg = TestCgroup::new("dns-plain");
    let p = policy("dns-plain", "enforce", "    default: deny\n");
    let _c = Controller::attach(cg.arg(), &p, &[]);
    let t = ["dns-udp:probe.example.test@127.0.0.99:53", "dns-tcp:probe.example.test@127.0.0.99:53"];
    assert_eq!(probe_in(&cg.path, &t), ["EPERM", "EPERM"]);
}
