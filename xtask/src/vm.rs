//! `cargo xtask vm-test`: the root integration tests inside QEMU on stock Debian cloud
//! kernels (6.1 and 6.12), where BPF-LSM programs load, unlike on the build machine;
//! and the BPF-LSM part of `cargo xtask bench`, in the same guests.
//!
//! Kernels come from Debian's archive through a private apt state (the machine's apt
//! sources stay untouched) and are cached; the initramfs (busybox, enforcer, the test
//! executables or the bench, and their shared libraries) is rebuilt on every run.
use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use super::{Tally, enforcer_bin, run, step, workspace_root};

/// Debian suites whose `linux-image-cloud-amd64` we boot: 6.1 and 6.12.
const SUITES: &[&str] = &["bookworm", "trixie"];

/// Test targets of enforcer-tests that run in the VM: what the stock kernels decide
/// differently from the build machine's. BPF-LSM loads only there (files); doctor reports
/// it; dns_redirect exercises the recvmsg and getpeername rewrites, whose semantics moved
/// between kernels; selftest reports what each kernel closes (its table is printed
/// before the tests, after doctor's). The rest (network, incident, audit, dns, observability) judges the
/// cgroup hooks and the controller, which the native run proves; every attach in the
/// files suite loads and verifies the whole program set on both kernels all the same.
const VM_TARGETS: &[&str] = &["doctor", "dns_redirect", "files", "selftest"];

/// A stock guest is slow under TCG; a hung one must not hang the suite.
const TIMEOUT: Duration = Duration::from_secs(45 * 60);

const DONE: &str = "ENFORCER-VM-DONE";
/// A test binary outlived `binary_timeout()`: the guest printed what every process was
/// waiting on, killed it and went on with the next binary.
const HUNG_MARK: &str = "ENFORCER-VM-HUNG";
/// Far above the slowest binary (files: about 210 s), far below `TIMEOUT`;
/// XTASK_VM_BINARY_SECS overrides it (to check the watchdog itself).
fn binary_timeout() -> Duration {
    let secs = std::env::var("XTASK_VM_BINARY_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15 * 60);
    Duration::from_secs(secs)
}
const EXIT_MARK: &str = "ENFORCER-VM-EXIT";

struct Kernel {
    release: String,
    vmlinuz: PathBuf,
    /// overlayfs, a module in Debian's build (the relabel tests mount overlays).
    overlay: PathBuf,
}

/// Removed on drop, also when a run fails.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A killed run leaves its directory behind (no Drop on a signal); keep only those of
/// runs still alive.
fn remove_stale_runs(runs: &Path) {
    for e in std::fs::read_dir(runs).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let alive = name.strip_prefix("run-").is_some_and(|pid| Path::new("/proc").join(pid).exists());
        if !alive {
            let _ = if e.path().is_dir() { std::fs::remove_dir_all(e.path()) } else { std::fs::remove_file(e.path()) };
        }
    }
}

#[derive(Default)]
struct Outcome {
    passed: u64,
    failed: u64,
    failures: Vec<String>,
}

/// The kernels to boot: every suite, or those named in `XTASK_VM_SUITES=bookworm,...`
/// (developers iterating).
fn kernels() -> anyhow::Result<Vec<Kernel>> {
    let cache = cache_dir()?;
    let only = std::env::var("XTASK_VM_SUITES").ok();
    let suites: Vec<&str> =
        SUITES.iter().copied().filter(|s| only.as_deref().is_none_or(|o| o.split(',').any(|n| n == *s))).collect();
    ensure!(!suites.is_empty(), "XTASK_VM_SUITES names none of {SUITES:?}");
    suites.iter().map(|s| kernel(&cache, s)).collect()
}

/// One directory per run: two runs at once must not rebuild each other's initramfs.
fn work_dir() -> WorkDir {
    let runs = workspace_root().join("target/vm");
    remove_stale_runs(&runs);
    WorkDir(runs.join(format!("run-{}", std::process::id())))
}

pub fn run_tests(filter: Option<&str>, tally: &mut Tally) -> anyhow::Result<()> {
    let kernels = kernels()?;
    let tests = test_executables()?;
    let work = work_dir();
    let files: Vec<(String, PathBuf)> =
        tests.iter().map(|(name, exe)| (format!("tests/{name}"), exe.clone())).collect();
    let initrd = initramfs(&work.0, &files, &init_script(&tests, filter))?;
    // The guests run side by side, each on its share of the host's cores: under TCG a
    // guest is CPU-bound, and the two kernels' suites are independent.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpus = (cores / kernels.len()).max(1);
    step(&format!(
        "booting {} under QEMU side by side (TCG, {cpus} virtual CPU{} each; this takes minutes)",
        kernels.iter().map(|k| k.release.as_str()).collect::<Vec<_>>().join(" and "),
        if cpus == 1 { "" } else { "s" }
    ));
    let results: Vec<(String, anyhow::Result<Outcome>, Duration)> = std::thread::scope(|scope| {
        let runs: Vec<_> = kernels
            .iter()
            .map(|k| {
                let initrd = &initrd;
                scope.spawn(move || {
                    let started = Instant::now();
                    let outcome = boot(k, initrd, cpus);
                    (k.release.clone(), outcome, started.elapsed())
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().expect("a guest's thread")).collect()
    });
    let mut results_ok = Vec::new();
    for (release, outcome, took) in results {
        let outcome = outcome?;
        step(&format!("{release}: {} passed, {} failed in {took:.0?}", outcome.passed, outcome.failed));
        tally.passed += outcome.passed;
        tally.failed += outcome.failed;
        results_ok.push((release, outcome));
    }
    let results = results_ok;
    println!("\nVM tests per kernel:");
    println!("  {:<32} {:>6} {:>6}  failures", "kernel", "passed", "failed");
    for (release, o) in &results {
        println!("  {release:<32} {:>6} {:>6}  {}", o.passed, o.failed, o.failures.join(", "));
    }
    Ok(())
}

fn cache_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let dir = PathBuf::from(home).join(".cache/enforcer/vm");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The mirror the machine's own Debian sources use (same host, our own suites).
fn debian_mirror() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(
            dir.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources")),
        );
    }
    for text in files.iter().filter_map(|f| std::fs::read_to_string(f).ok()) {
        for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
            let found =
                line.split_whitespace().find(|w| w.starts_with("http") && w.trim_end_matches('/').ends_with("/debian"));
            if let Some(url) = found {
                return url.trim_end_matches('/').to_string();
            }
        }
    }
    "http://deb.debian.org/debian".to_string()
}

/// apt options that confine apt to a state of its own under the cache directory.
fn private_apt(cache: &Path, program: &str, suite: &str) -> anyhow::Result<Command> {
    let apt = cache.join("apt");
    let list = apt.join("sources.list");
    if !list.exists() {
        for d in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(apt.join(d))?;
        }
        let mirror = debian_mirror();
        let key = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]";
        let text: String = SUITES.iter().map(|s| format!("deb {key} {mirror} {s} main\n")).collect();
        std::fs::write(&list, text)?;
    }
    let mut cmd = Command::new(program);
    for (k, v) in [
        ("Dir::Etc::SourceList", list),
        ("Dir::Etc::SourceParts", PathBuf::from("/dev/null")),
        ("Dir::State::Lists", apt.join("lists")),
        ("Dir::Cache", apt.join("cache")),
    ] {
        cmd.arg("-o").arg(format!("{k}={}", v.display()));
    }
    // Root's cache directory is not readable by apt's sandbox user; the suite picks
    // which linux-image-cloud-amd64 the metapackage means (both suites carry one).
    cmd.args(["-q", "-o", "APT::Sandbox::User=root", "-o", "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"]);
    cmd.args(["-o", &format!("APT::Default-Release={suite}")]);
    Ok(cmd)
}

/// The suite's cloud kernel, downloaded and unpacked once.
fn kernel(cache: &Path, suite: &str) -> anyhow::Result<Kernel> {
    let dir = cache.join(suite);
    let release_file = dir.join("release");
    if let Ok(release) = std::fs::read_to_string(&release_file) {
        let release = release.trim().to_string();
        let vmlinuz = dir.join(format!("vmlinuz-{release}"));
        let overlay = dir.join("overlay.ko");
        if vmlinuz.exists() && overlay.exists() {
            step(&format!("kernel {suite}: {release} (cached)"));
            print_config(&dir, &release)?;
            return Ok(Kernel { release, vmlinuz, overlay });
        }
    }
    step(&format!("kernel {suite}: resolving linux-image-cloud-amd64 in a private apt state"));
    let update_stamp = cache.join("apt/updated");
    if !update_stamp.exists() {
        run(private_apt(cache, "apt-get", suite)?.arg("update"))?;
        std::fs::write(&update_stamp, "")?;
    }
    let out = private_apt(cache, "apt-cache", suite)?.args(["depends", "linux-image-cloud-amd64"]).output()?;
    ensure!(out.status.success(), "apt-cache depends failed: {}", String::from_utf8_lossy(&out.stderr));
    let package = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: ").filter(|p| p.starts_with("linux-image-")).map(str::to_string))
        .with_context(|| format!("no linux-image dependency of linux-image-cloud-amd64 in {suite}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    let unpacked = dir.join("deb");
    std::fs::create_dir_all(&unpacked)?;
    step(&format!("kernel {suite}: downloading {package}"));
    run(private_apt(cache, "apt-get", suite)?.args(["download", &package]).current_dir(&dir))?;
    let deb = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
    let boot = unpacked.join("boot");
    let release = std::fs::read_dir(&boot)?
        .flatten()
        .find_map(|e| e.file_name().to_str()?.strip_prefix("vmlinuz-").map(str::to_string))
        .with_context(|| format!("no boot/vmlinuz-* in {}", deb.display()))?;
    // Keep only the kernel, its config and the overlayfs module (everything else we use
    // is built in).
    for f in [format!("vmlinuz-{release}"), format!("config-{release}")] {
        std::fs::rename(boot.join(&f), dir.join(&f))?;
    }
    let overlay = dir.join("overlay.ko");
    // Under /lib up to bookworm, under /usr/lib from trixie on (merged /usr).
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| unpacked.join(d).join(&release))
        .find(|d| d.is_dir())
        .with_context(|| format!("no modules directory for {release} in {}", deb.display()))?;
    extract_module(&modules.join("kernel/fs/overlayfs"), "overlay", &overlay)?;
    std::fs::remove_dir_all(&unpacked)?;
    std::fs::remove_file(&deb)?;
    std::fs::write(&release_file, &release)?;
    step(&format!("kernel {suite}: {release}"));
    print_config(&dir, &release)?;
    Ok(Kernel { vmlinuz: dir.join(format!("vmlinuz-{release}")), release, overlay })
}

/// Copies module `name` from `dir` to `dest`, uncompressed (busybox insmod takes plain
/// .ko files; Debian ships .ko, .ko.xz or .ko.zst depending on the release).
fn extract_module(dir: &Path, name: &str, dest: &Path) -> anyhow::Result<()> {
    let found = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{name}.ko"))))
        .with_context(|| format!("no {name}.ko* in {}", dir.display()))?;
    let decompress = match found.extension().and_then(|e| e.to_str()) {
        Some("xz") => Some("xz"),
        Some("zst") => Some("zstd"),
        _ => None,
    };
    match decompress {
        None => {
            std::fs::copy(&found, dest)?;
        }
        Some(tool) => {
            let out = Command::new(tool).arg("-dc").arg(&found).output().with_context(|| format!("starting {tool}"))?;
            ensure!(
                out.status.success(),
                "{tool} -dc {} failed: {}",
                found.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::write(dest, out.stdout)?;
        }
    }
    Ok(())
}

/// Whether the kernel can run BPF-LSM programs at all, from its build config.
fn print_config(dir: &Path, release: &str) -> anyhow::Result<()> {
    let config = std::fs::read_to_string(dir.join(format!("config-{release}")))?;
    let value = |key: &str| {
        config
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(|v| v.trim_matches('"').to_string()))
            .unwrap_or_else(|| "not set".to_string())
    };
    let lsm = value("CONFIG_LSM");
    let bpf_in_lsm = lsm.split(',').any(|l| l == "bpf");
    println!(
        "  {release}: CONFIG_BPF_LSM={} CONFIG_SECURITY_PATH={} CONFIG_LSM=\"{lsm}\" (bpf {})",
        value("CONFIG_BPF_LSM"),
        value("CONFIG_SECURITY_PATH"),
        if bpf_in_lsm { "active by default" } else { "NOT in the default list" }
    );
    Ok(())
}

/// The test executables of enforcer-tests, by target name, as cargo just built them.
fn test_executables() -> anyhow::Result<Vec<(String, PathBuf)>> {
    step("building the integration test executables");
    let out = Command::new("cargo")
        .args(["test", "--release", "-p", "enforcer-tests", "--no-run", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("starting cargo test --no-run")?;
    ensure!(out.status.success(), "cargo test --no-run failed: {}", out.status);
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str()) else { continue };
        if VM_TARGETS.contains(&name) {
            tests.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    ensure!(!tests.is_empty(), "cargo built no test executable for enforcer-tests");
    tests.sort();
    Ok(tests)
}

/// `'...'` for the guest's shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The BPF-LSM part of the file-open bench (`bench::guest_lsm_files_bench`), run by
/// this same xtask binary inside each guest; its `bench:` lines are repeated at the end.
pub fn run_files_bench() -> anyhow::Result<()> {
    step("bench: file opens with BPF-LSM, in QEMU on stock kernels");
    let kernels = kernels()?;
    let work = work_dir();
    let xtask = std::env::current_exe().context("locating the xtask binary")?;
    let init = format!("{}/bin/xtask guest-files-bench\necho {DONE}\npoweroff -f\n", guest_prelude());
    let initrd = initramfs(&work.0, &[("bin/xtask".to_string(), xtask)], &init)?;
    let mut results = Vec::new();
    for k in &kernels {
        step(&format!("bench: booting {} under QEMU (TCG; ten attaches)", k.release));
        let mut lines = Vec::new();
        let console = boot_console(k, &initrd, Clock::Instructions, |line| {
            if line.starts_with("bench:") || line.starts_with("Error") {
                lines.push(line.to_string());
            }
        })?;
        ensure!(console.done, "the bench guest on {} did not finish ({})", k.release, console.end);
        ensure!(lines.iter().any(|l| l.contains("goal")), "the bench guest on {} printed no result", k.release);
        results.push(lines);
    }
    println!();
    for line in results.iter().flatten().filter(|l| !l.starts_with("bench: round")) {
        println!("{line}");
    }
    Ok(())
}

/// The guest's first steps: the filesystems enforcer needs, loopback, the environment.
fn guest_prelude() -> &'static str {
    r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t securityfs securityfs /sys/kernel/security
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ip link set lo up
export ENFORCER_BIN=/bin/enforcer HOME=/root PATH=/bin:/sbin:/usr/bin:/usr/sbin
# Under TCG the verifier takes many times longer to load the LSM programs.
export ENFORCER_TEST_ATTACH_SECS=600
mkdir -p /root
cd /root
# The relabel test must not skip its overlay steps here: it is where BPF-LSM runs.
insmod /lib/modules/overlay.ko && export ENFORCER_TEST_REQUIRE_OVERLAY=1 || echo "overlayfs module did not load"
echo "kernel $(uname -r), active LSMs $(cat /sys/kernel/security/lsm)"
"#
}

fn init_script(tests: &[(String, PathBuf)], filter: Option<&str>) -> String {
    let mut args = String::from("--test-threads=1");
    if let Some(f) = filter {
        args += &format!(" {}", quote(f));
    }
    let mut s = format!("{}{}/bin/enforcer doctor\n/bin/enforcer selftest\n", guest_prelude(), HUNG_REPORT);
    // XTASK_VM_TESTS=files,doctor: only these test binaries (developers iterating).
    let only = std::env::var("XTASK_VM_TESTS").ok();
    for (name, _) in tests {
        if only.as_deref().is_some_and(|o| !o.split(',').any(|n| n == name)) {
            continue;
        }
        s += &format!(
            "/tests/{name} {args} &\npid=$!\n(sleep {secs}; echo; echo \"{HUNG_MARK} {name}\"; hung_report; kill -9 $pid) &\n\
             dog=$!\nwait $pid\nrc=$?\nkill $dog 2>/dev/null\necho \"{EXIT_MARK} {name} $rc\"\n",
            secs = binary_timeout().as_secs()
        );
    }
    s += &format!("echo {DONE}\npoweroff -f\n");
    s
}

/// What each process is and where it waits, in user space and in the kernel: what a
/// hang needs to be understood from the console alone.
const HUNG_REPORT: &str = r#"hung_report() {
  for d in /proc/[0-9]*; do
    cmd=$(tr '\0' ' ' < $d/cmdline 2>/dev/null | cut -c1-200)
    [ -n "$cmd" ] || continue # kernel threads
    echo "== pid ${d#/proc/} $cmd"
    grep -E '^(State|PPid):' $d/status 2>/dev/null | tr '\n' ' '; echo "wchan $(cat $d/wchan 2>/dev/null)"
    for t in $d/task/*; do cat $t/stack 2>/dev/null | head -12; done
  done
  dmesg | tail -40
}
"#;

/// Shared libraries (and the dynamic loader) a binary needs, by absolute path.
fn shared_libs(binary: &Path, libs: &mut BTreeSet<PathBuf>) -> anyhow::Result<()> {
    let out = Command::new("ldd").arg(binary).output().context("starting ldd")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line.split("=>").last().unwrap_or("").split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            libs.insert(PathBuf::from(path));
        }
    }
    Ok(())
}

/// A fresh initramfs (uncompressed cpio newc: nothing to inflate in a slow guest) with
/// busybox, enforcer, `files` (path in the guest, file on the host) and `init`.
fn initramfs(work: &Path, files: &[(String, PathBuf)], init_text: &str) -> anyhow::Result<PathBuf> {
    step("building the initramfs");
    let root = work.join("root");
    let _ = std::fs::remove_dir_all(work);
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "run", "root", "tests"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let busybox = Path::new("/bin/busybox");
    std::fs::copy(busybox, root.join("bin/busybox")).context("copying /bin/busybox (busybox-static)")?;
    let list = Command::new(busybox).arg("--list-full").output().context("busybox --list-full")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = root.join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("/bin/busybox", &link)?;
        }
    }
    let mut libs = BTreeSet::new();
    let enforcer = enforcer_bin();
    ensure!(enforcer.exists(), "no {}: build it first", enforcer.display());
    std::fs::copy(&enforcer, root.join("bin/enforcer"))?;
    shared_libs(&enforcer, &mut libs)?;
    for (dest, exe) in files {
        std::fs::copy(exe, root.join(dest)).with_context(|| format!("copying {}", exe.display()))?;
        shared_libs(exe, &mut libs)?;
    }
    for lib in &libs {
        let dest = root.join(lib.strip_prefix("/")?);
        std::fs::create_dir_all(dest.parent().expect("a library path has a parent"))?;
        std::fs::copy(lib, &dest).with_context(|| format!("copying {}", lib.display()))?;
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\nnobody:x:65534:\n")?;
    std::fs::write(root.join("etc/hosts"), "127.0.0.1 localhost\n::1 localhost\n")?;
    std::fs::write(root.join("etc/nsswitch.conf"), "passwd: files\ngroup: files\nhosts: files\n")?;
    let init = root.join("init");
    std::fs::write(&init, init_text)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;
    let cpio = work.join("initramfs.cpio");
    run(Command::new("sh")
        .arg("-c")
        .arg(format!("find . | cpio --quiet -o -H newc > {}", quote(cpio.to_str().context("utf-8 path")?)))
        .current_dir(&root))?;
    Ok(cpio)
}

/// How a guest's console ended.
struct Console {
    /// The init script reached its end.
    done: bool,
    /// qemu's exit status, or the timeout.
    end: String,
}

/// `initrd` followed by a second archive with this kernel's modules (the kernel unpacks
/// concatenated cpio archives in order).
fn initrd_for(kernel: &Kernel, initrd: &Path) -> anyhow::Result<PathBuf> {
    let work = initrd.parent().context("the initramfs has a directory")?;
    let root = work.join(format!("modules-{}", kernel.release));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("lib/modules"))?;
    std::fs::copy(&kernel.overlay, root.join("lib/modules/overlay.ko"))?;
    let modules = work.join(format!("modules-{}.cpio", kernel.release));
    run(Command::new("sh")
        .arg("-c")
        .arg(format!("find lib | cpio --quiet -o -H newc > {}", quote(modules.to_str().context("utf-8 path")?)))
        .current_dir(&root))?;
    let combined = work.join(format!("initramfs-{}.cpio", kernel.release));
    let mut bytes = std::fs::read(initrd)?;
    bytes.extend(std::fs::read(&modules)?);
    std::fs::write(&combined, bytes)?;
    Ok(combined)
}

/// What the guest's clocks count.
#[derive(Clone, Copy)]
enum Clock {
    /// Host time, with `cpus` virtual CPUs emulated in parallel: the tests.
    Host { cpus: usize },
    /// Executed instructions, one nanosecond each (`-icount shift=0`), on one virtual
    /// CPU: the bench. Under TCG the host's load swings guest timings by about ±30%
    /// between runs; counted instructions do not move with it, so the bench's ratios
    /// compare the work done.
    Instructions,
}

/// Boots one kernel, echoes its console and hands each line to `on_line`.
fn boot_console(
    kernel: &Kernel,
    initrd: &Path,
    clock: Clock,
    mut on_line: impl FnMut(&str),
) -> anyhow::Result<Console> {
    let initrd = initrd_for(kernel, initrd)?;
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-m", "2048"]);
    match clock {
        Clock::Host { cpus } => qemu.args(["-smp", &cpus.to_string()]),
        // Instruction counting runs the CPUs in turn; with two, the 6.1 guest hangs
        // before its kernel starts.
        Clock::Instructions => qemu.args(["-smp", "1", "-icount", "shift=0"]),
    };
    let mut child = qemu
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet", "-nographic", "-no-reboot"])
        // No NIC: the guests use loopback only, and the NIC's boot ROM costs time.
        .args(["-nic", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        // The console may carry stray bytes: read raw lines, decode lossily.
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            if tx.send(printable(&String::from_utf8_lossy(&line))).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + TIMEOUT;
    // The tests' guest reports a hung binary itself (hung_report); a console silent for
    // longer than that means the guest as a whole is stuck.
    let silence = match clock {
        Clock::Host { .. } => binary_timeout() + Duration::from_secs(180),
        Clock::Instructions => TIMEOUT,
    };
    let mut done = false;
    loop {
        let wait = deadline.saturating_duration_since(Instant::now()).min(silence);
        match rx.recv_timeout(wait) {
            Ok(line) => {
                println!("[{}] {line}", kernel.release);
                done |= line == DONE;
                on_line(&line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                let end = if Instant::now() >= deadline {
                    format!("timeout after {TIMEOUT:?}")
                } else {
                    format!("the guest printed nothing for {silence:?}: stuck as a whole")
                };
                return Ok(Console { done: false, end });
            }
        }
    }
    let status = child.wait()?;
    Ok(Console { done, end: format!("qemu {status}") })
}

/// Boots one kernel with the test initramfs and counts libtest's verdicts.
fn boot(kernel: &Kernel, initrd: &Path, cpus: usize) -> anyhow::Result<Outcome> {
    let mut o = Outcome::default();
    let mut failed_in_binary = 0;
    let console = boot_console(kernel, initrd, Clock::Host { cpus }, |line| {
        if let Some(rest) = line.strip_prefix("test ") {
            if rest.ends_with(" ... ok") {
                o.passed += 1;
            } else if let Some(name) = rest.strip_suffix(" ... FAILED") {
                o.failed += 1;
                failed_in_binary += 1;
                o.failures.push(name.to_string());
            }
        } else if let Some(name) = line.strip_prefix(HUNG_MARK) {
            o.failed += 1;
            failed_in_binary += 1;
            o.failures.push(format!(
                "{} hung: killed after {:?} (process report above)",
                name.trim(),
                binary_timeout()
            ));
        } else if let Some(rest) = line.strip_prefix(EXIT_MARK) {
            // A binary that failed without a FAILED test line (crash, bad arguments).
            let mut words = rest.split_whitespace();
            let (name, code) = (words.next().unwrap_or("?"), words.next().unwrap_or("?"));
            if code != "0" && failed_in_binary == 0 {
                o.failed += 1;
                o.failures.push(format!("{name} exited with {code}"));
            }
            failed_in_binary = 0;
        }
    })?;
    if !console.done {
        o.failed += 1;
        o.failures.push(format!("no {DONE} ({})", console.end));
    }
    Ok(o)
}

/// A console line without terminal control sequences: the firmware resets and clears
/// the screen, which would reset the host's terminal too.
fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI sequences run to a final byte in @..~; others are one character long.
            if chars.next() == Some('[') {
                for f in chars.by_ref() {
                    if ('@'..='~').contains(&f) {
                        break;
                    }
                }
            }
        } else if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out
}
