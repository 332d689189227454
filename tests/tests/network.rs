//! Network enforcement on the running kernel: real cgroups, real sockets, loopback
//! destinations only. Each test has its own cgroup, removed on drop.
use std::{fs, path::Path};

use enforcer_tests::*;

fn allow_one_port(port: u16) -> String {
    format!("    default: deny\n    allow:\n      - name: web\n        cidr: 127.0.0.1/32\n        ports: [{port}]\n")
}

#[test]
fn allowed_tcp_and_udp_pass_denied_get_eperm() {
    let cg = TestCgroup::new("basic");
    let (open, closed) = (loopback_port("127.0.0.1"), loopback_port("127.0.0.1"));
    let p = policy("basic", "enforce", &allow_one_port(open));
    let _c = Controller::attach(cg.arg(), &p, &[]);
    let t = [
        format!("tcp:127.0.0.1:{open}"),
        format!("udp:127.0.0.1:{open}"),
        format!("sendto:127.0.0.1:{open}"),
        format!("tcp:127.0.0.1:{closed}"),
        format!("udp:127.0.0.1:{closed}"),
        format!("sendto:127.0.0.1:{closed}"),
        format!("tcp:127.0.0.2:{open}"),
    ];
    let out = probe_in(&cg.path, &t);
    assert_eq!(out[0], "ok", "allowed TCP connect to a listening server must succeed");
    assert_outcomes(&t, &out, &[true, true, true, false, false, false, false]);
}

#[test]
fn ipv4_mapped_ipv6_is_judged_by_ipv4_rules() {
    let cg = TestCgroup::new("mapped");
    let (open, closed) = (loopback_port("127.0.0.1"), loopback_port("127.0.0.1"));
    let p = policy("mapped", "enforce", &allow_one_port(open));
    let _c = Controller::attach(cg.arg(), &p, &[]);
    let t = [
        format!("tcp:[::ffff:127.0.0.1]:{open}"),
        format!("tcp:[::ffff:127.0.0.1]:{closed}"),
        format!("udp:[::ffff:127.0.0.1]:{closed}"),
        format!("sendto:[::ffff:127.0.0.1]:{closed}"),
    ];
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[true, false, false, false]);
}

#[test]
fn unspecified_address_is_judged_as_loopback() {
    // Linux connects 0.0.0.0 and :: to loopback: they must not bypass a loopback deny.
    let cg = TestCgroup::new("unspec");
    let closed = loopback_port("127.0.0.1");
    let p = policy(
        "unspec",
        "enforce",
        "    default: allow\n    deny:\n      - cidr: 127.0.0.0/8\n      - cidr: ::1/128\n",
    );
    let _c = Controller::attach(cg.arg(), &p, &[]);
    let t = [format!("tcp:0.0.0.0:{closed}"), format!("tcp:[::]:{closed}"), format!("tcp:[::ffff:0.0.0.0]:{closed}")];
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[false, false, false]);
}

#[test]
fn ipv6_rules_apply() {
    let cg = TestCgroup::new("ipv6");
    let (open, closed) = (loopback_port("::1"), loopback_port("::1"));
    let p = policy(
        "ipv6",
        "enforce",
        &format!("    default: deny\n    allow:\n      - cidr: ::1/128\n        ports: [{open}]\n"),
    );
    let _c = Controller::attach(cg.arg(), &p, &[]);
    let t = [
        format!("tcp:[::1]:{open}"),
        format!("sendto:[::1]:{open}"),
        format!("tcp:[::1]:{closed}"),
        format!("udp:[::1]:{closed}"),
        format!("sendto:[::1]:{closed}"),
    ];
    let out = probe_in(&cg.path, &t);
    assert_eq!(out[0], "ok");
    assert_outcomes(&t, &out, &[true, true, false, false, false]);
}

#[test]
fn port_ranges_and_protocols() {
    let cg = TestCgroup::new("ranges");
    let base = 41000u16;
    let p = policy(
        "ranges",
        "enforce",
        &format!(
            "    default: deny\n    allow:\n      - cidr: 127.0.0.1/32\n        ports: [\"{}-{}\"]\n        protocols: [tcp]\n      - cidr: 127.0.0.1/32\n        ports: [{}]\n        protocols: [udp]\n",
            base,
            base + 2,
            base + 10
        ),
    );
    let _c = Controller::attach(cg.arg(), &p, &[]);
    let t = [
        format!("tcp:127.0.0.1:{base}"),
        format!("tcp:127.0.0.1:{}", base + 2),
        format!("tcp:127.0.0.1:{}", base + 3),
        format!("tcp:127.0.0.1:{}", base - 1),
        format!("udp:127.0.0.1:{}", base + 1),
        format!("udp:127.0.0.1:{}", base + 10),
        format!("tcp:127.0.0.1:{}", base + 10),
    ];
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[true, true, false, false, false, true, false]);
}

#[test]
fn deny_wins_over_allow() {
    let cg = TestCgroup::new("denywins");
    let port = loopback_port("127.0.0.1");
    let p = policy(
        "denywins",
        "enforce",
        &format!(
            "    default: deny\n    allow:\n      - cidr: 127.0.0.0/8\n    deny:\n      - name: no-admin\n        cidr: 127.0.0.1/32\n        ports: [{port}]\n"
        ),
    );
    let c = Controller::attach(cg.arg(), &p, &[]);
    let t = [
        format!("tcp:127.0.0.1:{port}"),
        format!("tcp:127.0.0.2:{port}"),
        format!("tcp:127.0.0.1:{}", port.wrapping_add(1).max(1)),
    ];
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[false, true, true]);
    let ev = c.wait_event("denying the admin port", |e| e["event"]["type"][0] == "denied");
    assert_eq!(ev["rule"]["name"], "no-admin", "the deny rule decided: {ev}");
}

#[test]
fn audit_mode_allows_and_reports_would_deny() {
    let cg = TestCgroup::new("audit");
    let port = loopback_port("127.0.0.1");
    let p = policy("audit", "enforce", "    default: deny\n");
    let c = Controller::attach(cg.arg(), &p, &["--mode", "audit"]);
    let t = [format!("tcp:127.0.0.1:{port}")];
    assert_eq!(probe_in(&cg.path, &t), vec!["ok"], "audit mode must not block");
    let ev = c.wait_event("with verdict audit-deny", |e| e["enforcer"]["verdict"] == "audit-deny");
    assert_eq!(ev["destination"]["port"], port);
}

#[test]
fn nested_cgroups_and_forked_children_inherit() {
    let cg = TestCgroup::new("nested");
    let port = loopback_port("127.0.0.1");
    let p = policy("nested", "enforce", "    default: deny\n");
    let _c = Controller::attach(cg.arg(), &p, &[]);
    let grandchild = cg.child("child/grandchild");
    let t = [format!("tcp:127.0.0.1:{port}")];
    assert_eq!(probe_in(&grandchild, &t), vec!["EPERM"], "a grandchild cgroup inherits the policy");
    // A process forked twice inside the cgroup.
    let script = format!("sh -c '{} probe {}'", enforcer_bin().display(), t[0]);
    let out = command_in(&cg.path, Path::new("/bin/sh")).args(["-c", &script]).output_within();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{} EPERM", t[0]));
    // Not confined: the test's own cgroup.
    assert!(allowed(&probe_outside(&t)[0]), "a process outside the cgroup is untouched");
}

#[test]
fn raw_sockets_refused_unless_the_policy_allows_them() {
    let cg = TestCgroup::new("raw");
    let p = policy("raw", "enforce", "    default: deny\n");
    let c = Controller::attach(cg.arg(), &p, &[]);
    assert_eq!(probe_in(&cg.path, &["raw"]), vec!["EPERM"]);
    let ev = c.wait_event("for the raw socket", |e| e["event"]["action"] == "socket-create");
    assert_eq!(ev["network"]["transport"], "raw");
    drop(c);
    let p = policy("raw-ok", "enforce", "    default: deny\n    raw_sockets: true\n");
    let _c = Controller::attach(cg.arg(), &p, &[]);
    assert_eq!(probe_in(&cg.path, &["raw"]), vec!["ok"], "raw_sockets: true allows them (we are root)");
}

#[test]
fn tcp_fast_open_is_judged_like_connect() {
    let cg = TestCgroup::new("tfo");
    let (open, closed) = (loopback_port("127.0.0.1"), loopback_port("127.0.0.1"));
    let p = policy("tfo", "enforce", &allow_one_port(open));
    let _c = Controller::attach(cg.arg(), &p, &[]);
    let t = [format!("tfo:127.0.0.1:{closed}"), format!("tfo:127.0.0.1:{open}")];
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[false, true]);
}

#[test]
fn enforcement_survives_kill_9_and_a_new_attach_takes_over() {
    let cg = TestCgroup::new("kill9");
    let port = loopback_port("127.0.0.1");
    let t = [format!("tcp:127.0.0.1:{port}")];
    let deny = policy("kill9-deny", "enforce", "    default: deny\n");
    let mut c = Controller::attach(cg.arg(), &deny, &[]);
    c.kill9();
    assert_eq!(probe_in(&cg.path, &t), vec!["EPERM"], "enforcement must stay after kill -9");
    assert_eq!(links_pinned(cg.id()), 9, "the nine links stay pinned");
    let allow = policy("kill9-allow", "enforce", &allow_one_port(port));
    let _c2 = Controller::attach(cg.arg(), &allow, &[]);
    assert_eq!(probe_in(&cg.path, &t), vec!["ok"], "the new attach's policy is in force");
    assert_eq!(links_pinned(cg.id()), 9, "old links were replaced, not added to");
    let status = enforcer(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status --json is JSON");
    let mine: Vec<_> = status["attached"].as_array().unwrap().iter().filter(|a| a["cgroup_id"] == cg.id()).collect();
    assert_eq!(mine.len(), 1, "one entry for the cgroup: {status}");
    assert_eq!(mine[0]["policy"], "kill9-allow");
}

#[test]
fn detach_removes_enforcement() {
    let cg = TestCgroup::new("detach");
    let port = loopback_port("127.0.0.1");
    let t = [format!("tcp:127.0.0.1:{port}")];
    let p = policy("detach", "enforce", "    default: deny\n");
    let c = Controller::attach(cg.arg(), &p, &[]);
    drop(c);
    assert_eq!(probe_in(&cg.path, &t), vec!["EPERM"]);
    let out = enforcer(&["detach", "--cgroup", cg.arg()]);
    assert!(out.status.success(), "detach failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(probe_in(&cg.path, &t), vec!["ok"], "after detach the cgroup is free");
    assert_eq!(links_pinned(cg.id()), 0);
    let again = enforcer(&["detach", "--cgroup", cg.arg()]);
    assert!(!again.status.success(), "detaching an unconfined cgroup is an error");
}

#[test]
fn events_carry_ecs_fields() {
    let cg = TestCgroup::new("events");
    let port = loopback_port("127.0.0.1");
    let p = policy("events", "enforce", "    default: deny\n");
    let c = Controller::attach(cg.arg(), &p, &[]);
    let t = [format!("tcp:127.0.0.1:{port}"), format!("sendto:127.0.0.1:{port}")];
    probe_in(&cg.path, &t);
    let ev = c.wait_event("for the denied connect", |e| e["event"]["action"] == "network-connect");
    for (field, value) in [
        ("/event/type/0", serde_json::json!("denied")),
        ("/enforcer/verdict", serde_json::json!("deny")),
        ("/destination/ip", serde_json::json!("127.0.0.1")),
        ("/destination/port", serde_json::json!(port)),
        ("/network/transport", serde_json::json!("tcp")),
        ("/policy/name", serde_json::json!("events")),
        ("/rule/name", serde_json::json!("default")),
        ("/process/name", serde_json::json!("enforcer")),
    ] {
        assert_eq!(ev.pointer(field), Some(&value), "{field} in {ev}");
    }
    assert!(ev["process"]["pid"].as_u64().unwrap() > 0);
    assert!(ev["@timestamp"].as_str().unwrap().starts_with("20"), "{ev}");
    let cg_path = ev["cgroup"]["path"].as_str().unwrap();
    assert!(cg.arg().ends_with(cg_path), "cgroup.path {cg_path} names {}", cg.arg());
    let sendmsg = c.wait_event("for the denied sendto", |e| e["event"]["action"] == "network-sendmsg");
    assert_eq!(sendmsg["network"]["transport"], "udp");
}

#[test]
fn metrics_count_decisions() {
    let cg = TestCgroup::new("metrics");
    let port = loopback_port("127.0.0.1");
    let addr = format!("127.0.0.1:{}", free_port());
    let p = policy("metrics", "enforce", &allow_one_port(port));
    let _c = Controller::attach(cg.arg(), &p, &["--metrics-addr", &addr]);
    let t = [format!("tcp:127.0.0.1:{port}"), format!("tcp:127.0.0.1:{}", port.wrapping_add(1).max(1))];
    probe_in(&cg.path, &t);
    let out = std::process::Command::new("curl").args(["-sf", &format!("http://{addr}/metrics")]).output_within();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "scrape failed: {out:?}");
    let value = |needle: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(needle))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {needle} in:\n{body}"))
    };
    assert!(value(r#"enforcer_decisions_total{hook="connect4",policy="metrics",verdict="allow"}"#) >= 1.0);
    assert!(value(r#"enforcer_decisions_total{hook="connect4",policy="metrics",verdict="deny"}"#) >= 1.0);
    assert!(body.contains("enforcer_policy_info{"), "{body}");
    assert!(body.contains("enforcer_events_lost_total"), "{body}");
}

#[test]
fn run_confines_the_command_as_the_given_user_and_cleans_up() {
    require_root();
    let port = loopback_port("127.0.0.1");
    let closed = loopback_port("127.0.0.1");
    let p = policy("run", "enforce", &allow_one_port(port));
    // The agent runs as nobody: it gets a copy of the binary it may execute.
    let agent_bin = AgentBinary::new();
    let out = std::process::Command::new(enforcer_bin())
        .args(["run", "--policy", p.arg(), "--user", "nobody", "--"])
        .arg("/bin/sh")
        .arg("-c")
        .arg(format!("id -u; {} probe tcp:127.0.0.1:{port} tcp:127.0.0.1:{closed}; exit 7", agent_bin.path.display()))
        .output_within();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "run exits with the command's status; stderr:\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_ne!(lines[0], "0", "the command must not run as root");
    assert_eq!(lines[1], format!("tcp:127.0.0.1:{port} ok"));
    assert_eq!(lines[2], format!("tcp:127.0.0.1:{closed} EPERM"));
    assert!(stderr.contains("\"verdict\":\"deny\""), "denials are reported on stderr:\n{stderr}");
    let leftovers: Vec<_> = fs::read_dir(cgroup2_mount())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("enforcer-run-"))
        .collect();
    assert!(leftovers.is_empty(), "run must remove its cgroup: {leftovers:?}");
}

#[test]
fn a_bad_policy_is_refused_and_the_previous_one_stays() {
    let cg = TestCgroup::new("badpolicy");
    let port = loopback_port("127.0.0.1");
    let t = [format!("tcp:127.0.0.1:{port}")];
    let good = policy("good", "enforce", "    default: deny\n");
    drop(Controller::attach(cg.arg(), &good, &[]));
    let bad = policy("bad", "enforce", "    default: deny\n    allow:\n      - cidr: 127.0.0.1/33\n");
    let out = enforcer(&["attach", "--cgroup", cg.arg(), "--policy", bad.arg()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad policy must be refused");
    assert!(stderr.contains(&format!("{}:10:15: ", bad.arg())), "error names file:line:column:\n{stderr}");
    assert_eq!(probe_in(&cg.path, &t), vec!["EPERM"], "the previous policy stays in force");
    let check = enforcer(&["policy", "check", bad.arg()]);
    assert!(!check.status.success());
}

#[test]
fn pins_left_by_an_incompatible_build_are_refused_and_detach_clears_them() {
    // An upgrade whose map layout changed: the old build's programs still enforce, its
    // maps are pinned with the old layout (here: policy values 8 bytes short).
    let (old, other) = (TestCgroup::new("oldbuild"), TestCgroup::new("newbuild"));
    let port = loopback_port("127.0.0.1");
    let target = [format!("tcp:127.0.0.1:{port}")];
    let deny = policy("deny-all", "enforce", "    default: deny\n");
    // Its controller stopped for the upgrade; its pinned links go on enforcing.
    drop(Controller::attach(old.arg(), &deny, &[]));
    let pinned = Path::new(PIN_ROOT).join("maps/ENF_POLICIES");
    let value_size = size_of::<enforcer_common::PolicyConfig>() as u32;
    fs::remove_file(&pinned).expect("unpin the policy map");
    pin_array_map(&pinned, value_size - 8, enforcer_common::limits::MAX_POLICY_SLOTS);
    assert_eq!(probe_in(&old.path, &target), vec!["EPERM"], "the old programs still enforce");

    let out = enforcer(&["attach", "--cgroup", other.arg(), "--policy", deny.arg()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attach over an incompatible pin must be refused");
    for needed in [
        "ENF_POLICIES",
        "another enforcer build",
        &format!("value {} bytes", value_size - 8),
        &format!("expects type 2, key 4 bytes, value {value_size} bytes"),
        "detach",
    ] {
        assert!(stderr.contains(needed), "missing {needed:?} in:\n{stderr}");
    }
    assert_eq!(links_pinned(other.id()), 0, "nothing of the refused attach stays");
    let status = enforcer(&["status"]);
    assert!(
        !status.status.success() && String::from_utf8_lossy(&status.stderr).contains("another enforcer build"),
        "{status:?}"
    );

    // Detach works with the new build: links first (enforcement ends), then the pins.
    let detach = enforcer(&["detach", "--cgroup", old.arg()]);
    assert!(detach.status.success(), "{detach:?}");
    assert!(!Path::new(PIN_ROOT).join("maps").exists(), "the old build's pins are gone");
    assert_eq!(probe_in(&old.path, &target), vec!["ok"]);
    drop(Controller::attach(other.arg(), &deny, &[]));
    assert_eq!(probe_in(&other.path, &target), vec!["EPERM"], "a new attach works again");
}

#[test]
fn refuses_to_confine_the_root_or_its_own_cgroup() {
    require_root();
    let root = cgroup2_mount();
    let p = policy("root", "enforce", "    default: deny\n");
    let out = enforcer(&["attach", "--cgroup", root.to_str().unwrap(), "--policy", p.arg()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to confine"), "{out:?}");
}

#[test]
fn a_nested_attach_narrows_but_never_escapes_the_parent_policy() {
    let parent = TestCgroup::new("parent");
    let (a, b) = (loopback_port("127.0.0.1"), loopback_port("127.0.0.1"));
    let parent_policy = policy("parent", "enforce", &allow_one_port(a));
    let _p = Controller::attach(parent.arg(), &parent_policy, &[]);
    let child = parent.child("child");
    let child_arg = child.to_str().unwrap();
    // The child's own policy allows both ports; the parent allows only `a`.
    let child_policy = policy(
        "child",
        "enforce",
        &format!("    default: deny\n    allow:\n      - cidr: 127.0.0.1/32\n        ports: [{a}, {b}]\n"),
    );
    let c = Controller::attach(child_arg, &child_policy, &[]);
    let t = [format!("tcp:127.0.0.1:{a}"), format!("tcp:127.0.0.1:{b}")];
    assert_outcomes(&t, &probe_in(&child, &t), &[true, false]);
    drop(c);
    let out = enforcer(&["detach", "--cgroup", child_arg]);
    assert!(out.status.success(), "{out:?}");
    // A child policy that denies `a` narrows the parent's.
    let narrow = policy("narrow", "enforce", "    default: deny\n");
    let _c = Controller::attach(child_arg, &narrow, &[]);
    assert_outcomes(&t[..1], &probe_in(&child, &t[..1]), &[false]);
    assert_outcomes(&t[..1], &probe_in(&parent.path, &t[..1]), &[true]);
    let _ = enforcer(&["detach", "--cgroup", child_arg]);
}

/// Runs `enforcer probe icmp` in the cgroup, inside a private network namespace whose
/// ping_group_range admits root (the kernel checks it before our hook runs; setting it
/// in a namespace of our own leaves the host's setting alone).
fn icmp_probe_in(cgroup: &Path) -> String {
    let script =
        format!("echo '0 0' > /proc/sys/net/ipv4/ping_group_range && exec {} probe icmp", enforcer_bin().display());
    let out =
        command_in(cgroup, Path::new("/usr/bin/unshare")).args(["--net", "/bin/sh", "-c", &script]).output_within();
    assert!(out.status.success(), "icmp probe failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn icmp_sockets_refused_unless_the_policy_allows_them() {
    let cg = TestCgroup::new("icmp");
    let p = policy("icmp", "enforce", "    default: deny\n");
    let c = Controller::attach(cg.arg(), &p, &[]);
    assert_eq!(icmp_probe_in(&cg.path), "icmp EPERM");
    let ev = c.wait_event("for the ICMP socket", |e| e["event"]["action"] == "socket-create");
    assert_eq!(ev["network"]["transport"], "icmp");
    drop(c);
    let p = policy("icmp-ok", "enforce", "    default: deny\n    icmp: true\n");
    let _c = Controller::attach(cg.arg(), &p, &[]);
    assert_eq!(icmp_probe_in(&cg.path), "icmp ok", "icmp: true allows ping sockets");
}

#[test]
fn events_name_the_executable_parent_and_user() {
    let cg = TestCgroup::new("enrich");
    let port = loopback_port("127.0.0.1");
    let p = policy("enrich", "enforce", "    default: deny\n");
    let c = Controller::attach(cg.arg(), &p, &[]);
    // A process that stays alive while the controller enriches its event.
    let script =
        format!("import socket,time\ns=socket.socket()\nprint(s.connect_ex(('127.0.0.1',{port})))\ntime.sleep(3)");
    let mut agent = command_in(&cg.path, Path::new("/usr/bin/python3"))
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ev = c.wait_event("for python's connect", |e| e["destination"]["port"] == port);
    let _ = agent.kill();
    let _ = agent.wait();
    let exe = ev["process"]["executable"].as_str().unwrap_or_else(|| panic!("no executable: {ev}"));
    assert!(exe.contains("python3"), "{ev}");
    assert_eq!(ev["process"]["parent"]["pid"], std::process::id(), "{ev}");
    assert_eq!(ev["user"]["name"], "root");
}

/// A policy of `n` distinct /32 allow rules in 10.0.0.0/8 (never the test's target).
fn many_rules(name: &str, n: u32) -> TempFile {
    let mut yaml = format!(
        "apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: {name}\nspec:\n  network:\n    default: deny\n    allow:\n"
    );
    for i in 0..n {
        yaml.push_str(&format!("      - ip: 10.{}.{}.{}\n", i >> 16, (i >> 8) & 0xff, i & 0xff));
    }
    TempFile::with("big.yaml", &yaml)
}

#[test]
fn a_full_table_refuses_the_new_policy_and_keeps_the_old_one() {
    // Two 60,000-rule policies fill most of the 131,072-prefix IPv4 trie; a third
    // cannot fit and must be refused whole.
    let (a, b, c) = (TestCgroup::new("full-a"), TestCgroup::new("full-b"), TestCgroup::new("full-c"));
    let port = loopback_port("127.0.0.1");
    let target = [format!("tcp:127.0.0.1:{port}")];
    let small = policy("full-c-small", "enforce", &allow_one_port(port));
    drop(Controller::attach(c.arg(), &small, &[]));
    assert_eq!(probe_in(&c.path, &target), vec!["ok"]);
    let big = many_rules("full-big", 60_000);
    drop(Controller::attach(a.arg(), &big, &[]));
    drop(Controller::attach(b.arg(), &big, &[]));
    let out = enforcer(&["attach", "--cgroup", c.arg(), "--policy", big.arg(), "--events", "/dev/null"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a policy that does not fit must be refused");
    assert!(stderr.contains("tables are full") && stderr.contains("previous policy stays in force"), "{stderr}");
    assert_eq!(probe_in(&c.path, &target), vec!["ok"], "the previous policy is still in force");
    let status: serde_json::Value = serde_json::from_slice(&enforcer(&["status", "--json"]).stdout).unwrap();
    let mine = status["attached"].as_array().unwrap().iter().find(|s| s["cgroup_id"] == c.id()).cloned().unwrap();
    assert_eq!(mine["policy"], "full-c-small", "{mine}");
}
