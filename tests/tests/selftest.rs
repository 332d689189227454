//! `enforcer selftest` on the running kernel: it runs its catalogue, reports every
//! vector in the agreed shape, and exits 1 exactly when one is open.
use enforcer_tests::*;

#[test]
fn selftest_reports_every_vector_and_closes_what_this_kernel_can_close() {
    require_root();
    let out = enforcer(&["selftest", "--json"]);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("selftest --json is JSON ({e}): {out:?}"));
    let vectors = report["vectors"].as_array().expect("a vectors array");
    let result = |name: &str| -> String {
        let v = vectors.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no vector {name}: {report}"));
        v["result"].as_str().expect("a result").to_string()
    };
    for v in vectors {
        let r = v["result"].as_str().unwrap_or("");
        assert!(matches!(r, "closed" | "open" | "n/a"), "result {r:?} in {v}");
        assert!(v["reason"].as_str().is_some_and(|s| !s.is_empty()), "every row says why: {v}");
    }
    let open = vectors.iter().filter(|v| v["result"] == "open").count();
    assert_eq!(
        out.status.code(),
        Some(if open == 0 { 0 } else { 1 }),
        "exit 1 exactly when a vector is open: {report}"
    );
    // What every supported kernel closes, whichever file backend it uses.
    for name in [
        "connect-denied-port",
        "ipv4-mapped-ipv6",
        "unspecified-address",
        "tcp-fast-open",
        "udp-connect",
        "udp-sendto",
        "raw-socket",
        "icmp-socket",
        "read-denied-file",
        "symlink-to-denied",
        "proc-fd-reopen",
        "socket-netlink",
        "state-lock",
        "setuid-privileges",
        "terminal-injection",
    ] {
        assert_eq!(result(name), "closed", "{name}: {report}");
    }
    let abi = report["landlock_abi"].as_i64().expect("landlock_abi");
    if abi >= 2 {
        for name in ["ptrace-neighbour", "memory-read-neighbour"] {
            assert_eq!(result(name), "closed", "{name} with Landlock ABI {abi}: {report}");
        }
    }
    if abi >= 6 {
        for name in ["signal-neighbour", "abstract-unix-socket"] {
            assert_eq!(result(name), "closed", "{name} with Landlock ABI {abi}: {report}");
        }
    }
    if report["backend"] == "bpf-lsm" {
        assert_eq!(result("hard-link-to-denied"), "closed", "BPF-LSM judges links: {report}");
    }
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
}
