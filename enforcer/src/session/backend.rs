//! Who enforces a confinement's file rules: BPF-LSM in the kernel where its programs
//! load, else the fanotify backend in this controller, whose judge lives here.
use std::{
    path::Path,
    sync::{Arc, RwLock},
};

use anyhow::Context as _;
use enforcer_common::{access, hook, verdict};
use tracing::warn;

use crate::{
    bpf::{self, FileHooks, ProgramSet},
    events::{Enricher, FileFacts},
    fanotify::{Fanotify, FileRequest},
    host, metrics,
    model::{
        CompiledPolicy,
        file_tables::{self, FileTables},
    },
    sinks::{Outgoing, Publisher},
};

/// `--file-backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FileBackendChoice {
    /// BPF-LSM when its programs load here, else fanotify (with a warning saying why).
    Auto,
    BpfLsm,
    Fanotify,
}

/// How file rules are applied to a cgroup and what `~` means in them.
#[derive(Clone, Debug)]
pub struct FileOptions {
    pub home: std::path::PathBuf,
    pub backend: FileBackendChoice,
}

/// Who enforces the file rules of a confinement.
pub enum FileEnforcement {
    /// The policy has no file rules.
    None,
    /// The kernel: stays in force without a controller.
    BpfLsm,
    /// This controller, through fanotify permission events: only while it runs. The
    /// tables are shared with the judge and replaced on reload.
    Fanotify { state: Arc<RwLock<FanotifyState>> },
}

impl FileEnforcement {
    pub fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::BpfLsm => "bpf-lsm",
            Self::Fanotify { .. } => "fanotify",
        }
    }
}

/// What the fanotify judge needs of the policy in force, in memory: its listener
/// thread must not open files (its own open would wait for itself).
pub struct FanotifyState {
    pub slot: u32,
    pub audit: bool,
    pub log_allowed: bool,
    pub tables: FileTables,
}

impl FanotifyState {
    pub fn new(slot: u32, compiled: &CompiledPolicy, tables: FileTables) -> Self {
        Self {
            slot,
            audit: compiled.config.mode == enforcer_common::mode::AUDIT,
            log_allowed: compiled.config.log_allowed != 0,
            tables,
        }
    }
}

/// Offsets and cgroup level for the BPF-LSM programs of a cgroup.
fn lsm_hooks(mount: &Path, path: &Path) -> anyhow::Result<FileHooks> {
    let offsets = bpf::btf::running_kernel().map_err(anyhow::Error::msg)?.offsets()?;
    let level = path.strip_prefix(mount).map(|rel| rel.components().count() as u32).unwrap_or(0);
    Ok(FileHooks { offsets, cgroup_level: level })
}

/// Loads the program set for `binding`, with the file programs when the policy has file
/// rules and BPF-LSM is chosen and loads; otherwise picks fanotify (or fails: a policy
/// with file rules is never attached unenforced).
pub fn load_programs(
    mount: &Path,
    path: &Path,
    binding: u32,
    compiled: &CompiledPolicy,
    backend: FileBackendChoice,
) -> anyhow::Result<(ProgramSet, FileEnforcement)> {
    let Some(tables) = &compiled.files else { return Ok((ProgramSet::load(binding, None)?, FileEnforcement::None)) };
    let lsm = match backend {
        FileBackendChoice::Fanotify => Err(anyhow::anyhow!("--file-backend fanotify was asked for")),
        _ => lsm_hooks(mount, path).and_then(|hooks| Ok(ProgramSet::load(binding, Some(hooks))?)),
    };
    match lsm {
        Ok(programs) => Ok((programs, FileEnforcement::BpfLsm)),
        Err(e) if backend == FileBackendChoice::BpfLsm => {
            Err(e.context("--file-backend bpf-lsm: the BPF-LSM programs cannot be used"))
        }
        Err(e) => {
            Fanotify::probe().map_err(|why| {
                anyhow::anyhow!(
                    "the policy has file rules but neither backend works here: BPF-LSM: {e:#}; fanotify: {why}"
                )
            })?;
            if backend == FileBackendChoice::Auto {
                warn!(
                    "BPF-LSM not used ({e:#}); file rules are enforced by fanotify permission events \
                     in this controller: they stop when it stops"
                );
            }
            let shared = Arc::new(RwLock::new(FanotifyState::new(0, compiled, tables.clone())));
            Ok((ProgramSet::load(binding, None)?, FileEnforcement::Fanotify { state: shared }))
        }
    }
}

/// Whether `pid` sits in the cgroup `shown` (as `display_path` names it) or below.
fn pid_in_cgroup(pid: u32, shown: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else { return false };
    text.lines()
        .filter_map(|l| l.strip_prefix("0::"))
        .any(|rel| rel == shown || (rel.starts_with(shown) && rel.as_bytes().get(shown.len()) == Some(&b'/')))
}

/// Starts the fanotify backend for a confinement whose file rules it enforces: opens
/// by processes of the cgroup are judged with the shared tables, the same way as the
/// kernel's walk (`file_tables::judge_path`). The listener only stats paths and reads
/// /proc; events are built and published on another thread (enrichment opens files).
pub fn start_fanotify(
    files: &FileEnforcement,
    shown: &str,
    cgroup_id: u64,
    mut enricher: Enricher,
    publisher: Publisher,
) -> anyhow::Result<Option<Fanotify>> {
    let FileEnforcement::Fanotify { state } = files else { return Ok(None) };
    let state = state.clone();
    let shown = shown.to_string();
    let (tx, rx) = std::sync::mpsc::sync_channel::<FileFacts>(65_536);
    std::thread::Builder::new()
        .name("fanotify-events".into())
        .spawn(move || {
            for facts in rx {
                publisher.publish(Outgoing::new(&enricher.file_event(&facts)));
            }
        })
        .context("starting the fanotify event thread")?;
    let judge = move |req: &FileRequest| -> bool {
        if !pid_in_cgroup(req.pid, &shown) {
            return true;
        }
        let guard = state.read().expect("file tables lock");
        let decided = file_tables::judge_path(&guard.tables, &req.path, req.access);
        let v = if decided.allowed {
            verdict::ALLOW
        } else if guard.audit {
            verdict::AUDIT_DENY
        } else {
            verdict::DENY
        };
        if v != verdict::ALLOW || guard.log_allowed {
            let proc_file =
                |name: &str| std::fs::read_to_string(format!("/proc/{}/{name}", req.pid)).unwrap_or_default();
            let uid = proc_file("status")
                .lines()
                .find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().next()?.parse().ok())
                .unwrap_or(u32::MAX);
            let facts = FileFacts {
                unix_ns: host::unix_now_ns(),
                pid: req.pid,
                tid: req.pid,
                uid,
                comm: proc_file("comm").trim().to_string(),
                cgroup_id,
                slot: guard.slot,
                rule_id: decided.rule_id as u32,
                hook: if req.access & access::EXEC != 0 { hook::FILE_EXEC } else { hook::FILE_OPEN },
                verdict: v,
                requested: req.access,
                change: enforcer_common::change::NONE,
                path: req.path.display().to_string(),
                inode: req.ino,
                device: file_tables::kernel_dev(req.dev),
                backend: "fanotify",
            };
            if tx.try_send(facts).is_err() {
                metrics::count_dropped("fanotify-events");
            }
        }
        v != verdict::DENY
    };
    Ok(Some(Fanotify::start(Box::new(judge))?))
}
