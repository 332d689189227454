//! What enforcer keeps in `/run/enforcer` beside the pinned BPF objects (bpffs holds
//! only BPF objects): the lock that serializes changes to the pinned tables, what each
//! policy slot holds (names of rules, the cgroup, the base policy), the grants of each
//! cgroup, and the destinations each policy was seen to reach. No BPF here.
use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::model::{Policy, grants::Grant};

pub const STATE_DIR: &str = "/run/enforcer";

#[derive(Debug, thiserror::Error)]
#[error("{what} {}", path.display())]
pub struct StateError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn state_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError { what, path: path.to_path_buf(), source }
}

/// An exclusive lock over the pinned state for the duration of an attach or detach,
/// so that two controllers never pick the same slot.
pub struct StateLock {
    /// Held, never read: the lock lasts as long as the open file.
    _lock: nix::fcntl::Flock<File>,
}

impl StateLock {
    pub fn acquire() -> Result<Self, StateError> {
        fs::create_dir_all(STATE_DIR).map_err(state_err("creating", Path::new(STATE_DIR)))?;
        let path = Path::new(STATE_DIR).join("lock");
        let file = File::create(&path).map_err(state_err("opening", &path))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| StateError {
            what: "locking",
            path,
            source: e.into(),
        })?;
        Ok(Self { _lock: lock })
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
    serde_json::from_slice(&fs::read(slot_info_path(slot)).ok()?).ok()
}

/// Written before the slot is bound, so the first event it decides can be named.
pub fn write_slot_info(slot: u32, info: &SlotInfo) -> Result<(), StateError> {
    let path = slot_info_path(slot);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(state_err("creating", parent))?;
    }
    fs::write(&path, serde_json::to_vec_pretty(info).expect("serializable")).map_err(state_err("writing", &path))
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
    fs::read(grants_path(cgroup_id))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Vec<Grant>>(&bytes).ok())
        .unwrap_or_default()
        .into_iter()
        .filter(|g| g.expires_at > now)
        .collect()
}

pub fn save_grants(cgroup_id: u64, grants: &[Grant]) -> io::Result<()> {
    let path = grants_path(cgroup_id);
    if grants.is_empty() {
        return match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    fs::create_dir_all(path.parent().expect("has a parent"))?;
    fs::write(&path, serde_json::to_vec_pretty(grants).expect("serializable"))
}

/// Where the new-destination alert remembers what each policy reached.
pub fn seen_dir() -> PathBuf {
    Path::new(STATE_DIR).join("seen")
}
