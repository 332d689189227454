//! cgroup v2 paths: finding the mount, resolving user-given names, ids (the cgroup
//! directory's inode number, as `bpf_get_current_cgroup_id` reports it), and the
//! safety checks that keep us from confining the host or ourselves.
use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("cgroup {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {0} is outside the cgroup v2 mount {1}")]
    OutsideMount(PathBuf, PathBuf),
    #[error("refusing to confine {0}: it is the cgroup v2 root, which holds the whole host")]
    Root(PathBuf),
    #[error(
        "refusing to confine {path}: this controller (pid {pid}) runs inside it, and a \
         deny-all there would cut off the controller's own shell; use a child cgroup"
    )]
    HoldsController { path: PathBuf, pid: u32 },
    #[error("cgroup name {0:?} must not contain '..'")]
    DotDot(String),
}

/// The cgroup v2 mount point (hybrid hosts mount it at /sys/fs/cgroup/unified, pure v2
/// hosts at /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    enforcer_common::host::cgroup2_mount().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => CgroupError::NoCgroup2,
        _ => CgroupError::Io { path: "/proc/self/mountinfo".into(), source: e },
    })
}

/// Resolves a user-given cgroup: absolute paths must lie inside the mount, anything
/// else is relative to the mount (`agent.slice` -> `/sys/fs/cgroup/agent.slice`).
pub fn resolve(mount: &Path, name: &str) -> Result<PathBuf, CgroupError> {
    let given = Path::new(name);
    if given.components().any(|c| c == Component::ParentDir) {
        return Err(CgroupError::DotDot(name.to_string()));
    }
    let path = if given.is_absolute() { given.to_path_buf() } else { mount.join(given) };
    if !path.starts_with(mount) {
        return Err(CgroupError::OutsideMount(path, mount.to_path_buf()));
    }
    Ok(path)
}

/// The cgroup path relative to the mount, with a leading slash (`/agent.slice`).
pub fn display_path(mount: &Path, path: &Path) -> String {
    match path.strip_prefix(mount) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => path.display().to_string(),
    }
}

pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    fs::metadata(path).map(|m| m.ino()).map_err(|source| CgroupError::Io { path: path.to_path_buf(), source })
}

pub fn create(path: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(path).map_err(|source| CgroupError::Io { path: path.to_path_buf(), source })
}

/// Refuses the root and any cgroup that contains this process: confining those would
/// confine the host or the controller itself.
pub fn check_safe_to_confine(mount: &Path, path: &Path) -> Result<(), CgroupError> {
    if path == mount {
        return Err(CgroupError::Root(path.to_path_buf()));
    }
    let own = own_cgroup(mount)?;
    if own.starts_with(path) {
        return Err(CgroupError::HoldsController { path: path.to_path_buf(), pid: std::process::id() });
    }
    Ok(())
}

/// This process's cgroup v2 directory.
pub fn own_cgroup(mount: &Path) -> Result<PathBuf, CgroupError> {
    let text = fs::read_to_string("/proc/self/cgroup")
        .map_err(|source| CgroupError::Io { path: "/proc/self/cgroup".into(), source })?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/").trim_start_matches('/');
    Ok(mount.join(rel))
}

/// Moves a process into a cgroup.
pub fn add_process(path: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = path.join("cgroup.procs");
    fs::write(&procs, pid.to_string()).map_err(|source| CgroupError::Io { path: procs, source })
}

/// Removes a cgroup we created. Processes still inside are moved to the parent first
/// (the directory cannot be removed while populated).
pub fn remove(path: &Path) -> Result<(), CgroupError> {
    if let (Some(parent), Ok(procs)) = (path.parent(), fs::read_to_string(path.join("cgroup.procs"))) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            let _ = add_process(parent, pid);
        }
    }
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CgroupError::Io { path: path.to_path_buf(), source }),
    }
}

/// Finds the cgroup directory whose id is `id` (a bounded walk of the tree); used to
/// name the cgroup of an event that came from below an attach point.
pub fn find_by_id(under: &Path, id: u64) -> Option<PathBuf> {
    const MAX_VISITED: usize = 10_000; // a walk, not a crawl of a huge host
    let mut stack = vec![under.to_path_buf()];
    let mut visited = 0;
    while let Some(dir) = stack.pop() {
        visited += 1;
        if visited > MAX_VISITED {
            return None;
        }
        if cgroup_id(&dir).ok() == Some(id) {
            return Some(dir);
        }
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(entry.path());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_relative_and_absolute_names_inside_the_mount() {
        let mount = Path::new("/sys/fs/cgroup");
        assert_eq!(resolve(mount, "agent.slice").unwrap(), Path::new("/sys/fs/cgroup/agent.slice"));
        assert_eq!(resolve(mount, "/sys/fs/cgroup/a/b").unwrap(), Path::new("/sys/fs/cgroup/a/b"));
        assert!(matches!(resolve(mount, "/etc"), Err(CgroupError::OutsideMount(..))));
        assert!(matches!(resolve(mount, "a/../../etc"), Err(CgroupError::DotDot(_))));
        assert_eq!(display_path(mount, Path::new("/sys/fs/cgroup/a/b")), "/a/b");
    }
}
