//! `enforcer doctor` on the running kernel: its findings agree with the machine and its
//! choice of backends follows from them.
use enforcer_tests::*;

#[test]
fn doctor_reports_what_loads_and_chooses_backends_from_it() {
    require_root();
    let out = enforcer(&["doctor", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor --json is JSON");
    let check = |name: &str| -> serde_json::Value {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} check in {report}"))
    };
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(check("kernel")["detail"], release.trim());
    assert_eq!(check("cgroup v2")["detail"], format!("mounted at {}", cgroup2_mount().display()));
    // The network tests attach these program types on this kernel, so they must load.
    assert_eq!(check("cgroup/connect4 program")["ok"], true, "{report}");
    assert_eq!(check("cgroup/sock_create program")["ok"], true, "{report}");
    assert_eq!(report["attach"]["network"], "cgroup socket hooks");
    // The file backend follows from what loads: BPF-LSM first, then fanotify.
    let expected = if check("enforcer file programs")["ok"] == true {
        "bpf-lsm"
    } else if check("fanotify")["ok"] == true {
        "fanotify"
    } else {
        "none"
    };
    assert_eq!(report["attach"]["files"], expected, "{report}");
    let table = String::from_utf8(enforcer(&["doctor"]).stdout).unwrap();
    for name in ["kernel", "cgroup v2", "bpffs", "BTF", "active LSMs", "lsm/file_open program", "fanotify"] {
        assert!(table.contains(name), "the table shows {name}:\n{table}");
    }
}
