//! `enforcer doctor`: what this machine offers enforcer, found by trying rather than by
//! guessing: kernel, cgroup v2, bpffs, BTF, the active LSMs, whether each program type
//! actually loads, fanotify, and the backends `attach` would use.
use std::path::Path;

use serde_json::{Value, json};

use crate::{
    bpf::{
        self, ProgramSet,
        programs::{ProbeKind, probe_program_type},
    },
    fanotify::Fanotify,
    host::{self, cgroup},
};

/// One line of the report.
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

fn check(name: &'static str, result: Result<String, String>) -> Check {
    match result {
        Ok(detail) => Check { name, ok: true, detail },
        Err(detail) => Check { name, ok: false, detail },
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Runs every check; `report.checks` in order, then what attach would use.
pub fn run() -> Value {
    let mut checks = vec![
        Check { name: "kernel", ok: true, detail: kernel_release() },
        check(
            "cgroup v2",
            cgroup::cgroup2_mount().map(|p| format!("mounted at {}", p.display())).map_err(|e| e.to_string()),
        ),
        check(
            "bpffs",
            if host::is_bpffs("/sys/fs/bpf") {
                Ok("mounted at /sys/fs/bpf".into())
            } else {
                Err("not mounted at /sys/fs/bpf (attach mounts it)".into())
            },
        ),
        check(
            "BTF",
            if Path::new("/sys/kernel/btf/vmlinux").exists() {
                Ok("/sys/kernel/btf/vmlinux".into())
            } else {
                Err("no /sys/kernel/btf/vmlinux: BPF-LSM needs a kernel built with BTF".into())
            },
        ),
        check(
            "active LSMs",
            match std::fs::read_to_string("/sys/kernel/security/lsm") {
                Ok(list) if list.split(',').any(|l| l.trim() == "bpf") => Ok(list.trim().to_string()),
                Ok(list) => Err(format!("{} (no bpf: add lsm=...,bpf to the kernel command line)", list.trim())),
                Err(_) => Err("securityfs not mounted (mount -t securityfs securityfs /sys/kernel/security)".into()),
            },
        ),
    ];
    let sock_addr = probe_program_type(ProbeKind::CgroupSockAddr);
    let sock = probe_program_type(ProbeKind::CgroupSock);
    let lsm_minimal = probe_program_type(ProbeKind::Lsm);
    // The minimal program says whether the kernel takes LSM programs at all; the real
    // set (14 hooks, with this kernel's offsets) is what attach needs.
    let lsm = lsm_minimal.clone().and_then(|()| ProgramSet::probe_file_programs());
    let fanotify = Fanotify::probe().map(|()| "permission events and filesystem marks available".to_string());
    let network_ok = sock_addr.is_ok() && sock.is_ok() && checks[1].ok;
    let loads = |r: &Result<(), String>| r.clone().map(|()| "loads".to_string());
    checks.push(check("cgroup/connect4 program", loads(&sock_addr)));
    checks.push(check("cgroup/sock_create program", loads(&sock)));
    checks.push(check("lsm/file_open program", loads(&lsm_minimal)));
    checks.push(check("enforcer file programs", loads(&lsm)));
    // Tree changes (create, unlink, rename, ...) are judged by the path_* hooks, which
    // exist only with CONFIG_SECURITY_PATH.
    let path_hooks = bpf::btf::running_kernel().and_then(|kernel| {
        kernel
            .has_func("bpf_lsm_path_mkdir")
            .then(|| "present (CONFIG_SECURITY_PATH)".to_string())
            .ok_or_else(|| "absent: tree changes would not be judged".to_string())
    });
    checks.push(check("LSM path hooks", path_hooks));
    checks.push(check("fanotify", fanotify.clone()));

    let file_backend = if lsm.is_ok() {
        "bpf-lsm"
    } else if fanotify.is_ok() {
        "fanotify"
    } else {
        "none"
    };
    let network_backend = if network_ok { "cgroup socket hooks" } else { "none" };
    json!({
        "checks": checks.iter().map(|c| json!({ "name": c.name, "ok": c.ok, "detail": c.detail })).collect::<Vec<_>>(),
        "attach": {
            "network": network_backend,
            "files": file_backend,
            "files_note": match file_backend {
                "bpf-lsm" => "in the kernel: opens, exec, executable mappings and tree changes; stays in force without a controller",
                "fanotify" => "in the controller: opens and execs only (no tree changes, no mmap exec); ends with the controller",
                _ => "a policy with file rules cannot be attached here",
            },
        },
    })
}

/// The report as a table.
pub fn render(report: &Value) -> String {
    let mut out = String::new();
    for c in report["checks"].as_array().into_iter().flatten() {
        let mark = if c["ok"] == true { "ok  " } else { "NO  " };
        out.push_str(&format!(
            "{mark} {:<28} {}\n",
            c["name"].as_str().unwrap_or(""),
            c["detail"].as_str().unwrap_or("")
        ));
    }
    out.push_str(&format!(
        "\nattach would use: network: {}; files: {} ({})\n",
        report["attach"]["network"].as_str().unwrap_or("?"),
        report["attach"]["files"].as_str().unwrap_or("?"),
        report["attach"]["files_note"].as_str().unwrap_or(""),
    ));
    out
}
