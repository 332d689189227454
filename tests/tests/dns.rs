//! DNS-aware egress with real components: a real `dnsmasq` upstream on a loopback
//! address, real `dig`, glibc (`getent`), Python and `curl` as clients. DNS goes to
//! loopback only: "another resolver" is 127.0.0.99 or ::1, where nothing answers, and
//! the glibc clients run in a mount namespace whose resolv.conf names 127.0.0.99, so a
//! broken redirect could not reach the host's real resolver.
use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use enforcer_tests::*;

/// A dnsmasq serving a test zone on `addr`:53, killed on drop.
struct Dnsmasq {
    child: Child,
    addr: String,
}

static NEXT_UPSTREAM: AtomicU32 = AtomicU32::new(0);

impl Dnsmasq {
    /// `records`: dnsmasq options such as `--host-record=api.example.test,127.0.77.10,60`.
    fn start(records: &[String]) -> Self {
        // One address per test (tests run in parallel); all within 127/8.
        let n = 10 + NEXT_UPSTREAM.fetch_add(1, Ordering::Relaxed) + (std::process::id() % 50) * 4;
        let addr = format!("127.0.{}.{}", 53 + n / 250, n % 250 + 2);
        let child = Command::new("dnsmasq")
            .args(["--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--bind-interfaces"])
            .arg(format!("--listen-address={addr}"))
            .args(["--port=53", "--local=/test/", "--user=root", "--pid-file="])
            .args(records)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dnsmasq (apt install dnsmasq-base)");
        let upstream = Self { child, addr };
        // Ready once it answers.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            let out = dig_outside(&upstream.addr, &["probe.example.test"]);
            if out.contains("status:") {
                return upstream;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("dnsmasq on {} did not answer", upstream.addr);
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dig_outside(server: &str, args: &[&str]) -> String {
    let out = Command::new("dig").arg(format!("@{server}")).args(["+time=2", "+tries=1"]).args(args).output_within();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dig` from inside the cgroup.
fn dig_in(cg: &TestCgroup, server: &str, args: &[&str]) -> String {
    let out = command_in(&cg.path, Path::new("/usr/bin/dig"))
        .arg(format!("@{server}"))
        .args(["+time=3", "+tries=1"])
        .args(args)
        .output_within();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status(dig_output: &str) -> &str {
    dig_output
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("no status in dig output:\n{dig_output}"))
}

/// Runs `sh -c script` in the cgroup, in a mount namespace whose /etc/resolv.conf names
/// only 127.0.0.99 (nothing listens there: only the proxy can answer).
fn sh_in_with_loopback_resolver(cg: &TestCgroup, script: &str) -> std::process::Output {
    let conf = TempFile::with("resolv.conf", "nameserver 127.0.0.99\noptions timeout:3 attempts:1\n");
    let wrapped = format!("mount --bind {} /etc/resolv.conf && {script}", conf.arg());
    command_in(&cg.path, Path::new("/usr/bin/unshare"))
        .args(["--mount", "--propagation", "private", "sh", "-c", &wrapped])
        .output_within()
}

/// A tiny HTTP server on `addr`: answers every request with 200 "hello".
fn http_server(addr: &str) -> u16 {
    let listener = TcpListener::bind((addr, 0)).expect("bind http");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().map_while(Result::ok) {
            let mut buf = [0u8; 1024];
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        }
    });
    port
}

fn dns_policy(name: &str, network: &str, dns: &str) -> TempFile {
    TempFile::with(
        "policy.yaml",
        &format!(
            "apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: {name}\nspec:\n  network:\n{network}  dns:\n{dns}"
        ),
    )
}

fn answers(dig_short: &str) -> Vec<String> {
    dig_short.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
}

#[test]
fn allowed_name_resolves_and_opens_its_address_unlisted_name_is_refused() {
    require_root();
    let (web, other) = ("127.0.77.10", "127.0.77.11");
    let port = http_server(web);
    let other_port = http_server(other);
    let up = Dnsmasq::start(&[
        format!("--host-record=api.example.test,{web},300"),
        format!("--host-record=other.example.test,{other},300"),
    ]);
    let cg = TestCgroup::new("dns-basic");
    let p = dns_policy(
        "dns-basic",
        &format!("    allow:\n      - name: api\n        domain: api.example.test\n        ports: [{port}]\n"),
        // log_allowed: allowed queries are events only when asked for, like allowed connects.
        &format!(
            "    upstream: [\"{}:53\"]\n    allow_private_answers: true\n  audit:\n    log_allowed: true\n",
            up.addr
        ),
    );
    let c = Controller::attach(cg.arg(), &p, &[]);

    // Before any answer the address is closed: the rules list no IP.
    let before = [format!("tcp:{web}:{port}")];
    assert_outcomes(&before, &probe_in(&cg.path, &before), &[false]);

    // The query names a server where nothing listens; the proxy answers it.
    let out = dig_in(&cg, "127.0.0.99", &["api.example.test"]);
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(out.contains(web), "{out}");
    assert!(out.contains("SERVER: 127.0.0.99#53"), "dig must see the server it asked: {out}");
    let t = [format!("tcp:{web}:{port}"), format!("tcp:{web}:{other_port}"), format!("tcp:{other}:{other_port}")];
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[true, false, false]);

    let out = dig_in(&cg, "127.0.0.99", &["other.example.test"]);
    assert_eq!(status(&out), "REFUSED", "{out}");
    let t = [format!("tcp:{other}:{other_port}")];
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[false]);

    let denied = c.wait_event("dns-query denied for other.example.test", |e| {
        e["event"]["action"] == "dns-query" && e["dns"]["question"]["name"] == "other.example.test"
    });
    assert_eq!(denied["event"]["type"][0], "denied");
    assert_eq!(denied["event"]["reason"], "not-allowed");
    let allowed = c.wait_event("dns-query allowed for api.example.test", |e| {
        e["event"]["action"] == "dns-query" && e["dns"]["question"]["name"] == "api.example.test"
    });
    assert_eq!(allowed["dns"]["resolved_ip"][0], web);
    assert_eq!(allowed["rule"]["name"], "api");
    assert_eq!(allowed["dns"]["question"]["type"], "A");
}

#[test]
fn queries_to_any_resolver_over_udp_tcp_and_ipv6_reach_the_proxy() {
    require_root();
    let web = "127.0.77.20";
    let up = Dnsmasq::start(&[
        format!("--host-record=api.example.test,{web},300"),
        format!("--host-record=edge.cdn.example.test,{web},300"),
        "--cname=www.example.test,mid.example.test".into(),
        "--cname=mid.example.test,edge.cdn.example.test".into(),
    ]);
    let cg = TestCgroup::new("dns-paths");
    let p = dns_policy(
        "dns-paths",
        "    allow:\n      - domain: api.example.test\n      - domain: www.example.test\n",
        &format!("    upstream: [\"{}:53\"]\n    allow_private_answers: true\n", up.addr),
    );
    let _c = Controller::attach(cg.arg(), &p, &[]);
    // UDP to a made-up server, TCP, IPv6 transport, and the real upstream's own address
    // (asked directly it would answer anything: the proxy must stand in for it too).
    for (server, extra) in [("127.0.0.99", None), ("127.0.0.99", Some("+tcp")), ("::1", None), (up.addr.as_str(), None)]
    {
        let mut args = vec!["+short", "api.example.test"];
        args.extend(extra);
        assert_eq!(answers(&dig_in(&cg, server, &args)), vec![web.to_string()], "@{server} {extra:?}");
        let refused = dig_in(&cg, server, &["other.example.test"].iter().copied().chain(extra).collect::<Vec<_>>());
        assert_eq!(status(&refused), "REFUSED", "@{server} {extra:?}: {refused}");
    }
    // A CNAME chain answers with the chain and opens the final address.
    let out = dig_in(&cg, "127.0.0.99", &["+short", "www.example.test"]);
    assert_eq!(
        answers(&out),
        vec!["mid.example.test.".to_string(), "edge.cdn.example.test.".into(), web.into()],
        "{out}"
    );
    let port = loopback_port(web);
    let t = [format!("tcp:{web}:{port}")];
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[true]);
}

#[test]
fn wildcards_cover_subdomains_not_the_apex_and_deny_rules_win() {
    require_root();
    let ip = "127.0.77.30";
    let up = Dnsmasq::start(&[format!("--address=/cdn.example.test/{ip}")]);
    let cg = TestCgroup::new("dns-wild");
    let p = dns_policy(
        "dns-wild",
        "    allow:\n      - domain: \"*.cdn.example.test\"\n    deny:\n      - domain: bad.cdn.example.test\n",
        &format!("    upstream: [\"{}\"]\n    allow_private_answers: true\n", up.addr),
    );
    let _c = Controller::attach(cg.arg(), &p, &[]);
    for (name, expected) in [
        ("a.cdn.example.test", "NOERROR"),
        ("x.y.cdn.example.test", "NOERROR"),
        ("A.CDN.Example.Test", "NOERROR"),
        ("cdn.example.test", "REFUSED"),
        ("evilcdn.example.test", "REFUSED"),
        ("bad.cdn.example.test", "REFUSED"),
    ] {
        assert_eq!(status(&dig_in(&cg, "127.0.0.99", &[name])), expected, "{name}");
    }
}

#[test]
fn glibc_python_and_curl_resolve_through_the_proxy_and_connect() {
    require_root();
    let web = "127.0.77.40";
    let port = http_server(web);
    let up = Dnsmasq::start(&[format!("--host-record=api.example.test,{web},300")]);
    let cg = TestCgroup::new("dns-clients");
    let p = dns_policy(
        "dns-clients",
        &format!("    allow:\n      - domain: api.example.test\n        ports: [{port}]\n"),
        &format!("    upstream: [\"{}:53\"]\n    allow_private_answers: true\n", up.addr),
    );
    let _c = Controller::attach(cg.arg(), &p, &[]);
    let out = sh_in_with_loopback_resolver(
        &cg,
        "getent hosts api.example.test; echo rc=$?; getent hosts other.example.test; echo rc=$?",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let first: Vec<&str> = text.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(first, [web, "api.example.test"], "{text}");
    assert!(text.trim_end().ends_with("rc=2"), "an unlisted name must not resolve: {text}");

    let python = format!(
        "import socket\nai = socket.getaddrinfo('api.example.test', {port}, socket.AF_INET, socket.SOCK_STREAM)\n\
         s = socket.create_connection(ai[0][4], timeout=3)\ns.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\nprint(s.recv(100).decode().split()[1])\n\
         try:\n    socket.getaddrinfo('other.example.test', 80)\n    print('resolved')\nexcept socket.gaierror:\n    print('refused')\n"
    );
    let script = TempFile::with("client.py", &python);
    let out = sh_in_with_loopback_resolver(&cg, &format!("python3 {}", script.arg()));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>(),
        ["200", "refused"],
        "{out:?}"
    );

    let out = sh_in_with_loopback_resolver(&cg, &format!("curl -sS --max-time 5 http://api.example.test:{port}/"));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello", "{out:?}");
}

#[test]
fn ttl_expiry_closes_the_address_for_new_connects_even_after_kill_9() {
    require_root();
    let (first, second) = ("127.0.77.50", "127.0.77.51");
    let port = http_server(first);
    let second_port = loopback_port(second);
    let up = Dnsmasq::start(&[
        format!("--host-record=short.example.test,{first},2"),
        format!("--host-record=brief.example.test,{second},2"),
    ]);
    let cg = TestCgroup::new("dns-ttl");
    let p = dns_policy(
        "dns-ttl",
        "    allow:\n      - domain: short.example.test\n      - domain: brief.example.test\n",
        &format!("    upstream: [\"{}:53\"]\n    allow_private_answers: true\n    min_ttl: 1s\n", up.addr),
    );
    let mut c = Controller::attach(cg.arg(), &p, &[]);
    let out = dig_in(&cg, "127.0.0.99", &["short.example.test"]);
    assert!(out.contains(first), "{out}");
    let t = [format!("tcp:{first}:{port}")];
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[true]);
    // A connection made before the expiry outlives it: it speaks after the TTL.
    let script = format!(
        "import socket, time\ns = socket.create_connection(('{first}', {port}), timeout=5)\ntime.sleep(4)\n\
         s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\nprint(s.recv(100).decode().split()[1])\n"
    );
    let held = command_in(&cg.path, Path::new("/usr/bin/python3")).args(["-c", &script]).output_within();
    assert_eq!(String::from_utf8_lossy(&held.stdout).trim(), "200", "{held:?}");
    // By now the TTL (2 s) and its 1 s grace have passed: new connects are refused,
    // with the controller alive.
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[false]);

    // The kernel checks the expiry by itself: no controller needed.
    let out = dig_in(&cg, "127.0.0.99", &["brief.example.test"]);
    assert!(out.contains(second), "{out}");
    let t = [format!("tcp:{second}:{second_port}")];
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[true]);
    c.kill9();
    std::thread::sleep(Duration::from_millis(4000));
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[false]);
    // And with the proxy gone, nothing resolves any more (fail closed).
    let out = dig_in(&cg, "127.0.0.99", &["brief.example.test"]);
    assert!(!out.contains("status: NOERROR"), "{out}");
}

#[test]
fn exfiltration_shaped_and_private_answers_are_refused_and_counted() {
    require_root();
    let up = Dnsmasq::start(&["--address=/cdn.example.test/127.0.77.60".into()]);
    let cg = TestCgroup::new("dns-limits");
    let p = dns_policy(
        "dns-limits",
        "    allow:\n      - domain: \"*.cdn.example.test\"\n",
        &format!("    upstream: [\"{}:53\"]\n    max_label_length: 20\n", up.addr),
    );
    let metrics_port = free_port().to_string();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let c = Controller::attach(cg.arg(), &p, &["--metrics-addr", &metrics_addr]);
    let secret = "6c6f6e672d7365637265742d64617461"; // 32 characters of "data"
    let out = dig_in(&cg, "127.0.0.99", &[&format!("{secret}.cdn.example.test")]);
    assert_eq!(status(&out), "REFUSED", "{out}");
    // An allowed name answered with loopback space: refused (private answers off).
    let out = dig_in(&cg, "127.0.0.99", &["ok.cdn.example.test"]);
    assert_eq!(status(&out), "REFUSED", "{out}");
    c.wait_event("label-too-long", |e| e["event"]["reason"] == "label-too-long");
    c.wait_event("private-answer", |e| e["event"]["reason"] == "private-answer");
    let scrape = Command::new("curl").args(["-sS", &format!("http://{metrics_addr}/metrics")]).output_within();
    let text = String::from_utf8_lossy(&scrape.stdout);
    for reason in ["label-too-long", "private-answer"] {
        let line = text
            .lines()
            .find(|l| l.starts_with("enforcer_dns_queries_total") && l.contains(&format!("reason=\"{reason}\"")))
            .unwrap_or_else(|| panic!("no {reason} counter in:\n{text}"));
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(value >= 1.0, "{line}");
    }
    // Nothing was opened.
    let t = ["tcp:127.0.77.60:80"];
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[false]);
}

#[test]
fn a_reload_keeps_addresses_of_kept_rules_and_closes_those_of_removed_ones() {
    require_root();
    let (kept, dropped) = ("127.0.77.70", "127.0.77.71");
    let (kept_port, dropped_port) = (loopback_port(kept), loopback_port(dropped));
    let up = Dnsmasq::start(&[
        format!("--host-record=kept.example.test,{kept},300"),
        format!("--host-record=dropped.example.test,{dropped},300"),
    ]);
    let cg = TestCgroup::new("dns-reload");
    let dns = format!("    upstream: [\"{}:53\"]\n    allow_private_answers: true\n", up.addr);
    let p = dns_policy(
        "dns-reload",
        "    allow:\n      - domain: dropped.example.test\n      - domain: kept.example.test\n",
        &dns,
    );
    let c = Controller::attach(cg.arg(), &p, &[]);
    for name in ["kept.example.test", "dropped.example.test"] {
        assert_eq!(status(&dig_in(&cg, "127.0.0.99", &[name])), "NOERROR", "{name}");
    }
    let t = [format!("tcp:{kept}:{kept_port}"), format!("tcp:{dropped}:{dropped_port}")];
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[true, true]);

    // The kept rule moves from id 2 to id 1; the other rule is gone.
    let reloaded = dns_policy("dns-reload", "    allow:\n      - domain: kept.example.test\n", &dns);
    std::fs::copy(&reloaded.0, &p.0).expect("rewrite the policy");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.child.id() as i32), nix::sys::signal::Signal::SIGHUP);
    let start = Instant::now();
    while !c.stderr_lines.lock().unwrap().iter().any(|l| l.contains("policy reloaded")) {
        assert!(start.elapsed() < Duration::from_secs(10), "no reload");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[true, false]);
    assert_eq!(status(&dig_in(&cg, "127.0.0.99", &["dropped.example.test"])), "REFUSED");
}
