//! The only layer that touches the kernel's BPF objects (through aya): loads and
//! attaches the programs, pins maps and links under `/sys/fs/bpf/enforcer`, writes
//! compiled policies into the tables, reads the counters, and reads the running
//! kernel's BTF for the struct offsets the file programs need.
//!
//! Pin layout (everything survives the controller):
//! - `maps/ENF_*`: the policy tables and counters, shared by every attach;
//! - `cgroups/<cgroup id>/<program>_<stamp>`: one bpf_link per hook and attach.
//!
//! Ordering keeps enforcement fail-closed: a policy is written to a free slot and only
//! then is the cgroup flipped to it; new links are pinned before old ones are removed.
mod bindings;
pub mod btf;
mod file_filter;
pub mod learned;
mod mapping;
pub mod pins;
pub mod programs;
pub mod tables;

use std::{
    fs, io,
    path::{Path, PathBuf},
};

pub use learned::LearnedTables;
pub use programs::{FileHooks, ProgramSet};
pub use tables::{DnsPort, Tables};

pub const PIN_ROOT: &str = "/sys/fs/bpf/enforcer";

/// The kernel programs, built by aya-build from `enforcer-ebpf` (empty with
/// AYA_BUILD_SKIP=1).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer"));

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "this enforcer binary was built with AYA_BUILD_SKIP=1 and holds no kernel programs; \
         rebuild without it"
    )]
    NoPrograms,
    #[error("loading the eBPF object")]
    Load(#[from] aya::EbpfError),
    #[error("loading program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("attaching {program} to {cgroup}")]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching {program}: the kernel gave no pinnable bpf_link (Linux 5.7+ is needed)")]
    Link {
        program: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning link at {path}")]
    PinLink {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("all {0} policy slots are in use; detach a cgroup first")]
    NoFreeSlot(u32),
    #[error("all {0} attach bindings are in use; detach a cgroup first")]
    NoFreeBinding(u32),
    #[error("the policy tables are full while writing {table}; the previous policy stays in force")]
    TableFull {
        table: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("enforcer has no pinned state at {PIN_ROOT}: nothing is attached")]
    NotAttached,
    #[error(
        "the pinned map {name} at {path} was made by another enforcer build ({found}; this build \
         expects {expected}), so this build cannot use the pinned state. The cgroups that build \
         attached stay enforced by its programs: detach them (`enforcer detach --cgroup <cgroup>`, \
         with either build), then attach again"
    )]
    IncompatiblePin { name: String, path: PathBuf, found: String, expected: String },
    #[error("BPF-LSM program {program} (hook {hook}) does not load here: {reason}")]
    LsmUnavailable { program: &'static str, hook: &'static str, reason: String },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BpfError + 'a {
    move |source| BpfError::Io { what, path: path.to_path_buf(), source }
}

pub fn maps_dir() -> PathBuf {
    Path::new(PIN_ROOT).join("maps")
}

pub fn links_dir(cgroup_id: u64) -> PathBuf {
    Path::new(PIN_ROOT).join("cgroups").join(cgroup_id.to_string())
}

/// Mounts bpffs at /sys/fs/bpf when it is not mounted (pins need it).
pub fn ensure_bpffs() -> Result<(), BpfError> {
    const TARGET: &str = "/sys/fs/bpf";
    if crate::host::is_bpffs(TARGET) {
        return Ok(());
    }
    let target = Path::new(TARGET);
    fs::create_dir_all(target).map_err(io_err("creating", target))?;
    nix::mount::mount(Some("bpf"), target, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| BpfError::Io { what: "mounting bpffs at", path: target.into(), source: e.into() })
}

/// An error with its sources, on one line (aya's errors nest the kernel's reason).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
