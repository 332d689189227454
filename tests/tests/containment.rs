//! Side doors around a confinement, tried as the agent would: the control plane (the
//! state lock, the kill switch) and the processes of the agent's own user outside its
//! cgroup (ptrace, memory reads, signals, abstract unix sockets), other socket
//! families, and privileges regained through setuid programs.
use std::{
    fs,
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        net::{SocketAddr as UnixAddr, UnixListener},
        process::CommandExt as _,
    },
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use enforcer_tests::*;

/// uid and gid of `nobody` on Debian (and in the VM's /etc/passwd).
const NOBODY: u32 = 65534;

/// Every directory and file under `dir`, with its mode.
fn modes_under(dir: &Path, out: &mut Vec<(String, u32)>) {
    for entry in fs::read_dir(dir).expect("read the state directory").flatten() {
        let meta = fs::symlink_metadata(entry.path()).expect("stat");
        out.push((entry.path().display().to_string(), meta.mode() & 0o7777));
        if meta.is_dir() {
            modes_under(&entry.path(), out);
        }
    }
}

#[test]
fn the_state_is_root_only_and_neither_an_agent_nor_a_stuck_command_delays_the_kill_switch() {
    let cg = TestCgroup::new("killswitch");
    let port = loopback_port("127.0.0.1");
    let target = [format!("tcp:127.0.0.1:{port}")];
    let p = policy("killswitch", "enforce", &format!("    allow:\n      - ip: 127.0.0.1\n        ports: [{port}]\n"));
    let _c = Controller::attach(cg.arg(), &p, &[]);
    assert_eq!(probe_in(&cg.path, &target), ["ok"]);

    let dir = fs::metadata("/run/enforcer").expect("the state directory exists after an attach");
    assert_eq!(dir.mode() & 0o077, 0, "/run/enforcer must be root-only, is {:o}", dir.mode() & 0o7777);
    let mut modes = Vec::new();
    modes_under(Path::new("/run/enforcer"), &mut modes);
    let open: Vec<_> = modes.iter().filter(|(_, m)| m & 0o077 != 0).collect();
    assert!(open.is_empty(), "state files and directories others can open: {open:?}");

    // The agent's user cannot open the lock, so it cannot hold it.
    let as_nobody = Command::new("sh")
        .arg("-c")
        .arg("exec 9</run/enforcer/lock && flock -x -w 1 9 && echo held")
        .uid(NOBODY)
        .gid(NOBODY)
        .output_within();
    assert!(
        !String::from_utf8_lossy(&as_nobody.stdout).contains("held"),
        "an unprivileged process took the state lock: {as_nobody:?}"
    );

    // A command stuck while holding the lock (here: this test) delays neither isolate
    // nor release, and every other command gives up with a clear error in bounded time.
    let holder = Command::new("flock")
        .args(["-x", "-o", "/run/enforcer/lock", "sleep", "60"])
        .stdin(Stdio::null())
        .spawn()
        .expect("flock holds the state lock");
    let mut holder = Reaped(holder);
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let isolate = enforcer(&["isolate", "--cgroup", cg.arg()]);
    assert!(isolate.status.success(), "isolate with the lock held elsewhere: {isolate:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "isolate waited {:?} for the lock", started.elapsed());
    assert_eq!(probe_in(&cg.path, &target), ["EPERM"], "isolated: every connect is denied");
    let release = enforcer(&["release", "--cgroup", cg.arg()]);
    assert!(release.status.success(), "release with the lock held elsewhere: {release:?}");
    assert_eq!(probe_in(&cg.path, &target), ["ok"]);
    let started = Instant::now();
    let revoke = Command::new(enforcer_bin())
        .args(["revoke", "--cgroup", cg.arg(), "--id", "1"])
        .env("ENFORCER_LOCK_WAIT_SECS", "2")
        .output_within();
    let stderr = String::from_utf8_lossy(&revoke.stderr);
    assert!(!revoke.status.success() && stderr.contains("state lock"), "revoke must give up on the lock: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(10), "revoke took {:?}", started.elapsed());
    let _ = holder.0.kill();
}

/// Kills and reaps a helper process when the test ends, also when it fails.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `script` as the agent of `enforcer run --user nobody` under `policy_yaml`'s spec
/// (network allows nothing); returns its stdout lines.
fn run_as_agent(name: &str, spec_extra: &str, script: &str) -> Vec<String> {
    let p = TempFile::with(
        "policy.yaml",
        &format!(
            "apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: {name}\nspec:\n  network:\n    default: deny\n{spec_extra}"
        ),
    );
    let out = Command::new(enforcer_bin())
        .args(["run", "--policy", p.arg(), "--user", "nobody", "--", "/bin/sh", "-c", script])
        .output_within();
    assert!(out.status.success(), "enforcer run: {out:?}");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

#[test]
fn run_keeps_the_agent_from_its_users_other_processes_setuid_and_unjudged_socket_families() {
    require_root();
    let agent_bin = AgentBinary::new();
    // A process of the agent's own user, outside its cgroup.
    let neighbour = Command::new("sleep").arg("60").uid(NOBODY).gid(NOBODY).spawn().expect("start a neighbour");
    let neighbour = Reaped(neighbour);
    let pid = neighbour.0.id();
    // An abstract unix socket made outside the agent (a session bus, a tmux server...).
    let name = format!("enforcer-test-{}", std::process::id());
    let addr = {
        use std::os::linux::net::SocketAddrExt as _;
        UnixAddr::from_abstract_name(name.as_bytes()).expect("abstract address")
    };
    let _listener = UnixListener::bind_addr(&addr).expect("listen on an abstract socket");
    let probes = format!(
        "ptrace:{pid} vm-read:{pid} signal:{pid} unix:@{name} socket:netlink-uevent socket:netlink-route socket:vsock socket:alg"
    );
    let lines = run_as_agent(
        "containment",
        "",
        &format!(
            "grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status | tr -d '\\t '; \
             [ \"$(cut -d' ' -f6 /proc/$$/stat)\" = \"$$\" ] && echo own-session; \
             d=$(mktemp -d) && mkdir $d/a $d/b && echo x > $d/a/f && mv $d/a/f $d/b/f && ln $d/b/f $d/a/g \
               && echo moved-and-linked; rm -rf $d; \
             {} probe {probes}",
            agent_bin.path.display()
        ),
    );
    let has = |line: &str| lines.iter().any(|l| l == line);
    assert!(has("NoNewPrivs:1"), "no_new_privs: setuid programs must not raise the agent's privileges: {lines:?}");
    assert!(has("Seccomp:2"), "the agent runs under a seccomp filter: {lines:?}");
    assert!(has("own-session"), "the agent leads a session of its own (no controlling terminal): {lines:?}");
    assert!(has("moved-and-linked"), "renames and links across directories still work (git needs them): {lines:?}");
    for target in [format!("ptrace:{pid}"), format!("vm-read:{pid}"), format!("signal:{pid}"), format!("unix:@{name}")]
    {
        assert!(has(&format!("{target} EPERM")), "{target} must be refused (EPERM): {lines:?}");
    }
    assert!(has("socket:netlink-uevent EPERM"), "netlink beyond NETLINK_ROUTE is refused: {lines:?}");
    assert!(has("socket:netlink-route ok"), "the C library's name lookups need NETLINK_ROUTE: {lines:?}");
    for family in ["vsock", "alg"] {
        // A kernel without the family says EAFNOSUPPORT; never may the agent get one.
        let line = lines.iter().find(|l| l.starts_with(&format!("socket:{family} "))).expect("a line per probe");
        assert!(line.ends_with("EPERM"), "{family} sockets must be refused: {line}");
    }
}

#[test]
fn a_socket_family_the_policy_lists_is_allowed() {
    require_root();
    let agent_bin = AgentBinary::new();
    let lines = run_as_agent(
        "families",
        "  ipc:\n    families: [alg, netlink]\n",
        &format!("{} probe socket:alg socket:netlink-uevent socket:vsock", agent_bin.path.display()),
    );
    let outcome = |family: &str| {
        lines.iter().find_map(|l| l.strip_prefix(&format!("socket:{family} "))).map(str::to_string).unwrap_or_default()
    };
    assert_ne!(outcome("alg"), "EPERM", "alg is listed: {lines:?}");
    assert_eq!(outcome("netlink-uevent"), "ok", "netlink is listed: {lines:?}");
    assert_eq!(outcome("vsock"), "EPERM", "vsock is not: {lines:?}");
}

#[test]
fn state_files_are_never_written_through_a_symlink() {
    require_root();
    // The state lives in a root-only directory; a leftover symlink where a state file
    // goes (planted before an upgrade tightened the directory) is not followed.
    let cg = TestCgroup::new("symlink");
    let p = policy("symlink", "enforce", "    default: deny\n");
    let decoy = TempFile::with("decoy", "untouched\n");
    let c = Controller::attach(cg.arg(), &p, &[]);
    drop(c);
    let grants = Path::new("/run/enforcer/grants");
    fs::create_dir_all(grants).unwrap();
    fs::set_permissions(grants, fs::Permissions::from_mode(0o700)).unwrap();
    let planted = grants.join(format!("{}.json", cg.id()));
    let _ = fs::remove_file(&planted);
    std::os::unix::fs::symlink(&decoy.0, &planted).expect("plant a symlink");
    let out = enforcer(&["grant", "--cgroup", cg.arg(), "--allow", "127.0.0.1:9", "--ttl", "60s"]);
    let _ = fs::remove_file(&planted);
    assert_eq!(fs::read_to_string(&decoy.0).unwrap(), "untouched\n", "the grant was written through the symlink");
    assert!(!out.status.success(), "a symlinked state file must be refused: {out:?}");
}
