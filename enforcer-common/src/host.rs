//! Facts about the host that the controller, the integration tests and xtask must read
//! the same way: the mount table, the cgroup v2 mount, the boot-time clock the kernel
//! stamps events and checks expiries with. Behind the `std` feature.
use std::{io, path::PathBuf, string::String, vec::Vec};

use nix::time::{ClockId, clock_gettime};

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Its super block's device, as a userspace dev_t.
    pub dev: u64,
    /// Octal escapes (`\040` for a space) undone; not necessarily UTF-8.
    pub mount_point: Vec<u8>,
    pub fstype: String,
}

impl Mount {
    pub fn path(&self) -> PathBuf {
        use std::os::unix::ffi::OsStrExt as _;
        PathBuf::from(std::ffi::OsStr::from_bytes(&self.mount_point))
    }
}

/// Parses /proc/self/mountinfo: `id parent major:minor root mount-point options
/// [optional...] - fstype source super-options`. Lines that do not parse are skipped.
pub fn parse_mountinfo(text: &[u8]) -> Vec<Mount> {
    let mut mounts = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        if fields.len() < 7 {
            continue;
        }
        let Some(sep) = fields.iter().skip(6).position(|f| *f == b"-").map(|i| i + 6) else { continue };
        let Some(fstype) = fields.get(sep + 1) else { continue };
        let Some((major, minor)) = std::str::from_utf8(fields[2]).ok().and_then(|s| s.split_once(':')) else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (major.parse::<u64>(), minor.parse::<u64>()) else { continue };
        mounts.push(Mount {
            dev: nix::sys::stat::makedev(major, minor),
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

/// This process's mounts.
pub fn mounts() -> io::Result<Vec<Mount>> {
    std::fs::read("/proc/self/mountinfo").map(|text| parse_mountinfo(&text))
}

/// Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup on a pure v2 host,
/// /sys/fs/cgroup/unified on a hybrid one; never hard-coded.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    cgroup2_mount_in(&mounts()?)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup v2 filesystem in /proc/self/mountinfo"))
}

pub fn cgroup2_mount_in(mounts: &[Mount]) -> Option<PathBuf> {
    mounts.iter().find(|m| m.fstype == "cgroup2").map(Mount::path)
}

/// CLOCK_BOOTTIME in nanoseconds: the clock of the kernel's event stamps and of every
/// expiry it checks (`bpf_ktime_get_boot_ns`).
pub fn boot_now_ns() -> u64 {
    let ts = clock_gettime(ClockId::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME exists on every supported kernel");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::makedev;

    #[test]
    fn parses_mountinfo_with_escapes_and_finds_cgroup2_on_hybrid_and_unified_hosts() {
        let text = b"22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
            30 22 0:25 / /mnt/with\\040space rw - tmpfs tmpfs rw\n\
            31 22 0:26 /sub /srv rw master:3 shared:4 - btrfs /dev/sdb rw\n\
            garbage\n";
        assert_eq!(
            parse_mountinfo(text),
            [
                Mount { dev: makedev(254, 0), mount_point: b"/".to_vec(), fstype: "ext4".into() },
                Mount { dev: makedev(0, 25), mount_point: b"/mnt/with space".to_vec(), fstype: "tmpfs".into() },
                Mount { dev: makedev(0, 26), mount_point: b"/srv".to_vec(), fstype: "btrfs".into() },
            ]
        );
        assert_eq!(unescape_octal(b"a\\134b\\01"), b"a\\b\\01");
        let hybrid = parse_mountinfo(
            b"31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
              41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n",
        );
        assert_eq!(cgroup2_mount_in(&hybrid), Some("/sys/fs/cgroup/unified".into()));
        let unified = parse_mountinfo(b"30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n");
        assert_eq!(cgroup2_mount_in(&unified), Some("/sys/fs/cgroup".into()));
        assert_eq!(cgroup2_mount_in(&parse_mountinfo(b"1 2 0:1 / / rw - ext4 /dev/vda rw\n")), None);
    }
}
