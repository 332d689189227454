//! What the controller reads of the host it runs on: cgroup paths, users, the host name,
//! mounts. Leaves: nothing here knows about policies or BPF objects.
pub mod cgroup;
pub mod users;

pub use enforcer_common::host::boot_now_ns;

use std::time::{SystemTime, UNIX_EPOCH};

/// The host name events carry (empty when unreadable).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// Nanoseconds since the epoch, now.
pub fn unix_now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

/// CLOCK_REALTIME - CLOCK_BOOTTIME: turns the kernel's boot-time stamps into dates.
pub fn boot_to_unix_offset_ns() -> i128 {
    unix_now_ns() - boot_now_ns() as i128
}

/// `2026-11-23T06:10:00.123456789Z` from nanoseconds since the epoch (times before the
/// epoch show as the epoch: no event is stamped before it).
pub fn rfc3339_nanos(unix_ns: i128) -> String {
    let since = std::time::Duration::from_nanos(u64::try_from(unix_ns).unwrap_or(0));
    humantime::format_rfc3339_nanos(UNIX_EPOCH + since).to_string()
}

/// The Landlock ABI this kernel offers (0: none, or disabled at boot).
pub fn landlock_abi() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_ulong = 1;
    // SAFETY: the version query takes no ruleset (NULL, size 0) and writes nothing.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    i32::try_from(abi).unwrap_or(0).max(0)
}

/// Whether `path` is a mounted bpffs.
pub fn is_bpffs(path: &str) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|st| st.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_timestamps_as_rfc3339() {
        assert_eq!(rfc3339_nanos(0), "1970-01-01T00:00:00.000000000Z");
        // 2024-02-29T12:34:56.000000007Z, a leap day.
        assert_eq!(rfc3339_nanos(1_709_210_096_000_000_007), "2024-02-29T12:34:56.000000007Z");
    }
}
