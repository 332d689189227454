//! The listener thread: reads permission events, describes each open (path, device,
//! inode, the access its syscall asked for) and answers it with the judge's verdict.
use std::{
    cell::RefCell,
    ffi::CStr,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    panic::{AssertUnwindSafe, catch_unwind},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use enforcer_common::access;
use nix::{
    errno::Errno,
    fcntl::OFlag,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        fanotify::{Fanotify as Group, FanotifyResponse, MaskFlags, Response},
        stat::Mode,
        uio::pread,
    },
};

use super::{
    BUF_LEN, FileRequest, IN_LISTENER, Judge, META_LEN, PERM_BITS, SYSCALL_FILES, Stats,
    marks::{MarkState, mark_filesystems, statx_dev},
};

/// A path of /proc built without allocating: "<number><suffix>" relative to a dirfd.
pub(super) struct ProcPath {
    buf: [u8; 48],
    len: usize,
}

impl ProcPath {
    pub(super) fn new(number: u64, suffix: &[u8]) -> Self {
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

    pub(super) fn as_cstr(&self) -> &CStr {
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
pub(super) fn access_from_flags(flags: u64) -> u8 {
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
pub(super) fn parse_syscall(text: &str) -> Option<(i64, [u64; 6])> {
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
pub(super) struct Listener {
    pub(super) fan: Arc<Group>,
    pub(super) stop: OwnedFd,
    pub(super) mountinfo: Option<OwnedFd>,
    pub(super) proc_dir: OwnedFd,
    pub(super) fd_dir: OwnedFd,
    pub(super) report_tid: bool,
    pub(super) my_pid: i32,
    pub(super) read_len: usize,
    /// Open /proc/<tid>/syscall files by tid (slot tid % len): a thread opening many files
    /// costs one pread per open instead of open+read+close. A cached fd pins its task's
    /// `struct pid`, so once the task is gone it reads ESRCH (even if the number is reused)
    /// and is reopened.
    pub(super) syscall_files: RefCell<[(i32, Option<OwnedFd>); SYSCALL_FILES]>,
    pub(super) judge: Judge,
    pub(super) stats: Arc<Stats>,
    pub(super) marks: Arc<Mutex<MarkState>>,
}

impl Listener {
    pub(super) fn run(self) {
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
            let mut fds = vec![
                PollFd::new(self.fan.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.stop.as_fd(), PollFlags::POLLIN),
            ];
            if let Some(mountinfo) = &self.mountinfo {
                fds.push(PollFd::new(mountinfo.as_fd(), PollFlags::POLLPRI));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!("fanotify: poll: {e}; listener stops, opens are no longer checked");
                    return;
                }
            }
            let fired =
                |i: usize, flags: PollFlags| fds.get(i).and_then(PollFd::revents).is_some_and(|r| r.intersects(flags));
            if fired(1, PollFlags::all()) {
                return;
            }
            if fired(2, PollFlags::POLLPRI | PollFlags::POLLERR) {
                mark_filesystems(&self.fan, &self.marks);
            }
            if fired(0, PollFlags::all()) && !self.drain(&mut buf) {
                self.stats.running.store(false, Ordering::Relaxed);
                return;
            }
        }
    }

    /// Reads and answers events until the queue is empty. false on a fatal error.
    fn drain(&self, buf: &mut [u64]) -> bool {
        loop {
            // SAFETY: u64 storage viewed as bytes (any bit pattern is valid for both); the
            // view ends with this iteration.
            let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), buf.len() * 8) };
            // A bounded read of the raw stream (nix's read_events reads a fixed 4 KiB and
            // does not check the records): see `read_len`.
            let n = match nix::unistd::read(self.fan.as_fd(), &mut bytes[..self.read_len]) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => return true,
                Err(Errno::EINTR) => continue,
                // The kernel could not open an fd for the event and denied it itself.
                Err(e @ (Errno::EMFILE | Errno::ENFILE)) => {
                    tracing::warn!("fanotify: out of file descriptors, the kernel denied an open: {e}");
                    continue;
                }
                Err(e) => {
                    tracing::warn!("fanotify: read: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    return true;
                }
            };
            let bytes = &bytes[..n];
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
        let mask = MaskFlags::from_bits_truncate(meta.mask);
        if mask.contains(MaskFlags::FAN_Q_OVERFLOW) {
            self.stats.overflows.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("fanotify: event queue overflow; the kernel allowed the opens it dropped");
        }
        if meta.fd < 0 {
            return; // FAN_NOFD: nothing to answer.
        }
        // SAFETY: the kernel gave us this fd; we close it after answering.
        let event_fd = unsafe { OwnedFd::from_raw_fd(meta.fd) };
        if !mask.intersects(PERM_BITS) {
            return;
        }
        let allow = self.is_self(meta.pid) || self.decide(&event_fd, meta);
        // Counted before the answer wakes the opener, so whoever sees the open's outcome
        // also sees the count.
        let counter = if allow { &self.stats.allowed } else { &self.stats.denied };
        counter.fetch_add(1, Ordering::Relaxed);
        let response = if allow { Response::FAN_ALLOW } else { Response::FAN_DENY };
        loop {
            match self.fan.write_response(FanotifyResponse::new(event_fd.as_fd(), response)) {
                Ok(()) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    // ENOENT: the opener was killed and the kernel dropped the event.
                    tracing::debug!("fanotify: answering event: {e}");
                    break;
                }
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
        let p = ProcPath::new(event_fd.as_raw_fd() as u64, b"\0");
        let path = PathBuf::from(
            nix::fcntl::readlinkat(&self.fd_dir, p.as_cstr()).map_err(|_| "cannot read the opened file's path")?,
        );
        let (dev, ino) =
            statx_dev(event_fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH).ok_or("cannot stat the opened file")?;
        let (access, access_known) = if MaskFlags::from_bits_truncate(meta.mask).contains(MaskFlags::FAN_OPEN_EXEC_PERM)
        {
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
                // The opener's `struct open_how`: its flags are the first u64.
                let n = pread(&mem, &mut flags, args[i] as libc::off_t).ok()?;
                (n == 8).then(|| access_from_flags(u64::from_ne_bytes(flags)))
            }
        }
    }

    /// Reads /proc/<tid>/syscall through the cache of `syscall_files`.
    fn read_syscall_file(&self, tid: i32, text: &mut [u8]) -> Option<usize> {
        // Offset 0 makes the seq file show afresh.
        let pread = |fd: &OwnedFd, text: &mut [u8]| pread(fd, text, 0).ok().filter(|&n| n > 0);
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
        nix::fcntl::openat(&self.proc_dir, p.as_cstr(), OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).ok()
    }
}
