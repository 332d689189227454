//! The only module that touches the kernel's BPF objects: loads the programs, pins
//! maps and links under `/sys/fs/bpf/enforcer`, writes compiled policies into the
//! tables, and reads the counters.
//!
//! Pin layout (everything survives the controller):
//! - `maps/ENF_*`: the policy tables and counters, shared by every attach;
//! - `cgroups/<cgroup id>/<program>_<stamp>`: one bpf_link per hook and attach.
//!
//! Ordering keeps enforcement fail-closed: a policy is written to a free slot and only
//! then is the cgroup flipped to it; new links are pinned before old ones are removed.
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fs::{self, File},
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues, RingBuf, lpm_trie::Key},
    programs::{CgroupSock, CgroupSockAddr, Lsm, links::FdLink},
};
use enforcer_common::{
    Binding, FileEntry, FileFilter, FileKey, FileRecord, KernelOffsets, LearnedClauses, Net4Key, Net6Key, PendingKey,
    PendingValue, PolicyConfig, PrefixClauses, SLOT_PREFIX_BITS, decision_index, hook, limits, names, verdict,
};
use serde::{Deserialize, Serialize};

use crate::compile::CompiledPolicy;

pub const PIN_ROOT: &str = "/sys/fs/bpf/enforcer";
/// Names of rules and the cgroup of each slot, for events and `status` (bpffs holds
/// only BPF objects, so this sits beside it in /run).
pub const STATE_DIR: &str = "/run/enforcer";

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer"));

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
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
        source: io::Error,
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

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LoaderError + 'a {
    move |source| LoaderError::Io { what, path: path.to_path_buf(), source }
}

/// The hooks and the kernel attach type of each (uapi `enum bpf_attach_type`).
const HOOKS: [(&str, u32); 9] = [
    (names::PROG_CONNECT4, 10),     // BPF_CGROUP_INET4_CONNECT
    (names::PROG_CONNECT6, 11),     // BPF_CGROUP_INET6_CONNECT
    (names::PROG_SENDMSG4, 14),     // BPF_CGROUP_UDP4_SENDMSG
    (names::PROG_SENDMSG6, 15),     // BPF_CGROUP_UDP6_SENDMSG
    (names::PROG_SOCK_CREATE, 2),   // BPF_CGROUP_INET_SOCK_CREATE
    (names::PROG_RECVMSG4, 19),     // BPF_CGROUP_UDP4_RECVMSG
    (names::PROG_RECVMSG6, 20),     // BPF_CGROUP_UDP6_RECVMSG
    (names::PROG_GETPEERNAME4, 29), // BPF_CGROUP_INET4_GETPEERNAME
    (names::PROG_GETPEERNAME6, 30), // BPF_CGROUP_INET6_GETPEERNAME
];

pub fn maps_dir() -> PathBuf {
    Path::new(PIN_ROOT).join("maps")
}

pub fn links_dir(cgroup_id: u64) -> PathBuf {
    Path::new(PIN_ROOT).join("cgroups").join(cgroup_id.to_string())
}

/// Mounts bpffs at /sys/fs/bpf when it is not mounted (pins need it).
pub fn ensure_bpffs() -> Result<(), LoaderError> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let target = Path::new("/sys/fs/bpf");
    let c_target = CString::new("/sys/fs/bpf").expect("static path");
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_target.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    fs::create_dir_all(target).map_err(io_err("creating", target))?;
    let fstype = CString::new("bpf").expect("static");
    let rc = unsafe { libc::mount(fstype.as_ptr(), c_target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(LoaderError::Io {
            what: "mounting bpffs at",
            path: target.into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// An exclusive lock over the pinned state for the duration of an attach or detach,
/// so that two controllers never pick the same slot.
pub struct StateLock {
    /// Held, never read: the flock lasts as long as the open file.
    _file: File,
}

impl StateLock {
    pub fn acquire() -> Result<Self, LoaderError> {
        fs::create_dir_all(STATE_DIR).map_err(io_err("creating", Path::new(STATE_DIR)))?;
        let path = Path::new(STATE_DIR).join("lock");
        let file = File::create(&path).map_err(io_err("opening", &path))?;
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(LoaderError::Io { what: "locking", path, source: io::Error::last_os_error() });
        }
        Ok(Self { _file: file })
    }
}

/// What the file programs need to know at load time.
#[derive(Clone, Copy, Debug)]
pub struct FileHooks {
    pub offsets: KernelOffsets,
    /// cgroup level of the attach point (the cgroup v2 root is level 0).
    pub cgroup_level: u32,
}

/// Reads the struct offsets the file programs use from the running kernel's BTF.
pub fn kernel_offsets(btf: &crate::btf::KernelBtf) -> anyhow::Result<KernelOffsets> {
    let at = |s: &str, m: &str| btf.member_offset(s, m);
    Ok(KernelOffsets {
        file_f_path_dentry: at("file", "f_path.dentry")?,
        file_f_path_mnt: at("file", "f_path.mnt")?,
        file_f_mode: at("file", "f_mode")?,
        path_dentry: at("path", "dentry")?,
        path_mnt: at("path", "mnt")?,
        dentry_d_parent: at("dentry", "d_parent")?,
        dentry_d_inode: at("dentry", "d_inode")?,
        dentry_d_name_name: at("dentry", "d_name.name")?,
        inode_i_ino: at("inode", "i_ino")?,
        inode_i_sb: at("inode", "i_sb")?,
        super_block_s_dev: at("super_block", "s_dev")?,
        mount_mnt: at("mount", "mnt")?,
        mount_mnt_parent: at("mount", "mnt_parent")?,
        mount_mnt_mountpoint: at("mount", "mnt_mountpoint")?,
        linux_binprm_file: at("linux_binprm", "file")?,
        file_f_inode: at("file", "f_inode")?,
        inode_i_dentry: at("inode", "i_dentry")?,
        dentry_d_alias: at("dentry", "d_u.d_alias")?,
        valid: 1,
    })
}

/// One loaded set of programs with its own events ring buffer.
pub struct ProgramSet {
    ebpf: Ebpf,
    /// The BPF-LSM programs were loaded (the policy has file rules and the backend is
    /// bpf-lsm).
    files: bool,
}

impl ProgramSet {
    /// Loads the programs for one binding (see `enforcer_common::Binding`); the tables
    /// are opened from their pins or created and pinned. With `files`, the BPF-LSM
    /// programs are loaded too; any of them failing fails the load (the caller decides
    /// on a fallback).
    pub fn load(binding: u32, files: Option<FileHooks>) -> Result<Self, LoaderError> {
        if EBPF_OBJECT.is_empty() {
            return Err(LoaderError::NoPrograms);
        }
        ensure_bpffs()?;
        let dir = maps_dir();
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        check_pinned_layouts()?;
        let hooks = files.unwrap_or(FileHooks { offsets: KernelOffsets::default(), cgroup_level: 0 });
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .override_global(names::GLOBAL_BINDING, &binding, true)
            .override_global(names::GLOBAL_OFFSETS, &hooks.offsets, true)
            .override_global(names::GLOBAL_CGROUP_LEVEL, &hooks.cgroup_level, true)
            .load(EBPF_OBJECT)?;
        for (name, _) in HOOKS {
            let program = ebpf
                .program_mut(name)
                .ok_or(LoaderError::Program { name, source: aya::programs::ProgramError::UnexpectedProgramType })?;
            let result = if name == names::PROG_SOCK_CREATE {
                <&mut CgroupSock>::try_from(program).and_then(|p| p.load())
            } else {
                <&mut CgroupSockAddr>::try_from(program).and_then(|p| p.load())
            };
            result.map_err(|source| LoaderError::Program { name, source })?;
        }
        if files.is_some() {
            let btf = aya::Btf::from_sys_fs().map_err(|e| LoaderError::LsmUnavailable {
                program: "all",
                hook: "all",
                reason: format!("no kernel BTF: {e}"),
            })?;
            for &(name, hook_name) in names::LSM_PROGRAMS {
                let program = ebpf
                    .program_mut(name)
                    .ok_or(LoaderError::Program { name, source: aya::programs::ProgramError::UnexpectedProgramType })?;
                <&mut Lsm>::try_from(program).and_then(|p| p.load(hook_name, &btf)).map_err(|e| {
                    LoaderError::LsmUnavailable { program: name, hook: hook_name, reason: error_chain(&e) }
                })?;
            }
        }
        Ok(Self { ebpf, files: files.is_some() })
    }

    /// Loads (and drops) the real file programs with this kernel's offsets, pinning the
    /// maps in a scratch bpffs directory: what `doctor` reports and `auto` relies on.
    pub fn probe_file_programs() -> Result<(), String> {
        if EBPF_OBJECT.is_empty() {
            return Err(LoaderError::NoPrograms.to_string());
        }
        ensure_bpffs().map_err(|e| e.to_string())?;
        let btf = crate::btf::KernelBtf::from_running_kernel().map_err(|e| format!("{e:#}"))?;
        let offsets = kernel_offsets(&btf).map_err(|e| format!("{e:#}"))?;
        let dir = PathBuf::from(format!("/sys/fs/bpf/enforcer-probe-{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let result = (|| -> Result<(), String> {
            let mut ebpf = EbpfLoader::new()
                .default_map_pin_directory(&dir)
                .override_global(names::GLOBAL_OFFSETS, &offsets, true)
                .load(EBPF_OBJECT)
                .map_err(|e| error_chain(&e))?;
            let btf = aya::Btf::from_sys_fs().map_err(|e| e.to_string())?;
            for &(name, hook_name) in names::LSM_PROGRAMS {
                let program = ebpf.program_mut(name).ok_or(format!("no program {name}"))?;
                <&mut Lsm>::try_from(program)
                    .and_then(|p| p.load(hook_name, &btf))
                    .map_err(|e| format!("{name} ({hook_name}): {}", error_chain(&e)))?;
            }
            Ok(())
        })();
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let _ = fs::remove_dir(&dir);
        result
    }

    /// Attaches every hook to the cgroup and pins the links; links of an earlier attach
    /// of the same cgroup are removed only after the new ones are in place. The LSM
    /// programs attach machine-wide and judge only tasks in the cgroup.
    pub fn attach(&mut self, cgroup: &Path, cgroup_id: u64) -> Result<(), LoaderError> {
        let cgroup_file = File::open(cgroup).map_err(io_err("opening cgroup", cgroup))?;
        let dir = links_dir(cgroup_id);
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let old: Vec<PathBuf> =
            fs::read_dir(&dir).map_err(io_err("reading", &dir))?.flatten().map(|e| e.path()).collect();
        let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        for (name, attach_type) in HOOKS {
            let program = self.ebpf.program(name).expect("loaded in ProgramSet::load");
            let prog_fd = program.fd().map_err(|source| LoaderError::Program { name, source })?;
            let link = raw_bpf::link_create(prog_fd.as_fd().as_raw_fd(), cgroup_file.as_raw_fd(), attach_type)
                .map_err(|source| LoaderError::Attach { program: name, cgroup: cgroup.into(), source })?;
            // bpffs refuses names with a dot.
            let pin = dir.join(format!("{name}_{stamp}"));
            raw_bpf::obj_pin(link.as_raw_fd(), &pin).map_err(io_err("pinning link at", &pin))?;
        }
        if self.files {
            for &(name, _) in names::LSM_PROGRAMS {
                let lsm: &mut Lsm = self.ebpf.program_mut(name).expect("loaded").try_into().expect("an LSM program");
                let attach = |lsm: &mut Lsm| -> Result<FdLink, aya::programs::ProgramError> {
                    let id = lsm.attach()?;
                    Ok(lsm.take_link(id)?.into())
                };
                let link = attach(lsm).map_err(|e| LoaderError::Attach {
                    program: name,
                    cgroup: cgroup.into(),
                    source: io::Error::other(error_chain(&e)),
                })?;
                let pin = dir.join(format!("{name}_{stamp}"));
                link.pin(&pin).map_err(|e| LoaderError::Io {
                    what: "pinning link at",
                    path: pin.clone(),
                    source: io::Error::other(e.to_string()),
                })?;
            }
        }
        for path in old {
            fs::remove_file(&path).map_err(io_err("removing old link pin", &path))?;
        }
        Ok(())
    }

    /// The events ring buffer of this program set.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoaderError> {
        let map = self.ebpf.take_map(names::MAP_EVENTS).ok_or(LoaderError::Map {
            name: names::MAP_EVENTS,
            source: aya::maps::MapError::InvalidName { name: names::MAP_EVENTS.into() },
        })?;
        RingBuf::try_from(map).map_err(|source| LoaderError::Map { name: names::MAP_EVENTS, source })
    }
}

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

/// Removes the links of a cgroup: its programs stop running at once.
pub fn detach_links(cgroup_id: u64) -> Result<usize, LoaderError> {
    let dir = links_dir(cgroup_id);
    let mut removed = 0;
    match fs::read_dir(&dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                fs::remove_file(entry.path()).map_err(io_err("removing link pin", &entry.path()))?;
                removed += 1;
            }
            fs::remove_dir(&dir).map_err(io_err("removing", &dir))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(LoaderError::Io { what: "reading", path: dir, source }),
    }
    Ok(removed)
}

/// Some cgroup still has pinned links (programs of some build enforce on it).
pub fn any_links_pinned() -> bool {
    fs::read_dir(Path::new(PIN_ROOT).join("cgroups"))
        .map(|dirs| dirs.flatten().any(|d| fs::read_dir(d.path()).is_ok_and(|mut links| links.next().is_some())))
        .unwrap_or(false)
}

/// Removes the shared map pins and the pin root. Only when no cgroup is confined (the
/// caller holds the `StateLock` and checked); a running program set keeps its maps.
pub fn remove_pins() -> Result<(), LoaderError> {
    let dir = maps_dir();
    if let Ok(entries) = fs::read_dir(&dir) {
        for entry in entries.flatten() {
            fs::remove_file(entry.path()).map_err(io_err("removing map pin", &entry.path()))?;
        }
    }
    for d in [dir, Path::new(PIN_ROOT).join("cgroups"), PathBuf::from(PIN_ROOT)] {
        match fs::remove_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // Another cgroup's link directory appeared: keep the root.
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => return Ok(()),
            Err(source) => return Err(LoaderError::Io { what: "removing", path: d, source }),
        }
    }
    Ok(())
}

/// Number of pinned links of a cgroup.
pub fn pinned_link_count(cgroup_id: u64) -> usize {
    fs::read_dir(links_dir(cgroup_id)).map(|d| d.count()).unwrap_or(0)
}

/// What `status` and the event decoder know about a slot.
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
    pub spec: Option<crate::policy::Policy>,
}

fn slot_info_path(slot: u32) -> PathBuf {
    Path::new(STATE_DIR).join("slots").join(format!("{slot}.json"))
}

pub fn read_slot_info(slot: u32) -> Option<SlotInfo> {
    serde_json::from_slice(&fs::read(slot_info_path(slot)).ok()?).ok()
}

/// The pinned policy tables and counters.
/// Where the binding's DNS proxy listens: a controller sets it; a process that only
/// recompiles the policy (`grant`) keeps what is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsPort {
    Keep,
    Set(u16),
}

pub struct Tables {
    bindings: Array<MapData, Binding>,
    policies: Array<MapData, PolicyConfig>,
    net4: LpmTrie<MapData, Net4Key, PrefixClauses>,
    net6: LpmTrie<MapData, Net6Key, PrefixClauses>,
    decisions: PerCpuArray<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    files: HashMap<MapData, FileKey, FileEntry>,
    pending: HashMap<MapData, PendingKey, PendingValue>,
}

/// The layout of a map as the kernel reports it, for comparison with this build's.
fn layout(map_type: u32, key: u32, value: u32, entries: u32, flags: u32) -> String {
    format!("type {map_type}, key {key} bytes, value {value} bytes, {entries} entries, flags {flags:#x}")
}

/// Pinned maps outlive the binary that made them, and a load reuses a pinned map as it
/// finds it: after an upgrade that changed a map's layout the new programs would read
/// the old values with the new layout. Every pinned map must match this build's
/// definition exactly.
pub fn check_pinned_layouts() -> Result<(), LoaderError> {
    for (name, expected) in pinned_layouts() {
        let path = maps_dir().join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|e| LoaderError::Io {
            what: "reading the layout of the pinned map",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        let kernel_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let found = layout(kernel_type, info.key_size(), info.value_size(), info.max_entries(), info.map_flags());
        if found != *expected {
            return Err(LoaderError::IncompatiblePin { name: name.clone(), path, found, expected: expected.clone() });
        }
    }
    Ok(())
}

/// Name and layout of each map this build pins, read from its object once per process
/// (the tables are opened at every metrics scrape).
fn pinned_layouts() -> &'static [(String, String)] {
    static LAYOUTS: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    LAYOUTS.get_or_init(|| {
        // No object (AYA_BUILD_SKIP) pins nothing; load() reports that itself.
        let Ok(obj) = aya_obj::Object::parse(EBPF_OBJECT) else { return Vec::new() };
        obj.maps
            .iter()
            .filter(|(_, def)| def.pinning() == aya_obj::maps::PinningType::ByName)
            .map(|(name, def)| {
                (
                    name.clone(),
                    layout(def.map_type(), def.key_size(), def.value_size(), def.max_entries(), def.map_flags()),
                )
            })
            .collect()
    })
}

fn open_pinned_map(name: &'static str) -> Result<Map, LoaderError> {
    Map::from_map_data(open_pinned_data(name)?).map_err(|source| LoaderError::Map { name, source })
}

fn open_pinned_data(name: &'static str) -> Result<MapData, LoaderError> {
    let path = maps_dir().join(name);
    if !path.exists() {
        return Err(LoaderError::NotAttached);
    }
    MapData::from_pin(&path).map_err(|source| LoaderError::Map { name, source })
}

/// `ENF_FILE_FILTER` mapped into this process. Bytes are set in place: writing the
/// map's value whole would overwrite bytes the kernel set in the meantime. Records are
/// written word by word in the order `FileRecord` asks for.
struct FileFilterMap {
    bytes: *mut u8,
    _map: MapData,
}

// The mapping is plain shared memory; the pointer is only written through `&mut self`.
unsafe impl Send for FileFilterMap {}

impl FileFilterMap {
    const SIZE: usize = size_of::<FileFilter>();

    fn open_pinned() -> Result<Self, LoaderError> {
        let map = open_pinned_data(names::MAP_FILE_FILTER)?;
        // SAFETY: a fresh shared mapping of the map's one value, a multiple of the
        // page size, unmapped on drop.
        let bytes = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if bytes == libc::MAP_FAILED {
            let path = maps_dir().join(names::MAP_FILE_FILTER);
            return Err(LoaderError::Io { what: "mapping", path, source: io::Error::last_os_error() });
        }
        Ok(Self { bytes: bytes.cast(), _map: map })
    }

    /// Marks an inode before its entry is inserted.
    fn mark(&mut self, dev: u32, ino: u64) {
        // SAFETY: index() < FileFilter::LEN, inside the mapping.
        unsafe { self.bytes.add(FileFilter::index(dev, ino)).write_volatile(1) };
    }

    fn record(&mut self, index: usize) -> *mut FileRecord {
        assert!(index < FileFilter::RECORDS);
        // SAFETY: the records follow the bytes inside the mapping; `index` is in range.
        unsafe { self.bytes.add(std::mem::offset_of!(FileFilter, records)).cast::<FileRecord>().add(index) }
    }

    /// Copies an entry of `slot` (bound to no cgroup yet) into its record, unless the
    /// record holds another entry. The key word goes last: it makes the record live.
    fn add_record(&mut self, slot: u32, dev: u32, ino: u64, entry: &FileEntry) {
        let record = self.record(FileFilter::record_index(dev, ino, slot));
        // SAFETY: `record` points into the mapping, aligned; each field is one word.
        unsafe {
            if (&raw const (*record).dev_slot).read_volatile() != 0 {
                return;
            }
            (&raw mut (*record).ino).write_volatile(ino);
            (&raw mut (*record).entry).write_volatile(*entry);
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            (&raw mut (*record).dev_slot).write_volatile(FileRecord::dev_slot(dev, slot));
        }
    }

    /// Empties every record of `slot` (bound to no cgroup any more).
    fn clear_records(&mut self, slot: u32) {
        for index in 0..FileFilter::RECORDS {
            let record = self.record(index);
            // SAFETY: as in add_record.
            unsafe {
                let dev_slot = (&raw const (*record).dev_slot).read_volatile();
                if dev_slot != 0 && (dev_slot >> 32) as u32 == slot {
                    (&raw mut (*record).dev_slot).write_volatile(0);
                }
            }
        }
    }
}

impl Drop for FileFilterMap {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.bytes.cast(), Self::SIZE) };
    }
}

macro_rules! typed_map {
    ($name:expr) => {{
        let name = $name;
        open_pinned_map(name)?.try_into().map_err(|source| LoaderError::Map { name, source })?
    }};
}

/// The tables of addresses learned from DNS answers, for the proxy's thread.
pub struct LearnedTables {
    learn4: HashMap<MapData, Net4Key, LearnedClauses>,
    learn6: HashMap<MapData, Net6Key, LearnedClauses>,
}

impl LearnedTables {
    pub fn open_pinned() -> Result<Self, LoaderError> {
        Ok(Self { learn4: typed_map!(names::MAP_LEARN4), learn6: typed_map!(names::MAP_LEARN6) })
    }

    /// Sets what `addr` is open for under `binding` (IPv4-mapped addresses go to the
    /// IPv4 table, where the kernel looks for them); an empty list removes the entry.
    pub fn set(&mut self, binding: u32, addr: std::net::IpAddr, clauses: &LearnedClauses) -> Result<(), LoaderError> {
        let full = |source| LoaderError::TableFull { table: names::MAP_LEARN4, source };
        match addr.to_canonical() {
            std::net::IpAddr::V4(v4) => {
                let key = Net4Key { slot: binding, addr: v4.octets() };
                if clauses.count == 0 {
                    let _ = self.learn4.remove(&key);
                    Ok(())
                } else {
                    self.learn4.insert(key, clauses, 0).map_err(full)
                }
            }
            std::net::IpAddr::V6(v6) => {
                let key = Net6Key { slot: binding, addr: v6.octets() };
                if clauses.count == 0 {
                    let _ = self.learn6.remove(&key);
                    Ok(())
                } else {
                    self.learn6
                        .insert(key, clauses, 0)
                        .map_err(|source| LoaderError::TableFull { table: names::MAP_LEARN6, source })
                }
            }
        }
    }

    pub fn get(&self, binding: u32, addr: std::net::IpAddr) -> Option<LearnedClauses> {
        match addr.to_canonical() {
            std::net::IpAddr::V4(v4) => self.learn4.get(&Net4Key { slot: binding, addr: v4.octets() }, 0).ok(),
            std::net::IpAddr::V6(v6) => self.learn6.get(&Net6Key { slot: binding, addr: v6.octets() }, 0).ok(),
        }
    }

    /// The binding's learned addresses with what they are open for.
    fn entries(&self, binding: u32) -> Vec<(std::net::IpAddr, LearnedClauses)> {
        let v4 = self.learn4.iter().filter_map(Result::ok).filter(|(k, _)| k.slot == binding);
        let v6 = self.learn6.iter().filter_map(Result::ok).filter(|(k, _)| k.slot == binding);
        v4.map(|(k, v)| (std::net::IpAddr::from(k.addr), v))
            .chain(v6.map(|(k, v)| (std::net::IpAddr::from(k.addr), v)))
            .collect()
    }

    /// Replaces each of the binding's entries with `f(entry)` (an empty result removes
    /// it); returns how many remain.
    pub fn rewrite(&mut self, binding: u32, f: impl Fn(&LearnedClauses) -> LearnedClauses) -> usize {
        let mut remaining = 0;
        for (addr, old) in self.entries(binding) {
            let new = f(&old);
            if new.count != 0 {
                remaining += 1;
            }
            if new != old {
                let _ = self.set(binding, addr, &new);
            }
        }
        remaining
    }

    /// Removes the binding's entries for which `drop` says so; returns how many remain.
    pub fn forget(&mut self, binding: u32, drop: impl Fn(&LearnedClauses) -> bool) -> usize {
        self.rewrite(binding, |v| if drop(v) { LearnedClauses { count: 0, ..*v } } else { *v })
    }
}

impl Tables {
    pub fn open_pinned() -> Result<Self, LoaderError> {
        check_pinned_layouts()?;
        Ok(Self {
            bindings: typed_map!(names::MAP_BINDINGS),
            policies: typed_map!(names::MAP_POLICIES),
            net4: typed_map!(names::MAP_NET4),
            net6: typed_map!(names::MAP_NET6),
            decisions: typed_map!(names::MAP_DECISIONS),
            counters: typed_map!(names::MAP_COUNTERS),
            files: typed_map!(names::MAP_FILES),
            pending: typed_map!(names::MAP_PENDING),
        })
    }

    /// cgroup id -> (binding index, binding), for every confined cgroup.
    fn bound(&self) -> BTreeMap<u64, (u32, Binding)> {
        (1..limits::MAX_BINDINGS)
            .filter_map(|i| self.bindings.get(&i, 0).ok().map(|b| (i, b)))
            .filter(|(_, b)| b.cgroup_id != 0)
            .map(|(i, b)| (b.cgroup_id, (i, b)))
            .collect()
    }

    /// Turns the kill switch of a confined cgroup on or off (one map update). Returns
    /// false when the cgroup is not confined.
    pub fn set_isolated(&mut self, cgroup_id: u64, on: bool) -> Result<bool, LoaderError> {
        let Some(&(index, binding)) = self.bound().get(&cgroup_id) else { return Ok(false) };
        self.bindings
            .set(index, Binding { isolated: on as u16, ..binding }, 0)
            .map_err(|source| LoaderError::Map { name: names::MAP_BINDINGS, source })?;
        Ok(true)
    }

    pub fn is_isolated(&self, cgroup_id: u64) -> bool {
        self.bound().get(&cgroup_id).is_some_and(|(_, b)| b.isolated != 0)
    }

    /// cgroup id -> slot, for every confined cgroup.
    pub fn confined(&self) -> BTreeMap<u64, u32> {
        self.bound().into_iter().map(|(cg, (_, b))| (cg, b.slot)).collect()
    }

    pub fn slot_of(&self, cgroup_id: u64) -> Option<u32> {
        self.bound().get(&cgroup_id).map(|(_, b)| b.slot)
    }

    /// The cgroup's binding, or a free one for a first attach.
    pub fn binding_for(&self, cgroup_id: u64) -> Result<u32, LoaderError> {
        let bound = self.bound();
        if let Some(&(binding, _)) = bound.get(&cgroup_id) {
            return Ok(binding);
        }
        let used: BTreeSet<u32> = bound.values().map(|&(b, _)| b).collect();
        (1..limits::MAX_BINDINGS)
            .find(|b| !used.contains(b))
            .ok_or(LoaderError::NoFreeBinding(limits::MAX_BINDINGS - 1))
    }

    pub fn config(&self, slot: u32) -> Option<PolicyConfig> {
        self.policies.get(&slot, 0).ok().filter(|c| c.in_use != 0)
    }

    /// Writes the policy into a free slot, then points the binding at it (one map
    /// update: the programs see the old or the new policy), then frees the old slot. On
    /// any error the new slot is cleared and the cgroup keeps its previous policy. Call
    /// with the `StateLock` held.
    pub fn install(
        &mut self,
        binding: u32,
        cgroup_id: u64,
        cgroup_display: &str,
        compiled: &CompiledPolicy,
        base: &crate::policy::Policy,
        dns_port: DnsPort,
    ) -> Result<u32, LoaderError> {
        let used: BTreeSet<u32> = self.confined().into_values().collect();
        // Round-robin from the cgroup's current slot, so a freed slot is not reused at
        // once (event decoders cache a slot's rule names for a moment).
        let start = self.slot_of(cgroup_id).unwrap_or(0);
        let slot = (1..limits::MAX_POLICY_SLOTS)
            .map(|i| (start + i - 1) % (limits::MAX_POLICY_SLOTS - 1) + 1)
            .find(|s| !used.contains(s))
            .ok_or(LoaderError::NoFreeSlot(limits::MAX_POLICY_SLOTS - 1))?;
        // A slot nobody points at may hold leftovers of a controller that died mid-write.
        self.clear_slot(slot)?;
        if let Err(e) = self.write_slot(slot, compiled) {
            let _ = self.clear_slot(slot);
            return Err(e);
        }
        let info = SlotInfo {
            policy: compiled.name.clone(),
            mode: if compiled.config.mode == enforcer_common::mode::AUDIT { "audit" } else { "enforce" }.into(),
            cgroup: cgroup_display.into(),
            rules: compiled.rules.iter().map(|r| r.name.clone()).collect(),
            file_rules: compiled
                .files
                .as_ref()
                .map(|f| f.rules.iter().map(|r| r.name.clone()).collect())
                .unwrap_or_default(),
            home: compiled.home.clone(),
            spec: Some(base.clone()),
        };
        let info_path = slot_info_path(slot);
        if let Some(parent) = info_path.parent() {
            fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        }
        fs::write(&info_path, serde_json::to_vec_pretty(&info).expect("serializable"))
            .map_err(io_err("writing", &info_path))?;
        let previous = self.slot_of(cgroup_id);
        // A new policy does not lift the kill switch; only `release` does.
        let current = self.bound().get(&cgroup_id).map(|(_, b)| *b);
        let isolated = current.map_or(0, |b| b.isolated);
        let dns_port = match dns_port {
            DnsPort::Keep => current.map_or(0, |b| b.dns_port),
            DnsPort::Set(port) => port,
        };
        if let Err(source) = self.bindings.set(binding, Binding { cgroup_id, slot, isolated, dns_port }, 0) {
            let _ = self.clear_slot(slot);
            return Err(LoaderError::Map { name: names::MAP_BINDINGS, source });
        }
        if let Some(old) = previous.filter(|&old| old != slot) {
            self.clear_slot(old)?;
        }
        Ok(slot)
    }

    fn write_slot(&mut self, slot: u32, compiled: &CompiledPolicy) -> Result<(), LoaderError> {
        for p in &compiled.net4 {
            let key = Key::new(SLOT_PREFIX_BITS + p.len as u32, Net4Key { slot, addr: p.addr });
            self.net4
                .insert(&key, p.clauses, 0)
                .map_err(|source| LoaderError::TableFull { table: names::MAP_NET4, source })?;
        }
        for p in &compiled.net6 {
            let key = Key::new(SLOT_PREFIX_BITS + p.len as u32, Net6Key { slot, addr: p.addr });
            self.net6
                .insert(&key, p.clauses, 0)
                .map_err(|source| LoaderError::TableFull { table: names::MAP_NET6, source })?;
        }
        if let Some(files) = &compiled.files {
            let mut filter = FileFilterMap::open_pinned()?;
            for (&(dev, ino), entry) in &files.inodes {
                filter.mark(dev, ino);
                self.files
                    .insert(FileKey { ino, dev, slot }, entry, 0)
                    .map_err(|source| LoaderError::TableFull { table: names::MAP_FILES, source })?;
                filter.add_record(slot, dev, ino, entry);
            }
            for p in &files.pending {
                let (key, value) = pending_entry(slot, p);
                self.pending
                    .insert(key, value, 0)
                    .map_err(|source| LoaderError::TableFull { table: names::MAP_PENDING, source })?;
            }
        }
        self.reset_decisions(slot)?;
        // The config goes last: a slot is live only once its rules are complete.
        self.policies
            .set(slot, compiled.config, 0)
            .map_err(|source| LoaderError::Map { name: names::MAP_POLICIES, source })
    }

    fn reset_decisions(&mut self, slot: u32) -> Result<(), LoaderError> {
        let cpus = aya::util::nr_cpus().map_err(|(what, source)| LoaderError::Io {
            what: "counting CPUs",
            path: what.into(),
            source,
        })?;
        for index in decision_index(slot, 0, 0)..decision_index(slot + 1, 0, 0) {
            let zeros = PerCpuValues::try_from(vec![0u64; cpus]).expect("non-empty");
            self.decisions
                .set(index, zeros, 0)
                .map_err(|source| LoaderError::Map { name: names::MAP_DECISIONS, source })?;
        }
        Ok(())
    }

    /// Empties a slot: config first (lookups that still reach it fail closed), then
    /// its prefixes.
    fn clear_slot(&mut self, slot: u32) -> Result<(), LoaderError> {
        self.policies
            .set(slot, PolicyConfig::zeroed(), 0)
            .map_err(|source| LoaderError::Map { name: names::MAP_POLICIES, source })?;
        let keys4: Vec<_> = self.net4.keys().flatten().filter(|k| k.data().slot == slot).collect();
        for key in keys4 {
            let _ = self.net4.remove(&key);
        }
        let keys6: Vec<_> = self.net6.keys().flatten().filter(|k| k.data().slot == slot).collect();
        for key in keys6 {
            let _ = self.net6.remove(&key);
        }
        FileFilterMap::open_pinned()?.clear_records(slot);
        let files: Vec<_> = self.files.keys().flatten().filter(|k| k.slot == slot).collect();
        for key in files {
            let _ = self.files.remove(&key);
        }
        let pending: Vec<_> = self.pending.keys().flatten().filter(|k| k.slot == slot).collect();
        for key in pending {
            let _ = self.pending.remove(&key);
        }
        let _ = fs::remove_file(slot_info_path(slot));
        Ok(())
    }

    /// Forgets a cgroup's policy (after its links are gone).
    pub fn uninstall(&mut self, cgroup_id: u64) -> Result<Option<u32>, LoaderError> {
        let Some(&(binding, Binding { slot, .. })) = self.bound().get(&cgroup_id) else { return Ok(None) };
        self.bindings
            .set(binding, Binding { cgroup_id: 0, slot: 0, isolated: 0, dns_port: 0 }, 0)
            .map_err(|source| LoaderError::Map { name: names::MAP_BINDINGS, source })?;
        self.clear_slot(slot)?;
        LearnedTables::open_pinned()?.forget(binding, |_| true);
        Ok(Some(slot))
    }

    fn sum(values: Result<PerCpuValues<u64>, aya::maps::MapError>) -> u64 {
        values.map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Decisions of a slot: `[hook][verdict]`.
    pub fn decisions(&self, slot: u32) -> Vec<(u8, u8, u64)> {
        let mut out = Vec::new();
        for h in 0..hook::COUNT {
            for v in 0..verdict::COUNT {
                out.push((h, v, Self::sum(self.decisions.get(&decision_index(slot, h, v), 0))));
            }
        }
        out
    }

    pub fn counter(&self, index: u32) -> u64 {
        Self::sum(self.counters.get(&index, 0))
    }
}

/// A name as the kernel compares it: NUL padded, cut to the key's length.
fn kernel_name(name: &str) -> [u8; limits::PENDING_NAME_LEN] {
    let mut out = [0u8; limits::PENDING_NAME_LEN];
    let bytes = name.as_bytes();
    let n = bytes.len().min(limits::PENDING_NAME_LEN - 1);
    out[..n].copy_from_slice(&bytes[..n]);
    out
}

fn pending_entry(slot: u32, p: &crate::files::Pending) -> (PendingKey, PendingValue) {
    let key = PendingKey { parent_ino: p.parent_ino, parent_dev: p.parent_dev, slot, name: kernel_name(&p.names[0]) };
    let mut names = [[0u8; limits::PENDING_NAME_LEN]; limits::MAX_PENDING_DEPTH - 1];
    for (i, n) in p.names.iter().skip(1).enumerate() {
        names[i] = kernel_name(n);
    }
    (key, PendingValue { entry: p.entry, remaining: (p.names.len() - 1) as u32, _pad: 0, names })
}

/// Program types `doctor` checks by loading a minimal program of each.
#[derive(Clone, Copy, Debug)]
pub enum ProbeKind {
    /// cgroup/connect4 and friends: the network hooks.
    CgroupSockAddr,
    /// cgroup/sock_create.
    CgroupSock,
    /// lsm/file_open: what file rules need.
    Lsm,
}

/// Loads (and at once unloads) a two-instruction program of `kind`: Ok when this kernel
/// accepts it, the kernel's error otherwise.
pub fn probe_program_type(kind: ProbeKind) -> Result<(), String> {
    // (prog_type, expected_attach_type, return value) from uapi bpf.h.
    let (prog_type, attach_type, ret, btf_id) = match kind {
        ProbeKind::CgroupSockAddr => (18, 10, 1, 0),
        ProbeKind::CgroupSock => (9, 2, 1, 0),
        ProbeKind::Lsm => {
            let btf = aya::Btf::from_sys_fs().map_err(|e| format!("no kernel BTF: {e}"))?;
            let id = btf
                .id_by_type_name_kind("bpf_lsm_file_open", aya_obj::btf::BtfKind::Func)
                .map_err(|e| format!("no bpf_lsm_file_open in the kernel BTF: {e}"))?;
            (29, 27, 0, id) // BPF_PROG_TYPE_LSM, BPF_LSM_MAC
        }
    };
    raw_bpf::prog_load_trivial(prog_type, attach_type, ret, btf_id).map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::EPERM) && matches!(kind, ProbeKind::Lsm) {
            " (this kernel refuses trampoline programs, or bpf is not in its lsm= list)"
        } else {
            ""
        };
        format!("{e}{hint}")
    })
}

/// The two bpf(2) commands aya 0.14 does not offer for cgroup links: creating a link
/// we can pin, and pinning it; and a minimal program load for `probe_program_type`.
mod raw_bpf {
    use std::{
        ffi::CString,
        io,
        os::fd::{FromRawFd as _, OwnedFd, RawFd},
        os::unix::ffi::OsStrExt as _,
        path::Path,
    };

    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_LINK_CREATE: libc::c_long = 28;
    /// Larger than any `union bpf_attr` member we use; the kernel requires the unused
    /// tail to be zero.
    const ATTR_SIZE: usize = 128;

    fn bpf(cmd: libc::c_long, attr: &mut [u8; ATTR_SIZE]) -> io::Result<libc::c_long> {
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), ATTR_SIZE as u32) };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
    }

    pub fn link_create(prog_fd: RawFd, cgroup_fd: RawFd, attach_type: u32) -> io::Result<OwnedFd> {
        let mut attr = [0u8; ATTR_SIZE];
        // struct { __u32 prog_fd; __u32 target_fd; __u32 attach_type; __u32 flags; ... }
        attr[0..4].copy_from_slice(&(prog_fd as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(cgroup_fd as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
        let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    /// BPF_PROG_LOAD of `r0 = ret; exit`; the fd is closed at once.
    pub fn prog_load_trivial(prog_type: u32, attach_type: u32, ret: i32, attach_btf_id: u32) -> io::Result<()> {
        const BPF_PROG_LOAD: libc::c_long = 5;
        let r = ret.to_le_bytes();
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0, 0, 0, r[0], r[1], r[2], r[3]]), // mov64 r0, ret
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),             // exit
        ];
        let license = c"GPL";
        let mut attr = [0u8; ATTR_SIZE];
        attr[0..4].copy_from_slice(&prog_type.to_ne_bytes());
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[68..72].copy_from_slice(&attach_type.to_ne_bytes()); // expected_attach_type
        attr[108..112].copy_from_slice(&attach_btf_id.to_ne_bytes()); // attach_btf_id
        let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
        unsafe { libc::close(fd as RawFd) };
        Ok(())
    }

    pub fn obj_pin(fd: RawFd, path: &Path) -> io::Result<()> {
        let c_path =
            CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut attr = [0u8; ATTR_SIZE];
        // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; ... }
        attr[0..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
        attr[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
        bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
    }
}
