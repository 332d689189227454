//! What enforcer keeps in `/run/enforcer` beside the pinned BPF objects (bpffs holds
//! only BPF objects): the lock that serializes changes to the pinned tables, what each
//! policy slot holds (names of rules, the cgroup, the base policy), the grants of each
//! cgroup, and the destinations each policy was seen to reach. No BPF here.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::model::{Policy, grants::Grant};

pub const STATE_DIR: &str = "/run/enforcer";

/// How long a command waits for another one's hold on the state lock before it gives
/// up with an error. Holders keep it for milliseconds (program verification runs
/// outside it), so a longer wait means a stuck command.
pub const LOCK_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is not a directory owned by root: refusing to keep enforcer's state there (remove it and \
         run the command again)",
        path.display()
    )]
    Untrusted { path: PathBuf },
    #[error(
        "another enforcer command has held the state lock {} for over {}s; it may be stuck \
         (see `fuser -v {}`)",
        path.display(),
        waited.as_secs(),
        path.display()
    )]
    LockTimeout { path: PathBuf, waited: Duration },
}

fn state_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io { what, path: path.to_path_buf(), source }
}

/// `dir` (under the state directory) as a root-only directory: created 0700, an
/// existing one tightened to 0700; a symlink or a directory someone else owns is
/// refused. Nothing but root may open anything of enforcer's state.
fn private_dir(dir: &Path) -> Result<(), StateError> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(state_err("creating", dir)(e)),
    }
    let meta = fs::symlink_metadata(dir).map_err(state_err("inspecting", dir))?;
    if !meta.is_dir() || meta.uid() != 0 {
        return Err(StateError::Untrusted { path: dir.into() });
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(state_err("restricting", dir))?;
    }
    Ok(())
}

/// The subdirectories of the state directory.
const SUBDIRS: [&str; 3] = ["slots", "grants", "seen"];

/// The state directory, root-only, with whatever an older build left there tightened.
fn state_root() -> Result<&'static Path, StateError> {
    let root = Path::new(STATE_DIR);
    private_dir(root)?;
    for sub in SUBDIRS {
        let dir = root.join(sub);
        if fs::symlink_metadata(&dir).is_ok() {
            private_dir(&dir)?;
        }
    }
    Ok(root)
}

/// The state directory and `sub` below it, both root-only.
fn state_subdir(sub: &str) -> Result<PathBuf, StateError> {
    let root = Path::new(STATE_DIR);
    private_dir(root)?;
    let dir = root.join(sub);
    private_dir(&dir)?;
    Ok(dir)
}

/// Opens a state file 0600 without following a symlink at its name.
fn open_private(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    let file = options.mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)?;
    // An older build made its files 0644: tighten them on first touch.
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// Replaces a state file's contents (0600, never through a symlink).
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    open_private(path, OpenOptions::new().write(true).create(true).truncate(true))?.write_all(bytes)
}

/// Reads a state file, never through a symlink.
fn read_private(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?, &mut bytes)?;
    Ok(bytes)
}

/// An exclusive lock over the pinned tables while a command changes them, so that two
/// commands never pick the same slot or binding. The lock file is root-only: no
/// unprivileged process can take it and stall the commands.
pub struct StateLock {
    /// Held, never read: the lock lasts as long as the open file.
    _lock: Flock<File>,
}

impl StateLock {
    /// Waits at most `LOCK_WAIT` (or `ENFORCER_LOCK_WAIT_SECS`) for another holder.
    pub fn acquire() -> Result<Self, StateError> {
        let wait = std::env::var("ENFORCER_LOCK_WAIT_SECS").ok().and_then(|s| s.parse().ok()).map(Duration::from_secs);
        Self::acquire_within(wait.unwrap_or(LOCK_WAIT))
    }

    /// Waits at most `wait` for another holder.
    fn acquire_within(wait: Duration) -> Result<Self, StateError> {
        let path = state_root()?.join("lock");
        let mut file = open_private(&path, OpenOptions::new().read(true).write(true).create(true))
            .map_err(state_err("opening", &path))?;
        let started = Instant::now();
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(Self { _lock: lock }),
                Err((f, nix::errno::Errno::EWOULDBLOCK | nix::errno::Errno::EINTR)) => file = f,
                Err((_, e)) => return Err(StateError::Io { what: "locking", path, source: e.into() }),
            }
            if started.elapsed() >= wait {
                return Err(StateError::LockTimeout { path, waited: wait });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What `status` and the event decoder know about a policy slot.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SlotInfo {
    pub policy: String,
    pub mode: String,
    pub cgroup: String,
    pub rules: Vec<String>,
    /// Names of the file rules by rule id - 1 (`deny:~/.ssh`).
    #[serde(default)]
    pub file_rules: Vec<String>,
    /// The agent's home: what `~` in file rules meant when compiled.
    #[serde(default)]
    pub home: Option<PathBuf>,
    /// The policy without grants, re-compiled when grants change.
    #[serde(default)]
    pub spec: Option<Policy>,
}

fn slot_info_path(slot: u32) -> PathBuf {
    Path::new(STATE_DIR).join("slots").join(format!("{slot}.json"))
}

pub fn read_slot_info(slot: u32) -> Option<SlotInfo> {
    serde_json::from_slice(&read_private(&slot_info_path(slot)).ok()?).ok()
}

/// Written before the slot is bound, so the first event it decides can be named.
pub fn write_slot_info(slot: u32, info: &SlotInfo) -> Result<(), StateError> {
    state_subdir("slots")?;
    let path = slot_info_path(slot);
    write_private(&path, &serde_json::to_vec_pretty(info).expect("serializable")).map_err(state_err("writing", &path))
}

pub fn remove_slot_info(slot: u32) {
    let _ = fs::remove_file(slot_info_path(slot));
}

fn grants_path(cgroup_id: u64) -> PathBuf {
    Path::new(STATE_DIR).join("grants").join(format!("{cgroup_id}.json"))
}

/// The grants of a cgroup that have not expired.
pub fn live_grants(cgroup_id: u64) -> Vec<Grant> {
    let now = crate::host::boot_now_ns();
    read_private(&grants_path(cgroup_id))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Vec<Grant>>(&bytes).ok())
        .unwrap_or_default()
        .into_iter()
        .filter(|g| g.expires_at > now)
        .collect()
}

pub fn save_grants(cgroup_id: u64, grants: &[Grant]) -> Result<(), StateError> {
    let path = grants_path(cgroup_id);
    if grants.is_empty() {
        return match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(state_err("removing", &path)(e)),
            _ => Ok(()),
        };
    }
    state_subdir("grants")?;
    write_private(&path, &serde_json::to_vec_pretty(grants).expect("serializable")).map_err(state_err("writing", &path))
}

/// What the new-destination alert remembers: the destinations each policy reached, one
/// root-only file per policy under the state directory.
pub struct SeenStore {
    dir: PathBuf,
}

impl SeenStore {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The store under the state directory.
    pub fn in_state_dir() -> Self {
        Self::new(Path::new(STATE_DIR).join("seen"))
    }

    fn file(&self, policy: &str) -> PathBuf {
        self.dir.join(format!("{policy}.txt"))
    }

    /// The destinations recorded for `policy`.
    pub fn load(&self, policy: &str) -> Vec<String> {
        let bytes = read_private(&self.file(policy)).unwrap_or_default();
        String::from_utf8_lossy(&bytes).lines().map(String::from).collect()
    }

    /// Records a destination (best effort: without the file the alert still fires, once
    /// per controller).
    pub fn append(&self, policy: &str, destination: &str) {
        if self.dir.starts_with(STATE_DIR) && state_subdir("seen").is_err() {
            return;
        }
        let _ = fs::create_dir_all(&self.dir);
        if let Ok(mut f) = open_private(&self.file(policy), OpenOptions::new().create(true).append(true)) {
            let _ = writeln!(f, "{destination}");
        }
    }
}
