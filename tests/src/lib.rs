//! Harness for the root integration tests: test cgroups and controllers that clean up
//! on drop (also when a test panics), a probe runner that joins a cgroup before exec,
//! and loopback servers. Traffic goes to loopback only.
use nix::sys::signal::Signal;
use std::{
    ffi::CString,
    fs,
    io::{BufRead as _, BufReader},
    net::{TcpListener, UdpSocket},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub const PIN_ROOT: &str = "/sys/fs/bpf/enforcer";

pub fn enforcer_bin() -> PathBuf {
    match std::env::var_os("ENFORCER_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/enforcer"),
    }
}

/// A copy of the enforcer binary that any user can run, for agents started as an
/// unprivileged user (`run --user nobody`): the checkout may sit in a directory only
/// root can enter (/root, a 0700 temporary directory). Removed on drop.
pub struct AgentBinary {
    pub path: PathBuf,
}

impl AgentBinary {
    pub fn new() -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(unique("bin"));
        fs::create_dir_all(&dir).expect("a directory for the binary");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod the directory");
        let path = dir.join("enforcer");
        fs::copy(enforcer_bin(), &path).expect("copy the enforcer binary");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod the copy");
        Self { path }
    }
}

impl Default for AgentBinary {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AgentBinary {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// These tests attach BPF programs: without root they cannot say anything, so they fail
/// loudly instead of passing silently.
pub fn require_root() {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    assert!(root, "integration tests need root (run `sudo cargo xtask test`)");
    assert!(enforcer_bin().exists(), "no enforcer binary at {} (run `cargo xtask test`)", enforcer_bin().display());
}

pub fn cgroup2_mount() -> PathBuf {
    enforcer_common::host::cgroup2_mount().expect("a cgroup v2 mount")
}

/// Sends `sig` to a child controller.
fn signal(child: &Child, sig: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique(name: &str) -> String {
    format!("enforcer-test-{name}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A cgroup this test created. On drop: its programs are detached, its processes
/// killed, and it and its children removed.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        require_root();
        let path = cgroup2_mount().join(unique(name));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path }
    }

    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        p
    }

    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        fs::metadata(&self.path).expect("cgroup exists").ino()
    }

    pub fn arg(&self) -> &str {
        self.path.to_str().expect("utf-8 path")
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..50 {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // No panic here: this may run while a failed test unwinds.
        if let Ok(mut detach) = Command::new(enforcer_bin())
            .args(["detach", "--cgroup", self.arg()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            if !wait_or_kill(&mut detach, command_deadline()) {
                eprintln!("enforcer detach --cgroup {} hung; killed it", self.arg());
            }
        }
        remove_tree(&self.path);
    }
}

/// A temporary file removed on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn with(name: &str, contents: &str) -> Self {
        let path = std::env::temp_dir().join(unique(name));
        fs::write(&path, contents).expect("write temp file");
        Self(path)
    }
    pub fn empty(name: &str) -> Self {
        Self::with(name, "")
    }
    pub fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A policy document with the given `spec.network` body (indented 4 spaces).
pub fn policy(name: &str, mode: &str, network: &str) -> TempFile {
    TempFile::with(
        "policy.yaml",
        &format!(
            "apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: {name}\nspec:\n  mode: {mode}\n  network:\n{network}"
        ),
    )
}

/// A running `enforcer attach`; SIGTERM on drop.
pub struct Controller {
    pub child: Child,
    pub events: TempFile,
    pub stderr_lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Controller {
    pub fn attach(cgroup: &str, policy: &TempFile, extra: &[&str]) -> Self {
        Self::attach_logging_to(cgroup, policy, TempFile::empty("events.jsonl"), extra)
    }

    /// Like `attach`, with events appended to a file the caller chose.
    pub fn attach_logging_to(cgroup: &str, policy: &TempFile, events: TempFile, extra: &[&str]) -> Self {
        Self::attach_watching(cgroup, policy, events, extra, |_| {})
    }

    /// `attach_logging_to`, with `watch` called on every line the controller logs (as
    /// it logs it: a test can act between two steps of the attach).
    pub fn attach_watching(
        cgroup: &str,
        policy: &TempFile,
        events: TempFile,
        extra: &[&str],
        mut watch: impl FnMut(&str) + Send + 'static,
    ) -> Self {
        let mut child = Command::new(enforcer_bin())
            .args(["attach", "--cgroup", cgroup, "--policy", policy.arg(), "--events", events.arg()])
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start enforcer attach");
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr_lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = stderr_lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                watch(&line);
                // The controller's INFO line, not an error that mentions "attached".
                if line.contains("INFO") && line.contains(" attached") {
                    let _ = tx.send(());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut controller = Self { child, events, stderr_lines };
        // Longer under software emulation (the VM tests), where verification is slow.
        let secs = command_deadline().as_secs();
        if rx.recv_timeout(command_deadline()).is_err() {
            let status = controller.child.try_wait();
            panic!(
                "enforcer attach did not report 'attached' within {secs} s (exit: {status:?}); stderr:\n{}",
                controller.stderr_lines.lock().unwrap().join("\n")
            );
        }
        controller
    }

    /// Stops the controller (SIGTERM) and hands back its events file.
    pub fn stop(mut self) -> TempFile {
        signal(&self.child, Signal::SIGTERM);
        assert!(wait_or_kill(&mut self.child, command_deadline()), "enforcer attach did not exit on SIGTERM");
        std::mem::replace(&mut self.events, TempFile(PathBuf::new()))
    }

    pub fn kill9(&mut self) {
        signal(&self.child, Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Events written so far, parsed.
    pub fn events(&self) -> Vec<serde_json::Value> {
        read_events(&self.events.0)
    }

    /// Waits until an event satisfies `pred` (events are written asynchronously).
    pub fn wait_event(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                return e;
            }
            if start.elapsed() > Duration::from_secs(5) {
                panic!("expected an event {what}; got:\n{}", fs::read_to_string(&self.events.0).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        // Only signal a child not yet reaped: a reaped pid may belong to someone else.
        if let Ok(None) = self.child.try_wait() {
            signal(&self.child, Signal::SIGTERM);
            if !wait_or_kill(&mut self.child, command_deadline()) {
                eprintln!("enforcer attach (pid {}) ignored SIGTERM; killed it", self.child.id());
            }
        }
    }
}

/// Waits for `child` up to `deadline`, then SIGKILLs and reaps it. False when it had
/// to be killed.
pub fn wait_or_kill(child: &mut Child, deadline: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < deadline {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

pub fn read_events(path: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event line is not JSON ({e}): {l}")))
        .collect()
}

/// Runs a command with its first instruction already inside `cgroup`.
pub fn command_in(cgroup: &Path, program: &Path) -> Command {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes()).expect("path");
    let mut cmd = Command::new(program);
    // SAFETY: open/write/close only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
    cmd
}

fn parse_probe<S: AsRef<str>>(output: Output, targets: &[S]) -> Vec<String> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "probe failed: {:?}\n{}", output.status, String::from_utf8_lossy(&output.stderr));
    let outcomes: Vec<String> =
        stdout.lines().map(|l| l.rsplit_once(' ').map(|(_, o)| o.to_string()).unwrap_or_default()).collect();
    assert_eq!(outcomes.len(), targets.len(), "one probe line per target, got:\n{stdout}");
    outcomes
}

/// Probes `targets` from a process inside `cgroup`; returns one outcome per target
/// (`ok`, `EPERM`, `ECONNREFUSED`, ...).
pub fn probe_in<S: AsRef<str>>(cgroup: &Path, targets: &[S]) -> Vec<String> {
    let out = command_in(cgroup, &enforcer_bin()).arg("probe").args(targets.iter().map(AsRef::as_ref)).output_within();
    parse_probe(out, targets)
}

/// Probes from the test's own cgroup (not confined).
pub fn probe_outside<S: AsRef<str>>(targets: &[S]) -> Vec<String> {
    let out = Command::new(enforcer_bin()).arg("probe").args(targets.iter().map(AsRef::as_ref)).output_within();
    parse_probe(out, targets)
}

/// The kernel let the operation out (a refused TCP connect reached the peer).
pub fn allowed(outcome: &str) -> bool {
    outcome == "ok" || outcome == "ECONNREFUSED"
}

/// Asserts each outcome against the expectation (`true` = allowed, `false` = EPERM).
pub fn assert_outcomes<S: AsRef<str>>(targets: &[S], outcomes: &[String], expected: &[bool]) {
    for ((t, o), &e) in targets.iter().map(AsRef::as_ref).zip(outcomes).zip(expected) {
        if e {
            assert!(allowed(o), "{t}: expected the kernel to allow it, got {o}");
        } else {
            assert_eq!(o, "EPERM", "{t}: expected EPERM, got {o}");
        }
    }
}

/// A TCP and a UDP listener on the same free loopback port; served until the process
/// exits.
pub fn loopback_port(ip: &str) -> u16 {
    let tcp = TcpListener::bind((ip, 0)).expect("bind tcp");
    let port = tcp.local_addr().unwrap().port();
    let udp = UdpSocket::bind((ip, port)).ok();
    std::thread::spawn(move || {
        for s in tcp.incoming() {
            drop(s);
        }
    });
    if let Some(udp) = udp {
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while udp.recv_from(&mut buf).is_ok() {}
        });
    }
    port
}

/// A loopback TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0)).expect("bind").local_addr().expect("addr").port()
}

pub fn enforcer(args: &[&str]) -> Output {
    Command::new(enforcer_bin()).args(args).output_within()
}

/// How long a command a test runs may take before the test fails (longer in the VM
/// tests, where verification under software emulation is slow).
pub fn command_deadline() -> Duration {
    let secs = std::env::var("ENFORCER_TEST_ATTACH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    Duration::from_secs(secs)
}

/// `Command::output` with a deadline: a command that hangs (an attach that should have
/// been refused and stays up as a controller, say) fails its test with what it printed
/// instead of stalling the whole suite.
pub trait OutputWithin {
    fn output_within(&mut self) -> Output;
}

impl OutputWithin for Command {
    fn output_within(&mut self) -> Output {
        let what = format!("{self:?}");
        let mut child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let (stdout, out_reader) = drain(child.stdout.take());
        let (stderr, err_reader) = drain(child.stderr.take());
        let deadline = command_deadline();
        if !wait_or_kill(&mut child, deadline) {
            let text = |b: &SharedBytes| String::from_utf8_lossy(&b.lock().unwrap()).into_owned();
            panic!(
                "{what} did not finish within {deadline:?}; killed it. stdout:\n{}\nstderr:\n{}",
                text(&stdout),
                text(&stderr)
            );
        }
        let status = child.wait().unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
        let _ = (out_reader.join(), err_reader.join());
        let take = |b: SharedBytes| std::mem::take(&mut *b.lock().unwrap());
        Output { status, stdout: take(stdout), stderr: take(stderr) }
    }
}

type SharedBytes = std::sync::Arc<std::sync::Mutex<Vec<u8>>>;

/// Reads a pipe as it fills, so a command killed at its deadline still shows what it
/// printed.
fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> (SharedBytes, std::thread::JoinHandle<()>) {
    let seen = SharedBytes::default();
    let sink = seen.clone();
    let reader = std::thread::spawn(move || {
        let Some(mut pipe) = pipe else { return };
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = pipe.read(&mut buf) {
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    (seen, reader)
}

pub fn links_pinned(cgroup_id: u64) -> usize {
    fs::read_dir(Path::new(PIN_ROOT).join("cgroups").join(cgroup_id.to_string())).map(|d| d.count()).unwrap_or(0)
}

/// Pins a fresh BPF array map (4-byte keys) at `path`: the raw `bpf(2)` calls, so a
/// test can leave behind what another build of enforcer would have pinned.
pub fn pin_array_map(path: &Path, value_size: u32, max_entries: u32) {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        rest: [u32; 28],
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_MAP_CREATE: i64 = 0;
    const BPF_OBJ_PIN: i64 = 6;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let create = MapCreate { map_type: BPF_MAP_TYPE_ARRAY, key_size: 4, value_size, max_entries, rest: [0; 28] };
    // SAFETY: bpf(2) reads a `MapCreate` of the size given, which outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, &create, size_of::<MapCreate>()) };
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let pin = ObjPin { pathname: c_path.as_ptr() as u64, bpf_fd: fd as u32, file_flags: 0 };
    // SAFETY: bpf(2) reads an `ObjPin` whose path pointer (`c_path`) outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, &pin, size_of::<ObjPin>()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closes the map fd this function created; nothing else holds it.
    unsafe { libc::close(fd as i32) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN {}: {err}", path.display());
}
