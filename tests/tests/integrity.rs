//! A rule means the same at every moment: while the policy is replaced (reload) and
//! while the agent floods the controller with denials.
use std::{
    net::TcpListener,
    process::Stdio,
    time::{Duration, Instant},
};

use enforcer_tests::*;

/// A policy that denies everything but one unused port, under `name`: two of them with
/// different names make every reload a real replacement (a new slot, a flip, a clear).
fn deny_policy(name: &str, spare_port: u16) -> String {
    format!(
        "apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: {name}\nspec:\n  network:\n    default: deny\n    allow:\n      - ip: 127.0.0.1\n        ports: [{spare_port}]\n  alerts:\n    denial_burst: false\n"
    )
}

/// Runs `enforcer probe flood:...` in the cgroup; returns the child (its stdout piped).
fn flood(cg: &TestCgroup, agent: &std::path::Path, target: &str) -> std::process::Child {
    let mut cmd = command_in(&cg.path, agent);
    cmd.arg("probe").arg(target).stdout(Stdio::piped()).stderr(Stdio::null());
    cmd.spawn().expect("start a flood in the cgroup")
}

/// `passed=N refused=M` of a finished flood.
fn flood_counts(child: std::process::Child) -> (u64, u64) {
    let out = child.wait_with_output().expect("the flood ends");
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let count = |key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in the flood's output: {line:?}"))
    };
    (count("passed="), count("refused="))
}

#[test]
fn reloads_apply_within_a_second_under_a_denial_flood_and_no_connect_slips_through() {
    let cg = TestCgroup::new("reloadstorm");
    // Something listens on the denied port: a connect the kernel wrongly lets out succeeds.
    let listener = TcpListener::bind("127.0.0.1:0").expect("a listener");
    let denied = listener.local_addr().unwrap();
    std::thread::spawn(move || for _stream in listener.incoming() {});
    let spare = free_port();
    let p = TempFile::with("policy.yaml", &deny_policy("storm-a", spare));
    let events = TempFile::empty("events.jsonl");
    let c = Controller::attach_logging_to(cg.arg(), &p, events, &[]);
    let agent = AgentBinary::new();
    let seconds = 20u64;
    // One agent process connects in a tight loop; another floods with denied sends,
    // each of which is an event for the controller.
    let connects = flood(&cg, &agent.path, &format!("flood:tcp:{denied}:{}", seconds * 1000));
    let sends = flood(&cg, &agent.path, &format!("flood:udp:127.0.0.9:9:{}", seconds * 1000));
    std::thread::sleep(Duration::from_secs(2));

    let reloaded = || c.stderr_lines.lock().unwrap().iter().filter(|l| l.contains("policy reloaded")).count();
    let pid = nix::unistd::Pid::from_raw(c.child.id() as i32);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut reloads = 0;
    while started.elapsed() < Duration::from_secs(seconds - 4) {
        let name = if reloads % 2 == 0 { "storm-b" } else { "storm-a" };
        std::fs::write(&p.0, deny_policy(name, spare)).expect("rewrite the policy");
        let before = reloaded();
        let sent = Instant::now();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
        while reloaded() == before {
            assert!(
                sent.elapsed() < Duration::from_secs(1),
                "reload {} was not applied within 1 s under the flood",
                reloads + 1
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        slowest = slowest.max(sent.elapsed());
        reloads += 1;
    }
    let (passed, refused) = flood_counts(connects);
    let (_, sends_refused) = flood_counts(sends);
    eprintln!(
        "{reloads} reloads, the slowest applied in {slowest:?}; {refused} connects refused, {passed} let through; \
         {sends_refused} sends refused"
    );
    assert!(reloads >= 100, "only {reloads} reloads in the storm");
    assert!(refused > 1000 && sends_refused > 10_000, "the floods ran: {refused} connects, {sends_refused} sends");
    assert_eq!(passed, 0, "a denied connect got through while the policy was replaced");
}
