//! `cargo xtask bench`: connect() cost on loopback under four setups, each in its own
//! cgroup and all in place at once, measured in interleaved rounds and reported as
//! medians with ratios against the baselines of the same run:
//! 1. no programs;
//! 2. an empty program (`return 1`) on connect4;
//! 3. enforcer with a 10-rule policy;
//! 4. enforcer with a 10,000-rule policy.
//!
//! Then event throughput, file opens (fanotify on this machine, BPF-LSM in a QEMU guest
//! on stock kernels) and DNS (`dns_bench`). The worker (this binary, re-executed) joins
//! a setup's cgroup before exec.
use std::{
    ffi::CString,
    fs,
    io::Write as _,
    net::{TcpListener, TcpStream, UdpSocket},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

// A sibling file, kept beside bench.rs rather than under bench/.
#[path = "dns_bench.rs"]
mod dns_bench;

const ROUNDS: usize = 5;

/// The worker named by `XTASK_BENCH_WORKER`, in the cgroup it was started in.
pub fn run_worker_here(iterations: u32) -> anyhow::Result<()> {
    let kind = std::env::var("XTASK_BENCH_WORKER").context("XTASK_BENCH_WORKER")?;
    worker(&kind, iterations)
}

pub fn run(iterations: u32) -> anyhow::Result<()> {
    ensure!(super::is_root(), "the benchmark attaches BPF programs and needs root");
    let mount = cgroup2_mount()?;
    // XTASK_BENCH_ONLY=files|files-native|files-vm|dns runs only that part (developers
    // iterating on it); `files` is both file backends.
    match std::env::var("XTASK_BENCH_ONLY").as_deref() {
        Ok("files") => return files_bench(&mount).and_then(|()| super::vm::run_files_bench()),
        Ok("files-native") => return files_bench(&mount),
        Ok("files-vm") => return super::vm::run_files_bench(),
        Ok("dns") => return dns_bench::dns_bench(&mount),
        Ok(other) => bail!("XTASK_BENCH_ONLY={other}: expected files, files-native, files-vm or dns"),
        Err(_) => {}
    }
    let base = mount.join(format!("enforcer-bench-{}", std::process::id()));
    let cgroups: Vec<PathBuf> = SETUPS.iter().map(|(name, _)| base.join(name)).collect();
    for cg in &cgroups {
        fs::create_dir_all(cg).with_context(|| format!("creating {}", cg.display()))?;
    }
    let stats = BpfStats::set(true)?;
    let result = measure_all(&cgroups, iterations);
    drop(stats);
    for cg in &cgroups {
        detach(cg);
        let _ = fs::remove_dir(cg);
    }
    let _ = fs::remove_dir(&base);
    let rows = result?;
    report(&rows);
    events_bench(&mount)?;
    files_bench(&mount)?;
    super::vm::run_files_bench()?;
    dns_bench::dns_bench(&mount)
}

fn detach(cgroup: &Path) {
    let _ = Command::new(super::enforcer_bin()).args(["detach", "--cgroup"]).arg(cgroup).stderr(Stdio::null()).status();
}

/// Directories between the bench tree's root and the opened file.
const FILE_DEPTH: usize = 8;

/// The file-open bench's files: a file FILE_DEPTH directories below `root/tree`, and
/// policies that allow reading `root/tree` among `rules` read rules.
struct FileBenchTree {
    root: PathBuf,
    file: PathBuf,
}

impl FileBenchTree {
    fn create(root: &Path) -> anyhow::Result<Self> {
        let mut deep = root.join("tree");
        for i in 0..FILE_DEPTH {
            deep.push(format!("d{i}"));
        }
        fs::create_dir_all(&deep).with_context(|| format!("creating {}", deep.display()))?;
        let file = deep.join("file");
        fs::write(&file, "x")?;
        Ok(Self { root: root.to_path_buf(), file })
    }

    /// A policy of `rules` read rules (the tree and `rules - 1` other directories),
    /// written beside the tree.
    fn policy(&self, rules: usize) -> anyhow::Result<PathBuf> {
        let mut yaml = String::from(
            "apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: bench-files\nspec:\n  network:\n    default: allow\n  files:\n    default: allow\n    read:\n",
        );
        yaml.push_str(&format!("      - {}\n", self.root.join("tree").display()));
        for i in 1..rules {
            let other = self.root.join("other").join(format!("r{i}"));
            fs::create_dir_all(&other)?;
            yaml.push_str(&format!("      - {}\n", other.display()));
        }
        let path = self.root.join(format!("policy-{rules}.yaml"));
        fs::write(&path, yaml)?;
        Ok(path)
    }

    /// ns per open+close of the file, from a worker in `cgroup`.
    fn measure(&self, cgroup: &Path, iterations: u32) -> anyhow::Result<f64> {
        let mut cmd = worker_command("open", cgroup, iterations)?;
        cmd.env("XTASK_BENCH_FILE", &self.file);
        worker_output(cmd)?.trim().parse().context("worker output")
    }
}

/// open+close of a file 8 directories deep under a read-allowed tree, with no enforcer,
/// then with policies of 10 and 1,000 file rules, interleaved over rounds. The backend
/// is whatever attach picks on this machine (its name is printed).
fn files_bench(mount: &Path) -> anyhow::Result<()> {
    let root = std::env::temp_dir().join(format!("enforcer-bench-files-{}", std::process::id()));
    let result = files_bench_in(mount, &root);
    let _ = fs::remove_dir_all(&root);
    result
}

fn files_bench_in(mount: &Path, root: &Path) -> anyhow::Result<()> {
    let tree = FileBenchTree::create(root)?;
    let setups = [
        ("no enforcer", None),
        ("10 file rules", Some(tree.policy(10)?)),
        ("1,000 file rules", Some(tree.policy(1000)?)),
    ];
    let cgroup = mount.join(format!("enforcer-bench-files-{}", std::process::id()));
    fs::create_dir_all(&cgroup)?;
    let iterations = 20_000;
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    let mut backend = String::from("none");
    let outcome = (|| -> anyhow::Result<()> {
        for _ in 0..3 {
            for (i, (_, policy)) in setups.iter().enumerate() {
                let controller = match policy {
                    Some(p) => {
                        let (child, files) = attach_reporting(&cgroup, p, &["--events", "/dev/null"])?;
                        backend = files;
                        Some(child)
                    }
                    None => None,
                };
                let ns = tree.measure(&cgroup, iterations);
                if let Some(mut c) = controller {
                    stop_controller(&mut c);
                    detach(&cgroup);
                }
                samples[i].push(ns?);
            }
        }
        Ok(())
    })();
    detach(&cgroup);
    let _ = fs::remove_dir(&cgroup);
    outcome?;
    let medians: Vec<f64> = samples.into_iter().map(median).collect();
    println!(
        "\nFile open+close, {FILE_DEPTH} directories deep, {iterations} per round, median of 3 interleaved rounds (backend: {backend}):"
    );
    println!("  {:<20} {:>12} {:>8}", "setup", "ns/open", "ratio");
    for ((name, _), ns) in setups.iter().zip(&medians) {
        println!("  {name:<20} {ns:>12.0} {:>7.2}x", ns / medians[0]);
    }
    Ok(())
}

/// Interleaved rounds of the BPF-LSM bench.
const LSM_ROUNDS: usize = 5;

/// Samples of one enforced setup of the BPF-LSM bench, one per round.
struct LsmSetup {
    rules: usize,
    /// ns per open+close in the confined cgroup, and in a cgroup the programs do not
    /// govern (every other process on the machine).
    confined: Vec<f64>,
    outside: Vec<f64>,
    /// Mean in-kernel time of one file_open program run (kernel.bpf_stats_enabled
    /// accounting), for confined and for outside openers.
    prog_confined: Vec<f64>,
    prog_outside: Vec<f64>,
}

/// Inside the QEMU guest, where BPF-LSM programs load: open+close of the bench file
/// with no programs loaded at all (the baseline), then with 10 and with 1,000 file
/// rules attached with `--file-backend bpf-lsm`, from the confined cgroup and from one
/// outside it; each round attaches and detaches both policies in turn, so the
/// baseline is interleaved with them.
pub fn guest_lsm_files_bench(iterations: u32) -> anyhow::Result<()> {
    let mount = cgroup2_mount()?;
    let root = std::env::temp_dir().join("enforcer-bench-files");
    let tree = FileBenchTree::create(&root)?;
    let outside = mount.join("enforcer-bench-outside");
    let confined = mount.join("enforcer-bench-confined");
    for cg in [&outside, &confined] {
        fs::create_dir_all(cg).with_context(|| format!("creating {}", cg.display()))?;
    }
    let stats = BpfStats::set(false)?;
    let mut baseline = Vec::new();
    let mut setups: Vec<LsmSetup> = [10, 1000]
        .into_iter()
        .map(|rules| LsmSetup { rules, confined: vec![], outside: vec![], prog_confined: vec![], prog_outside: vec![] })
        .collect();
    let mut attach_secs = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        let policies = setups.iter().map(|s| tree.policy(s.rules)).collect::<anyhow::Result<Vec<_>>>()?;
        for round in 0..LSM_ROUNDS {
            println!("bench: round {}/{LSM_ROUNDS}", round + 1);
            // Idle first: the kernel frees a detached program set from deferred work
            // (RCU callbacks) on this one CPU, and counted instructions count it too:
            // on 6.12 the baseline taken right after a detach ran 3% above the same
            // opens from outside the attached cgroup.
            std::thread::sleep(SETTLE);
            baseline.push(tree.measure(&outside, iterations)?);
            for (setup, policy) in setups.iter_mut().zip(&policies) {
                let started = Instant::now();
                let (mut controller, backend) =
                    attach_reporting(&confined, policy, &["--events", "/dev/null", "--file-backend", "bpf-lsm"])?;
                attach_secs.push(started.elapsed().as_secs_f64());
                // And after an attach, whose verification leaves deferred work as well.
                std::thread::sleep(SETTLE);
                let measured = (|| -> anyhow::Result<()> {
                    ensure!(backend == "bpf-lsm", "attach used backend {backend}, not bpf-lsm");
                    let prog = enforcer_prog(&confined, "enf_file_open")?;
                    let timed = |cgroup: &Path, times: &mut Vec<f64>, progs: &mut Vec<f64>| -> anyhow::Result<()> {
                        times.push(tree.measure(cgroup, iterations)?);
                        let _stats = BpfStats::set(true)?;
                        let (t0, n0) = prog_run_stats(prog)?;
                        tree.measure(cgroup, iterations / 4)?;
                        let (t1, n1) = prog_run_stats(prog)?;
                        if n1 > n0 {
                            progs.push((t1 - t0) as f64 / (n1 - n0) as f64);
                        }
                        Ok(())
                    };
                    let result = timed(&confined, &mut setup.confined, &mut setup.prog_confined)
                        .and_then(|()| timed(&outside, &mut setup.outside, &mut setup.prog_outside));
                    // SAFETY: closes the program fd this round loaded; nothing else holds it.
                    unsafe { libc::close(prog) };
                    result
                })();
                stop_controller(&mut controller);
                detach(&confined);
                measured?;
            }
        }
        Ok(())
    })();
    drop(stats);
    detach(&confined);
    for cg in [&outside, &confined] {
        let _ = fs::remove_dir(cg);
    }
    let _ = fs::remove_dir_all(&root);
    result?;
    let base = median(baseline.clone());
    let spread = |v: &[f64]| v.iter().fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let (lo, hi) = spread(&baseline);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "\nbench: BPF-LSM file open+close on {}, {FILE_DEPTH} directories deep, {iterations} per run, medians of {LSM_ROUNDS} interleaved rounds (QEMU TCG; an attach took {:.0}..{:.0} s):",
        kernel.trim(),
        spread(&attach_secs).0,
        spread(&attach_secs).1
    );
    println!("bench:   {:<34} {:>10} {:>7} {:>14}  ns/open range", "setup", "ns/open", "ratio", "file_open run");
    println!(
        "bench:   {:<34} {base:>10.0} {:>6.2}x {:>14}  {lo:.0}..{hi:.0}",
        "no programs loaded (baseline)", 1.0, "-"
    );
    for s in &setups {
        for (who, times, progs) in
            [("confined", &s.confined, &s.prog_confined), ("outside the cgroup", &s.outside, &s.prog_outside)]
        {
            let ns = median(times.clone());
            let prog = if progs.is_empty() { "-".to_string() } else { format!("{:.0} ns", median(progs.clone())) };
            let (lo, hi) = spread(times);
            println!(
                "bench:   {:<34} {ns:>10.0} {:>6.2}x {prog:>14}  {lo:.0}..{hi:.0}",
                format!("{} file rules, {who}", s.rules),
                ns / base
            );
        }
    }
    for s in &setups {
        let ratio = median(s.confined.clone()) / base;
        // The program's own run time is steadier under TCG than whole-syscall timings.
        let prog = if s.prog_confined.is_empty() { f64::NAN } else { median(s.prog_confined.clone()) };
        println!(
            "bench: goal (allowed open <= 1.10x the baseline) at {} file rules: {ratio:.2}x, {}; file_open's own run time is {:.1}% of the baseline open+close",
            s.rules,
            if ratio <= 1.10 { "met" } else { "NOT met" },
            100.0 * prog / base
        );
    }
    Ok(())
}

/// Idle time before a baseline measurement in the guest (see `guest_lsm_files_bench`).
const SETTLE: Duration = Duration::from_secs(3);

/// How long the controller gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// SIGTERM, then SIGKILL after STOP_GRACE, saying so: a controller that ignores SIGTERM
/// is a bug to report, not a reason to hang the bench.
fn stop_controller(controller: &mut Child) {
    let _ =
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(controller.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < STOP_GRACE {
        if let Ok(Some(_)) = controller.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "
WARNING: the controller did not exit within {} s of SIGTERM; killed it",
        STOP_GRACE.as_secs()
    );
    let _ = controller.kill();
    let _ = controller.wait();
}

/// How long the throughput bench generates events.
const EVENT_SECS: u64 = 5;

/// The event rate asked for (`--event-rate`), passed to the worker in the environment.
fn event_rate() -> u64 {
    std::env::var("XTASK_EVENT_RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000)
}

/// Drives `--event-rate` denied sendto()s a second for EVENT_SECS from a confined cgroup
/// while enforcer writes every decision to a hash-chained file, then compares what was
/// generated with what was written, lost in the kernel and dropped by the sink.
fn events_bench(mount: &Path) -> anyhow::Result<()> {
    let rate = event_rate();
    super::step(&format!("bench: {rate} events/s for {EVENT_SECS}s into a chained file"));
    let cgroup = mount.join(format!("enforcer-bench-events-{}", std::process::id()));
    fs::create_dir_all(&cgroup)?;
    let dir = std::env::temp_dir().join(format!("enforcer-bench-events-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let result = (|| -> anyhow::Result<()> {
        let policy = dir.join("policy.yaml");
        fs::write(
            &policy,
            "apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: bench-events\nspec:\n  network:\n    default: deny\n  alerts:\n    denial_burst: false\n",
        )?;
        let events = dir.join("events.jsonl");
        let metrics = {
            let l = TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.to_string()
        };
        let mut controller = attach_with(
            &cgroup,
            &policy,
            &[
                "--events",
                events.to_str().expect("utf-8"),
                "--events-max-bytes",
                &(8u64 << 30).to_string(),
                "--metrics-addr",
                &metrics,
            ],
        )?;
        let out = (|| -> anyhow::Result<String> {
            let generated = run_worker_raw("events", &cgroup, 0)?;
            let generated: u64 = generated.split_whitespace().next().unwrap_or("0").parse()?;
            // Wait until the controller has written what it will write.
            let mut last = (0, Instant::now());
            loop {
                let written = scrape(&metrics, "enforcer_events_written_total{");
                if written >= generated as f64 || last.1.elapsed() > Duration::from_secs(5) {
                    break;
                }
                if written as u64 != last.0 {
                    last = (written as u64, Instant::now());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let written = scrape(&metrics, "enforcer_events_written_total{");
            let dropped = scrape(&metrics, "enforcer_events_dropped_total{");
            let lost = scrape(&metrics, "enforcer_events_lost_total{where=\"kernel\"}");
            let lines = fs::read_to_string(&events).map(|t| t.lines().count()).unwrap_or(0);
            let verify = Command::new(super::enforcer_bin()).args(["audit", "verify"]).arg(&events).output()?;
            let chain = if verify.status.success() {
                String::from_utf8_lossy(&verify.stdout).trim().to_string()
            } else {
                format!("CHAIN BROKEN: {}", String::from_utf8_lossy(&verify.stderr).trim())
            };
            Ok(format!(
                "\nevents: generated {generated} denied sendto() in {EVENT_SECS}s ({:.0}/s); written {written:.0} \
                 (file lines {lines}); lost in the kernel ring buffer {lost:.0}; dropped by the sink {dropped:.0}: {}\n\
                 enforcer audit verify on that file: {chain}",
                generated as f64 / EVENT_SECS as f64,
                if written as u64 == generated && lost == 0.0 && dropped == 0.0 && lines as u64 == generated {
                    "no loss"
                } else {
                    "LOSS"
                }
            ))
        })();
        stop_controller(&mut controller);
        println!("{}", out?);
        Ok(())
    })();
    detach(&cgroup);
    let _ = fs::remove_dir(&cgroup);
    let _ = fs::remove_dir_all(&dir);
    result
}

/// The value of the first series starting with `prefix` on a /metrics page.
fn scrape(addr: &str, prefix: &str) -> f64 {
    let out = Command::new("curl").args(["-sf", &format!("http://{addr}/metrics")]).output();
    let body = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    body.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// The setups, each in its own cgroup, all in place at once: (cgroup name, label).
const SETUPS: [(&str, &str); 4] = [
    ("none", "no programs"),
    ("empty", "empty program"),
    ("enf10", "enforcer, 10 rules"),
    ("enf10k", "enforcer, 10000 rules"),
];
/// Rounds over all setups; each setup's figure is its median. Alternating setups
/// within a round keeps machine drift from looking like a difference between them.
const OUTER_ROUNDS: usize = 7;

struct Row {
    setup: &'static str,
    udp_ns: f64,
    tcp_ns: f64,
    /// Mean time of one connect4 program run, from the kernel's own accounting
    /// (kernel.bpf_stats_enabled); None with no program attached.
    prog_ns: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn measure_all(cgroups: &[PathBuf], iterations: u32) -> anyhow::Result<Vec<Row>> {
    super::step("bench: attaching an empty program and enforcer with 10 and 10,000 rules");
    let empty = EmptyProgram::attach(&cgroups[1])?;
    let mut controllers = Vec::new();
    let mut prog_fds = vec![None, Some(empty.prog_fd)];
    for (cg, rules) in cgroups[2..].iter().zip([10usize, 10_000]) {
        let policy = std::env::temp_dir().join(format!("enforcer-bench-{rules}.yaml"));
        fs::write(&policy, bench_policy(rules))?;
        let controller = attach(cg, &policy);
        let _ = fs::remove_file(&policy);
        controllers.push(controller?);
        prog_fds.push(Some(enforcer_prog(cg, "enf_connect4")?));
    }
    let result = (|| {
        let mut udp: Vec<Vec<f64>> = vec![Vec::new(); SETUPS.len()];
        let mut prog: Vec<Vec<f64>> = vec![Vec::new(); SETUPS.len()];
        for round in 0..OUTER_ROUNDS {
            super::step(&format!("bench: UDP connect, round {}/{OUTER_ROUNDS}", round + 1));
            for (i, cg) in cgroups.iter().enumerate() {
                let before = prog_fds[i].map(prog_run_stats).transpose()?;
                udp[i].push(run_worker("udp", cg, iterations)?);
                let after = prog_fds[i].map(prog_run_stats).transpose()?;
                if let (Some((t0, n0)), Some((t1, n1))) = (before, after) {
                    if n1 > n0 {
                        prog[i].push((t1 - t0) as f64 / (n1 - n0) as f64);
                    }
                }
            }
        }
        super::step("bench: TCP connect+accept+close");
        let mut rows = Vec::new();
        for (i, cg) in cgroups.iter().enumerate() {
            rows.push(Row {
                setup: SETUPS[i].1,
                udp_ns: median(udp[i].clone()),
                tcp_ns: run_worker("tcp", cg, iterations / 4)?,
                prog_ns: (!prog[i].is_empty()).then(|| median(prog[i].clone())),
            });
        }
        Ok(rows)
    })();
    for fd in prog_fds.into_iter().skip(2).flatten() {
        // SAFETY: program fds this function loaded and nothing else holds.
        unsafe { libc::close(fd) };
    }
    for mut c in controllers {
        stop_controller(&mut c);
    }
    drop(empty);
    result
}

/// A policy of `rules` allow rules: /32s in 10.0.0.0/8 (never matched) plus the
/// loopback rule the benchmark's connects hit.
fn bench_policy(rules: usize) -> String {
    let mut yaml = String::from(
        "apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: bench\nspec:\n  network:\n    default: deny\n    allow:\n      - cidr: 127.0.0.1/32\n",
    );
    for i in 1..rules {
        let (a, b, c) = ((i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
        yaml.push_str(&format!("      - cidr: 10.{a}.{b}.{c}/32\n        ports: [443]\n"));
    }
    yaml
}

fn attach(cgroup: &Path, policy: &Path) -> anyhow::Result<Child> {
    attach_with(cgroup, policy, &["--events", "/dev/null"])
}

fn attach_with(cgroup: &Path, policy: &Path, extra: &[&str]) -> anyhow::Result<Child> {
    attach_reporting(cgroup, policy, extra).map(|(child, _)| child)
}

/// Starts `enforcer attach` and waits for its "attached" line (logged once the links
/// are pinned and any file backend runs); returns the controller and the file backend
/// that line names ("none" without file rules).
fn attach_reporting(cgroup: &Path, policy: &Path, extra: &[&str]) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(super::enforcer_bin())
        .arg("attach")
        .args(extra)
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--policy")
        .arg(policy)
        .stderr(Stdio::piped())
        .spawn()
        .context("starting enforcer attach")?;
    let stderr = child.stderr.take().expect("piped");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let mut said = Vec::new();
    let files = loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("attached") => {
                break ["bpf-lsm", "fanotify"].into_iter().find(|b| line.contains(b)).unwrap_or("none").to_string();
            }
            Some(Ok(line)) => said.push(line),
            // What it said (a verifier log, say) is the diagnosis.
            _ => bail!("enforcer attach exited before attaching ({:?}):\n{}", child.wait(), said.join("\n")),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok((child, files))
}

/// Sets the kernel's per-program run-time accounting on or off until dropped. It costs
/// two clock reads per program run, so timings are taken with it off and program run
/// times in separate runs with it on.
struct BpfStats(String);

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn set(on: bool) -> anyhow::Result<Self> {
        let old = fs::read_to_string(BPF_STATS_SYSCTL).context("reading kernel.bpf_stats_enabled")?;
        fs::write(BPF_STATS_SYSCTL, if on { "1" } else { "0" }).context("setting kernel.bpf_stats_enabled")?;
        Ok(Self(old.trim().to_string()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS_SYSCTL, &self.0);
    }
}

/// (run_time_ns, run_cnt) of a program, from its fdinfo.
fn prog_run_stats(fd: i32) -> anyhow::Result<(u64, u64)> {
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .with_context(|| format!("no {name} in fdinfo of fd {fd}"))
    };
    Ok((field("run_time_ns:")?, field("run_cnt:")?))
}

/// An fd of the program enforcer attached to the cgroup under `name` (enf_connect4,
/// enf_file_open, ...): pinned link -> its prog_id (fdinfo) -> BPF_PROG_GET_FD_BY_ID.
fn enforcer_prog(cgroup: &Path, name: &str) -> anyhow::Result<i32> {
    use std::os::unix::fs::MetadataExt as _;
    let id = fs::metadata(cgroup)?.ino();
    let dir = Path::new("/sys/fs/bpf/enforcer/cgroups").join(id.to_string());
    let pin = fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{name}_"))))
        .with_context(|| format!("no {name} link pinned in {}", dir.display()))?;
    let c_pin = CString::new(pin.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(c_pin.as_ptr() as u64).to_ne_bytes());
    let link_fd = bpf(BPF_OBJ_GET, &mut attr).context("opening the pinned link")?;
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{link_fd}"))?;
    // SAFETY: the link fd BPF_OBJ_GET just gave us; nothing else holds it.
    unsafe { libc::close(link_fd) };
    let prog_id: u32 = info
        .lines()
        .find_map(|l| l.strip_prefix("prog_id:")?.trim().parse().ok())
        .context("no prog_id in the link's fdinfo")?;
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&prog_id.to_ne_bytes());
    bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).with_context(|| format!("opening the {name} program by id"))
}

/// Runs the worker inside the cgroup; it prints the median ns/op of its rounds.
fn run_worker(kind: &str, cgroup: &Path, iterations: u32) -> anyhow::Result<f64> {
    run_worker_raw(kind, cgroup, iterations)?.trim().parse().context("worker output")
}

/// Runs the worker inside the cgroup and returns what it printed.
fn run_worker_raw(kind: &str, cgroup: &Path, iterations: u32) -> anyhow::Result<String> {
    worker_output(worker_command(kind, cgroup, iterations)?)
}

/// This binary as the `kind` worker, joining `cgroup` before exec.
fn worker_command(kind: &str, cgroup: &Path, iterations: u32) -> anyhow::Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["bench", "--iterations", &iterations.to_string(), "--event-rate", &event_rate().to_string()])
        .env("XTASK_BENCH_WORKER", kind);
    join_cgroup_on_exec(&mut cmd, cgroup)?;
    Ok(cmd)
}

fn worker_output(mut cmd: Command) -> anyhow::Result<String> {
    let out = cmd.output().context("running the bench worker")?;
    ensure!(out.status.success(), "bench worker failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes the child move itself into `cgroup` between fork and exec, so everything it
/// runs is confined from its first instruction.
fn join_cgroup_on_exec(cmd: &mut Command, cgroup: &Path) -> anyhow::Result<()> {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes())?;
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
    Ok(())
}

fn worker(kind: &str, iterations: u32) -> anyhow::Result<()> {
    let mut rounds = Vec::new();
    match kind {
        "udp" => {
            let sock = UdpSocket::bind("127.0.0.1:0")?;
            let target = UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
            for _ in 0..ROUNDS {
                let start = Instant::now();
                for _ in 0..iterations {
                    sock.connect(target).context("udp connect denied during bench")?;
                }
                rounds.push(start.elapsed().as_nanos() as f64 / iterations as f64);
            }
        }
        "tcp" => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let target = listener.local_addr()?;
            for _ in 0..ROUNDS {
                let start = Instant::now();
                for _ in 0..iterations {
                    let client = TcpStream::connect(target).context("tcp connect denied during bench")?;
                    let (server, _) = listener.accept()?;
                    reset_on_close(&client);
                    drop(server);
                    drop(client);
                }
                rounds.push(start.elapsed().as_nanos() as f64 / iterations as f64);
            }
        }
        "events" => {
            // `--event-rate` denied sendto()s a second, paced per millisecond.
            let sock = UdpSocket::bind("127.0.0.1:0")?;
            let per_tick = event_rate() / 1000;
            let start = Instant::now();
            let mut sent = 0u64;
            let mut tick = 0u64;
            while tick < EVENT_SECS * 1000 {
                // Sleep, not spin: the controller under test shares the 2 cores.
                let due = start + Duration::from_millis(tick);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                for _ in 0..per_tick {
                    let denied = sock.send_to(b"x", "127.0.0.1:9").is_err();
                    ensure!(denied, "the bench policy must deny this sendto");
                    sent += 1;
                }
                tick += 1;
            }
            println!("{sent} {:.3}", start.elapsed().as_secs_f64());
            return Ok(());
        }
        "open" => {
            let path = std::env::var_os("XTASK_BENCH_FILE").context("XTASK_BENCH_FILE")?;
            for _ in 0..ROUNDS {
                let start = Instant::now();
                for _ in 0..iterations {
                    drop(fs::File::open(&path).context("open denied during bench")?);
                }
                rounds.push(start.elapsed().as_nanos() as f64 / iterations as f64);
            }
        }
        other => bail!("unknown bench worker {other}"),
    }
    rounds.sort_by(|a, b| a.total_cmp(b));
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:.1}", rounds[ROUNDS / 2])?;
    Ok(())
}

/// SO_LINGER 0: close with RST, so a long run leaves no TIME_WAIT sockets that would
/// exhaust the ephemeral ports.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: the stream's fd is open; setsockopt reads a `linger` of the size given.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

fn report(rows: &[Row]) {
    let base = &rows[0];
    let empty = &rows[1];
    println!(
        "\nconnect() cost on loopback (median of {OUTER_ROUNDS} interleaved rounds, ns/op; ratios against this run's baselines)"
    );
    println!(
        "{:<24} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9}",
        "setup", "UDP ns", "x none", "x empty", "TCP ns", "x none", "x empty"
    );
    for r in rows {
        println!(
            "{:<24} {:>10.0} {:>9.3} {:>9.3} {:>10.0} {:>9.3} {:>9.3}",
            r.setup,
            r.udp_ns,
            r.udp_ns / base.udp_ns,
            r.udp_ns / empty.udp_ns,
            r.tcp_ns,
            r.tcp_ns / base.tcp_ns,
            r.tcp_ns / empty.tcp_ns
        );
    }
    println!(
        "\nin-kernel time of one connect4 program run (kernel.bpf_stats_enabled accounting, median of {OUTER_ROUNDS} rounds):"
    );
    for r in rows.iter().filter(|r| r.prog_ns.is_some()) {
        println!("  {:<24} {:>8.1} ns", r.setup, r.prog_ns.unwrap_or_default());
    }
    let (empty_prog, big_prog) = (rows[1].prog_ns.unwrap_or_default(), rows[3].prog_ns.unwrap_or_default());
    let added = big_prog - empty_prog;
    println!(
        "\npolicy lookup at 10,000 rules adds {added:.1} ns per connect over the empty program (goal: <= 50 ns): {}",
        if added <= 50.0 { "met" } else { "NOT met" }
    );
    println!(
        "whole-syscall view: UDP connect {:.0} ns with enforcer (10,000 rules) vs {:.0} ns with the empty program",
        rows[3].udp_ns, empty.udp_ns
    );
}

fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    enforcer_common::host::cgroup2_mount().context("no cgroup2 mount")
}

/// `r0 = 1; exit` on connect4, attached with BPF_PROG_ATTACH; detached on drop.
struct EmptyProgram {
    prog_fd: i32,
    cgroup: fs::File,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_F_ALLOW_MULTI: u32 = 2;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i32> {
    // SAFETY: bpf(2) reads and writes at most the 128 bytes of `attr`; any pointer in it
    // is the caller's and outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128u32) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc as i32) }
}

impl EmptyProgram {
    fn attach(cgroup: &Path) -> anyhow::Result<Self> {
        // mov64 r0, 1 ; exit
        let insns: [u64; 2] =
            [u64::from_le_bytes([0xb7, 0, 0, 0, 1, 0, 0, 0]), u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0])];
        let license = CString::new("GPL")?;
        let mut attr = [0u8; 128];
        // prog_type, insn_cnt, insns, license, ..., expected_attach_type at offset 68.
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_CGROUP_SOCK_ADDR.to_ne_bytes());
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[68..72].copy_from_slice(&BPF_CGROUP_INET4_CONNECT.to_ne_bytes());
        let prog_fd = bpf(BPF_PROG_LOAD, &mut attr).context("loading the empty program")?;
        let cgroup = fs::File::open(cgroup)?;
        let mut attr = [0u8; 128];
        // target_fd, attach_bpf_fd, attach_type, attach_flags
        attr[0..4].copy_from_slice(&(cgroup.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(prog_fd as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&BPF_CGROUP_INET4_CONNECT.to_ne_bytes());
        attr[12..16].copy_from_slice(&BPF_F_ALLOW_MULTI.to_ne_bytes());
        bpf(BPF_PROG_ATTACH, &mut attr).context("attaching the empty program")?;
        Ok(Self { prog_fd, cgroup })
    }
}

impl Drop for EmptyProgram {
    fn drop(&mut self) {
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(self.cgroup.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(self.prog_fd as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&BPF_CGROUP_INET4_CONNECT.to_ne_bytes());
        let _ = bpf(BPF_PROG_DETACH, &mut attr);
        // SAFETY: the program fd this value owns, closed once on drop.
        unsafe { libc::close(self.prog_fd) };
    }
}
