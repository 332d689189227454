//! Turns kernel decision records into Elastic Common Schema JSON lines and writes them
//! to the chosen sink.
use std::{
    collections::HashMap,
    io::{self, Write},
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use enforcer_common::{FileEvent, NetEvent, access, change, family, hook, verdict};
use serde_json::{Value, json};

use crate::{cgroup, loader};

/// A kernel record: the two kinds are told apart by their size.
#[derive(Debug, PartialEq, Eq)]
pub enum KernelEvent {
    Net(NetEvent),
    File(Box<FileEvent>),
}

impl KernelEvent {
    pub fn slot(&self) -> u32 {
        match self {
            Self::Net(e) => e.slot,
            Self::File(e) => e.slot,
        }
    }
    pub fn verdict(&self) -> u8 {
        match self {
            Self::Net(e) => e.verdict,
            Self::File(e) => e.verdict,
        }
    }
}

/// Decodes one ring-buffer record; `None` for a record of neither size.
pub fn decode(bytes: &[u8]) -> Option<KernelEvent> {
    if bytes.len() == size_of::<FileEvent>() {
        return Some(KernelEvent::File(Box::new(unsafe {
            std::ptr::read_unaligned(bytes.as_ptr().cast::<FileEvent>())
        })));
    }
    (bytes.len() == size_of::<NetEvent>())
        .then(|| KernelEvent::Net(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<NetEvent>()) }))
}

/// `read`, `write`, `exec` names of access bits.
pub fn access_names(bits: u8) -> Vec<&'static str> {
    [(access::READ, "read"), (access::WRITE, "write"), (access::EXEC, "exec")]
        .into_iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| n)
        .collect()
}

/// The path a file event carries: components deepest first, joined from the root.
pub fn event_path(ev: &FileEvent) -> String {
    let parts = (ev.parts as usize).min(ev.path.len());
    let mut out = String::new();
    if ev.truncated != 0 {
        out.push_str("/…");
    }
    for part in ev.path[..parts].iter().rev() {
        let len = part.iter().position(|&b| b == 0).unwrap_or(part.len());
        // A filesystem root crossed on the way up names itself "/".
        if len == 0 || &part[..len] == b"/" {
            continue;
        }
        out.push('/');
        out.push_str(&String::from_utf8_lossy(&part[..len]));
        if len == part.len() {
            out.push('…'); // the kernel keeps 31 bytes of each name
        }
    }
    if out.is_empty() { "/".into() } else { out }
}

/// The ECS `event.action` of a file decision.
pub fn file_action(hook_id: u8, requested: u8, change_kind: u8) -> String {
    match hook_id {
        hook::FILE_EXEC | hook::FILE_MMAP => "file-exec".into(),
        hook::FILE_CHANGE => format!("file-{}", change::name(change_kind)),
        _ if requested & access::WRITE != 0 => "file-write".into(),
        _ => "file-open".into(),
    }
}

/// What a file decision says, from the kernel or from the fanotify backend.
pub struct FileFacts {
    pub unix_ns: i128,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub slot: u32,
    pub rule_id: u32,
    pub hook: u8,
    pub verdict: u8,
    pub requested: u8,
    pub change: u8,
    pub path: String,
    pub inode: u64,
    pub device: u32,
    pub backend: &'static str,
}

/// What the kernel record does not carry: names of cgroups, policies and rules, the
/// wall-clock time, the host.
pub struct Enricher {
    mount: PathBuf,
    attach_point: PathBuf,
    boot_to_unix_ns: i128,
    host: String,
    cgroup_paths: HashMap<u64, String>,
    /// Slot names with when they were read: a slot is re-read after `SLOT_CACHE_TTL`,
    /// since policies are replaced (reload, grant) into other slots.
    slots: HashMap<u32, (std::time::Instant, std::sync::Arc<loader::SlotInfo>)>,
    user_names: HashMap<u32, Option<String>>,
    /// pid -> (read at, executable, parent pid): a busy process makes many decisions.
    processes: HashMap<u32, (std::time::Instant, Option<String>, Option<u32>)>,
}

const SLOT_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// What /proc says of a process now (best effort: it may have exited).
fn executable(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok().map(|p| p.display().to_string())
}

fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some(unsafe { std::ffi::CStr::from_ptr(pw.pw_name) }.to_string_lossy().into_owned())
}

impl Enricher {
    pub fn new(mount: &Path, attach_point: &Path) -> Self {
        let host =
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        Self {
            mount: mount.into(),
            attach_point: attach_point.into(),
            boot_to_unix_ns: boot_to_unix_offset_ns(),
            host,
            cgroup_paths: HashMap::new(),
            slots: HashMap::new(),
            user_names: HashMap::new(),
            processes: HashMap::new(),
        }
    }

    fn cgroup_path(&mut self, id: u64) -> String {
        if let Some(p) = self.cgroup_paths.get(&id) {
            return p.clone();
        }
        let path = cgroup::find_by_id(&self.attach_point, id)
            .map(|p| cgroup::display_path(&self.mount, &p))
            .unwrap_or_else(|| format!("cgroup-id:{id}"));
        self.cgroup_paths.insert(id, path.clone());
        path
    }

    fn slot(&mut self, slot: u32) -> std::sync::Arc<loader::SlotInfo> {
        if let Some((read_at, info)) = self.slots.get(&slot) {
            if read_at.elapsed() < SLOT_CACHE_TTL {
                return info.clone();
            }
        }
        let info = std::sync::Arc::new(loader::read_slot_info(slot).unwrap_or_default());
        if !info.policy.is_empty() {
            self.slots.insert(slot, (std::time::Instant::now(), info.clone()));
        }
        info
    }

    /// What is known of a slot; its `spec` (the policy without grants) holds the alert
    /// thresholds and log_allowed.
    pub fn slot_info(&mut self, slot: u32) -> std::sync::Arc<loader::SlotInfo> {
        self.slot(slot)
    }

    /// Executable and parent of a process, read from /proc at most once a second (a
    /// pid is reused only after its process is gone, and then rarely that fast).
    fn process_facts(&mut self, pid: u32) -> (Option<String>, Option<u32>) {
        let now = std::time::Instant::now();
        if let Some((read_at, exe, ppid)) = self.processes.get(&pid) {
            if now.duration_since(*read_at) < SLOT_CACHE_TTL {
                return (exe.clone(), *ppid);
            }
        }
        if self.processes.len() > 4096 {
            self.processes.retain(|_, (t, ..)| now.duration_since(*t) < SLOT_CACHE_TTL);
        }
        let facts = (executable(pid), parent_pid(pid));
        self.processes.insert(pid, (now, facts.0.clone(), facts.1));
        facts
    }

    pub fn to_ecs(&mut self, ev: &KernelEvent) -> Value {
        match ev {
            KernelEvent::Net(e) => self.net_to_ecs(e),
            KernelEvent::File(e) => {
                let comm_len = e.comm.iter().position(|&b| b == 0).unwrap_or(e.comm.len());
                let facts = FileFacts {
                    unix_ns: e.boot_ns as i128 + self.boot_to_unix_ns,
                    pid: e.pid,
                    tid: e.tid,
                    uid: e.uid,
                    comm: String::from_utf8_lossy(&e.comm[..comm_len]).into_owned(),
                    cgroup_id: e.cgroup_id,
                    slot: e.slot,
                    rule_id: e.rule_id,
                    hook: e.hook,
                    verdict: e.verdict,
                    requested: e.requested,
                    change: e.change,
                    path: event_path(e),
                    inode: e.ino,
                    device: e.dev,
                    backend: "bpf-lsm",
                };
                self.file_to_ecs(&facts)
            }
        }
    }

    fn rule_name(info: &loader::SlotInfo, rule_id: u32, file: bool) -> String {
        let names = if file { &info.file_rules } else { &info.rules };
        match rule_id {
            0 => "default".to_string(),
            enforcer_common::RULE_ISOLATED => "isolated".to_string(),
            enforcer_common::RULE_FAIL_CLOSED => "fail-closed".to_string(),
            id => names.get(id as usize - 1).cloned().unwrap_or_else(|| format!("rule-{id}")),
        }
    }

    pub fn file_to_ecs(&mut self, f: &FileFacts) -> Value {
        let info = self.slot(f.slot);
        let denied = f.verdict == verdict::DENY;
        let (exe, ppid) = self.process_facts(f.pid);
        json!({
            "@timestamp": rfc3339_nanos(f.unix_ns),
            "event": {
                "kind": "event",
                "category": ["file"],
                "action": file_action(f.hook, f.requested, f.change),
                "type": [if denied { "denied" } else { "allowed" }],
                "outcome": if denied { "failure" } else { "success" },
            },
            "enforcer": {
                "verdict": verdict::name(f.verdict),
                "hook": hook::name(f.hook),
                "slot": f.slot,
                "backend": f.backend,
                "access": access_names(f.requested),
            },
            "file": { "path": f.path, "inode": f.inode, "device": f.device },
            "process": {
                "pid": f.pid,
                "thread": { "id": f.tid },
                "name": f.comm,
                "executable": exe,
                "parent": { "pid": ppid },
            },
            "user": {
                "id": f.uid.to_string(),
                "name": self.user_names.entry(f.uid).or_insert_with(|| user_name(f.uid)).clone(),
            },
            "policy": { "name": info.policy, "mode": info.mode },
            "rule": { "name": Self::rule_name(&info, f.rule_id, true), "id": f.rule_id },
            "cgroup": { "path": self.cgroup_path(f.cgroup_id), "id": f.cgroup_id },
            "host": { "name": self.host },
        })
    }

    fn net_to_ecs(&mut self, ev: &NetEvent) -> Value {
        let info = self.slot(ev.slot);
        let unix_ns = ev.boot_ns as i128 + self.boot_to_unix_ns;
        let decided = ev.verdict == verdict::DENY;
        let rule_name = Self::rule_name(&info, ev.rule_id, false);
        let comm_len = ev.comm.iter().position(|&b| b == 0).unwrap_or(ev.comm.len());
        let (exe, ppid) = self.process_facts(ev.pid);
        let (action, transport) = match ev.hook {
            hook::SOCK_CREATE => ("socket-create", socket_transport(ev.sock_type, ev.protocol)),
            hook::SENDMSG4 | hook::SENDMSG6 => ("network-sendmsg", ip_transport(ev.protocol)),
            _ => ("network-connect", ip_transport(ev.protocol)),
        };
        let mut doc = json!({
            "@timestamp": rfc3339_nanos(unix_ns),
            "event": {
                "kind": "event",
                "category": ["network"],
                "action": action,
                "type": [if decided { "denied" } else { "allowed" }],
                "outcome": if decided { "failure" } else { "success" },
            },
            "enforcer": { "verdict": verdict::name(ev.verdict), "hook": hook::name(ev.hook), "slot": ev.slot },
            "process": {
                "pid": ev.pid,
                "thread": { "id": ev.tid },
                "name": String::from_utf8_lossy(&ev.comm[..comm_len]),
                "executable": exe,
                "parent": { "pid": ppid },
            },
            "user": {
                "id": ev.uid.to_string(),
                "name": self.user_names.entry(ev.uid).or_insert_with(|| user_name(ev.uid)).clone(),
            },
            "network": { "transport": transport, "type": if ev.family == family::INET6 { "ipv6" } else { "ipv4" } },
            "policy": { "name": info.policy, "mode": info.mode },
            "rule": { "name": rule_name, "id": ev.rule_id },
            "cgroup": { "path": self.cgroup_path(ev.cgroup_id), "id": ev.cgroup_id },
            "host": { "name": self.host },
        });
        if ev.hook != hook::SOCK_CREATE {
            doc["destination"] = json!({ "ip": destination_ip(ev), "port": ev.port });
        }
        doc
    }
}

fn destination_ip(ev: &NetEvent) -> String {
    if ev.family == family::INET6 {
        Ipv6Addr::from(ev.addr).to_string()
    } else {
        Ipv4Addr::new(ev.addr[0], ev.addr[1], ev.addr[2], ev.addr[3]).to_string()
    }
}

fn ip_transport(protocol: u8) -> String {
    match protocol {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "ipv6-icmp".into(),
        other => format!("ip-proto-{other}"),
    }
}

fn socket_transport(sock_type: u16, protocol: u8) -> String {
    if sock_type == 3 { "raw".into() } else { ip_transport(protocol) }
}

/// CLOCK_REALTIME - CLOCK_BOOTTIME, to turn the kernel's boot-time stamps into dates.
fn boot_to_unix_offset_ns() -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    let boot = ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128;
    unix_now_ns() - boot
}

/// Nanoseconds since the epoch, now.
pub fn unix_now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

/// `2026-11-23T06:10:00.123456789Z` from nanoseconds since the epoch.
pub fn rfc3339_nanos(unix_ns: i128) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000) as i64;
    let nanos = unix_ns.rem_euclid(1_000_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Where event lines go. Files get the hash-chained audit format (`audit`).
pub enum Sink {
    Stdout,
    Stderr,
    File(crate::audit::ChainWriter),
}

/// Size-based rotation of a file sink.
#[derive(Clone, Copy, Debug)]
pub struct Rotation {
    pub max_bytes: u64,
    pub keep: usize,
}

impl Sink {
    /// `-` is stdout; anything else a chained file, continued if it exists.
    pub fn open(target: &str, rotation: Rotation) -> Result<Self, crate::audit::AuditError> {
        if target == "-" {
            return Ok(Self::Stdout);
        }
        crate::audit::ChainWriter::open(Path::new(target), Some(rotation.max_bytes), rotation.keep).map(Self::File)
    }

    /// Writes one event; files buffer until `flush`.
    pub fn write_event(&mut self, event: &crate::sinks::Outgoing) -> io::Result<()> {
        match self {
            Self::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(&event.json)?;
                out.write_all(b"\n")?;
                out.flush()
            }
            Self::Stderr => {
                let mut err = io::stderr().lock();
                err.write_all(&event.json)?;
                err.write_all(b"\n")
            }
            Self::File(chain) => chain.append_json(&event.json).map_err(io::Error::other),
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::File(chain) => chain.flush().map_err(io::Error::other),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_timestamps_as_rfc3339() {
        assert_eq!(rfc3339_nanos(0), "1970-01-01T00:00:00.000000000Z");
        // 2024-02-29T12:34:56.000000007Z, a leap day.
        assert_eq!(rfc3339_nanos(1_709_210_096_000_000_007), "2024-02-29T12:34:56.000000007Z");
    }

    #[test]
    fn decodes_records_of_the_right_size_only() {
        let ev = NetEvent {
            boot_ns: 1,
            cgroup_id: 2,
            tid: 3,
            pid: 4,
            uid: 5,
            slot: 6,
            rule_id: 7,
            hook: hook::CONNECT4,
            verdict: verdict::DENY,
            family: family::INET,
            protocol: 6,
            port: 443,
            sock_type: 1,
            addr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            _pad: 0,
        };
        let bytes = unsafe { std::slice::from_raw_parts((&ev as *const NetEvent).cast::<u8>(), size_of::<NetEvent>()) };
        assert_eq!(decode(bytes), Some(KernelEvent::Net(ev)));
        assert_eq!(decode(&bytes[..10]), None);
        assert_eq!(destination_ip(&ev), "10.0.0.1");
    }

    #[test]
    fn reads_process_facts_from_proc() {
        let me = std::process::id();
        assert_eq!(executable(me), std::env::current_exe().ok().map(|p| p.display().to_string()));
        assert_eq!(parent_pid(me), Some(std::os::unix::process::parent_id()));
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }
}
