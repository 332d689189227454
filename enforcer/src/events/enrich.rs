//! What the kernel record does not carry: names of cgroups, policies, rules, users and
//! executables, the wall-clock time, the host. Turns kernel records (and the fanotify
//! backend's decisions) into `Event`s.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use enforcer_common::{EventHeader, FileEvent, NetEvent, family, hook, verdict};

use super::{
    Category, Cgroup, Destination, Enforcer, Event, EventInfo, File, Host, Network, Parent, PolicyRef, Process, Rule,
    Thread, User,
    decode::{KernelEvent, access_names, c_str, event_path, file_action},
};
use crate::{
    host::{self, cgroup},
    state::{self, SlotInfo},
};

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

/// Slot names and process facts are re-read after this long: policies are replaced
/// (reload, grant) into other slots, and a pid is reused only after its process is gone.
const CACHE_TTL: Duration = Duration::from_secs(1);
/// Processes remembered at most (a walk, not a leak, for a busy agent).
const MAX_PROCESSES: usize = 4096;

pub struct Enricher {
    mount: PathBuf,
    attach_point: PathBuf,
    boot_to_unix_ns: i128,
    host: String,
    cgroup_paths: HashMap<u64, String>,
    slots: HashMap<u32, (Instant, Arc<SlotInfo>)>,
    user_names: HashMap<u32, Option<String>>,
    /// pid -> (read at, executable, parent pid): a busy process makes many decisions.
    processes: HashMap<u32, (Instant, Option<String>, Option<u32>)>,
}

/// What /proc says of a process now (best effort: it may have exited).
fn executable(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok().map(|p| p.display().to_string())
}

fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
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

fn destination_ip(ev: &NetEvent) -> String {
    if ev.family == family::INET6 {
        Ipv6Addr::from(ev.addr).to_string()
    } else {
        Ipv4Addr::new(ev.addr[0], ev.addr[1], ev.addr[2], ev.addr[3]).to_string()
    }
}

impl Enricher {
    pub fn new(mount: &Path, attach_point: &Path) -> Self {
        Self {
            mount: mount.into(),
            attach_point: attach_point.into(),
            boot_to_unix_ns: host::boot_to_unix_offset_ns(),
            host: host::hostname(),
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

    /// What is known of a slot; its `spec` (the policy without grants) holds the alert
    /// thresholds and log_allowed.
    pub fn slot_info(&mut self, slot: u32) -> Arc<SlotInfo> {
        if let Some((read_at, info)) = self.slots.get(&slot)
            && read_at.elapsed() < CACHE_TTL
        {
            return info.clone();
        }
        let info = Arc::new(state::read_slot_info(slot).unwrap_or_default());
        if !info.policy.is_empty() {
            self.slots.insert(slot, (Instant::now(), info.clone()));
        }
        info
    }

    /// Executable and parent of a process, read from /proc at most once a second.
    fn process_facts(&mut self, pid: u32) -> (Option<String>, Option<u32>) {
        let now = Instant::now();
        if let Some((read_at, exe, ppid)) = self.processes.get(&pid)
            && now.duration_since(*read_at) < CACHE_TTL
        {
            return (exe.clone(), *ppid);
        }
        if self.processes.len() > MAX_PROCESSES {
            self.processes.retain(|_, (t, ..)| now.duration_since(*t) < CACHE_TTL);
        }
        let facts = (executable(pid), parent_pid(pid));
        self.processes.insert(pid, (now, facts.0.clone(), facts.1));
        facts
    }

    fn process(&mut self, pid: u32, tid: u32, comm: String) -> Process {
        let (executable, ppid) = self.process_facts(pid);
        Process {
            pid,
            thread: Some(Thread { id: tid }),
            name: Some(comm),
            executable,
            parent: ppid.map(|pid| Parent { pid }),
        }
    }

    fn user(&mut self, uid: u32) -> User {
        let name = self.user_names.entry(uid).or_insert_with(|| host::users::name_of(uid)).clone();
        User { id: uid.to_string(), name }
    }

    fn rule_name(info: &SlotInfo, rule_id: u32, file: bool) -> String {
        let names = if file { &info.file_rules } else { &info.rules };
        match rule_id {
            0 => "default".to_string(),
            enforcer_common::RULE_ISOLATED => "isolated".to_string(),
            enforcer_common::RULE_FAIL_CLOSED => "fail-closed".to_string(),
            id => names.get(id as usize - 1).cloned().unwrap_or_else(|| format!("rule-{id}")),
        }
    }

    /// The parts every decision shares: who, under which policy and rule, where.
    fn decision(&mut self, unix_ns: i128, info: EventInfo, h: Who, rule_id: u32, file: bool) -> Event {
        let slot = self.slot_info(h.slot);
        Event {
            timestamp: host::rfc3339_nanos(unix_ns),
            event: info,
            process: Some(self.process(h.pid, h.tid, h.comm)),
            user: Some(self.user(h.uid)),
            policy: Some(PolicyRef { name: Some(slot.policy.clone()), mode: Some(slot.mode.clone()) }),
            rule: Some(Rule { name: Self::rule_name(&slot, rule_id, file), id: Some(rule_id) }),
            cgroup: Some(Cgroup { path: self.cgroup_path(h.cgroup_id), id: Some(h.cgroup_id) }),
            host: Some(Host { name: self.host.clone() }),
            ..Event::default()
        }
    }

    pub fn to_event(&mut self, ev: &KernelEvent) -> Event {
        match ev {
            KernelEvent::Net(e) => self.net_event(e),
            KernelEvent::File(e) => {
                let facts = self.file_facts(e);
                self.file_event(&facts)
            }
        }
    }

    fn file_facts(&self, e: &FileEvent) -> FileFacts {
        let h = &e.header;
        FileFacts {
            unix_ns: h.boot_ns as i128 + self.boot_to_unix_ns,
            pid: h.pid,
            tid: h.tid,
            uid: h.uid,
            comm: c_str(&h.comm),
            cgroup_id: h.cgroup_id,
            slot: h.slot,
            rule_id: h.rule_id,
            hook: h.hook,
            verdict: h.verdict,
            requested: e.requested,
            change: e.change,
            path: event_path(e),
            inode: e.ino,
            device: e.dev,
            backend: "bpf-lsm",
        }
    }

    pub fn file_event(&mut self, f: &FileFacts) -> Event {
        let denied = f.verdict == verdict::DENY;
        let info = EventInfo::decision(Category::File, file_action(f.hook, f.requested, f.change), denied);
        let who =
            Who { pid: f.pid, tid: f.tid, uid: f.uid, comm: f.comm.clone(), cgroup_id: f.cgroup_id, slot: f.slot };
        Event {
            enforcer: Some(Enforcer {
                verdict: Some(verdict::name(f.verdict)),
                hook: Some(hook::name(f.hook)),
                slot: Some(f.slot),
                backend: Some(f.backend),
                access: Some(access_names(f.requested)),
                ..Enforcer::default()
            }),
            file: Some(File { path: f.path.clone(), inode: f.inode, device: f.device }),
            ..self.decision(f.unix_ns, info, who, f.rule_id, true)
        }
    }

    fn net_event(&mut self, ev: &NetEvent) -> Event {
        let h: &EventHeader = &ev.header;
        let (action, transport) = match h.hook {
            hook::SOCK_CREATE => ("socket-create", socket_transport(ev.sock_type, ev.protocol)),
            hook::SENDMSG4 | hook::SENDMSG6 => ("network-sendmsg", ip_transport(ev.protocol)),
            _ => ("network-connect", ip_transport(ev.protocol)),
        };
        let info = EventInfo::decision(Category::Network, action, h.verdict == verdict::DENY);
        let who =
            Who { pid: h.pid, tid: h.tid, uid: h.uid, comm: c_str(&h.comm), cgroup_id: h.cgroup_id, slot: h.slot };
        Event {
            enforcer: Some(Enforcer {
                verdict: Some(verdict::name(h.verdict)),
                hook: Some(hook::name(h.hook)),
                slot: Some(h.slot),
                ..Enforcer::default()
            }),
            network: Some(Network {
                transport,
                family: Some(if ev.family == family::INET6 { "ipv6" } else { "ipv4" }),
                protocol: None,
            }),
            destination: (h.hook != hook::SOCK_CREATE).then(|| Destination { ip: destination_ip(ev), port: ev.port }),
            ..self.decision(h.boot_ns as i128 + self.boot_to_unix_ns, info, who, h.rule_id, false)
        }
    }
}

/// Who made a decision, as both kinds of record say it.
struct Who {
    pid: u32,
    tid: u32,
    uid: u32,
    comm: String,
    cgroup_id: u64,
    slot: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_process_facts_from_proc() {
        let me = std::process::id();
        assert_eq!(executable(me), std::env::current_exe().ok().map(|p| p.display().to_string()));
        assert_eq!(parent_pid(me), Some(std::os::unix::process::parent_id()));
    }

    #[test]
    fn names_transports_and_destinations() {
        assert_eq!(socket_transport(3, 1), "raw");
        assert_eq!(ip_transport(17), "udp");
        assert_eq!(ip_transport(132), "ip-proto-132");
    }
}
