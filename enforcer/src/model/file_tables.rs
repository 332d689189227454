//! File policy compiled against the filesystem: `spec.files` in, inode tables out.
//!
//! Rules are matched by (device, inode) of the opened file and its ancestors, so bind
//! mounts, symlinks and `/proc/self/fd` re-opens name the same inodes and cannot
//! relabel a file. The same tables drive both backends: the kernel walks `d_parent`
//! (BPF-LSM), the fanotify backend walks the opened path's prefixes (`judge_path`).
//!
//! No kernel and no aya here: only `stat`, `readlink` and directory listings.
use std::{
    collections::{BTreeMap, HashMap},
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
};

use enforcer_common::{FileEntry, access, limits};

use super::policy::{Action, FileList, FilePolicy};

/// Regular files with more than one link found under denied trees, at most this many
/// entries are listed (a walk bound; a denied tree is expected to be small: ~/.ssh).
const MAX_DENIED_TREE_WALK: usize = 20_000;

/// A listed path that does not exist yet: the deepest existing ancestor and the names
/// below it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub parent_dev: u32,
    pub parent_ino: u64,
    /// The deepest existing ancestor, as compiled.
    pub parent: PathBuf,
    pub names: Vec<String>,
    pub entry: FileEntry,
    /// The name existed at compile time (and is listed by its inode too): this entry
    /// gives the rule to whatever replaces it, a file renamed over it or re-created.
    pub existed: bool,
}

impl Pending {
    /// The next missing component exists now: it was created after the compile.
    pub fn appeared(&self) -> bool {
        !self.existed
            && self.names.first().is_some_and(|name| std::fs::symlink_metadata(self.parent.join(name)).is_ok())
    }
}

impl FileTables {
    /// A path listed as missing exists now (created between compile and the moment the
    /// kernel could see its creation): the policy must be compiled again.
    pub fn missed_creations(&self) -> bool {
        self.pending.iter().any(Pending::appeared)
    }
}

/// One rule as compiled: what it names on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledFileRule {
    pub name: String,
    pub resolved: PathBuf,
    pub exists: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileTables {
    /// Access granted where no listed path decides.
    pub default_grants: u8,
    pub inodes: HashMap<(u32, u64), FileEntry>,
    pub pending: Vec<Pending>,
    /// Index i holds rule id i + 1.
    pub rules: Vec<CompiledFileRule>,
}

/// The kernel's encoding of a device number (`MKDEV`), from a userspace `st_dev`.
pub fn kernel_dev(st_dev: u64) -> u32 {
    let major = nix::sys::stat::major(st_dev) as u32;
    let minor = nix::sys::stat::minor(st_dev) as u32;
    (major << 20) | (minor & 0xf_ffff)
}

/// Expands `~` and resolves symlinks in the part of `path` that exists. Returns the
/// resolved path and whether it exists.
pub fn resolve(path: &str, home: &Path) -> Result<(PathBuf, bool), String> {
    let expanded = match path.strip_prefix('~') {
        Some(rest) => home.join(rest.trim_start_matches('/')),
        None => PathBuf::from(path),
    };
    // Canonicalize the longest existing prefix; append the rest as written.
    let mut existing = expanded.clone();
    let mut missing = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(real) => {
                let exists = missing.is_empty();
                let mut out = real;
                for name in missing.iter().rev() {
                    out.push(name);
                }
                return Ok((out, exists));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let Some(name) = existing.file_name().map(|n| n.to_os_string()) else {
                    return Err(format!("{path}: no part of {} exists", expanded.display()));
                };
                missing.push(name);
                existing.pop();
            }
            Err(e) => return Err(format!("{path}: resolving {}: {e}", existing.display())),
        }
    }
}

fn is_ancestor_or_self(ancestor: &Path, path: &Path) -> bool {
    path.starts_with(ancestor)
}

/// Compiles `policy` for an agent whose home is `home`.
pub fn compile(policy: &FilePolicy, home: &Path) -> Result<FileTables, String> {
    let mut rules = Vec::with_capacity(policy.rules.len());
    for rule in &policy.rules {
        let (resolved, exists) = resolve(&rule.path, home).map_err(|e| format!("files.{}: {e}", rule.list.name()))?;
        rules.push(CompiledFileRule { name: rule.name(), resolved, exists });
    }
    // Each distinct resolved path gets one entry: the union of what every listed
    // ancestor-or-self grants, or deny if any deny rule covers it.
    let mut by_path: BTreeMap<PathBuf, FileEntry> = BTreeMap::new();
    for (i, r) in rules.iter().enumerate() {
        let path = &r.resolved;
        if by_path.contains_key(path) {
            continue;
        }
        let covering =
            || policy.rules.iter().zip(&rules).enumerate().filter(|(_, (_, c))| is_ancestor_or_self(&c.resolved, path));
        // The deciding deny is the nearest (longest) covering deny path.
        let deny = covering()
            .filter(|(_, (p, _))| p.list == FileList::Deny)
            .max_by_key(|(_, (_, c))| c.resolved.components().count())
            .map(|(j, _)| j);
        let entry = match deny {
            Some(j) => FileEntry { allow: 0, deny: 1, rule_id: (j + 1) as u16, _pad: 0 },
            None => {
                let allow = covering().fold(0u8, |acc, (_, (p, _))| acc | p.list.grants());
                FileEntry { allow, deny: 0, rule_id: (i + 1) as u16, _pad: 0 }
            }
        };
        by_path.insert(path.clone(), entry);
    }
    let mut tables = FileTables {
        default_grants: if policy.default == Action::Allow { access::ALL } else { 0 },
        inodes: HashMap::new(),
        pending: Vec::new(),
        rules,
    };
    for (path, entry) in &by_path {
        match std::fs::metadata(path) {
            Ok(meta) => {
                tables.inodes.insert((kernel_dev(meta.dev()), meta.ino()), *entry);
                if entry.deny != 0 && meta.is_dir() {
                    add_hard_linked_files(path, *entry, &mut tables.inodes);
                }
                // Also by (parent, name): an atomic replacement (a new file renamed over
                // the name: editors, `sed -i`, `aws configure`) or a re-creation gives the
                // name a new inode, which takes the name's rule, not its parent's.
                if path.parent().is_some() {
                    tables.pending.push(Pending { existed: true, ..pending_for(path, *entry)? });
                }
            }
            Err(_) => tables.pending.push(pending_for(path, *entry)?),
        }
    }
    if tables.inodes.len() > limits::MAX_FILE_ENTRIES as usize {
        return Err(format!(
            "{} file entries: at most {} fit the kernel table",
            tables.inodes.len(),
            limits::MAX_FILE_ENTRIES
        ));
    }
    Ok(tables)
}

/// The deepest existing ancestor of a missing path, and the names below it.
fn pending_for(path: &Path, entry: FileEntry) -> Result<Pending, String> {
    let mut names = Vec::new();
    let mut parent = path.to_path_buf();
    loop {
        let Some(name) = parent.file_name() else {
            return Err(format!("{}: no ancestor exists", path.display()));
        };
        names.push(name.to_string_lossy().into_owned());
        parent.pop();
        if let Ok(meta) = std::fs::metadata(&parent) {
            names.reverse();
            if names.len() > limits::MAX_PENDING_DEPTH {
                return Err(format!(
                    "{}: {} components below {} do not exist yet; at most {} may be missing",
                    path.display(),
                    names.len(),
                    parent.display(),
                    limits::MAX_PENDING_DEPTH
                ));
            }
            return Ok(Pending {
                parent_dev: kernel_dev(meta.dev()),
                parent_ino: meta.ino(),
                parent,
                names,
                entry,
                existed: false,
            });
        }
    }
}

/// A hard link elsewhere names the same inode as a file under a denied tree; listing
/// such files by their own inode keeps the deny whatever name opens them.
fn add_hard_linked_files(dir: &Path, entry: FileEntry, inodes: &mut HashMap<(u32, u64), FileEntry>) {
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = 0usize;
    while let Some(d) = stack.pop() {
        let Ok(list) = std::fs::read_dir(&d) else { continue };
        for e in list.flatten() {
            seen += 1;
            if seen > MAX_DENIED_TREE_WALK {
                tracing::warn!(
                    "{}: more than {MAX_DENIED_TREE_WALK} entries; hard links beyond are not listed",
                    dir.display()
                );
                return;
            }
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.nlink() > 1 {
                inodes.entry((kernel_dev(meta.dev()), meta.ino())).or_insert(entry);
            }
        }
    }
}

/// A verdict on one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileVerdict {
    pub allowed: bool,
    /// 1-based rule id that decided; 0 = the default.
    pub rule_id: u16,
}

/// Whether `entry` (the nearest listed ancestor, None if none) grants `requested`.
pub fn decide(tables: &FileTables, entry: Option<FileEntry>, requested: u8) -> FileVerdict {
    match entry {
        Some(e) => FileVerdict { allowed: e.deny == 0 && e.allow & requested == requested, rule_id: e.rule_id },
        None => FileVerdict { allowed: tables.default_grants & requested == requested, rule_id: 0 },
    }
}

/// Judges an opened file by its path as the kernel names it (absolute, symlinks
/// resolved): each prefix is stat'ed and looked up by inode, nearest first; pending
/// entries match by name under their existing parent. Used by the fanotify backend and
/// by tests as the model of the kernel walk.
pub fn judge_path(tables: &FileTables, path: &Path, requested: u8) -> FileVerdict {
    let prefixes: Vec<PathBuf> = {
        let mut p = PathBuf::new();
        let mut out = Vec::new();
        for c in path.components() {
            match c {
                Component::RootDir => p.push("/"),
                Component::Normal(n) => p.push(n),
                // The kernel's names carry neither; refuse anything else (fail closed).
                _ => return decide(tables, Some(FileEntry { allow: 0, deny: 1, rule_id: 0, _pad: 0 }), requested),
            }
            out.push(p.clone());
        }
        out
    };
    let ids: Vec<Option<(u32, u64)>> =
        prefixes.iter().map(|p| std::fs::metadata(p).ok().map(|m| (kernel_dev(m.dev()), m.ino()))).collect();
    // hits[j]: the entry naming prefix j, by inode or as a pending path.
    let mut hits: Vec<Option<FileEntry>> =
        ids.iter().map(|id| id.and_then(|k| tables.inodes.get(&k).copied())).collect();
    for pend in &tables.pending {
        for (a, id) in ids.iter().enumerate() {
            if *id != Some((pend.parent_dev, pend.parent_ino)) {
                continue;
            }
            let below: Vec<String> = prefixes[a + 1..]
                .iter()
                .take(pend.names.len())
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            if below == pend.names {
                let j = a + pend.names.len();
                // The pending path's entry wins over the inode's own, as in the kernel,
                // which lists an inode renamed or linked there again with it.
                hits[j] = Some(pend.entry);
            }
        }
    }
    decide(tables, hits.into_iter().rev().flatten().next(), requested)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse::parse_policy_str;
    use enforcer_common::access::{EXEC, READ, WRITE};

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("enforcer-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d.canonicalize().unwrap())
    }

    fn tables(root: &Path, files: &str) -> FileTables {
        let text =
            format!("apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: t\nspec:\n  files:\n{files}");
        let text = text.replace("ROOT", root.to_str().unwrap());
        let policy = parse_policy_str(&text, "t.yaml").unwrap();
        compile(policy.files.as_ref().unwrap(), &root.join("home")).unwrap()
    }

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "x").unwrap();
    }

    #[test]
    fn lists_grant_by_nearest_ancestor_and_deny_wins() {
        let d = scratch("lists");
        let r = &d.0;
        for f in [
            "usr/bin/ls",
            "usr/lib/x.so",
            "home/project/a/b/c.txt",
            "home/.ssh/id",
            "tmp/agent/out",
            "etc/shadow",
            "etc/hosts",
        ] {
            touch(&r.join(f));
        }
        let t = tables(
            r,
            "    read: [ROOT/usr, ROOT/etc, \"~/project\"]\n    write: [\"~/project/a\", ROOT/tmp/agent]\n    exec: [ROOT/usr/bin]\n    deny: [\"~/.ssh\", ROOT/etc/shadow]\n",
        );
        let j = |p: &str, a: u8| judge_path(&t, &r.join(p), a).allowed;
        assert!(j("usr/lib/x.so", READ) && !j("usr/lib/x.so", WRITE) && !j("usr/lib/x.so", EXEC));
        // /usr/bin is listed for exec and inherits read from /usr.
        assert!(j("usr/bin/ls", EXEC) && j("usr/bin/ls", READ) && !j("usr/bin/ls", WRITE));
        assert!(j("home/project/a/b/c.txt", READ | WRITE), "write implies read; nearest ancestor ~/project/a");
        assert!(!j("home/project/x", WRITE), "~/project is read-only");
        assert!(j("tmp/agent/out", WRITE) && !j("tmp/other", READ), "default deny");
        assert!(!j("home/.ssh/id", READ) && !j("etc/shadow", READ) && j("etc/hosts", READ));
        let v = judge_path(&t, &r.join("home/.ssh/id"), READ);
        assert_eq!(t.rules[v.rule_id as usize - 1].name, "deny:~/.ssh");
    }

    #[test]
    fn an_allow_beneath_a_deny_is_still_denied() {
        let d = scratch("nested");
        touch(&d.0.join("home/.ssh/pub/key.pub"));
        let t = tables(&d.0, "    default: allow\n    read: [\"~/.ssh/pub\"]\n    deny: [\"~/.ssh\"]\n");
        assert!(!judge_path(&t, &d.0.join("home/.ssh/pub/key.pub"), READ).allowed);
        assert!(judge_path(&t, &d.0.join("home/other"), WRITE).allowed, "default allow");
    }

    #[test]
    fn symlinks_in_the_policy_resolve_and_hard_links_keep_the_deny() {
        let d = scratch("links");
        let r = &d.0;
        touch(&r.join("real/.aws/credentials"));
        touch(&r.join("home/x"));
        std::os::unix::fs::symlink(r.join("real/.aws"), r.join("home/.aws")).unwrap();
        std::fs::create_dir_all(r.join("tmp")).unwrap();
        std::fs::hard_link(r.join("real/.aws/credentials"), r.join("tmp/innocent")).unwrap();
        let t = tables(r, "    default: allow\n    deny: [\"~/.aws\"]\n");
        assert_eq!(t.rules[0].resolved, r.join("real/.aws"));
        assert!(!judge_path(&t, &r.join("real/.aws/credentials"), READ).allowed);
        assert!(!judge_path(&t, &r.join("tmp/innocent"), READ).allowed, "the hard link is listed by inode");
        assert!(judge_path(&t, &r.join("home/x"), READ).allowed);
    }

    #[test]
    fn a_missing_path_is_protected_once_created() {
        let d = scratch("pending");
        let r = &d.0;
        std::fs::create_dir_all(r.join("home")).unwrap();
        let t = tables(r, "    default: allow\n    deny: [\"~/.config/gcloud\"]\n");
        assert_eq!(t.pending.iter().filter(|p| !p.existed).count(), 1);
        assert_eq!(t.pending[0].names, vec![".config", "gcloud"]);
        touch(&r.join("home/.config/gcloud/token"));
        touch(&r.join("home/.config/other"));
        assert!(!judge_path(&t, &r.join("home/.config/gcloud/token"), READ).allowed);
        assert!(judge_path(&t, &r.join("home/.config/other"), READ).allowed);
    }

    #[test]
    fn too_deep_a_missing_path_is_refused() {
        let d = scratch("deep");
        let text = "apiVersion: enforcer/v1\nkind: AgentPolicy\nmetadata:\n  name: t\nspec:\n  files:\n    deny: [\"~/a/b/c/d/e\"]\n";
        let policy = parse_policy_str(text, "t.yaml").unwrap();
        let err = compile(policy.files.as_ref().unwrap(), &d.0).unwrap_err();
        assert!(err.contains("at most 4 may be missing"), "{err}");
    }

    #[test]
    fn kernel_dev_encodes_major_and_minor() {
        assert_eq!(kernel_dev(nix::sys::stat::makedev(8, 1)), (8 << 20) | 1);
        assert_eq!(kernel_dev(nix::sys::stat::makedev(259, 70000)), (259 << 20) | 70000);
    }

    #[test]
    fn a_listed_file_replaced_under_its_name_keeps_its_rule() {
        let d = scratch("replaced");
        let r = &d.0;
        touch(&r.join("home/.aws/credentials"));
        touch(&r.join("home/.aws/config"));
        let t = tables(r, "    default: allow\n    deny: [\"~/.aws/credentials\"]\n");
        assert!(t.pending.iter().any(|p| p.existed && p.names == [String::from("credentials")]));
        assert!(!t.missed_creations(), "a name that existed at compile is not a missed creation");
        // A new file renamed over the name: a new inode, the same rule.
        touch(&r.join("home/.aws/credentials.new"));
        std::fs::rename(r.join("home/.aws/credentials.new"), r.join("home/.aws/credentials")).unwrap();
        assert!(!judge_path(&t, &r.join("home/.aws/credentials"), READ).allowed);
        assert!(judge_path(&t, &r.join("home/.aws/config"), READ).allowed);
    }
}
