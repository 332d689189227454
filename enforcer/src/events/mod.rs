//! Decision events: the kernel's records decoded (`decode`), given the names the kernel
//! does not know (`enrich`), as one typed Elastic Common Schema document (`Event`)
//! that is serialized once, by the sinks. Consumers (alerts, metrics) read the struct.
pub mod decode;
pub mod enrich;

use serde::Serialize;

use crate::model::grants::Grant;

pub use decode::KernelEvent;
pub use enrich::{Enricher, FileFacts};

/// One ECS document. Sections that do not apply to an event are left out.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Event {
    #[serde(rename = "@timestamp")]
    pub timestamp: String,
    pub event: EventInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enforcer: Option<Enforcer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<File>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<Destination>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<Process>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<Rule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<Cgroup>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<Host>,
}

/// ECS `event.*`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EventInfo {
    pub kind: Kind,
    pub category: [Category; 1],
    /// `network-connect`, `file-open`, `dns-query`, `isolate`, `denial-burst`, ...
    pub action: String,
    #[serde(rename = "type")]
    pub kind_of: [Type; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    Event,
    Alert,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    #[default]
    Network,
    File,
    Configuration,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Type {
    Allowed,
    Denied,
    Change,
    #[default]
    Info,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Success,
    Failure,
}

impl EventInfo {
    /// A decision: `denied` picks the type and outcome.
    pub fn decision(category: Category, action: impl Into<String>, denied: bool) -> Self {
        Self {
            kind: Kind::Event,
            category: [category],
            action: action.into(),
            kind_of: [if denied { Type::Denied } else { Type::Allowed }],
            outcome: Some(if denied { Outcome::Failure } else { Outcome::Success }),
            reason: None,
        }
    }

    /// An operator's change (isolate, grant, ...), which succeeded.
    pub fn change(action: &str) -> Self {
        Self {
            kind: Kind::Event,
            category: [Category::Configuration],
            action: action.into(),
            kind_of: [Type::Change],
            outcome: Some(Outcome::Success),
            reason: None,
        }
    }

    pub fn is_denied(&self) -> bool {
        self.kind_of[0] == Type::Denied
    }
}

/// enforcer's own fields (`enforcer.*`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Enforcer {
    /// `allow`, `deny`, `audit-deny` (kernel decisions) or the DNS proxy's verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    /// Which file backend decided: `bpf-lsm` or `fanotify`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<&'static str>,
    /// What a file operation asked for: `read`, `write`, `exec`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access: Option<Vec<&'static str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isolated: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant: Option<GrantChange>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertDetail>,
}

/// The grant a `grant` or `revoke` changed; `detail` is gone after a revoke.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GrantChange {
    pub id: u32,
    pub detail: Option<Grant>,
}

/// What raised an alert.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AlertDetail {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_secs: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct File {
    pub path: String,
    pub inode: u64,
    /// The kernel's encoding (major << 20 | minor).
    pub device: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Dns {
    pub question: DnsQuestion,
    pub resolved_ip: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DnsQuestion {
    pub name: String,
    #[serde(rename = "type")]
    pub qtype: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Network {
    pub transport: String,
    /// `ipv4` or `ipv6` for kernel decisions.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub family: Option<&'static str>,
    /// `dns` for the proxy's queries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'static str>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Destination {
    pub ip: String,
    pub port: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Process {
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread: Option<Thread>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executable: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Thread {
    pub id: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Parent {
    pub pid: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct User {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PolicyRef {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Rule {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Cgroup {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Host {
    pub name: String,
}

impl Event {
    /// An operator's action on a confined cgroup (isolate, release, grant, revoke),
    /// stamped now and attributed to the calling user.
    pub fn change(action: &str, cgroup: Cgroup, enforcer: Enforcer) -> Self {
        Self {
            timestamp: crate::host::rfc3339_nanos(crate::host::unix_now_ns()),
            event: EventInfo::change(action),
            enforcer: Some(enforcer),
            cgroup: Some(cgroup),
            user: Some(User { id: crate::host::users::current_uid().to_string(), name: None }),
            process: Some(Process { pid: std::process::id(), ..Process::default() }),
            ..Self::default()
        }
    }

    /// The verdict of a decision (`enforcer.verdict`), `""` for other events.
    pub fn verdict(&self) -> &str {
        self.enforcer.as_ref().and_then(|e| e.verdict).unwrap_or("")
    }
}
