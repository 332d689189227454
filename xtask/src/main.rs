//! Developer tasks: `cargo xtask setup | demo | test | vm-test | bench`. Orchestration
//! only: the eBPF crate is built by aya-build from enforcer/build.rs.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::{Parser, Subcommand};

mod bench;
mod vm;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing needs (apt packages, rust-src, bpf-linker).
    /// Idempotent: present pieces are skipped.
    Setup,
    /// Build the release binary.
    Build,
    /// rustfmt and clippy (-D warnings, with the workspace lints: every unsafe block
    /// has a SAFETY comment) on every crate, the kernel programs included.
    Lint,
    /// Attach policies/default.yaml to a demo cgroup, run a small agent in it that tries
    /// allowed and forbidden destinations on loopback, and print the decisions.
    Demo,
    /// Run the whole test suite: unit tests, the root integration tests against the
    /// running kernel, then the same tests in QEMU on stock kernels (see vm-test).
    Test {
        /// Only integration tests whose name contains this.
        filter: Option<String>,
    },
    /// Run the root integration tests (all but observability) inside QEMU on two stock
    /// Debian cloud kernels, bookworm's 6.1 and trixie's 6.12, where BPF-LSM programs
    /// load. Kernels are downloaded once into ~/.cache/enforcer/vm through a private
    /// apt state; a busybox initramfs with enforcer and the test executables is built
    /// on every run. The guest runs `enforcer doctor`, then the tests; per-kernel
    /// counts are summed. Software emulation: expect several minutes per kernel.
    VmTest {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Measure connect() cost with no programs, an empty program, and enforcer
    /// policies of 10 and 10,000 rules; then events, file opens (fanotify here, BPF-LSM
    /// in QEMU) and DNS.
    Bench {
        /// Iterations per measurement.
        #[arg(long, default_value_t = 20_000)]
        iterations: u32,
        /// Events per second for the event-throughput part.
        #[arg(long, default_value_t = 100_000)]
        event_rate: u64,
    },
    /// Inside the QEMU guest only (`cargo xtask bench` boots it): the BPF-LSM part of
    /// the file-open bench.
    #[command(hide = true)]
    GuestFilesBench {
        #[arg(long, default_value_t = 20_000)]
        iterations: u32,
    },
}

/// Debian packages the build and the tests need.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev", // bpf-linker links against LLVM 22, the LLVM of the nightly rustc
    "curl",        // tests scrape /metrics with a real HTTP client
    "iproute2",
    "python3",
    "prometheus", // a real Prometheus scrapes --metrics-addr in the tests
    "rsyslog",    // a real syslog daemon receives --syslog in the tests
    // DNS tests and bench: a real upstream, real clients, a real load generator
    "dnsmasq-base",
    "bind9-dnsutils",
    "dnsperf",
    // vm-test: boot stock kernels (BPF-LSM) with a busybox initramfs
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils", // Debian's kernel modules are compressed
    "zstd",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A bench worker (this binary re-executed inside a cgroup, on the host or in the
    // QEMU guest) and the guest bench measure; they set nothing up and build nothing.
    match cli.task {
        Task::Bench { iterations, .. } if std::env::var_os("XTASK_BENCH_WORKER").is_some() => {
            return bench::run_worker_here(iterations);
        }
        Task::GuestFilesBench { iterations } => return bench::guest_lsm_files_bench(iterations),
        _ => {}
    }
    std::env::set_current_dir(workspace_root()).context("entering the workspace")?;
    match cli.task {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            build_release()
        }
        Task::Lint => {
            setup()?;
            lint()
        }
        Task::Demo => {
            setup()?;
            build_release()?;
            demo()
        }
        Task::Test { filter } => {
            setup()?;
            test(filter.as_deref())
        }
        Task::VmTest { filter } => {
            setup()?;
            build_release()?;
            let mut tally = Tally::default();
            vm::run_tests(filter.as_deref(), &mut tally)?;
            println!("xtask: {} passed, {} failed", tally.passed, tally.failed);
            ensure!(tally.failed == 0, "{} VM test(s) failed", tally.failed);
            ensure!(tally.passed > 0, "no test ran");
            Ok(())
        }
        Task::Bench { iterations, event_rate } => {
            setup()?;
            build_release()?;
            // The bench re-executes itself as its worker; the rate travels with it.
            // SAFETY: set before any thread is started.
            unsafe { std::env::set_var("XTASK_EVENT_RATE", event_rate.to_string()) };
            bench::run(iterations)
        }
        Task::GuestFilesBench { .. } => unreachable!("handled above"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the workspace").to_path_buf()
}

fn step(msg: &str) {
    eprintln!("\x1b[1m[xtask]\x1b[0m {msg}");
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    ensure!(status.success(), "{shown} failed: {status}");
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        ensure!(is_root(), "apt packages missing ({}): run as root", missing.join(" "));
        step(&format!("installing apt packages: {}", missing.join(" ")));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        // Packages such as prometheus start a daemon on install; the tests run their
        // own instances on loopback, so keep the package's service from starting.
        let _no_services = NoServiceStarts::new()?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        step("installing the nightly toolchain (eBPF programs need build-std)");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let components = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("rustup component list")?;
    let installed = String::from_utf8_lossy(&components.stdout).into_owned();
    for component in ["rust-src", "clippy"] {
        if !installed.lines().any(|l| l.starts_with(component)) {
            step(&format!("adding {component} to nightly (the kernel programs build and lint with it)"));
            run(Command::new("rustup").args(["component", "add", component, "--toolchain", "nightly"]))?;
        }
    }
    for (tool, component) in [("cargo-fmt", "rustfmt"), ("cargo-clippy", "clippy")] {
        if !succeeds(Command::new(tool).arg("--version")) {
            step(&format!("adding {component} to the default toolchain"));
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        step("installing bpf-linker for LLVM 22 (about a minute)");
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX))?;
    }
    step("toolchain ready");
    Ok(())
}

/// A `policy-rc.d` that refuses service starts while it lives. An existing one is left
/// as it is (and in place); only one we created is removed.
struct NoServiceStarts(Option<PathBuf>);

impl NoServiceStarts {
    fn new() -> anyhow::Result<Self> {
        let path = Path::new("/usr/sbin/policy-rc.d");
        if path.exists() {
            return Ok(Self(None));
        }
        std::fs::write(path, "#!/bin/sh\n# created by cargo xtask setup for one apt-get run\nexit 101\n")
            .context("writing /usr/sbin/policy-rc.d")?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self(Some(path.to_path_buf())))
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn build_release() -> anyhow::Result<()> {
    step("building enforcer (release; aya-build compiles the kernel programs)");
    run(Command::new("cargo").args(["build", "--release", "-p", "enforcer"]))
}

/// The release binary, or `ENFORCER_BIN` where it lives elsewhere (the QEMU guest).
fn enforcer_bin() -> PathBuf {
    std::env::var_os("ENFORCER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/enforcer"))
}

/// rustfmt, then clippy with -D warnings: the host crates with the stable toolchain,
/// the kernel programs with nightly for their own target (what aya-build compiles).
fn lint() -> anyhow::Result<()> {
    step("lint: rustfmt");
    run(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
    step("lint: clippy on the host crates (-D warnings)");
    run(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--exclude",
        "enforcer-ebpf",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("lint: clippy on the kernel programs (bpfel-unknown-none, -D warnings)");
    run(Command::new("cargo")
        .args(["+nightly", "clippy", "--target", "bpfel-unknown-none", "-Z", "build-std=core", "--", "-D", "warnings"])
        .current_dir(workspace_root().join("enforcer-ebpf")))
}

fn test(filter: Option<&str>) -> anyhow::Result<()> {
    let mut tally = Tally::default();
    lint()?;
    step("unit tests (no root needed)");
    tally.run(Command::new("cargo").args([
        "test",
        "--workspace",
        "--exclude",
        "enforcer-tests",
        "--exclude",
        "enforcer-ebpf",
    ]))?;
    ensure!(
        is_root(),
        "the integration tests attach BPF programs to cgroups and need root; run `sudo cargo xtask test`"
    );
    build_release()?;
    step("integration tests against the running kernel (root, one at a time)");
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--release", "-p", "enforcer-tests", "--"])
        .args(["--test-threads=1"])
        .env("ENFORCER_BIN", enforcer_bin());
    if let Some(f) = filter {
        cmd.arg(f);
    }
    tally.run(&mut cmd)?;
    step("integration tests in QEMU on stock kernels (BPF-LSM loads there)");
    vm::run_tests(filter, &mut tally)?;
    // One closing line for the whole suite (cargo's own last line is a doc-test run).
    println!("xtask: {} passed, {} failed", tally.passed, tally.failed);
    ensure!(tally.failed == 0, "{} test(s) failed", tally.failed);
    ensure!(tally.passed > 0, "no test ran");
    Ok(())
}

/// Sums cargo's `test result:` lines while passing its output through.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    fn run(&mut self, cmd: &mut Command) -> anyhow::Result<()> {
        let shown = format!("{cmd:?}");
        let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("starting {shown}"))?;
        for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |word: &str| -> u64 {
                    rest.split(';')
                        .find_map(|part| {
                            part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(word)
                        })
                        .and_then(|n| n.trim().parse().ok())
                        .unwrap_or(0)
                };
                self.passed += count(" passed");
                self.failed += count(" failed");
            }
        }
        let status = child.wait()?;
        ensure!(status.success(), "{shown} failed: {status}");
        Ok(())
    }
}

/// Loopback servers the demo agent talks to.
fn start_demo_servers() -> anyhow::Result<()> {
    for port in [8080u16, 8081] {
        let listener = TcpListener::bind(("127.0.0.1", port)).with_context(|| format!("binding 127.0.0.1:{port}"))?;
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut stream = stream;
                let _ = stream.write_all(b"hello from the demo server\n");
            }
        });
    }
    let udp = UdpSocket::bind("127.0.0.1:8053").context("binding 127.0.0.1:8053/udp")?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while udp.recv_from(&mut buf).is_ok() {}
    });
    Ok(())
}

fn demo() -> anyhow::Result<()> {
    ensure!(is_root(), "the demo attaches BPF programs to a cgroup and needs root");
    start_demo_servers()?;
    let targets = [
        ("tcp:127.0.0.1:8080", "allowed: loopback web port 8000-8100"),
        ("tcp:127.0.0.1:8081", "denied: rule no-admin-port wins over the allow"),
        ("udp:127.0.0.1:8053", "allowed: UDP to the same range"),
        ("tcp:127.0.0.2:8080", "denied: not in any allow rule (default deny)"),
        // A loopback stand-in for 169.254.169.254: a broken rule must not let a demo's
        // packet leave the machine.
        ("sendto:127.0.0.169:80", "denied: rule metadata-stand-in (for the cloud metadata address)"),
        ("tcp:[::ffff:127.0.0.1]:8081", "denied: IPv4-mapped IPv6 is judged by the IPv4 rules"),
        ("raw", "denied: no CAP_NET_RAW as nobody; the policy refuses raw sockets even to root"),
    ];
    step("running a demo agent under policies/default.yaml (events on stderr, agent output on stdout)");
    let user = if succeeds(Command::new("id").arg("nobody")) { Some("nobody") } else { None };
    let mut cmd = Command::new(enforcer_bin());
    cmd.args(["run", "--policy", "policies/default.yaml"]);
    if let Some(u) = user {
        cmd.args(["--user", u]);
    }
    // The agent runs as nobody, who may not enter the checkout (/root is 0700): it gets
    // a copy of the binary in a directory anyone can read.
    let agent_dir = std::env::temp_dir().join(format!("enforcer-demo-{}", std::process::id()));
    let agent_bin = agent_dir.join("enforcer");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::create_dir_all(&agent_dir)?;
        std::fs::set_permissions(&agent_dir, std::fs::Permissions::from_mode(0o755))?;
        std::fs::copy(enforcer_bin(), &agent_bin).context("copying enforcer for the demo agent")?;
        std::fs::set_permissions(&agent_bin, std::fs::Permissions::from_mode(0o755))?;
    }
    cmd.arg("--").arg(&agent_bin).arg("probe").args(targets.iter().map(|t| t.0));
    let output = cmd.stderr(Stdio::piped()).stdout(Stdio::piped()).spawn().context("starting enforcer run")?;
    let mut stdout = String::new();
    let mut child = output;
    let stderr = child.stderr.take().expect("piped");
    let events = std::thread::spawn(move || BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<_>>());
    child.stdout.take().expect("piped").read_to_string(&mut stdout)?;
    let status = child.wait()?;
    let _ = std::fs::remove_dir_all(&agent_dir);
    let events = events.join().expect("reader thread");
    println!("\nWhat the agent saw:");
    for (line, (_, why)) in stdout.lines().zip(targets.iter()) {
        println!("  {line:<40} <- {why}");
    }
    println!("\nWhat enforcer reported (ECS JSON events, one per decision):");
    for line in events.iter().filter(|l| l.starts_with('{')) {
        println!("  {line}");
    }
    for line in events.iter().filter(|l| !l.starts_with('{')) {
        eprintln!("  {line}");
    }
    ensure!(status.success(), "enforcer run exited with {status}");
    Ok(())
}

#[allow(dead_code)]
fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !ready() {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
