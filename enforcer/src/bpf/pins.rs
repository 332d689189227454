//! The pins under `/sys/fs/bpf/enforcer`: links per cgroup, maps shared by every attach,
//! and the check that pinned maps have this build's layout.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::maps::{Map, MapData};

use super::{BpfError, EBPF_OBJECT, PIN_ROOT, io_err, links_dir, maps_dir};

/// Removes the links of a cgroup: its programs stop running at once.
pub fn detach_links(cgroup_id: u64) -> Result<usize, BpfError> {
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
        Err(source) => return Err(BpfError::Io { what: "reading", path: dir, source }),
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
pub fn remove_pins() -> Result<(), BpfError> {
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
            Err(source) => return Err(BpfError::Io { what: "removing", path: d, source }),
        }
    }
    Ok(())
}

/// Number of pinned links of a cgroup.
pub fn pinned_link_count(cgroup_id: u64) -> usize {
    fs::read_dir(links_dir(cgroup_id)).map(|d| d.count()).unwrap_or(0)
}

/// The layout of a map as the kernel reports it, for comparison with this build's.
fn layout(map_type: u32, key: u32, value: u32, entries: u32, flags: u32) -> String {
    format!("type {map_type}, key {key} bytes, value {value} bytes, {entries} entries, flags {flags:#x}")
}

/// Pinned maps outlive the binary that made them, and a load reuses a pinned map as it
/// finds it: after an upgrade that changed a map's layout the new programs would read
/// the old values with the new layout. Every pinned map must match this build's
/// definition exactly.
pub fn check_pinned_layouts() -> Result<(), BpfError> {
    for (name, expected) in pinned_layouts() {
        let path = maps_dir().join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|e| BpfError::Io {
            what: "reading the layout of the pinned map",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        let kernel_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let found = layout(kernel_type, info.key_size(), info.value_size(), info.max_entries(), info.map_flags());
        if found != *expected {
            return Err(BpfError::IncompatiblePin { name: name.clone(), path, found, expected: expected.clone() });
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

pub(super) fn open_pinned_map(name: &'static str) -> Result<Map, BpfError> {
    Map::from_map_data(open_pinned_data(name)?).map_err(|source| BpfError::Map { name, source })
}

pub(super) fn open_pinned_data(name: &'static str) -> Result<MapData, BpfError> {
    let path = maps_dir().join(name);
    if !path.exists() {
        return Err(BpfError::NotAttached);
    }
    MapData::from_pin(&path).map_err(|source| BpfError::Map { name, source })
}

/// Opens a pinned map as aya's typed map (`Array<_, T>`, `HashMap<_, K, V>`, ...).
macro_rules! typed_map {
    ($name:expr) => {{
        let name = $name;
        $crate::bpf::pins::open_pinned_map(name)?
            .try_into()
            .map_err(|source| $crate::bpf::BpfError::Map { name, source })?
    }};
}

pub(super) use typed_map;

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use enforcer_common::names;

    use super::*;

    /// The kernel's `#[map(name = ...)]` attributes and `enforcer_common::names` spell
    /// every map and program twice; this build's object must hold exactly those names.
    #[test]
    fn the_object_holds_every_shared_map_and_program_name() {
        assert!(!EBPF_OBJECT.is_empty(), "built with AYA_BUILD_SKIP=1: no kernel object to check");
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the kernel object parses");
        let in_object: BTreeSet<&str> = obj.maps.keys().map(String::as_str).filter(|n| !n.starts_with('.')).collect();
        let declared: BTreeSet<&str> = names::MAPS.iter().copied().collect();
        assert_eq!(in_object, declared, "maps in the object vs enforcer_common::names::MAPS");
        let programs: BTreeSet<&str> = obj.programs.keys().map(String::as_str).collect();
        let hooks = super::super::programs::HOOKS.iter().copied();
        let lsm = names::LSM_PROGRAMS.iter().map(|(name, _)| *name);
        let declared: BTreeSet<&str> = hooks.chain(lsm).collect();
        assert_eq!(programs, declared, "programs in the object vs enforcer_common::names");
        let pinned: Vec<&str> = pinned_layouts().iter().map(|(n, _)| n.as_str()).collect();
        assert!(pinned.contains(&names::MAP_BINDINGS) && !pinned.contains(&names::MAP_EVENTS), "{pinned:?}");
    }
}
