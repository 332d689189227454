//! The fanotify backend against the real kernel (root): opens, execs and the listener's
//! failure modes.
use enforcer_common::access;

use super::{
    listener::{ProcPath, access_from_flags, parse_syscall},
    marks::marked_devices,
    *,
};
use std::{
    ffi::CString,
    io,
    os::unix::fs::MetadataExt as _,
    os::{fd::RawFd, unix::ffi::OsStrExt as _},
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant, SystemTime},
};

/// Set for the test binary re-run as a child by `child`: what `child_helper` does.
const CHILD_ENV: &str = "ENFORCER_FANOTIFY_TEST_CHILD";

fn usable() -> bool {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: fanotify permission events need root");
        return false;
    }
    if let Err(e) = Fanotify::probe() {
        eprintln!("skipped: {e}");
        return false;
    }
    true
}

/// Ends this test process if a test hangs: a stuck listener would block opens on the whole
/// machine; exiting closes the group and the kernel allows whatever is pending. `_exit`,
/// not abort: a core dump is a file open.
struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    fn arm(limit: Duration) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                if started.elapsed() > limit {
                    eprintln!("fanotify test watchdog: over {limit:?}, exiting");
                    // SAFETY: ends the process.
                    unsafe { libc::_exit(99) };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// base/plain.txt (allowed) and base/<marker>/{secret.txt,true} (denied by `marker_judge`).
struct Tree {
    base: PathBuf,
    marker: String,
    plain: PathBuf,
    secret: PathBuf,
    exe: PathBuf,
}

impl Tree {
    fn new(tag: &str) -> Self {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos();
        let marker = format!("fanotify-deny-{}-{nanos}", std::process::id());
        let base = std::env::temp_dir().join(format!("enforcer-fanotify-{tag}-{}-{nanos}", std::process::id()));
        let dir = base.join(&marker);
        std::fs::create_dir_all(&dir).unwrap();
        let plain = base.join("plain.txt");
        std::fs::write(&plain, "plain\n").unwrap();
        let secret = dir.join("secret.txt");
        std::fs::write(&secret, "secret\n").unwrap();
        let exe = dir.join("true");
        std::fs::copy("/bin/true", &exe).unwrap();
        Self { base, marker, plain, secret, exe }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

type Seen = Arc<Mutex<Vec<FileRequest>>>;

/// Denies paths containing `marker` and records their requests; allows the rest. Fast and
/// opens nothing, as a judge must.
fn marker_judge(marker: &str, seen: Seen) -> Judge {
    let marker = marker.to_owned();
    Box::new(move |req| {
        if !req.path.as_os_str().as_bytes().windows(marker.len()).any(|w| w == marker.as_bytes()) {
            return true;
        }
        seen.lock().unwrap_or_else(|e| e.into_inner()).push(req.clone());
        false
    })
}

fn seen_for(seen: &Seen, path: &Path) -> Vec<FileRequest> {
    seen.lock().unwrap().iter().filter(|r| r.path == path).cloned().collect()
}

/// FAN_DENY fails the open with EPERM ("Operation not permitted"), not EACCES: only
/// pre-content groups may choose another errno, and EACCES is not among those allowed.
fn denied(out: &Output) -> bool {
    let stderr = String::from_utf8_lossy(&out.stderr);
    !out.status.success() && (stderr.contains("Operation not permitted") || stderr.contains("Permission denied"))
}

/// Runs this test binary's `child_helper` with `op`; returns its "CHILD " lines.
fn child(op: &str) -> Vec<String> {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "fanotify::tests::child_helper", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, op)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child {op}: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    // libtest prints "test <name> ... " on the same line before the first output.
    stdout.lines().filter_map(|l| l.split_once("CHILD ")).map(|(_, v)| v.to_owned()).collect()
}

/// The child side of the tests above (does nothing unless run by `child`):
/// - `openat2:<flags>:<path>` prints `errno=<n>` (0 on success)
/// - `thread-open:<path>` opens O_WRONLY from a second thread; prints `tid=<tid> errno=<n>`
/// - `loop:<n>:<path>` opens and closes n times; prints `ns_per_open=<x>`
#[test]
#[ignore = "run by the other tests as a child process"]
fn child_helper() {
    let Ok(op) = std::env::var(CHILD_ENV) else { return };
    fn errno() -> i32 {
        io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }
    let close_ok = |fd: libc::c_int| {
        if fd >= 0 {
            // SAFETY: our fd.
            unsafe { libc::close(fd) };
            0
        } else {
            errno()
        }
    };
    let mut parts = op.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("openat2"), Some(flags), Some(path)) => {
            let path = CString::new(path).unwrap();
            #[repr(C)]
            struct OpenHow {
                flags: u64,
                mode: u64,
                resolve: u64,
            }
            let how = OpenHow { flags: flags.parse().unwrap(), mode: 0, resolve: 0 };
            // SAFETY: openat2 with a valid path and open_how.
            let fd = unsafe {
                libc::syscall(libc::SYS_openat2, libc::AT_FDCWD, path.as_ptr(), &raw const how, size_of::<OpenHow>())
            } as libc::c_int;
            println!("CHILD errno={}", close_ok(fd));
        }
        (Some("thread-open"), Some(path), None) => {
            let path = CString::new(path).unwrap();
            let (tid, e) = std::thread::spawn(move || {
                // SAFETY: plain syscalls.
                let tid = unsafe { libc::gettid() };
                // SAFETY: a NUL-terminated path; the fd is checked and closed by close_ok.
                let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
                (tid, close_ok(fd))
            })
            .join()
            .unwrap();
            println!("CHILD tid={tid} errno={e}");
        }
        (Some("loop"), Some(n), Some(path)) => {
            let n: u32 = n.parse().unwrap();
            let path = CString::new(path).unwrap();
            let started = Instant::now();
            for _ in 0..n {
                // SAFETY: plain syscalls.
                let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
                assert!(fd >= 0, "open: {}", io::Error::last_os_error());
                // SAFETY: the fd just opened above, closed once.
                unsafe { libc::close(fd) };
            }
            println!("CHILD ns_per_open={}", started.elapsed().as_nanos() / u128::from(n));
        }
        _ => panic!("unknown {CHILD_ENV}={op}"),
    }
}

/// Devices holding a filesystem mark of some fanotify group of this process.
fn all_marked_devices() -> Vec<u64> {
    let mut devs = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let is_fanotify = std::fs::read_link(entry.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:[fanotify]");
        if let (true, Ok(fd)) = (is_fanotify, entry.file_name().to_string_lossy().parse::<RawFd>()) {
            devs.extend(marked_devices(fd).unwrap_or_default());
        }
    }
    devs
}

#[test]
fn enforces_reads_writes_and_exec() {
    if !usable() {
        return;
    }
    let _watchdog = Watchdog::arm(Duration::from_secs(120));
    // Shows which filesystems were marked (with --nocapture). Writes to stdout only: a
    // subscriber that opened files from the listener thread would deadlock it.
    let _ = tracing_subscriber::fmt().with_max_level(tracing::Level::DEBUG).with_test_writer().try_init();
    let tree = Tree::new("rwx");
    let seen: Seen = Arc::default();
    let fan = Fanotify::start(marker_judge(&tree.marker, seen.clone())).expect("start");
    assert!(fan.is_running());
    let marks = all_marked_devices();
    let tmp_dev = std::fs::metadata(&tree.base).unwrap().dev();
    assert!(marks.contains(&tmp_dev), "{tmp_dev:#x} not in {marks:x?}");

    let out = Command::new("cat").arg(&tree.plain).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"plain\n");

    let cat = Command::new("cat")
        .arg(&tree.secret)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let cat_pid = cat.id();
    let out = cat.wait_with_output().unwrap();
    assert!(denied(&out), "read of the marked file: {out:?}");

    let sh = Command::new("sh")
        .arg("-c")
        .arg(format!("echo x > '{}'", tree.secret.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sh_pid = sh.id();
    let out = sh.wait_with_output().unwrap();
    assert!(denied(&out), "write of the marked file: {out:?}");

    // FAN_ONDIR: listing the marked directory is a READ open of it.
    let dir = tree.secret.parent().unwrap().to_path_buf();
    let out = Command::new("ls").arg(&dir).output().unwrap();
    assert!(denied(&out), "listing of the marked directory: {out:?}");
    let reqs = seen_for(&seen, &dir);
    assert!(reqs.iter().any(|r| r.access == access::READ && r.access_known), "{reqs:#?}");

    let err = Command::new(&tree.exe).output().expect_err("exec of the marked binary");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");

    let meta = std::fs::metadata(&tree.secret).unwrap();
    let reqs = seen_for(&seen, &tree.secret);
    let want = |pid, access| FileRequest {
        pid,
        path: tree.secret.clone(),
        dev: meta.dev(),
        ino: meta.ino(),
        access,
        access_known: true,
    };
    assert!(reqs.contains(&want(cat_pid, access::READ)), "{reqs:#?}");
    assert!(reqs.contains(&want(sh_pid, access::WRITE)), "{reqs:#?}");
    let reqs = seen_for(&seen, &tree.exe);
    assert!(reqs.iter().any(|r| r.access == access::EXEC && r.access_known), "{reqs:#?}");
    let (allowed, denied_n) = fan.answered();
    assert!(allowed > 0 && denied_n >= 3, "answered {allowed} {denied_n}");
    assert_eq!(std::fs::read(&tree.secret).unwrap(), b"secret\n", "our own opens are allowed");

    drop(fan);
    let out = Command::new("cat").arg(&tree.secret).output().unwrap();
    assert!(out.status.success(), "after drop: {out:?}");
    assert_eq!(out.stdout, b"secret\n");
    assert!(Command::new(&tree.exe).status().unwrap().success(), "exec after drop");
}

#[test]
fn openat2_and_other_threads_report_their_access() {
    if !usable() {
        return;
    }
    let _watchdog = Watchdog::arm(Duration::from_secs(120));
    let tree = Tree::new("openat2");
    let seen: Seen = Arc::default();
    let fan = Fanotify::start(marker_judge(&tree.marker, seen.clone())).expect("start");
    let secret = tree.secret.to_str().unwrap();

    let eperm = format!("errno={}", libc::EPERM);
    assert_eq!(child(&format!("openat2:{}:{secret}", libc::O_RDONLY)), [eperm.as_str()]);
    assert_eq!(child(&format!("openat2:{}:{secret}", libc::O_RDWR | libc::O_APPEND)), [eperm.as_str()]);
    assert_eq!(child(&format!("openat2:{}:{}", libc::O_RDWR, tree.plain.display())), ["errno=0"]);
    let lines = child(&format!("thread-open:{secret}"));
    let (tid, e) = lines[0].split_once(' ').unwrap();
    assert_eq!(e, eperm);
    let tid: u32 = tid.strip_prefix("tid=").unwrap().parse().unwrap();
    drop(fan);

    let reqs = seen_for(&seen, &tree.secret);
    let accesses: Vec<(u8, bool)> = reqs.iter().map(|r| (r.access, r.access_known)).collect();
    assert_eq!(
        accesses,
        [(access::READ, true), (access::READ | access::WRITE, true), (access::WRITE, true)],
        "{reqs:#?}"
    );
    // FAN_REPORT_TID: the second thread is named, not the process.
    assert_eq!(reqs[2].pid, tid);
}

#[test]
fn a_panicking_judge_denies() {
    if !usable() {
        return;
    }
    let _watchdog = Watchdog::arm(Duration::from_secs(120));
    let tree = Tree::new("panic");
    let marker = tree.marker.clone();
    let fan = Fanotify::start(Box::new(move |req| {
        assert!(!req.path.to_string_lossy().contains(&marker), "judge panics on the marker");
        true
    }))
    .expect("start");
    let out = Command::new("cat").arg(&tree.secret).output().unwrap();
    assert!(denied(&out), "{out:?}");
    let out = Command::new("cat").arg(&tree.plain).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(fan.is_running());
}

#[test]
fn marks_filesystems_mounted_later() {
    if !usable() {
        return;
    }
    let _watchdog = Watchdog::arm(Duration::from_secs(120));
    let tree = Tree::new("mount");
    let seen: Seen = Arc::default();
    let fan = Fanotify::start(marker_judge(&tree.marker, seen.clone())).expect("start");
    let mnt = tree.base.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let target = CString::new(mnt.as_os_str().as_bytes()).unwrap();
    // SAFETY: mounts a fresh tmpfs on our own directory; unmounted below.
    let r = unsafe { libc::mount(c"none".as_ptr(), target.as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null()) };
    assert_eq!(r, 0, "mount: {}", io::Error::last_os_error());
    struct Unmount(CString);
    impl Drop for Unmount {
        fn drop(&mut self) {
            // SAFETY: detaches the tmpfs mounted above.
            unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _unmount = Unmount(target);
    let secret = mnt.join(&tree.marker);
    std::fs::write(&secret, "on tmpfs\n").unwrap();
    let tmpfs_dev = std::fs::metadata(&secret).unwrap().dev();
    // The listener marks it on the mount-table change; give it a moment.
    let started = Instant::now();
    let out = loop {
        let out = Command::new("cat").arg(&secret).output().unwrap();
        if !out.status.success() || started.elapsed() > Duration::from_secs(5) {
            break out;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(denied(&out), "{out:?}");
    assert!(seen_for(&seen, &secret).iter().any(|r| r.dev == tmpfs_dev && r.access == access::READ));
    drop(fan);
}

/// Per-open cost with and without the backend:
/// `cargo test -p enforcer --lib fanotify::tests::bench_open_close -- --ignored --nocapture`
#[test]
#[ignore = "measurement, not a test"]
fn bench_open_close() {
    if !usable() {
        return;
    }
    let _watchdog = Watchdog::arm(Duration::from_secs(300));
    let tree = Tree::new("bench");
    let op = format!("loop:10000:{}", tree.plain.display());
    let measure = || {
        (0..5)
            .map(|_| child(&op)[0].strip_prefix("ns_per_open=").unwrap().parse::<f64>().unwrap())
            .fold(f64::INFINITY, f64::min)
    };
    let without = measure();
    let seen: Seen = Arc::default();
    let fan = Fanotify::start(marker_judge(&tree.marker, seen)).expect("start");
    // CPU time of the listener thread ("fanotify"), from /proc/self/task/<tid>/schedstat.
    let listener_cpu_ns = || -> u64 {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "fanotify"))
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    let cpu_before = listener_cpu_ns();
    let with = measure();
    let cpu = listener_cpu_ns() - cpu_before;
    let (allowed, denied) = fan.answered();
    drop(fan);
    println!(
        "open+close, best of 5 x 10000: without {without:.0} ns, with fanotify {with:.0} ns, ratio {:.1}; \
         listener CPU {:.0} ns per answered event ({allowed} allowed, {denied} denied)",
        with / without,
        cpu as f64 / (allowed + denied) as f64
    );
}

#[test]
fn reads_open_flags_and_syscall_lines() {
    assert_eq!(access_from_flags(libc::O_RDONLY as u64), access::READ);
    assert_eq!(access_from_flags(libc::O_WRONLY as u64), access::WRITE);
    assert_eq!(access_from_flags(libc::O_RDWR as u64), access::READ | access::WRITE);
    assert_eq!(access_from_flags(3), access::READ | access::WRITE);
    assert_eq!(access_from_flags((libc::O_RDONLY | libc::O_TRUNC) as u64), access::READ | access::WRITE);
    assert_eq!(access_from_flags((libc::O_RDONLY | libc::O_CREAT) as u64), access::READ | access::WRITE);
    assert_eq!(access_from_flags((libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC) as u64), access::WRITE);

    let line = "257 0xffffff9c 0x7ffd1 0x241 0x1b6 0x0 0x0 0x7ffd0 0x7f00\n";
    assert_eq!(parse_syscall(line), Some((257, [0xffffff9c, 0x7ffd1, 0x241, 0x1b6, 0, 0])));
    assert_eq!(parse_syscall("running\n"), None);
    assert_eq!(parse_syscall("-1 0x7ffd0 0x7f00\n"), None);
    assert_eq!(ProcPath::new(4242, b"/syscall\0").as_cstr(), c"4242/syscall");
    assert_eq!(ProcPath::new(0, b"\0").as_cstr(), c"0");
}
