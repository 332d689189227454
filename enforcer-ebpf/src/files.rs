//! File-access programs (BPF-LSM): `file_open`, `bprm_check_security`, `mmap_file`
//! with PROT_EXEC, the `path_*` tree-change hooks and `d_instantiate`.
//!
//! LSM programs run for every task on the machine, so each attach loads its own set
//! (like the socket programs) and a set first asks whether the caller sits in its
//! cgroup: one array lookup and one helper call for tasks it does not govern.
//!
//! A file is judged by (device, inode) of itself and each ancestor, nearest first,
//! walking `d_parent` and crossing mounts at filesystem roots. Bind mounts, symlinks,
//! hard links (the compiler lists hard-linked files of denied trees) and
//! `/proc/self/fd` re-opens all land on the same inodes. Struct offsets come from the
//! running kernel's BTF (`ENF_OFFSETS`), set by the loader.
use aya_ebpf::{
    Global, helpers::bpf_probe_read_kernel_str_bytes, helpers::generated::bpf_get_current_ancestor_cgroup_id,
    macros::lsm, programs::LsmContext,
};
use enforcer_common::{
    FileEntry, FileFilter, FileKey, FileRecord, KernelOffsets, PendingKey, RULE_FAIL_CLOSED, access, change, counter,
    hook, limits, mode, verdict,
};

use crate::{
    emit::{self, FileDecision},
    kmem::{Ptr, load_ptr, load_u32, load_u64, read_ptr, read_u32, read_u64},
    maps::{ENF_BINDINGS, ENF_FILE_FILTER, ENF_FILES, ENF_PENDING, ENF_PENDING_SCRATCH, ENF_POLICIES},
    policy::ENF_BINDING,
};

/// Offsets into the running kernel's structs (`names::GLOBAL_OFFSETS`).
#[unsafe(no_mangle)]
static ENF_OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    file_f_path_dentry: 0,
    file_f_path_mnt: 0,
    file_f_mode: 0,
    path_dentry: 0,
    path_mnt: 0,
    dentry_d_parent: 0,
    dentry_d_inode: 0,
    dentry_d_name_name: 0,
    inode_i_ino: 0,
    inode_i_sb: 0,
    super_block_s_dev: 0,
    mount_mnt: 0,
    mount_mnt_parent: 0,
    mount_mnt_mountpoint: 0,
    linux_binprm_file: 0,
    file_f_inode: 0,
    inode_i_dentry: 0,
    dentry_d_alias: 0,
    valid: 0,
});

/// The offsets, each field loaded where it is used. `Global::load` copies the whole
/// struct with volatile loads, all 19 fields at every call, which the compiler may
/// neither drop nor share; an opaque copy of its address keeps the compiler from
/// folding the build-time zeros (the loader rewrites them) while it loads only the
/// fields used, once.
#[inline(always)]
fn offsets() -> &'static KernelOffsets {
    const _: () = assert!(size_of::<Global<KernelOffsets>>() == size_of::<KernelOffsets>());
    let address: *const Global<KernelOffsets> = &ENF_OFFSETS;
    // SAFETY: a read-only global the loader filled with a `KernelOffsets`; `Global<T>` has T's layout (asserted).
    unsafe { &*core::ptr::read_volatile(&address).cast::<KernelOffsets>() }
}

/// cgroup level of this set's attach point (`names::GLOBAL_CGROUP_LEVEL`).
#[unsafe(no_mangle)]
static ENF_CGROUP_LEVEL: Global<u32> = Global::new(0);

const EACCES: i32 = 13;
const FMODE_READ: u32 = 1 << 0;
const FMODE_WRITE: u32 = 1 << 1;
const FMODE_EXEC: u32 = 1 << 5;
const PROT_EXEC: u64 = 4;

/// The policy slot governing the caller, if the caller sits in this set's cgroup and
/// the policy judges files. `Err` = governed but broken: fail closed.
struct Governed {
    slot: u32,
    audit: bool,
    log_allowed: bool,
    default_grants: u8,
    filter: &'static FileFilter,
}

#[inline(always)]
fn governed() -> Option<Result<Governed, u32>> {
    let binding = ENF_BINDINGS.get(ENF_BINDING.load())?;
    if binding.cgroup_id == 0 {
        return None;
    }
    let level = ENF_CGROUP_LEVEL.load();
    // SAFETY: a helper taking a level number only.
    if unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) } != binding.cgroup_id {
        return None;
    }
    let slot = binding.slot;
    if slot == 0 || slot >= limits::MAX_POLICY_SLOTS || offsets().valid == 0 {
        return Some(Err(slot));
    }
    let Some(filter) = ENF_FILE_FILTER.get(0) else { return Some(Err(slot)) };
    match ENF_POLICIES.get(slot) {
        Some(c) if c.in_use != 0 => {
            if c.files_enabled == 0 {
                return None;
            }
            if c.files_overflow != 0 {
                return Some(Err(slot));
            }
            Some(Ok(Governed {
                slot,
                audit: c.mode == mode::AUDIT,
                log_allowed: c.log_allowed != 0,
                default_grants: c.files_default,
                filter,
            }))
        }
        _ => Some(Err(slot)),
    }
}

/// The caller's policy, asked before anything else so that tasks outside the cgroup
/// pay only for this; `Err` is the hook's answer without a walk: 0 for a task the set
/// does not govern, EACCES (counted) for a governed task whose binding is broken.
#[inline(always)]
fn governing(hook_id: u8) -> Result<Governed, i32> {
    match governed() {
        None => Err(0),
        Some(Ok(g)) => Ok(g),
        Some(Err(slot)) => {
            emit::count(counter::MISSING_POLICY);
            emit::count_decision(slot, hook_id, verdict::DENY);
            Err(-EACCES)
        }
    }
}

/// The entry of a listed inode; the filter spares the lookup for nearly every
/// ancestor, which no rule names.
#[inline(always)]
fn listed(g: &Governed, dev: u32, ino: u64) -> Option<FileEntry> {
    if g.filter.listed[FileFilter::index(dev, ino)] == 0 {
        return None;
    }
    entry_of(g, dev, ino)
}

/// The entry of a marked inode: its record when it has one, else a lookup (another
/// inode holds the record, or the filter byte was marked for another inode).
#[inline(always)]
fn entry_of(g: &Governed, dev: u32, ino: u64) -> Option<FileEntry> {
    let record = &g.filter.records[FileFilter::record_index(dev, ino, g.slot)];
    if record.dev_slot == FileRecord::dev_slot(dev, g.slot) && record.ino == ino {
        return Some(record.entry);
    }
    // SAFETY: a map lookup; the value stays valid for the program run (RCU), and the verifier checks every access to it.
    unsafe { ENF_FILES.get(&FileKey { ino, dev, slot: g.slot }) }.copied()
}

enum Walk {
    Listed(FileEntry),
    Unlisted,
    /// Deeper than the walk's bound: fail closed.
    TooDeep,
}

/// Where a walk starts.
#[derive(Clone, Copy)]
struct Target {
    /// A dentry the verifier knows as `struct dentry *` (a hook argument, or a field
    /// loaded from one): walked with plain loads. NULL when only `untyped` is known.
    dentry: Ptr,
    /// A dentry known only as a number (computed, or read with a helper): walked with
    /// probe reads.
    untyped: Ptr,
    /// Where the target's `struct vfsmount *` is stored (in a `struct path`), NULL if
    /// unknown. Read only when the walk crosses a mount or an event names the path:
    /// most walks end inside the file's own filesystem, and a probe read costs as much
    /// as several steps.
    mnt_field: Ptr,
}

impl Target {
    #[inline(always)]
    fn typed(dentry: Ptr, mnt_field: Ptr) -> Self {
        Self { dentry, untyped: core::ptr::null(), mnt_field }
    }

    #[inline(always)]
    fn untyped(dentry: Ptr) -> Self {
        Self { dentry: core::ptr::null(), untyped: dentry, mnt_field: core::ptr::null() }
    }

    #[inline(always)]
    fn vfsmount(&self) -> Ptr {
        read_ptr(self.mnt_field, 0)
    }

    /// The start of the walk, whichever kind it is (for the event).
    #[inline(always)]
    fn start(&self) -> Ptr {
        if self.dentry.is_null() { self.untyped } else { self.dentry }
    }
}

/// The nearest listed ancestor-or-self of the target.
///
/// Up to the root of the target's own filesystem (where nearly every rule and file
/// is) the walk uses plain loads: a step is two loads of pointers, one of the inode
/// number and one map lookup. Beyond a mount point it continues with probe reads,
/// whose results the verifier knows only as numbers; each part walks at most DEPTH
/// ancestors.
#[inline(always)]
fn nearest_listed<const DEPTH: u32>(o: &KernelOffsets, g: &Governed, t: Target) -> Walk {
    if t.dentry.is_null() {
        return nearest_listed_across_mounts::<DEPTH>(o, g, t.untyped, t.vfsmount());
    }
    if let Some(walk) = nearest_listed_in_filesystem::<DEPTH>(o, g, t.dentry) {
        return walk;
    }
    // At the root of the filesystem: continue at its mount point in the parent mount;
    // at the namespace root (its own parent mount) stop.
    let mount = (t.vfsmount() as usize).wrapping_sub(o.mount_mnt as usize) as Ptr;
    let parent_mount = read_ptr(mount, o.mount_mnt_parent);
    if parent_mount.is_null() || parent_mount == mount {
        return Walk::Unlisted;
    }
    let from = read_ptr(mount, o.mount_mnt_mountpoint);
    let vfsmount = (parent_mount as usize).wrapping_add(o.mount_mnt as usize) as Ptr;
    nearest_listed_across_mounts::<DEPTH>(o, g, from, vfsmount)
}

/// The typed part of the walk: None when it reached the filesystem's root unlisted.
#[inline(always)]
fn nearest_listed_in_filesystem<const DEPTH: u32>(o: &KernelOffsets, g: &Governed, dentry: Ptr) -> Option<Walk> {
    // Every pointer that can be NULL is tested before it is followed: some kernels
    // (6.12) treat fields of a hook's arguments, `d_inode` among them, as trusted and
    // load through them without the JIT's fault guard.
    let inode_of = |d: Ptr| if d.is_null() { d } else { load_ptr(d, o.dentry_d_inode) };
    // A negative dentry (the name a rename or link creates) has no inode: its device
    // is its directory's. The device does not change below the filesystem's root.
    let device = |d: Ptr| {
        let inode = inode_of(d);
        if inode.is_null() { 0 } else { load_u32(load_ptr(inode, o.inode_i_sb), o.super_block_s_dev) }
    };
    let mut dev = device(dentry);
    if dev == 0 {
        dev = device(load_ptr(dentry, o.dentry_d_parent));
    }
    let mut at = Climbed { dentry, ino: 0 };
    // No loop around the climb: 6.1's verifier refuses a loop whose back edge follows
    // a subprogram call. A filter byte marked for another inode (about 1.5% of steps
    // at 1,000 listed inodes) costs a lookup and one more climb; after the fourth
    // the rest of the path is walked with a lookup at every step.
    let left = DEPTH as u64;
    let left = match climb_and_look(o, g, dev, left, &mut at) {
        Ok(walk) => return walk,
        Err(left) => left,
    };
    let left = match climb_and_look(o, g, dev, left, &mut at) {
        Ok(walk) => return walk,
        Err(left) => left,
    };
    let left = match climb_and_look(o, g, dev, left, &mut at) {
        Ok(walk) => return walk,
        Err(left) => left,
    };
    match climb_and_look(o, g, dev, left, &mut at) {
        Ok(walk) => walk,
        Err(left) => nearest_listed_by_lookup(o, g, dev, at.dentry, left),
    }
}

/// The walk without the filter: a crowded filter (a large policy, or a tree built to
/// collide with it) must cost time, never a wrong answer.
#[inline(always)]
fn nearest_listed_by_lookup(o: &KernelOffsets, g: &Governed, dev: u32, mut dentry: Ptr, mut left: u64) -> Option<Walk> {
    while left > 0 {
        left -= 1;
        if dentry.is_null() {
            return Some(Walk::Unlisted);
        }
        let inode = load_ptr(dentry, o.dentry_d_inode);
        let ino = if inode.is_null() { 0 } else { load_u64(inode, o.inode_i_ino) };
        // SAFETY: a map lookup; the value stays valid for the program run (RCU), and the verifier checks every access to it.
        if let Some(entry) = unsafe { ENF_FILES.get(&FileKey { ino, dev, slot: g.slot }) } {
            return Some(Walk::Listed(*entry));
        }
        let parent = load_ptr(dentry, o.dentry_d_parent);
        if parent == dentry {
            return None;
        }
        dentry = parent;
    }
    Some(Walk::TooDeep)
}

/// One climb and the lookup of where it stopped: `Ok` with the walk's answer, or
/// `Err(steps left)` after a byte marked for another inode, from that ancestor's
/// parent on (`at.dentry`).
#[inline(always)]
fn climb_and_look(o: &KernelOffsets, g: &Governed, dev: u32, left: u64, at: &mut Climbed) -> Result<Option<Walk>, u64> {
    match climb(o, g.filter, dev, left, at) {
        CLIMB_NULL => Ok(Some(Walk::Unlisted)),
        CLIMB_ROOT => Ok(None),
        CLIMB_TOO_DEEP => Ok(Some(Walk::TooDeep)),
        marked_left => {
            if let Some(entry) = entry_of(g, dev, at.ino) {
                return Ok(Some(Walk::Listed(entry)));
            }
            let parent = load_ptr(at.dentry, o.dentry_d_parent);
            if parent == at.dentry {
                return Ok(None);
            }
            at.dentry = parent;
            Err(marked_left - CLIMB_MARKED)
        }
    }
}

/// Where `climb` stopped: the marked dentry and its inode number.
#[repr(C)]
struct Climbed {
    dentry: Ptr,
    ino: u64,
}

const CLIMB_NULL: u64 = 0;
const CLIMB_ROOT: u64 = 1;
const CLIMB_TOO_DEEP: u64 = 2;
/// `CLIMB_MARKED + n`: marked, with n steps of the bound left.
const CLIMB_MARKED: u64 = 3;

/// Climbs from `at.dentry` to the first ancestor-or-self whose inode the filter marks,
/// at most `left` steps. A subprogram of its own: inlined into the walk, whose map
/// lookup is a call, the compiler kept the loop's values on the stack and a step cost
/// twice the instructions it needs; here they all fit in registers.
#[inline(never)]
fn climb(o: &KernelOffsets, filter: &FileFilter, dev: u32, mut left: u64, at: &mut Climbed) -> u64 {
    let (d_inode, d_parent, i_ino) = (o.dentry_d_inode as usize, o.dentry_d_parent as usize, o.inode_i_ino as usize);
    let mut dentry = at.dentry;
    while left > 0 {
        left -= 1;
        if dentry.is_null() {
            return CLIMB_NULL;
        }
        // A negative dentry's inode number is 0, which names no entry.
        let inode = load_ptr(dentry, d_inode);
        let ino = if inode.is_null() { 0 } else { load_u64(inode, i_ino) };
        if filter.listed[FileFilter::index(dev, ino)] != 0 {
            at.dentry = dentry;
            at.ino = ino;
            return CLIMB_MARKED + left;
        }
        let parent = load_ptr(dentry, d_parent);
        if parent == dentry {
            return CLIMB_ROOT;
        }
        dentry = parent;
    }
    CLIMB_TOO_DEEP
}

/// The walk with probe reads, crossing mounts at filesystem roots.
///
/// Written so that every iteration leaves the same kind of state whichever way it went
/// (the key is always built and looked up, and both ways to the parent assign the same
/// registers): the verifier then prunes the paths at the loop head instead of
/// following every combination of branches through all iterations. The device and
/// the mount's parent and mount point do not change below a filesystem root, so they
/// are read again only where the walk crosses into the parent mount.
#[inline(always)]
fn nearest_listed_across_mounts<const DEPTH: u32>(
    o: &KernelOffsets,
    g: &Governed,
    mut dentry: Ptr,
    vfsmount: Ptr,
) -> Walk {
    let mut mount = (vfsmount as usize).wrapping_sub(o.mount_mnt as usize) as Ptr;
    let mut parent_mount = read_ptr(mount, o.mount_mnt_parent);
    let mut mountpoint = read_ptr(mount, o.mount_mnt_mountpoint);
    let mut dev = device_of(o, dentry);
    if dev == 0 {
        dev = device_of(o, read_ptr(dentry, o.dentry_d_parent));
    }
    let mut i = 0;
    while i < DEPTH {
        i += 1;
        // A NULL inode reads as zeros, which names no entry.
        let inode = read_ptr(dentry, o.dentry_d_inode);
        if let Some(entry) = listed(g, dev, read_u64(inode, o.inode_i_ino)) {
            return Walk::Listed(entry);
        }
        let parent = read_ptr(dentry, o.dentry_d_parent);
        if dentry.is_null() || (parent == dentry && (parent_mount.is_null() || parent_mount == mount)) {
            return Walk::Unlisted;
        }
        if parent == dentry {
            dentry = mountpoint;
            mount = parent_mount;
            parent_mount = read_ptr(mount, o.mount_mnt_parent);
            mountpoint = read_ptr(mount, o.mount_mnt_mountpoint);
            dev = device_of(o, dentry);
        } else {
            dentry = parent;
        }
    }
    Walk::TooDeep
}

/// `s_dev` of the superblock of `dentry`'s inode; 0 for a negative dentry.
#[inline(always)]
fn device_of(o: &KernelOffsets, dentry: Ptr) -> u32 {
    read_u32(read_ptr(read_ptr(dentry, o.dentry_d_inode), o.inode_i_sb), o.super_block_s_dev)
}

/// What the rules say of one target: (allowed, rule id).
#[inline(always)]
fn decide<const DEPTH: u32>(o: &KernelOffsets, g: &Governed, target: Target, requested: u8) -> (bool, u32) {
    match nearest_listed::<DEPTH>(o, g, target) {
        Walk::Listed(e) => (e.deny == 0 && e.allow & requested == requested, e.rule_id as u32),
        Walk::Unlisted => (g.default_grants & requested == requested, 0),
        Walk::TooDeep => (false, RULE_FAIL_CLOSED),
    }
}

/// Judges `requested` access to the target for the governed caller. Returns 0 or
/// -EACCES.
#[inline(always)]
fn judge(g: &Governed, target: Target, requested: u8, hook_id: u8, change_kind: u8) -> i32 {
    judge_both(g, target, None, requested, hook_id, change_kind)
}

/// Judges one or two targets (a rename's source and destination): both must be
/// allowed. One event, for the first target refused, so the verifier walks the event
/// path once whatever the number of targets.
#[inline(always)]
fn judge_both(g: &Governed, first: Target, second: Option<Target>, requested: u8, hook_id: u8, change_kind: u8) -> i32 {
    let o = offsets();
    // Two walks in one program double the verifier's work; each gets half the depth
    // (a deeper path is refused, fail closed).
    let (mut allowed, mut rule_id) = match second {
        None => decide::<{ limits::MAX_PATH_DEPTH }>(o, g, first, requested),
        Some(_) => decide::<{ limits::MAX_PATH_DEPTH_TWO_TARGETS }>(o, g, first, requested),
    };
    let mut target = first;
    if allowed {
        if let Some(second) = second {
            (allowed, rule_id) = decide::<{ limits::MAX_PATH_DEPTH_TWO_TARGETS }>(o, g, second, requested);
            target = second;
        }
    }
    let v = if allowed {
        verdict::ALLOW
    } else if g.audit && rule_id != RULE_FAIL_CLOSED {
        verdict::AUDIT_DENY
    } else {
        verdict::DENY
    };
    emit::count_decision(g.slot, hook_id, v);
    if v != verdict::ALLOW || g.log_allowed {
        let d = FileDecision { slot: g.slot, rule_id, hook: hook_id, verdict: v, requested, change: change_kind };
        emit::emit_file_event(&d, o, target.start(), target.vfsmount());
    }
    if v == verdict::DENY { -EACCES } else { 0 }
}

/// An earlier LSM program's denial stands.
#[inline(always)]
fn earlier(ctx: &LsmContext, ret_arg: usize) -> Option<i32> {
    let ret: i32 = ctx.arg(ret_arg);
    if ret != 0 { Some(ret) } else { None }
}

#[lsm(hook = "file_open")]
pub fn enf_file_open(ctx: LsmContext) -> i32 {
    if let Some(ret) = earlier(&ctx, 1) {
        return ret;
    }
    let file: Ptr = ctx.arg(0);
    let o = offsets();
    let f_mode = load_u32(file, o.file_f_mode);
    // execve's own open is judged as exec by bprm_check_security.
    if f_mode & FMODE_EXEC != 0 {
        return 0;
    }
    let mut requested = 0;
    if f_mode & FMODE_READ != 0 {
        requested |= access::READ;
    }
    if f_mode & FMODE_WRITE != 0 {
        requested |= access::WRITE;
    }
    if requested == 0 {
        return 0;
    }
    let g = match governing(hook::FILE_OPEN) {
        Ok(g) => g,
        Err(ret) => return ret,
    };
    let dentry = load_ptr(file, o.file_f_path_dentry);
    // Overlayfs opens the real file of a layer for each overlay file. Up to Linux 6.6
    // that backing file carries the overlay's path (judged already, when the overlay
    // file itself was opened) with the real inode: judge the real file by its own
    // dentry, or an overlay over a denied tree would relabel it. Its private layer
    // mount is unknown, so that walk stops at the layer's filesystem root. Later
    // kernels give backing files their real path, judged as it is.
    let inode = load_ptr(file, o.file_f_inode);
    let target = if inode != load_ptr(dentry, o.dentry_d_inode) {
        let alias = read_ptr(inode, o.inode_i_dentry);
        let real = if alias.is_null() { alias } else { alias.wrapping_sub(o.dentry_d_alias as usize) };
        Target::untyped(real)
    } else {
        Target::typed(dentry, file.wrapping_add(o.file_f_path_mnt as usize))
    };
    judge(&g, target, requested, hook::FILE_OPEN, change::NONE)
}

#[lsm(hook = "bprm_check_security")]
pub fn enf_bprm_check(ctx: LsmContext) -> i32 {
    if let Some(ret) = earlier(&ctx, 1) {
        return ret;
    }
    let g = match governing(hook::FILE_EXEC) {
        Ok(g) => g,
        Err(ret) => return ret,
    };
    let bprm: Ptr = ctx.arg(0);
    let o = offsets();
    let file = load_ptr(bprm, o.linux_binprm_file);
    if file.is_null() {
        return 0;
    }
    judge(&g, file_target(o, file), access::EXEC, hook::FILE_EXEC, change::NONE)
}

/// Executable mappings need exec: `ld.so ./binary` maps the binary without execve.
#[lsm(hook = "mmap_file")]
pub fn enf_mmap_file(ctx: LsmContext) -> i32 {
    if let Some(ret) = earlier(&ctx, 4) {
        return ret;
    }
    let file: Ptr = ctx.arg(0);
    let prot: u64 = ctx.arg(2);
    if file.is_null() || prot & PROT_EXEC == 0 {
        return 0;
    }
    let g = match governing(hook::FILE_MMAP) {
        Ok(g) => g,
        Err(ret) => return ret,
    };
    let o = offsets();
    judge(&g, file_target(o, file), access::EXEC, hook::FILE_MMAP, change::NONE)
}

/// The path of a `struct file *` the verifier knows the type of.
#[inline(always)]
fn file_target(o: &KernelOffsets, file: Ptr) -> Target {
    Target::typed(load_ptr(file, o.file_f_path_dentry), file.wrapping_add(o.file_f_path_mnt as usize))
}

/// Write access to the tree at `path` (a `struct path *`).
#[inline(always)]
fn judge_path_write(path: Ptr, change_kind: u8) -> i32 {
    let g = match governing(hook::FILE_CHANGE) {
        Ok(g) => g,
        Err(ret) => return ret,
    };
    let o = offsets();
    judge(
        &g,
        Target::typed(load_ptr(path, o.path_dentry), path.wrapping_add(o.path_mnt as usize)),
        access::WRITE,
        hook::FILE_CHANGE,
        change_kind,
    )
}

/// Write access to an existing entry `dentry` inside the directory `dir` (same mount).
#[inline(always)]
fn judge_entry_write(dir: Ptr, dentry: Ptr, change_kind: u8) -> i32 {
    let g = match governing(hook::FILE_CHANGE) {
        Ok(g) => g,
        Err(ret) => return ret,
    };
    let o = offsets();
    judge(
        &g,
        Target::typed(dentry, dir.wrapping_add(o.path_mnt as usize)),
        access::WRITE,
        hook::FILE_CHANGE,
        change_kind,
    )
}

#[lsm(hook = "path_mknod")]
pub fn enf_path_mknod(ctx: LsmContext) -> i32 {
    if let Some(ret) = earlier(&ctx, 4) {
        return ret;
    }
    judge_path_write(ctx.arg(0), change::CREATE)
}

#[lsm(hook = "path_mkdir")]
pub fn enf_path_mkdir(ctx: LsmContext) -> i32 {
    if let Some(ret) = earlier(&ctx, 3) {
        return ret;
    }
    judge_path_write(ctx.arg(0), change::MKDIR)
}

#[lsm(hook = "path_symlink")]
pub fn enf_path_symlink(ctx: LsmContext) -> i32 {
    if let Some(ret) = earlier(&ctx, 3) {
        return ret;
    }
    judge_path_write(ctx.arg(0), change::SYMLINK)
}

#[lsm(hook = "path_rmdir")]
pub fn enf_path_rmdir(ctx: LsmContext) -> i32 {
    if let Some(ret) = earlier(&ctx, 2) {
        return ret;
    }
    // The entry's walk passes through its directory: one walk judges both.
    judge_entry_write(ctx.arg(0), ctx.arg(1), change::RMDIR)
}

#[lsm(hook = "path_unlink")]
pub fn enf_path_unlink(ctx: LsmContext) -> i32 {
    if let Some(ret) = earlier(&ctx, 2) {
        return ret;
    }
    judge_entry_write(ctx.arg(0), ctx.arg(1), change::UNLINK)
}

/// A hard link needs write on the linked file's tree and on the new directory. A link
/// onto a protected name that does not exist yet lists the linked inode.
#[lsm(hook = "path_link")]
pub fn enf_path_link(ctx: LsmContext) -> i32 {
    if let Some(ret) = earlier(&ctx, 3) {
        return ret;
    }
    let old_dentry: Ptr = ctx.arg(0);
    let new_dir: Ptr = ctx.arg(1);
    let new_dentry: Ptr = ctx.arg(2);
    let o = offsets();
    // The new (negative) dentry's walk starts at the new directory.
    let ret = match governing(hook::FILE_CHANGE) {
        Ok(g) => {
            let mnt = new_dir.wrapping_add(o.path_mnt as usize);
            judge_both(
                &g,
                Target::typed(old_dentry, mnt),
                Some(Target::typed(new_dentry, mnt)),
                access::WRITE,
                hook::FILE_CHANGE,
                change::LINK,
            )
        }
        Err(ret) => ret,
    };
    // Whoever made the link (inside the cgroup or not), a listed name gets its inode.
    if ret == 0 {
        let o = offsets();
        adopt_pending(o, new_dentry, read_ptr(old_dentry, o.dentry_d_inode));
    }
    ret
}

/// A rename needs write on both directories and on the moved entry.
#[lsm(hook = "path_rename")]
pub fn enf_path_rename(ctx: LsmContext) -> i32 {
    if let Some(ret) = earlier(&ctx, 5) {
        return ret;
    }
    let old_dir: Ptr = ctx.arg(0);
    let old_dentry: Ptr = ctx.arg(1);
    let new_dir: Ptr = ctx.arg(2);
    let new_dentry: Ptr = ctx.arg(3);
    let o = offsets();
    let ret = match governing(hook::FILE_CHANGE) {
        Ok(g) => judge_both(
            &g,
            Target::typed(old_dentry, old_dir.wrapping_add(o.path_mnt as usize)),
            Some(Target::typed(new_dentry, new_dir.wrapping_add(o.path_mnt as usize))),
            access::WRITE,
            hook::FILE_CHANGE,
            change::RENAME,
        ),
        Err(ret) => ret,
    };
    // Whoever renamed (inside the cgroup or not), a listed name gets its inode.
    if ret == 0 {
        let o = offsets();
        adopt_pending(o, new_dentry, read_ptr(old_dentry, o.dentry_d_inode));
    }
    ret
}

#[lsm(hook = "path_truncate")]
pub fn enf_path_truncate(ctx: LsmContext) -> i32 {
    if let Some(ret) = earlier(&ctx, 1) {
        return ret;
    }
    judge_path_write(ctx.arg(0), change::TRUNCATE)
}

#[lsm(hook = "path_chmod")]
pub fn enf_path_chmod(ctx: LsmContext) -> i32 {
    if let Some(ret) = earlier(&ctx, 2) {
        return ret;
    }
    judge_path_write(ctx.arg(0), change::CHMOD)
}

#[lsm(hook = "path_chown")]
pub fn enf_path_chown(ctx: LsmContext) -> i32 {
    if let Some(ret) = earlier(&ctx, 3) {
        return ret;
    }
    judge_path_write(ctx.arg(0), change::CHOWN)
}

/// A dentry gets its inode (created, or first looked up): if its name is a listed path
/// that did not exist at compile time, list the inode now, in the kernel, so that the
/// path is protected from its first moment even with no controller running.
#[lsm(hook = "d_instantiate")]
pub fn enf_d_instantiate(ctx: LsmContext) -> i32 {
    let o = offsets();
    if o.valid != 0 {
        adopt_pending(o, ctx.arg(0), ctx.arg(1));
    }
    0
}

/// If (parent of `dentry`, name of `dentry`) is pending for this set's slot, list
/// `inode` (or its next pending component).
#[inline(always)]
fn adopt_pending(o: &KernelOffsets, dentry: Ptr, inode: Ptr) {
    if dentry.is_null() || inode.is_null() {
        return;
    }
    let Some(binding) = ENF_BINDINGS.get(ENF_BINDING.load()) else { return };
    let slot = binding.slot;
    if binding.cgroup_id == 0 || slot == 0 {
        return;
    }
    let parent = read_ptr(dentry, o.dentry_d_parent);
    let parent_inode = read_ptr(parent, o.dentry_d_inode);
    if parent.is_null() || parent_inode.is_null() {
        return;
    }
    let mut key = PendingKey {
        parent_ino: read_u64(parent_inode, o.inode_i_ino),
        parent_dev: read_u32(read_ptr(parent_inode, o.inode_i_sb), o.super_block_s_dev),
        slot,
        // Zeroed as words: a byte-array literal becomes a `memset` call.
        // SAFETY: arrays of the same size; every bit pattern is a valid u8 array.
        name: unsafe {
            core::mem::transmute::<[u64; limits::PENDING_NAME_LEN / 8], [u8; limits::PENDING_NAME_LEN]>(
                [0u64; limits::PENDING_NAME_LEN / 8],
            )
        },
    };
    let name_ptr = read_ptr(dentry, o.dentry_d_name_name);
    // Truncated to the key's length: a longer name is compared on its first bytes.
    // SAFETY: the helper bounds its write by the slice: the key's name but its last byte.
    if unsafe { bpf_probe_read_kernel_str_bytes(name_ptr, &mut key.name[..limits::PENDING_NAME_LEN - 1]) }.is_err() {
        return;
    }
    // SAFETY: a map lookup; the value stays valid for the program run (RCU), and the verifier checks every access to it.
    let Some(pending) = (unsafe { ENF_PENDING.get(&key) }) else { return };
    let ino = read_u64(inode, o.inode_i_ino);
    let dev = read_u32(read_ptr(inode, o.inode_i_sb), o.super_block_s_dev);
    if pending.remaining == 0 {
        // Marked before it is listed: a walk must never skip a listed inode.
        let Some(filter) = ENF_FILE_FILTER.get_ptr_mut(0) else { return };
        // SAFETY: the map's one value, valid for the program run; index() < LEN.
        unsafe { (*filter).listed[FileFilter::index(dev, ino)] = 1 };
        if ENF_FILES.insert(&FileKey { ino, dev, slot }, &pending.entry, 0).is_err() {
            files_overflow(slot);
        }
        // An inode listed already (renamed or linked onto the pending path) may have
        // a record: it must say what the table now says. One word, never half seen.
        // SAFETY: as above; record_index() < RECORDS.
        let record = unsafe { &mut (*filter).records[FileFilter::record_index(dev, ino, slot)] };
        if record.dev_slot == FileRecord::dev_slot(dev, slot) && record.ino == ino {
            // SAFETY: FileEntry is 8 bytes of plain data (size asserted in enforcer-common).
            let entry: u64 = unsafe { core::mem::transmute(pending.entry) };
            // SAFETY: `record.entry` is 8 aligned bytes of the record; one store, so a
            // walk reads the old or the new entry, never half of each.
            unsafe { core::ptr::write_volatile((&mut record.entry as *mut FileEntry).cast::<u64>(), entry) };
        }
        return;
    }
    // Built in a per-CPU scratch value: key and value together exceed the BPF stack.
    let Some(next) = ENF_PENDING_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's scratch value, ours for the program run (no preemption).
    let next = unsafe { &mut *next };
    next.entry = pending.entry;
    next.remaining = pending.remaining - 1;
    next._pad = 0;
    // Whole-array copies in 8-byte words: a byte array assignment would call a
    // memcpy/memset subprogram.
    copy_name(&mut next.names[0], &pending.names[1]);
    copy_name(&mut next.names[1], &pending.names[2]);
    copy_name(&mut next.names[2], &key_zero());
    key.parent_ino = ino;
    key.parent_dev = dev;
    copy_name(&mut key.name, &pending.names[0]);
    if ENF_PENDING.insert(&key, next, 0).is_err() {
        files_overflow(slot);
    }
}

/// A listed path could not be listed: the slot fails closed (see
/// `PolicyConfig::files_overflow`).
#[inline(always)]
fn files_overflow(slot: u32) {
    emit::count(counter::FILES_FULL);
    if let Some(config) = ENF_POLICIES.get_ptr_mut(slot) {
        // SAFETY: the slot's config, valid for the program run; one byte store.
        unsafe { (*config).files_overflow = 1 };
    }
}

#[inline(always)]
fn copy_name(to: &mut [u8; limits::PENDING_NAME_LEN], from: &[u8; limits::PENDING_NAME_LEN]) {
    let to = to.as_mut_ptr() as *mut u64;
    let from = from.as_ptr() as *const u64;
    let mut i = 0;
    while i < limits::PENDING_NAME_LEN / 8 {
        // SAFETY: i < LEN / 8 words, inside both arrays; unaligned accesses.
        unsafe { core::ptr::write_unaligned(to.add(i), core::ptr::read_unaligned(from.add(i))) };
        i += 1;
    }
}

#[inline(always)]
fn key_zero() -> [u8; limits::PENDING_NAME_LEN] {
    // SAFETY: arrays of the same size; every bit pattern is a valid u8 array.
    unsafe {
        core::mem::transmute::<[u64; limits::PENDING_NAME_LEN / 8], [u8; limits::PENDING_NAME_LEN]>(
            [0u64; limits::PENDING_NAME_LEN / 8],
        )
    }
}
