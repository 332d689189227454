//! enforcer: the user-space controller. Layers, each importing only those below it:
//!
//! - `cli` (clap definitions) and `cmd` (the commands) on top;
//! - `session`: confining a cgroup, the file backend, spawning the agent, the event loop;
//! - `bpf` (the only user of aya), `dns` (the proxy), `fanotify` (the fallback file
//!   backend), `events` (kernel records to typed ECS events), `sinks` (where events go),
//!   and the leaves `alerts` and `metrics`;
//! - `model` (pure: YAML policy in, table entries out), `state` (/run/enforcer) and
//!   `host` (cgroups, users, clocks), over `enforcer_common`.
pub mod alerts;
pub mod bpf;
pub mod cli;
pub mod cmd;
pub mod dns;
pub mod events;
pub mod fanotify;
pub mod host;
pub mod metrics;
pub mod model;
pub mod session;
pub mod sinks;
pub mod state;
