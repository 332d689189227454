//! The audit trail end to end: events files written by real controllers are
//! hash-chained across restarts, and `enforcer audit verify` finds an edited record.
use enforcer_tests::*;

#[test]
fn events_file_is_chained_across_restarts_and_tampering_is_caught() {
    let cg = TestCgroup::new("audit-chain");
    let port = loopback_port("127.0.0.1");
    let t = [format!("tcp:127.0.0.1:{port}"), format!("sendto:127.0.0.1:{port}")];
    let p = policy("chain", "enforce", "    default: deny\n");

    let c = Controller::attach(cg.arg(), &p, &[]);
    probe_in(&cg.path, &t);
    c.wait_event("from the first controller", |e| e["event"]["action"] == "network-sendmsg");
    let events = c.stop();
    let first = read_events(&events.0).len();

    // A second controller continues the same file and chain.
    let c = Controller::attach_logging_to(cg.arg(), &p, events, &[]);
    probe_in(&cg.path, &t);
    let total = first + 2;
    c.wait_event("from the second controller", |e| e["chain"]["seq"] == total as u64 - 1);
    let events = c.stop();
    let records = read_events(&events.0);
    assert_eq!(records.len(), total);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["chain"]["seq"], i as u64, "seq numbers run on across the restart: {r}");
    }

    let ok = enforcer(&["audit", "verify", events.arg()]);
    assert!(ok.status.success(), "an untouched log verifies: {ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains(&format!("ok: {total} records")));

    // Rewrite the second record's destination port, as someone hiding a connection would.
    let text = std::fs::read_to_string(&events.0).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[1] = lines[1].replace(&format!("\"port\":{port}"), "\"port\":443");
    std::fs::write(&events.0, lines.join("\n") + "\n").unwrap();
    let bad = enforcer(&["audit", "verify", events.arg()]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "an edited log must fail verification");
    assert!(stderr.contains(&format!("{}:2: record edited", events.arg())), "names the line: {stderr}");
}
