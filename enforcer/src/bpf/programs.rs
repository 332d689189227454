//! Loading the kernel programs, attaching them to a cgroup with pinned links, and
//! probing what this kernel loads.
use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, RingBuf},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, Lsm, LsmAttachType, ProgramType, links::FdLink},
};
use enforcer_common::{KernelOffsets, names};

use super::{BpfError, EBPF_OBJECT, btf, ensure_bpffs, error_chain, io_err, links_dir, maps_dir, pins};

/// The cgroup hooks every attach loads (their attach types are in the object's sections).
pub(super) const HOOKS: [&str; 9] = [
    names::PROG_CONNECT4,
    names::PROG_CONNECT6,
    names::PROG_SENDMSG4,
    names::PROG_SENDMSG6,
    names::PROG_SOCK_CREATE,
    names::PROG_RECVMSG4,
    names::PROG_RECVMSG6,
    names::PROG_GETPEERNAME4,
    names::PROG_GETPEERNAME6,
];

/// What the file programs need to know at load time.
#[derive(Clone, Copy, Debug)]
pub struct FileHooks {
    pub offsets: KernelOffsets,
    /// cgroup level of the attach point (the cgroup v2 root is level 0).
    pub cgroup_level: u32,
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
    pub fn load(binding: u32, files: Option<FileHooks>) -> Result<Self, BpfError> {
        if EBPF_OBJECT.is_empty() {
            return Err(BpfError::NoPrograms);
        }
        ensure_bpffs()?;
        let dir = maps_dir();
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        pins::check_pinned_layouts()?;
        let hooks = files.unwrap_or(FileHooks { offsets: KernelOffsets::default(), cgroup_level: 0 });
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .override_global(names::GLOBAL_BINDING, &binding, true)
            .override_global(names::GLOBAL_OFFSETS, &hooks.offsets, true)
            .override_global(names::GLOBAL_CGROUP_LEVEL, &hooks.cgroup_level, true)
            .load(EBPF_OBJECT)?;
        for name in HOOKS {
            let program = ebpf
                .program_mut(name)
                .ok_or(BpfError::Program { name, source: aya::programs::ProgramError::UnexpectedProgramType })?;
            let result = if name == names::PROG_SOCK_CREATE {
                <&mut CgroupSock>::try_from(program).and_then(|p| p.load())
            } else {
                <&mut CgroupSockAddr>::try_from(program).and_then(|p| p.load())
            };
            result.map_err(|source| BpfError::Program { name, source })?;
        }
        if files.is_some() {
            let btf = &btf::running_kernel()
                .map_err(|reason| BpfError::LsmUnavailable { program: "all", hook: "all", reason })?
                .aya;
            for &(name, hook_name) in names::LSM_PROGRAMS {
                let program = ebpf
                    .program_mut(name)
                    .ok_or(BpfError::Program { name, source: aya::programs::ProgramError::UnexpectedProgramType })?;
                <&mut Lsm>::try_from(program).and_then(|p| p.load(hook_name, btf)).map_err(|e| {
                    BpfError::LsmUnavailable { program: name, hook: hook_name, reason: error_chain(&e) }
                })?;
            }
        }
        Ok(Self { ebpf, files: files.is_some() })
    }

    /// Loads (and drops) the real file programs with this kernel's offsets, pinning the
    /// maps in a scratch bpffs directory: what `doctor` reports and `auto` relies on.
    pub fn probe_file_programs() -> Result<(), String> {
        if EBPF_OBJECT.is_empty() {
            return Err(BpfError::NoPrograms.to_string());
        }
        ensure_bpffs().map_err(|e| e.to_string())?;
        let kernel = btf::running_kernel()?;
        let offsets = kernel.offsets().map_err(|e| format!("{e:#}"))?;
        let dir = PathBuf::from(format!("/sys/fs/bpf/enforcer-probe-{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let result = (|| -> Result<(), String> {
            let mut ebpf = EbpfLoader::new()
                .default_map_pin_directory(&dir)
                .override_global(names::GLOBAL_OFFSETS, &offsets, true)
                .load(EBPF_OBJECT)
                .map_err(|e| error_chain(&e))?;
            for &(name, hook_name) in names::LSM_PROGRAMS {
                let program = ebpf.program_mut(name).ok_or(format!("no program {name}"))?;
                <&mut Lsm>::try_from(program)
                    .and_then(|p| p.load(hook_name, &kernel.aya))
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
    pub fn attach(&mut self, cgroup: &Path, cgroup_id: u64) -> Result<(), BpfError> {
        let cgroup_file = File::open(cgroup).map_err(io_err("opening cgroup", cgroup))?;
        let dir = links_dir(cgroup_id);
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let old: Vec<PathBuf> =
            fs::read_dir(&dir).map_err(io_err("reading", &dir))?.flatten().map(|e| e.path()).collect();
        let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        for name in HOOKS {
            let program = self.ebpf.program_mut(name).expect("loaded in ProgramSet::load");
            let attach_err = |source| BpfError::Attach { program: name, cgroup: cgroup.into(), source };
            // A bpf_link (Linux 5.7+) we can pin; aya falls back to a link-less attach
            // before that, which cannot outlive us and is refused.
            let link_err = |source| BpfError::Link { program: name, source };
            let link: FdLink = if name == names::PROG_SOCK_CREATE {
                let p: &mut CgroupSock = program.try_into().map_err(attach_err)?;
                let id = p.attach(&cgroup_file, CgroupAttachMode::Single).map_err(attach_err)?;
                p.take_link(id).map_err(attach_err)?.try_into().map_err(link_err)?
            } else {
                let p: &mut CgroupSockAddr = program.try_into().map_err(attach_err)?;
                let id = p.attach(&cgroup_file, CgroupAttachMode::Single).map_err(attach_err)?;
                p.take_link(id).map_err(attach_err)?.try_into().map_err(link_err)?
            };
            pin_link(link, &dir.join(format!("{name}_{stamp}")))?;
        }
        if self.files {
            for &(name, _) in names::LSM_PROGRAMS {
                let lsm: &mut Lsm = self.ebpf.program_mut(name).expect("loaded").try_into().expect("an LSM program");
                let attach = |lsm: &mut Lsm| -> Result<FdLink, aya::programs::ProgramError> {
                    let id = lsm.attach()?;
                    Ok(lsm.take_link(id)?.into())
                };
                let link =
                    attach(lsm).map_err(|source| BpfError::Attach { program: name, cgroup: cgroup.into(), source })?;
                pin_link(link, &dir.join(format!("{name}_{stamp}")))?;
            }
        }
        for path in old {
            fs::remove_file(&path).map_err(io_err("removing old link pin", &path))?;
        }
        Ok(())
    }

    /// The events ring buffer of this program set.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, BpfError> {
        let map = self.ebpf.take_map(names::MAP_EVENTS).ok_or(BpfError::Map {
            name: names::MAP_EVENTS,
            source: aya::maps::MapError::InvalidName { name: names::MAP_EVENTS.into() },
        })?;
        RingBuf::try_from(map).map_err(|source| BpfError::Map { name: names::MAP_EVENTS, source })
    }
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

/// Whether this kernel loads programs of `kind` (aya's feature probe: a minimal program
/// of the type, loaded and dropped). Err has the kernel's reason.
pub fn probe_program_type(kind: ProbeKind) -> Result<(), String> {
    let program_type = match kind {
        ProbeKind::CgroupSockAddr => ProgramType::CgroupSockAddr,
        ProbeKind::CgroupSock => ProgramType::CgroupSock,
        ProbeKind::Lsm => ProgramType::Lsm(LsmAttachType::Mac),
    };
    match aya::sys::is_program_supported(program_type) {
        Ok(true) => Ok(()),
        Ok(false) => Err("this kernel does not know the program type".into()),
        Err(e) => {
            let refused = matches!(&e, aya::programs::ProgramError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EPERM));
            let hint = if refused && matches!(kind, ProbeKind::Lsm) {
                " (this kernel refuses trampoline programs, or bpf is not in its lsm= list)"
            } else {
                ""
            };
            Err(format!("{}{hint}", error_chain(&e)))
        }
    }
}

/// Pins a link: it then outlives this process, and only removing the pin detaches it.
fn pin_link(link: FdLink, path: &Path) -> Result<(), BpfError> {
    link.pin(path).map(drop).map_err(|source| BpfError::PinLink { path: path.into(), source })
}
