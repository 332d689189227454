//! The running kernel's BTF, read once per process (`running_kernel`), and a small
//! reader of raw BTF (Documentation/bpf/btf.rst) for the one thing aya 0.14's `Btf`
//! does not expose: struct member offsets.
//!
//! The eBPF programs are written in Rust and get no CO-RE relocations, so the
//! controller reads the offsets they need from `/sys/kernel/btf/vmlinux` at load time
//! and hands them to the programs: one build then runs on kernels 6.1, 6.12 and 6.18.
//!
//! Only native little-endian blobs are read; a big-endian blob is refused with a
//! clear error. Type ids start at 1 (id 0 is `void`).
use std::collections::HashMap;

use anyhow::Context as _;
use enforcer_common::KernelOffsets;

/// Where the running kernel exposes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const BTF_MAGIC: u16 = 0xeb9f;
/// Size of `struct btf_header` (version 1).
const HEADER_LEN: usize = 24;
/// Size of `struct btf_type`.
const TYPE_LEN: usize = 12;
/// How many typedef/const/volatile links (or nested anonymous members) to follow
/// before calling the BTF malformed: real kernels need a handful.
const MAX_CHAIN: usize = 64;

const KIND_INT: u8 = 1;
const KIND_PTR: u8 = 2;
const KIND_ARRAY: u8 = 3;
const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;
const KIND_ENUM: u8 = 6;
const KIND_FWD: u8 = 7;
const KIND_TYPEDEF: u8 = 8;
const KIND_VOLATILE: u8 = 9;
const KIND_CONST: u8 = 10;
const KIND_RESTRICT: u8 = 11;
const KIND_FUNC: u8 = 12;
const KIND_FUNC_PROTO: u8 = 13;
const KIND_VAR: u8 = 14;
const KIND_DATASEC: u8 = 15;
const KIND_FLOAT: u8 = 16;
const KIND_DECL_TAG: u8 = 17;
const KIND_TYPE_TAG: u8 = 18;
const KIND_ENUM64: u8 = 19;

/// Why a lookup failed; returned inside `anyhow::Error` (callers may downcast).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BtfError {
    #[error("BTF has no struct or union named {0:?}")]
    UnknownStruct(String),
    #[error("struct {struct_name}: no member {member:?} (looking up {path:?})")]
    UnknownMember { struct_name: String, path: String, member: String },
    #[error("struct {struct_name}: member {member:?} (looking up {path:?}) is a bitfield and has no byte offset")]
    Bitfield { struct_name: String, path: String, member: String },
    #[error(
        "struct {struct_name}: member {member:?} (looking up {path:?}) is a {kind}, not a struct or union, and has no members"
    )]
    NotAStruct { struct_name: String, path: String, member: String, kind: &'static str },
    #[error("malformed BTF: {0}")]
    Malformed(String),
}

fn malformed(msg: impl Into<String>) -> anyhow::Error {
    BtfError::Malformed(msg.into()).into()
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        0 => "void",
        KIND_INT => "int",
        KIND_PTR => "pointer",
        KIND_ARRAY => "array",
        KIND_STRUCT => "struct",
        KIND_UNION => "union",
        KIND_ENUM => "enum",
        KIND_FWD => "forward declaration",
        KIND_TYPEDEF => "typedef",
        KIND_VOLATILE => "volatile",
        KIND_CONST => "const",
        KIND_RESTRICT => "restrict",
        KIND_FUNC => "function",
        KIND_FUNC_PROTO => "function prototype",
        KIND_VAR => "variable",
        KIND_DATASEC => "data section",
        KIND_FLOAT => "float",
        KIND_DECL_TAG => "decl tag",
        KIND_TYPE_TAG => "type tag",
        KIND_ENUM64 => "enum64",
        _ => "unknown kind",
    }
}

/// One `struct btf_type`, plus where its kind-specific data starts.
#[derive(Clone, Copy, Debug)]
struct Type {
    name_off: u32,
    kind: u8,
    kind_flag: bool,
    vlen: u16,
    /// `size` for INT/STRUCT/UNION/ENUM/ENUM64/FLOAT/DATASEC, `type` for the others.
    size_or_type: u32,
    /// Offset of the kind-specific data inside the type section.
    extra: u32,
}

/// One member of a struct or union.
#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Raw `offset` field (bit offset, or bitfield size << 24 | bit offset with kind_flag).
    offset: u32,
}

/// Types of the running kernel (or any BTF blob), enough to find struct member offsets.
pub struct KernelBtf {
    /// The type section.
    type_data: Vec<u8>,
    /// The string section.
    strings: Vec<u8>,
    /// Indexed by type id; entry 0 stands for `void`.
    types: Vec<Type>,
    structs: HashMap<Box<str>, u32>,
    unions: HashMap<Box<str>, u32>,
}

impl std::fmt::Debug for KernelBtf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelBtf")
            .field("types", &(self.types.len() - 1))
            .field("structs", &self.structs.len())
            .field("unions", &self.unions.len())
            .finish_non_exhaustive()
    }
}

fn u32_at(bytes: &[u8], off: usize) -> Option<u32> {
    let b = bytes.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Size of the kind-specific data that follows a `struct btf_type`.
fn extra_len(kind: u8, vlen: usize) -> Option<usize> {
    Some(match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => vlen * 12,
        KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_FUNC | KIND_FLOAT
        | KIND_TYPE_TAG => 0,
        _ => return None,
    })
}

/// Inserts `name -> id` for a struct or union, preferring a definition with a size
/// (the first complete one) over an earlier empty one.
fn index_composite(map: &mut HashMap<Box<str>, u32>, types: &[Type], name: &str, id: u32) {
    match map.get_mut(name) {
        None => {
            map.insert(name.into(), id);
        }
        Some(old) => {
            let prev = &types[*old as usize];
            let new = &types[id as usize];
            if prev.size_or_type == 0 && prev.vlen == 0 && (new.size_or_type != 0 || new.vlen != 0) {
                *old = id;
            }
        }
    }
}

impl KernelBtf {
    /// Reads and parses the running kernel's BTF, `/sys/kernel/btf/vmlinux`.
    pub fn from_running_kernel() -> anyhow::Result<Self> {
        Self::from_path(VMLINUX_BTF)
    }

    /// Reads and parses a raw BTF file (such as `/sys/kernel/btf/vmlinux`).
    pub fn from_path(path: impl AsRef<std::path::Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).with_context(|| {
            format!("read kernel BTF {} (is the kernel built with CONFIG_DEBUG_INFO_BTF=y?)", path.display())
        })?;
        Self::parse(&bytes).with_context(|| format!("parse kernel BTF {}", path.display()))
    }

    /// Parses a raw BTF blob (header, type section, string section).
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        if bytes.len() < HEADER_LEN {
            return Err(malformed(format!("{} bytes is too short for a BTF header", bytes.len())));
        }
        let magic = u16::from_le_bytes([bytes[0], bytes[1]]);
        if magic != BTF_MAGIC {
            if magic == BTF_MAGIC.swap_bytes() {
                anyhow::bail!(BtfError::Malformed(
                    "BTF is big-endian; only native little-endian BTF is supported".into()
                ));
            }
            return Err(malformed(format!("bad magic {magic:#06x}, expected {BTF_MAGIC:#06x}")));
        }
        let version = bytes[2];
        if version != 1 {
            return Err(malformed(format!("unsupported BTF version {version}")));
        }
        let field = |i: usize| u32_at(bytes, 4 + 4 * i).unwrap_or(0) as usize;
        let (hdr_len, type_off, type_len, str_off, str_len) = (field(0), field(1), field(2), field(3), field(4));
        if hdr_len < HEADER_LEN || hdr_len > bytes.len() {
            return Err(malformed(format!("header length {hdr_len} out of range")));
        }
        let section = |what: &str, off: usize, len: usize| -> anyhow::Result<&[u8]> {
            hdr_len
                .checked_add(off)
                .and_then(|start| Some(start..start.checked_add(len)?))
                .and_then(|r| bytes.get(r))
                .ok_or_else(|| {
                    malformed(format!(
                        "{what} section (offset {off}, length {len}) runs past the end of the {} byte blob",
                        bytes.len()
                    ))
                })
        };
        let type_data = section("type", type_off, type_len)?;
        let strings = section("string", str_off, str_len)?;
        if strings.first().is_some_and(|&b| b != 0) {
            return Err(malformed("string section does not start with an empty string"));
        }

        // A kernel has ~130k types; they average about 25 bytes.
        let mut types = Vec::with_capacity(type_data.len() / 24 + 1);
        types.push(Type { name_off: 0, kind: 0, kind_flag: false, vlen: 0, size_or_type: 0, extra: 0 });
        let mut pos = 0usize;
        while pos < type_data.len() {
            let id = types.len();
            let (Some(name_off), Some(info), Some(size_or_type)) =
                (u32_at(type_data, pos), u32_at(type_data, pos + 4), u32_at(type_data, pos + 8))
            else {
                return Err(malformed(format!("type {id} at offset {pos} is truncated")));
            };
            let kind = ((info >> 24) & 0x1f) as u8;
            let vlen = (info & 0xffff) as u16;
            let extra = pos + TYPE_LEN;
            let len = extra_len(kind, vlen as usize)
                .ok_or_else(|| malformed(format!("type {id} at offset {pos} has unknown kind {kind}")))?;
            if extra + len > type_data.len() {
                return Err(malformed(format!("type {id} ({}) at offset {pos} is truncated", kind_name(kind))));
            }
            types.push(Type {
                name_off,
                kind,
                kind_flag: info & (1 << 31) != 0,
                vlen,
                size_or_type,
                extra: extra as u32,
            });
            pos = extra + len;
        }

        let mut btf = KernelBtf {
            type_data: type_data.to_vec(),
            strings: strings.to_vec(),
            types,
            structs: HashMap::new(),
            unions: HashMap::new(),
        };
        btf.build_indexes()?;
        Ok(btf)
    }

    fn build_indexes(&mut self) -> anyhow::Result<()> {
        let mut structs = HashMap::with_capacity(16 * 1024);
        let mut unions = HashMap::new();
        for (id, t) in self.types.iter().enumerate().skip(1) {
            if t.name_off == 0 || !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
                continue;
            }
            let name = self.name(t.name_off).with_context(|| format!("name of type {id} ({})", kind_name(t.kind)))?;
            if name.is_empty() {
                continue;
            }
            let id = id as u32;
            if t.kind == KIND_STRUCT {
                index_composite(&mut structs, &self.types, name, id);
            } else {
                index_composite(&mut unions, &self.types, name, id);
            }
        }
        self.structs = structs;
        self.unions = unions;
        Ok(())
    }

    /// The NUL-terminated string at `off` in the string section.
    fn name(&self, off: u32) -> anyhow::Result<&str> {
        let rest = self
            .strings
            .get(off as usize..)
            .ok_or_else(|| malformed(format!("string offset {off} is past the string section")))?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| malformed(format!("string at offset {off} is not NUL-terminated")))?;
        std::str::from_utf8(&rest[..end]).map_err(|_| malformed(format!("string at offset {off} is not UTF-8")))
    }

    fn ty(&self, id: u32) -> anyhow::Result<&Type> {
        self.types
            .get(id as usize)
            .ok_or_else(|| malformed(format!("type id {id} out of range (BTF has {} types)", self.types.len() - 1)))
    }

    /// Follows typedef/const/volatile/restrict/type_tag links to the underlying type.
    fn resolve(&self, mut id: u32) -> anyhow::Result<u32> {
        for _ in 0..MAX_CHAIN {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = t.size_or_type,
                _ => return Ok(id),
            }
        }
        Err(malformed(format!("type chain from type {id} is longer than {MAX_CHAIN} links")))
    }

    fn members(&self, t: &Type) -> impl Iterator<Item = Member> + '_ {
        let base = t.extra as usize;
        (0..t.vlen as usize).map(move |i| {
            let at = |j: usize| u32_at(&self.type_data, base + 12 * i + 4 * j).unwrap_or(0);
            Member { name_off: at(0), type_id: at(1), offset: at(2) }
        })
    }

    /// Struct or union named `name` (struct first).
    fn composite(&self, name: &str) -> Option<u32> {
        self.structs.get(name).or_else(|| self.unions.get(name)).copied()
    }

    /// Finds member `name` of struct/union `id`, looking inside anonymous struct and
    /// union members too. Returns the member and its bit offset from the start of `id`
    /// (or the error of a bitfield).
    fn find_member(&self, id: u32, name: &str, depth: usize) -> anyhow::Result<Option<(Member, Result<u32, ()>)>> {
        if depth > MAX_CHAIN {
            return Err(malformed(format!("anonymous members nested more than {MAX_CHAIN} deep in type {id}")));
        }
        let t = self.ty(id)?;
        let bit_offset = |m: &Member| -> Result<u32, ()> {
            let (size, off) = if t.kind_flag { (m.offset >> 24, m.offset & 0xff_ffff) } else { (0, m.offset) };
            if size != 0 || off % 8 != 0 { Err(()) } else { Ok(off) }
        };
        // Named members first: a direct hit wins over one inside an anonymous member.
        for m in self.members(t) {
            if m.name_off != 0 && self.name(m.name_off)? == name {
                return Ok(Some((m, bit_offset(&m))));
            }
        }
        for m in self.members(t) {
            if m.name_off != 0 && !self.name(m.name_off)?.is_empty() {
                continue;
            }
            let inner = self.resolve(m.type_id)?;
            if !matches!(self.ty(inner)?.kind, KIND_STRUCT | KIND_UNION) {
                continue;
            }
            if let Some((found, off)) = self.find_member(inner, name, depth + 1)? {
                let off = match (bit_offset(&m), off) {
                    (Ok(a), Ok(b)) => Ok(a + b),
                    _ => Err(()),
                };
                return Ok(Some((found, off)));
            }
        }
        Ok(None)
    }

    /// Byte offset of `path` ("f_path.dentry", "d_name.name", "i_sb") inside `struct <struct_name>`.
    /// Follows nested named members through typedefs/const/volatile to their struct/union type, and finds
    /// members inside anonymous struct/union members (e.g. `struct qstr`'s name is next to an anonymous union).
    /// Errors (clear messages naming struct and member): unknown struct, unknown member, a member that is a bitfield
    /// (kind_flag set with bitfield_size != 0, or offset not a multiple of 8), descending into a non-struct.
    pub fn member_offset(&self, struct_name: &str, path: &str) -> anyhow::Result<u32> {
        let mut id = self.composite(struct_name).ok_or_else(|| BtfError::UnknownStruct(struct_name.to_owned()))?;
        let mut bits = 0u32;
        let mut walked = String::new();
        for (i, part) in path.split('.').enumerate() {
            if i > 0 {
                // Descend into the previous member's type.
                let resolved = self.resolve(id)?;
                let kind = self.ty(resolved)?.kind;
                if !matches!(kind, KIND_STRUCT | KIND_UNION) {
                    return Err(BtfError::NotAStruct {
                        struct_name: struct_name.to_owned(),
                        path: path.to_owned(),
                        member: walked,
                        kind: kind_name(kind),
                    }
                    .into());
                }
                id = resolved;
                walked.push('.');
            }
            walked.push_str(part);
            let (member, off) = self.find_member(id, part, 0)?.ok_or_else(|| BtfError::UnknownMember {
                struct_name: struct_name.to_owned(),
                path: path.to_owned(),
                member: walked.clone(),
            })?;
            let off = off.map_err(|()| BtfError::Bitfield {
                struct_name: struct_name.to_owned(),
                path: path.to_owned(),
                member: walked.clone(),
            })?;
            bits = bits
                .checked_add(off)
                .ok_or_else(|| malformed(format!("struct {struct_name}: offset of {path:?} overflows")))?;
            id = member.type_id;
        }
        Ok(bits / 8)
    }
}

/// The running kernel's BTF, read once per process: this module's index for struct
/// member offsets (aya 0.14's `Btf` does not expose members), and aya's own for what
/// aya takes (LSM attach targets) and function lookups.
pub struct RunningKernel {
    members: KernelBtf,
    pub aya: aya::Btf,
}

/// Reads and parses `/sys/kernel/btf/vmlinux` on first use; later calls share it.
pub fn running_kernel() -> Result<&'static RunningKernel, String> {
    static KERNEL: std::sync::OnceLock<Result<RunningKernel, String>> = std::sync::OnceLock::new();
    KERNEL
        .get_or_init(|| {
            let bytes = std::fs::read(VMLINUX_BTF).map_err(|e| {
                format!("reading kernel BTF {VMLINUX_BTF} (is the kernel built with CONFIG_DEBUG_INFO_BTF=y?): {e}")
            })?;
            let members = KernelBtf::parse(&bytes).map_err(|e| format!("parsing {VMLINUX_BTF}: {e:#}"))?;
            let aya = aya::Btf::parse(&bytes, aya::Endianness::default())
                .map_err(|e| format!("parsing {VMLINUX_BTF}: {e}"))?;
            Ok(RunningKernel { members, aya })
        })
        .as_ref()
        .map_err(Clone::clone)
}

impl RunningKernel {
    /// Whether the kernel has the function (`bpf_lsm_path_mkdir` tells whether the path
    /// hooks exist: CONFIG_SECURITY_PATH).
    pub fn has_func(&self, name: &str) -> bool {
        self.aya.id_by_type_name_kind(name, aya_obj::btf::BtfKind::Func).is_ok()
    }

    /// The struct offsets the file programs use.
    pub fn offsets(&self) -> anyhow::Result<KernelOffsets> {
        let at = |s: &str, m: &str| self.members.member_offset(s, m);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds small BTF blobs for the tests.
    #[derive(Default)]
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Self {
            Self { types: Vec::new(), strings: vec![0], next_id: 1 }
        }

        fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn add(&mut self, kind: u8, name: &str, vlen: u16, kflag: bool, size_or_type: u32, extra: &[u32]) -> u32 {
            let name_off = self.str(name);
            let info = (kind as u32) << 24 | vlen as u32 | if kflag { 1 << 31 } else { 0 };
            for w in [name_off, info, size_or_type].iter().chain(extra) {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
            let id = self.next_id;
            self.next_id += 1;
            id
        }

        fn int(&mut self, name: &str, size: u32) -> u32 {
            self.add(KIND_INT, name, 0, false, size, &[(1 << 24) | (size * 8)])
        }

        /// members: (name, type, raw offset)
        fn composite(&mut self, kind: u8, name: &str, kflag: bool, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            let mut extra = Vec::new();
            for &(n, t, off) in members {
                extra.extend([self.str(n), t, off]);
            }
            self.add(kind, name, members.len() as u16, kflag, size, &extra)
        }

        fn func(&mut self, name: &str, ret: u32, params: &[(&str, u32)]) -> u32 {
            let mut extra = Vec::new();
            for &(n, t) in params {
                extra.extend([self.str(n), t]);
            }
            let proto = self.add(KIND_FUNC_PROTO, "", params.len() as u16, false, ret, &extra);
            self.add(KIND_FUNC, name, 0, false, proto, &[])
        }

        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
            out.extend([1u8, 0]);
            for w in [HEADER_LEN as u32, 0, self.types.len() as u32, self.types.len() as u32, self.strings.len() as u32]
            {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    fn err_of<T: std::fmt::Debug>(r: anyhow::Result<T>) -> BtfError {
        let e = r.expect_err("expected an error");
        e.downcast_ref::<BtfError>().unwrap_or_else(|| panic!("not a BtfError: {e:#}")).clone()
    }

    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        let int = b.int("int", 4); // 1
        let long = b.int("long", 8); // 2
        let ptr = b.add(KIND_PTR, "", 0, false, int, &[]); // 3
        let inner = b.composite(KIND_STRUCT, "inner", false, 8, &[("a", int, 0), ("b", int, 32)]); // 4
        let inner_t = b.add(KIND_TYPEDEF, "inner_t", 0, false, inner, &[]); // 5
        let const_inner = b.add(KIND_CONST, "", 0, false, inner_t, &[]); // 6
        let anon_union = b.composite(KIND_UNION, "", false, 8, &[("u1", int, 0), ("u2", long, 0)]);
        let anon_inner_union = b.composite(KIND_UNION, "", false, 8, &[("deep", long, 0)]);
        let anon_struct = b.composite(KIND_STRUCT, "", false, 16, &[("s1", int, 0), ("", anon_inner_union, 64)]);
        let fwd = b.add(KIND_FWD, "fwdonly", 0, false, 0, &[]);
        let fwd_ptr = b.add(KIND_PTR, "", 0, false, fwd, &[]);
        let arr = b.add(KIND_ARRAY, "", 0, false, 0, &[int, int, 4]);
        // struct outer {
        //   int x;             // 0
        //   int *p;            // 8
        //   const inner_t in;  // 16
        //   union { int u1; long u2; };   // 24
        //   int bits:3;        // 32 (bitfield)
        //   int y;             // 36
        //   struct { int s1; union { long deep; }; };  // 40
        //   struct fwdonly *f; // 56
        //   int arr[4];        // 64
        // };  // 80
        let outer = b.composite(
            KIND_STRUCT,
            "outer",
            true,
            80,
            &[
                ("x", int, 0),
                ("p", ptr, 64),
                ("in", const_inner, 128),
                ("", anon_union, 192),
                ("bits", int, (3 << 24) | 256),
                ("y", int, 288),
                ("", anon_struct, 320),
                ("f", fwd_ptr, 448),
                ("arr", arr, 512),
            ],
        );
        b.add(KIND_TYPEDEF, "outer_t", 0, false, outer, &[]);
        // Old-style bitfield: no kind_flag, offset not a multiple of 8.
        b.composite(KIND_STRUCT, "oldbits", false, 4, &[("lo", int, 0), ("hi", int, 4)]);
        // An empty declaration first, then the real one.
        b.composite(KIND_STRUCT, "dup", false, 0, &[]);
        b.composite(KIND_STRUCT, "dup", false, 16, &[("d", long, 64)]);
        b.composite(KIND_STRUCT, "dup", false, 32, &[("d", long, 128)]);
        b.func("bpf_lsm_test", int, &[("file", ptr), ("mask", int), ("", int)]);
        b.func("noargs", 0, &[]);
        b.build()
    }

    #[test]
    fn offsets_in_hand_built_btf() {
        let btf = KernelBtf::parse(&sample()).unwrap();
        let off = |s: &str, p: &str| btf.member_offset(s, p).unwrap_or_else(|e| panic!("{s}.{p}: {e:#}"));
        assert_eq!(off("outer", "x"), 0);
        assert_eq!(off("outer", "p"), 8);
        assert_eq!(off("outer", "in"), 16);
        assert_eq!(off("outer", "in.a"), 16);
        assert_eq!(off("outer", "in.b"), 20);
        assert_eq!(off("outer", "u1"), 24);
        assert_eq!(off("outer", "u2"), 24);
        assert_eq!(off("outer", "y"), 36);
        assert_eq!(off("outer", "s1"), 40);
        assert_eq!(off("outer", "deep"), 48);
        assert_eq!(off("outer", "f"), 56);
        assert_eq!(off("outer", "arr"), 64);
        assert_eq!(off("inner", "b"), 4);
        assert_eq!(off("dup", "d"), 8);
        assert_eq!(off("oldbits", "lo"), 0);
    }

    #[test]
    fn errors_in_hand_built_btf() {
        let btf = KernelBtf::parse(&sample()).unwrap();
        assert_eq!(err_of(btf.member_offset("nosuch", "x")), BtfError::UnknownStruct("nosuch".into()));
        // A forward declaration is not a definition.
        assert_eq!(err_of(btf.member_offset("fwdonly", "x")), BtfError::UnknownStruct("fwdonly".into()));
        assert_eq!(
            err_of(btf.member_offset("outer", "nosuch")),
            BtfError::UnknownMember { struct_name: "outer".into(), path: "nosuch".into(), member: "nosuch".into() }
        );
        assert_eq!(
            err_of(btf.member_offset("outer", "in.c")),
            BtfError::UnknownMember { struct_name: "outer".into(), path: "in.c".into(), member: "in.c".into() }
        );
        assert_eq!(
            err_of(btf.member_offset("outer", "bits")),
            BtfError::Bitfield { struct_name: "outer".into(), path: "bits".into(), member: "bits".into() }
        );
        assert_eq!(
            err_of(btf.member_offset("oldbits", "hi")),
            BtfError::Bitfield { struct_name: "oldbits".into(), path: "hi".into(), member: "hi".into() }
        );
        assert_eq!(
            err_of(btf.member_offset("outer", "x.y")),
            BtfError::NotAStruct { struct_name: "outer".into(), path: "x.y".into(), member: "x".into(), kind: "int" }
        );
        assert_eq!(
            err_of(btf.member_offset("outer", "p.a")),
            BtfError::NotAStruct {
                struct_name: "outer".into(),
                path: "p.a".into(),
                member: "p".into(),
                kind: "pointer"
            }
        );
        assert_eq!(
            err_of(btf.member_offset("outer", "f.a")),
            BtfError::NotAStruct {
                struct_name: "outer".into(),
                path: "f.a".into(),
                member: "f".into(),
                kind: "pointer"
            }
        );
        let msg = format!("{:#}", btf.member_offset("outer", "in.c").unwrap_err());
        assert!(msg.contains("outer") && msg.contains("in.c"), "{msg}");
        let msg = format!("{:#}", btf.member_offset("outer", "bits").unwrap_err());
        assert!(msg.contains("bitfield") && msg.contains("bits"), "{msg}");
    }

    #[test]
    fn malformed_blobs() {
        let good = sample();
        assert!(matches!(err_of(KernelBtf::parse(&good[..10])), BtfError::Malformed(_)));
        let mut be = good.clone();
        be[..2].copy_from_slice(&BTF_MAGIC.to_be_bytes());
        let msg = format!("{:#}", KernelBtf::parse(&be).unwrap_err());
        assert!(msg.contains("big-endian"), "{msg}");
        let mut bad = good.clone();
        bad[0] = 0;
        assert!(format!("{:#}", KernelBtf::parse(&bad).unwrap_err()).contains("magic"));
        // Truncated: the sections run past the end.
        assert!(matches!(err_of(KernelBtf::parse(&good[..good.len() - 1])), BtfError::Malformed(_)));
        // An unknown kind in the first type.
        let mut unknown = good.clone();
        unknown[HEADER_LEN + 7] = 30;
        let msg = format!("{:#}", KernelBtf::parse(&unknown).unwrap_err());
        assert!(msg.contains("unknown kind 30"), "{msg}");
        // Empty type section is fine.
        let empty = Builder::new().build();
        KernelBtf::parse(&empty).unwrap();
    }

    fn running_kernel() -> Option<KernelBtf> {
        match std::fs::metadata(VMLINUX_BTF) {
            Ok(_) => Some(KernelBtf::from_running_kernel().unwrap()),
            Err(e) => {
                println!("skipping: cannot read {VMLINUX_BTF}: {e}");
                None
            }
        }
    }

    #[test]
    fn running_kernel_offsets() {
        let Some(btf) = running_kernel() else { return };
        let off = |s: &str, p: &str| btf.member_offset(s, p).unwrap_or_else(|e| panic!("{s}.{p}: {e:#}"));
        assert_eq!(off("list_head", "next"), 0);
        assert_eq!(off("list_head", "prev"), 8);
        assert_eq!(off("file", "f_path.dentry"), off("file", "f_path") + off("path", "dentry"));
        assert_eq!(off("dentry", "d_name.name"), off("dentry", "d_name") + off("qstr", "name"));
        assert_eq!(off("mount", "mnt.mnt_root"), off("mount", "mnt") + off("vfsmount", "mnt_root"));
        for (s, p) in [
            ("dentry", "d_parent"),
            ("dentry", "d_inode"),
            ("dentry", "d_name.name"),
            ("inode", "i_ino"),
            ("inode", "i_sb"),
            ("super_block", "s_dev"),
            ("path", "mnt"),
            ("mount", "mnt"),
            ("mount", "mnt_parent"),
            ("mount", "mnt_mountpoint"),
            ("linux_binprm", "file"),
            ("qstr", "name"),
            ("qstr", "hash"),
        ] {
            println!("{s}.{p} = {}", off(s, p));
        }
        assert!(matches!(err_of(btf.member_offset("dentry", "d_nope")), BtfError::UnknownMember { .. }));
    }

    /// Every named member of every named struct of the running kernel resolves, or is a bitfield.
    #[test]
    fn running_kernel_every_member() {
        let Some(btf) = running_kernel() else { return };
        let (mut ok, mut bitfields) = (0, 0);
        for (name, &id) in &btf.structs {
            let t = btf.types[id as usize];
            for m in btf.members(&t) {
                let member = btf.name(m.name_off).unwrap();
                if member.is_empty() {
                    continue;
                }
                match btf.member_offset(name, member) {
                    Ok(off) => {
                        assert!(off <= t.size_or_type, "{name}.{member} at {off} > size {}", t.size_or_type);
                        ok += 1;
                    }
                    Err(e) => match e.downcast_ref::<BtfError>() {
                        Some(BtfError::Bitfield { .. }) => bitfields += 1,
                        _ => panic!("{name}.{member}: {e:#}"),
                    },
                }
            }
        }
        println!("{} structs: {ok} member offsets, {bitfields} bitfields", btf.structs.len());
        assert!(ok > 10_000);
    }

    /// `cargo test --release -p enforcer --lib btf::tests::parse_time -- --nocapture`
    #[test]
    fn parse_time() {
        let Ok(bytes) = std::fs::read(VMLINUX_BTF) else {
            println!("skipping: cannot read {VMLINUX_BTF}");
            return;
        };
        let mut best = std::time::Duration::MAX;
        for _ in 0..5 {
            let start = std::time::Instant::now();
            let btf = KernelBtf::parse(&bytes).unwrap();
            best = best.min(start.elapsed());
            std::hint::black_box(btf);
        }
        println!("parsed {} bytes of {VMLINUX_BTF} in {best:?} (best of 5)", bytes.len());
        let start = std::time::Instant::now();
        let btf = KernelBtf::from_running_kernel().unwrap();
        println!("read and parsed in {:?}: {btf:?}", start.elapsed());
    }
}
