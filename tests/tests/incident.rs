//! Incident response: the kill switch blocks a cgroup's allowed traffic at once,
//! survives a policy re-attach, overrides audit mode, and `release` restores it.
use enforcer_tests::*;

fn frozen(cgroup: &std::path::Path) -> bool {
    std::fs::read_to_string(cgroup.join("cgroup.events")).unwrap().lines().any(|l| l == "frozen 1")
}

#[test]
fn isolate_blocks_allowed_traffic_at_once_and_release_restores_it() {
    let cg = TestCgroup::new("isolate");
    let port = loopback_port("127.0.0.1");
    let t = [format!("tcp:127.0.0.1:{port}"), format!("sendto:127.0.0.1:{port}")];
    let p = policy(
        "isolate",
        "enforce",
        &format!("    default: deny\n    allow:\n      - ip: 127.0.0.1\n        ports: [{port}]\n"),
    );
    let c = Controller::attach(cg.arg(), &p, &[]);
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[true, true]);

    let record = TempFile::empty("isolate.jsonl");
    let out = enforcer(&["isolate", "--cgroup", cg.arg(), "--events", record.arg()]);
    assert!(out.status.success(), "isolate failed: {out:?}");
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[false, false]);
    let ev = c.wait_event("denied by the kill switch", |e| e["rule"]["name"] == "isolated");
    assert_eq!(ev["destination"]["port"], port, "isolation still records where the agent tried to go");
    let status: serde_json::Value = serde_json::from_slice(&enforcer(&["status", "--json"]).stdout).unwrap();
    let mine = status["attached"].as_array().unwrap().iter().find(|a| a["cgroup_id"] == cg.id()).cloned().unwrap();
    assert_eq!(mine["isolated"], true, "{status}");

    // Neither a new policy nor audit mode lifts the kill switch.
    drop(c);
    let _audit = Controller::attach(cg.arg(), &p, &["--mode", "audit"]);
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[false, false]);

    let out = enforcer(&["release", "--cgroup", cg.arg(), "--events", record.arg()]);
    assert!(out.status.success(), "release failed: {out:?}");
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[true, true]);

    let actions: Vec<String> =
        read_events(&record.0).iter().map(|e| e["event"]["action"].as_str().unwrap().to_string()).collect();
    assert_eq!(actions, ["isolate", "release"], "both actions are recorded");
    let verify = enforcer(&["audit", "verify", record.arg()]);
    assert!(verify.status.success(), "the action record is chained: {verify:?}");
}

#[test]
fn isolate_freeze_freezes_the_processes_and_release_thaws_them() {
    let cg = TestCgroup::new("freeze");
    let p = policy("freeze", "enforce", "    default: deny\n");
    let _c = Controller::attach(cg.arg(), &p, &[]);
    let mut sleeper = command_in(&cg.path, std::path::Path::new("/bin/sleep")).arg("30").spawn().unwrap();
    let out = enforcer(&["isolate", "--cgroup", cg.arg(), "--freeze"]);
    assert!(out.status.success(), "{out:?}");
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the record goes to stdout by default");
    assert_eq!(record["enforcer"]["frozen"], true);
    let start = std::time::Instant::now();
    while !frozen(&cg.path) && start.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(frozen(&cg.path), "cgroup.events must report frozen 1");
    let out = enforcer(&["release", "--cgroup", cg.arg()]);
    assert!(out.status.success(), "{out:?}");
    let start = std::time::Instant::now();
    while frozen(&cg.path) && start.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!frozen(&cg.path), "release thaws the cgroup");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn isolating_an_unconfined_cgroup_is_an_error() {
    let cg = TestCgroup::new("unconfined");
    let out = enforcer(&["isolate", "--cgroup", cg.arg()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not confined by enforcer"), "{out:?}");
}

#[test]
fn isolation_refuses_raw_sockets_even_when_the_policy_allows_them() {
    // Raw sockets send without the connect/sendmsg hooks, so isolation refuses them.
    let cg = TestCgroup::new("isolate-raw");
    let p = policy("isolate-raw", "enforce", "    default: deny\n    raw_sockets: true\n");
    let _c = Controller::attach(cg.arg(), &p, &[]);
    assert_eq!(probe_in(&cg.path, &["raw"]), vec!["ok"]);
    assert!(enforcer(&["isolate", "--cgroup", cg.arg()]).status.success());
    assert_eq!(probe_in(&cg.path, &["raw"]), vec!["EPERM"], "isolation overrides raw_sockets: true");
    assert!(enforcer(&["release", "--cgroup", cg.arg()]).status.success());
    assert_eq!(probe_in(&cg.path, &["raw"]), vec!["ok"]);
}

#[test]
fn a_grant_opens_a_denied_destination_until_the_kernel_closes_it() {
    let cg = TestCgroup::new("grant");
    let (port, other) = (loopback_port("127.0.0.1"), loopback_port("127.0.0.1"));
    let t = [format!("tcp:127.0.0.1:{port}"), format!("tcp:127.0.0.1:{other}")];
    let p = policy("grant", "enforce", "    default: deny\n");
    let mut c = Controller::attach(cg.arg(), &p, &[]);
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[false, false]);

    let record = TempFile::empty("grants.jsonl");
    let target = format!("127.0.0.1:{port}");
    let out = enforcer(&[
        "grant",
        "--cgroup",
        cg.arg(),
        "--allow",
        &target,
        "--ttl",
        "3s",
        "--reason",
        "ticket-42",
        "--events",
        record.arg(),
    ]);
    assert!(out.status.success(), "grant failed: {out:?}");
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[true, false]);
    let status: serde_json::Value = serde_json::from_slice(&enforcer(&["status", "--json"]).stdout).unwrap();
    let mine = status["attached"].as_array().unwrap().iter().find(|a| a["cgroup_id"] == cg.id()).cloned().unwrap();
    assert_eq!(mine["grants"][0]["reason"], "ticket-42", "{status}");

    // The kernel closes it at expiry, with no controller running.
    c.kill9();
    std::thread::sleep(std::time::Duration::from_millis(3500));
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[false, false]);

    let actions: Vec<String> =
        read_events(&record.0).iter().map(|e| e["event"]["action"].as_str().unwrap().into()).collect();
    assert_eq!(actions, ["grant"]);
}

#[test]
fn revoke_closes_a_grant_at_once_and_deny_rules_win_over_grants() {
    let cg = TestCgroup::new("revoke");
    let (port, denied) = (loopback_port("127.0.0.1"), loopback_port("127.0.0.1"));
    let p = policy(
        "revoke",
        "enforce",
        &format!("    default: deny\n    deny:\n      - ip: 127.0.0.1\n        ports: [{denied}]\n"),
    );
    let _c = Controller::attach(cg.arg(), &p, &[]);
    let out = enforcer(&["grant", "--cgroup", cg.arg(), "--allow", "127.0.0.0/8", "--ttl", "10m"]);
    assert!(out.status.success(), "grant failed: {out:?}");
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = record["enforcer"]["grant"]["id"].as_u64().unwrap().to_string();
    let t = [format!("tcp:127.0.0.1:{port}"), format!("tcp:127.0.0.1:{denied}")];
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[true, false]);
    let out = enforcer(&["revoke", "--cgroup", cg.arg(), "--id", &id]);
    assert!(out.status.success(), "revoke failed: {out:?}");
    assert_outcomes(&t, &probe_in(&cg.path, &t), &[false, false]);
    let again = enforcer(&["revoke", "--cgroup", cg.arg(), "--id", &id]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("no live grant"), "{again:?}");
}

fn alerts(c: &Controller, action: &str) -> Vec<serde_json::Value> {
    c.events().into_iter().filter(|e| e["event"]["kind"] == "alert" && e["event"]["action"] == action).collect()
}

#[test]
fn alerts_fire_at_their_thresholds_and_not_below() {
    let cg = TestCgroup::new("alerts");
    let (open, closed) = (loopback_port("127.0.0.1"), loopback_port("127.0.0.1"));
    let name = format!("alerts-{}", std::process::id()); // a fresh seen-destinations record
    let p = TempFile::with(
        "alerts.yaml",
        &format!(
            "apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: {name}\nspec:\n  network:\n    allow:\n      - ip: 127.0.0.1\n        ports: [{open}]\n  alerts:\n    denial_burst: {{count: 3, window: 60s}}\n    new_destination: true\n"
        ),
    );
    let c = Controller::attach(cg.arg(), &p, &[]);
    let denied = [format!("tcp:127.0.0.1:{closed}")];
    probe_in(&cg.path, &denied);
    probe_in(&cg.path, &denied);
    c.wait_event("for the 2nd denial", |e| {
        e["enforcer"]["verdict"] == "deny" && e["process"]["pid"] != serde_json::Value::Null
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(alerts(&c, "denial-burst").is_empty(), "2 denials stay below a threshold of 3");
    probe_in(&cg.path, &denied);
    let burst = c.wait_event("the burst alert", |e| e["event"]["action"] == "denial-burst");
    assert_eq!(burst["enforcer"]["alert"]["count"], 3, "{burst}");

    let allowed = [format!("tcp:127.0.0.1:{open}")];
    probe_in(&cg.path, &allowed);
    probe_in(&cg.path, &allowed);
    let first = c.wait_event("the new-destination alert", |e| e["event"]["action"] == "new-destination");
    assert_eq!(first["destination"]["port"], open);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(alerts(&c, "new-destination").len(), 1, "a destination alerts once");
    assert!(
        c.events().iter().all(|e| e["enforcer"]["verdict"] != "allow"),
        "allowed decisions stay out of the sink without log_allowed"
    );
    let _ = std::fs::remove_file(format!("/run/enforcer/seen/{name}.txt"));
}
