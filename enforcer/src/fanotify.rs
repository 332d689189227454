//! fanotify permission-event backend: the mechanism that lets user space decide file opens
//! where the kernel refuses BPF-LSM programs. Every filesystem of our mount namespace that can
//! hold user files gets a `FAN_MARK_FILESYSTEM` mark for `FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM`;
//! each open (or exec) of a regular file on them then waits in the kernel until the listener
//! thread of [`Fanotify`] answers `FAN_ALLOW` or `FAN_DENY`. The policy decision itself is the
//! judge callback given to [`Fanotify::start`].
//!
//! Hazards this module is built around:
//! - **Deadlock.** The listener thread must never open a file on a marked filesystem: its own
//!   open would wait for an answer only it can give, and every open on the machine would then
//!   hang behind it. It only touches `/proc` (the kernel refuses permission marks on procfs)
//!   and uses fd-based calls (`statx`, `readlinkat`) on the event fds. The judge runs on that
//!   thread, so it must not open files either (nor log through a subscriber that opens files).
//!   Panics on the listener thread skip the default panic hook, which may open the executable
//!   to symbolize a backtrace. Opens by other threads of this process are fine: events from
//!   this process are allowed without asking the judge.
//! - **Every permission event is answered exactly once**, also on errors; an unanswered event
//!   hangs the opener until the fanotify fd is closed. Closing the fanotify fd (on drop, or when
//!   the listener dies) makes the kernel allow whatever is still pending: that is fail-open, so
//!   the listener only gives up on errors that make the event stream unreadable.
//! - **Fail closed** otherwise: a request whose access mode cannot be read asks for READ|WRITE,
//!   a file that cannot be described (path, device, inode) is denied, a panicking judge denies.
use std::{
    cell::{Cell, RefCell},
    ffi::{CStr, CString, OsStr},
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    panic::{AssertUnwindSafe, catch_unwind},
    path::PathBuf,
    sync::{
        Arc, Mutex, Once,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, bail};
use enforcer_common::access;

/// One file-open waiting for a verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRequest {
    /// The opener: its thread id when the kernel supports `FAN_REPORT_TID` (5.9+, equal to the
    /// process id for a single-threaded process or the main thread), else its process id.
    /// Either names a `/proc/<pid>` directory; 0 when the opener lives in a pid namespace that
    /// ours cannot see.
    pub pid: u32,
    /// Path of the opened file as the kernel names it (readlink of /proc/self/fd/<event fd>),
    /// relative to our root; ends in " (deleted)" when the file was unlinked meanwhile.
    pub path: PathBuf,
    /// st_dev and st_ino of the opened file (fstat of the event fd), st_dev as the userspace dev_t.
    pub dev: u64,
    pub ino: u64,
    /// What the open asks for, as [`access`] bits: EXEC for an exec (both the
    /// `FAN_OPEN_EXEC_PERM` event and the `FAN_OPEN_PERM` event that follows it during
    /// execve); for other opens, the open flags of the blocked syscall. READ|WRITE when they
    /// cannot be read (see `access_known`).
    pub access: u8,
    /// false when the open flags could not be read (io_uring, 32-bit processes, a vanished
    /// process, a read error): `access` is then READ|WRITE, the most demanding request.
    pub access_known: bool,
}

/// The verdict callback: true allows the open. Runs on the listener thread, one event at a
/// time, while the opener waits; it must be fast and must not open files.
pub type Judge = Box<dyn Fn(&FileRequest) -> bool + Send + 'static>;

/// Events the listener asks for.
// FAN_ONDIR: listing a denied directory is an open too.
const PERM_EVENTS: u64 = PERM_BITS | libc::FAN_ONDIR;
/// The permission events among them: each needs an answer.
const PERM_BITS: u64 = libc::FAN_OPEN_PERM | libc::FAN_OPEN_EXEC_PERM;
const META_LEN: usize = size_of::<libc::fanotify_event_metadata>();
/// Read buffer: up to ~2700 events per read().
const BUF_LEN: usize = 64 * 1024;
/// Size of the listener's cache of open /proc/<tid>/syscall files.
const SYSCALL_FILES: usize = 16;
/// Filesystems that hold no user files, left unmarked. procfs refuses permission marks
/// anyway; devtmpfs holds device nodes, and before 6.x kernels a marked device node made the
/// kernel open the device itself for the event fd, in the listener's context (a /dev/tty
/// open failing with ENXIO there denies the opener; some drivers act on open and close).
const SKIPPED_FS: &[&str] = &[
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "bpf",
    "securityfs",
    "debugfs",
    "tracefs",
    "devpts",
    "devtmpfs",
    "mqueue",
    "pstore",
    "configfs",
    "fusectl",
    "hugetlbfs",
    "binfmt_misc",
    "autofs",
    "efivarfs",
    "nsfs",
    "rpc_pipefs",
];

thread_local! {
    /// Set on the listener thread: its panics bypass the default hook (see `install_panic_hook`).
    static IN_LISTENER: Cell<bool> = const { Cell::new(false) };
}

/// Counters shared by the listener and [`Fanotify`].
#[derive(Default)]
struct Stats {
    allowed: AtomicU64,
    denied: AtomicU64,
    overflows: AtomicU64,
    running: AtomicBool,
}

/// Which filesystems hold our mark; shared by `start` and the listener's rescans.
#[derive(Default)]
struct MarkState {
    /// st_dev of every super block marked at the last scan.
    marked: Vec<u64>,
    /// Super blocks whose mark failed and was already reported.
    warned: Vec<u64>,
}

/// A running fanotify permission-event backend; dropping it stops the listener and removes
/// every mark (the kernel allows what is still pending).
pub struct Fanotify {
    /// eventfd that wakes the listener to stop it.
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
}

impl Fanotify {
    /// Creates the fanotify group, starts the listener thread and marks every filesystem of
    /// our mount namespace (except the pseudo filesystems of `SKIPPED_FS`), one mark per super
    /// block. The listener watches /proc/self/mountinfo and marks filesystems mounted later in
    /// this namespace too. A filesystem that cannot be marked is a warning; none at all is an
    /// error.
    pub fn start(judge: Judge) -> anyhow::Result<Self> {
        let (fan, report_tid) = init_group().context("fanotify_init")?;
        // SAFETY: plain syscall; the result is checked.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if stop < 0 {
            return Err(io::Error::last_os_error()).context("eventfd");
        }
        // SAFETY: fresh fd we own.
        let stop = unsafe { OwnedFd::from_raw_fd(stop) };
        let proc_dir = open_path(c"/proc", libc::O_PATH | libc::O_DIRECTORY).context("/proc")?;
        let fd_dir = open_path(c"/proc/self/fd", libc::O_PATH | libc::O_DIRECTORY).context("/proc/self/fd")?;
        // Polled for POLLPRI: the mount table of our namespace changed.
        let mountinfo = open_path(c"/proc/self/mountinfo", libc::O_RDONLY).ok();
        let stats = Arc::new(Stats { running: AtomicBool::new(true), ..Stats::default() });
        let marks = Arc::new(Mutex::new(MarkState::default()));
        install_panic_hook();

        // The listener runs before the first mark: from then on any open of this thread (a
        // tracing subscriber writing to a file, say) needs it to answer.
        let fan_raw = fan.as_raw_fd();
        let listener = Listener {
            fan,
            stop: stop.as_raw_fd(),
            mountinfo,
            proc_dir,
            fd_dir,
            report_tid,
            my_pid: std::process::id() as i32,
            read_len: read_len(),
            syscall_files: RefCell::new(std::array::from_fn(|_| (0, None))),
            judge,
            stats: stats.clone(),
            marks: marks.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("fanotify".into())
            .spawn(move || listener.run())
            .context("spawning the fanotify listener")?;
        let this = Self { stop, thread: Some(thread), stats };
        let marked = mark_filesystems(fan_raw, &marks);
        if marked == 0 {
            bail!("fanotify: no filesystem could be marked");
        }
        tracing::info!(filesystems = marked, report_tid, "fanotify permission events enabled");
        Ok(this)
    }

    /// Whether fanotify permission events are available here: creates a `FAN_CLASS_CONTENT`
    /// group, checks that it accepts permission events and filesystem marks, and closes it.
    /// Nothing is marked for real (the probe mark sits on the "/" directory itself, whose
    /// opens make no events without FAN_ONDIR). Err has the reason.
    pub fn probe() -> Result<(), String> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_CONTENT | libc::FAN_CLOEXEC,
                (libc::O_RDONLY | libc::O_CLOEXEC) as libc::c_uint,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) => format!("fanotify_init: {e} (needs CAP_SYS_ADMIN in the initial user namespace)"),
                Some(libc::ENOSYS) => format!("fanotify_init: {e} (kernel built without CONFIG_FANOTIFY)"),
                _ => format!("fanotify_init(FAN_CLASS_CONTENT): {e}"),
            });
        }
        // SAFETY: fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mark = |flags: libc::c_uint| {
            // SAFETY: valid fd and NUL-terminated path.
            let r = unsafe { libc::fanotify_mark(fd.as_raw_fd(), flags, PERM_BITS, libc::AT_FDCWD, c"/".as_ptr()) };
            if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
        };
        mark(libc::FAN_MARK_ADD).map_err(|e| {
            format!(
                "fanotify refuses permission events: {e} (kernel built without CONFIG_FANOTIFY_ACCESS_PERMISSIONS?)"
            )
        })?;
        // Removing a filesystem mark that does not exist says ENOENT where FAN_MARK_FILESYSTEM
        // is known (5.1+), EINVAL where it is not.
        match mark(libc::FAN_MARK_REMOVE | libc::FAN_MARK_FILESYSTEM) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(format!("fanotify refuses filesystem marks: {e} (needs Linux 5.1+)")),
        }
    }

    /// Permission events answered so far (allowed, denied), this process's own included.
    pub fn answered(&self) -> (u64, u64) {
        (self.stats.allowed.load(Ordering::Relaxed), self.stats.denied.load(Ordering::Relaxed))
    }

    /// Whether the listener still runs. It stops only on drop or when the kernel's event
    /// stream becomes unreadable (logged as an error); the marks are gone then.
    pub fn is_running(&self) -> bool {
        self.stats.running.load(Ordering::Relaxed)
    }
}

impl Drop for Fanotify {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&raw const one).cast(), 8) };
        if let Some(thread) = self.thread.take() {
            // Joined before `stop` is closed. A judge dropping us cannot join itself.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// `fanotify_init` with the best flags this kernel takes: FAN_UNLIMITED_QUEUE (when the
/// bounded queue overflows, the kernel *allows* the opens it drops), FAN_REPORT_TID (to read
/// the blocked thread's syscall, not its main thread's). Returns the fd and whether events
/// carry thread ids.
fn init_group() -> io::Result<(OwnedFd, bool)> {
    let base = libc::FAN_CLASS_CONTENT | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK;
    let event_flags = (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as libc::c_uint;
    let attempts =
        [libc::FAN_UNLIMITED_QUEUE | libc::FAN_REPORT_TID, libc::FAN_UNLIMITED_QUEUE, libc::FAN_REPORT_TID, 0];
    let mut first_error = None;
    for extra in attempts {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::fanotify_init(base | extra, event_flags) };
        if fd >= 0 {
            if extra & libc::FAN_UNLIMITED_QUEUE == 0 {
                tracing::warn!("fanotify: no FAN_UNLIMITED_QUEUE; opens beyond a full queue are allowed by the kernel");
            }
            // SAFETY: fresh fd we own.
            return Ok((unsafe { OwnedFd::from_raw_fd(fd) }, extra & libc::FAN_REPORT_TID != 0));
        }
        let e = io::Error::last_os_error();
        let retry = matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EPERM));
        first_error.get_or_insert(e);
        if !retry {
            break;
        }
    }
    Err(first_error.expect("at least one attempt"))
}

fn open_path(path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// How many bytes one read() may ask for. Each event in a read carries a new fd; if the fd
/// table fills mid-read the kernel *denies* that event, so a read never asks for more events
/// than a quarter of the fd limit.
fn read_len() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: fills `lim`.
    let soft =
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 { lim.rlim_cur as usize } else { 1024 };
    (soft / 4).clamp(16, BUF_LEN / META_LEN) * META_LEN
}

/// Routes panics on the listener thread around the previous hook: the default hook may
/// capture and symbolize a backtrace (RUST_BACKTRACE), which opens the executable, and that
/// open would wait for the listener itself.
fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_LISTENER.with(Cell::get) {
                eprintln!("fanotify listener: {info}");
            } else {
                previous(info);
            }
        }));
    });
}

/// One mount of /proc/self/mountinfo.
#[derive(Debug, PartialEq, Eq)]
struct MountEntry {
    /// Its super block's device, as a userspace dev_t.
    dev: u64,
    mount_point: Vec<u8>,
    fstype: String,
}

/// Parses /proc/self/mountinfo: `id parent major:minor root mount-point options [optional...]
/// - fstype source super-options`, paths with octal escapes (`\040` for a space).
fn parse_mountinfo(text: &[u8]) -> Vec<MountEntry> {
    let mut mounts = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        if fields.len() < 7 {
            continue;
        }
        let Some(sep) = fields.iter().skip(6).position(|f| *f == b"-").map(|i| i + 6) else {
            continue;
        };
        let Some(fstype) = fields.get(sep + 1) else {
            continue;
        };
        let Some((major, minor)) = std::str::from_utf8(fields[2]).ok().and_then(|s| s.split_once(':')) else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (major.parse::<u32>(), minor.parse::<u32>()) else {
            continue;
        };
        mounts.push(MountEntry {
            dev: libc::makedev(major, minor) as u64,
            mount_point: unescape_octal(fields[4]),
            fstype: String::from_utf8_lossy(fstype).into_owned(),
        });
    }
    mounts
}

fn unescape_octal(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 3 < field.len() && field[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = field[i + 1..i + 4].iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

/// st_dev of `path` without following a final symlink, triggering an automount or asking a
/// network or FUSE server (AT_STATX_DONT_SYNC).
fn statx_dev(dirfd: RawFd, path: &CStr, flags: libc::c_int) -> Option<(u64, u64)> {
    // SAFETY: zeroed plain-data struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    let r = unsafe { libc::statx(dirfd, path.as_ptr(), flags | libc::AT_STATX_DONT_SYNC, libc::STATX_INO, &mut stx) };
    (r == 0).then(|| (libc::makedev(stx.stx_dev_major, stx.stx_dev_minor) as u64, stx.stx_ino))
}

/// Super blocks holding a mark of the group `fan`, from /proc/self/fdinfo/<fan>
/// ("fanotify sdev:<kernel dev_t in hex> ..."), as userspace dev_t. None if unreadable.
fn marked_devices(fan: RawFd) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fan}")).ok()?;
    Some(
        text.lines()
            .filter_map(|line| {
                let hex = line.strip_prefix("fanotify sdev:")?.split_whitespace().next()?;
                let kdev = u64::from_str_radix(hex, 16).ok()?;
                // Kernel dev_t: major << 20 | minor.
                Some(libc::makedev((kdev >> 20) as u32, (kdev & 0xf_ffff) as u32) as u64)
            })
            .collect(),
    )
}

/// Marks every super block of our mount namespace that `SKIPPED_FS` does not skip; returns
/// how many hold the mark. A mark goes through a path, so a mount point covered by another
/// mount marks the covering filesystem instead: each mark is checked against the group's
/// fdinfo, and other mount points of the same super block are tried. Runs on `start`'s thread
/// and on the listener (path lookups and /proc only, no opens on marked filesystems).
fn mark_filesystems(fan: RawFd, state: &Mutex<MarkState>) -> usize {
    let text = match std::fs::read("/proc/self/mountinfo") {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("fanotify: reading /proc/self/mountinfo: {e}");
            return 0;
        }
    };
    let mounts = parse_mountinfo(&text);
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    let mut devs: Vec<u64> = Vec::new();
    for m in &mounts {
        if !devs.contains(&m.dev) && !SKIPPED_FS.contains(&m.fstype.as_str()) {
            devs.push(m.dev);
        }
    }
    let (fdinfo_works, mut have) = match marked_devices(fan) {
        Some(have) => (true, have),
        None => (false, Vec::new()),
    };
    let mut marked = Vec::new();
    for dev in devs {
        if have.contains(&dev) {
            marked.push(dev);
            continue;
        }
        let mut ok = false;
        // Mount points whose lookup lands on this super block first; the others after
        // (btrfs subvolumes, say, report a st_dev of their own).
        let mut candidates: Vec<(bool, &MountEntry)> = mounts
            .iter()
            .filter(|m| m.dev == dev)
            .map(|m| {
                let here = CString::new(m.mount_point.clone()).ok().and_then(|path| {
                    statx_dev(libc::AT_FDCWD, &path, libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT)
                });
                (here.is_some_and(|(d, _)| d == dev), m)
            })
            .collect();
        candidates.sort_by_key(|(here, _)| !*here);
        let mut failure = None;
        for (_, m) in &candidates {
            if ok {
                break;
            }
            let Ok(path) = CString::new(m.mount_point.clone()) else {
                continue;
            };
            // SAFETY: valid fd and NUL-terminated path.
            let r = unsafe {
                libc::fanotify_mark(
                    fan,
                    libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                    PERM_EVENTS,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                )
            };
            if r != 0 {
                failure = Some((io::Error::last_os_error().to_string(), *m));
                continue;
            }
            if !fdinfo_works {
                ok = true;
            } else {
                have = marked_devices(fan).unwrap_or_default();
                ok = have.contains(&dev);
                if !ok {
                    failure = Some(("hidden under another mount".to_owned(), *m));
                }
            }
        }
        if ok {
            if let Some((_, m)) = candidates.first() {
                tracing::debug!(
                    fstype = m.fstype,
                    mount_point = %OsStr::from_bytes(&m.mount_point).to_string_lossy(),
                    "fanotify: filesystem marked"
                );
            }
            marked.push(dev);
        } else if let Some((e, m)) = failure
            && !state.warned.contains(&dev)
        {
            state.warned.push(dev);
            tracing::warn!(
                fstype = m.fstype,
                mount_point = %OsStr::from_bytes(&m.mount_point).to_string_lossy(),
                "fanotify: cannot mark this filesystem, its file opens are not checked: {e}"
            );
        }
    }
    state.marked = marked;
    state.marked.len()
}

/// A path of /proc built without allocating: "<number><suffix>" relative to a dirfd.
struct ProcPath {
    buf: [u8; 48],
    len: usize,
}

impl ProcPath {
    fn new(number: u64, suffix: &[u8]) -> Self {
        let mut digits = [0u8; 20];
        let mut n = number;
        let mut d = digits.len();
        loop {
            d -= 1;
            digits[d] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let mut p = Self { buf: [0; 48], len: 0 };
        for &b in digits[d..].iter().chain(suffix) {
            p.buf[p.len] = b;
            p.len += 1;
        }
        p
    }

    fn as_cstr(&self) -> &CStr {
        CStr::from_bytes_until_nul(&self.buf).expect("NUL-terminated")
    }
}

/// Syscall numbers that reach `FAN_OPEN_PERM`, and where their open flags are.
enum OpenCall {
    /// Flags in argument i.
    Flags(usize),
    /// `struct open_how *` in argument i (openat2): flags are its first u64.
    OpenHow(usize),
    /// creat(): O_CREAT|O_WRONLY|O_TRUNC.
    Creat,
    /// execve and friends: the open that follows FAN_OPEN_EXEC_PERM.
    Exec,
}

#[cfg(target_arch = "x86_64")]
fn open_call(nr: i64) -> Option<OpenCall> {
    // x32 processes use the x86_64 numbers with bit 30 set, plus x32-only numbers.
    match nr & !0x4000_0000 {
        2 => Some(OpenCall::Flags(1)),                      // open
        257 | 304 => Some(OpenCall::Flags(2)),              // openat, open_by_handle_at
        437 => Some(OpenCall::OpenHow(2)),                  // openat2
        85 => Some(OpenCall::Creat),                        // creat
        59 | 322 | 134 | 520 | 545 => Some(OpenCall::Exec), // execve, execveat, uselib, x32 execve/execveat
        _ => None,
    }
}

#[cfg(target_arch = "aarch64")]
fn open_call(nr: i64) -> Option<OpenCall> {
    match nr {
        56 | 265 => Some(OpenCall::Flags(2)), // openat, open_by_handle_at
        437 => Some(OpenCall::OpenHow(2)),    // openat2
        221 | 281 => Some(OpenCall::Exec),    // execve, execveat
        _ => None,
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn open_call(_nr: i64) -> Option<OpenCall> {
    None
}

/// Access bits asked by open flags: the access mode, plus WRITE for O_TRUNC or O_CREAT.
fn access_from_flags(flags: u64) -> u8 {
    let flags = flags as libc::c_int;
    let mut bits = match flags & libc::O_ACCMODE {
        libc::O_RDONLY => access::READ,
        libc::O_WRONLY => access::WRITE,
        // O_RDWR, and 3 (ioctl-only opens, which the kernel checks for read and write).
        _ => access::READ | access::WRITE,
    };
    if flags & (libc::O_TRUNC | libc::O_CREAT) != 0 {
        bits |= access::WRITE;
    }
    bits
}

/// Parses /proc/<tid>/syscall: `nr arg1 ... arg6 sp pc` (args in hex). None while the task
/// runs ("running") or is not in a syscall (nr -1).
fn parse_syscall(text: &str) -> Option<(i64, [u64; 6])> {
    let mut fields = text.split_ascii_whitespace();
    let nr: i64 = fields.next()?.parse().ok()?;
    if nr < 0 {
        return None;
    }
    let mut args = [0u64; 6];
    for a in &mut args {
        let f = fields.next()?;
        *a = u64::from_str_radix(f.strip_prefix("0x").unwrap_or(f), 16).ok()?;
    }
    Some((nr, args))
}

/// The listener thread's state; owns the fanotify fd, so the group dies with the thread.
struct Listener {
    fan: OwnedFd,
    stop: RawFd,
    mountinfo: Option<OwnedFd>,
    proc_dir: OwnedFd,
    fd_dir: OwnedFd,
    report_tid: bool,
    my_pid: i32,
    read_len: usize,
    /// Open /proc/<tid>/syscall files by tid (slot tid % len): a thread opening many files
    /// costs one pread per open instead of open+read+close. A cached fd pins its task's
    /// `struct pid`, so once the task is gone it reads ESRCH (even if the number is reused)
    /// and is reopened.
    syscall_files: RefCell<[(i32, Option<OwnedFd>); SYSCALL_FILES]>,
    judge: Judge,
    stats: Arc<Stats>,
    marks: Arc<Mutex<MarkState>>,
}

impl Listener {
    fn run(self) {
        IN_LISTENER.with(|f| f.set(true));
        struct Running<'a>(&'a AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Relaxed);
            }
        }
        let _running = Running(&self.stats.running);
        // u64 elements for the alignment of fanotify_event_metadata; allocated once.
        let mut buf = vec![0u64; BUF_LEN / 8];
        loop {
            let mut fds = [
                libc::pollfd { fd: self.fan.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.stop, events: libc::POLLIN, revents: 0 },
                libc::pollfd {
                    fd: self.mountinfo.as_ref().map_or(-1, |f| f.as_raw_fd()),
                    events: libc::POLLPRI,
                    revents: 0,
                },
            ];
            // SAFETY: valid pollfd array.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("fanotify: poll: {e}; listener stops, opens are no longer checked");
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            if fds[2].revents & (libc::POLLPRI | libc::POLLERR) != 0 {
                mark_filesystems(self.fan.as_raw_fd(), &self.marks);
            }
            if fds[0].revents != 0 && !self.drain(&mut buf) {
                self.stats.running.store(false, Ordering::Relaxed);
                return;
            }
        }
    }

    /// Reads and answers events until the queue is empty. false on a fatal error.
    fn drain(&self, buf: &mut [u64]) -> bool {
        loop {
            // SAFETY: reads at most `read_len` <= buf's size in bytes.
            let n = unsafe { libc::read(self.fan.as_raw_fd(), buf.as_mut_ptr().cast(), self.read_len) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return true,
                    Some(libc::EINTR) => continue,
                    // The kernel could not open an fd for the event and denied it itself.
                    Some(libc::EMFILE | libc::ENFILE) => {
                        tracing::warn!("fanotify: out of file descriptors, the kernel denied an open: {e}");
                        continue;
                    }
                    _ => {
                        tracing::warn!("fanotify: read: {e}");
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        return true;
                    }
                }
            }
            let n = n as usize;
            // SAFETY: the first n bytes were written by read(); u64 storage viewed as bytes.
            let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
            let mut off = 0;
            while off + META_LEN <= n {
                // SAFETY: META_LEN bytes in bounds; plain-data struct.
                let meta: libc::fanotify_event_metadata =
                    unsafe { std::ptr::read_unaligned(bytes[off..].as_ptr().cast()) };
                if meta.vers != libc::FANOTIFY_METADATA_VERSION {
                    // Nothing after this can be parsed or answered: give up, and the kernel
                    // allows what is pending when the fd closes.
                    tracing::error!(
                        got = meta.vers,
                        want = libc::FANOTIFY_METADATA_VERSION,
                        "fanotify: event metadata version mismatch; listener stops, opens are no longer checked"
                    );
                    return false;
                }
                let len = meta.event_len as usize;
                if len < META_LEN || off + len > n {
                    tracing::error!(len, "fanotify: malformed event; listener stops, opens are no longer checked");
                    return false;
                }
                self.handle(&meta);
                off += len;
            }
        }
    }

    /// Answers one event (exactly once when it is a permission event) and closes its fd.
    fn handle(&self, meta: &libc::fanotify_event_metadata) {
        if meta.mask & libc::FAN_Q_OVERFLOW != 0 {
            self.stats.overflows.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("fanotify: event queue overflow; the kernel allowed the opens it dropped");
        }
        if meta.fd < 0 {
            return; // FAN_NOFD: nothing to answer.
        }
        // SAFETY: the kernel gave us this fd; we close it after answering.
        let event_fd = unsafe { OwnedFd::from_raw_fd(meta.fd) };
        if meta.mask & PERM_BITS == 0 {
            return;
        }
        let allow = self.is_self(meta.pid) || self.decide(&event_fd, meta);
        // Counted before the answer wakes the opener, so whoever sees the open's outcome
        // also sees the count.
        let counter = if allow { &self.stats.allowed } else { &self.stats.denied };
        counter.fetch_add(1, Ordering::Relaxed);
        let response =
            libc::fanotify_response { fd: meta.fd, response: if allow { libc::FAN_ALLOW } else { libc::FAN_DENY } };
        loop {
            // SAFETY: writes one fanotify_response.
            let r = unsafe {
                libc::write(self.fan.as_raw_fd(), (&raw const response).cast(), size_of::<libc::fanotify_response>())
            };
            if r >= 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                // ENOENT: the opener was killed and the kernel dropped the event.
                tracing::debug!("fanotify: answering event: {e}");
                break;
            }
        }
        drop(event_fd); // after the answer: the kernel finds the event by its fd number.
    }

    /// Whether the opener is a thread of this process.
    fn is_self(&self, pid: i32) -> bool {
        if pid == self.my_pid {
            return true;
        }
        if !self.report_tid || pid <= 0 {
            return false;
        }
        // tgkill(signal 0) only checks that thread `pid` belongs to thread group `my_pid`:
        // one syscall, no /proc lookup.
        // SAFETY: signal 0 sends nothing.
        unsafe { libc::syscall(libc::SYS_tgkill, self.my_pid, pid, 0) == 0 }
    }

    /// Describes the open and asks the judge; any failure denies.
    fn decide(&self, event_fd: &OwnedFd, meta: &libc::fanotify_event_metadata) -> bool {
        let verdict = catch_unwind(AssertUnwindSafe(|| {
            let request = self.describe(event_fd, meta)?;
            Ok::<bool, &'static str>((self.judge)(&request))
        }));
        match verdict {
            Ok(Ok(allow)) => allow,
            Ok(Err(why)) => {
                tracing::warn!(pid = meta.pid, "fanotify: open denied, {why}");
                false
            }
            Err(_) => {
                tracing::error!(pid = meta.pid, "fanotify: the judge panicked; open denied");
                false
            }
        }
    }

    fn describe(&self, event_fd: &OwnedFd, meta: &libc::fanotify_event_metadata) -> Result<FileRequest, &'static str> {
        let mut link = [0u8; libc::PATH_MAX as usize + 1];
        let p = ProcPath::new(event_fd.as_raw_fd() as u64, b"\0");
        // SAFETY: valid dirfd, path and buffer.
        let n = unsafe {
            libc::readlinkat(self.fd_dir.as_raw_fd(), p.as_cstr().as_ptr(), link.as_mut_ptr().cast(), link.len())
        };
        if n < 0 || n as usize >= link.len() {
            return Err("cannot read the opened file's path");
        }
        let path = PathBuf::from(OsStr::from_bytes(&link[..n as usize]));
        let (dev, ino) =
            statx_dev(event_fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH).ok_or("cannot stat the opened file")?;
        let (access, access_known) = if meta.mask & libc::FAN_OPEN_EXEC_PERM != 0 {
            (access::EXEC, true)
        } else {
            match self.open_access(meta.pid) {
                Some(a) => (a, true),
                None => (access::READ | access::WRITE, false),
            }
        };
        Ok(FileRequest { pid: meta.pid.max(0) as u32, path, dev, ino, access, access_known })
    }

    /// The access asked by the open the thread `tid` is blocked in, from its syscall's flags.
    /// Without FAN_REPORT_TID this reads the main thread's syscall, which may be another one.
    fn open_access(&self, tid: i32) -> Option<u8> {
        if tid <= 0 {
            return None;
        }
        let mut text = [0u8; 256];
        // The event can reach us before the opener has gone to sleep, and the kernel
        // reports "running" until it has: retry briefly instead of failing closed.
        let mut n = self.read_syscall_file(tid, &mut text)?;
        for attempt in 0..200 {
            if !text[..n].starts_with(b"running") {
                break;
            }
            if attempt < 20 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            n = self.read_syscall_file(tid, &mut text)?;
        }
        let (nr, args) = parse_syscall(std::str::from_utf8(&text[..n]).ok()?)?;
        match open_call(nr)? {
            OpenCall::Flags(i) => Some(access_from_flags(args[i])),
            OpenCall::Creat => Some(access::WRITE),
            OpenCall::Exec => Some(access::EXEC),
            OpenCall::OpenHow(i) => {
                let mem = self.open_proc(tid, b"/mem\0")?;
                let mut flags = [0u8; 8];
                // SAFETY: reads 8 bytes at the opener's `struct open_how`.
                let n = unsafe { libc::pread(mem.as_raw_fd(), flags.as_mut_ptr().cast(), 8, args[i] as libc::off_t) };
                (n == 8).then(|| access_from_flags(u64::from_ne_bytes(flags)))
            }
        }
    }

    /// Reads /proc/<tid>/syscall through the cache of `syscall_files`.
    fn read_syscall_file(&self, tid: i32, text: &mut [u8]) -> Option<usize> {
        let pread = |fd: &OwnedFd, text: &mut [u8]| {
            // SAFETY: reads into the buffer; offset 0 makes the seq file show afresh.
            let n = unsafe { libc::pread(fd.as_raw_fd(), text.as_mut_ptr().cast(), text.len(), 0) };
            (n > 0).then_some(n as usize)
        };
        let mut files = self.syscall_files.borrow_mut();
        let slot = &mut files[tid as usize % SYSCALL_FILES];
        if slot.0 == tid
            && let Some(fd) = &slot.1
            && let Some(n) = pread(fd, text)
        {
            return Some(n);
        }
        *slot = (tid, self.open_proc(tid, b"/syscall\0"));
        pread(slot.1.as_ref()?, text)
    }

    fn open_proc(&self, tid: i32, suffix: &[u8]) -> Option<OwnedFd> {
        let p = ProcPath::new(tid as u64, suffix);
        // SAFETY: valid dirfd and path.
        let fd =
            unsafe { libc::openat(self.proc_dir.as_raw_fd(), p.as_cstr().as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        // SAFETY: fresh fd we own.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        os::unix::fs::MetadataExt as _,
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
                    libc::syscall(
                        libc::SYS_openat2,
                        libc::AT_FDCWD,
                        path.as_ptr(),
                        &raw const how,
                        size_of::<OpenHow>(),
                    )
                } as libc::c_int;
                println!("CHILD errno={}", close_ok(fd));
            }
            (Some("thread-open"), Some(path), None) => {
                let path = CString::new(path).unwrap();
                let (tid, e) = std::thread::spawn(move || {
                    // SAFETY: plain syscalls.
                    let tid = unsafe { libc::gettid() };
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
    fn parses_mountinfo() {
        let text = b"22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
            30 22 0:25 / /mnt/with\\040space rw - tmpfs tmpfs rw\n\
            31 22 0:26 /sub /srv rw master:3 shared:4 - btrfs /dev/sdb rw\n\
            garbage\n";
        assert_eq!(
            parse_mountinfo(text),
            [
                MountEntry { dev: libc::makedev(254, 0) as u64, mount_point: b"/".to_vec(), fstype: "ext4".into() },
                MountEntry {
                    dev: libc::makedev(0, 25) as u64,
                    mount_point: b"/mnt/with space".to_vec(),
                    fstype: "tmpfs".into()
                },
                MountEntry { dev: libc::makedev(0, 26) as u64, mount_point: b"/srv".to_vec(), fstype: "btrfs".into() },
            ]
        );
        assert_eq!(unescape_octal(b"a\\134b\\01"), b"a\\b\\01");
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
}
