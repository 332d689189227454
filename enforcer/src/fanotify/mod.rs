//! The fanotify permission-event backend: the mechanism that lets user space decide file opens
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
mod listener;
mod marks;
#[cfg(test)]
mod tests;

use std::{
    cell::{Cell, RefCell},
    ffi::CStr,
    os::fd::{AsFd as _, OwnedFd},
    path::PathBuf,
    sync::{
        Arc, Mutex, Once,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, bail};
use nix::{
    errno::Errno,
    fcntl::OFlag,
    sys::{
        eventfd::{EfdFlags, EventFd},
        fanotify::{EventFFlags, Fanotify as Group, InitFlags, MarkFlags, MaskFlags},
        resource::{Resource, getrlimit},
        stat::Mode,
    },
};

use listener::Listener;
use marks::{MarkState, mark_filesystems};

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

/// The permission events: each needs an answer.
const PERM_BITS: MaskFlags = MaskFlags::FAN_OPEN_PERM.union(MaskFlags::FAN_OPEN_EXEC_PERM);
/// Events the listener asks for. FAN_ONDIR: listing a denied directory is an open too.
const PERM_EVENTS: MaskFlags = PERM_BITS.union(MaskFlags::FAN_ONDIR);
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

/// A running fanotify permission-event backend; dropping it stops the listener and removes
/// every mark (the kernel allows what is still pending).
pub struct Fanotify {
    /// Wakes the listener to stop it.
    stop: EventFd,
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
        let stop = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).context("eventfd")?;
        let proc_dir = open_path(c"/proc", OFlag::O_PATH | OFlag::O_DIRECTORY).context("/proc")?;
        let fd_dir = open_path(c"/proc/self/fd", OFlag::O_PATH | OFlag::O_DIRECTORY).context("/proc/self/fd")?;
        // Polled for POLLPRI: the mount table of our namespace changed.
        let mountinfo = open_path(c"/proc/self/mountinfo", OFlag::O_RDONLY).ok();
        let stats = Arc::new(Stats { running: AtomicBool::new(true), ..Stats::default() });
        let marks = Arc::new(Mutex::new(MarkState::default()));
        install_panic_hook();

        // The listener runs before the first mark: from then on any open of this thread (a
        // tracing subscriber writing to a file, say) needs it to answer.
        let fan = Arc::new(fan);
        let listener = Listener {
            fan: fan.clone(),
            stop: stop.as_fd().try_clone_to_owned().context("eventfd")?,
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
        let marked = mark_filesystems(&fan, &marks);
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
        let group = Group::init(
            InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC,
            EventFFlags::O_RDONLY | EventFFlags::O_CLOEXEC,
        )
        .map_err(|e| match e {
            Errno::EPERM => format!("fanotify_init: {e} (needs CAP_SYS_ADMIN in the initial user namespace)"),
            Errno::ENOSYS => format!("fanotify_init: {e} (kernel built without CONFIG_FANOTIFY)"),
            _ => format!("fanotify_init(FAN_CLASS_CONTENT): {e}"),
        })?;
        let mark = |flags: MarkFlags| group.mark(flags, PERM_BITS, nix::fcntl::AT_FDCWD, Some("/"));
        mark(MarkFlags::FAN_MARK_ADD).map_err(|e| {
            format!(
                "fanotify refuses permission events: {e} (kernel built without CONFIG_FANOTIFY_ACCESS_PERMISSIONS?)"
            )
        })?;
        // Removing a filesystem mark that does not exist says ENOENT where FAN_MARK_FILESYSTEM
        // is known (5.1+), EINVAL where it is not.
        match mark(MarkFlags::FAN_MARK_REMOVE | MarkFlags::FAN_MARK_FILESYSTEM) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
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
        let _ = self.stop.write(1);
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
/// the blocked thread's syscall, not its main thread's). Returns the group and whether events
/// carry thread ids.
fn init_group() -> nix::Result<(Group, bool)> {
    let base = InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK;
    let event_flags = EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC;
    let (unlimited, tid) = (InitFlags::FAN_UNLIMITED_QUEUE, InitFlags::FAN_REPORT_TID);
    let mut first_error = None;
    for extra in [unlimited | tid, unlimited, tid, InitFlags::empty()] {
        match Group::init(base | extra, event_flags) {
            Ok(group) => {
                if !extra.contains(unlimited) {
                    tracing::warn!(
                        "fanotify: no FAN_UNLIMITED_QUEUE; opens beyond a full queue are allowed by the kernel"
                    );
                }
                return Ok((group, extra.contains(tid)));
            }
            Err(e) => {
                first_error.get_or_insert(e);
                if !matches!(e, Errno::EINVAL | Errno::EPERM) {
                    break;
                }
            }
        }
    }
    Err(first_error.expect("at least one attempt"))
}

fn open_path(path: &CStr, flags: OFlag) -> nix::Result<OwnedFd> {
    nix::fcntl::open(path, flags | OFlag::O_CLOEXEC, Mode::empty())
}

/// How many bytes one read() may ask for. Each event in a read carries a new fd; if the fd
/// table fills mid-read the kernel *denies* that event, so a read never asks for more events
/// than a quarter of the fd limit.
fn read_len() -> usize {
    let soft = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft as usize);
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
