//! Marking every filesystem of our mount namespace for permission events, and finding
//! which ones hold the mark (a mark goes through a path, which another mount may cover).
use std::{
    ffi::{CStr, CString, OsStr},
    os::{
        fd::{AsRawFd as _, RawFd},
        unix::ffi::OsStrExt as _,
    },
    sync::Mutex,
};

use enforcer_common::host::{Mount, parse_mountinfo};
use nix::sys::fanotify::{Fanotify as Group, MarkFlags};

use super::{PERM_EVENTS, SKIPPED_FS};

/// Which filesystems hold our mark; shared by `start` and the listener's rescans.
#[derive(Default)]
pub(super) struct MarkState {
    /// st_dev of every super block marked at the last scan.
    marked: Vec<u64>,
    /// Super blocks whose mark failed and was already reported.
    warned: Vec<u64>,
}

/// st_dev of `path` without following a final symlink, triggering an automount or asking a
/// network or FUSE server (AT_STATX_DONT_SYNC).
pub(super) fn statx_dev(dirfd: RawFd, path: &CStr, flags: libc::c_int) -> Option<(u64, u64)> {
    // SAFETY: a plain-data struct, all zeroes a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stx` outlives the call. Raw statx: neither nix
    // nor std offers AT_STATX_DONT_SYNC, which keeps a FUSE or network server out of it.
    let r = unsafe { libc::statx(dirfd, path.as_ptr(), flags | libc::AT_STATX_DONT_SYNC, libc::STATX_INO, &mut stx) };
    (r == 0).then(|| (nix::sys::stat::makedev(stx.stx_dev_major.into(), stx.stx_dev_minor.into()), stx.stx_ino))
}

/// Super blocks holding a mark of the group `fan`, from /proc/self/fdinfo/<fan>
/// ("fanotify sdev:<kernel dev_t in hex> ..."), as userspace dev_t. None if unreadable.
pub(super) fn marked_devices(fan: RawFd) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fan}")).ok()?;
    Some(
        text.lines()
            .filter_map(|line| {
                let hex = line.strip_prefix("fanotify sdev:")?.split_whitespace().next()?;
                let kdev = u64::from_str_radix(hex, 16).ok()?;
                // Kernel dev_t: major << 20 | minor.
                Some(nix::sys::stat::makedev(kdev >> 20, kdev & 0xf_ffff))
            })
            .collect(),
    )
}

/// Marks every super block of our mount namespace that `SKIPPED_FS` does not skip; returns
/// how many hold the mark. A mark goes through a path, so a mount point covered by another
/// mount marks the covering filesystem instead: each mark is checked against the group's
/// fdinfo, and other mount points of the same super block are tried. Runs on `start`'s thread
/// and on the listener (path lookups and /proc only, no opens on marked filesystems).
pub(super) fn mark_filesystems(group: &Group, state: &Mutex<MarkState>) -> usize {
    let fan = group.as_raw_fd();
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
        let mut candidates: Vec<(bool, &Mount)> = mounts
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
            let marked = group.mark(
                MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
                PERM_EVENTS,
                nix::fcntl::AT_FDCWD,
                Some(path.as_c_str()),
            );
            if let Err(e) = marked {
                failure = Some((std::io::Error::from(e).to_string(), *m));
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
